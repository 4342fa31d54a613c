//! Wire event → validated domain event. Every rule names the field it is about, so a producer
//! can fix its payload from the error alone.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::config::IngestSettings;
use crate::domain::FieldError;
use crate::domain::normalize::normalize;
use crate::domain::pricing::MAX_TOKENS_PER_CLASS;
use crate::domain::usage::{CallStatus, EventIdentity, UsageEvent, UsageSource};
use crate::proto::v1 as pb;

/// The limits validation enforces, from settings.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_id_bytes: usize,
    pub max_attributes: usize,
    pub max_attribute_key_bytes: usize,
    pub max_attribute_value_bytes: usize,
    pub max_future_skew: chrono::Duration,
    pub retention: chrono::Duration,
}

impl Limits {
    pub fn from_settings(settings: &IngestSettings) -> Self {
        let duration =
            |d: std::time::Duration| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
        Self {
            max_id_bytes: settings.max_id_bytes,
            max_attributes: settings.max_attributes,
            max_attribute_key_bytes: settings.max_attribute_key_bytes,
            max_attribute_value_bytes: settings.max_attribute_value_bytes,
            max_future_skew: duration(settings.max_future_skew),
            retention: duration(settings.retention),
        }
    }
}

/// Validates and normalizes one event as of `now` (injected so the rule is testable).
pub fn validate(
    event: &pb::UsageEvent,
    limits: &Limits,
    now: DateTime<Utc>,
) -> Result<UsageEvent, FieldError> {
    let id = |field: &str, value: &str| -> Result<String, FieldError> {
        if value.is_empty() {
            return Err(FieldError::new(field, "is required"));
        }
        bounded_id(field, value, limits.max_id_bytes)
    };
    let optional_id = |field: &str, value: &Option<String>| -> Result<Option<String>, FieldError> {
        match value.as_deref() {
            None | Some("") => Ok(None),
            Some(v) => bounded_id(field, v, limits.max_id_bytes).map(Some),
        }
    };

    let event_id = id("event_id", &event.event_id)?;
    let source = id("source", &event.source)?;
    let tenant_id = id("tenant_id", &event.tenant_id)?;
    if !is_valid_tenant_id(&tenant_id) {
        return Err(FieldError::new(
            "tenant_id",
            "must be 1-64 characters of [A-Za-z0-9._-]",
        ));
    }
    let agent_id = id("agent_id", &event.agent_id)?;
    let provider = id("provider", &event.provider)?;
    if provider.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(FieldError::new(
            "provider",
            "must be lower-case, as in price books",
        ));
    }
    let model = id("model", &event.model)?;

    let occurred_at = occurred_at(event.occurred_at.as_ref(), limits, now)?;
    let usage = event.usage.as_ref().ok_or_else(|| {
        FieldError::new(
            "usage",
            "is required: set tokens or a provider usage object",
        )
    })?;
    let tokens = normalize(usage)?;
    if let Some((class, _)) = tokens.non_zero().find(|(_, n)| *n > MAX_TOKENS_PER_CLASS) {
        return Err(FieldError::new(
            format!("tokens.{class}"),
            format!("more than {MAX_TOKENS_PER_CLASS} tokens in one event"),
        ));
    }

    let usage_source = match pb::UsageSource::try_from(event.usage_source) {
        Ok(pb::UsageSource::Unspecified | pb::UsageSource::ProviderReported) => {
            UsageSource::ProviderReported
        }
        Ok(pb::UsageSource::Estimated) => UsageSource::Estimated,
        Err(_) => return Err(FieldError::new("usage_source", "unknown value")),
    };
    let status = match pb::UsageStatus::try_from(event.status) {
        Ok(pb::UsageStatus::Unspecified | pb::UsageStatus::Success) => CallStatus::Success,
        Ok(pb::UsageStatus::Error) => CallStatus::Error,
        Ok(pb::UsageStatus::Cancelled) => CallStatus::Cancelled,
        Err(_) => return Err(FieldError::new("status", "unknown value")),
    };

    if event.attributes.len() > limits.max_attributes {
        return Err(FieldError::new(
            "attributes",
            format!("more than {} attributes", limits.max_attributes),
        ));
    }
    let mut attributes = BTreeMap::new();
    for (key, value) in &event.attributes {
        if key.is_empty() || key.len() > limits.max_attribute_key_bytes {
            return Err(FieldError::new(
                "attributes",
                format!(
                    "key {key:?} must be 1-{} bytes",
                    limits.max_attribute_key_bytes
                ),
            ));
        }
        if value.len() > limits.max_attribute_value_bytes {
            return Err(FieldError::new(
                format!("attributes.{key}"),
                format!("longer than {} bytes", limits.max_attribute_value_bytes),
            ));
        }
        attributes.insert(key.clone(), value.clone());
    }

    Ok(UsageEvent {
        identity: EventIdentity {
            tenant_id,
            source,
            event_id,
        },
        agent_id,
        transaction_id: optional_id("transaction_id", &event.transaction_id)?,
        service: optional_id("service", &event.service)?,
        session_id: optional_id("session_id", &event.session_id)?,
        request_id: optional_id("request_id", &event.request_id)?,
        reservation_id: optional_id("reservation_id", &event.reservation_id)?,
        provider,
        model,
        occurred_at,
        tokens,
        usage_source,
        status,
        attributes,
    })
}

/// Tenant ids: 1-64 characters of `[A-Za-z0-9._-]` (matches the `tenants` table check).
pub fn is_valid_tenant_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn bounded_id(field: &str, value: &str, max: usize) -> Result<String, FieldError> {
    if value.len() > max {
        return Err(FieldError::new(field, format!("longer than {max} bytes")));
    }
    if value.chars().any(char::is_control) {
        return Err(FieldError::new(field, "contains control characters"));
    }
    Ok(value.to_owned())
}

/// Truncates to whole microseconds (storage precision) and checks the instant is neither
/// beyond retention nor too far in the future.
fn occurred_at(
    timestamp: Option<&prost_types::Timestamp>,
    limits: &Limits,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, FieldError> {
    let field = "occurred_at";
    let ts = timestamp.ok_or_else(|| FieldError::new(field, "is required"))?;
    let at = crate::proto::instant(ts, field)?;
    if at > now + limits.max_future_skew {
        return Err(FieldError::new(
            field,
            format!(
                "more than {} in the future",
                humanize(limits.max_future_skew)
            ),
        ));
    }
    if at < now - limits.retention {
        return Err(FieldError::new(
            field,
            format!(
                "older than the retention period ({})",
                humanize(limits.retention)
            ),
        ));
    }
    Ok(at)
}

fn humanize(duration: chrono::Duration) -> String {
    duration
        .to_std()
        .map(|d| humantime::format_duration(d).to_string())
        .unwrap_or_else(|_| duration.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use prost::Message;

    fn limits() -> Limits {
        Limits {
            max_id_bytes: 128,
            max_attributes: 32,
            max_attribute_key_bytes: 64,
            max_attribute_value_bytes: 256,
            max_future_skew: chrono::Duration::hours(1),
            retention: chrono::Duration::days(395),
        }
    }

    fn any_count() -> impl Strategy<Value = i64> {
        prop_oneof![
            Just(0),
            Just(-1),
            Just(i64::MAX),
            Just(i64::MIN),
            any::<i64>(),
            0i64..10_000
        ]
    }

    /// Provider usage objects with any counts, including hostile ones.
    /// Boxed arms: unboxed, the nested strategy types overflow a test thread's stack in debug.
    fn any_usage() -> BoxedStrategy<pb::usage_event::Usage> {
        use pb::usage_event::Usage;
        let tokens = prop::array::uniform10(any_count())
            .prop_map(|c| {
                Usage::Tokens(pb::TokenCounts {
                    input: c[0],
                    cache_read: c[1],
                    cache_write_5m: c[2],
                    cache_write_1h: c[3],
                    output: c[4],
                    reasoning: c[5],
                    input_audio: c[6],
                    output_audio: c[7],
                    input_image: c[8],
                    output_image: c[9],
                })
            })
            .boxed();
        let openai = prop::array::uniform8(any_count())
            .prop_map(|c| {
                Usage::OpenaiChat(pb::OpenAiChatUsage {
                    prompt_tokens: c[0],
                    completion_tokens: c[1],
                    total_tokens: Some(c[2]),
                    prompt_tokens_details: Some(pb::OpenAiPromptTokensDetails {
                        cached_tokens: c[3],
                        audio_tokens: c[4],
                        ..Default::default()
                    }),
                    completion_tokens_details: Some(pb::OpenAiCompletionTokensDetails {
                        reasoning_tokens: c[5],
                        audio_tokens: c[6],
                        image_tokens: c[7],
                        ..Default::default()
                    }),
                })
            })
            .boxed();
        let anthropic = prop::array::uniform6(any_count())
            .prop_map(|c| {
                Usage::Anthropic(pb::AnthropicUsage {
                    input_tokens: c[0],
                    output_tokens: c[1],
                    cache_creation_input_tokens: c[2],
                    cache_read_input_tokens: c[3],
                    cache_creation: Some(pb::AnthropicCacheCreation {
                        ephemeral_5m_input_tokens: c[4],
                        ephemeral_1h_input_tokens: c[5],
                    }),
                    ..Default::default()
                })
            })
            .boxed();
        let gemini = (
            prop::array::uniform6(any_count()),
            "[A-Z]{0,6}",
            any_count(),
        )
            .prop_map(|(c, modality, n)| {
                Usage::Gemini(pb::GeminiUsageMetadata {
                    prompt_token_count: c[0],
                    cached_content_token_count: c[1],
                    candidates_token_count: c[2],
                    tool_use_prompt_token_count: c[3],
                    thoughts_token_count: c[4],
                    total_token_count: Some(c[5]),
                    prompt_tokens_details: vec![pb::GeminiModalityTokenCount {
                        modality,
                        token_count: n,
                    }],
                    ..Default::default()
                })
            })
            .boxed();
        prop_oneof![tokens, openai, anthropic, gemini].boxed()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// Arbitrary bytes either fail to decode or validate to a clear outcome — never a panic.
        #[test]
        fn arbitrary_bytes_never_panic_the_decoder_or_the_validator(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(event) = pb::UsageEvent::decode(bytes.as_slice()) {
                let _ = validate(&event, &limits(), Utc::now());
            }
        }

        /// Any provider object with any counts (negative, i64 extremes) is either normalized to
        /// buckets that are all non-negative, or rejected naming a field under its oneof.
        #[test]
        fn any_usage_object_is_normalized_or_rejected_with_a_field(usage in any_usage(), seconds in any::<i64>(), nanos in any::<i32>()) {
            let event = pb::UsageEvent {
                event_id: "e".into(),
                source: "s".into(),
                tenant_id: "t".into(),
                agent_id: "a".into(),
                provider: "openai".into(),
                model: "m".into(),
                occurred_at: Some(prost_types::Timestamp { seconds, nanos }),
                usage: Some(usage),
                ..Default::default()
            };
            let mut recent = event.clone();
            recent.occurred_at = Some(prost_types::Timestamp { seconds: Utc::now().timestamp(), nanos: 0 });

            match validate(&recent, &limits(), Utc::now()) {
                Ok(valid) => prop_assert!(valid.tokens.buckets().iter().all(|n| *n >= 0)),
                Err(error) => prop_assert!(!error.field.is_empty() && !error.reason.is_empty()),
            }
            if let Err(error) = validate(&event, &limits(), Utc::now()) {
                prop_assert!(!error.field.is_empty());
            }
        }
    }
}

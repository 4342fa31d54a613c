//! Wire event → validated domain event. Every rule names the field it is about, so a producer
//! can fix its payload from the error alone.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::config::IngestSettings;
use crate::domain::FieldError;
use crate::domain::normalize::normalize;
use crate::domain::pricing::{MAX_TOKENS_PER_CLASS, parse_plain_decimal};
use crate::domain::transaction::{Lifecycle, TransactionEvent};
use crate::domain::usage::{CallStatus, EventIdentity, UsageEvent, UsageSource};
use crate::proto::v1 as pb;
use rust_decimal::Decimal;

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
    let id = |field: &str, value: &str| required_id(field, value, limits);
    let optional_id = |field: &str, value: &Option<String>| optional_id(field, value, limits);

    let identity = identity(&event.event_id, &event.source, &event.tenant_id, limits)?;
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
    let first_release_tokens = crate::domain::normalize::first_release(usage, &tokens);
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

    let attributes = attributes(&event.attributes, limits)?;

    Ok(UsageEvent {
        identity,
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
        first_release_tokens,
        usage_source,
        status,
        attributes,
    })
}

/// Validates a service-transaction lifecycle event as of `now`, with the same identity, id,
/// time and attribute rules as usage.
pub fn validate_transaction(
    event: &pb::TransactionEvent,
    limits: &Limits,
    now: DateTime<Utc>,
) -> Result<TransactionEvent, FieldError> {
    use pb::transaction_event::Kind;

    let identity = identity(&event.event_id, &event.source, &event.tenant_id, limits)?;
    let transaction_id = required_id("transaction_id", &event.transaction_id, limits)?;
    let agent_id = optional_id("agent_id", &Some(event.agent_id.clone()), limits)?;
    let service = optional_id("service", &Some(event.service.clone()), limits)?;
    let occurred_at = occurred_at(event.occurred_at.as_ref(), limits, now)?;
    let reason = |field: &str, text: &str| -> Result<String, FieldError> {
        if text.len() > limits.max_attribute_value_bytes {
            return Err(FieldError::new(
                field,
                format!("longer than {} bytes", limits.max_attribute_value_bytes),
            ));
        }
        storable_text(field, text)?;
        Ok(text.to_owned())
    };
    let lifecycle = match event.kind.as_ref() {
        None => {
            return Err(FieldError::new(
                "kind",
                "is required: one of started, completed, failed, refunded, reversed",
            ));
        }
        Some(Kind::Started(_)) => {
            if agent_id.is_none() {
                return Err(FieldError::new("agent_id", "is required on started"));
            }
            Lifecycle::Started
        }
        Some(Kind::Completed(completed)) => {
            let (revenue, currency) =
                money(completed.revenue.as_ref(), "completed.revenue", false)?;
            Lifecycle::Completed { revenue, currency }
        }
        Some(Kind::Failed(failed)) => Lifecycle::Failed {
            reason: reason("failed.reason", &failed.reason)?,
        },
        Some(Kind::Refunded(refunded)) => {
            let (amount, currency) = money(refunded.amount.as_ref(), "refunded.amount", true)?;
            Lifecycle::Refunded {
                amount,
                currency,
                reason: reason("refunded.reason", &refunded.reason)?,
            }
        }
        Some(Kind::Reversed(reversed)) => Lifecycle::Reversed {
            reason: reason("reversed.reason", &reversed.reason)?,
        },
    };
    Ok(TransactionEvent {
        identity,
        transaction_id,
        agent_id,
        service,
        occurred_at,
        lifecycle,
        attributes: attributes(&event.attributes, limits)?,
    })
}

/// Largest amount a lifecycle event may carry, and its finest fraction: a bound so sums over
/// millions of events stay far inside the exact decimal range.
const MAX_AMOUNT: Decimal = rust_decimal::dec!(1_000_000_000_000);
const MAX_AMOUNT_SCALE: u32 = 6;

/// A required, non-negative (or positive) amount with its ISO 4217 currency.
fn money(
    money: Option<&pb::Money>,
    field: &str,
    positive: bool,
) -> Result<(Decimal, String), FieldError> {
    let money = money.ok_or_else(|| FieldError::new(field, "is required"))?;
    let amount_field = format!("{field}.amount");
    let amount = parse_plain_decimal(&money.amount, &amount_field)?;
    if amount.is_sign_negative() && !amount.is_zero() {
        return Err(FieldError::new(amount_field, "must not be negative"));
    }
    if positive && amount.is_zero() {
        return Err(FieldError::new(amount_field, "must be positive"));
    }
    if amount.scale() > MAX_AMOUNT_SCALE || amount >= MAX_AMOUNT {
        return Err(FieldError::new(
            amount_field,
            format!("must be below {MAX_AMOUNT} with at most {MAX_AMOUNT_SCALE} decimals"),
        ));
    }
    let currency = &money.currency;
    if !crate::domain::tenant::is_currency_code(currency) {
        return Err(FieldError::new(
            format!("{field}.currency"),
            "must be an ISO 4217 currency with minor units, such as USD",
        ));
    }
    Ok((amount, currency.clone()))
}

fn identity(
    event_id: &str,
    source: &str,
    tenant_id: &str,
    limits: &Limits,
) -> Result<EventIdentity, FieldError> {
    let event_id = required_id("event_id", event_id, limits)?;
    let source = required_id("source", source, limits)?;
    let tenant_id = required_id("tenant_id", tenant_id, limits)?;
    if !is_valid_tenant_id(&tenant_id) {
        return Err(FieldError::new(
            "tenant_id",
            "must be 1-64 characters of [A-Za-z0-9._-]",
        ));
    }
    Ok(EventIdentity {
        tenant_id,
        source,
        event_id,
    })
}

fn required_id(field: &str, value: &str, limits: &Limits) -> Result<String, FieldError> {
    if value.is_empty() {
        return Err(FieldError::new(field, "is required"));
    }
    bounded_id(field, value, limits.max_id_bytes)
}

/// Absent and empty are the same: no value.
fn optional_id(
    field: &str,
    value: &Option<String>,
    limits: &Limits,
) -> Result<Option<String>, FieldError> {
    match value.as_deref() {
        None | Some("") => Ok(None),
        Some(v) => bounded_id(field, v, limits.max_id_bytes).map(Some),
    }
}

/// Attribute count, key and value lengths within the limits.
fn attributes(
    given: &std::collections::HashMap<String, String>,
    limits: &Limits,
) -> Result<BTreeMap<String, String>, FieldError> {
    if given.len() > limits.max_attributes {
        return Err(FieldError::new(
            "attributes",
            format!("more than {} attributes", limits.max_attributes),
        ));
    }
    let mut attributes = BTreeMap::new();
    for (key, value) in given {
        if key.is_empty() || key.len() > limits.max_attribute_key_bytes {
            return Err(FieldError::new(
                "attributes",
                format!(
                    "key {key:?} must be 1-{} bytes",
                    limits.max_attribute_key_bytes
                ),
            ));
        }
        if key.chars().any(char::is_control) {
            return Err(FieldError::new(
                "attributes",
                format!("key {key:?} contains control characters"),
            ));
        }
        if value.len() > limits.max_attribute_value_bytes {
            return Err(FieldError::new(
                format!("attributes.{key}"),
                format!("longer than {} bytes", limits.max_attribute_value_bytes),
            ));
        }
        storable_text(&format!("attributes.{key}"), value)?;
        attributes.insert(key.clone(), value.clone());
    }

    Ok(attributes)
}

/// Free text (attribute values, reasons) may hold newlines and tabs, but not NUL: Postgres
/// stores neither `\0` in `text` nor `\u0000` in `jsonb`, and one such value would fail the
/// whole batch it is written with, again on every retry.
fn storable_text(field: &str, text: &str) -> Result<(), FieldError> {
    if text.contains('\0') {
        return Err(FieldError::new(field, "contains a NUL character"));
    }
    Ok(())
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

    fn lifecycle_event(kind: pb::transaction_event::Kind) -> pb::TransactionEvent {
        pb::TransactionEvent {
            event_id: "e1".into(),
            source: "shop".into(),
            tenant_id: "acme".into(),
            transaction_id: "order-1".into(),
            agent_id: "agent-a".into(),
            service: String::new(),
            occurred_at: Some(prost_types::Timestamp {
                seconds: 1_780_000_000,
                nanos: 1_500,
            }),
            kind: Some(kind),
            attributes: Default::default(),
        }
    }

    fn usd(amount: &str) -> Option<pb::Money> {
        Some(pb::Money {
            amount: amount.into(),
            currency: "USD".into(),
        })
    }

    fn transaction_error(event: &pb::TransactionEvent) -> FieldError {
        let now = DateTime::from_timestamp(1_780_000_100, 0).expect("now");
        validate_transaction(event, &limits(), now).expect_err("invalid")
    }

    #[test]
    fn lifecycle_events_validate_to_exact_amounts_and_absent_empty_ids() {
        use pb::transaction_event::Kind;
        let now = DateTime::from_timestamp(1_780_000_100, 0).expect("now");
        let event = lifecycle_event(Kind::Completed(pb::TransactionCompleted {
            revenue: usd("19.9900"),
        }));
        let valid = validate_transaction(&event, &limits(), now).expect("valid");
        assert_eq!(
            valid.lifecycle,
            Lifecycle::Completed {
                revenue: rust_decimal::dec!(19.99),
                currency: "USD".into()
            }
        );
        assert_eq!(valid.service, None);
        assert_eq!(valid.occurred_at.timestamp_subsec_micros(), 1);
    }

    #[test]
    fn lifecycle_errors_name_their_field() {
        use pb::transaction_event::Kind;
        let cases: Vec<(pb::TransactionEvent, &str)> = vec![
            (
                pb::TransactionEvent {
                    kind: None,
                    ..lifecycle_event(Kind::Started(pb::TransactionStarted {}))
                },
                "kind",
            ),
            (
                pb::TransactionEvent {
                    agent_id: String::new(),
                    ..lifecycle_event(Kind::Started(pb::TransactionStarted {}))
                },
                "agent_id",
            ),
            (
                pb::TransactionEvent {
                    transaction_id: String::new(),
                    ..lifecycle_event(Kind::Started(pb::TransactionStarted {}))
                },
                "transaction_id",
            ),
            (
                lifecycle_event(Kind::Completed(pb::TransactionCompleted { revenue: None })),
                "completed.revenue",
            ),
            (
                lifecycle_event(Kind::Completed(pb::TransactionCompleted {
                    revenue: usd("-1"),
                })),
                "completed.revenue.amount",
            ),
            (
                lifecycle_event(Kind::Completed(pb::TransactionCompleted {
                    revenue: usd("1e3"),
                })),
                "completed.revenue.amount",
            ),
            (
                lifecycle_event(Kind::Completed(pb::TransactionCompleted {
                    revenue: usd("0.0000001"),
                })),
                "completed.revenue.amount",
            ),
            (
                lifecycle_event(Kind::Completed(pb::TransactionCompleted {
                    revenue: Some(pb::Money {
                        amount: "1".into(),
                        currency: "usd".into(),
                    }),
                })),
                "completed.revenue.currency",
            ),
            (
                lifecycle_event(Kind::Completed(pb::TransactionCompleted {
                    revenue: Some(pb::Money {
                        amount: "1".into(),
                        currency: "XAU".into(),
                    }),
                })),
                "completed.revenue.currency",
            ),
            (
                lifecycle_event(Kind::Refunded(pb::TransactionRefunded {
                    amount: usd("0"),
                    reason: String::new(),
                })),
                "refunded.amount.amount",
            ),
            (
                lifecycle_event(Kind::Failed(pb::TransactionFailed {
                    reason: "timeout\0".into(),
                })),
                "failed.reason",
            ),
            (
                pb::TransactionEvent {
                    attributes: [("note".to_owned(), "\0".to_owned())].into(),
                    ..lifecycle_event(Kind::Started(pb::TransactionStarted {}))
                },
                "attributes.note",
            ),
            (
                pb::TransactionEvent {
                    attributes: [("no\nte".to_owned(), "x".to_owned())].into(),
                    ..lifecycle_event(Kind::Started(pb::TransactionStarted {}))
                },
                "attributes",
            ),
        ];
        for (event, field) in cases {
            assert_eq!(transaction_error(&event).field, field, "{event:?}");
        }
    }
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
        fn any_usage_object_is_normalized_or_rejected_with_a_field(usage in crate::ingest::codec::tests::any_usage(), seconds in any::<i64>(), nanos in any::<i32>()) {
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

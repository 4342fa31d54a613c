//! The JSON form of a `UsageEvent` that CloudEvents carry (README "Ingesting from Kafka"): the
//! proto3 JSON mapping, written the way producers write it. Top-level fields are lowerCamelCase
//! and unset or default fields are left out; provider usage objects keep their providers' own
//! field names (snake_case for OpenAI and Anthropic, lowerCamelCase for Gemini) and zeros, as
//! pasted from an API response. Counts are JSON integers.
//!
//! Written here rather than shared with the decoder on purpose: an encoder of its own is an
//! independent reading of the mapping, so a disagreement shows up as a wrong total downstream.

use serde_json::{Map, Value, json};

use crate::proto::v1::{
    AnthropicCacheCreation, AnthropicUsage, DashScopeUsage, GeminiModalityTokenCount,
    GeminiUsageMetadata, OpenAiChatUsage, OpenAiResponsesUsage, TokenCounts, UsageEvent,
    UsageSource, UsageStatus, usage_event::Usage,
};

/// An RFC 3339 UTC instant with as many fractional digits as it needs (`None` if the
/// timestamp is outside chrono's range, which the generator never produces).
pub(super) fn rfc3339(at: &prost_types::Timestamp) -> Option<String> {
    let nanos = u32::try_from(at.nanos).ok()?;
    chrono::DateTime::from_timestamp(at.seconds, nanos)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
}

/// `event` as a JSON object. Without `identity`, the fields a CloudEvent's attributes carry
/// (`eventId`, `source`, `tenantId`, `occurredAt`) are left to the attributes.
pub(super) fn usage_event(event: &UsageEvent, identity: bool) -> Map<String, Value> {
    let mut m = Map::new();
    let strings = [
        ("eventId", Some(&event.event_id).filter(|_| identity)),
        ("source", Some(&event.source).filter(|_| identity)),
        ("tenantId", Some(&event.tenant_id).filter(|_| identity)),
        ("agentId", Some(&event.agent_id)),
        ("transactionId", event.transaction_id.as_ref()),
        ("service", event.service.as_ref()),
        ("sessionId", event.session_id.as_ref()),
        ("requestId", event.request_id.as_ref()),
        ("reservationId", event.reservation_id.as_ref()),
        ("provider", Some(&event.provider)),
        // Left out when empty, as proto3 JSON leaves out defaults (an invalid event's model).
        ("model", Some(&event.model).filter(|m| !m.is_empty())),
    ];
    for (name, value) in strings {
        if let Some(value) = value {
            m.insert(name.to_owned(), value.as_str().into());
        }
    }
    if identity && let Some(at) = event.occurred_at.as_ref().and_then(rfc3339) {
        m.insert("occurredAt".to_owned(), at.into());
    }
    if let Some(usage) = &event.usage {
        let (name, value) = match usage {
            Usage::Tokens(t) => ("tokens", tokens(t)),
            Usage::OpenaiChat(u) => ("openaiChat", openai_chat(u)),
            Usage::OpenaiResponses(u) => ("openaiResponses", openai_responses(u)),
            Usage::Anthropic(u) => ("anthropic", anthropic(u)),
            Usage::Gemini(u) => ("gemini", gemini(u)),
            Usage::Dashscope(u) => ("dashscope", dashscope(u)),
        };
        m.insert(name.to_owned(), value);
    }
    if let Ok(source) = UsageSource::try_from(event.usage_source)
        && source != UsageSource::Unspecified
    {
        m.insert("usageSource".to_owned(), source.as_str_name().into());
    }
    if let Ok(status) = UsageStatus::try_from(event.status)
        && status != UsageStatus::Unspecified
    {
        m.insert("status".to_owned(), status.as_str_name().into());
    }
    if !event.attributes.is_empty() {
        let attributes: Map<String, Value> = event
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().into()))
            .collect();
        m.insert("attributes".to_owned(), attributes.into());
    }
    m
}

/// Our own buckets: lowerCamelCase, zero buckets left out (proto3 JSON omits defaults).
fn tokens(t: &TokenCounts) -> Value {
    let buckets = [
        ("input", t.input),
        ("cacheRead", t.cache_read),
        ("cacheWrite5m", t.cache_write_5m),
        ("cacheWrite1h", t.cache_write_1h),
        ("output", t.output),
        ("reasoning", t.reasoning),
        ("inputAudio", t.input_audio),
        ("outputAudio", t.output_audio),
        ("inputImage", t.input_image),
        ("outputImage", t.output_image),
        ("cacheWrite30m", t.cache_write_30m),
        ("cacheWrite12h", t.cache_write_12h),
    ];
    buckets
        .into_iter()
        .filter(|(_, n)| *n != 0)
        .map(|(name, n)| (name.to_owned(), Value::from(n)))
        .collect::<Map<_, _>>()
        .into()
}

/// Adds `"name": value` when the value is present.
fn put(object: &mut Value, name: &str, value: Option<Value>) {
    if let (Some(value), Some(object)) = (value, object.as_object_mut()) {
        object.insert(name.to_owned(), value);
    }
}

/// An object of counts, named as the fields are: OpenAI's and Anthropic's JSON names are the
/// proto's snake_case field names.
macro_rules! counts {
    ($message:expr, $($field:ident),+ $(,)?) => {{
        let m = &$message;
        let pairs = [$((stringify!($field), m.$field)),+];
        pairs
            .into_iter()
            .map(|(name, n)| (name.to_owned(), Value::from(n)))
            .collect::<Map<_, _>>()
            .into()
    }};
}

fn openai_chat(u: &OpenAiChatUsage) -> Value {
    let mut v: Value = counts!(u, prompt_tokens, completion_tokens);
    put(&mut v, "total_tokens", u.total_tokens.map(Value::from));
    let prompt = u.prompt_tokens_details.as_ref().map(|d| {
        let mut details: Value = counts!(
            d,
            cached_tokens,
            audio_tokens,
            image_tokens,
            text_tokens,
            cache_write_tokens,
            cache_creation_input_tokens,
        );
        put(
            &mut details,
            "cache_creation",
            d.cache_creation.map(cache_creation),
        );
        put(
            &mut details,
            "cache_type",
            d.cache_type.as_deref().map(Value::from),
        );
        details
    });
    put(&mut v, "prompt_tokens_details", prompt);
    let completion = u.completion_tokens_details.map(|d| {
        counts!(
            d,
            reasoning_tokens,
            audio_tokens,
            accepted_prediction_tokens,
            rejected_prediction_tokens,
            image_tokens,
            text_tokens,
        )
    });
    put(&mut v, "completion_tokens_details", completion);
    v
}

fn openai_responses(u: &OpenAiResponsesUsage) -> Value {
    let mut v: Value = counts!(u, input_tokens, output_tokens);
    put(&mut v, "total_tokens", u.total_tokens.map(Value::from));
    let input = u.input_tokens_details.map(|d| {
        let mut details: Value = counts!(
            d,
            cached_tokens,
            audio_tokens,
            image_tokens,
            text_tokens,
            cache_write_tokens,
        );
        let by_ttl = d
            .cache_write_tokens_details
            .map(|t| counts!(t, ttl_30m_tokens, ttl_12h_tokens));
        put(&mut details, "cache_write_tokens_details", by_ttl);
        details
    });
    put(&mut v, "input_tokens_details", input);
    let output = u
        .output_tokens_details
        .map(|d| counts!(d, reasoning_tokens, audio_tokens, image_tokens, text_tokens));
    put(&mut v, "output_tokens_details", output);
    v
}

fn anthropic(u: &AnthropicUsage) -> Value {
    let mut v: Value = counts!(
        u,
        input_tokens,
        output_tokens,
        cache_creation_input_tokens,
        cache_read_input_tokens,
    );
    put(
        &mut v,
        "cache_creation",
        u.cache_creation.map(cache_creation),
    );
    let thinking = u.output_tokens_details.map(|d| counts!(d, thinking_tokens));
    put(&mut v, "output_tokens_details", thinking);
    let tools = u
        .server_tool_use
        .map(|t| counts!(t, web_search_requests, web_fetch_requests));
    put(&mut v, "server_tool_use", tools);
    put(
        &mut v,
        "service_tier",
        u.service_tier.as_deref().map(Value::from),
    );
    v
}

fn cache_creation(c: AnthropicCacheCreation) -> Value {
    counts!(c, ephemeral_5m_input_tokens, ephemeral_1h_input_tokens)
}

fn dashscope(u: &DashScopeUsage) -> Value {
    let mut v: Value = counts!(u, input_tokens, output_tokens, cached_tokens, image_tokens);
    put(&mut v, "total_tokens", u.total_tokens.map(Value::from));
    let prompt = u.prompt_tokens_details.as_ref().map(|d| {
        let mut details: Value = counts!(d, cached_tokens, cache_creation_input_tokens);
        put(
            &mut details,
            "cache_creation",
            d.cache_creation.map(cache_creation),
        );
        put(
            &mut details,
            "cache_type",
            d.cache_type.as_deref().map(Value::from),
        );
        details
    });
    put(&mut v, "prompt_tokens_details", prompt);
    let input = u
        .input_tokens_details
        .map(|d| counts!(d, text_tokens, image_tokens));
    put(&mut v, "input_tokens_details", input);
    let output = u
        .output_tokens_details
        .map(|d| counts!(d, reasoning_tokens, text_tokens));
    put(&mut v, "output_tokens_details", output);
    v
}

/// Gemini leaves zero counts and empty lists out of `usageMetadata`.
fn gemini(u: &GeminiUsageMetadata) -> Value {
    let mut v = json!({});
    for (name, n) in [
        ("promptTokenCount", u.prompt_token_count),
        ("cachedContentTokenCount", u.cached_content_token_count),
        ("candidatesTokenCount", u.candidates_token_count),
        ("toolUsePromptTokenCount", u.tool_use_prompt_token_count),
        ("thoughtsTokenCount", u.thoughts_token_count),
    ] {
        put(&mut v, name, (n != 0).then(|| Value::from(n)));
    }
    put(
        &mut v,
        "totalTokenCount",
        u.total_token_count.map(Value::from),
    );
    for (name, list) in [
        ("promptTokensDetails", &u.prompt_tokens_details),
        ("cacheTokensDetails", &u.cache_tokens_details),
        ("candidatesTokensDetails", &u.candidates_tokens_details),
        (
            "toolUsePromptTokensDetails",
            &u.tool_use_prompt_tokens_details,
        ),
    ] {
        put(&mut v, name, (!list.is_empty()).then(|| modalities(list)));
    }
    v
}

fn modalities(list: &[GeminiModalityTokenCount]) -> Value {
    list.iter()
        .map(|m| json!({"modality": m.modality, "tokenCount": m.token_count}))
        .collect::<Vec<_>>()
        .into()
}

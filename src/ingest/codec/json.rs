//! The JSON form of `UsageEvent`, as CloudEvents carry it in `data`: the proto3 JSON mapping,
//! decoded by a hand-written serde mirror of the proto messages.
//!
//! Mapping, as in the proto3 JSON spec: field names in lowerCamelCase, the original snake_case
//! names accepted too; `null` means unset; enums as their value names
//! (`"USAGE_SOURCE_ESTIMATED"`) or numbers; timestamps as RFC 3339 strings; int64 as JSON numbers
//! or decimal strings. Deliberate choices:
//! - Integers never pass through `f64`: a number with a fraction or an exponent, or one beyond
//!   int64, is an error naming its field, never a rounded count.
//! - Unknown fields are an error at the top level of the event (a typo such as `eventID` must not
//!   silently drop data) and in `tokens`, which is ours; they are ignored inside the raw provider
//!   usage objects, whose JSON is the provider's own and grows new fields.
//! - Presence is kept: `"cache_creation": {}` is a present, empty message, as over gRPC, because
//!   the normalizer treats a present Anthropic `cache_creation` differently from an absent one.

use std::collections::HashMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use crate::proto::v1::{self as pb, usage_event::Usage};

/// Decodes the JSON form of a `UsageEvent`. `path` prefixes the field paths of errors (`data`
/// inside a CloudEvents envelope, empty for a bare document).
pub(super) fn usage_event(json: &str, path: &str) -> Result<pb::UsageEvent, String> {
    let at = |field: &str| match (path.is_empty(), field.is_empty() || field == ".") {
        (true, true) => String::new(),
        (true, false) => format!("{field}: "),
        (false, true) => format!("{path}: "),
        (false, false) => format!("{path}.{field}: "),
    };
    let mut deserializer = serde_json::Deserializer::from_str(json);
    let event: Event = serde_path_to_error::deserialize(&mut deserializer)
        .map_err(|error| format!("{}{}", at(&error.path().to_string()), error.inner()))?;
    deserializer
        .end()
        .map_err(|error| format!("{}trailing characters after the event: {error}", at("")))?;
    event.into_proto(&at(""))
}

/// An RFC 3339 instant as a protobuf timestamp (offsets allowed, any sub-second precision).
pub(super) fn timestamp(text: &str) -> Result<prost_types::Timestamp, String> {
    let instant = chrono::DateTime::parse_from_rfc3339(text)
        .map_err(|error| format!("{text:?} is not an RFC 3339 timestamp ({error})"))?;
    let nanos = instant.timestamp_subsec_nanos();
    // chrono keeps a leap second as nanos ≥ 1e9, which a protobuf Timestamp cannot hold.
    let nanos = i32::try_from(nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .ok_or_else(|| format!("{text:?} is a leap second, which timestamps cannot hold"))?;
    Ok(prost_types::Timestamp {
        seconds: instant.timestamp(),
        nanos,
    })
}

/// A protobuf timestamp as RFC 3339 with nanoseconds, for messages (raw fields if out of
/// chrono's range).
pub(super) fn rfc3339_of(ts: &prost_types::Timestamp) -> String {
    u32::try_from(ts.nanos)
        .ok()
        .and_then(|nanos| chrono::DateTime::from_timestamp(ts.seconds, nanos))
        .map_or_else(
            || format!("{{seconds: {}, nanos: {}}}", ts.seconds, ts.nanos),
            |at| at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        )
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a JSON object: the usage event"
)]
struct Event {
    #[serde(default, alias = "event_id")]
    event_id: Option<String>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default, alias = "tenant_id")]
    tenant_id: Option<String>,
    #[serde(default, alias = "agent_id")]
    agent_id: Option<String>,
    #[serde(default, alias = "transaction_id")]
    transaction_id: Option<String>,
    #[serde(default)]
    service: Option<String>,
    #[serde(default, alias = "session_id")]
    session_id: Option<String>,
    #[serde(default, alias = "request_id")]
    request_id: Option<String>,
    #[serde(default, alias = "reservation_id")]
    reservation_id: Option<String>,
    #[serde(default)]
    provider: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default, alias = "occurred_at", deserialize_with = "rfc3339")]
    occurred_at: Option<prost_types::Timestamp>,
    #[serde(default)]
    tokens: Option<Tokens>,
    #[serde(default, alias = "openai_chat")]
    openai_chat: Option<OpenAiChat>,
    #[serde(default, alias = "openai_responses")]
    openai_responses: Option<OpenAiResponses>,
    #[serde(default)]
    anthropic: Option<Anthropic>,
    #[serde(default)]
    gemini: Option<Gemini>,
    #[serde(default)]
    dashscope: Option<DashScope>,
    #[serde(default, alias = "usage_source", deserialize_with = "usage_source")]
    usage_source: Option<i32>,
    #[serde(default, deserialize_with = "usage_status")]
    status: Option<i32>,
    #[serde(default, deserialize_with = "attributes")]
    attributes: Option<HashMap<String, String>>,
}

impl Event {
    /// The proto message; `at` prefixes errors (`data: `).
    fn into_proto(self, at: &str) -> Result<pb::UsageEvent, String> {
        let mut usages: Vec<(&str, Usage)> = Vec::new();
        if let Some(u) = self.tokens {
            usages.push(("tokens", Usage::Tokens(u.into())));
        }
        if let Some(u) = self.openai_chat {
            usages.push(("openaiChat", Usage::OpenaiChat(u.into())));
        }
        if let Some(u) = self.openai_responses {
            usages.push(("openaiResponses", Usage::OpenaiResponses(u.into())));
        }
        if let Some(u) = self.anthropic {
            usages.push(("anthropic", Usage::Anthropic(u.into())));
        }
        if let Some(u) = self.gemini {
            usages.push(("gemini", Usage::Gemini(u.into())));
        }
        if let Some(u) = self.dashscope {
            usages.push(("dashscope", Usage::Dashscope(u.into())));
        }
        if usages.len() > 1 {
            let names: Vec<&str> = usages.iter().map(|(name, _)| *name).collect();
            return Err(format!(
                "{at}only one usage field may be set (tokens, openaiChat, openaiResponses, \
                 anthropic, gemini or dashscope), got {}",
                names.join(" and ")
            ));
        }
        Ok(pb::UsageEvent {
            event_id: self.event_id.unwrap_or_default(),
            source: self.source.unwrap_or_default(),
            tenant_id: self.tenant_id.unwrap_or_default(),
            agent_id: self.agent_id.unwrap_or_default(),
            transaction_id: self.transaction_id,
            service: self.service,
            session_id: self.session_id,
            request_id: self.request_id,
            reservation_id: self.reservation_id,
            provider: self.provider.unwrap_or_default(),
            model: self.model.unwrap_or_default(),
            occurred_at: self.occurred_at,
            usage: usages.pop().map(|(_, usage)| usage),
            usage_source: self.usage_source.unwrap_or_default(),
            status: self.status.unwrap_or_default(),
            attributes: self.attributes.unwrap_or_default(),
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Tokens {
    #[serde(default, deserialize_with = "int64")]
    input: Option<i64>,
    #[serde(default, alias = "cache_read", deserialize_with = "int64")]
    cache_read: Option<i64>,
    #[serde(default, alias = "cache_write_5m", deserialize_with = "int64")]
    cache_write_5m: Option<i64>,
    #[serde(default, alias = "cache_write_1h", deserialize_with = "int64")]
    cache_write_1h: Option<i64>,
    #[serde(default, deserialize_with = "int64")]
    output: Option<i64>,
    #[serde(default, deserialize_with = "int64")]
    reasoning: Option<i64>,
    #[serde(default, alias = "input_audio", deserialize_with = "int64")]
    input_audio: Option<i64>,
    #[serde(default, alias = "output_audio", deserialize_with = "int64")]
    output_audio: Option<i64>,
    #[serde(default, alias = "input_image", deserialize_with = "int64")]
    input_image: Option<i64>,
    #[serde(default, alias = "output_image", deserialize_with = "int64")]
    output_image: Option<i64>,
    #[serde(default, alias = "cache_write_30m", deserialize_with = "int64")]
    cache_write_30m: Option<i64>,
    #[serde(default, alias = "cache_write_12h", deserialize_with = "int64")]
    cache_write_12h: Option<i64>,
}

impl From<Tokens> for pb::TokenCounts {
    fn from(t: Tokens) -> Self {
        Self {
            input: t.input.unwrap_or_default(),
            cache_read: t.cache_read.unwrap_or_default(),
            cache_write_5m: t.cache_write_5m.unwrap_or_default(),
            cache_write_1h: t.cache_write_1h.unwrap_or_default(),
            output: t.output.unwrap_or_default(),
            reasoning: t.reasoning.unwrap_or_default(),
            input_audio: t.input_audio.unwrap_or_default(),
            output_audio: t.output_audio.unwrap_or_default(),
            input_image: t.input_image.unwrap_or_default(),
            output_image: t.output_image.unwrap_or_default(),
            cache_write_30m: t.cache_write_30m.unwrap_or_default(),
            cache_write_12h: t.cache_write_12h.unwrap_or_default(),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OpenAiChat {
    #[serde(default, alias = "prompt_tokens", deserialize_with = "int64")]
    prompt_tokens: Option<i64>,
    #[serde(default, alias = "completion_tokens", deserialize_with = "int64")]
    completion_tokens: Option<i64>,
    #[serde(default, alias = "total_tokens", deserialize_with = "int64")]
    total_tokens: Option<i64>,
    #[serde(default, alias = "prompt_tokens_details")]
    prompt_tokens_details: Option<OpenAiDetails>,
    #[serde(default, alias = "completion_tokens_details")]
    completion_tokens_details: Option<OpenAiDetails>,
}

impl From<OpenAiChat> for pb::OpenAiChatUsage {
    fn from(u: OpenAiChat) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens.unwrap_or_default(),
            completion_tokens: u.completion_tokens.unwrap_or_default(),
            total_tokens: u.total_tokens,
            prompt_tokens_details: u
                .prompt_tokens_details
                .map(|d| pb::OpenAiPromptTokensDetails {
                    cached_tokens: d.cached_tokens.unwrap_or_default(),
                    audio_tokens: d.audio_tokens.unwrap_or_default(),
                    image_tokens: d.image_tokens.unwrap_or_default(),
                    text_tokens: d.text_tokens.unwrap_or_default(),
                    cache_write_tokens: d.cache_write_tokens.unwrap_or_default(),
                    cache_creation_input_tokens: d.cache_creation_input_tokens.unwrap_or_default(),
                    cache_creation: d.cache_creation.map(Into::into),
                    cache_type: d.cache_type,
                }),
            completion_tokens_details: u.completion_tokens_details.map(|d| {
                pb::OpenAiCompletionTokensDetails {
                    reasoning_tokens: d.reasoning_tokens.unwrap_or_default(),
                    audio_tokens: d.audio_tokens.unwrap_or_default(),
                    accepted_prediction_tokens: d.accepted_prediction_tokens.unwrap_or_default(),
                    rejected_prediction_tokens: d.rejected_prediction_tokens.unwrap_or_default(),
                    image_tokens: d.image_tokens.unwrap_or_default(),
                    text_tokens: d.text_tokens.unwrap_or_default(),
                }
            }),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OpenAiResponses {
    #[serde(default, alias = "input_tokens", deserialize_with = "int64")]
    input_tokens: Option<i64>,
    #[serde(default, alias = "input_tokens_details")]
    input_tokens_details: Option<OpenAiDetails>,
    #[serde(default, alias = "output_tokens", deserialize_with = "int64")]
    output_tokens: Option<i64>,
    #[serde(default, alias = "output_tokens_details")]
    output_tokens_details: Option<OpenAiDetails>,
    #[serde(default, alias = "total_tokens", deserialize_with = "int64")]
    total_tokens: Option<i64>,
}

impl From<OpenAiResponses> for pb::OpenAiResponsesUsage {
    fn from(u: OpenAiResponses) -> Self {
        Self {
            input_tokens: u.input_tokens.unwrap_or_default(),
            input_tokens_details: u
                .input_tokens_details
                .map(|d| pb::OpenAiInputTokensDetails {
                    cached_tokens: d.cached_tokens.unwrap_or_default(),
                    audio_tokens: d.audio_tokens.unwrap_or_default(),
                    image_tokens: d.image_tokens.unwrap_or_default(),
                    text_tokens: d.text_tokens.unwrap_or_default(),
                    cache_write_tokens: d.cache_write_tokens.unwrap_or_default(),
                    cache_write_tokens_details: d.cache_write_tokens_details.map(|t| {
                        pb::OpenAiCacheWriteTokensDetails {
                            ttl_30m_tokens: t.ttl_30m_tokens.unwrap_or_default(),
                            ttl_12h_tokens: t.ttl_12h_tokens.unwrap_or_default(),
                        }
                    }),
                }),
            output_tokens: u.output_tokens.unwrap_or_default(),
            output_tokens_details: u
                .output_tokens_details
                .map(|d| pb::OpenAiOutputTokensDetails {
                    reasoning_tokens: d.reasoning_tokens.unwrap_or_default(),
                    audio_tokens: d.audio_tokens.unwrap_or_default(),
                    image_tokens: d.image_tokens.unwrap_or_default(),
                    text_tokens: d.text_tokens.unwrap_or_default(),
                }),
            total_tokens: u.total_tokens,
        }
    }
}

/// Every OpenAI `*_tokens_details` object: the four proto messages are subsets of these counts,
/// and a count a message lacks is one OpenAI does not send there (ignored, as any unknown field
/// of a provider object).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OpenAiDetails {
    #[serde(default, alias = "cached_tokens", deserialize_with = "int64")]
    cached_tokens: Option<i64>,
    #[serde(default, alias = "audio_tokens", deserialize_with = "int64")]
    audio_tokens: Option<i64>,
    #[serde(default, alias = "image_tokens", deserialize_with = "int64")]
    image_tokens: Option<i64>,
    #[serde(default, alias = "text_tokens", deserialize_with = "int64")]
    text_tokens: Option<i64>,
    #[serde(default, alias = "reasoning_tokens", deserialize_with = "int64")]
    reasoning_tokens: Option<i64>,
    #[serde(
        default,
        alias = "accepted_prediction_tokens",
        deserialize_with = "int64"
    )]
    accepted_prediction_tokens: Option<i64>,
    #[serde(
        default,
        alias = "rejected_prediction_tokens",
        deserialize_with = "int64"
    )]
    rejected_prediction_tokens: Option<i64>,
    #[serde(default, alias = "cache_write_tokens", deserialize_with = "int64")]
    cache_write_tokens: Option<i64>,
    #[serde(default, alias = "cache_write_tokens_details")]
    cache_write_tokens_details: Option<OpenAiCacheWriteDetails>,
    #[serde(
        default,
        alias = "cache_creation_input_tokens",
        deserialize_with = "int64"
    )]
    cache_creation_input_tokens: Option<i64>,
    #[serde(default, alias = "cache_creation")]
    cache_creation: Option<AnthropicCacheCreation>,
    #[serde(default, alias = "cache_type")]
    cache_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OpenAiCacheWriteDetails {
    #[serde(default, alias = "ttl_30m_tokens", deserialize_with = "int64")]
    ttl_30m_tokens: Option<i64>,
    #[serde(default, alias = "ttl_12h_tokens", deserialize_with = "int64")]
    ttl_12h_tokens: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Anthropic {
    #[serde(default, alias = "input_tokens", deserialize_with = "int64")]
    input_tokens: Option<i64>,
    #[serde(default, alias = "output_tokens", deserialize_with = "int64")]
    output_tokens: Option<i64>,
    #[serde(
        default,
        alias = "cache_creation_input_tokens",
        deserialize_with = "int64"
    )]
    cache_creation_input_tokens: Option<i64>,
    #[serde(default, alias = "cache_read_input_tokens", deserialize_with = "int64")]
    cache_read_input_tokens: Option<i64>,
    #[serde(default, alias = "cache_creation")]
    cache_creation: Option<AnthropicCacheCreation>,
    #[serde(default, alias = "server_tool_use")]
    server_tool_use: Option<AnthropicServerToolUse>,
    #[serde(default, alias = "service_tier")]
    service_tier: Option<String>,
    #[serde(default, alias = "output_tokens_details")]
    output_tokens_details: Option<AnthropicOutputDetails>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnthropicOutputDetails {
    #[serde(default, alias = "thinking_tokens", deserialize_with = "int64")]
    thinking_tokens: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnthropicCacheCreation {
    #[serde(
        default,
        alias = "ephemeral_5m_input_tokens",
        deserialize_with = "int64"
    )]
    ephemeral_5m_input_tokens: Option<i64>,
    #[serde(
        default,
        alias = "ephemeral_1h_input_tokens",
        deserialize_with = "int64"
    )]
    ephemeral_1h_input_tokens: Option<i64>,
}

impl From<AnthropicCacheCreation> for pb::AnthropicCacheCreation {
    fn from(c: AnthropicCacheCreation) -> Self {
        Self {
            ephemeral_5m_input_tokens: c.ephemeral_5m_input_tokens.unwrap_or_default(),
            ephemeral_1h_input_tokens: c.ephemeral_1h_input_tokens.unwrap_or_default(),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnthropicServerToolUse {
    #[serde(default, alias = "web_search_requests", deserialize_with = "int64")]
    web_search_requests: Option<i64>,
    #[serde(default, alias = "web_fetch_requests", deserialize_with = "int64")]
    web_fetch_requests: Option<i64>,
}

impl From<Anthropic> for pb::AnthropicUsage {
    fn from(u: Anthropic) -> Self {
        Self {
            input_tokens: u.input_tokens.unwrap_or_default(),
            output_tokens: u.output_tokens.unwrap_or_default(),
            cache_creation_input_tokens: u.cache_creation_input_tokens.unwrap_or_default(),
            cache_read_input_tokens: u.cache_read_input_tokens.unwrap_or_default(),
            cache_creation: u.cache_creation.map(Into::into),
            server_tool_use: u.server_tool_use.map(|s| pb::AnthropicServerToolUse {
                web_search_requests: s.web_search_requests.unwrap_or_default(),
                web_fetch_requests: s.web_fetch_requests.unwrap_or_default(),
            }),
            service_tier: u.service_tier,
            output_tokens_details: u.output_tokens_details.map(|d| {
                pb::AnthropicOutputTokensDetails {
                    thinking_tokens: d.thinking_tokens.unwrap_or_default(),
                }
            }),
        }
    }
}

/// DashScope's native `usage`; its details objects share [`DashScopeDetails`], as OpenAI's do.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DashScope {
    #[serde(default, alias = "input_tokens", deserialize_with = "int64")]
    input_tokens: Option<i64>,
    #[serde(default, alias = "output_tokens", deserialize_with = "int64")]
    output_tokens: Option<i64>,
    #[serde(default, alias = "total_tokens", deserialize_with = "int64")]
    total_tokens: Option<i64>,
    #[serde(default, alias = "prompt_tokens_details")]
    prompt_tokens_details: Option<DashScopeDetails>,
    #[serde(default, alias = "input_tokens_details")]
    input_tokens_details: Option<DashScopeDetails>,
    #[serde(default, alias = "output_tokens_details")]
    output_tokens_details: Option<DashScopeDetails>,
    #[serde(default, alias = "cached_tokens", deserialize_with = "int64")]
    cached_tokens: Option<i64>,
    #[serde(default, alias = "image_tokens", deserialize_with = "int64")]
    image_tokens: Option<i64>,
    #[serde(default, deserialize_with = "int64")]
    characters: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DashScopeDetails {
    #[serde(default, alias = "cached_tokens", deserialize_with = "int64")]
    cached_tokens: Option<i64>,
    #[serde(
        default,
        alias = "cache_creation_input_tokens",
        deserialize_with = "int64"
    )]
    cache_creation_input_tokens: Option<i64>,
    #[serde(default, alias = "cache_creation")]
    cache_creation: Option<AnthropicCacheCreation>,
    #[serde(default, alias = "cache_type")]
    cache_type: Option<String>,
    #[serde(default, alias = "text_tokens", deserialize_with = "int64")]
    text_tokens: Option<i64>,
    #[serde(default, alias = "image_tokens", deserialize_with = "int64")]
    image_tokens: Option<i64>,
    #[serde(default, alias = "reasoning_tokens", deserialize_with = "int64")]
    reasoning_tokens: Option<i64>,
}

impl From<DashScope> for pb::DashScopeUsage {
    fn from(u: DashScope) -> Self {
        Self {
            input_tokens: u.input_tokens.unwrap_or_default(),
            output_tokens: u.output_tokens.unwrap_or_default(),
            total_tokens: u.total_tokens,
            prompt_tokens_details: u.prompt_tokens_details.map(|d| {
                pb::DashScopePromptTokensDetails {
                    cached_tokens: d.cached_tokens.unwrap_or_default(),
                    cache_creation_input_tokens: d.cache_creation_input_tokens.unwrap_or_default(),
                    cache_creation: d.cache_creation.map(Into::into),
                    cache_type: d.cache_type,
                }
            }),
            input_tokens_details: u
                .input_tokens_details
                .map(|d| pb::DashScopeInputTokensDetails {
                    text_tokens: d.text_tokens.unwrap_or_default(),
                    image_tokens: d.image_tokens.unwrap_or_default(),
                }),
            output_tokens_details: u.output_tokens_details.map(|d| {
                pb::DashScopeOutputTokensDetails {
                    reasoning_tokens: d.reasoning_tokens.unwrap_or_default(),
                    text_tokens: d.text_tokens.unwrap_or_default(),
                }
            }),
            cached_tokens: u.cached_tokens.unwrap_or_default(),
            image_tokens: u.image_tokens.unwrap_or_default(),
            characters: u.characters.unwrap_or_default(),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Gemini {
    #[serde(default, alias = "prompt_token_count", deserialize_with = "int64")]
    prompt_token_count: Option<i64>,
    #[serde(
        default,
        alias = "cached_content_token_count",
        deserialize_with = "int64"
    )]
    cached_content_token_count: Option<i64>,
    #[serde(default, alias = "candidates_token_count", deserialize_with = "int64")]
    candidates_token_count: Option<i64>,
    #[serde(
        default,
        alias = "tool_use_prompt_token_count",
        deserialize_with = "int64"
    )]
    tool_use_prompt_token_count: Option<i64>,
    #[serde(default, alias = "thoughts_token_count", deserialize_with = "int64")]
    thoughts_token_count: Option<i64>,
    #[serde(default, alias = "total_token_count", deserialize_with = "int64")]
    total_token_count: Option<i64>,
    #[serde(default, alias = "prompt_tokens_details")]
    prompt_tokens_details: Option<Vec<GeminiModality>>,
    #[serde(default, alias = "cache_tokens_details")]
    cache_tokens_details: Option<Vec<GeminiModality>>,
    #[serde(default, alias = "candidates_tokens_details")]
    candidates_tokens_details: Option<Vec<GeminiModality>>,
    #[serde(default, alias = "tool_use_prompt_tokens_details")]
    tool_use_prompt_tokens_details: Option<Vec<GeminiModality>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GeminiModality {
    #[serde(default)]
    modality: Option<String>,
    #[serde(default, alias = "token_count", deserialize_with = "int64")]
    token_count: Option<i64>,
}

impl From<Gemini> for pb::GeminiUsageMetadata {
    fn from(u: Gemini) -> Self {
        let list = |entries: Option<Vec<GeminiModality>>| -> Vec<pb::GeminiModalityTokenCount> {
            entries
                .unwrap_or_default()
                .into_iter()
                .map(|e| pb::GeminiModalityTokenCount {
                    modality: e.modality.unwrap_or_default(),
                    token_count: e.token_count.unwrap_or_default(),
                })
                .collect()
        };
        Self {
            prompt_token_count: u.prompt_token_count.unwrap_or_default(),
            cached_content_token_count: u.cached_content_token_count.unwrap_or_default(),
            candidates_token_count: u.candidates_token_count.unwrap_or_default(),
            tool_use_prompt_token_count: u.tool_use_prompt_token_count.unwrap_or_default(),
            thoughts_token_count: u.thoughts_token_count.unwrap_or_default(),
            total_token_count: u.total_token_count,
            prompt_tokens_details: list(u.prompt_tokens_details),
            cache_tokens_details: list(u.cache_tokens_details),
            candidates_tokens_details: list(u.candidates_tokens_details),
            tool_use_prompt_tokens_details: list(u.tool_use_prompt_tokens_details),
        }
    }
}

// ---- scalar mappings ---------------------------------------------------------------------------

/// int64: a JSON integer or a decimal string, `null` for unset. Floats are refused rather than
/// converted: serde_json has already parsed them to `f64`, so their exact value is gone.
fn int64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    struct Int64;
    impl Visitor<'_> for Int64 {
        type Value = Option<i64>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an int64: an integer or a string of digits")
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            i64::try_from(v)
                .map(Some)
                .map_err(|_| E::custom(format!("{v} is beyond int64")))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Err(E::custom(
                "must be an integer within int64, without fraction or exponent",
            ))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            v.parse()
                .map(Some)
                .map_err(|_| E::custom(format!("{v:?} is not an int64")))
        }
    }
    deserializer.deserialize_any(Int64)
}

fn rfc3339<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<prost_types::Timestamp>, D::Error> {
    Option::<String>::deserialize(deserializer)?
        .map(|text| timestamp(&text).map_err(de::Error::custom))
        .transpose()
}

fn usage_source<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<i32>, D::Error> {
    deserializer.deserialize_any(Enum {
        name: "UsageSource",
        parse: |name| pb::UsageSource::from_str_name(name).map(|v| v as i32),
    })
}

fn usage_status<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<i32>, D::Error> {
    deserializer.deserialize_any(Enum {
        name: "UsageStatus",
        parse: |name| pb::UsageStatus::from_str_name(name).map(|v| v as i32),
    })
}

/// A proto enum: its value name, or its number (an unknown number is kept, as over gRPC, for
/// validation to reject by name).
struct Enum {
    name: &'static str,
    parse: fn(&str) -> Option<i32>,
}

impl Visitor<'_> for Enum {
    type Value = Option<i32>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a {} value name or number", self.name)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        i32::try_from(v)
            .map(Some)
            .map_err(|_| E::custom(format!("{v} is not a {} number", self.name)))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        i32::try_from(v)
            .map(Some)
            .map_err(|_| E::custom(format!("{v} is not a {} number", self.name)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        (self.parse)(v)
            .map(Some)
            .ok_or_else(|| E::custom(format!("{v:?} is not a {} value", self.name)))
    }
}

/// A string map whose duplicate keys are an error: which value would win is a guess.
fn attributes<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<HashMap<String, String>>, D::Error> {
    struct Attributes;
    impl<'de> Visitor<'de> for Attributes {
        type Value = Option<HashMap<String, String>>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object of string values")
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut attributes = HashMap::new();
            while let Some((key, value)) = map.next_entry::<String, String>()? {
                if attributes.contains_key(&key) {
                    return Err(de::Error::custom(format!("duplicate key {key:?}")));
                }
                attributes.insert(key, value);
            }
            Ok(Some(attributes))
        }
    }
    deserializer.deserialize_any(Attributes)
}

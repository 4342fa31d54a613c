//! Conformance with the providers' official SDKs. `tests/sdk/generate.py` builds usage objects
//! through each SDK's own types (versions pinned in `tests/sdk/requirements.txt`) and walks
//! every numeric field of each SDK usage type; these tests decode those objects as a producer
//! sends them and check the buckets against counts worked out by hand, and check that every
//! field the SDKs define is either mapped or deliberately ignored. `deploy/local/test.sh`
//! regenerates the files with `--check`, so a new SDK pin that adds a token field fails here
//! instead of billing it silently as something else.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde_json::{Value, json};

use super::json;
use crate::domain::normalize::normalize;
use crate::domain::tokens::TokenClass::{self, *};

#[derive(Deserialize)]
struct Fixture {
    sdk: String,
    shape: String,
    usage: Value,
}

/// Decodes a fixture's usage object as the `usage` of a JSON usage event (the CloudEvents data
/// a producer sends) and normalizes it.
fn buckets(name: &str, text: &str) -> Vec<(TokenClass, i64)> {
    let fixture: Fixture = serde_json::from_str(text).expect("fixture");
    let mut event = json!({
        "eventId": format!("sdk-{name}"),
        "source": "sdk-conformance",
        "tenantId": "acme",
        "agentId": "agent",
        "provider": "p",
        "model": "m",
        "occurredAt": "2026-12-01T00:00:00Z",
    });
    let camel = match fixture.shape.as_str() {
        "openai_chat" => "openaiChat",
        "openai_responses" => "openaiResponses",
        other => other,
    };
    event[camel] = fixture.usage;
    let decoded = json::usage_event(&event.to_string(), "")
        .unwrap_or_else(|e| panic!("{name} ({}): {e}", fixture.sdk));
    let usage = decoded.usage.expect("usage");
    normalize(&usage)
        .unwrap_or_else(|e| panic!("{name} ({}): {e}", fixture.sdk))
        .non_zero()
        .collect()
}

macro_rules! fixture {
    ($name:literal) => {
        (
            $name,
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/sdk/fixtures/",
                $name,
                ".json"
            )),
        )
    };
}

#[test]
fn sdk_usage_objects_normalize_to_hand_worked_buckets() {
    type Case<'a> = ((&'a str, &'a str), Vec<(TokenClass, i64)>);
    let cases: Vec<Case> = vec![
        (
            fixture!("openai_chat"),
            // prompt 5000 − cached 3000 − written 1500 − audio 100 − image 200 = 200;
            // completion 900 − reasoning 600 − audio 50 = 250
            vec![
                (Input, 200),
                (CacheRead, 3000),
                (Output, 250),
                (Reasoning, 600),
                (InputAudio, 100),
                (OutputAudio, 50),
                (InputImage, 200),
                (CacheWrite30m, 1500),
            ],
        ),
        (
            fixture!("openai_responses"),
            // input 5000 − cached 3000 − written (1000 + 500) = 500; output 900 − 600 = 300
            vec![
                (Input, 500),
                (CacheRead, 3000),
                (Output, 300),
                (Reasoning, 600),
                (CacheWrite30m, 1000),
                (CacheWrite12h, 500),
            ],
        ),
        (
            fixture!("openai_responses_without_ttl"),
            // input 2006 − cached 1024 − written 900 = 82; output 300 − 192 = 108; the
            // writes without a retention split are 30-minute ones
            vec![
                (Input, 82),
                (CacheRead, 1024),
                (Output, 108),
                (Reasoning, 192),
                (CacheWrite30m, 900),
            ],
        ),
        (
            fixture!("qwen_openai_compatible"),
            // prompt 29719 − 29713 written (5-minute cache) = 6; completion 435 − 382 = 53
            vec![
                (Input, 6),
                (CacheWrite5m, 29713),
                (Output, 53),
                (Reasoning, 382),
            ],
        ),
        (
            fixture!("anthropic"),
            // cache counts are outside input_tokens; output 800 − thinking 600 = 200
            vec![
                (Input, 1200),
                (CacheRead, 3000),
                (CacheWrite5m, 1000),
                (CacheWrite1h, 500),
                (Output, 200),
                (Reasoning, 600),
            ],
        ),
        (
            fixture!("anthropic_without_ttl"),
            // no cache_creation split: every write is a 5-minute one
            vec![
                (Input, 12),
                (CacheRead, 1536),
                (CacheWrite5m, 2560),
                (Output, 503),
            ],
        ),
        (
            fixture!("gemini"),
            // text: prompt 4000 + tool use 400 − cached 2800 = 1600; image 700 − cached 200
            // = 500; audio 300; candidates 300 − audio 50 = 250; thoughts 600 outside them
            vec![
                (Input, 1600),
                (CacheRead, 3000),
                (Output, 250),
                (Reasoning, 600),
                (InputAudio, 300),
                (OutputAudio, 50),
                (InputImage, 500),
            ],
        ),
        (
            fixture!("dashscope_text"),
            // input 29719 − 29713 written = 6; output 435 − reasoning 382 = 53
            vec![
                (Input, 6),
                (CacheWrite5m, 29713),
                (Output, 53),
                (Reasoning, 382),
            ],
        ),
        (
            fixture!("dashscope_vision"),
            // input 1292 − cached 1152 = 140 uncached; images 1249 − 1152 cached = 97
            // uncached, leaving 43 of text (= input_tokens_details.text_tokens)
            vec![
                (Input, 43),
                (CacheRead, 1152),
                (Output, 87),
                (InputImage, 97),
            ],
        ),
    ];
    for ((name, text), want) in cases {
        assert_eq!(buckets(name, text), want, "{name}");
    }
}

/// What tokenmeter does with one numeric field of an SDK usage type.
enum Use {
    /// Feeds the buckets, as the proto comment of its message says.
    Mapped,
    /// Deliberately not metered, for this reason.
    Ignored(&'static str),
}

/// Every numeric field of every SDK usage type tokenmeter accepts, by the SDK's own path.
const FIELDS: &[(&str, &str, Use)] = &[
    ("openai.CompletionUsage", "prompt_tokens", Use::Mapped),
    ("openai.CompletionUsage", "completion_tokens", Use::Mapped),
    ("openai.CompletionUsage", "total_tokens", Use::Mapped),
    (
        "openai.CompletionUsage",
        "prompt_tokens_details.cached_tokens",
        Use::Mapped,
    ),
    (
        "openai.CompletionUsage",
        "prompt_tokens_details.cache_write_tokens",
        Use::Mapped,
    ),
    (
        "openai.CompletionUsage",
        "prompt_tokens_details.audio_tokens",
        Use::Mapped,
    ),
    (
        "openai.CompletionUsage",
        "prompt_tokens_details.image_tokens",
        Use::Mapped,
    ),
    (
        "openai.CompletionUsage",
        "prompt_tokens_details.text_tokens",
        Use::Ignored("informational: the text tokens are what remains of the prompt"),
    ),
    (
        "openai.CompletionUsage",
        "completion_tokens_details.reasoning_tokens",
        Use::Mapped,
    ),
    (
        "openai.CompletionUsage",
        "completion_tokens_details.audio_tokens",
        Use::Mapped,
    ),
    (
        "openai.CompletionUsage",
        "completion_tokens_details.text_tokens",
        Use::Ignored("informational: the text tokens are what remains of the completion"),
    ),
    (
        "openai.CompletionUsage",
        "completion_tokens_details.accepted_prediction_tokens",
        Use::Ignored("inside completion_tokens and billed as output already"),
    ),
    (
        "openai.CompletionUsage",
        "completion_tokens_details.rejected_prediction_tokens",
        Use::Ignored("inside completion_tokens and billed as output already"),
    ),
    ("openai.ResponseUsage", "input_tokens", Use::Mapped),
    ("openai.ResponseUsage", "output_tokens", Use::Mapped),
    ("openai.ResponseUsage", "total_tokens", Use::Mapped),
    (
        "openai.ResponseUsage",
        "input_tokens_details.cached_tokens",
        Use::Mapped,
    ),
    (
        "openai.ResponseUsage",
        "input_tokens_details.cache_write_tokens",
        Use::Mapped,
    ),
    (
        "openai.ResponseUsage",
        "input_tokens_details.cache_write_tokens_details.ttl_30m_tokens",
        Use::Mapped,
    ),
    (
        "openai.ResponseUsage",
        "input_tokens_details.cache_write_tokens_details.ttl_12h_tokens",
        Use::Mapped,
    ),
    (
        "openai.ResponseUsage",
        "output_tokens_details.reasoning_tokens",
        Use::Mapped,
    ),
    ("anthropic.Usage", "input_tokens", Use::Mapped),
    ("anthropic.Usage", "output_tokens", Use::Mapped),
    ("anthropic.Usage", "cache_read_input_tokens", Use::Mapped),
    (
        "anthropic.Usage",
        "cache_creation_input_tokens",
        Use::Mapped,
    ),
    (
        "anthropic.Usage",
        "cache_creation.ephemeral_5m_input_tokens",
        Use::Mapped,
    ),
    (
        "anthropic.Usage",
        "cache_creation.ephemeral_1h_input_tokens",
        Use::Mapped,
    ),
    (
        "anthropic.Usage",
        "output_tokens_details.thinking_tokens",
        Use::Mapped,
    ),
    (
        "anthropic.Usage",
        "server_tool_use.web_search_requests",
        Use::Ignored("a count of tool requests, not tokens"),
    ),
    (
        "anthropic.Usage",
        "server_tool_use.web_fetch_requests",
        Use::Ignored("a count of tool requests, not tokens"),
    ),
    (
        "google-genai.GenerateContentResponseUsageMetadata",
        "prompt_token_count",
        Use::Mapped,
    ),
    (
        "google-genai.GenerateContentResponseUsageMetadata",
        "cached_content_token_count",
        Use::Mapped,
    ),
    (
        "google-genai.GenerateContentResponseUsageMetadata",
        "candidates_token_count",
        Use::Mapped,
    ),
    (
        "google-genai.GenerateContentResponseUsageMetadata",
        "tool_use_prompt_token_count",
        Use::Mapped,
    ),
    (
        "google-genai.GenerateContentResponseUsageMetadata",
        "thoughts_token_count",
        Use::Mapped,
    ),
    (
        "google-genai.GenerateContentResponseUsageMetadata",
        "total_token_count",
        Use::Mapped,
    ),
    (
        "google-genai.GenerateContentResponseUsageMetadata",
        "prompt_tokens_details[].token_count",
        Use::Mapped,
    ),
    (
        "google-genai.GenerateContentResponseUsageMetadata",
        "cache_tokens_details[].token_count",
        Use::Mapped,
    ),
    (
        "google-genai.GenerateContentResponseUsageMetadata",
        "candidates_tokens_details[].token_count",
        Use::Mapped,
    ),
    (
        "google-genai.GenerateContentResponseUsageMetadata",
        "tool_use_prompt_tokens_details[].token_count",
        Use::Mapped,
    ),
    // The dashscope SDK declares only these; the cache, reasoning and image keys it passes
    // through undeclared are mapped as DashScopeUsage's proto comment says, and checked by
    // the dashscope fixtures above.
    ("dashscope.GenerationUsage", "input_tokens", Use::Mapped),
    ("dashscope.GenerationUsage", "output_tokens", Use::Mapped),
    (
        "dashscope.MultiModalConversationUsage",
        "input_tokens",
        Use::Mapped,
    ),
    (
        "dashscope.MultiModalConversationUsage",
        "output_tokens",
        Use::Mapped,
    ),
    (
        "dashscope.MultiModalConversationUsage",
        "characters",
        Use::Ignored("a count of characters, not tokens"),
    ),
];

#[derive(Deserialize)]
struct Fields {
    types: BTreeMap<String, Vec<String>>,
}

#[test]
fn every_numeric_field_of_the_sdk_usage_types_is_mapped_or_ignored_with_a_reason() {
    let walked: Fields = serde_json::from_str(include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/sdk/fields.json"
    )))
    .expect("fields.json");
    let known: BTreeSet<(&str, &str)> = FIELDS.iter().map(|(t, p, _)| (*t, *p)).collect();
    let sdk: BTreeSet<(&str, &str)> = walked
        .types
        .iter()
        .flat_map(|(t, paths)| paths.iter().map(move |p| (t.as_str(), p.as_str())))
        .collect();

    let unknown: Vec<_> = sdk.difference(&known).collect();
    let stale: Vec<_> = known.difference(&sdk).collect();

    assert!(
        unknown.is_empty(),
        "SDK token fields neither mapped nor ignored (map them in domain/normalize.rs and the \
         proto, or list them here with a reason): {unknown:?}"
    );
    assert!(
        stale.is_empty(),
        "fields no SDK type has any more: {stale:?}"
    );
    for (_, path, use_) in FIELDS {
        if let Use::Ignored(reason) = use_ {
            assert!(!reason.is_empty(), "{path}: ignored without a reason");
        }
    }
}

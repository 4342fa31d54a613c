//! Fuzz entry points for the Kafka decoders and what they feed. Each takes arbitrary bytes and
//! must return without panicking; the assertions are invariants, so a failing one is a bug
//! just as a panic is. The cargo-fuzz targets in `fuzz/` call these (feature `fuzzing`, run by
//! `benches/fuzz.sh`), and the unit tests below run them over arbitrary bytes and the committed
//! seeds, so CI exercises them without a nightly toolchain.

use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use prost::Message;

use super::{Codec, USAGE_EVENT_TYPE, decode_usage};
use crate::config::Settings;
use crate::domain::normalize::normalize;
use crate::ingest::validate::{Limits, validate};
use crate::proto::v1::{self as pb, usage_event::Usage};

/// Small enough for fuzz inputs (libFuzzer's default `-max_len` is 4096) to cross it.
const MAX_MESSAGE_BYTES: usize = 2048;

/// The usage fields of the JSON form.
const USAGES: [&str; 5] = [
    "tokens",
    "openaiChat",
    "openaiResponses",
    "anthropic",
    "gemini",
];

/// `decode_usage` in each codec path. The first byte picks the path: protobuf, structured or
/// binary CloudEvents with fixed headers and the rest as payload, or arbitrary headers (see
/// [`split_headers`]). A decoded event then goes through validation, as the consumer does.
pub fn decode(input: &[u8]) -> bool {
    let Some((&mode, rest)) = input.split_first() else {
        return false;
    };
    let structured: [(&str, Option<&[u8]>); 1] =
        [("content-type", Some(b"application/cloudevents+json"))];
    let binary: [(&str, Option<&[u8]>); 5] = [
        ("ce_specversion", Some(b"1.0")),
        ("ce_id", Some(b"evt-1")),
        ("ce_source", Some(b"fuzz")),
        ("ce_type", Some(USAGE_EVENT_TYPE.as_bytes())),
        ("ce_subject", Some(b"acme")),
    ];
    let (result, expected) = match mode % 4 {
        0 => (
            decode_usage(Some(rest), &[], MAX_MESSAGE_BYTES),
            Some(Codec::Protobuf),
        ),
        1 => (
            decode_usage(Some(rest), &structured, MAX_MESSAGE_BYTES),
            Some(Codec::CloudEventsStructured),
        ),
        2 => (
            decode_usage(Some(rest), &binary, MAX_MESSAGE_BYTES),
            Some(Codec::CloudEventsBinary),
        ),
        _ => {
            let (headers, payload) = split_headers(rest);
            let headers: Vec<(&str, Option<&[u8]>)> = headers
                .iter()
                .map(|(name, value)| (name.as_str(), *value))
                .collect();
            (decode_usage(payload, &headers, MAX_MESSAGE_BYTES), None)
        }
    };
    match result {
        Ok((codec, event)) => {
            if expected.is_some() {
                assert_eq!(Some(codec), expected);
                assert!(
                    rest.len() <= MAX_MESSAGE_BYTES,
                    "an oversized payload decoded"
                );
            }
            check_validation(&event);
            true
        }
        Err(error) => {
            assert!(!error.reason.is_empty(), "an error without a reason");
            if expected.is_some() {
                assert_eq!(error.codec, expected, "{error}");
            }
            false
        }
    }
}

/// Protobuf bytes through `validate`, the function the gRPC path runs on every event (it
/// normalizes the usage too).
pub fn validate_protobuf(input: &[u8]) -> bool {
    pb::UsageEvent::decode(input).is_ok_and(|event| check_validation(&event))
}

/// A provider usage object (or disjoint tokens) in JSON through the decoder and `normalize`.
/// The first byte picks the usage field; the rest is its JSON value, spliced into a binary-mode
/// payload.
pub fn normalize_json(input: &[u8]) -> bool {
    let Some((&pick, rest)) = input.split_first() else {
        return false;
    };
    let name = USAGES[usize::from(pick) % USAGES.len()];
    let mut payload = format!(r#"{{"{name}":"#).into_bytes();
    payload.extend_from_slice(rest);
    payload.push(b'}');
    let headers: [(&str, Option<&[u8]>); 4] = [
        ("ce_specversion", Some(b"1.0")),
        ("ce_id", Some(b"evt-1")),
        ("ce_source", Some(b"fuzz")),
        ("ce_type", Some(USAGE_EVENT_TYPE.as_bytes())),
    ];
    let Ok((_, event)) = decode_usage(Some(&payload), &headers, usize::MAX) else {
        return false;
    };
    let Some(usage) = event.usage else {
        return false;
    };
    check_normalize(&usage)
}

/// Normalization's contract: disjoint, non-negative buckets whose sum fits, or an error naming
/// a field under the usage's oneof name.
fn check_normalize(usage: &Usage) -> bool {
    let oneof = match usage {
        Usage::Tokens(_) => "tokens",
        Usage::OpenaiChat(_) => "openai_chat",
        Usage::OpenaiResponses(_) => "openai_responses",
        Usage::Anthropic(_) => "anthropic",
        Usage::Gemini(_) => "gemini",
        Usage::Dashscope(_) => "dashscope",
    };
    match normalize(usage) {
        Ok(tokens) => {
            let buckets = tokens.buckets();
            assert!(
                buckets.iter().all(|n| *n >= 0),
                "negative bucket {buckets:?}"
            );
            let sum: i128 = buckets.iter().map(|n| i128::from(*n)).sum();
            assert_eq!(sum, i128::from(tokens.total()), "total is not Σ buckets");
            true
        }
        Err(error) => {
            assert!(
                error.field.starts_with(&format!("{oneof}.")) && !error.reason.is_empty(),
                "error {error} does not name a field of {oneof}"
            );
            false
        }
    }
}

/// Validation's contract: a valid event's buckets are non-negative; an invalid one names a
/// field and a reason. The usage is normalized on its own too, since validation stops at the
/// first bad field and may never reach it.
fn check_validation(event: &pb::UsageEvent) -> bool {
    if let Some(usage) = &event.usage {
        check_normalize(usage);
    }
    match validate(event, limits(), now()) {
        Ok(valid) => {
            assert!(valid.tokens.buckets().iter().all(|n| *n >= 0));
            true
        }
        Err(error) => {
            assert!(
                !error.field.is_empty() && !error.reason.is_empty(),
                "{error}"
            );
            false
        }
    }
}

/// A header name and its value, which Kafka allows to be null.
type Header<'a> = (String, Option<&'a [u8]>);

/// `name 0xFF value 0xFF … payload`: pairs of segments are headers (a value of exactly `0xFE`
/// is a null value), the last segment is the payload (none if empty).
fn split_headers(input: &[u8]) -> (Vec<Header<'_>>, Option<&[u8]>) {
    let mut segments: Vec<&[u8]> = input.split(|b| *b == 0xFF).collect();
    let payload = segments.pop().filter(|p| !p.is_empty());
    let headers = segments
        .chunks(2)
        .map(|pair| {
            let name = String::from_utf8_lossy(pair[0]).into_owned();
            let value = pair.get(1).copied().filter(|v| *v != [0xFE]);
            (name, value)
        })
        .collect();
    (headers, payload)
}

/// The shipped defaults (`config/default.toml`): the limits production validates with. Loaded
/// once, since a fuzzer runs the target thousands of times a second.
fn limits() -> &'static Limits {
    static LIMITS: OnceLock<Limits> = OnceLock::new();
    LIMITS.get_or_init(|| {
        let settings = Settings::load_from(None, Vec::new()).expect("the defaults are valid");
        Limits::from_settings(&settings.ingest)
    })
}

/// A fixed clock, so that an input behaves the same on every run.
fn now() -> DateTime<Utc> {
    DateTime::from_timestamp(1_772_366_400, 0).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::Path;

    /// A fuzz target's entry point: whether the input got all the way through.
    type Target = fn(&[u8]) -> bool;

    /// Each fuzz target's name (its directory under `fuzz/`) and entry point.
    const TARGETS: [(&str, Target); 3] = [
        ("decode", decode),
        ("validate_protobuf", validate_protobuf),
        ("normalize_json", normalize_json),
    ];

    /// Every file of `fuzz/seeds/<target>/`, by path.
    fn seeds(target: &str) -> Vec<(std::path::PathBuf, Vec<u8>)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/seeds")
            .join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        entries
            .map(|entry| {
                let path = entry.expect("directory entry").path();
                let input = std::fs::read(&path).expect("readable input");
                (path, input)
            })
            .collect()
    }

    /// The seeds are realistic messages: each must get all the way through, or it would not
    /// lead the fuzzer anywhere deep.
    #[test]
    fn every_committed_seed_gets_through_its_target() {
        for (target, run) in TARGETS {
            let seeds = seeds(target);
            assert!(seeds.len() >= 5, "{target}: only {} seeds", seeds.len());
            for (path, input) in seeds {
                assert!(run(&input), "{} did not get through", path.display());
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn decode_survives_arbitrary_bytes(input in prop::collection::vec(any::<u8>(), 0..1024)) {
            decode(&input);
        }

        #[test]
        fn validate_protobuf_survives_arbitrary_bytes(input in prop::collection::vec(any::<u8>(), 0..512)) {
            validate_protobuf(&input);
        }

        #[test]
        fn normalize_json_survives_arbitrary_bytes(input in prop::collection::vec(any::<u8>(), 0..512)) {
            normalize_json(&input);
        }

        /// Arbitrary JSON numbers and strings in every count field of each provider object.
        #[test]
        fn normalize_json_survives_arbitrary_counts(
            pick in 0..5_u8,
            counts in prop::collection::vec(prop_oneof![
                any::<i64>().prop_map(|n| n.to_string()),
                any::<u64>().prop_map(|n| n.to_string()),
                any::<f64>().prop_map(|n| format!("{n:e}")),
                any::<i64>().prop_map(|n| format!("\"{n}\"")),
            ], 12),
        ) {
            let c = |i: usize| counts[i].as_str();
            let json = match pick {
                0 => format!(r#"{{"input":{},"cacheRead":{},"output":{}}}"#, c(0), c(1), c(2)),
                1 => format!(
                    r#"{{"prompt_tokens":{},"completion_tokens":{},"total_tokens":{},"prompt_tokens_details":{{"cached_tokens":{},"audio_tokens":{}}},"completion_tokens_details":{{"reasoning_tokens":{},"image_tokens":{}}}}}"#,
                    c(0), c(1), c(2), c(3), c(4), c(5), c(6)
                ),
                2 => format!(
                    r#"{{"input_tokens":{},"output_tokens":{},"input_tokens_details":{{"cached_tokens":{}}},"output_tokens_details":{{"reasoning_tokens":{}}},"total_tokens":{}}}"#,
                    c(0), c(1), c(2), c(3), c(4)
                ),
                3 => format!(
                    r#"{{"input_tokens":{},"output_tokens":{},"cache_creation_input_tokens":{},"cache_read_input_tokens":{},"cache_creation":{{"ephemeral_5m_input_tokens":{},"ephemeral_1h_input_tokens":{}}}}}"#,
                    c(0), c(1), c(2), c(3), c(4), c(5)
                ),
                _ => format!(
                    r#"{{"promptTokenCount":{},"cachedContentTokenCount":{},"candidatesTokenCount":{},"toolUsePromptTokenCount":{},"thoughtsTokenCount":{},"totalTokenCount":{},"promptTokensDetails":[{{"modality":"AUDIO","tokenCount":{}}}],"cacheTokensDetails":[{{"modality":"AUDIO","tokenCount":{}}}],"candidatesTokensDetails":[{{"modality":"IMAGE","tokenCount":{}}}]}}"#,
                    c(0), c(1), c(2), c(3), c(4), c(5), c(6), c(7), c(8)
                ),
            };
            let mut input = vec![pick];
            input.extend_from_slice(json.as_bytes());
            normalize_json(&input);
        }
    }
}

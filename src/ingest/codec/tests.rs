use super::*;
use crate::domain::normalize::normalize;
use crate::proto::v1::usage_event::Usage;
use proptest::prelude::*;
use serde_json::{Value, json};

const LIMIT: usize = 1 << 20;

const STRUCTURED: &str = "application/cloudevents+json";

fn decode(
    payload: &[u8],
    headers: &[(&str, &str)],
) -> Result<(Codec, pb::UsageEvent), DecodeError> {
    let headers: Vec<(&str, Option<&[u8]>)> = headers
        .iter()
        .map(|(name, value)| (*name, Some(value.as_bytes())))
        .collect();
    decode_usage(Some(payload), &headers, LIMIT)
}

fn failure(result: Result<(Codec, pb::UsageEvent), DecodeError>) -> DecodeError {
    result.expect_err("the message must not decode")
}

fn binary_headers<'a>() -> Vec<(&'a str, &'a str)> {
    vec![
        ("ce_specversion", "1.0"),
        ("ce_id", "evt-42"),
        ("ce_source", "gateway-eu-1"),
        ("ce_type", USAGE_EVENT_TYPE),
        ("ce_subject", "acme"),
        ("ce_time", "2026-03-01T12:00:00.123456Z"),
        ("content-type", "application/json"),
    ]
}

fn at(seconds: i64, nanos: i32) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds, nanos })
}

/// 2026-03-01T12:00:00Z.
const MARCH_1_NOON: i64 = 1_772_366_400;

/// The event every realistic message below describes, with its usage left to the test.
fn expected(usage: Usage) -> pb::UsageEvent {
    pb::UsageEvent {
        event_id: "evt-42".into(),
        source: "gateway-eu-1".into(),
        tenant_id: "acme".into(),
        agent_id: "support-bot".into(),
        transaction_id: Some("txn-7".into()),
        provider: "openai".into(),
        model: "gpt-4.1-mini".into(),
        occurred_at: at(MARCH_1_NOON, 123_456_000),
        usage: Some(usage),
        ..Default::default()
    }
}

fn buckets(event: &pb::UsageEvent) -> [i64; crate::domain::tokens::CLASS_COUNT] {
    normalize(event.usage.as_ref().expect("usage"))
        .expect("consistent usage")
        .buckets()
}

// ---- the three codecs ------------------------------------------------------------------------

#[test]
fn protobuf_is_the_codec_without_content_type_and_with_the_protobuf_media_types() {
    let event = expected(Usage::Tokens(pb::TokenCounts {
        input: 10,
        output: 5,
        ..Default::default()
    }));
    let payload = event.encode_to_vec();

    for headers in [
        vec![],
        vec![("content-type", "application/x-protobuf")],
        vec![(
            "Content-Type",
            "application/protobuf; proto=tokenmeter.v1.UsageEvent",
        )],
        vec![(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )],
    ] {
        assert_eq!(
            decode(&payload, &headers),
            Ok((Codec::Protobuf, event.clone()))
        );
    }
}

#[test]
fn structured_cloudevent_carrying_openai_chat_usage_decodes_with_attributes_filling_the_event() {
    let payload = json!({
        "specversion": "1.0",
        "id": "evt-42",
        "source": "gateway-eu-1",
        "type": USAGE_EVENT_TYPE,
        "subject": "acme",
        "time": "2026-03-01T13:00:00.123456+01:00",
        "datacontenttype": "application/json",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "data": {
            "agentId": "support-bot",
            "transaction_id": "txn-7",
            "provider": "openai",
            "model": "gpt-4.1-mini",
            "openaiChat": {
                "prompt_tokens": 2006,
                "completion_tokens": 300,
                "total_tokens": 2306,
                "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": 192,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0
                }
            }
        }
    });

    let (codec, event) = decode(
        payload.to_string().as_bytes(),
        &[(
            "content-type",
            "application/cloudevents+json; charset=UTF-8",
        )],
    )
    .expect("valid message");

    assert_eq!(codec, Codec::CloudEventsStructured);
    assert_eq!(
        event,
        expected(Usage::OpenaiChat(pb::OpenAiChatUsage {
            prompt_tokens: 2006,
            completion_tokens: 300,
            total_tokens: Some(2306),
            prompt_tokens_details: Some(pb::OpenAiPromptTokensDetails {
                cached_tokens: 1920,
                ..Default::default()
            }),
            completion_tokens_details: Some(pb::OpenAiCompletionTokensDetails {
                reasoning_tokens: 192,
                ..Default::default()
            }),
        }))
    );
    // input, cache_read, 5m, 1h, output, reasoning, …
    assert_eq!(
        buckets(&event),
        [86, 1920, 0, 0, 108, 192, 0, 0, 0, 0, 0, 0]
    );
}

#[test]
fn binary_cloudevent_carrying_anthropic_usage_decodes_with_headers_filling_the_event() {
    let payload = json!({
        "agent_id": "support-bot",
        "transactionId": "txn-7",
        "provider": "openai",
        "model": "gpt-4.1-mini",
        "usageSource": "USAGE_SOURCE_PROVIDER_REPORTED",
        "status": 3,
        "attributes": {"route": "/v1/messages"},
        "anthropic": {
            "input_tokens": 2095,
            "cache_creation_input_tokens": 2051,
            "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": 2051, "ephemeral_1h_input_tokens": 0},
            "output_tokens": 503,
            "service_tier": "standard",
            "server_tool_use": {"web_search_requests": 1},
            "inference_geo": "not-a-proto-field"
        }
    });

    let (codec, event) =
        decode(payload.to_string().as_bytes(), &binary_headers()).expect("valid message");

    assert_eq!(codec, Codec::CloudEventsBinary);
    let mut want = expected(Usage::Anthropic(pb::AnthropicUsage {
        input_tokens: 2095,
        output_tokens: 503,
        cache_creation_input_tokens: 2051,
        cache_read_input_tokens: 0,
        cache_creation: Some(pb::AnthropicCacheCreation {
            ephemeral_5m_input_tokens: 2051,
            ephemeral_1h_input_tokens: 0,
        }),
        server_tool_use: Some(pb::AnthropicServerToolUse {
            web_search_requests: 1,
            web_fetch_requests: 0,
        }),
        service_tier: Some("standard".into()),
        output_tokens_details: None,
    }));
    want.usage_source = pb::UsageSource::ProviderReported as i32;
    want.status = pb::UsageStatus::Cancelled as i32;
    want.attributes = [("route".to_owned(), "/v1/messages".to_owned())].into();
    assert_eq!(event, want);
    assert_eq!(
        buckets(&event),
        [2095, 0, 2051, 0, 503, 0, 0, 0, 0, 0, 0, 0]
    );
}

#[test]
fn openai_responses_and_gemini_usage_decode_in_their_providers_own_json() {
    let data = |usage: (&str, Value)| {
        let mut data = json!({
            "agentId": "support-bot",
            "transactionId": "txn-7",
            "provider": "openai",
            "model": "gpt-4.1-mini",
        });
        data[usage.0] = usage.1;
        data.to_string()
    };
    let responses = data((
        "openaiResponses",
        json!({
            "input_tokens": 328,
            "input_tokens_details": {"cached_tokens": 128},
            "output_tokens": 52,
            "output_tokens_details": {"reasoning_tokens": 12},
            "total_tokens": 380
        }),
    ));
    let gemini = data((
        "gemini",
        json!({
            "promptTokenCount": 1183,
            "candidatesTokenCount": 306,
            "totalTokenCount": 1880,
            "cachedContentTokenCount": 1024,
            "thoughtsTokenCount": 391,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 1183}],
            "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": 1024}],
            "candidatesTokensDetails": [{"modality": "TEXT", "tokenCount": 306}],
            "trafficType": "ON_DEMAND"
        }),
    ));

    let (_, responses) = decode(responses.as_bytes(), &binary_headers()).expect("responses");
    let (_, gemini) = decode(gemini.as_bytes(), &binary_headers()).expect("gemini");

    assert_eq!(
        responses,
        expected(Usage::OpenaiResponses(pb::OpenAiResponsesUsage {
            input_tokens: 328,
            input_tokens_details: Some(pb::OpenAiInputTokensDetails {
                cached_tokens: 128,
                ..Default::default()
            }),
            output_tokens: 52,
            output_tokens_details: Some(pb::OpenAiOutputTokensDetails {
                reasoning_tokens: 12,
                ..Default::default()
            }),
            total_tokens: Some(380),
        }))
    );
    assert_eq!(
        buckets(&responses),
        [200, 128, 0, 0, 40, 12, 0, 0, 0, 0, 0, 0]
    );
    let text = |n| pb::GeminiModalityTokenCount {
        modality: "TEXT".into(),
        token_count: n,
    };
    assert_eq!(
        gemini,
        expected(Usage::Gemini(pb::GeminiUsageMetadata {
            prompt_token_count: 1183,
            cached_content_token_count: 1024,
            candidates_token_count: 306,
            thoughts_token_count: 391,
            total_token_count: Some(1880),
            prompt_tokens_details: vec![text(1183)],
            cache_tokens_details: vec![text(1024)],
            candidates_tokens_details: vec![text(306)],
            ..Default::default()
        }))
    );
    assert_eq!(
        buckets(&gemini),
        [159, 1024, 0, 0, 306, 391, 0, 0, 0, 0, 0, 0]
    );
}

#[test]
fn disjoint_tokens_accept_int64_as_strings_and_enums_as_names_or_numbers() {
    let payload = json!({
        "event_id": "evt-42",
        "tenantId": "acme",
        "occurredAt": "2026-03-01T12:00:00.123456Z",
        "usage_source": "USAGE_SOURCE_ESTIMATED",
        "status": null,
        "sessionId": "",
        "tokens": {"input": "9007199254740993", "cacheWrite1h": 7, "cache_write_5m": "-3"}
    });

    let (_, event) =
        decode(payload.to_string().as_bytes(), &binary_headers()).expect("valid message");

    assert_eq!(event.usage_source, pb::UsageSource::Estimated as i32);
    assert_eq!(event.status, 0);
    assert_eq!(event.session_id, Some(String::new()));
    assert_eq!(
        event.usage,
        Some(Usage::Tokens(pb::TokenCounts {
            // 2^53 + 1: would come back as 2^53 through an f64.
            input: 9_007_199_254_740_993,
            cache_write_1h: 7,
            // Negative counts are the validator's to reject, naming the field.
            cache_write_5m: -3,
            ..Default::default()
        }))
    );
}

// ---- errors ------------------------------------------------------------------------------------

fn structured(envelope: &Value) -> DecodeError {
    failure(decode(
        envelope.to_string().as_bytes(),
        &[("content-type", STRUCTURED)],
    ))
}

fn envelope() -> Value {
    json!({
        "specversion": "1.0",
        "id": "evt-42",
        "source": "gateway-eu-1",
        "type": USAGE_EVENT_TYPE,
        "data": {"tenantId": "acme", "tokens": {"input": 1}}
    })
}

fn error(codec: Codec, reason: &str) -> DecodeError {
    DecodeError {
        codec: Some(codec),
        reason: reason.into(),
    }
}

#[test]
fn cloudevents_attributes_are_checked_and_named() {
    let with = |key: &str, value: Value| {
        let mut e = envelope();
        e[key] = value;
        structured(&e)
    };
    let without = |key: &str| {
        let mut e = envelope();
        e.as_object_mut().expect("object").remove(key);
        structured(&e)
    };
    let s = Codec::CloudEventsStructured;

    assert_eq!(
        with("specversion", json!("0.3")),
        error(s, r#"specversion must be "1.0", got "0.3""#)
    );
    assert_eq!(without("id"), error(s, "id is required"));
    assert_eq!(with("id", json!("")), error(s, "id must not be empty"));
    assert_eq!(with("source", Value::Null), error(s, "source is required"));
    assert_eq!(
        with("type", json!("com.example.order.created")),
        error(
            s,
            r#"type must be "dev.tokenmeter.usage.v1", got "com.example.order.created""#
        )
    );
    assert_eq!(
        with("datacontenttype", json!("application/xml")),
        error(
            s,
            r#"datacontenttype "application/xml" is not JSON: the data must be the JSON usage event"#
        )
    );
    assert!(
        with("id", json!(42))
            .reason
            .starts_with("invalid CloudEvents attribute id: invalid type: integer `42`")
    );
}

#[test]
fn a_bad_time_is_refused_naming_the_attribute() {
    let mut e = envelope();
    e["time"] = json!("2026-03-01 noon");
    let leap = {
        let mut headers = binary_headers();
        headers[5] = ("ce_time", "2016-12-31T23:59:60Z");
        failure(decode(br#"{"tokens": {}}"#, &headers))
    };

    let error = structured(&e);

    assert_eq!(error.codec, Some(Codec::CloudEventsStructured));
    assert!(
        error
            .reason
            .starts_with(r#"time: "2026-03-01 noon" is not an RFC 3339 timestamp"#),
        "{error}"
    );
    assert_eq!(
        leap.reason,
        r#"header ce_time: "2016-12-31T23:59:60Z" is a leap second, which timestamps cannot hold"#
    );
}

#[test]
fn data_base64_and_missing_data_are_refused() {
    let mut base64 = envelope();
    base64
        .as_object_mut()
        .expect("object")
        .remove("data")
        .expect("data");
    base64["data_base64"] = json!("CgZldnQtNDI=");
    let mut null = envelope();
    null["data"] = Value::Null;

    assert_eq!(
        structured(&base64),
        error(
            Codec::CloudEventsStructured,
            "data_base64 is not supported: put the JSON usage event in data"
        )
    );
    assert_eq!(
        structured(&null),
        error(
            Codec::CloudEventsStructured,
            "data is required: the JSON usage event"
        )
    );
}

#[test]
fn attributes_that_disagree_with_the_data_are_refused() {
    let mut subject = envelope();
    subject["subject"] = json!("globex");
    let mut time = envelope();
    time["time"] = json!("2026-03-01T12:00:00Z");
    time["data"]["occurredAt"] = json!("2026-03-01T12:00:01Z");
    let mut same_instant = envelope();
    same_instant["time"] = json!("2026-03-01T13:00:00+01:00");
    same_instant["data"]["occurredAt"] = json!("2026-03-01T12:00:00.000Z");
    let mut id = binary_headers();
    id[1] = ("ce_id", "evt-43");

    assert_eq!(
        structured(&subject),
        error(
            Codec::CloudEventsStructured,
            r#"subject "globex" disagrees with data.tenantId "acme""#
        )
    );
    assert_eq!(
        structured(&time),
        error(
            Codec::CloudEventsStructured,
            r#"time "2026-03-01T12:00:00Z" disagrees with data.occurredAt 2026-03-01T12:00:01Z"#
        )
    );
    assert!(
        decode(
            same_instant.to_string().as_bytes(),
            &[("content-type", STRUCTURED)]
        )
        .is_ok()
    );
    assert_eq!(
        failure(decode(br#"{"eventId": "evt-42"}"#, &id)),
        error(
            Codec::CloudEventsBinary,
            r#"header ce_id "evt-43" disagrees with eventId "evt-42""#
        )
    );
}

#[test]
fn binary_mode_needs_its_headers_and_json_data() {
    let without = |name: &str| -> Vec<(&str, &str)> {
        binary_headers()
            .into_iter()
            .filter(|(n, _)| *n != name)
            .collect()
    };
    let mut protobuf = binary_headers();
    protobuf[6] = ("content-type", "application/x-protobuf");
    let b = Codec::CloudEventsBinary;

    assert_eq!(
        failure(decode(b"{}", &without("ce_source"))),
        error(b, "header ce_source is required")
    );
    assert_eq!(
        failure(decode(b"{}", &protobuf)),
        error(
            b,
            r#"header content-type "application/x-protobuf" is not JSON: the data must be the JSON usage event"#
        )
    );
    assert_eq!(
        failure(decode(b"{}", &without("ce_specversion"))),
        DecodeError {
            codec: None,
            reason: "ce_ headers without ce_specversion: a CloudEvents binary-mode message \
                     needs ce_specversion"
                .into()
        }
    );
    assert_eq!(decode(b"{}", &without("content-type")).map(|r| r.0), Ok(b));
    assert_eq!(
        failure(decode(b"\xff{}", &binary_headers())).reason,
        "payload is not UTF-8 JSON: invalid utf-8 sequence of 1 bytes from index 0"
    );
    let bad_header: [(&str, Option<&[u8]>); 2] = [
        ("ce_specversion", Some(b"1.0")),
        ("ce_id", Some(b"\xc3\x28")),
    ];
    assert_eq!(
        decode_usage(Some(b"{}"), &bad_header, LIMIT),
        Err(error(b, "header ce_id is not UTF-8"))
    );
}

#[test]
fn unsupported_content_types_are_refused_naming_them() {
    let unknown = failure(decode(b"a,b,c", &[("content-type", "text/csv")]));
    let avro = failure(decode(
        b"\x00",
        &[("content-type", "application/cloudevents+avro")],
    ));

    assert_eq!(unknown.codec, None);
    assert_eq!(
        unknown.reason,
        r#"unsupported content-type "text/csv": expected application/x-protobuf, application/cloudevents+json, or JSON with ce_ headers (CloudEvents binary mode)"#
    );
    assert_eq!(
        avro.to_string(),
        r#"cannot decode kafka message: unsupported content-type "application/cloudevents+avro": of the CloudEvents formats only application/cloudevents+json is supported"#
    );
}

#[test]
fn a_header_that_matters_twice_is_refused_and_null_headers_are_absent() {
    let twice = failure(decode(
        b"\x0a\x01e",
        &[
            ("content-type", "application/x-protobuf"),
            ("Content-Type", "application/x-protobuf"),
        ],
    ));
    let null_content_type: [(&str, Option<&[u8]>); 1] = [("content-type", None)];

    assert_eq!(twice.reason, "header content-type appears more than once");
    assert_eq!(
        decode_usage(Some(b"\x0a\x01e"), &null_content_type, LIMIT).map(|r| r.0),
        Ok(Codec::Protobuf)
    );
}

#[test]
fn tombstones_and_oversized_payloads_are_refused_before_parsing() {
    let tombstone = decode_usage(None, &[], LIMIT);
    let empty = decode_usage(
        Some(b""),
        &[("content-type", Some(STRUCTURED.as_bytes()))],
        LIMIT,
    );
    let oversized = decode_usage(Some(&[b'{'; 101]), &[], 100);

    assert_eq!(
        tombstone,
        Err(error(
            Codec::Protobuf,
            "empty payload (a tombstone): a usage message must carry an event"
        ))
    );
    assert_eq!(
        empty.map_err(|e| e.codec),
        Err(Some(Codec::CloudEventsStructured))
    );
    assert_eq!(
        oversized.map_err(|e| e.to_string()),
        Err(
            "cannot decode protobuf message: payload of 101 bytes exceeds the limit of 100 bytes"
                .into()
        )
    );
}

#[test]
fn invalid_protobuf_bytes_are_refused() {
    // Field 12 (occurred_at) declared 100 bytes long, 1 byte present.
    let truncated = failure(decode(&[0x62, 100, 0], &[]));

    assert_eq!(truncated.codec, Some(Codec::Protobuf));
    assert!(
        truncated
            .reason
            .starts_with("invalid protobuf UsageEvent: failed to decode Protobuf message"),
        "{truncated}"
    );
}

/// Each message's `data` decoded in binary mode; the error names the field path.
fn data_error(data: Value) -> String {
    failure(decode(data.to_string().as_bytes(), &binary_headers())).reason
}

#[test]
fn token_counts_never_pass_through_a_float() {
    let fraction = data_error(json!({"tokens": {"input": 1.5}}));
    let exponent = data_error(json!({"openai_chat": {"prompt_tokens": 1e30}}));
    let beyond = data_error(json!({"gemini": {"promptTokenCount": 9_223_372_036_854_775_808_u64}}));
    let string = data_error(json!({"anthropic": {"input_tokens": "12.0"}}));

    assert!(
        fraction.starts_with(
            "tokens.input: must be an integer within int64, without fraction or exponent"
        ),
        "{fraction}"
    );
    assert!(
        exponent.starts_with("openai_chat.prompt_tokens: must be an integer within int64"),
        "{exponent}"
    );
    assert!(
        beyond.starts_with("gemini.promptTokenCount: 9223372036854775808 is beyond int64"),
        "{beyond}"
    );
    assert!(
        string.starts_with(r#"anthropic.input_tokens: "12.0" is not an int64"#),
        "{string}"
    );
}

#[test]
fn unknown_fields_are_refused_at_the_top_level_and_ignored_inside_provider_objects() {
    let typo = data_error(json!({"eventID": "evt-42", "tokens": {"input": 1}}));
    let in_tokens = data_error(json!({"tokens": {"inputs": 1}}));
    let provider = json!({"openaiChat": {"prompt_tokens": 3, "cost": {"usd": 0.25}}});

    assert!(
        typo.starts_with("eventID: unknown field `eventID`, expected one of `eventId`"),
        "{typo}"
    );
    assert!(
        in_tokens.starts_with("tokens.inputs: unknown field `inputs`"),
        "{in_tokens}"
    );
    assert!(decode(provider.to_string().as_bytes(), &binary_headers()).is_ok());
}

#[test]
fn ambiguous_data_is_refused() {
    let two_usages = data_error(json!({"tokens": {}, "anthropic": {}}));
    let unknown_enum = data_error(json!({"status": "USAGE_STATUS_DONE"}));
    let duplicate_field = failure(decode(
        br#"{"eventId": "evt-42", "event_id": "evt-42"}"#,
        &binary_headers(),
    ))
    .reason;
    let duplicate_attribute = failure(decode(
        br#"{"attributes": {"a": "1", "a": "2"}}"#,
        &binary_headers(),
    ))
    .reason;
    let trailing = failure(decode(br#"{"tokens": {}} {}"#, &binary_headers())).reason;

    assert_eq!(
        two_usages,
        "only one usage field may be set (tokens, openaiChat, openaiResponses, anthropic, \
         gemini or dashscope), got tokens and anthropic"
    );
    assert!(
        unknown_enum.starts_with(r#"status: "USAGE_STATUS_DONE" is not a UsageStatus value"#),
        "{unknown_enum}"
    );
    assert!(
        duplicate_field.starts_with("duplicate field `eventId`"),
        "{duplicate_field}"
    );
    assert!(
        duplicate_attribute.starts_with(r#"attributes: duplicate key "a""#),
        "{duplicate_attribute}"
    );
    assert!(
        trailing.starts_with("trailing characters after the event"),
        "{trailing}"
    );
}

// ---- round trip ----------------------------------------------------------------------------

/// How the test encoder writes proto3 JSON: every spelling the decoder must accept.
#[derive(Debug, Clone, Copy)]
struct Style {
    snake_case: bool,
    int64_as_string: bool,
    enum_as_number: bool,
}

/// An independent proto3 JSON encoder, written from the mapping rather than from the decoder,
/// so that a wrong field name in the decoder's mirror shows up here.
fn to_json(event: &pb::UsageEvent, style: Style) -> Value {
    let mut object = serde_json::Map::new();
    let put = |object: &mut serde_json::Map<String, Value>, snake: &str, value: Value| {
        let name = if style.snake_case {
            snake.to_owned()
        } else {
            camel(snake)
        };
        object.insert(name, value);
    };
    let int = |n: i64| -> Value {
        if style.int64_as_string {
            json!(n.to_string())
        } else {
            json!(n)
        }
    };
    let obj = |fields: Vec<(&str, Value)>| -> Value {
        let mut object = serde_json::Map::new();
        for (snake, value) in fields {
            put(&mut object, snake, value);
        }
        Value::Object(object)
    };
    for (snake, value) in [
        ("event_id", &event.event_id),
        ("source", &event.source),
        ("tenant_id", &event.tenant_id),
        ("agent_id", &event.agent_id),
        ("provider", &event.provider),
        ("model", &event.model),
    ] {
        if !value.is_empty() {
            put(&mut object, snake, json!(value));
        }
    }
    for (snake, value) in [
        ("transaction_id", &event.transaction_id),
        ("service", &event.service),
        ("session_id", &event.session_id),
        ("request_id", &event.request_id),
        ("reservation_id", &event.reservation_id),
    ] {
        if let Some(value) = value {
            put(&mut object, snake, json!(value));
        }
    }
    if let Some(ts) = &event.occurred_at {
        put(&mut object, "occurred_at", json!(json::rfc3339_of(ts)));
    }
    let usage_source = pb::UsageSource::try_from(event.usage_source).expect("known");
    let status = pb::UsageStatus::try_from(event.status).expect("known");
    if style.enum_as_number {
        put(&mut object, "usage_source", json!(event.usage_source));
        put(&mut object, "status", json!(event.status));
    } else {
        put(
            &mut object,
            "usage_source",
            json!(usage_source.as_str_name()),
        );
        put(&mut object, "status", json!(status.as_str_name()));
    }
    if !event.attributes.is_empty() {
        put(&mut object, "attributes", json!(event.attributes));
    }
    let modalities = |list: &[pb::GeminiModalityTokenCount]| -> Value {
        list.iter()
            .map(|m| {
                obj(vec![
                    ("modality", json!(m.modality)),
                    ("token_count", int(m.token_count)),
                ])
            })
            .collect()
    };
    let optional = |n: Option<i64>| n.map_or(Value::Null, int);
    let cache_creation = |c: Option<&pb::AnthropicCacheCreation>| -> Value {
        c.map_or(Value::Null, |c| {
            obj(vec![
                (
                    "ephemeral_5m_input_tokens",
                    int(c.ephemeral_5m_input_tokens),
                ),
                (
                    "ephemeral_1h_input_tokens",
                    int(c.ephemeral_1h_input_tokens),
                ),
            ])
        })
    };
    let (oneof, usage) = match &event.usage {
        None => return Value::Object(object),
        Some(Usage::Tokens(t)) => (
            "tokens",
            obj(vec![
                ("input", int(t.input)),
                ("cache_read", int(t.cache_read)),
                ("cache_write_5m", int(t.cache_write_5m)),
                ("cache_write_1h", int(t.cache_write_1h)),
                ("output", int(t.output)),
                ("reasoning", int(t.reasoning)),
                ("input_audio", int(t.input_audio)),
                ("output_audio", int(t.output_audio)),
                ("input_image", int(t.input_image)),
                ("output_image", int(t.output_image)),
                ("cache_write_30m", int(t.cache_write_30m)),
                ("cache_write_12h", int(t.cache_write_12h)),
            ]),
        ),
        Some(Usage::OpenaiChat(u)) => {
            let mut fields = vec![
                ("prompt_tokens", int(u.prompt_tokens)),
                ("completion_tokens", int(u.completion_tokens)),
                ("total_tokens", optional(u.total_tokens)),
            ];
            if let Some(d) = &u.prompt_tokens_details {
                fields.push((
                    "prompt_tokens_details",
                    obj(vec![
                        ("cached_tokens", int(d.cached_tokens)),
                        ("audio_tokens", int(d.audio_tokens)),
                        ("image_tokens", int(d.image_tokens)),
                        ("text_tokens", int(d.text_tokens)),
                        ("cache_write_tokens", int(d.cache_write_tokens)),
                        (
                            "cache_creation_input_tokens",
                            int(d.cache_creation_input_tokens),
                        ),
                        ("cache_creation", cache_creation(d.cache_creation.as_ref())),
                        ("cache_type", json!(d.cache_type)),
                    ]),
                ));
            }
            if let Some(d) = &u.completion_tokens_details {
                fields.push((
                    "completion_tokens_details",
                    obj(vec![
                        ("reasoning_tokens", int(d.reasoning_tokens)),
                        ("audio_tokens", int(d.audio_tokens)),
                        (
                            "accepted_prediction_tokens",
                            int(d.accepted_prediction_tokens),
                        ),
                        (
                            "rejected_prediction_tokens",
                            int(d.rejected_prediction_tokens),
                        ),
                        ("image_tokens", int(d.image_tokens)),
                        ("text_tokens", int(d.text_tokens)),
                    ]),
                ));
            }
            ("openai_chat", obj(fields))
        }
        Some(Usage::OpenaiResponses(u)) => {
            let mut fields = vec![
                ("input_tokens", int(u.input_tokens)),
                ("output_tokens", int(u.output_tokens)),
                ("total_tokens", optional(u.total_tokens)),
            ];
            if let Some(d) = &u.input_tokens_details {
                fields.push((
                    "input_tokens_details",
                    obj(vec![
                        ("cached_tokens", int(d.cached_tokens)),
                        ("audio_tokens", int(d.audio_tokens)),
                        ("image_tokens", int(d.image_tokens)),
                        ("text_tokens", int(d.text_tokens)),
                        ("cache_write_tokens", int(d.cache_write_tokens)),
                        (
                            "cache_write_tokens_details",
                            d.cache_write_tokens_details.map_or(Value::Null, |t| {
                                obj(vec![
                                    ("ttl_30m_tokens", int(t.ttl_30m_tokens)),
                                    ("ttl_12h_tokens", int(t.ttl_12h_tokens)),
                                ])
                            }),
                        ),
                    ]),
                ));
            }
            if let Some(d) = &u.output_tokens_details {
                fields.push((
                    "output_tokens_details",
                    obj(vec![
                        ("reasoning_tokens", int(d.reasoning_tokens)),
                        ("audio_tokens", int(d.audio_tokens)),
                        ("image_tokens", int(d.image_tokens)),
                        ("text_tokens", int(d.text_tokens)),
                    ]),
                ));
            }
            ("openai_responses", obj(fields))
        }
        Some(Usage::Anthropic(u)) => {
            let mut fields = vec![
                ("input_tokens", int(u.input_tokens)),
                ("output_tokens", int(u.output_tokens)),
                (
                    "cache_creation_input_tokens",
                    int(u.cache_creation_input_tokens),
                ),
                ("cache_read_input_tokens", int(u.cache_read_input_tokens)),
                ("service_tier", json!(u.service_tier)),
            ];
            if u.cache_creation.is_some() {
                fields.push(("cache_creation", cache_creation(u.cache_creation.as_ref())));
            }
            if let Some(d) = &u.output_tokens_details {
                fields.push((
                    "output_tokens_details",
                    obj(vec![("thinking_tokens", int(d.thinking_tokens))]),
                ));
            }
            if let Some(s) = &u.server_tool_use {
                fields.push((
                    "server_tool_use",
                    obj(vec![
                        ("web_search_requests", int(s.web_search_requests)),
                        ("web_fetch_requests", int(s.web_fetch_requests)),
                    ]),
                ));
            }
            ("anthropic", obj(fields))
        }
        Some(Usage::Gemini(u)) => (
            "gemini",
            obj(vec![
                ("prompt_token_count", int(u.prompt_token_count)),
                (
                    "cached_content_token_count",
                    int(u.cached_content_token_count),
                ),
                ("candidates_token_count", int(u.candidates_token_count)),
                (
                    "tool_use_prompt_token_count",
                    int(u.tool_use_prompt_token_count),
                ),
                ("thoughts_token_count", int(u.thoughts_token_count)),
                ("total_token_count", optional(u.total_token_count)),
                (
                    "prompt_tokens_details",
                    modalities(&u.prompt_tokens_details),
                ),
                ("cache_tokens_details", modalities(&u.cache_tokens_details)),
                (
                    "candidates_tokens_details",
                    modalities(&u.candidates_tokens_details),
                ),
                (
                    "tool_use_prompt_tokens_details",
                    modalities(&u.tool_use_prompt_tokens_details),
                ),
            ]),
        ),
        Some(Usage::Dashscope(u)) => ("dashscope", dashscope_json(u, &obj, &int, &cache_creation)),
    };
    put(&mut object, oneof, usage);
    Value::Object(object)
}

/// How [`to_json`] writes an object from its fields (snake_case names, styled).
type ObjectWriter<'a> = &'a dyn Fn(Vec<(&str, Value)>) -> Value;

/// The DashScope usage object as JSON, in the style of [`to_json`]'s objects.
fn dashscope_json(
    u: &pb::DashScopeUsage,
    obj: ObjectWriter<'_>,
    int: &dyn Fn(i64) -> Value,
    cache_creation: &dyn Fn(Option<&pb::AnthropicCacheCreation>) -> Value,
) -> Value {
    let mut fields = vec![
        ("input_tokens", int(u.input_tokens)),
        ("output_tokens", int(u.output_tokens)),
        ("total_tokens", u.total_tokens.map_or(Value::Null, int)),
        ("cached_tokens", int(u.cached_tokens)),
        ("image_tokens", int(u.image_tokens)),
        ("characters", int(u.characters)),
    ];
    if let Some(d) = &u.prompt_tokens_details {
        fields.push((
            "prompt_tokens_details",
            obj(vec![
                ("cached_tokens", int(d.cached_tokens)),
                (
                    "cache_creation_input_tokens",
                    int(d.cache_creation_input_tokens),
                ),
                ("cache_creation", cache_creation(d.cache_creation.as_ref())),
                ("cache_type", json!(d.cache_type)),
            ]),
        ));
    }
    if let Some(d) = &u.input_tokens_details {
        fields.push((
            "input_tokens_details",
            obj(vec![
                ("text_tokens", int(d.text_tokens)),
                ("image_tokens", int(d.image_tokens)),
            ]),
        ));
    }
    if let Some(d) = &u.output_tokens_details {
        fields.push((
            "output_tokens_details",
            obj(vec![
                ("reasoning_tokens", int(d.reasoning_tokens)),
                ("text_tokens", int(d.text_tokens)),
            ]),
        ));
    }
    obj(fields)
}

/// proto3's JSON name: `cache_write_5m` → `cacheWrite5m`.
fn camel(snake: &str) -> String {
    let mut out = String::new();
    let mut upper = false;
    for c in snake.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// Token counts, hostile ones included (negative, extremes).
fn count() -> impl Strategy<Value = i64> {
    prop_oneof![
        0..100_000_i64,
        Just(-1),
        Just(i64::MAX),
        Just(i64::MIN),
        any::<i64>()
    ]
}

/// Every usage shape with any counts and any optional part present or not; shared with the
/// validation proptests. Boxed arms: unboxed, the nested strategy types overflow a test
/// thread's stack in debug.
pub(crate) fn any_usage() -> BoxedStrategy<Usage> {
    let counts = || prop::collection::vec(count(), 12);
    let tokens = counts()
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
                cache_write_30m: c[10],
                cache_write_12h: c[11],
            })
        })
        .boxed();
    let chat = (counts(), any::<(bool, bool, bool, bool)>())
        .prop_map(|(c, (total, prompt, completion, qwen))| {
            Usage::OpenaiChat(pb::OpenAiChatUsage {
                prompt_tokens: c[0],
                completion_tokens: c[1],
                total_tokens: total.then_some(c[2]),
                prompt_tokens_details: prompt.then_some(pb::OpenAiPromptTokensDetails {
                    cached_tokens: c[3],
                    audio_tokens: c[4],
                    image_tokens: c[5],
                    text_tokens: c[6],
                    cache_write_tokens: c[10],
                    cache_creation_input_tokens: c[11],
                    cache_creation: qwen.then_some(pb::AnthropicCacheCreation {
                        ephemeral_5m_input_tokens: c[11],
                        ephemeral_1h_input_tokens: c[0],
                    }),
                    cache_type: qwen.then(|| "ephemeral".to_owned()),
                }),
                completion_tokens_details: completion.then_some(
                    pb::OpenAiCompletionTokensDetails {
                        reasoning_tokens: c[7],
                        audio_tokens: c[8],
                        accepted_prediction_tokens: c[9],
                        rejected_prediction_tokens: c[0],
                        image_tokens: c[1],
                        text_tokens: c[2],
                    },
                ),
            })
        })
        .boxed();
    let responses = (counts(), any::<(bool, bool, bool, bool)>())
        .prop_map(|(c, (total, input, output, by_ttl))| {
            Usage::OpenaiResponses(pb::OpenAiResponsesUsage {
                input_tokens: c[0],
                input_tokens_details: input.then_some(pb::OpenAiInputTokensDetails {
                    cached_tokens: c[1],
                    audio_tokens: c[2],
                    image_tokens: c[3],
                    text_tokens: c[4],
                    cache_write_tokens: c[10],
                    cache_write_tokens_details: by_ttl.then_some(
                        pb::OpenAiCacheWriteTokensDetails {
                            ttl_30m_tokens: c[11],
                            ttl_12h_tokens: c[0],
                        },
                    ),
                }),
                output_tokens: c[5],
                output_tokens_details: output.then_some(pb::OpenAiOutputTokensDetails {
                    reasoning_tokens: c[6],
                    audio_tokens: c[7],
                    image_tokens: c[8],
                    text_tokens: c[9],
                }),
                total_tokens: total.then_some(c[0]),
            })
        })
        .boxed();
    let anthropic = (
        counts(),
        any::<(bool, bool, bool)>(),
        prop::option::of(".{0,8}"),
    )
        .prop_map(|(c, (cache, tools, thinking), tier)| {
            Usage::Anthropic(pb::AnthropicUsage {
                input_tokens: c[0],
                output_tokens: c[1],
                cache_creation_input_tokens: c[2],
                cache_read_input_tokens: c[3],
                cache_creation: cache.then_some(pb::AnthropicCacheCreation {
                    ephemeral_5m_input_tokens: c[4],
                    ephemeral_1h_input_tokens: c[5],
                }),
                server_tool_use: tools.then_some(pb::AnthropicServerToolUse {
                    web_search_requests: c[6],
                    web_fetch_requests: c[7],
                }),
                service_tier: tier,
                output_tokens_details: thinking.then_some(pb::AnthropicOutputTokensDetails {
                    thinking_tokens: c[8],
                }),
            })
        })
        .boxed();
    let modalities = || {
        prop::collection::vec(
            ("[A-Z_]{0,8}", count()).prop_map(|(modality, token_count)| {
                pb::GeminiModalityTokenCount {
                    modality,
                    token_count,
                }
            }),
            0..3,
        )
    };
    let gemini = (
        counts(),
        any::<bool>(),
        (modalities(), modalities(), modalities(), modalities()),
    )
        .prop_map(|(c, total, (prompt, cache, candidates, tool_use))| {
            Usage::Gemini(pb::GeminiUsageMetadata {
                prompt_token_count: c[0],
                cached_content_token_count: c[1],
                candidates_token_count: c[2],
                tool_use_prompt_token_count: c[3],
                thoughts_token_count: c[4],
                total_token_count: total.then_some(c[5]),
                prompt_tokens_details: prompt,
                cache_tokens_details: cache,
                candidates_tokens_details: candidates,
                tool_use_prompt_tokens_details: tool_use,
            })
        })
        .boxed();
    let dashscope = (
        counts(),
        any::<(bool, bool, bool, bool)>(),
        prop::option::of(".{0,8}"),
    )
        .prop_map(|(c, (total, prompt, input, output), cache_type)| {
            Usage::Dashscope(pb::DashScopeUsage {
                input_tokens: c[0],
                output_tokens: c[1],
                total_tokens: total.then_some(c[2]),
                prompt_tokens_details: prompt.then_some(pb::DashScopePromptTokensDetails {
                    cached_tokens: c[3],
                    cache_creation_input_tokens: c[4],
                    cache_creation: cache_type.is_some().then_some(pb::AnthropicCacheCreation {
                        ephemeral_5m_input_tokens: c[4],
                        ephemeral_1h_input_tokens: c[5],
                    }),
                    cache_type,
                }),
                input_tokens_details: input.then_some(pb::DashScopeInputTokensDetails {
                    text_tokens: c[6],
                    image_tokens: c[7],
                }),
                output_tokens_details: output.then_some(pb::DashScopeOutputTokensDetails {
                    reasoning_tokens: c[8],
                    text_tokens: c[9],
                }),
                cached_tokens: c[10],
                image_tokens: c[11],
                characters: c[5],
            })
        })
        .boxed();
    prop_oneof![tokens, chat, responses, anthropic, gemini, dashscope].boxed()
}

/// Any event every codec can carry: CloudEvents needs a non-empty id and source.
fn any_event() -> impl Strategy<Value = pb::UsageEvent> {
    let id = "[A-Za-z0-9._:/-]{1,24}";
    let optional = || prop::option::of(".{0,12}");
    (
        (id, id, id, ".{0,12}", ".{0,12}", ".{0,12}"),
        (optional(), optional(), optional(), optional(), optional()),
        prop::option::of((-62_135_596_800_i64..=253_402_300_799, 0..1_000_000_000_i32)),
        prop::option::of(any_usage()),
        (0..=2_i32, 0..=3_i32),
        prop::collection::hash_map(".{0,8}", ".{0,8}", 0..4),
    )
        .prop_map(
            |(
                (event_id, source, tenant_id, agent_id, provider, model),
                (transaction_id, service, session_id, request_id, reservation_id),
                occurred_at,
                usage,
                (usage_source, status),
                attributes,
            )| pb::UsageEvent {
                event_id,
                source,
                tenant_id,
                agent_id,
                transaction_id,
                service,
                session_id,
                request_id,
                reservation_id,
                provider,
                model,
                occurred_at: occurred_at
                    .map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
                usage,
                usage_source,
                status,
                attributes,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// The same event sent as protobuf, as a structured CloudEvent and as a binary-mode
    /// CloudEvent decodes to the same `UsageEvent`, in every JSON spelling, whether the data
    /// repeats the attributes or leaves them to the envelope.
    #[test]
    fn every_codec_decodes_an_event_to_the_same_usage_event(
        event in any_event(),
        (snake_case, int64_as_string, enum_as_number, lean) in any::<(bool, bool, bool, bool)>(),
    ) {
        let style = Style { snake_case, int64_as_string, enum_as_number };
        let mut data = to_json(&event, style);
        if lean {
            let object = data.as_object_mut().expect("object");
            for field in ["event_id", "eventId", "source", "tenant_id", "tenantId", "occurred_at", "occurredAt"] {
                object.remove(field);
            }
        }
        let time = event.occurred_at.as_ref().map(json::rfc3339_of);
        let mut envelope = json!({
            "specversion": "1.0",
            "id": event.event_id,
            "source": event.source,
            "type": USAGE_EVENT_TYPE,
            "subject": event.tenant_id,
            "datacontenttype": "application/json",
            "data": data,
        });
        if let Some(time) = &time {
            envelope["time"] = json!(time);
        }
        let mut headers = vec![
            ("ce_specversion", "1.0"),
            ("ce_id", event.event_id.as_str()),
            ("ce_source", event.source.as_str()),
            ("ce_type", USAGE_EVENT_TYPE),
            ("ce_subject", event.tenant_id.as_str()),
            ("content-type", "application/json"),
        ];
        if let Some(time) = &time {
            headers.push(("ce_time", time.as_str()));
        }

        let protobuf = decode(&event.encode_to_vec(), &[("content-type", "application/x-protobuf")]);
        let structured = decode(envelope.to_string().as_bytes(), &[("content-type", STRUCTURED)]);
        let binary = decode(data.to_string().as_bytes(), &headers);

        prop_assert_eq!(protobuf, Ok((Codec::Protobuf, event.clone())));
        prop_assert_eq!(structured, Ok((Codec::CloudEventsStructured, event.clone())));
        prop_assert_eq!(binary, Ok((Codec::CloudEventsBinary, event)));
    }
}

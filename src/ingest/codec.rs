//! Kafka message codecs: one message of `tokenmeter.usage.v1` (payload and headers) into a
//! `pb::UsageEvent`, or a [`DecodeError`] that becomes the dead-letter reason. Decoding only:
//! the event then goes through the same validation and normalization as over gRPC.
//!
//! The `content-type` header picks the codec (DESIGN §5, and the CloudEvents Kafka binding):
//! - `application/cloudevents+json` (parameters such as `; charset=utf-8` allowed, matched
//!   case-insensitively) → [`Codec::CloudEventsStructured`]: the payload is a CloudEvents 1.0
//!   JSON envelope whose `data` is the JSON form of the event (see [`json`]).
//! - otherwise, a `ce_specversion` header → [`Codec::CloudEventsBinary`]: the attributes are
//!   `ce_*` headers and the payload is the JSON event; `content-type` must be a JSON media type
//!   or absent.
//! - otherwise `application/x-protobuf`, `application/protobuf` or no `content-type` →
//!   [`Codec::Protobuf`]: the payload is the protobuf `UsageEvent`.
//!
//! Anything else is an error, as are `ce_*` headers without `ce_specversion` (half a CloudEvent
//! is more likely a producer bug than a protobuf message). Header names match case-insensitively;
//! a header without a value (Kafka allows null values) counts as absent; a header that matters
//! appearing twice is an error, since which copy wins would be a guess.
//!
//! CloudEvents attributes map onto the event: `id` → `event_id`, `source` → `source`,
//! `subject` → `tenant_id`, `time` → `occurred_at`. The data may omit those fields; when it has
//! them too they must agree, so an envelope can never silently re-address an event. `type` must
//! be [`USAGE_EVENT_TYPE`] so that another kind of event sent to the topic by mistake is refused
//! rather than read as usage. Extension attributes are allowed and ignored.

mod json;

use std::collections::BTreeMap;

use prost::Message;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;

use crate::proto::v1 as pb;

/// The CloudEvents `type` of a usage event: reverse-DNS of the product, then the versioned
/// name of the topic's payload (`tokenmeter.usage.v1`), so a v2 payload gets a new type.
pub const USAGE_EVENT_TYPE: &str = "dev.tokenmeter.usage.v1";

/// The only CloudEvents version supported (every 1.0.x patch release says `"1.0"`).
const SPEC_VERSION: &str = "1.0";

/// Which wire format a message used (for metrics and DLQ headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Protobuf,
    CloudEventsStructured,
    CloudEventsBinary,
}

impl Codec {
    pub const fn as_str(self) -> &'static str {
        match self {
            Codec::Protobuf => "protobuf",
            Codec::CloudEventsStructured => "cloudevents-structured",
            Codec::CloudEventsBinary => "cloudevents-binary",
        }
    }
}

/// Why a message could not be decoded. `codec` is `None` when the headers did not even say
/// which codec applies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot decode {} message: {reason}", .codec.map_or("kafka", Codec::as_str))]
pub struct DecodeError {
    pub codec: Option<Codec>,
    pub reason: String,
}

/// Decodes one Kafka message into a usage event, choosing the codec from its headers. The size
/// limit is checked before any parsing, so an oversized payload costs nothing to refuse.
pub fn decode_usage(
    payload: Option<&[u8]>,
    headers: &[(&str, Option<&[u8]>)],
    max_message_bytes: usize,
) -> Result<(Codec, pb::UsageEvent), DecodeError> {
    let error = |codec, reason| DecodeError { codec, reason };
    let headers = Headers::read(headers).map_err(|reason| error(None, reason))?;
    let codec = choose(&headers).map_err(|reason| error(None, reason))?;
    let failed = |reason| error(Some(codec), reason);
    let payload = match payload {
        Some(payload) if !payload.is_empty() => payload,
        _ => {
            return Err(failed(
                "empty payload (a tombstone): a usage message must carry an event".into(),
            ));
        }
    };
    if payload.len() > max_message_bytes {
        return Err(failed(format!(
            "payload of {} bytes exceeds the limit of {max_message_bytes} bytes",
            payload.len()
        )));
    }
    let event = match codec {
        Codec::Protobuf => {
            pb::UsageEvent::decode(payload).map_err(|e| format!("invalid protobuf UsageEvent: {e}"))
        }
        Codec::CloudEventsStructured => structured(payload),
        Codec::CloudEventsBinary => binary(payload, &headers),
    }
    .map_err(failed)?;
    Ok((codec, event))
}

/// Decodes one message of the transactions topic. Service-transaction events travel as
/// protobuf `TransactionEvent` only (content-type `application/x-protobuf`, or none): the
/// CloudEvents mappings exist for usage, where producers are many and varied.
pub fn decode_transaction(
    payload: Option<&[u8]>,
    headers: &[(&str, Option<&[u8]>)],
    max_message_bytes: usize,
) -> Result<pb::TransactionEvent, DecodeError> {
    let failed = |reason: String| DecodeError {
        codec: Some(Codec::Protobuf),
        reason,
    };
    let headers = Headers::read(headers).map_err(failed)?;
    match choose(&headers).map_err(failed)? {
        Codec::Protobuf => {}
        other => {
            return Err(failed(format!(
                "transaction events are protobuf only (content-type application/x-protobuf), not {}",
                other.as_str()
            )));
        }
    }
    let payload = match payload {
        Some(payload) if !payload.is_empty() => payload,
        _ => {
            return Err(failed(
                "empty payload (a tombstone): a message must carry an event".into(),
            ));
        }
    };
    if payload.len() > max_message_bytes {
        return Err(failed(format!(
            "payload of {} bytes exceeds the limit of {max_message_bytes} bytes",
            payload.len()
        )));
    }
    pb::TransactionEvent::decode(payload)
        .map_err(|e| failed(format!("invalid protobuf TransactionEvent: {e}")))
}

/// The headers that matter (`content-type` and `ce_*`), by lower-cased name. A map, so that a
/// message with very many headers costs n log n to read, not n².
struct Headers<'a>(BTreeMap<String, &'a [u8]>);

impl<'a> Headers<'a> {
    fn read(headers: &[(&str, Option<&'a [u8]>)]) -> Result<Self, String> {
        let mut read = BTreeMap::new();
        for (name, value) in headers {
            let Some(value) = value else { continue };
            let name = name.to_ascii_lowercase();
            if name != "content-type" && !name.starts_with("ce_") {
                continue;
            }
            if read.contains_key(&name) {
                return Err(format!("header {name} appears more than once"));
            }
            read.insert(name, *value);
        }
        Ok(Self(read))
    }

    fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    /// A header's value, which the CloudEvents Kafka binding says is UTF-8.
    fn text(&self, name: &str) -> Result<Option<&'a str>, String> {
        self.0
            .get(name)
            .map(|value| {
                std::str::from_utf8(value).map_err(|_| format!("header {name} is not UTF-8"))
            })
            .transpose()
    }
}

fn choose(headers: &Headers) -> Result<Codec, String> {
    let content_type = headers.text("content-type")?;
    let media = content_type.map(media_type);
    match media.as_deref() {
        Some("application/cloudevents+json") => Ok(Codec::CloudEventsStructured),
        Some(m) if m.starts_with("application/cloudevents") => Err(format!(
            "unsupported content-type {:?}: of the CloudEvents formats only \
             application/cloudevents+json is supported",
            content_type.unwrap_or_default()
        )),
        _ if headers.contains("ce_specversion") => Ok(Codec::CloudEventsBinary),
        _ if headers.0.keys().any(|name| name.starts_with("ce_")) => Err(
            "ce_ headers without ce_specversion: a CloudEvents binary-mode message needs \
             ce_specversion"
                .into(),
        ),
        None | Some("application/x-protobuf" | "application/protobuf") => Ok(Codec::Protobuf),
        Some(_) => Err(format!(
            "unsupported content-type {:?}: expected application/x-protobuf, \
             application/cloudevents+json, or JSON with ce_ headers (CloudEvents binary mode)",
            content_type.unwrap_or_default()
        )),
    }
}

/// The media type without parameters, lower-cased: `Application/JSON; charset=utf-8` →
/// `application/json`.
fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// The CloudEvents JSON format's test for JSON data: a media type `*/json` or `*/*+json`.
fn is_json(content_type: &str) -> bool {
    media_type(content_type)
        .split_once('/')
        .is_some_and(|(kind, sub)| !kind.is_empty() && (sub == "json" || sub.ends_with("+json")))
}

/// The CloudEvents 1.0 JSON envelope. Members not named here are extension attributes,
/// ignored; `null` means unset, as the JSON format says.
#[derive(Deserialize)]
#[serde(expecting = "a CloudEvents JSON object")]
struct Envelope<'a> {
    specversion: Option<String>,
    id: Option<String>,
    source: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    time: Option<String>,
    subject: Option<String>,
    datacontenttype: Option<String>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    data_base64: Option<IgnoredAny>,
}

fn structured(payload: &[u8]) -> Result<pb::UsageEvent, String> {
    let mut deserializer = serde_json::Deserializer::from_slice(payload);
    let envelope: Envelope = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        match e.path().to_string().as_str() {
            "." => format!("invalid CloudEvents JSON envelope: {}", e.inner()),
            path => format!("invalid CloudEvents attribute {path}: {}", e.inner()),
        }
    })?;
    deserializer
        .end()
        .map_err(|e| format!("invalid CloudEvents JSON envelope: {e}"))?;
    let attributes = Attributes {
        origin: Origin::Envelope,
        specversion: envelope.specversion.as_deref(),
        id: envelope.id.as_deref(),
        source: envelope.source.as_deref(),
        kind: envelope.kind.as_deref(),
        time: envelope.time.as_deref(),
        subject: envelope.subject.as_deref(),
        datacontenttype: envelope.datacontenttype.as_deref(),
    };
    attributes.check()?;
    if envelope.data_base64.is_some() {
        return Err("data_base64 is not supported: put the JSON usage event in data".into());
    }
    let data = envelope
        .data
        .ok_or("data is required: the JSON usage event")?;
    let event = json::usage_event(data.get(), "data")?;
    attributes.apply(event, "data.")
}

fn binary(payload: &[u8], headers: &Headers) -> Result<pb::UsageEvent, String> {
    let attributes = Attributes {
        origin: Origin::Headers,
        specversion: headers.text("ce_specversion")?,
        id: headers.text("ce_id")?,
        source: headers.text("ce_source")?,
        kind: headers.text("ce_type")?,
        time: headers.text("ce_time")?,
        subject: headers.text("ce_subject")?,
        datacontenttype: headers.text("content-type")?,
    };
    attributes.check()?;
    let text =
        std::str::from_utf8(payload).map_err(|e| format!("payload is not UTF-8 JSON: {e}"))?;
    let event = json::usage_event(text, "")?;
    attributes.apply(event, "")
}

/// Where attributes came from, to name them as the producer wrote them.
#[derive(Clone, Copy)]
enum Origin {
    Envelope,
    Headers,
}

/// The CloudEvents context attributes tokenmeter reads, from either mode.
struct Attributes<'a> {
    origin: Origin,
    specversion: Option<&'a str>,
    id: Option<&'a str>,
    source: Option<&'a str>,
    kind: Option<&'a str>,
    time: Option<&'a str>,
    subject: Option<&'a str>,
    datacontenttype: Option<&'a str>,
}

impl Attributes<'_> {
    fn name(&self, attribute: &str) -> String {
        match (self.origin, attribute) {
            (Origin::Envelope, _) => attribute.to_owned(),
            (Origin::Headers, "datacontenttype") => "header content-type".to_owned(),
            (Origin::Headers, _) => format!("header ce_{attribute}"),
        }
    }

    /// A required attribute: present and not empty (CloudEvents requires non-empty values).
    fn required(&self, attribute: &str, value: Option<&str>) -> Result<(), String> {
        match value {
            None => Err(format!("{} is required", self.name(attribute))),
            Some("") => Err(format!("{} must not be empty", self.name(attribute))),
            Some(_) => Ok(()),
        }
    }

    fn check(&self) -> Result<(), String> {
        self.required("specversion", self.specversion)?;
        if self.specversion != Some(SPEC_VERSION) {
            return Err(format!(
                "{} must be \"{SPEC_VERSION}\", got {:?}",
                self.name("specversion"),
                self.specversion.unwrap_or_default()
            ));
        }
        self.required("id", self.id)?;
        self.required("source", self.source)?;
        self.required("type", self.kind)?;
        if self.kind != Some(USAGE_EVENT_TYPE) {
            return Err(format!(
                "{} must be \"{USAGE_EVENT_TYPE}\", got {:?}",
                self.name("type"),
                self.kind.unwrap_or_default()
            ));
        }
        if let Some(content_type) = self.datacontenttype
            && !is_json(content_type)
        {
            return Err(format!(
                "{} {content_type:?} is not JSON: the data must be the JSON usage event",
                self.name("datacontenttype")
            ));
        }
        Ok(())
    }

    /// Fills the event's identity and time from the attributes; where the data has them too,
    /// they must agree. `path` is how the data's fields are named in errors.
    fn apply(&self, mut event: pb::UsageEvent, path: &str) -> Result<pb::UsageEvent, String> {
        let fill = |attribute: &str, value: Option<&str>, field: &mut String, json: &str| {
            let Some(value) = value else { return Ok(()) };
            if field.is_empty() {
                value.clone_into(field);
                Ok(())
            } else if field == value {
                Ok(())
            } else {
                Err(format!(
                    "{} {value:?} disagrees with {path}{json} {field:?}",
                    self.name(attribute)
                ))
            }
        };
        fill("id", self.id, &mut event.event_id, "eventId")?;
        fill("source", self.source, &mut event.source, "source")?;
        fill("subject", self.subject, &mut event.tenant_id, "tenantId")?;
        if let Some(time) = self.time {
            let at = json::timestamp(time).map_err(|e| format!("{}: {e}", self.name("time")))?;
            match &event.occurred_at {
                None => event.occurred_at = Some(at),
                Some(occurred_at) if *occurred_at == at => {}
                Some(occurred_at) => {
                    return Err(format!(
                        "{} {time:?} disagrees with {path}occurredAt {}",
                        self.name("time"),
                        json::rfc3339_of(occurred_at)
                    ));
                }
            }
        }
        Ok(event)
    }
}

#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
#[cfg(test)]
mod sdk_conformance;
#[cfg(test)]
pub(crate) mod tests;

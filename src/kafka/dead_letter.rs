//! The dead-letter side of the usage consumer: what a dead-lettered message carries, the
//! producer that writes it, and the limit that stops a consumer from draining a misconfigured
//! stream into the dead-letter topic.

use std::collections::VecDeque;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// Header names on a dead-lettered message; the original key, payload and headers are kept.
pub mod header {
    /// A sentence saying why the message could not be ingested.
    pub const REASON: &str = "tokenmeter.dlq.reason";
    /// The field the reason is about, when there is one.
    pub const FIELD: &str = "tokenmeter.dlq.field";
    /// `decode` (not a readable usage event) or `validate` (readable, but invalid).
    pub const STAGE: &str = "tokenmeter.dlq.stage";
    /// The wire format the message was read as, when it was recognised.
    pub const CODEC: &str = "tokenmeter.dlq.codec";
    pub const TOPIC: &str = "tokenmeter.dlq.topic";
    pub const PARTITION: &str = "tokenmeter.dlq.partition";
    pub const OFFSET: &str = "tokenmeter.dlq.offset";
    pub const CONSUMER_GROUP: &str = "tokenmeter.dlq.consumer_group";
}

/// Why one message is dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub stage: Stage,
    pub field: Option<String>,
    pub reason: String,
    pub codec: Option<&'static str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Decode,
    Validate,
}

impl Stage {
    pub const fn as_str(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Validate => "validate",
        }
    }
}

/// The headers of the dead-lettered copy of `message`: its own, then ours.
pub fn headers(message: &OwnedMessage, letter: &DeadLetter, group: &str) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new();
    if let Some(original) = message.headers() {
        for h in original.iter() {
            headers = headers.insert(h);
        }
    }
    let partition = message.partition().to_string();
    let offset = message.offset().to_string();
    let mut ours: Vec<(&str, &str)> = vec![
        (header::REASON, letter.reason.as_str()),
        (header::STAGE, letter.stage.as_str()),
        (header::TOPIC, message.topic()),
        (header::PARTITION, &partition),
        (header::OFFSET, &offset),
        (header::CONSUMER_GROUP, group),
    ];
    if let Some(field) = &letter.field {
        ours.push((header::FIELD, field));
    }
    if let Some(codec) = letter.codec {
        ours.push((header::CODEC, codec));
    }
    for (key, value) in ours {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    headers
}

/// Writes dead letters and waits for the broker's acknowledgement of each, so the offsets
/// that pass them are stored only once they are durable.
#[derive(Clone)]
pub struct DeadLetterProducer {
    producer: FutureProducer,
    topic: String,
    group: String,
}

impl DeadLetterProducer {
    pub fn new(base: &ClientConfig, topic: &str, group: &str) -> Result<Self, KafkaError> {
        let producer: FutureProducer = super::with_defaults(base.clone(), &[("linger.ms", "5")])
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()?;
        Ok(Self {
            producer,
            topic: topic.to_owned(),
            group: group.to_owned(),
        })
    }

    /// Sends every letter and returns once all are acknowledged, or the first failure.
    pub async fn send_all(
        &self,
        letters: &[(&OwnedMessage, DeadLetter)],
    ) -> Result<(), KafkaError> {
        let deliveries: Vec<_> = letters
            .iter()
            .map(|(message, letter)| {
                let mut record: FutureRecord<'_, [u8], [u8]> =
                    FutureRecord::to(&self.topic).headers(headers(message, letter, &self.group));
                if let Some(key) = message.key() {
                    record = record.key(key);
                }
                if let Some(payload) = message.payload() {
                    record = record.payload(payload);
                }
                self.producer.send(record, Duration::from_secs(30))
            })
            .collect();
        for delivery in futures::future::join_all(deliveries).await {
            delivery.map_err(|(error, _)| error)?;
        }
        Ok(())
    }
}

/// The limit was crossed: the consumer must stop rather than keep dead-lettering.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LimitExceeded(pub String);

/// Counts dead letters over consumed messages: too many in a row, or too large a share of the
/// last `window` messages, means the stream or the consumer is misconfigured.
#[derive(Debug, Clone)]
pub struct DeadLetterGuard {
    max_consecutive: u64,
    max_ratio: f64,
    window: usize,
    recent: VecDeque<bool>,
    dead_in_recent: usize,
    consecutive: u64,
}

impl DeadLetterGuard {
    /// `max_consecutive` 0 means no consecutive limit; `max_ratio` 1 means no ratio limit.
    pub fn new(max_consecutive: u64, max_ratio: f64, window: u64) -> Self {
        let window = usize::try_from(window).unwrap_or(usize::MAX).max(1);
        Self {
            max_consecutive,
            max_ratio,
            window,
            recent: VecDeque::with_capacity(window.min(1 << 16)),
            dead_in_recent: 0,
            consecutive: 0,
        }
    }

    /// Records one consumed message, in consumption order.
    pub fn record(&mut self, dead: bool) -> Result<(), LimitExceeded> {
        if dead {
            self.consecutive += 1;
            self.dead_in_recent += 1;
        } else {
            self.consecutive = 0;
        }
        self.recent.push_back(dead);
        if self.recent.len() > self.window && self.recent.pop_front() == Some(true) {
            self.dead_in_recent -= 1;
        }
        if self.max_consecutive > 0 && self.consecutive >= self.max_consecutive {
            return Err(LimitExceeded(format!(
                "{} consecutive messages dead-lettered (limit kafka.consumer.dead_letter_max_consecutive = {})",
                self.consecutive, self.max_consecutive
            )));
        }
        // Counts, not money: a float ratio is exact enough to compare against a setting.
        let ratio = self.dead_in_recent as f64 / self.window as f64;
        if self.recent.len() == self.window && self.max_ratio < 1.0 && ratio > self.max_ratio {
            return Err(LimitExceeded(format!(
                "{} of the last {} messages dead-lettered (limit kafka.consumer.dead_letter_max_ratio = {})",
                self.dead_in_recent, self.window, self.max_ratio
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_limit_trips_on_the_nth_dead_letter_in_a_row() {
        let mut guard = DeadLetterGuard::new(3, 1.0, 100);
        for dead in [true, true, false, true, true] {
            assert!(guard.record(dead).is_ok());
        }
        let error = guard.record(true).expect_err("third in a row");
        assert!(error.0.contains("3 consecutive"), "{error}");
    }

    #[test]
    fn ratio_limit_waits_for_a_full_window_then_trips_above_the_share() {
        let mut guard = DeadLetterGuard::new(0, 0.5, 4);
        // Two dead of the first three: the window is not full yet.
        for dead in [true, true, false] {
            assert!(guard.record(dead).is_ok());
        }
        // Window full with 2 of 4 dead: exactly the limit, not above it.
        assert!(guard.record(false).is_ok());
        // Window slides to [true, false, false, true]: still 2 of 4.
        assert!(guard.record(true).is_ok());
        // [false, false, true, true] → 2 of 4, then [false, true, true, true] → 3 of 4.
        assert!(guard.record(true).is_ok());
        let error = guard.record(true).expect_err("3 of 4 is above 0.5");
        assert!(error.0.contains("3 of the last 4"), "{error}");
    }

    #[test]
    fn healthy_streams_never_trip() {
        let mut guard = DeadLetterGuard::new(10, 0.05, 100);
        for i in 0..10_000 {
            assert!(guard.record(i % 100 == 0).is_ok(), "message {i}");
        }
    }

    #[test]
    fn headers_keep_the_original_ones_and_name_where_the_message_came_from() {
        let original = OwnedHeaders::new().insert(Header {
            key: "content-type",
            value: Some("application/cloudevents+json"),
        });
        let message = OwnedMessage::new(
            Some(b"{}".to_vec()),
            Some(b"tenant-a".to_vec()),
            "tokenmeter.usage.v1".to_owned(),
            rdkafka::Timestamp::NotAvailable,
            3,
            42,
            Some(original),
        );
        let letter = DeadLetter {
            stage: Stage::Validate,
            field: Some("tokens.input".to_owned()),
            reason: "must not be negative".to_owned(),
            codec: Some("protobuf"),
        };
        let headers = headers(&message, &letter, "tokenmeter");
        let found: Vec<(String, String)> = headers
            .iter()
            .map(|h| {
                (
                    h.key.to_owned(),
                    String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                )
            })
            .collect();
        let get = |key: &str| {
            found
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("content-type"), Some("application/cloudevents+json"));
        assert_eq!(get(header::REASON), Some("must not be negative"));
        assert_eq!(get(header::FIELD), Some("tokens.input"));
        assert_eq!(get(header::STAGE), Some("validate"));
        assert_eq!(get(header::TOPIC), Some("tokenmeter.usage.v1"));
        assert_eq!(get(header::PARTITION), Some("3"));
        assert_eq!(get(header::OFFSET), Some("42"));
        assert_eq!(get(header::CODEC), Some("protobuf"));
        assert_eq!(get(header::CONSUMER_GROUP), Some("tokenmeter"));
    }
}

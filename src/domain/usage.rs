//! A validated usage event and its identity. The identity never includes the timestamp: a
//! retry carrying another `occurred_at` is a conflict, not a new event.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use super::tokens::{ORIGINAL_CLASS_COUNT, TokenClass, TokenCounts};

/// Who reported the counts (proto `UsageSource`, default applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UsageSource {
    ProviderReported = 1,
    Estimated = 2,
}

impl UsageSource {
    /// From the stored proto number.
    pub fn from_number(number: i16) -> Option<Self> {
        [UsageSource::ProviderReported, UsageSource::Estimated]
            .into_iter()
            .find(|s| *s as i16 == number)
    }
}

/// How the model call ended (proto `UsageStatus`, default applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallStatus {
    Success = 1,
    Error = 2,
    Cancelled = 3,
}

impl CallStatus {
    /// From the stored proto number.
    pub fn from_number(number: i16) -> Option<Self> {
        [
            CallStatus::Success,
            CallStatus::Error,
            CallStatus::Cancelled,
        ]
        .into_iter()
        .find(|s| *s as i16 == number)
    }
}

/// (tenant, source, event_id): what makes two deliveries the same event.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventIdentity {
    pub tenant_id: String,
    pub source: String,
    pub event_id: String,
}

impl From<(String, String, String)> for EventIdentity {
    /// From a `(tenant_id, source, event_id)` row.
    fn from((tenant_id, source, event_id): (String, String, String)) -> Self {
        Self {
            tenant_id,
            source,
            event_id,
        }
    }
}

/// A usage event after validation and normalization: every field is in its canonical form,
/// so two deliveries of the same call compare equal field by field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageEvent {
    pub identity: EventIdentity,
    pub agent_id: String,
    pub transaction_id: Option<String>,
    pub service: Option<String>,
    pub session_id: Option<String>,
    pub request_id: Option<String>,
    pub reservation_id: Option<String>,
    pub provider: String,
    pub model: String,
    /// Truncated to whole microseconds (storage precision).
    pub occurred_at: DateTime<Utc>,
    pub tokens: TokenCounts,
    /// The buckets the first release would have stored for the same usage object, when they
    /// differ ([`crate::domain::normalize::first_release`]).
    pub first_release_tokens: Option<TokenCounts>,
    pub usage_source: UsageSource,
    pub status: CallStatus,
    pub attributes: BTreeMap<String, String>,
}

impl UsageEvent {
    /// The first payload field, in proto field order, in which `other` (a delivery with the
    /// same identity) differs from this event: what a CONFLICT result names. Token classes
    /// are named after normalization (`tokens.cache_read`), whatever shape carried them.
    pub fn first_difference(&self, other: &UsageEvent) -> Option<String> {
        let fields: [(&str, bool); 8] = [
            ("agent_id", self.agent_id != other.agent_id),
            (
                "transaction_id",
                self.transaction_id != other.transaction_id,
            ),
            ("service", self.service != other.service),
            ("session_id", self.session_id != other.session_id),
            ("request_id", self.request_id != other.request_id),
            (
                "reservation_id",
                self.reservation_id != other.reservation_id,
            ),
            ("provider", self.provider != other.provider),
            ("model", self.model != other.model),
        ];
        if let Some((field, _)) = fields.iter().find(|(_, differs)| *differs) {
            return Some((*field).to_owned());
        }
        if self.occurred_at != other.occurred_at {
            return Some("occurred_at".to_owned());
        }
        if let Some(class) = TokenClass::ALL
            .into_iter()
            .find(|class| self.tokens.get(*class) != other.tokens.get(*class))
        {
            return Some(format!("tokens.{class}"));
        }
        [
            ("usage_source", self.usage_source != other.usage_source),
            ("status", self.status != other.status),
            ("attributes", self.attributes != other.attributes),
        ]
        .into_iter()
        .find(|(_, differs)| *differs)
        .map(|(field, _)| field.to_owned())
    }

    /// SHA-256 over a length-prefixed encoding of every payload field, in a fixed order.
    /// Equal hashes mean a duplicate delivery; different ones a conflict.
    pub fn payload_hash(&self) -> [u8; 32] {
        self.hash_with(&self.tokens)
    }

    /// Whether a stored payload hash is this event's: its own, or the one the first release
    /// gave it (stored before the cache-write classes and Anthropic's thinking split existed).
    pub fn is_stored_as(&self, own: &[u8; 32], stored: &[u8; 32]) -> bool {
        own == stored
            || self
                .first_release_tokens
                .is_some_and(|tokens| self.hash_with(&tokens) == *stored)
    }

    fn hash_with(&self, tokens: &TokenCounts) -> [u8; 32] {
        let mut hash = PayloadHasher::default();
        hash.field(self.agent_id.as_bytes());
        hash.optional(&self.transaction_id);
        hash.optional(&self.service);
        hash.optional(&self.session_id);
        hash.optional(&self.request_id);
        hash.optional(&self.reservation_id);
        hash.field(self.provider.as_bytes());
        hash.field(self.model.as_bytes());
        hash.field(&self.occurred_at.timestamp_micros().to_le_bytes());
        let buckets = tokens.buckets();
        let (original, later) = buckets.split_at(ORIGINAL_CLASS_COUNT);
        for count in original {
            hash.field(&count.to_le_bytes());
        }
        // Classes added since the first release enter only when used, so an event stored
        // before they existed hashes as it did then and its retries stay DUPLICATE.
        if later.iter().any(|count| *count != 0) {
            for count in later {
                hash.field(&count.to_le_bytes());
            }
        }
        hash.field(&[self.usage_source as u8, self.status as u8]);
        hash.attributes(&self.attributes);
        hash.finish()
    }
}

/// SHA-256 over length-prefixed fields, so no two different payloads can encode alike.
#[derive(Default)]
pub struct PayloadHasher(Sha256);

impl PayloadHasher {
    pub fn field(&mut self, bytes: &[u8]) {
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    /// Absent and present-but-empty differ.
    pub fn optional(&mut self, value: &Option<String>) {
        match value {
            None => self.field(&[0]),
            Some(s) => self.field(&[&[1u8][..], s.as_bytes()].concat()),
        }
    }

    pub fn attributes(&mut self, attributes: &BTreeMap<String, String>) {
        self.field(&(attributes.len() as u64).to_le_bytes());
        for (key, value) in attributes {
            self.field(key.as_bytes());
            self.field(value.as_bytes());
        }
    }

    pub fn finish(self) -> [u8; 32] {
        self.0.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn tokens(counts: &[(TokenClass, i64)]) -> TokenCounts {
        let mut buckets = [0; crate::domain::tokens::CLASS_COUNT];
        for (class, n) in counts {
            buckets[class.index()] = *n;
        }
        TokenCounts::new(buckets).expect("tokens")
    }

    fn event() -> UsageEvent {
        UsageEvent {
            first_release_tokens: None,
            identity: EventIdentity {
                tenant_id: "t".into(),
                source: "s".into(),
                event_id: "e".into(),
            },
            agent_id: "a".into(),
            transaction_id: None,
            service: Some("food-delivery".into()),
            session_id: None,
            request_id: None,
            reservation_id: None,
            provider: "openai".into(),
            model: "gpt-4.1-mini".into(),
            occurred_at: Utc
                .timestamp_micros(1_780_000_000_000_000)
                .single()
                .expect("time"),
            tokens: tokens(&[(TokenClass::Input, 10), (TokenClass::Output, 5)]),
            usage_source: UsageSource::ProviderReported,
            status: CallStatus::Success,
            attributes: BTreeMap::new(),
        }
    }

    #[test]
    fn equal_payloads_hash_equal_and_any_field_change_changes_the_hash() {
        let base = event();
        assert_eq!(base.payload_hash(), event().payload_hash());

        let mut later = event();
        later.occurred_at += chrono::Duration::microseconds(1);
        let mut more = event();
        more.tokens = tokens(&[(TokenClass::Input, 11), (TokenClass::Output, 5)]);
        let mut written = event();
        written.tokens = tokens(&[
            (TokenClass::Input, 10),
            (TokenClass::Output, 5),
            (TokenClass::CacheWrite12h, 1),
        ]);
        let mut moved = event();
        moved.service = None;
        let mut empty_vs_absent = event();
        empty_vs_absent.transaction_id = Some(String::new());
        let mut attributed = event();
        attributed.attributes.insert("k".into(), "v".into());

        for changed in [later, more, written, moved, empty_vs_absent, attributed] {
            assert_ne!(base.payload_hash(), changed.payload_hash(), "{changed:?}");
        }
    }

    #[test]
    fn field_boundaries_are_part_of_the_hash() {
        let mut a = event();
        a.provider = "open".into();
        a.model = "aigpt".into();
        let mut b = event();
        b.provider = "openai".into();
        b.model = "gpt".into();

        assert_ne!(a.payload_hash(), b.payload_hash());
    }

    #[test]
    fn events_without_the_later_classes_hash_as_the_first_release_did() {
        let stored = event();
        // The first release's encoding: ten buckets, nothing after them.
        let mut hash = PayloadHasher::default();
        hash.field(b"a");
        hash.optional(&None);
        hash.optional(&Some("food-delivery".into()));
        hash.optional(&None);
        hash.optional(&None);
        hash.optional(&None);
        hash.field(b"openai");
        hash.field(b"gpt-4.1-mini");
        hash.field(&1_780_000_000_000_000_i64.to_le_bytes());
        for count in [10_i64, 0, 0, 0, 5, 0, 0, 0, 0, 0] {
            hash.field(&count.to_le_bytes());
        }
        hash.field(&[1, 1]);
        hash.attributes(&BTreeMap::new());

        assert_eq!(stored.payload_hash(), hash.finish());
    }

    #[test]
    fn the_first_difference_follows_the_proto_field_order() {
        let base = event();
        let mut later = event();
        later.occurred_at += chrono::Duration::microseconds(1);
        later.attributes.insert("k".into(), "v".into());
        let mut written = event();
        written.tokens = tokens(&[
            (TokenClass::Input, 10),
            (TokenClass::Output, 5),
            (TokenClass::CacheWrite30m, 3),
        ]);
        written.status = CallStatus::Error;
        let mut renamed = event();
        renamed.model = "gpt-4.1".into();
        renamed.tokens = written.tokens;

        assert_eq!(base.first_difference(&event()), None);
        assert_eq!(
            base.first_difference(&later).as_deref(),
            Some("occurred_at")
        );
        assert_eq!(
            base.first_difference(&written).as_deref(),
            Some("tokens.cache_write_30m")
        );
        assert_eq!(base.first_difference(&renamed).as_deref(), Some("model"));
    }
}

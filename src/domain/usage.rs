//! A validated usage event and its identity. The identity never includes the timestamp: a
//! retry carrying another `occurred_at` is a conflict, not a new event.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use super::tokens::TokenCounts;

/// Who reported the counts (proto `UsageSource`, default applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UsageSource {
    ProviderReported = 1,
    Estimated = 2,
}

/// How the model call ended (proto `UsageStatus`, default applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallStatus {
    Success = 1,
    Error = 2,
    Cancelled = 3,
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
    pub usage_source: UsageSource,
    pub status: CallStatus,
    pub attributes: BTreeMap<String, String>,
}

impl UsageEvent {
    /// SHA-256 over a length-prefixed encoding of every payload field, in a fixed order.
    /// Equal hashes mean a duplicate delivery; different ones a conflict.
    pub fn payload_hash(&self) -> [u8; 32] {
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
        for count in self.tokens.buckets() {
            hash.field(&count.to_le_bytes());
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

    fn event() -> UsageEvent {
        UsageEvent {
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
            tokens: TokenCounts::new([10, 0, 0, 0, 5, 0, 0, 0, 0, 0]).expect("tokens"),
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
        more.tokens = TokenCounts::new([11, 0, 0, 0, 5, 0, 0, 0, 0, 0]).expect("tokens");
        let mut moved = event();
        moved.service = None;
        let mut empty_vs_absent = event();
        empty_vs_absent.transaction_id = Some(String::new());
        let mut attributed = event();
        attributed.attributes.insert("k".into(), "v".into());

        for changed in [later, more, moved, empty_vs_absent, attributed] {
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
}

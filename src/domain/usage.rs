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
        let mut hasher = Sha256::new();
        let mut field = |bytes: &[u8]| {
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        };
        let optional = |value: &Option<String>| -> Vec<u8> {
            match value {
                None => vec![0],
                Some(s) => [&[1u8][..], s.as_bytes()].concat(),
            }
        };
        field(self.agent_id.as_bytes());
        field(&optional(&self.transaction_id));
        field(&optional(&self.service));
        field(&optional(&self.session_id));
        field(&optional(&self.request_id));
        field(&optional(&self.reservation_id));
        field(self.provider.as_bytes());
        field(self.model.as_bytes());
        field(&self.occurred_at.timestamp_micros().to_le_bytes());
        for count in self.tokens.buckets() {
            field(&count.to_le_bytes());
        }
        field(&[self.usage_source as u8, self.status as u8]);
        field(&(self.attributes.len() as u64).to_le_bytes());
        for (key, value) in &self.attributes {
            field(key.as_bytes());
            field(value.as_bytes());
        }
        hasher.finalize().into()
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

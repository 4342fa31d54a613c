//! Pure domain types and rules: no I/O, no clocks, no database. Adapters (gRPC, Kafka, store)
//! convert to and from these.

pub mod attribution;
pub mod auth;
pub mod exact;
pub mod invoice;
pub mod lease;
pub mod money;
pub mod normalize;
pub mod period;
pub mod pricing;
pub mod quota;
pub mod tenant;
pub mod tiers;
pub mod tokens;
pub mod transaction;
pub mod usage;

/// A validation failure pinned to one field of the input, e.g. `tokens.cache_read` /
/// `must not be negative`. Turned into a per-event INVALID result, an INVALID_ARGUMENT status
/// or a DLQ reason header by the adapters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The same error one level deeper, e.g. `tokens.input` → `events[3].tokens.input`.
    pub fn within(self, prefix: &str) -> Self {
        Self {
            field: format!("{prefix}.{}", self.field),
            reason: self.reason,
        }
    }
}

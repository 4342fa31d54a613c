//! tokenmeter meters LLM token usage for AI agents, enforces quotas before each model call,
//! bills tenants, and attributes token cost to the revenue of the service transactions agents
//! complete. See `DESIGN.md` (shared) for the contract and `README.md` for running it.

pub mod admin_http;
pub mod app;
pub mod billing;
pub mod cli;
pub mod config;
pub mod demo;
pub mod domain;
pub mod export;
pub mod export_cli;
pub mod fold;
pub mod grpc;
pub mod ingest;
pub mod kafka;
pub mod loadgen;
pub mod periodic;
pub mod pricebook_import;
pub mod quota;
pub mod store;
pub mod telemetry;

/// Code generated from `proto/tokenmeter/v1`.
pub mod proto {
    /// The `tokenmeter.v1` package.
    #[allow(clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("tokenmeter.v1");
    }

    /// A protobuf timestamp as a UTC instant, truncated to whole microseconds (the storage
    /// precision) so every path compares instants the same way.
    pub fn instant(
        ts: &prost_types::Timestamp,
        field: &str,
    ) -> Result<chrono::DateTime<chrono::Utc>, crate::domain::FieldError> {
        use crate::domain::FieldError;
        if !(0..1_000_000_000).contains(&ts.nanos) {
            return Err(FieldError::new(field, "nanos must be within 0..1e9"));
        }
        ts.seconds
            .checked_mul(1_000_000)
            .and_then(|s| s.checked_add(i64::from(ts.nanos / 1_000)))
            .and_then(chrono::DateTime::from_timestamp_micros)
            .ok_or_else(|| FieldError::new(field, "out of range"))
    }

    /// Encoded descriptors of the package, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("tokenmeter_descriptor");
}

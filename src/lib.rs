//! tokenmeter meters LLM token usage for AI agents, enforces quotas before each model call,
//! bills tenants, and attributes token cost to the revenue of the service transactions agents
//! complete. See `DESIGN.md` (shared) for the contract and `README.md` for running it.

pub mod admin_http;
pub mod app;
pub mod cli;
pub mod config;
pub mod domain;
pub mod grpc;
pub mod ingest;
pub mod kafka;
pub mod loadgen;
pub mod pricebook_import;
pub mod store;
pub mod telemetry;

/// Code generated from `proto/tokenmeter/v1`.
pub mod proto {
    /// The `tokenmeter.v1` package.
    #[allow(clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("tokenmeter.v1");
    }

    /// Encoded descriptors of the package, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("tokenmeter_descriptor");
}

//! Error → gRPC status, in one place, so every service answers with the same codes.

use tonic::Status;

use crate::domain::FieldError;
use crate::ingest::IngestError;
use crate::store::StoreError;

/// INVALID_ARGUMENT with the message `<field>: <reason>`.
pub fn invalid(error: FieldError) -> Status {
    Status::invalid_argument(error.to_string())
}

pub fn invalid_field(field: &str, reason: &str) -> Status {
    invalid(FieldError::new(field, reason))
}

pub fn from_store(error: StoreError) -> Status {
    match error {
        StoreError::NotFound(what) => Status::not_found(format!("{what} not found")),
        StoreError::AlreadyExists(what) => Status::already_exists(format!("{what} already exists")),
        StoreError::Invalid { field, reason } => {
            Status::invalid_argument(format!("{field}: {reason}"))
        }
        other => {
            // Details stay in the log; clients get a retryable code without internals.
            tracing::error!(error = %other, "storage failure");
            Status::unavailable("storage unavailable, retry with backoff")
        }
    }
}

pub fn from_ingest(error: IngestError) -> Status {
    match error {
        IngestError::Store(e) => from_store(e),
        IngestError::Group(reason) => {
            tracing::error!(error = %reason, "ingest group failed");
            Status::unavailable("storage unavailable, retry with backoff")
        }
        IngestError::Stopped => Status::unavailable("shutting down, retry on another instance"),
    }
}

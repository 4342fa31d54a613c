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
        // Not "retry with backoff": the same values would fail again.
        error if error.is_data_exception() => {
            let reason = match &error {
                StoreError::Query(e) => e
                    .as_database_error()
                    .map_or_else(|| e.to_string(), |d| d.message().to_owned()),
                other => other.to_string(),
            };
            Status::invalid_argument(format!("request: a value cannot be stored: {reason}"))
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

/// Turns tonic's OUT_OF_RANGE for a request above `grpc.max_message_bytes` into the
/// INVALID_ARGUMENT the API promises, naming the setting. tonic refuses such a request while
/// decoding it, before any service runs, and answers trailers-only, so the status is in the
/// response headers. Its own size errors start with "Error, decoded message length too large".
pub fn name_the_size_limit<B>(
    limit: usize,
) -> impl Fn(http::Response<B>) -> http::Response<B> + Clone {
    move |mut response| {
        let oversized = Status::from_header_map(response.headers()).is_some_and(|status| {
            status.code() == tonic::Code::OutOfRange
                && status
                    .message()
                    .starts_with("Error, decoded message length too large")
        });
        if oversized {
            let status = Status::invalid_argument(format!(
                "request message: larger than the limit of {limit} bytes (setting grpc.max_message_bytes)"
            ));
            let headers = response.headers_mut();
            headers.remove("grpc-status-details-bin");
            if let Err(e) = status.add_header(headers) {
                tracing::warn!(error = %e, "cannot rewrite an oversized-request status");
            }
        }
        response
    }
}

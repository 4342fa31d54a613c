//! Small proto ⇄ domain conversions shared by the services.

use chrono::{DateTime, Utc};
use prost_types::Timestamp;
use tonic::Status;

use super::status::invalid_field;
use crate::domain::tokens::TokenClass;

pub fn timestamp(at: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// A required timestamp, truncated to microseconds (storage precision).
pub fn required_time(value: Option<&Timestamp>, field: &str) -> Result<DateTime<Utc>, Status> {
    optional_time(value, field)?.ok_or_else(|| invalid_field(field, "is required"))
}

pub fn optional_time(
    value: Option<&Timestamp>,
    field: &str,
) -> Result<Option<DateTime<Utc>>, Status> {
    value
        .map(|ts| crate::proto::instant(ts, field).map_err(super::status::invalid))
        .transpose()
}

/// A token class enum value that must be set.
pub fn required_class(number: i32, field: &str) -> Result<TokenClass, Status> {
    TokenClass::from_proto(number).ok_or_else(|| invalid_field(field, "must be a token class"))
}

/// `page_size`: 0 → default 100, above 1000 clamped, negative rejected.
pub fn page_size(value: i32) -> Result<i64, Status> {
    match value {
        v if v < 0 => Err(invalid_field("page_size", "must not be negative")),
        0 => Ok(100),
        v => Ok(i64::from(v.min(1000))),
    }
}

/// Offset page tokens: `o<offset>`. Opaque to clients.
pub fn page_offset(token: &str) -> Result<i64, Status> {
    if token.is_empty() {
        return Ok(0);
    }
    token
        .strip_prefix('o')
        .and_then(|n| n.parse::<i64>().ok())
        .filter(|n| *n >= 0)
        .ok_or_else(|| invalid_field("page_token", "is not a token this server issued"))
}

pub fn next_page_token(offset: i64, returned: usize, page: i64) -> String {
    if i64::try_from(returned).unwrap_or(i64::MAX) < page {
        String::new()
    } else {
        format!("o{}", offset + page)
    }
}

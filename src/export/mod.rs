//! Finance exports (CSV, JSON Lines) and their manifests, shared by `tokenmeter export` and the
//! gRPC `ExportService`.
//!
//! Pure parts: [`schema`] (columns of each kind), [`encode`] (rows → bytes → chunks, SHA-256),
//! [`manifest`] (control totals, the manifest) and [`watermark`] (what "since" means, and why
//! it is exact under concurrent commits). [`run`] is the one place that reads Postgres (through
//! `store::exports` and `store::attribution`) and feeds those parts; the CLI and gRPC adapters
//! only parse requests and deliver chunks.

pub mod encode;
pub mod manifest;
pub mod run;
pub mod schema;
pub mod watermark;

use chrono::{DateTime, Utc};

use crate::domain::attribution::Grouping;
use crate::domain::invoice::InvoiceState;
use crate::domain::period::PeriodLabel;
use encode::Format;
use schema::Schema;
use watermark::Watermark;

/// The time span an export covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// Each tenant's billing period with this label (in `time_zone` when one is given).
    Period(PeriodLabel),
    /// `[start, end)`, the same for every tenant.
    Span {
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    },
}

impl Range {
    /// The part of a file name naming the range: `2026-03` or `20260301T000000Z-20260401T000000Z`.
    pub fn file_label(&self) -> String {
        match self {
            Range::Period(label) => label.to_string(),
            Range::Span { start, end } => format!(
                "{}-{}",
                start.format("%Y%m%dT%H%M%SZ"),
                end.format("%Y%m%dT%H%M%SZ")
            ),
        }
    }
}

/// What every export selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub range: Range,
    /// `None`: every tenant.
    pub tenants: Option<Vec<String>>,
    pub format: Format,
    pub since: Option<Watermark>,
    pub until: Option<Watermark>,
    /// Cuts periods and buckets; `None`: each tenant's billing time zone.
    pub time_zone: Option<String>,
}

/// Usage buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    /// One bucket per tenant: the start of its range.
    Whole,
    Hour,
    Day,
    Month,
}

impl Bucket {
    /// The `date_trunc` unit; `None` for [`Bucket::Whole`].
    pub const fn unit(self) -> Option<&'static str> {
        match self {
            Bucket::Whole => None,
            Bucket::Hour => Some("hour"),
            Bucket::Day => Some("day"),
            Bucket::Month => Some("month"),
        }
    }
}

/// Optional dimension and list filters of usage and attribution rows; empty lists match all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filters {
    pub agent_ids: Vec<String>,
    pub services: Vec<String>,
    pub providers: Vec<String>,
    pub models: Vec<String>,
    pub transaction_ids: Vec<String>,
}

/// Which usage dimensions rows keep apart (tenant always; the others when set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageGrouping {
    pub agent: bool,
    pub transaction: bool,
    pub service: bool,
    pub provider: bool,
    pub model: bool,
}

impl UsageGrouping {
    /// The full rollup key.
    pub const ALL: UsageGrouping = UsageGrouping {
        agent: true,
        transaction: true,
        service: true,
        provider: true,
        model: true,
    };
}

/// The rows of one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rows {
    Invoices {
        states: Vec<InvoiceState>,
    },
    InvoiceLines {
        states: Vec<InvoiceState>,
    },
    Usage {
        raw_events: bool,
        bucket: Bucket,
        grouping: UsageGrouping,
        filters: Filters,
    },
    Attribution {
        bucket: Bucket,
        /// Tenant is always grouped, so a changed tenant's rows can supersede earlier ones.
        grouping: Grouping,
        filters: Filters,
    },
    Transactions {
        lifecycle_events: bool,
    },
}

impl Rows {
    pub fn schema(&self) -> Schema {
        match self {
            Rows::Invoices { .. } => schema::INVOICES,
            Rows::InvoiceLines { .. } => schema::INVOICE_LINES,
            Rows::Usage {
                raw_events: true, ..
            } => schema::USAGE_EVENTS,
            Rows::Usage { .. } => schema::USAGE,
            Rows::Attribution { .. } => schema::ATTRIBUTION,
            Rows::Transactions {
                lifecycle_events: true,
            } => schema::TRANSACTION_EVENTS,
            Rows::Transactions { .. } => schema::TRANSACTIONS,
        }
    }
}

/// The invoice states exported when none are asked for: drafts are live, so exporting them
/// would not be reproducible.
pub fn default_states(states: Vec<InvoiceState>) -> Vec<InvoiceState> {
    if states.is_empty() {
        vec![InvoiceState::Finalized, InvoiceState::Void]
    } else {
        states
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest {
    pub rows: Rows,
    pub selection: Selection,
}

impl ExportRequest {
    /// The data file's deterministic name, e.g. `invoice_lines-2026-03.csv`.
    pub fn file_name(&self) -> String {
        format!(
            "{}-{}.{}",
            self.rows.schema().stem,
            self.selection.range.file_label(),
            self.selection.format.extension()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_deterministic_and_carry_no_path_separator() {
        let request = ExportRequest {
            rows: Rows::InvoiceLines { states: vec![] },
            selection: Selection {
                range: Range::Period(PeriodLabel::new(2026, 3).unwrap()),
                tenants: None,
                format: Format::Csv,
                since: None,
                until: None,
                time_zone: None,
            },
        };
        assert_eq!(request.file_name(), "invoice_lines-2026-03.csv");

        let span = ExportRequest {
            rows: Rows::Transactions {
                lifecycle_events: true,
            },
            selection: Selection {
                range: Range::Span {
                    start: "2026-03-01T00:00:00Z".parse().unwrap(),
                    end: "2026-03-02T12:00:00Z".parse().unwrap(),
                },
                format: Format::Jsonl,
                ..request.selection
            },
        };
        assert_eq!(
            span.file_name(),
            "transaction_events-20260301T000000Z-20260302T120000Z.jsonl"
        );
        assert!(!span.file_name().contains('/'));
    }
}

//! The row schema of every export: column names and types in file order, the currency column
//! and the amount columns the manifest totals. Bump a schema's `version` on any incompatible
//! change of its columns.

/// What a column holds; how the store reads it and how it is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Text,
    OptText,
    Int,
    OptInt,
    /// An exact decimal, written as a string.
    Amount,
    OptAmount,
    Time,
    OptTime,
    /// A stored token class number, written as its name ("" when 0, i.e. not a token line).
    TokenClass,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    pub name: &'static str,
    pub ty: Type,
}

const fn c(name: &'static str, ty: Type) -> Column {
    Column { name, ty }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Invoices,
    InvoiceLines,
    Usage,
    Attribution,
    Transactions,
}

impl Kind {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "invoices" => Some(Kind::Invoices),
            "invoice-lines" | "invoice_lines" => Some(Kind::InvoiceLines),
            "usage" => Some(Kind::Usage),
            "attribution" => Some(Kind::Attribution),
            "transactions" => Some(Kind::Transactions),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Invoices => "invoices",
            Kind::InvoiceLines => "invoice_lines",
            Kind::Usage => "usage",
            Kind::Attribution => "attribution",
            Kind::Transactions => "transactions",
        }
    }
}

/// One exported row shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schema {
    pub kind: Kind,
    /// The file name stem, e.g. `invoice_lines` in `invoice_lines-2026-03.csv`.
    pub stem: &'static str,
    pub columns: &'static [Column],
    /// The column that names each row's currency.
    pub currency: &'static str,
    /// The amount columns summed per currency in the manifest.
    pub totals: &'static [&'static str],
    pub version: i32,
}

impl Schema {
    pub fn names(&self) -> Vec<&'static str> {
        self.columns.iter().map(|c| c.name).collect()
    }

    pub fn index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use super::encode::Cell;
use crate::domain::attribution;
use Type::*;

pub const INVOICES: Schema = Schema {
    kind: Kind::Invoices,
    stem: "invoices",
    columns: &[
        c("tenant_id", Text),
        c("invoice_id", Text),
        c("number", OptText),
        c("state", Text),
        c("period", Text),
        c("period_start", Time),
        c("period_end", Time),
        c("currency", Text),
        c("subtotal", Amount),
        c("discount", Amount),
        c("tax", Amount),
        c("credit", Amount),
        c("total", Amount),
        c("tax_rate_percent", OptAmount),
        c("line_count", Int),
        c("unpriced_event_count", Int),
        c("unpriced_tokens", Int),
        c("finalized_at", OptTime),
        c("voided_at", OptTime),
        c("void_reason", OptText),
        c("replacement_invoice_id", OptText),
        c("replaces_invoice_id", OptText),
    ],
    currency: "currency",
    totals: &["subtotal", "discount", "tax", "credit", "total"],
    version: 1,
};

pub const INVOICE_LINES: Schema = Schema {
    kind: Kind::InvoiceLines,
    stem: "invoice_lines",
    columns: &[
        c("tenant_id", Text),
        c("invoice_id", Text),
        c("invoice_number", OptText),
        c("invoice_state", Text),
        c("period", Text),
        c("period_start", Time),
        c("period_end", Time),
        c("currency", Text),
        c("line_no", Int),
        c("kind", Text),
        c("description", Text),
        c("provider", Text),
        c("model", Text),
        c("token_class", TokenClass),
        c("quantity", Int),
        c("unit_price", Amount),
        c("precise_amount", Amount),
        c("amount", Amount),
        c("tier_from_tokens", OptInt),
        c("tier_up_to_tokens", OptInt),
        c("original_period", OptText),
        c("list_unit_price", OptAmount),
        c("discount_percent", OptAmount),
        c("tax_rate_percent", OptAmount),
        c("base_amount", OptAmount),
        c("price_book_version_id", OptText),
        c("override_id", OptText),
    ],
    currency: "currency",
    totals: &["amount"],
    version: 1,
};

/// Token columns shared by the usage and attribution rows, in TokenClass order. Version 2 of
/// those schemas added the OpenAI cache-write classes (`cache_write_30m`, `cache_write_12h`).
macro_rules! token_columns {
    () => {
        [
            c("input", Int),
            c("cache_read", Int),
            c("cache_write_5m", Int),
            c("cache_write_1h", Int),
            c("output", Int),
            c("reasoning", Int),
            c("input_audio", Int),
            c("output_audio", Int),
            c("input_image", Int),
            c("output_image", Int),
            c("cache_write_30m", Int),
            c("cache_write_12h", Int),
        ]
    };
}

const fn concat<const A: usize, const B: usize, const C: usize, const N: usize>(
    a: [Column; A],
    b: [Column; B],
    c: [Column; C],
) -> [Column; N] {
    let mut out = [Column { name: "", ty: Text }; N];
    let mut i = 0;
    while i < A {
        out[i] = a[i];
        i += 1;
    }
    while i < A + B {
        out[i] = b[i - A];
        i += 1;
    }
    while i < N {
        out[i] = c[i - A - B];
        i += 1;
    }
    out
}

const USAGE_COLUMNS: [Column; 26] = concat(
    [
        c("bucket_start", Time),
        c("tenant_id", Text),
        c("agent_id", Text),
        c("transaction_id", Text),
        c("service", Text),
        c("provider", Text),
        c("model", Text),
        c("currency", Text),
    ],
    token_columns!(),
    [
        c("total_tokens", Int),
        c("events", Int),
        c("unpriced_events", Int),
        c("unpriced_tokens", Int),
        c("billed_amount", Amount),
        c("cost_amount", Amount),
    ],
);

/// Rollup-style rows: Σ of the events ingested in the export's window, per group and bucket.
pub const USAGE: Schema = Schema {
    kind: Kind::Usage,
    stem: "usage",
    columns: &USAGE_COLUMNS,
    currency: "currency",
    totals: &["billed_amount", "cost_amount"],
    version: 2,
};

const USAGE_EVENT_COLUMNS: [Column; 33] = concat(
    [
        c("tenant_id", Text),
        c("source", Text),
        c("event_id", Text),
        c("occurred_at", Time),
        c("ingested_at", Time),
        c("agent_id", Text),
        c("transaction_id", OptText),
        c("service", OptText),
        c("session_id", OptText),
        c("request_id", OptText),
        c("provider", Text),
        c("model", Text),
    ],
    token_columns!(),
    [
        c("currency", Text),
        c("billed_amount", Amount),
        c("cost_amount", Amount),
        c("unpriced_tokens", Int),
        c("price_book_version_id", OptText),
        c("channel", Text),
        c("attributes", Text),
        c("status", Int),
        c("usage_source", Int),
    ],
);

/// Raw accepted events, one row each.
pub const USAGE_EVENTS: Schema = Schema {
    kind: Kind::Usage,
    stem: "usage_events",
    columns: &USAGE_EVENT_COLUMNS,
    currency: "currency",
    totals: &["billed_amount", "cost_amount"],
    version: 2,
};

const ATTRIBUTION_COLUMNS: [Column; 45] = concat(
    [
        c("bucket_start", Time),
        c("bucket_end", Time),
        c("tenant_id", OptText),
        c("agent_id", OptText),
        c("service", OptText),
        c("provider", OptText),
        c("model", OptText),
        c("currency", Text),
        c("transactions_started", Int),
        c("transactions_completed", Int),
        c("transactions_failed", Int),
        c("transactions_refunded", Int),
        c("transactions_reversed", Int),
        c("revenue", Amount),
        c("refunds", Amount),
        c("net_revenue", Amount),
    ],
    token_columns!(),
    [
        c("total_tokens", Int),
        c("spend", Amount),
        c("cost", Amount),
        c("usage_event_count", Int),
        c("unpriced_event_count", Int),
        c("spend_to_revenue", OptAmount),
        c("cost_to_revenue", OptAmount),
        c("gross_margin", Amount),
        c("token_margin", Amount),
        c("tokens_per_completed_transaction", OptAmount),
        c("spend_per_completed_transaction", OptAmount),
        c("cost_per_completed_transaction", OptAmount),
        c("revenue_per_1k_tokens", OptAmount),
        c("failed_spend", Amount),
        c("refunded_spend", Amount),
        c("unattributed_spend", Amount),
        c("unattributed_tokens", Int),
    ],
);

pub const ATTRIBUTION: Schema = Schema {
    kind: Kind::Attribution,
    stem: "attribution",
    columns: &ATTRIBUTION_COLUMNS,
    currency: "currency",
    totals: &["net_revenue", "spend", "cost"],
    version: 2,
};

/// One row per lifecycle event.
pub const TRANSACTION_EVENTS: Schema = Schema {
    kind: Kind::Transactions,
    stem: "transaction_events",
    columns: &[
        c("tenant_id", Text),
        c("transaction_id", Text),
        c("occurred_at", Time),
        c("kind", Text),
        c("source", Text),
        c("event_id", Text),
        c("agent_id", OptText),
        c("service", OptText),
        c("currency", OptText),
        c("revenue", OptAmount),
        c("refund", OptAmount),
        c("reason", Text),
        c("channel", Text),
        c("ingested_at", Time),
    ],
    currency: "currency",
    totals: &["revenue", "refund"],
    version: 1,
};

/// One row per transaction, summarizing its events.
pub const TRANSACTIONS: Schema = Schema {
    kind: Kind::Transactions,
    stem: "transactions",
    columns: &[
        c("tenant_id", Text),
        c("transaction_id", Text),
        c("state", Text),
        c("agent_id", OptText),
        c("service", OptText),
        c("currency", OptText),
        c("revenue", Amount),
        c("refunds", Amount),
        c("net_revenue", Amount),
        c("first_event_at", Time),
        c("last_event_at", Time),
        c("event_count", Int),
    ],
    currency: "currency",
    totals: &["revenue", "refunds", "net_revenue"],
    version: 1,
};

/// An attribution row in [`ATTRIBUTION`] column order.
pub fn attribution_cells(
    key: &attribution::RowKey,
    row: &attribution::Row,
    bucket_end: DateTime<Utc>,
) -> Vec<Cell> {
    let text = |value: &Option<String>| value.clone().map_or(Cell::Null, Cell::Text);
    let ratio = |value: Option<Decimal>| value.map_or(Cell::Null, Cell::Amount);
    let mut cells = vec![
        Cell::Time(key.bucket),
        Cell::Time(bucket_end),
        text(&key.tenant_id),
        text(&key.agent_id),
        text(&key.service),
        text(&key.provider),
        text(&key.model),
        Cell::Text(key.currency.clone()),
        Cell::Int(row.started),
        Cell::Int(row.completed),
        Cell::Int(row.failed),
        Cell::Int(row.refunded),
        Cell::Int(row.reversed),
        Cell::Amount(row.revenue),
        Cell::Amount(row.refunds),
        Cell::Amount(row.net_revenue()),
    ];
    cells.extend(row.tokens.iter().map(|t| Cell::Int(*t)));
    cells.extend([
        Cell::Int(row.total_tokens()),
        Cell::Amount(row.spend),
        Cell::Amount(row.cost),
        Cell::Int(row.usage_events),
        Cell::Int(row.unpriced_events),
        ratio(row.spend_to_revenue()),
        ratio(row.cost_to_revenue()),
        Cell::Amount(row.gross_margin()),
        Cell::Amount(row.token_margin()),
        ratio(row.tokens_per_completed()),
        ratio(row.spend_per_completed()),
        ratio(row.cost_per_completed()),
        ratio(row.revenue_per_1k_tokens()),
        Cell::Amount(row.failed_spend),
        Cell::Amount(row.refunded_spend),
        Cell::Amount(row.unattributed_spend),
        Cell::Int(row.unattributed_tokens),
    ]);
    cells
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attribution_row_has_one_cell_per_column() {
        let key = attribution::RowKey {
            bucket: Utc::now(),
            tenant_id: Some("t".into()),
            agent_id: None,
            service: None,
            provider: None,
            model: None,
            currency: "USD".into(),
        };
        let cells = attribution_cells(&key, &attribution::Row::default(), Utc::now());
        assert_eq!(cells.len(), ATTRIBUTION.columns.len());
        let net = ATTRIBUTION.index("net_revenue").unwrap();
        assert_eq!(cells[net], Cell::Amount(Decimal::ZERO));
    }

    #[test]
    fn every_schema_names_its_currency_and_totals_among_its_columns_once() {
        for schema in [
            INVOICES,
            INVOICE_LINES,
            USAGE,
            USAGE_EVENTS,
            ATTRIBUTION,
            TRANSACTION_EVENTS,
            TRANSACTIONS,
        ] {
            let names = schema.names();
            let unique: std::collections::BTreeSet<_> = names.iter().collect();
            assert_eq!(unique.len(), names.len(), "{}", schema.stem);
            assert!(names.iter().all(|n| !n.is_empty()), "{}", schema.stem);
            assert!(schema.index(schema.currency).is_some(), "{}", schema.stem);
            for total in schema.totals {
                let i = schema.index(total).expect(total);
                assert!(matches!(
                    schema.columns[i].ty,
                    Type::Amount | Type::OptAmount
                ));
            }
        }
    }
}

//! The manifest of an export (what `manifest.json` holds and the gRPC stream ends with), and
//! its control totals: Σ of each amount column per currency, exact.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::encode::{Cell, FileSummary};
use super::schema::Schema;

/// Σ per (currency, column), ordered by currency then column.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    sums: BTreeMap<(String, &'static str), Decimal>,
}

impl Totals {
    /// Adds one row's amounts; rows without a currency (a transaction's start) or cells
    /// without an amount add nothing.
    pub fn add(&mut self, schema: &Schema, cells: &[Cell]) {
        let currency = match schema.index(schema.currency).and_then(|i| cells.get(i)) {
            Some(Cell::Text(code)) if !code.is_empty() => code,
            _ => return,
        };
        for column in schema.totals {
            if let Some(Cell::Amount(amount)) = schema.index(column).and_then(|i| cells.get(i)) {
                *self
                    .sums
                    .entry((currency.clone(), *column))
                    .or_insert(Decimal::ZERO) += *amount;
            }
        }
    }

    pub fn into_list(self) -> Vec<Total> {
        self.sums
            .into_iter()
            .map(|((currency, column), amount)| Total {
                currency,
                column: column.to_owned(),
                amount,
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Total {
    pub currency: String,
    pub column: String,
    /// A decimal string in JSON.
    pub amount: Decimal,
}

/// The selection as resolved: period or range, tenants, time zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedSelection {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub period: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub start: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub end: Option<DateTime<Utc>>,
    pub tenant_ids: Vec<String>,
    /// Empty: each tenant's billing time zone.
    pub time_zone: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// `invoices`, `invoice_lines`, `usage`, `attribution` or `transactions`.
    pub kind: String,
    /// `csv` or `jsonl`.
    pub format: String,
    pub row_count: u64,
    pub files: Vec<FileSummary>,
    pub totals: Vec<Total>,
    pub watermark: String,
    pub since_watermark: String,
    pub selection: ResolvedSelection,
    pub columns: Vec<String>,
    pub schema_version: i32,
    pub generated_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::schema::INVOICES;

    fn invoice(currency: &str, total: &str) -> Vec<Cell> {
        INVOICES
            .columns
            .iter()
            .map(|c| match c.name {
                "currency" => Cell::Text(currency.into()),
                "total" | "subtotal" => Cell::Amount(total.parse().unwrap()),
                "discount" | "tax" | "credit" => Cell::Amount(Decimal::ZERO),
                _ => Cell::Null,
            })
            .collect()
    }

    #[test]
    fn totals_are_exact_per_currency_and_ordered_by_currency_then_column() {
        let mut totals = Totals::default();
        for (currency, total) in [
            ("USD", "0.10"),
            ("EUR", "3.00"),
            ("USD", "0.20"),
            ("USD", "0.000001"),
        ] {
            totals.add(&INVOICES, &invoice(currency, total));
        }

        let list = totals.into_list();
        let got: Vec<(String, String, String)> = list
            .iter()
            .map(|t| (t.currency.clone(), t.column.clone(), t.amount.to_string()))
            .collect();
        assert_eq!(got[0], ("EUR".into(), "credit".into(), "0".into()));
        assert!(got.contains(&("EUR".into(), "total".into(), "3.00".into())));
        // 0.1 + 0.2 is 0.3 here, not 0.30000000000000004.
        assert!(got.contains(&("USD".into(), "total".into(), "0.300001".into())));
        assert_eq!(got.len(), 10);
    }
}

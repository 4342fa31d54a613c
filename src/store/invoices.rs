//! SQL of invoices, their lines, what finalized invoices billed, and invoice numbering.
//!
//! Finalized rows are immutable by trigger (migration 0004); this module only ever inserts
//! their children while the invoice is still a draft, in the transaction that finalizes it.

use std::collections::HashMap;

use chrono::{DateTime, Datelike, Utc};
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool, Row};

use super::StoreError;
use crate::domain::exact::Precise;
use crate::domain::invoice::{
    BilledUsage, Charge, ComputedInvoice, InvoiceState, Line, LineKind, Terms,
};
use crate::domain::period::{BillingPeriod, PeriodLabel};
use crate::domain::pricing::RateKey;
use crate::domain::tenant::RoundingMode;
use crate::domain::tokens::TokenClass;

/// An invoice as stored. `lines` is empty unless they were asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoiceRecord {
    pub invoice_id: String,
    pub tenant_id: String,
    pub state: InvoiceState,
    pub number: Option<String>,
    pub period: BillingPeriod,
    pub currency: String,
    pub currency_exponent: i16,
    pub rounding_mode: RoundingMode,
    pub subtotal: Decimal,
    pub discount: Decimal,
    pub tax: Decimal,
    pub credit: Decimal,
    pub total: Decimal,
    pub tax_rate_percent: Option<Decimal>,
    pub unpriced_event_count: i64,
    pub unpriced_tokens: i64,
    pub line_count: i32,
    pub created_at: DateTime<Utc>,
    pub computed_at: DateTime<Utc>,
    pub finalized_at: Option<DateTime<Utc>>,
    pub voided_at: Option<DateTime<Utc>>,
    pub void_reason: Option<String>,
    pub replacement_invoice_id: Option<String>,
    pub replaces_invoice_id: Option<String>,
    pub lines: Vec<Line>,
}

const COLUMNS: &str = "invoice_id, tenant_id, state, number, period_label, period_start, period_end, \
     currency::text AS currency, currency_exponent, rounding_mode, subtotal, discount, tax, credit, total, \
     tax_rate_percent, unpriced_event_count, unpriced_tokens, line_count, created_at, computed_at, \
     finalized_at, voided_at, void_reason, replacement_invoice_id, replaces_invoice_id";

fn period_of(
    label: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Result<BillingPeriod, StoreError> {
    let label = PeriodLabel::parse(label, "period_label").map_err(|e| StoreError::Invalid {
        field: e.field,
        reason: e.reason,
    })?;
    Ok(BillingPeriod { label, start, end })
}

fn from_row(row: &sqlx::postgres::PgRow) -> Result<InvoiceRecord, StoreError> {
    let state: String = row.try_get("state")?;
    let rounding: String = row.try_get("rounding_mode")?;
    let label: String = row.try_get("period_label")?;
    Ok(InvoiceRecord {
        invoice_id: row.try_get("invoice_id")?,
        tenant_id: row.try_get("tenant_id")?,
        state: InvoiceState::parse(&state).unwrap_or(InvoiceState::Draft),
        number: row.try_get("number")?,
        period: period_of(
            &label,
            row.try_get("period_start")?,
            row.try_get("period_end")?,
        )?,
        currency: row.try_get("currency")?,
        currency_exponent: row.try_get("currency_exponent")?,
        rounding_mode: RoundingMode::parse(&rounding).unwrap_or(RoundingMode::HalfEven),
        subtotal: row.try_get("subtotal")?,
        discount: row.try_get("discount")?,
        tax: row.try_get("tax")?,
        credit: row.try_get("credit")?,
        total: row.try_get("total")?,
        tax_rate_percent: row.try_get("tax_rate_percent")?,
        unpriced_event_count: row.try_get("unpriced_event_count")?,
        unpriced_tokens: row.try_get("unpriced_tokens")?,
        line_count: row.try_get("line_count")?,
        created_at: row.try_get("created_at")?,
        computed_at: row.try_get("computed_at")?,
        finalized_at: row.try_get("finalized_at")?,
        voided_at: row.try_get("voided_at")?,
        void_reason: row.try_get("void_reason")?,
        replacement_invoice_id: row.try_get("replacement_invoice_id")?,
        replaces_invoice_id: row.try_get("replaces_invoice_id")?,
        lines: Vec::new(),
    })
}

/// Where usage is read for one slot (a stretch of constant pricing of one period): whole
/// hours from the rollups (with the raw events of batches not folded yet), and the partial
/// hours at its edges from the raw events, so periods in zones with half-hour offsets and
/// prices that change mid-hour are still cut exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRange {
    pub slot: i32,
    pub tenant_id: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    /// Read the raw events (partial hours) instead of the hourly rollups.
    pub raw: bool,
}

/// Tokens of one (slot, rate key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotQuantity {
    pub slot: i32,
    pub key: RateKey,
    pub tokens: i64,
    /// Event × class pairs.
    pub events: i64,
}

type QuantityRow = (i32, String, String, i16, i64, i64);

/// Range columns bound as arrays: slot, tenant, start, end.
type RangeColumns<'a> = (
    Vec<i32>,
    Vec<&'a str>,
    Vec<DateTime<Utc>>,
    Vec<DateTime<Utc>>,
);

fn columns<'a>(list: &[&'a UsageRange]) -> RangeColumns<'a> {
    (
        list.iter().map(|r| r.slot).collect(),
        list.iter().map(|r| r.tenant_id.as_str()).collect(),
        list.iter().map(|r| r.start).collect(),
        list.iter().map(|r| r.end).collect(),
    )
}

/// Token quantities per (slot, provider, model, class) in one statement, so in one snapshot:
/// whole-hour ranges from the rollups plus the raw rows of batches not folded yet, `raw`
/// ranges (partial hours) from raw rows.
pub async fn quantities(
    conn: &mut PgConnection,
    ranges: &[UsageRange],
) -> Result<Vec<SlotQuantity>, StoreError> {
    let (raw, rolled): (Vec<&UsageRange>, Vec<&UsageRange>) = ranges.iter().partition(|r| r.raw);
    let (r_slot, r_tenant, r_start, r_end) = columns(&rolled);
    let (e_slot, e_tenant, e_start, e_end) = columns(&raw);
    // Raw rows of batches still queued, read by batch (bounded by the queue; OFFSET 0 keeps
    // the tenant join out of it, which would read a tenant's whole period instead).
    let queued = match super::fold::oldest_queued(&mut *conn).await? {
        None => String::new(),
        Some(oldest) => format!(
            "UNION ALL
               SELECT r.slot, v.*
               FROM (SELECT * FROM usage_events e WHERE {} OFFSET 0) AS v
               JOIN r ON v.tenant_id = r.tenant_id COLLATE \"C\" AND v.occurred_at >= r.start_at
                     AND v.occurred_at < r.end_at",
            super::reports::queued_since(oldest)
        ),
    };
    let rows: Vec<QuantityRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "WITH r AS (SELECT * FROM unnest($1::int4[], $2::text[], $3::timestamptz[], $4::timestamptz[])
                    AS r(slot, tenant_id, start_at, end_at)),
              e AS (SELECT * FROM unnest($5::int4[], $6::text[], $7::timestamptz[], $8::timestamptz[])
                    AS e(slot, tenant_id, start_at, end_at))
         SELECT r.slot, u.provider::text, u.model::text, u.token_class, sum(u.tokens)::int8,
                sum(u.class_events)::int8
         FROM r JOIN usage_rollups u
           ON u.tenant_id = r.tenant_id COLLATE \"C\" AND u.hour >= r.start_at AND u.hour < r.end_at
         WHERE u.tokens > 0
         GROUP BY 1, 2, 3, 4
         UNION ALL
         SELECT v.slot, v.provider, v.model, c.token_class, sum(c.tokens)::int8, count(*)::int8
         FROM (SELECT e.slot, v.* FROM e JOIN usage_events v
                 ON v.tenant_id = e.tenant_id COLLATE \"C\" AND v.occurred_at >= e.start_at
                    AND v.occurred_at < e.end_at
               {queued}) AS v
         CROSS JOIN LATERAL (VALUES (1::int2, v.input), (2::int2, v.cache_read),
                (3::int2, v.cache_write_5m), (4::int2, v.cache_write_1h), (5::int2, v.output),
                (6::int2, v.reasoning), (7::int2, v.input_audio), (8::int2, v.output_audio),
                (9::int2, v.input_image), (10::int2, v.output_image),
                (11::int2, v.cache_write_30m), (12::int2, v.cache_write_12h)) AS c(token_class, tokens)
         WHERE c.tokens > 0
         GROUP BY 1, 2, 3, 4"
    )))
    .bind(r_slot)
    .bind(r_tenant)
    .bind(r_start)
    .bind(r_end)
    .bind(e_slot)
    .bind(e_tenant)
    .bind(e_start)
    .bind(e_end)
    // Not prepared for reuse: the tail's bound is part of the text.
    .persistent(false)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(slot, provider, model, class, tokens, events)| {
            Some(SlotQuantity {
                slot,
                key: RateKey {
                    provider,
                    model,
                    class: TokenClass::from_proto(i32::from(class))?,
                },
                tokens,
                events,
            })
        })
        .collect())
}

/// Which of these (tenant, start, end) have usage in their range, folded or still queued.
pub async fn tenants_with_usage(
    conn: &mut PgConnection,
    ranges: &[(String, DateTime<Utc>, DateTime<Utc>)],
) -> Result<std::collections::HashSet<String>, StoreError> {
    let rows: Vec<String> = sqlx::query_scalar(
        "SELECT r.tenant_id FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[])
             AS r(tenant_id, start_at, end_at)
         WHERE EXISTS (SELECT 1 FROM usage_rollups u
                       WHERE u.tenant_id = r.tenant_id COLLATE \"C\"
                         AND u.hour >= date_trunc('hour', r.start_at, 'UTC') AND u.hour < r.end_at)
            OR EXISTS (SELECT 1 FROM usage_events v
                       WHERE v.tenant_id = r.tenant_id COLLATE \"C\"
                         AND v.occurred_at >= r.start_at AND v.occurred_at < r.end_at
                         AND v.ingest_batch IN (SELECT ingest_batch FROM fold_queue))",
    )
    .bind(ranges.iter().map(|r| r.0.as_str()).collect::<Vec<_>>())
    .bind(ranges.iter().map(|r| r.1).collect::<Vec<_>>())
    .bind(ranges.iter().map(|r| r.2).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().collect())
}

/// A period of a tenant that has a finalized (or voided) invoice: later usage of a finalized
/// period is adjusted against it, and a voided one may have been partly billed elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosedPeriod {
    pub tenant_id: String,
    pub period: BillingPeriod,
    /// `false`: only void invoices exist for it (its replacement is still a draft).
    pub finalized: bool,
}

/// tenant, label, start, end, finalized
type ClosedRow = (String, String, DateTime<Utc>, DateTime<Utc>, bool);

/// Periods of these tenants (in `currency` each) with a finalized or void invoice, starting at
/// or after `since` (older usage cannot arrive: ingest rejects events beyond retention).
pub async fn closed_periods(
    conn: &mut PgConnection,
    tenants: &[(String, String)],
    since: DateTime<Utc>,
) -> Result<Vec<ClosedPeriod>, StoreError> {
    let rows: Vec<ClosedRow> = sqlx::query_as(
        "SELECT i.tenant_id, i.period_label, min(i.period_start), min(i.period_end),
                bool_or(i.state = 'finalized')
         FROM unnest($1::text[], $2::text[]) AS t(tenant_id, currency)
         JOIN invoices i ON i.tenant_id = t.tenant_id AND i.currency = t.currency
         WHERE i.state <> 'draft' AND i.period_start >= $3
         GROUP BY 1, 2",
    )
    .bind(tenants.iter().map(|t| t.0.as_str()).collect::<Vec<_>>())
    .bind(tenants.iter().map(|t| t.1.as_str()).collect::<Vec<_>>())
    .bind(since)
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter()
        .map(|(tenant_id, label, start, end, finalized)| {
            Ok(ClosedPeriod {
                tenant_id,
                period: period_of(&label, start, end)?,
                finalized,
            })
        })
        .collect()
}

/// What finalized (non-void) invoices billed for each (tenant, period label) asked, per rate
/// key. Asked by exact pairs, so the lookup follows the (tenant, period) index however large
/// the table has grown since it was last analyzed.
pub async fn billed(
    conn: &mut PgConnection,
    pairs: &[(String, String)],
) -> Result<HashMap<(String, String), HashMap<RateKey, Charge>>, StoreError> {
    let mut out: HashMap<(String, String), HashMap<RateKey, Charge>> = HashMap::new();
    if pairs.is_empty() {
        return Ok(out);
    }
    let rows: Vec<(String, String, String, String, i16, i64, Precise)> = sqlx::query_as(
        "SELECT b.tenant_id, b.period_label, b.provider, b.model, b.token_class,
                sum(b.quantity)::int8, sum(b.amount)
         FROM unnest($1::text[], $2::text[]) AS p(tenant_id, period_label)
         CROSS JOIN LATERAL (
             SELECT * FROM invoice_billed_usage b
             WHERE b.tenant_id = p.tenant_id AND b.period_label = p.period_label) AS b
         JOIN invoices i ON i.invoice_id = b.invoice_id
         WHERE i.state = 'finalized'
         GROUP BY 1, 2, 3, 4, 5",
    )
    .bind(pairs.iter().map(|p| p.0.as_str()).collect::<Vec<_>>())
    .bind(pairs.iter().map(|p| p.1.as_str()).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await?;
    for (tenant_id, label, provider, model, class, quantity, amount) in rows {
        let Some(class) = TokenClass::from_proto(i32::from(class)) else {
            continue;
        };
        out.entry((tenant_id, label)).or_default().insert(
            RateKey {
                provider,
                model,
                class,
            },
            Charge { quantity, amount },
        );
    }
    Ok(out)
}

/// The header of a draft to create if the tenant's period has no live invoice yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDraft {
    pub invoice_id: String,
    pub tenant_id: String,
    pub period: BillingPeriod,
    pub currency: String,
    pub currency_exponent: i16,
    pub rounding_mode: RoundingMode,
    pub replaces_invoice_id: Option<String>,
}

/// Creates the drafts that do not exist yet (a live invoice of the same tenant, period and
/// currency wins), then locks every live invoice of them in tenant order, so concurrent
/// finalizers and previews queue instead of racing, and returns them.
pub async fn lock_live(
    conn: &mut PgConnection,
    drafts: &[NewDraft],
) -> Result<Vec<InvoiceRecord>, StoreError> {
    let mut sorted: Vec<&NewDraft> = drafts.iter().collect();
    sorted.sort_by(|a, b| a.tenant_id.cmp(&b.tenant_id));
    sqlx::query(
        "INSERT INTO invoices (invoice_id, tenant_id, state, period_label, period_start, period_end,
             currency, currency_exponent, rounding_mode, replaces_invoice_id)
         SELECT d.invoice_id, d.tenant_id, 'draft', d.label, d.start_at, d.end_at, d.currency,
                d.exponent, d.rounding, d.replaces
         FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[],
                     $6::text[], $7::int2[], $8::text[], $9::text[])
              AS d(invoice_id, tenant_id, label, start_at, end_at, currency, exponent, rounding, replaces)
         ON CONFLICT (tenant_id, period_label, currency) WHERE state <> 'void' DO NOTHING",
    )
    .bind(sorted.iter().map(|d| d.invoice_id.as_str()).collect::<Vec<_>>())
    .bind(sorted.iter().map(|d| d.tenant_id.as_str()).collect::<Vec<_>>())
    .bind(sorted.iter().map(|d| d.period.label.to_string()).collect::<Vec<_>>())
    .bind(sorted.iter().map(|d| d.period.start).collect::<Vec<_>>())
    .bind(sorted.iter().map(|d| d.period.end).collect::<Vec<_>>())
    .bind(sorted.iter().map(|d| d.currency.as_str()).collect::<Vec<_>>())
    .bind(sorted.iter().map(|d| d.currency_exponent).collect::<Vec<_>>())
    .bind(sorted.iter().map(|d| d.rounding_mode.as_str()).collect::<Vec<_>>())
    .bind(sorted.iter().map(|d| d.replaces_invoice_id.as_deref()).collect::<Vec<_>>())
    .execute(&mut *conn)
    .await?;
    let sql = format!(
        "SELECT {COLUMNS} FROM invoices
         WHERE (tenant_id, period_label, currency) IN
               (SELECT * FROM unnest($1::text[], $2::text[], $3::bpchar[]))
           AND state <> 'void'
         ORDER BY tenant_id FOR UPDATE"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(
            sorted
                .iter()
                .map(|d| d.tenant_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            sorted
                .iter()
                .map(|d| d.period.label.to_string())
                .collect::<Vec<_>>(),
        )
        .bind(
            sorted
                .iter()
                .map(|d| d.currency.as_str())
                .collect::<Vec<_>>(),
        )
        .fetch_all(&mut *conn)
        .await?;
    rows.iter().map(from_row).collect()
}

/// Locks one invoice of a tenant.
pub async fn lock_one(
    conn: &mut PgConnection,
    tenant_id: &str,
    invoice_id: &str,
) -> Result<InvoiceRecord, StoreError> {
    one(conn, tenant_id, invoice_id, " FOR UPDATE").await
}

/// One invoice of a tenant; `locking` is empty or a locking clause.
async fn one(
    conn: &mut PgConnection,
    tenant_id: &str,
    invoice_id: &str,
    locking: &'static str,
) -> Result<InvoiceRecord, StoreError> {
    let sql =
        format!("SELECT {COLUMNS} FROM invoices WHERE tenant_id = $1 AND invoice_id = $2{locking}");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(tenant_id)
        .bind(invoice_id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("invoice {invoice_id:?}")))?;
    from_row(&row)
}

/// A computed invoice to write onto its (locked) draft row.
pub struct Computed<'a> {
    pub invoice_id: &'a str,
    pub tenant_id: &'a str,
    pub terms: &'a Terms,
    pub invoice: &'a ComputedInvoice,
}

async fn write_lines(conn: &mut PgConnection, computed: &[Computed<'_>]) -> Result<(), StoreError> {
    let ids: Vec<&str> = computed.iter().map(|c| c.invoice_id).collect();
    // Lines of earlier previews of these drafts; the trigger refuses this for final invoices.
    sqlx::query("DELETE FROM invoice_lines WHERE invoice_id = ANY($1)")
        .bind(&ids)
        .execute(&mut *conn)
        .await?;
    let lines: Vec<(&Computed<'_>, i32, &Line)> = computed
        .iter()
        .flat_map(|c| {
            c.invoice
                .lines
                .iter()
                .enumerate()
                .map(move |(i, line)| (c, i32::try_from(i + 1).unwrap_or(i32::MAX), line))
        })
        .collect();
    let key = |l: &Line| l.key.clone();
    sqlx::query(
        "INSERT INTO invoice_lines (invoice_id, tenant_id, line_no, kind, description, provider, model,
             token_class, quantity, unit_price, precise_amount, amount, tier_from_tokens,
             tier_up_to_tokens, original_period_label, original_period_start, original_period_end,
             list_unit_price, discount_percent, tax_rate_percent, base_amount, price_book_version_id,
             override_id)
         SELECT * FROM unnest($1::text[], $2::text[], $3::int4[], $4::text[], $5::text[], $6::text[],
             $7::text[], $8::int2[], $9::int8[], $10::numeric[], $11::numeric[], $12::numeric[],
             $13::int8[], $14::int8[], $15::text[], $16::timestamptz[], $17::timestamptz[],
             $18::numeric[], $19::numeric[], $20::numeric[], $21::numeric[], $22::text[], $23::text[])",
    )
    .bind(lines.iter().map(|(c, _, _)| c.invoice_id).collect::<Vec<_>>())
    .bind(lines.iter().map(|(c, _, _)| c.tenant_id).collect::<Vec<_>>())
    .bind(lines.iter().map(|(_, n, _)| *n).collect::<Vec<_>>())
    .bind(lines.iter().map(|(_, _, l)| l.kind.as_str()).collect::<Vec<_>>())
    .bind(lines.iter().map(|(_, _, l)| l.description.as_str()).collect::<Vec<_>>())
    .bind(lines.iter().map(|(_, _, l)| key(l).map(|k| k.provider).unwrap_or_default()).collect::<Vec<_>>())
    .bind(lines.iter().map(|(_, _, l)| key(l).map(|k| k.model).unwrap_or_default()).collect::<Vec<_>>())
    .bind(lines.iter().map(|(_, _, l)| l.key.as_ref().map_or(0, |k| k.class as i16)).collect::<Vec<_>>())
    .bind(lines.iter().map(|(_, _, l)| l.quantity).collect::<Vec<_>>())
    .bind(lines.iter().map(|(_, _, l)| l.unit_price).collect::<Vec<_>>())
    .bind(lines.iter().map(|(_, _, l)| l.precise.clone()).collect::<Vec<_>>())
    .bind(lines.iter().map(|(_, _, l)| l.amount).collect::<Vec<_>>())
    .bind(lines.iter().map(|(_, _, l)| l.tier.map(|t| t.0)).collect::<Vec<_>>())
    .bind(lines.iter().map(|(_, _, l)| l.tier.and_then(|t| t.1)).collect::<Vec<_>>())
    .bind(lines.iter().map(|(_, _, l)| l.original_period.map(|p| p.label.to_string())).collect::<Vec<_>>())
    .bind(lines.iter().map(|(_, _, l)| l.original_period.map(|p| p.start)).collect::<Vec<_>>())
    .bind(lines.iter().map(|(_, _, l)| l.original_period.map(|p| p.end)).collect::<Vec<_>>())
    .bind(lines.iter().map(|(_, _, l)| l.list_unit_price).collect::<Vec<_>>())
    .bind(lines.iter().map(|(_, _, l)| l.discount_percent).collect::<Vec<_>>())
    .bind(lines.iter().map(|(_, _, l)| l.tax_rate_percent).collect::<Vec<_>>())
    .bind(lines.iter().map(|(_, _, l)| l.base_amount.clone()).collect::<Vec<_>>())
    .bind(lines.iter().map(|(_, _, l)| l.version_id.as_deref()).collect::<Vec<_>>())
    .bind(lines.iter().map(|(_, _, l)| l.override_id.as_deref()).collect::<Vec<_>>())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Writes the figures and lines of drafts, which stay drafts (previews).
pub async fn store_drafts(
    conn: &mut PgConnection,
    computed: &[Computed<'_>],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    write_lines(conn, computed).await?;
    update_headers(conn, computed, &[], now).await
}

/// Sets the figures (and, when `numbers` is given, the finalized state and numbers) of the
/// invoices in `computed`.
async fn update_headers(
    conn: &mut PgConnection,
    computed: &[Computed<'_>],
    numbers: &[String],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let finalize = !numbers.is_empty();
    sqlx::query(
        "UPDATE invoices i SET
             subtotal = u.subtotal, discount = u.discount, tax = u.tax, credit = u.credit,
             total = u.total, tax_rate_percent = u.tax_rate, unpriced_event_count = u.unpriced_events,
             unpriced_tokens = u.unpriced_tokens, line_count = u.line_count, computed_at = $12,
             state = CASE WHEN $13 THEN 'finalized' ELSE i.state END,
             number = CASE WHEN $13 THEN u.number ELSE i.number END,
             currency_exponent = u.exponent, rounding_mode = u.rounding,
             finalized_at = CASE WHEN $13 THEN $12 ELSE i.finalized_at END
         FROM unnest($1::text[], $2::numeric[], $3::numeric[], $4::numeric[], $5::numeric[],
                     $6::numeric[], $7::numeric[], $8::int8[], $9::int8[], $10::int4[], $11::text[],
                     $14::int2[], $15::text[])
              AS u(invoice_id, subtotal, discount, tax, credit, total, tax_rate, unpriced_events,
                   unpriced_tokens, line_count, number, exponent, rounding)
         WHERE i.invoice_id = u.invoice_id AND i.state = 'draft'",
    )
    .bind(computed.iter().map(|c| c.invoice_id).collect::<Vec<_>>())
    .bind(computed.iter().map(|c| c.invoice.subtotal).collect::<Vec<_>>())
    .bind(computed.iter().map(|c| c.invoice.discount).collect::<Vec<_>>())
    .bind(computed.iter().map(|c| c.invoice.tax).collect::<Vec<_>>())
    .bind(computed.iter().map(|c| c.invoice.credit).collect::<Vec<_>>())
    .bind(computed.iter().map(|c| c.invoice.total).collect::<Vec<_>>())
    .bind(computed.iter().map(|c| c.terms.tax_rate_percent).collect::<Vec<_>>())
    .bind(computed.iter().map(|c| c.invoice.unpriced_events).collect::<Vec<_>>())
    .bind(computed.iter().map(|c| c.invoice.unpriced_tokens).collect::<Vec<_>>())
    .bind(
        computed
            .iter()
            .map(|c| i32::try_from(c.invoice.lines.len()).unwrap_or(i32::MAX))
            .collect::<Vec<_>>(),
    )
    .bind(if finalize {
        numbers.iter().map(|n| Some(n.as_str())).collect::<Vec<_>>()
    } else {
        vec![None::<&str>; computed.len()]
    })
    .bind(now)
    .bind(finalize)
    .bind(
        computed
            .iter()
            .map(|c| i16::try_from(c.terms.currency.exponent).unwrap_or(i16::MAX))
            .collect::<Vec<_>>(),
    )
    .bind(computed.iter().map(|c| c.terms.rounding.as_str()).collect::<Vec<_>>())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Finalizes locked drafts: their lines, what they billed per (period, key), the next numbers
/// of `issuer` for the year of `now`, and the finalized state — all in the caller's
/// transaction. The counter row is taken last, so its lock (which serializes numbering across
/// replicas) is held only for the final update and the commit.
pub async fn finalize(
    conn: &mut PgConnection,
    computed: &[Computed<'_>],
    issuer: &str,
    now: DateTime<Utc>,
) -> Result<Vec<String>, StoreError> {
    if computed.is_empty() {
        return Ok(Vec::new());
    }
    write_lines(conn, computed).await?;
    let billed: Vec<(&Computed<'_>, &BilledUsage)> = computed
        .iter()
        .flat_map(|c| c.invoice.billed.iter().map(move |b| (c, b)))
        .collect();
    sqlx::query(
        "INSERT INTO invoice_billed_usage (invoice_id, tenant_id, currency, period_label, provider,
             model, token_class, quantity, amount)
         SELECT * FROM unnest($1::text[], $2::text[], $3::bpchar[], $4::text[], $5::text[], $6::text[],
             $7::int2[], $8::int8[], $9::numeric[])",
    )
    .bind(billed.iter().map(|(c, _)| c.invoice_id).collect::<Vec<_>>())
    .bind(billed.iter().map(|(c, _)| c.tenant_id).collect::<Vec<_>>())
    .bind(billed.iter().map(|(c, _)| c.terms.currency.code.as_str()).collect::<Vec<_>>())
    .bind(billed.iter().map(|(_, b)| b.period.label.to_string()).collect::<Vec<_>>())
    .bind(billed.iter().map(|(_, b)| b.key.provider.as_str()).collect::<Vec<_>>())
    .bind(billed.iter().map(|(_, b)| b.key.model.as_str()).collect::<Vec<_>>())
    .bind(billed.iter().map(|(_, b)| b.key.class as i16).collect::<Vec<_>>())
    .bind(billed.iter().map(|(_, b)| b.charge.quantity).collect::<Vec<_>>())
    .bind(billed.iter().map(|(_, b)| b.charge.amount.clone()).collect::<Vec<_>>())
    .execute(&mut *conn)
    .await?;
    let count = i64::try_from(computed.len()).unwrap_or(i64::MAX);
    let last: i64 = sqlx::query_scalar(
        "INSERT INTO invoice_number_counters (issuer, year, last_number) VALUES ($1, $2, $3)
         ON CONFLICT (issuer, year)
         DO UPDATE SET last_number = invoice_number_counters.last_number + EXCLUDED.last_number
         RETURNING last_number",
    )
    .bind(issuer)
    .bind(now.year())
    .bind(count)
    .fetch_one(&mut *conn)
    .await?;
    let numbers: Vec<String> = (last - count + 1..=last)
        .map(|n| format!("{issuer}-{}-{n:06}", now.year()))
        .collect();
    update_headers(conn, computed, &numbers, now).await?;
    Ok(numbers)
}

/// Voids a locked finalized invoice and creates its replacement draft (figures follow when the
/// caller computes it).
pub async fn void(
    conn: &mut PgConnection,
    invoice: &InvoiceRecord,
    reason: &str,
    replacement_id: &str,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE invoices SET state = 'void', voided_at = $2, void_reason = $3,
             replacement_invoice_id = $4
         WHERE invoice_id = $1 AND state = 'finalized'",
    )
    .bind(&invoice.invoice_id)
    .bind(now)
    .bind(reason)
    .bind(replacement_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Filters of [`list`]; empty means any.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// `None`: every tenant.
    pub tenant_ids: Option<Vec<String>>,
    pub period_label: Option<String>,
    pub states: Vec<InvoiceState>,
    pub number: Option<String>,
    pub offset: i64,
    pub limit: i64,
}

/// Invoices ordered by period start descending, then tenant, currency and creation.
pub async fn list(pool: &PgPool, filter: &ListFilter) -> Result<Vec<InvoiceRecord>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM invoices
         WHERE ($1::text[] IS NULL OR tenant_id = ANY($1))
           AND ($2::text IS NULL OR period_label = $2)
           AND (cardinality($3::text[]) = 0 OR state = ANY($3))
           AND ($4::text IS NULL OR number = $4)
         ORDER BY period_start DESC, tenant_id, currency, created_at, invoice_id
         OFFSET $5 LIMIT $6"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&filter.tenant_ids)
        .bind(&filter.period_label)
        .bind(filter.states.iter().map(|s| s.as_str()).collect::<Vec<_>>())
        .bind(&filter.number)
        .bind(filter.offset)
        .bind(filter.limit)
        .fetch_all(pool)
        .await?;
    rows.iter().map(from_row).collect()
}

pub async fn get(
    conn: &mut PgConnection,
    tenant_id: &str,
    invoice_id: &str,
) -> Result<InvoiceRecord, StoreError> {
    one(conn, tenant_id, invoice_id, "").await
}

/// Live invoice states of a period for many tenants (tenant → state).
pub async fn live_states(
    conn: &mut PgConnection,
    tenant_ids: &[String],
    label: PeriodLabel,
) -> Result<HashMap<String, InvoiceState>, StoreError> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT tenant_id, state FROM invoices
         WHERE tenant_id = ANY($1) AND period_label = $2 AND state <> 'void'",
    )
    .bind(tenant_ids)
    .bind(label.to_string())
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(t, s)| Some((t, InvoiceState::parse(&s)?)))
        .collect())
}

/// Attaches the stored lines (in line order) to `invoices`.
pub async fn attach_lines(
    conn: &mut PgConnection,
    invoices: &mut [InvoiceRecord],
) -> Result<(), StoreError> {
    let ids: Vec<&str> = invoices.iter().map(|i| i.invoice_id.as_str()).collect();
    let rows = sqlx::query(
        "SELECT invoice_id, kind, description, provider, model, token_class, quantity, unit_price,
                precise_amount, amount, tier_from_tokens, tier_up_to_tokens, original_period_label,
                original_period_start, original_period_end, list_unit_price, discount_percent,
                tax_rate_percent, base_amount, price_book_version_id, override_id
         FROM invoice_lines WHERE invoice_id = ANY($1) ORDER BY invoice_id, line_no",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut by_invoice: HashMap<String, Vec<Line>> = HashMap::new();
    for row in rows {
        let kind: String = row.try_get("kind")?;
        let class: i16 = row.try_get("token_class")?;
        let original_label: Option<String> = row.try_get("original_period_label")?;
        let original_period = match (
            original_label,
            row.try_get("original_period_start")?,
            row.try_get("original_period_end")?,
        ) {
            (Some(label), Some(start), Some(end)) => Some(period_of(&label, start, end)?),
            _ => None,
        };
        let key = match TokenClass::from_proto(i32::from(class)) {
            Some(class) => Some(RateKey {
                provider: row.try_get("provider")?,
                model: row.try_get("model")?,
                class,
            }),
            None => None,
        };
        let tier_from: Option<i64> = row.try_get("tier_from_tokens")?;
        let tier_up_to: Option<i64> = row.try_get("tier_up_to_tokens")?;
        by_invoice
            .entry(row.try_get("invoice_id")?)
            .or_default()
            .push(Line {
                kind: LineKind::parse(&kind).unwrap_or(LineKind::Usage),
                description: row.try_get("description")?,
                key,
                quantity: row.try_get("quantity")?,
                unit_price: row.try_get("unit_price")?,
                precise: row.try_get("precise_amount")?,
                amount: row.try_get("amount")?,
                tier: tier_from.map(|from| (from, tier_up_to)),
                original_period,
                list_unit_price: row.try_get("list_unit_price")?,
                discount_percent: row.try_get("discount_percent")?,
                tax_rate_percent: row.try_get("tax_rate_percent")?,
                base_amount: row.try_get("base_amount")?,
                version_id: row.try_get("price_book_version_id")?,
                override_id: row.try_get("override_id")?,
            });
    }
    for invoice in invoices {
        invoice.lines = by_invoice.remove(&invoice.invoice_id).unwrap_or_default();
    }
    Ok(())
}

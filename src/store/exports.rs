//! SQL of finance exports: one REPEATABLE READ snapshot per export, and the rows of each kind
//! as of a watermark, new since another (see `export::watermark` for why this is exact).
//!
//! Every row query takes the same first six parameters: `$1` tenants, `$2`/`$3` each tenant's
//! range start/end, `$4` a period label (invoices select by label when it is set), `$5` the
//! snapshot the export is as of, `$6` the snapshot it starts after (NULL: from the beginning).

use chrono::{DateTime, Utc};
use futures::stream::{BoxStream, StreamExt};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};

use rust_decimal::Decimal;

use super::StoreError;
use crate::domain::exact::{self, Precise};
use crate::domain::tokens::TokenClass;
use crate::export::encode::Cell;
use crate::export::schema::{Schema, Type};
use crate::export::{Filters, Rows, UsageGrouping};

/// Makes the caller's fresh transaction a read-only REPEATABLE READ one and returns its
/// snapshot (`pg_current_snapshot()` text): every row read afterwards is as of that snapshot.
pub async fn begin_snapshot(conn: &mut PgConnection) -> Result<String, StoreError> {
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *conn)
        .await?;
    Ok(sqlx::query_scalar("SELECT pg_current_snapshot()::text")
        .fetch_one(&mut *conn)
        .await?)
}

/// A tenant's billing calendar settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantCalendar {
    pub tenant_id: String,
    pub billing_timezone: String,
    pub billing_anchor_day: i16,
}

/// The named tenants (each must exist), or every tenant, in id order.
pub async fn tenant_calendars(
    conn: &mut PgConnection,
    named: Option<&[String]>,
) -> Result<Vec<TenantCalendar>, StoreError> {
    let rows: Vec<(String, String, i16)> = sqlx::query_as(
        "SELECT tenant_id, billing_timezone, billing_anchor_day FROM tenants
         WHERE $1::text[] IS NULL OR tenant_id = ANY($1)
         ORDER BY tenant_id COLLATE \"C\"",
    )
    .bind(named)
    .fetch_all(&mut *conn)
    .await?;
    if let Some(missing) = named
        .unwrap_or_default()
        .iter()
        .find(|t| !rows.iter().any(|(id, _, _)| id == *t))
    {
        return Err(StoreError::NotFound(format!("tenant {missing:?}")));
    }
    Ok(rows
        .into_iter()
        .map(
            |(tenant_id, billing_timezone, billing_anchor_day)| TenantCalendar {
                tenant_id,
                billing_timezone,
                billing_anchor_day,
            },
        )
        .collect())
}

/// The tenants among `tenants` with usage or lifecycle events visible in `until` but not in
/// `since`: those whose attribution inputs changed.
pub async fn changed_tenants(
    conn: &mut PgConnection,
    tenants: &[String],
    since: &str,
    until: &str,
) -> Result<Vec<String>, StoreError> {
    let sql = format!(
        "SELECT t FROM unnest($1::text[]) AS t
         WHERE EXISTS (SELECT 1 FROM usage_events e WHERE e.tenant_id = t AND {u} AND {un})
            OR EXISTS (SELECT 1 FROM transaction_events e WHERE e.tenant_id = t AND {x} AND {xn})
         ORDER BY t COLLATE \"C\"",
        u = visible("e.ingested_xid", "$3"),
        un = unseen("e.ingested_xid", "$2"),
        x = visible("e.recorded_xid", "$3"),
        xn = unseen("e.recorded_xid", "$2"),
    );
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(tenants)
        .bind(since)
        .bind(until)
        .fetch_all(&mut *conn)
        .await?)
}

/// What one row query reads.
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    pub rows: &'a Rows,
    pub tenants: Vec<String>,
    pub starts: Vec<DateTime<Utc>>,
    pub ends: Vec<DateTime<Utc>>,
    pub period: Option<String>,
    pub until: String,
    pub since: Option<String>,
    pub time_zone: Option<String>,
}

/// Committed before the snapshot `param` (rows from before migration 0006 have no xid and are
/// older than any snapshot).
fn visible(column: &str, param: &str) -> String {
    format!("({column} IS NULL OR pg_visible_in_snapshot({column}, {param}::pg_snapshot))")
}

/// Not committed before the snapshot `param`; everything when `param` is NULL.
fn unseen(column: &str, param: &str) -> String {
    format!(
        "({param}::pg_snapshot IS NULL OR ({column} IS NOT NULL AND NOT pg_visible_in_snapshot({column}, {param}::pg_snapshot)))"
    )
}

const RANGES: &str = "r AS (SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[])
                              AS r(tenant_id, start_at, end_at))";

/// Invoices as of `$5`: their state then (a void after it shows as finalized), selected when
/// finalized or voided after `$6`; drafts (only when asked for) are live and always selected.
fn invoices_cte() -> String {
    format!(
        "{RANGES},
         i AS (
            SELECT inv.*,
                   CASE WHEN inv.state = 'draft' THEN 'draft'
                        WHEN inv.state = 'void' AND {void_seen} THEN 'void'
                        WHEN {final_seen} THEN 'finalized' END AS eff_state,
                   ({final_new} OR (inv.state = 'void' AND {void_seen} AND {void_new})) AS is_new
            FROM invoices inv JOIN r ON r.tenant_id = inv.tenant_id
            WHERE CASE WHEN $4::text IS NOT NULL THEN inv.period_label = $4
                       ELSE inv.period_start >= r.start_at AND inv.period_start < r.end_at END)",
        void_seen = visible("inv.voided_xid", "$5"),
        final_seen = visible("inv.finalized_xid", "$5"),
        final_new = unseen("inv.finalized_xid", "$6"),
        void_new = unseen("inv.voided_xid", "$6"),
    )
}

const INVOICE_WHERE: &str = "i.eff_state = ANY($7::text[]) AND (i.eff_state = 'draft' OR i.is_new)";
const INVOICE_ORDER: &str =
    "i.tenant_id COLLATE \"C\", i.period_start, i.currency, i.invoice_id COLLATE \"C\"";

fn invoices_sql() -> String {
    format!(
        "WITH {cte}
         SELECT i.tenant_id, i.invoice_id, i.number, i.eff_state, i.period_label, i.period_start,
                i.period_end, i.currency::text, i.subtotal, i.discount, i.tax, i.credit, i.total,
                i.tax_rate_percent, i.line_count::int8, i.unpriced_event_count, i.unpriced_tokens,
                i.finalized_at,
                CASE WHEN i.eff_state = 'void' THEN i.voided_at END,
                CASE WHEN i.eff_state = 'void' THEN i.void_reason END,
                CASE WHEN i.eff_state = 'void' THEN i.replacement_invoice_id END,
                i.replaces_invoice_id
         FROM i WHERE {INVOICE_WHERE} ORDER BY {INVOICE_ORDER}",
        cte = invoices_cte()
    )
}

fn invoice_lines_sql() -> String {
    format!(
        "WITH {cte}
         SELECT i.tenant_id, i.invoice_id, i.number, i.eff_state, i.period_label, i.period_start,
                i.period_end, i.currency::text, l.line_no::int8, l.kind, l.description, l.provider,
                l.model, l.token_class, l.quantity, l.unit_price, l.precise_amount, l.amount,
                l.tier_from_tokens, l.tier_up_to_tokens, l.original_period_label,
                l.list_unit_price, l.discount_percent, l.tax_rate_percent, l.base_amount,
                l.price_book_version_id, l.override_id
         FROM i JOIN invoice_lines l ON l.invoice_id = i.invoice_id
         WHERE {INVOICE_WHERE} ORDER BY {INVOICE_ORDER}, l.line_no",
        cte = invoices_cte()
    )
}

fn token_columns() -> impl Iterator<Item = &'static str> {
    TokenClass::ALL.into_iter().map(TokenClass::as_str)
}

/// Usage events in their tenant's range, as of `$5`, ingested after `$6`, filtered by `$7…$11`.
fn usage_from() -> String {
    format!(
        "FROM usage_events e
         JOIN r ON r.tenant_id = e.tenant_id AND e.occurred_at >= r.start_at AND e.occurred_at < r.end_at
         WHERE {seen} AND {new}
           AND (cardinality($7::text[]) = 0 OR e.agent_id = ANY($7))
           AND (cardinality($8::text[]) = 0 OR e.service = ANY($8))
           AND (cardinality($9::text[]) = 0 OR e.provider = ANY($9))
           AND (cardinality($10::text[]) = 0 OR e.model = ANY($10))
           AND (cardinality($11::text[]) = 0 OR e.transaction_id = ANY($11))",
        seen = visible("e.ingested_xid", "$5"),
        new = unseen("e.ingested_xid", "$6"),
    )
}

fn usage_events_sql() -> String {
    let tokens: Vec<String> = token_columns().map(|c| format!("e.{c}")).collect();
    format!(
        "WITH {RANGES}
         SELECT e.tenant_id::text, e.source, e.event_id, e.occurred_at, e.ingested_at, e.agent_id,
                e.transaction_id, e.service, e.session_id, e.request_id, e.provider, e.model,
                {tokens}, e.currency::text, e.billed_amount, e.cost_amount, e.unpriced_tokens,
                e.price_book_version_id, e.channel, e.attributes::text, e.status::int8,
                e.usage_source::int8
         {from}
         ORDER BY e.tenant_id, e.occurred_at, e.source COLLATE \"C\", e.event_id COLLATE \"C\"",
        tokens = tokens.join(", "),
        from = usage_from(),
    )
}

/// Sums per (bucket, tenant, kept dimensions, currency); `$12` the date_trunc unit (NULL: the
/// tenant's range start), `$13` the time zone (NULL: the tenant's), `$14…$18` which dimensions
/// are kept.
fn usage_sql() -> String {
    let sums: Vec<String> = token_columns()
        .map(|c| format!("sum(e.{c})::int8 AS {c}"))
        .collect();
    let total: Vec<String> = token_columns().map(|c| format!("e.{c}")).collect();
    let order: Vec<String> = ["agent_id", "transaction_id", "service", "provider", "model"]
        .iter()
        .map(|c| format!("g.{c} COLLATE \"C\""))
        .collect();
    format!(
        "WITH {RANGES}
         SELECT g.* FROM (
            SELECT CASE WHEN $12::text IS NULL THEN r.start_at
                        ELSE date_trunc($12, e.occurred_at, COALESCE($13, t.billing_timezone)) END
                       AS bucket_start,
                   e.tenant_id::text AS tenant_id,
                   CASE WHEN $14 THEN e.agent_id ELSE '' END AS agent_id,
                   CASE WHEN $15 THEN COALESCE(e.transaction_id, '') ELSE '' END AS transaction_id,
                   CASE WHEN $16 THEN COALESCE(e.service, '') ELSE '' END AS service,
                   CASE WHEN $17 THEN e.provider ELSE '' END AS provider,
                   CASE WHEN $18 THEN e.model ELSE '' END AS model,
                   e.currency::text AS currency,
                   {sums},
                   sum({total})::int8 AS total_tokens,
                   count(*)::int8 AS events,
                   (count(*) FILTER (WHERE e.unpriced_tokens > 0))::int8 AS unpriced_events,
                   sum(e.unpriced_tokens)::int8 AS unpriced_tokens,
                   sum(e.billed_amount) AS billed_amount,
                   sum(e.cost_amount) AS cost_amount
            {from}
            GROUP BY 1, 2, 3, 4, 5, 6, 7, 8) g
         ORDER BY g.tenant_id COLLATE \"C\", g.bucket_start, {order}, g.currency COLLATE \"C\"",
        sums = sums.join(", "),
        total = total.join(" + "),
        from = usage_from().replacen(
            "JOIN r ON",
            "JOIN tenants t ON t.tenant_id = e.tenant_id JOIN r ON",
            1
        ),
        order = order.join(", "),
    )
}

const EVENT_KINDS: &str = "(ARRAY['started', 'completed', 'failed', 'refunded', 'reversed'])";

fn transaction_events_sql() -> String {
    format!(
        "WITH {RANGES}
         SELECT e.tenant_id::text, e.transaction_id::text, e.occurred_at, {EVENT_KINDS}[e.kind],
                e.source::text, e.event_id::text, e.agent_id::text, e.service::text,
                e.currency::text, CASE WHEN e.kind = 2 THEN e.amount END,
                CASE WHEN e.kind = 4 THEN e.amount END, e.reason, e.channel, e.ingested_at
         FROM transaction_events e
         JOIN r ON r.tenant_id = e.tenant_id AND e.occurred_at >= r.start_at AND e.occurred_at < r.end_at
         WHERE {seen} AND {new}
         ORDER BY e.tenant_id, e.occurred_at, e.transaction_id, e.source, e.event_id",
        seen = visible("e.recorded_xid", "$5"),
        new = unseen("e.recorded_xid", "$6"),
    )
}

/// One row per transaction first seen in its tenant's range, folded from the events visible
/// in `$5` like `domain::transaction::summarize`: the state by `transaction_state`, revenue of
/// the first completion, Σ refunds, net 0 once reversed. Selected when any of its events was
/// recorded after `$6` (the row then supersedes the one exported before).
fn transactions_sql() -> String {
    format!(
        "WITH {RANGES},
         v AS (SELECT e.*, {new} AS is_new FROM transaction_events e
               WHERE e.tenant_id = ANY($1) AND {seen}),
         s AS (
            SELECT v.tenant_id, v.transaction_id, min(v.occurred_at) AS first_at,
                   max(v.occurred_at) AS last_at, bool_or(v.is_new) AS is_new,
                   array_agg(v.kind) AS kinds,
                   (array_agg(v.agent_id ORDER BY v.occurred_at, v.event_id) FILTER (WHERE v.agent_id IS NOT NULL))[1] AS agent_id,
                   (array_agg(v.service ORDER BY v.occurred_at, v.event_id) FILTER (WHERE v.service IS NOT NULL))[1] AS service,
                   (array_agg(v.currency ORDER BY v.kind <> 2, v.occurred_at, v.event_id) FILTER (WHERE v.currency IS NOT NULL))[1] AS currency,
                   COALESCE((array_agg(v.amount ORDER BY v.occurred_at, v.event_id) FILTER (WHERE v.kind = 2))[1], 0) AS revenue,
                   COALESCE(sum(v.amount) FILTER (WHERE v.kind = 4), 0) AS refunds,
                   count(*) AS n
            FROM v GROUP BY v.tenant_id, v.transaction_id)
         SELECT s.tenant_id::text, s.transaction_id::text,
                (ARRAY['not_started', 'started', 'completed', 'failed', 'refunded', 'reversed'])[transaction_state(s.kinds)],
                s.agent_id::text, s.service::text, s.currency::text, s.revenue, s.refunds,
                CASE WHEN 5 = ANY(s.kinds) THEN 0 ELSE s.revenue - s.refunds END,
                s.first_at, s.last_at, s.n::int8
         FROM s JOIN r ON r.tenant_id = s.tenant_id AND s.first_at >= r.start_at AND s.first_at < r.end_at
         WHERE s.is_new
         ORDER BY s.tenant_id, s.transaction_id",
        seen = visible("e.recorded_xid", "$5"),
        new = unseen("e.recorded_xid", "$6"),
    )
}

/// The rows of a SQL-backed export, decoded into cells of `schema`, in file order.
/// Attribution is built in Rust from `store::attribution::facts` instead.
pub fn rows<'c>(
    conn: &'c mut PgConnection,
    plan: &'c Plan<'c>,
    schema: Schema,
) -> BoxStream<'c, Result<Vec<Cell>, StoreError>> {
    let empty = Filters::default();
    let (sql, filters, states, bucket, grouping) = match plan.rows {
        Rows::Invoices { states } => (invoices_sql(), &empty, states.as_slice(), None, None),
        Rows::InvoiceLines { states } => {
            (invoice_lines_sql(), &empty, states.as_slice(), None, None)
        }
        Rows::Usage {
            raw_events: true,
            filters,
            ..
        } => (usage_events_sql(), filters, &[][..], None, None),
        Rows::Usage {
            bucket,
            grouping,
            filters,
            ..
        } => (
            usage_sql(),
            filters,
            &[][..],
            bucket.unit(),
            Some(*grouping),
        ),
        Rows::Transactions {
            lifecycle_events: true,
        } => (transaction_events_sql(), &empty, &[][..], None, None),
        Rows::Transactions { .. } => (transactions_sql(), &empty, &[][..], None, None),
        Rows::Attribution { .. } => {
            let error = StoreError::Invalid {
                field: "kind".to_owned(),
                reason: "attribution rows are built from store::attribution::facts".to_owned(),
            };
            return futures::stream::once(async { Err(error) }).boxed();
        }
    };
    let grouping = grouping.unwrap_or(UsageGrouping::ALL);
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&plan.tenants)
        .bind(&plan.starts)
        .bind(&plan.ends)
        .bind(&plan.period)
        .bind(&plan.until)
        .bind(&plan.since);
    query = match plan.rows {
        Rows::Invoices { .. } | Rows::InvoiceLines { .. } => {
            query.bind(states.iter().map(|s| s.as_str()).collect::<Vec<_>>())
        }
        Rows::Usage { .. } => query
            .bind(&filters.agent_ids)
            .bind(&filters.services)
            .bind(&filters.providers)
            .bind(&filters.models)
            .bind(&filters.transaction_ids)
            .bind(bucket)
            .bind(&plan.time_zone)
            .bind(grouping.agent)
            .bind(grouping.transaction)
            .bind(grouping.service)
            .bind(grouping.provider)
            .bind(grouping.model),
        Rows::Transactions { .. } | Rows::Attribution { .. } => query,
    };
    query
        .fetch(conn)
        .map(move |row| decode(&row?, &schema))
        .boxed()
}

fn decode(row: &PgRow, schema: &Schema) -> Result<Vec<Cell>, StoreError> {
    fn opt<T>(value: Option<T>, cell: impl FnOnce(T) -> Cell) -> Cell {
        value.map_or(Cell::Null, cell)
    }
    // Read wide and narrowed exactly: a stored amount beyond Decimal's 28 digits fails the
    // export naming it, where reading it as a Decimal would round it.
    let amount = |i: usize| -> Result<Option<Decimal>, StoreError> {
        let Some(wide) = row.try_get::<Option<Precise>, _>(i)? else {
            return Ok(None);
        };
        exact::narrow(&wide).map(Some).ok_or_else(|| {
            StoreError::Query(sqlx::Error::Decode(
                format!(
                    "{} = {} has more digits than an export amount holds",
                    schema.columns[i].name,
                    wide.to_plain_string()
                )
                .into(),
            ))
        })
    };
    schema
        .columns
        .iter()
        .enumerate()
        .map(|(i, column)| {
            Ok(match column.ty {
                Type::Text => Cell::Text(row.try_get(i)?),
                Type::OptText => opt(row.try_get(i)?, Cell::Text),
                Type::Int => Cell::Int(row.try_get(i)?),
                Type::OptInt => opt(row.try_get(i)?, Cell::Int),
                Type::Amount => amount(i)?.map_or(Cell::Null, Cell::Amount),
                Type::OptAmount => opt(amount(i)?, Cell::Amount),
                Type::Time => Cell::Time(row.try_get(i)?),
                Type::OptTime => opt(row.try_get(i)?, Cell::Time),
                Type::TokenClass => {
                    let number: i16 = row.try_get(i)?;
                    Cell::Text(
                        TokenClass::from_proto(i32::from(number))
                            .map_or("", TokenClass::as_str)
                            .to_owned(),
                    )
                }
            })
        })
        .collect()
}

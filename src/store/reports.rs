//! SQL of the usage reports: the hourly rollup (`usage_rollups`) plus the raw rows of ingest
//! batches not folded into it yet, so a report is exact as of its read; reports by transaction
//! read the per-transaction figures instead (the frozen `usage_rollups_v1` for events ingested
//! before ingest v2, raw rows after), which the coarse rollup does not keep.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{PgPool, Postgres, QueryBuilder, Row};

use super::StoreError;
use crate::domain::tokens::{CLASS_COUNT, TokenClass};

/// A usage dimension, i.e. a rollup key column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dimension {
    Tenant,
    Agent,
    Transaction,
    Service,
    Provider,
    Model,
    TokenClass,
}

impl Dimension {
    fn column(self) -> &'static str {
        match self {
            Dimension::Tenant => "tenant_id",
            Dimension::Agent => "agent_id",
            Dimension::Transaction => "transaction_id",
            Dimension::Service => "service",
            Dimension::Provider => "provider",
            Dimension::Model => "model",
            Dimension::TokenClass => "token_class",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// One bucket spanning the whole range.
    Whole,
    Hour,
    Day,
    Month,
}

#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    pub agent_ids: Vec<String>,
    pub services: Vec<String>,
    pub providers: Vec<String>,
    pub models: Vec<String>,
    pub token_classes: Vec<TokenClass>,
    pub transaction_ids: Vec<String>,
    pub has_transaction: Option<bool>,
    pub unpriced: Option<bool>,
}

#[derive(Debug, Clone)]
pub struct UsageQuery {
    /// Empty means every tenant.
    pub tenant_ids: Vec<String>,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub window: Window,
    pub group_by: Vec<Dimension>,
    pub filter: UsageFilter,
    /// IANA zone for day and month buckets.
    pub time_zone: String,
    pub offset: i64,
    pub limit: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub bucket_start: DateTime<Utc>,
    pub bucket_end: DateTime<Utc>,
    /// One value per requested group-by dimension, in request order (class as its number).
    pub dimensions: Vec<String>,
    pub currency: String,
    /// Indexed like [`TokenClass::ALL`].
    pub tokens: [i64; CLASS_COUNT],
    pub billed: Decimal,
    pub cost: Decimal,
    pub event_count: i64,
    pub unpriced_event_count: i64,
    pub unpriced_tokens: i64,
}

pub async fn query_usage(pool: &PgPool, query: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
    let mut conn = pool.acquire().await?;
    let oldest_queued = super::fold::oldest_queued(&mut conn).await?;
    let mut sql: QueryBuilder<Postgres> = QueryBuilder::new("SELECT ");
    push_bucket(&mut sql, query, false);
    sql.push(" AS bucket_start, ");
    push_bucket(&mut sql, query, true);
    sql.push(" AS bucket_end");
    for (i, dimension) in query.group_by.iter().enumerate() {
        sql.push(format_args!(", {} AS d{i}", dimension.column()));
    }
    sql.push(", currency::text AS currency");
    for class in TokenClass::ALL {
        sql.push(format_args!(
            ", coalesce(sum(tokens) FILTER (WHERE token_class = {}), 0)::int8 AS t{}",
            class as i16,
            class.index()
        ));
    }
    let by_class = query.group_by.contains(&Dimension::TokenClass);
    let (events, unpriced_events) = if by_class {
        ("class_events", "class_unpriced_events")
    } else {
        ("events", "unpriced_events")
    };
    let by_transaction = query.group_by.contains(&Dimension::Transaction)
        || !query.filter.transaction_ids.is_empty()
        || query.filter.has_transaction.is_some();
    sql.push(format_args!(
        ", sum(billed_amount) AS billed, sum(cost_amount) AS cost,
           sum({events})::int8 AS event_count, sum({unpriced_events})::int8 AS unpriced_event_count,
           sum(unpriced_tokens)::int8 AS unpriced_tokens
         FROM ("
    ));
    // Raw rows by event time: a superset of the hours asked (the hour filter below is exact),
    // so the (tenant, time) index bounds what is read.
    let raw_range = |sql: &mut QueryBuilder<Postgres>| {
        sql.push(" AND e.occurred_at >= ");
        sql.push_bind(query.start - chrono::TimeDelta::hours(1));
        sql.push(" AND e.occurred_at < ");
        sql.push_bind(query.end + chrono::TimeDelta::hours(1));
    };
    if by_transaction {
        sql.push(format_args!(
            "SELECT {ROW_COLUMNS} FROM usage_rollups_v1 UNION ALL {}",
            raw_usage_rows("e.ingest_batch IS NOT NULL")
        ));
        raw_range(&mut sql);
    } else {
        sql.push(FOLDED_ROWS);
        if let Some(oldest) = oldest_queued {
            // OFFSET 0 keeps the tenant and dimension filters out of the tail: it is read by
            // batch (bounded by the queue), never through a tenant's whole history.
            sql.push(format_args!(
                " UNION ALL SELECT * FROM ({}",
                raw_usage_rows(&queued_since(oldest))
            ));
            raw_range(&mut sql);
            sql.push(" OFFSET 0) AS queued");
        }
    }
    sql.push(") AS usage_rows WHERE hour >= ");
    sql.push_bind(query.start);
    sql.push(" AND hour < ");
    sql.push_bind(query.end);
    if !query.tenant_ids.is_empty() {
        sql.push(" AND tenant_id = ANY(");
        sql.push_bind(query.tenant_ids.clone());
        sql.push(")");
    }
    let filter = &query.filter;
    for (column, values) in [
        ("agent_id", &filter.agent_ids),
        ("service", &filter.services),
        ("provider", &filter.providers),
        ("model", &filter.models),
        ("transaction_id", &filter.transaction_ids),
    ] {
        if !values.is_empty() {
            sql.push(format_args!(" AND {column} = ANY("));
            sql.push_bind(values.clone());
            sql.push(")");
        }
    }
    if !filter.token_classes.is_empty() {
        sql.push(" AND token_class = ANY(");
        sql.push_bind(
            filter
                .token_classes
                .iter()
                .map(|c| *c as i16)
                .collect::<Vec<_>>(),
        );
        sql.push(")");
    }
    match filter.has_transaction {
        Some(true) => sql.push(" AND transaction_id <> ''"),
        Some(false) => sql.push(" AND transaction_id = ''"),
        None => &mut sql,
    };
    match filter.unpriced {
        Some(true) => sql.push(" AND unpriced_tokens > 0"),
        Some(false) => sql.push(" AND unpriced_tokens = 0"),
        None => &mut sql,
    };
    sql.push(" GROUP BY bucket_start, bucket_end");
    for i in 0..query.group_by.len() {
        sql.push(format_args!(", d{i}"));
    }
    sql.push(", currency ORDER BY bucket_start");
    for i in 0..query.group_by.len() {
        sql.push(format_args!(", d{i}"));
    }
    sql.push(", currency OFFSET ");
    sql.push_bind(query.offset);
    sql.push(" LIMIT ");
    sql.push_bind(query.limit);

    // Not prepared for reuse: the tail's bound is part of the text.
    let rows = sql.build().persistent(false).fetch_all(&mut *conn).await?;
    rows.iter()
        .map(|row| {
            let mut tokens = [0i64; CLASS_COUNT];
            for class in TokenClass::ALL {
                tokens[class.index()] = row.try_get(format!("t{}", class.index()).as_str())?;
            }
            let dimensions = query
                .group_by
                .iter()
                .enumerate()
                .map(|(i, dimension)| {
                    let column = format!("d{i}");
                    // Classes are stored as their proto number.
                    if *dimension == Dimension::TokenClass {
                        row.try_get::<i16, _>(column.as_str())
                            .map(|n| n.to_string())
                    } else {
                        row.try_get::<String, _>(column.as_str())
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(UsageRow {
                bucket_start: row.try_get("bucket_start")?,
                bucket_end: row.try_get("bucket_end")?,
                dimensions,
                currency: row.try_get("currency")?,
                tokens,
                billed: row
                    .try_get::<Option<Decimal>, _>("billed")?
                    .unwrap_or_default(),
                cost: row
                    .try_get::<Option<Decimal>, _>("cost")?
                    .unwrap_or_default(),
                event_count: row
                    .try_get::<Option<i64>, _>("event_count")?
                    .unwrap_or_default(),
                unpriced_event_count: row
                    .try_get::<Option<i64>, _>("unpriced_event_count")?
                    .unwrap_or_default(),
                unpriced_tokens: row
                    .try_get::<Option<i64>, _>("unpriced_tokens")?
                    .unwrap_or_default(),
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(StoreError::from)
}

/// The columns of a usage row, as `usage_rollups_v1` has them (with the transaction).
pub(super) const ROW_COLUMNS: &str = "tenant_id, hour, agent_id, transaction_id, service, provider, model, \
     token_class, currency, tokens, billed_amount, cost_amount, unpriced_tokens, class_events, \
     class_unpriced_events, events, unpriced_events";

/// Raw rows `e` as usage rows: one per class with tokens (and one for the class an event with
/// no tokens counts on), the event counted once, on its first class with tokens — as the
/// folder adds them up. `filter` restricts the raw rows (`e.`).
pub(super) fn raw_usage_rows(filter: &str) -> String {
    let classes: Vec<String> = TokenClass::ALL
        .iter()
        .map(|c| format!("({}, e.{c}, e.billed_{c}, e.cost_{c})", *c as i16))
        .collect();
    let first: Vec<String> = TokenClass::ALL
        .iter()
        .map(|c| format!("WHEN e.{c} > 0 THEN {}", *c as i16))
        .collect();
    format!(
        "SELECT e.tenant_id AS tenant_id, date_trunc('hour', e.occurred_at, 'UTC') AS hour,
                e.agent_id COLLATE \"C\" AS agent_id,
                coalesce(e.transaction_id, '') COLLATE \"C\" AS transaction_id,
                coalesce(e.service, '') COLLATE \"C\" AS service,
                e.provider COLLATE \"C\" AS provider, e.model COLLATE \"C\" AS model,
                c.k::int2 AS token_class, e.currency::text COLLATE \"C\" AS currency,
                c.tokens::int8 AS tokens, coalesce(c.billed, 0) AS billed_amount,
                coalesce(c.cost, 0) AS cost_amount,
                (CASE WHEN c.billed IS NULL THEN c.tokens ELSE 0 END)::int8 AS unpriced_tokens,
                (c.tokens > 0)::int::int8 AS class_events,
                (c.tokens > 0 AND c.billed IS NULL)::int::int8 AS class_unpriced_events,
                (c.k = f.first)::int::int8 AS events,
                (c.k = f.first AND e.unpriced_tokens > 0)::int::int8 AS unpriced_events
         FROM usage_events e
         CROSS JOIN LATERAL (SELECT CASE {} ELSE 1 END AS first) AS f
         CROSS JOIN LATERAL (VALUES {}) AS c (k, tokens, billed, cost)
         WHERE (c.tokens > 0 OR c.k = f.first) AND {filter}",
        first.join(" "),
        classes.join(", "),
    )
}

/// The raw rows of batches still in the fold queue, from `oldest` (`fold::oldest_queued`, read
/// just before) on. The bound is written into the SQL so the planner sees how few batches it
/// selects and reads them through the batch BRIN index; the queue itself is checked in the
/// reader's own statement, so a batch folded meanwhile is counted once, in the rollups. Batches
/// committed after `oldest` was read may be missed: they were not acknowledged before the
/// read began.
pub(super) fn queued_since(oldest: i64) -> String {
    format!(
        "e.ingest_batch >= {oldest} AND e.ingest_batch IN (SELECT ingest_batch FROM fold_queue)"
    )
}

/// The folded hourly rollup as usage rows (no transaction). Read with the queued tail in one
/// statement, so from one snapshot, in which a batch is either folded or queued.
const FOLDED_ROWS: &str =
    "SELECT tenant_id, hour, agent_id, ''::text COLLATE \"C\" AS transaction_id,
        service, provider, model, token_class, currency, tokens, billed_amount, cost_amount,
        unpriced_tokens, class_events, class_unpriced_events, events, unpriced_events
     FROM usage_rollups";

/// The bucket start (or end) expression. Day and month buckets are cut at local midnight of
/// `time_zone`, which Postgres computes DST-correctly.
fn push_bucket(sql: &mut QueryBuilder<Postgres>, query: &UsageQuery, end: bool) {
    let bucket = Bucket {
        window: query.window,
        start: query.start,
        end: query.end,
        time_zone: &query.time_zone,
    };
    bucket.push(sql, "hour", end);
}

/// How rows are cut into time buckets, in a time zone.
pub(super) struct Bucket<'a> {
    pub window: Window,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub time_zone: &'a str,
}

impl Bucket<'_> {
    /// Pushes the start (or, with `end`, the end) of the bucket holding `column`. Local days
    /// and months are cut in the zone, so DST days are 23 or 25 hours long.
    pub(super) fn push(&self, sql: &mut QueryBuilder<Postgres>, column: &str, end: bool) {
        let unit = match self.window {
            Window::Whole => {
                sql.push_bind(if end { self.end } else { self.start });
                sql.push("::timestamptz");
                return;
            }
            Window::Hour => {
                sql.push(if end {
                    format!("({column} + interval '1 hour')")
                } else {
                    column.to_owned()
                });
                return;
            }
            Window::Day => "day",
            Window::Month => "month",
        };
        if end {
            sql.push(format_args!("((date_trunc('{unit}', {column}, "));
            sql.push_bind(self.time_zone.to_owned());
            sql.push(") AT TIME ZONE ");
            sql.push_bind(self.time_zone.to_owned());
            sql.push(format_args!(" + interval '1 {unit}') AT TIME ZONE "));
            sql.push_bind(self.time_zone.to_owned());
            sql.push(")");
        } else {
            sql.push(format_args!("date_trunc('{unit}', {column}, "));
            sql.push_bind(self.time_zone.to_owned());
            sql.push(")");
        }
    }
}

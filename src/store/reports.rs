//! SQL of the reports, answered from `usage_rollups` (never by scanning raw events).

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
    sql.push(format_args!(
        ", sum(billed_amount) AS billed, sum(cost_amount) AS cost,
           sum({events})::int8 AS event_count, sum({unpriced_events})::int8 AS unpriced_event_count,
           sum(unpriced_tokens)::int8 AS unpriced_tokens
         FROM usage_rollups WHERE hour >= "
    ));
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

    let rows = sql.build().fetch_all(pool).await?;
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

//! The facts an attribution report is built from: usage per transaction state from the state
//! rollup (`usage_state_rollups`, kept at ingest and moved when a transaction's state changes —
//! see `store::usage_by_state`), lifecycle events in the range, and each transaction's spend per
//! model. `domain::attribution` turns them into rows.
//!
//! Postgres adds up as much as the report allows, so that what crosses the wire grows with the
//! rows of the report rather than with the transactions behind them: usage per group and
//! transaction state always, lifecycle events per row and kind unless rows are split by model
//! (a model's share of a transaction's revenue needs each event on its own, and each
//! transaction's spend per model from the per-transaction `usage_rollups`).

use std::collections::BTreeMap;

use chrono::{DateTime, DurationRound, Offset, TimeDelta, TimeZone, Utc};
use futures::TryStreamExt;
use rust_decimal::Decimal;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Postgres, QueryBuilder, Row as _};

use super::StoreError;
use super::reports::{Bucket, Window};
use crate::domain::attribution::{
    Attribution, Grouping, LifecycleFact, LifecycleKind, ModelFilter, ModelSpend, Row, RowKey,
    UsageFact, attribute,
};
use crate::domain::tokens::{CLASS_COUNT, TokenClass};
use crate::domain::transaction::State;

#[derive(Debug, Clone)]
pub struct AttributionQuery {
    /// Empty means every tenant.
    pub tenant_ids: Vec<String>,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub window: Window,
    pub time_zone: String,
    pub agent_ids: Vec<String>,
    pub services: Vec<String>,
    pub providers: Vec<String>,
    pub models: Vec<String>,
}

/// The facts, and where each bucket ends.
#[derive(Debug, Default)]
pub struct Facts {
    pub usage: Vec<UsageFact>,
    pub lifecycle: Vec<LifecycleFact>,
    pub shares: Vec<ModelSpend>,
    pub bucket_ends: BTreeMap<DateTime<Utc>, DateTime<Utc>>,
}

/// How fine the rollup rows a report reads are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grain {
    /// `usage_state_rollups`, `lifecycle_rollups`, `lifecycle_rollup_pairs`.
    Hour,
    /// Their daily counterparts (migration 0010). Only where [`daily_rollups_apply`].
    Day,
}

impl Grain {
    /// The usage rollup and its time column.
    fn usage(self) -> (&'static str, &'static str) {
        match self {
            Grain::Hour => ("usage_state_rollups", "hour"),
            Grain::Day => ("usage_state_daily_rollups", "day"),
        }
    }

    /// The lifecycle rollup, its pairs, and their time columns.
    fn lifecycle(self) -> (&'static str, &'static str, &'static str, &'static str) {
        match self {
            Grain::Hour => (
                "lifecycle_rollups",
                "lifecycle_rollup_pairs",
                "hour",
                "next_hour",
            ),
            Grain::Day => (
                "lifecycle_daily_rollups",
                "lifecycle_daily_rollup_pairs",
                "day",
                "next_day",
            ),
        }
    }
}

/// Where a report's lifecycle facts come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifecycleSource {
    /// Every lifecycle event of the range, one by one or added up by Postgres per row and kind.
    Events,
    /// `lifecycle_rollups` (migration 0008), plus the events of `mixed` transactions one by
    /// one. Only for reports that [`rollups_apply`] to and that are not split by model.
    Rollups,
}

/// The facts of a report grouped as `grouping` says. Shares are loaded (and lifecycle events
/// kept one by one) when rows are split by model or the query filters by provider or model:
/// a model's share of a transaction's revenue needs the transaction, so those reports read
/// every lifecycle event of their range. Others read the lifecycle rollups when they apply.
pub async fn facts(
    conn: &mut PgConnection,
    query: &AttributionQuery,
    grouping: Grouping,
) -> Result<Facts, StoreError> {
    let source = if with_shares(query, grouping) || !rollups_apply(query) {
        LifecycleSource::Events
    } else {
        LifecycleSource::Rollups
    };
    let grain = if daily_rollups_apply(conn, query).await? {
        Grain::Day
    } else {
        Grain::Hour
    };
    facts_from(conn, query, grouping, grain, source).await
}

/// An attribution report's rows, and where each of their buckets ends.
#[derive(Debug)]
pub struct Report {
    pub rows: BTreeMap<RowKey, Row>,
    pub bucket_ends: BTreeMap<DateTime<Utc>, DateTime<Utc>>,
}

/// The rows of a report. One split by model (or filtered by model or provider) reads every
/// lifecycle event of its range and each transaction's spend per model, so it reads them from
/// one query ordered by transaction and adds them up a transaction at a time: the service holds
/// the rows and one transaction's facts instead of every event of the range (gigabytes for a
/// busy tenant-month).
pub async fn report(
    conn: &mut PgConnection,
    query: &AttributionQuery,
    grouping: Grouping,
    filter: &ModelFilter,
) -> Result<Report, StoreError> {
    if !with_shares(query, grouping) {
        let facts = facts(conn, query, grouping).await?;
        return Ok(Report {
            rows: attribute(
                &facts.usage,
                &facts.lifecycle,
                &facts.shares,
                grouping,
                filter,
            ),
            bucket_ends: facts.bucket_ends,
        });
    }
    let grain = if daily_rollups_apply(conn, query).await? {
        Grain::Day
    } else {
        Grain::Hour
    };
    let mut usage_facts = Facts::default();
    usage(conn, query, grain, &mut usage_facts).await?;
    let mut attribution = Attribution::new(grouping, filter);
    for fact in &usage_facts.usage {
        attribution.add_usage(fact);
    }
    let mut bucket_ends = usage_facts.bucket_ends;

    let mut sql = lifecycle_facts_sql(query, Read::All);
    sql.push("), picked AS (SELECT *, 1::int8 AS transactions FROM facts WHERE true");
    any_of(&mut sql, "agent_id", &query.agent_ids);
    any_of(&mut sql, "service", &query.services);
    sql.push(
        "), spend AS (
             SELECT r.tenant_id::text AS tenant_id, r.transaction_id::text AS transaction_id,
                    r.provider::text AS provider, r.model::text AS model,
                    sum(r.billed_amount) AS spend
             FROM (",
    );
    sql.push(transaction_spend_rows(
        "(SELECT tenant_id, transaction_id FROM picked)",
    ));
    sql.push(
        ") AS r
             GROUP BY 1, 2, 3, 4)
         SELECT 0 AS part, tenant_id, transaction_id, provider, model, spend,
                NULL::timestamptz AS bucket_start, NULL::timestamptz AS bucket_end,
                NULL::text AS agent_id, NULL::text AS service, NULL::int2 AS kind,
                NULL::numeric AS amount, NULL::text AS currency, NULL::int8 AS transactions
         FROM spend
         UNION ALL
         SELECT 1, tenant_id, transaction_id, NULL, NULL, NULL, bucket_start, bucket_end,
                agent_id, service, kind, amount, currency, transactions
         FROM picked
         ORDER BY 2, 3, 1, 4, 5",
    );
    // A transaction's spend per model (in the order `split` weighs them), then its events.
    let mut transaction = Facts::default();
    let mut current: Option<(String, String)> = None;
    let mut rows = sql.build().fetch(&mut *conn);
    while let Some(row) = rows.try_next().await? {
        let key: (String, String) = (row.try_get("tenant_id")?, row.try_get("transaction_id")?);
        if current.as_ref() != Some(&key) {
            attribution.add_lifecycle(&transaction.lifecycle, &transaction.shares);
            transaction.lifecycle.clear();
            transaction.shares.clear();
            current = Some(key.clone());
        }
        if row.try_get::<i32, _>("part")? == 0 {
            transaction.shares.push(ModelSpend {
                tenant_id: key.0,
                transaction_id: key.1,
                provider: row.try_get("provider")?,
                model: row.try_get("model")?,
                spend: row.try_get("spend")?,
            });
        } else {
            push_lifecycle_fact(&row, &mut transaction)?;
        }
    }
    attribution.add_lifecycle(&transaction.lifecycle, &transaction.shares);
    bucket_ends.append(&mut transaction.bucket_ends);
    Ok(Report {
        rows: attribution.finish(),
        bucket_ends,
    })
}

/// [`facts`] from rollups of `grain` and with the lifecycle facts from `source` (all give the
/// same rows where they apply; the tests hold them to it).
pub async fn facts_from(
    conn: &mut PgConnection,
    query: &AttributionQuery,
    grouping: Grouping,
    grain: Grain,
    source: LifecycleSource,
) -> Result<Facts, StoreError> {
    let with_shares = with_shares(query, grouping);
    let mut facts = Facts::default();
    usage(conn, query, grain, &mut facts).await?;
    match source {
        LifecycleSource::Events => {
            let added_up = (!with_shares).then_some(grouping);
            lifecycle(conn, query, added_up, Read::All, &mut facts).await?;
        }
        LifecycleSource::Rollups => {
            lifecycle_rollups(conn, query, grouping, grain, &mut facts).await?;
        }
    }
    if with_shares {
        shares(conn, query, &mut facts).await?;
    }
    Ok(facts)
}

fn with_shares(query: &AttributionQuery, grouping: Grouping) -> bool {
    grouping.by_model() || !query.providers.is_empty() || !query.models.is_empty()
}

/// Whether the hourly lifecycle rollups answer `query` exactly: its range starts and ends on
/// whole hours and, for days and months, the zone is a whole number of hours from UTC all
/// through it, so every event falls in the bucket of its hour.
pub fn rollups_apply(query: &AttributionQuery) -> bool {
    let on_the_hour = |t: DateTime<Utc>| t.duration_trunc(TimeDelta::hours(1)) == Ok(t);
    if !on_the_hour(query.start) || !on_the_hour(query.end) {
        return false;
    }
    match query.window {
        Window::Whole | Window::Hour => true,
        Window::Day | Window::Month => whole_hours_from_utc(&query.time_zone, query),
    }
}

/// Whether `zone` is a whole number of hours from UTC all through the range of `query`.
fn whole_hours_from_utc(zone: &str, query: &AttributionQuery) -> bool {
    let Ok(zone) = zone.parse::<chrono_tz::Tz>() else {
        return false;
    };
    let mut at = query.start;
    while at < query.end {
        let offset = zone.offset_from_utc_datetime(&at.naive_utc()).fix();
        if offset.local_minus_utc() % 3600 != 0 {
            return false;
        }
        at += TimeDelta::hours(1);
    }
    true
}

/// Whether the daily rollups (whose days are cut in each tenant's billing zone) add up to
/// exactly what the hourly ones give for `query`: the hourly ones apply, the query's tenants
/// share one billing zone, that zone is a whole number of hours from UTC all through the range
/// (so its days are whole hours), the range starts and ends at its local midnights, and the
/// report is bucketed by day or month in that zone, or not at all.
pub async fn daily_rollups_apply(
    conn: &mut PgConnection,
    query: &AttributionQuery,
) -> Result<bool, StoreError> {
    if !rollups_apply(query) || query.window == Window::Hour {
        return Ok(false);
    }
    // Local midnights as Postgres cuts them, as the daily rows were cut.
    let zones: Vec<(String, bool)> = sqlx::query_as(
        "SELECT DISTINCT billing_timezone::text,
                date_trunc('day', $1::timestamptz, billing_timezone) = $1
                    AND date_trunc('day', $2::timestamptz, billing_timezone) = $2
         FROM tenants WHERE cardinality($3::text[]) = 0 OR tenant_id = ANY($3)",
    )
    .bind(query.start)
    .bind(query.end)
    .bind(&query.tenant_ids)
    .fetch_all(&mut *conn)
    .await?;
    let [(zone, at_midnights)] = zones.as_slice() else {
        return Ok(false);
    };
    let same_buckets = query.window == Window::Whole || query.time_zone == *zone;
    Ok(*at_midnights && same_buckets && whole_hours_from_utc(zone, query))
}

fn bucket(query: &AttributionQuery) -> Bucket<'_> {
    Bucket {
        window: query.window,
        start: query.start,
        end: query.end,
        time_zone: &query.time_zone,
    }
}

/// ` AND <column> = ANY(values)` when `values` is not empty.
fn any_of(sql: &mut QueryBuilder<Postgres>, column: &str, values: &[String]) {
    if !values.is_empty() {
        sql.push(format_args!(" AND {column} = ANY("));
        sql.push_bind(values.to_vec());
        sql.push(")");
    }
}

/// The spend rows (tenant, transaction, provider, model, billed) of the transactions the
/// subquery `picked` names (it may refer to an outer `e`, never to `v`): from the frozen per-transaction rollup for events ingested before
/// ingest v2, from raw rows for the others (folded or not, so shares are exact as of the read).
fn transaction_spend_rows(picked: &str) -> String {
    format!(
        "SELECT tenant_id, transaction_id, provider, model, billed_amount FROM usage_rollups_v1
         WHERE (tenant_id, transaction_id) IN {picked}
         UNION ALL
         SELECT v.tenant_id, v.transaction_id COLLATE \"C\", v.provider COLLATE \"C\",
                v.model COLLATE \"C\", v.billed_amount
         FROM usage_events v
         WHERE v.ingest_batch IS NOT NULL AND v.transaction_id IS NOT NULL
           AND (v.tenant_id, v.transaction_id COLLATE \"C\") IN {picked}"
    )
}

fn tenants(sql: &mut QueryBuilder<Postgres>, column: &str, query: &AttributionQuery) {
    any_of(sql, column, &query.tenant_ids);
}

async fn usage(
    conn: &mut PgConnection,
    query: &AttributionQuery,
    grain: Grain,
    facts: &mut Facts,
) -> Result<(), StoreError> {
    let (table, time_column) = grain.usage();
    let time = format!("r.{time_column}");
    let mut sql: QueryBuilder<Postgres> = QueryBuilder::new("SELECT ");
    bucket(query).push(&mut sql, &time, false);
    sql.push(" AS bucket_start, ");
    bucket(query).push(&mut sql, &time, true);
    sql.push(
        " AS bucket_end, r.tenant_id::text AS tenant_id, r.agent_id::text AS agent_id,
          r.service::text AS service, r.provider::text AS provider, r.model::text AS model,
          r.currency::text AS currency, nullif(r.state, 0) AS state",
    );
    // Token columns are named after their class.
    for class in TokenClass::ALL {
        sql.push(format_args!(
            ", sum(r.{})::int8 AS t{}",
            class.as_str(),
            class as i16
        ));
    }
    // The folded rows and the batches still queued, at each transaction's state now (what
    // the folder will add them at), in one statement, so from one snapshot. Queued rows carry
    // their hour in the day column too: the daily rows are read only for ranges and buckets
    // cut at whole hours, where an hour falls in its day's bucket.
    let classes: Vec<&str> = TokenClass::ALL.iter().map(|c| c.as_str()).collect();
    sql.push(format_args!(
        ", sum(r.billed_amount) AS spend, sum(r.cost_amount) AS cost,
           sum(r.events)::int8 AS events, sum(r.unpriced_events)::int8 AS unpriced_events
         FROM (SELECT tenant_id, {time_column}, agent_id, service, provider, model, currency, state,
                      {classes}, billed_amount, cost_amount, events, unpriced_events
               FROM {table}",
        classes = classes.join(", "),
    ));
    if let Some(oldest) = super::fold::oldest_queued(&mut *conn).await? {
        let queued_classes: Vec<String> = classes.iter().map(|c| format!("e.{c}")).collect();
        // OFFSET 0 keeps the report's filters out of the tail: it is read by batch (bounded by
        // the queue), never through a tenant's whole history.
        sql.push(format_args!(
            " UNION ALL
               SELECT * FROM (
                 SELECT e.tenant_id, date_trunc('hour', e.occurred_at, 'UTC'),
                        e.agent_id COLLATE \"C\", coalesce(e.service, '') COLLATE \"C\",
                        e.provider COLLATE \"C\", e.model COLLATE \"C\",
                        e.currency::text COLLATE \"C\",
                        (CASE WHEN e.transaction_id IS NULL THEN 0
                              ELSE coalesce(s.state, 1) END)::int2,
                        {queued_classes}, e.billed_amount, e.cost_amount, 1::int8,
                        (e.unpriced_tokens > 0)::int::int8
                 FROM usage_events e
                 LEFT JOIN transaction_states s
                   ON s.tenant_id = e.tenant_id
                  AND s.transaction_id = e.transaction_id COLLATE \"C\"
                 WHERE {queued} AND e.occurred_at >= ",
            queued_classes = queued_classes.join(", "),
            queued = super::reports::queued_since(oldest),
        ));
        // A superset of the range (bucket edges are cut exactly below), for partition pruning.
        sql.push_bind(query.start - chrono::TimeDelta::days(1))
            .push(" AND e.occurred_at < ")
            .push_bind(query.end + chrono::TimeDelta::days(1))
            .push(" OFFSET 0) AS queued");
    }
    sql.push(format_args!(") AS r WHERE {time} >= "));
    sql.push_bind(query.start)
        .push(format_args!(" AND {time} < "))
        .push_bind(query.end);
    tenants(&mut sql, "r.tenant_id", query);
    any_of(&mut sql, "r.agent_id", &query.agent_ids);
    any_of(&mut sql, "r.service", &query.services);
    any_of(&mut sql, "r.provider", &query.providers);
    any_of(&mut sql, "r.model", &query.models);
    sql.push(" GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9");
    // Not prepared for reuse: the tail's bound is part of the text.
    for row in sql.build().persistent(false).fetch_all(&mut *conn).await? {
        let start: DateTime<Utc> = row.try_get("bucket_start")?;
        facts.bucket_ends.insert(start, row.try_get("bucket_end")?);
        let state: Option<i16> = row.try_get("state")?;
        let mut tokens = [0i64; CLASS_COUNT];
        for (i, slot) in tokens.iter_mut().enumerate() {
            *slot = row.try_get(format!("t{}", i + 1).as_str())?;
        }
        facts.usage.push(UsageFact {
            bucket: start,
            tenant_id: row.try_get("tenant_id")?,
            agent_id: row.try_get("agent_id")?,
            service: row.try_get("service")?,
            provider: row.try_get("provider")?,
            model: row.try_get("model")?,
            currency: row.try_get("currency")?,
            state: state.map(State::from_number),
            tokens,
            spend: row.try_get("spend")?,
            cost: row.try_get("cost")?,
            events: row.try_get("events")?,
            unpriced_events: row.try_get("unpriced_events")?,
        });
    }
    Ok(())
}

/// The first non-null `column` of the event's transaction, looked up only for the events that
/// lack it (most carry their agent and service).
fn transaction_first(column: &str) -> String {
    format!(
        "coalesce(e.{column}, (SELECT f.{column} FROM transaction_events f
                               WHERE f.tenant_id = e.tenant_id
                                 AND f.transaction_id = e.transaction_id
                                 AND f.{column} IS NOT NULL
                               ORDER BY f.occurred_at, f.event_id LIMIT 1), '')::text"
    )
}

/// Lifecycle events in the range, one by one, or added up per row and kind when `added_up`
/// gives the grouping of the rows. A reversal takes back the revenue net of the refunds before
/// it; only a transaction's first completion counts (later ones are anomalies). Money-less
/// events are in the tenant's billing currency.
async fn lifecycle(
    conn: &mut PgConnection,
    query: &AttributionQuery,
    added_up: Option<Grouping>,
    read: Read,
    facts: &mut Facts,
) -> Result<(), StoreError> {
    let mut sql = lifecycle_facts_sql(query, read);
    match added_up {
        None => {
            sql.push(") SELECT *, 1::int8 AS transactions FROM facts WHERE true");
        }
        Some(grouping) => {
            sql.push(format_args!(
                ") SELECT bucket_start, bucket_end, {}, {}, {}, ''::text AS transaction_id, kind,
                          sum(amount) AS amount, currency,
                          count(DISTINCT transaction_id)::int8 AS transactions
                   FROM facts WHERE true",
                dimension(grouping.tenant, "tenant_id"),
                dimension(grouping.agent, "agent_id"),
                dimension(grouping.service, "service"),
            ));
        }
    }
    any_of(&mut sql, "agent_id", &query.agent_ids);
    any_of(&mut sql, "service", &query.services);
    if added_up.is_some() {
        sql.push(" GROUP BY 1, 2, 3, 4, 5, 6, 7, 9");
    }
    for row in sql.build().fetch_all(&mut *conn).await? {
        push_lifecycle_fact(&row, facts)?;
    }
    Ok(())
}

/// The lifecycle facts of the range, one per event, as the CTEs `first_completion` and
/// `facts`; the caller closes the `WITH` and selects from them.
fn lifecycle_facts_sql(query: &AttributionQuery, read: Read) -> QueryBuilder<Postgres> {
    let mut sql: QueryBuilder<Postgres> = QueryBuilder::new(
        "WITH first_completion AS (
             SELECT DISTINCT ON (tenant_id, transaction_id) tenant_id, transaction_id, event_id,
                    amount, currency
             FROM transaction_events WHERE kind = 2",
    );
    tenants(&mut sql, "tenant_id", query);
    read.push(&mut sql, "");
    sql.push(
        " ORDER BY tenant_id, transaction_id, occurred_at, event_id),
         facts AS (
             SELECT ",
    );
    bucket(query).push(&mut sql, "e.occurred_at", false);
    sql.push(" AS bucket_start, ");
    bucket(query).push(&mut sql, "e.occurred_at", true);
    sql.push(
        " AS bucket_end, e.tenant_id::text AS tenant_id,
                ",
    );
    sql.push(transaction_first("agent_id"));
    sql.push(" AS agent_id, ");
    sql.push(transaction_first("service"));
    sql.push(
        " AS service,
                e.transaction_id::text AS transaction_id, e.kind,
                CASE WHEN e.kind = 4 THEN e.amount
                     WHEN e.kind = 2 THEN e.amount
                     WHEN e.kind = 5 THEN coalesce(c.amount - coalesce((
                         SELECT sum(f.amount) FROM transaction_events f
                         WHERE f.tenant_id = e.tenant_id AND f.transaction_id = e.transaction_id
                           AND f.kind = 4 AND f.currency = c.currency
                           AND (f.occurred_at, f.event_id) < (e.occurred_at, e.event_id)), 0), 0)
                     ELSE 0 END AS amount,
                CASE WHEN e.kind IN (2, 4) THEN e.currency
                     WHEN e.kind = 5 THEN coalesce(c.currency, t.currency)
                     ELSE t.currency END::text AS currency
             FROM transaction_events e
             JOIN tenants t ON t.tenant_id = e.tenant_id
             LEFT JOIN first_completion c
               ON c.tenant_id = e.tenant_id AND c.transaction_id = e.transaction_id
             WHERE e.occurred_at >= ",
    );
    sql.push_bind(query.start)
        .push(" AND e.occurred_at < ")
        .push_bind(query.end);
    tenants(&mut sql, "e.tenant_id", query);
    read.push(&mut sql, "e.");
    sql.push(" AND (e.kind <> 2 OR e.event_id = c.event_id)");
    if !query.providers.is_empty() || !query.models.is_empty() {
        sql.push(" AND EXISTS (SELECT 1 FROM (");
        sql.push(transaction_spend_rows(
            "(SELECT e.tenant_id, e.transaction_id)",
        ));
        sql.push(") AS r WHERE true");
        any_of(&mut sql, "r.provider", &query.providers);
        any_of(&mut sql, "r.model", &query.models);
        sql.push(")");
    }
    sql
}

/// The grouped column, or `''` under its name when rows are not grouped by it.
fn dimension(grouped: bool, column: &str) -> String {
    if grouped {
        column.to_owned()
    } else {
        format!("''::text AS {column}")
    }
}

/// A lifecycle fact from a row of `bucket_start`, `bucket_end`, `tenant_id`, `agent_id`,
/// `service`, `transaction_id`, `transactions`, `kind`, `amount` and `currency`.
fn push_lifecycle_fact(row: &PgRow, facts: &mut Facts) -> Result<(), StoreError> {
    let start: DateTime<Utc> = row.try_get("bucket_start")?;
    facts.bucket_ends.insert(start, row.try_get("bucket_end")?);
    let kind = match row.try_get::<i16, _>("kind")? {
        1 => LifecycleKind::Started,
        2 => LifecycleKind::Completed,
        3 => LifecycleKind::Failed,
        4 => LifecycleKind::Refunded,
        _ => LifecycleKind::Reversed,
    };
    let amount: Option<Decimal> = row.try_get("amount")?;
    facts.lifecycle.push(LifecycleFact {
        bucket: start,
        tenant_id: row.try_get("tenant_id")?,
        agent_id: row.try_get("agent_id")?,
        service: row.try_get("service")?,
        transaction_id: row.try_get("transaction_id")?,
        transactions: row.try_get("transactions")?,
        kind,
        amount: amount.unwrap_or_default(),
        currency: row.try_get("currency")?,
    });
    Ok(())
}

/// Which transactions' lifecycle events [`lifecycle`] reads.
#[derive(Debug, Clone, Copy)]
enum Read {
    All,
    /// Only those the lifecycle rollups leave out (see migration 0008).
    Mixed,
}

impl Read {
    fn push(self, sql: &mut QueryBuilder<Postgres>, alias: &str) {
        if let Read::Mixed = self {
            sql.push(format_args!(
                " AND ({alias}tenant_id, {alias}transaction_id) IN (
                     SELECT tenant_id, transaction_id FROM transaction_states WHERE mixed)"
            ));
        }
    }
}

/// Lifecycle facts added up per row and kind from the lifecycle rollups of `grain`, whose hours
/// (or days) are added up per bucket, less the pairs of them of one transaction in one bucket (so a transaction
/// counts once per bucket, as it does read event by event), plus the facts of the transactions
/// the rollups leave out, read event by event. One fact per row and kind.
async fn lifecycle_rollups(
    conn: &mut PgConnection,
    query: &AttributionQuery,
    grouping: Grouping,
    grain: Grain,
    facts: &mut Facts,
) -> Result<(), StoreError> {
    let (rows_table, pairs_table, time, next_time) = grain.lifecycle();
    let mut sql: QueryBuilder<Postgres> = QueryBuilder::new("SELECT ");
    bucket(query).push(&mut sql, "x.at", false);
    sql.push(" AS bucket_start, ");
    bucket(query).push(&mut sql, "x.at", true);
    sql.push(format_args!(
        " AS bucket_end, {}, {}, {}, ''::text AS transaction_id, x.kind,
          sum(x.amount) AS amount, x.currency::text AS currency,
          sum(x.transactions)::int8 AS transactions
         FROM (SELECT {time} AS at, tenant_id::text, agent_id::text, service::text, kind,
                      currency, amount, transactions
               FROM {rows_table} WHERE {time} >= ",
        dimension(grouping.tenant, "tenant_id"),
        dimension(grouping.agent, "agent_id"),
        dimension(grouping.service, "service"),
    ));
    sql.push_bind(query.start)
        .push(format_args!(" AND {time} < "))
        .push_bind(query.end);
    tenants(&mut sql, "tenant_id", query);
    any_of(&mut sql, "agent_id", &query.agent_ids);
    any_of(&mut sql, "service", &query.services);
    sql.push(format_args!(
        " UNION ALL
          SELECT {time}, tenant_id::text, agent_id::text, service::text, kind, currency, 0,
                 -transactions
          FROM {pairs_table} p WHERE {time} >= "
    ));
    sql.push_bind(query.start)
        .push(format_args!(" AND {next_time} < "))
        .push_bind(query.end);
    tenants(&mut sql, "tenant_id", query);
    any_of(&mut sql, "agent_id", &query.agent_ids);
    any_of(&mut sql, "service", &query.services);
    sql.push(" AND ");
    bucket(query).push(&mut sql, &format!("p.{time}"), false);
    sql.push(" = ");
    bucket(query).push(&mut sql, &format!("p.{next_time}"), false);
    sql.push(") x GROUP BY 1, 2, 3, 4, 5, 6, 7, 9");
    let mut parts = Facts::default();
    for row in sql.build().fetch_all(&mut *conn).await? {
        push_lifecycle_fact(&row, &mut parts)?;
    }
    lifecycle(conn, query, Some(grouping), Read::Mixed, &mut parts).await?;
    facts.bucket_ends.extend(parts.bucket_ends);
    let mut rows: BTreeMap<_, LifecycleFact> = BTreeMap::new();
    for fact in parts.lifecycle {
        let key = (
            fact.bucket,
            fact.tenant_id.clone(),
            fact.agent_id.clone(),
            fact.service.clone(),
            fact.kind as u8,
            fact.currency.clone(),
        );
        match rows.get_mut(&key) {
            Some(row) => {
                row.transactions += fact.transactions;
                row.amount += fact.amount;
            }
            None => {
                rows.insert(key, fact);
            }
        }
    }
    facts.lifecycle.extend(rows.into_values());
    Ok(())
}

/// All-time spend per model of every transaction with a lifecycle event in the range.
async fn shares(
    conn: &mut PgConnection,
    query: &AttributionQuery,
    facts: &mut Facts,
) -> Result<(), StoreError> {
    let mut sql: QueryBuilder<Postgres> = QueryBuilder::new(
        "WITH picked AS (
             SELECT DISTINCT tenant_id, transaction_id FROM transaction_events
             WHERE occurred_at >= ",
    );
    sql.push_bind(query.start)
        .push(" AND occurred_at < ")
        .push_bind(query.end);
    tenants(&mut sql, "tenant_id", query);
    sql.push(
        ")
         SELECT r.tenant_id::text, r.transaction_id::text, r.provider::text, r.model::text,
                sum(r.billed_amount)
         FROM (",
    );
    sql.push(transaction_spend_rows(
        "(SELECT tenant_id, transaction_id FROM picked)",
    ));
    sql.push(") AS r GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4");
    let rows: Vec<(String, String, String, String, Decimal)> =
        sql.build_query_as().fetch_all(&mut *conn).await?;
    facts.shares = rows
        .into_iter()
        .map(
            |(tenant_id, transaction_id, provider, model, spend)| ModelSpend {
                tenant_id,
                transaction_id,
                provider,
                model,
                spend,
            },
        )
        .collect();
    Ok(())
}

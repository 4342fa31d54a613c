//! SQL of the lifecycle rollups (migration 0008): what lifecycle events add to attribution,
//! per tenant × hour × agent × service × kind × currency, so a report reads those rows instead
//! of every lifecycle event of its range. The migration says why each transaction's
//! contribution is derived from all its events and how distinct-transaction counts survive
//! adding hours up.
//!
//! Kept like the usage state rollup: when events of a transaction are stored, under its
//! `transaction_states` lock (taken by `usage_by_state::apply_state_changes` first), its
//! contributions are derived again, and the rollup rows they leave or enter are locked in key
//! order and recomputed from the contributions. A row's lock also guards the pair rows of its
//! key, which only this path writes.
//!
//! The daily rows and pairs (migration 0010) are then recomputed from the hourly ones for the
//! local days (tenant's billing zone) of the hours touched, locked the same way after them.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{PgConnection, Postgres};

use super::StoreError;
use super::usage_by_state::Transactions;

/// tenant × hour × agent × service × kind × currency.
type RowKey = (String, DateTime<Utc>, String, String, i16, String);

/// Derives the contributions of `transactions` (whose `transaction_states` rows the caller
/// holds locked) from all their events, and brings the rollup rows they touch up to date.
pub async fn apply(
    conn: &mut PgConnection,
    transactions: &Transactions<'_>,
) -> Result<(), StoreError> {
    if transactions.is_empty() {
        return Ok(());
    }
    let tenants: Vec<&str> = transactions.iter().map(|(t, _)| *t).collect();
    let ids: Vec<&str> = transactions.iter().map(|(_, x)| *x).collect();
    let before: Vec<RowKey> = sqlx::query_as(
        "DELETE FROM lifecycle_contributions c
         USING unnest($1::text[], $2::text[]) AS k (t, x)
         WHERE c.tenant_id = k.t AND c.transaction_id = k.x
         RETURNING c.tenant_id::text, c.hour, c.agent_id::text, c.service::text, c.kind,
                   c.currency::text",
    )
    .bind(&tenants)
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let after: Vec<RowKey> = sqlx::query_as(
        "WITH k AS (
             UPDATE transaction_states s SET mixed = transaction_is_mixed(s.tenant_id, s.transaction_id)
             FROM unnest($1::text[], $2::text[]) AS k (t, x)
             WHERE s.tenant_id = k.t AND s.transaction_id = k.x
             RETURNING s.tenant_id, s.transaction_id, s.mixed)
         INSERT INTO lifecycle_contributions
         SELECT f.* FROM k
         CROSS JOIN LATERAL lifecycle_contributions_of(k.tenant_id, k.transaction_id) f
         WHERE NOT k.mixed
         RETURNING tenant_id::text, hour, agent_id::text, service::text, kind, currency::text",
    )
    .bind(&tenants)
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let keys: BTreeSet<RowKey> = before.into_iter().chain(after).collect();
    recompute(conn, &keys).await
}

/// Locks the rows of `keys` in key order (creating the missing ones empty), then sets each,
/// and its pairs, from the contributions — or deletes it when none is left.
async fn recompute(conn: &mut PgConnection, keys: &BTreeSet<RowKey>) -> Result<(), StoreError> {
    if keys.is_empty() {
        return Ok(());
    }
    bind_keys(
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO lifecycle_rollups AS l
             (tenant_id, hour, agent_id, service, kind, currency, transactions, amount)
         SELECT *, 0, 0 FROM {HOURLY_KEYS}
         ON CONFLICT (tenant_id, hour, agent_id, service, kind, currency)
         DO UPDATE SET transactions = l.transactions"
        ))),
        keys,
    )
    .execute(&mut *conn)
    .await?;
    let set = set_rows(
        "lifecycle_rollups",
        "lifecycle_rollup_pairs",
        "hour",
        &format!("SELECT * FROM {HOURLY_KEYS}"),
        "lifecycle_rollup_of(k.tenant_id, k.hour, k.agent_id, k.service, k.kind, k.currency)",
    );
    bind_keys(sqlx::query(sqlx::AssertSqlSafe(set)), keys)
        .execute(&mut *conn)
        .await?;
    bind_keys(
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO lifecycle_rollup_pairs
         SELECT k.*, f.next_hour, f.transactions
         FROM {HOURLY_KEYS}
         CROSS JOIN LATERAL lifecycle_rollup_pairs_of(k.tenant_id, k.hour, k.agent_id,
                                                      k.service, k.kind, k.currency) f"
        ))),
        keys,
    )
    .execute(&mut *conn)
    .await?;
    recompute_daily(conn, keys).await
}

/// The six key arrays bound by [`bind_keys`], as a table `k` of hourly keys.
const HOURLY_KEYS: &str = "unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[],
                                  $5::int2[], $6::text[])
         AS k (tenant_id, hour, agent_id, service, kind, currency)";

/// The hourly keys bound by [`bind_keys`] as their daily keys `k`, with the tenant's zone.
fn daily_keys() -> String {
    format!(
        "(SELECT DISTINCT k.tenant_id, date_trunc('day', k.hour, t.billing_timezone) AS day,
                t.billing_timezone AS zone, k.agent_id, k.service, k.kind, k.currency
         FROM {HOURLY_KEYS} JOIN tenants t ON t.tenant_id = k.tenant_id) k"
    )
}

/// Locks the daily rows of the days the hourly `keys` fall in, in key order (creating the
/// missing ones empty), then sets each, and its pairs, from the hourly rows and pairs of its
/// day — or deletes it when they hold none.
async fn recompute_daily(
    conn: &mut PgConnection,
    keys: &BTreeSet<RowKey>,
) -> Result<(), StoreError> {
    bind_keys(
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO lifecycle_daily_rollups AS l
             (tenant_id, day, agent_id, service, kind, currency, transactions, amount)
         SELECT DISTINCT k.tenant_id COLLATE \"C\", date_trunc('day', k.hour, t.billing_timezone),
                k.agent_id COLLATE \"C\", k.service COLLATE \"C\", k.kind,
                k.currency COLLATE \"C\", 0, 0
         FROM {HOURLY_KEYS}
         JOIN tenants t ON t.tenant_id = k.tenant_id
         ORDER BY 1, 2, 3, 4, 5, 6
         ON CONFLICT (tenant_id, day, agent_id, service, kind, currency)
         DO UPDATE SET transactions = l.transactions"
        ))),
        keys,
    )
    .execute(&mut *conn)
    .await?;
    let set = set_rows(
        "lifecycle_daily_rollups",
        "lifecycle_daily_rollup_pairs",
        "day",
        &format!("SELECT * FROM {}", daily_keys()),
        "lifecycle_daily_rollup_of(k.tenant_id, k.day, local_day_end(k.day, k.zone), k.agent_id,
                                   k.service, k.kind, k.currency)",
    );
    bind_keys(sqlx::query(sqlx::AssertSqlSafe(set)), keys)
        .execute(&mut *conn)
        .await?;
    let pairs = format!(
        "INSERT INTO lifecycle_daily_rollup_pairs
         SELECT k.tenant_id, k.day, k.agent_id, k.service, k.kind, k.currency, f.next_day,
                f.transactions
         FROM {}
         CROSS JOIN LATERAL lifecycle_daily_rollup_pairs_of(
             k.tenant_id, k.day, local_day_end(k.day, k.zone), k.zone, k.agent_id, k.service,
             k.kind, k.currency) f",
        daily_keys()
    );
    bind_keys(sqlx::query(sqlx::AssertSqlSafe(pairs)), keys)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// A statement setting the rows of the lifecycle rollup `rows` whose keys the query `keys`
/// gives from `truth` (a function of a key `k` giving `transactions` and `amount`), deleting
/// those it gives nothing for, and deleting the keys' pairs from `pairs`, to be inserted
/// again. `time` is the tables' time column.
fn set_rows(rows: &str, pairs: &str, time: &str, keys: &str, truth: &str) -> String {
    let key = |a: &str| {
        format!("({a}.tenant_id, {a}.{time}, {a}.agent_id, {a}.service, {a}.kind, {a}.currency)")
    };
    format!(
        "WITH k AS ({keys}),
         truth AS (SELECT k.*, f.transactions, f.amount FROM k CROSS JOIN LATERAL {truth} f),
         updated AS (
             UPDATE {rows} l SET transactions = t.transactions, amount = t.amount
             FROM truth t WHERE {} = {}),
         emptied AS (
             DELETE FROM {rows} l USING k
             WHERE {} = {} AND NOT EXISTS (SELECT 1 FROM truth t WHERE {} = {}))
         DELETE FROM {pairs} p USING k WHERE {} = {}",
        key("l"),
        key("t"),
        key("l"),
        key("k"),
        key("t"),
        key("k"),
        key("p"),
        key("k"),
    )
}

/// Binds `keys` as the six key arrays `$1` to `$6`.
fn bind_keys<'q>(
    query: Query<'q, Postgres, PgArguments>,
    keys: &'q BTreeSet<RowKey>,
) -> Query<'q, Postgres, PgArguments> {
    let text = |f: fn(&RowKey) -> &str| keys.iter().map(f).collect::<Vec<&str>>();
    query
        .bind(text(|k| &k.0))
        .bind(keys.iter().map(|k| k.1).collect::<Vec<_>>())
        .bind(text(|k| &k.2))
        .bind(text(|k| &k.3))
        .bind(keys.iter().map(|k| k.4).collect::<Vec<_>>())
        .bind(text(|k| &k.5))
}

//! SQL of the usage rollup by transaction state (`usage_state_rollups`, migration 0007), which
//! attribution reads instead of joining every per-transaction rollup to its transaction's state.
//!
//! It must stay equal to `usage_rollups` added up per transaction state now, whatever the order
//! of usage and lifecycle events and however they race. Both write paths therefore take the
//! transaction's `transaction_states` row lock first: ingest adds usage at the state it reads
//! under that lock; a lifecycle event that changes the state, under the same lock, recomputes
//! the rows the transaction's usage leaves and enters from `usage_rollups`, after locking those
//! rows too (so an ingest adding to them waits, and the recomputation sees every committed
//! addition). Transactions are locked before rollup rows (these before the lifecycle rollup
//! rows), each set in key order, on both paths, so batches spanning many transactions cannot
//! deadlock.
//!
//! The daily rows (`usage_state_daily_rollups`, migration 0010) are the hourly ones added up
//! by local day of the tenant's billing zone, written right after the hourly rows on both
//! paths: ingest adds the same sums, a state change recomputes the days of the hours it
//! recomputed. Daily rows are locked after hourly ones, in key order too.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{PgConnection, Postgres};

use super::StoreError;
use crate::domain::rollup::RollupBatch;
use crate::domain::tokens::{CLASS_COUNT, TokenClass};

/// `state` of usage on no transaction.
const NO_TRANSACTION: i16 = 0;

/// tenant × hour × agent × service × provider × model × currency × state.
type StateKey = (
    String,
    DateTime<Utc>,
    String,
    String,
    String,
    String,
    String,
    i16,
);

#[derive(Debug, Default)]
struct Sums {
    tokens: [i64; CLASS_COUNT],
    billed: Decimal,
    cost: Decimal,
    events: i64,
    unpriced_events: i64,
}

/// (tenant, transaction, hour, agent, service, provider, model, currency): where some of a
/// transaction's usage is.
type TransactionGroup = (
    String,
    String,
    DateTime<Utc>,
    String,
    String,
    String,
    String,
    String,
);

/// (tenant, transaction) pairs, in lock order.
pub type Transactions<'a> = BTreeSet<(&'a str, &'a str)>;

/// Locks the transactions' state rows in key order, creating the missing ones as not started
/// (no lifecycle event has been stored for them), and returns each one's state.
async fn lock(
    conn: &mut PgConnection,
    transactions: &Transactions<'_>,
) -> Result<HashMap<(String, String), i16>, StoreError> {
    if transactions.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(String, String, i16)> = sqlx::query_as(
        "INSERT INTO transaction_states AS s (tenant_id, transaction_id, state)
         SELECT t, x, 1 FROM unnest($1::text[], $2::text[]) AS k (t, x)
         ON CONFLICT (tenant_id, transaction_id) DO UPDATE SET state = s.state
         RETURNING tenant_id, transaction_id, state",
    )
    .bind(transactions.iter().map(|(t, _)| *t).collect::<Vec<_>>())
    .bind(transactions.iter().map(|(_, x)| *x).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(tenant, transaction, state)| ((tenant, transaction), state))
        .collect())
}

/// Adds an ingest batch's rollup deltas at the state each transaction is in, in the caller's
/// transaction, after the batch's `usage_rollups` rows.
pub async fn add(conn: &mut PgConnection, batch: &RollupBatch) -> Result<(), StoreError> {
    let transactions: Transactions<'_> = batch
        .rows()
        .filter(|(key, _, _)| !key.transaction_id.is_empty())
        .map(|(key, _, _)| (key.tenant_id.as_str(), key.transaction_id.as_str()))
        .collect();
    let states = lock(conn, &transactions).await?;
    let mut rows: BTreeMap<StateKey, Sums> = BTreeMap::new();
    for (key, class, value) in batch.rows() {
        let state = if key.transaction_id.is_empty() {
            NO_TRANSACTION
        } else {
            states
                .get(&(key.tenant_id.clone(), key.transaction_id.clone()))
                .copied()
                .unwrap_or(1)
        };
        let sums = rows
            .entry((
                key.tenant_id.clone(),
                key.hour,
                key.agent_id.clone(),
                key.service.clone(),
                key.provider.clone(),
                key.model.clone(),
                key.currency.clone(),
                state,
            ))
            .or_default();
        sums.tokens[class.index()] += value.tokens;
        sums.billed += value.billed;
        sums.cost += value.cost;
        sums.events += value.events;
        sums.unpriced_events += value.unpriced_events;
    }
    add_sums(conn, &rows).await
}

/// The key columns of both state rollups, `hour` or `day` second.
const KEY_COLUMNS: [&str; 8] = [
    "tenant_id",
    "hour",
    "agent_id",
    "service",
    "provider",
    "model",
    "currency",
    "state",
];

/// The value columns of both state rollups, in table order.
fn value_columns() -> impl Iterator<Item = &'static str> {
    TokenClass::ALL.map(TokenClass::as_str).into_iter().chain([
        "billed_amount",
        "cost_amount",
        "events",
        "unpriced_events",
    ])
}

/// Rows bound by [`bind_rows`], as a table `k` with the columns of `usage_state_rollups`.
fn unnest_rows() -> String {
    let columns: Vec<&str> = KEY_COLUMNS.into_iter().chain(value_columns()).collect();
    let types = [
        "text",
        "timestamptz",
        "text",
        "text",
        "text",
        "text",
        "text",
        "int2",
    ]
    .into_iter()
    .chain(std::iter::repeat_n("int8", CLASS_COUNT))
    .chain(["numeric", "numeric", "int8", "int8"]);
    let arrays: Vec<String> = types
        .enumerate()
        .map(|(i, ty)| format!("${}::{ty}[]", i + 1))
        .collect();
    format!(
        "unnest({}) AS k ({})",
        arrays.join(", "),
        columns.join(", ")
    )
}

/// ` ON CONFLICT (key) DO UPDATE` adding the new values to the stored ones; `time` is `hour`
/// or `day`.
fn add_on_conflict(time: &str) -> String {
    let key = KEY_COLUMNS
        .map(|c| if c == "hour" { time } else { c })
        .join(", ");
    let sums: Vec<String> = value_columns()
        .map(|c| format!("{c} = u.{c} + excluded.{c}"))
        .collect();
    format!(" ON CONFLICT ({key}) DO UPDATE SET {}", sums.join(", "))
}

/// Binds `rows` as the arrays of [`unnest_rows`].
fn bind_rows<'q>(
    query: Query<'q, Postgres, PgArguments>,
    rows: &'q BTreeMap<StateKey, Sums>,
) -> Query<'q, Postgres, PgArguments> {
    let mut query = bind_keys(query, rows.keys());
    for class in 0..CLASS_COUNT {
        query = query.bind(rows.values().map(|s| s.tokens[class]).collect::<Vec<_>>());
    }
    query
        .bind(rows.values().map(|s| s.billed).collect::<Vec<_>>())
        .bind(rows.values().map(|s| s.cost).collect::<Vec<_>>())
        .bind(rows.values().map(|s| s.events).collect::<Vec<_>>())
        .bind(rows.values().map(|s| s.unpriced_events).collect::<Vec<_>>())
}

/// Binds `keys` as the eight key arrays `$1`–`$8`.
fn bind_keys<'q, 'k: 'q>(
    query: Query<'q, Postgres, PgArguments>,
    keys: impl Iterator<Item = &'k StateKey> + Clone,
) -> Query<'q, Postgres, PgArguments> {
    let text = |f: fn(&'k StateKey) -> &'k str| keys.clone().map(f).collect::<Vec<&str>>();
    query
        .bind(text(|k| &k.0))
        .bind(keys.clone().map(|k| k.1).collect::<Vec<_>>())
        .bind(text(|k| &k.2))
        .bind(text(|k| &k.3))
        .bind(text(|k| &k.4))
        .bind(text(|k| &k.5))
        .bind(text(|k| &k.6))
        .bind(keys.clone().map(|k| k.7).collect::<Vec<_>>())
}

/// The daily key of the hourly key columns of `k` (joined to the tenant as `t`), byte-ordered
/// text as in the table, so `ORDER BY` locks rows in the same order on every path.
const DAILY_KEY: &str = "k.tenant_id COLLATE \"C\", date_trunc('day', k.hour, t.billing_timezone),
     k.agent_id COLLATE \"C\", k.service COLLATE \"C\", k.provider COLLATE \"C\",
     k.model COLLATE \"C\", k.currency COLLATE \"C\", k.state";

/// Adds an ingest batch's sums to the hourly rows, in key order, and then to the daily rows
/// of their local days, in key order, in one statement: ingest holds these rows' locks until it
/// commits, so a second round trip would lengthen the time concurrent batches wait on them.
/// The daily insert reads the count of the hourly one before its first row, so every hourly
/// row is locked before any daily one, as on the other paths.
async fn add_sums(
    conn: &mut PgConnection,
    rows: &BTreeMap<StateKey, Sums>,
) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let columns: Vec<&str> = KEY_COLUMNS
        .map(|c| if c == "hour" { "day" } else { c })
        .into_iter()
        .chain(value_columns())
        .collect();
    let sums: Vec<String> = value_columns()
        .map(|c| match c {
            "billed_amount" | "cost_amount" => format!("sum(k.{c})"),
            _ => format!("sum(k.{c})::int8"),
        })
        .collect();
    let sql = format!(
        "WITH hourly AS ({} RETURNING 1)
         INSERT INTO usage_state_daily_rollups AS u ({})
         SELECT {DAILY_KEY}, {}
         FROM {} JOIN tenants t ON t.tenant_id = k.tenant_id
         WHERE (SELECT count(*) FROM hourly) > 0
         GROUP BY 1, 2, 3, 4, 5, 6, 7, 8 ORDER BY 1, 2, 3, 4, 5, 6, 7, 8 {}",
        upsert_sql(),
        columns.join(", "),
        sums.join(", "),
        unnest_rows(),
        add_on_conflict("day"),
    );
    bind_rows(sqlx::query(sqlx::AssertSqlSafe(sql)), rows)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Adds `rows` to the stored hourly ones, in key order.
async fn upsert(
    conn: &mut PgConnection,
    rows: &BTreeMap<StateKey, Sums>,
) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    bind_rows(sqlx::query(sqlx::AssertSqlSafe(upsert_sql())), rows)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The statement adding the rows of [`bind_rows`] to the hourly rows.
fn upsert_sql() -> String {
    let columns: Vec<&str> = KEY_COLUMNS.into_iter().chain(value_columns()).collect();
    format!(
        "INSERT INTO usage_state_rollups AS u ({}) SELECT * FROM {} {}",
        columns.join(", "),
        unnest_rows(),
        add_on_conflict("hour"),
    )
}

/// After lifecycle events of `transactions` were stored in the caller's transaction: moves the
/// usage of each one whose state they changed from its old state's rows to its new state's.
/// Leaves the transactions locked (until the caller commits) for `lifecycle_rollups::apply`.
pub async fn apply_state_changes(
    conn: &mut PgConnection,
    transactions: &Transactions<'_>,
) -> Result<(), StoreError> {
    let before = lock(conn, transactions).await?;
    if before.is_empty() {
        return Ok(());
    }
    // Read after the locks are held: every event of a concurrent batch that committed first
    // is seen, and one that commits later will see this one's.
    let changed: Vec<(String, String, i16)> = sqlx::query_as(
        "UPDATE transaction_states s SET state = n.state
         FROM (SELECT e.tenant_id, e.transaction_id, transaction_state(array_agg(e.kind)) AS state
               FROM unnest($1::text[], $2::text[]) AS k (t, x)
               JOIN transaction_events e ON e.tenant_id = k.t AND e.transaction_id = k.x
               GROUP BY e.tenant_id, e.transaction_id) n
         WHERE s.tenant_id = n.tenant_id AND s.transaction_id = n.transaction_id
           AND s.state <> n.state
         RETURNING s.tenant_id::text, s.transaction_id::text, n.state",
    )
    .bind(transactions.iter().map(|(t, _)| *t).collect::<Vec<_>>())
    .bind(transactions.iter().map(|(_, x)| *x).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await?;
    if changed.is_empty() {
        return Ok(());
    }
    let moves: HashMap<(String, String), (i16, i16)> = changed
        .into_iter()
        .map(|(tenant, transaction, after)| {
            let key = (tenant, transaction);
            let was = before.get(&key).copied().unwrap_or(1);
            (key, (was, after))
        })
        .collect();
    let groups: Vec<TransactionGroup> = sqlx::query_as(
        "SELECT DISTINCT r.tenant_id::text, r.transaction_id::text, r.hour, r.agent_id::text,
                    r.service::text, r.provider::text, r.model::text, r.currency::text
             FROM unnest($1::text[], $2::text[]) AS k (t, x)
             JOIN usage_rollups r ON r.tenant_id = k.t AND r.transaction_id = k.x
             WHERE r.transaction_id <> ''",
    )
    .bind(moves.keys().map(|(t, _)| t.as_str()).collect::<Vec<_>>())
    .bind(moves.keys().map(|(_, x)| x.as_str()).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await?;
    let mut keys: BTreeSet<StateKey> = BTreeSet::new();
    for (tenant, transaction, hour, agent, service, provider, model, currency) in groups {
        let Some(&(was, now)) = moves.get(&(tenant.clone(), transaction)) else {
            continue;
        };
        for state in [was, now] {
            keys.insert((
                tenant.clone(),
                hour,
                agent.clone(),
                service.clone(),
                provider.clone(),
                model.clone(),
                currency.clone(),
                state,
            ));
        }
    }
    recompute(conn, &keys).await
}

/// Locks the rows of `keys` in key order (creating the missing ones empty, so that an ingest
/// about to add to one waits for this transaction), then sets each from `usage_rollups` — or
/// deletes it when no usage is left in it. Then does the same for the daily rows of their days.
async fn recompute(conn: &mut PgConnection, keys: &BTreeSet<StateKey>) -> Result<(), StoreError> {
    if keys.is_empty() {
        return Ok(());
    }
    let empty: BTreeMap<StateKey, Sums> =
        keys.iter().map(|k| (k.clone(), Sums::default())).collect();
    upsert(conn, &empty).await?;
    let sql = set_from_truth(
        "usage_state_rollups",
        "hour",
        &format!("SELECT * FROM {UNNEST_KEYS}"),
        "SELECT f.* FROM (SELECT DISTINCT tenant_id, hour, agent_id FROM k) g
         CROSS JOIN LATERAL usage_state_rollups_of(g.tenant_id, g.hour, g.agent_id) f",
    );
    bind_keys(sqlx::query(sqlx::AssertSqlSafe(sql)), keys.iter())
        .execute(&mut *conn)
        .await?;
    recompute_daily(conn, keys).await
}

/// The eight key arrays bound by [`bind_keys`], as a table `k` of hourly keys.
const UNNEST_KEYS: &str = "unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[],
                                 $5::text[], $6::text[], $7::text[], $8::int2[])
         AS k (tenant_id, hour, agent_id, service, provider, model, currency, state)";

/// `(a.key) = (b.key)` with `time` (`hour` or `day`) as the time column.
fn same_key(time: &str, a: &str, b: &str) -> String {
    let key = KEY_COLUMNS.map(|c| if c == "hour" { time } else { c });
    let side = |alias: &str| {
        key.iter()
            .map(|c| format!("{alias}.{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!("({}) = ({})", side(a), side(b))
}

/// A statement setting the rows of `table` whose keys the query `keys` gives from those the
/// query `truth` (rows `f` of the table's columns, which may read `k`) gives, and deleting
/// those `truth` has nothing for. `time` is the table's time column.
fn set_from_truth(table: &str, time: &str, keys: &str, truth: &str) -> String {
    let assignments: Vec<String> = value_columns().map(|c| format!("{c} = t.{c}")).collect();
    format!(
        "WITH k AS ({keys}),
         truth AS ({truth} JOIN k ON {}),
         updated AS (UPDATE {table} u SET {} FROM truth t WHERE {})
         DELETE FROM {table} u USING k
         WHERE {} AND NOT EXISTS (SELECT 1 FROM truth t WHERE {})",
        same_key(time, "k", "f"),
        assignments.join(", "),
        same_key(time, "u", "t"),
        same_key(time, "u", "k"),
        same_key(time, "t", "k"),
    )
}

/// Locks the daily rows of the days the hourly `keys` fall in, in key order (creating the
/// missing ones empty), then sets each from the hourly rows of its day, or deletes it when
/// they hold nothing for it.
async fn recompute_daily(
    conn: &mut PgConnection,
    keys: &BTreeSet<StateKey>,
) -> Result<(), StoreError> {
    let columns: Vec<&str> = KEY_COLUMNS
        .map(|c| if c == "hour" { "day" } else { c })
        .into_iter()
        .chain(value_columns())
        .collect();
    let zeros = vec!["0"; value_columns().count()].join(", ");
    let lock = format!(
        "INSERT INTO usage_state_daily_rollups AS u ({})
         SELECT DISTINCT {DAILY_KEY}, {zeros}
         FROM {UNNEST_KEYS} JOIN tenants t ON t.tenant_id = k.tenant_id
         ORDER BY 1, 2, 3, 4, 5, 6, 7, 8
         ON CONFLICT ({}) DO UPDATE SET events = u.events",
        columns.join(", "),
        columns[..8].join(", "),
    );
    bind_keys(sqlx::query(sqlx::AssertSqlSafe(lock)), keys.iter())
        .execute(&mut *conn)
        .await?;
    let set = set_from_truth(
        "usage_state_daily_rollups",
        "day",
        &format!(
            "SELECT DISTINCT k.tenant_id, date_trunc('day', k.hour, t.billing_timezone) AS day,
                    t.billing_timezone AS zone, k.agent_id, k.service, k.provider, k.model,
                    k.currency, k.state
             FROM {UNNEST_KEYS} JOIN tenants t ON t.tenant_id = k.tenant_id"
        ),
        "SELECT f.* FROM (SELECT DISTINCT tenant_id, day, zone, agent_id FROM k) g
         CROSS JOIN LATERAL usage_state_daily_rollups_of(
             g.tenant_id, g.day, local_day_end(g.day, g.zone), g.agent_id) f",
    );
    bind_keys(sqlx::query(sqlx::AssertSqlSafe(set)), keys.iter())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

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

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgConnection;

use super::StoreError;
use crate::domain::rollup::RollupBatch;
use crate::domain::tokens::TokenClass;

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
    tokens: [i64; 10],
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
    upsert(conn, &rows).await
}

/// Adds `rows` to the stored ones, in key order.
async fn upsert(
    conn: &mut PgConnection,
    rows: &BTreeMap<StateKey, Sums>,
) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut sql = String::from(
        "INSERT INTO usage_state_rollups AS u (tenant_id, hour, agent_id, service, provider,
             model, currency, state, input, cache_read, cache_write_5m, cache_write_1h, output,
             reasoning, input_audio, output_audio, input_image, output_image, billed_amount,
             cost_amount, events, unpriced_events)
         SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::text[],
             $6::text[], $7::text[], $8::int2[], $9::int8[], $10::int8[], $11::int8[],
             $12::int8[], $13::int8[], $14::int8[], $15::int8[], $16::int8[], $17::int8[],
             $18::int8[], $19::numeric[], $20::numeric[], $21::int8[], $22::int8[])
         ON CONFLICT (tenant_id, hour, agent_id, service, provider, model, currency, state)
         DO UPDATE SET billed_amount = u.billed_amount + excluded.billed_amount,
                       cost_amount = u.cost_amount + excluded.cost_amount,
                       events = u.events + excluded.events,
                       unpriced_events = u.unpriced_events + excluded.unpriced_events",
    );
    for column in TokenClass::ALL.map(TokenClass::as_str) {
        sql.push_str(&format!(", {column} = u.{column} + excluded.{column}"));
    }
    let keys = || rows.keys();
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(keys().map(|k| k.0.as_str()).collect::<Vec<_>>())
        .bind(keys().map(|k| k.1).collect::<Vec<_>>())
        .bind(keys().map(|k| k.2.as_str()).collect::<Vec<_>>())
        .bind(keys().map(|k| k.3.as_str()).collect::<Vec<_>>())
        .bind(keys().map(|k| k.4.as_str()).collect::<Vec<_>>())
        .bind(keys().map(|k| k.5.as_str()).collect::<Vec<_>>())
        .bind(keys().map(|k| k.6.as_str()).collect::<Vec<_>>())
        .bind(keys().map(|k| k.7).collect::<Vec<_>>());
    for class in 0..10 {
        query = query.bind(rows.values().map(|s| s.tokens[class]).collect::<Vec<_>>());
    }
    query
        .bind(rows.values().map(|s| s.billed).collect::<Vec<_>>())
        .bind(rows.values().map(|s| s.cost).collect::<Vec<_>>())
        .bind(rows.values().map(|s| s.events).collect::<Vec<_>>())
        .bind(rows.values().map(|s| s.unpriced_events).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
    Ok(())
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
/// deletes it when no usage is left in it.
async fn recompute(conn: &mut PgConnection, keys: &BTreeSet<StateKey>) -> Result<(), StoreError> {
    if keys.is_empty() {
        return Ok(());
    }
    let empty: BTreeMap<StateKey, Sums> =
        keys.iter().map(|k| (k.clone(), Sums::default())).collect();
    upsert(conn, &empty).await?;
    let assignments: Vec<String> = TokenClass::ALL
        .map(TokenClass::as_str)
        .iter()
        .chain(&["billed_amount", "cost_amount", "events", "unpriced_events"])
        .map(|column| format!("{column} = t.{column}"))
        .collect();
    let sql = format!(
        "WITH k AS (
             SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[],
                                  $5::text[], $6::text[], $7::text[], $8::int2[])
                 AS k (tenant_id, hour, agent_id, service, provider, model, currency, state)),
         truth AS (
             SELECT f.* FROM (SELECT DISTINCT tenant_id, hour, agent_id FROM k) g
             CROSS JOIN LATERAL usage_state_rollups_of(g.tenant_id, g.hour, g.agent_id) f
             JOIN k ON (k.tenant_id, k.hour, k.agent_id, k.service, k.provider, k.model,
                        k.currency, k.state)
                     = (f.tenant_id, f.hour, f.agent_id, f.service, f.provider, f.model,
                        f.currency, f.state)),
         updated AS (
             UPDATE usage_state_rollups u SET {}
             FROM truth t
             WHERE (u.tenant_id, u.hour, u.agent_id, u.service, u.provider, u.model, u.currency,
                    u.state)
                 = (t.tenant_id, t.hour, t.agent_id, t.service, t.provider, t.model, t.currency,
                    t.state))
         DELETE FROM usage_state_rollups u USING k
         WHERE (u.tenant_id, u.hour, u.agent_id, u.service, u.provider, u.model, u.currency, u.state)
             = (k.tenant_id, k.hour, k.agent_id, k.service, k.provider, k.model, k.currency, k.state)
           AND NOT EXISTS (SELECT 1 FROM truth t
                           WHERE (t.tenant_id, t.hour, t.agent_id, t.service, t.provider, t.model,
                                  t.currency, t.state)
                               = (k.tenant_id, k.hour, k.agent_id, k.service, k.provider,
                                  k.model, k.currency, k.state))",
        assignments.join(", ")
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(keys.iter().map(|k| k.0.as_str()).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.1).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.2.as_str()).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.3.as_str()).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.4.as_str()).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.5.as_str()).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.6.as_str()).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.7).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

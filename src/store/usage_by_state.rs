//! SQL of the usage rollups by transaction state (`usage_state_rollups` hourly, migration 0007,
//! and `usage_state_daily_rollups` by local day, migration 0010), which attribution reads
//! instead of joining every transaction's usage to its state.
//!
//! They must stay equal to the folded usage added up per transaction state now, whatever the
//! order of usage and lifecycle events and however they race. The folder (`fold_usage`,
//! migration 0013) adds a batch's usage at each transaction's state as it reads it under its
//! tenants' advisory locks taken shared; a lifecycle batch that changes states takes the same
//! locks exclusive, then moves each changed transaction's *folded* usage from its old state's
//! rows to its new state's (`move_transaction_usage`). Usage still queued is not moved: it is
//! folded at the new state later. Both paths lock tenants in `hashtext` order, then rows in key
//! order, so they cannot deadlock.

use std::collections::{BTreeSet, HashMap};

use sqlx::PgConnection;

use super::StoreError;

/// (tenant, transaction) pairs, in lock order.
pub type Transactions<'a> = BTreeSet<(&'a str, &'a str)>;

/// Takes the advisory locks of `tenants` exclusive, in `hashtext` order: no fold of their
/// usage runs until the caller's transaction ends.
pub async fn lock_tenants_exclusive(
    conn: &mut PgConnection,
    tenants: &BTreeSet<&str>,
) -> Result<(), StoreError> {
    if tenants.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "SELECT count(pg_advisory_xact_lock(k))
         FROM (SELECT DISTINCT hashtext(t) AS k FROM unnest($1::text[]) AS t ORDER BY 1) AS l",
    )
    .bind(tenants.iter().copied().collect::<Vec<_>>())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Locks the transactions' state rows in key order, creating the missing ones as not started
/// (no lifecycle event has been stored for them: usage on them was folded at state 1), and
/// returns each one's state.
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

/// After lifecycle events of `transactions` were stored in the caller's transaction: under
/// their tenants' exclusive advisory locks, moves the folded usage of each one whose state they
/// changed from its old state's rows to its new state's. Leaves the transactions locked (until
/// the caller commits) for `lifecycle_rollups::apply`.
pub async fn apply_state_changes(
    conn: &mut PgConnection,
    transactions: &Transactions<'_>,
) -> Result<(), StoreError> {
    if transactions.is_empty() {
        return Ok(());
    }
    let tenants: BTreeSet<&str> = transactions.iter().map(|(t, _)| *t).collect();
    lock_tenants_exclusive(conn, &tenants).await?;
    let before = lock(conn, transactions).await?;
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
    let was = |tenant: &String, transaction: &String| {
        before
            .get(&(tenant.clone(), transaction.clone()))
            .copied()
            .unwrap_or(1)
    };
    sqlx::query("SELECT move_transaction_usage($1, $2, $3, $4)")
        .bind(changed.iter().map(|c| c.0.as_str()).collect::<Vec<_>>())
        .bind(changed.iter().map(|c| c.1.as_str()).collect::<Vec<_>>())
        .bind(changed.iter().map(|c| was(&c.0, &c.1)).collect::<Vec<_>>())
        .bind(changed.iter().map(|c| c.2).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

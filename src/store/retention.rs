//! Retention of raw usage: whole month partitions are dropped once every event in them is
//! older than the retention period, never deleted row by row. The dedup keys of those events
//! go first (in bounded batches, the key table being unpartitioned — see migration 0002): they
//! are found through the partition's own rows, by identity, so the key table needs no index by
//! time, and an event is deduplicated for exactly as long as it is retained. A pass first folds
//! every free queued batch (its rows must be in the rollups before they go); a partition still
//! holding events of a batch it could not fold (another replica's fold in flight) is kept until
//! the next pass. Rollups —
//! `usage_rollups`, `usage_rollups_v1` and the attribution rollups derived from usage and from
//! lifecycle events (migrations 0007, 0008, 0013) — and lifecycle events are kept: they are the
//! sums invoices and reports read.

use chrono::{DateTime, Datelike, Months, TimeZone, Utc};
use sqlx::PgPool;

use super::StoreError;

/// What one retention pass removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    pub dropped_partitions: Vec<String>,
    pub deleted_keys: u64,
    pub deleted_conflicts: u64,
}

/// Pages of a partition whose events' keys one statement deletes (about 10,000 events), so no
/// single statement holds locks for long.
const KEY_PAGES: i64 = 256;

/// `usage_events_y2026m03` → 2026-03-01T00:00Z.
fn partition_month(name: &str) -> Option<DateTime<Utc>> {
    let rest = name.strip_prefix("usage_events_y")?;
    let (year, month) = rest.split_once('m')?;
    Utc.with_ymd_and_hms(year.parse().ok()?, month.parse().ok()?, 1, 0, 0, 0)
        .single()
}

/// Folds what is queued (`fold_max_events` per fold), drops the partitions that end at or
/// before `cutoff`, then the dedup keys and conflict audit rows older than the oldest instant
/// still retained.
pub async fn apply(
    pool: &PgPool,
    cutoff: DateTime<Utc>,
    fold_max_events: u64,
) -> Result<RetentionReport, StoreError> {
    super::fold::fold_all(pool, fold_max_events).await?;
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'usage_events'::regclass ORDER BY 1",
    )
    .fetch_all(pool)
    .await?;
    let mut report = RetentionReport::default();
    // Everything before the first month that is kept whole is gone.
    let mut retained_from = Utc
        .with_ymd_and_hms(cutoff.year(), cutoff.month(), 1, 0, 0, 0)
        .single()
        .unwrap_or(cutoff);
    for name in names {
        let Some(month) = partition_month(&name) else {
            continue;
        };
        let Some(end) = month.checked_add_months(Months::new(1)) else {
            continue;
        };
        if end <= cutoff {
            let unfolded: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM fold_queue WHERE first_occurred_at < $1)",
            )
            .bind(end)
            .fetch_one(pool)
            .await?;
            if unfolded {
                tracing::info!(partition = %name, "expired partition kept: events still to fold");
                retained_from = retained_from.min(month);
                continue;
            }
            report.deleted_keys += delete_keys_of(pool, &name).await?;
            // The name comes from the catalog and matched our pattern, so quoting is safe.
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP TABLE IF EXISTS \"{name}\""
            )))
            .execute(pool)
            .await?;
            tracing::info!(partition = %name, "dropped expired usage partition");
            report.dropped_partitions.push(name);
        } else {
            retained_from = retained_from.min(month);
        }
    }
    report.deleted_conflicts =
        sqlx::query("DELETE FROM usage_event_conflicts WHERE received_at < $1")
            .bind(retained_from)
            .execute(pool)
            .await?
            .rows_affected();
    Ok(report)
}

/// Deletes the dedup keys of the events of partition `name`, a range of its pages at a time
/// (a TID range scan, so each statement reads only its pages), before it is dropped.
async fn delete_keys_of(pool: &PgPool, name: &str) -> Result<u64, StoreError> {
    let pages: i64 = sqlx::query_scalar("SELECT pg_relation_size($1::regclass) / 8192")
        .bind(name)
        .fetch_one(pool)
        .await?;
    let mut deleted = 0;
    let mut first = 0;
    while first <= pages {
        // The name comes from the catalog and matched our pattern, so quoting is safe.
        deleted += sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM usage_event_keys k USING \"{name}\" e
             WHERE e.ctid >= format('(%s,0)', $1::int8)::tid
               AND e.ctid < format('(%s,0)', $2::int8)::tid
               AND k.tenant_id = e.tenant_id AND k.source = e.source COLLATE \"C\"
               AND k.event_id = e.event_id COLLATE \"C\""
        )))
        .bind(first)
        .bind(first + KEY_PAGES)
        .execute(pool)
        .await?
        .rows_affected();
        first += KEY_PAGES;
    }
    Ok(deleted)
}

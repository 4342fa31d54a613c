//! Retention of raw usage: whole month partitions are dropped once every event in them is
//! older than the retention period, never deleted row by row. The dedup keys of those events
//! go with them (in bounded batches, the key table being unpartitioned — see migration 0002),
//! so an event is deduplicated for exactly as long as it is retained. Rollups — `usage_rollups`
//! and the attribution rollups derived from it and from lifecycle events (migrations 0007 and
//! 0008) — and lifecycle events are kept: they are the sums invoices and reports read.

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

/// Rows deleted per statement, so no single statement holds locks for long.
const DELETE_BATCH: i64 = 10_000;

/// `usage_events_y2026m03` → 2026-03-01T00:00Z.
fn partition_month(name: &str) -> Option<DateTime<Utc>> {
    let rest = name.strip_prefix("usage_events_y")?;
    let (year, month) = rest.split_once('m')?;
    Utc.with_ymd_and_hms(year.parse().ok()?, month.parse().ok()?, 1, 0, 0, 0)
        .single()
}

/// Drops the partitions that end at or before `cutoff`, then the dedup keys and conflict
/// audit rows older than the oldest instant still retained.
pub async fn apply(pool: &PgPool, cutoff: DateTime<Utc>) -> Result<RetentionReport, StoreError> {
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
    loop {
        let deleted = sqlx::query(
            "DELETE FROM usage_event_keys WHERE ctid = ANY(ARRAY(
                 SELECT ctid FROM usage_event_keys WHERE occurred_at < $1 LIMIT $2))",
        )
        .bind(retained_from)
        .bind(DELETE_BATCH)
        .execute(pool)
        .await?
        .rows_affected();
        report.deleted_keys += deleted;
        if deleted == 0 {
            break;
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

//! SQL of the folder: one fold (`fold_usage`, migration 0013, which claims, adds and dequeues
//! in the caller's transaction) and the state of the queue.

use sqlx::{PgConnection, PgPool};

use super::StoreError;

/// What one fold added to the rollups.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Folded {
    pub batches: i64,
    pub events: i64,
}

/// Folds the oldest unclaimed batches, up to about `max_events` events, in one transaction.
pub async fn fold(pool: &PgPool, max_events: u64) -> Result<Folded, StoreError> {
    let mut tx = pool.begin().await?;
    let (batches, events): (i32, i64) = sqlx::query_as("SELECT * FROM fold_usage($1)")
        .bind(i64::try_from(max_events).unwrap_or(i64::MAX))
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Folded {
        batches: i64::from(batches),
        events,
    })
}

/// Folds until no free batch is left (a batch another replica is folding is left to it).
pub async fn fold_all(pool: &PgPool, max_events: u64) -> Result<Folded, StoreError> {
    let mut total = Folded::default();
    loop {
        let folded = fold(pool, max_events).await?;
        if folded.batches == 0 {
            return Ok(total);
        }
        total.batches += folded.batches;
        total.events += folded.events;
    }
}

/// The oldest batch still queued (None when the folder has caught up). Readers bound their
/// unfolded tail with it: every batch acknowledged before they started is at least this one.
pub async fn oldest_queued(conn: &mut PgConnection) -> Result<Option<i64>, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT min(ingest_batch) FROM fold_queue")
            .fetch_one(&mut *conn)
            .await?,
    )
}

/// The queue now: batches and events waiting, and how long the oldest has waited.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Queue {
    pub batches: i64,
    pub events: i64,
    /// Seconds since the oldest batch was queued (0 when empty). A gauge, not money.
    pub oldest_age_seconds: f64,
}

pub async fn queue(pool: &PgPool) -> Result<Queue, StoreError> {
    let (batches, events, age): (i64, i64, f64) = sqlx::query_as(
        "SELECT count(*), coalesce(sum(events), 0)::int8,
                coalesce(extract(epoch FROM now() - min(queued_at)), 0)::float8
         FROM fold_queue",
    )
    .fetch_one(pool)
    .await?;
    Ok(Queue {
        batches,
        events,
        oldest_age_seconds: age,
    })
}

//! Kafka consumer positions kept in Postgres. They are written in the transaction that
//! commits the events they cover, so after any crash the stored position and the stored
//! events agree; the consumer seeks to them on partition assignment.

use sqlx::PgConnection;
use sqlx::PgPool;

use super::StoreError;

/// The next offset to read in one partition, once the batch holding it commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionOffset {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

/// Stored positions of `partitions` of `topic` for `group`; partitions never stored are absent.
pub async fn load(
    pool: &PgPool,
    group: &str,
    topic: &str,
    partitions: &[i32],
) -> Result<Vec<(i32, i64)>, StoreError> {
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, next_offset FROM kafka_offsets
         WHERE consumer_group = $1 AND topic = $2 AND partition = ANY($3)",
    )
    .bind(group)
    .bind(topic)
    .bind(partitions)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// Records positions on the caller's transaction. A position never moves backwards: a batch
/// finishing late on a replica that lost the partition cannot rewind the new owner.
pub async fn store(
    conn: &mut PgConnection,
    group: &str,
    offsets: &[PartitionOffset],
) -> Result<(), StoreError> {
    if offsets.is_empty() {
        return Ok(());
    }
    let topics: Vec<&str> = offsets.iter().map(|o| o.topic.as_str()).collect();
    let partitions: Vec<i32> = offsets.iter().map(|o| o.partition).collect();
    let next: Vec<i64> = offsets.iter().map(|o| o.next_offset).collect();
    sqlx::query(
        "INSERT INTO kafka_offsets AS k (consumer_group, topic, partition, next_offset)
         SELECT $1, t, p, n FROM unnest($2::text[], $3::int4[], $4::int8[]) AS x (t, p, n)
         ON CONFLICT (consumer_group, topic, partition)
         DO UPDATE SET next_offset = GREATEST(k.next_offset, excluded.next_offset),
                       updated_at = now()",
    )
    .bind(group)
    .bind(topics)
    .bind(partitions)
    .bind(next)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

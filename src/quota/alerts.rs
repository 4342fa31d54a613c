//! The alert publisher: sends the outbox rows of `quota_alerts` to Kafka and stamps them.
//!
//! A crossing is recorded exactly once, in the transaction that crosses it (the outbox key is
//! (policy, window, threshold)). Publishing is at-least-once: a crash between the broker's
//! acknowledgement and the stamp resends the row, with the same deterministic `alert_id`, so a
//! consumer deduplicates on it. Replicas share the outbox through `FOR UPDATE SKIP LOCKED`.

use std::time::Duration;

use prost::Message;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::KafkaSettings;
use crate::grpc::convert::timestamp;
use crate::grpc::quota::{enforcement_to_proto, quantity, subject_to_proto, window_to_proto};
use crate::proto::v1 as pb;
use crate::quota::QuotaMetrics;
use crate::store::StoreError;
use crate::store::quotas::{self as store, PendingAlert};

/// Most alerts one publishing transaction sends.
const BATCH: i64 = 500;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
}

impl From<sqlx::Error> for PublishError {
    fn from(error: sqlx::Error) -> Self {
        PublishError::Store(StoreError::Query(error))
    }
}

/// The id every delivery of one crossing carries.
pub fn alert_id(alert: &PendingAlert) -> String {
    format!(
        "{}/{}/{}/{}",
        alert.tenant_id,
        alert.policy_id,
        alert.window.start.timestamp_micros(),
        alert.threshold_bps
    )
}

pub fn to_proto(alert: &PendingAlert) -> pb::QuotaAlertEvent {
    let currency = alert.currency.as_deref();
    pb::QuotaAlertEvent {
        alert_id: alert_id(alert),
        tenant_id: alert.tenant_id.clone(),
        policy_id: alert.policy_id.clone(),
        policy_name: alert.policy_name.clone(),
        subject: Some(subject_to_proto(&alert.tenant_id, &alert.scope)),
        window: window_to_proto(alert.window_kind) as i32,
        enforcement: enforcement_to_proto(alert.enforcement) as i32,
        window_start: Some(timestamp(alert.window.start)),
        window_end: Some(timestamp(alert.window.end)),
        threshold_bps: alert.threshold_bps,
        limit: Some(quantity(currency, alert.limit)),
        used: Some(quantity(currency, alert.used)),
        crossed_at: Some(timestamp(alert.crossed_at)),
    }
}

pub struct AlertPublisher {
    metrics: QuotaMetrics,
    pool: PgPool,
    producer: FutureProducer,
    topic: String,
}

impl AlertPublisher {
    pub fn new(
        pool: PgPool,
        kafka: &KafkaSettings,
        topic: &str,
        metrics: QuotaMetrics,
    ) -> Result<Self, KafkaError> {
        let producer: FutureProducer =
            crate::kafka::with_defaults(crate::kafka::client_config(kafka), &[("linger.ms", "5")])
                .set("enable.idempotence", "true")
                .set("acks", "all")
                .create()?;
        Ok(Self {
            metrics,
            pool,
            producer,
            topic: topic.to_owned(),
        })
    }

    /// Sends one batch of unpublished alerts and stamps them once the broker has them all;
    /// returns how many.
    pub async fn publish_once(&self) -> Result<usize, PublishError> {
        let mut tx = self.pool.begin().await?;
        let pending = store::lock_unpublished(&mut tx, BATCH).await?;
        if pending.is_empty() {
            tx.rollback().await?;
            return Ok(0);
        }
        let payloads: Vec<Vec<u8>> = pending
            .iter()
            .map(|a| to_proto(a).encode_to_vec())
            .collect();
        let deliveries: Vec<_> = pending
            .iter()
            .zip(&payloads)
            .map(|(alert, payload)| {
                let record = FutureRecord::to(&self.topic)
                    .key(alert.tenant_id.as_bytes())
                    .payload(payload.as_slice());
                self.producer.send(record, Duration::from_secs(30))
            })
            .collect();
        for delivery in futures::future::join_all(deliveries).await {
            delivery.map_err(|(error, _)| error)?;
        }
        store::mark_published(&mut tx, &pending).await?;
        tx.commit().await?;
        self.metrics.alerts_published(pending.len());
        Ok(pending.len())
    }
}

/// Publishes every `interval` until shutdown; a failed pass is retried at the next tick (the
/// rows stay unpublished until the broker acknowledges them).
pub async fn run_publisher(
    publisher: AlertPublisher,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let publisher = std::sync::Arc::new(publisher);
    crate::periodic::every(interval, Duration::ZERO, shutdown, || {
        let publisher = publisher.clone();
        async move {
            match publisher.publish_once().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(alerts = n, "quota alerts published"),
                Err(e) => tracing::warn!(error = %e, "quota alert publishing failed; retrying"),
            }
        }
    })
    .await;
}

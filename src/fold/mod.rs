//! The folder: adds committed ingest batches to the rollups, exactly once, in every replica.
//!
//! Ingest commits raw rows and one `fold_queue` row per batch; a fold claims queue rows
//! (`FOR UPDATE SKIP LOCKED`, so replicas fold different batches), adds their raw rows to the
//! hourly, state and daily rollups and deletes the queue rows, all in one transaction
//! (`fold_usage`, migration 0013). A crash mid-fold rolls everything back and the batches are
//! folded again later; a committed fold has dequeued them, so nothing is folded twice.
//!
//! Folds are large on purpose: their cost per event falls with the events per rollup key in
//! the window (about 20 µs per event folding 20k events at a time, 2.4 µs folding 1M, measured
//! in shared/notes). So the folder waits until `fold.min_events` are queued or the oldest batch
//! is `fold.max_age` old. Readers do not wait for it: they add the queued tail to the rollups.

use std::time::Instant;

use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntGauge, Opts, Registry};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::FoldSettings;
use crate::store::{self, StoreError};

/// The folder's metrics.
#[derive(Clone)]
pub struct FoldMetrics {
    lag: Gauge,
    queued_events: IntGauge,
    folded_events: IntCounter,
    folded_batches: IntCounter,
    duration: Histogram,
    failures: IntCounter,
}

impl FoldMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let metrics = Self {
            lag: Gauge::with_opts(Opts::new(
                "tokenmeter_fold_lag_seconds",
                "Age of the oldest committed ingest batch not yet folded into the rollups",
            ))?,
            queued_events: IntGauge::with_opts(Opts::new(
                "tokenmeter_fold_queued_events",
                "Events of committed ingest batches not yet folded",
            ))?,
            folded_events: IntCounter::with_opts(Opts::new(
                "tokenmeter_fold_events_total",
                "Events folded into the rollups by this replica",
            ))?,
            folded_batches: IntCounter::with_opts(Opts::new(
                "tokenmeter_fold_batches_total",
                "Ingest batches folded into the rollups by this replica",
            ))?,
            duration: Histogram::with_opts(
                HistogramOpts::new(
                    "tokenmeter_fold_duration_seconds",
                    "Duration of one fold transaction",
                )
                .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            )?,
            failures: IntCounter::with_opts(Opts::new(
                "tokenmeter_fold_failures_total",
                "Folds that failed and were rolled back (their batches are folded again)",
            ))?,
        };
        registry.register(Box::new(metrics.lag.clone()))?;
        registry.register(Box::new(metrics.queued_events.clone()))?;
        registry.register(Box::new(metrics.folded_events.clone()))?;
        registry.register(Box::new(metrics.folded_batches.clone()))?;
        registry.register(Box::new(metrics.duration.clone()))?;
        registry.register(Box::new(metrics.failures.clone()))?;
        Ok(metrics)
    }
}

/// Folds queued batches as [`FoldSettings`] say.
#[derive(Clone)]
pub struct Folder {
    pool: PgPool,
    settings: FoldSettings,
    metrics: FoldMetrics,
}

impl Folder {
    pub fn new(pool: PgPool, settings: FoldSettings, metrics: FoldMetrics) -> Self {
        Self {
            pool,
            settings,
            metrics,
        }
    }

    /// One fold of up to `fold.max_events` events; returns what it folded (nothing when the
    /// queue held no free batch).
    pub async fn fold_once(&self) -> Result<store::fold::Folded, StoreError> {
        let started = Instant::now();
        let folded = store::fold::fold(&self.pool, self.settings.max_events).await;
        match &folded {
            Ok(folded) if folded.batches > 0 => {
                self.metrics
                    .duration
                    .observe(started.elapsed().as_secs_f64());
                self.metrics
                    .folded_batches
                    .inc_by(u64::try_from(folded.batches).unwrap_or(0));
                self.metrics
                    .folded_events
                    .inc_by(u64::try_from(folded.events).unwrap_or(0));
            }
            Ok(_) => {}
            Err(_) => self.metrics.failures.inc(),
        }
        folded
    }

    /// Looks at the queue every `fold.interval` and folds while it is due, until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.settings.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if let Err(e) = self.fold_while_due(&shutdown).await {
                tracing::warn!(error = %e, "fold failed; its batches stay queued for the next one");
            }
        }
    }

    async fn fold_while_due(&self, shutdown: &CancellationToken) -> Result<(), StoreError> {
        loop {
            let queue = store::fold::queue(&self.pool).await?;
            self.metrics.lag.set(queue.oldest_age_seconds);
            self.metrics.queued_events.set(queue.events);
            let due = u64::try_from(queue.events).unwrap_or(0) >= self.settings.min_events
                || (queue.batches > 0
                    && queue.oldest_age_seconds >= self.settings.max_age.as_secs_f64());
            if !due || shutdown.is_cancelled() {
                return Ok(());
            }
            let folded = self.fold_once().await?;
            if folded.batches == 0 {
                // Every queued batch is being folded by another replica.
                return Ok(());
            }
            tracing::debug!(
                batches = folded.batches,
                events = folded.events,
                "folded ingest batches"
            );
        }
    }
}

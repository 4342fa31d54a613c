//! Builds the application from settings and runs its components until shutdown.
//!
//! `build` does everything that can fail fast (pool, migrations, binding ports) so a
//! misconfigured instance dies at start; `run_until_stopped` only serves.

use std::net::SocketAddr;

use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin_http::{self, AdminState};
use crate::billing::Billing;
use crate::config::Settings;
use crate::fold::{FoldMetrics, Folder};
use std::sync::Arc;

use crate::grpc::{self, ApiState};
use crate::ingest::transactions::TransactionRecorder;
use crate::ingest::{IngestMetrics, Ingestor};
use crate::kafka::consumer::{ConsumerError, ConsumerMetrics, UsageConsumer};
use crate::kafka::{KafkaProbe, ProbeError};
use crate::quota::{QuotaEngine, QuotaMetrics};
use crate::store::{self, StoreError};
use crate::telemetry::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr} (setting {setting}): {source}")]
    Bind {
        setting: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Kafka(#[from] ProbeError),
    #[error(transparent)]
    Consumer(#[from] ConsumerError),
    #[error(transparent)]
    Grpc(#[from] grpc::GrpcError),
    #[error("admin http server failed: {0}")]
    AdminHttp(std::io::Error),
    #[error("cannot create the quota alert producer: {0}")]
    AlertProducer(rdkafka::error::KafkaError),
    #[error("a server task panicked: {0}")]
    Task(#[from] tokio::task::JoinError),
}

pub struct Application {
    settings: Settings,
    pool: PgPool,
    metrics: Metrics,
    ingestor: Arc<Ingestor>,
    transactions: Arc<TransactionRecorder>,
    quota: Arc<QuotaEngine>,
    kafka: Option<KafkaProbe>,
    consumer: Option<UsageConsumer>,
    folder: Folder,
    grpc_listener: Option<TcpListener>,
    grpc_tls: Option<tonic::transport::ServerTlsConfig>,
    admin_listener: Option<TcpListener>,
}

impl Application {
    /// Connects, migrates if asked, and binds the ports (port 0 picks a free one, for tests).
    pub async fn build(settings: Settings) -> Result<Self, AppError> {
        let metrics = Metrics::new()?;
        let pool = store::connect(&settings.database).await?;
        if settings.database.run_migrations {
            store::migrate(&pool).await?;
            tracing::info!("migrations applied");
        }
        let ingestor = Arc::new(Ingestor::new(
            pool.clone(),
            &settings.ingest,
            IngestMetrics::register(&metrics.registry)?,
        ));
        let transactions = Arc::new(TransactionRecorder::new(
            pool.clone(),
            ingestor.clone(),
            &settings.ingest,
            &metrics.registry,
        )?);
        let quota = Arc::new(QuotaEngine::new(
            pool.clone(),
            ingestor.clone(),
            settings.quota.clone(),
            QuotaMetrics::register(&metrics.registry)?,
        ));
        let kafka = if settings.kafka.enabled {
            let probe = KafkaProbe::new(&settings.kafka)?;
            // Kafka being down is not fatal at start: /readyz reports it until it answers.
            if let Err(e) = probe.check().await {
                tracing::warn!(error = %e, brokers = %settings.kafka.brokers, "kafka not reachable yet");
            }
            Some(probe)
        } else {
            None
        };
        let consumer = if settings.kafka.enabled && settings.kafka.consumer.enabled {
            Some(UsageConsumer::new(
                &settings.kafka,
                pool.clone(),
                ingestor.clone(),
                transactions.clone(),
                ConsumerMetrics::register(&metrics.registry)?,
            )?)
        } else {
            None
        };
        let folder = Folder::new(
            pool.clone(),
            settings.fold.clone(),
            FoldMetrics::register(&metrics.registry)?,
        );
        let grpc_tls = settings.grpc.tls.as_ref().map(grpc::load_tls).transpose()?;
        let grpc_listener = if settings.grpc.enabled {
            Some(bind("grpc.listen_addr", settings.grpc.listen_addr).await?)
        } else {
            None
        };
        let admin_listener = if settings.admin.enabled {
            Some(bind("admin.listen_addr", settings.admin.listen_addr).await?)
        } else {
            None
        };
        Ok(Self {
            settings,
            pool,
            metrics,
            ingestor,
            transactions,
            quota,
            kafka,
            consumer,
            folder,
            grpc_listener,
            grpc_tls,
            admin_listener,
        })
    }

    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc_listener.as_ref()?.local_addr().ok()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listener.as_ref()?.local_addr().ok()
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Serves until `shutdown` fires, then drains: listeners stop accepting, in-flight calls get
    /// up to `shutdown_grace` to finish, and the pool closes.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), AppError> {
        let mut tasks = tokio::task::JoinSet::new();
        let billing = Arc::new(Billing::new(
            self.pool.clone(),
            self.settings.billing.clone(),
            self.settings.ingest.default_price_book_id.clone(),
            self.settings.ingest.retention,
            self.settings.fold.max_events,
        ));
        if let Some(listener) = self.grpc_listener {
            let (limit, metrics, token) = (
                self.settings.grpc.max_message_bytes,
                self.metrics.clone(),
                shutdown.clone(),
            );
            let state = ApiState {
                pool: self.pool.clone(),
                ingestor: self.ingestor.clone(),
                transactions: self.transactions.clone(),
                ingest: self.settings.ingest.clone(),
                authenticator: Arc::new(grpc::auth::Authenticator::new(
                    self.pool.clone(),
                    self.settings
                        .auth
                        .bootstrap_admin_key
                        .as_ref()
                        .map(|k| k.expose()),
                    self.settings.auth.cache_ttl,
                )),
                billing: billing.clone(),
                quota: self.quota.clone(),
            };
            let tls = self.grpc_tls.clone();
            tasks.spawn(async move {
                grpc::serve(listener, tls, state, limit, metrics, token)
                    .await
                    .map_err(AppError::from)
            });
        }
        if let Some(listener) = self.admin_listener {
            let state = AdminState {
                metrics: self.metrics.clone(),
                pool: self.pool.clone(),
                kafka: self.kafka.clone(),
                consumer: self.consumer.as_ref().map(UsageConsumer::status),
            };
            let token = shutdown.clone();
            tasks.spawn(async move {
                admin_http::serve(listener, state, token)
                    .await
                    .map_err(AppError::AdminHttp)
            });
        }

        if self.settings.fold.enabled {
            let (folder, token) = (self.folder.clone(), shutdown.clone());
            tasks.spawn(async move {
                folder.run(token).await;
                Ok(())
            });
        }

        if let Some(consumer) = self.consumer {
            let token = shutdown.clone();
            tasks.spawn(async move {
                run_consumer(consumer, token).await;
                Ok(())
            });
        }

        if !self.settings.quota.expiry_interval.is_zero() {
            let (engine, token) = (self.quota.clone(), shutdown.clone());
            let interval = self.settings.quota.expiry_interval;
            tasks.spawn(async move {
                crate::quota::run_expiry(engine, interval, token).await;
                Ok(())
            });
        }
        if self.settings.quota.leases {
            let (engine, token) = (self.quota.clone(), shutdown.clone());
            tasks.spawn(async move {
                crate::quota::run_lease_idle(engine, token).await;
                Ok(())
            });
        }
        if self.settings.kafka.enabled && self.settings.quota.alerts.enabled {
            let alerts = &self.settings.quota.alerts;
            let publisher = crate::quota::alerts::AlertPublisher::new(
                self.pool.clone(),
                &self.settings.kafka,
                &alerts.topic,
                self.quota.metrics().clone(),
            )
            .map_err(AppError::AlertProducer)?;
            let (interval, token) = (alerts.interval, shutdown.clone());
            tasks.spawn(async move {
                crate::quota::alerts::run_publisher(publisher, interval, token).await;
                Ok(())
            });
        }

        if !self.settings.ingest.retention_interval.is_zero() {
            let (pool, token) = (self.pool.clone(), shutdown.clone());
            let (interval, retention, fold_max_events) = (
                self.settings.ingest.retention_interval,
                self.settings.ingest.retention,
                self.settings.fold.max_events,
            );
            tasks.spawn(async move {
                run_retention(pool, interval, retention, fold_max_events, token).await;
                Ok(())
            });
        }

        if !self.settings.billing.close_interval.is_zero() {
            let (billing, token) = (billing.clone(), shutdown.clone());
            tasks.spawn(async move {
                crate::billing::run_close_job(billing, token).await;
                Ok(())
            });
        }

        // A component that stops on its own (an error) takes the others down with it.
        let first = tokio::select! {
            _ = shutdown.cancelled() => None,
            Some(result) = tasks.join_next() => Some(result),
        };
        shutdown.cancel();
        let outcome = match first {
            Some(result) => result?,
            None => Ok(()),
        };
        let grace = self.settings.shutdown_grace;
        let drained = tokio::time::timeout(grace, async {
            while let Some(result) = tasks.join_next().await {
                if let Err(e) = result.map_err(AppError::from).and_then(|r| r) {
                    tracing::error!(error = %e, "component failed while draining");
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(grace = ?grace, "drain timed out; aborting remaining work");
            tasks.abort_all();
        }
        // After the gRPC server stopped: nothing grants any more.
        self.quota.close().await;
        self.pool.close().await;
        if let Err(e) = &outcome {
            tracing::error!(error = %e, "stopped on error");
        } else {
            tracing::info!("shutdown complete");
        }
        outcome
    }
}

/// Runs the usage consumer until shutdown. A consumer that stops on its own (the dead-letter
/// limit) does not take the service down: gRPC keeps serving and `/readyz` says why.
async fn run_consumer(consumer: UsageConsumer, shutdown: CancellationToken) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let run = consumer.run(stop.clone());
    tokio::pin!(run);
    tokio::select! {
        () = &mut run => shutdown.cancelled().await,
        () = shutdown.cancelled() => {
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            run.await;
        }
    }
}

/// Applies retention every `interval` until shutdown. A failed pass is logged and retried at
/// the next tick: retention is housekeeping, never a reason to stop serving.
async fn run_retention(
    pool: PgPool,
    interval: std::time::Duration,
    retention: std::time::Duration,
    fold_max_events: u64,
    shutdown: CancellationToken,
) {
    crate::periodic::every(interval, std::time::Duration::ZERO, shutdown, || {
        let pool = pool.clone();
        async move {
            let cutoff = retention_cutoff(chrono::Utc::now(), retention);
            match store::retention::apply(&pool, cutoff, fold_max_events).await {
                Ok(report) if !report.dropped_partitions.is_empty() => tracing::info!(
                    partitions = ?report.dropped_partitions,
                    keys = report.deleted_keys,
                    "retention applied"
                ),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "retention pass failed; retrying next interval")
                }
            }
        }
    })
    .await;
}

/// The oldest instant still retained.
pub fn retention_cutoff(
    now: chrono::DateTime<chrono::Utc>,
    retention: std::time::Duration,
) -> chrono::DateTime<chrono::Utc> {
    chrono::Duration::from_std(retention)
        .ok()
        .and_then(|r| now.checked_sub_signed(r))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC)
}

async fn bind(setting: &'static str, addr: SocketAddr) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Bind {
            setting,
            addr,
            source,
        })
}

//! The admin HTTP port: `/metrics` for Prometheus, `/healthz` (the process is alive) and
//! `/readyz` (Postgres and, when enabled, Kafka answer and the usage consumer has not stopped).

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::json;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::kafka::KafkaProbe;
use crate::kafka::consumer::ConsumerStatus;
use crate::store;
use crate::telemetry::Metrics;

#[derive(Clone)]
pub struct AdminState {
    pub metrics: Metrics,
    pub pool: PgPool,
    pub kafka: Option<KafkaProbe>,
    pub consumer: Option<ConsumerStatus>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    tracing::info!(addr = ?listener.local_addr().ok(), "admin http listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        state.metrics.render(),
    )
}

async fn healthz() -> impl IntoResponse {
    "ok\n"
}

/// 200 when every dependency answers, 503 naming the ones that do not.
async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    let (postgres_ok, postgres) = match store::ping(&state.pool).await {
        Ok(()) => (true, "ok".to_owned()),
        Err(e) => (false, e.to_string()),
    };
    let (kafka_ok, kafka) = match &state.kafka {
        None => (true, "disabled".to_owned()),
        Some(probe) => match probe.check().await {
            Ok(_) => (true, "ok".to_owned()),
            Err(e) => (false, e.to_string()),
        },
    };
    let (consumer_ok, consumer) = match &state.consumer {
        None => (true, "disabled".to_owned()),
        Some(status) => match status.stopped_reason() {
            None => (true, "ok".to_owned()),
            Some(reason) => (false, format!("stopped: {reason}")),
        },
    };
    let ready = postgres_ok && kafka_ok && consumer_ok;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(
            json!({ "ready": ready, "postgres": postgres, "kafka": kafka, "kafka_consumer": consumer }),
        ),
    )
}

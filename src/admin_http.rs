//! The admin HTTP port: `/metrics` for Prometheus, `/healthz` (the process is alive) and
//! `/readyz` (Postgres and, when enabled, Kafka answer and the usage consumer has not stopped).
//! `/readyz` also shows the fold queue (`fold`: batches and events not yet folded into the
//! rollups, and the oldest one's age) — a detail, never a reason to be unready: reports add the
//! unfolded tail, so a lagging folder makes them slower, not wrong.
//!
//! `/readyz?exclude=kafka&exclude=kafka_consumer` leaves checks out of the verdict (they are
//! still reported), as Kubernetes' own `/readyz` does: a load balancer should keep sending gRPC
//! (quota decisions, ingest into Postgres) to a replica whose Kafka side is down, while the
//! full `/readyz` and the `TokenmeterKafkaConsumerStopped` alert say so.

use axum::Router;
use axum::extract::{RawQuery, State};
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

/// The checks `/readyz` runs, by the names `exclude` takes.
const CHECKS: [&str; 3] = ["postgres", "kafka", "kafka_consumer"];

/// The checks named by `exclude=` parameters of `query`, or the first unknown name.
fn excluded(query: Option<&str>) -> Result<Vec<&str>, String> {
    let mut names = Vec::new();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let Some(name) = pair.strip_prefix("exclude=") else {
            return Err(pair.to_owned());
        };
        match CHECKS.iter().find(|c| **c == name) {
            Some(check) => names.push(*check),
            None => return Err(pair.to_owned()),
        }
    }
    Ok(names)
}

/// 200 when every dependency not excluded answers, 503 naming the ones that do not; 400 for an
/// unknown parameter (a typo in a probe must not silently change what it checks).
async fn readyz(
    State(state): State<AdminState>,
    RawQuery(query): RawQuery,
) -> axum::response::Response {
    let excluded = match excluded(query.as_deref()) {
        Ok(names) => names,
        Err(unknown) => {
            let reason = format!(
                "unknown parameter {unknown:?}: use exclude=<check> with a check of {CHECKS:?}"
            );
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({ "error": reason })),
            )
                .into_response();
        }
    };
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
    let fold = match store::fold::queue(&state.pool).await {
        Ok(queue) => json!({
            "queued_batches": queue.batches, "queued_events": queue.events,
            "lag_seconds": queue.oldest_age_seconds,
        }),
        Err(e) => json!(e.to_string()),
    };
    let ready = [postgres_ok, kafka_ok, consumer_ok]
        .iter()
        .zip(CHECKS)
        .all(|(ok, check)| *ok || excluded.contains(&check));
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(json!({
            "ready": ready, "postgres": postgres, "kafka": kafka, "kafka_consumer": consumer,
            "fold": fold, "excluded": excluded,
        })),
    )
        .into_response()
}

//! The admin HTTP port: metrics, liveness, readiness.

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::{sample, spawn_app, spawn_app_with};

async fn get(url: &str) -> (u16, String) {
    let response = reqwest::get(url).await.expect("admin http answers");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

#[tokio::test]
async fn metrics_expose_process_and_grpc_request_metrics() {
    let app = spawn_app().await;
    let mut health = HealthClient::new(app.channel().await);
    for _ in 0..3 {
        health
            .check(HealthCheckRequest::default())
            .await
            .expect("health check");
    }
    health
        .check(HealthCheckRequest {
            service: "nope".into(),
        })
        .await
        .expect_err("unknown service");

    let (status, body) = get(&app.admin_url("/metrics")).await;

    assert_eq!(status, 200);
    assert!(body.contains("process_resident_memory_bytes "), "{body}");
    assert!(body.contains("process_cpu_seconds_total "), "{body}");
    let check = r#"method="/grpc.health.v1.Health/Check""#;
    assert_eq!(
        sample(
            &body,
            "tokenmeter_grpc_requests_total",
            &[check, r#"code="OK""#]
        ),
        Some(3.0),
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            "tokenmeter_grpc_requests_total",
            &[check, r#"code="NOT_FOUND""#]
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            "tokenmeter_grpc_request_duration_seconds_count",
            &[check]
        ),
        Some(4.0),
        "{body}"
    );
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn unknown_grpc_paths_share_one_metric_label() {
    let app = spawn_app().await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    for path in ["/a.B/C", "/d.E/F"] {
        let _ = client
            .post(format!("{}{path}", app.grpc_url()))
            .header("content-type", "application/grpc")
            .body(Vec::<u8>::new())
            .send()
            .await;
    }

    let (_, body) = get(&app.admin_url("/metrics")).await;

    assert!(
        !body.contains("/a.B/C"),
        "a client-chosen path became a label: {body}"
    );
    assert_eq!(
        sample(
            &body,
            "tokenmeter_grpc_requests_total",
            &[r#"method="unknown""#]
        ),
        Some(2.0),
        "{body}"
    );
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn healthz_and_readyz_answer_ok_when_postgres_and_kafka_are_up() {
    let app = spawn_app().await;

    let (live, _) = get(&app.admin_url("/healthz")).await;
    let (ready, body) = get(&app.admin_url("/readyz")).await;

    assert_eq!(live, 200);
    assert_eq!(ready, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(json["postgres"], "ok");
    assert_eq!(json["kafka"], "ok");
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn readyz_fails_naming_kafka_when_no_broker_answers() {
    // Port 1 on loopback: nothing listens there.
    let app = spawn_app_with(|s| {
        s.kafka.brokers = "127.0.0.1:1".into();
        s.kafka.probe_timeout = std::time::Duration::from_millis(500);
    })
    .await;

    let (live, _) = get(&app.admin_url("/healthz")).await;
    let (ready, body) = get(&app.admin_url("/readyz")).await;

    assert_eq!(live, 200, "liveness must not depend on kafka");
    assert_eq!(ready, 503, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(json["postgres"], "ok");
    assert_ne!(json["kafka"], "ok");

    // A load balancer's probe may leave Kafka out: still reported, no longer deciding.
    let (serving, body) = get(&app.admin_url("/readyz?exclude=kafka")).await;
    assert_eq!(serving, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_ne!(json["kafka"], "ok");
    assert_eq!(json["excluded"], serde_json::json!(["kafka"]));
    let (typo, body) = get(&app.admin_url("/readyz?exclude=kafak")).await;
    assert_eq!(typo, 400, "{body}");
    assert!(body.contains("kafak"), "{body}");
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn readyz_fails_naming_postgres_when_no_connection_can_be_had() {
    let app = spawn_app().await;
    let (before, _) = get(&app.admin_url("/readyz")).await;
    assert_eq!(before, 200);
    // Closing the shared pool leaves the service without a database, as an outage would.
    app.pool.close().await;

    let (after, body) = get(&app.admin_url("/readyz")).await;

    assert_eq!(after, 503, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_ne!(json["postgres"], "ok");
    assert_eq!(json["kafka"], "ok");
    app.stop().await.expect("clean shutdown");
}

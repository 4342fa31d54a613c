//! The gRPC surface: health, reflection, and the limits every service shares.

use tokenmeter::proto::v1::usage_service_client::UsageServiceClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use crate::helpers::spawn_app;

#[tokio::test]
async fn health_check_reports_serving_for_the_server_and_each_service() {
    let app = spawn_app().await;
    let mut health = HealthClient::new(app.channel().await);

    for service in [
        "",
        "tokenmeter.v1.UsageService",
        "tokenmeter.v1.QuotaService",
    ] {
        let response = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap_or_else(|e| panic!("health check of {service:?} failed: {e}"))
            .into_inner();
        assert_eq!(
            response.status(),
            ServingStatus::Serving,
            "service {service:?}"
        );
    }

    let unknown = health
        .check(HealthCheckRequest {
            service: "tokenmeter.v1.NoSuchService".to_owned(),
        })
        .await
        .expect_err("an unknown service has no health status");
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn reflection_lists_every_tokenmeter_service() {
    let app = spawn_app().await;
    let mut reflection = ServerReflectionClient::new(app.channel().await);

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection call")
        .into_inner();
    let response = stream
        .message()
        .await
        .expect("reflection stream")
        .expect("one response");

    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!(
            "expected a service list, got {:?}",
            response.message_response
        );
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "tokenmeter.v1.UsageService",
        "tokenmeter.v1.QuotaService",
        "tokenmeter.v1.TransactionService",
        "tokenmeter.v1.PriceBookService",
        "tokenmeter.v1.InvoiceService",
        "tokenmeter.v1.ReportService",
        "tokenmeter.v1.ExportService",
        "tokenmeter.v1.AdminService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn oversized_requests_are_invalid_arguments_naming_the_limit() {
    let app = crate::helpers::spawn_app_with(|s| s.grpc.max_message_bytes = 2048).await;
    let mut usage = UsageServiceClient::new(crate::helpers::authed(
        app.channel().await,
        crate::helpers::ADMIN_KEY,
    ));
    let big = tokenmeter::proto::v1::IngestUsageRequest {
        events: vec![tokenmeter::proto::v1::UsageEvent {
            event_id: "x".repeat(4096),
            ..Default::default()
        }],
        ..Default::default()
    };

    let status = usage
        .ingest_usage(big.clone())
        .await
        .expect_err("too large");

    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("grpc.max_message_bytes") && status.message().contains("2048"),
        "the status names the limit: {status:?}"
    );
    // The same limit on one message of a client stream.
    let stream = tokio_stream::iter(vec![tokenmeter::proto::v1::StreamUsageRequest {
        events: big.events,
        omit_accepted_results: false,
    }]);
    let status = usage.stream_usage(stream).await.expect_err("too large");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("grpc.max_message_bytes"),
        "{status:?}"
    );
    // And the server keeps serving.
    let small = tokenmeter::proto::v1::IngestUsageRequest {
        events: vec![crate::usage_support::event("t-small", "e-1", 10, 1)],
        ..Default::default()
    };
    let answer = usage.ingest_usage(small).await.expect("served");
    assert_eq!(answer.into_inner().summary.expect("summary").accepted, 1);
    app.stop().await.expect("clean shutdown");
}

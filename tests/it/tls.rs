//! gRPC over TLS (rustls), optionally requiring client certificates.

use std::path::PathBuf;

use tokenmeter::config::TlsSettings;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::{spawn_app_with, test_settings};

/// A self-signed certificate for `localhost`, written as PEM files: (cert path, key path, cert).
fn self_signed(dir: &std::path::Path, name: &str) -> (PathBuf, PathBuf, String) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let cert = certified.cert.pem();
    let (cert_path, key_path) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert_path, &cert).expect("write cert");
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).expect("write key");
    (cert_path, key_path, cert)
}

async fn health(endpoint: Endpoint) -> Result<i32, String> {
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(|r| r.into_inner().status)
        .map_err(|s| s.to_string())
}

fn tls_endpoint(addr: std::net::SocketAddr, ca: &str, identity: Option<Identity>) -> Endpoint {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some(identity) = identity {
        tls = tls.identity(identity);
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .expect("endpoint")
        .tls_config(tls)
        .expect("tls config")
}

#[tokio::test]
async fn grpc_is_served_over_tls_and_plaintext_clients_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_file, key_file, cert) = self_signed(dir.path(), "server");
    let app = spawn_app_with(|s| {
        s.grpc.tls = Some(TlsSettings {
            cert_file,
            key_file,
            client_ca_file: None,
        })
    })
    .await;

    let over_tls = health(tls_endpoint(app.grpc_addr, &cert, None)).await;
    let plaintext = health(Endpoint::from_shared(app.grpc_url()).expect("endpoint")).await;

    assert_eq!(over_tls, Ok(1), "SERVING over TLS");
    assert!(
        plaintext.is_err(),
        "a plaintext client must not be served: {plaintext:?}"
    );
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn with_a_client_ca_only_clients_with_a_certificate_it_signed_are_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_file, key_file, server_cert) = self_signed(dir.path(), "server");
    let (client_cert_file, client_key_file, client_cert) = self_signed(dir.path(), "client");
    let (_, stranger_key_file, stranger_cert) = self_signed(dir.path(), "stranger");
    let app = spawn_app_with(|s| {
        s.grpc.tls = Some(TlsSettings {
            cert_file,
            key_file,
            client_ca_file: Some(client_cert_file),
        })
    })
    .await;
    let identity =
        |cert: &str, key: &PathBuf| Identity::from_pem(cert, std::fs::read(key).expect("key"));

    let trusted = health(tls_endpoint(
        app.grpc_addr,
        &server_cert,
        Some(identity(&client_cert, &client_key_file)),
    ))
    .await;
    let anonymous = health(tls_endpoint(app.grpc_addr, &server_cert, None)).await;
    let stranger = health(tls_endpoint(
        app.grpc_addr,
        &server_cert,
        Some(identity(&stranger_cert, &stranger_key_file)),
    ))
    .await;

    assert_eq!(trusted, Ok(1));
    assert!(anonymous.is_err(), "{anonymous:?}");
    assert!(stranger.is_err(), "{stranger:?}");
    app.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_missing_certificate_file_fails_start_naming_the_setting() {
    let mut settings = test_settings().await;
    settings.grpc.tls = Some(TlsSettings {
        cert_file: "/nonexistent/server.crt".into(),
        key_file: "/nonexistent/server.key".into(),
        client_ca_file: None,
    });

    let error = match tokenmeter::app::Application::build(settings).await {
        Ok(_) => panic!("start must fail"),
        Err(error) => error.to_string(),
    };

    assert!(error.contains("grpc.tls.cert_file"), "{error}");
}

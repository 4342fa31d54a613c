//! The gRPC server: tonic services, health, reflection, and request metrics.
//!
//! Services whose features have not landed yet use tonic's generated default methods, which
//! answer `UNIMPLEMENTED`; each later feature replaces one of the empty impls below.

pub mod admin;
pub mod auth;
pub mod convert;
pub mod exports;
pub mod invoices;
pub mod metrics;
pub mod pricebook;
pub mod quota;
pub mod reports;
pub mod status;
pub mod transactions;
pub mod usage;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use prost::Message;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use crate::config::IngestSettings;
use crate::ingest::Ingestor;
use crate::ingest::transactions::TransactionRecorder;
use crate::proto::v1::{
    admin_service_server::AdminServiceServer, export_service_server::ExportServiceServer,
    invoice_service_server::InvoiceServiceServer,
    price_book_service_server::PriceBookServiceServer, quota_service_server::QuotaServiceServer,
    report_service_server::ReportServiceServer,
    transaction_service_server::TransactionServiceServer, usage_service_server::UsageServiceServer,
};
use crate::telemetry::Metrics;
use admin::AdminApi;
use exports::ExportApi;
use invoices::InvoiceApi;
use metrics::GrpcMetricsLayer;
use pricebook::PriceBookApi;
use quota::QuotaApi;
use reports::ReportApi;
use transactions::TransactionApi;
use usage::UsageApi;

/// What the services share.
#[derive(Clone)]
pub struct ApiState {
    pub pool: sqlx::PgPool,
    pub ingestor: Arc<Ingestor>,
    pub transactions: Arc<TransactionRecorder>,
    pub ingest: IngestSettings,
    pub authenticator: Arc<auth::Authenticator>,
    pub billing: Arc<crate::billing::Billing>,
    pub quota: Arc<crate::quota::QuotaEngine>,
}

/// Full names of the tokenmeter services, as health checks and reflection know them.
pub fn service_names() -> Vec<String> {
    descriptor_sets()
        .first()
        .map(|set| {
            set.file
                .iter()
                .flat_map(|file| {
                    let package = file.package().to_owned();
                    file.service
                        .iter()
                        .map(move |service| format!("{package}.{}", service.name()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Decoded descriptor sets of everything this server serves: ours first, then health and
/// reflection.
fn descriptor_sets() -> Vec<prost_types::FileDescriptorSet> {
    [
        crate::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ]
    .iter()
    .filter_map(|bytes| prost_types::FileDescriptorSet::decode(*bytes).ok())
    .collect()
}

/// Every served method as an HTTP/2 path (`/package.Service/Method`), the label set of the
/// request metrics.
fn known_methods() -> HashSet<String> {
    descriptor_sets()
        .iter()
        .flat_map(|set| set.file.iter())
        .flat_map(|file| {
            let package = file.package().to_owned();
            file.service.iter().flat_map(move |service| {
                let package = package.clone();
                service
                    .method
                    .iter()
                    .map(move |method| format!("/{package}.{}/{}", service.name(), method.name()))
            })
        })
        .collect()
}

/// Reads the TLS files named by settings; errors name the setting.
pub fn load_tls(
    tls: &crate::config::TlsSettings,
) -> Result<tonic::transport::ServerTlsConfig, GrpcError> {
    let read = |setting: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|source| GrpcError::TlsFile {
            setting,
            path: path.display().to_string(),
            source,
        })
    };
    let identity = tonic::transport::Identity::from_pem(
        read("grpc.tls.cert_file", &tls.cert_file)?,
        read("grpc.tls.key_file", &tls.key_file)?,
    );
    let mut config = tonic::transport::ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &tls.client_ca_file {
        config = config.client_ca_root(tonic::transport::Certificate::from_pem(read(
            "grpc.tls.client_ca_file",
            ca,
        )?));
    }
    Ok(config)
}

#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("cannot read {path} (setting {setting}): {source}")]
    TlsFile {
        setting: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("grpc server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Accepted connections with Nagle's algorithm off. Tonic sets TCP_NODELAY only on listeners
/// it binds itself; on ours a response written as headers, data and trailers waits for the
/// client's delayed ACK (≈ 40 ms on Linux) whenever a call arrives while the last is in flight.
fn no_delay(
    incoming: TcpListenerStream,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    incoming.map(|accepted| {
        accepted.inspect(|stream| {
            if let Err(e) = stream.set_nodelay(true) {
                tracing::warn!(error = %e, "cannot set TCP_NODELAY");
            }
        })
    })
}

/// Serves gRPC on `listener` until `shutdown` fires, then stops accepting and lets in-flight
/// calls finish.
pub async fn serve(
    listener: TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
    state: ApiState,
    max_message_bytes: usize,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(), GrpcError> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    for name in service_names() {
        health_reporter
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let limit = max_message_bytes;
    let local: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(addr = ?local, "grpc listening");

    let drain = {
        let health_reporter = health_reporter.clone();
        async move {
            shutdown.cancelled().await;
            for name in service_names() {
                health_reporter
                    .set_service_status(name, tonic_health::ServingStatus::NotServing)
                    .await;
            }
        }
    };

    // Metrics outside authentication, so refused calls are counted with their code.
    let layers = tower::ServiceBuilder::new()
        .layer(GrpcMetricsLayer::new(metrics, known_methods()))
        .map_response(status::name_the_size_limit(limit))
        .layer(auth::AuthLayer::new(state.authenticator.clone()))
        .into_inner();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .layer(layers)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            UsageServiceServer::new(UsageApi::new(
                state.ingestor.clone(),
                state.ingest.max_batch_events,
                state.ingest.max_stream_events,
            ))
            .max_decoding_message_size(limit),
        )
        .add_service(
            QuotaServiceServer::new(QuotaApi::new(state.quota.clone()))
                .max_decoding_message_size(limit),
        )
        .add_service(
            TransactionServiceServer::new(TransactionApi::new(
                state.pool.clone(),
                state.transactions.clone(),
                state.ingest.max_batch_events,
            ))
            .max_decoding_message_size(limit),
        )
        .add_service(
            PriceBookServiceServer::new(PriceBookApi::new(
                state.pool.clone(),
                state.ingestor.clone(),
            ))
            .max_decoding_message_size(limit),
        )
        .add_service(
            InvoiceServiceServer::new(InvoiceApi::new(state.billing.clone()))
                .max_decoding_message_size(limit),
        )
        .add_service(
            ReportServiceServer::new(ReportApi::new(state.pool.clone()))
                .max_decoding_message_size(limit),
        )
        .add_service(
            ExportServiceServer::new(ExportApi::new(state.pool.clone()))
                .max_decoding_message_size(limit),
        )
        .add_service(
            AdminServiceServer::new(AdminApi::new(
                state.pool.clone(),
                state.ingest.default_price_book_id.clone(),
                state.authenticator.clone(),
            ))
            .max_decoding_message_size(limit),
        )
        .serve_with_incoming_shutdown(no_delay(TcpListenerStream::new(listener)), drain)
        .await?;
    Ok(())
}

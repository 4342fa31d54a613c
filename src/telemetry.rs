//! Logs (tracing, pretty or JSON) and the Prometheus registry every subsystem reports into.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, LogSettings};

/// Installs the global tracing subscriber. Logs go to stderr so stdout stays free for
/// command output (exports, key material).
pub fn init_tracing(settings: &LogSettings) {
    let filter = EnvFilter::try_new(&settings.filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match settings.format {
        LogFormat::Pretty => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    // A second init (tests spawning several apps in one process) keeps the first subscriber.
    let _ = result;
}

/// Metrics shared by the service's components. One registry per application instance, so
/// several instances in one test process do not mix their numbers.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub grpc_requests: IntCounterVec,
    pub grpc_request_duration: HistogramVec,
}

/// Latency buckets from 100 µs to 10 s: quota decisions live at the bottom, exports at the top.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let grpc_requests = IntCounterVec::new(
            Opts::new(
                "tokenmeter_grpc_requests_total",
                "gRPC requests served, by full method name and gRPC status code",
            ),
            &["method", "code"],
        )?;
        let grpc_request_duration = HistogramVec::new(
            HistogramOpts::new(
                "tokenmeter_grpc_request_duration_seconds",
                "Time from receiving a gRPC request to sending its final status",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["method"],
        )?;
        registry.register(Box::new(grpc_requests.clone()))?;
        registry.register(Box::new(grpc_request_duration.clone()))?;
        Ok(Self {
            registry,
            grpc_requests,
            grpc_request_duration,
        })
    }

    /// The Prometheus text exposition of every registered metric.
    pub fn render(&self) -> String {
        let families = self.registry.gather();
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_else(|e| format!("# encoding metrics failed: {e}\n"))
    }
}

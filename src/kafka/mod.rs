//! Kafka clients: shared client configuration, the readiness probe, and the usage consumer
//! with its dead-letter producer, all built on the same configuration.

pub mod consumer;
pub mod dead_letter;

use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;

use crate::config::KafkaSettings;

/// librdkafka configuration from settings: the broker list plus passthrough properties
/// (security, SASL, timeouts) exactly as an operator wrote them.
pub fn client_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &settings.brokers);
    for (key, value) in &settings.client {
        config.set(key, value);
    }
    config
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("kafka client configuration rejected: {0}")]
    Config(KafkaError),
    #[error("kafka brokers unreachable: {0}")]
    Unreachable(KafkaError),
    #[error("kafka probe task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Asks the cluster for metadata to prove the brokers answer. One long-lived client, so a
/// probe reuses its connections instead of opening new ones every scrape.
#[derive(Clone)]
pub struct KafkaProbe {
    client: Arc<BaseConsumer>,
    timeout: Duration,
}

impl KafkaProbe {
    pub fn new(settings: &KafkaSettings) -> Result<Self, ProbeError> {
        let client: BaseConsumer = client_config(settings)
            .set("group.id", "tokenmeter-readiness-probe")
            .create()
            .map_err(ProbeError::Config)?;
        Ok(Self {
            client: Arc::new(client),
            timeout: settings.probe_timeout,
        })
    }

    /// Returns how many brokers answered the metadata request.
    pub async fn check(&self) -> Result<usize, ProbeError> {
        let client = self.client.clone();
        let timeout = self.timeout;
        tokio::task::spawn_blocking(move || {
            client
                .fetch_metadata(None, timeout)
                .map(|metadata| metadata.brokers().len())
                .map_err(ProbeError::Unreachable)
        })
        .await?
    }
}

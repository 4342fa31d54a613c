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

/// Sets each `(property, value)` the operator did not set in `kafka.client`: tokenmeter's
/// defaults for tunables (batching, prefetch, statistics) that an operator may change.
pub fn with_defaults(mut config: ClientConfig, defaults: &[(&str, &str)]) -> ClientConfig {
    for (property, value) in defaults {
        if config.get(property).is_none() {
            config.set(*property, *value);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    #[test]
    fn an_operators_property_wins_over_a_default_and_the_rest_are_filled_in() {
        let settings = Settings::load_from(
            None,
            vec![(
                "TOKENMETER_KAFKA__CLIENT__QUEUED_MAX_MESSAGES_KBYTES".to_owned(),
                "1024".to_owned(),
            )],
        )
        .expect("settings");
        let config = with_defaults(
            client_config(&settings.kafka),
            &[
                ("queued.max.messages.kbytes", "16384"),
                ("statistics.interval.ms", "5000"),
            ],
        );
        assert_eq!(config.get("queued.max.messages.kbytes"), Some("1024"));
        assert_eq!(config.get("statistics.interval.ms"), Some("5000"));
    }
}

//! Layered, validated settings: embedded defaults < optional TOML file < `TOKENMETER_*` env.
//!
//! Nested settings use a double underscore in the environment, so `database.url` is
//! `TOKENMETER_DATABASE__URL`. Every error names the setting it is about, because a service
//! that fails to start should say exactly which knob is wrong.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Toml};
use figment::value::{Dict, Value};
use serde::Deserialize;

/// The defaults, embedded so the binary starts with no file at all.
const DEFAULTS: &str = include_str!("../config/default.toml");

/// Prefix of the environment variables that override settings.
pub const ENV_PREFIX: &str = "TOKENMETER_";

const MAX_RETENTION: Duration = Duration::from_secs(100 * 366 * 24 * 3600);
const MAX_FUTURE_SKEW: Duration = Duration::from_secs(366 * 24 * 3600);

/// All settings of the service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub grpc: GrpcSettings,
    pub admin: AdminSettings,
    pub kafka: KafkaSettings,
    pub ingest: IngestSettings,
    pub fold: FoldSettings,
    pub auth: AuthSettings,
    pub billing: BillingSettings,
    pub quota: QuotaSettings,
    pub log: LogSettings,
    /// How long in-flight work may take to drain after SIGTERM / Ctrl-C.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `postgres://user:password@host:port/database`.
    pub url: String,
    pub max_connections: u32,
    pub min_connections: u32,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Apply pending migrations when `serve` starts (also `serve --run-migrations`).
    pub run_migrations: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcSettings {
    pub enabled: bool,
    pub listen_addr: SocketAddr,
    /// Largest accepted request message, in bytes.
    pub max_message_bytes: usize,
    /// Serve TLS (rustls) instead of plaintext when set.
    #[serde(default)]
    pub tls: Option<TlsSettings>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain of the server.
    pub cert_file: std::path::PathBuf,
    /// PEM private key of the server.
    pub key_file: std::path::PathBuf,
    /// PEM CA bundle: when set, clients must present a certificate it signed (mutual TLS).
    #[serde(default)]
    pub client_ca_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    pub enabled: bool,
    /// Serves `/metrics`, `/healthz` and `/readyz`.
    pub listen_addr: SocketAddr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// Connect to Kafka at all; when off, `/readyz` does not check it.
    pub enabled: bool,
    /// Comma-separated `host:port` list.
    pub brokers: String,
    /// How long a readiness probe waits for broker metadata.
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
    /// Extra librdkafka properties passed through verbatim (e.g. `security.protocol`).
    pub client: BTreeMap<String, String>,
    pub consumer: ConsumerSettings,
}

/// The usage consumer: batches messages, writes each batch and its offsets in one
/// transaction, dead-letters what cannot be ingested.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerSettings {
    pub enabled: bool,
    pub group_id: String,
    pub usage_topic: String,
    /// Service-transaction lifecycle events (protobuf); empty = not consumed.
    pub transactions_topic: String,
    /// Dead letters of both topics (the `tokenmeter.dlq.topic` header tells them apart).
    pub dead_letter_topic: String,
    /// Most messages in one batch (one transaction).
    pub batch_max_messages: usize,
    /// How long a partial batch waits for more messages before it is written anyway.
    #[serde(with = "humantime_serde")]
    pub batch_linger: Duration,
    /// Batches written concurrently; each owns a fixed share of the partitions, so a
    /// partition's batches commit in order.
    pub writers: usize,
    /// Messages read but not yet committed above which partitions are paused.
    pub max_buffered_messages: usize,
    /// Larger messages are dead-lettered unread.
    pub max_message_bytes: usize,
    /// Consecutive dead-lettered messages that stop the consumer (0 = no limit).
    pub dead_letter_max_consecutive: u64,
    /// Share of the last `dead_letter_window` messages that may be dead-lettered before the
    /// consumer stops (1 = no limit).
    pub dead_letter_max_ratio: f64,
    pub dead_letter_window: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestSettings {
    /// Most events one IngestUsage call may carry.
    pub max_batch_events: usize,
    /// Most events one StreamUsage call may carry in total.
    pub max_stream_events: usize,
    /// Writer tasks; each owns a share of the tenants and commits their events in groups.
    pub writers: usize,
    /// Most events one writer commits in one transaction.
    pub max_group_events: usize,
    pub max_id_bytes: usize,
    pub max_attributes: usize,
    pub max_attribute_key_bytes: usize,
    pub max_attribute_value_bytes: usize,
    /// How far in the future an occurred_at may be (producer clock skew).
    #[serde(with = "humantime_serde")]
    pub max_future_skew: Duration,
    /// How long raw events are kept and deduplicated; older events are rejected.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How often `serve` drops expired partitions; 0s turns the job off (run
    /// `tokenmeter retention` from a scheduler instead).
    #[serde(with = "humantime_serde")]
    pub retention_interval: Duration,
    /// Create a tenant on its first event (with `default_currency` and the default price
    /// book) instead of rejecting the event as naming an unknown tenant.
    pub auto_create_tenants: bool,
    pub default_currency: String,
    /// The price book of tenants that do not name one.
    pub default_price_book_id: String,
}

/// The folder (`crate::fold`): when committed ingest batches are added to the rollups. It
/// folds once `min_events` are queued or the oldest queued batch is `max_age` old, up to
/// `max_events` per fold (one transaction); the larger a fold, the fewer rollup rows per event.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FoldSettings {
    /// Run the folder in `serve` (every replica may: batches are claimed SKIP LOCKED).
    pub enabled: bool,
    /// How often the queue is looked at.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    pub min_events: u64,
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    pub max_events: u64,
}

/// Reservations and quota alerts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaSettings {
    /// TTL of a hold when Reserve names none.
    #[serde(with = "humantime_serde")]
    pub default_ttl: Duration,
    /// Longer requested TTLs are clamped to this.
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    /// How often lapsed holds are reclaimed: the most a hold outlives its TTL. 0s turns the
    /// sweep off on this replica (another one must run it).
    #[serde(with = "humantime_serde")]
    pub expiry_interval: Duration,
    /// Most reservations one sweep transaction expires.
    pub expiry_batch: i64,
    /// Writer tasks per replica; each owns a share of the tenants and writes the reservations
    /// granted from leases in batches, and decides the calls leases do not (keyed Reserve,
    /// Settle with counts) in one transaction per batch.
    pub writers: usize,
    /// Most calls (or granted reservations) one writer handles in one transaction.
    pub max_batch: usize,
    /// Decide Reserve calls without an idempotency key from budget slices leased from Postgres,
    /// in memory (see `crate::quota`). Off: every decision is a transaction.
    pub leases: bool,
    /// Life of a lease. A replica stops granting from it a quarter of it before it ends
    /// (counted from before it asked) and renews it when a call needs it; a replica that died
    /// holding it has its slice returned `max_ttl` after it ends.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Replicas expected to lease one budget: a slice is the free budget / (2 × this), never
    /// less than the call needs.
    pub lease_replicas: u32,
    /// An unused slice no call took from for this long is given back, for other replicas.
    #[serde(with = "humantime_serde")]
    pub lease_idle: Duration,
    /// How long a writer lets granted reservations gather before writing them: the most a
    /// grant stays unwritten, on top of the write itself.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// How long policies (and the prices money limits use) are cached for decisions from
    /// leases: a changed policy binds new grants after at most this long.
    #[serde(with = "humantime_serde")]
    pub policy_cache_ttl: Duration,
    pub alerts: QuotaAlertSettings,
}

/// The publisher of threshold alerts (outbox table `quota_alerts` → Kafka).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaAlertSettings {
    /// Publish on this replica (needs kafka.enabled). Crossings are recorded either way.
    pub enabled: bool,
    pub topic: String,
    /// How often the outbox is polled.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

/// A setting that must never be printed: `Debug` shows `***`.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// A key with every scope on every tenant, for first start (create real keys with it, then
    /// unset it). Any string of at least 32 characters; never logged.
    pub bootstrap_admin_key: Option<Secret>,
    /// How long a key lookup is cached: the delay before a revocation takes effect everywhere.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BillingSettings {
    /// How long after a period ends its drafts wait for late usage before they may be
    /// finalized (FinalizeInvoice / ClosePeriod can skip it with ignore_grace_period).
    #[serde(with = "humantime_serde")]
    pub finalize_grace: Duration,
    /// How often `serve` finalizes the drafts of ended periods; 0s turns the job off (run
    /// `tokenmeter bill close` from a scheduler instead).
    #[serde(with = "humantime_serde")]
    pub close_interval: Duration,
    /// The issuer's number prefix: invoices are numbered `<prefix>-<year>-<000042>`, gap-free
    /// per prefix and year. 1-16 characters of [A-Z0-9].
    pub number_prefix: String,
    /// Tenants finalized per transaction when closing a period.
    pub close_batch_tenants: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A `tracing` filter directive such as `info` or `tokenmeter=debug,info`.
    pub filter: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

/// A settings problem, naming the setting and its source.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid setting `{setting}` ({}): {reason}", env_var_for(setting))]
    Invalid { setting: String, reason: String },
    #[error("cannot read config file {path}: {reason}")]
    File { path: String, reason: String },
}

impl Settings {
    /// Loads defaults, then `file` if given, then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// Like [`Settings::load`] with an explicit environment, so tests need not mutate the
    /// process environment.
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULTS));
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            figment = figment.merge(Toml::string(&text));
        }
        let env_pairs: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        let settings: Settings = figment
            .merge(EnvLayer(env_pairs))
            .extract()
            .map_err(from_figment)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Rules serde cannot express.
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |setting: &str, reason: &str| ConfigError::Invalid {
            setting: setting.to_owned(),
            reason: reason.to_owned(),
        };
        if self.database.url.trim().is_empty() {
            return Err(invalid("database.url", "is required"));
        }
        if !(self.database.url.starts_with("postgres://")
            || self.database.url.starts_with("postgresql://"))
        {
            return Err(invalid(
                "database.url",
                "must start with postgres:// or postgresql://",
            ));
        }
        if self.database.max_connections == 0 {
            return Err(invalid("database.max_connections", "must be at least 1"));
        }
        if self.database.min_connections > self.database.max_connections {
            return Err(invalid(
                "database.min_connections",
                "must not exceed database.max_connections",
            ));
        }
        if self.fold.enabled && self.fold.interval.is_zero() {
            return Err(invalid(
                "fold.interval",
                "must be above 0s while fold.enabled",
            ));
        }
        if self.fold.max_events == 0 {
            return Err(invalid("fold.max_events", "must be at least 1"));
        }
        if !crate::domain::tenant::is_currency_code(&self.ingest.default_currency) {
            return Err(invalid(
                "ingest.default_currency",
                "must be an ISO 4217 currency with minor units, such as USD",
            ));
        }
        // Bounds that keep `now ± duration` inside the calendar (a typo like "300000years"
        // would otherwise fail every event).
        if self.ingest.retention.is_zero() || self.ingest.retention > MAX_RETENTION {
            return Err(invalid(
                "ingest.retention",
                "must be above 0s and at most 100 years",
            ));
        }
        if self.ingest.max_future_skew > MAX_FUTURE_SKEW {
            return Err(invalid("ingest.max_future_skew", "must be at most 1 year"));
        }
        if self.grpc.max_message_bytes < 1024 {
            return Err(invalid("grpc.max_message_bytes", "must be at least 1024"));
        }
        if self.kafka.enabled && self.kafka.brokers.trim().is_empty() {
            return Err(invalid(
                "kafka.brokers",
                "must name at least one broker when kafka.enabled is true",
            ));
        }
        self.kafka.consumer.validate(self.kafka.enabled)?;
        if self.quota.default_ttl.is_zero() || self.quota.default_ttl > self.quota.max_ttl {
            return Err(invalid(
                "quota.default_ttl",
                "must be above 0s and at most quota.max_ttl",
            ));
        }
        if self.quota.writers == 0 || self.quota.max_batch == 0 {
            return Err(invalid(
                if self.quota.writers == 0 {
                    "quota.writers"
                } else {
                    "quota.max_batch"
                },
                "must be at least 1",
            ));
        }
        if self.quota.expiry_batch < 1 {
            return Err(invalid("quota.expiry_batch", "must be at least 1"));
        }
        if self.quota.lease_ttl < Duration::from_millis(100) {
            return Err(invalid("quota.lease_ttl", "must be at least 100ms"));
        }
        if self.quota.lease_replicas == 0 {
            return Err(invalid("quota.lease_replicas", "must be at least 1"));
        }
        if self.quota.lease_idle < Duration::from_millis(2) {
            return Err(invalid("quota.lease_idle", "must be at least 2ms"));
        }
        if self.quota.alerts.enabled && self.quota.alerts.topic.trim().is_empty() {
            return Err(invalid("quota.alerts.topic", "is required"));
        }
        if let Some((key, reason)) = self.kafka.client.keys().find_map(|key| {
            OWNED_KAFKA_PROPERTIES
                .iter()
                .find(|(owned, _)| owned == key)
                .map(|(_, reason)| (key, *reason))
        }) {
            return Err(invalid(&format!("kafka.client.{key}"), reason));
        }
        let prefix = &self.billing.number_prefix;
        if !(1..=16).contains(&prefix.len())
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        {
            return Err(invalid(
                "billing.number_prefix",
                "must be 1-16 characters of [A-Z0-9]",
            ));
        }
        if self.billing.close_batch_tenants == 0 {
            return Err(invalid("billing.close_batch_tenants", "must be at least 1"));
        }
        if self
            .log
            .filter
            .parse::<tracing_subscriber::EnvFilter>()
            .is_err()
        {
            return Err(invalid(
                "log.filter",
                "is not a valid tracing filter directive",
            ));
        }
        Ok(())
    }
}

impl ConsumerSettings {
    fn validate(&self, kafka_enabled: bool) -> Result<(), ConfigError> {
        let invalid = |setting: &str, reason: &str| ConfigError::Invalid {
            setting: format!("kafka.consumer.{setting}"),
            reason: reason.to_owned(),
        };
        // `kafka.enabled = false` turns every Kafka client off, the consumer included.
        if !self.enabled || !kafka_enabled {
            return Ok(());
        }
        for (setting, value) in [
            ("group_id", &self.group_id),
            ("usage_topic", &self.usage_topic),
            ("dead_letter_topic", &self.dead_letter_topic),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(setting, "is required"));
            }
        }
        if self.dead_letter_topic == self.usage_topic
            || self.dead_letter_topic == self.transactions_topic
        {
            return Err(invalid(
                "dead_letter_topic",
                "must differ from kafka.consumer.usage_topic and transactions_topic",
            ));
        }
        if self.transactions_topic == self.usage_topic {
            return Err(invalid(
                "transactions_topic",
                "must differ from kafka.consumer.usage_topic",
            ));
        }
        for (setting, value) in [
            ("batch_max_messages", self.batch_max_messages),
            ("writers", self.writers),
            ("max_message_bytes", self.max_message_bytes),
            ("dead_letter_window", self.dead_letter_window as usize),
        ] {
            if value == 0 {
                return Err(invalid(setting, "must be at least 1"));
            }
        }
        if self.max_buffered_messages < self.batch_max_messages {
            return Err(invalid(
                "max_buffered_messages",
                "must be at least kafka.consumer.batch_max_messages",
            ));
        }
        if !(self.dead_letter_max_ratio > 0.0 && self.dead_letter_max_ratio <= 1.0) {
            return Err(invalid(
                "dead_letter_max_ratio",
                "must be above 0 and at most 1",
            ));
        }
        Ok(())
    }
}

/// The `TOKENMETER_*` layer. Written out rather than using figment's `Env` so tests can pass
/// an environment explicitly instead of mutating the process's.
struct EnvLayer(Vec<(String, String)>);

impl figment::Provider for EnvLayer {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named("TOKENMETER_* environment variables")
    }

    fn data(&self) -> Result<figment::value::Map<figment::Profile, Dict>, figment::Error> {
        let mut root = Dict::new();
        for (name, raw) in &self.0 {
            let Some(path) = env_var_to_path(name) else {
                continue;
            };
            // librdkafka properties are strings whatever they look like ("45000", "true"):
            // parsed, they would no longer fit `kafka.client`'s string map.
            let value: Value = if path.starts_with(&["kafka".to_owned(), "client".to_owned()]) {
                Value::from(raw.clone())
            } else {
                raw.parse().unwrap_or_else(|never| match never {})
            };
            insert_path(&mut root, &path, value);
        }
        Ok(figment::Profile::Default.collect(root))
    }
}

/// Top-level settings that are not sections, so their variables have no `__`.
/// librdkafka properties the service sets itself because exactly-once or durability rests on
/// them; `kafka.client` may not override them (it would be overridden silently otherwise).
const OWNED_KAFKA_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "set kafka.brokers instead"),
    ("group.id", "set kafka.consumer.group_id instead"),
    (
        "enable.auto.commit",
        "is set by tokenmeter: positions are stored in Postgres, the Kafka commit is advisory",
    ),
    (
        "enable.auto.offset.store",
        "is set by tokenmeter: positions are stored in Postgres, the Kafka commit is advisory",
    ),
    (
        "auto.offset.reset",
        "is set by tokenmeter: a partition with no position in Postgres is read from its start",
    ),
    (
        "enable.idempotence",
        "is set by tokenmeter: dead letters and alerts are written idempotently",
    ),
    (
        "acks",
        "is set by tokenmeter: dead letters and alerts wait for every in-sync replica",
    ),
];

const TOP_LEVEL_SCALARS: &[&str] = &["shutdown_grace"];

/// `TOKENMETER_DATABASE__URL` → `["database", "url"]`. Only variables with a `__` or naming a
/// top-level setting are settings; others sharing the prefix (`TOKENMETER_CONFIG`, the dev
/// scripts' `TOKENMETER_PG_PORT`, …) are left alone, while a typo inside a section
/// (`TOKENMETER_DATABASE__URLL`) is still rejected as unknown. Keys under `kafka.client` are
/// librdkafka property names, which use dots, so `TOKENMETER_KAFKA__CLIENT__SECURITY_PROTOCOL`
/// → `["kafka", "client", "security.protocol"]`.
fn env_var_to_path(name: &str) -> Option<Vec<String>> {
    let rest = name.strip_prefix(ENV_PREFIX)?.to_ascii_lowercase();
    if !rest.contains("__") && !TOP_LEVEL_SCALARS.contains(&rest.as_str()) {
        return None;
    }
    let mut parts: Vec<String> = rest.split("__").map(str::to_owned).collect();
    if parts.len() >= 3 && parts[0] == "kafka" && parts[1] == "client" {
        let property = parts.split_off(2).join("__").replace('_', ".");
        parts.push(property);
    }
    (!parts.iter().any(String::is_empty)).then_some(parts)
}

fn insert_path(dict: &mut Dict, path: &[String], value: Value) {
    match path {
        [] => {}
        [last] => {
            dict.insert(last.clone(), value);
        }
        [head, tail @ ..] => {
            let entry = dict
                .entry(head.clone())
                .or_insert_with(|| Value::from(Dict::new()));
            if !matches!(entry, Value::Dict(..)) {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert_path(inner, tail, value);
            }
        }
    }
}

/// The environment variable that sets a setting path, for error messages.
pub fn env_var_for(setting: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        setting.replace('.', "__").to_ascii_uppercase()
    )
}

fn from_figment(error: figment::Error) -> ConfigError {
    let setting = if error.path.is_empty() {
        "(root)".to_owned()
    } else {
        error.path.join(".")
    };
    let source = error
        .metadata
        .as_ref()
        .map(|m| m.name.to_string())
        .unwrap_or_default();
    let mut reason = error.kind.to_string();
    if !source.is_empty() {
        reason = format!("{reason} (from {source})");
    }
    ConfigError::Invalid { setting, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn error_of(pairs: &[(&str, &str)]) -> String {
        Settings::load_from(None, env(pairs))
            .expect_err("settings should be rejected")
            .to_string()
    }

    #[test]
    fn embedded_defaults_load_and_validate() {
        let settings = Settings::load_from(None, Vec::new()).expect("defaults are valid");

        assert_eq!(settings.grpc.listen_addr.port(), 50051);
        assert_eq!(settings.log.format, LogFormat::Pretty);
        assert!(settings.kafka.client.is_empty());
    }

    #[test]
    fn environment_overrides_nested_settings_and_ignores_other_variables() {
        let settings = Settings::load_from(
            None,
            env(&[
                ("TOKENMETER_GRPC__LISTEN_ADDR", "0.0.0.0:6000"),
                ("TOKENMETER_DATABASE__MAX_CONNECTIONS", "7"),
                ("TOKENMETER_SHUTDOWN_GRACE", "3s"),
                ("TOKENMETER_LOG__FORMAT", "json"),
                ("DATABASE__MAX_CONNECTIONS", "99"),
            ]),
        )
        .expect("valid");

        assert_eq!(
            settings.grpc.listen_addr,
            "0.0.0.0:6000".parse().expect("addr")
        );
        assert_eq!(settings.database.max_connections, 7);
        assert_eq!(settings.shutdown_grace, Duration::from_secs(3));
        assert_eq!(settings.log.format, LogFormat::Json);
    }

    #[test]
    fn kafka_client_properties_from_the_environment_keep_librdkafka_dotted_names() {
        let settings = Settings::load_from(
            None,
            env(&[
                ("TOKENMETER_KAFKA__CLIENT__SECURITY_PROTOCOL", "SASL_SSL"),
                ("TOKENMETER_KAFKA__CLIENT__SASL_MECHANISMS", "SCRAM-SHA-512"),
            ]),
        )
        .expect("valid");

        assert_eq!(settings.kafka.client["security.protocol"], "SASL_SSL");
        assert_eq!(settings.kafka.client["sasl.mechanisms"], "SCRAM-SHA-512");
    }

    #[test]
    fn consumer_settings_are_checked_and_errors_name_them() {
        let error = |pairs: &[(&str, &str)]| {
            Settings::load_from(None, env(pairs))
                .expect_err("invalid")
                .to_string()
        };
        let same = error(&[(
            "TOKENMETER_KAFKA__CONSUMER__DEAD_LETTER_TOPIC",
            "tokenmeter.usage.v1",
        )]);
        assert!(
            same.contains("kafka.consumer.dead_letter_topic")
                && same.contains("TOKENMETER_KAFKA__CONSUMER__DEAD_LETTER_TOPIC"),
            "{same}"
        );
        let ratio = error(&[("TOKENMETER_KAFKA__CONSUMER__DEAD_LETTER_MAX_RATIO", "0")]);
        assert!(
            ratio.contains("kafka.consumer.dead_letter_max_ratio"),
            "{ratio}"
        );
        let kafka_off = Settings::load_from(
            None,
            env(&[
                ("TOKENMETER_KAFKA__ENABLED", "false"),
                ("TOKENMETER_KAFKA__CONSUMER__DEAD_LETTER_MAX_RATIO", "0"),
            ]),
        );
        assert!(
            kafka_off.is_ok(),
            "no consumer runs, so its settings do not matter"
        );
    }

    #[test]
    fn a_file_overrides_defaults_and_the_environment_overrides_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokenmeter.toml");
        std::fs::write(
            &path,
            "[database]\nmax_connections = 11\nmin_connections = 2\n[kafka.client]\n\"socket.timeout.ms\" = \"5000\"\n",
        )
        .expect("write file");

        let settings = Settings::load_from(
            Some(&path),
            env(&[("TOKENMETER_DATABASE__MIN_CONNECTIONS", "3")]),
        )
        .expect("valid");

        assert_eq!(settings.database.max_connections, 11);
        assert_eq!(settings.database.min_connections, 3);
        assert_eq!(settings.kafka.client["socket.timeout.ms"], "5000");
    }

    #[test]
    fn a_value_of_the_wrong_type_names_the_setting_and_its_variable() {
        let message = error_of(&[("TOKENMETER_GRPC__LISTEN_ADDR", "not-an-address")]);

        assert!(message.contains("`grpc.listen_addr`"), "{message}");
        assert!(
            message.contains("TOKENMETER_GRPC__LISTEN_ADDR"),
            "{message}"
        );
    }

    #[test]
    fn prefixed_variables_that_are_not_settings_are_left_alone() {
        let settings = Settings::load_from(
            None,
            env(&[
                ("TOKENMETER_CONFIG", "/etc/tokenmeter.toml"),
                ("TOKENMETER_PG_PORT", "5433"),
                ("TOKENMETER_TEST_DATABASE_URL", "postgres://x"),
            ]),
        );

        assert!(settings.is_ok(), "{settings:?}");
    }

    #[test]
    fn an_unknown_setting_is_rejected_rather_than_ignored() {
        let message = error_of(&[("TOKENMETER_DATABASE__URLL", "postgres://x")]);

        assert!(message.contains("urll"), "{message}");
    }

    #[test]
    fn rules_across_settings_name_the_offending_one() {
        let cases = [
            (vec![("TOKENMETER_DATABASE__URL", "")], "database.url"),
            (
                vec![("TOKENMETER_DATABASE__URL", "mysql://x")],
                "database.url",
            ),
            (
                vec![("TOKENMETER_DATABASE__MAX_CONNECTIONS", "0")],
                "database.max_connections",
            ),
            (
                vec![("TOKENMETER_DATABASE__MIN_CONNECTIONS", "500")],
                "database.min_connections",
            ),
            (vec![("TOKENMETER_KAFKA__BROKERS", " ")], "kafka.brokers"),
            (
                vec![("TOKENMETER_KAFKA__CLIENT__BOOTSTRAP_SERVERS", "h:1")],
                "kafka.client.bootstrap.servers",
            ),
            (
                vec![("TOKENMETER_KAFKA__CLIENT__ENABLE_AUTO_COMMIT", "true")],
                "kafka.client.enable.auto.commit",
            ),
            (
                vec![("TOKENMETER_KAFKA__CLIENT__GROUP_ID", "mine")],
                "kafka.client.group.id",
            ),
            (vec![("TOKENMETER_LOG__FILTER", "[[[")], "log.filter"),
            (
                vec![("TOKENMETER_BILLING__NUMBER_PREFIX", "inv")],
                "billing.number_prefix",
            ),
            (vec![("TOKENMETER_LOG__FORMAT", "xml")], "log.format"),
            (
                vec![("TOKENMETER_INGEST__DEFAULT_CURRENCY", "usd")],
                "ingest.default_currency",
            ),
            (
                vec![("TOKENMETER_INGEST__DEFAULT_CURRENCY", "XAU")],
                "ingest.default_currency",
            ),
            (
                vec![("TOKENMETER_INGEST__RETENTION", "300000years")],
                "ingest.retention",
            ),
            (
                vec![("TOKENMETER_INGEST__MAX_FUTURE_SKEW", "2years")],
                "ingest.max_future_skew",
            ),
            (
                vec![("TOKENMETER_SHUTDOWN_GRACE", "soon")],
                "shutdown_grace",
            ),
        ];
        for (pairs, setting) in cases {
            let message = error_of(&pairs);
            assert!(
                message.contains(&format!("`{setting}`")),
                "{setting}: {message}"
            );
        }
    }

    #[test]
    fn a_missing_config_file_is_named_in_the_error() {
        let error = Settings::load_from(Some(Path::new("/nonexistent/tm.toml")), Vec::new())
            .expect_err("missing file");

        assert!(
            error.to_string().contains("/nonexistent/tm.toml"),
            "{error}"
        );
    }
}

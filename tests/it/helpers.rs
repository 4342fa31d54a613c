//! Test scaffolding: a fresh database per test, the app on port 0, per-test Kafka topics.

use std::net::SocketAddr;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use sqlx::{Connection, PgConnection, PgPool};
use tokenmeter::app::{AppError, Application};
use tokenmeter::config::Settings;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The maintenance database tests create their databases from; override with
/// `TOKENMETER_TEST_DATABASE_URL`.
pub fn base_database_url() -> String {
    std::env::var("TOKENMETER_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://tokenmeter:tokenmeter@127.0.0.1:5433/tokenmeter".into())
}

/// Kafka bootstrap servers; override with `TOKENMETER_TEST_KAFKA_BROKERS`.
pub fn kafka_brokers() -> String {
    std::env::var("TOKENMETER_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// Test databases are named `tm_test_<unix seconds>_<uuid>`; those older than this are left
/// over from earlier runs (tests do not drop their own: a failing test's database is worth
/// looking at) and are dropped when a test process creates its first database.
const STALE_TEST_DATABASE: Duration = Duration::from_secs(3600);

/// Creates an empty database with a unique name and returns its URL.
pub async fn create_database() -> String {
    let base = base_database_url();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    let name = format!(
        "tm_test_{}_{}",
        now.as_secs(),
        uuid::Uuid::new_v4().simple()
    );
    let mut conn = PgConnection::connect(&base)
        .await
        .expect("connect to the test postgres (is deploy/local/postgres.sh running?)");
    static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    SWEPT.get_or_init(|| drop_stale_databases(&base, now)).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(r#"CREATE DATABASE "{name}""#)))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let mut url = url::Url::parse(&base).expect("test database url");
    url.set_path(&name);
    url.to_string()
}

/// Drops the test databases created before `now` less [`STALE_TEST_DATABASE`], and those named
/// before names carried a time. One still in use (a concurrent run's) makes `DROP DATABASE`
/// fail, which is ignored: it is dropped by a later run.
async fn drop_stale_databases(base: &str, now: Duration) {
    let mut conn = PgConnection::connect(base)
        .await
        .expect("connect to the test postgres");
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT datname::text FROM pg_database WHERE datname LIKE 'tm\\_test\\_%'",
    )
    .fetch_all(&mut conn)
    .await
    .expect("list test databases");
    let cutoff = now.saturating_sub(STALE_TEST_DATABASE).as_secs();
    for name in names {
        let created = name
            .strip_prefix("tm_test_")
            .and_then(|rest| rest.split_once('_'))
            .and_then(|(secs, _)| secs.parse::<u64>().ok());
        if created.is_none_or(|secs| secs < cutoff) {
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                r#"DROP DATABASE IF EXISTS "{name}""#
            )))
            .execute(&mut conn)
            .await;
        }
    }
}

/// The bootstrap admin key every test server accepts (every scope, every tenant).
pub const ADMIN_KEY: &str = "test-bootstrap-admin-key-0123456789abcdef";

/// A channel whose calls carry `key`.
use tokenmeter::grpc::auth::Bearer;

pub type Authed =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;

pub fn authed(channel: tonic::transport::Channel, key: &str) -> Authed {
    with_key(channel, Some(key))
}

/// A channel whose calls carry `key`, or no `authorization` metadata at all.
pub fn with_key(channel: tonic::transport::Channel, key: Option<&str>) -> Authed {
    tonic::service::interceptor::InterceptedService::new(
        channel,
        Bearer::new(key).expect("ascii key"),
    )
}

/// Settings for a test: defaults, a fresh database, ephemeral ports, the test Kafka, the test
/// admin key, and no key cache (so a revocation is visible to the very next call).
pub async fn test_settings() -> Settings {
    let mut settings = Settings::load_from(
        None,
        vec![(
            "TOKENMETER_AUTH__BOOTSTRAP_ADMIN_KEY".to_owned(),
            ADMIN_KEY.to_owned(),
        )],
    )
    .expect("default settings load");
    settings.auth.cache_ttl = Duration::ZERO;
    settings.database.url = create_database().await;
    settings.database.run_migrations = true;
    settings.database.max_connections = 8;
    settings.grpc.listen_addr = "127.0.0.1:0".parse().expect("addr");
    settings.admin.listen_addr = "127.0.0.1:0".parse().expect("addr");
    settings.kafka.brokers = kafka_brokers();
    // Tests that consume enable it with a topic and group of their own.
    settings.kafka.consumer.enabled = false;
    settings.shutdown_grace = Duration::from_secs(5);
    // Fold every batch within tens of milliseconds, so rollups catch up quickly.
    settings.fold.interval = Duration::from_millis(20);
    settings.fold.max_age = Duration::from_millis(20);
    settings
}

/// Waits until a running server's folder has folded every committed ingest batch into the
/// rollups (the test folds nothing itself, so a folder that stopped working fails it).
pub async fn folded(pool: &PgPool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM fold_queue")
            .fetch_one(pool)
            .await
            .expect("queue");
        if queued == 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{queued} batches never folded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The token classes by name — the columns of a raw usage row, the keys of loadgen's ground
/// truth — in class order (class 1 = input … 12).
pub const CLASS_COLUMNS: [&str; 12] = [
    "input",
    "cache_read",
    "cache_write_5m",
    "cache_write_1h",
    "output",
    "reasoning",
    "input_audio",
    "output_audio",
    "input_image",
    "output_image",
    "cache_write_30m",
    "cache_write_12h",
];

/// Once the folder has caught up: every usage rollup of the database equals sums over the raw
/// rows, row by row — the hourly rollup by class (each event counted once, on its first class
/// with tokens), the hourly and daily rollups by transaction state (at each transaction's
/// stored state). Amounts compare by value. Written independently of the fold's SQL: classes
/// unpivoted row by row, the first class found with `array_position`.
pub async fn assert_rollups_equal_raw(pool: &PgPool) {
    folded(pool).await;
    let classes = CLASS_COLUMNS
        .iter()
        .enumerate()
        .map(|(i, c)| format!("({}, e.{c}, e.billed_{c}, e.cost_{c})", i + 1))
        .collect::<Vec<_>>()
        .join(", ");
    let has_tokens = CLASS_COLUMNS.map(|c| format!("e.{c} > 0")).join(", ");
    let by_class = |source: &str| -> String {
        format!(
            "SELECT format('%s %s %s %s %s %s %s %s: %s %s %s %s %s %s %s %s', tenant_id, hour,
                           agent_id, service, provider, model, token_class, currency, tokens,
                           trim_scale(billed_amount), trim_scale(cost_amount), unpriced_tokens,
                           class_events, class_unpriced_events, events, unpriced_events)
             FROM ({source}) r ORDER BY 1"
        )
    };
    let stored: Vec<String> =
        sqlx::query_scalar(sqlx::AssertSqlSafe(by_class("SELECT * FROM usage_rollups")))
            .fetch_all(pool)
            .await
            .expect("rollups");
    let raw: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(by_class(&format!(
        "SELECT e.tenant_id, date_trunc('hour', e.occurred_at, 'UTC') AS hour, e.agent_id,
                coalesce(e.service, '') AS service, e.provider, e.model,
                c.class AS token_class, e.currency::text AS currency,
                sum(c.tokens) AS tokens, coalesce(sum(c.billed), 0) AS billed_amount,
                coalesce(sum(c.cost), 0) AS cost_amount,
                coalesce(sum(c.tokens) FILTER (WHERE c.billed IS NULL), 0) AS unpriced_tokens,
                count(*) FILTER (WHERE c.tokens > 0) AS class_events,
                count(*) FILTER (WHERE c.tokens > 0 AND c.billed IS NULL)
                    AS class_unpriced_events,
                count(*) FILTER (WHERE c.class = f.class) AS events,
                count(*) FILTER (WHERE c.class = f.class AND e.unpriced_tokens > 0)
                    AS unpriced_events
         FROM usage_events e
         CROSS JOIN LATERAL (SELECT coalesce(array_position(ARRAY[{has_tokens}], true), 1)
                             AS class) f
         CROSS JOIN LATERAL (VALUES {classes}) AS c (class, tokens, billed, cost)
         WHERE c.tokens > 0 OR c.class = f.class
         GROUP BY 1, 2, 3, 4, 5, 6, 7, 8"
    ))))
    .fetch_all(pool)
    .await
    .expect("raw sums by class");
    assert_eq!(stored, raw, "usage_rollups against the raw rows");

    let tokens = CLASS_COLUMNS.join(", ");
    let summed = CLASS_COLUMNS.map(|c| format!("sum(e.{c})")).join(", ");
    let by_state = |source: &str| -> String {
        format!(
            "SELECT format('%s %s %s %s %s %s %s %s: %s %s %s %s %s', tenant_id, at, agent_id,
                           service, provider, model, currency, state, ARRAY[{tokens}],
                           trim_scale(billed_amount), trim_scale(cost_amount), events,
                           unpriced_events)
             FROM ({source}) r ORDER BY 1"
        )
    };
    let raw_by_state = |bucket: &str| -> String {
        format!(
            "SELECT e.tenant_id, {bucket} AS at, e.agent_id, coalesce(e.service, '') AS service,
                    e.provider, e.model, e.currency::text AS currency,
                    CASE WHEN e.transaction_id IS NULL THEN 0 ELSE coalesce(s.state, 1) END
                        AS state,
                    {}, sum(e.billed_amount) AS billed_amount, sum(e.cost_amount) AS cost_amount,
                    count(*) AS events,
                    count(*) FILTER (WHERE e.unpriced_tokens > 0) AS unpriced_events
             FROM usage_events e
             JOIN tenants t ON t.tenant_id = e.tenant_id
             LEFT JOIN transaction_states s
               ON s.tenant_id = e.tenant_id AND s.transaction_id = e.transaction_id COLLATE \"C\"
             GROUP BY 1, 2, 3, 4, 5, 6, 7, 8",
            CLASS_COLUMNS
                .iter()
                .zip(summed.split(", "))
                .map(|(c, sum)| format!("{sum} AS {c}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    for (table, at, bucket) in [
        (
            "usage_state_rollups",
            "hour",
            "date_trunc('hour', e.occurred_at, 'UTC')",
        ),
        (
            "usage_state_daily_rollups",
            "day",
            // Days are cut from UTC hours (exact for zones whole hours from UTC, the only ones
            // attribution reads daily rows for).
            "date_trunc('day', date_trunc('hour', e.occurred_at, 'UTC'), t.billing_timezone)",
        ),
    ] {
        let stored: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(by_state(&format!(
            "SELECT *, {at} AS at FROM {table}"
        ))))
        .fetch_all(pool)
        .await
        .expect("state rollups");
        let raw: Vec<String> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(by_state(&raw_by_state(bucket))))
                .fetch_all(pool)
                .await
                .expect("raw sums by state");
        assert_eq!(stored, raw, "{table} against the raw rows");
    }
}

/// The value of the sample whose line starts with `name{` and carries every label in
/// `labels` (each written as `key="value"`), parsed whole: `… 2` is 2, never a prefix of 20.
pub fn sample(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        })
        .find(|line| labels.iter().all(|label| line.contains(label)))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

pub struct TestApp {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub pool: PgPool,
    shutdown: CancellationToken,
    handle: JoinHandle<Result<(), AppError>>,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Spawns the app after `customize` has adjusted the test settings.
pub async fn spawn_app_with(customize: impl FnOnce(&mut Settings)) -> TestApp {
    let mut settings = test_settings().await;
    // `TEST_LOG=debug cargo test …` shows the service's logs while debugging a test.
    if let Ok(filter) = std::env::var("TEST_LOG") {
        settings.log.filter = filter;
        tokenmeter::telemetry::init_tracing(&settings.log);
    }
    customize(&mut settings);
    let app = Application::build(settings).await.expect("app builds");
    let grpc_addr = app.grpc_addr().expect("grpc enabled");
    let admin_addr = app.admin_addr().expect("admin enabled");
    let pool = app.pool().clone();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    TestApp {
        grpc_addr,
        admin_addr,
        pool,
        shutdown,
        handle,
    }
}

impl TestApp {
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }

    /// The Prometheus text the admin endpoint serves now.
    pub async fn metrics(&self) -> String {
        reqwest::get(self.admin_url("/metrics"))
            .await
            .expect("scrape /metrics")
            .text()
            .await
            .expect("metrics body")
    }

    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.grpc_url())
            .expect("endpoint")
            .connect()
            .await
            .expect("connect to the test server")
    }

    /// Triggers the graceful shutdown and waits for it.
    pub async fn stop(self) -> Result<(), AppError> {
        self.shutdown.cancel();
        self.handle.await.expect("app task")
    }
}

/// Creates a topic only this test uses.
pub async fn create_topic(partitions: i32) -> String {
    let name = format!("tm-test-{}", uuid::Uuid::new_v4().simple());
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .create()
        .expect("kafka admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(&name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topic request (is deploy/local/kafka.sh running?)");
    for result in results {
        result.expect("topic created");
    }
    name
}

/// A `tokenmeter serve` child process on free ports, for tests that kill or signal it. Dropping
/// it kills and reaps the process, so a test that ends (or fails) early leaves no server behind.
pub struct ServeProcess {
    child: Option<std::process::Child>,
    /// Reads the server's stderr from the moment it starts, so that logging (debug level logs
    /// every migration statement) never fills the pipe and blocks the server before it is
    /// ready; joins with everything it logged once the server exits.
    logs: Option<std::thread::JoinHandle<String>>,
    pub grpc_port: u16,
    pub admin_port: u16,
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl ServeProcess {
    pub fn child(&mut self) -> &mut std::process::Child {
        self.child.as_mut().expect("the child was taken")
    }

    /// Hands the process over to a test that manages its whole life (e.g. a graceful stop).
    /// The reader of the server's stderr (see [`ServeProcess`]).
    pub fn logs(&mut self) -> std::thread::JoinHandle<String> {
        self.logs.take().expect("logs taken once")
    }

    pub fn take_child(&mut self) -> std::process::Child {
        self.child.take().expect("the child was taken")
    }

    /// A connected channel to this server's gRPC port.
    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", self.grpc_port))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect to the serve process")
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A command for the built binary with no inherited `TOKENMETER_*` settings.
pub fn tokenmeter_command() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tokenmeter"));
    for (key, _) in std::env::vars() {
        if key.starts_with("TOKENMETER_") {
            command.env_remove(key);
        }
    }
    command
}

/// Starts `serve --run-migrations` against `database_url` and waits until `/readyz` is 200.
pub async fn spawn_serve(database_url: &str, extra_env: &[(&str, &str)]) -> ServeProcess {
    let (grpc_port, admin_port) = (free_port(), free_port());
    let mut command = tokenmeter_command();
    command
        .args(["serve", "--run-migrations"])
        .env("TOKENMETER_DATABASE__URL", database_url)
        .env(
            "TOKENMETER_GRPC__LISTEN_ADDR",
            format!("127.0.0.1:{grpc_port}"),
        )
        .env(
            "TOKENMETER_ADMIN__LISTEN_ADDR",
            format!("127.0.0.1:{admin_port}"),
        )
        .env("TOKENMETER_KAFKA__BROKERS", kafka_brokers())
        // Consuming tests turn it on with a topic and group of their own.
        .env("TOKENMETER_KAFKA__CONSUMER__ENABLED", "false")
        .env("TOKENMETER_LOG__FORMAT", "json")
        .env("TOKENMETER_AUTH__BOOTSTRAP_ADMIN_KEY", ADMIN_KEY)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for (key, value) in extra_env {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("spawn tokenmeter serve");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let logs = std::thread::spawn(move || {
        use std::io::Read as _;
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let ready_url = format!("http://127.0.0.1:{admin_port}/readyz");
    loop {
        if let Ok(response) = reqwest::get(&ready_url).await
            && response.status() == 200
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "serve never became ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ServeProcess {
        child: Some(child),
        logs: Some(logs),
        grpc_port,
        admin_port,
    }
}

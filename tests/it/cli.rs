//! The `tokenmeter` binary as an operator runs it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};

use crate::helpers::{create_database, kafka_brokers};

fn tokenmeter() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tokenmeter"));
    // Start from a clean slate: only the variables a test sets apply.
    for (key, _) in std::env::vars() {
        if key.starts_with("TOKENMETER_") {
            command.env_remove(key);
        }
    }
    command
}

#[test]
fn an_invalid_setting_stops_start_with_a_message_naming_it() {
    let output = tokenmeter()
        .arg("serve")
        .env("TOKENMETER_GRPC__LISTEN_ADDR", "not-an-address")
        .output()
        .expect("run tokenmeter");

    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("grpc.listen_addr"), "{stderr}");
    assert!(stderr.contains("TOKENMETER_GRPC__LISTEN_ADDR"), "{stderr}");
}

#[test]
fn a_missing_database_url_stops_start_with_a_message_naming_it() {
    let output = tokenmeter()
        .arg("migrate")
        .env("TOKENMETER_DATABASE__URL", "")
        .output()
        .expect("run tokenmeter");

    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("database.url"), "{stderr}");
    assert!(stderr.contains("required"), "{stderr}");
}

#[test]
fn an_unreachable_database_fails_start_without_leaking_the_password() {
    let output = tokenmeter()
        .arg("migrate")
        .env(
            "TOKENMETER_DATABASE__URL",
            "postgres://someone:s3cret-pw@127.0.0.1:1/nothing",
        )
        .env("TOKENMETER_DATABASE__CONNECT_TIMEOUT", "1s")
        .output()
        .expect("run tokenmeter");

    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("database.url"), "{stderr}");
    assert!(!stderr.contains("s3cret-pw"), "password leaked: {stderr}");
}

async fn table_names(url: &str) -> Vec<String> {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
    )
    .fetch_all(&mut conn)
    .await
    .expect("list tables")
}

#[tokio::test]
async fn migrate_creates_the_schema_and_is_idempotent() {
    let url = create_database().await;
    assert!(!table_names(&url).await.contains(&"tenants".to_owned()));

    for run in 1..=2 {
        let output = tokenmeter()
            .arg("migrate")
            .env("TOKENMETER_DATABASE__URL", &url)
            .output()
            .expect("run tokenmeter migrate");
        assert!(
            output.status.success(),
            "run {run}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    let tables = table_names(&url).await;
    for expected in ["api_key_tenants", "api_keys", "kafka_offsets", "tenants"] {
        assert!(
            tables.contains(&expected.to_owned()),
            "{expected} missing: {tables:?}"
        );
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[tokio::test]
async fn serve_runs_migrations_logs_json_and_drains_on_sigterm() {
    let url = create_database().await;
    let admin_port = free_port();
    let mut child = tokenmeter()
        .args(["serve", "--run-migrations"])
        .env("TOKENMETER_DATABASE__URL", &url)
        .env(
            "TOKENMETER_GRPC__LISTEN_ADDR",
            format!("127.0.0.1:{}", free_port()),
        )
        .env(
            "TOKENMETER_ADMIN__LISTEN_ADDR",
            format!("127.0.0.1:{admin_port}"),
        )
        .env("TOKENMETER_KAFKA__BROKERS", kafka_brokers())
        .env("TOKENMETER_LOG__FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tokenmeter serve");

    let deadline = Instant::now() + Duration::from_secs(30);
    let ready_url = format!("http://127.0.0.1:{admin_port}/readyz");
    loop {
        if let Ok(response) = reqwest::get(&ready_url).await
            && response.status() == 200
        {
            break;
        }
        assert!(Instant::now() < deadline, "serve never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(table_names(&url).await.contains(&"tenants".to_owned()));

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(killed.success());
    let output = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return (status, started.elapsed(), child);
            }
            if started.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!("serve did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .expect("waiter");
    let (status, _, child) = output;
    let stderr = std::io::read_to_string(child.stderr.expect("stderr")).expect("read stderr");

    assert!(status.success(), "exit {status:?}: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for line in &lines {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
    }
    assert!(stderr.contains("shutdown complete"), "{stderr}");
}

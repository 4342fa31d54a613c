//! The `tokenmeter` binary as an operator runs it.

use std::process::Command;
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};

use crate::helpers::{create_database, tokenmeter_command};

fn tokenmeter() -> Command {
    tokenmeter_command()
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

#[tokio::test]
async fn serve_runs_migrations_logs_json_and_drains_on_sigterm() {
    let url = create_database().await;
    let mut server = crate::helpers::spawn_serve(&url, &[]).await;
    let logs = server.logs();
    let mut child = server.take_child();
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
                return (status, child);
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
    let (status, _child) = output;
    let stderr = logs.join().expect("log reader");

    assert!(status.success(), "exit {status:?}: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for line in &lines {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
    }
    assert!(stderr.contains("shutdown complete"), "{stderr}");
}

#[tokio::test]
async fn a_request_in_flight_at_sigterm_completes_before_serve_exits() {
    let url = create_database().await;
    let mut server = crate::helpers::spawn_serve(&url, &[]).await;
    let mut child = server.take_child();
    let mut api = crate::usage_support::Clients::new(server.channel().await);
    let tenant = api.tenant("USD", "UTC", None).await;
    let pool = sqlx::PgPool::connect(&url).await.expect("pool");
    // Hold the tenant's row so the ingest call waits in its transaction (it takes the row
    // FOR KEY SHARE), in flight when the signal comes.
    let mut hold = pool.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM tenants WHERE tenant_id = $1 FOR UPDATE")
        .bind(&tenant)
        .execute(&mut *hold)
        .await
        .expect("hold the tenant");
    let call = tokio::spawn({
        let tenant = tenant.clone();
        async move {
            api.ingest(vec![crate::usage_support::event(
                &tenant,
                "in-flight",
                7,
                1,
            )])
            .await
        }
    });
    crate::ingest::until_lock_waiters(&pool, 1, "the ingest call").await;

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(killed.success());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        child.try_wait().expect("wait").is_none(),
        "serve exited with a request in flight"
    );
    hold.commit().await.expect("release the tenant");
    let response = call.await.expect("call task");
    let status = tokio::task::spawn_blocking(move || child.wait().expect("wait"))
        .await
        .expect("waiter");

    assert_eq!(
        response.results[0].status(),
        tokenmeter::proto::v1::IngestStatus::Accepted
    );
    assert!(status.success(), "exit {status:?}");
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM usage_events WHERE event_id = 'in-flight'")
            .fetch_one(&pool)
            .await
            .expect("count");
    assert_eq!(stored, 1);
}

#[tokio::test]
async fn prices_import_creates_versions_from_toml_and_csv_and_names_bad_rows() {
    let url = create_database().await;
    let migrated = tokenmeter()
        .arg("migrate")
        .env("TOKENMETER_DATABASE__URL", &url)
        .status()
        .expect("migrate");
    assert!(migrated.success());
    let dir = tempfile::tempdir().expect("tempdir");
    let toml_file = dir.path().join("december.toml");
    std::fs::write(
        &toml_file,
        r#"price_book_id = "imported"
currency = "USD"
effective_from = "2026-12-01T00:00:00Z"
[[rates]]
provider = "openai"
model = "gpt-4.1-mini"
token_class = "input"
price_per_million = "0.40"
cost_per_million = "0.30"
[[rates]]
provider = "openai"
model = "gpt-4.1-mini"
token_class = "output"
price_per_million = "1.60"
cost_per_million = "1.20"
"#,
    )
    .expect("write toml");
    let csv_file = dir.path().join("january.csv");
    std::fs::write(
        &csv_file,
        "provider,model,token_class,price_per_million,cost_per_million\n\
         anthropic,claude-sonnet-4-5,input,3.00,2.40\n\
         anthropic,claude-sonnet-4-5,cache_read,0.30,0.24\n\
         anthropic,claude-sonnet-4-5,output,15.00,12.00\n",
    )
    .expect("write csv");
    let bad_file = dir.path().join("bad.csv");
    std::fs::write(
        &bad_file,
        "provider,model,token_class,price_per_million,cost_per_million\n\
         openai,gpt-5,thinking,1.00,0.50\n",
    )
    .expect("write bad csv");

    let import = |file: &std::path::Path, extra: &[&str]| {
        tokenmeter()
            .args(["prices", "import"])
            .arg(file)
            .args(["--allow-backdated"])
            .args(extra)
            .env("TOKENMETER_DATABASE__URL", &url)
            .output()
            .expect("run import")
    };
    let from_toml = import(&toml_file, &[]);
    let from_csv = import(
        &csv_file,
        &[
            "--price-book",
            "imported",
            "--currency",
            "USD",
            "--effective-from",
            "2027-01-01T00:00:00Z",
        ],
    );
    let bad = import(
        &bad_file,
        &[
            "--price-book",
            "imported",
            "--currency",
            "USD",
            "--effective-from",
            "2027-02-01T00:00:00Z",
        ],
    );

    assert!(
        from_toml.status.success(),
        "{}",
        String::from_utf8_lossy(&from_toml.stderr)
    );
    assert!(
        from_csv.status.success(),
        "{}",
        String::from_utf8_lossy(&from_csv.stderr)
    );
    assert!(String::from_utf8_lossy(&from_toml.stdout).contains("2 rates"));
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("thinking"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    let rates: Vec<(String, i16, rust_decimal::Decimal)> = sqlx::query_as(
        "SELECT v.effective_from::date::text, r.token_class, r.price_per_million
         FROM price_book_rates r JOIN price_book_versions v USING (version_id)
         WHERE v.price_book_id = 'imported' ORDER BY 1, 2",
    )
    .fetch_all(&mut conn)
    .await
    .expect("rates");
    let expected: Vec<(String, i16, rust_decimal::Decimal)> = vec![
        ("2026-12-01".into(), 1, "0.40".parse().expect("d")),
        ("2026-12-01".into(), 5, "1.60".parse().expect("d")),
        ("2027-01-01".into(), 1, "3.00".parse().expect("d")),
        ("2027-01-01".into(), 2, "0.30".parse().expect("d")),
        ("2027-01-01".into(), 5, "15.00".parse().expect("d")),
    ];
    assert_eq!(rates, expected);
}

#[tokio::test]
async fn keys_created_on_the_command_line_work_until_revoked() {
    let url = create_database().await;
    let server = crate::helpers::spawn_serve(&url, &[("TOKENMETER_AUTH__CACHE_TTL", "0s")]).await;
    let run = |args: &[&str]| {
        tokenmeter()
            .args(args)
            .env("TOKENMETER_DATABASE__URL", &url)
            .output()
            .expect("run tokenmeter keys")
    };
    let created = run(&[
        "keys",
        "create",
        "--name",
        "ci reader",
        "--scopes",
        "read",
        "--all-tenants",
    ]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let secret = String::from_utf8_lossy(&created.stdout).trim().to_owned();
    let listed = String::from_utf8_lossy(&run(&["keys", "list"]).stdout).into_owned();
    let key_id = listed.split('\t').next().expect("key id").to_owned();
    let channel = server.channel().await;
    let query = || tokenmeter::proto::v1::QueryUsageRequest {
        time_range: Some(tokenmeter::proto::v1::TimeRange {
            start: Some(prost_types::Timestamp {
                seconds: 1_780_000_000 - 1_780_000_000 % 3600,
                nanos: 0,
            }),
            end: Some(prost_types::Timestamp {
                seconds: 1_780_000_000 - 1_780_000_000 % 3600 + 3600,
                nanos: 0,
            }),
        }),
        ..Default::default()
    };
    let mut reports = tokenmeter::proto::v1::report_service_client::ReportServiceClient::new(
        crate::helpers::authed(channel, &secret),
    );

    let before = reports.query_usage(query()).await;
    let revoked = run(&["keys", "revoke", &key_id]);
    let after = reports.query_usage(query()).await;

    assert!(secret.starts_with("tm_"), "{secret}");
    assert!(
        listed.contains("ci reader") && listed.contains("all tenants"),
        "{listed}"
    );
    assert!(before.is_ok(), "{before:?}");
    assert!(revoked.status.success());
    assert_eq!(
        after.expect_err("revoked").code(),
        tonic::Code::Unauthenticated
    );
    let mut server = server;
    server.child().kill().expect("stop");
    server.child().wait().expect("reap");
}

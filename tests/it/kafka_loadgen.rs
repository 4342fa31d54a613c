//! `tokenmeter loadgen --kafka-topic` through the real broker into the consumer: what Postgres
//! holds and what the dead-letter topic holds equal the load generator's ground truth exactly.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::Value;
use sqlx::PgPool;

use crate::helpers::{
    CLASS_COLUMNS, create_topic, folded, kafka_brokers, spawn_app_with, tokenmeter_command,
};
use crate::kafka_ingest::{consume, header, read_all, wait_for_positions_within};
use crate::usage_support::unique;

/// Events and tokens by class, keyed by a tenant or a model.
type Totals = BTreeMap<String, (i64, [i64; 12])>;

fn int(value: &Value) -> i64 {
    value
        .as_i64()
        .unwrap_or_else(|| panic!("{value} is not an integer"))
}

/// The ground truth's totals of `list` (its `tenants` or `models`), skipping empty entries
/// (which have no rollup rows).
fn expected_totals(list: &Value, key: impl Fn(&Value) -> String) -> Totals {
    list.as_array()
        .expect("a list")
        .iter()
        .filter(|entry| int(&entry["events"]) > 0)
        .map(|entry| {
            let by_class = CLASS_COLUMNS.map(|class| int(&entry["by_class"][class]));
            (key(entry), (int(&entry["events"]), by_class))
        })
        .collect()
}

/// Stored totals from the rollups once the folder has folded every committed batch, grouped
/// by the SQL expression `key`.
async fn stored_totals(pool: &PgPool, key: &str) -> Totals {
    folded(pool).await;
    let rows: Vec<(String, i16, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {key}, token_class, sum(events)::int8, sum(tokens)::int8
         FROM usage_rollups GROUP BY 1, 2"
    )))
    .fetch_all(pool)
    .await
    .expect("rollups");
    let mut totals = Totals::new();
    for (key, class, events, tokens) in rows {
        let slot = totals.entry(key).or_default();
        slot.0 += events;
        slot.1[usize::try_from(class - 1).expect("class 1-12")] += tokens;
    }
    totals
}

async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .expect("count")
}

/// Runs the built binary's loadgen and returns its JSON report.
async fn loadgen_to_kafka(topic: &str, args: &[&str]) -> Value {
    let mut command = tokenmeter_command();
    command
        .args(["loadgen", "--kafka-topic", topic, "--kafka-brokers"])
        .arg(kafka_brokers())
        .args(args)
        .args(["--json", "--quiet"]);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("run tokenmeter loadgen");
    assert!(
        output.status.success(),
        "loadgen failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("a JSON report")
}

/// The high watermark of partition 0 of a one-partition topic: how many messages it holds.
async fn messages_in(topic: &str) -> i64 {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let client: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", kafka_brokers())
            .create()
            .expect("client");
        client
            .fetch_watermarks(&topic, 0, Duration::from_secs(10))
            .expect("watermarks")
            .1
    })
    .await
    .expect("join")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loadgen_run_through_kafka_is_stored_exactly_as_its_ground_truth_says() {
    let (topic, dlq, group) = (
        create_topic(8).await,
        create_topic(1).await,
        unique("group"),
    );
    let app = spawn_app_with(|s| {
        consume(s, &topic, &dlq, &group);
        // The service's default batch size: fewer, larger transactions (this is a debug build).
        s.kafka.consumer.batch_max_messages = 5000;
        s.kafka.consumer.batch_linger = Duration::from_millis(20);
    })
    .await;
    let run_id = unique("lgk");
    let started = Instant::now();

    let truth = loadgen_to_kafka(
        &topic,
        &[
            "--events",
            "100000",
            "--duplicate-ratio",
            "0.2",
            "--conflict-ratio",
            "0.01",
            "--invalid-ratio",
            "0.01",
            "--late-ratio",
            "0.02",
            "--poison-ratio",
            "0.01",
            "--provider-object-ratio",
            "0.2",
            "--codecs",
            "protobuf,cloudevents-structured,cloudevents-binary",
            "--seed",
            "20261201",
            "--run-id",
            &run_id,
        ],
    )
    .await;
    let produced = started.elapsed();
    let end: BTreeMap<i32, i64> = truth["end_offsets"]
        .as_object()
        .expect("end offsets")
        .iter()
        .map(|(p, next)| (p.parse().expect("partition"), int(next)))
        .collect();
    assert_eq!(end.len(), 8, "every partition got messages");
    assert_eq!(
        end.values().sum::<i64>(),
        int(&truth["kafka"]["messages"]),
        "end offsets cover every message"
    );
    wait_for_positions_within(&app.pool, &group, &end, Duration::from_secs(300)).await;
    eprintln!(
        "kafka_loadgen: produced in {produced:.1?}, drained {} messages in {:.1?}",
        int(&truth["kafka"]["messages"]),
        started.elapsed()
    );

    // Every tenant's and every model's events and tokens by class, exactly.
    let by_tenant = expected_totals(&truth["tenants"], |t| {
        t["tenant_id"].as_str().expect("id").to_owned()
    });
    let by_model = expected_totals(&truth["models"], |m| {
        format!(
            "{}/{}",
            m["provider"].as_str().expect("provider"),
            m["model"].as_str().expect("model")
        )
    });
    assert_eq!(by_tenant.len(), 10);
    assert_eq!(stored_totals(&app.pool, "tenant_id").await, by_tenant);
    assert_eq!(
        stored_totals(&app.pool, "provider || '/' || model").await,
        by_model
    );
    // One raw event per first-seen valid event; one audit row per conflicting resend.
    let expected = &truth["expected"];
    assert_eq!(int(&expected["accepted"]), 99_000);
    assert_eq!(
        count(&app.pool, "SELECT count(*) FROM usage_events").await,
        int(&expected["accepted"])
    );
    assert_eq!(int(&truth["sent"]["conflict"]), 1_000);
    assert_eq!(
        count(
            &app.pool,
            "SELECT count(*) FROM usage_event_conflicts WHERE channel = 'kafka'"
        )
        .await,
        1_000
    );

    // The dead-letter topic holds exactly the poison and the invalid originals, each once.
    let dead = int(&truth["expected_dead_letters"]);
    assert_eq!(dead, 1_000 + 1_000);
    assert_eq!(messages_in(&dlq).await, dead);
    let letters = read_all(&dlq, usize::try_from(dead).expect("count")).await;
    let mut sources = BTreeSet::new();
    for letter in &letters {
        assert_eq!(
            header(letter, "loadgen.expect").as_deref(),
            Some("dead-letter"),
            "dead-lettered a message loadgen expected to be ingested: reason {:?}",
            header(letter, "tokenmeter.dlq.reason")
        );
        assert_eq!(
            header(letter, "tokenmeter.dlq.topic").as_deref(),
            Some(topic.as_str())
        );
        sources.insert((
            header(letter, "tokenmeter.dlq.partition").expect("partition"),
            header(letter, "tokenmeter.dlq.offset").expect("offset"),
        ));
    }
    assert_eq!(
        sources.len(),
        letters.len(),
        "a message dead-lettered twice"
    );
    app.stop().await.expect("clean stop");
}

//! The usage consumer against the real broker and Postgres: exactly-once totals, offsets stored
//! with the events, dead letters with their reasons, and the dead-letter limit.

use std::collections::BTreeMap;
use std::time::Duration;

use prost::Message as _;
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::PgPool;
use tokenmeter::config::Settings;
use tokenmeter::proto::v1 as pb;

use crate::helpers::{
    assert_rollups_equal_raw, create_database, create_topic, folded, kafka_brokers, spawn_app_with,
    spawn_serve,
};
use crate::usage_support::{Clients, event, statuses, unique};

/// A usage topic with `partitions`, a dead-letter topic and a group, all new.
async fn topics(partitions: i32) -> (String, String, String) {
    (
        create_topic(partitions).await,
        create_topic(1).await,
        unique("group"),
    )
}

/// A consumer on topics and a group only this test uses, writing small batches quickly.
pub fn consume(settings: &mut Settings, topic: &str, dead_letters: &str, group: &str) {
    let consumer = &mut settings.kafka.consumer;
    consumer.enabled = true;
    consumer.usage_topic = topic.to_owned();
    // Tests that consume transaction events give them a topic of their own.
    consumer.transactions_topic = String::new();
    consumer.dead_letter_topic = dead_letters.to_owned();
    consumer.group_id = group.to_owned();
    consumer.batch_linger = Duration::from_millis(5);
    consumer.batch_max_messages = 500;
}

pub fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .expect("producer")
}

/// Produces `payload` keyed by `key` with `headers`; returns (partition, offset).
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: &[u8],
    headers: &[(&str, &str)],
) -> (i32, i64) {
    let mut owned = OwnedHeaders::new();
    for (k, v) in headers {
        owned = owned.insert(Header {
            key: k,
            value: Some(*v),
        });
    }
    let delivery = producer
        .send(
            FutureRecord::to(topic)
                .key(key)
                .payload(payload)
                .headers(owned),
            Duration::from_secs(10),
        )
        .await
        .expect("delivered");
    (delivery.partition, delivery.offset)
}

/// Waits until the consumer's stored positions cover `end` (next offset per partition).
pub async fn wait_for_positions(pool: &PgPool, group: &str, end: &BTreeMap<i32, i64>) {
    wait_for_positions_within(pool, group, end, Duration::from_secs(60)).await;
}

/// [`wait_for_positions`] for runs that take longer than a minute.
pub async fn wait_for_positions_within(
    pool: &PgPool,
    group: &str,
    end: &BTreeMap<i32, i64>,
    timeout: Duration,
) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let stored: Vec<(i32, i64)> = sqlx::query_as(
            "SELECT partition, next_offset FROM kafka_offsets WHERE consumer_group = $1",
        )
        .bind(group)
        .fetch_all(pool)
        .await
        .expect("read offsets");
        let stored: BTreeMap<i32, i64> = stored.into_iter().collect();
        if end
            .iter()
            .all(|(p, next)| stored.get(p).is_some_and(|s| s >= next))
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "consumer did not reach {end:?} within {timeout:?} (stored {stored:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every message of `topic`, read from the beginning until `count` arrived.
pub async fn read_all(topic: &str, count: usize) -> Vec<rdkafka::message::OwnedMessage> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut messages = Vec::new();
    while messages.len() < count {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} messages in {topic}", messages.len()))
            .expect("consume");
        messages.push(message.detach());
    }
    messages
}

pub fn header(message: &rdkafka::message::OwnedMessage, key: &str) -> Option<String> {
    message
        .headers()?
        .iter()
        .find(|h| h.key == key)
        .map(|h| String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())
}

/// `e` (built by `usage_support::event`) in one of the three wire formats, by `codec` % 3:
/// protobuf, CloudEvents structured, CloudEvents binary. Returns (value, headers).
fn encode(e: &pb::UsageEvent, codec: usize) -> (Vec<u8>, Vec<(&'static str, String)>) {
    let Some(pb::usage_event::Usage::Tokens(tokens)) = &e.usage else {
        panic!("test events carry buckets");
    };
    let at = e.occurred_at.as_ref().expect("occurred_at");
    let time = chrono::DateTime::from_timestamp(at.seconds, u32::try_from(at.nanos).expect("ns"))
        .expect("time")
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let data = serde_json::json!({
        "agentId": e.agent_id,
        "provider": e.provider,
        "model": e.model,
        "tokens": {"input": tokens.input, "output": tokens.output},
    });
    match codec % 3 {
        0 => (
            e.encode_to_vec(),
            vec![("content-type", "application/x-protobuf".to_owned())],
        ),
        1 => {
            let envelope = serde_json::json!({
                "specversion": "1.0",
                "type": "dev.tokenmeter.usage.v1",
                "id": e.event_id,
                "source": e.source,
                "subject": e.tenant_id,
                "time": time,
                "data": data,
            });
            (
                envelope.to_string().into_bytes(),
                vec![(
                    "content-type",
                    "application/cloudevents+json; charset=utf-8".to_owned(),
                )],
            )
        }
        _ => (
            data.to_string().into_bytes(),
            vec![
                ("content-type", "application/json".to_owned()),
                ("ce_specversion", "1.0".to_owned()),
                ("ce_type", "dev.tokenmeter.usage.v1".to_owned()),
                ("ce_id", e.event_id.clone()),
                ("ce_source", e.source.clone()),
                ("ce_subject", e.tenant_id.clone()),
                ("ce_time", time),
            ],
        ),
    }
}

async fn produce_encoded(
    producer: &FutureProducer,
    topic: &str,
    e: &pb::UsageEvent,
    codec: usize,
) -> (i32, i64) {
    let (value, headers) = encode(e, codec);
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    produce(producer, topic, &e.tenant_id, &value, &headers).await
}

/// Totals from the rollups once the folder has folded every committed batch.
async fn tokens_by_tenant(pool: &PgPool) -> BTreeMap<String, (i64, i64, i64)> {
    folded(pool).await;
    let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT tenant_id, sum(events)::int8,
                sum(tokens) FILTER (WHERE token_class = 1)::int8,
                sum(tokens) FILTER (WHERE token_class = 5)::int8
         FROM usage_rollups GROUP BY tenant_id",
    )
    .fetch_all(pool)
    .await
    .expect("rollups");
    rows.into_iter()
        .map(|(t, e, i, o)| (t, (e, i, o)))
        .collect()
}

#[tokio::test]
async fn consumed_events_count_once_with_grpc_and_bad_messages_go_to_the_dead_letter_topic() {
    let (topic, dlq, group) = topics(4).await;
    let app = spawn_app_with(|s| consume(s, &topic, &dlq, &group)).await;
    let tenants = [unique("ta"), unique("tb"), unique("tc")];
    let producer = producer();

    // 30 events: tenant i % 3, input 100 + i, output 10 + i.
    let events: Vec<pb::UsageEvent> = (0..30)
        .map(|i| {
            event(
                &tenants[i % 3],
                &format!("ev-{i}"),
                100 + i as i64,
                10 + i as i64,
            )
        })
        .collect();
    // The first five also arrive over gRPC, before Kafka: they must count once.
    let mut clients = Clients::new(app.channel().await);
    let grpc = clients.ingest(events[..5].to_vec()).await;
    assert!(
        statuses(&grpc)
            .iter()
            .all(|s| *s == pb::IngestStatus::Accepted)
    );

    let mut end: BTreeMap<i32, i64> = BTreeMap::new();
    let mut record = |(partition, offset): (i32, i64)| {
        let next = end.entry(partition).or_insert(0);
        *next = (*next).max(offset + 1);
        (partition, offset)
    };
    // Each event in one of the three wire formats; the resends in another one.
    for (i, e) in events.iter().enumerate() {
        record(produce_encoded(&producer, &topic, e, i).await);
    }
    // Every tenth event again (exact duplicates), and one conflict: ev-1 with other tokens.
    for (i, e) in events.iter().enumerate().step_by(10) {
        record(produce_encoded(&producer, &topic, e, i + 1).await);
    }
    let mut conflicting = events[1].clone();
    conflicting.usage = event(&tenants[1], "ev-1", 999, 999).usage;
    record(produce_encoded(&producer, &topic, &conflicting, 2).await);
    // Poison: bytes that are no protobuf, a CloudEvent of another type, and a readable event
    // with a negative token count.
    let mut foreign = encode(&event(&tenants[0], "ev-foreign", 1, 1), 1);
    foreign.0 = String::from_utf8(foreign.0)
        .expect("json")
        .replace("dev.tokenmeter.usage.v1", "com.example.order.v1")
        .into_bytes();
    let foreign_headers: Vec<(&str, &str)> =
        foreign.1.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let wrong_type =
        record(produce(&producer, &topic, &tenants[0], &foreign.0, &foreign_headers).await);
    let undecodable = record(
        produce(
            &producer,
            &topic,
            &tenants[0],
            b"\xff\xff\xff not protobuf",
            &[],
        )
        .await,
    );
    let negative = event(&tenants[2], "ev-negative", -5, 1);
    let invalid = record(
        produce(
            &producer,
            &topic,
            &tenants[2],
            &negative.encode_to_vec(),
            &[("trace-id", "abc")],
        )
        .await,
    );
    // A NUL in free text, which Postgres cannot store: it must be dead-lettered, not fail
    // (and retry forever) the batch it arrives in.
    let mut nul = event(&tenants[1], "ev-nul", 1, 1);
    nul.attributes.insert("note".into(), "a\0b".into());
    let with_nul = record(produce(&producer, &topic, &tenants[1], &nul.encode_to_vec(), &[]).await);

    wait_for_positions(&app.pool, &group, &end).await;

    // Expected: 30 events once each, with their own tokens; ev-1 keeps its first payload.
    let mut expected: BTreeMap<String, (i64, i64, i64)> = BTreeMap::new();
    for (i, tenant) in (0..30).map(|i| (i, &tenants[i % 3])) {
        let slot = expected.entry(tenant.clone()).or_default();
        slot.0 += 1;
        slot.1 += 100 + i as i64;
        slot.2 += 10 + i as i64;
    }
    assert_eq!(tokens_by_tenant(&app.pool).await, expected);
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_events")
        .fetch_one(&app.pool)
        .await
        .expect("count");
    assert_eq!(stored, 30);
    let by_channel: Vec<(String, i64)> = sqlx::query_as(
        "SELECT channel, count(*) FROM usage_events GROUP BY channel ORDER BY channel",
    )
    .fetch_all(&app.pool)
    .await
    .expect("channels");
    assert_eq!(
        by_channel,
        vec![("grpc".to_owned(), 5), ("kafka".to_owned(), 25)]
    );
    let conflicts: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT event_id, channel, first_differing_field FROM usage_event_conflicts",
    )
    .fetch_all(&app.pool)
    .await
    .expect("conflicts");
    assert_eq!(
        conflicts,
        vec![(
            "ev-1".to_owned(),
            "kafka".to_owned(),
            "tokens.input".to_owned()
        )]
    );

    // Exactly the four poison messages are dead-lettered, each saying why and where from.
    let letters = read_all(&dlq, 4).await;
    let mut by_offset: BTreeMap<(i32, i64), &rdkafka::message::OwnedMessage> = BTreeMap::new();
    for letter in &letters {
        let partition: i32 = header(letter, "tokenmeter.dlq.partition")
            .expect("partition header")
            .parse()
            .expect("number");
        let offset: i64 = header(letter, "tokenmeter.dlq.offset")
            .expect("offset header")
            .parse()
            .expect("number");
        assert_eq!(
            header(letter, "tokenmeter.dlq.topic").as_deref(),
            Some(topic.as_str())
        );
        assert_eq!(
            header(letter, "tokenmeter.dlq.consumer_group").as_deref(),
            Some(group.as_str())
        );
        by_offset.insert((partition, offset), letter);
    }
    let decode = by_offset
        .get(&undecodable)
        .expect("undecodable message dead-lettered");
    assert_eq!(
        header(decode, "tokenmeter.dlq.stage").as_deref(),
        Some("decode")
    );
    assert_eq!(decode.payload(), Some(&b"\xff\xff\xff not protobuf"[..]));
    assert_eq!(decode.key(), Some(tenants[0].as_bytes()));
    let foreign = by_offset
        .get(&wrong_type)
        .expect("foreign CloudEvent dead-lettered");
    assert_eq!(
        header(foreign, "tokenmeter.dlq.stage").as_deref(),
        Some("decode")
    );
    assert_eq!(
        header(foreign, "tokenmeter.dlq.codec").as_deref(),
        Some("cloudevents-structured")
    );
    assert!(
        header(foreign, "tokenmeter.dlq.reason")
            .is_some_and(|r| r.contains("com.example.order.v1")),
        "reason names the unexpected type"
    );
    let validate = by_offset
        .get(&invalid)
        .expect("invalid event dead-lettered");
    assert_eq!(
        header(validate, "tokenmeter.dlq.stage").as_deref(),
        Some("validate")
    );
    assert_eq!(
        header(validate, "tokenmeter.dlq.codec").as_deref(),
        Some("protobuf")
    );
    assert!(
        header(validate, "tokenmeter.dlq.field").is_some_and(|f| f.contains("input")),
        "field header names the negative class"
    );
    assert!(header(validate, "tokenmeter.dlq.reason").is_some_and(|r| !r.is_empty()));
    assert_eq!(header(validate, "trace-id").as_deref(), Some("abc"));
    assert_eq!(validate.payload(), Some(&negative.encode_to_vec()[..]));
    let nul_letter = by_offset
        .get(&with_nul)
        .expect("event with a NUL dead-lettered");
    assert_eq!(
        header(nul_letter, "tokenmeter.dlq.field").as_deref(),
        Some("attributes.note")
    );

    let metrics = app.metrics().await;
    for (name, labels, value) in [
        (
            "tokenmeter_kafka_dead_letters_total",
            &[r#"stage="decode""#][..],
            2.0,
        ),
        (
            "tokenmeter_kafka_dead_letters_total",
            &[r#"stage="validate""#],
            2.0,
        ),
        (
            "tokenmeter_ingest_events_total",
            &[r#"channel="kafka""#, r#"outcome="conflict""#],
            1.0,
        ),
        ("tokenmeter_kafka_consumer_running", &[], 1.0),
    ] {
        assert_eq!(
            crate::helpers::sample(&metrics, name, labels),
            Some(value),
            "{name} {labels:?}"
        );
    }
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_stream_of_poison_stops_the_consumer_loudly_without_storing_its_positions() {
    let (topic, dlq, group) = topics(1).await;
    let producer = producer();
    for i in 0..20 {
        produce(
            &producer,
            &topic,
            "t",
            format!("garbage {i}").as_bytes(),
            &[],
        )
        .await;
    }
    let app = spawn_app_with(|s| {
        consume(s, &topic, &dlq, &group);
        s.kafka.consumer.dead_letter_max_consecutive = 5;
    })
    .await;

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let body = loop {
        let response = reqwest::get(app.admin_url("/readyz"))
            .await
            .expect("readyz");
        if response.status() == 503 {
            break response.text().await.expect("body");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "consumer never stopped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        body.contains("stopped") && body.contains("dead_letter_max_consecutive"),
        "readyz names the limit: {body}"
    );
    let serving = reqwest::get(app.admin_url("/readyz?exclude=kafka_consumer"))
        .await
        .expect("readyz");
    assert_eq!(serving.status(), 200, "gRPC serving stays ready");
    // The fifth dead letter in a row trips the limit and its batch is not committed, so at
    // most the four poison messages before it (had they come in batches of their own) can
    // have their positions stored; gRPC still serves.
    let stored: Option<i64> =
        sqlx::query_scalar("SELECT max(next_offset) FROM kafka_offsets WHERE consumer_group = $1")
            .bind(&group)
            .fetch_one(&app.pool)
            .await
            .expect("offsets");
    assert!(stored.unwrap_or(0) <= 4, "stored position {stored:?}");
    let mut clients = Clients::new(app.channel().await);
    let response = clients
        .ingest(vec![event(&unique("t"), "after", 1, 1)])
        .await;
    assert_eq!(statuses(&response), vec![pb::IngestStatus::Accepted]);
    app.stop().await.expect("clean stop");
}

/// Produces `n` distinct events over `tenants` tenants, every tenth one twice, as fast as the
/// broker takes them. Returns the end position per partition and the expected
/// (events, input tokens) per tenant.
async fn produce_events(
    topic: &str,
    run: &str,
    n: usize,
    tenants: usize,
) -> (BTreeMap<i32, i64>, BTreeMap<String, (i64, i64)>) {
    let producer = producer();
    let mut expected: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let mut payloads = Vec::new();
    for i in 0..n {
        let tenant = format!("{run}-t{}", i % tenants);
        let input = i64::try_from(i % 997 + 1).expect("small");
        let e = event(&tenant, &format!("{run}-e{i}"), input, 2);
        let slot = expected.entry(tenant.clone()).or_default();
        slot.0 += 1;
        slot.1 += input;
        let bytes = e.encode_to_vec();
        if i % 10 == 0 {
            payloads.push((tenant.clone(), bytes.clone()));
        }
        payloads.push((tenant, bytes));
    }
    let mut end: BTreeMap<i32, i64> = BTreeMap::new();
    for chunk in payloads.chunks(2000) {
        let sends = chunk.iter().map(|(key, bytes)| {
            producer.send(
                FutureRecord::to(topic).key(key).payload(bytes),
                Duration::from_secs(30),
            )
        });
        for delivery in futures::future::join_all(sends).await {
            let delivery = delivery.map_err(|(e, _)| e).expect("delivered");
            let next = end.entry(delivery.partition).or_insert(0);
            *next = (*next).max(delivery.offset + 1);
        }
    }
    (end, expected)
}

/// Totals from the rollups once the folder has folded every committed batch.
async fn events_and_input_by_tenant(pool: &PgPool) -> BTreeMap<String, (i64, i64)> {
    folded(pool).await;
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT tenant_id, sum(events)::int8,
                coalesce(sum(tokens) FILTER (WHERE token_class = 1), 0)::int8
         FROM usage_rollups GROUP BY tenant_id",
    )
    .fetch_all(pool)
    .await
    .expect("rollups");
    rows.into_iter().map(|(t, e, i)| (t, (e, i))).collect()
}

async fn stored_messages(pool: &PgPool, group: &str) -> i64 {
    sqlx::query_scalar::<_, Option<i64>>(
        "SELECT sum(next_offset)::int8 FROM kafka_offsets WHERE consumer_group = $1",
    )
    .bind(group)
    .fetch_one(pool)
    .await
    .expect("offsets")
    .unwrap_or(0)
}

/// The value of one series on a server's `/metrics`.
async fn metric(admin_port: u16, series: &str) -> f64 {
    let body = reqwest::get(format!("http://127.0.0.1:{admin_port}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series}"))
        .parse()
        .expect("number")
}

fn consumer_env<'a>(topic: &'a str, dlq: &'a str, group: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("TOKENMETER_KAFKA__CONSUMER__ENABLED", "true"),
        ("TOKENMETER_KAFKA__CONSUMER__USAGE_TOPIC", topic),
        ("TOKENMETER_KAFKA__CONSUMER__TRANSACTIONS_TOPIC", ""),
        ("TOKENMETER_KAFKA__CONSUMER__DEAD_LETTER_TOPIC", dlq),
        ("TOKENMETER_KAFKA__CONSUMER__GROUP_ID", group),
        ("TOKENMETER_KAFKA__CONSUMER__BATCH_MAX_MESSAGES", "200"),
        ("TOKENMETER_LOG__FILTER", "warn"),
    ]
}

#[tokio::test]
async fn a_consumer_killed_mid_stream_resumes_from_postgres_and_counts_every_event_once() {
    let (topic, dlq, group) = topics(4).await;
    let run = unique("crash");
    let (end, expected) = produce_events(&topic, &run, 20_000, 7).await;
    let total: i64 = end.values().sum();
    let url = create_database().await;
    let env = consumer_env(&topic, &dlq, &group);

    let mut first = spawn_serve(&url, &env).await;
    let pool = PgPool::connect(&url).await.expect("pool");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let done = stored_messages(&pool, &group).await;
        if done >= total / 5 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no progress: {done}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.child().kill().expect("kill -9");
    first.child().wait().expect("reap");
    let at_kill = stored_messages(&pool, &group).await;
    assert!(
        at_kill < total,
        "killed too late to test anything: {at_kill} of {total}"
    );

    let mut second = spawn_serve(&url, &env).await;
    wait_for_positions(&pool, &group, &end).await;
    assert_eq!(events_and_input_by_tenant(&pool).await, expected);
    assert_rollups_equal_raw(&pool).await;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_events")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(stored, 20_000);
    second.child().kill().expect("stop");
    second.child().wait().expect("reap");
    pool.close().await;
}

#[tokio::test]
async fn a_second_consumer_joining_mid_stream_takes_partitions_and_totals_stay_exact() {
    second_consumer_joins_mid_stream(None).await;
}

/// The same rebalance while the first member has paused its assignment for backpressure:
/// librdkafka keeps that pause on the partitions it gets back, so they must be resumed on
/// assignment or they are never read again.
#[tokio::test]
async fn a_consumer_paused_for_backpressure_reads_again_after_a_rebalance() {
    second_consumer_joins_mid_stream(Some("2000")).await;
}

/// Two members share the group, the second joining with work left. With `max_buffered`, the
/// first member's writes are held back by a lock until it has paused its assignment and the
/// second member's join has made it revoke, so the rebalance surely finds it paused.
async fn second_consumer_joins_mid_stream(max_buffered: Option<&str>) {
    let (topic, dlq, group) = topics(4).await;
    let run = unique("rebalance");
    let (end, expected) = produce_events(&topic, &run, 30_000, 5).await;
    let total: i64 = end.values().sum();
    let url = create_database().await;
    let mut env = consumer_env(&topic, &dlq, &group);
    // Small batches, one writer: slow enough that the second member joins with work left.
    env.push(("TOKENMETER_KAFKA__CONSUMER__BATCH_MAX_MESSAGES", "20"));
    env.push(("TOKENMETER_KAFKA__CONSUMER__WRITERS", "1"));
    if let Some(max_buffered) = max_buffered {
        env.push((
            "TOKENMETER_KAFKA__CONSUMER__MAX_BUFFERED_MESSAGES",
            max_buffered,
        ));
    }

    let mut first = spawn_serve(&url, &env).await;
    let pool = PgPool::connect(&url).await.expect("pool");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while stored_messages(&pool, &group).await < total / 10 {
        assert!(std::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let blocker = match max_buffered {
        None => None,
        Some(_) => {
            let mut blocker = pool.begin().await.expect("begin");
            sqlx::query("LOCK TABLE kafka_offsets IN EXCLUSIVE MODE")
                .execute(&mut *blocker)
                .await
                .expect("lock the positions");
            while metric(first.admin_port, "tokenmeter_kafka_consumer_paused").await < 1.0 {
                assert!(std::time::Instant::now() < deadline, "never paused");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Some(blocker)
        }
    };
    let mut second = spawn_serve(&url, &env).await;
    if let Some(blocker) = blocker {
        while revocations(first.admin_port).await < 1.0 {
            assert!(std::time::Instant::now() < deadline, "no rebalance");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        blocker.rollback().await.expect("release the positions");
    }
    wait_for_positions(&pool, &group, &end).await;
    assert_eq!(events_and_input_by_tenant(&pool).await, expected);
    assert_rollups_equal_raw(&pool).await;

    // Both members did part of the work: the first gave partitions up, the second consumed.
    assert!(
        revocations(first.admin_port).await >= 1.0,
        "first member never rebalanced"
    );
    let consumed = metric(
        second.admin_port,
        &format!("tokenmeter_kafka_messages_total{{topic=\"{topic}\"}}"),
    )
    .await;
    assert!(consumed > 0.0, "second member consumed nothing");
    for server in [&mut first, &mut second] {
        server.child().kill().expect("stop");
        server.child().wait().expect("reap");
    }
    pool.close().await;
}

async fn revocations(admin_port: u16) -> f64 {
    metric(
        admin_port,
        "tokenmeter_kafka_rebalances_total{kind=\"revoke\"}",
    )
    .await
}

/// The broker's SASL/PLAIN listener (see `deploy/local/kafka.sh`); override with
/// `TOKENMETER_TEST_KAFKA_SASL_BROKERS`.
fn sasl_brokers() -> String {
    std::env::var("TOKENMETER_TEST_KAFKA_SASL_BROKERS").unwrap_or_else(|_| "127.0.0.1:9094".into())
}

fn sasl(settings: &mut Settings, password: &str) {
    settings.kafka.brokers = sasl_brokers();
    for (key, value) in [
        ("security.protocol", "SASL_PLAINTEXT"),
        ("sasl.mechanisms", "PLAIN"),
        ("sasl.username", "tokenmeter"),
        ("sasl.password", password),
    ] {
        settings
            .kafka
            .client
            .insert(key.to_owned(), value.to_owned());
    }
}

#[tokio::test]
async fn sasl_client_settings_pass_through_to_the_broker() {
    let (topic, dlq, group) = topics(1).await;
    let app = spawn_app_with(|s| {
        consume(s, &topic, &dlq, &group);
        sasl(s, "tokenmeter-dev-secret");
    })
    .await;
    let tenant = unique("t");
    let e = event(&tenant, "over-sasl", 42, 1);
    let end = BTreeMap::from([produce_encoded(&producer(), &topic, &e, 0).await])
        .into_iter()
        .map(|(p, o)| (p, o + 1))
        .collect();
    wait_for_positions(&app.pool, &group, &end).await;
    assert_eq!(
        events_and_input_by_tenant(&app.pool).await,
        BTreeMap::from([(tenant, (1, 42))])
    );
    let ready = reqwest::get(app.admin_url("/readyz"))
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);
    app.stop().await.expect("clean stop");

    // The same settings with a wrong password: the broker refuses, and /readyz says Kafka is
    // not usable instead of pretending.
    let refused = spawn_app_with(|s| sasl(s, "wrong-password")).await;
    let response = reqwest::get(refused.admin_url("/readyz"))
        .await
        .expect("readyz");
    assert_eq!(response.status(), 503);
    let body: serde_json::Value =
        serde_json::from_str(&response.text().await.expect("body")).expect("json");
    assert_ne!(body["kafka"], "ok", "{body}");
    assert_eq!(body["postgres"], "ok", "{body}");
    refused.stop().await.expect("clean stop");
}

#[tokio::test]
async fn ssl_client_settings_reach_librdkafka_and_a_bad_one_fails_the_start_naming_it() {
    let mut settings = crate::helpers::test_settings().await;
    settings.kafka.consumer.enabled = true;
    settings
        .kafka
        .client
        .insert("security.protocol".to_owned(), "SSL".to_owned());
    settings.kafka.client.insert(
        "ssl.ca.location".to_owned(),
        "/nonexistent/tokenmeter-ca.pem".to_owned(),
    );
    let error = match tokenmeter::app::Application::build(settings).await {
        Ok(_) => panic!("an unreadable CA must fail the start"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("ssl.ca.location"), "{error}");
}

#[tokio::test]
async fn events_of_unknown_tenants_are_dead_lettered_when_tenants_are_not_auto_created() {
    let (topic, dlq, group) = topics(1).await;
    let app = spawn_app_with(|s| {
        consume(s, &topic, &dlq, &group);
        s.ingest.auto_create_tenants = false;
    })
    .await;
    let mut clients = Clients::new(app.channel().await);
    let known = clients.tenant("USD", "UTC", None).await;
    let producer = producer();
    let stranger = unique("stranger");
    produce_encoded(&producer, &topic, &event(&stranger, "e-1", 5, 5), 0).await;
    let (partition, offset) =
        produce_encoded(&producer, &topic, &event(&known, "e-2", 7, 1), 1).await;
    wait_for_positions(
        &app.pool,
        &group,
        &BTreeMap::from([(partition, offset + 1)]),
    )
    .await;

    assert_eq!(
        events_and_input_by_tenant(&app.pool).await,
        BTreeMap::from([(known, (1, 7))])
    );
    let tenants: i64 = sqlx::query_scalar("SELECT count(*) FROM tenants WHERE tenant_id = $1")
        .bind(&stranger)
        .fetch_one(&app.pool)
        .await
        .expect("count");
    assert_eq!(tenants, 0, "the unknown tenant was not created");
    let letters = read_all(&dlq, 1).await;
    assert_eq!(letters[0].key(), Some(stranger.as_bytes()));
    assert_eq!(
        header(&letters[0], "tokenmeter.dlq.field").as_deref(),
        Some("tenant_id")
    );
    assert_eq!(
        header(&letters[0], "tokenmeter.dlq.reason").as_deref(),
        Some("unknown tenant")
    );
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn transaction_events_over_kafka_count_once_and_bad_ones_are_dead_lettered() {
    let (topic, dlq, group) = topics(1).await;
    let transactions_topic = create_topic(2).await;
    let app = spawn_app_with(|s| {
        consume(s, &topic, &dlq, &group);
        s.kafka.consumer.transactions_topic = transactions_topic.clone();
    })
    .await;
    let tenant = unique("t");
    let order = unique("order");
    let producer = producer();
    let started = crate::transactions::started(&tenant, &order, "k-start");
    let completed = crate::transactions::completed_in(&tenant, &order, "k-done", "18.40", "EUR");
    let mut end: BTreeMap<i32, i64> = BTreeMap::new();
    let mut send = async |payload: Vec<u8>, headers: &[(&str, &str)]| {
        let (p, o) = produce(&producer, &transactions_topic, &tenant, &payload, headers).await;
        let next = end.entry(p).or_insert(0);
        *next = (*next).max(o + 1);
    };
    send(started.encode_to_vec(), &[]).await;
    send(
        completed.encode_to_vec(),
        &[("content-type", "application/x-protobuf")],
    )
    .await;
    // A resend, a JSON message (transactions are protobuf only), a completion without revenue.
    send(completed.encode_to_vec(), &[]).await;
    send(b"{}".to_vec(), &[("content-type", "application/json")]).await;
    let mut no_revenue = completed.clone();
    no_revenue.event_id = "k-bad".into();
    no_revenue.kind = Some(pb::transaction_event::Kind::Completed(
        pb::TransactionCompleted { revenue: None },
    ));
    send(no_revenue.encode_to_vec(), &[]).await;
    wait_for_positions(&app.pool, &group, &end).await;

    let stored: Vec<(String, String)> = sqlx::query_as(
        "SELECT event_id, channel FROM transaction_events WHERE tenant_id = $1 ORDER BY event_id",
    )
    .bind(&tenant)
    .fetch_all(&app.pool)
    .await
    .expect("events");
    assert_eq!(
        stored,
        vec![
            ("k-done".to_owned(), "kafka".to_owned()),
            ("k-start".to_owned(), "kafka".to_owned())
        ]
    );
    let mut clients = Clients::new(app.channel().await);
    let read = crate::transactions::get(&mut clients, &tenant, &order, false).await;
    assert_eq!(read.state(), pb::TransactionState::Completed);
    assert_eq!(
        read.net_revenue,
        Some(pb::Money {
            amount: "18.40".into(),
            currency: "EUR".into()
        })
    );
    let letters = read_all(&dlq, 2).await;
    let mut stages: Vec<(String, Option<String>)> = letters
        .iter()
        .map(|l| {
            assert_eq!(
                header(l, "tokenmeter.dlq.topic").as_deref(),
                Some(transactions_topic.as_str())
            );
            (
                header(l, "tokenmeter.dlq.stage").expect("stage"),
                header(l, "tokenmeter.dlq.field"),
            )
        })
        .collect();
    stages.sort();
    assert_eq!(
        stages,
        vec![
            ("decode".to_owned(), None),
            ("validate".to_owned(), Some("completed.revenue".to_owned()))
        ]
    );
    app.stop().await.expect("clean stop");
}

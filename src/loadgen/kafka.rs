//! `loadgen --kafka-topic`: the same seeded run, produced to a Kafka topic for the usage
//! consumer instead of sent to `IngestUsage`.
//!
//! - Key = tenant id, and one idempotent producer (`enable.idempotence`, so `acks=all` and
//!   per-partition order survive retries) sends in sequence order: every resend lands after its
//!   original in the same partition. Without a call to wait for, a resend may follow its
//!   original within a message or two, so originals and their resends also share consumer
//!   batches.
//! - Each message's wire format is drawn from `--codecs` by the seed; a CloudEvent's data
//!   carries the identity fields too or leaves them to the attributes, also drawn.
//! - Poison messages (undecodable) are mixed in at random positions. They and the invalid
//!   originals — every message the consumer must dead-letter — carry the header
//!   `loadgen.expect: dead-letter`, so a checker can prove the dead-letter topic holds exactly
//!   those.
//!
//! Nothing answers a producer, so the report checks nothing: it is the ground truth (plus the
//! expected dead letters and the end offset of each partition, to know when the consumer has
//! drained the run) for `benches/ingest_kafka.sh` and `tests/it/kafka_loadgen.rs` to check the
//! stored totals against.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use prost::Message as _;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::Message as _;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};

use super::json;
use super::{
    Generator, LoadgenArgs, OriginalKind, PlanSpec, Sequence, Truth, WireFormat, count_for, mix,
    random_run_id,
};
use crate::ingest::codec::USAGE_EVENT_TYPE;
use crate::proto::v1::{IngestStatus, UsageEvent};

/// The header that marks a message the consumer must dead-letter, and its value.
const EXPECT_HEADER: &str = "loadgen.expect";
const EXPECT_DEAD_LETTER: &str = "dead-letter";

/// How a poison message is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PoisonKind {
    /// Bytes no protobuf decoder accepts (an over-long varint), without a content-type.
    Garbage,
    /// A well-formed structured CloudEvent whose `type` is not a usage event.
    ForeignType,
    /// A structured CloudEvent cut short.
    MalformedJson,
    /// A protobuf event under a content-type no codec reads.
    UnsupportedContentType,
}

const POISON_KINDS: [PoisonKind; 4] = [
    PoisonKind::Garbage,
    PoisonKind::ForeignType,
    PoisonKind::MalformedJson,
    PoisonKind::UnsupportedContentType,
];

impl PoisonKind {
    fn name(self) -> &'static str {
        match self {
            PoisonKind::Garbage => "garbage",
            PoisonKind::ForeignType => "foreign_type",
            PoisonKind::MalformedJson => "malformed_json",
            PoisonKind::UnsupportedContentType => "unsupported_content_type",
        }
    }
}

/// One message's value and headers.
#[derive(Debug)]
struct Wire {
    payload: Vec<u8>,
    headers: Vec<(&'static str, String)>,
}

fn header_time(event: &UsageEvent) -> Option<String> {
    event.occurred_at.as_ref().and_then(json::rfc3339)
}

/// A structured-mode CloudEvent of `kind` around `event`.
fn envelope(event: &UsageEvent, kind: &str, identity_in_data: bool) -> serde_json::Value {
    let mut envelope = serde_json::json!({
        "specversion": "1.0",
        "type": kind,
        "id": event.event_id,
        "source": event.source,
        "subject": event.tenant_id,
        "datacontenttype": "application/json",
        "data": json::usage_event(event, identity_in_data),
    });
    if let Some(time) = header_time(event) {
        envelope["time"] = time.into();
    }
    envelope
}

/// `event` in one of the three wire formats the consumer reads.
fn encode(event: &UsageEvent, format: WireFormat, identity_in_data: bool) -> Wire {
    match format {
        WireFormat::Protobuf => Wire {
            payload: event.encode_to_vec(),
            headers: vec![("content-type", "application/x-protobuf".to_owned())],
        },
        WireFormat::CloudEventsStructured => Wire {
            payload: envelope(event, USAGE_EVENT_TYPE, identity_in_data)
                .to_string()
                .into_bytes(),
            headers: vec![(
                "content-type",
                "application/cloudevents+json; charset=utf-8".to_owned(),
            )],
        },
        WireFormat::CloudEventsBinary => {
            let data = serde_json::Value::from(json::usage_event(event, identity_in_data));
            let mut headers = vec![
                ("content-type", "application/json".to_owned()),
                ("ce_specversion", "1.0".to_owned()),
                ("ce_type", USAGE_EVENT_TYPE.to_owned()),
                ("ce_id", event.event_id.clone()),
                ("ce_source", event.source.clone()),
                ("ce_subject", event.tenant_id.clone()),
            ];
            if let Some(time) = header_time(event) {
                headers.push(("ce_time", time));
            }
            Wire {
                payload: data.to_string().into_bytes(),
                headers,
            }
        }
    }
}

/// A poison message of `kind` made from `event` (a fresh identity, so that a consumer that
/// wrongly ingested it would show extra events).
fn poison(event: &UsageEvent, kind: PoisonKind, rng: &mut StdRng) -> Wire {
    match kind {
        PoisonKind::Garbage => {
            // Eleven continuation bytes: longer than any varint, so never a protobuf message.
            let mut payload = vec![0xff_u8; 11];
            payload.extend((0..rng.random_range(0..64)).map(|_| rng.random::<u8>()));
            Wire {
                payload,
                headers: Vec::new(),
            }
        }
        PoisonKind::ForeignType => Wire {
            payload: envelope(event, "com.example.order.v1", false)
                .to_string()
                .into_bytes(),
            headers: vec![("content-type", "application/cloudevents+json".to_owned())],
        },
        PoisonKind::MalformedJson => {
            // Any proper prefix of a JSON object is incomplete, hence malformed.
            let mut payload = envelope(event, USAGE_EVENT_TYPE, false)
                .to_string()
                .into_bytes();
            payload.truncate(rng.random_range(1..payload.len()));
            Wire {
                payload,
                headers: vec![("content-type", "application/cloudevents+json".to_owned())],
            }
        }
        PoisonKind::UnsupportedContentType => Wire {
            payload: event.encode_to_vec(),
            headers: vec![("content-type", "application/avro".to_owned())],
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Producing
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Delivered {
    /// Next offset after the last message delivered to each partition.
    end_offsets: BTreeMap<i32, i64>,
    messages: u64,
    failed: u64,
    first_error: Option<String>,
}

/// Delivery reports, from the producer's polling thread.
#[derive(Default)]
struct Deliveries(Mutex<Delivered>);

impl Deliveries {
    fn snapshot(&self) -> (u64, u64) {
        let d = self.0.lock().unwrap_or_else(|e| e.into_inner());
        (d.messages, d.failed)
    }
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let mut d = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(message) => {
                d.messages += 1;
                let next = d.end_offsets.entry(message.partition()).or_insert(0);
                *next = (*next).max(message.offset() + 1);
            }
            Err((error, _)) => {
                d.failed += 1;
                if d.first_error.is_none() {
                    d.first_error = Some(error.to_string());
                }
            }
        }
    }
}

/// Producer settings: idempotent (acks=all, ordered and without duplicates across retries),
/// batched and compressed as a high-volume producer would be.
const PRODUCER_SETTINGS: [(&str, &str); 6] = [
    ("enable.idempotence", "true"),
    ("linger.ms", "20"),
    ("batch.size", "1000000"),
    ("compression.type", "lz4"),
    ("queue.buffering.max.messages", "200000"),
    // Never create the topic by producing to it: a topic created that way has the broker's
    // default partition count, which would silently change what a benchmark measures.
    ("allow.auto.create.topics", "false"),
];

fn create_producer(brokers: &str) -> anyhow::Result<ThreadedProducer<Deliveries>> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (key, value) in PRODUCER_SETTINGS {
        config.set(key, value);
    }
    config
        .create_with_context(Deliveries::default())
        .context("cannot create the Kafka producer")
}

/// The topic's partition count; an error naming the topic if it does not exist.
fn partitions_of(producer: &ThreadedProducer<Deliveries>, topic: &str) -> anyhow::Result<usize> {
    let metadata = producer
        .client()
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .context("cannot read Kafka metadata (are the --kafka-brokers reachable?)")?;
    let found = metadata.topics().iter().find(|t| t.name() == topic);
    match found {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(t.partitions().len()),
        _ => bail!(
            "Kafka topic `{topic}` does not exist; create it first (loadgen does not, so that \
             its partition count is a choice), e.g. kafka-topics.sh --create --topic {topic} \
             --partitions 8"
        ),
    }
}

/// Hands one record to the producer, waiting while its queue is full.
fn send(
    producer: &ThreadedProducer<Deliveries>,
    topic: &str,
    key: &str,
    wire: &Wire,
    expect_dead_letter: bool,
) -> anyhow::Result<()> {
    let mut headers = OwnedHeaders::new_with_capacity(wire.headers.len() + 1);
    for (name, value) in &wire.headers {
        headers = headers.insert(Header {
            key: name,
            value: Some(value.as_bytes()),
        });
    }
    if expect_dead_letter {
        headers = headers.insert(Header {
            key: EXPECT_HEADER,
            value: Some(EXPECT_DEAD_LETTER),
        });
    }
    let mut record = BaseRecord::to(topic)
        .key(key)
        .payload(&wire.payload)
        .headers(headers);
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err((error, _)) => return Err(error).context("cannot produce a message"),
        }
    }
}

/// What a Kafka run produced: its ground truth and the figures of the producer.
pub(super) struct KafkaReport {
    run_id: String,
    seed: u64,
    brokers: String,
    topic: String,
    partitions: usize,
    events: u32,
    rate: u64,
    poison_ratio: f64,
    codecs: Vec<WireFormat>,
    tenant_ids: Vec<String>,
    truth: Truth,
    messages_by_codec: BTreeMap<&'static str, u64>,
    poison_by_kind: [u64; 4],
    end_offsets: BTreeMap<i32, i64>,
    messages: u64,
    bytes: u64,
    elapsed: Duration,
}

/// Generates and produces the run on a blocking thread (librdkafka's producer is
/// synchronous, and generation is CPU work).
pub(super) async fn execute(args: &LoadgenArgs, topic: &str) -> anyhow::Result<KafkaReport> {
    let (args, topic) = (args.clone(), topic.to_owned());
    tokio::task::spawn_blocking(move || produce_run(&args, &topic))
        .await
        .context("the producing thread failed")?
}

fn produce_run(args: &LoadgenArgs, topic: &str) -> anyhow::Result<KafkaReport> {
    let seed = args.seed.unwrap_or_else(rand::random);
    let run_id = args.run_id.clone().unwrap_or_else(random_run_id);
    // One message per "call" and none in flight to wait for: a resend may come right after
    // its original (within 20 originals for half of them, like a producer's retry).
    let sequence = Sequence::build(&PlanSpec {
        seed,
        events: args.events,
        batch_size: 1,
        concurrency: 0,
        duplicate_ratio: args.duplicate_ratio,
        conflict_ratio: args.conflict_ratio,
        invalid_ratio: args.invalid_ratio,
        late_ratio: args.late_ratio,
    })?;
    let generator = Generator::new(seed, &run_id, args);
    let mut rng = StdRng::seed_from_u64(mix(seed, 0x006b_6166_6b61));
    let poison_count = count_for(args.events, args.poison_ratio);
    let total = sequence.items.len() + poison_count;
    let mut poison_at = rand::seq::index::sample(&mut rng, total, poison_count).into_vec();
    poison_at.sort_unstable();

    let producer = create_producer(&args.kafka_brokers)?;
    let partitions = partitions_of(&producer, topic)?;
    if !args.quiet {
        eprintln!(
            "loadgen: run {run_id} seed {seed}: {total} messages ({} unique events, \
             {poison_count} poison) to {topic} ({partitions} partitions) at {}",
            args.events, args.kafka_brokers
        );
    }

    let mut truth = Truth::new(generator.tenant_ids.len());
    let mut occurred_at = vec![0_i64; sequence.kinds.len()];
    let mut messages_by_codec: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut poison_by_kind = [0_u64; 4];
    let mut items = sequence.items.iter();
    let mut next_poison = poison_at.iter().peekable();
    let (mut sent, mut bytes) = (0_u64, 0_u64);
    let started = Instant::now();
    let mut last_progress = started;
    for position in 0..total {
        if args.rate > 0 {
            let due = started + Duration::from_secs_f64(sent as f64 / args.rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let now_micros = chrono::Utc::now().timestamp_micros();
        let (key, wire, dead) = if next_poison.next_if_eq(&&position).is_some() {
            // Indices past the originals: identities no event of the run has.
            let index = u32::try_from(poison_by_kind.iter().sum::<u64>())
                .ok()
                .and_then(|p| args.events.checked_add(p))
                .context("--events plus the poison messages must stay below 2^32")?;
            let kind = POISON_KINDS[rng.random_range(0..POISON_KINDS.len())];
            poison_by_kind[kind as usize] += 1;
            let event = generator
                .generate(index, OriginalKind::Normal, now_micros, None)
                .event;
            (
                event.tenant_id.clone(),
                poison(&event, kind, &mut rng),
                true,
            )
        } else {
            let item = *items
                .next()
                .context("internal error: the sequence ended early")?;
            let kind = sequence.kinds[item.original() as usize];
            let generated = generator.item(item, kind, &mut occurred_at, now_micros);
            let status = truth.record(item, kind, &generated);
            let format = args.codecs[rng.random_range(0..args.codecs.len())];
            let identity_in_data = rng.random_bool(0.5);
            *messages_by_codec.entry(format.name()).or_default() += 1;
            let wire = encode(&generated.event, format, identity_in_data);
            let dead = status == IngestStatus::Invalid;
            (generated.event.tenant_id, wire, dead)
        };
        send(&producer, topic, &key, &wire, dead)?;
        sent += 1;
        bytes += wire.payload.len() as u64;
        if !args.quiet && last_progress.elapsed() >= Duration::from_secs(5) {
            last_progress = Instant::now();
            let (delivered, _) = producer.context().snapshot();
            let elapsed = started.elapsed().as_secs_f64();
            eprintln!(
                "loadgen: {delivered}/{total} messages delivered in {elapsed:.1} s \
                 ({:.0} messages/s)",
                delivered as f64 / elapsed
            );
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .context("messages still undelivered 120 s after the last send")?;
    let elapsed = started.elapsed();
    let delivered = std::mem::take(
        &mut *producer
            .context()
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner()),
    );
    if delivered.failed > 0 || delivered.messages != sent {
        bail!(
            "{} of {sent} messages were not delivered (first error: {}); the run is incomplete",
            sent - delivered.messages,
            delivered.first_error.as_deref().unwrap_or("none reported")
        );
    }
    Ok(KafkaReport {
        run_id,
        seed,
        brokers: args.kafka_brokers.clone(),
        topic: topic.to_owned(),
        partitions,
        events: args.events,
        rate: args.rate,
        poison_ratio: args.poison_ratio,
        codecs: args.codecs.clone(),
        tenant_ids: generator.tenant_ids,
        truth,
        messages_by_codec,
        poison_by_kind,
        end_offsets: delivered.end_offsets,
        messages: sent,
        bytes,
        elapsed,
    })
}

// ---------------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------------

impl KafkaReport {
    fn poison(&self) -> u64 {
        self.poison_by_kind.iter().sum()
    }

    /// Poison and invalid originals: what the consumer must dead-letter, once each.
    fn expected_dead_letters(&self) -> u64 {
        self.poison() + self.truth.expected.invalid
    }

    fn per_s(&self, n: u64) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 { n as f64 / secs } else { 0.0 }
    }

    pub(super) fn render_text(&self) -> String {
        let t = &self.truth;
        let mut s = String::new();
        let rate = if self.rate == 0 {
            "max".to_owned()
        } else {
            format!("{}/s", self.rate)
        };
        let codecs: Vec<&str> = self.codecs.iter().map(|c| c.name()).collect();
        let _ = writeln!(
            s,
            "tokenmeter loadgen: run {} (seed {})",
            self.run_id, self.seed
        );
        let _ = writeln!(
            s,
            "kafka {} topic {} ({} partitions)  events {}  rate {rate}  codecs {}",
            self.brokers,
            self.topic,
            self.partitions,
            self.events,
            codecs.join(",")
        );
        let _ = writeln!(
            s,
            "\nproduced {} messages: {} events and {} poison",
            self.messages,
            t.sent,
            self.poison()
        );
        t.write_sent(&mut s);
        let by_codec: Vec<String> = self
            .messages_by_codec
            .iter()
            .map(|(codec, n)| format!("{codec} {n}"))
            .collect();
        let _ = writeln!(s, "  events by wire format: {}", by_codec.join(", "));
        let poison: Vec<String> = POISON_KINDS
            .iter()
            .map(|k| format!("{} {}", k.name(), self.poison_by_kind[*k as usize]))
            .collect();
        let _ = writeln!(s, "  poison by kind: {}", poison.join(", "));

        let _ = writeln!(s, "\nexpected of the consumer");
        for (name, n) in [
            ("accepted", t.expected.accepted),
            ("duplicate", t.expected.duplicate),
            ("conflict", t.expected.conflict),
            ("invalid", t.expected.invalid),
        ] {
            let _ = writeln!(s, "  {name:<12} {n:>12}");
        }
        let _ = writeln!(
            s,
            "  dead letters {:>12}  (invalid + poison, each with {EXPECT_HEADER}: {EXPECT_DEAD_LETTER})",
            self.expected_dead_letters()
        );
        let offsets: Vec<String> = self
            .end_offsets
            .iter()
            .map(|(p, next)| format!("{p}:{next}"))
            .collect();
        let _ = writeln!(
            s,
            "  drained when stored positions reach  {}",
            offsets.join(" ")
        );

        t.write_tokens(&mut s, &self.tenant_ids);

        let _ = writeln!(s, "\nproducer (idempotent, acks=all, lz4)");
        let _ = writeln!(s, "  elapsed        {:.3} s", self.elapsed.as_secs_f64());
        let _ = writeln!(s, "  messages/s     {:.0}", self.per_s(self.messages));
        let _ = writeln!(
            s,
            "  MiB/s          {:.1} (values before compression)",
            self.per_s(self.bytes) / 1_048_576.0
        );
        let _ = writeln!(
            s,
            "\nnothing was checked: compare the consumer's stored totals and dead-letter topic \
             with the figures above"
        );
        s
    }

    pub(super) fn to_json(&self) -> serde_json::Value {
        let mut report = serde_json::json!({
            "run_id": self.run_id,
            "seed": self.seed,
            "target": format!("kafka://{}/{}", self.brokers, self.topic),
            "options": {
                "events": self.events,
                "rate": self.rate,
                "tenants": self.tenant_ids.len(),
                "codecs": self.codecs.iter().map(|c| c.name()).collect::<Vec<_>>(),
                "poison_ratio": self.poison_ratio,
            },
            "kafka": {
                "brokers": self.brokers,
                "topic": self.topic,
                "partitions": self.partitions,
                "messages": self.messages,
                "messages_by_codec": self.messages_by_codec,
                "poison": self.poison(),
                "poison_by_kind": POISON_KINDS.iter()
                    .map(|k| (k.name().to_owned(), serde_json::Value::from(self.poison_by_kind[*k as usize])))
                    .collect::<serde_json::Map<_, _>>(),
                "value_bytes": self.bytes,
            },
            "expected_dead_letters": self.expected_dead_letters(),
            "dead_letter_header": {EXPECT_HEADER: EXPECT_DEAD_LETTER},
            "end_offsets": self.end_offsets.iter()
                .map(|(p, next)| (p.to_string(), serde_json::Value::from(*next)))
                .collect::<serde_json::Map<_, _>>(),
            "performance": {
                "elapsed_s": self.elapsed.as_secs_f64(),
                "messages_per_s": self.per_s(self.messages),
                "events_per_s": self.per_s(self.truth.sent),
            },
            "checked": false,
        });
        self.truth.add_json(&mut report, &self.tenant_ids);
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::codec::{Codec, decode_usage};
    use crate::loadgen::tests::{NOW, TestCli, args, materialize, spec};
    use crate::loadgen::{Item, Plan};

    fn decode(wire: &Wire) -> Result<(Codec, UsageEvent), String> {
        let headers: Vec<(&str, Option<&[u8]>)> = wire
            .headers
            .iter()
            .map(|(name, value)| (*name, Some(value.as_bytes())))
            .collect();
        decode_usage(Some(&wire.payload), &headers, 1 << 20).map_err(|e| e.to_string())
    }

    #[test]
    fn every_wire_format_decodes_back_to_the_event_it_carries() {
        let args = args(&[
            "--events",
            "3000",
            "--provider-object-ratio",
            "0.6",
            "--invalid-ratio",
            "0.05",
            "--late-ratio",
            "0.05",
            "--duplicate-ratio",
            "0.05",
            "--conflict-ratio",
            "0.05",
        ]);
        let plan = Plan::build(&spec(&args, 17)).expect("plan");
        let generator = Generator::new(17, "wire", &args);

        for (_, generated) in materialize(&plan, &generator) {
            for format in WireFormat::ALL {
                for identity_in_data in [true, false] {
                    let wire = encode(&generated.event, format, identity_in_data);

                    let (codec, decoded) = decode(&wire).unwrap_or_else(|error| {
                        panic!("{format:?} of {:?}: {error}", generated.event)
                    });

                    assert_eq!(codec.as_str(), format.name());
                    assert_eq!(decoded, generated.event, "{format:?}");
                }
            }
        }
    }

    #[test]
    fn poison_messages_never_decode() {
        let generator = Generator::new(3, "poison", &args(&["--events", "100"]));
        let mut rng = StdRng::seed_from_u64(3);

        for index in 100..300 {
            let event = generator
                .generate(index, OriginalKind::Normal, NOW, None)
                .event;
            for kind in POISON_KINDS {
                let wire = poison(&event, kind, &mut rng);

                assert!(decode(&wire).is_err(), "{kind:?} decoded: {wire:?}");
            }
        }
    }

    #[test]
    fn resends_may_follow_their_original_closely_but_never_precede_it() {
        let args = args(&[
            "--events",
            "20000",
            "--duplicate-ratio",
            "0.2",
            "--conflict-ratio",
            "0.05",
        ]);
        let sequence = Sequence::build(&PlanSpec {
            batch_size: 1,
            concurrency: 0,
            ..spec(&args, 8)
        })
        .expect("sequence");

        let mut position_of = vec![usize::MAX; 20_000];
        let mut closest = usize::MAX;
        for (position, item) in sequence.items.iter().enumerate() {
            match item {
                Item::Original(i) => position_of[*i as usize] = position,
                resend => {
                    let original = position_of[resend.original() as usize];
                    assert!(
                        original < position,
                        "{resend:?} at {position} before its original"
                    );
                    closest = closest.min(position - original);
                }
            }
        }
        assert!(
            closest <= 3,
            "closest resend {closest} messages after its original"
        );
    }

    #[test]
    fn kafka_options_need_the_topic_and_exclude_the_grpc_ones() {
        use clap::Parser;
        let parse = |argv: &[&str]| TestCli::try_parse_from(["loadgen"].iter().chain(argv));

        let parsed = parse(&[
            "--kafka-topic",
            "t",
            "--codecs",
            "protobuf,cloudevents-binary",
        ])
        .expect("valid")
        .args;
        let defaults = parse(&["--kafka-topic", "t"]).expect("valid").args;

        assert_eq!(
            parsed.codecs,
            [WireFormat::Protobuf, WireFormat::CloudEventsBinary]
        );
        assert_eq!(defaults.codecs, WireFormat::ALL);
        for bad in [
            &["--poison-ratio", "0.1"][..],
            &["--codecs", "protobuf"],
            &["--kafka-topic", "t", "--target", "http://x:1"],
            &["--kafka-topic", "t", "--batch-size", "10"],
            &["--kafka-topic", "t", "--codecs", "avro"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}

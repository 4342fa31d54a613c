//! `tokenmeter loadgen`: drives `tokenmeter.v1.UsageService/IngestUsage` with realistic, seeded
//! usage events — duplicates, conflicts, invalid and late events mixed in — and checks every
//! answer of the server against the exact ground truth of what it sent. With `--kafka-topic` it
//! produces the same kind of run to Kafka instead (see [`kafka`]); nothing answers there, so the
//! stored totals and the dead-letter topic are checked against its ground truth by whoever
//! consumed it (`benches/ingest_kafka.sh`, `tests/it/kafka_loadgen.rs`).
//!
//! How a run is shaped:
//! - `--events N` unique events (identities). Of those, exactly `round(N × invalid_ratio)` are
//!   invalid and `round(N × late_ratio)` are valid but up to 40 days old. On top come exactly
//!   `round(N × duplicate_ratio)` exact resends and `round(N × conflict_ratio)` resends with the
//!   same identity and another payload (other tokens or another `occurred_at`), of valid events.
//! - Resends are interleaved at random later positions: half of them soon after their original
//!   (like a producer's retry), the other half anywhere later in the run, so they land in other
//!   batches and among concurrent calls.
//! - **Ordering rule**: a resend is sent only after the call that carried its original was
//!   acknowledged. So its expected status is certain — DUPLICATE or CONFLICT — whatever the
//!   server does with same-batch or concurrent same-identity events, and a mismatch is a real
//!   server bug. (The plan never puts a resend in its original's batch; the dispatcher holds a
//!   batch back until the batches of its originals are acknowledged.)
//! - Generation is deterministic for a seed (and the same generation options): each event is
//!   drawn from its own `StdRng` seeded by (seed, index), so a resend regenerates its original
//!   bit for bit. Only the wall clock behind `occurred_at` differs between runs.
//!
//! The ground truth counts only first-seen valid events, in the disjoint token classes the
//! server must normalize provider usage objects into. Token counts are integers throughout;
//! only latencies and rates are floating point.

mod json;
mod kafka;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::task::JoinSet;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::domain::tokens::CLASS_COUNT;
use crate::grpc::auth::Bearer;
use crate::proto::v1::{
    AnthropicCacheCreation, AnthropicOutputTokensDetails, AnthropicServerToolUse, AnthropicUsage,
    EventResult, GeminiModalityTokenCount, GeminiUsageMetadata, IngestStatus, IngestUsageRequest,
    IngestUsageResponse, OpenAiCacheWriteTokensDetails, OpenAiChatUsage,
    OpenAiCompletionTokensDetails, OpenAiInputTokensDetails, OpenAiOutputTokensDetails,
    OpenAiPromptTokensDetails, OpenAiResponsesUsage, TokenCounts, UsageEvent, UsageSource,
    UsageStatus, usage_event::Usage, usage_service_client::UsageServiceClient,
};

/// Generate realistic usage events, send them to `UsageService/IngestUsage` and check the
/// server's answers against the ground truth (exit status 1 on any difference); or, with
/// --kafka-topic, produce them to Kafka and print the ground truth to check the consumer by.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadgenArgs {
    /// gRPC endpoint of the tokenmeter server.
    #[arg(
        long,
        default_value = "http://127.0.0.1:50051",
        value_name = "URL",
        conflicts_with = "kafka_topic"
    )]
    pub target: String,

    /// Unique events to generate; duplicates and conflicts are sent on top of these.
    #[arg(long, default_value_t = 100_000, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub events: u32,

    /// Events per IngestUsage call (the server's default maximum is 1000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000),
          conflicts_with = "kafka_topic")]
    pub batch_size: u32,

    /// Calls in flight at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=4096),
          conflicts_with = "kafka_topic")]
    pub concurrency: u32,

    /// Target events per second over all calls or messages (resends and poison included);
    /// 0 = as fast as possible.
    #[arg(long, default_value_t = 0, value_name = "EVENTS_PER_S")]
    pub rate: u64,

    /// Tenants the events spread over (skewed: tenant i gets a share ∝ 1/(i+1)); their ids are
    /// `lg-<run-id>-t<i>`.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub tenants: u32,

    /// Agents per tenant.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub agents_per_tenant: u32,

    /// Seed of the deterministic generator; random (and printed) when absent.
    #[arg(long)]
    pub seed: Option<u64>,

    /// Extra exact resends of already-acknowledged valid events, as a fraction of --events
    /// (expected DUPLICATE).
    #[arg(long, default_value_t = 0.1, value_parser = parse_resend_ratio)]
    pub duplicate_ratio: f64,

    /// Extra resends with the same identity and a different payload, as a fraction of --events
    /// (expected CONFLICT).
    #[arg(long, default_value_t = 0.0, value_parser = parse_resend_ratio)]
    pub conflict_ratio: f64,

    /// Fraction of the unique events that are invalid: a negative token bucket, no model, no
    /// usage, or a provider usage object whose total does not add up (expected INVALID).
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    pub invalid_ratio: f64,

    /// Fraction of the unique events whose occurred_at lies 1 hour to 40 days in the past.
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    pub late_ratio: f64,

    /// Fraction of events that carry a raw provider usage object (OpenAI chat / responses,
    /// Anthropic, Gemini) instead of disjoint `tokens`.
    #[arg(long, default_value_t = 0.2, value_parser = parse_fraction)]
    pub provider_object_ratio: f64,

    /// Run id used in source and tenant ids so that runs never collide; random when absent.
    #[arg(long, value_parser = parse_run_id)]
    pub run_id: Option<String>,

    /// API key sent as `authorization: Bearer <key>`.
    #[arg(long, env = "LOADGEN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Deadline of one IngestUsage call, in milliseconds.
    #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..),
          conflicts_with = "kafka_topic")]
    pub call_timeout_ms: u64,

    /// Retries of a call the server answered UNAVAILABLE or RESOURCE_EXHAUSTED, with
    /// exponential backoff (50 ms doubling, at most 2 s). Assumes such a call committed nothing,
    /// as the API promises; 0 = any failed call ends the run.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=20),
          conflicts_with = "kafka_topic")]
    pub retries: u32,

    /// Ask the server to omit ACCEPTED results (then only non-accepted events are checked one
    /// by one; the summary is checked either way).
    #[arg(long, conflicts_with = "kafka_topic")]
    pub omit_accepted_results: bool,

    /// Produce the run to this Kafka topic (which must exist) instead of calling a server: key
    /// = tenant id, in plan order through an idempotent producer, so every resend lands after
    /// its original in the same partition. Nothing is checked here; the report is the ground
    /// truth to check the consumer's totals and dead-letter topic against.
    #[arg(long, value_name = "TOPIC", help_heading = "Kafka target")]
    pub kafka_topic: Option<String>,

    /// Bootstrap servers of the Kafka cluster.
    #[arg(
        long,
        default_value = "127.0.0.1:9092",
        value_name = "HOST:PORT,...",
        requires = "kafka_topic",
        help_heading = "Kafka target"
    )]
    pub kafka_brokers: String,

    /// Wire formats to spread the messages over; each message's is drawn from the seed.
    #[arg(long, value_enum, value_delimiter = ',', requires = "kafka_topic",
          default_values_t = WireFormat::ALL, help_heading = "Kafka target")]
    pub codecs: Vec<WireFormat>,

    /// Undecodable messages on top of the events, as a fraction of --events: garbage bytes, a
    /// CloudEvent of a foreign type, malformed JSON, an unsupported content-type. Like invalid
    /// events they must end up in the dead-letter topic, and carry `loadgen.expect: dead-letter`.
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction, requires = "kafka_topic",
          help_heading = "Kafka target")]
    pub poison_ratio: f64,

    /// Print the report as JSON on stdout instead of text.
    #[arg(long)]
    pub json: bool,

    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
}

fn parse_ratio_in(value: &str, max: f64) -> Result<f64, String> {
    let ratio: f64 = value
        .parse()
        .map_err(|_| format!("`{value}` is not a number"))?;
    if !(0.0..=max).contains(&ratio) {
        return Err(format!("must be between 0 and {max}"));
    }
    Ok(ratio)
}

fn parse_fraction(value: &str) -> Result<f64, String> {
    parse_ratio_in(value, 1.0)
}

fn parse_resend_ratio(value: &str) -> Result<f64, String> {
    parse_ratio_in(value, 10.0)
}

fn parse_run_id(value: &str) -> Result<String, String> {
    let ok = !value.is_empty()
        && value.len() <= 24
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(value.to_owned())
    } else {
        Err("must be 1-24 characters of A-Z a-z 0-9 _ -".to_owned())
    }
}

/// A Kafka message's wire format (`ingest::codec` reads all three).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFormat {
    Protobuf,
    #[value(name = "cloudevents-structured")]
    CloudEventsStructured,
    #[value(name = "cloudevents-binary")]
    CloudEventsBinary,
}

impl WireFormat {
    const ALL: [WireFormat; 3] = [
        WireFormat::Protobuf,
        WireFormat::CloudEventsStructured,
        WireFormat::CloudEventsBinary,
    ];

    fn name(self) -> &'static str {
        match self {
            WireFormat::Protobuf => "protobuf",
            WireFormat::CloudEventsStructured => "cloudevents-structured",
            WireFormat::CloudEventsBinary => "cloudevents-binary",
        }
    }
}

/// Runs the load generator and prints its report; an error if the server disagrees with the
/// ground truth or a call fails (or, to Kafka, if a message cannot be delivered).
pub async fn run(args: LoadgenArgs) -> anyhow::Result<()> {
    if let Some(topic) = &args.kafka_topic {
        let report = kafka::execute(&args, topic).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report.to_json())?);
        } else {
            print!("{}", report.render_text());
        }
        return Ok(());
    }
    let report = execute(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        print!("{}", report.render_text());
    }
    if let Some(problem) = report.problem() {
        bail!("{problem}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Token classes (indices = proto TokenClass number − 1 = TokenCounts field order)
// ---------------------------------------------------------------------------------------------

type Buckets = [i64; CLASS_COUNT];

const INPUT: usize = 0;
const CACHE_READ: usize = 1;
const CACHE_WRITE_5M: usize = 2;
const CACHE_WRITE_1H: usize = 3;
const OUTPUT: usize = 4;
const REASONING: usize = 5;
const INPUT_AUDIO: usize = 6;
const OUTPUT_AUDIO: usize = 7;
const INPUT_IMAGE: usize = 8;
const OUTPUT_IMAGE: usize = 9;
const CACHE_WRITE_30M: usize = 10;
const CACHE_WRITE_12H: usize = 11;

const CLASS_NAMES: [&str; CLASS_COUNT] = [
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

fn to_token_counts(b: &Buckets) -> TokenCounts {
    TokenCounts {
        input: b[INPUT],
        cache_read: b[CACHE_READ],
        cache_write_5m: b[CACHE_WRITE_5M],
        cache_write_1h: b[CACHE_WRITE_1H],
        output: b[OUTPUT],
        reasoning: b[REASONING],
        input_audio: b[INPUT_AUDIO],
        output_audio: b[OUTPUT_AUDIO],
        input_image: b[INPUT_IMAGE],
        output_image: b[OUTPUT_IMAGE],
        cache_write_30m: b[CACHE_WRITE_30M],
        cache_write_12h: b[CACHE_WRITE_12H],
    }
}

fn add_buckets(into: &mut Buckets, b: &Buckets) {
    for (total, n) in into.iter_mut().zip(b) {
        *total += n;
    }
}

// ---------------------------------------------------------------------------------------------
// What gets sent
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    OpenAi,
    Anthropic,
    Google,
}

struct ModelSpec {
    provider: &'static str,
    model: &'static str,
    family: Family,
    /// Relative share of events.
    weight: u64,
}

const MODELS: [ModelSpec; 6] = [
    ModelSpec {
        provider: "openai",
        model: "gpt-4.1-mini",
        family: Family::OpenAi,
        weight: 30,
    },
    ModelSpec {
        provider: "openai",
        model: "gpt-5",
        family: Family::OpenAi,
        weight: 18,
    },
    ModelSpec {
        provider: "openai",
        model: "gpt-audio-mini",
        family: Family::OpenAi,
        weight: 2,
    },
    ModelSpec {
        provider: "anthropic",
        model: "claude-sonnet-4-5",
        family: Family::Anthropic,
        weight: 25,
    },
    ModelSpec {
        provider: "google",
        model: "gemini-2.5-flash",
        family: Family::Google,
        weight: 22,
    },
    ModelSpec {
        provider: "google",
        model: "gemini-2.5-flash-image",
        family: Family::Google,
        weight: 3,
    },
];

const SERVICES: [&str; 5] = [
    "food-delivery",
    "travel-booking",
    "customer-support",
    "grocery-order",
    "ride-hailing",
];

const AGENT_KINDS: [&str; 5] = ["concierge", "booking", "support", "planner", "checkout"];

/// How an event carries its usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Shape {
    Tokens,
    OpenAiChat,
    OpenAiResponses,
    Anthropic,
    Gemini,
}

const SHAPES: [Shape; 5] = [
    Shape::Tokens,
    Shape::OpenAiChat,
    Shape::OpenAiResponses,
    Shape::Anthropic,
    Shape::Gemini,
];

impl Shape {
    fn index(self) -> usize {
        self as usize
    }

    fn name(self) -> &'static str {
        match self {
            Shape::Tokens => "tokens",
            Shape::OpenAiChat => "openai_chat",
            Shape::OpenAiResponses => "openai_responses",
            Shape::Anthropic => "anthropic",
            Shape::Gemini => "gemini",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum InvalidKind {
    /// `tokens` with one negative bucket.
    NegativeBucket,
    /// `model` empty.
    MissingModel,
    /// No usage at all.
    MissingUsage,
    /// A provider object whose own total (or Anthropic cache-creation split) does not add up.
    ProviderTotalMismatch,
}

const INVALID_KINDS: [InvalidKind; 4] = [
    InvalidKind::NegativeBucket,
    InvalidKind::MissingModel,
    InvalidKind::MissingUsage,
    InvalidKind::ProviderTotalMismatch,
];

impl InvalidKind {
    fn index(self) -> usize {
        self as usize
    }

    fn name(self) -> &'static str {
        match self {
            InvalidKind::NegativeBucket => "negative_bucket",
            InvalidKind::MissingModel => "missing_model",
            InvalidKind::MissingUsage => "missing_usage",
            InvalidKind::ProviderTotalMismatch => "provider_total_mismatch",
        }
    }
}

/// What a unique event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OriginalKind {
    Normal,
    Late,
    Invalid(InvalidKind),
}

/// How a conflicting resend differs from its original.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConflictKind {
    /// `output` tokens raised by this many.
    Tokens(u32),
    /// `occurred_at` moved later by this many milliseconds.
    OccurredAt(u32),
}

const CONFLICT_KIND_NAMES: [&str; 2] = ["tokens", "occurred_at"];

impl ConflictKind {
    fn index(self) -> usize {
        match self {
            ConflictKind::Tokens(_) => 0,
            ConflictKind::OccurredAt(_) => 1,
        }
    }
}

/// One event of the send order; the number is the original's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Item {
    Original(u32),
    Duplicate(u32),
    Conflict(u32, ConflictKind),
}

impl Item {
    fn original(self) -> u32 {
        match self {
            Item::Original(i) | Item::Duplicate(i) | Item::Conflict(i, _) => i,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The plan: which events exist, in which order and batches they go
// ---------------------------------------------------------------------------------------------

/// Exact count for a ratio of `n`, rounded half away from zero.
fn count_for(n: u32, ratio: f64) -> usize {
    (f64::from(n) * ratio).round() as usize
}

#[derive(Debug, Clone)]
struct PlanSpec {
    seed: u64,
    events: u32,
    batch_size: usize,
    concurrency: usize,
    duplicate_ratio: f64,
    conflict_ratio: f64,
    invalid_ratio: f64,
    late_ratio: f64,
}

#[derive(Debug)]
struct Plan {
    kinds: Vec<OriginalKind>,
    batches: Vec<Vec<Item>>,
    /// Batch that carries each original.
    batch_of: Vec<u32>,
}

/// The send order before it is cut into calls: originals in index order, resends interleaved
/// after them.
#[derive(Debug)]
struct Sequence {
    kinds: Vec<OriginalKind>,
    items: Vec<Item>,
}

impl Sequence {
    fn build(spec: &PlanSpec) -> anyhow::Result<Sequence> {
        let n = spec.events as usize;
        let mut rng = StdRng::seed_from_u64(mix(spec.seed, 0x706c_616e));

        let invalid = count_for(spec.events, spec.invalid_ratio);
        let late = count_for(spec.events, spec.late_ratio);
        if invalid + late > n {
            bail!("--invalid-ratio plus --late-ratio must not exceed 1");
        }
        let mut kinds = vec![OriginalKind::Normal; n];
        let chosen = rand::seq::index::sample(&mut rng, n, invalid + late);
        for (k, index) in chosen.into_iter().enumerate() {
            kinds[index] = if k < invalid {
                OriginalKind::Invalid(INVALID_KINDS[rng.random_range(0..INVALID_KINDS.len())])
            } else {
                OriginalKind::Late
            };
        }
        let valid: Vec<u32> = (0..spec.events)
            .filter(|&i| !matches!(kinds[i as usize], OriginalKind::Invalid(_)))
            .collect();

        let duplicates = count_for(spec.events, spec.duplicate_ratio);
        let conflicts = count_for(spec.events, spec.conflict_ratio);
        if duplicates + conflicts > 0 && valid.is_empty() {
            bail!("duplicates and conflicts need valid events to resend; lower --invalid-ratio");
        }

        // Sort keys: original i sits at i·K; a resend gets a random key at least `gap` originals
        // after its original (so the original's call has most likely been answered by then),
        // and keys past the last original form the tail of the run.
        const K: u64 = 1 << 20;
        let gap = (spec.batch_size * (spec.concurrency + 1)) as u64;
        let near = (spec.batch_size * 20) as u64;
        let mut keyed: Vec<(u64, Item)> = Vec::with_capacity(n + duplicates + conflicts);
        keyed.extend((0..spec.events).map(|i| (u64::from(i) * K, Item::Original(i))));
        for r in 0..duplicates + conflicts {
            let original = valid[rng.random_range(0..valid.len())];
            let item = if r < duplicates {
                Item::Duplicate(original)
            } else if rng.random_bool(0.75) {
                Item::Conflict(original, ConflictKind::Tokens(rng.random_range(1..=500)))
            } else {
                Item::Conflict(
                    original,
                    ConflictKind::OccurredAt(rng.random_range(1..=5_000)),
                )
            };
            let start = u64::from(original) + gap;
            let position = if rng.random_bool(0.5) {
                start + rng.random_range(0..near)
            } else {
                start + rng.random_range(0..(n as u64).saturating_sub(start).max(1))
            };
            keyed.push((position * K + rng.random_range(1..K), item));
        }
        keyed.sort_by_key(|(key, _)| *key);
        Ok(Sequence {
            kinds,
            items: keyed.into_iter().map(|(_, item)| item).collect(),
        })
    }
}

impl Plan {
    fn build(spec: &PlanSpec) -> anyhow::Result<Plan> {
        let Sequence { kinds, items } = Sequence::build(spec)?;
        let n = kinds.len();
        // Cut into batches; a resend whose original is in the batch being filled moves to the
        // next one, so no batch ever holds an event's original and its resend.
        let mut batch_of = vec![u32::MAX; n];
        let mut batches: Vec<Vec<Item>> = Vec::new();
        let mut current: Vec<Item> = Vec::with_capacity(spec.batch_size);
        let mut carry: Vec<Item> = Vec::new();
        for item in items {
            let this_batch = batches.len() as u32;
            match item {
                Item::Original(i) => {
                    batch_of[i as usize] = this_batch;
                    current.push(item);
                }
                _ if batch_of[item.original() as usize] == this_batch => carry.push(item),
                _ => current.push(item),
            }
            if current.len() == spec.batch_size {
                batches.push(std::mem::take(&mut current));
                // Carried items' originals are all in the batch just closed.
                let mut carried = std::mem::take(&mut carry).into_iter();
                loop {
                    current.extend(carried.by_ref().take(spec.batch_size - current.len()));
                    if current.len() < spec.batch_size {
                        break;
                    }
                    batches.push(std::mem::take(&mut current));
                }
            }
        }
        if !current.is_empty() {
            batches.push(current);
        }
        for chunk in carry.chunks(spec.batch_size) {
            batches.push(chunk.to_vec());
        }
        Ok(Plan {
            kinds,
            batches,
            batch_of,
        })
    }

    /// Whether every batch whose originals `batch` resends has been acknowledged.
    fn ready(&self, batch: usize, acked: &[bool]) -> bool {
        self.batches[batch].iter().all(|item| match item {
            Item::Original(_) => true,
            _ => acked[self.batch_of[item.original() as usize] as usize],
        })
    }
}

/// SplitMix64 finalizer: turns (seed, index, stream) into well-spread per-event seeds.
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------------------------------------
// The generator: one deterministic event per index
// ---------------------------------------------------------------------------------------------

/// Per-event choices of how a provider object is written that do not change its buckets.
#[derive(Debug, Clone, Copy)]
struct RenderOpts {
    with_total: bool,
    anthropic_cache_creation: bool,
    anthropic_web_searches: i64,
    /// Gemini tool-use prompt tokens (part of `input`).
    gemini_tool_use: i64,
    /// OpenAI predicted-output tokens (informational, inside output).
    openai_predictions: (i64, i64),
}

struct Generated {
    event: UsageEvent,
    tenant: usize,
    model: usize,
    shape: Shape,
    /// The normalized buckets of the event as sent (meaningless for invalid events).
    buckets: Buckets,
}

#[derive(Debug, Clone)]
struct Generator {
    seed: u64,
    tenant_ids: Vec<String>,
    /// Cumulative tenant weights.
    tenant_weights: Vec<u64>,
    /// Cumulative model weights, in MODELS order.
    model_weights: Vec<u64>,
    sources: [String; 2],
    agents_per_tenant: u32,
    provider_object_ratio: f64,
    /// Transactions per tenant, so that several events share one.
    transactions_per_tenant: u32,
}

impl Generator {
    fn new(seed: u64, run_id: &str, args: &LoadgenArgs) -> Generator {
        let tenant_ids = (0..args.tenants)
            .map(|i| format!("lg-{run_id}-t{i}"))
            .collect();
        let mut total = 0;
        let tenant_weights = (0..u64::from(args.tenants))
            .map(|i| {
                total += 1_000_000 / (i + 1);
                total
            })
            .collect();
        Generator {
            seed,
            tenant_ids,
            tenant_weights,
            model_weights: MODELS
                .iter()
                .scan(0, |total, m| {
                    *total += m.weight;
                    Some(*total)
                })
                .collect(),
            sources: [format!("lg-{run_id}-gw1"), format!("lg-{run_id}-gw2")],
            agents_per_tenant: args.agents_per_tenant,
            provider_object_ratio: args.provider_object_ratio,
            transactions_per_tenant: (args.events / 8 / args.tenants).max(1),
        }
    }

    fn rng(&self, index: u32, stream: u64) -> StdRng {
        StdRng::seed_from_u64(mix(self.seed, (u64::from(index) << 8) | stream))
    }

    /// `occurred_at` (µs since the epoch) of original `index` generated at `now_micros`.
    fn occurred_at(&self, index: u32, kind: OriginalKind, now_micros: i64) -> i64 {
        let mut rng = self.rng(index, 1);
        match kind {
            OriginalKind::Late => {
                now_micros - rng.random_range(3_600_000_000..=40 * 86_400_000_000_i64)
            }
            _ => now_micros - rng.random_range(0..=2_000_000_i64),
        }
    }

    /// The event `item` stands for. An original fixes its `occurred_at` (drawn back from
    /// `now_micros`) in `occurred_at`, where its later resends find it.
    fn item(
        &self,
        item: Item,
        kind: OriginalKind,
        occurred_at: &mut [i64],
        now_micros: i64,
    ) -> Generated {
        let index = item.original();
        match item {
            Item::Original(_) => {
                let at = self.occurred_at(index, kind, now_micros);
                occurred_at[index as usize] = at;
                self.generate(index, kind, at, None)
            }
            Item::Duplicate(_) => self.generate(index, kind, occurred_at[index as usize], None),
            Item::Conflict(_, conflict) => {
                self.generate(index, kind, occurred_at[index as usize], Some(conflict))
            }
        }
    }

    /// Original `index`, or a conflicting variant of it. Every random draw happens before the
    /// kind-specific changes, so the draws are the same for an original and its resends.
    fn generate(
        &self,
        index: u32,
        kind: OriginalKind,
        occurred_at_micros: i64,
        conflict: Option<ConflictKind>,
    ) -> Generated {
        let mut rng = self.rng(index, 0);
        let tenant = pick_weighted(&mut rng, &self.tenant_weights);
        let model = pick_weighted(&mut rng, &self.model_weights);
        let spec = &MODELS[model];
        let mut buckets = draw_buckets(model, &mut rng);
        let shape = if rng.random_bool(self.provider_object_ratio) {
            match spec.family {
                // Chat Completions carries 30-minute cache writes only.
                Family::OpenAi
                    if buckets[CACHE_WRITE_12H] == 0
                        && (spec.model == "gpt-audio-mini" || rng.random_bool(0.7)) =>
                {
                    Shape::OpenAiChat
                }
                Family::OpenAi => Shape::OpenAiResponses,
                Family::Anthropic => Shape::Anthropic,
                Family::Google => Shape::Gemini,
            }
        } else {
            Shape::Tokens
        };
        let opts = RenderOpts {
            with_total: rng.random_bool(0.9),
            anthropic_cache_creation: buckets[CACHE_WRITE_1H] > 0 || rng.random_bool(0.8),
            anthropic_web_searches: if rng.random_bool(0.1) {
                rng.random_range(1..=3)
            } else {
                0
            },
            gemini_tool_use: if rng.random_bool(0.15) {
                rng.random_range(0..=buckets[INPUT] / 2)
            } else {
                0
            },
            openai_predictions: if rng.random_bool(0.03) {
                (
                    rng.random_range(0..=buckets[OUTPUT] / 2),
                    rng.random_range(0..=buckets[OUTPUT] / 4),
                )
            } else {
                (0, 0)
            },
        };
        let source = self.sources[rng.random_range(0..self.sources.len())].clone();
        let event_id = uuid::Builder::from_random_bytes(rng.random()).into_uuid();
        let with_transaction = rng.random_bool(0.6);
        let transaction = rng.random_range(0..self.transactions_per_tenant);
        // A transaction is carried out by one agent of one tenant.
        let agent = if with_transaction {
            transaction % self.agents_per_tenant
        } else {
            rng.random_range(0..self.agents_per_tenant)
        };
        let session = rng
            .random_bool(0.5)
            .then(|| format!("sess-{:08x}", rng.random::<u32>()));
        let request_tag: u64 = rng.random();
        let usage_source = if shape == Shape::Tokens && rng.random_bool(0.05) {
            UsageSource::Estimated
        } else {
            UsageSource::ProviderReported
        };
        let status = match rng.random_range(0..100) {
            0..=96 => UsageStatus::Success,
            97..=98 => UsageStatus::Error,
            _ => UsageStatus::Cancelled,
        };
        let attributes = if rng.random_bool(0.3) {
            [
                ("env".to_owned(), "prod".to_owned()),
                (
                    "region".to_owned(),
                    ["eu-west-1", "us-east-1", "ap-south-1"][rng.random_range(0..3)].to_owned(),
                ),
            ]
            .into_iter()
            .collect()
        } else {
            Default::default()
        };
        let breakage: i64 = rng.random_range(1..=100);

        let mut occurred_at = occurred_at_micros;
        match conflict {
            Some(ConflictKind::Tokens(extra)) => buckets[OUTPUT] += i64::from(extra),
            Some(ConflictKind::OccurredAt(ms)) => occurred_at += i64::from(ms) * 1_000,
            None => {}
        }
        let mut usage = Some(render_usage(shape, &buckets, &opts));
        let mut model_name = spec.model.to_owned();
        let mut sent_shape = shape;
        if let OriginalKind::Invalid(invalid) = kind {
            match invalid {
                InvalidKind::NegativeBucket => {
                    let mut broken = buckets;
                    broken[[INPUT, OUTPUT, CACHE_READ][breakage as usize % 3]] = -breakage;
                    usage = Some(Usage::Tokens(to_token_counts(&broken)));
                    sent_shape = Shape::Tokens;
                }
                InvalidKind::MissingModel => model_name.clear(),
                InvalidKind::MissingUsage => usage = None,
                InvalidKind::ProviderTotalMismatch => {
                    let (s, u) = mismatched_usage(spec.family, &buckets, &opts, breakage);
                    sent_shape = s;
                    usage = Some(u);
                }
            }
        }

        let request_id = match (sent_shape, spec.family) {
            (Shape::OpenAiResponses, _) => Some(format!("resp_{request_tag:016x}")),
            (_, Family::OpenAi) => Some(format!("chatcmpl-{request_tag:016x}")),
            (_, Family::Anthropic) => Some(format!("msg_01{request_tag:016x}")),
            (_, Family::Google) => request_tag
                .is_multiple_of(2)
                .then(|| format!("{request_tag:016x}")),
        };
        let event = UsageEvent {
            event_id: event_id.to_string(),
            source,
            tenant_id: self.tenant_ids[tenant].clone(),
            agent_id: format!(
                "{}-{agent}",
                AGENT_KINDS[agent as usize % AGENT_KINDS.len()]
            ),
            transaction_id: with_transaction.then(|| format!("tx-t{tenant}-{transaction}")),
            service: with_transaction
                .then(|| SERVICES[transaction as usize % SERVICES.len()].to_owned()),
            session_id: session,
            request_id,
            reservation_id: None,
            provider: spec.provider.to_owned(),
            model: model_name,
            occurred_at: Some(prost_types::Timestamp {
                seconds: occurred_at.div_euclid(1_000_000),
                nanos: (occurred_at.rem_euclid(1_000_000) * 1_000) as i32,
            }),
            usage,
            usage_source: usage_source as i32,
            status: status as i32,
            attributes,
        };
        Generated {
            event,
            tenant,
            model,
            shape: sent_shape,
            buckets,
        }
    }
}

fn pick_weighted(rng: &mut StdRng, cumulative: &[u64]) -> usize {
    let total = cumulative.last().copied().unwrap_or(1);
    let r = rng.random_range(0..total);
    cumulative.partition_point(|&w| w <= r)
}

/// Token counts in plausible ranges for the model: prompts of hundreds to thousands, frequent
/// cache reads, outputs of tens to hundreds, reasoning for reasoning models.
fn draw_buckets(model: usize, rng: &mut StdRng) -> Buckets {
    let mut b = [0; CLASS_COUNT];
    b[INPUT] = match rng.random_range(0..100) {
        0..=54 => rng.random_range(150..=800),
        55..=89 => rng.random_range(800..=3_000),
        _ => rng.random_range(3_000..=12_000),
    };
    b[OUTPUT] = match rng.random_range(0..100) {
        0..=69 => rng.random_range(20..=400),
        70..=94 => rng.random_range(400..=1_500),
        _ => rng.random_range(1_500..=4_000),
    };
    match MODELS[model].model {
        "gpt-4.1-mini" => {
            if rng.random_bool(0.55) {
                // OpenAI caches prompts of ≥ 1024 tokens in 128-token steps.
                b[CACHE_READ] = 1_024 + 128 * rng.random_range(0..=120);
            }
            if rng.random_bool(0.04) {
                b[INPUT_IMAGE] = 765 * rng.random_range(1..=2);
            }
        }
        "gpt-5" => {
            if rng.random_bool(0.6) {
                b[CACHE_READ] = 1_024 + 128 * rng.random_range(0..=120);
            }
            // Prompt-cache writes: mostly the default 30-minute retention, some 12-hour.
            if rng.random_bool(0.15) {
                b[CACHE_WRITE_30M] = 1_024 + 128 * rng.random_range(0..=60);
            }
            if rng.random_bool(0.05) {
                b[CACHE_WRITE_12H] = 1_024 + 128 * rng.random_range(0..=60);
            }
            if rng.random_bool(0.8) {
                b[REASONING] = 64 * rng.random_range(1..=100);
            }
        }
        "gpt-audio-mini" => {
            b[INPUT] = rng.random_range(50..=600);
            b[INPUT_AUDIO] = rng.random_range(50..=2_000);
            b[OUTPUT] = rng.random_range(10..=200);
            if rng.random_bool(0.7) {
                b[OUTPUT_AUDIO] = rng.random_range(100..=3_000);
            }
        }
        "claude-sonnet-4-5" => {
            if rng.random_bool(0.6) {
                b[CACHE_READ] = rng.random_range(1_024..=30_000);
            }
            if rng.random_bool(0.3) {
                // Extended thinking, reported inside output_tokens with its own count.
                b[REASONING] = rng.random_range(100..=4_000);
            }
            if rng.random_bool(0.25) {
                b[CACHE_WRITE_5M] = rng.random_range(1_024..=8_000);
            }
            if rng.random_bool(0.05) {
                b[CACHE_WRITE_1H] = rng.random_range(1_024..=8_000);
            }
        }
        "gemini-2.5-flash" => {
            if rng.random_bool(0.3) {
                b[CACHE_READ] = rng.random_range(1_024..=32_000);
            }
            if rng.random_bool(0.5) {
                b[REASONING] = rng.random_range(50..=3_000);
            }
            if rng.random_bool(0.06) {
                b[INPUT_IMAGE] = 258 * rng.random_range(1..=4);
            }
            if rng.random_bool(0.02) {
                // 32 tokens per second of audio.
                b[INPUT_AUDIO] = 32 * rng.random_range(1..=120);
            }
        }
        "gemini-2.5-flash-image" => {
            b[OUTPUT] = rng.random_range(0..=60);
            b[OUTPUT_IMAGE] = 1_290 * rng.random_range(1..=2);
            if rng.random_bool(0.5) {
                b[INPUT_IMAGE] = 258 * rng.random_range(1..=3);
            }
        }
        _ => {}
    }
    b
}

/// Writes disjoint buckets as `shape`, so that the server's normalization (per the proto
/// comments) gives back exactly `b`.
fn render_usage(shape: Shape, b: &Buckets, opts: &RenderOpts) -> Usage {
    let total: i64 = b.iter().sum();
    let total = opts.with_total.then_some(total);
    match shape {
        Shape::Tokens => Usage::Tokens(to_token_counts(b)),
        Shape::OpenAiChat => Usage::OpenaiChat(OpenAiChatUsage {
            prompt_tokens: b[INPUT]
                + b[CACHE_READ]
                + b[CACHE_WRITE_30M]
                + b[INPUT_AUDIO]
                + b[INPUT_IMAGE],
            completion_tokens: b[OUTPUT] + b[REASONING] + b[OUTPUT_AUDIO] + b[OUTPUT_IMAGE],
            total_tokens: total,
            prompt_tokens_details: Some(OpenAiPromptTokensDetails {
                cached_tokens: b[CACHE_READ],
                cache_write_tokens: b[CACHE_WRITE_30M],
                audio_tokens: b[INPUT_AUDIO],
                image_tokens: b[INPUT_IMAGE],
                ..Default::default()
            }),
            completion_tokens_details: Some(OpenAiCompletionTokensDetails {
                reasoning_tokens: b[REASONING],
                audio_tokens: b[OUTPUT_AUDIO],
                accepted_prediction_tokens: opts.openai_predictions.0,
                rejected_prediction_tokens: opts.openai_predictions.1,
                image_tokens: b[OUTPUT_IMAGE],
                text_tokens: 0,
            }),
        }),
        Shape::OpenAiResponses => Usage::OpenaiResponses(OpenAiResponsesUsage {
            input_tokens: b[INPUT]
                + b[CACHE_READ]
                + b[CACHE_WRITE_30M]
                + b[CACHE_WRITE_12H]
                + b[INPUT_AUDIO]
                + b[INPUT_IMAGE],
            input_tokens_details: Some(OpenAiInputTokensDetails {
                cached_tokens: b[CACHE_READ],
                cache_write_tokens: b[CACHE_WRITE_30M] + b[CACHE_WRITE_12H],
                // Without the split every write is a 30-minute one.
                cache_write_tokens_details: (b[CACHE_WRITE_12H] > 0).then_some(
                    OpenAiCacheWriteTokensDetails {
                        ttl_30m_tokens: b[CACHE_WRITE_30M],
                        ttl_12h_tokens: b[CACHE_WRITE_12H],
                    },
                ),
                audio_tokens: b[INPUT_AUDIO],
                image_tokens: b[INPUT_IMAGE],
                ..Default::default()
            }),
            output_tokens: b[OUTPUT] + b[REASONING] + b[OUTPUT_AUDIO] + b[OUTPUT_IMAGE],
            output_tokens_details: Some(OpenAiOutputTokensDetails {
                reasoning_tokens: b[REASONING],
                audio_tokens: b[OUTPUT_AUDIO],
                image_tokens: b[OUTPUT_IMAGE],
                text_tokens: 0,
            }),
            total_tokens: total,
        }),
        Shape::Anthropic => {
            // Thinking is inside output_tokens, counted again in output_tokens_details;
            // generated Anthropic buckets have no audio or image.
            let creation = b[CACHE_WRITE_5M] + b[CACHE_WRITE_1H];
            Usage::Anthropic(AnthropicUsage {
                input_tokens: b[INPUT] + b[INPUT_AUDIO] + b[INPUT_IMAGE],
                output_tokens: b[OUTPUT] + b[REASONING] + b[OUTPUT_AUDIO] + b[OUTPUT_IMAGE],
                cache_creation_input_tokens: creation,
                cache_read_input_tokens: b[CACHE_READ],
                cache_creation: opts
                    .anthropic_cache_creation
                    .then_some(AnthropicCacheCreation {
                        ephemeral_5m_input_tokens: b[CACHE_WRITE_5M],
                        ephemeral_1h_input_tokens: b[CACHE_WRITE_1H],
                    }),
                server_tool_use: (opts.anthropic_web_searches > 0).then_some(
                    AnthropicServerToolUse {
                        web_search_requests: opts.anthropic_web_searches,
                        web_fetch_requests: 0,
                    },
                ),
                service_tier: Some("standard".to_owned()),
                output_tokens_details: (b[REASONING] > 0).then_some(AnthropicOutputTokensDetails {
                    thinking_tokens: b[REASONING],
                }),
            })
        }
        Shape::Gemini => {
            let modality = |name: &str, count: i64| GeminiModalityTokenCount {
                modality: name.to_owned(),
                token_count: count,
            };
            let non_zero = |list: Vec<GeminiModalityTokenCount>| -> Vec<GeminiModalityTokenCount> {
                list.into_iter().filter(|m| m.token_count > 0).collect()
            };
            // Gemini has no cache writes; generated Google buckets have none.
            let tool_use = opts.gemini_tool_use.min(b[INPUT]);
            let prompt_text = b[INPUT] - tool_use + b[CACHE_READ];
            Usage::Gemini(GeminiUsageMetadata {
                prompt_token_count: prompt_text + b[INPUT_AUDIO] + b[INPUT_IMAGE],
                cached_content_token_count: b[CACHE_READ],
                candidates_token_count: b[OUTPUT] + b[OUTPUT_AUDIO] + b[OUTPUT_IMAGE],
                tool_use_prompt_token_count: tool_use,
                thoughts_token_count: b[REASONING],
                total_token_count: total,
                prompt_tokens_details: non_zero(vec![
                    modality("TEXT", prompt_text),
                    modality("AUDIO", b[INPUT_AUDIO]),
                    modality("IMAGE", b[INPUT_IMAGE]),
                ]),
                cache_tokens_details: non_zero(vec![modality("TEXT", b[CACHE_READ])]),
                candidates_tokens_details: non_zero(vec![
                    modality("TEXT", b[OUTPUT]),
                    modality("AUDIO", b[OUTPUT_AUDIO]),
                    modality("IMAGE", b[OUTPUT_IMAGE]),
                ]),
                tool_use_prompt_tokens_details: non_zero(vec![modality("TEXT", tool_use)]),
            })
        }
    }
}

/// A provider object that does not add up: its total is off by `by`, or (Anthropic, which has
/// no total) its cache-creation split does not sum to cache_creation_input_tokens.
fn mismatched_usage(family: Family, b: &Buckets, opts: &RenderOpts, by: i64) -> (Shape, Usage) {
    let total: i64 = b.iter().sum();
    match family {
        Family::OpenAi if b[CACHE_WRITE_12H] > 0 => {
            let Usage::OpenaiResponses(mut usage) = render_usage(Shape::OpenAiResponses, b, opts)
            else {
                unreachable!("render_usage keeps the shape")
            };
            usage.total_tokens = Some(total + by);
            (Shape::OpenAiResponses, Usage::OpenaiResponses(usage))
        }
        Family::OpenAi => {
            let Usage::OpenaiChat(mut usage) = render_usage(Shape::OpenAiChat, b, opts) else {
                unreachable!("render_usage keeps the shape")
            };
            usage.total_tokens = Some(total + by);
            (Shape::OpenAiChat, Usage::OpenaiChat(usage))
        }
        Family::Google => {
            let Usage::Gemini(mut usage) = render_usage(Shape::Gemini, b, opts) else {
                unreachable!("render_usage keeps the shape")
            };
            usage.total_token_count = Some(total + by);
            (Shape::Gemini, Usage::Gemini(usage))
        }
        Family::Anthropic => {
            let Usage::Anthropic(mut usage) = render_usage(Shape::Anthropic, b, opts) else {
                unreachable!("render_usage keeps the shape")
            };
            usage.cache_creation_input_tokens += by;
            usage.cache_creation = Some(AnthropicCacheCreation {
                ephemeral_5m_input_tokens: b[CACHE_WRITE_5M],
                ephemeral_1h_input_tokens: b[CACHE_WRITE_1H],
            });
            (Shape::Anthropic, Usage::Anthropic(usage))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Ground truth
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Summary {
    accepted: u64,
    duplicate: u64,
    conflict: u64,
    invalid: u64,
}

impl Summary {
    fn add(&mut self, status: IngestStatus) {
        match status {
            IngestStatus::Accepted => self.accepted += 1,
            IngestStatus::Duplicate => self.duplicate += 1,
            IngestStatus::Conflict => self.conflict += 1,
            IngestStatus::Invalid => self.invalid += 1,
            IngestStatus::Unspecified => {}
        }
    }

    fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "accepted": self.accepted,
            "duplicate": self.duplicate,
            "conflict": self.conflict,
            "invalid": self.invalid,
        })
    }
}

#[derive(Debug, Clone, Default)]
struct Truth {
    calls: u64,
    sent: u64,
    originals: u64,
    late: u64,
    duplicates: u64,
    conflicts_by_kind: [u64; 2],
    invalid_by_kind: [u64; 4],
    originals_by_shape: [u64; 5],
    expected: Summary,
    /// Σ of first-seen valid events.
    classes: Buckets,
    tenants: Vec<(u64, Buckets)>,
    models: Vec<(u64, Buckets)>,
}

impl Truth {
    fn new(tenants: usize) -> Truth {
        Truth {
            tenants: vec![(0, [0; CLASS_COUNT]); tenants],
            models: vec![(0, [0; CLASS_COUNT]); MODELS.len()],
            ..Truth::default()
        }
    }

    /// Records one event as sent and returns its expected status.
    fn record(&mut self, item: Item, kind: OriginalKind, generated: &Generated) -> IngestStatus {
        self.sent += 1;
        let status = match item {
            Item::Original(_) => {
                self.originals += 1;
                self.originals_by_shape[generated.shape.index()] += 1;
                match kind {
                    OriginalKind::Invalid(invalid) => {
                        self.invalid_by_kind[invalid.index()] += 1;
                        IngestStatus::Invalid
                    }
                    OriginalKind::Normal | OriginalKind::Late => {
                        if kind == OriginalKind::Late {
                            self.late += 1;
                        }
                        add_buckets(&mut self.classes, &generated.buckets);
                        let tenant = &mut self.tenants[generated.tenant];
                        tenant.0 += 1;
                        add_buckets(&mut tenant.1, &generated.buckets);
                        let model = &mut self.models[generated.model];
                        model.0 += 1;
                        add_buckets(&mut model.1, &generated.buckets);
                        IngestStatus::Accepted
                    }
                }
            }
            Item::Duplicate(_) => {
                self.duplicates += 1;
                IngestStatus::Duplicate
            }
            Item::Conflict(_, conflict) => {
                self.conflicts_by_kind[conflict.index()] += 1;
                IngestStatus::Conflict
            }
        };
        self.expected.add(status);
        status
    }
}

/// The ground truth as both targets report it.
impl Truth {
    fn active_classes(&self) -> Vec<usize> {
        (0..CLASS_NAMES.len())
            .filter(|&c| self.classes[c] != 0)
            .collect()
    }

    /// What was sent, by kind, under a heading the caller writes.
    fn write_sent(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "  original   {:>12}  (late {}, invalid {})",
            self.originals, self.late, self.expected.invalid
        );
        let _ = writeln!(s, "  duplicate  {:>12}", self.duplicates);
        let _ = writeln!(
            s,
            "  conflict   {:>12}  (tokens {}, occurred_at {})",
            self.conflicts_by_kind.iter().sum::<u64>(),
            self.conflicts_by_kind[0],
            self.conflicts_by_kind[1]
        );
        let shapes: Vec<String> = SHAPES
            .iter()
            .map(|shape| {
                format!(
                    "{} {}",
                    shape.name(),
                    self.originals_by_shape[shape.index()]
                )
            })
            .collect();
        let _ = writeln!(s, "  originals by usage shape: {}", shapes.join(", "));
        if self.expected.invalid > 0 {
            let kinds: Vec<String> = INVALID_KINDS
                .iter()
                .map(|k| format!("{} {}", k.name(), self.invalid_by_kind[k.index()]))
                .collect();
            let _ = writeln!(s, "  invalid by kind: {}", kinds.join(", "));
        }
    }

    /// The tokens the first-seen valid events carry: by class, per tenant, per model.
    fn write_tokens(&self, s: &mut String, tenant_ids: &[String]) {
        let classes = self.active_classes();
        let _ = writeln!(
            s,
            "\nground truth tokens (first-seen valid events: {})",
            self.expected.accepted
        );
        for &c in &classes {
            let _ = writeln!(s, "  {:<15} {:>16}", CLASS_NAMES[c], self.classes[c]);
        }
        let _ = writeln!(
            s,
            "  {:<15} {:>16}",
            "total",
            self.classes.iter().sum::<i64>()
        );

        let _ = write!(
            s,
            "\nper tenant\n  {:<24} {:>10} {:>14}",
            "tenant", "events", "total"
        );
        for &c in &classes {
            let _ = write!(s, " {:>14}", CLASS_NAMES[c]);
        }
        let _ = writeln!(s);
        for (id, (events, buckets)) in tenant_ids.iter().zip(&self.tenants) {
            let _ = write!(
                s,
                "  {id:<24} {events:>10} {:>14}",
                buckets.iter().sum::<i64>()
            );
            for &c in &classes {
                let _ = write!(s, " {:>14}", buckets[c]);
            }
            let _ = writeln!(s);
        }

        let _ = writeln!(s, "\nper model");
        for (spec, (events, buckets)) in MODELS.iter().zip(&self.models) {
            let _ = writeln!(
                s,
                "  {:<10} {:<24} {events:>10} events {:>14} tokens",
                spec.provider,
                spec.model,
                buckets.iter().sum::<i64>()
            );
        }
    }

    /// Adds `sent`, `expected`, `tokens`, `tenants` and `models` to a report object.
    fn add_json(&self, report: &mut serde_json::Value, tenant_ids: &[String]) {
        let by_class = |b: &Buckets| -> serde_json::Value {
            CLASS_NAMES
                .iter()
                .zip(b)
                .map(|(name, n)| ((*name).to_owned(), serde_json::Value::from(*n)))
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        let members = serde_json::json!({
            "sent": {
                "events": self.sent,
                "original": self.originals,
                "late": self.late,
                "invalid": self.expected.invalid,
                "duplicate": self.duplicates,
                "conflict": self.conflicts_by_kind.iter().sum::<u64>(),
                "conflict_by_kind": CONFLICT_KIND_NAMES.iter().zip(self.conflicts_by_kind)
                    .map(|(k, n)| ((*k).to_owned(), serde_json::Value::from(n)))
                    .collect::<serde_json::Map<_, _>>(),
                "invalid_by_kind": INVALID_KINDS.iter()
                    .map(|k| (k.name().to_owned(), serde_json::Value::from(self.invalid_by_kind[k.index()])))
                    .collect::<serde_json::Map<_, _>>(),
                "original_by_shape": SHAPES.iter()
                    .map(|s| (s.name().to_owned(), serde_json::Value::from(self.originals_by_shape[s.index()])))
                    .collect::<serde_json::Map<_, _>>(),
            },
            "expected": self.expected.to_json(),
            "tokens": {
                "by_class": by_class(&self.classes),
                "total": self.classes.iter().sum::<i64>(),
            },
            "tenants": tenant_ids.iter().zip(&self.tenants).map(|(id, (events, b))| serde_json::json!({
                "tenant_id": id,
                "events": events,
                "total": b.iter().sum::<i64>(),
                "by_class": by_class(b),
            })).collect::<Vec<_>>(),
            "models": MODELS.iter().zip(&self.models).map(|(m, (events, b))| serde_json::json!({
                "provider": m.provider,
                "model": m.model,
                "events": events,
                "total": b.iter().sum::<i64>(),
                "by_class": by_class(b),
            })).collect::<Vec<_>>(),
        });
        if let (Some(report), serde_json::Value::Object(members)) =
            (report.as_object_mut(), members)
        {
            report.extend(members);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Calling the server
// ---------------------------------------------------------------------------------------------

type Client = UsageServiceClient<InterceptedService<Channel, Bearer>>;

async fn connect(args: &LoadgenArgs) -> anyhow::Result<Client> {
    let endpoint = Endpoint::from_shared(args.target.clone())
        .with_context(|| format!("--target `{}` is not a valid URL", args.target))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_millis(args.call_timeout_ms))
        .tcp_nodelay(true);
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot connect to {}", args.target))?;
    let auth =
        Bearer::new(args.api_key.as_deref()).context("--api-key is not a valid header value")?;
    Ok(UsageServiceClient::with_interceptor(channel, auth)
        .max_decoding_message_size(64 * 1024 * 1024))
}

#[derive(Debug, Clone)]
struct Mismatch {
    expected: IngestStatus,
    got: Option<IngestStatus>,
    event_id: String,
    detail: String,
}

struct CallOutcome {
    batch: usize,
    events: usize,
    latency: Duration,
    summary: Option<Summary>,
    mismatches: Vec<Mismatch>,
    unpriced: u64,
    /// (field, reason) of each INVALID result.
    invalid_reasons: Vec<(String, String)>,
    /// Attempts beyond the first.
    retries: u32,
}

/// A finished call: its outcome, or the batch number and the status it failed with.
type CallResult = Result<CallOutcome, (usize, Box<tonic::Status>)>;

/// One IngestUsage call, retried on UNAVAILABLE / RESOURCE_EXHAUSTED up to `retries` times.
/// The latency is the client's view: every attempt and backoff included.
async fn call(
    mut client: Client,
    batch: usize,
    request: IngestUsageRequest,
    expected: Vec<(IngestStatus, String)>,
    retries: u32,
) -> CallResult {
    let omit = request.omit_accepted_results;
    let events = request.events.len();
    let started = Instant::now();
    let mut attempt = 0;
    // Cloned only while a retry may still need it; the last attempt takes it.
    let mut pending = Some(request);
    let response = loop {
        let this_request = if attempt < retries {
            pending.clone()
        } else {
            pending.take()
        }
        .expect("the request is kept until the last attempt");
        match client.ingest_usage(this_request).await {
            Ok(response) => break response.into_inner(),
            Err(status)
                if attempt < retries
                    && matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::ResourceExhausted
                    ) =>
            {
                let backoff =
                    Duration::from_millis(50 << attempt.min(5)).min(Duration::from_secs(2));
                tokio::time::sleep(backoff).await;
                attempt += 1;
            }
            Err(status) => return Err((batch, Box::new(status))),
        }
    };
    let latency = started.elapsed();
    let mut outcome = check_response(batch, events, latency, &response, &expected, omit);
    outcome.retries = attempt;
    Ok(outcome)
}

/// Compares one response with what each event of its request should have got.
fn check_response(
    batch: usize,
    events: usize,
    latency: Duration,
    response: &IngestUsageResponse,
    expected: &[(IngestStatus, String)],
    omit_accepted: bool,
) -> CallOutcome {
    let mut outcome = CallOutcome {
        batch,
        events,
        latency,
        summary: response.summary.as_ref().map(|s| Summary {
            accepted: s.accepted.max(0) as u64,
            duplicate: s.duplicate.max(0) as u64,
            conflict: s.conflict.max(0) as u64,
            invalid: s.invalid.max(0) as u64,
        }),
        mismatches: Vec::new(),
        unpriced: 0,
        invalid_reasons: Vec::new(),
        retries: 0,
    };
    let mut by_index: Vec<Option<&EventResult>> = vec![None; expected.len()];
    for result in &response.results {
        match usize::try_from(result.index)
            .ok()
            .filter(|&i| i < expected.len())
        {
            Some(i) => by_index[i] = Some(result),
            None => outcome.mismatches.push(Mismatch {
                expected: IngestStatus::Unspecified,
                got: IngestStatus::try_from(result.status).ok(),
                event_id: result.event_id.clone(),
                detail: format!("result index {} is outside the batch", result.index),
            }),
        }
    }
    for ((want, event_id), result) in expected.iter().zip(by_index) {
        let got = match result {
            Some(r) => IngestStatus::try_from(r.status).unwrap_or(IngestStatus::Unspecified),
            None if omit_accepted => IngestStatus::Accepted,
            None => {
                outcome.mismatches.push(Mismatch {
                    expected: *want,
                    got: None,
                    event_id: event_id.clone(),
                    detail: "no result for this event".to_owned(),
                });
                continue;
            }
        };
        if let Some(r) = result {
            if r.unpriced {
                outcome.unpriced += 1;
            }
            if got == IngestStatus::Invalid {
                outcome
                    .invalid_reasons
                    .push((r.field.clone(), r.reason.clone()));
            }
            if r.event_id != *event_id && !event_id.is_empty() {
                outcome.mismatches.push(Mismatch {
                    expected: *want,
                    got: Some(got),
                    event_id: event_id.clone(),
                    detail: format!("result carries event_id `{}`", r.event_id),
                });
                continue;
            }
        }
        if got != *want {
            outcome.mismatches.push(Mismatch {
                expected: *want,
                got: Some(got),
                event_id: event_id.clone(),
                detail: result
                    .map(|r| format!("field `{}`, reason `{}`", r.field, r.reason))
                    .unwrap_or_default(),
            });
        }
    }
    outcome
}

fn describe_status(target: &str, status: &tonic::Status) -> String {
    let message = status.message();
    match status.code() {
        tonic::Code::Unimplemented => format!(
            "the server at {target} does not implement tokenmeter.v1.UsageService/IngestUsage \
             (UNIMPLEMENTED: {message})"
        ),
        tonic::Code::Unauthenticated => format!(
            "the server at {target} refused the call (UNAUTHENTICATED: {message}); pass an \
             ingest-scoped key with --api-key or LOADGEN_API_KEY"
        ),
        tonic::Code::PermissionDenied => format!(
            "the server at {target} refused the call (PERMISSION_DENIED: {message}); the key \
             must be bound to the loadgen tenants"
        ),
        code => format!("IngestUsage failed ({code:?}: {message})"),
    }
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Observed {
    server: Summary,
    calls_without_summary: u64,
    mismatch_count: u64,
    mismatch_pairs: BTreeMap<String, u64>,
    mismatch_examples: Vec<String>,
    unpriced: u64,
    /// INVALID results by field: count and the first reason seen.
    invalid_fields: BTreeMap<String, (u64, String)>,
    latencies_us: Vec<u64>,
    retried_calls: u64,
    retries: u64,
}

const MAX_EXAMPLES: usize = 10;
const MAX_FIELDS: usize = 30;

impl Observed {
    fn absorb(&mut self, outcome: CallOutcome) {
        self.latencies_us
            .push(u64::try_from(outcome.latency.as_micros()).unwrap_or(u64::MAX));
        match outcome.summary {
            Some(s) => {
                self.server.accepted += s.accepted;
                self.server.duplicate += s.duplicate;
                self.server.conflict += s.conflict;
                self.server.invalid += s.invalid;
            }
            None => self.calls_without_summary += 1,
        }
        self.unpriced += outcome.unpriced;
        if outcome.retries > 0 {
            self.retried_calls += 1;
            self.retries += u64::from(outcome.retries);
        }
        for (field, reason) in outcome.invalid_reasons {
            let field = if field.is_empty() {
                "(no field)".to_owned()
            } else {
                field
            };
            let known =
                self.invalid_fields.len() < MAX_FIELDS || self.invalid_fields.contains_key(&field);
            let key = if known { field } else { "(other)".to_owned() };
            self.invalid_fields.entry(key).or_insert((0, reason)).0 += 1;
        }
        for m in outcome.mismatches {
            self.mismatch_count += 1;
            let got = m.got.map_or("none", |g| g.as_str_name());
            *self
                .mismatch_pairs
                .entry(format!("{} -> {got}", m.expected.as_str_name()))
                .or_default() += 1;
            if self.mismatch_examples.len() < MAX_EXAMPLES {
                self.mismatch_examples.push(format!(
                    "batch {} event {}: expected {}, got {got} {}",
                    outcome.batch,
                    m.event_id,
                    m.expected.as_str_name(),
                    m.detail
                ));
            }
        }
    }
}

struct Report {
    run_id: String,
    seed: u64,
    target: String,
    events: u32,
    batch_size: u32,
    concurrency: u32,
    rate: u64,
    tenant_ids: Vec<String>,
    truth: Truth,
    observed: Observed,
    elapsed: Duration,
}

async fn execute(args: &LoadgenArgs) -> anyhow::Result<Report> {
    let seed = args.seed.unwrap_or_else(rand::random);
    let run_id = args.run_id.clone().unwrap_or_else(random_run_id);
    let plan = Plan::build(&PlanSpec {
        seed,
        events: args.events,
        batch_size: args.batch_size as usize,
        concurrency: args.concurrency as usize,
        duplicate_ratio: args.duplicate_ratio,
        conflict_ratio: args.conflict_ratio,
        invalid_ratio: args.invalid_ratio,
        late_ratio: args.late_ratio,
    })?;
    let generator = Generator::new(seed, &run_id, args);
    let total_events: usize = plan.batches.iter().map(Vec::len).sum();
    if !args.quiet {
        eprintln!(
            "loadgen: run {run_id} seed {seed}: {} events ({} unique) in {} calls to {}",
            total_events,
            args.events,
            plan.batches.len(),
            args.target
        );
    }
    let client = connect(args).await?;

    let mut truth = Truth::new(generator.tenant_ids.len());
    let mut observed = Observed::default();
    let mut occurred_at = vec![0_i64; plan.kinds.len()];
    let mut acked = vec![false; plan.batches.len()];
    let mut inflight: JoinSet<CallResult> = JoinSet::new();
    let mut acked_events: u64 = 0;
    let mut next = 0;
    let started = Instant::now();
    let mut last_progress = started;

    loop {
        let can_send = next < plan.batches.len()
            && inflight.len() < args.concurrency as usize
            && plan.ready(next, &acked);
        if can_send {
            if args.rate > 0 {
                let due = started + Duration::from_secs_f64(truth.sent as f64 / args.rate as f64);
                if due > Instant::now() {
                    tokio::select! {
                        _ = tokio::time::sleep_until(due.into()) => {}
                        Some(joined) = inflight.join_next() => {
                            acked_events += settle(joined, args, &mut acked, &mut observed)?;
                        }
                    }
                    continue;
                }
            }
            let now_micros = chrono::Utc::now().timestamp_micros();
            let mut events = Vec::with_capacity(plan.batches[next].len());
            let mut expected = Vec::with_capacity(plan.batches[next].len());
            for &item in &plan.batches[next] {
                let kind = plan.kinds[item.original() as usize];
                let generated = generator.item(item, kind, &mut occurred_at, now_micros);
                let status = truth.record(item, kind, &generated);
                expected.push((status, generated.event.event_id.clone()));
                events.push(generated.event);
            }
            truth.calls += 1;
            let request = IngestUsageRequest {
                events,
                omit_accepted_results: args.omit_accepted_results,
            };
            inflight.spawn(call(client.clone(), next, request, expected, args.retries));
            next += 1;
            continue;
        }
        match inflight.join_next().await {
            Some(joined) => acked_events += settle(joined, args, &mut acked, &mut observed)?,
            None if next >= plan.batches.len() => break,
            None => bail!("internal error: batch {next} waits for a batch that was never sent"),
        }
        if !args.quiet && last_progress.elapsed() >= Duration::from_secs(5) {
            last_progress = Instant::now();
            let elapsed = started.elapsed().as_secs_f64();
            eprintln!(
                "loadgen: {acked_events}/{total_events} events acknowledged in {elapsed:.1} s \
                 ({:.0} events/s)",
                acked_events as f64 / elapsed
            );
        }
    }
    let elapsed = started.elapsed();
    Ok(Report {
        run_id,
        seed,
        target: args.target.clone(),
        events: args.events,
        batch_size: args.batch_size,
        concurrency: args.concurrency,
        rate: args.rate,
        tenant_ids: generator.tenant_ids,
        truth,
        observed,
        elapsed,
    })
}

/// Takes one finished call into account; a failed call ends the run (in-flight calls are
/// dropped with the JoinSet).
fn settle(
    joined: Result<CallResult, tokio::task::JoinError>,
    args: &LoadgenArgs,
    acked: &mut [bool],
    observed: &mut Observed,
) -> anyhow::Result<u64> {
    let done = acked.iter().filter(|a| **a).count();
    match joined.context("an IngestUsage call task failed")? {
        Ok(outcome) => {
            acked[outcome.batch] = true;
            let events = outcome.events as u64;
            observed.absorb(outcome);
            Ok(events)
        }
        Err((batch, status)) => bail!(
            "{} (call for batch {batch}; {done} calls had been acknowledged)",
            describe_status(&args.target, &status)
        ),
    }
}

fn random_run_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..6)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------------

struct Latency {
    p50: f64,
    p95: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

impl Report {
    fn latency_ms(&self) -> Latency {
        let mut sorted = self.observed.latencies_us.clone();
        sorted.sort_unstable();
        let ms = |us: u64| us as f64 / 1_000.0;
        // Nearest rank.
        let at = |q: f64| {
            if sorted.is_empty() {
                return 0.0;
            }
            let rank = (q * sorted.len() as f64).ceil() as usize;
            ms(sorted[rank.clamp(1, sorted.len()) - 1])
        };
        let mean = if sorted.is_empty() {
            0.0
        } else {
            sorted.iter().map(|&us| ms(us)).sum::<f64>() / sorted.len() as f64
        };
        Latency {
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
            max: sorted.last().map_or(0.0, |&us| ms(us)),
            mean,
        }
    }

    fn events_per_s(&self, events: u64) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            events as f64 / secs
        } else {
            0.0
        }
    }

    /// Why the run failed its check, if it did.
    fn problem(&self) -> Option<String> {
        let (want, got) = (self.truth.expected, self.observed.server);
        let mut problems = Vec::new();
        if want != got {
            problems.push(format!(
                "server summary differs from the ground truth: accepted {} (expected {}), \
                 duplicate {} (expected {}), conflict {} (expected {}), invalid {} (expected {})",
                got.accepted,
                want.accepted,
                got.duplicate,
                want.duplicate,
                got.conflict,
                want.conflict,
                got.invalid,
                want.invalid
            ));
        }
        if self.observed.mismatch_count > 0 {
            problems.push(format!(
                "{} per-event results differ from the ground truth",
                self.observed.mismatch_count
            ));
        }
        if self.observed.calls_without_summary > 0 {
            problems.push(format!(
                "{} responses had no summary",
                self.observed.calls_without_summary
            ));
        }
        (!problems.is_empty()).then(|| problems.join("; "))
    }

    fn render_text(&self) -> String {
        let t = &self.truth;
        let o = &self.observed;
        let mut s = String::new();
        let rate = if self.rate == 0 {
            "max".to_owned()
        } else {
            format!("{}/s", self.rate)
        };
        let _ = writeln!(
            s,
            "tokenmeter loadgen: run {} (seed {})",
            self.run_id, self.seed
        );
        let _ = writeln!(
            s,
            "target {}  events {}  batch {}  concurrency {}  rate {rate}",
            self.target, self.events, self.batch_size, self.concurrency
        );
        let _ = writeln!(s, "\nsent {} events in {} calls", t.sent, t.calls);
        t.write_sent(&mut s);

        let _ = writeln!(s, "\nstatus       expected       server");
        let (want, got) = (t.expected, o.server);
        for (name, w, g) in [
            ("accepted", want.accepted, got.accepted),
            ("duplicate", want.duplicate, got.duplicate),
            ("conflict", want.conflict, got.conflict),
            ("invalid", want.invalid, got.invalid),
        ] {
            let verdict = if w == g { "ok" } else { "MISMATCH" };
            let _ = writeln!(s, "{name:<10} {w:>10} {g:>12}  {verdict}");
        }
        let _ = writeln!(s, "per-event mismatches: {}", o.mismatch_count);
        for (pair, n) in &o.mismatch_pairs {
            let _ = writeln!(s, "  {pair}: {n}");
        }
        for example in &o.mismatch_examples {
            let _ = writeln!(s, "  e.g. {example}");
        }
        if o.calls_without_summary > 0 {
            let _ = writeln!(s, "responses without summary: {}", o.calls_without_summary);
        }
        if o.retried_calls > 0 {
            let _ = writeln!(
                s,
                "calls retried after UNAVAILABLE / RESOURCE_EXHAUSTED: {} ({} retries)",
                o.retried_calls, o.retries
            );
        }
        let _ = writeln!(s, "unpriced (of returned results): {}", o.unpriced);
        if !o.invalid_fields.is_empty() {
            let _ = writeln!(s, "INVALID results by field (first reason seen):");
            for (field, (n, reason)) in &o.invalid_fields {
                let _ = writeln!(s, "  {n:>8}  {field}: {reason}");
            }
        }

        t.write_tokens(&mut s, &self.tenant_ids);

        let latency = self.latency_ms();
        let _ = writeln!(s, "\nperformance");
        let _ = writeln!(s, "  elapsed        {:.3} s", self.elapsed.as_secs_f64());
        let _ = writeln!(s, "  events/s       {:.0}", self.events_per_s(t.sent));
        let _ = writeln!(
            s,
            "  accepted/s     {:.0}",
            self.events_per_s(o.server.accepted)
        );
        let _ = writeln!(
            s,
            "  call latency   p50 {:.2} ms  p95 {:.2} ms  p99 {:.2} ms  max {:.2} ms  mean {:.2} ms \
             ({} calls)",
            latency.p50,
            latency.p95,
            latency.p99,
            latency.max,
            latency.mean,
            o.latencies_us.len()
        );
        let verdict = match self.problem() {
            None => "OK: the server's answers match the ground truth".to_owned(),
            Some(problem) => format!("FAILED: {problem}"),
        };
        let _ = writeln!(s, "\n{verdict}");
        s
    }

    fn to_json(&self) -> serde_json::Value {
        let t = &self.truth;
        let o = &self.observed;
        let latency = self.latency_ms();
        let mut report = serde_json::json!({
            "run_id": self.run_id,
            "seed": self.seed,
            "target": self.target,
            "options": {
                "events": self.events,
                "batch_size": self.batch_size,
                "concurrency": self.concurrency,
                "rate": self.rate,
                "tenants": self.tenant_ids.len(),
            },
            "server": o.server.to_json(),
            "per_event_mismatches": o.mismatch_count,
            "mismatch_pairs": o.mismatch_pairs,
            "mismatch_examples": o.mismatch_examples,
            "responses_without_summary": o.calls_without_summary,
            "retried_calls": o.retried_calls,
            "retries": o.retries,
            "unpriced": o.unpriced,
            "invalid_by_field": o.invalid_fields.iter().map(|(field, (n, reason))| {
                (field.clone(), serde_json::json!({"count": n, "example_reason": reason}))
            }).collect::<serde_json::Map<_, _>>(),
            "performance": {
                "elapsed_s": self.elapsed.as_secs_f64(),
                "events_per_s": self.events_per_s(t.sent),
                "accepted_per_s": self.events_per_s(o.server.accepted),
                "calls": o.latencies_us.len(),
                "latency_ms": {
                    "p50": latency.p50,
                    "p95": latency.p95,
                    "p99": latency.p99,
                    "max": latency.max,
                    "mean": latency.mean,
                },
            },
            "ok": self.problem().is_none(),
            "problem": self.problem(),
        });
        t.add_json(&mut report, &self.tenant_ids);
        report["sent"]["calls"] = t.calls.into();
        report
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};
    use std::sync::Mutex;

    use clap::Parser;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::{Request, Response, Status};

    use super::*;
    use crate::proto::v1::IngestSummary;
    use crate::proto::v1::usage_service_server::{UsageService, UsageServiceServer};

    #[derive(Parser)]
    pub(super) struct TestCli {
        #[command(flatten)]
        pub(super) args: LoadgenArgs,
    }

    pub(super) fn args(extra: &[&str]) -> LoadgenArgs {
        let argv = ["loadgen", "--quiet"].iter().chain(extra);
        TestCli::try_parse_from(argv).expect("valid arguments").args
    }

    pub(super) fn spec(args: &LoadgenArgs, seed: u64) -> PlanSpec {
        PlanSpec {
            seed,
            events: args.events,
            batch_size: args.batch_size as usize,
            concurrency: args.concurrency as usize,
            duplicate_ratio: args.duplicate_ratio,
            conflict_ratio: args.conflict_ratio,
            invalid_ratio: args.invalid_ratio,
            late_ratio: args.late_ratio,
        }
    }

    pub(super) const NOW: i64 = 1_767_225_600_000_000; // 2026-01-01T00:00:00Z

    /// Every event of the plan as sent, in order, with the generator's view of it.
    pub(super) fn materialize(plan: &Plan, generator: &Generator) -> Vec<(Item, Generated)> {
        let mut occurred_at = vec![0; plan.kinds.len()];
        let mut out = Vec::new();
        for batch in &plan.batches {
            for &item in batch {
                let kind = plan.kinds[item.original() as usize];
                out.push((item, generator.item(item, kind, &mut occurred_at, NOW)));
            }
        }
        out
    }

    /// The proto comments' normalization rules, transcribed independently of the generator.
    fn normalize(usage: &Usage) -> Result<Buckets, String> {
        let mut b = [0_i64; CLASS_COUNT];
        let total = match usage {
            Usage::Tokens(t) => {
                b = [
                    t.input,
                    t.cache_read,
                    t.cache_write_5m,
                    t.cache_write_1h,
                    t.output,
                    t.reasoning,
                    t.input_audio,
                    t.output_audio,
                    t.input_image,
                    t.output_image,
                    t.cache_write_30m,
                    t.cache_write_12h,
                ];
                None
            }
            Usage::OpenaiChat(u) => {
                let p = u.prompt_tokens_details.clone().unwrap_or_default();
                let c = u.completion_tokens_details.unwrap_or_default();
                if p.cache_creation.is_some() {
                    return Err("qwen cache_creation splits are not generated".into());
                }
                b[CACHE_READ] = p.cached_tokens;
                b[CACHE_WRITE_30M] = p.cache_write_tokens;
                b[CACHE_WRITE_5M] = p.cache_creation_input_tokens;
                b[INPUT_AUDIO] = p.audio_tokens;
                b[INPUT_IMAGE] = p.image_tokens;
                b[INPUT] = u.prompt_tokens
                    - p.cached_tokens
                    - p.cache_write_tokens
                    - p.cache_creation_input_tokens
                    - p.audio_tokens
                    - p.image_tokens;
                b[REASONING] = c.reasoning_tokens;
                b[OUTPUT_AUDIO] = c.audio_tokens;
                b[OUTPUT_IMAGE] = c.image_tokens;
                b[OUTPUT] =
                    u.completion_tokens - c.reasoning_tokens - c.audio_tokens - c.image_tokens;
                u.total_tokens
            }
            Usage::OpenaiResponses(u) => {
                let i = u.input_tokens_details.unwrap_or_default();
                let o = u.output_tokens_details.unwrap_or_default();
                b[CACHE_READ] = i.cached_tokens;
                match i.cache_write_tokens_details {
                    Some(d) => {
                        b[CACHE_WRITE_30M] = d.ttl_30m_tokens;
                        b[CACHE_WRITE_12H] = d.ttl_12h_tokens;
                    }
                    None => b[CACHE_WRITE_30M] = i.cache_write_tokens,
                }
                b[INPUT_AUDIO] = i.audio_tokens;
                b[INPUT_IMAGE] = i.image_tokens;
                b[INPUT] = u.input_tokens
                    - i.cached_tokens
                    - i.cache_write_tokens
                    - i.audio_tokens
                    - i.image_tokens;
                b[REASONING] = o.reasoning_tokens;
                b[OUTPUT_AUDIO] = o.audio_tokens;
                b[OUTPUT_IMAGE] = o.image_tokens;
                b[OUTPUT] = u.output_tokens - o.reasoning_tokens - o.audio_tokens - o.image_tokens;
                u.total_tokens
            }
            Usage::Anthropic(u) => {
                b[INPUT] = u.input_tokens;
                b[CACHE_READ] = u.cache_read_input_tokens;
                b[REASONING] = u.output_tokens_details.map_or(0, |d| d.thinking_tokens);
                b[OUTPUT] = u.output_tokens - b[REASONING];
                match u.cache_creation {
                    Some(cc) => {
                        if cc.ephemeral_5m_input_tokens + cc.ephemeral_1h_input_tokens
                            != u.cache_creation_input_tokens
                        {
                            return Err("anthropic.cache_creation: does not add up".into());
                        }
                        b[CACHE_WRITE_5M] = cc.ephemeral_5m_input_tokens;
                        b[CACHE_WRITE_1H] = cc.ephemeral_1h_input_tokens;
                    }
                    None => b[CACHE_WRITE_5M] = u.cache_creation_input_tokens,
                }
                None
            }
            Usage::Dashscope(_) => return Err("dashscope usage is not generated".into()),
            Usage::Gemini(u) => {
                let of = |list: &[GeminiModalityTokenCount], m: &str| -> i64 {
                    list.iter()
                        .filter(|x| x.modality == m)
                        .map(|x| x.token_count)
                        .sum()
                };
                b[CACHE_READ] = u.cached_content_token_count;
                for (class, m) in [(INPUT_AUDIO, "AUDIO"), (INPUT_IMAGE, "IMAGE")] {
                    b[class] = of(&u.prompt_tokens_details, m)
                        + of(&u.tool_use_prompt_tokens_details, m)
                        - of(&u.cache_tokens_details, m);
                }
                b[INPUT] = u.prompt_token_count + u.tool_use_prompt_token_count
                    - b[CACHE_READ]
                    - b[INPUT_AUDIO]
                    - b[INPUT_IMAGE];
                b[OUTPUT_AUDIO] = of(&u.candidates_tokens_details, "AUDIO");
                b[OUTPUT_IMAGE] = of(&u.candidates_tokens_details, "IMAGE");
                b[OUTPUT] = u.candidates_token_count - b[OUTPUT_AUDIO] - b[OUTPUT_IMAGE];
                b[REASONING] = u.thoughts_token_count;
                u.total_token_count
            }
        };
        if let Some(class) = b.iter().position(|&n| n < 0) {
            return Err(format!("{}: must not be negative", CLASS_NAMES[class]));
        }
        if let Some(total) = total
            && total != b.iter().sum::<i64>()
        {
            return Err("total: does not equal the sum of the buckets".into());
        }
        Ok(b)
    }

    fn validate(event: &UsageEvent) -> Result<Buckets, (String, String)> {
        if event.model.is_empty() {
            return Err(("model".into(), "is required".into()));
        }
        let usage = event
            .usage
            .as_ref()
            .ok_or_else(|| ("usage".to_owned(), "is required".to_owned()))?;
        normalize(usage).map_err(|e| ("usage".into(), e))
    }

    #[test]
    fn generated_counts_match_the_ratios_exactly() {
        let args = args(&[
            "--events",
            "10000",
            "--duplicate-ratio",
            "0.1",
            "--conflict-ratio",
            "0.05",
            "--invalid-ratio",
            "0.02",
            "--late-ratio",
            "0.03",
        ]);

        let plan = Plan::build(&spec(&args, 7)).expect("plan");

        let items: Vec<Item> = plan.batches.iter().flatten().copied().collect();
        let count = |f: fn(&Item) -> bool| items.iter().filter(|i| f(i)).count();
        assert_eq!(count(|i| matches!(i, Item::Original(_))), 10_000);
        assert_eq!(count(|i| matches!(i, Item::Duplicate(_))), 1_000);
        assert_eq!(count(|i| matches!(i, Item::Conflict(..))), 500);
        let kinds = |f: fn(&OriginalKind) -> bool| plan.kinds.iter().filter(|k| f(k)).count();
        assert_eq!(kinds(|k| matches!(k, OriginalKind::Invalid(_))), 200);
        assert_eq!(kinds(|k| *k == OriginalKind::Late), 300);
        assert!(plan.batches.iter().all(|b| !b.is_empty() && b.len() <= 100));
    }

    #[test]
    fn resends_follow_their_original_in_a_later_batch_and_spread_over_the_run() {
        let args = args(&[
            "--events",
            "20000",
            "--duplicate-ratio",
            "0.2",
            "--conflict-ratio",
            "0.1",
        ]);

        let plan = Plan::build(&spec(&args, 11)).expect("plan");

        let mut batches_with_resends = HashSet::new();
        for (b, batch) in plan.batches.iter().enumerate() {
            for item in batch {
                if !matches!(item, Item::Original(_)) {
                    let original_batch = plan.batch_of[item.original() as usize] as usize;
                    assert!(
                        original_batch < b,
                        "{item:?} in batch {b}, original in {original_batch}"
                    );
                    batches_with_resends.insert(b);
                }
            }
        }
        // Interleaved with originals, not only appended at the end.
        let batches_of_originals = 20_000 / 100;
        let early = batches_with_resends
            .iter()
            .filter(|&&b| b < batches_of_originals / 2)
            .count();
        assert!(
            early > batches_of_originals / 4,
            "only {early} early batches carry resends"
        );
        for original in plan.batches.iter().flatten().filter_map(|i| match i {
            Item::Original(o) => Some(*o),
            _ => None,
        }) {
            assert_ne!(plan.batch_of[original as usize], u32::MAX);
        }
    }

    #[test]
    fn generation_is_deterministic_for_a_seed() {
        let args = args(&[
            "--events",
            "2000",
            "--conflict-ratio",
            "0.05",
            "--invalid-ratio",
            "0.05",
        ]);
        let run = |seed: u64| {
            let plan = Plan::build(&spec(&args, seed)).expect("plan");
            let generator = Generator::new(seed, "det", &args);
            let events: Vec<UsageEvent> = materialize(&plan, &generator)
                .into_iter()
                .map(|(_, g)| g.event)
                .collect();
            (plan.batches, events)
        };

        let (batches_a, events_a) = run(42);
        let (batches_b, events_b) = run(42);
        let (batches_c, events_c) = run(43);

        assert_eq!(batches_a, batches_b);
        assert_eq!(events_a, events_b);
        assert_ne!(batches_a, batches_c);
        assert_ne!(events_a, events_c);
    }

    #[test]
    fn provider_objects_normalize_to_the_ground_truth_buckets() {
        let args = args(&["--events", "20000", "--provider-object-ratio", "1"]);
        let plan = Plan::build(&spec(&args, 5)).expect("plan");
        let generator = Generator::new(5, "norm", &args);

        let mut shapes = HashSet::new();
        let mut classes = [false; CLASS_COUNT];
        for (_, generated) in materialize(&plan, &generator) {
            let usage = generated.event.usage.as_ref().expect("usage");
            let normalized = normalize(usage).expect("valid provider object");

            assert_eq!(normalized, generated.buckets, "{:?}", generated.event);
            shapes.insert(generated.shape);
            for (seen, n) in classes.iter_mut().zip(generated.buckets) {
                *seen |= n > 0;
            }
        }
        for shape in [
            Shape::OpenAiChat,
            Shape::OpenAiResponses,
            Shape::Anthropic,
            Shape::Gemini,
        ] {
            assert!(shapes.contains(&shape), "no {shape:?} event generated");
        }
        assert!(!shapes.contains(&Shape::Tokens));
        let unseen: Vec<&str> = (0..CLASS_COUNT)
            .filter(|&c| !classes[c])
            .map(|c| CLASS_NAMES[c])
            .collect();
        assert!(unseen.is_empty(), "classes never generated: {unseen:?}");
    }

    #[test]
    fn the_services_normalizer_agrees_with_the_ground_truth() {
        let args = args(&[
            "--events",
            "20000",
            "--provider-object-ratio",
            "0.7",
            "--invalid-ratio",
            "0.05",
        ]);
        let plan = Plan::build(&spec(&args, 13)).expect("plan");
        let generator = Generator::new(13, "svc", &args);

        for (item, generated) in materialize(&plan, &generator) {
            let kind = plan.kinds[item.original() as usize];
            let Some(usage) = generated.event.usage.as_ref() else {
                assert_eq!(kind, OriginalKind::Invalid(InvalidKind::MissingUsage));
                continue;
            };
            let normalized = crate::domain::normalize::normalize(usage);
            match kind {
                OriginalKind::Invalid(
                    InvalidKind::NegativeBucket | InvalidKind::ProviderTotalMismatch,
                ) => assert!(normalized.is_err(), "{kind:?} accepted: {usage:?}"),
                _ => assert_eq!(
                    normalized.map(|t| t.buckets()),
                    Ok(generated.buckets),
                    "{usage:?}"
                ),
            }
        }
    }

    #[test]
    fn hand_worked_openai_chat_usage_counts_cached_tokens_once() {
        let mut b = [0; CLASS_COUNT];
        b[INPUT] = 300;
        b[CACHE_READ] = 1_152;
        b[OUTPUT] = 90;
        b[REASONING] = 128;
        let opts = RenderOpts {
            with_total: true,
            anthropic_cache_creation: true,
            anthropic_web_searches: 0,
            gemini_tool_use: 0,
            openai_predictions: (0, 0),
        };

        let Usage::OpenaiChat(usage) = render_usage(Shape::OpenAiChat, &b, &opts) else {
            panic!("shape")
        };

        assert_eq!(usage.prompt_tokens, 1_452);
        assert_eq!(usage.completion_tokens, 218);
        assert_eq!(usage.total_tokens, Some(1_670));
        assert_eq!(
            usage.prompt_tokens_details.map(|d| d.cached_tokens),
            Some(1_152)
        );
    }

    #[test]
    fn resends_are_identical_or_conflicting_and_invalid_events_are_invalid() {
        let args = args(&[
            "--events",
            "5000",
            "--duplicate-ratio",
            "0.2",
            "--conflict-ratio",
            "0.2",
            "--invalid-ratio",
            "0.1",
            "--provider-object-ratio",
            "0.5",
        ]);
        let plan = Plan::build(&spec(&args, 9)).expect("plan");
        let generator = Generator::new(9, "res", &args);

        let mut originals: HashMap<u32, UsageEvent> = HashMap::new();
        let mut invalid_kinds = HashSet::new();
        for (item, generated) in materialize(&plan, &generator) {
            let event = generated.event;
            match item {
                Item::Original(i) => {
                    match plan.kinds[i as usize] {
                        OriginalKind::Invalid(kind) => {
                            assert!(validate(&event).is_err(), "{kind:?} passed: {event:?}");
                            invalid_kinds.insert(kind);
                        }
                        _ => assert_eq!(validate(&event), Ok(generated.buckets)),
                    }
                    originals.insert(i, event);
                }
                Item::Duplicate(i) => assert_eq!(event, originals[&i]),
                Item::Conflict(i, _) => {
                    let original = &originals[&i];
                    assert_ne!(&event, original);
                    assert_eq!(
                        (&event.tenant_id, &event.source, &event.event_id),
                        (&original.tenant_id, &original.source, &original.event_id)
                    );
                    assert!(validate(&event).is_ok());
                }
            }
        }
        assert_eq!(invalid_kinds.len(), INVALID_KINDS.len());
        let ids: HashSet<(&str, &str, &str)> = originals
            .values()
            .map(|e| (e.tenant_id.as_str(), e.source.as_str(), e.event_id.as_str()))
            .collect();
        assert_eq!(
            ids.len(),
            5_000,
            "identities of unique events must be unique"
        );
    }

    #[test]
    fn late_events_are_up_to_forty_days_old_and_timestamps_are_microseconds() {
        let args = args(&["--events", "3000", "--late-ratio", "0.5"]);
        let plan = Plan::build(&spec(&args, 3)).expect("plan");
        let generator = Generator::new(3, "late", &args);

        for (item, generated) in materialize(&plan, &generator) {
            let at = generated.event.occurred_at.expect("occurred_at");
            let micros = at.seconds * 1_000_000 + i64::from(at.nanos) / 1_000;
            assert_eq!(at.nanos % 1_000, 0);
            let age = NOW - micros;
            if plan.kinds[item.original() as usize] == OriginalKind::Late {
                assert!(
                    (3_600_000_000..=40 * 86_400_000_000).contains(&age),
                    "age {age}"
                );
            } else {
                assert!((0..=2_000_000).contains(&age), "age {age}");
            }
        }
    }

    #[test]
    fn ground_truth_counts_first_seen_valid_events_only() {
        let args = args(&[
            "--events",
            "4000",
            "--duplicate-ratio",
            "0.3",
            "--conflict-ratio",
            "0.1",
            "--invalid-ratio",
            "0.05",
            "--tenants",
            "4",
        ]);
        let plan = Plan::build(&spec(&args, 21)).expect("plan");
        let generator = Generator::new(21, "gt", &args);
        let mut truth = Truth::new(4);
        let mut independent = [0_i64; CLASS_COUNT];

        for (item, generated) in materialize(&plan, &generator) {
            let kind = plan.kinds[item.original() as usize];
            truth.record(item, kind, &generated);
            if matches!(item, Item::Original(_)) && !matches!(kind, OriginalKind::Invalid(_)) {
                add_buckets(
                    &mut independent,
                    &validate(&generated.event).expect("valid"),
                );
            }
        }

        assert_eq!(
            truth.expected,
            Summary {
                accepted: 3_800,
                duplicate: 1_200,
                conflict: 400,
                invalid: 200
            }
        );
        assert_eq!(truth.classes, independent);
        let mut by_tenants = [0_i64; CLASS_COUNT];
        for (_, b) in &truth.tenants {
            add_buckets(&mut by_tenants, b);
        }
        assert_eq!(by_tenants, truth.classes);
        assert_eq!(truth.tenants.iter().map(|(n, _)| n).sum::<u64>(), 3_800);
        assert!(
            truth.tenants[0].0 > truth.tenants[3].0,
            "tenant 0 is the heaviest"
        );
    }

    /// An in-memory IngestUsage with the documented semantics, to run the whole loop against.
    #[derive(Default)]
    struct FakeUsage {
        stored: Mutex<HashMap<(String, String, String), UsageEvent>>,
    }

    #[tonic::async_trait]
    impl UsageService for FakeUsage {
        async fn ingest_usage(
            &self,
            request: Request<IngestUsageRequest>,
        ) -> Result<Response<IngestUsageResponse>, Status> {
            let request = request.into_inner();
            let mut stored = self.stored.lock().expect("lock");
            let mut summary = IngestSummary::default();
            let mut results = Vec::new();
            for (index, event) in request.events.into_iter().enumerate() {
                let mut result = EventResult {
                    index: index as i32,
                    event_id: event.event_id.clone(),
                    ..Default::default()
                };
                let key = (
                    event.tenant_id.clone(),
                    event.source.clone(),
                    event.event_id.clone(),
                );
                let status = match validate(&event) {
                    Err((field, reason)) => {
                        result.field = field;
                        result.reason = reason;
                        IngestStatus::Invalid
                    }
                    Ok(_) => match stored.get(&key) {
                        Some(existing) if *existing == event => IngestStatus::Duplicate,
                        Some(_) => IngestStatus::Conflict,
                        None => {
                            stored.insert(key, event);
                            IngestStatus::Accepted
                        }
                    },
                };
                match status {
                    IngestStatus::Accepted => summary.accepted += 1,
                    IngestStatus::Duplicate => summary.duplicate += 1,
                    IngestStatus::Conflict => summary.conflict += 1,
                    _ => summary.invalid += 1,
                }
                result.status = status as i32;
                if !(request.omit_accepted_results && status == IngestStatus::Accepted) {
                    results.push(result);
                }
            }
            Ok(Response::new(IngestUsageResponse {
                results,
                summary: Some(summary),
            }))
        }
    }

    struct Unimplemented;
    impl UsageService for Unimplemented {}

    async fn serve<S: UsageService>(service: S) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(UsageServiceServer::new(service))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn a_run_against_a_correct_server_matches_the_ground_truth() {
        let target = serve(FakeUsage::default()).await;
        let args = args(&[
            "--target",
            &target,
            "--events",
            "3000",
            "--batch-size",
            "50",
            "--concurrency",
            "4",
            "--duplicate-ratio",
            "0.2",
            "--conflict-ratio",
            "0.1",
            "--invalid-ratio",
            "0.05",
            "--late-ratio",
            "0.05",
            "--provider-object-ratio",
            "0.5",
            "--seed",
            "1",
        ]);

        let report = execute(&args).await.expect("run");

        assert_eq!(report.problem(), None, "{}", report.render_text());
        assert_eq!(report.observed.server, report.truth.expected);
        assert_eq!(report.truth.expected.accepted, 2_850);
        assert_eq!(report.truth.sent, 3_000 + 600 + 300);
        let json = report.to_json();
        assert_eq!(json["ok"], true);
        assert_eq!(json["expected"]["conflict"], 300);
        assert!(
            report
                .render_text()
                .contains("OK: the server's answers match")
        );
    }

    #[tokio::test]
    async fn omitted_accepted_results_still_check_the_rest() {
        let target = serve(FakeUsage::default()).await;
        let args = args(&[
            "--target",
            &target,
            "--events",
            "1000",
            "--invalid-ratio",
            "0.1",
            "--omit-accepted-results",
            "--rate",
            "20000",
        ]);

        let report = execute(&args).await.expect("run");

        assert_eq!(report.problem(), None, "{}", report.render_text());
        let invalid: u64 = report
            .observed
            .invalid_fields
            .values()
            .map(|(n, _)| n)
            .sum();
        assert_eq!(invalid, 100);
    }

    #[tokio::test]
    async fn a_server_that_counts_wrong_is_reported() {
        // A server that forgets everything between calls answers ACCEPTED for resends.
        struct Forgetful;
        #[tonic::async_trait]
        impl UsageService for Forgetful {
            async fn ingest_usage(
                &self,
                request: Request<IngestUsageRequest>,
            ) -> Result<Response<IngestUsageResponse>, Status> {
                FakeUsage::default().ingest_usage(request).await
            }
        }
        let target = serve(Forgetful).await;
        let args = args(&[
            "--target",
            &target,
            "--events",
            "1000",
            "--duplicate-ratio",
            "0.1",
        ]);

        let report = execute(&args).await.expect("run");

        // (Two resends of one event in the same call are still caught by this server.)
        let problem = report.problem().expect("a mismatch");
        assert!(report.observed.server.accepted > 1_000, "{problem}");
        assert!(problem.contains("(expected 1000)"), "{problem}");
        let wrong =
            report.observed.mismatch_pairs["INGEST_STATUS_DUPLICATE -> INGEST_STATUS_ACCEPTED"];
        assert_eq!(wrong, report.observed.server.accepted - 1_000);
    }

    /// Answers the first attempt of every call UNAVAILABLE without touching its store.
    #[derive(Default)]
    struct Flaky {
        seen: Mutex<HashSet<String>>,
        inner: FakeUsage,
    }

    #[tonic::async_trait]
    impl UsageService for Flaky {
        async fn ingest_usage(
            &self,
            request: Request<IngestUsageRequest>,
        ) -> Result<Response<IngestUsageResponse>, Status> {
            // The call's identity is all its event ids: a conflicting event reuses an id, so
            // the first id alone can repeat across calls and spare one its failure.
            let call: Vec<&str> = request
                .get_ref()
                .events
                .iter()
                .map(|e| e.event_id.as_str())
                .collect();
            if self.seen.lock().expect("lock").insert(call.join(",")) {
                return Err(Status::unavailable(
                    "storage unavailable, retry with backoff",
                ));
            }
            self.inner.ingest_usage(request).await
        }
    }

    #[tokio::test]
    async fn unavailable_calls_are_retried_when_asked_and_fail_the_run_otherwise() {
        let target = serve(Flaky::default()).await;
        let with_retries = args(&[
            "--target",
            &target,
            "--events",
            "2000",
            "--conflict-ratio",
            "0.05",
            "--retries",
            "2",
        ]);
        let without = args(&["--target", &target, "--events", "2000"]);

        let report = execute(&with_retries).await.expect("run");
        let error = execute(&without).await.err().expect("an error");

        assert_eq!(report.problem(), None, "{}", report.render_text());
        assert_eq!(report.observed.retried_calls, report.truth.calls);
        let error = format!("{error:#}");
        assert!(
            error.contains("Unavailable") && error.contains("retry with backoff"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn an_unimplemented_server_fails_fast_with_a_clear_error() {
        let target = serve(Unimplemented).await;
        let args = args(&["--target", &target, "--events", "100000"]);

        let result = tokio::time::timeout(Duration::from_secs(20), execute(&args))
            .await
            .expect("must not hang");

        let error = format!("{:#}", result.err().expect("an error"));
        assert!(
            error.contains("does not implement tokenmeter.v1.UsageService/IngestUsage"),
            "{error}"
        );
        assert!(error.contains("UNIMPLEMENTED"), "{error}");
    }

    #[tokio::test]
    async fn an_unreachable_target_fails_with_a_clear_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let target = format!("http://{}", listener.local_addr().expect("addr"));
        drop(listener);
        let args = args(&["--target", &target, "--events", "10"]);

        let error = execute(&args).await.err().expect("an error");

        assert!(
            format!("{error:#}").contains("cannot connect to"),
            "{error:#}"
        );
    }

    #[test]
    fn bad_options_are_rejected_naming_the_option() {
        for bad in [
            vec!["--events", "0"],
            vec!["--invalid-ratio", "1.5"],
            vec!["--duplicate-ratio", "11"],
            vec!["--run-id", "has space"],
            vec!["--batch-size", "0"],
        ] {
            let argv = ["loadgen"].into_iter().chain(bad.iter().copied());
            let error = TestCli::try_parse_from(argv).err().expect("rejected");
            assert!(error.to_string().contains(bad[0]), "{error}");
        }
        let args = args(&[
            "--invalid-ratio",
            "0.6",
            "--late-ratio",
            "0.6",
            "--events",
            "10",
        ]);
        assert!(Plan::build(&spec(&args, 1)).is_err());
    }
}

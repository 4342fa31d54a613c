//! The consumer: a consumer-group member on `kafka.consumer.usage_topic` (and
//! `transactions_topic`) feeding the same pipelines as gRPC.
//!
//! Exactly-once rests on Postgres, not on Kafka: each batch's events and the positions it
//! covers commit in one transaction (`kafka_offsets`), and on assignment the consumer seeks to
//! those positions. A batch replayed after a crash or a rebalance finds its events already
//! stored (DUPLICATE) and moves nothing. The Kafka group commit is advisory (for lag tools).
//!
//! Threads: one OS thread polls librdkafka and runs the rebalance callbacks, which may block
//! (reading positions from Postgres, waiting for in-flight batches). Batches go to
//! `kafka.consumer.writers` async writers; each owns the partitions `p % writers == lane`, so a
//! partition's batches commit in order and a stored position never passes an unwritten message.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use rdkafka::Message;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use sqlx::PgPool;
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use super::dead_letter::{DeadLetter, DeadLetterGuard, DeadLetterProducer, Stage};
use crate::config::{ConsumerSettings, KafkaSettings};
use crate::domain::FieldError;
use crate::ingest::codec;
use crate::ingest::transactions::TransactionRecorder;
use crate::ingest::{Channel, ConsumedBatch, IngestError, Ingestor};
use crate::store::offsets::{self, PartitionOffset};

/// Whether the consumer runs, and why it stopped if it did; `/readyz` reports it.
#[derive(Clone, Default)]
pub struct ConsumerStatus(Arc<Mutex<Option<String>>>);

impl ConsumerStatus {
    /// `None` while consuming; the reason once stopped on its own.
    pub fn stopped_reason(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn stop_with(&self, reason: String) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
        }
    }
}

/// Metrics of the consumer; event outcomes are counted by the pipeline (channel `kafka`).
#[derive(Clone)]
pub struct ConsumerMetrics {
    messages: IntCounterVec,
    dead_letters: IntCounterVec,
    batch_messages: Histogram,
    batch_seconds: Histogram,
    batch_failures: IntCounter,
    end_to_end_seconds: Histogram,
    lag: IntGaugeVec,
    rebalances: IntCounterVec,
    running: IntGauge,
    paused: IntGauge,
}

impl ConsumerMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let messages = IntCounterVec::new(
            Opts::new(
                "tokenmeter_kafka_messages_total",
                "Messages consumed, by topic",
            ),
            &["topic"],
        )?;
        let dead_letters = IntCounterVec::new(
            Opts::new(
                "tokenmeter_kafka_dead_letters_total",
                "Messages written to the dead-letter topic, by stage (decode or validate)",
            ),
            &["stage"],
        )?;
        let batch_messages = Histogram::with_opts(
            HistogramOpts::new(
                "tokenmeter_kafka_batch_messages",
                "Messages per committed batch",
            )
            .buckets(vec![
                1.0, 10.0, 100.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0,
            ]),
        )?;
        let batch_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "tokenmeter_kafka_batch_flush_seconds",
                "Time to decode, dead-letter and commit one batch",
            )
            .buckets(prometheus::exponential_buckets(0.001, 2.0, 14)?),
        )?;
        let batch_failures = IntCounter::new(
            "tokenmeter_kafka_batch_failures_total",
            "Batch writes that failed and were retried",
        )?;
        let end_to_end_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "tokenmeter_kafka_end_to_end_seconds",
                "From the message's Kafka timestamp to its commit in Postgres (in reports from then on)",
            )
            .buckets(prometheus::exponential_buckets(0.005, 2.0, 14)?),
        )?;
        let lag = IntGaugeVec::new(
            Opts::new(
                "tokenmeter_kafka_consumer_lag",
                "Messages in a partition beyond the position committed in Postgres",
            ),
            &["topic", "partition"],
        )?;
        let rebalances = IntCounterVec::new(
            Opts::new(
                "tokenmeter_kafka_rebalances_total",
                "Partition assignments and revocations",
            ),
            &["kind"],
        )?;
        let running = IntGauge::new(
            "tokenmeter_kafka_consumer_running",
            "1 while the usage consumer consumes, 0 once it has stopped",
        )?;
        registry.register(Box::new(messages.clone()))?;
        registry.register(Box::new(dead_letters.clone()))?;
        registry.register(Box::new(batch_messages.clone()))?;
        registry.register(Box::new(batch_seconds.clone()))?;
        registry.register(Box::new(batch_failures.clone()))?;
        registry.register(Box::new(end_to_end_seconds.clone()))?;
        registry.register(Box::new(lag.clone()))?;
        registry.register(Box::new(rebalances.clone()))?;
        let paused = IntGauge::new(
            "tokenmeter_kafka_consumer_paused",
            "1 while the assignment is paused because too many messages are read but not committed",
        )?;
        registry.register(Box::new(running.clone()))?;
        registry.register(Box::new(paused.clone()))?;
        for stage in [Stage::Decode, Stage::Validate] {
            dead_letters.with_label_values(&[stage.as_str()]);
        }
        for kind in ["assign", "revoke"] {
            rebalances.with_label_values(&[kind]);
        }
        Ok(Self {
            messages,
            dead_letters,
            batch_messages,
            batch_seconds,
            batch_failures,
            end_to_end_seconds,
            lag,
            rebalances,
            running,
            paused,
        })
    }
}

/// What the poll thread, the rebalance callbacks and the writers share.
struct Shared {
    /// Messages read but not handed to a writer yet, per lane. Cleared on revocation (their
    /// positions were never stored, so the next owner reads them again).
    pending: Mutex<Vec<Vec<OwnedMessage>>>,
    /// Messages handed to writers and not yet committed (or given up).
    in_flight: Mutex<usize>,
    idle: Condvar,
    /// Next offset committed in Postgres per partition, for the lag gauge.
    positions: Mutex<HashMap<(String, i32), i64>>,
    /// Bumped by every revocation, so the poll loop forgets that it paused partitions.
    revocations: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn dispatched(&self, n: usize) {
        *self.in_flight.lock().unwrap_or_else(|e| e.into_inner()) += n;
    }

    fn finished(&self, n: usize) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        *in_flight = in_flight.saturating_sub(n);
        if *in_flight == 0 {
            self.idle.notify_all();
        }
    }

    fn in_flight(&self) -> usize {
        *self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks until every dispatched batch has committed, or `timeout`.
    fn wait_idle(&self, timeout: Duration) -> bool {
        let in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let (in_flight, _) = self
            .idle
            .wait_timeout_while(in_flight, timeout, |n| *n > 0)
            .unwrap_or_else(|e| e.into_inner());
        *in_flight == 0
    }
}

/// Rebalance and statistics callbacks, run on the poll thread.
struct Callbacks {
    pool: PgPool,
    runtime: Handle,
    group: String,
    shared: Arc<Shared>,
    metrics: ConsumerMetrics,
}

/// How long a revocation waits for in-flight batches before giving the partitions up anyway
/// (a late batch then only produces duplicates, and its position cannot rewind the new owner).
const REVOKE_DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

impl ClientContext for Callbacks {
    fn stats(&self, statistics: Statistics) {
        let positions = self
            .shared
            .positions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                if let Some(position) = positions.get(&(topic.clone(), *partition))
                    && p.hi_offset >= 0
                {
                    self.metrics
                        .lag
                        .with_label_values(&[topic, &partition.to_string()])
                        .set((p.hi_offset - position).max(0));
                }
            }
        }
    }
}

impl ConsumerContext for Callbacks {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.metrics.rebalances.with_label_values(&["assign"]).inc();
                self.seek_to_stored(tpl);
                tracing::info!(partitions = ?describe(tpl), "kafka partitions assigned");
                if let Err(e) = consumer.assign(tpl) {
                    tracing::error!(error = %e, "kafka assign failed");
                }
                // librdkafka keeps a partition's application pause across an unassign and a
                // new assign of the same partition: a member paused for backpressure when the
                // group rebalanced would get its partitions back paused and never fetch them
                // again, while the poll loop believes a new assignment starts unpaused.
                if let Err(e) = consumer.resume(tpl) {
                    tracing::error!(error = %e, "kafka resume of the new assignment failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.metrics.rebalances.with_label_values(&["revoke"]).inc();
                self.revoke(tpl);
                if let Err(e) = consumer.unassign() {
                    tracing::error!(error = %e, "kafka unassign failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "kafka rebalance error; dropping the assignment");
                self.revoke(tpl);
                let _ = consumer.unassign();
            }
        }
    }
}

impl Callbacks {
    /// Starts each assigned partition at the position stored in Postgres; a partition never
    /// stored starts at the beginning (the Kafka group commit is advisory, never trusted).
    /// If Postgres cannot answer, the Kafka commit is used: it is written only after the
    /// Postgres commit, so it is never ahead and at worst replays duplicates.
    fn seek_to_stored(&self, tpl: &mut TopicPartitionList) {
        let mut by_topic: BTreeMap<String, Vec<i32>> = BTreeMap::new();
        for element in tpl.elements() {
            by_topic
                .entry(element.topic().to_owned())
                .or_default()
                .push(element.partition());
        }
        for (topic, partitions) in by_topic {
            let stored = self.load_positions(&topic, &partitions);
            let Some(stored) = stored else {
                continue;
            };
            let stored: HashMap<i32, i64> = stored.into_iter().collect();
            let mut positions = self
                .shared
                .positions
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for partition in partitions {
                let offset = match stored.get(&partition) {
                    Some(&next) => {
                        positions.insert((topic.clone(), partition), next);
                        Offset::Offset(next)
                    }
                    None => Offset::Beginning,
                };
                if let Err(e) = tpl.set_partition_offset(&topic, partition, offset) {
                    tracing::error!(error = %e, topic, partition, "cannot set start offset");
                }
            }
        }
    }

    fn load_positions(&self, topic: &str, partitions: &[i32]) -> Option<Vec<(i32, i64)>> {
        for attempt in 0..5u32 {
            let loaded =
                self.runtime
                    .block_on(offsets::load(&self.pool, &self.group, topic, partitions));
            match loaded {
                Ok(rows) => return Some(rows),
                Err(e) => {
                    tracing::warn!(error = %e, topic, attempt, "cannot read stored kafka positions");
                    std::thread::sleep(Duration::from_millis(200 << attempt));
                }
            }
        }
        tracing::error!(
            topic,
            "stored kafka positions unavailable; starting from the group's Kafka commit"
        );
        None
    }

    /// Forgets unwritten messages and waits for the written ones to commit, so nothing this
    /// member read is stored after the partitions have moved on.
    fn revoke(&self, tpl: &TopicPartitionList) {
        self.shared
            .revocations
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        for lane in self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter_mut()
        {
            lane.clear();
        }
        if !self.shared.wait_idle(REVOKE_DRAIN_TIMEOUT) {
            tracing::warn!(
                timeout = ?REVOKE_DRAIN_TIMEOUT,
                "batches still in flight at revocation; their events may come back as duplicates"
            );
        }
        let mut positions = self
            .shared
            .positions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for element in tpl.elements() {
            positions.remove(&(element.topic().to_owned(), element.partition()));
            let _ = self
                .metrics
                .lag
                .remove_label_values(&[element.topic(), &element.partition().to_string()]);
        }
        tracing::info!(partitions = ?describe(tpl), "kafka partitions revoked");
    }
}

fn describe(tpl: &TopicPartitionList) -> Vec<String> {
    tpl.elements()
        .iter()
        .map(|e| format!("{}/{}", e.topic(), e.partition()))
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("kafka consumer configuration rejected: {0}")]
    Config(KafkaError),
    #[error("cannot subscribe to {topic}: {source}")]
    Subscribe {
        topic: String,
        #[source]
        source: KafkaError,
    },
}

/// A consumer built and subscribed; [`UsageConsumer::run`] consumes until told to stop.
pub struct UsageConsumer {
    consumer: Arc<BaseConsumer<Callbacks>>,
    writer: Arc<BatchWriter>,
    shared: Arc<Shared>,
    settings: ConsumerSettings,
    status: ConsumerStatus,
}

impl UsageConsumer {
    /// Creates the consumer and its dead-letter producer (so bad client settings fail at start)
    /// and subscribes. Must be called inside the Tokio runtime that will run the writers.
    pub fn new(
        kafka: &KafkaSettings,
        pool: PgPool,
        ingestor: Arc<Ingestor>,
        transactions: Arc<TransactionRecorder>,
        metrics: ConsumerMetrics,
    ) -> Result<Self, ConsumerError> {
        let settings = kafka.consumer.clone();
        let transactions_topic =
            Some(settings.transactions_topic.clone()).filter(|t| !t.is_empty());
        let base = super::client_config(kafka);
        let shared = Arc::new(Shared {
            pending: Mutex::new((0..settings.writers).map(|_| Vec::new()).collect()),
            in_flight: Mutex::new(0),
            idle: Condvar::new(),
            positions: Mutex::new(HashMap::new()),
            revocations: std::sync::atomic::AtomicU64::new(0),
        });
        let callbacks = Callbacks {
            pool,
            runtime: Handle::current(),
            group: settings.group_id.clone(),
            shared: shared.clone(),
            metrics: metrics.clone(),
        };
        let consumer: BaseConsumer<Callbacks> = super::with_defaults(
            base.clone(),
            &[
                ("statistics.interval.ms", "5000"),
                // Bounds what librdkafka prefetches (memory), on top of pausing; the service's
                // own buffer (max_buffered_messages) is what keeps the writers fed.
                ("queued.max.messages.kbytes", "16384"),
            ],
        )
        .set("group.id", &settings.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .create_with_context(callbacks)
        .map_err(ConsumerError::Config)?;
        let mut topics = vec![settings.usage_topic.as_str()];
        topics.extend(transactions_topic.as_deref());
        consumer
            .subscribe(&topics)
            .map_err(|source| ConsumerError::Subscribe {
                topic: topics.join(", "),
                source,
            })?;
        let dead_letters =
            DeadLetterProducer::new(&base, &settings.dead_letter_topic, &settings.group_id)
                .map_err(ConsumerError::Config)?;
        let consumer = Arc::new(consumer);
        let writer = Arc::new(BatchWriter {
            ingestor,
            transactions,
            transactions_topic: transactions_topic.clone(),
            dead_letters,
            guard: Mutex::new(DeadLetterGuard::new(
                settings.dead_letter_max_consecutive,
                settings.dead_letter_max_ratio,
                settings.dead_letter_window,
            )),
            group: settings.group_id.clone(),
            max_message_bytes: settings.max_message_bytes,
            metrics,
            consumer: consumer.clone(),
            shared: shared.clone(),
        });
        Ok(Self {
            consumer,
            writer,
            shared,
            settings,
            status: ConsumerStatus::default(),
        })
    }

    pub fn status(&self) -> ConsumerStatus {
        self.status.clone()
    }

    /// Consumes until `stop` is set (shutdown) or the consumer stops itself (the dead-letter
    /// limit); then finishes the batches in flight and leaves the group.
    pub async fn run(self, stop: Arc<AtomicBool>) {
        let metrics = self.writer.metrics.clone();
        metrics.running.set(1);
        let mut lanes = Vec::with_capacity(self.settings.writers);
        let mut writers = tokio::task::JoinSet::new();
        for _ in 0..self.settings.writers {
            let (sender, receiver) = mpsc::channel::<Vec<OwnedMessage>>(1);
            lanes.push(sender);
            writers.spawn(write_lane(
                receiver,
                self.writer.clone(),
                self.status.clone(),
                stop.clone(),
            ));
        }
        let poller = {
            let (consumer, shared, settings, stop, paused) = (
                self.consumer.clone(),
                self.shared.clone(),
                self.settings.clone(),
                stop.clone(),
                metrics.paused.clone(),
            );
            tokio::task::spawn_blocking(move || {
                poll_loop(&consumer, &shared, &settings, lanes, &stop, &paused)
            })
        };
        if let Err(e) = poller.await {
            tracing::error!(error = %e, "kafka poll thread failed");
        }
        // The poll loop dropped the lane senders: writers finish what they hold, then end.
        // A lane that panicked ended the poll loop early (its channel closed); that is a stop
        // to report, not a quiet end: retrying its batch would panic again.
        while let Some(ended) = writers.join_next().await {
            if let Err(e) = ended
                && e.is_panic()
            {
                let panic = e.into_panic();
                self.status.stop_with(format!(
                    "a batch writer panicked: {}",
                    crate::ingest::panic_message(panic.as_ref())
                ));
                stop.store(true, Ordering::SeqCst);
            }
        }
        metrics.running.set(0);
        metrics.paused.set(0);
        let consumer = self.consumer;
        drop(self.writer);
        // Leaving the group runs the revoke callback, which blocks: off the async threads.
        let _ = tokio::task::spawn_blocking(move || {
            consumer.unsubscribe();
            drop(consumer);
        })
        .await;
        match self.status.stopped_reason() {
            Some(reason) => tracing::error!(reason, "kafka usage consumer stopped"),
            None => tracing::info!("kafka usage consumer stopped"),
        }
    }
}

/// Reads messages into per-lane batches and hands full (or lingering) batches to the writers,
/// pausing the assignment while too much is read but not committed.
fn poll_loop(
    consumer: &BaseConsumer<Callbacks>,
    shared: &Shared,
    settings: &ConsumerSettings,
    lanes: Vec<mpsc::Sender<Vec<OwnedMessage>>>,
    stop: &AtomicBool,
    paused_gauge: &IntGauge,
) {
    let lane_count = lanes.len();
    let mut oldest: Vec<Option<Instant>> = vec![None; lane_count];
    let mut paused = false;
    let mut seen_revocations = 0;
    while !stop.load(Ordering::SeqCst) {
        let revocations = shared.revocations.load(Ordering::SeqCst);
        if revocations != seen_revocations {
            // A new assignment starts unpaused, and its lanes start empty.
            seen_revocations = revocations;
            paused = false;
            oldest.iter_mut().for_each(|o| *o = None);
        }
        let buffered = shared.in_flight()
            + shared
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(Vec::len)
                .sum::<usize>();
        if !paused && buffered >= settings.max_buffered_messages {
            paused = set_paused(consumer, true);
        } else if paused && buffered <= settings.max_buffered_messages / 2 {
            paused = !set_paused(consumer, false);
        }
        paused_gauge.set(i64::from(paused));
        match consumer.poll(Duration::from_millis(10)) {
            Some(Ok(message)) => {
                let lane = usize::try_from(message.partition()).unwrap_or(0) % lane_count;
                let mut pending = shared.pending.lock().unwrap_or_else(|e| e.into_inner());
                pending[lane].push(message.detach());
                oldest[lane].get_or_insert_with(Instant::now);
            }
            Some(Err(e)) => tracing::warn!(error = %e, "kafka consumer error"),
            None => {}
        }
        for (lane, sender) in lanes.iter().enumerate() {
            let mut pending = shared.pending.lock().unwrap_or_else(|e| e.into_inner());
            let due = pending[lane].len() >= settings.batch_max_messages
                || oldest[lane].is_some_and(|t| t.elapsed() >= settings.batch_linger);
            // A full lane keeps its messages pending: draining and splicing them back on every
            // poll would cost O(pending) per message.
            if pending[lane].is_empty() || !due || sender.capacity() == 0 {
                continue;
            }
            let take = pending[lane].len().min(settings.batch_max_messages);
            let batch: Vec<OwnedMessage> = pending[lane].drain(..take).collect();
            let size = batch.len();
            shared.dispatched(size);
            match sender.try_send(batch) {
                Ok(()) => {
                    oldest[lane] = (!pending[lane].is_empty()).then(Instant::now);
                }
                Err(mpsc::error::TrySendError::Full(batch)) => {
                    shared.finished(size);
                    pending[lane].splice(0..0, batch);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    shared.finished(size);
                    return;
                }
            }
        }
    }
}

/// Pauses or resumes the whole assignment; returns whether it worked.
fn set_paused(consumer: &BaseConsumer<Callbacks>, pause: bool) -> bool {
    let Ok(assignment) = consumer.assignment() else {
        return false;
    };
    let result = if pause {
        consumer.pause(&assignment)
    } else {
        consumer.resume(&assignment)
    };
    match result {
        Ok(()) => {
            tracing::debug!(pause, "kafka assignment flow control");
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, pause, "kafka pause/resume failed");
            false
        }
    }
}

/// One writer lane: commits its batches in order, retrying a failed batch (nothing of it was
/// committed) until it succeeds or the consumer stops.
async fn write_lane(
    mut batches: mpsc::Receiver<Vec<OwnedMessage>>,
    writer: Arc<BatchWriter>,
    status: ConsumerStatus,
    stop: Arc<AtomicBool>,
) {
    while let Some(batch) = batches.recv().await {
        // Stopping: leave the batch unwritten; its positions were never stored, so it is
        // read again by whoever consumes the partition next.
        if stop.load(Ordering::SeqCst) {
            writer.shared.finished(batch.len());
            continue;
        }
        let mut attempt: u32 = 0;
        loop {
            match writer.write(&batch, attempt == 0).await {
                Ok(()) => break,
                Err(BatchError::Halt(reason)) => {
                    status.stop_with(reason);
                    stop.store(true, Ordering::SeqCst);
                    break;
                }
                Err(BatchError::Retry(error)) => {
                    writer.metrics.batch_failures.inc();
                    tracing::warn!(error = %error, attempt, messages = batch.len(), "kafka batch failed; retrying");
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100 << attempt.min(6))).await;
                    attempt += 1;
                }
            }
        }
        writer.shared.finished(batch.len());
    }
}

#[derive(Debug, thiserror::Error)]
enum BatchError {
    /// Nothing was committed; the same batch may be written again.
    #[error(transparent)]
    Retry(IngestError),
    /// The dead-letter limit was crossed; nothing of the batch was committed.
    #[error("{0}")]
    Halt(String),
}

/// Decodes, dead-letters and commits one batch.
/// Which pipeline a message's topic feeds.
#[derive(Debug, Clone, Copy)]
enum Part {
    Usage,
    Transactions,
}

struct BatchWriter {
    ingestor: Arc<Ingestor>,
    transactions: Arc<TransactionRecorder>,
    /// `None` when transaction events are not consumed.
    transactions_topic: Option<String>,
    dead_letters: DeadLetterProducer,
    guard: Mutex<DeadLetterGuard>,
    group: String,
    max_message_bytes: usize,
    metrics: ConsumerMetrics,
    consumer: Arc<BaseConsumer<Callbacks>>,
    shared: Arc<Shared>,
}

impl BatchWriter {
    /// Writes the usage messages and the transaction messages of a batch, each part in its
    /// own transaction with the positions of its own topic's partitions.
    /// `first_attempt`: a retried batch was already counted by the dead-letter limit.
    async fn write(&self, batch: &[OwnedMessage], first_attempt: bool) -> Result<(), BatchError> {
        let (transactions, usage): (Vec<&OwnedMessage>, Vec<&OwnedMessage>) = batch
            .iter()
            .partition(|m| self.transactions_topic.as_deref() == Some(m.topic()));
        for (messages, part) in [(usage, Part::Usage), (transactions, Part::Transactions)] {
            if !messages.is_empty() {
                self.write_part(&messages, part, first_attempt).await?;
            }
        }
        Ok(())
    }

    async fn write_part(
        &self,
        batch: &[&OwnedMessage],
        part: Part,
        first_attempt: bool,
    ) -> Result<(), BatchError> {
        let started = Instant::now();
        let mut usage = Vec::new();
        let mut transactions = Vec::new();
        let mut sources: Vec<(&OwnedMessage, codec::Codec)> = Vec::with_capacity(batch.len());
        let mut letters: Vec<(&OwnedMessage, DeadLetter)> = Vec::new();
        for message in batch {
            let headers: Vec<(&str, Option<&[u8]>)> = message
                .headers()
                .map(|h| h.iter().map(|h| (h.key, h.value)).collect())
                .unwrap_or_default();
            let (payload, max) = (message.payload(), self.max_message_bytes);
            let decoded = match part {
                Part::Usage => codec::decode_usage(payload, &headers, max).map(|(codec, event)| {
                    usage.push(event);
                    codec
                }),
                Part::Transactions => {
                    codec::decode_transaction(payload, &headers, max).map(|event| {
                        transactions.push(event);
                        codec::Codec::Protobuf
                    })
                }
            };
            match decoded {
                Ok(codec) => sources.push((message, codec)),
                Err(error) => letters.push((
                    message,
                    DeadLetter {
                        stage: Stage::Decode,
                        field: None,
                        reason: error.reason,
                        codec: error.codec.map(codec::Codec::as_str),
                    },
                )),
            }
        }
        let positions = next_positions(batch);
        let mut halted: Option<String> = None;
        let consumed = ConsumedBatch {
            group: &self.group,
            offsets: &positions,
        };
        let dead_letter = async |invalid: Vec<(usize, FieldError)>| {
            for (index, error) in invalid {
                let (message, codec) = sources[index];
                letters.push((
                    message,
                    DeadLetter {
                        stage: Stage::Validate,
                        field: Some(error.field),
                        reason: error.reason,
                        codec: Some(codec.as_str()),
                    },
                ));
            }
            if first_attempt && let Err(limit) = self.check_limit(batch, &letters) {
                halted = Some(limit.clone());
                return Err(IngestError::Group(limit));
            }
            self.dead_letters
                .send_all(&letters)
                .await
                .map_err(|e| IngestError::Group(format!("dead-letter write failed: {e}")))
        };
        let result = match part {
            Part::Usage => {
                self.ingestor
                    .ingest_consumed(&usage, consumed, dead_letter)
                    .await
            }
            Part::Transactions => {
                self.transactions
                    .record_consumed(&transactions, Channel::Kafka, Some(consumed), dead_letter)
                    .await
            }
        };
        if let Some(reason) = halted {
            return Err(BatchError::Halt(reason));
        }
        result.map_err(BatchError::Retry)?;
        self.after_commit(batch, &letters, &positions, started);
        Ok(())
    }

    /// Feeds the batch, in offset order, to the dead-letter limit.
    fn check_limit(
        &self,
        batch: &[&OwnedMessage],
        letters: &[(&OwnedMessage, DeadLetter)],
    ) -> Result<(), String> {
        let dead: HashSet<(i32, i64)> = letters
            .iter()
            .map(|(m, _)| (m.partition(), m.offset()))
            .collect();
        let mut guard = self.guard.lock().unwrap_or_else(|e| e.into_inner());
        for message in batch {
            guard
                .record(dead.contains(&(message.partition(), message.offset())))
                .map_err(|e| e.0)?;
        }
        Ok(())
    }

    fn after_commit(
        &self,
        batch: &[&OwnedMessage],
        letters: &[(&OwnedMessage, DeadLetter)],
        positions: &[PartitionOffset],
        started: Instant,
    ) {
        let m = &self.metrics;
        // A part holds one topic's messages: one label lookup per topic, not per message.
        let mut per_topic: BTreeMap<&str, u64> = BTreeMap::new();
        for message in batch {
            *per_topic.entry(message.topic()).or_default() += 1;
        }
        for (topic, n) in per_topic {
            m.messages.with_label_values(&[topic]).inc_by(n);
        }
        for (_, letter) in letters {
            m.dead_letters
                .with_label_values(&[letter.stage.as_str()])
                .inc();
        }
        m.batch_messages.observe(batch.len() as f64);
        m.batch_seconds.observe(started.elapsed().as_secs_f64());
        let now_ms = chrono::Utc::now().timestamp_millis();
        for message in batch {
            if let Some(produced_ms) = message.timestamp().to_millis() {
                m.end_to_end_seconds
                    .observe((now_ms - produced_ms).max(0) as f64 / 1000.0);
            }
        }
        let mut tpl = TopicPartitionList::new();
        {
            let mut known = self
                .shared
                .positions
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for p in positions {
                known.insert((p.topic.clone(), p.partition), p.next_offset);
                let _ =
                    tpl.add_partition_offset(&p.topic, p.partition, Offset::Offset(p.next_offset));
            }
        }
        // Advisory only (lag tools read it); Postgres holds the positions that count.
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(error = %e, "advisory kafka commit failed");
        }
    }
}

/// The position after the last message of each partition in the batch.
fn next_positions(batch: &[&OwnedMessage]) -> Vec<PartitionOffset> {
    let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for message in batch {
        let slot = next
            .entry((message.topic(), message.partition()))
            .or_insert(0);
        *slot = (*slot).max(message.offset() + 1);
    }
    next.into_iter()
        .map(|((topic, partition), next_offset)| PartitionOffset {
            topic: topic.to_owned(),
            partition,
            next_offset,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(partition: i32, offset: i64) -> OwnedMessage {
        OwnedMessage::new(
            None,
            None,
            "usage".to_owned(),
            rdkafka::Timestamp::NotAvailable,
            partition,
            offset,
            None,
        )
    }

    #[test]
    fn positions_are_one_past_the_highest_offset_of_each_partition() {
        let batch = [message(1, 7), message(0, 3), message(1, 9), message(1, 8)];
        assert_eq!(
            next_positions(&batch.iter().collect::<Vec<_>>()),
            vec![
                PartitionOffset {
                    topic: "usage".to_owned(),
                    partition: 0,
                    next_offset: 4
                },
                PartitionOffset {
                    topic: "usage".to_owned(),
                    partition: 1,
                    next_offset: 10
                },
            ]
        );
    }
}

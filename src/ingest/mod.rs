//! The one pipeline both gRPC and Kafka feed: validate → normalize → dedupe → price → write.
//! One transaction per batch holds only what exactly-once and the answer need: the dedup keys,
//! the raw events (numbered with their ingest batch, queued for the folder in the same
//! transaction), the quota counters and, from Kafka, the consumer positions. Rollups are folded
//! from committed batches afterwards (`crate::fold`).

pub mod codec;
pub mod pricing_cache;
pub mod transactions;
pub mod validate;

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Datelike, TimeZone, Utc};
use futures::FutureExt;
use prometheus::{IntCounterVec, Opts, Registry};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use crate::config::IngestSettings;
use crate::domain::FieldError;
use crate::domain::pricing::{PricedUsage, PricingCatalog, TenantPricing};
use crate::domain::tokens::TokenCounts;
use crate::domain::usage::{EventIdentity, UsageEvent};
use crate::proto::v1 as pb;
use crate::store::offsets::PartitionOffset;
use crate::store::usage::Candidate;
use crate::store::{self, StoreError};
use pricing_cache::PricingCache;
use validate::Limits;

/// Where a batch came from; stored on raw events and used as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Grpc,
    Kafka,
}

impl Channel {
    pub const fn as_str(self) -> &'static str {
        match self {
            Channel::Grpc => "grpc",
            Channel::Kafka => "kafka",
        }
    }
}

/// What happened to one event of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Committed; counted exactly once. `unpriced` when some of its tokens had no rate.
    Accepted {
        unpriced: bool,
    },
    /// Same identity and payload as a stored (or earlier in-batch) event: not counted again.
    Duplicate,
    /// Same identity, different payload: not counted, kept for audit. `field` is the first
    /// payload field that differs from the delivery that won the identity.
    Conflict {
        field: String,
    },
    Invalid(FieldError),
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The group this request was written with failed; nothing of it was committed.
    #[error("ingest group failed: {0}")]
    Group(String),
    #[error("ingest writers have stopped")]
    Stopped,
}

impl From<sqlx::Error> for IngestError {
    fn from(error: sqlx::Error) -> Self {
        IngestError::Store(StoreError::Query(error))
    }
}

/// Counters of the ingest pipeline.
#[derive(Clone)]
pub struct IngestMetrics {
    events: IntCounterVec,
}

impl IngestMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let events = IntCounterVec::new(
            Opts::new(
                "tokenmeter_ingest_events_total",
                "Usage events by channel and outcome (accepted, duplicate, conflict, invalid, unpriced)",
            ),
            &["channel", "outcome"],
        )?;
        registry.register(Box::new(events.clone()))?;
        // Export every series at 0 from the start, so rate() and increase() see the first one.
        for channel in [Channel::Grpc, Channel::Kafka] {
            for outcome in ["accepted", "duplicate", "conflict", "invalid", "unpriced"] {
                events.with_label_values(&[channel.as_str(), outcome]);
            }
        }
        Ok(Self { events })
    }

    fn record(&self, channel: Channel, outcomes: &[Outcome]) {
        let mut counts: HashMap<&'static str, u64> = HashMap::new();
        for outcome in outcomes {
            let label = match outcome {
                Outcome::Accepted { unpriced } => {
                    if *unpriced {
                        *counts.entry("unpriced").or_default() += 1;
                    }
                    "accepted"
                }
                Outcome::Duplicate => "duplicate",
                Outcome::Conflict { .. } => "conflict",
                Outcome::Invalid(_) => "invalid",
            };
            *counts.entry(label).or_default() += 1;
        }
        for (label, n) in counts {
            self.events
                .with_label_values(&[channel.as_str(), label])
                .inc_by(n);
        }
    }
}

/// The ingest entry point. Events are routed by tenant to one of `ingest.writers` writer
/// tasks; each writer takes every request waiting for it, up to `ingest.max_group_events`,
/// and commits them in one transaction (group commit). Concurrent requests then never wait
/// on each other's quota counter locks — a tenant's rows belong to one writer — and the commit
/// cost is shared, while every request still gets its answer only after its events are
/// durable.
pub struct Ingestor {
    pipeline: Arc<Pipeline>,
    writers: Vec<mpsc::Sender<Job>>,
}

/// The part of a request one writer handles.
struct Job {
    events: Vec<pb::UsageEvent>,
    channel: Channel,
    reply: oneshot::Sender<Result<Vec<Outcome>, Arc<IngestError>>>,
}

impl Ingestor {
    /// Starts the writer tasks (on the current Tokio runtime). They stop when the
    /// `Ingestor` is dropped, after finishing what they hold.
    pub fn new(pool: PgPool, settings: &IngestSettings, metrics: IngestMetrics) -> Self {
        let pipeline = Arc::new(Pipeline::new(pool, settings, metrics));
        let writers = (0..settings.writers.max(1))
            .map(|_| {
                let (sender, receiver) = mpsc::channel(1024);
                tokio::spawn(write_groups(
                    pipeline.clone(),
                    receiver,
                    settings.max_group_events,
                ));
                sender
            })
            .collect();
        Self { pipeline, writers }
    }

    pub fn pricing(&self) -> &PricingCache {
        &self.pipeline.pricing
    }

    /// The tenant rule of ingest, for other event kinds: unknown tenants are created when
    /// `ingest.auto_create_tenants` is on, else their events (one entry per event in
    /// `tenants`, `None` for events already invalid) get INVALID `tenant_id`.
    pub async fn resolve_tenants(
        &self,
        tenants: &[Option<&str>],
        outcomes: &mut [Option<Outcome>],
    ) -> Result<(), IngestError> {
        self.pipeline
            .resolve_tenant_ids(tenants, outcomes)
            .await
            .map(|_| ())
    }

    /// Ingests one consumed Kafka batch in its own transaction, storing the consumer
    /// positions it covers with its events. `dead_letter` gets every event found invalid
    /// (its index and error) before anything is committed; if it fails, nothing is.
    /// Bypasses the group-commit writers: a batch's positions must commit atomically with
    /// all of its events, whichever tenants they belong to.
    pub async fn ingest_consumed<H>(
        &self,
        events: &[pb::UsageEvent],
        consumed: ConsumedBatch<'_>,
        dead_letter: H,
    ) -> Result<Vec<Outcome>, IngestError>
    where
        H: AsyncFnOnce(Vec<(usize, FieldError)>) -> Result<(), IngestError>,
    {
        self.pipeline
            .process(events, Channel::Kafka, Some(consumed), dead_letter)
            .await
    }

    /// What [`Ingestor::ingest`] would do with `events`, without writing anything.
    pub async fn dry_run(&self, events: &[pb::UsageEvent]) -> Result<Vec<DryRun>, IngestError> {
        self.pipeline.dry_run(events).await
    }

    /// Ingests a batch and returns one outcome per event, in input order. Returns only after
    /// every accepted event is committed; on an error, resending the batch is safe (what was
    /// committed comes back DUPLICATE).
    pub async fn ingest(
        &self,
        events: Vec<pb::UsageEvent>,
        channel: Channel,
    ) -> Result<Vec<Outcome>, IngestError> {
        let total = events.len();
        let mut parts: Vec<(Vec<pb::UsageEvent>, Vec<usize>)> = (0..self.writers.len())
            .map(|_| (Vec::new(), Vec::new()))
            .collect();
        for (position, event) in events.into_iter().enumerate() {
            let shard = shard_of(&event.tenant_id, self.writers.len());
            parts[shard].0.push(event);
            parts[shard].1.push(position);
        }
        let mut pending = Vec::new();
        for (writer, (events, positions)) in self.writers.iter().zip(parts) {
            if events.is_empty() {
                continue;
            }
            let (reply, answer) = oneshot::channel();
            let job = Job {
                events,
                channel,
                reply,
            };
            writer.send(job).await.map_err(|_| IngestError::Stopped)?;
            pending.push((positions, answer));
        }
        let mut outcomes: Vec<Option<Outcome>> = vec![None; total];
        for (positions, answer) in pending {
            let part = answer
                .await
                .map_err(|_| IngestError::Stopped)?
                .map_err(|e| IngestError::Group(e.to_string()))?;
            for (position, outcome) in positions.into_iter().zip(part) {
                outcomes[position] = Some(outcome);
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| Outcome::Invalid(FieldError::new("event", "not processed")))
            })
            .collect())
    }
}

/// Which writer owns a tenant. Stable within a process, which is all that is needed: it only
/// spreads lock ownership, never decides correctness.
fn shard_of(tenant_id: &str, writers: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    tenant_id.hash(&mut hasher);
    usize::try_from(hasher.finish() % writers.max(1) as u64).unwrap_or(0)
}

/// One writer: drains every job waiting (up to `max_events`), writes them as one group per
/// channel, answers each job.
async fn write_groups(pipeline: Arc<Pipeline>, mut jobs: mpsc::Receiver<Job>, max_events: usize) {
    while let Some(first) = jobs.recv().await {
        let mut group = vec![first];
        let mut size = group[0].events.len();
        while size < max_events {
            match jobs.try_recv() {
                Ok(job) => {
                    size += job.events.len();
                    group.push(job);
                }
                Err(_) => break,
            }
        }
        for channel in [Channel::Grpc, Channel::Kafka] {
            let (mine, rest): (Vec<Job>, Vec<Job>) =
                group.into_iter().partition(|j| j.channel == channel);
            group = rest;
            if mine.is_empty() {
                continue;
            }
            let lengths: Vec<usize> = mine.iter().map(|j| j.events.len()).collect();
            let mut events = Vec::with_capacity(lengths.iter().sum());
            let mut replies = Vec::with_capacity(mine.len());
            for job in mine {
                events.extend(job.events);
                replies.push(job.reply);
            }
            // A panic fails this group like a storage error (nothing of it was committed:
            // the dropped transaction rolls back) instead of ending the writer, which would
            // leave every later call routed to it answered "shutting down".
            let written =
                AssertUnwindSafe(pipeline.process(&events, channel, None, async |_| Ok(())))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|panic| {
                        Err(IngestError::Group(format!(
                            "ingest group panicked: {}",
                            panic_message(panic.as_ref())
                        )))
                    });
            match written {
                Ok(outcomes) => {
                    let mut outcomes = outcomes.into_iter();
                    for (reply, length) in replies.into_iter().zip(lengths) {
                        let _ = reply.send(Ok(outcomes.by_ref().take(length).collect()));
                    }
                }
                Err(error) => {
                    tracing::warn!(error = %error, events = events.len(), "ingest group failed; callers will retry");
                    let error = Arc::new(error);
                    for reply in replies {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
            }
        }
    }
}

/// The text a panic was raised with, when it has one.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}

/// One event of a dry run: the outcome ingest would give it, with its normalized tokens and
/// price when it is valid.
#[derive(Debug, Clone)]
pub struct DryRun {
    pub outcome: Outcome,
    pub tokens: Option<TokenCounts>,
    pub priced: Option<PricedUsage>,
}

/// The Kafka positions a consumed batch covers, stored in its transaction.
#[derive(Debug, Clone, Copy)]
pub struct ConsumedBatch<'a> {
    pub group: &'a str,
    pub offsets: &'a [PartitionOffset],
}

/// Validates, dedupes, prices and writes one group of events in one transaction.
struct Pipeline {
    pool: PgPool,
    pricing: PricingCache,
    limits: Limits,
    auto_create_tenants: bool,
    default_currency: String,
    default_book: String,
    metrics: IngestMetrics,
    /// Month partitions known to exist, so the common case skips the DDL round trip.
    partitions: Mutex<HashSet<DateTime<Utc>>>,
}

impl Pipeline {
    fn new(pool: PgPool, settings: &IngestSettings, metrics: IngestMetrics) -> Self {
        Self {
            pricing: PricingCache::new(pool.clone(), settings.default_price_book_id.clone()),
            default_book: settings.default_price_book_id.clone(),
            pool,
            limits: Limits::from_settings(settings),
            auto_create_tenants: settings.auto_create_tenants,
            default_currency: settings.default_currency.clone(),
            metrics,
            partitions: Mutex::new(HashSet::new()),
        }
    }

    /// One outcome per event, in input order, after every accepted event is committed; an
    /// error means nothing of the group was committed. `before_commit` sees the invalid
    /// events before the transaction starts (the Kafka path dead-letters them there).
    async fn process<H>(
        &self,
        events: &[pb::UsageEvent],
        channel: Channel,
        consumed: Option<ConsumedBatch<'_>>,
        before_commit: H,
    ) -> Result<Vec<Outcome>, IngestError>
    where
        H: AsyncFnOnce(Vec<(usize, FieldError)>) -> Result<(), IngestError>,
    {
        let now = Utc::now();
        let validated: Vec<Result<UsageEvent, FieldError>> = events
            .iter()
            .map(|e| validate::validate(e, &self.limits, now))
            .collect();
        let hashes: Vec<Option<[u8; 32]>> = validated
            .iter()
            .map(|r| r.as_ref().ok().map(UsageEvent::payload_hash))
            .collect();
        let mut outcomes: Vec<Option<Outcome>> = vec![None; events.len()];

        let catalog = self.resolve_tenants(&validated, &mut outcomes).await?;

        // The first valid delivery of each identity is the candidate; later ones in the batch
        // are judged against whatever wins for that identity.
        let mut first_of: HashMap<&EventIdentity, usize> = HashMap::new();
        let mut candidates: Vec<Candidate<'_>> = Vec::new();
        let mut candidate_of_event: HashMap<usize, usize> = HashMap::new();
        for (index, result) in validated.iter().enumerate() {
            if outcomes[index].is_some() {
                continue;
            }
            let event = match result {
                Ok(event) => event,
                Err(error) => {
                    outcomes[index] = Some(Outcome::Invalid(error.clone()));
                    continue;
                }
            };
            if first_of.contains_key(&event.identity) {
                continue;
            }
            let Some(payload_hash) = hashes[index] else {
                continue;
            };
            let priced = match price(&catalog, event, None) {
                Ok(priced) => priced,
                Err(error) => {
                    outcomes[index] = Some(Outcome::Invalid(error));
                    continue;
                }
            };
            first_of.insert(&event.identity, index);
            candidate_of_event.insert(index, candidates.len());
            candidates.push(Candidate {
                event,
                payload_hash,
                priced,
            });
        }

        before_commit(invalid_so_far(&outcomes)).await?;

        self.ensure_partitions(&candidates).await?;

        let mut priced_with = catalog;
        let mut tx = loop {
            let mut tx = self.pool.begin().await?;
            if !self
                .currency_moved(&mut tx, &priced_with, &candidates)
                .await?
            {
                break tx;
            }
            // Give the connection back before reading the new catalog, so a batch never
            // holds one connection while it waits for another.
            tx.rollback().await?;
            priced_with = self.pricing.catalog().await?;
            for candidate in &mut candidates {
                candidate.priced = price(&priced_with, candidate.event, None).map_err(|e| {
                    IngestError::Group(format!("repricing after a currency change: {e}"))
                })?;
            }
        };
        let inserted: HashSet<EventIdentity> = if candidates.is_empty() {
            HashSet::new()
        } else {
            store::usage::insert_keys(&mut tx, &candidates)
                .await?
                .into_iter()
                .collect()
        };
        let existing: Vec<&EventIdentity> = candidates
            .iter()
            .map(|c| &c.event.identity)
            .filter(|identity| !inserted.contains(*identity))
            .collect();
        let stored = store::usage::stored_hashes(&mut tx, &existing).await?;

        // The hash every delivery of an identity is compared with: the stored one if the
        // identity existed, else the candidate this batch inserted.
        let winning_hash: HashMap<&EventIdentity, [u8; 32]> = candidates
            .iter()
            .map(|c| {
                let identity = &c.event.identity;
                (
                    identity,
                    stored.get(identity).copied().unwrap_or(c.payload_hash),
                )
            })
            .collect();

        let mut conflicting: Vec<(usize, &UsageEvent, [u8; 32])> = Vec::new();
        let mut accepted: Vec<&Candidate<'_>> = Vec::new();
        for (index, result) in validated.iter().enumerate() {
            if outcomes[index].is_some() {
                continue;
            }
            let Ok(event) = result else { continue };
            if let Some(&c) = candidate_of_event.get(&index)
                && inserted.contains(&event.identity)
            {
                let candidate = &candidates[c];
                outcomes[index] = Some(Outcome::Accepted {
                    unpriced: candidate.priced.is_unpriced(),
                });
                accepted.push(candidate);
                continue;
            }
            let (Some(hash), Some(winner)) = (hashes[index], winning_hash.get(&event.identity))
            else {
                continue;
            };
            if event.is_stored_as(&hash, winner) {
                outcomes[index] = Some(Outcome::Duplicate);
            } else {
                conflicting.push((index, event, hash));
            }
        }
        // Conflicts are rare: only they read the stored events back, to name what differs.
        let stored_winners: Vec<&EventIdentity> = conflicting
            .iter()
            .map(|(_, event, _)| &event.identity)
            .filter(|identity| !inserted.contains(*identity))
            .collect();
        let stored_events = store::usage::stored_events(&mut tx, &stored_winners).await?;
        let winners: HashMap<&EventIdentity, &UsageEvent> = candidates
            .iter()
            .filter(|c| inserted.contains(&c.event.identity))
            .map(|c| (&c.event.identity, c.event))
            .chain(&stored_events)
            .collect();
        let mut conflicts: Vec<(&UsageEvent, [u8; 32], String)> = Vec::new();
        for (index, event, hash) in conflicting {
            let field = winners
                .get(&event.identity)
                .and_then(|winner| winner.first_difference(event))
                .unwrap_or_else(|| UNKNOWN_DIFFERENCE.to_owned());
            outcomes[index] = Some(Outcome::Conflict {
                field: field.clone(),
            });
            conflicts.push((event, hash, field));
        }

        store::usage::insert_conflicts(&mut tx, &conflicts, channel.as_str()).await?;
        store::usage::insert_events(&mut tx, &accepted, channel.as_str()).await?;
        crate::quota::apply_usage(&mut tx, &accepted).await?;
        if let Some(consumed) = consumed {
            store::offsets::store(&mut tx, consumed.group, consumed.offsets).await?;
        }
        tx.commit().await?;

        let outcomes: Vec<Outcome> = outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| Outcome::Invalid(FieldError::new("event", "not processed")))
            })
            .collect();
        self.metrics.record(channel, &outcomes);
        Ok(outcomes)
    }

    /// Holds the candidates' tenants against a currency change until `tx` ends, and tells
    /// whether one committed since `catalog` was read: the batch must then be repriced, or
    /// its amounts would be stored in the old currency of a tenant that has changed it.
    async fn currency_moved(
        &self,
        tx: &mut sqlx::PgConnection,
        catalog: &PricingCatalog,
        candidates: &[Candidate<'_>],
    ) -> Result<bool, IngestError> {
        let tenants: Vec<&str> = candidates
            .iter()
            .map(|c| c.event.identity.tenant_id.as_str())
            .collect();
        let held = store::tenants::hold_currencies(tx, &tenants).await?;
        Ok(tenants.iter().any(|t| {
            held.get(*t).map(String::as_str)
                != catalog.tenant(t).map(|pricing| pricing.currency.as_str())
        }))
    }

    /// Validation, pricing and the duplicate/conflict verdict against stored events, read only.
    /// Unknown tenants are priced as they would be created (or invalid without auto-create).
    async fn dry_run(&self, events: &[pb::UsageEvent]) -> Result<Vec<DryRun>, IngestError> {
        let now = Utc::now();
        let catalog = self.pricing.catalog().await?;
        let default_tenant = TenantPricing {
            currency: self.default_currency.clone(),
            price_book_id: self.default_book.clone(),
        };
        let validated: Vec<Result<UsageEvent, FieldError>> = events
            .iter()
            .map(|e| validate::validate(e, &self.limits, now))
            .collect();
        let identities: Vec<&EventIdentity> = validated
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|e| &e.identity)
            .collect();
        let mut conn = self.pool.acquire().await?;
        let stored = store::usage::stored_hashes(&mut conn, &identities).await?;
        let differing: Vec<&EventIdentity> = validated
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .filter(|e| {
                stored
                    .get(&e.identity)
                    .is_some_and(|h| !e.is_stored_as(&e.payload_hash(), h))
            })
            .map(|e| &e.identity)
            .collect();
        let stored_events = store::usage::stored_events(&mut conn, &differing).await?;
        let mut first_of: HashMap<&EventIdentity, ([u8; 32], &UsageEvent)> = HashMap::new();
        let mut runs = Vec::with_capacity(events.len());
        for result in &validated {
            let event = match result {
                Ok(event) => event,
                Err(error) => {
                    runs.push(DryRun {
                        outcome: Outcome::Invalid(error.clone()),
                        tokens: None,
                        priced: None,
                    });
                    continue;
                }
            };
            let unknown = self.auto_create_tenants.then_some(&default_tenant);
            let priced = match price(&catalog, event, unknown) {
                Ok(priced) => priced,
                Err(error) => {
                    runs.push(DryRun {
                        outcome: Outcome::Invalid(error),
                        tokens: Some(event.tokens),
                        priced: None,
                    });
                    continue;
                }
            };
            let hash = event.payload_hash();
            let winner = stored
                .get(&event.identity)
                .map(|hash| (*hash, stored_events.get(&event.identity)))
                .or_else(|| first_of.get(&event.identity).map(|(h, e)| (*h, Some(*e))));
            let outcome = match winner {
                Some((winner_hash, _)) if event.is_stored_as(&hash, &winner_hash) => {
                    Outcome::Duplicate
                }
                Some((_, winner)) => Outcome::Conflict {
                    field: winner
                        .and_then(|w| w.first_difference(event))
                        .unwrap_or_else(|| UNKNOWN_DIFFERENCE.to_owned()),
                },
                None => {
                    first_of.insert(&event.identity, (hash, event));
                    Outcome::Accepted {
                        unpriced: priced.is_unpriced(),
                    }
                }
            };
            runs.push(DryRun {
                outcome,
                tokens: Some(event.tokens),
                priced: Some(priced),
            });
        }
        Ok(runs)
    }

    /// Returns the pricing catalog that covers every tenant left valid.
    async fn resolve_tenants(
        &self,
        validated: &[Result<UsageEvent, FieldError>],
        outcomes: &mut [Option<Outcome>],
    ) -> Result<Arc<PricingCatalog>, IngestError> {
        let tenants: Vec<Option<&str>> = validated
            .iter()
            .map(|r| r.as_ref().ok().map(|e| e.identity.tenant_id.as_str()))
            .collect();
        self.resolve_tenant_ids(&tenants, outcomes).await
    }

    /// Creates tenants seen for the first time (when configured to), or marks the events
    /// naming them INVALID; `tenants` has one entry per event (`None`: already invalid).
    async fn resolve_tenant_ids(
        &self,
        tenants: &[Option<&str>],
        outcomes: &mut [Option<Outcome>],
    ) -> Result<Arc<PricingCatalog>, IngestError> {
        let catalog = self.pricing.catalog().await?;
        let unknown: HashSet<&str> = tenants
            .iter()
            .flatten()
            .copied()
            .filter(|t| catalog.tenant(t).is_none())
            .collect();
        if unknown.is_empty() {
            return Ok(catalog);
        }
        if self.auto_create_tenants {
            let unknown: Vec<&str> = unknown.into_iter().collect();
            store::tenants::insert_missing(&self.pool, &unknown, &self.default_currency).await?;
            return Ok(self.pricing.catalog().await?);
        }
        for (index, tenant) in tenants.iter().enumerate() {
            if tenant.is_some_and(|t| unknown.contains(t)) {
                outcomes[index] = Some(Outcome::Invalid(FieldError::new(
                    "tenant_id",
                    "unknown tenant",
                )));
            }
        }
        Ok(catalog)
    }

    async fn ensure_partitions(&self, candidates: &[Candidate<'_>]) -> Result<(), IngestError> {
        let months: HashSet<DateTime<Utc>> = candidates
            .iter()
            .map(|c| month_start(c.event.occurred_at))
            .collect();
        let missing: Vec<DateTime<Utc>> = {
            let known = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
            months.into_iter().filter(|m| !known.contains(m)).collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let mut conn = self.pool.acquire().await?;
        store::usage::ensure_partitions(&mut conn, &missing).await?;
        self.partitions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(missing);
        Ok(())
    }
}

/// The events already judged INVALID, with their index: what the Kafka path dead-letters.
pub(crate) fn invalid_so_far(outcomes: &[Option<Outcome>]) -> Vec<(usize, FieldError)> {
    outcomes
        .iter()
        .enumerate()
        .filter_map(|(index, outcome)| match outcome {
            Some(Outcome::Invalid(error)) => Some((index, error.clone())),
            _ => None,
        })
        .collect()
}

/// Prices a valid event for its tenant, or as the tenant `unknown` describes when its tenant
/// does not exist yet (`None`: an unknown tenant is invalid).
fn price(
    catalog: &PricingCatalog,
    event: &UsageEvent,
    unknown: Option<&TenantPricing>,
) -> Result<PricedUsage, FieldError> {
    let tenant_id = &event.identity.tenant_id;
    let tenant = catalog
        .tenant(tenant_id)
        .or(unknown)
        .ok_or_else(|| FieldError::new("tenant_id", "unknown tenant"))?;
    catalog
        .price_for(
            tenant_id,
            tenant,
            &event.provider,
            &event.model,
            event.occurred_at,
            &event.tokens,
        )
        .map_err(|_| FieldError::new("tokens", "amount overflows exact decimal range"))
}

/// What a CONFLICT names when the winning delivery cannot be read back (its raw row is gone):
/// the payload as a whole.
const UNKNOWN_DIFFERENCE: &str = "payload";

fn month_start(at: DateTime<Utc>) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(at.year(), at.month(), 1, 0, 0, 0)
        .single()
        .unwrap_or(at)
}

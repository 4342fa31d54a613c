//! The reservation engine: reserve, settle, release, expire and report quota, over the
//! counters in Postgres.
//!
//! Each (policy, window) has a counter row with `used`, `reserved` and `leased`. Every writer
//! of a counter changes it under its row lock, and for a hard limit every change that can add
//! to the sum keeps `used + reserved + leased ≤ limit` (usage itself can go over: it happened).
//!
//! **Decisions from leases** (`lease`, the default for Reserve without an idempotency key).
//! A replica (a random replica id per process) leases a slice of a counter's free budget
//! (`limit − used − reserved − leased`, read under the row lock with the policy's current
//! limit): `leased` and its lease row's `granted` grow by the slice in one transaction, only if
//! it fits. It grants from the slice in memory, all applicable policies or none, and never more
//! than the slice (`domain::lease::Book`). Writer tasks then write granted reservations in
//! batches within `quota.flush_interval`: each hold moves from `leased` to `reserved`, on the
//! counter and on the lease row alike, so the sum does not grow. Hence, at every instant, what
//! all replicas granted and not yet wrote is covered by `leased`, and a hard limit holds across
//! any number of replicas. Why the pieces around that stay safe:
//!
//! - *Crash.* A replica stops granting from a lease a quarter of `quota.lease_ttl` before its
//!   `expires_at`, counted from before it asked (the database sets `expires_at` after that
//!   instant, so clock skew cannot stretch it). Its grants not yet written were promised with
//!   TTLs of at most `quota.max_ttl`, so its slice returns to the free budget only at
//!   `reclaim_at = expires_at + max_ttl` (the reclaim runs with every replica's expiry sweep),
//!   when every such hold has lapsed. A write that finds its lease reclaimed drops the hold:
//!   it would have lapsed.
//! - *Settled before written.* Usage naming a reservation not written yet (a recent UUIDv7,
//!   `domain::lease::maybe_unwritten`) inserts it as a settled tombstone in the ingest
//!   transaction; the write then takes no hold and just returns the slice part. Settle with
//!   counts and Release wait until the reservation is written (`quota.lease_ttl` at most).
//! - *Policy changes.* Leasing reads the policy's limit under the lock, so a slice never comes
//!   from more than the current limit. Policies are cached for `quota.policy_cache_ttl`; a
//!   changed revision lapses the replica's slices of that policy, which are given back whole
//!   before anything is leased again. So a lowered limit binds new grants within that TTL;
//!   until then a replica may still grant what it leased before the change — at most its
//!   unused slices, `free / (2 × quota.lease_replicas)` each when leased.
//! - *Shutdown and idle slices.* A graceful stop writes every grant and gives every unused
//!   slice back; a slice nobody took from for `quota.lease_idle` is given back, so another
//!   replica can lease it. A slice is `free / (2 × quota.lease_replicas)` but at least what
//!   the call needs: slices shrink as the budget runs out, so budget stranded in another
//!   replica's slice is small and returns when idle.
//! - *Windows.* The counter key includes the window: a new window is a new counter and lease.
//! - *Exhausted budgets.* A lease transaction that finds the free budget too small lets the
//!   replica deny calls needing more from memory for 100 ms, so a spent budget does not cost a
//!   transaction per denial. Denying is always safe; budget freed elsewhere meanwhile may go
//!   unseen for that long (this replica's releases, settles and expiries clear it at once).
//!
//! **Decisions in a transaction** (`reserve`): Reserve with an idempotency key (its replay must
//! find what it was granted) and Settle with counts lock the counters, decide with leased
//! slices counted as taken, and write in one transaction, batched per writer task.

pub mod alerts;
pub mod cli;
mod lease;
mod reserve;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool};

use crate::config::QuotaSettings;
use crate::domain::FieldError;
use crate::domain::pricing::PricingCatalog;
use crate::domain::quota::{self, Check, DenialReason, Estimate, Limit, Policy, Span, Window};
use crate::domain::tokens::{CLASS_COUNT, TokenCounts};
use crate::ingest::Ingestor;
use crate::store::StoreError;
use crate::store::quotas::{
    self as store, Alert, Counter, CounterKey, Guarded, Hold, Reservation, ReservationState,
    ReservationUpdate, Selection,
};
use crate::store::usage::Candidate;

#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// A valid request in the wrong state (e.g. another amount for a settled reservation).
    #[error("{0}")]
    FailedPrecondition(String),
    /// An optimistic-concurrency conflict: the stored revision is not the expected one.
    #[error("{0}")]
    Aborted(String),
    /// The batch this call was decided in failed; nothing of it was written.
    #[error("reserve batch failed: {0}")]
    Batch(String),
    #[error("quota writers have stopped")]
    Stopped,
}

impl From<sqlx::Error> for QuotaError {
    fn from(error: sqlx::Error) -> Self {
        QuotaError::Store(StoreError::Query(error))
    }
}

/// A Reserve call, validated.
#[derive(Debug, Clone)]
pub struct ReserveInput {
    pub tenant_id: String,
    pub agent_id: String,
    pub service: Option<String>,
    pub provider: String,
    pub model: String,
    pub estimate: Estimate,
    pub ttl: Option<Duration>,
    pub idempotency_key: Option<String>,
}

/// One policy in its current window.
#[derive(Debug, Clone)]
pub struct PolicyState {
    pub policy: Policy,
    pub window: Span,
    pub used: Decimal,
    pub reserved: Decimal,
    /// Budget in replicas' leased slices, not granted to anyone yet (or granted and not yet
    /// written). In a Reserve answer: other replicas' slices only, since the answering
    /// replica's unused slice is still there for its callers.
    pub leased: Decimal,
    pub over_limit: bool,
    /// (threshold, when) crossed in this window; filled by status reads only.
    pub crossings: Vec<(i32, DateTime<Utc>)>,
}

impl PolicyState {
    /// What can still be granted: leased slices count as spoken for.
    pub fn remaining(&self) -> Decimal {
        self.policy.limit.value() - self.used - self.reserved - self.leased
    }
}

#[derive(Debug, Clone)]
pub enum Decision {
    Allow,
    AllowSoftLimit,
    Deny {
        reason: DenialReason,
        policy_id: Option<String>,
        message: String,
    },
}

#[derive(Debug, Clone)]
pub struct ReserveOutcome {
    pub decision: Decision,
    /// Set unless denied.
    pub reservation_id: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub policies: Vec<PolicyState>,
    pub held_tokens: TokenCounts,
    /// The hold of the first money policy, in its currency.
    pub held_amount: Option<(Decimal, String)>,
}

#[derive(Debug, Clone)]
pub struct SettleOutcome {
    pub state: ReservationState,
    pub settled_tokens: Option<TokenCounts>,
    pub policies: Vec<PolicyState>,
}

/// Counters of the quota engine (no tenant labels: bounded series only).
#[derive(Clone)]
pub struct QuotaMetrics {
    decisions: prometheus::IntCounterVec,
    expired: prometheus::IntCounter,
    alerts_published: prometheus::IntCounter,
    lease_transactions: prometheus::IntCounterVec,
    policy_loads: prometheus::IntCounterVec,
}

impl QuotaMetrics {
    pub fn register(registry: &prometheus::Registry) -> Result<Self, prometheus::Error> {
        let decisions = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "tokenmeter_quota_decisions_total",
                "Reserve decisions by outcome (allow, allow_soft_limit, deny)",
            ),
            &["decision"],
        )?;
        let expired = prometheus::IntCounter::new(
            "tokenmeter_quota_holds_expired_total",
            "Reservations whose hold lapsed at its TTL and was reclaimed",
        )?;
        let alerts_published = prometheus::IntCounter::new(
            "tokenmeter_quota_alerts_published_total",
            "Threshold alerts sent to Kafka from the outbox",
        )?;
        let lease_transactions = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "tokenmeter_quota_lease_transactions_total",
                "Transactions leasing budget slices (quota.leases), by outcome: leased, \
                 exhausted (the free budget was too small), gone (the policy changed)",
            ),
            &["outcome"],
        )?;
        let policy_loads = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "tokenmeter_quota_policy_loads_total",
                "Loads of a tenant's policies into the lease cache (quota.policy_cache_ttl): \
                 ahead (one call reloaded while the others went on) or waited (calls waited)",
            ),
            &["when"],
        )?;
        registry.register(Box::new(decisions.clone()))?;
        registry.register(Box::new(expired.clone()))?;
        registry.register(Box::new(alerts_published.clone()))?;
        registry.register(Box::new(lease_transactions.clone()))?;
        registry.register(Box::new(policy_loads.clone()))?;
        for decision in ["allow", "allow_soft_limit", "deny"] {
            decisions.with_label_values(&[decision]);
        }
        for outcome in ["leased", "exhausted", "gone"] {
            lease_transactions.with_label_values(&[outcome]);
        }
        for when in ["ahead", "waited"] {
            policy_loads.with_label_values(&[when]);
        }
        Ok(Self {
            decisions,
            expired,
            alerts_published,
            lease_transactions,
            policy_loads,
        })
    }

    fn lease_transaction(&self, outcome: &str) {
        self.lease_transactions.with_label_values(&[outcome]).inc();
    }

    fn policies_loaded(&self, ahead: bool) {
        let when = if ahead { "ahead" } else { "waited" };
        self.policy_loads.with_label_values(&[when]).inc();
    }

    fn decided(&self, decision: &Decision) {
        let label = match decision {
            Decision::Allow => "allow",
            Decision::AllowSoftLimit => "allow_soft_limit",
            Decision::Deny { .. } => "deny",
        };
        self.decisions.with_label_values(&[label]).inc();
    }

    pub fn alerts_published(&self, n: usize) {
        self.alerts_published.inc_by(n as u64);
    }
}

pub struct QuotaEngine {
    metrics: QuotaMetrics,
    pool: PgPool,
    ingestor: Arc<Ingestor>,
    settings: QuotaSettings,
    writers: Vec<tokio::sync::mpsc::Sender<reserve::Work>>,
    /// `None` when `quota.leases` is off: every decision is then a transaction.
    leases: Option<Arc<lease::Leases>>,
}

impl QuotaEngine {
    /// Starts the reserve writers and, with `quota.leases`, the lease writers (on the current
    /// Tokio runtime); they stop with the engine.
    pub fn new(
        pool: PgPool,
        ingestor: Arc<Ingestor>,
        settings: QuotaSettings,
        metrics: QuotaMetrics,
    ) -> Self {
        Self {
            writers: reserve::start(pool.clone(), ingestor.clone(), settings.clone()),
            leases: settings.leases.then(|| {
                lease::Leases::start(
                    pool.clone(),
                    ingestor.clone(),
                    settings.clone(),
                    metrics.clone(),
                )
            }),
            metrics,
            pool,
            ingestor,
            settings,
        }
    }

    pub fn metrics(&self) -> &QuotaMetrics {
        &self.metrics
    }

    pub fn ingestor(&self) -> &Arc<Ingestor> {
        &self.ingestor
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn create_policy(&self, policy: &Policy) -> Result<Policy, QuotaError> {
        create_policy(&self.pool, policy).await
    }

    /// Applies `change` to the stored policy and writes it if nobody else did meanwhile.
    pub async fn update_policy(
        &self,
        tenant_id: &str,
        policy_id: &str,
        expected: Option<i64>,
        change: impl FnOnce(&mut Policy) -> Result<(), FieldError>,
    ) -> Result<Policy, QuotaError> {
        let mut policy = store::get_policy(&self.pool, tenant_id, policy_id).await?;
        let revision = policy.revision;
        if let Some(expected) = expected
            && expected != revision
        {
            return Err(stale(policy_id, revision));
        }
        change(&mut policy)?;
        let tenant = store::tenant(&self.pool, tenant_id).await?;
        check_currency(&policy, &tenant.currency)?;
        match store::update_policy(&self.pool, &policy, revision).await? {
            Guarded::Done(updated) => Ok(updated),
            Guarded::NotFound => Err(not_found(policy_id)),
            Guarded::Stale { current } => Err(stale(policy_id, current)),
        }
    }

    pub async fn delete_policy(
        &self,
        tenant_id: &str,
        policy_id: &str,
        expected: Option<i64>,
    ) -> Result<(), QuotaError> {
        match store::delete_policy(&self.pool, tenant_id, policy_id, expected).await? {
            Guarded::Done(()) => Ok(()),
            Guarded::NotFound => Err(not_found(policy_id)),
            Guarded::Stale { current } => Err(stale(policy_id, current)),
        }
    }

    /// Decides and, unless denied, holds the estimate on every applicable policy at once.
    /// A retry carrying an idempotency key already used gets the original answer.
    pub async fn reserve(&self, input: &ReserveInput) -> Result<ReserveOutcome, QuotaError> {
        let held_tokens = input.estimate.held_tokens()?;
        // A keyed call is decided in a transaction: its replay must find what it was granted,
        // which a reservation not yet written cannot promise.
        if let (Some(leases), None) = (&self.leases, &input.idempotency_key) {
            let outcome = leases.reserve(input, held_tokens).await?;
            self.metrics.decided(&outcome.decision);
            return Ok(outcome);
        }
        // Twice at most: a key replayed from a batch whose first call was denied has nothing
        // to replay, and is then decided on its own.
        for _ in 0..2 {
            if let Some(key) = &input.idempotency_key
                && let Some(stored) =
                    store::reservation_by_key(&self.pool, &input.tenant_id, key).await?
            {
                return self.replay(stored).await;
            }
            let (reply, answer) = tokio::sync::oneshot::channel();
            self.writer(&input.tenant_id)
                .send(reserve::Work::Reserve(Box::new(reserve::Job {
                    input: input.clone(),
                    held_tokens,
                    reply,
                })))
                .await
                .map_err(|_| QuotaError::Stopped)?;
            match answer.await.map_err(|_| QuotaError::Stopped)?? {
                reserve::Reply::Decided(outcome) => {
                    self.metrics.decided(&outcome.decision);
                    return Ok(*outcome);
                }
                reserve::Reply::Replay => continue,
            }
        }
        Err(QuotaError::Batch(
            "a concurrent call with the same idempotency key was denied; retry".into(),
        ))
    }

    /// The original answer to a retried Reserve, with the policies' current state.
    async fn replay(&self, stored: Reservation) -> Result<ReserveOutcome, QuotaError> {
        let policies = self
            .status(
                &stored.tenant_id,
                Selection::Call {
                    agent_id: Some(&stored.agent_id),
                    service: stored.service.as_deref(),
                },
            )
            .await?;
        Ok(ReserveOutcome {
            decision: if stored.soft_limited {
                Decision::AllowSoftLimit
            } else {
                Decision::Allow
            },
            reservation_id: Some(stored.reservation_id),
            expires_at: Some(stored.expires_at),
            policies,
            held_tokens: stored.held_tokens,
            held_amount: None,
        })
    }

    /// Policies as stored, after this replica's granted reservations are written (so a caller
    /// reads its own grants as `reserved`).
    pub async fn status(
        &self,
        tenant_id: &str,
        selection: Selection<'_>,
    ) -> Result<Vec<PolicyState>, QuotaError> {
        if let Some(leases) = &self.leases {
            leases.write_all().await;
        }
        status(&self.pool, tenant_id, selection).await
    }

    /// Waits until a reservation that `reservation_id` may name — granted from a lease, here or
    /// by another replica, and not written yet — is written; `false` if it never shows up
    /// (another id, or one granted too long ago to be still unwritten).
    async fn written(&self, tenant_id: &str, reservation_id: &str) -> Result<bool, QuotaError> {
        let Some(leases) = &self.leases else {
            return Ok(false);
        };
        if !crate::domain::lease::maybe_unwritten(reservation_id, Utc::now()) {
            return Ok(false);
        }
        leases.write_all().await;
        let deadline = tokio::time::Instant::now() + self.settings.lease_ttl;
        loop {
            let mut conn = self.pool.acquire().await?;
            match store::lock_reservation(&mut conn, tenant_id, reservation_id).await {
                Ok(_) => return Ok(true),
                Err(StoreError::NotFound(_)) if tokio::time::Instant::now() < deadline => {}
                Err(StoreError::NotFound(_)) => return Ok(false),
                Err(e) => return Err(e.into()),
            }
            drop(conn);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Runs `call`, and once more after waiting for the reservation to be written if it was not
    /// found: a caller may settle or release a grant before its replica wrote it.
    async fn when_written<T, F: std::future::Future<Output = Result<T, QuotaError>>>(
        &self,
        tenant_id: &str,
        reservation_id: &str,
        call: impl Fn() -> F,
    ) -> Result<T, QuotaError> {
        match call().await {
            Err(QuotaError::Store(StoreError::NotFound(what)))
                if !self.written(tenant_id, reservation_id).await? =>
            {
                Err(QuotaError::Store(StoreError::NotFound(what)))
            }
            Err(QuotaError::Store(StoreError::NotFound(_))) => call().await,
            other => other,
        }
    }

    /// Gives back idle slices (every `quota.lease_idle / 2`, on replicas with leases on).
    pub async fn give_back_idle(&self) {
        if let Some(leases) = &self.leases {
            leases.give_back_idle().await;
        }
    }

    /// Graceful shutdown: writes every granted reservation and gives every slice back.
    pub async fn close(&self) {
        if let Some(leases) = &self.leases {
            leases.close().await;
        }
    }

    /// Status of the policies a reservation applies to.
    async fn status_of(&self, reservation: &Reservation) -> Result<Vec<PolicyState>, QuotaError> {
        self.status(
            &reservation.tenant_id,
            Selection::Call {
                agent_id: Some(&reservation.agent_id),
                service: reservation.service.as_deref(),
            },
        )
        .await
    }

    /// The reservation as stored, or `NotFound`.
    pub async fn reservation(
        &self,
        tenant_id: &str,
        reservation_id: &str,
    ) -> Result<Reservation, QuotaError> {
        self.when_written(tenant_id, reservation_id, || async {
            let mut conn = self.pool.acquire().await?;
            Ok(store::lock_reservation(&mut conn, tenant_id, reservation_id).await?)
        })
        .await
    }

    /// The state and policies of a reservation after its usage event was ingested.
    pub async fn settled_by_event(
        &self,
        tenant_id: &str,
        reservation_id: &str,
    ) -> Result<SettleOutcome, QuotaError> {
        let reservation = self.reservation(tenant_id, reservation_id).await?;
        Ok(SettleOutcome {
            state: reservation.state,
            settled_tokens: reservation.settled_tokens,
            policies: self.status_of(&reservation).await?,
        })
    }

    /// Settles with actual counts alone (quota only, nothing billed). Counted even when the
    /// hold already lapsed; idempotent for the same counts. Decided by the tenant's writer, in
    /// the same transaction as the Reserve calls waiting with it.
    pub async fn settle_counts(
        &self,
        tenant_id: &str,
        reservation_id: &str,
        actual: TokenCounts,
    ) -> Result<SettleOutcome, QuotaError> {
        let settled = self
            .when_written(tenant_id, reservation_id, || async {
                let (reply, answer) = tokio::sync::oneshot::channel();
                self.writer(tenant_id)
                    .send(reserve::Work::Settle(reserve::SettleJob {
                        tenant_id: tenant_id.to_owned(),
                        reservation_id: reservation_id.to_owned(),
                        actual,
                        reply,
                    }))
                    .await
                    .map_err(|_| QuotaError::Stopped)?;
                answer.await.map_err(|_| QuotaError::Stopped)?
            })
            .await?;
        self.freed(Some(tenant_id));
        Ok(settled)
    }

    fn writer(&self, tenant_id: &str) -> &tokio::sync::mpsc::Sender<reserve::Work> {
        &self.writers[reserve::writer_of(tenant_id, self.writers.len())]
    }

    /// Frees an active reservation's holds; reports the state it ends in.
    pub async fn release(
        &self,
        tenant_id: &str,
        reservation_id: &str,
    ) -> Result<ReservationState, QuotaError> {
        let state = self
            .when_written(tenant_id, reservation_id, || {
                self.release_written(tenant_id, reservation_id)
            })
            .await?;
        self.freed(Some(tenant_id));
        Ok(state)
    }

    /// Budget was freed here: lease decisions must not deny from a stale view of it.
    fn freed(&self, tenant_id: Option<&str>) {
        if let Some(leases) = &self.leases {
            leases.freed(tenant_id);
        }
    }

    async fn release_written(
        &self,
        tenant_id: &str,
        reservation_id: &str,
    ) -> Result<ReservationState, QuotaError> {
        let mut tx = self.pool.begin().await?;
        let reservation = store::lock_reservation(&mut tx, tenant_id, reservation_id).await?;
        if reservation.state != ReservationState::Active {
            tx.rollback().await?;
            return Ok(reservation.state);
        }
        let deltas = released(&store::holds_of(&mut tx, &[(tenant_id, reservation_id)]).await?);
        store::update_reservations(
            &mut tx,
            &[ReservationUpdate {
                tenant_id,
                reservation_id,
                state: ReservationState::Released,
                settled_tokens: None,
                settled_by_event: false,
            }],
        )
        .await?;
        store::add_to_counters(&mut tx, &deltas).await?;
        tx.commit().await?;
        Ok(ReservationState::Released)
    }

    /// Returns to the budget up to `quota.expiry_batch` leases past their `reclaim_at` (their
    /// replicas died holding them); returns how many.
    pub async fn reclaim_leases(&self) -> Result<usize, QuotaError> {
        Ok(store::reclaim_leases(&self.pool, self.settings.expiry_batch).await?)
    }

    /// Expires up to `quota.expiry_batch` lapsed reservations and frees their holds; returns
    /// how many.
    pub async fn expire_due(&self) -> Result<usize, QuotaError> {
        let mut tx = self.pool.begin().await?;
        let due = store::expire_due(&mut tx, self.settings.expiry_batch).await?;
        if due.is_empty() {
            tx.rollback().await?;
            return Ok(0);
        }
        let ids: Vec<(&str, &str)> = due.iter().map(|(t, r)| (t.as_str(), r.as_str())).collect();
        let deltas = released(&store::holds_of(&mut tx, &ids).await?);
        store::add_to_counters(&mut tx, &deltas).await?;
        tx.commit().await?;
        self.metrics.expired.inc_by(due.len() as u64);
        self.freed(None);
        Ok(due.len())
    }
}

/// The pricing catalog, read only when a money policy needs it.
async fn catalog_for(
    ingestor: &Ingestor,
    policies: &[Policy],
) -> Result<Option<Arc<PricingCatalog>>, QuotaError> {
    if !policies
        .iter()
        .any(|p| matches!(p.limit, Limit::Money { .. }))
    {
        return Ok(None);
    }
    Ok(Some(ingestor.pricing().catalog().await?))
}

/// Creates a policy; a money limit must be in the tenant's currency.
pub async fn create_policy(pool: &PgPool, policy: &Policy) -> Result<Policy, QuotaError> {
    let tenant = store::tenant(pool, &policy.tenant_id).await?;
    check_currency(policy, &tenant.currency)?;
    Ok(store::insert_policy(pool, policy).await?)
}

/// Every selected enabled policy of a tenant in its current window.
pub async fn status(
    pool: &PgPool,
    tenant_id: &str,
    selection: Selection<'_>,
) -> Result<Vec<PolicyState>, QuotaError> {
    let tenant = store::tenant(pool, tenant_id).await?;
    let mut conn = pool.acquire().await?;
    let policies = store::enabled_policies(&mut conn, tenant_id, selection).await?;
    drop(conn);
    let now = Utc::now();
    let keys: Vec<CounterKey> = policies
        .iter()
        .map(|p| counter_key(p, tenant.calendar.window_at(p.window, now)))
        .collect();
    let counters = store::read_counters(pool, &keys).await?;
    let mut crossings = store::crossings(pool, &keys).await?;
    Ok(policies
        .into_iter()
        .zip(keys)
        .zip(counters)
        .map(|((policy, key), c)| PolicyState {
            over_limit: c.used + c.reserved > policy.limit.value(),
            crossings: crossings
                .remove(&(key.policy_id.clone(), key.window.start))
                .unwrap_or_default(),
            policy,
            window: key.window,
            used: c.used,
            reserved: c.reserved,
            leased: c.leased,
        })
        .collect())
}

fn check_currency(policy: &Policy, currency: &str) -> Result<(), FieldError> {
    match &policy.limit {
        Limit::Money { currency: c, .. } if c != currency => Err(FieldError::new(
            "policy.limit.money.currency",
            format!("must be the tenant's currency {currency}"),
        )),
        _ => Ok(()),
    }
}

fn not_found(policy_id: &str) -> QuotaError {
    QuotaError::Store(StoreError::NotFound(format!("quota policy {policy_id:?}")))
}

fn stale(policy_id: &str, current: i64) -> QuotaError {
    QuotaError::Aborted(format!(
        "quota policy {policy_id} is at revision {current}, not the expected one"
    ))
}

/// Giving back holds: `reserved` drops by each.
fn released(holds: &[Hold]) -> HashMap<CounterKey, Counter> {
    let mut deltas: HashMap<CounterKey, Counter> = HashMap::new();
    for hold in holds {
        deltas.entry(hold.counter.clone()).or_default().reserved -= hold.amount;
    }
    deltas
}

fn counter_key(policy: &Policy, window: Span) -> CounterKey {
    CounterKey {
        tenant_id: policy.tenant_id.clone(),
        policy_id: policy.policy_id.clone(),
        window,
    }
}

/// "daily token limit of tenant acme reached: 1000000 used+reserved, 4096 requested".
fn denial_message(state: &PolicyState, tenant_id: &str, check: &Check) -> String {
    let period = match state.policy.window {
        Window::Day => "daily",
        Window::Week => "weekly",
        Window::Month => "monthly",
        Window::BillingPeriod => "billing-period",
    };
    let (unit, limit) = match &state.policy.limit {
        Limit::Tokens { limit, .. } => ("token", limit.to_string()),
        Limit::Money { amount, currency } => ("spend", format!("{amount} {currency}")),
    };
    match check.hold {
        None => format!(
            "{period} {unit} limit of tenant {tenant_id} cannot be checked: the model has no price"
        ),
        Some(hold) => format!(
            "{period} {unit} limit of {limit} of tenant {tenant_id} reached: {} used+reserved, {hold} requested",
            check.used + check.reserved
        ),
    }
}

/// Adds counter deltas and records the thresholds their `used` crosses.
async fn apply_deltas(
    conn: &mut PgConnection,
    deltas: &HashMap<CounterKey, Counter>,
    policies: &[Policy],
) -> Result<(), StoreError> {
    let after = store::add_to_counters(conn, deltas).await?;
    let by_id: HashMap<(&str, &str), &Policy> = policies
        .iter()
        .map(|p| ((p.tenant_id.as_str(), p.policy_id.as_str()), p))
        .collect();
    let mut alerts = Vec::new();
    for (key, used) in &after {
        let (Some(delta), Some(policy)) = (
            deltas.get(key),
            by_id.get(&(key.tenant_id.as_str(), key.policy_id.as_str())),
        ) else {
            continue;
        };
        for threshold_bps in quota::crossed(
            &policy.thresholds_bps,
            policy.limit.value(),
            *used - delta.used,
            *used,
        ) {
            alerts.push(Alert {
                policy,
                window: key.window,
                threshold_bps,
                used: *used,
            });
        }
    }
    store::insert_alerts(conn, &alerts).await
}

/// Counts accepted usage against every matching policy, in the ingest transaction, and settles
/// the reservations the events carry: an active hold is freed (replaced by the actual usage);
/// an earlier counts-only settlement is taken back so the event replaces it.
pub async fn apply_usage(
    conn: &mut PgConnection,
    accepted: &[&Candidate<'_>],
) -> Result<(), StoreError> {
    if accepted.is_empty() {
        return Ok(());
    }
    let mut tenants: Vec<&str> = accepted
        .iter()
        .map(|c| c.event.identity.tenant_id.as_str())
        .collect();
    tenants.sort_unstable();
    tenants.dedup();
    let reservation_ids: Vec<(&str, &str)> = accepted
        .iter()
        .filter_map(|c| {
            c.event
                .reservation_id
                .as_deref()
                .map(|r| (c.event.identity.tenant_id.as_str(), r))
        })
        .collect();
    let (policies, calendars) = store::policies_of_tenants(conn, &tenants).await?;
    if policies.is_empty() && reservation_ids.is_empty() {
        return Ok(());
    }
    let mut deltas: HashMap<CounterKey, Counter> = HashMap::new();
    if !reservation_ids.is_empty() {
        settle_reservations(conn, accepted, &reservation_ids, &mut deltas).await?;
    }
    let mut by_tenant: HashMap<&str, Vec<&Policy>> = HashMap::new();
    for policy in &policies {
        by_tenant
            .entry(policy.tenant_id.as_str())
            .or_default()
            .push(policy);
    }
    for candidate in accepted {
        let event = candidate.event;
        let tenant = event.identity.tenant_id.as_str();
        let (Some(applicable), Some(calendar)) = (by_tenant.get(tenant), calendars.get(tenant))
        else {
            continue;
        };
        for policy in applicable
            .iter()
            .filter(|p| p.scope.covers(&event.agent_id, event.service.as_deref()))
        {
            let amount = policy.usage_amount(&event.tokens, Some(&candidate.priced));
            let window = calendar.window_at(policy.window, event.occurred_at);
            deltas.entry(counter_key(policy, window)).or_default().used += amount;
        }
    }
    deltas.retain(|_, d| !d.used.is_zero() || !d.reserved.is_zero());
    apply_deltas(conn, &deltas, &policies).await
}

async fn settle_reservations(
    conn: &mut PgConnection,
    accepted: &[&Candidate<'_>],
    ids: &[(&str, &str)],
    deltas: &mut HashMap<CounterKey, Counter>,
) -> Result<(), StoreError> {
    let mut reservations = store::lock_reservations(conn, ids).await?;
    // A reservation granted from a lease may not be written yet: a tombstone settled by this
    // usage makes its write take no hold (`store::write_leased`), instead of a phantom hold
    // that would block the budget until its TTL.
    let now = Utc::now();
    let mut tombstones: Vec<store::Tombstone<'_>> = accepted
        .iter()
        .filter_map(|c| {
            let event = c.event;
            let (tenant_id, reservation_id) = (
                event.identity.tenant_id.as_str(),
                event.reservation_id.as_deref()?,
            );
            let known = reservations
                .iter()
                .any(|r| r.tenant_id == tenant_id && r.reservation_id == reservation_id);
            (!known && crate::domain::lease::maybe_unwritten(reservation_id, now)).then_some(
                store::Tombstone {
                    tenant_id,
                    reservation_id,
                    agent_id: &event.agent_id,
                    service: event.service.as_deref(),
                    provider: &event.provider,
                    model: &event.model,
                },
            )
        })
        .collect();
    tombstones.sort_by_key(|t| (t.tenant_id, t.reservation_id));
    tombstones.dedup_by_key(|t| (t.tenant_id, t.reservation_id));
    if !tombstones.is_empty() {
        store::insert_tombstones(conn, &tombstones).await?;
        // This transaction's tombstones, or reservations written meanwhile: settled alike.
        let missing: Vec<(&str, &str)> = tombstones
            .iter()
            .map(|t| (t.tenant_id, t.reservation_id))
            .collect();
        reservations.extend(store::lock_reservations(conn, &missing).await?);
    }
    if reservations.is_empty() {
        return Ok(());
    }
    let locked: Vec<(&str, &str)> = reservations
        .iter()
        .map(|r| (r.tenant_id.as_str(), r.reservation_id.as_str()))
        .collect();
    let holds = store::holds_of(conn, &locked).await?;
    let mut zeroed: Vec<(&Hold, Decimal)> = Vec::new();
    let mut updates = Vec::with_capacity(reservations.len());
    for reservation in &reservations {
        let mine = holds.iter().filter(|h| {
            h.counter.tenant_id == reservation.tenant_id
                && h.reservation_id == reservation.reservation_id
        });
        let replaces_counts = reservation.settled_tokens.is_some() && !reservation.settled_by_event;
        for hold in mine {
            let delta = deltas.entry(hold.counter.clone()).or_default();
            if reservation.state == ReservationState::Active {
                delta.reserved -= hold.amount;
            }
            if replaces_counts {
                delta.used -= hold.settled_amount;
                zeroed.push((hold, Decimal::ZERO));
            }
        }
        let mut buckets = if replaces_counts {
            [0; CLASS_COUNT]
        } else {
            reservation.settled_tokens.unwrap_or_default().buckets()
        };
        for candidate in accepted.iter().filter(|c| {
            c.event.identity.tenant_id == reservation.tenant_id
                && c.event.reservation_id.as_deref() == Some(reservation.reservation_id.as_str())
        }) {
            for (sum, add) in buckets.iter_mut().zip(candidate.event.tokens.buckets()) {
                *sum = sum.saturating_add(add);
            }
        }
        updates.push(ReservationUpdate {
            tenant_id: &reservation.tenant_id,
            reservation_id: &reservation.reservation_id,
            state: match reservation.state {
                ReservationState::Active => ReservationState::Settled,
                other => other,
            },
            settled_tokens: TokenCounts::new(buckets).ok(),
            settled_by_event: true,
        });
    }
    store::set_settled_amounts(conn, &zeroed).await?;
    store::update_reservations(conn, &updates).await
}

/// Runs the expiry sweep every `interval` until shutdown; a failed pass is retried at the next
/// tick. A full batch is followed at once by the next, so a backlog drains quickly.
pub async fn run_expiry(
    engine: Arc<QuotaEngine>,
    interval: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    crate::periodic::every(interval, Duration::ZERO, shutdown, || {
        let engine = engine.clone();
        async move {
        loop {
            match engine.expire_due().await {
                Ok(n) if usize::try_from(engine.settings.expiry_batch).is_ok_and(|b| n >= b) => {
                    continue;
                }
                Ok(n) => {
                    if n > 0 {
                        tracing::debug!(expired = n, "quota holds reclaimed");
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "quota expiry pass failed; retrying next interval");
                    break;
                }
            }
        }
        match engine.reclaim_leases().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(leases = n, "quota slices of stopped replicas reclaimed"),
            Err(e) => tracing::warn!(error = %e, "quota lease reclaim failed; retrying next interval"),
        }
        }
    })
    .await;
}

/// Gives back slices idle for `quota.lease_idle`, checking twice as often, until shutdown.
pub async fn run_lease_idle(
    engine: Arc<QuotaEngine>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let period = engine.settings.lease_idle / 2;
    crate::periodic::every(period, period, shutdown, || {
        let engine = engine.clone();
        async move { engine.give_back_idle().await }
    })
    .await;
}

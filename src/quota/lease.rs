//! Reserve decisions from memory, out of budget slices leased from Postgres (see the safety
//! argument in the module doc of `crate::quota`). This replica keeps, per (policy, window), the
//! books of its slice (`domain::lease::Book`); a call is decided under one lock against the
//! books of every policy that applies, all or nothing, and answered at once with an id it mints
//! (UUIDv7). Writer tasks then write the granted reservations in batches (`quota.writers`, each
//! owning a share of the tenants), moving their holds from `leased` to `reserved`.
//!
//! A call whose slice cannot cover it leases more first, synchronously, in a transaction that
//! checks the free budget under the counter's row lock — the only time a decision waits for
//! Postgres. Policies, the tenant and the price catalog are cached for `quota.policy_cache_ttl`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use rust_decimal::Decimal;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use super::{
    Decision, PolicyState, QuotaError, QuotaMetrics, ReserveInput, ReserveOutcome, catalog_for,
    counter_key, denial_message,
};
use crate::config::QuotaSettings;
use crate::domain::lease::{self, Book};
use crate::domain::pricing::PricingCatalog;
use crate::domain::quota::{Check, DenialReason, Enforcement, Limit, Policy};
use crate::domain::tenant::TenantStatus;
use crate::domain::tokens::TokenCounts;
use crate::ingest::Ingestor;
use crate::store::quotas::{
    self as store, Counter, CounterKey, LeasedHold, LeasedReservation, Reservation, Selection,
    TenantQuota,
};

/// How many times a call leases and re-decides before it is denied: each round either grants,
/// or leases a slice that a concurrent call on this replica took first.
const ATTEMPTS: usize = 16;

/// How long a free budget found too small still denies calls that need more, from memory: an
/// exhausted budget must not cost a transaction per denied call. Denying is always safe; this
/// bounds how long budget freed elsewhere (usage settling holds, another replica's release or
/// give-back) can go unseen. Releases, Settles and expiries on this replica clear it at once.
const EXHAUSTED_FOR: Duration = Duration::from_millis(100);

/// How long a status read or a shutdown waits for granted reservations to be written.
const WRITE_WAIT: Duration = Duration::from_secs(5);

/// One (policy, window) slice of this replica.
#[derive(Debug, Clone, Copy)]
struct Slot {
    book: Book,
    /// Grants may come from the slice until then: the lease's TTL less a quarter, measured from
    /// before the lease was asked for, so it ends before the lease row's `expires_at` whatever
    /// the clocks say. `None`: lapsed (or never leased).
    valid_until: Option<Instant>,
    /// The counter as last read under its lock, moved by this replica's own writes since.
    seen: Counter,
    last_grant: Instant,
    /// When a lease transaction last found the free budget too small, and what it found.
    exhausted: Option<(Instant, Decimal)>,
}

impl Slot {
    fn new(now: Instant) -> Self {
        Self {
            book: Book::default(),
            valid_until: None,
            seen: Counter::default(),
            last_grant: now,
            exhausted: None,
        }
    }

    fn valid(&self, now: Instant) -> bool {
        self.valid_until.is_some_and(|until| now < until)
    }

    /// Whether the free budget last found cannot cover what `hold` lacks, recently enough to
    /// deny without asking Postgres again. Whether the slice is still valid does not matter:
    /// what it holds unused would return to the free budget if it lapsed, so `free` falls
    /// short of `hold` less that exactly when a fresh lease would — and an exhausted budget
    /// whose slice lapsed must not cost a transaction per denied call either.
    fn known_short(&self, hold: Decimal, now: Instant) -> bool {
        self.exhausted.is_some_and(|(at, free)| {
            now.duration_since(at) < EXHAUSTED_FOR && free < self.book.shortfall(hold)
        })
    }
}

/// A tenant's policies as this replica last read them.
struct Cached {
    loaded: Instant,
    tenant: TenantQuota,
    /// Enabled, by policy_id.
    policies: Vec<Policy>,
    catalog: Option<Arc<PricingCatalog>>,
}

/// One Reserve call and the policies that apply to it, in policy_id order.
struct Call<'a> {
    input: &'a ReserveInput,
    held_tokens: TokenCounts,
    policies: Vec<&'a Policy>,
    keys: Vec<CounterKey>,
    /// Per policy; `None`: the call cannot be priced for a money limit.
    holds: Vec<Option<Decimal>>,
}

/// A granted reservation waiting to be written.
struct Unwritten {
    reservation: Reservation,
    /// (counter, from the slice, over the limit) per policy.
    holds: Vec<(CounterKey, Decimal, Decimal)>,
}

enum Write {
    Granted(Box<Unwritten>),
    /// Answered once everything queued before it is written.
    Barrier(oneshot::Sender<()>),
}

/// What leasing more for one policy came to.
enum Leased {
    /// The slice now covers the hold (or a concurrent call's lease already did).
    Covered,
    /// The free budget cannot cover it.
    Exhausted,
    /// The policy was deleted or disabled: the cached policies are stale.
    Gone,
}

pub struct Leases {
    replica_id: uuid::Uuid,
    pool: PgPool,
    ingestor: Arc<Ingestor>,
    settings: QuotaSettings,
    slots: Mutex<HashMap<CounterKey, Slot>>,
    /// One lease transaction at a time per counter: a call waiting here finds the slice the
    /// call before it leased.
    gates: Mutex<HashMap<CounterKey, Arc<tokio::sync::Mutex<()>>>>,
    cache: Mutex<HashMap<String, Arc<Cached>>>,
    reloads: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    writers: Vec<mpsc::UnboundedSender<Write>>,
    closed: AtomicBool,
    metrics: QuotaMetrics,
}

impl Leases {
    /// Starts the writer tasks on the current runtime; they stop when the `Leases` is dropped.
    pub fn start(
        pool: PgPool,
        ingestor: Arc<Ingestor>,
        settings: QuotaSettings,
        metrics: QuotaMetrics,
    ) -> Arc<Self> {
        let replica_id = uuid::Uuid::new_v4();
        let mut receivers = Vec::new();
        let writers = (0..settings.writers.max(1))
            .map(|_| {
                let (sender, receiver) = mpsc::unbounded_channel();
                receivers.push(receiver);
                sender
            })
            .collect();
        let leases = Arc::new(Self {
            replica_id,
            pool,
            ingestor,
            settings,
            slots: Mutex::new(HashMap::new()),
            gates: Mutex::new(HashMap::new()),
            cache: Mutex::new(HashMap::new()),
            reloads: Mutex::new(HashMap::new()),
            writers,
            closed: AtomicBool::new(false),
            metrics,
        });
        for receiver in receivers {
            tokio::spawn(write_batches(Arc::downgrade(&leases), receiver));
        }
        tracing::info!(replica_id = %replica_id, "quota leases on");
        leases
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<CounterKey, Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The tenant's policies, from the cache while younger than `quota.policy_cache_ttl`. Past
    /// half that age one call reloads them while the others go on with the entry still within
    /// its TTL, so a busy tenant's calls do not all stop for a reload every TTL; only an entry
    /// that reached its TTL (an idle tenant, or reloads failing) makes calls wait, and a reload
    /// ahead that fails leaves the entry in use. A policy whose revision changed (or that is
    /// gone) lapses its slices, so nothing more is granted from a slice leased under an older
    /// limit.
    async fn cached(&self, tenant_id: &str) -> Result<Arc<Cached>, QuotaError> {
        let ttl = self.settings.policy_cache_ttl;
        let entry = || {
            self.cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(tenant_id)
                .cloned()
        };
        let (_reloading, current) = match entry() {
            Some(hit) if hit.loaded.elapsed() < ttl / 2 => return Ok(hit),
            Some(hit) if hit.loaded.elapsed() < ttl => {
                let Ok(reloading) = self.reload_gate(tenant_id).try_lock_owned() else {
                    return Ok(hit);
                };
                (reloading, Some(hit))
            }
            _ => (self.reload_gate(tenant_id).lock_owned().await, None),
        };
        let previous = entry();
        if let Some(hit) = previous.as_ref().filter(|c| c.loaded.elapsed() < ttl / 2) {
            return Ok(hit.clone());
        }
        match (
            self.load(tenant_id, previous, current.is_some()).await,
            current,
        ) {
            (Ok(loaded), _) => Ok(loaded),
            // Only while still within the TTL: a reload can fail slowly (a pool timeout).
            (Err(error), Some(current)) if current.loaded.elapsed() < ttl => {
                tracing::warn!(error = %error, tenant_id, "reloading quota policies ahead failed; the cached ones stay in use within their TTL");
                Ok(current)
            }
            (Err(error), _) => Err(error),
        }
    }

    /// Reads the tenant's policies into the cache (`ahead`: while the cached ones are still
    /// within their TTL); policies changed since `previous` lapse their slices.
    async fn load(
        &self,
        tenant_id: &str,
        previous: Option<Arc<Cached>>,
        ahead: bool,
    ) -> Result<Arc<Cached>, QuotaError> {
        let loaded = Instant::now();
        let tenant = store::tenant(&self.pool, tenant_id).await?;
        let mut conn = self.pool.acquire().await?;
        let policies = store::enabled_policies(&mut conn, tenant_id, Selection::Every).await?;
        drop(conn);
        let catalog = catalog_for(&self.ingestor, &policies).await?;
        self.metrics.policies_loaded(ahead);
        match previous {
            Some(previous) => {
                let changed: Vec<&str> = previous
                    .policies
                    .iter()
                    .filter(|old| {
                        !policies
                            .iter()
                            .any(|p| p.policy_id == old.policy_id && p.revision == old.revision)
                    })
                    .map(|p| p.policy_id.as_str())
                    .collect();
                self.lapse(tenant_id, |policy_id| changed.contains(&policy_id));
            }
            // Nothing to compare with (a first load, or an entry forgotten): no slice may go
            // on granting under a revision nobody checked.
            None => self.lapse(tenant_id, |_| true),
        }
        let cached = Arc::new(Cached {
            loaded,
            tenant,
            policies,
            catalog,
        });
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(tenant_id.to_owned(), cached.clone());
        Ok(cached)
    }

    /// One reload at a time per tenant.
    fn reload_gate(&self, tenant_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        gate_in(&self.reloads, tenant_id.to_owned())
    }

    /// Stops grants from this replica's slices of changed policies: they were leased under
    /// another revision, and are given back whole before the next lease.
    fn lapse(&self, tenant_id: &str, changed: impl Fn(&str) -> bool) {
        for (key, slot) in self.slots().iter_mut() {
            if key.tenant_id == tenant_id && changed(&key.policy_id) {
                slot.valid_until = None;
            }
        }
    }

    /// Budget of the tenant was freed here (a release, a settlement, an expiry): a free budget
    /// found short before no longer denies from memory.
    pub fn freed(&self, tenant_id: Option<&str>) {
        for (key, slot) in self.slots().iter_mut() {
            if tenant_id.is_none_or(|t| t == key.tenant_id) {
                slot.exhausted = None;
            }
        }
    }

    fn forget(&self, tenant_id: &str) {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(tenant_id);
    }

    /// Decides a Reserve without an idempotency key from this replica's slices.
    pub async fn reserve(
        &self,
        input: &ReserveInput,
        held_tokens: TokenCounts,
    ) -> Result<ReserveOutcome, QuotaError> {
        let mut tried_soft: Vec<usize> = Vec::new();
        for _ in 0..ATTEMPTS {
            if self.closed.load(Ordering::Acquire) {
                return Err(QuotaError::Stopped);
            }
            let cached = self.cached(&input.tenant_id).await?;
            let now = Utc::now();
            let policies: Vec<&Policy> = cached
                .policies
                .iter()
                .filter(|p| p.scope.covers(&input.agent_id, input.service.as_deref()))
                .collect();
            let call = Call {
                input,
                held_tokens,
                keys: policies
                    .iter()
                    .map(|p| counter_key(p, cached.tenant.calendar.window_at(p.window, now)))
                    .collect(),
                holds: policies
                    .iter()
                    .map(|p| hold_of(p, input, &cached, now))
                    .collect(),
                policies,
            };
            if cached.tenant.status == TenantStatus::Suspended {
                let states = self.states(&call.policies, &call.keys, &[]);
                return Ok(denied(
                    held_tokens,
                    states,
                    Decision::Deny {
                        reason: DenialReason::TenantSuspended,
                        policy_id: None,
                        message: format!("tenant {} is suspended", input.tenant_id),
                    },
                ));
            }
            if let Some(i) = call
                .policies
                .iter()
                .zip(&call.holds)
                .position(|(p, h)| p.enforcement == Enforcement::Hard && h.is_none())
            {
                return Ok(self.deny(&call, i));
            }
            let short = match self.try_grant(&call, |i| tried_soft.contains(&i)) {
                Ok(outcome) => return Ok(outcome),
                Err(short) => short,
            };
            for (i, needed) in short {
                let policy = call.policies[i];
                let hold = call.holds[i].unwrap_or_default();
                match self.lease(&call.keys[i], policy, hold, needed).await? {
                    Leased::Covered => {}
                    Leased::Gone => {
                        self.forget(&input.tenant_id);
                        break;
                    }
                    Leased::Exhausted if policy.enforcement == Enforcement::Soft => {
                        tried_soft.push(i);
                    }
                    Leased::Exhausted => return Ok(self.deny(&call, i)),
                }
            }
        }
        Ok(denied(
            held_tokens,
            Vec::new(),
            Decision::Deny {
                reason: DenialReason::LimitExceeded,
                policy_id: None,
                message: format!(
                    "quota of tenant {} is being used up by concurrent calls; retry",
                    input.tenant_id
                ),
            },
        ))
    }

    /// Grants the call from the slices if every applicable one covers its hold (a soft policy
    /// that already tried to lease goes over instead), all or nothing; otherwise returns, per
    /// policy short of budget, what it lacks.
    fn try_grant(
        &self,
        call: &Call<'_>,
        may_go_over: impl Fn(usize) -> bool,
    ) -> Result<ReserveOutcome, Vec<(usize, Decimal)>> {
        let Call {
            input,
            held_tokens,
            policies: applicable,
            keys,
            holds,
        } = call;
        let held_tokens = *held_tokens;
        let now = Instant::now();
        let mut slots = self.slots();
        let mut short = Vec::new();
        for (i, (key, hold)) in keys.iter().zip(holds).enumerate() {
            let hold = hold.unwrap_or_default();
            let slot = slots.get(key);
            let covered = hold.is_zero() || slot.is_some_and(|s| s.valid(now) && s.book.fits(hold));
            let over_ok = applicable[i].enforcement == Enforcement::Soft
                && may_go_over(i)
                && slot.is_some_and(|s| s.valid(now));
            if !covered && !over_ok {
                let needed = slot.map_or(hold, |s| {
                    if s.valid(now) {
                        s.book.shortfall(hold)
                    } else {
                        hold
                    }
                });
                short.push((i, needed));
            }
        }
        if !short.is_empty() {
            return Err(short);
        }
        let mut written = Vec::with_capacity(keys.len());
        let mut flags = Vec::with_capacity(keys.len());
        for (key, hold) in keys.iter().zip(holds) {
            let hold = hold.unwrap_or_default();
            let slot = slots.entry(key.clone()).or_insert_with(|| Slot::new(now));
            let (from_slice, over) = if slot.book.grant(hold) {
                (hold, Decimal::ZERO)
            } else {
                slot.book.grant_over(hold)
            };
            slot.last_grant = now;
            flags.push(!over.is_zero());
            written.push((key.clone(), from_slice, over));
        }
        let states: Vec<PolicyState> = applicable
            .iter()
            .zip(keys)
            .zip(&flags)
            .map(|((p, k), over)| view(p, k, slots.get(k), *over))
            .collect();
        drop(slots);
        let decision = if flags.iter().any(|f| *f) {
            Decision::AllowSoftLimit
        } else {
            Decision::Allow
        };
        let ttl = input
            .ttl
            .unwrap_or(self.settings.default_ttl)
            .min(self.settings.max_ttl);
        let expires_at = Utc::now() + chrono::Duration::from_std(ttl).unwrap_or_default();
        let reservation =
            super::reserve::new_reservation(input, held_tokens, &decision, expires_at);
        let outcome = ReserveOutcome {
            reservation_id: Some(reservation.reservation_id.clone()),
            expires_at: Some(expires_at),
            held_amount: money_hold(applicable, holds),
            decision,
            policies: states,
            held_tokens,
        };
        let writer = &self.writers[super::reserve::writer_of(&input.tenant_id, self.writers.len())];
        if writer
            .send(Write::Granted(Box::new(Unwritten {
                reservation,
                holds: written,
            })))
            .is_err()
        {
            tracing::error!("quota lease writer stopped; a granted reservation is not written");
        }
        Ok(outcome)
    }

    /// Leases more for one counter so that `hold` fits: `needed` beyond what the slice has (all
    /// of `hold` when the slice lapsed). A lapsed slice is first written out and given back
    /// whole, then leased anew, so the books restart from what Postgres holds.
    async fn lease(
        &self,
        key: &CounterKey,
        policy: &Policy,
        hold: Decimal,
        needed: Decimal,
    ) -> Result<Leased, QuotaError> {
        let hard = policy.enforcement == Enforcement::Hard;
        let known_short = |slots: &HashMap<CounterKey, Slot>| {
            hard && slots
                .get(key)
                .is_some_and(|s| s.known_short(hold, Instant::now()))
        };
        if known_short(&self.slots()) {
            return Ok(Leased::Exhausted);
        }
        let gate = self.gate(key);
        let _gate = gate.lock().await;
        let lapsed = {
            let slots = self.slots();
            let now = Instant::now();
            if known_short(&slots) {
                return Ok(Leased::Exhausted);
            }
            match slots.get(key) {
                Some(slot) if slot.valid(now) && slot.book.fits(hold) => {
                    return Ok(Leased::Covered);
                }
                Some(slot) => (!slot.valid(now)).then_some(slot.book.unwritten()),
                None => Some(Decimal::ZERO),
            }
        };
        if lapsed.is_some_and(|unwritten| unwritten > Decimal::ZERO) {
            self.write_all().await;
            let unwritten = self.slots().get(key).map(|s| s.book.unwritten());
            if unwritten.is_some_and(|u| u > Decimal::ZERO) {
                return Err(QuotaError::Batch(
                    "granted reservations could not be written".into(),
                ));
            }
        }
        let asked = Instant::now();
        let mut tx = self.pool.begin().await?;
        let current = store::enabled_policies(
            &mut tx,
            &key.tenant_id,
            Selection::Ids(std::slice::from_ref(&key.policy_id)),
        )
        .await?;
        let Some(current) = current.first() else {
            tx.rollback().await?;
            self.metrics.lease_transaction("gone");
            return Ok(Leased::Gone);
        };
        if current.revision != policy.revision {
            tx.rollback().await?;
            self.metrics.lease_transaction("gone");
            self.lapse(&key.tenant_id, |policy_id| policy_id == key.policy_id);
            return Ok(Leased::Gone);
        }
        let mut counter = store::lock_counters(&mut tx, std::slice::from_ref(key))
            .await?
            .into_iter()
            .next()
            .unwrap_or_default();
        if lapsed.is_some() {
            counter.leased -= store::give_back(&mut tx, key, self.replica_id, None).await?;
        }
        let free = current.limit.value() - counter.used - counter.reserved - counter.leased;
        let whole = matches!(current.limit, Limit::Tokens { .. });
        let needed = if lapsed.is_some() { hold } else { needed };
        let slice = match lease::slice(free, needed, self.settings.lease_replicas, whole) {
            Some(slice) => slice,
            None if current.enforcement == Enforcement::Soft => free.max(Decimal::ZERO),
            None => {
                tx.commit().await?;
                self.metrics.lease_transaction("exhausted");
                self.with_slot(key, |slot| {
                    slot.seen = counter;
                    slot.exhausted = Some((Instant::now(), free));
                    if lapsed.is_some() {
                        slot.book.resync(Decimal::ZERO);
                    }
                });
                return Ok(Leased::Exhausted);
            }
        };
        let before = store::extend_lease(
            &mut tx,
            key,
            self.replica_id,
            slice,
            self.settings.lease_ttl,
            self.settings.max_ttl,
        )
        .await?;
        tx.commit().await?;
        self.metrics.lease_transaction("leased");
        let ttl = self.settings.lease_ttl;
        self.with_slot(key, |slot| {
            if lapsed.is_some() {
                slot.book.resync(before + slice);
            } else {
                slot.book.credit(slice);
            }
            slot.valid_until = Some(asked + ttl - ttl / 4);
            slot.exhausted = None;
            slot.seen = Counter {
                leased: counter.leased + slice,
                ..counter
            };
        });
        Ok(if slice >= needed {
            Leased::Covered
        } else {
            Leased::Exhausted
        })
    }

    fn gate(&self, key: &CounterKey) -> Arc<tokio::sync::Mutex<()>> {
        gate_in(&self.gates, key.clone())
    }

    fn with_slot(&self, key: &CounterKey, change: impl FnOnce(&mut Slot)) {
        let mut slots = self.slots();
        let slot = slots
            .entry(key.clone())
            .or_insert_with(|| Slot::new(Instant::now()));
        change(slot);
    }

    /// The answer to a denied call: `denied_by` is the index of the hard policy that denied it.
    fn deny(&self, call: &Call<'_>, denied_by: usize) -> ReserveOutcome {
        let mut states = self.states(&call.policies, &call.keys, &[denied_by]);
        let state = &states[denied_by];
        let check = Check {
            enforcement: Enforcement::Hard,
            limit: state.policy.limit.value(),
            used: state.used,
            reserved: state.reserved + state.leased,
            hold: call.holds[denied_by],
        };
        let decision = Decision::Deny {
            reason: if call.holds[denied_by].is_none() {
                DenialReason::UnpricedModel
            } else {
                DenialReason::LimitExceeded
            },
            policy_id: Some(call.policies[denied_by].policy_id.clone()),
            message: denial_message(state, &call.input.tenant_id, &check),
        };
        for (state, policy) in states.iter_mut().zip(&call.policies) {
            if policy.enforcement == Enforcement::Soft {
                state.over_limit = state.remaining() < Decimal::ZERO;
            }
        }
        let mut outcome = denied(call.held_tokens, states, decision);
        outcome.held_amount = money_hold(&call.policies, &call.holds);
        outcome
    }

    /// The policies as this replica sees them; those at `flagged` are marked over the limit.
    fn states(
        &self,
        policies: &[&Policy],
        keys: &[CounterKey],
        flagged: &[usize],
    ) -> Vec<PolicyState> {
        let slots = self.slots();
        policies
            .iter()
            .zip(keys)
            .enumerate()
            .map(|(i, (p, key))| view(p, key, slots.get(key), flagged.contains(&i)))
            .collect()
    }

    /// Waits until every reservation granted so far is written (or `WRITE_WAIT` passed).
    pub async fn write_all(&self) {
        let mut acks = Vec::new();
        for writer in &self.writers {
            let (ack, done) = oneshot::channel();
            if writer.send(Write::Barrier(ack)).is_ok() {
                acks.push(done);
            }
        }
        let all = futures::future::join_all(acks);
        if tokio::time::timeout(WRITE_WAIT, all).await.is_err() {
            tracing::warn!("granted reservations not written within {WRITE_WAIT:?}");
        }
    }

    /// Gives back the unused part of slices no call took from for `quota.lease_idle`, so
    /// another replica can lease it; forgets empty slots of past windows, and the gates and
    /// cached policies nothing uses any more, so the maps do not grow with every window and
    /// every tenant ever seen.
    pub async fn give_back_idle(&self) {
        let idle = self.settings.lease_idle;
        let keys: Vec<CounterKey> = {
            let mut slots = self.slots();
            slots.retain(|_, s| {
                s.last_grant.elapsed() < idle * 4
                    || !s.book.leased().is_zero()
                    || !s.book.unwritten().is_zero()
            });
            self.forget_unused(&slots);
            slots
                .iter()
                .filter(|(_, s)| {
                    s.last_grant.elapsed() >= idle && s.book.available() > Decimal::ZERO
                })
                .map(|(k, _)| k.clone())
                .collect()
        };
        for key in keys {
            self.give_back(&key, Some(idle)).await;
        }
    }

    /// Drops the lease gates of counters without a slot, and the cached policies (with their
    /// reload gates) of tenants without a slot once the entry reached its TTL: calls reload
    /// such an entry anyway, and a load without one lapses every slice of the tenant.
    fn forget_unused(&self, slots: &HashMap<CounterKey, Slot>) {
        prune_gates(&self.gates, |key| slots.contains_key(key));
        let tenants: HashSet<&str> = slots.keys().map(|k| k.tenant_id.as_str()).collect();
        let ttl = self.settings.policy_cache_ttl;
        let cached: HashSet<String> = {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache.retain(|tenant, cached| {
                tenants.contains(tenant.as_str()) || cached.loaded.elapsed() < ttl
            });
            cache.keys().cloned().collect()
        };
        prune_gates(&self.reloads, |tenant| cached.contains(tenant));
    }

    /// Gives the unused part of one slice back (when it has been idle at least `idle`, if
    /// given); a failure keeps it in the books.
    async fn give_back(&self, key: &CounterKey, idle: Option<Duration>) {
        let gate = self.gate(key);
        let Ok(_gate) = gate.try_lock() else {
            return;
        };
        let unused = {
            let mut slots = self.slots();
            let Some(slot) = slots.get_mut(key) else {
                return;
            };
            if idle.is_some_and(|idle| slot.last_grant.elapsed() < idle) {
                return;
            }
            slot.book.take_unused()
        };
        if unused.is_zero() {
            return;
        }
        let moved = async {
            let mut tx = self.pool.begin().await?;
            let moved = store::give_back(&mut tx, key, self.replica_id, Some(unused)).await?;
            tx.commit().await?;
            Ok::<_, QuotaError>(moved)
        }
        .await;
        match moved {
            Ok(moved) => self.with_slot(key, |slot| {
                slot.seen.leased -= moved;
                slot.exhausted = None;
            }),
            Err(e) => {
                tracing::warn!(error = %e, "giving back an idle quota slice failed; kept");
                self.with_slot(key, |slot| slot.book.restore(unused));
            }
        }
    }

    /// Graceful shutdown: no more grants, everything granted written, every slice given back.
    pub async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.write_all().await;
        let keys: Vec<CounterKey> = self.slots().keys().cloned().collect();
        for key in keys {
            self.give_back(&key, None).await;
        }
    }

    /// Writes one batch; on success the books move the holds out of `pending`.
    async fn write(&self, batch: &[Unwritten]) -> Result<(), QuotaError> {
        let granted: Vec<LeasedReservation<'_>> = batch
            .iter()
            .map(|u| LeasedReservation {
                reservation: &u.reservation,
                holds: u
                    .holds
                    .iter()
                    .map(|(counter, from_lease, over)| LeasedHold {
                        counter,
                        from_lease: *from_lease,
                        over: *over,
                    })
                    .collect(),
            })
            .collect();
        let mut tx = self.pool.begin().await?;
        store::write_leased(&mut tx, self.replica_id, &granted).await?;
        tx.commit().await?;
        let mut slots = self.slots();
        for (key, from_lease, over) in batch.iter().flat_map(|u| &u.holds) {
            if let Some(slot) = slots.get_mut(key) {
                slot.book.written(*from_lease, *over);
                slot.seen.reserved += *from_lease + *over;
                slot.seen.leased -= *from_lease;
            }
        }
        Ok(())
    }
}

/// A writer task: waits for granted reservations, lets `quota.flush_interval` gather more, and
/// writes them in one transaction (retried until it succeeds: they were promised).
async fn write_batches(leases: std::sync::Weak<Leases>, mut queue: mpsc::UnboundedReceiver<Write>) {
    while let Some(first) = queue.recv().await {
        let Some(engine) = leases.upgrade() else {
            return;
        };
        if matches!(first, Write::Granted(_)) {
            tokio::time::sleep(engine.settings.flush_interval).await;
        }
        let mut batch = Vec::new();
        let mut barriers = Vec::new();
        let mut next = Some(first);
        while let Some(item) = next {
            match item {
                Write::Granted(u) => batch.push(*u),
                Write::Barrier(ack) => barriers.push(ack),
            }
            next = if batch.len() < engine.settings.max_batch {
                queue.try_recv().ok()
            } else {
                None
            };
        }
        if !batch.is_empty() {
            let mut backoff = Duration::from_millis(10);
            while let Err(e) = engine.write(&batch).await {
                tracing::warn!(error = %e, reservations = batch.len(), "writing granted reservations failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
        for ack in barriers {
            let _ = ack.send(());
        }
    }
}

/// The gate of `key` in `gates`, made on first use.
fn gate_in<K: std::hash::Hash + Eq>(
    gates: &Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>,
    key: K,
) -> Arc<tokio::sync::Mutex<()>> {
    gates
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(key)
        .or_default()
        .clone()
}

/// Drops the gates of `gates` that nobody holds or waits for and whose key is not `in_use`; a
/// later call makes a fresh one. Gates are only handed out (cloned) under the map's lock, so a
/// gate found here with no other reference cannot be in use, nor become so while it is dropped.
fn prune_gates<K: std::hash::Hash + Eq>(
    gates: &Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>,
    in_use: impl Fn(&K) -> bool,
) {
    gates
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|key, gate| Arc::strong_count(gate) > 1 || in_use(key));
}

/// The hold of a call on one policy: tokens, or money priced with the cached catalog (`None`:
/// unpriced).
fn hold_of(
    policy: &Policy,
    input: &ReserveInput,
    cached: &Cached,
    now: chrono::DateTime<Utc>,
) -> Option<Decimal> {
    match &policy.limit {
        Limit::Tokens { classes, .. } => Some(input.estimate.token_amount(classes)),
        Limit::Money { .. } => {
            let catalog = cached.catalog.as_ref()?;
            let pricing = catalog.tenant(&input.tenant_id)?;
            input.estimate.money_amount(
                catalog,
                &input.tenant_id,
                pricing,
                &input.provider,
                &input.model,
                now,
            )
        }
    }
}

/// The hold of the first money policy, in its currency.
fn money_hold(policies: &[&Policy], holds: &[Option<Decimal>]) -> Option<(Decimal, String)> {
    policies
        .iter()
        .zip(holds)
        .find_map(|(p, hold)| match (&p.limit, hold) {
            (Limit::Money { currency, .. }, Some(amount)) => Some((*amount, currency.clone())),
            _ => None,
        })
}

/// One policy as this replica sees it: the counter as last read, plus what it granted and has
/// not written yet; `leased` is what other replicas hold (this replica's unused slice is still
/// there for the caller).
fn view(policy: &Policy, key: &CounterKey, slot: Option<&Slot>, over_limit: bool) -> PolicyState {
    let (seen, book) = slot.map_or((Counter::default(), Book::default()), |s| (s.seen, s.book));
    PolicyState {
        policy: policy.clone(),
        window: key.window,
        used: seen.used,
        reserved: seen.reserved + book.unwritten(),
        leased: (seen.leased - book.leased()).max(Decimal::ZERO),
        over_limit,
        crossings: Vec::new(),
    }
}

fn denied(
    held_tokens: TokenCounts,
    policies: Vec<PolicyState>,
    decision: Decision,
) -> ReserveOutcome {
    ReserveOutcome {
        decision,
        reservation_id: None,
        expires_at: None,
        policies,
        held_tokens,
        held_amount: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pruning_keeps_the_gates_held_or_in_use_and_drops_the_rest() {
        let gates: Mutex<HashMap<&str, Arc<tokio::sync::Mutex<()>>>> = Mutex::default();
        let held = gate_in(&gates, "held").lock_owned().await;
        let _ = gate_in(&gates, "idle");
        let in_use = Arc::as_ptr(&gate_in(&gates, "in use"));

        prune_gates(&gates, |key| *key == "in use");
        let mut left: Vec<&str> = gates.lock().unwrap().keys().copied().collect();
        left.sort_unstable();
        assert_eq!(left, vec!["held", "in use"]);
        // The kept gate is still the one handed out before: never two gates for one key.
        assert_eq!(Arc::as_ptr(&gate_in(&gates, "in use")), in_use);

        drop(held);
        prune_gates(&gates, |_| false);
        assert!(gates.lock().unwrap().is_empty());
    }
}

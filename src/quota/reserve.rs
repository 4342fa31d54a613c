//! Reserve decisions in batches (group commit), for the calls leases do not decide: Reserve
//! with an idempotency key (or every Reserve with `quota.leases` off) and Settle with counts.
//! Each replica routes a tenant's calls to one of `quota.writers` tasks; a task takes every call
//! waiting for it and decides them in one transaction: it locks the counters of all their policies once, decides the calls one after
//! the other against the locked values (each decision sees the holds of the ones before it),
//! writes every granted hold and commits. Exactness is the same as one transaction per call —
//! every decision is made under the counters' row locks — but a hot budget costs one lock
//! acquisition and one commit per batch instead of per call, and a replica never has more than
//! `quota.writers` transactions queueing on a tenant's rows.
//!
//! Settle calls carrying actual counts go through the same tasks: their reservations are locked
//! first (the lock order is reservations, then counters), their counters are locked with the
//! others in the same sorted statement, and the holds they free are available to the
//! reservations decided after them in the batch.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::Utc;
use rust_decimal::Decimal;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use super::{
    Decision, PolicyState, QuotaError, ReserveInput, ReserveOutcome, SettleOutcome, apply_deltas,
    catalog_for, counter_key, denial_message,
};
use crate::config::QuotaSettings;
use crate::domain::quota::{self, Check, DenialReason, Limit, Verdict};
use crate::domain::tenant::TenantStatus;
use crate::domain::tokens::TokenCounts;
use crate::ingest::Ingestor;
use crate::store::StoreError;
use crate::store::quotas::{
    self as store, Counter, CounterKey, Hold, NewReservation, Reservation, ReservationState,
    ReservationUpdate, Selection,
};

/// What a writer answers one call.
pub enum Reply {
    Decided(Box<ReserveOutcome>),
    /// Another call of the same batch carried the same idempotency key and was written; answer
    /// with what it got.
    Replay,
}

pub struct Job {
    pub input: ReserveInput,
    pub held_tokens: TokenCounts,
    pub reply: oneshot::Sender<Result<Reply, QuotaError>>,
}

/// A Settle with actual counts.
pub struct SettleJob {
    pub tenant_id: String,
    pub reservation_id: String,
    pub actual: TokenCounts,
    pub reply: oneshot::Sender<Result<SettleOutcome, QuotaError>>,
}

/// What a writer is asked to do.
pub enum Work {
    /// Boxed: a reservation carries two token arrays, many times a settlement's size.
    Reserve(Box<Job>),
    Settle(SettleJob),
}

impl Work {
    fn tenant_id(&self) -> &str {
        match self {
            Work::Reserve(job) => &job.input.tenant_id,
            Work::Settle(job) => &job.tenant_id,
        }
    }
}

/// One settlement's answer before the policies are filled in.
type Settled<'a> = Result<(ReservationState, TokenCounts, &'a Reservation), QuotaError>;

/// What the writers share.
pub struct Writers {
    pool: PgPool,
    ingestor: Arc<Ingestor>,
    settings: QuotaSettings,
}

/// Starts the writer tasks; they stop when every sender is dropped.
pub fn start(
    pool: PgPool,
    ingestor: Arc<Ingestor>,
    settings: QuotaSettings,
) -> Vec<mpsc::Sender<Work>> {
    let shared = Arc::new(Writers {
        pool,
        ingestor,
        settings,
    });
    (0..shared.settings.writers.max(1))
        .map(|_| {
            let (sender, receiver) = mpsc::channel(4096);
            tokio::spawn(write_batches(shared.clone(), receiver));
            sender
        })
        .collect()
}

async fn write_batches(shared: Arc<Writers>, mut jobs: mpsc::Receiver<Work>) {
    while let Some(first) = jobs.recv().await {
        let mut batch = vec![first];
        while batch.len() < shared.settings.max_batch {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut by_tenant: HashMap<String, (Vec<Job>, Vec<SettleJob>)> = HashMap::new();
        for work in batch {
            let entry = by_tenant.entry(work.tenant_id().to_owned()).or_default();
            match work {
                Work::Reserve(job) => entry.0.push(*job),
                Work::Settle(job) => entry.1.push(job),
            }
        }
        for (tenant_id, (jobs, settles)) in by_tenant {
            shared.decide(&tenant_id, jobs, settles).await;
        }
    }
}

impl Writers {
    /// Decides one tenant's calls and answers each; a failure fails them all (nothing of the
    /// batch was written, so retrying is safe).
    async fn decide(&self, tenant_id: &str, jobs: Vec<Job>, settles: Vec<SettleJob>) {
        let inputs: Vec<(&ReserveInput, TokenCounts)> =
            jobs.iter().map(|j| (&j.input, j.held_tokens)).collect();
        let actuals: Vec<(&str, TokenCounts)> = settles
            .iter()
            .map(|s| (s.reservation_id.as_str(), s.actual))
            .collect();
        match self.decide_batch(tenant_id, &inputs, &actuals).await {
            Ok((replies, settled)) => {
                for (job, reply) in jobs.into_iter().zip(replies) {
                    let _ = job.reply.send(reply);
                }
                for (job, reply) in settles.into_iter().zip(settled) {
                    let _ = job.reply.send(reply);
                }
            }
            Err(error) => {
                tracing::warn!(error = %error, calls = jobs.len() + settles.len(), "quota batch failed");
                let failed = || match &error {
                    QuotaError::Store(StoreError::NotFound(what)) => {
                        QuotaError::Store(StoreError::NotFound(what.clone()))
                    }
                    other => QuotaError::Batch(other.to_string()),
                };
                for job in jobs {
                    let _ = job.reply.send(Err(failed()));
                }
                for job in settles {
                    let _ = job.reply.send(Err(failed()));
                }
            }
        }
    }

    #[allow(clippy::type_complexity)]
    async fn decide_batch(
        &self,
        tenant_id: &str,
        inputs: &[(&ReserveInput, TokenCounts)],
        actuals: &[(&str, TokenCounts)],
    ) -> Result<
        (
            Vec<Result<Reply, QuotaError>>,
            Vec<Result<SettleOutcome, QuotaError>>,
        ),
        QuotaError,
    > {
        let tenant = store::tenant(&self.pool, tenant_id).await?;
        let suspended = tenant.status == TenantStatus::Suspended;
        let now = Utc::now();
        let mut tx = self.pool.begin().await?;
        // Settled reservations first: the lock order is reservations, then counters.
        let ids: Vec<(&str, &str)> = actuals.iter().map(|(r, _)| (tenant_id, *r)).collect();
        let (reservations, holds) = if ids.is_empty() {
            (Vec::new(), Vec::new())
        } else {
            let reservations = store::lock_reservations(&mut tx, &ids).await?;
            let locked: Vec<(&str, &str)> = reservations
                .iter()
                .map(|r| (tenant_id, r.reservation_id.as_str()))
                .collect();
            let holds = store::holds_of(&mut tx, &locked).await?;
            (reservations, holds)
        };
        let mut policies = store::enabled_policies(&mut tx, tenant_id, Selection::Every).await?;
        // Only the counters this batch touches are locked: the policies of its callers and
        // those its settlements held on.
        policies.retain(|p| {
            inputs
                .iter()
                .any(|(i, _)| p.scope.covers(&i.agent_id, i.service.as_deref()))
                || holds.iter().any(|h| h.counter.policy_id == p.policy_id)
        });
        let catalog = catalog_for(&self.ingestor, &policies).await?;
        let pricing = catalog.as_ref().and_then(|c| c.tenant(tenant_id));
        let keys: Vec<CounterKey> = policies
            .iter()
            .map(|p| counter_key(p, tenant.calendar.window_at(p.window, now)))
            .collect();
        // Holds may sit in earlier windows: every counter is locked in one sorted statement.
        let mut all_keys = keys.clone();
        for hold in &holds {
            if !all_keys.contains(&hold.counter) {
                all_keys.push(hold.counter.clone());
            }
        }
        let locked = if all_keys.is_empty() {
            Vec::new()
        } else {
            store::lock_counters(&mut tx, &all_keys).await?
        };
        let mut values: HashMap<&CounterKey, Counter> = all_keys.iter().zip(locked).collect();
        let settlement = settle_all(
            tenant_id,
            actuals,
            &reservations,
            &holds,
            &policies,
            |r, t| {
                catalog
                    .as_ref()
                    .and_then(|c| c.price(tenant_id, &r.provider, &r.model, now, t).ok())
            },
        );
        for (key, delta) in &settlement.deltas {
            if let Some(value) = values.get_mut(key) {
                value.used += delta.used;
                value.reserved += delta.reserved;
            }
        }
        let mut counters: Vec<Counter> = keys
            .iter()
            .map(|k| values.get(k).copied().unwrap_or_default())
            .collect();

        let mut replies: Vec<Option<Result<Reply, QuotaError>>> = Vec::new();
        let mut granted: Vec<Granted> = Vec::new();
        let mut outcomes: Vec<Option<ReserveOutcome>> = Vec::new();
        let mut keys_taken: HashSet<&str> = HashSet::new();
        for (index, (input, held_tokens)) in inputs.iter().enumerate() {
            if let Some(key) = input.idempotency_key.as_deref()
                && !keys_taken.insert(key)
            {
                replies.push(Some(Ok(Reply::Replay)));
                outcomes.push(None);
                continue;
            }
            let applicable: Vec<usize> = (0..policies.len())
                .filter(|i| {
                    policies[*i]
                        .scope
                        .covers(&input.agent_id, input.service.as_deref())
                })
                .collect();
            let holds: Vec<Option<Decimal>> = applicable
                .iter()
                .map(|i| match &policies[*i].limit {
                    Limit::Tokens { classes, .. } => Some(input.estimate.token_amount(classes)),
                    Limit::Money { .. } => catalog.as_ref().zip(pricing).and_then(|(c, t)| {
                        input.estimate.money_amount(
                            c,
                            tenant_id,
                            t,
                            &input.provider,
                            &input.model,
                            now,
                        )
                    }),
                })
                .collect();
            let checks: Vec<Check> = applicable
                .iter()
                .zip(&holds)
                .map(|(i, hold)| Check {
                    enforcement: policies[*i].enforcement,
                    limit: policies[*i].limit.value(),
                    used: counters[*i].used,
                    // Replicas' leased slices are spoken for like holds.
                    reserved: counters[*i].reserved + counters[*i].leased,
                    hold: *hold,
                })
                .collect();
            let (verdict, flags) = if suspended {
                let denial = Verdict::Deny {
                    policy: usize::MAX,
                    reason: DenialReason::TenantSuspended,
                };
                (denial, vec![false; checks.len()])
            } else {
                quota::decide(&checks)
            };
            let allowed = !matches!(verdict, Verdict::Deny { .. });
            if allowed {
                for (i, check) in applicable.iter().zip(&checks) {
                    counters[*i].reserved += check.taken();
                }
            }
            let states: Vec<PolicyState> = applicable
                .iter()
                .zip(&flags)
                .map(|(i, flag)| PolicyState {
                    policy: policies[*i].clone(),
                    window: keys[*i].window,
                    used: counters[*i].used,
                    reserved: counters[*i].reserved,
                    leased: counters[*i].leased,
                    over_limit: *flag,
                    crossings: Vec::new(),
                })
                .collect();
            let held_amount = applicable.iter().zip(&holds).find_map(|(i, hold)| {
                match (&policies[*i].limit, hold) {
                    (Limit::Money { currency, .. }, Some(amount)) => {
                        Some((*amount, currency.clone()))
                    }
                    _ => None,
                }
            });
            let decision = match verdict {
                Verdict::Deny {
                    reason: DenialReason::TenantSuspended,
                    ..
                } => Decision::Deny {
                    reason: DenialReason::TenantSuspended,
                    policy_id: None,
                    message: format!("tenant {tenant_id} is suspended"),
                },
                Verdict::Deny { policy, reason } => Decision::Deny {
                    reason,
                    policy_id: Some(policies[applicable[policy]].policy_id.clone()),
                    message: denial_message(&states[policy], tenant_id, &checks[policy]),
                },
                Verdict::Allow => Decision::Allow,
                Verdict::AllowSoftLimit => Decision::AllowSoftLimit,
            };
            if allowed {
                granted.push(Granted {
                    index,
                    reservation: new_reservation(input, *held_tokens, &decision, now),
                    holds: applicable
                        .iter()
                        .zip(&checks)
                        .map(|(i, c)| (*i, c.taken()))
                        .collect(),
                });
            }
            outcomes.push(Some(ReserveOutcome {
                decision,
                reservation_id: None,
                expires_at: None,
                policies: states,
                held_tokens: *held_tokens,
                held_amount,
            }));
            replies.push(None);
        }

        let writes = !granted.is_empty() || !settlement.updates.is_empty();
        if !settlement.updates.is_empty() {
            store::set_settled_amounts(&mut tx, &settlement.settled).await?;
            store::update_reservations(&mut tx, &settlement.updates).await?;
            apply_deltas(&mut tx, &settlement.deltas, &policies).await?;
        }
        if !writes {
            tx.rollback().await?;
        } else if granted.is_empty() {
            tx.commit().await?;
        } else {
            let new: Vec<NewReservation<'_>> = granted
                .iter()
                .map(|g| NewReservation {
                    reservation: &g.reservation,
                    idempotency_key: inputs[g.index].0.idempotency_key.as_deref(),
                    ttl_micros: self.ttl_micros(inputs[g.index].0),
                    holds: g
                        .holds
                        .iter()
                        .map(|(i, amount)| (keys[*i].policy_id.as_str(), keys[*i].window, *amount))
                        .collect(),
                })
                .collect();
            let expiries = store::insert_reservations(&mut tx, &new).await?;
            tx.commit().await?;
            for (g, expires_at) in granted.iter().zip(expiries) {
                if let Some(outcome) = outcomes[g.index].as_mut() {
                    outcome.reservation_id = Some(g.reservation.reservation_id.clone());
                    outcome.expires_at = Some(expires_at);
                }
            }
        }
        let reserved = replies
            .into_iter()
            .zip(outcomes)
            .map(|(reply, outcome)| match (reply, outcome) {
                (Some(reply), _) => reply,
                (None, Some(outcome)) => Ok(Reply::Decided(Box::new(outcome))),
                (None, None) => Ok(Reply::Replay),
            })
            .collect();
        let settled = settlement
            .answers
            .into_iter()
            .map(|answer| {
                answer.map(|(state, tokens, reservation)| SettleOutcome {
                    state,
                    settled_tokens: Some(tokens),
                    policies: policies
                        .iter()
                        .zip(&keys)
                        .zip(&counters)
                        .filter(|((p, _), _)| {
                            p.scope
                                .covers(&reservation.agent_id, reservation.service.as_deref())
                        })
                        .map(|((p, k), c)| PolicyState {
                            policy: p.clone(),
                            window: k.window,
                            used: c.used,
                            reserved: c.reserved,
                            leased: c.leased,
                            over_limit: c.used + c.reserved > p.limit.value(),
                            crossings: Vec::new(),
                        })
                        .collect(),
                })
            })
            .collect();
        Ok((reserved, settled))
    }

    /// The requested TTL, defaulted and clamped by settings.
    fn ttl_micros(&self, input: &ReserveInput) -> i64 {
        let ttl = input
            .ttl
            .unwrap_or(self.settings.default_ttl)
            .min(self.settings.max_ttl);
        i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX)
    }
}

/// What a batch's settlements change.
struct Settlement<'a> {
    answers: Vec<Settled<'a>>,
    deltas: HashMap<CounterKey, Counter>,
    /// Per hold, what the counts added to `used` (taken back if a usage event replaces them).
    settled: Vec<(&'a Hold, Decimal)>,
    updates: Vec<ReservationUpdate<'a>>,
}

/// Settles each reservation at its actual counts, in call order: an active hold is freed and
/// the counts are added to `used` of the policies it held on (also for a lapsed hold: the
/// usage happened). A second settlement is idempotent for the same counts and refused for
/// others. `price` prices counts for money policies.
fn settle_all<'a>(
    tenant_id: &'a str,
    actuals: &[(&str, TokenCounts)],
    reservations: &'a [Reservation],
    holds: &'a [Hold],
    policies: &[crate::domain::quota::Policy],
    price: impl Fn(&Reservation, &TokenCounts) -> Option<crate::domain::pricing::PricedUsage>,
) -> Settlement<'a> {
    let mut settlement = Settlement {
        answers: Vec::new(),
        deltas: HashMap::new(),
        settled: Vec::new(),
        updates: Vec::new(),
    };
    let mut progress: HashMap<&str, (ReservationState, Option<TokenCounts>)> = HashMap::new();
    for (reservation_id, actual) in actuals {
        let Some(r) = reservations
            .iter()
            .find(|r| r.reservation_id == *reservation_id)
        else {
            settlement
                .answers
                .push(Err(QuotaError::Store(StoreError::NotFound(format!(
                    "reservation {reservation_id:?}"
                )))));
            continue;
        };
        let current = progress
            .entry(r.reservation_id.as_str())
            .or_insert((r.state, r.settled_tokens));
        if let Some(previous) = current.1 {
            settlement.answers.push(if previous == *actual {
                Ok((current.0, previous, r))
            } else {
                Err(QuotaError::FailedPrecondition(format!(
                    "reservation {reservation_id} is already settled at another amount"
                )))
            });
            continue;
        }
        let active = current.0 == ReservationState::Active;
        let priced = price(r, actual);
        for hold in holds
            .iter()
            .filter(|h| h.reservation_id == r.reservation_id)
        {
            let delta = settlement.deltas.entry(hold.counter.clone()).or_default();
            if active {
                delta.reserved -= hold.amount;
            }
            if let Some(policy) = policies
                .iter()
                .find(|p| p.policy_id == hold.counter.policy_id)
            {
                let amount = policy.usage_amount(actual, priced.as_ref());
                delta.used += amount;
                settlement.settled.push((hold, amount));
            }
        }
        let state = if active {
            ReservationState::Settled
        } else {
            current.0
        };
        *current = (state, Some(*actual));
        settlement.updates.push(ReservationUpdate {
            tenant_id,
            reservation_id: &r.reservation_id,
            state,
            settled_tokens: Some(*actual),
            settled_by_event: false,
        });
        settlement.answers.push(Ok((state, *actual, r)));
    }
    settlement
}

/// A granted call of a batch: its position, its reservation, and (policy index, amount) per
/// hold.
struct Granted {
    index: usize,
    reservation: Reservation,
    holds: Vec<(usize, Decimal)>,
}

/// A granted call's reservation, active until `expires_at`.
pub(super) fn new_reservation(
    input: &ReserveInput,
    held_tokens: TokenCounts,
    decision: &Decision,
    expires_at: chrono::DateTime<Utc>,
) -> Reservation {
    Reservation {
        tenant_id: input.tenant_id.clone(),
        reservation_id: uuid::Uuid::now_v7().to_string(),
        agent_id: input.agent_id.clone(),
        service: input.service.clone(),
        provider: input.provider.clone(),
        model: input.model.clone(),
        held_tokens,
        soft_limited: matches!(decision, Decision::AllowSoftLimit),
        state: ReservationState::Active,
        expires_at,
        settled_tokens: None,
        settled_by_event: false,
    }
}

/// Which writer owns a tenant (FNV-1a of its id): stable, which is all batching needs.
pub fn writer_of(tenant_id: &str, writers: usize) -> usize {
    let hash = tenant_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    usize::try_from(hash % writers.max(1) as u64).unwrap_or(0)
}

//! Reserve decisions in batches (group commit). Each replica routes a tenant's Reserve calls to
//! one of `quota.writers` tasks; a task takes every call waiting for it and decides them in one
//! transaction: it locks the counters of all their policies once, decides the calls one after
//! the other against the locked values (each decision sees the holds of the ones before it),
//! writes every granted hold and commits. Exactness is the same as one transaction per call —
//! every decision is made under the counters' row locks — but a hot budget costs one lock
//! acquisition and one commit per batch instead of per call, and a replica never has more than
//! `quota.writers` transactions queueing on a tenant's rows.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::Utc;
use rust_decimal::Decimal;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use super::{
    Decision, PolicyState, QuotaError, ReserveInput, ReserveOutcome, counter_key, denial_message,
};
use crate::config::QuotaSettings;
use crate::domain::quota::{self, Check, DenialReason, Limit, Verdict};
use crate::domain::tenant::TenantStatus;
use crate::domain::tokens::TokenCounts;
use crate::ingest::Ingestor;
use crate::store::StoreError;
use crate::store::quotas::{
    self as store, CounterKey, NewReservation, Reservation, ReservationState, Selection,
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
) -> Vec<mpsc::Sender<Job>> {
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

async fn write_batches(shared: Arc<Writers>, mut jobs: mpsc::Receiver<Job>) {
    while let Some(first) = jobs.recv().await {
        let mut batch = vec![first];
        while batch.len() < shared.settings.max_batch {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut by_tenant: HashMap<String, Vec<Job>> = HashMap::new();
        for job in batch {
            by_tenant
                .entry(job.input.tenant_id.clone())
                .or_default()
                .push(job);
        }
        for (tenant_id, jobs) in by_tenant {
            shared.decide(&tenant_id, jobs).await;
        }
    }
}

impl Writers {
    /// Decides one tenant's calls and answers each; a failure fails them all (nothing of the
    /// batch was written, so retrying is safe).
    async fn decide(&self, tenant_id: &str, jobs: Vec<Job>) {
        let inputs: Vec<(&ReserveInput, TokenCounts)> =
            jobs.iter().map(|j| (&j.input, j.held_tokens)).collect();
        match self.decide_batch(tenant_id, &inputs).await {
            Ok(replies) => {
                for (job, reply) in jobs.into_iter().zip(replies) {
                    let _ = job.reply.send(reply);
                }
            }
            Err(error) => {
                tracing::warn!(error = %error, calls = jobs.len(), "reserve batch failed");
                let message = error.to_string();
                for job in jobs {
                    let _ = job.reply.send(Err(match &error {
                        QuotaError::Store(StoreError::NotFound(what)) => {
                            QuotaError::Store(StoreError::NotFound(what.clone()))
                        }
                        _ => QuotaError::Batch(message.clone()),
                    }));
                }
            }
        }
    }

    async fn decide_batch(
        &self,
        tenant_id: &str,
        inputs: &[(&ReserveInput, TokenCounts)],
    ) -> Result<Vec<Result<Reply, QuotaError>>, QuotaError> {
        let tenant = store::tenant(&self.pool, tenant_id).await?;
        if tenant.status == TenantStatus::Suspended {
            return Ok(inputs
                .iter()
                .map(|(_, held_tokens)| {
                    Ok(Reply::Decided(Box::new(ReserveOutcome {
                        decision: Decision::Deny {
                            reason: DenialReason::TenantSuspended,
                            policy_id: None,
                            message: format!("tenant {tenant_id} is suspended"),
                        },
                        reservation_id: None,
                        expires_at: None,
                        policies: Vec::new(),
                        held_tokens: *held_tokens,
                        held_amount: None,
                    })))
                })
                .collect());
        }
        let now = Utc::now();
        let mut tx = self.pool.begin().await?;
        let policies = store::enabled_policies(&mut tx, tenant_id, Selection::Every).await?;
        let catalog = if policies
            .iter()
            .any(|p| matches!(p.limit, Limit::Money { .. }))
        {
            Some(self.ingestor.pricing().catalog().await?)
        } else {
            None
        };
        let pricing = catalog.as_ref().and_then(|c| c.tenant(tenant_id));
        let keys: Vec<CounterKey> = policies
            .iter()
            .map(|p| counter_key(p, tenant.calendar.window_at(p.window, now)))
            .collect();
        let mut counters = if keys.is_empty() {
            Vec::new()
        } else {
            store::lock_counters(&mut tx, &keys).await?
        };

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
                    reserved: counters[*i].reserved,
                    hold: *hold,
                })
                .collect();
            let (verdict, flags) = quota::decide(&checks);
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

        if granted.is_empty() {
            tx.rollback().await?;
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
        Ok(replies
            .into_iter()
            .zip(outcomes)
            .map(|(reply, outcome)| match (reply, outcome) {
                (Some(reply), _) => reply,
                (None, Some(outcome)) => Ok(Reply::Decided(Box::new(outcome))),
                (None, None) => Ok(Reply::Replay),
            })
            .collect())
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

/// A granted call of a batch: its position, its reservation, and (policy index, amount) per
/// hold.
struct Granted {
    index: usize,
    reservation: Reservation,
    holds: Vec<(usize, Decimal)>,
}

fn new_reservation(
    input: &ReserveInput,
    held_tokens: TokenCounts,
    decision: &Decision,
    now: chrono::DateTime<Utc>,
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
        expires_at: now,
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

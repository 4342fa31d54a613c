//! Service-transaction lifecycle events, gRPC and Kafka alike: validate → tenant → dedupe on
//! (tenant, source, event_id) → store, in one transaction (with the consumer positions on the
//! Kafka path). Same outcomes as usage: ACCEPTED, DUPLICATE, CONFLICT, INVALID.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::Utc;
use prometheus::{IntCounterVec, Opts, Registry};
use sqlx::PgPool;

use super::validate::{self, Limits};
use super::{Channel, ConsumedBatch, IngestError, Ingestor, Outcome, invalid_so_far};
use crate::config::IngestSettings;
use crate::domain::FieldError;
use crate::domain::transaction::TransactionEvent;
use crate::domain::usage::EventIdentity;
use crate::proto::v1 as pb;
use crate::store;

/// Records lifecycle events; tenants follow the usage pipeline's rule (see
/// [`Ingestor::resolve_tenants`]), so a tenant known to one is known to the other.
pub struct TransactionRecorder {
    pool: PgPool,
    ingestor: Arc<Ingestor>,
    limits: Limits,
    events: IntCounterVec,
}

impl TransactionRecorder {
    pub fn new(
        pool: PgPool,
        ingestor: Arc<Ingestor>,
        settings: &IngestSettings,
        registry: &Registry,
    ) -> Result<Self, prometheus::Error> {
        let events = IntCounterVec::new(
            Opts::new(
                "tokenmeter_transaction_events_total",
                "Service-transaction lifecycle events by channel and outcome",
            ),
            &["channel", "outcome"],
        )?;
        registry.register(Box::new(events.clone()))?;
        for channel in [Channel::Grpc, Channel::Kafka] {
            for outcome in ["accepted", "duplicate", "conflict", "invalid"] {
                events.with_label_values(&[channel.as_str(), outcome]);
            }
        }
        Ok(Self {
            pool,
            ingestor,
            limits: Limits::from_settings(settings),
            events,
        })
    }

    /// One outcome per event, in input order, once the accepted ones are committed.
    pub async fn record(
        &self,
        events: &[pb::TransactionEvent],
        channel: Channel,
    ) -> Result<Vec<Outcome>, IngestError> {
        self.record_consumed(events, channel, None, async |_| Ok(()))
            .await
    }

    /// Like [`TransactionRecorder::record`], storing Kafka positions in the same transaction;
    /// `before_commit` sees the invalid events first (to dead-letter them).
    pub async fn record_consumed<H>(
        &self,
        events: &[pb::TransactionEvent],
        channel: Channel,
        consumed: Option<ConsumedBatch<'_>>,
        before_commit: H,
    ) -> Result<Vec<Outcome>, IngestError>
    where
        H: AsyncFnOnce(Vec<(usize, FieldError)>) -> Result<(), IngestError>,
    {
        let now = Utc::now();
        let validated: Vec<Result<TransactionEvent, FieldError>> = events
            .iter()
            .map(|e| validate::validate_transaction(e, &self.limits, now))
            .collect();
        let mut outcomes: Vec<Option<Outcome>> = validated
            .iter()
            .map(|r| r.as_ref().err().map(|e| Outcome::Invalid(e.clone())))
            .collect();
        let tenants: Vec<Option<&str>> = validated
            .iter()
            .map(|r| r.as_ref().ok().map(|e| e.identity.tenant_id.as_str()))
            .collect();
        self.ingestor
            .resolve_tenants(&tenants, &mut outcomes)
            .await?;

        let hashes: Vec<Option<[u8; 32]>> = validated
            .iter()
            .map(|r| r.as_ref().ok().map(TransactionEvent::payload_hash))
            .collect();
        let mut first_of: HashMap<&EventIdentity, usize> = HashMap::new();
        let mut candidates: Vec<(&TransactionEvent, [u8; 32])> = Vec::new();
        for (index, result) in validated.iter().enumerate() {
            if let (None, Ok(event), Some(hash)) = (&outcomes[index], result, hashes[index])
                && !first_of.contains_key(&event.identity)
            {
                first_of.insert(&event.identity, index);
                candidates.push((event, hash));
            }
        }
        before_commit(invalid_so_far(&outcomes)).await?;

        let mut tx = self.pool.begin().await?;
        // The lifecycle rollups read the tenants' currency and time zone in this transaction;
        // held like a usage batch's, they cannot change between that and the history check of
        // UpdateTenant.
        let tenants: Vec<&str> = candidates
            .iter()
            .map(|(e, _)| e.identity.tenant_id.as_str())
            .collect();
        store::tenants::hold_currencies(&mut tx, &tenants).await?;
        let inserted: HashSet<EventIdentity> =
            store::transactions::insert_new(&mut tx, &candidates, channel.as_str())
                .await?
                .into_iter()
                .collect();
        let touched: store::usage_by_state::Transactions<'_> = candidates
            .iter()
            .filter(|(e, _)| inserted.contains(&e.identity))
            .map(|(e, _)| (e.identity.tenant_id.as_str(), e.transaction_id.as_str()))
            .collect();
        store::usage_by_state::apply_state_changes(&mut tx, &touched).await?;
        store::lifecycle_rollups::apply(&mut tx, &touched).await?;
        let existing: Vec<&EventIdentity> = candidates
            .iter()
            .map(|(e, _)| &e.identity)
            .filter(|identity| !inserted.contains(*identity))
            .collect();
        let stored = store::usage::stored_hashes_in(
            &mut tx,
            store::usage::KeyTable::TransactionEvents,
            &existing,
        )
        .await?;
        let differing: Vec<&EventIdentity> = validated
            .iter()
            .zip(&hashes)
            .filter_map(|(r, h)| Some((r.as_ref().ok()?, (*h)?)))
            .filter(|(e, h)| stored.get(&e.identity).is_some_and(|w| w != h))
            .map(|(e, _)| &e.identity)
            .collect();
        let stored_events = store::transactions::stored_events(&mut tx, &differing).await?;
        let mut conflicts: Vec<(&TransactionEvent, [u8; 32], String)> = Vec::new();
        for (index, result) in validated.iter().enumerate() {
            let (None, Ok(event), Some(hash)) = (&outcomes[index], result, hashes[index]) else {
                continue;
            };
            let first = first_of.get(&event.identity) == Some(&index);
            let winner = if inserted.contains(&event.identity) {
                hashes[first_of[&event.identity]]
            } else {
                stored.get(&event.identity).copied()
            };
            let outcome = if first && inserted.contains(&event.identity) {
                Outcome::Accepted { unpriced: false }
            } else if winner == Some(hash) {
                Outcome::Duplicate
            } else {
                let winner = if inserted.contains(&event.identity) {
                    validated[first_of[&event.identity]].as_ref().ok()
                } else {
                    stored_events.get(&event.identity)
                };
                let field = winner
                    .and_then(|w| w.first_difference(event))
                    .unwrap_or_else(|| "payload".to_owned());
                conflicts.push((event, hash, field.clone()));
                Outcome::Conflict { field }
            };
            outcomes[index] = Some(outcome);
        }
        store::transactions::insert_conflicts(&mut tx, &conflicts, channel.as_str()).await?;
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
        for outcome in &outcomes {
            let label = match outcome {
                Outcome::Accepted { .. } => "accepted",
                Outcome::Duplicate => "duplicate",
                Outcome::Conflict { .. } => "conflict",
                Outcome::Invalid(_) => "invalid",
            };
            self.events
                .with_label_values(&[channel.as_str(), label])
                .inc();
        }
        Ok(outcomes)
    }
}

//! Hourly rollups: the sums quotas, invoices and reports read. Built in memory per batch and
//! added to the stored rows in the same transaction as the raw events, so addition must be
//! associative and commutative — any order or split of the same events gives the same rows.

use std::collections::BTreeMap;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use rust_decimal::Decimal;

use super::pricing::PricedUsage;
use super::tokens::TokenClass;
use super::usage::UsageEvent;

/// tenant × hour × agent × transaction × service × provider × model × class × currency.
/// Absent transaction and service are `""` so they take part in the key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RollupKey {
    pub tenant_id: String,
    pub hour: DateTime<Utc>,
    pub agent_id: String,
    pub transaction_id: String,
    pub service: String,
    pub provider: String,
    pub model: String,
    pub class: TokenClass,
    pub currency: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RollupValue {
    pub tokens: i64,
    /// Exact, unrounded; priced tokens only.
    pub billed: Decimal,
    pub cost: Decimal,
    pub unpriced_tokens: i64,
    /// Events with tokens of this class / of those, the ones whose class had no rate.
    pub class_events: i64,
    pub class_unpriced_events: i64,
    /// Distinct events, counted on one row per event (see [`RollupBatch::add`]).
    pub events: i64,
    pub unpriced_events: i64,
}

impl RollupValue {
    pub fn merge(&mut self, other: &RollupValue) {
        self.tokens += other.tokens;
        self.billed += other.billed;
        self.cost += other.cost;
        self.unpriced_tokens += other.unpriced_tokens;
        self.class_events += other.class_events;
        self.class_unpriced_events += other.class_unpriced_events;
        self.events += other.events;
        self.unpriced_events += other.unpriced_events;
    }
}

/// Rollup deltas of a batch, ordered by key so concurrent writers lock rows in the same order
/// and cannot deadlock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RollupBatch(BTreeMap<RollupKey, RollupValue>);

impl RollupBatch {
    /// Adds one accepted event. It contributes a row per class with tokens; its distinct-event
    /// count goes on its first class with tokens (input if it has none), so a query summing
    /// across classes counts it once.
    pub fn add(&mut self, event: &UsageEvent, priced: &PricedUsage) {
        let hour = event
            .occurred_at
            .duration_trunc(TimeDelta::hours(1))
            .unwrap_or(event.occurred_at);
        let key = |class: TokenClass| RollupKey {
            tenant_id: event.identity.tenant_id.clone(),
            hour,
            agent_id: event.agent_id.clone(),
            transaction_id: event.transaction_id.clone().unwrap_or_default(),
            service: event.service.clone().unwrap_or_default(),
            provider: event.provider.clone(),
            model: event.model.clone(),
            class,
            currency: priced.currency.clone(),
        };
        let first_class = event
            .tokens
            .non_zero()
            .next()
            .map_or(TokenClass::Input, |(class, _)| class);
        let event_unpriced = i64::from(priced.is_unpriced());
        self.0
            .entry(key(first_class))
            .or_default()
            .merge(&RollupValue {
                events: 1,
                unpriced_events: event_unpriced,
                ..RollupValue::default()
            });
        for (class, count) in event.tokens.non_zero() {
            let delta = match priced.charges[class.index()] {
                Some((billed, cost)) => RollupValue {
                    tokens: count,
                    billed,
                    cost,
                    class_events: 1,
                    ..RollupValue::default()
                },
                None => RollupValue {
                    tokens: count,
                    unpriced_tokens: count,
                    class_events: 1,
                    class_unpriced_events: 1,
                    ..RollupValue::default()
                },
            };
            self.0.entry(key(class)).or_default().merge(&delta);
        }
    }

    pub fn merge(&mut self, other: &RollupBatch) {
        for (key, value) in &other.0 {
            self.0.entry(key.clone()).or_default().merge(value);
        }
    }

    pub fn rows(&self) -> impl Iterator<Item = (&RollupKey, &RollupValue)> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

//! Hourly rollups: the sums quotas, invoices and reports read. Built in memory per batch and
//! added to the stored rows in the same transaction as the raw events, so addition must be
//! associative and commutative — any order or split of the same events gives the same rows.

use std::collections::BTreeMap;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use rust_decimal::Decimal;

use super::pricing::PricedUsage;
use super::tokens::{CLASS_COUNT, TokenClass};
use super::usage::UsageEvent;

/// tenant × hour × agent × transaction × service × provider × model × currency: the rollup key
/// without the class, built once per event. Absent transaction and service are `""` so they
/// take part in the key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RollupKey {
    pub tenant_id: String,
    pub hour: DateTime<Utc>,
    pub agent_id: String,
    pub transaction_id: String,
    pub service: String,
    pub provider: String,
    pub model: String,
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

    fn is_zero(&self) -> bool {
        *self == RollupValue::default()
    }
}

/// Rollup deltas of a batch, one row per (key, class), ordered so concurrent writers lock rows
/// in the same order and cannot deadlock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RollupBatch(BTreeMap<RollupKey, [RollupValue; CLASS_COUNT]>);

impl RollupBatch {
    /// Adds one accepted event. It contributes a row per class with tokens; its distinct-event
    /// count goes on its first class with tokens (input if it has none), so a query summing
    /// across classes counts it once.
    pub fn add(&mut self, event: &UsageEvent, priced: &PricedUsage) {
        let hour = event
            .occurred_at
            .duration_trunc(TimeDelta::hours(1))
            .unwrap_or(event.occurred_at);
        let key = RollupKey {
            tenant_id: event.identity.tenant_id.clone(),
            hour,
            agent_id: event.agent_id.clone(),
            transaction_id: event.transaction_id.clone().unwrap_or_default(),
            service: event.service.clone().unwrap_or_default(),
            provider: event.provider.clone(),
            model: event.model.clone(),
            currency: priced.currency.clone(),
        };
        let rows = self.0.entry(key).or_default();
        let first_class = event
            .tokens
            .non_zero()
            .next()
            .map_or(TokenClass::Input, |(class, _)| class);
        rows[first_class.index()].merge(&RollupValue {
            events: 1,
            unpriced_events: i64::from(priced.is_unpriced()),
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
            rows[class.index()].merge(&delta);
        }
    }

    pub fn merge(&mut self, other: &RollupBatch) {
        for (key, values) in &other.0 {
            let rows = self.0.entry(key.clone()).or_default();
            for (row, value) in rows.iter_mut().zip(values) {
                row.merge(value);
            }
        }
    }

    /// Every non-empty (key, class) row, in key then class order.
    pub fn rows(&self) -> impl Iterator<Item = (&RollupKey, TokenClass, &RollupValue)> {
        self.0.iter().flat_map(|(key, values)| {
            TokenClass::ALL
                .into_iter()
                .zip(values.iter())
                .filter(|(_, value)| !value.is_zero())
                .map(move |(class, value)| (key, class, value))
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rows().next().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::tokens::TokenCounts;
    use crate::domain::usage::{CallStatus, EventIdentity, UsageSource};
    use chrono::TimeZone;
    use proptest::prelude::*;
    use rust_decimal::Decimal;

    /// (tenant, agent, minutes after the epoch hour, tokens by class, priced classes mask)
    type Spec = (u8, u8, u16, [i64; CLASS_COUNT], u16);

    fn event_and_price(index: usize, spec: &Spec) -> (UsageEvent, PricedUsage) {
        let (tenant, agent, minute, buckets, priced_mask) = *spec;
        let tokens = TokenCounts::new(buckets).expect("non-negative");
        let event = UsageEvent {
            first_release_tokens: None,
            identity: EventIdentity {
                tenant_id: format!("t{tenant}"),
                source: "s".into(),
                event_id: format!("e{index}"),
            },
            agent_id: format!("a{agent}"),
            transaction_id: (agent % 2 == 0).then(|| "tx".to_owned()),
            service: None,
            session_id: None,
            request_id: None,
            reservation_id: None,
            provider: "openai".into(),
            model: "m".into(),
            occurred_at: Utc
                .timestamp_opt(1_780_000_000 + i64::from(minute) * 60, 0)
                .single()
                .expect("time"),
            tokens,
            usage_source: UsageSource::ProviderReported,
            status: CallStatus::Success,
            attributes: Default::default(),
        };
        let mut priced = PricedUsage {
            currency: "USD".into(),
            version_id: None,
            charges: [None; CLASS_COUNT],
            billed: Decimal::ZERO,
            cost: Decimal::ZERO,
            unpriced_tokens: 0,
        };
        for (class, count) in tokens.non_zero() {
            if priced_mask & (1 << class.index()) != 0 {
                let billed = Decimal::new(count * 3, 6);
                let cost = Decimal::new(count * 2, 6);
                priced.charges[class.index()] = Some((billed, cost));
                priced.billed += billed;
                priced.cost += cost;
            } else {
                priced.unpriced_tokens += count;
            }
        }
        (event, priced)
    }

    fn specs() -> impl Strategy<Value = Vec<Spec>> {
        let buckets = prop::array::uniform12(prop_oneof![Just(0i64), 1i64..10_000]);
        prop::collection::vec((0u8..3, 0u8..3, 0u16..180, buckets, any::<u16>()), 0..60)
    }

    proptest! {
        #[test]
        fn any_order_and_any_split_into_batches_gives_the_same_rollup(
            specs in specs(),
            seed in any::<u64>(),
            cuts in prop::collection::vec(1usize..8, 1..8),
        ) {
            let events: Vec<(UsageEvent, PricedUsage)> =
                specs.iter().enumerate().map(|(i, s)| event_and_price(i, s)).collect();
            let mut whole = RollupBatch::default();
            for (event, priced) in &events {
                whole.add(event, priced);
            }

            // Shuffle deterministically from the seed, then fold batch by batch.
            let mut order: Vec<usize> = (0..events.len()).collect();
            let mut state = seed | 1;
            for i in (1..order.len()).rev() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                order.swap(i, usize::try_from(state % (i as u64 + 1)).expect("index"));
            }
            let mut merged = RollupBatch::default();
            let mut rest = order.as_slice();
            let mut sizes = cuts.iter().cycle();
            while !rest.is_empty() {
                let size = (*sizes.next().expect("cycle")).min(rest.len());
                let (part, tail) = rest.split_at(size);
                let mut batch = RollupBatch::default();
                for i in part {
                    batch.add(&events[*i].0, &events[*i].1);
                }
                merged.merge(&batch);
                rest = tail;
            }

            prop_assert_eq!(&merged, &whole);
            let distinct: i64 = whole.rows().map(|(_, _, v)| v.events).sum();
            prop_assert_eq!(distinct, i64::try_from(events.len()).expect("len"));
            let tokens: i64 = whole.rows().map(|(_, _, v)| v.tokens).sum();
            prop_assert_eq!(tokens, events.iter().map(|(e, _)| e.tokens.total()).sum::<i64>());
        }
    }
}

//! Token-to-revenue attribution: sets the revenue of service transactions against the tokens
//! spent on them, per group of tenant / agent / service / provider / model and time bucket.
//!
//! Placement is by event, so rows add up across buckets: lifecycle counts and money in the
//! bucket of their lifecycle event, tokens and spend in the bucket of each usage hour. Failed
//! and refunded spend use each transaction's state now. When rows are per model (or provider),
//! a transaction's revenue is split over the models in proportion to its spend on each, so
//! model rows still sum to the total; its counts go to every model it used (not additive).
//! Currencies are never mixed: every row has one.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use rust_decimal::{Decimal, RoundingStrategy};

use super::tokens::CLASS_COUNT;
use super::transaction::State;

/// Which dimensions rows are grouped by (the time bucket always is).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Grouping {
    pub tenant: bool,
    pub agent: bool,
    pub service: bool,
    pub provider: bool,
    pub model: bool,
}

impl Grouping {
    pub fn by_model(self) -> bool {
        self.provider || self.model
    }
}

/// Usage of one (bucket, tenant, agent, service, provider, model, currency) spent on
/// transactions now in one state, or on none. Which transactions does not matter here: only
/// their state decides where the spend counts (failed, refunded, unattributed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageFact {
    pub bucket: DateTime<Utc>,
    pub tenant_id: String,
    pub agent_id: String,
    pub service: String,
    pub provider: String,
    pub model: String,
    pub currency: String,
    /// The transactions' state now; `None` for usage with no transaction (unattributed).
    pub state: Option<State>,
    pub tokens: [i64; CLASS_COUNT],
    pub spend: Decimal,
    pub cost: Decimal,
    pub events: i64,
    pub unpriced_events: i64,
}

/// What a lifecycle event adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifecycleKind {
    Started,
    Completed,
    Failed,
    Refunded,
    Reversed,
}

/// One lifecycle event, with the transaction's agent and service where the event lacks them;
/// or, when rows are not split by model, the events of one row and kind added up by the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleFact {
    pub bucket: DateTime<Utc>,
    pub tenant_id: String,
    pub agent_id: String,
    pub service: String,
    /// The event's transaction; empty for an added-up fact.
    pub transaction_id: String,
    /// Distinct transactions the fact stands for: 1 for one event, the row's count of distinct
    /// transactions with this kind of event for an added-up fact.
    pub transactions: i64,
    pub kind: LifecycleKind,
    /// Revenue of a completion, refunded amount, or the net revenue a reversal takes back
    /// (their sum for an added-up fact).
    pub amount: Decimal,
    /// The money's currency; for money-less events the tenant's billing currency.
    pub currency: String,
}

/// A transaction's all-time spend on one model: the weight of its revenue on that model's
/// rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpend {
    pub tenant_id: String,
    pub transaction_id: String,
    pub provider: String,
    pub model: String,
    pub spend: Decimal,
}

/// Providers and models a report is restricted to (empty = all). A transaction's revenue then
/// counts only for its share of spend on those models.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelFilter {
    pub providers: Vec<String>,
    pub models: Vec<String>,
}

impl ModelFilter {
    pub fn is_empty(&self) -> bool {
        self.providers.is_empty() && self.models.is_empty()
    }

    pub fn matches(&self, provider: &str, model: &str) -> bool {
        (self.providers.is_empty() || self.providers.iter().any(|p| p == provider))
            && (self.models.is_empty() || self.models.iter().any(|m| m == model))
    }
}

/// The key of a row: bucket, the grouped dimensions (empty when not grouped), currency.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RowKey {
    pub bucket: DateTime<Utc>,
    pub tenant_id: Option<String>,
    pub agent_id: Option<String>,
    pub service: Option<String>,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub currency: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Row {
    pub started: i64,
    pub completed: i64,
    pub failed: i64,
    pub refunded: i64,
    pub reversed: i64,
    pub revenue: Decimal,
    /// Refunds plus reversed revenue, positive.
    pub refunds: Decimal,
    pub tokens: [i64; CLASS_COUNT],
    pub spend: Decimal,
    pub cost: Decimal,
    pub usage_events: i64,
    pub unpriced_events: i64,
    pub failed_spend: Decimal,
    pub refunded_spend: Decimal,
    pub unattributed_spend: Decimal,
    pub unattributed_tokens: i64,
}

/// Ratios are rounded half-even to this many fractional digits.
pub const RATIO_SCALE: u32 = 6;

impl Row {
    pub fn net_revenue(&self) -> Decimal {
        self.revenue - self.refunds
    }

    pub fn total_tokens(&self) -> i64 {
        self.tokens.iter().sum()
    }

    pub fn gross_margin(&self) -> Decimal {
        self.net_revenue() - self.spend
    }

    pub fn token_margin(&self) -> Decimal {
        self.spend - self.cost
    }

    pub fn spend_to_revenue(&self) -> Option<Decimal> {
        ratio(self.spend, self.net_revenue())
    }

    pub fn cost_to_revenue(&self) -> Option<Decimal> {
        ratio(self.cost, self.net_revenue())
    }

    pub fn tokens_per_completed(&self) -> Option<Decimal> {
        ratio(
            Decimal::from(self.total_tokens()),
            Decimal::from(self.completed),
        )
    }

    pub fn spend_per_completed(&self) -> Option<Decimal> {
        ratio(self.spend, Decimal::from(self.completed))
    }

    pub fn cost_per_completed(&self) -> Option<Decimal> {
        ratio(self.cost, Decimal::from(self.completed))
    }

    /// net revenue ÷ (tokens / 1000), computed as net × 1000 ÷ tokens to stay exact.
    pub fn revenue_per_1k_tokens(&self) -> Option<Decimal> {
        ratio(
            self.net_revenue() * Decimal::ONE_THOUSAND,
            Decimal::from(self.total_tokens()),
        )
    }
}

/// `a ÷ b` rounded half-even to [`RATIO_SCALE`] digits; `None` when `b` is zero.
fn ratio(a: Decimal, b: Decimal) -> Option<Decimal> {
    if b.is_zero() {
        return None;
    }
    a.checked_div(b)
        .map(|q| q.round_dp_with_strategy(RATIO_SCALE, RoundingStrategy::MidpointNearestEven))
}

/// A (provider, model) and the spend that weighs it.
type Weighted<'a> = ((&'a str, &'a str), Decimal);

/// Builds the rows from the facts. `shares` (every model of each transaction, unfiltered) are
/// needed when grouping by model or provider, or filtering by them; usage facts are expected
/// already filtered.
pub fn attribute(
    usage: &[UsageFact],
    lifecycle: &[LifecycleFact],
    shares: &[ModelSpend],
    grouping: Grouping,
    filter: &ModelFilter,
) -> BTreeMap<RowKey, Row> {
    let mut attribution = Attribution::new(grouping, filter);
    for fact in usage {
        attribution.add_usage(fact);
    }
    attribution.add_lifecycle(lifecycle, shares);
    attribution.finish()
}

/// Rows built up as facts arrive — usage in any order, lifecycle facts a few transactions at a
/// time — so that a report split by model need not hold every lifecycle fact of its range at
/// once. [`attribute`] is the same over facts already in memory.
pub struct Attribution<'f> {
    grouping: Grouping,
    filter: &'f ModelFilter,
    rows: BTreeMap<RowKey, Row>,
}

impl<'f> Attribution<'f> {
    pub fn new(grouping: Grouping, filter: &'f ModelFilter) -> Self {
        Self {
            grouping,
            filter,
            rows: BTreeMap::new(),
        }
    }

    fn key(
        &self,
        bucket: DateTime<Utc>,
        tenant: &str,
        agent: &str,
        service: &str,
        model: Option<(&str, &str)>,
        currency: &str,
    ) -> RowKey {
        let grouping = self.grouping;
        RowKey {
            bucket,
            tenant_id: grouping.tenant.then(|| tenant.to_owned()),
            agent_id: grouping.agent.then(|| agent.to_owned()),
            service: grouping.service.then(|| service.to_owned()),
            provider: grouping
                .provider
                .then(|| model.map(|(p, _)| p.to_owned()).unwrap_or_default()),
            model: grouping
                .model
                .then(|| model.map(|(_, m)| m.to_owned()).unwrap_or_default()),
            currency: currency.to_owned(),
        }
    }

    pub fn add_usage(&mut self, fact: &UsageFact) {
        let key = self.key(
            fact.bucket,
            &fact.tenant_id,
            &fact.agent_id,
            &fact.service,
            Some((&fact.provider, &fact.model)),
            &fact.currency,
        );
        let row = self.rows.entry(key).or_default();
        for (total, n) in row.tokens.iter_mut().zip(fact.tokens) {
            *total += n;
        }
        row.spend += fact.spend;
        row.cost += fact.cost;
        row.usage_events += fact.events;
        row.unpriced_events += fact.unpriced_events;
        match fact.state {
            None => {
                row.unattributed_spend += fact.spend;
                row.unattributed_tokens += fact.tokens.iter().sum::<i64>();
            }
            Some(State::Failed) => row.failed_spend += fact.spend,
            Some(State::Refunded | State::Reversed) => row.refunded_spend += fact.spend,
            Some(_) => {}
        }
    }

    /// Adds lifecycle facts with the model spend of their transactions. Every fact of a
    /// transaction must come in the same call: transactions are counted once per row and kind
    /// among the facts of one call.
    pub fn add_lifecycle(&mut self, lifecycle: &[LifecycleFact], shares: &[ModelSpend]) {
        // Per model rows: each transaction's models and their share of its spend.
        let mut weights: BTreeMap<(&str, &str), Vec<Weighted<'_>>> = BTreeMap::new();
        if self.grouping.by_model() || !self.filter.is_empty() {
            for share in shares {
                weights
                    .entry((&share.tenant_id, &share.transaction_id))
                    .or_default()
                    .push(((&share.provider, &share.model), share.spend));
            }
        }
        // Distinct transactions counted per row and kind.
        let mut counted: BTreeSet<(RowKey, &str, u8)> = BTreeSet::new();
        for fact in lifecycle {
            let models = weights.get(&(fact.tenant_id.as_str(), fact.transaction_id.as_str()));
            let placements: Vec<(Option<(&str, &str)>, Decimal)> = match models {
                Some(models) if !models.is_empty() => split(fact.amount, models),
                _ => vec![(None, fact.amount)],
            };
            for (model, amount) in placements {
                if let Some((provider, name)) = model
                    && !self.filter.matches(provider, name)
                {
                    continue;
                }
                if model.is_none() && !self.filter.is_empty() {
                    // A transaction with no usage on the filtered models is not in the report.
                    continue;
                }
                let row_key = self.key(
                    fact.bucket,
                    &fact.tenant_id,
                    &fact.agent_id,
                    &fact.service,
                    model,
                    &fact.currency,
                );
                let kind = fact.kind as u8;
                let first = counted.insert((row_key.clone(), &fact.transaction_id, kind));
                let row = self.rows.entry(row_key).or_default();
                let count = if first { fact.transactions } else { 0 };
                match fact.kind {
                    LifecycleKind::Started => row.started += count,
                    LifecycleKind::Completed => {
                        row.completed += count;
                        row.revenue += amount;
                    }
                    LifecycleKind::Failed => row.failed += count,
                    LifecycleKind::Refunded => {
                        row.refunded += count;
                        row.refunds += amount;
                    }
                    LifecycleKind::Reversed => {
                        row.reversed += count;
                        row.refunds += amount;
                    }
                }
            }
        }
    }

    pub fn finish(self) -> BTreeMap<RowKey, Row> {
        self.rows
    }
}

/// Splits `amount` over models in proportion to their spend, exactly: every share but the
/// last is rounded to the amount's scale + 6 digits and the last takes the remainder, so the
/// parts always sum to `amount`. With no spend at all, shares are equal.
fn split<'a>(
    amount: Decimal,
    models: &[Weighted<'a>],
) -> Vec<(Option<(&'a str, &'a str)>, Decimal)> {
    let total: Decimal = models.iter().map(|(_, s)| *s).sum();
    let count = Decimal::from(models.len());
    let scale = amount.scale() + RATIO_SCALE;
    let mut parts = Vec::with_capacity(models.len());
    let mut given = Decimal::ZERO;
    for (i, (model, spend)) in models.iter().enumerate() {
        let part = if i + 1 == models.len() {
            amount - given
        } else {
            let weight = if total.is_zero() {
                Decimal::ONE / count
            } else {
                *spend / total
            };
            (amount * weight).round_dp_with_strategy(scale, RoundingStrategy::MidpointNearestEven)
        };
        given += part;
        parts.push((Some(*model), part));
    }
    parts
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use rust_decimal::dec;

    use super::*;

    fn day(d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, d, 0, 0, 0).unwrap()
    }

    fn usage(
        transaction: Option<(&str, State)>,
        model: &str,
        input: i64,
        spend: Decimal,
        cost: Decimal,
    ) -> UsageFact {
        let mut tokens = [0; CLASS_COUNT];
        tokens[0] = input;
        UsageFact {
            bucket: day(1),
            tenant_id: "acme".into(),
            agent_id: "courier-bot".into(),
            service: "food-delivery".into(),
            provider: "openai".into(),
            model: model.into(),
            currency: "USD".into(),
            state: transaction.map(|(_, s)| s),
            tokens,
            spend,
            cost,
            events: 1,
            unpriced_events: 0,
        }
    }

    fn lifecycle(transaction: &str, kind: LifecycleKind, amount: Decimal) -> LifecycleFact {
        LifecycleFact {
            bucket: day(1),
            tenant_id: "acme".into(),
            agent_id: "courier-bot".into(),
            service: "food-delivery".into(),
            transaction_id: transaction.into(),
            transactions: 1,
            kind,
            amount,
            currency: "USD".into(),
        }
    }

    #[test]
    fn one_row_sets_revenue_net_of_refunds_against_spend() {
        let rows = attribute(
            &[
                usage(
                    Some(("o1", State::Refunded)),
                    "gpt-4.1",
                    40_000,
                    dec!(0.40),
                    dec!(0.30),
                ),
                usage(
                    Some(("o2", State::Failed)),
                    "gpt-4.1",
                    10_000,
                    dec!(0.10),
                    dec!(0.05),
                ),
                usage(None, "gpt-4.1", 5_000, dec!(0.05), dec!(0.02)),
            ],
            &[
                lifecycle("o1", LifecycleKind::Started, Decimal::ZERO),
                lifecycle("o1", LifecycleKind::Completed, dec!(30.00)),
                lifecycle("o1", LifecycleKind::Refunded, dec!(4.00)),
                lifecycle("o1", LifecycleKind::Refunded, dec!(1.00)),
                lifecycle("o2", LifecycleKind::Started, Decimal::ZERO),
                lifecycle("o2", LifecycleKind::Failed, Decimal::ZERO),
            ],
            &[],
            Grouping::default(),
            &ModelFilter::default(),
        );
        assert_eq!(rows.len(), 1);
        let row = rows.values().next().unwrap();
        assert_eq!(
            (row.started, row.completed, row.failed, row.refunded),
            (2, 1, 1, 1)
        );
        assert_eq!(row.revenue, dec!(30.00));
        // 4.00 + 1.00
        assert_eq!(row.refunds, dec!(5.00));
        assert_eq!(row.net_revenue(), dec!(25.00));
        // 0.40 + 0.10 + 0.05
        assert_eq!(row.spend, dec!(0.55));
        assert_eq!(row.cost, dec!(0.37));
        assert_eq!(row.total_tokens(), 55_000);
        assert_eq!(row.failed_spend, dec!(0.10));
        assert_eq!(row.refunded_spend, dec!(0.40));
        assert_eq!(
            (row.unattributed_spend, row.unattributed_tokens),
            (dec!(0.05), 5_000)
        );
        // 25.00 − 0.55
        assert_eq!(row.gross_margin(), dec!(24.45));
        // 0.55 − 0.37
        assert_eq!(row.token_margin(), dec!(0.18));
        // 0.55 ÷ 25.00 = 0.022
        assert_eq!(row.spend_to_revenue(), Some(dec!(0.022)));
        // 0.37 ÷ 25.00 = 0.0148
        assert_eq!(row.cost_to_revenue(), Some(dec!(0.0148)));
        // 55,000 ÷ 1
        assert_eq!(row.tokens_per_completed(), Some(dec!(55000)));
        // 25.00 × 1000 ÷ 55,000 = 0.454545… → 0.454545
        assert_eq!(row.revenue_per_1k_tokens(), Some(dec!(0.454545)));
    }

    #[test]
    fn added_up_lifecycle_facts_count_the_transactions_they_stand_for() {
        let added_up = |kind, transactions, amount| LifecycleFact {
            transaction_id: String::new(),
            transactions,
            ..lifecycle("", kind, amount)
        };
        let rows = attribute(
            &[],
            &[
                added_up(LifecycleKind::Completed, 3, dec!(90.00)),
                added_up(LifecycleKind::Refunded, 2, dec!(15.00)),
            ],
            &[],
            Grouping::default(),
            &ModelFilter::default(),
        );

        let row = rows.values().next().unwrap();
        assert_eq!((row.completed, row.refunded), (3, 2));
        // 90.00 − 15.00
        assert_eq!(row.net_revenue(), dec!(75.00));
    }

    #[test]
    fn ratios_are_unset_without_a_denominator() {
        let row = Row {
            spend: dec!(1),
            ..Row::default()
        };
        assert_eq!(row.spend_to_revenue(), None);
        assert_eq!(row.tokens_per_completed(), None);
        assert_eq!(row.revenue_per_1k_tokens(), None);
    }

    #[test]
    fn model_rows_split_revenue_by_spend_and_still_sum_to_it() {
        let grouping = Grouping {
            model: true,
            ..Grouping::default()
        };
        let shares = [
            ModelSpend {
                tenant_id: "acme".into(),
                transaction_id: "o1".into(),
                provider: "openai".into(),
                model: "gpt-4.1".into(),
                spend: dec!(0.20),
            },
            ModelSpend {
                tenant_id: "acme".into(),
                transaction_id: "o1".into(),
                provider: "openai".into(),
                model: "gpt-4.1-mini".into(),
                spend: dec!(0.10),
            },
        ];
        let rows = attribute(
            &[
                usage(
                    Some(("o1", State::Completed)),
                    "gpt-4.1",
                    20_000,
                    dec!(0.20),
                    dec!(0.1),
                ),
                usage(
                    Some(("o1", State::Completed)),
                    "gpt-4.1-mini",
                    50_000,
                    dec!(0.10),
                    dec!(0.05),
                ),
            ],
            &[lifecycle("o1", LifecycleKind::Completed, dec!(10.00))],
            &shares,
            grouping,
            &ModelFilter::default(),
        );
        let by_model: BTreeMap<String, &Row> = rows
            .iter()
            .map(|(k, r)| (k.model.clone().unwrap(), r))
            .collect();
        // 10.00 × 0.20 / 0.30 = 6.666666…; the last model takes 10.00 − 6.66666667 = 3.33333333
        assert_eq!(by_model["gpt-4.1"].revenue, dec!(6.66666667));
        assert_eq!(by_model["gpt-4.1-mini"].revenue, dec!(3.33333333));
        assert_eq!(
            by_model.values().map(|r| r.revenue).sum::<Decimal>(),
            dec!(10.00)
        );
        // Counts go to every model the transaction used.
        assert_eq!(by_model["gpt-4.1"].completed, 1);
        assert_eq!(by_model["gpt-4.1-mini"].completed, 1);

        // Filtered to one model, not grouped: only that model's share of the revenue.
        let only_mini = ModelFilter {
            providers: vec![],
            models: vec!["gpt-4.1-mini".into()],
        };
        let rows = attribute(
            &[usage(
                Some(("o1", State::Completed)),
                "gpt-4.1-mini",
                50_000,
                dec!(0.10),
                dec!(0.05),
            )],
            &[lifecycle("o1", LifecycleKind::Completed, dec!(10.00))],
            &shares,
            Grouping::default(),
            &only_mini,
        );
        let row = rows.values().next().unwrap();
        assert_eq!((row.revenue, row.completed), (dec!(3.33333333), 1));
    }

    #[test]
    fn currencies_are_never_mixed() {
        let mut eur = lifecycle("o9", LifecycleKind::Completed, dec!(12));
        eur.currency = "EUR".into();
        let rows = attribute(
            &[usage(
                Some(("o1", State::Completed)),
                "gpt-4.1",
                1_000,
                dec!(0.01),
                dec!(0.005),
            )],
            &[lifecycle("o1", LifecycleKind::Completed, dec!(5)), eur],
            &[],
            Grouping::default(),
            &ModelFilter::default(),
        );
        let currencies: Vec<(&str, Decimal)> = rows
            .iter()
            .map(|(k, r)| (k.currency.as_str(), r.revenue))
            .collect();
        assert_eq!(currencies, vec![("EUR", dec!(12)), ("USD", dec!(5))]);
    }
}

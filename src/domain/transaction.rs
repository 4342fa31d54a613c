//! Service transactions: lifecycle events and the state derived from them.
//!
//! Events arrive in any order and from several producers, so a transaction is never edited:
//! its state is a fold over every event received so far, and inconsistencies between events
//! are reported as anomalies instead of being rejected (rejecting would lose revenue facts).

use std::collections::BTreeMap;

use super::usage::{EventIdentity, PayloadHasher};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

/// What happened to the transaction. Numbers are stored in `transaction_events.kind`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lifecycle {
    Started,
    Completed {
        revenue: Decimal,
        currency: String,
    },
    Failed {
        reason: String,
    },
    Refunded {
        amount: Decimal,
        currency: String,
        reason: String,
    },
    Reversed {
        reason: String,
    },
}

impl Lifecycle {
    pub const fn number(&self) -> i16 {
        match self {
            Lifecycle::Started => 1,
            Lifecycle::Completed { .. } => 2,
            Lifecycle::Failed { .. } => 3,
            Lifecycle::Refunded { .. } => 4,
            Lifecycle::Reversed { .. } => 5,
        }
    }

    /// The money the event carries, if any.
    pub fn money(&self) -> Option<(Decimal, &str)> {
        match self {
            Lifecycle::Completed { revenue, currency } => Some((*revenue, currency)),
            Lifecycle::Refunded {
                amount, currency, ..
            } => Some((*amount, currency)),
            _ => None,
        }
    }

    pub fn reason(&self) -> Option<&str> {
        match self {
            Lifecycle::Failed { reason }
            | Lifecycle::Refunded { reason, .. }
            | Lifecycle::Reversed { reason } => Some(reason),
            _ => None,
        }
    }
}

/// A validated lifecycle event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionEvent {
    pub identity: EventIdentity,
    pub transaction_id: String,
    pub agent_id: Option<String>,
    pub service: Option<String>,
    /// Truncated to whole microseconds (storage precision).
    pub occurred_at: DateTime<Utc>,
    pub lifecycle: Lifecycle,
    pub attributes: BTreeMap<String, String>,
}

impl TransactionEvent {
    /// SHA-256 over a length-prefixed encoding of every payload field: equal → duplicate,
    /// different → conflict. Amounts are hashed normalized, so "10.50" and "10.5" agree.
    pub fn payload_hash(&self) -> [u8; 32] {
        let mut hash = PayloadHasher::default();
        hash.field(self.transaction_id.as_bytes());
        hash.optional(&self.agent_id);
        hash.optional(&self.service);
        hash.field(&self.occurred_at.timestamp_micros().to_le_bytes());
        hash.field(&self.lifecycle.number().to_le_bytes());
        match self.lifecycle.money() {
            Some((amount, currency)) => {
                hash.field(amount.normalize().to_string().as_bytes());
                hash.field(currency.as_bytes());
            }
            None => hash.field(&[]),
        }
        hash.field(self.lifecycle.reason().unwrap_or_default().as_bytes());
        hash.attributes(&self.attributes);
        hash.finish()
    }

    /// The first payload field, in proto field order, in which `other` (a delivery with the
    /// same identity) differs: what a CONFLICT result names. Amounts compare as values.
    pub fn first_difference(&self, other: &TransactionEvent) -> Option<String> {
        let kind_name = |l: &Lifecycle| match l {
            Lifecycle::Started => "started",
            Lifecycle::Completed { .. } => "completed",
            Lifecycle::Failed { .. } => "failed",
            Lifecycle::Refunded { .. } => "refunded",
            Lifecycle::Reversed { .. } => "reversed",
        };
        let (mine, theirs) = (&self.lifecycle, &other.lifecycle);
        let money_field = match mine {
            Lifecycle::Completed { .. } => "completed.revenue",
            _ => "refunded.amount",
        };
        let reason_field = format!("{}.reason", kind_name(mine));
        let differences = [
            (
                "transaction_id".to_owned(),
                self.transaction_id != other.transaction_id,
            ),
            ("agent_id".to_owned(), self.agent_id != other.agent_id),
            ("service".to_owned(), self.service != other.service),
            (
                "occurred_at".to_owned(),
                self.occurred_at != other.occurred_at,
            ),
            ("kind".to_owned(), mine.number() != theirs.number()),
            (
                format!("{money_field}.amount"),
                mine.money().map(|(a, _)| a) != theirs.money().map(|(a, _)| a),
            ),
            (
                format!("{money_field}.currency"),
                mine.money().map(|(_, c)| c) != theirs.money().map(|(_, c)| c),
            ),
            (reason_field, mine.reason() != theirs.reason()),
            ("attributes".to_owned(), self.attributes != other.attributes),
        ];
        differences
            .into_iter()
            .find(|(_, differs)| *differs)
            .map(|(field, _)| field)
    }
}

/// The derived state (proto `TransactionState` numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum State {
    NotStarted = 1,
    Started = 2,
    Completed = 3,
    Failed = 4,
    Refunded = 5,
    Reversed = 6,
}

impl State {
    /// From the proto / SQL number; anything unknown is NOT_STARTED.
    pub fn from_number(number: i16) -> State {
        match number {
            2 => State::Started,
            3 => State::Completed,
            4 => State::Failed,
            5 => State::Refunded,
            6 => State::Reversed,
            _ => State::NotStarted,
        }
    }

    /// The precedence rule, also written in SQL (`transaction_state()` in the migration) so
    /// lists and reports agree with this fold: reversed > refunded > completed > failed >
    /// started. A completion beats a failure because it carries revenue; both are flagged.
    pub fn from_kinds(kinds: &[i16]) -> State {
        let has = |n: i16| kinds.contains(&n);
        if has(5) {
            State::Reversed
        } else if has(2) && has(4) {
            State::Refunded
        } else if has(2) {
            State::Completed
        } else if has(3) {
            State::Failed
        } else if has(1) || has(4) {
            State::Started
        } else {
            State::NotStarted
        }
    }
}

/// A transaction as its events describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub state: State,
    pub agent_id: Option<String>,
    pub service: Option<String>,
    pub first_seen_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub failed_at: Option<DateTime<Utc>>,
    pub reversed_at: Option<DateTime<Utc>>,
    pub last_refunded_at: Option<DateTime<Utc>>,
    /// (gross revenue, currency) of the first completion.
    pub revenue: Option<(Decimal, String)>,
    /// Σ refunds in the revenue's currency (or, without a completion, in the first refund's).
    pub refunded: Option<Decimal>,
    /// revenue − refunded, or 0 when reversed; absent without a completion.
    pub net_revenue: Option<Decimal>,
    pub anomalies: Vec<String>,
    pub updated_at: Option<DateTime<Utc>>,
}

/// Folds events (any order) into the transaction's state.
pub fn summarize(events: &[TransactionEvent]) -> Summary {
    let mut ordered: Vec<&TransactionEvent> = events.iter().collect();
    ordered.sort_by(|a, b| {
        (a.occurred_at, &a.identity.event_id).cmp(&(b.occurred_at, &b.identity.event_id))
    });
    let kinds: Vec<i16> = ordered.iter().map(|e| e.lifecycle.number()).collect();
    let mut summary = Summary {
        state: State::from_kinds(&kinds),
        agent_id: None,
        service: None,
        first_seen_at: ordered.first().map(|e| e.occurred_at),
        started_at: None,
        completed_at: None,
        failed_at: None,
        reversed_at: None,
        last_refunded_at: None,
        revenue: None,
        refunded: None,
        net_revenue: None,
        anomalies: Vec::new(),
        updated_at: ordered.iter().map(|e| e.occurred_at).max(),
    };
    let mut anomalies: Vec<String> = Vec::new();
    let mut refunds: Vec<(Decimal, &str)> = Vec::new();
    for event in &ordered {
        adopt(
            &mut summary.agent_id,
            &event.agent_id,
            "agent_id",
            &mut anomalies,
        );
        adopt(
            &mut summary.service,
            &event.service,
            "service",
            &mut anomalies,
        );
        let at = Some(event.occurred_at);
        match &event.lifecycle {
            Lifecycle::Started => {
                if summary.started_at.is_some() {
                    anomalies.push("started more than once".to_owned());
                } else {
                    summary.started_at = at;
                }
            }
            Lifecycle::Completed { revenue, currency } => {
                if summary.revenue.is_some() {
                    anomalies.push("completed more than once; the first completion counts".into());
                } else {
                    summary.revenue = Some((*revenue, currency.clone()));
                    summary.completed_at = at;
                }
            }
            Lifecycle::Failed { .. } => summary.failed_at = summary.failed_at.or(at),
            Lifecycle::Refunded {
                amount, currency, ..
            } => {
                refunds.push((*amount, currency));
                summary.last_refunded_at = at;
            }
            Lifecycle::Reversed { .. } => summary.reversed_at = summary.reversed_at.or(at),
        }
    }
    if summary.completed_at.is_some() && summary.failed_at.is_some() {
        anomalies.push("completed and failed".to_owned());
    }
    let currency = summary
        .revenue
        .as_ref()
        .map(|(_, c)| c.clone())
        .or_else(|| refunds.first().map(|(_, c)| (*c).to_owned()));
    if let Some(currency) = &currency {
        let mut total = Decimal::ZERO;
        for (amount, refund_currency) in &refunds {
            if refund_currency == currency {
                total += amount;
            } else {
                anomalies.push(format!(
                    "refund currency {refund_currency} differs from revenue currency {currency}"
                ));
            }
        }
        if !refunds.is_empty() {
            summary.refunded = Some(total);
        }
    }
    if !refunds.is_empty() && summary.revenue.is_none() {
        anomalies.push("refunded without a completion".to_owned());
    }
    if let Some((revenue, _)) = &summary.revenue {
        let refunded = summary.refunded.unwrap_or_default();
        if refunded > *revenue {
            anomalies.push("refunds exceed revenue".to_owned());
        }
        summary.net_revenue = Some(if summary.reversed_at.is_some() {
            Decimal::ZERO
        } else {
            revenue - refunded
        });
    }
    anomalies.dedup();
    summary.anomalies = anomalies;
    summary
}

/// Takes the first value seen for an attribute; a later different one is an anomaly.
fn adopt(
    known: &mut Option<String>,
    seen: &Option<String>,
    name: &str,
    anomalies: &mut Vec<String>,
) {
    match (known.as_ref(), seen) {
        (None, Some(value)) => *known = Some(value.clone()),
        (Some(first), Some(value)) if first != value => {
            let anomaly = format!("{name} {value} differs from {first}");
            if !anomalies.contains(&anomaly) {
                anomalies.push(anomaly);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use proptest::prelude::*;
    use rust_decimal::dec;

    use super::*;

    fn at(minute: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 3, 10, minute, 0).unwrap()
    }

    fn event(id: &str, minute: u32, lifecycle: Lifecycle) -> TransactionEvent {
        TransactionEvent {
            identity: EventIdentity {
                tenant_id: "acme".into(),
                source: "shop".into(),
                event_id: id.into(),
            },
            transaction_id: "order-1".into(),
            agent_id: Some("agent-a".into()),
            service: Some("food-delivery".into()),
            occurred_at: at(minute),
            lifecycle,
            attributes: BTreeMap::new(),
        }
    }

    fn completed(amount: Decimal) -> Lifecycle {
        Lifecycle::Completed {
            revenue: amount,
            currency: "USD".into(),
        }
    }

    fn refunded(amount: Decimal, currency: &str) -> Lifecycle {
        Lifecycle::Refunded {
            amount,
            currency: currency.into(),
            reason: "late".into(),
        }
    }

    #[test]
    fn a_conflicting_resend_names_its_first_differing_field() {
        let stored = event("e2", 5, completed(dec!(42.50)));
        let same_value = event("e2", 5, completed(dec!(42.5)));
        let more = event("e2", 5, completed(dec!(43)));
        let later = event("e2", 6, completed(dec!(43)));
        let refund = event("e2", 5, refunded(dec!(42.50), "USD"));
        let mut euros = event("e2", 5, refunded(dec!(42.50), "EUR"));
        euros.attributes.insert("k".into(), "v".into());

        assert_eq!(stored.first_difference(&same_value), None);
        assert_eq!(
            stored.first_difference(&more).as_deref(),
            Some("completed.revenue.amount")
        );
        assert_eq!(
            stored.first_difference(&later).as_deref(),
            Some("occurred_at")
        );
        assert_eq!(stored.first_difference(&refund).as_deref(), Some("kind"));
        assert_eq!(
            event("e3", 5, refunded(dec!(42.50), "USD"))
                .first_difference(&euros)
                .as_deref(),
            Some("refunded.amount.currency")
        );
    }

    #[test]
    fn a_completed_order_refunded_twice_nets_revenue_minus_both_refunds() {
        let summary = summarize(&[
            event("e1", 0, Lifecycle::Started),
            event("e2", 5, completed(dec!(42.50))),
            event("e3", 9, refunded(dec!(10.00), "USD")),
            event("e4", 12, refunded(dec!(2.25), "USD")),
        ]);
        assert_eq!(summary.state, State::Refunded);
        assert_eq!(summary.revenue, Some((dec!(42.50), "USD".to_owned())));
        // 10.00 + 2.25 = 12.25; 42.50 − 12.25 = 30.25
        assert_eq!(summary.refunded, Some(dec!(12.25)));
        assert_eq!(summary.net_revenue, Some(dec!(30.25)));
        assert_eq!(summary.last_refunded_at, Some(at(12)));
        assert!(summary.anomalies.is_empty(), "{:?}", summary.anomalies);
    }

    #[test]
    fn a_reversal_zeroes_net_revenue_whatever_was_refunded() {
        let summary = summarize(&[
            event("e2", 5, completed(dec!(100))),
            event("e3", 6, refunded(dec!(30), "USD")),
            event(
                "e4",
                7,
                Lifecycle::Reversed {
                    reason: "chargeback".into(),
                },
            ),
        ]);
        assert_eq!(summary.state, State::Reversed);
        assert_eq!(summary.net_revenue, Some(Decimal::ZERO));
        assert_eq!(summary.reversed_at, Some(at(7)));
    }

    #[test]
    fn inconsistencies_become_anomalies_not_rejections() {
        let mut other_agent = event(
            "e3",
            3,
            Lifecycle::Failed {
                reason: "timeout".into(),
            },
        );
        other_agent.agent_id = Some("agent-b".into());
        let summary = summarize(&[
            event("e1", 1, completed(dec!(5))),
            other_agent,
            event("e4", 4, refunded(dec!(3), "EUR")),
            event("e5", 5, refunded(dec!(9), "USD")),
        ]);
        assert_eq!(summary.state, State::Refunded);
        assert_eq!(
            summary.refunded,
            Some(dec!(9)),
            "the EUR refund is not mixed in"
        );
        assert_eq!(summary.net_revenue, Some(dec!(-4)));
        assert_eq!(
            summary.anomalies,
            vec![
                "agent_id agent-b differs from agent-a",
                "completed and failed",
                "refund currency EUR differs from revenue currency USD",
                "refunds exceed revenue",
            ]
        );
    }

    #[test]
    fn a_refund_before_any_completion_is_kept_and_flagged() {
        let summary = summarize(&[event("e1", 1, refunded(dec!(7), "USD"))]);
        assert_eq!(summary.state, State::Started);
        assert_eq!(summary.refunded, Some(dec!(7)));
        assert_eq!(summary.net_revenue, None);
        assert_eq!(summary.anomalies, vec!["refunded without a completion"]);
    }

    #[test]
    fn equal_amounts_written_differently_hash_alike_and_any_other_change_does_not() {
        let a = event("e1", 1, completed(dec!(10.50)));
        let b = event("e1", 1, completed(dec!(10.5)));
        assert_eq!(a.payload_hash(), b.payload_hash());
        let mut c = a.clone();
        c.occurred_at = at(2);
        assert_ne!(a.payload_hash(), c.payload_hash());
        let d = event("e1", 1, completed(dec!(10.51)));
        assert_ne!(a.payload_hash(), d.payload_hash());
    }

    fn lifecycle() -> impl Strategy<Value = Lifecycle> {
        prop_oneof![
            Just(Lifecycle::Started),
            (0i64..100_000).prop_map(|c| completed(Decimal::new(c, 2))),
            Just(Lifecycle::Failed { reason: "x".into() }),
            (1i64..10_000).prop_map(|c| refunded(Decimal::new(c, 2), "USD")),
            Just(Lifecycle::Reversed { reason: "x".into() }),
        ]
    }

    proptest! {
        /// Arrival order never changes the derived state: the fold sorts by event time.
        #[test]
        fn any_arrival_order_gives_the_same_summary(
            lifecycles in prop::collection::vec(lifecycle(), 1..8),
            seed in any::<u64>(),
        ) {
            let events: Vec<TransactionEvent> = lifecycles
                .into_iter()
                .enumerate()
                .map(|(i, l)| event(&format!("e{i}"), u32::try_from(i).unwrap(), l))
                .collect();
            let mut shuffled = events.clone();
            let len = shuffled.len();
            for i in 0..len {
                let j = usize::try_from((seed >> (i % 60)) % len as u64).unwrap();
                shuffled.swap(i, j);
            }
            prop_assert_eq!(summarize(&events), summarize(&shuffled));
        }
    }
}

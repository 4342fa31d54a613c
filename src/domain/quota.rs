//! Quota rules: policies, calendar windows in the tenant's time zone, the worst-case hold of a
//! reservation, the allow/deny decision, and threshold crossings. No I/O and no clock: callers
//! pass the instant.
//!
//! Every quantity is a `Decimal` in the unit of its policy's limit (tokens or money). One exact
//! type lets the counters, holds and the decision share one arithmetic; a token quantity is
//! always integral because it is built from integer counts only.

use chrono::{DateTime, Datelike, Days, Utc};
use rust_decimal::Decimal;

use super::FieldError;
use super::period::{BillingCalendar, BillingPeriod, local_midnight};
use super::pricing::{PricedUsage, PricingCatalog, TenantPricing};
use super::tokens::{CLASS_COUNT, TokenClass, TokenCounts};

/// Basis points of a whole limit (100 %).
pub const FULL_BPS: i32 = 10_000;
/// Highest accepted alert threshold: 10× the limit (overage alerts of soft policies).
pub const MAX_THRESHOLD_BPS: i32 = 100_000;
/// Most thresholds per policy, so a crossing writes a bounded number of alert rows.
pub const MAX_THRESHOLDS: usize = 16;
/// Bounds of a money limit, so limit × threshold and used × 10,000 stay far inside the exact
/// decimal range; "unlimited" is no policy, not a huge one.
pub const MAX_MONEY_LIMIT: Decimal = rust_decimal::dec!(1_000_000_000_000_000);
pub const MAX_MONEY_LIMIT_SCALE: u32 = 6;

/// The calendar span a policy sums usage over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Day,
    /// Monday 00:00 to the next Monday 00:00.
    Week,
    Month,
    /// The tenant's billing period (anchor day, clamped to short months).
    BillingPeriod,
}

impl Window {
    pub const ALL: [Window; 4] = [
        Window::Day,
        Window::Week,
        Window::Month,
        Window::BillingPeriod,
    ];

    /// The name stored in `quota_policies.window_kind` and used on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            Window::Day => "day",
            Window::Week => "week",
            Window::Month => "month",
            Window::BillingPeriod => "billing_period",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|w| w.as_str() == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    /// Deny a reservation that would take used + reserved above the limit.
    Hard,
    /// Allow, but flag the policy as over its limit.
    Soft,
}

impl Enforcement {
    pub const fn as_str(self) -> &'static str {
        match self {
            Enforcement::Hard => "hard",
            Enforcement::Soft => "soft",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [Enforcement::Hard, Enforcement::Soft]
            .into_iter()
            .find(|e| e.as_str() == name)
    }
}

/// Whose usage a policy limits, within its tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Tenant,
    Agent(String),
    Service(String),
}

impl Scope {
    /// Whether a call (or event) by `agent_id` for `service` falls under this scope.
    pub fn covers(&self, agent_id: &str, service: Option<&str>) -> bool {
        match self {
            Scope::Tenant => true,
            Scope::Agent(agent) => agent == agent_id,
            Scope::Service(name) => service == Some(name.as_str()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Limit {
    /// Tokens of `classes` (empty = every class) per window.
    Tokens {
        limit: i64,
        classes: Vec<TokenClass>,
    },
    /// Billed amount per window in the tenant's currency, unrounded, before tax.
    Money { amount: Decimal, currency: String },
}

impl Limit {
    pub fn value(&self) -> Decimal {
        match self {
            Limit::Tokens { limit, .. } => Decimal::from(*limit),
            Limit::Money { amount, .. } => *amount,
        }
    }

    /// Rejects non-positive limits and repeated classes; the error names `field`'s child.
    pub fn validate(&self, field: &str) -> Result<(), FieldError> {
        match self {
            Limit::Tokens { limit, classes } => {
                if *limit <= 0 {
                    return Err(FieldError::new(
                        format!("{field}.tokens.limit"),
                        "must be positive",
                    ));
                }
                for (i, class) in classes.iter().enumerate() {
                    if classes[..i].contains(class) {
                        return Err(FieldError::new(
                            format!("{field}.tokens.token_classes[{i}]"),
                            "is repeated",
                        ));
                    }
                }
            }
            Limit::Money { amount, .. } => {
                if *amount <= Decimal::ZERO {
                    return Err(FieldError::new(
                        format!("{field}.money.amount"),
                        "must be positive",
                    ));
                }
                if *amount >= MAX_MONEY_LIMIT || amount.scale() > MAX_MONEY_LIMIT_SCALE {
                    return Err(FieldError::new(
                        format!("{field}.money.amount"),
                        format!(
                            "must be below {MAX_MONEY_LIMIT} with at most {MAX_MONEY_LIMIT_SCALE} decimals"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Thresholds must lie in 1..=[`MAX_THRESHOLD_BPS`], at most [`MAX_THRESHOLDS`] of them;
/// returns them sorted and deduplicated.
pub fn normalize_thresholds(thresholds: &[i32], field: &str) -> Result<Vec<i32>, FieldError> {
    if thresholds.len() > MAX_THRESHOLDS {
        return Err(FieldError::new(
            field,
            format!("at most {MAX_THRESHOLDS} thresholds"),
        ));
    }
    for (i, bps) in thresholds.iter().enumerate() {
        if !(1..=MAX_THRESHOLD_BPS).contains(bps) {
            return Err(FieldError::new(
                format!("{field}[{i}]"),
                format!("must be within 1..={MAX_THRESHOLD_BPS} basis points"),
            ));
        }
    }
    let mut sorted = thresholds.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    Ok(sorted)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub tenant_id: String,
    pub policy_id: String,
    pub name: String,
    pub scope: Scope,
    pub window: Window,
    pub limit: Limit,
    pub enforcement: Enforcement,
    /// Sorted, distinct.
    pub thresholds_bps: Vec<i32>,
    pub disabled: bool,
    pub revision: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Policy {
    /// What a usage of `tokens` (priced as `priced`, if it was) adds to this policy's `used`.
    /// Money policies count the priced classes only: unpriced tokens have no amount to count.
    pub fn usage_amount(&self, tokens: &TokenCounts, priced: Option<&PricedUsage>) -> Decimal {
        match &self.limit {
            Limit::Tokens { classes, .. } => Decimal::from(class_sum(tokens, classes)),
            Limit::Money { .. } => priced.map_or(Decimal::ZERO, |p| p.billed),
        }
    }
}

/// Σ of `classes` in `tokens` (every class when empty). Cannot overflow: a `TokenCounts`
/// total fits in i64.
fn class_sum(tokens: &TokenCounts, classes: &[TokenClass]) -> i64 {
    if classes.is_empty() {
        tokens.total()
    } else {
        classes.iter().map(|c| tokens.get(*c)).sum()
    }
}

/// A half-open window [start, end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Span {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

/// Quota windows are cut with the tenant's billing calendar, so a `BillingPeriod` window is
/// exactly the period its invoice covers.
impl BillingCalendar {
    /// The window of kind `window` that contains `at`.
    pub fn window_at(&self, window: Window, at: DateTime<Utc>) -> Span {
        let today = at.with_timezone(&self.zone).date_naive();
        let (first, next) = match window {
            Window::Day => (today, today + Days::new(1)),
            Window::Week => {
                let monday = today - Days::new(u64::from(today.weekday().num_days_from_monday()));
                (monday, monday + Days::new(7))
            }
            Window::Month => {
                let calendar_month = BillingCalendar {
                    zone: self.zone,
                    anchor_day: 1,
                };
                return calendar_month.period_containing(at).into();
            }
            Window::BillingPeriod => return self.period_containing(at).into(),
        };
        Span {
            start: local_midnight(self.zone, first),
            end: local_midnight(self.zone, next),
        }
    }
}

impl From<BillingPeriod> for Span {
    fn from(period: BillingPeriod) -> Self {
        Span {
            start: period.start,
            end: period.end,
        }
    }
}

/// A gateway's worst case for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    pub tokens: TokenCounts,
    /// The request's output cap (`max_tokens`) when the gateway sent the request shape instead
    /// of counts: tokens that may end up as output or as reasoning, but not both.
    pub output_cap: i64,
}

impl Estimate {
    /// The hold as disjoint buckets: the cap shown as output.
    pub fn held_tokens(&self) -> Result<TokenCounts, FieldError> {
        let mut buckets = self.tokens.buckets();
        let output = &mut buckets[TokenClass::Output.index()];
        *output = output
            .checked_add(self.output_cap)
            .ok_or_else(|| FieldError::new("max_tokens_estimate", "token count overflows"))?;
        TokenCounts::new(buckets)
    }

    /// The hold on a token policy: the cap counts once when the policy covers output or
    /// reasoning (or every class).
    pub fn token_amount(&self, classes: &[TokenClass]) -> Decimal {
        let covers_cap = classes.is_empty()
            || classes.contains(&TokenClass::Output)
            || classes.contains(&TokenClass::Reasoning);
        let cap = if covers_cap { self.output_cap } else { 0 };
        Decimal::from(class_sum(&self.tokens, classes)) + Decimal::from(cap)
    }

    /// The hold on a money policy, priced with the rates in force at `at`; the cap at the
    /// higher of the model's output and reasoning rates. `None` when any held token has no
    /// price: an unpriced call cannot be measured against money.
    pub fn money_amount(
        &self,
        catalog: &PricingCatalog,
        tenant_id: &str,
        tenant: &TenantPricing,
        provider: &str,
        model: &str,
        at: DateTime<Utc>,
    ) -> Option<Decimal> {
        let priced = catalog
            .price_for(tenant_id, tenant, provider, model, at, &self.tokens)
            .ok()?;
        if priced.is_unpriced() {
            return None;
        }
        if self.output_cap == 0 {
            return Some(priced.billed);
        }
        let capped = [TokenClass::Output, TokenClass::Reasoning]
            .into_iter()
            .filter_map(|class| {
                let mut buckets = [0; CLASS_COUNT];
                buckets[class.index()] = self.output_cap;
                let cap = TokenCounts::new(buckets).ok()?;
                let p = catalog
                    .price_for(tenant_id, tenant, provider, model, at, &cap)
                    .ok()?;
                (!p.is_unpriced()).then_some(p.billed)
            })
            .max()?;
        priced.billed.checked_add(capped)
    }
}

/// Why a reservation is denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenialReason {
    LimitExceeded,
    UnpricedModel,
    TenantSuspended,
}

/// One applicable policy's state as the decision sees it (under its counter's row lock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Check {
    pub enforcement: Enforcement,
    pub limit: Decimal,
    pub used: Decimal,
    pub reserved: Decimal,
    /// `None`: the call cannot be priced for this (money) policy.
    pub hold: Option<Decimal>,
}

impl Check {
    /// The hold actually taken on this policy when the call is allowed: nothing for an
    /// unpriced call on a soft money policy (there is no amount to hold).
    pub fn taken(&self) -> Decimal {
        self.hold.unwrap_or(Decimal::ZERO)
    }

    fn exceeds(&self) -> bool {
        self.used + self.reserved + self.taken() > self.limit
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Allowed, but a soft policy is over its limit.
    AllowSoftLimit,
    /// `policy` is the index of the first hard policy that denied.
    Deny {
        policy: usize,
        reason: DenialReason,
    },
}

/// Decides a reservation against every applicable policy at once: denied if any hard policy
/// would go above its limit (or cannot price the call), else allowed, flagged when a soft
/// policy would go above its own. Also returns, per policy, whether it is over its limit
/// after the decision (soft) or denied the call (hard).
pub fn decide(checks: &[Check]) -> (Verdict, Vec<bool>) {
    let denial = checks.iter().enumerate().find_map(|(i, c)| {
        if c.enforcement != Enforcement::Hard {
            return None;
        }
        match c.hold {
            None => Some((i, DenialReason::UnpricedModel)),
            Some(_) if c.exceeds() => Some((i, DenialReason::LimitExceeded)),
            Some(_) => None,
        }
    });
    if let Some((policy, reason)) = denial {
        let flags = checks
            .iter()
            .enumerate()
            .map(|(i, c)| i == policy || c.used + c.reserved > c.limit)
            .collect();
        return (Verdict::Deny { policy, reason }, flags);
    }
    let flags: Vec<bool> = checks.iter().map(Check::exceeds).collect();
    let verdict = if flags.iter().any(|f| *f) {
        Verdict::AllowSoftLimit
    } else {
        Verdict::Allow
    };
    (verdict, flags)
}

/// Thresholds (basis points of `limit`) that `used` reaches for the first time in a move from
/// `before` to `after`.
/// Overflow-free: an amount whose scaled value exceeds the decimal range is past every mark.
pub fn crossed(thresholds: &[i32], limit: Decimal, before: Decimal, after: Decimal) -> Vec<i32> {
    let full = Decimal::from(FULL_BPS);
    let reaches =
        |amount: Decimal, mark: Decimal| amount.checked_mul(full).is_none_or(|a| a >= mark);
    thresholds
        .iter()
        .copied()
        .filter(|bps| match limit.checked_mul(Decimal::from(*bps)) {
            Some(mark) => !reaches(before, mark) && reaches(after, mark),
            None => false,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;
    use proptest::prelude::*;
    use rust_decimal::dec;

    fn utc(text: &str) -> DateTime<Utc> {
        text.parse().expect("rfc3339 instant")
    }

    fn calendar(zone: &str, anchor_day: u32) -> BillingCalendar {
        BillingCalendar {
            zone: zone.parse().expect("zone"),
            anchor_day,
        }
    }

    #[test]
    fn a_day_starts_at_local_midnight_of_the_tenant_zone() {
        let ny = calendar("America/New_York", 1);

        // 03:30 UTC on 9 March is still 8 March, 23:30 in New York: the day EDT began, so it
        // is 23 hours long.
        let span = ny.window_at(Window::Day, utc("2026-03-09T03:30:00Z"));

        assert_eq!(span.start, utc("2026-03-08T05:00:00Z"));
        assert_eq!(span.end, utc("2026-03-09T04:00:00Z"));
    }

    #[test]
    fn dst_days_are_23_and_25_hours_long() {
        let berlin = calendar("Europe/Berlin", 1);

        let spring = berlin.window_at(Window::Day, utc("2026-03-29T12:00:00Z"));
        let autumn = berlin.window_at(Window::Day, utc("2026-10-25T12:00:00Z"));

        assert_eq!(spring.start, utc("2026-03-28T23:00:00Z"));
        assert_eq!(spring.end - spring.start, Duration::hours(23));
        assert_eq!(autumn.start, utc("2026-10-24T22:00:00Z"));
        assert_eq!(autumn.end - autumn.start, Duration::hours(25));
    }

    #[test]
    fn the_next_window_starts_exactly_where_the_last_one_ended() {
        let berlin = calendar("Europe/Berlin", 1);
        let spring = berlin.window_at(Window::Day, utc("2026-03-29T12:00:00Z"));

        let before = berlin.window_at(Window::Day, spring.end - Duration::microseconds(1));
        let after = berlin.window_at(Window::Day, spring.end);

        assert_eq!(before, spring);
        assert_eq!(after.start, spring.end);
        assert_eq!(after.end, utc("2026-03-30T22:00:00Z"));
    }

    #[test]
    fn a_midnight_that_does_not_exist_starts_the_day_at_the_first_local_time_that_does() {
        // Chile moved clocks from 00:00 to 01:00 on 7 September 2025 (America/Santiago).
        let santiago = calendar("America/Santiago", 1);

        let span = santiago.window_at(Window::Day, utc("2025-09-07T12:00:00Z"));

        // 01:00 -03 is 04:00 UTC; the day before started at 00:00 -04.
        assert_eq!(span.start, utc("2025-09-07T04:00:00Z"));
        assert_eq!(span.end - span.start, Duration::hours(23));
    }

    #[test]
    fn weeks_run_monday_to_monday_and_months_to_the_first() {
        let tokyo = calendar("Asia/Tokyo", 1);
        // Wednesday 2026-04-01 10:00 in Tokyo.
        let at = utc("2026-04-01T01:00:00Z");

        let week = tokyo.window_at(Window::Week, at);
        let month = tokyo.window_at(Window::Month, at);

        assert_eq!(week.start, utc("2026-03-29T15:00:00Z")); // Mon 30 Mar 00:00 JST
        assert_eq!(week.end, utc("2026-04-05T15:00:00Z"));
        assert_eq!(month.start, utc("2026-03-31T15:00:00Z"));
        assert_eq!(month.end, utc("2026-04-30T15:00:00Z"));
    }

    #[test]
    fn december_months_end_in_the_next_year() {
        let span = calendar("UTC", 1).window_at(Window::Month, utc("2026-12-31T23:59:59Z"));

        assert_eq!(span.start, utc("2026-12-01T00:00:00Z"));
        assert_eq!(span.end, utc("2027-01-01T00:00:00Z"));
    }

    #[test]
    fn billing_periods_start_on_the_anchor_day_clamped_to_short_months() {
        let cal = calendar("UTC", 31);

        let february = cal.window_at(Window::BillingPeriod, utc("2026-03-10T00:00:00Z"));
        let march = cal.window_at(Window::BillingPeriod, utc("2026-03-31T00:00:00Z"));

        // 28 Feb (clamped) to 31 Mar, then 31 Mar to 30 Apr (clamped).
        assert_eq!(february.start, utc("2026-02-28T00:00:00Z"));
        assert_eq!(february.end, utc("2026-03-31T00:00:00Z"));
        assert_eq!(march.start, utc("2026-03-31T00:00:00Z"));
        assert_eq!(march.end, utc("2026-04-30T00:00:00Z"));
    }

    #[test]
    fn billing_period_with_anchor_one_is_the_calendar_month() {
        let cal = calendar("Europe/Berlin", 1);
        let at = utc("2026-10-25T12:00:00Z");

        assert_eq!(
            cal.window_at(Window::BillingPeriod, at),
            cal.window_at(Window::Month, at)
        );
    }

    proptest! {
        #[test]
        fn every_instant_lies_in_its_window_and_windows_tile(
            seconds in 1_600_000_000i64..1_900_000_000,
            zone in prop::sample::select(vec![
                "UTC", "Europe/Berlin", "America/New_York", "America/Santiago",
                "Australia/Lord_Howe", "Asia/Kolkata",
            ]),
            anchor in 1u32..=31,
            window in prop::sample::select(Window::ALL.to_vec()),
        ) {
            let cal = calendar(zone, anchor);
            let at = DateTime::from_timestamp(seconds, 0).expect("instant");

            let span = cal.window_at(window, at);

            prop_assert!(span.start <= at && at < span.end, "{span:?} {at}");
            prop_assert_eq!(cal.window_at(window, span.end).start, span.end);
            prop_assert_eq!(cal.window_at(window, span.start), span);
        }
    }

    fn counts(input: i64, output: i64, reasoning: i64) -> TokenCounts {
        let mut buckets = [0; CLASS_COUNT];
        buckets[TokenClass::Input.index()] = input;
        buckets[TokenClass::Output.index()] = output;
        buckets[TokenClass::Reasoning.index()] = reasoning;
        TokenCounts::new(buckets).expect("counts")
    }

    #[test]
    fn a_max_tokens_estimate_counts_the_cap_once_for_output_or_reasoning_policies() {
        let estimate = Estimate {
            tokens: counts(1000, 0, 0),
            output_cap: 256,
        };

        assert_eq!(estimate.token_amount(&[]), dec!(1256));
        assert_eq!(
            estimate.token_amount(&[TokenClass::Output, TokenClass::Reasoning]),
            dec!(256)
        );
        assert_eq!(estimate.token_amount(&[TokenClass::Input]), dec!(1000));
        assert_eq!(
            estimate
                .held_tokens()
                .expect("held")
                .get(TokenClass::Output),
            256
        );
    }

    fn catalog(output: &str, reasoning: Option<&str>) -> (PricingCatalog, TenantPricing) {
        use super::super::pricing::{PriceBookVersion, Rate, RateKey};
        let rate = |price: &str| Rate {
            price_per_million: price.parse().expect("price"),
            cost_per_million: Decimal::ZERO,
        };
        let key = |class| RateKey {
            provider: "openai".into(),
            model: "m".into(),
            class,
        };
        let mut rates = std::collections::HashMap::new();
        rates.insert(key(TokenClass::Input), rate("2"));
        rates.insert(key(TokenClass::Output), rate(output));
        if let Some(r) = reasoning {
            rates.insert(key(TokenClass::Reasoning), rate(r));
        }
        let version = PriceBookVersion {
            version_id: "v1".into(),
            price_book_id: "book".into(),
            currency: "USD".into(),
            effective_from: utc("2026-01-01T00:00:00Z"),
            rates,
            tiers: std::collections::HashMap::new(),
        };
        let tenant = TenantPricing {
            currency: "USD".into(),
            price_book_id: "book".into(),
        };
        let tenants = [("t".to_owned(), tenant.clone())].into_iter().collect();
        (PricingCatalog::new(vec![version], tenants, vec![]), tenant)
    }

    #[test]
    fn a_money_estimate_prices_the_cap_at_the_higher_of_output_and_reasoning() {
        let (catalog, tenant) = catalog("8", Some("12"));
        let estimate = Estimate {
            tokens: counts(1000, 0, 0),
            output_cap: 500,
        };

        let amount = estimate.money_amount(
            &catalog,
            "t",
            &tenant,
            "openai",
            "m",
            utc("2026-06-01T00:00:00Z"),
        );

        // 1000 × 2 / 1M + 500 × 12 / 1M = 0.002 + 0.006
        assert_eq!(amount, Some(dec!(0.008)));
    }

    #[test]
    fn a_money_estimate_of_an_unpriced_model_or_class_is_none() {
        let (catalog, tenant) = catalog("8", None);
        let at = utc("2026-06-01T00:00:00Z");
        let unknown_model = Estimate {
            tokens: counts(10, 0, 0),
            output_cap: 0,
        };
        let unpriced_class = Estimate {
            tokens: counts(10, 0, 5),
            output_cap: 0,
        };
        let capped = Estimate {
            tokens: counts(10, 0, 0),
            output_cap: 10,
        };

        assert_eq!(
            unknown_model.money_amount(&catalog, "t", &tenant, "openai", "other", at),
            None
        );
        assert_eq!(
            unpriced_class.money_amount(&catalog, "t", &tenant, "openai", "m", at),
            None
        );
        // Only output is priced: the cap takes that rate. 10 × 2 + 10 × 8, per 1M.
        assert_eq!(
            capped.money_amount(&catalog, "t", &tenant, "openai", "m", at),
            Some(dec!(0.0001))
        );
    }

    fn check(enforcement: Enforcement, limit: i64, used: i64, hold: Option<i64>) -> Check {
        Check {
            enforcement,
            limit: Decimal::from(limit),
            used: Decimal::from(used),
            reserved: Decimal::ZERO,
            hold: hold.map(Decimal::from),
        }
    }

    #[test]
    fn a_hold_that_exactly_fills_a_hard_limit_is_allowed_one_more_is_denied() {
        let exact = [check(Enforcement::Hard, 100, 60, Some(40))];
        let over = [check(Enforcement::Hard, 100, 60, Some(41))];

        assert_eq!(decide(&exact).0, Verdict::Allow);
        assert_eq!(
            decide(&over).0,
            Verdict::Deny {
                policy: 0,
                reason: DenialReason::LimitExceeded
            }
        );
    }

    #[test]
    fn soft_limits_allow_and_flag_while_any_hard_denial_wins() {
        let soft = [
            check(Enforcement::Hard, 100, 0, Some(10)),
            check(Enforcement::Soft, 5, 0, Some(10)),
        ];
        let both = [
            check(Enforcement::Soft, 5, 0, Some(10)),
            check(Enforcement::Hard, 100, 95, Some(10)),
        ];
        let unpriced = [check(Enforcement::Hard, 100, 0, None)];

        assert_eq!(decide(&soft), (Verdict::AllowSoftLimit, vec![false, true]));
        assert_eq!(
            decide(&both).0,
            Verdict::Deny {
                policy: 1,
                reason: DenialReason::LimitExceeded
            }
        );
        assert_eq!(
            decide(&unpriced).0,
            Verdict::Deny {
                policy: 0,
                reason: DenialReason::UnpricedModel
            }
        );
    }

    proptest! {
        /// Whatever the states, an allowed hold never takes a hard policy above its limit,
        /// and a denial always names a hard policy that would have gone above it.
        #[test]
        fn allowed_holds_never_exceed_a_hard_limit(
            states in prop::collection::vec(
                (any::<bool>(), 1i64..1000, 0i64..1000, 0i64..1000, prop::option::of(0i64..500)),
                1..6,
            )
        ) {
            let checks: Vec<Check> = states
                .iter()
                .map(|(hard, limit, used, reserved, hold)| Check {
                    enforcement: if *hard { Enforcement::Hard } else { Enforcement::Soft },
                    limit: Decimal::from(*limit),
                    used: Decimal::from(*used),
                    reserved: Decimal::from(*reserved),
                    hold: hold.map(Decimal::from),
                })
                .collect();

            match decide(&checks).0 {
                Verdict::Deny { policy, .. } => {
                    let c = checks[policy];
                    prop_assert_eq!(c.enforcement, Enforcement::Hard);
                    prop_assert!(c.hold.is_none() || c.exceeds());
                }
                _ => {
                    for c in checks.iter().filter(|c| c.enforcement == Enforcement::Hard) {
                        prop_assert!(c.hold.is_some());
                        prop_assert!(c.used + c.reserved + c.taken() <= c.limit);
                    }
                }
            }
        }
    }

    #[test]
    fn thresholds_are_crossed_once_when_used_reaches_them() {
        let thresholds = [5000, 8000, 10000];

        assert_eq!(
            crossed(&thresholds, dec!(1000), dec!(0), dec!(499)),
            Vec::<i32>::new()
        );
        assert_eq!(
            crossed(&thresholds, dec!(1000), dec!(499), dec!(800)),
            vec![5000, 8000]
        );
        assert_eq!(
            crossed(&thresholds, dec!(1000), dec!(800), dec!(2000)),
            vec![10000]
        );
        assert_eq!(
            crossed(&thresholds, dec!(1000), dec!(800), dec!(800)),
            Vec::<i32>::new()
        );
        // Amounts beyond the decimal range once scaled by 10,000 are past every mark.
        assert_eq!(
            crossed(&[MAX_THRESHOLD_BPS], Decimal::MAX, dec!(0), Decimal::MAX),
            Vec::<i32>::new()
        );
        assert_eq!(
            crossed(&thresholds, dec!(1000), dec!(0), Decimal::MAX),
            vec![5000, 8000, 10000]
        );
    }

    #[test]
    fn limits_and_thresholds_are_validated_naming_the_field() {
        let zero = Limit::Tokens {
            limit: 0,
            classes: vec![],
        };
        let repeated = Limit::Tokens {
            limit: 5,
            classes: vec![TokenClass::Input, TokenClass::Input],
        };
        let negative = Limit::Money {
            amount: dec!(-1),
            currency: "USD".into(),
        };

        assert_eq!(
            zero.validate("policy.limit").expect_err("zero").field,
            "policy.limit.tokens.limit"
        );
        assert_eq!(
            repeated.validate("policy.limit").expect_err("repeat").field,
            "policy.limit.tokens.token_classes[1]"
        );
        assert_eq!(
            negative.validate("policy.limit").expect_err("neg").field,
            "policy.limit.money.amount"
        );
        for amount in [MAX_MONEY_LIMIT, dec!(0.0000001)] {
            let out_of_bounds = Limit::Money {
                amount,
                currency: "USD".into(),
            };
            assert_eq!(
                out_of_bounds
                    .validate("policy.limit")
                    .expect_err("bounds")
                    .field,
                "policy.limit.money.amount"
            );
        }
        assert_eq!(
            normalize_thresholds(&[8000, 0], "t")
                .expect_err("zero")
                .field,
            "t[1]"
        );
        assert_eq!(
            normalize_thresholds(&[10000, 8000, 8000], "t"),
            Ok(vec![8000, 10000])
        );
    }

    #[test]
    fn scopes_cover_their_agent_or_service_and_the_tenant_covers_all() {
        assert!(Scope::Tenant.covers("a", None));
        assert!(Scope::Agent("a".into()).covers("a", Some("s")));
        assert!(!Scope::Agent("a".into()).covers("b", None));
        assert!(Scope::Service("s".into()).covers("b", Some("s")));
        assert!(!Scope::Service("s".into()).covers("b", None));
    }
}

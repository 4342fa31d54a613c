//! Pricing: which rate applies to a (tenant, provider, model, class) at an instant, and the
//! exact decimal amounts it gives. No I/O: the catalog is loaded by the store and cached.
//!
//! Amounts are computed with [`super::exact`], so none is ever rounded: prices below
//! [`MAX_PRICE_PER_MILLION`] with at most [`MAX_PRICE_SCALE`] fractional digits (trailing
//! zeros do not count: `93.8494000` is `93.8494`), discounts with at most
//! [`MAX_DISCOUNT_SCALE`], and token buckets of at most [`MAX_TOKENS_PER_CLASS`] (enforced at
//! validation). Within these bounds an undiscounted amount always fits `Decimal`; a discount
//! adds up to 6 digits, and the rare product that then needs more than 28 significant digits
//! is refused ([`PricingError::Overflow`]), never rounded.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use super::FieldError;
use super::exact;
use super::invoice::{Discount, Price, SlicePricing};
use super::tiers::TierSchedule;
use super::tokens::{CLASS_COUNT, TokenClass, TokenCounts};

pub const MAX_PRICE_PER_MILLION: Decimal = Decimal::from_parts(100_000, 0, 0, false, 0);
pub const MAX_PRICE_SCALE: u32 = 12;
pub const MAX_DISCOUNT_SCALE: u32 = 4;
pub const MAX_TOKENS_PER_CLASS: i64 = 10_000_000_000;

const ONE_HUNDRED: Decimal = Decimal::from_parts(100, 0, 0, false, 0);

/// Price book ids: 1-64 characters of `[a-z0-9._-]`.
pub fn is_valid_price_book_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// Parses a price per 1M tokens under the bounds above. Its scale is kept as written (the API
/// never strips trailing zeros), but trailing zeros do not count as fractional digits.
pub fn parse_price(text: &str, field: &str) -> Result<Decimal, FieldError> {
    let value = parse_plain_decimal(text, field)?;
    if value.is_sign_negative() {
        return Err(FieldError::new(field, "must not be negative"));
    }
    if value >= MAX_PRICE_PER_MILLION {
        return Err(FieldError::new(
            field,
            "must be below 100000 per million tokens",
        ));
    }
    if value.normalize().scale() > MAX_PRICE_SCALE {
        return Err(FieldError::new(
            field,
            format!("at most {MAX_PRICE_SCALE} fractional digits"),
        ));
    }
    Ok(value)
}

/// Parses a discount percentage, 0 < d ≤ 100.
pub fn parse_discount(text: &str, field: &str) -> Result<Decimal, FieldError> {
    let value = parse_plain_decimal(text, field)?;
    if value <= Decimal::ZERO || value > ONE_HUNDRED {
        return Err(FieldError::new(
            field,
            "must be greater than 0 and at most 100",
        ));
    }
    if value.normalize().scale() > MAX_DISCOUNT_SCALE {
        return Err(FieldError::new(field, "at most 4 fractional digits"));
    }
    Ok(value)
}

/// A plain decimal string as the API conventions define it: `^-?[0-9]+(\.[0-9]+)?$`, no
/// exponent, no sign other than a leading minus, at most 28 significant digits.
pub fn parse_plain_decimal(text: &str, field: &str) -> Result<Decimal, FieldError> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let (whole, fraction) = match digits.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (digits, None),
    };
    let well_formed = !whole.is_empty()
        && whole.bytes().all(|b| b.is_ascii_digit())
        && fraction.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()));
    if !well_formed {
        return Err(FieldError::new(
            field,
            format!("{text:?} is not a plain decimal like \"12.34\""),
        ));
    }
    text.parse::<Decimal>()
        .map_err(|_| FieldError::new(field, "has more than 28 significant digits"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub price_per_million: Decimal,
    pub cost_per_million: Decimal,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RateKey {
    pub provider: String,
    pub model: String,
    pub class: TokenClass,
}

#[derive(Debug, Clone)]
pub struct PriceBookVersion {
    pub version_id: String,
    pub price_book_id: String,
    pub currency: String,
    pub effective_from: DateTime<Utc>,
    pub rates: HashMap<RateKey, Rate>,
    /// Tiers of the tiered rates; their `Rate::price_per_million` is the first tier's price.
    pub tiers: HashMap<RateKey, TierSchedule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adjustment {
    /// The tenant's own price per 1M tokens, replacing the book's.
    OwnPrice(Decimal),
    /// Percent off the book's price.
    DiscountPercent(Decimal),
}

#[derive(Debug, Clone)]
pub struct PriceOverride {
    pub override_id: String,
    /// `None` selectors match anything (discounts only).
    pub provider: Option<String>,
    pub model: Option<String>,
    pub class: Option<TokenClass>,
    pub adjustment: Adjustment,
    pub effective_from: DateTime<Utc>,
    pub effective_to: Option<DateTime<Utc>>,
}

impl PriceOverride {
    fn covers(&self, provider: &str, model: &str, class: TokenClass, at: DateTime<Utc>) -> bool {
        self.provider.as_deref().is_none_or(|p| p == provider)
            && self.model.as_deref().is_none_or(|m| m == model)
            && self.class.is_none_or(|c| c == class)
            && self.effective_from <= at
            && self.effective_to.is_none_or(|end| at < end)
    }

    /// Whether two overrides could ever cover the same rate at the same instant.
    pub fn overlaps(&self, other: &PriceOverride) -> bool {
        let selectors_meet = |a: &Option<String>, b: &Option<String>| match (a, b) {
            (Some(x), Some(y)) => x == y,
            _ => true,
        };
        let classes_meet = match (self.class, other.class) {
            (Some(x), Some(y)) => x == y,
            _ => true,
        };
        let starts_before_other_ends = other
            .effective_to
            .is_none_or(|end| self.effective_from < end);
        let other_starts_before_end = self
            .effective_to
            .is_none_or(|end| other.effective_from < end);
        selectors_meet(&self.provider, &other.provider)
            && selectors_meet(&self.model, &other.model)
            && classes_meet
            && starts_before_other_ends
            && other_starts_before_end
    }
}

/// What a tenant is priced with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantPricing {
    pub currency: String,
    pub price_book_id: String,
}

/// The rate that applies, after the tenant's override if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectiveRate {
    pub rate: Rate,
    pub list_price_per_million: Decimal,
    pub version_id: String,
    pub override_id: Option<String>,
    pub discount_percent: Option<Decimal>,
}

/// The price of one event's tokens: per class, `None` where no rate applies (unpriced — never
/// zero). Amounts are exact and unrounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PricedUsage {
    pub currency: String,
    pub version_id: Option<String>,
    /// (billed, cost) per class, indexed like [`TokenClass::ALL`].
    pub charges: [Option<(Decimal, Decimal)>; CLASS_COUNT],
    pub billed: Decimal,
    pub cost: Decimal,
    pub unpriced_tokens: i64,
}

impl PricedUsage {
    pub fn is_unpriced(&self) -> bool {
        self.unpriced_tokens > 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    #[error("unknown tenant {0:?}")]
    UnknownTenant(String),
    #[error("amount overflows exact decimal range")]
    Overflow,
}

/// A version's rates of one model, by class.
type ModelRates = [Option<Rate>; CLASS_COUNT];

/// Every price book version, tenant binding and override, as loaded from storage.
#[derive(Debug, Clone, Default)]
pub struct PricingCatalog {
    /// Versions of each book, ascending by `effective_from`.
    books: HashMap<String, Vec<PriceBookVersion>>,
    tenants: HashMap<String, TenantPricing>,
    overrides: HashMap<String, Vec<PriceOverride>>,
    /// version → provider → model → rates, so pricing an event looks up `&str`s without
    /// building keys.
    index: HashMap<String, HashMap<String, HashMap<String, ModelRates>>>,
}

impl PricingCatalog {
    pub fn new(
        versions: Vec<PriceBookVersion>,
        tenants: HashMap<String, TenantPricing>,
        overrides: Vec<(String, PriceOverride)>,
    ) -> Self {
        let mut index: HashMap<String, HashMap<String, HashMap<String, ModelRates>>> =
            HashMap::new();
        for version in &versions {
            let by_provider = index.entry(version.version_id.clone()).or_default();
            for (key, rate) in &version.rates {
                by_provider
                    .entry(key.provider.clone())
                    .or_default()
                    .entry(key.model.clone())
                    .or_insert([None; CLASS_COUNT])[key.class.index()] = Some(*rate);
            }
        }
        let mut books: HashMap<String, Vec<PriceBookVersion>> = HashMap::new();
        for version in versions {
            books
                .entry(version.price_book_id.clone())
                .or_default()
                .push(version);
        }
        for list in books.values_mut() {
            list.sort_by_key(|v| v.effective_from);
        }
        let mut by_tenant: HashMap<String, Vec<PriceOverride>> = HashMap::new();
        for (tenant, rule) in overrides {
            by_tenant.entry(tenant).or_default().push(rule);
        }
        Self {
            books,
            tenants,
            overrides: by_tenant,
            index,
        }
    }

    fn model_rates(&self, version_id: &str, provider: &str, model: &str) -> Option<&ModelRates> {
        self.index.get(version_id)?.get(provider)?.get(model)
    }

    /// Applies the tenant's override covering this rate at `at`, if any: (price, discount,
    /// override id).
    fn apply_override<'a>(
        &'a self,
        tenant_id: &str,
        list: &Rate,
        provider: &str,
        model: &str,
        class: TokenClass,
        at: DateTime<Utc>,
    ) -> Result<(Decimal, Option<Decimal>, Option<&'a PriceOverride>), PricingError> {
        let rule = self
            .overrides
            .get(tenant_id)
            .and_then(|rules| rules.iter().find(|r| r.covers(provider, model, class, at)));
        Ok(match rule.map(|r| r.adjustment) {
            None => (list.price_per_million, None, None),
            Some(Adjustment::OwnPrice(own)) => (own, None, rule),
            Some(Adjustment::DiscountPercent(percent)) => {
                let price = exact::sub(ONE_HUNDRED, percent)
                    .and_then(|kept| exact::mul(list.price_per_million, kept))
                    .and_then(|p| exact::div_pow10(p, 2))
                    .ok_or(PricingError::Overflow)?;
                (price, Some(percent), rule)
            }
        })
    }

    pub fn tenant(&self, tenant_id: &str) -> Option<&TenantPricing> {
        self.tenants.get(tenant_id)
    }

    /// The version of `book` in force at `at`: the greatest `effective_from` ≤ `at`.
    pub fn version_at(&self, book: &str, at: DateTime<Utc>) -> Option<&PriceBookVersion> {
        let versions = self.books.get(book)?;
        let after = versions.partition_point(|v| v.effective_from <= at);
        after.checked_sub(1).map(|i| &versions[i])
    }

    /// When the version after the one starting at `from` starts, if any.
    pub fn next_version_start(&self, book: &str, from: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.books
            .get(book)?
            .iter()
            .map(|v| v.effective_from)
            .find(|start| *start > from)
    }

    pub fn effective_rate(
        &self,
        tenant_id: &str,
        provider: &str,
        model: &str,
        class: TokenClass,
        at: DateTime<Utc>,
    ) -> Result<Option<EffectiveRate>, PricingError> {
        let tenant = self
            .tenant(tenant_id)
            .ok_or_else(|| PricingError::UnknownTenant(tenant_id.to_owned()))?;
        let Some(version) = self.version_at(&tenant.price_book_id, at) else {
            return Ok(None);
        };
        let Some(list) = self
            .model_rates(&version.version_id, provider, model)
            .and_then(|rates| rates[class.index()])
        else {
            return Ok(None);
        };
        let (price, discount, rule) =
            self.apply_override(tenant_id, &list, provider, model, class, at)?;
        Ok(Some(EffectiveRate {
            rate: Rate {
                price_per_million: price,
                cost_per_million: list.cost_per_million,
            },
            list_price_per_million: list.price_per_million,
            version_id: version.version_id.clone(),
            override_id: rule.map(|r| r.override_id.clone()),
            discount_percent: discount,
        }))
    }

    /// Instants strictly inside `(start, end)` where the tenant's pricing may change: its
    /// book's version starts and its overrides' starts and ends. Invoices price the stretches
    /// between them separately.
    pub fn pricing_changes(
        &self,
        tenant_id: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> Vec<DateTime<Utc>> {
        let versions = self
            .tenant(tenant_id)
            .and_then(|t| self.books.get(&t.price_book_id))
            .into_iter()
            .flatten()
            .map(|v| v.effective_from);
        let overrides = self
            .overrides
            .get(tenant_id)
            .into_iter()
            .flatten()
            .flat_map(|o| [Some(o.effective_from), o.effective_to])
            .flatten();
        let mut changes: Vec<DateTime<Utc>> = versions
            .chain(overrides)
            .filter(|at| start < *at && *at < end)
            .collect();
        changes.sort();
        changes.dedup();
        changes
    }

    /// How an invoice prices this rate key at `at`: the book's rate (flat or tiered), an
    /// own-price override replacing it, or a discount shown as its own line. `None` when no
    /// rate covers it (unpriced).
    pub fn invoice_pricing(
        &self,
        tenant_id: &str,
        key: &RateKey,
        at: DateTime<Utc>,
    ) -> Option<SlicePricing> {
        let tenant = self.tenant(tenant_id)?;
        let version = self.version_at(&tenant.price_book_id, at)?;
        let list =
            self.model_rates(&version.version_id, &key.provider, &key.model)?[key.class.index()]?;
        let rule = self.overrides.get(tenant_id).and_then(|rules| {
            rules
                .iter()
                .find(|r| r.covers(&key.provider, &key.model, key.class, at))
        });
        let book_price = match version.tiers.get(key) {
            Some(schedule) => Price::Tiered(schedule.clone()),
            None => Price::Flat(list.price_per_million),
        };
        let mut pricing = SlicePricing {
            version_id: version.version_id.clone(),
            price: book_price,
            list_price: None,
            override_id: None,
            discount: None,
        };
        match rule.map(|r| (r, r.adjustment)) {
            None => {}
            Some((rule, Adjustment::OwnPrice(own))) => {
                pricing.price = Price::Flat(own);
                pricing.list_price = Some(list.price_per_million);
                pricing.override_id = Some(rule.override_id.clone());
            }
            Some((rule, Adjustment::DiscountPercent(percent))) => {
                pricing.discount = Some(Discount {
                    override_id: rule.override_id.clone(),
                    percent,
                });
            }
        }
        Some(pricing)
    }

    /// Prices every class of `tokens` with the rates in force at `at`.
    pub fn price(
        &self,
        tenant_id: &str,
        provider: &str,
        model: &str,
        at: DateTime<Utc>,
        tokens: &TokenCounts,
    ) -> Result<PricedUsage, PricingError> {
        let tenant = self
            .tenant(tenant_id)
            .ok_or_else(|| PricingError::UnknownTenant(tenant_id.to_owned()))?;
        self.price_for(tenant_id, tenant, provider, model, at, tokens)
    }

    /// Prices as [`PricingCatalog::price`] for a tenant described by `tenant` (one that may not
    /// exist yet, for dry runs).
    pub fn price_for(
        &self,
        tenant_id: &str,
        tenant: &TenantPricing,
        provider: &str,
        model: &str,
        at: DateTime<Utc>,
        tokens: &TokenCounts,
    ) -> Result<PricedUsage, PricingError> {
        // A book in another currency than the tenant's would bill its figures as the tenant's
        // money (USD prices as EUR): such usage is unpriced, counted and visible as such.
        let version = self
            .version_at(&tenant.price_book_id, at)
            .filter(|v| v.currency == tenant.currency);
        let rates = version.and_then(|v| self.model_rates(&v.version_id, provider, model));
        let mut priced = PricedUsage {
            currency: tenant.currency.clone(),
            version_id: version.map(|v| v.version_id.clone()),
            charges: [None; CLASS_COUNT],
            billed: Decimal::ZERO,
            cost: Decimal::ZERO,
            unpriced_tokens: 0,
        };
        for (class, count) in tokens.non_zero() {
            let Some(list) = rates.and_then(|r| r[class.index()]) else {
                priced.unpriced_tokens += count;
                continue;
            };
            let (price, _, _) =
                self.apply_override(tenant_id, &list, provider, model, class, at)?;
            let billed = amount(count, price)?;
            let cost = amount(count, list.cost_per_million)?;
            priced.billed = exact::add(priced.billed, billed).ok_or(PricingError::Overflow)?;
            priced.cost = exact::add(priced.cost, cost).ok_or(PricingError::Overflow)?;
            priced.charges[class.index()] = Some((billed, cost));
        }
        Ok(priced)
    }
}

/// `tokens × per_million / 1,000,000`, exact (without trailing zeros).
pub fn amount(tokens: i64, per_million: Decimal) -> Result<Decimal, PricingError> {
    exact::mul(Decimal::from(tokens), per_million)
        .and_then(|v| exact::div_pow10(v, 6))
        .ok_or(PricingError::Overflow)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use rust_decimal::dec;

    fn at(day: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, day, 0, 0, 0)
            .single()
            .expect("date")
    }

    fn version(id: &str, from: DateTime<Utc>, input_price: Decimal) -> PriceBookVersion {
        let mut rates = HashMap::new();
        rates.insert(
            RateKey {
                provider: "openai".into(),
                model: "gpt-4.1-mini".into(),
                class: TokenClass::Input,
            },
            Rate {
                price_per_million: input_price,
                cost_per_million: dec!(0.30),
            },
        );
        rates.insert(
            RateKey {
                provider: "openai".into(),
                model: "gpt-4.1-mini".into(),
                class: TokenClass::Output,
            },
            Rate {
                price_per_million: dec!(1.60),
                cost_per_million: dec!(1.20),
            },
        );
        PriceBookVersion {
            version_id: id.into(),
            price_book_id: "default".into(),
            currency: "USD".into(),
            effective_from: from,
            rates,
            tiers: HashMap::new(),
        }
    }

    fn catalog(overrides: Vec<PriceOverride>) -> PricingCatalog {
        let tenants = HashMap::from([(
            "acme".to_owned(),
            TenantPricing {
                currency: "USD".into(),
                price_book_id: "default".into(),
            },
        )]);
        PricingCatalog::new(
            vec![
                version("v2", at(15), dec!(0.50)),
                version("v1", at(1), dec!(0.40)),
            ],
            tenants,
            overrides
                .into_iter()
                .map(|o| ("acme".to_owned(), o))
                .collect(),
        )
    }

    fn tokens(input: i64, output: i64, reasoning: i64) -> TokenCounts {
        TokenCounts::new([input, 0, 0, 0, output, reasoning, 0, 0, 0, 0, 0, 0]).expect("tokens")
    }

    #[test]
    fn the_version_in_force_switches_exactly_at_effective_from() {
        let catalog = catalog(vec![]);
        let just_before = at(15) - chrono::Duration::microseconds(1);

        assert_eq!(
            catalog
                .version_at("default", just_before)
                .map(|v| v.version_id.as_str()),
            Some("v1")
        );
        assert_eq!(
            catalog
                .version_at("default", at(15))
                .map(|v| v.version_id.as_str()),
            Some("v2")
        );
        assert!(
            catalog
                .version_at("default", at(1) - chrono::Duration::seconds(1))
                .is_none()
        );
    }

    #[test]
    fn amounts_are_exact_per_class() {
        let catalog = catalog(vec![]);

        let priced = catalog
            .price(
                "acme",
                "openai",
                "gpt-4.1-mini",
                at(2),
                &tokens(1_234, 567, 0),
            )
            .expect("priced");

        // 1,234 × 0.40 / 1M = 0.0004936 ; 567 × 1.60 / 1M = 0.0009072
        assert_eq!(
            priced.charges[TokenClass::Input.index()],
            Some((dec!(0.0004936), dec!(0.0003702)))
        );
        assert_eq!(priced.billed, dec!(0.0004936) + dec!(0.0009072));
        // cost: 1,234 × 0.30 / 1M = 0.0003702 ; 567 × 1.20 / 1M = 0.0006804
        assert_eq!(priced.cost, dec!(0.0003702) + dec!(0.0006804));
        assert_eq!(priced.unpriced_tokens, 0);
        assert_eq!(priced.version_id.as_deref(), Some("v1"));
    }

    #[test]
    fn a_class_without_a_rate_is_unpriced_not_zero() {
        let catalog = catalog(vec![]);

        let priced = catalog
            .price("acme", "openai", "gpt-4.1-mini", at(2), &tokens(100, 0, 40))
            .expect("priced");

        assert_eq!(priced.unpriced_tokens, 40);
        assert!(priced.is_unpriced());
        assert_eq!(priced.charges[TokenClass::Reasoning.index()], None);
        assert_eq!(priced.billed, dec!(0.00004));
    }

    #[test]
    fn an_unknown_model_is_wholly_unpriced() {
        let priced = catalog(vec![])
            .price("acme", "openai", "gpt-9", at(2), &tokens(100, 50, 0))
            .expect("priced");

        assert_eq!(priced.unpriced_tokens, 150);
        assert_eq!(priced.billed, Decimal::ZERO);
        assert_eq!(priced.charges, [None; CLASS_COUNT]);
    }

    #[test]
    fn a_book_in_another_currency_leaves_the_usage_unpriced() {
        let euro_tenant = TenantPricing {
            currency: "EUR".into(),
            price_book_id: "default".into(),
        };

        let priced = catalog(vec![])
            .price_for(
                "acme-eu",
                &euro_tenant,
                "openai",
                "gpt-4.1-mini",
                at(2),
                &tokens(100, 50, 0),
            )
            .expect("priced");

        assert_eq!(priced.currency, "EUR");
        assert_eq!(priced.version_id, None);
        assert_eq!(priced.unpriced_tokens, 150);
        assert_eq!(priced.billed, Decimal::ZERO);
    }

    #[test]
    fn an_own_price_override_replaces_the_price_but_never_the_cost() {
        let own = PriceOverride {
            override_id: "o1".into(),
            provider: Some("openai".into()),
            model: Some("gpt-4.1-mini".into()),
            class: Some(TokenClass::Input),
            adjustment: Adjustment::OwnPrice(dec!(0.25)),
            effective_from: at(10),
            effective_to: Some(at(20)),
        };
        let catalog = catalog(vec![own]);

        let before = catalog
            .price(
                "acme",
                "openai",
                "gpt-4.1-mini",
                at(9),
                &tokens(1_000_000, 0, 0),
            )
            .expect("p");
        let during = catalog
            .price(
                "acme",
                "openai",
                "gpt-4.1-mini",
                at(16),
                &tokens(1_000_000, 0, 0),
            )
            .expect("p");
        let after = catalog
            .price(
                "acme",
                "openai",
                "gpt-4.1-mini",
                at(20),
                &tokens(1_000_000, 0, 0),
            )
            .expect("p");

        assert_eq!(before.billed, dec!(0.40));
        assert_eq!(during.billed, dec!(0.25));
        assert_eq!(during.cost, dec!(0.30));
        assert_eq!(after.billed, dec!(0.50));
    }

    #[test]
    fn a_tenant_wide_discount_takes_its_percentage_off_every_class() {
        let discount = PriceOverride {
            override_id: "d1".into(),
            provider: None,
            model: None,
            class: None,
            adjustment: Adjustment::DiscountPercent(dec!(12.5)),
            effective_from: at(1),
            effective_to: None,
        };
        let catalog = catalog(vec![discount]);

        let priced = catalog
            .price(
                "acme",
                "openai",
                "gpt-4.1-mini",
                at(2),
                &tokens(1_000_000, 1_000_000, 0),
            )
            .expect("priced");

        // (0.40 + 1.60) × (100 − 12.5) / 100 = 2.00 × 0.875 = 1.75
        assert_eq!(priced.billed, dec!(1.75));
        assert_eq!(priced.cost, dec!(1.50));
    }

    #[test]
    fn an_unknown_tenant_is_an_error() {
        let error =
            catalog(vec![]).price("nobody", "openai", "gpt-4.1-mini", at(2), &tokens(1, 0, 0));

        assert_eq!(error, Err(PricingError::UnknownTenant("nobody".into())));
    }

    #[test]
    fn the_largest_allowed_inputs_still_multiply_exactly() {
        let price = dec!(99999.999999);

        let value = amount(MAX_TOKENS_PER_CLASS, price).expect("exact");

        // 10^10 × 99999.999999 / 10^6 = 999999999.99
        assert_eq!(value, dec!(999999999.99));
    }

    #[test]
    fn prices_take_twelve_fractional_digits_and_trailing_zeros_are_not_digits() {
        assert_eq!(parse_price("93.8494000", "p"), Ok(dec!(93.8494)));
        assert_eq!(parse_price("93.8494000", "p").map(|p| p.scale()), Ok(7));
        assert_eq!(parse_price("0.461234567891", "p"), Ok(dec!(0.461234567891)));
        assert_eq!(
            parse_price("99999.999999999999000000", "p"),
            Ok(dec!(99999.999999999999))
        );
        let error = parse_price("0.4612345678912", "p").expect_err("13 digits");
        assert_eq!(error.reason, "at most 12 fractional digits");
        assert_eq!(parse_discount("12.50000", "d"), Ok(dec!(12.5)));
    }

    #[test]
    fn a_twelve_digit_price_with_a_discount_prices_an_event_exactly() {
        // 1,234,567 tokens × 0.461234567891 × (100 − 12.3456) / 100 / 10^6:
        // 0.461234567891 × 0.876544 = 0.404292393077448704 (per 1M, exact)
        // × 1,234,567 / 10^6 = 0.499126046844446614151168 (to the last digit)
        let price = parse_price("0.461234567891", "p").expect("price");
        let kept = exact::sub(dec!(100), dec!(12.3456)).expect("kept");
        let per_million = exact::mul(price, kept).and_then(|p| exact::div_pow10(p, 2));
        assert_eq!(per_million, Some(dec!(0.404292393077448704)));

        let value = amount(1_234_567, per_million.expect("rate")).expect("exact");

        assert_eq!(value, dec!(0.499126046844446614151168));
    }

    #[test]
    fn plain_decimal_parsing_rejects_what_the_api_forbids() {
        for bad in ["", "1e3", "+1", " 1", "1.", ".5", "1,000", "0x10", "NaN"] {
            assert!(parse_plain_decimal(bad, "f").is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse_plain_decimal("12.3400", "f"), Ok(dec!(12.3400)));
        assert_eq!(parse_plain_decimal("-0.5", "f"), Ok(dec!(-0.5)));
        assert!(parse_price("-1", "p").is_err());
        assert!(parse_price("0.0000000000001", "p").is_err());
        assert!(parse_price("100000", "p").is_err());
        assert!(parse_discount("0", "d").is_err());
        assert!(parse_discount("100.5", "d").is_err());
        assert_eq!(parse_discount("100", "d"), Ok(dec!(100)));
    }

    #[test]
    fn overrides_overlap_only_when_selectors_and_time_both_meet() {
        let base = PriceOverride {
            override_id: "a".into(),
            provider: Some("openai".into()),
            model: None,
            class: None,
            adjustment: Adjustment::DiscountPercent(dec!(5)),
            effective_from: at(1),
            effective_to: Some(at(10)),
        };
        let later = PriceOverride {
            effective_from: at(10),
            effective_to: None,
            ..base.clone()
        };
        let other_provider = PriceOverride {
            provider: Some("anthropic".into()),
            ..base.clone()
        };
        let everything = PriceOverride {
            provider: None,
            effective_from: at(5),
            ..base.clone()
        };

        assert!(!base.overlaps(&later));
        assert!(!base.overlaps(&other_provider));
        assert!(base.overlaps(&everything));
    }
}

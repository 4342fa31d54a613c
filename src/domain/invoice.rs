//! Invoice arithmetic: usage of a period (per provider × model × class, in time-ordered slices
//! of constant pricing) and late-usage differences of closed periods become lines; each line is
//! rounded once to the currency's minor unit, and every total is a sum of rounded lines.
//!
//! Precise (unrounded) figures are [`Precise`] — arbitrary-precision decimals — because a
//! period's quantity × a 12-digit price × a discount percentage can need more than
//! `rust_decimal`'s 28 digits; they are exact by construction (only +, −, ×, and division by
//! powers of ten). Rounded figures, which always fit, are `Decimal`.
//!
//! The contract is spelled out on `InvoiceService` in `invoices.proto`:
//! USAGE / TIER precise = quantity × unit price / 1M; DISCOUNT = −percent/100 × Σ precise of the
//! lines it covers; ADJUSTMENT = what a closed period costs now − what its invoices billed;
//! TAX = rate/100 × (subtotal + discount), both sums of rounded lines.

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use super::exact::{self, Precise};
use super::money::Currency;
use super::period::BillingPeriod;
use super::pricing::RateKey;
use super::tenant::RoundingMode;
use super::tiers::TierSchedule;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvoiceError {
    #[error("invoice amount overflows exact decimal range")]
    Overflow,
}

/// draft (recomputed as usage arrives) → finalized (immutable, numbered) → void (replaced).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvoiceState {
    Draft,
    Finalized,
    Void,
}

impl InvoiceState {
    pub const fn as_str(self) -> &'static str {
        match self {
            InvoiceState::Draft => "draft",
            InvoiceState::Finalized => "finalized",
            InvoiceState::Void => "void",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [
            InvoiceState::Draft,
            InvoiceState::Finalized,
            InvoiceState::Void,
        ]
        .into_iter()
        .find(|s| s.as_str() == name)
    }
}

/// How a rate prices tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Price {
    Flat(Decimal),
    Tiered(TierSchedule),
}

/// A tenant discount in force: it becomes one DISCOUNT line over the lines it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discount {
    pub override_id: String,
    pub percent: Decimal,
}

/// The pricing of one (provider, model, class) over a stretch of the period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePricing {
    pub version_id: String,
    /// After an own-price override (which replaces tiers); before discounts.
    pub price: Price,
    /// The book's flat price when an own-price override replaced it.
    pub list_price: Option<Decimal>,
    /// The own-price override that applied.
    pub override_id: Option<String>,
    pub discount: Option<Discount>,
}

/// Tokens of one stretch; `pricing` is `None` where no rate covered them (unpriced, never zero).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageSlice {
    pub pricing: Option<SlicePricing>,
    pub quantity: i64,
    /// Event × class pairs behind the tokens, to surface unpriced usage.
    pub events: i64,
}

/// A period's usage of one rate key, slices in time order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUsage {
    pub key: RateKey,
    pub slices: Vec<UsageSlice>,
}

/// What a period's usage of one key amounts to: priced tokens and the precise amount after
/// discounts. Finalized invoices store these so later changes are billed as differences.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Charge {
    pub quantity: i64,
    pub amount: Precise,
}

/// A closed period's usage as computed now (`expected`) against what non-void invoices billed
/// for it (`billed`); the difference lands as ADJUSTMENT lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adjustment {
    pub period: BillingPeriod,
    pub expected: BTreeMap<RateKey, Charge>,
    pub billed: BTreeMap<RateKey, Charge>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LineKind {
    Usage,
    Tier,
    Adjustment,
    Discount,
    Tax,
}

impl LineKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            LineKind::Usage => "usage",
            LineKind::Tier => "tier",
            LineKind::Adjustment => "adjustment",
            LineKind::Discount => "discount",
            LineKind::Tax => "tax",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [
            LineKind::Usage,
            LineKind::Tier,
            LineKind::Adjustment,
            LineKind::Discount,
            LineKind::Tax,
        ]
        .into_iter()
        .find(|k| k.as_str() == name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub kind: LineKind,
    pub description: String,
    pub key: Option<RateKey>,
    pub quantity: i64,
    pub unit_price: Decimal,
    /// Exact, before rounding.
    pub precise: Precise,
    /// `precise` rounded once: the billed figure.
    pub amount: Decimal,
    /// TIER: `[from, up_to)`.
    pub tier: Option<(i64, Option<i64>)>,
    pub original_period: Option<BillingPeriod>,
    pub list_unit_price: Option<Decimal>,
    pub discount_percent: Option<Decimal>,
    pub tax_rate_percent: Option<Decimal>,
    /// DISCOUNT: Σ precise of the usage it covers; TAX: subtotal + discount.
    pub base_amount: Option<Precise>,
    pub version_id: Option<String>,
    pub override_id: Option<String>,
}

impl Line {
    fn new(kind: LineKind, description: String, precise: Precise) -> Self {
        Self {
            kind,
            description,
            key: None,
            quantity: 0,
            unit_price: Decimal::ZERO,
            precise,
            amount: Decimal::ZERO,
            tier: None,
            original_period: None,
            list_unit_price: None,
            discount_percent: None,
            tax_rate_percent: None,
            base_amount: None,
            version_id: None,
            override_id: None,
        }
    }
}

/// What the invoice is rounded and taxed with, fixed on the invoice when it is computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terms {
    pub currency: Currency,
    pub rounding: RoundingMode,
    pub tax_rate_percent: Option<Decimal>,
}

/// One billed (period, key) difference, stored when the invoice is finalized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BilledUsage {
    pub period: BillingPeriod,
    pub key: RateKey,
    pub charge: Charge,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComputedInvoice {
    pub lines: Vec<Line>,
    pub subtotal: Decimal,
    pub discount: Decimal,
    pub tax: Decimal,
    pub credit: Decimal,
    pub total: Decimal,
    pub unpriced_tokens: i64,
    pub unpriced_events: i64,
    pub billed: Vec<BilledUsage>,
}

/// The USAGE / TIER lines of a period, its discounts, and what each key amounts to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeriodCharges {
    pub lines: Vec<Line>,
    /// override id → (percent, Σ precise of the lines it covers)
    pub discounts: BTreeMap<String, (Decimal, Precise)>,
    pub per_key: BTreeMap<RateKey, Charge>,
    pub unpriced_tokens: i64,
    pub unpriced_events: i64,
}

/// Σ of rounded amounts, which carry at most the currency's minor digits.
fn add(a: Decimal, b: Decimal) -> Result<Decimal, InvoiceError> {
    exact::add(a, b).ok_or(InvoiceError::Overflow)
}

/// `percent` % of `base`, exact.
fn percent_of(percent: Decimal, base: &Precise) -> Precise {
    exact::shift(exact::wide(percent) * base, 2)
}

fn label(key: &RateKey) -> String {
    format!("{} · {}", key.model, key.class.as_str().replace('_', " "))
}

/// `12345678` → `12,345,678`.
fn grouped(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// Prices a period's usage: one USAGE line per (provider, model, class, unit price) and one
/// TIER line per (…, tier, unit price). Slices are priced in time order — graduated tiers
/// continue where the earlier slices left off — and their pieces are then summed into lines
/// wherever the unit price (and the own-price override behind it) is the same, whichever
/// price-book versions they came from, so a new version that leaves a price unchanged neither
/// splits its line nor rounds it twice. Discounts and what each key amounts to are taken from
/// the pieces, so they do not depend on how lines merge.
pub fn charge_period(usage: &[KeyUsage]) -> Result<PeriodCharges, InvoiceError> {
    let mut out = PeriodCharges::default();
    let mut keys: Vec<&KeyUsage> = usage.iter().collect();
    keys.sort_by(|a, b| a.key.cmp(&b.key));
    for key_usage in keys {
        let key = &key_usage.key;
        let total: i64 = key_usage
            .slices
            .iter()
            .filter(|s| s.pricing.is_some())
            .map(|s| s.quantity)
            .sum();
        let mut before = 0;
        let mut charge = Charge::default();
        let mut lines: Vec<Line> = Vec::new();
        for slice in key_usage.slices.iter().filter(|s| s.quantity > 0) {
            let Some(pricing) = &slice.pricing else {
                out.unpriced_tokens += slice.quantity;
                out.unpriced_events += slice.events;
                continue;
            };
            for mut piece in slice_pieces(key, pricing, before, slice.quantity, total) {
                charge.amount += &piece.precise;
                if let Some(discount) = &pricing.discount {
                    let entry = out
                        .discounts
                        .entry(discount.override_id.clone())
                        .or_insert((discount.percent, Precise::default()));
                    entry.1 += &piece.precise;
                    charge.amount -= percent_of(discount.percent, &piece.precise);
                }
                piece.key = Some(key.clone());
                piece.version_id = Some(pricing.version_id.clone());
                piece.override_id = pricing.override_id.clone();
                merge_into(&mut lines, piece);
            }
            before += slice.quantity;
            charge.quantity += slice.quantity;
        }
        out.lines.extend(lines);
        if charge.quantity > 0 {
            out.per_key.insert(key.clone(), charge);
        }
    }
    Ok(out)
}

/// The USAGE piece of a flat slice, or the TIER pieces a tiered slice reaches, `before` tokens
/// into the period's `total`.
fn slice_pieces(
    key: &RateKey,
    pricing: &SlicePricing,
    before: i64,
    quantity: i64,
    total: i64,
) -> Vec<Line> {
    match &pricing.price {
        Price::Flat(unit) => {
            let mut line = Line::new(
                LineKind::Usage,
                label(key),
                exact::per_million(quantity, *unit),
            );
            line.quantity = quantity;
            line.unit_price = *unit;
            line.list_unit_price = pricing.list_price;
            vec![line]
        }
        Price::Tiered(schedule) => schedule
            .slices(before, quantity, total)
            .into_iter()
            .map(|tier| {
                let bounds = match tier.up_to {
                    Some(up_to) => format!("{}–{}", grouped(tier.from), grouped(up_to)),
                    None => format!("{}+", grouped(tier.from)),
                };
                let mut line = Line::new(
                    LineKind::Tier,
                    format!("{} · tier {bounds}", label(key)),
                    exact::per_million(tier.quantity, tier.price_per_million),
                );
                line.quantity = tier.quantity;
                line.unit_price = tier.price_per_million;
                line.tier = Some((tier.from, tier.up_to));
                line
            })
            .collect(),
    }
}

/// Adds `piece` to the line of the same kind, tier, unit price and own-price override, or
/// starts one. A line summing pieces of several price-book versions names none of them, and
/// one over several list prices (an own price kept while the book changed) names no list price.
fn merge_into(lines: &mut Vec<Line>, piece: Line) {
    let same = |line: &&mut Line| {
        line.kind == piece.kind
            && line.tier == piece.tier
            && line.unit_price == piece.unit_price
            && line.override_id == piece.override_id
    };
    match lines.iter_mut().find(same) {
        Some(line) => {
            line.quantity += piece.quantity;
            line.precise += piece.precise;
            if line.version_id != piece.version_id {
                line.version_id = None;
            }
            if line.list_unit_price != piece.list_unit_price {
                line.list_unit_price = None;
            }
        }
        None => lines.push(piece),
    }
}

/// The difference between two charges of a key: what is still to bill.
fn difference(expected: Charge, billed: Charge) -> Charge {
    Charge {
        quantity: expected.quantity - billed.quantity,
        amount: expected.amount - billed.amount,
    }
}

/// Builds the invoice: the period's lines, adjustment lines for closed periods, discounts, tax;
/// rounds each line once and sums the rounded lines.
pub fn compute_invoice(
    terms: &Terms,
    period: BillingPeriod,
    usage: &[KeyUsage],
    adjustments: &[Adjustment],
) -> Result<ComputedInvoice, InvoiceError> {
    let charges = charge_period(usage)?;
    let mut lines = charges.lines;
    let mut billed: Vec<BilledUsage> = charges
        .per_key
        .iter()
        .map(|(key, charge)| BilledUsage {
            period,
            key: key.clone(),
            charge: charge.clone(),
        })
        .collect();

    let mut sorted: Vec<&Adjustment> = adjustments.iter().collect();
    sorted.sort_by_key(|a| a.period.start);
    for adjustment in sorted {
        let mut keys: Vec<&RateKey> = adjustment
            .expected
            .keys()
            .chain(adjustment.billed.keys())
            .collect();
        keys.sort();
        keys.dedup();
        for key in keys {
            let delta = difference(
                adjustment.expected.get(key).cloned().unwrap_or_default(),
                adjustment.billed.get(key).cloned().unwrap_or_default(),
            );
            if delta.quantity == 0 && delta.amount == Precise::default() {
                continue;
            }
            let mut line = Line::new(
                LineKind::Adjustment,
                format!(
                    "{} · usage of {} not billed before",
                    label(key),
                    adjustment.period.label
                ),
                delta.amount.clone(),
            );
            line.key = Some(key.clone());
            line.quantity = delta.quantity;
            // An average, shown to 6 places: the difference may span tiers, prices and
            // discounts.
            line.unit_price = if delta.quantity == 0 {
                Decimal::ZERO
            } else {
                exact::average_per_million(&delta.amount, delta.quantity)
                    .ok_or(InvoiceError::Overflow)?
            };
            line.original_period = Some(adjustment.period);
            lines.push(line);
            billed.push(BilledUsage {
                period: adjustment.period,
                key: key.clone(),
                charge: delta,
            });
        }
    }

    for (override_id, (percent, base)) in &charges.discounts {
        let mut line = Line::new(
            LineKind::Discount,
            format!("discount {percent}%"),
            -percent_of(*percent, base),
        );
        line.discount_percent = Some(*percent);
        line.base_amount = Some(base.clone());
        line.override_id = Some(override_id.clone());
        lines.push(line);
    }

    let round = |precise: &Precise| {
        terms
            .currency
            .round_precise(precise, terms.rounding)
            .ok_or(InvoiceError::Overflow)
    };
    for line in &mut lines {
        line.amount = round(&line.precise)?;
    }
    let sum_of = |lines: &[Line], kinds: &[LineKind]| -> Result<Decimal, InvoiceError> {
        lines
            .iter()
            .filter(|l| kinds.contains(&l.kind))
            .try_fold(Decimal::ZERO, |acc, l| add(acc, l.amount))
    };
    let subtotal = sum_of(
        &lines,
        &[LineKind::Usage, LineKind::Tier, LineKind::Adjustment],
    )?;
    let discount = sum_of(&lines, &[LineKind::Discount])?;
    if let Some(rate) = terms.tax_rate_percent {
        let base = exact::wide(add(subtotal, discount)?);
        let mut line = Line::new(
            LineKind::Tax,
            format!("tax {rate}%"),
            percent_of(rate, &base),
        );
        line.tax_rate_percent = Some(rate);
        line.base_amount = Some(base);
        line.amount = round(&line.precise)?;
        lines.push(line);
    }
    let tax = sum_of(&lines, &[LineKind::Tax])?;
    let total = lines
        .iter()
        .try_fold(Decimal::ZERO, |acc, l| add(acc, l.amount))?;
    Ok(ComputedInvoice {
        lines,
        subtotal,
        discount,
        tax,
        credit: Decimal::ZERO,
        total,
        unpriced_tokens: charges.unpriced_tokens,
        unpriced_events: charges.unpriced_events,
        billed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::period::{BillingCalendar, PeriodLabel};
    use crate::domain::tiers::TierMode;
    use crate::domain::tokens::TokenClass;
    use proptest::prelude::*;
    use rust_decimal::dec;

    fn key(model: &str, class: TokenClass) -> RateKey {
        RateKey {
            provider: "openai".into(),
            model: model.into(),
            class,
        }
    }

    fn flat(price: Decimal) -> SlicePricing {
        SlicePricing {
            version_id: "v1".into(),
            price: Price::Flat(price),
            list_price: None,
            override_id: None,
            discount: None,
        }
    }

    fn usage(key: RateKey, pricing: SlicePricing, quantity: i64) -> KeyUsage {
        KeyUsage {
            key,
            slices: vec![UsageSlice {
                pricing: Some(pricing),
                quantity,
                events: 1,
            }],
        }
    }

    fn terms(code: &str) -> Terms {
        Terms {
            currency: Currency::from_code(code).expect("currency"),
            rounding: RoundingMode::HalfEven,
            tax_rate_percent: None,
        }
    }

    fn period(text: &str) -> BillingPeriod {
        BillingCalendar::parse("UTC", 1)
            .expect("calendar")
            .period(PeriodLabel::parse(text, "period").expect("label"))
    }

    fn tiers(mode: TierMode) -> SlicePricing {
        let schedule = TierSchedule::parse(
            mode,
            &[
                (Some(1_000_000), "3.00"),
                (Some(10_000_000), "2.00"),
                (None, "1.00"),
            ],
            "tiers",
        )
        .expect("tiers");
        SlicePricing {
            price: Price::Tiered(schedule),
            ..flat(Decimal::ZERO)
        }
    }

    fn amounts(invoice: &ComputedInvoice) -> Vec<(LineKind, Decimal, Decimal)> {
        invoice
            .lines
            .iter()
            .map(|l| (l.kind, narrow(&l.precise), l.amount))
            .collect()
    }

    /// A precise figure that fits a Decimal, as one (every figure of these tests does).
    fn narrow(precise: &Precise) -> Decimal {
        exact::narrow(precise).expect("fits a Decimal")
    }

    #[test]
    fn flat_lines_are_quantity_times_price_per_million_rounded_once() {
        let input = usage(
            key("gpt-4.1-mini", TokenClass::Input),
            flat(dec!(0.40)),
            1_234_567,
        );
        let output = usage(
            key("gpt-4.1-mini", TokenClass::Output),
            flat(dec!(1.60)),
            345_678,
        );

        let invoice =
            compute_invoice(&terms("USD"), period("2026-03"), &[output, input], &[]).expect("ok");

        // input: 1,234,567 × 0.40 / 1M = 0.4938268 → 0.49
        // output:  345,678 × 1.60 / 1M = 0.5530848 → 0.55
        assert_eq!(
            amounts(&invoice),
            vec![
                (LineKind::Usage, dec!(0.4938268), dec!(0.49)),
                (LineKind::Usage, dec!(0.5530848), dec!(0.55)),
            ]
        );
        assert_eq!(invoice.lines[0].description, "gpt-4.1-mini · input");
        // 0.49 + 0.55 = 1.04 (the precise sum 1.0469116 would also round to 1.05 — not used)
        assert_eq!((invoice.subtotal, invoice.total), (dec!(1.04), dec!(1.04)));
    }

    #[test]
    fn graduated_tiers_price_each_slice_at_its_own_tier() {
        let used = usage(
            key("m", TokenClass::Input),
            tiers(TierMode::Graduated),
            12_345_678,
        );

        let invoice = compute_invoice(&terms("USD"), period("2026-03"), &[used], &[]).expect("ok");

        // tier 0–1M:     1,000,000 × 3.00 / 1M = 3.00
        // tier 1M–10M:   9,000,000 × 2.00 / 1M = 18.00
        // tier 10M+:     2,345,678 × 1.00 / 1M = 2.345678 → 2.35
        assert_eq!(
            amounts(&invoice),
            vec![
                (LineKind::Tier, dec!(3.00), dec!(3.00)),
                (LineKind::Tier, dec!(18.00), dec!(18.00)),
                (LineKind::Tier, dec!(2.345678), dec!(2.35)),
            ]
        );
        assert_eq!(invoice.lines[1].tier, Some((1_000_000, Some(10_000_000))));
        assert_eq!(invoice.lines[2].tier, Some((10_000_000, None)));
        assert_eq!(
            invoice.lines[1].description,
            "m · input · tier 1,000,000–10,000,000"
        );
        // 3.00 + 18.00 + 2.35 = 23.35
        assert_eq!(invoice.total, dec!(23.35));
    }

    #[test]
    fn graduated_tiers_continue_across_a_price_change_within_the_period() {
        let mut cheaper = tiers(TierMode::Graduated);
        cheaper.version_id = "v2".into();
        let used = KeyUsage {
            key: key("m", TokenClass::Input),
            slices: vec![
                UsageSlice {
                    pricing: Some(tiers(TierMode::Graduated)),
                    quantity: 800_000,
                    events: 1,
                },
                UsageSlice {
                    pricing: Some(cheaper),
                    quantity: 400_000,
                    events: 1,
                },
            ],
        };

        let invoice = compute_invoice(&terms("USD"), period("2026-03"), &[used], &[]).expect("ok");

        // v1: 800,000 × 3.00 / 1M = 2.40 (tier 0)
        // v2 continues at token 800,000: 200,000 × 3.00 / 1M = 0.60 (tier 0),
        //    200,000 × 2.00 / 1M = 0.40 (tier 1)
        // Tier 0 is one line at one price: 1,000,000 × 3.00 / 1M = 3.00, naming no version.
        type Part = (Option<String>, Option<(i64, Option<i64>)>, i64, Decimal);
        let parts: Vec<Part> = invoice
            .lines
            .iter()
            .map(|l| (l.version_id.clone(), l.tier, l.quantity, l.amount))
            .collect();
        assert_eq!(
            parts,
            vec![
                (None, Some((0, Some(1_000_000))), 1_000_000, dec!(3.00)),
                (
                    Some("v2".into()),
                    Some((1_000_000, Some(10_000_000))),
                    200_000,
                    dec!(0.40)
                ),
            ]
        );
    }

    fn versioned(version: &str, price: Decimal, quantity: i64) -> UsageSlice {
        UsageSlice {
            pricing: Some(SlicePricing {
                version_id: version.into(),
                ..flat(price)
            }),
            quantity,
            events: 1,
        }
    }

    #[test]
    fn a_new_version_that_keeps_a_price_leaves_one_line_rounded_once() {
        let used = KeyUsage {
            key: key("m", TokenClass::Input),
            slices: vec![
                versioned("v1", dec!(0.40), 1_234_567),
                versioned("v2", dec!(0.400), 1_234_567),
            ],
        };

        let invoice = compute_invoice(&terms("USD"), period("2026-03"), &[used], &[]).expect("ok");

        // One line: 2,469,134 × 0.40 / 1M = 0.9876536 → 0.99. Two lines would have rounded
        // each 0.4938268 to 0.49 and billed 0.98.
        assert_eq!(
            amounts(&invoice),
            vec![(LineKind::Usage, dec!(0.9876536), dec!(0.99))]
        );
        assert_eq!(invoice.lines[0].quantity, 2_469_134);
        assert_eq!(invoice.lines[0].version_id, None);
        assert_eq!(invoice.total, dec!(0.99));
    }

    #[test]
    fn a_price_that_changes_and_changes_back_bills_one_line_per_price() {
        let used = KeyUsage {
            key: key("m", TokenClass::Input),
            slices: vec![
                versioned("v1", dec!(1.00), 1_500_000),
                versioned("v2", dec!(2.00), 1_000_000),
                versioned("v3", dec!(1), 500_000),
            ],
        };

        let invoice = compute_invoice(&terms("USD"), period("2026-03"), &[used], &[]).expect("ok");

        // 1.00: (1,500,000 + 500,000) × 1.00 / 1M = 2.00 ; 2.00: 1,000,000 × 2.00 / 1M = 2.00
        let lines: Vec<(i64, Decimal, Decimal, Option<String>)> = invoice
            .lines
            .iter()
            .map(|l| (l.quantity, l.unit_price, l.amount, l.version_id.clone()))
            .collect();
        assert_eq!(
            lines,
            vec![
                (2_000_000, dec!(1.00), dec!(2.00), None),
                (1_000_000, dec!(2.00), dec!(2.00), Some("v2".into())),
            ]
        );
        assert_eq!(invoice.billed[0].charge.quantity, 3_000_000);
        assert_eq!(narrow(&invoice.billed[0].charge.amount), dec!(4.00));
    }

    #[test]
    fn volume_tiers_price_the_whole_quantity_at_the_tier_of_the_total() {
        let used = usage(
            key("m", TokenClass::Input),
            tiers(TierMode::Volume),
            12_345_678,
        );

        let invoice = compute_invoice(&terms("USD"), period("2026-03"), &[used], &[]).expect("ok");

        // 12,345,678 ≥ 10M: all of it at 1.00 → 12.345678 → 12.35
        assert_eq!(
            amounts(&invoice),
            vec![(LineKind::Tier, dec!(12.345678), dec!(12.35))]
        );
        assert_eq!(invoice.lines[0].tier, Some((10_000_000, None)));
    }

    #[test]
    fn discount_then_tax_on_the_rounded_subtotal() {
        let discount = Discount {
            override_id: "d1".into(),
            percent: dec!(10),
        };
        let mut pricing_in = flat(dec!(0.40));
        pricing_in.discount = Some(discount.clone());
        let mut pricing_out = flat(dec!(1.60));
        pricing_out.discount = Some(discount);
        let mut taxed = terms("USD");
        taxed.tax_rate_percent = Some(dec!(19));

        let invoice = compute_invoice(
            &taxed,
            period("2026-03"),
            &[
                usage(
                    key("gpt-4.1-mini", TokenClass::Input),
                    pricing_in,
                    1_234_567,
                ),
                usage(
                    key("gpt-4.1-mini", TokenClass::Output),
                    pricing_out,
                    345_678,
                ),
            ],
            &[],
        )
        .expect("ok");

        // usage: 0.4938268 → 0.49 and 0.5530848 → 0.55; subtotal 1.04
        // discount: −10/100 × (0.4938268 + 0.5530848 = 1.0469116) = −0.10469116 → −0.10
        // tax: 19/100 × (1.04 − 0.10 = 0.94) = 0.1786 → 0.18
        // total: 1.04 − 0.10 + 0.18 = 1.12
        assert_eq!(
            amounts(&invoice),
            vec![
                (LineKind::Usage, dec!(0.4938268), dec!(0.49)),
                (LineKind::Usage, dec!(0.5530848), dec!(0.55)),
                (LineKind::Discount, dec!(-0.10469116), dec!(-0.10)),
                (LineKind::Tax, dec!(0.1786), dec!(0.18)),
            ]
        );
        assert_eq!(invoice.subtotal, dec!(1.04));
        assert_eq!(invoice.discount, dec!(-0.10));
        assert_eq!(invoice.tax, dec!(0.18));
        assert_eq!(invoice.total, dec!(1.12));
        // What each key is billed net of the discount, for later adjustments:
        // 0.4938268 × 0.9 = 0.44444412 ; 0.5530848 × 0.9 = 0.49777632
        let net: Vec<Decimal> = invoice
            .billed
            .iter()
            .map(|b| narrow(&b.charge.amount))
            .collect();
        assert_eq!(net, vec![dec!(0.44444412), dec!(0.49777632)]);
    }

    #[test]
    fn a_large_discounted_line_of_a_twelve_digit_price_is_exact_beyond_28_digits() {
        let mut pricing = flat(dec!(3.461234567891));
        pricing.discount = Some(Discount {
            override_id: "d1".into(),
            percent: dec!(12.3456),
        });
        let used = usage(key("m", TokenClass::Input), pricing, 28_888_888_889);

        let invoice = compute_invoice(&terms("USD"), period("2026-03"), &[used], &[]).expect("ok");

        // usage:    28,888,888,889 × 3.461234567891 / 1M = 99991.220850569026063099 → 99991.22
        // discount: −12.3456 % of that = −12344.516161327849681645950144 → −12344.52
        //           (30 significant digits: no Decimal holds it)
        // net charge of the key: 99991.220850569026063099 − 12344.516161327849681645950144
        //           = 87646.704689241176381453049856
        let precise: Vec<String> = invoice
            .lines
            .iter()
            .map(|l| l.precise.to_plain_string())
            .collect();
        assert_eq!(
            precise,
            vec![
                "99991.220850569026063099",
                "-12344.516161327849681645950144"
            ]
        );
        assert_eq!(
            invoice.lines.iter().map(|l| l.amount).collect::<Vec<_>>(),
            vec![dec!(99991.22), dec!(-12344.52)]
        );
        // 99991.22 − 12344.52 = 87646.70
        assert_eq!(invoice.total, dec!(87646.70));
        assert_eq!(
            invoice.billed[0].charge.amount.to_plain_string(),
            "87646.704689241176381453049856"
        );
    }

    #[test]
    fn each_currency_rounds_to_its_own_minor_unit() {
        let used = |price| vec![usage(key("m", TokenClass::Input), flat(price), 2_500_000)];

        let jpy =
            compute_invoice(&terms("JPY"), period("2026-03"), &used(dec!(1)), &[]).expect("ok");
        let usd = compute_invoice(&terms("USD"), period("2026-03"), &used(dec!(0.0021)), &[])
            .expect("ok");
        let kwd = compute_invoice(&terms("KWD"), period("2026-03"), &used(dec!(0.0003)), &[])
            .expect("ok");

        // JPY: 2,500,000 × 1 / 1M = 2.5 → 2 (tie, to even)
        assert_eq!(jpy.total, dec!(2));
        // USD: 2,500,000 × 0.0021 / 1M = 0.00525 → 0.01 (above the tie)
        assert_eq!(usd.total, dec!(0.01));
        // KWD: 2,500,000 × 0.0003 / 1M = 0.00075 → 0.001 (above the tie at 0.0005)
        assert_eq!(kwd.total, dec!(0.001));
    }

    #[test]
    fn half_even_ties_go_both_ways_and_the_tenant_mode_changes_them() {
        let used = vec![
            usage(key("a", TokenClass::Input), flat(dec!(1)), 5_000),
            usage(key("b", TokenClass::Input), flat(dec!(1)), 15_000),
        ];
        let mut half_up = terms("USD");
        half_up.rounding = RoundingMode::HalfUp;

        let even = compute_invoice(&terms("USD"), period("2026-03"), &used, &[]).expect("ok");
        let up = compute_invoice(&half_up, period("2026-03"), &used, &[]).expect("ok");

        // a: 5,000 × 1 / 1M = 0.005 → 0.00 half-even (0 is even), 0.01 half-up
        // b: 15,000 × 1 / 1M = 0.015 → 0.02 both ways
        assert_eq!(
            even.lines.iter().map(|l| l.amount).collect::<Vec<_>>(),
            vec![dec!(0.00), dec!(0.02)]
        );
        assert_eq!(
            up.lines.iter().map(|l| l.amount).collect::<Vec<_>>(),
            vec![dec!(0.01), dec!(0.02)]
        );
    }

    #[test]
    fn many_tiny_lines_total_the_sum_of_their_rounded_amounts() {
        // 100 models × 4,900 tokens at 1.00 per 1M = 0.0049 each → 0.00 each.
        let used: Vec<KeyUsage> = (0..100)
            .map(|i| {
                usage(
                    key(&format!("m{i:03}"), TokenClass::Input),
                    flat(dec!(1)),
                    4_900,
                )
            })
            .collect();

        let invoice = compute_invoice(&terms("USD"), period("2026-03"), &used, &[]).expect("ok");

        // Σ rounded = 100 × 0.00 = 0.00; rounding the precise sum (0.49) instead would bill 0.49.
        assert_eq!(invoice.lines.len(), 100);
        assert_eq!(invoice.total, dec!(0.00));
        let precise: Decimal = invoice.lines.iter().map(|l| narrow(&l.precise)).sum();
        assert_eq!(precise, dec!(0.49));
    }

    #[test]
    fn unpriced_slices_are_surfaced_and_never_billed() {
        let used = KeyUsage {
            key: key("m", TokenClass::Input),
            slices: vec![
                UsageSlice {
                    pricing: None,
                    quantity: 700,
                    events: 3,
                },
                UsageSlice {
                    pricing: Some(flat(dec!(1))),
                    quantity: 1_000_000,
                    events: 2,
                },
            ],
        };

        let invoice = compute_invoice(&terms("USD"), period("2026-03"), &[used], &[]).expect("ok");

        assert_eq!((invoice.unpriced_tokens, invoice.unpriced_events), (700, 3));
        assert_eq!(invoice.total, dec!(1.00));
        assert_eq!(invoice.billed[0].charge.quantity, 1_000_000);
    }

    #[test]
    fn late_usage_of_a_closed_period_becomes_an_adjustment_naming_it() {
        let march = period("2026-03");
        let k = key("m", TokenClass::Input);
        let late = Adjustment {
            period: march,
            // now: 1,500,000 × 3.00 / 1M = 4.50 ; billed in March: 1,000,000 × 3.00 / 1M = 3.00
            expected: BTreeMap::from([(
                k.clone(),
                Charge {
                    quantity: 1_500_000,
                    amount: exact::wide(dec!(4.50)),
                },
            )]),
            billed: BTreeMap::from([(
                k.clone(),
                Charge {
                    quantity: 1_000_000,
                    amount: exact::wide(dec!(3.00)),
                },
            )]),
        };

        let invoice = compute_invoice(&terms("USD"), period("2026-04"), &[], &[late]).expect("ok");

        // 4.50 − 3.00 = 1.50 for 500,000 tokens (1.50 × 1M / 500,000 = 3.00 per 1M)
        let line = &invoice.lines[0];
        assert_eq!(line.kind, LineKind::Adjustment);
        assert_eq!(
            (line.quantity, line.amount, line.unit_price),
            (500_000, dec!(1.50), dec!(3.00))
        );
        assert_eq!(line.original_period, Some(march));
        assert_eq!(
            line.description,
            "m · input · usage of 2026-03 not billed before"
        );
        assert_eq!(invoice.total, dec!(1.50));
        assert_eq!(invoice.billed[0].period, march);
    }

    proptest! {
        /// However a period's usage trickles in across later invoices, what all of them bill for
        /// it adds up to what the whole usage costs: nothing lost, nothing billed twice.
        #[test]
        fn adjustments_bill_exactly_the_difference_so_late_usage_is_billed_once(
            increments in prop::collection::vec(1i64..3_000_000, 1..6),
            graduated in any::<bool>(),
        ) {
            let march = period("2026-03");
            let k = key("m", TokenClass::Input);
            let mode = if graduated { TierMode::Graduated } else { TierMode::Volume };
            let mut billed: BTreeMap<RateKey, Charge> = BTreeMap::new();
            let mut seen = 0;
            for (i, increment) in increments.iter().enumerate() {
                seen += increment;
                let now = vec![usage(k.clone(), tiers(mode), seen)];
                let invoice = if i == 0 {
                    compute_invoice(&terms("USD"), march, &now, &[]).expect("ok")
                } else {
                    let expected = charge_period(&now).expect("ok").per_key;
                    let adjustment = Adjustment { period: march, expected, billed: billed.clone() };
                    compute_invoice(&terms("USD"), period("2026-04"), &[], &[adjustment]).expect("ok")
                };
                prop_assert_eq!(invoice.total, invoice.lines.iter().map(|l| l.amount).sum::<Decimal>());
                for record in invoice.billed {
                    let entry = billed.entry(record.key).or_default();
                    entry.quantity += record.charge.quantity;
                    entry.amount += &record.charge.amount;
                }
            }
            let whole = charge_period(&[usage(k.clone(), tiers(mode), seen)]).expect("ok");
            prop_assert_eq!(billed.get(&k), whole.per_key.get(&k));
        }

        /// Rounding happens per line: the total is the sum of rounded lines, and it is within
        /// half a minor unit per line of the exact sum.
        #[test]
        fn the_total_is_the_sum_of_rounded_lines(
            quantities in prop::collection::vec(0i64..50_000_000, 1..30),
            price_micros in 0i64..50_000_000,
        ) {
            let price = Decimal::new(price_micros, 6);
            let used: Vec<KeyUsage> = quantities
                .iter()
                .enumerate()
                .map(|(i, q)| usage(key(&format!("m{i}"), TokenClass::Output), flat(price), *q))
                .collect();

            let invoice = compute_invoice(&terms("USD"), period("2026-03"), &used, &[]).expect("ok");

            let rounded: Decimal = invoice.lines.iter().map(|l| l.amount).sum();
            let exact: Decimal = invoice.lines.iter().map(|l| narrow(&l.precise)).sum();
            prop_assert_eq!(invoice.total, rounded);
            prop_assert!((rounded - exact).abs() <= dec!(0.005) * Decimal::from(invoice.lines.len()));
        }
    }
}

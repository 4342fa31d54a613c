//! Graduated and volume tiers over a billing period's quantity of one (provider, model, class).
//!
//! Tier bounds are half-open token ranges `[from, up_to)`: with a first tier up to 1,000,000
//! the 1,000,000th token (number 999,999 counting from 0) is the last one in it. A volume total
//! of exactly 1,000,000 therefore falls in the second tier.

use rust_decimal::Decimal;

use super::FieldError;
use super::pricing::parse_price;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TierMode {
    /// Each tier's slice of the quantity at that tier's price.
    Graduated,
    /// The whole quantity at the price of the tier the period total falls in.
    Volume,
}

impl TierMode {
    /// The name stored in `price_book_rates.tier_mode`.
    pub const fn as_str(self) -> &'static str {
        match self {
            TierMode::Graduated => "graduated",
            TierMode::Volume => "volume",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [TierMode::Graduated, TierMode::Volume]
            .into_iter()
            .find(|m| m.as_str() == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tier {
    /// Exclusive upper bound in tokens; `None` on the last, open-ended tier.
    pub up_to: Option<i64>,
    pub price_per_million: Decimal,
}

/// A validated tier list: non-empty, bounds strictly increasing, only the last open-ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierSchedule {
    mode: TierMode,
    tiers: Vec<Tier>,
}

/// The part of a quantity that one tier prices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierSlice {
    pub tier_index: usize,
    /// The tier's bounds, as on the invoice line.
    pub from: i64,
    pub up_to: Option<i64>,
    pub quantity: i64,
    pub price_per_million: Decimal,
}

impl TierSchedule {
    /// Validates `(up_to, price)` pairs; `field` is the path of the tier list.
    pub fn parse(
        mode: TierMode,
        tiers: &[(Option<i64>, &str)],
        field: &str,
    ) -> Result<Self, FieldError> {
        if tiers.is_empty() {
            return Err(FieldError::new(field, "at least one tier is required"));
        }
        let mut parsed = Vec::with_capacity(tiers.len());
        let mut previous = 0;
        for (i, (up_to, price)) in tiers.iter().enumerate() {
            let at = format!("{field}[{i}]");
            let last = i + 1 == tiers.len();
            match (up_to, last) {
                (None, false) => {
                    return Err(FieldError::new(
                        format!("{at}.up_to_tokens"),
                        "only the last tier may be open-ended",
                    ));
                }
                (Some(_), true) => {
                    return Err(FieldError::new(
                        format!("{at}.up_to_tokens"),
                        "the last tier must be open-ended (no up_to_tokens)",
                    ));
                }
                (Some(bound), false) if *bound <= previous => {
                    return Err(FieldError::new(
                        format!("{at}.up_to_tokens"),
                        "must be greater than the previous tier's bound (and than 0)",
                    ));
                }
                (Some(bound), false) => previous = *bound,
                (None, true) => {}
            }
            parsed.push(Tier {
                up_to: *up_to,
                price_per_million: parse_price(price, &format!("{at}.price_per_million"))?,
            });
        }
        Ok(Self {
            mode,
            tiers: parsed,
        })
    }

    /// A schedule as stored (already validated when it was created).
    pub fn from_stored(mode: TierMode, tiers: Vec<Tier>) -> Self {
        Self { mode, tiers }
    }

    pub fn mode(&self) -> TierMode {
        self.mode
    }

    pub fn tiers(&self) -> &[Tier] {
        &self.tiers
    }

    /// The price of the first tier: what a single event is rated at before the period's
    /// quantity is known (rollups and reports); the invoice applies the tiers.
    pub fn first_price(&self) -> Decimal {
        self.tiers
            .first()
            .map_or(Decimal::ZERO, |t| t.price_per_million)
    }

    fn bounds(&self) -> impl Iterator<Item = (usize, i64, Option<i64>, Decimal)> + '_ {
        let mut from = 0;
        self.tiers.iter().enumerate().map(move |(i, tier)| {
            let start = from;
            from = tier.up_to.unwrap_or(i64::MAX);
            (i, start, tier.up_to, tier.price_per_million)
        })
    }

    /// Prices `quantity` tokens that follow `before` tokens already counted in the period, given
    /// the period's `total`. Graduated: the tokens `[before, before + quantity)` split across
    /// the tiers they fall in. Volume: all of them at the tier containing `total`.
    pub fn slices(&self, before: i64, quantity: i64, total: i64) -> Vec<TierSlice> {
        if quantity <= 0 {
            return Vec::new();
        }
        match self.mode {
            TierMode::Graduated => {
                let end = before.saturating_add(quantity);
                self.bounds()
                    .filter_map(|(tier_index, from, up_to, price)| {
                        let lo = from.max(before);
                        let hi = up_to.unwrap_or(i64::MAX).min(end);
                        (lo < hi).then_some(TierSlice {
                            tier_index,
                            from,
                            up_to,
                            quantity: hi - lo,
                            price_per_million: price,
                        })
                    })
                    .collect()
            }
            TierMode::Volume => self
                .bounds()
                .find(|(_, from, up_to, _)| *from <= total && up_to.is_none_or(|u| total < u))
                .map(|(tier_index, from, up_to, price)| TierSlice {
                    tier_index,
                    from,
                    up_to,
                    quantity,
                    price_per_million: price,
                })
                .into_iter()
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal::dec;

    fn schedule(mode: TierMode) -> TierSchedule {
        TierSchedule::parse(
            mode,
            &[
                (Some(1_000_000), "3.00"),
                (Some(10_000_000), "2.00"),
                (None, "1.00"),
            ],
            "tiers",
        )
        .expect("valid")
    }

    #[test]
    fn graduated_slices_split_at_each_boundary_crossed() {
        let slices = schedule(TierMode::Graduated).slices(0, 12_000_000, 12_000_000);

        let parts: Vec<(usize, i64, Decimal)> = slices
            .iter()
            .map(|s| (s.tier_index, s.quantity, s.price_per_million))
            .collect();
        // 1,000,000 in tier 0; 10,000,000 − 1,000,000 = 9,000,000 in tier 1; 2,000,000 in tier 2.
        assert_eq!(
            parts,
            vec![
                (0, 1_000_000, dec!(3.00)),
                (1, 9_000_000, dec!(2.00)),
                (2, 2_000_000, dec!(1.00))
            ]
        );
    }

    #[test]
    fn graduated_slices_start_where_earlier_usage_of_the_period_left_off() {
        let slices = schedule(TierMode::Graduated).slices(900_000, 200_000, 1_100_000);

        let parts: Vec<(usize, i64)> = slices.iter().map(|s| (s.tier_index, s.quantity)).collect();
        // 900,000 + 200,000 = 1,100,000: 100,000 finish tier 0, 100,000 start tier 1.
        assert_eq!(parts, vec![(0, 100_000), (1, 100_000)]);
    }

    #[test]
    fn a_volume_total_exactly_on_a_bound_falls_in_the_next_tier() {
        let just_below = schedule(TierMode::Volume).slices(0, 999_999, 999_999);
        let on_bound = schedule(TierMode::Volume).slices(0, 1_000_000, 1_000_000);

        assert_eq!(just_below[0].price_per_million, dec!(3.00));
        assert_eq!(on_bound[0].price_per_million, dec!(2.00));
        assert_eq!(
            (on_bound[0].from, on_bound[0].up_to),
            (1_000_000, Some(10_000_000))
        );
        assert_eq!(on_bound[0].quantity, 1_000_000);
    }

    #[test]
    fn malformed_tier_lists_name_the_offending_tier() {
        type Case<'a> = (&'a [(Option<i64>, &'a str)], &'a str);
        let cases: [Case; 5] = [
            (&[], "tiers"),
            (
                &[(Some(10), "1"), (Some(10), "1"), (None, "1")],
                "tiers[1].up_to_tokens",
            ),
            (&[(None, "1"), (None, "1")], "tiers[0].up_to_tokens"),
            (&[(Some(10), "1")], "tiers[0].up_to_tokens"),
            (
                &[(Some(10), "1"), (None, "-1")],
                "tiers[1].price_per_million",
            ),
        ];
        for (tiers, field) in cases {
            let error = TierSchedule::parse(TierMode::Graduated, tiers, "tiers").expect_err("bad");
            assert_eq!(error.field, field);
        }
    }
}

//! Currencies and the one place amounts are rounded: invoice lines, to the currency's minor
//! unit (ISO 4217 exponent), with the tenant's rounding mode.

use rust_decimal::{Decimal, RoundingStrategy};

use super::exact::{self, Precise};
use super::tenant::RoundingMode;

/// A currency with the number of minor-unit digits its amounts are rounded to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Currency {
    pub code: String,
    pub exponent: u32,
}

impl Currency {
    /// The ISO 4217 currency `code`, if it has minor units. The exponents come from the
    /// `iso_currency` crate (generated from the ISO table, so JPY 0, USD 2, KWD 3, CLF 4 …)
    /// rather than a hand-kept list that would drift. Funds and metals without an exponent
    /// (XAU, XXX) cannot be invoiced.
    pub fn from_code(code: &str) -> Option<Self> {
        let exponent = iso_currency::Currency::from_code(code)?.exponent()?;
        Some(Self {
            code: code.to_owned(),
            exponent: u32::from(exponent),
        })
    }

    /// `amount` rounded once to this currency's minor unit.
    pub fn round(&self, amount: Decimal, mode: RoundingMode) -> Decimal {
        amount.round_dp_with_strategy(self.exponent, strategy(mode))
    }

    /// A precise amount rounded once to this currency's minor unit; `None` only for amounts
    /// beyond `Decimal`'s range (about 10²⁴ in any currency).
    pub fn round_precise(&self, amount: &Precise, mode: RoundingMode) -> Option<Decimal> {
        let rounded = amount.with_scale_round(i64::from(self.exponent), wide_mode(mode));
        exact::narrow(&rounded).map(|d| d.round_dp(self.exponent))
    }
}

fn wide_mode(mode: RoundingMode) -> bigdecimal::RoundingMode {
    use bigdecimal::RoundingMode as Wide;
    match mode {
        RoundingMode::HalfEven => Wide::HalfEven,
        RoundingMode::HalfUp => Wide::HalfUp,
        RoundingMode::HalfDown => Wide::HalfDown,
        RoundingMode::Up => Wide::Up,
        RoundingMode::Down => Wide::Down,
        RoundingMode::Ceiling => Wide::Ceiling,
        RoundingMode::Floor => Wide::Floor,
    }
}

fn strategy(mode: RoundingMode) -> RoundingStrategy {
    match mode {
        RoundingMode::HalfEven => RoundingStrategy::MidpointNearestEven,
        RoundingMode::HalfUp => RoundingStrategy::MidpointAwayFromZero,
        RoundingMode::HalfDown => RoundingStrategy::MidpointTowardZero,
        RoundingMode::Up => RoundingStrategy::AwayFromZero,
        RoundingMode::Down => RoundingStrategy::ToZero,
        RoundingMode::Ceiling => RoundingStrategy::ToPositiveInfinity,
        RoundingMode::Floor => RoundingStrategy::ToNegativeInfinity,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal::dec;

    fn currency(code: &str) -> Currency {
        Currency::from_code(code).expect("iso currency")
    }

    #[test]
    fn exponents_follow_iso_4217() {
        assert_eq!(currency("JPY").exponent, 0);
        assert_eq!(currency("USD").exponent, 2);
        assert_eq!(currency("EUR").exponent, 2);
        assert_eq!(currency("KWD").exponent, 3);
        assert_eq!(currency("CLF").exponent, 4);
        assert_eq!(Currency::from_code("XAU"), None);
        assert_eq!(Currency::from_code("ABC"), None);
    }

    #[test]
    fn half_even_sends_ties_to_the_even_neighbour_in_each_currency() {
        assert_eq!(
            currency("USD").round(dec!(0.125), RoundingMode::HalfEven),
            dec!(0.12)
        );
        assert_eq!(
            currency("USD").round(dec!(0.135), RoundingMode::HalfEven),
            dec!(0.14)
        );
        assert_eq!(
            currency("JPY").round(dec!(2.5), RoundingMode::HalfEven),
            dec!(2)
        );
        assert_eq!(
            currency("JPY").round(dec!(3.5), RoundingMode::HalfEven),
            dec!(4)
        );
        assert_eq!(
            currency("KWD").round(dec!(1.0005), RoundingMode::HalfEven),
            dec!(1.000)
        );
        assert_eq!(
            currency("KWD").round(dec!(1.0015), RoundingMode::HalfEven),
            dec!(1.002)
        );
    }

    #[test]
    fn every_mode_rounds_as_its_name_says() {
        let usd = currency("USD");
        let cases = [
            (RoundingMode::HalfEven, dec!(0.12), dec!(-0.12)),
            (RoundingMode::HalfUp, dec!(0.13), dec!(-0.13)),
            (RoundingMode::HalfDown, dec!(0.12), dec!(-0.12)),
            (RoundingMode::Up, dec!(0.13), dec!(-0.13)),
            (RoundingMode::Down, dec!(0.12), dec!(-0.12)),
            (RoundingMode::Ceiling, dec!(0.13), dec!(-0.12)),
            (RoundingMode::Floor, dec!(0.12), dec!(-0.13)),
        ];
        for (mode, positive, negative) in cases {
            assert_eq!(usd.round(dec!(0.125), mode), positive, "{mode:?}");
            assert_eq!(usd.round(dec!(-0.125), mode), negative, "{mode:?}");
        }
    }
}

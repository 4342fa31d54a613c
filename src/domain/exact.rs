//! Exact decimal arithmetic for money: every result is the true value or `None`, never a
//! rounded one.
//!
//! `rust_decimal`'s own operators keep 28 significant digits and, when a product or a sum of
//! different scales needs more, quietly round the fraction; `checked_*` only reports overflow
//! of the integer part. With prices of up to 12 fractional digits, discounts and period
//! quantities, such products are reachable, so every amount on a billing path goes through
//! these functions instead. On `Decimal` they work on the integer mantissas (i128, or an
//! arbitrary-precision product when that overflows), strip trailing zeros, and refuse what does
//! not fit 96 bits at a scale of at most 28. Figures that may legitimately need more digits
//! (an invoice's precise amounts) are [`Precise`], arbitrary-precision and exact.

use bigdecimal::BigDecimal;
use bigdecimal::num_bigint::BigInt;
use rust_decimal::Decimal;

/// An exact decimal of any size: the precise (unrounded) amounts of invoices.
pub type Precise = BigDecimal;

/// Largest mantissa a `Decimal` holds: 2^96 − 1.
const MAX_MANTISSA: i128 = (1 << 96) - 1;
/// Largest scale a `Decimal` holds.
const MAX_SCALE: u32 = 28;

/// `a × b`, exactly.
pub fn mul(a: Decimal, b: Decimal) -> Option<Decimal> {
    let (a, b) = (a.normalize(), b.normalize());
    match a.mantissa().checked_mul(b.mantissa()) {
        Some(mantissa) => build(mantissa, a.scale() + b.scale()),
        // Beyond i128 the product may still fit once its trailing zeros go (2⁵⁰ · 10⁻²⁰ ×
        // 5⁴⁰ · 10⁻²⁰, say): let the wide product decide.
        None => narrow(&(wide(a) * wide(b))),
    }
}

/// `a + b`, exactly.
pub fn add(a: Decimal, b: Decimal) -> Option<Decimal> {
    let (a, b) = (a.normalize(), b.normalize());
    let scale = a.scale().max(b.scale());
    let mantissa = rescaled(a, scale)?.checked_add(rescaled(b, scale)?)?;
    build(mantissa, scale)
}

/// `a − b`, exactly.
pub fn sub(a: Decimal, b: Decimal) -> Option<Decimal> {
    add(a, -b)
}

/// `a / 10^digits`, exactly (a shift of the decimal point).
pub fn div_pow10(a: Decimal, digits: u32) -> Option<Decimal> {
    let a = a.normalize();
    build(a.mantissa(), a.scale() + digits)
}

/// Σ `values`, exactly.
pub fn sum(values: impl IntoIterator<Item = Decimal>) -> Option<Decimal> {
    values.into_iter().try_fold(Decimal::ZERO, add)
}

/// `value` as a [`Precise`], the same number.
pub fn wide(value: Decimal) -> Precise {
    BigDecimal::new(BigInt::from(value.mantissa()), i64::from(value.scale()))
}

/// `value` as a `Decimal` if it is one exactly (trailing zeros aside), else `None`.
pub fn narrow(value: &Precise) -> Option<Decimal> {
    let (mut digits, exponent) = value.normalized().into_bigint_and_exponent();
    let scale = if exponent < 0 {
        digits *= BigInt::from(10).pow(u32::try_from(-exponent).ok()?);
        0
    } else {
        u32::try_from(exponent).ok()?
    };
    build(i128::try_from(digits).ok()?, scale)
}

/// `value / 10^digits`, exactly.
pub fn shift(value: Precise, digits: u32) -> Precise {
    value * BigDecimal::new(BigInt::from(1), i64::from(digits))
}

/// `quantity × per_million / 1,000,000`, exactly, however large.
pub fn per_million(quantity: i64, per_million: Decimal) -> Precise {
    shift(wide(Decimal::from(quantity)) * wide(per_million), 6)
}

/// The average price per 1M tokens of `amount` for `quantity` tokens, rounded half-even to 6
/// places (a figure shown on adjustment lines, not one summed).
pub fn average_per_million(amount: &Precise, quantity: i64) -> Option<Decimal> {
    let per_million = amount * wide(Decimal::from(1_000_000)) / wide(Decimal::from(quantity));
    narrow(&per_million.with_scale_round(6, bigdecimal::RoundingMode::HalfEven))
}

/// The mantissa of `value` at a scale ≥ its own.
fn rescaled(value: Decimal, scale: u32) -> Option<i128> {
    let factor = 10_i128.checked_pow(scale - value.scale())?;
    value.mantissa().checked_mul(factor)
}

/// `mantissa × 10^−scale` as a `Decimal`, stripping trailing zeros until it fits; `None` when
/// it cannot be held without rounding.
fn build(mut mantissa: i128, mut scale: u32) -> Option<Decimal> {
    // unsigned_abs: i128::MIN has no i128 absolute value.
    let too_wide = |m: i128| m.unsigned_abs() > MAX_MANTISSA.unsigned_abs();
    while scale > 0 && (scale > MAX_SCALE || too_wide(mantissa)) && mantissa % 10 == 0 {
        mantissa /= 10;
        scale -= 1;
    }
    if scale > MAX_SCALE || too_wide(mantissa) {
        return None;
    }
    Some(Decimal::from_i128_with_scale(mantissa, scale).normalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rust_decimal::dec;

    #[test]
    fn a_product_beyond_28_digits_is_refused_where_rust_decimal_rounds() {
        let a = dec!(0.123456789012345);
        let b = dec!(0.999999999999999);

        let rounded = a * b;

        // 15 + 15 fractional digits: the exact product has 30, one more than fits.
        assert_eq!(rounded.scale(), 28);
        assert_eq!(mul(a, b), None);
    }

    #[test]
    fn a_sum_of_far_apart_scales_is_refused_where_rust_decimal_rounds() {
        let big = dec!(10000000000000000000);
        let tiny = dec!(0.0000000001);

        assert_ne!((big + tiny) - big, tiny);
        assert_eq!(add(big, tiny), None);
    }

    #[test]
    fn trailing_zeros_do_not_take_up_room() {
        let price = dec!(93.849400000000000000);

        assert_eq!(
            mul(Decimal::from(10_000_000_000_i64), price),
            Some(dec!(938494000000))
        );
        assert_eq!(div_pow10(dec!(1.5000), 6), Some(dec!(0.0000015)));
    }

    #[test]
    fn the_largest_price_times_the_largest_bucket_is_exact() {
        // 10^10 tokens × 99999.999999999999 (12 fractional digits) / 10^6
        //   = 10^4 × 99999.999999999999 = 999999999.99999999
        let product = mul(Decimal::from(10_000_000_000_i64), dec!(99999.999999999999))
            .and_then(|p| div_pow10(p, 6));

        assert_eq!(product, Some(dec!(999999999.99999999)));
    }

    /// At most 15 significant digits and 12 fractional ones: any sum of two fits 28 digits.
    #[test]
    fn extreme_mantissas_are_refused_not_panicked_on() {
        let two_64 = Decimal::from_i128_with_scale(1 << 64, 0);
        let minus_two_63 = Decimal::from_i128_with_scale(-(1 << 63), 0);

        // −2^127 = i128::MIN, far beyond 96 bits.
        assert_eq!(mul(two_64, minus_two_63), None);
        assert_eq!(build(i128::MIN, 0), None);
        assert_eq!(
            add(Decimal::MIN, dec!(-0.5884105728)),
            None,
            "one below the smallest Decimal"
        );
    }

    #[test]
    fn a_product_beyond_i128_that_fits_once_reduced_is_computed() {
        // 2^50 · 10^-20 × 5^40 · 10^-20: mantissas 1125899906842624 × 9094947017729282379150390625
        // overflow i128, the product is 2^50 · 5^40 · 10^-40 = 2^10 · 10^40 · 10^-40 = 1024.
        let a = Decimal::from_i128_with_scale(1 << 50, 20);
        let b = Decimal::from_i128_with_scale(5_i128.pow(40), 20);

        assert_eq!(mul(a, b), Some(dec!(1024)));
    }

    #[test]
    fn precise_amounts_hold_what_decimal_cannot_and_narrow_back_only_when_exact() {
        // 28,888,888,889 tokens × 3.461234567891 per 1M × (100 − 12.3456) %: 36 significant
        // digits, which no Decimal holds.
        let base = per_million(28_888_888_889, dec!(3.461234567891));
        let discounted = shift(base.clone() * wide(dec!(87.6544)), 2);

        assert_eq!(
            discounted.to_plain_string(),
            "87646.704689241176381453049856"
        );
        assert_eq!(narrow(&discounted), None);
        assert_eq!(narrow(&wide(dec!(12.3400))), Some(dec!(12.34)));
        assert_eq!(
            average_per_million(&wide(dec!(1.50)), 500_000),
            Some(dec!(3.000000))
        );
    }

    fn small_decimal() -> impl Strategy<Value = Decimal> {
        (-999_999_999_999_999_i64..=999_999_999_999_999, 0u32..=12)
            .prop_map(|(m, s)| Decimal::new(m, s))
    }

    proptest! {
        #[test]
        fn results_agree_with_rust_decimal_where_it_is_exact(a in small_decimal(), b in small_decimal()) {
            // Every such sum fits, so rust_decimal is exact on it too; so is a product
            // whenever it fits.
            prop_assert_eq!(add(a, b), Some(a + b));
            prop_assert_eq!(sub(a, b), Some(a - b));
            // The wide product is exact: mul gives it whenever a Decimal holds it.
            let exact = wide(a) * wide(b);
            prop_assert_eq!(mul(a, b), narrow(&exact));
            if let Some(product) = mul(a, b) {
                prop_assert_eq!(wide(product), exact);
            }
        }

        #[test]
        fn any_decimals_multiply_exactly_or_not_at_all(
            (m1, s1) in (any::<i64>(), 0u32..=28),
            (m2, s2) in (any::<i64>(), 0u32..=28),
            (h1, h2) in (any::<i32>(), any::<i32>()),
        ) {
            // Mantissas across the whole 96-bit range, negatives and all.
            let a = Decimal::from_i128_with_scale((i128::from(h1) << 64) ^ i128::from(m1), s1);
            let b = Decimal::from_i128_with_scale((i128::from(h2) << 64) ^ i128::from(m2), s2);
            let exact = wide(a) * wide(b);
            match mul(a, b) {
                Some(product) => prop_assert_eq!(wide(product), exact),
                None => prop_assert_eq!(narrow(&exact), None),
            }
            match add(a, b) {
                Some(total) => prop_assert_eq!(wide(total), wide(a) + wide(b)),
                None => prop_assert_eq!(narrow(&(wide(a) + wide(b))), None),
            }
        }

        #[test]
        fn a_product_is_refused_only_when_it_cannot_be_held(a in small_decimal(), b in small_decimal()) {
            let (x, y) = (a.normalize(), b.normalize());
            let digits = |d: Decimal| d.mantissa().unsigned_abs().checked_ilog10().map_or(1, |l| l + 1);
            let fits = digits(x) + digits(y) <= 28 && x.scale() + y.scale() <= 28;
            if fits {
                prop_assert!(mul(a, b).is_some());
            }
        }
    }
}

//! Exact decimal arithmetic for money: every result is the true value or `None`, never a
//! rounded one.
//!
//! `rust_decimal`'s own operators keep 28 significant digits and, when a product or a sum of
//! different scales needs more, quietly round the fraction; `checked_*` only reports overflow
//! of the integer part. With prices of up to 12 fractional digits, discounts and period
//! quantities, such products are reachable, so every amount on a billing path goes through
//! these functions instead: they work on the integer mantissas (i128), strip trailing zeros,
//! and refuse what does not fit 96 bits at a scale of at most 28.

use rust_decimal::Decimal;

/// Largest mantissa a `Decimal` holds: 2^96 − 1.
const MAX_MANTISSA: i128 = (1 << 96) - 1;
/// Largest scale a `Decimal` holds.
const MAX_SCALE: u32 = 28;

/// `a × b`, exactly.
pub fn mul(a: Decimal, b: Decimal) -> Option<Decimal> {
    let (a, b) = (a.normalize(), b.normalize());
    let mantissa = a.mantissa().checked_mul(b.mantissa())?;
    build(mantissa, a.scale() + b.scale())
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

/// The mantissa of `value` at a scale ≥ its own.
fn rescaled(value: Decimal, scale: u32) -> Option<i128> {
    let factor = 10_i128.checked_pow(scale - value.scale())?;
    value.mantissa().checked_mul(factor)
}

/// `mantissa × 10^−scale` as a `Decimal`, stripping trailing zeros until it fits; `None` when
/// it cannot be held without rounding.
fn build(mut mantissa: i128, mut scale: u32) -> Option<Decimal> {
    while scale > 0 && (scale > MAX_SCALE || mantissa.abs() > MAX_MANTISSA) && mantissa % 10 == 0 {
        mantissa /= 10;
        scale -= 1;
    }
    if scale > MAX_SCALE || mantissa.abs() > MAX_MANTISSA {
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
            if let Some(product) = mul(a, b) {
                prop_assert_eq!(product, a * b);
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

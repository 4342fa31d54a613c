//! Token classes and counts. Classes are disjoint buckets: Σ of an event's classes is its
//! billable total, so no token can be priced twice.

use std::fmt;

use super::FieldError;

/// A disjoint token bucket. The discriminants equal the proto `TokenClass` numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum TokenClass {
    Input = 1,
    CacheRead = 2,
    CacheWrite5m = 3,
    CacheWrite1h = 4,
    Output = 5,
    Reasoning = 6,
    InputAudio = 7,
    OutputAudio = 8,
    InputImage = 9,
    OutputImage = 10,
    CacheWrite30m = 11,
    CacheWrite12h = 12,
}

/// How many token classes there are: the length of every per-class array.
pub const CLASS_COUNT: usize = 12;

/// The classes of the first release (1–10). Payload hashes of stored events cover exactly
/// these, so the later classes enter a hash only when non-zero (see `UsageEvent::payload_hash`).
pub const ORIGINAL_CLASS_COUNT: usize = 10;

impl TokenClass {
    /// Every class, in canonical (proto number) order.
    pub const ALL: [TokenClass; CLASS_COUNT] = [
        TokenClass::Input,
        TokenClass::CacheRead,
        TokenClass::CacheWrite5m,
        TokenClass::CacheWrite1h,
        TokenClass::Output,
        TokenClass::Reasoning,
        TokenClass::InputAudio,
        TokenClass::OutputAudio,
        TokenClass::InputImage,
        TokenClass::OutputImage,
        TokenClass::CacheWrite30m,
        TokenClass::CacheWrite12h,
    ];

    /// The stable name used in storage, CSV exports and field paths.
    pub const fn as_str(self) -> &'static str {
        match self {
            TokenClass::Input => "input",
            TokenClass::CacheRead => "cache_read",
            TokenClass::CacheWrite5m => "cache_write_5m",
            TokenClass::CacheWrite1h => "cache_write_1h",
            TokenClass::Output => "output",
            TokenClass::Reasoning => "reasoning",
            TokenClass::InputAudio => "input_audio",
            TokenClass::OutputAudio => "output_audio",
            TokenClass::InputImage => "input_image",
            TokenClass::OutputImage => "output_image",
            TokenClass::CacheWrite30m => "cache_write_30m",
            TokenClass::CacheWrite12h => "cache_write_12h",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|class| class.as_str() == name)
    }

    /// From the proto enum number; `None` for UNSPECIFIED and unknown numbers.
    pub fn from_proto(number: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|class| *class as i32 == number)
    }

    /// Position in [`TokenClass::ALL`] and in [`TokenCounts`].
    pub const fn index(self) -> usize {
        self as usize - 1
    }
}

impl fmt::Display for TokenClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Token counts by class. Constructed only through [`TokenCounts::new`], which rejects
/// negative buckets and totals that overflow, so every value of this type is billable as is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct TokenCounts([i64; CLASS_COUNT]);

impl TokenCounts {
    /// Validates raw buckets (in [`TokenClass::ALL`] order). The error names the class.
    pub fn new(buckets: [i64; CLASS_COUNT]) -> Result<Self, FieldError> {
        let mut total: i64 = 0;
        for class in TokenClass::ALL {
            let value = buckets[class.index()];
            if value < 0 {
                return Err(FieldError::new(class.as_str(), "must not be negative"));
            }
            total = total
                .checked_add(value)
                .ok_or_else(|| FieldError::new(class.as_str(), "total token count overflows"))?;
        }
        Ok(Self(buckets))
    }

    pub fn get(&self, class: TokenClass) -> i64 {
        self.0[class.index()]
    }

    /// Σ of all classes; cannot overflow (checked at construction).
    pub fn total(&self) -> i64 {
        self.0.iter().sum()
    }

    pub fn buckets(&self) -> [i64; CLASS_COUNT] {
        self.0
    }

    /// Classes with a non-zero count, in canonical order.
    pub fn non_zero(&self) -> impl Iterator<Item = (TokenClass, i64)> + '_ {
        TokenClass::ALL
            .into_iter()
            .map(|class| (class, self.get(class)))
            .filter(|(_, n)| *n != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_names_and_proto_numbers_round_trip() {
        for class in TokenClass::ALL {
            assert_eq!(TokenClass::parse(class.as_str()), Some(class));
            assert_eq!(TokenClass::from_proto(class as i32), Some(class));
        }
        assert_eq!(TokenClass::from_proto(0), None);
        assert_eq!(TokenClass::from_proto(13), None);
    }

    #[test]
    fn negative_buckets_are_rejected_naming_the_class() {
        let mut buckets = [0; CLASS_COUNT];
        buckets[TokenClass::Reasoning.index()] = -1;

        let error = TokenCounts::new(buckets).expect_err("negative");

        assert_eq!(error.field, "reasoning");
    }

    #[test]
    fn totals_that_overflow_are_rejected() {
        let mut buckets = [0; CLASS_COUNT];
        buckets[0] = i64::MAX;
        buckets[1] = 1;

        assert!(TokenCounts::new(buckets).is_err());
    }

    #[test]
    fn total_is_the_sum_of_buckets() {
        let counts = TokenCounts::new([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]).expect("valid");

        // 1 + 2 + … + 12 = 12 × 13 / 2
        assert_eq!(counts.total(), 78);
        assert_eq!(counts.non_zero().count(), 12);
    }
}

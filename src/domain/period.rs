//! Billing periods: a month in the tenant's billing time zone, starting on its anchor day
//! (clamped to the last day of shorter months), named by the "YYYY-MM" in which it starts.

use std::fmt;

use chrono::{DateTime, Datelike, Duration, NaiveDate, Offset, TimeZone, Timelike, Utc};
use chrono_tz::Tz;

use super::FieldError;

/// "YYYY-MM": the month in which a period starts, in the tenant's billing time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeriodLabel {
    year: i32,
    month: u32,
}

impl PeriodLabel {
    pub fn new(year: i32, month: u32) -> Option<Self> {
        ((1..=12).contains(&month) && (1970..=9999).contains(&year)).then_some(Self { year, month })
    }

    pub fn parse(text: &str, field: &str) -> Result<Self, FieldError> {
        let bad = || FieldError::new(field, format!("{text:?} is not a period like \"2026-03\""));
        let (year, month) = text.split_once('-').ok_or_else(bad)?;
        if year.len() != 4 || month.len() != 2 {
            return Err(bad());
        }
        let year: i32 = year.parse().map_err(|_| bad())?;
        let month: u32 = month.parse().map_err(|_| bad())?;
        Self::new(year, month).ok_or_else(bad)
    }

    pub fn year(self) -> i32 {
        self.year
    }

    pub fn next(self) -> Self {
        if self.month == 12 {
            Self {
                year: self.year + 1,
                month: 1,
            }
        } else {
            Self {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    pub fn previous(self) -> Self {
        if self.month == 1 {
            Self {
                year: self.year - 1,
                month: 12,
            }
        } else {
            Self {
                year: self.year,
                month: self.month - 1,
            }
        }
    }
}

impl fmt::Display for PeriodLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

/// How a tenant's periods are cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BillingCalendar {
    pub zone: Tz,
    /// 1–31; 1 means calendar months.
    pub anchor_day: u32,
}

/// One billing period: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BillingPeriod {
    pub label: PeriodLabel,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl BillingCalendar {
    pub fn parse(zone: &str, anchor_day: i16) -> Result<Self, FieldError> {
        let zone: Tz = zone
            .parse()
            .map_err(|_| FieldError::new("billing_timezone", "is not an IANA time zone name"))?;
        let anchor_day = u32::try_from(anchor_day)
            .ok()
            .filter(|d| (1..=31).contains(d))
            .ok_or_else(|| FieldError::new("billing_anchor_day", "must be 1-31"))?;
        Ok(Self { zone, anchor_day })
    }

    /// The first instant of the period named `label`.
    fn start_of(&self, label: PeriodLabel) -> DateTime<Utc> {
        let last_day = last_day_of_month(label.year, label.month);
        let day = self.anchor_day.min(last_day);
        let date = NaiveDate::from_ymd_opt(label.year, label.month, day).unwrap_or_default();
        local_midnight(self.zone, date)
    }

    pub fn period(&self, label: PeriodLabel) -> BillingPeriod {
        BillingPeriod {
            label,
            start: self.start_of(label),
            end: self.start_of(label.next()),
        }
    }

    /// The period that contains `at`.
    pub fn period_containing(&self, at: DateTime<Utc>) -> BillingPeriod {
        let local = at.with_timezone(&self.zone);
        let mut label = PeriodLabel {
            year: local.year(),
            month: local.month(),
        };
        if at < self.start_of(label) {
            label = label.previous();
        }
        self.period(label)
    }
}

fn last_day_of_month(year: i32, month: u32) -> u32 {
    let (next_year, next_month) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    NaiveDate::from_ymd_opt(next_year, next_month, 1)
        .and_then(|d| d.pred_opt())
        .map_or(28, |d| d.day())
}

/// Local midnight of `date` as an instant. Where a DST change skips midnight (some zones
/// switch at 00:00), the day starts at the first local time that exists.
pub(crate) fn local_midnight(zone: Tz, date: NaiveDate) -> DateTime<Utc> {
    let midnight = date.and_hms_opt(0, 0, 0).unwrap_or_default();
    (0..=24)
        .find_map(|minutes_in| {
            zone.from_local_datetime(&(midnight + Duration::minutes(minutes_in * 15)))
                .earliest()
        })
        .map_or_else(|| midnight.and_utc(), |local| local.with_timezone(&Utc))
}

/// Whether `zone` is a whole number of hours from UTC at `at`: only then do its local days
/// and months start on the hour, so hourly rollups can be cut into them exactly.
pub fn whole_hour_offset(zone: Tz, at: DateTime<Utc>) -> bool {
    zone.offset_from_utc_datetime(&at.naive_utc())
        .fix()
        .local_minus_utc()
        % 3600
        == 0
}

/// Whether `at` is a whole UTC hour, as rollup buckets are.
pub fn on_the_hour(at: DateTime<Utc>) -> bool {
    at.minute() == 0 && at.second() == 0 && at.nanosecond() == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn utc(text: &str) -> DateTime<Utc> {
        text.parse().expect("rfc3339")
    }

    fn label(text: &str) -> PeriodLabel {
        PeriodLabel::parse(text, "period").expect("label")
    }

    #[test]
    fn calendar_months_in_utc_start_at_midnight_on_the_first() {
        let calendar = BillingCalendar::parse("UTC", 1).expect("calendar");

        let period = calendar.period(label("2026-02"));

        assert_eq!(period.start, utc("2026-02-01T00:00:00Z"));
        assert_eq!(period.end, utc("2026-03-01T00:00:00Z"));
    }

    #[test]
    fn a_time_zone_shifts_the_period_to_local_midnight() {
        let calendar = BillingCalendar::parse("America/New_York", 1).expect("calendar");

        let march = calendar.period(label("2026-03"));

        // EST (−5) on 1 March, EDT (−4) from 8 March: the period is one hour short.
        assert_eq!(march.start, utc("2026-03-01T05:00:00Z"));
        assert_eq!(march.end, utc("2026-04-01T04:00:00Z"));
    }

    #[test]
    fn anchor_days_past_the_end_of_a_short_month_clamp_to_its_last_day() {
        let calendar = BillingCalendar::parse("UTC", 31).expect("calendar");

        let january = calendar.period(label("2026-01"));
        let february = calendar.period(label("2026-02"));

        assert_eq!(january.start, utc("2026-01-31T00:00:00Z"));
        assert_eq!(january.end, utc("2026-02-28T00:00:00Z"));
        assert_eq!(february.end, utc("2026-03-31T00:00:00Z"));
    }

    #[test]
    fn the_period_containing_an_instant_before_the_anchor_is_last_months() {
        let calendar = BillingCalendar::parse("UTC", 15).expect("calendar");

        let period = calendar.period_containing(utc("2026-03-14T23:59:59Z"));

        assert_eq!(period.label, label("2026-02"));
        assert_eq!(period.start, utc("2026-02-15T00:00:00Z"));
        assert_eq!(period.end, utc("2026-03-15T00:00:00Z"));
    }

    #[test]
    fn a_zone_whose_dst_skips_midnight_starts_the_day_at_its_first_local_hour() {
        // Santiago moved clocks from 00:00 to 01:00 on 2026-09-06.
        let calendar = BillingCalendar::parse("America/Santiago", 6).expect("calendar");

        let period = calendar.period(label("2026-09"));

        assert_eq!(period.start, utc("2026-09-06T04:00:00Z"));
    }

    #[test]
    fn labels_parse_strictly() {
        for bad in [
            "2026-3",
            "26-03",
            "2026-13",
            "2026-00",
            "2026/03",
            "",
            "2026-03-01",
        ] {
            assert!(PeriodLabel::parse(bad, "period").is_err(), "{bad:?}");
        }
        assert_eq!(label("2026-12").next(), label("2027-01"));
        assert_eq!(label("2026-01").previous(), label("2025-12"));
        assert_eq!(label("2026-03").to_string(), "2026-03");
    }

    proptest! {
        /// Periods tile time: each ends where the next starts, and every instant lies in
        /// exactly the period `period_containing` names.
        #[test]
        fn periods_tile_time_without_gaps_or_overlaps(
            seconds in 0i64..4_000_000_000,
            anchor in 1u32..=31,
            zone in prop::sample::select(vec![
                "UTC", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe",
                "America/Santiago", "Pacific/Chatham",
            ]),
        ) {
            let calendar = BillingCalendar { zone: zone.parse().expect("zone"), anchor_day: anchor };
            let at = DateTime::from_timestamp(seconds, 0).expect("instant");

            let period = calendar.period_containing(at);

            prop_assert!(period.start <= at && at < period.end);
            prop_assert_eq!(calendar.period(period.label.next()).start, period.end);
        }
    }
}

//! Export watermarks: a Postgres snapshot, written `v1:<xmin>:<xmax>:<xip,…>`.
//!
//! Why a snapshot and not a time or a serial id: a row's `ingested_at` (or a `bigserial`) is
//! taken when its transaction *starts writing*, but the row becomes visible when that
//! transaction *commits*. A transaction that takes id 100 at 12:00:00 and commits at 12:00:05
//! is invisible to an export running at 12:00:03 that has already seen id 101 (committed at
//! 12:00:02); a later "since id 101" or "since 12:00:03" export would skip it forever.
//!
//! Instead each exported fact carries the id of the transaction that made it visible (`xid8`,
//! stamped by default or trigger, migration 0006), and an export runs in one REPEATABLE READ
//! transaction whose snapshot — `pg_current_snapshot()`: every transaction below `xmin` has
//! ended, none at or above `xmax` had started, those listed in `xip` were still running — is
//! exactly the set of commits it reads. That snapshot is the watermark. "New since S up to U"
//! is then `visible(xid, U) AND NOT visible(xid, S)`, decided by `pg_visible_in_snapshot`:
//! a transaction that was in flight at S is not visible in S whatever its ids or timestamps,
//! so when it commits its rows fall into the next export, once. xid8 is 64-bit (epoch
//! included), so wraparound cannot make an old watermark lie. Rows from before the migration
//! (NULL xid) count as visible in every snapshot.

use std::collections::BTreeSet;
use std::fmt;

use crate::domain::FieldError;

const PREFIX: &str = "v1:";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watermark {
    xmin: u64,
    xmax: u64,
    xip: BTreeSet<u64>,
}

impl Watermark {
    /// From the text of `pg_current_snapshot()`, e.g. `742:748:742,745`.
    pub fn from_snapshot(text: &str) -> Option<Self> {
        let mut parts = text.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let list = parts.next()?;
        if parts.next().is_some() || xmin > xmax {
            return None;
        }
        let xip = if list.is_empty() {
            BTreeSet::new()
        } else {
            list.split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<BTreeSet<u64>>>()?
        };
        if xip.iter().any(|x| *x < xmin || *x >= xmax) {
            return None;
        }
        Some(Self { xmin, xmax, xip })
    }

    /// A watermark as given by a client (a manifest's `watermark`); `field` names it in errors.
    pub fn parse(text: &str, field: &str) -> Result<Self, FieldError> {
        text.strip_prefix(PREFIX)
            .and_then(Self::from_snapshot)
            .ok_or_else(|| FieldError::new(field, "is not a watermark from an export manifest"))
    }

    /// The `pg_snapshot` text Postgres reads back.
    pub fn snapshot(&self) -> String {
        let xip: Vec<String> = self.xip.iter().map(u64::to_string).collect();
        format!("{}:{}:{}", self.xmin, self.xmax, xip.join(","))
    }

    /// Whether the transaction `xid` had committed (or aborted) before this snapshot.
    pub fn sees(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.xip.contains(&xid))
    }

    /// Whether everything this watermark sees is also seen by `later`: it was taken no later.
    pub fn precedes(&self, later: &Watermark) -> bool {
        self.xmax <= later.xmax && later.xip.iter().all(|x| !self.sees(*x))
    }
}

impl fmt::Display for Watermark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", self.snapshot())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_snapshot_round_trips_through_its_text() {
        let mark = Watermark::from_snapshot("742:748:742,745").unwrap();
        assert_eq!(mark.to_string(), "v1:742:748:742,745");
        assert_eq!(Watermark::parse(&mark.to_string(), "w").unwrap(), mark);
        assert_eq!(
            Watermark::from_snapshot("10:10:").unwrap().to_string(),
            "v1:10:10:"
        );
    }

    #[test]
    fn garbage_is_an_invalid_argument_naming_the_field() {
        for bad in [
            "",
            "v1:",
            "742:748:",
            "v1:9:8:",
            "v1:1:5:7",
            "v1:a:b:",
            "v1:1:2:1:3",
        ] {
            let error = Watermark::parse(bad, "since_watermark").unwrap_err();
            assert_eq!(error.field, "since_watermark", "{bad}");
        }
    }

    #[test]
    fn an_in_flight_transaction_is_unseen_until_a_later_snapshot() {
        let earlier = Watermark::from_snapshot("100:105:100,103").unwrap();
        let later = Watermark::from_snapshot("105:110:107").unwrap();

        assert!(earlier.sees(99) && earlier.sees(101) && !earlier.sees(103));
        assert!(!earlier.sees(105));
        // 103 committed between the two: new for an export "since earlier up to later".
        assert!(later.sees(103) && !earlier.sees(103));
        assert!(earlier.precedes(&later));
        assert!(!later.precedes(&earlier));
    }

    proptest! {
        #[test]
        fn a_snapshot_precedes_itself_and_parses_back(xmin in 0u64..1000, span in 0u64..50, bits in any::<u64>()) {
            let xip: Vec<String> = (xmin..xmin + span).filter(|x| bits >> (x % 64) & 1 == 1).map(|x| x.to_string()).collect();
            let text = format!("{xmin}:{}:{}", xmin + span, xip.join(","));
            let mark = Watermark::from_snapshot(&text).unwrap();
            prop_assert_eq!(mark.snapshot(), text);
            prop_assert!(mark.precedes(&mark));
        }
    }
}

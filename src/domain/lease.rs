//! Budget-lease arithmetic of one replica: how large a slice of a policy's window budget to
//! lease, and the books of one leased slice in memory. No I/O: the quota engine keeps the books
//! under a lock and mirrors every change in Postgres.
//!
//! Why the books never grant more than was leased: a grant from the slice succeeds only while
//! `pending + amount ≤ leased`, `leased` grows only by a slice Postgres granted, and it shrinks
//! by exactly what is written (moved to `reserved`) or given back. So at every instant
//! `pending ≤ leased ≤` the lease row's `granted`.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

/// Decimal places a money slice keeps: finer than any price per token, and bounded, so slices
/// stay short numbers in the counter rows.
const MONEY_SCALE: u32 = 12;

/// The slice to lease when `needed` more than the local slice holds is wanted and `free`
/// (`limit − used − reserved − leased`) is unclaimed: a share of the free budget that shrinks as
/// it runs out — `free / (2 × replicas)`, so each of the expected replicas can take one and
/// half stays free — but never less than `needed`. `None` when the free budget cannot cover
/// `needed`: the call must be denied (or, for a soft policy, go over). Token slices are whole.
pub fn slice(free: Decimal, needed: Decimal, replicas: u32, whole: bool) -> Option<Decimal> {
    let needed = needed.max(Decimal::ZERO);
    if needed > free {
        return None;
    }
    let share = free / Decimal::from(2 * u64::from(replicas.max(1)));
    let share = if whole {
        share.floor()
    } else {
        share.trunc_with_scale(MONEY_SCALE)
    };
    Some(share.max(needed).min(free))
}

/// One replica's books for one (policy, window) lease.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Book {
    /// What this replica holds of the lease row's `granted`, as far as it knows.
    leased: Decimal,
    /// Granted from the slice to callers, not yet written: part of `leased`.
    pending: Decimal,
    /// Granted beyond the slice by a soft policy, not yet written: never part of `leased`.
    overage: Decimal,
}

impl Book {
    pub fn leased(&self) -> Decimal {
        self.leased
    }

    /// Granted and not yet written, from the slice and beyond it.
    pub fn unwritten(&self) -> Decimal {
        self.pending + self.overage
    }

    /// What the slice can still grant.
    pub fn available(&self) -> Decimal {
        self.leased - self.pending
    }

    /// What must be leased before `amount` can be granted from the slice.
    pub fn shortfall(&self, amount: Decimal) -> Decimal {
        (amount - self.available()).max(Decimal::ZERO)
    }

    pub fn fits(&self, amount: Decimal) -> bool {
        amount <= self.available()
    }

    /// Grants `amount` from the slice when it fits; `false` (and nothing changes) when not.
    pub fn grant(&mut self, amount: Decimal) -> bool {
        if !self.fits(amount) {
            return false;
        }
        self.pending += amount;
        true
    }

    /// A soft policy's grant: what the slice can cover comes from it, the rest goes over the
    /// limit. Returns (from the slice, over).
    pub fn grant_over(&mut self, amount: Decimal) -> (Decimal, Decimal) {
        let from_slice = amount.min(self.available().max(Decimal::ZERO));
        self.pending += from_slice;
        let over = amount - from_slice;
        self.overage += over;
        (from_slice, over)
    }

    /// Postgres granted `slice` more.
    pub fn credit(&mut self, slice: Decimal) {
        self.leased += slice;
    }

    /// After re-leasing a lapsed lease with nothing unwritten: the lease row held `granted`
    /// before the new slice (it may have been reclaimed meanwhile), so the books restart
    /// from what Postgres says.
    pub fn resync(&mut self, granted: Decimal) {
        self.leased = granted;
    }

    /// Grants were written: `from_slice` moved from `leased` to `reserved`, `over` was added to
    /// `reserved` directly.
    pub fn written(&mut self, from_slice: Decimal, over: Decimal) {
        self.leased -= from_slice;
        self.pending -= from_slice;
        self.overage -= over;
    }

    /// Takes the unused part of the slice out of the books, to give back to Postgres.
    pub fn take_unused(&mut self) -> Decimal {
        let unused = self.available().max(Decimal::ZERO);
        self.leased -= unused;
        unused
    }

    /// Giving back `amount` failed: it is still leased.
    pub fn restore(&mut self, amount: Decimal) {
        self.leased += amount;
    }
}

/// How long after it was granted a reservation may still be unwritten, as far as usage naming
/// it is concerned: far above the flush interval, so only a stalled writer gets past it.
pub const UNWRITTEN_HORIZON: chrono::Duration = chrono::Duration::minutes(10);

/// Whether `reservation_id` may name a reservation a replica granted and has not written yet: a
/// UUIDv7 (what replicas mint when they grant) from within [`UNWRITTEN_HORIZON`] of `now`. Ids
/// from elsewhere, or old ones, name nothing to wait for.
pub fn maybe_unwritten(reservation_id: &str, now: DateTime<Utc>) -> bool {
    let Ok(id) = uuid::Uuid::parse_str(reservation_id) else {
        return false;
    };
    let Some((seconds, nanos)) = id.get_timestamp().map(|t| t.to_unix()) else {
        return false;
    };
    let minted = i64::try_from(seconds)
        .ok()
        .and_then(|s| DateTime::from_timestamp(s, nanos));
    id.get_version_num() == 7 && minted.is_some_and(|m| (m - now).abs() <= UNWRITTEN_HORIZON)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rust_decimal::dec;

    #[test]
    fn a_slice_is_a_shrinking_share_of_the_free_budget_but_never_below_the_need() {
        assert_eq!(slice(dec!(1000), dec!(10), 2, true), Some(dec!(250)));
        assert_eq!(slice(dec!(30), dec!(10), 2, true), Some(dec!(10)));
        assert_eq!(slice(dec!(9), dec!(10), 2, true), None);
        assert_eq!(slice(dec!(7), dec!(0), 1, true), Some(dec!(3)));
        assert_eq!(slice(dec!(5), dec!(2), 2, false), Some(dec!(2)));
        assert_eq!(slice(dec!(10), dec!(1), 2, false), Some(dec!(2.5)));
    }

    #[test]
    fn a_soft_grant_takes_what_the_slice_covers_and_goes_over_for_the_rest() {
        let mut book = Book::default();
        book.credit(dec!(10));

        assert_eq!(book.grant_over(dec!(25)), (dec!(10), dec!(15)));
        assert_eq!(book.available(), dec!(0));
        assert_eq!(book.unwritten(), dec!(25));
        book.written(dec!(10), dec!(15));
        assert_eq!(book, Book::default());
    }

    #[test]
    fn only_recent_uuidv7_ids_may_be_unwritten() {
        let now = Utc::now();
        let fresh = uuid::Uuid::now_v7().to_string();

        assert!(maybe_unwritten(&fresh, now));
        assert!(!maybe_unwritten(&fresh, now + chrono::Duration::hours(1)));
        assert!(!maybe_unwritten(&uuid::Uuid::new_v4().to_string(), now));
        assert!(!maybe_unwritten("call-7", now));
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// A caller wants this much from the slice, leasing the shortfall when it must.
        Reserve(u32),
        /// The flusher writes this many of the oldest unwritten grants.
        Flush(usize),
        /// The idle sweep gives the unused part back.
        GiveBack,
        /// Usage or expiry frees this much of `reserved`.
        Free(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1u32..400).prop_map(Op::Reserve),
            2 => (0usize..4).prop_map(Op::Flush),
            1 => Just(Op::GiveBack),
            1 => (0u32..400).prop_map(Op::Free),
        ]
    }

    proptest! {
        /// Two replicas' books against one counter (`used + reserved + leased ≤ limit` kept the
        /// way Postgres keeps it): whatever the interleaving, a replica never has more granted
        /// and unwritten than it leased, its books never claim more than its lease row holds,
        /// and the counter never goes above the limit.
        #[test]
        fn the_books_never_grant_more_than_was_leased(
            limit in 1u32..5000,
            ops in prop::collection::vec((0usize..2, op()), 1..200),
        ) {
            let limit = Decimal::from(limit);
            let (mut reserved, mut leased) = (Decimal::ZERO, Decimal::ZERO);
            let mut books = [Book::default(); 2];
            let mut rows = [Decimal::ZERO; 2];
            let mut queues: [Vec<Decimal>; 2] = [Vec::new(), Vec::new()];
            for (r, op) in ops {
                match op {
                    Op::Reserve(amount) => {
                        let amount = Decimal::from(amount);
                        if !books[r].fits(amount) {
                            let free = limit - reserved - leased;
                            if let Some(s) = slice(free, books[r].shortfall(amount), 2, true) {
                                leased += s;
                                rows[r] += s;
                                books[r].credit(s);
                            }
                        }
                        if books[r].grant(amount) {
                            queues[r].push(amount);
                        }
                    }
                    Op::Flush(n) => {
                        let n = n.min(queues[r].len());
                        for amount in queues[r].drain(..n) {
                            leased -= amount;
                            rows[r] -= amount;
                            reserved += amount;
                            books[r].written(amount, Decimal::ZERO);
                        }
                    }
                    Op::GiveBack => {
                        let unused = books[r].take_unused();
                        leased -= unused;
                        rows[r] -= unused;
                    }
                    Op::Free(amount) => reserved -= Decimal::from(amount).min(reserved),
                }
                for i in 0..2 {
                    prop_assert!(books[i].unwritten() <= books[i].leased());
                    prop_assert_eq!(books[i].leased(), rows[i]);
                    prop_assert!(rows[i] >= Decimal::ZERO);
                }
                prop_assert!(reserved + leased <= limit);
            }
        }
    }
}

//! Sets of physical address ranges: the free memory the frame allocator
//! hands out, built from the boot memory map minus everything reserved.
//!
//! A [`RangeSet`] keeps sorted, disjoint, non-touching half-open ranges in a
//! fixed-capacity vector (no heap: it exists before the heap does).

use core::fmt;
use core::ops::Range;

/// The set would need more ranges than its capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapacityExceeded;

impl fmt::Display for CapacityExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "too many disjoint memory ranges")
    }
}

/// Sorted, disjoint, non-adjacent ranges of `u64` addresses.
#[derive(Clone, Debug, Default)]
pub struct RangeSet<const N: usize> {
    ranges: heapless::Vec<Range<u64>, N>,
}

impl<const N: usize> RangeSet<N> {
    pub const fn new() -> Self {
        Self {
            ranges: heapless::Vec::new(),
        }
    }

    /// The ranges, lowest first.
    pub fn ranges(&self) -> &[Range<u64>] {
        &self.ranges
    }

    /// Total bytes in the set.
    pub fn total(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    /// Whether `addr` is in the set.
    pub fn contains(&self, addr: u64) -> bool {
        self.ranges.iter().any(|r| r.contains(&addr))
    }

    /// Add `r` (merging with neighbours). On error the set is unchanged.
    pub fn insert(&mut self, r: Range<u64>) -> Result<(), CapacityExceeded> {
        if r.start >= r.end {
            return Ok(());
        }
        // Ranges that overlap or touch `r` are merged into one.
        let first = self.ranges.iter().position(|x| x.end >= r.start);
        let Some(first) = first else {
            return self.ranges.push(r).map_err(|_| CapacityExceeded);
        };
        let last = self.ranges[first..]
            .iter()
            .position(|x| x.start > r.end)
            .map_or(self.ranges.len(), |p| first + p);
        if first == last {
            return self.ranges.insert(first, r).map_err(|_| CapacityExceeded);
        }
        let merged = self.ranges[first].start.min(r.start)..self.ranges[last - 1].end.max(r.end);
        self.ranges[first] = merged;
        for _ in first + 1..last {
            self.ranges.remove(first + 1);
        }
        Ok(())
    }

    /// Remove `r` (splitting a range if needed). On error the set is
    /// unchanged.
    pub fn remove(&mut self, r: Range<u64>) -> Result<(), CapacityExceeded> {
        if r.start >= r.end {
            return Ok(());
        }
        let mut i = 0;
        while i < self.ranges.len() {
            let x = self.ranges[i].clone();
            if x.end <= r.start || x.start >= r.end {
                i += 1;
                continue;
            }
            let left = x.start..r.start;
            let right = r.end..x.end;
            match (left.start < left.end, right.start < right.end) {
                (true, true) => {
                    if self.ranges.is_full() {
                        return Err(CapacityExceeded);
                    }
                    self.ranges[i] = left;
                    // Cannot fail: checked for room above.
                    let _ = self.ranges.insert(i + 1, right);
                    i += 2;
                }
                (true, false) => {
                    self.ranges[i] = left;
                    i += 1;
                }
                (false, true) => {
                    self.ranges[i] = right;
                    i += 1;
                }
                (false, false) => {
                    self.ranges.remove(i);
                }
            }
        }
        Ok(())
    }

    /// Keep only the parts inside `r`.
    pub fn clamp(&mut self, r: Range<u64>) {
        self.ranges.retain_mut(|x| {
            x.start = x.start.max(r.start);
            x.end = x.end.min(r.end);
            x.start < x.end
        });
    }

    /// Shrink every range inward to multiples of `align` (a power of two),
    /// dropping ranges left empty.
    pub fn align_inward(&mut self, align: u64) {
        debug_assert!(align.is_power_of_two());
        self.ranges.retain_mut(|x| {
            let Some(start) = x.start.checked_next_multiple_of(align) else {
                return false;
            };
            x.start = start;
            x.end &= !(align - 1);
            x.start < x.end
        });
    }

    /// Take `size` bytes starting at a multiple of `align` (a power of two)
    /// from the lowest range that has them. `None` if no range has room or
    /// taking would split past the capacity.
    pub fn take(&mut self, size: u64, align: u64) -> Option<u64> {
        if size == 0 || !align.is_power_of_two() {
            return None;
        }
        let start = self.ranges.iter().find_map(|x| {
            let s = x.start.checked_next_multiple_of(align)?;
            (s.checked_add(size)? <= x.end).then_some(s)
        })?;
        self.remove(start..start + size).ok()?;
        Some(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const UNIVERSE: u64 = 64;

    /// The model: one flag per address of a small universe.
    fn model_of<const N: usize>(s: &RangeSet<N>) -> Vec<bool> {
        (0..UNIVERSE).map(|a| s.contains(a)).collect()
    }

    fn check_invariants<const N: usize>(s: &RangeSet<N>) {
        for w in s.ranges().windows(2) {
            assert!(
                w[0].end < w[1].start,
                "not sorted/disjoint/non-touching: {w:?}"
            );
        }
        for r in s.ranges() {
            assert!(r.start < r.end);
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u64, u64),
        Remove(u64, u64),
        Take(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..UNIVERSE, 0..UNIVERSE).prop_map(|(a, b)| Op::Insert(a.min(b), a.max(b))),
            (0..UNIVERSE, 0..UNIVERSE).prop_map(|(a, b)| Op::Remove(a.min(b), a.max(b))),
            (1u64..9, 0u32..4).prop_map(|(n, k)| Op::Take(n, 1 << k)),
        ]
    }

    proptest! {
        #[test]
        fn matches_a_flag_per_address_model(ops in proptest::collection::vec(op(), 0..40)) {
            let mut s: RangeSet<6> = RangeSet::new();
            let mut model = vec![false; UNIVERSE as usize];
            for op in ops {
                let before = model_of(&s);
                match op {
                    Op::Insert(a, b) => {
                        if s.insert(a..b).is_ok() {
                            for m in &mut model[a as usize..b as usize] { *m = true; }
                        } else {
                            prop_assert_eq!(model_of(&s), before.clone());
                        }
                    }
                    Op::Remove(a, b) => {
                        if s.remove(a..b).is_ok() {
                            for m in &mut model[a as usize..b as usize] { *m = false; }
                        } else {
                            prop_assert_eq!(model_of(&s), before.clone());
                        }
                    }
                    Op::Take(n, align) => {
                        // The lowest aligned start whose n addresses are all free.
                        let want = (0..UNIVERSE)
                            .filter(|a| a % align == 0 && a + n <= UNIVERSE)
                            .find(|&a| (a..a + n).all(|x| model[x as usize]));
                        let got = s.take(n, align);
                        if let Some(g) = got {
                            prop_assert_eq!(Some(g), want);
                            for m in &mut model[g as usize..(g + n) as usize] { *m = false; }
                        } else {
                            // Only a full set may refuse a fit it has.
                            prop_assert!(want.is_none() || s.ranges().len() == 6);
                            prop_assert_eq!(model_of(&s), before.clone());
                        }
                    }
                }
                check_invariants(&s);
                prop_assert_eq!(model_of(&s), model.clone());
                prop_assert_eq!(s.total(), model.iter().filter(|m| **m).count() as u64);
            }
        }
    }

    #[test]
    fn insert_merges_touching_and_overlapping() {
        let mut s: RangeSet<4> = RangeSet::new();
        s.insert(10..20).unwrap();
        s.insert(30..40).unwrap();
        s.insert(20..30).unwrap();
        assert_eq!(s.ranges(), std::slice::from_ref(&(10..40)));
        s.insert(0..5).unwrap();
        s.insert(3..12).unwrap();
        assert_eq!(s.ranges(), std::slice::from_ref(&(0..40)));
    }

    #[test]
    fn remove_splits_and_reports_capacity() {
        let mut s: RangeSet<2> = RangeSet::new();
        s.insert(0..100).unwrap();
        s.remove(10..20).unwrap();
        assert_eq!(s.ranges(), &[0..10, 20..100]);
        assert_eq!(s.remove(50..60), Err(CapacityExceeded));
        assert_eq!(s.ranges(), &[0..10, 20..100]);
        s.remove(0..10).unwrap();
        s.remove(50..60).unwrap();
        assert_eq!(s.ranges(), &[20..50, 60..100]);
    }

    #[test]
    fn clamp_and_align_inward() {
        let mut s: RangeSet<4> = RangeSet::new();
        s.insert(0..0x9fc00).unwrap();
        s.insert(0x100000..0x7fe0123).unwrap();
        s.clamp(0x100000..u64::MAX);
        assert_eq!(s.ranges(), std::slice::from_ref(&(0x100000..0x7fe0123)));
        s.insert(0x8000_0800..0x8000_1000).unwrap();
        s.align_inward(0x1000);
        assert_eq!(s.ranges(), std::slice::from_ref(&(0x100000..0x7fe0000)));
    }

    #[test]
    fn take_is_lowest_aligned_first_fit() {
        let mut s: RangeSet<4> = RangeSet::new();
        s.insert(0x1000..0x3000).unwrap();
        s.insert(0x5000..0x20_0000).unwrap();
        assert_eq!(s.take(0x1000, 0x1000), Some(0x1000));
        assert_eq!(s.take(0x2000, 0x1000), Some(0x5000));
        assert_eq!(s.take(0x1000, 0x10_0000), Some(0x10_0000));
        assert_eq!(
            s.ranges(),
            &[0x2000..0x3000, 0x7000..0x10_0000, 0x10_1000..0x20_0000]
        );
        assert_eq!(s.take(0x100_0000, 0x1000), None);
        assert_eq!(s.take(0, 0x1000), None);
        assert_eq!(s.take(0x1000, 3), None);
    }
}

//! Bounded out-of-order reassembly: which byte ranges beyond RCV.NXT have arrived, as a small
//! sorted list of at most `N` disjoint ranges, and the SACK blocks (RFC 2018) that describe them.
//!
//! Owns the bookkeeping only: the payload bytes live in the connection's receive buffer, which
//! the caller writes at the offset [`Insert::Accepted`] names. A segment that would need an
//! `N + 1`-th range is dropped and counted (the sender retransmits it; RFC 9293 §3.10.7.4 lets a
//! receiver drop out-of-order data), so memory stays fixed per connection whatever the peer does.
//! Sequence numbers are `u32` with wrapping arithmetic (RFC 9293 §3.4); ranges are stored as
//! offsets from RCV.NXT, so the wrap needs no special case. RFC 2018 §4: the first SACK block
//! reports the most recently changed range, the rest follow by recency. D-SACK (RFC 2883) is not
//! generated.

/// One SACK block: `[left, right)` in sequence space (RFC 2018 §3's left and right edges).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SackBlock {
    /// First sequence number of the block.
    pub left: u32,
    /// Sequence number just past the block.
    pub right: u32,
}

/// What [`Reassembly::insert`] did with a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Insert {
    /// New bytes were recorded. The caller copies `payload[skip..skip + len]` to receive-buffer
    /// offset `offset` (relative to RCV.NXT *before* this call); then `in_order` bytes from that
    /// old RCV.NXT are readable and RCV.NXT has advanced by `in_order`.
    Accepted {
        /// Bytes trimmed from the front of the payload (already received).
        skip: u32,
        /// Where the kept bytes start, relative to the old RCV.NXT.
        offset: u32,
        /// Bytes kept (after trimming both ends to the window).
        len: u32,
        /// Bytes that became in order, i.e. how far RCV.NXT moved.
        in_order: u32,
    },
    /// Nothing new: entirely before RCV.NXT, already held, or empty. RFC 9293 §3.10.7.4: ACK it.
    Duplicate,
    /// Starts at or beyond RCV.NXT + window: not acceptable (RFC 9293 §3.10.7.4), ACK and drop.
    OutOfWindow,
    /// Would need more than `N` ranges: dropped and counted, state unchanged.
    Dropped,
}

/// A range of received bytes beyond RCV.NXT.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Range {
    /// Offset from RCV.NXT of the first byte; always ≥ 1 (a range touching RCV.NXT is consumed).
    start: u32,
    /// Offset just past the last byte; > `start`.
    end: u32,
    /// Value of `Reassembly::clock` when the range last gained bytes (larger = more recent).
    stamp: u64,
}

/// Out-of-order state of one connection's receive side, at most `N` ranges.
#[derive(Clone, Debug)]
pub struct Reassembly<const N: usize> {
    /// RCV.NXT: the next in-order sequence number expected.
    rcv_nxt: u32,
    /// `ranges[..len]`, sorted by `start`, pairwise disjoint and non-adjacent (a gap of at least
    /// one byte between neighbours), every `start` ≥ 1.
    ranges: [Range; N],
    /// Number of ranges in use, ≤ N.
    len: usize,
    /// Bumped on each insert that adds bytes; stamps ranges for SACK ordering.
    clock: u64,
    /// Segments refused by [`Insert::Dropped`] since construction.
    dropped: u64,
}

impl<const N: usize> Reassembly<N> {
    /// Empty state expecting `rcv_nxt` next.
    pub fn new(rcv_nxt: u32) -> Reassembly<N> {
        const { assert!(N > 0, "Reassembly needs room for at least one range") };
        Reassembly {
            rcv_nxt,
            ranges: [Range::default(); N],
            len: 0,
            clock: 0,
            dropped: 0,
        }
    }

    /// RCV.NXT.
    pub fn rcv_nxt(&self) -> u32 {
        self.rcv_nxt
    }

    /// Whether no out-of-order data is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of out-of-order ranges held (≤ N).
    pub fn ranges(&self) -> usize {
        self.len
    }

    /// Out-of-order bytes held beyond RCV.NXT.
    pub fn buffered(&self) -> u64 {
        self.ranges[..self.len]
            .iter()
            .map(|r| u64::from(r.end - r.start))
            .sum()
    }

    /// Segments dropped because the range budget was exhausted.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Records a segment of `len` bytes at `seq`, with `window` bytes acceptable from RCV.NXT
    /// (RCV.WND). See [`Insert`] for what the caller does with the outcome.
    pub fn insert(&mut self, seq: u32, len: u32, window: u32) -> Insert {
        // Signed distance from RCV.NXT; valid while |distance| < 2^31, which any segment near the
        // window satisfies (RFC 9293 §3.4).
        let off = i64::from(seq.wrapping_sub(self.rcv_nxt) as i32);
        let seg_end = off + i64::from(len);
        if len == 0 || seg_end <= 0 {
            return Insert::Duplicate;
        }
        let start = off.max(0);
        if start >= i64::from(window) {
            return Insert::OutOfWindow;
        }
        let end = seg_end.min(i64::from(window));
        // Both fit in u32 now: 0 ≤ start < end ≤ window.
        let (start, end) = (start as u32, end as u32);
        let skip = (start as i64 - off) as u32;

        // Ranges [first, last) touch [start, end) (overlap or adjacency): they merge with it.
        let used = &self.ranges[..self.len];
        let first = used.partition_point(|r| r.end < start);
        let last = used.partition_point(|r| r.start <= end);
        let merged = last - first;
        if merged == 1 && used[first].start <= start && end <= used[first].end {
            return Insert::Duplicate;
        }
        let (m_start, m_end) = if merged == 0 {
            (start, end)
        } else {
            (start.min(used[first].start), end.max(used[last - 1].end))
        };
        let consumed = m_start == 0;
        let new_len = self.len - merged + usize::from(!consumed);
        if new_len > N {
            self.dropped += 1;
            return Insert::Dropped;
        }

        self.clock += 1;
        // Replace ranges[first..last] by the merged range (or by nothing if it is consumed).
        let keep = usize::from(!consumed);
        let tail = self.len - last;
        self.ranges.copy_within(last..self.len, first + keep);
        if !consumed {
            self.ranges[first] = Range {
                start: m_start,
                end: m_end,
                stamp: self.clock,
            };
        }
        self.len = first + keep + tail;

        let in_order = if consumed {
            // first == 0 here: only a range starting at 0 can be consumed.
            for r in &mut self.ranges[..self.len] {
                r.start -= m_end;
                r.end -= m_end;
            }
            self.rcv_nxt = self.rcv_nxt.wrapping_add(m_end);
            m_end
        } else {
            0
        };
        Insert::Accepted {
            skip,
            offset: start,
            len: end - start,
            in_order,
        }
    }

    /// Writes up to `out.len()` SACK blocks, most recently changed first (RFC 2018 §4), and
    /// returns how many. With timestamps a segment has room for 3 blocks, without for 4.
    pub fn sack_blocks(&self, out: &mut [SackBlock]) -> usize {
        let mut written = 0;
        let mut below = u64::MAX;
        while written < out.len() {
            // Stamps are unique, so "largest stamp below the previous" walks by recency.
            let Some(r) = self.ranges[..self.len]
                .iter()
                .filter(|r| r.stamp < below)
                .max_by_key(|r| r.stamp)
            else {
                break;
            };
            out[written] = SackBlock {
                left: self.rcv_nxt.wrapping_add(r.start),
                right: self.rcv_nxt.wrapping_add(r.end),
            };
            below = r.stamp;
            written += 1;
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WIN: u32 = 65_535;

    #[track_caller]
    fn accepted(r: Insert) -> (u32, u32, u32, u32) {
        match r {
            Insert::Accepted {
                skip,
                offset,
                len,
                in_order,
            } => (skip, offset, len, in_order),
            other => panic!("expected Accepted, got {other:?}"),
        }
    }

    #[track_caller]
    fn blocks<const N: usize>(a: &Reassembly<N>) -> Vec<(u32, u32)> {
        let mut out = [SackBlock::default(); 8];
        let n = a.sack_blocks(&mut out);
        out[..n].iter().map(|b| (b.left, b.right)).collect()
    }

    #[test]
    fn in_order_segments_advance() {
        let mut a = Reassembly::<4>::new(1000);
        assert_eq!(
            accepted(a.insert(1000, 100, WIN)),
            (0, 0, 100, 100),
            "in order"
        );
        assert_eq!(a.rcv_nxt(), 1100, "RCV.NXT advanced");
        assert!(a.is_empty(), "nothing held");
        assert_eq!(blocks(&a), vec![], "no SACK blocks when in order");
    }

    #[test]
    fn hole_then_fill() {
        let mut a = Reassembly::<4>::new(0);
        assert_eq!(
            accepted(a.insert(100, 100, WIN)),
            (0, 100, 100, 0),
            "out of order"
        );
        assert_eq!(
            accepted(a.insert(300, 50, WIN)),
            (0, 300, 50, 0),
            "second island"
        );
        assert_eq!(a.ranges(), 2, "two ranges");
        assert_eq!(a.buffered(), 150, "bytes held");
        assert_eq!(
            blocks(&a),
            vec![(300, 350), (100, 200)],
            "most recent first"
        );
        assert_eq!(
            accepted(a.insert(0, 100, WIN)),
            (0, 0, 100, 200),
            "fills first hole"
        );
        assert_eq!(a.rcv_nxt(), 200, "advanced through the island");
        assert_eq!(blocks(&a), vec![(300, 350)], "remaining island");
        assert_eq!(
            accepted(a.insert(200, 100, WIN)),
            (0, 0, 100, 150),
            "fills the rest"
        );
        assert_eq!(a.rcv_nxt(), 350, "all in order");
        assert!(a.is_empty(), "empty again");
    }

    #[test]
    fn overlaps_and_adjacency_merge() {
        let mut a = Reassembly::<4>::new(0);
        accepted(a.insert(10, 10, WIN));
        accepted(a.insert(40, 10, WIN));
        accepted(a.insert(15, 15, WIN)); // overlaps [10,20), extends to 30
        assert_eq!(
            blocks(&a),
            vec![(10, 30), (40, 50)],
            "merged overlap, most recent first"
        );
        accepted(a.insert(30, 10, WIN)); // adjacent on both sides
        assert_eq!(a.ranges(), 1, "bridged into one range");
        assert_eq!(blocks(&a), vec![(10, 50)], "one block");
        assert_eq!(
            accepted(a.insert(5, 60, WIN)),
            (0, 5, 60, 0),
            "covers and extends"
        );
        assert_eq!(blocks(&a), vec![(5, 65)], "superset");
    }

    #[test]
    fn duplicates() {
        let mut a = Reassembly::<4>::new(500);
        assert_eq!(
            a.insert(400, 100, WIN),
            Insert::Duplicate,
            "entirely before RCV.NXT"
        );
        assert_eq!(a.insert(500, 0, WIN), Insert::Duplicate, "empty");
        accepted(a.insert(600, 100, WIN));
        assert_eq!(
            a.insert(620, 30, WIN),
            Insert::Duplicate,
            "inside a held range"
        );
        assert_eq!(a.insert(600, 100, WIN), Insert::Duplicate, "exact repeat");
        assert_eq!(
            accepted(a.insert(450, 100, WIN)),
            (50, 0, 50, 50),
            "old head trimmed, new tail in order"
        );
        assert_eq!(a.rcv_nxt(), 550, "advanced by the new part only");
    }

    #[test]
    fn window_limits() {
        let mut a = Reassembly::<4>::new(0);
        assert_eq!(
            a.insert(1000, 10, 1000),
            Insert::OutOfWindow,
            "starts at the edge"
        );
        assert_eq!(
            accepted(a.insert(990, 100, 1000)),
            (0, 990, 10, 0),
            "tail trimmed"
        );
        assert_eq!(
            blocks(&a),
            vec![(990, 1000)],
            "only the in-window part held"
        );
        assert_eq!(a.insert(10, 10, 0), Insert::OutOfWindow, "zero window");
    }

    #[test]
    fn range_budget_drops_and_counts() {
        let mut a = Reassembly::<4>::new(0);
        for i in 1..=4u32 {
            accepted(a.insert(i * 100, 10, WIN));
        }
        assert_eq!(
            a.insert(600, 10, WIN),
            Insert::Dropped,
            "fifth island refused"
        );
        assert_eq!(a.dropped(), 1, "counted");
        assert_eq!(a.ranges(), 4, "unchanged");
        assert_eq!(
            blocks(&a),
            vec![(400, 410), (300, 310), (200, 210), (100, 110)],
            "state unchanged by the drop"
        );
        assert_eq!(
            accepted(a.insert(410, 10, WIN)),
            (0, 410, 10, 0),
            "extension fits"
        );
        assert_eq!(
            accepted(a.insert(105, 200, WIN)),
            (0, 105, 200, 0),
            "bridging fits"
        );
        assert_eq!(a.ranges(), 2, "three ranges bridged into one");
        assert_eq!(blocks(&a)[0], (100, 310), "bridged range is most recent");
        accepted(a.insert(600, 10, WIN));
        accepted(a.insert(800, 10, WIN));
        assert_eq!(a.ranges(), 4, "full again");
        assert_eq!(
            accepted(a.insert(0, 50, WIN)),
            (0, 0, 50, 50),
            "in-order data always fits"
        );
        assert_eq!(a.insert(700, 10, WIN), Insert::Dropped, "still full");
        assert_eq!(a.dropped(), 2, "counted again");
        assert_eq!(
            accepted(a.insert(50, 50, WIN)).3,
            260,
            "filling the head at full budget"
        );
        assert_eq!(a.rcv_nxt(), 310, "through the bridged range");
    }

    #[test]
    fn wraparound_near_2_pow_32() {
        let base = u32::MAX - 99; // 100 bytes before the wrap
        let mut a = Reassembly::<4>::new(base);
        accepted(a.insert(50, 50, WIN)); // after the wrap: offset 150
        accepted(a.insert(base.wrapping_add(50), 60, WIN)); // straddles the wrap: [50, 110)
        assert_eq!(
            blocks(&a),
            vec![(base.wrapping_add(50), 10), (50, 100)],
            "blocks in sequence space across the wrap"
        );
        assert_eq!(
            accepted(a.insert(base, 50, WIN)),
            (0, 0, 50, 110),
            "head filled"
        );
        assert_eq!(a.rcv_nxt(), 10, "RCV.NXT wrapped");
        assert_eq!(
            a.insert(base.wrapping_add(20), 10, WIN),
            Insert::Duplicate,
            "old, pre-wrap"
        );
        assert_eq!(
            accepted(a.insert(10, 40, WIN)),
            (0, 0, 40, 90),
            "post-wrap fill"
        );
        assert_eq!(a.rcv_nxt(), 100, "all delivered");
        assert!(a.is_empty(), "empty");
    }

    #[test]
    fn sack_output_truncates_to_room() {
        let mut a = Reassembly::<8>::new(0);
        for i in 1..=5u32 {
            accepted(a.insert(i * 100, 10, WIN));
        }
        accepted(a.insert(205, 10, WIN)); // touch an older range: it becomes most recent
        let mut three = [SackBlock::default(); 3];
        assert_eq!(
            a.sack_blocks(&mut three),
            3,
            "room for three (timestamps on)"
        );
        assert_eq!(
            three.map(|b| (b.left, b.right)),
            [(200, 215), (500, 510), (400, 410)],
            "most recent first, then by recency"
        );
    }

    /// Random segments against a byte-map model, straddling the 2^32 wrap: RCV.NXT, the held
    /// ranges and the accepted byte counts must always agree with the model.
    #[test]
    fn matches_a_byte_map_model() {
        const SPAN: usize = 20_000;
        let base = u32::MAX - 1000;
        let mut a = Reassembly::<4>::new(base);
        let mut have = vec![false; SPAN];
        let mut nxt = 0usize; // model RCV.NXT, as an offset from `base`
        let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |bound: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % bound
        };
        for step in 0..50_000 {
            let window = 1000u32;
            let start = (nxt as u64 + next(1200)).saturating_sub(100) as usize;
            let len = 1 + next(120) as usize;
            let seq = base.wrapping_add(start as u32);
            let outcome = a.insert(seq, len as u32, window);
            let lo = start.max(nxt);
            let hi = (start + len).min(nxt + window as usize);
            let new_bytes = (lo..hi.max(lo)).filter(|&i| !have[i]).count();
            match outcome {
                Insert::Accepted {
                    skip,
                    offset,
                    len: kept,
                    in_order,
                } => {
                    assert!(new_bytes > 0, "step {step}: accepted without new bytes");
                    assert_eq!(start + skip as usize, lo, "step {step}: skip");
                    assert_eq!(nxt + offset as usize, lo, "step {step}: offset");
                    assert_eq!(lo + kept as usize, hi, "step {step}: kept length");
                    have[lo..hi].iter_mut().for_each(|b| *b = true);
                    let old = nxt;
                    while have[nxt] {
                        nxt += 1;
                    }
                    assert_eq!(in_order as usize, nxt - old, "step {step}: in-order bytes");
                }
                Insert::Duplicate => assert_eq!(new_bytes, 0, "step {step}: duplicate"),
                Insert::OutOfWindow => {
                    assert!(start >= nxt + window as usize, "step {step}: out of window")
                }
                Insert::Dropped => assert!(new_bytes > 0, "step {step}: dropped"),
            }
            assert_eq!(
                a.rcv_nxt(),
                base.wrapping_add(nxt as u32),
                "step {step}: RCV.NXT"
            );
            // Held ranges (sorted by sequence) equal the model's runs beyond RCV.NXT.
            let mut runs = Vec::new();
            let mut i = nxt;
            while i < SPAN {
                if have[i] {
                    let j = (i..SPAN).find(|&j| !have[j]).unwrap_or(SPAN);
                    runs.push((base.wrapping_add(i as u32), base.wrapping_add(j as u32)));
                    i = j;
                } else {
                    i += 1;
                }
            }
            let mut got = blocks(&a);
            got.sort_by_key(|&(l, _)| l.wrapping_sub(base));
            assert_eq!(got, runs, "step {step}: held ranges");
            // Stop while every segment still fits the model (start + len < nxt + 1320).
            if nxt + 1400 >= SPAN {
                break;
            }
        }
        assert!(a.dropped() > 0, "the budget was exercised");
        assert!(
            nxt + 1400 >= SPAN,
            "delivered only {nxt} bytes in the step budget"
        );
    }
}

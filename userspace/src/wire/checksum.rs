//! The Internet checksum (RFC 1071), its incremental update (RFC 1624) and the TCP
//! pseudo-headers for IPv4 (RFC 9293 §3.1) and IPv6 (RFC 8200 §8.1).
//!
//! Owns the arithmetic only; which bytes a header's checksum covers is the header's business.
//! AF_XDP on veth has no checksum offload, so every segment in and out goes through [`data`]:
//! it sums 8 bytes per step into a `u64` (two 32-bit halves, so no carry is ever lost) and folds
//! once at the end. The one's-complement sum is byte-order independent (RFC 1071 §2(B)), so the
//! words are read in native order and the folded result is swapped once.

use std::net::{Ipv4Addr, Ipv6Addr};

/// The folded 16-bit one's-complement sum of `bytes` (not complemented), as a big-endian value.
/// An odd trailing byte is padded with a zero byte (RFC 1071 §4.1).
pub fn data(bytes: &[u8]) -> u16 {
    fold(sum_native(bytes)).to_be()
}

/// Sums native-order 32-bit words into a `u64`; cannot overflow below 2^32 words (16 GiB).
fn sum_native(bytes: &[u8]) -> u64 {
    let mut acc: u64 = 0;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        acc += (v & 0xffff_ffff) + (v >> 32);
    }
    let mut rest = chunks.remainder().chunks_exact(2);
    for c in &mut rest {
        acc += u64::from(u16::from_ne_bytes([c[0], c[1]]));
    }
    if let [last] = rest.remainder() {
        acc += u64::from(u16::from_ne_bytes([*last, 0]));
    }
    acc
}

/// Copies `src` into the start of `dst` and returns the folded one's-complement sum of the copied
/// bytes (as [`data`] would give for them): the bulk send path moves each segment's payload into
/// its frame and sums it in the same pass, so the payload is read once, not twice. Copies
/// `min(src.len(), dst.len())` bytes.
pub fn copy_and_sum(dst: &mut [u8], src: &[u8]) -> u16 {
    let n = src.len().min(dst.len());
    let (dst, src) = (&mut dst[..n], &src[..n]);
    // Two accumulators over 16-byte steps let the loads, stores and adds of neighbouring words
    // overlap; each takes 32-bit halves, so neither can overflow below 2^32 steps.
    let (mut a, mut b) = (0u64, 0u64);
    let mut d = dst.chunks_exact_mut(16);
    let mut s = src.chunks_exact(16);
    for (dc, sc) in (&mut d).zip(&mut s) {
        let mut w = [0u8; 16];
        w.copy_from_slice(sc);
        dc.copy_from_slice(&w);
        let [x0, x1, x2, x3, x4, x5, x6, x7, y0, y1, y2, y3, y4, y5, y6, y7] = w;
        let x = u64::from_ne_bytes([x0, x1, x2, x3, x4, x5, x6, x7]);
        let y = u64::from_ne_bytes([y0, y1, y2, y3, y4, y5, y6, y7]);
        a += (x & 0xffff_ffff) + (x >> 32);
        b += (y & 0xffff_ffff) + (y >> 32);
    }
    let (dr, sr) = (d.into_remainder(), s.remainder());
    dr.copy_from_slice(sr);
    fold(fold_wide(a) + fold_wide(b) + sum_native(sr)).to_be()
}

/// A wide sum reduced below 2^33 without changing its value mod 2^16 − 1, so that a few can be
/// added up without overflow.
fn fold_wide(acc: u64) -> u64 {
    (acc & 0xffff_ffff) + (acc >> 32)
}

/// The sum of `part` (from [`data`] or [`copy_and_sum`]) as it counts in a larger buffer where
/// it starts at `offset`: a part that starts at an odd offset has its bytes in the other halves
/// of the 16-bit words, so its sum is byte-swapped (RFC 1071 §2(B)).
pub fn at_offset(part: u16, offset: usize) -> u16 {
    if offset % 2 == 1 {
        part.swap_bytes()
    } else {
        part
    }
}

/// End-around-carry fold of a wide one's-complement sum to 16 bits (2^16 ≡ 1 mod 2^16 − 1).
fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// One's-complement sum of already-folded partial sums (e.g. pseudo-header + header + payload).
pub fn combine(sums: &[u16]) -> u16 {
    fold(sums.iter().map(|&s| u64::from(s)).sum())
}

/// Partial sum of the IPv4 TCP/UDP pseudo-header (RFC 9293 §3.1): source, destination, zero,
/// protocol, and the upper-layer length.
/// `length` is at most 65535 for a real IPv4 segment; a larger value is summed as two 16-bit
/// halves, which is defined (if meaningless) rather than a truncation.
pub fn pseudo_header_v4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, length: u32) -> u16 {
    let s = u64::from(u32::from(src));
    let d = u64::from(u32::from(dst));
    let l = u64::from(length);
    fold(
        (s >> 16)
            + (s & 0xffff)
            + (d >> 16)
            + (d & 0xffff)
            + u64::from(protocol)
            + (l >> 16)
            + (l & 0xffff),
    )
}

/// Partial sum of the IPv6 upper-layer pseudo-header (RFC 8200 §8.1): source, destination,
/// 32-bit upper-layer length, 24 zero bits and the next header.
pub fn pseudo_header_v6(src: &Ipv6Addr, dst: &Ipv6Addr, next_header: u8, length: u32) -> u16 {
    let words = src
        .segments()
        .into_iter()
        .chain(dst.segments())
        .map(u64::from)
        .sum::<u64>();
    fold(words + u64::from(length >> 16) + u64::from(length & 0xffff) + u64::from(next_header))
}

/// The checksum field value for data whose one's-complement sum is `sum`.
pub fn finish(sum: u16) -> u16 {
    !sum
}

/// RFC 1624 eqn. 3: the new checksum after a 16-bit word covered by `checksum` changes from
/// `old` to `new`: HC' = ~(~HC + ~m + m'). Never yields 0xffff from a valid non-zero input.
pub fn update_u16(checksum: u16, old: u16, new: u16) -> u16 {
    !fold(u64::from(!checksum) + u64::from(!old) + u64::from(new))
}

/// [`update_u16`] for a 32-bit field (an IPv4 address, a sequence number).
pub fn update_u32(checksum: u16, old: u32, new: u32) -> u16 {
    let c = update_u16(checksum, (old >> 16) as u16, (new >> 16) as u16);
    update_u16(c, old as u16, new as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook definition: big-endian 16-bit words, one at a time, end-around carry.
    fn reference(bytes: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for c in bytes.chunks(2) {
            let w = u32::from(c[0]) << 8 | u32::from(c.get(1).copied().unwrap_or(0));
            sum += w;
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: the sum of 00 01 f2 03 f4 f5 f6 f7 is ddf2.
        assert_eq!(
            data(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0xddf2
        );
    }

    #[test]
    fn matches_reference_on_every_length_and_alignment() {
        let bytes: Vec<u8> = (0..600u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for start in 0..9 {
            for len in 0..(bytes.len() - start) {
                let slice = &bytes[start..start + len];
                assert_eq!(data(slice), reference(slice), "start {start} len {len}");
            }
        }
        let ones = vec![0xffu8; 4001];
        assert_eq!(data(&ones), reference(&ones), "all-ones input");
    }

    #[test]
    fn copy_and_sum_copies_and_matches_data() {
        let src: Vec<u8> = (0..1600u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        for start in 0..9 {
            for len in (0..200).chain([1448, 1459, 1460, 1461, 1591 - start]) {
                let from = &src[start..start + len];
                // An odd destination offset too: UMEM frames place payloads at any offset.
                let mut dst = vec![0u8; len + 3];
                let sum = copy_and_sum(&mut dst[3..], from);
                assert_eq!(&dst[3..], from, "start {start} len {len}");
                assert_eq!(sum, data(from), "start {start} len {len}");
                assert_eq!(sum, reference(from), "start {start} len {len}");
            }
        }
        let ones = vec![0xffu8; 9001];
        let mut dst = vec![0u8; 9001];
        assert_eq!(copy_and_sum(&mut dst, &ones), reference(&ones));
        // A short destination bounds the copy (and the sum).
        let mut short = [0u8; 5];
        assert_eq!(copy_and_sum(&mut short, &src[..8]), data(&src[..5]));
        assert_eq!(short, src[..5]);
    }

    #[test]
    fn parts_combine_at_any_split() {
        // A payload that wraps around the send ring arrives as two slices; the second may start
        // at an odd offset of the segment.
        let bytes: Vec<u8> = (0..301u32).map(|i| (i * 7 + 3) as u8).collect();
        for split in 0..bytes.len() {
            let (a, b) = bytes.split_at(split);
            let mut dst = vec![0u8; bytes.len()];
            let sa = copy_and_sum(&mut dst[..split], a);
            let sb = copy_and_sum(&mut dst[split..], b);
            assert_eq!(dst, bytes);
            assert_eq!(
                combine(&[sa, at_offset(sb, split)]),
                reference(&bytes),
                "split {split}"
            );
        }
    }

    #[test]
    fn incremental_update_matches_recomputation() {
        let mut bytes: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37)).collect();
        let before = finish(data(&bytes));
        let old = u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        for new in [0u32, 1, 0xdead_beef, 0xffff_ffff, old.wrapping_add(1)] {
            bytes[8..12].copy_from_slice(&new.to_be_bytes());
            let full = finish(data(&bytes));
            let inc = update_u32(before, old, new);
            // 0x0000 and 0xffff are both "zero" in one's complement; compare sums, not encodings.
            assert_eq!(combine(&[!full]), combine(&[!inc]), "update to {new:#x}");
        }
        let w = u16::from_be_bytes([bytes[0], bytes[1]]);
        let c = finish(data(&bytes));
        bytes[0..2].copy_from_slice(&0x1234u16.to_be_bytes());
        assert_eq!(
            combine(&[!update_u16(c, w, 0x1234)]),
            combine(&[data(&bytes)])
        );
    }

    #[test]
    fn pseudo_headers_match_their_byte_layout() {
        let (s, d) = (Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(198, 51, 100, 7));
        let mut v4 = Vec::new();
        v4.extend_from_slice(&s.octets());
        v4.extend_from_slice(&d.octets());
        v4.extend_from_slice(&[0, 6, 0x05, 0xdc]);
        assert_eq!(pseudo_header_v4(s, d, 6, 1500), reference(&v4));

        let (s6, d6): (Ipv6Addr, Ipv6Addr) = (
            "2001:db8::1".parse().expect("addr"),
            "fe80::ffff:1".parse().expect("addr"),
        );
        let mut v6 = Vec::new();
        v6.extend_from_slice(&s6.octets());
        v6.extend_from_slice(&d6.octets());
        v6.extend_from_slice(&70_000u32.to_be_bytes());
        v6.extend_from_slice(&[0, 0, 0, 6]);
        assert_eq!(pseudo_header_v6(&s6, &d6, 6, 70_000), reference(&v6));
    }
}

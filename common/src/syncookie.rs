//! The SYN-cookie rule (RFC 4987 §3.6), once, for both the bypass TCP stack
//! (`tern::tcp::syncookie`, which wraps it with socket addresses and a key jar) and the XDP
//! program (which answers SYNs itself with `XDP_TX` when `[xdp] syn_cookies = "xdp"`): a cookie
//! one side makes, the other validates.
//!
//! Owns the cookie word, the TSval option bits, the per-connection TSval offset, the MSS table,
//! the slot and key-period lengths and the derivation of a period's key from the process secret.
//! The format and its reasons are described in `tern::tcp::syncookie`. Everything here is
//! word-based (whole `u64`s into SipHash, no byte buffers: the verifier rejected a partly
//! initialised stack array), loop-free or with constant bounds, and panic-free.

use crate::Sip;

/// Length of one time slot of the cookie counter, seconds.
pub const SLOT_SECS: u64 = 64;

/// A cookie key period: two cookie slots, so the previous key covers a cookie's lifetime.
pub const KEY_PERIOD_SECS: u64 = 2 * SLOT_SECS;

/// The MSS values a cookie can carry: common path MSS values, ascending. Index 0 doubles as the
/// floor for peers that offer less.
pub const MSS_TABLE: [u16; 8] = [536, 1220, 1380, 1440, 1452, 1460, 4312, 8960];

const MAC_BITS: u32 = 27;
const MAC_MASK: u32 = (1 << MAC_BITS) - 1;
const INDEX_SHIFT: u32 = MAC_BITS;
/// The slot bits' position in the cookie word.
pub const SLOT_SHIFT: u32 = 30;

/// TSval low bits: window scale in bits 0–3, SACK-permitted in bit 4, bit 5 reserved (zero).
const TS_BITS: u32 = 6;
const TS_MASK: u32 = (1 << TS_BITS) - 1;
const TS_WS_NONE: u32 = 0xF;
const TS_SACK: u32 = 1 << 4;
/// RFC 7323 §2.3: shift counts above 14 are invalid.
pub const MAX_WS: u8 = 14;

/// Domain-separation tags so the pad, the MAC and the TS offset are independent functions of
/// the same key.
const TAG_PAD: u8 = 0x50;
const TAG_MAC: u8 = 0x4d;
const TAG_TS: u8 = 0x54;
/// The MAC's option code when the SYN had no timestamps (TS codes are `0x40 | bits`).
const OPTS_NO_TS: u8 = 0x80;

/// A connection's 4-tuple as tern sees it: addresses as IPv6 (IPv4 as `::ffff:a.b.c.d`, as in
/// `ListenKey`), ports in host order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CookieFlow {
    /// tern's address (the SYN's destination).
    pub local: [u8; 16],
    /// The client's address (the SYN's source).
    pub remote: [u8; 16],
    /// tern's port.
    pub local_port: u16,
    /// The client's port.
    pub remote_port: u16,
}

/// What a valid cookie carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CookieChecked {
    /// The peer's MSS rounded down to a [`MSS_TABLE`] entry.
    pub mss: u16,
    /// The peer's window-scale shift, if it offered one and timestamps carried it.
    pub ws: Option<u8>,
    /// SACK-permitted, if offered and carried by timestamps.
    pub sack_perm: bool,
    /// Which of the keys validated it (0 = current, 1 = previous).
    pub key: usize,
}

/// Why a cookie was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CookieFault {
    /// No key validates it (expired, forged, another tuple or client ISN).
    Invalid,
    /// The echoed timestamp's option bits are not ones we could have sent.
    BadOptions,
}

/// The key of cookie period `period` (`now_secs / KEY_PERIOD_SECS`), derived from the
/// process-wide `secret`: every worker and the XDP program compute the same keys without
/// talking to each other. `siphash24(secret, le(period)) ‖ siphash24(secret, le(!period))`.
#[inline(always)]
pub fn period_key(secret: &[u8; 16], period: u64) -> [u8; 16] {
    let lo = one_word(secret, period);
    let hi = one_word(secret, !period);
    let l = lo.to_le_bytes();
    let h = hi.to_le_bytes();
    [
        l[0], l[1], l[2], l[3], l[4], l[5], l[6], l[7], h[0], h[1], h[2], h[3], h[4], h[5], h[6],
        h[7],
    ]
}

/// SipHash-2-4 of one 8-byte message.
#[inline(always)]
fn one_word(key: &[u8; 16], m: u64) -> u64 {
    let mut sip = Sip::new(key);
    sip.word(m);
    sip.finish(8 << 56)
}

/// The keyed hash of a flow, client ISN, counter, MSS index and option code under `tag`:
/// SipHash-2-4 of the 51 bytes `local ‖ remote ‖ be(local_port) ‖ be(remote_port) ‖
/// be(client_isn) ‖ le(counter) ‖ tag ‖ index ‖ opts`, fed as six whole words and the last.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn keyed(
    key: &[u8; 16],
    tag: u8,
    flow: &CookieFlow,
    client_isn: u32,
    counter: u64,
    index: u8,
    opts: u8,
) -> u64 {
    let [l0, l1] = flow.local_port.to_be_bytes();
    let [r0, r1] = flow.remote_port.to_be_bytes();
    let [i0, i1, i2, i3] = client_isn.to_be_bytes();
    let mut sip = Sip::new(key);
    sip.word(crate::le_word(&flow.local, 0));
    sip.word(crate::le_word(&flow.local, 8));
    sip.word(crate::le_word(&flow.remote, 0));
    sip.word(crate::le_word(&flow.remote, 8));
    sip.word(u64::from_le_bytes([l0, l1, r0, r1, i0, i1, i2, i3]));
    sip.word(counter);
    sip.finish(u64::from_le_bytes([tag, index, opts, 0, 0, 0, 0, 51]))
}

/// The TSval offset of `flow` under `key` (RFC 7323 §7.1): our TSval for the connection is our
/// millisecond clock plus this. Depends on the addresses and ports only.
#[inline(always)]
pub fn ts_offset(key: &[u8; 16], flow: &CookieFlow) -> u32 {
    keyed(key, TAG_TS, flow, 0, 0, 0, 0) as u32
}

#[inline(always)]
fn pad(key: &[u8; 16], flow: &CookieFlow, client_isn: u32) -> u32 {
    keyed(key, TAG_PAD, flow, client_isn, 0, 0, 0) as u32
}

#[inline(always)]
fn mac(
    key: &[u8; 16],
    flow: &CookieFlow,
    client_isn: u32,
    counter: u64,
    index: u8,
    opts: u8,
) -> u32 {
    let h = keyed(key, TAG_MAC, flow, client_isn, counter, index, opts);
    (h ^ (h >> 32)) as u32
}

/// The cookie counter at `secs` seconds after the epoch.
#[inline(always)]
pub const fn counter(secs: u64) -> u64 {
    secs / SLOT_SECS
}

/// The largest [`MSS_TABLE`] entry not above `mss`, or index 0.
#[inline(always)]
pub const fn mss_index(mss: u16) -> u8 {
    mss_index_in(&MSS_TABLE, mss)
}

/// The largest entry of `table` (ascending) not above `mss`, or index 0. Unrolled
/// comparisons: no loop. The stack may put its own MSS in place of the first [`MSS_TABLE`]
/// entry above it (`CookieJar::with_mss`); the XDP program always uses [`MSS_TABLE`]. A cookie
/// made with one and decoded with the other never yields more than the peer offered: every
/// entry of such a table is at most the [`MSS_TABLE`] entry at the same index.
#[inline(always)]
pub const fn mss_index_in(table: &[u16; 8], mss: u16) -> u8 {
    let mut i = 0u8;
    if mss >= table[1] {
        i = 1;
    }
    if mss >= table[2] {
        i = 2;
    }
    if mss >= table[3] {
        i = 3;
    }
    if mss >= table[4] {
        i = 4;
    }
    if mss >= table[5] {
        i = 5;
    }
    if mss >= table[6] {
        i = 6;
    }
    if mss >= table[7] {
        i = 7;
    }
    i
}

#[inline(always)]
fn ts_bits(ws: Option<u8>, sack_perm: bool) -> u32 {
    let ws = match ws {
        Some(w) if w < MAX_WS => w as u32,
        Some(_) => MAX_WS as u32,
        None => TS_WS_NONE,
    };
    ws | if sack_perm { TS_SACK } else { 0 }
}

/// Our TSval with `bits` in its low bits, never ahead of `clock` (so RTT samples from the echo
/// are never negative and the clock never appears to step backwards by more than 63 ticks).
#[inline(always)]
fn encode_tsval(clock: u32, bits: u32) -> u32 {
    let ts = (clock & !TS_MASK) | bits;
    if bits > clock & TS_MASK {
        ts.wrapping_sub(1 << TS_BITS)
    } else {
        ts
    }
}

/// The cookie for a SYN under `key` at cookie counter `counter`: our ISN and, if `ts_clock` is
/// `Some` (the SYN carried timestamps; the value is our TSval clock for the flow, offset
/// included), the TSval to send. `mss` is what the peer offered (536 / 1220 if nothing);
/// `ws` and `sack_perm` are only kept when `ts_clock` is `Some`; `table` is the MSS table
/// (see [`mss_index_in`]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn cookie_make(
    key: &[u8; 16],
    flow: &CookieFlow,
    client_isn: u32,
    mss: u16,
    ws: Option<u8>,
    sack_perm: bool,
    ts_clock: Option<u32>,
    counter: u64,
    table: &[u16; 8],
) -> (u32, Option<u32>) {
    let index = mss_index_in(table, mss);
    let (opts_code, tsval) = match ts_clock {
        Some(clock) => {
            let bits = ts_bits(ws, sack_perm);
            (0x40 | bits as u8, Some(encode_tsval(clock, bits)))
        }
        None => (OPTS_NO_TS, None),
    };
    let word = ((counter as u32 & 3) << SLOT_SHIFT)
        | ((index as u32) << INDEX_SHIFT)
        | (mac(key, flow, client_isn, counter, index, opts_code) & MAC_MASK);
    (word ^ pad(key, flow, client_isn), tsval)
}

/// Validates `cookie` (the ACK number minus one) for `flow` and `client_isn` (the ACK's
/// sequence number minus one) against `keys` (current, previous) at counter `now_counter`;
/// `tsecr` is the echoed timestamp if the ACK carries the option. A cookie is valid in the
/// counter it was made and the next one.
pub fn cookie_check(
    keys: &[[u8; 16]; 2],
    flow: &CookieFlow,
    cookie: u32,
    client_isn: u32,
    tsecr: Option<u32>,
    now_counter: u64,
    table: &[u16; 8],
) -> Result<CookieChecked, CookieFault> {
    let (opts_code, ws, sack_perm) = match tsecr {
        Some(ts) => {
            let bits = ts & TS_MASK;
            let ws = bits & 0xF;
            if bits & !(0xF | TS_SACK) != 0 || (ws != TS_WS_NONE && ws > MAX_WS as u32) {
                return Err(CookieFault::BadOptions);
            }
            let ws = if ws == TS_WS_NONE {
                None
            } else {
                Some(ws as u8)
            };
            (0x40 | bits as u8, ws, bits & TS_SACK != 0)
        }
        None => (OPTS_NO_TS, None, false),
    };
    let mut k = 0;
    while k < keys.len() {
        let key = &keys[k];
        let word = cookie ^ pad(key, flow, client_isn);
        let slot = u64::from(word >> SLOT_SHIFT);
        // The slot bits name the counter: the current one or the one before.
        let counter = if now_counter & 3 == slot {
            Some(now_counter)
        } else if now_counter > 0 && (now_counter - 1) & 3 == slot {
            Some(now_counter - 1)
        } else {
            None
        };
        if let Some(counter) = counter {
            let index = ((word >> INDEX_SHIFT) & 7) as u8;
            if word & MAC_MASK == mac(key, flow, client_isn, counter, index, opts_code) & MAC_MASK {
                return Ok(CookieChecked {
                    mss: table[(index & 7) as usize],
                    ws,
                    sack_perm,
                    key: k,
                });
            }
        }
        k += 1;
    }
    Err(CookieFault::Invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::siphash24;

    #[test]
    fn word_feed_is_siphash_of_the_documented_bytes() {
        let flow = CookieFlow {
            local: crate::ipv4_mapped([10, 0, 0, 1]),
            remote: [7; 16],
            local_port: 443,
            remote_port: 50_123,
        };
        let key = *b"0123456789abcdef";
        let mut m = [0u8; 51];
        m[..16].copy_from_slice(&flow.local);
        m[16..32].copy_from_slice(&flow.remote);
        m[32..34].copy_from_slice(&443u16.to_be_bytes());
        m[34..36].copy_from_slice(&50_123u16.to_be_bytes());
        m[36..40].copy_from_slice(&0xdead_beefu32.to_be_bytes());
        m[40..48].copy_from_slice(&77u64.to_le_bytes());
        m[48] = 0x4d;
        m[49] = 5;
        m[50] = 0x80;
        assert_eq!(
            keyed(&key, 0x4d, &flow, 0xdead_beef, 77, 5, 0x80),
            siphash24(&key, &m)
        );
        assert_eq!(
            period_key(&key, 9)[..8],
            siphash24(&key, &9u64.to_le_bytes()).to_le_bytes()
        );
        assert_eq!(
            period_key(&key, 9)[8..],
            siphash24(&key, &(!9u64).to_le_bytes()).to_le_bytes()
        );
    }

    #[test]
    fn tsval_never_runs_ahead_even_across_wrap() {
        assert_eq!(
            encode_tsval(0x40, 0x3f),
            0x3f,
            "steps back one 64-tick block"
        );
        assert_eq!(encode_tsval(5, 0x1f), 0xffff_ffdf, "wraps below zero");
        assert_eq!(encode_tsval(0x7f, 0x10), 0x50, "same block when possible");
        assert_eq!(
            ts_bits(Some(20), false),
            14,
            "shift clamped to 14 (RFC 7323 §2.3)"
        );
    }

    #[test]
    fn mss_index_is_the_largest_entry_not_above() {
        for mss in [0u16, 535, 536, 1219, 1220, 1459, 1460, 8959, 8960, u16::MAX] {
            let want = MSS_TABLE.iter().rposition(|&m| m <= mss).unwrap_or(0) as u8;
            assert_eq!(mss_index(mss), want, "mss {mss}");
        }
    }
}

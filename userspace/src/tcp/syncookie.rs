//! SYN cookies (RFC 4987 §3.6): a passive open that keeps no state until the handshake's final
//! ACK proves the peer can receive at its claimed address.
//!
//! Owns the two-key rotation and the socket-address face of the cookie rule; the rule itself
//! (cookie word, keyed MAC with SipHash-2-4, TSval bits and offset, MSS table) lives in
//! `tern_common::syncookie`, so the XDP program, which can answer SYNs itself, makes exactly the
//! cookies this validates. Does not own key generation (the worker draws keys from the
//! OS at start-up and on each rotation) or the SYN-ACK/ACK segments themselves.
//!
//! Design, after Linux's `net/ipv4/syncookies.c` but not its layout:
//! - The ISN we send is `pad ⊕ (slot:2 | mss_index:3 | mac:27)`. `pad` is a keyed hash of the
//!   4-tuple and the client's ISN, so ISNs look random (RFC 6528's intent) and hide the slot and
//!   index; `mac` is a keyed hash of the 4-tuple, the client's ISN, the full time counter, the MSS
//!   index and the option bits below. A guess succeeds with probability 2⁻²⁷ per live key.
//! - Time advances in [`SLOT_SECS`] slots of the worker's [`Instant`]. A flow can move to
//!   another RX queue (and worker) between SYN and ACK, so every worker must use the same keys
//!   *and* the same `Instant` epoch for cookies to validate anywhere.
//!   A cookie validates in the slot it was made and the next one, so it lives between 64 and
//!   128 s: long enough for a SYN-ACK retransmission or two, short enough to limit replay.
//! - Keys: the current and the previous one are both tried, so rotating never breaks a handshake
//!   in flight as long as rotations are at least one cookie lifetime apart.
//! - When the SYN carried timestamps (RFC 7323), the low 6 bits of the TSval we send carry the
//!   peer's window scale (4 bits, 0xF = none) and SACK-permitted (1 bit; the 6th is reserved and
//!   zero); the peer echoes them in TSecr. Without timestamps, window scaling and SACK are not
//!   offered (the SYN-ACK must then omit them), as on Linux: there is nowhere to keep them.
//! - Our TSvals carry a per-connection offset (RFC 7323 §7.1), a keyed hash of the 4-tuple
//!   under the cookie key ([`CookieJar::ts_offset`]): keyed with the cookie key because every
//!   worker shares it (the final ACK may reach another worker than the SYN), and
//!   [`CookieJar::check`] recomputes it under whichever key validated the cookie, so the
//!   SYN-ACK's TSval and the connection's later TSvals stay one clock across a rotation. The
//!   offset is added before the option bits are put in the low bits, so decoding is unchanged.
//! - The MSS is rounded down to an entry of [`MSS_TABLE`] (with the stack's own MSS in place of
//!   the first entry above it, [`CookieJar::with_mss`]); a peer that offers less than 536 gets
//!   536, the IPv4 default (RFC 9293 §3.7.1), as on Linux.

use std::net::{IpAddr, SocketAddr};

use tern_common::syncookie::{self as rule, CookieFault, CookieFlow};

use super::time::Instant;

#[cfg(test)]
use tern_common::syncookie::SLOT_SHIFT;
pub use tern_common::syncookie::{KEY_PERIOD_SECS, MSS_TABLE, SLOT_SECS};
/// SACK-permitted's bit in the TSval (tests tamper with it).
#[cfg(test)]
const TS_SACK: u32 = 1 << 4;

/// A 128-bit SipHash key.
pub type CookieKey = [u8; 16];

/// The connection's 4-tuple as seen from tern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CookieTuple {
    /// tern's address and port (the SYN's destination).
    pub local: SocketAddr,
    /// The client's address and port (the SYN's source).
    pub remote: SocketAddr,
}

impl CookieTuple {
    /// The tuple as the shared rule takes it (IPv4 as v4-mapped IPv6, as the XDP program sees it).
    fn flow(&self) -> CookieFlow {
        fn v6(ip: IpAddr) -> [u8; 16] {
            match ip {
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                IpAddr::V6(a) => a.octets(),
            }
        }
        CookieFlow {
            local: v6(self.local.ip()),
            remote: v6(self.remote.ip()),
            local_port: self.local.port(),
            remote_port: self.remote.port(),
        }
    }
}

/// What the SYN offered, recovered from a valid cookie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// The peer's MSS, rounded down to a [`MSS_TABLE`] entry (floor 536). The connection still
    /// takes the minimum with its own MSS.
    pub mss: u16,
    /// The peer's window-scale shift (RFC 7323 §2), if it offered one and timestamps carried it.
    pub ws: Option<u8>,
    /// SACK-permitted (RFC 2018), if offered and carried by timestamps.
    pub sack_perm: bool,
    /// The connection's TSval offset ([`CookieJar::ts_offset`]) under the key that validated
    /// the cookie — the key that made it, so the SYN-ACK's TSval and the connection's agree
    /// even across a key rotation.
    pub ts_offset: u32,
}

/// Why an ACK's cookie was refused (each is a drop counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CookieError {
    /// No key validates it: expired, forged, tampered, or for another tuple or client ISN. The
    /// slot bits are hidden under a pad that depends on the tuple, so these cannot be told apart.
    #[error("SYN cookie invalid or expired")]
    Invalid,
    /// The echoed timestamp's option bits are not ones we could have sent.
    #[error("SYN cookie timestamp options invalid")]
    BadOptions,
}

/// The current and previous cookie keys.
#[derive(Clone)]
pub struct CookieJar {
    /// `keys[0]` signs new cookies; `keys[1]` (the previous key) still validates.
    keys: [CookieKey; 2],
    /// [`MSS_TABLE`] with our own MSS in it ([`CookieJar::with_mss`]).
    table: [u16; 8],
}

impl std::fmt::Debug for CookieJar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys are secrets: never in logs.
        f.write_str("CookieJar { keys: <redacted> }")
    }
}

impl CookieJar {
    /// A jar signing with `key_now` and still accepting `key_prev`. At start-up, pass two fresh
    /// random keys.
    pub fn new(key_now: CookieKey, key_prev: CookieKey) -> CookieJar {
        CookieJar {
            keys: [key_now, key_prev],
            table: MSS_TABLE,
        }
    }

    /// As [`new`](Self::new), for a stack whose own MSS is `ours`: it takes the place of the
    /// first [`MSS_TABLE`] entry above it, so a peer on the same MTU (the MSS follows the
    /// interface's, `bypass::mss`) keeps the full segment size through the cookie instead of
    /// the entry below (3,466 would otherwise become 1,460). Entries above `ours` gain nothing:
    /// the connection takes the minimum with its own MSS anyway.
    pub fn with_mss(key_now: CookieKey, key_prev: CookieKey, ours: u16) -> CookieJar {
        let mut table = MSS_TABLE;
        if let Some(slot) = table.iter_mut().find(|m| **m > ours) {
            *slot = ours.max(MSS_TABLE[0]);
        }
        CookieJar {
            keys: [key_now, key_prev],
            table,
        }
    }

    /// Makes `new_key` current; the current key becomes the previous one, the previous is dropped.
    pub fn rotate(&mut self, new_key: CookieKey) {
        self.keys = [new_key, self.keys[0]];
    }

    /// The TSval offset for connections on `tuple` under the current key: our TSval is
    /// [`Instant::ts_millis`] plus this (RFC 7323 §7.1: a per-connection offset, so TSvals tell
    /// nothing about our clock or other connections). Pass `ts_millis() + ts_offset(tuple)` to
    /// [`make`](Self::make) as `ts_now`; [`check`](Self::check) returns the same offset in
    /// [`Negotiated::ts_offset`]. It depends on the addresses and ports only (not the ISN), so a
    /// new incarnation of a 4-tuple continues the old one's TSval clock (as Linux's per-address
    /// offset does), which keeps the peer's PAWS state valid.
    pub fn ts_offset(&self, tuple: &CookieTuple) -> u32 {
        rule::ts_offset(&self.keys[0], &tuple.flow())
    }

    /// The cookie for a SYN: returns our ISN and, if the SYN carried timestamps, the TSval to
    /// send in the SYN-ACK.
    ///
    /// `mss` is the MSS the peer offered (536 for IPv4 or 1220 for IPv6 when it sent none);
    /// `ws` and `sack_perm` its window-scale and SACK-permitted options; `ts_now` is `Some(our
    /// TSval clock now)` iff the SYN had a timestamp option. `ws` and `sack_perm` are only kept
    /// when `ts_now` is `Some`.
    #[expect(
        clippy::too_many_arguments,
        reason = "one argument per SYN field the cookie keeps"
    )]
    pub fn make(
        &self,
        tuple: &CookieTuple,
        client_isn: u32,
        mss: u16,
        ws: Option<u8>,
        sack_perm: bool,
        ts_now: Option<u32>,
        now: Instant,
    ) -> (u32, Option<u32>) {
        rule::cookie_make(
            &self.keys[0],
            &tuple.flow(),
            client_isn,
            mss,
            ws,
            sack_perm,
            ts_now,
            rule::counter(now.as_secs()),
            &self.table,
        )
    }

    /// Validates the cookie in a handshake-completing ACK: `cookie` is the ACK number minus one,
    /// `client_isn` the ACK's sequence number minus one, `tsecr` the echoed timestamp if the ACK
    /// carries the option.
    pub fn check(
        &self,
        tuple: &CookieTuple,
        cookie: u32,
        client_isn: u32,
        tsecr: Option<u32>,
        now: Instant,
    ) -> Result<Negotiated, CookieError> {
        let flow = tuple.flow();
        match rule::cookie_check(
            &self.keys,
            &flow,
            cookie,
            client_isn,
            tsecr,
            rule::counter(now.as_secs()),
            &self.table,
        ) {
            Ok(ok) => Ok(Negotiated {
                mss: ok.mss,
                ws: ok.ws,
                sack_perm: ok.sack_perm,
                ts_offset: rule::ts_offset(&self.keys[ok.key & 1], &flow),
            }),
            Err(CookieFault::Invalid) => Err(CookieError::Invalid),
            Err(CookieFault::BadOptions) => Err(CookieError::BadOptions),
        }
    }
}

/// SipHash-2-4, the one implementation shared with the XDP program (`tern_common`).
pub use tern_common::siphash24;

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6};

    const K1: CookieKey = *b"0123456789abcdef";
    const K2: CookieKey = *b"fedcba9876543210";
    const K3: CookieKey = *b"a third key.....";
    const K4: CookieKey = *b"the fourth key..";

    fn tuple() -> CookieTuple {
        CookieTuple {
            local: SocketAddr::from((Ipv4Addr::new(10, 0, 0, 1), 443)),
            remote: SocketAddr::from((Ipv4Addr::new(10, 0, 0, 2), 50_123)),
        }
    }

    fn at(secs: u64) -> Instant {
        Instant::from_secs(secs)
    }

    #[test]
    fn round_trip_without_timestamps() {
        let jar = CookieJar::new(K1, K2);
        let (isn, ts) = jar.make(&tuple(), 1000, 1460, Some(7), true, None, at(500));
        assert_eq!(ts, None, "no TSval without timestamps");
        let got = jar.check(&tuple(), isn, 1000, None, at(510));
        assert_eq!(
            got,
            Ok(Negotiated {
                mss: 1460,
                ws: None,
                sack_perm: false,
                ts_offset: jar.ts_offset(&tuple()),
            }),
            "MSS survives; WS and SACK need timestamps"
        );
    }

    #[test]
    fn round_trip_ipv6() {
        let jar = CookieJar::new(K1, K2);
        let t = CookieTuple {
            local: SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 443, 0, 0)),
            remote: SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7),
                40_000,
                0,
                0,
            )),
        };
        let (isn, _) = jar.make(&t, 7, 1220, None, false, None, at(100));
        assert_eq!(
            jar.check(&t, isn, 7, None, at(100)).map(|n| n.mss),
            Ok(1220),
            "v6"
        );
        assert_eq!(
            jar.check(&tuple(), isn, 7, None, at(100)),
            Err(CookieError::Invalid),
            "v6 cookie on a v4 tuple"
        );
    }

    #[test]
    fn timestamp_encoded_options_round_trip() {
        let jar = CookieJar::new(K1, K2);
        for (ws, sack) in [
            (Some(7), true),
            (None, true),
            (Some(0), false),
            (Some(14), true),
        ] {
            let clock = 123_456_789;
            let (isn, tsval) = jar.make(&tuple(), 42, 8960, ws, sack, Some(clock), at(1000));
            let tsval = tsval.expect("TSval when the SYN had timestamps");
            assert!(
                tsval <= clock && clock - tsval < 64,
                "TSval {tsval} not ahead of {clock}"
            );
            let got = jar.check(&tuple(), isn, 42, Some(tsval), at(1001));
            assert_eq!(
                got,
                Ok(Negotiated {
                    mss: 8960,
                    ws,
                    sack_perm: sack,
                    ts_offset: jar.ts_offset(&tuple()),
                }),
                "ws {ws:?} sack {sack}"
            );
        }
    }

    #[test]
    fn tampered_echoed_options_rejected() {
        let jar = CookieJar::new(K1, K2);
        let (isn, tsval) = jar.make(&tuple(), 42, 1460, Some(7), false, Some(99_999), at(10));
        let tsval = tsval.expect("TSval");
        assert_eq!(
            jar.check(&tuple(), isn, 42, Some(tsval ^ TS_SACK), at(10)),
            Err(CookieError::Invalid),
            "SACK bit flipped"
        );
        assert_eq!(
            jar.check(&tuple(), isn, 42, Some(tsval ^ 1), at(10)),
            Err(CookieError::Invalid),
            "window scale changed"
        );
        assert_eq!(
            jar.check(&tuple(), isn, 42, Some(tsval | 0x20), at(10)),
            Err(CookieError::BadOptions),
            "reserved bit"
        );
        assert_eq!(
            jar.check(&tuple(), isn, 42, Some((tsval & !0xF) | 0xE), at(10))
                .map(|n| n.ws),
            Err(CookieError::Invalid),
            "valid-looking shift 14 still authenticated"
        );
        assert_eq!(
            jar.check(&tuple(), isn, 42, None, at(10)),
            Err(CookieError::Invalid),
            "timestamps dropped from the ACK"
        );
        assert_eq!(
            jar.check(&tuple(), isn, 42, Some(tsval.wrapping_add(64)), at(10))
                .map(|n| n.ws),
            Ok(Some(7)),
            "TSecr high bits are not part of the cookie"
        );
    }

    #[test]
    fn wrong_tuple_isn_or_key_rejected() {
        let jar = CookieJar::new(K1, K2);
        let (isn, _) = jar.make(&tuple(), 1000, 1460, None, false, None, at(300));
        let mut other = tuple();
        other.remote.set_port(50_124);
        assert_eq!(
            jar.check(&other, isn, 1000, None, at(300)),
            Err(CookieError::Invalid),
            "port"
        );
        let mut other = tuple();
        other.remote.set_ip(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 3)));
        assert!(
            jar.check(&other, isn, 1000, None, at(300)).is_err(),
            "address"
        );
        assert!(
            jar.check(&tuple(), isn, 1001, None, at(300)).is_err(),
            "client ISN"
        );
        let stranger = CookieJar::new(K3, K3);
        assert!(
            stranger.check(&tuple(), isn, 1000, None, at(300)).is_err(),
            "unknown key"
        );
    }

    #[test]
    fn every_single_bit_flip_rejected() {
        let jar = CookieJar::new(K1, K2);
        let (isn, _) = jar.make(&tuple(), 5, 1460, None, false, None, at(64 * 10));
        for bit in 0..32 {
            assert!(
                jar.check(&tuple(), isn ^ (1 << bit), 5, None, at(64 * 10))
                    .is_err(),
                "cookie with bit {bit} flipped accepted"
            );
        }
    }

    #[test]
    fn lifetime_is_current_and_previous_slot() {
        let jar = CookieJar::new(K1, K2);
        let made = 64 * 100 + 30;
        let (isn, _) = jar.make(&tuple(), 9, 1460, None, false, None, at(made));
        assert!(
            jar.check(&tuple(), isn, 9, None, at(made)).is_ok(),
            "immediately"
        );
        assert!(
            jar.check(&tuple(), isn, 9, None, at(64 * 101)).is_ok(),
            "next slot"
        );
        assert!(
            jar.check(&tuple(), isn, 9, None, at(64 * 102 - 1)).is_ok(),
            "end of next"
        );
        assert_eq!(
            jar.check(&tuple(), isn, 9, None, at(64 * 102)),
            Err(CookieError::Invalid),
            "two slots later"
        );
        assert!(
            jar.check(&tuple(), isn, 9, None, at(64 * 104 + 1)).is_err(),
            "same slot bits four slots later: the MAC covers the full counter"
        );
        assert!(
            jar.check(&tuple(), isn, 9, None, at(64 * 99)).is_err(),
            "from the future"
        );
    }

    #[test]
    fn works_at_the_epoch() {
        let jar = CookieJar::new(K1, K2);
        let (isn, _) = jar.make(&tuple(), 9, 536, None, false, None, Instant::ZERO);
        assert!(
            jar.check(&tuple(), isn, 9, None, at(1)).is_ok(),
            "counter 0 has no previous"
        );
    }

    #[test]
    fn previous_key_still_valid_after_rotation() {
        let mut jar = CookieJar::new(K1, K2);
        let (isn, _) = jar.make(&tuple(), 77, 1440, None, false, None, at(1000));
        jar.rotate(K3);
        assert_eq!(
            jar.check(&tuple(), isn, 77, None, at(1010)).map(|n| n.mss),
            Ok(1440),
            "cookie from the now-previous key"
        );
        let (fresh, _) = jar.make(&tuple(), 77, 1440, None, false, None, at(1010));
        assert_ne!(fresh, isn, "new cookies use the new key");
        jar.rotate(K4);
        assert!(
            jar.check(&tuple(), isn, 77, None, at(1010)).is_err(),
            "two rotations later the old key is gone"
        );
        assert!(
            jar.check(&tuple(), fresh, 77, None, at(1010)).is_ok(),
            "K3 now previous"
        );
    }

    #[test]
    fn ts_offset_is_per_tuple_and_survives_rotation() {
        let mut jar = CookieJar::new(K1, K2);
        let other = CookieTuple {
            remote: "192.0.2.9:40001".parse().expect("addr"),
            ..tuple()
        };
        let off = jar.ts_offset(&tuple());
        assert_ne!(off, jar.ts_offset(&other), "another port, another offset");
        assert_ne!(
            off,
            CookieJar::new(K3, K2).ts_offset(&tuple()),
            "keyed: another key, another offset"
        );
        // The SYN-ACK's TSval uses the offset; the ACK echoes it after a rotation.
        let clock = 5_000_000u32.wrapping_add(off);
        let (isn, tsval) = jar.make(&tuple(), 9, 1460, Some(7), true, Some(clock), at(100));
        let tsval = tsval.expect("timestamps");
        jar.rotate(K3);
        assert_ne!(
            jar.ts_offset(&tuple()),
            off,
            "new key, new offset for new SYNs"
        );
        let got = jar
            .check(&tuple(), isn, 9, Some(tsval), at(101))
            .expect("valid under the previous key");
        assert_eq!(
            got.ts_offset, off,
            "the offset of the key that made the cookie"
        );
        assert_eq!((got.ws, got.sack_perm), (Some(7), true), "options decode");
    }

    #[test]
    fn mss_clamped_to_table_entry_not_above_peer() {
        let jar = CookieJar::new(K1, K2);
        for (offered, want) in [
            (1460, 1460),
            (1459, 1452),
            (1400, 1380),
            (9000, 8960),
            (65_535, 8960),
            (1220, 1220),
            (600, 536),
            (100, 536),
        ] {
            let (isn, _) = jar.make(&tuple(), 1, offered, None, false, None, at(5));
            let got = jar.check(&tuple(), isn, 1, None, at(5)).map(|n| n.mss);
            assert_eq!(got, Ok(want), "peer offered {offered}");
        }
    }

    #[test]
    fn our_own_mss_survives_the_cookie() {
        // A stack on a 3,506-byte MTU (MSS 3,466) talking to a peer on the same link.
        let jar = CookieJar::with_mss(K1, K2, 3466);
        for (offered, want) in [(3466, 3466), (9000, 8960), (3465, 1460), (1460, 1460)] {
            let (isn, _) = jar.make(&tuple(), 1, offered, None, false, None, at(5));
            let got = jar.check(&tuple(), isn, 1, None, at(5)).map(|n| n.mss);
            assert_eq!(got, Ok(want), "peer offered {offered}");
        }
        // The usual MSS changes nothing a peer could tell.
        let jar = CookieJar::with_mss(K1, K2, 1460);
        let (isn, _) = jar.make(&tuple(), 1, 1460, None, false, None, at(5));
        assert_eq!(
            jar.check(&tuple(), isn, 1, None, at(5)).map(|n| n.mss),
            Ok(1460)
        );
    }

    #[test]
    fn isns_look_random() {
        let jar = CookieJar::new(K1, K2);
        let a = jar.make(&tuple(), 1, 1460, None, false, None, at(5)).0;
        let b = jar.make(&tuple(), 2, 1460, None, false, None, at(5)).0;
        assert!(
            (a ^ b).count_ones() > 4,
            "ISNs for adjacent client ISNs differ widely"
        );
        let mut top = [false; 4];
        for client_isn in 0..64 {
            let isn = jar
                .make(&tuple(), client_isn, 1460, None, false, None, at(5))
                .0;
            top[(isn >> SLOT_SHIFT) as usize] = true;
        }
        assert!(
            top.iter().all(|&seen| seen),
            "the pad hides the slot bits: {top:?}"
        );
        assert_eq!(
            format!("{jar:?}"),
            "CookieJar { keys: <redacted> }",
            "no keys in Debug"
        );
    }
}

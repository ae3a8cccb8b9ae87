//! The per-worker TCP stack: frames in, frames out, time passed in. Owns the flow table (4-tuple
//! → slot in a preallocated slab), the stateless passive open with SYN cookies (RFC 4987 §3.6),
//! RSTs for segments that match no connection (RFC 9293 §3.10.7.1 CLOSED, §3.10.7.2 LISTEN), the
//! timer wheel that drives every connection's [`Tcb::on_timer`], and the per-reason drop
//! counters.
//!
//! Checksums are checked per `rx_checksum` ([`ChecksumMode`]); segments accepted with only the
//! pseudo-header sum in their checksum field (a veth peer with TX checksum offload) are counted
//! apart, and [`Stack::checksum_alarm`] tells the worker when most frames fail.
//!
//! Does not own: header layout and checksums (`wire`), the state machine of one connection
//! (`conn`), the cookie format (`syncookie`), or the frames' memory (the caller copies each
//! emitted frame into its UMEM from the `out` callback). Nothing here reads a clock or makes a
//! syscall.
//!
//! Per packet the stack does one flow-table lookup. A hit goes to that connection's
//! [`Tcb::process`] and its replies out at once through [`Tcb::poll_transmit`]. A miss is
//! answered statelessly: SYN → SYN-ACK carrying a cookie; ACK → cookie check, and only a valid
//! cookie (and a free slot) creates state; anything else → RST, except an RST (RFC 9293
//! §3.10.7.1: "An incoming segment containing a RST is discarded"). Frames addressed to a
//! group address (Ethernet or IP multicast/broadcast) are never answered (RFC 1122 §4.2.3.10).
//!
//! ICMP (path-MTU discovery, RFC 1191 / RFC 8201, with RFC 5927's defences): the XDP program
//! steers ICMPv4 "fragmentation needed" and ICMPv6 "packet too big" that quote one of our
//! segments to the flow's worker. A frame that is not TCP is parsed as ICMP (checksum verified
//! per `rx_checksum`); a packet-too-big whose quoted 4-tuple (ours as sent) is a live flow and
//! whose quoted sequence number is in SND.UNA..SND.MAX lowers that connection's MSS to the MTU
//! minus the IP and TCP headers (minus our timestamp option), never below 536 (IPv4) / 1220
//! (IPv6) and never upwards, and resends the flight at once in the new size
//! ([`Tcb::on_packet_too_big`]). Every other ICMP frame is dropped and counted by reason
//! ([`RxDrop::IcmpIgnored`] and the other `Icmp*` variants).
//!
//! Allocation: the slab, the flow table, the free list, the event queues and the transmit
//! scratch frame are all sized at [`Stack::new`]. Each slab slot owns a TCB with its send and
//! receive rings, allocated there once (sized from [`TcbConfig`]); a new connection
//! re-initialises its slot's TCB in place ([`Tcb::accept_in_place`]) and a closed one leaves it
//! behind, CLOSED and emptied, so creating and closing connections allocates nothing (a test
//! counts ring allocations over churn). The rings come from zeroed allocations, which the OS maps
//! lazily: memory is committed as slots are first used, and the free list is LIFO, so the
//! touched set stays at the high-water mark of concurrent connections. What still allocates
//! after start-up: the timer wheel's buckets, which grow amortised to their high-water mark and
//! then stay (see `timer`). The ready and dirty queues are reserved at twice the capacity; only
//! an application that never drains them while connections churn could make them grow.
//!
//! Orphans: a connection the application [released](Tcb::release) finishes its closing
//! handshake here on its own. Until it reaches TIME-WAIT (which gives the slot back, see
//! [`ClosedFlows`]) or CLOSED it holds a slot and is bounded twice, as Linux bounds its orphaned
//! sockets: in time by [`TcbConfig::orphan_timeout`] (like `tcp_fin_timeout`, but for every
//! closing state; RST on expiry), and in number by [`StackConfig::max_orphans`] (like
//! `tcp_max_orphans`: the release that would exceed it becomes an abort). Both are counted in
//! [`StackCounters`].
//!
//! Timestamps: our TSval clock is [`Instant::ts_millis`] plus a per-connection offset (RFC 7323
//! §7.1), a keyed hash of the 4-tuple under the cookie key ([`CookieJar::ts_offset`]). The
//! SYN-ACK's TSval is made from that clock ([`CookieJar::make`] only replaces its low bits, never
//! running it ahead) and the connection gets the offset back from the cookie check
//! ([`Negotiated::ts_offset`](super::syncookie::Negotiated::ts_offset), under the key that made
//! the cookie), so the SYN-ACK's and the connection's TSvals are one clock.

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::checksum_alarm::{ChecksumAlarm, ChecksumWatch};
use super::conn::{CloseReason, Handshake, PmtuIgnored, State, Tcb, TcbConfig, TimeWaitState};
use super::frame_out::{Copying, FrameOut};
use super::ring::{Ring, RingArena};
use super::syncookie::{siphash24, CookieJar, CookieKey, CookieTuple};
use super::time::Instant;
use crate::driver::timer::{Millis, Wheel};
use crate::wire::{
    checksum, emit_tcp_frame_headers, emit_tcp_frame_headers_summed, parse_icmp_frame,
    parse_tcp_frame, tcp_payload_offset, ChecksumMode, ChecksumVerdict, EtherType, EthernetAddress,
    EthernetRepr, IpRepr, Ipv4Repr, Ipv6Repr, SeqNumber, TcpFlags, TcpFrame, TcpOptions, TcpRepr,
    Timestamps, WireError, IP_PROTO_TCP,
};

/// Timer-wheel resolution. Finer than any TCP timer we run (the smallest is the delayed ACK).
const WHEEL_TICK_MS: u64 = 1;
/// Wheel buckets per level: a 4 s span at 1 ms; later deadlines wait in level two (4.6 h).
const WHEEL_BUCKETS: usize = 4096;
/// TTL / hop limit of what we send (Linux's default).
const DEFAULT_TTL: u8 = 64;
/// Largest frame we build: Ethernet with a VLAN tag, IPv6, TCP with 40 bytes of options.
const MAX_HEADERS: usize = 18 + 40 + 60;
/// `FlowTable` slot marker for an empty bucket.
const EMPTY: u32 = u32::MAX;

/// How a stack is set up. Everything is sized from it once, in [`Stack::new`].
#[derive(Clone, Copy)]
pub struct StackConfig<'a> {
    /// Connection slots (the slab); the most connections the stack holds at once.
    pub capacity: usize,
    /// Addresses we accept connections on. An unspecified IP (`0.0.0.0` / `::`) matches every
    /// local address of its family.
    pub listeners: &'a [SocketAddr],
    /// Tunables of every connection; `tcb.mss` is also the MSS our SYN-ACKs offer.
    pub tcb: TcbConfig,
    /// The current and previous SYN-cookie keys (random, and the same on every worker).
    pub cookie_keys: [CookieKey; 2],
    /// Key of the flow table's hash (random per worker; see [`FlowTable`] for why it is keyed).
    pub flow_key: CookieKey,
    /// Whether arriving checksums are verified, and whether a partial one (what a veth peer
    /// with TX checksum offload sends) is accepted. What we send is always checksummed.
    pub rx_checksum: ChecksumMode,
    /// Size of the transmit scratch frame (the UMEM frame size): bounds the largest frame we emit.
    pub frame_size: usize,
    /// Most orphans — connections the application [released](Tcb::release) that still hold a
    /// slot in FIN-WAIT-1/2, CLOSING or LAST-ACK — held at once; a release beyond it aborts that
    /// connection (RST) instead, as Linux's `tcp_max_orphans`. 0: every such release aborts.
    /// Each orphan is also bounded in time by [`TcbConfig::orphan_timeout`].
    pub max_orphans: usize,
}

impl std::fmt::Debug for StackConfig<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys are secrets: never in logs.
        f.debug_struct("StackConfig")
            .field("capacity", &self.capacity)
            .field("listeners", &self.listeners)
            .field("tcb", &self.tcb)
            .field("rx_checksum", &self.rx_checksum)
            .field("frame_size", &self.frame_size)
            .field("max_orphans", &self.max_orphans)
            .finish_non_exhaustive()
    }
}

/// Why a [`StackConfig`] was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `capacity` is 0 or does not fit the slab's `u32` slot numbers.
    #[error("stack capacity must be between 1 and {max}", max = u32::MAX / 4)]
    Capacity,
    /// `frame_size` cannot hold the headers plus one `tcb.mss` segment.
    #[error("frame size {frame_size} cannot hold an MSS of {mss} plus headers")]
    FrameTooSmall { frame_size: usize, mss: u16 },
}

/// Why an arriving frame was dropped (whether or not it was answered with an RST). Each is a
/// counter in [`StackCounters`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RxDrop {
    /// The frame did not parse.
    #[error("malformed frame: {0}")]
    Wire(WireError),
    /// Sent to or from a group or unspecified address: never answered (RFC 1122 §4.2.3.10).
    #[error("not for us")]
    NotForUs,
    /// No connection and no listener: answered with RST (RFC 9293 §3.10.7.1).
    #[error("no listener")]
    NoListener,
    /// An ACK to a listener whose cookie does not validate: answered with RST.
    #[error("bad SYN cookie")]
    BadCookie,
    /// A valid cookie but every slot is taken: answered with RST.
    #[error("connection slab full")]
    SlabFull,
    /// An RST for no connection: discarded (RFC 9293 §3.10.7.1/§3.10.7.2).
    #[error("RST for no connection")]
    UnknownRst,
    /// To a listener, with neither SYN nor ACK: discarded (RFC 9293 §3.10.7.2).
    #[error("neither SYN nor ACK")]
    NoSynNoAck,
    /// ICMP other than "fragmentation needed" (v4 type 3 code 4) / "packet too big" (v6 type
    /// 2): left alone (the XDP program passes such messages to the kernel; one that reaches us
    /// anyway is dropped).
    #[error("ICMP message not about path MTU")]
    IcmpIgnored,
    /// A packet-too-big message that quotes no TCP segment (too short, a fragment, not TCP).
    #[error("ICMP quotes no TCP segment")]
    IcmpNoQuote,
    /// A packet-too-big message quoting a segment of no live connection.
    #[error("ICMP for no connection")]
    IcmpUnknownFlow,
    /// The quoted sequence number is not in flight (RFC 5927 §4.1): stale or forged.
    #[error("ICMP quotes a sequence number not in flight")]
    IcmpStale,
    /// The reported MTU would not lower the connection's MSS (it is never raised).
    #[error("ICMP MTU does not lower the MSS")]
    IcmpMtuNotLower,
    /// Another copy of the last ACK of a connection that has just closed (LAST-ACK → CLOSED;
    /// a peer sends one when its application reads the last bytes, as a window update):
    /// dropped without the RST a segment of no connection gets.
    #[error("late ACK of a closed connection")]
    LateAck,
    /// A segment for a connection in TIME-WAIT after its slot was given back: a retransmitted
    /// FIN or data is ACKed, anything else dropped.
    #[error("segment for a connection in TIME-WAIT")]
    TimeWait,
}

impl RxDrop {
    /// The stack-level reasons ([`RxDrop::Wire`] is counted per [`WireError`]), in
    /// [`RxDrop::index`] order.
    pub const STACK_REASONS: [RxDrop; 13] = [
        RxDrop::NotForUs,
        RxDrop::NoListener,
        RxDrop::BadCookie,
        RxDrop::SlabFull,
        RxDrop::UnknownRst,
        RxDrop::NoSynNoAck,
        RxDrop::IcmpIgnored,
        RxDrop::IcmpNoQuote,
        RxDrop::IcmpUnknownFlow,
        RxDrop::IcmpStale,
        RxDrop::IcmpMtuNotLower,
        RxDrop::LateAck,
        RxDrop::TimeWait,
    ];

    /// Dense index into [`StackCounters::drops`]; `None` for [`RxDrop::Wire`].
    pub const fn index(self) -> Option<usize> {
        match self {
            RxDrop::Wire(_) => None,
            RxDrop::NotForUs => Some(0),
            RxDrop::NoListener => Some(1),
            RxDrop::BadCookie => Some(2),
            RxDrop::SlabFull => Some(3),
            RxDrop::UnknownRst => Some(4),
            RxDrop::NoSynNoAck => Some(5),
            RxDrop::IcmpIgnored => Some(6),
            RxDrop::IcmpNoQuote => Some(7),
            RxDrop::IcmpUnknownFlow => Some(8),
            RxDrop::IcmpStale => Some(9),
            RxDrop::IcmpMtuNotLower => Some(10),
            RxDrop::LateAck => Some(11),
            RxDrop::TimeWait => Some(12),
        }
    }

    /// A short snake_case name for metrics output.
    pub const fn name(self) -> &'static str {
        match self {
            RxDrop::Wire(e) => e.name(),
            RxDrop::NotForUs => "not_for_us",
            RxDrop::NoListener => "no_listener",
            RxDrop::BadCookie => "bad_cookie",
            RxDrop::SlabFull => "slab_full",
            RxDrop::UnknownRst => "unknown_rst",
            RxDrop::NoSynNoAck => "no_syn_no_ack",
            RxDrop::IcmpIgnored => "icmp_ignored",
            RxDrop::IcmpNoQuote => "icmp_no_quote",
            RxDrop::IcmpUnknownFlow => "icmp_unknown_flow",
            RxDrop::IcmpStale => "icmp_stale",
            RxDrop::IcmpMtuNotLower => "icmp_mtu_not_lower",
            RxDrop::LateAck => "late_ack",
            RxDrop::TimeWait => "time_wait",
        }
    }
}

/// The stack's counters (per worker; the caller sums them across workers). Per-connection
/// drops are in each [`Tcb::counters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackCounters {
    /// Frames handed to [`Stack::receive`], whatever became of them.
    pub frames_received: u64,
    /// TCP segments accepted whose checksum field held only the pseudo-header sum (a sender
    /// with TX checksum offload; see [`ChecksumMode::AcceptPartial`]).
    pub rx_partial_checksum: u64,
    /// Frames dropped by parse error, indexed by [`WireError::index`].
    pub wire_drops: [u64; WireError::ALL.len()],
    /// Frames dropped by stack reason, indexed by [`RxDrop::index`].
    pub drops: [u64; RxDrop::STACK_REASONS.len()],
    /// SYN-ACKs sent (one per SYN to a listener without a connection).
    pub syn_acks_sent: u64,
    /// Connections created by a valid cookie.
    pub connections_created: u64,
    /// Connections that reached CLOSED and gave their slot back.
    pub connections_closed: u64,
    /// RSTs sent, by the stack or by connections.
    pub rsts_sent: u64,
    /// Frames handed to `out`.
    pub frames_sent: u64,
    /// Path-MTU reductions applied to a connection (ICMP packet-too-big that passed the
    /// checks).
    pub pmtu_reductions: u64,
    /// Segments a connection wanted to send that did not fit the frame (none with a valid
    /// config); the connection retries them at its next poll.
    pub tx_errors: u64,
    /// TIME-WAIT entries of [`ClosedFlows`] overwritten by another flow before they expired.
    pub closed_evicted: u64,
    /// Gauge: orphans (connections released by the application that hold a slot in a closing
    /// state short of TIME-WAIT); at most [`StackConfig::max_orphans`].
    pub orphans: u64,
    /// Releases aborted (RST) because [`StackConfig::max_orphans`] orphans were held.
    pub orphans_dropped: u64,
    /// Orphans aborted (RST) by [`TcbConfig::orphan_timeout`]
    /// ([`CloseReason::OrphanTimeout`]).
    pub orphan_timeouts: u64,
}

impl StackCounters {
    /// The drop counter for `reason`.
    pub fn dropped(&self, reason: RxDrop) -> u64 {
        match reason {
            RxDrop::Wire(e) => self.wire_drops[e.index()],
            other => other.index().map_or(0, |i| self.drops[i]),
        }
    }

    fn count(&mut self, reason: RxDrop) {
        match reason {
            RxDrop::Wire(e) => self.wire_drops[e.index()] += 1,
            other => {
                if let Some(i) = other.index() {
                    self.drops[i] += 1;
                }
            }
        }
    }
}

/// A handle on one connection: its slot and the slot's generation when it was created, so a
/// handle outliving its connection never reaches the slot's next occupant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnId {
    slot: u32,
    generation: u32,
}

impl ConnId {
    /// The slab slot.
    pub fn slot(self) -> usize {
        self.slot as usize
    }

    /// How many connections the slot held before this one (wrapping).
    pub fn generation(self) -> u32 {
        self.generation
    }
}

/// A 4-tuple as the flow table keys it: local address, remote address (IPv4 as v4-mapped IPv6),
/// local port, remote port, big-endian.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FlowKey([u8; 36]);

impl FlowKey {
    fn new(local: SocketAddr, remote: SocketAddr) -> FlowKey {
        let mut k = [0u8; 36];
        k[0..16].copy_from_slice(&v6_octets(local.ip()));
        k[16..32].copy_from_slice(&v6_octets(remote.ip()));
        k[32..34].copy_from_slice(&local.port().to_be_bytes());
        k[34..36].copy_from_slice(&remote.port().to_be_bytes());
        FlowKey(k)
    }
}

fn v6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

/// How long a connection closed from LAST-ACK is remembered ([`ClosedFlows`]).
const RECENT_CLOSE_MS: Millis = 2_000;

/// Flows the stack no longer holds a slot for but still answers for, by 4-tuple:
/// - **TIME-WAIT** of a connection the application has released: the slot and its buffers go
///   back at once and only [`TimeWaitState`] stays for the 2·MSL (as Linux keeps a small
///   `tcp_timewait_sock`): a retransmitted FIN or data is ACKed, a pure ACK dropped, an RST ends
///   it, a new SYN starts a new connection;
/// - a connection closed from **LAST-ACK**, for [`RECENT_CLOSE_MS`]: another copy of the peer's
///   final ACK (a window update as its application reads the last bytes) is dropped instead of
///   drawing the RST a segment of no connection gets.
///
/// Direct-mapped by the flow hash, fixed size (allocated once): a collision forgets the older
/// entry (counted in [`StackCounters::closed_evicted`]), which then costs at most an RST to a
/// peer that is closing anyway — as Linux's `tcp_max_tw_buckets` overflow does.
struct ClosedFlows {
    entries: Box<[ClosedEntry]>,
}

#[derive(Clone, Copy)]
struct ClosedEntry {
    key: FlowKey,
    kind: ClosedKind,
    /// Forgotten after this.
    until_ms: Millis,
}

#[derive(Clone, Copy)]
enum ClosedKind {
    Empty,
    /// Closed from LAST-ACK: the peer's next sequence number (our RCV.NXT) and what its final
    /// ACK acknowledges (our SND.NXT).
    LastAck {
        seq: SeqNumber,
        ack: SeqNumber,
    },
    TimeWait(TimeWaitState),
}

impl ClosedFlows {
    fn new(capacity: usize) -> ClosedFlows {
        let size = (capacity * 2).clamp(1_024, 1 << 20).next_power_of_two();
        let empty = ClosedEntry {
            key: FlowKey([0; 36]),
            kind: ClosedKind::Empty,
            until_ms: 0,
        };
        ClosedFlows {
            entries: vec![empty; size].into_boxed_slice(),
        }
    }

    fn slot(&mut self, hash: u32) -> &mut ClosedEntry {
        let i = hash as usize & (self.entries.len() - 1);
        &mut self.entries[i]
    }

    /// Remembers `entry`; returns whether a live TIME-WAIT entry of another flow was evicted.
    fn remember(&mut self, hash: u32, entry: ClosedEntry, now_ms: Millis) -> bool {
        let e = self.slot(hash);
        let evicted =
            matches!(e.kind, ClosedKind::TimeWait(_)) && now_ms < e.until_ms && e.key != entry.key;
        *e = entry;
        evicted
    }

    fn lookup(&mut self, hash: u32, key: &FlowKey, now_ms: Millis) -> Option<&mut ClosedEntry> {
        let e = self.slot(hash);
        (now_ms < e.until_ms && e.key == *key && !matches!(e.kind, ClosedKind::Empty)).then_some(e)
    }
}

#[derive(Clone, Copy, Debug)]
struct FlowEntry {
    key: FlowKey,
    hash: u32,
    /// Slab slot, or [`EMPTY`].
    slot: u32,
}

/// A fixed-capacity open-addressing hash map, 4-tuple → slab slot, with linear probing and
/// backward-shift deletion (no tombstones, so lookups stay short under churn).
///
/// Invariants: `entries.len()` is a power of two at least twice the slab capacity, so the load
/// factor never exceeds 1/2 and every probe sequence ends at an empty bucket; every entry sits
/// between its home bucket and the first empty bucket after it.
///
/// The hash is SipHash-2-4 under a per-worker key rather than `tern_common::flow_hash`: every
/// flow a worker sees was steered to it by `flow_hash % workers`, so that hash's low bits are
/// correlated within a worker (constant when the worker count is a power of two), and an
/// unkeyed hash lets a client pick ports that collide. The cost is one SipHash per packet.
struct FlowTable {
    entries: Vec<FlowEntry>,
    key: CookieKey,
    len: usize,
}

impl FlowTable {
    fn new(capacity: usize, key: CookieKey) -> FlowTable {
        let size = (capacity * 2).next_power_of_two().max(2);
        FlowTable {
            entries: vec![
                FlowEntry {
                    key: FlowKey([0; 36]),
                    hash: 0,
                    slot: EMPTY,
                };
                size
            ],
            key,
            len: 0,
        }
    }

    fn hash(&self, key: &FlowKey) -> u32 {
        siphash24(&self.key, &key.0) as u32
    }

    fn mask(&self) -> usize {
        self.entries.len() - 1
    }

    /// The bucket holding `key`, if present.
    fn find(&self, key: &FlowKey, hash: u32) -> Option<usize> {
        let mask = self.mask();
        let mut i = hash as usize & mask;
        loop {
            let e = &self.entries[i];
            if e.slot == EMPTY {
                return None;
            }
            if e.hash == hash && e.key == *key {
                return Some(i);
            }
            i = (i + 1) & mask;
        }
    }

    /// The slot of `key`, whose [`hash`](Self::hash) the caller has (it is reused for the
    /// other per-flow tables and for an insert, so a segment hashes its 4-tuple once).
    fn get(&self, key: &FlowKey, hash: u32) -> Option<u32> {
        self.find(key, hash).map(|i| self.entries[i].slot)
    }

    /// Inserts a key (with its [`hash`](Self::hash)) known to be absent. The slab bounds `len`
    /// to half the table.
    fn insert(&mut self, key: FlowKey, hash: u32, slot: u32) {
        debug_assert!(
            self.len < self.entries.len() / 2,
            "flow table over its load factor"
        );
        let mask = self.mask();
        let mut i = hash as usize & mask;
        while self.entries[i].slot != EMPTY {
            i = (i + 1) & mask;
        }
        self.entries[i] = FlowEntry { key, hash, slot };
        self.len += 1;
    }

    fn remove(&mut self, key: &FlowKey) -> bool {
        let Some(mut hole) = self.find(key, self.hash(key)) else {
            return false;
        };
        let mask = self.mask();
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let e = self.entries[j];
            if e.slot == EMPTY {
                break;
            }
            let home = e.hash as usize & mask;
            // Move `e` back into the hole unless its home lies cyclically in (hole, j]: then
            // the hole is before its home and moving it would make it unreachable.
            let home_in_range = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !home_in_range {
                self.entries[hole] = e;
                hole = j;
            }
        }
        self.entries[hole].slot = EMPTY;
        self.len -= 1;
        true
    }
}

/// One live connection: the TCB plus what the stack needs to address its frames.
#[derive(Debug)]
struct Conn {
    tcb: Tcb,
    key: FlowKey,
    local: SocketAddr,
    remote: SocketAddr,
    /// The reply Ethernet header (MACs swapped from the handshake's final ACK, its VLAN tag).
    eth: EthernetRepr,
    /// The reply IP header template (addresses swapped; lengths are filled in per frame).
    ip: IpRepr,
    /// The deadline (ms) of this connection's one live wheel entry; entries with another
    /// deadline are stale and dropped when their bucket fires.
    armed_ms: Option<Millis>,
    /// Counted in [`StackCounters::orphans`] (released, holding its slot); uncounted when the
    /// slot is freed.
    orphan: bool,
}

/// One slab slot. It owns its connection's storage for the stack's whole life: a new
/// connection re-initialises `conn` in place ([`Tcb::accept_in_place`]), so the two buffers are
/// allocated once, at [`Stack::new`], never per connection.
#[derive(Debug)]
struct Slot {
    /// Bumped each time the slot is freed; a [`ConnId`] is live iff its generation matches.
    generation: u32,
    /// The connection, meaningful only while `live`; a vacant slot keeps a CLOSED TCB whose
    /// buffers wait for the next connection.
    conn: Conn,
    live: bool,
    /// Generation for which an entry sits in the ready queue (so a connection is queued once).
    ready_for: Option<u32>,
    /// An entry for the current connection sits in the dirty list.
    dirty: bool,
}

impl Slot {
    fn vacant(config: TcbConfig, tx: Ring, rx: Ring) -> Slot {
        Slot {
            generation: 0,
            conn: Conn {
                tcb: Tcb::vacant_with(config, tx, rx),
                key: FlowKey([0; 36]),
                local: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
                remote: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
                eth: EthernetRepr {
                    src_addr: EthernetAddress::default(),
                    dst_addr: EthernetAddress::default(),
                    vlan: None,
                    ethertype: EtherType::IPV4,
                },
                ip: IpRepr::V4(Ipv4Repr {
                    src_addr: Ipv4Addr::UNSPECIFIED,
                    dst_addr: Ipv4Addr::UNSPECIFIED,
                    protocol: IP_PROTO_TCP,
                    payload_len: 0,
                    ttl: DEFAULT_TTL,
                    dscp_ecn: 0,
                    ident: 0,
                    dont_frag: true,
                }),
                armed_ms: None,
                orphan: false,
            },
            live: false,
            ready_for: None,
            dirty: false,
        }
    }

    fn conn(&self) -> Option<&Conn> {
        self.live.then_some(&self.conn)
    }

    fn conn_mut(&mut self) -> Option<&mut Conn> {
        if self.live {
            Some(&mut self.conn)
        } else {
            None
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct TimerEntry {
    slot: u32,
    generation: u32,
    deadline_ms: Millis,
}

/// A server-side TCP stack for one worker. See the module documentation.
pub struct Stack {
    tcb_config: TcbConfig,
    rx_checksum: ChecksumMode,
    /// Raises [`Stack::checksum_alarm`] when most arriving frames fail their checksum.
    checksum_watch: ChecksumWatch,
    /// The window shift our SYN-ACKs offer: the smallest that lets the receive buffer be
    /// advertised whole (RFC 7323 §2.3, at most 14).
    our_wscale: u8,
    listeners: Vec<SocketAddr>,
    jar: CookieJar,
    /// The slots made so far: made on first use (up to `capacity`, into reserved space: no
    /// allocation), so that a stack sized for a million connections holds about 1 KiB less
    /// per slot it never used.
    slots: Vec<Slot>,
    /// The most slots there will be.
    capacity: usize,
    /// Buffers for the slots not made yet, the next one last (cut from the arena at setup:
    /// their pages are not resident until written).
    rings: Vec<(Ring, Ring)>,
    /// Free slots; `free.len() + live connections == slots.len()`.
    free: Vec<u32>,
    flows: FlowTable,
    closed: ClosedFlows,
    wheel: Wheel<TimerEntry>,
    /// Connections due in this `poll` (scratch, capacity = slots).
    due: Vec<TimerEntry>,
    /// Connections with news for the application (accepted, data, space, state change, gone).
    ready: VecDeque<ConnId>,
    /// Connections the application touched through [`Stack::conn_mut`]; flushed by `poll`.
    dirty: Vec<ConnId>,
    /// The frame being built; `out` gets a view of it.
    tx: Vec<u8>,
    /// [`StackConfig::max_orphans`].
    max_orphans: usize,
    counters: StackCounters,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("capacity", &self.capacity)
            .field("connections", &self.flows.len)
            .field("listeners", &self.listeners)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl Stack {
    /// Builds a stack and allocates everything its per-packet path uses.
    pub fn new(config: StackConfig<'_>, now: Instant) -> Result<Stack, ConfigError> {
        if config.capacity == 0 || config.capacity > (u32::MAX / 4) as usize {
            return Err(ConfigError::Capacity);
        }
        if config.frame_size < MAX_HEADERS + usize::from(config.tcb.mss) {
            return Err(ConfigError::FrameTooSmall {
                frame_size: config.frame_size,
                mss: config.tcb.mss,
            });
        }
        let our_wscale = window_scale_for(config.tcb.recv_buffer);
        Ok(Stack {
            tcb_config: config.tcb,
            rx_checksum: config.rx_checksum,
            checksum_watch: ChecksumWatch::default(),
            our_wscale,
            listeners: config.listeners.to_vec(),
            jar: CookieJar::with_mss(config.cookie_keys[0], config.cookie_keys[1], config.tcb.mss),
            slots: Vec::with_capacity(config.capacity),
            capacity: config.capacity,
            rings: {
                // One arena for every slot's buffers: no allocation per slot, and no page of a
                // buffer is resident before bytes are written to it.
                let mut arena = RingArena::new(
                    config.capacity,
                    config.tcb.send_buffer,
                    config.tcb.recv_buffer,
                );
                let mut rings: Vec<(Ring, Ring)> = (0..config.capacity)
                    .map_while(|_| arena.next_pair())
                    .collect();
                // Popped from the end: slot 0's first.
                rings.reverse();
                rings
            },
            free: Vec::with_capacity(config.capacity),
            flows: FlowTable::new(config.capacity, config.flow_key),
            closed: ClosedFlows::new(config.capacity),
            wheel: Wheel::new(WHEEL_TICK_MS, WHEEL_BUCKETS, to_ms_floor(now)),
            due: Vec::with_capacity(config.capacity),
            ready: VecDeque::with_capacity(config.capacity * 2),
            dirty: Vec::with_capacity(config.capacity * 2),
            tx: vec![0; config.frame_size],
            max_orphans: config.max_orphans,
            counters: StackCounters::default(),
        })
    }

    /// Slab capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// A free slot: a freed one (the most recently freed first), else a new one while fewer
    /// than `capacity` were made.
    fn take_slot(&mut self) -> Option<u32> {
        if let Some(slot) = self.free.pop() {
            return Some(slot);
        }
        let (tx, rx) = self.rings.pop()?;
        let slot = self.slots.len() as u32;
        self.slots.push(Slot::vacant(self.tcb_config, tx, rx));
        Some(slot)
    }

    /// Slots made so far (each holds its TCB, about 1 KiB, from its first connection on).
    pub fn slots_made(&self) -> usize {
        self.slots.len()
    }

    /// Live connections (flow-table entries).
    pub fn len(&self) -> usize {
        self.flows.len
    }

    /// Whether no connection is live.
    pub fn is_empty(&self) -> bool {
        self.flows.len == 0
    }

    /// The counters.
    pub fn counters(&self) -> &StackCounters {
        &self.counters
    }

    /// An alarm when most frames received since the last judgement failed their checksum,
    /// at most one per [`ALARM_EVERY`](super::checksum_alarm::ALARM_EVERY); for the worker to
    /// log from its housekeeping (see [`ChecksumWatch`]).
    pub fn checksum_alarm(&mut self, now: Instant) -> Option<ChecksumAlarm> {
        let bad = self.counters.dropped(RxDrop::Wire(WireError::BadChecksum));
        self.checksum_watch
            .check(self.counters.frames_received, bad, self.rx_checksum, now)
    }

    /// Makes `key` the cookie-signing key; the current one keeps validating (see
    /// [`CookieJar::rotate`]).
    pub fn rotate_cookie_key(&mut self, key: CookieKey) {
        self.jar.rotate(key);
    }

    /// Stops accepting (drain): from now on a SYN, or a cookie ACK, to a former listener is
    /// answered with RST like any segment for no listener. Live connections are not affected.
    pub fn close_listeners(&mut self) {
        self.listeners.clear();
    }

    /// Whether every live connection is in TIME-WAIT (nothing left to deliver either way). Scans
    /// the slab: for the drain, not the per-packet path.
    pub fn only_time_wait(&self) -> bool {
        self.slots
            .iter()
            .filter_map(|s| s.conn())
            .all(|c| c.tcb.state() == State::TimeWait)
    }

    /// The connection behind `id`, if it is still live.
    pub fn conn(&self, id: ConnId) -> Option<&Tcb> {
        self.live(id).map(|c| &c.tcb)
    }

    /// The connection behind `id` for `send`/`recv`/`close`/`abort`. What that causes to be sent
    /// goes out at the next [`poll`](Self::poll).
    pub fn conn_mut(&mut self, id: ConnId) -> Option<&mut Tcb> {
        let slot = self.slots.get_mut(id.slot as usize)?;
        if slot.generation != id.generation || !slot.live {
            return None;
        }
        if !slot.dirty {
            slot.dirty = true;
            self.dirty.push(id);
        }
        slot.conn_mut().map(|c| &mut c.tcb)
    }

    /// `(local, remote)` addresses of a live connection.
    pub fn endpoints(&self, id: ConnId) -> Option<(SocketAddr, SocketAddr)> {
        self.live(id).map(|c| (c.local, c.remote))
    }

    /// Every live connection, in slot order (O(capacity): for the application's housekeeping,
    /// not the per-packet path).
    pub fn connections(&self) -> impl Iterator<Item = ConnId> + '_ {
        self.slots.iter().enumerate().filter_map(|(i, s)| {
            s.conn().map(|_| ConnId {
                slot: i as u32,
                generation: s.generation,
            })
        })
    }

    /// The next connection with news for the application: newly accepted, readable, send space
    /// freed, state changed, or gone (then [`conn`](Self::conn) returns `None`). Each
    /// connection is queued at most once until popped.
    pub fn pop_ready(&mut self) -> Option<ConnId> {
        let id = self.ready.pop_front()?;
        let slot = &mut self.slots[id.slot as usize];
        if slot.ready_for == Some(id.generation) {
            slot.ready_for = None;
        }
        Some(id)
    }

    fn live(&self, id: ConnId) -> Option<&Conn> {
        let slot = self.slots.get(id.slot as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.conn()
    }

    /// Handles one arriving frame at `now`; every frame it sends in reply goes through `out`
    /// before it returns. `Err` says why the frame was dropped (already counted); an RST may
    /// still have been sent for it.
    pub fn receive(
        &mut self,
        frame: &[u8],
        now: Instant,
        out: &mut impl FnMut(&[u8]),
    ) -> Result<(), RxDrop> {
        self.receive_into(frame, now, &mut Copying(out))
    }

    /// [`receive`](Self::receive) with frames built in `out`'s buffers.
    pub fn receive_into(
        &mut self,
        frame: &[u8],
        now: Instant,
        out: &mut impl FrameOut,
    ) -> Result<(), RxDrop> {
        self.counters.frames_received += 1;
        let result = self.receive_inner(frame, now, out);
        if let Err(reason) = result {
            self.counters.count(reason);
        }
        result
    }

    fn receive_inner(
        &mut self,
        frame: &[u8],
        now: Instant,
        out: &mut impl FrameOut,
    ) -> Result<(), RxDrop> {
        let rx = match parse_tcp_frame(frame, self.rx_checksum) {
            Ok(rx) => rx,
            // Not TCP: maybe ICMP about one of our flows (the only other thing steered here).
            Err(WireError::UnsupportedProtocol) => return self.icmp(frame, now, out),
            Err(e) => return Err(RxDrop::Wire(e)),
        };
        if rx.checksum == ChecksumVerdict::Partial {
            self.counters.rx_partial_checksum += 1;
        }
        let local = SocketAddr::new(rx.ip.dst_addr(), rx.tcp.dst_port);
        let remote = SocketAddr::new(rx.ip.src_addr(), rx.tcp.src_port);
        let key = FlowKey::new(local, remote);
        let hash = self.flows.hash(&key);
        if let Some(slot) = self.flows.get(&key, hash) {
            self.segment_for_conn(slot, &rx, now, out);
            return Ok(());
        }
        if !addressed_to_us(&rx) {
            return Err(RxDrop::NotForUs);
        }
        if let Some(done) = self.closed_flow_segment(&rx, &key, hash, now, out) {
            return done;
        }
        let tcp = &rx.tcp;
        // RFC 9293 §3.10.7.1 / §3.10.7.2: an RST for no connection is discarded.
        if tcp.flags.contains(TcpFlags::RST) {
            return Err(RxDrop::UnknownRst);
        }
        if !self.is_listener(local) {
            // RFC 9293 §3.10.7.1 CLOSED: answer with RST.
            self.send_reset(&rx, out);
            return Err(RxDrop::NoListener);
        }
        let tuple = CookieTuple { local, remote };
        match tcp.ack {
            // RFC 9293 §3.10.7.2 LISTEN, second check: any ACK (a SYN-ACK too) is bad here
            // unless it completes a cookie handshake.
            Some(ack) => {
                if tcp.flags.contains(TcpFlags::SYN) {
                    self.send_reset(&rx, out);
                    return Err(RxDrop::BadCookie);
                }
                self.cookie_ack(&rx, &tuple, ack, (key, hash), now, out)
            }
            // Third check: a SYN gets a SYN-ACK, statelessly.
            None if tcp.flags.contains(TcpFlags::SYN) => {
                self.syn_ack(&rx, &tuple, now, out);
                Ok(())
            }
            // Fourth: "Any other control or text-bearing segment ... drop it and return".
            None => Err(RxDrop::NoSynNoAck),
        }
    }

    /// An ICMP frame: path-MTU discovery (RFC 1191 / RFC 8201) for the connection whose segment
    /// it quotes, if that segment is in flight (RFC 5927 §4.1); everything else is dropped by
    /// reason. The flow is found by the quoted 4-tuple, which is ours as sent (source = local).
    fn icmp(&mut self, frame: &[u8], now: Instant, out: &mut impl FrameOut) -> Result<(), RxDrop> {
        let f = parse_icmp_frame(frame, self.rx_checksum).map_err(RxDrop::Wire)?;
        if !f.icmp.is_packet_too_big() {
            return Err(RxDrop::IcmpIgnored);
        }
        let quoted = f.icmp.quoted.ok_or(RxDrop::IcmpNoQuote)?;
        let key = FlowKey::new(quoted.src, quoted.dst);
        let slot = self
            .flows
            .get(&key, self.flows.hash(&key))
            .ok_or(RxDrop::IcmpUnknownFlow)?;
        // The payload of a full segment at this MTU without options, never below the family's
        // minimum (IPv4: 576 − 40, RFC 9293 §3.7.1's default; IPv6: 1280 − 60, RFC 8201 §4
        // "MUST NOT reduce ... below the IPv6 minimum link MTU"). An IPv4 router from before
        // RFC 1191 reports 0, which lands on the floor.
        let (headers, floor) = if f.icmp.v6 { (60, 1220) } else { (40, 536) };
        let path_mss = f.icmp.mtu.saturating_sub(headers).max(floor);
        let Some(conn) = self.slots[slot as usize].conn_mut() else {
            debug_assert!(false, "flow table points at an empty slot");
            return Err(RxDrop::IcmpUnknownFlow);
        };
        let before = Snapshot::of(&conn.tcb);
        match conn.tcb.on_packet_too_big(now, quoted.seq, path_mss) {
            Ok(_) => {
                self.counters.pmtu_reductions += 1;
                // Resend the flight in the new size now.
                self.after_activity(slot, before, now, out);
                Ok(())
            }
            Err(PmtuIgnored::NotInFlight) => Err(RxDrop::IcmpStale),
            Err(PmtuIgnored::NotSmaller) => Err(RxDrop::IcmpMtuNotLower),
        }
    }

    fn is_listener(&self, local: SocketAddr) -> bool {
        self.listeners.iter().any(|l| {
            l.port() == local.port()
                && (l.ip() == local.ip()
                    || (l.ip().is_unspecified() && l.is_ipv4() == local.is_ipv4()))
        })
    }

    /// A segment for a live connection: process it, send its replies, re-arm its timer, tell
    /// the application, free the slot if it closed.
    fn segment_for_conn(
        &mut self,
        slot: u32,
        rx: &TcpFrame<'_>,
        now: Instant,
        out: &mut impl FrameOut,
    ) {
        let Some(conn) = self.slots[slot as usize].conn_mut() else {
            debug_assert!(false, "flow table points at an empty slot");
            return;
        };
        let before = Snapshot::of(&conn.tcb);
        // Drops inside the connection are counted in its own counters.
        let _ = conn.tcb.process(now, &rx.tcp, rx.payload);
        self.after_activity(slot, before, now, out);
    }

    /// Common tail of every event on a connection.
    fn after_activity(
        &mut self,
        slot: u32,
        before: Snapshot,
        now: Instant,
        out: &mut impl FrameOut,
    ) {
        let s = &mut self.slots[slot as usize];
        let generation = s.generation;
        let Some(conn) = s.conn_mut() else {
            return;
        };
        transmit(conn, &mut self.tx, now, &mut self.counters, out);
        if let Some(deadline) = conn.tcb.next_timer() {
            let ms = to_ms_ceil(deadline);
            if conn.armed_ms.is_none_or(|armed| ms < armed) {
                conn.armed_ms = Some(ms);
                self.wheel.insert(
                    ms,
                    TimerEntry {
                        slot,
                        generation,
                        deadline_ms: ms,
                    },
                );
            }
        }
        let after = Snapshot::of(&conn.tcb);
        let closed = after.state == State::Closed;
        if closed && conn.tcb.close_reason() == Some(CloseReason::OrphanTimeout) {
            self.counters.orphan_timeouts += 1;
        }
        let now_ms = to_ms_floor(now);
        let remembered = if closed
            && before.state == State::LastAck
            && conn.tcb.close_reason() == Some(CloseReason::Normal)
        {
            Some(ClosedEntry {
                key: conn.key,
                kind: ClosedKind::LastAck {
                    seq: conn.tcb.rcv_nxt(),
                    ack: conn.tcb.snd_nxt(),
                },
                until_ms: now_ms + RECENT_CLOSE_MS,
            })
        } else if conn.tcb.is_released() {
            // TIME-WAIT of a connection nobody reads any more: keep only what TIME-WAIT needs
            // and give the slot (and its buffers) back now.
            conn.tcb.time_wait_state().map(|tw| ClosedEntry {
                key: conn.key,
                kind: ClosedKind::TimeWait(tw),
                until_ms: now_ms + conn.tcb.time_wait_duration().as_millis(),
            })
        } else {
            None
        };
        let to_time_wait = matches!(
            remembered,
            Some(ClosedEntry {
                kind: ClosedKind::TimeWait(_),
                ..
            })
        );
        if let Some(entry) = remembered {
            let hash = self.flows.hash(&entry.key);
            if self.closed.remember(hash, entry, now_ms) {
                self.counters.closed_evicted += 1;
            }
        }
        if before.news(&after) {
            self.notify(ConnId { slot, generation });
        }
        if closed || to_time_wait {
            self.free_slot(slot);
        }
    }

    fn notify(&mut self, id: ConnId) {
        let slot = &mut self.slots[id.slot as usize];
        if slot.ready_for != Some(id.generation) {
            slot.ready_for = Some(id.generation);
            self.ready.push_back(id);
        }
    }

    fn free_slot(&mut self, slot: u32) {
        let s = &mut self.slots[slot as usize];
        if !s.live {
            return;
        }
        // The TCB stays in the slot (CLOSED, buffers kept) for the next connection.
        s.live = false;
        s.generation = s.generation.wrapping_add(1);
        s.dirty = false;
        if s.conn.orphan {
            s.conn.orphan = false;
            debug_assert!(self.counters.orphans > 0, "orphan gauge out of step");
            self.counters.orphans = self.counters.orphans.saturating_sub(1);
        }
        let removed = self.flows.remove(&s.conn.key);
        debug_assert!(removed, "a live connection is in the flow table");
        self.free.push(slot);
        self.counters.connections_closed += 1;
    }

    /// Stateless SYN-ACK (RFC 4987 §3.6): the cookie is our ISN; MSS always, window scale and
    /// SACK-permitted only when timestamps can carry them back to us.
    fn syn_ack(
        &mut self,
        rx: &TcpFrame<'_>,
        tuple: &CookieTuple,
        now: Instant,
        out: &mut impl FrameOut,
    ) {
        let syn = &rx.tcp;
        let peer = syn.options;
        // RFC 9293 §3.7.1: without the option, assume 536 (IPv4) or 1220 (IPv6, RFC 8200 §5).
        let default_mss = if tuple.remote.is_ipv4() { 536 } else { 1220 };
        // RFC 7323 §7.1: a per-connection TSval offset; the connection gets the same one back
        // from the cookie check.
        let ts_now = peer
            .timestamps
            .map(|_| now.ts_millis().wrapping_add(self.jar.ts_offset(tuple)));
        let (isn, tsval) = self.jar.make(
            tuple,
            syn.seq.0,
            peer.mss.unwrap_or(default_mss),
            peer.window_scale,
            peer.sack_permitted,
            ts_now,
            now,
        );
        let carried = tsval.is_some();
        let options = TcpOptions {
            mss: Some(self.tcb_config.mss),
            // RFC 7323 §2.2: offer a shift only to a SYN that offered one.
            window_scale: (carried && peer.window_scale.is_some()).then_some(self.our_wscale),
            sack_permitted: carried && peer.sack_permitted,
            timestamps: tsval
                .zip(peer.timestamps)
                .map(|(tsval, theirs)| Timestamps {
                    tsval,
                    tsecr: theirs.tsval,
                }),
            ..TcpOptions::default()
        };
        let repr = TcpRepr {
            src_port: syn.dst_port,
            dst_port: syn.src_port,
            seq: SeqNumber(isn),
            ack: Some(syn.seq + 1),
            flags: TcpFlags::SYN,
            // RFC 7323 §2.2: the window of a SYN-ACK is never scaled.
            window: u16::try_from(self.tcb_config.recv_buffer).unwrap_or(u16::MAX),
            options,
            payload_len: 0,
        };
        if self.emit_reply(rx, &repr, out) {
            self.counters.syn_acks_sent += 1;
        }
    }

    /// The handshake's final ACK for a flow we have no state for: validate the cookie, then
    /// create the connection (RFC 4987 §3.6).
    fn cookie_ack(
        &mut self,
        rx: &TcpFrame<'_>,
        tuple: &CookieTuple,
        ack: SeqNumber,
        (key, hash): (FlowKey, u32),
        now: Instant,
        out: &mut impl FrameOut,
    ) -> Result<(), RxDrop> {
        let seg = &rx.tcp;
        let tsecr = seg.options.timestamps.map(|t| t.tsecr);
        let iss = ack - 1;
        let irs = seg.seq - 1;
        let Ok(negotiated) = self.jar.check(tuple, iss.0, irs.0, tsecr, now) else {
            self.send_reset(rx, out);
            return Err(RxDrop::BadCookie);
        };
        let Some(slot) = self.take_slot() else {
            self.send_reset(rx, out);
            return Err(RxDrop::SlabFull);
        };
        let hs = Handshake {
            local_port: tuple.local.port(),
            remote_port: tuple.remote.port(),
            iss,
            irs,
            peer_mss: negotiated.mss,
            window_scale: negotiated.ws.map(|peer| (peer, self.our_wscale)),
            sack_permitted: negotiated.sack_perm,
            timestamps: tsecr.map(|_| negotiated.ts_offset),
            peer_window: seg.window,
        };
        let s = &mut self.slots[slot as usize];
        // In place: the slot's buffers are reused, nothing is allocated.
        s.conn.tcb.accept_in_place(&hs, seg, rx.payload, now);
        s.conn.key = key;
        s.conn.local = tuple.local;
        s.conn.remote = tuple.remote;
        s.conn.eth = reply_eth(&rx.eth);
        s.conn.ip = reply_ip(&rx.ip);
        s.conn.armed_ms = None;
        s.conn.orphan = false;
        s.live = true;
        self.flows.insert(key, hash, slot);
        self.counters.connections_created += 1;
        // A new connection is news whatever its state.
        let generation = self.slots[slot as usize].generation;
        self.notify(ConnId { slot, generation });
        self.after_activity(
            slot,
            Snapshot {
                state: State::Closed,
                recv_queue: 0,
                send_queue: 0,
            },
            now,
            out,
        );
        Ok(())
    }

    /// RST for a segment that belongs to no connection (RFC 9293 §3.10.7.1): if it had an ACK,
    /// `<SEQ=SEG.ACK><CTL=RST>`, else `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>`. Callers have
    /// already excluded RSTs and group addresses.
    fn send_reset(&mut self, rx: &TcpFrame<'_>, out: &mut impl FrameOut) {
        let seg = &rx.tcp;
        let (seq, ack) = match seg.ack {
            Some(ack) => (ack, None),
            None => (SeqNumber(0), Some(seg.seq + seg.segment_len() as u32)),
        };
        let repr = TcpRepr {
            src_port: seg.dst_port,
            dst_port: seg.src_port,
            seq,
            ack,
            flags: TcpFlags::RST,
            window: 0,
            options: TcpOptions::default(),
            payload_len: 0,
        };
        if self.emit_reply(rx, &repr, out) {
            self.counters.rsts_sent += 1;
        }
    }

    /// A segment for a flow in [`ClosedFlows`]: handled there (`Some`), or `None` to go on as a
    /// segment of no connection (a new SYN, an ACK that is not a late copy).
    fn closed_flow_segment(
        &mut self,
        rx: &TcpFrame<'_>,
        key: &FlowKey,
        hash: u32,
        now: Instant,
        out: &mut impl FrameOut,
    ) -> Option<Result<(), RxDrop>> {
        let now_ms = to_ms_floor(now);
        let entry = self.closed.lookup(hash, key, now_ms)?;
        let tcp = &rx.tcp;
        match entry.kind {
            ClosedKind::Empty => None,
            ClosedKind::LastAck { seq, ack } => {
                let late_copy = tcp.flags == TcpFlags::NONE
                    && rx.payload.is_empty()
                    && tcp.seq == seq
                    && tcp.ack == Some(ack);
                late_copy.then_some(Err(RxDrop::LateAck))
            }
            ClosedKind::TimeWait(tw) => {
                if tcp.flags.contains(TcpFlags::RST) {
                    // The peer is done with it too (Linux ends TIME-WAIT on an RST as well).
                    entry.kind = ClosedKind::Empty;
                    return Some(Err(RxDrop::TimeWait));
                }
                if tcp.flags.contains(TcpFlags::SYN) && tcp.ack.is_none() {
                    // A new connection on the same 4-tuple: answered as any SYN (a cookie
                    // SYN-ACK; its ISN is unrelated to the old connection's sequence space).
                    entry.kind = ClosedKind::Empty;
                    return None;
                }
                let fin = tcp.flags.contains(TcpFlags::FIN);
                if fin {
                    // RFC 9293 §3.10.7.4: a retransmitted FIN restarts the 2·MSL.
                    entry.until_ms = now_ms + self.tcb_config.time_wait.as_millis();
                }
                if fin || !rx.payload.is_empty() {
                    // Our last ACK was lost, or an old segment: ACK with what we have.
                    let repr = tw.ack(tcp.dst_port, tcp.src_port, now);
                    self.emit_reply(rx, &repr, out);
                }
                Some(Err(RxDrop::TimeWait))
            }
        }
    }

    /// Emits a payload-less segment back along the path `rx` came on.
    fn emit_reply(&mut self, rx: &TcpFrame<'_>, repr: &TcpRepr, out: &mut impl FrameOut) -> bool {
        let eth = reply_eth(&rx.eth);
        let ip = reply_ip(&rx.ip);
        match emit_tcp_frame_headers(&mut self.tx, &eth, &ip, repr, ChecksumMode::Compute) {
            Ok(n) => {
                self.counters.frames_sent += 1;
                out.send(&self.tx[..n]);
                true
            }
            Err(_) => {
                self.counters.tx_errors += 1;
                false
            }
        }
    }

    /// When [`poll`](Self::poll) should next run: now if the application touched a connection
    /// since the last poll, else the earliest timer (possibly early, never late), else `None`.
    /// For a worker deciding how long it may sleep; O(wheel buckets).
    pub fn next_poll(&self) -> Option<Instant> {
        if !self.dirty.is_empty() {
            return Some(Instant::ZERO);
        }
        self.wheel.next_due().map(Instant::from_millis)
    }

    /// Whether [`poll`](Self::poll) has work at `now`: the application touched a connection, or
    /// a timer bucket is due. Cheap enough for every loop turn (unlike [`next_poll`](Self::next_poll)).
    pub fn poll_due(&self, now: Instant) -> bool {
        !self.dirty.is_empty() || self.wheel.due(to_ms_floor(now))
    }

    /// Runs the timers due at `now` and sends what the application queued through
    /// [`conn_mut`](Self::conn_mut) since the last poll; frees connections that reached CLOSED.
    /// Cost: the connections touched or due, not the connections held.
    pub fn poll(&mut self, now: Instant, out: &mut impl FnMut(&[u8])) {
        self.poll_into(now, &mut Copying(out))
    }

    /// [`poll`](Self::poll) with frames built in `out`'s buffers.
    pub fn poll_into(&mut self, now: Instant, out: &mut impl FrameOut) {
        // Application-side changes first: a `close` or `send` wants its segments out now.
        let mut i = 0;
        while i < self.dirty.len() {
            let id = self.dirty[i];
            i += 1;
            let s = &mut self.slots[id.slot as usize];
            if s.generation != id.generation {
                continue;
            }
            s.dirty = false;
            let Some(conn) = s.conn_mut() else {
                continue;
            };
            // The application saw the connection as it is now; only what this flush changes
            // is news.
            let before = Snapshot::of(&conn.tcb);
            // A release only happens through `conn_mut`, so every release is found here,
            // normally before its FIN goes out (a segment arriving between the release and
            // this poll sends the FIN first; an abort over the cap then follows it).
            if conn.tcb.is_released()
                && !conn.orphan
                && !matches!(conn.tcb.state(), State::TimeWait | State::Closed)
            {
                if self.counters.orphans >= self.max_orphans as u64 {
                    // Linux's tcp_max_orphans: over the cap, the release becomes an abort.
                    conn.tcb.abort();
                    self.counters.orphans_dropped += 1;
                } else {
                    conn.orphan = true;
                    self.counters.orphans += 1;
                }
            }
            self.after_activity(id.slot, before, now, out);
        }
        self.dirty.clear();

        let now_ms = to_ms_floor(now);
        let slots = &mut self.slots;
        let due = &mut self.due;
        self.wheel.expire(now_ms, |wheel, entry| {
            let Some(conn) = slots
                .get_mut(entry.slot as usize)
                .filter(|s| s.generation == entry.generation)
                .and_then(|s| s.conn_mut())
            else {
                return;
            };
            if conn.armed_ms != Some(entry.deadline_ms) {
                return; // Stale: a later insert superseded this entry.
            }
            match conn.tcb.next_timer() {
                Some(deadline) if deadline <= now => due.push(entry),
                // Lazy re-scheduling: the deadline moved out since this entry was made.
                Some(deadline) => {
                    let ms = to_ms_ceil(deadline).max(now_ms + 1);
                    conn.armed_ms = Some(ms);
                    wheel.insert(
                        ms,
                        TimerEntry {
                            deadline_ms: ms,
                            ..entry
                        },
                    );
                }
                None => conn.armed_ms = None,
            }
        });
        let mut i = 0;
        while i < self.due.len() {
            let entry = self.due[i];
            i += 1;
            let Some(conn) = self.slots[entry.slot as usize].conn_mut() else {
                continue;
            };
            conn.armed_ms = None;
            let before = Snapshot::of(&conn.tcb);
            conn.tcb.on_timer(now);
            self.after_activity(entry.slot, before, now, out);
        }
        self.due.clear();
    }
}

/// What the application cares about in a connection, compared before and after an event.
#[derive(Clone, Copy, Debug)]
struct Snapshot {
    state: State,
    recv_queue: usize,
    send_queue: usize,
}

impl Snapshot {
    fn of(tcb: &Tcb) -> Snapshot {
        Snapshot {
            state: tcb.state(),
            recv_queue: tcb.recv_queue(),
            send_queue: tcb.send_queue(),
        }
    }

    /// New data to read, send space freed, or a state change (FIN, close, reset).
    fn news(&self, after: &Snapshot) -> bool {
        after.state != self.state
            || after.recv_queue > self.recv_queue
            || after.send_queue < self.send_queue
    }
}

/// Sends what `conn` has due into `out`, each frame built in a buffer `out` lends (`buf` is the
/// scratch for destinations without buffers of their own): the payload is copied from the send
/// ring once, its checksum summed in the same pass ([`checksum::copy_and_sum`]).
fn transmit(
    conn: &mut Conn,
    buf: &mut [u8],
    now: Instant,
    counters: &mut StackCounters,
    out: &mut impl FrameOut,
) {
    let eth = conn.eth;
    let ip = conn.ip;
    let result = conn.tcb.poll_transmit(now, |repr, payload| {
        out.build(buf, |frame| {
            let start = tcp_payload_offset(&eth, &ip, repr);
            let dst = frame
                .get_mut(start..start + payload.len())
                .ok_or(WireError::BufferTooSmall)?;
            let (a, b) = dst.split_at_mut(payload.first.len().min(dst.len()));
            let sum = checksum::combine(&[
                checksum::copy_and_sum(a, payload.first),
                checksum::at_offset(checksum::copy_and_sum(b, payload.second), a.len()),
            ]);
            emit_tcp_frame_headers_summed(frame, &eth, &ip, repr, sum)
        })?;
        counters.frames_sent += 1;
        if repr.flags.contains(TcpFlags::RST) {
            counters.rsts_sent += 1;
        }
        Ok::<(), WireError>(())
    });
    if result.is_err() {
        counters.tx_errors += 1;
    }
}

/// The Ethernet header of a reply: addresses swapped, same VLAN.
fn reply_eth(rx: &EthernetRepr) -> EthernetRepr {
    EthernetRepr {
        src_addr: rx.dst_addr,
        dst_addr: rx.src_addr,
        ..*rx
    }
}

/// The window-scale shift the stack offers for a receive buffer of `recv_buffer` bytes: the
/// least that lets the window field cover the buffer (at most 14, RFC 7323 §2.3). The XDP
/// program's SYN-ACKs offer the same.
pub fn window_scale_for(recv_buffer: usize) -> u8 {
    let mut shift = 0u8;
    while shift < 14 && (recv_buffer >> shift) > usize::from(u16::MAX) {
        shift += 1;
    }
    shift
}

/// The IP header of a reply: addresses swapped, our TTL, DF set (we never fragment).
fn reply_ip(rx: &IpRepr) -> IpRepr {
    match rx {
        IpRepr::V4(r) => IpRepr::V4(Ipv4Repr {
            src_addr: r.dst_addr,
            dst_addr: r.src_addr,
            protocol: IP_PROTO_TCP,
            payload_len: 0,
            ttl: DEFAULT_TTL,
            dscp_ecn: 0,
            ident: 0,
            dont_frag: true,
        }),
        IpRepr::V6(r) => IpRepr::V6(Ipv6Repr {
            src_addr: r.dst_addr,
            dst_addr: r.src_addr,
            next_header: IP_PROTO_TCP,
            payload_len: 0,
            hop_limit: DEFAULT_TTL,
            traffic_class: 0,
            flow_label: 0,
        }),
    }
}

/// Whether a frame may be answered: unicast at both layers, a real source (RFC 1122
/// §4.2.3.10: no RST or SYN-ACK to a broadcast or multicast address).
fn addressed_to_us(rx: &TcpFrame<'_>) -> bool {
    if rx.eth.dst_addr.is_multicast() || rx.eth.src_addr.is_multicast() {
        return false;
    }
    match rx.ip {
        IpRepr::V4(r) => unicast_v4(r.src_addr) && unicast_v4(r.dst_addr),
        IpRepr::V6(r) => unicast_v6(r.src_addr) && unicast_v6(r.dst_addr),
    }
}

fn unicast_v4(a: Ipv4Addr) -> bool {
    !(a.is_multicast() || a.is_broadcast() || a.is_unspecified())
}

fn unicast_v6(a: Ipv6Addr) -> bool {
    !(a.is_multicast() || a.is_unspecified())
}

/// Wheel time, rounded down: a poll at `now` fires everything due at or before it.
fn to_ms_floor(t: Instant) -> Millis {
    t.as_micros() / 1_000
}

/// A deadline in wheel time, rounded up so nothing fires early.
fn to_ms_ceil(t: Instant) -> Millis {
    t.as_micros().div_ceil(1_000)
}

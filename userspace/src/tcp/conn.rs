//! One server-side TCP connection, sans-IO: the transmission control block ([`Tcb`]) from the
//! moment a SYN cookie validates (RFC 4987 §3.6: the handshake's final ACK creates the state, so
//! a `Tcb` starts in ESTABLISHED) until CLOSED.
//!
//! Owns the RFC 9293 state machine for the synchronized states (§3.10.7.4 segment arrival for
//! ESTABLISHED, FIN-WAIT-1/2, CLOSE-WAIT, CLOSING, LAST-ACK, TIME-WAIT), the send and receive
//! buffers ([`Ring`], allocated once), the advertised window (RFC 7323 §2.3 scaling, receiver
//! silly-window avoidance per RFC 9293 §3.8.6.2.2), RST and SYN validation with challenge ACKs
//! (RFC 5961 §3, §4, §5, rate-limited per §7), PAWS (RFC 7323 §5), delayed ACKs (RFC 9293
//! §3.8.6.3, RFC 1122 §4.2.3.2), Nagle (RFC 9293 §3.7.4, off by default), retransmission (RFC 6298
//! via [`RttEstimator`]), fast retransmit / NewReno recovery (RFC 5681 §3.2, RFC 6582) through
//! [`Cc`], SACK generation (RFC 2018 via [`Reassembly`]) and a simple SACK scoreboard for
//! retransmission (with RFC 6675's loss detection: an ACK whose SACK blocks cover new data is a
//! duplicate ACK even if it carries data or a window change — §2 — so a connection sending
//! both ways detects loss without an RTO; and DupThresh·SMSS bytes SACKed above SND.UNA mark
//! it lost — §4 IsLost — even before three duplicates; in the seeded simulation in the tests, 1 MiB
//! each way, the six 5 %-loss cells went from 3.2–11.8 s to 1.8–9.5 s and the 10 % cells from
//! 14.4–50.9 s to 9.7–17.5 s, with fewer RTOs; the 2 % cells moved within noise), zero-window
//! probing (RFC 9293 §3.8.6.1), keep-alive probing (RFC 9293 §3.8.4, RFC 1122 §4.2.3.6: off
//! unless [`TcbConfig::keepalive`]; probes are `SEQ = SND.NXT − 1` with no data, sent only when
//! nothing is in flight; `count` unanswered probes abort the connection with
//! [`CloseReason::KeepaliveTimeout`]) and the per-connection half of path-MTU discovery
//! ([`Tcb::on_packet_too_big`]: RFC 1191 / RFC 8201, with RFC 5927 §4.1's check that the quoted
//! segment is in flight; the MSS only ever shrinks and the flight is resent in the new size).
//!
//! Does not own: the flow table, frames and checksums (`wire`), ICMP parsing (the stack hands
//! us the quoted sequence number and the path's MSS), timers' storage (the owner reads
//! [`Tcb::next_timer`] into its wheel and calls [`Tcb::on_timer`]), the handshake (`syncookie`).
//! Nothing here reads a clock or allocates after [`Tcb::new`] / [`Tcb::vacant`]: a slab slot's
//! TCB is re-initialised for each new connection by [`Tcb::reinit`] /
//! [`Tcb::accept_in_place`], which keep the two buffers.
//!
//! Documented deviations (each a safe policy): the receive window used for the acceptability test
//! is the free receive space (never smaller than what was advertised, so every segment the peer
//! may send is accepted); an RTO retransmits go-back-N from SND.UNA (as smoltcp and BSD do); a
//! zero-window probe is one new byte that then sits in flight, re-probed on the retransmission
//! timer without collapsing cwnd; RFC 7323 §5.5's 24-day idle rule for PAWS is not applied
//! (connections idle that long are reaped by the idle timeout first); TIME-WAIT lasts
//! [`TcbConfig::time_wait`] and a valid retransmitted FIN restarts it (RFC 9293 §3.10.7.4).

#[cfg(test)]
mod tests;

use core::fmt;

use super::cc::{Ack, AckOutcome, Algorithm, Cc, CongestionControl};
use super::reassembly::{self, Insert, Reassembly};
use super::ring::Ring;
use super::rtt::{RtoConfig, RttEstimator, SampleSource};
use super::time::{Duration, Instant};
use crate::wire::{SackBlock, SackBlocks, SeqNumber, TcpFlags, TcpOptions, TcpRepr, Timestamps};

/// Out-of-order ranges kept per connection (RFC 2018 needs at most 4 to report; more ranges
/// cost 24 bytes each).
pub const REASSEMBLY_RANGES: usize = 8;

/// Largest window shift (RFC 7323 §2.3).
const MAX_WSCALE: u8 = 14;

/// Tunables of a connection (the same for every connection of a listener).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcbConfig {
    /// Send buffer capacity in bytes.
    pub send_buffer: usize,
    /// Receive buffer capacity in bytes (the largest window we ever advertise).
    pub recv_buffer: usize,
    /// Our largest segment payload (the MSS we advertised); the effective MSS is the minimum
    /// with the peer's.
    pub mss: u16,
    /// Nagle's algorithm (RFC 9293 §3.7.4). Off by default: a proxy forwards what it has.
    pub nagle: bool,
    /// Delayed-ACK timeout (RFC 1122 §4.2.3.2: at most 500 ms; Linux uses 40 ms).
    pub delayed_ack: Duration,
    /// How long TIME-WAIT lasts (2·MSL in RFC 9293; Linux uses 60 s).
    pub time_wait: Duration,
    /// Close (and send RST) when nothing has been received for this long; `None` disables it.
    pub idle_timeout: Option<Duration>,
    /// Give up (RST, [`CloseReason::TimedOut`]) after this many consecutive RTO expiries.
    pub max_retransmits: u32,
    /// Challenge ACKs allowed per second (RFC 5961 §7).
    pub challenge_acks_per_sec: u32,
    /// RFC 6298 tunables.
    pub rto: RtoConfig,
    /// Congestion-control algorithm.
    pub cc: Algorithm,
    /// Keep-alive probing (RFC 9293 §3.8.4, RFC 1122 §4.2.3.6); `None` (the default) disables
    /// it, as RFC 1122 requires.
    pub keepalive: Option<Keepalive>,
    /// How long a [released](Tcb::release) connection ("orphan", in Linux's words) may take to
    /// reach TIME-WAIT or CLOSED; then it is aborted (RST, [`CloseReason::OrphanTimeout`]).
    /// `None` leaves it to the other timers.
    ///
    /// One deadline for every closing state (FIN-WAIT-1/2, CLOSING, LAST-ACK), counted from
    /// the release (armed at the first [`poll_transmit`](Tcb::poll_transmit) after it, the one
    /// that can send the FIN) and moved by nothing the peer sends: not by bare ACKs, nor by
    /// zero-window answers to persist probes. Linux has two bounds instead, `tcp_fin_timeout`
    /// (60 s) for FIN-WAIT-2 and `tcp_orphan_retries` (retransmissions and probes) for the
    /// other states; one deadline is simpler and leaves no gap for a peer that keeps its
    /// window shut. The cost: within this time the peer must also take what was still queued
    /// at the release (at most `send_buffer` bytes).
    pub orphan_timeout: Option<Duration>,
}

/// Keep-alive tunables (RFC 1122 §4.2.3.6: off by default, idle at least two hours unless
/// configured; Linux's `tcp_keepalive_time/intvl/probes` are the same three numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// Quiet time (nothing received, nothing in flight) before the first probe.
    pub idle: Duration,
    /// Time between unanswered probes.
    pub interval: Duration,
    /// Unanswered probes after which the connection is aborted ([`CloseReason::KeepaliveTimeout`]);
    /// 0 counts as 1.
    pub count: u32,
}

impl Default for TcbConfig {
    fn default() -> TcbConfig {
        TcbConfig {
            send_buffer: 64 * 1024,
            recv_buffer: 64 * 1024,
            mss: 1460,
            nagle: false,
            delayed_ack: Duration::from_millis(40),
            time_wait: Duration::from_secs(60),
            idle_timeout: None,
            max_retransmits: 15,
            challenge_acks_per_sec: 10,
            rto: RtoConfig::default(),
            cc: Algorithm::default(),
            keepalive: None,
            // Linux's `tcp_fin_timeout`.
            orphan_timeout: Some(Duration::from_secs(60)),
        }
    }
}

/// What the handshake settled, recovered from the SYN cookie and the final ACK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handshake {
    /// Our port.
    pub local_port: u16,
    /// The peer's port.
    pub remote_port: u16,
    /// Our initial sequence number (the SYN-ACK's sequence number, i.e. the cookie).
    pub iss: SeqNumber,
    /// The peer's initial sequence number (its SYN's sequence number).
    pub irs: SeqNumber,
    /// The peer's MSS.
    pub peer_mss: u16,
    /// Window shifts `(peer's, ours)` when both sides offered window scaling (RFC 7323 §2.2),
    /// else `None` and both shifts are 0. Shifts above 14 are clamped (RFC 7323 §2.3).
    pub window_scale: Option<(u8, u8)>,
    /// Both sides offered SACK-permitted (RFC 2018 §2).
    pub sack_permitted: bool,
    /// Timestamps were negotiated; the value is the offset added to
    /// [`Instant::ts_millis`] to make our TSval (the SYN-ACK's TSval came from the same clock).
    pub timestamps: Option<u32>,
    /// The peer's window field on the final ACK (unscaled).
    pub peer_window: u16,
}

/// RFC 9293 §3.3.2 states a `Tcb` can be in (LISTEN, SYN-SENT and SYN-RECEIVED do not exist here:
/// the passive open is stateless).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Data flows both ways.
    Established,
    /// We closed; our FIN is queued or unacknowledged.
    FinWait1,
    /// Our FIN is acknowledged; the peer may still send.
    FinWait2,
    /// The peer closed; we may still send.
    CloseWait,
    /// Both closed at once; waiting for the ACK of our FIN.
    Closing,
    /// The peer closed, then we did; waiting for the ACK of our FIN.
    LastAck,
    /// Both FINs acknowledged; absorbing stray segments.
    TimeWait,
    /// Gone. [`Tcb::close_reason`] says why.
    Closed,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            State::Established => "ESTABLISHED",
            State::FinWait1 => "FIN-WAIT-1",
            State::FinWait2 => "FIN-WAIT-2",
            State::CloseWait => "CLOSE-WAIT",
            State::Closing => "CLOSING",
            State::LastAck => "LAST-ACK",
            State::TimeWait => "TIME-WAIT",
            State::Closed => "CLOSED",
        };
        f.write_str(s)
    }
}

/// Why a connection reached CLOSED.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CloseReason {
    /// Orderly close: both FINs exchanged (through LAST-ACK or TIME-WAIT).
    #[error("connection closed")]
    Normal,
    /// The peer reset the connection (an exact-match RST, RFC 5961 §3.2).
    #[error("connection reset by peer")]
    Reset,
    /// The application aborted it (we sent RST).
    #[error("connection aborted")]
    Aborted,
    /// Retransmissions went unanswered (RFC 9293 §3.8.3 R2) or the idle timeout expired.
    #[error("connection timed out")]
    TimedOut,
    /// [`TcbConfig::keepalive`]'s probes went unanswered (RFC 1122 §4.2.3.6).
    #[error("keep-alive probes unanswered")]
    KeepaliveTimeout,
    /// A [released](Tcb::release) connection did not finish its closing handshake within
    /// [`TcbConfig::orphan_timeout`] (we sent RST).
    #[error("closing handshake not finished in time after release")]
    OrphanTimeout,
}

/// Why [`Tcb::on_packet_too_big`] left the connection as it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PmtuIgnored {
    /// The quoted sequence number is not in SND.UNA..SND.MAX: the ICMP message quotes no
    /// segment we have in flight (RFC 5927 §4.1), so it is stale or forged.
    #[error("quoted sequence number not in flight")]
    NotInFlight,
    /// The reported path MTU would not lower our MSS (RFC 8201 §4 / RFC 1191 §3: never raise).
    #[error("path MTU not below the current one")]
    NotSmaller,
}

/// Why an arriving segment was not (fully) processed; each is counted in [`Drops`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DropReason {
    /// Ports do not match this connection.
    #[error("segment for another connection")]
    WrongPorts,
    /// The connection is CLOSED.
    #[error("connection closed")]
    Closed,
    /// PAWS: TSval older than TS.Recent (RFC 7323 §5.3).
    #[error("PAWS: old timestamp")]
    Paws,
    /// Fails the sequence acceptability test (RFC 9293 §3.10.7.4, first check).
    #[error("sequence number outside the receive window")]
    OutOfWindow,
    /// RST whose sequence number is outside the window (RFC 5961 §3.2).
    #[error("RST outside the window")]
    RstOutOfWindow,
    /// In-window RST that is not an exact match: answered with a challenge ACK (RFC 5961 §3.2).
    #[error("RST in window, challenged")]
    RstChallenged,
    /// SYN in a synchronized state: challenge ACK (RFC 5961 §4.2).
    #[error("SYN in a synchronized state, challenged")]
    SynChallenged,
    /// No ACK bit (RFC 9293 §3.10.7.4, fifth check).
    #[error("segment without ACK")]
    NoAck,
    /// Acknowledges data never sent (RFC 9293 §3.10.7.4: ACK and drop).
    #[error("ACK for unsent data")]
    AckTooNew,
    /// Acknowledges data before SND.UNA − MAX.SND.WND (RFC 5961 §5.2).
    #[error("ACK too old")]
    AckTooOld,
    /// Out-of-order data that would need one more reassembly range than we keep.
    #[error("reassembly ranges exhausted")]
    ReassemblyFull,
    /// New data after the application [released](Tcb::release) the connection: nobody will
    /// read it, so the connection is reset (RFC 1122 §4.2.2.13).
    #[error("data after the application closed")]
    DataAfterRelease,
}

/// Per-connection drop and event counters (the owner sums them per worker).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// [`DropReason::WrongPorts`].
    pub wrong_ports: u64,
    /// [`DropReason::Closed`].
    pub closed: u64,
    /// [`DropReason::Paws`].
    pub paws: u64,
    /// [`DropReason::OutOfWindow`].
    pub out_of_window: u64,
    /// [`DropReason::RstOutOfWindow`].
    pub rst_out_of_window: u64,
    /// [`DropReason::RstChallenged`].
    pub rst_challenged: u64,
    /// [`DropReason::SynChallenged`].
    pub syn_challenged: u64,
    /// [`DropReason::NoAck`].
    pub no_ack: u64,
    /// [`DropReason::AckTooNew`].
    pub ack_too_new: u64,
    /// [`DropReason::AckTooOld`].
    pub ack_too_old: u64,
    /// [`DropReason::ReassemblyFull`].
    pub reassembly_full: u64,
    /// [`DropReason::DataAfterRelease`].
    pub data_after_release: u64,
    /// Challenge ACKs not sent because of the rate limit.
    pub challenge_acks_suppressed: u64,
    /// RTO expiries.
    pub timeouts: u64,
    /// Fast retransmissions (3 duplicate ACKs) and SACK/partial-ACK hole retransmissions.
    pub fast_retransmits: u64,
    /// Zero-window probes sent (first probes and re-probes).
    pub window_probes: u64,
    /// Keep-alive probes sent.
    pub keepalive_probes: u64,
    /// Path-MTU reductions applied ([`Tcb::on_packet_too_big`]).
    pub pmtu_reductions: u64,
}

impl Counters {
    fn count(&mut self, reason: DropReason) {
        let c = match reason {
            DropReason::WrongPorts => &mut self.wrong_ports,
            DropReason::Closed => &mut self.closed,
            DropReason::Paws => &mut self.paws,
            DropReason::OutOfWindow => &mut self.out_of_window,
            DropReason::RstOutOfWindow => &mut self.rst_out_of_window,
            DropReason::RstChallenged => &mut self.rst_challenged,
            DropReason::SynChallenged => &mut self.syn_challenged,
            DropReason::NoAck => &mut self.no_ack,
            DropReason::AckTooNew => &mut self.ack_too_new,
            DropReason::AckTooOld => &mut self.ack_too_old,
            DropReason::ReassemblyFull => &mut self.reassembly_full,
            DropReason::DataAfterRelease => &mut self.data_after_release,
        };
        *c += 1;
    }
}

/// A segment's payload as it sits in the send ring: up to two slices (the second is non-empty
/// only when the bytes wrap around the ring's end).
#[derive(Clone, Copy, Debug)]
pub struct Payload<'a> {
    /// The first part.
    pub first: &'a [u8],
    /// The rest, after the wrap.
    pub second: &'a [u8],
}

impl Payload<'_> {
    /// Total length.
    pub fn len(&self) -> usize {
        self.first.len() + self.second.len()
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies the payload into `out` (which must hold [`len`](Self::len) bytes; fewer are
    /// copied otherwise) and returns how many bytes were copied.
    pub fn copy_to(&self, out: &mut [u8]) -> usize {
        let a = self.first.len().min(out.len());
        out[..a].copy_from_slice(&self.first[..a]);
        let b = self.second.len().min(out.len() - a);
        out[a..a + b].copy_from_slice(&self.second[..b]);
        a + b
    }
}

/// One connection's transmission control block. Not `Clone`: its buffers are allocated once.
#[derive(Debug)]
pub struct Tcb {
    config: TcbConfig,
    state: State,
    close_reason: Option<CloseReason>,
    local_port: u16,
    remote_port: u16,

    // ---- send side ----
    /// Unacknowledged and unsent data: byte 0 is at sequence number `snd_una`.
    tx: Ring,
    /// SND.UNA: oldest unacknowledged sequence number.
    snd_una: SeqNumber,
    /// SND.NXT: next sequence number to send; `snd_una <= snd_nxt <= snd_max`. Rewound to
    /// `snd_una` by an RTO (go-back-N).
    snd_nxt: SeqNumber,
    /// Highest sequence number sent so far (+1); ACKs up to it are acceptable.
    snd_max: SeqNumber,
    /// SND.WND in bytes (already scaled).
    snd_wnd: u32,
    /// Largest SND.WND seen (RFC 5961 §5.2 MAX.SND.WND, and sender SWS avoidance).
    max_snd_wnd: u32,
    /// SND.WL1 / SND.WL2: the segment sequence and acknowledgment of the last window update.
    snd_wl1: SeqNumber,
    snd_wl2: SeqNumber,
    /// Shift applied to the peer's window field.
    snd_wscale: u8,
    /// Effective send MSS: payload bytes per segment, option overhead already taken off.
    snd_mss: u32,
    /// `close()` was called: a FIN follows the queued data, at sequence `snd_una + tx.len()`.
    fin_queued: bool,
    /// Our FIN has been acknowledged.
    fin_acked: bool,
    /// Consecutive duplicate ACKs (RFC 5681 §2).
    dup_acks: u32,
    /// A retransmission to send at the next poll: start sequence and maximum length.
    rexmit: Option<(SeqNumber, u32)>,
    /// SACK recovery: retransmissions have covered holes up to here (never below `snd_una`).
    rexmit_hint: SeqNumber,
    /// SACK scoreboard: the blocks of the latest ACK that lie within (SND.UNA, SND.MAX].
    sacked: SackBlocks,
    /// Highest SACKed sequence number (right edge), or `snd_una` when nothing is SACKed.
    high_sacked: SeqNumber,
    /// Segment being timed for an RTT sample without timestamps: its end and send time. Cleared
    /// by any retransmission (Karn).
    rtt_timed: Option<(SeqNumber, Instant)>,
    rtt: RttEstimator,
    cc: Cc,
    /// Retransmission (or, while the peer's window is 0, persist) deadline; set iff something is
    /// in flight or a probe is due.
    rto_deadline: Option<Instant>,
    /// Consecutive RTO / probe expiries without progress.
    retries: u32,
    /// An RST is to be sent (abort or timeout); the state is already CLOSED.
    rst_pending: bool,
    /// A zero-window probe (one new byte past the window) is to be sent.
    probe_pending: bool,
    /// Keep-alive: unanswered probes sent since the last arrival, and when the last went out.
    ka_probes: u32,
    ka_last: Instant,
    /// A keep-alive probe (`SEQ = SND.NXT − 1`, no data) is to be sent.
    ka_pending: bool,

    // ---- receive side ----
    /// In-order data the application has not read; out-of-order bytes sit after it at their
    /// offset from RCV.NXT.
    rx: Ring,
    /// Out-of-order ranges; its `rcv_nxt` is RCV.NXT for data (the FIN adds one).
    reasm: Reassembly<REASSEMBLY_RANGES>,
    /// The peer's FIN has been received and is in order.
    fin_received: bool,
    /// The application will read nothing more ([`Tcb::release`]).
    released: bool,
    /// When a released connection still short of TIME-WAIT is aborted
    /// ([`TcbConfig::orphan_timeout`]). Set only while `released` and in FIN-WAIT-1/2,
    /// CLOSING or LAST-ACK (armed by the first `poll_transmit` after the release; cleared on
    /// entering TIME-WAIT or CLOSED, which have their own ends).
    orphan_deadline: Option<Instant>,
    /// Sequence number of a FIN that arrived before all the data preceding it.
    fin_pending: Option<SeqNumber>,
    /// Shift applied to our window field.
    rcv_wscale: u8,
    /// RCV.NXT (of data, without the FIN) + the window last advertised: the right edge we
    /// promised (never moved left).
    rcv_adv: SeqNumber,
    /// An ACK must go out at the next poll.
    ack_now: bool,
    /// Delayed-ACK deadline, set iff in-order data awaits acknowledgement.
    ack_deadline: Option<Instant>,
    /// In-order bytes received since we last sent an ACK.
    unacked_bytes: u32,
    /// Receive MSS estimate for the "every second full segment" rule.
    rcv_mss: u32,

    // ---- options ----
    /// Timestamps negotiated: our TSval offset.
    ts_offset: Option<u32>,
    /// TS.Recent (RFC 7323 §4.3).
    ts_recent: u32,
    /// Last.ACK.sent (RFC 7323 §4.3).
    last_ack_sent: SeqNumber,
    sack_permitted: bool,

    // ---- timers and limits ----
    time_wait_deadline: Option<Instant>,
    last_rx: Instant,
    /// Start of the current challenge-ACK second and how many were sent in it.
    challenge_window: (Instant, u32),
    counters: Counters,
}

/// What TIME-WAIT still needs of a connection once it has given its buffers back: enough to
/// ACK a retransmitted FIN (RFC 9293 §3.10.7.4) with the right sequence numbers and timestamps,
/// as Linux keeps a small `tcp_timewait_sock` instead of the whole socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeWaitState {
    /// Our SND.NXT (our FIN included).
    pub snd_nxt: SeqNumber,
    /// Our RCV.NXT (the peer's FIN included).
    pub rcv_nxt: SeqNumber,
    /// The window field of our segments (already scaled down).
    pub window: u16,
    /// The connection's TSval offset, when timestamps are on.
    pub ts_offset: Option<u32>,
    pub ts_recent: u32,
}

impl TimeWaitState {
    /// The ACK a TIME-WAIT connection sends at `now` (for a retransmitted FIN, or a segment
    /// that must be re-synchronised).
    pub fn ack(&self, local_port: u16, remote_port: u16, now: Instant) -> TcpRepr {
        let mut options = TcpOptions::default();
        if let Some(off) = self.ts_offset {
            options.timestamps = Some(Timestamps {
                tsval: now.ts_millis().wrapping_add(off),
                tsecr: self.ts_recent,
            });
        }
        TcpRepr {
            src_port: local_port,
            dst_port: remote_port,
            seq: self.snd_nxt,
            ack: Some(self.rcv_nxt),
            flags: TcpFlags::NONE,
            window: self.window,
            options,
            payload_len: 0,
        }
    }
}

/// Signed distance `a - b` clamped at 0, as a `u32`.
fn dist(a: SeqNumber, b: SeqNumber) -> u32 {
    u32::try_from((a - b).max(0)).unwrap_or(0)
}

impl Tcb {
    /// A connection in ESTABLISHED for a completed handshake at `now`. Allocates the two buffers
    /// (the only allocations a `Tcb` makes). The final ACK itself (which may carry data) should
    /// then be fed to [`process`](Self::process), or use [`accept`](Self::accept) for both.
    pub fn new(config: TcbConfig, hs: &Handshake, now: Instant) -> Tcb {
        Tcb::with_rings(
            config,
            hs,
            now,
            Ring::new(config.send_buffer),
            Ring::new(config.recv_buffer),
        )
    }

    /// A CLOSED, never-used TCB owning its buffers: what a slab slot holds before (and
    /// between) connections. [`reinit`](Self::reinit) turns it into a live connection without
    /// allocating.
    pub fn vacant(config: TcbConfig) -> Tcb {
        Tcb::vacant_with(
            config,
            Ring::new(config.send_buffer),
            Ring::new(config.recv_buffer),
        )
    }

    /// [`vacant`](Self::vacant) over given buffers (e.g. from a [`super::ring::RingArena`]),
    /// `tx` of `config.send_buffer` bytes and `rx` of `config.recv_buffer`.
    pub fn vacant_with(config: TcbConfig, tx: Ring, rx: Ring) -> Tcb {
        debug_assert_eq!(
            (tx.capacity(), rx.capacity()),
            (config.send_buffer, config.recv_buffer)
        );
        let hs = Handshake {
            local_port: 0,
            remote_port: 0,
            iss: SeqNumber(0),
            irs: SeqNumber(0),
            peer_mss: config.mss,
            window_scale: None,
            sack_permitted: false,
            timestamps: None,
            peer_window: 0,
        };
        let mut tcb = Tcb::with_rings(config, &hs, Instant::ZERO, tx, rx);
        tcb.state = State::Closed;
        tcb
    }

    /// Re-initialises this TCB in place for a new connection, as [`new`](Self::new) would build
    /// it, but keeping (and emptying) its two buffers: no allocation. Every other field is
    /// reset, so nothing of the previous connection survives but the buffers' storage, whose
    /// old bytes are unreadable (the rings are empty).
    pub fn reinit(&mut self, hs: &Handshake, now: Instant) {
        let mut tx = core::mem::replace(&mut self.tx, Ring::new(0));
        let mut rx = core::mem::replace(&mut self.rx, Ring::new(0));
        tx.clear();
        rx.clear();
        *self = Tcb::with_rings(self.config, hs, now, tx, rx);
    }

    /// [`reinit`](Self::reinit) followed by [`process`](Self::process) of the handshake's final
    /// ACK, as [`accept`](Self::accept) does for a new `Tcb`.
    pub fn accept_in_place(&mut self, hs: &Handshake, ack: &TcpRepr, payload: &[u8], now: Instant) {
        self.reinit(hs, now);
        self.take_final_ack(ack, payload, now);
    }

    fn with_rings(config: TcbConfig, hs: &Handshake, now: Instant, tx: Ring, rx: Ring) -> Tcb {
        let (snd_wscale, rcv_wscale) = hs
            .window_scale
            .map_or((0, 0), |(p, o)| (p.min(MAX_WSCALE), o.min(MAX_WSCALE)));
        let ts_overhead = if hs.timestamps.is_some() { 12 } else { 0 };
        let snd_mss = u32::from(hs.peer_mss.min(config.mss))
            .saturating_sub(ts_overhead)
            .max(64);
        let snd_una = hs.iss + 1;
        let rcv_nxt = hs.irs + 1;
        let snd_wnd = u32::from(hs.peer_window) << snd_wscale;
        Tcb {
            config,
            state: State::Established,
            close_reason: None,
            local_port: hs.local_port,
            remote_port: hs.remote_port,
            tx,
            snd_una,
            snd_nxt: snd_una,
            snd_max: snd_una,
            snd_wnd,
            max_snd_wnd: snd_wnd,
            snd_wl1: hs.irs,
            snd_wl2: snd_una,
            snd_wscale,
            snd_mss,
            fin_queued: false,
            fin_acked: false,
            dup_acks: 0,
            rexmit: None,
            rexmit_hint: snd_una,
            sacked: SackBlocks::default(),
            high_sacked: snd_una,
            rtt_timed: None,
            rtt: RttEstimator::new(config.rto),
            cc: Cc::new(config.cc, snd_mss),
            rto_deadline: None,
            retries: 0,
            rst_pending: false,
            probe_pending: false,
            ka_probes: 0,
            ka_last: now,
            ka_pending: false,
            rx,
            reasm: Reassembly::new(rcv_nxt.0),
            fin_received: false,
            released: false,
            orphan_deadline: None,
            fin_pending: None,
            rcv_wscale,
            // The SYN-ACK advertised at most what the buffer holds; promise that edge.
            rcv_adv: rcv_nxt + Self::window_field_max(config.recv_buffer, rcv_wscale),
            ack_now: false,
            ack_deadline: None,
            unacked_bytes: 0,
            rcv_mss: u32::from(config.mss.min(hs.peer_mss)).saturating_sub(ts_overhead),
            ts_offset: hs.timestamps,
            ts_recent: 0,
            last_ack_sent: rcv_nxt,
            sack_permitted: hs.sack_permitted,
            time_wait_deadline: None,
            last_rx: now,
            challenge_window: (now, 0),
            counters: Counters::default(),
        }
    }

    /// Test clients built with [`new`](Self::new) from a SYN-ACK take its TSval as the most
    /// recent one, as an active opener would (else PAWS drops our TSvals above 2³¹).
    #[cfg(test)]
    pub(crate) fn set_ts_recent(&mut self, tsval: u32) {
        self.ts_recent = tsval;
    }

    /// [`new`](Self::new) followed by [`process`](Self::process) of the handshake's final ACK
    /// (`ack`, `payload`); a drop of that segment is counted but the connection stands.
    pub fn accept(
        config: TcbConfig,
        hs: &Handshake,
        ack: &TcpRepr,
        payload: &[u8],
        now: Instant,
    ) -> Tcb {
        let mut tcb = Tcb::new(config, hs, now);
        tcb.take_final_ack(ack, payload, now);
        tcb
    }

    fn take_final_ack(&mut self, ack: &TcpRepr, payload: &[u8], now: Instant) {
        if let Some(ts) = ack.options.timestamps {
            self.ts_recent = ts.tsval;
        }
        // Errors are counted inside; the handshake ACK already validated as a cookie.
        let _ = self.process(now, ack, payload);
    }

    /// The largest window the buffer allows, as bytes representable with `shift`.
    fn window_field_max(buffer: usize, shift: u8) -> u32 {
        let bytes = u32::try_from(buffer).unwrap_or(u32::MAX);
        (bytes >> shift).min(u32::from(u16::MAX)) << shift
    }

    // ------------------------------------------------------------------ accessors

    /// The RFC 9293 state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Why the connection closed, once it has.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.close_reason
    }

    /// Drop and event counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// SND.UNA.
    pub fn snd_una(&self) -> SeqNumber {
        self.snd_una
    }

    /// SND.NXT.
    pub fn snd_nxt(&self) -> SeqNumber {
        self.snd_nxt
    }

    /// RCV.NXT (the FIN, once received, included).
    pub fn rcv_nxt(&self) -> SeqNumber {
        SeqNumber(self.reasm.rcv_nxt()) + u32::from(self.fin_received)
    }

    /// The peer's window (scaled), SND.WND.
    pub fn snd_wnd(&self) -> u32 {
        self.snd_wnd
    }

    /// The congestion controller (cwnd, ssthresh, recovery state).
    pub fn cc(&self) -> &Cc {
        &self.cc
    }

    /// The RTO estimator.
    pub fn rtt(&self) -> &RttEstimator {
        &self.rtt
    }

    /// Effective send MSS (payload bytes per segment).
    pub fn mss(&self) -> u32 {
        self.snd_mss
    }

    /// Whether the application may queue more data: the connection is open for sending and
    /// `close()` has not been called.
    pub fn may_send(&self) -> bool {
        matches!(self.state, State::Established | State::CloseWait) && !self.fin_queued
    }

    /// Whether data may still arrive or is buffered for the application.
    pub fn may_recv(&self) -> bool {
        match self.state {
            State::Established | State::FinWait1 | State::FinWait2 => true,
            _ => !self.rx.is_empty(),
        }
    }

    /// Bytes queued for sending (unsent plus unacknowledged).
    pub fn send_queue(&self) -> usize {
        self.tx.len()
    }

    /// Bytes the application can read now.
    pub fn recv_queue(&self) -> usize {
        self.rx.len()
    }

    /// Memory this connection holds for buffers, in bytes.
    pub fn buffer_bytes(&self) -> usize {
        self.tx.capacity() + self.rx.capacity()
    }

    /// The storage of each buffer that holds nothing (send: no byte unsent or unacknowledged;
    /// receive: no byte unread and none out of order) but was written since it was last handed
    /// out: the caller may give those pages back to the kernel while the connection is idle.
    /// The next bytes are written from the start of the storage.
    pub fn idle_buffers(&mut self) -> [Option<&mut [u8]>; 2] {
        let rx = match self.reasm.is_empty() {
            true => self.rx.idle_storage(),
            false => None,
        };
        [self.tx.idle_storage(), rx]
    }

    /// Whether either buffer was written since [`idle_buffers`](Self::idle_buffers) last
    /// handed it out (its pages may be resident).
    pub fn buffers_touched(&self) -> bool {
        self.tx.is_touched() || self.rx.is_touched()
    }

    /// Addresses of the two buffers' storage (tests: a reused slot keeps its buffers).
    #[cfg(test)]
    pub(crate) fn buffer_ptrs(&self) -> (*const u8, *const u8) {
        (self.tx.storage_ptr(), self.rx.storage_ptr())
    }

    // ------------------------------------------------------------------ application side

    /// Queues as much of `data` as fits in the send buffer; returns how much. Zero once the
    /// connection can no longer send (see [`may_send`](Self::may_send)).
    pub fn send(&mut self, data: &[u8]) -> usize {
        if !self.may_send() {
            return 0;
        }
        self.tx.push(data)
    }

    /// [`send`](Self::send) without a copy in between: `fill` writes straight into the send
    /// buffer's free space (its contiguous part; call again for what follows a wrap) and returns
    /// how many bytes it wrote, which are queued. Zero once the connection can no longer send.
    pub fn send_in_place(&mut self, fill: impl FnOnce(&mut [u8]) -> usize) -> usize {
        if !self.may_send() {
            return 0;
        }
        let spare = self.tx.spare_mut();
        let n = fill(spare).min(spare.len());
        self.tx.commit(n);
        n
    }

    /// Copies received in-order bytes into `out` and consumes them; returns how many.
    pub fn recv(&mut self, out: &mut [u8]) -> usize {
        let n = self.rx.read_at(0, out);
        self.consume(n);
        n
    }

    /// The readable bytes, without consuming them (two slices when they wrap).
    pub fn peek(&self) -> Payload<'_> {
        let (first, second) = self.rx.slices(0, usize::MAX);
        Payload { first, second }
    }

    /// Consumes `n` readable bytes (clamped). May make a window update due.
    pub fn consume(&mut self, n: usize) {
        self.rx.consume(n);
        if self.window_update_due() {
            self.ack_now = true;
        }
    }

    /// Whether the application [released](Self::release) the connection.
    pub fn is_released(&self) -> bool {
        self.released
    }

    /// In TIME-WAIT, what the state still needs ([`TimeWaitState`]); `None` in other states.
    pub fn time_wait_state(&self) -> Option<TimeWaitState> {
        if self.state != State::TimeWait {
            return None;
        }
        let field = (self.window_to_advertise() >> self.rcv_wscale).min(u32::from(u16::MAX));
        Some(TimeWaitState {
            snd_nxt: self.snd_nxt,
            rcv_nxt: self.rcv_nxt(),
            window: field as u16,
            ts_offset: self.ts_offset,
            ts_recent: self.ts_recent,
        })
    }

    /// How long TIME-WAIT lasts for this connection.
    pub fn time_wait_duration(&self) -> Duration {
        self.config.time_wait
    }

    /// A full close: the application reads nothing more. What it has not read is dropped, a FIN
    /// follows the queued data (as [`close`](Self::close)), and new data arriving later resets
    /// the connection (RFC 1122 §4.2.2.13, as Linux does after `close()`), so a peer that keeps
    /// sending learns at once that nobody reads, and the slot does not wait for a timeout.
    /// From the next [`poll_transmit`](Self::poll_transmit) on, the closing handshake has
    /// [`TcbConfig::orphan_timeout`] to finish.
    pub fn release(&mut self) {
        self.released = true;
        let unread = self.rx.len();
        self.consume(unread);
        self.close();
    }

    /// Half-closes: a FIN follows the queued data (ESTABLISHED → FIN-WAIT-1, CLOSE-WAIT →
    /// LAST-ACK, RFC 9293 §3.10.4). No effect in other states.
    pub fn close(&mut self) {
        match self.state {
            // RFC 9293 §3.10.4 ESTABLISHED: queue the FIN after pending sends, FIN-WAIT-1.
            State::Established => self.state = State::FinWait1,
            // RFC 9293 §3.10.4 CLOSE-WAIT: queue the FIN after pending sends, go to LAST-ACK
            // (CLOSING in the RFC's text is a known erratum; LAST-ACK is what Figure 5 shows).
            State::CloseWait => self.state = State::LastAck,
            // Already closing or closed: "error: connection closing", nothing to do.
            _ => return,
        }
        self.fin_queued = true;
    }

    /// Aborts: queues an RST (RFC 9293 §3.10.5) and goes to CLOSED, dropping both buffers'
    /// contents.
    pub fn abort(&mut self) {
        if self.state == State::Closed {
            return;
        }
        // RFC 9293 §3.10.5: TIME-WAIT just closes; any other synchronized state sends RST.
        if self.state != State::TimeWait {
            self.rst_pending = true;
        }
        self.enter_closed(CloseReason::Aborted);
    }

    fn enter_closed(&mut self, reason: CloseReason) {
        self.state = State::Closed;
        self.close_reason.get_or_insert(reason);
        self.rto_deadline = None;
        self.ack_deadline = None;
        self.time_wait_deadline = None;
        self.orphan_deadline = None;
        self.ack_now = false;
        self.rexmit = None;
        self.tx.consume(usize::MAX);
    }

    fn enter_time_wait(&mut self, now: Instant) {
        self.state = State::TimeWait;
        self.rto_deadline = None;
        // TIME-WAIT ends on its own timer; the orphan bound is for the handshake before it.
        self.orphan_deadline = None;
        self.time_wait_deadline = Some(now + self.config.time_wait);
    }

    // ------------------------------------------------------------------ timers

    /// The earliest instant at which [`on_timer`](Self::on_timer) has work: RTO or persist,
    /// delayed ACK, TIME-WAIT expiry, idle timeout, orphan timeout. `None` when nothing is
    /// armed.
    pub fn next_timer(&self) -> Option<Instant> {
        if self.state == State::Closed {
            return None;
        }
        let idle = self.config.idle_timeout.map(|d| self.last_rx + d);
        [
            self.rto_deadline,
            self.ack_deadline,
            self.time_wait_deadline,
            self.orphan_deadline,
            idle,
            self.keepalive_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Runs the timers due at `now`. Segments they call for go out at the next
    /// [`poll_transmit`](Self::poll_transmit).
    pub fn on_timer(&mut self, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        if self.time_wait_deadline.is_some_and(|d| d <= now) {
            self.enter_closed(CloseReason::Normal);
            return;
        }
        if self.orphan_deadline.is_some_and(|d| d <= now) {
            // Released and still not through its closing handshake: give up, with an RST so
            // that a peer which is still there drops its half too rather than wait on us.
            self.rst_pending = true;
            self.enter_closed(CloseReason::OrphanTimeout);
            return;
        }
        if let Some(idle) = self.config.idle_timeout {
            if self.last_rx + idle <= now {
                self.rst_pending = true;
                self.enter_closed(CloseReason::TimedOut);
                return;
            }
        }
        if let (Some(ka), Some(due)) = (self.config.keepalive, self.keepalive_deadline()) {
            if due <= now {
                if self.ka_probes >= ka.count.max(1) {
                    // RFC 1122 §4.2.3.6: the peer is gone; abort (with an RST, as Linux does,
                    // in case it is only the path back to us that failed).
                    self.rst_pending = true;
                    self.enter_closed(CloseReason::KeepaliveTimeout);
                    return;
                }
                self.ka_probes += 1;
                self.ka_last = now;
                self.ka_pending = true;
                self.counters.keepalive_probes += 1;
            }
        }
        if self.ack_deadline.is_some_and(|d| d <= now) {
            self.ack_deadline = None;
            self.ack_now = true;
        }
        if self.rto_deadline.is_some_and(|d| d <= now) {
            self.on_rto(now);
        }
    }

    /// When the next keep-alive probe (or, after `count` unanswered ones, the abort) is due:
    /// only while the connection is synchronized and open for receiving, and nothing is in
    /// flight or waiting on the persist timer (those have their own timers, RFC 9293 §3.8.4).
    /// The first probe follows `idle` after the last arrival, the next ones `interval` apart.
    fn keepalive_deadline(&self) -> Option<Instant> {
        let ka = self.config.keepalive?;
        if !matches!(self.state, State::Established | State::CloseWait)
            || self.snd_una != self.snd_max
            || self.rto_deadline.is_some()
        {
            return None;
        }
        Some(if self.ka_probes == 0 {
            self.last_rx + ka.idle
        } else {
            self.ka_last + ka.interval
        })
    }

    /// An ICMP "fragmentation needed" (RFC 1191) or "packet too big" (RFC 8201) for this
    /// connection: `quoted_seq` is the sequence number of the segment the message quotes,
    /// `path_mss` the largest segment payload the reported MTU allows without options (MTU −
    /// IP header − 20; the caller clamps it to the family's minimum). If the quoted segment is
    /// in flight (RFC 5927 §4.1) and the MSS shrinks, the new MSS takes effect at once and
    /// everything in flight is sent again in the smaller size from SND.UNA — without a
    /// congestion response, as the segments were not lost to congestion (Linux's
    /// `tcp_simple_retransmit`). Returns the new effective MSS.
    pub fn on_packet_too_big(
        &mut self,
        now: Instant,
        quoted_seq: SeqNumber,
        path_mss: u32,
    ) -> Result<u32, PmtuIgnored> {
        if self.state == State::Closed || !quoted_seq.in_range(self.snd_una, self.snd_max) {
            return Err(PmtuIgnored::NotInFlight);
        }
        let ts_overhead = if self.ts_offset.is_some() { 12 } else { 0 };
        let mss = path_mss.saturating_sub(ts_overhead).max(64);
        if mss >= self.snd_mss {
            return Err(PmtuIgnored::NotSmaller);
        }
        self.snd_mss = mss;
        self.cc.set_mss(mss);
        self.counters.pmtu_reductions += 1;
        // Resend the flight in the new size, go-back-N from SND.UNA as after an RTO (but the
        // window is left alone). Karn: nothing resent may be timed.
        self.snd_nxt = self.snd_una;
        self.rexmit = None;
        self.rtt_timed = None;
        self.dup_acks = 0;
        self.sacked = SackBlocks::default();
        self.high_sacked = self.snd_una;
        self.rexmit_hint = self.snd_una;
        self.rto_deadline = Some(now + self.rtt.rto());
        Ok(mss)
    }

    fn on_rto(&mut self, now: Instant) {
        self.retries += 1;
        if self.retries > self.config.max_retransmits {
            // RFC 9293 §3.8.3 R2: give up.
            self.rst_pending = true;
            self.enter_closed(CloseReason::TimedOut);
            return;
        }
        self.rtt_timed = None;
        self.rtt.on_timeout();
        if self.snd_wnd == 0 && !self.fin_in_flight() {
            // Persist timer (RFC 9293 §3.8.6.1): re-probe with the first unacknowledged byte,
            // or the first new one; the window, not congestion, is what stops us.
            self.counters.window_probes += 1;
            let unsent = self.tx.len() as u32 > dist(self.snd_nxt, self.snd_una);
            if self.snd_nxt == self.snd_una && unsent {
                self.probe_pending = true;
            } else {
                self.rexmit = Some((self.snd_una, 1));
            }
            self.rto_deadline = Some(now + self.rtt.rto());
            return;
        }
        self.counters.timeouts += 1;
        let flight = dist(self.snd_max, self.snd_una);
        self.cc.on_rto(self.snd_max.0, flight, now);
        // Go-back-N: resend from SND.UNA as the (now one-segment) window allows.
        self.snd_nxt = self.snd_una;
        self.dup_acks = 0;
        self.sacked = SackBlocks::default();
        self.high_sacked = self.snd_una;
        self.rexmit_hint = self.snd_una;
        self.rexmit = None;
        self.rto_deadline = Some(now + self.rtt.rto());
    }

    fn fin_in_flight(&self) -> bool {
        self.fin_queued && !self.fin_acked && self.snd_max == self.fin_seq() + 1
    }

    /// Sequence number of our FIN (meaningful once `fin_queued`).
    fn fin_seq(&self) -> SeqNumber {
        self.snd_una + self.tx.len() as u32
    }
}

// ---------------------------------------------------------------------- segment arrival

impl Tcb {
    /// Processes one arriving segment at `now` (RFC 9293 §3.10.7.4). `payload` is the segment's
    /// text (`seg.payload_len` bytes). Replies (ACKs, challenge ACKs, data) go out at the next
    /// [`poll_transmit`](Self::poll_transmit). An `Err` says why the segment was dropped or only
    /// partly used; it has been counted in [`counters`](Self::counters).
    pub fn process(
        &mut self,
        now: Instant,
        seg: &TcpRepr,
        payload: &[u8],
    ) -> Result<(), DropReason> {
        let result = self.process_inner(now, seg, payload);
        if let Err(reason) = result {
            self.counters.count(reason);
        }
        result
    }

    fn process_inner(
        &mut self,
        now: Instant,
        seg: &TcpRepr,
        payload: &[u8],
    ) -> Result<(), DropReason> {
        if seg.src_port != self.remote_port || seg.dst_port != self.local_port {
            return Err(DropReason::WrongPorts);
        }
        if self.state == State::Closed {
            return Err(DropReason::Closed);
        }
        let payload = &payload[..seg.payload_len.min(payload.len())];
        let rst = seg.flags.contains(TcpFlags::RST);
        let syn = seg.flags.contains(TcpFlags::SYN);
        let fin = seg.flags.contains(TcpFlags::FIN);
        let seg_len = payload.len() as u32 + u32::from(syn) + u32::from(fin);

        // RFC 7323 §5.3 R1 (PAWS): an older TSval marks a stale duplicate; ACK and drop. RSTs
        // are exempt, as in Linux: RFC 7323 §5.2 recommends RSTs carry no timestamps anyway.
        if let (Some(_), Some(ts)) = (self.ts_offset, seg.options.timestamps) {
            if !rst && (ts.tsval.wrapping_sub(self.ts_recent) as i32) < 0 {
                self.ack_now = true;
                return Err(DropReason::Paws);
            }
        }

        // RFC 9293 §3.10.7.4 first check: sequence acceptability, RCV.WND = free receive space.
        let rcv_nxt = self.rcv_nxt();
        let rcv_wnd = self.rx.free() as u32;
        let wnd_end = rcv_nxt + rcv_wnd;
        let acceptable = match (seg_len, rcv_wnd) {
            (0, 0) => seg.seq == rcv_nxt,
            (0, _) => seg.seq.in_range(rcv_nxt, wnd_end),
            // A zero window still takes ACKs, RSTs and FIN-less probes at RCV.NXT: their text is
            // refused below, their control information used.
            (_, 0) => seg.seq == rcv_nxt,
            (_, _) => {
                seg.seq.in_range(rcv_nxt, wnd_end)
                    || (seg.seq + (seg_len - 1)).in_range(rcv_nxt, wnd_end)
            }
        };
        if !acceptable {
            if rst {
                // RFC 5961 §3.2: an RST outside the window is silently dropped.
                return Err(DropReason::RstOutOfWindow);
            }
            // RFC 9293 §3.10.7.4: ACK an unacceptable segment (this also re-ACKs a retransmitted
            // FIN in TIME-WAIT, which restarts the 2·MSL timeout).
            self.ack_now = true;
            if self.state == State::TimeWait && fin {
                self.time_wait_deadline = Some(now + self.config.time_wait);
            }
            return Err(DropReason::OutOfWindow);
        }

        // RFC 9293 §3.10.7.4 second check, as amended by RFC 5961 §3.2: only an exact match
        // resets; any other in-window RST earns a (rate-limited) challenge ACK.
        if rst {
            if seg.seq == rcv_nxt {
                // RFC 9293: every synchronized state goes to CLOSED on a valid RST.
                let reason = match self.state {
                    State::Closing | State::LastAck | State::TimeWait => CloseReason::Normal,
                    _ => CloseReason::Reset,
                };
                self.enter_closed(reason);
                return Ok(());
            }
            self.challenge_ack(now);
            return Err(DropReason::RstChallenged);
        }

        // Fourth check, RFC 5961 §4.2: a SYN in a synchronized state gets a challenge ACK
        // whatever its sequence number.
        if syn {
            self.challenge_ack(now);
            return Err(DropReason::SynChallenged);
        }

        // Fifth check: no ACK bit, drop.
        let Some(ack) = seg.ack else {
            return Err(DropReason::NoAck);
        };

        // RFC 7323 §4.3: TS.Recent follows the segment that covers Last.ACK.sent.
        if let (Some(_), Some(ts)) = (self.ts_offset, seg.options.timestamps) {
            if seg.seq <= self.last_ack_sent {
                self.ts_recent = ts.tsval;
            }
        }
        self.last_rx = now;
        self.ka_probes = 0;

        self.process_ack(now, seg, ack, payload.len())?;
        if self.state == State::Closed {
            return Ok(());
        }

        // Seventh check: segment text, only while the peer may still send.
        let mut result = Ok(());
        if !payload.is_empty() {
            match self.state {
                // RFC 9293 §3.10.7.4 ESTABLISHED, FIN-WAIT-1, FIN-WAIT-2: deliver the text.
                State::Established | State::FinWait1 | State::FinWait2 if !self.fin_received => {
                    let new_data = seg.seq + payload.len() as u32 > self.rcv_nxt();
                    if self.released && new_data {
                        // RFC 1122 §4.2.2.13: data nobody will read; tell the peer it was lost.
                        self.abort();
                        return Err(DropReason::DataAfterRelease);
                    }
                    result = self.receive_text(now, seg.seq, payload);
                }
                // CLOSE-WAIT, CLOSING, LAST-ACK, TIME-WAIT: the peer's FIN has been received;
                // text cannot be new. ACK it so the peer learns RCV.NXT.
                _ => self.ack_now = true,
            }
        }

        // Eighth check: FIN. Remember one that arrived ahead of a gap.
        if fin && !self.fin_received {
            self.fin_pending = Some(seg.seq + payload.len() as u32);
        }
        self.take_fin(now);
        if fin && self.state == State::TimeWait {
            // RFC 9293 §3.10.7.4 TIME-WAIT: ACK the retransmitted FIN, restart the timeout.
            self.ack_now = true;
            self.time_wait_deadline = Some(now + self.config.time_wait);
        }
        result
    }

    /// RFC 9293 §3.10.7.4 fifth check (ACK field), with RFC 5961 §5.2's bounds, RFC 5681's
    /// duplicate ACKs, RFC 6298 RTT samples and the window update rule.
    fn process_ack(
        &mut self,
        now: Instant,
        seg: &TcpRepr,
        ack: SeqNumber,
        payload_len: usize,
    ) -> Result<(), DropReason> {
        if ack > self.snd_max {
            // Acknowledges something not yet sent: ACK and drop.
            self.ack_now = true;
            return Err(DropReason::AckTooNew);
        }
        if ack < self.snd_una - self.max_snd_wnd {
            // RFC 5961 §5.2: too old to be a delayed duplicate; challenge ACK and drop.
            self.challenge_ack(now);
            return Err(DropReason::AckTooOld);
        }
        let wnd = u32::from(seg.window) << self.snd_wscale;

        let newly_sacked = self.sack_permitted && self.update_scoreboard(seg, ack);

        if ack > self.snd_una {
            self.ack_new_data(now, seg, ack);
        } else if ack == self.snd_una
            && self.snd_max > self.snd_una
            && ((payload_len == 0 && !seg.flags.contains(TcpFlags::FIN) && wnd == self.snd_wnd)
                || newly_sacked)
        {
            // A duplicate ACK: RFC 5681 §2 (no data, no window change), or RFC 6675 §2 (its
            // SACK blocks cover data not SACKed before — whatever else the segment carries,
            // which is what lets a connection sending data both ways detect loss without
            // waiting for an RTO).
            self.on_dup_ack(now);
        }

        // RFC 9293 §3.10.7.4 ESTABLISHED: update the send window if the segment is newer than
        // the last one that did (SND.WL1 < SEG.SEQ, or equal and SND.WL2 =< SEG.ACK).
        if ack >= self.snd_una
            && (self.snd_wl1 < seg.seq || (self.snd_wl1 == seg.seq && self.snd_wl2 <= ack))
        {
            self.snd_wnd = wnd;
            self.max_snd_wnd = self.max_snd_wnd.max(wnd);
            self.snd_wl1 = seg.seq;
            self.snd_wl2 = ack;
            if wnd > 0 && self.snd_una == self.snd_max {
                // The window opened with nothing in flight: the persist timer is done.
                self.rto_deadline = None;
                self.probe_pending = false;
            }
        }

        // Our FIN's acknowledgement moves the closing states.
        if self.fin_acked {
            match self.state {
                // RFC 9293 §3.10.7.4 FIN-WAIT-1: FIN acknowledged → FIN-WAIT-2.
                State::FinWait1 => self.state = State::FinWait2,
                // CLOSING: FIN acknowledged → TIME-WAIT.
                State::Closing => self.enter_time_wait(now),
                // LAST-ACK: FIN acknowledged → CLOSED.
                State::LastAck => self.enter_closed(CloseReason::Normal),
                _ => {}
            }
        }
        Ok(())
    }

    fn ack_new_data(&mut self, now: Instant, seg: &TcpRepr, ack: SeqNumber) {
        let acked = dist(ack, self.snd_una);
        let data = acked.min(self.tx.len() as u32);
        if acked > data && self.fin_queued {
            self.fin_acked = true;
        }
        self.tx.consume(data as usize);
        self.snd_una = ack;
        if self.snd_nxt < ack {
            self.snd_nxt = ack;
        }
        self.rexmit_hint = self.rexmit_hint.max_seq(ack);
        self.high_sacked = self.high_sacked.max_seq(ack);

        // RTT sample: the echoed timestamp (RFC 7323 §4) or the timed segment (Karn).
        let ts_sample = match (self.ts_offset, seg.options.timestamps) {
            (Some(off), Some(ts)) if ts.tsecr != 0 => {
                let elapsed = now.ts_millis().wrapping_add(off).wrapping_sub(ts.tsecr);
                (elapsed < 1 << 31).then(|| Duration::from_millis(u64::from(elapsed)))
            }
            _ => None,
        };
        if let Some(rtt) = ts_sample {
            self.rtt.sample(rtt, SampleSource::Timestamp);
        } else if let Some((end, sent)) = self.rtt_timed {
            if ack >= end {
                self.rtt.sample(
                    now - sent,
                    SampleSource::SendTime {
                        retransmitted: false,
                    },
                );
                self.rtt_timed = None;
            }
        }
        self.rtt.on_new_data_acked();
        self.retries = 0;

        let outcome = self.cc.on_ack(
            &Ack {
                ack: ack.0,
                bytes_acked: acked,
                flight_size: dist(self.snd_max, ack),
                rtt: self.rtt.srtt(),
            },
            now,
        );
        if outcome == AckOutcome::PartialAck {
            // RFC 6582 §3.2 step 3: retransmit the first unacknowledged segment (with SACK, the
            // first hole not yet retransmitted).
            let from = if self.sack_permitted {
                self.rexmit_hint
            } else {
                self.snd_una
            };
            let hole = self.next_hole(from).unwrap_or((self.snd_una, self.snd_mss));
            self.request_rexmit(hole);
        }
        self.dup_acks = 0;
        if let Some((s, _)) = self.rexmit {
            if s < self.snd_una {
                self.rexmit = None;
            }
        }
        // RFC 6298 §5.2/5.3: stop the timer when all is acknowledged, else restart it.
        self.rto_deadline = (self.snd_una != self.snd_max).then(|| now + self.rtt.rto());
    }

    fn on_dup_ack(&mut self, now: Instant) {
        self.dup_acks += 1;
        if self.dup_acks < 3 && self.sack_permitted && self.sacked_bytes() >= 3 * self.snd_mss {
            // RFC 6675 §4 IsLost(SND.UNA): DupThresh·SMSS bytes SACKed above it mean it is lost
            // even if fewer than DupThresh ACKs said so (a receiver or a batch that ACKs
            // several out-of-order segments at once).
            self.dup_acks = 3;
        }
        let flight = dist(self.snd_max, self.snd_una);
        if self.dup_acks == 3 {
            // RFC 5681 §3.2 step 2 / RFC 6582 §3.2 step 2.
            if self
                .cc
                .on_fast_retransmit(self.snd_una.0, self.snd_max.0, flight, now)
            {
                self.rexmit_hint = self.snd_una;
                let hole = self
                    .next_hole(self.snd_una)
                    .unwrap_or((self.snd_una, self.snd_mss));
                self.request_rexmit(hole);
            }
        } else if self.dup_acks > 3 {
            // RFC 5681 §3.2 step 4: inflate; with SACK also fill the next known hole.
            self.cc.on_dup_ack(now);
            if self.sack_permitted && self.cc.in_recovery() {
                if let Some(hole) = self.next_hole(self.rexmit_hint) {
                    self.request_rexmit(hole);
                }
            }
        }
    }

    fn request_rexmit(&mut self, (seq, len): (SeqNumber, u32)) {
        if self.rexmit.is_none() {
            self.counters.fast_retransmits += 1;
            self.rexmit = Some((seq, len.min(self.snd_mss)));
            self.rexmit_hint = self.rexmit_hint.max_seq(seq + len.min(self.snd_mss));
        }
    }

    /// Records the ACK's SACK blocks that lie within (ack, SND.MAX] (RFC 2018 §3); returns
    /// whether any of them covers bytes the previous blocks did not (RFC 6675 §2's condition
    /// for a duplicate ACK).
    fn update_scoreboard(&mut self, seg: &TcpRepr, ack: SeqNumber) -> bool {
        let mut blocks = SackBlocks::default();
        let mut newly = false;
        for b in seg.options.sack_blocks.as_slice() {
            if b.left >= ack && b.right <= self.snd_max && b.left < b.right {
                blocks.push(*b);
                let known = self.sacked.as_slice().iter().any(|old| {
                    old.left <= b.left && b.right <= old.right && old.right <= self.high_sacked
                });
                newly |= !known;
                self.high_sacked = self.high_sacked.max_seq(b.right);
            }
        }
        if !blocks.is_empty() {
            self.sacked = blocks;
        }
        newly
    }

    /// Bytes above SND.UNA the scoreboard holds as SACKed (blocks are counted once each; the
    /// receiver sends disjoint blocks, RFC 2018 §4). Blocks a cumulative ACK has since covered
    /// count for nothing.
    fn sacked_bytes(&self) -> u32 {
        self.sacked
            .as_slice()
            .iter()
            .map(|b| dist(b.right, b.left.max_seq(self.snd_una)))
            .fold(0, u32::saturating_add)
    }

    /// The first not-SACKed range at or after `from` and below the highest SACKed sequence
    /// number (RFC 6675's "holes", from a simple scoreboard), as (start, length).
    fn next_hole(&self, from: SeqNumber) -> Option<(SeqNumber, u32)> {
        let mut start = from.max_seq(self.snd_una);
        // Skip blocks covering `start` (blocks may be unsorted and overlap; at most 4 passes).
        for _ in 0..=self.sacked.len() {
            match self
                .sacked
                .as_slice()
                .iter()
                .find(|b| start.in_range(b.left, b.right))
            {
                Some(b) => start = b.right,
                None => break,
            }
        }
        if start >= self.high_sacked {
            return None;
        }
        let end = self
            .sacked
            .as_slice()
            .iter()
            .filter(|b| b.left > start)
            .map(|b| b.left)
            .fold(self.high_sacked, SeqNumber::min_seq);
        Some((start, dist(end, start)))
    }

    fn receive_text(
        &mut self,
        now: Instant,
        seq: SeqNumber,
        payload: &[u8],
    ) -> Result<(), DropReason> {
        let window = self.rx.free() as u32;
        match self.reasm.insert(seq.0, payload.len() as u32, window) {
            Insert::Accepted {
                skip,
                offset,
                len,
                in_order,
            } => {
                let (skip, len) = (skip as usize, len as usize);
                self.rx
                    .write_at(self.rx.len() + offset as usize, &payload[skip..skip + len]);
                self.rx.commit(in_order as usize);
                if offset == 0 && self.reasm.is_empty() && in_order as usize == len {
                    // In order, no gap: RFC 9293 §3.8.6.3 delayed ACK, but at least every
                    // second full-sized segment (RFC 5681 §4.2).
                    self.unacked_bytes += in_order;
                    if self.unacked_bytes >= 2 * self.rcv_mss {
                        self.ack_now = true;
                    } else if self.ack_deadline.is_none() {
                        self.ack_deadline = Some(now + self.config.delayed_ack);
                    }
                } else {
                    // Out of order, or filling a gap: ACK at once (RFC 5681 §4.2) so the
                    // sender sees duplicates / the new cumulative ACK and our SACK blocks.
                    self.ack_now = true;
                }
                Ok(())
            }
            Insert::Duplicate | Insert::OutOfWindow => {
                self.ack_now = true;
                Ok(())
            }
            Insert::Dropped => {
                self.ack_now = true;
                Err(DropReason::ReassemblyFull)
            }
        }
    }

    /// Consumes a pending FIN once all data before it has arrived (RFC 9293 §3.10.7.4 eighth
    /// check).
    fn take_fin(&mut self, now: Instant) {
        let Some(fin) = self.fin_pending else {
            return;
        };
        if SeqNumber(self.reasm.rcv_nxt()) != fin || !self.reasm.is_empty() {
            return;
        }
        self.fin_pending = None;
        self.fin_received = true;
        self.ack_now = true;
        match self.state {
            // ESTABLISHED: enter CLOSE-WAIT.
            State::Established => self.state = State::CloseWait,
            // FIN-WAIT-1: TIME-WAIT if our FIN is acknowledged, else CLOSING.
            State::FinWait1 if self.fin_acked => self.enter_time_wait(now),
            State::FinWait1 => self.state = State::Closing,
            // FIN-WAIT-2: enter TIME-WAIT.
            State::FinWait2 => self.enter_time_wait(now),
            // The other states have already received a FIN; nothing changes.
            _ => {}
        }
    }

    /// RFC 5961 §7: at most `challenge_acks_per_sec` challenge ACKs per second.
    fn challenge_ack(&mut self, now: Instant) {
        if now - self.challenge_window.0 >= Duration::from_secs(1) {
            self.challenge_window = (now, 0);
        }
        if self.challenge_window.1 < self.config.challenge_acks_per_sec {
            self.challenge_window.1 += 1;
            self.ack_now = true;
        } else {
            self.counters.challenge_acks_suppressed += 1;
        }
    }
}

// ---------------------------------------------------------------------- sending

impl Tcb {
    /// The window we would advertise now, in bytes, after receiver-side silly window avoidance
    /// (RFC 9293 §3.8.6.2.2): the right edge moves only by at least min(buffer/2, MSS).
    fn window_to_advertise(&self) -> u32 {
        let free = self.rx.free() as u32;
        let current = dist(self.rcv_adv, SeqNumber(self.reasm.rcv_nxt())).min(free);
        let threshold = (self.rx.capacity() as u32 / 2).min(self.rcv_mss).max(1);
        if free >= current + threshold {
            free
        } else {
            current
        }
    }

    /// Whether reading has opened the window enough to tell the peer unprompted: by at least
    /// the SWS threshold and to at least twice what it has now.
    fn window_update_due(&self) -> bool {
        if self.fin_received || self.state == State::Closed {
            return false;
        }
        let current = dist(self.rcv_adv, SeqNumber(self.reasm.rcv_nxt()));
        let new = self.window_to_advertise();
        new > current && new >= current.saturating_mul(2)
    }

    /// Fills in the header of an outgoing segment (ACK, window, timestamps, SACK blocks).
    fn header(&self, now: Instant, seq: SeqNumber, flags: TcpFlags) -> (TcpRepr, SeqNumber) {
        let wnd = self.window_to_advertise();
        let field = (wnd >> self.rcv_wscale).min(u32::from(u16::MAX));
        let rcv_nxt = self.rcv_nxt();
        // The window counts from the data's RCV.NXT: a received FIN takes a sequence number
        // but no buffer space.
        let adv = self
            .rcv_adv
            .max_seq(SeqNumber(self.reasm.rcv_nxt()) + (field << self.rcv_wscale));
        let mut options = TcpOptions::default();
        if let Some(off) = self.ts_offset {
            options.timestamps = Some(Timestamps {
                tsval: now.ts_millis().wrapping_add(off),
                tsecr: self.ts_recent,
            });
        }
        if self.sack_permitted && !self.reasm.is_empty() {
            let mut out = [reassembly::SackBlock::default(); crate::wire::MAX_SACK_BLOCKS];
            let room = options.max_sack_blocks().min(out.len());
            let n = self.reasm.sack_blocks(&mut out[..room]);
            for b in &out[..n] {
                options.sack_blocks.push(SackBlock {
                    left: SeqNumber(b.left),
                    right: SeqNumber(b.right),
                });
            }
        }
        let repr = TcpRepr {
            src_port: self.local_port,
            dst_port: self.remote_port,
            seq,
            ack: Some(rcv_nxt),
            flags,
            window: field as u16,
            options,
            payload_len: 0,
        };
        (repr, adv)
    }

    /// Bookkeeping after any segment carrying an ACK went out.
    fn sent_ack(&mut self, adv: SeqNumber) {
        self.rcv_adv = adv;
        self.last_ack_sent = self.rcv_nxt();
        self.ack_now = false;
        self.ack_deadline = None;
        self.unacked_bytes = 0;
    }

    /// Payload room in a segment with `repr`'s options.
    fn room(&self, repr: &TcpRepr) -> u32 {
        let ts = if self.ts_offset.is_some() { 12 } else { 0 };
        let extra = repr.options.encoded_len().saturating_sub(ts) as u32;
        self.snd_mss.saturating_sub(extra).max(1)
    }

    /// Emits the segment at `seq` with up to `max` bytes of queued data (and our FIN if it
    /// follows them and `fin_ok`); returns the bytes and whether the FIN went.
    fn emit_data<E>(
        &mut self,
        now: Instant,
        seq: SeqNumber,
        max: u32,
        fin_ok: bool,
        emit: &mut impl FnMut(&TcpRepr, Payload<'_>) -> Result<(), E>,
    ) -> Result<(u32, bool), E> {
        let (mut repr, adv) = self.header(now, seq, TcpFlags::NONE);
        let off = dist(seq, self.snd_una);
        let avail = (self.tx.len() as u32).saturating_sub(off);
        let len = max.min(avail).min(self.room(&repr));
        let fin = fin_ok && self.fin_queued && !self.fin_acked && seq + len == self.fin_seq();
        if len > 0 && len == avail {
            repr.flags |= TcpFlags::PSH;
        }
        if fin {
            repr.flags |= TcpFlags::FIN;
        }
        repr.payload_len = len as usize;
        let (first, second) = self.tx.slices(off as usize, len as usize);
        emit(&repr, Payload { first, second })?;
        self.sent_ack(adv);
        if self.rto_deadline.is_none() {
            self.rto_deadline = Some(now + self.rtt.rto());
        }
        Ok((len, fin))
    }

    /// Produces the segments due at `now` through `emit` (data within min(cwnd, SND.WND) in MSS
    /// pieces, retransmissions, probes, FIN, ACKs, RST). `emit` returning `Err` stops the poll
    /// with that segment not sent (e.g. no TX frame free); the state stays consistent and the
    /// next poll retries. Returns how many segments went out.
    pub fn poll_transmit<E>(
        &mut self,
        now: Instant,
        mut emit: impl FnMut(&TcpRepr, Payload<'_>) -> Result<(), E>,
    ) -> Result<usize, E> {
        if self.rst_pending {
            // RFC 9293 §3.10.5 ABORT / §3.8.3 R2: <SEQ=SND.NXT><CTL=RST>, with the highest
            // SND.NXT (an RTO may have rewound ours) so that the peer finds it in its window.
            let repr = TcpRepr {
                src_port: self.local_port,
                dst_port: self.remote_port,
                seq: self.snd_max,
                ack: None,
                flags: TcpFlags::RST,
                window: 0,
                options: TcpOptions::default(),
                payload_len: 0,
            };
            emit(
                &repr,
                Payload {
                    first: &[],
                    second: &[],
                },
            )?;
            self.rst_pending = false;
            return Ok(1);
        }
        if self.state == State::Closed {
            return Ok(0);
        }
        if self.released && self.orphan_deadline.is_none() && self.state != State::TimeWait {
            // The first poll after `release` (which had no clock): the orphan clock starts.
            self.orphan_deadline = self.config.orphan_timeout.map(|d| now + d);
        }
        let mut sent = 0;

        if self.ka_pending {
            // RFC 9293 §3.8.4: a keep-alive is an ACK with SEG.SEQ = SND.NXT − 1 (and no
            // data): outside the peer's window, so it must answer with an ACK.
            let (repr, adv) = self.header(now, self.snd_max - 1, TcpFlags::NONE);
            emit(
                &repr,
                Payload {
                    first: &[],
                    second: &[],
                },
            )?;
            self.sent_ack(adv);
            self.ka_pending = false;
            sent += 1;
        }

        if let Some((seq, max)) = self.rexmit {
            // Karn: whatever covers a retransmitted segment cannot time it.
            self.rtt_timed = None;
            let fin_ok = self.snd_max == self.fin_seq() + 1;
            // Only what was sent before: bytes past SND.MAX are new data, sent (and counted in
            // SND.MAX) by the loop below.
            let max = max.min(dist(self.snd_max, seq));
            self.emit_data(now, seq, max, fin_ok, &mut emit)?;
            self.rexmit = None;
            sent += 1;
        }

        if self.probe_pending {
            // Zero-window probe: one new byte beyond the window (RFC 9293 §3.8.6.1).
            let seq = self.snd_nxt;
            let (len, fin) = self.emit_data(now, seq, 1, true, &mut emit)?;
            self.probe_pending = false;
            self.advance_snd_nxt(seq, len + u32::from(fin), now);
            sent += 1;
        }

        loop {
            let in_flight = dist(self.snd_nxt, self.snd_una);
            let queued = self.tx.len() as u32;
            let unsent = queued.saturating_sub(in_flight);
            let fin_due = self.fin_queued && !self.fin_acked && self.snd_nxt == self.fin_seq();
            let usable = self.cc.cwnd().min(self.snd_wnd).saturating_sub(in_flight);
            let len = unsent.min(self.snd_mss).min(usable);
            if len == 0 && !(fin_due && unsent == 0) {
                break;
            }
            if len > 0 && len < self.snd_mss {
                // Sender SWS avoidance (RFC 9293 §3.8.6.2.1): send a short segment only if it
                // carries everything queued, or fills half the largest window seen, or nothing
                // is in flight (the override that keeps a small window from stalling us).
                let sws_ok = len == unsent || len >= self.max_snd_wnd / 2 || in_flight == 0;
                // Nagle (RFC 9293 §3.7.4): no short segment while data is unacknowledged.
                let nagle_ok = !self.config.nagle || in_flight == 0;
                if !sws_ok || !nagle_ok {
                    break;
                }
            }
            let seq = self.snd_nxt;
            let (n, fin) = self.emit_data(now, seq, len, true, &mut emit)?;
            self.advance_snd_nxt(seq, n + u32::from(fin), now);
            sent += 1;
            if fin || n == 0 {
                break;
            }
        }

        // Persist timer (RFC 9293 §3.8.6.1): data waits, the window is shut and nothing is in
        // flight to bring an ACK that would reopen it.
        let unsent = (self.tx.len() as u32).saturating_sub(dist(self.snd_nxt, self.snd_una));
        if self.snd_wnd == 0
            && unsent > 0
            && self.snd_una == self.snd_max
            && self.rto_deadline.is_none()
        {
            self.rto_deadline = Some(now + self.rtt.rto());
        }

        if sent == 0 && (self.ack_now || self.window_update_due()) {
            // SND.MAX, not a rewound SND.NXT: a sequence number below the peer's RCV.NXT
            // would make the ACK unacceptable there, and its ACK field would be ignored.
            let (repr, adv) = self.header(now, self.snd_max, TcpFlags::NONE);
            emit(
                &repr,
                Payload {
                    first: &[],
                    second: &[],
                },
            )?;
            self.sent_ack(adv);
            sent += 1;
        }
        Ok(sent)
    }

    fn advance_snd_nxt(&mut self, seq: SeqNumber, len: u32, now: Instant) {
        let end = seq + len;
        if end > self.snd_max {
            if self.rtt_timed.is_none() && seq >= self.snd_max {
                self.rtt_timed = Some((end, now));
            }
            self.snd_max = end;
        }
        self.snd_nxt = self.snd_nxt.max_seq(end);
    }
}

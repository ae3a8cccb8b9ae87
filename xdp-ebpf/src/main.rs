//! tern's XDP programs.
//!
//! `tern_xdp` runs on every frame an interface receives. It parses Ethernet (with at most one
//! 802.1Q/802.1ad tag), IPv4 (options, fragment detection) or IPv6 (fixed header) and TCP, and
//! decides, in this order:
//! 1. **Blocklist**: an IPv4/IPv6 packet whose source matches a prefix in the LPM trie of its
//!    family is dropped (`XDP_DROP`, `blocked`). Checked right after the IP header, before
//!    anything above it, so a blocked source cannot reach a listener, the kernel or tern.
//! 2. **Per-source SYN limit** (when `XdpConfig::syn_interval_ns` is set): a SYN to a listener
//!    (bypass or kernel, see below) whose source address is ahead of its GCRA schedule in the
//!    LRU map is dropped (`XDP_DROP`, `rate_limited`). Likewise, with
//!    `XdpConfig::unknown_interval_ns` set, a non-SYN segment to a *kernel* listener whose
//!    4-tuple the kernel holds no connection for (`bpf_skc_lookup_tcp`): ACK/RST floods.
//! 3. **Listen set**: a complete TCP header whose destination (address, port) is in the listen
//!    map with `LISTEN_STEER`, exactly or through the wildcard address of its family, is
//!    steered (a `LISTEN_LIMIT` entry, a kernel listener, is passed after step 2): redirected
//!    to the AF_XDP socket in `XSKMAP[queue * workers + flow_hash % workers]` (`steered`), or passed to
//!    the kernel when that slot holds no socket for this queue (`no_socket`). With the config's
//!    `reflect` flag set it is instead answered in place with `XDP_TX` (`steered`). With
//!    `syn_cookies` set, a SYN (IPv4, untagged) is first handed by tail call to
//!    `tern_syn_cookie` ([`cookie`]), which answers it with the stack's cookie SYN-ACK
//!    (`XDP_TX`, `syn_cookies`) or, if it cannot, steers it as above.
//! 4. **PMTU signals for a listener's flows**: an ICMPv4 "fragmentation needed" (type 3 code 4,
//!    RFC 792 / RFC 1191) or ICMPv6 "packet too big" (type 2, RFC 4443 §3.2) whose quoted packet
//!    is a TCP segment *from* a listener (quoted source (address, port) in the listen map, exact
//!    or wildcard) goes to the XSKMAP slot of the worker owning that flow. The quoted segment
//!    travels server → client, so the hash swaps it back into the client's order:
//!    `flow_hash(quoted dst, quoted src, quoted dport, quoted sport)`, the value the flow's own
//!    segments hash to. Counted `steered` / `no_socket` like TCP (in reflect mode: `passed`).
//!    The quote must hold the inner IP header and the first 8 TCP bytes (ports and sequence
//!    number, what RFC 792 guarantees); a shorter quote, or any other ICMP, is the kernel's.
//! 5. Everything else goes to the kernel (`XDP_PASS`, `passed`): other addresses and ports,
//!    non-TCP, non-IP (ARP, LLDP), IPv6 with extension headers, and IPv4 fragments (first
//!    fragments too: without reassembly a fragment's flow cannot be identified reliably, and
//!    the kernel reassembles them). Frames too short for a header they announce, or with an
//!    impossible version/length, are passed too and counted `malformed`: the kernel drops
//!    garbage itself, and passing keeps whatever the parser does not understand working.
//!
//! Each frame lands in exactly one of `steered`, `passed`, `no_socket`, `blocked`,
//! `rate_limited`, `syn_cookies`; see
//! `tern_common::XdpStats` for every counter.
//!
//! `tern_pass` passes every frame untouched. It exists for the peer end of a veth pair in tests
//! and the benchmark rig: veth hands `XDP_TX`/redirected frames only to a peer that runs XDP.
//!
//! This file owns the per-packet decision only. Map layouts, names, the flow hash and the XSKMAP
//! index rule live in `tern-common`; loading, attaching and filling the maps is `tern::xdp`'s job.
//!
//! Formats: Ethernet II and IEEE 802.1Q tags; IPv4 header, RFC 791 §3.1 (IHL, MF flag, fragment
//! offset); IPv6 fixed header, RFC 8200 §3 (extension headers are not walked); TCP header,
//! RFC 9293 §3.1 (data offset); Internet checksum, RFC 1071 (why reflection keeps it valid);
//! ICMPv4 destination unreachable, RFC 792 (quoted header + 64 bits); ICMPv6 packet too big,
//! RFC 4443 §3.2.
//!
//! The object also carries the test-only loss-injection programs of [`loss`] (`tern_loss`,
//! `tern_loss_tc`), which tern never loads.
//!
//! Verifier notes: every packet access goes through [`ptr_at`], [`ptr_at_mut`] or
//! [`check_range`], which compare against `data_end` right before the access; variable offsets
//! come from 4-bit fields times four, so the verifier can bound them. No loops (the flow hash,
//! SipHash over a fixed 36 bytes, unrolls to straight-line code), no logging, and no panicking
//! operation on this path.

#![no_std]
#![no_main]

mod cookie;
mod loss;

use core::mem::{size_of, swap};

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock_tuple, xdp_action},
    helpers::bpf_ktime_get_ns,
    helpers::generated::{bpf_sk_release, bpf_skc_lookup_tcp},
    macros::{map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, XskMap, lpm_trie::Key},
    programs::XdpContext,
};
use tern_common::{
    BLOCK_MAP_ENTRIES, CONFIG_ENTRIES, CONFIG_INDEX, HANDOVER_KERNEL_KEEPS, HANDOVER_KERNEL_NEW,
    IPV4_MAPPED_UNSPECIFIED, LISTEN_LIMIT, LISTEN_MAP_ENTRIES, LISTEN_STEER, ListenKey,
    PROG_MAP_ENTRIES, PROG_SYN_COOKIE, SOURCE_RATE_ENTRIES, SourceRate, XDP_STATS_ENTRIES,
    XDP_STATS_INDEX, XSK_MAP_ENTRIES, XdpConfig, XdpStats, flow_hash, gcra, ipv4_mapped, xsk_index,
};

// Every map's static name must equal its `tern_common` constant (the `#[map]` macro takes the
// static's name); `tern::xdp` finds each map by that constant and fails to attach without it.

/// Per-CPU counters (`tern_common::XDP_STATS_MAP`).
#[map]
static TERN_XDP_STATS: PerCpuArray<XdpStats> = PerCpuArray::with_max_entries(XDP_STATS_ENTRIES, 0);

/// The listen set (`tern_common::LISTEN_MAP`); values are reserved flags, only presence counts.
#[map]
static TERN_LISTEN: HashMap<ListenKey, u32> = HashMap::with_max_entries(LISTEN_MAP_ENTRIES, 0);

/// AF_XDP sockets by (queue, worker) slot (`tern_common::XSK_MAP`).
#[map]
static TERN_XSKS: XskMap = XskMap::with_max_entries(XSK_MAP_ENTRIES, 0);

/// Worker count and reflect flag (`tern_common::CONFIG_MAP`).
#[map]
static TERN_CONFIG: Array<XdpConfig> = Array::with_max_entries(CONFIG_ENTRIES, 0);

/// IPv4 source blocklist (`tern_common::BLOCK_V4_MAP`); the constructor adds BPF_F_NO_PREALLOC.
#[map]
static TERN_BLOCK_V4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(BLOCK_MAP_ENTRIES, 0);

/// IPv6 source blocklist (`tern_common::BLOCK_V6_MAP`).
#[map]
static TERN_BLOCK_V6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(BLOCK_MAP_ENTRIES, 0);

/// Per-source rate schedules (`tern_common::SOURCE_RATE_MAP`). One map shared by all CPUs:
/// two CPUs updating one source at the same instant may each let a SYN through, so the limit
/// is exact per CPU and approximate across them (a source cannot choose its CPU on a NIC with
/// RSS, and on veth it is the sender's CPU).
#[map]
static TERN_SRC_RATE: LruHashMap<[u8; 16], SourceRate> =
    LruHashMap::with_max_entries(SOURCE_RATE_ENTRIES, 0);

/// Tail-call targets (`tern_common::PROG_MAP`): the SYN-cookie program in `PROG_SYN_COOKIE`.
#[map]
static TERN_PROGS: ProgramArray = ProgramArray::with_max_entries(PROG_MAP_ENTRIES, 0);

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
/// TCP flags byte: SYN and ACK (RFC 9293 §3.1).
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// `TCP_LISTEN` in the kernel's socket states (include/net/tcp_states.h): what a socket
/// lookup finds when no connection of the kernel's own matches the 4-tuple.
const TCP_LISTEN: u32 = 10;
/// ICMPv4 destination unreachable / fragmentation needed and DF set (RFC 792, RFC 1191).
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
/// ICMPv6 packet too big (RFC 4443 §3.2).
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
/// IPv4 fragment offset alone: a quoted packet with a non-zero offset carries no TCP header.
const IPV4_OFFSET: u16 = 0x1fff;
/// IPv4 flags+fragment-offset field: MF flag and the 13-bit offset. DF (0x4000) is not part of
/// fragmentation state.
const IPV4_MF_OR_OFFSET: u16 = 0x3fff;

// Header layouts made only of bytes and byte arrays: alignment 1, so a read or write at any
// offset is valid, and multi-byte fields are decoded explicitly from network byte order.

#[repr(C)]
struct EthHdr {
    dst: [u8; 6],
    src: [u8; 6],
    ether_type: [u8; 2],
}

/// The 4 bytes that follow the TPID: tag control information, then the inner EtherType.
#[repr(C)]
struct VlanTag {
    _tci: [u8; 2],
    ether_type: [u8; 2],
}

#[repr(C)]
struct Ipv4Hdr {
    version_ihl: u8,
    _tos: u8,
    _total_len: [u8; 2],
    _id: [u8; 2],
    flags_fragment: [u8; 2],
    _ttl: u8,
    protocol: u8,
    _checksum: [u8; 2],
    src: [u8; 4],
    dst: [u8; 4],
}

#[repr(C)]
struct Ipv6Hdr {
    version_class_flow: [u8; 4],
    _payload_len: [u8; 2],
    next_header: u8,
    _hop_limit: u8,
    src: [u8; 16],
    dst: [u8; 16],
}

#[repr(C)]
struct TcpHdr {
    src_port: [u8; 2],
    dst_port: [u8; 2],
    _seq: [u8; 4],
    _ack: [u8; 4],
    /// Data offset in the high 4 bits of the first byte (in 32-bit words), then flags.
    offset_flags: [u8; 2],
    _window: [u8; 2],
    _checksum: [u8; 2],
    _urgent: [u8; 2],
}

/// The fixed 8 bytes of an ICMPv4 error or ICMPv6 packet-too-big message; the quoted packet
/// follows.
#[repr(C)]
struct IcmpHdr {
    kind: u8,
    code: u8,
    _checksum: [u8; 2],
    /// Unused / next-hop MTU (ICMPv4), MTU (ICMPv6).
    _rest: [u8; 4],
}

/// The first 8 bytes of a quoted TCP header: all an ICMPv4 error is guaranteed to carry.
#[repr(C)]
struct QuotedTcp {
    src_port: [u8; 2],
    dst_port: [u8; 2],
    _seq: [u8; 4],
}

/// A header announced by the layer outside it does not fit in the frame, or carries an
/// impossible version or length.
struct Malformed;

/// Where the IP header sits and which family it is; what reflection needs to find it again.
#[derive(Clone, Copy)]
enum Ip {
    V4 { offset: usize },
    V6 { offset: usize },
}

/// A TCP segment's 4-tuple (addresses as in `tern_common::ListenKey`, ports in host order) and
/// where its headers are.
struct Flow {
    src: [u8; 16],
    dst: [u8; 16],
    src_port: u16,
    dst_port: u16,
    ip: Ip,
    tcp_offset: usize,
    /// SYN set and ACK clear: the first segment of a new flow.
    syn: bool,
}

/// The flow an ICMP PMTU message is about, in the client's order (the quoted segment's
/// destination is the client).
struct Quoted {
    client: [u8; 16],
    server: [u8; 16],
    client_port: u16,
    server_port: u16,
    /// Family of the quoted packet (which wildcard listener applies).
    v4: bool,
}

/// What the parser decided, before the listen set is consulted.
enum Frame {
    /// A complete TCP header in an unfragmented IPv4 packet or directly after an IPv6 header,
    /// from a source that is not blocked.
    Tcp(Flow),
    /// An ICMP "fragmentation needed" / "packet too big" quoting a TCP segment, from a source
    /// that is not blocked.
    Icmp(Quoted),
    /// The source matches a blocklist prefix.
    Blocked,
    /// Anything else: the kernel handles it.
    Pass,
}

#[xdp]
pub fn tern_xdp(ctx: XdpContext) -> u32 {
    match try_tern_xdp(&ctx) {
        Ok(action) => action,
        Err(()) => xdp_action::XDP_ABORTED,
    }
}

/// Passes every frame; no parsing, no maps, so there is nothing to fail (no `try_` split).
#[xdp]
pub fn tern_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// `Err` only if the stats map cannot be looked up, which means the object or its loader is
/// broken; `XDP_ABORTED` makes that visible through the `xdp:xdp_exception` tracepoint.
#[inline(always)]
fn try_tern_xdp(ctx: &XdpContext) -> Result<u32, ()> {
    let stats = TERN_XDP_STATS.get_ptr_mut(XDP_STATS_INDEX).ok_or(())?;
    // SAFETY: the pointer comes from a successful lookup of this CPU's slot in a per-CPU array,
    // so it is valid and aligned for `XdpStats`. XDP runs with preemption disabled and is not
    // re-entered on the same CPU, so nothing else writes this slot while we hold the reference.
    let stats = unsafe { &mut *stats };
    stats.packets += 1;
    let frame = match parse(ctx, stats) {
        Ok(frame) => frame,
        Err(Malformed) => {
            stats.malformed += 1;
            Frame::Pass
        }
    };
    // Exactly one terminal counter per frame, on every path below.
    Ok(match frame {
        Frame::Tcp(flow) => {
            let flags = listener_flags(&flow);
            if flags == 0 {
                stats.passed += 1;
                xdp_action::XDP_PASS
            } else if (flow.syn && !conforms(&flow.src, Limit::Syn))
                || (!flow.syn
                    && flags & LISTEN_LIMIT != 0
                    && unknown_limited()
                    && !kernel_holds(ctx, &flow)
                    && !conforms(&flow.src, Limit::Unknown))
            {
                stats.rate_limited += 1;
                xdp_action::XDP_DROP
            } else if flags & LISTEN_STEER != 0 {
                steer(ctx, &flow, stats)
            } else {
                // A kernel listener: the limits were all it came for.
                stats.passed += 1;
                xdp_action::XDP_PASS
            }
        }
        Frame::Icmp(quoted)
            if listening_flags(quoted.server, quoted.server_port, quoted.v4) & LISTEN_STEER
                != 0 =>
        {
            steer_icmp(ctx, &quoted, stats)
        }
        Frame::Icmp(_) | Frame::Pass => {
            stats.passed += 1;
            xdp_action::XDP_PASS
        }
        Frame::Blocked => {
            stats.blocked += 1;
            xdp_action::XDP_DROP
        }
    })
}

/// The listen-map flags of the flow's destination (`LISTEN_STEER`, `LISTEN_LIMIT`): the exact
/// (address, port), or the wildcard address of the packet's family with that port; 0 if
/// neither is a listener.
#[inline(always)]
fn listener_flags(flow: &Flow) -> u32 {
    listening_flags(flow.dst, flow.dst_port, matches!(flow.ip, Ip::V4 { .. }))
}

/// The listen-map flags of (`addr`, `port`), exactly or through the wildcard address of its
/// family (`v4`: IPv4-mapped); 0 if it is not in the listen set.
#[inline(always)]
fn listening_flags(addr: [u8; 16], port: u16, v4: bool) -> u32 {
    if let Some(flags) = TERN_LISTEN.get_ptr(ListenKey::new(addr, port)) {
        // SAFETY: a successful lookup's pointer is valid for the value's 4 bytes.
        return unsafe { *flags };
    }
    let wildcard = if v4 { IPV4_MAPPED_UNSPECIFIED } else { [0; 16] };
    match TERN_LISTEN.get_ptr(ListenKey::new(wildcard, port)) {
        // SAFETY: as above.
        Some(flags) => unsafe { *flags },
        None => 0,
    }
}

/// Which per-source schedule a segment counts against.
#[derive(Clone, Copy)]
enum Limit {
    /// SYNs (without ACK) to any listener.
    Syn,
    /// Non-SYN segments of flows the kernel does not hold, to kernel listeners.
    Unknown,
}

/// Whether the unknown-flow limit is on (checked before the socket lookup it needs).
#[inline(always)]
fn unknown_limited() -> bool {
    TERN_CONFIG
        .get(CONFIG_INDEX)
        .is_some_and(|config| config.unknown_interval_ns != 0)
}

/// Whether a segment from `src` fits its source's `limit` schedule (`XdpConfig`'s interval and
/// burst for that limit); always true when that limit is off. Updates the schedule when it
/// does. A source the map cannot take (the LRU evicts for us, so only a failed insert) is let
/// through: the limit must never drop a legitimate client because of memory.
#[inline(always)]
fn conforms(src: &[u8; 16], limit: Limit) -> bool {
    // No copy of the config: stack room (see `steer`).
    let Some(config) = TERN_CONFIG.get(CONFIG_INDEX) else {
        return true;
    };
    let (interval, burst) = match limit {
        Limit::Syn => (config.syn_interval_ns, config.syn_burst_ns),
        Limit::Unknown => (config.unknown_interval_ns, config.unknown_burst_ns),
    };
    if interval == 0 {
        return true;
    }
    // SAFETY: a helper without arguments or side effects.
    let now = unsafe { bpf_ktime_get_ns() };
    match TERN_SRC_RATE.get_ptr_mut(src) {
        Some(rate) => {
            // SAFETY: a successful lookup's pointer is valid for the value and aligned; a
            // concurrent update from another CPU can at worst lose one step (see the map).
            let rate = unsafe { &mut *rate };
            let tat = match limit {
                Limit::Syn => &mut rate.syn_tat,
                Limit::Unknown => &mut rate.unknown_tat,
            };
            match gcra(*tat, now, interval, burst) {
                Some(next) => {
                    *tat = next;
                    true
                }
                None => false,
            }
        }
        None => {
            let mut first = SourceRate::default();
            let tat = now.saturating_add(interval);
            match limit {
                Limit::Syn => first.syn_tat = tat,
                Limit::Unknown => first.unknown_tat = tat,
            }
            let _ = TERN_SRC_RATE.insert(src, first, 0);
            true
        }
    }
}

/// Hands a PMTU message about a listener's flow to that flow's worker; counts `steered` or
/// `no_socket`. In reflect mode there is no worker to tell, so the kernel gets it (`passed`).
#[inline(always)]
fn steer_icmp(ctx: &XdpContext, quoted: &Quoted, stats: &mut XdpStats) -> u32 {
    // By reference, not a copy: the program's stack (512 bytes) is shared with the SYN-cookie
    // call. An array's only index always exists; were it missing, nothing could be steered.
    let Some(config) = TERN_CONFIG.get(CONFIG_INDEX) else {
        stats.no_socket += 1;
        return xdp_action::XDP_PASS;
    };
    if config.reflect != 0 {
        stats.passed += 1;
        return xdp_action::XDP_PASS;
    }
    let hash = flow_hash(
        &config.steer_key,
        &quoted.client,
        &quoted.server,
        quoted.client_port,
        quoted.server_port,
    );
    redirect(ctx, config.workers, hash, stats)
}

/// Hands a listener's segment on; counts `steered` or `no_socket` (exactly one).
#[inline(always)]
fn steer(ctx: &XdpContext, flow: &Flow, stats: &mut XdpStats) -> u32 {
    // By reference, not a copy: the program's stack (512 bytes) is shared with the SYN-cookie
    // call. An array's only index always exists; were it missing, nothing could be steered.
    let Some(config) = TERN_CONFIG.get(CONFIG_INDEX) else {
        stats.no_socket += 1;
        return xdp_action::XDP_PASS;
    };
    if config.reflect != 0 {
        return match reflect(ctx, flow) {
            Ok(()) => {
                stats.steered += 1;
                xdp_action::XDP_TX
            }
            // Parsing saw these headers moments ago; if they moved, let the kernel have it.
            Err(Malformed) => {
                stats.no_socket += 1;
                xdp_action::XDP_PASS
            }
        };
    }
    // During a binary upgrade (docs/architecture.md, "Binary upgrade on the bypass path"): the
    // new tern serves new flows on kernel sockets, and later the flows it accepted there.
    if config.handover != 0 {
        let to_kernel = (config.handover & HANDOVER_KERNEL_NEW != 0 && flow.syn)
            || (config.handover & HANDOVER_KERNEL_KEEPS != 0 && kernel_holds(ctx, flow));
        if to_kernel {
            stats.passed += 1;
            return xdp_action::XDP_PASS;
        }
    }
    // A SYN answered here never costs a worker anything (`[xdp] syn_cookies = "xdp"`).
    if flow.syn
        && config.syn_cookies != 0
        && matches!(flow.ip, Ip::V4 { offset: 14 })
        && flow.tcp_offset == 34
    {
        // SAFETY: the slot holds an XDP program of this object (or nothing); on success the
        // call does not return and `tern_syn_cookie` counts the frame's fate.
        unsafe { TERN_PROGS.tail_call(ctx, PROG_SYN_COOKIE) };
        // Only reached if the slot is empty: the worker answers.
    }
    let hash = flow_hash(
        &config.steer_key,
        &flow.src,
        &flow.dst,
        flow.src_port,
        flow.dst_port,
    );
    redirect(ctx, config.workers, hash, stats)
}

/// The 4-tuple as `bpf_sock_tuple.ipv4` lays it out: addresses and ports in network order,
/// packet's source first.
#[repr(C)]
struct SockTupleV4 {
    saddr: [u8; 4],
    daddr: [u8; 4],
    sport: [u8; 2],
    dport: [u8; 2],
}

/// `bpf_sock_tuple.ipv6`.
#[repr(C)]
struct SockTupleV6 {
    saddr: [u8; 16],
    daddr: [u8; 16],
    sport: [u8; 2],
    dport: [u8; 2],
}

/// Whether the kernel holds `flow` as a connection of its own: a request (SYN-RECV),
/// established or time-wait socket. A lookup that finds only the listener (the new tern's
/// kernel socket on the same port) or nothing means the flow is an AF_XDP socket's.
#[inline(always)]
fn kernel_holds(ctx: &XdpContext, flow: &Flow) -> bool {
    let (v4, v6);
    let (tuple, size) = match flow.ip {
        Ip::V4 { .. } => {
            let s = &flow.src;
            let d = &flow.dst;
            v4 = SockTupleV4 {
                saddr: [s[12], s[13], s[14], s[15]],
                daddr: [d[12], d[13], d[14], d[15]],
                sport: flow.src_port.to_be_bytes(),
                dport: flow.dst_port.to_be_bytes(),
            };
            (
                &v4 as *const SockTupleV4 as *mut bpf_sock_tuple,
                size_of::<SockTupleV4>(),
            )
        }
        Ip::V6 { .. } => {
            v6 = SockTupleV6 {
                saddr: flow.src,
                daddr: flow.dst,
                sport: flow.src_port.to_be_bytes(),
                dport: flow.dst_port.to_be_bytes(),
            };
            (
                &v6 as *const SockTupleV6 as *mut bpf_sock_tuple,
                size_of::<SockTupleV6>(),
            )
        }
    };
    // SAFETY: `tuple` points to a live stack value of `size` bytes laid out as the helper's
    // `bpf_sock_tuple` member for the family; the helper only reads it. The socket it returns
    // is released below on the only path that got one.
    let sk = unsafe {
        bpf_skc_lookup_tcp(
            ctx.ctx.cast(),
            tuple,
            size as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a non-null result is a referenced socket; `state` is readable from any socket
    // the helper returns (sock_common included).
    let state = unsafe { (*sk).state };
    // SAFETY: releases the reference the lookup took, exactly once.
    unsafe { bpf_sk_release(sk.cast()) };
    state != TCP_LISTEN
}

/// Redirects the frame to the AF_XDP socket of the worker owning the flow with hash `hash` on
/// the receiving queue; counts `steered` or `no_socket` (exactly one).
#[inline(always)]
fn redirect(ctx: &XdpContext, workers: u32, hash: u32, stats: &mut XdpStats) -> u32 {
    let queue = ctx.rx_queue_index();
    let Some(index) = xsk_index(queue, workers, hash) else {
        stats.no_socket += 1;
        return xdp_action::XDP_PASS;
    };
    // An empty slot would make the redirect fall back to XDP_PASS anyway; looking first lets
    // us count it. A socket bound to another queue would make the kernel drop the frame, so
    // that is treated as "no socket" too (userspace registered it in the wrong slot).
    if TERN_XSKS.get(index) != Some(queue) {
        stats.no_socket += 1;
        return xdp_action::XDP_PASS;
    }
    match TERN_XSKS.redirect(index, u64::from(xdp_action::XDP_PASS)) {
        Ok(action) => {
            stats.steered += 1;
            action
        }
        // The socket went away between the lookup and the redirect.
        Err(_) => {
            stats.no_socket += 1;
            xdp_action::XDP_PASS
        }
    }
}

/// Turns the frame around in place: Ethernet destination/source, IP source/destination and TCP
/// source/destination ports are swapped; everything else (VLAN tag, TTL, sequence numbers,
/// flags, payload) is left as it is.
///
/// No checksum needs updating. The IPv4 header checksum and the TCP checksum (RFC 9293 §3.1,
/// whose pseudo-header holds both addresses) are ones' complement sums of 16-bit words
/// (RFC 1071). Both addresses, and both ports, start at even offsets within the summed data and
/// have the same length, so a swap only exchanges which position a word is summed at; the sum,
/// being commutative, is unchanged, and so is the stored checksum. (IPv6 has no header checksum;
/// its TCP pseudo-header has the same property.)
#[inline(always)]
fn reflect(ctx: &XdpContext, flow: &Flow) -> Result<(), Malformed> {
    let eth: *mut EthHdr = ptr_at_mut(ctx, 0)?;
    // SAFETY: `ptr_at_mut` checked that the whole `EthHdr` lies inside the frame; alignment is
    // 1; the two fields do not overlap. The frame is ours to modify until we return.
    unsafe { swap(&mut (*eth).dst, &mut (*eth).src) };
    match flow.ip {
        Ip::V4 { offset } => {
            let ip: *mut Ipv4Hdr = ptr_at_mut(ctx, offset)?;
            // SAFETY: as above, for the fixed IPv4 header.
            unsafe { swap(&mut (*ip).src, &mut (*ip).dst) };
        }
        Ip::V6 { offset } => {
            let ip: *mut Ipv6Hdr = ptr_at_mut(ctx, offset)?;
            // SAFETY: as above, for the fixed IPv6 header.
            unsafe { swap(&mut (*ip).src, &mut (*ip).dst) };
        }
    }
    let tcp: *mut TcpHdr = ptr_at_mut(ctx, flow.tcp_offset)?;
    // SAFETY: as above, for the fixed TCP header.
    unsafe { swap(&mut (*tcp).src_port, &mut (*tcp).dst_port) };
    Ok(())
}

/// Walks the headers from the outside in, counting each complete layer (see `XdpStats` for the
/// counting rule). `Err` means the first layer that did not fit; the caller counts it.
#[inline(always)]
fn parse(ctx: &XdpContext, stats: &mut XdpStats) -> Result<Frame, Malformed> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked that the whole `EthHdr` lies inside the frame; alignment is 1.
    let mut ether_type = u16::from_be_bytes(unsafe { (*eth).ether_type });
    let mut offset = size_of::<EthHdr>();

    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let tag: *const VlanTag = ptr_at(ctx, offset)?;
        // SAFETY: `ptr_at` checked that the whole tag lies inside the frame; alignment is 1.
        ether_type = u16::from_be_bytes(unsafe { (*tag).ether_type });
        offset += size_of::<VlanTag>();
        stats.vlan += 1;
    }

    match ether_type {
        ETH_P_IPV4 => parse_ipv4(ctx, offset, stats),
        ETH_P_IPV6 => parse_ipv6(ctx, offset, stats),
        // ARP, LLDP, a second (QinQ) tag, ...: not ours to parse.
        _ => {
            stats.other += 1;
            Ok(Frame::Pass)
        }
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, offset: usize, stats: &mut XdpStats) -> Result<Frame, Malformed> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, offset)?;
    // SAFETY: `ptr_at` checked that the fixed 20-byte header lies inside the frame; alignment 1.
    let (version_ihl, flags_fragment, protocol, src, dst) = unsafe {
        (
            (*ip).version_ihl,
            (*ip).flags_fragment,
            (*ip).protocol,
            (*ip).src,
            (*ip).dst,
        )
    };
    if version_ihl >> 4 != 4 {
        return Err(Malformed);
    }
    // IHL counts 32-bit words, options included (RFC 791 §3.1); at most 60 bytes.
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if header_len < size_of::<Ipv4Hdr>() {
        return Err(Malformed);
    }
    check_range(ctx, offset, header_len)?;
    stats.ipv4 += 1;

    // The blocklist comes first: a blocked source's fragments and non-TCP packets are dropped
    // too.
    if TERN_BLOCK_V4.get(Key::new(32, src)).is_some() {
        return Ok(Frame::Blocked);
    }
    if u16::from_be_bytes(flags_fragment) & IPV4_MF_OR_OFFSET != 0 {
        // Fragments go to the kernel for reassembly, so their payload is never parsed.
        stats.ipv4_fragments += 1;
        return Ok(Frame::Pass);
    }
    if protocol == IPPROTO_ICMP {
        return Ok(parse_icmpv4(ctx, offset + header_len));
    }
    if protocol != IPPROTO_TCP {
        return Ok(Frame::Pass);
    }
    parse_tcp(
        ctx,
        offset + header_len,
        ipv4_mapped(src),
        ipv4_mapped(dst),
        Ip::V4 { offset },
        stats,
    )
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, offset: usize, stats: &mut XdpStats) -> Result<Frame, Malformed> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, offset)?;
    // SAFETY: `ptr_at` checked that the 40-byte fixed header lies inside the frame; alignment 1.
    let (version_class_flow, next_header, src, dst) = unsafe {
        (
            (*ip).version_class_flow,
            (*ip).next_header,
            (*ip).src,
            (*ip).dst,
        )
    };
    if version_class_flow[0] >> 4 != 6 {
        return Err(Malformed);
    }
    stats.ipv6 += 1;

    if TERN_BLOCK_V6.get(Key::new(128, src)).is_some() {
        return Ok(Frame::Blocked);
    }
    // Only TCP directly after the fixed header; a chain of extension headers (rare for TCP to a
    // listener) stays with the kernel.
    if next_header == IPPROTO_ICMPV6 {
        return Ok(parse_icmpv6(ctx, offset + size_of::<Ipv6Hdr>()));
    }
    if next_header != IPPROTO_TCP {
        return Ok(Frame::Pass);
    }
    parse_tcp(
        ctx,
        offset + size_of::<Ipv6Hdr>(),
        src,
        dst,
        Ip::V6 { offset },
        stats,
    )
}

#[inline(always)]
fn parse_tcp(
    ctx: &XdpContext,
    offset: usize,
    src: [u8; 16],
    dst: [u8; 16],
    ip: Ip,
    stats: &mut XdpStats,
) -> Result<Frame, Malformed> {
    let tcp: *const TcpHdr = ptr_at(ctx, offset)?;
    // SAFETY: `ptr_at` checked that the fixed 20-byte header lies inside the frame; alignment 1.
    let (offset_flags, src_port, dst_port) =
        unsafe { ((*tcp).offset_flags, (*tcp).src_port, (*tcp).dst_port) };
    // Data offset counts 32-bit words, options included (RFC 9293 §3.1); at most 60 bytes.
    let header_len = usize::from(offset_flags[0] >> 4) * 4;
    if header_len < size_of::<TcpHdr>() {
        return Err(Malformed);
    }
    check_range(ctx, offset, header_len)?;
    stats.tcp += 1;
    Ok(Frame::Tcp(Flow {
        src,
        dst,
        src_port: u16::from_be_bytes(src_port),
        dst_port: u16::from_be_bytes(dst_port),
        ip,
        tcp_offset: offset,
        syn: offset_flags[1] & (TCP_SYN | TCP_ACK) == TCP_SYN,
    }))
}

/// An ICMPv4 message at `offset`: `Frame::Icmp` for "fragmentation needed" quoting an
/// unfragmented (or first-fragment) IPv4 TCP segment with its ports, else `Frame::Pass`. A
/// quote that is cut short is not the outer frame's fault, so it is never `Malformed`.
#[inline(always)]
fn parse_icmpv4(ctx: &XdpContext, offset: usize) -> Frame {
    let Ok(icmp) = ptr_at::<IcmpHdr>(ctx, offset) else {
        return Frame::Pass;
    };
    // SAFETY: `ptr_at` checked that the 8-byte ICMP header lies inside the frame; alignment 1.
    let (kind, code) = unsafe { ((*icmp).kind, (*icmp).code) };
    if kind != ICMP_DEST_UNREACH || code != ICMP_FRAG_NEEDED {
        return Frame::Pass;
    }
    let inner = offset + size_of::<IcmpHdr>();
    let Ok(ip) = ptr_at::<Ipv4Hdr>(ctx, inner) else {
        return Frame::Pass;
    };
    // SAFETY: `ptr_at` checked that the quoted fixed IPv4 header lies inside the frame.
    let (version_ihl, flags_fragment, protocol, src, dst) = unsafe {
        (
            (*ip).version_ihl,
            (*ip).flags_fragment,
            (*ip).protocol,
            (*ip).src,
            (*ip).dst,
        )
    };
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4
        || header_len < size_of::<Ipv4Hdr>()
        || protocol != IPPROTO_TCP
        || u16::from_be_bytes(flags_fragment) & IPV4_OFFSET != 0
    {
        return Frame::Pass;
    }
    let Ok(tcp) = ptr_at::<QuotedTcp>(ctx, inner + header_len) else {
        return Frame::Pass;
    };
    // SAFETY: `ptr_at` checked that the quoted 8 TCP bytes lie inside the frame; alignment 1.
    let (src_port, dst_port) = unsafe { ((*tcp).src_port, (*tcp).dst_port) };
    Frame::Icmp(Quoted {
        client: ipv4_mapped(dst),
        server: ipv4_mapped(src),
        client_port: u16::from_be_bytes(dst_port),
        server_port: u16::from_be_bytes(src_port),
        v4: true,
    })
}

/// An ICMPv6 message at `offset`: `Frame::Icmp` for "packet too big" quoting an IPv6 packet
/// whose fixed header is followed directly by TCP, else `Frame::Pass` (as for ICMPv4).
#[inline(always)]
fn parse_icmpv6(ctx: &XdpContext, offset: usize) -> Frame {
    let Ok(icmp) = ptr_at::<IcmpHdr>(ctx, offset) else {
        return Frame::Pass;
    };
    // SAFETY: `ptr_at` checked that the 8-byte ICMPv6 header lies inside the frame; alignment 1.
    if unsafe { (*icmp).kind } != ICMPV6_PACKET_TOO_BIG {
        return Frame::Pass;
    }
    let inner = offset + size_of::<IcmpHdr>();
    let Ok(ip) = ptr_at::<Ipv6Hdr>(ctx, inner) else {
        return Frame::Pass;
    };
    // SAFETY: `ptr_at` checked that the quoted 40-byte IPv6 header lies inside the frame.
    let (version_class_flow, next_header, src, dst) = unsafe {
        (
            (*ip).version_class_flow,
            (*ip).next_header,
            (*ip).src,
            (*ip).dst,
        )
    };
    if version_class_flow[0] >> 4 != 6 || next_header != IPPROTO_TCP {
        return Frame::Pass;
    }
    let Ok(tcp) = ptr_at::<QuotedTcp>(ctx, inner + size_of::<Ipv6Hdr>()) else {
        return Frame::Pass;
    };
    // SAFETY: `ptr_at` checked that the quoted 8 TCP bytes lie inside the frame; alignment 1.
    let (src_port, dst_port) = unsafe { ((*tcp).src_port, (*tcp).dst_port) };
    Frame::Icmp(Quoted {
        client: dst,
        server: src,
        client_port: u16::from_be_bytes(dst_port),
        server_port: u16::from_be_bytes(src_port),
        v4: false,
    })
}

/// A pointer to a `T` at `offset` bytes into the frame, if all of it lies inside the frame.
/// The comparison against `data_end` sits right before every use, where the verifier needs it.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, Malformed> {
    check_range(ctx, offset, size_of::<T>())?;
    Ok((ctx.data() + offset) as *const T)
}

/// [`ptr_at`] for writing (XDP may modify the frame in place).
#[inline(always)]
fn ptr_at_mut<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, Malformed> {
    check_range(ctx, offset, size_of::<T>())?;
    Ok((ctx.data() + offset) as *mut T)
}

/// `Ok` if the `len` bytes at `offset` lie inside the frame.
#[inline(always)]
fn check_range(ctx: &XdpContext, offset: usize, len: usize) -> Result<(), Malformed> {
    if ctx.data() + offset + len > ctx.data_end() {
        return Err(Malformed);
    }
    Ok(())
}

/// The object's licence as the kernel sees it: the project's own. The kernel only uses it to
/// allow or refuse GPL-only helpers; these programs call none (map lookups and
/// `bpf_redirect_map` are not GPL-only).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 18] = *b"Apache-2.0 OR MIT\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // eBPF cannot unwind or abort; the verifier rejects any path that could reach this, so the
    // loop is never executed.
    loop {}
}

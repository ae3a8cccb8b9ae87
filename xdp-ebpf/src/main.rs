//! tern's XDP program: parses each received frame's Ethernet (with at most one 802.1Q/802.1ad
//! tag), IPv4 (options, fragment detection) or IPv6 (fixed header) and TCP headers, counts what
//! it saw in the per-CPU `XdpStats` map, and passes every frame to the kernel.
//!
//! It owns the per-packet decision only. Map layouts and names live in `tern-common`; loading,
//! attaching and reading the counters is `tern::xdp`'s job. Steering TCP segments for tern's
//! listen set to AF_XDP sockets comes later and plugs into [`steer_tcp`], which receives every
//! complete, unfragmented TCP header; everything else keeps going to the kernel.
//!
//! Formats: Ethernet II and IEEE 802.1Q tags; IPv4 header, RFC 791 §3.1 (IHL, MF flag, fragment
//! offset); IPv6 fixed header, RFC 8200 §3 (extension headers are not walked); TCP header,
//! RFC 9293 §3.1 (data offset).
//!
//! Verifier notes: every packet read goes through [`ptr_at`] or [`check_range`], which compare
//! against `data_end` right before the access; variable offsets come from 4-bit fields times four,
//! so the verifier can bound them. No loops, no logging on this path.

#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};
use tern_common::{XDP_STATS_ENTRIES, XDP_STATS_INDEX, XdpStats};

/// Per-CPU counters; its name must equal `tern_common::XDP_STATS_MAP` (the `#[map]` macro takes
/// the static's name; `tern::xdp`'s tests load this map by the shared constant).
#[map]
static TERN_XDP_STATS: PerCpuArray<XdpStats> = PerCpuArray::with_max_entries(XDP_STATS_ENTRIES, 0);

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
/// IPv4 flags+fragment-offset field: MF flag and the 13-bit offset. DF (0x4000) is not part of
/// fragmentation state.
const IPV4_MF_OR_OFFSET: u16 = 0x3fff;

// Header layouts made only of bytes and byte arrays: alignment 1, so a read at any offset is a
// valid read, and multi-byte fields are decoded explicitly from network byte order.

#[repr(C)]
struct EthHdr {
    _dst: [u8; 6],
    _src: [u8; 6],
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
    _src: [u8; 4],
    _dst: [u8; 4],
}

#[repr(C)]
struct Ipv6Hdr {
    version_class_flow: [u8; 4],
    _payload_len: [u8; 2],
    next_header: u8,
    _hop_limit: u8,
    _src: [u8; 16],
    _dst: [u8; 16],
}

#[repr(C)]
struct TcpHdr {
    _src_port: [u8; 2],
    dst_port: [u8; 2],
    _seq: [u8; 4],
    _ack: [u8; 4],
    /// Data offset in the high 4 bits of the first byte (in 32-bit words), then flags.
    offset_flags: [u8; 2],
    _window: [u8; 2],
    _checksum: [u8; 2],
    _urgent: [u8; 2],
}

/// A header announced by the layer outside it does not fit in the frame, or carries an
/// impossible version or length.
struct Malformed;

/// What the parser found, as far as the forwarding decision is concerned.
enum Frame {
    /// A complete TCP header in an unfragmented IPv4 packet or directly after an IPv6 header.
    Tcp { dst_port: u16 },
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
    match frame {
        Frame::Tcp { dst_port } => steer_tcp(ctx, dst_port),
        Frame::Pass => Ok(xdp_action::XDP_PASS),
    }
}

/// The forwarding decision for a complete TCP header. In this version every segment goes to the
/// kernel; the bypass path will look `dst_port` up in the listen set here and redirect matches
/// to the XSKMAP entry of the receiving queue.
#[inline(always)]
fn steer_tcp(_ctx: &XdpContext, _dst_port: u16) -> Result<u32, ()> {
    Ok(xdp_action::XDP_PASS)
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
    let (version_ihl, flags_fragment, protocol) =
        unsafe { ((*ip).version_ihl, (*ip).flags_fragment, (*ip).protocol) };
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

    if u16::from_be_bytes(flags_fragment) & IPV4_MF_OR_OFFSET != 0 {
        // Fragments go to the kernel for reassembly, so their payload is never parsed.
        stats.ipv4_fragments += 1;
        return Ok(Frame::Pass);
    }
    if protocol != IPPROTO_TCP {
        return Ok(Frame::Pass);
    }
    parse_tcp(ctx, offset + header_len, stats)
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, offset: usize, stats: &mut XdpStats) -> Result<Frame, Malformed> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, offset)?;
    // SAFETY: `ptr_at` checked that the 40-byte fixed header lies inside the frame; alignment 1.
    let (version_class_flow, next_header) =
        unsafe { ((*ip).version_class_flow, (*ip).next_header) };
    if version_class_flow[0] >> 4 != 6 {
        return Err(Malformed);
    }
    stats.ipv6 += 1;

    // Only TCP directly after the fixed header; a chain of extension headers (rare for TCP to a
    // listener) stays with the kernel.
    if next_header != IPPROTO_TCP {
        return Ok(Frame::Pass);
    }
    parse_tcp(ctx, offset + size_of::<Ipv6Hdr>(), stats)
}

#[inline(always)]
fn parse_tcp(ctx: &XdpContext, offset: usize, stats: &mut XdpStats) -> Result<Frame, Malformed> {
    let tcp: *const TcpHdr = ptr_at(ctx, offset)?;
    // SAFETY: `ptr_at` checked that the fixed 20-byte header lies inside the frame; alignment 1.
    let (offset_flags, dst_port) = unsafe { ((*tcp).offset_flags, (*tcp).dst_port) };
    // Data offset counts 32-bit words, options included (RFC 9293 §3.1); at most 60 bytes.
    let header_len = usize::from(offset_flags[0] >> 4) * 4;
    if header_len < size_of::<TcpHdr>() {
        return Err(Malformed);
    }
    check_range(ctx, offset, header_len)?;
    stats.tcp += 1;
    Ok(Frame::Tcp {
        dst_port: u16::from_be_bytes(dst_port),
    })
}

/// A pointer to a `T` at `offset` bytes into the frame, if all of it lies inside the frame.
/// The comparison against `data_end` sits right before every use, where the verifier needs it.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, Malformed> {
    check_range(ctx, offset, size_of::<T>())?;
    Ok((ctx.data() + offset) as *const T)
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
/// allow or refuse GPL-only helpers; this program calls none (map lookups and, later,
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

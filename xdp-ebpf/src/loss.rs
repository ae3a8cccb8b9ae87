//! Test-only loss injection: `tern_loss` (XDP, a receiving interface) and `tern_loss_tc` (tc
//! classifier, the same interface's egress) drop IPv4/IPv6 TCP frames pseudo-randomly at a rate
//! in parts per million read from `TERN_LOSS_CFG`, and count what they dropped and passed per
//! direction in the per-CPU `TERN_LOSS_STATS`.
//!
//! **Test-only.** These programs share the object with `tern_xdp` only so the test rig needs no
//! second eBPF build. tern itself never loads or attaches them (`tern::xdp` loads `tern_xdp` and
//! `tern_pass` by name; aya creates the two small maps below with the object, nothing more).
//! `tern_tests::loss` loads them onto the client's veth of the test rig.
//!
//! **What is subject to loss** (the filter is explicit so the rig keeps working): Ethernet II,
//! optionally with one 802.1Q/802.1ad tag, carrying IPv4 whose protocol is TCP (any fragment) or
//! IPv6 whose next header is TCP directly. Everything else — ARP, ICMP/ICMPv6 (neighbour
//! discovery, PMTU), UDP, IPv6 with extension headers, non-IP — always passes and is counted in
//! neither counter.
//!
//! **Randomness.** Each (CPU, direction) keeps its own xorshift64* state in its `LossStats`
//! slot, seeded on first use from `LossConfig::seed`, the direction and the CPU id
//! (`tern_common::loss_rng_seed`), so every frame is an independent draw; the seed makes runs
//! comparable, not bit-identical (which CPU a frame lands on is the scheduler's choice).
//! Changing the seed at run time does not reseed a generator that already ran.
//!
//! Drops are silent to the sender in both directions: `XDP_DROP` on receive, `TC_ACT_STOLEN`
//! on send (see [`tern_loss_tc`]).
//!
//! Verifier notes: the XDP side reads through bounds-checked pointers as in `main.rs`; the tc
//! side uses `bpf_skb_load_bytes` (`TcContext::load`), which checks bounds itself.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_STOLEN, xdp_action},
    helpers::bpf_get_smp_processor_id,
    macros::{classifier, map, xdp},
    maps::{Array, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use tern_common::{
    LOSS_CONFIG_ENTRIES, LOSS_EGRESS, LOSS_INGRESS, LOSS_STATS_ENTRIES, LossConfig, LossStats,
    loss_drops, loss_rng_seed, loss_rng_step,
};

/// Rates and seed (`tern_common::LOSS_CONFIG_MAP`).
#[map]
static TERN_LOSS_CFG: Array<LossConfig> = Array::with_max_entries(LOSS_CONFIG_ENTRIES, 0);

/// Per-CPU counters and generator state per direction (`tern_common::LOSS_STATS_MAP`).
#[map]
static TERN_LOSS_STATS: PerCpuArray<LossStats> =
    PerCpuArray::with_max_entries(LOSS_STATS_ENTRIES, 0);

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
/// Offset of the protocol byte in the IPv4 header, of the next-header byte in the IPv6 one.
const IPV4_PROTOCOL: usize = 9;
const IPV6_NEXT_HEADER: usize = 6;

/// Drops received IPv4/IPv6 TCP frames at `ingress_ppm`; passes everything else.
#[xdp]
pub fn tern_loss(ctx: XdpContext) -> u32 {
    if !xdp_is_tcp(&ctx) {
        return xdp_action::XDP_PASS;
    }
    if drop_frame(LOSS_INGRESS) {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

/// Drops sent IPv4/IPv6 TCP frames at `egress_ppm`; passes everything else.
///
/// A drop is `TC_ACT_STOLEN`, not `TC_ACT_SHOT`: on egress, SHOT makes `dev_queue_xmit` report
/// `NET_XMIT_DROP`, so the sending TCP learns of the loss at once (the segment stays unsent and
/// the socket enters CWR), which is not what a lost frame on a wire does. STOLEN reports
/// success and frees the skb silently. Only classic cls_bpf (direct action, clsact) honours
/// STOLEN; TCX would treat it as "next", so the loader attaches through netlink.
#[classifier]
pub fn tern_loss_tc(ctx: TcContext) -> i32 {
    if !tc_is_tcp(&ctx) {
        return TC_ACT_OK;
    }
    if drop_frame(LOSS_EGRESS) {
        TC_ACT_STOLEN
    } else {
        TC_ACT_OK
    }
}

/// Draws for one eligible frame of `direction` and counts the outcome; `true` = drop.
#[inline(always)]
fn drop_frame(direction: u32) -> bool {
    let config = TERN_LOSS_CFG.get(0).copied().unwrap_or_default();
    let ppm = if direction == LOSS_INGRESS {
        config.ingress_ppm
    } else {
        config.egress_ppm
    };
    let Some(stats) = TERN_LOSS_STATS.get_ptr_mut(direction) else {
        // Cannot happen with a correctly built object; losing nothing is the safe failure.
        return false;
    };
    // SAFETY: a successful lookup of this CPU's slot of a per-CPU array: valid and aligned for
    // `LossStats`. XDP and tc programs run with preemption disabled and are not re-entered on
    // one CPU for the same direction, so nothing else writes the slot meanwhile.
    let stats = unsafe { &mut *stats };
    if stats.rng == 0 {
        // SAFETY: plain helper call without arguments.
        let cpu = unsafe { bpf_get_smp_processor_id() };
        stats.rng = loss_rng_seed(config.seed ^ (u64::from(cpu) << 32), direction);
    }
    let (state, draw) = loss_rng_step(stats.rng);
    stats.rng = state;
    let drop = loss_drops(draw, ppm);
    if drop {
        stats.dropped += 1;
    } else {
        stats.passed += 1;
    }
    drop
}

/// Whether the XDP frame is IPv4/IPv6 TCP (see the module docs for the exact rule).
#[inline(always)]
fn xdp_is_tcp(ctx: &XdpContext) -> bool {
    let Some(mut ether_type) = xdp_u16(ctx, 12) else {
        return false;
    };
    let mut l3 = ETH_HLEN;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let Some(inner) = xdp_u16(ctx, ETH_HLEN + 2) else {
            return false;
        };
        ether_type = inner;
        l3 += VLAN_HLEN;
    }
    match ether_type {
        ETH_P_IPV4 => xdp_u8(ctx, l3 + IPV4_PROTOCOL) == Some(IPPROTO_TCP),
        ETH_P_IPV6 => xdp_u8(ctx, l3 + IPV6_NEXT_HEADER) == Some(IPPROTO_TCP),
        _ => false,
    }
}

/// Whether the skb is IPv4/IPv6 TCP (same rule as [`xdp_is_tcp`]).
#[inline(always)]
fn tc_is_tcp(ctx: &TcContext) -> bool {
    let Ok(raw) = ctx.load::<[u8; 2]>(12) else {
        return false;
    };
    let mut ether_type = u16::from_be_bytes(raw);
    let mut l3 = ETH_HLEN;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let Ok(raw) = ctx.load::<[u8; 2]>(ETH_HLEN + 2) else {
            return false;
        };
        ether_type = u16::from_be_bytes(raw);
        l3 += VLAN_HLEN;
    }
    match ether_type {
        ETH_P_IPV4 => ctx.load::<u8>(l3 + IPV4_PROTOCOL) == Ok(IPPROTO_TCP),
        ETH_P_IPV6 => ctx.load::<u8>(l3 + IPV6_NEXT_HEADER) == Ok(IPPROTO_TCP),
        _ => false,
    }
}

/// The big-endian u16 at `offset`, if it lies inside the frame.
#[inline(always)]
fn xdp_u16(ctx: &XdpContext, offset: usize) -> Option<u16> {
    if ctx.data() + offset + 2 > ctx.data_end() {
        return None;
    }
    let ptr = (ctx.data() + offset) as *const [u8; 2];
    // SAFETY: the two bytes at `offset` were just checked to lie inside the frame; alignment 1.
    Some(u16::from_be_bytes(unsafe { *ptr }))
}

/// The byte at `offset`, if it lies inside the frame.
#[inline(always)]
fn xdp_u8(ctx: &XdpContext, offset: usize) -> Option<u8> {
    if ctx.data() + offset + 1 > ctx.data_end() {
        return None;
    }
    let ptr = (ctx.data() + offset) as *const u8;
    // SAFETY: the byte at `offset` was just checked to lie inside the frame.
    Some(unsafe { *ptr })
}

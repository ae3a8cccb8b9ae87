//! SYN-ACKs with tern's SYN cookies made in the program (`XdpConfig::syn_cookies`): a SYN to a
//! bypass listener is turned into the SYN-ACK the worker's stack would have sent and bounced
//! with `XDP_TX`, so a SYN flood costs the workers nothing. The handshake's final ACK is steered
//! as usual and the stack validates the cookie: the cookie rule is `tern_common::syncookie`,
//! the same code the stack runs, and the key and counter come from the same secret and clock
//! epoch (`XdpConfig::cookie_secret`, `cookie_epoch_ns`).
//!
//! Scope: IPv4 without IP options in an untagged Ethernet frame (offsets 14 and 34), from a
//! unicast source. Anything else is left to the worker (`answer` returns `Untouched`).
//!
//! The reply mirrors the stack's SYN-ACK (`tern::tcp::stack`, `syn_ack` and `reply_ip`): TTL
//! 64, DF, IP id 0; options in Linux's layout (`tern::wire::tcp`, `TcpOptions::emit`): MSS;
//! SACK-permitted+TS or NOP NOP TS; NOP WS. Window scale and SACK-permitted only when the SYN
//! carried timestamps (the cookie keeps them in the TSval). Checksums are computed in full.

use aya_ebpf::{
    bindings::{xdp_action, xdp_md},
    helpers::{bpf_ktime_get_ns, generated::bpf_xdp_adjust_tail},
    macros::xdp,
    programs::XdpContext,
};
use tern_common::{
    CONFIG_INDEX, XDP_STATS_INDEX, XdpConfig, XdpStats, flow_hash, ipv4_mapped,
    syncookie::{
        CookieFlow, KEY_PERIOD_SECS, MSS_TABLE, SLOT_SECS, cookie_make, period_key, ts_offset,
    },
};

/// Where the headers sit in the frames this handles.
const IP: usize = 14;
const TCP: usize = IP + 20;
const OPTS: usize = TCP + 20;
/// TCP options are at most 40 bytes (data offset 15 words).
const MAX_OPTS: usize = 40;

/// How far the counter and key period lag the clock, nanoseconds. The workers rotate keys on
/// their housekeeping tick (100 ms) and read their clock once per loop turn, so just after a
/// period or slot boundary a cookie made here with the new key or counter could reach a worker
/// that has not moved yet. A cookie made a second "late" is one they still accept (current or
/// previous key and counter); it only lives a second less.
const LAG_NS: u64 = 1_000_000_000;

/// Reached only by tail call from `tern_xdp` (slot `PROG_SYN_COOKIE` of `TERN_PROGS`), for a
/// SYN without ACK to a bypass listener, IPv4 at offset 14 with TCP at 34, with
/// `syn_cookies` on; `tern_xdp` has counted `packets` and the layers, this counts the fate.
#[xdp]
pub fn tern_syn_cookie(ctx: XdpContext) -> u32 {
    let Some(stats) = crate::TERN_XDP_STATS.get_ptr_mut(XDP_STATS_INDEX) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: as in `try_tern_xdp`: this CPU's slot, not re-entered while we hold it.
    let stats: &mut XdpStats = unsafe { &mut *stats };
    let Some(config) = crate::TERN_CONFIG.get(CONFIG_INDEX) else {
        stats.no_socket += 1;
        return xdp_action::XDP_PASS;
    };
    match answer(ctx.ctx, config) {
        Answer::Sent => {
            stats.syn_cookies += 1;
            xdp_action::XDP_TX
        }
        Answer::Broken => {
            stats.syn_cookies += 1;
            xdp_action::XDP_DROP
        }
        Answer::Untouched => steer_v4(&ctx, config, stats),
    }
}

/// A SYN this does not answer goes to its worker, exactly as `tern_xdp` would have sent it.
#[inline(always)]
fn steer_v4(ctx: &XdpContext, config: &XdpConfig, stats: &mut XdpStats) -> u32 {
    let (Some(src), Some(dst), Some(sport), Some(dport)) = (
        be32(ctx, IP + 12),
        be32(ctx, IP + 16),
        be16(ctx, TCP),
        be16(ctx, TCP + 2),
    ) else {
        stats.no_socket += 1;
        return xdp_action::XDP_PASS;
    };
    let hash = flow_hash(
        &config.steer_key,
        &ipv4_mapped(src.to_be_bytes()),
        &ipv4_mapped(dst.to_be_bytes()),
        sport,
        dport,
    );
    crate::redirect(ctx, config.workers, hash, stats)
}

/// What [`answer`] did with the frame.
pub(crate) enum Answer {
    /// Not a SYN this handles (or the frame could not be resized): unchanged, steer it.
    Untouched,
    /// Rewritten into the SYN-ACK: `XDP_TX`.
    Sent,
    /// Resized but then too short to hold the reply (the kernel never does this): drop.
    Broken,
}

/// The SYN's fields the reply needs.
struct Syn {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    src_port: u16,
    dst_port: u16,
    isn: u32,
    mss: u16,
    ws: Option<u8>,
    sack_perm: bool,
    tsval: Option<u32>,
}

#[inline(always)]
fn byte(ctx: &XdpContext, at: usize) -> Option<u8> {
    if ctx.data() + at + 1 > ctx.data_end() {
        return None;
    }
    // SAFETY: the byte lies inside the frame (checked right above).
    Some(unsafe { *((ctx.data() + at) as *const u8) })
}

#[inline(always)]
fn be16(ctx: &XdpContext, at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([byte(ctx, at)?, byte(ctx, at + 1)?]))
}

#[inline(always)]
fn be32(ctx: &XdpContext, at: usize) -> Option<u32> {
    Some(u32::from_be_bytes([
        byte(ctx, at)?,
        byte(ctx, at + 1)?,
        byte(ctx, at + 2)?,
        byte(ctx, at + 3)?,
    ]))
}

/// Reads the SYN: `None` if it is not one this handles (IP options, multicast, malformed
/// options). The caller checked it is IPv4 at [`IP`] with TCP at [`TCP`] and SYN without ACK.
#[inline(always)]
fn read_syn(ctx: &XdpContext) -> Option<Syn> {
    if ctx.data() + OPTS > ctx.data_end() {
        return None;
    }
    // SAFETY: the Ethernet, IPv4 and TCP fixed headers lie inside the frame (checked above).
    let d = ctx.data() as *const u8;
    let rd = |at: usize| unsafe { *d.add(at) };
    if rd(IP) != 0x45 {
        return None;
    }
    let src_mac = [rd(6), rd(7), rd(8), rd(9), rd(10), rd(11)];
    let dst_mac = [rd(0), rd(1), rd(2), rd(3), rd(4), rd(5)];
    let src = [rd(IP + 12), rd(IP + 13), rd(IP + 14), rd(IP + 15)];
    let dst = [rd(IP + 16), rd(IP + 17), rd(IP + 18), rd(IP + 19)];
    // RFC 1122 §4.2.3.10: no SYN-ACK to a broadcast or multicast source (the stack's rule too).
    if src_mac[0] & 1 != 0 || src[0] >= 224 || src[0] == 0 || dst_mac[0] & 1 != 0 {
        return None;
    }
    let src_port = u16::from_be_bytes([rd(TCP), rd(TCP + 1)]);
    let dst_port = u16::from_be_bytes([rd(TCP + 2), rd(TCP + 3)]);
    let isn = u32::from_be_bytes([rd(TCP + 4), rd(TCP + 5), rd(TCP + 6), rd(TCP + 7)]);
    let header_len = usize::from(rd(TCP + 12) >> 4) * 4;
    if header_len < 20 {
        return None;
    }
    let opts_len = (header_len - 20) & 63;
    if opts_len > MAX_OPTS {
        return None;
    }
    let mut syn = Syn {
        src_mac,
        dst_mac,
        src,
        dst,
        src_port,
        dst_port,
        isn,
        // RFC 9293 §3.7.1: without the option, 536 for IPv4.
        mss: 536,
        ws: None,
        sack_perm: false,
        tsval: None,
    };
    // The options, read as 4-byte words at fixed positions: every common SYN (Linux, Windows,
    // the BSDs) pads each option to a 32-bit boundary with NOPs, and fixed positions keep the
    // verifier's work small (a byte-wise walk with variable offsets exceeded its 1M-instruction
    // budget). A word this does not recognise leaves the SYN to the worker's stack, which
    // parses any layout.
    if ctx.data() + OPTS + opts_len > ctx.data_end() {
        return None;
    }
    let mut ts_words = 0u32;
    let mut k = 0usize;
    while k < MAX_OPTS / 4 {
        if 4 * k >= opts_len {
            break;
        }
        let w = be32(ctx, OPTS + 4 * k)?;
        if ts_words > 0 {
            // TSval, then TSecr (RFC 7323 §3).
            if ts_words == 2 {
                syn.tsval = Some(w);
            }
            ts_words -= 1;
        } else {
            match w {
                _ if w >> 16 == 0x0204 => syn.mss = w as u16,
                _ if w >> 8 == 0x01_0303 => syn.ws = Some(w as u8),
                _ if w >> 16 == 0x0303 && w & 0xff == 0x01 => syn.ws = Some((w >> 8) as u8),
                0x0101_0402 | 0x0402_0101 => syn.sack_perm = true,
                // BSD: SACK-permitted then end of list.
                0x0402_0000 => {
                    syn.sack_perm = true;
                    break;
                }
                0x0402_080a => {
                    syn.sack_perm = true;
                    ts_words = 2;
                }
                0x0101_080a => ts_words = 2,
                0x0101_0101 => {}
                _ if w >> 24 == 0 => break,
                _ => return None,
            }
        }
        k += 1;
    }
    if ts_words > 0 {
        return None;
    }
    Some(syn)
}

/// Answers a SYN with a cookie SYN-ACK in place, if it is one this handles. A BPF-to-BPF call
/// (not inlined): its hashes and buffers get their own stack frame, which keeps the main
/// program's under the 512-byte limit. `config` points into the config map.
#[inline(never)]
pub(crate) fn answer(raw: *mut xdp_md, config: &XdpConfig) -> Answer {
    let ctx = &XdpContext::new(raw);
    let Some(syn) = read_syn(ctx) else {
        return Answer::Untouched;
    };
    // The workers' clock: time since their epoch (the same CLOCK_MONOTONIC).
    // SAFETY: a helper with no arguments.
    let since = unsafe { bpf_ktime_get_ns() }.saturating_sub(config.cookie_epoch_ns);
    let secs = since.saturating_sub(LAG_NS) / 1_000_000_000;
    let key = period_key(&config.cookie_secret, secs / KEY_PERIOD_SECS);
    let flow = CookieFlow {
        local: ipv4_mapped(syn.dst),
        remote: ipv4_mapped(syn.src),
        local_port: syn.dst_port,
        remote_port: syn.src_port,
    };
    // The stack's TSval clock: its milliseconds (`Instant::ts_millis`) plus the flow's offset.
    let ts_clock = syn
        .tsval
        .map(|_| ((since / 1_000_000) as u32).wrapping_add(ts_offset(&key, &flow)));
    let (cookie, tsval) = cookie_make(
        &key,
        &flow,
        syn.isn,
        syn.mss,
        syn.ws,
        syn.sack_perm,
        ts_clock,
        secs / SLOT_SECS,
        // The plain table: the stack decodes with its own (see `mss_index_in`), never above this.
        &MSS_TABLE,
    );

    // The options as 32-bit words (each option is 4-byte aligned in this layout).
    let mut opts = [0u32; 5];
    opts[0] = 0x0204_0000 | (config.cookie_mss & 0xffff);
    let mut n = 1usize;
    if let (Some(ours), Some(theirs)) = (tsval, syn.tsval) {
        opts[1] = if syn.sack_perm {
            0x0402_080a
        } else {
            0x0101_080a
        };
        opts[2] = ours;
        opts[3] = theirs;
        n = 4;
        if syn.ws.is_some() {
            opts[4] = 0x0103_0300 | (config.cookie_wscale & 0xff);
            n = 5;
        }
    }
    let tcp_len = 20 + 4 * n as u32;
    let frame_len = (OPTS + 4 * n) as i64;
    let delta = frame_len - (ctx.data_end() - ctx.data()) as i64;
    if delta != 0 {
        // SAFETY: the helper takes the program's own context; it fails cleanly (frame unchanged)
        // if the tail cannot move that far.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta as i32) } != 0 {
            return Answer::Untouched;
        }
    }
    if ctx.data() + OPTS > ctx.data_end() {
        return Answer::Broken;
    }

    let window = config.cookie_window.min(0xffff);
    let ip_total = 20 + tcp_len;
    // IPv4 header checksum (RFC 1071): the header's 16-bit words with the checksum as zero.
    let mut sum: u64 = 0x4500 + u64::from(ip_total) + 0x4000 + 0x4006;
    sum += words4(syn.src) + words4(syn.dst);
    let ip_csum = fold(sum);
    // TCP checksum: pseudo-header (addresses, protocol, length), header, options.
    let mut sum: u64 = words4(syn.src) + words4(syn.dst) + 6 + u64::from(tcp_len);
    sum += u64::from(syn.dst_port) + u64::from(syn.src_port);
    sum += words32(cookie) + words32(syn.isn.wrapping_add(1));
    sum += u64::from(((5 + n as u32) << 12) | 0x12) + u64::from(window);
    let mut k = 0;
    while k < 5 {
        if k < n {
            sum += words32(opts[k]);
        }
        k += 1;
    }
    let tcp_csum = fold(sum);

    let d = ctx.data() as *mut u8;
    // SAFETY: the 54 header bytes lie inside the frame (checked after resizing); each write
    // below is inside them.
    unsafe {
        #[inline(always)]
        unsafe fn put<const N: usize>(d: *mut u8, at: usize, bytes: [u8; N]) {
            // SAFETY: the caller's: `at + N` is inside the checked headers.
            unsafe { core::ptr::write_unaligned(d.add(at) as *mut [u8; N], bytes) };
        }
        put(d, 0, syn.src_mac);
        put(d, 6, syn.dst_mac);
        put(d, 12, [0x08, 0x00]);
        put(d, IP, [0x45, 0]);
        put(d, IP + 2, (ip_total as u16).to_be_bytes());
        put(d, IP + 4, [0, 0, 0x40, 0, 64, 6]);
        put(d, IP + 10, ip_csum.to_be_bytes());
        put(d, IP + 12, syn.dst);
        put(d, IP + 16, syn.src);
        put(d, TCP, syn.dst_port.to_be_bytes());
        put(d, TCP + 2, syn.src_port.to_be_bytes());
        put(d, TCP + 4, cookie.to_be_bytes());
        put(d, TCP + 8, syn.isn.wrapping_add(1).to_be_bytes());
        put(d, TCP + 12, [((5 + n) << 4) as u8, 0x12]);
        put(d, TCP + 14, (window as u16).to_be_bytes());
        put(d, TCP + 16, tcp_csum.to_be_bytes());
        put(d, TCP + 18, [0, 0]);
    }
    let mut k = 0;
    while k < 5 {
        if k < n {
            let at = OPTS + 4 * k;
            if ctx.data() + at + 4 > ctx.data_end() {
                return Answer::Broken;
            }
            let w = opts[k].to_be_bytes();
            // SAFETY: the four bytes lie inside the frame (checked right above).
            unsafe {
                let p = (ctx.data() + at) as *mut u8;
                *p = w[0];
                *p.add(1) = w[1];
                *p.add(2) = w[2];
                *p.add(3) = w[3];
            }
        }
        k += 1;
    }
    Answer::Sent
}

/// The two 16-bit words of four bytes, summed.
#[inline(always)]
fn words4(b: [u8; 4]) -> u64 {
    u64::from(u16::from_be_bytes([b[0], b[1]])) + u64::from(u16::from_be_bytes([b[2], b[3]]))
}

#[inline(always)]
fn words32(v: u32) -> u64 {
    u64::from(v >> 16) + u64::from(v & 0xffff)
}

/// Folds a ones' complement sum to 16 bits and complements it (RFC 1071).
#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

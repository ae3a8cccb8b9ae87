//! Types, names and small pure functions shared by tern's XDP program (`xdp-ebpf`) and its
//! userspace (`tern::xdp`, the AF_XDP workers), defined once so the two sides cannot disagree
//! about a map's layout, an XSKMAP slot or which worker owns a flow.
//!
//! This crate owns map and program names, map capacities, the `#[repr(C)]` values stored in maps,
//! [`flow_hash`] and the XSKMAP index rule ([`xsk_index`]). It owns no I/O: parsing lives in
//! `xdp-ebpf`, loading and map updates in `tern::xdp`. It is `no_std` so that the eBPF target
//! (bpfel-unknown-none, `build-std=core`) can use it; the `user` feature adds the `aya::Pod`
//! impls that userspace needs to read and write the maps.
//!
//! Rules for every type here (the kernel copies map keys and values as raw bytes): `#[repr(C)]`,
//! `Copy`, no `bool` (use `u32` flags), no implicit padding, and a compile-time size check.
//! Rules for every function here (they run inside the verifier's limits): no loops, no slicing
//! that could panic, no division that could panic.
//!
//! Addresses: IPv4 addresses are stored and hashed as IPv4-mapped IPv6 addresses
//! (`::ffff:a.b.c.d`, RFC 4291 §2.5.5.2), so one key type and one hash serve both families.

#![no_std]

#[cfg(test)]
extern crate std;

pub mod syncookie;

// ---------------------------------------------------------------------------------------------
// Programs

/// ELF section / program name of the XDP entry point in the eBPF object.
pub const XDP_PROGRAM: &str = "tern_xdp";

/// A second program in the same object that returns `XDP_PASS` for every frame and touches no
/// map. Attached to the *peer* end of a veth pair, it makes the peer accept frames that tern's
/// program sends with `XDP_TX` (veth drops XDP frames for a peer that runs no XDP program).
/// Used by tests and the benchmark rig, never by `tern run`.
pub const XDP_PASS_PROGRAM: &str = "tern_pass";

// ---------------------------------------------------------------------------------------------
// Map names. Kernel object names are at most 15 bytes (BPF_OBJ_NAME_LEN is 16 including the
// terminating NUL); each name is checked below.

/// Per-CPU statistics: `PerCpuArray<XdpStats>`, [`XDP_STATS_ENTRIES`] entry, index
/// [`XDP_STATS_INDEX`].
pub const XDP_STATS_MAP: &str = "TERN_XDP_STATS";
/// The listen set: `HashMap<ListenKey, u32>`, [`LISTEN_MAP_ENTRIES`] entries. The value is a
/// flags word: [`LISTEN_STEER`] (bypass listener) or [`LISTEN_LIMIT`] (kernel listener, limits
/// only).
pub const LISTEN_MAP: &str = "TERN_LISTEN";
/// The AF_XDP sockets: `XskMap`, [`XSK_MAP_ENTRIES`] slots, indexed by [`xsk_index`].
pub const XSK_MAP: &str = "TERN_XSKS";
/// Run-time settings: `Array<XdpConfig>`, [`CONFIG_ENTRIES`] entry, index [`CONFIG_INDEX`].
pub const CONFIG_MAP: &str = "TERN_CONFIG";
/// IPv4 source blocklist: `LpmTrie<[u8; 4], u32>`, [`BLOCK_MAP_ENTRIES`] prefixes. Key =
/// `{ prefix_len: u32 (host order), addr: [u8; 4] (network order) }`, packed, 8 bytes; value
/// [`BLOCK_VALUE`].
pub const BLOCK_V4_MAP: &str = "TERN_BLOCK_V4";
/// IPv6 source blocklist: `LpmTrie<[u8; 16], u32>`, [`BLOCK_MAP_ENTRIES`] prefixes. Key =
/// `{ prefix_len: u32 (host order), addr: [u8; 16] (network order) }`, packed, 20 bytes; value
/// [`BLOCK_VALUE`].
pub const BLOCK_V6_MAP: &str = "TERN_BLOCK_V6";

/// Programs the main program tail-calls: `ProgramArray`, [`PROG_MAP_ENTRIES`] slots. Slot
/// [`PROG_SYN_COOKIE`] holds [`SYN_COOKIE_PROGRAM`] (a tail call gets a fresh 512-byte stack,
/// which the cookie's hashes need beside the main program's).
pub const PROG_MAP: &str = "TERN_PROGS";
/// Slots in [`PROG_MAP`].
pub const PROG_MAP_ENTRIES: u32 = 1;
/// The [`PROG_MAP`] slot of [`SYN_COOKIE_PROGRAM`].
pub const PROG_SYN_COOKIE: u32 = 0;
/// The program that answers a SYN with a cookie SYN-ACK (`XdpConfig::syn_cookies`), reached
/// only by tail call from [`XDP_PROGRAM`].
pub const SYN_COOKIE_PROGRAM: &str = "tern_syn_cookie";

/// Per-source rate state: `LruHashMap<[u8; 16], SourceRate>`, [`SOURCE_RATE_ENTRIES`] entries,
/// keyed by the source address (network order, IPv4 as `::ffff:a.b.c.d`). Written only by the
/// program; an evicted source starts again with a full burst.
pub const SOURCE_RATE_MAP: &str = "TERN_SRC_RATE";

const _: () = assert!(SOURCE_RATE_MAP.len() <= 15);
const _: () = assert!(PROG_MAP.len() <= 15);
const _: () = assert!(XDP_STATS_MAP.len() <= 15);
const _: () = assert!(LISTEN_MAP.len() <= 15);
const _: () = assert!(XSK_MAP.len() <= 15);
const _: () = assert!(CONFIG_MAP.len() <= 15);
const _: () = assert!(BLOCK_V4_MAP.len() <= 15);
const _: () = assert!(BLOCK_V6_MAP.len() <= 15);

// ---------------------------------------------------------------------------------------------
// Capacities

/// Number of entries in [`XDP_STATS_MAP`]: one per-CPU [`XdpStats`] value.
pub const XDP_STATS_ENTRIES: u32 = 1;
/// The only index of [`XDP_STATS_MAP`].
pub const XDP_STATS_INDEX: u32 = 0;

/// Number of entries in [`CONFIG_MAP`]: one [`XdpConfig`].
pub const CONFIG_ENTRIES: u32 = 1;
/// The only index of [`CONFIG_MAP`].
pub const CONFIG_INDEX: u32 = 0;

/// Listening (address, port) pairs per interface. A hash map preallocates its entries, so this
/// is what the map costs whether used or not (about 256 × 64 bytes).
pub const LISTEN_MAP_ENTRIES: u32 = 256;

/// Listen-map value flag: the address is a bypass listener; its segments are steered to
/// AF_XDP sockets (and the per-source limits apply).
pub const LISTEN_STEER: u32 = 1;
/// Listen-map value flag: the address is a kernel listener on this interface; its segments go
/// to the kernel, but the per-source limits apply first.
pub const LISTEN_LIMIT: u32 = 2;
/// The value for a bypass listener (kept under its old name).
pub const LISTEN_VALUE: u32 = LISTEN_STEER;

/// Prefixes per blocklist trie (each family has its own). LPM tries are created with
/// `BPF_F_NO_PREALLOC`, so only inserted prefixes cost memory.
pub const BLOCK_MAP_ENTRIES: u32 = 65_536;

/// The value stored for every blocklist prefix; the program only tests for a match.
pub const BLOCK_VALUE: u32 = 1;

/// Sources tracked by the per-source rate limits at once (LRU: the least recently seen source
/// is forgotten first). 64 Ki × (16 + 16 bytes + overhead) ≈ 6 MiB, preallocated; a flood from
/// more distinct sources than this still meets the limit for every source it repeats within
/// the window the map remembers.
pub const SOURCE_RATE_ENTRIES: u32 = 65_536;

/// Highest RX queue index + 1 that can be steered. A frame that arrives on a higher queue is
/// passed to the kernel and counted as `no_socket`.
pub const MAX_QUEUES: u32 = 64;

/// Most AF_XDP workers the steering rule supports. With the one-socket-per-(queue, worker) rule
/// a worker polls one socket per queue, so the useful count per interface is far below this.
pub const MAX_WORKERS: u32 = 64;

/// Slots in [`XSK_MAP`]: one per (queue, worker) pair. The kernel stores one pointer per slot,
/// so the map costs 32 KiB whatever is registered.
pub const XSK_MAP_ENTRIES: u32 = MAX_QUEUES * MAX_WORKERS;

// ---------------------------------------------------------------------------------------------
// Map values

/// Per-CPU packet counters kept by the XDP program. Each CPU writes only its own copy (no
/// atomics needed); userspace sums the copies on read.
///
/// **Terminal counters.** Every frame increments `packets` and then exactly one of `steered`,
/// `passed`, `no_socket`, `blocked`, `rate_limited`, `syn_cookies`, so their sum equals `packets`
/// (summed over CPUs, once no frame is in flight). Malformed frames, non-IP frames and IPv4
/// fragments are all `passed`.
///
/// **Layer counters** describe what the parser saw: the headers are walked from the outside in
/// and each layer that parsed completely is counted (`vlan`, then `ipv4`/`ipv6`/`other`, then
/// `tcp` or `ipv4_fragments`). If a layer that the one outside it announces does not fit or has
/// an impossible field, `malformed` is counted once and the walk stops, so the outer layers that
/// did parse stay counted. A blocked source also stops the walk (right after its IP header).
/// Hence `ipv4 + ipv6 + other <= packets`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpStats {
    /// Every frame the program ran on.
    pub packets: u64,
    /// Frames whose IPv4 header was complete: version 4, IHL >= 5 and all `IHL * 4` bytes
    /// (options included) inside the frame.
    pub ipv4: u64,
    /// Frames whose 40-byte IPv6 fixed header was complete with version 6. Extension headers are
    /// not walked.
    pub ipv6: u64,
    /// TCP segments whose header was complete (data offset >= 5 and all `offset * 4` bytes inside
    /// the frame): IPv4 that is not a fragment, or IPv6 whose next header is TCP directly; from
    /// a source that is not blocked.
    pub tcp: u64,
    /// Frames carrying one 802.1Q (0x8100) or 802.1ad (0x88a8) tag, whatever follows it.
    pub vlan: u64,
    /// Complete Ethernet frames whose (inner) EtherType is neither IPv4 nor IPv6 (ARP, LLDP, a
    /// second VLAN tag, ...). Passed to the kernel.
    pub other: u64,
    /// Frames too short for a header they announce: Ethernet < 14 bytes, a truncated VLAN tag, an
    /// IP or TCP header that does not fit, or one with an impossible version / length field.
    /// Counted at the first layer that fails. Passed to the kernel, which drops or handles them
    /// (passing keeps anything the parser does not understand safe: ARP, ICMP, SSH).
    pub malformed: u64,
    /// IPv4 fragments (MF set or fragment offset != 0), first fragments included: only the
    /// first carries the TCP header, so no fragment's flow can be identified without
    /// reassembly. Passed to the kernel; never steered, never counted in `tcp`.
    pub ipv4_fragments: u64,
    /// Terminal: TCP segments for a listener handed on by the program: redirected into an
    /// AF_XDP socket, or (with [`XdpConfig::reflect`] set) answered in place with `XDP_TX`.
    pub steered: u64,
    /// Terminal: frames given to the kernel because they are not for a listener (other
    /// addresses or ports, non-TCP, non-IP, fragments, malformed frames).
    pub passed: u64,
    /// Terminal: TCP segments for a listener given to the kernel because no AF_XDP socket can
    /// take them: no worker count set, the receiving queue >= [`MAX_QUEUES`], no socket in the
    /// flow's XSKMAP slot, a socket there bound to another queue, or a failed redirect.
    pub no_socket: u64,
    /// Terminal: IPv4/IPv6 packets dropped (`XDP_DROP`) because the source address matches a
    /// blocklist prefix. Checked before anything else above the IP header.
    pub blocked: u64,
    /// Terminal: TCP segments to a listener dropped (`XDP_DROP`) by a per-source rate limit:
    /// a SYN beyond [`XdpConfig::syn_interval_ns`]'s rate and burst for its source address
    /// (bypass and kernel listeners alike), or a segment of an unknown flow to a kernel
    /// listener beyond [`XdpConfig::unknown_interval_ns`]'s.
    pub rate_limited: u64,
    /// Terminal: SYNs to a bypass listener answered by the program itself with a SYN-ACK
    /// carrying a SYN cookie (`XDP_TX`, [`XdpConfig::syn_cookies`]); the handshake's final ACK
    /// is steered to a worker, whose stack validates the cookie. Also counts the (never seen)
    /// SYN dropped because its frame, once resized, no longer held the reply.
    pub syn_cookies: u64,
}

impl XdpStats {
    /// Adds `other` into `self` field by field, wrapping like the kernel-side counters do.
    pub fn accumulate(&mut self, other: &XdpStats) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.ipv4 = self.ipv4.wrapping_add(other.ipv4);
        self.ipv6 = self.ipv6.wrapping_add(other.ipv6);
        self.tcp = self.tcp.wrapping_add(other.tcp);
        self.vlan = self.vlan.wrapping_add(other.vlan);
        self.other = self.other.wrapping_add(other.other);
        self.malformed = self.malformed.wrapping_add(other.malformed);
        self.ipv4_fragments = self.ipv4_fragments.wrapping_add(other.ipv4_fragments);
        self.steered = self.steered.wrapping_add(other.steered);
        self.passed = self.passed.wrapping_add(other.passed);
        self.no_socket = self.no_socket.wrapping_add(other.no_socket);
        self.blocked = self.blocked.wrapping_add(other.blocked);
        self.rate_limited = self.rate_limited.wrapping_add(other.rate_limited);
        self.syn_cookies = self.syn_cookies.wrapping_add(other.syn_cookies);
    }

    /// `steered + passed + no_socket + blocked + rate_limited + syn_cookies`: equal to `packets` when no
    /// frame is in flight.
    pub fn terminal(&self) -> u64 {
        self.steered
            .wrapping_add(self.passed)
            .wrapping_add(self.no_socket)
            .wrapping_add(self.blocked)
            .wrapping_add(self.rate_limited)
            .wrapping_add(self.syn_cookies)
    }
}

// Fourteen u64 fields and nothing else: no padding, 8-byte alignment on every target.
const _: () = assert!(core::mem::size_of::<XdpStats>() == 14 * 8);
const _: () = assert!(core::mem::align_of::<XdpStats>() == 8);

/// Key of [`LISTEN_MAP`]: a destination (address, port) whose TCP segments are steered.
///
/// A wildcard listener (`0.0.0.0:443`, `[::]:443`) is stored with the unspecified address of
/// its family ([`IPV4_MAPPED_UNSPECIFIED`] or all zeros); the program looks up the exact
/// destination first and then the wildcard of the packet's family.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenKey {
    /// Destination address, network byte order; IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
    /// Destination port, host byte order.
    pub port: u16,
    /// Always zero: the kernel hashes all 20 key bytes, so padding must be explicit and fixed.
    _pad: u16,
}

impl ListenKey {
    /// The key for (`addr`, `port`); `addr` as in [`ListenKey::addr`].
    pub const fn new(addr: [u8; 16], port: u16) -> ListenKey {
        ListenKey {
            addr,
            port,
            _pad: 0,
        }
    }
}

const _: () = assert!(core::mem::size_of::<ListenKey>() == 20);

/// The value of [`CONFIG_MAP`]: what userspace tells the program at run time. All zero until
/// userspace writes it, which disables steering (listen matches count `no_socket`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpConfig {
    /// AF_XDP workers per queue, `1..=MAX_WORKERS`; 0 means no sockets yet. The XSKMAP slot of
    /// a flow is [`xsk_index`]`(queue, workers, flow_hash(..))`.
    pub workers: u32,
    /// Non-zero: listener-bound segments are not redirected but answered by the program itself
    /// (Ethernet, IP addresses and TCP ports swapped, sent back with `XDP_TX`) and counted as
    /// `steered`. The benchmark's ceiling; 0 (off) by default.
    pub reflect: u32,
    /// Binary upgrade of the bypass path ([`HANDOVER_KERNEL_KEEPS`], [`HANDOVER_KERNEL_NEW`]);
    /// 0 outside an upgrade, so the per-packet path pays nothing for it then.
    pub handover: u32,
    /// The [`flow_hash`] key: random, drawn when userspace attaches the program and written
    /// before any worker count, so no flow is ever steered under another key. Kept by a
    /// binary upgrade that adopts the running program (its flows keep their workers).
    pub steer_key: [u8; 16],
    /// Always zero: keeps the u64 fields below 8-byte aligned without implicit padding.
    pub _pad: u32,
    /// Per-source SYN limit as the interval between SYNs one source address may send in the
    /// long run, nanoseconds (`1e9 / rate`); 0 = no limit. A SYN (without ACK) to a listener
    /// ([`LISTEN_STEER`] or [`LISTEN_LIMIT`]) is dropped and counted `rate_limited` when its
    /// source is more than [`XdpConfig::syn_burst_ns`] ahead of schedule (GCRA, RFC 2697's
    /// token bucket in its virtual-scheduling form: no division on the eBPF side).
    pub syn_interval_ns: u64,
    /// Burst tolerance of the SYN limit, nanoseconds (`(burst - 1) * interval`): how far ahead
    /// of its schedule a source may run before its SYNs are dropped.
    pub syn_burst_ns: u64,
    /// Per-source limit on segments of unknown flows, as [`XdpConfig::syn_interval_ns`]; 0 = no
    /// limit. Kernel listeners ([`LISTEN_LIMIT`]) only: a non-SYN segment whose 4-tuple the
    /// kernel holds no connection for (socket lookup finds the listener or nothing) counts
    /// against its source's schedule. The bypass stack's flows are not visible to XDP.
    pub unknown_interval_ns: u64,
    /// Burst tolerance of the unknown-flow limit, nanoseconds.
    pub unknown_burst_ns: u64,
    /// `CLOCK_MONOTONIC` (`bpf_ktime_get_ns`) at the bypass workers' clock epoch, nanoseconds:
    /// the SYN-cookie counter and key period are counted from it, as the workers count them.
    pub cookie_epoch_ns: u64,
    /// The process-wide secret the workers derive each period's cookie key from
    /// ([`syncookie::period_key`]).
    pub cookie_secret: [u8; 16],
    /// Non-zero: SYNs (IPv4, untagged, no IP options) to a bypass listener are answered here
    /// with a cookie SYN-ACK (`XDP_TX`, counted `syn_cookies`) instead of reaching a worker.
    pub syn_cookies: u32,
    /// The SYN-ACK's window field (the stack's receive buffer, at most 65535: never scaled).
    pub cookie_window: u32,
    /// The MSS option the SYN-ACK offers (the stack's MSS).
    pub cookie_mss: u32,
    /// The window-scale shift the SYN-ACK offers when the SYN offered one with timestamps.
    pub cookie_wscale: u32,
}

const _: () = assert!(core::mem::size_of::<XdpConfig>() == 104);

/// [`XdpConfig::handover`] flag: a listener's segment whose 4-tuple the kernel holds as a
/// connection (request, established or time-wait socket; `bpf_skc_lookup_tcp`) is passed to
/// the kernel. Set while the new tern serves the flows it accepted during an upgrade on kernel
/// sockets; costs one socket lookup per listener segment while set.
pub const HANDOVER_KERNEL_KEEPS: u32 = 1;
/// [`XdpConfig::handover`] flag: a SYN (without ACK) to a listener is passed to the kernel,
/// where the new tern listens, instead of going to an AF_XDP socket (the old tern's, which
/// keeps the flows it has).
pub const HANDOVER_KERNEL_NEW: u32 = 2;

/// Value of [`SOURCE_RATE_MAP`]: one source address's schedule.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceRate {
    /// Theoretical arrival time of the source's next SYN, in `bpf_ktime_get_ns` nanoseconds:
    /// the GCRA state of the SYN limit.
    pub syn_tat: u64,
    /// The same for segments of unknown flows ([`XdpConfig::unknown_interval_ns`]).
    pub unknown_tat: u64,
}

const _: () = assert!(core::mem::size_of::<SourceRate>() == 16);

/// One GCRA step (the virtual-scheduling form of a token bucket, ITU-T I.371): a segment at
/// `now` against schedule `tat`, emission interval `interval` and burst tolerance `burst`
/// (nanoseconds). `Some(new_tat)` if it conforms, `None` if it must be dropped (the schedule
/// is then unchanged, so a source that keeps flooding gets nothing more through than its
/// rate). Straight-line, no division.
#[inline(always)]
pub const fn gcra(tat: u64, now: u64, interval: u64, burst: u64) -> Option<u64> {
    let start = if tat > now { tat } else { now };
    if start - now > burst {
        return None;
    }
    Some(start.saturating_add(interval))
}

// SAFETY (all three impls): `#[repr(C)]`, `Copy`, made only of integer fields and byte arrays
// (every bit pattern is valid), and without padding (checked by the size assertions above), so
// they may be read from and written to a map as raw bytes.
#[cfg(feature = "user")]
unsafe impl aya::Pod for XdpStats {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for ListenKey {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for XdpConfig {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for SourceRate {}

// ---------------------------------------------------------------------------------------------
// Test-only loss injection (`tern_tests::loss`). The programs live in the same object as
// `tern_xdp` so the tests need no second eBPF build; `tern run` never loads or attaches them
// (aya creates their two small maps with the object, nothing else).

/// XDP program that drops received IPv4/IPv6 TCP frames at [`LossConfig::ingress_ppm`].
pub const LOSS_XDP_PROGRAM: &str = "tern_loss";
/// tc classifier (`SchedClassifier`) that drops sent IPv4/IPv6 TCP frames at
/// [`LossConfig::egress_ppm`].
pub const LOSS_TC_PROGRAM: &str = "tern_loss_tc";
/// Loss settings: `Array<LossConfig>`, [`LOSS_CONFIG_ENTRIES`] entry, index 0.
pub const LOSS_CONFIG_MAP: &str = "TERN_LOSS_CFG";
/// Loss counters: `PerCpuArray<LossStats>`, [`LOSS_STATS_ENTRIES`] entries, indexed by
/// [`LOSS_INGRESS`] / [`LOSS_EGRESS`].
pub const LOSS_STATS_MAP: &str = "TERN_LOSS_STATS";
/// Entries of [`LOSS_CONFIG_MAP`].
pub const LOSS_CONFIG_ENTRIES: u32 = 1;
/// Entries of [`LOSS_STATS_MAP`]: one per direction.
pub const LOSS_STATS_ENTRIES: u32 = 2;
/// [`LOSS_STATS_MAP`] index of the XDP (ingress) program's counters.
pub const LOSS_INGRESS: u32 = 0;
/// [`LOSS_STATS_MAP`] index of the tc (egress) program's counters.
pub const LOSS_EGRESS: u32 = 1;
/// Parts per million: a rate of `LOSS_PPM_MAX` drops every eligible frame.
pub const LOSS_PPM_MAX: u32 = 1_000_000;

const _: () = assert!(LOSS_CONFIG_MAP.len() <= 15);
const _: () = assert!(LOSS_STATS_MAP.len() <= 15);
const _: () = assert!(LOSS_XDP_PROGRAM.len() <= 15);
const _: () = assert!(LOSS_TC_PROGRAM.len() <= 15);

/// Value of [`LOSS_CONFIG_MAP`]. All zero (no loss) until userspace writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LossConfig {
    /// Drop rate of received TCP frames, parts per million (capped at [`LOSS_PPM_MAX`]).
    pub ingress_ppm: u32,
    /// Drop rate of sent TCP frames, parts per million (capped at [`LOSS_PPM_MAX`]).
    pub egress_ppm: u32,
    /// Seeds each CPU's and direction's xorshift generator the first time it runs.
    pub seed: u64,
}

const _: () = assert!(core::mem::size_of::<LossConfig>() == 16);

/// Per-CPU value of [`LOSS_STATS_MAP`], one per direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LossStats {
    /// IPv4/IPv6 TCP frames dropped.
    pub dropped: u64,
    /// IPv4/IPv6 TCP frames let through. Frames that are not subject to loss (ARP, ICMP, UDP,
    /// IPv6 with extension headers, anything not IP) are counted in neither.
    pub passed: u64,
    /// The generator's state on this CPU; 0 means "not seeded yet".
    pub rng: u64,
}

const _: () = assert!(core::mem::size_of::<LossStats>() == 24);

/// One xorshift64* step: the new state and a 32-bit output whose high bits are well mixed.
/// `state` must not be 0 (xorshift's fixed point).
#[inline(always)]
pub const fn loss_rng_step(state: u64) -> (u64, u32) {
    let mut x = state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    (x, (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32)
}

/// The first generator state of direction `direction` for `seed`: never 0, and different per
/// direction so the two programs do not drop in lockstep.
#[inline(always)]
pub const fn loss_rng_seed(seed: u64, direction: u32) -> u64 {
    let mixed = (seed ^ ((direction as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)))
        .wrapping_mul(0xbf58_476d_1ce4_e5b9);
    (mixed ^ (mixed >> 31)) | 1
}

/// Whether a frame is dropped at `ppm` parts per million given the generator output `draw`:
/// maps `draw` onto `0..LOSS_PPM_MAX` by multiply-shift (no division on the eBPF side).
#[inline(always)]
pub const fn loss_drops(draw: u32, ppm: u32) -> bool {
    ((draw as u64 * LOSS_PPM_MAX as u64) >> 32) < ppm as u64
}

// SAFETY: as for the impls above: `#[repr(C)]`, `Copy`, integer fields only, no padding
// (size assertions above).
#[cfg(feature = "user")]
unsafe impl aya::Pod for LossConfig {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for LossStats {}

// ---------------------------------------------------------------------------------------------
// Addresses

/// `::ffff:0.0.0.0`, the key address of an IPv4 wildcard listener.
pub const IPV4_MAPPED_UNSPECIFIED: [u8; 16] = ipv4_mapped([0; 4]);

/// The IPv4-mapped IPv6 form (`::ffff:a.b.c.d`) of an IPv4 address in network byte order.
#[inline(always)]
pub const fn ipv4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

// ---------------------------------------------------------------------------------------------
// Flow hash and the XSKMAP index rule

/// Hash of a TCP flow as the receiver sees it: `src`/`sport` are the packet's source (the
/// client), `dst`/`dport` its destination (the listener). Addresses in network byte order,
/// IPv4 as `::ffff:a.b.c.d`; ports in host order. The program and userspace compute the same
/// value under the same `key` ([`XdpConfig::steer_key`]), so userspace knows which worker a flow
/// belongs to (see [`flow_worker`]).
///
/// [`siphash24`] under `key` over the 36 bytes `src ‖ dst ‖ sport ‖ dport` (ports big-endian),
/// low 32 bits. Keyed with a secret drawn at each start (`tern::bypass::xdp::attach`), so a
/// client cannot choose source ports or addresses that all land on one worker: without the key
/// the worker of a flow is a coin toss. A keyed PRF rather than a seeded non-cryptographic hash
/// (MurmurHash3 has seed-independent multicollisions, which would make a seed useless against
/// an attacker who controls many source addresses).
#[inline(always)]
pub fn flow_hash(key: &[u8; 16], src: &[u8; 16], dst: &[u8; 16], sport: u16, dport: u16) -> u32 {
    // The 36 bytes as SipHash reads them, built from whole words: no byte array on the eBPF
    // stack for the compiler to leave partly uninitialised (which the verifier rejects).
    let [s0, s1] = sport.to_be_bytes();
    let [d0, d1] = dport.to_be_bytes();
    let mut sip = Sip::new(key);
    sip.word(le_word(src, 0));
    sip.word(le_word(src, 8));
    sip.word(le_word(dst, 0));
    sip.word(le_word(dst, 8));
    sip.finish(u64::from_le_bytes([s0, s1, d0, d1, 0, 0, 0, 36])) as u32
}

#[inline(always)]
pub(crate) const fn le_word(bytes: &[u8; 16], at: usize) -> u64 {
    u64::from_le_bytes([
        bytes[at],
        bytes[at + 1],
        bytes[at + 2],
        bytes[at + 3],
        bytes[at + 4],
        bytes[at + 5],
        bytes[at + 6],
        bytes[at + 7],
    ])
}

// ---------------------------------------------------------------------------------------------
// SipHash-2-4

/// SipHash-2-4 (Aumasson & Bernstein, "SipHash: a fast short-input PRF", 2012): 2 compression
/// rounds per 8-byte word, 4 finalisation rounds, 64-bit output. The one implementation in
/// tern: the XDP program's steering hash and the TCP stack's SYN cookies both use it.
///
/// Never panics (`rest.len() < 8`). The eBPF program uses the word-level core through
/// [`flow_hash`], which needs no loop and no byte buffer.
pub fn siphash24(key: &[u8; 16], data: &[u8]) -> u64 {
    let mut sip = Sip::new(key);
    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        sip.word(u64::from_le_bytes(w));
    }
    // Last block: the remaining bytes, little-endian, with the length (mod 256) in the top byte.
    let mut last = [0u8; 8];
    let rest = chunks.remainder();
    last[..rest.len()].copy_from_slice(rest);
    last[7] = data.len() as u8;
    sip.finish(u64::from_le_bytes(last))
}

/// SipHash-2-4's state between words; [`siphash24`] and [`flow_hash`] feed it.
pub(crate) struct Sip {
    v: [u64; 4],
}

impl Sip {
    #[inline(always)]
    pub(crate) fn new(key: &[u8; 16]) -> Sip {
        let k0 = u64::from_le_bytes([
            key[0], key[1], key[2], key[3], key[4], key[5], key[6], key[7],
        ]);
        let k1 = u64::from_le_bytes([
            key[8], key[9], key[10], key[11], key[12], key[13], key[14], key[15],
        ]);
        Sip {
            v: [
                k0 ^ 0x736f_6d65_7073_6575,
                k1 ^ 0x646f_7261_6e64_6f6d,
                k0 ^ 0x6c79_6765_6e65_7261,
                k1 ^ 0x7465_6462_7974_6573,
            ],
        }
    }

    /// One 8-byte message word, little-endian: two compression rounds.
    #[inline(always)]
    pub(crate) fn word(&mut self, m: u64) {
        self.v[3] ^= m;
        sip_round(&mut self.v);
        sip_round(&mut self.v);
        self.v[0] ^= m;
    }

    /// The last word (remaining bytes with the length in the top byte), then four
    /// finalisation rounds.
    #[inline(always)]
    pub(crate) fn finish(mut self, last: u64) -> u64 {
        self.word(last);
        self.v[2] ^= 0xff;
        sip_round(&mut self.v);
        sip_round(&mut self.v);
        sip_round(&mut self.v);
        sip_round(&mut self.v);
        self.v[0] ^ self.v[1] ^ self.v[2] ^ self.v[3]
    }
}

#[inline(always)]
fn sip_round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13);
    v[1] ^= v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16);
    v[3] ^= v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21);
    v[3] ^= v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17);
    v[1] ^= v[2];
    v[2] = v[2].rotate_left(32);
}

/// The worker (`0..workers`) that owns the flow with hash `hash`; 0 when `workers` is 0.
#[inline(always)]
pub const fn flow_worker(hash: u32, workers: u32) -> u32 {
    // checked_rem: no panic path (the verifier would reject the panic handler's loop).
    match hash.checked_rem(workers) {
        Some(worker) => worker,
        None => 0,
    }
}

/// The XSKMAP slot of the socket that `worker` binds to RX queue `queue`:
/// `queue * workers + worker`. Userspace registers each (queue, worker) socket here.
/// Callers keep `queue < MAX_QUEUES`, `worker < workers <= MAX_WORKERS`, so the slot is below
/// [`XSK_MAP_ENTRIES`].
#[inline(always)]
pub const fn xsk_slot(queue: u32, worker: u32, workers: u32) -> u32 {
    queue * workers + worker
}

/// The XSKMAP slot a frame of a flow with hash `hash`, received on RX queue `queue`, is
/// redirected to: `queue * workers + (hash % workers)`. `None` when steering is impossible:
/// `workers` is 0 or above [`MAX_WORKERS`], or `queue >= MAX_QUEUES`. Every `Some` is below
/// [`XSK_MAP_ENTRIES`].
#[inline(always)]
pub const fn xsk_index(queue: u32, workers: u32, hash: u32) -> Option<u32> {
    if workers == 0 || workers > MAX_WORKERS || queue >= MAX_QUEUES {
        return None;
    }
    Some(xsk_slot(queue, flow_worker(hash, workers), workers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulate_adds_every_field() {
        let one = XdpStats {
            packets: 1,
            ipv4: 2,
            ipv6: 3,
            tcp: 4,
            vlan: 5,
            other: 6,
            malformed: 7,
            ipv4_fragments: 8,
            steered: 9,
            passed: 10,
            no_socket: 11,
            blocked: 12,
            rate_limited: 13,
            syn_cookies: 14,
        };
        let mut sum = XdpStats::default();
        sum.accumulate(&one);
        sum.accumulate(&one);
        assert_eq!(
            sum,
            XdpStats {
                packets: 2,
                ipv4: 4,
                ipv6: 6,
                tcp: 8,
                vlan: 10,
                other: 12,
                malformed: 14,
                ipv4_fragments: 16,
                steered: 18,
                passed: 20,
                no_socket: 22,
                blocked: 24,
                rate_limited: 26,
                syn_cookies: 28,
            },
            "accumulate must add each field to itself"
        );
        assert_eq!(
            sum.terminal(),
            18 + 20 + 22 + 24 + 26 + 28,
            "terminal sums the six"
        );
    }

    /// The reference implementation's vectors (key 00..0f, message 00..(len-1); vectors.h and
    /// the paper's Appendix A example at 15 bytes).
    #[test]
    fn siphash_reference_vectors() {
        let key: [u8; 16] = core::array::from_fn(|i| i as u8);
        let msg: [u8; 64] = core::array::from_fn(|i| i as u8);
        let expect = [
            (0, 0x726f_db47_dd0e_0e31),
            (1, 0x74f8_39c5_93dc_67fd),
            (2, 0x0d6c_8009_d9a9_4f5a),
            (3, 0x8567_6696_d7fb_7e2d),
            (4, 0xcf27_94e0_2771_87b7),
            (8, 0x93f5_f579_9a93_2462),
            (15, 0xa129_ca61_49be_45e5),
            (63, 0x958a_324c_eb06_4572),
        ];
        for (len, want) in expect {
            assert_eq!(
                siphash24(&key, &msg[..len]),
                want,
                "SipHash-2-4 vector, {len} bytes"
            );
        }
    }

    /// The eBPF program and userspace must agree, so the function is pinned to its definition:
    /// SipHash-2-4 of the 36-byte tuple. Every input and the key change the value.
    #[test]
    fn flow_hash_is_keyed_siphash_and_uses_every_input() {
        let key = *b"steering key 16b";
        let client = ipv4_mapped([198, 18, 0, 2]);
        let server = ipv4_mapped([198, 18, 0, 1]);
        let base = flow_hash(&key, &client, &server, 40000, 443);
        let mut m = [0u8; 36];
        m[..16].copy_from_slice(&client);
        m[16..32].copy_from_slice(&server);
        m[32..34].copy_from_slice(&40000u16.to_be_bytes());
        m[34..].copy_from_slice(&443u16.to_be_bytes());
        assert_eq!(base, siphash24(&key, &m) as u32, "definition");
        let mut other_client = client;
        other_client[15] ^= 1;
        let mut other_server = server;
        other_server[0] ^= 0x80;
        let mut other_key = key;
        other_key[5] ^= 1;
        let variants = [
            flow_hash(&key, &other_client, &server, 40000, 443),
            flow_hash(&key, &client, &other_server, 40000, 443),
            flow_hash(&key, &client, &server, 40001, 443),
            flow_hash(&key, &client, &server, 40000, 444),
            flow_hash(&key, &server, &client, 443, 40000),
            flow_hash(&other_key, &client, &server, 40000, 443),
        ];
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(*v, base, "variant {i} hashed like the base tuple");
        }
    }

    /// With a different key the same flows land on different workers: what an attacker who
    /// aimed its ports at one worker under one key gets under the next start's key.
    #[test]
    fn another_key_moves_flows() {
        let client = ipv4_mapped([10, 0, 0, 2]);
        let server = ipv4_mapped([10, 0, 0, 1]);
        let a = [1u8; 16];
        let b = [2u8; 16];
        let moved = (0..1000u16)
            .filter(|i| {
                flow_worker(flow_hash(&a, &client, &server, 32768 + i, 443), 4)
                    != flow_worker(flow_hash(&b, &client, &server, 32768 + i, 443), 4)
            })
            .count();
        // About 3/4 of the flows move with 4 workers.
        assert!((650..=850).contains(&moved), "{moved} of 1000 flows moved");
    }

    const TEST_KEY: [u8; 16] = *b"an arbitrary key";

    /// Counts per worker for `tuples`, then checks each is within `tolerance` of even.
    #[track_caller]
    fn assert_even(name: &str, tuples: &[([u8; 16], [u8; 16], u16, u16)], tolerance: f64) {
        for workers in 2..=8u32 {
            let mut counts = [0u32; 8];
            for (src, dst, sport, dport) in tuples {
                let w = flow_worker(flow_hash(&TEST_KEY, src, dst, *sport, *dport), workers);
                assert!(w < workers, "worker {w} out of range for {workers}");
                counts[w as usize] += 1;
            }
            let expected = tuples.len() as f64 / f64::from(workers);
            for (w, &count) in counts[..workers as usize].iter().enumerate() {
                let deviation = (f64::from(count) - expected).abs() / expected;
                assert!(
                    deviation <= tolerance,
                    "{name}: worker {w} of {workers} got {count} flows, expected about \
                     {expected:.0} (±{:.0}%): {:?}",
                    tolerance * 100.0,
                    &counts[..workers as usize]
                );
            }
        }
    }

    #[test]
    fn flow_hash_spreads_sequential_ports_evenly() {
        // The common case: one client opening many connections, ephemeral ports in sequence.
        let client = ipv4_mapped([10, 0, 0, 2]);
        let server = ipv4_mapped([10, 0, 0, 1]);
        let tuples: std::vec::Vec<_> = (0..4000u16)
            .map(|i| (client, server, 32768 + i, 443))
            .collect();
        assert_even("sequential ports", &tuples, 0.15);
    }

    #[test]
    fn flow_hash_spreads_many_clients_evenly() {
        // Many IPv4 clients (sequential addresses, same source port) and many IPv6 clients.
        let server4 = ipv4_mapped([192, 0, 2, 1]);
        let server6 = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let tuples: std::vec::Vec<_> = (0..4000u32)
            .map(|i| {
                if i % 2 == 0 {
                    let [_, b, c, d] = (0x0a00_0000 | i).to_be_bytes();
                    (ipv4_mapped([10, b, c, d]), server4, 50000, 443)
                } else {
                    let mut client = server6;
                    client[12..].copy_from_slice(&i.to_be_bytes());
                    (client, server6, 50000, 8443)
                }
            })
            .collect();
        assert_even("many clients", &tuples, 0.15);
    }

    /// A source sending back to back gets `burst / interval + 1` through, then one per
    /// interval; one that waits gets its burst back.
    #[test]
    fn gcra_allows_the_burst_then_the_rate() {
        let (interval, burst) = (1_000u64, 3_000u64);
        let mut tat = 0;
        let mut passed = 0;
        for _ in 0..10 {
            if let Some(t) = gcra(tat, 5_000, interval, burst) {
                tat = t;
                passed += 1;
            }
        }
        assert_eq!(passed, 4, "burst of 4 at one instant");
        assert_eq!(gcra(tat, 5_500, interval, burst), None, "still ahead");
        assert!(
            gcra(tat, 6_000, interval, burst).is_some(),
            "one interval later"
        );
        assert!(
            gcra(tat, 1_000_000, interval, burst).is_some(),
            "idle source"
        );
    }

    #[test]
    fn index_rule_is_queue_major_and_bounded() {
        // queue * workers + hash % workers
        assert_eq!(xsk_index(0, 1, 12345), Some(0));
        assert_eq!(xsk_index(3, 4, 10), Some(3 * 4 + 2));
        assert_eq!(xsk_index(1, 3, 7), Some(3 + 1));
        assert_eq!(
            xsk_slot(3, 2, 4),
            14,
            "slot of worker 2's socket on queue 3"
        );
        assert_eq!(
            xsk_index(5, 6, 0xdead_beef),
            Some(xsk_slot(5, flow_worker(0xdead_beef, 6), 6)),
            "the index is the slot of the flow's worker on the receiving queue"
        );
        assert_eq!(flow_worker(7, 0), 0, "no workers: worker 0, no panic");
        assert_eq!(xsk_index(0, 0, 7), None, "no workers: no slot");
        assert_eq!(xsk_index(0, MAX_WORKERS + 1, 7), None, "too many workers");
        assert_eq!(xsk_index(MAX_QUEUES, 1, 7), None, "queue out of range");
        let last = xsk_index(MAX_QUEUES - 1, MAX_WORKERS, u32::MAX).expect("in range");
        assert_eq!(
            last,
            XSK_MAP_ENTRIES - 1,
            "the largest index is the last slot"
        );
        // Every worker of every queue maps to a distinct slot.
        let workers = 4;
        let mut seen = [false; 16];
        for queue in 0..4 {
            for worker in 0..workers {
                let slot = xsk_slot(queue, worker, workers) as usize;
                assert!(!seen[slot], "slot {slot} used twice");
                seen[slot] = true;
            }
        }
        assert!(seen.iter().all(|s| *s), "slots 0..16 all used: {seen:?}");
    }

    #[test]
    fn loss_draws_hit_the_rate() {
        assert!(!loss_drops(u32::MAX, 0), "rate 0 never drops");
        assert!(loss_drops(u32::MAX, LOSS_PPM_MAX), "rate 1e6 always drops");
        assert_ne!(
            loss_rng_seed(7, LOSS_INGRESS),
            loss_rng_seed(7, LOSS_EGRESS)
        );
        assert_ne!(
            loss_rng_seed(0, LOSS_INGRESS),
            0,
            "seed 0 still gives a state"
        );
        let mut state = loss_rng_seed(42, LOSS_INGRESS);
        let mut dropped = 0u32;
        for _ in 0..100_000 {
            let (next, draw) = loss_rng_step(state);
            assert_ne!(next, 0, "xorshift reached its fixed point");
            state = next;
            dropped += u32::from(loss_drops(draw, 200_000));
        }
        assert!(
            (19_000..=21_000).contains(&dropped),
            "20% of 100000 draws should drop about 20000, got {dropped}"
        );
    }

    #[test]
    fn listen_keys_and_mapped_addresses() {
        assert_eq!(
            ipv4_mapped([192, 0, 2, 7]),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 7]
        );
        assert_eq!(IPV4_MAPPED_UNSPECIFIED[10..12], [0xff, 0xff]);
        let key = ListenKey::new(ipv4_mapped([192, 0, 2, 7]), 443);
        assert_eq!(key.port, 443);
        assert_eq!(key._pad, 0, "padding must be zero");
    }
}

//! Loading tern's XDP program, attaching it to an interface, filling its maps and reading its
//! counters.
//!
//! The eBPF object is built from `xdp-ebpf/` by `build.rs` and embedded in the binary, so a
//! `tern` binary always carries the program that matches it. [`attach`] loads a fresh copy of
//! the object (its own maps) and attaches `tern_xdp` to one interface; the returned
//! [`XdpProgram`] keeps the program, its maps and its link, and detaches on drop. Through it,
//! userspace sets what the program steers ([`XdpProgram::set_listeners`],
//! [`XdpProgram::set_workers`], [`XdpProgram::register_socket`]), the source blocklist
//! ([`XdpProgram::block`]) and the benchmark's reflect mode, at any time while it runs.
//! [`attach_pass`] attaches the trivial `tern_pass` program instead (for a veth peer that must
//! accept `XDP_TX` frames: tests and the benchmark rig).
//!
//! This module owns the userspace side of the XDP program's life cycle and [`IpPrefix`], the
//! blocklist's prefix type. The per-packet logic is `xdp-ebpf`'s; map layouts, names, the flow
//! hash and the XSKMAP index rule are `tern_common`'s. AF_XDP sockets themselves (UMEM, rings)
//! belong to the bypass workers, which only hand their bound sockets' fds to
//! [`XdpProgram::register_socket`].
//!
//! Map updates are single `bpf(2)` calls, each atomic for the program: it sees an entry either
//! before or after, never half-written. Updates that span several entries (replacing the listen
//! set) add before they remove, so a listener that stays in the set is never missed.
//!
//! Memory accounting: on Linux >= 5.11 BPF maps are charged to the memory cgroup, not to
//! RLIMIT_MEMLOCK, so no rlimit is raised here (checked on 6.18 with `ulimit -l 0`; aya itself
//! raises the limit on older kernels when map creation fails with EPERM).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard, PoisonError};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, ProgramArray, XskMap};
use aya::programs::links::{FdLink, Link as _};
use aya::programs::xdp::{XdpLink, XdpLinkId};
use aya::programs::{ProgramError, Xdp, XdpMode};
use aya::sys::SyscallError;
use aya::Ebpf;
use tern_common::{
    ipv4_mapped, ListenKey, XdpConfig, XdpStats, BLOCK_V4_MAP, BLOCK_V6_MAP, BLOCK_VALUE,
    CONFIG_INDEX, CONFIG_MAP, LISTEN_LIMIT, LISTEN_MAP, LISTEN_MAP_ENTRIES, LISTEN_STEER,
    MAX_WORKERS, PROG_MAP, PROG_SYN_COOKIE, SYN_COOKIE_PROGRAM, XDP_PASS_PROGRAM, XDP_PROGRAM,
    XDP_STATS_INDEX, XDP_STATS_MAP, XSK_MAP, XSK_MAP_ENTRIES,
};

use crate::config::XdpAttach;

/// The XDP object built by `build.rs` from `xdp-ebpf/` (ELF, 8-byte aligned as aya requires).
static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tern-xdp"));

/// The embedded eBPF object (8-byte aligned ELF), for loaders outside this module: the test
/// rig's loss injection (`tern_tests::loss`) loads its test-only programs from it. tern itself
/// loads it only through [`attach`] and [`attach_pass`].
pub fn object() -> &'static [u8] {
    XDP_OBJECT
}

/// The mode the program actually runs in on its interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachedMode {
    /// Driver (native) XDP: runs in the driver's receive path, before an skb exists.
    Native,
    /// Generic (SKB) XDP: runs in the core stack after the skb is built; slower, works anywhere.
    Skb,
}

impl fmt::Display for AttachedMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachedMode::Native => "native",
            AttachedMode::Skb => "skb",
        })
    }
}

impl AttachedMode {
    fn xdp_mode(self) -> XdpMode {
        match self {
            AttachedMode::Native => XdpMode::Driver,
            AttachedMode::Skb => XdpMode::Skb,
        }
    }
}

/// Why loading, attaching, reading or updating the XDP program failed. Every variant names the
/// interface.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("XDP on {interface}: cannot load the embedded eBPF object: {source}")]
    Object {
        interface: String,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("XDP on {interface}: the embedded object has no XDP program `{program}`")]
    MissingProgram {
        interface: String,
        program: &'static str,
    },
    #[error("XDP on {interface}: the kernel refused program `{program}`: {source}")]
    Load {
        interface: String,
        program: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("XDP on {interface}: no such interface")]
    UnknownInterface { interface: String },
    #[error("XDP on {interface}: attaching in {mode} mode failed: {source}")]
    Attach {
        interface: String,
        mode: AttachedMode,
        #[source]
        source: Box<ProgramError>,
    },
    #[error(
        "XDP on {interface}: attaching failed in native mode ({native}) and in skb mode: {source}"
    )]
    AttachAuto {
        interface: String,
        native: Box<ProgramError>,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("XDP on {interface}: the embedded object has no map `{map}`")]
    MissingMap {
        interface: String,
        map: &'static str,
    },
    #[error("XDP on {interface}: map `{map}`: {source}")]
    Map {
        interface: String,
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error(
        "XDP on {interface}: {workers} workers; the steering rule supports 1 to {MAX_WORKERS}"
    )]
    Workers { interface: String, workers: u32 },
    #[error(
        "XDP on {interface}: AF_XDP socket slot {index} is out of range (the map has \
         {XSK_MAP_ENTRIES} slots: queue * workers + worker)"
    )]
    Slot { interface: String, index: u32 },
    #[error(
        "XDP on {interface}: {count} distinct listen addresses; the listen map holds \
         {LISTEN_MAP_ENTRIES}"
    )]
    TooManyListeners { interface: String, count: usize },
}

/// One per-source limit: `rate` per second in the long run (0 = off), `burst` back to back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateLimit {
    pub rate: u32,
    pub burst: u32,
}

impl RateLimit {
    /// The GCRA interval and burst tolerance in nanoseconds (`tern_common::gcra`).
    fn schedule(self) -> (u64, u64) {
        if self.rate == 0 {
            return (0, 0);
        }
        let interval = (1_000_000_000 / u64::from(self.rate)).max(1);
        // A burst of 1 means no segment may run ahead of the schedule at all.
        (
            interval,
            interval.saturating_mul(u64::from(self.burst.saturating_sub(1))),
        )
    }
}

/// The XDP program's counters, summed over all CPUs. Field meanings and the counting rule are
/// those of [`tern_common::XdpStats`]: `steered + passed + no_socket + blocked +
/// rate_limited == packets`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct XdpCounters {
    pub packets: u64,
    pub ipv4: u64,
    pub ipv6: u64,
    pub tcp: u64,
    pub vlan: u64,
    pub other: u64,
    pub malformed: u64,
    pub ipv4_fragments: u64,
    /// Listener-bound TCP segments redirected to an AF_XDP socket (or reflected with XDP_TX).
    pub steered: u64,
    /// Frames given to the kernel because they are not for a listener.
    pub passed: u64,
    /// Listener-bound TCP segments given to the kernel because no AF_XDP socket could take them.
    pub no_socket: u64,
    /// Packets dropped because their source is on the blocklist.
    pub blocked: u64,
    /// SYNs to a listener dropped by the per-source rate limit.
    pub rate_limited: u64,
    /// SYNs to a bypass listener answered by the program with a cookie SYN-ACK (`XDP_TX`).
    pub syn_cookies: u64,
}

impl XdpCounters {
    /// Sums per-CPU copies of the kernel-side counters.
    fn sum<'a>(per_cpu: impl IntoIterator<Item = &'a XdpStats>) -> XdpCounters {
        let mut total = XdpStats::default();
        for stats in per_cpu {
            total.accumulate(stats);
        }
        XdpCounters::from(total)
    }

    /// `steered + passed + no_socket + blocked + rate_limited + syn_cookies`; equals
    /// `packets` once no frame is in flight.
    pub fn terminal(&self) -> u64 {
        self.steered
            .wrapping_add(self.passed)
            .wrapping_add(self.no_socket)
            .wrapping_add(self.blocked)
            .wrapping_add(self.rate_limited)
            .wrapping_add(self.syn_cookies)
    }
}

impl From<XdpStats> for XdpCounters {
    fn from(stats: XdpStats) -> XdpCounters {
        let XdpStats {
            packets,
            ipv4,
            ipv6,
            tcp,
            vlan,
            other,
            malformed,
            ipv4_fragments,
            steered,
            passed,
            no_socket,
            blocked,
            rate_limited,
            syn_cookies,
        } = stats;
        XdpCounters {
            packets,
            ipv4,
            ipv6,
            tcp,
            vlan,
            other,
            malformed,
            ipv4_fragments,
            steered,
            passed,
            no_socket,
            blocked,
            rate_limited,
            syn_cookies,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// IP prefixes (the blocklist's entries)

/// An IPv4 or IPv6 prefix: `addr/len` with every bit after the first `len` zero.
/// Text form: `10.0.0.0/8`, `2001:db8::/32`; a bare address is a host prefix (/32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpPrefix {
    /// The network address: host bits (after `len`) are zero.
    addr: IpAddr,
    /// 0..=32 for IPv4, 0..=128 for IPv6.
    len: u8,
}

/// Why a text or an (address, length) pair is not an [`IpPrefix`]. Each variant names the
/// prefix as it was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error(
        "{input:?} is not an IP prefix (expected an address with an optional /length, e.g. \
         10.0.0.0/8, 2001:db8::/32 or 192.0.2.7)"
    )]
    Syntax { input: String },
    #[error("{input}: the prefix length is longer than the {max} bits of the address")]
    Length { input: String, max: u8 },
    #[error("{input}: host bits are set after the first {len} bits (the prefix is {network})")]
    HostBits {
        input: String,
        len: u8,
        network: IpPrefix,
    },
}

impl IpPrefix {
    /// `addr/len`, if `len` fits the family and `addr` has no bit set after the first `len`.
    pub fn new(addr: IpAddr, len: u8) -> Result<IpPrefix, PrefixError> {
        IpPrefix::checked(addr, u32::from(len), || format!("{addr}/{len}"))
    }

    /// A host prefix: /32 for IPv4, /128 for IPv6.
    pub fn host(addr: IpAddr) -> IpPrefix {
        IpPrefix {
            addr,
            len: max_len(addr),
        }
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The number of leading bits that matter.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Whether `ip` (same family) lies inside the prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                u32::from(net) == u32::from(ip) & v4_mask(self.len)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                u128::from(net) == u128::from(ip) & v6_mask(self.len)
            }
            _ => false,
        }
    }

    fn checked(
        addr: IpAddr,
        len: u32,
        input: impl FnOnce() -> String,
    ) -> Result<IpPrefix, PrefixError> {
        let max = max_len(addr);
        let len = match u8::try_from(len) {
            Ok(len) if len <= max => len,
            _ => {
                return Err(PrefixError::Length {
                    input: input(),
                    max,
                })
            }
        };
        let network = match addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & v4_mask(len))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & v6_mask(len))),
        };
        let prefix = IpPrefix { addr: network, len };
        if network != addr {
            return Err(PrefixError::HostBits {
                input: input(),
                len,
                network: prefix,
            });
        }
        Ok(prefix)
    }
}

fn max_len(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// The first `len` bits set (`len <= 32`).
fn v4_mask(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

/// The first `len` bits set (`len <= 128`).
fn v6_mask(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

impl FromStr for IpPrefix {
    type Err = PrefixError;

    fn from_str(s: &str) -> Result<IpPrefix, PrefixError> {
        let syntax = || PrefixError::Syntax {
            input: s.to_owned(),
        };
        let (addr, len) = match s.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| syntax())?;
        match len {
            None => Ok(IpPrefix::host(addr)),
            // Digits only: `u32::from_str` would also take a leading `+`.
            Some(len) if !len.is_empty() && len.bytes().all(|b| b.is_ascii_digit()) => {
                // Only too many digits fail here: that is a length error, like 33.
                let len = len.parse::<u32>().unwrap_or(u32::MAX);
                IpPrefix::checked(addr, len, || s.to_owned())
            }
            Some(_) => Err(syntax()),
        }
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

// ---------------------------------------------------------------------------------------------
// Attaching

/// `tern_xdp` attached to one interface. Dropping it detaches the program and frees its maps.
///
/// Every method takes `&self`: the maps that userspace writes sit behind one mutex, so the
/// control thread and start-up code can share the program; reading the counters takes no lock.
pub struct XdpProgram {
    /// The attachment. Declared first and taken in `Drop`, so the program is detached before
    /// its maps and the program itself are released; `None` only while dropping. A bpf link
    /// detaches when its last descriptor closes: a successor holding one keeps it attached.
    link: Option<HeldLink>,
    /// The per-CPU counters; reading needs no `&mut`.
    stats: PerCpuArray<MapData, XdpStats>,
    /// The maps userspace writes.
    maps: Mutex<ControlMaps>,
    /// Owns the loaded programs (their maps were moved into the fields above); `None` for a
    /// program adopted from the tern this one took over from ([`adopt`]).
    _ebpf: Option<Ebpf>,
    interface: String,
    mode: AttachedMode,
    /// Kernel ids of the link and maps, for a successor ([`XdpProgram::handover_ids`]).
    ids: HandoverIds,
}

/// The bpf link that keeps `tern_xdp` attached.
#[expect(
    dead_code,
    reason = "held for its Drop: closing the last descriptor detaches"
)]
enum HeldLink {
    /// Made by this process's [`attach`].
    Own(FdLink),
    /// Taken over from the previous tern by its kernel id ([`adopt`]).
    Adopted(OwnedFd),
}

/// The maps userspace writes, with the config as last written.
struct ControlMaps {
    listen: HashMap<MapData, ListenKey, u32>,
    xsks: XskMap<MapData>,
    config: Array<MapData, XdpConfig>,
    /// What `config[CONFIG_INDEX]` holds: the map starts zeroed and only this module writes it.
    config_value: XdpConfig,
    block_v4: LpmTrie<MapData, [u8; 4], u32>,
    block_v6: LpmTrie<MapData, [u8; 16], u32>,
    /// The tail-call table holding `tern_syn_cookie`. Held open for the program's lifetime:
    /// the kernel empties a program array when its last user-space reference closes. `None`
    /// for an adopted program whose object had none.
    _progs: Option<ProgramArray<MapData>>,
}

// The control thread and the workers' start-up share programs across threads.
const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    shareable::<XdpProgram>();
    shareable::<PassProgram>();
};

impl fmt::Debug for XdpProgram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XdpProgram")
            .field("interface", &self.interface)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// What the program needs to answer SYNs as the bypass workers would ([`XdpProgram::set_syn_cookies`]).
#[derive(Clone, Copy)]
pub struct SynCookieParams {
    /// The workers' cookie secret (each period's key derives from it).
    pub secret: [u8; 16],
    /// `CLOCK_MONOTONIC` at the workers' clock epoch, nanoseconds ([`monotonic_ns_at`]).
    pub epoch_ns: u64,
    /// The stack's MSS.
    pub mss: u16,
    /// The SYN-ACK's (unscaled) window: the stack's receive buffer, capped at 65535.
    pub window: u16,
    /// The stack's window-scale shift.
    pub wscale: u8,
}

/// `CLOCK_MONOTONIC` (what `bpf_ktime_get_ns` reads, and what `std::time::Instant` is on Linux)
/// at `instant`, nanoseconds.
pub fn monotonic_ns_at(instant: std::time::Instant) -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let elapsed = std::time::Instant::now().saturating_duration_since(instant);
    let now_ns = u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000
        + u64::try_from(now.tv_nsec).unwrap_or(0);
    now_ns.saturating_sub(elapsed.as_nanos() as u64)
}

/// Loads the embedded program and attaches it to `interface` (a name in the calling thread's
/// network namespace).
///
/// `Auto` tries native mode first and falls back to SKB mode with one warning; `Native` and
/// `Skb` use exactly that mode or fail. Fails if another XDP program is already attached.
///
/// The program starts with an empty listen set and blocklist, no sockets, 0 workers and
/// reflection off: it counts and passes everything until told otherwise.
pub fn attach(interface: &str, mode: XdpAttach) -> Result<XdpProgram, XdpError> {
    let mut ebpf = load_object(interface)?;
    // Their kernel ids, for a successor (binary upgrade): read from the maps' own fds, which
    // needs no privilege (the program's map list would need CAP_SYS_ADMIN).
    let map_ids: Vec<u32> = ebpf.maps().filter_map(|(_, m)| map_id(m)).collect();
    // The maps are taken before attaching, so a broken object never gets attached.
    let stats = take_map(&mut ebpf, interface, XDP_STATS_MAP)?;
    let mut maps = ControlMaps {
        listen: take_map(&mut ebpf, interface, LISTEN_MAP)?,
        xsks: take_map(&mut ebpf, interface, XSK_MAP)?,
        config: take_map(&mut ebpf, interface, CONFIG_MAP)?,
        config_value: XdpConfig::default(),
        block_v4: take_map(&mut ebpf, interface, BLOCK_V4_MAP)?,
        block_v6: take_map(&mut ebpf, interface, BLOCK_V6_MAP)?,
        _progs: Some(load_cookie_program(&mut ebpf, interface)?),
    };
    // The steering key goes in before the program can run: no flow is ever hashed under
    // another key (and a fresh key per start means no one can aim flows at a worker).
    let mut steer_key = [0u8; 16];
    crate::sys::fill_random(&mut steer_key).map_err(|e| XdpError::Map {
        interface: interface.to_owned(),
        map: CONFIG_MAP,
        source: Box::new(MapError::IoError(e)),
    })?;
    maps.config_value.steer_key = steer_key;
    let config_value = maps.config_value;
    maps.config
        .set(CONFIG_INDEX, config_value, 0)
        .map_err(|source| XdpError::Map {
            interface: interface.to_owned(),
            map: CONFIG_MAP,
            source: Box::new(source),
        })?;
    let (link, mode) = attach_program(&mut ebpf, interface, XDP_PROGRAM, mode)?;
    // A bpf link (kernel >= 5.9) rather than a netlink attachment: a successor can take it over
    // by id during a binary upgrade, and it detaches by itself when the last holder exits.
    let link = FdLink::try_from(link).map_err(|_| XdpError::Attach {
        interface: interface.to_owned(),
        mode,
        source: Box::new(ProgramError::UnexpectedProgramType),
    })?;
    let ids = own_ids(map_ids, &link, interface)?;
    Ok(XdpProgram {
        link: Some(HeldLink::Own(link)),
        stats,
        maps: Mutex::new(maps),
        _ebpf: Some(ebpf),
        interface: interface.to_owned(),
        mode,
        ids,
    })
}

/// `tern_pass` (passes every frame, uses no map) attached to one interface; detached on drop.
///
/// For the peer end of a veth pair whose other end runs `tern_xdp` with reflection on: veth
/// hands `XDP_TX` frames only to a peer whose receive path runs in NAPI mode, which an attached
/// XDP program turns on, and drops them otherwise (the reflect test checks both). GRO on the
/// peer is said to turn NAPI on too on recent kernels; not checked here (no ethtool).
pub struct PassProgram {
    /// The attachment; `None` only while dropping.
    link: Option<XdpLink>,
    _ebpf: Ebpf,
    interface: String,
    mode: AttachedMode,
}

impl fmt::Debug for PassProgram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PassProgram")
            .field("interface", &self.interface)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// Loads the embedded object and attaches `tern_pass` to `interface`, like [`attach`].
pub fn attach_pass(interface: &str, mode: XdpAttach) -> Result<PassProgram, XdpError> {
    let mut ebpf = load_object(interface)?;
    let (link, mode) = attach_program(&mut ebpf, interface, XDP_PASS_PROGRAM, mode)?;
    Ok(PassProgram {
        link: Some(link),
        _ebpf: ebpf,
        interface: interface.to_owned(),
        mode,
    })
}

impl PassProgram {
    /// The mode the program runs in.
    pub fn attached_mode(&self) -> AttachedMode {
        self.mode
    }

    /// The interface the program is attached to.
    pub fn interface(&self) -> &str {
        &self.interface
    }
}

impl Drop for PassProgram {
    fn drop(&mut self) {
        detach(self.link.take(), &self.interface);
    }
}

fn load_object(interface: &str) -> Result<Ebpf, XdpError> {
    Ebpf::load(XDP_OBJECT).map_err(|source| XdpError::Object {
        interface: interface.to_owned(),
        source: Box::new(source),
    })
}

/// Moves map `name` out of `ebpf` as a typed map (checking its key and value sizes).
fn take_map<M>(ebpf: &mut Ebpf, interface: &str, name: &'static str) -> Result<M, XdpError>
where
    M: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| XdpError::MissingMap {
        interface: interface.to_owned(),
        map: name,
    })?;
    M::try_from(map).map_err(|source| XdpError::Map {
        interface: interface.to_owned(),
        map: name,
        source: Box::new(source),
    })
}

/// Loads `tern_syn_cookie` and puts it in the tail-call table, from which `tern_xdp` calls it
/// for SYNs when `XdpConfig::syn_cookies` is on.
fn load_cookie_program(
    ebpf: &mut Ebpf,
    interface: &str,
) -> Result<ProgramArray<MapData>, XdpError> {
    let mut progs: ProgramArray<MapData> = take_map(ebpf, interface, PROG_MAP)?;
    let load_error = |source: ProgramError| XdpError::Load {
        interface: interface.to_owned(),
        program: SYN_COOKIE_PROGRAM,
        source: Box::new(source),
    };
    let program: &mut Xdp = ebpf
        .program_mut(SYN_COOKIE_PROGRAM)
        .ok_or_else(|| XdpError::MissingProgram {
            interface: interface.to_owned(),
            program: SYN_COOKIE_PROGRAM,
        })?
        .try_into()
        .map_err(load_error)?;
    program.load().map_err(load_error)?;
    let fd = program.fd().map_err(load_error)?;
    progs
        .set(PROG_SYN_COOKIE, fd, 0)
        .map_err(|source| XdpError::Map {
            interface: interface.to_owned(),
            map: PROG_MAP,
            source: Box::new(source),
        })?;
    Ok(progs)
}

/// Loads `program` from `ebpf` into the kernel and attaches it in `mode` (see [`attach`]).
fn attach_program(
    ebpf: &mut Ebpf,
    interface: &str,
    name: &'static str,
    mode: XdpAttach,
) -> Result<(XdpLink, AttachedMode), XdpError> {
    let load_error = |source: ProgramError| XdpError::Load {
        interface: interface.to_owned(),
        program: name,
        source: Box::new(source),
    };
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| XdpError::MissingProgram {
            interface: interface.to_owned(),
            program: name,
        })?
        .try_into()
        .map_err(load_error)?;
    program.load().map_err(load_error)?;

    let (link_id, mode) = match mode {
        XdpAttach::Native => attach_in(program, interface, AttachedMode::Native)?,
        XdpAttach::Skb => attach_in(program, interface, AttachedMode::Skb)?,
        XdpAttach::Auto => match attach_in(program, interface, AttachedMode::Native) {
            Err(XdpError::Attach { source: native, .. }) => {
                tracing::warn!(
                    interface,
                    error = %native,
                    "native XDP not available, falling back to skb (generic) mode"
                );
                attach_in(program, interface, AttachedMode::Skb).map_err(|err| match err {
                    XdpError::Attach { source, .. } => XdpError::AttachAuto {
                        interface: interface.to_owned(),
                        native,
                        source,
                    },
                    other => other,
                })?
            }
            other => other?,
        },
    };
    // Owning the link (rather than leaving it in the program's link table) makes the detach an
    // explicit step of `Drop`, with its error logged.
    let link = program
        .take_link(link_id)
        .map_err(|source| XdpError::Attach {
            interface: interface.to_owned(),
            mode,
            source: Box::new(source),
        })?;
    Ok((link, mode))
}

/// Attaches in exactly `mode`; an unknown interface gets its own error (no point falling back).
fn attach_in(
    program: &mut Xdp,
    interface: &str,
    mode: AttachedMode,
) -> Result<(XdpLinkId, AttachedMode), XdpError> {
    match program.attach(interface, mode.xdp_mode()) {
        Ok(link_id) => Ok((link_id, mode)),
        Err(ProgramError::UnknownInterface { .. }) => Err(XdpError::UnknownInterface {
            interface: interface.to_owned(),
        }),
        Err(source) => Err(XdpError::Attach {
            interface: interface.to_owned(),
            mode,
            source: Box::new(source),
        }),
    }
}

fn detach(link: Option<XdpLink>, interface: &str) {
    if let Some(link) = link {
        if let Err(err) = link.detach() {
            tracing::warn!(interface, error = %err, "detaching XDP failed");
        }
    }
}

/// The listen-map key of a listening socket address (see [`ListenKey`]).
fn listen_key(addr: SocketAddr) -> ListenKey {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    };
    ListenKey::new(ip, addr.port())
}

/// The socket address a listen-map key stands for (inverse of [`listen_key`]).
fn listen_addr(key: &ListenKey) -> SocketAddr {
    let v6 = Ipv6Addr::from(key.addr);
    let ip = match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    };
    SocketAddr::new(ip, key.port)
}

fn is_not_found(err: &MapError) -> bool {
    matches!(
        err,
        MapError::SyscallError(SyscallError { io_error, .. })
            if io_error.raw_os_error() == Some(libc::ENOENT)
    )
}

impl XdpProgram {
    /// The counters summed over all CPUs.
    pub fn counters(&self) -> Result<XdpCounters, XdpError> {
        let per_cpu = self
            .stats
            .get(&XDP_STATS_INDEX, 0)
            .map_err(|source| self.map_error(XDP_STATS_MAP, source))?;
        Ok(XdpCounters::sum(per_cpu.iter()))
    }

    /// The mode the program runs in (for `Auto`, the one that worked).
    pub fn attached_mode(&self) -> AttachedMode {
        self.mode
    }

    /// What a successor passes to [`adopt`].
    pub fn handover_ids(&self) -> &HandoverIds {
        &self.ids
    }

    /// Sets [`XdpConfig::handover`] (`tern_common::HANDOVER_*` flags; 0 ends the upgrade).
    pub fn set_handover(&self, flags: u32) -> Result<(), XdpError> {
        self.update_config(|config| config.handover = flags)
    }

    /// The interface the program is attached to.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// Sets the number of AF_XDP workers per queue (`1..=MAX_WORKERS`), which the program uses
    /// as `N` in the XSKMAP rule `queue * N + flow_hash % N`. Sockets are registered separately
    /// with [`XdpProgram::register_socket`]; until this is called, listener-bound segments pass
    /// to the kernel as `no_socket`.
    pub fn set_workers(&self, workers: u32) -> Result<(), XdpError> {
        if workers == 0 || workers > MAX_WORKERS {
            return Err(XdpError::Workers {
                interface: self.interface.clone(),
                workers,
            });
        }
        self.update_config(|config| config.workers = workers)
    }

    /// The worker count last set (0 if never).
    pub fn workers(&self) -> u32 {
        self.lock().config_value.workers
    }

    /// Turns the benchmark's reflect mode on or off: listener-bound segments are answered by
    /// the program itself (addresses and ports swapped, `XDP_TX`) instead of being redirected.
    /// On veth the peer needs an XDP program of its own to receive them ([`attach_pass`]).
    pub fn set_reflect(&self, on: bool) -> Result<(), XdpError> {
        self.update_config(|config| config.reflect = u32::from(on))
    }

    /// The key of the steering hash (`tern_common::flow_hash`): drawn at [`attach`], kept by
    /// [`adopt`]. Whoever computes a flow's worker in userspace must hash under it.
    pub fn steer_key(&self) -> [u8; 16] {
        self.lock().config_value.steer_key
    }

    /// Whether reflect mode is on.
    pub fn reflect(&self) -> bool {
        self.lock().config_value.reflect != 0
    }

    fn update_config(&self, change: impl FnOnce(&mut XdpConfig)) -> Result<(), XdpError> {
        let mut maps = self.lock();
        let mut config = maps.config_value;
        change(&mut config);
        maps.config
            .set(CONFIG_INDEX, config, 0)
            .map_err(|source| self.map_error(CONFIG_MAP, source))?;
        maps.config_value = config;
        Ok(())
    }

    /// Replaces the listen set: TCP segments to these (address, port) pairs are steered, all
    /// others pass. An unspecified address (`0.0.0.0:443`, `[::]:443`) matches every
    /// destination address of its family. New entries are added before stale ones are removed.
    pub fn set_listeners(&self, listeners: &[SocketAddr]) -> Result<(), XdpError> {
        self.set_listen_set(listeners, &[])
    }

    /// Replaces the listen set with bypass listeners `steered` (as [`Self::set_listeners`]) and
    /// kernel listeners `limited`: segments to those still go to the kernel, but the per-source
    /// limits ([`Self::set_source_limits`]) apply to them first. An address in both is steered.
    pub fn set_listen_set(
        &self,
        steered: &[SocketAddr],
        limited: &[SocketAddr],
    ) -> Result<(), XdpError> {
        let mut wanted: BTreeMap<ListenKey, u32> = limited
            .iter()
            .map(|a| (listen_key(*a), LISTEN_LIMIT))
            .collect();
        wanted.extend(steered.iter().map(|a| (listen_key(*a), LISTEN_STEER)));
        if wanted.len() > LISTEN_MAP_ENTRIES as usize {
            return Err(XdpError::TooManyListeners {
                interface: self.interface.clone(),
                count: wanted.len(),
            });
        }
        let mut maps = self.lock();
        let present = maps
            .listen
            .iter()
            .collect::<Result<BTreeMap<ListenKey, u32>, _>>()
            .map_err(|source| self.map_error(LISTEN_MAP, source))?;
        for (key, flags) in &wanted {
            if present.get(key) != Some(flags) {
                maps.listen
                    .insert(key, flags, 0)
                    .map_err(|source| self.map_error(LISTEN_MAP, source))?;
            }
        }
        for key in present.keys().filter(|k| !wanted.contains_key(k)) {
            match maps.listen.remove(key) {
                Ok(()) => {}
                Err(err) if is_not_found(&err) => {}
                Err(source) => return Err(self.map_error(LISTEN_MAP, source)),
            }
        }
        Ok(())
    }

    /// Sets the per-source limits: at most `syn.rate` SYNs per second from one source address
    /// in the long run, `syn.burst` back to back, to any listener; and `unknown` likewise for
    /// segments of flows the kernel holds no connection for, to kernel listeners. A rate of 0
    /// turns that limit off. Drops count as `rate_limited`.
    pub fn set_source_limits(&self, syn: RateLimit, unknown: RateLimit) -> Result<(), XdpError> {
        let (syn_interval, syn_burst) = syn.schedule();
        let (unknown_interval, unknown_burst) = unknown.schedule();
        self.update_config(|config| {
            config.syn_interval_ns = syn_interval;
            config.syn_burst_ns = syn_burst;
            config.unknown_interval_ns = unknown_interval;
            config.unknown_burst_ns = unknown_burst;
        })
    }

    /// Turns the program's SYN cookies on (`Some`) or off: SYNs to bypass listeners (IPv4,
    /// untagged, no IP options) are answered in the program with the SYN-ACK the workers'
    /// stack would send, made with the same cookie rule (`tern_common::syncookie`), secret and
    /// clock epoch, and counted `syn_cookies`.
    pub fn set_syn_cookies(&self, cookies: Option<&SynCookieParams>) -> Result<(), XdpError> {
        self.update_config(|config| match cookies {
            Some(p) => {
                config.cookie_secret = p.secret;
                config.cookie_epoch_ns = p.epoch_ns;
                config.cookie_mss = u32::from(p.mss);
                config.cookie_window = p.window.into();
                config.cookie_wscale = u32::from(p.wscale);
                config.syn_cookies = 1;
            }
            None => config.syn_cookies = 0,
        })
    }

    /// The bypass listen set (steered addresses), sorted (IPv4 listeners as IPv4 addresses).
    pub fn listeners(&self) -> Result<Vec<SocketAddr>, XdpError> {
        let maps = self.lock();
        let entries = maps
            .listen
            .iter()
            .collect::<Result<Vec<(ListenKey, u32)>, _>>()
            .map_err(|source| self.map_error(LISTEN_MAP, source))?;
        let mut addrs: Vec<SocketAddr> = entries
            .iter()
            .filter(|(_, flags)| flags & LISTEN_STEER != 0)
            .map(|(key, _)| listen_addr(key))
            .collect();
        addrs.sort();
        Ok(addrs)
    }

    /// Puts the bound AF_XDP socket `socket` into XSKMAP slot `index`
    /// (`tern_common::xsk_slot(queue, worker, workers)`), replacing whatever was there. The
    /// socket must already be bound (the kernel refuses unbound ones) and to the slot's queue
    /// (otherwise the program counts its frames as `no_socket`). The map holds its own
    /// reference: closing the socket removes it from the map.
    pub fn register_socket(&self, index: u32, socket: impl AsFd) -> Result<(), XdpError> {
        self.check_slot(index)?;
        let fd = socket.as_fd();
        self.lock()
            .xsks
            .set(index, fd.as_raw_fd(), 0)
            .map_err(|source| self.map_error(XSK_MAP, source))
    }

    /// Empties XSKMAP slot `index`; its flows then pass to the kernel (`no_socket`). Emptying
    /// an empty slot is not an error.
    pub fn unregister_socket(&self, index: u32) -> Result<(), XdpError> {
        self.check_slot(index)?;
        match self.lock().xsks.unset(index) {
            Ok(()) => Ok(()),
            Err(err) if is_not_found(&err) => Ok(()),
            Err(source) => Err(self.map_error(XSK_MAP, source)),
        }
    }

    fn check_slot(&self, index: u32) -> Result<(), XdpError> {
        if index >= XSK_MAP_ENTRIES {
            return Err(XdpError::Slot {
                interface: self.interface.clone(),
                index,
            });
        }
        Ok(())
    }

    /// Drops every packet whose source lies in `prefix` from now on. Blocking a prefix that is
    /// already blocked is not an error.
    pub fn block(&self, prefix: IpPrefix) -> Result<(), XdpError> {
        let mut maps = self.lock();
        let len = u32::from(prefix.prefix_len());
        match prefix.addr() {
            IpAddr::V4(a) => maps
                .block_v4
                .insert(&Key::new(len, a.octets()), BLOCK_VALUE, 0)
                .map_err(|source| self.map_error(BLOCK_V4_MAP, source)),
            IpAddr::V6(a) => maps
                .block_v6
                .insert(&Key::new(len, a.octets()), BLOCK_VALUE, 0)
                .map_err(|source| self.map_error(BLOCK_V6_MAP, source)),
        }
    }

    /// Removes `prefix` (exactly this prefix, not the ones inside or around it) from the
    /// blocklist. `Ok(false)` if it was not there.
    pub fn unblock(&self, prefix: IpPrefix) -> Result<bool, XdpError> {
        let mut maps = self.lock();
        let len = u32::from(prefix.prefix_len());
        let (result, map) = match prefix.addr() {
            IpAddr::V4(a) => (
                maps.block_v4.remove(&Key::new(len, a.octets())),
                BLOCK_V4_MAP,
            ),
            IpAddr::V6(a) => (
                maps.block_v6.remove(&Key::new(len, a.octets())),
                BLOCK_V6_MAP,
            ),
        };
        match result {
            Ok(()) => Ok(true),
            Err(err) if is_not_found(&err) => Ok(false),
            Err(source) => Err(self.map_error(map, source)),
        }
    }

    /// The blocklist, sorted (IPv4 first).
    pub fn blocks(&self) -> Result<Vec<IpPrefix>, XdpError> {
        let maps = self.lock();
        let mut prefixes = Vec::new();
        for key in maps.block_v4.keys() {
            let key = key.map_err(|source| self.map_error(BLOCK_V4_MAP, source))?;
            prefixes.push(self.stored_prefix(IpAddr::from(key.data()), key.prefix_len())?);
        }
        for key in maps.block_v6.keys() {
            let key = key.map_err(|source| self.map_error(BLOCK_V6_MAP, source))?;
            prefixes.push(self.stored_prefix(IpAddr::from(key.data()), key.prefix_len())?);
        }
        prefixes.sort();
        Ok(prefixes)
    }

    /// A prefix read back from a trie. Only [`XdpProgram::block`] writes the tries, with
    /// validated prefixes, so anything else means the map was changed behind tern's back.
    fn stored_prefix(&self, addr: IpAddr, len: u32) -> Result<IpPrefix, XdpError> {
        let map = if addr.is_ipv4() {
            BLOCK_V4_MAP
        } else {
            BLOCK_V6_MAP
        };
        IpPrefix::checked(addr, len, || format!("{addr}/{len}")).map_err(|err| XdpError::Map {
            interface: self.interface.clone(),
            map,
            source: Box::new(MapError::IoError(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("invalid entry: {err}"),
            ))),
        })
    }

    /// The writable maps. A panic while holding the lock cannot leave them inconsistent (each
    /// update is one syscall), so a poisoned lock is simply taken over.
    fn lock(&self) -> MutexGuard<'_, ControlMaps> {
        self.maps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn map_error(&self, map: &'static str, source: MapError) -> XdpError {
        XdpError::Map {
            interface: self.interface.clone(),
            map,
            source: Box::new(source),
        }
    }
}

impl Drop for XdpProgram {
    fn drop(&mut self) {
        // Closing the link's descriptor detaches the program unless a successor holds the
        // link too (binary upgrade).
        drop(self.link.take());
    }
}

/// The kernel id of a map of the kinds `tern_xdp` uses.
fn map_id(map: &aya::maps::Map) -> Option<u32> {
    use aya::maps::Map;
    let data = match map {
        Map::Array(d)
        | Map::HashMap(d)
        | Map::LpmTrie(d)
        | Map::PerCpuArray(d)
        | Map::XskMap(d) => d,
        _ => return None,
    };
    data.info().ok().map(|i| i.id())
}

/// The kernel ids of a freshly attached program's link and maps (`maps`).
fn own_ids(maps: Vec<u32>, link: &FdLink, interface: &str) -> Result<HandoverIds, XdpError> {
    let error = |what: String| XdpError::Map {
        interface: interface.to_owned(),
        map: "(ids)",
        source: Box::new(MapError::IoError(std::io::Error::other(what))),
    };
    let link = link
        .info()
        .map_err(|e| error(format!("reading the bpf link's id: {e}")))?
        .id();
    if maps.is_empty() {
        return Err(error("reading the maps' ids".to_owned()));
    }
    Ok(HandoverIds { link, maps })
}

/// `bpf(2)` command number of `BPF_LINK_GET_FD_BY_ID` (include/uapi/linux/bpf.h); aya 0.14
/// keeps its wrapper private.
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;

/// A descriptor for the bpf link with kernel id `id` (needs CAP_SYS_ADMIN, as at start-up).
fn link_fd_by_id(id: u32) -> std::io::Result<OwnedFd> {
    // `union bpf_attr` for this command: `link_id` (u32) first; the rest must be zero.
    let mut attr = [0u32; 8];
    attr[0] = id;
    // SAFETY: the attribute buffer is valid, zeroed beyond `link_id`, and outlives the call;
    // the kernel reads `size` bytes of it.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_GET_FD_BY_ID,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr) as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the call returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// What a successor needs to take over an attached `tern_xdp` ([`adopt`]): kernel ids of the
/// bpf link and of the program's maps.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HandoverIds {
    pub link: u32,
    pub maps: Vec<u32>,
}

/// Takes over the `tern_xdp` program that another tern attached to `interface`, from the ids
/// it sent over the control socket during a binary upgrade: this process holds the link from
/// now on, so the program and its maps (listen set, XSKMAP, blocklist, counters) stay in place
/// when the other one exits, and its flows keep their steering meanwhile. The program keeps
/// running the previous binary's code; the map layouts must match this binary's (each map's
/// key and value sizes are checked).
pub fn adopt(interface: &str, ids: &HandoverIds) -> Result<XdpProgram, XdpError> {
    let link = link_fd_by_id(ids.link).map_err(|e| XdpError::Map {
        interface: interface.to_owned(),
        map: "bpf link",
        source: Box::new(MapError::IoError(e)),
    })?;
    let mut found: std::collections::HashMap<String, MapData> = std::collections::HashMap::new();
    for &id in &ids.maps {
        let data = MapData::from_id(id).map_err(|source| XdpError::Map {
            interface: interface.to_owned(),
            map: "(by id)",
            source: Box::new(source),
        })?;
        let name = data
            .info()
            .ok()
            .and_then(|i| i.name_as_str().map(str::to_owned))
            .unwrap_or_default();
        found.insert(name, data);
    }
    let stats = adopted_map(&mut found, interface, XDP_STATS_MAP)?;
    let mut maps = ControlMaps {
        listen: adopted_map(&mut found, interface, LISTEN_MAP)?,
        xsks: adopted_map(&mut found, interface, XSK_MAP)?,
        config: adopted_map(&mut found, interface, CONFIG_MAP)?,
        config_value: XdpConfig::default(),
        block_v4: adopted_map(&mut found, interface, BLOCK_V4_MAP)?,
        block_v6: adopted_map(&mut found, interface, BLOCK_V6_MAP)?,
        // Holding it keeps the predecessor's cookie program in its slot once it exits.
        _progs: adopted_map(&mut found, interface, PROG_MAP).ok(),
    };
    maps.config_value = maps
        .config
        .get(&CONFIG_INDEX, 0)
        .map_err(|source| XdpError::Map {
            interface: interface.to_owned(),
            map: CONFIG_MAP,
            source: Box::new(source),
        })?;
    Ok(XdpProgram {
        link: Some(HeldLink::Adopted(link)),
        stats,
        maps: Mutex::new(maps),
        _ebpf: None,
        interface: interface.to_owned(),
        // Whatever the previous tern attached with; shown in stats only.
        mode: AttachedMode::Native,
        ids: ids.clone(),
    })
}

/// Map `name` among the maps found by id, as a typed map (key and value sizes checked).
fn adopted_map<M>(
    found: &mut std::collections::HashMap<String, MapData>,
    interface: &str,
    name: &'static str,
) -> Result<M, XdpError>
where
    M: TryFrom<Map, Error = MapError>,
{
    let data = found.remove(name).ok_or_else(|| XdpError::MissingMap {
        interface: interface.to_owned(),
        map: name,
    })?;
    Map::from_map_data(data)
        .and_then(M::try_from)
        .map_err(|source| XdpError::Map {
            interface: interface.to_owned(),
            map: name,
            source: Box::new(source),
        })
}

#[cfg(test)]
pub(crate) mod tests;

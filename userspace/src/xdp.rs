//! Loading tern's XDP program, attaching it to an interface, and reading its counters.
//!
//! The eBPF object is built from `xdp-ebpf/` by `build.rs` and embedded in the binary, so a
//! `tern` binary always carries the program that matches it. [`attach`] loads a fresh copy of
//! the object (its own maps) and attaches `tern_xdp` to one interface; the returned
//! [`XdpProgram`] keeps the program, its maps and its link, and detaches on drop.
//!
//! This module owns the userspace side of the XDP program's life cycle. The per-packet logic is
//! `xdp-ebpf`'s; the map layout and names are `tern_common`'s. AF_XDP sockets (the bypass data
//! path) are not handled here.
//!
//! Memory accounting: on Linux >= 5.11 BPF maps are charged to the memory cgroup, not to
//! RLIMIT_MEMLOCK, so no rlimit is raised here (checked on 6.18 with `ulimit -l 0`; aya itself
//! raises the limit on older kernels when map creation fails with EPERM).

use std::fmt;

use aya::maps::{MapData, PerCpuArray};
use aya::programs::links::Link as _;
use aya::programs::xdp::{XdpLink, XdpLinkId};
use aya::programs::{ProgramError, Xdp, XdpMode};
use aya::Ebpf;
use tern_common::{XdpStats, XDP_PROGRAM, XDP_STATS_INDEX, XDP_STATS_MAP};

use crate::config::XdpAttach;

/// The XDP object built by `build.rs` from `xdp-ebpf/` (ELF, 8-byte aligned as aya requires).
static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tern-xdp"));

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

/// Why loading, attaching or reading the XDP program failed. Every variant names the interface.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("XDP on {interface}: cannot load the embedded eBPF object: {source}")]
    Object {
        interface: String,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("XDP on {interface}: the embedded object has no XDP program `{XDP_PROGRAM}`")]
    MissingProgram { interface: String },
    #[error("XDP on {interface}: the kernel refused program `{XDP_PROGRAM}`: {source}")]
    Load {
        interface: String,
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
    #[error("XDP on {interface}: the embedded object has no map `{XDP_STATS_MAP}`")]
    MissingMap { interface: String },
    #[error("XDP on {interface}: cannot read map `{XDP_STATS_MAP}`: {source}")]
    Counters {
        interface: String,
        #[source]
        source: Box<aya::maps::MapError>,
    },
}

/// The XDP program's counters, summed over all CPUs. Field meanings and the counting rule are
/// those of [`tern_common::XdpStats`].
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
        }
    }
}

/// `tern_xdp` attached to one interface. Dropping it detaches the program and frees its maps.
pub struct XdpProgram {
    /// The attachment. Declared before `ebpf` so it is detached before the program and maps
    /// are released; `None` only while dropping.
    link: Option<XdpLink>,
    /// Owns the loaded program and its maps (the counters).
    ebpf: Ebpf,
    interface: String,
    mode: AttachedMode,
}

impl fmt::Debug for XdpProgram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XdpProgram")
            .field("interface", &self.interface)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// Loads the embedded program and attaches it to `interface` (a name in the calling thread's
/// network namespace).
///
/// `Auto` tries native mode first and falls back to SKB mode with one warning; `Native` and
/// `Skb` use exactly that mode or fail. Fails if another XDP program is already attached.
pub fn attach(interface: &str, mode: XdpAttach) -> Result<XdpProgram, XdpError> {
    let mut ebpf = Ebpf::load(XDP_OBJECT).map_err(|source| XdpError::Object {
        interface: interface.to_owned(),
        source: Box::new(source),
    })?;
    let load_error = |source: ProgramError| XdpError::Load {
        interface: interface.to_owned(),
        source: Box::new(source),
    };
    let program: &mut Xdp = ebpf
        .program_mut(XDP_PROGRAM)
        .ok_or_else(|| XdpError::MissingProgram {
            interface: interface.to_owned(),
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
    Ok(XdpProgram {
        link: Some(link),
        ebpf,
        interface: interface.to_owned(),
        mode,
    })
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

impl XdpProgram {
    /// The counters summed over all CPUs.
    pub fn counters(&self) -> Result<XdpCounters, XdpError> {
        let map = self
            .ebpf
            .map(XDP_STATS_MAP)
            .ok_or_else(|| XdpError::MissingMap {
                interface: self.interface.clone(),
            })?;
        let counters_error = |source| XdpError::Counters {
            interface: self.interface.clone(),
            source: Box::new(source),
        };
        let array: PerCpuArray<&MapData, XdpStats> =
            PerCpuArray::try_from(map).map_err(counters_error)?;
        let per_cpu = array.get(&XDP_STATS_INDEX, 0).map_err(counters_error)?;
        Ok(XdpCounters::sum(per_cpu.iter()))
    }

    /// The mode the program runs in (for `Auto`, the one that worked).
    pub fn attached_mode(&self) -> AttachedMode {
        self.mode
    }

    /// The interface the program is attached to.
    pub fn interface(&self) -> &str {
        &self.interface
    }
}

impl Drop for XdpProgram {
    fn drop(&mut self) {
        if let Some(link) = self.link.take() {
            if let Err(err) = link.detach() {
                tracing::warn!(interface = %self.interface, error = %err, "detaching XDP failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The object is loaded into a real kernel: attach to a veth end inside a throw-away network
    //! namespace, inject hand-made frames from the peer end with an AF_PACKET socket (so every
    //! counter's expected delta is exact), then real traffic through the kernel's TCP stack.
    //! Needs root (CAP_NET_ADMIN, CAP_BPF), as tern does in xdp mode.

    use std::ffi::CString;
    use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
    use std::process::Command;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant};

    use super::*;

    const SERVER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

    /// Unique per test process and call; with the prefix it stays within IFNAMSIZ (15 bytes).
    fn unique(prefix: &str) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}{}x{n}", std::process::id());
        assert!(name.len() <= 15, "name {name} longer than IFNAMSIZ-1");
        name
    }

    #[track_caller]
    fn run(program: &str, args: &[&str]) -> String {
        let output = Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|err| panic!("cannot run {program} {args:?}: {err}"));
        assert!(
            output.status.success(),
            "{program} {args:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// A network namespace that is deleted (with its interfaces) on drop, also on panic.
    struct Netns {
        name: String,
    }

    impl Netns {
        fn new() -> Netns {
            let name = unique("txdp");
            run("ip", &["netns", "add", &name]);
            let ns = Netns { name };
            // No IPv6 autoconfiguration noise (router/neighbour solicitations) in the counters.
            ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
            ns.exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
            ns
        }

        #[track_caller]
        fn exec(&self, args: &[&str]) -> String {
            let mut full = vec!["netns", "exec", &self.name];
            full.extend_from_slice(args);
            run("ip", &full)
        }

        #[track_caller]
        fn ip(&self, args: &[&str]) -> String {
            let mut full = vec!["-n", &self.name];
            full.extend_from_slice(args);
            run("ip", &full)
        }

        /// Runs `f` on a new thread that has joined this namespace, so the test harness's own
        /// threads never change namespace.
        fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
            std::thread::scope(|scope| {
                scope
                    .spawn(|| {
                        self.enter_current_thread();
                        f()
                    })
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
        }

        fn enter_current_thread(&self) {
            let path = format!("/run/netns/{}", self.name);
            let file = std::fs::File::open(&path)
                .unwrap_or_else(|err| panic!("cannot open {path}: {err}"));
            // SAFETY: `file` is an open namespace file for the duration of the call; setns only
            // changes this thread's network namespace.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }

    /// Two namespaces joined by a veth pair: the program goes on `server_if`, frames are sent
    /// from `client_if`. Separate namespaces, so traffic between the addresses crosses the veth
    /// instead of being routed locally over `lo`.
    struct Pair {
        server: Netns,
        client: Netns,
        server_if: String,
        client_if: String,
    }

    impl Pair {
        fn new() -> Pair {
            assert_eq!(
                // SAFETY: geteuid has no preconditions.
                unsafe { libc::geteuid() },
                0,
                "this test loads an XDP program and needs root"
            );
            let server = Netns::new();
            let client = Netns::new();
            let server_if = unique("xs");
            let client_if = unique("xc");
            run(
                "ip",
                &[
                    "link",
                    "add",
                    &server_if,
                    "netns",
                    &server.name,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &client_if,
                    "netns",
                    &client.name,
                ],
            );
            server.ip(&["link", "set", &server_if, "up"]);
            client.ip(&["link", "set", &client_if, "up"]);
            Pair {
                server,
                client,
                server_if,
                client_if,
            }
        }

        fn attach(&self, mode: XdpAttach) -> Result<XdpProgram, XdpError> {
            self.server.run_in(|| attach(&self.server_if, mode))
        }

        /// `ip -d link show` of the server end; lists `prog/xdp` while a program is attached.
        fn server_link(&self) -> String {
            self.server
                .ip(&["-d", "link", "show", "dev", &self.server_if])
        }

        /// Sends each frame as-is out of the client end (AF_PACKET, SOCK_RAW).
        fn inject(&self, frames: &[Vec<u8>]) {
            self.client.run_in(|| {
                let name = CString::new(self.client_if.as_str()).expect("interface name");
                // SAFETY: `name` is a valid NUL-terminated string.
                let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
                assert_ne!(ifindex, 0, "no interface {}", self.client_if);
                // Protocol 0: this socket only sends, it receives nothing.
                // SAFETY: plain socket(2) call; the fd is closed below.
                let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
                assert!(
                    fd >= 0,
                    "socket(AF_PACKET): {}",
                    std::io::Error::last_os_error()
                );
                // SAFETY: all-zero is a valid sockaddr_ll.
                let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                addr.sll_family = libc::AF_PACKET as u16;
                addr.sll_ifindex = ifindex as i32;
                addr.sll_halen = 6;
                for frame in frames {
                    // SAFETY: `frame` and `addr` are valid for the lengths passed.
                    let sent = unsafe {
                        libc::sendto(
                            fd,
                            frame.as_ptr().cast(),
                            frame.len(),
                            0,
                            std::ptr::addr_of!(addr).cast(),
                            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                        )
                    };
                    assert_eq!(
                        sent,
                        frame.len() as isize,
                        "sendto of a {}-byte frame: {}",
                        frame.len(),
                        std::io::Error::last_os_error()
                    );
                }
                // SAFETY: `fd` is ours and not used afterwards.
                unsafe { libc::close(fd) };
            });
        }
    }

    /// Polls until `done` holds (frames cross the veth in softirq context, not inside sendto).
    #[track_caller]
    fn wait_for(program: &XdpProgram, done: impl Fn(&XdpCounters) -> bool) -> XdpCounters {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let counters = program.counters().expect("reading counters");
            if done(&counters) || Instant::now() > deadline {
                return counters;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    // Frame building: Ethernet II with a broadcast destination (the XDP program does not look at
    // addresses), then the given EtherType and payload.
    fn ethernet(ether_type: u16, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0xff; 6];
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        frame.extend_from_slice(&ether_type.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    fn vlan(tpid: u16, inner_type: u16, payload: &[u8]) -> Vec<u8> {
        let mut tagged = vec![0x00, 0x07]; // PCP 0, VID 7
        tagged.extend_from_slice(&inner_type.to_be_bytes());
        tagged.extend_from_slice(payload);
        ethernet(tpid, &tagged)
    }

    /// IPv4 header with `options_words` 32-bit words of NOP options, then `payload`.
    /// Checksums are left zero: the program does not verify them and the kernel drops the
    /// packets after the program has run.
    fn ipv4(protocol: u8, flags_fragment: u16, options_words: u8, payload: &[u8]) -> Vec<u8> {
        let ihl = 5 + options_words;
        let total = usize::from(ihl) * 4 + payload.len();
        let mut packet = vec![0x40 | ihl, 0];
        packet.extend_from_slice(&(total as u16).to_be_bytes());
        packet.extend_from_slice(&[0, 1]);
        packet.extend_from_slice(&flags_fragment.to_be_bytes());
        packet.extend_from_slice(&[64, protocol, 0, 0]);
        packet.extend_from_slice(&CLIENT_IP.octets());
        packet.extend_from_slice(&[203, 0, 113, 1]);
        packet.extend(std::iter::repeat_n(1u8, usize::from(options_words) * 4));
        packet.extend_from_slice(payload);
        packet
    }

    fn ipv6(next_header: u8, payload: &[u8]) -> Vec<u8> {
        let mut packet = vec![0x60, 0, 0, 0];
        packet.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        packet.extend_from_slice(&[next_header, 64]);
        packet.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        packet.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        packet.extend_from_slice(payload);
        packet
    }

    /// A SYN to port 443 with no options (data offset 5).
    fn tcp_syn() -> Vec<u8> {
        let mut segment = vec![0xc0, 0x01, 0x01, 0xbb, 0, 0, 0, 1, 0, 0, 0, 0];
        segment.extend_from_slice(&[5 << 4, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
        segment
    }

    const TCP: u8 = 6;
    const UDP: u8 = 17;
    const MF: u16 = 0x2000;

    /// Hand-made frames, one per parser path, and the exact counters they must produce.
    fn frame_set() -> (Vec<Vec<u8>>, XdpCounters) {
        let udp = [0u8; 8];
        let mut bad_version = ipv4(TCP, 0, 0, &tcp_syn());
        bad_version[0] = 0x65;
        let mut ihl_past_end = ipv4(TCP, 0, 0, &[]);
        ihl_past_end[0] = 0x4f; // 60-byte header announced, 20 bytes present
        let frames = vec![
            ethernet(0x0800, &ipv4(TCP, 0, 0, &tcp_syn())), // ipv4 tcp
            ethernet(0x0800, &ipv4(TCP, 0, 2, &tcp_syn())), // ipv4 (options) tcp
            vlan(0x8100, 0x0800, &ipv4(TCP, 0, 0, &tcp_syn())), // vlan ipv4 tcp
            ethernet(0x86dd, &ipv6(TCP, &tcp_syn())),       // ipv6 tcp
            ethernet(0x0800, &ipv4(UDP, 0, 0, &udp)),       // ipv4
            ethernet(0x0800, &ipv4(TCP, MF, 0, &tcp_syn())), // ipv4 fragment (first)
            ethernet(0x0800, &ipv4(TCP, 100, 0, &udp)),     // ipv4 fragment (later)
            ethernet(0x0806, &[0; 28]),                     // other (ARP)
            vlan(0x88a8, 0x8100, &[0; 30]),                 // vlan, other (second tag)
            ethernet(0x0800, &[0x45; 10]),                  // malformed: IPv4 cut short
            ethernet(0x0800, &ihl_past_end),                // malformed: options past the end
            ethernet(0x0800, &ipv4(TCP, 0, 0, &tcp_syn()[..10])), // ipv4, malformed TCP
            ethernet(0x8100, &[]),                          // malformed: VLAN tag missing
            ethernet(0x0800, &bad_version),                 // malformed: version 6 in IPv4
        ];
        let expected = XdpCounters {
            packets: 14,
            ipv4: 7,
            ipv6: 1,
            tcp: 4,
            vlan: 2,
            other: 2,
            malformed: 5,
            ipv4_fragments: 2,
        };
        (frames, expected)
    }

    #[test]
    fn counts_each_frame_kind_then_detaches() {
        let pair = Pair::new();
        let program = pair
            .attach(XdpAttach::Auto)
            .unwrap_or_else(|err| panic!("attach: {err}"));
        assert_eq!(
            program.attached_mode(),
            AttachedMode::Native,
            "veth supports native XDP, Auto must not fall back"
        );
        let link = pair.server_link();
        assert!(
            link.contains("prog/xdp"),
            "no XDP program listed after attach:\n{link}"
        );
        assert!(
            !link.contains("xdpgeneric"),
            "native attach listed as generic:\n{link}"
        );
        assert_eq!(
            program.counters().expect("counters"),
            XdpCounters::default(),
            "a fresh program must start at zero (no addresses yet, IPv6 off: no traffic)"
        );

        let (frames, expected) = frame_set();
        pair.inject(&frames);
        let counters = wait_for(&program, |c| c.packets >= expected.packets);
        assert_eq!(counters, expected, "counters after the hand-made frames");

        // Real traffic: a TCP connect from the client namespace to a closed port. The SYN
        // crosses the veth (after ARP), the server kernel answers with RST.
        pair.server.ip(&[
            "addr",
            "add",
            &format!("{SERVER_IP}/30"),
            "dev",
            &pair.server_if,
        ]);
        pair.client.ip(&[
            "addr",
            "add",
            &format!("{CLIENT_IP}/30"),
            "dev",
            &pair.client_if,
        ]);
        let connect = pair.client.run_in(|| {
            TcpStream::connect_timeout(
                &SocketAddrV4::new(SERVER_IP, 9).into(),
                Duration::from_secs(5),
            )
        });
        assert_eq!(
            connect.as_ref().map_err(std::io::Error::kind).err(),
            Some(std::io::ErrorKind::ConnectionRefused),
            "connect to a closed port across the veth: {connect:?}"
        );
        let after = wait_for(&program, |c| c.tcp > expected.tcp);
        assert!(
            after.tcp > expected.tcp,
            "the SYN was not counted as TCP: {after:?}"
        );
        assert!(
            after.ipv4 > expected.ipv4,
            "the SYN was not counted as IPv4: {after:?}"
        );
        assert!(
            after.other > expected.other,
            "the ARP request was not counted: {after:?}"
        );
        assert!(
            after.packets > expected.packets,
            "no packets counted: {after:?}"
        );

        drop(program);
        let link = pair.server_link();
        assert!(
            !link.contains("prog/xdp"),
            "XDP program still attached after drop:\n{link}"
        );
    }

    #[test]
    fn skb_mode_is_strict_and_detaches() {
        let pair = Pair::new();
        let program = pair
            .attach(XdpAttach::Skb)
            .unwrap_or_else(|err| panic!("attach in skb mode: {err}"));
        assert_eq!(program.attached_mode(), AttachedMode::Skb);
        assert_eq!(program.attached_mode().to_string(), "skb");
        let link = pair.server_link();
        assert!(
            link.contains("xdpgeneric"),
            "skb attach not listed as generic:\n{link}"
        );

        pair.inject(&[ethernet(0x0800, &ipv4(TCP, 0, 0, &tcp_syn()))]);
        let counters = wait_for(&program, |c| c.packets >= 1);
        assert_eq!(
            (counters.packets, counters.ipv4, counters.tcp),
            (1, 1, 1),
            "one IPv4 SYN in skb mode: {counters:?}"
        );

        drop(program);
        let link = pair.server_link();
        assert!(
            !link.contains("prog/xdp"),
            "XDP program still attached after drop:\n{link}"
        );
    }

    #[test]
    fn auto_falls_back_to_skb_where_native_is_missing() {
        // Loopback has no driver XDP support: Native fails, Auto falls back to skb. A fresh
        // namespace has its own `lo`, so nothing outside the test is touched.
        let ns = Netns::new();
        let native = ns.run_in(|| attach("lo", XdpAttach::Native));
        match &native {
            Err(
                err @ XdpError::Attach {
                    interface,
                    mode: AttachedMode::Native,
                    ..
                },
            ) => {
                assert_eq!(interface, "lo");
                let message = err.to_string();
                assert!(
                    message.contains("on lo:"),
                    "error does not name the interface: {message}"
                );
            }
            other => panic!("native attach to lo must fail with Attach: {other:?}"),
        }

        let auto = ns
            .run_in(|| attach("lo", XdpAttach::Auto))
            .unwrap_or_else(|err| panic!("auto attach to lo: {err}"));
        assert_eq!(
            auto.attached_mode(),
            AttachedMode::Skb,
            "Auto must fall back to skb"
        );
        let link = ns.ip(&["-d", "link", "show", "dev", "lo"]);
        assert!(
            link.contains("xdpgeneric"),
            "fallback not listed as generic:\n{link}"
        );
        drop(auto);
        let link = ns.ip(&["-d", "link", "show", "dev", "lo"]);
        assert!(
            !link.contains("prog/xdp"),
            "XDP program still attached after drop:\n{link}"
        );
    }

    #[test]
    fn unknown_interface_is_named() {
        let ns = Netns::new();
        let missing = unique("xm");
        let err = ns
            .run_in(|| attach(&missing, XdpAttach::Auto))
            .expect_err("attaching to a missing interface must fail");
        assert!(
            matches!(&err, XdpError::UnknownInterface { interface } if *interface == missing),
            "unexpected error: {err:?}"
        );
        assert!(
            err.to_string().contains(&missing),
            "error does not name it: {err}"
        );
    }

    #[test]
    fn counters_sum_over_cpus_and_serialize() {
        let cpu = XdpStats {
            packets: 3,
            ipv4: 2,
            ipv6: 1,
            tcp: 1,
            vlan: 1,
            other: 0,
            malformed: 0,
            ipv4_fragments: 1,
        };
        let total = XdpCounters::sum([cpu, cpu, XdpStats::default()].iter());
        assert_eq!(
            total,
            XdpCounters {
                packets: 6,
                ipv4: 4,
                ipv6: 2,
                tcp: 2,
                vlan: 2,
                other: 0,
                malformed: 0,
                ipv4_fragments: 2,
            }
        );
        let json = serde_json::to_value(total).expect("serialize");
        assert_eq!(
            json["ipv4_fragments"], 2,
            "field names are the JSON keys: {json}"
        );
    }
}

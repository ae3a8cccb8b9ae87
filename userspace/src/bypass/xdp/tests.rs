//! Tests of [`crate::bypass::xdp`]. The object is loaded into a real kernel: attached to a veth end
//! inside throw-away network namespaces, fed hand-made frames from the peer end with an
//! AF_PACKET socket (so every counter's expected delta is exact), then real traffic through the
//! kernel's TCP stack, real AF_XDP sockets and XDP_TX reflection. Everything that attaches needs
//! root (CAP_NET_ADMIN, CAP_BPF), as tern does; the prefix and counter tests do not.
//!
//! Each test makes its own uniquely named namespaces and interfaces and removes them on drop
//! (also on panic), so tests run in parallel and leave nothing behind. `Netns` is shared with
//! the control socket's tests.

use std::ffi::CString;
use std::net::{SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tern_common::{flow_hash, flow_worker, xsk_slot};

use super::*;
pub(crate) use crate::testnet::{run, unique, Netns};

mod af_xdp;

const SERVER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// A second client address on the same interface: "another source" for the blocklist.
const CLIENT_IP2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
/// Destination of hand-made frames (nobody owns it; the program does not care).
const TARGET_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const TARGET_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
const SOURCE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

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

    /// Gives the server end SERVER_IP and the client end CLIENT_IP (primary) and CLIENT_IP2.
    fn with_addresses(self) -> Pair {
        self.server.ip(&[
            "addr",
            "add",
            &format!("{SERVER_IP}/29"),
            "dev",
            &self.server_if,
        ]);
        for ip in [CLIENT_IP, CLIENT_IP2] {
            self.client
                .ip(&["addr", "add", &format!("{ip}/29"), "dev", &self.client_if]);
        }
        self
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
            let socket = PacketSocket::open(&self.client_if, false);
            for frame in frames {
                socket.send(frame);
            }
        });
    }

    /// Sends `frames` out of the client end and returns the frames that come back in on it
    /// (not its own outgoing ones) for which `keep` holds, once `expect` of them arrived or
    /// after `wait`.
    fn send_and_capture(
        &self,
        frames: &[Vec<u8>],
        expect: usize,
        wait: Duration,
        keep: impl Fn(&[u8]) -> bool + Send + Sync,
    ) -> Vec<Vec<u8>> {
        self.client.run_in(|| {
            // Opened before sending, so no reply can arrive before we listen.
            let socket = PacketSocket::open(&self.client_if, true);
            for frame in frames {
                socket.send(frame);
            }
            let deadline = Instant::now() + wait;
            let mut captured = Vec::new();
            while captured.len() < expect && Instant::now() < deadline {
                if let Some(frame) = socket.recv_incoming() {
                    if keep(&frame) {
                        captured.push(frame);
                    }
                }
            }
            captured
        })
    }
}

/// An AF_PACKET socket on one interface of the calling thread's namespace.
struct PacketSocket {
    fd: OwnedFd,
    addr: libc::sockaddr_ll,
}

/// `sll_pkttype` of a frame this host sent (linux/if_packet.h).
const PACKET_OUTGOING: u8 = 4;

impl PacketSocket {
    /// `receive`: bound to the interface for every protocol, with a short receive timeout;
    /// otherwise protocol 0, which receives nothing and only sends.
    fn open(interface: &str, receive: bool) -> PacketSocket {
        let name = CString::new(interface).expect("interface name");
        // SAFETY: `name` is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0, "no interface {interface}");
        let protocol = if receive {
            (libc::ETH_P_ALL as u16).to_be()
        } else {
            0
        };
        // SAFETY: plain socket(2) call; the result is checked and owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol)) };
        assert!(
            fd >= 0,
            "socket(AF_PACKET): {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` is a fresh socket nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        if receive {
            // SAFETY: `addr` is a valid sockaddr_ll of the size passed.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    std::ptr::addr_of!(addr).cast(),
                    size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            assert_eq!(
                rc,
                0,
                "bind(AF_PACKET): {}",
                std::io::Error::last_os_error()
            );
            set_timeout(
                fd.as_raw_fd(),
                libc::SO_RCVTIMEO,
                Duration::from_millis(100),
            );
        }
        PacketSocket { fd, addr }
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: `frame` and `addr` are valid for the lengths passed.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::addr_of!(self.addr).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
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

    /// The next frame received from the wire, `None` after the receive timeout. Frames this
    /// host sent (seen by ETH_P_ALL sockets too) are skipped.
    fn recv_incoming(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 4096];
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut from_len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buf` and `from` are valid for the lengths passed.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                std::ptr::addr_of_mut!(from).cast(),
                &mut from_len,
            )
        };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            assert!(
                matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ),
                "recvfrom(AF_PACKET): {err}"
            );
            return None;
        }
        if from.sll_pkttype == PACKET_OUTGOING {
            return None;
        }
        buf.truncate(n as usize);
        Some(buf)
    }
}

fn set_timeout(fd: RawFd, option: libc::c_int, timeout: Duration) {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: valid fd and a timeval of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            std::ptr::addr_of!(tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt: {}", std::io::Error::last_os_error());
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

/// Waits until `steered + passed + no_socket + blocked == packets` and asserts it.
#[track_caller]
fn assert_terminal_invariant(program: &XdpProgram) -> XdpCounters {
    let counters = wait_for(program, |c| c.terminal() == c.packets);
    assert_eq!(
        counters.terminal(),
        counters.packets,
        "steered + passed + no_socket + blocked must equal packets: {counters:?}"
    );
    counters
}

// ---------------------------------------------------------------------------------------------
// Frame building. Checksums are correct, so reflected frames can be checked for them.

const TCP: u8 = 6;
const UDP: u8 = 17;
const MF: u16 = 0x2000;

fn ethernet(ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = SERVER_MAC.to_vec();
    frame.extend_from_slice(&CLIENT_MAC);
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

/// The folded ones' complement sum of `data` (RFC 1071), not inverted. A block that includes
/// its correct checksum sums to 0xffff.
fn ones_complement_sum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// IPv4 header with `options_words` 32-bit words of NOP options, then `payload`.
fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    flags_fragment: u16,
    options_words: u8,
    payload: &[u8],
) -> Vec<u8> {
    let ihl = 5 + options_words;
    let total = usize::from(ihl) * 4 + payload.len();
    let mut packet = vec![0x40 | ihl, 0];
    packet.extend_from_slice(&(total as u16).to_be_bytes());
    packet.extend_from_slice(&[0, 1]);
    packet.extend_from_slice(&flags_fragment.to_be_bytes());
    packet.extend_from_slice(&[64, protocol, 0, 0]);
    packet.extend_from_slice(&src.octets());
    packet.extend_from_slice(&dst.octets());
    packet.extend(std::iter::repeat_n(1u8, usize::from(options_words) * 4));
    let checksum = !ones_complement_sum(&packet);
    packet[10..12].copy_from_slice(&checksum.to_be_bytes());
    packet.extend_from_slice(payload);
    packet
}

fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, payload: &[u8]) -> Vec<u8> {
    let mut packet = vec![0x60, 0, 0, 0];
    packet.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    packet.extend_from_slice(&[next_header, 64]);
    packet.extend_from_slice(&src.octets());
    packet.extend_from_slice(&dst.octets());
    packet.extend_from_slice(payload);
    packet
}

/// The TCP pseudo-header of RFC 9293 §3.1 (IPv4) or RFC 8200 §8.1 (IPv6).
fn pseudo_header(src: IpAddr, dst: IpAddr, length: usize) -> Vec<u8> {
    let mut pseudo = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, TCP]);
            pseudo.extend_from_slice(&(length as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&(length as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, TCP]);
        }
        _ => panic!("mixed address families {src} {dst}"),
    }
    pseudo
}

/// A SYN with no options (data offset 5) and a correct checksum.
fn tcp_syn(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
    tcp_segment(src, dst, sport, dport, 0x02)
}

/// An Ethernet frame carrying an IPv4 bare ACK from `src:sport` to `dst:dport`.
fn ack4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let segment = tcp_segment(src.into(), dst.into(), sport, dport, 0x10);
    ethernet(0x0800, &ipv4(src, dst, TCP, 0, 0, &segment))
}

/// A segment with flags byte `flags`, no options and a correct checksum.
fn tcp_segment(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut segment = sport.to_be_bytes().to_vec();
    segment.extend_from_slice(&dport.to_be_bytes());
    segment.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]);
    segment.extend_from_slice(&[5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    let mut summed = pseudo_header(src, dst, segment.len());
    summed.extend_from_slice(&segment);
    let checksum = !ones_complement_sum(&summed);
    segment[16..18].copy_from_slice(&checksum.to_be_bytes());
    segment
}

/// An Ethernet frame carrying an IPv4 SYN from `src:sport` to `dst:dport`.
fn syn4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let segment = tcp_syn(src.into(), dst.into(), sport, dport);
    ethernet(0x0800, &ipv4(src, dst, TCP, 0, 0, &segment))
}

/// An Ethernet frame carrying an IPv6 SYN from `src:sport` to `dst:dport`.
fn syn6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16) -> Vec<u8> {
    let segment = tcp_syn(src.into(), dst.into(), sport, dport);
    ethernet(0x86dd, &ipv6(src, dst, TCP, &segment))
}

/// A parsed untagged Ethernet + IPv4/IPv6 + TCP frame, with its checksums verified.
#[derive(Debug, PartialEq, Eq)]
struct Tcp4Tuple {
    eth_dst: [u8; 6],
    eth_src: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
}

/// Parses `frame`; panics if it is not TCP over IPv4/IPv6 or a checksum is wrong.
#[track_caller]
fn parse_tcp_frame(frame: &[u8]) -> Tcp4Tuple {
    let eth_dst: [u8; 6] = frame[0..6].try_into().expect("6 bytes");
    let eth_src: [u8; 6] = frame[6..12].try_into().expect("6 bytes");
    let (src, dst, segment) = match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => {
            let ip = &frame[14..];
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            assert_eq!(
                ones_complement_sum(&ip[..ihl]),
                0xffff,
                "IPv4 header checksum wrong in {frame:02x?}"
            );
            assert_eq!(ip[9], TCP, "not TCP: {frame:02x?}");
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let src = IpAddr::from(<[u8; 4]>::try_from(&ip[12..16]).expect("4 bytes"));
            let dst = IpAddr::from(<[u8; 4]>::try_from(&ip[16..20]).expect("4 bytes"));
            (src, dst, &ip[ihl..total])
        }
        0x86dd => {
            let ip = &frame[14..];
            assert_eq!(ip[6], TCP, "not TCP: {frame:02x?}");
            let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let src = IpAddr::from(<[u8; 16]>::try_from(&ip[8..24]).expect("16 bytes"));
            let dst = IpAddr::from(<[u8; 16]>::try_from(&ip[24..40]).expect("16 bytes"));
            (src, dst, &ip[40..40 + payload])
        }
        other => panic!("EtherType {other:#06x} in {frame:02x?}"),
    };
    let mut summed = pseudo_header(src, dst, segment.len());
    summed.extend_from_slice(segment);
    assert_eq!(
        ones_complement_sum(&summed),
        0xffff,
        "TCP checksum wrong in {frame:02x?}"
    );
    Tcp4Tuple {
        eth_dst,
        eth_src,
        src,
        dst,
        sport: u16::from_be_bytes([segment[0], segment[1]]),
        dport: u16::from_be_bytes([segment[2], segment[3]]),
    }
}

/// Hand-made frames, one per parser path, and the exact counters they must produce with an
/// empty listen set and blocklist.
fn frame_set() -> (Vec<Vec<u8>>, XdpCounters) {
    let (src, dst) = (CLIENT_IP, TARGET_IP);
    let syn = tcp_syn(src.into(), dst.into(), 49152, 443);
    let udp = [0u8; 8];
    let mut bad_version = ipv4(src, dst, TCP, 0, 0, &syn);
    bad_version[0] = 0x65;
    let mut ihl_past_end = ipv4(src, dst, TCP, 0, 0, &[]);
    ihl_past_end[0] = 0x4f; // 60-byte header announced, 20 bytes present
    let frames = vec![
        ethernet(0x0800, &ipv4(src, dst, TCP, 0, 0, &syn)), // ipv4 tcp
        ethernet(0x0800, &ipv4(src, dst, TCP, 0, 2, &syn)), // ipv4 (options) tcp
        vlan(0x8100, 0x0800, &ipv4(src, dst, TCP, 0, 0, &syn)), // vlan ipv4 tcp
        syn6(SOURCE_IP6, TARGET_IP6, 49152, 443),           // ipv6 tcp
        ethernet(0x0800, &ipv4(src, dst, UDP, 0, 0, &udp)), // ipv4
        ethernet(0x0800, &ipv4(src, dst, TCP, MF, 0, &syn)), // ipv4 fragment (first)
        ethernet(0x0800, &ipv4(src, dst, TCP, 100, 0, &udp)), // ipv4 fragment (later)
        ethernet(0x0806, &[0; 28]),                         // other (ARP)
        vlan(0x88a8, 0x8100, &[0; 30]),                     // vlan, other (second tag)
        ethernet(0x0800, &[0x45; 10]),                      // malformed: IPv4 cut short
        ethernet(0x0800, &ihl_past_end),                    // malformed: options past the end
        ethernet(0x0800, &ipv4(src, dst, TCP, 0, 0, &syn[..10])), // ipv4, malformed TCP
        ethernet(0x8100, &[]),                              // malformed: VLAN tag missing
        ethernet(0x0800, &bad_version),                     // malformed: version 6 in IPv4
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
        // No listeners: everything, malformed frames included, is passed.
        passed: 14,
        ..XdpCounters::default()
    };
    (frames, expected)
}

// ---------------------------------------------------------------------------------------------
// Attaching and counting

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
    let pair = pair.with_addresses();
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
    assert_terminal_invariant(&program);

    drop(program);
    let link = detached_within(|| pair.server_link());
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

    pair.inject(&[syn4(CLIENT_IP, TARGET_IP, 49152, 443)]);
    let counters = wait_for(&program, |c| c.packets >= 1);
    assert_eq!(
        (
            counters.packets,
            counters.ipv4,
            counters.tcp,
            counters.passed
        ),
        (1, 1, 1, 1),
        "one IPv4 SYN in skb mode: {counters:?}"
    );

    drop(program);
    let link = detached_within(|| pair.server_link());
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
    let link = detached_within(|| ns.ip(&["-d", "link", "show", "dev", "lo"]));
    assert!(
        link.contains("xdpgeneric"),
        "fallback not listed as generic:\n{link}"
    );
    drop(auto);
    let link = detached_within(|| ns.ip(&["-d", "link", "show", "dev", "lo"]));
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
        packets: 4,
        ipv4: 2,
        ipv6: 1,
        tcp: 1,
        vlan: 1,
        other: 0,
        malformed: 0,
        ipv4_fragments: 1,
        steered: 1,
        passed: 1,
        no_socket: 0,
        blocked: 1,
        rate_limited: 1,
        syn_cookies: 0,
    };
    let total = XdpCounters::sum([cpu, cpu, XdpStats::default()].iter());
    assert_eq!(
        total,
        XdpCounters {
            packets: 8,
            ipv4: 4,
            ipv6: 2,
            tcp: 2,
            vlan: 2,
            other: 0,
            malformed: 0,
            ipv4_fragments: 2,
            steered: 2,
            passed: 2,
            no_socket: 0,
            blocked: 2,
            rate_limited: 2,
            syn_cookies: 0,
        }
    );
    assert_eq!(total.terminal(), total.packets);
    let json = serde_json::to_value(total).expect("serialize");
    assert_eq!(
        json["ipv4_fragments"], 2,
        "field names are the JSON keys: {json}"
    );
    assert_eq!(json["no_socket"], 0, "new counters serialized: {json}");
    assert_eq!(json["blocked"], 2, "new counters serialized: {json}");
}

// ---------------------------------------------------------------------------------------------
// Steering, blocklist and map management

/// Attaches to `lo` of a fresh namespace in skb mode: the cheapest way to get a program whose
/// maps can be exercised.
fn program_on_lo() -> (Netns, XdpProgram) {
    let ns = Netns::new();
    let program = ns
        .run_in(|| attach("lo", XdpAttach::Skb))
        .unwrap_or_else(|err| panic!("attach to lo: {err}"));
    (ns, program)
}

#[test]
fn listen_set_steers_by_address_and_port_and_blocklist_drops_first() {
    let pair = Pair::new();
    let program = pair
        .attach(XdpAttach::Native)
        .unwrap_or_else(|err| panic!("attach: {err}"));
    let v4 = SocketAddr::new(TARGET_IP.into(), 443);
    let v6 = SocketAddr::new(TARGET_IP6.into(), 443);
    let any4 = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 8443);
    program
        .set_listeners(&[v4, v6, any4, v4])
        .expect("set_listeners");
    assert_eq!(
        program.listeners().expect("listeners"),
        {
            let mut sorted = vec![v4, any4, v6];
            sorted.sort();
            sorted
        },
        "the listen set, duplicates merged"
    );
    assert_eq!(program.workers(), 0);

    // No workers set yet: every listener match is `no_socket`, everything else `passed`.
    let syn = tcp_syn(CLIENT_IP.into(), TARGET_IP.into(), 40000, 443);
    let frames = vec![
        syn4(CLIENT_IP, TARGET_IP, 40000, 443), // listener: no_socket
        syn4(CLIENT_IP, Ipv4Addr::new(203, 0, 113, 9), 40000, 443), // other address: passed
        syn4(CLIENT_IP, TARGET_IP, 40000, 80),  // other port: passed
        syn4(CLIENT_IP, Ipv4Addr::new(198, 51, 100, 7), 40000, 8443), // v4 wildcard: no_socket
        syn6(SOURCE_IP6, TARGET_IP6, 40000, 443), // v6 listener: no_socket
        syn6(
            SOURCE_IP6,
            Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 9),
            40000,
            8443,
        ), // passed
        ethernet(0x0800, &ipv4(CLIENT_IP, TARGET_IP, UDP, 0, 0, &[0; 8])), // UDP: passed
        ethernet(0x0800, &ipv4(CLIENT_IP, TARGET_IP, TCP, MF, 0, &syn)), // fragment: passed
        vlan(0x8100, 0x0800, &ipv4(CLIENT_IP, TARGET_IP, TCP, 0, 0, &syn)), // tagged: no_socket
    ];
    pair.inject(&frames);
    let counters = wait_for(&program, |c| c.packets >= 9);
    assert_eq!(
        (counters.packets, counters.no_socket, counters.passed),
        (9, 4, 5),
        "listener matches without sockets: {counters:?}"
    );
    assert_eq!((counters.steered, counters.blocked), (0, 0), "{counters:?}");

    // Workers set but no socket registered: still `no_socket`.
    program.set_workers(2).expect("set_workers");
    assert_eq!(program.workers(), 2);
    pair.inject(&[syn4(CLIENT_IP, TARGET_IP, 40001, 443)]);
    let counters = wait_for(&program, |c| c.packets >= 10);
    assert_eq!(counters.no_socket, 5, "empty XSKMAP slot: {counters:?}");

    // Blocklist: checked before the listen set and the fragment rule, for both families.
    let blocked4: IpPrefix = "192.0.2.0/24".parse().expect("prefix");
    let blocked6: IpPrefix = "fd00:bad::/32".parse().expect("prefix");
    program.block(blocked4).expect("block v4");
    program.block(blocked6).expect("block v6");
    program
        .block(blocked4)
        .expect("blocking twice is not an error");
    assert_eq!(
        program.blocks().expect("blocks"),
        vec![blocked4, blocked6],
        "the blocklist, IPv4 first"
    );
    let bad4 = Ipv4Addr::new(192, 0, 2, 77);
    let bad6 = Ipv6Addr::new(0xfd00, 0xbad, 0, 0, 0, 0, 0, 1);
    let bad_syn = tcp_syn(bad4.into(), TARGET_IP.into(), 40000, 443);
    pair.inject(&[
        syn4(bad4, TARGET_IP, 40000, 443), // blocked
        ethernet(0x0800, &ipv4(bad4, TARGET_IP, UDP, 0, 0, &[0; 8])), // blocked
        ethernet(0x0800, &ipv4(bad4, TARGET_IP, TCP, MF, 0, &bad_syn)), // blocked fragment
        syn6(bad6, TARGET_IP6, 40000, 443), // blocked
        syn4(Ipv4Addr::new(192, 0, 3, 77), TARGET_IP, 40000, 443), // neighbour: no_socket
        syn4(CLIENT_IP, TARGET_IP, 40000, 443), // no_socket
    ]);
    let counters = wait_for(&program, |c| c.packets >= 16);
    assert_eq!(
        (counters.blocked, counters.no_socket, counters.passed),
        (4, 7, 5),
        "blocked sources dropped: {counters:?}"
    );
    assert_eq!(
        counters.ipv4_fragments, 1,
        "a blocked fragment stops before the fragment rule: {counters:?}"
    );

    // Unblocking is exact: the prefix, not one inside or around it.
    let inside: IpPrefix = "192.0.2.0/25".parse().expect("prefix");
    assert!(!program.unblock(inside).expect("unblock"), "never blocked");
    assert!(program.unblock(blocked4).expect("unblock"), "was blocked");
    assert!(!program.unblock(blocked4).expect("unblock"), "already gone");
    assert_eq!(program.blocks().expect("blocks"), vec![blocked6]);
    pair.inject(&[syn4(bad4, TARGET_IP, 40000, 443)]);
    let counters = wait_for(&program, |c| c.packets >= 17);
    assert_eq!(
        (counters.blocked, counters.no_socket),
        (4, 8),
        "unblocked source reaches the listener again: {counters:?}"
    );

    // Replacing the listen set removes what is no longer listed.
    program.set_listeners(&[v4]).expect("set_listeners");
    assert_eq!(program.listeners().expect("listeners"), vec![v4]);
    pair.inject(&[
        syn6(SOURCE_IP6, TARGET_IP6, 40000, 443), // passed now
        syn4(CLIENT_IP, Ipv4Addr::new(198, 51, 100, 7), 40000, 8443), // passed now
        syn4(CLIENT_IP, TARGET_IP, 40000, 443),   // no_socket
    ]);
    let counters = wait_for(&program, |c| c.packets >= 20);
    assert_eq!(
        (counters.passed, counters.no_socket),
        (7, 9),
        "after replacing the listen set: {counters:?}"
    );
    program.set_listeners(&[]).expect("empty listen set");
    assert!(program.listeners().expect("listeners").is_empty());
    assert_terminal_invariant(&program);
}

/// The per-source SYN limit: a source gets its burst, then nothing more at 1 SYN/s; another
/// source has its own schedule; kernel listeners in the listen set are limited but passed, not
/// steered; turning the limit off lets everything through again. Every drop is counted.
#[test]
fn per_source_syn_limit_drops_beyond_the_burst_for_both_listener_kinds() {
    let pair = Pair::new();
    let program = pair
        .attach(XdpAttach::Native)
        .unwrap_or_else(|err| panic!("attach: {err}"));
    let bypass = SocketAddr::new(TARGET_IP.into(), 443);
    let kernel = SocketAddr::new(TARGET_IP.into(), 8443);
    program
        .set_listen_set(&[bypass], &[kernel])
        .expect("listen set");
    assert_eq!(
        program.listeners().expect("listeners"),
        vec![bypass],
        "only bypass is steered"
    );
    program
        .set_source_limits(RateLimit { rate: 1, burst: 5 }, RateLimit::default())
        .expect("limits");

    let syns = |src: Ipv4Addr, dport: u16| -> Vec<Vec<u8>> {
        (0..10)
            .map(|i| syn4(src, TARGET_IP, 41000 + i, dport))
            .collect()
    };
    // At 1 SYN/s, a second-long stall of this test would let one more through: hence ranges.
    pair.inject(&syns(CLIENT_IP, 443));
    let c = wait_for(&program, |c| c.packets >= 10);
    assert_eq!(c.no_socket + c.rate_limited, 10, "{c:?}");
    assert!(
        (4..=5).contains(&c.rate_limited),
        "burst of 5, then dropped: {c:?}"
    );

    // Another source, to the kernel listener: its own burst; what passes goes to the kernel.
    pair.inject(&syns(CLIENT_IP2, 8443));
    let c = wait_for(&program, |c| c.packets >= 20);
    assert!((8..=10).contains(&c.rate_limited), "{c:?}");
    assert_eq!(c.steered, 0, "{c:?}");
    assert!(
        c.passed >= 5,
        "kernel listener's SYNs within the burst are passed: {c:?}"
    );

    program
        .set_source_limits(RateLimit::default(), RateLimit::default())
        .expect("limits off");
    let limited = c.rate_limited;
    pair.inject(&syns(CLIENT_IP, 443));
    let c = wait_for(&program, |c| c.packets >= 30);
    assert_eq!(c.rate_limited, limited, "no limit, no drop: {c:?}");
    assert_terminal_invariant(&program);
}

/// The unknown-flow limit: bare ACKs to a kernel listener for flows the kernel does not hold
/// get the burst, then are dropped and counted; to a bypass listener they are never limited
/// (XDP cannot see the stack's flows); SYNs are not affected by it.
#[test]
fn unknown_flow_limit_drops_stray_acks_to_kernel_listeners_only() {
    let pair = Pair::new();
    let program = pair
        .attach(XdpAttach::Native)
        .unwrap_or_else(|err| panic!("attach: {err}"));
    let bypass = SocketAddr::new(TARGET_IP.into(), 443);
    let kernel = SocketAddr::new(TARGET_IP.into(), 8443);
    program
        .set_listen_set(&[bypass], &[kernel])
        .expect("listen set");
    program
        .set_source_limits(RateLimit::default(), RateLimit { rate: 1, burst: 5 })
        .expect("limits");
    let acks = |dport: u16| -> Vec<Vec<u8>> {
        (0..10)
            .map(|i| ack4(CLIENT_IP, TARGET_IP, 42000 + i, dport))
            .collect()
    };
    pair.inject(&acks(8443));
    let c = wait_for(&program, |c| c.packets >= 10);
    assert_eq!(c.passed + c.rate_limited, 10, "{c:?}");
    assert!(
        (4..=5).contains(&c.rate_limited),
        "burst of 5, then dropped: {c:?}"
    );

    pair.inject(&acks(443));
    let syns: Vec<Vec<u8>> = (0..10)
        .map(|i| syn4(CLIENT_IP, TARGET_IP, 43000 + i, 8443))
        .collect();
    pair.inject(&syns);
    let c2 = wait_for(&program, |c| c.packets >= 30);
    assert_eq!(
        c2.rate_limited, c.rate_limited,
        "bypass ACKs and SYNs are not limited: {c2:?}"
    );
    assert_eq!(
        c2.no_socket, 10,
        "the bypass ACKs were steered (no socket): {c2:?}"
    );
    assert_terminal_invariant(&program);
}

/// Each attach draws its own steering key, written before the program runs; a successor that
/// adopts the program reads the key it finds (its flows keep their workers).
#[test]
fn steering_key_is_random_per_attach_and_kept_by_adopt() {
    let (_ns_a, a) = program_on_lo();
    let (_ns_b, b) = program_on_lo();
    assert_ne!(a.steer_key(), [0; 16], "a key was drawn");
    assert_ne!(a.steer_key(), b.steer_key(), "two starts, two keys");
    let adopted = adopt("lo", a.handover_ids()).unwrap_or_else(|err| panic!("adopt: {err}"));
    assert_eq!(adopted.steer_key(), a.steer_key(), "adopt keeps the key");
}

#[test]
fn map_setters_reject_out_of_range_values() {
    let (_ns, program) = program_on_lo();
    for workers in [0, MAX_WORKERS + 1] {
        let err = program
            .set_workers(workers)
            .expect_err("worker count out of range");
        assert!(
            matches!(err, XdpError::Workers { workers: w, .. } if w == workers),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("on lo"),
            "names the interface: {err}"
        );
    }
    program
        .set_workers(MAX_WORKERS)
        .expect("the maximum is fine");

    let err = program
        .unregister_socket(XSK_MAP_ENTRIES)
        .expect_err("slot out of range");
    assert!(
        matches!(err, XdpError::Slot { index, .. } if index == XSK_MAP_ENTRIES),
        "{err:?}"
    );
    program
        .unregister_socket(XSK_MAP_ENTRIES - 1)
        .expect("emptying an empty slot is fine");

    // The kernel only takes bound AF_XDP sockets into an XSKMAP.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp socket");
    let err = program
        .register_socket(0, &udp)
        .expect_err("a UDP socket is not an AF_XDP socket");
    assert!(
        matches!(&err, XdpError::Map { map, .. } if *map == XSK_MAP),
        "{err:?}"
    );

    let too_many: Vec<SocketAddr> = (0..=LISTEN_MAP_ENTRIES as u16)
        .map(|port| SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 1000 + port))
        .collect();
    let err = program
        .set_listeners(&too_many)
        .expect_err("more listeners than the map holds");
    assert!(
        matches!(err, XdpError::TooManyListeners { count, .. } if count == too_many.len()),
        "{err:?}"
    );
    assert!(
        program.listeners().expect("listeners").is_empty(),
        "a refused listen set changes nothing"
    );

    program.set_reflect(true).expect("reflect on");
    assert!(program.reflect());
    assert_eq!(
        program.workers(),
        MAX_WORKERS,
        "reflect keeps the worker count"
    );
    program.set_reflect(false).expect("reflect off");
    assert!(!program.reflect());
}

/// Real traffic through the kernel's TCP stack with a listen entry but no AF_XDP socket: the
/// listener's segments reach the kernel (`no_socket`), other traffic is `passed`, a blocked
/// source cannot connect while another one can, and unblocking restores it.
#[test]
fn real_traffic_passes_without_sockets_and_blocklist_cuts_one_source() {
    let pair = Pair::new().with_addresses();
    let program = pair
        .attach(XdpAttach::Native)
        .unwrap_or_else(|err| panic!("attach: {err}"));
    let listener = pair
        .server
        .run_in(|| TcpListener::bind((SERVER_IP, 0)))
        .expect("listen in the server namespace");
    let port = listener.local_addr().expect("local addr").port();
    let service = SocketAddr::new(SERVER_IP.into(), port);
    program.set_listeners(&[service]).expect("set_listeners");
    program.set_workers(1).expect("set_workers");

    let connect = |timeout: Duration| {
        pair.client
            .run_in(|| TcpStream::connect_timeout(&service, timeout))
    };

    let stream = connect(Duration::from_secs(5)).expect("connect without sockets registered");
    assert_eq!(
        stream.local_addr().expect("local").ip(),
        IpAddr::from(CLIENT_IP)
    );
    drop(stream);
    let after_connect = wait_for(&program, |c| c.no_socket >= 2);
    assert!(
        after_connect.no_socket >= 2,
        "SYN and ACK of the handshake reach the kernel as no_socket: {after_connect:?}"
    );
    assert_eq!(after_connect.steered, 0, "{after_connect:?}");

    let before = program.counters().expect("counters");
    pair.client
        .exec(&["ping", "-c", "1", "-W", "5", &SERVER_IP.to_string()]);
    let refused = pair.client.run_in(|| {
        TcpStream::connect_timeout(
            &SocketAddr::new(SERVER_IP.into(), port.wrapping_add(1).max(1)),
            Duration::from_secs(5),
        )
    });
    assert_eq!(
        refused.as_ref().map_err(std::io::Error::kind).err(),
        Some(std::io::ErrorKind::ConnectionRefused),
        "another port is the kernel's (closed): {refused:?}"
    );
    let after = wait_for(&program, |c| c.passed >= before.passed + 2);
    assert!(
        after.passed >= before.passed + 2,
        "echo request and the SYN to another port are passed: {before:?} -> {after:?}"
    );

    // Block the primary client address: its connect times out, and the drops are counted.
    let primary: IpPrefix = CLIENT_IP.to_string().parse().expect("host prefix");
    program.block(primary).expect("block");
    let before = program.counters().expect("counters");
    let blocked = connect(Duration::from_millis(1500));
    assert_eq!(
        blocked.as_ref().map_err(std::io::Error::kind).err(),
        Some(std::io::ErrorKind::TimedOut),
        "a blocked source must not connect: {blocked:?}"
    );
    let after = wait_for(&program, |c| c.blocked > before.blocked);
    assert!(
        after.blocked > before.blocked,
        "SYN not counted as blocked: {after:?}"
    );

    // Another source on the same client still connects: route the server via CLIENT_IP2.
    let server_route = format!("{SERVER_IP}/32");
    pair.client.ip(&[
        "route",
        "add",
        &server_route,
        "dev",
        &pair.client_if,
        "src",
        &CLIENT_IP2.to_string(),
    ]);
    let other = connect(Duration::from_secs(5)).expect("another source still connects");
    assert_eq!(
        other.local_addr().expect("local").ip(),
        IpAddr::from(CLIENT_IP2),
        "the connection came from the other source"
    );
    drop(other);
    pair.client.ip(&["route", "del", &server_route]);

    assert!(program.unblock(primary).expect("unblock"), "was blocked");
    let again = connect(Duration::from_secs(5)).expect("unblocked source connects again");
    assert_eq!(
        again.local_addr().expect("local").ip(),
        IpAddr::from(CLIENT_IP)
    );
    drop(again);
    drop(listener);
    let counters = assert_terminal_invariant(&program);
    assert_eq!(
        counters.steered, 0,
        "nothing steered without sockets: {counters:?}"
    );
}

/// Reflect mode: a listener-bound SYN comes back to the sender with Ethernet addresses, IP
/// addresses and ports swapped and both checksums still valid, counted as `steered`.
#[test]
fn reflect_mode_answers_with_swapped_frames() {
    let pair = Pair::new();
    let program = pair
        .attach(XdpAttach::Native)
        .unwrap_or_else(|err| panic!("attach: {err}"));
    // veth delivers XDP_TX frames only to a peer that runs XDP itself.
    let peer = pair
        .client
        .run_in(|| attach_pass(&pair.client_if, XdpAttach::Native))
        .unwrap_or_else(|err| panic!("attach tern_pass on the peer: {err}"));
    assert_eq!(peer.attached_mode(), AttachedMode::Native);
    assert_eq!(peer.interface(), pair.client_if);
    program
        .set_listeners(&[
            SocketAddr::new(TARGET_IP.into(), 443),
            SocketAddr::new(TARGET_IP6.into(), 443),
        ])
        .expect("set_listeners");
    program.set_reflect(true).expect("reflect on");

    let is_tcp = |frame: &[u8]| {
        frame.len() > 14 && matches!(u16::from_be_bytes([frame[12], frame[13]]), 0x0800 | 0x86dd)
    };
    let sent = [
        syn4(CLIENT_IP, TARGET_IP, 40000, 443),
        syn6(SOURCE_IP6, TARGET_IP6, 40001, 443),
        // Not a listener: passed to the server's kernel, nothing comes back.
        syn4(CLIENT_IP, TARGET_IP, 40002, 80),
    ];
    let back = pair.send_and_capture(&sent, 2, Duration::from_secs(5), is_tcp);
    let back: Vec<Tcp4Tuple> = back.iter().map(|f| parse_tcp_frame(f)).collect();
    assert_eq!(
        back,
        vec![
            Tcp4Tuple {
                eth_dst: CLIENT_MAC,
                eth_src: SERVER_MAC,
                src: TARGET_IP.into(),
                dst: CLIENT_IP.into(),
                sport: 443,
                dport: 40000,
            },
            Tcp4Tuple {
                eth_dst: CLIENT_MAC,
                eth_src: SERVER_MAC,
                src: TARGET_IP6.into(),
                dst: SOURCE_IP6.into(),
                sport: 443,
                dport: 40001,
            },
        ],
        "reflected frames (checksums verified while parsing)"
    );
    let counters = wait_for(&program, |c| c.packets >= 3);
    assert_eq!(
        (counters.steered, counters.passed, counters.no_socket),
        (2, 1, 0),
        "reflected frames count as steered: {counters:?}"
    );

    // Reflection off again: the same SYN is a listener match without a socket.
    program.set_reflect(false).expect("reflect off");
    // Nothing should come back; a second is far longer than a reflection takes.
    let back = pair.send_and_capture(&sent[..1], 1, Duration::from_secs(1), is_tcp);
    assert!(
        back.is_empty(),
        "nothing reflected with the flag off: {back:02x?}"
    );
    let counters = wait_for(&program, |c| c.packets >= 4);
    assert_eq!(
        (counters.steered, counters.no_socket),
        (2, 1),
        "reflection off: {counters:?}"
    );
    assert_terminal_invariant(&program);
    drop(peer);
    let link = detached_within(|| {
        pair.client
            .ip(&["-d", "link", "show", "dev", &pair.client_if])
    });
    assert!(
        !link.contains("prog/xdp"),
        "tern_pass still attached after drop:\n{link}"
    );
}

/// `ip link` output once it shows no XDP program, or the last one after 5 s. The bpf link is
/// released when its last fd closes, and a child another test thread is forking at that moment
/// holds a copy until its exec (the fd is close-on-exec): detaching can lag the drop slightly.
fn detached_within(show: impl Fn() -> String) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let link = show();
        if !link.contains("prog/xdp") || std::time::Instant::now() >= deadline {
            return link;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// IpPrefix

#[test]
fn prefixes_parse_and_print() {
    for (text, shown) in [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("192.0.2.7", "192.0.2.7/32"),
        ("192.0.2.7/32", "192.0.2.7/32"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("2001:db8::1", "2001:db8::1/128"),
        ("::/0", "::/0"),
        ("fe80::/10", "fe80::/10"),
    ] {
        let prefix: IpPrefix = text
            .parse()
            .unwrap_or_else(|err| panic!("{text} must parse: {err}"));
        assert_eq!(prefix.to_string(), shown, "display of {text}");
        assert_eq!(
            shown.parse::<IpPrefix>().expect("round trip"),
            prefix,
            "round trip of {text}"
        );
    }
    let net: IpPrefix = "10.0.0.0/8".parse().expect("prefix");
    assert_eq!(net.addr(), IpAddr::from(Ipv4Addr::new(10, 0, 0, 0)));
    assert_eq!(net.prefix_len(), 8);
    assert!(net.contains(Ipv4Addr::new(10, 255, 0, 1).into()));
    assert!(!net.contains(Ipv4Addr::new(11, 0, 0, 1).into()));
    assert!(!net.contains(Ipv6Addr::LOCALHOST.into()), "other family");
    let all6: IpPrefix = "::/0".parse().expect("prefix");
    assert!(all6.contains(Ipv6Addr::LOCALHOST.into()));
    assert_eq!(
        IpPrefix::host(Ipv6Addr::LOCALHOST.into()).to_string(),
        "::1/128"
    );
    assert_eq!(
        IpPrefix::new(Ipv4Addr::new(192, 0, 2, 0).into(), 24).expect("valid"),
        "192.0.2.0/24".parse().expect("prefix")
    );
}

#[test]
fn bad_prefixes_are_named_in_errors() {
    let host_bits = "10.0.0.1/8".parse::<IpPrefix>().expect_err("host bits set");
    assert_eq!(
        host_bits,
        PrefixError::HostBits {
            input: "10.0.0.1/8".into(),
            len: 8,
            network: "10.0.0.0/8".parse().expect("prefix"),
        }
    );
    let message = host_bits.to_string();
    assert!(
        message.contains("10.0.0.1/8") && message.contains("10.0.0.0/8"),
        "names the input and the network: {message}"
    );
    let v6 = "2001:db8::1/32".parse::<IpPrefix>().expect_err("host bits");
    assert!(
        v6.to_string().contains("2001:db8::/32"),
        "suggests the network: {v6}"
    );
    assert!(matches!(
        IpPrefix::new(Ipv4Addr::new(10, 0, 0, 1).into(), 31),
        Err(PrefixError::HostBits { .. })
    ));
    assert_eq!(
        IpPrefix::new(Ipv4Addr::UNSPECIFIED.into(), 33),
        Err(PrefixError::Length {
            input: "0.0.0.0/33".into(),
            max: 32
        })
    );

    for (text, max) in [
        ("10.0.0.0/33", 32),
        ("::/129", 128),
        ("10.0.0.0/4294967296", 32),
    ] {
        let err = text.parse::<IpPrefix>().expect_err("too long");
        assert!(
            matches!(&err, PrefixError::Length { input, max: m } if input == text && *m == max),
            "{text}: {err:?}"
        );
        assert!(err.to_string().contains(text), "names {text}: {err}");
    }
    for text in [
        "",
        "10.0.0.0/",
        "/8",
        "10.0.0/8",
        "10.0.0.0/+8",
        "10.0.0.0/-1",
        "10.0.0.0/8/8",
        "example.com",
        " 10.0.0.0/8",
        "10.0.0.0 /8",
        "[::1]/128",
    ] {
        let err = text.parse::<IpPrefix>().expect_err("not a prefix");
        assert_eq!(
            err,
            PrefixError::Syntax { input: text.into() },
            "{text:?} must be a syntax error"
        );
        assert!(
            err.to_string().contains(&format!("{text:?}")),
            "names {text:?}: {err}"
        );
    }
}

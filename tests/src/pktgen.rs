//! A raw TCP SYN generator for benchmarks and flood tests: prebuilt Ethernet/IPv4/TCP frames
//! sent through an AF_PACKET socket with `PACKET_QDISC_BYPASS` and `sendmmsg`, 64 per call.
//!
//! Frames cycle over `flows` source ports (and optionally source addresses), so a multi-queue
//! veth spreads them over its queues by flow hash. Every frame has correct IPv4 and TCP
//! checksums (RFC 791, RFC 9293 §3.1) so that receivers which verify them accept the frames.
//! Bounded: it stops after `max_frames` or `duration`, whichever comes first, or when `stop`
//! is set. Runs in the calling thread's network namespace (enter one first with
//! `Netns::enter_current_thread` or use `Netns::spawn`).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use socket2::{socklen_t, Domain, Protocol, SockAddr, SockAddrStorage, Socket, Type};

/// What to send.
#[derive(Debug, Clone)]
pub struct SynSpec {
    /// Interface to send on (in the current namespace).
    pub interface: String,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// Source addresses: `src_ip`, `src_ip + 1`, … `src_ip + src_ips - 1`.
    pub src_ip: Ipv4Addr,
    pub src_ips: u32,
    pub dst_ip: Ipv4Addr,
    pub dst_port: u16,
    /// Distinct source ports per source address (from 10000 up).
    pub flows: u16,
}

/// What was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub frames: u64,
    /// `sendmmsg` calls that could not send everything (the socket's queue was full).
    pub short_sends: u64,
    pub elapsed: Duration,
}

impl Sent {
    pub fn per_second(&self) -> f64 {
        self.frames as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

const FRAME_LEN: usize = 14 + 20 + 20;
const BATCH: usize = 64;

/// Builds one SYN frame (no TCP options).
pub fn syn_frame(spec: &SynSpec, src_ip: Ipv4Addr, src_port: u16, seq: u32) -> [u8; FRAME_LEN] {
    tcp_frame(spec, src_ip, src_port, seq, 0, 0x02)
}

/// Builds one TCP segment without options or payload, with the given flags (`0x10` ACK, ...)
/// and acknowledgment number, from `src_ip:src_port` to the spec's destination.
pub fn tcp_frame(
    spec: &SynSpec,
    src_ip: Ipv4Addr,
    src_port: u16,
    seq: u32,
    ack: u32,
    flags: u8,
) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&spec.dst_mac);
    f[6..12].copy_from_slice(&spec.src_mac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src_ip.octets());
    ip[16..20].copy_from_slice(&spec.dst_ip.octets());
    let c = checksum(0, ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let tcp = &mut f[34..54];
    tcp[0..2].copy_from_slice(&src_port.to_be_bytes());
    tcp[2..4].copy_from_slice(&spec.dst_port.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    // Pseudo-header: src, dst, zero, protocol, TCP length.
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src_ip.octets());
    pseudo[4..8].copy_from_slice(&spec.dst_ip.octets());
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
    let c = checksum(sum(0, &pseudo), tcp);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    f
}

fn sum(mut acc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        acc += u32::from(*b) << 8;
    }
    acc
}

/// The Internet checksum (RFC 1071) of `data`, continuing from a partial sum.
fn checksum(acc: u32, data: &[u8]) -> u16 {
    let mut acc = sum(acc, data);
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// An AF_PACKET socket on one interface, bypassing the qdisc.
struct PacketSocket {
    socket: Socket,
    ifindex: libc::c_int,
}

impl PacketSocket {
    fn open(interface: &str) -> io::Result<PacketSocket> {
        let name = std::ffi::CString::new(interface).map_err(io::Error::other)?;
        // SAFETY: valid NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as libc::c_int;
        if ifindex == 0 {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no interface {interface}"),
            ));
        }
        let proto = (libc::ETH_P_ALL as u16).to_be();
        let socket = Socket::new(
            Domain::PACKET,
            Type::RAW,
            Some(Protocol::from(libc::c_int::from(proto))),
        )?;
        let one: libc::c_int = 1;
        // A raw setsockopt: neither socket2 nor rustix has the AF_PACKET options. Best effort
        // (the result is ignored): without the bypass the frames still leave, through the qdisc.
        // SAFETY: valid fd and a c_int option of the right size.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        Ok(PacketSocket { socket, ifindex })
    }
}

/// The link-layer address (packet(7) `sockaddr_ll`) of interface `ifindex`: `protocol` is an
/// `ETH_P_*` value in network byte order (0 to send), `dst_mac` the destination of frames sent
/// to it. Neither socket2 nor rustix builds one, so it is filled in here, once for the crate.
pub(crate) fn link_addr(ifindex: libc::c_int, protocol: u16, dst_mac: Option<[u8; 6]>) -> SockAddr {
    let mut storage = SockAddrStorage::zeroed();
    // SAFETY: sockaddr_ll is one of this platform's sockaddr types, as `view_as` requires.
    let ll = unsafe { storage.view_as::<libc::sockaddr_ll>() };
    ll.sll_family = libc::AF_PACKET as u16;
    ll.sll_protocol = protocol;
    ll.sll_ifindex = ifindex;
    if let Some(mac) = dst_mac {
        ll.sll_halen = 6;
        ll.sll_addr[..6].copy_from_slice(&mac);
    }
    // SAFETY: the family is AF_PACKET and the storage holds a sockaddr_ll of the length given.
    unsafe {
        SockAddr::new(
            storage,
            std::mem::size_of::<libc::sockaddr_ll>() as socklen_t,
        )
    }
}

/// Sends one prebuilt frame out of `spec.interface` (to `spec.dst_mac`).
pub fn send_frame(spec: &SynSpec, frame: &[u8]) -> io::Result<()> {
    let sock = PacketSocket::open(&spec.interface)?;
    let addr = link_addr(sock.ifindex, 0, Some(spec.dst_mac));
    sock.socket.send_to(frame, &addr)?;
    Ok(())
}

/// Sends SYN frames per `spec` until `max_frames`, `duration` or `stop`.
pub fn send_syns(
    spec: &SynSpec,
    max_frames: u64,
    duration: Duration,
    stop: &AtomicBool,
) -> io::Result<Sent> {
    assert!(
        spec.flows > 0 && spec.src_ips > 0,
        "at least one flow and one source address"
    );
    let sock = PacketSocket::open(&spec.interface)?;
    // Precompute one frame per flow; the sequence number is fixed per flow (the frames are
    // probes, not a connection).
    let total_flows = spec.flows as usize * spec.src_ips as usize;
    let frames: Vec<[u8; FRAME_LEN]> = (0..total_flows)
        .map(|i| {
            let ip = u32::from(spec.src_ip) + (i / spec.flows as usize) as u32;
            let port = 10000u16.wrapping_add((i % spec.flows as usize) as u16);
            syn_frame(spec, Ipv4Addr::from(ip), port, 0x1000_0000 ^ i as u32)
        })
        .collect();
    let addr = link_addr(sock.ifindex, 0, Some(spec.dst_mac));
    let mut iov: Vec<libc::iovec> = vec![
        libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0
        };
        BATCH
    ];
    // SAFETY: mmsghdr is plain old data; all-zero is valid.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    let started = Instant::now();
    let mut sent = Sent {
        frames: 0,
        short_sends: 0,
        elapsed: Duration::ZERO,
    };
    let mut next = 0usize;
    let mut calls = 0u64;
    while sent.frames < max_frames && !stop.load(Ordering::Relaxed) {
        // The clock is read every 64 calls, not per frame.
        calls += 1;
        if calls.is_multiple_of(64) && started.elapsed() >= duration {
            break;
        }
        let n = BATCH.min((max_frames - sent.frames) as usize);
        for i in 0..n {
            let f = &frames[(next + i) % frames.len()];
            iov[i] = libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: FRAME_LEN,
            };
            // sendmmsg only reads the address; the field is `*mut` for recvmmsg's sake.
            msgs[i].msg_hdr.msg_name = addr.as_ptr().cast_mut().cast();
            msgs[i].msg_hdr.msg_namelen = addr.len();
            msgs[i].msg_hdr.msg_iov = &mut iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        // A raw sendmmsg: socket2 has none, and rustix's cannot take a sockaddr_ll.
        // SAFETY: `msgs[..n]` point at live iovecs, frames and the address above.
        let r = unsafe { libc::sendmmsg(sock.socket.as_raw_fd(), msgs.as_mut_ptr(), n as u32, 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENOBUFS) | Some(libc::EAGAIN) | Some(libc::EINTR) => {
                    sent.short_sends += 1;
                    continue;
                }
                _ => return Err(e),
            }
        }
        let r = r as usize;
        if r < n {
            sent.short_sends += 1;
        }
        sent.frames += r as u64;
        next = (next + r) % frames.len();
    }
    sent.elapsed = started.elapsed();
    Ok(sent)
}

/// The MAC address of `interface` as `ip -o link show` reports it (run `ip` in the right
/// namespace: pass a command from `Netns::command("ip")` or a plain `Command::new("ip")`).
pub fn mac_of(mut ip: std::process::Command, interface: &str) -> io::Result<[u8; 6]> {
    let out = ip.args(["-o", "link", "show", "dev", interface]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mac = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .ok_or_else(|| io::Error::other(format!("no link/ether for {interface}: {text}")))?;
    parse_mac(mac).ok_or_else(|| io::Error::other(format!("bad MAC {mac:?}")))
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SynSpec {
        SynSpec {
            interface: "lo".into(),
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src_ip: Ipv4Addr::new(10, 0, 0, 2),
            src_ips: 1,
            dst_ip: Ipv4Addr::new(10, 0, 0, 1),
            dst_port: 443,
            flows: 4,
        }
    }

    #[test]
    fn syn_frame_checksums_verify() {
        let f = syn_frame(&spec(), Ipv4Addr::new(10, 0, 0, 2), 12345, 7);
        // A correct IPv4 header sums to 0xffff (checksum 0 after folding).
        assert_eq!(checksum(0, &f[14..34]), 0);
        let mut pseudo = [0u8; 12];
        pseudo[0..4].copy_from_slice(&f[26..30]);
        pseudo[4..8].copy_from_slice(&f[30..34]);
        pseudo[9] = 6;
        pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
        assert_eq!(checksum(sum(0, &pseudo), &f[34..54]), 0);
        assert_eq!(u16::from_be_bytes([f[34], f[35]]), 12345);
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), 443);
        assert_eq!(f[47], 0x02, "SYN flag");
    }

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 §3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2 (checksum = !ddf2).
        assert_eq!(
            checksum(0, &[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(parse_mac("02:0a:ff:00:10:01"), Some([2, 10, 255, 0, 16, 1]));
        assert_eq!(parse_mac("02:0a:ff:00:10"), None);
        assert_eq!(parse_mac("02:0a:ff:00:10:01:02"), None);
        assert_eq!(parse_mac("zz:0a:ff:00:10:01"), None);
    }

    #[test]
    fn sends_bounded_count_on_loopback() {
        // Loopback in a fresh namespace: the frames go nowhere harmful.
        let ns = crate::rig::Netns::new("pktgen");
        let sent = ns.run(|| {
            let stop = AtomicBool::new(false);
            send_syns(&spec(), 1000, Duration::from_secs(5), &stop).expect("send")
        });
        assert_eq!(sent.frames, 1000);
    }
}

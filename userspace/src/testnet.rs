//! Test rig for the crate's root-only unit tests (xdp, xsk, bypass, control): throw-away network
//! namespaces, two of them joined by a multi-queue veth pair, raw AF_PACKET sockets to inject and capture frames on the client end,
//! and a builder for TCP/IPv4 frames.
//!
//! Names are unique per process and call (`<prefix><pid>x<n>`, at most 15 bytes) so tests run in
//! parallel; namespaces (and with them the veth pair) are deleted on drop, also on panic. Needs
//! root. The client side has no IP addresses: frames are injected and captured raw, so the
//! kernel on either side never answers them and the only traffic is the test's own.

use std::ffi::CString;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Unique per test process and call; with the prefix it stays within IFNAMSIZ - 1.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = format!("{prefix}{}x{n}", std::process::id());
    assert!(name.len() <= 15, "name {name} longer than IFNAMSIZ-1");
    name
}

#[track_caller]
pub fn run(program: &str, args: &[&str]) -> String {
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
pub struct Netns {
    pub name: String,
}

impl Netns {
    #[track_caller]
    pub fn new() -> Netns {
        assert_eq!(
            // SAFETY: geteuid has no preconditions.
            unsafe { libc::geteuid() },
            0,
            "this test creates network namespaces and needs root"
        );
        let name = unique("tx");
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        // No IPv6 autoconfiguration noise (router/neighbour solicitations).
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
        ns
    }

    #[track_caller]
    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    #[track_caller]
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs `f` on a new thread inside this namespace, so the test's own thread never changes
    /// namespace. Threads `f` spawns, and sockets it creates, belong to this namespace.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
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

    pub fn enter_current_thread(&self) {
        let path = format!("/run/netns/{}", self.name);
        let file =
            std::fs::File::open(&path).unwrap_or_else(|err| panic!("cannot open {path}: {err}"));
        // SAFETY: `file` is an open namespace file for the duration of the call; setns only
        // changes this thread's network namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
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

/// Server and client namespaces joined by a veth pair with `queues` RX and TX queues on both
/// ends. Declared client first so the pair is dropped with the client namespace.
pub struct VethPair {
    pub client: Netns,
    pub server: Netns,
    pub server_if: String,
    pub client_if: String,
    pub server_mac: [u8; 6],
    pub client_mac: [u8; 6],
}

impl VethPair {
    pub fn new(queues: u32) -> VethPair {
        assert_eq!(
            // SAFETY: geteuid has no preconditions.
            unsafe { libc::geteuid() },
            0,
            "this test uses network namespaces, XDP and AF_XDP, and needs root"
        );
        let server = Netns::new();
        let client = Netns::new();
        let server_if = unique("xs");
        let client_if = unique("xc");
        let q = queues.to_string();
        run(
            "ip",
            &[
                "link",
                "add",
                &server_if,
                "numtxqueues",
                &q,
                "numrxqueues",
                &q,
                "netns",
                &server.name,
                "type",
                "veth",
                "peer",
                "name",
                &client_if,
                "numtxqueues",
                &q,
                "numrxqueues",
                &q,
                "netns",
                &client.name,
            ],
        );
        server.ip(&["link", "set", &server_if, "up"]);
        client.ip(&["link", "set", &client_if, "up"]);
        let server_mac = mac_of(&server, &server_if);
        let client_mac = mac_of(&client, &client_if);
        VethPair {
            client,
            server,
            server_if,
            client_if,
            server_mac,
            client_mac,
        }
    }

    /// A raw socket on the client end (created inside the client namespace).
    pub fn client_socket(&self) -> PacketSocket {
        self.client.run_in(|| PacketSocket::open(&self.client_if))
    }
}

fn mac_of(ns: &Netns, interface: &str) -> [u8; 6] {
    let text = ns.ip(&["-o", "link", "show", "dev", interface]);
    let mac = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC address in {text:?}"));
    let mut out = [0u8; 6];
    for (byte, part) in out.iter_mut().zip(mac.split(':')) {
        *byte = u8::from_str_radix(part, 16).unwrap_or_else(|_| panic!("bad MAC {mac}"));
    }
    out
}

/// An AF_PACKET raw socket bound to one interface: sends frames as they are, receives every
/// frame arriving on the interface (its own outgoing frames are ignored).
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    /// Must run in the interface's namespace; the socket works from any thread afterwards.
    pub fn open(interface: &str) -> PacketSocket {
        let name = CString::new(interface).expect("interface name");
        // SAFETY: `name` is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        assert_ne!(ifindex, 0, "no interface {interface}");
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2); checked and owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(protocol),
            )
        };
        assert!(
            fd >= 0,
            "socket(AF_PACKET): {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = ifindex;
        // SAFETY: `addr` is a valid sockaddr_ll of the given size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::addr_of!(addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(
            rc,
            0,
            "bind(AF_PACKET): {}",
            std::io::Error::last_os_error()
        );
        let socket = PacketSocket { fd, ifindex };
        socket.set_int(libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1);
        // Big enough that a burst of reflected frames is not dropped before it is read.
        socket.set_int(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 16 << 20);
        socket
    }

    #[track_caller]
    pub fn set_int(&self, level: i32, option: i32, value: i32) {
        // SAFETY: a c_int option value of the right size.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                option,
                std::ptr::addr_of!(value).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        assert_eq!(
            rc,
            0,
            "setsockopt({level}, {option}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// Sends `frame` out of the interface. Retries while the device queue is full (ENOBUFS):
    /// the test wants every frame on the wire.
    #[track_caller]
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        loop {
            // SAFETY: `frame` and `addr` are valid for the lengths passed.
            let sent = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    std::ptr::addr_of!(addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if sent == frame.len() as isize {
                return;
            }
            let err = std::io::Error::last_os_error();
            assert_eq!(
                err.raw_os_error(),
                Some(libc::ENOBUFS),
                "sendto of a {}-byte frame: {err}",
                frame.len()
            );
            std::thread::yield_now();
        }
    }

    /// Receives one frame into `buf`, waiting at most `timeout`. `None` on timeout.
    pub fn recv(&self, buf: &mut [u8], timeout: Duration) -> Option<usize> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        if ready <= 0 {
            return None;
        }
        // SAFETY: `buf` is valid for `buf.len()` bytes.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        (n >= 0).then_some(n as usize)
    }
}

/// One TCP segment in an Ethernet frame, as the tests send it.
#[derive(Debug, Clone, Copy)]
pub struct TcpFrame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    /// TCP flags byte (0x02 SYN, 0x10 ACK, ...).
    pub flags: u8,
}

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

impl TcpFrame {
    /// Ethernet + IPv4 (20 bytes, checksummed) + TCP (20 bytes, checksummed), no payload:
    /// 54 bytes.
    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(54);
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        let ip_start = f.len();
        f.extend_from_slice(&[0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0]);
        f.extend_from_slice(&self.src.octets());
        f.extend_from_slice(&self.dst.octets());
        let ip_sum = checksum(&f[ip_start..ip_start + 20], 0);
        f[ip_start + 10..ip_start + 12].copy_from_slice(&ip_sum.to_be_bytes());
        let tcp_start = f.len();
        f.extend_from_slice(&self.sport.to_be_bytes());
        f.extend_from_slice(&self.dport.to_be_bytes());
        f.extend_from_slice(&self.seq.to_be_bytes());
        f.extend_from_slice(&0u32.to_be_bytes());
        f.extend_from_slice(&[5 << 4, self.flags, 0xff, 0xff, 0, 0, 0, 0]);
        let mut pseudo = 0u32;
        for pair in self
            .src
            .octets()
            .chunks(2)
            .chain(self.dst.octets().chunks(2))
        {
            pseudo += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
        }
        pseudo += 6 + 20;
        let tcp_sum = checksum(&f[tcp_start..], pseudo);
        f[tcp_start + 16..tcp_start + 18].copy_from_slice(&tcp_sum.to_be_bytes());
        f
    }
}

/// The Internet checksum (RFC 1071) of `data`, starting from a partial sum.
fn checksum(data: &[u8], start: u32) -> u16 {
    let mut sum = start;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Pins the calling thread to `cpu`.
#[track_caller]
pub fn pin_current_thread(cpu: usize) {
    assert!(
        core_affinity::set_for_current(core_affinity::CoreId { id: cpu }),
        "cannot pin a thread to CPU {cpu}"
    );
}

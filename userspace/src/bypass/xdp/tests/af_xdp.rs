//! Real AF_XDP sockets behind the program: frames for a listener land in the socket of the
//! flow's worker (`XSKMAP[queue * workers + flow_hash % workers]`), emptied and closed slots
//! send flows back to the kernel. The sockets are made with raw `libc` calls (one UMEM, its
//! fill ring, an RX ring per socket, copy mode), just enough to receive; the bypass workers'
//! own socket code is `crate::bypass::xsk`'s.

use super::*;

/// A mapped AF_XDP ring (RX or fill), unmapped on drop.
struct Ring {
    base: *mut libc::c_void,
    len: usize,
    producer: *const AtomicU32,
    consumer: *const AtomicU32,
    desc: *mut u8,
    mask: u32,
}

impl Ring {
    /// Maps the ring of `entries` descriptors of `desc_size` bytes at page offset `pgoff`.
    fn map(
        fd: RawFd,
        offsets: &libc::xdp_ring_offset,
        pgoff: u64,
        entries: u32,
        desc_size: usize,
    ) -> Ring {
        let len = offsets.desc as usize + entries as usize * desc_size;
        // SAFETY: mapping a ring the kernel created for `fd`, at the offset it documents.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                pgoff as libc::off_t,
            )
        };
        assert_ne!(
            base,
            libc::MAP_FAILED,
            "mmap of an AF_XDP ring: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: the offsets come from XDP_MMAP_OFFSETS and lie inside the mapping; the
        // producer and consumer words are 4-byte aligned u32s the kernel updates atomically.
        unsafe {
            Ring {
                base,
                len,
                producer: base.cast::<u8>().add(offsets.producer as usize).cast(),
                consumer: base.cast::<u8>().add(offsets.consumer as usize).cast(),
                desc: base.cast::<u8>().add(offsets.desc as usize),
                mask: entries - 1,
            }
        }
    }

    fn producer(&self) -> &AtomicU32 {
        // SAFETY: points into our live mapping (see `map`).
        unsafe { &*self.producer }
    }

    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: points into our live mapping (see `map`).
        unsafe { &*self.consumer }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped; nothing refers to it afterwards.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// Frames in the test UMEM, and the size of each.
const UMEM_FRAMES: u32 = 64;
const FRAME_SIZE: u32 = 4096;

/// A bound AF_XDP socket with its RX ring; the first one of a queue also owns the UMEM and the
/// fill ring (the kernel keeps one buffer pool per (device, queue); later sockets on the same
/// queue share it with XDP_SHARED_UMEM).
struct Xsk {
    // Fields drop in order: rings, then the socket. The UMEM is unmapped in `Drop::drop`,
    // before them; the kernel holds its own references to the UMEM's pages.
    rx: Ring,
    fill: Option<Ring>,
    fd: OwnedFd,
    umem: *mut libc::c_void,
}

// SAFETY: the raw pointers point into mappings this value owns; nothing is tied to the thread
// that created it (the socket's namespace was fixed at creation).
unsafe impl Send for Xsk {}

impl Xsk {
    /// Creates a socket bound to queue 0 of `interface` (copy mode). `share`: the socket whose
    /// UMEM (and fill ring) this one shares; `None` makes a UMEM and fills it completely.
    fn bind(interface: &str, share: Option<&Xsk>) -> Xsk {
        let name = CString::new(interface).expect("interface name");
        // SAFETY: `name` is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0, "no interface {interface}");
        // SAFETY: plain socket(2) call; the result is checked and owned below.
        let fd = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW, 0) };
        assert!(
            fd >= 0,
            "socket(AF_XDP): {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` is a fresh socket nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let raw = fd.as_raw_fd();
        let setsockopt = |option: libc::c_int, value: *const libc::c_void, len: usize| {
            // SAFETY: `value` points to `len` readable bytes of the type the option expects.
            let rc = unsafe {
                libc::setsockopt(raw, libc::SOL_XDP, option, value, len as libc::socklen_t)
            };
            assert_eq!(
                rc,
                0,
                "setsockopt(SOL_XDP, {option}): {}",
                std::io::Error::last_os_error()
            );
        };
        let entries: u32 = UMEM_FRAMES;
        let entries_ptr = std::ptr::addr_of!(entries).cast();

        let mut umem = std::ptr::null_mut();
        if share.is_none() {
            let len = (UMEM_FRAMES * FRAME_SIZE) as usize;
            // SAFETY: anonymous private mapping; checked below, unmapped in Drop.
            umem = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                    -1,
                    0,
                )
            };
            assert_ne!(
                umem,
                libc::MAP_FAILED,
                "mmap UMEM: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: all-zero is a valid xdp_umem_reg.
            let mut reg: libc::xdp_umem_reg = unsafe { std::mem::zeroed() };
            reg.addr = umem as u64;
            reg.len = len as u64;
            reg.chunk_size = FRAME_SIZE;
            setsockopt(
                libc::XDP_UMEM_REG,
                std::ptr::addr_of!(reg).cast(),
                size_of::<libc::xdp_umem_reg>(),
            );
            setsockopt(libc::XDP_UMEM_FILL_RING, entries_ptr, 4);
            setsockopt(libc::XDP_UMEM_COMPLETION_RING, entries_ptr, 4);
        }
        setsockopt(libc::XDP_RX_RING, entries_ptr, 4);

        // SAFETY: all-zero is a valid xdp_mmap_offsets; the kernel fills it.
        let mut offsets: libc::xdp_mmap_offsets = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::xdp_mmap_offsets>() as libc::socklen_t;
        // SAFETY: `offsets` is writable for `len` bytes.
        let rc = unsafe {
            libc::getsockopt(
                raw,
                libc::SOL_XDP,
                libc::XDP_MMAP_OFFSETS,
                std::ptr::addr_of_mut!(offsets).cast(),
                &mut len,
            )
        };
        assert_eq!(
            rc,
            0,
            "XDP_MMAP_OFFSETS: {}",
            std::io::Error::last_os_error()
        );
        let rx = Ring::map(
            raw,
            &offsets.rx,
            libc::XDP_PGOFF_RX_RING as u64,
            entries,
            size_of::<libc::xdp_desc>(),
        );
        let fill = share.is_none().then(|| {
            let fill = Ring::map(
                raw,
                &offsets.fr,
                libc::XDP_UMEM_PGOFF_FILL_RING,
                entries,
                size_of::<u64>(),
            );
            // Hand every frame to the kernel before binding.
            for i in 0..UMEM_FRAMES {
                // SAFETY: slot `i` of the fill ring's descriptor array (entries == frames).
                unsafe {
                    fill.desc
                        .cast::<u64>()
                        .add(i as usize)
                        .write(u64::from(i * FRAME_SIZE));
                }
            }
            fill.producer().store(UMEM_FRAMES, Ordering::Release);
            fill
        });

        // SAFETY: all-zero is a valid sockaddr_xdp.
        let mut addr: libc::sockaddr_xdp = unsafe { std::mem::zeroed() };
        addr.sxdp_family = libc::AF_XDP as u16;
        addr.sxdp_ifindex = ifindex;
        addr.sxdp_queue_id = 0;
        match share {
            Some(owner) => {
                addr.sxdp_flags = libc::XDP_SHARED_UMEM;
                addr.sxdp_shared_umem_fd = owner.fd.as_raw_fd() as u32;
            }
            None => addr.sxdp_flags = libc::XDP_COPY,
        }
        // SAFETY: `addr` is a valid sockaddr_xdp of the size passed.
        let rc = unsafe {
            libc::bind(
                raw,
                std::ptr::addr_of!(addr).cast(),
                size_of::<libc::sockaddr_xdp>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "bind(AF_XDP): {}", std::io::Error::last_os_error());
        Xsk {
            rx,
            fill,
            fd,
            umem: share.map_or(umem, |owner| owner.umem),
        }
    }

    /// Takes every frame waiting in the RX ring (copied out of `umem`). Frames are not given
    /// back to the fill ring: each test sends fewer than the UMEM holds.
    fn receive(&self) -> Vec<Vec<u8>> {
        let producer = self.rx.producer().load(Ordering::Acquire);
        let consumer = self.rx.consumer().load(Ordering::Relaxed);
        let mut frames = Vec::new();
        for i in consumer..producer {
            // SAFETY: descriptors between consumer and producer are published by the kernel;
            // the slot index is masked into the ring.
            let desc = unsafe {
                self.rx
                    .desc
                    .cast::<libc::xdp_desc>()
                    .add((i & self.rx.mask) as usize)
                    .read()
            };
            assert!(
                desc.addr + u64::from(desc.len) <= u64::from(UMEM_FRAMES * FRAME_SIZE),
                "descriptor outside the UMEM: {}+{}",
                desc.addr,
                desc.len
            );
            // SAFETY: checked just above that the frame lies inside the UMEM mapping.
            let frame = unsafe {
                std::slice::from_raw_parts(
                    self.umem.cast::<u8>().add(desc.addr as usize),
                    desc.len as usize,
                )
            };
            frames.push(frame.to_vec());
        }
        self.rx.consumer().store(producer, Ordering::Release);
        frames
    }
}

impl Drop for Xsk {
    fn drop(&mut self) {
        if self.fill.is_some() {
            // Only the UMEM's owner unmaps it. Sockets sharing it must be dropped first (the
            // test does): they read frames through the same pointer.
            // SAFETY: unmapping exactly the UMEM mapped in `bind`; the kernel pinned the pages
            // it uses, so it is unaffected.
            unsafe { libc::munmap(self.umem, (UMEM_FRAMES * FRAME_SIZE) as usize) };
        }
    }
}

/// Frames for a listener are redirected into the AF_XDP socket of the flow's worker:
/// `XSKMAP[queue * workers + flow_hash % workers]`, with the hash from `tern_common` computed
/// the same way in the program and here.
#[test]
fn steers_flows_into_the_sockets_of_their_workers() {
    let pair = Pair::new();
    let program = pair
        .attach(XdpAttach::Native)
        .unwrap_or_else(|err| panic!("attach: {err}"));
    let workers = 2;
    // Both workers' sockets sit on queue 0 (the veth has one); the second shares the first's
    // buffer pool, as the kernel requires for a second socket on one queue.
    let (first, second) = pair.server.run_in(|| {
        let first = Xsk::bind(&pair.server_if, None);
        let second = Xsk::bind(&pair.server_if, Some(&first));
        (first, second)
    });
    program
        .set_listeners(&[SocketAddr::new(TARGET_IP.into(), 443)])
        .expect("set_listeners");
    program.set_workers(workers).expect("set_workers");
    program
        .register_socket(xsk_slot(0, 0, workers), first.fd.as_fd())
        .expect("register worker 0");
    program
        .register_socket(xsk_slot(0, 1, workers), &second.fd)
        .expect("register worker 1");

    let ports: Vec<u16> = (41000..41024).collect();
    let owner = |sport: u16| {
        let hash = flow_hash(
            &program.steer_key(),
            &ipv4_mapped(CLIENT_IP.octets()),
            &ipv4_mapped(TARGET_IP.octets()),
            sport,
            443,
        );
        flow_worker(hash, workers)
    };
    let expected_second = ports.iter().filter(|p| owner(**p) == 1).count() as u64;
    assert!(
        expected_second > 0 && expected_second < ports.len() as u64,
        "the test's flows must cover both workers"
    );
    let frames: Vec<Vec<u8>> = ports
        .iter()
        .map(|sport| syn4(CLIENT_IP, TARGET_IP, *sport, 443))
        .collect();
    pair.inject(&frames);
    let counters = wait_for(&program, |c| c.packets >= ports.len() as u64);
    assert_eq!(
        (counters.steered, counters.no_socket, counters.passed),
        (ports.len() as u64, 0, 0),
        "every listener frame steered: {counters:?}"
    );

    let mut received = [Vec::new(), Vec::new()];
    let deadline = Instant::now() + Duration::from_secs(5);
    while received[0].len() + received[1].len() < ports.len() && Instant::now() < deadline {
        received[0].extend(first.receive());
        received[1].extend(second.receive());
        std::thread::sleep(Duration::from_millis(10));
    }
    for (worker, frames) in received.iter().enumerate() {
        for frame in frames {
            assert_eq!(
                frame,
                &frames_by_port(&ports, frame),
                "a frame arrived changed"
            );
            let tuple = parse_tcp_frame(frame);
            assert_eq!(
                owner(tuple.sport) as usize,
                worker,
                "flow from port {} reached worker {worker}'s socket",
                tuple.sport
            );
        }
    }
    assert_eq!(
        (received[0].len() as u64, received[1].len() as u64),
        (ports.len() as u64 - expected_second, expected_second),
        "frames per worker socket"
    );

    // An emptied slot sends its flows to the kernel; the other worker keeps its own.
    program
        .unregister_socket(xsk_slot(0, 1, workers))
        .expect("unregister worker 1");
    pair.inject(&frames);
    let total = 2 * ports.len() as u64;
    let counters = wait_for(&program, |c| c.packets >= total);
    assert_eq!(
        (counters.steered, counters.no_socket),
        (2 * ports.len() as u64 - expected_second, expected_second),
        "worker 1's flows pass once its slot is empty: {counters:?}"
    );

    // Closing a socket removes it from the map (the kernel drops the map's reference).
    drop(second);
    drop(first);
    pair.inject(&frames[..1]);
    let counters = wait_for(&program, |c| c.packets > total);
    assert_eq!(
        counters.no_socket,
        expected_second + 1,
        "a closed socket is no longer steered to: {counters:?}"
    );
    assert_terminal_invariant(&program);
}

/// The injected frame with the same source port as `frame` (to compare contents).
fn frames_by_port(ports: &[u16], frame: &[u8]) -> Vec<u8> {
    let sport = parse_tcp_frame(frame).sport;
    assert!(ports.contains(&sport), "unexpected source port {sport}");
    syn4(CLIENT_IP, TARGET_IP, sport, 443)
}

/// An ICMP PMTU message (`icmp6`: ICMPv6 packet too big, else ICMPv4 fragmentation needed,
/// with `code`) from a router to the listener's address, quoting a segment the listener
/// (`server:sport`) sent to `client:dport`, cut after `quoted_tcp` bytes of its TCP header.
/// The program does not verify ICMP checksums (the stack does), so the ICMPv6 one is left 0.
fn pmtu_frame(
    server: IpAddr,
    client: IpAddr,
    sport: u16,
    dport: u16,
    code: u8,
    quoted_tcp: usize,
) -> Vec<u8> {
    let mut tcp = tcp_syn(server, client, sport, dport);
    tcp.truncate(quoted_tcp);
    match (server, client) {
        (IpAddr::V4(server), IpAddr::V4(client)) => {
            let quoted = ipv4(server, client, TCP, 0, 0, &tcp);
            // Type 3, code, checksum, unused, next-hop MTU 1400 (RFC 1191).
            let mut icmp = vec![3, code, 0, 0, 0, 0, 0x05, 0x78];
            icmp.extend_from_slice(&quoted);
            let checksum = !ones_complement_sum(&icmp);
            icmp[2..4].copy_from_slice(&checksum.to_be_bytes());
            ethernet(0x0800, &ipv4(CLIENT_IP2, server, 1, 0, 0, &icmp))
        }
        (IpAddr::V6(server), IpAddr::V6(client)) => {
            let quoted = ipv6(server, client, TCP, &tcp);
            // Type 2 (packet too big), code, checksum, MTU 1280 (RFC 4443 §3.2).
            let mut icmp = vec![2, code, 0, 0, 0, 0, 0x05, 0x00];
            icmp.extend_from_slice(&quoted);
            let router = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0xfe);
            ethernet(0x86dd, &ipv6(router, server, 58, &icmp))
        }
        _ => panic!("mixed address families {server} {client}"),
    }
}

/// The quoted destination port (the client's) of a PMTU frame built by [`pmtu_frame`].
fn quoted_client_port(frame: &[u8]) -> u16 {
    let at = match u16::from_be_bytes([frame[12], frame[13]]) {
        // Ethernet, outer IPv4 (20), ICMP (8), quoted IPv4 (20), then sport, dport.
        0x0800 => 14 + 20 + 8 + 20 + 2,
        // Ethernet, outer IPv6 (40), ICMPv6 (8), quoted IPv6 (40), then sport, dport.
        0x86dd => 14 + 40 + 8 + 40 + 2,
        other => panic!("EtherType {other:#06x} in {frame:02x?}"),
    };
    u16::from_be_bytes([frame[at], frame[at + 1]])
}

/// ICMPv4 "fragmentation needed" and ICMPv6 "packet too big" quoting a listener's segment go
/// to the socket of the worker that owns the quoted flow (hashed in the client's order, as the
/// flow's own segments are); PMTU messages about other flows, other ICMP and quotes too short
/// to name the flow go to the kernel.
#[test]
fn pmtu_messages_about_listener_flows_reach_the_flows_worker() {
    let pair = Pair::new();
    let program = pair
        .attach(XdpAttach::Native)
        .unwrap_or_else(|err| panic!("attach: {err}"));
    let workers = 2;
    let (first, second) = pair.server.run_in(|| {
        let first = Xsk::bind(&pair.server_if, None);
        let second = Xsk::bind(&pair.server_if, Some(&first));
        (first, second)
    });
    program
        .set_listeners(&[
            SocketAddr::new(TARGET_IP.into(), 443),
            SocketAddr::new(TARGET_IP6.into(), 443),
        ])
        .expect("set_listeners");
    program.set_workers(workers).expect("set_workers");
    program
        .register_socket(xsk_slot(0, 0, workers), &first.fd)
        .expect("register worker 0");
    program
        .register_socket(xsk_slot(0, 1, workers), &second.fd)
        .expect("register worker 1");

    let (server4, client4) = (IpAddr::from(TARGET_IP), IpAddr::from(CLIENT_IP));
    let (server6, client6) = (IpAddr::from(TARGET_IP6), IpAddr::from(SOURCE_IP6));
    let owner = |client: IpAddr, server: IpAddr, client_port: u16| {
        let mapped = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
            IpAddr::V6(v6) => v6.octets(),
        };
        // The order of the flow's own client → server segments.
        let hash = flow_hash(
            &program.steer_key(),
            &mapped(client),
            &mapped(server),
            client_port,
            443,
        );
        flow_worker(hash, workers) as usize
    };
    let ports: Vec<u16> = (42000..42016).collect();
    let mut steered = Vec::new();
    for port in &ports {
        steered.push(pmtu_frame(server4, client4, 443, *port, 4, 8));
        steered.push(pmtu_frame(server6, client6, 443, *port, 0, 8));
    }
    let per_worker = |frames: &[Vec<u8>]| {
        let mut counts = [0u64; 2];
        for frame in frames {
            let client = if frame[12..14] == [0x08, 0x00] {
                client4
            } else {
                client6
            };
            let server = if client == client4 { server4 } else { server6 };
            counts[owner(client, server, quoted_client_port(frame))] += 1;
        }
        counts
    };
    let expected = per_worker(&steered);
    assert!(
        expected[0] > 0 && expected[1] > 0,
        "the test's flows must cover both workers: {expected:?}"
    );
    let passed = [
        pmtu_frame(server4, client4, 80, 42000, 4, 8), // not a listener's port
        pmtu_frame(client4, server4, 42000, 443, 4, 8), // quotes a segment *to* the listener
        pmtu_frame(server4, client4, 443, 42000, 1, 8), // host unreachable, not frag needed
        pmtu_frame(server4, client4, 443, 42000, 4, 4), // quote too short for the TCP bytes
        pmtu_frame(server6, client6, 8443, 42000, 0, 8), // not a listener's port
        pmtu_frame(server6, client6, 443, 42000, 0, 6), // quote too short
        ethernet(
            0x0800,
            &ipv4(
                CLIENT_IP2,
                TARGET_IP,
                1,
                0,
                0,
                &[8, 0, 0xf7, 0xff, 0, 0, 0, 0],
            ),
        ), // echo request
    ];

    let mut frames = steered.clone();
    frames.extend(passed.iter().cloned());
    pair.inject(&frames);
    let total = frames.len() as u64;
    let counters = wait_for(&program, |c| c.packets >= total);
    assert_eq!(
        (counters.steered, counters.passed, counters.no_socket),
        (steered.len() as u64, passed.len() as u64, 0),
        "PMTU messages about listener flows steered, the rest passed: {counters:?}"
    );
    assert_eq!(counters.tcp, 0, "ICMP is not counted as TCP: {counters:?}");

    let mut received = [Vec::new(), Vec::new()];
    let deadline = Instant::now() + Duration::from_secs(5);
    while received[0].len() + received[1].len() < steered.len() && Instant::now() < deadline {
        received[0].extend(first.receive());
        received[1].extend(second.receive());
        std::thread::sleep(Duration::from_millis(10));
    }
    for (worker, frames) in received.iter().enumerate() {
        for frame in frames {
            assert!(
                steered.contains(frame),
                "a frame arrived changed: {frame:02x?}"
            );
            assert_eq!(
                per_worker(std::slice::from_ref(frame))[worker],
                1,
                "a PMTU message reached worker {worker}, which does not own its flow"
            );
        }
    }
    assert_eq!(
        [received[0].len() as u64, received[1].len() as u64],
        expected,
        "PMTU messages per worker socket"
    );

    // Reflect mode has no worker to tell: the kernel gets them.
    program.set_reflect(true).expect("reflect on");
    pair.inject(&steered[..2]);
    let counters = wait_for(&program, |c| c.packets >= total + 2);
    assert_eq!(
        counters.passed,
        passed.len() as u64 + 2,
        "reflect mode passes PMTU messages: {counters:?}"
    );
    assert_terminal_invariant(&program);
    drop(second);
    drop(first);
}

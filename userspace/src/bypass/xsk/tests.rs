//! AF_XDP sockets on a real 2-queue veth pair in throw-away namespaces: binding, transmission to
//! the peer (captured with AF_PACKET), frame accounting, and the UMEM on both page sizes.
//! Receiving needs the XDP program's XSKMAP and is tested with the bypass worker (`bypass`).
//! Needs root.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::*;
use crate::config::HugePages;
use crate::testnet::{TcpFrame, VethPair, ACK};

const SERVER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 1);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 2);

/// Small rings and UMEM: enough for the tests, quick to map.
pub(crate) fn settings(hugepages: HugePages) -> XdpSettings {
    XdpSettings {
        frame_size: 2048,
        frames_per_worker: 4096,
        rx_ring: 1024,
        tx_ring: 1024,
        fill_ring: 1024,
        completion_ring: 1024,
        idle_spin: Duration::from_micros(200),
        spin: crate::config::SpinMode::Adaptive,
        hugepages,
        syn_rate_per_source: 0,
        syn_burst_per_source: 32,
        unknown_rate_per_source: 0,
        unknown_burst_per_source: 64,
        syn_cookies: crate::config::SynCookies::Worker,
    }
}

#[test]
fn binds_one_socket_per_queue_in_copy_mode() {
    let pair = VethPair::new(2);
    pair.server.run_in(|| {
        assert_eq!(
            rx_queue_count(&pair.server_if).expect("channel counts"),
            2,
            "the veth was made with 2 RX queues"
        );
        assert_eq!(
            rx_queue_count("lo").expect("lo has no channel counts"),
            1,
            "a device without ETHTOOL_GCHANNELS counts as one queue"
        );
        assert!(rx_queue_count("nosuchif0").is_err());

        let mut xsks = open(&pair.server_if, 2, 1, &settings(HugePages::Off))
            .unwrap_or_else(|err| panic!("AF_XDP on {}: {err}", pair.server_if));
        assert_eq!(xsks.len(), 1);
        let mut xsk = xsks.pop().expect("one worker");
        assert_eq!(xsk.bind_mode(), BindMode::Copy, "veth has no zero-copy");
        assert_eq!(
            xsk.owned_queues(),
            [0, 1],
            "a single worker owns every queue"
        );
        assert_eq!(xsk.page_kind(), PageKind::Small);
        let sockets: Vec<_> = xsk.sockets().map(|(q, fd)| (q, fd.as_raw_fd())).collect();
        assert_eq!(sockets.len(), 2);
        assert_eq!((sockets[0].0, sockets[1].0), (0, 1), "one socket per queue");
        assert_ne!(sockets[0].1, sockets[1].1);

        let start = xsk.frames_accounted();
        assert_eq!(
            start,
            FrameAccount {
                free: 4096,
                fill: 0,
                held: 0,
                tx: 0,
                total: 4096,
                foreign: 0,
            }
        );
        // One idle turn fills each fill ring with its share: (4096 - 1024) / 2 = 1536, capped
        // at the ring size 1024.
        let mut stats = TurnStats::default();
        let got = xsk.turn(&mut stats, |_, _| {
            panic!("no frame can arrive without an XSKMAP entry")
        });
        assert_eq!(got, 0);
        let filled = xsk.frames_accounted();
        assert_eq!((filled.fill, filled.free), (2048, 2048), "{filled:?}");
        assert!(filled.all_home());
        assert_eq!(stats.fill_ran_dry, 0, "the first top-up is not a dry ring");
        assert!(!xsk.busy());
    });
}

/// Three workers on two queues: every worker has a socket on every queue, queue q's rings
/// belong to worker q % 3, and worker 2 owns none; the UMEM is cut into three ranges.
#[test]
fn every_worker_gets_a_socket_on_every_queue() {
    let pair = VethPair::new(2);
    pair.server.run_in(|| {
        let mut xsks = open(&pair.server_if, 2, 3, &settings(HugePages::Off))
            .unwrap_or_else(|err| panic!("AF_XDP on {}: {err}", pair.server_if));
        assert_eq!(xsks.len(), 3);
        let mut fds = HashSet::new();
        for (worker, xsk) in xsks.iter().enumerate() {
            assert_eq!(xsk.worker(), worker);
            let queues: Vec<u32> = xsk.sockets().map(|(q, _)| q).collect();
            assert_eq!(queues, [0, 1], "worker {worker}: one socket per queue");
            fds.extend(xsk.sockets().map(|(_, fd)| fd.as_raw_fd()));
            assert_eq!(xsk.frames_accounted().total, 4096);
        }
        assert_eq!(fds.len(), 6, "six distinct sockets");
        assert_eq!(xsks[0].owned_queues(), [0]);
        assert_eq!(xsks[1].owned_queues(), [1]);
        assert!(xsks[2].owned_queues().is_empty());
        let mut stats = TurnStats::default();
        for xsk in &mut xsks {
            xsk.turn(&mut stats, |_, _| panic!("nothing is registered"));
        }
        // Owners fill their queue's ring with min(1024, 4096 - 1024) frames of their own range;
        // worker 2 keeps all of its frames free for building.
        let fill: Vec<u32> = xsks.iter().map(|x| x.frames_accounted().fill).collect();
        assert_eq!(fill, [1024, 1024, 0]);
    });
}

#[test]
fn a_second_umem_on_a_bound_queue_is_refused() {
    // The kernel keeps one UMEM and one fill/completion ring pair per (device, queue): this is
    // why the workers of an interface share one UMEM (see the module docs).
    let pair = VethPair::new(1);
    pair.server.run_in(|| {
        let _first = open(&pair.server_if, 1, 1, &settings(HugePages::Off)).expect("first UMEM");
        let err = open(&pair.server_if, 1, 1, &settings(HugePages::Off))
            .expect_err("a second UMEM on queue 0 must be refused");
        match &err {
            XskError::Setup { source, .. } => {
                assert_eq!(source.raw_os_error(), Some(libc::EBUSY), "{err}")
            }
            other => panic!("expected a bind error, got {other:?}"),
        }
    });
}

#[test]
fn unknown_interface_is_named() {
    let pair = VethPair::new(1);
    let err = pair
        .server
        .run_in(|| open("nosuchif0", 1, 1, &settings(HugePages::Off)).map(|_| ()))
        .expect_err("binding to a missing interface must fail");
    assert!(
        matches!(&err, XskError::UnknownInterface { interface } if interface == "nosuchif0"),
        "{err:?}"
    );
}

/// Sends `count` frames from the server end through both sockets (frames built in UMEM frames
/// from the free list) and checks that the client end receives every one and that every frame
/// is back home afterwards. Returns the page kind the UMEM used.
fn transmit_and_account(hugepages: HugePages, count: u32) -> PageKind {
    let pair = VethPair::new(2);
    let client = pair.client_socket();
    let template = TcpFrame {
        src_mac: pair.server_mac,
        dst_mac: pair.client_mac,
        src: SERVER_IP,
        dst: CLIENT_IP,
        sport: 443,
        dport: 40000,
        seq: 0,
        flags: ACK,
    };
    let receiver = std::thread::spawn(move || {
        let mut seen = HashSet::new();
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.len() < count as usize && Instant::now() < deadline {
            let Some(n) = client.recv(&mut buf, Duration::from_millis(200)) else {
                continue;
            };
            // Our frames: IPv4/TCP from the server address, sequence number = frame number.
            if n == 54 && buf[26..30] == SERVER_IP.octets() {
                seen.insert(u32::from_be_bytes([buf[38], buf[39], buf[40], buf[41]]));
            }
        }
        seen
    });
    let (kind, account, stats) = pair.server.run_in(|| {
        let mut xsk = open(&pair.server_if, 2, 1, &settings(hugepages))
            .unwrap_or_else(|err| panic!("AF_XDP on {}: {err}", pair.server_if))
            .pop()
            .expect("one worker");
        if xsk.page_kind() == PageKind::Huge {
            let kb = kernel_page_kb(xsk.shared.memory.base() as usize);
            assert_eq!(kb, 2048, "a hugepage UMEM must be backed by 2 MiB pages");
        }
        let mut stats = TurnStats::default();
        let mut next = 0u32;
        while next < count {
            let index = (next / BATCH) as usize % 2;
            xsk.send_with(index, &mut stats, |out| {
                for _ in 0..BATCH.min(count - next) {
                    let mut frame = out.alloc().expect("the free list has room for a batch");
                    let bytes = TcpFrame {
                        seq: next,
                        ..template
                    }
                    .build();
                    out.buffer(&mut frame)[..bytes.len()].copy_from_slice(&bytes);
                    out.send(frame, bytes.len());
                    next += 1;
                }
            });
        }
        assert!(
            xsk.quiesce(Duration::from_secs(5)),
            "transmissions did not complete: {:?}",
            xsk.frames_accounted()
        );
        (xsk.page_kind(), xsk.frames_accounted(), stats)
    });
    let seen = receiver.join().expect("receiver thread");
    assert_eq!(
        seen.len(),
        count as usize,
        "the peer received {} of {count} frames ({stats:?})",
        seen.len()
    );
    assert_eq!(stats.tx, u64::from(count), "{stats:?}");
    assert_eq!(stats.tx_ring_full, 0, "{stats:?}");
    assert!(
        stats.wakeups >= u64::from(count / BATCH),
        "copy mode needs a kick per batch: {stats:?}"
    );
    assert!(
        stats.wakeups <= u64::from(count),
        "no syscall per packet: {stats:?}"
    );
    assert!(account.all_home(), "frames not home: {account:?}");
    kind
}

/// The page size backing `addr` in this process, from /proc/self/smaps (kB).
fn kernel_page_kb(addr: usize) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((start, end)) = range.split_once('-') {
                if let (Ok(start), Ok(end)) = (
                    usize::from_str_radix(start, 16),
                    usize::from_str_radix(end, 16),
                ) {
                    inside = (start..end).contains(&addr);
                    continue;
                }
            }
        }
        if inside {
            if let Some(rest) = line.strip_prefix("KernelPageSize:") {
                let kb = rest.trim().trim_end_matches("kB").trim();
                return kb.parse().expect("KernelPageSize value");
            }
        }
    }
    panic!("no mapping contains {addr:#x}");
}

#[test]
fn small_page_umem_transmits_and_accounts_every_frame() {
    assert_eq!(transmit_and_account(HugePages::Off, 5000), PageKind::Small);
}

/// Restores the 2 MiB pool to its size at creation, also on panic. Declared before the UMEM so
/// the pages are in use no more when it runs.
struct PoolRestore(u64);

impl Drop for PoolRestore {
    fn drop(&mut self) {
        // The kernel unpins a UMEM's pages in a deferred work item after its last socket is
        // released; pages still pinned keep the pool from shrinking. Write again until the
        // pool is back (bounded).
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut tries = 0;
        loop {
            tries += 1;
            if let Err(err) = umem::set_pool_size(self.0) {
                eprintln!("cannot restore nr_hugepages to {}: {err}", self.0);
                return;
            }
            if umem::pool_size().ok() == Some(self.0) || Instant::now() > deadline {
                eprintln!("nr_hugepages restored to {} after {tries} writes", self.0);
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[test]
fn hugepage_umem_transmits_and_the_pool_is_restored() {
    let before = umem::pool_size().expect("reading the 2 MiB pool");
    {
        let _restore = PoolRestore(before);
        // `require` grows the pool by the shortfall itself (root may write nr_hugepages).
        assert_eq!(
            transmit_and_account(HugePages::Require, 5000),
            PageKind::Huge
        );
    }
    assert_eq!(
        umem::pool_size().expect("reading the 2 MiB pool"),
        before,
        "the test must leave vm.nr_hugepages as it found it"
    );
}

/// With deferred kicks, sending leaves the descriptors on the TX ring and names the socket in
/// `kicks_wanted` (copy mode always asks for a wakeup); a zero-length send on that fd, as the
/// L4 proxy issues through its io_uring, transmits them.
#[test]
fn deferred_kicks_name_the_socket_and_a_send_transmits() {
    let pair = VethPair::new(1);
    let client = pair.client_socket();
    const COUNT: u32 = 16;
    let template = TcpFrame {
        src_mac: pair.server_mac,
        dst_mac: pair.client_mac,
        src: SERVER_IP,
        dst: CLIENT_IP,
        sport: 443,
        dport: 40001,
        seq: 0,
        flags: ACK,
    };
    let receiver = std::thread::spawn(move || {
        let mut seen = 0u32;
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen < COUNT && Instant::now() < deadline {
            if let Some(n) = client.recv(&mut buf, Duration::from_millis(200)) {
                if n == 54 && buf[26..30] == SERVER_IP.octets() {
                    seen += 1;
                }
            }
        }
        seen
    });
    pair.server.run_in(|| {
        let mut xsk = open(&pair.server_if, 1, 1, &settings(HugePages::Off))
            .unwrap_or_else(|err| panic!("AF_XDP on {}: {err}", pair.server_if))
            .pop()
            .expect("one worker");
        xsk.set_deferred_kicks(true);
        let mut stats = TurnStats::default();
        xsk.send_with(0, &mut stats, |out| {
            for seq in 0..COUNT {
                let mut frame = out.alloc().expect("free frames");
                let bytes = TcpFrame { seq, ..template }.build();
                out.buffer(&mut frame)[..bytes.len()].copy_from_slice(&bytes);
                out.send(frame, bytes.len());
            }
        });
        assert_eq!(stats.wakeups, 0, "no sendto of its own: {stats:?}");
        let wanted: Vec<RawFd> = xsk.kicks_wanted().collect();
        assert_eq!(wanted.len(), 1, "the one socket waits for its kick");
        // SAFETY: a zero-length sendto on the AF_XDP socket, its documented TX wakeup.
        let rc = unsafe {
            libc::sendto(
                wanted[0],
                std::ptr::null(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null(),
                0,
            )
        };
        assert!(rc >= 0, "kick: {}", std::io::Error::last_os_error());
        assert_eq!(
            xsk.kicks_wanted().count(),
            0,
            "copy mode transmitted everything in the kick"
        );
        assert!(xsk.quiesce(Duration::from_secs(5)), "frames came home");
    });
    assert_eq!(
        receiver.join().expect("receiver"),
        COUNT,
        "the peer got every frame"
    );
}

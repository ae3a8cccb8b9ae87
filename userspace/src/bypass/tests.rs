//! Bypass workers end to end: the real XDP program on a 2-queue veth (server namespace) steers
//! the listener's frames into two workers' AF_XDP sockets; frames are injected and captured raw
//! on the client end (AF_PACKET). Plus unit tests of the header parsing, classification and
//! reflection. Needs root.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::*;
use crate::bypass::xdp::{self, XdpCounters};
use crate::config::{HugePages, XdpAttach};
use crate::testnet::{pin_current_thread, TcpFrame, VethPair, ACK, SYN};

const LISTEN_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 1);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 2);
const LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(LISTEN_IP, 443));
const WORKERS: usize = 2;

fn settings() -> XdpSettings {
    XdpSettings {
        frame_size: 2048,
        frames_per_worker: 4096,
        rx_ring: 1024,
        tx_ring: 1024,
        fill_ring: 1024,
        completion_ring: 1024,
        idle_spin: Duration::from_micros(200),
        spin: crate::config::SpinMode::Adaptive,
        hugepages: HugePages::Off,
        syn_rate_per_source: 0,
        syn_burst_per_source: 32,
        unknown_rate_per_source: 0,
        unknown_burst_per_source: 64,
        syn_cookies: crate::config::SynCookies::Worker,
    }
}

/// The XDP program plus two bypass workers on the server end of a 2-queue veth pair. Drop
/// stops and joins the workers (also on panic) before the program detaches and the namespaces
/// go. Field order is drop order.
struct Bench {
    workers: Vec<BypassWorker>,
    shutdown: Arc<Shutdown>,
    program: XdpProgram,
    pair: VethPair,
}

impl Bench {
    fn start<H, F>(make: F) -> Bench
    where
        H: FrameHandler + Send + 'static,
        F: Fn(Arc<BypassCounters>) -> H + Sync,
    {
        let pair = VethPair::new(WORKERS as u32);
        let program = pair
            .server
            .run_in(|| xdp::attach(&pair.server_if, XdpAttach::Native))
            .unwrap_or_else(|err| panic!("attaching XDP: {err}"));
        program.set_listeners(&[LISTEN]).expect("listen map");
        let shutdown = Arc::new(Shutdown::default());
        let setup = BypassSetup {
            interface: pair.server_if.clone(),
            queues: WORKERS as u32,
            workers: WORKERS,
            cpus: Vec::new(),
            settings: settings(),
            shutdown: shutdown.clone(),
            drain_timeout: Duration::from_secs(1),
        };
        let workers = pair
            .server
            .run_in(|| start(&setup, &program, |_, counters| make(counters)))
            .unwrap_or_else(|err| panic!("starting the workers: {err}"));
        assert_eq!(program.workers(), WORKERS as u32, "steering is on");
        Bench {
            workers,
            shutdown,
            program,
            pair,
        }
    }

    fn totals(&self) -> BypassSnapshot {
        let mut total = BypassSnapshot::default();
        for worker in &self.workers {
            total += worker.counters().snapshot();
        }
        total
    }

    fn xdp(&self) -> XdpCounters {
        self.program.counters().expect("XDP counters")
    }

    /// Waits (bounded) until the workers have received `frames` frames in total.
    #[track_caller]
    fn wait_rx(&self, frames: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.totals().rx_frames < frames {
            assert!(
                Instant::now() < deadline,
                "workers received {} of {frames} frames; xdp {:?}",
                self.totals().rx_frames,
                self.xdp()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stops and joins the workers; their exit reports, in worker order.
    fn finish(&mut self) -> Vec<BypassExit> {
        stop(&self.shutdown, &self.workers);
        self.workers
            .drain(..)
            .map(|w| {
                let id = w.id();
                w.join()
                    .unwrap_or_else(|err| panic!("worker {id} failed: {err}"))
            })
            .collect()
    }

    fn frame(&self, sport: u16, dport: u16, seq: u32, flags: u8) -> Vec<u8> {
        TcpFrame {
            src_mac: self.pair.client_mac,
            dst_mac: self.pair.server_mac,
            src: CLIENT_IP,
            dst: LISTEN_IP,
            sport,
            dport,
            seq,
            flags,
        }
        .build()
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        stop(&self.shutdown, &self.workers);
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

#[track_caller]
fn assert_home(exits: &[BypassExit]) {
    for exit in exits {
        assert!(
            exit.quiesced,
            "worker {} did not quiesce: {exit:?}",
            exit.worker
        );
        assert!(
            exit.frames.all_home(),
            "worker {}: frames not home: {:?}",
            exit.worker,
            exit.frames
        );
        assert_eq!(exit.bind_mode, BindMode::Copy, "veth binds in copy mode");
        assert_eq!(exit.page_kind, PageKind::Small);
        let kernel = exit.kernel.expect("XDP_STATISTICS");
        assert_eq!(
            (
                kernel.rx_dropped,
                kernel.rx_ring_full,
                kernel.rx_invalid_descs
            ),
            (0, 0, 0),
            "worker {}: the kernel dropped frames: {kernel:?}",
            exit.worker
        );
    }
}

#[test]
fn every_frame_comes_home_after_a_run_of_syns() {
    const SYNS: u32 = 20_000;
    const ACKS: u32 = 300;
    const OTHER_PORT: u32 = 300;
    const BURST: u32 = 500;
    let mut bench = Bench::start(|counters| Classifier::new(vec![LISTEN], counters));
    let client = bench.pair.client_socket();
    let mut sent = 0u32;
    while sent < SYNS {
        for _ in 0..BURST {
            // Distinct source ports: distinct flows, spread over queues and workers.
            let sport = 1024 + (sent % 60_000) as u16;
            client.send(&bench.frame(sport, 443, sent, SYN));
            sent += 1;
        }
        // Paced by the workers: a burst never exceeds a socket's RX or fill ring, so nothing
        // may be dropped and the counts below are exact.
        bench.wait_rx(u64::from(sent));
    }
    for n in 0..ACKS {
        client.send(&bench.frame(2000 + n as u16, 443, n, ACK));
    }
    // Not a listener: passed to the (address-less) kernel, never seen by a worker.
    for n in 0..OTHER_PORT {
        client.send(&bench.frame(3000 + n as u16, 444, n, SYN));
    }
    bench.wait_rx(u64::from(SYNS + ACKS));

    let xdp = bench.xdp();
    let totals = bench.totals();
    assert_eq!(
        xdp.steered,
        u64::from(SYNS + ACKS),
        "steered by the program: {xdp:?}"
    );
    assert_eq!(
        totals.rx_frames, xdp.steered,
        "every steered frame was received: {totals:?}"
    );
    assert_eq!(
        (totals.syns, totals.other_tcp, totals.non_tcp),
        (u64::from(SYNS), u64::from(ACKS), 0),
        "{totals:?}"
    );
    assert!(
        xdp.passed >= u64::from(OTHER_PORT),
        "the other port passes: {xdp:?}"
    );
    assert_eq!(xdp.no_socket, 0, "{xdp:?}");
    for worker in &bench.workers {
        let own = worker.counters().snapshot();
        assert!(
            own.rx_frames > 0,
            "worker {} got no flow: {own:?}",
            worker.id()
        );
        // Flows of the other worker arrive on this worker's queue too: their frames came
        // from this worker's fill ring and went home through the return ring.
        assert!(
            own.returned > 0,
            "worker {}: no frame came home: {own:?}",
            worker.id()
        );
    }

    let exits = bench.finish();
    assert_home(&exits);
    for q in 0..WORKERS {
        let on_queue: u64 = exits.iter().map(|e| e.rx_per_queue[q]).sum();
        assert!(on_queue > 0, "no frame arrived on queue {q}: {exits:?}");
    }
    let per_worker: u64 = exits.iter().flat_map(|e| e.rx_per_queue.iter()).sum();
    assert_eq!(per_worker, totals.rx_frames);
}

/// Reflected frames seen on the client end, keyed by destination port (= the port sent from).
fn reflect_run(mode: ReflectMode, frames: u32) {
    const BURST: u32 = 500;
    let mut bench = Bench::start(move |_| Reflector::new(mode));
    let client = bench.pair.client_socket();
    let received = AtomicUsize::new(0);
    let bad = Mutex::new(Vec::new());
    let (client_mac, server_mac) = (bench.pair.client_mac, bench.pair.server_mac);
    let started = Instant::now();
    let (seen, last) = std::thread::scope(|scope| {
        let receiver = scope.spawn(|| {
            let mut seen = HashSet::new();
            let mut buf = [0u8; 2048];
            let mut last = Instant::now();
            let deadline = Instant::now() + Duration::from_secs(30);
            while seen.len() < frames as usize && Instant::now() < deadline {
                let Some(n) = client.recv(&mut buf, Duration::from_millis(100)) else {
                    continue;
                };
                let f = &buf[..n];
                // Swapped: to the client's MAC from the server's, from the listener to the
                // client, source port 443, destination port = the port it was sent from.
                let ok = n == 54
                    && f[0..6] == client_mac
                    && f[6..12] == server_mac
                    && f[26..30] == LISTEN_IP.octets()
                    && f[30..34] == CLIENT_IP.octets()
                    && f[34..36] == 443u16.to_be_bytes()
                    && f[47] == SYN;
                if !ok {
                    bad.lock().expect("lock").push(f.to_vec());
                    continue;
                }
                seen.insert(u16::from_be_bytes([f[36], f[37]]));
                last = Instant::now();
                received.store(seen.len(), Ordering::Relaxed);
            }
            (seen, last)
        });
        let mut sent = 0u32;
        while sent < frames {
            for _ in 0..BURST.min(frames - sent) {
                client.send(&bench.frame(1024 + sent as u16, 443, sent, SYN));
                sent += 1;
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while received.load(Ordering::Relaxed) < sent as usize && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        receiver.join().expect("receiver thread")
    });
    let elapsed = last.duration_since(started);
    let totals = bench.totals();
    let bad = bad.into_inner().expect("lock");
    assert!(
        bad.is_empty(),
        "{} frames not reflected as expected: {:02x?}",
        bad.len(),
        bad.first()
    );
    assert_eq!(
        seen.len(),
        frames as usize,
        "reflected frames back at the client ({totals:?})"
    );
    assert_eq!(totals.rx_frames, u64::from(frames), "{totals:?}");
    assert_eq!(totals.tx_frames, u64::from(frames), "{totals:?}");
    assert_eq!(
        totals.tx_ring_full + totals.tx_alloc_failed,
        0,
        "{totals:?}"
    );
    eprintln!(
        "reflector ({mode:?}): {frames} frames in {elapsed:?} = {:.0} frames/s round trip \
         (paced in bursts of {BURST}; kicks {})",
        f64::from(frames) / elapsed.as_secs_f64(),
        totals.wakeups
    );
    let exits = bench.finish();
    assert_home(&exits);
}

#[test]
fn reflector_sends_every_frame_back_swapped() {
    reflect_run(ReflectMode::InPlace, 20_000);
}

#[test]
fn copying_reflector_builds_frames_from_the_pool() {
    reflect_run(ReflectMode::Copy, 5_000);
}

/// One 4-tuple sent from two CPUs: with PACKET_QDISC_BYPASS, AF_PACKET picks the TX queue as
/// `cpu % real_num_tx_queues` (`packet_pick_tx_queue` records the CPU as the skb's queue hint,
/// veth has no `ndo_select_queue` and no XPS map, so `skb_tx_hash` returns the hint), and veth
/// delivers TX queue `q` to the peer's RX queue `q`. So the flow arrives on both queues, as a
/// flow does on a real NIC when veth rehashes it after an RTO.
#[test]
fn a_flow_on_two_queues_reaches_one_worker() {
    const PER_CPU: u32 = 1000;
    let cpus = core_affinity::get_core_ids().unwrap_or_default();
    assert!(
        cpus.len() >= 2,
        "needs two CPUs to send from two queues: {cpus:?}"
    );
    let mut bench = Bench::start(|counters| Classifier::new(vec![LISTEN], counters));
    let client = bench.pair.client_socket();
    client.set_int(libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, 1);
    let (sport, dport) = (40_000u16, 443u16);
    std::thread::scope(|scope| {
        for cpu in [cpus[0].id, cpus[1].id] {
            let (client, bench) = (&client, &bench);
            scope.spawn(move || {
                pin_current_thread(cpu);
                for n in 0..PER_CPU {
                    client.send(&bench.frame(sport, dport, n, ACK));
                    if n % 200 == 199 {
                        // Pace so the shared socket's queue keeps up.
                        std::thread::yield_now();
                    }
                }
            });
        }
    });
    bench.wait_rx(u64::from(2 * PER_CPU));
    let key = bench.program.steer_key();
    let exits = bench.finish();
    assert_home(&exits);

    let hash = tern_common::flow_hash(
        &key,
        &tern_common::ipv4_mapped(CLIENT_IP.octets()),
        &tern_common::ipv4_mapped(LISTEN_IP.octets()),
        sport,
        dport,
    );
    let owner = tern_common::flow_worker(hash, WORKERS as u32) as usize;
    let on_owner = &exits[owner].rx_per_queue;
    assert!(
        on_owner.iter().all(|&n| n > 0),
        "the flow did not arrive on both queues: worker {owner} per queue {on_owner:?}"
    );
    assert_eq!(
        on_owner.iter().sum::<u64>(),
        u64::from(2 * PER_CPU),
        "worker {owner} (flow_hash % 2) must get every frame: {exits:?}"
    );
    for exit in exits.iter().filter(|e| e.worker != owner) {
        assert!(
            exit.rx_per_queue.iter().all(|&n| n == 0),
            "worker {} got frames of a flow it does not own: {exit:?}",
            exit.worker
        );
    }
}

/// utime + stime of one of our threads, in clock ticks.
fn thread_ticks(tid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).expect("stat");
    let after_comm = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 and 15 of the line; the slice starts at field 3.
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

#[test]
fn an_idle_worker_sleeps_and_wakes_for_frames() {
    let bench = Bench::start(|counters| Classifier::new(vec![LISTEN], counters));
    let worker = &bench.workers[0];
    let wait_sleeps = |at_least: u64| {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let s = worker.counters().snapshot();
            if s.sleeps >= at_least {
                return s;
            }
            assert!(Instant::now() < deadline, "the worker never slept: {s:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let first = wait_sleeps(3);
    let ticks = thread_ticks(worker.tid());
    let since = Instant::now();
    let idle = wait_sleeps(first.sleeps + 5);
    let idle_for = since.elapsed();
    let idle_ticks = thread_ticks(worker.tid()) - ticks;
    // Asleep, a worker wakes every SLEEP, runs one turn, finds nothing and sleeps again: one
    // turn per sleep. A spinning worker would run thousands.
    let turns = idle.busy_turns - first.busy_turns;
    let sleeps = idle.sleeps - first.sleeps;
    assert!(
        turns <= sleeps + 1,
        "{turns} turns for {sleeps} sleeps: the idle worker spins"
    );
    eprintln!(
        "idle worker: {sleeps} sleeps, {turns} turns, {idle_ticks} CPU ticks (1/100 s) in \
         {idle_for:?}"
    );

    // Frames wake it (poll on the XSK fds), and it goes back to sleep afterwards.
    let client = bench.pair.client_socket();
    for n in 0..100u32 {
        client.send(&bench.frame(5000 + n as u16, 443, n, SYN));
    }
    bench.wait_rx(100);
    let after = worker.counters().snapshot();
    wait_sleeps(after.sleeps + 2);
    // The eventfd wakes it too: a wake makes the next sleep return at once.
    let before_wake = worker.counters().snapshot();
    worker.waker().wake();
    wait_sleeps(before_wake.sleeps + 2);
}

// -----------------------------------------------------------------------------------------
// Parsing, classification and reflection on hand-made frames.

fn syn_to(port: u16) -> Vec<u8> {
    TcpFrame {
        src_mac: [2, 0, 0, 0, 0, 2],
        dst_mac: [2, 0, 0, 0, 0, 1],
        src: CLIENT_IP,
        dst: LISTEN_IP,
        sport: 1234,
        dport: port,
        seq: 1,
        flags: SYN,
    }
    .build()
}

fn vlan_tagged(frame: &[u8]) -> Vec<u8> {
    let mut tagged = frame[..12].to_vec();
    tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x07]);
    tagged.extend_from_slice(&frame[12..]);
    tagged
}

fn ipv6_syn(dst: [u8; 16], port: u16) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x86, 0xdd];
    f.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, IPPROTO_TCP, 64]);
    f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&1234u16.to_be_bytes());
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, SYN, 0xff, 0xff, 0, 0, 0, 0]);
    f
}

#[test]
fn classifies_by_listener_flags_and_family() {
    let listeners = [LISTEN, "[::]:8443".parse().expect("v6 wildcard")];
    assert_eq!(classify(&syn_to(443), &listeners), Class::ListenerSyn);
    assert_eq!(
        classify(&vlan_tagged(&syn_to(443)), &listeners),
        Class::ListenerSyn
    );
    assert_eq!(classify(&syn_to(444), &listeners), Class::OtherTcp);
    let mut syn_ack = syn_to(443);
    syn_ack[47] = SYN | ACK;
    assert_eq!(classify(&syn_ack, &listeners), Class::OtherTcp);
    let v6 = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    assert_eq!(
        classify(&ipv6_syn(v6, 8443), &listeners),
        Class::ListenerSyn
    );
    assert_eq!(classify(&ipv6_syn(v6, 443), &listeners), Class::OtherTcp);

    let mut fragment = syn_to(443);
    fragment[20] = 0x20; // MF
    assert_eq!(classify(&fragment, &listeners), Class::NonTcp);
    let mut udp = syn_to(443);
    udp[23] = IPPROTO_UDP;
    assert_eq!(classify(&udp, &listeners), Class::NonTcp);
    assert_eq!(classify(&syn_to(443)[..40], &listeners), Class::NonTcp);
    let mut arp = syn_to(443);
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    assert_eq!(classify(&arp, &listeners), Class::NonTcp);
    assert_eq!(classify(&[0u8; 10], &listeners), Class::NonTcp);
    let mut options = syn_to(443);
    options[14] = 0x4f; // 60-byte header that is not there
    assert_eq!(headers(&options), None);
}

#[test]
fn reflection_swaps_every_layer_and_keeps_checksums() {
    let original = syn_to(443);
    let mut f = original.clone();
    assert!(reflect(&mut f));
    assert_eq!(f[0..6], original[6..12]);
    assert_eq!(f[6..12], original[0..6]);
    assert_eq!(f[26..30], original[30..34]);
    assert_eq!(f[30..34], original[26..30]);
    assert_eq!(f[34..36], original[36..38]);
    assert_eq!(f[36..38], original[34..36]);
    // The checksums are sums of 16-bit words; swapping words keeps them.
    let rebuilt = TcpFrame {
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [2, 0, 0, 0, 0, 2],
        src: LISTEN_IP,
        dst: CLIENT_IP,
        sport: 443,
        dport: 1234,
        seq: 1,
        flags: SYN,
    }
    .build();
    assert_eq!(
        f, rebuilt,
        "a reflected frame equals one built the other way round"
    );
    assert!(reflect(&mut f));
    assert_eq!(f, original, "reflecting twice is the identity");

    let v6 = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let original = vlan_tagged(&ipv6_syn(v6, 8443));
    let mut f = original.clone();
    assert!(reflect(&mut f));
    assert_eq!(f[26..42], original[42..58], "IPv6 source <- destination");
    assert_eq!(f[58..60], original[60..62], "ports swapped");
    let mut arp = syn_to(443);
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    let before = arp.clone();
    assert!(!reflect(&mut arp));
    assert_eq!(arp, before, "non-IP frames are left alone");
}

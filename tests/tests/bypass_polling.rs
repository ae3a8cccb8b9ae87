//! End-to-end tests of the bypass workers' time accounting and polling policy (architecture.md,
//! "The polling policy"): every worker splits its time into turns that did work (`work_ns`),
//! turns that only polled (`spin_ns`) and sleeps (`sleep_ns`, with their thread CPU in
//! `sleep_cpu_ns`), and spins at most `xdp.idle_spin_us` per sleep when nothing arrives.
//!
//! What is checked is accounting, never speed: traffic is counted as work; the three parts add
//! up to the wall time between two reads (within one turn or sleep at either end); sleeping
//! costs less CPU than it lasts; an idle worker's spin grows by at most the cap per sleep, under
//! both `xdp.spin` modes. The rig: the veth pair in its own namespaces, an echo backend, tern's
//! plain (L4) bypass listener; every wait is bounded.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use support::*;
use tern_tests::backend::Backend;

const PORT: u16 = 4443;
/// `xdp.idle_spin_us` in these tests.
const CAP: Duration = Duration::from_micros(200);
/// What a turn or a sleep in progress at a stats read may leave uncounted (a sleep lasts at
/// most 100 ms, rounded up to whole ms), with room for a busy machine's scheduling delays.
const EDGE: Duration = Duration::from_millis(400);

/// The rig (2 queues), an echo backend, and tern with the bypass L4 listener on :4443 (and the
/// kernel TLS listener on :443 for readiness), 2 workers, `xdp.spin = spin`.
fn stack(tag: &str, spin: &str) -> (Stack, Backend) {
    let (rig, dir) = (
        tern_tests::rig::Rig::isolated(tag, 2),
        tern_tests::rig::TempDir::new(tag),
    );
    let backend = Backend::echo(server_listener(&rig));
    let toml_extra = format!(
        "[xdp]\nhugepages = \"off\"\nframes_per_worker = 8192\nidle_spin_us = {}\nspin = \"{spin}\"\n",
        CAP.as_micros()
    );
    let s = Stack::with_bypass_listener(rig, dir, PORT, false, vec![backend.addr()], &toml_extra);
    (s, backend)
}

/// Each bypass worker's counter `name`, in worker order.
fn per_worker(st: &serde_json::Value, name: &str) -> Vec<u64> {
    let mut workers: Vec<&serde_json::Value> = st["bypass"]["workers"]
        .as_array()
        .unwrap_or_else(|| panic!("no bypass workers: {st}"))
        .iter()
        .collect();
    workers.sort_by_key(|w| (w["interface"].to_string(), w["worker"].as_u64()));
    workers
        .iter()
        .map(|w| {
            w["counters"][name]
                .as_u64()
                .unwrap_or_else(|| panic!("no counter {name}: {w}"))
        })
        .collect()
}

/// Per worker, `name` at `b` minus at `a`.
fn grew(a: &serde_json::Value, b: &serde_json::Value, name: &str) -> Vec<u64> {
    per_worker(b, name)
        .iter()
        .zip(per_worker(a, name))
        .map(|(b, a)| {
            b.checked_sub(a)
                .unwrap_or_else(|| panic!("{name} went back"))
        })
        .collect()
}

/// `rounds` echo round trips on one connection through the L4 listener, then a clean close.
fn echo(s: &Stack, rounds: u32) {
    let addr: SocketAddr = s.rig.server_addr(PORT);
    s.rig.client.run(move || {
        let mut c = connect_guarded(addr);
        for round in 0..rounds {
            let msg = format!("round {round}");
            c.write_all(msg.as_bytes()).expect("write");
            let mut back = vec![0u8; msg.len()];
            c.read_exact(&mut back).expect("read echo");
            assert_eq!(back, msg.as_bytes());
        }
        c.shutdown(Shutdown::Write).expect("half-close");
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).expect("FIN");
    });
}

/// Work, spin and sleep of every worker add up to the wall time between two reads.
fn assert_adds_up(a: &serde_json::Value, b: &serde_json::Value, wall: Duration) {
    let (work, spin, sleep) = (
        grew(a, b, "work_ns"),
        grew(a, b, "spin_ns"),
        grew(a, b, "sleep_ns"),
    );
    for w in 0..work.len() {
        let sum = Duration::from_nanos(work[w] + spin[w] + sleep[w]);
        assert!(
            sum + EDGE >= wall && sum <= wall + EDGE,
            "worker {w}: work {} + spin {} + sleep {} ns = {sum:?}, against {wall:?} of wall time",
            work[w],
            spin[w],
            sleep[w]
        );
    }
}

/// Traffic is counted as work, the parts add up, and with no traffic for 1 s a worker spins
/// at most the cap per sleep.
fn accounting(tag: &str, spin: &str) {
    let (s, _backend) = stack(tag, spin);
    let (before, t0) = (s.stats(), Instant::now());
    echo(&s, 200);
    wait_stats(&s, "the connection to close", |st| {
        st["bypass"]["proxy"]["closed"].as_u64() == Some(1)
    });
    // Let the close's last segments and timers settle before the idle window.
    std::thread::sleep(Duration::from_millis(300));
    let (idle_start, t1) = (s.stats(), Instant::now());
    assert_adds_up(&before, &idle_start, t1 - t0);
    let work: u64 = grew(&before, &idle_start, "work_ns").iter().sum();
    let rx: u64 = grew(&before, &idle_start, "rx_frames").iter().sum();
    assert!(rx >= 200, "{rx} frames for 200 round trips");
    assert!(work > 0, "{rx} frames received and no work counted");

    std::thread::sleep(Duration::from_secs(1));
    let (idle_end, t2) = (s.stats(), Instant::now());
    assert_adds_up(&idle_start, &idle_end, t2 - t1);
    let (spun, sleeps, slept, sleep_cpu) = (
        grew(&idle_start, &idle_end, "spin_ns"),
        grew(&idle_start, &idle_end, "sleeps"),
        grew(&idle_start, &idle_end, "sleep_ns"),
        grew(&idle_start, &idle_end, "sleep_cpu_ns"),
    );
    for w in 0..spun.len() {
        // One wake-up per 100 ms at the most when idle, each followed by at most one spin.
        assert!(
            sleeps[w] >= 2,
            "worker {w}: {} sleeps in 1 s idle",
            sleeps[w]
        );
        let bound = CAP * (sleeps[w] as u32 + 1) + Duration::from_millis(20);
        assert!(
            Duration::from_nanos(spun[w]) <= bound,
            "worker {w}: spun {} ns over {} sleeps in 1 s idle (cap {CAP:?} per sleep)",
            spun[w],
            sleeps[w]
        );
        assert!(
            sleep_cpu[w] > 0 && sleep_cpu[w] <= slept[w],
            "worker {w}: {} ns of CPU in {} ns of sleep",
            sleep_cpu[w],
            slept[w]
        );
    }
}

#[test]
fn adaptive_workers_count_work_spin_and_sleep() {
    accounting("pollad", "adaptive");
}

#[test]
fn fixed_spin_is_bounded_by_the_cap_per_sleep_too() {
    accounting("pollfx", "fixed");
}

//! [`Backends`] under explicit time, without a ring: choice (weighted round-robin,
//! least-connections), failover, health (fall, rise, back-off, all down) and reconfigure.
//! Probes are driven through [`Backends::probe_done`] (what a probe's completion reports);
//! the ring side of probes is covered end to end (tests/tests/health.rs).

use std::net::{Ipv4Addr, Ipv6Addr};

use super::*;
use crate::config::{Backend, ConnectPolicy, ProxyProtocol};

fn addr(i: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9000 + i))
}

/// A pool config: `weights[i]` for server `addr(i)`.
fn config(weights: &[u32], balance: Balance, interval_ms: Option<u64>) -> Backend {
    Backend {
        servers: weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| BackendServer {
                address: addr(i as u16),
                weight,
            })
            .collect(),
        connect_timeout: std::time::Duration::from_secs(3),
        connect: ConnectPolicy::FirstByte,
        proxy_protocol: ProxyProtocol::None,
        balance,
        health: HealthCheck {
            interval: interval_ms.map(std::time::Duration::from_millis),
            timeout: std::time::Duration::from_secs(1),
            fall: 1,
            rise: 1,
        },
    }
}

fn pool(n: u16, worker: usize) -> Backends {
    Backends::new((0..n).map(addr).collect(), worker)
}

const T0: Instant = Instant::from_secs(100);

fn at_ms(ms: u64) -> Instant {
    T0 + Duration::from_millis(ms)
}

/// Whether a probe of `server` would start at `now`.
fn probe_due(b: &Backends, server: usize, now: Instant) -> bool {
    let s = &b.slots[server];
    !s.retired && s.probe.is_none() && s.next_probe.is_some_and(|t| now >= t)
}

/// What starting the due probes does to the plan, without a ring: each due probe is marked
/// started (its next probe unplanned until it completes).
fn start_due_probes(b: &mut Backends, now: Instant) -> Vec<usize> {
    let due: Vec<usize> = (0..b.len()).filter(|&s| probe_due(b, s, now)).collect();
    for &s in &due {
        b.slots[s].next_probe = None;
    }
    due
}

fn is_up(b: &Backends, server: usize) -> bool {
    b.slots[server].state == State::Up
}

#[test]
fn pick_is_round_robin_from_the_worker_s_position() {
    let c = WorkerCounters::default();
    let mut b = pool(3, 0);
    let picks: Vec<Option<usize>> = (0..4).map(|_| b.pick(T0, &c)).collect();
    assert_eq!(picks, [Some(0), Some(1), Some(2), Some(0)]);
    let mut b = pool(3, 4);
    assert_eq!(b.pick(T0, &c), Some(1), "worker 4 starts at 4 % 3");
    assert_eq!(c.backend_skipped_down.get(), 0);
}

#[test]
fn weighted_round_robin_is_exact_over_a_cycle_and_spread_out() {
    let c = WorkerCounters::default();
    let mut b = Backends::from_config(
        &config(&[5, 1, 1], Balance::RoundRobin, None),
        0,
        &Board::default(),
    );
    let picks: Vec<usize> = (0..7).flat_map(|_| b.pick(T0, &c)).collect();
    // nginx's smooth weighted round-robin for {a:5, b:1, c:1}: a a b a c a a.
    assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
    // Exact shares over any number of whole cycles, from any worker's position.
    for worker in 0..4 {
        let mut b = Backends::from_config(
            &config(&[3, 2, 1, 4], Balance::RoundRobin, None),
            worker,
            &Board::default(),
        );
        let mut n = [0usize; 4];
        for _ in 0..10 * 3 {
            n[b.pick(T0, &c).expect("all up")] += 1;
        }
        assert_eq!(n, [9, 6, 3, 12], "worker {worker}");
    }
}

#[test]
fn a_down_server_gets_no_share_and_the_others_keep_their_ratio() {
    let c = WorkerCounters::default();
    let mut b = Backends::from_config(
        &config(&[2, 1, 1], Balance::RoundRobin, None),
        0,
        &Board::default(),
    );
    b.down(0, false, libc::ECONNREFUSED, T0);
    let mut n = [0usize; 3];
    for _ in 0..10 {
        n[b.pick(T0, &c).expect("two are up")] += 1;
    }
    assert_eq!(n, [0, 5, 5]);
    assert_eq!(
        c.backend_skipped_down.get(),
        10,
        "one down server passed per pick"
    );
}

#[test]
fn least_connections_counts_holds_per_weight_and_breaks_ties_round_robin() {
    let c = WorkerCounters::default();
    let mut b = Backends::from_config(
        &config(&[1, 1, 2], Balance::LeastConnections, None),
        0,
        &Board::default(),
    );
    // All at 0: ties go round-robin from the worker's position.
    assert_eq!(b.pick(T0, &c), Some(0));
    assert_eq!(b.pick(T0, &c), Some(1));
    assert_eq!(b.pick(T0, &c), Some(2));
    // 0: 1/1, 1: 1/1, 2: 1/2: server 2 has room for one more at the same load.
    assert_eq!(b.pick(T0, &c), Some(2));
    // Now 1/1 each: a tie, round-robin after 2.
    assert_eq!(b.pick(T0, &c), Some(0));
    b.release(0);
    b.release(0);
    assert_eq!(b.pick(T0, &c), Some(0), "0 is empty again");
    assert_eq!(b.slots[0].active, 1);
    assert_eq!(b.slots[0].stats.active.get(), 1, "published");
    // A down server is not picked however idle.
    b.down(0, false, libc::ECONNREFUSED, T0);
    for _ in 0..5 {
        assert_ne!(b.pick(T0, &c), Some(0));
    }
    b.release(7);
    b.release(1);
    b.release(1);
    b.release(1);
    assert!(b.slots[1].active < u32::MAX, "extra releases do not wrap");
}

#[test]
fn all_down_fails_fast_and_warns_once_per_interval() {
    let c = WorkerCounters::default();
    let mut b = pool(2, 0);
    b.down(0, false, libc::ECONNREFUSED, T0);
    b.down(1, true, 0, T0);
    assert_eq!(b.pick(T0, &c), None, "no connect to a down server");
    assert_eq!(b.pick(at_ms(10), &c), None);
    assert_eq!(c.backend_all_down.get(), 2);
    assert_eq!(b.all_down.suppressed, 1, "the second warning was held back");
    assert_eq!(b.pick(at_ms(1000), &c), None);
    assert_eq!(
        b.all_down.suppressed, 0,
        "logged with the count, which restarts"
    );
    assert_eq!(b.slots[0].active + b.slots[1].active, 0, "nothing held");
    assert_eq!(b.slots[1].stats.connect_timeouts.get(), 1);
    assert_eq!(b.slots[0].stats.connect_errors.get(), 1);
    // One back up: it takes every connection.
    b.up(1, at_ms(1000));
    assert_eq!(b.pick(at_ms(1000), &c), Some(1));
    assert_eq!(b.pick(at_ms(1000), &c), Some(1));
}

#[test]
fn passive_health_probes_a_down_server_after_a_doubling_back_off() {
    let mut b = pool(2, 0);
    assert!(
        !probe_due(&b, 0, T0),
        "active probing off: an up server is not probed"
    );
    b.down(0, false, libc::ECONNREFUSED, T0);
    assert!(!probe_due(&b, 0, at_ms(999)));
    assert!(probe_due(&b, 0, at_ms(1000)), "1 s the first time");
    start_due_probes(&mut b, at_ms(1000));
    b.probe_done(0, Err((true, 0)), at_ms(1000));
    assert!(!probe_due(&b, 0, at_ms(2999)));
    assert!(probe_due(&b, 0, at_ms(3000)), "2 s the second time");
    start_due_probes(&mut b, at_ms(3000));
    b.probe_done(0, Ok(()), at_ms(3000));
    assert!(is_up(&b, 0));
    assert!(!probe_due(&b, 0, at_ms(100_000)), "up: not probed");
    assert_eq!(b.slots[0].stats.probes_ok.get(), 1);
    assert_eq!(b.slots[0].stats.probes_failed.get(), 1);
    b.down(0, false, libc::ECONNREFUSED, at_ms(3000));
    assert!(probe_due(&b, 0, at_ms(4000)), "back to 1 s after an up");
}

#[test]
fn the_back_off_stops_growing_at_its_maximum() {
    let mut b = pool(2, 0);
    for _ in 0..40 {
        b.down(0, false, libc::ECONNREFUSED, T0);
    }
    let max = DOWN_MAX.as_millis();
    assert!(!probe_due(&b, 0, at_ms(max - 1)));
    assert!(probe_due(&b, 0, at_ms(max)));
}

#[test]
fn active_probes_every_server_each_interval_and_back_off_when_down() {
    let mut b = Backends::from_config(
        &config(&[1, 1], Balance::RoundRobin, Some(200)),
        0,
        &Board::default(),
    );
    assert_eq!(start_due_probes(&mut b, T0), [0, 1], "all at once at start");
    b.probe_done(0, Ok(()), T0);
    b.probe_done(1, Err((false, libc::ECONNREFUSED)), T0);
    assert!(is_up(&b, 0) && !is_up(&b, 1), "fall = 1");
    assert_eq!(start_due_probes(&mut b, at_ms(199)), Vec::<usize>::new());
    assert_eq!(
        start_due_probes(&mut b, at_ms(200)),
        [0, 1],
        "an up one too"
    );
    // Server 1 stays down: 200, 400, 800 ms ... up to 30 s.
    b.probe_done(0, Ok(()), at_ms(200));
    b.probe_done(1, Err((false, libc::ECONNREFUSED)), at_ms(200));
    assert!(!probe_due(&b, 1, at_ms(599)));
    assert!(
        probe_due(&b, 1, at_ms(600)),
        "400 ms after the second failure"
    );
    assert!(
        probe_due(&b, 0, at_ms(400)),
        "the up one keeps its interval"
    );
    let mut t = 600;
    for _ in 0..20 {
        start_due_probes(&mut b, at_ms(t));
        b.probe_done(1, Err((true, 0)), at_ms(t));
        let next = b.slots[1].next_probe.expect("planned");
        t = (next - T0).as_millis();
    }
    let last = b.slots[1].next_probe.expect("planned");
    start_due_probes(&mut b, last);
    b.probe_done(1, Err((true, 0)), last);
    assert_eq!(
        b.slots[1].next_probe,
        Some(last + DOWN_MAX),
        "capped at 30 s"
    );
    // It comes back: up at once (rise = 1), then probed at the interval again.
    start_due_probes(&mut b, last + DOWN_MAX);
    b.probe_done(1, Ok(()), last + DOWN_MAX);
    assert!(is_up(&b, 1));
    assert_eq!(
        b.slots[1].next_probe,
        Some(last + DOWN_MAX + Duration::from_millis(200))
    );
}

#[test]
fn fall_and_rise_count_consecutive_results() {
    let mut cfg = config(&[1, 1], Balance::RoundRobin, Some(1000));
    cfg.health.fall = 3;
    cfg.health.rise = 2;
    let mut b = Backends::from_config(&cfg, 0, &Board::default());
    b.down(0, false, libc::ECONNREFUSED, T0);
    b.down(0, false, libc::ECONNREFUSED, T0);
    b.probe_done(0, Ok(()), T0);
    assert_eq!(b.slots[0].failures, 0, "a success resets the count");
    b.down(0, false, libc::ECONNREFUSED, T0);
    b.down(0, false, libc::ECONNREFUSED, T0);
    assert!(is_up(&b, 0), "2 < fall");
    b.probe_done(0, Err((true, 0)), T0);
    assert!(!is_up(&b, 0), "the third in a row");
    assert_eq!(b.slots[0].stats.state.get(), board::STATE_DOWN);
    assert_eq!(b.slots[0].stats.consecutive_failures.get(), 3);
    b.probe_done(0, Ok(()), at_ms(1000));
    assert!(!is_up(&b, 0), "1 < rise");
    assert_eq!(
        b.slots[0].next_probe,
        Some(at_ms(2000)),
        "the next probe comes at the interval, without back-off"
    );
    b.probe_done(0, Err((false, libc::ECONNREFUSED)), at_ms(2000));
    b.probe_done(0, Ok(()), at_ms(3000));
    assert!(!is_up(&b, 0), "a failure restarted the count");
    b.probe_done(0, Ok(()), at_ms(4000));
    assert!(is_up(&b, 0));
    assert_eq!(b.slots[0].stats.state.get(), board::STATE_UP);
    assert!(b.slots[0].stats.last_change_unix_ms.get() > 0);
}

#[test]
fn failover_never_repeats_a_server_and_skips_down_ones() {
    let c = WorkerCounters::default();
    // Every combination of down servers in a pool of 4, from every first server.
    for down in 0u32..16 {
        for first in 0..4 {
            let mut b = pool(4, 0);
            for s in 0..4 {
                if down & (1 << s) != 0 {
                    b.down(s, false, libc::ECONNREFUSED, T0);
                }
            }
            let mut tried = vec![first];
            let mut failed = first;
            while let Some(next) = b.failover(failed, first, T0, &c) {
                assert!(
                    !tried.contains(&next),
                    "down {down:04b}, first {first}: {next} again after {tried:?}"
                );
                assert!(
                    down & (1 << next) == 0 || next == first,
                    "down {down:04b}: {next} is down and was tried"
                );
                tried.push(next);
                b.down(next, false, libc::ECONNREFUSED, T0);
                b.release(next);
                failed = next;
            }
            for s in 0..4 {
                assert!(
                    tried.contains(&s) || down & (1 << s) != 0,
                    "down {down:04b}, first {first}: up server {s} never tried ({tried:?})"
                );
            }
            assert!(
                b.slots.iter().all(|s| s.active == 0),
                "every hold given back"
            );
        }
    }
    assert_eq!(
        pool(1, 0).failover(0, 0, T0, &c),
        None,
        "one server: none left"
    );
}

#[test]
fn backend_warnings_are_rate_limited() {
    let mut b = pool(1, 0);
    b.down(0, false, libc::ECONNREFUSED, T0);
    b.warn_failure("192.0.2.1:1".parse().expect("addr"), T0);
    b.warn_failure("192.0.2.1:1".parse().expect("addr"), at_ms(999));
    assert_eq!(b.warn.suppressed, 2);
    b.warn_failure("192.0.2.1:1".parse().expect("addr"), at_ms(1000));
    assert_eq!(
        b.warn.suppressed, 0,
        "logged with the count, which restarts"
    );
}

#[test]
fn reconfigure_keeps_health_retires_and_reuses_slots() {
    let c = WorkerCounters::default();
    let board = Board::default();
    let mut b = Backends::from_config(
        &config(&[1, 1, 1], Balance::RoundRobin, Some(1000)),
        0,
        &board,
    );
    b.down(1, false, libc::ECONNREFUSED, T0);
    b.up(2, T0);
    // A connection holds server 0 across the reload.
    b.next = 0;
    let held = b.pick(T0, &c).expect("up");
    assert_eq!(held, 0);
    // New list: 2 (weight 3), 1 kept; 0 removed; 9005 added.
    let mut new = config(&[1, 1, 1], Balance::LeastConnections, Some(1000));
    new.servers = vec![
        BackendServer {
            address: addr(2),
            weight: 3,
        },
        BackendServer {
            address: addr(1),
            weight: 1,
        },
        BackendServer {
            address: addr(5),
            weight: 1,
        },
    ];
    b.reconfigure(&new, at_ms(10));
    assert_eq!(b.len(), 4, "0 is still held: a new slot for 9005");
    assert_eq!(
        (b.addr(1), b.addr(2), b.addr(3)),
        (addr(1), addr(2), addr(5))
    );
    assert!(!is_up(&b, 1), "kept servers keep their health");
    assert_eq!(b.slots[2].stats.connects.get(), 1, "and their counters");
    assert_eq!(b.slots[2].weight, 3);
    assert!(
        b.slots[0].retired && b.addr(0) == addr(0),
        "still addressable"
    );
    assert_eq!(b.slots[0].stats.state.get(), board::STATE_RETIRED);
    assert!(is_up(&b, 3), "an added server starts up");
    assert!(probe_due(&b, 3, at_ms(10)), "and is probed at once");
    assert!(!probe_due(&b, 0, at_ms(100_000)), "a retired one never");
    for _ in 0..20 {
        let s = b.pick(at_ms(10), &c).expect("up");
        assert!(s == 2 || s == 3, "never the retired or the down one: {s}");
    }
    let snap = board.snapshot();
    assert_eq!(snap.len(), 4);
    assert_eq!(snap[0].state, "retired");
    // The held connection ends; after a connect timeout the slot is reused by the next
    // addition, so the pool does not grow with reloads.
    b.release(held);
    let mut later = new.clone();
    later.servers.push(BackendServer {
        address: addr(6),
        weight: 1,
    });
    b.reconfigure(&later, at_ms(20));
    assert_eq!(
        b.len(),
        5,
        "too soon: a late connect completion could still name slot 0"
    );
    let mut again = new.clone();
    again.servers.push(BackendServer {
        address: addr(7),
        weight: 1,
    });
    b.reconfigure(&again, at_ms(10_000));
    assert_eq!(b.addr(0), addr(7), "slot 0 reused for 9007");
    assert!(is_up(&b, 0) && !b.slots[0].retired);
    assert_eq!(b.slots[0].stats.connects.get(), 0, "with fresh counters");
    assert_eq!(
        b.len(),
        5,
        "9006 was retired just now: its slot is kept a connect timeout"
    );
    b.reconfigure(&again, at_ms(20_000));
    assert_eq!(b.len(), 4, "then the trailing slot goes");
    // Repeated reloads between two lists stay bounded.
    for i in 0..50u64 {
        let list = if i % 2 == 0 { &new } else { &again };
        b.reconfigure(list, at_ms(20_000 + i * 10_000));
        assert!(b.len() <= 5, "reload {i}: {} slots", b.len());
    }
    // A removed server that comes back before its slot is reused keeps its slot.
    let mut b = Backends::from_config(
        &config(&[1, 1], Balance::RoundRobin, None),
        0,
        &Board::default(),
    );
    b.reconfigure(&config(&[1], Balance::RoundRobin, None), T0);
    assert!(b.slots[1].retired);
    b.reconfigure(&config(&[1, 1], Balance::RoundRobin, None), at_ms(1));
    assert!(!b.slots[1].retired && b.len() == 2);
}

#[test]
fn source_limits_count_places_per_address() {
    let a = IpAddr::from(Ipv4Addr::new(192, 0, 2, 1));
    let b = IpAddr::from(Ipv4Addr::new(192, 0, 2, 2));
    let mut l = SourceLimits::new(2);
    assert!(l.acquire(a) && l.acquire(a));
    assert!(!l.acquire(a), "at its limit");
    assert!(l.acquire(b), "another source is not affected");
    assert_eq!(l.sources(), 2);
    l.release(a);
    assert!(l.acquire(a), "a place given back is taken again");
    l.release(a);
    l.release(a);
    l.release(b);
    assert_eq!(l.sources(), 0, "nothing held: nothing kept");
    // A release without an acquire is ignored.
    l.release(b);
    assert_eq!(l.sources(), 0);
}

#[test]
fn source_limit_zero_is_off() {
    let a = IpAddr::from(Ipv4Addr::new(192, 0, 2, 1));
    let mut l = SourceLimits::new(0);
    for _ in 0..1000 {
        assert!(l.acquire(a));
    }
    assert_eq!(l.sources(), 1, "counted, not limited");
    l.release(a);
}

#[test]
fn a_limit_set_later_holds_for_places_taken_before() {
    let a = IpAddr::from(Ipv4Addr::new(192, 0, 2, 1));
    let mut l = SourceLimits::new(0);
    assert!(l.acquire(a) && l.acquire(a));
    l.set_limit(2);
    assert!(!l.acquire(a), "two held: at the new limit");
    l.release(a);
    assert!(l.acquire(a));
    l.set_limit(0);
    assert!(l.acquire(a), "no limit again");
    for _ in 0..3 {
        l.release(a);
    }
    assert_eq!(l.sources(), 0);
}

#[test]
fn an_ipv4_mapped_ipv6_source_is_the_ipv4_source() {
    let v4 = Ipv4Addr::new(192, 0, 2, 1);
    let mapped = IpAddr::from(v4.to_ipv6_mapped());
    let mut l = SourceLimits::new(2);
    assert!(l.acquire(IpAddr::from(v4)));
    assert!(l.acquire(mapped));
    assert!(!l.acquire(IpAddr::from(v4)), "one source, two connections");
    assert!(!l.acquire(mapped));
    l.release(mapped);
    assert!(l.acquire(IpAddr::from(v4)), "released through either form");
    assert_eq!(l.sources(), 1);
    let v6 = IpAddr::from(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
    assert!(l.acquire(v6), "a real IPv6 source is its own");
}

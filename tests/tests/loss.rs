//! End-to-end check of the test-only loss injection (`tern_tests::loss`): with 20% loss in both
//! directions on the client's veth, a Linux TCP transfer between the rig's namespaces still
//! completes byte-exact (the kernel's TCP retransmits), both programs counted drops near the
//! configured rate, and non-TCP traffic (ICMP) is never dropped. Needs root (namespaces, XDP,
//! tc), as every rig test does.
//!
//! Bounded: every step has a deadline (socket timeouts, a watchdog on the receiving side). Loss
//! is switched on once the connection is established and off again once every byte arrived:
//! SYN and FIN retransmissions back off from one second and would dominate the run time
//! without testing anything the data phase does not. For the same reason the route's minimum
//! RTO is lowered to 5 ms ([`fast_retransmit_timer`]) and both sockets' maximum RTO is capped
//! at 1 s ([`cap_rto`]).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_tests::loss::{LossCounts, LossInjector};
use tern_tests::rig::Rig;

const BYTES: usize = 1024 * 1024;
const DEADLINE: Duration = Duration::from_secs(60);
/// 20% in parts per million.
const RATE: u32 = 200_000;

/// A deterministic, position-dependent pattern, so a lost or duplicated range shows up.
fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(131) ^ (i >> 11)) as u8
}

#[test]
fn tcp_survives_20_percent_loss_both_ways_and_drops_are_counted() {
    let rig = Rig::isolated("loss", 1);
    let server = rig.server.as_ref().expect("isolated rig");
    fast_retransmit_timer(&rig);
    let server_ip = rig.server_ip;
    let listener = server.run(move || TcpListener::bind((server_ip, 0)).expect("bind"));
    let addr = listener.local_addr().expect("local_addr");

    // Attached before connecting: the socket's GSO limit is taken at connect time.
    let mut loss = LossInjector::attach(&rig.client, &rig.client_if, 0, 0, 0x7465_726e);
    assert_eq!(loss.counts(), LossCounts::default(), "fresh counters");

    // Server: reads everything, checking it against the pattern as it arrives.
    let progress = Arc::new(AtomicUsize::new(0));
    let sink = {
        let progress = Arc::clone(&progress);
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            cap_rto(&stream);
            stream
                .set_read_timeout(Some(DEADLINE))
                .expect("read timeout");
            let started = Instant::now();
            let mut received = 0usize;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                assert!(
                    started.elapsed() < DEADLINE,
                    "transfer too slow: {received} bytes"
                );
                let n = stream.read(&mut buf).expect("read");
                if n == 0 {
                    return received;
                }
                for (k, byte) in buf[..n].iter().enumerate() {
                    let at = received + k;
                    assert_eq!(*byte, pattern(at), "byte {at} differs");
                }
                received += n;
                progress.store(received, Ordering::Release);
            }
        })
    };

    // The socket is created in the client namespace and stays there; any thread may use it.
    let mut stream = rig
        .client
        .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect"));
    cap_rto(&stream);
    stream
        .set_write_timeout(Some(DEADLINE))
        .expect("write timeout");
    stream
        .set_read_timeout(Some(DEADLINE))
        .expect("read timeout");

    loss.set_rates(RATE, RATE);
    let started = Instant::now();
    let data: Vec<u8> = (0..BYTES).map(pattern).collect();
    stream.write_all(&data).expect("write");
    while progress.load(Ordering::Acquire) < BYTES {
        assert!(
            started.elapsed() < DEADLINE,
            "transfer too slow: {} of {BYTES} bytes",
            progress.load(Ordering::Acquire)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let elapsed = started.elapsed();
    loss.set_rates(0, 0);
    let counts = loss.counts();
    eprintln!("{BYTES} bytes in {elapsed:?} at 20% loss each way: {counts:?}");

    stream.shutdown(Shutdown::Write).expect("shutdown");
    let received = sink.join().expect("receiving thread panicked");
    assert_eq!(received, BYTES, "the transfer must complete byte-exact");
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .expect("read the server's FIN");
    assert!(rest.is_empty(), "the server sent data");
    drop(stream);

    // With one segment per skb, every one of the >= BYTES / 1448 data segments passes the
    // classifier at least once; the ACKs flow the other way.
    assert!(
        counts.egress_dropped > 0 && counts.ingress_dropped > 0,
        "both directions must have lost frames: {counts:?}"
    );
    assert!(
        counts.egress_passed >= (BYTES / 1500) as u64,
        "the client sent too few TCP frames through the classifier: {counts:?}"
    );
    assert!(
        counts.ingress_passed + counts.ingress_dropped >= 200,
        "the client received too few TCP frames through XDP: {counts:?}"
    );
    for (what, rate) in [
        ("egress", counts.egress_rate()),
        ("ingress", counts.ingress_rate()),
    ] {
        assert!(
            (0.10..=0.30).contains(&rate),
            "{what} drop rate {rate:.3} is far from 20%: {counts:?}"
        );
    }

    // Non-TCP is exempt: ICMP echo crosses the lossy veth without a single loss, and is counted
    // in neither direction.
    loss.set_rates(RATE, RATE);
    let before = loss.counts();
    let ping = rig
        .client_command("ping")
        .args(["-c", "20", "-i", "0.01", "-W", "2", "-q"])
        .arg(rig.server_ip.to_string())
        .output()
        .expect("run ping");
    let stdout = String::from_utf8_lossy(&ping.stdout);
    assert!(
        ping.status.success() && stdout.contains(" 0% packet loss"),
        "ping through the lossy veth lost packets:\n{stdout}{}",
        String::from_utf8_lossy(&ping.stderr)
    );
    // 20 echo requests and 20 replies; the only TCP frames allowed meanwhile are stragglers of
    // the closed connection, far fewer than the 40 ICMP frames.
    let after = loss.counts();
    let tcp_frames =
        |c: &LossCounts| c.ingress_dropped + c.ingress_passed + c.egress_dropped + c.egress_passed;
    assert!(
        tcp_frames(&after) - tcp_frames(&before) < 20,
        "ICMP must not be counted by the TCP-only loss programs: {before:?} -> {after:?}"
    );
}

/// Lowers the minimum retransmission timeout of the rig's subnet route on both sides to 5 ms
/// (before any connection takes its route). With 20% loss each way a retransmission is often
/// lost again, and the default 200 ms floor, doubling on every retry, makes the run time of a
/// transfer on a veth (RTT: microseconds) swing by tens of seconds.
fn fast_retransmit_timer(rig: &Rig) {
    let [a, b, c, _] = rig.server_ip.octets();
    let subnet = format!("{a}.{b}.{c}.0/24");
    for (mut ip, dev, src) in [
        (rig.server_command("ip"), &rig.server_if, rig.server_ip),
        (rig.client_command("ip"), &rig.client_if, rig.client_ip),
    ] {
        let src = src.to_string();
        let args = [
            "route", "replace", &subnet, "dev", dev, "proto", "kernel", "scope", "link", "src",
            &src, "rto_min", "5ms",
        ];
        let out = ip.args(args).output().expect("run ip");
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `TCP_RTO_MAX_MS` (linux/tcp.h, Linux >= 6.15). Set with a raw setsockopt: it is too new
/// for socket2, rustix and even the libc crate.
const TCP_RTO_MAX_MS: libc::c_int = 44;

/// Caps the socket's retransmission timeout at 1 s (the smallest `TCP_RTO_MAX_MS` allows).
/// At 20% loss each way (a retransmission and its ACK both survive only 64% of the time), a few
/// hundred timeouts per transfer make a chain of 8+ lost retries likely somewhere, and with
/// the default 120 s cap such a chain stalls the exponential backoff for a minute.
fn cap_rto(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let cap: libc::c_int = 1000;
    // SAFETY: `cap` is a readable c_int of the size passed; the fd is the stream's own.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            TCP_RTO_MAX_MS,
            std::ptr::addr_of!(cap).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt(TCP_RTO_MAX_MS): {}",
        std::io::Error::last_os_error()
    );
}

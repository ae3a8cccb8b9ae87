//! A socket leg on a real ring: what it does with completions the kernel gives in the field.

use std::io::Read as _;
use std::os::fd::IntoRawFd as _;
use std::os::unix::net::UnixStream;

use io_uring::IoUring;

use super::*;
use crate::counters::WorkerCounters;

/// A SEND_ZC the kernel refuses at run time (EOPNOTSUPP: here a Unix socket, which cannot send
/// zero-copy) loses nothing: the bytes go again with SEND, the connection does not fail, and the
/// worker stops asking for zero-copy.
#[test]
fn a_refused_zero_copy_send_is_sent_again_with_send() {
    let ring = IoUring::builder().build(64).expect("io_uring");
    let mut io = Io::new(ring, 4, 4, std::time::Duration::from_secs(1)).expect("io");
    io.zc.configure(true);
    if !io.zc.wants(zc::THRESHOLD) {
        eprintln!("SKIPPED: this kernel's io_uring has no SEND_ZC");
        return;
    }
    let (ours, mut peer) = UnixStream::pair().expect("socketpair");
    peer.set_nonblocking(true).expect("nonblocking");
    let mut sock = Sock::adopt(Side::Client, ours.into_raw_fd());
    let key = Key { index: 0, gen: 1 };
    let data: Vec<u8> = (0..zc::THRESHOLD + 4096).map(|i| (i % 251) as u8).collect();
    assert!(sock.fill(&mut io, |buf| {
        buf[..data.len()].copy_from_slice(&data);
        data.len()
    }));
    sock.flush(&mut io, key);
    let counters = WorkerCounters::default();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..50 {
        if got.len() == data.len() && sock.flushed() {
            break;
        }
        io.ring.submit_and_wait(1).expect("submit");
        let cqes: Vec<(u64, i32, u32)> = io
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result(), c.flags()))
            .collect();
        for (user_data, res, flags) in cqes {
            let ud = UserData::decode(user_data).expect("our user_data");
            let done = sock.complete(&mut io, key, ud.op, res, flags, &counters);
            assert!(
                !matches!(done, Done::Event(OwnedEvent::Failed(_))),
                "{:?} failed the connection: {done:?}",
                ud.op
            );
        }
        sock.flush(&mut io, key);
        while let Ok(n) = peer.read(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
    }
    assert_eq!(got, data, "every byte arrived, once, in order");
    assert!(
        !io.zc.wants(zc::THRESHOLD),
        "zero-copy is off after the refusal"
    );
    assert_eq!(counters.zero_copy_bytes.get(), 0);
    sock.close(&mut io, true);
}

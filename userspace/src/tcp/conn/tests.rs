//! Per-state tests for [`Tcb`], in the shape of smoltcp's socket tests: a fixture per state,
//! crafted segments in (`send!`), exact segments out (`recv!`), explicit time in milliseconds.
//! Ends with a seeded loopback simulation over a lossy, reordering, duplicating link.

use super::*;
use crate::tcp::cc::initial_window;

const LOCAL_PORT: u16 = 443;
const REMOTE_PORT: u16 = 49_152;
/// Our ISS; SND.UNA starts one past it.
const ISS: SeqNumber = SeqNumber(10_000);
/// The peer's ISS; RCV.NXT starts one past it.
const IRS: SeqNumber = SeqNumber(20_000);
const LOCAL_SEQ: SeqNumber = SeqNumber(10_001);
const REMOTE_SEQ: SeqNumber = SeqNumber(20_001);
const RX_BUF: usize = 4096;

type Seg = (TcpRepr, Vec<u8>);

fn t(ms: u64) -> Instant {
    Instant::from_millis(ms)
}

fn config() -> TcbConfig {
    TcbConfig {
        send_buffer: 16 * 1024,
        recv_buffer: RX_BUF,
        mss: 1000,
        cc: Algorithm::NewReno,
        ..TcbConfig::default()
    }
}

fn handshake() -> Handshake {
    Handshake {
        local_port: LOCAL_PORT,
        remote_port: REMOTE_PORT,
        iss: ISS,
        irs: IRS,
        peer_mss: 1000,
        window_scale: None,
        sack_permitted: false,
        timestamps: None,
        peer_window: u16::MAX,
    }
}

/// What the peer sends: an ACK of nothing new from RCV.NXT's point of view.
fn send_templ() -> TcpRepr {
    TcpRepr {
        src_port: REMOTE_PORT,
        dst_port: LOCAL_PORT,
        seq: REMOTE_SEQ,
        ack: Some(LOCAL_SEQ),
        flags: TcpFlags::NONE,
        window: u16::MAX,
        options: TcpOptions::default(),
        payload_len: 0,
    }
}

/// What we send: a pure ACK with the full receive buffer as window.
fn recv_templ() -> TcpRepr {
    TcpRepr {
        src_port: LOCAL_PORT,
        dst_port: REMOTE_PORT,
        seq: LOCAL_SEQ,
        ack: Some(REMOTE_SEQ),
        flags: TcpFlags::NONE,
        window: RX_BUF as u16,
        options: TcpOptions::default(),
        payload_len: 0,
    }
}

/// An expected outgoing segment (payload length filled in from `payload`).
fn seg(repr: TcpRepr, payload: &[u8]) -> Seg {
    (
        TcpRepr {
            payload_len: payload.len(),
            ..repr
        },
        payload.to_vec(),
    )
}

#[track_caller]
fn deliver(s: &mut Tcb, ms: u64, repr: TcpRepr, payload: &[u8]) -> Result<(), DropReason> {
    let repr = TcpRepr {
        payload_len: payload.len(),
        ..repr
    };
    s.process(t(ms), &repr, payload)
}

#[track_caller]
fn poll(s: &mut Tcb, ms: u64) -> Vec<Seg> {
    let mut out = Vec::new();
    s.poll_transmit(t(ms), |r, p| {
        let mut bytes = vec![0; p.len()];
        p.copy_to(&mut bytes);
        out.push((*r, bytes));
        Ok::<(), ()>(())
    })
    .expect("the test's emit never fails");
    out
}

/// Delivers a segment the Tcb must accept (or, with `=> Err(reason)`, must refuse).
macro_rules! send {
    ($s:expr, $ms:expr, $repr:expr) => {
        send!($s, $ms, $repr, &[])
    };
    ($s:expr, $ms:expr, $repr:expr, $payload:expr) => {
        assert_eq!(
            deliver(&mut $s, $ms, $repr, $payload),
            Ok(()),
            "segment accepted"
        )
    };
    ($s:expr, $ms:expr, $repr:expr, $payload:expr => $err:expr) => {
        assert_eq!(
            deliver(&mut $s, $ms, $repr, $payload),
            $err,
            "segment refused"
        )
    };
}

/// Polls at `$ms` and compares everything emitted with the expected segments.
macro_rules! recv {
    ($s:expr, $ms:expr, [$($seg:expr),* $(,)?]) => {
        assert_eq!(poll(&mut $s, $ms), vec![$($seg),*], "segments emitted at {} ms", $ms)
    };
}

/// Runs the timers at `$ms`.
macro_rules! tick {
    ($s:expr, $ms:expr) => {
        $s.on_timer(t($ms))
    };
}

fn pattern(n: usize, salt: u8) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 ^ salt).collect()
}

// ---------------------------------------------------------------------- fixtures

fn established() -> Tcb {
    Tcb::new(config(), &handshake(), t(0))
}

fn established_sack() -> Tcb {
    Tcb::new(
        config(),
        &Handshake {
            sack_permitted: true,
            ..handshake()
        },
        t(0),
    )
}

/// We closed first; our FIN (seq LOCAL_SEQ) is out and unacknowledged.
fn fin_wait_1() -> Tcb {
    let mut s = established();
    s.close();
    recv!(
        s,
        0,
        [seg(
            TcpRepr {
                flags: TcpFlags::FIN,
                ..recv_templ()
            },
            &[]
        )]
    );
    assert_eq!(s.state(), State::FinWait1, "fixture state");
    s
}

fn fin_wait_2() -> Tcb {
    let mut s = fin_wait_1();
    send!(
        s,
        1,
        TcpRepr {
            ack: Some(LOCAL_SEQ + 1),
            ..send_templ()
        }
    );
    assert_eq!(s.state(), State::FinWait2, "fixture state");
    s
}

/// The peer closed first; we ACKed its FIN.
fn close_wait() -> Tcb {
    let mut s = established();
    send!(
        s,
        0,
        TcpRepr {
            flags: TcpFlags::FIN,
            ..send_templ()
        }
    );
    recv!(
        s,
        0,
        [seg(
            TcpRepr {
                ack: Some(REMOTE_SEQ + 1),
                ..recv_templ()
            },
            &[]
        )]
    );
    assert_eq!(s.state(), State::CloseWait, "fixture state");
    s
}

// ---------------------------------------------------------------------- ESTABLISHED: receive

#[test]
fn accept_with_data_on_the_final_ack() {
    let ack = TcpRepr {
        payload_len: 300,
        ..send_templ()
    };
    let data = pattern(300, 1);
    let mut s = Tcb::accept(config(), &handshake(), &ack, &data, t(0));
    assert_eq!(
        s.state(),
        State::Established,
        "cookie ACK creates ESTABLISHED"
    );
    assert_eq!(s.recv_queue(), 300, "the ACK's data is readable");
    let mut out = [0u8; 400];
    assert_eq!(s.recv(&mut out), 300, "read it");
    assert_eq!(&out[..300], &data[..], "same bytes");
    assert_eq!(s.mss(), 1000, "min of both MSS");
    assert_eq!(
        s.cc().cwnd(),
        initial_window(1000),
        "RFC 6928 initial window"
    );
}

#[test]
fn in_order_data_is_acked_after_the_delay() {
    let mut s = established();
    send!(s, 0, send_templ(), &pattern(500, 0));
    recv!(s, 0, []);
    assert_eq!(s.next_timer(), Some(t(40)), "delayed-ACK timer");
    tick!(s, 39);
    recv!(s, 39, []);
    tick!(s, 40);
    recv!(
        s,
        40,
        [seg(
            TcpRepr {
                ack: Some(REMOTE_SEQ + 500),
                window: (RX_BUF - 500) as u16,
                ..recv_templ()
            },
            &[]
        )]
    );
    assert_eq!(s.next_timer(), None, "nothing armed");
}

#[test]
fn every_second_full_segment_is_acked_at_once() {
    let mut s = established();
    send!(s, 0, send_templ(), &pattern(1000, 0));
    recv!(s, 0, []);
    send!(
        s,
        1,
        TcpRepr {
            seq: REMOTE_SEQ + 1000,
            ..send_templ()
        },
        &pattern(1000, 0)
    );
    recv!(
        s,
        1,
        [seg(
            TcpRepr {
                ack: Some(REMOTE_SEQ + 2000),
                window: (RX_BUF - 2000) as u16,
                ..recv_templ()
            },
            &[]
        )]
    );
}

#[test]
fn out_of_order_data_gets_an_immediate_ack_and_sack_blocks() {
    let mut s = established_sack();
    let data = pattern(1500, 7);
    send!(
        s,
        0,
        TcpRepr {
            seq: REMOTE_SEQ + 1000,
            ..send_templ()
        },
        &data[1000..]
    );
    let mut sack = TcpOptions::default();
    sack.sack_blocks.push(SackBlock {
        left: REMOTE_SEQ + 1000,
        right: REMOTE_SEQ + 1500,
    });
    recv!(
        s,
        0,
        [seg(
            TcpRepr {
                options: sack,
                ..recv_templ()
            },
            &[]
        )]
    );
    // The gap fills: the cumulative ACK jumps and the SACK block is gone.
    send!(s, 1, send_templ(), &data[..1000]);
    recv!(
        s,
        1,
        [seg(
            TcpRepr {
                ack: Some(REMOTE_SEQ + 1500),
                window: (RX_BUF - 1500) as u16,
                ..recv_templ()
            },
            &[]
        )]
    );
    let mut out = vec![0; 2000];
    assert_eq!(s.recv(&mut out), 1500, "all in order");
    assert_eq!(&out[..1500], &data[..], "reassembled bytes");
}

#[test]
fn out_of_order_without_sack_is_a_plain_duplicate_ack() {
    let mut s = established();
    send!(
        s,
        0,
        TcpRepr {
            seq: REMOTE_SEQ + 100,
            ..send_templ()
        },
        &[1; 100]
    );
    recv!(s, 0, [seg(recv_templ(), &[])]);
}

#[test]
fn fin_ahead_of_a_gap_waits_for_the_data() {
    let mut s = established();
    send!(
        s,
        0,
        TcpRepr {
            seq: REMOTE_SEQ + 100,
            flags: TcpFlags::FIN,
            ..send_templ()
        },
        &[2; 100]
    );
    assert_eq!(s.state(), State::Established, "FIN not yet in order");
    recv!(s, 0, [seg(recv_templ(), &[])]);
    send!(s, 1, send_templ(), &[1; 100]);
    assert_eq!(s.state(), State::CloseWait, "gap filled, FIN taken");
    recv!(
        s,
        1,
        [seg(
            TcpRepr {
                ack: Some(REMOTE_SEQ + 201),
                window: (RX_BUF - 200) as u16,
                ..recv_templ()
            },
            &[]
        )]
    );
}

#[test]
fn zero_receive_window_then_silly_window_avoidance_then_update() {
    let mut s = established();
    let data = pattern(RX_BUF, 3);
    send!(s, 0, send_templ(), &data[..1000]);
    send!(
        s,
        0,
        TcpRepr {
            seq: REMOTE_SEQ + 1000,
            ..send_templ()
        },
        &data[1000..2000]
    );
    send!(
        s,
        0,
        TcpRepr {
            seq: REMOTE_SEQ + 2000,
            ..send_templ()
        },
        &data[2000..3000]
    );
    send!(
        s,
        0,
        TcpRepr {
            seq: REMOTE_SEQ + 3000,
            ..send_templ()
        },
        &data[3000..]
    );
    recv!(
        s,
        0,
        [seg(
            TcpRepr {
                ack: Some(REMOTE_SEQ + RX_BUF as u32),
                window: 0,
                ..recv_templ()
            },
            &[]
        )]
    );
    let full_ack = TcpRepr {
        ack: Some(REMOTE_SEQ + RX_BUF as u32),
        window: 0,
        ..recv_templ()
    };
    // A probe byte at RCV.NXT is refused, but ACKed with the zero window.
    send!(
        s,
        10,
        TcpRepr {
            seq: REMOTE_SEQ + RX_BUF as u32,
            ..send_templ()
        },
        &[9]
    );
    recv!(s, 10, [seg(full_ack, &[])]);
    // Reading less than one MSS does not reopen the window (RFC 9293 §3.8.6.2.2).
    let mut out = [0u8; 500];
    assert_eq!(s.recv(&mut out), 500, "read");
    recv!(s, 20, []);
    let mut out = [0u8; 600];
    assert_eq!(s.recv(&mut out), 600, "read more");
    recv!(
        s,
        30,
        [seg(
            TcpRepr {
                window: 1100,
                ..full_ack
            },
            &[]
        )]
    );
    // peek + consume see the rest in order.
    let rest = s.peek();
    let mut bytes = vec![0; rest.len()];
    rest.copy_to(&mut bytes);
    assert_eq!(&bytes[..], &data[1100..], "peek");
    s.consume(bytes.len());
    assert_eq!(s.recv_queue(), 0, "consumed");
}

#[test]
fn window_scaling_shifts_both_windows() {
    let mut s = Tcb::new(
        TcbConfig {
            recv_buffer: 256 * 1024,
            ..config()
        },
        &Handshake {
            window_scale: Some((2, 3)),
            peer_window: 1000,
            ..handshake()
        },
        t(0),
    );
    assert_eq!(s.snd_wnd(), 4000, "peer's field << 2");
    send!(
        s,
        0,
        TcpRepr {
            seq: REMOTE_SEQ + 10,
            ..send_templ()
        },
        &[1; 10]
    );
    recv!(
        s,
        0,
        [seg(
            TcpRepr {
                window: ((256 * 1024) >> 3) as u16,
                ..recv_templ()
            },
            &[]
        )]
    );
    assert_eq!(s.snd_wnd(), u32::from(u16::MAX) << 2, "window updated");
}

// ---------------------------------------------------------------------- ESTABLISHED: send

#[test]
fn data_goes_out_in_mss_pieces_and_acks_advance() {
    let mut s = established();
    let data = pattern(3000, 5);
    assert_eq!(s.send(&data), 3000, "queued");
    recv!(
        s,
        0,
        [
            seg(recv_templ(), &data[..1000]),
            seg(
                TcpRepr {
                    seq: LOCAL_SEQ + 1000,
                    ..recv_templ()
                },
                &data[1000..2000]
            ),
            seg(
                TcpRepr {
                    seq: LOCAL_SEQ + 2000,
                    flags: TcpFlags::PSH,
                    ..recv_templ()
                },
                &data[2000..]
            ),
        ]
    );
    assert_eq!(s.next_timer(), Some(t(1000)), "RTO armed (initial 1 s)");
    send!(
        s,
        10,
        TcpRepr {
            ack: Some(LOCAL_SEQ + 2000),
            ..send_templ()
        }
    );
    assert_eq!(s.snd_una(), LOCAL_SEQ + 2000, "SND.UNA advanced");
    assert_eq!(s.send_queue(), 1000, "acknowledged bytes freed");
    assert_eq!(
        s.rtt().srtt(),
        Some(Duration::from_millis(10)),
        "first segment timed"
    );
    assert_eq!(
        s.next_timer(),
        Some(t(210)),
        "RTO restarted: 10 ms + 200 ms floor"
    );
    send!(
        s,
        20,
        TcpRepr {
            ack: Some(LOCAL_SEQ + 3000),
            ..send_templ()
        }
    );
    assert_eq!(s.next_timer(), None, "all acknowledged: timer stopped");
    recv!(s, 20, []);
}

#[test]
fn send_window_limits_and_window_update_rules() {
    let mut s = established();
    send!(
        s,
        0,
        TcpRepr {
            window: 1500,
            ..send_templ()
        }
    );
    let data = pattern(3000, 1);
    s.send(&data);
    recv!(s, 0, [seg(recv_templ(), &data[..1000])]);
    // An out-of-order segment carries a window too and sets SND.WL1 to its sequence number.
    send!(
        s,
        1,
        TcpRepr {
            seq: REMOTE_SEQ + 100,
            window: 1500,
            ..send_templ()
        },
        &[1; 10]
    );
    let ack = seg(
        TcpRepr {
            seq: LOCAL_SEQ + 1000,
            ..recv_templ()
        },
        &[],
    );
    recv!(s, 1, [ack]);
    // An older segment (SEG.SEQ < SND.WL1) must not move the window.
    send!(
        s,
        2,
        TcpRepr {
            window: 9000,
            ..send_templ()
        }
    );
    assert_eq!(s.snd_wnd(), 1500, "window unchanged by an older segment");
    send!(
        s,
        2,
        TcpRepr {
            seq: REMOTE_SEQ + 100,
            ack: Some(LOCAL_SEQ + 1000),
            window: 2000,
            ..send_templ()
        }
    );
    assert_eq!(s.snd_wnd(), 2000, "updated");
    recv!(
        s,
        2,
        [
            seg(
                TcpRepr {
                    seq: LOCAL_SEQ + 1000,
                    ..recv_templ()
                },
                &data[1000..2000]
            ),
            seg(
                TcpRepr {
                    seq: LOCAL_SEQ + 2000,
                    flags: TcpFlags::PSH,
                    ..recv_templ()
                },
                &data[2000..]
            ),
        ]
    );
}

#[test]
fn rto_retransmits_with_backoff() {
    let mut s = established();
    s.send(&[7; 1000]);
    let data_seg = seg(
        TcpRepr {
            flags: TcpFlags::PSH,
            ..recv_templ()
        },
        &[7; 1000],
    );
    recv!(s, 0, [data_seg.clone()]);
    assert_eq!(s.next_timer(), Some(t(1000)), "initial RTO");
    tick!(s, 999);
    recv!(s, 999, []);
    tick!(s, 1000);
    recv!(s, 1000, [data_seg.clone()]);
    assert_eq!(s.next_timer(), Some(t(3000)), "backed off to 2 s");
    tick!(s, 3000);
    recv!(s, 3000, [data_seg]);
    assert_eq!(s.next_timer(), Some(t(7000)), "backed off to 4 s");
    assert_eq!(s.counters().timeouts, 2, "two timeouts");
    send!(
        s,
        3100,
        TcpRepr {
            ack: Some(LOCAL_SEQ + 1000),
            ..send_templ()
        }
    );
    assert_eq!(s.next_timer(), None, "acknowledged");
    assert_eq!(
        s.rtt().srtt(),
        None,
        "Karn: no sample from a retransmission"
    );
    assert_eq!(s.cc().ssthresh(), 2000, "RFC 5681 ssthresh after the RTO");
    assert_eq!(s.rtt().backoff(), 0, "progress clears the backoff");
}

#[test]
fn gives_up_after_max_retransmits() {
    let mut s = Tcb::new(
        TcbConfig {
            max_retransmits: 1,
            ..config()
        },
        &handshake(),
        t(0),
    );
    s.send(&[1; 10]);
    assert_eq!(poll(&mut s, 0).len(), 1, "sent");
    tick!(s, 1000);
    assert_eq!(poll(&mut s, 1000).len(), 1, "one retransmission");
    tick!(s, 3000);
    assert_eq!(s.state(), State::Closed, "gave up");
    assert_eq!(s.close_reason(), Some(CloseReason::TimedOut), "reason");
    recv!(
        s,
        3000,
        [seg(
            TcpRepr {
                seq: LOCAL_SEQ + 10,
                ack: None,
                flags: TcpFlags::RST,
                window: 0,
                ..recv_templ()
            },
            &[]
        )]
    );
}

fn dup_ack(ack: SeqNumber, blocks: &[(u32, u32)]) -> TcpRepr {
    let mut options = TcpOptions::default();
    for &(l, r) in blocks {
        options.sack_blocks.push(SackBlock {
            left: LOCAL_SEQ + l,
            right: LOCAL_SEQ + r,
        });
    }
    TcpRepr {
        ack: Some(ack),
        options,
        ..send_templ()
    }
}

#[test]
fn fast_retransmit_after_three_dup_acks_then_partial_ack_then_exit() {
    let mut s = established();
    let data = pattern(5000, 9);
    s.send(&data);
    assert_eq!(poll(&mut s, 0).len(), 5, "five segments out");
    send!(s, 10, dup_ack(LOCAL_SEQ + 1000, &[]));
    send!(s, 11, dup_ack(LOCAL_SEQ + 1000, &[]));
    send!(s, 12, dup_ack(LOCAL_SEQ + 1000, &[]));
    recv!(s, 12, []);
    assert!(!s.cc().in_recovery(), "two duplicates are not enough");
    send!(s, 13, dup_ack(LOCAL_SEQ + 1000, &[]));
    assert!(s.cc().in_recovery(), "third duplicate: fast recovery");
    recv!(
        s,
        13,
        [seg(
            TcpRepr {
                seq: LOCAL_SEQ + 1000,
                ..recv_templ()
            },
            &data[1000..2000]
        )]
    );
    assert_eq!(s.cc().ssthresh(), 2000, "half of 4000 in flight");
    // Partial ACK (RFC 6582): retransmit the next unacknowledged segment at once.
    send!(s, 20, dup_ack(LOCAL_SEQ + 3000, &[]));
    assert!(s.cc().in_recovery(), "still recovering");
    recv!(
        s,
        20,
        [seg(
            TcpRepr {
                seq: LOCAL_SEQ + 3000,
                ..recv_templ()
            },
            &data[3000..4000]
        )]
    );
    send!(s, 30, dup_ack(LOCAL_SEQ + 5000, &[]));
    assert!(!s.cc().in_recovery(), "full ACK ends recovery");
    assert_eq!(s.cc().cwnd(), 2000, "RFC 6582 deflation to ssthresh");
    assert_eq!(s.counters().fast_retransmits, 2, "two retransmissions");
    assert_eq!(s.next_timer(), None, "all acknowledged");
}

#[test]
fn sack_retransmits_the_holes() {
    let mut s = established_sack();
    let data = pattern(5000, 4);
    s.send(&data);
    assert_eq!(poll(&mut s, 0).len(), 5, "five segments out");
    send!(s, 10, dup_ack(LOCAL_SEQ + 1000, &[]));
    send!(s, 11, dup_ack(LOCAL_SEQ + 1000, &[(2000, 3000)]));
    send!(
        s,
        12,
        dup_ack(LOCAL_SEQ + 1000, &[(4000, 5000), (2000, 3000)])
    );
    recv!(s, 12, []);
    send!(
        s,
        13,
        dup_ack(LOCAL_SEQ + 1000, &[(4000, 5000), (2000, 3000)])
    );
    recv!(
        s,
        13,
        [seg(
            TcpRepr {
                seq: LOCAL_SEQ + 1000,
                ..recv_templ()
            },
            &data[1000..2000]
        )]
    );
    // A further duplicate: the next hole below the highest SACKed byte.
    send!(
        s,
        14,
        dup_ack(LOCAL_SEQ + 1000, &[(4000, 5000), (2000, 3000)])
    );
    recv!(
        s,
        14,
        [seg(
            TcpRepr {
                seq: LOCAL_SEQ + 3000,
                ..recv_templ()
            },
            &data[3000..4000]
        )]
    );
    // No hole is left below 5000: more duplicates only inflate the window.
    send!(
        s,
        15,
        dup_ack(LOCAL_SEQ + 1000, &[(4000, 5000), (2000, 3000)])
    );
    recv!(s, 15, []);
    send!(s, 20, dup_ack(LOCAL_SEQ + 5000, &[]));
    assert!(!s.cc().in_recovery(), "recovered");
}

/// The first 1000 bytes of `data`, retransmitted at SND.UNA, is among `out`.
fn has_retransmission_of_first(out: &[Seg], data: &[u8]) -> bool {
    out.iter()
        .any(|(r, p)| r.seq == LOCAL_SEQ && p.as_slice() == &data[..1000])
}

#[test]
fn sack_acks_carrying_data_count_as_duplicates() {
    // RFC 6675 §2: an ACK whose SACK blocks cover new data is a duplicate ACK even when it
    // carries data (the peer sends too) — RFC 5681's rule alone would wait for the RTO.
    let mut s = established_sack();
    let data = pattern(6000, 5);
    s.send(&data);
    assert_eq!(poll(&mut s, 0).len(), 6, "six segments out");
    let from_peer = |n: u32, right: u32| TcpRepr {
        seq: REMOTE_SEQ + n * 10,
        ..dup_ack(LOCAL_SEQ, &[(1000, right)])
    };
    send!(s, 10, from_peer(0, 1500), &[b'a'; 10]);
    send!(s, 11, from_peer(1, 2000), &[b'b'; 10]);
    // The same SACK information again is no news: not a duplicate.
    send!(s, 12, from_peer(2, 2000), &[b'c'; 10]);
    let out = poll(&mut s, 12);
    assert!(
        !has_retransmission_of_first(&out, &data),
        "two duplicates are not enough: {out:?}"
    );
    send!(s, 13, from_peer(3, 2500), &[b'd'; 10]);
    let out = poll(&mut s, 13);
    assert!(
        has_retransmission_of_first(&out, &data),
        "third SACK-bearing data segment triggers fast retransmit: {out:?}"
    );
    assert_eq!(s.counters().fast_retransmits, 1, "counted once");
    assert_eq!(s.counters().timeouts, 0, "no RTO needed");
}

#[test]
fn three_segments_sacked_above_una_mean_it_is_lost() {
    // RFC 6675 §4 IsLost: DupThresh·SMSS SACKed above SND.UNA, from a single ACK.
    let mut s = established_sack();
    let data = pattern(6000, 6);
    s.send(&data);
    assert_eq!(poll(&mut s, 0).len(), 6, "six segments out");
    send!(s, 10, dup_ack(LOCAL_SEQ, &[(1000, 3000)]));
    assert!(
        !has_retransmission_of_first(&poll(&mut s, 10), &data),
        "two segments SACKed: not yet"
    );
    send!(s, 11, dup_ack(LOCAL_SEQ, &[(1000, 4000)]));
    assert!(
        has_retransmission_of_first(&poll(&mut s, 11), &data),
        "three segments SACKed: retransmit on the second duplicate"
    );
    assert!(s.cc().in_recovery(), "in fast recovery");
}

#[test]
fn zero_window_probe_then_reopen() {
    let mut s = established();
    send!(
        s,
        0,
        TcpRepr {
            window: 0,
            ..send_templ()
        }
    );
    assert_eq!(s.send(b"hello"), 5, "queued");
    recv!(s, 0, []);
    assert_eq!(s.next_timer(), Some(t(1000)), "persist timer");
    tick!(s, 1000);
    let probe = seg(recv_templ(), b"h");
    recv!(s, 1000, [probe.clone()]);
    // Still shut: the probe byte is not acknowledged.
    send!(
        s,
        1010,
        TcpRepr {
            window: 0,
            ..send_templ()
        }
    );
    recv!(s, 1010, []);
    assert_eq!(s.next_timer(), Some(t(3000)), "probe interval backs off");
    tick!(s, 3000);
    recv!(s, 3000, [probe]);
    assert_eq!(s.counters().window_probes, 2, "two probes");
    assert_eq!(
        s.counters().timeouts,
        0,
        "probes are not congestion timeouts"
    );
    send!(
        s,
        3010,
        TcpRepr {
            ack: Some(LOCAL_SEQ + 1),
            window: 4000,
            ..send_templ()
        }
    );
    recv!(
        s,
        3010,
        [seg(
            TcpRepr {
                seq: LOCAL_SEQ + 1,
                flags: TcpFlags::PSH,
                ..recv_templ()
            },
            b"ello"
        )]
    );
}

#[test]
fn nagle_off_sends_small_segments_at_once() {
    let mut s = established();
    s.send(&[1; 100]);
    s.send(&[2; 100]);
    recv!(
        s,
        0,
        [seg(
            TcpRepr {
                flags: TcpFlags::PSH,
                ..recv_templ()
            },
            &[[1u8; 100], [2u8; 100]].concat()
        )]
    );
    s.send(&[3; 100]);
    recv!(
        s,
        1,
        [seg(
            TcpRepr {
                seq: LOCAL_SEQ + 200,
                flags: TcpFlags::PSH,
                ..recv_templ()
            },
            &[3; 100]
        )]
    );
}

#[test]
fn nagle_on_holds_a_short_tail_until_acked() {
    let mut s = Tcb::new(
        TcbConfig {
            nagle: true,
            ..config()
        },
        &handshake(),
        t(0),
    );
    let data = pattern(2500, 2);
    s.send(&data);
    recv!(
        s,
        0,
        [
            seg(recv_templ(), &data[..1000]),
            seg(
                TcpRepr {
                    seq: LOCAL_SEQ + 1000,
                    ..recv_templ()
                },
                &data[1000..2000]
            ),
        ]
    );
    send!(
        s,
        10,
        TcpRepr {
            ack: Some(LOCAL_SEQ + 1000),
            ..send_templ()
        }
    );
    recv!(s, 10, []);
    send!(
        s,
        11,
        TcpRepr {
            ack: Some(LOCAL_SEQ + 2000),
            ..send_templ()
        }
    );
    recv!(
        s,
        11,
        [seg(
            TcpRepr {
                seq: LOCAL_SEQ + 2000,
                flags: TcpFlags::PSH,
                ..recv_templ()
            },
            &data[2000..]
        )]
    );
}

// ---------------------------------------------------------------------- RST, SYN, PAWS

#[test]
fn exact_rst_closes() {
    let mut s = established();
    send!(
        s,
        0,
        TcpRepr {
            flags: TcpFlags::RST,
            ack: None,
            ..send_templ()
        }
    );
    assert_eq!(s.state(), State::Closed, "closed");
    assert_eq!(s.close_reason(), Some(CloseReason::Reset), "by the peer");
    recv!(s, 0, []);
    assert_eq!(s.next_timer(), None, "no timers after CLOSED");
    send!(s, 1, send_templ(), &[] => Err(DropReason::Closed));
}

#[test]
fn in_window_rst_gets_a_rate_limited_challenge_ack() {
    let mut s = established();
    let rst = TcpRepr {
        seq: REMOTE_SEQ + 1,
        flags: TcpFlags::RST,
        ack: None,
        ..send_templ()
    };
    for i in 0..10 {
        send!(s, i, rst, &[] => Err(DropReason::RstChallenged));
        recv!(s, i, [seg(recv_templ(), &[])]);
    }
    send!(s, 10, rst, &[] => Err(DropReason::RstChallenged));
    recv!(s, 10, []);
    assert_eq!(s.counters().challenge_acks_suppressed, 1, "limit reached");
    send!(s, 1000, rst, &[] => Err(DropReason::RstChallenged));
    recv!(s, 1000, [seg(recv_templ(), &[])]);
    assert_eq!(s.state(), State::Established, "still open");
    assert_eq!(s.counters().rst_challenged, 12, "counted");
}

#[test]
fn out_of_window_rst_is_dropped_silently() {
    let mut s = established();
    send!(
        s,
        0,
        TcpRepr {
            seq: REMOTE_SEQ + RX_BUF as u32 + 10,
            flags: TcpFlags::RST,
            ack: None,
            ..send_templ()
        },
        &[] => Err(DropReason::RstOutOfWindow)
    );
    recv!(s, 0, []);
    assert_eq!(s.state(), State::Established, "still open");
}

#[test]
fn syn_in_established_gets_a_challenge_ack() {
    let mut s = established();
    send!(
        s,
        0,
        TcpRepr {
            flags: TcpFlags::SYN,
            ack: None,
            ..send_templ()
        },
        &[] => Err(DropReason::SynChallenged)
    );
    recv!(s, 0, [seg(recv_templ(), &[])]);
    assert_eq!(s.state(), State::Established, "still open");
}

#[test]
fn unacceptable_segments_are_acked_and_counted() {
    let mut s = established();
    send!(
        s,
        0,
        TcpRepr {
            ack: None,
            ..send_templ()
        },
        &[] => Err(DropReason::NoAck)
    );
    recv!(s, 0, []);
    send!(
        s,
        1,
        TcpRepr {
            ack: Some(LOCAL_SEQ + 5),
            ..send_templ()
        },
        &[] => Err(DropReason::AckTooNew)
    );
    recv!(s, 1, [seg(recv_templ(), &[])]);
    send!(
        s,
        2,
        TcpRepr {
            seq: REMOTE_SEQ + 5000,
            ..send_templ()
        },
        &[1; 10] => Err(DropReason::OutOfWindow)
    );
    recv!(s, 2, [seg(recv_templ(), &[])]);
    send!(
        s,
        3,
        TcpRepr {
            src_port: 1,
            ..send_templ()
        },
        &[] => Err(DropReason::WrongPorts)
    );
    let c = s.counters();
    assert_eq!(
        (c.no_ack, c.ack_too_new, c.out_of_window, c.wrong_ports),
        (1, 1, 1, 1),
        "each drop counted by reason"
    );
}

fn ts_opts(tsval: u32, tsecr: u32) -> TcpOptions {
    TcpOptions {
        timestamps: Some(Timestamps { tsval, tsecr }),
        ..TcpOptions::default()
    }
}

#[test]
fn timestamps_echo_rtt_and_paws() {
    let hs = Handshake {
        timestamps: Some(0),
        ..handshake()
    };
    let ack = TcpRepr {
        options: ts_opts(5000, 0),
        ..send_templ()
    };
    let mut s = Tcb::accept(config(), &hs, &ack, &[], t(0));
    assert_eq!(s.mss(), 988, "timestamps take 12 bytes of each segment");
    s.send(&[1; 10]);
    recv!(
        s,
        100,
        [seg(
            TcpRepr {
                flags: TcpFlags::PSH,
                options: ts_opts(100, 5000),
                ..recv_templ()
            },
            &[1; 10]
        )]
    );
    send!(
        s,
        130,
        TcpRepr {
            ack: Some(LOCAL_SEQ + 10),
            options: ts_opts(5010, 100),
            ..send_templ()
        }
    );
    assert_eq!(
        s.rtt().srtt(),
        Some(Duration::from_millis(30)),
        "RTT from the echoed TSval"
    );
    // PAWS: an older TSval is a stale duplicate; dropped and answered.
    send!(
        s,
        140,
        TcpRepr {
            ack: Some(LOCAL_SEQ + 10),
            options: ts_opts(4000, 100),
            ..send_templ()
        },
        &[9; 10] => Err(DropReason::Paws)
    );
    assert_eq!(s.recv_queue(), 0, "PAWS-dropped data is not delivered");
    recv!(
        s,
        140,
        [seg(
            TcpRepr {
                seq: LOCAL_SEQ + 10,
                options: ts_opts(140, 5010),
                ..recv_templ()
            },
            &[]
        )]
    );
    assert_eq!(s.counters().paws, 1, "counted");
}

// ---------------------------------------------------------------------- keep-alive

#[test]
fn keepalive_probes_after_idle_and_aborts_after_count_unanswered() {
    assert_eq!(
        TcbConfig::default().keepalive,
        None,
        "off by default (RFC 1122)"
    );
    assert_eq!(established().next_timer(), None, "no timer when off");
    let cfg = TcbConfig {
        keepalive: Some(Keepalive {
            idle: Duration::from_secs(10),
            interval: Duration::from_secs(1),
            count: 3,
        }),
        ..config()
    };
    let mut s = Tcb::new(cfg, &handshake(), t(0));
    assert_eq!(s.next_timer(), Some(t(10_000)), "first probe after idle");
    tick!(s, 9_999);
    recv!(s, 9_999, []);
    // RFC 9293 §3.8.4: SEG.SEQ = SND.NXT − 1, no data.
    let probe = seg(
        TcpRepr {
            seq: LOCAL_SEQ - 1,
            ..recv_templ()
        },
        &[],
    );
    tick!(s, 10_000);
    recv!(s, 10_000, [probe.clone()]);
    assert_eq!(s.next_timer(), Some(t(11_000)), "next probe after interval");
    // The peer answers: the idle period starts again.
    send!(s, 10_500, send_templ());
    assert_eq!(s.next_timer(), Some(t(20_500)), "answered: idle again");
    recv!(s, 10_500, []);
    // Data in flight: the retransmission timer rules, not keep-alive.
    s.send(b"x");
    assert_eq!(poll(&mut s, 10_600).len(), 1, "data sent");
    assert_eq!(
        s.next_timer(),
        Some(t(10_600) + s.rtt().rto()),
        "RTO, not keep-alive, while data is in flight"
    );
    send!(
        s,
        10_700,
        TcpRepr {
            ack: Some(LOCAL_SEQ + 1),
            ..send_templ()
        }
    );
    let probe = seg(
        TcpRepr {
            seq: LOCAL_SEQ,
            ..recv_templ()
        },
        &[],
    );
    assert_eq!(
        s.next_timer(),
        Some(t(20_700)),
        "idle from the last arrival"
    );
    // Nobody answers: three probes, then abort with RST.
    for ms in [20_700, 21_700, 22_700] {
        tick!(s, ms);
        recv!(s, ms, [probe.clone()]);
        assert_eq!(s.state(), State::Established, "still open at {ms}");
    }
    tick!(s, 23_699);
    recv!(s, 23_699, []);
    tick!(s, 23_700);
    assert_eq!(
        s.close_reason(),
        Some(CloseReason::KeepaliveTimeout),
        "aborted"
    );
    recv!(
        s,
        23_700,
        [seg(
            TcpRepr {
                seq: LOCAL_SEQ + 1,
                ack: None,
                flags: TcpFlags::RST,
                window: 0,
                ..recv_templ()
            },
            &[]
        )]
    );
    assert_eq!(s.counters().keepalive_probes, 4, "probes counted");
    assert_eq!(s.next_timer(), None, "closed: no timer");
}

// ---------------------------------------------------------------------- closing

#[test]
fn peer_closes_first_close_wait_last_ack_closed() {
    let mut s = close_wait();
    assert!(s.may_send(), "half-close: we still send");
    assert!(!s.may_recv(), "nothing more to read");
    s.send(b"bye");
    let ours = TcpRepr {
        ack: Some(REMOTE_SEQ + 1),
        ..recv_templ()
    };
    recv!(
        s,
        1,
        [seg(
            TcpRepr {
                flags: TcpFlags::PSH,
                ..ours
            },
            b"bye"
        )]
    );
    s.close();
    assert_eq!(s.state(), State::LastAck, "close in CLOSE-WAIT");
    assert!(!s.may_send(), "no sending after close");
    recv!(
        s,
        2,
        [seg(
            TcpRepr {
                seq: LOCAL_SEQ + 3,
                flags: TcpFlags::FIN,
                ..ours
            },
            &[]
        )]
    );
    let peer = TcpRepr {
        seq: REMOTE_SEQ + 1,
        ..send_templ()
    };
    send!(
        s,
        10,
        TcpRepr {
            ack: Some(LOCAL_SEQ + 3),
            ..peer
        }
    );
    assert_eq!(s.state(), State::LastAck, "FIN not yet acknowledged");
    send!(
        s,
        11,
        TcpRepr {
            ack: Some(LOCAL_SEQ + 4),
            ..peer
        }
    );
    assert_eq!(s.state(), State::Closed, "LAST-ACK → CLOSED");
    assert_eq!(s.close_reason(), Some(CloseReason::Normal), "orderly");
}

#[test]
fn we_close_first_fin_wait_then_time_wait() {
    let mut s = fin_wait_2();
    assert!(s.may_recv(), "half-close: the peer still sends");
    let peer = TcpRepr {
        ack: Some(LOCAL_SEQ + 1),
        ..send_templ()
    };
    send!(s, 2, peer, b"late data");
    send!(
        s,
        3,
        TcpRepr {
            seq: REMOTE_SEQ + 9,
            flags: TcpFlags::FIN,
            ..peer
        }
    );
    assert_eq!(s.state(), State::TimeWait, "FIN-WAIT-2 → TIME-WAIT");
    let ack = seg(
        TcpRepr {
            seq: LOCAL_SEQ + 1,
            ack: Some(REMOTE_SEQ + 10),
            window: (RX_BUF - 9) as u16,
            ..recv_templ()
        },
        &[],
    );
    recv!(s, 3, [ack.clone()]);
    let mut out = [0u8; 16];
    assert_eq!(s.recv(&mut out), 9, "data from FIN-WAIT-2 readable");
    assert_eq!(&out[..9], b"late data", "bytes");
    assert_eq!(s.next_timer(), Some(t(60_003)), "2·MSL timer");
    // A retransmitted FIN is ACKed again and restarts the timer.
    send!(
        s,
        1000,
        TcpRepr {
            seq: REMOTE_SEQ + 9,
            flags: TcpFlags::FIN,
            ..peer
        },
        &[] => Err(DropReason::OutOfWindow)
    );
    // Reading 9 bytes is below the SWS threshold: the window stays where it was.
    recv!(s, 1000, [ack]);
    assert_eq!(s.next_timer(), Some(t(61_000)), "restarted");
    tick!(s, 61_000);
    assert_eq!(s.state(), State::Closed, "TIME-WAIT expired");
    assert_eq!(s.close_reason(), Some(CloseReason::Normal), "orderly");
}

#[test]
fn fin_wait_1_fin_retransmitted_on_rto() {
    let mut s = fin_wait_1();
    tick!(s, 1000);
    recv!(
        s,
        1000,
        [seg(
            TcpRepr {
                flags: TcpFlags::FIN,
                ..recv_templ()
            },
            &[]
        )]
    );
}

#[test]
fn fin_wait_1_fin_and_ack_together_go_to_time_wait() {
    let mut s = fin_wait_1();
    send!(
        s,
        5,
        TcpRepr {
            ack: Some(LOCAL_SEQ + 1),
            flags: TcpFlags::FIN,
            ..send_templ()
        }
    );
    assert_eq!(s.state(), State::TimeWait, "FIN-WAIT-1 → TIME-WAIT");
}

#[test]
fn simultaneous_close_goes_through_closing() {
    let mut s = fin_wait_1();
    send!(
        s,
        5,
        TcpRepr {
            flags: TcpFlags::FIN,
            ..send_templ()
        }
    );
    assert_eq!(s.state(), State::Closing, "FIN-WAIT-1 → CLOSING");
    recv!(
        s,
        5,
        [seg(
            TcpRepr {
                seq: LOCAL_SEQ + 1,
                ack: Some(REMOTE_SEQ + 1),
                ..recv_templ()
            },
            &[]
        )]
    );
    send!(
        s,
        6,
        TcpRepr {
            seq: REMOTE_SEQ + 1,
            ack: Some(LOCAL_SEQ + 1),
            ..send_templ()
        }
    );
    assert_eq!(s.state(), State::TimeWait, "CLOSING → TIME-WAIT");
}

#[test]
fn close_sends_fin_after_queued_data() {
    let mut s = established();
    s.send(&[5; 1500]);
    s.close();
    assert_eq!(s.send(b"x"), 0, "nothing queued after close");
    recv!(
        s,
        0,
        [
            seg(recv_templ(), &[5; 1000]),
            seg(
                TcpRepr {
                    seq: LOCAL_SEQ + 1000,
                    flags: TcpFlags::PSH | TcpFlags::FIN,
                    ..recv_templ()
                },
                &[5; 500]
            ),
        ]
    );
    send!(
        s,
        10,
        TcpRepr {
            ack: Some(LOCAL_SEQ + 1501),
            ..send_templ()
        }
    );
    assert_eq!(s.state(), State::FinWait2, "data and FIN acknowledged");
}

#[test]
fn abort_sends_rst() {
    let mut s = established();
    s.send(&[1; 100]);
    assert_eq!(poll(&mut s, 0).len(), 1, "data out");
    s.abort();
    assert_eq!(s.state(), State::Closed, "closed at once");
    recv!(
        s,
        1,
        [seg(
            TcpRepr {
                seq: LOCAL_SEQ + 100,
                ack: None,
                flags: TcpFlags::RST,
                window: 0,
                ..recv_templ()
            },
            &[]
        )]
    );
    recv!(s, 2, []);
    assert_eq!(s.close_reason(), Some(CloseReason::Aborted), "reason");
}

#[test]
fn sequence_numbers_wrap_around_2_pow_32() {
    let hs = Handshake {
        iss: SeqNumber(u32::MAX - 1500),
        irs: SeqNumber(u32::MAX - 500),
        ..handshake()
    };
    let mut s = Tcb::new(config(), &hs, t(0));
    let local = hs.iss + 1;
    let remote = hs.irs + 1;
    let data = pattern(3000, 6);
    s.send(&data);
    let out = poll(&mut s, 0);
    assert_eq!(out.len(), 3, "three segments");
    assert_eq!(out[2].0.seq, local + 2000, "third segment across the wrap");
    assert_eq!(out[2].0.seq.0, 500, "wrapped value");
    let sent: Vec<u8> = out.iter().flat_map(|(_, p)| p.clone()).collect();
    assert_eq!(sent, data, "bytes in order");
    let peer = TcpRepr {
        seq: remote,
        ack: Some(local + 3000),
        ..send_templ()
    };
    send!(s, 5, peer, &data[..1000]);
    send!(
        s,
        5,
        TcpRepr {
            seq: remote + 1000,
            ..peer
        },
        &data[1000..2000]
    );
    assert_eq!(s.snd_una(), local + 3000, "SND.UNA wrapped");
    assert_eq!(s.rcv_nxt(), remote + 2000, "RCV.NXT wrapped");
    assert!(s.rcv_nxt().0 < 2000, "past zero");
    let mut buf = vec![0; 4000];
    assert_eq!(s.recv(&mut buf), 2000, "readable");
    assert_eq!(&buf[..2000], &data[..2000], "bytes");
    assert_eq!(poll(&mut s, 5).len(), 1, "two full segments: one ACK");
    assert_eq!(s.next_timer(), None, "all acknowledged, nothing to ACK");
}

// ---------------------------------------------------------------------- loopback simulation

/// xorshift64*: a tiny seeded generator, so the simulation is deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

struct InFlight {
    at: Instant,
    to_server: bool,
    repr: TcpRepr,
    payload: Vec<u8>,
}

struct Side {
    tcb: Tcb,
    data: Vec<u8>,
    queued: usize,
    received: Vec<u8>,
}

impl Side {
    fn app(&mut self) {
        if self.queued < self.data.len() {
            self.queued += self.tcb.send(&self.data[self.queued..]);
            if self.queued == self.data.len() {
                self.tcb.close();
            }
        }
        let mut buf = [0u8; 8192];
        loop {
            let n = self.tcb.recv(&mut buf);
            if n == 0 {
                break;
            }
            self.received.extend_from_slice(&buf[..n]);
        }
    }
}

/// The simulated link's properties.
#[derive(Clone, Copy, Debug)]
struct Link {
    /// Percent of segments lost.
    loss: u64,
    one_way_ms: u64,
    /// Uniform extra delay in [0, jitter_ms) for every segment. The simulation sends a burst
    /// at one instant, so any jitter shuffles whole bursts (heavy reordering).
    jitter_ms: u64,
    /// Percent of segments held back by an extra 1–3 ms (sparse reordering: the segments sent
    /// in that time overtake it).
    reorder: u64,
}

/// Puts what `side` has to send on the link (lost, delayed, jittered, sometimes duplicated).
fn link_send(
    side: &mut Side,
    to_server: bool,
    now: Instant,
    rng: &mut Rng,
    link: &mut Vec<InFlight>,
    cfg: &Link,
) {
    side.tcb
        .poll_transmit(now, |repr, payload| {
            if rng.chance(cfg.loss) {
                return Ok::<(), ()>(());
            }
            let mut bytes = vec![0; payload.len()];
            payload.copy_to(&mut bytes);
            let copies = if rng.chance(1) { 2 } else { 1 };
            for _ in 0..copies {
                let mut jitter = if cfg.jitter_ms == 0 {
                    0
                } else {
                    rng.next() % (cfg.jitter_ms * 1_000)
                };
                if rng.chance(cfg.reorder) {
                    jitter += 1_000 + rng.next() % 2_000;
                }
                link.push(InFlight {
                    at: now + Duration::from_micros(cfg.one_way_ms * 1_000 + jitter),
                    to_server,
                    repr: *repr,
                    payload: bytes.clone(),
                });
            }
            Ok(())
        })
        .expect("the link never refuses");
}

/// What one simulated transfer measured.
#[derive(Clone, Copy, Debug)]
struct SimResult {
    /// Simulated time until both sides had received every byte (the close and TIME-WAIT that
    /// follow are checked but not counted).
    completion: Duration,
    /// RTO expiries and fast/SACK retransmissions, both sides.
    timeouts: u64,
    fast_retransmits: u64,
}

/// Two Tcbs (the client one built with the same constructor, ISS/IRS swapped) exchange 1 MB
/// each way over a [`Link`] (loss, delay, jitter, sparse reordering) that also duplicates 1 %
/// of segments. Asserts every byte arrives exactly once and in order, and an orderly
/// close; returns the simulated completion time.
fn loopback(seed: u64, link_cfg: Link, algorithm: Algorithm) -> SimResult {
    const SIZE: usize = 1 << 20;
    let cfg = TcbConfig {
        send_buffer: 64 * 1024,
        recv_buffer: 64 * 1024,
        mss: 1460,
        cc: algorithm,
        max_retransmits: 30,
        time_wait: Duration::from_secs(1),
        ..TcbConfig::default()
    };
    let server_hs = Handshake {
        local_port: 443,
        remote_port: 50_000,
        iss: SeqNumber(u32::MAX - 300_000),
        irs: SeqNumber(77),
        peer_mss: 1460,
        window_scale: Some((2, 2)),
        sack_permitted: true,
        timestamps: Some(1000),
        peer_window: ((64 * 1024) >> 2) as u16,
    };
    let client_hs = Handshake {
        local_port: 50_000,
        remote_port: 443,
        iss: server_hs.irs,
        irs: server_hs.iss,
        timestamps: Some(9000),
        ..server_hs
    };
    let mut server = Side {
        tcb: Tcb::new(cfg, &server_hs, Instant::ZERO),
        data: pattern(SIZE, 0x5a),
        queued: 0,
        received: Vec::new(),
    };
    let mut client = Side {
        tcb: Tcb::new(cfg, &client_hs, Instant::ZERO),
        data: pattern(SIZE, 0xc3),
        queued: 0,
        received: Vec::new(),
    };
    let mut rng = Rng(seed);
    let mut link: Vec<InFlight> = Vec::new();
    let mut now = Instant::ZERO;
    let mut data_done = None;
    let step = Duration::from_millis(1);
    let deadline = Instant::from_secs(300);
    while now < deadline {
        // Deliver what is due, in arrival order.
        link.sort_by_key(|p| p.at);
        let due = link.partition_point(|p| p.at <= now);
        let arrived: Vec<InFlight> = link.drain(..due).collect();
        for p in arrived {
            let side = if p.to_server {
                &mut server
            } else {
                &mut client
            };
            if side.tcb.state() == State::Closed && !p.repr.flags.contains(TcpFlags::RST) {
                // The peer's stack no longer has the connection (its TIME-WAIT ended before our
                // last retransmission): it answers with an RST (RFC 9293 §3.10.7.1).
                let (seq, ack) = match p.repr.ack {
                    Some(ack) => (ack, None),
                    None => (SeqNumber(0), Some(p.repr.seq + p.repr.segment_len() as u32)),
                };
                link.push(InFlight {
                    at: now + Duration::from_millis(link_cfg.one_way_ms),
                    to_server: !p.to_server,
                    repr: TcpRepr {
                        src_port: p.repr.dst_port,
                        dst_port: p.repr.src_port,
                        seq,
                        ack,
                        flags: TcpFlags::RST,
                        window: 0,
                        options: TcpOptions::default(),
                        payload_len: 0,
                    },
                    payload: Vec::new(),
                });
                continue;
            }
            // Drops are expected here (duplicates, stale retransmissions); they are counted.
            let _ = side.tcb.process(now, &p.repr, &p.payload);
            // Replies go out per segment, as `Stack::receive` sends them.
            link_send(side, !p.to_server, now, &mut rng, &mut link, &link_cfg);
        }
        for (side, to_server) in [(&mut server, false), (&mut client, true)] {
            side.tcb.on_timer(now);
            side.app();
            link_send(side, to_server, now, &mut rng, &mut link, &link_cfg);
        }
        if data_done.is_none() && server.received.len() == SIZE && client.received.len() == SIZE {
            data_done = Some(now);
        }
        let done = |s: &Side| s.received.len() == SIZE && matches!(s.tcb.state(), State::Closed);
        if done(&server) && done(&client) && link.is_empty() {
            break;
        }
        now += step;
    }
    assert!(
        now < deadline,
        "seed {seed}: transfer finished in time (server got {}, client got {}, states {} / {}, \
         server {:?}, client {:?})",
        server.received.len(),
        client.received.len(),
        server.tcb.state(),
        client.tcb.state(),
        server.tcb.counters(),
        client.tcb.counters(),
    );
    assert!(
        server.received == client.data,
        "seed {seed}: server got the client's megabyte exactly once, in order"
    );
    assert!(
        client.received == server.data,
        "seed {seed}: client got the server's megabyte exactly once, in order"
    );
    for s in [&server, &client] {
        assert_eq!(
            s.tcb.close_reason(),
            Some(CloseReason::Normal),
            "seed {seed}: orderly close"
        );
    }
    let c = [server.tcb.counters(), client.tcb.counters()];
    SimResult {
        completion: data_done.expect("all data arrived") - Instant::ZERO,
        timeouts: c[0].timeouts + c[1].timeouts,
        fast_retransmits: c[0].fast_retransmits + c[1].fast_retransmits,
    }
}

#[test]
fn idle_timeout_resets() {
    let mut s = Tcb::new(
        TcbConfig {
            idle_timeout: Some(Duration::from_secs(10)),
            ..config()
        },
        &handshake(),
        t(0),
    );
    send!(s, 5_000, send_templ());
    assert_eq!(
        s.next_timer(),
        Some(t(15_000)),
        "idle deadline follows arrivals"
    );
    tick!(s, 14_999);
    assert_eq!(s.state(), State::Established, "not yet");
    tick!(s, 15_000);
    assert_eq!(s.close_reason(), Some(CloseReason::TimedOut), "idle");
    recv!(
        s,
        15_000,
        [seg(
            TcpRepr {
                ack: None,
                flags: TcpFlags::RST,
                window: 0,
                ..recv_templ()
            },
            &[]
        )]
    );
}

#[test]
fn arbitrary_segments_never_panic() {
    for seed in 1..=20u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut s = if seed % 2 == 0 {
            established_sack()
        } else {
            Tcb::new(
                config(),
                &Handshake {
                    timestamps: Some(7),
                    window_scale: Some((14, 14)),
                    ..handshake()
                },
                t(0),
            )
        };
        s.send(&[1; 5000]);
        let payload = [0xa5u8; 1500];
        for i in 0..2_000u64 {
            let near = |rng: &mut Rng, base: SeqNumber| {
                if rng.chance(50) {
                    base + (rng.next() % 70_000) as u32 - 35_000
                } else {
                    SeqNumber(rng.next() as u32)
                }
            };
            let mut options = TcpOptions::default();
            if rng.chance(30) {
                options.timestamps = Some(Timestamps {
                    tsval: rng.next() as u32,
                    tsecr: rng.next() as u32,
                });
            }
            if rng.chance(30) {
                let left = near(&mut rng, LOCAL_SEQ);
                options.sack_blocks.push(SackBlock {
                    left,
                    right: left + (rng.next() % 5000) as u32,
                });
            }
            let repr = TcpRepr {
                seq: near(&mut rng, REMOTE_SEQ),
                ack: rng.chance(90).then(|| near(&mut rng, LOCAL_SEQ)),
                flags: TcpFlags((rng.next() & 0x0f) as u8),
                window: rng.next() as u16,
                options,
                ..send_templ()
            };
            let len = (rng.next() % 1500) as usize;
            let now = i * 7;
            let _ = deliver(&mut s, now, repr, &payload[..len]);
            s.on_timer(t(now));
            let _ = poll(&mut s, now);
            let mut out = [0u8; 700];
            s.recv(&mut out);
            if rng.chance(5) {
                s.send(&[2; 3000]);
            }
        }
        assert!(
            s.send_queue() <= config().send_buffer && s.recv_queue() <= RX_BUF,
            "seed {seed}: buffers stay bounded"
        );
    }
}

/// A link with 5 ms one-way delay and 3 ms of jitter on every segment.
fn jittery(loss: u64) -> Link {
    Link {
        loss,
        one_way_ms: 5,
        jitter_ms: 3,
        reorder: 0,
    }
}

#[test]
fn loopback_clean_link() {
    loopback(1, jittery(0), Algorithm::NewReno);
}

#[test]
fn loopback_lossy_reordering_link_newreno() {
    loopback(0x1234_5678, jittery(3), Algorithm::NewReno);
}

#[test]
fn loopback_lossy_reordering_link_cubic() {
    loopback(0xdead_beef, jittery(5), Algorithm::Cubic);
}

/// The loss × delay × reordering matrix: every cell must deliver every byte exactly once, in
/// order (checked inside [`loopback`]), and finish within a bound derived from the loss-free,
/// reordering-free cell of the same delay. The table of simulated completion times is printed
/// (`cargo test -p tern --lib loopback_loss_matrix -- --nocapture`).
///
/// Dimensions: loss 0–10 % (each direction, data and ACKs alike), one-way delay 1/5/20 ms,
/// sparse reordering 0 or 3 % of segments held back 1–3 ms (overtaken by whole bursts, so it
/// causes spurious fast retransmits), plus 1 % duplication everywhere.
///
/// Bound per cell, from the loss-free, reordering-free cell of the same delay (`clean`):
/// `clean × (1 + 2·loss%) + loss% × 1.5 s (+ 4 × clean + 0.5 s with reordering)`. Loss shrinks
/// the window (each loss episode halves cwnd), and a lost retransmission or a tail loss costs an
/// RTO (200 ms floor, doubling when it repeats); spurious fast retransmits from reordering
/// halve cwnd too. Every loss recovered by RTO alone (no fast retransmit) blows the bound, as it
/// did before duplicate ACKs were counted per RFC 6675 (e.g. 1 % loss at 20 ms took 6.6 s).
/// Sanity: the loss-free time grows with the delay, and at each delay the 10 % cell is slower
/// than the loss-free one.
#[test]
fn loopback_loss_matrix() {
    const LOSSES: [u64; 5] = [0, 1, 2, 5, 10];
    const DELAYS: [u64; 3] = [1, 5, 20];
    /// Reordering, percent of segments held back.
    const JITTERS: [u64; 2] = [0, 3];
    let mut table = Vec::new();
    for (di, &one_way_ms) in DELAYS.iter().enumerate() {
        for &jitter_ms in &JITTERS {
            for &loss in &LOSSES {
                let seed = 1_000 * (di as u64 + 11) + 10 * jitter_ms + loss;
                let algorithm = if (loss + jitter_ms) % 2 == 0 {
                    Algorithm::Cubic
                } else {
                    Algorithm::NewReno
                };
                let link = Link {
                    loss,
                    one_way_ms,
                    jitter_ms: 0,
                    reorder: jitter_ms,
                };
                let r = loopback(seed, link, algorithm);
                table.push((one_way_ms, jitter_ms, loss, algorithm, r));
            }
        }
    }
    println!(
        "loopback 1 MiB each way: simulated ms until both sides had every byte, \
         c/n = CUBIC/NewReno, [RTO expiries / fast+SACK retransmissions]"
    );
    print!("{:>14}", "delay/reorder");
    for loss in LOSSES {
        print!("{:>20}", format!("{loss} % loss"));
    }
    println!();
    for &d in &DELAYS {
        for &j in &JITTERS {
            print!("{:>14}", format!("{d} ms / {j} %"));
            for &(_, _, _, alg, r) in table.iter().filter(|c| c.0 == d && c.1 == j) {
                let tag = if alg == Algorithm::Cubic { 'c' } else { 'n' };
                print!(
                    "{:>20}",
                    format!(
                        "{} {tag} [{}/{}]",
                        r.completion.as_millis(),
                        r.timeouts,
                        r.fast_retransmits
                    )
                );
            }
            println!();
        }
    }
    let clean = |d: u64| {
        table
            .iter()
            .find(|c| c.0 == d && c.1 == 0 && c.2 == 0)
            .map(|c| c.4.completion.as_millis())
            .expect("clean cell")
    };
    for &(d, j, loss, alg, r) in &table {
        let base = clean(d);
        let reorder_budget = if j > 0 { 4 * base + 500 } else { 0 };
        let bound = base * (1 + 2 * loss) + 1_500 * loss + reorder_budget;
        let got = r.completion.as_millis();
        assert!(
            got <= bound,
            "{d} ms delay, {j} % reordered, {loss} % loss ({alg:?}): {got} ms exceeds the bound \
             {bound} ms (loss-free {base} ms)"
        );
    }
    for w in DELAYS.windows(2) {
        assert!(
            clean(w[0]) < clean(w[1]),
            "loss-free completion grows with the delay: {} ms at {} ms, {} ms at {} ms",
            clean(w[0]),
            w[0],
            clean(w[1]),
            w[1]
        );
    }
    for &d in &DELAYS {
        let worst = table
            .iter()
            .find(|c| c.0 == d && c.1 == 0 && c.2 == 10)
            .map(|c| c.4.completion.as_millis())
            .expect("10 % cell");
        assert!(
            worst > clean(d),
            "{d} ms: 10 % loss ({worst} ms) is slower than none ({} ms)",
            clean(d)
        );
    }
}

// ---------------------------------------------------------------------- release

#[test]
fn released_connection_drops_unread_data_sends_fin_and_resets_on_new_data() {
    let mut s = established();
    assert_eq!(
        deliver(&mut s, 0, send_templ(), &pattern(100, 0)),
        Ok(()),
        "data before the release"
    );
    s.release();
    assert_eq!(s.recv_queue(), 0, "what was not read is dropped");
    assert_eq!(s.state(), State::FinWait1, "a FIN follows");
    let out = poll(&mut s, 1);
    assert_eq!(out.len(), 1, "one segment: {out:?}");
    assert!(out[0].0.flags.contains(TcpFlags::FIN), "the FIN: {out:?}");
    assert_eq!(
        out[0].0.ack,
        Some(REMOTE_SEQ + 100),
        "the data is acknowledged"
    );

    // A retransmission of what already arrived is not new data: no reset (it is an old
    // segment, dropped with an ACK as always).
    assert_eq!(
        deliver(&mut s, 2, send_templ(), &pattern(100, 0)),
        Err(DropReason::OutOfWindow)
    );
    assert_eq!(s.state(), State::FinWait1, "still closing politely");

    // New data: nobody will read it.
    let more = TcpRepr {
        seq: REMOTE_SEQ + 100,
        ..send_templ()
    };
    assert_eq!(
        deliver(&mut s, 3, more, b"more"),
        Err(DropReason::DataAfterRelease)
    );
    assert_eq!(s.state(), State::Closed);
    assert_eq!(s.close_reason(), Some(CloseReason::Aborted));
    assert_eq!(s.counters().data_after_release, 1, "counted");
    let out = poll(&mut s, 3);
    assert!(
        out.iter().any(|(r, _)| r.flags.contains(TcpFlags::RST)),
        "an RST tells the peer: {out:?}"
    );
}

// ---------------------------------------------------------------------- orphans

/// [`config`] with a 5 s orphan timeout.
fn orphan_config() -> TcbConfig {
    TcbConfig {
        orphan_timeout: Some(Duration::from_secs(5)),
        ..config()
    }
}

fn orphan_rst() -> Seg {
    seg(
        TcpRepr {
            seq: LOCAL_SEQ + 1,
            ack: None,
            flags: TcpFlags::RST,
            window: 0,
            ..recv_templ()
        },
        &[],
    )
}

#[test]
fn released_fin_wait_2_is_reset_at_the_orphan_timeout_whatever_the_peer_acks() {
    let mut s = Tcb::new(orphan_config(), &handshake(), t(0));
    s.release();
    assert_eq!(s.next_timer(), None, "no clock yet: armed by the next poll");
    recv!(
        s,
        10,
        [seg(
            TcpRepr {
                flags: TcpFlags::FIN,
                ..recv_templ()
            },
            &[]
        )]
    );
    let ack = TcpRepr {
        ack: Some(LOCAL_SEQ + 1),
        ..send_templ()
    };
    send!(s, 20, ack);
    assert_eq!(s.state(), State::FinWait2);
    assert_eq!(s.next_timer(), Some(t(5_010)), "release (first poll) + 5 s");
    // A peer that never sends its FIN but keeps the path warm with bare ACKs (each would
    // reset an idle timer) does not move the deadline.
    for ms in (1_000..5_010).step_by(1_000) {
        send!(s, ms, ack);
        tick!(s, ms);
        recv!(s, ms, []);
        assert_eq!(s.state(), State::FinWait2, "still waiting at {ms} ms");
        assert_eq!(s.next_timer(), Some(t(5_010)), "not extended at {ms} ms");
    }
    tick!(s, 5_009);
    assert_eq!(s.state(), State::FinWait2, "not before the deadline");
    tick!(s, 5_010);
    assert_eq!(s.state(), State::Closed);
    assert_eq!(s.close_reason(), Some(CloseReason::OrphanTimeout));
    recv!(s, 5_010, [orphan_rst()]);
    assert_eq!(s.next_timer(), None, "nothing left");
}

#[test]
fn released_fin_wait_1_against_a_zero_window_is_reset_at_the_orphan_timeout() {
    let mut s = Tcb::new(orphan_config(), &handshake(), t(0));
    let shut = TcpRepr {
        window: 0,
        ..send_templ()
    };
    send!(s, 0, shut);
    assert_eq!(s.send(b"hello"), 5, "queued");
    s.release();
    recv!(s, 0, []);
    assert_eq!(s.state(), State::FinWait1, "the FIN waits behind the data");
    // The peer answers every persist probe with its window still shut.
    let mut probes = 0;
    for _ in 0..100 {
        let Some(due) = s.next_timer() else { break };
        if due >= t(5_000) {
            break;
        }
        let ms = due.as_micros() / 1_000;
        tick!(s, ms);
        probes += poll(&mut s, ms).len();
        send!(s, ms + 1, shut);
    }
    assert!(probes >= 2, "probed while the window stayed shut: {probes}");
    assert_eq!(
        s.state(),
        State::FinWait1,
        "still probing before the deadline"
    );
    assert_eq!(
        s.next_timer(),
        Some(t(5_000)),
        "the orphan deadline is next"
    );
    tick!(s, 5_000);
    assert_eq!(s.close_reason(), Some(CloseReason::OrphanTimeout));
    // The RST carries SND.MAX: past the probe byte in flight.
    let out = poll(&mut s, 5_000);
    assert_eq!(out.len(), 1, "one RST: {out:?}");
    assert_eq!(out[0].0.flags, TcpFlags::RST, "RST: {out:?}");
    assert_eq!(out[0].0.seq, LOCAL_SEQ + 1, "after the probe byte: {out:?}");
}

#[test]
fn closes_within_the_orphan_timeout_are_untouched() {
    // We close first: FIN-WAIT-1 → TIME-WAIT at 100 ms, which has its own (60 s) end.
    let mut s = Tcb::new(orphan_config(), &handshake(), t(0));
    s.release();
    assert_eq!(poll(&mut s, 0).len(), 1, "the FIN");
    send!(
        s,
        100,
        TcpRepr {
            ack: Some(LOCAL_SEQ + 1),
            flags: TcpFlags::FIN,
            ..send_templ()
        }
    );
    assert_eq!(s.state(), State::TimeWait);
    assert_eq!(
        s.next_timer(),
        Some(t(60_100)),
        "TIME-WAIT, not the orphan bound"
    );
    tick!(s, 5_000);
    assert_eq!(s.state(), State::TimeWait, "the orphan deadline is gone");
    tick!(s, 60_100);
    assert_eq!(s.close_reason(), Some(CloseReason::Normal));

    // The peer closed first: LAST-ACK → CLOSED on its ACK.
    let mut s = Tcb::new(orphan_config(), &handshake(), t(0));
    send!(
        s,
        0,
        TcpRepr {
            flags: TcpFlags::FIN,
            ..send_templ()
        }
    );
    assert_eq!(s.state(), State::CloseWait);
    s.release();
    assert_eq!(s.state(), State::LastAck);
    assert_eq!(poll(&mut s, 1).len(), 1, "our FIN (with the ACK of theirs)");
    assert!(s.next_timer().is_some_and(|d| d <= t(5_001)), "bounded");
    send!(
        s,
        50,
        TcpRepr {
            seq: REMOTE_SEQ + 1,
            ack: Some(LOCAL_SEQ + 1),
            ..send_templ()
        }
    );
    assert_eq!(s.close_reason(), Some(CloseReason::Normal));
    recv!(s, 5_001, []);
}

#[test]
fn orphan_timeout_only_applies_to_released_connections_and_can_be_off() {
    // A half-close by `close` keeps reading: FIN-WAIT-2 is the application's to end.
    let mut s = Tcb::new(orphan_config(), &handshake(), t(0));
    s.close();
    assert_eq!(poll(&mut s, 0).len(), 1, "the FIN");
    send!(
        s,
        1,
        TcpRepr {
            ack: Some(LOCAL_SEQ + 1),
            ..send_templ()
        }
    );
    assert_eq!(s.state(), State::FinWait2);
    assert_eq!(s.next_timer(), None, "no orphan deadline without a release");

    let mut s = Tcb::new(
        TcbConfig {
            orphan_timeout: None,
            ..config()
        },
        &handshake(),
        t(0),
    );
    s.release();
    assert_eq!(poll(&mut s, 0).len(), 1, "the FIN");
    send!(
        s,
        1,
        TcpRepr {
            ack: Some(LOCAL_SEQ + 1),
            ..send_templ()
        }
    );
    assert_eq!(s.next_timer(), None, "off");
}

// ---------------------------------------------------------------------- idle buffers

#[test]
fn idle_buffers_are_handed_out_only_when_empty_and_written_to() {
    let mut s = established_sack();
    assert!(!s.buffers_touched(), "a new connection has written nothing");
    assert!(s.idle_buffers().iter().all(Option::is_none));
    // Out-of-order bytes sit past the readable ones: the receive ring is "empty" but holds
    // them, so it is not handed out.
    let data = pattern(1500, 3);
    deliver(
        &mut s,
        0,
        TcpRepr {
            seq: REMOTE_SEQ + 1000,
            ..send_templ()
        },
        &data[1000..],
    )
    .expect("out of order accepted");
    assert_eq!(s.recv_queue(), 0);
    assert!(s.buffers_touched());
    assert!(s.idle_buffers()[1].is_none(), "reassembly holds bytes");
    // The gap fills and the application reads everything: now it is idle.
    deliver(&mut s, 1, send_templ(), &data[..1000]).expect("in order");
    let mut out = vec![0; 2000];
    assert_eq!(s.recv(&mut out), 1500);
    assert_eq!(&out[..1500], &data[..]);
    // Unacknowledged bytes keep the send ring.
    assert_eq!(s.send(b"response"), 8);
    let [tx, rx] = s.idle_buffers();
    assert!(tx.is_none(), "8 bytes not acknowledged");
    assert_eq!(
        rx.map(|b| b.len()),
        Some(RX_BUF),
        "the whole receive storage"
    );
    let _ = poll(&mut s, 2);
    deliver(
        &mut s,
        3,
        TcpRepr {
            seq: REMOTE_SEQ + 1500,
            ack: Some(LOCAL_SEQ + 8),
            ..send_templ()
        },
        &[],
    )
    .expect("ack");
    assert_eq!(s.send_queue(), 0);
    let [tx, rx] = s.idle_buffers();
    assert!(tx.is_some(), "all acknowledged");
    assert!(rx.is_none(), "handed out already, not written since");
    assert!(!s.buffers_touched());
    // Used again afterwards: the bytes round-trip as before.
    let more = pattern(700, 9);
    deliver(
        &mut s,
        4,
        TcpRepr {
            seq: REMOTE_SEQ + 1500,
            ack: Some(LOCAL_SEQ + 8),
            ..send_templ()
        },
        &more,
    )
    .expect("more data");
    assert_eq!(s.recv(&mut out), 700);
    assert_eq!(&out[..700], &more[..]);
}

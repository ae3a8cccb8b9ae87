//! Unit tests of the session cache: L1 bounds and levels, `take` semantics, and the sync's
//! datagram codec, MAC and replay window.

use super::sync::{self, decode, encode, Kind, Refused, ReplayWindow, Update};
use super::*;
use aws_lc_rs::hmac;

fn key(secret: &[u8]) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, secret)
}

fn update(seq: u64, time_ms: u64) -> Update {
    Update {
        kind: Kind::New,
        sender: 7,
        seq,
        time_ms,
        key: vec![1; 32],
        value: vec![2; 100],
    }
}

#[test]
fn l1_is_bounded_and_evicts_the_oldest() {
    let mut l1 = L1Cache::new(3);
    for i in 0u8..10 {
        l1.put(vec![i], vec![i]);
        assert!(l1.map.len() <= 3);
        assert!(l1.order.len() <= 6);
    }
    assert_eq!(l1.get(&[9]), Some(vec![9]));
    assert_eq!(l1.get(&[6]), None);
    // Removals leave stale keys in `order`; they stay bounded too.
    for i in 10u8..100 {
        l1.put(vec![i], vec![i]);
        l1.remove(&[i]);
        assert!(l1.order.len() <= 6, "order grew to {}", l1.order.len());
    }
    assert_eq!(L1Cache::new(0).map.len(), 0);
}

#[test]
fn get_hits_l1_then_l2_and_take_deletes_everywhere() {
    let store = Store::new(100, 10, None);
    assert!(store.put(b"a".to_vec(), b"1".to_vec()));
    let before = stats();
    assert_eq!(store.get(b"a"), Some(b"1".to_vec()));
    // At least: other tests run in parallel and share the process-wide counters.
    assert!(stats().hits_l1 > before.hits_l1);
    // Another thread (worker) finds it in L2, then in its own L1.
    std::thread::scope(|s| {
        s.spawn(|| {
            assert_eq!(store.get(b"a"), Some(b"1".to_vec()));
            assert_eq!(store.get(b"a"), Some(b"1".to_vec()));
        });
    });
    // `take` is single-use for every worker, even one holding an L1 copy.
    assert_eq!(store.take(b"a"), Some(b"1".to_vec()));
    std::thread::scope(|s| {
        s.spawn(|| assert_eq!(store.take(b"a"), None));
    });
    assert_eq!(store.take(b"a"), None);
}

#[test]
fn a_new_store_does_not_see_the_old_stores_l1() {
    let old = Store::new(100, 10, None);
    old.put(b"k".to_vec(), b"v".to_vec());
    let new = Store::new(100, 10, None);
    assert_eq!(new.get(b"k"), None);
}

#[test]
fn datagrams_round_trip() {
    let k = key(b"0123456789abcdef");
    let u = update(5, 1_000);
    let d = encode(&k, &u).expect("fits");
    assert_eq!(decode(&k, &d), Ok(u.clone()));
    let del = Update {
        kind: Kind::Del,
        value: Vec::new(),
        ..u
    };
    assert_eq!(decode(&k, &encode(&k, &del).expect("fits")), Ok(del));
    let huge = Update {
        value: vec![0; sync::MAX_DATAGRAM],
        ..update(1, 1)
    };
    assert_eq!(encode(&k, &huge), None);
}

#[test]
fn forged_truncated_and_wrong_key_datagrams_are_refused() {
    let k = key(b"0123456789abcdef");
    let d = encode(&k, &update(1, 1)).expect("fits");
    for i in [0, 4, 10, 40, d.len() - 1] {
        let mut f = d.clone();
        f[i] ^= 1;
        assert!(decode(&k, &f).is_err(), "flipped byte {i} accepted");
    }
    let mut f = d.clone();
    f[40] ^= 1;
    assert_eq!(decode(&k, &f), Err(Refused::Mac));
    assert_eq!(decode(&key(b"another key, 16+"), &d), Err(Refused::Mac));
    assert_eq!(decode(&k, &d[..20]), Err(Refused::Malformed));
    assert_eq!(decode(&k, &[]), Err(Refused::Malformed));
    for n in 0..d.len() {
        assert!(decode(&k, &d[..n]).is_err());
    }
}

#[test]
fn replay_window_refuses_repeats_stale_and_skewed() {
    let now = 1_000_000;
    let mut w = ReplayWindow::default();
    assert!(w.accept(&update(10, now), now));
    assert!(!w.accept(&update(10, now), now), "replay accepted");
    // Reordered within the window: accepted once.
    assert!(w.accept(&update(8, now), now));
    assert!(!w.accept(&update(8, now), now));
    assert!(w.accept(&update(100, now), now));
    // Behind the window.
    assert!(!w.accept(&update(100 - sync::WINDOW, now), now));
    assert!(w.accept(&update(101 - sync::WINDOW, now), now));
    // Too old or from the future.
    let skew = u64::try_from(sync::MAX_SKEW.as_millis()).expect("small");
    assert!(!w.accept(&update(200, now - skew - 1), now));
    assert!(!w.accept(&update(201, now + skew + 1), now));
    // Another sender has its own window.
    let other = Update {
        sender: 8,
        ..update(10, now)
    };
    assert!(w.accept(&other, now));
}

#[test]
fn remote_updates_reach_the_live_stores_only() {
    let kept = storage(100);
    let discarded = storage(100);
    drop(discarded);
    apply_remote(Kind::New, b"remote-key".to_vec(), b"v".to_vec());
    assert_eq!(kept.get(b"remote-key"), Some(b"v".to_vec()));
    apply_remote(Kind::Del, b"remote-key".to_vec(), Vec::new());
    assert_eq!(kept.take(b"remote-key"), None);
}

#[test]
fn redis_messages_round_trip_and_malformed_ones_are_refused() {
    use super::redis_l2::{decode, encode};
    let msg = encode(9, Kind::New, &[1; 32], &[2; 100]).expect("encodes");
    assert_eq!(
        decode(&msg),
        Some((9, Kind::New, &[1u8; 32][..], &[2u8; 100][..]))
    );
    let del = encode(9, Kind::Del, &[3; 32], &[]).expect("encodes");
    assert_eq!(decode(&del), Some((9, Kind::Del, &[3u8; 32][..], &[][..])));
    assert!(
        encode(9, Kind::New, &[0; 256], &[]).is_none(),
        "key too long"
    );
    assert_eq!(decode(&msg[..9]), None, "truncated header");
    assert_eq!(decode(&msg[..20]), None, "truncated key");
    let mut bad_kind = msg.clone();
    bad_kind[8] = 7;
    assert_eq!(decode(&bad_kind), None);
}

#[test]
fn redis_url_credentials_are_hidden() {
    let s = RedisSettings {
        url: "redis://user:secret@cache.internal:6379/1".into(),
        timeout: DEFAULT_REDIS_TIMEOUT,
    };
    assert_eq!(s.display(), "redis://<credentials>@cache.internal:6379/1");
    assert!(!format!("{s:?}").contains("secret"));
    let plain = RedisSettings {
        url: "redis://127.0.0.1:6379".into(),
        timeout: DEFAULT_REDIS_TIMEOUT,
    };
    assert_eq!(plain.display(), "redis://127.0.0.1:6379");
}

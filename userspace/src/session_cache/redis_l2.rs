//! The session cache's Redis backend (`[session_cache] redis`): a fleet-wide store that every
//! host writes its sessions to and mirrors the others' sessions from, into its own L2.
//!
//! No worker ever waits on Redis. A `put` (and a `take`'s Del) is queued in a bounded channel
//! ([`QUEUE`]; full: dropped, counted) for a writer thread that runs `SET key value PX ttl` (or
//! `DEL`) and `PUBLISH` on [`CHANNEL`]; a subscriber thread `SUBSCRIBE`s to that channel and
//! writes what the other hosts publish into the L2 of every live store, as the UDP sync does.
//! Lookups stay local (L1, then L2), so a handshake costs the same whether Redis is up or not.
//! There is deliberately no synchronous `GET` on a miss: it would stall a worker, and every
//! connection it serves, for up to `timeout_ms` per full handshake whenever Redis is slow; what
//! it would add is only the sessions made while this process was not subscribed (before it
//! started, or while Redis was unreachable), which cost one full handshake each instead.
//! The `SET`s (with a TTL, so Redis never holds more than a lifetime of sessions) keep the
//! fleet's sessions inspectable and are what a future warm-up could read.
//!
//! Every Redis command is bounded by `timeout_ms` (connect, write and read timeouts on the
//! socket); a failed or timed-out command drops the connection, and the thread reconnects with
//! an exponential backoff ([`BACKOFF_MIN`] to [`BACKOFF_MAX`]). A stopped Redis therefore costs
//! full handshakes, never an error to a client: it is counted (`redis_errors`,
//! `redis_timeouts`, `redis_dropped`) and logged at most every [`WARN_EVERY`].
//!
//! Message on the channel: `sender u64 | kind u8 (1 New, 2 Del) | key_len u8 | key | value`;
//! `sender` is random per process, so a host ignores its own messages. Redis's network must be
//! as trusted as the hosts (the sessions are secrets): use `rediss://` or a private network.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use super::sync::Kind;
use super::{counters, RedisSettings};

/// The pub/sub channel of session updates.
pub const CHANNEL: &str = "tern:sessions";
/// The prefix of the session keys (`tern:session:<hex id>`).
pub const KEY_PREFIX: &str = "tern:session:";
/// How long Redis keeps a session: rustls's default ticket lifetime (6 hours); a client does
/// not offer an older TLS 1.2 session id in practice either.
pub const SESSION_TTL: Duration = Duration::from_secs(6 * 3600);
/// Updates queued between the workers and the writer thread.
const QUEUE: usize = 4096;
/// Reconnection backoff bounds.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The subscriber's read timeout: how often it wakes to notice nothing (a dead connection
/// that sent no FIN is found by the next failed read after Redis's own timeouts).
const SUBSCRIBE_POLL: Duration = Duration::from_secs(1);
/// At most one warning per thread per this long.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The workers' side: queues updates for the writer thread.
#[derive(Debug, Clone)]
pub struct Handle {
    queue: SyncSender<(Kind, Vec<u8>, Vec<u8>)>,
}

impl Handle {
    /// Queues an update; never blocks (a full queue drops it, counted).
    pub fn send(&self, kind: Kind, key: &[u8], value: &[u8]) {
        match self.queue.try_send((kind, key.to_vec(), value.to_vec())) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                counters().redis_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Encodes a channel message; `None` if the key is longer than 255 bytes (rustls's are 32).
pub fn encode(sender: u64, kind: Kind, key: &[u8], value: &[u8]) -> Option<Vec<u8>> {
    let key_len = u8::try_from(key.len()).ok()?;
    let mut out = Vec::with_capacity(8 + 2 + key.len() + value.len());
    out.extend_from_slice(&sender.to_be_bytes());
    out.push(kind as u8);
    out.push(key_len);
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    Some(out)
}

/// Decodes a channel message: (sender, kind, key, value); `None` when malformed.
pub fn decode(msg: &[u8]) -> Option<(u64, Kind, &[u8], &[u8])> {
    let sender = u64::from_be_bytes(msg.get(..8)?.try_into().ok()?);
    let kind = match msg.get(8)? {
        1 => Kind::New,
        2 => Kind::Del,
        _ => return None,
    };
    let key_len = usize::from(*msg.get(9)?);
    let key = msg.get(10..10 + key_len)?;
    let value = msg.get(10 + key_len..)?;
    Some((sender, kind, key, value))
}

/// The Redis key of session `key`.
fn redis_key(key: &[u8]) -> String {
    let mut s = String::with_capacity(KEY_PREFIX.len() + 2 * key.len());
    s.push_str(KEY_PREFIX);
    for b in key {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Starts the writer and subscriber threads, which live as long as the process. Connecting is
/// theirs: Redis being down at start is not an error (it costs full handshakes until it is up).
pub fn start(s: &RedisSettings) -> std::io::Result<Handle> {
    let client = redis::Client::open(s.url.as_str()).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("session_cache.redis: {e}"),
        )
    })?;
    let (queue, updates) = std::sync::mpsc::sync_channel(QUEUE);
    let mut id = [0u8; 8];
    crate::sys::fill_random(&mut id)?;
    let sender = u64::from_ne_bytes(id);
    let timeout = s.timeout;
    let tx_client = client.clone();
    std::thread::Builder::new()
        .name("tern-scache-rw".into())
        .spawn(move || write_loop(&tx_client, timeout, sender, &updates))?;
    std::thread::Builder::new()
        .name("tern-scache-rs".into())
        .spawn(move || subscribe_loop(&client, timeout, sender))?;
    tracing::info!(redis = %s.display(), timeout_ms = timeout.as_millis(), "session cache Redis backend started");
    Ok(Handle { queue })
}

/// Counts a failed command or connection and logs it rate-limited.
fn failed(e: &redis::RedisError, what: &str, warned: &mut Option<Instant>) {
    let stats = counters();
    if e.is_timeout() {
        stats.redis_timeouts.fetch_add(1, Ordering::Relaxed);
    } else {
        stats.redis_errors.fetch_add(1, Ordering::Relaxed);
    }
    if warned.is_none_or(|t| t.elapsed() > WARN_EVERY) {
        tracing::warn!(error = %e, "session cache Redis: {what} failed; sessions stay local until it is back");
        *warned = Some(Instant::now());
    }
}

/// A connection whose every command is bounded by `timeout`.
fn connect(client: &redis::Client, timeout: Duration) -> redis::RedisResult<redis::Connection> {
    let con = client.get_connection_with_timeout(timeout)?;
    con.set_read_timeout(Some(timeout))?;
    con.set_write_timeout(Some(timeout))?;
    Ok(con)
}

fn write_loop(
    client: &redis::Client,
    timeout: Duration,
    sender: u64,
    updates: &Receiver<(Kind, Vec<u8>, Vec<u8>)>,
) {
    let stats = counters();
    let ttl_ms = u64::try_from(SESSION_TTL.as_millis()).unwrap_or(u64::MAX);
    let mut con: Option<redis::Connection> = None;
    let mut backoff = BACKOFF_MIN;
    let mut retry_at = Instant::now();
    let mut warned = None;
    // Ends when every Handle is gone (never, in practice: the process exits first).
    while let Ok((kind, key, value)) = updates.recv() {
        let Some(msg) = encode(sender, kind, &key, &value) else {
            stats.redis_dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        if con.is_none() {
            // While Redis is down, updates are dropped (counted) rather than retried: a
            // session is only worth sharing while it is fresh.
            if Instant::now() < retry_at {
                stats.redis_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            match connect(client, timeout) {
                Ok(c) => {
                    tracing::info!("session cache Redis: writer connected");
                    con = Some(c);
                    backoff = BACKOFF_MIN;
                }
                Err(e) => {
                    failed(&e, "connect", &mut warned);
                    stats.redis_dropped.fetch_add(1, Ordering::Relaxed);
                    retry_at = Instant::now() + backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            }
        }
        let Some(c) = con.as_mut() else { continue };
        let mut pipe = redis::pipe();
        match kind {
            Kind::New => pipe
                .cmd("SET")
                .arg(redis_key(&key))
                .arg(&value)
                .arg("PX")
                .arg(ttl_ms)
                .ignore(),
            Kind::Del => pipe.cmd("DEL").arg(redis_key(&key)).ignore(),
        };
        pipe.cmd("PUBLISH").arg(CHANNEL).arg(msg).ignore();
        match pipe.query::<()>(c) {
            Ok(()) => {
                stats.redis_sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                failed(&e, "SET/PUBLISH", &mut warned);
                con = None;
                retry_at = Instant::now() + backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

fn subscribe_loop(client: &redis::Client, timeout: Duration, own: u64) {
    let stats = counters();
    let mut backoff = BACKOFF_MIN;
    let mut warned = None;
    loop {
        let mut con = match connect(client, timeout) {
            Ok(c) => c,
            Err(e) => {
                failed(&e, "connect (subscriber)", &mut warned);
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let mut pubsub = con.as_pubsub();
        if let Err(e) = pubsub.subscribe(CHANNEL) {
            failed(&e, "SUBSCRIBE", &mut warned);
            drop(pubsub);
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
            continue;
        }
        tracing::info!("session cache Redis: subscribed to {CHANNEL}");
        stats.redis_subscriptions.fetch_add(1, Ordering::Relaxed);
        backoff = BACKOFF_MIN;
        if let Err(e) = pubsub.set_read_timeout(Some(SUBSCRIBE_POLL)) {
            failed(&e, "SUBSCRIBE", &mut warned);
            continue;
        }
        loop {
            match pubsub.get_message() {
                Ok(msg) => match decode(msg.get_payload_bytes()) {
                    Some((sender, _, _, _)) if sender == own => {}
                    Some((_, kind, key, value)) => {
                        stats.redis_received.fetch_add(1, Ordering::Relaxed);
                        super::apply_remote(kind, key.to_vec(), value.to_vec());
                    }
                    None => {
                        stats.redis_errors.fetch_add(1, Ordering::Relaxed);
                    }
                },
                // Nothing published for a while: not a failure.
                Err(e) if e.is_timeout() => {}
                Err(e) => {
                    failed(&e, "receive", &mut warned);
                    break;
                }
            }
        }
        std::thread::sleep(backoff);
    }
}

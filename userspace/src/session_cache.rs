//! The server-side session cache behind TLS 1.2 session ids and TLS 1.3 stateful resumption
//! (rustls's [`StoresServerSessions`]), in two levels, plus the fleet sync that feeds the second.
//!
//! - **L1**, per worker thread: a bounded map in a `thread_local`, so a `get` that hits takes no
//!   lock. rustls calls the store from the thread running the handshake, and one [`Store`] (one
//!   `ServerConfig`) serves every worker, so the store dispatches to the calling thread's L1.
//! - **L2**, per process: rustls's [`ServerSessionMemoryCache`] (bounded, locked), which every
//!   worker sees and into which the fleet sync ([`sync`]) writes the sessions other hosts made.
//!
//! `take` (TLS 1.3 stateful resumption: single-use, RFC 8446 Appendix C.4) is answered by L2
//! only, so that a session taken by one worker is gone for all of them at once; an L1 copy left
//! on another worker is never consulted by `take`. `get` (TLS 1.2 session ids, reusable by
//! design, RFC 5246 §7.4.1.2) is answered by L1 first. A `put` writes both levels (one lock per
//! full handshake, which costs far more than the lock) and queues a New update for the peers;
//! a successful `take` queues a Del.
//!
//! With `[session_cache] redis`, the same updates also go to Redis ([`redis_l2`]), and what
//! other hosts publish there is mirrored into L2 like the sync's.
//!
//! Not here: stateless tickets (`tls`).

pub mod redis_l2;
pub mod sync;

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use rustls::server::{NoServerSessionStorage, ServerSessionMemoryCache, StoresServerSessions};

/// Default `session_cache.entries_per_worker`.
pub const DEFAULT_ENTRIES_PER_WORKER: usize = 1024;

/// The validated `[session_cache]` table.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Settings {
    /// Capacity of each worker's L1, in entries; 0 turns L1 off (every lookup goes to L2).
    pub entries_per_worker: usize,
    /// The UDP fleet sync; `None`: this process shares sessions with no one.
    pub sync: Option<SyncSettings>,
    /// The Redis backend; `None`: no Redis.
    pub redis: Option<RedisSettings>,
}

/// Default `session_cache.timeout_ms`.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(5);

/// `[session_cache]`'s `redis` and `timeout_ms`.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// `redis://[:PASSWORD@]HOST:PORT[/DB]` (or `rediss://`), checked by the redis crate.
    pub url: String,
    /// The bound on each Redis command (connect, write, read), all on background threads.
    pub timeout: Duration,
}

impl RedisSettings {
    /// The URL without its credentials, for logs and messages.
    pub fn display(&self) -> String {
        match (self.url.split_once("://"), self.url.rsplit_once('@')) {
            (Some((scheme, _)), Some((_, host))) => format!("{scheme}://<credentials>@{host}"),
            _ => self.url.clone(),
        }
    }
}

// By hand: the URL may hold a password.
impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &self.display())
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// `[session_cache]`'s `listen`, `peers` and `key`.
#[derive(Clone, PartialEq, Eq)]
pub struct SyncSettings {
    /// Where updates from the peers arrive (and the source of the updates sent).
    pub listen: SocketAddr,
    /// Every other host's `listen` address.
    pub peers: Vec<SocketAddr>,
    /// The file the shared secret came from (for messages).
    pub key_path: PathBuf,
    /// The shared HMAC-SHA256 secret: at least [`sync::MIN_KEY_LEN`] bytes.
    pub key: Vec<u8>,
}

// By hand: the secret must never reach a log line or `tern ctl config`.
impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("entries_per_worker", &self.entries_per_worker)
            .field("sync", &self.sync)
            .field("redis", &self.redis)
            .finish()
    }
}

impl std::fmt::Debug for SyncSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncSettings")
            .field("listen", &self.listen)
            .field("peers", &self.peers)
            .field("key_path", &self.key_path)
            .field("key", &"<secret>")
            .finish()
    }
}

/// Defines the process-wide session-cache counters and their `Copy` snapshot. Unlike
/// `counters::WorkerCounters` these have many writers (every worker and the sync threads), so
/// they are `fetch_add`s; they move once per handshake or datagram, not per packet.
macro_rules! shared_counters {
    ($name:ident, $snap:ident { $($(#[doc = $doc:literal])* $field:ident,)* }) => {
        /// The session cache's counters, one set per process.
        #[derive(Debug, Default)]
        pub struct $name { $($field: AtomicU64,)* }

        /// A point-in-time copy of the session cache's counters.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
        pub struct $snap { $($(#[doc = $doc])* pub $field: u64,)* }

        impl $name {
            pub const fn new() -> Self { $name { $($field: AtomicU64::new(0),)* } }
            pub fn snapshot(&self) -> $snap {
                $snap { $($field: self.$field.load(Ordering::Relaxed),)* }
            }
        }

        impl $snap {
            /// (name, doc, value) per counter, for the Prometheus endpoint (`metrics`).
            pub fn fields(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$((stringify!($field), concat!($($doc, "\n",)*), self.$field),)*]
            }
        }
    };
}

shared_counters! {
    Stats, StatsSnapshot {
    /// Session lookups answered by the worker's own L1.
    hits_l1,
    /// Session lookups answered by the process-wide L2 (a session another worker, or another
    /// host through the sync, stored).
    hits_l2,
    /// Session lookups that found nothing: the handshake went on in full.
    misses,
    /// Sessions stored (one per full handshake that offers resumption).
    stored,
    /// Sync updates (New and Del) sent to peers, one per peer.
    sync_sent,
    /// Sync updates accepted from peers.
    sync_received,
    /// Sync datagrams refused because their HMAC did not verify (forged, or a wrong key).
    sync_refused_mac,
    /// Sync datagrams refused as replays, too old or too far ahead (outside the replay window).
    sync_refused_replay,
    /// Sync datagrams refused as malformed (too short, bad magic or kind).
    sync_refused_malformed,
    /// Sync updates not sent: the send queue was full, or the session too large for a datagram.
    sync_dropped,
    /// Sync sends that failed at the socket.
    sync_send_errors,
    /// Updates written to Redis (SET or DEL, and PUBLISH).
    redis_sent,
    /// Updates from other hosts received from Redis and mirrored into L2.
    redis_received,
    /// Updates not written to Redis: the queue was full, or Redis was down (a session is only
    /// worth sharing while it is fresh, so they are not retried).
    redis_dropped,
    /// Redis connections or commands that failed (refused, reset, an error reply), and
    /// malformed messages on the channel.
    redis_errors,
    /// Redis connections or commands that took longer than `timeout_ms`.
    redis_timeouts,
    /// Successful SUBSCRIBEs to the Redis channel: 1 once connected, one more per reconnection.
    redis_subscriptions,
    }
}

static STATS: Stats = Stats::new();

/// The process's session-cache counters.
pub fn stats() -> StatsSnapshot {
    STATS.snapshot()
}

pub(crate) fn counters() -> &'static Stats {
    &STATS
}

/// What [`install`] fixed for the process's lifetime.
struct Global {
    entries_per_worker: usize,
    sync: Option<sync::Handle>,
    redis: Option<redis_l2::Handle>,
}

static GLOBAL: OnceLock<Global> = OnceLock::new();

/// The L2s of the live stores: where the sync's receiver puts what peers send. Weak, so a store
/// dropped after a reload (or one built and discarded when a reload keeps the old cache,
/// `reload::keep_resumption`) leaves by itself; usually one is live, two during a reload.
static LIVE_L2: Mutex<Vec<Weak<ServerSessionMemoryCache>>> = Mutex::new(Vec::new());

fn live_l2() -> Vec<Arc<ServerSessionMemoryCache>> {
    let mut live = LIVE_L2
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    live.retain(|w| w.strong_count() > 0);
    live.iter().filter_map(Weak::upgrade).collect()
}

/// Fixes `[session_cache]` for this process and, with `listen`, binds the sync socket and starts
/// its two threads. Call once at start, before the first [`storage`]; later calls are ignored
/// (the table is restart-only: `reload::restart_needed`).
pub fn install(settings: &Settings) -> std::io::Result<()> {
    if GLOBAL.get().is_some() {
        return Ok(());
    }
    let sync = match &settings.sync {
        Some(s) => Some(sync::start(s)?),
        None => None,
    };
    let redis = match &settings.redis {
        Some(r) => Some(redis_l2::start(r)?),
        None => None,
    };
    let _ = GLOBAL.set(Global {
        entries_per_worker: settings.entries_per_worker,
        sync,
        redis,
    });
    Ok(())
}

/// The session storage for a new `ServerConfig` whose L2 holds `entries` sessions; `0` turns
/// the cache (both levels and the sync) off.
pub fn storage(entries: usize) -> Arc<dyn StoresServerSessions> {
    if entries == 0 {
        return Arc::new(NoServerSessionStorage {});
    }
    let (per_worker, sync, redis) = match GLOBAL.get() {
        Some(g) => (g.entries_per_worker, g.sync.clone(), g.redis.clone()),
        None => (DEFAULT_ENTRIES_PER_WORKER, None, None),
    };
    let mut store = Store::new(entries, per_worker, sync);
    store.redis = redis;
    let mut live = LIVE_L2
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    live.retain(|w| w.strong_count() > 0);
    live.push(Arc::downgrade(&store.l2));
    drop(live);
    Arc::new(store)
}

/// Tells apart the stores of successive `ServerConfig`s in a thread's L1.
static NEXT_STORE_ID: AtomicU64 = AtomicU64::new(1);

/// A two-level session store (see the module doc).
pub struct Store {
    /// Which store the calling thread's L1 belongs to: a thread's L1 serves one store at a
    /// time and is emptied when another store (after a reload) calls it.
    id: u64,
    per_worker: usize,
    l2: Arc<ServerSessionMemoryCache>,
    sync: Option<sync::Handle>,
    redis: Option<redis_l2::Handle>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("session_cache::Store")
            .field("id", &self.id)
            .field("per_worker", &self.per_worker)
            .field("sync", &self.sync.is_some())
            .field("redis", &self.redis.is_some())
            .finish()
    }
}

thread_local! {
    /// The calling thread's L1: (owning store id, cache).
    static L1: RefCell<(u64, L1Cache)> = RefCell::new((0, L1Cache::new(0)));
}

impl Store {
    fn new(entries: usize, per_worker: usize, sync: Option<sync::Handle>) -> Self {
        Store {
            id: NEXT_STORE_ID.fetch_add(1, Ordering::Relaxed),
            per_worker,
            l2: ServerSessionMemoryCache::new(entries),
            sync,
            redis: None,
        }
    }

    /// Runs `f` on this thread's L1 for this store. `None` when L1 is off or the thread-local
    /// is gone (a thread exiting).
    fn with_l1<R>(&self, f: impl FnOnce(&mut L1Cache) -> R) -> Option<R> {
        if self.per_worker == 0 {
            return None;
        }
        L1.try_with(|cell| {
            let mut slot = cell.try_borrow_mut().ok()?;
            if slot.0 != self.id {
                *slot = (self.id, L1Cache::new(self.per_worker));
            }
            Some(f(&mut slot.1))
        })
        .ok()
        .flatten()
    }
}

impl StoresServerSessions for Store {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        STATS.stored.fetch_add(1, Ordering::Relaxed);
        if let Some(sync) = &self.sync {
            sync.send(sync::Kind::New, &key, &value);
        }
        if let Some(redis) = &self.redis {
            redis.send(sync::Kind::New, &key, &value);
        }
        self.with_l1(|l1| l1.put(key.clone(), value.clone()));
        self.l2.put(key, value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        if let Some(v) = self.with_l1(|l1| l1.get(key)).flatten() {
            STATS.hits_l1.fetch_add(1, Ordering::Relaxed);
            return Some(v);
        }
        match self.l2.get(key) {
            Some(v) => {
                STATS.hits_l2.fetch_add(1, Ordering::Relaxed);
                self.with_l1(|l1| l1.put(key.to_vec(), v.clone()));
                Some(v)
            }
            None => {
                STATS.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.with_l1(|l1| l1.remove(key));
        match self.l2.take(key) {
            Some(v) => {
                STATS.hits_l2.fetch_add(1, Ordering::Relaxed);
                if let Some(sync) = &self.sync {
                    sync.send(sync::Kind::Del, key, &[]);
                }
                if let Some(redis) = &self.redis {
                    redis.send(sync::Kind::Del, key, &[]);
                }
                Some(v)
            }
            None => {
                STATS.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// A bounded map evicting in insertion order (FIFO: cheaper than LRU and as good for sessions,
/// which are mostly looked up once, soon after they were made).
struct L1Cache {
    /// At most `capacity` entries.
    map: HashMap<Vec<u8>, Vec<u8>>,
    /// Keys in insertion order; may hold keys removed since (skipped at eviction), at most
    /// `2 * capacity` of them before it is compacted.
    order: VecDeque<Vec<u8>>,
    capacity: usize,
}

impl L1Cache {
    fn new(capacity: usize) -> Self {
        L1Cache {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        if self.capacity == 0 {
            return;
        }
        if let Some(old) = self.map.get_mut(&key) {
            *old = value;
            return;
        }
        while self.map.len() >= self.capacity {
            match self.order.pop_front() {
                Some(k) => {
                    self.map.remove(&k);
                }
                None => break,
            }
        }
        self.order.push_back(key.clone());
        self.map.insert(key, value);
        if self.order.len() > 2 * self.capacity {
            let map = &self.map;
            self.order.retain(|k| map.contains_key(k));
        }
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.map.get(key).cloned()
    }

    fn remove(&mut self, key: &[u8]) -> Option<Vec<u8>> {
        self.map.remove(key)
    }
}

/// Called by the sync receiver with an authenticated update from a peer, and by the Redis
/// subscriber with another host's update.
fn apply_remote(kind: sync::Kind, key: Vec<u8>, value: Vec<u8>) {
    for l2 in live_l2() {
        match kind {
            sync::Kind::New => {
                l2.put(key.clone(), value.clone());
            }
            sync::Kind::Del => {
                l2.take(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests;

//! The session cache's fleet sync for hosts without a shared store (stud's design): every
//! session this process stores is sent as a UDP datagram (New) to every peer, and every session
//! it takes (TLS 1.3 single use) as a Del; what peers send goes into this process's L2.
//!
//! Datagram (all integers big-endian):
//! `"TSC1" | kind u8 (1 New, 2 Del) | sender u64 | seq u64 | time_ms u64 | key_len u8 | key |
//! value | HMAC-SHA256(key file, everything before it) [32]`.
//! `sender` is random per process; `seq` counts its datagrams from 1; `time_ms` is the Unix
//! time it was sent. A receiver refuses a datagram whose MAC does not verify, whose time is
//! more than [`MAX_SKEW`] from its own clock, or whose (sender, seq) it has seen or is more
//! than [`WINDOW`] behind that sender's newest (an IPsec-style window, RFC 4303 §3.4.3): a
//! replayed session could otherwise resurrect a TLS 1.3 session that was taken (used).
//!
//! Delivery is best-effort by design: a lost, late or refused update is a cache miss on the
//! peer (one full handshake), never an error. The worker never blocks on the network: it queues
//! an update in a bounded channel ([`QUEUE`]) and a sender thread does the `sendto`s; when the
//! queue is full the update is dropped and counted. The sessions carried are secret (they hold
//! the resumption master secret), so the peers' network must be as trusted as the hosts:
//! the MAC authenticates, it does not encrypt (as in stud).

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;

use super::{counters, SyncSettings};

/// The datagram's first bytes: the format's name and version.
const MAGIC: &[u8; 4] = b"TSC1";
/// Magic, kind, sender, seq, time_ms, key_len.
const HEADER: usize = 4 + 1 + 8 + 8 + 8 + 1;
const MAC_LEN: usize = 32;
/// The largest datagram sent or accepted: a session with a client certificate chain may not
/// fit, and then is simply not shared.
pub const MAX_DATAGRAM: usize = 8192;
/// The shortest shared secret accepted (128 bits).
pub const MIN_KEY_LEN: usize = 16;
/// How far a datagram's time may be from the receiver's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(30);
/// How far behind a sender's newest sequence number a datagram may arrive (reordering).
pub const WINDOW: u64 = 64;
/// Senders a receiver tracks; beyond, the one heard from longest ago is forgotten.
const MAX_SENDERS: usize = 256;
/// Updates queued between the workers and the sender thread.
const QUEUE: usize = 4096;

/// An update's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A session was stored.
    New = 1,
    /// A session was taken (single use) and must go everywhere.
    Del = 2,
}

/// One decoded, authenticated datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub kind: Kind,
    pub sender: u64,
    pub seq: u64,
    pub time_ms: u64,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// Why a datagram was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Malformed,
    Mac,
    Replay,
}

/// Encodes `u` and appends its MAC; `None` when it would exceed [`MAX_DATAGRAM`].
pub fn encode(key: &hmac::Key, u: &Update) -> Option<Vec<u8>> {
    let key_len = u8::try_from(u.key.len()).ok()?;
    let len = HEADER + u.key.len() + u.value.len() + MAC_LEN;
    if len > MAX_DATAGRAM {
        return None;
    }
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(MAGIC);
    out.push(u.kind as u8);
    out.extend_from_slice(&u.sender.to_be_bytes());
    out.extend_from_slice(&u.seq.to_be_bytes());
    out.extend_from_slice(&u.time_ms.to_be_bytes());
    out.push(key_len);
    out.extend_from_slice(&u.key);
    out.extend_from_slice(&u.value);
    let tag = hmac::sign(key, &out);
    out.extend_from_slice(tag.as_ref());
    Some(out)
}

/// Checks the MAC and decodes; the replay window is the caller's ([`ReplayWindow`]).
pub fn decode(key: &hmac::Key, datagram: &[u8]) -> Result<Update, Refused> {
    if datagram.len() < HEADER + MAC_LEN || datagram.len() > MAX_DATAGRAM {
        return Err(Refused::Malformed);
    }
    let (body, tag) = datagram.split_at(datagram.len() - MAC_LEN);
    if !body.starts_with(MAGIC) {
        return Err(Refused::Malformed);
    }
    // The MAC before any field is believed.
    hmac::verify(key, body, tag).map_err(|_| Refused::Mac)?;
    let u64_at = |at: usize| -> Result<u64, Refused> {
        body.get(at..at + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes)
            .ok_or(Refused::Malformed)
    };
    let kind = match body.get(4) {
        Some(1) => Kind::New,
        Some(2) => Kind::Del,
        _ => return Err(Refused::Malformed),
    };
    let key_len = usize::from(*body.get(HEADER - 1).ok_or(Refused::Malformed)?);
    let session_key = body
        .get(HEADER..HEADER + key_len)
        .ok_or(Refused::Malformed)?;
    let value = body.get(HEADER + key_len..).ok_or(Refused::Malformed)?;
    Ok(Update {
        kind,
        sender: u64_at(5)?,
        seq: u64_at(13)?,
        time_ms: u64_at(21)?,
        key: session_key.to_vec(),
        value: value.to_vec(),
    })
}

/// Per-sender replay state: the newest sequence number seen and a bitmap of the [`WINDOW`]
/// before it (bit `i` set: `newest - i` was seen).
#[derive(Debug, Default)]
pub struct ReplayWindow {
    /// sender → (newest seq, seen bitmap, when last heard from). At most [`MAX_SENDERS`].
    senders: HashMap<u64, (u64, u64, u64)>,
}

impl ReplayWindow {
    /// Accepts (and records) `u` if it is fresh at `now_ms` and not seen before.
    pub fn accept(&mut self, u: &Update, now_ms: u64) -> bool {
        let skew = u64::try_from(MAX_SKEW.as_millis()).unwrap_or(u64::MAX);
        if u.time_ms.abs_diff(now_ms) > skew {
            return false;
        }
        if !self.senders.contains_key(&u.sender) && self.senders.len() >= MAX_SENDERS {
            let oldest = self
                .senders
                .iter()
                .min_by_key(|(_, &(_, _, heard))| heard)
                .map(|(&s, _)| s);
            if let Some(s) = oldest {
                self.senders.remove(&s);
            }
        }
        let (newest, bits, heard) = self.senders.entry(u.sender).or_insert((0, 0, now_ms));
        if u.seq > *newest {
            let shift = u.seq - *newest;
            *bits = if shift >= WINDOW { 0 } else { *bits << shift };
            *bits |= 1;
            *newest = u.seq;
        } else {
            let back = *newest - u.seq;
            if back >= WINDOW || *bits & (1 << back) != 0 {
                return false;
            }
            *bits |= 1 << back;
        }
        *heard = now_ms;
        true
    }
}

/// The workers' side of the sync: queues updates for the sender thread.
#[derive(Debug, Clone)]
pub struct Handle {
    queue: SyncSender<(Kind, Vec<u8>, Vec<u8>)>,
}

impl Handle {
    /// Queues an update for every peer; never blocks (a full queue drops it, counted).
    pub fn send(&self, kind: Kind, key: &[u8], value: &[u8]) {
        match self.queue.try_send((kind, key.to_vec(), value.to_vec())) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                counters().sync_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Binds `listen` (SO_REUSEPORT, so that a binary upgrade's new process can bind it while the
/// old one still runs; the kernel then splits datagrams between them, which the loss tolerance
/// covers) and starts the sender and receiver threads, which live as long as the process.
pub fn start(s: &SyncSettings) -> std::io::Result<Handle> {
    let domain = socket2::Domain::for_address(s.listen);
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    socket.bind(&s.listen.into()).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("session_cache.listen: cannot bind {}: {e}", s.listen),
        )
    })?;
    let socket: UdpSocket = socket.into();
    let rx_socket = socket.try_clone()?;
    let key = hmac::Key::new(hmac::HMAC_SHA256, &s.key);
    let (queue, updates) = std::sync::mpsc::sync_channel(QUEUE);
    let mut id = [0u8; 8];
    crate::sys::fill_random(&mut id)?;
    let sender = u64::from_ne_bytes(id);
    let peers = s.peers.clone();
    let tx_key = key.clone();
    std::thread::Builder::new()
        .name("tern-scache-tx".into())
        .spawn(move || send_loop(&socket, &peers, &tx_key, sender, &updates))?;
    std::thread::Builder::new()
        .name("tern-scache-rx".into())
        .spawn(move || receive_loop(&rx_socket, &key, sender))?;
    tracing::info!(listen = %s.listen, peers = s.peers.len(), "session cache sync started");
    Ok(Handle { queue })
}

fn send_loop(
    socket: &UdpSocket,
    peers: &[SocketAddr],
    key: &hmac::Key,
    sender: u64,
    updates: &Receiver<(Kind, Vec<u8>, Vec<u8>)>,
) {
    let stats = counters();
    let mut seq = 0u64;
    let mut warned: Option<Instant> = None;
    // Ends when every Handle is gone (never, in practice: the process exits first).
    while let Ok((kind, session_key, value)) = updates.recv() {
        seq += 1;
        let update = Update {
            kind,
            sender,
            seq,
            time_ms: now_ms(),
            key: session_key,
            value,
        };
        let Some(datagram) = encode(key, &update) else {
            stats.sync_dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        for peer in peers {
            match socket.send_to(&datagram, peer) {
                Ok(_) => stats.sync_sent.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    if warned.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!(%peer, error = %e, "session cache sync: send failed");
                        warned = Some(Instant::now());
                    }
                    stats.sync_send_errors.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
    }
}

fn receive_loop(socket: &UdpSocket, key: &hmac::Key, own: u64) {
    let stats = counters();
    let mut window = ReplayWindow::default();
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let mut warned: Option<Instant> = None;
    loop {
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "session cache sync: receive failed; sync stopped");
                return;
            }
        };
        let datagram = buf.get(..n).unwrap_or_default();
        let refused = match decode(key, datagram) {
            Ok(u) if u.sender == own => continue, // this host listed among its own peers
            Ok(u) if window.accept(&u, now_ms()) => {
                stats.sync_received.fetch_add(1, Ordering::Relaxed);
                super::apply_remote(u.kind, u.key, u.value);
                continue;
            }
            Ok(_) => Refused::Replay,
            Err(r) => r,
        };
        let counter = match refused {
            Refused::Malformed => &stats.sync_refused_malformed,
            Refused::Mac => &stats.sync_refused_mac,
            Refused::Replay => &stats.sync_refused_replay,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if warned.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            tracing::warn!(%from, reason = ?refused, "session cache sync: datagram refused");
            warned = Some(Instant::now());
        }
    }
}

//! Session-ticket keys shared by every process of a fleet: `[tls] ticket_keys = "FILE"`.
//!
//! The file holds one key per line, each the base64 of [`KEY_LEN`] (80) random bytes —
//! haproxy's size, so one generator serves both. Blank lines and `#` comments are allowed.
//! The first key encrypts new tickets; every key decrypts. A ticket sealed under a key that
//! has left the file is refused ([`FileTicketer::decrypt`] returns `None`), which rustls turns
//! into a full handshake, never an error.
//!
//! Key derivation (tern's own; the 80 bytes are opaque to any other format): bytes 0..16 are
//! the key *name*, sent in clear at the head of every ticket so the right key is found without
//! trial decryption; bytes 16..80 are the secret, from which HKDF-SHA256 (RFC 5869; salt
//! [`HKDF_SALT`], info [`HKDF_INFO`]) derives one AES-256-GCM key. A ticket is
//! `name (16) ‖ nonce (12, random) ‖ AES-256-GCM(state, aad = name) ‖ tag (16)`, the layout
//! rustls's own `Ticketer` uses (RFC 5077 §4's recommendation with an AEAD). Random 96-bit
//! nonces bound a key to about 2^32 tickets (NIST SP 800-38D §8.3), which a daily rotation keeps
//! far away even for a large fleet.
//!
//! Sharing without a lock: the key set sits behind an [`ArcSwap`]; a handshake's encrypt or
//! decrypt is one lock-free load. Keys change by a whole-set swap — on a reload (the
//! configuration re-reads the file) and when the file changes without one: a watcher thread per
//! file ([`WATCH_INTERVAL`], polling, not inotify, because polling also sees a file replaced
//! through a renamed directory or symlink, as configuration-management tools and Kubernetes
//! secret volumes do) re-reads it; a file that does not parse is logged and the keys in use stay.
//! One [`FileTicketer`] exists per file and process ([`ticketer`]), so its counters survive
//! reloads.
//!
//! Also here: the `tern ticket-keys` subcommand's file operations ([`generate`], [`stage`],
//! [`promote`], [`rotate`]); docs/operations.md gives the fleet procedure.
//!
//! Not here: when tickets are issued at all and how many (`tls::server_config`).

#![forbid(unsafe_code)]

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::hkdf;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use rustls::server::ProducesTickets;

#[cfg(test)]
mod tests;

/// Bytes of one key as the file holds it (base64-decoded).
pub const KEY_LEN: usize = 80;
/// Leading bytes of a key that name it (sent in clear in each ticket).
pub const NAME_LEN: usize = 16;
/// AES-GCM's tag.
const TAG_LEN: usize = 16;
/// HKDF-SHA256 salt of the ticket key derivation; versioned so a future layout cannot
/// collide with this one.
pub const HKDF_SALT: &[u8] = b"tern ticket keys v1";
/// HKDF-SHA256 info of the AES-256-GCM key.
pub const HKDF_INFO: &[u8] = b"tern ticket aes-256-gcm";
/// The lifetime hint sent with each ticket (RFC 8446 §4.6.1, RFC 5077 §3.3). Validity is
/// decided by the file (a ticket resumes while its key is in it); this only tells clients when
/// to stop offering it. 12 hours suits the daily rotation docs/operations.md describes.
pub const TICKET_LIFETIME_S: u32 = 12 * 3600;
/// How often the watcher thread looks at the key file.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);
/// Decrypt-only keys `rotate` and `promote` keep after the encrypting one.
pub const DEFAULT_KEEP: usize = 2;

/// One key as read from the file. Debug does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyMaterial(pub [u8; KEY_LEN]);

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The name is public (it travels in every ticket); the secret is not.
        write!(f, "KeyMaterial(name {})", hex(self.name()))
    }
}

impl KeyMaterial {
    pub fn name(&self) -> &[u8] {
        &self.0[..NAME_LEN]
    }

    /// The key's name in hex: what logs and `tern ticket-keys` show of a key.
    pub fn name_hex(&self) -> String {
        hex(self.name())
    }

    /// The key as a line of the file (base64, no newline).
    pub fn to_line(&self) -> String {
        BASE64.encode(self.0)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `[tls] ticket_keys`, validated: where the keys are and what the file held when read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketKeys {
    /// The key file (absolute).
    pub path: PathBuf,
    /// Never empty; no two keys share a name. `keys[0]` encrypts.
    pub keys: Vec<KeyMaterial>,
}

/// Why a key file was refused. Display: `line N: reason` (or the reason alone for the file as
/// a whole), which config errors prefix with the file and the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFileError {
    /// 1-based line; `None`: the file as a whole.
    pub line: Option<usize>,
    pub reason: String,
}

impl fmt::Display for KeyFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(n) => write!(f, "line {n}: {}", self.reason),
            None => f.write_str(&self.reason),
        }
    }
}

impl std::error::Error for KeyFileError {}

fn whole(reason: impl Into<String>) -> KeyFileError {
    KeyFileError {
        line: None,
        reason: reason.into(),
    }
}

/// Parses a key file's text.
pub fn parse(text: &str) -> Result<Vec<KeyMaterial>, KeyFileError> {
    let mut keys: Vec<(usize, KeyMaterial)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |reason: String| KeyFileError {
            line: Some(i + 1),
            reason,
        };
        let bytes = BASE64
            .decode(line)
            .map_err(|e| at(format!("not base64: {e}")))?;
        let key: [u8; KEY_LEN] = bytes.as_slice().try_into().map_err(|_| {
            at(format!(
                "a key is {KEY_LEN} bytes (base64 of `head -c {KEY_LEN} /dev/urandom`), this one is {}",
                bytes.len()
            ))
        })?;
        let key = KeyMaterial(key);
        // The name picks the decryption key: two keys with one name would make that ambiguous.
        if let Some((j, _)) = keys.iter().find(|(_, k)| k.name() == key.name()) {
            return Err(at(format!(
                "its first {NAME_LEN} bytes (the key name) are those of line {j}"
            )));
        }
        keys.push((i + 1, key));
    }
    if keys.is_empty() {
        return Err(whole("no key in the file (one base64 key per line)"));
    }
    Ok(keys.into_iter().map(|(_, k)| k).collect())
}

/// Reads and parses the key file at `path`.
pub fn read(path: &Path) -> Result<Vec<KeyMaterial>, KeyFileError> {
    let text = std::fs::read_to_string(path).map_err(|e| whole(format!("cannot read: {e}")))?;
    parse(&text)
}

/// A new random key.
pub fn generate() -> Result<KeyMaterial, KeyFileError> {
    let mut key = [0u8; KEY_LEN];
    aws_lc_rs::rand::fill(&mut key).map_err(|_| whole("the system random generator failed"))?;
    Ok(KeyMaterial(key))
}

/// One usable key: its name and its derived AEAD key.
struct Key {
    name: [u8; NAME_LEN],
    aead: LessSafeKey,
}

impl Key {
    fn derive(material: &KeyMaterial) -> Result<Key, KeyFileError> {
        let mut name = [0u8; NAME_LEN];
        name.copy_from_slice(material.name());
        let okm_err = |_| whole("deriving the ticket key failed");
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(&material.0[NAME_LEN..]);
        let okm = prk.expand(&[HKDF_INFO], &AES_256_GCM).map_err(okm_err)?;
        Ok(Key {
            name,
            aead: LessSafeKey::new(UnboundKey::from(okm)),
        })
    }
}

/// The keys in force: `keys[0]` encrypts, all decrypt.
struct KeySet {
    keys: Vec<Key>,
    /// What they were derived from, to tell whether a re-read file changed anything.
    material: Vec<KeyMaterial>,
}

impl KeySet {
    fn new(material: &[KeyMaterial]) -> Result<KeySet, KeyFileError> {
        Ok(KeySet {
            keys: material.iter().map(Key::derive).collect::<Result<_, _>>()?,
            material: material.to_vec(),
        })
    }
}

/// Shards of a multi-writer counter: each thread adds to its own cache line, so workers
/// counting tickets never contend; readers sum.
const SHARDS: usize = 16;

#[derive(Default)]
#[repr(align(64))]
struct Shard([AtomicU64; 5]);

/// Ticket counters of one key file, summed over the threads that did the work.
struct Counters {
    shards: [Shard; SHARDS],
}

/// The counters' slots in a [`Shard`].
#[derive(Clone, Copy)]
enum Count {
    Issued = 0,
    Decrypted = 1,
    DecryptedOld = 2,
    Refused = 3,
    FileErrors = 4,
}

thread_local! {
    /// This thread's shard; threads take shards in turn.
    static SHARD: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS
    };
}

impl Counters {
    fn new() -> Counters {
        Counters {
            shards: std::array::from_fn(|_| Shard::default()),
        }
    }

    fn inc(&self, c: Count) {
        let shard = SHARD.with(|s| *s);
        if let Some(s) = self.shards.get(shard) {
            s.0[c as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn sum(&self, c: Count) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0[c as usize].load(Ordering::Relaxed))
            .sum()
    }
}

/// A point-in-time copy of one key file's ticket counters (`tern ctl stats` → `ticket_keys`,
/// `/metrics` → `tern_ticket_*`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Snapshot {
    /// Tickets sealed (with the file's first key).
    pub issued: u64,
    /// Tickets opened: resumption can proceed.
    pub decrypted: u64,
    /// Of those, opened with a decrypt-only key (a line after the first): tickets issued
    /// before a rotation, or by a host that has not taken the newest file yet.
    pub decrypted_old: u64,
    /// Tickets refused: unknown key name (a key no longer in the file), forged or damaged.
    /// Each costs a full handshake, not an error.
    pub refused: u64,
    /// Keys loaded (at start, and each time the file changed to a different set).
    pub key_loads: u64,
    /// Times a changed file could not be used (the keys in force stayed).
    pub file_errors: u64,
}

impl Snapshot {
    /// Each counter as (name, doc, value), as `counters` snapshots list theirs (`metrics`).
    pub fn fields(&self) -> Vec<(&'static str, &'static str, u64)> {
        vec![
            ("issued", "Session tickets sealed with the first key of the ticket key file.", self.issued),
            ("decrypted", "Session tickets opened (resumption can proceed).", self.decrypted),
            ("decrypted_old", "Session tickets opened with a decrypt-only key (not the file's first).", self.decrypted_old),
            ("refused", "Session tickets refused: key no longer in the file, forged or damaged (a full handshake follows).", self.refused),
            ("key_loads", "Ticket key sets loaded from the file (at start and on change).", self.key_loads),
            ("file_errors", "Changed ticket key files that could not be used (the keys in force stayed).", self.file_errors),
        ]
    }
}

/// rustls's ticket producer over a key file. One per file and process ([`ticketer`]).
pub struct FileTicketer {
    path: PathBuf,
    /// Swapped whole; never empty.
    keys: ArcSwap<KeySet>,
    counters: Counters,
    key_loads: AtomicU64,
    /// The last file error logged, so a bad file is logged once, not every look.
    last_error: Mutex<Option<KeyFileError>>,
}

impl fmt::Debug for FileTicketer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileTicketer")
            .field("path", &self.path)
            .field("keys", &self.keys.load().material)
            .finish()
    }
}

impl FileTicketer {
    /// A ticketer over `keys` (read from `path`), without a watcher: [`ticketer`] is what the
    /// server uses.
    pub fn new(path: &Path, keys: &[KeyMaterial]) -> Result<FileTicketer, KeyFileError> {
        if keys.is_empty() {
            return Err(whole("no key"));
        }
        Ok(FileTicketer {
            path: path.to_path_buf(),
            keys: ArcSwap::from_pointee(KeySet::new(keys)?),
            counters: Counters::new(),
            key_loads: AtomicU64::new(1),
            last_error: Mutex::new(None),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Puts `keys` in force, unless they are those in force already. True when they changed.
    pub fn install(&self, keys: &[KeyMaterial]) -> Result<bool, KeyFileError> {
        if keys.is_empty() {
            return Err(whole("no key"));
        }
        if self.keys.load().material == keys {
            return Ok(false);
        }
        self.keys.store(Arc::new(KeySet::new(keys)?));
        self.key_loads.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Re-reads the file; keeps the keys in force when it does not parse (logged once per
    /// distinct error).
    pub fn check_file(&self) {
        let outcome = read(&self.path).and_then(|keys| self.install(&keys).map(|c| (c, keys)));
        let mut last = self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match outcome {
            Ok((changed, keys)) => {
                *last = None;
                if changed {
                    tracing::info!(
                        file = %self.path.display(),
                        keys = keys.len(),
                        "ticket keys re-read: the first encrypts, all {} decrypt",
                        keys.len()
                    );
                }
            }
            Err(e) => {
                if last.as_ref() != Some(&e) {
                    self.counters.inc(Count::FileErrors);
                    tracing::error!(
                        file = %self.path.display(),
                        "ticket key file changed but cannot be used, the keys in force stay: {e}"
                    );
                    *last = Some(e);
                }
            }
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            issued: self.counters.sum(Count::Issued),
            decrypted: self.counters.sum(Count::Decrypted),
            decrypted_old: self.counters.sum(Count::DecryptedOld),
            refused: self.counters.sum(Count::Refused),
            key_loads: self.key_loads.load(Ordering::Relaxed),
            file_errors: self.counters.sum(Count::FileErrors),
        }
    }

    /// Opens `cipher` or says why not (for the counters).
    fn open(&self, cipher: &[u8]) -> Option<(Vec<u8>, bool)> {
        let name = cipher.get(..NAME_LEN)?;
        let nonce = cipher.get(NAME_LEN..NAME_LEN + NONCE_LEN)?;
        let sealed = cipher.get(NAME_LEN + NONCE_LEN..)?;
        if sealed.len() < TAG_LEN {
            return None;
        }
        let set = self.keys.load();
        // Key names are public (in every ticket): a plain search leaks nothing.
        let (i, key) = set
            .keys
            .iter()
            .enumerate()
            .find(|(_, k)| k.name[..] == *name)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain_len = key
            .aead
            .open_in_place(nonce, Aad::from(name), &mut buf)
            .ok()?
            .len();
        buf.truncate(plain_len);
        Some((buf, i > 0))
    }
}

impl ProducesTickets for FileTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        TICKET_LIFETIME_S
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let set = self.keys.load();
        let key = set.keys.first()?;
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(NAME_LEN + NONCE_LEN + plain.len() + TAG_LEN);
        out.extend_from_slice(&key.name);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = key
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&key.name),
                out.get_mut(NAME_LEN + NONCE_LEN..)?,
            )
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        self.counters.inc(Count::Issued);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        match self.open(cipher) {
            Some((plain, old)) => {
                self.counters.inc(Count::Decrypted);
                if old {
                    self.counters.inc(Count::DecryptedOld);
                }
                Some(plain)
            }
            None => {
                self.counters.inc(Count::Refused);
                None
            }
        }
    }
}

/// The live ticketers of this process, one per key file: a reload that names the same file
/// gets the same ticketer (its keys updated, its counters kept, one watcher).
static TICKETERS: Mutex<Vec<Weak<FileTicketer>>> = Mutex::new(Vec::new());

/// The ticketer for `keys.path`, with `keys` in force: the process's existing one for that
/// file if there is one, else a new one with a watcher thread that re-reads the file every
/// [`WATCH_INTERVAL`] for as long as a TLS configuration holds the ticketer.
pub fn ticketer(keys: &TicketKeys) -> Result<Arc<FileTicketer>, KeyFileError> {
    let mut live = TICKETERS.lock().unwrap_or_else(PoisonError::into_inner);
    live.retain(|w| w.strong_count() > 0);
    if let Some(t) = live
        .iter()
        .filter_map(Weak::upgrade)
        .find(|t| t.path == keys.path)
    {
        t.install(&keys.keys)?;
        return Ok(t);
    }
    let t = Arc::new(FileTicketer::new(&keys.path, &keys.keys)?);
    live.push(Arc::downgrade(&t));
    let weak = Arc::downgrade(&t);
    std::thread::Builder::new()
        .name("tern-ticket-keys".into())
        .spawn(move || watch(weak))
        .map_err(|e| whole(format!("cannot start the key file watcher: {e}")))?;
    Ok(t)
}

/// The watcher: ends once no configuration holds the ticketer any more.
fn watch(ticketer: Weak<FileTicketer>) {
    loop {
        std::thread::sleep(WATCH_INTERVAL);
        match ticketer.upgrade() {
            Some(t) => t.check_file(),
            None => return,
        }
    }
}

/// Every live key file's counters (normally one), for `stats` and `/metrics`.
pub fn stats() -> Vec<(PathBuf, Snapshot)> {
    TICKETERS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter_map(Weak::upgrade)
        .map(|t| (t.path.clone(), t.snapshot()))
        .collect()
}

/// A key file's text split for rewriting: the comment block before the first key (kept), and
/// the keys.
fn read_for_rewrite(path: &Path) -> Result<(String, Vec<KeyMaterial>), KeyFileError> {
    let text = std::fs::read_to_string(path).map_err(|e| whole(format!("cannot read: {e}")))?;
    let keys = parse(&text)?;
    let header: String = text
        .lines()
        .take_while(|l| l.trim().is_empty() || l.trim().starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    Ok((header, keys))
}

/// Replaces `path` with `header` and `keys` atomically: a temporary file beside it (same
/// owner and mode as the file it replaces, 0600 for a new one), fsync, rename, fsync of the
/// directory. A reader (tern's watcher, another host's sync) sees the old file or the new one.
fn write_atomically(path: &Path, header: &str, keys: &[KeyMaterial]) -> Result<(), KeyFileError> {
    use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
    let io = |what: &str, e: std::io::Error| whole(format!("{what}: {e}"));
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| whole("not a file name"))?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(".{file_name}.tern-{}", std::process::id()));
    let old = std::fs::metadata(path).ok();
    let mut text = header.to_string();
    for k in keys {
        text.push_str(&k.to_line());
        text.push('\n');
    }
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io(&format!("cannot create {}", tmp.display()), e))?;
        if let Some(m) = &old {
            // Keep who may read it: tern may run as another user than the one rotating.
            std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()))
                .map_err(|e| io("cannot give the new file the old one's owner", e))?;
            f.set_permissions(std::fs::Permissions::from_mode(m.mode() & 0o7777))
                .map_err(|e| io("cannot give the new file the old one's mode", e))?;
        }
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| io("cannot write the new file", e))?;
        std::fs::rename(&tmp, path).map_err(|e| io("cannot rename the new file over it", e))?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("cannot sync the directory", e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `tern ticket-keys stage FILE`: a new key in second place (decrypt-only). The fleet's first
/// step: every host learns to open tickets under the key before any host seals with it.
pub fn stage(path: &Path) -> Result<Vec<KeyMaterial>, KeyFileError> {
    let (header, mut keys) = read_for_rewrite(path)?;
    keys.insert(1.min(keys.len()), generate()?);
    write_atomically(path, &header, &keys)?;
    Ok(keys)
}

/// `tern ticket-keys promote FILE`: the second key becomes the first (it encrypts from now
/// on), the former first follows it, and at most `keep` decrypt-only keys stay.
pub fn promote(path: &Path, keep: usize) -> Result<Vec<KeyMaterial>, KeyFileError> {
    let (header, mut keys) = read_for_rewrite(path)?;
    if keys.len() < 2 {
        return Err(whole(
            "only one key: nothing to promote (run `tern ticket-keys stage` first)",
        ));
    }
    keys.swap(0, 1);
    keys.truncate(keep.saturating_add(1));
    write_atomically(path, &header, &keys)?;
    Ok(keys)
}

/// `tern ticket-keys rotate FILE`: a new first key, the previous `keep` keys after it (stage
/// and promote at once, for one host; creates the file when it does not exist).
pub fn rotate(path: &Path, keep: usize) -> Result<Vec<KeyMaterial>, KeyFileError> {
    let (header, mut keys) = match read_for_rewrite(path) {
        Ok(r) => r,
        Err(_) if !path.exists() => (
            "# tern ticket keys: the first line encrypts, every line decrypts.\n".to_string(),
            Vec::new(),
        ),
        Err(e) => return Err(e),
    };
    keys.insert(0, generate()?);
    keys.truncate(keep.saturating_add(1));
    write_atomically(path, &header, &keys)?;
    Ok(keys)
}

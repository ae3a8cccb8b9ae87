//! UMEM memory: one anonymous mapping per worker, in 2 MiB hugepages when they can be had.
//!
//! The mapping is made with memmap2 (`MAP_ANONYMOUS | MAP_PRIVATE | MAP_POPULATE`, plus
//! `MAP_HUGETLB | MAP_HUGE_2MB` for hugepages), prefaulted so the data path never takes a page
//! fault, and never grows. A private hugetlb mapping reserves its pages when it is made, so if
//! the 2 MiB pool is short the `mmap` fails with `ENOMEM` up front (never a `SIGBUS` later).
//!
//! `hugepages = "auto"` (`config::HugePages::Auto`): map from the pool; if it is short and the
//! process may write `/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages` (root), raise the
//! pool by exactly the shortfall and try again; if that fails too, lower the pool back to what it
//! was and fall back to 4 KiB pages with one warning per process ([`PageKind::Small`], exported
//! as the `hugepage_fallback` counter). Pages added to the pool are **not** given back when tern
//! exits: the kernel keeps them reserved for hugetlb until someone lowers `nr_hugepages` (tern
//! logs how many it added). `"require"` fails instead of falling back; `"off"` uses 4 KiB pages.
//!
//! The memory is charged to RLIMIT_MEMLOCK when the kernel pins it at `XDP_UMEM_REG`, unless the
//! process has CAP_IPC_LOCK (root does).
//!
//! Not here: which frame is where (`frames`), the kernel registration (`xsk`).

use std::io;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use memmap2::{MmapMut, MmapOptions};

use crate::config::HugePages;

/// 2 MiB: the hugepage size the UMEM asks for (`MAP_HUGE_2MB`, log2 = 21).
pub const HUGE_PAGE: usize = 2 << 20;
const HUGE_PAGE_SHIFT: u8 = 21;
/// The 2 MiB pool's controls. The per-size directory is used rather than `/proc/sys/vm/
/// nr_hugepages`, which is about the *default* hugepage size and may not be 2 MiB.
const HUGE_POOL: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

/// Serialises pool reservations in this process: workers build their UMEMs concurrently, and
/// "read nr_hugepages, add the shortfall, write it back" must not interleave.
static POOL_LOCK: Mutex<()> = Mutex::new(());
/// The fallback warning is logged once per process, not once per worker.
static FALLBACK_WARNED: AtomicBool = AtomicBool::new(false);

/// The kind of pages behind a UMEM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PageKind {
    /// 2 MiB hugepages.
    Huge,
    /// Ordinary 4 KiB pages (`hugepages = "off"`, or the `auto` fallback).
    Small,
}

impl std::fmt::Display for PageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PageKind::Huge => "2MiB-hugepages",
            PageKind::Small => "4KiB-pages",
        })
    }
}

/// Why the UMEM memory could not be had.
#[derive(Debug, thiserror::Error)]
pub enum UmemError {
    #[error("UMEM: {frames} frames of {frame_size} bytes is not a size that can be mapped")]
    BadSize { frames: u32, frame_size: u32 },
    #[error("UMEM: xdp.hugepages = \"require\" but {bytes} bytes of 2 MiB hugepages cannot be had: {reason}")]
    HugePagesRequired { bytes: usize, reason: String },
    #[error("UMEM: cannot map {bytes} bytes: {source}")]
    Map {
        bytes: usize,
        #[source]
        source: io::Error,
    },
}

/// The UMEM's memory. Unmapped on drop; the owner must have closed every AF_XDP socket that
/// uses it first (`Xsk` declares it last for that reason).
pub struct UmemMemory {
    #[expect(
        dead_code,
        reason = "held for its Drop (munmap); accessed through `base`"
    )]
    map: MmapMut,
    /// `map`'s first byte, taken once (memmap2 hands out a mutable pointer only through
    /// `&mut`, while frames are addressed through shared access to the owner).
    base: NonNull<u8>,
    /// Bytes registered with the kernel: `frames * frame_size`. The mapping may be longer
    /// (rounded up to a whole hugepage); the tail is never used.
    len: usize,
    kind: PageKind,
    /// Hugepages this UMEM added to the system pool (not given back on drop).
    reserved: u64,
}

// SAFETY: `base` points into `map`, which lives as long as the value. The memory is shared by
// the workers of an interface and by the kernel; who may touch which frame is decided by frame
// ownership (`xsk::frames`), never by this type, which only hands out the base address.
unsafe impl Send for UmemMemory {}
// SAFETY: as above; `&UmemMemory` gives access to nothing but the address and metadata.
unsafe impl Sync for UmemMemory {}

impl std::fmt::Debug for UmemMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UmemMemory")
            .field("len", &self.len)
            .field("kind", &self.kind)
            .field("reserved", &self.reserved)
            .finish()
    }
}

impl UmemMemory {
    fn from_map(mut map: MmapMut, len: usize, kind: PageKind, reserved: u64) -> UmemMemory {
        let base = NonNull::new(map.as_mut_ptr()).unwrap_or_else(NonNull::dangling);
        UmemMemory {
            map,
            base,
            len,
            kind,
            reserved,
        }
    }

    /// Maps `frames * frame_size` bytes according to `policy`.
    pub fn new(frames: u32, frame_size: u32, policy: HugePages) -> Result<UmemMemory, UmemError> {
        let _guard = POOL_LOCK
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        UmemMemory::new_locked(frames, frame_size, policy, Reserve::IfShort)
    }

    /// [`UmemMemory::new`], with [`POOL_LOCK`] held by the caller.
    fn new_locked(
        frames: u32,
        frame_size: u32,
        policy: HugePages,
        reserve: Reserve,
    ) -> Result<UmemMemory, UmemError> {
        let len = (frames as usize)
            .checked_mul(frame_size as usize)
            .filter(|&len| len > 0 && isize::try_from(len).is_ok())
            .ok_or(UmemError::BadSize { frames, frame_size })?;
        match policy {
            HugePages::Off => map_small(len),
            HugePages::Require => map_huge(len, reserve)
                .map_err(|reason| UmemError::HugePagesRequired { bytes: len, reason }),
            HugePages::Auto => match map_huge(len, reserve) {
                Ok(memory) => Ok(memory),
                Err(reason) => {
                    if !FALLBACK_WARNED.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            bytes = len,
                            %reason,
                            "2 MiB hugepages not available for the AF_XDP UMEM; using 4 KiB \
                             pages (more TLB misses on the data path)"
                        );
                    }
                    map_small(len)
                }
            },
        }
    }

    /// The registered area (page aligned: the start of the mapping).
    pub fn area(&self) -> NonNull<[u8]> {
        NonNull::slice_from_raw_parts(self.base, self.len)
    }

    /// The first byte of the area.
    pub fn base(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    pub fn page_kind(&self) -> PageKind {
        self.kind
    }

    /// Hugepages this UMEM added to the system pool at start-up (they stay in the pool).
    pub fn reserved_hugepages(&self) -> u64 {
        self.reserved
    }
}

fn map_small(len: usize) -> Result<UmemMemory, UmemError> {
    let map = MmapOptions::new()
        .len(len)
        .populate()
        .map_anon()
        .map_err(|source| UmemError::Map { bytes: len, source })?;
    Ok(UmemMemory::from_map(map, len, PageKind::Small, 0))
}

/// Whether a short hugepage pool may be grown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reserve {
    /// Grow `nr_hugepages` by the shortfall (what tern does).
    IfShort,
    /// Use the pool as it is (tests of the fallback).
    #[cfg(test)]
    Never,
}

/// Maps `len` bytes of 2 MiB hugepages, growing the pool by the shortfall if needed and
/// allowed. The error is the reason, for the warning or the `require` error. The caller holds
/// [`POOL_LOCK`].
fn map_huge(len: usize, reserve: Reserve) -> Result<UmemMemory, String> {
    // A hugetlb mapping is unmapped in whole hugepages: map whole pages, register `len`.
    let mapped = len.div_ceil(HUGE_PAGE) * HUGE_PAGE;
    let pages = (mapped / HUGE_PAGE) as u64;
    let first = match try_map_huge(mapped) {
        Ok(map) => return Ok(UmemMemory::from_map(map, len, PageKind::Huge, 0)),
        Err(err) => err,
    };
    if first.raw_os_error() != Some(libc::ENOMEM) || reserve != Reserve::IfShort {
        return Err(format!("mmap(MAP_HUGETLB): {first}"));
    }
    let pool = Path::new(HUGE_POOL);
    let before = read_count(&pool.join("nr_hugepages"))
        .map_err(|err| format!("the 2 MiB pool is short and unreadable ({err})"))?;
    let available = read_count(&pool.join("free_hugepages"))
        .and_then(|free| Ok(free.saturating_sub(read_count(&pool.join("resv_hugepages"))?)))
        .map_err(|err| format!("the 2 MiB pool is short and unreadable ({err})"))?;
    let shortfall = pages.saturating_sub(available).max(1);
    let wanted = before + shortfall;
    if let Err(err) = std::fs::write(pool.join("nr_hugepages"), wanted.to_string()) {
        return Err(format!(
            "the 2 MiB pool has {available} free pages, {pages} are needed, and it cannot be \
             grown ({err})"
        ));
    }
    match try_map_huge(mapped) {
        Ok(map) => {
            tracing::info!(
                added = shortfall,
                nr_hugepages = wanted,
                "grew the 2 MiB hugepage pool for the AF_XDP UMEM (the pages stay reserved \
                 after tern exits; lower vm.nr_hugepages to release them)"
            );
            Ok(UmemMemory::from_map(map, len, PageKind::Huge, shortfall))
        }
        Err(err) => {
            // The kernel could not find enough contiguous memory: give back what it did find,
            // since nothing will use it.
            let got = read_count(&pool.join("nr_hugepages")).unwrap_or(wanted);
            let _ = std::fs::write(pool.join("nr_hugepages"), before.to_string());
            Err(format!(
                "asked the kernel to grow the 2 MiB pool from {before} to {wanted} pages, it \
                 reached {got}, and mmap still failed ({err})"
            ))
        }
    }
}

fn try_map_huge(len: usize) -> io::Result<MmapMut> {
    MmapOptions::new()
        .len(len)
        .huge(Some(HUGE_PAGE_SHIFT))
        .populate()
        .map_anon()
}

fn read_count(path: &Path) -> io::Result<u64> {
    let text = std::fs::read_to_string(path)?;
    text.trim()
        .parse()
        .map_err(|_| io::Error::other(format!("{}: not a number: {text:?}", path.display())))
}

/// The 2 MiB pool's `nr_hugepages`, for tests that must restore it.
#[cfg(test)]
pub(crate) fn pool_size() -> io::Result<u64> {
    read_count(&Path::new(HUGE_POOL).join("nr_hugepages"))
}

/// Sets the 2 MiB pool's `nr_hugepages` (tests restoring what they changed).
#[cfg(test)]
pub(crate) fn set_pool_size(pages: u64) -> io::Result<()> {
    let _guard = POOL_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    std::fs::write(Path::new(HUGE_POOL).join("nr_hugepages"), pages.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_pages_are_mapped_and_writable() {
        let memory = UmemMemory::new(64, 2048, HugePages::Off).expect("4 KiB UMEM");
        assert_eq!(memory.page_kind(), PageKind::Small);
        assert_eq!(memory.area().len(), 64 * 2048);
        assert_eq!(memory.reserved_hugepages(), 0);
        let base = memory.base();
        assert_eq!(base as usize % 4096, 0, "the area must be page aligned");
        // SAFETY: both offsets are inside the mapping, which nothing else uses.
        unsafe {
            base.write(0xaa);
            base.add(64 * 2048 - 1).write(0x55);
            assert_eq!(base.read(), 0xaa);
        }
    }

    /// `auto` with a pool that is too small and may not grow falls back to 4 KiB pages;
    /// `require` refuses. More pages than the whole pool (plus its overcommit) are asked for,
    /// with the pool lock held so no test in this process resizes it meanwhile.
    #[test]
    fn auto_falls_back_to_small_pages_and_require_refuses() {
        let _guard = POOL_LOCK
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let pool = Path::new(HUGE_POOL);
        let pages = read_count(&pool.join("nr_hugepages")).expect("nr_hugepages")
            + read_count(&pool.join("nr_overcommit_hugepages")).expect("overcommit")
            + 1;
        let frames = (pages * (HUGE_PAGE as u64) / 2048) as u32;
        let memory = UmemMemory::new_locked(frames, 2048, HugePages::Auto, Reserve::Never)
            .expect("auto falls back instead of failing");
        assert_eq!(memory.page_kind(), PageKind::Small);
        assert_eq!(memory.reserved_hugepages(), 0);
        drop(memory);
        match UmemMemory::new_locked(frames, 2048, HugePages::Require, Reserve::Never) {
            Err(UmemError::HugePagesRequired { bytes, .. }) => {
                assert_eq!(bytes, frames as usize * 2048)
            }
            other => panic!("require without hugepages must fail: {other:?}"),
        }
    }

    #[test]
    fn zero_frames_is_refused() {
        match UmemMemory::new(0, 2048, HugePages::Off) {
            Err(UmemError::BadSize { frames: 0, .. }) => {}
            other => panic!("expected BadSize, got {other:?}"),
        }
    }
}

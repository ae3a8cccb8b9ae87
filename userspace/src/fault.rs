//! A test-only fault hook: the `TERN_TEST_FAULT` environment variable makes one of tern's
//! threads fail on purpose, so the end-to-end tests can check what tern does when a thread dies
//! (it exits at once, non-zero, with the reason logged: docs/operations.md, "When a thread
//! fails"). Not for production use; without the variable nothing here does anything.
//!
//! The value is `<kind>:<thread>[:<index>]`: kind `panic` (the thread panics) or `error` (its
//! loop returns an error, as an I/O failure would); thread `kernel-worker:<i>` (`tern-w<i>`),
//! `bypass-worker:<i>` (`tern-x<i>`, every interface's worker `i`) or `control`
//! (`tern-control`, on the next command it handles). The variable is read once, by [`init`]
//! at start-up; a value that does not parse is a start-up error. The fault fires at most once,
//! at the first [`check`] of the named thread after [`arm`] (which the server calls once it is
//! ready), so the thread has served before it fails.
//!
//! Each thread's loop calls [`check`] once per turn: one relaxed atomic load when no fault is
//! armed, which is always the case outside the tests.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// The environment variable read by [`init`].
pub const ENV: &str = "TERN_TEST_FAULT";

/// A thread that can be told to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    /// Kernel-mode worker `i` (`tern-w<i>`).
    KernelWorker(usize),
    /// Bypass worker `i` (`tern-x<i>`).
    BypassWorker(usize),
    /// The control thread (`tern-control`).
    Control,
}

/// How the thread fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `panic!` at the check.
    Panic,
    /// The check returns [`Injected`], which the thread's loop returns as its error.
    Error,
}

/// A parsed `TERN_TEST_FAULT` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub kind: Kind,
    pub site: Site,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::Panic => "panic",
            Kind::Error => "error",
        };
        match self.site {
            Site::KernelWorker(i) => write!(f, "{kind}:kernel-worker:{i}"),
            Site::BypassWorker(i) => write!(f, "{kind}:bypass-worker:{i}"),
            Site::Control => write!(f, "{kind}:control"),
        }
    }
}

impl std::str::FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Fault, String> {
        let bad = |why: &str| {
            format!(
                "{ENV}={s:?}: {why} (expected panic|error:kernel-worker:<i>, \
                 panic|error:bypass-worker:<i> or panic|error:control)"
            )
        };
        let mut parts = s.split(':');
        let kind = match parts.next() {
            Some("panic") => Kind::Panic,
            Some("error") => Kind::Error,
            _ => return Err(bad("unknown kind")),
        };
        let index = |part: Option<&str>| {
            part.and_then(|p| p.parse::<usize>().ok())
                .ok_or_else(|| bad("missing or invalid worker index"))
        };
        let site = match parts.next() {
            Some("kernel-worker") => Site::KernelWorker(index(parts.next())?),
            Some("bypass-worker") => Site::BypassWorker(index(parts.next())?),
            Some("control") => Site::Control,
            _ => return Err(bad("unknown thread")),
        };
        if parts.next().is_some() {
            return Err(bad("trailing fields"));
        }
        Ok(Fault { kind, site })
    }
}

/// The error a thread returns for an [`Kind::Error`] fault.
#[derive(Debug, Clone, thiserror::Error)]
#[error("injected fault ({ENV}={fault})")]
pub struct Injected {
    pub fault: Fault,
}

impl From<Injected> for io::Error {
    fn from(e: Injected) -> io::Error {
        io::Error::other(e)
    }
}

/// The configured fault, set once by [`init`].
static FAULT: OnceLock<Fault> = OnceLock::new();
/// Set by [`arm`] when a fault is configured: the only thing [`check`] reads on its fast path.
static ARMED: AtomicBool = AtomicBool::new(false);
/// The fault has fired (it fires once).
static FIRED: AtomicBool = AtomicBool::new(false);

/// Reads `TERN_TEST_FAULT` (once per process; later calls return what the first one found).
/// `Ok(None)` when it is unset.
pub fn init() -> Result<Option<Fault>, String> {
    if let Some(f) = FAULT.get() {
        return Ok(Some(*f));
    }
    let Some(value) = std::env::var_os(ENV) else {
        return Ok(None);
    };
    let value = value
        .into_string()
        .map_err(|v| format!("{ENV}={v:?}: not UTF-8"))?;
    let fault: Fault = value.parse()?;
    let fault = *FAULT.get_or_init(|| fault);
    tracing::warn!(fault = %fault, "{ENV} is set: this tern will fail on purpose (test only)");
    Ok(Some(fault))
}

/// From now on the configured fault (if any) may fire: called once tern is ready.
pub fn arm() {
    if FAULT.get().is_some() {
        ARMED.store(true, Ordering::Relaxed);
    }
}

/// Called once per turn by the thread at `site`: panics or returns [`Injected`] if the armed
/// fault names this thread and has not fired yet. `#[track_caller]`, so a panic's location is
/// the caller's loop.
#[inline]
#[track_caller]
pub fn check(site: Site) -> Result<(), Injected> {
    if !ARMED.load(Ordering::Relaxed) {
        return Ok(());
    }
    fire(site)
}

#[cold]
#[track_caller]
fn fire(site: Site) -> Result<(), Injected> {
    let Some(&fault) = FAULT.get() else {
        return Ok(());
    };
    if fault.site != site || FIRED.swap(true, Ordering::Relaxed) {
        return Ok(());
    }
    match fault.kind {
        Kind::Panic => panic!("injected fault ({ENV}={fault})"),
        Kind::Error => Err(Injected { fault }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_and_print_back() {
        for text in [
            "panic:kernel-worker:0",
            "error:kernel-worker:3",
            "panic:bypass-worker:1",
            "panic:control",
            "error:control",
        ] {
            let fault: Fault = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(fault.to_string(), text);
        }
        assert_eq!(
            "panic:bypass-worker:2".parse::<Fault>(),
            Ok(Fault {
                kind: Kind::Panic,
                site: Site::BypassWorker(2)
            })
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        for text in [
            "",
            "crash:control",
            "panic",
            "panic:kernel-worker",
            "panic:kernel-worker:x",
            "panic:control:1",
            "panic:signals",
        ] {
            let err = text
                .parse::<Fault>()
                .expect_err(&format!("{text:?} is refused"));
            assert!(err.contains(ENV), "{err}");
        }
    }
}

//! Least privilege: `PR_SET_NO_NEW_PRIVS` for the whole process, and the switch to
//! `[process] user`/`group` once set-up is done.
//!
//! tern starts as root because set-up needs it (binding :443, loading and attaching XDP,
//! creating AF_XDP sockets, reserving hugepages, chowning the control socket). Once every
//! socket is bound, every program attached and every worker has reported ready, [`switch`]
//! sets the supplementary groups, the gid and the uid — in that order, as only root may set
//! groups — and checks that every thread of the process now runs as that user with no
//! capability at all. Nothing tern does after set-up needs one: the workers only use fds they
//! already hold (io_uring, AF_XDP sockets, listening sockets), and the control thread updates
//! and reads BPF maps through map fds it already holds, which needs no capability since Linux
//! 6.5 (before that, `kernel.unprivileged_bpf_disabled` made every `bpf(2)` call privileged;
//! docs/operations.md says what that costs there).
//!
//! Credentials are per thread in Linux. glibc's `setgroups`, `setresgid` and `setresuid`
//! apply the change to every thread of the process (its "setxid" broadcast, a signal each
//! thread handles), whereas the raw syscalls — and rustix's `thread::set_thread_*` — change
//! only the calling thread. This module therefore calls glibc through `libc`, and verifies
//! the outcome on every thread in `/proc/self/task`. The broadcast interrupts whatever each
//! thread is blocked in with `EINTR` once; tern's threads retry such calls.
//!
//! Supplementary groups: the user's groups from the group database, as `initgroups(3)`,
//! `su` and systemd's `User=` set them, so that membership in e.g. Debian's `ssl-cert` group
//! grants the key files to a reload after the switch. Root is refused as `[process] user`:
//! the point of the table is to give up root.
//!
//! Not here: parsing the table (`config`), where the switch happens in start-up (`server`).

use std::ffi::{CStr, CString};
use std::io;

use anyhow::{anyhow, bail, Context as _};

use crate::config::RunAs;

/// Sets `PR_SET_NO_NEW_PRIVS` on the calling thread; threads it starts afterwards inherit it.
/// Call before any thread exists, so that it holds for the whole process: no `execve` can
/// grant tern (or anything it might run) privileges again.
pub fn set_no_new_privs() -> io::Result<()> {
    rustix::thread::set_no_new_privs(true).map_err(io::Error::from)
}

/// Logs, once, that tern keeps running as root because `[process] user` is not set.
pub fn warn_if_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        tracing::warn!(
            "tern keeps running as root: set [process] user (docs/configuration.md) to drop \
             root and every capability once set-up is done"
        );
    }
}

/// Switches every thread of the process to `to`: supplementary groups, then gid, then uid
/// (real, effective and saved), then checks that every thread holds exactly those ids and
/// no capability. Leaving root for a non-zero uid makes the kernel clear the permitted,
/// effective and ambient capability sets (`PR_SET_KEEPCAPS` is never set).
pub fn switch(to: &RunAs) -> anyhow::Result<()> {
    let groups: Vec<libc::gid_t> = to.groups.clone();
    // SAFETY: `groups` is a valid array of `groups.len()` gids for the duration of the call.
    // glibc applies the change to every thread (see the module doc).
    if unsafe { libc::setgroups(groups.len(), groups.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("setgroups({:?}) for user {}", to.groups, to.user));
    }
    // SAFETY: no memory is passed; glibc broadcasts the change to every thread.
    if unsafe { libc::setresgid(to.gid, to.gid, to.gid) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("setresgid({}) for user {}", to.gid, to.user));
    }
    // SAFETY: as above.
    if unsafe { libc::setresuid(to.uid, to.uid, to.uid) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("setresuid({}) for user {}", to.uid, to.user));
    }
    let threads = check_every_thread(to)?;
    tracing::info!(
        user = %to.user,
        uid = to.uid,
        gid = to.gid,
        groups = ?to.groups,
        threads,
        "switched user; no capabilities left"
    );
    Ok(())
}

/// Reads `/proc/self/task/*/status` and checks that every thread has `to`'s uid and gid in
/// all four fields (real, effective, saved, filesystem), no permitted or effective
/// capability and `NoNewPrivs: 1`. Returns how many threads it checked.
fn check_every_thread(to: &RunAs) -> anyhow::Result<usize> {
    let mut checked = 0;
    let tasks = std::fs::read_dir("/proc/self/task").context("listing /proc/self/task")?;
    for task in tasks {
        let path = task
            .context("listing /proc/self/task")?
            .path()
            .join("status");
        let status = match std::fs::read_to_string(&path) {
            Ok(s) => s,
            // A thread that ended since the listing.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        check_status(&status, to)
            .with_context(|| format!("after the switch, {}", path.display()))?;
        checked += 1;
    }
    if checked == 0 {
        bail!("/proc/self/task lists no thread");
    }
    Ok(checked)
}

/// Checks one `/proc/<pid>/task/<tid>/status` text (see [`check_every_thread`]).
fn check_status(status: &str, to: &RunAs) -> anyhow::Result<()> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .ok_or_else(|| anyhow!("no {name} line"))
    };
    let ids = |name: &str, want: u32| -> anyhow::Result<()> {
        let text = field(name)?;
        let got: Vec<&str> = text.split_whitespace().collect();
        if got.len() != 4 || got.iter().any(|id| *id != want.to_string()) {
            bail!("{name} {text}, expected {want} four times");
        }
        Ok(())
    };
    ids("Uid:", to.uid)?;
    ids("Gid:", to.gid)?;
    for caps in ["CapPrm:", "CapEff:"] {
        let text = field(caps)?;
        if u64::from_str_radix(text, 16).map_err(|e| anyhow!("{caps} {text}: {e}"))? != 0 {
            bail!("{caps} {text}: capabilities left");
        }
    }
    let nnp = field("NoNewPrivs:")?;
    if nnp != "1" {
        bail!("NoNewPrivs: {nnp}");
    }
    Ok(())
}

/// A user's entry in the password database (through NSS, as `id` reads it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passwd {
    pub name: String,
    pub uid: u32,
    /// The primary group.
    pub gid: u32,
}

/// The entry of user `name`; `None` if there is none.
pub fn user_by_name(name: &str) -> io::Result<Option<Passwd>> {
    let name = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a name with a NUL byte"))?;
    passwd_lookup(|entry, buf, found| {
        // SAFETY: every pointer is valid for the call: a NUL-terminated name, an entry and a
        // result pointer owned by the caller, and `buf` with its true length.
        unsafe { libc::getpwnam_r(name.as_ptr(), entry, buf.as_mut_ptr(), buf.len(), found) }
    })
}

/// The entry of uid `uid`; `None` if there is none (a numeric id need not have one).
pub fn user_by_id(uid: u32) -> io::Result<Option<Passwd>> {
    passwd_lookup(|entry, buf, found| {
        // SAFETY: as in `user_by_name`.
        unsafe { libc::getpwuid_r(uid, entry, buf.as_mut_ptr(), buf.len(), found) }
    })
}

/// Runs a `getpw*_r` call with a scratch buffer, growing it while the call says ERANGE.
fn passwd_lookup(
    mut call: impl FnMut(&mut libc::passwd, &mut [libc::c_char], &mut *mut libc::passwd) -> libc::c_int,
) -> io::Result<Option<Passwd>> {
    let mut size = 1024;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        // SAFETY: `passwd` is plain data that getpw*_r fills; zeroed is a valid value.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        match call(&mut entry, &mut buf, &mut found) {
            0 if found.is_null() => return Ok(None),
            0 => {
                // SAFETY: on success `pw_name` points to a NUL-terminated string inside
                // `buf`, which is still alive here.
                let name = unsafe { CStr::from_ptr(entry.pw_name) };
                return Ok(Some(Passwd {
                    name: name.to_string_lossy().into_owned(),
                    uid: entry.pw_uid,
                    gid: entry.pw_gid,
                }));
            }
            libc::ERANGE if size < 1 << 20 => size *= 4,
            // Some NSS modules report "no such entry" as an error code instead of a null result.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            rc => return Err(io::Error::from_raw_os_error(rc)),
        }
    }
}

/// The groups of user `name` in the group database, with `gid` (its primary group) included,
/// as `initgroups(3)` would set them.
pub fn groups_of(name: &str, gid: u32) -> io::Result<Vec<u32>> {
    let cname = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a name with a NUL byte"))?;
    let mut size: usize = 32;
    // NGROUPS_MAX is 65536 on Linux: the loop ends by then.
    for _ in 0..8 {
        let mut groups = vec![0 as libc::gid_t; size];
        let mut count = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
        // SAFETY: `groups` holds `count` gids; getgrouplist writes at most that many and
        // sets `count` to the number it found.
        let rc =
            unsafe { libc::getgrouplist(cname.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
        let found = usize::try_from(count).unwrap_or(0);
        if rc >= 0 {
            groups.truncate(found.min(size));
            return Ok(groups);
        }
        // -1: the array was too small; `count` says how large it must be.
        size = found.max(size * 2);
    }
    Err(io::Error::other(format!(
        "the group list of {name:?} does not fit in {size} entries"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nobody() -> RunAs {
        RunAs {
            user: "nobody".into(),
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
        }
    }

    const STATUS: &str = "Name:\ttern-w0\nUid:\t65534\t65534\t65534\t65534\n\
        Gid:\t65534\t65534\t65534\t65534\nCapInh:\t0000000000000000\n\
        CapPrm:\t0000000000000000\nCapEff:\t0000000000000000\nNoNewPrivs:\t1\n";

    #[test]
    fn a_thread_that_switched_passes() {
        check_status(STATUS, &nobody()).expect("switched thread");
    }

    #[test]
    fn a_thread_left_behind_is_named() {
        let cases = [
            (
                "Uid:\t65534\t65534\t65534\t65534",
                "Uid:\t65534\t0\t65534\t65534",
                "Uid:",
            ),
            (
                "Gid:\t65534\t65534\t65534\t65534",
                "Gid:\t0\t0\t0\t0",
                "Gid:",
            ),
            (
                "CapEff:\t0000000000000000",
                "CapEff:\t0000000000000400",
                "CapEff:",
            ),
            (
                "CapPrm:\t0000000000000000",
                "CapPrm:\t000001ffffffffff",
                "CapPrm:",
            ),
            ("NoNewPrivs:\t1", "NoNewPrivs:\t0", "NoNewPrivs:"),
        ];
        for (from, to, name) in cases {
            let err = check_status(&STATUS.replace(from, to), &nobody())
                .expect_err(&format!("{to} refused"));
            assert!(err.to_string().contains(name), "{name}: {err}");
        }
    }

    #[test]
    fn root_and_nobody_resolve() {
        let root = user_by_name("root")
            .expect("look up root")
            .expect("root exists");
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(
            user_by_id(0).expect("look up 0").map(|p| p.name),
            Some("root".into())
        );
        assert_eq!(
            user_by_name("no-such-user-tern-test").expect("look up"),
            None
        );
        let groups = groups_of("root", 0).expect("root's groups");
        assert!(groups.contains(&0), "{groups:?}");
    }
}

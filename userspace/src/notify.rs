//! systemd's service notification protocol (`sd_notify(3)`), for `Type=notify` and
//! `Type=notify-reload` units (dist/tern.service).
//!
//! The service manager passes a datagram socket's address in `NOTIFY_SOCKET`: a path, or an
//! abstract name written with a leading `@`. tern sends it newline-separated `KEY=value`
//! assignments: `READY=1` once start-up is complete ([`ready`]), `RELOADING=1` with
//! `MONOTONIC_USEC` when a reload begins ([`reloading`]; systemd ≥ 253 requires the timestamp
//! for `Type=notify-reload`, and expects `READY=1` again when the reload is done),
//! `STOPPING=1` when draining or stopping begins ([`stopping`]), and free text for
//! `systemctl status` ([`status`]). Without `NOTIFY_SOCKET` (tern not started by systemd)
//! every call does nothing.
//!
//! Hand-written rather than the `sd-notify` crate: that crate connects to `NOTIFY_SOCKET` as
//! a path only, so an abstract address (which systemd documents, and which containers and
//! test harnesses use) would fail. The protocol is one datagram; std has every piece.
//!
//! A notification that cannot be sent is logged and otherwise ignored: it must never stop
//! tern, and under `Type=notify` systemd reports a missing `READY=1` itself (start timeout).
//! The datagram goes out on a fresh unbound socket each time, so this works the same before
//! and after the switch to `[process] user` (the socket systemd makes is writable by all).

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Start-up is complete: every listener accepts and every worker runs. Also sent at the end
/// of a reload, after [`reloading`].
pub fn ready() {
    logged("READY=1\nSTATUS=ready");
}

/// A reload begins (configuration re-read); follow with [`ready`] once it is done, whether it
/// was applied or refused.
pub fn reloading() {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    // CLOCK_MONOTONIC never goes below zero; a negative value would be a kernel bug.
    let usec = u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000
        + u64::try_from(now.tv_nsec).unwrap_or(0) / 1_000;
    logged(&format!(
        "RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading"
    ));
}

/// Draining or stopping begins: systemd shows the unit as deactivating.
pub fn stopping() {
    logged("STOPPING=1\nSTATUS=stopping");
}

/// Free text shown by `systemctl status` (one line: newlines become spaces).
pub fn status(text: &str) {
    logged(&format!("STATUS={}", text.replace('\n', " ")));
}

/// Sends `state` to `NOTIFY_SOCKET`, logging a failure. Nothing happens when it is unset.
fn logged(state: &str) {
    let Some(target) = std::env::var_os(NOTIFY_SOCKET) else {
        return;
    };
    if let Err(e) = send_to(&target, state) {
        tracing::warn!(
            socket = %target.to_string_lossy(),
            error = %e,
            state = %state.replace('\n', " "),
            "cannot notify the service manager"
        );
    }
}

/// Sends `state` as one datagram to `target`: a path, or `@name` for an abstract address.
pub fn send_to(target: &OsStr, state: &str) -> io::Result<()> {
    let bytes = target.as_bytes();
    let addr = match bytes.split_first() {
        None => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "NOTIFY_SOCKET is empty",
            ))
        }
        Some((b'@', name)) => {
            use std::os::linux::net::SocketAddrExt as _;
            SocketAddr::from_abstract_name(name)?
        }
        Some((b'/', _)) => SocketAddr::from_pathname(target)?,
        Some(_) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "NOTIFY_SOCKET is neither an absolute path nor an abstract name (@...)",
            ))
        }
    };
    let socket = UnixDatagram::unbound()?;
    let sent = socket.send_to_addr(state.as_bytes(), &addr)?;
    if sent != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("sent {sent} of {} bytes", state.len()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::linux::net::SocketAddrExt as _;
    use std::time::Duration;

    #[track_caller]
    fn received(socket: &UnixDatagram) -> String {
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn a_path_socket_receives_the_state() {
        let dir = std::env::temp_dir().join(format!("tern-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).expect("temp dir");
        let path = dir.join("notify");
        let socket = UnixDatagram::bind(&path).expect("bind");
        send_to(path.as_os_str(), "READY=1\nSTATUS=ready").expect("send");
        assert_eq!(received(&socket), "READY=1\nSTATUS=ready");
        drop(socket);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_abstract_socket_receives_the_state() {
        let name = format!("tern-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
        let socket = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        send_to(OsStr::new(&format!("@{name}")), "STOPPING=1").expect("send");
        assert_eq!(received(&socket), "STOPPING=1");
    }

    #[test]
    fn a_bad_address_is_an_error_not_a_panic() {
        for target in ["", "relative/path", "/nonexistent/tern/notify"] {
            assert!(
                send_to(OsStr::new(target), "READY=1").is_err(),
                "{target:?}"
            );
        }
    }
}

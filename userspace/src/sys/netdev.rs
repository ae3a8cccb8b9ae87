//! Interface ioctls (`struct ifreq` requests such as `SIOCGIFMTU` and `SIOCETHTOOL`): one
//! place that checks the interface name, opens the throwaway socket the kernel wants the
//! request on and names a missing interface in the error. The callers own what they ask
//! (the MTU in `bypass::mss`, the channel counts in `bypass::xsk`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Runs the interface ioctl `request` on `interface` (in the calling thread's network
/// namespace) and returns the `ifreq` as the kernel left it. `prepare` fills in the request's
/// argument (`ifr_ifru`) after the name is set. A missing interface fails with
/// [`io::ErrorKind::NotFound`] naming it; other failures keep their OS error.
///
/// # Safety
///
/// `request` must be an ioctl that takes a `struct ifreq`, and anything `prepare` points the
/// `ifreq` at (e.g. `ifru_data`) must be valid for what that request reads and writes until
/// this returns.
pub unsafe fn interface_ioctl(
    interface: &str,
    request: libc::c_ulong,
    prepare: impl FnOnce(&mut libc::ifreq),
) -> io::Result<libc::ifreq> {
    let name = interface.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{interface:?} is not an interface name"),
        ));
    }
    // SAFETY: plain socket(2); the result is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid ifreq.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(name) {
        *dst = src as libc::c_char;
    }
    prepare(&mut ifr);
    // SAFETY: the caller guarantees `request` takes an ifreq and that whatever `prepare`
    // pointed it at is live; the name is NUL-terminated (shorter than IFNAMSIZ, zeroed rest).
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, &mut ifr) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        return Err(match err.raw_os_error() {
            Some(libc::ENODEV) => {
                io::Error::new(io::ErrorKind::NotFound, format!("no interface {interface}"))
            }
            _ => err,
        });
    }
    Ok(ifr)
}

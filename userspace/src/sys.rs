//! The system interfaces the workers share: io_uring's buffers and `user_data` encoding
//! ([`uring`]) and random bytes from the kernel ([`fill_random`]); for start-up, interface
//! ioctls ([`netdev`]); and, for the control-plane threads, a blocking write bounded by a
//! deadline ([`write_all_before`]).

pub mod netdev;
pub mod uring;

use std::io::{self, Write};
use std::os::fd::AsFd;
use std::time::Instant;

/// Fills `buf` from the kernel's CSPRNG.
pub fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: writes at most `buf.len() - filled` bytes into the live buffer.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

/// Writes all of `bytes` to the blocking socket `stream` by `deadline`, or fails with
/// [`io::ErrorKind::TimedOut`] (`who` names the peer that did not take its reply, for the
/// message). The control socket and the metrics endpoint answer with it: a peer that never
/// reads holds its thread only until the deadline.
pub fn write_all_before<S>(
    stream: &S,
    mut bytes: &[u8],
    deadline: Instant,
    who: &str,
) -> io::Result<()>
where
    S: AsFd,
    for<'a> &'a S: Write,
{
    let sock = socket2::SockRef::from(stream);
    let mut writer = stream;
    while !bytes.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the {who} did not take its reply before the deadline"),
            ));
        }
        sock.set_write_timeout(Some(left))?;
        match writer.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = bytes.get(n..).unwrap_or_default(),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

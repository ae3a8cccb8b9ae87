//! The system interfaces the workers share: io_uring's buffers and `user_data` encoding
//! ([`uring`]) and random bytes from the kernel ([`fill_random`]).

pub mod uring;

use std::io;

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

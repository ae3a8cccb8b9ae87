//! The Linux system calls tern-load makes directly: the monotonic clock, epoll with nanosecond
//! timeouts, non-blocking TCP connects bound to a chosen source address, resource usage, the
//! file-descriptor limit, timer slack and signals to child processes.
//!
//! Owns: every `unsafe` block of the crate, each a thin wrapper with a `// SAFETY:` argument, so
//! the rest of the load generator is safe code. Sockets, their addresses and options go through
//! socket2; only the option neither socket2 nor rustix has (`IP_BIND_ADDRESS_NO_PORT`) is a raw
//! setsockopt. Does not own: what the sockets carry (`conn`) or how readiness is acted on
//! (`worker`).
//!
//! References: epoll(7), epoll_pwait2(2) (Linux 5.11; falls back to millisecond `epoll_wait`),
//! ip(7) `IP_BIND_ADDRESS_NO_PORT` (Linux 4.2: the source port is picked at `connect`, so many
//! sockets can share one source address with distinct 4-tuples), socket(7) `SO_LINGER`,
//! getrusage(2), proc(5) for `_SC_CLK_TCK`, prctl(2) `PR_SET_TIMERSLACK`.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use socket2::{Domain, SockAddr, SockRef, Socket, Type};

/// Nanoseconds on `CLOCK_MONOTONIC`: the one time base of the crate. It is system-wide, so a
/// parent process can hand a start time to its children as a plain number.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC exists on every Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) failed");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Readiness bits a connection registers for: edge-triggered, so every event is drained until
/// `WouldBlock` and no re-arming syscall is needed.
pub const EV_CONN: u32 = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
pub const EV_OUT: u32 = libc::EPOLLOUT as u32;
/// Error or hang-up: the socket has to be read (or its error taken) to learn which.
pub const EV_FAIL: u32 = (libc::EPOLLERR | libc::EPOLLHUP | libc::EPOLLRDHUP) as u32;

/// One readiness report: the token given at registration and the event bits.
#[derive(Clone, Copy, Debug)]
pub struct Ready {
    pub token: u64,
    pub events: u32,
}

/// An epoll instance plus its event array (allocated once).
pub struct Epoll {
    fd: OwnedFd,
    events: Vec<libc::epoll_event>,
    /// False once `epoll_pwait2` reported ENOSYS (kernels before 5.11).
    pwait2: bool,
}

impl Epoll {
    pub fn new(capacity: usize) -> io::Result<Epoll> {
        // SAFETY: plain syscall; the returned fd is owned by the OwnedFd below.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `fd` was just returned by epoll_create1 and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Epoll {
            fd,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; capacity.max(1)],
            pwait2: true,
        })
    }

    /// Registers `fd` with `token`. Closing the fd removes it from the set, so there is no
    /// `delete`.
    pub fn add(&self, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: both fds are open; `ev` is a valid epoll_event that the kernel only reads.
        cvt(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) })?;
        Ok(())
    }

    /// Waits for readiness or until `timeout_ns` passes (`None`: no timeout) and appends the
    /// reports to `out` (cleared first). EINTR is an empty wake-up.
    pub fn wait(&mut self, out: &mut Vec<Ready>, timeout_ns: Option<u64>) -> io::Result<()> {
        out.clear();
        let max = self.events.len() as libc::c_int;
        let n = loop {
            let rc = if self.pwait2 {
                let ts = timeout_ns.map(|ns| libc::timespec {
                    tv_sec: (ns / 1_000_000_000) as libc::time_t,
                    tv_nsec: (ns % 1_000_000_000) as libc::c_long,
                });
                let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const _);
                // SAFETY: the event array holds `max` entries and outlives the call; `ts_ptr`
                // is null or points to a live timespec; a null sigmask means "no change".
                unsafe {
                    libc::epoll_pwait2(
                        self.fd.as_raw_fd(),
                        self.events.as_mut_ptr(),
                        max,
                        ts_ptr,
                        std::ptr::null(),
                    )
                }
            } else {
                // Round up so a short timeout never becomes a busy loop of zero-length waits.
                let ms =
                    timeout_ns.map_or(-1, |ns| ns.div_ceil(1_000_000).min(i32::MAX as u64) as i32);
                // SAFETY: as above; epoll_wait writes at most `max` entries.
                unsafe { libc::epoll_wait(self.fd.as_raw_fd(), self.events.as_mut_ptr(), max, ms) }
            };
            if rc >= 0 {
                break rc as usize;
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => break 0,
                Some(libc::ENOSYS) if self.pwait2 => self.pwait2 = false,
                _ => return Err(err),
            }
        };
        for ev in &self.events[..n] {
            // Copy out of the (packed on x86-64) struct instead of referencing its fields.
            let (token, events) = (ev.u64, ev.events);
            out.push(Ready { token, events });
        }
        Ok(())
    }
}

/// Starts a non-blocking TCP connect to `target`, optionally from `source` (any port). The
/// returned stream is usually still connecting: wait for writability, then check
/// `TcpStream::take_error`. Nagle is off: requests are single writes and latency matters.
///
/// Per connection: one socket(2) with `SOCK_NONBLOCK | SOCK_CLOEXEC`, the options, bind(2) and
/// connect(2); the addresses are socket2 `SockAddr`s on the stack, so nothing is allocated.
pub fn connect(target: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    // `Socket::new` adds SOCK_CLOEXEC to the type on Linux, in the same socket(2) call.
    let socket = Socket::new(
        Domain::for_address(target),
        Type::STREAM.nonblocking(),
        None,
    )?;
    socket.set_tcp_nodelay(true)?;
    if let Some(ip) = source {
        if target.is_ipv4() {
            set_bind_address_no_port(&socket)?;
        }
        socket.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    }
    if let Err(e) = socket.connect(&SockAddr::from(target)) {
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    Ok(TcpStream::from(socket))
}

/// Sets `IP_BIND_ADDRESS_NO_PORT`: the port is chosen at connect() against the full 4-tuple
/// instead of at bind() against the source address alone, so one source address serves ~28k
/// connections per destination instead of ~28k in total.
///
/// Hand-written because neither socket2 (0.6) nor rustix (1.1) has this option.
fn set_bind_address_no_port(socket: &Socket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: `one` is a live c_int of the size passed; the kernel only reads it.
    cvt(unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// Makes the next `close` of this socket send RST instead of FIN (no TIME_WAIT on either side).
pub fn set_linger_zero(stream: &TcpStream) -> io::Result<()> {
    SockRef::from(stream).set_linger(Some(Duration::ZERO))
}

/// User and system CPU time, microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CpuTime {
    pub user_us: u64,
    pub system_us: u64,
}

impl CpuTime {
    pub fn total_us(self) -> u64 {
        self.user_us + self.system_us
    }

    pub fn since(self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            user_us: self.user_us.saturating_sub(earlier.user_us),
            system_us: self.system_us.saturating_sub(earlier.system_us),
        }
    }

    pub fn plus(self, other: CpuTime) -> CpuTime {
        CpuTime {
            user_us: self.user_us + other.user_us,
            system_us: self.system_us + other.system_us,
        }
    }
}

fn rusage(who: libc::c_int) -> CpuTime {
    // SAFETY: rusage is plain old data; zero is a valid initial value.
    let mut ru: libc::rusage = unsafe { zeroed() };
    // SAFETY: `ru` is a valid, writable rusage; RUSAGE_SELF/CHILDREN are valid selectors.
    let rc = unsafe { libc::getrusage(who, &mut ru) };
    if rc != 0 {
        return CpuTime::default();
    }
    let us = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000 + tv.tv_usec as u64;
    CpuTime {
        user_us: us(ru.ru_utime),
        system_us: us(ru.ru_stime),
    }
}

/// CPU time of this process, all threads.
pub fn cpu_self() -> CpuTime {
    rusage(libc::RUSAGE_SELF)
}

/// CPU time of this process's children that have been waited for.
pub fn cpu_children() -> CpuTime {
    rusage(libc::RUSAGE_CHILDREN)
}

/// Clock ticks per second of /proc/stat and /proc/PID/stat (USER_HZ, almost always 100).
pub fn clock_ticks_per_s() -> u64 {
    // SAFETY: sysconf only reads its argument.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as u64
    } else {
        100
    }
}

/// The soft RLIMIT_NOFILE of this process.
pub fn nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    lim.rlim_cur
}

/// Lowers this thread's timer slack so an open-loop sender wakes close to its intended send
/// times (the default 50 µs slack would show up in every latency sample).
pub fn set_timer_slack_ns(ns: u64) {
    // SAFETY: PR_SET_TIMERSLACK takes an unsigned long by value and touches no memory.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns as libc::c_ulong, 0, 0, 0) };
}

/// Sends SIGTERM to `pid` (a child this process spawned and has not yet waited for).
pub fn terminate(pid: u32) {
    // SAFETY: kill() only sends a signal; the pid is our own unreaped child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
}

//! Reading CPU time and memory from procfs: the whole machine's busy time (`/proc/stat`) and a
//! process group's user + system time and resident memory (`/proc/PID/stat`).
//!
//! Owns: parsing both files (proc(5): the `cpu` line of `/proc/stat`; fields 4–24 of
//! `/proc/PID/stat`, after the parenthesised `comm` that may itself contain spaces and
//! parentheses), and summing a process group. Does not own: what the numbers mean for a
//! benchmark (that is [`super::cpu`]).
//!
//! Units: `/proc/stat` and `/proc/PID/stat` count in clock ticks (`sysconf(_SC_CLK_TCK)`,
//! USER_HZ, 100 on Linux); everything leaving this module is in microseconds so that it can be
//! mixed with `getrusage`/`wait4` figures. 10 ms ticks are coarse, which is why the bench
//! measures windows of seconds and never single operations.
//!
//! Why `/proc/PID/stat` of every group member: `utime`/`stime` there are the whole thread
//! group's (all threads), and `cutime`/`cstime` add children the process has reaped. The
//! targets' workers are long-lived children (nginx, haproxy's master, hitch's manager), so each
//! member is read separately; every target runs in a process group of its own.

use std::path::Path;

/// Why a procfs file could not be read or understood.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("/proc/stat has no aggregate `cpu` line")]
    NoCpuLine,
    #[error("/proc/stat `cpu` line has {0} fields, expected at least 8")]
    ShortCpuLine(usize),
    #[error("/proc/stat `cpu` field {index} is not a number: {text:?}")]
    CpuField { index: usize, text: String },
    #[error("/proc/PID/stat has no `(comm)`: {0:?}")]
    NoComm(String),
    #[error("/proc/PID/stat has {0} fields after comm, expected at least 22")]
    ShortPidStat(usize),
    #[error("/proc/PID/stat field {name} is not a number: {text:?}")]
    PidField { name: &'static str, text: String },
}

/// The aggregate `cpu` line of `/proc/stat`, in clock ticks since boot, all CPUs added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MachineTicks {
    /// user + nice + system + irq + softirq + steal. `guest` and `guest_nice` are already
    /// included in `user`/`nice` (proc(5)) and are not added again.
    pub busy: u64,
    /// idle + iowait: time no task and no interrupt work ran.
    pub idle: u64,
    /// irq + softirq: interrupt work, part of `busy`.
    pub irq: u64,
}

/// Parses `/proc/stat` text and returns its aggregate `cpu` line.
pub fn parse_proc_stat(text: &str) -> Result<MachineTicks, ProcError> {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some("cpu"))
        .ok_or(ProcError::NoCpuLine)?;
    let fields: Vec<&str> = line.split_whitespace().skip(1).collect();
    // Kernels since 2.6.33 print 10 fields; steal (index 7) exists since 2.6.11.
    if fields.len() < 8 {
        return Err(ProcError::ShortCpuLine(fields.len()));
    }
    let num = |index: usize| -> Result<u64, ProcError> {
        fields[index].parse().map_err(|_| ProcError::CpuField {
            index,
            text: fields[index].to_owned(),
        })
    };
    let (user, nice, system, idle, iowait) = (num(0)?, num(1)?, num(2)?, num(3)?, num(4)?);
    let (irq, softirq, steal) = (num(5)?, num(6)?, num(7)?);
    Ok(MachineTicks {
        busy: user + nice + system + irq + softirq + steal,
        idle: idle + iowait,
        irq: irq + softirq,
    })
}

/// The fields of `/proc/PID/stat` the bench uses. Times in clock ticks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PidStat {
    pub pid: i32,
    pub comm: String,
    pub ppid: i32,
    pub pgrp: i32,
    /// The kernel's `PF_*` task flags.
    pub flags: u64,
    pub utime: u64,
    pub stime: u64,
    /// Waited-for children's user time (only children this process reaped).
    pub cutime: u64,
    pub cstime: u64,
    /// Clock ticks after boot at which the process started: with `pid`, identifies it even if
    /// the PID is reused later.
    pub starttime: u64,
    /// Resident set size in pages.
    pub rss_pages: u64,
}

/// `PF_KTHREAD` (include/linux/sched.h): the task is a kernel thread.
const PF_KTHREAD: u64 = 0x0020_0000;

impl PidStat {
    /// A kernel thread (ksoftirqd, kworker, …): its time is kernel work for whoever caused it.
    pub fn is_kernel_thread(&self) -> bool {
        self.flags & PF_KTHREAD != 0
    }

    /// Own and reaped children's user + system ticks.
    pub fn total_ticks(&self) -> u64 {
        self.utime + self.stime + self.cutime + self.cstime
    }
}

/// Parses one `/proc/PID/stat` line. `comm` is everything between the first `(` and the *last*
/// `)`, since a process may name itself `a) b (c`.
pub fn parse_pid_stat(text: &str) -> Result<PidStat, ProcError> {
    let text = text.trim_end();
    let (open, close) = match (text.find('('), text.rfind(')')) {
        (Some(open), Some(close)) if open < close => (open, close),
        _ => return Err(ProcError::NoComm(text.to_owned())),
    };
    let pid_text = text[..open].trim();
    let comm = text[open + 1..close].to_owned();
    // After ") ": state(3) ppid(4) pgrp(5) session(6) tty_nr(7) tpgid(8) flags(9) minflt(10)
    // cminflt(11) majflt(12) cmajflt(13) utime(14) stime(15) cutime(16) cstime(17)
    // priority(18) nice(19) num_threads(20) itrealvalue(21) starttime(22) vsize(23) rss(24).
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    if rest.len() < 22 {
        return Err(ProcError::ShortPidStat(rest.len()));
    }
    fn field<T: std::str::FromStr>(name: &'static str, text: &str) -> Result<T, ProcError> {
        text.parse().map_err(|_| ProcError::PidField {
            name,
            text: text.to_owned(),
        })
    }
    Ok(PidStat {
        pid: field("pid", pid_text)?,
        comm,
        ppid: field("ppid", rest[1])?,
        pgrp: field("pgrp", rest[2])?,
        flags: field("flags", rest[6])?,
        utime: field("utime", rest[11])?,
        stime: field("stime", rest[12])?,
        cutime: field("cutime", rest[13])?,
        cstime: field("cstime", rest[14])?,
        starttime: field("starttime", rest[19])?,
        rss_pages: field("rss", rest[21])?,
    })
}

/// Clock ticks per second (USER_HZ).
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions; _SC_CLK_TCK is a valid name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    // Linux always reports 100; fall back to that if sysconf fails (-1) or reports nonsense.
    u64::try_from(hz).ok().filter(|&h| h > 0).unwrap_or(100)
}

/// Bytes per page, for `rss_pages`.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions; _SC_PAGESIZE is a valid name.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

/// Converts clock ticks to microseconds.
pub fn ticks_to_us(ticks: u64, hz: u64) -> u64 {
    // u128: ticks since boot times 10^6 would overflow u64 after ~5,800 years at 100 Hz, but a
    // caller may pass a sum; stay exact either way.
    (u128::from(ticks) * 1_000_000 / u128::from(hz.max(1))) as u64
}

fn read(path: &Path) -> Result<String, ProcError> {
    std::fs::read_to_string(path).map_err(|source| ProcError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// The machine's `cpu` line now.
pub fn machine_ticks() -> Result<MachineTicks, ProcError> {
    parse_proc_stat(&read(Path::new("/proc/stat"))?)
}

/// What a process group uses right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GroupUsage {
    /// Live members' utime + stime + cutime + cstime, in microseconds.
    pub cpu_us: u64,
    /// Sum of the members' resident set sizes, bytes. Pages shared between members (a master
    /// and its worker) count once per member; the bench uses differences, where that cancels.
    pub rss_bytes: u64,
    /// Live members.
    pub processes: u32,
}

/// Every live process. Processes that vanish between listing `/proc` and reading their `stat`
/// are skipped (they exited; their time is then in their parent's `cutime` once reaped).
pub fn all_processes() -> Result<Vec<PidStat>, ProcError> {
    let dir = std::fs::read_dir("/proc").map_err(|source| ProcError::Read {
        path: "/proc".to_owned(),
        source,
    })?;
    let mut all = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        all.push(parse_pid_stat(&text)?);
    }
    Ok(all)
}

/// Every live process whose process group is `pgid`.
pub fn group_members(pgid: i32) -> Result<Vec<PidStat>, ProcError> {
    let mut all = all_processes()?;
    all.retain(|s| s.pgrp == pgid);
    Ok(all)
}

/// Adds up a process group's CPU time and resident memory.
pub fn group_usage(pgid: i32) -> Result<GroupUsage, ProcError> {
    let hz = clock_ticks_per_second();
    let page = page_size();
    let mut usage = GroupUsage::default();
    let mut ticks = 0u64;
    for stat in group_members(pgid)? {
        ticks += stat.total_ticks();
        usage.rss_bytes += stat.rss_pages * page;
        usage.processes += 1;
    }
    usage.cpu_us = ticks_to_us(ticks, hz);
    Ok(usage)
}

/// Counts ESTABLISHED (state `01`) sockets with local port `port` in `/proc/net/tcp` text
/// (proc(5): `sl local_address rem_address st …`, addresses as `HEXIP:HEXPORT`).
pub fn count_established(text: &str, port: u16) -> u64 {
    let want = format!(":{port:04X}");
    text.lines()
        .skip(1)
        .filter(|line| {
            let mut f = line.split_whitespace();
            let (Some(_sl), Some(local), Some(_remote), Some(state)) =
                (f.next(), f.next(), f.next(), f.next())
            else {
                return false;
            };
            state == "01" && local.ends_with(&want)
        })
        .count() as u64
}

/// user + system time of a `rusage`, microseconds.
pub fn rusage_us(usage: &libc::rusage) -> u64 {
    let tv = |t: libc::timeval| {
        u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000 + u64::try_from(t.tv_usec).unwrap_or(0)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROC_STAT: &str = "\
cpu  10132153 290696 3084719 46828483 16683 0 25195 0 175628 0
cpu0 1393280 32966 572056 13343292 6130 0 17875 0 23933 0
cpu1 1335186 30627 502479 13440548 2510 0 4035 0 28452 0
intr 1462898 0 0 0
ctxt 2398102
btime 1700000000
";

    #[test]
    fn proc_stat_aggregate_line() {
        let t = parse_proc_stat(PROC_STAT).expect("valid /proc/stat");
        // guest (175628) is inside user already and must not be added twice.
        assert_eq!(t.busy, 10132153 + 290696 + 3084719 + 25195);
        assert_eq!(t.idle, 46828483 + 16683);
        assert_eq!(t.irq, 25195);
    }

    #[test]
    fn proc_stat_errors() {
        assert!(matches!(
            parse_proc_stat("cpu0 1 2 3 4 5 6 7 8\n"),
            Err(ProcError::NoCpuLine)
        ));
        assert!(matches!(
            parse_proc_stat("cpu 1 2 3\n"),
            Err(ProcError::ShortCpuLine(3))
        ));
        assert!(matches!(
            parse_proc_stat("cpu 1 2 x 4 5 6 7 8\n"),
            Err(ProcError::CpuField { index: 2, .. })
        ));
    }

    /// A real line from `cat /proc/self/stat`, with a comm that tries to confuse the parser.
    const PID_STAT: &str = "4242 (nginx: a) (b) S 1 4240 4240 0 -1 4194624 1700 0 0 0 \
        123 45 6 7 20 0 3 0 987654 123456789 2048 18446744073709551615 1 1 0 0 0 0 0 \
        4096 0 0 0 0 17 0 0 0 0 0 0\n";

    #[test]
    fn pid_stat_fields() {
        let s = parse_pid_stat(PID_STAT).expect("valid stat line");
        assert_eq!(s.pid, 4242);
        assert_eq!(s.comm, "nginx: a) (b");
        assert_eq!((s.ppid, s.pgrp), (1, 4240));
        assert_eq!(s.flags, 4194624);
        assert!(!s.is_kernel_thread());
        let kthread = PID_STAT.replace(" 4194624 ", " 2129984 ");
        assert!(parse_pid_stat(&kthread).expect("valid").is_kernel_thread());
        assert_eq!((s.utime, s.stime, s.cutime, s.cstime), (123, 45, 6, 7));
        assert_eq!(s.total_ticks(), 181);
        assert_eq!(s.starttime, 987654);
        assert_eq!(s.rss_pages, 2048);
    }

    #[test]
    fn pid_stat_errors() {
        assert!(matches!(
            parse_pid_stat("42 S 1 2"),
            Err(ProcError::NoComm(_))
        ));
        assert!(matches!(
            parse_pid_stat("42 (x) S 1 2 3"),
            Err(ProcError::ShortPidStat(4))
        ));
        let bad = PID_STAT.replace(" 123 45 ", " 12x 45 ");
        assert!(matches!(
            parse_pid_stat(&bad),
            Err(ProcError::PidField { name: "utime", .. })
        ));
    }

    #[test]
    fn our_own_stat_parses_and_we_are_in_our_group() {
        let text = std::fs::read_to_string("/proc/self/stat").expect("read /proc/self/stat");
        let s = parse_pid_stat(&text).expect("our own stat line parses");
        assert_eq!(s.pid, std::process::id() as i32);
        // SAFETY: getpgrp has no preconditions and cannot fail.
        let pgrp = unsafe { libc::getpgrp() };
        assert_eq!(s.pgrp, pgrp);
        let usage = group_usage(pgrp).expect("scan /proc");
        assert!(
            usage.processes >= 1,
            "our own group has no members: {usage:?}"
        );
        assert!(
            usage.rss_bytes > 0,
            "our group has no resident memory: {usage:?}"
        );
        let m = machine_ticks().expect("read /proc/stat");
        assert!(m.busy > 0 && m.idle > 0, "implausible /proc/stat: {m:?}");
    }

    #[test]
    fn established_sockets_on_a_port() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100C80A:01BB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100C80A:01BB 0200C80A:B5D2 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1
   2: 0100C80A:01BB 0200C80A:B5D4 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1
   3: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 4 1 0 20 4 30 10 -1
   4: 0100C80A:01BB 0200C80A:B5D6 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0
   5: 0100C80A:11BB 0200C80A:B5D8 01 00000000:00000000 00:00000000 00000000     0        0 5 1 0 20 4 30 10 -1
";
        // Two established on :443 (0x01BB); the listener (0A), TIME_WAIT (06), the backend
        // connection and port 0x11BB do not count.
        assert_eq!(count_established(text, 443), 2);
        assert_eq!(count_established(text, 0xD431), 1);
        assert_eq!(count_established("header only\n", 443), 0);
    }

    #[test]
    fn tick_conversion() {
        assert_eq!(ticks_to_us(1, 100), 10_000);
        assert_eq!(ticks_to_us(250, 100), 2_500_000);
        assert_eq!(ticks_to_us(3, 1000), 3_000);
        // hz = 0 must not divide by zero.
        assert_eq!(ticks_to_us(3, 0), 3_000_000);
    }
}

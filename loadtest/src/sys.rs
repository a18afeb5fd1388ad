//! The operating-system facts the harness reads or sets: the open-file limit, a clock shared by
//! every load process, the CPU time a thread or process has used, and a relay's `/proc` entries.
//!
//! Everything `unsafe` in the harness is here, each call a plain libc call with owned arguments.
//! It deliberately knows nothing about WebSockets or scenarios.

use std::fs;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

/// Raises the soft open-file limit to the hard limit and returns the new soft limit.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let wanted = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// Nanoseconds on CLOCK_MONOTONIC. The same clock in every process on the machine, so a send
/// timestamp written by one load process can be compared with a receive time in another.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into the timespec we own.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn rusage_us(who: libc::c_int) -> u64 {
    // SAFETY: an all-zero rusage is a valid value; getrusage only writes into it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    unsafe {
        libc::getrusage(who, &mut ru);
    }
    let us = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000 + tv.tv_usec as u64;
    us(ru.ru_utime) + us(ru.ru_stime)
}

/// CPU time (user + system) of the calling thread, in microseconds.
pub fn thread_cpu_us() -> u64 {
    rusage_us(libc::RUSAGE_THREAD)
}

/// CPU time (user + system) of this whole process, in microseconds.
pub fn process_cpu_us() -> u64 {
    rusage_us(libc::RUSAGE_SELF)
}

/// Marks a socket so that binding it to a source address does not reserve a port until
/// `connect`; with it, one source address serves as many connections as the 4-tuple allows.
pub fn set_bind_address_no_port(sock: &impl AsRawFd) {
    const IP_BIND_ADDRESS_NO_PORT: libc::c_int = 24;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads an int we own for the given length, on a descriptor we own.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            IP_BIND_ADDRESS_NO_PORT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Sends SIGTERM to a process we started.
pub fn terminate(pid: u32) {
    // SAFETY: kill with a pid of a child we spawned and a valid signal number.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGTERM);
    }
}

fn clock_ticks_per_s() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// One reading of a relay process: its CPU time so far and its resident memory.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    pub cpu_us: u64,
    pub rss_kb: u64,
    /// The anonymous part of the resident set (RssAnon: the heap and stacks, not the
    /// binary's pages, which vary by a few hundred KiB between identical runs).
    pub anon_kb: u64,
    /// Write-type system calls (write/writev; not send/sendmsg) from /proc/PID/io, if readable.
    pub syscw: Option<u64>,
}

/// Reads `/proc/PID/stat` (utime + stime) and `/proc/PID/status` (VmRSS, RssAnon). None if
/// gone.
pub fn sample_process(pid: u32) -> Option<ProcSample> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ppid(4) ... utime(14) stime(15), 1-based field numbers.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let cpu_us = (utime + stime) * 1_000_000 / clock_ticks_per_s();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let (rss_kb, anon_kb) = (kb("VmRSS:"), kb("RssAnon:"));
    let syscw = fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("syscw:"))
                .and_then(|v| v.trim().parse().ok())
        });
    Some(ProcSample {
        cpu_us,
        rss_kb,
        anon_kb,
        syscw,
    })
}

/// Finds the process listening on a loopback/any TCP port, by matching the listening socket's
/// inode in `/proc/net/tcp*` against every process's descriptors. Needs permission to read
/// other processes' `fd` directories (root, or the same user).
pub fn pid_listening_on(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" {
                continue; // 0A = LISTEN
            }
            let local_port = f[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) {
                inodes.push(format!("socket:[{}]", f[9]));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = fs::read_link(fd.path()) {
                if inodes.iter().any(|i| target.as_os_str() == i.as_str()) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// The `k`-th source address for load connections: 127.0.0.2, 127.0.0.3, ...
/// (127.0.0.1 is left to everything else on the machine).
pub fn source_address(k: u32) -> Ipv4Addr {
    let n = 2 + k;
    Ipv4Addr::new(127, 0, ((n >> 8) & 0xff) as u8, (n & 0xff) as u8)
}

/// Sets a listening socket's accept backlog (std listens with 128; calling `listen` again on a
/// listening socket only changes the backlog).
pub fn set_listen_backlog(sock: &impl AsRawFd, backlog: libc::c_int) {
    // SAFETY: listen on a descriptor we own, with no memory arguments.
    unsafe {
        libc::listen(sock.as_raw_fd(), backlog);
    }
}

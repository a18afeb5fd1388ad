//! Child processes of the tests: spawning them so they die with the test binary, capturing their
//! output line by line, free loopback ports and temporary directories.
//!
//! Every process the harness starts (relays, redis-server, nginx) goes through [`spawn_tied`]:
//! it is forked from one long-lived spawner thread with `PR_SET_PDEATHSIG`, so a test binary that
//! is killed, or that exits with a shared server still in a static, takes its children with it.
//! The signal fires when the *thread* that forked the child ends, which is why the fork happens on
//! a thread that lives as long as the process and not on a test's (short-lived) thread.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

type SpawnRequest = (Command, libc::c_int, mpsc::Sender<std::io::Result<Child>>);

/// Spawn `cmd` so that it receives `death_signal` when the test process ends, however it ends.
pub fn spawn_tied(cmd: Command, death_signal: libc::c_int) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("harness-spawner".into())
            .spawn(move || {
                // Ends only with the process: the sender lives in a static.
                while let Ok((mut cmd, signal, reply)) = rx.recv() {
                    set_parent_death_signal(&mut cmd, signal);
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("start the harness spawner thread");
        tx
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .send((cmd, death_signal, reply_tx))
        .expect("the spawner thread lives as long as the process");
    reply_rx
        .recv()
        .expect("the spawner thread answers every request")
}

#[allow(unsafe_code)]
fn set_parent_death_signal(cmd: &mut Command, signal: libc::c_int) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // system calls (prctl, getppid); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl; then nobody would signal us.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Send `signal` to `pid`. Returns false if there is no such process (already reaped).
#[allow(unsafe_code)]
pub fn send_signal(pid: u32, signal: libc::c_int) -> bool {
    // SAFETY: kill(2) has no memory-safety preconditions; callers pass pids of children they own.
    unsafe { libc::kill(pid as libc::pid_t, signal) == 0 }
}

/// Kill and reap a child (no-op if it already exited).
pub fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Wait for a child to exit, at most `timeout`; true if it did.
pub fn wait_for_child(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A loopback port nobody listens on right now: bind it, close. Another process may take it
/// before ours binds it; starters retry with a new port when that happens.
///
/// The port is below the kernel's ephemeral range (`ip_local_port_range`), which port 0 would
/// draw from: a test that stops a server and starts it again on its port (a rolling restart, a
/// Redis failover) must not find the port taken in between as the source port of some outgoing
/// connection (that made `cluster_nginx`'s rolling restart fail with "Address already in use").
/// Ports are drawn at random and never handed out twice in one test binary.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let ephemeral_low = ephemeral_ports().0;
    let low = 10_000u16;
    if ephemeral_low > low + 1_000 {
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        for _ in 0..1_000 {
            let port = low + (random_u64() % u64::from(ephemeral_low - low)) as u16;
            if given.contains(&port) {
                continue;
            }
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                given.push(port);
                return port;
            }
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral loopback port");
    listener.local_addr().expect("local address").port()
}

/// The kernel's range of source ports for outgoing connections (Linux's default if unreadable).
pub fn ephemeral_ports() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|v| v.parse::<u16>());
            Some((it.next()?.ok()?, it.next()?.ok()?))
        })
        .unwrap_or((32_768, 60_999))
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id().into());
    h.finish()
}

// ---------------------------------------------------------------------------------------------
// Output capture
// ---------------------------------------------------------------------------------------------

/// Lines a child wrote to one pipe, read by a thread so the child never blocks on a full pipe.
/// Cloning shares the same lines.
#[derive(Clone, Default)]
pub struct CapturedLines {
    inner: Arc<(Mutex<Vec<String>>, Condvar)>,
}

impl CapturedLines {
    /// Start reading `pipe` into a new capture.
    pub fn capture(pipe: impl Read + Send + 'static) -> CapturedLines {
        let lines = CapturedLines::default();
        let sink = lines.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut raw = Vec::new();
            loop {
                raw.clear();
                match reader.read_until(b'\n', &mut raw) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => sink.push(String::from_utf8_lossy(&raw).trim_end().to_string()),
                }
            }
        });
        lines
    }

    fn push(&self, line: String) {
        let (lines, changed) = &*self.inner;
        lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
        changed.notify_all();
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.inner
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every line so far, joined with newlines.
    pub fn text(&self) -> String {
        self.lines().join("\n")
    }

    /// The last `n` lines, joined with newlines.
    pub fn tail(&self, n: usize) -> String {
        let lines = self.lines();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Block until line number `index` (0-based) exists; returns it, or None after `timeout`.
    pub fn wait_for_line(&self, index: usize, timeout: Duration) -> Option<String> {
        let (lines, changed) = &*self.inner;
        let deadline = Instant::now() + timeout;
        let mut guard = lines.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(line) = guard.get(index) {
                return Some(line.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            guard = changed
                .wait_timeout(guard, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// The last `n` bytes of `s` (on a character boundary).
pub fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut i = s.len() - n;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

/// The repository root (where Cargo.toml is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh directory under the system temp dir.
    pub fn new(prefix: &str) -> TempDir {
        TempDir::new_in(&std::env::temp_dir(), prefix)
    }

    /// A fresh directory under `root`.
    pub fn new_in(root: &Path, prefix: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let unique = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = root.join(format!("{prefix}-{}-{nanos}-{unique}", std::process::id()));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("create temp dir {}: {e}", path.display()));
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

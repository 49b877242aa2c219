//! Real, unmodified third-party servers and clients (redis, PostgreSQL, nginx, openssl, curl,
//! iperf3) from the test's side, for `tests/tests/real_clients.rs`: finding the programs (and
//! failing under `CI=true` when one is missing), running a client with a deadline, a server
//! stopped on drop, and comparing what arrived with what was sent, saying where they part.

use std::{
    fs,
    io::Read as _,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};

use crate::{
    lb::TempDir,
    stream::{StreamHasher, wait_until},
};

/// Whether the environment says this is CI (`CI=true` or `CI=1`).
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// PostgreSQL's programs: Debian keeps them in `/usr/lib/postgresql/VERSION/bin`, off PATH.
const POSTGRES_PROGRAMS: &[&str] = &["initdb", "pg_ctl", "postgres", "pgbench", "psql"];

/// The newest `/usr/lib/postgresql/VERSION/bin` holding initdb, pg_ctl and pgbench.
pub fn postgres_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            ["initdb", "pg_ctl", "pgbench"]
                .iter()
                .all(|p| bin.join(p).is_file())
                .then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// Where `name` is: PostgreSQL's programs in [`postgres_bin`], others on PATH or in the sbin
/// directories (nginx is in /usr/sbin, which a non-root PATH may lack).
pub fn program(name: &str) -> Option<PathBuf> {
    if POSTGRES_PROGRAMS.contains(&name) {
        return postgres_bin()
            .map(|bin| bin.join(name))
            .filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Like [`program`], panicking if it is missing (after [`have`] said it was there).
pub fn program_path(name: &str) -> PathBuf {
    program(name).unwrap_or_else(|| panic!("{name} is not installed"))
}

/// Whether every program in `names` is installed. If not: under `CI=true` a panic (a real-client
/// case must not pass by not running), else a SKIP message and `false`.
pub fn have(test: &str, names: &[&str]) -> bool {
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| program(n).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        !ci(),
        "{test}: {missing:?} not installed, and CI=true forbids skipping: run `cargo xtask setup` \
         as root"
    );
    eprintln!("SKIP {test}: {missing:?} not installed; `sudo -E cargo xtask setup` installs them");
    false
}

/// The time one test case may take in all: every client command's timeout is cut to what is
/// left, so a stalled case fails in bounded time instead of hanging the suite.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    deadline: Instant,
}

impl Budget {
    pub fn new(total: Duration) -> Budget {
        Budget {
            deadline: Instant::now() + total,
        }
    }

    /// `wanted`, or what is left of the budget if that is less (at least 1 s).
    pub fn timeout(&self, wanted: Duration) -> Duration {
        wanted
            .min(self.deadline.saturating_duration_since(Instant::now()))
            .max(Duration::from_secs(1))
    }
}

/// A client command that ran (or was killed at its deadline).
#[derive(Debug)]
pub struct Run {
    /// The command line, for messages.
    pub what: String,
    /// `None`: killed at the deadline.
    pub status: Option<ExitStatus>,
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub elapsed: Duration,
    pub timeout: Duration,
}

impl Run {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// What happened, for a failure message: the exit (or the stall), stderr, the start of
    /// stdout.
    pub fn describe(&self) -> String {
        let end = match self.status {
            Some(s) => format!("exited with {s} after {:.2}s", self.elapsed.as_secs_f64()),
            None => format!(
                "STALLED: still running after {:.1}s, killed",
                self.timeout.as_secs_f64()
            ),
        };
        let stdout = String::from_utf8_lossy(&self.stdout[..self.stdout.len().min(2000)]);
        format!(
            "`{}` {end}\n--- its stderr ---\n{}\n--- its stdout (first 2000 bytes) ---\n{stdout}\n---",
            self.what,
            tail(&self.stderr, 40)
        )
    }

    /// Panics with [`Run::describe`] unless it exited 0.
    pub fn expect_success(self) -> Run {
        assert!(self.success(), "{}", self.describe());
        self
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs `cmd` with stdin from `stdin` (or empty), stdout and stderr captured, in a process group
/// of its own that is killed (SIGKILL) if it has not exited within `timeout`.
pub fn run(cmd: &mut Command, stdin: Option<&Path>, timeout: Duration) -> Run {
    let what = command_line(cmd);
    let scratch = TempDir::new();
    let out_path = scratch.path.join("stdout");
    let err_path = scratch.path.join("stderr");
    cmd.stdin(match stdin {
        Some(path) => Stdio::from(
            fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display())),
        ),
        None => Stdio::null(),
    })
    .stdout(fs::File::create(&out_path).expect("create stdout file"))
    .stderr(fs::File::create(&err_path).expect("create stderr file"))
    .process_group(0);
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{what}`: {e}"));
    let status = wait_deadline(&mut child, timeout);
    if status.is_none() {
        kill_group(&child, Signal::SIGKILL);
        let _ = child.wait();
    }
    Run {
        what,
        status,
        stdout: fs::read(&out_path).unwrap_or_default(),
        stderr: String::from_utf8_lossy(&fs::read(&err_path).unwrap_or_default()).into_owned(),
        elapsed: started.elapsed(),
        timeout,
    }
}

fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn wait_deadline(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait for a child") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill_group(child: &Child, signal: Signal) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = killpg(Pid::from_raw(pid), signal);
    }
}

/// A long-running program (a server, or a subscriber), in a process group of its own, its
/// output in a log file. Dropped: SIGTERM to the group, SIGKILL after 3 s; when the test is
/// failing, the log's tail is printed.
pub struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `cmd` with stdin empty and stdout and stderr appended to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Daemon {
        let what = command_line(cmd);
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup log fd"))
            .stderr(file)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} (`{what}`): {e}"));
        Daemon {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
        }
    }

    /// Everything it wrote so far.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// Waits (at most `timeout`) until something listens on `addr` (/proc/net/tcp: nothing
    /// connects, which an iperf3 server would take for a client). Panics with the log if it
    /// exits or does not listen in time.
    pub fn wait_listening(&mut self, addr: std::net::SocketAddr, timeout: Duration) {
        let mut exited = None;
        let up = wait_until(timeout, || {
            exited = self.child.try_wait().ok().flatten();
            exited.is_none() && crate::lb::tcp_listening(addr)
        });
        assert!(
            up,
            "{} does not listen on {addr} after {timeout:?} (exit status {exited:?}); its log:\n{}",
            self.name,
            tail(&self.log(), 40)
        );
    }

    /// Its exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            kill_group(&self.child, Signal::SIGTERM);
            if wait_deadline(&mut self.child, Duration::from_secs(3)).is_none() {
                kill_group(&self.child, Signal::SIGKILL);
                let _ = self.child.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "--- {} log, last 40 lines ---\n{}\n--- end of {} log ---",
                self.name,
                tail(&self.log(), 40),
                self.name
            );
        }
    }
}

/// `len` random bytes (from /dev/urandom) written to `path`.
pub fn random_file(path: &Path, len: u64) {
    let mut src = fs::File::open("/dev/urandom").expect("open /dev/urandom");
    let mut dst =
        fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let copied = std::io::copy(&mut (&mut src).take(len), &mut dst).expect("fill random file");
    assert_eq!(copied, len, "short read from /dev/urandom");
}

/// sha256 of `data` as hex (by `sha256sum` when present: the test crate is unoptimised).
pub fn sha256(data: &[u8]) -> String {
    let mut hasher = StreamHasher::new();
    hasher.update(data);
    hasher.finish()
}

/// `None` if `got` is `expected`, byte for byte; else what differs: lengths, sha256 of both,
/// the first differing offset, and whether the bytes found there were seen earlier or later in
/// `expected` (a duplicated or a lost stretch).
pub fn difference(expected: &[u8], got: &[u8]) -> Option<String> {
    if expected == got {
        return None;
    }
    const CHUNK: usize = 1 << 16;
    let mut offset = 0;
    while offset < expected.len().min(got.len()) {
        let end = (offset + CHUNK).min(expected.len()).min(got.len());
        if expected[offset..end] != got[offset..end] {
            offset += expected[offset..end]
                .iter()
                .zip(&got[offset..end])
                .position(|(a, b)| a != b)
                .expect("a chunk that differs has a differing byte");
            break;
        }
        offset = end;
    }
    let mut text = format!(
        "expected {} bytes (sha256 {}), got {} bytes (sha256 {}); ",
        expected.len(),
        sha256(expected),
        got.len(),
        sha256(got)
    );
    if offset == expected.len().min(got.len()) {
        text += &format!(
            "the first {offset} bytes agree, then one side ends ({})",
            if got.len() < expected.len() {
                "bytes are missing at the end"
            } else {
                "extra bytes at the end"
            }
        );
        return Some(text);
    }
    text += &format!(
        "first difference at offset {offset} (expected {:02x}, got {:02x})",
        expected[offset], got[offset]
    );
    // Where do the 32 bytes found at `offset` come from? Searched within 8 MiB either side.
    let needle = &got[offset..(offset + 32).min(got.len())];
    if needle.len() == 32 {
        let lo = offset.saturating_sub(8 << 20);
        let hi = (offset + (8 << 20)).min(expected.len());
        match expected[lo..hi].windows(32).position(|w| w == needle) {
            Some(p) if lo + p < offset => {
                text += &format!(
                    "; the bytes there are the sent bytes from offset {} again: {} bytes \
                     DUPLICATED",
                    lo + p,
                    offset - (lo + p)
                );
            }
            Some(p) => {
                text += &format!(
                    "; the bytes there are the sent bytes from offset {}: {} bytes LOST",
                    lo + p,
                    lo + p - offset
                );
            }
            None => text += "; the bytes there appear nowhere nearby in what was sent (CORRUPTED)",
        }
    }
    Some(text)
}

/// Reads `path` whole (panics with the path if it cannot).
pub fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

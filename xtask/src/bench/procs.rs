//! Child processes that cannot outlive the bench, bounded commands, ports, RSS, temp dirs.

use std::{
    collections::HashMap,
    fs::File,
    net::{SocketAddr, TcpListener},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// A started child process (and whatever it forks), killed with SIGKILL on drop. It also gets
/// SIGKILL if the bench itself dies (PR_SET_PDEATHSIG), and stays in our process group, so a
/// Ctrl-C reaches it too.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr going to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Proc> {
        let out = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("{name}: cannot start {cmd:?}"))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process and all its descendants (nginx: master and workers).
    pub fn pids(&self) -> Vec<u32> {
        tree(self.pid())
    }

    /// Fails, with the end of its log, if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its log {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log)
            );
        }
        Ok(())
    }

    /// Waits until something listens on `addr` (read from /proc/net/tcp: no probe connection
    /// that a peer would log or, like iperf3, take for a client).
    pub fn wait_listening(&mut self, addr: SocketAddr, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            self.check_alive()?;
            if is_listening(addr) {
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!(
                    "{} is not listening on {addr} after {limit:?}; its log:\n{}",
                    self.name,
                    log_tail(&self.log)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Children first is not needed: the list is taken before anything dies.
        for pid in self.pids() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl(2) is async-signal-safe; the closure touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// `root` and its descendants, from the parent pids in /proc/*/stat.
fn tree(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            let Some(ppid) = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut all = vec![root];
    let mut i = 0;
    while i < all.len() {
        if let Some(c) = children.get(&all[i]) {
            all.extend(c);
        }
        i += 1;
    }
    all
}

/// CPU seconds (user + system, all threads) that `pids` have used so far, from field 14 and
/// 15 of /proc/PID/stat (USER_HZ, 100 on Linux). A process that is gone counts 0.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // "pid (comm) state ..." : after the comm, utime and stime are the 12th and 13th.
            let (_, rest) = stat.rsplit_once(')')?;
            let mut fields = rest.split_whitespace().skip(11);
            let utime: f64 = fields.next()?.parse().ok()?;
            let stime: f64 = fields.next()?.parse().ok()?;
            Some((utime + stime) / 100.0)
        })
        .sum()
}

/// VmRSS of a process in KiB (0 if it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn is_listening(addr: SocketAddr) -> bool {
    use std::io::BufRead as _;
    let SocketAddr::V4(v4) = addr else {
        return false;
    };
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(v4.ip().octets()),
        v4.port()
    );
    let Ok(file) = File::open("/proc/net/tcp") else {
        return false;
    };
    // Listening sockets come first; stop at the first other one, so that the (after the
    // connections figure, hundred thousand) TIME_WAIT sockets are never read.
    for line in std::io::BufReader::new(file).lines().skip(1) {
        let Ok(line) = line else { return false };
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 || f[3] != "0A" {
            return false;
        }
        if f[1] == want {
            return true;
        }
    }
    false
}

/// Unused ports on 127.0.0.1, below the ephemeral range (32768-60999 here) so that no outgoing
/// connection takes one while the bench runs.
pub struct Ports {
    next: u16,
}

impl Ports {
    pub fn new() -> Ports {
        // Start somewhere in 20000..30000 that depends on the pid, to keep clear of another
        // bench running at the same time.
        Ports {
            next: 20_000 + (std::process::id() % 500) as u16 * 20,
        }
    }

    pub fn take(&mut self) -> anyhow::Result<SocketAddr> {
        while self.next < 32_000 {
            let port = self.next;
            self.next += 1;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            if TcpListener::bind(addr).is_ok() {
                return Ok(addr);
            }
        }
        bail!("no free port on 127.0.0.1 in 20000..32000")
    }
}

/// Runs `cmd` to completion within `limit` (killed past it); returns its stdout. Fails on a
/// non-zero exit, with its stderr.
pub fn output_within(cmd: &mut Command, limit: Duration, scratch: &Path) -> anyhow::Result<String> {
    let out_path = scratch.join("out.txt");
    let err_path = scratch.join("err.txt");
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out_path)?)
        .stderr(File::create(&err_path)?);
    die_with_parent(cmd);
    let mut child = cmd.spawn().with_context(|| format!("cannot run {cmd:?}"))?;
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} still running after {limit:?}: killed");
        }
        thread::sleep(Duration::from_millis(50));
    };
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    if !status.success() {
        bail!(
            "{cmd:?} failed ({status}):\n{}{}",
            std::fs::read_to_string(&err_path).unwrap_or_default(),
            out.lines().take(20).collect::<Vec<_>>().join("\n")
        );
    }
    Ok(out)
}

/// A temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> anyhow::Result<TempDir> {
        let path = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir(path))
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

/// Raises this process's open-files soft limit to the hard limit (children inherit it).
pub fn raise_nofile() -> anyhow::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(hard)
}

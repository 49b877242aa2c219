//! The daemon under test: the real `lb` binary, started from a YAML config in a temporary
//! directory, its stderr captured to a file (printed when a test fails), killed on drop.

use std::{
    fmt::Write as _,
    fs,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::stream::wait_until;

/// How long `lb` may take to bind every service.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The `lb` binary: `$LB_BIN`, else `$CARGO_TARGET_DIR/debug/lb`, else
/// `<workspace>/target/debug/lb`. Panics with what to do when it is missing.
pub fn binary() -> PathBuf {
    let path = match std::env::var_os("LB_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
            target.join("debug/lb")
        }
    };
    assert!(
        path.is_file(),
        "the lb binary is not at {}: build it first (`cargo build -p lb-userspace`; `cargo xtask test` \
         does), or point LB_BIN at it",
        path.display()
    );
    path
}

/// A `Command` running the `lb` binary with `args`. `LB_TEST_LOG` (e.g. `debug`) sets its log
/// filter.
pub fn command(args: &[&str]) -> Command {
    let mut c = Command::new(binary());
    c.args(args);
    if let Ok(level) = std::env::var("LB_TEST_LOG") {
        c.args(["--log-level", &level]);
    }
    // Plain text in the captured stderr, without colour escapes.
    c.env("NO_COLOR", "1");
    c.stdin(Stdio::null());
    c
}

/// Runs `lb` with `args` to completion within `timeout` (then kills it and panics).
pub fn run_to_exit(args: &[&str], timeout: Duration) -> Output {
    let dir = TempDir::new();
    let out_path = dir.path.join("stdout");
    let err_path = dir.path.join("stderr");
    let mut child = command(args)
        .stdout(fs::File::create(&out_path).expect("create stdout file"))
        .stderr(fs::File::create(&err_path).expect("create stderr file"))
        .spawn()
        .expect("spawn lb");
    let status = wait_timeout(&mut child, timeout);
    let stdout = fs::read(&out_path).unwrap_or_default();
    let stderr = fs::read(&err_path).unwrap_or_default();
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "lb {args:?} did not exit within {timeout:?}; stderr:\n{}",
            String::from_utf8_lossy(&stderr)
        );
    };
    Output {
        status,
        stdout,
        stderr,
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait for lb") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("lb-tests-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A running `lb run`. Killed (SIGKILL) on drop; when the test is failing, its stderr is
/// printed then.
pub struct Lb {
    child: Child,
    dir: TempDir,
    config_path: PathBuf,
    stderr_path: PathBuf,
    listen: Vec<SocketAddr>,
    exited: Option<ExitStatus>,
}

/// How to launch `lb` beyond its arguments.
#[derive(Clone, Debug, Default)]
pub struct Launch<'a> {
    /// A command that runs lb, e.g. `["setpriv", "--bounding-set=-bpf"]`; lb's path and
    /// arguments follow it.
    pub wrapper: &'a [&'a str],
    /// Extra environment variables for lb.
    pub env: &'a [(&'a str, &'a str)],
}

/// Why `lb` did not come up.
#[derive(Debug)]
pub struct StartError {
    /// Its exit status, if it exited.
    pub status: Option<ExitStatus>,
    pub stderr: String,
}

impl Lb {
    /// Starts `lb run --config FILE` with `config_yaml` and waits (at most [`START_TIMEOUT`])
    /// until every service listens. Panics with lb's stderr if it does not.
    pub fn start(config_yaml: &str) -> Lb {
        Lb::try_start(config_yaml, &[]).unwrap_or_else(|e| {
            panic!(
                "lb did not start (exit status {:?}); stderr:\n{}\nconfig:\n{config_yaml}",
                e.status, e.stderr
            )
        })
    }

    /// Like [`Lb::start`], with more arguments after `run --config FILE`, returning the failure.
    pub fn try_start(config_yaml: &str, extra_args: &[&str]) -> Result<Lb, StartError> {
        Lb::try_start_with(config_yaml, extra_args, &Launch::default())
    }

    /// Like [`Lb::try_start`], launched as `launch` says (a wrapper command, environment).
    pub fn try_start_with(
        config_yaml: &str,
        extra_args: &[&str],
        launch: &Launch<'_>,
    ) -> Result<Lb, StartError> {
        let listen = service_listen_addresses(config_yaml);
        let dir = TempDir::new();
        let config_path = dir.path.join("lb.yaml");
        let stderr_path = dir.path.join("lb.stderr");
        fs::write(&config_path, config_yaml).expect("write config");
        let config_arg = config_path.to_str().expect("utf-8 temp path").to_owned();
        let mut args = vec!["run", "--config", &config_arg];
        args.extend_from_slice(extra_args);
        let mut cmd = command(&args);
        if let Some((program, wrapper_args)) = launch.wrapper.split_first() {
            let mut wrapped = Command::new(program);
            wrapped
                .args(wrapper_args)
                .arg(cmd.get_program())
                .args(cmd.get_args());
            wrapped.env("NO_COLOR", "1").stdin(Stdio::null());
            cmd = wrapped;
        }
        cmd.envs(launch.env.iter().copied());
        let child = cmd
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr_path).expect("create stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", binary().display()));
        let mut lb = Lb {
            child,
            dir,
            config_path,
            stderr_path,
            listen,
            exited: None,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = lb.try_wait() {
                return Err(StartError {
                    status: Some(status),
                    stderr: lb.stderr(),
                });
            }
            if lb.is_listening() {
                return Ok(lb);
            }
            if Instant::now() >= deadline {
                return Err(StartError {
                    status: None,
                    stderr: lb.stderr(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every service logged `listening` with its address, and each address is a listening
    /// socket (so a connect now is queued, not refused).
    fn is_listening(&self) -> bool {
        let stderr = self.stderr();
        self.listen.iter().all(|addr| {
            let logged = stderr
                .lines()
                .any(|l| l.contains("listening") && l.contains(&addr.to_string()));
            logged && tcp_listening(*addr)
        })
    }

    /// The first service's listen address.
    pub fn addr(&self) -> SocketAddr {
        self.listen[0]
    }

    /// Every service's listen address, in config order.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.listen
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The temporary directory holding the config and the captured stderr.
    pub fn dir(&self) -> &Path {
        &self.dir.path
    }

    /// Everything lb wrote to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.stderr_path).unwrap_or_default()).into_owned()
    }

    /// Waits (bounded) for a stderr line containing `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.stderr().contains(needle))
    }

    /// Open file descriptors of the lb process (entries of /proc/PID/fd).
    pub fn fd_count(&self) -> usize {
        self.fds().len()
    }

    /// Open sockets of the lb process (fds that are `socket:[..]`).
    pub fn socket_count(&self) -> usize {
        self.fds()
            .iter()
            .filter(|target| target.starts_with("socket:"))
            .count()
    }

    /// The targets of /proc/PID/fd (`socket:[123]`, `pipe:[456]`, paths).
    pub fn fds(&self) -> Vec<String> {
        fds_of(self.pid())
    }

    /// The fd count once it has held still for 300 ms (at most 5 s): a baseline to compare with.
    pub fn settled_fd_counts(&self) -> (usize, usize) {
        let mut last = (self.fd_count(), self.socket_count());
        let mut since = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && since.elapsed() < Duration::from_millis(300) {
            std::thread::sleep(Duration::from_millis(20));
            let now = (self.fd_count(), self.socket_count());
            if now != last {
                last = now;
                since = Instant::now();
            }
        }
        last
    }

    /// Sends `signal` to lb.
    pub fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.pid()).expect("pid fits i32"));
        kill(pid, signal).unwrap_or_else(|e| panic!("kill({pid}, {signal}): {e}"));
    }

    /// Its exit status, if it has exited (non-blocking).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("wait for lb");
        }
        self.exited
    }

    /// Waits at most `timeout` for lb to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = wait_timeout(&mut self.child, timeout);
        }
        self.exited
    }

    /// SIGTERM, then waits at most `timeout` for the exit; panics (with stderr) if it does not.
    pub fn sigterm_and_wait(&mut self, timeout: Duration) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.wait_timeout(timeout).unwrap_or_else(|| {
            panic!(
                "lb did not exit within {timeout:?} of SIGTERM; stderr:\n{}",
                self.stderr()
            )
        })
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let stderr = self.stderr();
            let lines: Vec<&str> = stderr.lines().collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            eprintln!(
                "--- lb (pid {}) stderr, last {} lines ---\n{}\n--- end of lb stderr ---",
                self.pid(),
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

/// The `listen` address of each entry of `services` in a config.
pub fn service_listen_addresses(config_yaml: &str) -> Vec<SocketAddr> {
    let doc: serde_yaml::Value =
        serde_yaml::from_str(config_yaml).expect("the test config is YAML");
    let services = doc
        .get("services")
        .and_then(|s| s.as_sequence())
        .expect("config has a services list");
    services
        .iter()
        .map(|s| {
            let listen = s
                .get("listen")
                .and_then(|l| l.as_str())
                .expect("every service has a listen address");
            listen
                .parse()
                .unwrap_or_else(|e| panic!("listen {listen:?}: {e}"))
        })
        .collect()
}

/// Whether a TCP socket listens on `addr` on this host (/proc/net/tcp, tcp6). Wildcard
/// listeners count for every address of their family.
pub fn tcp_listening(addr: SocketAddr) -> bool {
    let (file, want) = match addr {
        SocketAddr::V4(a) => ("/proc/net/tcp", hex_v4(*a.ip())),
        SocketAddr::V6(a) => ("/proc/net/tcp6", hex_v6(*a.ip())),
    };
    let any = match addr {
        SocketAddr::V4(_) => hex_v4(std::net::Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => hex_v6(std::net::Ipv6Addr::UNSPECIFIED),
    };
    let port = format!("{:04X}", addr.port());
    let table = fs::read_to_string(file).unwrap_or_default();
    table.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace();
        let (Some(_), Some(local), Some(_), Some(state)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return false;
        };
        let Some((ip, p)) = local.split_once(':') else {
            return false;
        };
        state == "0A" && p == port && (ip == want || ip == any)
    })
}

/// /proc/net/tcp writes the address as the in-memory u32, in hex.
fn hex_v4(ip: std::net::Ipv4Addr) -> String {
    format!("{:08X}", u32::from_ne_bytes(ip.octets()))
}

fn hex_v6(ip: std::net::Ipv6Addr) -> String {
    let o = ip.octets();
    let mut s = String::new();
    for word in o.chunks_exact(4) {
        let _ = write!(
            s,
            "{:08X}",
            u32::from_ne_bytes([word[0], word[1], word[2], word[3]])
        );
    }
    s
}

/// A TCP port on 127.0.0.1 that nothing uses now, below the ephemeral range (32768-60999) so
/// that no outgoing connection takes it before lb binds it. Nothing listens on it: it also
/// serves as a refused backend.
pub fn free_port() -> u16 {
    let mut rng = crate::stream::Rng::new(
        u64::from(std::process::id()) << 32
            | u64::from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .subsec_nanos(),
            ),
    );
    for _ in 0..1000 {
        let port = 20_000 + rng.range(0..12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && !tcp_listening(SocketAddr::from(([0, 0, 0, 0], port)))
        {
            return port;
        }
    }
    panic!("no free port found in 20000..32000");
}

/// A free `127.0.0.1:PORT` (see [`free_port`]).
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// One service of an [`LbConfig`]. `listen: None` picks a free port at start.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub name: String,
    pub listen: Option<SocketAddr>,
    pub algorithm: String,
    pub connect_timeout: String,
    pub retries: u32,
    pub idle_timeout: String,
    pub proxy_protocol: String,
    pub max_connections: Option<u32>,
    pub backends: Vec<SocketAddr>,
}

impl ServiceSpec {
    /// Round robin over `backends`, connect timeout 1 s, no retries, idle timeout 30 s, no PROXY
    /// header.
    pub fn new(name: &str, backends: &[SocketAddr]) -> ServiceSpec {
        ServiceSpec {
            name: name.to_owned(),
            listen: None,
            algorithm: "round_robin".to_owned(),
            connect_timeout: "1s".to_owned(),
            retries: 0,
            idle_timeout: "30s".to_owned(),
            proxy_protocol: "off".to_owned(),
            max_connections: None,
            backends: backends.to_vec(),
        }
    }

    pub fn retries(mut self, n: u32) -> Self {
        self.retries = n;
        self
    }

    pub fn proxy_protocol(mut self, version: &str) -> Self {
        version.clone_into(&mut self.proxy_protocol);
        self
    }

    pub fn idle_timeout(mut self, d: &str) -> Self {
        d.clone_into(&mut self.idle_timeout);
        self
    }

    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = Some(n);
        self
    }
}

/// A whole config: dataplane, drain deadline, services.
#[derive(Clone, Debug)]
pub struct LbConfig {
    pub dataplane: String,
    pub shutdown_timeout: String,
    pub services: Vec<ServiceSpec>,
    /// A bpffs directory of this config's own (tests run in parallel, and lb refuses a
    /// `pin_path` another running lb holds). Clones share it.
    pub pin_path: String,
}

impl LbConfig {
    /// `dataplane` with a 5 s drain deadline and `services`.
    pub fn new(dataplane: &str, services: Vec<ServiceSpec>) -> LbConfig {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        LbConfig {
            dataplane: dataplane.to_owned(),
            shutdown_timeout: "5s".to_owned(),
            services,
            pin_path: format!("/sys/fs/bpf/lb-tests/{}-{n}", std::process::id()),
        }
    }

    pub fn shutdown_timeout(mut self, d: &str) -> Self {
        d.clone_into(&mut self.shutdown_timeout);
        self
    }

    /// The YAML text. Services without a listen address must have been given one.
    pub fn yaml(&self) -> String {
        let mut y = String::new();
        let _ = writeln!(y, "dataplane:\n  mode: {}", self.dataplane);
        if self.dataplane != "proxy" {
            let _ = writeln!(y, "  pin_path: {}", self.pin_path);
        }
        if self.dataplane == "sockmap" {
            // Every connection to the kernel at once, so the whole suite runs on the kernel
            // path (the default, 64 KiB in userspace first, has its own test).
            y.push_str("  sockmap:\n    promote_after_bytes: 0\n");
        }
        let _ = writeln!(y, "shutdown_timeout: {}\nservices:", self.shutdown_timeout);
        for s in &self.services {
            let listen = s.listen.expect("listen address chosen");
            let _ = writeln!(y, "  - name: {}", s.name);
            let _ = writeln!(y, "    listen: \"{listen}\"");
            let _ = writeln!(y, "    algorithm: {}", s.algorithm);
            let _ = writeln!(y, "    connect_timeout: {}", s.connect_timeout);
            let _ = writeln!(y, "    retries: {}", s.retries);
            let _ = writeln!(y, "    idle_timeout: {}", s.idle_timeout);
            let _ = writeln!(y, "    proxy_protocol: {}", s.proxy_protocol);
            if let Some(n) = s.max_connections {
                let _ = writeln!(y, "    max_connections: {n}");
            }
            y.push_str("    backends:\n");
            for b in &s.backends {
                let _ = writeln!(y, "      - address: \"{b}\"\n        weight: 1");
            }
        }
        y
    }

    /// Starts lb with this config, on free ports for services without one. A port taken by
    /// someone else between the choice and lb's bind is chosen again (at most 3 times).
    pub fn start(&self) -> Lb {
        let mut last = None;
        for _ in 0..3 {
            let mut config = self.clone();
            for s in &mut config.services {
                s.listen.get_or_insert_with(free_addr);
            }
            let yaml = config.yaml();
            match Lb::try_start(&yaml, &[]) {
                Ok(lb) => return lb,
                Err(e) if e.status.is_some() && e.stderr.contains("cannot listen") => {
                    last = Some((e, yaml))
                }
                Err(e) => panic!(
                    "lb did not start (exit status {:?}); stderr:\n{}\nconfig:\n{yaml}",
                    e.status, e.stderr
                ),
            }
        }
        let (e, yaml) = last.expect("tried at least once");
        panic!(
            "lb could not bind after 3 tries; stderr:\n{}\nconfig:\n{yaml}",
            e.stderr
        )
    }
}

/// The targets of /proc/PID/fd of process `pid` (`socket:[123]`, `pipe:[456]`, paths).
pub fn fds_of(pid: u32) -> Vec<String> {
    let dir = format!("/proc/{pid}/fd");
    let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {dir}: {e}"));
    entries
        .filter_map(Result::ok)
        .filter_map(|e| fs::read_link(e.path()).ok())
        .map(|target| target.to_string_lossy().into_owned())
        .collect()
}

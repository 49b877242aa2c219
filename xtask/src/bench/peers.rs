//! The balancers compared (and "no balancer"), and the backends behind them. Each one writes
//! its config into its own temp directory and runs as a child process of the bench.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::procs::{Ports, Proc};

const START_LIMIT: Duration = Duration::from_secs(10);
const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// What a peer needs to start: where lb is, fresh directories, free ports.
pub struct Ctx {
    pub lb_bin: PathBuf,
    pub dir: PathBuf,
    pub ports: Ports,
    started: usize,
}

impl Ctx {
    pub fn new(lb_bin: PathBuf, dir: PathBuf) -> Ctx {
        Ctx {
            lb_bin,
            dir,
            ports: Ports::new(),
            started: 0,
        }
    }

    /// A new directory for one started process's config and log.
    fn fresh_dir(&mut self, name: &str) -> anyhow::Result<PathBuf> {
        self.started += 1;
        let dir = self.dir.join(format!("{:03}-{name}", self.started));
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    None,
    /// lb as shipped: the adaptive relay.
    Lb,
    LbSplice,
    LbCopy,
    /// lb's sockmap dataplane as shipped (`promote_after_bytes` default).
    LbSockmap,
    /// lb's sockmap dataplane handing every connection to the kernel at once
    /// (`promote_after_bytes: 0`).
    LbSockmapAtOnce,
    Haproxy,
    Nginx,
}

impl Peer {
    pub const ALL: [Peer; 8] = [
        Peer::None,
        Peer::Lb,
        Peer::LbSplice,
        Peer::LbCopy,
        Peer::LbSockmap,
        Peer::LbSockmapAtOnce,
        Peer::Haproxy,
        Peer::Nginx,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Peer::None => "no balancer",
            Peer::Lb => "lb",
            Peer::LbSplice => "lb (splice)",
            Peer::LbCopy => "lb (copy)",
            Peer::LbSockmap => "lb sockmap",
            Peer::LbSockmapAtOnce => "lb sockmap (at once)",
            Peer::Haproxy => "HAProxy",
            Peer::Nginx => "nginx",
        }
    }

    /// HAProxy and nginx: "best peer" is the better of these two.
    pub fn is_other_balancer(self) -> bool {
        matches!(self, Peer::Haproxy | Peer::Nginx)
    }

    /// Starts the peer with `threads` worker threads (processes for nginx) in front of
    /// `backends`; returns once it listens. No balancer: the frontend is the first backend.
    pub fn start(
        self,
        ctx: &mut Ctx,
        threads: usize,
        backends: &[SocketAddr],
    ) -> anyhow::Result<Running> {
        if self == Peer::None {
            return Ok(Running {
                frontend: backends[0],
                proc: None,
            });
        }
        let frontend = ctx.ports.take()?;
        let dir = ctx.fresh_dir(match self {
            Peer::Lb => "lb",
            Peer::LbSplice => "lb-splice",
            Peer::LbCopy => "lb-copy",
            Peer::LbSockmap => "lb-sockmap",
            Peer::LbSockmapAtOnce => "lb-sockmap-at-once",
            Peer::Haproxy => "haproxy",
            _ => "nginx",
        })?;
        let log = dir.join("log.txt");
        let cmd = match self {
            Peer::Lb | Peer::LbSplice | Peer::LbCopy | Peer::LbSockmap | Peer::LbSockmapAtOnce => {
                let conf = dir.join("lb.yaml");
                let sockmap = match self {
                    Peer::LbSockmap => Some(None),
                    Peer::LbSockmapAtOnce => Some(Some(0)),
                    _ => None,
                };
                std::fs::write(&conf, lb_config(frontend, backends, sockmap))?;
                let sockmap = sockmap.is_some();
                let mut cmd = Command::new(&ctx.lb_bin);
                cmd.args([
                    "--log-level",
                    "warn",
                    "run",
                    "--dataplane",
                    if sockmap { "sockmap" } else { "proxy" },
                    "--config",
                ])
                .arg(&conf)
                .args(["--workers", &threads.to_string()]);
                match self {
                    Peer::LbCopy => cmd.env("LB_RELAY", "copy"),
                    Peer::LbSplice => cmd.env("LB_RELAY", "splice"),
                    _ => cmd.env_remove("LB_RELAY"),
                };
                cmd
            }
            Peer::Haproxy => {
                let conf = dir.join("haproxy.cfg");
                std::fs::write(&conf, haproxy_config(threads, frontend, backends))?;
                let mut cmd = Command::new("haproxy");
                cmd.arg("-db").arg("-f").arg(&conf);
                cmd
            }
            _ => nginx_command(
                &dir,
                &nginx_stream_config(&dir, threads, frontend, backends),
            )?,
        };
        let mut proc = Proc::spawn(self.name(), cmd, &log)?;
        proc.wait_listening(frontend, START_LIMIT)?;
        Ok(Running {
            frontend,
            proc: Some(proc),
        })
    }
}

/// A started peer: killed on drop.
pub struct Running {
    pub frontend: SocketAddr,
    proc: Option<Proc>,
}

impl Running {
    /// A balancer already running (`proc`), or none, in front of `frontend`.
    pub fn new(frontend: SocketAddr, proc: Option<Proc>) -> Running {
        Running { frontend, proc }
    }

    /// The balancer's processes (empty for no balancer).
    pub fn pids(&self) -> Vec<u32> {
        self.proc.as_ref().map(Proc::pids).unwrap_or_default()
    }

    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        match &mut self.proc {
            Some(p) => p.check_alive(),
            None => Ok(()),
        }
    }
}

/// `sockmap`: `Some(promote_after_bytes)` (`None` inside: the default) for the sockmap
/// dataplane, `None` for the proxy.
fn lb_config(
    frontend: SocketAddr,
    backends: &[SocketAddr],
    sockmap: Option<Option<u64>>,
) -> String {
    let mut c = if let Some(promote) = sockmap {
        let mut c = format!(
            "# cargo xtask bench: lb's sockmap dataplane, no health checks (like the peers).\n\
             dataplane:\n  mode: sockmap\n  pin_path: /sys/fs/bpf/lb-bench-{}\n",
            std::process::id()
        );
        if let Some(bytes) = promote {
            let _ = writeln!(c, "  sockmap:\n    promote_after_bytes: {bytes}");
        }
        c.push_str("shutdown_timeout: 1s\nservices:\n  - name: bench\n");
        c
    } else {
        String::from(
            "# cargo xtask bench: lb's proxy dataplane, no health checks (like the peers).\n\
             dataplane:\n  mode: proxy\nshutdown_timeout: 1s\nservices:\n  - name: bench\n",
        )
    };
    let _ = writeln!(c, "    listen: {frontend}");
    c.push_str("    algorithm: round_robin\n    max_connections: 10000\n    backends:\n");
    for b in backends {
        let _ = writeln!(c, "      - address: {b}");
    }
    c
}

fn haproxy_config(threads: usize, frontend: SocketAddr, backends: &[SocketAddr]) -> String {
    let mut c = format!(
        "# cargo xtask bench: HAProxy in tcp mode, splice where it helps.\n\
         global\n    nbthread {threads}\n    maxconn 7000\n\n\
         defaults\n    mode tcp\n    option splice-auto\n    maxconn 7000\n\
         \x20   timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n\n\
         frontend bench\n    bind {frontend}\n    default_backend servers\n\n\
         backend servers\n    balance roundrobin\n"
    );
    for (i, b) in backends.iter().enumerate() {
        let _ = writeln!(c, "    server s{i} {b}");
    }
    c
}

/// The top of every nginx config here: foreground, pid and error log in `dir`.
fn nginx_main(dir: &Path, workers: usize) -> String {
    format!(
        "# cargo xtask bench\nworker_processes {workers};\npid {dir}/nginx.pid;\n\
         error_log {dir}/error.log warn;\nworker_rlimit_nofile 20000;\n\
         events {{\n    worker_connections 12000;\n}}\n",
        dir = dir.display()
    )
}

fn nginx_stream_config(
    dir: &Path,
    workers: usize,
    frontend: SocketAddr,
    backends: &[SocketAddr],
) -> String {
    let mut c = format!("load_module {NGINX_STREAM_MODULE};\n");
    c.push_str(&nginx_main(dir, workers));
    c.push_str("stream {\n    upstream servers {\n");
    for b in backends {
        let _ = writeln!(c, "        server {b};");
    }
    let _ = write!(
        c,
        "    }}\n    server {{\n        listen {frontend};\n        proxy_pass servers;\n\
         \x20       proxy_connect_timeout 5s;\n        proxy_timeout 1h;\n    }}\n}}\n"
    );
    c
}

fn nginx_command(dir: &Path, config: &str) -> anyhow::Result<Command> {
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, config)?;
    let mut cmd = Command::new("nginx");
    cmd.arg("-g")
        .arg("daemon off;")
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf);
    Ok(cmd)
}

/// nginx answering every GET with a 3-byte body on `addrs`, keep-alive without a request
/// limit; its files in `dir`.
pub fn nginx_http_config(dir: &Path, workers: usize, addrs: &[SocketAddr]) -> String {
    let mut c = nginx_main(dir, workers);
    let _ = write!(
        c,
        "http {{\n    access_log off;\n    keepalive_requests 100000000;\n\
             \x20   keepalive_timeout 1h;\n    default_type text/plain;\n\
             \x20   client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n\
             \x20   fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n\
             \x20   scgi_temp_path {d}/scgi;\n    server {{\n",
        d = dir.display()
    );
    for a in addrs {
        let _ = writeln!(c, "        listen {a};");
    }
    c.push_str("        location / {\n            return 200 \"ok\\n\";\n        }\n    }\n}\n");
    c
}

/// nginx serving a 3-byte body on `ports` ports, keep-alive without a request limit.
pub struct HttpBackends {
    pub addrs: Vec<SocketAddr>,
    _proc: Proc,
}

impl HttpBackends {
    pub fn start(ctx: &mut Ctx, ports: usize, workers: usize) -> anyhow::Result<HttpBackends> {
        let dir = ctx.fresh_dir("http-backends")?;
        let addrs = (0..ports)
            .map(|_| ctx.ports.take())
            .collect::<anyhow::Result<Vec<_>>>()?;
        let c = nginx_http_config(&dir, workers, &addrs);
        let mut proc = Proc::spawn(
            "nginx (HTTP backends)",
            nginx_command(&dir, &c)?,
            &dir.join("log.txt"),
        )?;
        for a in &addrs {
            proc.wait_listening(*a, START_LIMIT)?;
        }
        Ok(HttpBackends { addrs, _proc: proc })
    }
}

/// One `iperf3 -s`.
pub struct IperfServer {
    pub addr: SocketAddr,
    _proc: Proc,
}

impl IperfServer {
    pub fn start(ctx: &mut Ctx) -> anyhow::Result<IperfServer> {
        let dir = ctx.fresh_dir("iperf3-server")?;
        let addr = ctx.ports.take()?;
        let mut cmd = Command::new("iperf3");
        cmd.args(["-s", "-B", "127.0.0.1", "-p", &addr.port().to_string()]);
        let mut proc = Proc::spawn("iperf3 -s", cmd, &dir.join("log.txt"))?;
        proc.wait_listening(addr, START_LIMIT)?;
        Ok(IperfServer { addr, _proc: proc })
    }
}

/// A backend (a thread of the bench) that accepts connections and holds them open, idle.
pub struct HoldBackend {
    pub addr: SocketAddr,
    held: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl HoldBackend {
    pub fn start(ctx: &mut Ctx) -> anyhow::Result<HoldBackend> {
        let addr = ctx.ports.take()?;
        let listener = listen(addr).with_context(|| format!("cannot listen on {addr}"))?;
        listener.set_nonblocking(true)?;
        let held = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s) = (Arc::clone(&held), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => h.lock().unwrap_or_else(|e| e.into_inner()).push(conn),
                    Err(_) => thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        Ok(HoldBackend {
            addr,
            held,
            stop,
            thread: Some(thread),
        })
    }

    fn count(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Waits until `n` connections are held.
    pub fn wait_for(&self, n: usize, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        while self.count() < n {
            if start.elapsed() > limit {
                bail!(
                    "the backend holds {} connections, not {n}, after {limit:?}",
                    self.count()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Closes every held connection.
    pub fn clear(&self) {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

impl Drop for HoldBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A listening socket with a backlog of 4096: the peers connect to it in bursts, faster than
/// the accepting thread wakes up, and std's backlog of 128 would drop SYNs (1 s retries).
fn listen(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use std::os::fd::AsRawFd as _;

    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, listen, setsockopt, socket,
        sockopt,
    };
    let SocketAddr::V4(v4) = addr else {
        bail!("{addr}: IPv4 only");
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(v4))?;
    listen(&fd, Backlog::new(4096)?)?;
    Ok(TcpListener::from(fd))
}

/// One HTTP/1.0 GET through `addr`: the peer must relay a 200.
pub fn http_check(addr: SocketAddr) -> anyhow::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .with_context(|| format!("no answer through {addr}"))?;
    if !answer.starts_with("HTTP/1.1 200") {
        bail!(
            "GET / through {addr} answered {:?}",
            answer.lines().next().unwrap_or("")
        );
    }
    Ok(())
}

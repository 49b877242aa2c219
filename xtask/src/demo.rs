//! `cargo xtask demo`: three demo backends (each answers with its name), `lb` in front of them
//! on `config/demo.yaml`, a few hundred connections through it, how they spread, which dataplane
//! carried them; then one backend stops and traffic moves to the others. Cleans up after itself.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Shutdown, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::util::{cargo, root, step};

const LB_ADDR: &str = "127.0.0.1:8080";
const ADMIN: &str = "127.0.0.1:9100";
const BACKENDS: [(&str, &str); 3] = [
    ("alpha", "127.0.0.1:9001"),
    ("bravo", "127.0.0.1:9002"),
    ("charlie", "127.0.0.1:9003"),
];
const ROUND: usize = 300;

/// A demo backend: answers every connection with its name and a newline, then closes.
struct DemoBackend {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl DemoBackend {
    fn start(name: &'static str, addr: &str) -> anyhow::Result<DemoBackend> {
        let listener = TcpListener::bind(addr)
            .with_context(|| format!("demo backend {name}: {addr} is in use"))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = writeln!(s, "{name}");
                        let _ = s.shutdown(Shutdown::Write);
                    }
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Ok(DemoBackend {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops accepting and closes the listening socket: new connects are refused.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for DemoBackend {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The running lb, killed on drop if still alive.
struct Lb(Child);

impl Drop for Lb {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn demo() -> anyhow::Result<()> {
    crate::setup::setup()?;
    step("build lb (release)", || {
        cargo(&["build", "--release", "-p", "lb-userspace"], &[])
    })?;
    let started = Instant::now();
    let mut backends = Vec::new();
    for (name, addr) in BACKENDS {
        backends.push(DemoBackend::start(name, addr)?);
    }
    println!(
        "demo: backends alpha, bravo, charlie on 127.0.0.1:9001-9003, each answering its name"
    );
    let lb_bin = root().join("target/release/lb");
    let log = std::fs::File::create(std::env::temp_dir().join("lb-demo.log"))?;
    let mut lb = Lb(Command::new(&lb_bin)
        .args(["run", "--config"])
        .arg(root().join("config/demo.yaml"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", lb_bin.display()))?);
    wait_for(LB_ADDR, Duration::from_secs(10))
        .context("lb did not start listening: see /tmp/lb-demo.log")?;
    println!(
        "demo: lb listening on {LB_ADDR} (config/demo.yaml), log in {}",
        std::env::temp_dir().join("lb-demo.log").display()
    );
    println!(
        "demo: dataplane in use: {}",
        dataplane().unwrap_or_else(|e| format!("unknown ({e})"))
    );
    // And why not the others, as lb logged it.
    let log = std::fs::read_to_string(std::env::temp_dir().join("lb-demo.log")).unwrap_or_default();
    for line in log.lines() {
        if let Some(i) = line.find("not used: ") {
            let rest = &line[i + "not used: ".len()..];
            let (why, which) = rest.rsplit_once(" dataplane=").unwrap_or((rest, "?"));
            println!("demo:   {which} not used: {why}");
        }
    }

    let first = round(ROUND)?;
    report(
        &format!("{ROUND} connections, all three backends up"),
        &first,
    );

    println!("\ndemo: stopping charlie (its port now refuses connections)");
    backends[2].stop();
    // Health checks (interval 1s, fall 2) mark it down within about 2 s; until then `retries`
    // moves each refused connect to another backend, so no client sees a failure.
    let second = round(ROUND)?;
    report(
        &format!("{ROUND} connections right after charlie stopped"),
        &second,
    );
    thread::sleep(Duration::from_millis(2500));
    let third = round(ROUND)?;
    report(
        &format!("{ROUND} connections after health checks marked charlie down"),
        &third,
    );

    // SIGTERM: lb drains and exits 0.
    nix_kill(lb.0.id())?;
    let status = wait_exit(&mut lb.0, Duration::from_secs(10))?;
    println!(
        "\ndemo: lb stopped on SIGTERM with {status}; total {:.1}s",
        started.elapsed().as_secs_f64()
    );
    if third.get("charlie").copied().unwrap_or(0) != 0 {
        bail!("charlie still got traffic after it was marked down");
    }
    Ok(())
}

/// Sends `n` connections; counts answers per backend name ("failed" for errors).
fn round(n: usize) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let name = (|| -> std::io::Result<String> {
            let s = TcpStream::connect(LB_ADDR)?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line)?;
            Ok(if line.trim().is_empty() {
                "failed (no answer)".into()
            } else {
                line.trim().to_owned()
            })
        })()
        .unwrap_or_else(|e| format!("failed ({})", e.kind()));
        *counts.entry(name).or_insert(0) += 1;
    }
    Ok(counts)
}

fn report(title: &str, counts: &BTreeMap<String, usize>) {
    let total: usize = counts.values().sum();
    println!("\n  {title}:");
    for (name, n) in counts {
        let bar = "#".repeat(n * 40 / total.max(1));
        println!(
            "    {name:<20} {n:>5}  {:>5.1}%  {bar}",
            *n as f64 * 100.0 / total.max(1) as f64
        );
    }
}

/// The dataplane, from the admin API's /status, else from lb's log.
fn dataplane() -> anyhow::Result<String> {
    if let Ok(mut s) = TcpStream::connect(ADMIN) {
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(s, "GET /status HTTP/1.0\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        if let Some(i) = body.find("\"dataplane\":\"") {
            let rest = &body[i + 13..];
            return Ok(rest[..rest.find('"').unwrap_or(0)].to_owned());
        }
    }
    let log = std::fs::read_to_string(std::env::temp_dir().join("lb-demo.log"))?;
    for line in log.lines() {
        if line.contains("starting")
            && let Some(i) = line.find("dataplane=")
        {
            let rest = &line[i + 10..];
            let dp = rest.split_whitespace().next().unwrap_or("?");
            let why: Vec<&str> = log.lines().filter(|l| l.contains("not used:")).collect();
            return Ok(format!(
                "{dp}{}",
                if why.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", why.join("; "))
                }
            ));
        }
    }
    bail!("no 'starting' line in lb's log")
}

fn wait_for(addr: &str, limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!("{addr} not accepting after {limit:?}")
}

fn nix_kill(pid: u32) -> anyhow::Result<()> {
    crate::util::run(Command::new("kill").args(["-TERM", &pid.to_string()]))
}

fn wait_exit(child: &mut Child, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!("lb did not exit within {limit:?} of SIGTERM")
}

//! The xdp dataplane's throughput on the namespace topology the xdp tests use
//! (tests/src/topology.rs: client, lb and backends in namespaces of their own on one bridge),
//! beside the same path without a balancer and the proxy dataplane on the same topology.
//!
//! Rows, each on a topology made for it and removed after it:
//! - routed: no balancer, the lb namespace as a plain router (ip_forward): client -> lb host
//!   -> backend, the same hops a NAT packet takes, with the kernel's forwarding in place of
//!   the XDP program. The reference the issue sets (xdp >= 0.9x of it).
//! - direct: the client straight to the backend over the bridge, no lb host on the path.
//! - lb xdp (nat), lb xdp (dsr): lb with the XDP program on its interface, client -> VIP,
//!   attached native (veth's driver mode) and generic (`attach: generic`): on a veth,
//!   native XDP is the driver's emulation (frames queued to NAPI, each skb copied into a
//!   page for the program), which generic mode skips; on a NIC native is the fast one.
//! - lb proxy: lb's proxy dataplane in the lb namespace, client -> VIP (a TCP endpoint).
//!
//! Every interface has the same MTU (1500) and offloads: transmit checksums off on the
//! namespaces' ends (as in the tests: the XDP program sees full checksums, as from a NIC), so
//! no TSO, every packet a real 1500-byte frame. The bridge-side veth facing lb carries a
//! pass-everything XDP program (lb with no services) in every row: a veth that receives
//! XDP_TX frames needs one, and the other rows keep the same path.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::bail;
use lb_tests::{
    netns::NetNs,
    topology::{Replies, Topology},
};

use super::{
    figures::{Figure, Sample},
    peers::{Running, http_check, nginx_http_config},
    procs::Proc,
    report::{medians, number},
};

/// The figures measured here (the memory figure is the loopback bench's).
pub const FIGURES: [Figure; 3] = [Figure::Rr, Figure::Conn, Figure::Bulk];
const HTTP_PORT: u16 = 80;
const IPERF_PORT: u16 = 5201;
const VIP: &str = "10.77.9.100";
/// b1: its address behind lb (NAT, routed) and on the client's subnet (DSR, direct).
const B1_BEHIND: &str = "10.77.0.11";
const B1_DIRECT: &str = "10.77.9.11";
const READY_LIMIT: Duration = Duration::from_secs(15);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Row {
    Routed,
    Direct,
    XdpNat,
    XdpNatGeneric,
    XdpDsr,
    XdpDsrGeneric,
    Proxy,
}

impl Row {
    pub const ALL: [Row; 7] = [
        Row::Routed,
        Row::Direct,
        Row::XdpNat,
        Row::XdpNatGeneric,
        Row::XdpDsr,
        Row::XdpDsrGeneric,
        Row::Proxy,
    ];

    fn name(self) -> &'static str {
        match self {
            Row::Routed => "routed (no balancer)",
            Row::Direct => "direct",
            Row::XdpNat => "lb xdp (nat)",
            Row::XdpNatGeneric => "lb xdp (nat, generic)",
            Row::XdpDsr => "lb xdp (dsr)",
            Row::XdpDsrGeneric => "lb xdp (dsr, generic)",
            Row::Proxy => "lb proxy",
        }
    }

    fn replies(self) -> Replies {
        match self {
            Row::Direct | Row::XdpDsr | Row::XdpDsrGeneric => Replies::Direct,
            Row::Routed | Row::XdpNat | Row::XdpNatGeneric | Row::Proxy => Replies::ThroughLb,
        }
    }

    /// The address the client connects to (the port is the figure's).
    fn target(self) -> &'static str {
        match self {
            Row::Routed => B1_BEHIND,
            Row::Direct => B1_DIRECT,
            Row::XdpNat | Row::XdpNatGeneric | Row::XdpDsr | Row::XdpDsrGeneric | Row::Proxy => VIP,
        }
    }
}

pub type Results = std::collections::BTreeMap<(Figure, usize, Row), Vec<Result<Sample, String>>>;

/// Runs every row `runs` times (rows interleaved within a run), every figure and thread
/// count on each topology; returns the markdown section.
pub fn bench(
    lb_bin: &Path,
    dir: &Path,
    threads: &[usize],
    runs: usize,
    seconds: u64,
) -> anyhow::Result<String> {
    let mut results = Results::new();
    let mut n = 0;
    for run in 1..=runs {
        for row in Row::ALL {
            n += 1;
            let scratch = dir.join(format!("xdp-{n:02}"));
            std::fs::create_dir_all(&scratch)?;
            // Setting a topology up panics on a failed command (lb-tests' `sh`): that row
            // fails, the others go on.
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                measure_row(row, lb_bin, &scratch, threads, seconds)
            }))
            .unwrap_or_else(|panic| {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "panicked".to_owned());
                Err(anyhow::anyhow!(why))
            });
            match outcome {
                Ok(samples) => {
                    for ((figure, t), sample) in samples {
                        let shown = match &sample {
                            Ok(s) => figure.show(s),
                            Err(e) => format!("FAILED: {e}"),
                        };
                        eprintln!(
                            "    xdp {:<4} threads {t} run {run}/{runs}  {:<22} {shown}",
                            figure.key(),
                            row.name()
                        );
                        results.entry((figure, t, row)).or_default().push(sample);
                    }
                }
                Err(e) => {
                    eprintln!("    xdp run {run}/{runs}  {:<22} FAILED: {e:#}", row.name());
                    for figure in FIGURES {
                        for &t in threads {
                            results
                                .entry((figure, t, row))
                                .or_default()
                                .push(Err(format!("{e:#}")));
                        }
                    }
                }
            }
        }
    }
    Ok(report(threads, seconds, &results))
}

type RowSamples = Vec<((Figure, usize), Result<Sample, String>)>;

/// One topology for `row`: its backends, its balancer, then every figure and thread count.
fn measure_row(
    row: Row,
    lb_bin: &Path,
    scratch: &Path,
    threads: &[usize],
    seconds: u64,
) -> anyhow::Result<RowSamples> {
    let topo = Topology::new(row.replies());
    let b1 = &topo.backends[0];
    let _http = start_in(
        b1,
        "nginx (HTTP backend)",
        nginx_in(scratch, HTTP_PORT)?,
        &scratch.join("nginx.log"),
        HTTP_PORT,
    )?;
    let _iperf = start_in(
        b1,
        "iperf3 -s",
        vec![
            "iperf3".into(),
            "-s".into(),
            "-p".into(),
            IPERF_PORT.to_string(),
        ],
        &scratch.join("iperf3.log"),
        IPERF_PORT,
    )?;
    // `ip netns exec` gives lb a /sys of the namespace's, without /sys/fs/bpf: a bpffs of
    // the row's own, unmounted (with everything pinned in it) on drop.
    let pins = Bpffs::mount(&scratch.join("bpf"))?;
    // The veth facing lb on the bridge receives lb's XDP_TX frames: it needs an XDP program.
    let _pass = start_lb(
        lb_bin,
        &topo.sw,
        scratch,
        "pass",
        &xdp_config(&pins.0.join("pass"), &topo.lb_peer, "nat", "native", ""),
        1,
    )?;
    let mut balancer = match row {
        Row::Routed => {
            topo.lb.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            for conf in ["all", topo.lb_if.as_str()] {
                let key = format!("net.ipv4.conf.{conf}.send_redirects=0");
                topo.lb.exec(&["sysctl", "-qw", &key]);
            }
            topo.client
                .exec(&["ip", "route", "add", "10.77.0.0/24", "via", "10.77.9.1"]);
            None
        }
        Row::Direct => None,
        Row::XdpNat | Row::XdpNatGeneric | Row::XdpDsr | Row::XdpDsrGeneric => {
            let forwarding = if matches!(row, Row::XdpNat | Row::XdpNatGeneric) {
                "nat"
            } else {
                "dsr"
            };
            let attach = if matches!(row, Row::XdpNatGeneric | Row::XdpDsrGeneric) {
                "generic"
            } else {
                "native"
            };
            let config = xdp_config(
                &pins.0.join("lb"),
                &topo.lb_if,
                forwarding,
                attach,
                &services(),
            );
            Some(start_lb(lb_bin, &topo.lb, scratch, "lb", &config, 1)?)
        }
        // Started per thread count below (--workers).
        Row::Proxy => None,
    };
    let http: SocketAddr = format!("{}:{HTTP_PORT}", row.target()).parse()?;
    let bulk: SocketAddr = format!("{}:{IPERF_PORT}", row.target()).parse()?;
    let mut samples = Vec::new();
    for &t in threads {
        if row == Row::Proxy {
            drop(balancer.take());
            let config = format!(
                "# cargo xtask bench (xdp topology): lb's proxy dataplane\n\
                 dataplane:\n  mode: proxy\nshutdown_timeout: 1s\n{}",
                services()
            );
            balancer = Some(start_lb(lb_bin, &topo.lb, scratch, "proxy", &config, t)?);
        }
        ready(&topo.client, http)?;
        for figure in FIGURES {
            let frontend = if figure == Figure::Bulk { bulk } else { http };
            eprintln!(
                "    xdp {:<4} threads {t}: {} ...",
                figure.key(),
                row.name()
            );
            let mut running = Running::new(frontend, None);
            let sample = topo
                .client
                .run({
                    let scratch = scratch.to_owned();
                    move || figure.measure(&mut running, t, seconds, None, None, &scratch)
                })
                .map_err(|e| format!("{e:#}"));
            if let Some(b) = &mut balancer {
                b.check_alive()?;
            }
            samples.push(((figure, t), sample));
        }
    }
    Ok(samples)
}

/// The two services (HTTP and iperf3), each on b1. The HTTP one has a TCP health check; the
/// bulk one none (a probe landing while iperf3 sets its streams up can abort its test). lb
/// resolves the backend's MAC either way (managed neighbour entry).
fn services() -> String {
    let mut s = String::from("services:\n");
    for (name, port) in [("http", HTTP_PORT), ("bulk", IPERF_PORT)] {
        let _ = write!(
            s,
            "  - name: {name}\n    listen: \"{VIP}:{port}\"\n    algorithm: maglev\n\
             \x20   max_connections: 10000\n    backends:\n      - address: \"{B1_BEHIND}:{port}\"\n"
        );
        if port == HTTP_PORT {
            s.push_str(
                "    health_check:\n      kind: tcp\n      interval: 500ms\n      timeout: 300ms\n\
                 \x20     rise: 1\n      fall: 3\n",
            );
        }
    }
    s
}

fn xdp_config(
    pin_path: &Path,
    interface: &str,
    forwarding: &str,
    attach: &str,
    services: &str,
) -> String {
    format!(
        "# cargo xtask bench (xdp topology)\ndataplane:\n  mode: xdp\n  pin_path: {}\n  xdp:\n\
         \x20   interface: {interface}\n    forwarding: {forwarding}\n    attach: {attach}\nshutdown_timeout: 1s\n{}",
        pin_path.display(),
        if services.is_empty() {
            "services: []\n"
        } else {
            services
        }
    )
}

/// lb in `ns` on `config`, with `workers` worker threads.
fn start_lb(
    lb_bin: &Path,
    ns: &NetNs,
    scratch: &Path,
    name: &str,
    config: &str,
    workers: usize,
) -> anyhow::Result<Proc> {
    let conf = scratch.join(format!("{name}.yaml"));
    std::fs::write(&conf, config)?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .arg(lb_bin)
        .args(["--log-level", "info", "run", "--config"])
        .arg(&conf)
        .args(["--workers", &workers.to_string()]);
    let log = scratch.join(format!("{name}.log"));
    let mut proc = Proc::spawn(&format!("lb ({name})"), cmd, &log)?;
    let start = Instant::now();
    // Started: it logs its dataplane once every service is programmed.
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("starting")
    {
        proc.check_alive()?;
        if start.elapsed() > READY_LIMIT {
            bail!(
                "lb ({name}) did not start within {READY_LIMIT:?}; log in {}",
                log.display()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(proc)
}

/// The HTTP backend's nginx command line (2 workers, like the loopback bench's).
fn nginx_in(scratch: &Path, port: u16) -> anyhow::Result<Vec<String>> {
    let dir = scratch.join("nginx");
    std::fs::create_dir_all(&dir)?;
    let conf = dir.join("nginx.conf");
    let listen: SocketAddr = format!("0.0.0.0:{port}").parse()?;
    std::fs::write(&conf, nginx_http_config(&dir, 2, &[listen]))?;
    Ok(vec![
        "nginx".into(),
        "-g".into(),
        "daemon off;".into(),
        "-p".into(),
        dir.display().to_string(),
        "-c".into(),
        conf.display().to_string(),
    ])
}

/// Starts `args` in `ns` and waits until something listens on `port` there.
fn start_in(
    ns: &NetNs,
    name: &str,
    args: Vec<String>,
    log: &Path,
    port: u16,
) -> anyhow::Result<Proc> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name]).args(&args);
    let mut proc = Proc::spawn(name, cmd, log)?;
    let start = Instant::now();
    loop {
        proc.check_alive()?;
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.name, "ss", "-Hltn"])
            .arg(format!("sport = :{port}"))
            .output()?;
        if !out.stdout.is_empty() {
            return Ok(proc);
        }
        if start.elapsed() > READY_LIMIT {
            bail!(
                "{name} is not listening on port {port} in {} after {READY_LIMIT:?}",
                ns.name
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until an HTTP request through `addr` from the client's namespace is answered (the
/// xdp rows: until health checks have found the backend and its MAC is programmed).
fn ready(client: &NetNs, addr: SocketAddr) -> anyhow::Result<()> {
    client.run(move || {
        let start = Instant::now();
        loop {
            match http_check(addr) {
                Ok(()) => return Ok(()),
                Err(e) if start.elapsed() > READY_LIMIT => {
                    return Err(e.context(format!("nothing answers through {addr}")));
                }
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    })
}

/// A bpffs mounted for lb to pin into; unmounting drops whatever is pinned there.
struct Bpffs(PathBuf);

impl Bpffs {
    fn mount(dir: &Path) -> anyhow::Result<Bpffs> {
        std::fs::create_dir_all(dir)?;
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(dir)
            .status()?;
        anyhow::ensure!(
            status.success(),
            "cannot mount a bpffs on {}",
            dir.display()
        );
        Ok(Bpffs(dir.to_owned()))
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn report(threads: &[usize], seconds: u64, results: &Results) -> String {
    let mut out = String::from(
        "\n## XDP on a namespace topology\n\n\
         The xdp tests' topology (tests/src/topology.rs): client, lb and backend each in a \
         network namespace of its own, on one bridge; veths with MTU 1500 and transmit \
         checksums off (no TSO: every packet a real frame, as the XDP program would see from \
         a NIC). The rows: **routed**, no balancer, the lb namespace as a plain IP router \
         (client -> lb host -> backend, the hops a NAT packet takes, with the kernel's \
         forwarding instead of the XDP program; the reference); **direct**, the client \
         straight to the backend over the bridge; **lb xdp** with NAT and with DSR, client -> \
         VIP, the program attached in veth's native (driver) mode and in generic mode (on a \
         veth, native XDP is emulated: each frame is copied out of its skb into a page and \
         queued to NAPI, while generic mode runs the program on the skb as it is; on a NIC \
         with XDP support, native mode runs on the driver's buffers before any skb exists \
         and is the one to use); **lb proxy**, the proxy dataplane in the lb namespace (`--workers T`). One \
         backend (nginx, 2 workers, and iperf3), a topology made afresh for each row in each \
         run; the figures as in the loopback tables above, with `wrk`/`iperf3` in the \
         client's namespace. XDP runs in the softirq of whichever CPU receives the frame, so \
         it has no thread count; T is the load generator's (and lb proxy's).\n",
    );
    for figure in FIGURES {
        let metrics = figure.metrics();
        let _ = write!(
            out,
            "\n### {} ({seconds} s runs)\n\n| T | row |",
            figure.title()
        );
        for m in metrics {
            let _ = write!(out, " {} |", m.name);
        }
        out.push_str(" vs routed | vs direct |\n|---|---|");
        for _ in metrics {
            out.push_str("---|");
        }
        out.push_str("---|---|\n");
        for &t in threads {
            let first = |row: Row| {
                medians_of(results.get(&(figure, t, row)), figure).and_then(|v| v.first().copied())
            };
            let routed = first(Row::Routed);
            let direct = first(Row::Direct);
            for row in Row::ALL {
                let _ = write!(out, "| {t} | {} |", row.name());
                match medians_of(results.get(&(figure, t, row)), figure) {
                    Some(values) => {
                        for (m, v) in metrics.iter().zip(&values) {
                            let _ = write!(out, " {} |", number(*v, m.decimals));
                        }
                        let r = |base: Option<f64>| match base {
                            Some(b) if b > 0.0 => format!("{:.2}", values[0] / b),
                            _ => "–".into(),
                        };
                        let _ = writeln!(out, " {} | {} |", r(routed), r(direct));
                    }
                    None => {
                        for _ in metrics {
                            out.push_str(" failed |");
                        }
                        out.push_str(" – | – |\n");
                    }
                }
            }
        }
        let mut notes = String::new();
        for &t in threads {
            for row in Row::ALL {
                for (i, r) in results
                    .get(&(figure, t, row))
                    .into_iter()
                    .flatten()
                    .enumerate()
                {
                    match r {
                        Err(e) => {
                            let _ = writeln!(
                                notes,
                                "- T={t} {} run {}: failed: {e}",
                                row.name(),
                                i + 1
                            );
                        }
                        Ok(Sample { note: Some(n), .. }) => {
                            let _ = writeln!(notes, "- T={t} {} run {}: {n}", row.name(), i + 1);
                        }
                        Ok(_) => {}
                    }
                }
            }
        }
        if !notes.is_empty() {
            let _ = write!(out, "\n{notes}");
        }
    }
    out
}

fn medians_of(runs: Option<&Vec<Result<Sample, String>>>, figure: Figure) -> Option<Vec<f64>> {
    medians(runs?, figure.metrics().len())
}

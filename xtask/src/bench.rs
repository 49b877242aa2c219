//! `cargo xtask bench`: lb side by side with no balancer, HAProxy and nginx, on this machine,
//! all on 127.0.0.1, in one run; writes docs/benchmarks.md and prints the same tables.
//!
//! - `peers`: each balancer writes its config into a temp dir and runs as a child process
//!   (killed on drop, and if the bench dies); the backends behind them.
//! - `figures`: what is measured (wrk, iperf3, RSS under idle connections) and how.
//! - `report`: medians and tables, each value as a ratio to no balancer and to the best peer.
//! - `procs`: child processes, bounded commands, ports, RSS, temp dirs.
//!
//! Runs are interleaved (run 1 of every peer, then run 2, ...) so a burst of load from
//! elsewhere on the machine lands on all peers rather than on one.

mod figures;
mod openloop;
mod peers;
mod procs;
mod report;
mod xdp;

use std::{
    fmt::Write as _,
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::util::{cargo, root, step};
use figures::{Figure, IDLE_CONNECTIONS, Sample};
use peers::{Ctx, HoldBackend, HttpBackends, IperfServer, Peer, http_check};
use procs::{TempDir, raise_nofile};
use report::Results;

/// Worker threads given to every peer (and to the load generator).
const THREADS: [usize; 2] = [1, 2];
/// nginx workers serving HTTP behind the balancers (and to wrk directly, for no balancer).
const HTTP_BACKEND_WORKERS: usize = 2;
const HTTP_BACKEND_PORTS: usize = 3;

pub fn bench(runs: usize, seconds: u64, only: Option<&str>) -> anyhow::Result<()> {
    let (figures, peers, with_xdp) = select(only)?;
    let runs = runs.max(1);
    let seconds = seconds.max(1);
    let command = command_line(runs, seconds, only);
    step("bench: peers and load tools (Debian packages)", || {
        crate::setup::apt_install(&["haproxy", "nginx", "libnginx-mod-stream", "wrk", "iperf3"])
    })?;
    step("build lb (release)", || {
        cargo(&["build", "--release", "-p", "lb-userspace"], &[])
    })?;
    let nofile = raise_nofile().context("cannot raise the open-files limit")?;
    if figures.contains(&Figure::Rss) && nofile < 2 * IDLE_CONNECTIONS as u64 + 100 {
        bail!(
            "the open-files hard limit is {nofile}: the memory figure holds {} sockets here",
            2 * IDLE_CONNECTIONS
        );
    }
    let started = Instant::now();
    let load_before = loadavg();
    let tmp = TempDir::new("lb-bench")?;
    let mut ctx = Ctx::new(root().join("target/release/lb"), tmp.path().to_owned());
    let mut results = Results::new();
    for &figure in &figures {
        step(&format!("bench: {}", figure.title()), || {
            run_figure(figure, &peers, runs, seconds, &mut ctx, &mut results)
        })?;
    }
    let elapsed = started.elapsed();
    // The sockmap peers' maps, which a SIGKILLed lb leaves pinned.
    let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/lb-bench-{}", std::process::id()));

    // The loopback report first: an xdp part that fails loses nothing measured before it.
    if !figures.is_empty() {
        write_loopback(
            &command,
            runs,
            seconds,
            elapsed,
            &load_before,
            &figures,
            &peers,
            &results,
        )?;
    }
    if with_xdp {
        let xdp_started = Instant::now();
        let xdp_load = loadavg();
        let section = step("bench: xdp on the namespace topology", || {
            xdp::bench(&ctx.lb_bin, tmp.path(), &THREADS, runs, seconds)
        });
        let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/lb-bench-{}", std::process::id()));
        let mut doc = header(&command, runs, seconds, xdp_started.elapsed(), &xdp_load);
        doc.push_str(&section?);
        let path = root().join("docs/benchmarks-xdp.md");
        std::fs::write(&path, &doc).with_context(|| format!("cannot write {}", path.display()))?;
        println!("{doc}\nbench: xdp written to {}", path.display());
    }
    Ok(())
}

#[expect(clippy::too_many_arguments, reason = "the run's whole context")]
fn write_loopback(
    command: &str,
    runs: usize,
    seconds: u64,
    elapsed: Duration,
    load_before: &str,
    figures: &[Figure],
    peers: &[Peer],
    results: &Results,
) -> anyhow::Result<()> {
    let mut doc = header(command, runs, seconds, elapsed, load_before);
    let mut tables = String::new();
    for &figure in figures {
        let _ = write!(
            tables,
            "\n## {}\n\n{}\n\nBehind the balancers: {}.\n\n{}",
            figure.title(),
            figure.how(seconds),
            figures::backends_note(figure),
            report::table(figure, &THREADS, peers, results)
        );
    }
    doc.push_str(&tables);
    // Without the file's own comment (which is about editing it).
    doc.push_str(
        SOCKMAP_NOTES
            .split_once("-->")
            .map_or(SOCKMAP_NOTES, |(_, notes)| notes),
    );
    let path = root().join("docs/benchmarks.md");
    std::fs::write(&path, &doc).with_context(|| format!("cannot write {}", path.display()))?;
    println!("{tables}");
    println!(
        "bench: {} in {:.1} min; written to {}",
        command,
        elapsed.as_secs_f64() / 60.0,
        path.display()
    );
    Ok(())
}

/// `--only`: figure keys; `relay` narrows the peers to lb's two relays and no balancer.
/// The loopback figures and peers `--only` asks for, and whether the xdp topology bench runs
/// (by default: everything).
fn select(only: Option<&str>) -> anyhow::Result<(Vec<Figure>, Vec<Peer>, bool)> {
    let mut figures = Vec::new();
    let mut relay_only = false;
    let mut with_xdp = only.is_none();
    for key in only.unwrap_or("").split(',').map(str::trim) {
        if key.is_empty() {
            continue;
        }
        if key == "relay" {
            relay_only = true;
            continue;
        }
        if key == "xdp" {
            with_xdp = true;
            continue;
        }
        match Figure::ALL.iter().find(|f| f.key() == key) {
            Some(f) if !figures.contains(f) => figures.push(*f),
            Some(_) => {}
            None => bail!(
                "--only: unknown figure {key:?}; figures are rr, rate50, rate80, conn, bulk, rss \
                 (and relay: only lb's relays, lb sockmap and no balancer; xdp: the xdp \
                 dataplane on a namespace topology)"
            ),
        }
    }
    if figures.is_empty() && !(with_xdp && only.is_some()) {
        figures = Figure::ALL.to_vec();
    }
    // A fixed-rate figure takes its rate from the keep-alive figure of the same run.
    if figures.iter().any(|f| f.load().is_some()) && !figures.contains(&Figure::Rr) {
        figures.push(Figure::Rr);
    }
    figures.sort();
    let peers = if relay_only {
        // lb's own variants and the limit: every peer but the other balancers.
        Peer::ALL
            .into_iter()
            .filter(|p| !p.is_other_balancer())
            .collect()
    } else {
        Peer::ALL.to_vec()
    };
    Ok((figures, peers, with_xdp))
}

/// The backends a figure's peers balance to.
enum Backends {
    Http(HttpBackends),
    Iperf(IperfServer),
    Hold(HoldBackend),
}

impl Backends {
    fn start(figure: Figure, ctx: &mut Ctx) -> anyhow::Result<Backends> {
        Ok(match figure {
            Figure::Rr | Figure::Rate50 | Figure::Rate80 | Figure::Conn => Backends::Http(
                HttpBackends::start(ctx, HTTP_BACKEND_PORTS, HTTP_BACKEND_WORKERS)?,
            ),
            Figure::Bulk => Backends::Iperf(IperfServer::start(ctx)?),
            Figure::Rss => Backends::Hold(HoldBackend::start(ctx)?),
        })
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        match self {
            Backends::Http(h) => h.addrs.clone(),
            Backends::Iperf(i) => vec![i.addr],
            Backends::Hold(h) => vec![h.addr],
        }
    }
}

fn run_figure(
    figure: Figure,
    peers: &[Peer],
    runs: usize,
    seconds: u64,
    ctx: &mut Ctx,
    results: &mut Results,
) -> anyhow::Result<()> {
    let backends = Backends::start(figure, ctx)?;
    let addrs = backends.addrs();
    let hold = match &backends {
        Backends::Hold(h) => Some(h),
        _ => None,
    };
    let scratch = ctx.dir.join("scratch");
    std::fs::create_dir_all(&scratch)?;
    let peers: Vec<Peer> = peers
        .iter()
        .copied()
        .filter(|p| figure.applies_to(*p))
        .collect();
    for threads in THREADS {
        // A fixed-rate figure offers a share of the slowest peer's keep-alive rate at these
        // threads, measured earlier in this run.
        let rate = figure.load().and_then(|share| {
            peers
                .iter()
                .filter(|&&p| p != Peer::None)
                .filter_map(|&p| {
                    let runs = results.get(&(Figure::Rr, threads, p))?;
                    report::medians(runs, Figure::Rr.metrics().len()).map(|m| m[0])
                })
                .min_by(f64::total_cmp)
                .map(|slowest| slowest * share)
        });
        if figure.load().is_some() {
            match rate {
                Some(r) => eprintln!(
                    "    {}: {threads} thread(s), offered {r:.0} req/s",
                    figure.key()
                ),
                None => bail!("{}: no keep-alive rate to take a share of", figure.key()),
            }
        }
        for run in 1..=runs {
            for &peer in &peers {
                let outcome = (|| -> anyhow::Result<Sample> {
                    let mut running = peer.start(ctx, threads, &addrs)?;
                    if matches!(
                        figure,
                        Figure::Rr | Figure::Rate50 | Figure::Rate80 | Figure::Conn
                    ) {
                        http_check(running.frontend)
                            .with_context(|| format!("{} does not relay HTTP", peer.name()))?;
                    }
                    figure.measure(&mut running, threads, seconds, hold, rate, &scratch)
                })();
                let shown = match &outcome {
                    Ok(s) => figure.show(s),
                    Err(e) => format!("FAILED: {e:#}"),
                };
                eprintln!(
                    "    {:<4} threads {threads} run {run}/{runs}  {:<12} {shown}",
                    figure.key(),
                    peer.name()
                );
                results
                    .entry((figure, threads, peer))
                    .or_default()
                    .push(outcome.map_err(|e| format!("{e:#}")));
            }
        }
    }
    Ok(())
}

fn header(
    command: &str,
    runs: usize,
    seconds: u64,
    elapsed: Duration,
    load_before: &str,
) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let date = first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let commit = first_line(
        "git",
        &[
            "-C",
            &root().to_string_lossy(),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    );
    let dirty = !first_line(
        "git",
        &[
            "-C",
            &root().to_string_lossy(),
            "status",
            "--porcelain",
            "--untracked-files=no",
        ],
    )
    .is_empty();
    let word = |line: String, n: usize| {
        line.split_whitespace()
            .nth(n)
            .unwrap_or("?")
            .trim_start_matches("nginx/")
            .to_owned()
    };
    let haproxy = word(first_line("haproxy", &["-v"]), 2);
    let nginx = word(first_line("nginx", &["-v"]), 2);
    let wrk = word(first_line("wrk", &["-v"]), 1);
    let iperf3 = word(first_line("iperf3", &["-v"]), 1);
    format!(
        "# Benchmarks\n\n\
         lb side by side with no balancer, HAProxy and nginx, on one machine, everything on \
         127.0.0.1. Written by `cargo xtask bench` (xtask/src/bench.rs): run it again rather \
         than editing this file.\n\n\
         - Date: {date}\n\
         - Command: `{command}` (took {:.1} min)\n\
         - Machine: {nproc} CPUs, {cpu}, Linux {kernel}; load average before the run: \
         {load_before}, after: {} (the machine is shared)\n\
         - lb: commit {commit}{}, release build, proxy dataplane (`--dataplane proxy`), \
         `--workers T`; HAProxy {haproxy} (`mode tcp`, `option splice-auto`, `nbthread T`); \
         nginx {nginx} (stream, `worker_processes T`); wrk {wrk}; iperf3 {iperf3}\n\
         - Each value is the median of {runs} run(s) of {seconds} s; in each run every peer \
         is started afresh, measured, and stopped, one after the other.\n\n\
         ## How to read this\n\n\
         - Each cell is `value (vs none, vs best)`: the median, then its ratio to no balancer \
         (the client straight to the backend: what this machine can do without a second hop) \
         and to the best peer, the better of HAProxy and nginx at the same thread count \
         (the higher rate, the lower latency or memory).\n\
         - For rates (req/s, conn/s, Gbit/s) higher is better: a `vs best` above 1.00 means \
         lb beats both peers. For latency and memory lower is better: above 1.00 means lb uses \
         more than the better peer.\n\
         - threads (T) is given to every peer and to the load generator: lb `--workers T`, \
         HAProxy `nbthread T`, nginx `worker_processes T`, `wrk -tT`, `iperf3 -P T`.\n\
         - The load generator, the balancer and the backends share the same {nproc} CPUs, so \
         a balancer's cost shows up as a lower rate for everyone: a balancer that spends as \
         much CPU per request as the backend roughly halves the rate (a `vs none` near 0.5). \
         Absolute numbers move from run to run on a shared machine; compare ratios within \
         one run.\n\
         - lb is lb as shipped: each direction copies small messages through a pooled buffer \
         and splices bulk (adaptive relay). lb (splice) always splices through pooled pipes \
         (`LB_RELAY=splice`); lb (copy) always reads and writes through a buffer \
         (`LB_RELAY=copy`). lb sockmap is the sockmap dataplane (`--dataplane sockmap`, needs \
         root) as shipped: a connection is handed to the kernel once it has moved \
         `promote_after_bytes` (default 64 KiB) in userspace; lb sockmap (at once) hands \
         every connection over as soon as it is connected (`promote_after_bytes: 0`).\n",
        elapsed.as_secs_f64() / 60.0,
        loadavg(),
        if dirty { " (with local changes)" } else { "" },
    )
}

/// The reasoning behind the policies and what was measured by hand (docs/benchmark-notes.md),
/// appended after this run's tables.
const SOCKMAP_NOTES: &str = include_str!("../../docs/benchmark-notes.md");

fn command_line(runs: usize, seconds: u64, only: Option<&str>) -> String {
    let mut c = String::from("cargo xtask bench");
    if runs != 3 {
        let _ = write!(c, " --runs {runs}");
    }
    if seconds != 5 {
        let _ = write!(c, " --seconds {seconds}");
    }
    if let Some(o) = only {
        let _ = write!(c, " --only {o}");
    }
    c
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// The first line a command prints (stdout, else stderr), whatever its exit status.
fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let out = String::from_utf8_lossy(&o.stdout).into_owned();
            let text = if out.trim().is_empty() {
                String::from_utf8_lossy(&o.stderr).into_owned()
            } else {
                out
            };
            text.lines().next().unwrap_or("").trim().to_owned()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only() {
        let (f, p, xdp) = select(None).unwrap();
        assert_eq!((f.len(), p.len(), xdp), (6, 8, true));
        let (f, p, xdp) = select(Some("rss, rr,rr")).unwrap();
        assert_eq!(f, [Figure::Rr, Figure::Rss]);
        assert_eq!((p.len(), xdp), (8, false));
        let (f, _, xdp) = select(Some("xdp")).unwrap();
        assert_eq!((f.len(), xdp), (0, true));
        let (f, _, xdp) = select(Some("xdp,bulk")).unwrap();
        assert_eq!((f, xdp), (vec![Figure::Bulk], true));
        let (f, p, xdp) = select(Some("relay")).unwrap();
        assert_eq!((f.len(), xdp), (6, false));
        // A fixed rate takes its rate from the keep-alive figure: that one runs first.
        let (f, _, _) = select(Some("rate80")).unwrap();
        assert_eq!(f, [Figure::Rr, Figure::Rate80]);
        assert_eq!(
            p,
            [
                Peer::None,
                Peer::Lb,
                Peer::LbSplice,
                Peer::LbCopy,
                Peer::LbSockmap,
                Peer::LbSockmapAtOnce
            ]
        );
        assert!(select(Some("rps")).is_err());
    }
}

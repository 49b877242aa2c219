//! The figures: what each one measures through a running peer, and how.

use std::{net::TcpStream, path::Path, process::Command, thread, time::Duration};

use anyhow::{Context as _, bail};

use super::{
    peers::{HoldBackend, Peer, Running},
    procs::{cpu_seconds, output_within, rss_kib},
};

/// How the CPU columns are measured.
const CPU: &str = "Balancer CPU: user + system time of the balancer's processes (all threads; \
                   /proc/PID/stat) over the run, per request; machine CPU: busy time of the \
                   whole machine (/proc/stat: wrk, balancer, backends and the kernel, including \
                   the kernel workers that relay sockmap's bytes) per request; lower is better.";

/// wrk's connections.
pub const WRK_CONNECTIONS: usize = 50;
/// Idle connections held open for the memory figure.
pub const IDLE_CONNECTIONS: usize = 5_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Figure {
    Rr,
    /// Keep-alive requests at a fixed rate: half, and four fifths, of the slowest peer's
    /// `Rr` rate in the same run (see [`Figure::load`]).
    Rate50,
    Rate80,
    Conn,
    Bulk,
    Rss,
}

/// One column of a figure's table.
pub struct Metric {
    pub name: &'static str,
    pub higher_is_better: bool,
    pub decimals: usize,
}

/// One measurement: a value per metric, and what went wrong without failing it.
#[derive(Clone, Debug)]
pub struct Sample {
    pub values: Vec<f64>,
    pub note: Option<String>,
}

impl Figure {
    pub const ALL: [Figure; 6] = [
        Figure::Rr,
        Figure::Rate50,
        Figure::Rate80,
        Figure::Conn,
        Figure::Bulk,
        Figure::Rss,
    ];

    /// The share of the slowest peer's keep-alive rate a fixed-rate figure offers.
    pub fn load(self) -> Option<f64> {
        match self {
            Figure::Rate50 => Some(0.5),
            Figure::Rate80 => Some(0.8),
            _ => None,
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Figure::Rr => "rr",
            Figure::Rate50 => "rate50",
            Figure::Rate80 => "rate80",
            Figure::Conn => "conn",
            Figure::Bulk => "bulk",
            Figure::Rss => "rss",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Figure::Rr => "Keep-alive requests/s",
            Figure::Rate50 => "Keep-alive at a fixed rate: 50% of the slowest peer's",
            Figure::Rate80 => "Keep-alive at a fixed rate: 80% of the slowest peer's",
            Figure::Conn => "New connections/s",
            Figure::Bulk => "Bulk throughput",
            Figure::Rss => "Memory per idle connection",
        }
    }

    /// How it is measured, for the report.
    pub fn how(self, seconds: u64) -> String {
        match self {
            Figure::Rr => format!(
                "`wrk -tT -c{WRK_CONNECTIONS} -d{seconds}s --latency`: HTTP/1.1 keep-alive GETs of a \
                 3-byte body, spread over 3 nginx backends (T = the peer's threads). {CPU}"
            ),
            Figure::Rate50 | Figure::Rate80 => format!(
                "An open-loop generator of our own (xtask/src/bench/openloop.rs, wrk2's model): \
                 {WRK_CONNECTIONS} keep-alive connections each send a GET on a fixed schedule for \
                 {seconds}s, together {}% of the slowest peer's keep-alive rate in the table \
                 above at the same thread count (the rate is in the progress lines). Latency is \
                 counted from each request's due time, so a stall counts against every request \
                 it delayed. Every peer gets the same work, so CPU per request compares like \
                 with like. {CPU}",
                self.load().unwrap_or(0.0) * 100.0
            ),
            Figure::Conn => format!(
                "`wrk -tT -c{WRK_CONNECTIONS} -d{seconds}s -H 'Connection: close'`: one request per \
                 connection, so each request is a new TCP connection through the balancer \
                 (and to the backend). {CPU}"
            ),
            Figure::Bulk => format!(
                "`iperf3 -c ... -t {seconds} -P T`: T streams to one iperf3 server, received rate. \
                 CPU s/GB: CPU time of the whole machine (busy jiffies in /proc/stat: client, \
                 balancer, server and kernel) per GB received; lower is better."
            ),
            Figure::Rss => format!(
                "{IDLE_CONNECTIONS} idle TCP connections opened through the balancer to a backend \
                 that holds them; (VmRSS after - VmRSS before) / {IDLE_CONNECTIONS}, summed over \
                 the balancer's processes (nginx: master and workers). Idle RSS is before the \
                 connections; kernel socket memory is not in RSS. No balancer has no process to measure."
            ),
        }
    }

    pub fn metrics(self) -> &'static [Metric] {
        const fn m(name: &'static str, higher_is_better: bool, decimals: usize) -> Metric {
            Metric {
                name,
                higher_is_better,
                decimals,
            }
        }
        const RR: &[Metric] = &[
            m("req/s", true, 0),
            m("p50 ms", false, 3),
            m("p99 ms", false, 3),
            m("balancer CPU us/req", false, 1),
            m("machine CPU us/req", false, 1),
        ];
        const RATE: &[Metric] = &[
            m("answered req/s", true, 0),
            m("p50 ms", false, 3),
            m("p99 ms", false, 3),
            m("p99.9 ms", false, 3),
            m("balancer CPU us/req", false, 1),
            m("machine CPU us/req", false, 1),
        ];
        const CONN: &[Metric] = &[
            m("conn/s", true, 0),
            m("p99 ms", false, 3),
            m("balancer CPU us/conn", false, 1),
            m("machine CPU us/conn", false, 1),
        ];
        const BULK: &[Metric] = &[m("Gbit/s", true, 2), m("CPU s/GB", false, 3)];
        const RSS: &[Metric] = &[m("KiB/conn", false, 2), m("idle RSS MiB", false, 1)];
        match self {
            Figure::Rr => RR,
            Figure::Rate50 | Figure::Rate80 => RATE,
            Figure::Conn => CONN,
            Figure::Bulk => BULK,
            Figure::Rss => RSS,
        }
    }

    /// One measurement's values with their units, for the progress lines.
    pub fn show(self, sample: &Sample) -> String {
        self.metrics()
            .iter()
            .zip(&sample.values)
            .map(|(m, v)| format!("{v:.prec$} {}", m.name, prec = m.decimals.max(1)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn applies_to(self, peer: Peer) -> bool {
        !(self == Figure::Rss && peer == Peer::None)
    }

    /// Measures once through `peer` (already started in front of this figure's backends).
    pub fn measure(
        self,
        peer: &mut Running,
        threads: usize,
        seconds: u64,
        hold: Option<&HoldBackend>,
        rate: Option<f64>,
        scratch: &Path,
    ) -> anyhow::Result<Sample> {
        let limit = Duration::from_secs(seconds + 20);
        let sample = match self {
            Figure::Rr | Figure::Conn => {
                let mut cmd = Command::new("wrk");
                cmd.args([
                    format!("-t{threads}"),
                    format!("-c{WRK_CONNECTIONS}"),
                    format!("-d{seconds}s"),
                    "--latency".into(),
                ]);
                if self == Figure::Conn {
                    cmd.args(["-H", "Connection: close"]);
                }
                cmd.arg(format!("http://{}/", peer.frontend));
                let pids = peer.pids();
                let (own_before, busy_before) = (cpu_seconds(&pids), busy_cpu_seconds()?);
                let w = parse_wrk(&output_within(&mut cmd, limit, scratch)?)?;
                let own = cpu_seconds(&pids) - own_before;
                let busy = busy_cpu_seconds()? - busy_before;
                // Per request (one request per connection in the conn figure), in us.
                let requests = w.requests_per_s * seconds as f64;
                let per = |cpu: f64| {
                    if requests > 0.0 {
                        cpu * 1e6 / requests
                    } else {
                        0.0
                    }
                };
                let values = if self == Figure::Rr {
                    vec![w.requests_per_s, w.p50_ms, w.p99_ms, per(own), per(busy)]
                } else {
                    vec![w.requests_per_s, w.p99_ms, per(own), per(busy)]
                };
                Sample {
                    values,
                    note: w.errors,
                }
            }
            Figure::Rate50 | Figure::Rate80 => {
                let rate =
                    rate.context("a fixed-rate figure needs the keep-alive figure's rates")?;
                let pids = peer.pids();
                let (own_before, busy_before) = (cpu_seconds(&pids), busy_cpu_seconds()?);
                let r = super::openloop::run(peer.frontend, rate, WRK_CONNECTIONS, seconds)?;
                let own = cpu_seconds(&pids) - own_before;
                let busy = busy_cpu_seconds()? - busy_before;
                let per = |cpu: f64| {
                    if r.answered > 0 {
                        cpu * 1e6 / r.answered as f64
                    } else {
                        0.0
                    }
                };
                Sample {
                    values: vec![
                        r.answered_per_s,
                        r.p50_ms,
                        r.p99_ms,
                        r.p999_ms,
                        per(own),
                        per(busy),
                    ],
                    note: (r.errors > 0).then(|| format!("{} of {rate:.0}/s unanswered", r.errors)),
                }
            }
            Figure::Bulk => {
                let mut cmd = Command::new("iperf3");
                cmd.args([
                    "-c",
                    &peer.frontend.ip().to_string(),
                    "-p",
                    &peer.frontend.port().to_string(),
                    "-t",
                    &seconds.to_string(),
                    "-P",
                    &threads.to_string(),
                    "-J",
                    "--connect-timeout",
                    "3000",
                ]);
                let busy_before = busy_cpu_seconds()?;
                let (gbits, bytes) = parse_iperf3(&output_within(&mut cmd, limit, scratch)?)?;
                let busy = busy_cpu_seconds()? - busy_before;
                Sample {
                    values: vec![gbits, busy / (bytes / 1e9)],
                    note: None,
                }
            }
            Figure::Rss => idle_rss(peer, hold.context("the memory figure needs its backend")?)?,
        };
        peer.check_alive()?;
        Ok(sample)
    }
}

struct Wrk {
    requests_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: Option<String>,
}

fn parse_wrk(out: &str) -> anyhow::Result<Wrk> {
    let field = |prefix: &str| {
        out.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix).map(str::trim))
    };
    let requests_per_s = field("Requests/sec:")
        .and_then(|v| v.parse::<f64>().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{out}"))?;
    let latency = |p: &str| {
        field(p)
            .and_then(parse_duration_ms)
            .with_context(|| format!("no {p} latency in wrk's output:\n{out}"))
    };
    let mut errors = Vec::new();
    if let Some(e) = field("Socket errors:") {
        errors.push(format!("socket errors: {e}"));
    }
    if let Some(n) = field("Non-2xx or 3xx responses:") {
        errors.push(format!("{n} non-2xx responses"));
    }
    if requests_per_s == 0.0 {
        bail!("wrk completed no request:\n{out}");
    }
    Ok(Wrk {
        requests_per_s,
        p50_ms: latency("50%")?,
        p99_ms: latency("99%")?,
        errors: (!errors.is_empty()).then(|| errors.join("; ")),
    })
}

/// wrk's durations: 512.00us, 1.20ms, 2.01s, 1.00m.
fn parse_duration_ms(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

/// CPU seconds the whole machine has spent busy (all but idle and iowait in /proc/stat).
fn busy_cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("/proc/stat")?;
    let cpu = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let ticks: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    anyhow::ensure!(ticks.len() >= 5, "short cpu line in /proc/stat: {cpu}");
    // user nice system idle iowait irq softirq steal ...
    let busy: f64 = ticks.iter().sum::<f64>() - ticks[3] - ticks[4];
    // USER_HZ is 100 on Linux.
    Ok(busy / 100.0)
}

/// Received rate (Gbit/s) and bytes.
fn parse_iperf3(out: &str) -> anyhow::Result<(f64, f64)> {
    let json: serde_json::Value =
        serde_json::from_str(out).with_context(|| format!("iperf3 -J output:\n{out}"))?;
    if let Some(e) = json.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {e}");
    }
    let bps = json
        .pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .context("no end.sum_received.bits_per_second in iperf3's output")?;
    let bytes = json
        .pointer("/end/sum_received/bytes")
        .and_then(serde_json::Value::as_f64)
        .context("no end.sum_received.bytes in iperf3's output")?;
    Ok((bps / 1e9, bytes))
}

fn idle_rss(peer: &mut Running, hold: &HoldBackend) -> anyhow::Result<Sample> {
    let rss = |pids: &[u32]| pids.iter().map(|&p| rss_kib(p)).sum::<u64>();
    // Let the peer finish starting (nginx workers, lb's runtime threads).
    thread::sleep(Duration::from_millis(300));
    let before = rss(&peer.pids());
    let mut clients = Vec::with_capacity(IDLE_CONNECTIONS);
    for i in 0..IDLE_CONNECTIONS {
        let c = TcpStream::connect_timeout(&peer.frontend, Duration::from_secs(3))
            .with_context(|| format!("connection {i} through {}", peer.frontend))?;
        clients.push(c);
    }
    let held = hold.wait_for(IDLE_CONNECTIONS, Duration::from_secs(30));
    // Whatever the peer allocates lazily after connecting (buffers on first event).
    thread::sleep(Duration::from_millis(500));
    let after = rss(&peer.pids());
    drop(clients);
    hold.clear();
    held?;
    let per_conn = after.saturating_sub(before) as f64 / IDLE_CONNECTIONS as f64;
    Ok(Sample {
        values: vec![per_conn, before as f64 / 1024.0],
        note: None,
    })
}

/// What the balancers forward to in a figure ("no balancer" goes straight to the first one).
pub fn backends_note(figure: Figure) -> &'static str {
    match figure {
        Figure::Rr | Figure::Rate50 | Figure::Rate80 | Figure::Conn => {
            "3 nginx HTTP backends (2 workers), round robin"
        }
        Figure::Bulk => "one iperf3 server",
        Figure::Rss => "one backend that accepts and holds connections",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output() {
        let out = "Running 2s test @ http://127.0.0.1:1/\n  1 threads and 50 connections\n\
                   \x20 Latency Distribution\n     50%  512.00us\n     75%    1.00ms\n\
                   \x20    90%    2.00ms\n     99%    3.50ms\n  100 requests in 2.00s, 1KB read\n\
                   \x20 Socket errors: connect 0, read 3, write 0, timeout 0\n\
                   Requests/sec:     50.00\nTransfer/sec:      5.00KB\n";
        let w = parse_wrk(out).unwrap();
        assert_eq!(w.requests_per_s, 50.0);
        assert_eq!(w.p50_ms, 0.512);
        assert_eq!(w.p99_ms, 3.5);
        assert!(w.errors.unwrap().contains("read 3"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("2.00s"), Some(2000.0));
        assert_eq!(parse_duration_ms("1.00m"), Some(60_000.0));
        assert_eq!(parse_duration_ms("x"), None);
    }
}

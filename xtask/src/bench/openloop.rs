//! An open-loop HTTP/1.1 keep-alive load at a fixed rate, wrk2's model: each connection sends
//! its requests on a fixed schedule whether or not the answers come back on time, and each
//! latency is counted from when the request was due, not from when it was sent. A stall then
//! counts against every request it delayed (no "coordinated omission"), and every balancer is
//! offered the same work, so CPU per request compares like with like.
//!
//! One thread per connection, blocking sockets: the generator does nothing between requests
//! but sleep, so it stays cheap at the rates measured here (a few tens of thousands a second).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
/// How long one answer may take before the run counts it as an error and that connection
/// stops.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// What one run measured.
#[derive(Debug)]
pub struct OpenLoop {
    /// Requests answered per second of the run.
    pub answered_per_s: f64,
    /// Latency percentiles from each request's due time, in ms.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Requests not answered (a connection that failed stops; its due requests count).
    pub errors: u64,
    /// Requests answered.
    pub answered: u64,
}

/// Offers `rate` requests a second, spread evenly over `connections` keep-alive connections
/// to `addr`, for `seconds`.
pub fn run(
    addr: SocketAddr,
    rate: f64,
    connections: usize,
    seconds: u64,
) -> anyhow::Result<OpenLoop> {
    if rate <= 0.0 || connections == 0 {
        bail!(
            "an open-loop run needs a rate and connections (rate {rate}, {connections} connections)"
        );
    }
    let duration = Duration::from_secs(seconds);
    // Each connection's interval between requests; connections start staggered over one.
    let interval = Duration::from_secs_f64(connections as f64 / rate);
    let start = Instant::now() + Duration::from_millis(200);
    let workers: Vec<_> = (0..connections)
        .map(|c| {
            let offset = interval.mul_f64(c as f64 / connections as f64);
            thread::spawn(move || connection(addr, start + offset, start + duration, interval))
        })
        .collect();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (lat, err) = w
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
        latencies.extend(lat);
        errors += err;
    }
    latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        f64::from(latencies[i]) / 1000.0
    };
    Ok(OpenLoop {
        answered_per_s: latencies.len() as f64 / duration.as_secs_f64(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        p999_ms: pct(0.999),
        errors,
        answered: latencies.len() as u64,
    })
}

/// One connection's schedule from `first` until `end`: the latencies (us, from each due time)
/// and how many due requests went unanswered.
fn connection(
    addr: SocketAddr,
    first: Instant,
    end: Instant,
    interval: Duration,
) -> anyhow::Result<(Vec<u32>, u64)> {
    let mut stream = TcpStream::connect_timeout(&addr, ANSWER_WITHIN)
        .with_context(|| format!("connect to {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(ANSWER_WITHIN))?;
    let mut latencies = Vec::new();
    let mut buf = vec![0u8; 4096];
    let mut due = first;
    while due < end {
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        if stream.write_all(REQUEST).is_err() || read_answer(&mut stream, &mut buf).is_err() {
            // The rest of this connection's schedule is lost.
            let left = end.saturating_duration_since(due).as_secs_f64() / interval.as_secs_f64();
            return Ok((latencies, left.ceil() as u64));
        }
        let took = due.elapsed().as_micros();
        latencies.push(u32::try_from(took).unwrap_or(u32::MAX));
        due += interval;
    }
    Ok((latencies, 0))
}

/// Reads one HTTP/1.1 answer with a Content-Length body.
fn read_answer(stream: &mut TcpStream, buf: &mut [u8]) -> anyhow::Result<()> {
    let mut have = 0;
    loop {
        if have == buf.len() {
            bail!("an answer's head longer than {} bytes", buf.len());
        }
        let n = stream.read(&mut buf[have..])?;
        if n == 0 {
            bail!("the connection closed mid-answer");
        }
        have += n;
        let Some(head_end) = find(&buf[..have], b"\r\n\r\n") else {
            continue;
        };
        let head = std::str::from_utf8(&buf[..head_end]).context("a non-UTF-8 answer head")?;
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())
                    .flatten()
            })
            .context("an answer without Content-Length")?;
        let mut body_have = have - (head_end + 4);
        while body_have < length {
            let n = stream.read(buf)?;
            if n == 0 {
                bail!("the connection closed mid-body");
            }
            body_have += n;
        }
        return Ok(());
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    /// Against a server that answers every request after 1 ms, at 400 requests a second over
    /// 4 connections for 1 s: about 400 answers, each late by about 1 ms, none lost.
    #[test]
    fn a_fixed_rate_against_a_server_that_answers() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { return };
                thread::spawn(move || {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 {
                            return;
                        }
                        thread::sleep(Duration::from_millis(1));
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n");
                    }
                });
            }
        });
        let r = run(addr, 400.0, 4, 1).unwrap();
        assert_eq!(r.errors, 0);
        assert!((380..=404).contains(&r.answered), "{r:?}");
        assert!(r.p50_ms >= 1.0 && r.p50_ms < 50.0, "{r:?}");
        assert!(r.p999_ms >= r.p99_ms && r.p99_ms >= r.p50_ms, "{r:?}");
    }
}

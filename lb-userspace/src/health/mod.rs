//! Active health checks: one task per backend, so a hanging backend never delays the checks of
//! others. Results are counted on consecutive outcomes (not cumulatively): `fall` failures in a
//! row mark an up backend down, `rise` successes in a row mark a down one up (and end a passive
//! ejection early). Every change of state is logged with its reason and counted.
//!
//! Probes: `tcp` (connect), `http` (GET, status must match), `send_expect` (send bytes, read at
//! most `max_response` bytes until they contain the expected bytes or match the regex).

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::{Expect, HealthCheckConfig, HealthCheckKind},
    state::{Backend, Health, Service},
};

/// One backend's active checking: its results in a row, and the task that runs its check.
#[derive(Debug, Default)]
pub struct Checks {
    pub streak: Streak,
    running: Option<RunningCheck>,
}

#[derive(Debug)]
struct RunningCheck {
    config: HealthCheckConfig,
    stop: CancellationToken,
}

/// Probe results in a row (counted on consecutive outcomes, not cumulatively), and what they
/// decide: a pure state machine, fed one result at a time.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Streak {
    pub successes: u32,
    pub failures: u32,
}

impl Streak {
    /// Counts one result; returns the state the backend must be in once a threshold is reached
    /// (`rise` successes in a row: up, and out of any passive ejection; `fall` failures in a
    /// row: down), or `None` while the streak is short of both.
    pub fn observe(&mut self, ok: bool, rise: u32, fall: u32) -> Option<Health> {
        if ok {
            self.successes = self.successes.saturating_add(1);
            self.failures = 0;
            (self.successes >= rise).then_some(Health::Up)
        } else {
            self.failures = self.failures.saturating_add(1);
            self.successes = 0;
            (self.failures >= fall).then_some(Health::Down)
        }
    }
}

/// Makes the running checks match `service`: a backend whose check is unchanged keeps its
/// task (its schedule and streak go on); a new or changed check starts; a backend that lost
/// its check, or left the service (in `previous`, not in `service`), stops checking. Every
/// task is a child of `stop`, the service's token, which stops them all.
pub fn sync(
    service: &Service,
    previous: Option<&Service>,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) {
    for (backend, config) in service.backends.iter().zip(&service.config.backends) {
        let want = service.config.health_check_for(config);
        let mut checks = backend.checks.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some(run), Some(want)) = (&checks.running, &want)
            && run.config == *want
            && !run.stop.is_cancelled()
        {
            continue;
        }
        if let Some(old) = checks.running.take() {
            old.stop.cancel();
        }
        if let Some(check) = want {
            let token = stop.child_token();
            let name = service.config.name.clone();
            tasks.spawn(check_loop(
                name,
                Arc::clone(backend),
                check.clone(),
                token.clone(),
            ));
            checks.running = Some(RunningCheck {
                config: check,
                stop: token,
            });
        }
    }
    for old in previous.iter().flat_map(|p| p.backends.iter()) {
        if !service.backends.iter().any(|b| Arc::ptr_eq(b, old)) {
            let mut checks = old.checks.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(run) = checks.running.take() {
                run.stop.cancel();
            }
        }
    }
}

/// Checks one backend every `interval` (with jitter) until `stop`.
async fn check_loop(
    service: String,
    backend: Arc<Backend>,
    check: HealthCheckConfig,
    stop: CancellationToken,
) {
    let target = check.target(backend.address);
    // Start at a random point of the first interval so backends are not probed in lockstep.
    let mut wait = check.interval.mul_f64(fastrand::f64());
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return,
        }
        wait = jittered(check.interval, check.jitter_percent);
        let result = match tokio::time::timeout(check.timeout, probe(&check, target)).await {
            Ok(Err(Probe::Local(why))) => {
                // lb's own shortage says nothing about the backend: no result this round.
                tracing::warn!(service, backend = %backend.address, reason = %why, "health check not run: lb is out of resources");
                continue;
            }
            Ok(Err(Probe::Failed(why))) => Err(why),
            Ok(Ok(())) => Ok(()),
            Err(_) => Err(format!("no answer within {:?}", check.timeout)),
        };
        if stop.is_cancelled() {
            // Replaced while probing (a reload changed the check): the new task counts.
            return;
        }
        let (verdict, streak) = {
            let mut checks = backend.checks.lock().unwrap_or_else(|e| e.into_inner());
            let verdict = checks
                .streak
                .observe(result.is_ok(), check.rise.get(), check.fall.get());
            (verdict, checks.streak)
        };
        match (verdict, result) {
            (Some(Health::Up), _) => {
                if backend.health() == Health::Down {
                    backend.set_health(Health::Up);
                    backend.health_changes.fetch_add(1, Relaxed);
                    tracing::info!(service, backend = %backend.address, successes = streak.successes, "backend up: health checks pass");
                }
                if backend.ejected() {
                    backend.uneject();
                    tracing::info!(service, backend = %backend.address, "ejection ended: health checks pass");
                }
            }
            (Some(Health::Down), Err(why)) if backend.health() == Health::Up => {
                backend.set_health(Health::Down);
                backend.health_changes.fetch_add(1, Relaxed);
                tracing::warn!(service, backend = %backend.address, failures = streak.failures, reason = %why, "backend down: health checks fail");
            }
            (_, Err(why)) => {
                tracing::debug!(service, backend = %backend.address, failures = streak.failures, reason = %why, "health check failed");
            }
            _ => {}
        }
    }
}

/// `interval` stretched or shrunk at random by up to `percent` %.
fn jittered(interval: Duration, percent: u8) -> Duration {
    let spread = f64::from(percent) / 100.0;
    interval.mul_f64(1.0 + spread * (2.0 * fastrand::f64() - 1.0))
}

/// Why a probe did not pass.
enum Probe {
    /// The backend failed it.
    Failed(String),
    /// lb could not run it (out of file descriptors, memory or local ports): no verdict.
    Local(String),
}

/// One probe: connect, then the check's exchange.
async fn probe(check: &HealthCheckConfig, target: SocketAddr) -> Result<(), Probe> {
    let stream = TcpStream::connect(target).await.map_err(|e| {
        let why = format!("connect {target}: {e}");
        if crate::sys::is_local_error(&e) {
            Probe::Local(why)
        } else {
            Probe::Failed(why)
        }
    })?;
    exchange(check, stream, target).await.map_err(Probe::Failed)
}

/// The check's exchange over a connected `stream`; `Err` says why it failed.
async fn exchange(
    check: &HealthCheckConfig,
    mut stream: TcpStream,
    target: SocketAddr,
) -> Result<(), String> {
    match check.kind {
        HealthCheckKind::Tcp => Ok(()),
        HealthCheckKind::Http => {
            let http = check
                .http
                .as_ref()
                .ok_or("http check without http settings")?;
            let host = http.host.clone().unwrap_or_else(|| target.to_string());
            let request = format!(
                "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lb-health-check\r\nConnection: close\r\n\r\n",
                http.path
            );
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|e| format!("send: {e}"))?;
            let head = read_until(&mut stream, 4096, |buf| {
                buf.windows(2).any(|w| w == b"\r\n")
            })
            .await?;
            let status = parse_status(&head).ok_or_else(|| "not an HTTP response".to_owned())?;
            if status == http.expect_status {
                Ok(())
            } else {
                Err(format!(
                    "HTTP status {status}, expected {}",
                    http.expect_status
                ))
            }
        }
        HealthCheckKind::SendExpect => {
            let se = check
                .send_expect
                .as_ref()
                .ok_or("send_expect check without settings")?;
            if !se.send.is_empty() {
                stream
                    .write_all(&se.send)
                    .await
                    .map_err(|e| format!("send: {e}"))?;
            }
            let matched = |buf: &[u8]| match &se.expect {
                Expect::Bytes(want) => buf.windows(want.len()).any(|w| w == want.as_slice()),
                Expect::Regex(re) => re.regex().is_match(buf),
            };
            read_until(&mut stream, se.max_response, matched)
                .await
                .map(|_| ())
        }
    }
}

/// Reads until `done(buf)`, EOF or `limit` bytes. `Err` unless `done` became true.
async fn read_until(
    stream: &mut TcpStream,
    limit: usize,
    done: impl Fn(&[u8]) -> bool,
) -> Result<Vec<u8>, String> {
    let mut buf = Vec::with_capacity(limit.min(4096));
    let mut chunk = [0u8; 1024];
    while buf.len() < limit {
        let want = chunk.len().min(limit - buf.len());
        let n = stream
            .read(&mut chunk[..want])
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if done(&buf) {
            return Ok(buf);
        }
    }
    Err(format!(
        "reply did not match after {} bytes: {:?}",
        buf.len(),
        String::from_utf8_lossy(&buf[..buf.len().min(64)])
    ))
}

/// The status code of an HTTP/1.x status line.
fn parse_status(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each transition of the streak machine, with rise 3 and fall 2.
    #[test]
    fn a_streak_decides_only_on_results_in_a_row() {
        let (rise, fall) = (3, 2);
        let mut s = Streak::default();
        // Successes below rise decide nothing; the rise-th says up, and so does every later one.
        assert_eq!(s.observe(true, rise, fall), None);
        assert_eq!(s.observe(true, rise, fall), None);
        assert_eq!(s.observe(true, rise, fall), Some(Health::Up));
        assert_eq!(s.observe(true, rise, fall), Some(Health::Up));
        // One failure resets the successes; fall failures in a row say down.
        assert_eq!(s.observe(false, rise, fall), None);
        assert_eq!(
            s,
            Streak {
                successes: 0,
                failures: 1
            }
        );
        assert_eq!(s.observe(false, rise, fall), Some(Health::Down));
        assert_eq!(s.observe(false, rise, fall), Some(Health::Down));
        // Alternating results never reach either threshold.
        let mut s = Streak::default();
        for _ in 0..10 {
            assert_eq!(s.observe(true, rise, fall), None);
            assert_eq!(s.observe(false, rise, fall), None);
        }
        // rise 1 / fall 1: every result decides.
        let mut s = Streak::default();
        assert_eq!(s.observe(false, 1, 1), Some(Health::Down));
        assert_eq!(s.observe(true, 1, 1), Some(Health::Up));
        // Counts saturate instead of wrapping.
        let mut s = Streak {
            successes: u32::MAX,
            failures: 0,
        };
        assert_eq!(s.observe(true, rise, fall), Some(Health::Up));
        assert_eq!(s.successes, u32::MAX);
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            parse_status(b"HTTP/1.0 503 Service Unavailable\r\nX: y"),
            Some(503)
        );
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status(b"HTTP/1.1 abc\r\n"), None);
    }

    #[test]
    fn jitter_stays_in_bounds() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_secs(2), 10);
            assert!(
                d >= Duration::from_millis(1800) && d <= Duration::from_millis(2200),
                "{d:?}"
            );
        }
        assert_eq!(jittered(Duration::from_secs(2), 0), Duration::from_secs(2));
    }
}

//! Runtime state of services and backends, shared by explicit `Arc` handles.
//!
//! A [`Backend`] lives as long as its address is configured in its service: reloads keep the
//! same `Arc` (and so its counters, health and open connections) for an unchanged address.
//! A [`Service`] is immutable once built; a reload builds a new one and swaps it in
//! (see `control`), so the connection path reads it without locks.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed},
    },
    time::Instant,
};

use crate::{
    balance::{self, Candidate, PickCtx, Selector},
    config::{InitialState, ServiceConfig},
};

/// Health as the checks see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    Up = 0,
    Down = 1,
}

impl From<InitialState> for Health {
    fn from(s: InitialState) -> Health {
        match s {
            InitialState::Up => Health::Up,
            InitialState::Down => Health::Down,
        }
    }
}

/// One backend's live state and counters.
#[derive(Debug)]
pub struct Backend {
    pub address: SocketAddr,
    /// The configured weight (0 = drain).
    weight: AtomicU32,
    health: AtomicU8,
    /// Drained through the admin API: no new connections, open ones continue.
    drained: AtomicBool,
    /// Passive ejection deadline, in ms since `created`; 0 = not ejected.
    ejected_until_ms: AtomicU64,
    created: Instant,
    pub active: AtomicU64,
    pub connections_total: AtomicU64,
    pub bytes_to_backend: AtomicU64,
    pub bytes_to_client: AtomicU64,
    pub connect_failures: AtomicU64,
    /// Connect failures in a row (passive ejection).
    consecutive_failures: AtomicU32,
    /// Times ejected so far (the ejection time doubles with each, capped).
    pub ejections: AtomicU64,
    /// Up/down transitions seen by active checks.
    pub health_changes: AtomicU64,
    /// The active check's results in a row, and the task that runs it: both belong to the
    /// backend, so a reload that keeps the backend keeps its streak and its check's schedule
    /// (`health::sync`).
    pub checks: std::sync::Mutex<crate::health::Checks>,
}

impl Backend {
    pub fn new(address: SocketAddr, weight: u32, health: Health) -> Backend {
        Backend {
            address,
            weight: AtomicU32::new(weight),
            health: AtomicU8::new(health as u8),
            drained: AtomicBool::new(false),
            ejected_until_ms: AtomicU64::new(0),
            created: Instant::now(),
            active: AtomicU64::new(0),
            connections_total: AtomicU64::new(0),
            bytes_to_backend: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU64::new(0),
            health_changes: AtomicU64::new(0),
            checks: std::sync::Mutex::default(),
        }
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Relaxed)
    }

    pub fn set_weight(&self, weight: u32) {
        self.weight.store(weight, Relaxed);
    }

    pub fn health(&self) -> Health {
        if self.health.load(Relaxed) == Health::Up as u8 {
            Health::Up
        } else {
            Health::Down
        }
    }

    /// Sets health; returns the previous value.
    pub fn set_health(&self, health: Health) -> Health {
        if self.health.swap(health as u8, Relaxed) == Health::Up as u8 {
            Health::Up
        } else {
            Health::Down
        }
    }

    pub fn drained(&self) -> bool {
        self.drained.load(Relaxed)
    }

    pub fn set_drained(&self, drained: bool) {
        self.drained.store(drained, Relaxed);
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.created.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Ejects the backend from selection for `for_ms` milliseconds.
    pub fn eject(&self, for_ms: u64) {
        self.ejected_until_ms
            .store(self.now_ms().saturating_add(for_ms).max(1), Relaxed);
    }

    /// Ends an ejection early (an active check saw it healthy again).
    pub fn uneject(&self) {
        self.ejected_until_ms.store(0, Relaxed);
    }

    pub fn ejected(&self) -> bool {
        let until = self.ejected_until_ms.load(Relaxed);
        until != 0 && self.now_ms() < until
    }

    /// May this backend take a new connection now?
    pub fn eligible(&self) -> bool {
        self.weight() > 0 && self.health() == Health::Up && !self.drained() && !self.ejected()
    }

    /// What `/status` shows: "up", "down" or "draining".
    pub fn state_label(&self) -> &'static str {
        if self.health() == Health::Down || self.ejected() {
            "down"
        } else if self.drained() || self.weight() == 0 {
            "draining"
        } else {
            "up"
        }
    }

    /// Counts a new connection on this backend until the guard drops.
    pub fn connection(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Relaxed);
        self.connections_total.fetch_add(1, Relaxed);
        ActiveGuard(Arc::clone(self))
    }
}

/// Decrements the backend's active connection count on drop.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Backend>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
    }
}

/// A service as the connection path sees it: its config, backends and selector.
#[derive(Debug)]
pub struct Service {
    pub config: ServiceConfig,
    pub backends: Vec<Arc<Backend>>,
    pub selector: Selector,
    /// Connections refused because no backend was available.
    pub no_backend: AtomicU64,
    /// Clients reset because lb itself ran out of something (file descriptors, memory, local
    /// ports) while connecting to a backend: never counted against the backend.
    pub local_errors: AtomicU64,
}

/// Errors building a service's selection state.
#[derive(Debug, thiserror::Error)]
#[error("service {service}: cannot build backend selection")]
pub struct BuildError {
    service: String,
    #[source]
    source: balance::BalanceError,
}

impl Service {
    /// Builds a service, reusing backends from `previous` that have the same address.
    pub fn build(config: ServiceConfig, previous: Option<&Service>) -> Result<Service, BuildError> {
        // Without active checks a backend is always up (passive ejection still applies).
        let initial = config
            .health_check
            .as_ref()
            .map_or(Health::Up, |h| h.initial_state.into());
        let backends: Vec<Arc<Backend>> = config
            .backends
            .iter()
            .map(|b| {
                match previous.and_then(|p| p.backends.iter().find(|old| old.address == b.address))
                {
                    Some(old) => {
                        old.set_weight(b.weight);
                        Arc::clone(old)
                    }
                    None => Arc::new(Backend::new(b.address, b.weight, initial)),
                }
            })
            .collect();
        let candidates: Vec<Candidate> = backends
            .iter()
            .map(|b| Candidate {
                key: b.address.to_string(),
                weight: b.weight(),
            })
            .collect();
        let selector = Selector::new(
            config.algorithm,
            &candidates,
            config.maglev_table_size as usize,
        )
        .map_err(|source| BuildError {
            service: config.name.clone(),
            source,
        })?;
        Ok(Service {
            config,
            backends,
            selector,
            no_backend: AtomicU64::new(0),
            local_errors: AtomicU64::new(0),
        })
    }

    /// Picks a backend for a new connection from `client`, never one in `exclude`.
    pub fn pick(&self, client: SocketAddr, exclude: &[usize], random: u64) -> Option<usize> {
        // The pick sees one snapshot of each backend's state. Up to `STACK` backends the
        // snapshot lives on the stack: no allocation per connection.
        const STACK: usize = 64;
        let n = self.backends.len();
        let pick = |eligible: &mut [bool], active: &mut [u64]| {
            for ((b, e), a) in self
                .backends
                .iter()
                .zip(eligible.iter_mut())
                .zip(active.iter_mut())
            {
                *e = b.eligible();
                *a = b.active.load(Relaxed);
            }
            self.selector.pick(&PickCtx {
                client,
                eligible,
                active,
                exclude,
                random,
            })
        };
        if n <= STACK {
            pick(&mut [false; STACK][..n], &mut [0; STACK][..n])
        } else {
            pick(&mut vec![false; n], &mut vec![0; n])
        }
    }
}

impl Service {
    /// Passive ejection: counts connect results; after `ejection.consecutive_failures` failures
    /// in a row the backend is ejected for `base_time * 2^(ejections)`, capped at `max_time`,
    /// unless `max_percent` of the service's backends are already ejected.
    pub fn record_connect(&self, index: usize, ok: bool) {
        let backend = &self.backends[index];
        if ok {
            backend.consecutive_failures.store(0, Relaxed);
            return;
        }
        let ejection = &self.config.ejection;
        let failures = backend.consecutive_failures.fetch_add(1, Relaxed) + 1;
        if ejection.consecutive_failures == 0
            || failures < ejection.consecutive_failures
            || backend.ejected()
        {
            return;
        }
        let ejected = self.backends.iter().filter(|b| b.ejected()).count();
        let allowed = self.backends.len() * usize::from(ejection.max_percent) / 100;
        if ejected + 1 > allowed {
            tracing::warn!(backend = %backend.address, ejected, allowed, "not ejecting: max_percent of backends already ejected");
            return;
        }
        let n = backend.ejections.fetch_add(1, Relaxed).min(20);
        let time = ejection
            .base_time
            .saturating_mul(1u32 << n)
            .min(ejection.max_time);
        backend.consecutive_failures.store(0, Relaxed);
        backend.eject(u64::try_from(time.as_millis()).unwrap_or(u64::MAX));
        tracing::warn!(backend = %backend.address, failures, ejected_for = ?time, "backend ejected after consecutive connect failures");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service of `n` backends (127.0.0.1:10000+i, weight 1) with `algorithm`.
    fn service(n: usize, algorithm: &str) -> Service {
        let mut yaml = format!(
            "services:\n  - name: s\n    listen: 127.0.0.1:9999\n    algorithm: {algorithm}\n    backends:\n"
        );
        for i in 0..n {
            yaml += &format!("      - address: 127.0.0.1:{}\n", 10_000 + i);
        }
        let config = crate::config::parse(&yaml, "test.yaml").expect("a valid config");
        Service::build(config.services[0].clone(), None).expect("a service")
    }

    /// Both ways the pick takes a snapshot (on the stack up to 64 backends, on the heap
    /// above): it never returns a backend that is drained, down or excluded, and it spreads
    /// over the others.
    #[test]
    fn a_pick_skips_ineligible_and_excluded_backends_at_any_size() {
        for n in [1, 3, 64, 65, 200] {
            for algorithm in ["round_robin", "least_connections", "maglev"] {
                let s = service(n, algorithm);
                // Every third backend out: drained, down, or excluded.
                for (i, b) in s.backends.iter().enumerate() {
                    match i % 6 {
                        1 => b.set_drained(true),
                        4 => {
                            b.set_health(Health::Down);
                        }
                        _ => {}
                    }
                }
                let exclude: Vec<usize> = (0..n).filter(|i| i % 6 == 2).collect();
                let allowed = |i: usize| !matches!(i % 6, 1 | 2 | 4);
                let mut seen = std::collections::HashSet::new();
                for k in 0..(n as u64 * 20) {
                    let client =
                        SocketAddr::from(([10, 0, (k >> 8) as u8, k as u8], 40_000 + k as u16));
                    match s.pick(client, &exclude, k.wrapping_mul(0x9e37_79b9_7f4a_7c15)) {
                        Some(i) => {
                            assert!(allowed(i), "{algorithm} n={n}: picked backend {i}");
                            seen.insert(i);
                        }
                        None => assert!((0..n).all(|i| !allowed(i)), "{algorithm} n={n}: no pick"),
                    }
                }
                let usable = (0..n).filter(|&i| allowed(i)).count();
                assert!(
                    seen.len() * 2 >= usable,
                    "{algorithm} n={n}: {} of {usable} usable backends picked",
                    seen.len()
                );
            }
        }
    }
}

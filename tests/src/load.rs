//! Steady client load: threads opening connections one after another, each doing an echo
//! exchange and a clean close, counting what succeeded and what failed (and why).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::stream::{echo_round_trip, read_to_eof, try_connect, wait_until};

/// The longest a load runs even if nobody stops it.
pub const LOAD_LIMIT: Duration = Duration::from_secs(240);

/// Client threads against an echo service. Stopped (and joined) on drop.
pub struct Load {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    stop: AtomicBool,
    /// Held (shared) by each connection while it runs; [`Load::quiesced`] takes it exclusively.
    gate: RwLock<()>,
    ok: AtomicU64,
    failed: AtomicU64,
    errors: Mutex<Vec<String>>,
    started: Instant,
}

/// What a load saw, once stopped.
#[derive(Debug)]
pub struct LoadReport {
    pub ok: u64,
    pub failed: u64,
    /// The first errors (at most 20), each with when it happened.
    pub errors: Vec<String>,
    pub elapsed: Duration,
}

impl Load {
    /// Starts `threads` clients against `addr`; each waits `pause` between connections.
    /// Connection `n` of a thread sends a message of 16 to 2 KiB and expects it back, then
    /// half-closes and expects a clean EOF: a reset or a short echo is a failure.
    pub fn start(addr: SocketAddr, threads: usize, pause: Duration) -> Load {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            gate: RwLock::new(()),
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            errors: Mutex::new(Vec::new()),
            started: Instant::now(),
        });
        let threads = (0..threads)
            .map(|t| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("load-{t}"))
                    .spawn(move || client_loop(&shared, addr, t, pause))
                    .expect("spawn a load thread")
            })
            .collect();
        Load { shared, threads }
    }

    pub fn ok(&self) -> u64 {
        self.shared.ok.load(Ordering::SeqCst)
    }

    pub fn failed(&self) -> u64 {
        self.shared.failed.load(Ordering::SeqCst)
    }

    /// Waits (at most `timeout`) until `n` more connections than now have succeeded.
    pub fn wait_for_more(&self, n: u64, timeout: Duration) -> bool {
        let target = self.ok() + n;
        wait_until(timeout, || self.ok() >= target)
    }

    /// Runs `f` while no connection of the load is in flight (they pause and resume after).
    pub fn quiesced<R>(&self, f: impl FnOnce() -> R) -> R {
        let _all_paused = self
            .shared
            .gate
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f()
    }

    /// Stops the clients, waits for them and reports.
    pub fn stop(mut self) -> LoadReport {
        self.stop_threads();
        LoadReport {
            ok: self.ok(),
            failed: self.failed(),
            errors: self
                .shared
                .errors
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
            elapsed: self.shared.started.elapsed(),
        }
    }

    fn stop_threads(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

fn client_loop(shared: &Shared, addr: SocketAddr, thread: usize, pause: Duration) {
    let mut n = 0u64;
    while !shared.stop.load(Ordering::SeqCst) && shared.started.elapsed() < LOAD_LIMIT {
        let result = {
            let _running = shared
                .gate
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            one_connection(addr, thread, n)
        };
        match result {
            Ok(()) => {
                shared.ok.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => {
                shared.failed.fetch_add(1, Ordering::SeqCst);
                let mut errors = shared
                    .errors
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if errors.len() < 20 {
                    errors.push(format!(
                        "at {:?}, thread {thread} connection {n}: {e}",
                        shared.started.elapsed()
                    ));
                }
            }
        }
        n += 1;
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
}

fn one_connection(addr: SocketAddr, thread: usize, n: u64) -> Result<(), String> {
    let mut stream = try_connect(addr).map_err(|e| format!("connect: {e}"))?;
    let len = 16 + (n as usize * 131 + thread * 17) % 2032;
    let mut msg = format!("load {thread} {n} ").into_bytes();
    msg.resize(len, b'x');
    echo_round_trip(&mut stream, &msg).map_err(|e| format!("echo of {len} bytes: {e}"))?;
    stream
        .shutdown(std::net::Shutdown::Write)
        .map_err(|e| format!("half-close: {e}"))?;
    let rest = read_to_eof(&mut stream, 0).map_err(|e| format!("waiting for EOF: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{} bytes after the echo", rest.len()));
    }
    Ok(())
}

//! The daemon's lifecycle: build state from config, bind, serve, reload, drain.
//!
//! - `Daemon` holds what runs: each service's swappable state, its listener task, its health
//!   checks. `reload` applies a new config as a diff (see [`Daemon::reload`]).
//! - `admin`: the admin HTTP API (`/metrics`, `/status`, `/reload`, drain).
//! - `metrics`: the Prometheus collector over live state.
//! - `status`: the `lb status` client.

pub mod admin;
pub mod metrics;
mod plan;
pub mod status;

use std::{
    collections::HashMap,
    net::SocketAddr,
    num::NonZeroUsize,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{Mutex, Semaphore},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::{self, Config, ConfigErrors, ServiceConfig},
    dataplane::{self, pipes::PipePool, proxy, relay::RelayMode},
    state::Service,
    sys,
};

/// Idle pipes kept for reuse, and the capacity of each (see README, "Resources").
const PIPE_POOL_IDLE: usize = 256;
const PIPE_SIZE: usize = 64 * 1024;
/// Copy buffers: a read that fills one is bulk, and the relay switches to splice.
const COPY_BUFFER_SIZE: usize = 16 * 1024;

/// Everything bound and built before the async runtime starts.
pub struct Prepared {
    choice: dataplane::Choice,
    /// Each service's listeners, one per worker (none for xdp).
    services: Vec<(ServiceConfig, Option<Vec<std::net::TcpListener>>, Service)>,
    admin: Option<std::net::TcpListener>,
}

/// Runs the daemon until SIGTERM/SIGINT and the drain that follows.
///
/// Everything that needs privileges happens first, on this one thread: bind the listeners and
/// the admin API (ports below 1024 need CAP_NET_BIND_SERVICE). Then the daemon drops what it no
/// longer needs (see [`sys::drop_privileges`]), and only then starts the runtime's threads.
/// `fresh` (xdp): remove what a previous daemon pinned before loading.
pub fn run_daemon(
    path: PathBuf,
    config: Config,
    workers: Option<NonZeroUsize>,
    fresh: bool,
) -> anyhow::Result<()> {
    let limit = match sys::raise_nofile_limit() {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-files limit");
            sys::nofile_limit()
        }
    };
    let reserve = sys::reserve_descriptors(limit);
    let count = workers.map_or_else(
        || std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
        NonZeroUsize::get,
    );
    let prepared = prepare(&config, fresh, count)?;
    if prepared.choice.kind != dataplane::Kind::Xdp {
        // Two sockets per connection (pipes come and go with bulk transfers). Information,
        // not a warning: max_connections is a ceiling most services never reach, and past
        // the limit clients are reset and counted (lb_local_errors_total), never hung.
        let carried = limit.saturating_sub(reserve) / 2;
        let wanted: u64 = config
            .services
            .iter()
            .map(|s| u64::from(s.max_connections.get()))
            .sum();
        tracing::info!(
            limit,
            reserve,
            "the open-files limit carries about {carried} connections (the services' \
             max_connections add up to {wanted}{})",
            if wanted > carried {
                format!(
                    "; to carry them all, raise LimitNOFILE (or ulimit -n) to {}",
                    2 * wanted + reserve + 64
                )
            } else {
                String::new()
            }
        );
    }
    if nix::unistd::geteuid().is_root() {
        // The proxy keeps one capability: binding ports below 1024 on reload.
        let keep = [caps::Capability::CAP_NET_BIND_SERVICE];
        sys::drop_privileges(config.run_as.as_deref(), &keep).context("cannot drop privileges")?;
        match &config.run_as {
            Some(user) => tracing::info!(user, kept = ?keep, "privileges dropped"),
            None => {
                tracing::info!(kept = ?keep, "capabilities dropped; set run_as to leave root as well")
            }
        }
    }
    let workers = Workers::start(count).context("cannot start the worker threads")?;
    // The control plane (signals, reloads, health checks, admin API, XDP sync) on this
    // thread; connections on the workers.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shutdown = shutdown_signal().context("cannot install signal handlers")?;
        run(path, config, prepared, workers, shutdown).await
    })
}

/// The threads that accept and relay connections: each runs an event loop of its own (a
/// single-threaded tokio runtime) and accepts from every service's listener, so a
/// connection lives on the thread that accepted it, from accept to close, as in nginx's
/// worker processes. Measured against one work-stealing runtime shared by all
/// connections (wrk -c50 through lb to 3 nginx backends on loopback, CPU from
/// /proc/PID/task/*/stat): at 2 workers the shared runtime spent 14-16 us of CPU per
/// keep-alive request, these loops 9-10, nginx stream 8-12; requests/s went from 0.65-0.75 of
/// nginx's to 0.9-0.95. The threads run until the process exits.
pub struct Workers {
    handles: Vec<tokio::runtime::Handle>,
}

impl Workers {
    pub fn start(count: usize) -> std::io::Result<Workers> {
        let mut handles = Vec::with_capacity(count);
        for i in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            std::thread::Builder::new()
                .name(format!("lb-worker-{i}"))
                .spawn(move || {
                    // Never returns; a worker that unwinds takes the process down rather
                    // than leaving its connections and its share of every listener behind.
                    let _abort = AbortOnUnwind;
                    runtime.block_on(std::future::pending::<()>())
                })?;
        }
        Ok(Workers { handles })
    }

    /// How many workers there are.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Accepts on `listeners` (one SO_REUSEPORT group, [`proxy::bind`]), one per worker.
    fn serve(
        &self,
        tasks: &TaskTracker,
        listeners: Vec<std::net::TcpListener>,
        state: &Arc<ArcSwap<Service>>,
        slots: &Arc<Semaphore>,
        shared: &Arc<proxy::Shared>,
        stop: &CancellationToken,
    ) {
        let spawn = |listener, handle| {
            tasks.spawn_on(
                proxy::serve(
                    listener,
                    Arc::clone(state),
                    Arc::clone(slots),
                    Arc::clone(shared),
                    stop.clone(),
                ),
                handle,
            );
        };
        for (listener, handle) in listeners.into_iter().zip(self.handles.iter().cycle()) {
            spawn(listener, handle);
        }
    }
}

/// Aborts the process when dropped, which for a worker thread only happens if it unwinds.
struct AbortOnUnwind;

impl Drop for AbortOnUnwind {
    fn drop(&mut self) {
        eprintln!("lb: a worker thread died; aborting");
        std::process::abort();
    }
}

/// Chooses the dataplane, builds every service and binds every socket: a port in use stops the
/// start before anything serves.
/// `workers`: how many will accept (one listener each).
pub fn prepare(config: &Config, fresh: bool, workers: usize) -> anyhow::Result<Prepared> {
    let choice = dataplane::choose(config, fresh)?;
    for (other, why) in &choice.passed_over {
        tracing::info!(dataplane = %other, "not used: {why}");
    }
    if let Some(xdp) = &choice.xdp {
        tracing::info!(interface = %xdp.interface, mode = %xdp.mode, "XDP program attached; services are VIPs");
    }
    let mut services = Vec::new();
    for service in &config.services {
        let built = Service::build(service.clone(), None)?;
        if let Some(digest) = built.selector.maglev_digest() {
            tracing::info!(service = %service.name, digest, "maglev table built");
        }
        // With xdp the kernel answers for the VIP: nothing listens in userspace.
        let listener = match choice.kind {
            dataplane::Kind::Xdp => None,
            dataplane::Kind::Proxy | dataplane::Kind::Sockmap => {
                Some(proxy::bind(service.listen, workers).with_context(|| {
                    format!(
                        "service {}: cannot listen on {}",
                        service.name, service.listen
                    )
                })?)
            }
        };
        services.push((service.clone(), listener, built));
    }
    let admin = match &config.admin {
        Some(admin) => {
            let l = std::net::TcpListener::bind(admin.listen)
                .with_context(|| format!("admin: cannot listen on {}", admin.listen))?;
            l.set_nonblocking(true)?;
            Some(l)
        }
        None => None,
    };
    Ok(Prepared {
        choice,
        services,
        admin,
    })
}

/// Installs the SIGTERM and SIGINT handlers now (before anything listens, so an early signal
/// still drains) and returns a future that resolves on either.
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
        }
    })
}

/// One running service.
struct Running {
    listen: SocketAddr,
    state: Arc<ArcSwap<Service>>,
    slots: Arc<Semaphore>,
    max_connections: usize,
    stop_accepting: CancellationToken,
    stop_checks: CancellationToken,
}

/// Everything the daemon runs, and what reload and the admin API act on.
pub struct Daemon {
    path: PathBuf,
    pub dataplane: &'static str,
    /// The better dataplanes not used, and why (for `/status`).
    pub passed_over: Vec<(&'static str, String)>,
    services: std::sync::RwLock<Vec<(String, Arc<ArcSwap<Service>>)>>,
    running: Mutex<HashMap<String, Running>>,
    pub(super) shared: Arc<proxy::Shared>,
    tasks: TaskTracker,
    workers: Workers,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    /// The current config (the last one applied).
    config: std::sync::Mutex<Config>,
    /// The attached XDP program, in the xdp dataplane.
    pub xdp: Option<crate::dataplane::xdp::vip::XdpRuntime>,
    /// The sockmap dataplane's program and counters (metrics), when it runs.
    pub sockmap: Option<Arc<crate::dataplane::sockmap::Sockmap>>,
}

/// Why a reload did not apply.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("invalid configuration; nothing changed:\n{0}")]
    Invalid(#[from] ConfigErrors),
    #[error("service {service}: cannot listen on {listen}; nothing changed")]
    Bind {
        service: String,
        listen: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the XDP maps cannot hold this configuration; nothing changed")]
    XdpLimits(#[source] crate::dataplane::xdp::vip::VipError),
    #[error("cannot program the XDP maps")]
    Xdp(#[source] crate::dataplane::xdp::vip::VipError),
    #[error("service {service}: cannot build backend selection; nothing changed")]
    Build {
        service: String,
        #[source]
        source: crate::state::BuildError,
    },
}

impl ReloadError {
    /// The message and every cause under it, `: `-separated (Display alone stops at the
    /// first line: "cannot program the XDP maps", without why).
    pub fn detail(&self) -> String {
        // Invalid configs carry their errors in the message already: the chain leaves out
        // a cause the line already holds.
        crate::sys::error_chain(self)
    }
}

impl Daemon {
    /// The services in config order, for `/status` and `/metrics`.
    pub fn services(&self) -> Vec<(String, Arc<Service>)> {
        self.services
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(name, s)| (name.clone(), s.load_full()))
            .collect()
    }

    pub fn admin_token_file(&self) -> Option<PathBuf> {
        let config = self.config.lock().unwrap_or_else(|e| e.into_inner());
        config.admin.as_ref().and_then(|a| a.token_file.clone())
    }

    /// Starts (or restarts with a new config) one service; `listener` is `None` when the
    /// existing one is kept.
    fn start_service(
        &self,
        running: &mut HashMap<String, Running>,
        config: ServiceConfig,
        listener: Option<Vec<std::net::TcpListener>>,
        built: Service,
    ) {
        let name = config.name.clone();
        let max = config.max_connections.get() as usize;
        let built = Arc::new(built);
        // The service's checks: a backend the reload kept keeps its running check (schedule
        // and streak) unless its check changed.
        let previous = running.get(&name).map(|r| r.state.load_full());
        let stop_checks = running
            .get(&name)
            .map_or_else(CancellationToken::new, |r| r.stop_checks.clone());
        crate::health::sync(&built, previous.as_deref(), &self.tasks, &stop_checks);
        match running.get_mut(&name) {
            Some(r) => {
                r.state.store(Arc::clone(&built));
                if max > r.max_connections {
                    r.slots.add_permits(max - r.max_connections);
                } else {
                    let lower = r.max_connections - max;
                    let forgotten = r.slots.forget_permits(lower);
                    if forgotten < lower {
                        // The rest are held (open connections, accept loops waiting): take
                        // them back as they come free. Waiting first in the semaphore's queue,
                        // this holds new connections back until the lower limit is reached.
                        let slots = Arc::clone(&r.slots);
                        let owed = u32::try_from(lower - forgotten).unwrap_or(u32::MAX);
                        tokio::spawn(async move {
                            if let Ok(permits) = slots.acquire_many_owned(owed).await {
                                permits.forget();
                            }
                        });
                    }
                }
                r.max_connections = max;
                if let Some(listener) = listener {
                    // Bound the new address already; now stop the old one.
                    let stop = CancellationToken::new();
                    self.workers.serve(
                        &self.tasks,
                        listener,
                        &r.state,
                        &r.slots,
                        &self.shared,
                        &stop,
                    );
                    tracing::info!(service = %name, old = %r.listen, new = %config.listen, "listen address changed");
                    r.stop_accepting.cancel();
                    r.stop_accepting = stop;
                    r.listen = config.listen;
                } else if self.xdp.is_some() && r.listen != config.listen {
                    // xdp: the VIP moves (the caller unprograms the old one).
                    tracing::info!(service = %name, old = %r.listen, new = %config.listen, "VIP changed");
                    r.listen = config.listen;
                }
            }
            None => {
                let state = Arc::new(ArcSwap::new(built));
                let slots = Arc::new(Semaphore::new(max));
                let stop = CancellationToken::new();
                match listener {
                    Some(listener) => {
                        tracing::info!(service = %name, listen = %config.listen, "listening");
                        self.workers.serve(
                            &self.tasks,
                            listener,
                            &state,
                            &slots,
                            &self.shared,
                            &stop,
                        );
                    }
                    None => {
                        tracing::info!(service = %name, vip = %config.listen, "VIP programmed in XDP")
                    }
                }
                running.insert(
                    name,
                    Running {
                        listen: config.listen,
                        state,
                        slots,
                        max_connections: max,
                        stop_accepting: stop,
                        stop_checks,
                    },
                );
            }
        }
    }

    /// Applies the config file again, as a diff. Invalid files, listen addresses that cannot be
    /// bound and selection that cannot be built leave everything as it was. Otherwise: new
    /// services bind; removed services stop accepting (their open connections finish); changed
    /// services get the new settings and backends, keeping every open connection and the
    /// counters of unchanged backends; a changed listen address is bound before the old one
    /// closes. Dataplane, admin and shutdown settings need a restart.
    pub async fn reload(&self) -> Result<(), ReloadError> {
        let result = self.try_reload().await;
        match &result {
            Ok(()) => {
                self.reloads_ok.fetch_add(1, Relaxed);
                tracing::info!("reload applied");
            }
            Err(e) => {
                self.reloads_failed.fetch_add(1, Relaxed);
                tracing::error!("reload failed: {}", e.detail());
            }
        }
        result
    }

    async fn try_reload(&self) -> Result<(), ReloadError> {
        // Parsed on the blocking pool: neither the admin API nor a worker waits on it.
        let path = self.path.clone();
        let new = tokio::task::spawn_blocking(move || config::load(&path))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
        let mut running = self.running.lock().await;
        let plan = {
            let current: Vec<(&str, std::net::SocketAddr)> = running
                .iter()
                .map(|(name, r)| (name.as_str(), r.listen))
                .collect();
            plan::plan(&current, &new.services, self.xdp.is_some())
        };
        // 1. Everything that can fail, before anything changes.
        let mut prepared = Vec::new();
        for service in &new.services {
            let previous = running.get(&service.name);
            let listener = if plan.bind.contains(&service.name) {
                Some(
                    proxy::bind(service.listen, self.workers.len()).map_err(|source| {
                        ReloadError::Bind {
                            service: service.name.clone(),
                            listen: service.listen,
                            source,
                        }
                    })?,
                )
            } else {
                None
            };
            let old = previous.map(|r| r.state.load_full());
            let built = Service::build(service.clone(), old.as_deref()).map_err(|source| {
                ReloadError::Build {
                    service: service.name.clone(),
                    source,
                }
            })?;
            prepared.push((service.clone(), listener, built));
        }
        if let Some(xdp) = &self.xdp {
            xdp.check(&new.services).map_err(ReloadError::XdpLimits)?;
        }
        // 2. Apply.
        let old_config = self
            .config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if new.dataplane != old_config.dataplane
            || new.admin != old_config.admin
            || new.shutdown_timeout != old_config.shutdown_timeout
        {
            tracing::warn!(
                "dataplane, admin and shutdown_timeout changes take effect at the next restart"
            );
        }
        for (service, listener, built) in prepared {
            self.start_service(&mut running, service, listener, built);
        }
        for name in &plan.remove {
            if let Some(r) = running.remove(name) {
                tracing::info!(service = %name, "service removed: stopped accepting; open connections continue");
                r.stop_accepting.cancel();
                r.stop_checks.cancel();
            }
        }
        *self.services.write().unwrap_or_else(|e| e.into_inner()) = new
            .services
            .iter()
            .map(|s| (s.name.clone(), Arc::clone(&running[&s.name].state)))
            .collect();
        let mut config = self.config.lock().unwrap_or_else(|e| e.into_inner());
        let (dataplane, admin, shutdown_timeout) = (
            config.dataplane.clone(),
            config.admin.clone(),
            config.shutdown_timeout,
        );
        *config = Config {
            dataplane,
            admin,
            shutdown_timeout,
            ..new
        };
        drop(config);
        if let Some(xdp) = &self.xdp {
            xdp.program(&self.services(), &plan.removed_vips)
                .map_err(ReloadError::Xdp)?;
        }
        Ok(())
    }

    /// Drains (or undrains) a backend: no new connections, open ones continue.
    pub fn set_drained(
        &self,
        service: &str,
        backend: SocketAddr,
        drained: bool,
    ) -> Result<(), String> {
        let services = self.services();
        let (_, svc) = services
            .iter()
            .find(|(n, _)| n == service)
            .ok_or_else(|| format!("no service named {service:?}"))?;
        let b = svc
            .backends
            .iter()
            .find(|b| b.address == backend)
            .ok_or_else(|| format!("service {service:?} has no backend {backend}"))?;
        b.set_drained(drained);
        if let Some(xdp) = &self.xdp {
            xdp.program(&services, &[])
                .map_err(|e| format!("cannot reprogram XDP: {e}"))?;
        }
        tracing::info!(service, %backend, drained, "backend drain changed through the admin API");
        Ok(())
    }
}

/// The daemon, from prepared sockets to the end of the drain. `shutdown` ends it.
pub async fn run(
    path: PathBuf,
    config: Config,
    prepared: Prepared,
    workers: Workers,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let Prepared {
        mut choice,
        services: prepared,
        admin: admin_listener,
    } = prepared;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    tracing::info!(dataplane = %choice.kind.as_str(), config = %path.display(), "starting");
    let shutdown_timeout = config.shutdown_timeout;
    let sockmap = choice.sockmap.take();
    let daemon = Arc::new(Daemon {
        path,
        dataplane: choice.kind.as_str(),
        passed_over: std::mem::take(&mut choice.passed_over),
        services: std::sync::RwLock::new(Vec::new()),
        running: Mutex::new(HashMap::new()),
        shared: Arc::new(proxy::Shared {
            pool: PipePool::new(PIPE_POOL_IDLE, PIPE_SIZE, COPY_BUFFER_SIZE),
            mode: relay_mode(),
            tracker: TaskTracker::new(),
            force_close: CancellationToken::new(),
            handover: sockmap.clone().map(|sockmap| {
                Arc::new(crate::dataplane::sockmap::KernelHandover {
                    sockmap,
                    after_bytes: config.dataplane.sockmap.promote_after_bytes,
                }) as Arc<dyn crate::dataplane::Handover>
            }),
        }),
        sockmap,
        tasks: TaskTracker::new(),
        workers,
        reloads_ok: AtomicU64::new(0),
        reloads_failed: AtomicU64::new(0),
        config: std::sync::Mutex::new(config.clone()),
        xdp: choice.xdp.take(),
    });
    {
        let mut running = daemon.running.lock().await;
        for (service, listener, built) in prepared {
            daemon.start_service(&mut running, service, listener, built);
        }
        *daemon.services.write().unwrap_or_else(|e| e.into_inner()) = config
            .services
            .iter()
            .map(|s| (s.name.clone(), Arc::clone(&running[&s.name].state)))
            .collect();
    }
    let stop_sync = CancellationToken::new();
    if let Some(xdp) = &daemon.xdp {
        xdp.program(&daemon.services(), &[])
            .context("cannot program the XDP maps")?;
        // Health feeds the kernel: push backend state and MACs every second.
        let (daemon, stop) = (Arc::clone(&daemon), stop_sync.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = stop.cancelled() => return,
                }
                if let Some(xdp) = &daemon.xdp
                    && let Err(e) = xdp.sync(&daemon.services())
                {
                    tracing::warn!(error = %e, "cannot sync backend state into XDP");
                }
            }
        });
    }
    let stop_admin = CancellationToken::new();
    if let Some(listener) = admin_listener {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        tracing::info!(listen = %listener.local_addr()?, "admin API listening");
        daemon.tasks.spawn(admin::serve(
            listener,
            Arc::clone(&daemon),
            stop_admin.clone(),
        ));
    }
    // Held while serving; let go when the drain starts, so that a new instance can take
    // pin_path over while this one drains (a restart).
    let pin_lock = choice.pin_lock.take();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading");
                let _ = daemon.reload().await;
            }
        }
    }

    drop(pin_lock);
    // Drain: stop accepting, let open connections finish up to shutdown_timeout, or until a
    // second SIGTERM or SIGINT (an operator's second Ctrl-C) says not to wait.
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let again = async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    };
    tokio::pin!(again);
    {
        let running = daemon.running.lock().await;
        for r in running.values() {
            r.stop_accepting.cancel();
            r.stop_checks.cancel();
        }
    }
    stop_admin.cancel();
    stop_sync.cancel();
    daemon.tasks.close();
    daemon.tasks.wait().await;
    let shared = &daemon.shared;
    shared.tracker.close();
    tracing::info!(open = shared.tracker.len(), timeout = ?shutdown_timeout, "stopped accepting; draining open connections");
    tokio::select! {
        drained = tokio::time::timeout(shutdown_timeout, shared.tracker.wait()) => {
            if drained.is_err() {
                tracing::warn!(
                    open = shared.tracker.len(),
                    "drain deadline passed; closing open connections"
                );
            }
        }
        which = &mut again => {
            tracing::warn!(
                open = shared.tracker.len(),
                "{which} during the drain: closing open connections now"
            );
        }
    }
    shared.force_close.cancel();
    shared.tracker.wait().await;
    tracing::info!("drained; exiting");
    Ok(())
}

/// `LB_RELAY=copy` or `LB_RELAY=splice` pins one way of moving bytes (for benchmarks); the
/// default adapts per direction (see [`RelayMode::Adaptive`]).
fn relay_mode() -> RelayMode {
    match std::env::var("LB_RELAY").as_deref() {
        Ok("copy") => RelayMode::Copy,
        Ok("splice") => RelayMode::Splice,
        _ => RelayMode::Adaptive,
    }
}

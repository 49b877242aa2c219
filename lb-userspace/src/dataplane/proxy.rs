//! The proxy dataplane: lb accepts each client, picks a backend, connects (with retries onto
//! other backends) and relays bytes itself (see `relay`). Needs no privileges.
//!
//! Over `max_connections`, a service stops accepting: new clients wait in the listen backlog
//! (1024) until a slot frees, as with HAProxy's `maxconn`; past the backlog the kernel drops
//! their SYNs and they retry. When no backend can be reached, the client gets a reset.

use std::{
    io,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpSocket, TcpStream},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument as _;

use super::{
    pipes::PipePool,
    relay::{self, Counters, Outcome, RelayMode},
};
use crate::{config::ProxyProtocol, proxy_protocol, state::Service, sys};

/// What every proxied connection shares.
#[derive(Debug)]
pub struct Shared {
    pub pool: PipePool,
    pub mode: RelayMode,
    /// Every connection task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Fired when the drain deadline passes: open connections close.
    pub force_close: CancellationToken,
    /// Where connected pairs go after their first bytes, when another dataplane takes them over
    /// (see [`super::Handover`]); `None`: the proxy relays every connection to its end.
    pub handover: Option<Arc<dyn super::Handover>>,
}

/// Binds a listening socket: SO_REUSEADDR, IPv6 sockets IPv6-only, backlog 1024, non-blocking
/// (ready for [`serve`]). Plain std so it can be bound before the async runtime starts.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Accepts on `listener` until `stop` fires, at most `slots` connections at once. Never dies on one connection's error; backs off
/// when file descriptors run out instead of spinning.
pub async fn serve(
    listener: std::net::TcpListener,
    service: Arc<ArcSwap<Service>>,
    slots: Arc<Semaphore>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register the listener");
            return;
        }
    };
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => p.expect("semaphore never closed"),
            () = stop.cancelled() => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stop.cancelled() => return,
        };
        match accepted {
            Ok((client, _)) if sys::data_path_fd(&client).is_err() => {
                // Every descriptor below the control plane's reserve is taken: the client is
                // told at once rather than left waiting for a backend socket lb cannot open.
                sys::reset_on_close(&client);
                local_shortage(&service.load(), "no descriptor left for a client");
            }
            Ok((client, peer)) => {
                let service = service.load_full();
                let span =
                    tracing::info_span!("conn", service = %service.config.name, client = %peer);
                let shared_c = Arc::clone(&shared);
                shared.tracker.spawn(
                    async move {
                        handle(client, peer, &service, &shared_c).await;
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
            Err(e) if sys::is_fd_exhaustion(&e) => {
                tracing::warn!(error = %e, "out of file descriptors; pausing accepts for 100ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => tracing::debug!(error = %e, "accept failed"),
        }
    }
}

/// Counts a client reset for lb's own shortage (`lb_local_errors_total`); warns at the 1st,
/// 2nd, 4th, 8th... time so a long shortage does not flood the log.
fn local_shortage(service: &Service, what: &str) {
    let n = service.local_errors.fetch_add(1, Relaxed) + 1;
    if n.is_power_of_two() {
        tracing::warn!(
            service = %service.config.name,
            times = n,
            "{what} (lb's own resources are exhausted); resetting the client"
        );
    } else {
        tracing::debug!(service = %service.config.name, "{what}; resetting the client");
    }
}

/// One client connection: pick, connect with retries, PROXY header, relay.
async fn handle(client: TcpStream, peer: SocketAddr, service: &Service, shared: &Shared) {
    let config = &service.config;
    if *crate::PANIC_ON_CONNECTION {
        panic!("LB_TEST_PANIC_ON_CONNECTION is set: a panic on purpose");
    }
    let _ = client.set_nodelay(true);
    let mut tried: Vec<usize> = Vec::with_capacity(1 + config.retries as usize);
    for _attempt in 0..=config.retries {
        let Some(index) = service.pick(peer, &tried, fastrand::u64(..)) else {
            break;
        };
        tried.push(index);
        let backend = &service.backends[index];
        let stream = match connect(
            backend.address,
            config.connect_timeout,
            config.tcp_keepalive,
        )
        .await
        {
            Ok(stream) => {
                service.record_connect(index, true);
                stream
            }
            Err(e) if sys::is_local_error(&e) => {
                // lb's own shortage, not the backend's fault: not fed to passive ejection or
                // the backend's counters, and no other backend would fare better.
                local_shortage(
                    service,
                    &format!("cannot open a connection to a backend: {e}"),
                );
                sys::reset_on_close(&client);
                return;
            }
            Err(e) => {
                backend.connect_failures.fetch_add(1, Relaxed);
                service.record_connect(index, false);
                tracing::warn!(backend = %backend.address, error = %e, "connect failed; trying another backend");
                continue;
            }
        };
        let _active = backend.connection();
        let mut stream = stream;
        if config.proxy_protocol != ProxyProtocol::Off {
            let local = client.local_addr().unwrap_or(config.listen);
            let header = match config.proxy_protocol {
                ProxyProtocol::V2 => proxy_protocol::v2(peer, local),
                _ => proxy_protocol::v1(peer, local),
            };
            if let Err(e) = stream.write_all(&header).await {
                tracing::warn!(backend = %backend.address, error = %e, "cannot send PROXY header");
                sys::reset_on_close(&client);
                return;
            }
        }
        tracing::debug!(backend = %backend.address, "connected");
        let counters = Counters {
            to_backend: &backend.bytes_to_backend,
            to_client: &backend.bytes_to_client,
        };
        let cx = relay::Context {
            mode: shared.mode,
            pool: &shared.pool,
            counters,
            idle_timeout: config.idle_timeout,
            force_close: &shared.force_close,
        };
        let outcome = match &shared.handover {
            Some(handover) => {
                let after = handover.after_bytes();
                let promote = if after == 0 {
                    relay::Step::Promote { up: 0, down: 0 }
                } else {
                    relay::relay_until(&client, &stream, cx, Some(after)).await
                };
                match promote {
                    relay::Step::Ended(outcome) => outcome,
                    relay::Step::Promote { up, down } => {
                        handover.take_over(client, stream, (up, down), cx).await
                    }
                }
            }
            None => relay::relay(client, stream, cx).await,
        };
        match outcome {
            Outcome::Closed => tracing::debug!(backend = %backend.address, "closed"),
            other => tracing::debug!(backend = %backend.address, outcome = ?other, "ended"),
        }
        return;
    }
    service.no_backend.fetch_add(1, Relaxed);
    tracing::warn!(
        tried = tried.len(),
        "no backend available; resetting the client"
    );
    sys::reset_on_close(&client);
}

/// Connects to a backend within `timeout`, TCP_NODELAY on, keepalive as configured.
async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    keepalive: Option<Duration>,
) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sys::data_path_fd(&socket)?;
    socket.set_nodelay(true)?;
    if let Some(time) = keepalive {
        socket2::SockRef::from(&socket)
            .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(time))?;
    }
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect timed out after {timeout:?}"),
        )),
    }
}

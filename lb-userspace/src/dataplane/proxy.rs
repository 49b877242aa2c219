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

/// Binds `count` listening sockets on `addr`, one per worker, in one SO_REUSEPORT group: the
/// kernel hands each new connection to one of them, so a connection wakes one worker. (One
/// socket shared by every worker woke them all, and all but one found nothing to accept.)
/// Each: SO_REUSEADDR, IPv6-only for IPv6, TCP_NODELAY (accepted sockets inherit it),
/// backlog 1024, non-blocking (ready for [`serve`]). Plain std so they can be bound before the
/// async runtime starts.
///
/// SO_REUSEPORT alone would let another process of the same user bind the address too and
/// take a share of its connections unnoticed (a second `lb run` started by mistake): a plain
/// bind first fails with "Address already in use" while anything listens there.
pub fn bind(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Socket, Type};
    let socket = || -> io::Result<Socket> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        Ok(socket)
    };
    socket()?.bind(&addr.into())?;
    (0..count.max(1))
        .map(|_| {
            let socket = socket()?;
            socket.set_reuse_port(true)?;
            socket.set_tcp_nodelay(true)?;
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            Ok(socket.into())
        })
        .collect()
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
        // Accept first, then wait for a slot: with one listening socket per worker
        // (SO_REUSEPORT) the kernel picks the worker, so a worker waiting for a slot before
        // accepting could hold the last one while the connection waits on another worker's
        // socket, never served (a CI failure: max_connections 2, the third client never
        // served after a slot freed). Over the limit each worker holds at most the one client
        // it accepted, unserved, until a slot frees.
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
                let permit = tokio::select! {
                    p = Arc::clone(&slots).acquire_owned() => p.expect("semaphore never closed"),
                    () = stop.cancelled() => return,
                };
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
    // TCP_NODELAY: inherited from the listener (see [`bind`]).
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

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpListener, TcpStream};

    use super::*;

    fn free_loopback() -> SocketAddr {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("a free port")
    }

    /// One listener per worker, all on the address, and every connection lands on one of
    /// them with TCP_NODELAY already on (inherited: `handle` no longer sets it).
    #[test]
    fn bind_gives_one_listener_per_worker_whose_sockets_inherit_nodelay() {
        let addr = free_loopback();
        let listeners = bind(addr, 3).expect("bind");
        assert_eq!(listeners.len(), 3);
        let clients: Vec<TcpStream> = (0..32)
            .map(|_| TcpStream::connect(addr).expect("connect"))
            .collect();
        let mut accepted = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while accepted < clients.len() && std::time::Instant::now() < deadline {
            for l in &listeners {
                while let Ok((s, _)) = l.accept() {
                    assert!(
                        s.nodelay().unwrap(),
                        "an accepted socket without TCP_NODELAY"
                    );
                    accepted += 1;
                }
            }
        }
        assert_eq!(accepted, clients.len());
    }

    /// SO_REUSEPORT alone would let a second lb (same user) share the port unnoticed.
    #[test]
    fn an_address_lb_listens_on_cannot_be_bound_again() {
        let addr = free_loopback();
        let _first = bind(addr, 2).expect("bind");
        let second = bind(addr, 2).expect_err("a second bind of a listening address");
        assert_eq!(second.kind(), io::ErrorKind::AddrInUse, "{second}");
    }
}

//! The admin HTTP API (axum): `GET /metrics`, `GET /status`, `POST /reload`,
//! `POST /services/{name}/backends/{address}/drain` and `.../undrain`.
//!
//! It binds loopback by default. When `admin.token_file` is set, every changing endpoint
//! (POST) needs `Authorization: Bearer <token>`; `lb check` refuses a non-loopback admin address
//! without one. Request bodies are capped at 64 KiB; hyper caps the request head. At most 32
//! admin connections are open at once (one more is closed as soon as it is accepted); each
//! must send its first byte within 2 s and lives at most about 10 s.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, Request, State},
    http::{HeaderMap, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use prometheus_client::registry::Registry;
use serde_json::json;
use std::sync::atomic::Ordering::Relaxed;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{Daemon, ReloadError, metrics};

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;

/// Admin connections served at once; one more is closed as soon as it is accepted: no admin
/// load can hold more of the data path's file descriptors than this.
const MAX_CONNECTIONS: usize = 32;

/// How long one admin connection may live (requests included, keep-alive or not): a client
/// that sends a byte a second gives its slot back within this.
const CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a new admin connection may stay silent before it is closed.
const FIRST_BYTE_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// The admin listener: at most [`MAX_CONNECTIONS`] open, each for at most
/// [`CONNECTION_LIFETIME`].
struct Limited {
    listener: TcpListener,
    slots: Arc<tokio::sync::Semaphore>,
}

impl axum::serve::Listener for Limited {
    type Io = Bounded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Bounded, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok((io, addr)) => {
                    let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() else {
                        // Full: closed at once (a reset, not a wait in the backlog behind
                        // connections that may never send anything).
                        tracing::debug!(%addr, "admin connections at their limit; closing one");
                        crate::sys::reset_on_close(&io);
                        continue;
                    };
                    return (
                        Bounded {
                            io,
                            _slot: slot,
                            deadline: Box::pin(tokio::time::sleep(FIRST_BYTE_WITHIN)),
                            lifetime_set: false,
                        },
                        addr,
                    );
                }
                Err(e) => {
                    // Out of descriptors (or a connection reset before accept): back off.
                    tracing::debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// An admin connection that fails with `TimedOut` once its lifetime is over, and holds its
/// slot until dropped.
struct Bounded {
    io: tokio::net::TcpStream,
    _slot: tokio::sync::OwnedSemaphorePermit,
    /// [`FIRST_BYTE_WITHIN`] until the first byte is read, then the rest of
    /// [`CONNECTION_LIFETIME`].
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    lifetime_set: bool,
}

impl Bounded {
    fn expired(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        self.deadline.as_mut().poll(cx).is_ready()
    }
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "admin connection lifetime over",
    )
}

impl tokio::io::AsyncRead for Bounded {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.expired(cx) {
            return std::task::Poll::Ready(Err(timed_out()));
        }
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        if !self.lifetime_set && buf.filled().len() > before {
            self.lifetime_set = true;
            let end = tokio::time::Instant::now() + CONNECTION_LIFETIME - FIRST_BYTE_WITHIN;
            self.deadline.as_mut().reset(end);
        }
        polled
    }
}

impl tokio::io::AsyncWrite for Bounded {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.expired(cx) {
            return std::task::Poll::Ready(Err(timed_out()));
        }
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.expired(cx) {
            return std::task::Poll::Ready(Err(timed_out()));
        }
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[derive(Clone)]
struct App {
    daemon: Arc<Daemon>,
    registry: Arc<Registry>,
    token: Option<Arc<str>>,
}

/// Serves the admin API on `listener` until `stop`.
pub async fn serve(listener: TcpListener, daemon: Arc<Daemon>, stop: CancellationToken) {
    let token = match daemon.admin_token_file() {
        Some(file) => match std::fs::read_to_string(&file) {
            Ok(t) if !t.trim().is_empty() => Some(Arc::from(t.trim())),
            Ok(_) => {
                tracing::error!(file = %file.display(), "admin token file is empty; changing endpoints are refused");
                Some(Arc::from(""))
            }
            Err(e) => {
                tracing::error!(file = %file.display(), error = %e, "cannot read the admin token file; changing endpoints are refused");
                Some(Arc::from(""))
            }
        },
        None => None,
    };
    let app = App {
        registry: Arc::new(metrics::registry(Arc::clone(&daemon))),
        daemon,
        token,
    };
    let listener = Limited {
        listener,
        slots: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
    };
    if let Err(e) = axum::serve(listener, router(app))
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "admin API stopped");
    }
}

fn router(app: App) -> Router {
    let changing = Router::new()
        .route("/reload", post(reload))
        .route("/services/{service}/backends/{backend}/drain", post(drain))
        .route(
            "/services/{service}/backends/{backend}/undrain",
            post(undrain),
        )
        .route_layer(middleware::from_fn_with_state(app.clone(), require_token));
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/status", get(status))
        .merge(changing)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(app)
}

/// Changing endpoints need the bearer token when one is configured.
async fn require_token(
    State(app): State<App>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    if let Some(token) = &app.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if token.is_empty() || given != Some(token.as_ref()) {
            return (
                StatusCode::UNAUTHORIZED,
                "a valid `Authorization: Bearer <token>` header is required\n",
            )
                .into_response();
        }
    }
    next.run(request).await
}

async fn metrics_handler(State(app): State<App>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics::render(&app.registry),
    )
        .into_response()
}

/// The `/status` document (design.md's contract, plus each service's Maglev digest).
pub fn status_json(daemon: &Daemon) -> serde_json::Value {
    let services: Vec<serde_json::Value> = daemon
        .services()
        .iter()
        .map(|(name, s)| {
            let backends: Vec<serde_json::Value> = s
                .backends
                .iter()
                .map(|b| {
                    json!({
                        "address": b.address.to_string(),
                        "weight": b.weight(),
                        "state": b.state_label(),
                        "active_connections": b.active.load(Relaxed),
                        "connections_total": b.connections_total.load(Relaxed),
                        "bytes_to_backend": b.bytes_to_backend.load(Relaxed),
                        "bytes_to_client": b.bytes_to_client.load(Relaxed),
                        "connect_failures": b.connect_failures.load(Relaxed),
                    })
                })
                .collect();
            json!({
                "name": name,
                "listen": s.config.listen.to_string(),
                "algorithm": s.config.algorithm.as_str(),
                "table_digest": s.selector.maglev_digest(),
                "no_backend": s.no_backend.load(Relaxed),
                "backends": backends,
            })
        })
        .collect();
    // Why each better dataplane was not used: no surprise about which path carries traffic.
    let passed_over: serde_json::Map<String, serde_json::Value> = daemon
        .passed_over
        .iter()
        .map(|(name, why)| ((*name).to_owned(), json!(why)))
        .collect();
    let mut status =
        json!({ "dataplane": daemon.dataplane, "passed_over": passed_over, "services": services });
    // Where and how the XDP program runs: `attach: auto` may have fallen back to generic.
    if let Some(xdp) = &daemon.xdp {
        status["xdp"] = json!({
            "interface": xdp.interface,
            "attach": xdp.mode.to_string(),
            "native_refused": xdp.native_refused,
        });
    }
    status
}

async fn status(State(app): State<App>) -> Json<serde_json::Value> {
    Json(status_json(&app.daemon))
}

// Each changing handler takes the body as `Bytes`, even though it ignores it: reading it is
// what makes `DefaultBodyLimit` answer 413 to an oversized request instead of acting on it.
async fn reload(State(app): State<App>, _body: Bytes) -> Response {
    match app.daemon.reload().await {
        Ok(()) => (StatusCode::OK, "reloaded\n").into_response(),
        Err(e @ ReloadError::Invalid(_)) => {
            (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response()
        }
        Err(e) => (StatusCode::CONFLICT, format!("{}\n", e.detail())).into_response(),
    }
}

async fn drain(
    State(app): State<App>,
    Path((service, backend)): Path<(String, String)>,
) -> Response {
    set_drained(&app, &service, &backend, true)
}

async fn undrain(
    State(app): State<App>,
    Path((service, backend)): Path<(String, String)>,
) -> Response {
    set_drained(&app, &service, &backend, false)
}

fn set_drained(app: &App, service: &str, backend: &str, drained: bool) -> Response {
    let Ok(address) = backend.parse::<SocketAddr>() else {
        return (
            StatusCode::BAD_REQUEST,
            format!("{backend:?} is not an address such as 10.0.0.11:80\n"),
        )
            .into_response();
    };
    match app.daemon.set_drained(service, address, drained) {
        Ok(()) => (
            StatusCode::OK,
            if drained { "draining\n" } else { "undrained\n" },
        )
            .into_response(),
        Err(e) => (StatusCode::NOT_FOUND, format!("{e}\n")).into_response(),
    }
}

//! The byte relay between a client and its backend: both directions at once, half-close and
//! resets passed on, idle timeout, forced close at the end of a drain.
//!
//! Bytes move with splice(2) through a pipe borrowed from a [`PipePool`] only while they are in
//! flight (zero-copy: they never enter userspace), or with plain reads and writes through a
//! small buffer ([`RelayMode::Copy`]), which `cargo xtask bench` compares.
//!
//! Semantics (the same for every dataplane):
//! - EOF from one side becomes `shutdown(SHUT_WR)` toward the other once every byte read before
//!   it has been written; the other direction keeps flowing until it ends too.
//! - A reset (or any read error) from one side becomes a reset toward the other (SO_LINGER 0).
//!   A write error toward one side means that side is gone: the other side gets a reset.

use std::{
    io,
    sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use tokio::{
    io::{Interest, Ready},
    net::TcpStream,
    sync::Notify,
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use super::pipes::{Pipe, PipePool};
use crate::sys;

/// How bytes are moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayMode {
    /// Each direction copies small messages through a pooled buffer and switches to splice
    /// while reads fill that buffer (bulk), back again when they come back small. Measured
    /// here: copying wins on request/response traffic (fewer steps per message), splice on
    /// bulk (no copies through userspace). The default.
    Adaptive,
    /// splice(2) through pooled pipes, always.
    Splice,
    /// read(2)/write(2) through pooled buffers, always.
    Copy,
}

/// How a relayed connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions ended with EOF.
    Closed,
    /// The client reset or failed; the backend was reset.
    ClientFailed,
    /// The backend reset or failed; the client was reset.
    BackendFailed,
    /// No bytes either way for `idle_timeout`.
    IdleTimeout,
    /// The drain deadline passed during shutdown.
    Shutdown,
}

/// Which side failed, and how.
#[derive(Debug)]
pub(super) enum DirError {
    /// Reading the source failed (it reset, or errored).
    Source(io::Error),
    /// Writing the destination failed (it is gone).
    Dest(io::Error),
}

/// Byte counters of one relayed connection, shared with the backend's totals.
#[derive(Clone, Copy)]
pub struct Counters<'a> {
    pub to_backend: &'a AtomicU64,
    pub to_client: &'a AtomicU64,
}

/// What a relay needs besides its two sockets: how it moves bytes, where it counts them, how
/// long it may idle, and the daemon's signal to close at once.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    pub mode: RelayMode,
    pub pool: &'a PipePool,
    pub counters: Counters<'a>,
    pub idle_timeout: Duration,
    pub force_close: &'a CancellationToken,
}

/// Relays until both directions end, a side fails, the connection idles out, or `force_close`
/// fires. Both sockets are closed when this returns (with a reset where one is due).
pub async fn relay(client: TcpStream, backend: TcpStream, cx: Context<'_>) -> Outcome {
    match relay_until(&client, &backend, cx, None).await {
        Step::Ended(outcome) => outcome,
        Step::Promote { .. } => unreachable!("no promotion without promote_after"),
    }
}

/// How [`relay_until`] returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Ended(Outcome),
    /// `promote_after` bytes have moved and both directions are open, stopped between two
    /// steps: nothing read is unwritten. The sockets are ready to be handed over. The bytes
    /// this relay read from the client (`up`) and from the backend (`down`).
    Promote {
        up: u64,
        down: u64,
    },
}

/// [`relay`] on borrowed sockets, which stops early, once `promote_after` bytes have moved
/// both ways, to hand the connection to the kernel (the sockmap dataplane's
/// `promote_after_bytes`). On `Step::Ended` a reset is armed where one is due.
pub async fn relay_until(
    client: &TcpStream,
    backend: &TcpStream,
    cx: Context<'_>,
    promote_after: Option<u64>,
) -> Step {
    let Context {
        mode,
        pool,
        counters,
        idle_timeout,
        force_close,
    } = cx;
    let start = Instant::now();
    // Milliseconds since `start` of the last byte moved either way.
    let activity = AtomicU64::new(0);
    let promote = Promotion {
        after: promote_after.unwrap_or(u64::MAX),
        moved: AtomicU64::new(0),
        asked: AtomicBool::new(false),
        ask: Notify::new(),
    };
    // What this relay moved each way, beside the backend's shared totals.
    let (moved_up, moved_down) = (AtomicU64::new(0), AtomicU64::new(0));
    let dir = |src, dst, bytes, promote| {
        direction(src, dst, mode, pool, bytes, &activity, start, promote)
    };
    // Without a threshold the directions never look at `promote` (no per-step cost).
    let promoting = promote_after.map(|_| &promote);
    let up = dir(client, backend, [counters.to_backend, &moved_up], promoting);
    let down = dir(
        backend,
        client,
        [counters.to_client, &moved_down],
        promoting,
    );
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    let (mut up_paused, mut down_paused) = (false, false);
    // When the first direction paused for the promotion, and whether the promotion was given
    // up: a paused direction relays nothing, so it must not wait for one that cannot reach a
    // pause (blocked writing to a peer that itself waits for the paused direction's bytes).
    let mut paused_at: Option<Instant> = None;
    let mut abandoned = false;
    loop {
        // Saturating: a clock reading plus a long timeout must not overflow (validation bounds
        // every duration to a year; this keeps a panic out of the data path regardless).
        let deadline = start
            .checked_add(Duration::from_millis(activity.load(Relaxed)) + idle_timeout)
            .unwrap_or_else(|| start + Duration::from_secs(365 * 24 * 3600));
        let give_up = paused_at.map_or(deadline, |at| at + PROMOTE_WAIT);
        tokio::select! {
            () = tokio::time::sleep_until(give_up), if paused_at.is_some() && !abandoned => {
                tracing::debug!("the promotion did not find both directions quiet within {PROMOTE_WAIT:?}; the connection stays in userspace");
                abandoned = true;
            }
            r = &mut up, if !up_done && !up_paused => match r {
                Ok(DirEnd::Eof) => {
                    up_done = true;
                    if let Err(e) = pass_fin(backend, down_done) {
                        return Step::Ended(fail(client, Outcome::BackendFailed, &e));
                    }
                }
                Ok(DirEnd::Paused) => up_paused = true,
                Err(DirError::Source(e)) => return Step::Ended(fail(backend, Outcome::ClientFailed, &e)),
                Err(DirError::Dest(e)) => return Step::Ended(fail(client, Outcome::BackendFailed, &e)),
            },
            r = &mut down, if !down_done && !down_paused => match r {
                Ok(DirEnd::Eof) => {
                    down_done = true;
                    if let Err(e) = pass_fin(client, up_done) {
                        return Step::Ended(fail(backend, Outcome::ClientFailed, &e));
                    }
                }
                Ok(DirEnd::Paused) => down_paused = true,
                Err(DirError::Source(e)) => return Step::Ended(fail(client, Outcome::BackendFailed, &e)),
                Err(DirError::Dest(e)) => return Step::Ended(fail(backend, Outcome::ClientFailed, &e)),
            },
            () = tokio::time::sleep_until(deadline) => {
                let idle = start.elapsed().saturating_sub(Duration::from_millis(activity.load(Relaxed)));
                if idle >= idle_timeout {
                    return Step::Ended(Outcome::IdleTimeout);
                }
            }
            () = force_close.cancelled() => return Step::Ended(Outcome::Shutdown),
        }
        if up_paused && down_paused && !abandoned {
            return Step::Promote {
                up: moved_up.load(Relaxed),
                down: moved_down.load(Relaxed),
            };
        }
        if (up_paused || down_paused) && paused_at.is_none() {
            paused_at = Some(Instant::now());
        }
        // A paused direction carries on here, without a promotion, when the promotion was
        // given up (now, or when the other pauses later), or when the other direction ended
        // (its FIN is passed on already: too late to hand the connection over).
        if up_paused && (abandoned || down_done) {
            up.set(dir(client, backend, [counters.to_backend, &moved_up], None));
            up_paused = false;
        }
        if down_paused && (abandoned || up_done) {
            down.set(dir(
                backend,
                client,
                [counters.to_client, &moved_down],
                None,
            ));
            down_paused = false;
        }
        if up_done && down_done {
            return Step::Ended(Outcome::Closed);
        }
    }
}

/// Passes a half-close on to `dst` (`shutdown(SHUT_WR)`) once every byte before it has been
/// written, unless the other direction has ended too (`last`): then the relay returns and
/// closes both sockets at once, and close(2) sends the same FIN (both receive queues are empty
/// after EOF, so it is a FIN, never a reset). One system call less per connection.
fn pass_fin(dst: &TcpStream, last: bool) -> io::Result<()> {
    if last {
        return Ok(());
    }
    socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write)
}

/// How long a direction that paused for the promotion waits for the other to pause too.
const PROMOTE_WAIT: Duration = Duration::from_millis(200);

/// A relay's promotion: bytes moved so far, and whether the directions were asked to stop.
struct Promotion {
    after: u64,
    moved: AtomicU64,
    asked: AtomicBool,
    ask: Notify,
}

/// How a direction ended without an error.
enum DirEnd {
    /// EOF from the source, every byte before it written; the caller passes the FIN on
    /// ([`pass_fin`]).
    Eof,
    /// Stopped for a promotion, between two steps.
    Paused,
}

/// Arms a reset toward `peer` (sent when the relay drops the sockets) and reports.
pub(super) fn fail(peer: &TcpStream, outcome: Outcome, error: &io::Error) -> Outcome {
    tracing::debug!(?outcome, %error, "relay ended by a failure; resetting the other side");
    sys::reset_on_close(peer);
    outcome
}

/// Moves bytes from `src` to `dst` until EOF on `src`, then passes the FIN on; or, with
/// `promote`, stops between two steps once the connection has moved enough bytes.
#[expect(clippy::too_many_arguments, reason = "one direction's whole context")]
async fn direction(
    src: &TcpStream,
    dst: &TcpStream,
    mode: RelayMode,
    pool: &PipePool,
    bytes: [&AtomicU64; 2],
    activity: &AtomicU64,
    start: Instant,
    promote: Option<&Promotion>,
) -> Result<DirEnd, DirError> {
    let mut splicing = mode == RelayMode::Splice;
    loop {
        let ready = match promote {
            Some(p) => {
                // Created before the check, so a request made in between still wakes it.
                let asked = p.ask.notified();
                if p.asked.load(Relaxed) {
                    // Stop only with nothing unread: a read that took part of an skb leaves
                    // the rest of it queued, and once the socket is in a sockmap the kernel
                    // hands that whole skb to the verdict program, the bytes already relayed
                    // here included (tcp_read_skb ignores how much of it was read): they
                    // would reach the peer twice. Bytes that arrive after this check come in
                    // whole skbs that nothing has read.
                    if sys::tcp_bytes_unread(src).map_err(DirError::Source)? == 0 {
                        return Ok(DirEnd::Paused);
                    }
                    src.ready(Interest::READABLE)
                        .await
                        .map_err(DirError::Source)?
                } else {
                    tokio::select! {
                        () = asked => continue,
                        r = src.ready(Interest::READABLE) => r.map_err(DirError::Source)?,
                    }
                }
            }
            None => src
                .ready(Interest::READABLE)
                .await
                .map_err(DirError::Source)?,
        };
        let moved = if splicing {
            match splice_step(src, dst, pool).await? {
                Spliced::Moved(moved) => moved,
                // No descriptor for a pipe: this step copies (it costs none).
                Spliced::NoPipe => copy_step(src, dst, Some(ready), pool).await?,
            }
        } else {
            copy_step(src, dst, Some(ready), pool).await?
        };
        match moved {
            None => continue,
            Some(0) => break,
            Some(n) => {
                for b in bytes {
                    b.fetch_add(n as u64, Relaxed);
                }
                touch(activity, start);
                if mode == RelayMode::Adaptive {
                    // Bulk while a read fills the copy buffer; small again below it.
                    splicing = n >= pool.buffer_size();
                }
                if let Some(p) = promote
                    && p.moved.fetch_add(n as u64, Relaxed) + n as u64 >= p.after
                {
                    p.asked.store(true, Relaxed);
                    p.ask.notify_waiters();
                }
            }
        }
    }
    // Every byte read before EOF has been written: the caller passes the half-close on.
    Ok(DirEnd::Eof)
}

fn touch(activity: &AtomicU64, start: Instant) {
    activity.store(
        u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
        Relaxed,
    );
}

/// What a splice step did.
enum Spliced {
    /// `None`: nothing to read after all; `Some(0)`: EOF; `Some(n)`: `n` bytes moved.
    Moved(Option<usize>),
    /// lb has no descriptor for a pipe (its own shortage, not the connection's): nothing
    /// was read, and the caller copies this step instead.
    NoPipe,
}

/// One splice from `src` into a pooled pipe and on to `dst`.
async fn splice_step(
    src: &TcpStream,
    dst: &TcpStream,
    pool: &PipePool,
) -> Result<Spliced, DirError> {
    let want = pool.pipe_size();
    // Borrow a pipe only once the socket says it has something (data or EOF).
    let pipe = match pool.get() {
        Ok(pipe) => pipe,
        Err(e) if sys::is_fd_exhaustion(&e) => {
            tracing::debug!(error = %e, "no descriptor for a pipe; copying instead");
            return Ok(Spliced::NoPipe);
        }
        Err(e) => return Err(DirError::Source(e)),
    };
    // Not `read_once`: a short splice does not mean the socket is drained. It stops when the
    // pipe runs out of slots (one per page fragment: a backend that answers with sendfile(2)
    // sends many small fragments), with bytes still queued and no new event to come for them.
    match src.try_io(Interest::READABLE, || {
        sys::splice_once(src, &pipe.write, want)
    }) {
        Ok(0) => {
            pool.put(pipe);
            Ok(Spliced::Moved(Some(0)))
        }
        Ok(n) => {
            // On a write error the pipe may still hold bytes: it is dropped, not reused.
            drain(&pipe, n, dst).await?;
            pool.put(pipe);
            Ok(Spliced::Moved(Some(n)))
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            pool.put(pipe);
            Ok(Spliced::Moved(None))
        }
        Err(e) => Err(DirError::Source(e)),
    }
}

/// One read from `src` into a pooled buffer, written on to `dst`. `None`: nothing to read
/// after all; `Some(0)`: EOF.
///
/// `ready`: the readiness event the read answers, when a short read means the socket is
/// drained (see [`read_once`]); `None` for a socket that has a psock (a sockmap's), whose
/// reads return the bytes the verdict program passed up without looking at the receive
/// queue behind them: there a short read proves nothing, and clearing readiness on it can
/// leave bytes unread with no event to come.
pub(super) async fn copy_step(
    src: &TcpStream,
    dst: &TcpStream,
    ready: Option<Ready>,
    pool: &PipePool,
) -> Result<Option<usize>, DirError> {
    let mut buf = pool.get_buffer();
    let want = buf.len();
    let read = || {
        use std::io::Read as _;
        (&*socket2::SockRef::from(src)).read(&mut buf)
    };
    let n = match ready {
        Some(ready) => read_once(src, ready, want, read),
        None => src.try_io(Interest::READABLE, read),
    };
    let n = match n {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            pool.put_buffer(buf);
            return Ok(None);
        }
        Err(e) => return Err(DirError::Source(e)),
    };
    let mut off = 0;
    while off < n {
        dst.writable().await.map_err(DirError::Dest)?;
        match dst.try_write(&buf[off..n]) {
            Ok(m) => off += m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(DirError::Dest(e)),
        }
    }
    pool.put_buffer(buf);
    Ok(Some(n))
}

/// One read (or splice) from `src` through `op`, which asks for `want` bytes.
///
/// A read(2) that comes back short (some bytes, fewer than asked for) has drained the socket
/// (TCP copies until its receive queue is empty or the buffer is full; splice(2) does not): the
/// next call would only return EAGAIN. So the short result is reported to tokio as WouldBlock,
/// which clears the socket's readiness without that extra syscall (measured: a third of the
/// relay's splice calls were such EAGAINs on small request/response traffic), and the bytes
/// are returned as read. tokio clears only the readiness event `ready` came from: bytes that
/// arrived since raise a new event and are not missed. An EOF already signalled in that event
/// (`is_read_closed`) keeps readiness, so the next call sees it.
fn read_once(
    src: &TcpStream,
    ready: Ready,
    want: usize,
    mut op: impl FnMut() -> io::Result<usize>,
) -> io::Result<usize> {
    let mut short = None;
    let result = src.try_io(Interest::READABLE, || {
        let n = op()?;
        if n > 0 && n < want && !ready.is_read_closed() {
            short = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (result, short) {
        (Err(_), Some(n)) => Ok(n),
        (result, _) => result,
    }
}

/// Writes the `n` bytes waiting in `pipe` to `dst`.
async fn drain(pipe: &Pipe, mut n: usize, dst: &TcpStream) -> Result<(), DirError> {
    while n > 0 {
        dst.writable().await.map_err(DirError::Dest)?;
        match dst.try_io(Interest::WRITABLE, || sys::splice_once(&pipe.read, dst, n)) {
            Ok(m) => n -= m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(DirError::Dest(e)),
        }
    }
    Ok(())
}

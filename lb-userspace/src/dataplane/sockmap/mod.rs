//! The sockmap dataplane: the daemon accepts, picks, connects (retries, PROXY header) as in
//! the proxy dataplane, then hands the socket pair to the kernel, where `lb_sk_verdict`
//! redirects every skb that arrives on one socket to the other's egress. Userspace never
//! touches those bytes; it only watches each socket for EOF and errors.
//!
//! Handing a pair over ([`Sockmap::relay`]), only when both sockets are ESTABLISHED:
//! 1. each socket's peer goes into `SK_PEERS` (cookie -> peer cookie, byte counts), then both
//!    sockets into `SK_SOCKS`, where the program starts to see their bytes.
//! 2. bytes that were queued before the insertion (a client that sends before the backend
//!    connect completes) are run through the program at once (`sys::kick_receive_queue`).
//! 3. order: a byte the program could not redirect (its peer was not in `SK_SOCKS` yet) is
//!    passed up to the socket's own queue, and so is every later byte of that direction until
//!    the daemon has relayed them all (it reports its count in `SK_CTRL`). The daemon relays
//!    passed-up bytes only once every redirected byte before them has reached the peer.
//! 4. back pressure: the kernel's redirect queue has no bound of its own (measured here:
//!    4 GiB in 20 s toward a frozen backend). The daemon watches each direction's backlog
//!    (bytes redirected that have not reached the peer's send queue). Past 4 MiB the
//!    direction is held (`SK_CTRL.hold`): bytes are passed up, where they count against the
//!    socket's receive buffer, so TCP's window closes on the sender, and the daemon relays
//!    them as the peer takes them. Below 1 MiB the kernel redirects again. A connection never
//!    leaves the kernel path once on it: a hand-back to the splice relay was tried and taken
//!    out (a socket leaving a sockmap loses the bytes and the FIN its psock still holds; see
//!    README "Why a bulk connection is not handed back").
//! 5. EOF on one socket: once every byte it received has reached the other socket's send
//!    queue (the program's byte count against the peer's `tcpi_bytes_acked` + SIOCOUTQ), the
//!    FIN is passed on with `shutdown(SHUT_WR)`; the other direction keeps flowing.
//! 6. a reset or error on one socket resets the other (SO_LINGER 0).
//! 7. both directions done: both entries leave every map and the sockets close.
//!
//! Never splice(2) a socket that is in `SK_SOCKS`: the relay here only reads and writes.

mod btf;

use std::{
    io,
    path::{Path, PathBuf},
    sync::{
        Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, Map, MapData, MapError, PerCpuArray, SockHash},
    programs::{ProgramError, SkSkb},
};
use lb_common::{SkCtrl, SkEvent, SockPeer, names};
use tokio::{io::Interest, net::TcpStream, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{
    pipes::PipePool,
    relay::{self, Counters, DirError, Outcome, fail},
};
use crate::sys;

/// The object built by build.rs from `lb-ebpf` (`src/sockmap.rs`).
static SOCKMAP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-sockmap"));

/// The maps this dataplane pins under `pin_path`.
const MAP_NAMES: [&str; 4] = [
    names::SK_SOCKS,
    names::SK_PEERS,
    names::SK_CTRL,
    names::SK_STATS,
];

/// Errors loading or using the sockmap dataplane.
#[derive(Debug, thiserror::Error)]
pub enum SockmapError {
    #[error("cannot create the pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the stale pin {path}")]
    Unpin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot load the sockmap eBPF object (CAP_BPF and CAP_NET_ADMIN are needed)")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("the sockmap object has no {what} {name}")]
    Missing {
        what: &'static str,
        name: &'static str,
    },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot pin map {name} at {path}")]
    Pin {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("socket")]
    Socket(#[source] io::Error),
    #[error(
        "cannot find in the kernel's BTF the fields the verdict program reads to cut repeated \
         bytes (without them a retransmit can reach the peer twice)"
    )]
    Btf(#[source] btf::BtfError),
    #[error("start-up self-test failed: {0}")]
    SelfTest(String),
}

/// The loaded sockmap program and its maps; the one owner of these kernel objects.
pub struct Sockmap {
    socks: Mutex<SockHash<MapData, u64>>,
    peers: RwLock<BpfHashMap<MapData, u64, SockPeer>>,
    ctrl: Mutex<BpfHashMap<MapData, u64, SkCtrl>>,
    stats: PerCpuArray<MapData, u64>,
    /// Connections handed to the kernel.
    pub handed: AtomicU64,
    /// Connections that could not be handed over (a map full, ...) and were relayed in
    /// userspace instead.
    pub kept: AtomicU64,
    /// Back-pressure holds (a peer fell behind and the connection could not leave).
    pub holds: AtomicU64,
    /// `SK_STATS` after the self-test: the metrics count clients' traffic only.
    baseline: [u64; SkEvent::COUNT as usize],
    /// Our pins and the ids of the maps they name: removed on drop if still ours.
    pinned: Vec<(PathBuf, Option<u32>)>,
    /// Owns the program and its attachment to `SK_SOCKS` (detached on drop).
    _ebpf: Ebpf,
}

impl Drop for Sockmap {
    /// The maps describe this daemon's connections, which end with it: unpin them, unless
    /// another daemon has pinned its own under the same names since.
    fn drop(&mut self) {
        for (path, id) in &self.pinned {
            let still_ours = MapData::from_pin(path)
                .ok()
                .and_then(|m| m.info().ok())
                .map(|info| info.id());
            if id.is_some() && still_ours == *id {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

impl std::fmt::Debug for Sockmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sockmap")
            .field("handed", &self.handed)
            .field("kept", &self.kept)
            .finish_non_exhaustive()
    }
}

/// Where the verdict program finds an skb's TCP sequence number and its socket's
/// `copied_seq` on this kernel (see `lb_sk_verdict`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqOffsets {
    pub skb_cb: u32,
    pub skb_sk: u32,
    pub tcp_copied_seq: u32,
}

impl SeqOffsets {
    pub fn of_kernel() -> Result<SeqOffsets, btf::BtfError> {
        let btf = btf::Btf::kernel()?;
        Ok(SeqOffsets {
            skb_cb: btf.offset_of("sk_buff", "cb")?,
            skb_sk: btf.offset_of("sk_buff", "sk")?,
            tcp_copied_seq: btf.offset_of("tcp_sock", "copied_seq")?,
        })
    }
}

impl Sockmap {
    /// Loads the program, pins fresh maps under `pin_dir` (replacing pins a previous daemon
    /// left: its connections died with it) sized for `max_sockets`, and attaches the verdict
    /// program to `SK_SOCKS`.
    pub fn load(pin_dir: &Path, max_sockets: u32) -> Result<Sockmap, SockmapError> {
        create_pin_dir(pin_dir)?;
        remove_pins(pin_dir)?;
        let offsets = SeqOffsets::of_kernel().map_err(SockmapError::Btf)?;
        let mut ebpf = EbpfLoader::new()
            .override_global(names::SK_OFF_CB, &offsets.skb_cb, true)
            .override_global(names::SK_OFF_SK, &offsets.skb_sk, true)
            .override_global(names::SK_OFF_COPIED, &offsets.tcp_copied_seq, true)
            .map_max_entries(names::SK_SOCKS, max_sockets)
            .map_max_entries(names::SK_CTRL, max_sockets)
            .map_max_entries(names::SK_PEERS, max_sockets)
            .load(SOCKMAP_OBJECT)
            .map_err(|e| SockmapError::Load(Box::new(e)))?;
        let mut pinned = Vec::new();
        for name in MAP_NAMES {
            let map: &Map = ebpf
                .map(name)
                .ok_or(SockmapError::Missing { what: "map", name })?;
            let path = pin_dir.join(name);
            pin(map, &path, name)?;
            pinned.push((path, map_id(map)));
        }
        let socks: SockHash<MapData, u64> = take(&mut ebpf, names::SK_SOCKS)?;
        let ctrl: BpfHashMap<MapData, u64, SkCtrl> = take(&mut ebpf, names::SK_CTRL)?;
        let peers: BpfHashMap<MapData, u64, SockPeer> = take(&mut ebpf, names::SK_PEERS)?;
        let stats: PerCpuArray<MapData, u64> = take(&mut ebpf, names::SK_STATS)?;
        let program_err = |source| SockmapError::Program {
            name: names::SK_PROG,
            source,
        };
        let program: &mut SkSkb = ebpf
            .program_mut(names::SK_PROG)
            .ok_or(SockmapError::Missing {
                what: "program",
                name: names::SK_PROG,
            })?
            .try_into()
            .map_err(program_err)?;
        program.load().map_err(program_err)?;
        program.attach(socks.fd()).map_err(program_err)?;
        Ok(Sockmap {
            socks: Mutex::new(socks),
            ctrl: Mutex::new(ctrl),
            peers: RwLock::new(peers),
            stats,
            handed: AtomicU64::new(0),
            kept: AtomicU64::new(0),
            holds: AtomicU64::new(0),
            baseline: [0; SkEvent::COUNT as usize],
            pinned,
            _ebpf: ebpf,
        })
    }

    /// The per-CPU counters of the verdict program, summed, in [`SkEvent::ALL`] order, since
    /// the self-test.
    pub fn events(&self) -> Result<[u64; SkEvent::COUNT as usize], SockmapError> {
        let mut out = self.raw_events()?;
        for (v, base) in out.iter_mut().zip(self.baseline) {
            *v = v.saturating_sub(base);
        }
        Ok(out)
    }

    /// Starts the counters from zero (after the self-test).
    pub fn reset_counters(&mut self) -> Result<(), SockmapError> {
        self.baseline = self.raw_events()?;
        for c in [&self.handed, &self.kept, &self.holds] {
            c.store(0, Relaxed);
        }
        Ok(())
    }

    fn raw_events(&self) -> Result<[u64; SkEvent::COUNT as usize], SockmapError> {
        let mut out = [0; SkEvent::COUNT as usize];
        for event in SkEvent::ALL {
            out[event as usize] = self
                .stats
                .get(&(event as u32), 0)
                .map_err(|source| SockmapError::Map {
                    name: names::SK_STATS,
                    source,
                })?
                .iter()
                .sum();
        }
        Ok(out)
    }

    /// The `SK_PEERS` entry of `cookie`.
    fn peer(&self, cookie: u64) -> Result<SockPeer, MapError> {
        let peers = self.peers.read().unwrap_or_else(|e| e.into_inner());
        peers.get(&cookie, 0)
    }

    /// Puts both sockets in the maps: peers first, so the program finds every socket's
    /// entry, then `b` (the backend), then `a` (the client). Returns the cookies, and whether
    /// `a` went in.
    ///
    /// When `b` is in and `a` cannot follow (it has just seen a FIN: a socket in CLOSE_WAIT
    /// cannot enter a sockmap), `b` stays in: the program has been passing its bytes up
    /// into its psock since it went in (its peer is missing), and the psock, bytes and all,
    /// would go with it if it left. The daemon reads them from there and relays `a`'s
    /// direction itself ([`Dir::in_kernel`] false). On any other error nothing is left behind.
    fn insert(&self, a: &TcpStream, b: &TcpStream) -> Result<(u64, u64, bool), SockmapError> {
        use std::os::fd::AsRawFd as _;
        let ca = sys::socket_cookie(a).map_err(SockmapError::Socket)?;
        let cb = sys::socket_cookie(b).map_err(SockmapError::Socket)?;
        let entry = |peer_cookie| SockPeer {
            peer_cookie,
            ..SockPeer::default()
        };
        let map_err = |name| move |source| SockmapError::Map { name, source };
        let inserted = {
            let mut peers = self.peers.write().unwrap_or_else(|e| e.into_inner());
            peers
                .insert(ca, entry(cb), 0)
                .and_then(|()| peers.insert(cb, entry(ca), 0))
                .map_err(map_err(names::SK_PEERS))
        }
        .and_then(|()| {
            let mut socks = self.socks.lock().unwrap_or_else(|e| e.into_inner());
            // `b` (the backend) first: a client byte that arrives between the two insertions
            // then just waits in the queue for the kick below, rather than meeting the program
            // while its peer is missing and being passed up to the daemon.
            socks
                .insert(cb, b.as_raw_fd(), 0)
                .map_err(map_err(names::SK_SOCKS))?;
            if let Some(delay) = insert_delay() {
                std::thread::sleep(delay);
            }
            Ok(match socks.insert(ca, a.as_raw_fd(), 0) {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!(error = %e, "the client socket cannot follow the backend's into SK_SOCKS; the daemon relays the client's bytes");
                    false
                }
            })
        })
        // Bytes that arrived before the insertion wait in the receive queues: run them
        // through the program now (a read would too, but see `kick_receive_queue`).
        .and_then(|a_in| {
            sys::kick_receive_queue(a)
                .and_then(|()| sys::kick_receive_queue(b))
                .map_err(SockmapError::Socket)?;
            Ok(a_in)
        });
        match inserted {
            Ok(a_in) => Ok((ca, cb, a_in)),
            Err(e) => {
                self.forget(ca, cb);
                Err(e)
            }
        }
    }

    /// Takes both sockets out of every map.
    fn forget(&self, ca: u64, cb: u64) {
        {
            // Absent already where the kernel unhashed a socket as it closed.
            let mut socks = self.socks.lock().unwrap_or_else(|e| e.into_inner());
            let _ = socks.remove(&ca);
            let _ = socks.remove(&cb);
        }
        {
            let mut ctrl = self.ctrl.lock().unwrap_or_else(|e| e.into_inner());
            let _ = ctrl.remove(&ca);
            let _ = ctrl.remove(&cb);
        }
        let mut peers = self.peers.write().unwrap_or_else(|e| e.into_inner());
        let _ = peers.remove(&ca);
        let _ = peers.remove(&cb);
    }

    /// Tells the program about `dir`: held or not, and the bytes the daemon has relayed.
    fn set_ctrl(&self, dir: &Dir<'_>) -> Result<(), SockmapError> {
        let value = SkCtrl {
            hold: u32::from(dir.held.load(Relaxed)),
            _pad: 0,
            user_bytes: dir.copied.load(Relaxed),
        };
        let mut ctrl = self.ctrl.lock().unwrap_or_else(|e| e.into_inner());
        ctrl.insert(dir.src_cookie, value, 0)
            .map_err(|source| SockmapError::Map {
                name: names::SK_CTRL,
                source,
            })
    }

    /// Hands `client` and `backend` to the kernel and watches them until both directions
    /// end, a side fails, the connection idles out, or `force_close` fires. Bytes already
    /// written to the backend (the PROXY header) are accounted for. When the pair cannot be
    /// handed over it is relayed in userspace ([`relay::relay`]), counted in `kept`.
    /// `relayed_before`: the bytes the userspace relay read from the client and from the
    /// backend before the hand-over.
    pub async fn relay(
        &self,
        client: TcpStream,
        backend: TcpStream,
        relayed_before: (u64, u64),
        cx: relay::Context<'_>,
    ) -> Outcome {
        let relay::Context {
            pool,
            counters,
            idle_timeout,
            force_close,
            ..
        } = cx;
        // What cannot be handed over is relayed here, copying small reads and splicing bulk.
        let fallback = relay::Context {
            mode: relay::RelayMode::Adaptive,
            ..cx
        };
        // What each send queue held before the kernel started to feed it.
        let bases = sys::tcp_bytes_queued(&backend).and_then(|b| {
            let c = sys::tcp_bytes_queued(&client)?;
            Ok((b, c))
        });
        // Only two ESTABLISHED sockets go in: a socket that has seen a FIN cannot enter a
        // sockmap. A FIN that arrives on the client between this check and its insertion is
        // handled by `insert` (the backend's socket stays in, the daemon relays the client).
        let established = sys::tcp_established(&client)
            .and_then(|c| Ok(c && sys::tcp_established(&backend)?))
            .map_err(SockmapError::Socket);
        let inserted = match established {
            Ok(true) => bases
                .map_err(SockmapError::Socket)
                .and_then(|bases| Ok((bases, self.insert(&client, &backend)?))),
            Ok(false) => Err(SockmapError::Socket(io::Error::other(
                "a side has sent its FIN already",
            ))),
            Err(e) => Err(e),
        };
        let ((backend_base, client_base), (cc, cb, client_in)) = match inserted {
            Ok(v) => v,
            Err(e) => {
                self.kept.fetch_add(1, Relaxed);
                // Typically a side that has already sent its FIN (a socket in CLOSE_WAIT cannot
                // enter a sockmap); counted in lb_sockmap_connections_total.
                tracing::debug!(error = %crate::sys::error_chain(&e), "cannot hand the connection to the kernel; relaying it in userspace");
                return relay::relay(client, backend, fallback).await;
            }
        };
        self.handed.fetch_add(1, Relaxed);
        let (up_before, down_before) = relayed_before;
        let mut up = Dir::new(
            &client,
            &backend,
            cc,
            backend_base,
            up_before,
            counters.to_backend,
        );
        up.in_kernel = client_in;
        let down = Dir::new(
            &backend,
            &client,
            cb,
            client_base,
            down_before,
            counters.to_client,
        );
        let outcome = self
            .watch(&up, &down, pool, idle_timeout, force_close)
            .await;
        // Final counts, then out of the maps before the sockets close.
        for dir in [&up, &down] {
            let _ = self.account(dir);
        }
        self.forget(cc, cb);
        outcome
    }

    /// Adds what the kernel redirected for `dir` since the last call to the backend's
    /// counters; returns the kernel's total and the delta.
    fn account(&self, dir: &Dir<'_>) -> Result<(u64, u64), MapError> {
        let total = self.peer(dir.src_cookie)?.bytes;
        let delta = total.saturating_sub(dir.counted.swap(total, Relaxed));
        dir.bytes.fetch_add(delta, Relaxed);
        Ok((total, delta))
    }

    /// Bytes relayed for `dir` (by the kernel, whose total is `kernel`, or the daemon) that
    /// have not reached the send queue of `dir.dst` yet: the kernel's redirect queue.
    fn backlog(&self, dir: &Dir<'_>, kernel: u64) -> io::Result<u64> {
        let queued = sys::tcp_bytes_queued(dir.dst)?.saturating_sub(dir.dst_base);
        Ok((kernel + dir.copied.load(Relaxed)).saturating_sub(queued))
    }

    /// After a FIN on `dir.src`: has every byte before it been through the program, and
    /// has the daemon read every byte the program passed up? If not, runs the program over
    /// what waits and gives the kernel a moment (a few ms), then answers `false`. After 2 s
    /// of `false` (`since` keeps the time) it warns and answers `true`: a FIN is not held
    /// forever on a count that does not add up.
    async fn all_seen(&self, dir: &Dir<'_>, since: &mut Option<Instant>) -> Result<bool, DirError> {
        let source = |e: io::Error| DirError::Source(e);
        if !dir.in_kernel {
            // A plain socket reads EOF only after every byte before the FIN.
            return Ok(true);
        }
        let since = *since.get_or_insert_with(Instant::now);
        if since.elapsed() > Duration::from_secs(2) {
            tracing::warn!(
                "sockmap: the byte counts at EOF do not add up after 2 s; passing the FIN on"
            );
            return Ok(true);
        }
        for attempt in 0..8u32 {
            let peer = self
                .peer(dir.src_cookie)
                .map_err(|e| source(io::Error::other(e)))?;
            // A FIN counts as one byte in `tcpi_bytes_received`; bytes read before the
            // hand-over never went through the program.
            let received = sys::tcp_bytes_received(dir.src)
                .map_err(source)?
                .saturating_sub(1 + dir.read_before);
            let seen = peer.bytes + peer.passed_bytes >= received;
            if seen && peer.passed_bytes <= dir.copied.load(Relaxed) {
                return Ok(true);
            }
            if seen {
                // Passed-up bytes to read first: the caller's read loop takes them.
                return Ok(false);
            }
            sys::kick_receive_queue(dir.src).map_err(source)?;
            tokio::time::sleep(Duration::from_micros(100) * 2u32.pow(attempt)).await;
        }
        Ok(false)
    }

    /// Waits until every byte the kernel redirected for `dir` has reached `dir.dst`'s send
    /// queue: before the daemon writes bytes of its own there, and before a FIN.
    async fn drained(&self, dir: &Dir<'_>) -> Result<(), DirError> {
        let mut wait = Duration::from_micros(100);
        loop {
            let kernel = self
                .peer(dir.src_cookie)
                .map(|p| p.bytes)
                .map_err(|e| DirError::Source(io::Error::other(e)))?;
            if self.backlog(dir, kernel).map_err(DirError::Dest)? == 0 {
                return Ok(());
            }
            if let Some(e) = dir.dst.take_error().map_err(DirError::Dest)? {
                return Err(DirError::Dest(e));
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(20));
        }
    }

    async fn watch(
        &self,
        up: &Dir<'_>,
        down: &Dir<'_>,
        pool: &PipePool,
        idle_timeout: Duration,
        force_close: &CancellationToken,
    ) -> Outcome {
        let up_run = self.direction(up, pool);
        let down_run = self.direction(down, pool);
        tokio::pin!(up_run, down_run);
        let (mut up_done, mut down_done) = (false, false);
        // The kernel's counts are read every `tick`: for back pressure, the metrics and the
        // idle timer. Fast while bytes flow or a direction is held, slower when quiet.
        let slowest = (idle_timeout / 4).clamp(TICK_FAST, Duration::from_secs(1));
        let mut tick = TICK_FAST;
        let timer = tokio::time::sleep(tick);
        tokio::pin!(timer);
        let mut last_activity = Instant::now();
        let mut copied_seen = 0;
        loop {
            tokio::select! {
                r = &mut up_run, if !up_done => match r {
                    Ok(()) => up_done = true,
                    Err(DirError::Source(e)) => return fail(up.dst, Outcome::ClientFailed, &e),
                    Err(DirError::Dest(e)) => return fail(up.src, Outcome::BackendFailed, &e),
                },
                r = &mut down_run, if !down_done => match r {
                    Ok(()) => down_done = true,
                    Err(DirError::Source(e)) => return fail(down.dst, Outcome::BackendFailed, &e),
                    Err(DirError::Dest(e)) => return fail(down.src, Outcome::ClientFailed, &e),
                },
                () = &mut timer => {
                    let mut moved = 0;
                    let mut held = false;
                    for (dir, done) in [(up, up_done), (down, down_done)] {
                        let Ok((kernel, delta)) = self.account(dir) else { continue };
                        moved += delta;
                        if done {
                            continue;
                        }
                        let backlog = match self.backlog(dir, kernel) {
                            Ok(b) => b,
                            Err(e) => {
                                tracing::debug!(error = %e, "sockmap backlog");
                                continue;
                            }
                        };
                        if let Err(e) = self.pressure(dir, backlog) {
                            tracing::warn!(error = %crate::sys::error_chain(&e), "sockmap back pressure");
                        }
                        held |= dir.held.load(Relaxed);
                    }
                    let copied = up.copied.load(Relaxed) + down.copied.load(Relaxed);
                    if moved > 0 || copied != copied_seen {
                        copied_seen = copied;
                        last_activity = Instant::now();
                    } else if last_activity.elapsed() >= idle_timeout {
                        return Outcome::IdleTimeout;
                    }
                    tick = if held || moved >= BUSY_BYTES { TICK_FAST } else { (tick * 2).min(slowest) };
                    timer.as_mut().reset(Instant::now() + tick);
                }
                () = force_close.cancelled() => return Outcome::Shutdown,
            }
            if up_done && down_done {
                return Outcome::Closed;
            }
        }
    }

    /// Holds `dir` when its peer has fallen [`BACKLOG_HIGH`] behind, lets it go below
    /// [`BACKLOG_LOW`]: the kernel's redirect queue has no bound of its own.
    fn pressure(&self, dir: &Dir<'_>, backlog: u64) -> Result<(), SockmapError> {
        let held = dir.held.load(Relaxed);
        if !held && backlog > BACKLOG_HIGH {
            tracing::debug!(backlog, "peer lags behind: holding the direction");
            dir.held.store(true, Relaxed);
            self.holds.fetch_add(1, Relaxed);
            self.set_ctrl(dir)?;
        } else if held && backlog <= BACKLOG_LOW {
            tracing::debug!(backlog, "peer caught up: the kernel redirects again");
            dir.held.store(false, Relaxed);
            self.set_ctrl(dir)?;
        }
        Ok(())
    }

    /// One direction, `src` to `dst`: bytes the kernel passed up to `src` are relayed here,
    /// each batch once every redirected byte before it has reached `dst`; at EOF the FIN is
    /// passed on the same way.
    async fn direction(&self, dir: &Dir<'_>, pool: &PipePool) -> Result<(), DirError> {
        let mut eof_since = None;
        loop {
            let ready = dir
                .src
                .ready(Interest::READABLE)
                .await
                .map_err(DirError::Source)?;

            // A wake-up means a FIN, an error, bytes passed up, or bytes the program has not
            // seen yet. Those must go through the program before any read: a read that finds
            // them runs the program itself and then rewinds `copied_seq` over what it
            // redirected (see `sys::kick_receive_queue`).
            sys::kick_receive_queue(dir.src).map_err(DirError::Source)?;
            // Passed-up bytes go after everything redirected before them.
            self.drained(dir).await?;
            match relay::copy_step(dir.src, dir.dst, Some(ready), pool).await? {
                None => {}
                // A FIN is TCP state, set when it arrives: bytes before it may still be on
                // their way through the program, or passed up and not yet readable.
                Some(0) if self.all_seen(dir, &mut eof_since).await? => break,
                Some(0) => {}
                Some(n) => {
                    dir.copied.fetch_add(n as u64, Relaxed);
                    dir.bytes.fetch_add(n as u64, Relaxed);
                    // Written to `dst`: the program may redirect again once it has seen this.
                    self.set_ctrl(dir)
                        .map_err(|e| DirError::Source(io::Error::other(e)))?;
                }
            }
        }
        // EOF: wait until `dst`'s send queue holds everything `src` received.
        self.drained(dir).await?;
        socket2::SockRef::from(dir.dst)
            .shutdown(std::net::Shutdown::Write)
            .map_err(DirError::Dest)
    }
}

/// The sockmap dataplane as the proxy's [`super::Handover`]: connections go to the kernel
/// once they have moved `after_bytes` in userspace (`promote_after_bytes`).
#[derive(Debug)]
pub struct KernelHandover {
    pub sockmap: std::sync::Arc<Sockmap>,
    pub after_bytes: u64,
}

impl super::Handover for KernelHandover {
    fn after_bytes(&self) -> u64 {
        self.after_bytes
    }

    fn take_over<'a>(
        &'a self,
        client: TcpStream,
        backend: TcpStream,
        relayed_before: (u64, u64),
        cx: relay::Context<'a>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send + 'a>> {
        Box::pin(self.sockmap.relay(client, backend, relayed_before, cx))
    }
}

/// Set in the environment (milliseconds): a pause between the backend's and the client's
/// insertion into `SK_SOCKS`, so that tests can land a FIN in it.
pub const INSERT_DELAY_ENV: &str = "LB_SOCKMAP_TEST_INSERT_DELAY_MS";

fn insert_delay() -> Option<Duration> {
    static DELAY: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        std::env::var(INSERT_DELAY_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
    })
}

/// Back pressure: a direction whose bytes wait in the kernel's redirect queue beyond this is
/// held (about one socket buffer), and let go at [`BACKLOG_LOW`].
const BACKLOG_HIGH: u64 = 4 << 20;
const BACKLOG_LOW: u64 = 1 << 20;
/// The watch interval while bytes flow (or a direction is held): how late a hold can be.
const TICK_FAST: Duration = Duration::from_millis(5);
/// Bytes per tick above which a connection counts as busy.
const BUSY_BYTES: u64 = 256 << 10;

/// One direction of a connection the kernel relays: `src`'s bytes go to `dst`.
struct Dir<'a> {
    src: &'a TcpStream,
    dst: &'a TcpStream,
    src_cookie: u64,
    /// [`sys::tcp_bytes_queued`] of `dst` before the hand-over.
    dst_base: u64,
    /// Bytes the daemon relayed itself (the kernel passed them up).
    copied: AtomicU64,
    /// Kernel bytes already added to `bytes`.
    counted: AtomicU64,
    /// The backend's counter for this direction.
    bytes: &'a AtomicU64,
    /// Held for back pressure: the program passes every byte up.
    held: AtomicBool,
    /// `src` is in `SK_SOCKS`. False only for a client that could not follow its backend in
    /// ([`Sockmap::insert`]): the daemon reads all its bytes itself.
    in_kernel: bool,
    /// Bytes the userspace relay read from `src` before the hand-over (`promote_after_bytes`):
    /// in `tcpi_bytes_received`, never seen by the program.
    read_before: u64,
}

impl<'a> Dir<'a> {
    fn new(
        src: &'a TcpStream,
        dst: &'a TcpStream,
        src_cookie: u64,
        dst_base: u64,
        read_before: u64,
        bytes: &'a AtomicU64,
    ) -> Dir<'a> {
        Dir {
            src,
            dst,
            src_cookie,
            dst_base,
            copied: AtomicU64::new(0),
            counted: AtomicU64::new(0),
            bytes,
            held: AtomicBool::new(false),
            read_before,
            in_kernel: true,
        }
    }
}

impl Sockmap {
    /// Proves the dataplane on this kernel before it serves: two connections over loopback
    /// are handed to the kernel exactly as clients' are, and must carry exact bytes both
    /// ways (including bytes sent before the hand-over), pass a half-close in each direction
    /// while the other keeps flowing, and end with EOF on both sides.
    pub async fn self_test(&self) -> Result<(), SockmapError> {
        let pool = PipePool::new(2, 64 * 1024, 16 * 1024);
        let run = async {
            self.self_test_pair(&pool, false).await?;
            self.self_test_pair(&pool, true).await
        };
        match tokio::time::timeout(Duration::from_secs(10), run).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(SockmapError::SelfTest(why)),
            Err(_) => Err(SockmapError::SelfTest(
                "no result within 10s (bytes or a FIN were not passed on)".to_owned(),
            )),
        }
    }

    /// One connection: `client_first` = the client half-closes first, else the backend.
    async fn self_test_pair(&self, pool: &PipePool, client_first: bool) -> Result<(), String> {
        use tokio::io::AsyncWriteExt as _;
        let io = |what: &'static str| move |e: io::Error| format!("{what}: {e}");
        let localhost = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let front = tokio::net::TcpListener::bind(localhost)
            .await
            .map_err(io("listen"))?;
        let back = tokio::net::TcpListener::bind(localhost)
            .await
            .map_err(io("listen"))?;
        let mut client = TcpStream::connect(front.local_addr().map_err(io("addr"))?)
            .await
            .map_err(io("connect"))?;
        let (lb_client, _) = front.accept().await.map_err(io("accept"))?;
        let lb_backend = TcpStream::connect(back.local_addr().map_err(io("addr"))?)
            .await
            .map_err(io("connect"))?;
        let (mut backend, _) = back.accept().await.map_err(io("accept"))?;
        // Sent before the hand-over: already queued on lb's socket.
        let early = b"sent before the hand-over;";
        client.write_all(early).await.map_err(io("client write"))?;
        let up: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        let mut want_up = early.to_vec();
        want_up.extend_from_slice(&up);
        let (to_backend, to_client) = (AtomicU64::new(0), AtomicU64::new(0));
        let counters = Counters {
            to_backend: &to_backend,
            to_client: &to_client,
        };
        let never = CancellationToken::new();
        let cx = relay::Context {
            mode: relay::RelayMode::Adaptive,
            pool,
            counters,
            idle_timeout: Duration::from_secs(30),
            force_close: &never,
        };
        let relay = self.relay(lb_client, lb_backend, (0, 0), cx);
        let (client_r, client_w) = client.split();
        let (backend_r, backend_w) = backend.split();
        let client_side = self_test_side("client", client_first, client_r, client_w, &up, &down);
        let backend_side = self_test_side(
            "backend",
            !client_first,
            backend_r,
            backend_w,
            &down,
            &want_up,
        );
        let (outcome, client_result, backend_result) =
            tokio::join!(relay, client_side, backend_side);
        client_result?;
        backend_result?;
        if outcome != Outcome::Closed {
            return Err(format!(
                "the relay ended with {outcome:?}, not a clean close"
            ));
        }
        Ok(())
    }
}

/// One end of a self-test connection: if it `goes_first`, sends `send` and half-closes, then
/// reads to EOF and checks it got exactly `want`; else it reads first, and sends after the
/// other side's FIN (the direction must still flow).
async fn self_test_side(
    name: &str,
    goes_first: bool,
    mut r: tokio::net::tcp::ReadHalf<'_>,
    mut w: tokio::net::tcp::WriteHalf<'_>,
    send: &[u8],
    want: &[u8],
) -> Result<(), String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let io = |what: &str| format!("{name} {what}");
    let mut send_and_close = async || -> Result<(), String> {
        w.write_all(send)
            .await
            .map_err(|e| format!("{}: {e}", io("write")))?;
        w.shutdown()
            .await
            .map_err(|e| format!("{}: {e}", io("shutdown")))
    };
    if goes_first {
        send_and_close().await?;
    }
    let mut got = Vec::new();
    r.read_to_end(&mut got)
        .await
        .map_err(|e| format!("{}: {e}", io("read")))?;
    if got != want {
        return Err(format!(
            "{name} got {} bytes, not the other side's exact {}",
            got.len(),
            want.len()
        ));
    }
    if !goes_first {
        send_and_close().await?;
    }
    Ok(())
}

/// Pins `map` at `path`. A pin that appears between our removal and our pin is another
/// daemon's (a misconfiguration: two daemons share `pin_path`): replaced, at most 3 times.
fn pin(map: &Map, path: &Path, name: &'static str) -> Result<(), SockmapError> {
    let mut tries = 0;
    loop {
        match map.pin(path) {
            Ok(()) => return Ok(()),
            Err(aya::pin::PinError::SyscallError(e))
                if e.io_error.kind() == io::ErrorKind::AlreadyExists && tries < 3 =>
            {
                tries += 1;
                let _ = std::fs::remove_file(path);
            }
            // The directory went away under us (someone removed it): make it again.
            Err(aya::pin::PinError::SyscallError(e))
                if e.io_error.kind() == io::ErrorKind::NotFound && tries < 3 =>
            {
                tries += 1;
                if let Some(dir) = path.parent() {
                    create_pin_dir(dir)?;
                }
            }
            Err(source) => {
                return Err(SockmapError::Pin {
                    name,
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }
}

fn map_id(map: &Map) -> Option<u32> {
    let data: &MapData = match map {
        Map::SockHash(m) | Map::HashMap(m) | Map::PerCpuArray(m) => m,
        _ => return None,
    };
    data.info().ok().map(|info| info.id())
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, SockmapError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(SockmapError::Missing { what: "map", name })?;
    T::try_from(map).map_err(|source| SockmapError::Map { name, source })
}

fn create_pin_dir(dir: &Path) -> Result<(), SockmapError> {
    super::create_pin_dir(dir).map_err(|source| SockmapError::PinDir {
        path: dir.to_owned(),
        source,
    })
}

/// Removes the sockmap pins under `dir` (a previous daemon's; its sockets are gone).
fn remove_pins(dir: &Path) -> Result<(), SockmapError> {
    for name in MAP_NAMES {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::debug!(pin = %path.display(), "removed a stale sockmap pin"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(SockmapError::Unpin { path, source }),
        }
    }
    Ok(())
}

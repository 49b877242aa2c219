//! The sockmap dataplane: the daemon accepts, picks, connects (retries, PROXY header) as in
//! the proxy dataplane, then hands the socket pair to the kernel, where `lb_sk_verdict`
//! redirects every skb that arrives on one socket to the other's egress. Userspace never
//! touches those bytes; it only watches each socket for EOF and errors.
//!
//! Handing a pair over ([`Sockmap::relay`]):
//! 1. both peer entries go into `SK_PEERS` (cookie -> peer cookie), then both sockets into
//!    `SK_SOCKS`. A byte that arrives on the first socket before the second is in the map
//!    cannot be redirected: the program passes it to the socket's own queue and marks the
//!    direction passing (sticky), so every later byte of that direction takes the same path
//!    and the daemon relays them in order (see `lb_common::SK_PASSING`). Nothing acknowledged
//!    is ever dropped.
//! 2. bytes that were queued before the insertion (a client that sends before the backend
//!    connect completes) are run through the program by the first read on each socket.
//! 3. EOF on one socket: once every byte it received has reached the other socket's send
//!    queue (the kernel's redirect queue drains asynchronously; we compare the program's byte
//!    count with the peer's `tcpi_bytes_acked` + SIOCOUTQ), the FIN is passed on with
//!    `shutdown(SHUT_WR)`; the other direction keeps flowing.
//! 4. a reset or error on one socket resets the other (SO_LINGER 0).
//! 5. both directions done: both entries leave both maps and the sockets close.
//!
//! Never splice(2) a socket that is in `SK_SOCKS`: the relay here only reads and writes.

use std::{
    io,
    path::{Path, PathBuf},
    sync::{
        Mutex, RwLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, Map, MapData, MapError, PerCpuArray, SockHash},
    programs::{ProgramError, SkSkb},
};
use lb_common::{SkEvent, SockPeer, names};
use tokio::{io::Interest, net::TcpStream, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{
    pipes::PipePool,
    relay::{self, Counters, DirError, Outcome},
};
use crate::sys;

/// The object built by build.rs from `lb-ebpf` (`src/sockmap.rs`).
static SOCKMAP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-sockmap"));

/// The maps this dataplane pins under `pin_path`.
pub const MAP_NAMES: [&str; 3] = [names::SK_SOCKS, names::SK_PEERS, names::SK_STATS];

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
    #[error("start-up self-test failed: {0}")]
    SelfTest(String),
}

/// The loaded sockmap program and its maps; the one owner of these kernel objects.
pub struct Sockmap {
    socks: Mutex<SockHash<MapData, u64>>,
    peers: RwLock<BpfHashMap<MapData, u64, SockPeer>>,
    stats: PerCpuArray<MapData, u64>,
    /// Connections handed to the kernel.
    pub handed: AtomicU64,
    /// Connections that could not be handed over (a map full, ...) and were relayed in
    /// userspace instead.
    pub kept: AtomicU64,
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

impl Sockmap {
    /// Loads the program, pins fresh maps under `pin_dir` (replacing pins a previous daemon
    /// left: its connections died with it) sized for `max_sockets`, and attaches the verdict
    /// program to `SK_SOCKS`.
    pub fn load(pin_dir: &Path, max_sockets: u32) -> Result<Sockmap, SockmapError> {
        create_pin_dir(pin_dir)?;
        remove_pins(pin_dir)?;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(names::SK_SOCKS, max_sockets)
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
            peers: RwLock::new(peers),
            stats,
            handed: AtomicU64::new(0),
            kept: AtomicU64::new(0),
            pinned,
            _ebpf: ebpf,
        })
    }

    /// The per-CPU counters of the verdict program, summed, in [`SkEvent::ALL`] order.
    pub fn events(&self) -> Result<[u64; SkEvent::COUNT as usize], SockmapError> {
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

    /// Puts both sockets in the maps (peers first, see the module docs). On an error
    /// nothing is left behind.
    fn insert(&self, a: &TcpStream, b: &TcpStream) -> Result<(u64, u64), SockmapError> {
        use std::os::fd::AsRawFd as _;
        let ca = sys::socket_cookie(a).map_err(SockmapError::Socket)?;
        let cb = sys::socket_cookie(b).map_err(SockmapError::Socket)?;
        let entry = |peer_cookie| SockPeer {
            peer_cookie,
            ..SockPeer::default()
        };
        let map_err = |name| move |source| SockmapError::Map { name, source };
        {
            let mut peers = self.peers.write().unwrap_or_else(|e| e.into_inner());
            peers
                .insert(ca, entry(cb), 0)
                .map_err(map_err(names::SK_PEERS))?;
            if let Err(e) = peers.insert(cb, entry(ca), 0) {
                let _ = peers.remove(&ca);
                return Err(map_err(names::SK_PEERS)(e));
            }
        }
        let inserted = {
            let mut socks = self.socks.lock().unwrap_or_else(|e| e.into_inner());
            socks.insert(ca, a.as_raw_fd(), 0).and_then(|()| {
                socks.insert(cb, b.as_raw_fd(), 0).inspect_err(|_| {
                    let _ = socks.remove(&ca);
                })
            })
        };
        if let Err(e) = inserted {
            self.forget(ca, cb);
            return Err(map_err(names::SK_SOCKS)(e));
        }
        // Bytes that arrived before the insertion wait in the receive queues: run them
        // through the program now (a read would too, but see `kick_receive_queue`).
        if let Err(e) = sys::kick_receive_queue(a).and_then(|()| sys::kick_receive_queue(b)) {
            self.forget(ca, cb);
            return Err(SockmapError::Socket(e));
        }
        Ok((ca, cb))
    }

    /// Takes both sockets out of both maps.
    fn forget(&self, ca: u64, cb: u64) {
        {
            let mut socks = self.socks.lock().unwrap_or_else(|e| e.into_inner());
            // Absent already if the kernel unhashed a socket as it closed.
            let _ = socks.remove(&ca);
            let _ = socks.remove(&cb);
        }
        let mut peers = self.peers.write().unwrap_or_else(|e| e.into_inner());
        let _ = peers.remove(&ca);
        let _ = peers.remove(&cb);
    }

    /// Hands `client` and `backend` to the kernel and watches them until both directions
    /// end, a side fails, the connection idles out, or `force_close` fires. `header` bytes
    /// (the PROXY header) were written to the backend before. When the pair cannot be
    /// handed over it is relayed in userspace ([`relay::relay`]), counted in `kept`.
    pub async fn relay(
        &self,
        client: TcpStream,
        backend: TcpStream,
        pool: &PipePool,
        counters: Counters<'_>,
        idle_timeout: Duration,
        force_close: &CancellationToken,
    ) -> Outcome {
        // What each send queue held before the kernel started to feed it.
        let bases = sys::tcp_bytes_queued(&backend).and_then(|b| {
            let c = sys::tcp_bytes_queued(&client)?;
            Ok((b, c))
        });
        let inserted = bases
            .map_err(SockmapError::Socket)
            .and_then(|bases| Ok((bases, self.insert(&client, &backend)?)));
        let ((backend_base, client_base), (cc, cb)) = match inserted {
            Ok(v) => v,
            Err(e) => {
                self.kept.fetch_add(1, Relaxed);
                tracing::warn!(error = %crate::dataplane::chain(&e), "cannot hand the connection to the kernel; relaying it in userspace");
                return relay::relay(
                    client,
                    backend,
                    relay::RelayMode::Copy,
                    pool,
                    counters,
                    idle_timeout,
                    force_close,
                )
                .await;
            }
        };
        self.handed.fetch_add(1, Relaxed);
        // Kernel byte counts already added to the backend's counters.
        let mut seen = Seen::default();
        let outcome = self
            .watch(
                Pair {
                    client: &client,
                    backend: &backend,
                    cc,
                    cb,
                    backend_base,
                    client_base,
                },
                pool,
                &counters,
                &mut seen,
                idle_timeout,
                force_close,
            )
            .await;
        // Final counts, then out of the maps before the sockets close.
        seen.update(self, cc, cb, &counters);
        self.forget(cc, cb);
        outcome
    }

    async fn watch(
        &self,
        pair: Pair<'_>,
        pool: &PipePool,
        counters: &Counters<'_>,
        seen: &mut Seen,
        idle_timeout: Duration,
        force_close: &CancellationToken,
    ) -> Outcome {
        let start = Instant::now();
        let mut last_activity = start;
        let copied_up = AtomicU64::new(0);
        let copied_down = AtomicU64::new(0);
        let up = self.direction(
            pair.client,
            pair.backend,
            pair.cc,
            pair.backend_base,
            pool,
            &copied_up,
            counters.to_backend,
        );
        let down = self.direction(
            pair.backend,
            pair.client,
            pair.cb,
            pair.client_base,
            pool,
            &copied_down,
            counters.to_client,
        );
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        // The kernel's byte counts are read this often: for the metrics and the idle timer.
        let tick = (idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut copied_seen = 0;
        loop {
            tokio::select! {
                r = &mut up, if !up_done => match { tracing::trace!(result = ?r, "client to backend ended"); r } {
                    Ok(()) => up_done = true,
                    Err(DirError::Source(e)) => return fail(pair.backend, Outcome::ClientFailed, &e),
                    Err(DirError::Dest(e)) => return fail(pair.client, Outcome::BackendFailed, &e),
                },
                r = &mut down, if !down_done => match { tracing::trace!(result = ?r, "backend to client ended"); r } {
                    Ok(()) => down_done = true,
                    Err(DirError::Source(e)) => return fail(pair.client, Outcome::BackendFailed, &e),
                    Err(DirError::Dest(e)) => return fail(pair.backend, Outcome::ClientFailed, &e),
                },
                _ = ticker.tick() => {
                    let copied = copied_up.load(Relaxed) + copied_down.load(Relaxed);
                    if seen.update(self, pair.cc, pair.cb, counters) || copied != copied_seen {
                        copied_seen = copied;
                        last_activity = Instant::now();
                    } else if last_activity.elapsed() >= idle_timeout {
                        return Outcome::IdleTimeout;
                    }
                }
                () = force_close.cancelled() => return Outcome::Shutdown,
            }
            if up_done && down_done {
                return Outcome::Closed;
            }
        }
    }

    /// One direction, `src` to `dst`: bytes the kernel passed up to `src` (see the module
    /// docs) are copied on; at EOF the FIN is passed on once every byte has reached `dst`.
    #[expect(clippy::too_many_arguments, reason = "one direction's whole context")]
    async fn direction(
        &self,
        src: &TcpStream,
        dst: &TcpStream,
        src_cookie: u64,
        dst_base: u64,
        pool: &PipePool,
        copied: &AtomicU64,
        bytes: &AtomicU64,
    ) -> Result<(), DirError> {
        loop {
            let ready = src
                .ready(Interest::READABLE)
                .await
                .map_err(DirError::Source)?;
            match relay::copy_step(src, dst, ready, pool).await? {
                None => {}
                Some(0) => break,
                Some(n) => {
                    tracing::trace!(n, "copied bytes the kernel passed up");
                    copied.fetch_add(n as u64, Relaxed);
                    bytes.fetch_add(n as u64, Relaxed);
                }
            }
        }
        // EOF: wait until `dst`'s send queue holds everything `src` received.
        let mut wait = Duration::from_micros(200);
        loop {
            let redirected = self
                .peer(src_cookie)
                .map(|p| p.bytes)
                .map_err(|e| DirError::Source(io::Error::other(e)))?;
            let want = redirected + copied.load(Relaxed);
            let queued = sys::tcp_bytes_queued(dst).map_err(DirError::Dest)?;
            tracing::trace!(
                redirected,
                copied = copied.load(Relaxed),
                queued,
                dst_base,
                "EOF: waiting for the kernel to pass every byte on"
            );
            if queued.saturating_sub(dst_base) >= want {
                break;
            }
            if let Some(e) = dst.take_error().map_err(DirError::Dest)? {
                return Err(DirError::Dest(e));
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(20));
        }
        socket2::SockRef::from(dst)
            .shutdown(std::net::Shutdown::Write)
            .map_err(DirError::Dest)
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
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
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
        let relay = self.relay(
            lb_client,
            lb_backend,
            pool,
            counters,
            Duration::from_secs(30),
            &never,
        );
        let (mut client_r, mut client_w) = client.split();
        let (mut backend_r, mut backend_w) = backend.split();
        let client_side = async {
            if client_first {
                client_w.write_all(&up).await.map_err(io("client write"))?;
                client_w.shutdown().await.map_err(io("client shutdown"))?;
            }
            let mut got = Vec::new();
            client_r
                .read_to_end(&mut got)
                .await
                .map_err(io("client read"))?;
            if got != down {
                return Err(format!(
                    "client got {} bytes, not the backend's exact {}",
                    got.len(),
                    down.len()
                ));
            }
            if !client_first {
                // The backend's FIN arrived; this direction must still flow.
                client_w.write_all(&up).await.map_err(io("client write"))?;
                client_w.shutdown().await.map_err(io("client shutdown"))?;
            }
            Ok::<(), String>(())
        };
        let backend_side = async {
            if !client_first {
                backend_w
                    .write_all(&down)
                    .await
                    .map_err(io("backend write"))?;
                backend_w.shutdown().await.map_err(io("backend shutdown"))?;
            }
            let mut got = Vec::new();
            backend_r
                .read_to_end(&mut got)
                .await
                .map_err(io("backend read"))?;
            if got != want_up {
                return Err(format!(
                    "backend got {} bytes, not the client's exact {}",
                    got.len(),
                    want_up.len()
                ));
            }
            if client_first {
                backend_w
                    .write_all(&down)
                    .await
                    .map_err(io("backend write"))?;
                backend_w.shutdown().await.map_err(io("backend shutdown"))?;
            }
            Ok::<(), String>(())
        };
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

/// A connection handed to the kernel.
struct Pair<'a> {
    client: &'a TcpStream,
    backend: &'a TcpStream,
    /// Socket cookies.
    cc: u64,
    cb: u64,
    /// [`sys::tcp_bytes_queued`] of each socket before the hand-over.
    backend_base: u64,
    client_base: u64,
}

/// Kernel byte counts already added to the backend's counters.
#[derive(Default)]
struct Seen {
    up: u64,
    down: u64,
}

impl Seen {
    /// Adds what the kernel redirected since the last call; true if anything moved.
    fn update(&mut self, sockmap: &Sockmap, cc: u64, cb: u64, counters: &Counters<'_>) -> bool {
        let mut moved = false;
        if let Ok(p) = sockmap.peer(cc)
            && p.bytes > self.up
        {
            counters.to_backend.fetch_add(p.bytes - self.up, Relaxed);
            self.up = p.bytes;
            moved = true;
        }
        if let Ok(p) = sockmap.peer(cb)
            && p.bytes > self.down
        {
            counters.to_client.fetch_add(p.bytes - self.down, Relaxed);
            self.down = p.bytes;
            moved = true;
        }
        moved
    }
}

fn fail(peer: &TcpStream, outcome: Outcome, error: &io::Error) -> Outcome {
    tracing::debug!(?outcome, %error, "sockmap relay ended by a failure; resetting the other side");
    sys::reset_on_close(peer);
    outcome
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

/// Creates the pin directory (mode 0700) on a bpffs.
fn create_pin_dir(dir: &Path) -> Result<(), SockmapError> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| SockmapError::PinDir {
            path: dir.to_owned(),
            source,
        })
}

/// Removes the sockmap pins under `dir` (a previous daemon's; its sockets are gone).
pub fn remove_pins(dir: &Path) -> Result<(), SockmapError> {
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

//! The torture test: seeded, randomized rounds of one connection each through lb, checked
//! against what each end actually did.
//!
//! Each round draws from the seed: how many bytes go each way (0 B to `max_len`,
//! log-distributed), how each side chunks its writes and pauses, who half-closes first
//! (client, backend, or both at once), whether a side resets mid-stream or the backend closes
//! abruptly as a killed process would, whether lb gets a SIGHUP mid-stream, whether the backend
//! writes with write(2) or sendfile(2), and whether a reader is slower than its writer. Then:
//! - every byte each end received is compared with the stream the other end sent (byte for
//!   byte, which implies equal length and sha256), and
//! - the way each end saw its stream close (EOF or reset) is compared with what the other end
//!   did: a FIN must arrive as EOF after every byte, a reset as a reset after an exact prefix,
//!   never a hang and never an EOF that hides a reset.
//!
//! After the last round lb must hold no more file descriptors than before the first.
//!
//! On failure the panic names the seed and the round; `LB_TORTURE_SEED=S` replays the same
//! rounds (`LB_TORTURE_ROUND=R` only round R). `LB_TORTURE_ROUNDS=N` and
//! `LB_TORTURE_SECONDS=N` set how long a run lasts (`cargo xtask torture` sets them).

use std::{
    io::{self, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd as _,
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use crate::stream::{End, Pattern, Rng, end_of};

/// How long any one read or write may block before the round counts as stalled.
const STALL: Duration = Duration::from_secs(20);

/// Who half-closes first in a round that ends with FINs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// The client sends everything and half-closes; only then does the backend send (an
    /// upload, then its answer).
    ClientFirst,
    /// The backend sends everything and half-closes first; the client sends after that EOF
    /// (the direction must still flow after the other's FIN).
    BackendFirst,
    /// Both send and receive at once and half-close when done.
    Both,
}

/// How a round ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Both sides half-close (in `Order`) and read to EOF.
    Fin(Order),
    /// The client resets (SO_LINGER 0) after sending `after` bytes; the backend must see an
    /// exact prefix, then a reset.
    ClientReset { after: u64 },
    /// The backend resets after sending `after` bytes; the client must see an exact prefix,
    /// then a reset.
    BackendReset { after: u64 },
    /// The backend closes both ways after sending `after` bytes, reading nothing more, as the
    /// kernel does for a killed process: the client must see an exact prefix, then EOF or a
    /// reset (the kernel chooses by whether unread bytes were left), never a hang.
    BackendAbort { after: u64 },
}

/// How the backend writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writer {
    Write,
    /// sendfile(2) from a file holding the stream: page fragments, as nginx sends them.
    Sendfile,
}

/// One side's habits: write sizes, pauses, and a slow reader.
#[derive(Clone, Copy, Debug)]
pub struct Habits {
    /// Writes are drawn from 1..=`max_write` bytes.
    pub max_write: usize,
    /// After a write, a pause of up to 3 ms with this chance (per mille), at most 40 times.
    pub pause_per_mille: u32,
    /// Reads at most this many bytes at a time, sleeping 1 ms every 16 reads (a reader
    /// slower than the writer); `None`: reads as fast as it can.
    pub slow_read: Option<usize>,
}

/// One round, all drawn from the seed.
#[derive(Clone, Debug)]
pub struct Plan {
    pub round: u64,
    /// Bytes from the client to the backend.
    pub up: u64,
    /// Bytes from the backend to the client.
    pub down: u64,
    pub ending: Ending,
    pub client: Habits,
    pub backend: Habits,
    pub writer: Writer,
    /// SIGHUP to lb once the client has sent this many bytes (or at once, if it sends none).
    pub sighup_after: Option<u64>,
    /// Seeds of the two streams.
    pub up_seed: u64,
    pub down_seed: u64,
}

/// A size from 0 to `max`, log-distributed: as many rounds move a few bytes as megabytes.
fn log_size(rng: &mut Rng, max: u64) -> u64 {
    match rng.range(0..20) {
        0 => 0,
        1 => 1,
        _ => {
            let bits = 64 - max.leading_zeros() as usize;
            let b = rng.range(1..bits + 1);
            let top = (1u64 << b).min(max);
            (rng.next_u64() % top).max(1)
        }
    }
}

fn habits(rng: &mut Rng) -> Habits {
    let max_write = [1usize, 7, 100, 1460, 8192, 65536, 262_144][rng.range(0..7)];
    Habits {
        max_write,
        pause_per_mille: [0, 0, 5, 50][rng.range(0..4)],
        slow_read: (rng.range(0..5) == 0).then(|| [512usize, 4096, 65536][rng.range(0..3)]),
    }
}

impl Plan {
    /// Round `round` of the run seeded with `seed`: the same pair always gives the same plan.
    pub fn draw(seed: u64, round: u64, max_len: u64, sighup: bool) -> Plan {
        let mut rng = Rng::new(seed ^ round.wrapping_mul(0xA24B_AED4_963E_E407));
        let up = log_size(&mut rng, max_len);
        let down = log_size(&mut rng, max_len);
        let ending = match rng.range(0..10) {
            0 if up > 1 => Ending::ClientReset {
                after: rng.next_u64() % up,
            },
            1 if down > 1 => Ending::BackendReset {
                after: rng.next_u64() % down,
            },
            2 if down > 1 => Ending::BackendAbort {
                after: rng.next_u64() % down,
            },
            3 | 4 => Ending::Fin(Order::ClientFirst),
            5 | 6 => Ending::Fin(Order::BackendFirst),
            _ => Ending::Fin(Order::Both),
        };
        let client = habits(&mut rng);
        let backend = habits(&mut rng);
        let writer = if rng.range(0..3) == 0 {
            Writer::Sendfile
        } else {
            Writer::Write
        };
        let sighup_after = (sighup && rng.range(0..8) == 0).then(|| rng.next_u64() % (up + 1));
        Plan {
            round,
            up,
            down,
            ending,
            client,
            backend,
            writer,
            sighup_after,
            up_seed: rng.next_u64(),
            down_seed: rng.next_u64(),
        }
    }
}

/// Where the rounds go and what to watch.
pub struct Target {
    /// Opens the client's connection (through lb).
    pub connect: Box<dyn Fn() -> io::Result<TcpStream> + Send + Sync>,
    /// The backend's listening socket (lb's only backend).
    pub backend: TcpListener,
    /// lb's pid: for SIGHUP and its fd count.
    pub lb_pid: u32,
    /// Whether lb holds the connection's sockets (not so for xdp): its fds are counted.
    pub count_fds: bool,
}

/// How long a run lasts.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub rounds: u64,
    pub time: Duration,
    /// Largest transfer each way.
    pub max_len: u64,
    /// Whether rounds may SIGHUP lb.
    pub sighup: bool,
}

impl Budget {
    /// `rounds` rounds of at most `max_len` bytes each way, unless `LB_TORTURE_ROUNDS` /
    /// `LB_TORTURE_SECONDS` / `LB_TORTURE_MAX_LEN` say otherwise (`LB_TORTURE_SIGHUP=0`: no
    /// SIGHUPs).
    pub fn from_env(rounds: u64, max_len: u64) -> Budget {
        let num = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
        let seconds = num("LB_TORTURE_SECONDS");
        Budget {
            rounds: num("LB_TORTURE_ROUNDS").unwrap_or(if seconds.is_some() {
                u64::MAX
            } else {
                rounds
            }),
            time: Duration::from_secs(seconds.unwrap_or(600)),
            max_len: num("LB_TORTURE_MAX_LEN").unwrap_or(max_len),
            sighup: num("LB_TORTURE_SIGHUP") != Some(0),
        }
    }
}

/// What a side's reader saw.
#[derive(Debug)]
struct Seen {
    bytes: u64,
    first_mismatch: Option<u64>,
    /// Where the bytes at the first mismatch come from ([`Pattern::shift_of`]).
    shift: Option<i64>,
    end: End,
}

/// The seed of this run: `LB_TORTURE_SEED`, else drawn from the clock (and printed).
pub fn seed() -> u64 {
    match std::env::var("LB_TORTURE_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("LB_TORTURE_SEED={s:?}: {e}")),
        Err(_) => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64);
            nanos ^ u64::from(std::process::id()) << 32
        }
    }
}

/// Runs rounds against `target` until `budget` is spent; panics with the seed, the round and
/// what differed at the first failure. Returns the rounds run.
pub fn run(name: &str, target: &Target, budget: Budget) -> u64 {
    let seed = seed();
    eprintln!("torture {name}: seed {seed} (LB_TORTURE_SEED={seed} replays it)");
    let only: Option<u64> = std::env::var("LB_TORTURE_ROUND")
        .ok()
        .and_then(|v| v.parse().ok());
    let fds_before = target.count_fds.then(|| settled_fds(target.lb_pid));
    let started = Instant::now();
    let mut rounds = 0u64;
    let mut moved = 0u64;
    let mut round = only.unwrap_or(0);
    while rounds < budget.rounds && started.elapsed() < budget.time {
        let plan = Plan::draw(seed, round, budget.max_len, budget.sighup);
        if std::env::var_os("LB_TORTURE_VERBOSE").is_some() {
            eprintln!("torture {name}: {plan:?}");
        }
        if let Err(why) = run_round(target, &plan) {
            panic!(
                "torture {name}: seed {seed} round {round} failed: {why}\nplan: {plan:?}\n\
                 replay: LB_TORTURE_SEED={seed} LB_TORTURE_ROUND={round}"
            );
        }
        moved += plan.up + plan.down;
        rounds += 1;
        round += 1;
        if only.is_some() {
            break;
        }
    }
    if let Some(fds) = fds_before {
        // Every connection's sockets and pipes are given back (within a few seconds).
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut now = settled_fds(target.lb_pid);
        while now > fds && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(100));
            now = settled_fds(target.lb_pid);
        }
        assert!(
            now <= fds,
            "torture {name}: seed {seed}: lb holds {} sockets after {rounds} rounds, {fds} \
             before (leak); its fds: {:?}",
            now,
            crate::lb::fds_of(target.lb_pid)
        );
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "torture {name}: seed {seed}: {rounds} rounds in {secs:.1} s ({:.1} rounds/s, {:.1} MiB moved)",
        rounds as f64 / secs,
        moved as f64 / f64::from(1 << 20)
    );
    rounds
}

/// lb's fd count once it has held still for 300 ms (at most 5 s).
fn settled_fds(pid: u32) -> usize {
    // Sockets only: idle pipes and buffers stay pooled for reuse, by design.
    let count = || {
        crate::lb::fds_of(pid)
            .iter()
            .filter(|t| t.starts_with("socket:"))
            .count()
    };
    let mut last = count();
    let mut since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && since.elapsed() < Duration::from_millis(300) {
        thread::sleep(Duration::from_millis(20));
        let now = count();
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
    last
}

fn run_round(target: &Target, plan: &Plan) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    // The backend's stream, in a file when it sends with sendfile(2).
    let file = (plan.writer == Writer::Sendfile && plan.down > 0)
        .then(|| stream_file(plan.down_seed, plan.down));
    let client = (target.connect)().map_err(|e| format!("client connect: {e}"))?;
    let backend = accept_within(&target.backend, Duration::from_secs(10))
        .map_err(|e| format!("backend accept: {e}"))?;
    for s in [&client, &backend] {
        s.set_read_timeout(Some(STALL)).map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(STALL))
            .map_err(|e| e.to_string())?;
    }
    let up_pattern = Pattern::new(plan.up_seed);
    let down_pattern = Pattern::new(plan.down_seed);
    // Signals between a side's writer and reader, and to the other side (ordering).
    let (client_eof_tx, client_eof_rx) = mpsc::channel::<()>(); // backend saw the client's EOF
    let (backend_eof_tx, backend_eof_rx) = mpsc::channel::<()>(); // client saw the backend's EOF
    let sighup = Arc::new(Mutex::new(plan.sighup_after));
    // The client's write met the reset (and consumed the error its reader would have seen).
    let client_write_reset = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pid = target.lb_pid;

    // A side that resets does so once the other side's writer is done (so the other side's
    // reader is the one that meets the reset: a write racing it would consume the error and
    // leave the reader an EOF), with connect(AF_UNSPEC), which sends the reset at once
    // whatever other fds the socket has. A backend that closes abruptly, as a killed process
    // does, reads nothing and closes its only fd.
    let (c_done_tx, c_done_rx) = mpsc::channel::<()>();
    let (b_done_tx, b_done_rx) = mpsc::channel::<()>();
    let backend_reads = !matches!(plan.ending, Ending::BackendAbort { .. });
    let client_r = client.try_clone().map_err(|e| e.to_string())?;
    let backend_r = backend_reads
        .then(|| backend.try_clone())
        .transpose()
        .map_err(|e| e.to_string())?;
    // Client writer.
    let c_w = {
        let s = client;
        let plan = plan.clone();
        let pattern = up_pattern.clone();
        let sighup = Arc::clone(&sighup);
        let write_reset = Arc::clone(&client_write_reset);
        thread::spawn(move || -> Result<(), String> {
            if plan.ending == Ending::Fin(Order::BackendFirst) {
                wait_signal(&backend_eof_rx, "the backend's EOF at the client")?;
            }
            let limit = match plan.ending {
                Ending::ClientReset { after } => after,
                _ => plan.up,
            };
            let hup = |sent: u64| {
                let mut at = sighup.lock().unwrap_or_else(|e| e.into_inner());
                if at.is_some_and(|a| sent >= a) {
                    *at = None;
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGHUP,
                    );
                }
            };
            hup(0);
            let r = write_stream(&s, &pattern, limit, plan.client, plan.round, &hup);
            let _ = c_done_tx.send(());
            match plan.ending {
                Ending::ClientReset { .. } => {
                    r.map_err(|e| format!("client write before its reset: {e}"))?;
                    wait_signal(&b_done_rx, "the backend's last write")?;
                    send_reset(&s).map_err(|e| format!("client reset: {e}"))
                }
                Ending::Fin(_) => {
                    r.map_err(|e| format!("client write: {e}"))?;
                    s.shutdown(Shutdown::Write)
                        .map_err(|e| format!("client shutdown(SHUT_WR): {e}"))
                }
                // The backend goes away mid-stream: the client's writes may fail.
                Ending::BackendReset { .. } | Ending::BackendAbort { .. } => {
                    match r {
                        Ok(()) => {
                            let _ = s.shutdown(Shutdown::Write);
                        }
                        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                            write_reset.store(true, std::sync::atomic::Ordering::SeqCst);
                        }
                        Err(_) => {}
                    }
                    Ok(())
                }
            }
        })
    };
    // Client reader.
    let c_r = {
        let plan = plan.clone();
        let pattern = down_pattern.clone();
        thread::spawn(move || -> Seen {
            let seen = read_stream(&client_r, &pattern, plan.down, plan.client);
            if seen.end == End::Eof {
                let _ = backend_eof_tx.send(());
            }
            seen
        })
    };
    // Backend writer.
    let b_w = {
        let s = backend;
        let plan = plan.clone();
        let pattern = down_pattern.clone();
        thread::spawn(move || -> Result<(), String> {
            if plan.ending == Ending::Fin(Order::ClientFirst) {
                wait_signal(&client_eof_rx, "the client's EOF at the backend")?;
            }
            let limit = match plan.ending {
                Ending::BackendReset { after } | Ending::BackendAbort { after } => after,
                _ => plan.down,
            };
            let r = match &file {
                Some(f) => sendfile_stream(&s, f, limit),
                None => write_stream(&s, &pattern, limit, plan.backend, plan.round, &|_| {}),
            };
            let _ = b_done_tx.send(());
            match plan.ending {
                Ending::BackendReset { .. } => {
                    r.map_err(|e| format!("backend write before its reset: {e}"))?;
                    wait_signal(&c_done_rx, "the client's last write")?;
                    send_reset(&s).map_err(|e| format!("backend reset: {e}"))
                }
                Ending::BackendAbort { .. } => {
                    r.map_err(|e| format!("backend write before it closes: {e}"))?;
                    drop(s);
                    Ok(())
                }
                Ending::Fin(_) => {
                    r.map_err(|e| format!("backend write: {e}"))?;
                    s.shutdown(Shutdown::Write)
                        .map_err(|e| format!("backend shutdown(SHUT_WR): {e}"))
                }
                // The client goes away: the backend's writes may fail after it.
                Ending::ClientReset { .. } => Ok(()),
            }
        })
    };
    // Backend reader.
    let b_r = {
        let plan = plan.clone();
        let pattern = up_pattern.clone();
        thread::spawn(move || -> Option<Seen> {
            let s = backend_r?;
            let seen = read_stream(&s, &pattern, plan.up, plan.backend);
            if seen.end == End::Eof {
                let _ = client_eof_tx.send(());
            }
            Some(seen)
        })
    };
    let client_write = join(c_w, "client writer");
    let backend_write = join(b_w, "backend writer");
    let client_seen = join(c_r, "client reader");
    let backend_seen = join(b_r, "backend reader");
    if Instant::now() > deadline {
        return Err("the round took over 120 s".to_owned());
    }
    let mut errors = Vec::new();
    if let Err(e) = client_write {
        errors.push(e);
    }
    if let Err(e) = backend_write {
        errors.push(e);
    }
    let check = |who: &str, seen: &Seen, expect_len: u64, ends: &[End], exact: bool| {
        let mut out = Vec::new();
        if let Some(at) = seen.first_mismatch {
            let origin = match seen.shift {
                Some(d) if d > 0 => format!("; they are the bytes sent {d} earlier (a repeat)"),
                Some(d) if d < 0 => format!("; they are the bytes sent {} later (a skip)", -d),
                _ => "; they are from nowhere in the stream".to_owned(),
            };
            out.push(format!(
                "{who} received wrong bytes from offset {at} ({} received, {expect_len} sent){origin}",
                seen.bytes
            ));
        }
        if exact && seen.bytes != expect_len {
            out.push(format!(
                "{who} received {} bytes, the other end sent {expect_len}",
                seen.bytes
            ));
        }
        if !exact && seen.bytes > expect_len {
            out.push(format!(
                "{who} received {} bytes, more than the {expect_len} the other end sent",
                seen.bytes
            ));
        }
        if !ends.contains(&seen.end) {
            out.push(format!(
                "{who} saw its stream end with {:?} after {} bytes; expected {ends:?}",
                seen.end, seen.bytes
            ));
        }
        out
    };
    let prefix = |who: &str, seen: &Seen, sent: u64| check(who, seen, sent, &ALL_ENDS, false);
    match plan.ending {
        Ending::Fin(_) => {
            let b = backend_seen.expect("the backend reads in a FIN round");
            errors.extend(check("client", &client_seen, plan.down, &[End::Eof], true));
            errors.extend(check("backend", &b, plan.up, &[End::Eof], true));
        }
        Ending::ClientReset { after } => {
            let b = backend_seen.expect("the backend reads");
            errors.extend(check("backend", &b, after, &[End::Reset], false));
            errors.extend(prefix("client", &client_seen, plan.down));
        }
        Ending::BackendReset { after } => {
            errors.extend(check("client", &client_seen, after, &[End::Reset], false));
            if let Some(b) = &backend_seen {
                errors.extend(prefix("backend", b, plan.up));
            }
        }
        Ending::BackendAbort { after } => {
            // Closed with bytes it had not read, the backend's kernel resets; else a FIN
            // after every byte. Either way, nothing after `after`, and no hang.
            let c = &client_seen;
            let mut found = check("client", c, after, &[End::Eof, End::Reset], false);
            let reset_taken_by_write = client_write_reset.load(std::sync::atomic::Ordering::SeqCst);
            if c.end == End::Eof && c.bytes != after && !reset_taken_by_write {
                found.push(format!(
                    "client saw EOF after {} bytes; the backend sent {after} and then a FIN",
                    c.bytes
                ));
            }
            errors.extend(found);
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

fn join<T>(h: thread::JoinHandle<T>, what: &str) -> T {
    h.join()
        .unwrap_or_else(|_| panic!("{what} thread panicked"))
}

/// Every way a stream can end but a stall.
const ALL_ENDS: [End; 4] = [
    End::Eof,
    End::Reset,
    End::Error(io::ErrorKind::BrokenPipe),
    End::Error(io::ErrorKind::NotConnected),
];

/// Resets the connection now: connect(AF_UNSPEC) disconnects a TCP socket with a reset
/// (tcp_disconnect), whatever other fds refer to it.
fn send_reset(s: &TcpStream) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let addr = nix::libc::sockaddr {
        sa_family: nix::libc::AF_UNSPEC as nix::libc::sa_family_t,
        sa_data: [0; 14],
    };
    // SAFETY: `addr` is a valid sockaddr for the call; its size is passed.
    let rc = unsafe {
        nix::libc::connect(
            s.as_raw_fd(),
            &addr,
            std::mem::size_of::<nix::libc::sockaddr>() as nix::libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn wait_signal(rx: &mpsc::Receiver<()>, what: &str) -> Result<(), String> {
    rx.recv_timeout(STALL)
        .map_err(|_| format!("{what} did not come within {STALL:?}"))
}

fn accept_within(listener: &TcpListener, timeout: Duration) -> io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no connection reached the backend",
                    ));
                }
                thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Writes `len` bytes of `pattern` in chunks and pauses as `habits` say; `progress` is told
/// the bytes sent so far after each write.
fn write_stream(
    mut s: &TcpStream,
    pattern: &Pattern,
    len: u64,
    habits: Habits,
    round: u64,
    progress: &dyn Fn(u64),
) -> io::Result<()> {
    let mut rng = Rng::new(round ^ 0x5EED);
    let mut sent = 0u64;
    let mut pauses = 0;
    // At most about 20,000 writes a stream, so tiny writes stay tiny only on short streams
    // and a round stays within the stall timeout.
    let max_write = habits.max_write.max((len / 20_000) as usize);
    while sent < len {
        let want = rng.range(1..max_write + 1).min((len - sent) as usize);
        let chunk = pattern.at(sent, want);
        s.write_all(chunk)?;
        sent += chunk.len() as u64;
        progress(sent);
        if pauses < 40 && (rng.next_u64() % 1000) < u64::from(habits.pause_per_mille) {
            pauses += 1;
            thread::sleep(Duration::from_micros(rng.range(0..3000) as u64));
        }
    }
    Ok(())
}

/// Sends the first `len` bytes of `file` with sendfile(2).
fn sendfile_stream(s: &TcpStream, file: &std::fs::File, len: u64) -> io::Result<()> {
    let mut offset: nix::libc::off_t = 0;
    while (offset as u64) < len {
        let left = (len - offset as u64).min(1 << 30) as usize;
        let n = nix::sys::sendfile::sendfile(s.as_fd(), file.as_fd(), Some(&mut offset), left)
            .map_err(io::Error::from)?;
        if n == 0 {
            return Err(io::Error::other("sendfile sent nothing"));
        }
    }
    Ok(())
}

/// A temporary file holding `len` bytes of the stream seeded `seed` (unlinked at once).
fn stream_file(seed: u64, len: u64) -> std::fs::File {
    let path = std::env::temp_dir().join(format!("lb-torture-{}-{seed}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("create the sendfile stream file");
    let _ = std::fs::remove_file(&path);
    let pattern = Pattern::new(seed);
    let mut done = 0u64;
    while done < len {
        let chunk = pattern.at(done, (len - done).min(1 << 20) as usize);
        f.write_all(chunk).expect("write the sendfile stream file");
        done += chunk.len() as u64;
    }
    f
}

/// Reads until the stream ends (or more than `expect` + 1 MiB came: a relay that loops),
/// checking every byte against `pattern`.
fn read_stream(mut s: &TcpStream, pattern: &Pattern, expect: u64, habits: Habits) -> Seen {
    let mut buf = vec![0u8; habits.slow_read.unwrap_or(256 * 1024)];
    let mut bytes = 0u64;
    let mut first_mismatch = None;
    let mut shift = None;
    let mut reads = 0u64;
    let end = loop {
        if bytes > expect + (1 << 20) {
            break End::Error(io::ErrorKind::InvalidData);
        }
        match s.read(&mut buf) {
            Ok(0) => break End::Eof,
            Ok(n) => {
                if first_mismatch.is_none()
                    && let Some(i) = pattern.check(bytes, &buf[..n])
                {
                    first_mismatch = Some(bytes + i as u64);
                    shift = pattern.shift_of(bytes + i as u64, &buf[i..n]);
                }
                bytes += n as u64;
                reads += 1;
                if habits.slow_read.is_some() && reads.is_multiple_of(16) && reads < 16 * 1000 {
                    thread::sleep(Duration::from_millis(1));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break end_of(&e),
        }
    };
    Seen {
        bytes,
        first_mismatch,
        shift,
        end,
    }
}

/// A free loopback address for a backend.
pub fn backend_listener() -> TcpListener {
    TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind the backend")
}

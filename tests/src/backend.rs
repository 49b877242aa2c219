//! Backends the tests run: a listener on 127.0.0.1 served by a thread per connection, with the
//! behaviours the cases need, and a killable backend that is a separate process.

use std::{
    io::{self, BufRead as _, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::stream::{IO_TIMEOUT, Pattern, Received, StreamHasher, read_exactly, reset_on_close};

/// What a backend does with each accepted connection (on its own thread).
pub type Handler = dyn Fn(TcpStream) + Send + Sync + 'static;

/// A backend listening on 127.0.0.1 (an ephemeral port), serving each connection on its own
/// thread with a handler. Dropping it stops accepting and shuts its open connections down.
pub struct Backend {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

struct Shared {
    stop: AtomicBool,
    accepted: AtomicUsize,
    next_id: AtomicU64,
    /// A clone of each open connection, to shut it down from outside.
    open: Mutex<Vec<(u64, TcpStream)>>,
}

impl Backend {
    /// Listens (backlog 4096) and serves each connection with `handler`.
    pub fn spawn(handler: impl Fn(TcpStream) + Send + Sync + 'static) -> Backend {
        Backend::serve(listen_any_port(), handler)
    }

    /// Like [`Backend::spawn`], on `addr` (SO_REUSEADDR): a backend that can be stopped and
    /// started again on the same address.
    pub fn spawn_at(
        addr: SocketAddr,
        handler: impl Fn(TcpStream) + Send + Sync + 'static,
    ) -> io::Result<Backend> {
        Ok(Backend::serve(listen_at(addr)?, handler))
    }

    /// [`Backend::echo`] on `addr`.
    pub fn echo_at(addr: SocketAddr) -> io::Result<Backend> {
        Backend::spawn_at(addr, echo_handler)
    }

    /// Stops listening (the port refuses connects from now on) while the connections it has
    /// go on; the address can then be listened on again.
    pub fn stop_listening(&mut self) {
        self.stop_accepting();
    }

    fn serve(
        listener: TcpListener,
        handler: impl Fn(TcpStream) + Send + Sync + 'static,
    ) -> Backend {
        let addr = listener.local_addr().expect("local_addr");
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            accepted: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            open: Mutex::new(Vec::new()),
        });
        let handler: Arc<Handler> = Arc::new(handler);
        let s = Arc::clone(&shared);
        let acceptor = std::thread::Builder::new()
            .name(format!("backend-{}", addr.port()))
            .spawn(move || accept_loop(&listener, &s, &handler))
            .expect("spawn backend thread");
        Backend {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections open now (accepted, handler not finished).
    pub fn open(&self) -> usize {
        lock(&self.shared.open).len()
    }

    /// Dies abruptly, as a crashed process would: stops listening, and every open connection is
    /// shut down and closed with a reset (SO_LINGER 0).
    pub fn abort(&mut self) {
        self.stop_accepting();
        for (_, stream) in lock(&self.shared.open).drain(..) {
            reset_on_close(&stream);
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    fn stop_accepting(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            // Wake the blocking accept; it sees `stop` and closes the listener.
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
            let _ = acceptor.join();
        }
    }

    /// Echoes every byte; on EOF, half-closes back and ends.
    pub fn echo() -> Backend {
        Backend::spawn(echo_handler)
    }

    /// Reads the request to EOF, then replies with its bytes reversed and closes: a backend
    /// that only answers once the client has half-closed.
    pub fn reverse_after_eof() -> Backend {
        Backend::spawn(|mut s| {
            let mut request = Vec::new();
            if s.read_to_end(&mut request).is_err() {
                return;
            }
            request.reverse();
            let _ = s.write_all(&request);
        })
    }

    /// Both ways at once: sends `len` bytes of `Pattern::new(send_seed)` then half-closes, while
    /// reading to EOF and checking against `Pattern::new(expect_seed)`. Reports each connection
    /// on `report`.
    pub fn sink_source(
        len: u64,
        send_seed: u64,
        expect_seed: u64,
        report: mpsc::Sender<BothWays>,
    ) -> Backend {
        let send = Pattern::new(send_seed);
        let expect = Pattern::new(expect_seed);
        Backend::spawn(move |s| {
            let report = report.clone();
            let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
            let _ = s.set_write_timeout(Some(Duration::from_secs(60)));
            let mut writer = s.try_clone().expect("clone stream");
            let send = send.clone();
            let sender = std::thread::spawn(move || {
                let mut hasher = StreamHasher::new();
                let r = send.send(&mut writer, len, &mut hasher);
                let _ = writer.shutdown(Shutdown::Write);
                (r, hasher.finish())
            });
            let received = expect.receive(&mut &s, len);
            let (sent, sent_sha256) = sender.join().expect("sender thread");
            let _ = report.send(BothWays {
                sent: sent.map_err(|e| e.to_string()),
                sent_sha256,
                received,
            });
        })
    }

    /// Reads `read_first` bytes, writes `write_len` bytes, waits `pause`, then closes with a
    /// reset (SO_LINGER 0): a backend that resets mid-stream.
    pub fn reset_mid_stream(read_first: usize, write_len: usize, pause: Duration) -> Backend {
        Backend::spawn(move |mut s| {
            let _ = s.set_read_timeout(Some(IO_TIMEOUT));
            if read_exactly(&mut s, read_first).is_err() {
                return;
            }
            let data = vec![0x5a; write_len];
            if s.write_all(&data).is_err() {
                return;
            }
            std::thread::sleep(pause);
            reset_on_close(&s);
        })
    }

    /// Reads a PROXY header (v1 or v2), replies with one line `v1 SRC DST` or `v2 SRC DST`
    /// (socket addresses; `BAD <reason>` if there was no valid header), then echoes the rest.
    pub fn proxy_header_echo() -> Backend {
        Backend::spawn(|mut s| {
            let _ = s.set_read_timeout(Some(IO_TIMEOUT));
            let line = match read_proxy_header(&mut s) {
                Ok(h) => format!("{} {} {}\n", h.version, h.source, h.destination),
                Err(e) => format!("BAD {e}\n"),
            };
            if s.write_all(line.as_bytes()).is_err() || line.starts_with("BAD") {
                return;
            }
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = s.shutdown(Shutdown::Write);
        })
    }

    /// Sends an endless stream of bytes while reading and discarding what comes, until either
    /// fails.
    pub fn endless_source() -> Backend {
        Backend::spawn(|s| {
            let mut reader = s.try_clone().expect("clone stream");
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
            });
            let buf = vec![b'k'; 64 * 1024];
            while (&s).write_all(&buf).is_ok() {}
        })
    }

    /// Reads until EOF or an error and reports how the stream ended, then closes.
    pub fn report_end(report: mpsc::Sender<crate::stream::End>) -> Backend {
        Backend::spawn(move |mut s| {
            let (end, _) = crate::stream::drain_until_end(&mut s, IO_TIMEOUT);
            let _ = report.send(end);
        })
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop_accepting();
        for (_, stream) in lock(&self.shared.open).drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Echoes every byte; on EOF, half-closes back.
fn echo_handler(mut s: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

fn listen_at(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

fn listen_any_port() -> TcpListener {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    socket.set_reuse_address(true).expect("SO_REUSEADDR");
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind 127.0.0.1:0");
    socket.listen(4096).expect("listen");
    socket.into()
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, handler: &Arc<Handler>) {
    loop {
        let accepted = listener.accept();
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!(
                    "backend {}: accept: {e}",
                    listener
                        .local_addr()
                        .map(|a| a.to_string())
                        .unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(clone) = stream.try_clone() {
            lock(&shared.open).push((id, clone));
        }
        let _ = stream.set_nodelay(true);
        let (shared, handler) = (Arc::clone(shared), Arc::clone(handler));
        let spawned = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                handler(stream);
                lock(&shared.open).retain(|(i, _)| *i != id);
            });
        if let Err(e) = spawned {
            eprintln!("backend: cannot spawn a connection thread: {e}");
        }
    }
}

/// What a [`Backend::sink_source`] connection saw.
#[derive(Debug)]
pub struct BothWays {
    /// Whether sending every byte worked.
    pub sent: Result<(), String>,
    pub sent_sha256: String,
    pub received: Received,
}

/// A parsed PROXY protocol header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHeader {
    /// `v1` or `v2`.
    pub version: &'static str,
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

/// The v2 signature.
pub const PROXY_V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Reads exactly one PROXY header (v1 or v2, TCP over IPv4 or IPv6, command PROXY) from the
/// start of `r`, and not a byte more.
pub fn read_proxy_header(r: &mut impl Read) -> Result<ProxyHeader, String> {
    let mut first = [0u8; 6];
    r.read_exact(&mut first)
        .map_err(|e| format!("reading the first 6 bytes: {e}"))?;
    if &first == b"PROXY " {
        // v1: a line of at most 107 bytes ending in CRLF.
        let mut line = first.to_vec();
        while !line.ends_with(b"\r\n") {
            if line.len() >= 107 {
                return Err(format!(
                    "v1 header longer than 107 bytes: {:?}",
                    String::from_utf8_lossy(&line)
                ));
            }
            let mut b = [0u8; 1];
            r.read_exact(&mut b)
                .map_err(|e| format!("reading the v1 line: {e}"))?;
            line.push(b[0]);
        }
        let text = std::str::from_utf8(&line[..line.len() - 2])
            .map_err(|_| "v1 header is not ASCII".to_owned())?;
        let fields: Vec<&str> = text.split(' ').collect();
        let [_, family, src, dst, sport, dport] = fields[..] else {
            return Err(format!("v1 header does not have 6 fields: {text:?}"));
        };
        let parse_ip = |s: &str| {
            s.parse::<IpAddr>()
                .map_err(|e| format!("v1 address {s:?}: {e}"))
        };
        let parse_port = |s: &str| s.parse::<u16>().map_err(|e| format!("v1 port {s:?}: {e}"));
        let (src, dst) = (parse_ip(src)?, parse_ip(dst)?);
        let family_ok = match family {
            "TCP4" => src.is_ipv4() && dst.is_ipv4(),
            "TCP6" => src.is_ipv6() && dst.is_ipv6(),
            _ => false,
        };
        if !family_ok {
            return Err(format!(
                "v1 family {family:?} does not match the addresses: {text:?}"
            ));
        }
        return Ok(ProxyHeader {
            version: "v1",
            source: SocketAddr::new(src, parse_port(sport)?),
            destination: SocketAddr::new(dst, parse_port(dport)?),
        });
    }
    let mut head = [0u8; 16];
    head[..6].copy_from_slice(&first);
    r.read_exact(&mut head[6..])
        .map_err(|e| format!("reading the v2 header: {e}"))?;
    if head[..12] != PROXY_V2_SIGNATURE {
        return Err(format!("neither a v1 nor a v2 header: {:02x?}", &head));
    }
    if head[12] != 0x21 {
        return Err(format!(
            "v2 version/command byte {:#04x}, want 0x21 (v2, PROXY)",
            head[12]
        ));
    }
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)
        .map_err(|e| format!("reading {len} bytes of v2 addresses: {e}"))?;
    let (source, destination) = match head[13] {
        0x11 if len >= 12 => {
            let ip = |o: usize| {
                IpAddr::V4(Ipv4Addr::new(
                    body[o],
                    body[o + 1],
                    body[o + 2],
                    body[o + 3],
                ))
            };
            let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            (
                SocketAddr::new(ip(0), port(8)),
                SocketAddr::new(ip(4), port(10)),
            )
        }
        0x21 if len >= 36 => {
            let ip = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&body[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(b))
            };
            let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            (
                SocketAddr::new(ip(0), port(32)),
                SocketAddr::new(ip(16), port(34)),
            )
        }
        other => {
            return Err(format!(
                "v2 family/transport {other:#04x} with length {len}"
            ));
        }
    };
    Ok(ProxyHeader {
        version: "v2",
        source,
        destination,
    })
}

/// A backend in its own process (python3), killable with SIGKILL as a crash would. Each
/// connection gets an endless stream of bytes while what it sends is read and discarded.
pub struct KillableBackend {
    child: Child,
    addr: SocketAddr,
}

const KILLABLE_SCRIPT: &str = r#"
import socket, sys, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0))
s.listen(128)
print(s.getsockname()[1], flush=True)
def drain(c):
    try:
        while c.recv(65536):
            pass
    except OSError:
        pass
def serve(c):
    threading.Thread(target=drain, args=(c,), daemon=True).start()
    buf = b"k" * 65536
    try:
        while True:
            c.sendall(buf)
    except OSError:
        pass
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

impl KillableBackend {
    /// Starts it; `None` when python3 is not installed.
    pub fn spawn() -> Option<KillableBackend> {
        let mut child = Command::new("python3")
            .args(["-c", KILLABLE_SCRIPT])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .ok()?;
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped stdout");
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the backend's port");
        let port: u16 = line
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("python backend printed {line:?}: {e}"));
        Some(KillableBackend {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for KillableBackend {
    fn drop(&mut self) {
        self.kill();
    }
}

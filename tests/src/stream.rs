//! Bytes to send and ways to check them: pseudo-random streams that a receiver can verify byte
//! for byte, sha256 of long streams, client sockets with timeouts, bounded waits.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    process::{Child, ChildStdin, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use sha2::{Digest as _, Sha256};

/// Timeout of every blocking read and write the helpers make unless told otherwise.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A small fast generator (xorshift64*): reproducible test data, not cryptography.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // Never zero (xorshift's fixed point), and seeds close together diverge at once.
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `range`.
    pub fn range(&mut self, range: std::ops::Range<usize>) -> usize {
        let span = (range.end - range.start) as u64;
        range.start + (self.next_u64() % span) as usize
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.fill(&mut v);
        v
    }
}

/// An endless pseudo-random stream: a random block repeated. The block's length (1 MiB + 1021,
/// a prime offset) lines up with no buffer or pipe size, so a chunk lost, duplicated or
/// reordered anywhere changes the bytes at that offset and [`Pattern::check`] finds it.
#[derive(Clone, Debug)]
pub struct Pattern {
    block: Arc<Vec<u8>>,
}

impl Pattern {
    const BLOCK: usize = (1 << 20) + 1021;

    pub fn new(seed: u64) -> Pattern {
        Pattern {
            block: Arc::new(Rng::new(seed).bytes(Self::BLOCK)),
        }
    }

    /// The stream's bytes from `offset`, at most `max` of them (fewer at the block's end).
    pub fn at(&self, offset: u64, max: usize) -> &[u8] {
        let start = (offset % Self::BLOCK as u64) as usize;
        let end = Self::BLOCK.min(start + max);
        &self.block[start..end]
    }

    /// The index in `data` of the first byte that differs from the stream at `offset`.
    pub fn check(&self, offset: u64, data: &[u8]) -> Option<usize> {
        let mut done = 0;
        while done < data.len() {
            let want = self.at(offset + done as u64, data.len() - done);
            let got = &data[done..done + want.len()];
            if got != want {
                return Some(done + got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0));
            }
            done += want.len();
        }
        None
    }

    /// Where in the stream `window` (bytes received at `offset`, at least 32 of them) comes
    /// from, as a shift: `Some(d)` means they are the stream's bytes from `offset - d` (d > 0:
    /// earlier bytes again, a repeat; d < 0: bytes skipped). The stream repeats every
    /// [`Self::BLOCK`] bytes, so the shift is the one nearest 0 modulo that.
    pub fn shift_of(&self, offset: u64, window: &[u8]) -> Option<i64> {
        if window.len() < 32 {
            return None;
        }
        let needle = &window[..32];
        let block = &self.block[..];
        let found = (0..Self::BLOCK)
            .find(|&i| (0..32).all(|k| block[(i + k) % Self::BLOCK] == needle[k]))?;
        let here = (offset % Self::BLOCK as u64) as i64;
        let n = Self::BLOCK as i64;
        let d = (here - found as i64).rem_euclid(n);
        Some(if d > n / 2 { d - n } else { d })
    }

    /// Writes `len` bytes of the stream to `w`, each also fed to `hasher`.
    pub fn send(&self, w: &mut impl Write, len: u64, hasher: &mut StreamHasher) -> io::Result<()> {
        let mut sent = 0u64;
        while sent < len {
            let chunk = self.at(sent, (len - sent).min(256 * 1024) as usize);
            w.write_all(chunk)?;
            hasher.update(chunk);
            sent += chunk.len() as u64;
        }
        Ok(())
    }

    /// Reads `r` to EOF: hashes every byte and checks it against the stream. Stops with an
    /// error past `max` bytes (a relay that duplicates or loops cannot keep it reading forever).
    pub fn receive(&self, r: &mut impl Read, max: u64) -> Received {
        let mut hasher = StreamHasher::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut bytes = 0u64;
        let mut first_mismatch = None;
        let error = loop {
            if bytes > max {
                break Some(io::Error::other(format!(
                    "more than the {max} bytes expected"
                )));
            }
            match r.read(&mut buf) {
                Ok(0) => break None,
                Ok(n) => {
                    if first_mismatch.is_none() {
                        first_mismatch = self.check(bytes, &buf[..n]).map(|i| bytes + i as u64);
                    }
                    hasher.update(&buf[..n]);
                    bytes += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Some(e),
            }
        };
        Received {
            bytes,
            sha256: hasher.finish(),
            first_mismatch,
            error,
        }
    }
}

/// What a receiver saw: how many bytes, their sha256, where they first departed from the
/// expected stream, and how the stream ended (`None`: a clean EOF).
#[derive(Debug)]
pub struct Received {
    pub bytes: u64,
    pub sha256: String,
    pub first_mismatch: Option<u64>,
    pub error: Option<io::Error>,
}

/// sha256 of a long stream, as lowercase hex.
///
/// The test crate is built without optimisation, where the `sha2` crate runs at about 20 MB/s:
/// hundreds of MiB would take minutes. So long streams are piped to `sha256sum` (coreutils),
/// which runs at full speed in its own process; without it, `sha2` does the work, slowly.
pub enum StreamHasher {
    Child {
        child: Child,
        stdin: Option<ChildStdin>,
    },
    InProcess(Sha256),
}

impl StreamHasher {
    pub fn new() -> StreamHasher {
        let spawned = Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn();
        match spawned {
            Ok(mut child) => {
                let stdin = child.stdin.take();
                StreamHasher::Child { child, stdin }
            }
            Err(_) => StreamHasher::InProcess(Sha256::new()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            StreamHasher::Child { stdin, .. } => stdin
                .as_mut()
                .expect("hasher used after finish")
                .write_all(data)
                .expect("write to sha256sum"),
            StreamHasher::InProcess(h) => h.update(data),
        }
    }

    pub fn finish(self) -> String {
        match self {
            StreamHasher::Child { child, mut stdin } => {
                drop(stdin.take());
                let out = child.wait_with_output().expect("sha256sum");
                assert!(out.status.success(), "sha256sum failed: {}", out.status);
                let text = String::from_utf8_lossy(&out.stdout);
                let hex = text
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                assert_eq!(hex.len(), 64, "unexpected sha256sum output {text:?}");
                hex
            }
            StreamHasher::InProcess(h) => hex(&h.finalize()),
        }
    }
}

impl Default for StreamHasher {
    fn default() -> Self {
        Self::new()
    }
}

/// sha256 of a short message, as lowercase hex (in process).
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A client connection with [`IO_TIMEOUT`] on reads and writes, TCP_NODELAY on.
pub fn connect(addr: SocketAddr) -> TcpStream {
    try_connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// Like [`connect`], but returns the error (within [`IO_TIMEOUT`]). The options are set before
/// connecting: a connection reset at once (lb does that when no backend is reachable) still
/// comes back as a stream whose first read reports the reset.
pub fn try_connect(addr: SocketAddr) -> io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_read_timeout(Some(IO_TIMEOUT))?;
    socket.set_write_timeout(Some(IO_TIMEOUT))?;
    socket.set_tcp_nodelay(true)?;
    socket.connect_timeout(&addr.into(), IO_TIMEOUT)?;
    Ok(socket.into())
}

/// Like [`try_connect`], from `source` (any port): on loopback, 127.0.0.2, 127.0.0.3, ... are
/// other client addresses as the server sees them.
pub fn connect_from(source: std::net::IpAddr, addr: SocketAddr) -> io::Result<TcpStream> {
    connect_bound(SocketAddr::new(source, 0), addr)
}

/// Like [`try_connect`], from `source` exactly (SO_REUSEADDR, so a port whose earlier
/// connection is in TIME_WAIT can connect elsewhere): the same client address, again.
pub fn connect_bound(source: SocketAddr, addr: SocketAddr) -> io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_read_timeout(Some(IO_TIMEOUT))?;
    socket.set_write_timeout(Some(IO_TIMEOUT))?;
    socket.set_tcp_nodelay(true)?;
    socket.set_reuse_address(true)?;
    socket.bind(&source.into())?;
    socket.connect_timeout(&addr.into(), IO_TIMEOUT)?;
    Ok(socket.into())
}

/// Reads exactly `len` bytes, or fails saying how many came and how the stream ended.
pub fn read_exactly(stream: &mut TcpStream, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; len];
    let mut got = 0;
    while got < len {
        match stream.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF after {got} of {len} bytes"),
                ));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("after {got} of {len} bytes: {e}"),
                ));
            }
        }
    }
    Ok(buf)
}

/// Reads to EOF, at most `max` bytes (more is an error).
pub fn read_to_eof(stream: &mut TcpStream, max: usize) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.len() > max {
                    return Err(io::Error::other(format!(
                        "more than {max} bytes before EOF"
                    )));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("after {} bytes: {e}", out.len()),
                ));
            }
        }
    }
}

/// Writes `msg`, reads the same number of bytes back, and checks they are `msg`.
pub fn echo_round_trip(stream: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    stream.write_all(msg)?;
    let back = read_exactly(stream, msg.len())?;
    if back != msg {
        return Err(io::Error::other(format!(
            "echo of {} bytes came back different",
            msg.len()
        )));
    }
    Ok(())
}

/// How a stream ended, as seen by a reader that drains it: a clean EOF, a reset, or neither
/// within the read timeout.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    Eof,
    Reset,
    /// Any other error, by kind.
    Error(io::ErrorKind),
    /// Nothing within the timeout.
    Timeout,
}

/// Reads and discards until the stream ends; `timeout` bounds each read, and the whole drain
/// is bounded by [`DRAIN_LIMIT`] (then: `Timeout`). Returns how it ended and how many bytes
/// were drained.
pub fn drain_until_end(stream: &mut TcpStream, timeout: Duration) -> (End, u64) {
    stream
        .set_read_timeout(Some(timeout))
        .expect("set_read_timeout");
    let started = Instant::now();
    let mut buf = vec![0u8; 256 * 1024];
    let mut bytes = 0u64;
    while started.elapsed() < DRAIN_LIMIT {
        match stream.read(&mut buf) {
            Ok(0) => return (End::Eof, bytes),
            Ok(n) => bytes += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (end_of(&e), bytes),
        }
    }
    (End::Timeout, bytes)
}

/// The longest [`drain_until_end`] reads a stream that keeps coming.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// Classifies a read or write error.
pub fn end_of(e: &io::Error) -> End {
    match e.kind() {
        io::ErrorKind::ConnectionReset => End::Reset,
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => End::Timeout,
        kind => End::Error(kind),
    }
}

/// Half-closes: shuts down the write side (sends FIN).
pub fn half_close(stream: &TcpStream) {
    stream.shutdown(Shutdown::Write).expect("shutdown(Write)");
}

/// Makes the next close of `stream` send a reset (SO_LINGER 0).
pub fn reset_on_close(stream: &TcpStream) {
    socket2::SockRef::from(stream)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Raises this process's soft open-files limit to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    }
    hard
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mismatch_is_located_as_a_repeat_or_a_skip() {
        let p = Pattern::new(7);
        let window = p.at(5000, 64).to_vec();
        assert_eq!(p.shift_of(6000, &window), Some(1000));
        assert_eq!(p.shift_of(4000, &window), Some(-1000));
        assert_eq!(p.shift_of(6000, &window[..16]), None);
        assert_eq!(p.shift_of(6000, &[0x5a; 64]), None);
    }

    #[test]
    fn pattern_check_finds_the_first_difference_across_blocks() {
        let p = Pattern::new(7);
        let offset = Pattern::BLOCK as u64 - 10;
        let mut data = Vec::new();
        while data.len() < 100 {
            let chunk = p.at(offset + data.len() as u64, 100 - data.len());
            data.extend_from_slice(chunk);
        }
        assert_eq!(p.check(offset, &data), None);
        data[42] ^= 1;
        assert_eq!(p.check(offset, &data), Some(42));
    }

    #[test]
    fn stream_hasher_matches_sha2() {
        let data = Rng::new(1).bytes(100_000);
        let mut h = StreamHasher::new();
        h.update(&data[..5]);
        h.update(&data[5..]);
        assert_eq!(h.finish(), sha256_hex(&data));
    }
}

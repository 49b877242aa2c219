//! A retransmission that partly overlaps bytes the server has already received must reach the
//! backend once. A TCP tail loss probe sends such a segment; the Linux kernel queues it whole
//! on lb's client socket (the part before `rcv_nxt` included), and a dataplane that forwards
//! the queued skb as it is (the sockmap verdict program did) hands the backend the overlap
//! twice.
//!
//! The client here is hand-made, so the overlap happens every time: raw IPv4+TCP packets from
//! an `AF_PACKET` socket in a namespace of its own, whose veth end has no IP address (its
//! kernel never answers or resets the hand-made connection). lb and the backend share the
//! other namespace, which has a permanent neighbour entry for the client's address.
//!
//! ```text
//!  client ns: veth, no address            server ns: veth 10.77.N.1/24, lb on :8080,
//!  AF_PACKET as 10.77.N.2:40001  ───────  backend on 127.0.0.1:9000, admin on 127.0.0.1:9100
//! ```
//!
//! Segment 1 carries bytes 0..1000 of a pattern; once it is acknowledged, segment 2 carries
//! bytes 500..2000 (the same content over the overlap, as a real retransmission has); then a
//! FIN. The backend must read exactly bytes 0..2000, then EOF. The client's initial sequence
//! number is chosen so that segment 2 straddles the 2^32 wrap of the sequence space. Every
//! wait is bounded (a few seconds). All need root (namespaces, BPF); outside root they skip,
//! under `CI=true` that fails.

use std::{
    fmt::Write as _,
    io::Read as _,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::PathBuf,
    process::{Child, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use lb_tests::{
    admin,
    lb::{LbConfig, ServiceSpec, TempDir},
    netns::{NetNs, sh, unique},
    privileged,
};
use nix::{
    libc,
    sys::time::{TimeVal, TimeValLike as _},
};
use serde_yaml::Value;

const LB_PORT: u16 = 8080;
const BACKEND_PORT: u16 = 9000;
const ADMIN_PORT: u16 = 9100;
const CLIENT_PORT: u16 = 40_001;
/// How long the client waits for one acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

/// The stream the client sends: byte `i` is `(i * 7 + 3) % 251`.
fn pattern(range: std::ops::Range<usize>) -> Vec<u8> {
    range.map(|i| ((i * 7 + 3) % 251) as u8).collect()
}

/// Which lb runs in the server namespace.
#[derive(Clone, Copy, Debug)]
enum Dataplane {
    Proxy,
    /// `mode: sockmap`, `promote_after_bytes: 0`: in the kernel from the first byte.
    SockmapAtOnce,
    /// `mode: sockmap` with the default promotion (64 KiB in userspace first).
    SockmapDefaultPromotion,
}

#[test]
fn an_overlapping_retransmit_reaches_the_backend_once_through_proxy() {
    overlap_case(
        "an_overlapping_retransmit_reaches_the_backend_once_through_proxy",
        41,
        Dataplane::Proxy,
        1000,
    );
}

#[test]
fn an_overlapping_retransmit_reaches_the_backend_once_through_sockmap() {
    overlap_case(
        "an_overlapping_retransmit_reaches_the_backend_once_through_sockmap",
        42,
        Dataplane::SockmapAtOnce,
        1000,
    );
}

/// With the default promotion (no `promote_after_bytes` key: 64 KiB, as the README's "shipped
/// promotion"; `config/sockmap.yaml` itself sets 0, the case above) the connection is relayed
/// in userspace for its first 64 KiB: the client sends 70,000 bytes first, so the overlapping
/// segment meets the kernel path after the hand-over.
#[test]
fn an_overlapping_retransmit_reaches_the_backend_once_through_sockmap_default_promotion() {
    overlap_case(
        "an_overlapping_retransmit_reaches_the_backend_once_through_sockmap_default_promotion",
        43,
        Dataplane::SockmapDefaultPromotion,
        70_000,
    );
}

/// The whole case: `first` bytes sent and acknowledged, then a 1500-byte segment starting 500
/// bytes before their end, then FIN; the backend must read bytes `0..first + 1000` exactly.
fn overlap_case(test: &str, net: u8, dataplane: Dataplane, first: usize) {
    if !privileged(test) {
        return;
    }
    let started = Instant::now();
    let link = Link::new(net);
    let backend = Sink::start(&link.server);
    let lb = LbInNs::start(&link.server, &config(&link, dataplane));
    let total = first + 1000;
    let data = pattern(0..total);
    // Segment 2 carries bytes `from..total`. The ISN puts byte `from` at sequence number
    // 2^32 - 700: the segment straddles the wrap of the sequence space, as any may.
    let from = first - 500;
    let isn = 0u32.wrapping_sub(700 + 1 + from as u32);
    let mut client = RawTcp::open(&link, isn);

    client
        .handshake()
        .unwrap_or_else(|e| panic!("{test}: {e}\n{}", client.trace()));
    backend
        .accepted
        .recv_timeout(Duration::from_secs(3))
        .unwrap_or_else(|_| {
            panic!(
                "{test}: lb did not connect the backend within 3 s\n{}",
                client.trace()
            )
        });
    // Let lb hand the pair over (sockmap at once) before the first byte.
    thread::sleep(Duration::from_millis(200));
    if matches!(dataplane, Dataplane::SockmapAtOnce) {
        lb.wait_handed_over(&link.server);
    }

    // Segment 1 (or, with the default promotion, 70,000 bytes in segments of 1400).
    let seg = if first > 1000 { 1400 } else { first };
    client
        .send_stream(&data, 0, first, seg)
        .unwrap_or_else(|e| panic!("{test}: {e}\n{}", client.trace()));
    if matches!(dataplane, Dataplane::SockmapDefaultPromotion) {
        thread::sleep(Duration::from_millis(300));
        lb.wait_handed_over(&link.server);
    }

    // Segment 2: the overlap, one segment of 1500 bytes.
    let coalesced_before = nstat(&link.server, "TcpExtTCPRcvCoalesce");
    client.send(client.seq_at(from), PSH | ACK, &data[from..total]);
    client
        .wait_ack(client.seq_at(total), "the overlapping segment")
        .unwrap_or_else(|e| panic!("{test}: {e}\n{}", client.trace()));
    let coalesced_after = nstat(&link.server, "TcpExtTCPRcvCoalesce");

    // FIN, and the backend's account.
    client.send(client.seq_at(total), FIN | ACK, &[]);
    let fin_acked = client.wait_ack(client.seq_at(total).wrapping_add(1), "the FIN");
    let got = backend.result.recv_timeout(Duration::from_secs(5));
    // The server's FIN (the backend closes after EOF), acknowledged if it comes soon.
    client.linger(Duration::from_millis(300));
    let events = lb.sockmap_events(&link.server);
    eprintln!(
        "{test}: TcpExtTCPRcvCoalesce in the server namespace {coalesced_before:?} -> \
         {coalesced_after:?} around the overlapping segment; sockmap events: {events}; {:?}",
        started.elapsed()
    );
    let (received, error) = match got {
        Ok(r) => r,
        Err(_) => panic!(
            "{test}: the backend did not report within 5 s (FIN: {fin_acked:?})\n{}",
            client.trace()
        ),
    };
    if let Some(first_wrong) = first_difference(&received, &data) {
        let repeated = received.len() == total + 500
            && received[..first] == data[..first]
            && received[first..first + 500] == data[first - 500..first];
        panic!(
            "{test}: the backend received {} bytes, the client sent {total} (bytes 0..{first}, \
             then {from}..{total} again in one segment); first difference at byte {first_wrong}{}\
             {}; backend read error: {error:?}; sockmap events: {events}\n{}",
            received.len(),
            if repeated {
                ": the overlap (500 bytes) arrived twice"
            } else {
                ""
            },
            context(&received, &data, first_wrong),
            client.trace()
        );
    }
    assert!(
        error.is_none(),
        "{test}: the backend got the right bytes, then {error:?} instead of EOF"
    );
    fin_acked.unwrap_or_else(|e| panic!("{test}: {e}\n{}", client.trace()));
}

/// The first offset where `got` and `want` differ (a length difference counts), if any.
fn first_difference(got: &[u8], want: &[u8]) -> Option<usize> {
    got.iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .or_else(|| (got.len() != want.len()).then(|| got.len().min(want.len())))
}

/// A few bytes each side of `at`, received and expected.
fn context(got: &[u8], want: &[u8], at: usize) -> String {
    let lo = at.saturating_sub(4);
    let show = |b: &[u8]| format!("{:?}", &b[lo.min(b.len())..(at + 8).min(b.len())]);
    format!(
        " (from byte {lo}: received {}, expected {})",
        show(got),
        show(want)
    )
}

/// The config for `dataplane`: one service on the server's veth address, one backend, an admin
/// API on loopback (for the sockmap counters).
fn config(link: &Link, dataplane: Dataplane) -> String {
    let mode = match dataplane {
        Dataplane::Proxy => "proxy",
        Dataplane::SockmapAtOnce | Dataplane::SockmapDefaultPromotion => "sockmap",
    };
    let mut service = ServiceSpec::new(
        "overlap",
        &[SocketAddr::from(([127, 0, 0, 1], BACKEND_PORT))],
    );
    service.listen = Some(SocketAddr::from((link.server_ip, LB_PORT)));
    let yaml = LbConfig::new(mode, vec![service]).yaml();
    let mut doc: Value = serde_yaml::from_str(&yaml).expect("LbConfig writes YAML");
    doc["admin"] =
        serde_yaml::from_str(&format!("listen: \"127.0.0.1:{ADMIN_PORT}\"")).expect("admin yaml");
    match dataplane {
        Dataplane::Proxy => {}
        // LbConfig sets `promote_after_bytes: 0` for sockmap; check that it did.
        Dataplane::SockmapAtOnce => assert_eq!(
            doc["dataplane"]["sockmap"]["promote_after_bytes"],
            Value::from(0),
            "{yaml}"
        ),
        // The default promotion: no `sockmap` key at all.
        Dataplane::SockmapDefaultPromotion => {
            doc["dataplane"]
                .as_mapping_mut()
                .expect("dataplane is a mapping")
                .remove("sockmap");
        }
    }
    serde_yaml::to_string(&doc).expect("yaml")
}

/// A counter of `nstat` in `ns` (absolute), if nstat runs; for the report only.
fn nstat(ns: &NetNs, name: &str) -> Option<u64> {
    let out = ns.command("nstat").args(["-asz", name]).output().ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next() == Some(name)).then(|| f.next()?.parse().ok())?
    })
}

/// The client and server namespaces, joined by a veth pair (MTU 9000, so a 1500-byte segment
/// fits). The client's end has no address; the server knows the client's address as a
/// permanent neighbour.
struct Link {
    client_ifindex: i32,
    server_mac: [u8; 6],
    server_ip: Ipv4Addr,
    client_ip: Ipv4Addr,
    server: NetNs,
    client: NetNs,
}

impl Link {
    fn new(net: u8) -> Link {
        let server = NetNs::new("lbos");
        let client = NetNs::new("lboc");
        let server_if = unique("vos");
        let client_if = unique("voc");
        sh(&[
            "ip",
            "link",
            "add",
            &server_if,
            "netns",
            &server.name,
            "type",
            "veth",
            "peer",
            "name",
            &client_if,
            "netns",
            &client.name,
        ]);
        let server_ip = Ipv4Addr::new(10, 77, net, 1);
        let client_ip = Ipv4Addr::new(10, 77, net, 2);
        for (ns, dev) in [(&server, &server_if), (&client, &client_if)] {
            ns.exec(&["ip", "link", "set", dev, "mtu", "9000", "up"]);
        }
        server.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{server_ip}/24"),
            "dev",
            &server_if,
        ]);
        let (_, client_mac) = link_info(&client, &client_if);
        let (_, server_mac) = link_info(&server, &server_if);
        server.exec(&[
            "ip",
            "neigh",
            "replace",
            &client_ip.to_string(),
            "lladdr",
            &client_mac,
            "dev",
            &server_if,
            "nud",
            "permanent",
        ]);
        let (client_ifindex, _) = link_info(&client, &client_if);
        Link {
            client_ifindex,
            server_mac: parse_mac(&server_mac),
            server_ip,
            client_ip,
            server,
            client,
        }
    }
}

/// `(ifindex, MAC)` of `dev` in `ns`.
fn link_info(ns: &NetNs, dev: &str) -> (i32, String) {
    let out = ns.exec(&["ip", "-j", "link", "show", "dev", dev]);
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("`ip -j link show` prints JSON");
    let ifindex = json[0]["ifindex"].as_i64().expect("ifindex") as i32;
    let mac = json[0]["address"].as_str().expect("address").to_owned();
    (ifindex, mac)
}

fn parse_mac(mac: &str) -> [u8; 6] {
    let mut out = [0u8; 6];
    let parts: Vec<u8> = mac
        .split(':')
        .map(|p| u8::from_str_radix(p, 16).expect("hex MAC"))
        .collect();
    out.copy_from_slice(&parts);
    out
}

/// The backend: a listener on 127.0.0.1:9000 in the server namespace that accepts one
/// connection, tells `accepted`, reads it to EOF (at most 10 s) and reports what it read and
/// the error that ended it, if not EOF.
struct Sink {
    accepted: mpsc::Receiver<()>,
    result: mpsc::Receiver<(Vec<u8>, Option<String>)>,
}

impl Sink {
    fn start(ns: &NetNs) -> Sink {
        let listener =
            ns.run(|| TcpListener::bind(("127.0.0.1", BACKEND_PORT)).expect("bind the backend"));
        let (accepted_tx, accepted) = mpsc::channel();
        let (result_tx, result) = mpsc::channel();
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            listener.set_nonblocking(true).expect("nonblocking");
            let mut stream = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
                    Err(_) => return,
                }
            };
            let _ = accepted_tx.send(());
            stream.set_nonblocking(false).expect("blocking");
            let mut got = Vec::new();
            let mut buf = [0u8; 65536];
            let error = loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break Some("no EOF within 10 s".to_owned());
                }
                stream.set_read_timeout(Some(left)).expect("read timeout");
                match stream.read(&mut buf) {
                    Ok(0) => break None,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => break Some(e.to_string()),
                }
            };
            let _ = result_tx.send((got, error));
        });
        Sink { accepted, result }
    }
}

/// lb in the server namespace (`ip netns exec`, which gives it a mount namespace where it
/// mounts a bpffs of its own for its pins), killed on drop; its log printed when a test fails.
struct LbInNs {
    child: Child,
    log: PathBuf,
    _dir: TempDir,
}

impl LbInNs {
    fn start(ns: &NetNs, yaml: &str) -> LbInNs {
        let dir = TempDir::new();
        let config = dir.path.join("lb.yaml");
        let log = dir.path.join("lb.log");
        std::fs::write(&config, yaml).expect("write config");
        let child = ns
            .command(lb_tests::lb::binary().to_str().expect("utf-8 path"))
            .args(["run", "--config", config.to_str().expect("utf-8 path")])
            .args(["--log-level", "debug"])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create log"))
            .spawn()
            .expect("spawn lb");
        let mut lb = LbInNs {
            child,
            log,
            _dir: dir,
        };
        let listening = format!("127.0.0.1:{ADMIN_PORT}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = lb.child.try_wait() {
                panic!("lb exited ({status}):\n{}\nconfig:\n{yaml}", lb.log());
            }
            let log = lb.log();
            if log.contains("admin API listening") && log.contains(&format!(":{LB_PORT}")) && {
                let out = ns.exec(&["ss", "-Hltn"]);
                let out = String::from_utf8_lossy(&out.stdout);
                out.contains(&format!(":{LB_PORT} ")) && out.contains(&listening)
            } {
                return lb;
            }
            assert!(
                Instant::now() < deadline,
                "lb did not listen within 10 s:\n{}\nconfig:\n{yaml}",
                lb.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn metrics(&self, ns: &NetNs) -> admin::Metrics {
        let text = ns.run(|| {
            admin::get(SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT)), "/metrics")
                .expect("GET /metrics")
                .text()
        });
        admin::Metrics::parse(text)
    }

    /// Waits (at most 2 s) until lb has handed the connection to the kernel.
    fn wait_handed_over(&self, ns: &NetNs) {
        let kernel = || {
            self.metrics(ns)
                .value("lb_sockmap_connections_total", &[("relayed_by", "kernel")])
                .unwrap_or(0.0)
        };
        assert!(
            lb_tests::stream::wait_until(Duration::from_secs(2), || kernel() >= 1.0),
            "lb did not hand the connection to the kernel within 2 s:\n{}",
            self.metrics(ns).text
        );
    }

    /// `lb_sockmap_events_total` as `event=value` pairs (empty with proxy).
    fn sockmap_events(&self, ns: &NetNs) -> String {
        let metrics = self.metrics(ns);
        let mut out = String::new();
        for s in metrics.samples("lb_sockmap_events_total") {
            if let prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v)
            | prometheus_parse::Value::Gauge(v) = s.value
            {
                let _ = write!(out, "{}={v} ", s.labels.get("event").unwrap_or("?"));
            }
        }
        if out.is_empty() {
            "none".to_owned()
        } else {
            out.trim_end().to_owned()
        }
    }
}

impl Drop for LbInNs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- lb log, last lines ---\n{}\n--- end of lb log ---",
                lines[lines.len().saturating_sub(60)..].join("\n")
            );
        }
    }
}

/// A segment from the server, as the client saw it.
#[derive(Debug)]
struct Segment {
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    len: usize,
}

/// The hand-made TCP client: an `AF_PACKET` datagram socket (IPv4) on the client's veth end,
/// sending to the server's MAC. No options but MSS, no window scaling, no SACK, no timestamps,
/// no retransmissions (nothing is lost on a veth): a wait for an acknowledgement that does not
/// come fails.
struct RawTcp {
    fd: OwnedFd,
    ifindex: i32,
    server_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    isn: u32,
    /// The highest acknowledgement from the server.
    acked: u32,
    /// The server's last advertised window.
    window: u16,
    /// The server's next sequence number, once its SYN-ACK came.
    rcv_nxt: Option<u32>,
    /// The server's initial sequence number (0 until its SYN-ACK).
    server_isn: u32,
    reset: bool,
    ip_id: u16,
    /// What was sent and received, for a failure message (the last lines).
    log: Vec<String>,
}

impl RawTcp {
    fn open(link: &Link, isn: u32) -> RawTcp {
        let ifindex = link.client_ifindex;
        let fd = link.client.run(move || {
            let proto = (libc::ETH_P_IP as u16).to_be();
            // SAFETY: plain socket(2); the result is checked before it is owned.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                    i32::from(proto),
                )
            };
            assert!(
                fd >= 0,
                "socket(AF_PACKET): {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: a fresh descriptor, owned by nothing else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let addr = sockaddr_ll(ifindex, None);
            // SAFETY: `addr` is a valid sockaddr_ll; its size is passed.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&raw const addr).cast::<libc::sockaddr>(),
                    size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            assert!(
                rc == 0,
                "bind(AF_PACKET): {}",
                std::io::Error::last_os_error()
            );
            fd
        });
        nix::sys::socket::setsockopt(
            &fd,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &TimeVal::milliseconds(20),
        )
        .expect("SO_RCVTIMEO");
        RawTcp {
            fd,
            ifindex,
            server_mac: link.server_mac,
            src: link.client_ip,
            dst: link.server_ip,
            isn,
            acked: isn,
            window: 0,
            rcv_nxt: None,
            server_isn: 0,
            reset: false,
            ip_id: 1,
            log: Vec::new(),
        }
    }

    /// The sequence number of stream byte `offset`.
    fn seq_at(&self, offset: usize) -> u32 {
        self.isn.wrapping_add(1).wrapping_add(offset as u32)
    }

    fn note(&mut self, line: String) {
        if self.log.len() < 400 {
            self.log.push(line);
        }
    }

    /// The packets sent (`>`) and received (`<`), sequence numbers relative to each side's ISN.
    fn trace(&self) -> String {
        format!(
            "client packets (`>` sent, `<` received; seq and ack relative to each side's ISN, \
             the client's {}):\n{}",
            self.isn,
            self.log.join("\n")
        )
    }

    /// Sends one segment; with ACK set, acknowledging what the server sent.
    fn send(&mut self, seq: u32, flags: u8, payload: &[u8]) {
        let ack = if flags & ACK != 0 {
            self.rcv_nxt.unwrap_or(0)
        } else {
            0
        };
        let options: &[u8] = if flags & SYN != 0 {
            &[2, 4, 0x05, 0xb4] // MSS 1460
        } else {
            &[]
        };
        let tcp_len = 20 + options.len() + payload.len();
        let mut tcp = Vec::with_capacity(tcp_len);
        tcp.extend_from_slice(&CLIENT_PORT.to_be_bytes());
        tcp.extend_from_slice(&LB_PORT.to_be_bytes());
        tcp.extend_from_slice(&seq.to_be_bytes());
        tcp.extend_from_slice(&ack.to_be_bytes());
        tcp.push((((20 + options.len()) / 4) as u8) << 4);
        tcp.push(flags);
        tcp.extend_from_slice(&65535u16.to_be_bytes());
        tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        tcp.extend_from_slice(options);
        tcp.extend_from_slice(payload);
        let mut pseudo = Vec::with_capacity(12);
        pseudo.extend_from_slice(&self.src.octets());
        pseudo.extend_from_slice(&self.dst.octets());
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&(tcp_len as u16).to_be_bytes());
        let sum = checksum(&[&pseudo, &tcp]);
        tcp[16..18].copy_from_slice(&sum.to_be_bytes());

        let mut ip = Vec::with_capacity(20 + tcp_len);
        ip.extend_from_slice(&[0x45, 0]);
        ip.extend_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
        ip.extend_from_slice(&self.ip_id.to_be_bytes());
        self.ip_id = self.ip_id.wrapping_add(1);
        ip.extend_from_slice(&[0x40, 0, 64, 6, 0, 0]); // DF, TTL 64, TCP, checksum
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        let sum = checksum(&[&ip]);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        ip.extend_from_slice(&tcp);

        let to = sockaddr_ll(self.ifindex, Some(self.server_mac));
        // SAFETY: `ip` and `to` are valid for the call; their sizes are passed.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                ip.as_ptr().cast(),
                ip.len(),
                0,
                (&raw const to).cast::<libc::sockaddr>(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert!(
            rc == ip.len() as isize,
            "sendto(AF_PACKET) of {} bytes: {rc}, {}",
            ip.len(),
            std::io::Error::last_os_error()
        );
        let line = format!(
            "> seq {} ack {} {} len {}",
            seq.wrapping_sub(self.isn),
            ack.wrapping_sub(self.server_isn),
            flag_names(flags),
            payload.len()
        );
        self.note(line);
    }

    /// The next segment of this connection from the server, if one comes before `until` (once
    /// `until` has passed: if one is queued already). Acknowledges the server's data and FIN as
    /// they come.
    fn recv(&mut self, until: Instant) -> Option<Segment> {
        use nix::{errno::Errno, sys::socket::MsgFlags};
        let mut buf = vec![0u8; 70_000];
        loop {
            let last = Instant::now() >= until;
            let flags = if last {
                MsgFlags::MSG_DONTWAIT
            } else {
                MsgFlags::empty()
            };
            let n = match nix::sys::socket::recv(self.fd.as_raw_fd(), &mut buf, flags) {
                Ok(n) => n,
                Err(Errno::EAGAIN | Errno::EINTR) if last => return None,
                Err(Errno::EAGAIN | Errno::EINTR) => continue,
                Err(e) => panic!("recv(AF_PACKET): {e}"),
            };
            let Some(seg) = self.parse(&buf[..n]) else {
                continue;
            };
            self.note(format!(
                "< seq {} ack {} {} len {} win {}",
                seg.seq.wrapping_sub(self.server_isn),
                seg.ack.wrapping_sub(self.isn),
                flag_names(seg.flags),
                seg.len,
                seg.window
            ));
            if seg.flags & RST != 0 {
                self.reset = true;
                return Some(seg);
            }
            if seg.flags & ACK != 0 && seg.ack.wrapping_sub(self.acked) as i32 > 0 {
                self.acked = seg.ack;
            }
            if seg.flags & ACK != 0 {
                self.window = seg.window;
            }
            if let Some(next) = self.rcv_nxt {
                let fin = u32::from(seg.flags & FIN != 0);
                if seg.len > 0 || fin == 1 {
                    if seg.seq == next {
                        self.rcv_nxt = Some(next.wrapping_add(seg.len as u32 + fin));
                    }
                    // Acknowledge (again, for a segment out of order).
                    let acked = self.acked;
                    self.send(acked, ACK, &[]);
                }
            }
            return Some(seg);
        }
    }

    /// Parses an IPv4 packet; `None` unless it is TCP from lb's port to the client's.
    fn parse(&self, p: &[u8]) -> Option<Segment> {
        if p.len() < 20 || p[0] >> 4 != 4 || p[9] != 6 {
            return None;
        }
        let ihl = usize::from(p[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([p[2], p[3]])).min(p.len());
        if p[12..16] != self.dst.octets() || p[16..20] != self.src.octets() {
            return None;
        }
        let t = p.get(ihl..total)?;
        if t.len() < 20
            || u16::from_be_bytes([t[0], t[1]]) != LB_PORT
            || u16::from_be_bytes([t[2], t[3]]) != CLIENT_PORT
        {
            return None;
        }
        let doff = usize::from(t[12] >> 4) * 4;
        Some(Segment {
            seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
            ack: u32::from_be_bytes([t[8], t[9], t[10], t[11]]),
            flags: t[13],
            window: u16::from_be_bytes([t[14], t[15]]),
            len: t.len().saturating_sub(doff),
        })
    }

    /// SYN, SYN-ACK, ACK.
    fn handshake(&mut self) -> Result<(), String> {
        self.send(self.isn, SYN, &[]);
        let until = Instant::now() + ACK_TIMEOUT;
        loop {
            let Some(seg) = self.recv(until) else {
                return Err(format!("no SYN-ACK within {ACK_TIMEOUT:?}"));
            };
            if self.reset {
                return Err("lb answered the SYN with a reset".to_owned());
            }
            if seg.flags & (SYN | ACK) == SYN | ACK && seg.ack == self.isn.wrapping_add(1) {
                self.rcv_nxt = Some(seg.seq.wrapping_add(1));
                self.server_isn = seg.seq;
                break;
            }
        }
        self.send(self.isn.wrapping_add(1), ACK, &[]);
        Ok(())
    }

    /// Waits until the server has acknowledged everything before `seq`.
    fn wait_ack(&mut self, seq: u32, what: &str) -> Result<(), String> {
        let until = Instant::now() + ACK_TIMEOUT;
        while seq.wrapping_sub(self.acked) as i32 > 0 {
            if self.recv(until).is_none() {
                return Err(format!(
                    "{what}: no acknowledgement of byte {} within {ACK_TIMEOUT:?} (acknowledged: \
                     {})",
                    seq.wrapping_sub(self.isn),
                    self.acked.wrapping_sub(self.isn)
                ));
            }
            if self.reset {
                return Err(format!("{what}: the server reset the connection"));
            }
        }
        Ok(())
    }

    /// Sends stream bytes `from..to` of `data` in segments of at most `seg`, as much as the
    /// server's window and 32 KiB in flight allow, and waits until all of it is acknowledged.
    fn send_stream(
        &mut self,
        data: &[u8],
        from: usize,
        to: usize,
        seg: usize,
    ) -> Result<(), String> {
        let mut next = from;
        while next < to {
            let acked = self.acked.wrapping_sub(self.seq_at(0)) as usize;
            let in_flight = next - acked;
            let room = usize::from(self.window)
                .min(32 * 1024)
                .saturating_sub(in_flight);
            let len = seg.min(to - next).min(room);
            if len == 0 {
                // Window full: wait for the next acknowledgement.
                self.wait_ack(self.seq_at(acked + 1), "the stream")?;
                continue;
            }
            self.send(self.seq_at(next), PSH | ACK, &data[next..next + len]);
            next += len;
            // Take in what has come meanwhile (acknowledgements, window updates).
            while self.recv(Instant::now()).is_some() {}
        }
        self.wait_ack(self.seq_at(to), "the stream")
    }

    /// Reads (and acknowledges) what the server sends for `time`.
    fn linger(&mut self, time: Duration) {
        let until = Instant::now() + time;
        while self.recv(until).is_some() {}
    }
}

fn sockaddr_ll(ifindex: i32, mac: Option<[u8; 6]>) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = (libc::ETH_P_IP as u16).to_be();
    addr.sll_ifindex = ifindex;
    if let Some(mac) = mac {
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&mac);
    }
    addr
}

/// The internet checksum of the concatenation of `parts` (each of even length but the last).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for part in parts {
        let mut chunks = part.chunks_exact(2);
        for c in &mut chunks {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u32::from(*last) << 8;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn flag_names(flags: u8) -> String {
    let mut s = String::new();
    for (bit, name) in [
        (SYN, "SYN"),
        (FIN, "FIN"),
        (RST, "RST"),
        (PSH, "PSH"),
        (ACK, "ACK"),
    ] {
        if flags & bit != 0 {
            if !s.is_empty() {
                s.push('|');
            }
            s.push_str(name);
        }
    }
    s
}

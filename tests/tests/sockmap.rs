//! The sockmap dataplane's own cases, beyond the shared end-to-end suite (which runs on
//! sockmap too): bytes sent before the hand-over, a backend that closes at once, a frozen
//! backend, what the maps show, and the fallbacks (a failing self-test, no capabilities).
//! All need root (BPF); outside root they skip, under `CI=true` that fails.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use lb_tests::{
    admin::{AdminLb, render},
    backend::Backend,
    lb::{Launch, Lb, LbConfig, ServiceSpec, free_addr},
    privileged,
    stream::{StreamHasher, connect, echo_round_trip, read_to_eof, wait_until},
};
use serde_yaml::Value;

/// The edit for a config whose `mode: auto` may pick sockmap (`dataplane.sockmap.enabled:
/// true`), with `pins` as its pin directory.
fn opted_in(pins: &PinDir) -> impl Fn(&mut Value) + '_ {
    move |doc| {
        pins.edit()(doc);
        doc["dataplane"]["sockmap"] = serde_yaml::from_str("enabled: true").expect("yaml");
    }
}

/// A pin directory of its own on bpffs (tests run in parallel), removed on drop.
struct PinDir(PathBuf);

impl PinDir {
    fn new() -> PinDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/lb-tests-{}-{n}",
            std::process::id()
        )))
    }

    /// A config edit that points `dataplane.pin_path` here.
    fn edit(&self) -> impl Fn(&mut Value) + '_ {
        move |doc| {
            doc["dataplane"]["pin_path"] = Value::from(self.0.to_str().expect("utf-8"));
        }
    }

    /// `bpftool -j map dump pinned <dir>/<map>`, parsed.
    fn dump(&self, map: &str) -> Vec<serde_json::Value> {
        let path = self.0.join(map);
        let out = Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(&path)
            .output()
            .expect("run bpftool");
        assert!(
            out.status.success(),
            "bpftool map dump pinned {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "bpftool output is not a JSON list ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sockmap_lb(backends: &[SocketAddr], pins: &PinDir) -> AdminLb {
    let config = LbConfig::new("sockmap", vec![ServiceSpec::new("sm", backends)]);
    AdminLb::start(&config, pins.edit())
}

/// Sockets of process `pid` in CLOSE_WAIT (`ss`), which a relay that forgot a side leaves.
fn close_wait_sockets(pid: u32) -> usize {
    let out = Command::new("ss")
        .args(["-tanpH", "state", "close-wait"])
        .output()
        .expect("run ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .count()
}

#[test]
fn bytes_sent_before_the_hand_over_arrive_and_nothing_is_left_behind() {
    if !privileged("bytes_sent_before_the_hand_over_arrive_and_nothing_is_left_behind") {
        return;
    }
    let backend = Backend::echo();
    let pins = PinDir::new();
    let lb = sockmap_lb(&[backend.addr()], &pins);
    let (fds, sockets) = lb.settled_fd_counts();
    let mut sent = 0u64;
    for i in 0..300u32 {
        // Sent right after connecting: it is almost always queued on lb's socket before lb
        // has connected the backend and handed the pair over (the self-test makes that case
        // deterministic). Either way the kernel must move every byte.
        let msg = format!("request {i} sent before the backend connect completes\n");
        let mut client = connect(lb.addr());
        echo_round_trip(&mut client, msg.as_bytes())
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        sent += msg.len() as u64;
        client.shutdown(Shutdown::Write).unwrap();
        let rest = read_to_eof(&mut client, 1024).unwrap();
        assert!(rest.is_empty(), "connection {i}: unexpected bytes {rest:?}");
    }
    let metrics = lb.metrics();
    assert_eq!(
        metrics.get("lb_sockmap_connections_total", &[("relayed_by", "kernel")]),
        300,
        "every connection is handed to the kernel"
    );
    let redirected = metrics.get("lb_sockmap_events_total", &[("event", "redirect_bytes")]);
    assert_eq!(
        redirected,
        2 * sent,
        "the kernel, not the daemon, moved every byte both ways"
    );
    // Nothing left: no map entry, no fd, no socket, no CLOSE_WAIT.
    assert!(
        wait_until(Duration::from_secs(5), || pins.dump("SK_PEERS").is_empty()),
        "SK_PEERS still holds entries: {:?}",
        pins.dump("SK_PEERS")
    );
    assert!(
        pins.dump("SK_SOCKS").is_empty(),
        "SK_SOCKS still holds sockets"
    );
    assert_eq!(
        lb.settled_fd_counts(),
        (fds, sockets),
        "lb's fds and sockets are back where they were: {:?}",
        lb.fds()
    );
    assert_eq!(
        close_wait_sockets(lb.pid()),
        0,
        "lb left sockets in CLOSE_WAIT"
    );
}

#[test]
fn bpftool_shows_each_open_connection_as_two_named_peer_entries() {
    if !privileged("bpftool_shows_each_open_connection_as_two_named_peer_entries") {
        return;
    }
    let backend = Backend::echo();
    let pins = PinDir::new();
    let lb = sockmap_lb(&[backend.addr()], &pins);
    let mut client = connect(lb.addr());
    echo_round_trip(&mut client, b"0123456789").unwrap();
    let entries = pins.dump("SK_PEERS");
    assert_eq!(entries.len(), 2, "one entry per socket: {entries:?}");
    let cookie = |e: &serde_json::Value| {
        e["formatted"]["key"]
            .as_u64()
            .unwrap_or_else(|| panic!("the key is a u64 cookie: {e}"))
    };
    let field = |e: &serde_json::Value, f: &str| {
        e["formatted"]["value"][f]
            .as_u64()
            .unwrap_or_else(|| panic!("no named field {f:?} in {e}"))
    };
    let (a, b) = (&entries[0], &entries[1]);
    assert_eq!(field(a, "peer_cookie"), cookie(b), "{entries:?}");
    assert_eq!(field(b, "peer_cookie"), cookie(a), "{entries:?}");
    // 10 bytes each way, all redirected by the kernel.
    assert_eq!(field(a, "bytes"), 10, "{entries:?}");
    assert_eq!(field(b, "bytes"), 10, "{entries:?}");
    assert_eq!(field(a, "passed_bytes") + field(b, "passed_bytes"), 0);
    assert_eq!(pins.dump("SK_SOCKS").len(), 2, "both sockets in SK_SOCKS");
    drop(client);
    assert!(
        wait_until(Duration::from_secs(5), || pins.dump("SK_PEERS").is_empty()),
        "the entries leave when the connection ends"
    );
}

#[test]
fn a_backend_that_closes_at_once_ends_the_client_and_leaks_nothing() {
    if !privileged("a_backend_that_closes_at_once_ends_the_client_and_leaks_nothing") {
        return;
    }
    let backend = Backend::spawn(drop);
    let pins = PinDir::new();
    let lb = sockmap_lb(&[backend.addr()], &pins);
    let (fds, sockets) = lb.settled_fd_counts();
    for i in 0..50 {
        let mut client = connect(lb.addr());
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let _ = client.write_all(b"hello?");
        let mut buf = [0u8; 64];
        let started = Instant::now();
        match client.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("connection {i}: {n} bytes from a backend that sent none"),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!(
                "connection {i}: no EOF or reset within 2 s ({e}, after {:?})",
                started.elapsed()
            ),
        }
    }
    assert!(
        wait_until(Duration::from_secs(5), || pins.dump("SK_PEERS").is_empty()),
        "SK_PEERS still holds entries"
    );
    assert_eq!(lb.settled_fd_counts(), (fds, sockets), "{:?}", lb.fds());
    assert_eq!(close_wait_sockets(lb.pid()), 0);
}

/// A backend in its own process (so it can be frozen with SIGSTOP): reads its connection to
/// EOF, then answers with the length and sha256 of what it read.
const DIGEST_BACKEND: &str = r#"
import hashlib, socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(8)
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
h, n = hashlib.sha256(), 0
while True:
    b = c.recv(1 << 20)
    if not b:
        break
    h.update(b)
    n += len(b)
c.sendall(f"{n} {h.hexdigest()}".encode())
c.close()
"#;

#[test]
fn a_frozen_backend_bounds_what_the_kernel_holds_and_the_stream_completes_after_sigcont() {
    if !privileged(
        "a_frozen_backend_bounds_what_the_kernel_holds_and_the_stream_completes_after_sigcont",
    ) {
        return;
    }
    let mut backend: Child = Command::new("python3")
        .args(["-c", DIGEST_BACKEND])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut port = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(backend.stdout.take().unwrap()),
        &mut port,
    )
    .unwrap();
    let backend_addr = SocketAddr::from(([127, 0, 0, 1], port.trim().parse::<u16>().unwrap()));
    let pins = PinDir::new();
    let lb = sockmap_lb(&[backend_addr], &pins);
    let pid = nix::unistd::Pid::from_raw(i32::try_from(backend.id()).unwrap());

    let mut client = connect(lb.addr());
    client.set_nonblocking(true).unwrap();
    let chunk: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut hasher = StreamHasher::new();
    let mut sent = 0u64;
    let mut send_some = |client: &mut TcpStream, until: Instant| -> u64 {
        // Writes until the kernel stops taking bytes for 500 ms, or `until`.
        let mut last_progress = Instant::now();
        while Instant::now() < until && last_progress.elapsed() < Duration::from_millis(500) {
            let off = (sent % chunk.len() as u64) as usize;
            match client.write(&chunk[off..]) {
                Ok(n) => {
                    hasher.update(&chunk[off..off + n]);
                    sent += n as u64;
                    last_progress = Instant::now();
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("client write: {e}"),
            }
        }
        sent
    };
    // Flowing first, then frozen.
    send_some(&mut client, Instant::now() + Duration::from_millis(300));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let before_freeze = send_some(&mut client, Instant::now());
    let stalled_at = send_some(&mut client, Instant::now() + Duration::from_secs(20));
    let held = stalled_at - before_freeze;
    eprintln!(
        "with the backend frozen the path took {:.1} MiB more, then stalled",
        held as f64 / f64::from(1 << 20)
    );
    // The socket buffers along the path (client send, lb receive and send, backend receive)
    // are the bound; the kernel's redirect queue must not grow without one.
    assert!(
        held < 64 << 20,
        "while the backend was frozen the path took {} MiB more: not bounded",
        held >> 20
    );
    // Still stalled a second later: bounded, not merely slow.
    std::thread::sleep(Duration::from_secs(1));
    let more = send_some(&mut client, Instant::now() + Duration::from_millis(600)) - stalled_at;
    assert!(
        more < 1 << 20,
        "{more} more bytes went in with the backend frozen"
    );
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let total = send_some(&mut client, Instant::now() + Duration::from_millis(500));
    client.set_nonblocking(false).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut answer = String::new();
    client
        .read_to_string(&mut answer)
        .expect("the backend's answer");
    let want = format!("{total} {}", hasher.finish());
    assert_eq!(
        answer, want,
        "the backend read exactly what the client sent (length and sha256)"
    );
    let _ = backend.kill();
    let _ = backend.wait();
}

#[test]
fn a_failing_self_test_makes_auto_fall_back_and_explicit_sockmap_refuse() {
    if !privileged("a_failing_self_test_makes_auto_fall_back_and_explicit_sockmap_refuse") {
        return;
    }
    let backend = Backend::echo();
    let pins = PinDir::new();
    let launch = Launch {
        env: &[("LB_SOCKMAP_SELFTEST_FAIL", "1")],
        ..Launch::default()
    };
    // auto (opted in to sockmap): serves through proxy and says why.
    let config = LbConfig::new("auto", vec![ServiceSpec::new("sm", &[backend.addr()])]);
    let config = lb_tests::admin::with_listen_addresses(&config);
    let admin = free_addr();
    let yaml = render(&config, Some(admin), &opted_in(&pins));
    let lb = Lb::try_start_with(&yaml, &[], &launch).expect("auto starts");
    let lb = AdminLb { lb, admin, config };
    lb.wait_for_admin(Duration::from_secs(10));
    let status = lb.status();
    assert_eq!(status.0["dataplane"], "proxy", "{}", status.0);
    let why = status.0["passed_over"]["sockmap"]
        .as_str()
        .unwrap_or_default();
    assert!(why.contains("self-test failed"), "{}", status.0);
    assert!(
        lb.stderr().contains("self-test failed"),
        "the log says why: {}",
        lb.stderr()
    );
    let mut client = connect(lb.addr());
    echo_round_trip(&mut client, b"still served").unwrap();
    drop(lb);

    // Explicit sockmap: a clear error, a non-zero exit.
    let config = LbConfig::new("sockmap", vec![ServiceSpec::new("sm", &[backend.addr()])]);
    let config = lb_tests::admin::with_listen_addresses(&config);
    let yaml = render(&config, None, &pins.edit());
    let err = match Lb::try_start_with(&yaml, &[], &launch) {
        Ok(_) => panic!("mode sockmap served although its self-test failed"),
        Err(e) => e,
    };
    assert!(err.status.is_some_and(|s| !s.success()), "{:?}", err.status);
    assert!(
        err.stderr.contains("sockmap") && err.stderr.contains("self-test failed"),
        "{}",
        err.stderr
    );
}

#[test]
fn without_bpf_capabilities_auto_serves_through_proxy_and_logs_one_line_why() {
    if !privileged("without_bpf_capabilities_auto_serves_through_proxy_and_logs_one_line_why") {
        return;
    }
    let backend = Backend::echo();
    let pins = PinDir::new();
    let config = LbConfig::new("auto", vec![ServiceSpec::new("sm", &[backend.addr()])]);
    let config = lb_tests::admin::with_listen_addresses(&config);
    let admin = free_addr();
    let yaml = render(&config, Some(admin), &opted_in(&pins));
    // As in a container: root, but without CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN (and
    // CAP_PERFMON), which lb cannot regain.
    let launch = Launch {
        wrapper: &[
            "setpriv",
            "--inh-caps=-all",
            "--bounding-set=-bpf,-sys_admin,-net_admin,-perfmon",
            "--",
        ],
        ..Launch::default()
    };
    let lb = Lb::try_start_with(&yaml, &[], &launch).expect("lb starts without capabilities");
    let lb = AdminLb { lb, admin, config };
    lb.wait_for_admin(Duration::from_secs(10));
    let status = lb.status();
    assert_eq!(status.0["dataplane"], "proxy", "{}", status.0);
    let lines: Vec<String> = lb
        .stderr()
        .lines()
        .filter(|l| l.contains("not used") && l.contains("sockmap"))
        .map(str::to_owned)
        .collect();
    assert_eq!(lines.len(), 1, "one line says why not sockmap: {lines:?}");
    assert!(
        lines[0].contains("CAP_BPF"),
        "the line names what is missing: {}",
        lines[0]
    );
    let mut client = connect(lb.addr());
    echo_round_trip(&mut client, b"served without eBPF").unwrap();
    // And it really was without: lb's bounding set has none of the three.
    let caps = std::fs::read_to_string(format!("/proc/{}/status", lb.pid())).unwrap();
    let bounding = caps
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    for (cap, bit) in [
        ("CAP_NET_ADMIN", 12),
        ("CAP_SYS_ADMIN", 21),
        ("CAP_BPF", 39),
    ] {
        assert_eq!(
            bounding & (1 << bit),
            0,
            "{cap} is still in lb's bounding set"
        );
    }
}

/// A loopback bulk upload outruns the kernel's redirect: the direction is held by back
/// pressure (passed up, relayed by lb) and the connection stays on the kernel path.
#[test]
fn a_bulk_upload_is_held_on_the_kernel_path_without_losing_a_byte() {
    if !privileged("a_bulk_upload_is_held_on_the_kernel_path_without_losing_a_byte") {
        return;
    }
    const LEN: u64 = 256 << 20;
    let (report, reports) = std::sync::mpsc::channel();
    // The backend sends nothing back (len 0 its way) and checks what it reads.
    let backend = Backend::sink_source(LEN, 11, 22, report);
    let pins = PinDir::new();
    let lb = sockmap_lb(&[backend.addr()], &pins);
    let mut client = connect(lb.addr());
    client
        .set_write_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut hasher = StreamHasher::new();
    lb_tests::stream::Pattern::new(22)
        .send(&mut client, LEN, &mut hasher)
        .expect("the client sends 256 MiB");
    client.shutdown(Shutdown::Write).unwrap();
    let got = lb_tests::stream::Pattern::new(11).receive(&mut client, LEN);
    assert!(got.error.is_none(), "{got:?}");
    let seen = reports
        .recv_timeout(Duration::from_secs(60))
        .expect("the backend reports");
    assert_eq!(seen.received.bytes, LEN, "{:?}", seen.received);
    assert_eq!(seen.received.first_mismatch, None);
    assert_eq!(seen.received.sha256, hasher.finish());
    let metrics = lb.metrics();
    assert!(
        metrics.get("lb_sockmap_holds_total", &[("dataplane", "sockmap")]) >= 1,
        "the kernel falls behind a loopback bulk upload: the direction is held"
    );
    assert!(
        wait_until(Duration::from_secs(5), || pins.dump("SK_PEERS").is_empty()),
        "no entry left behind"
    );
}

#[test]
fn a_half_closed_download_to_a_slow_client_is_held_and_arrives_exact() {
    if !privileged("a_half_closed_download_to_a_slow_client_is_held_and_arrives_exact") {
        return;
    }
    const LEN: u64 = 96 << 20;
    let (report, reports) = std::sync::mpsc::channel();
    // The backend streams LEN bytes of pattern 33 and checks the upload against pattern 44.
    let backend = Backend::sink_source(LEN, 33, 44, report);
    let pins = PinDir::new();
    let lb = sockmap_lb(&[backend.addr()], &pins);
    let mut client = connect(lb.addr());
    client
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let down = lb_tests::stream::Pattern::new(33);
    let mut hasher = StreamHasher::new();
    // One byte up, and the first bytes down: the connection is in the kernel's hands.
    client
        .write_all(lb_tests::stream::Pattern::new(44).at(0, 1))
        .unwrap();
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0u64;
    let n = client.read(&mut buf).unwrap();
    assert!(n > 0);
    assert_eq!(down.check(0, &buf[..n]), None, "the first bytes are exact");
    hasher.update(&buf[..n]);
    got += n as u64;
    // Now half-closed: back pressure must hold the download while the client does not read.
    client.shutdown(Shutdown::Write).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    loop {
        match client.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                assert_eq!(
                    down.check(got, &buf[..n]),
                    None,
                    "the bytes at {got} are exact"
                );
                hasher.update(&buf[..n]);
                got += n as u64;
                assert!(got <= LEN, "more bytes than the backend sent");
            }
            Err(e) => panic!("after {got} bytes: {e}"),
        }
    }
    assert_eq!(got, LEN);
    let seen = reports
        .recv_timeout(Duration::from_secs(60))
        .expect("the backend reports");
    assert_eq!(hasher.finish(), seen.sent_sha256);
    assert_eq!(seen.received.bytes, 1, "{:?}", seen.received);
    let metrics = lb.metrics();
    assert!(
        metrics.get("lb_sockmap_holds_total", &[("dataplane", "sockmap")]) >= 1,
        "the download was held while the client did not read: {}",
        metrics.text
    );
    assert_eq!(
        metrics.get("lb_sockmap_connections_total", &[("relayed_by", "kernel")]),
        1
    );
}

#[test]
fn with_promote_after_bytes_short_connections_stay_in_userspace_and_long_ones_are_handed_over() {
    if !privileged("with_promote_after_bytes_short_connections_stay_in_userspace") {
        return;
    }
    let backend = Backend::echo();
    let pins = PinDir::new();
    let config = LbConfig::new("sockmap", vec![ServiceSpec::new("sm", &[backend.addr()])]);
    let lb = AdminLb::start(&config, |doc| {
        pins.edit()(doc);
        doc["dataplane"]["sockmap"]["promote_after_bytes"] = Value::from(65536);
    });
    // 20 short exchanges of 1 KiB each way: under 64 KiB, never handed over.
    for i in 0..20 {
        let mut client = connect(lb.addr());
        echo_round_trip(&mut client, &[i as u8; 1024]).unwrap();
    }
    let kernel = |lb: &AdminLb| {
        lb.metrics()
            .get("lb_sockmap_connections_total", &[("relayed_by", "kernel")])
    };
    assert_eq!(kernel(&lb), 0, "short connections stay in userspace");
    // One connection of 200 exchanges of 1 KiB: handed over after 64 KiB, exact throughout.
    let mut client = connect(lb.addr());
    for i in 0..200u32 {
        let msg: Vec<u8> = (0..1024u32).map(|j| ((i * 31 + j) % 251) as u8).collect();
        echo_round_trip(&mut client, &msg).unwrap_or_else(|e| panic!("exchange {i}: {e}"));
    }
    assert_eq!(kernel(&lb), 1, "the long connection was handed over");
    let metrics = lb.metrics();
    assert!(
        metrics.get("lb_sockmap_events_total", &[("event", "redirect_bytes")]) > 100_000,
        "after the hand-over the kernel moved the rest: {}",
        metrics.text
    );
    // The client's FIN is passed on at once (the bytes relayed before the hand-over are
    // accounted for), and the echo backend's FIN comes back.
    let fin_sent = Instant::now();
    client.shutdown(Shutdown::Write).unwrap();
    assert!(read_to_eof(&mut client, 16).unwrap().is_empty());
    assert!(
        fin_sent.elapsed() < Duration::from_millis(500),
        "the half-close took {:?} to go round",
        fin_sent.elapsed()
    );
    assert!(
        !lb.stderr().contains("do not add up"),
        "lb's byte counts at EOF: {}",
        lb.stderr()
    );
    drop(client);
    assert!(wait_until(Duration::from_secs(5), || pins
        .dump("SK_PEERS")
        .is_empty()));
}

/// `ip netns exec NS lb run ...` remounts /sys in a mount namespace of its own, where no bpffs
/// is mounted: lb, with the default pin directory's parent, mounts one there itself (as
/// bpftool and Cilium do) and serves on sockmap, rather than exiting with ENOENT.
#[test]
fn under_ip_netns_exec_lb_mounts_bpffs_and_serves_on_sockmap() {
    if !privileged("under_ip_netns_exec_lb_mounts_bpffs_and_serves_on_sockmap") {
        return;
    }
    let ns = lb_tests::netns::NetNs::new("lbfs");
    let backend = ns.run(Backend::echo);
    let listen = SocketAddr::from(([127, 0, 0, 1], lb_tests::lb::free_port()));
    let dir = lb_tests::lb::TempDir::new();
    let config = dir.path.join("lb.yaml");
    let stderr_path = dir.path.join("lb.stderr");
    std::fs::write(
        &config,
        format!(
            "dataplane:\n  mode: sockmap\n  pin_path: /sys/fs/bpf/lb-fs-{}\nservices:\n  - name: fs\n    listen: \"{listen}\"\n    backends:\n      - address: \"{}\"\n",
            std::process::id(),
            backend.addr()
        ),
    )
    .expect("write config");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(lb_tests::lb::binary())
        .args(["run", "--config"])
        .arg(&config)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("spawn ip netns exec lb");
    let stderr = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let up = wait_until(Duration::from_secs(15), || {
        stderr().contains("listening") || child.try_wait().ok().flatten().is_some()
    });
    let log = stderr();
    let exchanged = up && log.contains("listening") && {
        ns.run(move || {
            let mut c = connect(listen);
            echo_round_trip(&mut c, b"through a bpffs lb mounted itself").is_ok()
        })
    };
    let _ = child.kill();
    let _ = child.wait();
    // Stopped from inside the namespace: its accept loop is woken by a connect there.
    ns.run(move || drop(backend));
    assert!(
        exchanged,
        "lb under `ip netns exec` did not serve on sockmap; stderr:\n{log}"
    );
    assert!(
        log.contains("dataplane=sockmap") && log.contains("mounted one"),
        "expected sockmap and the bpffs mount in the log:\n{log}"
    );
}

/// Issue 13's second report: after a bulk connection was handed back to the splice relay,
/// killing the backend mid-transfer left about one client in four without EOF or reset, and
/// lb holding fds. Five times: four clients stream 8 MiB each from a backend process (bulk:
/// the kernel's backlog passes the hold threshold while they do not read), the backend is
/// killed (SIGKILL); each client must see EOF or a reset within 10 s, and afterwards lb holds
/// no socket and no map entry of theirs. (The hand-back is gone: a bulk connection stays on
/// the kernel path, held by back pressure.)
#[test]
fn a_killed_backend_mid_bulk_ends_every_client_and_leaks_nothing() {
    if !privileged("a_killed_backend_mid_bulk_ends_every_client_and_leaks_nothing") {
        return;
    }
    use lb_tests::{
        backend::KillableBackend,
        stream::{End, drain_until_end, read_exactly},
    };
    for round in 0..5 {
        let Some(mut backend) = KillableBackend::spawn() else {
            panic!("python3 is needed for a backend process to kill");
        };
        let pins = PinDir::new();
        let config = LbConfig::new("sockmap", vec![ServiceSpec::new("sm", &[backend.addr()])]);
        let mut config = lb_tests::admin::with_listen_addresses(&config);
        config.services[0].listen.get_or_insert_with(free_addr);
        let yaml = render(&config, None, &pins.edit());
        let lb = Lb::try_start_with(
            &yaml,
            &[],
            &Launch {
                wrapper: &[],
                env: &[],
            },
        )
        .unwrap_or_else(|e| panic!("lb did not start: {e:?}"));
        let (_, base_sockets) = lb.settled_fd_counts();
        let clients: Vec<TcpStream> = (0..4)
            .map(|i| {
                let mut c = connect(lb.addr());
                c.write_all(&[7u8; 4096]).unwrap();
                read_exactly(&mut c, 8 << 20).unwrap_or_else(|e| {
                    panic!("round {round} client {i}: 8 MiB before the kill: {e}")
                });
                c
            })
            .collect();
        backend.kill();
        let killed = Instant::now();
        let ends: Vec<(End, Duration)> = clients
            .into_iter()
            .map(|mut c| {
                let (end, _) = drain_until_end(&mut c, Duration::from_secs(10));
                (end, killed.elapsed())
            })
            .collect();
        for (i, (end, took)) in ends.iter().enumerate() {
            assert!(
                matches!(end, End::Eof | End::Reset) && *took < Duration::from_secs(10),
                "round {round} client {i}: {end:?} {took:?} after the backend was killed; lb's \
                 sockets:\n{}\nlb:\n{}",
                lb_sockets(lb.pid()),
                lb.stderr()
            );
        }
        let clean = wait_until(Duration::from_secs(5), || lb.socket_count() == base_sockets);
        assert!(
            clean,
            "round {round}: lb holds {} sockets, {base_sockets} before: {:?}",
            lb.socket_count(),
            lb.fds()
        );
        for map in ["SK_PEERS", "SK_SOCKS", "SK_CTRL"] {
            let entries = pins.dump(map);
            assert!(
                entries.is_empty(),
                "round {round}: {map} still holds {} entries: {entries:?}",
                entries.len()
            );
        }
    }
}

/// `ss -tnie` of lb's TCP sockets: queues and state, for a failure message.
fn lb_sockets(pid: u32) -> String {
    let out = Command::new("ss")
        .args(["-tnpie"])
        .output()
        .expect("run ss");
    let text = String::from_utf8_lossy(&out.stdout);
    let keep: Vec<&str> = text
        .lines()
        .filter(|line| line.contains(&format!("pid={pid},")))
        .collect();
    keep.join("\n")
}

/// Issue 13's first report, as reported: a client streams 100,000 bytes in 8 KiB writes
/// without reading, then half-closes; with the shipped promotion (64 KiB) the backend got
/// 116,438 bytes, the range 65,482..81,920 twice (bytes the userspace relay had read from a
/// partly read skb were redirected again after the hand-over). Here at several thresholds
/// (the shipped one, and ones crossed mid-write) and write sizes, the backend must receive
/// exactly the client's bytes, then EOF, and the client the backend's, both ways at once.
#[test]
fn an_upload_then_half_close_arrives_exact_at_every_promotion_threshold() {
    if !privileged("an_upload_then_half_close_arrives_exact_at_every_promotion_threshold") {
        return;
    }
    const LEN: u64 = 100_000;
    for threshold in [None, Some(1000u64), Some(4096), Some(65_000), Some(99_999)] {
        let (report, reports) = std::sync::mpsc::channel();
        // The backend sends as many bytes back while it reads.
        let backend = Backend::sink_source(LEN, 5, 6, report);
        let pins = PinDir::new();
        let config = LbConfig::new("sockmap", vec![ServiceSpec::new("up", &[backend.addr()])]);
        let lb = AdminLb::start(&config, |doc| {
            pins.edit()(doc);
            match threshold {
                // The shipped default: no sockmap key at all.
                None => {
                    doc["dataplane"]
                        .as_mapping_mut()
                        .expect("dataplane")
                        .remove("sockmap");
                }
                Some(t) => {
                    doc["dataplane"]["sockmap"]["promote_after_bytes"] = Value::from(t);
                }
            }
        });
        for write in [8192usize, 1000, 65536, 7] {
            let mut client = connect(lb.addr());
            let pattern = lb_tests::stream::Pattern::new(6);
            let mut sent = 0u64;
            while sent < LEN {
                let chunk = pattern.at(sent, write.min((LEN - sent) as usize));
                client.write_all(chunk).unwrap();
                sent += chunk.len() as u64;
            }
            client.shutdown(Shutdown::Write).unwrap();
            let back = lb_tests::stream::Pattern::new(5).receive(&mut client, LEN);
            let seen = reports
                .recv_timeout(Duration::from_secs(20))
                .expect("the backend reports");
            let case = format!("promote_after_bytes {threshold:?}, writes of {write}");
            assert_eq!(
                (seen.received.bytes, seen.received.first_mismatch),
                (LEN, None),
                "{case}: the backend received {} bytes (first wrong at {:?}), the client sent {LEN}",
                seen.received.bytes,
                seen.received.first_mismatch
            );
            assert!(seen.received.error.is_none(), "{case}: {:?}", seen.received);
            assert!(
                back.error.is_none() && back.bytes == LEN && back.first_mismatch.is_none(),
                "{case}: the client got {back:?}"
            );
        }
    }
}

/// Found by a long torture run (seed 1796759325326428986 round 4247, `mode: auto`): an upload
/// crosses the promotion threshold while the backend, which never reads, sends a long answer.
/// The download direction paused for the promotion at a quiet moment, the upload could not
/// (blocked writing to the backend), and the paused download relayed nothing: the client got
/// 0 bytes, the backend blocked writing, for good. The promotion now gives up after a moment
/// and both directions carry on in userspace. Ten connections, shipped promotion.
#[test]
fn a_promotion_never_stalls_one_direction_behind_a_blocked_one() {
    if !privileged("a_promotion_never_stalls_one_direction_behind_a_blocked_one") {
        return;
    }
    const DOWN: usize = 8 << 20;
    // Reads nothing until it has answered DOWN bytes in 1 KiB writes and half-closed.
    let backend = Backend::spawn(|mut s| {
        let chunk = [9u8; 1024];
        let _ = s.set_write_timeout(Some(Duration::from_secs(30)));
        for _ in 0..DOWN / 1024 {
            if s.write_all(&chunk).is_err() {
                return;
            }
        }
        let _ = s.shutdown(Shutdown::Write);
        // Then reads (and drops) the upload until the client leaves: closing with unread
        // bytes would send a reset, which may overtake the answer's last bytes (TCP drops
        // what a reset finds unread), on any dataplane.
        let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
        let mut sink = vec![0u8; 65536];
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
    });
    let pins = PinDir::new();
    let config = LbConfig::new("sockmap", vec![ServiceSpec::new("st", &[backend.addr()])]);
    let lb = AdminLb::start(&config, |doc| {
        pins.edit()(doc);
        doc["dataplane"]
            .as_mapping_mut()
            .expect("dataplane")
            .remove("sockmap");
    });
    for i in 0..10 {
        let client = connect(lb.addr());
        client
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let mut writer = client.try_clone().unwrap();
        // Uploads until the connection ends (the backend never reads: its window closes).
        let uploader = std::thread::spawn(move || {
            let chunk = [3u8; 65536];
            let _ = writer.set_write_timeout(Some(Duration::from_secs(20)));
            while writer.write_all(&chunk).is_ok() {}
        });
        let mut got = 0usize;
        let mut buf = vec![0u8; 65536];
        let mut reader = &client;
        let end = loop {
            match reader.read(&mut buf) {
                Ok(0) => break "EOF".to_owned(),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break e.to_string(),
            }
        };
        // Ends the upload too (the uploader holds a clone of the socket).
        let _ = client.shutdown(Shutdown::Both);
        drop(client);
        let _ = uploader.join();
        assert_eq!(
            got,
            DOWN,
            "connection {i}: the client got {got} of the backend's {DOWN} bytes, then {end}; lb:\n{}",
            lb.stderr()
        );
    }
}

/// Found by a concurrent stress run (8 clients echoing through the shipped promotion): the
/// client half-closed in the instant between the backend socket's insertion into `SK_SOCKS`
/// and its own. A socket in CLOSE_WAIT cannot enter a sockmap, so lb gave up the hand-over and
/// took the backend socket out again; the backend's answer that had arrived meanwhile had been
/// passed up into that socket's psock, and left with it: the client got 5,000 of 100,000
/// bytes, then EOF. Here lb waits 300 ms between the two insertions
/// (`LB_SOCKMAP_TEST_INSERT_DELAY_MS`), the client half-closes in it and the backend answers
/// in it; every byte must arrive both ways.
#[test]
fn a_client_fin_between_the_two_insertions_loses_nothing() {
    if !privileged("a_client_fin_between_the_two_insertions_loses_nothing") {
        return;
    }
    const FIRST: usize = 70_000;
    const REST: usize = 30_000;
    const ANSWER: usize = 100_000;
    let (report, reports) = std::sync::mpsc::channel();
    // Reads the first part (which crosses the shipped 64 KiB promotion), answers, then reads
    // the rest to EOF and reports what it got.
    let backend = Backend::spawn(move |mut s| {
        let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
        let mut got = vec![0u8; FIRST];
        if s.read_exact(&mut got).is_err() {
            return;
        }
        let answer = lb_tests::stream::Pattern::new(41);
        let _ = s.write_all(answer.at(0, ANSWER));
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        got.extend_from_slice(&rest);
        let _ = s.shutdown(Shutdown::Write);
        let _ = report.send(got);
    });
    let pins = PinDir::new();
    let config = LbConfig::new("sockmap", vec![ServiceSpec::new("fin", &[backend.addr()])]);
    let config = lb_tests::admin::with_listen_addresses(&config);
    let admin = free_addr();
    // The shipped promotion: no sockmap key at all.
    let yaml = render(&config, Some(admin), &|doc: &mut Value| {
        pins.edit()(doc);
        doc["dataplane"]
            .as_mapping_mut()
            .expect("dataplane")
            .remove("sockmap");
    });
    let launch = Launch {
        env: &[("LB_SOCKMAP_TEST_INSERT_DELAY_MS", "300")],
        ..Launch::default()
    };
    let lb = Lb::try_start_with(&yaml, &[], &launch).expect("lb starts");
    let lb = AdminLb { lb, admin, config };
    lb.wait_for_admin(Duration::from_secs(10));
    for round in 0..3 {
        let mut client = connect(lb.addr());
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let upload = lb_tests::stream::Pattern::new(40);
        client.write_all(upload.at(0, FIRST)).unwrap();
        // lb is now between the two insertions (it promotes at 64 KiB).
        std::thread::sleep(Duration::from_millis(100));
        client.write_all(upload.at(FIRST as u64, REST)).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let back = lb_tests::stream::Pattern::new(41).receive(&mut client, ANSWER as u64);
        let got = reports
            .recv_timeout(Duration::from_secs(20))
            .expect("the backend reports");
        assert!(
            back.error.is_none() && back.bytes == ANSWER as u64 && back.first_mismatch.is_none(),
            "round {round}: the client got {back:?} of the backend's {ANSWER} bytes; lb:\n{}",
            lb.stderr()
        );
        assert_eq!(
            (got.len(), upload.check(0, &got)),
            (FIRST + REST, None),
            "round {round}: the backend got {} bytes (first wrong at {:?})",
            got.len(),
            upload.check(0, &got)
        );
    }
    let log = lb.stderr();
    assert!(
        !log.contains("WARN") && !log.contains("ERROR"),
        "lb warned:\n{log}"
    );
}

/// `mode: auto` with nothing else said serves through proxy and says why not sockmap (it is
/// opt-in, see the README);
/// with `dataplane.sockmap.enabled: true` the same file picks sockmap; with `false`, `mode:
/// sockmap` is refused.
#[test]
fn auto_picks_sockmap_only_when_opted_in() {
    if !privileged("auto_picks_sockmap_only_when_opted_in") {
        return;
    }
    let backend = Backend::echo();
    let pins = PinDir::new();
    let config = LbConfig::new("auto", vec![ServiceSpec::new("a", &[backend.addr()])]);
    // The shipped defaults: no sockmap block.
    let lb = AdminLb::start(&config, pins.edit());
    let status = lb.status();
    assert_eq!(status.0["dataplane"], "proxy", "{}", status.0);
    let why = status.0["passed_over"]["sockmap"]
        .as_str()
        .unwrap_or_default();
    assert!(
        why.contains("dataplane.sockmap.enabled: true"),
        "{}",
        status.0
    );
    let mut client = connect(lb.addr());
    echo_round_trip(&mut client, b"auto, defaults").unwrap();
    drop(lb);

    let lb = AdminLb::start(&config, opted_in(&pins));
    assert_eq!(lb.status().0["dataplane"], "sockmap", "{}", lb.status().0);
    let mut client = connect(lb.addr());
    echo_round_trip(&mut client, b"auto, opted in").unwrap();
    drop(lb);

    let config = LbConfig::new("sockmap", vec![ServiceSpec::new("a", &[backend.addr()])]);
    let refused = AdminLb::try_start(&config, |doc| {
        pins.edit()(doc);
        doc["dataplane"]["sockmap"] = serde_yaml::from_str("enabled: false").expect("yaml");
    });
    let (e, _) = refused
        .err()
        .expect("mode sockmap with enabled: false is refused");
    assert!(
        e.stderr.contains("dataplane.sockmap.enabled: false"),
        "{}",
        e.stderr
    );
}

/// Before: a second `lb run` with the same `pin_path` and listen address exited with "Address
/// already in use", but only after it had replaced the first instance's pins and removed its
/// own on the way out: the running instance's maps were gone from bpffs. Now the pin directory
/// is locked by the instance that serves with it: a second one is refused before it touches a
/// pin, naming the holder's pid; once the first drains (SIGTERM), a new one takes over.
#[test]
fn a_second_instance_on_the_same_pin_path_is_refused_and_touches_no_pin() {
    if !privileged("a_second_instance_on_the_same_pin_path_is_refused_and_touches_no_pin") {
        return;
    }
    let backend = Backend::echo();
    let pins = PinDir::new();
    let config = LbConfig::new("sockmap", vec![ServiceSpec::new("one", &[backend.addr()])]);
    let mut first = AdminLb::start(&config, pins.edit());
    let pinned = |dir: &PinDir| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&dir.0)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    };
    let before = pinned(&pins);
    assert!(before.iter().any(|n| n == "SK_SOCKS"), "{before:?}");
    let map_ids = |dir: &PinDir| -> Vec<serde_json::Value> { dir.dump("SK_STATS") };
    let stats_before = map_ids(&pins).len();

    // The same config again: refused, with the first one's pid.
    let yaml = first.render(&first.config.clone(), pins.edit());
    let second = Lb::try_start(&yaml, &[]);
    let err = match second {
        Ok(_) => panic!("a second lb started on the same pin_path"),
        Err(e) => e,
    };
    assert!(
        err.status.is_some_and(|s| !s.success()),
        "{:?}: {}",
        err.status,
        err.stderr
    );
    assert!(
        err.stderr.contains("in use by another running lb")
            && err.stderr.contains(&format!("pid {}", first.pid())),
        "{}",
        err.stderr
    );
    assert_eq!(
        pinned(&pins),
        before,
        "the refused instance changed the pins"
    );
    assert_eq!(map_ids(&pins).len(), stats_before);
    let mut client = connect(first.addr());
    echo_round_trip(&mut client, b"first still serves").unwrap();

    // The first one drains (an open connection keeps it alive): a new one may take over.
    first.signal(nix::sys::signal::Signal::SIGTERM);
    let other = LbConfig::new("sockmap", vec![ServiceSpec::new("two", &[backend.addr()])]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let next = loop {
        match AdminLb::try_start(&other, pins.edit()) {
            Ok(lb) => break lb,
            Err((e, _)) if Instant::now() < deadline && e.stderr.contains("in use") => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err((e, yaml)) => panic!("the next instance did not start: {}\n{yaml}", e.stderr),
        }
    };
    assert!(
        first.try_wait().is_none(),
        "the first one is still draining"
    );
    let mut c2 = connect(next.addr());
    echo_round_trip(&mut c2, b"next serves").unwrap();
    echo_round_trip(&mut client, b"first drains").unwrap();
}

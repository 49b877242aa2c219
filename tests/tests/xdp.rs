//! The xdp dataplane end to end: the real `lb` binary in its own network namespace with the
//! XDP program on its interface, a client and two backends in namespaces of their own, all on
//! one bridge. NAT forwarding: the client talks to the VIP, lb's XDP program rewrites each
//! packet to a backend and sends it back out (XDP_TX); the backends route their replies to
//! the client's subnet through lb, where the program rewrites them back to the VIP. DSR
//! forwarding: the program only rewrites MACs; the backends hold the VIP on their loopback
//! (answering no ARP for it) and reply straight to the client over the bridge.
//!
//! ```text
//!  client 10.77.9.2 ──┐                 ┌── lb  10.77.0.1, 10.77.9.1, VIP 10.77.9.100 (XDP)
//!                     ├── bridge (sw) ──┤
//!  b1 10.77.0.11 ─────┤                 └── b2 10.77.0.12
//! ```

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use lb_tests::{
    netns::{NetNs, sh, unique},
    topology::{Replies, Topology},
};

const VIP: &str = "10.77.9.100:80";

/// A backend in `ns` on port 80: says its name on a line, then echoes until EOF.
fn backend(ns: &NetNs, name: &'static str, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    let path = format!("/var/run/netns/{}", ns.name);
    thread::spawn(move || {
        let f = std::fs::File::open(path).unwrap();
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        // IPv6 and IPv4 (mapped) alike.
        let listener = TcpListener::bind("[::]:80").unwrap();
        listener.set_nonblocking(true).unwrap();
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    thread::spawn(move || {
                        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                        let _ = writeln!(s, "{name}");
                        let mut buf = vec![0u8; 65536];
                        while let Ok(n) = s.read(&mut buf) {
                            if n == 0 || s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = s.shutdown(Shutdown::Write);
                    });
                }
                Err(_) => thread::sleep(Duration::from_millis(5)),
            }
        }
    })
}

/// lb in the lb namespace, killed on drop; its maps pinned on a bpffs of the test's own.
struct LbXdp {
    child: Child,
    bpffs: String,
    dir: std::path::PathBuf,
    log: String,
    starts: u32,
}

const WEB: &str = "services:\n  - name: web\n    listen: \"10.77.9.100:80\"\n    algorithm: maglev\n    maglev_table_size: 5003\n    backends:\n\
     \x20     - address: \"10.77.0.11:80\"\n      - address: \"10.77.0.12:80\"\n    health_check:\n      kind: tcp\n      interval: 500ms\n      timeout: 200ms\n      rise: 1\n      fall: 2\n";

impl LbXdp {
    /// lb in `ns`, XDP on `interface`, with `services` (YAML from `services:` on).
    fn start(ns: &NetNs, interface: &str, forwarding: &str, services: &str, ready: &str) -> LbXdp {
        Self::start_attached(ns, interface, forwarding, "auto", services, ready)
    }

    /// [`LbXdp::start`] with `dataplane.xdp.attach: ATTACH`.
    fn start_attached(
        ns: &NetNs,
        interface: &str,
        forwarding: &str,
        attach: &str,
        services: &str,
        ready: &str,
    ) -> LbXdp {
        let dir = std::env::temp_dir().join(unique("lbxdp"));
        std::fs::create_dir_all(&dir).unwrap();
        let bpffs = dir.join("bpf").to_str().unwrap().to_owned();
        std::fs::create_dir_all(&bpffs).unwrap();
        sh(&["mount", "-t", "bpf", "bpf", &bpffs]);
        let config = format!(
            "dataplane:\n  mode: xdp\n  pin_path: {bpffs}/lb\n  xdp:\n    interface: {interface}\n    forwarding: {forwarding}\n    attach: {attach}\nshutdown_timeout: 2s\n{services}"
        );
        std::fs::write(dir.join("lb.yaml"), config).unwrap();
        let (child, log) = Self::spawn(ns, &dir, 0, &[]);
        let mut lb = LbXdp {
            child,
            bpffs,
            dir,
            log,
            starts: 1,
        };
        lb.wait_for(ready);
        lb
    }

    /// Runs lb on the config in `dir`, logging to a file of its own.
    fn spawn(ns: &NetNs, dir: &std::path::Path, n: u32, extra: &[&str]) -> (Child, String) {
        let log = dir.join(format!("lb{n}.log")).to_str().unwrap().to_owned();
        let child = ns
            .command(lb_tests::lb::binary().to_str().unwrap())
            .args([
                "run",
                "--config",
                dir.join("lb.yaml").to_str().unwrap(),
                "--log-level",
                "debug",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        (child, log)
    }

    fn wait_for(&mut self, ready: &str) {
        let start = Instant::now();
        while !self.log().contains(ready) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "lb did not program the VIP:\n{}",
                self.log()
            );
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "lb exited:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Replaces the services in the config file (from `services:` on) and sends SIGHUP.
    fn reload_services(&self, services: &str) {
        let path = self.dir.join("lb.yaml");
        let config = std::fs::read_to_string(&path).unwrap();
        let head = config.split("services:").next().unwrap();
        std::fs::write(&path, format!("{head}{services}")).unwrap();
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    }

    /// `kill -9`: no clean-up of any kind.
    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, and the exit status.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        self.child.wait().unwrap()
    }

    /// Starts lb again on the same config and pin path (after it exited), with `extra`
    /// arguments.
    fn restart(&mut self, ns: &NetNs, ready: &str, extra: &[&str]) {
        let (child, log) = Self::spawn(ns, &self.dir, self.starts, extra);
        self.starts += 1;
        self.child = child;
        self.log = log;
        self.wait_for(ready);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for LbXdp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("lb log:\n{}", self.log());
        }
        // Unmounting the test's bpffs drops the pinned link and maps with it.
        let _ = std::process::Command::new("umount")
            .arg(&self.bpffs)
            .status();
    }
}

/// Connects to the VIP from the client namespace `n` times; returns the backend names seen.
fn names_seen(topo: &Topology, n: usize) -> Vec<String> {
    names_seen_at(topo, VIP, n)
}

/// [`names_seen`] at `vip`.
fn names_seen_at(topo: &Topology, vip: &'static str, n: usize) -> Vec<String> {
    topo.client.run(move || {
        let vip: SocketAddr = vip.parse().unwrap();
        (0..n)
            .map(|_| {
                let s = TcpStream::connect_timeout(&vip, Duration::from_secs(3))
                    .expect("connect to the VIP");
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                let mut line = String::new();
                BufReader::new(&s)
                    .read_line(&mut line)
                    .expect("a backend's name");
                line.trim().to_owned()
            })
            .collect()
    })
}

/// Sends `len` bytes through the VIP and reads them echoed back; true if they match.
fn exact_bytes(topo: &Topology, vip: &'static str, len: u32) -> bool {
    topo.client.run(move || {
        let vip: SocketAddr = vip.parse().unwrap();
        let s = TcpStream::connect_timeout(&vip, Duration::from_secs(3)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut reader = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let data: Vec<u8> = (0..len)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let sent = data.clone();
        let mut w = s.try_clone().unwrap();
        let writer = thread::spawn(move || {
            w.write_all(&sent).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        let mut back = Vec::new();
        reader.read_to_end(&mut back).unwrap();
        writer.join().unwrap();
        back == data
    })
}

/// Sums a per-CPU counter of a pinned map over CPUs (`field` for struct values), with bpftool
/// (its BTF-formatted view).
fn percpu_sum(map: &str, key: u32, field: Option<&str>) -> u64 {
    let key = key.to_le_bytes().map(|b| b.to_string());
    let mut args = vec!["bpftool", "-j", "map", "lookup", "pinned", map, "key"];
    args.extend(key.iter().map(String::as_str));
    let out = sh(&args);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bpftool JSON for {map}: {e}"));
    let formatted = &v["formatted"];
    let values = formatted["values"]
        .as_array()
        .unwrap_or_else(|| panic!("no formatted per-CPU values in {v}"));
    values
        .iter()
        .map(|cpu| {
            let value = &cpu["value"];
            let value = match field {
                Some(f) => &value[f],
                None => value,
            };
            value
                .as_u64()
                .unwrap_or_else(|| panic!("not a number: {value} in {v}"))
        })
        .sum()
}

#[test]
fn xdp_nat_balances_vip_connections_with_exact_bytes() {
    if !lb_tests::privileged("xdp_nat_balances_vip_connections_with_exact_bytes") {
        return;
    }
    let topo = Topology::new(Replies::ThroughLb);
    let stop = Arc::new(AtomicBool::new(false));
    let servers: Vec<_> = topo
        .backends
        .iter()
        .zip(["b1", "b2"])
        .map(|(ns, name)| backend(ns, name, Arc::clone(&stop)))
        .collect();
    // A veth that receives XDP_TX frames needs an XDP program of its own (GRO alone did not
    // do on this kernel): lb with no services attaches one that passes everything.
    let _pass = LbXdp::start_attached(
        &topo.sw,
        &topo.lb_peer,
        "nat",
        "native",
        "services: []\n",
        "starting",
    );
    let mut lb = LbXdp::start_attached(
        &topo.lb,
        &topo.lb_if,
        "nat",
        "native",
        WEB,
        "VIP programmed in XDP",
    );
    // lb resolves the backends' MACs (managed neighbour entries); wait until both are
    // programmed up.
    thread::sleep(Duration::from_millis(2500));

    let names = names_seen(&topo, 100);
    let b1 = names.iter().filter(|n| *n == "b1").count();
    let b2 = names.iter().filter(|n| *n == "b2").count();
    assert_eq!(
        b1 + b2,
        100,
        "every connection reached a backend: {names:?}"
    );
    assert!(
        b1 >= 25 && b2 >= 25,
        "Maglev spreads 1:1 weights over both backends: b1 {b1}, b2 {b2}"
    );

    // 8 MiB both ways through one connection, byte for byte.
    let ok = exact_bytes(&topo, VIP, 8 << 20);
    assert!(ok, "bytes through the XDP NAT path differ");

    // A reload the pinned maps cannot hold (a Maglev table larger than the one they were
    // made for) is refused whole: b2 stays in the table though the new file drops it.
    lb.reload_services(
        &WEB.replace("maglev_table_size: 5003", "maglev_table_size: 65537")
            .replace("      - address: \"10.77.0.12:80\"\n", ""),
    );
    lb.wait_for("the XDP maps cannot hold this configuration; nothing changed");
    let names = names_seen(&topo, 60);
    assert!(
        names.iter().any(|n| n == "b2") && names.iter().any(|n| n == "b1"),
        "the refused reload changed the table: {names:?}"
    );

    // A reload that moves the service to another VIP port: the new one balances, the old
    // one is no VIP any more (lb's own stack answers it: nothing listens there).
    lb.reload_services(&WEB.replace("10.77.9.100:80", "10.77.9.100:8080"));
    lb.wait_for("reload applied");
    let moved = names_seen_at(&topo, "10.77.9.100:8080", 40);
    assert!(
        moved.iter().any(|n| n == "b1") && moved.iter().any(|n| n == "b2"),
        "the moved VIP does not balance: {moved:?}"
    );
    let old = topo.client.run(|| {
        TcpStream::connect_timeout(&VIP.parse().unwrap(), Duration::from_secs(3)).map(|_| ())
    });
    assert!(
        old.as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
        "the old VIP is still balanced after the service moved: {old:?}"
    );

    // The program did the forwarding: XDP_TX counted, and flows placed.
    let stats = sh(&[
        "bpftool",
        "map",
        "dump",
        "pinned",
        &format!("{}/lb/XDP_STATS", lb.bpffs),
    ]);
    let stats = String::from_utf8_lossy(&stats.stdout);
    assert!(
        stats.contains("\"packets\""),
        "bpftool shows named fields:\n{stats}"
    );
    let _ = &topo.sw;
    stop.store(true, Ordering::Relaxed);
    for s in servers {
        s.join().unwrap();
    }
}

#[test]
fn xdp_backend_down_moves_new_flows_and_leaves_established_ones() {
    if !lb_tests::privileged("xdp_backend_down_moves_new_flows_and_leaves_established_ones") {
        return;
    }
    backend_down(Replies::ThroughLb, "nat");
}

#[test]
fn xdp_dsr_backend_down_moves_new_flows_and_leaves_established_ones() {
    if !lb_tests::privileged("xdp_dsr_backend_down_moves_new_flows_and_leaves_established_ones") {
        return;
    }
    backend_down(Replies::Direct, "dsr");
}

/// A backend going down (health checks) takes new flows off it; an established flow on the
/// other backend carries on. NAT or DSR.
fn backend_down(replies: Replies, forwarding: &str) {
    let topo = Topology::new(replies);
    let stops: Vec<Arc<AtomicBool>> = (0..2).map(|_| Arc::new(AtomicBool::new(false))).collect();
    let servers: Vec<_> = topo
        .backends
        .iter()
        .zip(["b1", "b2"])
        .zip(&stops)
        .map(|((ns, name), stop)| backend(ns, name, Arc::clone(stop)))
        .collect();
    let _pass = LbXdp::start(&topo.sw, &topo.lb_peer, "nat", "services: []\n", "starting");
    let _lb = LbXdp::start(
        &topo.lb,
        &topo.lb_if,
        forwarding,
        WEB,
        "VIP programmed in XDP",
    );
    thread::sleep(Duration::from_millis(2500));

    // An established connection to each backend, kept open by a thread in the client namespace.
    let (to_client, from_test) = std::sync::mpsc::channel::<()>();
    let (report, results) = std::sync::mpsc::channel::<(String, bool)>();
    let client_path = format!("/var/run/netns/{}", topo.client.name);
    let holder = thread::spawn(move || {
        let f = std::fs::File::open(client_path).unwrap();
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let vip: SocketAddr = VIP.parse().unwrap();
        let mut held: Vec<(String, TcpStream)> = Vec::new();
        for _ in 0..40 {
            let s = TcpStream::connect_timeout(&vip, Duration::from_secs(3)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            let name = line.trim().to_owned();
            if !held.iter().any(|(n, _)| *n == name) {
                held.push((name, s));
            }
            if held.len() == 2 {
                break;
            }
        }
        assert_eq!(held.len(), 2, "found a connection to each backend");
        from_test.recv().unwrap();
        // After b2 went down: b1's connection still echoes.
        for (name, mut s) in held {
            let ok = s.write_all(b"still there?").is_ok() && {
                let mut buf = [0u8; 12];
                s.read_exact(&mut buf).is_ok() && &buf == b"still there?"
            };
            report.send((name, ok)).unwrap();
        }
    });
    thread::sleep(Duration::from_millis(500));
    // b2 stops listening: its health checks fail (fall 2 x 500 ms) and it goes down.
    stops[1].store(true, Ordering::Relaxed);
    thread::sleep(Duration::from_millis(2500));
    let names = names_seen(&topo, 40);
    assert!(
        names.iter().all(|n| n == "b1"),
        "new flows avoid the down backend: {names:?}"
    );
    to_client.send(()).unwrap();
    let results: Vec<(String, bool)> = results.iter().take(2).collect();
    holder.join().unwrap();
    let b1 = results.iter().find(|(n, _)| n == "b1").unwrap();
    assert!(
        b1.1,
        "the established flow on b1 was disturbed: {results:?}"
    );
    stops[0].store(true, Ordering::Relaxed);
    for s in servers {
        s.join().unwrap();
    }
}

#[test]
fn xdp_dsr_balances_and_backends_reply_straight_to_the_client() {
    if !lb_tests::privileged("xdp_dsr_balances_and_backends_reply_straight_to_the_client") {
        return;
    }
    let topo = Topology::new(Replies::Direct);
    let stop = Arc::new(AtomicBool::new(false));
    let servers: Vec<_> = topo
        .backends
        .iter()
        .zip(["b1", "b2"])
        .map(|(ns, name)| backend(ns, name, Arc::clone(&stop)))
        .collect();
    let _pass = LbXdp::start(&topo.sw, &topo.lb_peer, "nat", "services: []\n", "starting");
    let lb = LbXdp::start(&topo.lb, &topo.lb_if, "dsr", WEB, "VIP programmed in XDP");
    thread::sleep(Duration::from_millis(2500));
    let stats = format!("{}/lb/XDP_STATS", lb.bpffs);
    let events = format!("{}/lb/XDP_EVENTS", lb.bpffs);
    const XDP_TX: u32 = 3;
    const XDP_PASS: u32 = 2;
    const NAT_REPLY: u32 = 5;
    let tx_before = percpu_sum(&stats, XDP_TX, Some("bytes"));
    let pass_before = percpu_sum(&stats, XDP_PASS, Some("bytes"));

    let names = names_seen(&topo, 100);
    let b1 = names.iter().filter(|n| *n == "b1").count();
    let b2 = names.iter().filter(|n| *n == "b2").count();
    assert_eq!(
        b1 + b2,
        100,
        "every connection reached a backend: {names:?}"
    );
    assert!(
        b1 >= 25 && b2 >= 25,
        "Maglev spreads 1:1 weights over both backends: b1 {b1}, b2 {b2}"
    );
    let len = 8u32 << 20;
    assert!(
        exact_bytes(&topo, VIP, len),
        "bytes through the XDP DSR path differ"
    );

    // Client to backend went through the program (XDP_TX, at least the payload); backend to
    // client never did: no reply was rewritten.
    let tx = percpu_sum(&stats, XDP_TX, Some("bytes")) - tx_before;
    assert!(
        tx >= u64::from(len),
        "XDP_TX carried {tx} bytes, less than the {len} sent"
    );
    assert_eq!(
        percpu_sum(&events, NAT_REPLY, None),
        0,
        "a DSR reply was rewritten by lb"
    );
    let passed = percpu_sum(&stats, XDP_PASS, Some("bytes")) - pass_before;
    assert!(
        passed < u64::from(len / 2),
        "{passed} bytes reached lb's interface and passed: the echo came back through lb"
    );
    stop.store(true, Ordering::Relaxed);
    for s in servers {
        s.join().unwrap();
    }
}

/// The XDP programs attached to `interface` in `ns` (bpftool's ids).
fn xdp_programs(ns: &NetNs, interface: &str) -> Vec<u64> {
    let out = ns.exec(&["bpftool", "-j", "net", "show", "dev", interface]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|section| section["xdp"].as_array().cloned().unwrap_or_default())
        .map(|prog| {
            prog["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("no id in {v}"))
        })
        .collect()
}

/// A connection through the VIP held open by a thread in the client namespace: each
/// [`Held::echo`] sends a line and waits for it back.
struct Held {
    ask: std::sync::mpsc::Sender<Vec<u8>>,
    answers: std::sync::mpsc::Receiver<bool>,
    backend: String,
}

impl Held {
    fn open(topo: &Topology) -> Held {
        let (ask, questions) = std::sync::mpsc::channel::<Vec<u8>>();
        let (answer, answers) = std::sync::mpsc::channel();
        let (name_tx, name_rx) = std::sync::mpsc::channel();
        let path = format!("/var/run/netns/{}", topo.client.name);
        thread::spawn(move || {
            let f = std::fs::File::open(path).unwrap();
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let vip: SocketAddr = VIP.parse().unwrap();
            let s = TcpStream::connect_timeout(&vip, Duration::from_secs(3)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut reader = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            name_tx.send(line.trim().to_owned()).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
            for q in questions {
                let mut back = vec![0u8; q.len()];
                // Written from a thread of its own: a question larger than the socket
                // buffers would otherwise wait on its own echo.
                let mut w = s.try_clone().unwrap();
                let sent = q.clone();
                let writer = thread::spawn(move || w.write_all(&sent).is_ok());
                let read = reader.read_exact(&mut back).is_ok();
                let ok = writer.join().unwrap() && read && back == q;
                if answer.send(ok).is_err() {
                    break;
                }
            }
        });
        let backend = name_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        Held {
            ask,
            answers,
            backend,
        }
    }

    fn echo(&self, text: &str) -> bool {
        self.echo_bytes(text.as_bytes().to_vec())
    }

    /// Sends `data` and waits (8 s at most) for all of it back.
    fn echo_bytes(&self, data: Vec<u8>) -> bool {
        self.ask.send(data).unwrap();
        self.answers
            .recv_timeout(Duration::from_secs(8))
            .unwrap_or(false)
    }
}

#[test]
fn xdp_pinned_link_keeps_flows_through_kill_and_restart() {
    if !lb_tests::privileged("xdp_pinned_link_keeps_flows_through_kill_and_restart") {
        return;
    }
    kill_and_restart(Replies::ThroughLb, "nat");
}

#[test]
fn xdp_dsr_pinned_link_keeps_flows_through_kill_and_restart() {
    if !lb_tests::privileged("xdp_dsr_pinned_link_keeps_flows_through_kill_and_restart") {
        return;
    }
    kill_and_restart(Replies::Direct, "dsr");
}

/// kill -9, a restart on the same pins, SIGTERM and `--fresh`: a held connection keeps its
/// backend throughout and new connections work at every step. NAT or DSR.
fn kill_and_restart(replies: Replies, forwarding: &str) {
    let topo = Topology::new(replies);
    let stop = Arc::new(AtomicBool::new(false));
    let servers: Vec<_> = topo
        .backends
        .iter()
        .zip(["b1", "b2"])
        .map(|(ns, name)| backend(ns, name, Arc::clone(&stop)))
        .collect();
    let _pass = LbXdp::start(&topo.sw, &topo.lb_peer, "nat", "services: []\n", "starting");
    let mut lb = LbXdp::start(
        &topo.lb,
        &topo.lb_if,
        forwarding,
        WEB,
        "VIP programmed in XDP",
    );
    thread::sleep(Duration::from_millis(2500));
    // `attach: auto` on a veth: generic (see xdp_auto_on_veth_attaches_generic_...).
    let link = format!("{}/lb/XDP_LINK_generic_{}", lb.bpffs, topo.lb_if);
    assert!(
        std::path::Path::new(&link).exists(),
        "the XDP link is pinned at {link}"
    );
    let first = xdp_programs(&topo.lb, &topo.lb_if);
    assert_eq!(
        first.len(),
        1,
        "one XDP program on {}: {first:?}",
        topo.lb_if
    );

    let held = Held::open(&topo);
    assert!(held.echo("before the kill\n"), "the held connection echoes");

    // kill -9: nothing is cleaned up, the pinned link keeps the program attached.
    lb.kill9();
    thread::sleep(Duration::from_millis(300));
    assert!(
        held.echo("after the kill\n"),
        "the held connection (on {}) stopped when lb was killed",
        held.backend
    );
    assert_eq!(
        names_seen(&topo, 10).len(),
        10,
        "new connections work with lb dead"
    );
    assert_eq!(xdp_programs(&topo.lb, &topo.lb_if), first);

    // A new daemon on the same pin path: same flow table, the program replaced in the link.
    lb.restart(&topo.lb, "VIP programmed in XDP", &[]);
    assert!(
        lb.log().contains("XDP program replaced in the pinned link"),
        "lb reused the pinned link:\n{}",
        lb.log()
    );
    assert!(
        held.echo("after the restart\n"),
        "the held connection stopped after the restart"
    );
    let again = xdp_programs(&topo.lb, &topo.lb_if);
    assert_eq!(
        again.len(),
        1,
        "exactly one XDP program after the restart: {again:?}"
    );
    assert_ne!(
        again, first,
        "the restarted daemon's program replaced the old one"
    );
    let names = names_seen(&topo, 40);
    assert!(
        names.iter().any(|n| n == "b1") && names.iter().any(|n| n == "b2"),
        "new flows spread over both backends after the restart: {names:?}"
    );
    assert!(held.echo("still\n"));

    // SIGTERM: lb exits cleanly and leaves the program attached, forwarding.
    assert!(
        lb.terminate().success(),
        "lb exits 0 on SIGTERM:\n{}",
        lb.log()
    );
    assert!(
        lb.log().contains("stays attached through its pinned link"),
        "lb says the program stays:\n{}",
        lb.log()
    );
    assert_eq!(xdp_programs(&topo.lb, &topo.lb_if), again);
    assert!(
        held.echo("after SIGTERM\n"),
        "the held connection stopped at SIGTERM"
    );
    assert_eq!(
        names_seen(&topo, 10).len(),
        10,
        "new connections work after SIGTERM"
    );

    // --fresh: every pin removed first; a new link with a new program, still only one.
    lb.restart(&topo.lb, "VIP programmed in XDP", &["--fresh"]);
    let log = lb.log();
    assert!(
        log.contains("fresh start: removed") && !log.contains("replaced in the pinned link"),
        "lb started from clean state:\n{log}"
    );
    let fresh = xdp_programs(&topo.lb, &topo.lb_if);
    assert_eq!(
        fresh.len(),
        1,
        "exactly one XDP program after --fresh: {fresh:?}"
    );
    assert_ne!(fresh, again);
    assert!(
        std::path::Path::new(&link).exists(),
        "the new link is pinned"
    );
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        names_seen(&topo, 10).len(),
        10,
        "new connections work after --fresh"
    );
    drop(held);
    stop.store(true, Ordering::Relaxed);
    for s in servers {
        s.join().unwrap();
    }
}

const VIP6: &str = "[fd77:9::100]:80";

const WEB6: &str = "services:\n  - name: web6\n    listen: \"[fd77:9::100]:80\"\n    algorithm: maglev\n    maglev_table_size: 5003\n    backends:\n\
     \x20     - address: \"[fd77::11]:80\"\n      - address: \"[fd77::12]:80\"\n    health_check:\n      kind: tcp\n      interval: 500ms\n      timeout: 200ms\n      rise: 1\n      fall: 2\n";

/// An IPv6 VIP and IPv6 backends, with `forwarding`: spread over both backends, 4 MiB
/// byte for byte both ways, and replies rewritten by lb (NAT) or never seen by it (DSR).
fn ipv6_end_to_end(replies: Replies, forwarding: &str) {
    let topo = Topology::new(replies);
    let stop = Arc::new(AtomicBool::new(false));
    let servers: Vec<_> = topo
        .backends
        .iter()
        .zip(["b1", "b2"])
        .map(|(ns, name)| backend(ns, name, Arc::clone(&stop)))
        .collect();
    let _pass = LbXdp::start(&topo.sw, &topo.lb_peer, "nat", "services: []\n", "starting");
    let lb = LbXdp::start(
        &topo.lb,
        &topo.lb_if,
        forwarding,
        WEB6,
        "VIP programmed in XDP",
    );
    // lb resolves the backends' MACs (managed neighbour entries) for the next sync.
    thread::sleep(Duration::from_millis(2500));
    let stats = format!("{}/lb/XDP_STATS", lb.bpffs);
    let events = format!("{}/lb/XDP_EVENTS", lb.bpffs);
    const XDP_TX: u32 = 3;
    const NAT_REPLY: u32 = 5;
    let tx_before = percpu_sum(&stats, XDP_TX, Some("bytes"));

    let names = names_seen_at(&topo, VIP6, 100);
    let b1 = names.iter().filter(|n| *n == "b1").count();
    let b2 = names.iter().filter(|n| *n == "b2").count();
    assert_eq!(
        b1 + b2,
        100,
        "every connection reached a backend: {names:?}"
    );
    assert!(
        b1 >= 25 && b2 >= 25,
        "Maglev spreads 1:1 weights over both backends: b1 {b1}, b2 {b2}"
    );
    let len = 4u32 << 20;
    assert!(
        exact_bytes(&topo, VIP6, len),
        "bytes through the XDP {forwarding} path (IPv6) differ"
    );
    let tx = percpu_sum(&stats, XDP_TX, Some("bytes")) - tx_before;
    let replies_rewritten = percpu_sum(&events, NAT_REPLY, None);
    match replies {
        Replies::ThroughLb => assert!(
            tx >= 2 * u64::from(len) && replies_rewritten > 0,
            "NAT: both directions through XDP_TX ({tx} bytes), replies rewritten ({replies_rewritten})"
        ),
        Replies::Direct => assert!(
            tx >= u64::from(len) && replies_rewritten == 0,
            "DSR: requests through XDP_TX ({tx} bytes), no reply rewritten ({replies_rewritten})"
        ),
    }
    stop.store(true, Ordering::Relaxed);
    for s in servers {
        s.join().unwrap();
    }
}

#[test]
fn xdp_ipv6_nat_balances_with_exact_bytes() {
    if !lb_tests::privileged("xdp_ipv6_nat_balances_with_exact_bytes") {
        return;
    }
    ipv6_end_to_end(Replies::ThroughLb, "nat");
}

#[test]
fn xdp_ipv6_dsr_balances_with_exact_bytes() {
    if !lb_tests::privileged("xdp_ipv6_dsr_balances_with_exact_bytes") {
        return;
    }
    ipv6_end_to_end(Replies::Direct, "dsr");
}

#[test]
fn xdp_restart_with_another_config_keeps_established_flows_on_their_backends() {
    if !lb_tests::privileged(
        "xdp_restart_with_another_config_keeps_established_flows_on_their_backends",
    ) {
        return;
    }
    let topo = Topology::new(Replies::ThroughLb);
    let stop = Arc::new(AtomicBool::new(false));
    let servers: Vec<_> = topo
        .backends
        .iter()
        .zip(["b1", "b2"])
        .map(|(ns, name)| backend(ns, name, Arc::clone(&stop)))
        .collect();
    let _pass = LbXdp::start(&topo.sw, &topo.lb_peer, "nat", "services: []\n", "starting");
    // Two services; the second, on port 81, goes away with the restart.
    let web81 = WEB
        .replace("name: web\n", "name: web81\n")
        .replace(":80\"\n    algorithm", ":81\"\n    algorithm");
    let both = format!("{WEB}{}", web81.trim_start_matches("services:\n"));
    let mut lb = LbXdp::start(&topo.lb, &topo.lb_if, "nat", &both, "VIP programmed in XDP");
    thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        names_seen_at(&topo, "10.77.9.100:81", 5).len(),
        5,
        "port 81 is balanced"
    );

    // A held connection on each backend.
    let mut held: Vec<Held> = Vec::new();
    for _ in 0..40 {
        let h = Held::open(&topo);
        if !held.iter().any(|o| o.backend == h.backend) {
            held.push(h);
        }
        if held.len() == 2 {
            break;
        }
    }
    assert_eq!(held.len(), 2, "found a connection to each backend");

    // kill -9, then the config lists the backends the other way round and drops port 81. A
    // daemon that numbered backends by config order would send each flow to the other one.
    // And backends start down, up after 3 checks: a daemon that programmed them down until
    // then would cut their flows.
    lb.kill9();
    let config = std::fs::read_to_string(lb.dir.join("lb.yaml")).unwrap();
    let head = &config[..config.find("services:").unwrap()];
    let reversed = WEB
        .replace("10.77.0.11", "10.77.0.X")
        .replace("10.77.0.12", "10.77.0.11")
        .replace("10.77.0.X", "10.77.0.12")
        .replace("rise: 1\n", "rise: 3\n      initial_state: down\n");
    assert!(reversed.contains("initial_state"));
    std::fs::write(lb.dir.join("lb.yaml"), format!("{head}{reversed}")).unwrap();
    lb.restart(&topo.lb, "VIP programmed in XDP", &[]);
    assert!(
        lb.log()
            .contains("reusing the ids of a previous daemon's maps"),
        "{}",
        lb.log()
    );
    // Logged as the restored state is applied, which may follow the VIP line: waited for.
    lb.wait_for("up, as the previous daemon left it");
    for h in &held {
        assert!(
            h.echo("after a restart with another order\n"),
            "the flow on {} moved or stopped",
            h.backend
        );
    }
    // Port 81 is no service now: its packets reach lb's own stack, which refuses them.
    let refused = topo.client.run(|| {
        let vip: SocketAddr = "10.77.9.100:81".parse().unwrap();
        TcpStream::connect_timeout(&vip, Duration::from_secs(3))
            .map_err(|e| e.kind())
            .err()
    });
    assert_eq!(
        refused,
        Some(std::io::ErrorKind::ConnectionRefused),
        "the VIP of a service no longer configured was removed"
    );
    let names = names_seen(&topo, 40);
    assert!(
        names.iter().any(|n| n == "b1") && names.iter().any(|n| n == "b2"),
        "new flows spread over both backends: {names:?}"
    );
    drop(held);
    stop.store(true, Ordering::Relaxed);
    for s in servers {
        s.join().unwrap();
    }
}

#[test]
fn xdp_program_left_attached_is_reported_by_a_proxy_daemon_and_removed_by_fresh() {
    if !lb_tests::privileged(
        "xdp_program_left_attached_is_reported_by_a_proxy_daemon_and_removed_by_fresh",
    ) {
        return;
    }
    let topo = Topology::new(Replies::ThroughLb);
    let stop = Arc::new(AtomicBool::new(false));
    let servers: Vec<_> = topo
        .backends
        .iter()
        .zip(["b1", "b2"])
        .map(|(ns, name)| backend(ns, name, Arc::clone(&stop)))
        .collect();
    let _pass = LbXdp::start_attached(
        &topo.sw,
        &topo.lb_peer,
        "nat",
        "native",
        "services: []\n",
        "starting",
    );
    let mut lb = LbXdp::start_attached(
        &topo.lb,
        &topo.lb_if,
        "nat",
        "native",
        WEB,
        "VIP programmed in XDP",
    );
    thread::sleep(Duration::from_millis(2500));
    assert_eq!(names_seen(&topo, 5).len(), 5);
    lb.kill9();

    // The same config run as a proxy: the XDP program is still there, and lb says so.
    lb.restart(&topo.lb, "listening", &["--dataplane", "proxy"]);
    assert!(
        lb.log().contains("still attached and balancing its VIPs"),
        "{}",
        lb.log()
    );
    assert_eq!(xdp_programs(&topo.lb, &topo.lb_if).len(), 1);
    lb.kill9();

    // --fresh removes the pins: the program is detached and the proxy carries the traffic.
    lb.restart(&topo.lb, "listening", &["--dataplane", "proxy", "--fresh"]);
    assert!(lb.log().contains("fresh start: removed"), "{}", lb.log());
    assert!(!lb.log().contains("still attached"), "{}", lb.log());
    assert_eq!(xdp_programs(&topo.lb, &topo.lb_if), Vec::<u64>::new());
    assert_eq!(
        names_seen(&topo, 5).len(),
        5,
        "the proxy answers on the VIP"
    );
    stop.store(true, Ordering::Relaxed);
    for s in servers {
        s.join().unwrap();
    }
}

// ---- multi-buffer frames: native attach with GRO and jumbo frames --------------------------

/// The links of a multi-buffer case.
#[derive(Clone, Copy, Debug)]
enum Links {
    /// MTU 1500, GRO on every veth end: the bridge meets aggregated frames.
    Gro,
    /// MTU 9000 and GRO on: frames above a page reach lb's XDP program as multi-buffer
    /// frames (veth refuses to attach a program that is not frags-aware natively there).
    Jumbo,
}

impl Links {
    fn apply(self, topo: &Topology) {
        match self {
            Links::Gro => topo.set_links(1500, true),
            Links::Jumbo => topo.set_links(9000, true),
        }
    }
}

/// A pseudo-random stream of bytes (xorshift), the same for the same seed.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// Sends `len` bytes through `vip` to the echo backend and reads them back, hashing both
/// directions with SHA-256. Every read and write times out after 10 s and the whole exchange
/// after 90 s, so a stall fails instead of hanging. Ok: the time it took.
fn bulk_exact(topo: &Topology, vip: &'static str, len: usize) -> Result<Duration, String> {
    use sha2::{Digest as _, Sha256};
    topo.client.run(move || {
        let start = Instant::now();
        let limit = Duration::from_secs(90);
        let vip: SocketAddr = vip.parse().unwrap();
        let s = TcpStream::connect_timeout(&vip, Duration::from_secs(3))
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut reader = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .map_err(|e| format!("the backend's name: {e}"))?;
        let mut w = s.try_clone().unwrap();
        let writer = thread::spawn(move || -> Result<Vec<u8>, String> {
            let mut pattern = Pattern(0x9e37_79b9_7f4a_7c15);
            let mut hash = Sha256::new();
            let mut buf = vec![0u8; 256 << 10];
            let mut left = len;
            while left > 0 {
                let n = left.min(buf.len());
                pattern.fill(&mut buf[..n]);
                hash.update(&buf[..n]);
                w.write_all(&buf[..n])
                    .map_err(|e| format!("write after {} bytes: {e}", len - left))?;
                left -= n;
                if start.elapsed() > limit {
                    return Err(format!("writing took over {limit:?}"));
                }
            }
            w.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
            Ok(hash.finalize().to_vec())
        });
        let mut hash = Sha256::new();
        let mut got = 0usize;
        let mut buf = vec![0u8; 256 << 10];
        let read = loop {
            if start.elapsed() > limit {
                break Err(format!(
                    "reading took over {limit:?} ({got} of {len} bytes)"
                ));
            }
            match reader.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    hash.update(&buf[..n]);
                    got += n;
                }
                Err(e) => break Err(format!("read after {got} of {len} bytes: {e}")),
            }
        };
        // A stalled reader leaves the writer blocked; closing the socket frees it.
        if read.is_err() {
            let _ = s.shutdown(Shutdown::Both);
        }
        let sent = writer.join().unwrap();
        read?;
        let sent = sent?;
        if got != len {
            return Err(format!("{got} bytes came back, {len} were sent"));
        }
        if hash.finalize().to_vec() != sent {
            return Err("the bytes that came back differ (sha256)".to_owned());
        }
        Ok(start.elapsed())
    })
}

/// The sum of every per-CPU entry of a pinned per-CPU array of `u64` (bpftool's view).
fn percpu_total(map: &str) -> u64 {
    let out = sh(&["bpftool", "-j", "map", "dump", "pinned", map]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bpftool JSON for {map}: {e}"));
    v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|entry| {
            entry["formatted"]["values"]
                .as_array()
                .or_else(|| entry["values"].as_array())
                .cloned()
                .unwrap_or_default()
        })
        .map(|cpu| {
            cpu["value"]
                .as_u64()
                .unwrap_or_else(|| panic!("not a number: {cpu} in {v}"))
        })
        .sum()
}

/// What a failed exchange leaves to look at: every link's counters, and each lb's XDP
/// counters.
fn diagnose(topo: &Topology, lbs: &[&LbXdp]) -> String {
    let mut out = String::new();
    let mut namespaces: Vec<&NetNs> = vec![&topo.sw, &topo.client, &topo.lb];
    namespaces.extend(&topo.backends);
    for ns in namespaces {
        let links = ns.exec(&["ip", "-s", "-s", "-d", "link"]);
        let tcp = ns.exec(&[
            "nstat",
            "-az",
            "TcpInCsumErrors",
            "TcpInSegs",
            "TcpRetransSegs",
        ]);
        out += &format!(
            "--- {}\n{}{}",
            ns.name,
            String::from_utf8_lossy(&links.stdout),
            String::from_utf8_lossy(&tcp.stdout)
        );
    }
    for lb in lbs {
        for map in ["XDP_STATS", "XDP_DROPS", "XDP_EVENTS"] {
            let dump = sh(&[
                "bpftool",
                "map",
                "dump",
                "pinned",
                &format!("{}/lb/{map}", lb.bpffs),
            ]);
            out += &format!(
                "--- {} {map}\n{}",
                lb.bpffs,
                String::from_utf8_lossy(&dump.stdout)
            );
        }
    }
    out
}

/// Asserts that lb attached natively to its interface.
fn assert_native(lb: &LbXdp, topo: &Topology) {
    let link = format!("{}/lb/XDP_LINK_native_{}", lb.bpffs, topo.lb_if);
    assert!(
        std::path::Path::new(&link).exists(),
        "lb did not attach natively (no {link}):\n{}",
        lb.log()
    );
}

/// Native attach on links with GRO (and jumbo frames): short connections spread over both
/// backends, and 32 MiB go up and come back down byte for byte, every frame through the
/// program (no drop, XDP_TX bytes counted whole). NAT or DSR, IPv4 or IPv6.
fn native_bulk(links: Links, replies: Replies, forwarding: &str, v6: bool) {
    let topo = Topology::new(replies);
    links.apply(&topo);
    let stop = Arc::new(AtomicBool::new(false));
    let servers: Vec<_> = topo
        .backends
        .iter()
        .zip(["b1", "b2"])
        .map(|(ns, name)| backend(ns, name, Arc::clone(&stop)))
        .collect();
    let (vip, services) = if v6 { (VIP6, WEB6) } else { (VIP, WEB) };
    let _pass = LbXdp::start_attached(
        &topo.sw,
        &topo.lb_peer,
        "nat",
        "native",
        "services: []\n",
        "starting",
    );
    let lb = LbXdp::start_attached(
        &topo.lb,
        &topo.lb_if,
        forwarding,
        "native",
        services,
        "VIP programmed in XDP",
    );
    assert_native(&lb, &topo);
    thread::sleep(Duration::from_millis(2500));
    let names = names_seen_at(&topo, vip, 40);
    assert!(
        names.iter().any(|n| n == "b1") && names.iter().any(|n| n == "b2"),
        "short connections spread over both backends: {names:?}"
    );

    let stats = format!("{}/lb/XDP_STATS", lb.bpffs);
    let drops = format!("{}/lb/XDP_DROPS", lb.bpffs);
    const XDP_TX: u32 = 3;
    let tx_before = percpu_sum(&stats, XDP_TX, Some("bytes"));
    let frames_before = percpu_sum(&stats, XDP_TX, Some("packets"));
    let drops_before = percpu_total(&drops);
    let len = 32usize << 20;
    let took = bulk_exact(&topo, vip, len).unwrap_or_else(|e| {
        panic!(
            "{links:?} {forwarding} (IPv{}): {e}\n{}",
            if v6 { 6 } else { 4 },
            diagnose(&topo, &[&lb, &_pass])
        )
    });
    let tx = percpu_sum(&stats, XDP_TX, Some("bytes")) - tx_before;
    let frames = percpu_sum(&stats, XDP_TX, Some("packets")) - frames_before;
    eprintln!(
        "{links:?} {forwarding} IPv{}: 32 MiB each way in {took:?}; XDP_TX {frames} frames, {tx} bytes ({} per frame)",
        if v6 { 6 } else { 4 },
        tx / frames.max(1)
    );
    let through = if replies == Replies::ThroughLb { 2 } else { 1 };
    assert!(
        tx >= through * len as u64,
        "XDP_TX counted {tx} bytes, less than the {} that went through it",
        through * len as u64
    );
    assert_eq!(
        percpu_total(&drops) - drops_before,
        0,
        "lb's program dropped frames during the exchange"
    );
    stop.store(true, Ordering::Relaxed);
    for s in servers {
        s.join().unwrap();
    }
}

#[test]
fn xdp_native_gro_nat_ipv4_bulk_exact() {
    if !lb_tests::privileged("xdp_native_gro_nat_ipv4_bulk_exact") {
        return;
    }
    native_bulk(Links::Gro, Replies::ThroughLb, "nat", false);
}

#[test]
fn xdp_native_gro_dsr_ipv4_bulk_exact() {
    if !lb_tests::privileged("xdp_native_gro_dsr_ipv4_bulk_exact") {
        return;
    }
    native_bulk(Links::Gro, Replies::Direct, "dsr", false);
}

#[test]
fn xdp_native_gro_nat_ipv6_bulk_exact() {
    if !lb_tests::privileged("xdp_native_gro_nat_ipv6_bulk_exact") {
        return;
    }
    native_bulk(Links::Gro, Replies::ThroughLb, "nat", true);
}

#[test]
fn xdp_native_gro_dsr_ipv6_bulk_exact() {
    if !lb_tests::privileged("xdp_native_gro_dsr_ipv6_bulk_exact") {
        return;
    }
    native_bulk(Links::Gro, Replies::Direct, "dsr", true);
}

#[test]
fn xdp_native_jumbo_nat_ipv4_bulk_exact() {
    if !lb_tests::privileged("xdp_native_jumbo_nat_ipv4_bulk_exact") {
        return;
    }
    native_bulk(Links::Jumbo, Replies::ThroughLb, "nat", false);
}

#[test]
fn xdp_native_jumbo_dsr_ipv4_bulk_exact() {
    if !lb_tests::privileged("xdp_native_jumbo_dsr_ipv4_bulk_exact") {
        return;
    }
    native_bulk(Links::Jumbo, Replies::Direct, "dsr", false);
}

#[test]
fn xdp_native_jumbo_nat_ipv6_bulk_exact() {
    if !lb_tests::privileged("xdp_native_jumbo_nat_ipv6_bulk_exact") {
        return;
    }
    native_bulk(Links::Jumbo, Replies::ThroughLb, "nat", true);
}

#[test]
fn xdp_native_jumbo_dsr_ipv6_bulk_exact() {
    if !lb_tests::privileged("xdp_native_jumbo_dsr_ipv6_bulk_exact") {
        return;
    }
    native_bulk(Links::Jumbo, Replies::Direct, "dsr", true);
}

/// Native attach on `links`: a held connection moves 1 MiB each way before `kill -9`, with lb
/// dead, and after a restart on the same pins (the program replaced in the native link);
/// then a new connection moves 8 MiB each way.
fn native_kill_and_restart(links: Links) {
    let topo = Topology::new(Replies::ThroughLb);
    links.apply(&topo);
    let stop = Arc::new(AtomicBool::new(false));
    let servers: Vec<_> = topo
        .backends
        .iter()
        .zip(["b1", "b2"])
        .map(|(ns, name)| backend(ns, name, Arc::clone(&stop)))
        .collect();
    let _pass = LbXdp::start_attached(
        &topo.sw,
        &topo.lb_peer,
        "nat",
        "native",
        "services: []\n",
        "starting",
    );
    let mut lb = LbXdp::start_attached(
        &topo.lb,
        &topo.lb_if,
        "nat",
        "native",
        WEB,
        "VIP programmed in XDP",
    );
    assert_native(&lb, &topo);
    thread::sleep(Duration::from_millis(2500));
    let mut pattern = Pattern(7);
    let mut chunk = move || {
        let mut data = vec![0u8; 1 << 20];
        pattern.fill(&mut data);
        data
    };
    let held = Held::open(&topo);
    assert!(held.echo_bytes(chunk()), "1 MiB on the held connection");

    lb.kill9();
    thread::sleep(Duration::from_millis(300));
    assert!(
        held.echo_bytes(chunk()),
        "the held connection (on {}) stopped when lb was killed",
        held.backend
    );
    lb.restart(&topo.lb, "VIP programmed in XDP", &[]);
    assert!(
        lb.log().contains("XDP program replaced in the pinned link"),
        "lb reused the pinned native link:\n{}",
        lb.log()
    );
    assert_native(&lb, &topo);
    assert!(
        held.echo_bytes(chunk()),
        "the held connection stopped after the restart"
    );
    bulk_exact(&topo, VIP, 8 << 20).unwrap_or_else(|e| panic!("after the restart: {e}"));
    assert!(held.echo_bytes(chunk()), "the held connection, at the end");
    drop(held);
    stop.store(true, Ordering::Relaxed);
    for s in servers {
        s.join().unwrap();
    }
}

#[test]
fn xdp_native_gro_flow_survives_kill_and_restart() {
    if !lb_tests::privileged("xdp_native_gro_flow_survives_kill_and_restart") {
        return;
    }
    native_kill_and_restart(Links::Gro);
}

#[test]
fn xdp_native_jumbo_flow_survives_kill_and_restart() {
    if !lb_tests::privileged("xdp_native_jumbo_flow_survives_kill_and_restart") {
        return;
    }
    native_kill_and_restart(Links::Jumbo);
}

/// The reported case: veth links as `ip link` makes them (GRO on, checksum offload on), the
/// default `attach: auto`. Native XDP on veth would drop the checksum-offload state of
/// GRO-merged segments and stall bulk flows, so auto attaches generic there, says why in the
/// log and /status, and a bulk exchange is exact.
#[test]
fn xdp_auto_on_veth_attaches_generic_says_why_and_bulk_is_exact() {
    if !lb_tests::privileged("xdp_auto_on_veth_attaches_generic_says_why_and_bulk_is_exact") {
        return;
    }
    let topo = Topology::new(Replies::ThroughLb);
    topo.set_links(1500, true);
    // As `ip link` creates it: the bridge-side peer leaves checksums to offload.
    topo.sw.exec(&["ethtool", "-K", &topo.lb_peer, "tx", "on"]);
    let stop = Arc::new(AtomicBool::new(false));
    let servers: Vec<_> = topo
        .backends
        .iter()
        .zip(["b1", "b2"])
        .map(|(ns, name)| backend(ns, name, Arc::clone(&stop)))
        .collect();
    let _pass = LbXdp::start(&topo.sw, &topo.lb_peer, "nat", "services: []\n", "starting");
    let with_admin = format!("admin:\n  listen: \"127.0.0.1:9100\"\n{WEB}");
    let lb = LbXdp::start(
        &topo.lb,
        &topo.lb_if,
        "nat",
        &with_admin,
        "VIP programmed in XDP",
    );
    let log = lb.log();
    assert!(
        log.contains("attaching in generic mode") && log.contains("veth"),
        "lb says why it did not attach natively:\n{log}"
    );
    let generic = format!("{}/lb/XDP_LINK_generic_{}", lb.bpffs, topo.lb_if);
    assert!(
        std::path::Path::new(&generic).exists(),
        "attached in generic mode through {generic}:\n{log}"
    );
    // /status says so too (the admin API listens on lb's loopback).
    let status = topo.lb.run(|| {
        let start = Instant::now();
        loop {
            match lb_tests::admin::get("127.0.0.1:9100".parse().unwrap(), "/status") {
                Ok(response) => break response.text(),
                Err(e) if start.elapsed() > Duration::from_secs(5) => panic!("GET /status: {e}"),
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
    });
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["dataplane"], "xdp", "{status}");
    assert_eq!(status["xdp"]["attach"], "generic", "{status}");
    assert_eq!(status["xdp"]["interface"], topo.lb_if.as_str(), "{status}");
    assert!(
        status["xdp"]["native_refused"]
            .as_str()
            .is_some_and(|why| why.contains("veth")),
        "{status}"
    );
    thread::sleep(Duration::from_millis(2500));
    bulk_exact(&topo, VIP, 32 << 20).unwrap_or_else(|e| {
        panic!(
            "through generic XDP: {e}\n{}",
            diagnose(&topo, &[&lb, &_pass])
        )
    });
    stop.store(true, Ordering::Relaxed);
    for s in servers {
        s.join().unwrap();
    }
}

//! The torture suite: seeded randomized rounds (see `lb_tests::torture`) through lb on each
//! dataplane and mode a user can get, each its own test so one failing does not hide another.
//! CI runs a short version; `cargo xtask torture --minutes N` a long one.
//!
//! - proxy;
//! - `mode: auto` with nothing else set (what the demo and the README's first command run:
//!   proxy, since sockmap is opt-in);
//! - proxy and sockmap (shipped promotion) with four connections at once;
//! - sockmap with the shipped default promotion (64 KiB in userspace first);
//! - sockmap with promotion at once;
//! - sockmap with a small threshold, crossed in the middle of a write.
//!
//! (A hand-back of bulk connections to the splice relay had its own variant; the hand-back is
//! gone: see README "Why a bulk connection is not handed back".)

use std::{net::TcpStream, time::Duration};

use lb_tests::{
    admin::render,
    lb::{Launch, Lb, LbConfig, ServiceSpec, free_addr},
    privileged,
    torture::{self, Budget, Target},
};
use serde_yaml::Value;

/// Rounds per test in CI, and the largest transfer each way.
const ROUNDS: u64 = 40;
const MAX_LEN: u64 = 64 << 20;

/// A pin directory of its own on bpffs, removed on drop.
struct PinDir(String);

impl PinDir {
    fn new(name: &str) -> PinDir {
        PinDir(format!(
            "/sys/fs/bpf/lb-torture-{}-{name}",
            std::process::id()
        ))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts lb in `mode` in front of one backend, with `edit` applied to its YAML and `env` in
/// its environment, and runs the torture rounds through it.
fn torture(name: &str, mode: &str, edit: &dyn Fn(&mut Value), env: &[(&str, &str)]) {
    let backend = torture::backend_listener();
    let backend_addr = backend.local_addr().expect("backend address");
    let pins = PinDir::new(name);
    let mut spec = ServiceSpec::new("torture", &[backend_addr]).idle_timeout("60s");
    spec.listen = Some(free_addr());
    let config = LbConfig::new(mode, vec![spec]);
    let pin_path = pins.0.clone();
    let yaml = render(&config, None, &|doc| {
        doc["dataplane"]["pin_path"] = Value::from(pin_path.as_str());
        edit(doc);
    });
    let lb = Lb::try_start_with(&yaml, &[], &Launch { wrapper: &[], env })
        .unwrap_or_else(|e| panic!("lb did not start: {e:?}\nconfig:\n{yaml}"));
    let addr = lb.addr();
    let target = Target {
        connect: Box::new(move || TcpStream::connect(addr)),
        backend,
        lb_pid: lb.pid(),
        count_fds: true,
    };
    let budget = Budget::from_env(ROUNDS, MAX_LEN);
    let rounds = torture::run(name, &target, budget);
    assert!(rounds > 0, "no round ran");
    if let Some(events) = verdict_events(&pins.0) {
        check_repeats(name, &events);
    }
    assert!(
        !lb.stderr().contains("panicked"),
        "lb panicked:\n{}",
        lb.stderr()
    );
}

/// Like [`torture`], with `clients` connections at once: one service and backend per client
/// thread, each thread running its own seeded rounds (each prints its seed); lb must hold no
/// more sockets at the end than before the first round. Concurrency is what found the sockmap
/// insertion race and the kernel's repeated segment (issue 13): rounds one at a time took hours
/// to show what four at once show in minutes.
fn torture_concurrent(name: &str, mode: &str, clients: usize, edit: &dyn Fn(&mut Value)) {
    let backends: Vec<std::net::TcpListener> =
        (0..clients).map(|_| torture::backend_listener()).collect();
    let pins = PinDir::new(name);
    let specs = backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let addr = b.local_addr().expect("backend address");
            let mut spec = ServiceSpec::new(&format!("torture{i}"), &[addr]).idle_timeout("60s");
            spec.listen = Some(free_addr());
            spec
        })
        .collect();
    let config = LbConfig::new(mode, specs);
    let pin_path = pins.0.clone();
    let yaml = render(&config, None, &|doc| {
        doc["dataplane"]["pin_path"] = Value::from(pin_path.as_str());
        edit(doc);
    });
    let lb = Lb::try_start_with(&yaml, &[], &Launch::default())
        .unwrap_or_else(|e| panic!("lb did not start: {e:?}\nconfig:\n{yaml}"));
    let (_, sockets_before) = lb.settled_fd_counts();
    let budget = Budget::from_env(ROUNDS / 2, MAX_LEN);
    let lb_pid = lb.pid();
    let rounds: u64 = std::thread::scope(|scope| {
        let runs: Vec<_> = backends
            .into_iter()
            .zip(lb.addrs().to_vec())
            .enumerate()
            .map(|(i, (backend, addr))| {
                let name = format!("{name}-{i}");
                scope.spawn(move || {
                    let target = Target {
                        connect: Box::new(move || TcpStream::connect(addr)),
                        backend,
                        lb_pid,
                        count_fds: false,
                    };
                    torture::run(&name, &target, budget)
                })
            })
            .collect();
        let results: Vec<_> = runs.into_iter().map(|r| r.join()).collect();
        if results.iter().any(Result::is_err)
            && let Some(events) = verdict_events(&pins.0)
        {
            // What the verdict program did, for the failure's diagnosis.
            eprintln!("{name}: verdict events by SK_STATS index: {events:?}");
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .sum()
    });
    assert!(rounds > 0, "no round ran");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut sockets = lb.settled_fd_counts().1;
    while sockets > sockets_before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        sockets = lb.settled_fd_counts().1;
    }
    assert!(
        sockets <= sockets_before,
        "{name}: lb holds {sockets} sockets after {rounds} rounds, {sockets_before} before"
    );
    if let Some(events) = verdict_events(&pins.0) {
        check_repeats(name, &events);
    }
    assert!(
        !lb.stderr().contains("panicked"),
        "lb panicked:\n{}",
        lb.stderr()
    );
}

#[test]
fn torture_proxy_concurrent() {
    torture_concurrent("proxy-concurrent", "proxy", 4, &|_| {});
}

#[test]
fn torture_sockmap_concurrent() {
    if !privileged("torture_sockmap_concurrent") {
        return;
    }
    torture_concurrent("sockmap-concurrent", "sockmap", 4, &shipped_sockmap);
}

/// The sockmap verdict program's counters (`SK_STATS`, summed over CPUs, by index), read with
/// bpftool from the pin directory; `None` when lb pinned no sockmap there (another dataplane).
fn verdict_events(pin_dir: &str) -> Option<Vec<u64>> {
    let path = format!("{pin_dir}/SK_STATS");
    if !std::path::Path::new(&path).exists() {
        return None;
    }
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned", &path])
        .output()
        .expect("bpftool (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    let mut events = Vec::new();
    for entry in dump.as_array().expect("an array") {
        let formatted = &entry["formatted"];
        let key = formatted["key"].as_u64().expect("key") as usize;
        let sum = formatted["values"]
            .as_array()
            .expect("per-CPU values")
            .iter()
            .map(|v| v["value"].as_u64().expect("a u64"))
            .sum();
        events.resize(events.len().max(key + 1), 0);
        events[key] = sum;
    }
    Some(events)
}

/// Prints what the verdict program cut, and fails if it ever could not cut a repeat (the
/// rounds' byte checks fail first if a repeat reached a peer; this names the cause).
fn check_repeats(name: &str, events: &[u64]) {
    // Indices as in the README's `SK_STATS` row: 7 repeat, 8 repeat_bytes, 9 repeat_uncut.
    let get = |i: usize| events.get(i).copied().unwrap_or(0);
    eprintln!(
        "{name}: the verdict program cut {} repeated bytes from {} skbs ({} uncut)",
        get(8),
        get(7),
        get(9)
    );
    assert_eq!(
        get(9),
        0,
        "{name}: the verdict program could not cut {} repeats",
        get(9)
    );
}

/// Removes `dataplane.sockmap` from the YAML: the shipped defaults.
fn shipped_sockmap(doc: &mut Value) {
    if let Some(dp) = doc["dataplane"].as_mapping_mut() {
        dp.remove("sockmap");
    }
}

fn promote_after(bytes: u64) -> impl Fn(&mut Value) {
    move |doc| {
        doc["dataplane"]["sockmap"] =
            serde_yaml::from_str(&format!("promote_after_bytes: {bytes}")).expect("yaml");
    }
}

#[test]
fn torture_proxy() {
    torture("proxy", "proxy", &|_| {}, &[]);
}

#[test]
fn torture_auto_with_shipped_defaults() {
    if !privileged("torture_auto_with_shipped_defaults") {
        return;
    }
    torture("auto", "auto", &shipped_sockmap, &[]);
}

#[test]
fn torture_sockmap_with_shipped_defaults() {
    if !privileged("torture_sockmap_with_shipped_defaults") {
        return;
    }
    torture("sockmap-defaults", "sockmap", &shipped_sockmap, &[]);
}

#[test]
fn torture_sockmap_promoted_at_once() {
    if !privileged("torture_sockmap_promoted_at_once") {
        return;
    }
    torture("sockmap-at-once", "sockmap", &promote_after(0), &[]);
}

#[test]
fn torture_sockmap_small_threshold_crossed_mid_write() {
    if !privileged("torture_sockmap_small_threshold_crossed_mid_write") {
        return;
    }
    torture("sockmap-1000", "sockmap", &promote_after(1000), &[]);
}

/// The xdp dataplane on the namespace topology (`lb_tests::topology`) with GRO on every veth
/// end: lb in its namespace with XDP attached `attach` (native or generic) on its interface,
/// forwarding NAT or DSR, one backend (b1) serving the torture rounds on port 80 of the VIP
/// (DSR) or its own address (NAT), the client in its namespace. The bpffs is a private mount.
fn torture_xdp(name: &str, attach: &str, forwarding: &str) {
    use lb_tests::{
        netns::sh,
        topology::{Replies, Topology},
    };
    let replies = if forwarding == "dsr" {
        Replies::Direct
    } else {
        Replies::ThroughLb
    };
    let topo = Topology::new(replies);
    topo.set_links(1500, true);
    let dir = lb_tests::lb::TempDir::new();
    let bpffs = dir.path.join("bpf");
    std::fs::create_dir_all(&bpffs).expect("bpffs dir");
    let bpffs = bpffs.to_str().expect("utf-8").to_owned();
    sh(&["mount", "-t", "bpf", "bpf", &bpffs]);
    struct Unmount(String);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(bpffs.clone());
    let backend = topo.backends[0]
        .run(|| std::net::TcpListener::bind("0.0.0.0:80").expect("bind the backend on port 80"));
    let start = |ns: &lb_tests::netns::NetNs, interface: &str, services: &str, n: u32| {
        let yaml = format!(
            "dataplane:\n  mode: xdp\n  pin_path: {bpffs}/lb{n}\n  xdp:\n    interface: {interface}\n    attach: {attach}\n    forwarding: {forwarding}\nshutdown_timeout: 2s\n{services}"
        );
        let config = dir.path.join(format!("lb{n}.yaml"));
        let log = dir.path.join(format!("lb{n}.log"));
        std::fs::write(&config, yaml).expect("write config");
        let child = ns
            .command(lb_tests::lb::binary().to_str().expect("utf-8"))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn lb");
        (KillOnDrop(child), log)
    };
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let read = |log: &std::path::Path| std::fs::read_to_string(log).unwrap_or_default();
    // The peer of lb's interface takes XDP_TX frames; native veth needs a program there too.
    let _pass = (attach == "native").then(|| {
        let (child, log) = start(&topo.sw, &topo.lb_peer, "services: []\n", 0);
        let ok = lb_tests::stream::wait_until(Duration::from_secs(10), || {
            read(&log).contains("starting")
        });
        assert!(ok, "the pass program did not start:\n{}", read(&log));
        child
    });
    let services = "services:\n  - name: web\n    listen: \"10.77.9.100:80\"\n    algorithm: maglev\n    maglev_table_size: 5003\n    backends:\n      - address: \"10.77.0.11:80\"\n";
    let (lb, log) = start(&topo.lb, &topo.lb_if, services, 1);
    let programmed = lb_tests::stream::wait_until(Duration::from_secs(10), || {
        read(&log).contains("VIP programmed in XDP")
    });
    assert!(programmed, "lb did not program the VIP:\n{}", read(&log));
    assert!(
        read(&log).contains(&format!("mode={attach}")) || attach == "auto",
        "lb did not attach {attach}:\n{}",
        read(&log)
    );
    // The backend's MAC is resolved in the background: give it a moment.
    std::thread::sleep(Duration::from_millis(1500));
    let client_ns = topo.client.name.clone();
    let target = Target {
        // A socket belongs to the namespace of the thread that makes it.
        connect: Box::new(move || {
            let path = format!("/var/run/netns/{client_ns}");
            std::thread::spawn(move || {
                let ns = std::fs::File::open(path)?;
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                TcpStream::connect_timeout(
                    &"10.77.9.100:80".parse().expect("VIP"),
                    Duration::from_secs(5),
                )
            })
            .join()
            .expect("connect thread")
        }),
        backend,
        lb_pid: lb.0.id(),
        count_fds: false,
    };
    // Fewer, smaller rounds: each byte crosses four veth hops and the program twice.
    let budget = Budget::from_env(ROUNDS / 2, MAX_LEN / 4);
    let rounds = torture::run(name, &target, budget);
    assert!(rounds > 0, "no round ran");
    let text = read(&log);
    assert!(!text.contains("panicked"), "lb panicked:\n{text}");
}

#[test]
fn torture_xdp_nat_native() {
    if !privileged("torture_xdp_nat_native") {
        return;
    }
    torture_xdp("xdp-nat-native", "native", "nat");
}

#[test]
fn torture_xdp_nat_generic() {
    if !privileged("torture_xdp_nat_generic") {
        return;
    }
    torture_xdp("xdp-nat-generic", "generic", "nat");
}

#[test]
fn torture_xdp_dsr_native() {
    if !privileged("torture_xdp_dsr_native") {
        return;
    }
    torture_xdp("xdp-dsr-native", "native", "dsr");
}

#[test]
fn torture_xdp_dsr_generic() {
    if !privileged("torture_xdp_dsr_generic") {
        return;
    }
    torture_xdp("xdp-dsr-generic", "generic", "dsr");
}

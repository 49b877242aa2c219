//! The torture suite: seeded randomized rounds (see `lb_tests::torture`) through lb on each
//! dataplane and mode a user can get, each its own test so one failing does not hide another.
//! CI runs a short version; `cargo xtask torture --minutes N` a long one.
//!
//! - proxy;
//! - `mode: auto` with nothing else set (what the demo and the README's first command run;
//!   on a machine with BPF it picks sockmap);
//! - sockmap with the shipped default promotion (64 KiB in userspace first);
//! - sockmap with promotion at once;
//! - sockmap with a small threshold, crossed in the middle of a write;
//! - sockmap with the hand-back to the splice relay forced for every bulk connection.

use std::net::TcpStream;

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
    assert!(
        !lb.stderr().contains("panicked"),
        "lb panicked:\n{}",
        lb.stderr()
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

#[test]
fn torture_sockmap_hand_back_forced() {
    if !privileged("torture_sockmap_hand_back_forced") {
        return;
    }
    torture(
        "sockmap-hand-back",
        "sockmap",
        &promote_after(0),
        &[("LB_SOCKMAP_HANDBACK_BACKLOG", "65536")],
    );
}

//! Network namespaces and veth pairs made for one test and removed when it ends.
//!
//! Names carry the test process id and a counter so concurrent tests never collide. Every
//! address used lives inside namespaces the test made itself.

use std::{
    fs::File,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A unique short name (interface names are cut at 15 characters).
pub fn unique(prefix: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// Runs a command; panics with its output when it fails.
pub fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace, deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(prefix: &str) -> NetNs {
        let name = unique(prefix);
        sh(&["ip", "netns", "add", &name]);
        let ns = NetNs { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace; panics if it fails.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// A `Command` that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `f` on a thread of its own inside this namespace and returns its result
    /// (processes `f` starts are in the namespace too). A panic in `f` is passed on.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = File::open(path).expect("open netns");
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// Moves the calling thread into this namespace (network only). Use from a thread spawned
    /// for the purpose: the thread stays there.
    pub fn enter(&self) {
        let f = File::open(format!("/var/run/netns/{}", self.name)).expect("open netns");
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Two namespaces joined by a veth pair, `a` and `b`, addressed `10.<net>.0.1/24` and
/// `10.<net>.0.2/24`, both up.
pub struct VethPair {
    pub a: NetNs,
    pub b: NetNs,
    pub a_if: String,
    pub b_if: String,
    pub a_ip: String,
    pub b_ip: String,
}

impl VethPair {
    pub fn new(net: u8) -> VethPair {
        let a = NetNs::new("lba");
        let b = NetNs::new("lbb");
        let a_if = unique("va");
        let b_if = unique("vb");
        sh(&[
            "ip", "link", "add", &a_if, "netns", &a.name, "type", "veth", "peer", "name", &b_if,
            "netns", &b.name,
        ]);
        let a_ip = format!("10.{net}.0.1");
        let b_ip = format!("10.{net}.0.2");
        a.exec(&["ip", "addr", "add", &format!("{a_ip}/24"), "dev", &a_if]);
        b.exec(&["ip", "addr", "add", &format!("{b_ip}/24"), "dev", &b_if]);
        a.exec(&["ip", "link", "set", &a_if, "up"]);
        b.exec(&["ip", "link", "set", &b_if, "up"]);
        VethPair {
            a,
            b,
            a_if,
            b_if,
            a_ip,
            b_ip,
        }
    }
}

//! Shared machinery for lb's end-to-end tests: privilege gates, network namespaces with veth
//! pairs, and helpers to run the real `lb` binary. The test cases live in `tests/tests/`.
//!
//! Map:
//! - [`lb`]: the daemon under test ([`lb::Lb`]: start from YAML, pid, fd counts, SIGTERM) and a
//!   YAML builder for the common shapes ([`lb::LbConfig`], [`lb::ServiceSpec`]).
//! - [`backend`]: backends run by the test: echo, sha256 sink/source, resetting, PROXY-header
//!   parsing, half-close replier (threads), and a killable one (a child process).
//! - [`stream`]: pseudo-random byte streams checked byte for byte, sha256 of long streams,
//!   client helpers with timeouts, bounded waits, the open-files limit.
//! - [`netns`]: network namespaces and veth pairs (privileged tests).
//! - [`topology`]: the xdp topology (client, lb, two backends on a bridge), for tests and bench.
//! - [`admin`]: lb with an admin API ([`admin::AdminLb`]), configs with weights, health checks
//!   and tokens (YAML edits), `/status` as JSON, `/metrics` parsed as Prometheus text.
//! - [`load`]: steady client load (echo exchanges), counting failures.
//!
//! Every case runs once per dataplane in [`dataplanes`], through [`for_each_dataplane`], so the
//! suite is written once and grows with the dataplanes.
//!
//! Privileged tests (BPF, netns) need root. Outside root they skip with a message; under
//! `CI=true` a skip is a failure, so a broken eBPF path can never pass silently.

pub mod admin;
pub mod backend;
pub mod clients;
pub mod lb;
pub mod load;
pub mod netns;
pub mod stream;
pub mod topology;
pub mod torture;

/// Whether a privileged test may run. Prints why not, and panics under `CI=true`.
pub fn privileged(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(
        !ci,
        "{test}: needs root, and CI=true forbids skipping privileged tests"
    );
    eprintln!("SKIP {test}: needs root (BPF, network namespaces); run `sudo -E cargo xtask test`");
    false
}

/// The dataplanes every end-to-end case of [`per_dataplane!`] runs on, each as its own test.
pub const DATAPLANES: [&str; 2] = ["proxy", "sockmap"];

/// One end-to-end case as one named test per dataplane of [`DATAPLANES`]: `NAME::proxy` and
/// `NAME::sockmap`, so a failure names its dataplane and `cargo test ::proxy` picks one.
///
/// ```text
/// per_dataplane! {
///     /// What the case shows.
///     fn a_case(dataplane) {
///         let lb = Lb::start(&LbConfig::new(dataplane, ...));
///     }
/// }
/// ```
#[macro_export]
macro_rules! per_dataplane {
    ($(#[$meta:meta])* fn $name:ident($dataplane:ident) $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn case($dataplane: &'static str) $body

            #[test]
            fn proxy() {
                $crate::run_on("proxy", concat!(stringify!($name), "::proxy"), case);
            }

            #[test]
            fn sockmap() {
                $crate::run_on("sockmap", concat!(stringify!($name), "::sockmap"), case);
            }
        }
    };
}

/// Runs `case` on `dataplane` for the test `test`: sockmap needs root (see [`privileged`]), and
/// `LB_TEST_DATAPLANES=proxy,sockmap` (when set) lists the dataplanes a run covers. When the
/// case panics, the panic output is followed by the dataplane it failed on.
pub fn run_on(dataplane: &'static str, test: &str, case: fn(&'static str)) {
    if let Ok(list) = std::env::var("LB_TEST_DATAPLANES")
        && !list.trim().is_empty()
    {
        for name in list.split(',').map(str::trim) {
            assert!(
                DATAPLANES.contains(&name),
                "LB_TEST_DATAPLANES: unknown dataplane {name:?}; known: {DATAPLANES:?}"
            );
        }
        if !list.split(',').map(str::trim).any(|name| name == dataplane) {
            eprintln!("SKIP {test}: LB_TEST_DATAPLANES={list}");
            return;
        }
    }
    if dataplane != "proxy" && !privileged(test) {
        return;
    }
    let _context = PanicContext(format!("(this failure is with dataplane `{dataplane}`)"));
    case(dataplane);
}

/// Whether lb itself holds both sockets of each connection with `dataplane` (proxy, sockmap),
/// rather than forwarding packets (xdp): what fd and socket counts of lb can show.
pub fn terminates_tcp(dataplane: &str) -> bool {
    dataplane != "xdp"
}

/// Prints its message if dropped while the thread panics: context for a failure message.
pub struct PanicContext(pub String);

impl Drop for PanicContext {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.0);
        }
    }
}

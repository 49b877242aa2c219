//! Hostile input and faults (issue 14): configurations the kernel or the runtime would refuse
//! are refused by `lb check` with their place, and a fault inside lb ends the process so that
//! a supervisor sees it, rather than leaving a live process that serves nothing.

use std::{fs, time::Duration};

use lb_tests::{
    backend::Backend,
    lb::{self, Launch, Lb, LbConfig, ServiceSpec, TempDir, free_addr},
    stream::try_connect,
};

/// Each config's one problem, where it is, and what the message must say. Every one of these
/// was accepted before, then failed at run time (every connect EINVAL, a panicked worker, lb
/// connecting to itself until it ran out of fds, a listen address `lb run` cannot bind).
fn refused() -> Vec<(&'static str, String, usize, usize, &'static str)> {
    let listen = free_addr();
    let backend = free_addr();
    let service = |extra: &str, backend: &str| {
        format!(
            "services:\n  - name: bad\n    listen: {listen}\n{extra}    backends:\n      - address: {backend}\n"
        )
    };
    let b = backend.to_string();
    vec![
        (
            "tcp_keepalive 10h",
            service("    tcp_keepalive: 10h\n", &b),
            4,
            20,
            "32767s",
        ),
        (
            "tcp_keepalive 500ms",
            service("    tcp_keepalive: 500ms\n", &b),
            4,
            20,
            "whole seconds",
        ),
        (
            "tcp_keepalive 1ns",
            service("    tcp_keepalive: 1ns\n", &b),
            4,
            20,
            "whole seconds",
        ),
        (
            "idle_timeout of 5e11 years",
            service("    idle_timeout: 500000000000years\n", &b),
            4,
            19,
            "365d",
        ),
        (
            "a backend that is the service itself",
            service("", &listen.to_string()),
            5,
            18,
            "lb would connect to itself",
        ),
        (
            "a broadcast backend",
            service("", "255.255.255.255:80"),
            5,
            18,
            "broadcast",
        ),
        (
            "a multicast backend",
            service("", "224.0.0.9:80"),
            5,
            18,
            "multicast",
        ),
        (
            "a multicast listen address",
            format!(
                "services:\n  - name: bad\n    listen: 239.0.0.1:80\n    backends:\n      - address: {b}\n"
            ),
            3,
            13,
            "multicast",
        ),
        (
            "a v4-mapped IPv6 listen address",
            format!(
                "services:\n  - name: bad\n    listen: \"[::ffff:127.0.0.1]:{}\"\n    backends:\n      - address: {b}\n",
                listen.port()
            ),
            3,
            13,
            "write it as IPv4",
        ),
    ]
}

#[test]
fn configs_the_kernel_or_runtime_would_refuse_are_refused_with_their_place() {
    let dir = TempDir::new();
    for (what, text, line, col, says) in refused() {
        let path = dir.path.join("bad.yaml");
        fs::write(&path, &text).unwrap();
        let file = path.to_str().unwrap();
        let check = lb::run_to_exit(&["check", "--config", file], Duration::from_secs(10));
        let stderr = String::from_utf8_lossy(&check.stderr);
        assert_eq!(
            check.status.code(),
            Some(1),
            "{what}: lb check: {stderr}\n{text}"
        );
        let place = format!("{file}:{line}:{col}:");
        assert!(
            stderr.contains(&place) && stderr.contains(says),
            "{what}: want {place} and {says:?} in:\n{stderr}"
        );
        // And `lb run` refuses it before binding anything (exit 78, as any bad config).
        let run = lb::run_to_exit(&["run", "--config", file], Duration::from_secs(10));
        assert_eq!(
            run.status.code(),
            Some(78),
            "{what}: lb run: {}",
            String::from_utf8_lossy(&run.stderr)
        );
    }
}

/// Before: an `idle_timeout` near u64::MAX seconds panicked the worker thread on the first
/// connection ("overflow when adding duration to instant"); the process stayed up, served
/// nothing, and exited 0 on SIGTERM, so no supervisor noticed. Now any panic ends lb with
/// exit code 70 (EX_SOFTWARE) after logging it. The panic is forced here
/// (`LB_TEST_PANIC_ON_CONNECTION`): the overflow itself is refused by validation now.
#[test]
fn a_panic_in_a_connection_ends_lb_with_exit_code_70() {
    let backend = Backend::echo();
    let config = LbConfig::new("proxy", vec![ServiceSpec::new("p", &[backend.addr()])]);
    let yaml = lb_tests::admin::with_listen_addresses(&config).yaml();
    let launch = Launch {
        env: &[("LB_TEST_PANIC_ON_CONNECTION", "1")],
        ..Launch::default()
    };
    let mut lb = Lb::try_start_with(&yaml, &[], &launch).expect("lb starts");
    let _client = try_connect(lb.addr());
    let status = lb.wait_timeout(Duration::from_secs(10));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(70),
        "lb must exit 70 after a panic; status {status:?}, stderr:\n{}",
        lb.stderr()
    );
    let stderr = lb.stderr();
    assert!(
        stderr.contains("panicked") && stderr.contains("supervisor"),
        "the log says what happened:\n{stderr}"
    );
}

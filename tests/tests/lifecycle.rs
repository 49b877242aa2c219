//! The daemon's life: SIGTERM drains (open connections keep working, new ones are refused,
//! the exit comes when they close or at the deadline), and a bad config stops it before it
//! starts. Every case runs once per dataplane.

use std::{
    fs,
    io::ErrorKind,
    net::TcpStream,
    time::{Duration, Instant},
};

use lb_tests::{
    backend::Backend,
    lb::{self, LbConfig, ServiceSpec, TempDir, free_addr},
    per_dataplane,
    stream::{End, connect, drain_until_end, echo_round_trip, half_close, read_to_eof, wait_until},
};
use nix::sys::signal::Signal;

/// Connects until the connect is refused (at most `timeout`); connections that still get
/// through are closed at once.
fn refused_within(addr: std::net::SocketAddr, timeout: Duration) -> bool {
    wait_until(timeout, || {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Err(e) => e.kind() == ErrorKind::ConnectionRefused,
            Ok(_) => false,
        }
    })
}

per_dataplane! {
    fn sigterm_drains_open_connections_then_exits_0(dataplane) {
        let backend = Backend::echo();
        let mut lb = LbConfig::new(
            dataplane,
            vec![ServiceSpec::new("drain", &[backend.addr()])],
        )
        .shutdown_timeout("30s")
        .start();
        let mut clients: Vec<TcpStream> = (0..3).map(|_| connect(lb.addr())).collect();
        for c in &mut clients {
            echo_round_trip(c, b"before SIGTERM").unwrap();
        }

        lb.signal(Signal::SIGTERM);
        assert!(
            refused_within(lb.addr(), Duration::from_secs(5)),
            "new connections still not refused 5 s after SIGTERM"
        );
        assert_eq!(
            lb.try_wait(),
            None,
            "lb exited with connections open, before the deadline"
        );
        for (i, c) in clients.iter_mut().enumerate() {
            echo_round_trip(c, format!("during the drain {i}").as_bytes())
                .unwrap_or_else(|e| panic!("connection {i} stopped working during the drain: {e}"));
        }
        // A half-close during the drain is passed on as well.
        half_close(&clients[0]);
        let rest =
            read_to_eof(&mut clients[0], 0).expect("EOF from the backend after the half-close");
        assert!(rest.is_empty());
        assert_eq!(
            lb.try_wait(),
            None,
            "lb exited with connections open, before the deadline"
        );

        drop(clients);
        let closed = Instant::now();
        let status = lb.wait_timeout(Duration::from_secs(10)).unwrap_or_else(|| {
            panic!("lb did not exit within 10 s of its last connection closing (deadline 30 s)")
        });
        assert_eq!(status.code(), Some(0), "exit status {status}");
        assert!(closed.elapsed() < Duration::from_secs(10));
    }
}

per_dataplane! {
    fn sigterm_deadline_closes_remaining_connections_then_exits_0(dataplane) {
        let backend = Backend::echo();
        let mut lb = LbConfig::new(
            dataplane,
            vec![ServiceSpec::new("deadline", &[backend.addr()])],
        )
        .shutdown_timeout("2s")
        .start();
        let mut client = connect(lb.addr());
        echo_round_trip(&mut client, b"before SIGTERM").unwrap();

        let signalled = Instant::now();
        let status = lb.sigterm_and_wait(Duration::from_secs(8));
        let took = signalled.elapsed();
        assert_eq!(status.code(), Some(0), "exit status {status}");
        assert!(
            took >= Duration::from_millis(1500),
            "lb exited {took:?} after SIGTERM, before the 2 s deadline, with a connection open"
        );
        let (end, _) = drain_until_end(&mut client, Duration::from_secs(2));
        assert!(
            matches!(end, End::Eof | End::Reset),
            "the connection open at the deadline saw {end:?}, want EOF or reset"
        );
    }
}

/// A config with one error at a known place: (text, line, column).
fn bad_configs(dataplane: &str) -> Vec<(&'static str, String, usize, usize)> {
    let listen = free_addr();
    let backend = free_addr();
    let head = format!(
        "dataplane:\n  mode: {dataplane}\nservices:\n  - name: bad\n    listen: {listen}\n"
    );
    vec![
        (
            "an unknown key",
            format!("{head}    bogus_key: 1\n    backends:\n      - address: {backend}\n"),
            6,
            5,
        ),
        (
            "a bad value",
            format!(
                "{head}    algorithm: round_robbin\n    backends:\n      - address: {backend}\n"
            ),
            6,
            16,
        ),
    ]
}

/// The `FILE:LINE:COL` places `output` names for `file`.
fn places(output: &str, file: &str) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    for (i, _) in output.match_indices(file) {
        let rest = &output[i + file.len()..];
        let mut parts = rest.splitn(4, ':');
        if let (Some(""), Some(line), Some(col)) = (parts.next(), parts.next(), parts.next())
            && let (Ok(line), Ok(col)) = (line.parse(), col.parse())
        {
            found.push((line, col));
        }
    }
    found
}

per_dataplane! {
    fn a_bad_config_exits_78_from_run_and_1_from_check_naming_file_line_col(dataplane) {
        let dir = TempDir::new();
        for (what, text, line, col) in bad_configs(dataplane) {
            let path = dir.path.join("bad.yaml");
            fs::write(&path, &text).unwrap();
            let file = path.to_str().unwrap();

            let run = lb::run_to_exit(&["run", "--config", file], Duration::from_secs(10));
            let stderr = String::from_utf8_lossy(&run.stderr);
            assert_eq!(
                run.status.code(),
                Some(78),
                "`lb run` with {what}: exit status {}; stderr:\n{stderr}",
                run.status
            );
            assert!(
                places(&stderr, file).contains(&(line, col)),
                "`lb run` with {what}: stderr does not name {file}:{line}:{col}:\n{stderr}\nconfig:\n{text}"
            );

            let check = lb::run_to_exit(&["check", "--config", file], Duration::from_secs(10));
            let out = format!(
                "{}{}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
            assert_eq!(
                check.status.code(),
                Some(1),
                "`lb check` with {what}: exit status {}; output:\n{out}",
                check.status
            );
            assert!(
                places(&out, file).contains(&(line, col)),
                "`lb check` with {what}: output does not name {file}:{line}:{col}:\n{out}\nconfig:\n{text}"
            );
        }

        // The same file, fixed, checks clean.
        let mut good = LbConfig::new(dataplane, vec![ServiceSpec::new("good", &[free_addr()])]);
        good.services[0].listen = Some(free_addr());
        let path = dir.path.join("good.yaml");
        fs::write(&path, good.yaml()).unwrap();
        let check = lb::run_to_exit(
            &["check", "--config", path.to_str().unwrap()],
            Duration::from_secs(10),
        );
        assert_eq!(
            check.status.code(),
            Some(0),
            "`lb check` on a valid config: {}\n{}{}",
            check.status,
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
    }
}

per_dataplane! {
    /// Before: a second SIGTERM or SIGINT during a drain was ignored, and lb waited out the whole
    /// `shutdown_timeout` (an operator's second Ctrl-C did nothing). Now it closes the open
    /// connections at once and exits 0.
    fn a_second_sigterm_or_sigint_during_the_drain_ends_it_at_once(dataplane) {
        for second in [Signal::SIGTERM, Signal::SIGINT] {
            let backend = Backend::echo();
            let mut lb = LbConfig::new(
                dataplane,
                vec![ServiceSpec::new("twice", &[backend.addr()])],
            )
            .shutdown_timeout("60s")
            .start();
            let mut client = connect(lb.addr());
            echo_round_trip(&mut client, b"before the signals").unwrap();
            lb.signal(Signal::SIGTERM);
            // Draining: still up, the open connection still served.
            assert!(
                lb.wait_timeout(Duration::from_millis(500)).is_none(),
                "lb exited at the first SIGTERM with a connection open"
            );
            echo_round_trip(&mut client, b"while draining").unwrap();
            let signalled = Instant::now();
            lb.signal(second);
            let status = lb.wait_timeout(Duration::from_secs(5));
            assert_eq!(
                status.and_then(|s| s.code()),
                Some(0),
                "{second}: lb did not exit 0 within 5 s of the second signal ({status:?}); stderr:\n{}",
                lb.stderr()
            );
            assert!(signalled.elapsed() < Duration::from_secs(5));
            let (end, _) = drain_until_end(&mut client, Duration::from_secs(2));
            assert!(
                matches!(end, End::Eof | End::Reset),
                "the open connection saw {end:?}"
            );
            assert!(
                lb.stderr().contains("during the drain"),
                "the log says why it stopped waiting:\n{}",
                lb.stderr()
            );
        }
    }
}

//! Limits of one connection and of a service: `idle_timeout` closes a connection with no bytes
//! either way (and only such a one), and over `max_connections` new clients wait in the backlog
//! until a slot frees. Every case runs once per dataplane.

use std::{
    net::TcpStream,
    time::{Duration, Instant},
};

use lb_tests::{
    backend::Backend,
    lb::{LbConfig, ServiceSpec},
    per_dataplane,
    stream::{End, connect, drain_until_end, echo_round_trip},
};

per_dataplane! {
    fn idle_timeout_closes_idle_connections_but_not_busy_ones(dataplane) {
        let backend = Backend::echo();
        let lb = LbConfig::new(
            dataplane,
            vec![ServiceSpec::new("idle", &[backend.addr()]).idle_timeout("1s")],
        )
        .start();
        let mut idle = connect(lb.addr());
        let mut busy = connect(lb.addr());
        echo_round_trip(&mut idle, b"hello").unwrap();
        // The busy connection talks every 300 ms for 2.4 s: never idle for 1 s.
        let start = Instant::now();
        for i in 0..8 {
            std::thread::sleep(Duration::from_millis(300));
            echo_round_trip(&mut busy, format!("tick {i}").as_bytes()).unwrap_or_else(|e| {
                panic!(
                    "a busy connection was closed after {:?}: {e}",
                    start.elapsed()
                )
            });
        }
        // By now the idle one has been closed (1 s of silence, checked within the relay's timer).
        let (end, bytes) = drain_until_end(&mut idle, Duration::from_secs(3));
        assert!(
            matches!(end, End::Eof | End::Reset),
            "idle connection not closed: {end:?}"
        );
        assert_eq!(bytes, 0);
        echo_round_trip(&mut busy, b"still here").unwrap();
    }
}

per_dataplane! {
    fn over_max_connections_clients_wait_until_a_slot_frees(dataplane) {
        let backend = Backend::echo();
        let lb = LbConfig::new(
            dataplane,
            vec![ServiceSpec::new("max", &[backend.addr()]).max_connections(2)],
        )
        .start();
        let mut b = third_waits_for_a_slot(lb.addr(), || {
            assert_eq!(backend.accepted(), 2, "the backend saw a third connection");
        });
        echo_round_trip(&mut b, b"b again").unwrap();
    }
}

/// With a limit of 2: two clients are served; a third one's connect completes in the kernel's
/// backlog, but lb does not accept it, so its byte gets no answer (then `while_waiting` runs)
/// until one of the two closes; then it is served, with the byte it sent while waiting.
/// Returns the other open client.
fn third_waits_for_a_slot(lb: std::net::SocketAddr, while_waiting: impl FnOnce()) -> TcpStream {
    let mut a = connect(lb);
    let mut b = connect(lb);
    echo_round_trip(&mut a, b"a").unwrap();
    echo_round_trip(&mut b, b"b").unwrap();
    let mut c = connect(lb);
    c.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    std::io::Write::write_all(&mut c, b"c").unwrap();
    let mut buf = [0u8; 1];
    let waited = std::io::Read::read(&mut c, &mut buf);
    assert!(
        waited.is_err(),
        "a third connection was served over max_connections 2: {waited:?}"
    );
    while_waiting();
    drop(a);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    std::io::Read::read_exact(&mut c, &mut buf)
        .expect("the waiting client was not served after a slot freed");
    assert_eq!(&buf, b"c");
    b
}

per_dataplane! {
    /// Lowering `max_connections` by a reload while every slot is taken (open connections, and
    /// each worker's accept loop waiting with one) still lowers it: the slots are taken back as
    /// they come free, and once the connections have closed the new limit holds exactly.
    fn a_lower_max_connections_applies_once_the_open_connections_close(dataplane) {
        use lb_tests::admin::AdminLb;
        let backend = Backend::echo();
        let config = LbConfig::new(
            dataplane,
            vec![ServiceSpec::new("max", &[backend.addr()]).max_connections(4)],
        );
        let lb = AdminLb::start(&config, |_| {});
        let mut open: Vec<_> = (0..4).map(|_| connect(lb.addr())).collect();
        for (i, c) in open.iter_mut().enumerate() {
            echo_round_trip(c, format!("open {i}").as_bytes()).unwrap();
        }
        let lower = lb.render(&lb.config, |doc| {
            doc["services"][0]["max_connections"] = 2.into();
        });
        lb.write_config(&lower);
        let r = lb.post("/reload", None);
        assert_eq!(r.status, 200, "reload: {}", r.text());
        open.clear();
        // Every connection closed; give lb a moment to count them closed.
        let deadline = Instant::now() + Duration::from_secs(3);
        while backend.open() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        third_waits_for_a_slot(lb.addr(), || {});
    }
}

//! Selection and health, end to end: weighted shares per algorithm, source-hash stickiness,
//! Maglev tables that agree across instances, a backend killed and restarted under load, probes
//! that fail on a wrong answer, weight 0 and drain. Every case runs once per dataplane, against
//! the real binary with an admin API on a free loopback port.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use lb_tests::{
    admin::{AdminLb, set, set_weights},
    backend::Backend,
    lb::{LbConfig, ServiceSpec, free_addr, free_port},
    load::Load,
    per_dataplane,
    stream::{connect, connect_bound, connect_from, echo_round_trip, read_to_eof, wait_until},
};
use nix::sys::signal::Signal;

/// One whole client connection: an echo of `msg`, a half-close, a clean EOF.
fn one_exchange(mut client: TcpStream, msg: &[u8]) {
    echo_round_trip(&mut client, msg).unwrap_or_else(|e| panic!("echo through lb: {e}"));
    client
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    let rest = read_to_eof(&mut client, 0).expect("a clean EOF after the echo");
    assert!(rest.is_empty());
}

/// Connections accepted by each backend so far.
fn accepted(backends: &[&Backend]) -> Vec<usize> {
    backends.iter().map(|b| b.accepted()).collect()
}

/// The index of the one backend whose accepted count grew by one since `before`.
fn landed_on(backends: &[&Backend], before: &[usize]) -> usize {
    let now = accepted(backends);
    let grown: Vec<usize> = (0..backends.len())
        .filter(|&i| now[i] != before[i])
        .collect();
    assert!(
        grown.len() == 1 && now[grown[0]] == before[grown[0]] + 1,
        "one connection should land on one backend: accepted before {before:?}, after {now:?}"
    );
    grown[0]
}

/// `n` sequential connections to `lb`; returns how many each backend accepted meanwhile.
fn spread(lb: SocketAddr, backends: &[&Backend], n: usize) -> Vec<usize> {
    let before = accepted(backends);
    for i in 0..n {
        one_exchange(connect(lb), format!("connection {i}").as_bytes());
    }
    let after = accepted(backends);
    (0..backends.len()).map(|i| after[i] - before[i]).collect()
}

/// A fast check: every 200 ms, 100 ms to answer, no jitter (timing bounds are then exact).
const INTERVAL: Duration = Duration::from_millis(200);
const TIMEOUT: Duration = Duration::from_millis(100);
const RISE: u32 = 2;
const FALL: u32 = 3;
/// Slack for scheduling on a shared machine, and for the status poll's own period.
const MARGIN: Duration = Duration::from_millis(500);

fn check_yaml(kind_specific: &str) -> String {
    format!(
        "{kind_specific}\ninterval: {}ms\ntimeout: {}ms\nrise: {RISE}\nfall: {FALL}\njitter_percent: 0\n",
        INTERVAL.as_millis(),
        TIMEOUT.as_millis()
    )
}

/// The longest a backend may stay "up" after it stops answering.
fn down_bound() -> Duration {
    INTERVAL * FALL + TIMEOUT + MARGIN
}

/// Shares of 3,000 sequential connections over backends weighted 3:1:1, in per cent.
fn weighted_shares(dataplane: &str, algorithm: &str) -> (Vec<usize>, [f64; 3]) {
    const N: usize = 3_000;
    let backends = [Backend::echo(), Backend::echo(), Backend::echo()];
    let refs: Vec<&Backend> = backends.iter().collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(Backend::addr).collect();
    let mut spec = ServiceSpec::new("weighted", &addrs);
    spec.algorithm = algorithm.to_owned();
    let lb = AdminLb::start(&LbConfig::new(dataplane, vec![spec]), |doc| {
        set_weights(doc, "weighted", &[3, 1, 1]);
    });
    let started = Instant::now();
    let counts = if matches!(algorithm, "least_connections" | "random") {
        // Both look at active connections. "One at a time" as lb sees it: the client has its
        // EOF a moment before lb's worker has counted the connection closed, and the next
        // connection may be accepted by another worker meanwhile. Waiting for lb's count
        // keeps every pick at 0 active, so the weights alone decide.
        let before = accepted(&refs);
        for i in 0..N {
            one_exchange(connect(lb.addr()), format!("connection {i}").as_bytes());
            // Milliseconds when all is well: a count that lags further is a regression.
            let deadline = Instant::now() + Duration::from_millis(500);
            while {
                let status = lb.status();
                addrs
                    .iter()
                    .any(|a| status.number("weighted", *a, "active_connections") > 0)
            } {
                assert!(
                    Instant::now() < deadline,
                    "lb still counts an active connection"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let after = accepted(&refs);
        (0..refs.len()).map(|i| after[i] - before[i]).collect()
    } else {
        spread(lb.addr(), &refs, N)
    };
    eprintln!(
        "{algorithm}: {N} connections in {:?}: {counts:?}",
        started.elapsed()
    );
    assert_eq!(counts.iter().sum::<usize>(), N);
    // lb counts the same.
    let status = lb.status();
    for (b, count) in addrs.iter().zip(&counts) {
        assert_eq!(
            status.number("weighted", *b, "connections_total"),
            *count as u64,
            "/status connections_total of {b}"
        );
    }
    let pct = |c: usize| 100.0 * c as f64 / N as f64;
    (
        counts.clone(),
        [pct(counts[0]), pct(counts[1]), pct(counts[2])],
    )
}

fn assert_within_3_points(algorithm: &str, counts: &[usize], pct: [f64; 3]) {
    for (got, want) in pct.iter().zip([60.0, 20.0, 20.0]) {
        assert!(
            (got - want).abs() <= 3.0,
            "{algorithm} over weights 3:1:1 gave {pct:.1?} % ({counts:?} of 3000), want within 3 points of [60, 20, 20]"
        );
    }
}

per_dataplane! {
    fn weighted_round_robin_shares_are_exactly_the_weights(dataplane) {
        let (counts, _) = weighted_shares(dataplane, "weighted_round_robin");
        assert_eq!(
            counts,
            vec![1800, 600, 600],
            "weighted_round_robin over weights 3:1:1, 3000 connections"
        );
    }
}

per_dataplane! {
    fn random_shares_follow_the_weights_within_3_points(dataplane) {
        let (counts, pct) = weighted_shares(dataplane, "random");
        assert_within_3_points("random", &counts, pct);
    }
}

per_dataplane! {
    fn least_connections_sequential_shares_follow_the_weights_within_3_points(dataplane) {
        // One connection at a time: every backend has 0 active connections at each pick, so
        // the weights alone must decide.
        let (counts, pct) = weighted_shares(dataplane, "least_connections");
        assert_within_3_points("least_connections", &counts, pct);
    }
}

/// An echo backend on `addr` that also counts the connections that carried data (health probes
/// connect and close without sending any).
fn counting_echo_at(addr: SocketAddr, with_data: Arc<AtomicUsize>) -> std::io::Result<Backend> {
    Backend::spawn_at(addr, move |mut s| {
        let mut buf = vec![0u8; 16 * 1024];
        let mut counted = false;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if !counted {
                        counted = true;
                        with_data.fetch_add(1, Ordering::SeqCst);
                    }
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
    })
}

/// Listens on `addr` again, retrying for a while if the port is still held.
fn restart_at(addr: SocketAddr, with_data: &Arc<AtomicUsize>) -> Backend {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match counting_echo_at(addr, Arc::clone(with_data)) {
            Ok(b) => return b,
            Err(e) if Instant::now() < deadline => {
                eprintln!("listen on {addr} again: {e}; retrying");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("cannot listen on {addr} again: {e}"),
        }
    }
}

per_dataplane! {
    fn a_killed_backend_is_marked_down_in_time_with_no_failed_client_and_comes_back(dataplane) {
        let (a, b) = (Backend::echo(), Backend::echo());
        // Below the ephemeral range: no outgoing connection takes the port while it is closed.
        let victim_addr = free_addr();
        let victim_data = Arc::new(AtomicUsize::new(0));
        let mut victim = counting_echo_at(victim_addr, Arc::clone(&victim_data)).unwrap();
        let spec = ServiceSpec::new("steady", &[a.addr(), b.addr(), victim_addr]).retries(2);
        let lb = AdminLb::start(&LbConfig::new(dataplane, vec![spec]), |doc| {
            set(doc, "steady", "health_check", &check_yaml("kind: tcp"));
            // Passive ejection off: the active checks alone decide, so their timing is measured.
            set(doc, "steady", "ejection", "consecutive_failures: 0");
        });
        let all_up = lb.wait_status(Duration::from_secs(5), |s| {
            [a.addr(), b.addr(), victim_addr]
                .iter()
                .all(|&x| s.state("steady", x) == "up")
        });
        assert!(all_up.is_ok(), "backends not all up: {:?}", all_up.err());

        let load = Load::start(lb.addr(), 1, Duration::from_millis(1));
        assert!(
            load.wait_for_more(100, Duration::from_secs(20)),
            "the load does not get going: {} ok, {} failed",
            load.ok(),
            load.failed()
        );
        assert!(victim_data.load(Ordering::SeqCst) > 0);

        // Killed between two client connections: one cut mid-exchange cannot be retried by any
        // layer-4 balancer. The port refuses connects from now on.
        load.quiesced(|| victim.stop_listening());
        let killed = Instant::now();
        let down = lb.wait_status(down_bound() + Duration::from_secs(5), |s| {
            s.state("steady", victim_addr) == "down"
        });
        let took_down = killed.elapsed();
        let down =
            down.unwrap_or_else(|s| panic!("the killed backend is never marked down: {}", s.0));
        eprintln!(
            "marked down {took_down:?} after the kill (bound {:?})",
            down_bound()
        );
        assert!(
            took_down <= down_bound(),
            "the killed backend was marked down {took_down:?} after the kill; want at most fall*interval + timeout + {MARGIN:?} = {:?}",
            down_bound()
        );
        let m = lb.metrics();
        let victim_label = victim_addr.to_string();
        let labels = [("service", "steady"), ("backend", victim_label.as_str())];
        assert_eq!(
            m.get("lb_backend_up", &labels),
            0,
            "lb_backend_up of the dead backend"
        );

        // Down means no more connects to it: its connect failures stop growing.
        let failures = down.number("steady", victim_addr, "connect_failures");
        assert!(
            failures > 0,
            "no connect was refused before the backend was marked down: the retries were not exercised"
        );
        assert!(load.wait_for_more(200, Duration::from_secs(20)));
        let later = lb
            .status()
            .number("steady", victim_addr, "connect_failures");
        assert_eq!(
            later, failures,
            "connects were still tried on a backend marked down"
        );

        // Back on the same port: up after about `rise` intervals, then taking traffic again.
        let placed_before = lb
            .status()
            .number("steady", victim_addr, "connections_total");
        let data_before = victim_data.load(Ordering::SeqCst);
        let restarted = restart_at(victim_addr, &victim_data);
        let back = Instant::now();
        let up_bound = INTERVAL * (RISE + 1) + TIMEOUT + MARGIN;
        let up = lb.wait_status(up_bound + Duration::from_secs(5), |s| {
            s.state("steady", victim_addr) == "up"
        });
        let took_up = back.elapsed();
        up.unwrap_or_else(|s| panic!("the restarted backend is never marked up: {}", s.0));
        eprintln!("marked up {took_up:?} after the restart (bound {up_bound:?})");
        assert!(
            took_up <= up_bound,
            "the restarted backend was marked up {took_up:?} after it listened again; want at most (rise+1)*interval + timeout + {MARGIN:?} = {up_bound:?}"
        );
        assert!(
            took_up + Duration::from_millis(20) >= INTERVAL * (RISE - 1),
            "marked up {took_up:?} after the restart: faster than rise={RISE} checks {INTERVAL:?} apart allow"
        );
        assert!(
            wait_until(Duration::from_secs(5), || victim_data
                .load(Ordering::SeqCst)
                > data_before),
            "the restarted backend takes no traffic"
        );
        assert!(
            lb.status()
                .number("steady", victim_addr, "connections_total")
                > placed_before
        );
        assert_eq!(
            lb.metrics().get("lb_health_changes_total", &labels),
            2,
            "one change down, one up"
        );

        let report = load.stop();
        eprintln!(
            "load: {} connections ok, {} failed in {:?}",
            report.ok, report.failed, report.elapsed
        );
        assert_eq!(
            report.failed, 0,
            "client connections failed while a backend died and came back: {:#?}",
            report.errors
        );
        drop(restarted);
    }
}

/// A backend answering each connection's first line (or the probe's request head) with
/// `reply`, then closing. Records what it read.
fn line_responder(reply: &'static str, seen: Arc<Mutex<Vec<String>>>) -> Backend {
    Backend::spawn(move |s| {
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut reader = BufReader::new(&s);
        let mut first = String::new();
        if reader.read_line(&mut first).is_err() || first.is_empty() {
            return;
        }
        // An HTTP request: read its head to the blank line.
        if first.contains("HTTP/1.") {
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
        }
        seen.lock().unwrap().push(first);
        let _ = (&s).write_all(reply.as_bytes());
        let _ = s.shutdown(std::net::Shutdown::Write);
        // Wait for the peer's close, so our close is not a reset.
        let _ = (&s).read(&mut [0u8; 64]);
    })
}

/// Starts lb over `good` and `bad` with `check`; asserts `bad` goes down within the bound while
/// `good` stays up throughout, and returns lb.
fn good_stays_up_bad_goes_down(
    dataplane: &str,
    good: &Backend,
    bad: &Backend,
    check: &str,
) -> AdminLb {
    let spec = ServiceSpec::new("probed", &[good.addr(), bad.addr()]);
    let check = check_yaml(check);
    let lb = AdminLb::start(&LbConfig::new(dataplane, vec![spec]), |doc| {
        set(doc, "probed", "health_check", &check);
    });
    let started = Instant::now();
    let mut good_was_down = None;
    let down = lb.wait_status(down_bound() + Duration::from_secs(5), |s| {
        if s.state("probed", good.addr()) != "up" {
            good_was_down.get_or_insert_with(|| s.0.clone());
        }
        s.state("probed", bad.addr()) == "down"
    });
    let took = started.elapsed();
    down.unwrap_or_else(|s| {
        panic!(
            "the wrongly answering backend is never marked down: {}",
            s.0
        )
    });
    // From start-up the first probe comes within one interval: one more than a kill allows.
    let bound = down_bound() + INTERVAL;
    assert!(
        took <= bound,
        "the wrongly answering backend was marked down {took:?} after start-up, want at most {bound:?}"
    );
    // The good one stays up for a few more intervals.
    let watch_until = Instant::now() + INTERVAL * (FALL + 2);
    while Instant::now() < watch_until {
        let s = lb.status();
        if s.state("probed", good.addr()) != "up" {
            good_was_down.get_or_insert(s.0);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        good_was_down.is_none(),
        "the correctly answering backend was not up: {good_was_down:?}"
    );
    let m = lb.metrics();
    let (g, b) = (good.addr().to_string(), bad.addr().to_string());
    assert_eq!(
        m.get("lb_backend_up", &[("service", "probed"), ("backend", &g)]),
        1
    );
    assert_eq!(
        m.get("lb_backend_up", &[("service", "probed"), ("backend", &b)]),
        0
    );
    lb
}

per_dataplane! {
    fn a_send_expect_probe_answered_wrongly_marks_the_backend_down(dataplane) {
        let (good_seen, bad_seen) = (Arc::default(), Arc::default());
        let good = line_responder("+PONG\r\n", Arc::clone(&good_seen));
        let bad = line_responder("-ERR wrong answer\r\n", Arc::clone(&bad_seen));
        let lb = good_stays_up_bad_goes_down(
            dataplane,
            &good,
            &bad,
            "kind: send_expect\nsend: \"PING\\r\\n\"\nexpect: \"+PONG\"",
        );
        assert!(
            good_seen.lock().unwrap().iter().all(|l| l == "PING\r\n"),
            "the probe sent something else than PING: {:?}",
            good_seen.lock().unwrap()
        );
        // Clients now reach only the good one.
        for i in 0..10 {
            let mut c = connect(lb.addr());
            c.write_all(b"PING\r\n").unwrap();
            let reply = read_to_eof(&mut c, 1024).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&reply),
                "+PONG\r\n",
                "client {i} reached the backend marked down"
            );
        }
        let s = lb.status();
        assert_eq!(s.number("probed", bad.addr(), "connections_total"), 0);
        assert_eq!(s.number("probed", good.addr(), "connections_total"), 10);
    }
}

per_dataplane! {
    fn an_http_probe_getting_500_marks_down_and_200_keeps_up(dataplane) {
        let (ok_seen, err_seen) = (Arc::default(), Arc::default());
        let ok = line_responder(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
            Arc::clone(&ok_seen),
        );
        let failing = line_responder(
            "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            Arc::clone(&err_seen),
        );
        let _lb = good_stays_up_bad_goes_down(
            dataplane,
            &ok,
            &failing,
            "kind: http\npath: /healthz\nexpect_status: 200",
        );
        for seen in [&ok_seen, &err_seen] {
            let seen = seen.lock().unwrap();
            assert!(!seen.is_empty());
            assert!(
                seen.iter().all(|l| l.starts_with("GET /healthz HTTP/1.")),
                "the http probe sent {seen:?}, want GET /healthz"
            );
        }
    }
}

per_dataplane! {
    fn source_hash_keeps_each_client_ip_on_one_backend(dataplane) {
        let backends = [Backend::echo(), Backend::echo(), Backend::echo()];
        let refs: Vec<&Backend> = backends.iter().collect();
        let addrs: Vec<SocketAddr> = backends.iter().map(Backend::addr).collect();
        let mut spec = ServiceSpec::new("sticky", &addrs);
        spec.algorithm = "source_hash".to_owned();
        let lb = AdminLb::start(&LbConfig::new(dataplane, vec![spec]), |_| {});
        let mut chosen = Vec::new();
        for host in 2..=13u8 {
            let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, host));
            let before = accepted(&refs);
            for i in 0..100 {
                let c = connect_from(ip, lb.addr())
                    .unwrap_or_else(|e| panic!("connect from {ip}: {e}"));
                one_exchange(c, format!("{ip} {i}").as_bytes());
            }
            let after = accepted(&refs);
            let got: Vec<usize> = (0..3).map(|i| after[i] - before[i]).collect();
            let Some(index) = got.iter().position(|&n| n == 100) else {
                panic!("100 connections from {ip} were spread over backends as {got:?}");
            };
            chosen.push(index);
        }
        eprintln!("backend per client ip 127.0.0.2..=13: {chosen:?}");
        let mut distinct = chosen.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(
            distinct.len() >= 2,
            "12 client addresses all hashed to one backend: {chosen:?}"
        );
        // The first address again, later: still the same backend.
        let before = accepted(&refs);
        one_exchange(
            connect_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), lb.addr()).unwrap(),
            b"again",
        );
        assert_eq!(landed_on(&refs, &before), chosen[0]);
    }
}

per_dataplane! {
    fn maglev_instances_agree_whatever_the_backend_order(dataplane) {
        let backends: Vec<Backend> = (0..5).map(|_| Backend::echo()).collect();
        let refs: Vec<&Backend> = backends.iter().collect();
        let addrs: Vec<SocketAddr> = backends.iter().map(Backend::addr).collect();
        let weights = [2u32, 1, 3, 1, 1];
        let start = |order: &[usize]| {
            let listed: Vec<SocketAddr> = order.iter().map(|&i| addrs[i]).collect();
            let w: Vec<u32> = order.iter().map(|&i| weights[i]).collect();
            let mut spec = ServiceSpec::new("ecmp", &listed);
            spec.algorithm = "maglev".to_owned();
            AdminLb::start(&LbConfig::new(dataplane, vec![spec]), move |doc| {
                set_weights(doc, "ecmp", &w);
            })
        };
        let one = start(&[0, 1, 2, 3, 4]);
        let two = start(&[4, 2, 0, 3, 1]);
        let fewer = start(&[0, 1, 2, 3]);
        let digest = |lb: &AdminLb| {
            lb.status().service("ecmp")["table_digest"]
                .as_str()
                .unwrap_or_else(|| panic!("no table_digest: {}", lb.status().0))
                .to_owned()
        };
        let (d1, d2, d3) = (digest(&one), digest(&two), digest(&fewer));
        assert!(
            d1.len() >= 16 && d1.chars().all(|c| c.is_ascii_hexdigit()),
            "table_digest {d1:?} is not a hex digest"
        );
        assert_eq!(
            d1, d2,
            "the same backends in another order give another Maglev table"
        );
        assert_ne!(d1, d3, "a different backend set gives the same digest");

        // And the same flow (client ip and port) lands on the same backend through either.
        for _ in 0..20 {
            let source = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let mut via = Vec::new();
            for lb in [&one, &two] {
                let before = accepted(&refs);
                let c = connect_bound(source, lb.addr())
                    .unwrap_or_else(|e| panic!("connect from {source}: {e}"));
                one_exchange(c, b"flow");
                via.push(landed_on(&refs, &before));
            }
            assert_eq!(
                via[0], via[1],
                "client {source} went to backend {} through one instance and {} through the other",
                addrs[via[0]], addrs[via[1]]
            );
        }
    }
}

/// Opens a connection and keeps it open: returns it and the backend it landed on.
fn hold_one(lb: &AdminLb, backends: &[&Backend]) -> (TcpStream, usize) {
    let before = accepted(backends);
    let mut held = connect(lb.addr());
    echo_round_trip(&mut held, b"held open").unwrap();
    (held, landed_on(backends, &before))
}

per_dataplane! {
    fn weight_0_and_drain_stop_new_connections_but_not_open_ones(dataplane) {
        let backends = [Backend::echo(), Backend::echo(), Backend::echo()];
        let refs: Vec<&Backend> = backends.iter().collect();
        let addrs: Vec<SocketAddr> = backends.iter().map(Backend::addr).collect();
        let spec = ServiceSpec::new("pool", &addrs);
        let config = LbConfig::new(dataplane, vec![spec]);
        let lb = AdminLb::start(&config, |_| {});
        let (mut held, x) = hold_one(&lb, &refs);
        let xa = addrs[x];
        let x_label = xa.to_string();
        let labels = [("service", "pool"), ("backend", x_label.as_str())];
        let path = |verb: &str| format!("/services/pool/backends/{xa}/{verb}");

        // Drain through the API.
        let r = lb.post(&path("drain"), None);
        assert_eq!(r.status, 200, "POST drain: {}", r.text());
        assert_eq!(lb.status().state("pool", xa), "draining");
        assert_eq!(lb.metrics().get("lb_backend_up", &labels), 0);
        let got = spread(lb.addr(), &refs, 30);
        assert_eq!(got[x], 0, "a drained backend got new connections: {got:?}");
        echo_round_trip(&mut held, b"still works while drained")
            .expect("the open connection to the drained backend keeps working");
        assert_eq!(lb.status().number("pool", xa, "active_connections"), 1);

        let r = lb.post(&path("undrain"), None);
        assert_eq!(r.status, 200, "POST undrain: {}", r.text());
        assert_eq!(lb.status().state("pool", xa), "up");
        let got = spread(lb.addr(), &refs, 30);
        assert_eq!(got, vec![10, 10, 10], "after undrain, round robin over 3");

        // Weight 0 through a reload (POST /reload), then back to 1 (SIGHUP).
        let mut weights = [1u32, 1, 1];
        weights[x] = 0;
        lb.write_config(&lb.render(&lb.config, |doc| set_weights(doc, "pool", &weights)));
        let r = lb.post("/reload", None);
        assert_eq!(r.status, 200, "POST /reload: {}", r.text());
        let s = lb.status();
        assert_eq!(s.state("pool", xa), "draining");
        assert_eq!(s.number("pool", xa, "weight"), 0);
        let got = spread(lb.addr(), &refs, 30);
        assert_eq!(got[x], 0, "a weight-0 backend got new connections: {got:?}");
        echo_round_trip(&mut held, b"still works at weight 0")
            .expect("the open connection to the weight-0 backend keeps working");

        lb.write_config(&lb.render(&lb.config, |_| {}));
        lb.signal(Signal::SIGHUP);
        assert!(
            wait_until(Duration::from_secs(10), || lb.reloads() == (2, 0)),
            "the SIGHUP reload is not counted: {:?}",
            lb.reloads()
        );
        assert_eq!(lb.status().state("pool", xa), "up");
        let got = spread(lb.addr(), &refs, 30);
        assert_eq!(
            got,
            vec![10, 10, 10],
            "back at weight 1, round robin over 3"
        );

        one_exchange(held, b"the end");
    }
}

per_dataplane! {
    fn consecutive_connect_failures_eject_a_backend_within_max_percent_and_it_comes_back(dataplane) {
        if !lb_tests::terminates_tcp(dataplane) {
            return;
        }
        let good = Backend::echo();
        // Nothing listens here yet: every connect is refused.
        let flaky_addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), free_port());
        let spec = ServiceSpec::new("eject", &[good.addr(), flaky_addr]).retries(1);
        let lb = AdminLb::start(&LbConfig::new(dataplane, vec![spec]), |doc| {
            set(
                doc,
                "eject",
                "ejection",
                "{consecutive_failures: 3, base_time: 1s, max_time: 4s, max_percent: 50}",
            );
        });
        // Round robin sends every other connection to the refused backend; retries save them.
        for i in 0..20 {
            one_exchange(
                connect(lb.addr()),
                format!("during ejection {i}").as_bytes(),
            );
        }
        let labels_owned = flaky_addr.to_string();
        let labels = [("service", "eject"), ("backend", labels_owned.as_str())];
        let m = lb.metrics();
        assert_eq!(
            m.get("lb_ejections_total", &labels),
            1,
            "ejected once after 3 failures in a row"
        );
        assert_eq!(
            m.get("lb_connect_failures_total", &labels),
            3,
            "no connect tried while ejected"
        );
        assert_eq!(lb.status().state("eject", flaky_addr), "down");
        // max_percent 50 of 2 backends: the good one is never ejected, whatever happens.
        assert_eq!(lb.status().state("eject", good.addr()), "up");
        // The ejection lasts base_time (1 s); then the backend is back, listening now.
        let _back = Backend::echo_at(flaky_addr).expect("listen on the refused address");
        assert!(
            wait_until(Duration::from_secs(3), || lb
                .status()
                .state("eject", flaky_addr)
                == "up"),
            "the ejection did not end after base_time"
        );
        let before = lb.status().number("eject", flaky_addr, "connections_total");
        for i in 0..4 {
            one_exchange(connect(lb.addr()), format!("after ejection {i}").as_bytes());
        }
        assert!(
            lb.status().number("eject", flaky_addr, "connections_total") > before,
            "the backend takes traffic again"
        );
    }
}

/// A reload keeps what the checks have learnt. A backend that starts down (rise 4) has passed
/// two probes when a reload changes its service (a backend added) and another service (a
/// weight): it must come up at its fourth probe, counted across the reload, not at the fourth
/// after it, and its probes must keep their schedule (none early: a restarted check would
/// start at a random point of a fresh interval). Before checks survived reloads, every reload
/// restarted every check and reset every streak.
#[test]
fn a_reload_keeps_every_unchanged_backends_streak_and_check_schedule() {
    const RISE_HERE: u32 = 4;
    let interval = Duration::from_millis(300);
    let probes: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let seen = Arc::clone(&probes);
    let checked = Backend::spawn(move |_probe| seen.lock().unwrap().push(Instant::now()));
    let (other, added) = (Backend::echo(), Backend::echo());
    let first = LbConfig::new(
        "proxy",
        vec![
            ServiceSpec::new("checked", &[checked.addr()]),
            ServiceSpec::new("other", &[other.addr()]),
        ],
    );
    let check = format!(
        "kind: tcp\ninterval: {}ms\ntimeout: 200ms\nrise: {RISE_HERE}\nfall: 1\njitter_percent: 0\ninitial_state: down\n",
        interval.as_millis()
    );
    let edit = |weight: u32| {
        let check = check.clone();
        move |doc: &mut serde_yaml::Value| {
            set(doc, "checked", "health_check", &check);
            set(doc, "other", "health_check", &check);
            set_weights(doc, "other", &[weight]);
        }
    };
    let lb = AdminLb::start(&first, edit(1));
    let probes_now = || probes.lock().unwrap().len();
    assert!(
        wait_until(Duration::from_secs(5), || probes_now() >= 2),
        "the checked backend saw {} probes in 5 s",
        probes_now()
    );
    assert_eq!(
        probes_now(),
        2,
        "a third probe came before the reload could be sent"
    );
    assert_eq!(lb.status().state("checked", checked.addr()), "down");

    // The same listen addresses; one backend more in "checked", another weight in "other".
    let mut second = lb.config.clone();
    second.services[0].backends.push(added.addr());
    lb.write_config(&lb.render(&second, edit(5)));
    let r = lb.post("/reload", None);
    assert_eq!(r.status, 200, "reload: {}", r.text());

    let up = lb.wait_status(Duration::from_secs(5), |s| {
        s.state("checked", checked.addr()) == "up"
    });
    let at = probes_now();
    up.unwrap_or_else(|s| panic!("the checked backend never came up: {}", s.0));
    assert!(
        at <= RISE_HERE as usize + 1,
        "the checked backend came up after {at} probes; {RISE_HERE} in a row, counted across the \
         reload, should do (a reset streak needs {} or more)",
        2 + RISE_HERE
    );
    let times = probes.lock().unwrap().clone();
    for (i, pair) in times.windows(2).enumerate() {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= interval.mul_f64(0.8),
            "probes {} and {} came {gap:?} apart, interval {interval:?}: the check was restarted",
            i + 1,
            i + 2
        );
    }
}

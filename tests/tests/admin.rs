//! The control plane, end to end: `/metrics` (parsed as Prometheus text) and `/status` against
//! the traffic actually sent, `lb status`, 50 reloads under load without a lost connection,
//! the bearer token, bad admin requests, and the privileges lb keeps after start-up. Every case
//! runs once per dataplane, against the real binary with an admin API on a free loopback port.

use std::{
    collections::BTreeMap,
    fs,
    io::ErrorKind,
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use lb_tests::{
    admin::{self, AdminLb, Status, set, set_weights},
    backend::Backend,
    lb::{self, LbConfig, ServiceSpec, TempDir, free_addr},
    load::Load,
    per_dataplane, privileged,
    stream::{
        End, Rng, connect, drain_until_end, echo_round_trip, read_to_eof, try_connect, wait_until,
    },
};
use nix::sys::signal::Signal;

/// One whole client connection through lb carrying `len` bytes each way: an echo, a half-close,
/// a clean EOF.
fn exchange(lb: SocketAddr, len: usize, seed: u64) {
    let mut client = connect(lb);
    let msg = Rng::new(seed).bytes(len);
    echo_round_trip(&mut client, &msg).unwrap_or_else(|e| panic!("echo through lb: {e}"));
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let rest = read_to_eof(&mut client, 0).expect("a clean EOF after the echo");
    assert!(rest.is_empty());
}

/// The one backend whose accepted count grew since `before`.
fn which(backends: &[&Backend], before: &[usize]) -> usize {
    let grown: Vec<usize> = (0..backends.len())
        .filter(|&i| backends[i].accepted() != before[i])
        .collect();
    assert_eq!(grown.len(), 1, "one connection, one backend: {before:?}");
    grown[0]
}

fn accepted(backends: &[&Backend]) -> Vec<usize> {
    backends.iter().map(|b| b.accepted()).collect()
}

/// What the test sent per backend: connections placed, bytes each way, connections open.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Sent {
    connections: u64,
    bytes: u64,
    open: u64,
}

/// Sends `closed` whole connections and `open` held-open ones (returned) through `lb` to
/// `backends`, recording per backend what went where.
fn send_traffic(
    lb: SocketAddr,
    backends: &[&Backend],
    closed: usize,
    open: usize,
) -> (Vec<Sent>, Vec<TcpStream>) {
    let mut sent = vec![Sent::default(); backends.len()];
    for i in 0..closed {
        let len = 1000 + 37 * i;
        let before = accepted(backends);
        exchange(lb, len, i as u64);
        let b = which(backends, &before);
        sent[b].connections += 1;
        sent[b].bytes += len as u64;
    }
    let mut held = Vec::new();
    for i in 0..open {
        let len = 100 + i;
        let before = accepted(backends);
        let mut c = connect(lb);
        echo_round_trip(&mut c, &Rng::new(1000 + i as u64).bytes(len)).unwrap();
        let b = which(backends, &before);
        sent[b].connections += 1;
        sent[b].bytes += len as u64;
        sent[b].open += 1;
        held.push(c);
    }
    (sent, held)
}

/// What `/metrics` says about one backend of `service`, in the shape of [`Sent`].
fn metrics_sent(m: &admin::Metrics, service: &str, backend: SocketAddr) -> (Sent, u64) {
    let b = backend.to_string();
    let labels = [("service", service), ("backend", b.as_str())];
    let dir = |d: &'static str| {
        m.get(
            "lb_bytes_total",
            &[
                ("service", service),
                ("backend", b.as_str()),
                ("direction", d),
            ],
        )
    };
    let to_backend = dir("to_backend");
    let to_client = dir("to_client");
    (
        Sent {
            connections: m.get("lb_connections_total", &labels),
            bytes: to_backend,
            open: m.get("lb_active_connections", &labels),
        },
        to_client,
    )
}

per_dataplane! {
    fn metrics_scrape_matches_the_traffic_sent(dataplane) {
        let web = [Backend::echo(), Backend::echo(), Backend::echo()];
        let web_refs: Vec<&Backend> = web.iter().collect();
        let web_addrs: Vec<SocketAddr> = web.iter().map(Backend::addr).collect();
        let good = Backend::echo();
        let (refused, unreachable) = (free_addr(), free_addr());
        let config = LbConfig::new(
            dataplane,
            vec![
                ServiceSpec::new("web", &web_addrs),
                ServiceSpec::new("flaky", &[refused, good.addr()]).retries(1),
                ServiceSpec::new("none", &[unreachable]),
            ],
        );
        let lb = AdminLb::start(&config, |doc| {
            set(doc, "flaky", "ejection", "consecutive_failures: 0");
        });

        // Before any traffic: every counter 0, every backend up, no reload yet.
        let m = lb.metrics();
        for b in &web_addrs {
            assert_eq!(metrics_sent(&m, "web", *b), (Sent::default(), 0));
        }
        assert_eq!(lb.reloads(), (0, 0));
        assert!(
            m.text.contains("# TYPE lb_connections counter")
                && m.text.contains("# TYPE lb_active_connections gauge"),
            "/metrics declares no types:\n{}",
            m.text
        );

        let (sent, held) = send_traffic(lb.addr(), &web_refs, 12, 4);
        for _ in 0..10 {
            exchange(lb.addrs()[1], 10, 0);
        }
        for round in 0..3 {
            let end = match try_connect(lb.addrs()[2]) {
                Ok(mut c) => drain_until_end(&mut c, Duration::from_secs(5)).0,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => End::Reset,
                Err(e) => panic!("round {round}: connect: {e}"),
            };
            assert_eq!(end, End::Reset, "with no backend reachable");
        }

        // Counters are live; give the last connection's close a moment to be counted.
        let matches = |m: &admin::Metrics| {
            web_addrs.iter().zip(&sent).all(|(b, s)| {
                let (got, to_client) = metrics_sent(m, "web", *b);
                got == *s && to_client == s.bytes
            })
        };
        let mut m = lb.metrics();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !matches(&m) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            m = lb.metrics();
        }
        for (b, s) in web_addrs.iter().zip(&sent) {
            let (got, to_client) = metrics_sent(&m, "web", *b);
            assert_eq!(
                (&got, to_client),
                (s, s.bytes),
                "backend {b}: /metrics (connections, bytes to backend, active; bytes to client) vs what was sent\n{}",
                m.text
            );
            let l = b.to_string();
            let labels = [("service", "web"), ("backend", l.as_str())];
            assert_eq!(m.get("lb_backend_up", &labels), 1);
            assert_eq!(m.get("lb_backend_weight", &labels), 1);
            assert_eq!(m.get("lb_connect_failures_total", &labels), 0);
        }
        let total: u64 = m
            .samples("lb_active_connections")
            .iter()
            .filter(|s| s.labels.get("service") == Some("web"))
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v as u64,
                ref v => panic!("lb_active_connections is {v:?}"),
            })
            .sum();
        assert_eq!(total, 4, "lb_active_connections over web");

        // The refused backend: failures counted, no connection placed; its peer took them all.
        let (r, g) = (refused.to_string(), good.addr().to_string());
        fn flaky(b: &str) -> [(&str, &str); 2] {
            [("service", "flaky"), ("backend", b)]
        }
        let failures = m.get("lb_connect_failures_total", &flaky(&r));
        assert!(
            (1..=10).contains(&failures),
            "10 clients, the refused backend tried at most once each: {failures} failures"
        );
        assert_eq!(
            failures,
            lb.status().number("flaky", refused, "connect_failures")
        );
        assert_eq!(m.get("lb_connections_total", &flaky(&r)), 0);
        assert_eq!(m.get("lb_connections_total", &flaky(&g)), 10);
        assert_eq!(m.get("lb_connect_failures_total", &flaky(&g)), 0);
        assert_eq!(m.get("lb_no_backend_total", &[("service", "none")]), 3);
        assert_eq!(m.get("lb_no_backend_total", &[("service", "web")]), 0);
        assert_eq!(m.get("lb_dataplane", &[("dataplane", dataplane)]), 1);

        // Closing the held connections brings lb_active_connections to 0.
        drop(held);
        let idle = wait_until(Duration::from_secs(5), || {
            let m = lb.metrics();
            web_addrs
                .iter()
                .all(|b| metrics_sent(&m, "web", *b).0.open == 0)
        });
        assert!(
            idle,
            "lb_active_connections not 0 after every connection closed:\n{}",
            lb.metrics().text
        );

        // lb_backend_up follows a drain.
        let drained = web_addrs[1];
        let d = drained.to_string();
        let r = lb.post(&format!("/services/web/backends/{drained}/drain"), None);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            lb.metrics()
                .get("lb_backend_up", &[("service", "web"), ("backend", &d)]),
            0
        );

        // Reloads: one that applies, one that does not.
        let r = lb.post("/reload", None);
        assert_eq!(r.status, 200, "{}", r.text());
        lb.write_config("services: [this is not\n");
        let r = lb.post("/reload", None);
        assert_eq!(r.status, 400, "an invalid file: {}", r.text());
        assert_eq!(lb.reloads(), (1, 1), "lb_reloads_total{{ok, failed}}");
        // The reload kept the counters of unchanged backends.
        let (after, _) = metrics_sent(&lb.metrics(), "web", web_addrs[0]);
        assert_eq!(after.connections, sent[0].connections);
    }
}

/// A line of `lb status` output naming `address`, split on whitespace.
fn table_row<'a>(table: &'a str, address: &str) -> Vec<&'a str> {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(address))
        .unwrap_or_else(|| panic!("`lb status` has no row for {address}:\n{table}"))
        .split_whitespace()
        .collect()
}

per_dataplane! {
    fn status_json_and_lb_status_match_the_traffic_sent(dataplane) {
        let web = [Backend::echo(), Backend::echo()];
        let refs: Vec<&Backend> = web.iter().collect();
        let addrs: Vec<SocketAddr> = web.iter().map(Backend::addr).collect();
        let lb = AdminLb::start(
            &LbConfig::new(dataplane, vec![ServiceSpec::new("web", &addrs)]),
            |_| {},
        );
        let (sent, held) = send_traffic(lb.addr(), &refs, 7, 1);
        let expected = |s: &Status| {
            addrs.iter().zip(&sent).all(|(b, want)| {
                s.number("web", *b, "connections_total") == want.connections
                    && s.number("web", *b, "bytes_to_backend") == want.bytes
                    && s.number("web", *b, "bytes_to_client") == want.bytes
                    && s.number("web", *b, "active_connections") == want.open
            })
        };
        let status = lb
            .wait_status(Duration::from_secs(5), expected)
            .unwrap_or_else(|s| panic!("/status does not match what was sent ({sent:?}): {}", s.0));
        assert_eq!(status.0["dataplane"], dataplane);
        let service = status.service("web");
        assert_eq!(service["listen"], lb.addr().to_string());
        assert_eq!(service["algorithm"], "round_robin");
        assert_eq!(service["no_backend"], 0);
        for b in &addrs {
            let backend = status.backend("web", *b);
            assert_eq!(backend["weight"], 1);
            assert_eq!(backend["state"], "up");
            assert_eq!(backend["connect_failures"], 0);
        }

        // `lb status --admin ADDR`: a table with a row per backend and the same counters.
        let admin = lb.admin.to_string();
        let out = lb::run_to_exit(&["status", "--admin", &admin], Duration::from_secs(10));
        let table = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "lb status: {}\n{table}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(table.contains("web"), "no service name in:\n{table}");
        for (b, want) in addrs.iter().zip(&sent) {
            let row = table_row(&table, &b.to_string());
            // BACKEND WEIGHT STATE ACTIVE CONNECTIONS BYTES_TO_BACK BYTES_TO_CLNT
            let fields = [
                "1".to_owned(),
                "up".to_owned(),
                want.open.to_string(),
                want.connections.to_string(),
                want.bytes.to_string(),
                want.bytes.to_string(),
            ];
            assert_eq!(row[1..], fields[..], "row of {b} in:\n{table}");
        }

        // `--json`: the /status document.
        let out = lb::run_to_exit(
            &["status", "--admin", &admin, "--json"],
            Duration::from_secs(10),
        );
        assert!(out.status.success(), "lb status --json: {}", out.status);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "`lb status --json` is not JSON ({e}):\n{}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        assert_eq!(json, lb.status().0, "`lb status --json` vs GET /status");

        // An admin address nobody listens on: a clear error, not a hang.
        let out = lb::run_to_exit(
            &["status", "--admin", &free_addr().to_string()],
            Duration::from_secs(10),
        );
        assert!(!out.status.success(), "lb status against nothing succeeded");
        drop(held);
    }
}

/// The reload test's model of the config: which pool backends `web` lists, with weights, and
/// whether the second service exists (and where).
#[derive(Clone, Debug, PartialEq)]
struct Model {
    web: Vec<(usize, u32)>,
    aux: Option<SocketAddr>,
}

impl Model {
    fn config(&self, dataplane: &str, listen: SocketAddr, pool: &[SocketAddr]) -> LbConfig {
        let backends: Vec<SocketAddr> = self.web.iter().map(|(i, _)| pool[*i]).collect();
        let mut web = ServiceSpec::new("web", &backends).retries(2);
        web.listen = Some(listen);
        let mut services = vec![web];
        if let Some(aux) = self.aux {
            let mut s = ServiceSpec::new("aux", &[pool[0]]);
            s.listen = Some(aux);
            services.push(s);
        }
        LbConfig::new(dataplane, services)
    }

    fn weights(&self) -> Vec<u32> {
        self.web.iter().map(|(_, w)| *w).collect()
    }

    /// What /status should list for `web`.
    fn expected(&self, pool: &[SocketAddr]) -> Vec<(String, u64)> {
        self.web
            .iter()
            .map(|(i, w)| (pool[*i].to_string(), u64::from(*w)))
            .collect()
    }
}

per_dataplane! {
    fn fifty_reloads_under_load_lose_no_connection_and_are_counted(dataplane) {
        let pool_backends: Vec<Backend> = (0..5).map(|_| Backend::echo()).collect();
        let pool: Vec<SocketAddr> = pool_backends.iter().map(Backend::addr).collect();
        let mut model = Model {
            web: vec![(0, 1), (1, 1), (2, 1)],
            aux: None,
        };
        let lb = AdminLb::start(&model.config(dataplane, free_addr(), &pool), |_| {});
        let listen = lb.addr();
        // A listening socket: a reload moving `web` here cannot bind.
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let taken_addr = taken.local_addr().unwrap();

        let load = Load::start(listen, 2, Duration::from_millis(1));
        assert!(
            load.wait_for_more(50, Duration::from_secs(20)),
            "the load does not get going"
        );
        let mut rng = Rng::new(0x5eed);
        let (mut ok, mut failed) = (0u64, 0u64);
        let mut kinds: BTreeMap<&'static str, u32> = BTreeMap::new();
        let started = Instant::now();
        for i in 0..50u32 {
            let by_signal = i % 2 == 0;
            let before = model.clone();
            // (what, the YAML, whether it applies, the POST status it gets)
            let (what, yaml, applies, code): (&'static str, String, bool, u16) = match i % 10 {
                3 => {
                    let head = lb.render(&model.config(dataplane, listen, &pool), |doc| {
                        set_weights(doc, "web", &model.weights());
                    });
                    let bad = match (i / 10) % 4 {
                        0 => format!("{head}\nservices: [unclosed\n"),
                        1 => head.replace("retries:", "retires:"),
                        2 => lb.render(&model.config(dataplane, listen, &pool), |doc| {
                            let mut w = model.weights();
                            w[0] = 5000;
                            set_weights(doc, "web", &w);
                        }),
                        _ => {
                            let mut dup = model.clone();
                            dup.web.push(dup.web[0]);
                            lb.render(&dup.config(dataplane, listen, &pool), |doc| {
                                set_weights(doc, "web", &dup.weights());
                            })
                        }
                    };
                    assert_ne!(bad, head, "the invalid variant changed nothing");
                    ("invalid", bad, false, 400)
                }
                7 => {
                    // A new listen address already taken, together with new weights: none of it
                    // may apply.
                    let w: Vec<u32> = model.weights().iter().map(|w| w % 5 + 1).collect();
                    let mut moved = model.config(dataplane, listen, &pool);
                    moved.services[0].listen = Some(taken_addr);
                    let yaml = lb.render(&moved, |doc| set_weights(doc, "web", &w));
                    ("listen taken", yaml, false, 409)
                }
                _ => {
                    let unused: Vec<usize> = (0..pool.len())
                        .filter(|p| !model.web.iter().any(|(i, _)| i == p))
                        .collect();
                    let what = match rng.range(0..5) {
                        0 if !unused.is_empty() => {
                            let p = unused[rng.range(0..unused.len())];
                            let at = rng.range(0..model.web.len() + 1);
                            model.web.insert(at, (p, 1 + rng.range(0..4) as u32));
                            "add backend"
                        }
                        1 if model.web.len() > 1 => {
                            model.web.remove(rng.range(0..model.web.len()));
                            "remove backend"
                        }
                        2 => {
                            model.aux = match model.aux {
                                Some(_) => None,
                                None => Some(free_addr()),
                            };
                            if model.aux.is_some() {
                                "add service"
                            } else {
                                "remove service"
                            }
                        }
                        _ => {
                            for (_, w) in &mut model.web {
                                *w = 1 + rng.range(0..5) as u32;
                            }
                            "reweight"
                        }
                    };
                    let yaml = lb.render(&model.config(dataplane, listen, &pool), |doc| {
                        set_weights(doc, "web", &model.weights());
                    });
                    (what, yaml, true, 200)
                }
            };
            *kinds.entry(what).or_default() += 1;
            if !applies {
                model = before.clone();
            }
            lb.write_config(&yaml);
            if by_signal {
                lb.signal(Signal::SIGHUP);
            } else {
                let r = lb.post("/reload", None);
                assert_eq!(
                    r.status,
                    code,
                    "reload {i} ({what}) by POST: {}\nconfig:\n{yaml}",
                    r.text()
                );
            }
            if applies {
                ok += 1;
            } else {
                failed += 1;
            }
            let counted = wait_until(Duration::from_secs(10), || lb.reloads() == (ok, failed));
            assert!(
                counted,
                "reload {i} ({what}, by {}): lb_reloads_total is {:?}, want {:?}",
                if by_signal { "SIGHUP" } else { "POST" },
                lb.reloads(),
                (ok, failed)
            );
            // The config running now is the model: the new one, or the old one whole.
            let status = lb.status();
            assert_eq!(
                status.backends("web"),
                model.expected(&pool),
                "reload {i} ({what}): web's backends and weights"
            );
            assert_eq!(
                status.service("web")["listen"],
                listen.to_string(),
                "reload {i} ({what}): web's listen address"
            );
            match model.aux {
                Some(aux) => {
                    assert_eq!(status.service("aux")["listen"], aux.to_string());
                    exchange(aux, 100, u64::from(i));
                }
                None => assert!(
                    status.0["services"]
                        .as_array()
                        .is_some_and(|s| s.iter().all(|s| s["name"] != "aux")),
                    "reload {i} ({what}): aux should be gone: {}",
                    status.0
                ),
            }
            if let Some(gone) = before.aux.filter(|_| model.aux.is_none()) {
                // A removed service stops accepting.
                let refused = wait_until(Duration::from_secs(5), || {
                    matches!(TcpStream::connect_timeout(&gone, Duration::from_secs(1)),
                        Err(e) if e.kind() == ErrorKind::ConnectionRefused)
                });
                assert!(
                    refused,
                    "reload {i}: the removed service still accepts on {gone}"
                );
            }
        }
        let took = started.elapsed();
        assert!(
            load.wait_for_more(50, Duration::from_secs(20)),
            "the load stalled after the reloads"
        );
        let report = load.stop();
        eprintln!(
            "50 reloads ({kinds:?}) in {took:?}; load: {} ok, {} failed in {:?}",
            report.ok, report.failed, report.elapsed
        );
        assert_eq!(
            report.failed, 0,
            "client connections failed during the reloads: {:#?}",
            report.errors
        );
        assert_eq!(lb.reloads(), (ok, failed));
        assert_eq!((ok + failed), 50);
        assert_eq!(
            (kinds["invalid"], kinds["listen taken"]),
            (5, 5),
            "{kinds:?}"
        );
        assert!(lb.stderr().contains("reload failed"));
        drop(taken);
    }
}

per_dataplane! {
    fn post_endpoints_need_the_token_and_reads_do_not(dataplane) {
        let backend = Backend::echo();
        let dir = TempDir::new();
        let token_file = dir.path.join("admin.token");
        fs::write(&token_file, "s3cret-token-42\n").unwrap();
        let token_path = token_file.to_str().unwrap().to_owned();
        let lb = AdminLb::start(
            &LbConfig::new(dataplane, vec![ServiceSpec::new("web", &[backend.addr()])]),
            move |doc| {
                doc.as_mapping_mut()
                    .and_then(|d| d.get_mut("admin"))
                    .and_then(|a| a.as_mapping_mut())
                    .expect("admin mapping")
                    .insert("token_file".into(), token_path.clone().into());
            },
        );
        let drain = format!("/services/web/backends/{}/drain", backend.addr());
        let with_header = |path: &str, value: &str| {
            admin::request(lb.admin, "POST", path, &[("Authorization", value)], b"").unwrap()
        };
        for path in ["/reload", drain.as_str()] {
            let none = lb.post(path, None);
            assert_eq!(
                none.status,
                401,
                "POST {path} without a token: {}",
                none.text()
            );
            let wrong = lb.post(path, Some("s3cret-token-41"));
            assert_eq!(
                wrong.status,
                401,
                "POST {path} with a wrong token: {}",
                wrong.text()
            );
            let scheme = with_header(path, "Basic s3cret-token-42");
            assert_eq!(
                scheme.status,
                401,
                "POST {path} with Basic auth: {}",
                scheme.text()
            );
            let prefix = lb.post(path, Some("s3cret"));
            assert_eq!(prefix.status, 401, "POST {path} with a prefix of the token");
        }
        // Nothing happened.
        assert_eq!(lb.reloads(), (0, 0), "a refused POST /reload reloaded");
        assert_eq!(lb.status().state("web", backend.addr()), "up");

        for path in ["/reload", drain.as_str()] {
            let right = lb.post(path, Some("s3cret-token-42"));
            assert_eq!(
                right.status,
                200,
                "POST {path} with the token: {}",
                right.text()
            );
        }
        assert_eq!(lb.reloads(), (1, 0));
        assert_eq!(lb.status().state("web", backend.addr()), "draining");

        // Reads need no token.
        for path in ["/metrics", "/status"] {
            let r = admin::get(lb.admin, path).unwrap();
            assert_eq!(r.status, 200, "GET {path} without a token: {}", r.text());
        }
    }
}

/// lb still serves: it has not exited, /status answers, a connection is relayed.
fn assert_alive(lb: &mut AdminLb, after: &str) {
    assert_eq!(lb.try_wait(), None, "lb exited after {after}");
    let r = admin::get(lb.admin, "/status")
        .unwrap_or_else(|e| panic!("after {after}: GET /status: {e}"));
    assert_eq!(r.status, 200, "after {after}");
    exchange(lb.addr(), 64, 7);
}

per_dataplane! {
    fn an_oversized_body_gets_413_changes_nothing_and_lb_keeps_running(dataplane) {
        let backend = Backend::echo();
        let mut lb = AdminLb::start(
            &LbConfig::new(dataplane, vec![ServiceSpec::new("web", &[backend.addr()])]),
            |_| {},
        );

        // A body over 64 KiB.
        let body = vec![b'a'; 70 * 1024];
        let head = format!(
            "POST /reload HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            lb.admin,
            body.len()
        );
        let mut request = head.into_bytes();
        request.extend_from_slice(&body);
        let ex = admin::exchange(lb.admin, &request).unwrap();
        let raw = ex.response.unwrap_or_default();
        let status = if raw.is_empty() {
            None
        } else {
            Some(
                admin::parse_response(&raw)
                    .expect("an HTTP response")
                    .status,
            )
        };
        eprintln!("POST /reload with a 70 KiB body: {status:?}");
        assert!(
            status.is_some_and(|s| (400..500).contains(&s)),
            "POST /reload with a {} byte body got {status:?} ({:?}), want 413 (or another 4xx)",
            body.len(),
            String::from_utf8_lossy(&raw[..raw.len().min(200)])
        );
        assert_eq!(lb.reloads(), (0, 0), "the oversized request reloaded");
        assert_alive(&mut lb, "an oversized body");
    }
}

per_dataplane! {
    fn garbage_admin_requests_get_4xx_or_closed_and_lb_keeps_running(dataplane) {
        let backend = Backend::echo();
        let mut lb = AdminLb::start(
            &LbConfig::new(dataplane, vec![ServiceSpec::new("web", &[backend.addr()])]),
            |_| {},
        );
        // Garbage: not HTTP at all; a request line that never ends.
        let garbage: [(&str, Vec<u8>); 3] = [
            (
                "a garbage request line",
                b"\x16\x03\x01\x00 GARBAGE \xff\xfe\r\n\r\n".to_vec(),
            ),
            (
                "a request line without a method",
                b" / HTTP/1.1\r\n\r\n".to_vec(),
            ),
            ("a 1 MiB request line", {
                let mut v = b"GET /".to_vec();
                v.resize(1 << 20, b'a');
                v
            }),
        ];
        for (what, bytes) in garbage {
            let ex = admin::exchange(lb.admin, &bytes).unwrap();
            match ex.response {
                Ok(raw) if raw.is_empty() => eprintln!("{what}: connection closed"),
                Ok(raw) => {
                    let r = admin::parse_response(&raw)
                        .unwrap_or_else(|e| panic!("{what}: not an HTTP response: {e}"));
                    eprintln!("{what}: {}", r.status);
                    assert!(
                        (400..500).contains(&r.status),
                        "{what}: got {}, want a 4xx or a closed connection",
                        r.status
                    );
                }
                Err(e) => eprintln!("{what}: connection ended with {e}"),
            }
            assert_alive(&mut lb, what);
        }
        assert_eq!(lb.reloads(), (0, 0));
    }
}

/// The `Name:\tvalue` fields of a /proc status file.
fn proc_status(path: &str) -> BTreeMap<String, String> {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {path}: {e}"))
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

/// The status of every thread of `pid`.
fn thread_statuses(pid: u32) -> Vec<(String, BTreeMap<String, String>)> {
    let dir = format!("/proc/{pid}/task");
    fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {dir}: {e}"))
        .filter_map(Result::ok)
        .map(|e| {
            let tid = e.file_name().to_string_lossy().into_owned();
            (tid.clone(), proc_status(&format!("{dir}/{tid}/status")))
        })
        .collect()
}

/// CAP_NET_BIND_SERVICE (bit 10) if this process may pass it on, else nothing.
fn expected_caps() -> String {
    let ours = proc_status("/proc/self/status");
    let bounding = u64::from_str_radix(&ours["CapBnd"], 16).unwrap();
    format!("{:016x}", bounding & (1 << 10))
}

fn assert_only_net_bind_service(pid: u32) {
    let want = expected_caps();
    let threads = thread_statuses(pid);
    assert!(threads.len() > 1, "lb runs worker threads");
    for (tid, s) in &threads {
        for (field, value) in [
            ("CapEff", want.as_str()),
            ("CapPrm", want.as_str()),
            ("CapBnd", want.as_str()),
            ("CapInh", "0000000000000000"),
            ("CapAmb", "0000000000000000"),
            ("NoNewPrivs", "1"),
        ] {
            assert_eq!(
                s[field], value,
                "thread {tid} of lb ({}): {field}",
                s["Name"]
            );
        }
    }
}

/// A free TCP port below 1024 on 127.0.0.1 (only root can tell).
fn free_low_port() -> Option<SocketAddr> {
    (900..1024)
        .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
        .find(|a| TcpListener::bind(a).is_ok() && !lb::tcp_listening(*a))
}

per_dataplane! {
    fn after_start_up_lb_keeps_only_net_bind_service(dataplane) {
        if !privileged("after_start_up_lb_keeps_only_net_bind_service") {
            return;
        }
        let backend = Backend::echo();
        let lb = AdminLb::start(
            &LbConfig::new(dataplane, vec![ServiceSpec::new("web", &[backend.addr()])]),
            |_| {},
        );
        assert_only_net_bind_service(lb.pid());
        let s = proc_status(&format!("/proc/{}/status", lb.pid()));
        assert!(
            s["Uid"].split_whitespace().all(|u| u == "0"),
            "Uid {}",
            s["Uid"]
        );
        exchange(lb.addr(), 100, 1);
    }
}

per_dataplane! {
    fn run_as_nobody_switches_user_and_still_reloads_onto_a_low_port(dataplane) {
        if !privileged("run_as_nobody_switches_user_and_still_reloads_onto_a_low_port") {
            return;
        }
        let nobody = nix::unistd::User::from_name("nobody")
            .unwrap()
            .expect("a user named nobody");
        let backend = Backend::echo();
        let config = LbConfig::new(dataplane, vec![ServiceSpec::new("web", &[backend.addr()])]);
        let lb = AdminLb::start(&config, |doc| admin::set_top(doc, "run_as", "nobody"));
        let s = proc_status(&format!("/proc/{}/status", lb.pid()));
        let uid = nobody.uid.to_string();
        let gid = nobody.gid.to_string();
        assert_eq!(uid, "65534", "nobody's uid");
        for tid_status in thread_statuses(lb.pid()) {
            let (tid, t) = tid_status;
            assert!(
                t["Uid"].split_whitespace().all(|u| u == uid),
                "thread {tid}: Uid {} (want {uid} everywhere)",
                t["Uid"]
            );
            assert!(
                t["Gid"].split_whitespace().all(|g| g == gid),
                "thread {tid}: Gid {} (want {gid} everywhere)",
                t["Gid"]
            );
            assert_eq!(t["Groups"], "", "thread {tid}: supplementary groups");
        }
        assert_eq!(s["NoNewPrivs"], "1");
        assert_only_net_bind_service(lb.pid());
        exchange(lb.addr(), 100, 2);

        // The capability it kept is what lets a reload bind a port below 1024.
        let Some(low) = free_low_port() else {
            eprintln!("no free port below 1024: the reload part is skipped");
            return;
        };
        let mut both = lb.config.clone();
        let mut aux = ServiceSpec::new("aux", &[backend.addr()]);
        aux.listen = Some(low);
        both.services.push(aux);
        lb.write_config(&lb.render(&both, |doc| admin::set_top(doc, "run_as", "nobody")));
        let r = lb.post("/reload", None);
        assert_eq!(
            r.status,
            200,
            "reload adding a service on {low} as nobody: {}",
            r.text()
        );
        exchange(low, 100, 3);
    }
}

//! Real, unmodified servers and clients through lb on loopback: redis (redis-benchmark with
//! 1 MiB values, redis-cli SET/GET, PUBLISH/SUBSCRIBE), PostgreSQL (pgbench, COPY in and out),
//! nginx (downloads and uploads, with `sendfile` on and off), TLS passed through (nginx with a
//! self-signed certificate, curl), iperf3 (both ways). Their buffering, sendfile, pipelining
//! and half-closes are not what the suite's own clients do, and users found bugs with them that
//! those clients never showed.
//!
//! Each case is one test per userspace dataplane and mode (a failing one hides no other):
//! `proxy`; `sockmap_default_promotion` (no `promote_after_bytes` key, so the shipped default:
//! 64 KiB in userspace, then the kernel); `sockmap_at_once` (`promote_after_bytes: 0`). Every
//! server runs on a free port in a temporary directory and is stopped on drop; every client
//! command has a deadline within the case's budget ([`CASE_BUDGET`]), so a stall fails in
//! bounded time and says so. Bytes are compared exactly: a failure names the first differing
//! offset and whether the bytes there were duplicated, lost or corrupted.
//!
//! The programs come from Debian packages that `cargo xtask setup` installs. A missing one
//! skips the case with a message, except under `CI=true`, where it fails. The sockmap modes need
//! root (BPF) and skip without it, like the rest of the suite.

use std::{
    fmt::Write as _,
    fs,
    net::SocketAddr,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use lb_tests::{
    admin::{self, AdminLb, Metrics},
    clients::{
        Budget, Daemon, Run, difference, have, program_path, random_file, read, run, sha256,
    },
    lb::{LbConfig, ServiceSpec, TempDir, free_addr},
    privileged,
    stream::{Rng, wait_until},
};
use serde_yaml::Value;

/// The most one case may take, set-up included: every client command's deadline is cut to fit.
const CASE_BUDGET: Duration = Duration::from_secs(75);
/// The most one client command may take (on loopback each takes a few seconds at most).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(45);
/// How long a server may take to listen.
const SERVER_START: Duration = Duration::from_secs(15);
/// curl gives up on a transfer that moved less than a byte a second for this long: a stall.
const STALL_SECONDS: &str = "10";
/// iperf3's throughput floor on loopback (100 Mbit/s).
const MIN_IPERF3_BPS: f64 = 100e6;

/// A userspace dataplane, and for sockmap when it hands a connection to the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plane {
    Proxy,
    /// No `promote_after_bytes` key: the shipped default (64 KiB in userspace first).
    SockmapDefaultPromotion,
    /// `promote_after_bytes: 0`: every connection to the kernel at once.
    SockmapAtOnce,
}

impl Plane {
    fn name(self) -> &'static str {
        match self {
            Plane::Proxy => "proxy",
            Plane::SockmapDefaultPromotion => "sockmap_default_promotion",
            Plane::SockmapAtOnce => "sockmap_at_once",
        }
    }

    fn mode(self) -> &'static str {
        match self {
            Plane::Proxy => "proxy",
            Plane::SockmapDefaultPromotion | Plane::SockmapAtOnce => "sockmap",
        }
    }
}

/// A pin directory of its own on bpffs (tests run in parallel), removed on drop.
struct PinDir(PathBuf);

impl PinDir {
    fn new() -> PinDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/lb-tests-real-{}-{n}",
            std::process::id()
        )))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// lb in front of one backend with one dataplane and mode. Fields drop in order: lb stops
/// (printing its stderr when the test fails) before its pin directory goes.
struct Balancer {
    lb: AdminLb,
    _pins: Option<PinDir>,
    plane: Plane,
    test: String,
}

impl Balancer {
    /// lb with `plane` in front of `backend` ([`may_run`] said the plane may run).
    fn start(plane: Plane, test: &str, backend: SocketAddr) -> Balancer {
        let pins = (plane != Plane::Proxy).then(PinDir::new);
        // Slow clients (a subscriber, pgbench's think time) are not idle for this long.
        let service = ServiceSpec::new("real", &[backend]).idle_timeout("120s");
        let config = LbConfig::new(plane.mode(), vec![service]);
        let lb = AdminLb::start(&config, |doc| {
            if let Some(pins) = &pins {
                doc["dataplane"]["pin_path"] = Value::from(pins.0.to_str().expect("utf-8"));
            }
            if plane == Plane::SockmapDefaultPromotion {
                // LbConfig writes `promote_after_bytes: 0`; the shipped default is no key.
                let dataplane = doc["dataplane"].as_mapping_mut().expect("a mapping");
                dataplane.remove("sockmap");
            }
        });
        let yaml = fs::read_to_string(lb.config_path()).expect("read lb's config");
        assert_eq!(
            yaml.contains("promote_after_bytes"),
            plane == Plane::SockmapAtOnce,
            "the config has the promotion key exactly for sockmap_at_once:\n{yaml}"
        );
        Balancer {
            lb,
            _pins: pins,
            plane,
            test: test.to_owned(),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.lb.addr()
    }

    fn port(&self) -> String {
        self.addr().port().to_string()
    }

    /// What lb says it did, for messages: whether it still runs, and for sockmap who relayed.
    fn summary(&mut self) -> String {
        if let Some(status) = self.lb.try_wait() {
            return format!("lb EXITED with {status}");
        }
        let Ok(metrics) = admin::get(self.lb.admin, "/metrics") else {
            return "lb's /metrics does not answer".to_owned();
        };
        let m = Metrics::parse(metrics.text());
        let v = |name: &str, labels: &[(&str, &str)]| {
            m.value(name, labels)
                .map_or_else(|| "?".to_owned(), |v| v.to_string())
        };
        let mut s = format!("lb runs ({} dataplane", self.lb.config.dataplane);
        if self.plane != Plane::Proxy {
            let _ = write!(
                s,
                "; connections relayed by the kernel {}, kept in userspace {}, holds {}; \
                 kernel redirected {} bytes",
                v("lb_sockmap_connections_total", &[("relayed_by", "kernel")]),
                v(
                    "lb_sockmap_connections_total",
                    &[("relayed_by", "userspace")]
                ),
                v("lb_sockmap_holds_total", &[("dataplane", "sockmap")]),
                v("lb_sockmap_events_total", &[("event", "redirect_bytes")]),
            );
        }
        s.push(')');
        s
    }

    /// Panics with `what`, the test and plane, and lb's summary (its stderr follows, printed
    /// as lb stops).
    fn fail(&mut self, what: &str) -> ! {
        // A scrape that cannot be read must not hide `what`.
        let summary = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.summary()))
            .unwrap_or_else(|_| "lb's /metrics could not be read".to_owned());
        panic!(
            "{} [{}] FAILED: {what}\n{summary}",
            self.test,
            self.plane.name()
        )
    }

    /// `run` if it exited 0; else fails with what it did.
    fn expect_success(&mut self, run: Run) -> Run {
        if !run.success() {
            self.fail(&run.describe());
        }
        run
    }

    /// Fails with `context` and the difference unless `got` is `expected` byte for byte.
    fn expect_same(&mut self, context: &str, expected: &[u8], got: &[u8]) {
        if let Some(diff) = difference(expected, got) {
            self.fail(&format!("{context}: {diff}"));
        }
    }

    /// Prints what lb did (`--nocapture` shows it): the record of a passing run.
    fn report(mut self) {
        let summary = self.summary();
        eprintln!("{} [{}] passed; {summary}", self.test, self.plane.name());
    }
}

/// Whether `test` may run on `plane` with `programs`: each installed (else a skip, or a failure
/// under `CI=true`: see [`have`]), and root for sockmap (see [`privileged`]).
fn may_run(plane: Plane, test: &str, programs: &[&str]) -> bool {
    have(test, programs) && (plane == Plane::Proxy || privileged(test))
}

/// One `#[test]` per case and dataplane: `CASE::proxy`, `CASE::sockmap_default_promotion`,
/// `CASE::sockmap_at_once`.
macro_rules! on_every_dataplane {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            use super::Plane;

            #[test]
            fn proxy() {
                super::$case(Plane::Proxy, concat!(stringify!($case), "::proxy"));
            }

            #[test]
            fn sockmap_default_promotion() {
                super::$case(
                    Plane::SockmapDefaultPromotion,
                    concat!(stringify!($case), "::sockmap_default_promotion"),
                );
            }

            #[test]
            fn sockmap_at_once() {
                super::$case(Plane::SockmapAtOnce, concat!(stringify!($case), "::sockmap_at_once"));
            }
        }
    )*};
}

on_every_dataplane!(
    redis_benchmark_with_1mib_values,
    redis_cli_set_and_get_of_1mib,
    redis_publish_subscribe,
    postgres_pgbench,
    postgres_copy_in_and_out_of_20mib,
    nginx_sendfile_on_download_of_50mib,
    nginx_sendfile_off_download_of_50mib,
    nginx_sendfile_on_upload_of_20mib,
    nginx_sendfile_off_upload_of_20mib,
    tls_passthrough_download_of_20mib,
    iperf3_client_sends,
    iperf3_reverse,
);

// ---------------------------------------------------------------------------------------------
// redis

/// `redis-server` on a free port, without persistence, in a temporary directory.
struct Redis {
    addr: SocketAddr,
    _server: Daemon,
    _dir: TempDir,
}

impl Redis {
    fn start() -> Redis {
        let dir = TempDir::new();
        let addr = free_addr();
        let mut server = Daemon::spawn(
            "redis-server",
            Command::new(program_path("redis-server"))
                .args(["--port", &addr.port().to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
                .args(["--daemonize", "no", "--logfile", ""])
                .arg("--dir")
                .arg(&dir.path),
            &dir.path.join("redis.log"),
        );
        server.wait_listening(addr, SERVER_START);
        Redis {
            addr,
            _server: server,
            _dir: dir,
        }
    }
}

/// `redis-cli -h 127.0.0.1 -p PORT ARGS...`.
fn redis_cli(port: u16, args: &[&str]) -> Command {
    let mut c = Command::new(program_path("redis-cli"));
    c.args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args);
    c
}

fn redis_benchmark_with_1mib_values(plane: Plane, test: &str) {
    if !may_run(plane, test, &["redis-server", "redis-benchmark"]) {
        return;
    }
    let budget = Budget::new(CASE_BUDGET);
    let redis = Redis::start();
    let mut lb = Balancer::start(plane, test, redis.addr);
    // 20 SETs then 20 GETs of 1 MiB on 2 connections (pipelined replies are 1 MiB each).
    let run = run(
        Command::new(program_path("redis-benchmark"))
            .args(["-h", "127.0.0.1", "-p", &lb.port()])
            .args([
                "-t", "set,get", "-d", "1048576", "-n", "20", "-c", "2", "--csv",
            ]),
        None,
        budget.timeout(CLIENT_TIMEOUT),
    );
    let run = lb.expect_success(run);
    let out = run.stdout_text();
    for t in ["SET", "GET"] {
        if !out.lines().any(|l| l.starts_with(&format!("\"{t}\","))) {
            lb.fail(&format!(
                "redis-benchmark has no {t} result\n{}",
                run.describe()
            ));
        }
    }
    if out.contains("Error") || run.stderr.contains("Error") {
        lb.fail(&format!(
            "redis-benchmark reports errors\n{}",
            run.describe()
        ));
    }
    lb.report();
}

fn redis_cli_set_and_get_of_1mib(plane: Plane, test: &str) {
    if !may_run(plane, test, &["redis-server", "redis-cli"]) {
        return;
    }
    let budget = Budget::new(CASE_BUDGET);
    let redis = Redis::start();
    let mut lb = Balancer::start(plane, test, redis.addr);
    let dir = TempDir::new();
    for round in 0..3 {
        let key = format!("big{round}");
        let value_path = dir.path.join(&key);
        random_file(&value_path, 1 << 20);
        let value = read(&value_path);
        // redis-cli prints a bulk reply raw, then a newline.
        let mut reply = value.clone();
        reply.push(b'\n');

        let set = run(
            &mut redis_cli(lb.addr().port(), &["-x", "SET", &key]),
            Some(&value_path),
            budget.timeout(CLIENT_TIMEOUT),
        );
        let set = lb.expect_success(set);
        if set.stdout != b"OK\n" {
            lb.fail(&format!("SET {key} through lb: {}", set.describe()));
        }
        // Read back from redis itself: what lb delivered upstream.
        let direct = run(
            &mut redis_cli(redis.addr.port(), &["GET", &key]),
            None,
            budget.timeout(CLIENT_TIMEOUT),
        )
        .expect_success();
        lb.expect_same(
            &format!("round {round}: the value redis stored from a SET through lb (upload)"),
            &reply,
            &direct.stdout,
        );
        let through = run(
            &mut redis_cli(lb.addr().port(), &["GET", &key]),
            None,
            budget.timeout(CLIENT_TIMEOUT),
        );
        let through = lb.expect_success(through);
        lb.expect_same(
            &format!("round {round}: GET {key} through lb (download)"),
            &reply,
            &through.stdout,
        );
    }
    lb.report();
}

fn redis_publish_subscribe(plane: Plane, test: &str) {
    if !may_run(plane, test, &["redis-server", "redis-cli"]) {
        return;
    }
    let budget = Budget::new(CASE_BUDGET);
    let redis = Redis::start();
    let mut lb = Balancer::start(plane, test, redis.addr);
    let dir = TempDir::new();
    const MESSAGES: usize = 1000;
    let mut rng = Rng::new(0x5ab5);
    let messages: Vec<String> = (0..MESSAGES)
        .map(|i| {
            let mut m = format!("{i:06}-");
            while m.len() < 1000 {
                m.push(char::from(b'a' + (rng.next_u64() % 26) as u8));
            }
            m
        })
        .collect();

    let sub_log = dir.path.join("subscriber.out");
    let subscriber = Daemon::spawn(
        "redis-cli SUBSCRIBE",
        &mut redis_cli(lb.addr().port(), &["SUBSCRIBE", "ch"]),
        &sub_log,
    );
    let read_log = || String::from_utf8_lossy(&fs::read(&sub_log).unwrap_or_default()).into_owned();
    if !wait_until(Duration::from_secs(10), || {
        read_log().starts_with("subscribe\nch\n1\n")
    }) {
        lb.fail(&format!(
            "the subscriber through lb is not subscribed after 10 s; it printed {:?}",
            read_log()
        ));
    }
    let commands = dir.path.join("publish.txt");
    let text: String = messages
        .iter()
        .map(|m| format!("PUBLISH ch {m}\n"))
        .collect();
    fs::write(&commands, text).expect("write the PUBLISH commands");
    let publish = run(
        &mut redis_cli(lb.addr().port(), &[]),
        Some(&commands),
        budget.timeout(CLIENT_TIMEOUT),
    );
    let publish = lb.expect_success(publish);
    let receivers: Vec<String> = publish.stdout_text().lines().map(str::to_owned).collect();
    if receivers.len() != MESSAGES || receivers.iter().any(|r| r != "1") {
        lb.fail(&format!(
            "every PUBLISH through lb reaches one subscriber: got {} replies, first other than \
             1: {:?}",
            receivers.len(),
            receivers.iter().enumerate().find(|(_, r)| *r != "1")
        ));
    }
    let last = messages.last().expect("messages");
    if !wait_until(budget.timeout(Duration::from_secs(20)), || {
        read_log().contains(last.as_str())
    }) {
        let got = read_log().lines().count().saturating_sub(3) / 3;
        lb.fail(&format!(
            "STALLED: the subscriber has {got} of {MESSAGES} messages and no more come"
        ));
    }
    drop(subscriber);
    let log = read_log();
    let lines: Vec<&str> = log.lines().skip(3).collect();
    let got: Vec<&str> = lines
        .chunks(3)
        .map(|c| match c {
            ["message", "ch", payload] => *payload,
            _ => "(not a message triple)",
        })
        .collect();
    if let Some(i) = (0..MESSAGES).find(|&i| got.get(i) != Some(&messages[i].as_str())) {
        lb.fail(&format!(
            "the subscriber's message {i} of {MESSAGES} differs (got {} messages): expected \
             {:?}..., got {:?}",
            got.len(),
            &messages[i][..40],
            got.get(i).map(|g| &g[..g.len().min(80)])
        ));
    }
    if got.len() != MESSAGES {
        lb.fail(&format!(
            "the subscriber got {} messages, {MESSAGES} sent",
            got.len()
        ));
    }
    lb.report();
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

/// A PostgreSQL cluster made by `initdb` in a temporary directory, started by `pg_ctl` on a free
/// port (unix sockets in the directory too), trusting local connections. As root, its programs
/// run as the `postgres` user (the server refuses root). Stopped (`-m immediate`) on drop.
struct Postgres {
    addr: SocketAddr,
    data: PathBuf,
    log: PathBuf,
    started: bool,
    _dir: TempDir,
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A PostgreSQL server program, run as `postgres` when we are root.
fn as_postgres(program: &str) -> Command {
    if is_root() {
        let mut c = Command::new(program_path("runuser"));
        c.args(["-u", "postgres", "--"]).arg(program_path(program));
        c
    } else {
        Command::new(program_path(program))
    }
}

impl Postgres {
    fn start(budget: &Budget) -> Postgres {
        let dir = TempDir::new();
        let root = dir.path.join("pg");
        fs::create_dir(&root).expect("create the PostgreSQL directory");
        if is_root() {
            let user = nix::unistd::User::from_name("postgres")
                .expect("look up the postgres user")
                .expect("a `postgres` user (the postgresql package makes it)");
            nix::unistd::chown(&root, Some(user.uid), Some(user.gid))
                .expect("chown the PostgreSQL directory to postgres");
        }
        let data = root.join("data");
        let log = root.join("server.log");
        let addr = free_addr();
        let mut pg = Postgres {
            addr,
            data: data.clone(),
            log: log.clone(),
            started: false,
            _dir: dir,
        };
        run(
            as_postgres("initdb")
                .arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "-A", "trust", "-E", "UTF8"])
                .args(["--locale=C", "--no-sync"]),
            None,
            budget.timeout(CLIENT_TIMEOUT),
        )
        .expect_success();
        // The port is chosen right before the server binds it, and chosen again (at most 3
        // times) when another test took it in between: the suite runs many tests at once.
        for attempt in 1..=3 {
            if attempt > 1 {
                pg.addr = free_addr();
            }
            let options = format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
                 -c full_page_writes=off",
                pg.addr.port(),
                root.display()
            );
            pg.started = true;
            let started = run(
                as_postgres("pg_ctl")
                    .arg("-D")
                    .arg(&data)
                    .arg("-l")
                    .arg(&log)
                    .args(["-w", "-t", "30", "-o", &options, "start"]),
                None,
                budget.timeout(Duration::from_secs(40)),
            );
            let taken =
                fs::read_to_string(&log).is_ok_and(|text| text.contains("Address already in use"));
            if started.success() || !taken || attempt == 3 {
                started.expect_success();
                break;
            }
            eprintln!(
                "PostgreSQL's port {} was taken meanwhile; choosing another",
                pg.addr
            );
            let _ = fs::remove_file(&log);
        }
        pg
    }

    /// `psql` to `port` (lb's, or the server's own) as postgres, stopping at the first error,
    /// unaligned tuples only.
    fn psql(port: u16, args: &[&str]) -> Command {
        let mut c = Command::new(program_path("psql"));
        c.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
            .args(["-d", "postgres", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(args);
        c
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.started {
            let _ = run(
                as_postgres("pg_ctl").arg("-D").arg(&self.data).args([
                    "-m",
                    "immediate",
                    "-w",
                    "-t",
                    "10",
                    "stop",
                ]),
                None,
                Duration::from_secs(15),
            );
        }
        if std::thread::panicking() {
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!(
                "--- PostgreSQL log, last 30 lines ---\n{}\n--- end of PostgreSQL log ---",
                lb_tests::clients::tail(&log, 30)
            );
        }
    }
}

fn postgres_pgbench(plane: Plane, test: &str) {
    if !may_run(
        plane,
        test,
        &["initdb", "pg_ctl", "postgres", "pgbench", "psql"],
    ) {
        return;
    }
    let budget = Budget::new(CASE_BUDGET);
    let pg = Postgres::start(&budget);
    let mut lb = Balancer::start(plane, test, pg.addr);
    let port = lb.port();
    let pgbench = |args: &[&str]| {
        let mut c = Command::new(program_path("pgbench"));
        c.args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
            .args(args)
            .arg("postgres");
        c
    };
    // Scale 2: 200,000 accounts, sent by COPY through lb.
    let init = run(
        &mut pgbench(&["-i", "-s", "2", "-q"]),
        None,
        budget.timeout(CLIENT_TIMEOUT),
    );
    lb.expect_success(init);
    let bench = run(
        &mut pgbench(&["-T", "3", "-c", "4", "-j", "2"]),
        None,
        budget.timeout(Duration::from_secs(30)),
    );
    let bench = lb.expect_success(bench);
    let out = bench.stdout_text();
    let processed = out
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|n| n.split_whitespace().next()?.parse::<u64>().ok());
    let failed = out
        .lines()
        .find_map(|l| l.strip_prefix("number of failed transactions: "))
        .and_then(|n| n.split_whitespace().next()?.parse::<u64>().ok());
    match (processed, failed) {
        (Some(n), Some(0)) if n > 0 => {}
        _ => lb.fail(&format!(
            "pgbench -T 3: transactions processed {processed:?}, failed {failed:?}\n{}",
            bench.describe()
        )),
    }
    eprintln!("{test}: pgbench -T 3 processed {processed:?} transactions");
    lb.report();
}

fn postgres_copy_in_and_out_of_20mib(plane: Plane, test: &str) {
    if !may_run(plane, test, &["initdb", "pg_ctl", "postgres", "psql"]) {
        return;
    }
    let budget = Budget::new(CASE_BUDGET);
    let pg = Postgres::start(&budget);
    let mut lb = Balancer::start(plane, test, pg.addr);
    let dir = TempDir::new();
    // 100,000 rows of an id and 200 random letters and digits: 20.6 MB of COPY text.
    const ROWS: u64 = 100_000;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = Rng::new(0xc0b7);
    let mut copy_text = Vec::with_capacity(21 << 20);
    let mut payloads = Vec::with_capacity(20 << 20);
    for id in 1..=ROWS {
        copy_text.extend_from_slice(format!("{id}\t").as_bytes());
        for _ in 0..200 {
            let c = ALPHABET[(rng.next_u64() % ALPHABET.len() as u64) as usize];
            copy_text.push(c);
            payloads.push(c);
        }
        copy_text.push(b'\n');
    }
    let copy_path = dir.path.join("rows.tsv");
    fs::write(&copy_path, &copy_text).expect("write the COPY data");

    let port = lb.addr().port();
    let create = run(
        &mut Postgres::psql(
            port,
            &[
                "-c",
                "CREATE TABLE rows (id int PRIMARY KEY, payload text NOT NULL)",
            ],
        ),
        None,
        budget.timeout(CLIENT_TIMEOUT),
    );
    lb.expect_success(create);
    let copy_in = run(
        &mut Postgres::psql(port, &["-c", "COPY rows FROM STDIN"]),
        Some(&copy_path),
        budget.timeout(CLIENT_TIMEOUT),
    );
    let copy_in = lb.expect_success(copy_in);
    if copy_in.stdout_text().trim() != format!("COPY {ROWS}") {
        lb.fail(&format!(
            "COPY FROM STDIN through lb: {}",
            copy_in.describe()
        ));
    }
    // What the server holds, checked by the server: count, sum of ids, sha256 of the payloads.
    let check = run(
        &mut Postgres::psql(
            port,
            &[
                "-c",
                "SELECT count(*), sum(id), encode(sha256(convert_to(string_agg(payload, '' \
                 ORDER BY id), 'UTF8')), 'hex') FROM rows",
            ],
        ),
        None,
        budget.timeout(CLIENT_TIMEOUT),
    );
    let check = lb.expect_success(check);
    let want = format!("{ROWS}|{}|{}", ROWS * (ROWS + 1) / 2, sha256(&payloads));
    if check.stdout_text().trim() != want {
        lb.fail(&format!(
            "after COPY FROM STDIN through lb (upload), the server holds count|sum|sha256 = {:?}, \
             sent {want:?}",
            check.stdout_text().trim()
        ));
    }
    // And back: COPY TO STDOUT through lb must give the very bytes sent.
    let copy_out = run(
        &mut Postgres::psql(
            port,
            &[
                "-c",
                "COPY (SELECT id, payload FROM rows ORDER BY id) TO STDOUT",
            ],
        ),
        None,
        budget.timeout(CLIENT_TIMEOUT),
    );
    let copy_out = lb.expect_success(copy_out);
    lb.expect_same(
        "COPY TO STDOUT through lb (download)",
        &copy_text,
        &copy_out.stdout,
    );
    lb.report();
}

// ---------------------------------------------------------------------------------------------
// nginx, plain and TLS

/// nginx in a temporary directory on a free port, serving `www/` and taking `PUT /upload/NAME`
/// into `upload/` (WebDAV), its error log in the [`Daemon`] log.
struct Nginx {
    addr: SocketAddr,
    dir: TempDir,
    _server: Daemon,
}

/// Files nginx serves, made before it starts.
struct Serve<'a> {
    name: &'a str,
    len: u64,
}

impl Nginx {
    /// `sendfile` on or off; TLS with a fresh self-signed certificate when `tls`.
    fn start(budget: &Budget, sendfile: bool, tls: bool, files: &[Serve<'_>]) -> Nginx {
        let dir = TempDir::new();
        let d = &dir.path;
        for sub in ["www", "upload", "upload-tmp", "body"] {
            fs::create_dir(d.join(sub)).expect("create an nginx directory");
        }
        for f in files {
            random_file(&d.join("www").join(f.name), f.len);
        }
        let addr = free_addr();
        let mut listen = format!("listen {addr}");
        let mut ssl = String::new();
        if tls {
            run(
                Command::new(program_path("openssl"))
                    .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
                    .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
                    .args(["-subj", "/CN=localhost", "-keyout"])
                    .arg(d.join("key.pem"))
                    .arg("-out")
                    .arg(d.join("cert.pem")),
                None,
                budget.timeout(Duration::from_secs(30)),
            )
            .expect_success();
            listen.push_str(" ssl");
            ssl = format!(
                "ssl_certificate {0}/cert.pem;\n        ssl_certificate_key {0}/key.pem;",
                d.display()
            );
        }
        // As root the master would hand the workers to `nobody`, who may not write upload/.
        let user = if is_root() { "user root;" } else { "" };
        let conf = format!(
            r#"daemon off;
master_process on;
worker_processes 1;
{user}
pid {d}/nginx.pid;
error_log stderr info;
events {{ worker_connections 256; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type application/octet-stream;
    sendfile {sendfile};
    keepalive_timeout 10;
    server {{
        {listen};
        {ssl}
        root {d}/www;
        client_max_body_size 200m;
        location /upload/ {{
            root {d};
            dav_methods PUT;
            create_full_put_path on;
            client_body_temp_path {d}/upload-tmp;
        }}
    }}
}}
"#,
            d = d.display(),
            sendfile = if sendfile { "on" } else { "off" },
        );
        let conf_path = d.join("nginx.conf");
        fs::write(&conf_path, conf).expect("write nginx.conf");
        let mut server = Daemon::spawn(
            "nginx",
            Command::new(program_path("nginx"))
                .arg("-p")
                .arg(d)
                .arg("-c")
                .arg(&conf_path)
                .args(["-e", "stderr"]),
            &d.join("nginx.log"),
        );
        server.wait_listening(addr, SERVER_START);
        Nginx {
            addr,
            dir,
            _server: server,
        }
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.dir.path.join(relative)
    }
}

/// `curl` quietly, failing on HTTP errors, giving up on a stall of [`STALL_SECONDS`].
fn curl(budget: &Budget) -> Command {
    let mut c = Command::new(program_path("curl"));
    c.args([
        "-sS",
        "--fail",
        "--speed-limit",
        "1",
        "--speed-time",
        STALL_SECONDS,
    ])
    .arg("--max-time")
    .arg(budget.timeout(CLIENT_TIMEOUT).as_secs().to_string());
    c
}

/// Downloads `name` through lb (`scheme` http or https) and compares it with the file served.
fn download(lb: &mut Balancer, nginx: &Nginx, budget: &Budget, scheme: &str, name: &str) {
    let out_dir = TempDir::new();
    let out = out_dir.path.join(name);
    let url = format!("{scheme}://{}/{name}", lb.addr());
    let get = run(
        curl(budget).args(["-k", "-o"]).arg(&out).arg(&url),
        None,
        budget.timeout(CLIENT_TIMEOUT),
    );
    let sent = read(&nginx.path(&format!("www/{name}")));
    let got = fs::read(&out).unwrap_or_default();
    if !get.success() {
        let prefix = match difference(&sent[..got.len().min(sent.len())], &got) {
            None => "exact so far".to_owned(),
            Some(diff) => diff,
        };
        lb.fail(&format!(
            "{}\ncurl had {} of {} bytes when it stopped ({prefix})",
            get.describe(),
            got.len(),
            sent.len()
        ));
    }
    lb.expect_same(
        &format!("GET {url} ({:.1}s)", get.elapsed.as_secs_f64()),
        &sent,
        &got,
    );
}

fn nginx_download(plane: Plane, test: &str, sendfile: bool) {
    if !may_run(plane, test, &["nginx", "curl"]) {
        return;
    }
    let budget = Budget::new(CASE_BUDGET);
    let nginx = Nginx::start(
        &budget,
        sendfile,
        false,
        &[Serve {
            name: "big.bin",
            len: 50 << 20,
        }],
    );
    let mut lb = Balancer::start(plane, test, nginx.addr);
    download(&mut lb, &nginx, &budget, "http", "big.bin");
    lb.report();
}

fn nginx_upload(plane: Plane, test: &str, sendfile: bool) {
    if !may_run(plane, test, &["nginx", "curl"]) {
        return;
    }
    let budget = Budget::new(CASE_BUDGET);
    let nginx = Nginx::start(&budget, sendfile, false, &[]);
    let mut lb = Balancer::start(plane, test, nginx.addr);
    let src_dir = TempDir::new();
    let src = src_dir.path.join("up.bin");
    random_file(&src, 20 << 20);
    let url = format!("http://{}/upload/up.bin", lb.addr());
    let put = run(
        curl(&budget)
            .args(["-o", "/dev/null", "-w", "%{http_code}", "-T"])
            .arg(&src)
            .arg(&url),
        None,
        budget.timeout(CLIENT_TIMEOUT),
    );
    let put = lb.expect_success(put);
    if put.stdout_text() != "201" {
        lb.fail(&format!(
            "PUT {url}: expected 201 Created\n{}",
            put.describe()
        ));
    }
    let stored = fs::read(nginx.path("upload/up.bin")).unwrap_or_default();
    lb.expect_same(
        &format!(
            "the file nginx stored from PUT {url} ({:.1}s)",
            put.elapsed.as_secs_f64()
        ),
        &read(&src),
        &stored,
    );
    lb.report();
}

fn nginx_sendfile_on_download_of_50mib(plane: Plane, test: &str) {
    nginx_download(plane, test, true);
}

fn nginx_sendfile_off_download_of_50mib(plane: Plane, test: &str) {
    nginx_download(plane, test, false);
}

fn nginx_sendfile_on_upload_of_20mib(plane: Plane, test: &str) {
    nginx_upload(plane, test, true);
}

fn nginx_sendfile_off_upload_of_20mib(plane: Plane, test: &str) {
    nginx_upload(plane, test, false);
}

fn tls_passthrough_download_of_20mib(plane: Plane, test: &str) {
    if !may_run(plane, test, &["nginx", "curl", "openssl"]) {
        return;
    }
    let budget = Budget::new(CASE_BUDGET);
    let nginx = Nginx::start(
        &budget,
        true,
        true,
        &[Serve {
            name: "tls.bin",
            len: 20 << 20,
        }],
    );
    let mut lb = Balancer::start(plane, test, nginx.addr);
    download(&mut lb, &nginx, &budget, "https", "tls.bin");
    lb.report();
}

// ---------------------------------------------------------------------------------------------
// iperf3

fn iperf3(plane: Plane, test: &str, reverse: bool) {
    if !may_run(plane, test, &["iperf3"]) {
        return;
    }
    let budget = Budget::new(CASE_BUDGET);
    let dir = TempDir::new();
    let addr = free_addr();
    let mut server = Daemon::spawn(
        "iperf3 -s",
        Command::new(program_path("iperf3")).args([
            "-s",
            "-B",
            "127.0.0.1",
            "-p",
            &addr.port().to_string(),
        ]),
        &dir.path.join("iperf3-server.log"),
    );
    server.wait_listening(addr, SERVER_START);
    let mut lb = Balancer::start(plane, test, addr);
    let mut cmd = Command::new(program_path("iperf3"));
    cmd.args(["-c", "127.0.0.1", "-p", &lb.port(), "-t", "3", "-J"])
        .args(["--connect-timeout", "5000"]);
    if reverse {
        cmd.arg("-R");
    }
    let client = run(&mut cmd, None, budget.timeout(Duration::from_secs(30)));
    let client = lb.expect_success(client);
    let report: serde_json::Value = match serde_json::from_slice(&client.stdout) {
        Ok(r) => r,
        Err(e) => lb.fail(&format!(
            "iperf3 -J printed no JSON ({e})\n{}",
            client.describe()
        )),
    };
    if let Some(error) = report.get("error") {
        lb.fail(&format!("iperf3 reports an error: {error}"));
    }
    let sum = |which: &str, field: &str| report["end"][which][field].as_f64().unwrap_or(0.0);
    let (sent, received) = (sum("sum_sent", "bytes"), sum("sum_received", "bytes"));
    let bps = sum("sum_received", "bits_per_second");
    if sent <= 0.0 || received <= 0.0 || bps <= 0.0 {
        lb.fail(&format!(
            "iperf3: sent {sent} bytes, received {received} bytes, {bps} bit/s\n{}",
            client.describe()
        ));
    }
    // iperf3 exits 0 even when the transfer stopped halfway: a second without a byte is a stall.
    let intervals: Vec<(f64, f64)> = report["intervals"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            let sum = &i["sum"];
            (
                sum["seconds"].as_f64().unwrap_or(0.0),
                sum["bytes"].as_f64().unwrap_or(0.0),
            )
        })
        .collect();
    let per_second: Vec<String> = intervals
        .iter()
        .map(|(s, b)| format!("{:.0} MB in {s:.1}s", b / 1e6))
        .collect();
    if let Some(i) = intervals.iter().position(|&(s, b)| s >= 0.5 && b == 0.0) {
        lb.fail(&format!(
            "STALLED: iperf3{} moved no byte in interval {i} (exit 0 regardless); per interval: \
             {per_second:?}; sent {sent} bytes, received {received}",
            if reverse { " -R" } else { "" },
        ));
    }
    // On loopback the proxy, a debug build, moves several Gbit/s here: far below that is a
    // stall, not a slow machine.
    if bps < MIN_IPERF3_BPS {
        lb.fail(&format!(
            "iperf3{}: {:.3} Gbit/s, under the {:.1} Gbit/s that only a stall explains; per \
             interval: {per_second:?}",
            if reverse { " -R" } else { "" },
            bps / 1e9,
            MIN_IPERF3_BPS / 1e9
        ));
    }
    eprintln!(
        "{test}: iperf3{} sent {sent} bytes, received {received}, {:.2} Gbit/s",
        if reverse { " -R" } else { "" },
        bps / 1e9
    );
    lb.report();
}

fn iperf3_client_sends(plane: Plane, test: &str) {
    iperf3(plane, test, false);
}

fn iperf3_reverse(plane: Plane, test: &str) {
    iperf3(plane, test, true);
}

#[test]
fn the_difference_report_names_duplicated_and_lost_bytes() {
    let sent = Rng::new(1).bytes(4096);
    assert_eq!(difference(&sent, &sent), None);
    let mut duplicated = sent[..1000].to_vec();
    duplicated.extend_from_slice(&sent[900..]);
    let report = difference(&sent, &duplicated).expect("differs");
    assert!(
        report.contains("offset 1000") && report.contains("100 bytes DUPLICATED"),
        "{report}"
    );
    let mut lost = sent[..1000].to_vec();
    lost.extend_from_slice(&sent[1100..]);
    let report = difference(&sent, &lost).expect("differs");
    assert!(report.contains("100 bytes LOST"), "{report}");
    let report = difference(&sent, &sent[..2000]).expect("differs");
    assert!(report.contains("bytes are missing at the end"), "{report}");
}

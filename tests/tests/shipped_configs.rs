//! The files in `config/` are the product: users start them as they are. Each one is started
//! here by a test of its own, with only what cannot work on a test machine changed (addresses
//! and ports, the pin directory, the admin token file, the XDP interface: see [`MAY_CHANGE`],
//! which a check enforces), and every service of each file carries exact bytes: a few small
//! round trips and 4 MiB of a seeded pattern on one connection, half-closed, echoed back byte
//! for byte and then EOF, plus a few short connections.
//!
//! The backends are the test's own. They answer the file's health checks as shipped (`tcp`,
//! `http`, `send_expect`, per-backend overrides included), check and strip the PROXY header the
//! file asks for, and echo everything else, passing the half-close on. That the checks keep
//! every backend up is proven, not assumed: each backend answers probes, and lb (run with
//! `lb=debug`, where a failed check is logged) logs no failed check.
//!
//! `every_config_file_is_covered` lists `config/`: a file without its test here, or with keys
//! this suite does not know how to run, fails it.
//!
//! Privileged files (`mode: sockmap`, `mode: xdp`) skip without root (under `CI=true` that
//! fails). Files with `mode: auto` run everywhere and must pick sockmap as root when they opt
//! in (`dataplane.sockmap.enabled: true`), proxy otherwise.

use std::{
    collections::BTreeMap,
    fmt::Display,
    fs,
    io::{self, Cursor, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use lb_tests::{
    admin::{self, Response, Status},
    backend::{Backend, ProxyHeader, read_proxy_header},
    lb::{Launch, Lb, TempDir, binary, free_port},
    netns::{NetNs, sh},
    privileged,
    stream::{Pattern, Rng, echo_round_trip, read_to_eof, try_connect, wait_until},
    topology::{Replies, Topology},
};
use serde_yaml::Value;

/// The files of `config/` this suite knows how to run, each with a test named by
/// [`test_name`].
const KNOWN: &[&str] = &[
    "demo.yaml",
    "lb.yaml",
    "proxy.yaml",
    "sockmap.yaml",
    "xdp-nat.yaml",
];

/// The keys a test may change in a shipped file (`[]`: any index). Everything else is run as
/// shipped.
const MAY_CHANGE: &[&str] = &[
    "admin.listen",
    "admin.token_file",
    "dataplane.pin_path",
    "dataplane.xdp.interface",
    "services[].listen",
    "services[].backends[].address",
];

/// Bytes of the seeded pattern sent through each service on one connection.
const BULK: u64 = 4 << 20;
/// Short connections through each service after the bulk one: enough to visit every backend
/// of the shipped round-robin services.
const SHORT_CONNECTIONS: usize = 5;
/// The longest one service's exchange may take, whatever each read and write does.
const EXCHANGE_LIMIT: Duration = Duration::from_secs(120);
/// Read and write timeout of the test backends' sockets.
const BACKEND_IO_TIMEOUT: Duration = Duration::from_secs(30);
/// lb's log filter: debug for lb itself, where a failed health check is logged (at info lb
/// says nothing until `fall` failures mark the backend down, which takes longer than a test).
const LOG_FILTER: &str = "info,lb=debug";

#[test]
fn every_config_file_is_covered() {
    let files = config_files();
    let tests = own_tests();
    for file in &files {
        let test = test_name(file);
        assert!(
            KNOWN.contains(&file.as_str()),
            "config/{file} is new to this suite: add it to KNOWN and a #[test] fn {test}() that \
             runs it (tests/tests/shipped_configs.rs)"
        );
        assert!(
            tests.contains(&test),
            "config/{file} has no test: add #[test] fn {test}() (tests/tests/shipped_configs.rs); \
             this binary has {tests:?}"
        );
        // Every key is one this suite knows how to run (it panics naming one it does not),
        // checked here too so a skipped privileged test cannot hide it.
        let plan = Plan::of(file, &load(file));
        eprintln!(
            "config/{file}: {} service(s), mode {}, run {}",
            plan.services.len(),
            plan.mode,
            if plan.xdp {
                "in the xdp topology"
            } else {
                "on loopback"
            }
        );
    }
    for known in KNOWN {
        assert!(
            files.iter().any(|f| f == known),
            "KNOWN lists config/{known}, which is gone: remove it and its test"
        );
    }
}

/// `mode: auto`, one weighted-round-robin service of three backends with a tcp check. Changed:
/// the admin, listen and backend addresses (the shipped ports may be taken here); as root a
/// pin_path of its own is added, as the default /sys/fs/bpf/lb may be another lb's.
#[test]
fn config_demo_yaml_serves_exact_bytes() {
    run("demo.yaml");
}

/// `mode: auto` with every default spelt out; three services (tcp, http with a per-backend
/// path, send_expect checks). Changed: the addresses and the pin_path.
#[test]
fn config_lb_yaml_serves_exact_bytes() {
    run("lb.yaml");
}

/// `mode: proxy`, an IPv4 service with an http check and PROXY v2, an IPv6 one with a tcp
/// check. Changed: the wildcard listens to loopback of the same family (free ports), the
/// documentation-range backends to the test's own, the admin to loopback, the token_file (a
/// container secret) to a temporary file. No root needed.
#[test]
fn config_proxy_yaml_serves_exact_bytes() {
    run("proxy.yaml");
}

/// `mode: sockmap` with promotion at once, send_expect checks, PROXY v1, a weight-0 backend
/// that must get no data connection. Changed: the addresses and the pin_path. Root.
#[test]
fn config_sockmap_yaml_serves_exact_bytes() {
    run("sockmap.yaml");
}

/// `mode: xdp`, NAT, Maglev over three backends (weights 2, 1, 1), an http check, in the
/// namespace topology. Changed: the interface (the topology's lb end), the VIP (10.77.9.100:80),
/// the backends (the two topology hosts, the third on the first host's port 81) and the
/// pin_path (a private bpffs). Root.
#[test]
fn config_xdp_nat_yaml_serves_exact_bytes() {
    run("xdp-nat.yaml");
}

/// Runs `config/FILE` as its keys say: in the xdp topology, or on loopback.
fn run(file: &str) {
    let shipped = load(file);
    let plan = Plan::of(file, &shipped);
    if plan.privileged && !privileged(&test_name(file)) {
        return;
    }
    let started = Instant::now();
    if plan.xdp {
        run_in_topology(&plan, &shipped);
    } else {
        run_on_loopback(&plan, &shipped);
    }
    eprintln!("config/{file}: done in {:?}", started.elapsed());
}

// ---- the files and what this suite makes of them --------------------------------------------

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config")
}

/// Every entry of `config/`, by name, sorted.
fn config_files() -> Vec<String> {
    let dir = config_dir();
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| {
            let entry = entry.unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
            entry.file_name().to_string_lossy().into_owned()
        })
        .collect();
    names.sort();
    names
}

/// `demo.yaml` -> `config_demo_yaml_serves_exact_bytes`.
fn test_name(file: &str) -> String {
    format!("config_{}_serves_exact_bytes", slug(file))
}

/// `xdp-nat.yaml` -> `xdp_nat_yaml`.
fn slug(file: &str) -> String {
    file.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// The tests of this binary (`--list`): what "has its test" is checked against.
fn own_tests() -> Vec<String> {
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = Command::new(&exe)
        .arg("--list")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{} --list: {e}", exe.display()));
    assert!(
        out.status.success(),
        "{} --list: {}",
        exe.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_owned)
        .collect()
}

fn load(file: &str) -> Value {
    let path = config_dir().join(file);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("config/{file} is not YAML: {e}"))
}

fn cannot_run(file: &str, what: impl Display) -> ! {
    panic!(
        "config/{file}: {what}: this suite does not know how to run that; teach \
         tests/tests/shipped_configs.rs (and keep the file as shipped)"
    )
}

/// A scalar as text: YAML writes `weight: 2` and `weight: "2"` alike for lb.
fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// What a file asks for, as far as running it goes.
struct Plan {
    file: String,
    mode: String,
    /// The dataplane lb must pick on this machine.
    expect: &'static str,
    /// Needs root (BPF).
    privileged: bool,
    /// Needs the xdp topology.
    xdp: bool,
    /// `dataplane.pin_path` is absent, lb may load BPF, and so would pin under the host's
    /// shared default (/sys/fs/bpf/lb): the test adds a directory of its own.
    add_pin_path: bool,
    services: Vec<ServicePlan>,
}

struct ServicePlan {
    name: String,
    /// As shipped.
    listen: SocketAddr,
    algorithm: String,
    /// `v1` or `v2` when the service sends PROXY headers.
    proxy_protocol: Option<&'static str>,
    /// The health check's interval and timeout, when it has one.
    check: Option<(Duration, Duration)>,
    backends: Vec<BackendPlan>,
}

struct BackendPlan {
    /// As shipped.
    address: SocketAddr,
    weight: u64,
    probe: Option<Probe>,
}

/// lb's health probe as a backend sees it, and the answer that passes it.
#[derive(Clone, Debug)]
enum Probe {
    /// Connect, then close.
    Tcp,
    /// `GET PATH HTTP/1.1`, to be answered with `status`.
    Http { path: String, status: u16 },
    /// `send`, to be answered with `reply` (which holds what the check expects).
    SendExpect { send: Vec<u8>, reply: Vec<u8> },
}

impl Probe {
    /// The bytes a probe connection starts with (none for `tcp`). The test's own data
    /// connections never start with them (nor with a PROXY header).
    fn marker(&self) -> Vec<u8> {
        match self {
            Probe::Tcp => Vec::new(),
            Probe::Http { path, .. } => format!("GET {path} HTTP/1.1\r\n").into_bytes(),
            Probe::SendExpect { send, .. } => send.clone(),
        }
    }
}

impl Plan {
    /// Reads what running `file` takes; panics on anything this suite cannot run.
    fn of(file: &str, doc: &Value) -> Plan {
        let Some(top) = doc.as_mapping() else {
            cannot_run(file, "not a mapping at the top")
        };
        for key in top.keys() {
            let key = text(Some(key)).unwrap_or_default();
            let known = ["admin", "dataplane", "shutdown_timeout", "services"];
            if !known.contains(&key.as_str()) && !key.starts_with("x-") {
                cannot_run(file, format!("top-level key {key:?}"));
            }
        }
        let dataplane = doc.get("dataplane");
        let mode = text(dataplane.and_then(|d| d.get("mode"))).unwrap_or_else(|| "auto".into());
        let xdp_block = dataplane.and_then(|d| d.get("xdp"));
        let sockmap_enabled = text(
            dataplane
                .and_then(|d| d.get("sockmap"))
                .and_then(|s| s.get("enabled")),
        )
        .is_some_and(|e| e == "true");
        let services: Vec<ServicePlan> = doc
            .get("services")
            .and_then(Value::as_sequence)
            .unwrap_or_else(|| cannot_run(file, "no services list"))
            .iter()
            .map(|s| ServicePlan::of(file, s))
            .collect();
        if services.is_empty() {
            cannot_run(file, "no service to carry bytes through");
        }
        let root = nix::unistd::geteuid().is_root();
        let xdp = mode == "xdp" || (mode == "auto" && xdp_block.is_some());
        let (expect, privileged) = match mode.as_str() {
            _ if xdp => {
                let forwarding = text(xdp_block.and_then(|x| x.get("forwarding")));
                if forwarding.as_deref().is_some_and(|f| f != "nat") {
                    cannot_run(file, "xdp forwarding other than nat");
                }
                if services.iter().any(|s| s.proxy_protocol.is_some()) {
                    cannot_run(file, "xdp with PROXY headers");
                }
                ("xdp", true)
            }
            "proxy" => ("proxy", false),
            "sockmap" => ("sockmap", true),
            // What auto picks without XDP: sockmap where the file opts in (`sockmap.enabled:
            // true`) and BPF can be loaded (root), else proxy.
            "auto" if root && sockmap_enabled => ("sockmap", false),
            "auto" => ("proxy", false),
            other => cannot_run(file, format!("dataplane.mode {other:?}")),
        };
        let has_pin_path = dataplane.and_then(|d| d.get("pin_path")).is_some();
        Plan {
            file: file.to_owned(),
            add_pin_path: !has_pin_path && !xdp && root && mode != "proxy",
            mode,
            expect,
            privileged,
            xdp,
            services,
        }
    }
}

impl ServicePlan {
    fn of(file: &str, s: &Value) -> ServicePlan {
        let name =
            text(s.get("name")).unwrap_or_else(|| cannot_run(file, "a service without name"));
        let listen = text(s.get("listen"))
            .and_then(|l| l.parse().ok())
            .unwrap_or_else(|| cannot_run(file, format!("service {name}: listen")));
        let proxy_protocol = match text(s.get("proxy_protocol")).as_deref() {
            None | Some("off" | "false") => None,
            Some("v1") => Some("v1"),
            Some("v2") => Some("v2"),
            Some(other) => cannot_run(file, format!("service {name}: proxy_protocol {other:?}")),
        };
        let check = s.get("health_check");
        let check_times = check.map(|c| {
            let interval =
                text(c.get("interval")).map_or(Duration::from_secs(2), |t| duration(file, &t));
            let timeout =
                text(c.get("timeout")).map_or(Duration::from_secs(1), |t| duration(file, &t));
            (interval, timeout)
        });
        let backends = s
            .get("backends")
            .and_then(Value::as_sequence)
            .unwrap_or_else(|| cannot_run(file, format!("service {name}: backends")))
            .iter()
            .map(|b| {
                let address = text(b.get("address"))
                    .and_then(|a| a.parse().ok())
                    .unwrap_or_else(|| {
                        cannot_run(file, format!("service {name}: a backend address"))
                    });
                let weight = text(b.get("weight"))
                    .map_or(Some(1), |w| w.parse().ok())
                    .unwrap_or_else(|| cannot_run(file, format!("backend {address}: weight")));
                let probe = check.map(|c| probe(file, c, b.get("health_check")));
                BackendPlan {
                    address,
                    weight,
                    probe,
                }
            })
            .collect();
        ServicePlan {
            algorithm: text(s.get("algorithm")).unwrap_or_else(|| "round_robin".into()),
            name,
            listen,
            proxy_protocol,
            check: check_times,
            backends,
        }
    }
}

/// The probe of a service's `check` with a backend's `over`rides, as lb's
/// `health_check_for` merges them.
fn probe(file: &str, check: &Value, over: Option<&Value>) -> Probe {
    // The override's key, else the service's: of the first of `keys` either has.
    let pick = |keys: &[&str]| -> Option<(String, String)> {
        [over, Some(check)].into_iter().flatten().find_map(|m| {
            keys.iter()
                .find_map(|k| text(m.get(*k)).map(|v| ((*k).to_owned(), v)))
        })
    };
    for key in ["port", "address"] {
        if pick(&[key]).is_some() {
            // The backend would have to answer on another address or port than it serves.
            cannot_run(file, format!("a health check with {key}"));
        }
    }
    match text(check.get("kind")).as_deref() {
        Some("tcp") => Probe::Tcp,
        Some("http") => Probe::Http {
            path: pick(&["path"]).map_or_else(|| "/".to_owned(), |(_, p)| p),
            status: pick(&["expect_status"]).map_or(200, |(_, s)| {
                s.parse()
                    .unwrap_or_else(|_| cannot_run(file, format!("expect_status {s:?}")))
            }),
        },
        Some("send_expect") => {
            let send = match pick(&["send", "send_hex"]) {
                Some((k, v)) if k == "send" => v.into_bytes(),
                Some((_, v)) => hex(file, &v),
                None => cannot_run(file, "send_expect without send"),
            };
            if send.is_empty() {
                // Nothing tells such a probe from a data connection until it times out.
                cannot_run(file, "send_expect that sends nothing");
            }
            let mut reply = match pick(&["expect", "expect_hex", "expect_regex"]) {
                Some((k, v)) if k == "expect" => v.into_bytes(),
                Some((k, v)) if k == "expect_hex" => hex(file, &v),
                _ => cannot_run(file, "send_expect without expect or expect_hex"),
            };
            reply.extend_from_slice(b"\r\n");
            Probe::SendExpect { send, reply }
        }
        other => cannot_run(file, format!("health check kind {other:?}")),
    }
}

/// `500ms`, `2s`, `1m30s`, `1h`.
fn duration(file: &str, t: &str) -> Duration {
    let mut total = Duration::ZERO;
    let mut rest = t.trim();
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let n: u64 = rest[..digits]
            .parse()
            .unwrap_or_else(|_| cannot_run(file, format!("duration {t:?}")));
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        total += match &rest[..unit] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(60 * n),
            "h" => Duration::from_secs(3600 * n),
            _ => cannot_run(file, format!("duration {t:?}")),
        };
        rest = &rest[unit..];
    }
    total
}

fn hex(file: &str, t: &str) -> Vec<u8> {
    let t = t.trim();
    if !t.len().is_multiple_of(2) || !t.is_ascii() {
        cannot_run(file, format!("hex {t:?}"));
    }
    (0..t.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&t[i..i + 2], 16)
                .unwrap_or_else(|_| cannot_run(file, format!("hex {t:?}")))
        })
        .collect()
}

/// A seed of its own for each file and service.
fn seed(file: &str, service: usize) -> u64 {
    file.bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
        .wrapping_add(service as u64)
}

// ---- the changes, and the check that nothing else changed -----------------------------------

/// Sets `path` (dotted) in `doc` to `value`, noting the change.
fn set(doc: &mut Value, path: &str, value: Value, notes: &mut Vec<String>) {
    let mut at = &mut *doc;
    for key in path.split('.') {
        if at.get(key).is_none() {
            at.as_mapping_mut()
                .unwrap_or_else(|| panic!("{path}: not a mapping at {key}"))
                .insert(key.into(), Value::Null);
        }
        at = at.get_mut(key).expect("just inserted");
    }
    let old = text(Some(at)).unwrap_or_else(|| "(absent)".to_owned());
    notes.push(format!(
        "{path}: {old} -> {}",
        text(Some(&value)).unwrap_or_default()
    ));
    *at = value;
}

/// Every scalar of `v` by its path (`services[0].backends[1].address`).
fn leaves(v: &Value, path: String, out: &mut BTreeMap<String, String>) {
    match v {
        Value::Mapping(m) if !m.is_empty() => {
            for (k, v) in m {
                let k = text(Some(k)).unwrap_or_else(|| format!("{k:?}"));
                let p = if path.is_empty() {
                    k
                } else {
                    format!("{path}.{k}")
                };
                leaves(v, p, out);
            }
        }
        Value::Sequence(s) if !s.is_empty() => {
            for (i, v) in s.iter().enumerate() {
                leaves(v, format!("{path}[{i}]"), out);
            }
        }
        Value::Tagged(t) => leaves(&t.value, path, out),
        other => {
            out.insert(path, serde_yaml::to_string(other).unwrap_or_default());
        }
    }
}

/// `services[0].backends[12].address` -> `services[].backends[].address`.
fn without_indices(path: &str) -> String {
    let mut out = String::new();
    let mut in_index = false;
    for c in path.chars() {
        match c {
            '[' => {
                in_index = true;
                out.push(c);
            }
            ']' => {
                in_index = false;
                out.push(c);
            }
            _ if in_index => {}
            _ => out.push(c),
        }
    }
    out
}

/// Panics if `run` differs from `shipped` anywhere but at [`MAY_CHANGE`].
fn assert_only_allowed_changes(file: &str, shipped: &Value, run: &Value) {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    leaves(shipped, String::new(), &mut a);
    leaves(run, String::new(), &mut b);
    for key in a.keys().chain(b.keys()) {
        if a.get(key) != b.get(key) {
            assert!(
                MAY_CHANGE.contains(&without_indices(key).as_str()),
                "config/{file}: the test changed {key} ({:?} -> {:?}); it must run that as shipped",
                a.get(key),
                b.get(key)
            );
        }
    }
}

/// 127.0.0.1 or ::1, as `like` is IPv4 or IPv6.
fn loopback(like: IpAddr) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    }
}

/// A loopback port of `like`'s family that nothing uses now (see [`free_port`]).
fn free_loopback(like: IpAddr) -> SocketAddr {
    for _ in 0..100 {
        let addr = SocketAddr::new(loopback(like), free_port());
        if TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("no free port on {}", loopback(like));
}

// ---- the backends ----------------------------------------------------------------------------

/// What one test backend saw.
#[derive(Default)]
struct Record {
    /// Health probes answered.
    probes: AtomicUsize,
    /// Data connections served to the end: EOF read, the half-close passed on.
    data: Mutex<Vec<DataConnection>>,
    /// Connections that were neither a probe nor data as expected.
    problems: Mutex<Vec<String>>,
}

#[derive(Debug)]
struct DataConnection {
    peer: SocketAddr,
    header: Option<ProxyHeader>,
    /// Bytes echoed (the PROXY header not counted).
    bytes: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A backend of a service, in its address as the config names it.
struct TestBackend {
    addr: SocketAddr,
    weight: u64,
    probe: Option<Probe>,
    record: Arc<Record>,
    backend: Option<Backend>,
    /// The namespace it listens in, if not this one's.
    netns: Option<String>,
}

impl TestBackend {
    /// Listens on `bind` (in `netns` if given) for a backend that lb's config names `addr`
    /// (`None`: the address it listens on).
    fn start(
        plan: &BackendPlan,
        proxy: Option<&'static str>,
        bind: SocketAddr,
        netns: Option<&NetNs>,
        addr: Option<SocketAddr>,
    ) -> TestBackend {
        let record = Arc::new(Record::default());
        let (r, probe) = (Arc::clone(&record), plan.probe.clone());
        let handler = move |s: TcpStream| serve(s, probe.as_ref(), proxy, &r);
        let spawned = match netns {
            Some(ns) => ns.run(move || Backend::spawn_at(bind, handler)),
            None => Backend::spawn_at(bind, handler),
        };
        let backend = spawned.unwrap_or_else(|e| panic!("a test backend on {bind}: {e}"));
        TestBackend {
            addr: addr.unwrap_or_else(|| backend.addr()),
            weight: plan.weight,
            probe: plan.probe.clone(),
            record,
            backend: Some(backend),
            netns: netns.map(|ns| ns.name.clone()),
        }
    }

    fn data(&self) -> usize {
        lock(&self.record.data).len()
    }

    fn probes(&self) -> usize {
        self.record.probes.load(Ordering::SeqCst)
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        let Some(backend) = self.backend.take() else {
            return;
        };
        let Some(name) = self.netns.take() else {
            return;
        };
        // A Backend stops by connecting to its own address to wake its accept: from outside
        // its namespace that connect goes elsewhere and the drop never returns. Drop it inside;
        // if the namespace is gone, leak it rather than hang.
        let _ = thread::spawn(move || match enter(&name) {
            Ok(()) => drop(backend),
            Err(_) => std::mem::forget(backend),
        })
        .join();
    }
}

/// Moves the calling thread into network namespace `name`.
fn enter(name: &str) -> io::Result<()> {
    let f = fs::File::open(format!("/var/run/netns/{name}"))?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

/// One connection to a test backend: lb's health probe, answered as the file's check wants,
/// or a data connection: PROXY header read (when the service sends one), then every byte
/// echoed and the half-close passed on.
fn serve(stream: TcpStream, probe: Option<&Probe>, proxy: Option<&str>, record: &Record) {
    let _ = stream.set_read_timeout(Some(BACKEND_IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(BACKEND_IO_TIMEOUT));
    let Ok(peer) = stream.peer_addr() else {
        return;
    };
    let problem = |what: String| lock(&record.problems).push(format!("from {peer}: {what}"));
    let marker = probe.map(Probe::marker).unwrap_or_default();
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until the first bytes tell a probe (the check's marker; nothing at all for `tcp`)
    // from data (anything else).
    loop {
        if !marker.is_empty() && head.starts_with(&marker) {
            match answer(&stream, probe, head) {
                Ok(()) => {
                    record.probes.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => problem(format!("answering a health probe: {e}")),
            }
            return;
        }
        if !marker.starts_with(&head) {
            break;
        }
        match (&stream).read(&mut buf) {
            Ok(0) if head.is_empty() && matches!(probe, Some(Probe::Tcp)) => {
                record.probes.fetch_add(1, Ordering::SeqCst);
                return;
            }
            Ok(0) => {
                return problem(format!(
                    "EOF after {:?}, neither a health probe nor data",
                    String::from_utf8_lossy(&head)
                ));
            }
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return problem(format!("reading the first bytes: {e}")),
        }
    }
    let mut reader = Cursor::new(head).chain(&stream);
    let header = match proxy {
        Some(version) => match read_proxy_header(&mut reader) {
            Ok(h) => Some(h),
            Err(e) => return problem(format!("no PROXY {version} header: {e}")),
        },
        None => None,
    };
    let (rest, _) = reader.into_inner();
    let first = &rest.get_ref()[usize::try_from(rest.position()).unwrap_or(usize::MAX)..];
    let mut bytes = first.len() as u64;
    if let Err(e) = (&stream).write_all(first) {
        return problem(format!("echoing the first bytes: {e}"));
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match (&stream).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Err(e) = (&stream).write_all(&buf[..n]) {
                    return problem(format!("echoing after {bytes} bytes: {e}"));
                }
                bytes += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return problem(format!("reading after {bytes} bytes: {e}")),
        }
    }
    // Recorded before the FIN: a client that has its EOF finds its connection here.
    lock(&record.data).push(DataConnection {
        peer,
        header,
        bytes,
    });
    if let Err(e) = stream.shutdown(Shutdown::Write) {
        problem(format!("passing the half-close on: {e}"));
    }
}

/// Answers a probe whose marker has been read (`head`, with whatever followed it).
fn answer(mut stream: &TcpStream, probe: Option<&Probe>, mut head: Vec<u8>) -> io::Result<()> {
    match probe {
        Some(Probe::Http { status, .. }) => {
            // The whole request first: closing with unread bytes would send a reset.
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                if head.len() > 16 * 1024 {
                    return Err(io::Error::other("a request head over 16 KiB"));
                }
                match stream.read(&mut buf)? {
                    0 => return Err(io::Error::other("EOF inside the request head")),
                    n => head.extend_from_slice(&buf[..n]),
                }
            }
            let reply =
                format!("HTTP/1.1 {status} OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            stream.write_all(reply.as_bytes())
        }
        Some(Probe::SendExpect { reply, .. }) => stream.write_all(reply),
        Some(Probe::Tcp) | None => Ok(()),
    }
}

// ---- the clients -----------------------------------------------------------------------------

/// What the clients of one service did.
struct Exchanged {
    /// The addresses they connected from.
    clients: Vec<SocketAddr>,
    /// Bytes sent (and read back) in all.
    bytes: u64,
}

/// Runs [`exchange_inner`] through `addr` on a thread (in namespace `netns` if given), for at
/// most [`EXCHANGE_LIMIT`].
fn exchange(addr: SocketAddr, seed: u64, netns: Option<String>) -> Result<Exchanged, String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        if let Some(name) = netns
            && let Err(e) = enter(&name)
        {
            let _ = tx.send(Err(format!("entering namespace {name}: {e}")));
            return;
        }
        let _ = tx.send(exchange_inner(addr, seed));
    });
    match rx.recv_timeout(EXCHANGE_LIMIT) {
        Ok(result) => result,
        Err(mpsc::RecvTimeoutError::Timeout) => Err(format!(
            "the exchange did not end within {EXCHANGE_LIMIT:?}"
        )),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err("the client thread panicked".into()),
    }
}

/// One connection with small round trips, then [`BULK`] bytes of a seeded pattern written
/// while the echo is read, half-closed, read back byte for byte to EOF; then
/// [`SHORT_CONNECTIONS`] connections of one round trip each, half-closed, then EOF. Every read
/// and write has a timeout.
fn exchange_inner(addr: SocketAddr, seed: u64) -> Result<Exchanged, String> {
    let mut rng = Rng::new(seed);
    let mut clients = Vec::new();
    let mut total = 0u64;
    let mut c = try_connect(addr).map_err(|e| format!("connect to {addr}: {e}"))?;
    clients.push(c.local_addr().map_err(|e| e.to_string())?);
    // Data starts with neither a probe's marker nor a PROXY header: see `serve`.
    let small = [
        format!("hello through {addr}\n").into_bytes(),
        b"x".to_vec(),
        rng.bytes(1000),
        rng.bytes(64 * 1024),
    ];
    for msg in &small {
        echo_round_trip(&mut c, msg)
            .map_err(|e| format!("a round trip of {} bytes: {e}", msg.len()))?;
        total += msg.len() as u64;
    }
    let pattern = Pattern::new(seed);
    let mut w = c.try_clone().map_err(|e| e.to_string())?;
    let p = pattern.clone();
    let writer = thread::spawn(move || -> io::Result<()> {
        let mut sent = 0u64;
        while sent < BULK {
            let chunk = p.at(
                sent,
                usize::try_from((BULK - sent).min(256 << 10)).unwrap_or(1),
            );
            w.write_all(chunk)?;
            sent += chunk.len() as u64;
        }
        w.shutdown(Shutdown::Write)
    });
    let got = pattern.receive(&mut c, BULK);
    if got.error.is_some() || got.bytes != BULK {
        // Frees a writer blocked on a stream that stalled.
        let _ = c.shutdown(Shutdown::Both);
    }
    let wrote = writer
        .join()
        .map_err(|_| "the writer panicked".to_owned())?;
    wrote.map_err(|e| format!("sending {BULK} bytes: {e}"))?;
    if let Some(e) = got.error {
        return Err(format!(
            "reading the echo: {e} after {} of {BULK} bytes (no clean EOF)",
            got.bytes
        ));
    }
    if let Some(at) = got.first_mismatch {
        return Err(format!("the echo differs from what was sent at byte {at}"));
    }
    if got.bytes != BULK {
        return Err(format!("{} bytes came back, {BULK} were sent", got.bytes));
    }
    total += BULK;
    for i in 0..SHORT_CONNECTIONS {
        let mut s = try_connect(addr).map_err(|e| format!("short connection {i}: {e}"))?;
        clients.push(s.local_addr().map_err(|e| e.to_string())?);
        let mut msg = format!("short connection {i}\n").into_bytes();
        msg.extend(rng.bytes(1 << (4 * i)));
        echo_round_trip(&mut s, &msg).map_err(|e| format!("short connection {i}: {e}"))?;
        total += msg.len() as u64;
        s.shutdown(Shutdown::Write)
            .map_err(|e| format!("short connection {i}: shutdown: {e}"))?;
        let rest = read_to_eof(&mut s, 1024)
            .map_err(|e| format!("short connection {i}: waiting for EOF: {e}"))?;
        if !rest.is_empty() {
            return Err(format!(
                "short connection {i}: {} bytes more than sent before EOF",
                rest.len()
            ));
        }
    }
    Ok(Exchanged {
        clients,
        bytes: total,
    })
}

// ---- checks ----------------------------------------------------------------------------------

/// A running file: its name, and lb's stderr for every failure message.
struct Run<'a> {
    file: &'a str,
    log: Box<dyn Fn() -> String + 'a>,
}

impl Run<'_> {
    fn fail(&self, what: impl Display) -> ! {
        panic!(
            "config/{}: {what}\n--- lb stderr ---\n{}\n--- end of lb stderr ---",
            self.file,
            (self.log)()
        )
    }

    fn check(&self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.fail(what());
        }
    }
}

/// The dataplane lb logged (`starting dataplane=...`).
fn logged_dataplane(log: &str) -> Option<String> {
    let line = log
        .lines()
        .find(|l| l.contains(" starting") && l.contains("dataplane="))?;
    let rest = line.split("dataplane=").nth(1)?;
    Some(rest.split_whitespace().next()?.to_owned())
}

fn check_dataplane(run: &Run<'_>, plan: &Plan) {
    let log = (run.log)();
    let dataplane = logged_dataplane(&log).unwrap_or_default();
    eprintln!(
        "config/{}: lb logged `starting dataplane={dataplane}` (mode {})",
        plan.file, plan.mode
    );
    run.check(dataplane == plan.expect, || {
        format!(
            "lb runs dataplane {dataplane:?}; with mode {} it must be {} on this machine",
            plan.mode, plan.expect
        )
    });
}

/// What the backends of one service saw, once its clients are done: every client connection
/// reached exactly one backend and was echoed whole, with the PROXY header the file asks for;
/// weight 0 got none; round robin visited every backend. Returns a line per backend.
fn check_backends(
    run: &Run<'_>,
    svc: &ServicePlan,
    listen: SocketAddr,
    backends: &[TestBackend],
    done: &Exchanged,
    nat: bool,
) -> Vec<String> {
    let n = done.clients.len();
    let total = || backends.iter().map(TestBackend::data).sum::<usize>();
    let problems = || {
        backends
            .iter()
            .flat_map(|b| {
                lock(&b.record.problems)
                    .iter()
                    .map(|p| format!("backend {}: {p}", b.addr))
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
    };
    wait_until(Duration::from_secs(10), || {
        total() >= n || !problems().is_empty()
    });
    let problems = problems();
    run.check(problems.is_empty(), || {
        format!("service {}: backends saw {problems:#?}", svc.name)
    });
    run.check(total() == n, || {
        format!(
            "service {}: {n} client connections, {} data connections at the backends",
            svc.name,
            total()
        )
    });
    let mut echoed = 0;
    for b in backends {
        for conn in lock(&b.record.data).iter() {
            echoed += conn.bytes;
            match (svc.proxy_protocol, &conn.header) {
                (Some(version), Some(h)) => run.check(
                    h.version == version
                        && h.destination == listen
                        && done.clients.contains(&h.source),
                    || {
                        format!(
                            "service {}: backend {} got PROXY header {h:?}; want {version}, \
                             destination {listen}, a source among {:?}",
                            svc.name, b.addr, done.clients
                        )
                    },
                ),
                (None, None) => {}
                (want, got) => run.fail(format!(
                    "service {}: backend {}: PROXY header {got:?}, want {want:?}",
                    svc.name, b.addr
                )),
            }
            // NAT rewrites the destination only: the backend sees the client itself.
            run.check(!nat || done.clients.contains(&conn.peer), || {
                format!(
                    "service {}: backend {} served {}, not one of the clients {:?}",
                    svc.name, b.addr, conn.peer, done.clients
                )
            });
        }
        run.check(b.weight > 0 || b.data() == 0, || {
            format!(
                "service {}: backend {} has weight 0 but got {} data connections",
                svc.name,
                b.addr,
                b.data()
            )
        });
    }
    run.check(echoed == done.bytes, || {
        format!(
            "service {}: the backends echoed {echoed} bytes, the clients sent {}",
            svc.name, done.bytes
        )
    });
    let weights: u64 = backends.iter().map(|b| b.weight).sum();
    if matches!(
        svc.algorithm.as_str(),
        "round_robin" | "weighted_round_robin"
    ) && n as u64 >= weights
    {
        for b in backends.iter().filter(|b| b.weight > 0) {
            run.check(b.data() > 0, || {
                format!(
                    "service {} ({}): {n} connections and backend {} got none",
                    svc.name, svc.algorithm, b.addr
                )
            });
        }
    }
    backends
        .iter()
        .map(|b| {
            format!(
                "  {} {}: weight {}, {} data connections, {} health probes answered so far",
                svc.name,
                b.addr,
                b.weight,
                b.data(),
                b.probes()
            )
        })
        .collect()
}

/// Every backend with a check answered lb's probes, and lb logged no failed check, no backend
/// down, no failed connect, no error.
fn check_health(run: &Run<'_>, plan: &Plan, backends: &[Vec<TestBackend>], started: Instant) {
    for (svc, bs) in plan.services.iter().zip(backends) {
        let Some((interval, timeout)) = svc.check else {
            continue;
        };
        // The first probe comes within one interval (a random point of it), answered within
        // the timeout; a little slack on top for a busy machine.
        let deadline = started + interval + timeout + Duration::from_secs(3);
        for b in bs {
            let kind = b
                .probe
                .as_ref()
                .map(|p| format!("{p:?}"))
                .unwrap_or_default();
            let ok = wait_until(deadline.saturating_duration_since(Instant::now()), || {
                b.probes() > 0
            });
            run.check(ok, || {
                format!(
                    "service {}: backend {} answered no health probe ({kind}) within {:?} of \
                     lb's start",
                    svc.name,
                    b.addr,
                    interval + timeout + Duration::from_secs(3)
                )
            });
        }
    }
    let log = (run.log)();
    for bad in [
        "health check failed",
        "backend down",
        "connect failed",
        "panicked",
        " ERROR ",
        " WARN ",
    ] {
        run.check(!log.contains(bad), || format!("lb logged {bad:?}"));
    }
}

/// `/status` says the dataplane and every backend up (weight 0: draining); with a token file,
/// a changing endpoint refuses a request without the token and takes it with the token.
/// `request` makes a request (in lb's namespace if it has one of its own).
fn check_admin(
    run: &Run<'_>,
    plan: &Plan,
    backends: &[Vec<TestBackend>],
    token: Option<&str>,
    request: &dyn Fn(&str, Option<String>) -> io::Result<Response>,
) {
    let mut last = None;
    let up = wait_until(Duration::from_secs(10), || {
        let r = request("/status", None);
        let ok = matches!(&r, Ok(r) if r.status == 200);
        last = Some(r);
        ok
    });
    run.check(up, || format!("GET /status does not answer: {last:?}"));
    let Some(Ok(r)) = last else {
        unreachable!("checked above")
    };
    let status = Status(
        serde_json::from_slice(&r.body)
            .unwrap_or_else(|e| run.fail(format!("/status is not JSON ({e}): {}", r.text()))),
    );
    run.check(status.0["dataplane"] == plan.expect, || {
        format!(
            "/status: dataplane {} for {}",
            status.0["dataplane"], plan.expect
        )
    });
    for (svc, bs) in plan.services.iter().zip(backends) {
        for b in bs {
            let want = if b.weight > 0 { "up" } else { "draining" };
            let state = status.state(&svc.name, b.addr);
            run.check(state == want, || {
                format!(
                    "/status: backend {} of {} is {state}, not {want}: {}",
                    b.addr, svc.name, status.0
                )
            });
        }
    }
    if let Some(token) = token {
        // Draining a backend the service does not have changes nothing either way.
        let path = format!(
            "/services/{}/backends/192.0.2.1:1/drain",
            plan.services[0].name
        );
        let without = request(&path, Some(String::new()));
        run.check(matches!(&without, Ok(r) if r.status == 401), || {
            format!("POST {path} without the token: {without:?}, want 401")
        });
        let with = request(&path, Some(token.to_owned()));
        run.check(matches!(&with, Ok(r) if r.status != 401), || {
            format!("POST {path} with the token from token_file: {with:?}, want it taken")
        });
    }
}

/// GET `path`, or POST it with `Some(token)` (empty: no Authorization header).
fn admin_request(addr: SocketAddr, path: &str, post: Option<String>) -> io::Result<Response> {
    match post {
        None => admin::get(addr, path),
        Some(t) if t.is_empty() => admin::post(addr, path, None),
        Some(t) => admin::post(addr, path, Some(&t)),
    }
}

// ---- on loopback: proxy, sockmap, auto ------------------------------------------------------

/// A pin directory of its own on bpffs (tests run in parallel), removed on drop.
struct PinDir(PathBuf);

impl PinDir {
    fn new(file: &str) -> PinDir {
        PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/lb-shipped-{}-{}",
            std::process::id(),
            slug(file)
        )))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn run_on_loopback(plan: &Plan, shipped: &Value) {
    let file = plan.file.as_str();
    // Backends where the file names them cannot be had (documentation ranges, ports taken):
    // the test's own, on loopback, of the same family.
    let backends: Vec<Vec<TestBackend>> = plan
        .services
        .iter()
        .map(|svc| {
            svc.backends
                .iter()
                .map(|b| {
                    let bind = SocketAddr::new(loopback(b.address.ip()), 0);
                    TestBackend::start(b, svc.proxy_protocol, bind, None, None)
                })
                .collect()
        })
        .collect();
    let pins = PinDir::new(file);
    let secrets = TempDir::new();
    let token = format!("shipped-{:016x}", Rng::new(seed(file, 99)).next_u64());
    let token_path = secrets.path.join("admin.token");
    fs::write(&token_path, &token).expect("write the admin token");
    let has_token = shipped
        .get("admin")
        .and_then(|a| a.get("token_file"))
        .is_some();
    let launch = Launch {
        wrapper: &[],
        env: &[("RUST_LOG", LOG_FILTER)],
    };
    let mut attempt = 0;
    let (lb, admin_addr, notes, started) = loop {
        attempt += 1;
        let mut doc = shipped.clone();
        let mut notes = Vec::new();
        let admin_addr = text(shipped.get("admin").and_then(|a| a.get("listen"))).map(|l| {
            // The shipped port may be taken here (and 0.0.0.0 would face the network).
            let shipped: SocketAddr = l
                .parse()
                .unwrap_or_else(|_| cannot_run(file, format!("admin.listen {l:?}")));
            let addr = free_loopback(shipped.ip());
            set(
                &mut doc,
                "admin.listen",
                addr.to_string().into(),
                &mut notes,
            );
            addr
        });
        if has_token {
            // The shipped path (a container secret, /etc/lb) is not on a test machine.
            let path = token_path.to_str().expect("utf-8 temp path");
            set(&mut doc, "admin.token_file", path.into(), &mut notes);
        }
        if shipped
            .get("dataplane")
            .and_then(|d| d.get("pin_path"))
            .is_some()
            || plan.add_pin_path
        {
            // The shared /sys/fs/bpf/lb may be another lb's (or another test's).
            let path = pins.0.to_str().expect("utf-8 pin path");
            set(&mut doc, "dataplane.pin_path", path.into(), &mut notes);
        }
        for (i, (svc, bs)) in plan.services.iter().zip(&backends).enumerate() {
            // The shipped port may be taken; a wildcard would face the network.
            set_address(
                &mut doc,
                i,
                None,
                free_loopback(svc.listen.ip()),
                &mut notes,
            );
            for (j, b) in bs.iter().enumerate() {
                set_address(&mut doc, i, Some(j), b.addr, &mut notes);
            }
        }
        assert_only_allowed_changes(file, shipped, &doc);
        let yaml = serde_yaml::to_string(&doc).expect("YAML serialises");
        let started = Instant::now();
        match Lb::try_start_with(&yaml, &[], &launch) {
            Ok(lb) => break (lb, admin_addr, notes, started),
            Err(e) if attempt < 3 && e.status.is_some() && e.stderr.contains("cannot listen") => {}
            Err(e) => panic!(
                "config/{file}: lb did not start (exit status {:?}); stderr:\n{}\nconfig as run:\n{yaml}",
                e.status, e.stderr
            ),
        }
    };
    eprintln!("config/{file}: changed\n  {}", notes.join("\n  "));
    let run = Run {
        file,
        log: Box::new(|| lb.stderr()),
    };
    check_dataplane(&run, plan);
    for (i, (svc, bs)) in plan.services.iter().zip(&backends).enumerate() {
        let listen = lb.addrs()[i];
        let done = exchange(listen, seed(file, i), None)
            .unwrap_or_else(|e| run.fail(format!("service {} at {listen}: {e}", svc.name)));
        let lines = check_backends(&run, svc, listen, bs, &done, false);
        eprintln!(
            "config/{file}: service {} carried {} bytes exactly both ways\n{}",
            svc.name,
            done.bytes,
            lines.join("\n")
        );
    }
    if let Some(addr) = admin_addr {
        let token = has_token.then_some(token.as_str());
        check_admin(&run, plan, &backends, token, &|path, post| {
            admin_request(addr, path, post)
        });
    }
    check_health(&run, plan, &backends, started);
}

/// Sets the listen address of service `i`, or (`backend: Some(j)`) the address of its backend
/// `j`, noting the change.
fn set_address(
    doc: &mut Value,
    i: usize,
    backend: Option<usize>,
    addr: SocketAddr,
    notes: &mut Vec<String>,
) {
    let service = &mut doc["services"][i];
    let mut note = format!(
        "services[{i}] ({})",
        text(service.get("name")).unwrap_or_default()
    );
    let (at, key) = match backend {
        Some(j) => {
            note += &format!(".backends[{j}]");
            (&mut service["backends"][j], "address")
        }
        None => (service, "listen"),
    };
    let old = text(at.get(key)).unwrap_or_default();
    notes.push(format!("{note}.{key}: {old} -> {addr}"));
    at[key] = Value::from(addr.to_string());
}

// ---- in the xdp topology --------------------------------------------------------------------

/// The topology's VIP for service `i`, and its backends' addresses, by family.
fn vip(i: usize, like: IpAddr) -> SocketAddr {
    let port = 80 + u16::try_from(i).expect("few services");
    match like {
        IpAddr::V4(_) => SocketAddr::from(([10, 77, 9, 100], port)),
        IpAddr::V6(_) => SocketAddr::new("fd77:9::100".parse().expect("VIP"), port),
    }
}

fn topology_backend(host: usize, like: IpAddr) -> IpAddr {
    match like {
        IpAddr::V4(_) => ["10.77.0.11", "10.77.0.12"][host].parse().expect("IP"),
        IpAddr::V6(_) => ["fd77::11", "fd77::12"][host].parse().expect("IP"),
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Unmount(String);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn run_in_topology(plan: &Plan, shipped: &Value) {
    let file = plan.file.as_str();
    // NAT: the backends route the client's subnet back through lb.
    let topo = Topology::new(Replies::ThroughLb);
    topo.set_links(1500, true);
    let dir = TempDir::new();
    // `ip netns exec` remounts /sys without the host's bpffs: a private one, as torture_xdp.
    let bpffs = dir.path.join("bpf");
    fs::create_dir_all(&bpffs).expect("bpffs dir");
    let bpffs = bpffs.to_str().expect("utf-8").to_owned();
    sh(&["mount", "-t", "bpf", "bpf", &bpffs]);
    let _unmount = Unmount(bpffs.clone());
    // The topology has two backend hosts: the file's backends go to them in turn, each on
    // the next free port of its host (10.77.0.11:80, 10.77.0.12:80, 10.77.0.11:81, ...). NAT
    // rewrites the port too, so a backend on :81 is as real as one on :80.
    let mut next_port = [80u16; 2];
    let mut backends: Vec<Vec<TestBackend>> = Vec::new();
    for svc in &plan.services {
        let mut bs = Vec::new();
        for (i, b) in svc.backends.iter().enumerate() {
            let host = i % 2;
            let port = next_port[host];
            next_port[host] += 1;
            let unspecified = match b.address.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            };
            let addr = SocketAddr::new(topology_backend(host, b.address.ip()), port);
            bs.push(TestBackend::start(
                b,
                svc.proxy_protocol,
                SocketAddr::new(unspecified, port),
                Some(&topo.backends[host]),
                Some(addr),
            ));
        }
        backends.push(bs);
    }
    let mut doc = shipped.clone();
    let mut notes = Vec::new();
    set(
        &mut doc,
        "dataplane.xdp.interface",
        topo.lb_if.as_str().into(),
        &mut notes,
    );
    let pin_path = format!("{bpffs}/lb");
    set(&mut doc, "dataplane.pin_path", pin_path.into(), &mut notes);
    let mut vips = Vec::new();
    for (i, (svc, bs)) in plan.services.iter().zip(&backends).enumerate() {
        let vip = vip(i, svc.listen.ip());
        vips.push(vip);
        set_address(&mut doc, i, None, vip, &mut notes);
        for (j, b) in bs.iter().enumerate() {
            set_address(&mut doc, i, Some(j), b.addr, &mut notes);
        }
    }
    // admin.listen stays as shipped: lb's namespace is its own, so its port is free there.
    assert_only_allowed_changes(file, shipped, &doc);
    let config = dir.path.join("lb.yaml");
    let yaml = serde_yaml::to_string(&doc).expect("YAML serialises");
    fs::write(&config, &yaml).expect("write config");
    let log_path = dir.path.join("lb.log");
    let started = Instant::now();
    let mut lb = KillOnDrop(
        topo.lb
            .command(binary().to_str().expect("utf-8"))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", LOG_FILTER)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log_path).expect("log file"))
            .spawn()
            .expect("spawn lb"),
    );
    eprintln!("config/{file}: changed\n  {}", notes.join("\n  "));
    let mut exited = None;
    let run = Run {
        file,
        log: Box::new(|| {
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            format!("{log}\n(config as run:\n{yaml})")
        }),
    };
    let programmed = wait_until(Duration::from_secs(15), || {
        let log = fs::read_to_string(&log_path).unwrap_or_default();
        if let Ok(Some(status)) = lb.0.try_wait() {
            exited = Some(status);
            return true;
        }
        vips.iter().all(|vip| {
            log.lines()
                .any(|l| l.contains("VIP programmed in XDP") && l.contains(&format!("vip={vip}")))
        })
    });
    run.check(programmed && exited.is_none(), || {
        format!("lb did not program every VIP {vips:?} (exit status {exited:?})")
    });
    check_dataplane(&run, plan);
    // lb resolves the backends' MACs in the background (managed neighbour entries): a SYN
    // before that would wait for a retransmit.
    thread::sleep(Duration::from_millis(2500));
    for (i, (svc, bs)) in plan.services.iter().zip(&backends).enumerate() {
        let done = exchange(vips[i], seed(file, i), Some(topo.client.name.clone()))
            .unwrap_or_else(|e| run.fail(format!("service {} at {}: {e}", svc.name, vips[i])));
        let lines = check_backends(&run, svc, vips[i], bs, &done, true);
        eprintln!(
            "config/{file}: service {} carried {} bytes exactly both ways\n{}",
            svc.name,
            done.bytes,
            lines.join("\n")
        );
    }
    if let Some(listen) = text(shipped.get("admin").and_then(|a| a.get("listen"))) {
        let addr: SocketAddr = listen
            .parse()
            .unwrap_or_else(|_| cannot_run(file, format!("admin.listen {listen:?}")));
        let has_token = shipped
            .get("admin")
            .and_then(|a| a.get("token_file"))
            .is_some();
        if has_token {
            cannot_run(file, "an xdp file with admin.token_file");
        }
        let ns = &topo.lb;
        check_admin(&run, plan, &backends, None, &|path, post| {
            let path = path.to_owned();
            ns.run(move || admin_request(addr, &path, post))
        });
    }
    check_health(&run, plan, &backends, started);
}

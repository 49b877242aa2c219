//! Through the public API: a config text in, a `Config` or located errors out.
//!
//! Texts are built with [`doc`] from one string per line, so line `n` of a test document is
//! element `n - 1` of its array and a column is a character count within it (1-based).

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

fn doc<S: AsRef<str>>(lines: &[S]) -> String {
    let lines: Vec<&str> = lines.iter().map(AsRef::as_ref).collect();
    lines.join("\n") + "\n"
}

fn errors<S: AsRef<str>>(lines: &[S]) -> Vec<ConfigError> {
    match parse(&doc(lines), "test.yaml") {
        Ok(config) => panic!("expected errors, got {config:#?}"),
        Err(ConfigErrors(errors)) => {
            assert!(!errors.is_empty(), "Err must carry at least one error");
            errors
        }
    }
}

/// Asserts there is exactly one error, at `line`:`column`, whose message contains `text`.
#[track_caller]
fn one_error<S: AsRef<str>>(lines: &[S], line: usize, column: usize, text: &str) {
    let errors = errors(lines);
    let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        errors.len(),
        1,
        "expected one error, got:\n{}",
        shown.join("\n")
    );
    let e = &errors[0];
    assert_eq!((e.line, e.column), (line, column), "wrong place: {e}");
    assert!(e.message.contains(text), "{e}\ndoes not contain: {text}");
}

fn ok<S: AsRef<str>>(lines: &[S]) -> Config {
    parse(&doc(lines), "test.yaml").unwrap_or_else(|e| panic!("expected a valid config, got:\n{e}"))
}

/// One service with one backend: the smallest valid file.
const MINIMAL: &[&str] = &[
    "services:",
    "  - name: web",
    "    listen: 127.0.0.1:8080",
    "    backends:",
    "      - address: 127.0.0.1:19001",
];

fn minimal_with(extra: &[&str]) -> Vec<String> {
    MINIMAL
        .iter()
        .chain(extra)
        .map(|l| (*l).to_owned())
        .collect()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

// ---- defaults ----

#[test]
fn minimal_config_gets_every_default() {
    let config = ok(MINIMAL);
    assert_eq!(
        config,
        Config {
            admin: None,
            dataplane: DataplaneConfig {
                mode: DataplaneMode::Auto,
                pin_path: PathBuf::from("/sys/fs/bpf/lb"),
                xdp: None,
                sockmap: SockmapConfig {
                    enabled: None,
                    promote_after_bytes: 65536
                },
            },
            shutdown_timeout: secs(30),
            run_as: None,
            services: vec![ServiceConfig {
                name: "web".to_owned(),
                listen: addr("127.0.0.1:8080"),
                algorithm: Algorithm::RoundRobin,
                maglev_table_size: 65537,
                backends: vec![BackendConfig {
                    address: addr("127.0.0.1:19001"),
                    weight: 1,
                    health_check: None,
                }],
                health_check: None,
                ejection: EjectionConfig {
                    consecutive_failures: 5,
                    base_time: secs(10),
                    max_time: secs(300),
                    max_percent: 50,
                },
                connect_timeout: secs(2),
                retries: 2,
                idle_timeout: secs(3600),
                max_connections: nz(10_000),
                proxy_protocol: ProxyProtocol::Off,
                tcp_keepalive: None,
            }],
        }
    );
}

#[test]
fn section_defaults() {
    let config = ok(&[
        "admin:",
        "dataplane:",
        "  xdp:",
        "    interface: eth0",
        "services:",
        "  - name: web",
        "    listen: 127.0.0.1:8080",
        "    backends:",
        "      - address: 127.0.0.1:19001",
        "    health_check:",
        "      kind: http",
    ]);
    assert_eq!(
        config.admin,
        Some(AdminConfig {
            listen: addr("127.0.0.1:9100"),
            token_file: None
        })
    );
    assert_eq!(
        config.dataplane.xdp,
        Some(XdpConfig {
            interface: "eth0".to_owned(),
            attach: XdpAttach::Auto,
            forwarding: Forwarding::Nat,
            flow_table_size: 1_048_576,
        })
    );
    assert_eq!(
        config.services[0].health_check,
        Some(HealthCheckConfig {
            kind: HealthCheckKind::Http,
            interval: secs(2),
            timeout: secs(1),
            rise: nz(2),
            fall: nz(3),
            jitter_percent: 10,
            port: None,
            address: None,
            initial_state: InitialState::Up,
            http: Some(HttpCheck {
                path: "/".to_owned(),
                expect_status: 200,
                host: None
            }),
            send_expect: None,
        })
    );
}

#[test]
fn empty_services_list_is_valid() {
    assert!(ok(&["services: []"]).services.is_empty());
}

#[test]
fn ipv6_and_every_value_kind_parse() {
    let config = ok(&[
        "shutdown_timeout: 1m30s",
        "services:",
        "  - name: v6_svc-1",
        "    listen: \"[::1]:8080\"",
        "    algorithm: source_hash",
        "    maglev_table_size: 257",
        "    backends:",
        "      - {address: \"[::1]:19001\", weight: 0}",
        "      - address: 127.0.0.1:19001",
        "        weight: 1000",
        "        health_check: {port: 19100, address: \"[::1]\"}",
        "    health_check:",
        "      kind: send_expect",
        "      send_hex: 50 49 4e 47 0d 0a",
        "      expect_regex: '^\\+PONG'",
        "      max_response: 65536",
        "      initial_state: down",
        "      interval: 500ms",
        "      timeout: 100ms",
        "    proxy_protocol: false",
        "    tcp_keepalive: 60s",
        "    retries: 16",
        "    max_connections: 1",
    ]);
    assert_eq!(config.shutdown_timeout, secs(90));
    let s = &config.services[0];
    assert_eq!(s.listen, addr("[::1]:8080"));
    assert_eq!(s.algorithm, Algorithm::SourceHash);
    assert_eq!(s.backends[0].weight, 0);
    assert_eq!(s.proxy_protocol, ProxyProtocol::Off);
    assert_eq!(s.tcp_keepalive, Some(secs(60)));
    let check = s.health_check.as_ref().unwrap();
    assert_eq!(check.initial_state, InitialState::Down);
    let se = check.send_expect.as_ref().unwrap();
    assert_eq!(se.send, b"PING\r\n");
    assert_eq!(
        se.expect,
        Expect::Regex(ResponseRegex::new("^\\+PONG").unwrap())
    );
    assert_eq!(se.max_response, 65536);
    // The per-backend override applies to that backend only.
    let effective = s.health_check_for(&s.backends[1]).unwrap();
    assert_eq!(effective.target(s.backends[1].address), addr("[::1]:19100"));
    assert_eq!(s.health_check_for(&s.backends[0]).unwrap(), *check);
}

#[test]
fn per_backend_override_merges_into_the_service_check() {
    let config = ok(&minimal_with(&[
        "        health_check: {path: /ready, host: b.example}",
        "    health_check:",
        "      kind: http",
        "      port: 9000",
        "      expect_status: 204",
    ]));
    let s = &config.services[0];
    let check = s.health_check_for(&s.backends[0]).unwrap();
    let http = check.http.unwrap();
    assert_eq!(
        (http.path.as_str(), http.host.as_deref(), http.expect_status),
        ("/ready", Some("b.example"), 204)
    );
    assert_eq!(check.port, Some(9000));
}

#[test]
fn merge_keys_and_anchors_work() {
    let config = ok(&[
        "x-common: &common",
        "  algorithm: maglev",
        "  retries: 3",
        "services:",
        "  - <<: *common",
        "    name: a",
        "    listen: 127.0.0.1:8080",
        "    backends: &backends",
        "      - address: 127.0.0.1:19001",
        "  - <<: *common",
        "    name: b",
        "    listen: 127.0.0.1:8081",
        "    backends: *backends",
    ]);
    assert_eq!(config.services[1].algorithm, Algorithm::Maglev);
    assert_eq!(config.services[1].retries, 3);
}

#[test]
fn keywords_round_trip_through_from_str_and_display() {
    for name in DataplaneMode::NAMES {
        assert_eq!(name.parse::<DataplaneMode>().unwrap().to_string(), *name);
    }
    let e = "xpd".parse::<DataplaneMode>().unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown value \"xpd\"; expected one of: auto, xdp, sockmap, proxy"
    );
}

// ---- one test per kind of error, each at its exact place ----

#[test]
fn syntax_error() {
    one_error(
        &["services:", "  - name: web", "   listen: 127.0.0.1:8080"],
        3,
        4,
        "did not find expected '-' indicator",
    );
    // libyaml's message says what it was parsing, and where that began.
    one_error(
        &["services: [", "admin: {}"],
        3,
        1,
        "did not find expected ',' or ']' at line 3 column 1, \
         while parsing a flow sequence at line 1 column 11",
    );
    // Tabs are not indentation in YAML.
    one_error(
        &["services:", "\t- name: web"],
        2,
        1,
        "(a tab: YAML indents with spaces only)",
    );
}

#[test]
fn wrong_shape() {
    one_error(
        &["services: web"],
        1,
        11,
        "services: invalid type: string \"web\", expected a sequence",
    );
    one_error(
        &[
            "services:",
            "  - name: web",
            "    listen: 127.0.0.1:8080",
            "    backends:",
            "      - 127.0.0.1:19001",
        ],
        5,
        9,
        "services[0].backends[0]: invalid type: string \"127.0.0.1:19001\", expected a backend",
    );
    one_error(
        &minimal_with(&["    retries: [1]"]),
        6,
        14,
        "services[0].retries: invalid type: sequence",
    );
}

#[test]
fn unknown_key() {
    one_error(
        &[
            "services:",
            "  - name: web",
            "    listen: 127.0.0.1:8080",
            "    backends:",
            "      - address: 127.0.0.1:19001",
            "        wieght: 3",
        ],
        6,
        9,
        "unknown key \"wieght\" in services[0].backends[0]; expected one of: address, weight, health_check (did you mean \"weight\"?)",
    );
    one_error(
        &["services: []", "servces: []"],
        2,
        1,
        "unknown key \"servces\" at the top level; expected one of: admin, dataplane, shutdown_timeout, run_as, services",
    );
}

#[test]
fn every_unknown_key_is_reported_with_the_other_errors() {
    let errors = errors(&[
        "admin:",
        "  listne: 127.0.0.1:9100",
        "dataplane:",
        "  xdp: {interfase: eth0}",
        "services:",
        "  - name: web",
        "    listen: 127.0.0.1:8080",
        "    algoritm: maglev",
        "    backends:",
        "      - address: 127.0.0.1:19001",
        "        weight: 5000",
        "    health_check:",
        "      kind: tcp",
        "      rize: 2",
    ]);
    let got: Vec<(usize, usize, &str)> = errors
        .iter()
        .map(|e| (e.line, e.column, e.message.as_str()))
        .collect();
    assert_eq!(got.len(), 6, "{got:#?}");
    assert!(got[0].2.starts_with("unknown key \"listne\" in admin;"));
    assert_eq!((got[0].0, got[0].1), (2, 3));
    // The xdp section is there, so its required key is missing.
    assert!(got[1].2.starts_with("dataplane.xdp.interface is missing"));
    assert_eq!((got[1].0, got[1].1), (4, 3));
    assert!(
        got[2]
            .2
            .starts_with("unknown key \"interfase\" in dataplane.xdp;")
    );
    assert_eq!((got[2].0, got[2].1), (4, 9));
    assert!(
        got[3]
            .2
            .starts_with("unknown key \"algoritm\" in services[0];")
    );
    assert_eq!((got[3].0, got[3].1), (8, 5));
    assert!(got[4].2.contains("weight: 5000 is out of range"));
    assert_eq!((got[4].0, got[4].1), (11, 17));
    assert!(got[5].2.contains("(did you mean \"rise\"?)"));
    assert_eq!((got[5].0, got[5].1), (14, 7));
}

#[test]
fn bad_addresses() {
    let service = |listen: &str| -> Vec<String> {
        vec![
            "services:".into(),
            "  - name: web".into(),
            format!("    listen: {listen}"),
            "    backends:".into(),
            "      - address: 127.0.0.1:19001".into(),
        ]
    };
    let cases = [
        (
            "127.0.0.1",
            "\"127.0.0.1\" has no port; add one, e.g. 127.0.0.1:80",
        ),
        ("8080", "8080 is only a port; an address needs an IP too"),
        (
            "127.0.0.1:http",
            "port \"http\" in \"127.0.0.1:http\" is not a number from 1 to 65535",
        ),
        (
            "localhost:8080",
            "\"localhost\" is not an IP address; lb does not resolve names",
        ),
        ("2001:db8::x:8080", "put an IPv6 address in brackets"),
        ("127.0.0.1:0", "port 0 is not allowed"),
    ];
    for (listen, text) in cases {
        one_error(&service(listen), 3, 13, text);
    }
    one_error(
        &[
            "services:",
            "  - name: web",
            "    listen: 127.0.0.1:8080",
            "    backends:",
            "      - address: 0.0.0.0:80",
        ],
        5,
        18,
        "services[0].backends[0].address: 0.0.0.0 means any address and cannot be connected to",
    );
}

#[test]
fn duplicate_service_names() {
    one_error(
        &[
            "services:",
            "  - name: web",
            "    listen: 127.0.0.1:8080",
            "    backends: [{address: 127.0.0.1:19001}]",
            "  - name: web",
            "    listen: 127.0.0.1:8081",
            "    backends: [{address: 127.0.0.1:19001}]",
        ],
        5,
        11,
        "services[1].name: \"web\" is already the name of services[0]; service names must be unique",
    );
}

#[test]
fn listen_clashes() {
    let two = |a: &'static str, b: &'static str| -> Vec<String> {
        vec![
            "services:".into(),
            "  - name: a".into(),
            format!("    listen: {a}"),
            "    backends: [{address: 127.0.0.1:19001}]".into(),
            "  - name: b".into(),
            format!("    listen: {b}"),
            "    backends: [{address: 127.0.0.1:19001}]".into(),
        ]
    };
    let check = |a, b, text: &str| one_error(&two(a, b), 6, 13, text);
    check(
        "127.0.0.1:8080",
        "127.0.0.1:8080",
        "services[1].listen: 127.0.0.1:8080 clashes with services[0].listen 127.0.0.1:8080;",
    );
    check(
        "0.0.0.0:8080",
        "127.0.0.1:8080",
        "(0.0.0.0 takes every IPv4 address on port 8080)",
    );
    check(
        "127.0.0.1:8080",
        "0.0.0.0:8080",
        "(0.0.0.0 takes every IPv4 address on port 8080)",
    );
    check(
        "\"[::]:8080\"",
        "\"[::1]:8080\"",
        "(:: takes every IPv6 address on port 8080)",
    );
    // Different families, addresses or ports do not clash.
    for (a, b) in [
        ("\"[::]:8080\"", "0.0.0.0:8080"),
        ("127.0.0.1:8080", "127.0.0.2:8080"),
        ("0.0.0.0:8080", "0.0.0.0:8081"),
    ] {
        ok(&two(a, b));
    }
    // Nor may a service take the admin server's address.
    one_error(
        &[
            "admin:",
            "services:",
            "  - name: web",
            "    listen: 127.0.0.1:9100",
            "    backends: [{address: 127.0.0.1:19001}]",
        ],
        4,
        13,
        "clashes with admin.listen 127.0.0.1:9100",
    );
}

#[test]
fn no_backends() {
    one_error(
        &["services:", "  - name: web", "    listen: 127.0.0.1:8080"],
        2,
        5,
        "services[0].backends is missing: give at least one backend",
    );
    one_error(
        &[
            "services:",
            "  - name: web",
            "    listen: 127.0.0.1:8080",
            "    backends: []",
        ],
        4,
        15,
        "services[0].backends: the list is empty",
    );
}

#[test]
fn duplicate_backends() {
    one_error(
        &minimal_with(&[
            "      - address: 127.0.0.1:19002",
            "      - address: 127.0.0.1:19001",
        ]),
        7,
        18,
        "services[0].backends[2].address: 127.0.0.1:19001 is already backend [0] of this service",
    );
}

#[test]
fn weights_out_of_range() {
    one_error(
        &minimal_with(&["        weight: 1001"]),
        6,
        17,
        "services[0].backends[0].weight: 1001 is out of range: expected a whole number from 0 to 1000",
    );
    one_error(
        &minimal_with(&["        weight: -1"]),
        6,
        17,
        "-1 is out of range",
    );
    one_error(
        &minimal_with(&["        weight: heavy"]),
        6,
        17,
        "expected a whole number from 0 to 1000, found \"heavy\"",
    );
}

#[test]
fn bad_durations() {
    one_error(
        &minimal_with(&["    connect_timeout: 0s"]),
        6,
        22,
        "services[0].connect_timeout: \"0s\" is zero; a duration must be greater than zero",
    );
    one_error(
        &minimal_with(&["    connect_timeout: -2s"]),
        6,
        22,
        "\"-2s\" is negative",
    );
    one_error(
        &minimal_with(&["    connect_timeout: 2"]),
        6,
        22,
        "2 has no unit; write e.g. 2s or 2ms",
    );
    one_error(
        &minimal_with(&["    idle_timeout: soon"]),
        6,
        19,
        "\"soon\" is not a duration",
    );
    one_error(
        &minimal_with(&["    idle_timeout: 5 parsecs"]),
        6,
        19,
        "unknown time unit \"parsecs\"",
    );
    one_error(
        &["shutdown_timeout: 0", "services: []"],
        1,
        19,
        "shutdown_timeout: expected a duration greater than zero",
    );
}

#[test]
fn health_check_timeout_must_be_below_interval() {
    one_error(
        &minimal_with(&[
            "    health_check:",
            "      kind: tcp",
            "      interval: 1s",
            "      timeout: 1s",
        ]),
        9,
        16,
        "services[0].health_check.timeout: timeout 1s must be shorter than interval 1s",
    );
    // With the default timeout (1s), the interval is to blame.
    one_error(
        &minimal_with(&[
            "    health_check:",
            "      kind: tcp",
            "      interval: 500ms",
        ]),
        8,
        17,
        "timeout 1s must be shorter than interval 500ms",
    );
}

#[test]
fn rise_and_fall_of_zero() {
    let errors = errors(&minimal_with(&[
        "    health_check:",
        "      kind: tcp",
        "      rise: 0",
        "      fall: 0",
    ]));
    let got: Vec<(usize, usize)> = errors.iter().map(|e| (e.line, e.column)).collect();
    assert_eq!(got, [(8, 13), (9, 13)]);
    assert!(errors[0].message.contains(
        "services[0].health_check.rise: 0 is out of range: expected a whole number of at least 1"
    ));
    assert!(errors[1].message.contains("health_check.fall"));
}

#[test]
fn xdp_mode_needs_an_interface() {
    let lines = [&["dataplane:", "  mode: xdp"], MINIMAL].concat();
    one_error(
        &lines,
        2,
        9,
        "dataplane mode xdp needs dataplane.xdp.interface",
    );
    one_error(
        &[
            "dataplane:",
            "  xdp:",
            "    interface: this-name-is-too-long0",
            "services: []",
        ],
        3,
        16,
        "is not an interface name: use 1 to 15 bytes",
    );
}

#[test]
fn xdp_mode_cannot_send_proxy_headers() {
    let lines = [
        &["dataplane:", "  mode: xdp", "  xdp: {interface: eth0}"],
        MINIMAL,
        &["    proxy_protocol: v2"],
    ]
    .concat();
    one_error(
        &lines,
        9,
        21,
        "services[0].proxy_protocol is v2 but dataplane mode xdp forwards packets",
    );
}

#[test]
fn sockmap_mode_needs_sockmap_enabled() {
    let lines = [
        &[
            "dataplane:",
            "  mode: sockmap",
            "  sockmap:",
            "    enabled: false",
        ],
        MINIMAL,
    ]
    .concat();
    one_error(
        &lines,
        2,
        9,
        "dataplane mode sockmap cannot run with dataplane.sockmap.enabled: false",
    );
}

#[test]
fn unknown_enum_values() {
    one_error(
        &minimal_with(&["    algorithm: magelv"]),
        6,
        16,
        "services[0].algorithm: unknown value \"magelv\"; expected one of: round_robin, weighted_round_robin, least_connections, random, maglev, source_hash (did you mean \"maglev\"?)",
    );
    one_error(
        &["dataplane:", "  mode: fast", "services: []"],
        2,
        9,
        "dataplane.mode: unknown value \"fast\"; expected one of: auto, xdp, sockmap, proxy",
    );
    one_error(
        &minimal_with(&["    proxy_protocol: v3"]),
        6,
        21,
        "expected one of: off, v1, v2",
    );
    one_error(
        &minimal_with(&["    proxy_protocol: true"]),
        6,
        21,
        "expected one of: off, v1, v2; found true",
    );
}

#[test]
fn maglev_size_must_be_prime() {
    one_error(
        &minimal_with(&["    maglev_table_size: 65536"]),
        6,
        24,
        "services[0].maglev_table_size: 65536 is not a prime number; Maglev needs a prime table size (nearest: 65521 or 65537",
    );
    one_error(
        &minimal_with(&["    maglev_table_size: 7"]),
        6,
        24,
        "7 is out of range: expected a whole number from 257 to 1000003",
    );
}

#[test]
fn bad_service_names() {
    one_error(
        &[
            "services:",
            "  - name: Web App",
            "    listen: 127.0.0.1:8080",
            "    backends: [{address: 127.0.0.1:19001}]",
        ],
        2,
        11,
        "services[0].name: \"Web App\" is not a valid name: use 1 to 32 characters from a-z, 0-9, _ and - (e.g. \"web-app\")",
    );
    one_error(
        &[
            "services:",
            "  - name: \"\"",
            "    listen: 127.0.0.1:8080",
            "    backends: [{address: 127.0.0.1:19001}]",
        ],
        2,
        11,
        "is not a valid name",
    );
    one_error(
        &[
            "services:",
            "  - listen: 127.0.0.1:8080",
            "    backends: [{address: 127.0.0.1:19001}]",
        ],
        2,
        5,
        "services[0].name is missing",
    );
}

#[test]
fn admin_off_loopback_needs_a_token() {
    one_error(
        &["admin:", "  listen: 0.0.0.0:9100", "services: []"],
        2,
        11,
        "admin.listen is not a loopback address: set admin.token_file so changing endpoints need a token",
    );
    ok(&[
        "admin:",
        "  listen: 0.0.0.0:9100",
        "  token_file: /etc/lb/token",
        "services: []",
    ]);
    ok(&["admin: {listen: \"[::1]:9100\"}", "services: []"]);
}

#[test]
fn health_keys_must_match_the_kind() {
    one_error(
        &minimal_with(&[
            "    health_check:",
            "      kind: tcp",
            "      path: /healthz",
        ]),
        8,
        7,
        "services[0].health_check.path: only kind http checks use path, and this check is kind tcp; remove it or set kind: http",
    );
    one_error(
        &minimal_with(&["    health_check:", "      kind: http", "      expect: OK"]),
        8,
        7,
        "only kind send_expect checks use expect, and this check is kind http",
    );
    // Per-backend overrides follow the service's kind.
    one_error(
        &minimal_with(&[
            "        health_check: {send: PING}",
            "    health_check:",
            "      kind: http",
        ]),
        6,
        24,
        "services[0].backends[0].health_check.send: only kind send_expect checks use send",
    );
    one_error(
        &minimal_with(&["        health_check: {port: 9000}"]),
        6,
        9,
        "per-backend health_check settings need a service-level health_check",
    );
    one_error(
        &minimal_with(&["    health_check:", "      interval: 2s"]),
        6,
        5,
        "services[0].health_check.kind is missing",
    );
}

#[test]
fn send_expect_checks() {
    let check = |lines: &[&str]| {
        let mut all = minimal_with(&["    health_check:", "      kind: send_expect"]);
        all.extend(lines.iter().map(|l| (*l).to_owned()));
        all
    };
    one_error(
        &check(&[
            "      send: PING",
            "      send_hex: 0d0a",
            "      expect: PONG",
        ]),
        9,
        7,
        "set send or send_hex, not both",
    );
    one_error(
        &check(&["      send: PING"]),
        6,
        5,
        "kind send_expect needs one of expect (text), expect_hex or expect_regex",
    );
    one_error(
        &check(&["      expect: PONG"]),
        6,
        5,
        "kind send_expect needs send (text) or send_hex",
    );
    one_error(
        &check(&["      send: PING", "      expect_regex: \"(PONG\""]),
        9,
        21,
        "is not a valid regular expression: unclosed group",
    );
    one_error(
        &check(&["      send_hex: 0g", "      expect: PONG"]),
        8,
        17,
        "\"0g\" is not hex",
    );
    one_error(
        &check(&["      send: PING", "      expect: \"\""]),
        9,
        15,
        "expect: is empty",
    );
    one_error(
        &check(&[
            "      send: PING",
            "      expect: PONG",
            "      expect_hex: 504f4e47",
        ]),
        10,
        7,
        "set only one of expect, expect_hex and expect_regex",
    );
    one_error(
        &check(&[
            "      send: PING",
            "      expect: PONG",
            "      max_response: 0",
        ]),
        10,
        21,
        "0 is out of range",
    );
}

#[test]
fn case_insensitive_regexes_compile() {
    // Needs the regex crate's `unicode-case` feature (in `unicode`).
    let config = ok(&minimal_with(&[
        "    health_check:",
        "      kind: send_expect",
        "      send: \"\"",
        "      expect_regex: '(?i)^220 .*smtp'",
    ]));
    let check = config.services[0].health_check.as_ref().unwrap();
    let Some(Expect::Regex(re)) = check.send_expect.as_ref().map(|se| &se.expect) else {
        panic!("expected a regex");
    };
    assert!(re.regex().is_match(b"220 mail.example ESMTP ready"));
}

#[test]
fn other_range_and_value_checks() {
    one_error(
        &minimal_with(&["    retries: 17"]),
        6,
        14,
        "services[0].retries: 17 is out of range: expected a whole number from 0 to 16",
    );
    one_error(
        &minimal_with(&["    max_connections: 0"]),
        6,
        22,
        "at least 1",
    );
    one_error(
        &minimal_with(&[
            "    ejection:",
            "      base_time: 1m",
            "      max_time: 30s",
        ]),
        8,
        17,
        "max_time 30s is shorter than base_time 1m",
    );
    one_error(
        &minimal_with(&["    ejection: {max_percent: 101}"]),
        6,
        29,
        "101 is out of range",
    );
    one_error(
        &["dataplane: {pin_path: lb}", "services: []"],
        1,
        23,
        "\"lb\" is not an absolute path",
    );
    one_error(
        &[
            "dataplane: {xdp: {interface: eth0, flow_table_size: 100}}",
            "services: []",
        ],
        1,
        53,
        "expected a whole number from 1024 to 67108864",
    );
    one_error(
        &["dataplane: {sockmap: {enabled: yes}}", "services: []"],
        1,
        32,
        "expected true or false, found \"yes\"",
    );
    one_error(
        &minimal_with(&["    health_check: {kind: tcp, address: \"127.0.0.1:80\"}"]),
        6,
        40,
        "has a port; this key takes only the IP (127.0.0.1); set the port with services[0].health_check.port",
    );
    one_error(
        &minimal_with(&["    health_check: {kind: http, path: healthz}"]),
        6,
        38,
        "\"healthz\" must start with /",
    );
    one_error(
        &minimal_with(&["    health_check: {kind: http, expect_status: 600}"]),
        6,
        47,
        "expected a whole number from 100 to 599",
    );
    one_error(
        &minimal_with(&["    name2: x"]),
        6,
        5,
        "did you mean \"name\"?",
    );
}

#[test]
fn duplicate_yaml_keys_and_documents() {
    one_error(
        &["services: []", "services: []"],
        2,
        1,
        "duplicate key \"services\" at the top level",
    );
    one_error(
        &["services: []", "---", "services: []"],
        2,
        1,
        "a second YAML document",
    );
}

#[test]
fn empty_file() {
    one_error(&[""], 1, 1, "the file is empty");
    one_error(&["admin:"], 1, 1, "no services: key");
}

#[test]
fn unreadable_file_is_reported_at_line_zero() {
    let ConfigErrors(errors) = load(Path::new("/nonexistent/lb.yaml")).unwrap_err();
    assert_eq!(errors.len(), 1);
    assert_eq!((errors[0].line, errors[0].column), (0, 0));
    assert_eq!(errors[0].file, "/nonexistent/lb.yaml");
    assert!(
        errors[0]
            .message
            .starts_with("cannot read the config file: "),
        "{}",
        errors[0]
    );
}

#[test]
fn errors_display_one_per_line_in_file_order() {
    let e = parse(
        &doc(&[
            "services:",
            "  - name: A",
            "    listen: nowhere",
            "    backends: []",
        ]),
        "lb.yaml",
    )
    .unwrap_err();
    let text = e.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("lb.yaml:2:11: services[0].name: \"A\" is not a valid name"));
    assert!(
        lines[1].starts_with("lb.yaml:3:13: services[0].listen: \"nowhere\" is not an address")
    );
    assert!(lines[2].starts_with("lb.yaml:4:15: services[0].backends: the list is empty"));
}

#[test]
fn cli_mode_override_is_checked() {
    let mut config = ok(MINIMAL);
    config
        .override_dataplane_mode(DataplaneMode::Proxy)
        .unwrap();
    assert_eq!(config.dataplane.mode, DataplaneMode::Proxy);
    let e = config
        .override_dataplane_mode(DataplaneMode::Xdp)
        .unwrap_err();
    assert!(e.to_string().starts_with("--dataplane xdp cannot be used with this config: dataplane mode xdp needs dataplane.xdp.interface"));
    assert_eq!(config.dataplane.mode, DataplaneMode::Proxy);
}

// ---- the files in config/ ----

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config")
}

#[test]
fn every_example_file_is_valid() {
    let mut seen = 0;
    for entry in std::fs::read_dir(config_dir()).expect("config/ directory next to the crate") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            load(&path).unwrap_or_else(|e| panic!("{} is not valid:\n{e}", path.display()));
            seen += 1;
        }
    }
    assert!(
        seen >= 5,
        "expected lb.yaml and the examples in {}",
        config_dir().display()
    );
}

#[test]
fn lb_yaml_shows_the_defaults() {
    let config = load(&config_dir().join("lb.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let defaults = ok(MINIMAL);
    assert_eq!(config.admin, Some(AdminConfig::default()));
    assert_eq!(config.dataplane, defaults.dataplane);
    assert_eq!(config.shutdown_timeout, defaults.shutdown_timeout);

    // The first service spells out every key with its default.
    let web = &config.services[0];
    let default = &defaults.services[0];
    assert_eq!(
        *web,
        ServiceConfig {
            name: web.name.clone(),
            listen: web.listen,
            backends: web.backends.clone(),
            health_check: web.health_check.clone(),
            ..default.clone()
        }
    );
    for backend in &web.backends {
        assert_eq!(backend.weight, BackendConfig::DEFAULT_WEIGHT);
        assert_eq!(backend.health_check, None);
    }
    let check = web.health_check.as_ref().unwrap();
    assert_eq!(check.kind, HealthCheckKind::Tcp);
    assert_eq!(check.interval, HealthCheckConfig::DEFAULT_INTERVAL);
    assert_eq!(check.timeout, HealthCheckConfig::DEFAULT_TIMEOUT);
    assert_eq!(check.rise, HealthCheckConfig::DEFAULT_RISE);
    assert_eq!(check.fall, HealthCheckConfig::DEFAULT_FALL);
    assert_eq!(
        check.jitter_percent,
        HealthCheckConfig::DEFAULT_JITTER_PERCENT
    );
    assert_eq!(check.initial_state, InitialState::default());
    assert_eq!((check.port, check.address), (None, None));

    let api = config.services.iter().find(|s| s.name == "api").unwrap();
    assert_eq!(
        api.health_check.as_ref().unwrap().http,
        Some(HttpCheck::default())
    );
    let cache = config.services.iter().find(|s| s.name == "cache").unwrap();
    let se = cache
        .health_check
        .as_ref()
        .unwrap()
        .send_expect
        .as_ref()
        .unwrap();
    assert_eq!(se.max_response, SendExpectCheck::DEFAULT_MAX_RESPONSE);
}

#[test]
fn lb_yaml_mentions_every_key() {
    use raw::{
        RawAdmin, RawBackend, RawConfig, RawDataplane, RawEjection, RawHealthCheck,
        RawHealthCheckOverride, RawService, RawSockmap, RawXdp, keys_of,
    };
    let text = std::fs::read_to_string(config_dir().join("lb.yaml")).unwrap();
    let sections = [
        keys_of::<RawConfig>(),
        keys_of::<RawAdmin>(),
        keys_of::<RawDataplane>(),
        keys_of::<RawXdp>(),
        keys_of::<RawSockmap>(),
        keys_of::<RawService>(),
        keys_of::<RawBackend>(),
        keys_of::<RawHealthCheck>(),
        keys_of::<RawHealthCheckOverride>(),
        keys_of::<RawEjection>(),
    ];
    for key in sections.into_iter().flatten() {
        assert!(
            text.contains(&format!("{key}:")),
            "config/lb.yaml does not document `{key}`"
        );
    }
}

#[test]
fn demo_yaml_is_what_the_demo_expects() {
    let config = load(&config_dir().join("demo.yaml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.admin.as_ref().map(|a| a.listen),
        Some(addr("127.0.0.1:9100"))
    );
    assert_eq!(config.dataplane.mode, DataplaneMode::Auto);
    let demo = &config.services[0];
    assert_eq!(
        (demo.name.as_str(), demo.listen),
        ("demo", addr("127.0.0.1:8080"))
    );
    assert_eq!(demo.algorithm, Algorithm::WeightedRoundRobin);
    let backends: Vec<(SocketAddr, u32)> = demo
        .backends
        .iter()
        .map(|b| (b.address, b.weight))
        .collect();
    assert_eq!(
        backends,
        [
            (addr("127.0.0.1:9001"), 1),
            (addr("127.0.0.1:9002"), 1),
            (addr("127.0.0.1:9003"), 1)
        ]
    );
    let check = demo.health_check.as_ref().unwrap();
    assert_eq!(
        (
            check.kind,
            check.interval,
            check.timeout,
            check.rise,
            check.fall
        ),
        (
            HealthCheckKind::Tcp,
            secs(1),
            Duration::from_millis(500),
            nz(1),
            nz(2)
        )
    );
    assert_eq!(demo.retries, 2);
}

#[test]
fn unquoted_ipv6_addresses_get_a_hint() {
    let text = "services:\n  - name: a\n    listen: [::1]:8080\n    backends:\n      - address: 127.0.0.1:1\n";
    let errors = parse(text, "v6.yaml").unwrap_err();
    let first = errors.0[0].to_string();
    assert!(first.starts_with("v6.yaml:3:"), "{first}");
    assert!(first.contains("quote IPv6 addresses"), "{first}");
}

// ---- values the kernel or the runtime would refuse (issue 14) ------------------------------

#[test]
fn keepalive_outside_the_kernels_range_is_refused() {
    for bad in ["10h", "500ms", "1ns", "1500ms"] {
        one_error(
            &minimal_with(&[&format!("    tcp_keepalive: {bad}")]),
            6,
            20,
            "whole seconds from 1s to 32767s",
        );
    }
    for good in ["1s", "60s", "9h6m7s"] {
        let config = ok(&minimal_with(&[&format!("    tcp_keepalive: {good}")]));
        assert!(config.services[0].tcp_keepalive.is_some(), "{good}");
    }
}

#[test]
fn a_duration_longer_than_a_year_is_refused_everywhere() {
    one_error(
        &minimal_with(&["    idle_timeout: 500000000000years"]),
        6,
        19,
        "365d",
    );
    one_error(&minimal_with(&["    connect_timeout: 366d"]), 6, 22, "365d");
    let config = ok(&minimal_with(&["    idle_timeout: 365d"]));
    assert_eq!(config.services[0].idle_timeout, secs(365 * 24 * 3600));
}

#[test]
fn a_backend_that_is_lbs_own_listener_is_refused() {
    // The service's own address.
    one_error(
        &[
            "services:",
            "  - name: web",
            "    listen: 127.0.0.1:8080",
            "    backends:",
            "      - address: 127.0.0.1:8080",
        ],
        5,
        18,
        "lb would connect to itself",
    );
    // Another service's wildcard listener, reached over loopback.
    one_error(
        &[
            "services:",
            "  - name: web",
            "    listen: 0.0.0.0:8080",
            "    backends:",
            "      - address: 127.0.0.1:19001",
            "  - name: api",
            "    listen: 127.0.0.1:8081",
            "    backends:",
            "      - address: 127.0.0.1:8080",
        ],
        9,
        18,
        "service \"web\"",
    );
    // Another host on the same port is fine.
    ok(&[
        "services:",
        "  - name: web",
        "    listen: 0.0.0.0:8080",
        "    backends:",
        "      - address: 10.0.0.11:8080",
    ]);
}

#[test]
fn non_unicast_backends_and_listeners_are_refused() {
    for (addr, what) in [
        ("255.255.255.255:80", "broadcast"),
        ("224.0.0.1:80", "multicast"),
        ("\"[ff02::1]:80\"", "multicast"),
    ] {
        one_error(
            &[
                "services:",
                "  - name: web",
                "    listen: 127.0.0.1:8080",
                "    backends:",
                &format!("      - address: {addr}"),
            ],
            5,
            18,
            what,
        );
    }
    one_error(
        &[
            "services:",
            "  - name: web",
            "    listen: 239.1.1.1:8080",
            "    backends:",
            "      - address: 127.0.0.1:19001",
        ],
        3,
        13,
        "multicast",
    );
    one_error(
        &[
            "services:",
            "  - name: web",
            "    listen: \"[::ffff:127.0.0.1]:8080\"",
            "    backends:",
            "      - address: 127.0.0.1:19001",
        ],
        3,
        13,
        "write it as IPv4: 127.0.0.1:8080",
    );
}

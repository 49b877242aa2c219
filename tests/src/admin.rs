//! The admin API from the test's side: lb started with an admin server on a free loopback port
//! ([`AdminLb`]), configs with the keys [`LbConfig`] does not write (weights, health checks,
//! ejection, tokens: YAML edits on its output), a tiny HTTP/1.1 client, `/status` as JSON and
//! `/metrics` parsed by a Prometheus text-format parser.

use std::{
    fs,
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    ops::{Deref, DerefMut},
    path::Path,
    time::{Duration, Instant},
};

use serde_yaml::{Mapping, Value};

use crate::lb::{Lb, LbConfig, free_addr};

/// How long one admin request may take.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// An HTTP response: status code, headers (names lowercased) and body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request (`Connection: close`, with `Content-Length`) and reads the whole response.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Response> {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    let raw = exchange(addr, &bytes)?;
    if let Some(e) = raw.write_error {
        return Err(e);
    }
    parse_response(&raw.response?)
}

/// `GET path`.
pub fn get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    request(addr, "GET", path, &[], b"")
}

/// `POST path` with an empty body, with `Authorization: Bearer TOKEN` when given.
pub fn post(addr: SocketAddr, path: &str, token: Option<&str>) -> io::Result<Response> {
    match token {
        Some(t) => {
            let auth = format!("Bearer {t}");
            request(addr, "POST", path, &[("Authorization", &auth)], b"")
        }
        None => request(addr, "POST", path, &[], b""),
    }
}

/// What [`exchange`] saw: whether writing the request worked, and what came back (to EOF).
#[derive(Debug)]
pub struct Exchange {
    pub write_error: Option<io::Error>,
    pub response: io::Result<Vec<u8>>,
}

/// Writes `bytes` as they are (a request, or garbage), then reads to EOF (at most 16 MiB,
/// each read bounded by [`HTTP_TIMEOUT`]). A write error does not stop the read: a server may
/// answer and close before taking the whole request.
pub fn exchange(addr: SocketAddr, bytes: &[u8]) -> io::Result<Exchange> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    let write_error = stream.write_all(bytes).err();
    let mut response = Vec::new();
    let read = (&mut stream).take(16 << 20).read_to_end(&mut response);
    let response = match read {
        Ok(_) => Ok(response),
        // A reset after a response still leaves the response.
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !response.is_empty() => {
            Ok(response)
        }
        Err(e) => Err(e),
    };
    Ok(Exchange {
        write_error,
        response,
    })
}

/// Parses an HTTP/1.x response (`Content-Length`, chunked, or to EOF).
pub fn parse_response(raw: &[u8]) -> io::Result<Response> {
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{what}: {:?}",
                String::from_utf8_lossy(&raw[..raw.len().min(200)])
            ),
        )
    };
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of the response head"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| bad("head is not UTF-8"))?;
    let rest = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    if !parts.next().unwrap_or_default().starts_with("HTTP/1.") {
        return Err(bad("not an HTTP/1 status line"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status code"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut response = Response {
        status,
        headers,
        body: Vec::new(),
    };
    response.body = if response
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        dechunk(rest).ok_or_else(|| bad("bad chunked body"))?
    } else if let Some(len) = response
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        if rest.len() < len {
            return Err(bad("body shorter than its Content-Length"));
        }
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(response)
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// The `/status` document.
#[derive(Debug, Clone)]
pub struct Status(pub serde_json::Value);

impl Status {
    /// The service named `name`; panics (showing the document) if there is none.
    pub fn service(&self, name: &str) -> &serde_json::Value {
        self.0["services"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == name))
            .unwrap_or_else(|| panic!("/status has no service {name:?}: {}", self.0))
    }

    /// The backend `addr` of service `service`; panics (showing the document) if there is none.
    pub fn backend(&self, service: &str, addr: SocketAddr) -> &serde_json::Value {
        self.try_backend(service, addr).unwrap_or_else(|| {
            panic!(
                "/status has no backend {addr} in service {service:?}: {}",
                self.0
            )
        })
    }

    pub fn try_backend(&self, service: &str, addr: SocketAddr) -> Option<&serde_json::Value> {
        let want = addr.to_string();
        self.service(service)["backends"]
            .as_array()?
            .iter()
            .find(|b| b["address"] == want.as_str())
    }

    /// `"up"`, `"down"` or `"draining"`.
    pub fn state(&self, service: &str, addr: SocketAddr) -> String {
        self.backend(service, addr)["state"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// A numeric field of a backend (`connections_total`, `bytes_to_backend`, ...).
    pub fn number(&self, service: &str, addr: SocketAddr, field: &str) -> u64 {
        self.backend(service, addr)[field]
            .as_u64()
            .unwrap_or_else(|| panic!("backend {addr} has no number {field:?}: {}", self.0))
    }

    /// The backends of `service` as (address, weight), in the order shown.
    pub fn backends(&self, service: &str) -> Vec<(String, u64)> {
        self.service(service)["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| {
                (
                    b["address"].as_str().unwrap_or_default().to_owned(),
                    b["weight"].as_u64().unwrap_or(u64::MAX),
                )
            })
            .collect()
    }
}

/// A `/metrics` scrape: its text and what the Prometheus text-format parser made of it.
#[derive(Debug)]
pub struct Metrics {
    pub text: String,
    pub scrape: prometheus_parse::Scrape,
}

impl Metrics {
    pub fn parse(text: String) -> Metrics {
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
            .unwrap_or_else(|e| panic!("/metrics does not parse: {e}\n{text}"));
        Metrics { text, scrape }
    }

    /// The value of the one sample named `name` whose labels are exactly `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = self.scrape.samples.iter().filter(|s| {
            s.metric == name
                && s.labels.len() == labels.len()
                && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        });
        let sample = found.next()?;
        assert!(
            found.next().is_none(),
            "/metrics has two samples {name}{labels:?}:\n{}",
            self.text
        );
        Some(match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}{labels:?} is not a plain number: {other:?}"),
        })
    }

    /// Like [`Metrics::value`], as an integer; panics (showing the scrape) if it is missing.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let v = self
            .value(name, labels)
            .unwrap_or_else(|| panic!("/metrics has no sample {name}{labels:?}:\n{}", self.text));
        assert!(
            v >= 0.0 && v.fract() == 0.0,
            "{name}{labels:?} = {v}, not a whole number"
        );
        v as u64
    }

    /// Every sample named `name`.
    pub fn samples(&self, name: &str) -> Vec<&prometheus_parse::Sample> {
        self.scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .collect()
    }
}

/// A running lb with an admin API. Derefs to [`Lb`].
pub struct AdminLb {
    pub lb: Lb,
    /// The admin API's address.
    pub admin: SocketAddr,
    /// The config it was started with, every listen address chosen.
    pub config: LbConfig,
}

impl Deref for AdminLb {
    type Target = Lb;
    fn deref(&self) -> &Lb {
        &self.lb
    }
}

impl DerefMut for AdminLb {
    fn deref_mut(&mut self) -> &mut Lb {
        &mut self.lb
    }
}

impl AdminLb {
    /// Starts lb with `config` (free ports for services without one), an admin API on a free
    /// loopback port, and `edit` applied to the YAML (see [`render`]). A port taken between the
    /// choice and lb's bind is chosen again (at most 3 times). Returns once every service
    /// listens and `/status` answers.
    pub fn start(config: &LbConfig, edit: impl Fn(&mut Value)) -> AdminLb {
        AdminLb::try_start(config, edit).unwrap_or_else(|(e, yaml)| {
            panic!(
                "lb did not start (exit status {:?}); stderr:\n{}\nconfig:\n{yaml}",
                e.status, e.stderr
            )
        })
    }

    /// Like [`AdminLb::start`], returning why lb did not start with the YAML it was given.
    pub fn try_start(
        config: &LbConfig,
        edit: impl Fn(&mut Value),
    ) -> Result<AdminLb, (crate::lb::StartError, String)> {
        let mut last = None;
        for _ in 0..3 {
            let config = with_listen_addresses(config);
            let admin = free_addr();
            let yaml = render(&config, Some(admin), &edit);
            match Lb::try_start(&yaml, &[]) {
                Ok(lb) => {
                    let lb = AdminLb { lb, admin, config };
                    lb.wait_for_admin(Duration::from_secs(10));
                    return Ok(lb);
                }
                Err(e) if e.status.is_some() && e.stderr.contains("cannot listen") => {
                    last = Some((e, yaml));
                }
                Err(e) => return Err((e, yaml)),
            }
        }
        Err(last.expect("tried at least once"))
    }

    /// Waits (bounded) until `GET /status` answers 200; panics with lb's stderr if not.
    pub fn wait_for_admin(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            match get(self.admin, "/status") {
                Ok(r) if r.status == 200 => return,
                other if Instant::now() >= deadline => panic!(
                    "the admin API at {} does not answer: {other:?}; lb stderr:\n{}",
                    self.admin,
                    self.lb.stderr()
                ),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// `GET /status`, parsed; panics if it fails.
    pub fn status(&self) -> Status {
        let r = get(self.admin, "/status")
            .unwrap_or_else(|e| panic!("GET /status on {}: {e}", self.admin));
        assert_eq!(r.status, 200, "GET /status: {}", r.text());
        Status(
            serde_json::from_slice(&r.body)
                .unwrap_or_else(|e| panic!("/status is not JSON ({e}): {}", r.text())),
        )
    }

    /// `GET /metrics`, parsed; panics if it fails.
    pub fn metrics(&self) -> Metrics {
        let r = get(self.admin, "/metrics")
            .unwrap_or_else(|e| panic!("GET /metrics on {}: {e}", self.admin));
        assert_eq!(r.status, 200, "GET /metrics: {}", r.text());
        Metrics::parse(r.text())
    }

    /// `POST path` (with the bearer token when given); panics if the request fails.
    pub fn post(&self, path: &str, token: Option<&str>) -> Response {
        post(self.admin, path, token)
            .unwrap_or_else(|e| panic!("POST {path} on {}: {e}", self.admin))
    }

    /// Polls `/status` (every 20 ms, at most `timeout`) until `cond` holds. Returns the
    /// status that satisfied it, or `Err` with the last one seen.
    pub fn wait_status(
        &self,
        timeout: Duration,
        mut cond: impl FnMut(&Status) -> bool,
    ) -> Result<Status, Status> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status();
            if cond(&status) {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `lb_reloads_total` as (ok, failed).
    pub fn reloads(&self) -> (u64, u64) {
        let m = self.metrics();
        (
            m.get("lb_reloads_total", &[("result", "ok")]),
            m.get("lb_reloads_total", &[("result", "failed")]),
        )
    }

    /// Replaces the config file (written aside, then renamed: lb never reads half a file).
    pub fn write_config(&self, yaml: &str) {
        write_atomically(self.lb.config_path(), yaml);
    }

    /// The YAML of `config` with this lb's admin address and `edit` applied.
    pub fn render(&self, config: &LbConfig, edit: impl Fn(&mut Value)) -> String {
        render(config, Some(self.admin), &edit)
    }
}

/// Writes `text` to `path` through a temporary file and a rename.
pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}

/// `config` with a free loopback address for each service that has none.
pub fn with_listen_addresses(config: &LbConfig) -> LbConfig {
    let mut config = config.clone();
    for s in &mut config.services {
        s.listen.get_or_insert_with(free_addr);
    }
    config
}

/// The YAML of `config` (its services must have listen addresses), with `admin.listen: ADMIN`
/// when given, then `edit` applied to the document.
pub fn render(config: &LbConfig, admin: Option<SocketAddr>, edit: &dyn Fn(&mut Value)) -> String {
    let mut doc: Value = serde_yaml::from_str(&config.yaml()).expect("LbConfig writes YAML");
    if let Some(admin) = admin {
        let mut a = Mapping::new();
        a.insert("listen".into(), admin.to_string().into());
        mapping(&mut doc).insert("admin".into(), Value::Mapping(a));
    }
    edit(&mut doc);
    serde_yaml::to_string(&doc).expect("YAML serialises")
}

/// Parses a YAML snippet (for [`set`]).
pub fn yaml(text: &str) -> Value {
    serde_yaml::from_str(text).unwrap_or_else(|e| panic!("YAML {text:?}: {e}"))
}

fn mapping(v: &mut Value) -> &mut Mapping {
    v.as_mapping_mut().expect("a YAML mapping")
}

/// The service named `name` in a config document.
pub fn service<'a>(doc: &'a mut Value, name: &str) -> &'a mut Mapping {
    mapping(doc)
        .get_mut("services")
        .and_then(Value::as_sequence_mut)
        .expect("services")
        .iter_mut()
        .filter_map(Value::as_mapping_mut)
        .find(|s| s.get("name").and_then(Value::as_str) == Some(name))
        .unwrap_or_else(|| panic!("no service {name:?} in the config"))
}

/// Sets `key` of service `name` to `value` (a YAML snippet).
pub fn set(doc: &mut Value, name: &str, key: &str, value: &str) {
    service(doc, name).insert(key.into(), yaml(value));
}

/// Sets a top-level key to `value` (a YAML snippet).
pub fn set_top(doc: &mut Value, key: &str, value: &str) {
    mapping(doc).insert(key.into(), yaml(value));
}

/// Sets the weights of service `name`'s backends, in order.
pub fn set_weights(doc: &mut Value, name: &str, weights: &[u32]) {
    let backends = service(doc, name)
        .get_mut("backends")
        .and_then(Value::as_sequence_mut)
        .expect("backends");
    assert_eq!(backends.len(), weights.len(), "one weight per backend");
    for (b, w) in backends.iter_mut().zip(weights) {
        mapping(b).insert("weight".into(), (*w).into());
    }
}

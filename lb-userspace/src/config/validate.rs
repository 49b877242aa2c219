//! Raw structs -> [`Config`]: every value checked, every default filled in, every problem kept.
//!
//! Each message starts with the path of the key it is about and says what would be right.
//! Checking goes on after a problem (a bad value is replaced by its default or a placeholder)
//! so that one run reports everything; any problem discards the result.

use std::collections::HashMap;
use std::fmt::Display;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use super::locate::{Problem, item, join};
use super::raw::{
    RawAdmin, RawBackend, RawConfig, RawDataplane, RawEjection, RawHealthCheck,
    RawHealthCheckOverride, RawService, RawXdp, Scalar, closest,
};
use super::types::{
    AdminConfig, BackendConfig, Config, DataplaneConfig, DataplaneMode, EjectionConfig, Expect,
    HealthCheckConfig, HealthCheckKind, HealthCheckOverride, HttpCheck, Keyword, ProxyProtocol,
    ResponseRegex, SendExpectCheck, ServiceConfig, SockmapConfig, XdpConfig,
};

/// Stands in for an address that failed its check; never leaves this module.
const PLACEHOLDER_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

/// Keys that only `kind: http` checks use.
const HTTP_KEYS: &[&str] = &["path", "expect_status", "host"];
/// Keys that only `kind: send_expect` checks use.
const SEND_EXPECT_KEYS: &[&str] = &[
    "send",
    "send_hex",
    "expect",
    "expect_hex",
    "expect_regex",
    "max_response",
];

pub(super) fn validate(raw: &RawConfig) -> Result<Config, Vec<Problem>> {
    let mut c = Checker::default();
    let admin = raw.admin.as_ref().map(|admin| c.admin(admin));
    let dataplane = c.dataplane(raw.dataplane.as_ref());
    let shutdown_timeout = c
        .duration("shutdown_timeout", raw.shutdown_timeout.as_ref())
        .unwrap_or(Config::DEFAULT_SHUTDOWN_TIMEOUT);
    let run_as = raw.run_as.as_ref().and_then(|_| {
        let name = c.text("run_as", raw.run_as.as_ref())?;
        let valid = !name.is_empty()
            && name.len() <= 32
            && name
                .chars()
                .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_' || ch == '-')
            && !name.starts_with('-');
        if !valid {
            c.problems.push(Problem::at_value(
                "run_as",
                format!("{name:?} is not a user name; use a system user such as nobody or lb"),
            ));
        }
        Some(name)
    });
    let services = match &raw.services {
        Some(services) => c.services(services, admin.as_ref()),
        None => {
            c.problems.push(Problem::at_value(
                "",
                "no services: key; add a list of services to balance (see config/lb.yaml), \
                 or `services: []` for none",
            ));
            Vec::new()
        }
    };
    for (path, message) in mode_conflicts(dataplane.mode, &dataplane, &services) {
        c.problems.push(Problem::at_value(&path, message));
    }
    if c.problems.is_empty() {
        Ok(Config {
            admin,
            dataplane,
            shutdown_timeout,
            run_as,
            services,
        })
    } else {
        Err(c.problems)
    }
}

/// What `mode` needs from the rest of the config, as (path to blame, message); shared with
/// [`Config::override_dataplane_mode`], so messages name keys in full and not the source of the
/// mode.
pub(super) fn mode_conflicts(
    mode: DataplaneMode,
    dataplane: &DataplaneConfig,
    services: &[ServiceConfig],
) -> Vec<(String, String)> {
    let mut conflicts = Vec::new();
    match mode {
        DataplaneMode::Xdp => {
            if dataplane.xdp.is_none() {
                conflicts.push((
                    "dataplane.mode".to_owned(),
                    "dataplane mode xdp needs dataplane.xdp.interface, the NIC to attach to \
                     (e.g. xdp: {interface: eth0}); it is not set"
                        .to_owned(),
                ));
            }
            for (i, service) in services.iter().enumerate() {
                if service.proxy_protocol != ProxyProtocol::Off {
                    let path = join(&item("services", i), "proxy_protocol");
                    conflicts.push((
                        path.clone(),
                        format!(
                            "{path} is {} but dataplane mode xdp forwards packets without \
                             terminating TCP, so it cannot send a PROXY header: use mode sockmap \
                             or proxy, or proxy_protocol: off",
                            service.proxy_protocol
                        ),
                    ));
                }
            }
        }
        DataplaneMode::Sockmap if dataplane.sockmap.refused() => conflicts.push((
            "dataplane.mode".to_owned(),
            "dataplane mode sockmap cannot run with dataplane.sockmap.enabled: false; remove \
             that line or set it to true"
                .to_owned(),
        )),
        _ => {}
    }
    conflicts
}

#[derive(Default)]
struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    /// A problem with the value at `path`; the message is prefixed with the path.
    fn error(&mut self, path: &str, message: impl Display) {
        self.problems
            .push(Problem::at_value(path, format!("{path}: {message}")));
    }

    /// A problem reported at the key of `path` rather than its value: a key that should not be
    /// there, or a section as a whole (`health_check:`; a list item's first line).
    fn key_error(&mut self, path: &str, message: impl Display) {
        self.problems
            .push(Problem::at_key(path, format!("{path}: {message}")));
    }

    /// The value of a key that must be set, or an error (at the section that lacks it) saying
    /// what to set it to.
    fn required<'r>(
        &mut self,
        path: &str,
        value: Option<&'r Scalar>,
        hint: &str,
    ) -> Option<&'r Scalar> {
        if value.is_none() {
            let message = format!("{path} is missing: {hint}");
            self.problems.push(Problem::at_key(parent(path), message));
        }
        value
    }

    // ---- scalars: `None` when absent or wrong (the error is recorded) ----

    fn text(&mut self, path: &str, value: Option<&Scalar>) -> Option<String> {
        match value? {
            Scalar::Str(s) => Some(s.clone()),
            other => {
                self.error(
                    path,
                    format!("expected text, found {other}; put it in quotes"),
                );
                None
            }
        }
    }

    fn boolean(&mut self, path: &str, value: Option<&Scalar>) -> Option<bool> {
        match value? {
            Scalar::Bool(b) => Some(*b),
            other => {
                self.error(path, format!("expected true or false, found {other}"));
                None
            }
        }
    }

    /// A whole number in `min..=max`; quoted digits are accepted too.
    fn number(&mut self, path: &str, value: Option<&Scalar>, min: u64, max: u64) -> Option<u64> {
        let value = value?;
        let expected = if max == u64::from(u32::MAX) || max == u64::MAX {
            format!("a whole number of at least {min}")
        } else {
            format!("a whole number from {min} to {max}")
        };
        let n = match value {
            Scalar::Int(n) => Some(*n),
            Scalar::Str(s) => s.trim().parse::<i128>().ok(),
            _ => None,
        };
        match n {
            Some(n) if n >= i128::from(min) && n <= i128::from(max) => u64::try_from(n).ok(),
            Some(n) => {
                self.error(path, format!("{n} is out of range: expected {expected}"));
                None
            }
            None => {
                self.error(path, format!("expected {expected}, found {value}"));
                None
            }
        }
    }

    fn u32_in(&mut self, path: &str, value: Option<&Scalar>, min: u32, max: u32) -> Option<u32> {
        self.number(path, value, min.into(), max.into())
            .and_then(|n| u32::try_from(n).ok())
    }

    fn u8_in(&mut self, path: &str, value: Option<&Scalar>, max: u8) -> Option<u8> {
        self.number(path, value, 0, max.into())
            .and_then(|n| u8::try_from(n).ok())
    }

    fn nonzero(&mut self, path: &str, value: Option<&Scalar>) -> Option<NonZeroU32> {
        self.u32_in(path, value, 1, u32::MAX)
            .and_then(NonZeroU32::new)
    }

    fn port(&mut self, path: &str, value: Option<&Scalar>) -> Option<u16> {
        self.number(path, value, 1, 65535)
            .and_then(|n| u16::try_from(n).ok())
    }

    fn keyword<T: Keyword>(&mut self, path: &str, value: Option<&Scalar>) -> Option<T> {
        match value? {
            Scalar::Str(s) => match s.parse::<T>() {
                Ok(v) => Some(v),
                Err(e) => {
                    match closest(s, T::NAMES) {
                        Some(near) => {
                            self.error(path, format_args!("{e} (did you mean {near:?}?)"))
                        }
                        None => self.error(path, e),
                    }
                    None
                }
            },
            other => {
                self.error(
                    path,
                    format!("expected one of: {}; found {other}", T::NAMES.join(", ")),
                );
                None
            }
        }
    }

    /// A positive duration written with a unit (`500ms`, `2s`, `1m30s`, `1h`).
    fn duration(&mut self, path: &str, value: Option<&Scalar>) -> Option<Duration> {
        let text = match value? {
            Scalar::Str(s) => s.trim(),
            Scalar::Int(n) if *n > 0 => {
                self.error(path, format!("{n} has no unit; write e.g. {n}s or {n}ms"));
                return None;
            }
            other => {
                let message = format!(
                    "expected a duration greater than zero such as 500ms, 2s or 1h, \
                     found {other}"
                );
                self.error(path, message);
                return None;
            }
        };
        if text.starts_with('-') {
            self.error(
                path,
                format!("{text:?} is negative; a duration must be greater than zero, e.g. 2s"),
            );
            return None;
        }
        match humantime::parse_duration(text) {
            Ok(d) if d.is_zero() => {
                self.error(
                    path,
                    format!("{text:?} is zero; a duration must be greater than zero, e.g. 2s"),
                );
                None
            }
            Ok(d) if d > MAX_DURATION => {
                self.error(
                    path,
                    format!(
                        "{text:?} is longer than lb accepts for any duration (365d); \
                         use at most 365d"
                    ),
                );
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                self.error(
                    path,
                    format!(
                        "{text:?} is not a duration ({e}); write a number and a unit, \
                         e.g. 500ms, 2s, 1m30s, 1h"
                    ),
                );
                None
            }
        }
    }

    /// A listen address TCP can bind: unicast, and IPv4 written as IPv4.
    fn listen_addr(&mut self, path: &str, addr: SocketAddr) -> Option<SocketAddr> {
        if let Some(what) = not_unicast(addr.ip()) {
            self.error(
                path,
                format!("{} is {what}; TCP listens on a unicast address", addr.ip()),
            );
            return None;
        }
        if let IpAddr::V6(v6) = addr.ip()
            && let Some(v4) = v6.to_ipv4_mapped()
        {
            self.error(
                path,
                format!(
                    "{} is an IPv4-mapped IPv6 address, which lb cannot listen on; \
                     write it as IPv4: {v4}:{}",
                    addr.ip(),
                    addr.port()
                ),
            );
            return None;
        }
        Some(addr)
    }

    /// A keepalive idle time the kernel takes: TCP_KEEPIDLE is whole seconds, 1..=32767 (a
    /// value outside makes every connect to a backend fail with EINVAL).
    fn keepalive_idle(&mut self, path: &str, d: Duration) -> Option<Duration> {
        let max = Duration::from_secs(MAX_KEEPALIVE_IDLE_SECS);
        if d < Duration::from_secs(1) || d > max || d.subsec_nanos() != 0 {
            self.error(
                path,
                format!(
                    "{} is not a keepalive idle time the kernel accepts: whole seconds from 1s \
                     to {MAX_KEEPALIVE_IDLE_SECS}s (9h6m7s), e.g. 60s; or off",
                    humantime::format_duration(d)
                ),
            );
            return None;
        }
        Some(d)
    }

    /// `IP:PORT`, never port 0; `example` shows a right value for this key.
    fn socket_addr(
        &mut self,
        path: &str,
        value: Option<&Scalar>,
        example: &str,
    ) -> Option<SocketAddr> {
        let text = match value? {
            Scalar::Str(s) => s.trim(),
            Scalar::Int(n) => {
                self.error(
                    path,
                    format!("{n} is only a port; an address needs an IP too, e.g. {example}"),
                );
                return None;
            }
            other => {
                self.error(
                    path,
                    format!("expected an address IP:PORT such as {example}, found {other}"),
                );
                return None;
            }
        };
        match parse_socket_addr(text, example) {
            Ok(addr) if addr.port() == 0 => {
                self.error(
                    path,
                    format!("port 0 is not allowed in {text}; give a fixed port, e.g. {example}"),
                );
                None
            }
            Ok(addr) => Some(addr),
            Err(why) => {
                self.error(path, why);
                None
            }
        }
    }

    /// An IP without a port; brackets around IPv6 are accepted.
    fn ip(&mut self, path: &str, value: Option<&Scalar>) -> Option<IpAddr> {
        let text = match value? {
            Scalar::Str(s) => s.trim(),
            other => {
                self.error(
                    path,
                    format!("expected an IP address such as 10.0.0.1 or ::1, found {other}"),
                );
                return None;
            }
        };
        let bare = text
            .strip_prefix('[')
            .and_then(|t| t.strip_suffix(']'))
            .unwrap_or(text);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Some(ip);
        }
        if let Ok(addr) = text.parse::<SocketAddr>() {
            let port_key = join(parent(path), "port");
            self.error(
                path,
                format!(
                    "{text:?} has a port; this key takes only the IP ({}); set the port with {}",
                    addr.ip(),
                    port_key
                ),
            );
        } else {
            self.error(
                path,
                format!(
                    "{text:?} is not an IP address; write one such as 10.0.0.1 or ::1 \
                     (names are not resolved)"
                ),
            );
        }
        None
    }

    // ---- sections ----

    fn admin(&mut self, raw: &RawAdmin) -> AdminConfig {
        let listen = self
            .socket_addr("admin.listen", raw.listen.as_ref(), "127.0.0.1:9100")
            .unwrap_or(AdminConfig::DEFAULT_LISTEN);
        let token_file = self
            .text("admin.token_file", raw.token_file.as_ref())
            .and_then(|t| {
                if t.trim().is_empty() {
                    self.error(
                        "admin.token_file",
                        "is empty; give the path of a file holding the token",
                    );
                    None
                } else {
                    Some(PathBuf::from(t))
                }
            });
        if !listen.ip().is_loopback() && raw.token_file.is_none() {
            // Worded as in the design notes; the path prefix is part of the sentence.
            let message = "admin.listen is not a loopback address: \
                           set admin.token_file so changing endpoints need a token";
            self.problems
                .push(Problem::at_value("admin.listen", message));
        }
        AdminConfig { listen, token_file }
    }

    fn dataplane(&mut self, raw: Option<&RawDataplane>) -> DataplaneConfig {
        let defaults = DataplaneConfig::default();
        let Some(raw) = raw else { return defaults };
        let mode = self
            .keyword("dataplane.mode", raw.mode.as_ref())
            .unwrap_or(defaults.mode);
        let pin_path = match self.text("dataplane.pin_path", raw.pin_path.as_ref()) {
            Some(p) if p.starts_with('/') => PathBuf::from(p),
            Some(p) => {
                self.error(
                    "dataplane.pin_path",
                    format!(
                        "{p:?} is not an absolute path; use a directory on bpffs \
                         such as /sys/fs/bpf/lb"
                    ),
                );
                defaults.pin_path
            }
            None => defaults.pin_path,
        };
        let xdp = raw.xdp.as_ref().map(|xdp| self.xdp(xdp));
        let sockmap = match &raw.sockmap {
            Some(raw) => SockmapConfig {
                enabled: self
                    .boolean("dataplane.sockmap.enabled", raw.enabled.as_ref())
                    .or(defaults.sockmap.enabled),
                promote_after_bytes: self
                    .number(
                        "dataplane.sockmap.promote_after_bytes",
                        raw.promote_after_bytes.as_ref(),
                        0,
                        u64::MAX,
                    )
                    .unwrap_or(defaults.sockmap.promote_after_bytes),
            },
            None => defaults.sockmap,
        };
        DataplaneConfig {
            mode,
            pin_path,
            xdp,
            sockmap,
        }
    }

    fn xdp(&mut self, raw: &RawXdp) -> XdpConfig {
        let path = "dataplane.xdp.interface";
        let interface = self
            .required(
                path,
                raw.interface.as_ref(),
                "set the NIC to attach to, e.g. interface: eth0",
            )
            .and_then(|v| self.text(path, Some(v)))
            .inspect(|name| {
                if let Err(why) = check_interface_name(name) {
                    self.error(path, why);
                }
            })
            .unwrap_or_default();
        let range = XdpConfig::FLOW_TABLE_SIZE_RANGE;
        XdpConfig {
            interface,
            attach: self
                .keyword("dataplane.xdp.attach", raw.attach.as_ref())
                .unwrap_or_default(),
            forwarding: self
                .keyword("dataplane.xdp.forwarding", raw.forwarding.as_ref())
                .unwrap_or_default(),
            flow_table_size: self
                .u32_in(
                    "dataplane.xdp.flow_table_size",
                    raw.flow_table_size.as_ref(),
                    *range.start(),
                    *range.end(),
                )
                .unwrap_or(XdpConfig::DEFAULT_FLOW_TABLE_SIZE),
        }
    }

    fn services(&mut self, raw: &[RawService], admin: Option<&AdminConfig>) -> Vec<ServiceConfig> {
        let mut services = Vec::with_capacity(raw.len());
        let mut names: HashMap<String, usize> = HashMap::new();
        // Listeners seen so far: (what to call it, address).
        let mut listeners: Vec<(String, SocketAddr)> = Vec::new();
        if let Some(admin) = admin {
            listeners.push(("admin.listen".to_owned(), admin.listen));
        }
        for (i, raw) in raw.iter().enumerate() {
            let path = item("services", i);
            let (service, name_ok, listen_ok) = self.service(&path, raw);
            if name_ok {
                if let Some(&first) = names.get(&service.name) {
                    self.error(
                        &join(&path, "name"),
                        format!(
                            "{:?} is already the name of services[{first}]; \
                             service names must be unique",
                            service.name
                        ),
                    );
                } else {
                    names.insert(service.name.clone(), i);
                }
            }
            if listen_ok {
                let here = service.listen;
                if let Some((owner, there)) = listeners
                    .iter()
                    .find(|(_, there)| listens_clash(here, *there))
                {
                    let why = if here == *there {
                        String::new()
                    } else if there.ip().is_unspecified() {
                        format!(
                            " ({} takes every {} address on port {})",
                            there.ip(),
                            family(*there),
                            there.port()
                        )
                    } else {
                        format!(
                            " ({} takes every {} address on port {})",
                            here.ip(),
                            family(here),
                            here.port()
                        )
                    };
                    self.error(
                        &join(&path, "listen"),
                        format!(
                            "{here} clashes with {owner} {there}{why}; \
                             give each service its own port or address"
                        ),
                    );
                } else {
                    listeners.push((join(&path, "listen"), here));
                }
            }
            services.push(service);
        }
        // A backend that is one of lb's own listeners: each client connection would make lb
        // connect to itself, again and again, until it runs out of file descriptors.
        for (i, service) in services.iter().enumerate() {
            for (j, backend) in service.backends.iter().enumerate() {
                if let Some(owner) = services.iter().find(|s| reaches(s.listen, backend.address)) {
                    self.error(
                        &join(&item(&join(&item("services", i), "backends"), j), "address"),
                        format!(
                            "{} is where lb itself listens (service {:?}, listen {}): lb would \
                             connect to itself for every client; give the backend's own address",
                            backend.address, owner.name, owner.listen
                        ),
                    );
                }
            }
        }
        services
    }

    /// The service, and whether its name and listen address passed (for the cross-checks).
    fn service(&mut self, path: &str, raw: &RawService) -> (ServiceConfig, bool, bool) {
        let p = |key: &str| join(path, key);
        let name = self
            .required(
                &p("name"),
                raw.name.as_ref(),
                "give the service a name, e.g. name: web",
            )
            .and_then(|v| self.text(&p("name"), Some(v)));
        let name_ok = match &name {
            Some(name) => match check_service_name(name) {
                Ok(()) => true,
                Err(why) => {
                    self.error(&p("name"), why);
                    false
                }
            },
            None => false,
        };
        let listen = self
            .required(
                &p("listen"),
                raw.listen.as_ref(),
                "set the address clients connect to, e.g. listen: 0.0.0.0:8080",
            )
            .and_then(|v| self.socket_addr(&p("listen"), Some(v), "0.0.0.0:8080"))
            .and_then(|addr| self.listen_addr(&p("listen"), addr));

        let algorithm = self
            .keyword(&p("algorithm"), raw.algorithm.as_ref())
            .unwrap_or_default();
        let maglev_table_size =
            self.maglev_table_size(&p("maglev_table_size"), raw.maglev_table_size.as_ref());
        let health_check = raw
            .health_check
            .as_ref()
            .and_then(|check| self.health_check(&p("health_check"), check));
        let kind = raw
            .health_check
            .as_ref()
            .map(|_| health_check.as_ref().map(|c| c.kind));
        let backends = self.backends(&p("backends"), raw.backends.as_deref(), kind);
        let ejection = self.ejection(&p("ejection"), raw.ejection.as_ref());
        let tcp_keepalive = match &raw.tcp_keepalive {
            Some(Scalar::Bool(false)) => None,
            Some(Scalar::Str(s)) if s.trim() == "off" => None,
            other => self
                .duration(&p("tcp_keepalive"), other.as_ref())
                .and_then(|d| self.keepalive_idle(&p("tcp_keepalive"), d)),
        };
        let proxy_protocol = match &raw.proxy_protocol {
            // YAML 1.1 reads a bare `off` as false; take it as the user meant it.
            Some(Scalar::Bool(false)) => ProxyProtocol::Off,
            other => self
                .keyword(&p("proxy_protocol"), other.as_ref())
                .unwrap_or_default(),
        };
        let service = ServiceConfig {
            name: name.unwrap_or_default(),
            listen: listen.unwrap_or(PLACEHOLDER_ADDR),
            algorithm,
            maglev_table_size,
            backends,
            health_check,
            ejection,
            connect_timeout: self
                .duration(&p("connect_timeout"), raw.connect_timeout.as_ref())
                .unwrap_or(ServiceConfig::DEFAULT_CONNECT_TIMEOUT),
            retries: self
                .u32_in(
                    &p("retries"),
                    raw.retries.as_ref(),
                    0,
                    ServiceConfig::MAX_RETRIES,
                )
                .unwrap_or(ServiceConfig::DEFAULT_RETRIES),
            idle_timeout: self
                .duration(&p("idle_timeout"), raw.idle_timeout.as_ref())
                .unwrap_or(ServiceConfig::DEFAULT_IDLE_TIMEOUT),
            max_connections: self
                .nonzero(&p("max_connections"), raw.max_connections.as_ref())
                .unwrap_or(ServiceConfig::DEFAULT_MAX_CONNECTIONS),
            proxy_protocol,
            tcp_keepalive,
        };
        (service, name_ok, listen.is_some())
    }

    fn maglev_table_size(&mut self, path: &str, value: Option<&Scalar>) -> u32 {
        let range = ServiceConfig::MAGLEV_TABLE_SIZE_RANGE;
        let Some(size) = self.u32_in(path, value, *range.start(), *range.end()) else {
            return ServiceConfig::DEFAULT_MAGLEV_TABLE_SIZE;
        };
        let is_prime = |n: u32| crate::balance::is_prime(n as usize);
        if !is_prime(size) {
            let below = (*range.start()..size).rev().find(|&n| is_prime(n));
            let above = (size..=*range.end()).find(|&n| is_prime(n));
            let nearest: Vec<String> = below
                .into_iter()
                .chain(above)
                .map(|n| n.to_string())
                .collect();
            self.error(
                path,
                format!(
                    "{size} is not a prime number; Maglev needs a prime table size \
                     (nearest: {}; default 65537)",
                    nearest.join(" or ")
                ),
            );
        }
        size
    }

    /// `kind`: `None` when the service has no `health_check`; `Some(None)` when it has one whose
    /// kind is missing or wrong (kind-specific keys are then not judged).
    fn backends(
        &mut self,
        path: &str,
        raw: Option<&[RawBackend]>,
        kind: Option<Option<HealthCheckKind>>,
    ) -> Vec<BackendConfig> {
        let raw = match raw {
            Some([]) => {
                self.error(
                    path,
                    "the list is empty; give at least one backend, e.g. - address: 10.0.0.11:80",
                );
                return Vec::new();
            }
            Some(raw) => raw,
            None => {
                let message = format!(
                    "{path} is missing: give at least one backend, \
                     e.g. backends: [{{address: 10.0.0.11:80}}]"
                );
                self.problems.push(Problem::at_key(parent(path), message));
                return Vec::new();
            }
        };
        let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
        let mut backends = Vec::with_capacity(raw.len());
        for (j, raw) in raw.iter().enumerate() {
            let path = item(path, j);
            let p = |key: &str| join(&path, key);
            let address = self
                .required(
                    &p("address"),
                    raw.address.as_ref(),
                    "set the backend's IP:PORT, e.g. address: 10.0.0.11:80",
                )
                .and_then(|v| self.socket_addr(&p("address"), Some(v), "10.0.0.11:80"));
            if let Some(address) = address {
                if let Some(what) = not_unicast(address.ip()) {
                    self.error(
                        &p("address"),
                        format!(
                            "{} is {what}; a backend is one host: give its unicast IP",
                            address.ip()
                        ),
                    );
                } else if address.ip().is_unspecified() {
                    self.error(
                        &p("address"),
                        format!(
                            "{} means any address and cannot be connected to; \
                             give the backend's own IP",
                            address.ip()
                        ),
                    );
                } else if let Some(&first) = seen.get(&address) {
                    self.error(
                        &p("address"),
                        format!(
                            "{address} is already backend [{first}] of this service; \
                             list each backend once"
                        ),
                    );
                } else {
                    seen.insert(address, j);
                }
            }
            let weight = self
                .u32_in(
                    &p("weight"),
                    raw.weight.as_ref(),
                    0,
                    BackendConfig::MAX_WEIGHT,
                )
                .unwrap_or(BackendConfig::DEFAULT_WEIGHT);
            let health_check = raw.health_check.as_ref().and_then(|over| match kind {
                None => {
                    self.key_error(
                        &p("health_check"),
                        "per-backend health_check settings need a service-level health_check \
                         (which sets kind)",
                    );
                    None
                }
                Some(kind) => Some(self.health_check_override(&p("health_check"), over, kind)),
            });
            backends.push(BackendConfig {
                address: address.unwrap_or(PLACEHOLDER_ADDR),
                weight,
                health_check,
            });
        }
        backends
    }

    fn health_check(&mut self, path: &str, raw: &RawHealthCheck) -> Option<HealthCheckConfig> {
        let p = |key: &str| join(path, key);
        let kind = self
            .required(
                &p("kind"),
                raw.kind.as_ref(),
                &format!(
                    "say what the check does: kind: {}",
                    HealthCheckKind::NAMES.join(" | ")
                ),
            )
            .and_then(|v| self.keyword::<HealthCheckKind>(&p("kind"), Some(v)));
        let interval = self.duration(&p("interval"), raw.interval.as_ref());
        let timeout = self.duration(&p("timeout"), raw.timeout.as_ref());
        let interval_or_default = interval.unwrap_or(HealthCheckConfig::DEFAULT_INTERVAL);
        let timeout_or_default = timeout.unwrap_or(HealthCheckConfig::DEFAULT_TIMEOUT);
        let intervals_ok = (raw.interval.is_none() || interval.is_some())
            && (raw.timeout.is_none() || timeout.is_some());
        if intervals_ok && timeout_or_default >= interval_or_default {
            let blame = if raw.timeout.is_some() {
                p("timeout")
            } else {
                p("interval")
            };
            self.error(
                &blame,
                format!(
                    "timeout {} must be shorter than interval {}, \
                     so one check ends before the next starts",
                    humantime::format_duration(timeout_or_default),
                    humantime::format_duration(interval_or_default)
                ),
            );
        }
        let rise = self.nonzero(&p("rise"), raw.rise.as_ref());
        let fall = self.nonzero(&p("fall"), raw.fall.as_ref());
        let jitter_percent = self.u8_in(
            &p("jitter_percent"),
            raw.jitter_percent.as_ref(),
            HealthCheckConfig::MAX_JITTER_PERCENT,
        );
        let port = self.port(&p("port"), raw.port.as_ref());
        let address = self.ip(&p("address"), raw.address.as_ref());
        let initial_state = self
            .keyword(&p("initial_state"), raw.initial_state.as_ref())
            .unwrap_or_default();

        let kind = kind?;
        let given = [
            ("path", raw.path.is_some()),
            ("expect_status", raw.expect_status.is_some()),
            ("host", raw.host.is_some()),
            ("send", raw.send.is_some()),
            ("send_hex", raw.send_hex.is_some()),
            ("expect", raw.expect.is_some()),
            ("expect_hex", raw.expect_hex.is_some()),
            ("expect_regex", raw.expect_regex.is_some()),
            ("max_response", raw.max_response.is_some()),
        ];
        self.kind_specific_keys(path, kind, &given);
        let http = (kind == HealthCheckKind::Http).then(|| HttpCheck {
            path: self
                .http_path(&p("path"), raw.path.as_ref())
                .unwrap_or_else(|| HttpCheck::DEFAULT_PATH.to_owned()),
            expect_status: self
                .number(&p("expect_status"), raw.expect_status.as_ref(), 100, 599)
                .and_then(|n| u16::try_from(n).ok())
                .unwrap_or(HttpCheck::DEFAULT_EXPECT_STATUS),
            host: self.http_host(&p("host"), raw.host.as_ref()),
        });
        let send_expect = (kind == HealthCheckKind::SendExpect).then(|| {
            let send = self.send(path, raw.send.as_ref(), raw.send_hex.as_ref());
            let expect = self.expect(
                path,
                raw.expect.as_ref(),
                raw.expect_hex.as_ref(),
                raw.expect_regex.as_ref(),
            );
            if raw.send.is_none() && raw.send_hex.is_none() {
                self.key_error(
                    path,
                    "kind send_expect needs send (text) or send_hex (bytes in hex); \
                     use send: \"\" to only read a banner",
                );
            }
            if raw.expect.is_none() && raw.expect_hex.is_none() && raw.expect_regex.is_none() {
                self.key_error(
                    path,
                    "kind send_expect needs one of expect (text), expect_hex or expect_regex",
                );
            }
            let max_response = self
                .number(
                    &p("max_response"),
                    raw.max_response.as_ref(),
                    1,
                    SendExpectCheck::MAX_RESPONSE_LIMIT as u64,
                )
                .and_then(|n| usize::try_from(n).ok())
                .unwrap_or(SendExpectCheck::DEFAULT_MAX_RESPONSE);
            SendExpectCheck {
                send: send.unwrap_or_default(),
                expect: expect.unwrap_or(Expect::Bytes(Vec::new())),
                max_response,
            }
        });
        Some(HealthCheckConfig {
            kind,
            interval: interval_or_default,
            timeout: timeout_or_default,
            rise: rise.unwrap_or(HealthCheckConfig::DEFAULT_RISE),
            fall: fall.unwrap_or(HealthCheckConfig::DEFAULT_FALL),
            jitter_percent: jitter_percent.unwrap_or(HealthCheckConfig::DEFAULT_JITTER_PERCENT),
            port,
            address,
            initial_state,
            http,
            send_expect,
        })
    }

    fn health_check_override(
        &mut self,
        path: &str,
        raw: &RawHealthCheckOverride,
        kind: Option<HealthCheckKind>,
    ) -> HealthCheckOverride {
        let p = |key: &str| join(path, key);
        if let Some(kind) = kind {
            let given = [
                ("path", raw.path.is_some()),
                ("expect_status", raw.expect_status.is_some()),
                ("host", raw.host.is_some()),
                ("send", raw.send.is_some()),
                ("send_hex", raw.send_hex.is_some()),
                ("expect", raw.expect.is_some()),
                ("expect_hex", raw.expect_hex.is_some()),
                ("expect_regex", raw.expect_regex.is_some()),
            ];
            self.kind_specific_keys(path, kind, &given);
        }
        HealthCheckOverride {
            port: self.port(&p("port"), raw.port.as_ref()),
            address: self.ip(&p("address"), raw.address.as_ref()),
            path: self.http_path(&p("path"), raw.path.as_ref()),
            host: self.http_host(&p("host"), raw.host.as_ref()),
            expect_status: self
                .number(&p("expect_status"), raw.expect_status.as_ref(), 100, 599)
                .and_then(|n| u16::try_from(n).ok()),
            send: self.send(path, raw.send.as_ref(), raw.send_hex.as_ref()),
            expect: self.expect(
                path,
                raw.expect.as_ref(),
                raw.expect_hex.as_ref(),
                raw.expect_regex.as_ref(),
            ),
        }
    }

    /// Errors for keys of one kind written under a check of another; `given` says which
    /// kind-specific keys are set.
    fn kind_specific_keys(&mut self, path: &str, kind: HealthCheckKind, given: &[(&str, bool)]) {
        for (owner, keys) in [
            (HealthCheckKind::Http, HTTP_KEYS),
            (HealthCheckKind::SendExpect, SEND_EXPECT_KEYS),
        ] {
            if owner == kind {
                continue;
            }
            let set = given.iter().filter(|(key, set)| *set && keys.contains(key));
            for &(key, _) in set {
                self.key_error(
                    &join(path, key),
                    format!(
                        "only kind {owner} checks use {key}, and this check is kind {kind}; \
                         remove it or set kind: {owner}"
                    ),
                );
            }
        }
    }

    fn http_path(&mut self, path: &str, value: Option<&Scalar>) -> Option<String> {
        let text = self.text(path, value)?;
        if !text.starts_with('/') {
            self.error(path, format!("{text:?} must start with /, e.g. /healthz"));
        } else if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            self.error(
                path,
                format!("{text:?} has spaces or control characters; percent-encode them (%20)"),
            );
        }
        Some(text)
    }

    fn http_host(&mut self, path: &str, value: Option<&Scalar>) -> Option<String> {
        let text = self.text(path, value)?;
        if text.is_empty() || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            self.error(
                path,
                format!("{text:?} is not a host name; write e.g. host: example.com"),
            );
        }
        Some(text)
    }

    /// `send` or `send_hex` under `path` (at most one), as bytes.
    fn send(&mut self, path: &str, text: Option<&Scalar>, hex: Option<&Scalar>) -> Option<Vec<u8>> {
        if text.is_some() && hex.is_some() {
            self.key_error(&join(path, "send_hex"), "set send or send_hex, not both");
            return None;
        }
        if text.is_some() {
            return self.text(&join(path, "send"), text).map(String::into_bytes);
        }
        self.hex(&join(path, "send_hex"), hex)
    }

    /// `expect`, `expect_hex` or `expect_regex` under `path` (at most one).
    fn expect(
        &mut self,
        path: &str,
        text: Option<&Scalar>,
        hex: Option<&Scalar>,
        regex: Option<&Scalar>,
    ) -> Option<Expect> {
        let given: Vec<&str> = [
            ("expect", text),
            ("expect_hex", hex),
            ("expect_regex", regex),
        ]
        .into_iter()
        .filter_map(|(key, v)| v.map(|_| key))
        .collect();
        if given.len() > 1 {
            self.key_error(
                &join(path, given[1]),
                format!(
                    "set only one of expect, expect_hex and expect_regex (found {})",
                    given.join(" and ")
                ),
            );
            return None;
        }
        let bytes = if text.is_some() {
            self.text(&join(path, "expect"), text)
                .map(String::into_bytes)
        } else if hex.is_some() {
            self.hex(&join(path, "expect_hex"), hex)
        } else {
            let path = join(path, "expect_regex");
            let pattern = self.text(&path, regex)?;
            return match ResponseRegex::new(&pattern) {
                Ok(re) => Some(Expect::Regex(re)),
                Err(e) => {
                    self.error(
                        &path,
                        format!(
                            "{pattern:?} is not a valid regular expression: {}",
                            regex_reason(&e)
                        ),
                    );
                    None
                }
            };
        };
        let bytes = bytes?;
        if bytes.is_empty() {
            let key = if text.is_some() {
                "expect"
            } else {
                "expect_hex"
            };
            self.error(
                &join(path, key),
                "is empty, which every reply matches; to test only the connect use kind: tcp",
            );
            return None;
        }
        Some(Expect::Bytes(bytes))
    }

    fn hex(&mut self, path: &str, value: Option<&Scalar>) -> Option<Vec<u8>> {
        let text = match value? {
            Scalar::Str(s) => s.clone(),
            // `send_hex: 0102` reads as a number; its digits are still the hex the user wrote.
            Scalar::Int(n) if *n >= 0 => n.to_string(),
            other => {
                self.error(
                    path,
                    format!("expected hex digits in quotes, e.g. \"0d0a\", found {other}"),
                );
                return None;
            }
        };
        match decode_hex(&text) {
            Ok(bytes) => Some(bytes),
            Err(why) => {
                self.error(path, why);
                None
            }
        }
    }

    fn ejection(&mut self, path: &str, raw: Option<&RawEjection>) -> EjectionConfig {
        let defaults = EjectionConfig::default();
        let Some(raw) = raw else { return defaults };
        let p = |key: &str| join(path, key);
        let base_time = self.duration(&p("base_time"), raw.base_time.as_ref());
        let max_time = self.duration(&p("max_time"), raw.max_time.as_ref());
        let base_ok = raw.base_time.is_none() || base_time.is_some();
        let max_ok = raw.max_time.is_none() || max_time.is_some();
        let base_time = base_time.unwrap_or(defaults.base_time);
        let max_time = max_time.unwrap_or(defaults.max_time);
        if base_ok && max_ok && max_time < base_time {
            let blame = if raw.max_time.is_some() {
                p("max_time")
            } else {
                p("base_time")
            };
            self.error(
                &blame,
                format!(
                    "max_time {} is shorter than base_time {}; \
                     ejection starts at base_time and doubles up to max_time",
                    humantime::format_duration(max_time),
                    humantime::format_duration(base_time)
                ),
            );
        }
        EjectionConfig {
            consecutive_failures: self
                .u32_in(
                    &p("consecutive_failures"),
                    raw.consecutive_failures.as_ref(),
                    0,
                    u32::MAX,
                )
                .unwrap_or(defaults.consecutive_failures),
            base_time,
            max_time,
            max_percent: self
                .u8_in(&p("max_percent"), raw.max_percent.as_ref(), 100)
                .unwrap_or(defaults.max_percent),
        }
    }
}

/// The path of the section that holds `path`.
fn parent(path: &str) -> &str {
    path.rfind(['.', '[']).map_or("", |cut| &path[..cut])
}

/// `IP:PORT` (IPv6 in brackets), or why not, in words.
fn parse_socket_addr(text: &str, example: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        let with_port = SocketAddr::new(ip, 80);
        return Err(format!("{text:?} has no port; add one, e.g. {with_port}"));
    }
    if let Some(rest) = text.strip_prefix('[') {
        return match rest.split_once(']') {
            None => Err(format!(
                "{text:?} has no closing ]; write IPv6 addresses as [::1]:8080"
            )),
            Some((ip, after)) => {
                if ip.parse::<std::net::Ipv6Addr>().is_err() {
                    Err(format!(
                        "{ip:?} is not an IPv6 address; write e.g. [::1]:8080"
                    ))
                } else if after.is_empty() {
                    Err(format!(
                        "{text:?} has no port; add one after the ], e.g. [{ip}]:8080"
                    ))
                } else {
                    let port = after.trim_start_matches(':');
                    Err(format!("port {port:?} is not a number from 1 to 65535"))
                }
            }
        };
    }
    if text.matches(':').count() > 1 {
        return Err(format!(
            "{text:?}: put an IPv6 address in brackets before the port, e.g. [::1]:8080"
        ));
    }
    match text.rsplit_once(':') {
        Some((_, port)) if port.parse::<u16>().is_err() => Err(format!(
            "port {port:?} in {text:?} is not a number from 1 to 65535"
        )),
        Some(("", port)) => Err(format!(
            "{text:?} has no IP before the port; e.g. 0.0.0.0:{port} for every IPv4 address"
        )),
        Some((host, _)) => Err(format!(
            "{host:?} is not an IP address; lb does not resolve names, \
             so write an IP, e.g. {example}"
        )),
        None => Err(format!(
            "{text:?} is not an address; expected IP:PORT, e.g. {example}"
        )),
    }
}

/// The longest duration any key takes: far beyond any sensible timeout, and far from the
/// overflow of a clock reading plus a duration.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// The kernel's largest TCP_KEEPIDLE (`MAX_TCP_KEEPIDLE`).
const MAX_KEEPALIVE_IDLE_SECS: u64 = 32767;

/// Whether a connection to `backend` lands on a socket listening on `listen` (the same address,
/// or a loopback address on the port of a wildcard listener of the same family).
fn reaches(listen: SocketAddr, backend: SocketAddr) -> bool {
    listen == backend
        || (listen.port() == backend.port()
            && listen.is_ipv4() == backend.is_ipv4()
            && listen.ip().is_unspecified()
            && backend.ip().is_loopback())
}

/// Why `ip` cannot be a unicast peer: multicast or broadcast.
fn not_unicast(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        IpAddr::V4(v4) if v4.is_multicast() => Some("a multicast address"),
        IpAddr::V6(v6) if v6.is_multicast() => Some("a multicast address"),
        _ => None,
    }
}

/// Two listeners that cannot both bind: same port and family, and the same IP or either one
/// unspecified. (`[::]` is taken as IPv6-only, so it does not clash with IPv4 listeners.)
fn listens_clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn family(addr: SocketAddr) -> &'static str {
    if addr.is_ipv4() { "IPv4" } else { "IPv6" }
}

fn check_service_name(name: &str) -> Result<(), String> {
    let valid_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-';
    if !name.is_empty() && name.len() <= 32 && name.chars().all(valid_char) {
        return Ok(());
    }
    let suggestion: String = name
        .to_lowercase()
        .chars()
        .map(|c| if valid_char(c) { c } else { '-' })
        .take(32)
        .collect();
    let mut why =
        format!("{name:?} is not a valid name: use 1 to 32 characters from a-z, 0-9, _ and -");
    if !suggestion.is_empty() && suggestion != name {
        why.push_str(&format!(" (e.g. {suggestion:?})"));
    }
    Err(why)
}

/// Linux's rules for a network interface name (`dev_valid_name`).
fn check_interface_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 || name == "." || name == ".." {
        return Err(format!(
            "{name:?} is not an interface name: use 1 to 15 bytes, e.g. eth0"
        ));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(format!(
            "{name:?} is not an interface name: no /, : or spaces; e.g. eth0"
        ));
    }
    Ok(())
}

/// Hex digits, optionally separated by whitespace (`"50 49 4e 47"`).
fn decode_hex(text: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<char> = text.chars().filter(|c| !c.is_whitespace()).collect();
    if let Some(bad) = digits.iter().find(|c| !c.is_ascii_hexdigit()) {
        return Err(format!(
            "{text:?} is not hex: {bad:?} is not one of 0-9, a-f; e.g. \"0d0a\""
        ));
    }
    if !digits.len().is_multiple_of(2) {
        return Err(format!(
            "{text:?} has an odd number of hex digits; each byte takes two, e.g. \"0d0a\""
        ));
    }
    Ok(digits
        .chunks(2)
        .map(|pair| {
            let hi = pair[0].to_digit(16).unwrap_or(0);
            let lo = pair[1].to_digit(16).unwrap_or(0);
            (hi * 16 + lo) as u8
        })
        .collect())
}

/// The regex crate's error on one line: its syntax errors are a small drawing that ends with
/// the line that says what is wrong.
fn regex_reason(e: &regex::Error) -> String {
    let text = e.to_string();
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    last.trim().trim_start_matches("error: ").to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clashes() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(listens_clash(a("0.0.0.0:80"), a("127.0.0.1:80")));
        assert!(listens_clash(a("127.0.0.1:80"), a("127.0.0.1:80")));
        assert!(!listens_clash(a("127.0.0.1:80"), a("127.0.0.2:80")));
        assert!(!listens_clash(a("127.0.0.1:80"), a("127.0.0.1:81")));
        assert!(listens_clash(a("[::]:80"), a("[::1]:80")));
        assert!(!listens_clash(a("[::]:80"), a("0.0.0.0:80")));
    }

    #[test]
    fn hex() {
        assert_eq!(decode_hex("50 49 4e 47 0d0A").unwrap(), b"PING\r\n");
        assert!(decode_hex("abc").unwrap_err().contains("odd number"));
        assert!(decode_hex("zz").unwrap_err().contains("not hex"));
    }

    #[test]
    fn addresses_explain_what_is_wrong() {
        let why = |s: &str| parse_socket_addr(s, "10.0.0.1:80").unwrap_err();
        assert!(why("10.0.0.1").contains("has no port"));
        assert!(why("::1").contains("has no port"));
        assert!(why("2001:db8::x:80").contains("brackets"));
        // A valid IPv6 address (its last group is 8080), so it is the port that is missing.
        assert!(why("::1:8080").contains("has no port; add one, e.g. [::1:8080]:80"));
        assert!(why("[::1]").contains("has no port"));
        assert!(why("[::1").contains("no closing ]"));
        assert!(why("10.0.0.1:http").contains("not a number"));
        assert!(why("10.0.0.1:70000").contains("not a number"));
        assert!(why("backend.local:80").contains("does not resolve names"));
        assert!(why(":80").contains("no IP"));
        assert!(why("nonsense").contains("expected IP:PORT"));
        assert_eq!(
            parse_socket_addr("[::1]:8080", "").unwrap(),
            "[::1]:8080".parse().unwrap()
        );
    }

    #[test]
    fn regex_errors_fit_on_one_line() {
        let e = ResponseRegex::new("(abc").unwrap_err();
        assert_eq!(regex_reason(&e), "unclosed group");
    }
}

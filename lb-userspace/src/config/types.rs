//! The validated configuration: strong types only, every default filled in.
//!
//! Nothing here can be built from YAML except through [`super::parse`], so a value of these
//! types has passed every check in `validate.rs`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// A keyword that is not one of an enum's spellings; see each enum's `NAMES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownValue {
    /// What was given.
    pub value: String,
    /// Every accepted spelling, in documentation order.
    pub expected: &'static [&'static str],
}

impl fmt::Display for UnknownValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown value {:?}; expected one of: {}",
            self.value,
            self.expected.join(", ")
        )
    }
}

impl std::error::Error for UnknownValue {}

/// The enums below, for `validate.rs` to name the choices when a value is not even text.
pub(super) trait Keyword: FromStr<Err = UnknownValue> {
    const NAMES: &'static [&'static str];
}

/// A fieldless enum spelled in YAML (and on the command line) as lowercase keywords.
macro_rules! keyword_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        keywords! { $name { $( $variant => $text, )+ } }
    };
}

/// The spellings of an enum defined elsewhere (its owner, e.g. `balance::Algorithm`): the
/// config file, the CLI and `/status` use these.
macro_rules! keywords {
    ( $name:ident { $( $variant:ident => $text:literal, )+ } ) => {
        impl $name {
            /// Every spelling, in documentation order.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            /// The spelling used in the config file, the CLI and `/status`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( Self::$variant => $text, )+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Keyword for $name {
            const NAMES: &'static [&'static str] = $name::NAMES;
        }

        impl FromStr for $name {
            type Err = UnknownValue;

            fn from_str(s: &str) -> Result<Self, UnknownValue> {
                match s {
                    $( $text => Ok(Self::$variant), )+
                    _ => Err(UnknownValue { value: s.to_owned(), expected: Self::NAMES }),
                }
            }
        }
    };
}

keyword_enum! {
    /// Which dataplane carries traffic. `--dataplane` on the CLI overrides the file.
    #[derive(Default)]
    pub enum DataplaneMode {
        /// xdp if an interface is configured and loads, else sockmap if its self-test passes,
        /// else proxy.
        #[default]
        Auto => "auto",
        Xdp => "xdp",
        Sockmap => "sockmap",
        Proxy => "proxy",
    }
}

keyword_enum! {
    /// How the XDP program is attached to the NIC.
    #[derive(Default)]
    pub enum XdpAttach {
        /// Native (driver) mode if the driver supports it, else generic (skb) mode.
        #[default]
        Auto => "auto",
        Native => "native",
        Generic => "generic",
    }
}

keyword_enum! {
    /// How XDP forwards a packet to the backend.
    #[derive(Default)]
    pub enum Forwarding {
        /// Rewrite addresses both ways; replies come back through lb.
        #[default]
        Nat => "nat",
        /// Direct server return: only the MAC is rewritten; backends own the VIP and reply
        /// straight to the client.
        Dsr => "dsr",
    }
}

/// How a backend is chosen for a new connection: owned by `balance`, which implements it.
pub use crate::balance::Algorithm;

keywords! {
    Algorithm {
        RoundRobin => "round_robin",
        WeightedRoundRobin => "weighted_round_robin",
        LeastConnections => "least_connections",
        Random => "random",
        Maglev => "maglev",
        SourceHash => "source_hash",
    }
}

keyword_enum! {
    /// PROXY protocol header sent to the backend before the client's bytes.
    #[derive(Default)]
    pub enum ProxyProtocol {
        #[default]
        Off => "off",
        V1 => "v1",
        V2 => "v2",
    }
}

keyword_enum! {
    /// What an active health check does.
    pub enum HealthCheckKind {
        /// A TCP connect that succeeds within the timeout.
        Tcp => "tcp",
        /// An HTTP/1.1 GET whose status matches.
        Http => "http",
        /// Send bytes, read the reply, match it.
        SendExpect => "send_expect",
    }
}

keyword_enum! {
    /// A backend's state before its first check has finished.
    #[derive(Default)]
    pub enum InitialState {
        /// Like HAProxy: traffic flows at once; `fall` failures take it out.
        #[default]
        Up => "up",
        /// No traffic until `rise` checks pass.
        Down => "down",
    }
}

/// The whole file, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `None` when the file has no `admin:` section: no admin server.
    pub admin: Option<AdminConfig>,
    pub dataplane: DataplaneConfig,
    /// How long a stopping daemon lets connections drain before closing them.
    pub shutdown_timeout: Duration,
    /// The user to switch to once listeners are bound and eBPF is loaded (when started as
    /// root); `None` = keep the user lb was started as.
    pub run_as: Option<String>,
    /// In file order; names and listen addresses are unique.
    pub services: Vec<ServiceConfig>,
}

impl Config {
    pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

    /// Applies `lb run --dataplane MODE`, re-checking what the file's mode was checked for
    /// (e.g. `xdp` needs `dataplane.xdp.interface`).
    pub fn override_dataplane_mode(&mut self, mode: DataplaneMode) -> Result<(), ModeConflicts> {
        let conflicts: Vec<String> =
            super::validate::mode_conflicts(mode, &self.dataplane, &self.services)
                .into_iter()
                .map(|(_, message)| message)
                .collect();
        if conflicts.is_empty() {
            self.dataplane.mode = mode;
            Ok(())
        } else {
            Err(ModeConflicts { mode, conflicts })
        }
    }
}

/// Why `--dataplane MODE` cannot be used with this config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModeConflicts {
    pub mode: DataplaneMode,
    /// One sentence each, naming the config keys involved.
    pub conflicts: Vec<String>,
}

impl fmt::Display for ModeConflicts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "--dataplane {} cannot be used with this config: ",
            self.mode
        )?;
        f.write_str(&self.conflicts.join("; "))
    }
}

impl std::error::Error for ModeConflicts {}

/// The admin HTTP server (`/metrics`, `/status`, `/reload`, `/drain`).
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// A file holding the bearer token that `POST` endpoints require. Always set when `listen`
    /// is not a loopback address. Read at start-up, not by validation.
    pub token_file: Option<PathBuf>,
}

impl AdminConfig {
    pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9100);
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: Self::DEFAULT_LISTEN,
            token_file: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DataplaneConfig {
    pub mode: DataplaneMode,
    /// bpffs directory for pinned maps and links; always absolute.
    pub pin_path: PathBuf,
    /// `None`: no XDP (and `mode: auto` does not try it).
    pub xdp: Option<XdpConfig>,
    pub sockmap: SockmapConfig,
}

impl DataplaneConfig {
    pub const DEFAULT_PIN_PATH: &'static str = "/sys/fs/bpf/lb";
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        Self {
            mode: DataplaneMode::default(),
            pin_path: PathBuf::from(Self::DEFAULT_PIN_PATH),
            xdp: None,
            sockmap: SockmapConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct XdpConfig {
    /// A Linux interface name (1 to 15 bytes, no `/` or whitespace); existence is checked at
    /// attach time, not here.
    pub interface: String,
    pub attach: XdpAttach,
    pub forwarding: Forwarding,
    /// Entries in the pinned flow table (connections that keep their backend).
    pub flow_table_size: u32,
}

impl XdpConfig {
    pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 1 << 20;
    pub const FLOW_TABLE_SIZE_RANGE: std::ops::RangeInclusive<u32> = 1024..=(1 << 26);
}

#[derive(Debug, Clone, PartialEq)]
pub struct SockmapConfig {
    /// `dataplane.sockmap.enabled` as written: `Some(true)`: `mode: auto` may pick sockmap;
    /// `Some(false)`: it never runs (`mode: sockmap` is an error); `None` (the default): only
    /// an explicit `mode: sockmap` runs it. `auto` does not pick it unasked: its case over
    /// the proxy is not made yet (README, "Retransmits that overlap, and why `auto` still does
    /// not pick sockmap unasked").
    pub enabled: Option<bool>,
    /// Bytes relayed in userspace before the socket pair is handed to the kernel; 0 = at once.
    pub promote_after_bytes: u64,
}

impl SockmapConfig {
    /// Whether `mode: auto` may pick sockmap (only when `enabled: true` is written).
    pub fn auto_may_pick(&self) -> bool {
        self.enabled == Some(true)
    }

    /// Whether sockmap is switched off outright (`enabled: false` written).
    pub fn refused(&self) -> bool {
        self.enabled == Some(false)
    }

    /// Measured (docs/benchmarks.md): a short connection costs more to hand over than the
    /// kernel saves it, a long-lived chatty one gains; 64 KiB tells them apart.
    pub const DEFAULT_PROMOTE_AFTER_BYTES: u64 = 64 * 1024;
}

impl Default for SockmapConfig {
    fn default() -> Self {
        Self {
            enabled: None,
            promote_after_bytes: Self::DEFAULT_PROMOTE_AFTER_BYTES,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    /// Unique, `^[a-z0-9_-]{1,32}$`: used in metrics labels and admin URLs.
    pub name: String,
    /// Local socket (proxy, sockmap) or VIP:port (xdp). Never port 0.
    pub listen: SocketAddr,
    pub algorithm: Algorithm,
    /// A prime in 257..=1_000_003; used by maglev and source_hash.
    pub maglev_table_size: u32,
    /// At least one; addresses unique within the service.
    pub backends: Vec<BackendConfig>,
    /// `None`: no active checks; backends are up unless passively ejected.
    pub health_check: Option<HealthCheckConfig>,
    pub ejection: EjectionConfig,
    pub connect_timeout: Duration,
    /// Other backends tried after a failed connect (0..=16).
    pub retries: u32,
    pub idle_timeout: Duration,
    pub max_connections: NonZeroU32,
    pub proxy_protocol: ProxyProtocol,
    /// `None`: TCP keepalive off. Otherwise the idle time before the first probe.
    pub tcp_keepalive: Option<Duration>,
}

impl ServiceConfig {
    pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 65537;
    pub const MAGLEV_TABLE_SIZE_RANGE: std::ops::RangeInclusive<u32> = 257..=1_000_003;
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
    pub const DEFAULT_RETRIES: u32 = 2;
    pub const MAX_RETRIES: u32 = 16;
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
    pub const DEFAULT_MAX_CONNECTIONS: NonZeroU32 = NonZeroU32::new(10_000).unwrap();

    /// The check to run against `backend`: the service's check with the backend's overrides
    /// applied. `None` when the service has no active checks.
    pub fn health_check_for(&self, backend: &BackendConfig) -> Option<HealthCheckConfig> {
        let mut check = self.health_check.clone()?;
        let Some(over) = &backend.health_check else {
            return Some(check);
        };
        check.port = over.port.or(check.port);
        check.address = over.address.or(check.address);
        if let Some(http) = &mut check.http {
            if let Some(path) = &over.path {
                http.path.clone_from(path);
            }
            if over.host.is_some() {
                http.host.clone_from(&over.host);
            }
            if let Some(status) = over.expect_status {
                http.expect_status = status;
            }
        }
        if let Some(send_expect) = &mut check.send_expect {
            if let Some(send) = &over.send {
                send_expect.send.clone_from(send);
            }
            if let Some(expect) = &over.expect {
                send_expect.expect = expect.clone();
            }
        }
        Some(check)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    /// A connectable address: not unspecified, not port 0.
    pub address: SocketAddr,
    /// 0..=1000; 0 = drain (no new connections).
    pub weight: u32,
    /// Per-backend changes to the service's check; only keys that fit the service's
    /// `health_check.kind` are accepted.
    pub health_check: Option<HealthCheckOverride>,
}

impl BackendConfig {
    pub const DEFAULT_WEIGHT: u32 = 1;
    pub const MAX_WEIGHT: u32 = 1000;
}

/// Any subset of these replaces the service-level value for one backend; see
/// [`ServiceConfig::health_check_for`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HealthCheckOverride {
    pub port: Option<u16>,
    pub address: Option<IpAddr>,
    /// http only.
    pub path: Option<String>,
    /// http only.
    pub host: Option<String>,
    /// http only.
    pub expect_status: Option<u16>,
    /// send_expect only.
    pub send: Option<Vec<u8>>,
    /// send_expect only.
    pub expect: Option<Expect>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheckConfig {
    pub kind: HealthCheckKind,
    pub interval: Duration,
    /// Always below `interval`.
    pub timeout: Duration,
    /// Consecutive successes that mark a down backend up.
    pub rise: NonZeroU32,
    /// Consecutive failures that mark an up backend down.
    pub fall: NonZeroU32,
    /// Each interval is stretched or shrunk at random by up to this percentage (0..=50), so
    /// checks of many backends do not fire together.
    pub jitter_percent: u8,
    /// Check this port instead of the backend's.
    pub port: Option<u16>,
    /// Check this address instead of the backend's.
    pub address: Option<IpAddr>,
    pub initial_state: InitialState,
    /// `Some` exactly when `kind` is `Http`.
    pub http: Option<HttpCheck>,
    /// `Some` exactly when `kind` is `SendExpect`.
    pub send_expect: Option<SendExpectCheck>,
}

impl HealthCheckConfig {
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
    pub const DEFAULT_RISE: NonZeroU32 = NonZeroU32::new(2).unwrap();
    pub const DEFAULT_FALL: NonZeroU32 = NonZeroU32::new(3).unwrap();
    pub const DEFAULT_JITTER_PERCENT: u8 = 10;
    pub const MAX_JITTER_PERCENT: u8 = 50;

    /// Where to connect for a check of the backend at `backend`.
    pub fn target(&self, backend: SocketAddr) -> SocketAddr {
        SocketAddr::new(
            self.address.unwrap_or(backend.ip()),
            self.port.unwrap_or(backend.port()),
        )
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct HttpCheck {
    /// Starts with `/`; no whitespace or control characters.
    pub path: String,
    /// 100..=599.
    pub expect_status: u16,
    /// `Host:` header; `None` = the target address. No whitespace or control characters.
    pub host: Option<String>,
}

impl HttpCheck {
    pub const DEFAULT_PATH: &'static str = "/";
    pub const DEFAULT_EXPECT_STATUS: u16 = 200;
}

impl Default for HttpCheck {
    fn default() -> Self {
        Self {
            path: Self::DEFAULT_PATH.to_owned(),
            expect_status: Self::DEFAULT_EXPECT_STATUS,
            host: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SendExpectCheck {
    /// Sent after connecting; may be empty (read a banner).
    pub send: Vec<u8>,
    pub expect: Expect,
    /// Bytes read at most while waiting for a match (1..=65536).
    pub max_response: usize,
}

impl SendExpectCheck {
    pub const DEFAULT_MAX_RESPONSE: usize = 4096;
    pub const MAX_RESPONSE_LIMIT: usize = 65536;
}

/// What a send_expect reply must contain.
#[derive(Debug, Clone, PartialEq)]
pub enum Expect {
    /// The reply contains these bytes (never empty).
    Bytes(Vec<u8>),
    /// The reply matches this regular expression (searched, not anchored).
    Regex(ResponseRegex),
}

/// A compiled `regex::bytes::Regex`; equal when the patterns are.
#[derive(Debug, Clone)]
pub struct ResponseRegex(regex::bytes::Regex);

impl ResponseRegex {
    /// # Errors
    /// The pattern does not compile; the message says why.
    pub fn new(pattern: &str) -> Result<Self, regex::Error> {
        regex::bytes::Regex::new(pattern).map(Self)
    }

    pub fn regex(&self) -> &regex::bytes::Regex {
        &self.0
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl PartialEq for ResponseRegex {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

/// Passive ejection: take a backend out after consecutive failed connects, for a time that
/// doubles on each ejection from `base_time` up to `max_time`.
#[derive(Debug, Clone, PartialEq)]
pub struct EjectionConfig {
    /// 0 = passive ejection off.
    pub consecutive_failures: u32,
    pub base_time: Duration,
    /// Never below `base_time`.
    pub max_time: Duration,
    /// At most this share of a service's backends is ejected at once (0..=100).
    pub max_percent: u8,
}

impl Default for EjectionConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_time: Duration::from_secs(10),
            max_time: Duration::from_secs(300),
            max_percent: 50,
        }
    }
}

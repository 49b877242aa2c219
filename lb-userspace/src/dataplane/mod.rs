//! The dataplanes, and which one carries traffic.
//!
//! - `proxy`: the daemon relays bytes itself (splice through pooled pipes). Needs nothing.
//! - `xdp`: the XDP object's owner (load, pin, attach, maps, counters), and `vip`, which
//!   programs it from lb's state: VIP packets are balanced in the kernel before the stack.
//! - `sockmap`: the daemon connects, then the kernel (an `sk_skb` verdict program) relays the
//!   bytes of each socket pair; a start-up self-test proves it on this kernel first.
//!
//! `mode: auto` picks the best one that works and says which, and why not the others.

pub mod pipes;
pub mod proxy;
pub mod relay;
pub mod sockmap;
pub mod xdp;

use crate::config::{Config, DataplaneMode, ProxyProtocol};

/// The dataplane that carries traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Proxy,
    Sockmap,
    Xdp,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Proxy => "proxy",
            Kind::Sockmap => "sockmap",
            Kind::Xdp => "xdp",
        }
    }
}

/// The choice, the reasons for it (for the log and `/status`), and for xdp the attached
/// program.
#[derive(Debug)]
pub struct Choice {
    pub kind: Kind,
    /// Why each better dataplane was not used.
    pub passed_over: Vec<(&'static str, String)>,
    pub xdp: Option<xdp::vip::XdpRuntime>,
    /// The loaded sockmap program, in the sockmap dataplane.
    pub sockmap: Option<std::sync::Arc<sockmap::Sockmap>>,
    /// This instance's hold on `pin_path` (xdp and sockmap): kept while it serves.
    pub pin_lock: Option<PinLock>,
}

/// An exclusive flock(2) on the pin directory, held by the instance that serves with its pins.
/// Another `lb` that wants the same `pin_path` meanwhile is refused before it touches a pin; a
/// draining instance lets go (so a restart can start while the old process drains), and the
/// kernel lets go when the process dies.
#[derive(Debug)]
pub struct PinLock(
    #[expect(dead_code, reason = "held for its lock")] nix::fcntl::Flock<std::fs::File>,
);

impl PinLock {
    /// Creates `dir` (on a bpffs, see [`create_pin_dir`]) and locks it. `Ok(None)`: the
    /// directory cannot be made or opened here (no bpffs, no permission): the dataplane's own
    /// load then fails with the reason. `Err`: another lb holds it (the message says who).
    pub fn acquire(dir: &std::path::Path) -> Result<Option<PinLock>, String> {
        use nix::fcntl::{Flock, FlockArg};
        if let Err(e) = create_pin_dir(dir) {
            tracing::debug!(error = %e, "pin directory not created");
            return Ok(None);
        }
        let Ok(file) = std::fs::File::open(dir) else {
            return Ok(None);
        };
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(PinLock(lock))),
            Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
                let holder =
                    lock_holder(&file).map_or_else(String::new, |pid| format!(" (pid {pid})"));
                Err(format!(
                    "dataplane.pin_path {} is in use by another running lb{holder}; stop it \
                     first, or give this instance its own dataplane.pin_path",
                    dir.display()
                ))
            }
            Err((_, e)) => {
                tracing::debug!(error = %e, "pin directory not locked");
                Ok(None)
            }
        }
    }
}

/// The pid holding a flock on `file`, from /proc/locks (matched by inode).
fn lock_holder(file: &std::fs::File) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let ino = file.metadata().ok()?.ino();
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        // "1: FLOCK  ADVISORY  WRITE 1234 00:1e:5678 0 EOF"
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (kind, pid, id) = (fields.get(1)?, fields.get(4)?, fields.get(5)?);
        let line_ino: u64 = id.rsplit(':').next()?.parse().ok()?;
        (*kind == "FLOCK" && line_ino == ino).then(|| pid.parse().ok())?
    })
}

/// Errors choosing a dataplane.
#[derive(Debug, thiserror::Error)]
pub enum ChooseError {
    #[error("dataplane {mode} was asked for explicitly but is not available: {why}")]
    Unavailable { mode: &'static str, why: String },
    #[error("{0}")]
    PinPathInUse(String),
}

/// Where bpffs is mounted on a host that has one (systemd mounts it at boot).
const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Creates a pin directory on a bpffs, mode 0700 (maps hold connection and flow state).
///
/// Where `dir` is not on a bpffs (a fresh container, or `ip netns exec`, which remounts /sys
/// without one) and lies under /sys/fs/bpf, a bpffs is mounted there first, as bpftool and
/// Cilium do, while lb still has the capability; otherwise the error says what to run.
fn create_pin_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    let (on_bpffs, existing) = crate::sys::on_bpffs(dir)?;
    if !on_bpffs {
        let root = std::path::Path::new(BPFFS_ROOT);
        if dir.starts_with(root) && existing == root {
            crate::sys::mount_bpffs(root).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "{} is not on a bpffs, and mounting one on {BPFFS_ROOT} failed ({e}): \
                         run `mount -t bpf bpf {BPFFS_ROOT}` as root",
                        dir.display()
                    ),
                )
            })?;
            tracing::info!(
                at = BPFFS_ROOT,
                "no bpffs was mounted (a fresh container, or `ip netns exec`): mounted one"
            );
        } else {
            return Err(std::io::Error::other(format!(
                "{} is not on a bpffs: mount one with `mount -t bpf bpf {}`, or set \
                 dataplane.pin_path to a directory under a mounted bpffs",
                dir.display(),
                existing.display()
            )));
        }
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// XDP links a previous daemon pinned under `pin_path`: their programs are still attached.
fn leftover_links(config: &Config) -> Vec<String> {
    std::fs::read_dir(&config.dataplane.pin_path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("XDP_LINK_"))
        .collect()
}

/// Picks the dataplane for `config.dataplane.mode` (see [`choose_inner`]). When it is not
/// xdp, `fresh` removes what a previous xdp daemon pinned (detaching its program); without
/// `fresh` a program still attached that way is warned about: it would go on balancing its
/// VIPs' packets before this daemon sees them.
pub fn choose(config: &Config, fresh: bool) -> Result<Choice, ChooseError> {
    let choice = choose_inner(config, fresh)?;
    if choice.kind != Kind::Xdp && fresh {
        match xdp::remove_pins(&config.dataplane.pin_path) {
            Ok(removed) => {
                for path in removed {
                    tracing::info!(pin = %path.display(), "fresh start: removed");
                }
            }
            Err(e) => tracing::warn!("fresh start: {}", crate::sys::error_chain(&e)),
        }
    }
    if choice.kind != Kind::Xdp {
        for link in leftover_links(config) {
            tracing::warn!(
                link = %config.dataplane.pin_path.join(&link).display(),
                "an XDP program pinned by a previous daemon is still attached and balancing its VIPs; \
                 remove this pin (or start once in xdp mode with --fresh) to detach it"
            );
        }
    }
    Ok(choice)
}

/// Picks the dataplane for `config.dataplane.mode`; for xdp (explicit, or `auto` with an
/// interface configured) this loads and attaches the program (`fresh`: after removing what a
/// previous daemon pinned); for sockmap it loads the verdict program and runs the self-test.
fn choose_inner(config: &Config, fresh: bool) -> Result<Choice, ChooseError> {
    // Taken before any pin is touched, only where an eBPF dataplane is tried.
    let wants_pins = match config.dataplane.mode {
        DataplaneMode::Proxy => false,
        DataplaneMode::Xdp | DataplaneMode::Sockmap => true,
        DataplaneMode::Auto => {
            config.dataplane.xdp.is_some() || config.dataplane.sockmap.auto_may_pick()
        }
    };
    let pin_lock = if wants_pins {
        PinLock::acquire(&config.dataplane.pin_path).map_err(ChooseError::PinPathInUse)?
    } else {
        None
    };
    Ok(Choice {
        pin_lock,
        ..choose_mode(config, fresh)?
    })
}

/// [`choose_inner`] once `pin_path` is this instance's.
fn choose_mode(config: &Config, fresh: bool) -> Result<Choice, ChooseError> {
    let plain = |kind, passed_over| Choice {
        kind,
        passed_over,
        xdp: None,
        sockmap: None,
        pin_lock: None,
    };
    let with_sockmap = |sockmap, passed_over| Choice {
        sockmap: Some(sockmap),
        ..plain(Kind::Sockmap, passed_over)
    };
    let start_xdp =
        || xdp::vip::XdpRuntime::start(config, fresh).map_err(|e| crate::sys::error_chain(&e));
    match config.dataplane.mode {
        DataplaneMode::Proxy => Ok(plain(Kind::Proxy, Vec::new())),
        DataplaneMode::Xdp => match start_xdp() {
            Ok(rt) => Ok(Choice {
                xdp: Some(rt),
                ..plain(Kind::Xdp, Vec::new())
            }),
            Err(why) => Err(ChooseError::Unavailable { mode: "xdp", why }),
        },
        DataplaneMode::Sockmap => match start_sockmap(config) {
            Ok(sockmap) => Ok(with_sockmap(sockmap, Vec::new())),
            Err(why) => Err(ChooseError::Unavailable {
                mode: "sockmap",
                why,
            }),
        },
        DataplaneMode::Auto => {
            let xdp_why = if config.dataplane.xdp.is_none() {
                "no dataplane.xdp.interface is configured".to_owned()
            } else if config
                .services
                .iter()
                .any(|s| s.proxy_protocol != ProxyProtocol::Off)
            {
                "a service sends PROXY headers, which XDP cannot".to_owned()
            } else {
                match start_xdp() {
                    Ok(rt) => {
                        return Ok(Choice {
                            xdp: Some(rt),
                            ..plain(Kind::Xdp, Vec::new())
                        });
                    }
                    Err(why) => why,
                }
            };
            let sockmap_why = if config.dataplane.sockmap.auto_may_pick() {
                match start_sockmap(config) {
                    Ok(sockmap) => return Ok(with_sockmap(sockmap, vec![("xdp", xdp_why)])),
                    Err(why) => why,
                }
            } else if config.dataplane.sockmap.refused() {
                "dataplane.sockmap.enabled is false".to_owned()
            } else {
                "not picked unless dataplane.sockmap.enabled: true (opt-in: see the README, \
                 The sockmap dataplane)"
                    .to_owned()
            };
            Ok(plain(
                Kind::Proxy,
                vec![("xdp", xdp_why), ("sockmap", sockmap_why)],
            ))
        }
    }
}

/// A dataplane that takes connected pairs over from the proxy's accept path (sockmap hands them
/// to the kernel). The proxy accepts, picks, connects and writes the PROXY header, relays the
/// first [`Handover::after_bytes`] bytes itself, then gives the pair to
/// [`Handover::take_over`]: this is the one seam between them, and the proxy never names what
/// is behind it.
pub trait Handover: Send + Sync + std::fmt::Debug {
    /// Bytes (both ways) the proxy relays before the hand-over; 0: at once.
    fn after_bytes(&self) -> u64;

    /// Relays the pair until the connection ends. `relayed_before`: the bytes the proxy read
    /// from the client and from the backend before the hand-over.
    fn take_over<'a>(
        &'a self,
        client: tokio::net::TcpStream,
        backend: tokio::net::TcpStream,
        relayed_before: (u64, u64),
        cx: relay::Context<'a>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = relay::Outcome> + Send + 'a>>;
}

/// Set in the environment, the sockmap self-test fails on purpose (tests of the fallback).
pub const FORCE_SELFTEST_FAILURE: &str = "LB_SOCKMAP_SELFTEST_FAIL";

/// Loads the sockmap program and proves it on this kernel (see [`sockmap::Sockmap::self_test`]).
fn start_sockmap(config: &Config) -> Result<std::sync::Arc<sockmap::Sockmap>, String> {
    let sockets: u64 = config
        .services
        .iter()
        .map(|s| 2 * u64::from(s.max_connections.get()))
        .sum();
    let sockets = u32::try_from(sockets.clamp(4096, 1 << 22)).unwrap_or(1 << 22);
    let mut loaded = sockmap::Sockmap::load(&config.dataplane.pin_path, sockets)
        .map_err(|e| crate::sys::error_chain(&e))?;
    if std::env::var_os(FORCE_SELFTEST_FAILURE).is_some() {
        return Err(format!(
            "start-up self-test failed: forced by {FORCE_SELFTEST_FAILURE}"
        ));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the self-test runtime: {e}"))?;
    runtime
        .block_on(loaded.self_test())
        .map_err(|e| crate::sys::error_chain(&e))?;
    loaded
        .reset_counters()
        .map_err(|e| crate::sys::error_chain(&e))?;
    tracing::info!("sockmap self-test passed: exact bytes, half-close both ways, EOF");
    Ok(std::sync::Arc::new(loaded))
}

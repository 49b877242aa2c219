//! The dataplanes, and which one carries traffic.
//!
//! - `proxy`: the daemon relays bytes itself (splice through pooled pipes). Needs nothing.
//! - `xdp`: the XDP object's owner (load, pin, attach, maps, counters), and `vip`, which
//!   programs it from lb's state: VIP packets are balanced in the kernel before the stack.
//! - sockmap: not built yet.
//!
//! `mode: auto` picks the best one that works and says which, and why not the others.

pub mod pipes;
pub mod proxy;
pub mod relay;
pub mod vip;
pub mod xdp;

use crate::config::{Config, DataplaneMode, ProxyProtocol};

/// The dataplane that carries traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Proxy,
    Xdp,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Proxy => "proxy",
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
    pub xdp: Option<vip::XdpRuntime>,
}

/// Errors choosing a dataplane.
#[derive(Debug, thiserror::Error)]
pub enum ChooseError {
    #[error("dataplane {mode} was asked for explicitly but is not available: {why}")]
    Unavailable { mode: &'static str, why: String },
}

const SOCKMAP_NOT_BUILT: &str = "the sockmap dataplane is not implemented in this version";

/// The whole error chain on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
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
            Err(e) => tracing::warn!("fresh start: {}", chain(&e)),
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
/// previous daemon pinned).
fn choose_inner(config: &Config, fresh: bool) -> Result<Choice, ChooseError> {
    let proxy = |passed_over| Choice {
        kind: Kind::Proxy,
        passed_over,
        xdp: None,
    };
    let start_xdp = || vip::XdpRuntime::start(config, fresh).map_err(|e| chain(&e));
    match config.dataplane.mode {
        DataplaneMode::Proxy => Ok(proxy(Vec::new())),
        DataplaneMode::Xdp => match start_xdp() {
            Ok(rt) => Ok(Choice {
                kind: Kind::Xdp,
                passed_over: Vec::new(),
                xdp: Some(rt),
            }),
            Err(why) => Err(ChooseError::Unavailable { mode: "xdp", why }),
        },
        DataplaneMode::Sockmap => Err(ChooseError::Unavailable {
            mode: "sockmap",
            why: SOCKMAP_NOT_BUILT.to_owned(),
        }),
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
                        let passed_over = Vec::new();
                        return Ok(Choice {
                            kind: Kind::Xdp,
                            passed_over,
                            xdp: Some(rt),
                        });
                    }
                    Err(why) => why,
                }
            };
            Ok(proxy(vec![
                ("xdp", xdp_why),
                ("sockmap", SOCKMAP_NOT_BUILT.to_owned()),
            ]))
        }
    }
}

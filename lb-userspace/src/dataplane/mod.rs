//! The dataplanes, and which one carries traffic.
//!
//! - `proxy`: the daemon relays bytes itself (splice through pooled pipes). Needs nothing.
//! - `xdp`: the XDP object's owner (load, pin, attach, counters). Today it attaches the
//!   counting program; VIP balancing in the kernel is not built yet, so it never carries
//!   service traffic and `auto` does not pick it.
//! - sockmap: not built yet.
//!
//! `mode: auto` picks the best one that works and says which, and why not the others.

pub mod pipes;
pub mod proxy;
pub mod relay;
#[cfg_attr(
    not(test),
    expect(
        dead_code,
        reason = "the xdp dataplane wires this in; until then it is exercised on a veth by its test"
    )
)]
pub mod xdp;

use crate::config::DataplaneMode;

/// The dataplane that carries traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Proxy,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Proxy => "proxy",
        }
    }
}

/// The choice and the reasons for it, for the log and `/status`.
#[derive(Clone, Debug)]
pub struct Choice {
    pub kind: Kind,
    /// Why each better dataplane was not used.
    pub passed_over: Vec<(&'static str, String)>,
}

/// Errors choosing a dataplane.
#[derive(Debug, thiserror::Error)]
pub enum ChooseError {
    #[error("dataplane {mode} was asked for explicitly but is not available: {why}")]
    Unavailable { mode: &'static str, why: String },
}

const XDP_NOT_BUILT: &str = "VIP balancing in XDP is not implemented in this version";
const SOCKMAP_NOT_BUILT: &str = "the sockmap dataplane is not implemented in this version";

/// Picks the dataplane for `mode`.
pub fn choose(mode: DataplaneMode) -> Result<Choice, ChooseError> {
    match mode {
        DataplaneMode::Proxy => Ok(Choice {
            kind: Kind::Proxy,
            passed_over: Vec::new(),
        }),
        DataplaneMode::Auto => Ok(Choice {
            kind: Kind::Proxy,
            passed_over: vec![
                ("xdp", XDP_NOT_BUILT.to_owned()),
                ("sockmap", SOCKMAP_NOT_BUILT.to_owned()),
            ],
        }),
        DataplaneMode::Xdp => Err(ChooseError::Unavailable {
            mode: "xdp",
            why: XDP_NOT_BUILT.to_owned(),
        }),
        DataplaneMode::Sockmap => Err(ChooseError::Unavailable {
            mode: "sockmap",
            why: SOCKMAP_NOT_BUILT.to_owned(),
        }),
    }
}

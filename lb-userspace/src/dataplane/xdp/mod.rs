//! The XDP dataplane's userspace half: the one owner of the loaded XDP object and its maps.
//!
//! It loads the program embedded at build time, pins its maps under `pin_path` (reusing a
//! set already pinned there, so counters and the flow table survive a restart), attaches
//! the program to a NIC (native first, generic as a fallback), programs services, backends
//! and Maglev tables, and reads the per-CPU counters. Pinned maps stay for bpftool and for the
//! next start.
//!
//! Attachment, two ways:
//! - [`XdpDataplane::attach`]: a link owned by this process; dropping the [`XdpDataplane`]
//!   (or the process dying) detaches the program. For tests and tools.
//! - [`XdpDataplane::attach_pinned`], what the daemon uses: the XDP link is pinned under
//!   `pin_path` as `XDP_LINK_<mode>_<interface>`, so the program stays attached and keeps
//!   forwarding with the last programmed maps when the daemon exits, however it exits
//!   (SIGTERM, crash, `kill -9`). A daemon that starts and finds that pin replaces the
//!   program inside the link atomically (`BPF_LINK_UPDATE`): every packet meets either the
//!   old program or the new one, both reading the same pinned flow table, so no established
//!   flow notices the restart. Removing the pin (see [`remove_pins`]) detaches the program.
//!
//! No other module sees a map name or an `lb_common` struct: callers speak of VIPs
//! (`SocketAddr`), backend ids, forwarding modes and tables of backend ids.
//!
//! Pinned map sets carry their layout in `LB_META` (layout version and sizes). A set of
//! another layout is refused with [`XdpError::Layout`] unless the load asks for `fresh`,
//! which removes the old pins (and the flows in them) first. A failed load removes the
//! pins it created and leaves older ones alone.
//!
//! Kernel behaviour the callers rely on (see `lb-ebpf`):
//! - a flow stays on its backend while the backend is up or draining, whatever the tables
//!   do;
//! - a flow whose backend is down or removed is placed again, like a new one, on its next
//!   packet (so drain with [`BackendState::Draining`] or by leaving the backend out of the
//!   table, never by setting it down);
//! - a new flow starts at the slot the daemon's Maglev lookup starts at (the same SipHash
//!   of the client) and walks at most 16 slots to the first backend that is up.

mod neigh;
pub mod vip;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError, MapInfo, MapType, PerCpuArray},
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use lb_common::{
    BACKEND_DRAIN, BACKEND_UP, Backend, CFG_NAT_REPLIES, DropReason, Event, FAMILY_V4, FAMILY_V6,
    Flow, FlowKey, LAYOUT_VERSION, LbConfig, LbMeta, NatReply, PROTO_TCP, SVC_DSR, SVC_HASH_PORT,
    Service, ServiceKey, VipInfo, VipKey, XdpAction, XdpCounter, names,
};

use crate::config::Forwarding;

/// How the program was, or should be, attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// In the driver (`XDP_FLAGS_DRV_MODE`): fastest, needs driver support.
    Native,
    /// In the kernel's generic receive path (`XDP_FLAGS_SKB_MODE`): works on every NIC.
    Generic,
}

impl AttachMode {
    fn flags(self) -> XdpMode {
        match self {
            AttachMode::Native => XdpMode::Driver,
            AttachMode::Generic => XdpMode::Skb,
        }
    }
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
        })
    }
}

/// What a backend may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    /// New flows and established ones.
    Up,
    /// Established flows only (drain, weight 0, removal from the config): new flows walk
    /// past it in the Maglev table, as the daemon's lookup walks past a backend that is not
    /// eligible.
    #[allow(
        dead_code,
        reason = "part of the dataplane's API; the daemon does not drain through it yet, the tests do"
    )]
    Draining,
    /// Nothing: its established flows are placed again on their next packet (it is dead, so
    /// they are lost there anyway).
    Down,
}

/// What the client hash of a service covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientHash {
    /// Client ip and port (`maglev`).
    IpPort,
    /// Client ip only (`source_hash`): every connection of a client lands together.
    Ip,
}

/// Sizes of the map set, fixed when it is created (and checked when a pinned set is
/// reused).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpOptions {
    /// Slots reserved per service in the Maglev map: the largest table size of any service.
    pub maglev_stride: u32,
    /// Services (VIP:port pairs); service ids are `0..max_services`.
    pub max_services: u32,
    /// Backend ids are `0..max_backends`.
    pub max_backends: u32,
    /// Entries of the flow table and of the NAT reply table (LRU: the least recently used
    /// flows are forgotten when it is full).
    pub flow_table_size: u32,
    /// Remove a pinned map set of another layout or other sizes instead of refusing it.
    pub fresh: bool,
}

impl Default for XdpOptions {
    fn default() -> Self {
        Self {
            maglev_stride: 65_537,
            max_services: 16,
            max_backends: 4096,
            flow_table_size: 1 << 20,
            fresh: false,
        }
    }
}

/// Errors of the XDP dataplane.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("cannot create the pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the maps pinned in {pin_dir} have another layout ({why}); refusing to reuse them. \
         Start fresh to remove them (established flows are forgotten)"
    )]
    Layout { pin_dir: PathBuf, why: String },
    #[error("cannot remove the pinned map {path}")]
    Unpin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load the XDP object into the kernel")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("the XDP object has no {what} named {name}")]
    Missing {
        what: &'static str,
        name: &'static str,
    },
    #[error("the XDP program was rejected")]
    Program(#[source] Box<ProgramError>),
    #[error("cannot attach XDP to {interface} ({mode})")]
    Attach {
        interface: String,
        mode: AttachMode,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("cannot attach XDP to {interface}: native failed ({native}), generic failed")]
    AttachAny {
        interface: String,
        native: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("cannot {what} the pinned XDP link {path}")]
    Link {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot use map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("{what} {value} is out of range (at most {max})")]
    OutOfRange {
        what: &'static str,
        value: u64,
        max: u64,
    },
    #[error("service id {id} is already used by {other}")]
    ServiceIdInUse { id: u32, other: SocketAddr },
}

/// A backend as the map holds it (see [`XdpDataplane::programmed_backends`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgrammedBackend {
    pub id: u32,
    pub addr: SocketAddr,
    pub mac: [u8; 6],
    /// Up or draining: its flows are forwarded.
    pub up: bool,
}

/// Packets by verdict, drops by reason and flow events, each summed over all CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct XdpCounters {
    pub packets: Vec<(XdpAction, XdpCounter)>,
    pub drops: Vec<(DropReason, u64)>,
    pub events: Vec<(Event, u64)>,
}

#[allow(
    dead_code,
    reason = "part of the dataplane's API; the daemon does not read it yet, the tests do"
)]
impl XdpCounters {
    /// Packets and bytes that got `action`.
    pub fn packets(&self, action: XdpAction) -> XdpCounter {
        self.packets
            .iter()
            .find(|(a, _)| *a == action)
            .map_or_else(XdpCounter::default, |(_, c)| *c)
    }

    /// Packets dropped for `reason`.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }

    /// How often `event` happened.
    pub fn event(&self, event: Event) -> u64 {
        self.events
            .iter()
            .find(|(e, _)| *e == event)
            .map_or(0, |(_, n)| *n)
    }
}

/// Every map of the object, in the order they are checked and unpinned.
const MAP_NAMES: [&str; 11] = [
    names::XDP_STATS,
    names::XDP_DROPS,
    names::XDP_EVENTS,
    names::LB_VIPS,
    names::LB_SERVICES,
    names::LB_BACKENDS,
    names::LB_MAGLEV,
    names::LB_FLOWS,
    names::LB_NAT_REV,
    names::LB_CONFIG,
    names::LB_META,
];

/// The loaded XDP object, its typed maps and, once attached, its link.
pub struct XdpDataplane {
    ebpf: Ebpf,
    stats: PerCpuArray<MapData, XdpCounter>,
    drops: PerCpuArray<MapData, u64>,
    events: PerCpuArray<MapData, u64>,
    vips: HashMap<MapData, VipKey, VipInfo>,
    services: HashMap<MapData, ServiceKey, Service>,
    backends: Array<MapData, Backend>,
    maglev: Array<MapData, u32>,
    flows: HashMap<MapData, FlowKey, Flow>,
    config: Array<MapData, LbConfig>,
    meta: LbMeta,
    pin_dir: PathBuf,
    attached: Option<(String, AttachMode)>,
    /// The pinned link, when attached with [`XdpDataplane::attach_pinned`].
    pinned_link: Option<PathBuf>,
    /// Why native attach was refused, when `auto` fell back to generic.
    native_refused: Option<String>,
}

/// The object built by build.rs from `lb-ebpf`.
static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-xdp"));

impl XdpDataplane {
    /// Loads the XDP object, pinning its maps under `pin_dir` or reusing the set pinned
    /// there if it has this layout and these sizes.
    pub fn load(pin_dir: &Path, options: &XdpOptions) -> Result<Self, XdpError> {
        create_pin_dir(pin_dir)?;
        let meta = LbMeta {
            version: LAYOUT_VERSION,
            maglev_stride: options.maglev_stride,
            max_services: options.max_services,
            max_backends: options.max_backends,
            flow_table_size: options.flow_table_size,
            _pad: 0,
        };
        let maglev_entries = u64::from(meta.maglev_stride) * u64::from(meta.max_services);
        let maglev_entries = u32::try_from(maglev_entries).map_err(|_| XdpError::OutOfRange {
            what: "maglev_stride * max_services",
            value: maglev_entries,
            max: u64::from(u32::MAX),
        })?;
        let existing = check_layout(pin_dir, &meta, options.fresh)?;
        let loaded = load_object(pin_dir, &meta, maglev_entries);
        let result = loaded.and_then(|ebpf| Self::take_maps(ebpf, pin_dir, meta));
        if result.is_err() {
            // Leave the directory as it was: remove only the pins this attempt created.
            for name in MAP_NAMES {
                if !existing.contains(&name) {
                    let _ = std::fs::remove_file(pin_dir.join(name));
                }
            }
        }
        result
    }

    fn take_maps(mut ebpf: Ebpf, pin_dir: &Path, meta: LbMeta) -> Result<Self, XdpError> {
        let program: &mut Xdp = ebpf
            .program_mut(names::XDP_PROG)
            .ok_or(XdpError::Missing {
                what: "program",
                name: names::XDP_PROG,
            })?
            .try_into()
            .map_err(|e| XdpError::Program(Box::new(e)))?;
        program.load().map_err(|e| XdpError::Program(Box::new(e)))?;
        let mut meta_map: Array<MapData, LbMeta> = take(&mut ebpf, names::LB_META)?;
        meta_map.set(0, meta, 0).map_err(map_err(names::LB_META))?;
        let mut dataplane = Self {
            stats: take(&mut ebpf, names::XDP_STATS)?,
            drops: take(&mut ebpf, names::XDP_DROPS)?,
            events: take(&mut ebpf, names::XDP_EVENTS)?,
            vips: take(&mut ebpf, names::LB_VIPS)?,
            services: take(&mut ebpf, names::LB_SERVICES)?,
            backends: take(&mut ebpf, names::LB_BACKENDS)?,
            maglev: take(&mut ebpf, names::LB_MAGLEV)?,
            flows: take(&mut ebpf, names::LB_FLOWS)?,
            config: take(&mut ebpf, names::LB_CONFIG)?,
            ebpf,
            meta,
            pin_dir: pin_dir.to_owned(),
            attached: None,
            pinned_link: None,
            native_refused: None,
        };
        // A reused set may predate the last service change: derive the flags again.
        dataplane.sync_config_flags()?;
        Ok(dataplane)
    }

    /// Attaches to `interface`: in `mode`, or native then generic when `mode` is `None`.
    /// Returns the mode that took. The link is this process's: it goes when the process does.
    #[allow(
        dead_code,
        reason = "part of the dataplane's API; the daemon attaches through a pinned link, the tests this way"
    )]
    pub fn attach(
        &mut self,
        interface: &str,
        mode: Option<AttachMode>,
    ) -> Result<AttachMode, XdpError> {
        let (took, _) = self.attach_link(interface, mode)?;
        tracing::info!(interface, mode = %took, pin_dir = %self.pin_dir.display(), "XDP attached");
        self.attached = Some((interface.to_owned(), took));
        Ok(took)
    }

    fn attach_link(
        &mut self,
        interface: &str,
        mode: Option<AttachMode>,
    ) -> Result<(AttachMode, XdpLinkId), XdpError> {
        let program = self.program_mut()?;
        match mode {
            Some(mode) => program
                .attach(interface, mode.flags())
                .map(|id| (mode, id))
                .map_err(|source| XdpError::Attach {
                    interface: interface.to_owned(),
                    mode,
                    source: Box::new(source),
                }),
            // Never attached and dropping: a driver that refuses the program natively (no
            // native XDP, an MTU or queue layout it cannot run it with) gets it in generic
            // mode, which every device runs, and the log and `/status` say why.
            // veth runs native XDP as an emulation that copies each frame out of its skb and
            // loses the skb's checksum state: a locally sent or GRO-merged segment whose
            // checksum is left to offload (CHECKSUM_PARTIAL) goes out of XDP_TX with a
            // checksum nobody finishes, and the receiver drops it (bulk flows stall). Generic
            // mode keeps that state, and was measured faster on veth as well.
            None => {
                let why = if crate::sys::interface_driver(interface).is_ok_and(|d| d == "veth") {
                    let why = "a veth device: native XDP there drops the checksum-offload state \
                               of local and GRO-merged packets (their XDP_TX frames arrive with \
                               bad checksums); set attach: native to force it";
                    tracing::info!(interface, why, "attaching in generic mode");
                    why.to_owned()
                } else {
                    match program.attach(interface, AttachMode::Native.flags()) {
                        Ok(id) => return Ok((AttachMode::Native, id)),
                        Err(native) => {
                            let why = refusal(&native);
                            tracing::warn!(interface, why = %why, "native XDP refused; attaching in generic mode");
                            why
                        }
                    }
                };
                let attached = program
                    .attach(interface, AttachMode::Generic.flags())
                    .map(|id| (AttachMode::Generic, id))
                    .map_err(|source| XdpError::AttachAny {
                        interface: interface.to_owned(),
                        native: why.clone(),
                        source: Box::new(source),
                    });
                self.native_refused = Some(why);
                attached
            }
        }
    }

    /// Attaches to `interface` through a link pinned under the pin directory, so the program
    /// outlives this process (see the module docs). If a link for `interface` is pinned
    /// there already, the program in it is replaced atomically and the link keeps the mode
    /// it was attached in (a different `mode` asked for is logged and not applied: changing
    /// modes needs a detach, so a fresh start). A pinned link whose interface is gone is
    /// removed and a new one made. Returns the mode and whether a pinned link was reused.
    pub fn attach_pinned(
        &mut self,
        interface: &str,
        mode: Option<AttachMode>,
    ) -> Result<(AttachMode, bool), XdpError> {
        for existing in [AttachMode::Native, AttachMode::Generic] {
            let path = link_pin_path(&self.pin_dir, interface, existing);
            if !path.exists() {
                continue;
            }
            match self.replace_in_link(&path) {
                Ok(()) => {
                    if mode.is_some_and(|m| m != existing) {
                        tracing::warn!(interface, mode = %existing, "the pinned XDP link keeps its mode; start fresh to change it");
                    }
                    tracing::info!(interface, mode = %existing, link = %path.display(), "XDP program replaced in the pinned link");
                    self.attached = Some((interface.to_owned(), existing));
                    self.pinned_link = Some(path);
                    return Ok((existing, true));
                }
                // The interface went away (the link is defunct): make a new link.
                Err(XdpError::Program(e)) if is_errno(&e, nix::errno::Errno::ENOLINK as i32) => {
                    tracing::warn!(interface, link = %path.display(), "the pinned XDP link's interface is gone; attaching anew");
                    std::fs::remove_file(&path)
                        .map_err(|source| XdpError::Unpin { path, source })?;
                }
                Err(e) => return Err(e),
            }
        }
        let (took, id) = self.attach_link(interface, mode)?;
        let path = link_pin_path(&self.pin_dir, interface, took);
        let link = self
            .program_mut()?
            .take_link(id)
            .map_err(|e| XdpError::Program(Box::new(e)))?;
        // The link is dropped (so detached) on any error below.
        let fd_link = FdLink::try_from(link).map_err(|source| XdpError::Link {
            what: "pin (the kernel attached without a BPF link)",
            path: path.clone(),
            source: Box::new(source),
        })?;
        let _pinned: PinnedLink = fd_link.pin(&path).map_err(|source| XdpError::Link {
            what: "pin",
            path: path.clone(),
            source: Box::new(source),
        })?;
        tracing::info!(interface, mode = %took, link = %path.display(), "XDP attached through a pinned link");
        self.attached = Some((interface.to_owned(), took));
        self.pinned_link = Some(path);
        Ok((took, false))
    }

    /// Puts this object's program in the link pinned at `path` (`BPF_LINK_UPDATE`).
    fn replace_in_link(&mut self, path: &Path) -> Result<(), XdpError> {
        let pinned = PinnedLink::from_pin(path).map_err(|source| XdpError::Link {
            what: "open",
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|source| XdpError::Link {
            what: "use (not an XDP link)",
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        let program = self.program_mut()?;
        let id = program
            .attach_to_link(link)
            .map_err(|e| XdpError::Program(Box::new(e)))?;
        // The pin holds the link; this process's fd to it can go.
        drop(
            program
                .take_link(id)
                .map_err(|e| XdpError::Program(Box::new(e)))?,
        );
        Ok(())
    }

    /// Why native attach was refused, when `auto` attached in generic mode instead.
    pub fn native_refused(&self) -> Option<&str> {
        self.native_refused.as_deref()
    }

    fn program_mut(&mut self) -> Result<&mut Xdp, XdpError> {
        self.ebpf
            .program_mut(names::XDP_PROG)
            .ok_or(XdpError::Missing {
                what: "program",
                name: names::XDP_PROG,
            })?
            .try_into()
            .map_err(|e| XdpError::Program(Box::new(e)))
    }

    /// The source MAC of forwarded frames. Until it is set, the program uses the destination
    /// MAC of the frame it received (the interface's own, for frames addressed to it).
    pub fn set_interface_mac(&mut self, mac: [u8; 6]) -> Result<(), XdpError> {
        let mut cfg = self.config_value()?;
        cfg.iface_mac = mac;
        self.config
            .set(0, cfg, 0)
            .map_err(map_err(names::LB_CONFIG))
    }

    /// Adds or changes backend `id`: where it is (`addr`, for NAT), the MAC frames to it are
    /// sent to (its own or its next hop's), and whether it takes traffic. A backend that
    /// goes down loses its flows: each is placed again on its next packet. (`up: false` is
    /// [`BackendState::Down`]; to drain, see [`XdpDataplane::set_backend_state`].)
    pub fn set_backend(
        &mut self,
        id: u32,
        addr: SocketAddr,
        mac: [u8; 6],
        up: bool,
    ) -> Result<(), XdpError> {
        let state = if up {
            BackendState::Up
        } else {
            BackendState::Down
        };
        self.set_backend_state(id, addr, mac, state)
    }

    /// [`XdpDataplane::set_backend`] with the three states: a draining backend keeps its
    /// established flows and takes no new ones.
    pub fn set_backend_state(
        &mut self,
        id: u32,
        addr: SocketAddr,
        mac: [u8; 6],
        state: BackendState,
    ) -> Result<(), XdpError> {
        self.check_backend_id(id)?;
        let (addr_bytes, family) = ip_bytes(addr.ip());
        let backend = Backend {
            addr: addr_bytes,
            port: addr.port(),
            mac,
            flags: match state {
                BackendState::Up => BACKEND_UP,
                BackendState::Draining => BACKEND_UP | BACKEND_DRAIN,
                BackendState::Down => 0,
            },
            family,
            _pad: [0; 2],
        };
        self.backends
            .set(id, backend, 0)
            .map_err(map_err(names::LB_BACKENDS))
    }

    #[allow(
        dead_code,
        reason = "part of the dataplane's API; the daemon does not read it yet, the tests do"
    )]
    /// Removes backend `id`: its flows are placed again on their next packet. Tables that
    /// still name it skip it like a backend that is down.
    pub fn remove_backend(&mut self, id: u32) -> Result<(), XdpError> {
        self.check_backend_id(id)?;
        self.backends
            .set(id, Backend::default(), 0)
            .map_err(map_err(names::LB_BACKENDS))
    }

    /// The backends the map holds (id, address, MAC), those with an address: in a reused
    /// map set, what the previous daemon programmed, so a restarted one keeps the ids that
    /// established flows name.
    pub fn programmed_backends(&self) -> Result<Vec<ProgrammedBackend>, XdpError> {
        let mut out = Vec::new();
        for id in 0..self.meta.max_backends {
            let b = self
                .backends
                .get(&id, 0)
                .map_err(map_err(names::LB_BACKENDS))?;
            if let Some(ip) = addr_ip(&b.addr, b.family) {
                out.push(ProgrammedBackend {
                    id,
                    addr: SocketAddr::new(ip, b.port),
                    mac: b.mac,
                    up: b.flags & BACKEND_UP != 0,
                });
            }
        }
        Ok(out)
    }

    /// The sizes the pinned maps were made for: Maglev slots per service, services,
    /// backends.
    pub fn limits(&self) -> (u32, u32, u32) {
        (
            self.meta.maglev_stride,
            self.meta.max_services,
            self.meta.max_backends,
        )
    }

    /// The services the map holds: VIP and id.
    pub fn programmed_services(&self) -> Result<Vec<(SocketAddr, u32)>, XdpError> {
        self.services
            .iter()
            .map(|entry| {
                let (key, service) = entry.map_err(map_err(names::LB_SERVICES))?;
                Ok((key_addr(&key), service.id))
            })
            .collect()
    }

    fn check_backend_id(&self, id: u32) -> Result<(), XdpError> {
        if id >= self.meta.max_backends {
            return Err(XdpError::OutOfRange {
                what: "backend id",
                value: id.into(),
                max: u64::from(self.meta.max_backends) - 1,
            });
        }
        Ok(())
    }

    /// Adds or changes the service at `vip` (TCP): its `id` (which picks its segment of the
    /// Maglev map), forwarding, client hash, and Maglev table (one backend id per slot; the
    /// same bytes on every instance make every instance pick alike). An empty table drops
    /// new flows (`no_backend`). Established flows keep their backends.
    ///
    /// The table is written slot by slot before the service points at it, so a new service
    /// never sees a partial table; while an existing service's table is rewritten, a new
    /// flow may get a slot's old or new owner, both valid choices.
    pub fn set_service(
        &mut self,
        vip: SocketAddr,
        id: u32,
        forwarding: Forwarding,
        hash: ClientHash,
        table: &[u32],
    ) -> Result<(), XdpError> {
        if id >= self.meta.max_services {
            return Err(XdpError::OutOfRange {
                what: "service id",
                value: id.into(),
                max: u64::from(self.meta.max_services) - 1,
            });
        }
        if table.len() > self.meta.maglev_stride as usize {
            return Err(XdpError::OutOfRange {
                what: "Maglev table size",
                value: table.len() as u64,
                max: self.meta.maglev_stride.into(),
            });
        }
        if let Some(&bad) = table.iter().find(|&&b| b >= self.meta.max_backends) {
            self.check_backend_id(bad)?;
        }
        let key = service_key(vip);
        for other in self.services.iter() {
            let (other_key, other_service) = other.map_err(map_err(names::LB_SERVICES))?;
            if other_service.id == id && other_key != key {
                return Err(XdpError::ServiceIdInUse {
                    id,
                    other: key_addr(&other_key),
                });
            }
        }
        let table_off = id * self.meta.maglev_stride;
        for (slot, &backend) in table.iter().enumerate() {
            self.maglev
                .set(table_off + slot as u32, backend, 0)
                .map_err(map_err(names::LB_MAGLEV))?;
        }
        let mut flags = 0;
        if forwarding == Forwarding::Dsr {
            flags |= SVC_DSR;
        }
        if hash == ClientHash::IpPort {
            flags |= SVC_HASH_PORT;
        }
        let service = Service {
            id,
            flags,
            table_off,
            table_size: table.len() as u32,
        };
        self.services
            .insert(key, service, 0)
            .map_err(map_err(names::LB_SERVICES))?;
        self.sync_vip(vip.ip())?;
        self.sync_config_flags()
    }

    /// Removes the service at `vip`. Its packets pass to the local stack from now on.
    pub fn remove_service(&mut self, vip: SocketAddr) -> Result<(), XdpError> {
        match self.services.remove(&service_key(vip)) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(names::LB_SERVICES)(e)),
        }
        self.sync_vip(vip.ip())?;
        self.sync_config_flags()
    }

    /// Recounts the services on `ip` into the VIP address map.
    fn sync_vip(&mut self, ip: IpAddr) -> Result<(), XdpError> {
        let (addr, family) = ip_bytes(ip);
        let mut services = 0;
        for entry in self.services.keys() {
            let key = entry.map_err(map_err(names::LB_SERVICES))?;
            if key.addr == addr && key.family == family {
                services += 1;
            }
        }
        let key = VipKey {
            addr,
            family,
            _pad: [0; 3],
        };
        let result = if services == 0 {
            match self.vips.remove(&key) {
                Err(MapError::KeyNotFound) => Ok(()),
                other => other,
            }
        } else {
            self.vips.insert(key, VipInfo { services }, 0)
        };
        result.map_err(map_err(names::LB_VIPS))
    }

    /// Sets `CFG_NAT_REPLIES` exactly when some service uses NAT.
    fn sync_config_flags(&mut self) -> Result<(), XdpError> {
        let mut nat = false;
        for entry in self.services.iter() {
            let (_, service) = entry.map_err(map_err(names::LB_SERVICES))?;
            nat |= service.flags & SVC_DSR == 0;
        }
        let mut cfg = self.config_value()?;
        let flags = if nat {
            cfg.flags | CFG_NAT_REPLIES
        } else {
            cfg.flags & !CFG_NAT_REPLIES
        };
        if flags != cfg.flags {
            cfg.flags = flags;
            self.config
                .set(0, cfg, 0)
                .map_err(map_err(names::LB_CONFIG))?;
        }
        Ok(())
    }

    fn config_value(&self) -> Result<LbConfig, XdpError> {
        self.config.get(&0, 0).map_err(map_err(names::LB_CONFIG))
    }

    #[allow(
        dead_code,
        reason = "part of the dataplane's API; the daemon does not read it yet, the tests do"
    )]
    /// Flows in the flow table (walks the table: O(flows) syscalls).
    pub fn flow_count(&self) -> Result<usize, XdpError> {
        let mut count = 0;
        for key in self.flows.keys() {
            key.map_err(map_err(names::LB_FLOWS))?;
            count += 1;
        }
        Ok(count)
    }

    #[allow(
        dead_code,
        reason = "part of the dataplane's API; the daemon does not read it yet, the tests do"
    )]
    /// The backend id the flow `client -> vip` is placed on, if the flow table has it.
    pub fn lookup(&self, client: SocketAddr, vip: SocketAddr) -> Result<Option<u32>, XdpError> {
        let (src_addr, family) = ip_bytes(client.ip());
        let (dst_addr, _) = ip_bytes(vip.ip());
        let key = FlowKey {
            src_addr,
            dst_addr,
            src_port: client.port(),
            dst_port: vip.port(),
            proto: PROTO_TCP,
            family,
            _pad: [0; 2],
        };
        match self.flows.get(&key, 0) {
            Ok(flow) => Ok(Some(flow.backend_id)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(names::LB_FLOWS)(e)),
        }
    }

    /// Packets and bytes by verdict, drops by reason and flow events, summed over all CPUs.
    pub fn counters(&self) -> Result<XdpCounters, XdpError> {
        let packets = XdpAction::ALL
            .iter()
            .map(|&action| {
                let per_cpu = self
                    .stats
                    .get(&(action as u32), 0)
                    .map_err(map_err(names::XDP_STATS))?;
                let sum = per_cpu
                    .iter()
                    .fold(XdpCounter::default(), |acc, c| XdpCounter {
                        packets: acc.packets + c.packets,
                        bytes: acc.bytes + c.bytes,
                    });
                Ok((action, sum))
            })
            .collect::<Result<_, XdpError>>()?;
        let drops = DropReason::ALL
            .iter()
            .map(|&reason| {
                Ok((
                    reason,
                    sum_u64(&self.drops, reason as u32, names::XDP_DROPS)?,
                ))
            })
            .collect::<Result<_, XdpError>>()?;
        let events = Event::ALL
            .iter()
            .map(|&event| {
                Ok((
                    event,
                    sum_u64(&self.events, event as u32, names::XDP_EVENTS)?,
                ))
            })
            .collect::<Result<_, XdpError>>()?;
        Ok(XdpCounters {
            packets,
            drops,
            events,
        })
    }

    /// Runs the program on `frame` `repeat` times without attaching it (BPF_PROG_TEST_RUN):
    /// the verdict, the frame as the program left it, and the mean time per run. With
    /// `repeat > 1` each run sees the previous run's output.
    #[allow(dead_code, reason = "for BPF_PROG_TEST_RUN fixtures and cost figures")]
    pub fn run_frame(
        &mut self,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(u32, Vec<u8>, std::time::Duration), XdpError> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let mut out = vec![0u8; frame.len() + 256];
        let program = self.program_mut()?;
        // A long run is cut short (EINTR) when a signal arrives; the runs already made were
        // of the same frame, so running again only adds to the counters.
        let mut attempts = 0;
        let result = loop {
            let result = program.test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat,
                ..TestRunOptions::default()
            });
            match result {
                Err(ProgramError::SyscallError(e))
                    if e.io_error.kind() == std::io::ErrorKind::Interrupted && attempts < 10 =>
                {
                    attempts += 1;
                }
                other => break other.map_err(|e| XdpError::Program(Box::new(e)))?,
            }
        };
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out, result.duration))
    }
}

impl Drop for XdpDataplane {
    fn drop(&mut self) {
        // Links this process owns are detached when `ebpf` drops; a pinned one stays.
        match (&self.attached, &self.pinned_link) {
            (Some((interface, mode)), Some(link)) => tracing::info!(
                interface,
                %mode,
                link = %link.display(),
                "XDP program stays attached through its pinned link, forwarding with the last programmed maps"
            ),
            (Some((interface, mode)), None) => tracing::info!(interface, %mode, "XDP detached"),
            _ => {}
        }
    }
}

/// Where the link of the program on `interface`, attached in `mode`, is pinned.
pub fn link_pin_path(pin_dir: &Path, interface: &str, mode: AttachMode) -> PathBuf {
    pin_dir.join(format!("XDP_LINK_{mode}_{interface}"))
}

/// Removes everything lb pins in `pin_dir`: the maps (and the flows in them) and the XDP
/// links (which detaches their programs). For a start from clean state. Returns what was
/// removed.
pub fn remove_pins(pin_dir: &Path) -> Result<Vec<PathBuf>, XdpError> {
    let entries = match std::fs::read_dir(pin_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(XdpError::PinDir {
                path: pin_dir.to_owned(),
                source,
            });
        }
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| XdpError::PinDir {
            path: pin_dir.to_owned(),
            source,
        })?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if MAP_NAMES.contains(&name.as_ref()) || name.starts_with("XDP_LINK_") {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|source| XdpError::Unpin {
                path: path.clone(),
                source,
            })?;
            removed.push(path);
        }
    }
    Ok(removed)
}

/// Why the kernel refused to attach: the error with its causes, and what the errno means for
/// XDP (the driver's own message goes to netlink's extack, which a BPF link does not carry).
fn refusal(e: &ProgramError) -> String {
    use nix::errno::Errno;
    let text = crate::sys::error_chain(e);
    let hint = [
        (Errno::EOPNOTSUPP, "the driver has no native XDP"),
        (
            Errno::ERANGE,
            "the MTU (on a veth: its peer's) is too large for the driver's native XDP",
        ),
        (
            Errno::ENOSPC,
            "the driver lacks queues for native XDP (a veth: fewer rx queues than its peer has tx queues)",
        ),
        (
            Errno::EINVAL,
            "the driver cannot run this program natively in its present configuration (MTU, queues, offloads)",
        ),
        (Errno::EBUSY, "another XDP program is attached"),
        (Errno::EEXIST, "another XDP program is attached"),
    ]
    .into_iter()
    .find(|(errno, _)| is_errno(e, *errno as i32));
    match hint {
        Some((_, hint)) => format!("{text} ({hint})"),
        None => text,
    }
}

fn is_errno(e: &ProgramError, errno: i32) -> bool {
    matches!(e, ProgramError::SyscallError(e) if e.io_error.raw_os_error() == Some(errno))
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> XdpError {
    move |source| XdpError::Map {
        name,
        source: Box::new(source),
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, XdpError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(XdpError::Missing { what: "map", name })?;
    T::try_from(map).map_err(map_err(name))
}

fn sum_u64(map: &PerCpuArray<MapData, u64>, key: u32, name: &'static str) -> Result<u64, XdpError> {
    Ok(map.get(&key, 0).map_err(map_err(name))?.iter().sum())
}

/// Loads the object with every map pinned under `pin_dir` at the sizes of `meta`.
fn load_object(pin_dir: &Path, meta: &LbMeta, maglev_entries: u32) -> Result<Ebpf, XdpError> {
    let mut loader = EbpfLoader::new();
    for name in MAP_NAMES {
        loader.map_pin_path(name, pin_dir.join(name));
    }
    loader
        .map_max_entries(names::LB_VIPS, meta.max_services)
        .map_max_entries(names::LB_SERVICES, meta.max_services)
        .map_max_entries(names::LB_BACKENDS, meta.max_backends)
        .map_max_entries(names::LB_MAGLEV, maglev_entries)
        .map_max_entries(names::LB_FLOWS, meta.flow_table_size)
        .map_max_entries(names::LB_NAT_REV, meta.flow_table_size)
        .load(XDP_OBJECT)
        .map_err(|e| XdpError::Load(Box::new(e)))
}

/// Type, key size, value size and entries each map must have for `meta`.
fn expected_shape(name: &str, meta: &LbMeta) -> (MapType, usize, usize, u32) {
    use std::mem::size_of;
    let maglev = meta.maglev_stride.saturating_mul(meta.max_services);
    match name {
        names::XDP_STATS => (
            MapType::PerCpuArray,
            4,
            size_of::<XdpCounter>(),
            XdpAction::COUNT,
        ),
        names::XDP_DROPS => (MapType::PerCpuArray, 4, 8, DropReason::COUNT),
        names::XDP_EVENTS => (MapType::PerCpuArray, 4, 8, Event::COUNT),
        names::LB_VIPS => (
            MapType::Hash,
            size_of::<VipKey>(),
            size_of::<VipInfo>(),
            meta.max_services,
        ),
        names::LB_SERVICES => (
            MapType::Hash,
            size_of::<ServiceKey>(),
            size_of::<Service>(),
            meta.max_services,
        ),
        names::LB_BACKENDS => (MapType::Array, 4, size_of::<Backend>(), meta.max_backends),
        names::LB_MAGLEV => (MapType::Array, 4, 4, maglev),
        names::LB_FLOWS => (
            MapType::LruHash,
            size_of::<FlowKey>(),
            size_of::<Flow>(),
            meta.flow_table_size,
        ),
        names::LB_NAT_REV => (
            MapType::LruHash,
            size_of::<FlowKey>(),
            size_of::<NatReply>(),
            meta.flow_table_size,
        ),
        names::LB_CONFIG => (MapType::Array, 4, size_of::<LbConfig>(), 1),
        _ => (MapType::Array, 4, size_of::<LbMeta>(), 1),
    }
}

/// Checks the map set pinned in `pin_dir` (if any) against `want`: every pinned map must
/// have the expected type and sizes, and `LB_META` must be there with the same layout.
/// On a mismatch, `fresh` removes the pins; otherwise it is an error. Returns the names
/// that are (still) pinned.
fn check_layout(pin_dir: &Path, want: &LbMeta, fresh: bool) -> Result<Vec<&'static str>, XdpError> {
    let existing: Vec<&'static str> = MAP_NAMES
        .into_iter()
        .filter(|name| pin_dir.join(name).exists())
        .collect();
    if existing.is_empty() {
        return Ok(existing);
    }
    // Counters are not state: a counters map of another size (a build that counts more
    // verdicts, reasons or events) is replaced and its counts start again from zero, while
    // the flows and tables are kept. The program still attached keeps counting into the
    // old map until the new one replaces it. Only once the rest of the set is known to be
    // reused: a start refused for another reason leaves every pin as it was.
    let (stale, rest): (Vec<&'static str>, Vec<&'static str>) = existing
        .iter()
        .partition(|name| COUNTER_MAPS.contains(name) && shape_differs(pin_dir, name, want));
    let Err(why) = pinned_layout_matches(pin_dir, want, &rest) else {
        for name in stale {
            let path = pin_dir.join(name);
            tracing::warn!(map = name, pin = %path.display(), "pinned counters map of another size: replaced, its counts restart from zero (flows and tables are kept)");
            std::fs::remove_file(&path).map_err(|source| XdpError::Unpin { path, source })?;
        }
        return Ok(rest);
    };
    if !fresh {
        return Err(XdpError::Layout {
            pin_dir: pin_dir.to_owned(),
            why,
        });
    }
    tracing::warn!(pin_dir = %pin_dir.display(), %why, "removing pinned XDP maps of another layout");
    for name in existing {
        let path = pin_dir.join(name);
        std::fs::remove_file(&path).map_err(|source| XdpError::Unpin { path, source })?;
    }
    Ok(Vec::new())
}

/// The per-CPU counter maps, which [`check_layout`] may replace.
const COUNTER_MAPS: [&str; 3] = [names::XDP_STATS, names::XDP_DROPS, names::XDP_EVENTS];

/// Whether the map pinned as `name` has another type or size than `want` asks for (one that
/// cannot be read says so too).
fn shape_differs(pin_dir: &Path, name: &str, want: &LbMeta) -> bool {
    let Ok(info) = MapInfo::from_pin(pin_dir.join(name)) else {
        return true;
    };
    let (kind, key, value, entries) = expected_shape(name, want);
    info.map_type().ok() != Some(kind)
        || info.key_size() as usize != key
        || info.value_size() as usize != value
        || info.max_entries() != entries
}

fn pinned_layout_matches(pin_dir: &Path, want: &LbMeta, existing: &[&str]) -> Result<(), String> {
    if !existing.contains(&names::LB_META) {
        return Err(format!("no {} map", names::LB_META));
    }
    for &name in existing {
        let info = MapInfo::from_pin(pin_dir.join(name)).map_err(|e| format!("{name}: {e}"))?;
        let (kind, key, value, entries) = expected_shape(name, want);
        let found = (
            info.map_type().map_err(|e| format!("{name}: {e}"))?,
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
        );
        if found != (kind, key, value, entries) {
            return Err(format!(
                "{name} is {:?} with key {} B, value {} B, {} entries; expected {kind:?}, {key} B, {value} B, {entries}",
                found.0, found.1, found.2, found.3
            ));
        }
    }
    let data = MapData::from_pin(pin_dir.join(names::LB_META))
        .map_err(|e| format!("{}: {e}", names::LB_META))?;
    let meta: Array<MapData, LbMeta> =
        Array::try_from(Map::Array(data)).map_err(|e| format!("{}: {e}", names::LB_META))?;
    let found = meta
        .get(&0, 0)
        .map_err(|e| format!("{}: {e}", names::LB_META))?;
    if found != *want {
        return Err(format!(
            "layout version {} (stride {}, {} services, {} backends, {} flows); \
             this build wants version {} ({}, {}, {}, {})",
            found.version,
            found.maglev_stride,
            found.max_services,
            found.max_backends,
            found.flow_table_size,
            want.version,
            want.maglev_stride,
            want.max_services,
            want.max_backends,
            want.flow_table_size
        ));
    }
    Ok(())
}

/// An address as the maps hold it (IPv4-mapped IPv6 counts as IPv4, as on the wire).
fn ip_bytes(ip: IpAddr) -> ([u8; 16], u8) {
    let mut bytes = [0u8; 16];
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            bytes[..4].copy_from_slice(&v4.octets());
            (bytes, FAMILY_V4)
        }
        IpAddr::V6(v6) => (v6.octets(), FAMILY_V6),
    }
}

/// A map's address bytes as an address; `None` for an empty entry.
fn addr_ip(addr: &[u8; 16], family: u8) -> Option<IpAddr> {
    match family {
        FAMILY_V4 => Some(IpAddr::from([addr[0], addr[1], addr[2], addr[3]])),
        FAMILY_V6 => Some(IpAddr::from(*addr)),
        _ => None,
    }
}

fn service_key(vip: SocketAddr) -> ServiceKey {
    let (addr, family) = ip_bytes(vip.ip());
    ServiceKey {
        addr,
        port: vip.port(),
        proto: PROTO_TCP,
        family,
    }
}

fn key_addr(key: &ServiceKey) -> SocketAddr {
    let ip = if key.family == FAMILY_V4 {
        IpAddr::from([key.addr[0], key.addr[1], key.addr[2], key.addr[3]])
    } else {
        IpAddr::from(key.addr)
    };
    SocketAddr::new(ip, key.port)
}

/// Creates the pin directory (mode 0700: maps hold flow state) on a bpffs.
fn create_pin_dir(dir: &Path) -> Result<(), XdpError> {
    super::create_pin_dir(dir).map_err(|source| XdpError::PinDir {
        path: dir.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests;

//! The xdp dataplane at run time: programs the kernel's maps from lb's state and keeps them
//! current. Services become VIPs (their `listen` address), backends get stable ids (the ones a
//! reused map set holds, else the next free one in order of first appearance in the config),
//! each service gets a Maglev table, and a sync every second pushes health (up, draining,
//! ejected) and backend MACs into the backend map.
//!
//! In the kernel every new flow is placed by Maglev consistent hashing: `source_hash` services
//! hash the client IP, every other algorithm hashes client IP and port (a per-packet program
//! cannot count connections or keep a round-robin cursor). Weights shape the table.
//!
//! Backend MACs come from the kernel's neighbour tables of the XDP interface, read over
//! rtnetlink (one dump of IPv4 and IPv6 per sync; see [`super::neigh`]). The first time a
//! backend is seen lb adds a managed neighbour entry for it, which the kernel resolves at once
//! and keeps resolved; where it cannot (a kernel before 5.16, or a backend added by a reload,
//! when the daemon no longer holds CAP_NET_ADMIN), one UDP datagram to the backend per sync,
//! while its MAC is unknown, makes the kernel resolve it. Until a backend's MAC is known it is
//! programmed down. A MAC once known (or found in a reused map) is kept when the neighbour
//! entry ages out. Managed entries stay when backends leave and when the daemon exits (why:
//! [`super::neigh`]).
//!
//! Restarts: the program is attached through a link pinned under `pin_path`
//! ([`XdpDataplane::attach_pinned`]). When the daemon exits, on SIGTERM as on `kill -9`, the
//! program stays attached and keeps forwarding established and new flows with the last
//! programmed services, tables and backend states. Health checks stop with the daemon, so a
//! backend that dies meanwhile keeps its share of new flows until a daemon runs again; that
//! is the price of never cutting traffic during a restart or an upgrade, which for a load
//! balancer in front of everything is the safer side (detaching would send every VIP packet
//! to the local stack, which answers with resets). A daemon that starts again reuses the
//! pinned maps, takes back the backend and service ids they hold (so established flows keep
//! their backends even if the config's order changed), starts the backends it left up as up
//! (whatever `initial_state` says; health checks decide from there), removes services no
//! longer configured, and replaces the program in the pinned link without a gap. To take the
//! VIPs off the interface: remove the `XDP_LINK_*` pin, or start with `lb run --fresh`, which
//! removes every pin first (established flows are forgotten).

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use super::neigh::{Resolver, Table};
use super::{AttachMode, ClientHash, XdpCounters, XdpDataplane, XdpError, XdpOptions};
use crate::{
    balance::{Algorithm, Candidate, Selector},
    config::{Config, ServiceConfig, XdpAttach},
    state::Service,
};

/// Errors of the xdp runtime.
#[derive(Debug, thiserror::Error)]
pub enum VipError {
    #[error(transparent)]
    Xdp(#[from] XdpError),
    #[error("cannot read the MAC address of {interface}")]
    InterfaceMac {
        interface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot find the interface index of {interface}")]
    InterfaceIndex {
        interface: String,
        #[source]
        source: nix::Error,
    },
    #[error("service {service}: cannot build its Maglev table: {why}")]
    Table { service: String, why: String },
    #[error("more than {max} backends")]
    TooManyBackends { max: u32 },
    #[error("more than {max} services (the pinned maps' size; `lb run --fresh` resizes them)")]
    TooManyServices { max: u32 },
}

/// The loaded, attached XDP program and the ids lb gave backends.
pub struct XdpRuntime {
    dp: Mutex<XdpDataplane>,
    pub interface: String,
    pub mode: AttachMode,
    /// Why native attach was refused, when `attach: auto` fell back to generic.
    pub native_refused: Option<String>,
    forwarding: crate::config::Forwarding,
    ids: Mutex<HashMap<SocketAddr, u32>>,
    max_backends: u32,
    /// Service id per VIP: stable across reloads (the kernel refuses an id held by another VIP).
    service_ids: Mutex<HashMap<SocketAddr, u32>>,
    /// The last MAC known of each backend, for when its neighbour entry ages out.
    macs: Mutex<HashMap<SocketAddr, [u8; 6]>>,
    /// Reads the interface's neighbour table and keeps backends resolved.
    neighbours: Mutex<Resolver>,
    /// Backends a previous daemon left forwarding in reused maps; taken by the first
    /// [`XdpRuntime::program`].
    inherited_up: Mutex<Option<HashSet<SocketAddr>>>,
}

impl std::fmt::Debug for XdpRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdpRuntime")
            .field("interface", &self.interface)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl XdpRuntime {
    /// Loads (reusing pinned maps), attaches to `dataplane.xdp.interface` through a pinned
    /// link (replacing the program of one pinned there before) and sets the interface MAC.
    /// `fresh` removes every pin first. Needs CAP_BPF and CAP_NET_ADMIN.
    pub fn start(config: &Config, fresh: bool) -> Result<XdpRuntime, VipError> {
        let xdp = config
            .dataplane
            .xdp
            .as_ref()
            .expect("xdp mode is validated to have an interface");
        let options = XdpOptions {
            maglev_stride: config
                .services
                .iter()
                .map(|s| s.maglev_table_size)
                .max()
                .unwrap_or(65_537),
            max_services: u32::try_from(config.services.len())
                .unwrap_or(u32::MAX)
                .max(16),
            flow_table_size: xdp.flow_table_size,
            ..XdpOptions::default()
        };
        if fresh {
            for path in super::remove_pins(&config.dataplane.pin_path)? {
                tracing::info!(pin = %path.display(), "fresh start: removed");
            }
        }
        let mut dp = XdpDataplane::load(&config.dataplane.pin_path, &options)?;
        // What a previous daemon left in reused maps: its ids, which established flows name.
        let previous = dp.programmed_backends()?;
        let ids: HashMap<SocketAddr, u32> = previous.iter().map(|b| (b.addr, b.id)).collect();
        let macs: HashMap<SocketAddr, [u8; 6]> = previous
            .iter()
            .filter(|b| b.mac != [0; 6])
            .map(|b| (b.addr, b.mac))
            .collect();
        let inherited_up: HashSet<SocketAddr> = previous
            .iter()
            .filter(|b| b.up && b.mac != [0; 6])
            .map(|b| b.addr)
            .collect();
        let mut service_ids = HashMap::new();
        for (vip, id) in dp.programmed_services()? {
            if config.services.iter().any(|s| s.listen == vip) {
                service_ids.insert(vip, id);
            } else {
                tracing::info!(%vip, "removing a VIP programmed by a previous daemon and no longer configured");
                dp.remove_service(vip)?;
            }
        }
        if !ids.is_empty() {
            tracing::info!(
                backends = ids.len(),
                services = service_ids.len(),
                "reusing the ids of a previous daemon's maps"
            );
        }
        let (mode, reused) = dp.attach_pinned(
            &xdp.interface,
            match xdp.attach {
                XdpAttach::Auto => None,
                XdpAttach::Native => Some(AttachMode::Native),
                XdpAttach::Generic => Some(AttachMode::Generic),
            },
        )?;
        if reused {
            tracing::info!(interface = %xdp.interface, "XDP program replaced without a gap; established flows continue");
        }
        let mac = interface_mac(&xdp.interface).map_err(|source| VipError::InterfaceMac {
            interface: xdp.interface.clone(),
            source,
        })?;
        dp.set_interface_mac(mac)?;
        let ifindex = nix::net::if_::if_nametoindex(xdp.interface.as_str()).map_err(|source| {
            VipError::InterfaceIndex {
                interface: xdp.interface.clone(),
                source,
            }
        })?;
        let mut neighbours = Resolver::new(ifindex);
        // Now, while the daemon still holds CAP_NET_ADMIN (it gives it up before serving): a
        // managed neighbour entry for every configured backend.
        let table = neighbours.table();
        for service in &config.services {
            for backend in &service.backends {
                neighbours.manage(backend.address.ip(), table.as_ref());
            }
        }
        let native_refused = dp.native_refused().map(str::to_owned);
        Ok(XdpRuntime {
            dp: Mutex::new(dp),
            interface: xdp.interface.clone(),
            mode,
            native_refused,
            forwarding: xdp.forwarding,
            ids: Mutex::new(ids),
            max_backends: options.max_backends,
            service_ids: Mutex::new(service_ids),
            macs: Mutex::new(macs),
            neighbours: Mutex::new(neighbours),
            inherited_up: Mutex::new(Some(inherited_up)),
        })
    }

    fn id_of(&self, address: SocketAddr) -> Result<u32, VipError> {
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&id) = ids.get(&address) {
            return Ok(id);
        }
        let next = ids.values().max().map_or(0, |&max| max.saturating_add(1));
        if next >= self.max_backends {
            return Err(VipError::TooManyBackends {
                max: self.max_backends,
            });
        }
        ids.insert(address, next);
        Ok(next)
    }

    /// The backend's MAC from the neighbour table, else the last one known.
    fn mac_of(&self, address: SocketAddr, table: Option<&Table>) -> Option<[u8; 6]> {
        let mut macs = self.macs.lock().unwrap_or_else(|e| e.into_inner());
        match table.and_then(|t| t.mac(address.ip())) {
            Some(mac) => {
                macs.insert(address, mac);
                Some(mac)
            }
            None => macs.get(&address).copied(),
        }
    }

    /// The backend's MAC (see [`XdpRuntime::mac_of`]); on first sight, asks the kernel to keep
    /// the backend resolved, and while no MAC is known, makes it resolve the backend now.
    fn resolve(
        &self,
        address: SocketAddr,
        neighbours: &mut Resolver,
        table: Option<&Table>,
    ) -> Option<[u8; 6]> {
        let just_managed = neighbours.manage(address.ip(), table);
        let mac = self.mac_of(address, table);
        if mac.is_none() && !just_managed {
            // The next sync programs it.
            neighbours.provoke(address, table);
        }
        mac
    }

    /// Whether [`XdpRuntime::program`] can take `services` (a reload's new config), checked
    /// before anything changes so that a reload the maps cannot hold keeps the old config
    /// whole: backend ids left (ids are never reused), services, and Maglev table sizes
    /// against what the pinned maps were made for.
    pub fn check(&self, services: &[ServiceConfig]) -> Result<(), VipError> {
        let (stride, max_services, _) = self.dp.lock().unwrap_or_else(|e| e.into_inner()).limits();
        let ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        let fresh: HashSet<SocketAddr> = services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.address))
            .filter(|a| !ids.contains_key(a))
            .collect();
        let next = ids.values().max().map_or(0, |&max| u64::from(max) + 1);
        if next + fresh.len() as u64 > u64::from(self.max_backends) {
            return Err(VipError::TooManyBackends {
                max: self.max_backends,
            });
        }
        if services.len() > max_services as usize {
            return Err(VipError::TooManyServices { max: max_services });
        }
        if let Some(s) = services.iter().find(|s| s.maglev_table_size > stride) {
            return Err(VipError::Table {
                service: s.name.clone(),
                why: format!(
                    "{} slots, more than the {stride} the pinned maps were made for \
                     (`lb run --fresh` resizes them)",
                    s.maglev_table_size
                ),
            });
        }
        Ok(())
    }

    /// Programs every service (VIP, Maglev table) and backend; removes VIPs in `removed`.
    pub fn program(
        &self,
        services: &[(String, Arc<Service>)],
        removed: &[SocketAddr],
    ) -> Result<(), VipError> {
        // The neighbour dump first, so the dataplane is not locked while the kernel answers.
        let mut neighbours = self.neighbours.lock().unwrap_or_else(|e| e.into_inner());
        let table = neighbours.table();
        let mut dp = self.dp.lock().unwrap_or_else(|e| e.into_inner());
        let mut service_ids = self.service_ids.lock().unwrap_or_else(|e| e.into_inner());
        let inherited = self
            .inherited_up
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default();
        for (_, service) in services {
            for backend in &service.backends {
                // A restart must not cut the flows of a backend the previous daemon left up
                // (say with `initial_state: down`): it starts up, and its health checks
                // decide from here.
                if inherited.contains(&backend.address)
                    && backend.health() == crate::state::Health::Down
                {
                    backend.set_health(crate::state::Health::Up);
                    tracing::info!(backend = %backend.address, "up, as the previous daemon left it; health checks decide from here");
                }
            }
        }
        for vip in removed {
            dp.remove_service(*vip)?;
            service_ids.remove(vip);
        }
        for (name, service) in services {
            let ids: Vec<u32> = service
                .backends
                .iter()
                .map(|b| self.id_of(b.address))
                .collect::<Result<_, _>>()?;
            for backend in &service.backends {
                let id = self.id_of(backend.address)?;
                let mac = self.resolve(backend.address, &mut neighbours, table.as_ref());
                dp.set_backend(
                    id,
                    backend.address,
                    mac.unwrap_or_default(),
                    mac.is_some() && alive(backend),
                )?;
            }
            let (algorithm, hash) = match service.config.algorithm {
                Algorithm::SourceHash => (Algorithm::SourceHash, ClientHash::Ip),
                _ => (Algorithm::Maglev, ClientHash::IpPort),
            };
            let candidates: Vec<Candidate> = service
                .backends
                .iter()
                // Drained backends leave the table (no new flows) but stay up (flows continue).
                .map(|b| Candidate {
                    key: b.address.to_string(),
                    weight: if b.drained() { 0 } else { b.weight() },
                })
                .collect();
            let selector = Selector::new(
                algorithm,
                &candidates,
                service.config.maglev_table_size as usize,
            )
            .map_err(|e| VipError::Table {
                service: name.clone(),
                why: e.to_string(),
            })?;
            let view = selector.maglev_table().ok_or_else(|| VipError::Table {
                service: name.clone(),
                why: "no table was built".to_owned(),
            })?;
            let table: Vec<u32> = view.entries().iter().map(|&i| ids[i as usize]).collect();
            let vip = service.config.listen;
            let id = match service_ids.get(&vip) {
                Some(&id) => id,
                None => {
                    let used: Vec<u32> = service_ids.values().copied().collect();
                    let id = (0..).find(|i| !used.contains(i)).unwrap_or(0);
                    service_ids.insert(vip, id);
                    id
                }
            };
            dp.set_service(vip, id, self.forwarding, hash, &table)?;
        }
        Ok(())
    }

    /// Pushes each backend's state (up, draining, ejected) and MAC into the backend map.
    pub fn sync(&self, services: &[(String, Arc<Service>)]) -> Result<(), VipError> {
        let mut neighbours = self.neighbours.lock().unwrap_or_else(|e| e.into_inner());
        let table = neighbours.table();
        let mut dp = self.dp.lock().unwrap_or_else(|e| e.into_inner());
        for (_, service) in services {
            for backend in &service.backends {
                let id = self.id_of(backend.address)?;
                let mac = self.resolve(backend.address, &mut neighbours, table.as_ref());
                dp.set_backend(
                    id,
                    backend.address,
                    mac.unwrap_or_default(),
                    mac.is_some() && alive(backend),
                )?;
            }
        }
        Ok(())
    }

    /// The kernel's counters, summed over CPUs.
    pub fn counters(&self) -> Result<XdpCounters, VipError> {
        Ok(self
            .dp
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .counters()?)
    }
}

/// Whether the kernel may keep sending a backend packets: healthy and not ejected. A backend
/// that is not is skipped by the tables and loses its flows (each is placed again on its next
/// packet). Weight 0, drain and removal from the config only take it out of the tables, so its
/// established flows carry on: that is how the xdp dataplane drains.
fn alive(backend: &crate::state::Backend) -> bool {
    backend.health() == crate::state::Health::Up && !backend.ejected()
}

/// The interface's MAC, from sysfs.
fn interface_mac(interface: &str) -> std::io::Result<[u8; 6]> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{interface}/address"))?;
    crate::sys::parse_mac(text.trim())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, text))
}

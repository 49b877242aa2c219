//! The XDP dataplane's userspace half: the one owner of the loaded XDP object.
//!
//! It loads the program embedded at build time, pins its maps under `pin_path` (reusing maps
//! already pinned there, so counters and, later, the flow table survive a restart), attaches
//! the program to a NIC (native first, generic as a fallback) and reads the per-CPU counters.
//! Dropping an [`XdpDataplane`] detaches the program; pinned maps stay for bpftool.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray},
    programs::{ProgramError, Xdp, XdpMode},
};
use lb_common::{XdpAction, XdpCounter, names};

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

/// Errors of the XDP dataplane.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("cannot create the pin directory {path}")]
    PinDir {
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
    #[error("cannot use map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
}

/// The loaded XDP object, its typed maps and, once attached, its link.
pub struct XdpDataplane {
    ebpf: Ebpf,
    stats: PerCpuArray<MapData, XdpCounter>,
    pin_dir: PathBuf,
    attached: Option<(String, AttachMode)>,
}

/// The object built by build.rs from `lb-ebpf`.
static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-xdp"));

impl XdpDataplane {
    /// Loads the XDP object, pinning (or reusing) its maps under `pin_dir`.
    pub fn load(pin_dir: &Path) -> Result<Self, XdpError> {
        create_pin_dir(pin_dir)?;
        let stats_pin = pin_dir.join(names::XDP_STATS);
        let mut ebpf = EbpfLoader::new()
            .map_pin_path(names::XDP_STATS, stats_pin.as_path())
            .load(XDP_OBJECT)
            .map_err(|e| XdpError::Load(Box::new(e)))?;
        let program: &mut Xdp = ebpf
            .program_mut(names::XDP_PROG)
            .ok_or(XdpError::Missing {
                what: "program",
                name: names::XDP_PROG,
            })?
            .try_into()
            .map_err(|e| XdpError::Program(Box::new(e)))?;
        program.load().map_err(|e| XdpError::Program(Box::new(e)))?;
        let stats = ebpf.take_map(names::XDP_STATS).ok_or(XdpError::Missing {
            what: "map",
            name: names::XDP_STATS,
        })?;
        let stats = PerCpuArray::try_from(stats).map_err(|e| XdpError::Map {
            name: names::XDP_STATS,
            source: Box::new(e),
        })?;
        Ok(Self {
            ebpf,
            stats,
            pin_dir: pin_dir.to_owned(),
            attached: None,
        })
    }

    /// Attaches to `interface`: in `mode`, or native then generic when `mode` is `None`.
    /// Returns the mode that took.
    pub fn attach(
        &mut self,
        interface: &str,
        mode: Option<AttachMode>,
    ) -> Result<AttachMode, XdpError> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(names::XDP_PROG)
            .ok_or(XdpError::Missing {
                what: "program",
                name: names::XDP_PROG,
            })?
            .try_into()
            .map_err(|e| XdpError::Program(Box::new(e)))?;
        let took = match mode {
            Some(mode) => {
                program
                    .attach(interface, mode.flags())
                    .map_err(|source| XdpError::Attach {
                        interface: interface.to_owned(),
                        mode,
                        source: Box::new(source),
                    })?;
                mode
            }
            None => match program.attach(interface, AttachMode::Native.flags()) {
                Ok(_) => AttachMode::Native,
                Err(native) => {
                    tracing::info!(interface, error = %native, "native XDP unavailable, trying generic");
                    program
                        .attach(interface, AttachMode::Generic.flags())
                        .map_err(|source| XdpError::AttachAny {
                            interface: interface.to_owned(),
                            native: native.to_string(),
                            source: Box::new(source),
                        })?;
                    AttachMode::Generic
                }
            },
        };
        tracing::info!(interface, mode = %took, pin_dir = %self.pin_dir.display(), "XDP attached");
        self.attached = Some((interface.to_owned(), took));
        Ok(took)
    }

    /// Packets and bytes by verdict, summed over all CPUs.
    pub fn counters(&self) -> Result<Vec<(XdpAction, XdpCounter)>, XdpError> {
        XdpAction::ALL
            .iter()
            .map(|&action| {
                let per_cpu = self
                    .stats
                    .get(&(action as u32), 0)
                    .map_err(|e| XdpError::Map {
                        name: names::XDP_STATS,
                        source: Box::new(e),
                    })?;
                let sum = per_cpu
                    .iter()
                    .fold(XdpCounter::default(), |acc, c| XdpCounter {
                        packets: acc.packets + c.packets,
                        bytes: acc.bytes + c.bytes,
                    });
                Ok((action, sum))
            })
            .collect()
    }
}

impl Drop for XdpDataplane {
    fn drop(&mut self) {
        // The program's links are detached when `ebpf` drops; say so, once.
        if let Some((interface, mode)) = &self.attached {
            tracing::info!(interface, %mode, "XDP detached");
        }
    }
}

/// Creates the pin directory (mode 0700: maps hold flow state) on a bpffs.
fn create_pin_dir(dir: &Path) -> Result<(), XdpError> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| XdpError::PinDir {
            path: dir.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_tests::netns::{VethPair, sh};

    /// Loads and attaches the XDP program on a veth in a fresh namespace, sends packets
    /// through it, and checks the counters and what bpftool prints for the pinned map.
    #[test]
    fn xdp_counts_packets_on_a_veth_and_bpftool_shows_named_fields() {
        if !lb_tests::privileged("xdp_counts_packets_on_a_veth") {
            return;
        }
        let pair = VethPair::new(231);
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/lb-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&pin_dir);
        let (b_if, b_ns) = (pair.b_if.clone(), pair.b.name.clone());
        let pin = pin_dir.clone();
        // Attach from a thread inside namespace b, where the interface lives.
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            let f = std::fs::File::open(format!("/var/run/netns/{b_ns}")).unwrap();
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let mut dp = XdpDataplane::load(&pin).expect("load XDP object");
            let mode = dp.attach(&b_if, None).expect("attach");
            tx.send(mode).unwrap();
            done_rx.recv().unwrap();
            let counters = dp.counters().expect("read counters");
            drop(dp);
            counters
        });
        let mode = rx.recv().unwrap();
        // veth supports native XDP.
        assert_eq!(mode, AttachMode::Native);
        // 20 pings from a to b: each crosses b's veth, where the program runs.
        pair.a.exec(&[
            "ping", "-c", "20", "-i", "0.01", "-W", "1", "-q", &pair.b_ip,
        ]);
        let dump = sh(&[
            "bpftool",
            "map",
            "dump",
            "pinned",
            pin_dir.join(names::XDP_STATS).to_str().unwrap(),
        ]);
        done_tx.send(()).unwrap();
        let counters = worker.join().unwrap();
        let pass = counters
            .iter()
            .find(|(a, _)| *a == XdpAction::Pass)
            .unwrap()
            .1;
        assert!(
            pass.packets >= 20,
            "expected at least 20 packets passed, counters: {counters:?}"
        );
        assert!(
            pass.bytes >= 20 * 98,
            "20 ICMP echo frames are at least 98 bytes each: {counters:?}"
        );
        let others: u64 = counters
            .iter()
            .filter(|(a, _)| *a != XdpAction::Pass)
            .map(|(_, c)| c.packets)
            .sum();
        assert_eq!(others, 0, "the counting program only passes: {counters:?}");
        let dump = String::from_utf8_lossy(&dump.stdout);
        assert!(
            dump.contains("\"packets\"") && dump.contains("\"bytes\""),
            "bpftool shows no named fields:\n{dump}"
        );
        // Detached on drop: the interface has no XDP program any more.
        let link = pair.b.exec(&["ip", "-d", "link", "show", &pair.b_if]);
        assert!(
            !String::from_utf8_lossy(&link.stdout).contains("prog/xdp"),
            "still attached after drop"
        );
        std::fs::remove_dir_all(&pin_dir).unwrap();
    }
}

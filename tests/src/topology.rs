//! The xdp dataplane's test and bench topology: a client, lb and two backends, each in a
//! network namespace of its own, all on one bridge (in a namespace of its own too).
//!
//! ```text
//!  client 10.77.9.2 ──┐                 ┌── lb  10.77.0.1, 10.77.9.1, VIP 10.77.9.100 (XDP)
//!                     ├── bridge (sw) ──┤
//!  b1 10.77.0.11 ─────┤                 └── b2 10.77.0.12
//! ```
//!
//! IPv6 alike: client fd77:9::2, lb fd77::1, fd77:9::1 and VIP fd77:9::100, backends
//! fd77::11 and fd77::12. NAT ([`Replies::ThroughLb`]): the backends route the client's subnet
//! through lb. DSR ([`Replies::Direct`]): the backends hold the VIP on loopback (answering no
//! ARP for it) and have an address in the client's subnet (10.77.9.11, 10.77.9.12), so they
//! reply straight to the client over the bridge.

use crate::netns::{NetNs, sh, unique};

pub struct Topology {
    pub sw: NetNs,
    pub client: NetNs,
    pub lb: NetNs,
    pub backends: Vec<NetNs>,
    pub lb_if: String,
    /// The bridge-side peer of lb's interface: it receives the XDP_TX frames.
    pub lb_peer: String,
    /// Every veth end: (namespace, interface), the bridge's ports included.
    pub ends: Vec<(String, String)>,
}

/// Adds an IPv6 address, usable at once (no duplicate address detection).
pub fn add6(ns: &NetNs, addr: &str, dev: &str) {
    ns.exec(&["ip", "-6", "addr", "add", addr, "dev", dev, "nodad"]);
}

/// Creates a veth pair with one end `inner` in `ns` and the other enslaved to the bridge in `sw`.
pub fn plug(sw: &NetNs, ns: &NetNs, inner: &str) -> String {
    let outer = unique("po");
    sh(&[
        "ip", "link", "add", inner, "netns", &ns.name, "type", "veth", "peer", "name", &outer,
        "netns", &sw.name,
    ]);
    sw.exec(&["ip", "link", "set", &outer, "master", "br0", "up"]);
    ns.exec(&["ip", "link", "set", inner, "up"]);
    // veth hands its peer packets with the TCP checksum left to the "hardware"
    // (CHECKSUM_PARTIAL); a real NIC receives full checksums from the wire. Sending them full
    // here lets the XDP program's incremental update see what it would see on a NIC.
    ns.exec(&["ethtool", "-K", inner, "tx", "off"]);
    outer
}

/// How the backends send their replies.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Replies {
    /// NAT: to the client's subnet through lb.
    ThroughLb,
    /// DSR: from the VIP, straight to the client (an address in its subnet on the bridge).
    Direct,
}

impl Topology {
    pub fn new(replies: Replies) -> Topology {
        let sw = NetNs::new("lbsw");
        sw.exec(&["ip", "link", "add", "br0", "type", "bridge"]);
        sw.exec(&["ip", "link", "set", "br0", "up"]);
        let client = NetNs::new("lbc");
        let lb = NetNs::new("lbl");
        let mut ends = Vec::new();
        let c_peer = plug(&sw, &client, "c0");
        ends.extend([
            (client.name.clone(), "c0".to_owned()),
            (sw.name.clone(), c_peer),
        ]);
        let lb_if = "l0".to_owned();
        let lb_peer = plug(&sw, &lb, &lb_if);
        ends.extend([
            (lb.name.clone(), lb_if.clone()),
            (sw.name.clone(), lb_peer.clone()),
        ]);
        client.exec(&["ip", "addr", "add", "10.77.9.2/24", "dev", "c0"]);
        add6(&client, "fd77:9::2/64", "c0");
        for addr in ["10.77.0.1/24", "10.77.9.1/24", "10.77.9.100/32"] {
            lb.exec(&["ip", "addr", "add", addr, "dev", &lb_if]);
        }
        for addr in ["fd77::1/64", "fd77:9::1/64", "fd77:9::100/128"] {
            add6(&lb, addr, &lb_if);
        }
        let mut backends = Vec::new();
        for (i, ip) in ["10.77.0.11", "10.77.0.12"].iter().enumerate() {
            let ns = NetNs::new(&format!("lbb{i}"));
            let peer = plug(&sw, &ns, "e0");
            ends.extend([(ns.name.clone(), "e0".to_owned()), (sw.name.clone(), peer)]);
            ns.exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "e0"]);
            add6(&ns, &format!("fd77::{}/64", 11 + i), "e0");
            match replies {
                // NAT: replies to the client's subnet go back through lb.
                Replies::ThroughLb => {
                    ns.exec(&["ip", "route", "add", "10.77.9.0/24", "via", "10.77.0.1"]);
                    ns.exec(&["ip", "-6", "route", "add", "fd77:9::/64", "via", "fd77::1"]);
                }
                // DSR: the VIP on loopback, never announced or answered for in ARP (lb
                // answers for it), and the client's subnet on the bridge itself.
                Replies::Direct => {
                    ns.exec(&["ip", "addr", "add", "10.77.9.100/32", "dev", "lo"]);
                    for conf in ["all", "e0"] {
                        ns.exec(&[
                            "sysctl",
                            "-qw",
                            &format!("net.ipv4.conf.{conf}.arp_ignore=1"),
                        ]);
                        ns.exec(&[
                            "sysctl",
                            "-qw",
                            &format!("net.ipv4.conf.{conf}.arp_announce=2"),
                        ]);
                    }
                    let own = format!("10.77.9.{}/24", 11 + i);
                    ns.exec(&["ip", "addr", "add", &own, "dev", "e0"]);
                    // IPv6 answers neighbour solicitations only for the receiving
                    // interface's addresses: the VIP on lo needs no sysctl.
                    add6(&ns, "fd77:9::100/128", "lo");
                    add6(&ns, &format!("fd77:9::{}/64", 11 + i), "e0");
                }
            }
            backends.push(ns);
        }
        Topology {
            sw,
            client,
            lb,
            backends,
            lb_if,
            lb_peer,
            ends,
        }
    }

    /// Sets every link's MTU (both ends of each veth, and the bridge) and turns GRO on or off
    /// on every veth end. With GRO on, a veth end aggregates the segments it receives (as
    /// a NIC's GRO does), so the bridge and lb meet frames larger than the MTU; with an MTU
    /// above a page's worth (about 3.5 KB), a native XDP program on a veth sees multi-buffer
    /// frames. Call it before lb attaches: veth refuses an MTU change that a program attached
    /// to its peer cannot take.
    pub fn set_links(&self, mtu: u32, gro: bool) {
        let mtu = mtu.to_string();
        let gro = if gro { "on" } else { "off" };
        for (ns, dev) in &self.ends {
            sh(&["ip", "-n", ns, "link", "set", "dev", dev, "mtu", &mtu]);
            sh(&["ip", "netns", "exec", ns, "ethtool", "-K", dev, "gro", gro]);
        }
        self.sw
            .exec(&["ip", "link", "set", "dev", "br0", "mtu", &mtu]);
        // GRO leaves the TCP checksum of what it aggregates to be finished on the way out
        // (CHECKSUM_PARTIAL: only the pseudo-header sum in the field), and so do the
        // segments the bridge-side peer cuts them back into for lb. Native XDP on a veth
        // cannot see that mark and XDP_TX drops it, so the receiver would find a bad
        // checksum (TcpInCsumErrors) whatever the program does. A NIC receives complete
        // checksums from the wire: so does lb here.
        self.sw.exec(&[
            "ethtool",
            "-K",
            &self.lb_peer,
            "tx",
            if gro == "on" { "off" } else { "on" },
        ]);
    }
}

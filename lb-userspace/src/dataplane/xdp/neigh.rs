//! The neighbour table (ARP for IPv4, NDP for IPv6) of the XDP interface, over rtnetlink: the
//! xdp dataplane writes each backend's MAC into the frames it forwards, and learns it here.
//!
//! - [`dump`]: one RTM_GETNEIGH dump of both families, restricted to the interface.
//! - [`add_managed`]: a *managed* entry (`NTF_EXT_MANAGED`, Linux 5.16 and later), which the
//!   kernel resolves at once and keeps resolved by itself, whether or not traffic flows to it.
//! - [`Resolver`]: what the runtime does with both for each backend: a managed entry the
//!   first time a backend is seen, else (older kernel, or no CAP_NET_ADMIN any more) one UDP
//!   datagram to the backend while its MAC is unknown, which makes the kernel resolve it.
//!
//! Managed entries are left in place when a backend leaves the config and when the daemon
//! exits, on SIGTERM as on `kill -9`. The XDP program outlives the daemon and keeps forwarding
//! to the MACs last programmed; the entries keep the kernel's view of those backends current
//! meanwhile, and a daemon that starts again finds them resolved, so no backend waits for a
//! resolution after a restart or an upgrade. Removing them on exit could not be done on
//! `kill -9` anyway, and after start-up the daemon no longer holds CAP_NET_ADMIN, which
//! deleting an entry needs. What stays behind is one entry per backend address, which costs
//! the kernel a unicast probe now and then (for an address that no longer answers: a few
//! broadcast probes every few seconds). `ip neigh show dev IF` lists them (flag `managed`);
//! `ip neigh del ADDRESS dev IF` removes one. Entries someone else keeps (`permanent`,
//! `noarp`, `extern_learn`) are never changed.

use std::{
    collections::{HashMap, HashSet},
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use netlink_packet_core::{
    DecodeError, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR,
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourFlags, NeighbourMessage,
        NeighbourState,
    },
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_ROUTE};

/// States in which an entry's link-layer address can be used (the kernel's `NUD_VALID`).
const NUD_VALID: u16 = libc::NUD_PERMANENT
    | libc::NUD_NOARP
    | libc::NUD_REACHABLE
    | libc::NUD_PROBE
    | libc::NUD_STALE
    | libc::NUD_DELAY;

/// How long a reply may take: the kernel answers at once, this only bounds a surprise (the
/// caller holds the dataplane's lock meanwhile).
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// The port a UDP datagram that provokes resolution is sent to: discard.
const DISCARD_PORT: u16 = 9;

/// Errors talking to the kernel's neighbour tables.
#[derive(Debug, thiserror::Error)]
pub enum NeighError {
    #[error("cannot open a NETLINK_ROUTE socket")]
    Socket(#[source] io::Error),
    #[error("{request}: cannot send the request")]
    Send {
        request: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{request}: no complete reply")]
    Receive {
        request: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{request}: refused by the kernel")]
    Kernel {
        request: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{request}: malformed reply")]
    Malformed {
        request: &'static str,
        #[source]
        source: DecodeError,
    },
}

impl NeighError {
    /// The errno behind the error, if the system gave one.
    fn errno(&self) -> Option<i32> {
        match self {
            NeighError::Socket(source)
            | NeighError::Send { source, .. }
            | NeighError::Receive { source, .. }
            | NeighError::Kernel { source, .. } => source.raw_os_error(),
            NeighError::Malformed { .. } => None,
        }
    }
}

/// Who keeps a neighbour entry, which decides whether lb may make it managed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keeper {
    /// The kernel, on demand: made by traffic, aged out and collected when unused.
    Traffic,
    /// The kernel, always: a managed entry (lb's, or anyone's), resolved and kept resolved.
    Managed,
    /// An administrator or another control plane: `permanent`, `noarp` or `extern_learn`.
    /// lb never changes it (a managed request would turn `permanent` into a dynamic entry and
    /// clear `extern_learn`).
    Static,
}

/// One entry of the interface's neighbour table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub ip: IpAddr,
    /// The link-layer address, when the entry's state vouches for it (reachable, stale, delay,
    /// probe, permanent, noarp); `None` while incomplete or failed.
    pub mac: Option<[u8; 6]>,
    pub keeper: Keeper,
}

/// The neighbour entries of one interface, by IP, as one dump found them.
#[derive(Clone, Debug, Default)]
pub struct Table {
    entries: HashMap<IpAddr, Neighbour>,
    /// Whether the dump may have missed entries: interrupted by a change of the table
    /// (NLM_F_DUMP_INTR), or with a message lb could not parse. Its MACs are good; that an
    /// entry is missing proves nothing, so nothing is made managed from it.
    partial: bool,
}

impl Table {
    /// The entry of `ip` (IPv4-mapped IPv6 addresses are looked up as IPv4).
    pub fn get(&self, ip: IpAddr) -> Option<&Neighbour> {
        self.entries.get(&ip.to_canonical())
    }

    /// The usable MAC of `ip`, if the table has one.
    pub fn mac(&self, ip: IpAddr) -> Option<[u8; 6]> {
        self.get(ip)?.mac
    }

    /// The entries among `messages` that belong to interface `ifindex`.
    fn from_messages(messages: &[NeighbourMessage], ifindex: u32) -> Table {
        Table {
            entries: messages
                .iter()
                .filter_map(|m| neighbour_of(m, ifindex))
                .map(|n| (n.ip, n))
                .collect(),
            partial: false,
        }
    }
}

/// What an RTM_NEWNEIGH message (a dump's entry) says about a neighbour of `ifindex`; `None`
/// for another interface, a proxy entry or one with no IP destination.
fn neighbour_of(message: &NeighbourMessage, ifindex: u32) -> Option<Neighbour> {
    let header = &message.header;
    if header.ifindex != ifindex || header.flags.contains(NeighbourFlags::Proxy) {
        return None;
    }
    let (mut ip, mut lladdr, mut ext) = (None, None, NeighbourExtFlags::empty());
    for attribute in &message.attributes {
        match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                ip = Some(IpAddr::V4(*v4));
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                ip = Some(IpAddr::V6(*v6));
            }
            // Ethernet only: other link types have other address lengths.
            NeighbourAttribute::LinkLayerAddress(bytes) => {
                lladdr = <[u8; 6]>::try_from(bytes.as_slice()).ok();
            }
            NeighbourAttribute::ExtFlags(flags) => ext = *flags,
            _ => {}
        }
    }
    let state = u16::from(header.state);
    let keeper = if state & (libc::NUD_PERMANENT | libc::NUD_NOARP) != 0
        || header.flags.contains(NeighbourFlags::ExtLearned)
    {
        Keeper::Static
    } else if ext.contains(NeighbourExtFlags::Managed) {
        Keeper::Managed
    } else {
        Keeper::Traffic
    };
    Some(Neighbour {
        ip: ip?,
        // All zeroes is what the backend map holds for "unknown".
        mac: lladdr.filter(|mac| state & NUD_VALID != 0 && *mac != [0; 6]),
        keeper,
    })
}

/// Whether lb should ask for a managed entry for a backend whose entry is `entry`: when it has
/// none, or one that only traffic keeps.
pub fn wants_managed(entry: Option<&Neighbour>) -> bool {
    entry.is_none_or(|n| n.keeper == Keeper::Traffic)
}

/// The IPv4 and IPv6 neighbours of interface `ifindex`: one RTM_GETNEIGH dump. Needs no
/// privileges.
pub fn dump(ifindex: u32) -> Result<Table, NeighError> {
    const REQUEST: &str = "RTM_GETNEIGH dump";
    let socket = open()?;
    // AF_UNSPEC: the ARP and the NDP table in one dump. NDA_IFINDEX makes the kernel skip
    // other interfaces; `neighbour_of` checks again.
    let mut message = NeighbourMessage::default();
    message.header.family = AddressFamily::Unspec;
    message
        .attributes
        .push(NeighbourAttribute::IfIndex(ifindex));
    send(
        &socket,
        NLM_F_DUMP,
        RouteNetlinkMessage::GetNeighbour(message),
        REQUEST,
    )?;
    let received = receive(&socket, REQUEST)?;
    Ok(Table {
        partial: received.partial,
        ..Table::from_messages(&received.messages, ifindex)
    })
}

/// Adds a managed entry for `ip` on interface `ifindex`, or makes an existing entry managed:
/// the kernel starts resolving it at once and keeps it resolved. Needs CAP_NET_ADMIN and Linux
/// 5.16 or later (older kernels answer EINVAL, or take the entry without the flag).
///
/// The caller checks first that the entry is not one someone else keeps ([`wants_managed`]):
/// the kernel would turn a `permanent` entry into a managed, dynamic one.
pub fn add_managed(ifindex: u32, ip: IpAddr) -> Result<(), NeighError> {
    const REQUEST: &str = "RTM_NEWNEIGH managed";
    let socket = open()?;
    // NLM_F_CREATE without NLM_F_EXCL: an entry that traffic made becomes managed too.
    send(
        &socket,
        NLM_F_CREATE | NLM_F_ACK,
        RouteNetlinkMessage::NewNeighbour(managed_entry(ifindex, ip)),
        REQUEST,
    )?;
    receive(&socket, REQUEST).map(drop)
}

/// The RTM_NEWNEIGH body that asks for a managed entry (what `ip neigh replace IP dev IF
/// managed` sends).
fn managed_entry(ifindex: u32, ip: IpAddr) -> NeighbourMessage {
    let ip = ip.to_canonical();
    let mut message = NeighbourMessage::default();
    message.header.family = match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    message.header.ifindex = ifindex;
    // NUD_NONE: the kernel refuses a managed entry that is also permanent, and takes the state
    // of a managed request from the entry itself.
    message.header.state = NeighbourState::None;
    message.attributes.extend([
        NeighbourAttribute::Destination(ip.into()),
        NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed),
    ]);
    message
}

/// Makes the kernel resolve `backend` now, as any traffic to it would: one empty UDP datagram
/// to its discard port (a backend that does not listen there at most answers with an ICMP
/// error). Needs no privileges.
pub fn provoke(backend: SocketAddr) -> io::Result<()> {
    let target = SocketAddr::new(backend.ip().to_canonical(), DISCARD_PORT);
    let local: SocketAddr = match target {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let target = match (target, backend) {
        // Keep the scope of a link-local IPv6 backend.
        (SocketAddr::V6(mut t), SocketAddr::V6(b)) => {
            t.set_scope_id(b.scope_id());
            SocketAddr::V6(t)
        }
        (t, _) => t,
    };
    std::net::UdpSocket::bind(local)?
        .send_to(&[], target)
        .map(drop)
}

/// A NETLINK_ROUTE socket of the calling thread's network namespace, talking to the kernel.
fn open() -> Result<Socket, NeighError> {
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(NeighError::Socket)?;
    socket.bind_auto().map_err(NeighError::Socket)?;
    socket
        .connect(&NetlinkAddr::new(0, 0))
        .map_err(NeighError::Socket)?;
    socket2::SockRef::from(&socket)
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(NeighError::Socket)?;
    Ok(socket)
}

/// The sequence number of every request: each goes out on a socket of its own.
const SEQUENCE: u32 = 1;

fn send(
    socket: &Socket,
    flags: u16,
    message: RouteNetlinkMessage,
    request: &'static str,
) -> Result<(), NeighError> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | flags;
    header.sequence_number = SEQUENCE;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
    packet.finalize();
    let mut bytes = vec![0; packet.buffer_len()];
    packet.serialize(&mut bytes);
    socket
        .send(&bytes, 0)
        .map(drop)
        .map_err(|source| NeighError::Send { request, source })
}

/// What a reply carried: its neighbour messages, and whether some may be missing.
#[derive(Debug, Default)]
struct Received {
    messages: Vec<NeighbourMessage>,
    /// NLM_F_DUMP_INTR (the table changed during the dump), or a message skipped.
    partial: bool,
}

/// NLM_F_DUMP_INTR: a dump's part written while the table changed under it.
const NLM_F_DUMP_INTR: u16 = 0x10;

/// Reads the reply to the request sent on `socket`, datagram by datagram, until it ends:
/// NLMSG_DONE for a dump (whose parts carry NLM_F_MULTI), an NLMSG_ERROR with code 0 (the
/// acknowledgement) for a change. Returns the neighbour messages it carried.
fn receive(socket: &Socket, request: &'static str) -> Result<Received, NeighError> {
    let mut messages = Received::default();
    loop {
        // Peeks for the size first: a datagram is never cut short.
        let (datagram, _) = socket
            .recv_from_full()
            .map_err(|source| NeighError::Receive { request, source })?;
        if read_datagram(&datagram, request, &mut messages)? == Reply::Done {
            return Ok(messages);
        }
    }
}

/// Whether a reply goes on after a datagram.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    More,
    Done,
}

/// Reads one datagram of a reply: neighbour messages go into `out`; NLMSG_DONE, or an
/// NLMSG_ERROR with code 0, ends the reply; an NLMSG_ERROR with an errno (or an NLMSG_DONE
/// with one, a dump that failed part way) is the kernel's refusal. A dump interrupted by a
/// change of the table (NLM_F_DUMP_INTR) is used as it is, marked partial: the next sync
/// reads it again.
fn read_datagram(
    mut bytes: &[u8],
    request: &'static str,
    out: &mut Received,
) -> Result<Reply, NeighError> {
    let malformed = |source| NeighError::Malformed { request, source };
    let refused = |errno: i32| NeighError::Kernel {
        request,
        source: io::Error::from_raw_os_error(errno.saturating_abs()),
    };
    while !bytes.is_empty() {
        let buffer = NetlinkBuffer::new_checked(bytes).map_err(malformed)?;
        let length = buffer.length() as usize;
        let (kind, sequence) = (buffer.message_type(), buffer.sequence_number());
        let message = &bytes[..length];
        // Messages are 4-byte aligned; the last one's padding may be missing.
        bytes = &bytes[length.next_multiple_of(4).min(bytes.len())..];
        if sequence != SEQUENCE {
            continue;
        }
        if buffer.flags() & NLM_F_DUMP_INTR != 0 {
            out.partial = true;
        }
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(message) {
            Ok(parsed) => match parsed.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(neighbour)) => {
                    out.messages.push(neighbour);
                }
                NetlinkPayload::Done(done) if done.code != 0 => return Err(refused(done.code)),
                NetlinkPayload::Done(_) => return Ok(Reply::Done),
                NetlinkPayload::Error(error) => {
                    return match error.code {
                        Some(code) => Err(refused(code.get())),
                        None => Ok(Reply::Done),
                    };
                }
                _ => {}
            },
            // The end of a reply must be understood; one entry that the crate cannot parse
            // (an attribute of a newer kernel, say) only costs that entry.
            Err(e) if kind == NLMSG_DONE || kind == NLMSG_ERROR => return Err(malformed(e)),
            Err(e) => {
                out.partial = true;
                tracing::debug!(error = %e, "{request}: skipped a message lb cannot parse");
            }
        }
    }
    Ok(Reply::More)
}

/// How the runtime gets each backend's MAC on one interface and keeps it current; logs each
/// kind of failure once, not every second.
#[derive(Debug)]
pub struct Resolver {
    ifindex: u32,
    /// Backend IPs whose entry lb looked at once: made managed, or left as someone keeps it.
    seen: HashSet<IpAddr>,
    /// Errnos of managed-entry failures already logged as warnings.
    warned: HashSet<Option<i32>>,
    /// Whether the last dump failed (logged when it starts failing, and when it recovers).
    dump_failing: bool,
}

impl Resolver {
    pub fn new(ifindex: u32) -> Resolver {
        Resolver {
            ifindex,
            seen: HashSet::new(),
            warned: HashSet::new(),
            dump_failing: false,
        }
    }

    /// The interface's neighbours (one dump), or `None` when the dump failed: callers keep
    /// the MACs they know, and nothing is made managed without knowing what is there.
    pub fn table(&mut self) -> Option<Table> {
        match dump(self.ifindex) {
            Ok(table) => {
                if std::mem::replace(&mut self.dump_failing, false) {
                    tracing::info!("reading the neighbour table works again");
                }
                Some(table)
            }
            Err(e) => {
                if std::mem::replace(&mut self.dump_failing, true) {
                    tracing::debug!(error = %crate::sys::error_chain(&e), "cannot read the neighbour table");
                } else {
                    tracing::warn!(error = %crate::sys::error_chain(&e), "cannot read the neighbour table; backends keep the MACs last known");
                }
                None
            }
        }
    }

    /// The first time a backend is seen (with a table read): asks the kernel for a managed
    /// entry, unless the backend's entry is managed already or kept by someone else. Returns
    /// whether it just added one (the kernel is resolving the backend now).
    pub fn manage(&mut self, backend: IpAddr, table: Option<&Table>) -> bool {
        // A partial dump may lack an entry someone else keeps: decide on a whole one.
        let Some(table) = table.filter(|t| !t.partial) else {
            return false;
        };
        let ip = backend.to_canonical();
        if !self.seen.insert(ip) || !wants_managed(table.get(ip)) {
            return false;
        }
        match add_managed(self.ifindex, ip) {
            Ok(()) => {
                tracing::debug!(backend = %ip, "managed neighbour entry added: the kernel keeps it resolved");
                true
            }
            Err(e) => {
                if self.warned.insert(e.errno()) {
                    tracing::warn!(
                        backend = %ip,
                        error = %crate::sys::error_chain(&e),
                        "cannot add a managed neighbour entry: it needs Linux 5.16 and \
                         CAP_NET_ADMIN, which the daemon gives up after start-up (backends added \
                         by a reload get none); while its MAC is unknown, a UDP datagram each \
                         second makes the kernel resolve the backend instead (logged once per \
                         error)"
                    );
                } else {
                    tracing::debug!(backend = %ip, error = %crate::sys::error_chain(&e), "cannot add a managed neighbour entry");
                }
                false
            }
        }
    }

    /// For a backend whose MAC is not known: makes the kernel resolve it now (one UDP
    /// datagram), unless a managed entry has the kernel doing so already. Whether it has is
    /// read from the table, not from what [`Resolver::manage`] was told: a kernel before 5.16
    /// may take a managed request as a plain entry, and an entry can be deleted by hand.
    pub fn provoke(&mut self, backend: SocketAddr, table: Option<&Table>) {
        let managed = table
            .and_then(|t| t.get(backend.ip()))
            .is_some_and(|n| n.keeper == Keeper::Managed);
        if managed {
            return;
        }
        if let Err(e) = provoke(backend) {
            tracing::debug!(%backend, error = %e, "cannot send a datagram to resolve the backend");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use netlink_packet_core::{DoneMessage, Emitable as _, ErrorMessage, NLM_F_MULTIPART};

    use super::*;

    const IF: u32 = 7;

    fn entry(
        ifindex: u32,
        ip: IpAddr,
        state: NeighbourState,
        lladdr: Option<&[u8]>,
    ) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = match ip {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        m.header.ifindex = ifindex;
        m.header.state = state;
        m.attributes
            .push(NeighbourAttribute::Destination(ip.into()));
        if let Some(lladdr) = lladdr {
            m.attributes
                .push(NeighbourAttribute::LinkLayerAddress(lladdr.to_vec()));
        }
        m
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const MAC: [u8; 6] = [2, 0x42, 0xac, 0x11, 0, 2];

    #[test]
    fn dump_entries_become_neighbours_of_the_interface() {
        let managed = {
            let mut m = entry(IF, ip("10.0.0.6"), NeighbourState::Reachable, Some(&MAC));
            m.attributes
                .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
            m
        };
        let learned = {
            let mut m = entry(IF, ip("10.0.0.7"), NeighbourState::Reachable, Some(&MAC));
            m.header.flags = NeighbourFlags::ExtLearned;
            m
        };
        let proxy = {
            let mut m = entry(IF, ip("10.0.0.8"), NeighbourState::None, None);
            m.header.flags = NeighbourFlags::Proxy;
            m
        };
        let messages = [
            entry(IF, ip("10.0.0.1"), NeighbourState::Reachable, Some(&MAC)),
            entry(IF, ip("10.0.0.2"), NeighbourState::Incomplete, None),
            // A failed entry may still carry the address it once had: not to be used.
            entry(IF, ip("10.0.0.3"), NeighbourState::Failed, Some(&MAC)),
            entry(IF, ip("fd77::1"), NeighbourState::Stale, Some(&MAC)),
            entry(IF, ip("fd77::2"), NeighbourState::Delay, Some(&MAC)),
            entry(IF, ip("fd77::3"), NeighbourState::Probe, Some(&MAC)),
            entry(IF, ip("10.0.0.4"), NeighbourState::Permanent, Some(&MAC)),
            entry(IF, ip("10.0.0.5"), NeighbourState::Noarp, Some(&[0; 6])),
            managed,
            learned,
            proxy,
            // Another link type (InfiniBand: 20 bytes), and another interface.
            entry(
                IF,
                ip("10.0.0.9"),
                NeighbourState::Reachable,
                Some(&[1; 20]),
            ),
            entry(
                IF + 1,
                ip("10.0.0.10"),
                NeighbourState::Reachable,
                Some(&MAC),
            ),
        ];
        let table = Table::from_messages(&messages, IF);
        let keeper = |s: &str| table.get(ip(s)).map(|n| n.keeper);

        assert_eq!(table.mac(ip("10.0.0.1")), Some(MAC));
        assert_eq!(
            table.mac(ip("::ffff:10.0.0.1")),
            Some(MAC),
            "IPv4-mapped backends are IPv4 neighbours"
        );
        assert_eq!(keeper("10.0.0.1"), Some(Keeper::Traffic));
        assert_eq!(table.mac(ip("10.0.0.2")), None, "incomplete");
        assert_eq!(keeper("10.0.0.2"), Some(Keeper::Traffic));
        assert_eq!(table.mac(ip("10.0.0.3")), None, "failed");
        for v6 in ["fd77::1", "fd77::2", "fd77::3"] {
            assert_eq!(table.mac(ip(v6)), Some(MAC), "{v6}");
        }
        assert_eq!(table.mac(ip("10.0.0.4")), Some(MAC), "permanent");
        assert_eq!(keeper("10.0.0.4"), Some(Keeper::Static));
        assert_eq!(table.mac(ip("10.0.0.5")), None, "a zero MAC is no MAC");
        assert_eq!(keeper("10.0.0.5"), Some(Keeper::Static), "noarp");
        assert_eq!(table.mac(ip("10.0.0.6")), Some(MAC));
        assert_eq!(keeper("10.0.0.6"), Some(Keeper::Managed));
        assert_eq!(keeper("10.0.0.7"), Some(Keeper::Static), "extern_learn");
        assert_eq!(keeper("10.0.0.8"), None, "proxy entries are not neighbours");
        assert_eq!(table.mac(ip("10.0.0.9")), None, "not an Ethernet address");
        assert_eq!(keeper("10.0.0.10"), None, "another interface");
        assert_eq!(keeper("10.0.0.11"), None);
    }

    #[test]
    fn managed_entries_replace_only_what_traffic_keeps() {
        let with = |keeper| Neighbour {
            ip: ip("10.0.0.1"),
            mac: Some(MAC),
            keeper,
        };
        assert!(wants_managed(None));
        assert!(wants_managed(Some(&with(Keeper::Traffic))));
        assert!(!wants_managed(Some(&with(Keeper::Managed))));
        assert!(!wants_managed(Some(&with(Keeper::Static))));
    }

    /// The netlink attributes (type, value) of a serialized message after its `header` bytes.
    fn attributes(mut bytes: &[u8]) -> Vec<(u16, Vec<u8>)> {
        let mut out = Vec::new();
        while bytes.len() >= 4 {
            let len = usize::from(u16::from_ne_bytes([bytes[0], bytes[1]]));
            let kind = u16::from_ne_bytes([bytes[2], bytes[3]]);
            out.push((kind, bytes[4..len].to_vec()));
            bytes = &bytes[len.next_multiple_of(4).min(bytes.len())..];
        }
        out
    }

    #[test]
    fn the_managed_request_is_what_the_kernel_expects() {
        // struct ndmsg: family, 3 padding bytes, ifindex, state (u16), flags, type; then
        // NDA_DST (1) and NDA_FLAGS_EXT (15) = NTF_EXT_MANAGED (1).
        for (addr, family, dst) in [
            ("10.1.2.3", libc::AF_INET, vec![10, 1, 2, 3]),
            ("::ffff:10.1.2.3", libc::AF_INET, vec![10, 1, 2, 3]),
            (
                "fd77::5",
                libc::AF_INET6,
                "fd77::5".parse::<Ipv6Addr>().unwrap().octets().to_vec(),
            ),
        ] {
            let message = managed_entry(5, ip(addr));
            let mut bytes = vec![0; message.buffer_len()];
            message.emit(&mut bytes);
            assert_eq!(bytes[0], family as u8, "{addr}");
            assert_eq!(u32::from_ne_bytes(bytes[4..8].try_into().unwrap()), 5);
            assert_eq!(u16::from_ne_bytes([bytes[8], bytes[9]]), 0, "NUD_NONE");
            assert_eq!(bytes[10], 0, "no ndm_flags");
            assert_eq!(
                attributes(&bytes[12..]),
                vec![(1, dst), (15, 1u32.to_ne_bytes().to_vec())],
                "{addr}"
            );
        }
    }

    /// One datagram holding `payloads` as netlink messages of sequence `seq`.
    fn datagram(seq: u32, payloads: Vec<NetlinkPayload<RouteNetlinkMessage>>) -> Vec<u8> {
        let mut bytes = Vec::new();
        for payload in payloads {
            let mut header = NetlinkHeader::default();
            header.flags = NLM_F_MULTIPART;
            header.sequence_number = seq;
            let mut message = NetlinkMessage::new(header, payload);
            message.finalize();
            let mut one = vec![0; message.buffer_len()];
            message.serialize(&mut one);
            one.resize(one.len().next_multiple_of(4), 0);
            bytes.extend(one);
        }
        bytes
    }

    fn neighbour(last: u8) -> NetlinkPayload<RouteNetlinkMessage> {
        NetlinkPayload::from(RouteNetlinkMessage::NewNeighbour(entry(
            IF,
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, last)),
            NeighbourState::Reachable,
            Some(&MAC),
        )))
    }

    fn done(code: i32) -> NetlinkPayload<RouteNetlinkMessage> {
        let mut done = DoneMessage::default();
        done.code = code;
        NetlinkPayload::Done(done)
    }

    fn error(code: i32) -> NetlinkPayload<RouteNetlinkMessage> {
        let mut error = ErrorMessage::default();
        error.code = std::num::NonZeroI32::new(code);
        error.header = vec![0; 16];
        NetlinkPayload::Error(error)
    }

    #[test]
    fn a_dump_reply_is_read_across_datagrams_until_done() {
        let mut out = Received::default();
        let first = datagram(SEQUENCE, vec![neighbour(1), neighbour(2)]);
        assert_eq!(
            read_datagram(&first, "test", &mut out).unwrap(),
            Reply::More
        );
        // A message of another request is not ours; a message the crate cannot parse (an
        // ndmsg cut short) costs only itself.
        let mut second = datagram(SEQUENCE + 1, vec![neighbour(9)]);
        second.extend([20, 0, 0, 0, 28, 0, 2, 0]);
        second.extend(SEQUENCE.to_ne_bytes());
        second.extend([0; 8]);
        second.extend(datagram(SEQUENCE, vec![neighbour(3)]));
        assert_eq!(
            read_datagram(&second, "test", &mut out).unwrap(),
            Reply::More
        );
        let last = datagram(SEQUENCE, vec![neighbour(4), done(0)]);
        assert_eq!(read_datagram(&last, "test", &mut out).unwrap(), Reply::Done);
        // The unparseable message may have been an entry: the dump is partial.
        assert!(out.partial);
        let table = Table::from_messages(&out.messages, IF);
        for n in 1..=4 {
            assert_eq!(table.mac(IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))), Some(MAC));
        }
        assert_eq!(table.get(ip("10.0.0.9")), None);
        assert_eq!(out.messages.len(), 4);
    }

    #[test]
    fn errors_and_acknowledgements_end_a_reply() {
        let mut out = Received::default();
        let ack = datagram(SEQUENCE, vec![error(0)]);
        assert_eq!(read_datagram(&ack, "test", &mut out).unwrap(), Reply::Done);

        let refused = datagram(SEQUENCE, vec![error(-libc::EPERM)]);
        let e = read_datagram(&refused, "test", &mut out).unwrap_err();
        assert!(matches!(e, NeighError::Kernel { .. }), "{e:?}");
        assert_eq!(e.errno(), Some(libc::EPERM));

        // A dump that fails part way ends with an errno in NLMSG_DONE.
        let failed = datagram(SEQUENCE, vec![neighbour(1), done(-libc::EINTR)]);
        let e = read_datagram(&failed, "test", &mut out).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EINTR));

        let cut = datagram(SEQUENCE, vec![neighbour(1)]);
        let e = read_datagram(&cut[..cut.len() - 8], "test", &mut out).unwrap_err();
        assert!(matches!(e, NeighError::Malformed { .. }), "{e:?}");
    }

    /// The link-layer address of `interface` in `ns`.
    fn mac_in(ns: &lb_tests::netns::NetNs, interface: &str) -> [u8; 6] {
        let out = ns.exec(&["cat", &format!("/sys/class/net/{interface}/address")]);
        crate::sys::parse_mac(String::from_utf8_lossy(&out.stdout).trim()).expect("a MAC")
    }

    /// Polls a dump of `ifindex` until `ip` has a MAC, for at most 5 s.
    fn resolved(ifindex: u32, ip: IpAddr) -> Option<Neighbour> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let table = dump(ifindex).expect("dump");
            if let Some(n) = table.get(ip).filter(|n| n.mac.is_some()) {
                return Some(*n);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// In a pair of fresh network namespaces joined by a veth: the dump finds the neighbours
    /// of its interface only, a managed entry gets resolved by the kernel, a permanent entry
    /// is left alone, and a datagram makes the kernel resolve a backend.
    #[test]
    fn netlink_reads_and_manages_neighbours_in_a_namespace() {
        use lb_tests::netns::{NetNs, sh, unique};
        if !lb_tests::privileged("netlink_reads_and_manages_neighbours_in_a_namespace") {
            return;
        }
        let (a, b) = (NetNs::new("nla"), NetNs::new("nlb"));
        for ns in [&a, &b] {
            // No duplicate address detection: IPv6 addresses are usable at once.
            for key in ["all", "default"] {
                ns.exec(&[
                    "sysctl",
                    "-qw",
                    &format!("net.ipv6.conf.{key}.accept_dad=0"),
                ]);
            }
        }
        // `other`: a second interface in the same namespace (a veth whose peer stays there).
        let (va, vb, other, other_peer) =
            (unique("nva"), unique("nvb"), unique("nvo"), unique("nvp"));
        sh(&[
            "ip", "link", "add", &va, "netns", &a.name, "type", "veth", "peer", "name", &vb,
            "netns", &b.name,
        ]);
        a.exec(&[
            "ip",
            "link",
            "add",
            &other,
            "type",
            "veth",
            "peer",
            "name",
            &other_peer,
        ]);
        for (ns, dev, addrs) in [
            (&a, &va, &["10.77.0.1/24", "fd77:1::1/64"][..]),
            (
                &b,
                &vb,
                &["10.77.0.2/24", "10.77.0.3/24", "fd77:1::2/64"][..],
            ),
        ] {
            for addr in addrs {
                ns.exec(&["ip", "addr", "add", addr, "dev", dev, "nodad"]);
            }
            ns.exec(&["ip", "link", "set", dev, "up"]);
        }
        a.exec(&["ip", "link", "set", &other, "up"]);
        let neigh = |ip: &str, mac: &str, dev: &str| {
            a.exec(&[
                "ip",
                "neigh",
                "add",
                ip,
                "lladdr",
                mac,
                "nud",
                "permanent",
                "dev",
                dev,
            ]);
        };
        neigh("10.77.0.9", "02:00:00:00:00:09", &va);
        neigh("fd77:1::9", "02:00:00:00:00:0a", &va);
        neigh("10.77.0.9", "02:00:00:00:00:99", &other);
        neigh("10.66.0.1", "02:00:00:00:00:98", &other);
        let peer = mac_in(&b, &vb);

        let ns = a.name.clone();
        let (va_, other_) = (va.clone(), other.clone());
        let checks = std::thread::spawn(move || {
            let va = va_;
            // This thread alone enters the namespace; the sockets below open in it.
            let f = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("open netns");
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let ifindex = nix::net::if_::if_nametoindex(va.as_str()).expect("ifindex");
            let other = nix::net::if_::if_nametoindex(other_.as_str()).expect("ifindex");

            let table = dump(ifindex).expect("dump");
            let permanent = table.get(ip("10.77.0.9")).copied();
            assert_eq!(
                permanent,
                Some(Neighbour {
                    ip: ip("10.77.0.9"),
                    mac: Some([2, 0, 0, 0, 0, 9]),
                    keeper: Keeper::Static,
                })
            );
            assert_eq!(table.mac(ip("fd77:1::9")), Some([2, 0, 0, 0, 0, 0x0a]));
            assert_eq!(
                table.get(ip("10.66.0.1")),
                None,
                "the other interface's entry"
            );
            let theirs = dump(other).expect("dump");
            assert_eq!(theirs.mac(ip("10.77.0.9")), Some([2, 0, 0, 0, 0, 0x99]));
            assert_eq!(theirs.mac(ip("10.66.0.1")), Some([2, 0, 0, 0, 0, 0x98]));
            assert_eq!(theirs.get(ip("fd77:1::9")), None);

            // Managed entries: the kernel resolves them with no traffic at all.
            let mut resolver = Resolver::new(ifindex);
            let table = resolver.table();
            for (backend, added) in [
                ("10.77.0.2", true),
                ("fd77:1::2", true),
                ("10.77.0.9", false),
            ] {
                assert_eq!(
                    resolver.manage(ip(backend), table.as_ref()),
                    added,
                    "{backend}"
                );
            }
            assert!(
                !resolver.manage(ip("10.77.0.2"), table.as_ref()),
                "once per backend"
            );
            for backend in ["10.77.0.2", "fd77:1::2"] {
                let n = resolved(ifindex, ip(backend));
                assert_eq!(n.and_then(|n| n.mac), Some(peer), "{backend} resolved");
                assert_eq!(n.map(|n| n.keeper), Some(Keeper::Managed), "{backend}");
            }
            let table = dump(ifindex).expect("dump");
            assert_eq!(
                table.get(ip("10.77.0.9")).copied(),
                permanent,
                "a permanent entry is left as it was"
            );

            // Without a managed entry, one datagram makes the kernel resolve a backend.
            assert_eq!(table.get(ip("10.77.0.3")), None);
            resolver.provoke("10.77.0.3:80".parse().unwrap(), Some(&table));
            let n = resolved(ifindex, ip("10.77.0.3"));
            assert_eq!(n.and_then(|n| n.mac), Some(peer), "resolved by a datagram");
            assert_eq!(n.map(|n| n.keeper), Some(Keeper::Traffic));
        });
        if let Err(panic) = checks.join() {
            std::panic::resume_unwind(panic);
        }
        // As iproute2 sees them.
        let show = |ip: &str| {
            let out = a.exec(&["ip", "neigh", "show", ip, "dev", &va]);
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        assert!(
            show("10.77.0.2").contains("managed"),
            "{}",
            show("10.77.0.2")
        );
        assert!(
            show("10.77.0.9").contains("PERMANENT"),
            "{}",
            show("10.77.0.9")
        );
    }
}

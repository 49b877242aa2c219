//! The wire contract between lb's eBPF programs (`lb-ebpf`) and its daemon (`lb-userspace`).
//!
//! Everything here is shared byte for byte with the kernel: `#[repr(C)]`, no `bool`, no
//! `Option`, no implicit padding, sizes asserted at compile time, byte order in field names.
//! Map names are constants used on both sides (and as the file names under the bpffs pin
//! directory). Nothing else lives here, except the client hash ([`sip`]): the kernel and the
//! daemon must compute it identically, so it is part of the contract too.
//!
//! Addresses are `[u8; 16]` in network byte order (bpftool prints them as hex bytes): an IPv4
//! address fills the first 4 bytes and the rest is zero; `family` says which ([`FAMILY_V4`],
//! [`FAMILY_V6`]). Ports are `u16` in host byte order, so bpftool prints them as numbers;
//! the program converts as it builds keys (one instruction each).
#![no_std]

/// Version of the map layout below. Bump it whenever a key or value type, a map's kind or
/// the meaning of a field changes: the daemon refuses pinned maps of another version (see
/// [`LbMeta`]).
pub const LAYOUT_VERSION: u32 = 1;

/// Names of the maps and programs. Kernel names are cut at 15 characters: keep them short.
pub mod names {
    /// Per-CPU XDP counters: key = XDP action code (see [`crate::XdpAction`]), value =
    /// [`crate::XdpCounter`]. Pinned as `<pin_path>/XDP_STATS`.
    pub const XDP_STATS: &str = "XDP_STATS";
    /// Per-CPU drop counters: key = [`crate::DropReason`], value = packets (`u64`).
    pub const XDP_DROPS: &str = "XDP_DROPS";
    /// Per-CPU event counters: key = [`crate::Event`], value = packets (`u64`).
    pub const XDP_EVENTS: &str = "XDP_EVENTS";
    /// Hash: [`crate::VipKey`] (address only) -> [`crate::VipInfo`]. Lets the program
    /// recognise traffic for a VIP that has no ports to match (fragments, ICMP).
    pub const LB_VIPS: &str = "LB_VIPS";
    /// Hash: [`crate::ServiceKey`] (VIP, port, protocol) -> [`crate::Service`].
    pub const LB_SERVICES: &str = "LB_SERVICES";
    /// Array: backend id -> [`crate::Backend`].
    pub const LB_BACKENDS: &str = "LB_BACKENDS";
    /// Array: `service.table_off + slot` -> backend id (`u32`): every service's Maglev table.
    pub const LB_MAGLEV: &str = "LB_MAGLEV";
    /// LRU hash: client -> VIP 5-tuple ([`crate::FlowKey`]) -> [`crate::Flow`].
    pub const LB_FLOWS: &str = "LB_FLOWS";
    /// LRU hash: backend -> client 5-tuple ([`crate::FlowKey`]) -> [`crate::NatReply`]: how to
    /// restore the VIP on replies of NAT flows.
    pub const LB_NAT_REV: &str = "LB_NAT_REV";
    /// Array of one [`crate::LbConfig`]: settings the program reads.
    pub const LB_CONFIG: &str = "LB_CONFIG";
    /// Array of one [`crate::LbMeta`]: the layout of the pinned map set (daemon only).
    pub const LB_META: &str = "LB_META";
    /// The XDP program.
    pub const XDP_PROG: &str = "xdp_lb";
    /// Sockmap: SOCKHASH, socket cookie (`u64`) -> socket: both sockets of every connection
    /// the kernel relays (the verdict program is attached here). bpftool shows cookies and
    /// socket ids.
    pub const SK_SOCKS: &str = "SK_SOCKS";
    /// Sockmap: hash, socket cookie (`u64`) -> [`crate::SockPeer`]: where that socket's bytes
    /// go, and how many went which way (written by the kernel).
    pub const SK_PEERS: &str = "SK_PEERS";
    /// Sockmap: hash, socket cookie (`u64`) -> [`crate::SkCtrl`]: the daemon's hold on that
    /// socket's direction (written by the daemon).
    pub const SK_CTRL: &str = "SK_CTRL";
    /// Sockmap: per-CPU counters, key = [`crate::SkEvent`], value = `u64`.
    pub const SK_STATS: &str = "SK_STATS";
    /// The sockmap stream verdict program.
    pub const SK_PROG: &str = "lb_sk_verdict";
    /// Sockmap program globals (`u32`, set at load from the kernel's BTF): the byte offsets
    /// of `sk_buff.cb` (whose first word is the skb's TCP sequence number), `sk_buff.sk` and
    /// `tcp_sock.copied_seq`. 0 (unset) turns the repeat check off.
    pub const SK_OFF_CB: &str = "LB_OFF_SKB_CB";
    pub const SK_OFF_SK: &str = "LB_OFF_SKB_SK";
    pub const SK_OFF_COPIED: &str = "LB_OFF_TCP_COPIED";
}

/// `family` of an IPv4 address.
pub const FAMILY_V4: u8 = 4;
/// `family` of an IPv6 address.
pub const FAMILY_V6: u8 = 6;
/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;

/// XDP verdicts, as the kernel numbers them; also the key of [`names::XDP_STATS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAction {
    Aborted = 0,
    Drop = 1,
    Pass = 2,
    Tx = 3,
    Redirect = 4,
}

impl XdpAction {
    /// Every action, in key order.
    pub const ALL: [XdpAction; 5] = [
        XdpAction::Aborted,
        XdpAction::Drop,
        XdpAction::Pass,
        XdpAction::Tx,
        XdpAction::Redirect,
    ];
    /// Number of entries in [`names::XDP_STATS`].
    pub const COUNT: u32 = 5;

    /// The label used in metrics (`lb_xdp_packets_total{action=".."}`).
    pub const fn label(self) -> &'static str {
        match self {
            XdpAction::Aborted => "aborted",
            XdpAction::Drop => "drop",
            XdpAction::Pass => "pass",
            XdpAction::Tx => "tx",
            XdpAction::Redirect => "redirect",
        }
    }
}

/// One CPU's count of packets and bytes that got one verdict.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpCounter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<XdpCounter>() == 16);

/// Why a packet for a VIP was dropped; the key of [`names::XDP_DROPS`]. Traffic that is not
/// for a VIP is never dropped.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// An IPv4 fragment (MF set or offset != 0) or an IPv6 fragment header, to a VIP: a
    /// non-first fragment has no ports, so it cannot follow its flow.
    Frag = 0,
    /// The frame ends inside the IP header's options or the TCP header.
    Short = 1,
    /// IPv4 header with IHL < 5 or a version that does not match the EtherType.
    BadHeader = 2,
    /// No backend that is up within the probed Maglev slots (or an empty table).
    NoBackend = 3,
    /// The chosen backend has no MAC address (all zero): nowhere to send the frame.
    NoMac = 4,
    /// NAT between address families (an IPv4 VIP with an IPv6 backend, or the reverse).
    Family = 5,
    /// A multi-buffer frame whose IP options or TCP header run past its first buffer (the
    /// only part the program can rewrite in place): not balanced. Drivers put the headers
    /// in the first buffer, so this should stay at zero (see [`Event::HeadersSplit`]).
    Split = 6,
}

impl DropReason {
    /// Every reason, in key order.
    pub const ALL: [DropReason; 7] = [
        DropReason::Frag,
        DropReason::Short,
        DropReason::BadHeader,
        DropReason::NoBackend,
        DropReason::NoMac,
        DropReason::Family,
        DropReason::Split,
    ];
    /// Number of entries in [`names::XDP_DROPS`]. A build that counts more reasons finds a
    /// smaller pinned map and replaces it (counters only; flows and tables are kept).
    pub const COUNT: u32 = 7;

    /// The label used in metrics and logs.
    pub const fn label(self) -> &'static str {
        match self {
            DropReason::Frag => "frag",
            DropReason::Short => "short",
            DropReason::BadHeader => "bad_header",
            DropReason::NoBackend => "no_backend",
            DropReason::NoMac => "no_mac",
            DropReason::Family => "family",
            DropReason::Split => "split",
        }
    }
}

/// Things the program counts besides verdicts and drops; the key of [`names::XDP_EVENTS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A VIP packet whose flow was in [`names::LB_FLOWS`] with a backend that is up.
    FlowHit = 0,
    /// A VIP packet with no flow entry: a backend was picked from the Maglev table.
    FlowMiss = 1,
    /// A flow entry was written (new flow or re-pick).
    FlowInsert = 2,
    /// A flow entry could not be written (the packet was still forwarded).
    FlowInsertFail = 3,
    /// A flow whose backend is down or removed: picked again from the Maglev table.
    FlowRepick = 4,
    /// A reply of a NAT flow (backend -> client) rewritten back to the VIP.
    NatReply = 5,
    /// A non-TCP packet to a VIP address (ICMP, UDP, ...): passed to the stack.
    VipNotTcp = 6,
    /// A flow-table miss on a packet without SYN (also counted in [`Event::FlowMiss`]): a
    /// connection already under way whose entry is gone. The LRU flow table evicts silently
    /// when full, so this is how evictions show (Katran counts the same "LRU miss on
    /// non-SYN"); a flow that began before the program was attached counts here once too.
    /// The flow is placed again by Maglev: the same backend unless the table changed.
    FlowMissNotSyn = 7,
    /// A multi-buffer frame whose headers (Ethernet, IP with its options, TCP) are not all
    /// in its first buffer: to a VIP it is dropped ([`DropReason::Split`]), anything else
    /// passes untouched.
    HeadersSplit = 8,
}

impl Event {
    /// Every event, in key order.
    pub const ALL: [Event; 9] = [
        Event::FlowHit,
        Event::FlowMiss,
        Event::FlowInsert,
        Event::FlowInsertFail,
        Event::FlowRepick,
        Event::NatReply,
        Event::VipNotTcp,
        Event::FlowMissNotSyn,
        Event::HeadersSplit,
    ];
    /// Number of entries in [`names::XDP_EVENTS`]. A build that counts more events finds a
    /// smaller pinned map and replaces it (counters only; flows and tables are kept).
    pub const COUNT: u32 = 9;

    /// The label used in metrics and logs.
    pub const fn label(self) -> &'static str {
        match self {
            Event::FlowHit => "flow_hit",
            Event::FlowMiss => "flow_miss",
            Event::FlowInsert => "flow_insert",
            Event::FlowInsertFail => "flow_insert_fail",
            Event::FlowRepick => "flow_repick",
            Event::NatReply => "nat_reply",
            Event::VipNotTcp => "vip_not_tcp",
            Event::FlowMissNotSyn => "flow_miss_not_syn",
            Event::HeadersSplit => "headers_split",
        }
    }
}

/// Key of [`names::LB_VIPS`]: a VIP address without port.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    /// Network byte order; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<VipKey>() == 20);

/// Value of [`names::LB_VIPS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipInfo {
    /// How many services listen on this address.
    pub services: u32,
}
const _: () = assert!(core::mem::size_of::<VipInfo>() == 4);

/// Key of [`names::LB_SERVICES`]: VIP, port and protocol.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// Network byte order; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    /// [`PROTO_TCP`].
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);

/// [`Service::flags`]: direct server return (only MACs are rewritten); else NAT.
pub const SVC_DSR: u32 = 1;
/// [`Service::flags`]: the client hash covers ip and port (`maglev`); else ip only
/// (`source_hash`).
pub const SVC_HASH_PORT: u32 = 2;

/// Value of [`names::LB_SERVICES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// The daemon's id of the service; its table starts at `id * stride` of
    /// [`names::LB_MAGLEV`].
    pub id: u32,
    /// [`SVC_DSR`], [`SVC_HASH_PORT`].
    pub flags: u32,
    /// Index of slot 0 of this service's table in [`names::LB_MAGLEV`].
    pub table_off: u32,
    /// Slots in the table (the service's Maglev table size, a prime).
    pub table_size: u32,
}
const _: () = assert!(core::mem::size_of::<Service>() == 16);

/// [`Backend::flags`]: the backend is alive: its established flows stay on it, and it takes
/// new flows unless [`BACKEND_DRAIN`] is set too. Without it, its flows are placed again.
pub const BACKEND_UP: u8 = 1;
/// [`Backend::flags`]: the backend takes no new flows (Maglev walks past it, as the daemon's
/// lookup walks past a backend that is not eligible); established flows stay.
pub const BACKEND_DRAIN: u8 = 2;

/// Value of [`names::LB_BACKENDS`] (index: backend id). An all-zero entry is a removed or
/// never-set backend: not up.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Network byte order; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    /// The MAC that frames to this backend are sent to (the backend's, or its next hop's).
    pub mac: [u8; 6],
    /// [`BACKEND_UP`], [`BACKEND_DRAIN`].
    pub flags: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<Backend>() == 28);

/// Key of [`names::LB_FLOWS`] (client -> VIP) and [`names::LB_NAT_REV`] (backend -> client),
/// as the packet carries it.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Network byte order; IPv4 in the first 4 bytes.
    pub src_addr: [u8; 16],
    /// Network byte order; IPv4 in the first 4 bytes.
    pub dst_addr: [u8; 16],
    /// Host byte order.
    pub src_port: u16,
    /// Host byte order.
    pub dst_port: u16,
    /// [`PROTO_TCP`].
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// Value of [`names::LB_FLOWS`]: where a client's connection goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// Index into [`names::LB_BACKENDS`].
    pub backend_id: u32,
    /// The service the flow was placed by (informational).
    pub service_id: u32,
}
const _: () = assert!(core::mem::size_of::<Flow>() == 8);

/// Value of [`names::LB_NAT_REV`]: how to turn a backend's reply back into the VIP's.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatReply {
    /// The VIP the client connected to (network byte order; IPv4 in the first 4 bytes).
    pub vip_addr: [u8; 16],
    /// Host byte order.
    pub vip_port: u16,
    /// The source MAC of the client's frames (the client's, or its router's): where the
    /// replies are sent.
    pub client_mac: [u8; 6],
    /// The backend the flow is on (informational).
    pub backend_id: u32,
}
const _: () = assert!(core::mem::size_of::<NatReply>() == 28);

/// [`LbConfig::flags`]: some service uses NAT, so TCP packets that match no service are
/// looked up in [`names::LB_NAT_REV`] as possible replies.
pub const CFG_NAT_REPLIES: u16 = 1;

/// The single value of [`names::LB_CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbConfig {
    /// Source MAC of forwarded frames; all zero: the destination MAC of the received frame
    /// (the interface's own, for frames addressed to it).
    pub iface_mac: [u8; 6],
    /// [`CFG_NAT_REPLIES`].
    pub flags: u16,
}
const _: () = assert!(core::mem::size_of::<LbConfig>() == 8);

/// The single value of [`names::LB_META`]: what the pinned map set was created as. Only the
/// daemon reads it; a set with another layout or other sizes is refused (or, when asked,
/// removed and created afresh).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbMeta {
    /// [`LAYOUT_VERSION`] of the daemon that created the maps.
    pub version: u32,
    /// Slots reserved per service in [`names::LB_MAGLEV`] (the largest table size).
    pub maglev_stride: u32,
    /// Services (table segments) in [`names::LB_MAGLEV`].
    pub max_services: u32,
    /// Entries of [`names::LB_BACKENDS`].
    pub max_backends: u32,
    /// Entries of [`names::LB_FLOWS`] and [`names::LB_NAT_REV`].
    pub flow_table_size: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<LbMeta>() == 24);

/// The client hash that picks a Maglev slot: SipHash-2-4 (keys [`sip::CLIENT_KEYS`]) over
/// the client's address octets (4 or 16), followed, for `maglev`, by its port in network
/// byte order. It is the hash the daemon's `balance::maglev` uses for the same lookup, so the
/// kernel and the daemon start at the same slot for a client.
pub mod sip {
    /// The keys of the client hash (`balance::maglev::CLIENT_KEYS`).
    pub const CLIENT_KEYS: (u64, u64) = (0x6c62_2d6d_6167_6c65, 0x762d_636c_6965_6e74);

    #[inline(always)]
    fn round(v: &mut [u64; 4]) {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13);
        v[1] ^= v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16);
        v[3] ^= v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21);
        v[3] ^= v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17);
        v[1] ^= v[2];
        v[2] = v[2].rotate_left(32);
    }

    #[inline(always)]
    fn init() -> [u64; 4] {
        let (k0, k1) = CLIENT_KEYS;
        [
            k0 ^ 0x736f_6d65_7073_6575,
            k1 ^ 0x646f_7261_6e64_6f6d,
            k0 ^ 0x6c79_6765_6e65_7261,
            k1 ^ 0x7465_6462_7974_6573,
        ]
    }

    #[inline(always)]
    fn compress(v: &mut [u64; 4], m: u64) {
        v[3] ^= m;
        round(v);
        round(v);
        v[0] ^= m;
    }

    #[inline(always)]
    fn finish(mut v: [u64; 4]) -> u64 {
        v[2] ^= 0xff;
        round(&mut v);
        round(&mut v);
        round(&mut v);
        round(&mut v);
        v[0] ^ v[1] ^ v[2] ^ v[3]
    }

    /// Hash of an IPv4 client. `addr` and `port` are the words as loaded from the packet on a
    /// little-endian machine (`u32::from_le_bytes(octets)`, `u16::from_le_bytes(port.to_be_bytes())`).
    #[inline(always)]
    pub fn client_v4(addr: u32, port: u16, with_port: bool) -> u64 {
        let mut v = init();
        let last = if with_port {
            (6u64 << 56) | (u64::from(port) << 32) | u64::from(addr)
        } else {
            (4u64 << 56) | u64::from(addr)
        };
        compress(&mut v, last);
        finish(v)
    }

    /// Hash of an IPv6 client. `addr` is the address as four words loaded from the packet on
    /// a little-endian machine; `port` as for [`client_v4`].
    #[inline(always)]
    pub fn client_v6(addr: [u32; 4], port: u16, with_port: bool) -> u64 {
        let mut v = init();
        compress(&mut v, u64::from(addr[0]) | (u64::from(addr[1]) << 32));
        compress(&mut v, u64::from(addr[2]) | (u64::from(addr[3]) << 32));
        let last = if with_port {
            (18u64 << 56) | u64::from(port)
        } else {
            16u64 << 56
        };
        compress(&mut v, last);
        finish(v)
    }
}

/// Value of [`names::SK_PEERS`]: one socket of a connection the kernel relays (keyed by its
/// cookie), where its bytes go, and how many went which way. Written by the kernel only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockPeer {
    /// Cookie of the socket this one's bytes are redirected to (the other side).
    pub peer_cookie: u64,
    /// Bytes the verdict program redirected to the peer.
    pub bytes: u64,
    /// Bytes passed up to this socket's own queue for the daemon to relay.
    pub passed_bytes: u64,
    /// TCP sequence number of the next byte this socket has not yet handed on (valid when
    /// `seq_known` is non-zero; set from the socket's `copied_seq` by the first skb). An skb
    /// that starts before it repeats bytes already handed on, and loses them.
    pub next_seq: u32,
    /// Non-zero once `next_seq` is known.
    pub seq_known: u32,
}
const _: () = assert!(core::mem::size_of::<SockPeer>() == 32);

/// Value of [`names::SK_CTRL`]: what the daemon says about one socket's direction. Written by
/// the daemon only, always whole.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkCtrl {
    /// Non-zero: pass every byte up instead of redirecting it (the peer lags behind).
    pub hold: u32,
    pub _pad: u32,
    /// Bytes the daemon has relayed from this socket's own queue. The program redirects again
    /// only once this has caught up with [`SockPeer::passed_bytes`].
    pub user_bytes: u64,
}
const _: () = assert!(core::mem::size_of::<SkCtrl>() == 16);

/// Key of [`names::SK_STATS`]: what the verdict program did with an skb.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkEvent {
    /// Redirected to the peer socket: skbs.
    Redirect = 0,
    /// Redirected to the peer socket: bytes.
    RedirectBytes = 1,
    /// Passed up to the daemon (held, behind earlier passed bytes, or no target): skbs.
    Passed = 2,
    /// Passed up to the daemon: bytes.
    PassedBytes = 3,
    /// The redirect failed: the peer is not (or no longer) in [`names::SK_SOCKS`].
    NoTarget = 4,
    /// A socket with no [`names::SK_PEERS`] entry: passed up.
    NoPeer = 5,
    /// An skb without data (a FIN alone): dropped; the daemon reads the EOF from TCP. (Queued
    /// in the kernel, it would come out as 0 bytes sent and break the socket with EPIPE.)
    Empty = 6,
    /// An skb that repeated bytes already handed on (TCP queues a retransmit that overlaps
    /// what it has received whole, and the kernel hands the whole skb to the program): skbs
    /// trimmed or dropped.
    Repeat = 7,
    /// Bytes cut from those skbs.
    RepeatBytes = 8,
    /// A repeat that could not be cut (the kernel refused to shrink the skb): skbs. Should
    /// stay 0; anything else means a stream carried repeated bytes.
    RepeatUncut = 9,
}

impl SkEvent {
    pub const ALL: [SkEvent; 10] = [
        SkEvent::Redirect,
        SkEvent::RedirectBytes,
        SkEvent::Passed,
        SkEvent::PassedBytes,
        SkEvent::NoTarget,
        SkEvent::NoPeer,
        SkEvent::Empty,
        SkEvent::Repeat,
        SkEvent::RepeatBytes,
        SkEvent::RepeatUncut,
    ];
    pub const COUNT: u32 = 10;

    /// The label used in metrics (`lb_sockmap_events_total{event=".."}`).
    pub const fn label(self) -> &'static str {
        match self {
            SkEvent::Redirect => "redirect",
            SkEvent::RedirectBytes => "redirect_bytes",
            SkEvent::Passed => "passed",
            SkEvent::PassedBytes => "passed_bytes",
            SkEvent::NoTarget => "no_target",
            SkEvent::NoPeer => "no_peer",
            SkEvent::Empty => "empty",
            SkEvent::Repeat => "repeat",
            SkEvent::RepeatBytes => "repeat_bytes",
            SkEvent::RepeatUncut => "repeat_uncut",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY (all): #[repr(C)] structs of integers and byte arrays whose padding is explicit
    // (sizes asserted above), so every byte is initialised and any bit pattern is valid.
    unsafe impl aya::Pod for super::SockPeer {}
    unsafe impl aya::Pod for super::SkCtrl {}
    unsafe impl aya::Pod for super::XdpCounter {}
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipInfo {}
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::Service {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::NatReply {}
    unsafe impl aya::Pod for super::LbConfig {}
    unsafe impl aya::Pod for super::LbMeta {}
}

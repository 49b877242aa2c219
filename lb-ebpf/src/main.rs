//! lb's kernel side: `xdp_lb`, the XDP balancer.
//!
//! Path of a frame: parse (Ethernet, IPv4 with its real IHL or IPv6, TCP) -> is the
//! destination a service (VIP, port, TCP)? -> flow table hit with a backend that is up, or
//! else the client hash -> Maglev slot -> backend (and a flow entry) -> rewrite (NAT: address,
//! port and checksums; DSR and NAT: MACs) -> `XDP_TX`. A TCP packet that is no service's may
//! be a backend's reply on a NAT flow: it is rewritten back to the VIP. Everything else is
//! passed untouched.
//!
//! Verdicts, deliberately:
//! - not provably for a VIP (not IP, a header too short to hold the destination, a
//!   destination that is no VIP's): `XDP_PASS`, bytes untouched; the stack decides.
//! - for a VIP but not balanceable: fragments, a header cut short, IHL < 5, no usable
//!   backend: `XDP_DROP`, counted by reason in `XDP_DROPS` (the local stack does not own the
//!   service, so passing would only earn the client a reset).
//! - non-TCP to a VIP address (ICMP, ...): `XDP_PASS`, counted as `vip_not_tcp`. TCP to a
//!   VIP address on a port with no service: `XDP_PASS`.
//!
//! Multi-buffer frames: the program is frags-aware (`#[xdp(frags)]`, loaded with
//! `BPF_F_XDP_HAS_FRAGS`), so drivers hand it frames larger than a page (GRO on a veth, jumbo
//! MTUs) instead of refusing to attach it or dropping them. It reads and rewrites only the
//! headers, which are in the first buffer; the payload in the fragments is never read (the
//! checksum updates are incremental) and lengths come from the frame, never from the first
//! buffer's size. A frame whose headers run past the first buffer (no driver is known to
//! split inside the headers) is counted as `headers_split` and gets the verdicts above: not
//! provably a VIP's, `XDP_PASS`; a VIP's, `XDP_DROP` with reason `split` (see
//! [`split_at`]).
//!
//! Entry points are thin; counters are per-CPU; nothing logs per packet.
#![no_std]
#![no_main]

mod csum;
mod pkt;

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use lb_common::{
    BACKEND_DRAIN, BACKEND_UP, Backend, CFG_NAT_REPLIES, DropReason, Event, FAMILY_V4, FAMILY_V6,
    Flow, FlowKey, LbConfig, LbMeta, NatReply, PROTO_TCP, SVC_DSR, SVC_HASH_PORT, Service,
    ServiceKey, VipInfo, VipKey, XdpAction, XdpCounter, sip,
};

use csum::Delta;
use pkt::{
    ETH_LEN, ETH_P_IP_BE, ETH_P_IPV6_BE, IPV4_LEN, IPV6_LEN, TCP_LEN, frame_len, mac_at, ptr_at,
    set_mac_at, set_u16_at, set_u32_at, u8_at, u16_at, u32_at,
};

// Map sizes below are defaults; the daemon sets the real ones at load from its config
// (`EbpfLoader::map_max_entries`). Types, names and layout are `lb_common`'s.

/// Per-CPU packet and byte counts by verdict (key: XDP action code).
#[btf_map]
static XDP_STATS: PerCpuArray<XdpCounter, { XdpAction::COUNT as usize }> = PerCpuArray::new();

/// Per-CPU drops by reason (key: `DropReason`).
#[btf_map]
static XDP_DROPS: PerCpuArray<u64, { DropReason::COUNT as usize }> = PerCpuArray::new();

/// Per-CPU events: flow hits, misses, inserts, re-picks, NAT replies (key: `Event`).
#[btf_map]
static XDP_EVENTS: PerCpuArray<u64, { Event::COUNT as usize }> = PerCpuArray::new();

/// VIP addresses (any port, any protocol): recognises fragments and ICMP for a VIP.
#[btf_map]
static LB_VIPS: HashMap<VipKey, VipInfo, 256> = HashMap::new();

/// VIP, port, protocol -> service.
#[btf_map]
static LB_SERVICES: HashMap<ServiceKey, Service, 256> = HashMap::new();

/// Backend id -> backend.
#[btf_map]
static LB_BACKENDS: Array<Backend, 1024> = Array::new();

/// Every service's Maglev table: `table_off + slot` -> backend id.
#[btf_map]
static LB_MAGLEV: Array<u32, 65537> = Array::new();

/// Client -> VIP 5-tuple -> backend.
#[btf_map]
static LB_FLOWS: LruHashMap<FlowKey, Flow, 65536> = LruHashMap::new();

/// Backend -> client 5-tuple -> the VIP to restore (NAT replies).
#[btf_map]
static LB_NAT_REV: LruHashMap<FlowKey, NatReply, 65536> = LruHashMap::new();

/// Settings: the interface MAC, whether to look for NAT replies.
#[btf_map]
static LB_CONFIG: Array<LbConfig, 1> = Array::new();

/// The pinned map set's layout; only the daemon reads it (declared here so it is created,
/// pinned and typed like the others).
#[btf_map]
static LB_META: Array<LbMeta, 1> = Array::new();

/// Maglev slots tried, from the client's, before giving up with `no_backend`. The daemon's
/// own lookup walks the whole table; the two agree whenever the first usable owner is
/// within this many slots, which for a table with half its weight down fails about once in
/// 2^16 clients.
const MAX_PROBES: u32 = 16;

/// TCP SYN flag (in the flags byte, offset 13 of the TCP header).
const TCP_SYN: u8 = 0x02;

#[xdp(frags)]
pub fn xdp_lb(ctx: XdpContext) -> u32 {
    // The whole frame: a multi-buffer frame is longer than its first buffer.
    let len = frame_len(&ctx);
    let verdict = match try_xdp_lb(&ctx) {
        Ok(verdict) => verdict,
        // A packet for a VIP that cannot be balanced: dropped, not passed, because the local
        // stack does not own the service; counted by reason.
        Err(reason) => {
            count_drop(reason);
            xdp_action::XDP_DROP
        }
    };
    count(verdict, len);
    verdict
}

/// What the parser learned about a TCP packet. Addresses and ports are as stored in the
/// frame (network order loaded natively); an IPv4 address is in word 0.
struct Tcp {
    family: u8,
    /// Frame addresses of the IP and TCP headers (their fixed parts are in bounds).
    l3: usize,
    l4: usize,
    src: [u32; 4],
    dst: [u32; 4],
    sport: u16,
    dport: u16,
    flags: u8,
}

fn try_xdp_lb(ctx: &XdpContext) -> Result<u32, DropReason> {
    // Shorter than an Ethernet header (or one split over buffers): not ours to judge.
    let Some(eth) = ptr_at::<[u8; ETH_LEN]>(ctx, 0) else {
        split_at(ctx, ETH_LEN);
        return Ok(xdp_action::XDP_PASS);
    };
    // SAFETY: the 14 bytes at eth are in bounds.
    let ether_type = unsafe { u16_at(eth + 12) };
    let tcp = if ether_type == ETH_P_IP_BE {
        parse_v4(ctx)?
    } else if ether_type == ETH_P_IPV6_BE {
        parse_v6(ctx)?
    } else {
        None
    };
    match tcp {
        Some(tcp) => balance(eth, &tcp),
        None => Ok(xdp_action::XDP_PASS),
    }
}

/// Parses IPv4 and TCP. `Ok(None)`: pass untouched; `Err`: a VIP packet to drop.
#[inline(always)]
fn parse_v4(ctx: &XdpContext) -> Result<Option<Tcp>, DropReason> {
    // Without the 20 fixed bytes the destination is unknown: not provably a VIP's.
    let Some(ip) = ptr_at::<[u8; IPV4_LEN]>(ctx, ETH_LEN) else {
        split_at(ctx, ETH_LEN + IPV4_LEN);
        return Ok(None);
    };
    // SAFETY: the 20 bytes at ip are in bounds.
    let (vhl, frag, proto, src, dst) = unsafe {
        (
            u8_at(ip),
            u16_at(ip + 6),
            u8_at(ip + 9),
            u32_at(ip + 12),
            u32_at(ip + 16),
        )
    };
    let dst = [dst, 0, 0, 0];
    let ihl = usize::from(vhl & 0x0f) * 4;
    if vhl >> 4 != 4 || ihl < IPV4_LEN {
        return if_vip(FAMILY_V4, &dst, DropReason::BadHeader);
    }
    // MF set or a fragment offset: a non-first fragment has no ports; drop them all for a VIP.
    if frag & 0x3fffu16.to_be() != 0 {
        return if_vip(FAMILY_V4, &dst, DropReason::Frag);
    }
    if proto != PROTO_TCP {
        if is_vip(FAMILY_V4, &dst) {
            event(Event::VipNotTcp);
        }
        return Ok(None);
    }
    // The real header length: options are skipped, not misread as TCP.
    let Some(l4) = ptr_at::<[u8; TCP_LEN]>(ctx, ETH_LEN + ihl) else {
        return if_vip(
            FAMILY_V4,
            &dst,
            short_or_split(ctx, ETH_LEN + ihl + TCP_LEN),
        );
    };
    // SAFETY: the 20 bytes at l4 are in bounds.
    let (sport, dport, flags) = unsafe { (u16_at(l4), u16_at(l4 + 2), u8_at(l4 + 13)) };
    Ok(Some(Tcp {
        family: FAMILY_V4,
        l3: ip,
        l4,
        src: [src, 0, 0, 0],
        dst,
        sport,
        dport,
        flags,
    }))
}

/// Parses IPv6 and TCP (TCP right after the fixed header; a VIP packet with a fragment
/// header is dropped, one with other extension headers is passed like non-TCP).
#[inline(always)]
fn parse_v6(ctx: &XdpContext) -> Result<Option<Tcp>, DropReason> {
    let Some(ip) = ptr_at::<[u8; IPV6_LEN]>(ctx, ETH_LEN) else {
        split_at(ctx, ETH_LEN + IPV6_LEN);
        return Ok(None);
    };
    // SAFETY: the 40 bytes at ip are in bounds.
    let (version, next, src, dst) = unsafe {
        (
            u8_at(ip) >> 4,
            u8_at(ip + 6),
            [
                u32_at(ip + 8),
                u32_at(ip + 12),
                u32_at(ip + 16),
                u32_at(ip + 20),
            ],
            [
                u32_at(ip + 24),
                u32_at(ip + 28),
                u32_at(ip + 32),
                u32_at(ip + 36),
            ],
        )
    };
    if version != 6 {
        return if_vip(FAMILY_V6, &dst, DropReason::BadHeader);
    }
    const NEXTHDR_FRAGMENT: u8 = 44;
    if next == NEXTHDR_FRAGMENT {
        return if_vip(FAMILY_V6, &dst, DropReason::Frag);
    }
    if next != PROTO_TCP {
        if is_vip(FAMILY_V6, &dst) {
            event(Event::VipNotTcp);
        }
        return Ok(None);
    }
    let Some(l4) = ptr_at::<[u8; TCP_LEN]>(ctx, ETH_LEN + IPV6_LEN) else {
        return if_vip(
            FAMILY_V6,
            &dst,
            short_or_split(ctx, ETH_LEN + IPV6_LEN + TCP_LEN),
        );
    };
    // SAFETY: the 20 bytes at l4 are in bounds.
    let (sport, dport, flags) = unsafe { (u16_at(l4), u16_at(l4 + 2), u8_at(l4 + 13)) };
    Ok(Some(Tcp {
        family: FAMILY_V6,
        l3: ip,
        l4,
        src,
        dst,
        sport,
        dport,
        flags,
    }))
}

/// Headers ending at `end` are not in the frame's first buffer: whether the frame holds them
/// all the same, in a multi-buffer frame split inside its headers (counted as
/// `headers_split`), rather than being cut short.
///
/// Such a frame is not balanced: the program rewrites headers in place in the first buffer
/// (`bpf_xdp_store_bytes` could reach further, but drivers, header-data split included, put
/// every header in the first buffer, so the case is not worth a second rewrite path). To a
/// VIP it is dropped rather than passed: the local stack owns the VIP address but not the
/// service, so it would answer with a reset and kill the client's connection, while a drop
/// is retransmitted, and counted.
#[inline(always)]
fn split_at(ctx: &XdpContext, end: usize) -> bool {
    let split = frame_len(ctx) >= end;
    if split {
        event(Event::HeadersSplit);
    }
    split
}

/// Why a VIP packet whose headers end at `end`, past the first buffer, is dropped.
#[inline(always)]
fn short_or_split(ctx: &XdpContext, end: usize) -> DropReason {
    if split_at(ctx, end) {
        DropReason::Split
    } else {
        DropReason::Short
    }
}

/// `Err(reason)` if `dst` is a VIP address, else `Ok(None)` (pass).
#[inline(always)]
fn if_vip(family: u8, dst: &[u32; 4], reason: DropReason) -> Result<Option<Tcp>, DropReason> {
    if is_vip(family, dst) {
        Err(reason)
    } else {
        Ok(None)
    }
}

#[inline(always)]
fn is_vip(family: u8, dst: &[u32; 4]) -> bool {
    let mut key = zeroed_key::<VipKey>();
    key.addr = to_addr(dst);
    key.family = family;
    LB_VIPS.get_ptr(key).is_some()
}

/// Words as loaded from the frame back to the bytes they came from.
#[inline(always)]
fn to_addr(words: &[u32; 4]) -> [u8; 16] {
    // SAFETY: same size, every bit pattern valid; native words hold the wire bytes in order.
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(*words) }
}

/// An address from a map as the four words a frame load would give.
#[inline(always)]
fn to_words(addr: &[u8; 16]) -> [u32; 4] {
    // SAFETY: same size, every bit pattern valid.
    unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(*addr) }
}

/// The flow key of a packet, as it travels.
#[inline(always)]
fn flow_key(p: &Tcp) -> FlowKey {
    let mut key = zeroed_key::<FlowKey>();
    key.src_addr = to_addr(&p.src);
    key.dst_addr = to_addr(&p.dst);
    key.src_port = u16::from_be(p.sport);
    key.dst_port = u16::from_be(p.dport);
    key.proto = PROTO_TCP;
    key.family = p.family;
    key
}

/// An all-zero key, padding included (hash keys are compared byte for byte). Zeroing the
/// whole aligned struct compiles to word stores; a `[0; 3]` pad literal would become a
/// call to `memset`.
#[inline(always)]
fn zeroed_key<K: Copy>() -> K {
    // SAFETY: only used for lb_common's key structs, for which all-zero bytes are valid.
    unsafe { core::mem::zeroed() }
}

#[inline(always)]
fn config() -> LbConfig {
    LB_CONFIG.get(0).copied().unwrap_or_default()
}

/// A service's packet is forwarded; a NAT reply is rewritten back; the rest passes.
#[inline(always)]
fn balance(eth: usize, p: &Tcp) -> Result<u32, DropReason> {
    let key = ServiceKey {
        addr: to_addr(&p.dst),
        port: u16::from_be(p.dport),
        proto: PROTO_TCP,
        family: p.family,
    };
    // SAFETY (get): the value is copied at once; a concurrent update can at worst give a
    // torn copy of one service for one packet.
    if let Some(service) = unsafe { LB_SERVICES.get(key) } {
        let service = *service;
        return forward(eth, p, &service);
    }
    let cfg = config();
    if cfg.flags & CFG_NAT_REPLIES != 0 {
        // SAFETY (get): copied at once, as above.
        if let Some(reply) = unsafe { LB_NAT_REV.get(flow_key(p)) } {
            let reply = *reply;
            nat_reply(eth, p, &reply, &cfg);
            event(Event::NatReply);
            return Ok(xdp_action::XDP_TX);
        }
    }
    Ok(xdp_action::XDP_PASS)
}

/// A packet to a service: flow table or Maglev, then the rewrite for the service's
/// forwarding.
#[inline(always)]
fn forward(eth: usize, p: &Tcp, service: &Service) -> Result<u32, DropReason> {
    let key = flow_key(p);
    // SAFETY (get): copied at once.
    let flow = unsafe { LB_FLOWS.get(key) }.copied();
    let (backend_id, backend, fresh) = match flow {
        Some(flow) => match backend_up(flow.backend_id) {
            Some(backend) => {
                event(Event::FlowHit);
                (flow.backend_id, backend, false)
            }
            // The flow's backend is down or removed: the connection is lost there anyway,
            // so it is placed again as a new one.
            None => {
                event(Event::FlowRepick);
                let (id, backend) = pick(service, p)?;
                (id, backend, true)
            }
        },
        None => {
            event(Event::FlowMiss);
            if p.flags & TCP_SYN == 0 {
                // Under way, yet no entry: evicted (the table is too small), or older
                // than the program.
                event(Event::FlowMissNotSyn);
            }
            let (id, backend) = pick(service, p)?;
            (id, backend, true)
        }
    };
    if backend.mac == [0; 6] {
        return Err(DropReason::NoMac);
    }
    let nat = service.flags & SVC_DSR == 0;
    if nat && backend.family != p.family {
        return Err(DropReason::Family);
    }
    if fresh {
        let flow = Flow {
            backend_id,
            service_id: service.id,
        };
        insert_counted(LB_FLOWS.insert(key, flow, 0));
    }
    let cfg = config();
    // SAFETY: eth was checked for 14 bytes.
    let (to_us, client_mac) = unsafe { (mac_at(eth), mac_at(eth + 6)) };
    if nat {
        // A SYN may open a new connection on an old 5-tuple whose reverse entry was
        // evicted: write it again.
        if fresh || p.flags & TCP_SYN != 0 {
            let mut reverse = zeroed_key::<FlowKey>();
            reverse.src_addr = backend.addr;
            reverse.dst_addr = to_addr(&p.src);
            reverse.src_port = backend.port;
            reverse.dst_port = u16::from_be(p.sport);
            reverse.proto = PROTO_TCP;
            reverse.family = p.family;
            let reply = NatReply {
                vip_addr: to_addr(&p.dst),
                vip_port: u16::from_be(p.dport),
                client_mac,
                backend_id,
            };
            insert_counted(LB_NAT_REV.insert(reverse, reply, 0));
        }
        rewrite(p, Side::Dst, &to_words(&backend.addr), backend.port.to_be());
    }
    let src_mac = if cfg.iface_mac == [0; 6] {
        to_us
    } else {
        cfg.iface_mac
    };
    // SAFETY: eth was checked for 14 bytes.
    unsafe {
        set_mac_at(eth, &backend.mac);
        set_mac_at(eth + 6, &src_mac);
    }
    Ok(xdp_action::XDP_TX)
}

/// A backend's reply on a NAT flow: the source becomes the VIP again, and the frame goes
/// back to the MAC the client's frames came from.
#[inline(always)]
fn nat_reply(eth: usize, p: &Tcp, reply: &NatReply, cfg: &LbConfig) {
    rewrite(
        p,
        Side::Src,
        &to_words(&reply.vip_addr),
        reply.vip_port.to_be(),
    );
    // SAFETY: eth was checked for 14 bytes.
    unsafe {
        let src_mac = if cfg.iface_mac == [0; 6] {
            mac_at(eth)
        } else {
            cfg.iface_mac
        };
        set_mac_at(eth, &reply.client_mac);
        set_mac_at(eth + 6, &src_mac);
    }
}

#[inline(always)]
fn insert_counted(result: Result<(), i32>) {
    event(match result {
        Ok(()) => Event::FlowInsert,
        Err(_) => Event::FlowInsertFail,
    });
}

/// The backend `id` if it is up (established flows stay on a draining backend).
#[inline(always)]
fn backend_up(id: u32) -> Option<Backend> {
    LB_BACKENDS
        .get(id)
        .copied()
        .filter(|b| b.flags & BACKEND_UP != 0)
}

/// The backend `id` if it takes new flows: up and not draining.
#[inline(always)]
fn backend_for_new(id: u32) -> Option<Backend> {
    LB_BACKENDS
        .get(id)
        .copied()
        .filter(|b| b.flags & (BACKEND_UP | BACKEND_DRAIN) == BACKEND_UP)
}

/// Maglev: the client's slot, or the first of the following [`MAX_PROBES`] slots whose
/// backend takes new flows (the daemon's lookup walks the same way).
#[inline(always)]
fn pick(service: &Service, p: &Tcp) -> Result<(u32, Backend), DropReason> {
    let size = service.table_size;
    if size == 0 {
        return Err(DropReason::NoBackend);
    }
    let with_port = service.flags & SVC_HASH_PORT != 0;
    let hash = if p.family == FAMILY_V4 {
        sip::client_v4(p.src[0], p.sport, with_port)
    } else {
        sip::client_v6(p.src, p.sport, with_port)
    };
    let mut slot = (hash % u64::from(size)) as u32;
    for _ in 0..MAX_PROBES {
        if let Some(&id) = LB_MAGLEV.get(service.table_off.wrapping_add(slot))
            && let Some(backend) = backend_for_new(id)
        {
            return Ok((id, backend));
        }
        slot += 1;
        if slot >= size {
            slot = 0;
        }
    }
    Err(DropReason::NoBackend)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Src,
    Dst,
}

/// Rewrites the source or destination address and port, updating the IPv4 header checksum
/// and the TCP checksum (whose pseudo-header covers the addresses) incrementally.
#[inline(always)]
fn rewrite(p: &Tcp, side: Side, addr: &[u32; 4], port_be: u16) {
    let (old, old_port) = match side {
        Side::Src => (&p.src, p.sport),
        Side::Dst => (&p.dst, p.dport),
    };
    let mut delta = Delta::new();
    // SAFETY: l3 holds the fixed IP header (20 or 40 bytes) and l4 the 20-byte TCP header;
    // every offset below is inside them.
    unsafe {
        if p.family == FAMILY_V4 {
            let at = p.l3 + if side == Side::Src { 12 } else { 16 };
            delta.dword(old[0], addr[0]);
            set_u32_at(at, addr[0]);
            set_u16_at(p.l3 + 10, delta.apply(u16_at(p.l3 + 10)));
        } else {
            let at = p.l3 + if side == Side::Src { 8 } else { 24 };
            for i in 0..4 {
                delta.dword(old[i], addr[i]);
                set_u32_at(at + 4 * i, addr[i]);
            }
        }
        delta.word(old_port, port_be);
        set_u16_at(p.l4 + if side == Side::Src { 0 } else { 2 }, port_be);
        set_u16_at(p.l4 + 16, delta.apply(u16_at(p.l4 + 16)));
    }
}

/// Adds one packet of `len` bytes to this CPU's counter for `verdict`.
#[inline(always)]
fn count(verdict: u32, len: usize) {
    if let Some(counter) = XDP_STATS.get_ptr_mut(verdict) {
        // SAFETY: the pointer is this CPU's slot of a per-CPU array; no other CPU writes it and
        // XDP programs are not preempted by themselves on one CPU.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += len as u64;
        }
    }
}

#[inline(always)]
fn count_drop(reason: DropReason) {
    if let Some(counter) = XDP_DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: this CPU's slot of a per-CPU array, as in `count`.
        unsafe { *counter += 1 }
    }
}

#[inline(always)]
fn event(event: Event) {
    if let Some(counter) = XDP_EVENTS.get_ptr_mut(event as u32) {
        // SAFETY: this CPU's slot of a per-CPU array, as in `count`.
        unsafe { *counter += 1 }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

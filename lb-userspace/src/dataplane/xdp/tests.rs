//! The XDP balancer on crafted frames (BPF_PROG_TEST_RUN, no attach): verdicts and exact
//! output bytes. Expected frames are built from scratch with full one's-complement checksums
//! (pseudo-header + whole TCP segment), never with the incremental formula the program
//! uses, so a wrong incremental update shows up as a byte mismatch. Plus: the kernel picks
//! what the daemon's Maglev picks, pinned maps survive a reload, layouts are checked,
//! bpftool prints named fields, and the cost per packet.

use super::*;
use crate::balance::{Algorithm, Candidate, PickCtx, Selector};
use lb_common::{DropReason, Event};
use lb_tests::netns::{VethPair, sh};
use std::net::{Ipv4Addr, Ipv6Addr};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

/// The balancer's interface (the destination MAC of frames addressed to it).
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Where client frames come from (the client, or its router).
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xc1];

/// The MAC of backend `id` in these tests.
fn backend_mac(id: u32) -> [u8; 6] {
    [0x02, 0, 0, 0, 0xb0, id as u8]
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

const VIP: &str = "10.0.0.100:80";
const CLIENT: &str = "192.0.2.7:40000";

/// Backend `id` at 10.0.1.<id>:8080.
fn backend_addr(id: u32) -> SocketAddr {
    SocketAddr::new(Ipv4Addr::new(10, 0, 1, id as u8).into(), 8080)
}

/// Small maps: tests load many objects side by side.
fn options() -> XdpOptions {
    XdpOptions {
        maglev_stride: 257,
        max_services: 4,
        max_backends: 16,
        flow_table_size: 4096,
        fresh: false,
    }
}

// ---- frames ----------------------------------------------------------------------------

const TCP_ACK: u8 = 0x10;
const TCP_SYN: u8 = 0x02;
const PROTO_ICMP: u8 = 1;
/// IPv4 "don't fragment".
const IP_DF: u16 = 0x4000;
/// IPv4 "more fragments".
const IP_MF: u16 = 0x2000;

/// One frame to craft: Ethernet + IPv4 or IPv6 + TCP (or ICMP) + payload.
#[derive(Clone, Debug)]
struct Pkt {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddr,
    dst: SocketAddr,
    proto: u8,
    tcp_flags: u8,
    /// IPv4 options (a multiple of 4 bytes): IHL = 5 + len / 4.
    ip_options: Vec<u8>,
    /// IPv4 flags and fragment offset (host order).
    frag: u16,
    payload: Vec<u8>,
}

impl Pkt {
    /// An ACK with a payload from `src` to `dst`, addressed to the balancer's MAC.
    fn tcp(src: SocketAddr, dst: SocketAddr) -> Pkt {
        Pkt {
            src_mac: CLIENT_MAC,
            dst_mac: LB_MAC,
            src,
            dst,
            proto: lb_common::PROTO_TCP,
            tcp_flags: TCP_ACK,
            ip_options: Vec::new(),
            frag: IP_DF,
            payload: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        }
    }

    /// The frame, with every checksum computed from scratch.
    fn frame(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        if self.proto == lb_common::PROTO_TCP {
            l4.extend_from_slice(&self.src.port().to_be_bytes());
            l4.extend_from_slice(&self.dst.port().to_be_bytes());
            l4.extend_from_slice(&0x0102_0304u32.to_be_bytes()); // seq
            l4.extend_from_slice(&0x0a0b_0c0du32.to_be_bytes()); // ack
            l4.push(5 << 4); // data offset
            l4.push(self.tcp_flags);
            l4.extend_from_slice(&0xfaf0u16.to_be_bytes()); // window
            l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        } else {
            l4.extend_from_slice(&[8, 0, 0, 0, 0x12, 0x34, 0, 1]); // ICMP echo request
        }
        l4.extend_from_slice(&self.payload);

        let mut frame = Vec::new();
        frame.extend_from_slice(&self.dst_mac);
        frame.extend_from_slice(&self.src_mac);
        match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                if self.proto == lb_common::PROTO_TCP {
                    let c = l4_checksum(&src.octets(), &dst.octets(), self.proto, &l4);
                    l4[16..18].copy_from_slice(&c.to_be_bytes());
                } else {
                    let c = checksum(&l4);
                    l4[2..4].copy_from_slice(&c.to_be_bytes());
                }
                frame.extend_from_slice(&0x0800u16.to_be_bytes());
                let ihl = 5 + self.ip_options.len() / 4;
                let total = ihl * 4 + l4.len();
                let mut ip = vec![0x40 | ihl as u8, 0];
                ip.extend_from_slice(&(total as u16).to_be_bytes());
                ip.extend_from_slice(&0x1234u16.to_be_bytes()); // id
                ip.extend_from_slice(&self.frag.to_be_bytes());
                ip.extend_from_slice(&[64, self.proto, 0, 0]);
                ip.extend_from_slice(&src.octets());
                ip.extend_from_slice(&dst.octets());
                ip.extend_from_slice(&self.ip_options);
                let c = checksum(&ip);
                ip[10..12].copy_from_slice(&c.to_be_bytes());
                frame.extend_from_slice(&ip);
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let c = l4_checksum(&src.octets(), &dst.octets(), self.proto, &l4);
                l4[16..18].copy_from_slice(&c.to_be_bytes());
                frame.extend_from_slice(&0x86ddu16.to_be_bytes());
                frame.extend_from_slice(&[0x60, 0, 0, 0]);
                frame.extend_from_slice(&(l4.len() as u16).to_be_bytes());
                frame.extend_from_slice(&[self.proto, 64]);
                frame.extend_from_slice(&src.octets());
                frame.extend_from_slice(&dst.octets());
            }
            _ => panic!("mixed families in one packet"),
        }
        frame.extend_from_slice(&l4);
        frame
    }
}

/// The one's-complement sum of `data` as big-endian 16-bit words (odd tail padded).
fn sum16(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The Internet checksum of `data` (its checksum field zero).
fn checksum(data: &[u8]) -> u16 {
    fold(sum16(data))
}

/// The TCP checksum over the pseudo-header and the whole segment (checksum field zero).
fn l4_checksum(src: &[u8], dst: &[u8], proto: u8, segment: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(src);
    pseudo.extend_from_slice(dst);
    if src.len() == 4 {
        pseudo.extend_from_slice(&[0, proto]);
        pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    } else {
        pseudo.extend_from_slice(&(segment.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, proto]);
    }
    fold(sum16(&pseudo) + sum16(segment))
}

/// Verifies the IPv4 header and TCP checksums of `frame` by summing everything, checksum
/// fields included: a valid one sums to 0xffff.
fn assert_checksums_valid(frame: &[u8]) {
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let (src, dst, l4) = if ethertype == 0x0800 {
        let ihl = usize::from(frame[14] & 0x0f) * 4;
        assert_eq!(fold(sum16(&frame[14..14 + ihl])), 0, "IPv4 header checksum");
        (&frame[26..30], &frame[30..34], &frame[14 + ihl..])
    } else {
        (&frame[22..38], &frame[38..54], &frame[54..])
    };
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(src);
    pseudo.extend_from_slice(dst);
    if src.len() == 4 {
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    } else {
        pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 6]);
    }
    assert_eq!(fold(sum16(&pseudo) + sum16(l4)), 0, "TCP checksum");
}

// ---- fixture ---------------------------------------------------------------------------

/// A loaded (not attached) dataplane with its own pin directory, removed on drop.
struct Fixture {
    dp: XdpDataplane,
    pin_dir: PathBuf,
}

impl Fixture {
    /// `None` (the test skips) without root.
    fn new(test: &str) -> Option<Fixture> {
        Self::with(test, &options())
    }

    fn with(test: &str, options: &XdpOptions) -> Option<Fixture> {
        if !lb_tests::privileged(test) {
            return None;
        }
        let pin_dir = pin_dir_for(test);
        let _ = std::fs::remove_dir_all(&pin_dir);
        let dp = XdpDataplane::load(&pin_dir, options).expect("load XDP object");
        Some(Fixture { dp, pin_dir })
    }

    /// Backends `ids`, all up, at [`backend_addr`] with [`backend_mac`].
    fn backends(&mut self, ids: &[u32]) {
        for &id in ids {
            self.dp
                .set_backend(id, backend_addr(id), backend_mac(id), true)
                .unwrap();
        }
    }

    /// Runs one frame through the program.
    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let (verdict, out, _) = self.dp.run_frame(frame, 1).expect("BPF_PROG_TEST_RUN");
        (verdict, out)
    }

    /// Runs `pkt` and returns the backend its frame was sent to (by destination MAC).
    fn backend_of(&mut self, pkt: &Pkt) -> u32 {
        let (verdict, out) = self.run(&pkt.frame());
        assert_eq!(verdict, XDP_TX, "{pkt:?}");
        assert_eq!(
            out[..5],
            backend_mac(0)[..5],
            "not sent to a backend: {pkt:?}"
        );
        u32::from(out[5])
    }

    fn counters(&self) -> XdpCounters {
        self.dp.counters().unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

fn pin_dir_for(test: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/lb-t{}-{test}", std::process::id()))
}

/// A table of `size` slots alternating over `ids`.
fn table(ids: &[u32], size: usize) -> Vec<u32> {
    (0..size).map(|i| ids[i % ids.len()]).collect()
}

// ---- NAT -------------------------------------------------------------------------------

#[test]
fn xdp_nat_rewrites_client_to_vip_and_reply_back_with_exact_bytes() {
    let Some(mut f) = Fixture::new("xdp_nat") else {
        return;
    };
    f.backends(&[3]);
    f.dp.set_service(sa(VIP), 0, Forwarding::Nat, ClientHash::IpPort, &[3; 257])
        .unwrap();

    // Client -> VIP: destination becomes the backend, MACs: to the backend, from us.
    let pkt = Pkt {
        tcp_flags: TCP_SYN,
        ..Pkt::tcp(sa(CLIENT), sa(VIP))
    };
    let (verdict, out) = f.run(&pkt.frame());
    assert_eq!(verdict, XDP_TX);
    let expected = Pkt {
        dst: backend_addr(3),
        dst_mac: backend_mac(3),
        src_mac: LB_MAC,
        ..pkt.clone()
    };
    assert_eq!(out, expected.frame(), "NAT client -> VIP");
    assert_checksums_valid(&out);
    assert_eq!(f.dp.lookup(sa(CLIENT), sa(VIP)).unwrap(), Some(3));
    assert_eq!(f.dp.flow_count().unwrap(), 1);

    // Backend -> client: source becomes the VIP again, sent to the client's MAC.
    let reply = Pkt {
        src_mac: backend_mac(3),
        dst_mac: LB_MAC,
        tcp_flags: TCP_SYN | TCP_ACK,
        payload: b"HTTP/1.1 200 OK\r\n\r\n".to_vec(),
        ..Pkt::tcp(backend_addr(3), sa(CLIENT))
    };
    let (verdict, out) = f.run(&reply.frame());
    assert_eq!(verdict, XDP_TX);
    let expected = Pkt {
        src: sa(VIP),
        src_mac: LB_MAC,
        dst_mac: CLIENT_MAC,
        ..reply.clone()
    };
    assert_eq!(out, expected.frame(), "NAT reply backend -> client");
    assert_checksums_valid(&out);

    // A second client packet is a flow hit, with the configured interface MAC as source.
    let iface = [0x02, 0, 0, 0, 0, 0x99];
    f.dp.set_interface_mac(iface).unwrap();
    let (verdict, out) = f.run(&Pkt::tcp(sa(CLIENT), sa(VIP)).frame());
    assert_eq!(verdict, XDP_TX);
    let expected = Pkt {
        dst: backend_addr(3),
        dst_mac: backend_mac(3),
        src_mac: iface,
        ..Pkt::tcp(sa(CLIENT), sa(VIP))
    };
    assert_eq!(out, expected.frame());

    let c = f.counters();
    assert_eq!(c.event(Event::FlowMiss), 1, "{c:?}");
    assert_eq!(c.event(Event::FlowHit), 1, "{c:?}");
    assert_eq!(c.event(Event::FlowInsert), 2, "flow + reverse entry: {c:?}");
    assert_eq!(c.event(Event::NatReply), 1, "{c:?}");
    assert_eq!(c.packets(XdpAction::Tx).packets, 3, "{c:?}");
}

#[test]
fn xdp_nat_checksums_hold_over_many_addresses_and_ports() {
    let Some(mut f) = Fixture::with(
        "xdp_nat_csum",
        &XdpOptions {
            max_services: 8,
            ..options()
        },
    ) else {
        return;
    };
    // Addresses and ports chosen to exercise carries: all-ones, zeros, high bytes.
    let v4_clients = ["192.0.2.7:40000", "255.255.255.255:65535", "0.0.0.1:1"];
    let v6_clients = [
        "[2001:db8::7]:40000",
        "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
        "[::2]:1",
    ];
    let cases = [
        ("255.255.255.254:65535", "10.0.0.100:80", v4_clients),
        ("0.0.0.1:1", "255.255.0.255:65535", v4_clients),
        ("172.31.255.0:443", "1.0.0.0:1", v4_clients),
        (
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe]:65535",
            "[2001:db8::100]:80",
            v6_clients,
        ),
        ("[::1]:1", "[ffff::ffff:0:ffff]:65535", v6_clients),
        ("[fd00:0:ffff::1]:8443", "[100::]:1", v6_clients),
    ];
    for (i, (backend, vip, clients)) in cases.into_iter().enumerate() {
        let (backend, id) = (sa(backend), i as u32 + 1);
        f.dp.set_backend(id, backend, backend_mac(id), true)
            .unwrap();
        f.dp.set_service(sa(vip), id, Forwarding::Nat, ClientHash::IpPort, &[id; 7])
            .unwrap();
        for client in clients {
            for payload in [&b""[..], b"x", b"odd length payload"] {
                let pkt = Pkt {
                    payload: payload.to_vec(),
                    ..Pkt::tcp(sa(client), sa(vip))
                };
                let (verdict, out) = f.run(&pkt.frame());
                assert_eq!(verdict, XDP_TX);
                let expected = Pkt {
                    dst: backend,
                    dst_mac: backend_mac(id),
                    src_mac: LB_MAC,
                    ..pkt.clone()
                };
                assert_eq!(out, expected.frame(), "{client} -> {vip} -> {backend}");
                let reply = Pkt {
                    payload: payload.to_vec(),
                    ..Pkt::tcp(backend, sa(client))
                };
                let (verdict, out) = f.run(&reply.frame());
                assert_eq!(verdict, XDP_TX);
                let expected = Pkt {
                    src: sa(vip),
                    src_mac: LB_MAC,
                    dst_mac: CLIENT_MAC,
                    ..reply.clone()
                };
                assert_eq!(out, expected.frame(), "reply {backend} -> {client}");
            }
        }
    }
}

#[test]
fn xdp_ipv4_options_are_skipped_by_ihl() {
    let Some(mut f) = Fixture::new("xdp_options") else {
        return;
    };
    f.backends(&[2]);
    f.dp.set_service(sa(VIP), 0, Forwarding::Nat, ClientHash::IpPort, &[2; 5])
        .unwrap();
    // IHL 6 (NOP, NOP, NOP, EOL), IHL 15 (40 bytes of options).
    for options in [vec![1, 1, 1, 0], vec![1; 40]] {
        let pkt = Pkt {
            ip_options: options.clone(),
            ..Pkt::tcp(sa(CLIENT), sa(VIP))
        };
        let frame = pkt.frame();
        assert_eq!(usize::from(frame[14] & 0x0f), 5 + options.len() / 4);
        let (verdict, out) = f.run(&frame);
        assert_eq!(verdict, XDP_TX, "IHL {}", 5 + options.len() / 4);
        let expected = Pkt {
            dst: backend_addr(2),
            dst_mac: backend_mac(2),
            src_mac: LB_MAC,
            ..pkt.clone()
        };
        assert_eq!(out, expected.frame(), "IHL {}", 5 + options.len() / 4);
        assert_checksums_valid(&out);
    }
}

// ---- DSR and pass ----------------------------------------------------------------------

#[test]
fn xdp_dsr_rewrites_only_macs() {
    let Some(mut f) = Fixture::new("xdp_dsr") else {
        return;
    };
    f.backends(&[4]);
    f.dp.set_service(sa(VIP), 1, Forwarding::Dsr, ClientHash::IpPort, &[4; 3])
        .unwrap();
    let pkt = Pkt::tcp(sa(CLIENT), sa(VIP));
    let frame = pkt.frame();
    let (verdict, out) = f.run(&frame);
    assert_eq!(verdict, XDP_TX);
    let mut expected = frame.clone();
    expected[..6].copy_from_slice(&backend_mac(4));
    expected[6..12].copy_from_slice(&LB_MAC);
    assert_eq!(out, expected);
    // No reverse entry for DSR: one insert.
    assert_eq!(f.counters().event(Event::FlowInsert), 1);
}

#[test]
fn xdp_passes_what_is_not_for_a_vip_untouched() {
    let Some(mut f) = Fixture::new("xdp_pass") else {
        return;
    };
    f.backends(&[1]);
    f.dp.set_service(sa(VIP), 0, Forwarding::Nat, ClientHash::IpPort, &[1; 3])
        .unwrap();
    let mut arp = Pkt::tcp(sa(CLIENT), sa(VIP)).frame();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let frames = [
        // Another address, another port of the VIP, IPv6, ARP.
        Pkt::tcp(sa(CLIENT), sa("10.0.0.101:80")).frame(),
        Pkt::tcp(sa(CLIENT), sa("10.0.0.100:22")).frame(),
        Pkt::tcp(sa("[2001:db8::7]:40000"), sa("[2001:db8::100]:80")).frame(),
        arp,
    ];
    for frame in frames {
        let (verdict, out) = f.run(&frame);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(out, frame);
    }
    let c = f.counters();
    assert_eq!(c.packets(XdpAction::Pass).packets, 4, "{c:?}");
    assert_eq!(f.dp.flow_count().unwrap(), 0);
}

#[test]
fn xdp_non_tcp_to_a_vip_passes_and_is_counted() {
    let Some(mut f) = Fixture::new("xdp_icmp") else {
        return;
    };
    f.backends(&[1]);
    f.dp.set_service(sa(VIP), 0, Forwarding::Nat, ClientHash::IpPort, &[1; 3])
        .unwrap();
    let icmp = Pkt {
        proto: PROTO_ICMP,
        ..Pkt::tcp(sa("192.0.2.7:0"), sa("10.0.0.100:0"))
    }
    .frame();
    let (verdict, out) = f.run(&icmp);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, icmp);
    assert_eq!(f.counters().event(Event::VipNotTcp), 1);
}

// ---- malformed -------------------------------------------------------------------------

#[test]
fn xdp_fragments_to_a_vip_are_dropped_and_others_pass() {
    let Some(mut f) = Fixture::new("xdp_frag") else {
        return;
    };
    f.backends(&[1]);
    f.dp.set_service(sa(VIP), 0, Forwarding::Nat, ClientHash::IpPort, &[1; 3])
        .unwrap();
    for frag in [IP_MF, 0x0010, IP_MF | 0x0010] {
        let to_vip = Pkt {
            frag,
            ..Pkt::tcp(sa(CLIENT), sa(VIP))
        };
        assert_eq!(f.run(&to_vip.frame()).0, XDP_DROP, "frag field {frag:#x}");
        let elsewhere = Pkt {
            frag,
            ..Pkt::tcp(sa(CLIENT), sa("10.0.0.1:80"))
        };
        let frame = elsewhere.frame();
        assert_eq!(f.run(&frame), (XDP_PASS, frame), "frag field {frag:#x}");
    }
    let c = f.counters();
    assert_eq!(c.drops(DropReason::Frag), 3, "{c:?}");
    assert_eq!(c.packets(XdpAction::Drop).packets, 3, "{c:?}");
}

#[test]
fn xdp_truncated_and_malformed_frames_get_a_deliberate_verdict() {
    let Some(mut f) = Fixture::new("xdp_malformed") else {
        return;
    };
    f.backends(&[1]);
    f.dp.set_service(sa(VIP), 0, Forwarding::Nat, ClientHash::IpPort, &[1; 3])
        .unwrap();
    let full = Pkt::tcp(sa(CLIENT), sa(VIP)).frame();
    let with_options = Pkt {
        ip_options: vec![1; 40],
        ..Pkt::tcp(sa(CLIENT), sa(VIP))
    }
    .frame();
    let mut ihl4 = full.clone();
    ihl4[14] = 0x44;
    let mut ihl0 = full.clone();
    ihl0[14] = 0x40;
    let mut version6 = full.clone();
    version6[14] = 0x65;
    let mut ihl4_elsewhere = Pkt::tcp(sa(CLIENT), sa("10.0.0.1:80")).frame();
    ihl4_elsewhere[14] = 0x44;
    let v6 = Pkt::tcp(sa("[2001:db8::7]:40000"), sa("[2001:db8::100]:80"));
    f.dp.set_service(v6.dst, 1, Forwarding::Nat, ClientHash::IpPort, &[1; 3])
        .unwrap();
    let v6 = v6.frame();
    // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header, so the shortest
    // case is a bare Ethernet header.
    let cases: [(&str, &[u8], u32); 10] = [
        ("Ethernet header only", &full[..14], XDP_PASS),
        ("IPv4 header cut at 10 bytes", &full[..24], XDP_PASS),
        ("IPv4 header cut at 19 bytes", &full[..33], XDP_PASS),
        ("TCP header cut at 10 bytes", &full[..44], XDP_DROP),
        ("TCP header cut at 19 bytes", &full[..53], XDP_DROP),
        (
            "IHL 15, frame ends inside the options",
            &with_options[..60],
            XDP_DROP,
        ),
        ("IPv6 TCP header cut", &v6[..60], XDP_DROP),
        ("IHL 4 to a VIP", &ihl4, XDP_DROP),
        ("IHL 0 to a VIP", &ihl0, XDP_DROP),
        ("IHL 4 elsewhere", &ihl4_elsewhere, XDP_PASS),
    ];
    for (what, frame, verdict) in cases {
        let (got, out) = f.run(frame);
        assert_eq!(got, verdict, "{what}");
        assert_eq!(out, frame, "{what}: bytes must be untouched");
    }
    let (got, _) = f.run(&version6);
    assert_eq!(got, XDP_DROP, "version 6 in an IPv4 frame to a VIP");
    let c = f.counters();
    assert_eq!(c.drops(DropReason::Short), 4, "{c:?}");
    assert_eq!(c.drops(DropReason::BadHeader), 3, "{c:?}");
    assert_eq!(f.dp.flow_count().unwrap(), 0);
}

#[test]
fn xdp_drops_when_no_backend_can_take_the_flow() {
    let Some(mut f) = Fixture::new("xdp_nobackend") else {
        return;
    };
    let pkt = Pkt::tcp(sa(CLIENT), sa(VIP));
    // An empty table.
    f.dp.set_service(sa(VIP), 0, Forwarding::Nat, ClientHash::IpPort, &[])
        .unwrap();
    assert_eq!(f.run(&pkt.frame()).0, XDP_DROP);
    // Every backend in the table down.
    f.dp.set_backend(1, backend_addr(1), backend_mac(1), false)
        .unwrap();
    f.dp.set_service(sa(VIP), 0, Forwarding::Nat, ClientHash::IpPort, &[1; 31])
        .unwrap();
    assert_eq!(f.run(&pkt.frame()).0, XDP_DROP);
    // Up, but no MAC to send to.
    f.dp.set_backend(1, backend_addr(1), [0; 6], true).unwrap();
    assert_eq!(f.run(&pkt.frame()).0, XDP_DROP);
    // NAT from an IPv4 VIP to an IPv6 backend.
    f.dp.set_backend(1, sa("[2001:db8::1]:80"), backend_mac(1), true)
        .unwrap();
    assert_eq!(f.run(&pkt.frame()).0, XDP_DROP);
    let c = f.counters();
    assert_eq!(c.drops(DropReason::NoBackend), 2, "{c:?}");
    assert_eq!(c.drops(DropReason::NoMac), 1, "{c:?}");
    assert_eq!(c.drops(DropReason::Family), 1, "{c:?}");
    assert_eq!(f.dp.flow_count().unwrap(), 0);
}

// ---- flows -----------------------------------------------------------------------------

#[test]
fn xdp_established_flow_keeps_its_backend_when_the_table_changes() {
    let Some(mut f) = Fixture::new("xdp_sticky") else {
        return;
    };
    f.backends(&[1, 2]);
    f.dp.set_service(sa(VIP), 0, Forwarding::Dsr, ClientHash::IpPort, &[1; 257])
        .unwrap();
    let old = Pkt::tcp(sa(CLIENT), sa(VIP));
    assert_eq!(f.backend_of(&old), 1);
    // The table now sends everything to 2: the flow stays, a new one moves.
    f.dp.set_service(sa(VIP), 0, Forwarding::Dsr, ClientHash::IpPort, &[2; 257])
        .unwrap();
    assert_eq!(f.backend_of(&old), 1);
    assert_eq!(f.backend_of(&Pkt::tcp(sa("192.0.2.8:40000"), sa(VIP))), 2);
    let c = f.counters();
    assert_eq!(c.event(Event::FlowHit), 1, "{c:?}");
    assert_eq!(c.event(Event::FlowMiss), 2, "{c:?}");
}

#[test]
fn xdp_flow_on_a_backend_that_went_down_is_picked_again() {
    let Some(mut f) = Fixture::new("xdp_repick") else {
        return;
    };
    f.backends(&[1, 2]);
    f.dp.set_service(
        sa(VIP),
        0,
        Forwarding::Nat,
        ClientHash::IpPort,
        &table(&[1, 2], 257),
    )
    .unwrap();
    // Find a client placed on 1.
    let pkt = (0..100)
        .map(|n| Pkt::tcp(sa(&format!("192.0.2.7:{}", 30000 + n)), sa(VIP)))
        .find(|p| f.backend_of(p) == 1)
        .expect("some client lands on backend 1");
    f.dp.set_backend(1, backend_addr(1), backend_mac(1), false)
        .unwrap();
    assert_eq!(f.backend_of(&pkt), 2);
    assert_eq!(f.dp.lookup(pkt.src, sa(VIP)).unwrap(), Some(2));
    // Back up: the flow stays where it is now.
    f.dp.set_backend(1, backend_addr(1), backend_mac(1), true)
        .unwrap();
    assert_eq!(f.backend_of(&pkt), 2);
    // Removed entirely: the same as down.
    f.dp.remove_backend(2).unwrap();
    assert_eq!(f.backend_of(&pkt), 1);
    assert_eq!(f.counters().event(Event::FlowRepick), 2);
}

#[test]
fn xdp_draining_backend_keeps_its_flows_and_takes_no_new_ones() {
    let Some(mut f) = Fixture::new("xdp_drain") else {
        return;
    };
    f.backends(&[1, 2]);
    f.dp.set_service(
        sa(VIP),
        0,
        Forwarding::Nat,
        ClientHash::IpPort,
        &table(&[1, 2], 257),
    )
    .unwrap();
    let clients: Vec<Pkt> = (0..40)
        .map(|n| Pkt::tcp(sa(&format!("192.0.2.9:{}", 20000 + n)), sa(VIP)))
        .collect();
    let placed: Vec<u32> = clients.iter().map(|p| f.backend_of(p)).collect();
    assert!(placed.contains(&1) && placed.contains(&2), "{placed:?}");
    f.dp.set_backend_state(1, backend_addr(1), backend_mac(1), BackendState::Draining)
        .unwrap();
    // Established flows stay where they are, on 1 too.
    let again: Vec<u32> = clients.iter().map(|p| f.backend_of(p)).collect();
    assert_eq!(again, placed);
    // New flows all go to 2.
    for n in 0..40 {
        let pkt = Pkt::tcp(sa(&format!("192.0.2.10:{}", 20000 + n)), sa(VIP));
        assert_eq!(f.backend_of(&pkt), 2);
    }
    assert_eq!(f.counters().event(Event::FlowRepick), 0);
}

#[test]
fn xdp_picks_the_backend_the_daemons_maglev_picks() {
    let Some(mut f) = Fixture::new("xdp_maglev") else {
        return;
    };
    const M: usize = 251;
    let candidates: Vec<Candidate> = (1..=5)
        .map(|i| Candidate {
            key: backend_addr(i).to_string(),
            weight: i,
        })
        .collect();
    f.backends(&[1, 2, 3, 4, 5]);
    // Backend id = candidate index + 1.
    let id_of = |index: usize| index as u32 + 1;
    let cases = [
        (
            Algorithm::Maglev,
            ClientHash::IpPort,
            "10.0.0.100:80",
            false,
        ),
        (
            Algorithm::SourceHash,
            ClientHash::Ip,
            "10.0.0.100:81",
            false,
        ),
        (
            Algorithm::Maglev,
            ClientHash::IpPort,
            "[2001:db8::100]:80",
            true,
        ),
        (
            Algorithm::SourceHash,
            ClientHash::Ip,
            "[2001:db8::100]:81",
            true,
        ),
    ];
    for (service, (algorithm, hash, vip, v6)) in cases.into_iter().enumerate() {
        let selector = Selector::new(algorithm, &candidates, M).unwrap();
        let view = selector.maglev_table().unwrap();
        let ids: Vec<u32> = view.entries().iter().map(|&i| id_of(i as usize)).collect();
        f.dp.set_service(sa(vip), service as u32, Forwarding::Dsr, hash, &ids)
            .unwrap();
        let client = |n: u32| -> SocketAddr {
            let port = (1024 + (n * 7919) % 60000) as u16;
            let w = n as u16;
            if v6 {
                SocketAddr::new(Ipv6Addr::new(0x2001, 0xdb8, 0, w, 0, 0, w, 1).into(), port)
            } else {
                SocketAddr::new(
                    Ipv4Addr::new(198, 51, (n / 200) as u8, (n % 200) as u8).into(),
                    port,
                )
            }
        };
        let all_up = [true; 5];
        let pick = |client: SocketAddr, eligible: &[bool]| {
            id_of(
                selector
                    .pick(&PickCtx {
                        client,
                        eligible,
                        active: &[0; 5],
                        exclude: &[],
                        random: 0,
                    })
                    .unwrap(),
            )
        };
        for n in 0..150 {
            let c = client(n);
            let kernel = f.backend_of(&Pkt::tcp(c, sa(vip)));
            assert_eq!(kernel, ids[view.slot_for(c).unwrap()], "{algorithm} {c}");
            assert_eq!(kernel, pick(c, &all_up), "{algorithm} {c}");
        }
        // With backend 3 down (or draining), new clients walk on from their slot exactly as
        // the daemon does with it not eligible.
        let state = if v6 {
            BackendState::Draining
        } else {
            BackendState::Down
        };
        f.dp.set_backend_state(3, backend_addr(3), backend_mac(3), state)
            .unwrap();
        let eligible = [true, true, false, true, true];
        for n in 1000..1150 {
            let c = client(n);
            assert_eq!(
                f.backend_of(&Pkt::tcp(c, sa(vip))),
                pick(c, &eligible),
                "{algorithm} {c} with backend 3 down"
            );
        }
        f.dp.set_backend(3, backend_addr(3), backend_mac(3), true)
            .unwrap();
    }
}

// ---- IPv6 ------------------------------------------------------------------------------

#[test]
fn xdp_ipv6_nat_and_dsr() {
    let Some(mut f) = Fixture::new("xdp_v6") else {
        return;
    };
    let vip = sa("[2001:db8::100]:443");
    let dsr_vip = sa("[2001:db8::101]:443");
    let client = sa("[2001:db8:ffff::7]:51000");
    let backend = sa("[fd00::b:1]:8443");
    f.dp.set_backend(7, backend, backend_mac(7), true).unwrap();
    f.dp.set_service(vip, 0, Forwarding::Nat, ClientHash::IpPort, &[7; 11])
        .unwrap();
    f.dp.set_service(dsr_vip, 1, Forwarding::Dsr, ClientHash::IpPort, &[7; 11])
        .unwrap();

    let pkt = Pkt::tcp(client, vip);
    let (verdict, out) = f.run(&pkt.frame());
    assert_eq!(verdict, XDP_TX);
    let expected = Pkt {
        dst: backend,
        dst_mac: backend_mac(7),
        src_mac: LB_MAC,
        ..pkt.clone()
    };
    assert_eq!(out, expected.frame());
    assert_checksums_valid(&out);
    assert_eq!(f.dp.lookup(client, vip).unwrap(), Some(7));

    let reply = Pkt {
        src_mac: backend_mac(7),
        ..Pkt::tcp(backend, client)
    };
    let (verdict, out) = f.run(&reply.frame());
    assert_eq!(verdict, XDP_TX);
    let expected = Pkt {
        src: vip,
        src_mac: LB_MAC,
        dst_mac: CLIENT_MAC,
        ..reply.clone()
    };
    assert_eq!(out, expected.frame());
    assert_checksums_valid(&out);

    let frame = Pkt::tcp(client, dsr_vip).frame();
    let (verdict, out) = f.run(&frame);
    assert_eq!(verdict, XDP_TX);
    let mut expected = frame.clone();
    expected[..6].copy_from_slice(&backend_mac(7));
    expected[6..12].copy_from_slice(&LB_MAC);
    assert_eq!(out, expected);

    // Fragment header to the VIP: dropped.
    let mut frag = Pkt::tcp(client, vip).frame();
    frag[20] = 44;
    assert_eq!(f.run(&frag).0, XDP_DROP);
    assert_eq!(f.counters().drops(DropReason::Frag), 1);
}

// ---- multi-buffer frames ---------------------------------------------------------------

/// A payload that makes a jumbo frame (MTU 9000): more than BPF_PROG_TEST_RUN's first buffer
/// (a page less headroom and shared info, about 3.5 KB) holds, so the kernel hands the program
/// a multi-buffer frame with the rest in page fragments, as a driver does.
fn jumbo_payload() -> Vec<u8> {
    (0..8900u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

#[test]
fn xdp_multi_buffer_frames_are_rewritten_in_their_first_buffer() {
    let Some(mut f) = Fixture::new("xdp_frags") else {
        return;
    };
    f.backends(&[3, 7]);
    f.dp.set_service(sa(VIP), 0, Forwarding::Nat, ClientHash::IpPort, &[3; 257])
        .unwrap();
    let vip6 = sa("[2001:db8::100]:443");
    let dsr6 = sa("[2001:db8::101]:443");
    let client6 = sa("[2001:db8:ffff::7]:51000");
    let backend6 = sa("[fd00::b:1]:8443");
    f.dp.set_backend(7, backend6, backend_mac(7), true).unwrap();
    f.dp.set_service(vip6, 1, Forwarding::Nat, ClientHash::IpPort, &[7; 11])
        .unwrap();
    f.dp.set_service(dsr6, 2, Forwarding::Dsr, ClientHash::IpPort, &[7; 11])
        .unwrap();

    // Each case: the frame in, and the frame that must come out (whole: the fragments
    // untouched, the checksums right over the whole segment).
    let nat = Pkt {
        tcp_flags: TCP_SYN,
        payload: jumbo_payload(),
        ..Pkt::tcp(sa(CLIENT), sa(VIP))
    };
    let reply = Pkt {
        src_mac: backend_mac(3),
        payload: jumbo_payload(),
        ..Pkt::tcp(backend_addr(3), sa(CLIENT))
    };
    let nat6 = Pkt {
        payload: jumbo_payload(),
        ..Pkt::tcp(client6, vip6)
    };
    let reply6 = Pkt {
        src_mac: backend_mac(7),
        payload: jumbo_payload(),
        ..Pkt::tcp(backend6, client6)
    };
    let dsr = Pkt {
        payload: jumbo_payload(),
        ..Pkt::tcp(client6, dsr6)
    };
    let cases = [
        (
            "NAT client -> VIP",
            nat.clone(),
            Pkt {
                dst: backend_addr(3),
                dst_mac: backend_mac(3),
                src_mac: LB_MAC,
                ..nat
            },
        ),
        (
            "NAT reply",
            reply.clone(),
            Pkt {
                src: sa(VIP),
                src_mac: LB_MAC,
                dst_mac: CLIENT_MAC,
                ..reply
            },
        ),
        (
            "IPv6 NAT client -> VIP",
            nat6.clone(),
            Pkt {
                dst: backend6,
                dst_mac: backend_mac(7),
                src_mac: LB_MAC,
                ..nat6
            },
        ),
        (
            "IPv6 NAT reply",
            reply6.clone(),
            Pkt {
                src: vip6,
                src_mac: LB_MAC,
                dst_mac: CLIENT_MAC,
                ..reply6
            },
        ),
        (
            "IPv6 DSR",
            dsr.clone(),
            Pkt {
                dst_mac: backend_mac(7),
                src_mac: LB_MAC,
                ..dsr
            },
        ),
    ];
    let mut bytes = 0;
    for (what, pkt, expected) in cases {
        let frame = pkt.frame();
        assert!(frame.len() > 4096, "{what}: a multi-buffer frame");
        bytes += frame.len() as u64;
        let (verdict, out) = f.run(&frame);
        assert_eq!(verdict, XDP_TX, "{what}");
        assert_eq!(out.len(), frame.len(), "{what}: the whole frame comes out");
        assert!(out == expected.frame(), "{what}: bytes differ");
        assert_checksums_valid(&out);
    }
    let c = f.counters();
    // Whole frames counted, not only their first buffers.
    assert_eq!(c.packets(XdpAction::Tx).packets, 5, "{c:?}");
    assert_eq!(c.packets(XdpAction::Tx).bytes, bytes, "{c:?}");
    assert_eq!(c.event(Event::HeadersSplit), 0, "{c:?}");

    // A jumbo frame to a VIP whose TCP header is cut short is still short (its first buffer
    // holds all of it), and one that is not for a VIP passes untouched.
    let mut cut = Pkt {
        payload: jumbo_payload(),
        ..Pkt::tcp(sa(CLIENT), sa(VIP))
    }
    .frame();
    cut.truncate(44);
    assert_eq!(f.run(&cut).0, XDP_DROP);
    assert_eq!(f.counters().drops(DropReason::Short), 1);
    let other = Pkt {
        payload: jumbo_payload(),
        ..Pkt::tcp(sa(CLIENT), sa("10.0.0.1:80"))
    }
    .frame();
    let (verdict, out) = f.run(&other);
    assert_eq!(verdict, XDP_PASS);
    assert!(out == other, "passed untouched");
}

// ---- pins and layout -------------------------------------------------------------------

#[test]
fn xdp_pinned_maps_survive_a_reload_and_another_layout_is_refused() {
    let test = "xdp_pins";
    if !lb_tests::privileged(test) {
        return;
    }
    let pin_dir = pin_dir_for(test);
    let _ = std::fs::remove_dir_all(&pin_dir);
    let pkt = Pkt::tcp(sa(CLIENT), sa(VIP));
    {
        let mut dp = XdpDataplane::load(&pin_dir, &options()).unwrap();
        dp.set_backend(1, backend_addr(1), backend_mac(1), true)
            .unwrap();
        dp.set_service(sa(VIP), 0, Forwarding::Nat, ClientHash::IpPort, &[1; 5])
            .unwrap();
        assert_eq!(dp.run_frame(&pkt.frame(), 1).unwrap().0, XDP_TX);
    }
    // A restart with the same layout finds the flow, the service and the NAT flag.
    {
        let mut dp = XdpDataplane::load(&pin_dir, &options()).unwrap();
        assert_eq!(dp.lookup(sa(CLIENT), sa(VIP)).unwrap(), Some(1));
        let reply = Pkt::tcp(backend_addr(1), sa(CLIENT));
        assert_eq!(dp.run_frame(&reply.frame(), 1).unwrap().0, XDP_TX);
        assert_eq!(dp.counters().unwrap().event(Event::FlowMiss), 1);
    }
    // A counters map of another size (an older build counting fewer events) is replaced;
    // the flows are kept.
    let older_events = || {
        let older = pin_dir.join(names::XDP_EVENTS);
        std::fs::remove_file(&older).unwrap();
        sh(&[
            "bpftool",
            "map",
            "create",
            older.to_str().unwrap(),
            "type",
            "percpu_array",
            "key",
            "4",
            "value",
            "8",
            "entries",
            "7",
            "name",
            names::XDP_EVENTS,
        ]);
    };
    older_events();
    {
        let dp = XdpDataplane::load(&pin_dir, &options()).unwrap();
        assert_eq!(dp.lookup(sa(CLIENT), sa(VIP)).unwrap(), Some(1));
        assert_eq!(dp.counters().unwrap().event(Event::FlowMiss), 0);
        let info = MapInfo::from_pin(pin_dir.join(names::XDP_EVENTS)).unwrap();
        assert_eq!(info.max_entries(), Event::COUNT);
    }
    // Other sizes: refused, and nothing is changed.
    let bigger = XdpOptions {
        flow_table_size: 8192,
        ..options()
    };
    // (with an old counters map too: a refused start leaves that pin as it was)
    older_events();
    let err = XdpDataplane::load(&pin_dir, &bigger)
        .err()
        .expect("refused");
    assert!(matches!(err, XdpError::Layout { .. }), "{err}");
    assert!(err.to_string().contains("LB_FLOWS"), "{err}");
    let info = MapInfo::from_pin(pin_dir.join(names::XDP_EVENTS)).unwrap();
    assert_eq!(
        info.max_entries(),
        7,
        "a refused start replaced a counters map"
    );
    // Another layout version in LB_META: refused too.
    {
        let data = MapData::from_pin(pin_dir.join(names::LB_META)).unwrap();
        let mut meta: Array<MapData, LbMeta> = Array::try_from(Map::Array(data)).unwrap();
        let mut old = meta.get(&0, 0).unwrap();
        old.version = LAYOUT_VERSION + 1;
        meta.set(0, old, 0).unwrap();
    }
    let err = XdpDataplane::load(&pin_dir, &options())
        .err()
        .expect("refused");
    assert!(err.to_string().contains("layout version"), "{err}");
    // Fresh: the old set is removed, and the flows with it.
    let dp = XdpDataplane::load(
        &pin_dir,
        &XdpOptions {
            fresh: true,
            ..bigger
        },
    )
    .unwrap();
    assert_eq!(dp.lookup(sa(CLIENT), sa(VIP)).unwrap(), None);
    drop(dp);
    std::fs::remove_dir_all(&pin_dir).unwrap();
}

/// The LRU flow table evicts silently when full; the connections that lose their entry show
/// up as misses without SYN when their next packet comes.
#[test]
fn xdp_evicted_flows_are_counted_as_misses_without_syn() {
    let Some(mut f) = Fixture::with(
        "xdp_evict",
        &XdpOptions {
            flow_table_size: 512,
            ..options()
        },
    ) else {
        return;
    };
    f.backends(&[1, 2]);
    f.dp.set_service(
        sa(VIP),
        0,
        Forwarding::Dsr,
        ClientHash::IpPort,
        &table(&[1, 2], 257),
    )
    .unwrap();
    let client = |port: u16| SocketAddr::new(Ipv4Addr::new(192, 0, 2, 7).into(), port);
    // Four times the table's size in new connections (SYN): misses, but none without SYN.
    for port in 0..2048u16 {
        let syn = Pkt {
            tcp_flags: TCP_SYN,
            ..Pkt::tcp(client(20_000 + port), sa(VIP))
        };
        assert_eq!(f.run(&syn.frame()).0, XDP_TX);
    }
    let c = f.dp.counters().unwrap();
    assert_eq!(c.event(Event::FlowMiss), 2048);
    assert_eq!(c.event(Event::FlowMissNotSyn), 0);
    assert!(f.dp.flow_count().unwrap() <= 512);
    // The first connection's entry is gone; its next packet (an ACK) counts.
    assert_eq!(f.dp.lookup(client(20_000), sa(VIP)).unwrap(), None);
    let ack = Pkt::tcp(client(20_000), sa(VIP));
    assert_eq!(f.run(&ack.frame()).0, XDP_TX);
    let c = f.dp.counters().unwrap();
    assert_eq!(c.event(Event::FlowMissNotSyn), 1);
    assert_eq!(c.event(Event::FlowMiss), 2049);
    // Placed again (on the same backend: the table did not change), so the next one hits.
    assert!(f.dp.lookup(client(20_000), sa(VIP)).unwrap().is_some());
    assert_eq!(f.run(&ack.frame()).0, XDP_TX);
    assert_eq!(f.dp.counters().unwrap().event(Event::FlowMissNotSyn), 1);
}

#[test]
fn xdp_rejects_ids_and_tables_out_of_range() {
    let Some(mut f) = Fixture::new("xdp_ranges") else {
        return;
    };
    let o = options();
    assert!(matches!(
        f.dp.set_backend(o.max_backends, backend_addr(1), backend_mac(1), true),
        Err(XdpError::OutOfRange { .. })
    ));
    let too_long = vec![1; o.maglev_stride as usize + 1];
    for (id, table) in [
        (o.max_services, &[1u32][..]),
        (0, &too_long),
        (0, &[o.max_backends]),
    ] {
        assert!(matches!(
            f.dp.set_service(sa(VIP), id, Forwarding::Nat, ClientHash::IpPort, table),
            Err(XdpError::OutOfRange { .. })
        ));
    }
    f.dp.set_service(sa(VIP), 0, Forwarding::Nat, ClientHash::IpPort, &[1])
        .unwrap();
    assert!(matches!(
        f.dp.set_service(
            sa("10.0.0.9:80"),
            0,
            Forwarding::Nat,
            ClientHash::IpPort,
            &[1]
        ),
        Err(XdpError::ServiceIdInUse { .. })
    ));
    // Removing the service: its VIP is no VIP any more.
    f.dp.remove_service(sa(VIP)).unwrap();
    let frame = Pkt {
        frag: IP_MF,
        ..Pkt::tcp(sa(CLIENT), sa(VIP))
    }
    .frame();
    assert_eq!(f.run(&frame).0, XDP_PASS);
}

#[test]
fn xdp_bpftool_prints_every_map_with_named_fields() {
    let Some(mut f) = Fixture::new("xdp_bpftool") else {
        return;
    };
    f.backends(&[1, 2]);
    f.dp.set_interface_mac([0x02, 0, 0, 0, 0, 0x99]).unwrap();
    f.dp.set_service(
        sa(VIP),
        0,
        Forwarding::Nat,
        ClientHash::IpPort,
        &table(&[1, 2], 7),
    )
    .unwrap();
    f.run(&Pkt::tcp(sa(CLIENT), sa(VIP)).frame());
    let expect: [(&str, &[&str]); 11] = [
        (names::XDP_STATS, &["\"packets\"", "\"bytes\""]),
        (names::XDP_DROPS, &["\"values\""]),
        (names::XDP_EVENTS, &["\"values\""]),
        (names::LB_VIPS, &["\"addr\"", "\"services\": 1"]),
        (
            names::LB_SERVICES,
            &["\"port\": 80", "\"table_off\"", "\"table_size\": 7"],
        ),
        (
            names::LB_BACKENDS,
            &["\"port\": 8080", "\"mac\"", "\"flags\": 1"],
        ),
        (names::LB_MAGLEV, &["\"value\": 2"]),
        (names::LB_FLOWS, &["\"src_port\": 40000", "\"backend_id\""]),
        (names::LB_NAT_REV, &["\"vip_port\": 80", "\"client_mac\""]),
        (names::LB_CONFIG, &["\"iface_mac\"", "\"flags\": 1"]),
        (
            names::LB_META,
            &["\"version\": 1", "\"maglev_stride\": 257"],
        ),
    ];
    let mut all = String::new();
    for (name, fields) in expect {
        let out = sh(&[
            "bpftool",
            "map",
            "dump",
            "pinned",
            f.pin_dir.join(name).to_str().unwrap(),
        ]);
        let dump = String::from_utf8_lossy(&out.stdout);
        for field in fields {
            assert!(dump.contains(field), "{name}: no {field} in\n{dump}");
        }
        all.push_str(&format!("### {name}\n{dump}\n"));
    }
    if let Ok(path) = std::env::var("LB_XDP_DUMP") {
        std::fs::write(path, all).unwrap();
    }
}

// ---- cost ------------------------------------------------------------------------------

/// ns per packet with BPF_PROG_TEST_RUN. Printed (run with --nocapture); asserted only
/// against a generous bound, since a shared machine's figures move from run to run.
#[test]
fn xdp_cost_per_packet() {
    let Some(mut f) = Fixture::new("xdp_cost") else {
        return;
    };
    const REPEAT: u32 = 1_000_000;
    // The machine is shared: each figure is the least disturbed of a few runs.
    const TRIES: usize = 5;
    f.backends(&[1]);
    f.dp.set_service(sa(VIP), 0, Forwarding::Dsr, ClientHash::IpPort, &[1; 257])
        .unwrap();
    // NAT whose backend is the VIP itself: the full rewrite runs, and the output frame is
    // again a hit on the same flow, so `repeat` measures established NAT flows.
    let nat_vip = sa("10.0.0.200:80");
    f.dp.set_backend(9, nat_vip, backend_mac(9), true).unwrap();
    f.dp.set_service(nat_vip, 1, Forwarding::Nat, ClientHash::IpPort, &[9; 257])
        .unwrap();
    let ns = |d: std::time::Duration| d.as_nanos() as f64;

    let dsr_hit = Pkt::tcp(sa(CLIENT), sa(VIP)).frame();
    f.run(&dsr_hit);
    let best = |f: &mut Fixture, frame: &[u8], want: u32| {
        (0..TRIES)
            .map(|_| {
                let (v, _, d) = f.dp.run_frame(frame, REPEAT).unwrap();
                assert_eq!(v, want);
                d
            })
            .min()
            .unwrap()
    };
    let dsr = best(&mut f, &dsr_hit, XDP_TX);
    let nat_hit = Pkt::tcp(sa(CLIENT), nat_vip).frame();
    f.run(&nat_hit);
    let nat = best(&mut f, &nat_hit, XDP_TX);
    let pass = Pkt::tcp(sa(CLIENT), sa("10.0.0.1:80")).frame();
    let pass_cost = best(&mut f, &pass, XDP_PASS);
    // The floor: a frame the program gives up on after the Ethernet header (ARP). What is
    // left is BPF_PROG_TEST_RUN's own loop and the indirect call into the program.
    let mut arp = pass.clone();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let floor = best(&mut f, &arp, XDP_PASS);

    // New flows cannot repeat (the second run is a hit): one run per new client, and the
    // same for the pass case to see what a single run's timer adds.
    const FLOWS: u32 = 3000;
    let mut new_total = 0.0;
    let mut pass_total = 0.0;
    for n in 0..FLOWS {
        let frame = Pkt::tcp(
            SocketAddr::new(Ipv4Addr::new(198, 18, (n >> 8) as u8, n as u8).into(), 1000),
            sa(VIP),
        )
        .frame();
        let (v, _, d) = f.dp.run_frame(&frame, 1).unwrap();
        assert_eq!(v, XDP_TX);
        new_total += ns(d);
        let (_, _, d) = f.dp.run_frame(&pass, 1).unwrap();
        pass_total += ns(d);
    }
    let new_flow = new_total / f64::from(FLOWS);
    let pass_single = pass_total / f64::from(FLOWS);
    println!(
        "xdp ns/packet: established DSR {:.1}, established NAT {:.1}, non-VIP TCP pass {:.1}, \
         floor (ARP) {:.1} (best of {TRIES} runs of repeat {REPEAT}); new flow {:.1} (single runs; a single non-VIP \
         pass run measures {:.1}, so about {:.1} of that is timer)",
        ns(dsr),
        ns(nat),
        ns(pass_cost),
        ns(floor),
        new_flow,
        pass_single,
        pass_single - ns(pass_cost)
    );
    let c = f.counters();
    assert_eq!(c.event(Event::FlowMiss), u64::from(FLOWS) + 2, "{c:?}");
    assert!(ns(dsr) < 2000.0 && ns(nat) < 2000.0, "absurdly slow");
    drop(f);

    // Programming a production-size table (M = 65537): one syscall per slot.
    let big = XdpOptions {
        maglev_stride: 65_537,
        max_services: 1,
        ..options()
    };
    let Some(mut f) = Fixture::with("xdp_cost_table", &big) else {
        return;
    };
    f.backends(&[1, 2, 3]);
    let table = table(&[1, 2, 3], 65_537);
    let start = std::time::Instant::now();
    f.dp.set_service(sa(VIP), 0, Forwarding::Dsr, ClientHash::IpPort, &table)
        .unwrap();
    println!(
        "xdp set_service with a 65537-slot table: {:.0} ms",
        start.elapsed().as_secs_f64() * 1000.0
    );
}

// ---- attached --------------------------------------------------------------------------

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
        let mut dp = XdpDataplane::load(&pin, &options()).expect("load XDP object");
        let mode = dp.attach(&b_if, None).expect("attach");
        tx.send(mode).unwrap();
        done_rx.recv().unwrap();
        let counters = dp.counters().expect("read counters");
        drop(dp);
        counters
    });
    let mode = rx.recv().unwrap();
    // Auto on a veth attaches generic (native veth XDP loses checksum-offload state; see
    // attach_link).
    assert_eq!(mode, AttachMode::Generic);
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
    let pass = counters.packets(XdpAction::Pass);
    assert!(
        pass.packets >= 20,
        "expected at least 20 packets passed, counters: {counters:?}"
    );
    assert!(
        pass.bytes >= 20 * 98,
        "20 ICMP echo frames are at least 98 bytes each: {counters:?}"
    );
    let others: u64 = counters
        .packets
        .iter()
        .filter(|(a, _)| *a != XdpAction::Pass)
        .map(|(_, c)| c.packets)
        .sum();
    assert_eq!(
        others, 0,
        "no service is configured: all passes: {counters:?}"
    );
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

// ---- end to end ------------------------------------------------------------------------

/// The MAC of `interface` inside `ns`.
fn mac_of(ns: &lb_tests::netns::NetNs, interface: &str) -> [u8; 6] {
    let out = ns.exec(&["cat", &format!("/sys/class/net/{interface}/address")]);
    crate::sys::parse_mac(String::from_utf8_lossy(&out.stdout).trim()).expect("a MAC")
}

/// Real TCP connections through the program attached (generic mode) to a veth: a client,
/// the balancer and a backend on one bridge, the client in another subnet so the
/// backend's replies go back through the balancer. NAT both ways, flow entries, replies.
#[test]
fn xdp_nat_carries_real_tcp_connections_on_a_bridge() {
    use lb_tests::netns::{NetNs, unique};
    use std::io::{Read as _, Write as _};
    if !lb_tests::privileged("xdp_nat_e2e") {
        return;
    }
    let switch = NetNs::new("lbsw");
    let client = NetNs::new("lbc");
    let lb = NetNs::new("lbl");
    let backend = NetNs::new("lbk");
    switch.exec(&["ip", "link", "add", "br0", "type", "bridge"]);
    switch.exec(&["ip", "link", "set", "br0", "up"]);
    let mut inner = Vec::new();
    for ns in [&client, &lb, &backend] {
        let (outer, port) = (unique("e"), unique("p"));
        sh(&[
            "ip",
            "link",
            "add",
            &outer,
            "netns",
            &ns.name,
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            &switch.name,
        ]);
        switch.exec(&["ip", "link", "set", &port, "master", "br0"]);
        switch.exec(&["ip", "link", "set", &port, "up"]);
        ns.exec(&["ip", "link", "set", &outer, "up"]);
        inner.push(outer);
    }
    let (c_if, l_if, k_if) = (&inner[0], &inner[1], &inner[2]);
    client.exec(&["ip", "addr", "add", "10.78.0.10/24", "dev", c_if]);
    client.exec(&["ip", "route", "add", "10.79.0.0/24", "via", "10.78.0.2"]);
    lb.exec(&["ip", "addr", "add", "10.78.0.2/24", "dev", l_if]);
    lb.exec(&["ip", "addr", "add", "10.77.0.2/24", "dev", l_if]);
    backend.exec(&["ip", "addr", "add", "10.77.0.20/24", "dev", k_if]);
    backend.exec(&["ip", "route", "add", "default", "via", "10.77.0.2"]);
    let backend_mac = mac_of(&backend, k_if);

    // The backend: echoes one message per connection, upper-cased.
    let backend_ns = backend.name.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/var/run/netns/{backend_ns}")).unwrap();
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let listener = std::net::TcpListener::bind("10.77.0.20:8080").unwrap();
        ready_tx.send(()).unwrap();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut buf = [0u8; 64];
            let n = stream.read(&mut buf).unwrap_or(0);
            let _ = stream.write_all(&buf[..n].to_ascii_uppercase());
        }
    });
    ready_rx.recv().unwrap();

    // The balancer: loads, programs and attaches from inside its namespace.
    let pin_dir = pin_dir_for("xdp_nat_e2e");
    let _ = std::fs::remove_dir_all(&pin_dir);
    let (lb_ns, l_if, pin) = (lb.name.clone(), l_if.clone(), pin_dir.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let worker = std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/var/run/netns/{lb_ns}")).unwrap();
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let mut dp = XdpDataplane::load(&pin, &options()).unwrap();
        dp.set_backend(5, sa("10.77.0.20:8080"), backend_mac, true)
            .unwrap();
        dp.set_service(
            sa("10.79.0.100:80"),
            0,
            Forwarding::Nat,
            ClientHash::IpPort,
            &[5; 257],
        )
        .unwrap();
        dp.attach(&l_if, Some(AttachMode::Generic)).unwrap();
        tx.send(()).unwrap();
        done_rx.recv().unwrap();
        let result = (
            dp.counters().unwrap(),
            dp.flow_count().unwrap(),
            dp.lookup(sa("10.78.0.10:45000"), sa("10.79.0.100:80"))
                .unwrap(),
        );
        drop(dp);
        result
    });
    rx.recv().unwrap();

    // The client: connections to the VIP, one from a fixed port to look up afterwards.
    let client_ns = client.name.clone();
    let replies = std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/var/run/netns/{client_ns}")).unwrap();
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        (0..5)
            .map(|i| {
                let socket =
                    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                        .unwrap();
                if i == 0 {
                    socket.bind(&sa("10.78.0.10:45000").into()).unwrap();
                }
                socket
                    .connect_timeout(
                        &sa("10.79.0.100:80").into(),
                        std::time::Duration::from_secs(5),
                    )
                    .expect("connect to the VIP");
                let mut stream: std::net::TcpStream = socket.into();
                stream
                    .set_read_timeout(Some(std::time::Duration::from_secs(5)))
                    .unwrap();
                stream.write_all(format!("hello {i}").as_bytes()).unwrap();
                let mut reply = String::new();
                stream.read_to_string(&mut reply).unwrap();
                assert_eq!(stream.peer_addr().unwrap(), sa("10.79.0.100:80"));
                reply
            })
            .collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    done_tx.send(()).unwrap();
    let (counters, flows, placed) = worker.join().unwrap();
    assert_eq!(
        replies,
        (0..5).map(|i| format!("HELLO {i}")).collect::<Vec<_>>()
    );
    assert_eq!(flows, 5, "{counters:?}");
    assert_eq!(placed, Some(5));
    assert_eq!(counters.event(Event::FlowMiss), 5, "{counters:?}");
    assert!(counters.event(Event::NatReply) >= 10, "{counters:?}");
    assert_eq!(counters.packets(XdpAction::Drop).packets, 0, "{counters:?}");
    let _ = std::fs::remove_dir_all(&pin_dir);
}

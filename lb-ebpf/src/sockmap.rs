//! lb's kernel side for the sockmap dataplane: `lb_sk_verdict`, a stream verdict program on
//! the `SK_SOCKS` SOCKHASH.
//!
//! The daemon accepts the client, connects the backend, then puts each socket's peer in
//! `SK_PEERS` and both sockets in `SK_SOCKS` (keyed by socket cookie). From then on every skb
//! that arrives on one socket is redirected to the egress of the other: the bytes never reach
//! userspace.
//!
//! Order is kept by one rule: once a byte of a direction has been passed up to the daemon
//! instead of redirected, every later byte is passed up too until the daemon has relayed all
//! of them (`SockPeer::passed_bytes` <= `SkCtrl::user_bytes`). So no byte ever overtakes
//! another, whichever path each one takes.
//!
//! Verdicts, deliberately (an skb here carries bytes TCP has already acknowledged, so it is
//! never dropped):
//! - redirect to the peer's egress, when the daemon holds nothing back (`SkCtrl::hold` 0),
//!   has relayed every byte passed up so far, and the peer is in `SK_SOCKS`.
//! - otherwise `SK_PASS` to the socket's own queue, where the daemon reads and relays it:
//!   the daemon holds the direction (its peer lags behind: back pressure, the kernel's redirect
//!   queue has no bound of its own), or bytes passed up earlier are still unrelayed, or the
//!   redirect failed (the peer is not in `SK_SOCKS` yet, or no longer).
//! - an skb without data (a FIN alone): `SK_DROP`. It carries no byte, and the FIN is TCP
//!   state the daemon reads (EOF). Passed or redirected, an empty skb that waits in the
//!   kernel's socket queue comes out as "0 bytes sent", taken for a broken pipe (EPIPE).
//! - a socket without an `SK_PEERS` entry: `SK_PASS`.
//!
//! Repeats, cut before any verdict: TCP queues a retransmit that partly overlaps bytes it has
//! already received as one whole skb (a tail loss probe does this), and the kernel's stream
//! parser hands that whole skb to this program, overlap included (`tcp_read_skb` ignores
//! `copied_seq`, unlike `recvmsg`). Forwarded as it is, the peer would receive the overlap
//! twice. So the program keeps, per socket, the sequence number of the next byte it has not
//! handed on (`SockPeer::next_seq`, started from the socket's `copied_seq`, which also covers
//! a head skb the daemon read part of before the hand-over), cuts what comes before it from
//! the skb's head, and drops an skb with nothing new in it. The sequence number lives in the
//! skb's control block (`TCP_SKB_CB(skb)->seq`) and `copied_seq` in the `tcp_sock`; no BPF
//! context exposes either, so they are read at offsets the daemon takes from the kernel's BTF
//! at load (`LB_OFF_*`).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::sk_action,
    btf_maps::{HashMap, PerCpuArray, SockHash},
    helpers::{bpf_get_socket_cookie, bpf_probe_read_kernel},
    macros::{btf_map, stream_verdict},
    programs::SkBuffContext,
};
use lb_common::{SkCtrl, SkEvent, SockPeer};

/// Socket cookie -> socket: both sockets of every connection the kernel relays (the program
/// is attached here). The daemon sets the size at load (`max_connections` of all services,
/// twice).
#[btf_map]
static SK_SOCKS: SockHash<u64, 65536> = SockHash::new();

/// Socket cookie -> its peer and byte counts (written by this program; the daemon creates and
/// deletes entries).
#[btf_map]
static SK_PEERS: HashMap<u64, SockPeer, 65536> = HashMap::new();

/// Socket cookie -> what the daemon says about that socket's direction (written by the
/// daemon only).
#[btf_map]
static SK_CTRL: HashMap<u64, SkCtrl, 65536> = HashMap::new();

/// Per-CPU counters by [`SkEvent`].
#[btf_map]
static SK_STATS: PerCpuArray<u64, { SkEvent::COUNT as usize }> = PerCpuArray::new();

/// Byte offset of `sk_buff.cb` (whose first word is `TCP_SKB_CB(skb)->seq`); set at load.
#[unsafe(no_mangle)]
static LB_OFF_SKB_CB: u32 = 0;
/// Byte offset of `sk_buff.sk`; set at load.
#[unsafe(no_mangle)]
static LB_OFF_SKB_SK: u32 = 0;
/// Byte offset of `tcp_sock.copied_seq`; set at load.
#[unsafe(no_mangle)]
static LB_OFF_TCP_COPIED: u32 = 0;

/// The most bytes one `bpf_skb_adjust_room` call may cut from an `sk_skb` (the kernel's limit).
const CUT_STEP: u32 = 4095;
/// Calls per skb: up to 1 MiB of repeat, far above any skb TCP builds.
const CUT_CALLS: u32 = 256;

#[stream_verdict]
pub fn lb_sk_verdict(ctx: SkBuffContext) -> u32 {
    let len = u64::from(ctx.len());
    if len == 0 {
        // A FIN alone. Its news is TCP state the daemon reads (EOF); the skb carries no byte.
        // Passed or redirected, an empty skb that has to wait in the kernel's socket queue
        // comes out as "0 bytes sent", which the kernel takes for a broken pipe (EPIPE).
        add(SkEvent::Empty, 1);
        return sk_action::SK_DROP;
    }
    // SAFETY: bpf_get_socket_cookie takes the program's context (the skb); it cannot fail.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let Some(peer) = SK_PEERS.get_ptr_mut(cookie) else {
        add(SkEvent::NoPeer, 1);
        return sk_action::SK_PASS;
    };
    // SAFETY: `peer` is this socket's entry, written only by this program, which the kernel
    // runs for one socket at a time (see below).
    let len = u64::from(unsafe { cut_repeat(&ctx, &mut *peer, len as u32) });
    if len == 0 {
        return sk_action::SK_DROP;
    }
    let (hold, user_bytes) = match SK_CTRL.get_ptr(cookie) {
        // SAFETY: a valid map value; the daemon replaces it whole (a hash map update swaps
        // in a new element), so the two fields are read from one version.
        Some(ctrl) => unsafe { ((*ctrl).hold, (*ctrl).user_bytes) },
        None => (0, 0),
    };
    // SAFETY: `peer` points at this socket's entry. Only this program writes it, and the
    // kernel runs it for one socket at a time (under the socket's receive path), so the
    // plain read-modify-writes below do not race; the daemon only reads.
    unsafe {
        if hold == 0 && (*peer).passed_bytes <= user_bytes {
            let mut key = (*peer).peer_cookie;
            if SK_SOCKS.redirect_skb(&ctx, &mut key, 0) == i64::from(sk_action::SK_PASS) {
                (*peer).bytes += len;
                add(SkEvent::Redirect, 1);
                add(SkEvent::RedirectBytes, len);
                return sk_action::SK_PASS;
            }
            add(SkEvent::NoTarget, 1);
        }
        (*peer).passed_bytes += len;
    }
    add(SkEvent::Passed, 1);
    add(SkEvent::PassedBytes, len);
    sk_action::SK_PASS
}

/// Cuts from the head of the skb the bytes this socket has already handed on, and moves
/// `next_seq` past the skb. Returns the skb's length after the cut (0: nothing new, drop it).
#[inline(always)]
fn cut_repeat(ctx: &SkBuffContext, peer: &mut SockPeer, len: u32) -> u32 {
    // SAFETY: globals of this object, read-only after load.
    let (off_cb, off_sk, off_copied) = unsafe {
        (
            core::ptr::read_volatile(&LB_OFF_SKB_CB),
            core::ptr::read_volatile(&LB_OFF_SKB_SK),
            core::ptr::read_volatile(&LB_OFF_TCP_COPIED),
        )
    };
    if off_cb == 0 || off_sk == 0 || off_copied == 0 {
        return len;
    }
    // For an sk_skb program the context pointer is the kernel's `struct sk_buff`.
    let skb = ctx.skb.skb as *const u8;
    // SAFETY: bpf_probe_read_kernel reads kernel memory safely (a fault returns an error);
    // the offsets come from the running kernel's BTF.
    let Ok(seq) =
        (unsafe { bpf_probe_read_kernel(skb.wrapping_add(off_cb as usize).cast::<u32>()) })
    else {
        return len;
    };
    if peer.seq_known == 0 {
        // The first skb of this socket: everything before `copied_seq` has been read already
        // (by the daemon, before the hand-over), nothing after it has been handed on.
        // SAFETY: as above.
        let copied = unsafe {
            bpf_probe_read_kernel(skb.wrapping_add(off_sk as usize).cast::<u64>()).and_then(|sk| {
                bpf_probe_read_kernel(
                    (sk as usize as *const u8)
                        .wrapping_add(off_copied as usize)
                        .cast::<u32>(),
                )
            })
        };
        let Ok(copied) = copied else {
            return len;
        };
        peer.next_seq = copied;
        peer.seq_known = 1;
    }
    let end = seq.wrapping_add(len);
    let repeat = peer.next_seq.wrapping_sub(seq) as i32;
    if end.wrapping_sub(peer.next_seq) as i32 > 0 {
        peer.next_seq = end;
    }
    if repeat <= 0 {
        return len;
    }
    let mut cut = (repeat as u32).min(len);
    add(SkEvent::Repeat, 1);
    add(SkEvent::RepeatBytes, u64::from(cut));
    let mut left = len;
    for _ in 0..CUT_CALLS {
        if cut == 0 {
            break;
        }
        let step = cut.min(CUT_STEP);
        if ctx.adjust_room(-(step as i32), 0, 0).is_err() {
            break;
        }
        cut -= step;
        left -= step;
    }
    if cut != 0 {
        add(SkEvent::RepeatUncut, 1);
    }
    left
}

#[inline(always)]
fn add(event: SkEvent, n: u64) {
    if let Some(counter) = SK_STATS.get_ptr_mut(event as u32) {
        // SAFETY: this CPU's slot of a per-CPU array; the program is not preempted by itself
        // on one CPU.
        unsafe { *counter += n };
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

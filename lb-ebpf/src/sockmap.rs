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
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::sk_action,
    btf_maps::{HashMap, PerCpuArray, SockHash},
    helpers::bpf_get_socket_cookie,
    macros::{btf_map, stream_verdict},
    programs::SkBuffContext,
};
use lb_common::{SkCtrl, SkEvent, SockPeer};

/// Socket cookie -> socket: both sockets of every connection the kernel relays (the program
/// is attached here). The daemon sets the size at load (`max_connections` of all services,
/// twice).
#[btf_map]
static SK_SOCKS: SockHash<u64, 65536> = SockHash::new();

/// Socket cookie -> socket: sockets on their way out of the kernel path (no program here).
/// While a socket is in this map its psock lives on, with the bytes still queued in it, after
/// it has left `SK_SOCKS`; the daemon takes those bytes, then removes it.
#[btf_map]
static SK_PARK: SockHash<u64, 65536> = SockHash::new();

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

//! lb's kernel side for the sockmap dataplane: `lb_sk_verdict`, a stream verdict program on
//! the `SK_SOCKS` SOCKHASH.
//!
//! The daemon accepts the client, connects the backend, then puts both sockets in `SK_SOCKS`
//! (keyed by socket cookie) and each one's peer in `SK_PEERS`. From then on every skb that
//! arrives on one socket is redirected to the egress of the other: the bytes never reach
//! userspace.
//!
//! Verdicts, deliberately (an skb here carries bytes TCP has already acknowledged, so it is
//! never dropped):
//! - the socket has a peer and the redirect succeeds: `SK_PASS` with the redirect set.
//! - the redirect fails (the peer is not in `SK_SOCKS` yet, or no longer): `SK_PASS` to the
//!   socket's own queue, where the daemon reads and relays it; the direction is marked
//!   `SK_PASSING` so every later byte follows the same path and none overtakes another.
//! - a socket without an `SK_PEERS` entry: `SK_PASS` to its own queue.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::sk_action,
    btf_maps::{HashMap, PerCpuArray, SockHash},
    helpers::bpf_get_socket_cookie,
    macros::{btf_map, stream_verdict},
    programs::SkBuffContext,
};
use lb_common::{SK_PASSING, SkEvent, SockPeer};

/// Socket cookie -> socket: both sockets of every connection the kernel relays. The daemon
/// sets the size at load (`max_connections` of all services, twice).
#[btf_map]
static SK_SOCKS: SockHash<u64, 65536> = SockHash::new();

/// Socket cookie -> its peer and byte counts.
#[btf_map]
static SK_PEERS: HashMap<u64, SockPeer, 65536> = HashMap::new();

/// Per-CPU counters by [`SkEvent`].
#[btf_map]
static SK_STATS: PerCpuArray<u64, { SkEvent::COUNT as usize }> = PerCpuArray::new();

#[stream_verdict]
pub fn lb_sk_verdict(ctx: SkBuffContext) -> u32 {
    // SAFETY: bpf_get_socket_cookie takes the program's context (the skb); it cannot fail.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let len = u64::from(ctx.len());
    let Some(peer) = SK_PEERS.get_ptr_mut(cookie) else {
        add(SkEvent::NoPeer, 1);
        return sk_action::SK_PASS;
    };
    // SAFETY: `peer` points at this socket's entry. Only this program writes it, and the
    // kernel runs it for one socket at a time (under the socket's receive path), so the
    // plain read-modify-writes below do not race; the daemon only reads.
    unsafe {
        if (*peer).flags & SK_PASSING == 0 {
            let mut key = (*peer).peer_cookie;
            if SK_SOCKS.redirect_skb(&ctx, &mut key, 0) == i64::from(sk_action::SK_PASS) {
                (*peer).bytes += len;
                add(SkEvent::Redirect, 1);
                add(SkEvent::RedirectBytes, len);
                return sk_action::SK_PASS;
            }
            (*peer).flags |= SK_PASSING;
        }
        (*peer).passed_bytes += len;
    }
    add(SkEvent::Passed, 1);
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

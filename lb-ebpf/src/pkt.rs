//! Bounds-checked access to the frame.
//!
//! [`ptr_at`] is the only way to get a pointer into the frame: it proves to the verifier (and
//! to us) that `size_of::<T>()` bytes are there. Loads and stores go through the `*_at`
//! helpers, which are unaligned: behind a 14-byte Ethernet header nothing is 4-byte aligned.
//!
//! Multi-buffer frames (XDP frags: GRO on a veth, an MTU above a page on a NIC): `ptr_at`
//! reaches only the first buffer, `ctx.data()..ctx.data_end()`, which drivers fill with the
//! headers and the start of the payload; the rest of the frame is in fragments the program
//! never touches. [`frame_len`] is the length of the whole frame.

use aya_ebpf::{helpers::bpf_xdp_get_buff_len, programs::XdpContext};

/// Length of an Ethernet header (no VLAN tags: tagged frames are passed).
pub const ETH_LEN: usize = 14;
/// EtherType of IPv4, as loaded from the frame (network order read natively).
pub const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
/// EtherType of IPv6, as loaded from the frame.
pub const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
/// Length of an IPv4 header without options.
pub const IPV4_LEN: usize = 20;
/// Length of the fixed IPv6 header.
pub const IPV6_LEN: usize = 40;
/// Length of a TCP header without options.
pub const TCP_LEN: usize = 20;

/// The address of `size_of::<T>()` bytes at `off` into the frame, if the frame's first buffer
/// has them (all of a frame that is not multi-buffer).
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<usize> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some(start + off)
}

/// The length of the whole frame, fragments included (`data_end - data` is only the first
/// buffer's).
#[inline(always)]
pub fn frame_len(ctx: &XdpContext) -> usize {
    // SAFETY: `ctx.ctx` is the context the kernel passed to this program, what the helper
    // takes; it only reads the frame's lengths.
    unsafe { bpf_xdp_get_buff_len(ctx.ctx) as usize }
}

/// Loads a `u8` at `p`.
///
/// # Safety
/// `p` lies inside a range returned by [`ptr_at`].
#[inline(always)]
pub unsafe fn u8_at(p: usize) -> u8 {
    // SAFETY: the caller's range check covers this byte.
    unsafe { (p as *const u8).read() }
}

/// Loads a `u16` at `p` as stored (network order stays network order).
///
/// # Safety
/// `p..p + 2` lies inside a range returned by [`ptr_at`].
#[inline(always)]
pub unsafe fn u16_at(p: usize) -> u16 {
    // SAFETY: the caller's range check covers these bytes; unaligned is fine.
    unsafe { (p as *const u16).read_unaligned() }
}

/// Loads a `u32` at `p` as stored.
///
/// # Safety
/// `p..p + 4` lies inside a range returned by [`ptr_at`].
#[inline(always)]
pub unsafe fn u32_at(p: usize) -> u32 {
    // SAFETY: the caller's range check covers these bytes; unaligned is fine.
    unsafe { (p as *const u32).read_unaligned() }
}

/// Stores a `u16` at `p` as given.
///
/// # Safety
/// `p..p + 2` lies inside a range returned by [`ptr_at`].
#[inline(always)]
pub unsafe fn set_u16_at(p: usize, v: u16) {
    // SAFETY: the caller's range check covers these bytes; unaligned is fine.
    unsafe { (p as *mut u16).write_unaligned(v) }
}

/// Stores a `u32` at `p` as given.
///
/// # Safety
/// `p..p + 4` lies inside a range returned by [`ptr_at`].
#[inline(always)]
pub unsafe fn set_u32_at(p: usize, v: u32) {
    // SAFETY: the caller's range check covers these bytes; unaligned is fine.
    unsafe { (p as *mut u32).write_unaligned(v) }
}

/// Copies a MAC address to `p`.
///
/// # Safety
/// `p..p + 6` lies inside a range returned by [`ptr_at`].
#[inline(always)]
pub unsafe fn set_mac_at(p: usize, mac: &[u8; 6]) {
    // SAFETY: the caller's range check covers these bytes.
    unsafe {
        set_u32_at(p, u32::from_ne_bytes([mac[0], mac[1], mac[2], mac[3]]));
        set_u16_at(p + 4, u16::from_ne_bytes([mac[4], mac[5]]));
    }
}

/// Loads a MAC address at `p`.
///
/// # Safety
/// `p..p + 6` lies inside a range returned by [`ptr_at`].
#[inline(always)]
pub unsafe fn mac_at(p: usize) -> [u8; 6] {
    // SAFETY: the caller's range check covers these bytes.
    let (a, b) = unsafe { (u32_at(p).to_ne_bytes(), u16_at(p + 4).to_ne_bytes()) };
    [a[0], a[1], a[2], a[3], b[0], b[1]]
}

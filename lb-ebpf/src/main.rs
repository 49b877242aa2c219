//! lb's kernel side.
//!
//! - `xdp_lb`: the XDP program. Today it counts every packet per CPU by verdict in
//!   `XDP_STATS` and passes it on; the balancer (parse -> VIP -> flow/Maglev -> rewrite ->
//!   verdict) grows from here.
//!
//! Entry points are thin; counters are per-CPU; nothing logs per packet.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action, btf_maps::PerCpuArray, macros::btf_map, macros::xdp, programs::XdpContext,
};
use lb_common::{XdpAction, XdpCounter};

/// Per-CPU packet and byte counts by verdict (key: XDP action code).
#[btf_map]
static XDP_STATS: PerCpuArray<XdpCounter, { XdpAction::COUNT as usize }> = PerCpuArray::new();

#[xdp]
pub fn xdp_lb(ctx: XdpContext) -> u32 {
    let verdict = xdp_action::XDP_PASS;
    count(verdict, ctx.data_end() - ctx.data());
    verdict
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

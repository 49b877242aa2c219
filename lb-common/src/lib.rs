//! The wire contract between lb's eBPF programs (`lb-ebpf`) and its daemon (`lb-userspace`).
//!
//! Everything here is shared byte for byte with the kernel: `#[repr(C)]`, no `bool`, no
//! `Option`, no implicit padding, sizes asserted at compile time, byte order in field names.
//! Map names are constants used on both sides (and as the file names under the bpffs pin
//! directory). Nothing else lives here.
#![no_std]

/// Names of the maps and programs. Kernel names are cut at 15 characters: keep them short.
pub mod names {
    /// Per-CPU XDP counters: key = XDP action code (see [`crate::XdpAction`]), value =
    /// [`crate::XdpCounter`]. Pinned as `<pin_path>/XDP_STATS`.
    pub const XDP_STATS: &str = "XDP_STATS";
    /// The XDP program.
    pub const XDP_PROG: &str = "xdp_lb";
}

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

#[cfg(feature = "user")]
mod user {
    // SAFETY: XdpCounter is #[repr(C)], made only of u64s, with no padding (size asserted).
    unsafe impl aya::Pod for super::XdpCounter {}
}

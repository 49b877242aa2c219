//! Incremental Internet checksum updates (RFC 1624, equation 3: `HC' = ~(~HC + ~m + m')`).
//!
//! Every word is handled as loaded from memory (native byte order): the one's-complement sum
//! does not depend on byte order as long as the checksum field is loaded and stored the same
//! way, so no swapping is needed.

/// The running sum `~m + m'` of the words a rewrite changes.
#[derive(Clone, Copy)]
pub struct Delta(u32);

impl Delta {
    #[inline(always)]
    pub const fn new() -> Self {
        Delta(0)
    }

    /// A 16-bit word changes from `old` to `new`.
    #[inline(always)]
    pub fn word(&mut self, old: u16, new: u16) {
        self.0 += u32::from(!old) + u32::from(new);
    }

    /// A 32-bit word (two 16-bit words) changes from `old` to `new`.
    #[inline(always)]
    pub fn dword(&mut self, old: u32, new: u32) {
        let not_old = !old;
        self.0 += (not_old & 0xffff) + (not_old >> 16) + (new & 0xffff) + (new >> 16);
    }

    /// The checksum after the change, given the one before. At most 20 words are ever
    /// added (an IPv6 address pair and a port), so the sum stays below 2^21 and two folds
    /// bring it to 16 bits.
    #[inline(always)]
    pub fn apply(self, check: u16) -> u16 {
        let mut sum = u32::from(!check) + self.0;
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        !(sum as u16)
    }
}

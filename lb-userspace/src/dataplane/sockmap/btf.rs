//! Field offsets of kernel structures, read from the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`).
//!
//! The sockmap verdict program reads three kernel fields that no BPF context exposes (see
//! `lb_sk_verdict`): the sequence number of an skb and the socket's `copied_seq`. Their
//! offsets change with the kernel's build, so the daemon looks them up here and hands them to
//! the program as constants at load.
//!
//! Only what that needs is parsed: the type section's records, walked to find a struct by
//! name and a member by name (through anonymous structs and unions). aya parses BTF too but
//! keeps member access private; the one crate made for this (btf-rs) is LGPL.

use std::path::Path;

/// Where the kernel's own BTF lives.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} is not BTF this parser understands ({1})")]
    Format(String, &'static str),
    #[error("the kernel's BTF has no struct {0}")]
    NoStruct(String),
    #[error("the kernel's BTF has no member {1} in struct {0}")]
    NoMember(String, String),
}

/// One type record: its kind, name, the size-or-type word, and its members (struct/union).
struct Ty {
    kind: u32,
    name: u32,
    size_or_type: u32,
    /// (name, type id, offset in bits) of each member.
    members: Vec<(u32, u32, u32)>,
}

/// Parsed BTF: the types (index = type id - 1) and the string section.
pub struct Btf {
    source: String,
    types: Vec<Ty>,
    strings: Vec<u8>,
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

impl Btf {
    /// The running kernel's BTF.
    pub fn kernel() -> Result<Btf, BtfError> {
        Btf::from_file(Path::new(VMLINUX))
    }

    pub fn from_file(path: &Path) -> Result<Btf, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Btf::parse(&data, &path.display().to_string())
    }

    /// Parses little-endian BTF (this machine's byte order is checked by the magic).
    pub fn parse(data: &[u8], source: &str) -> Result<Btf, BtfError> {
        let bad = |why| BtfError::Format(source.to_string(), why);
        let magic = data.get(0..2).ok_or(bad("too short"))?;
        if u16::from_le_bytes([magic[0], magic[1]]) != MAGIC {
            return Err(bad("bad magic"));
        }
        let word = |at| u32_at(data, at).ok_or(bad("header cut short"));
        let hdr_len = word(4)? as usize;
        let (type_off, type_len) = (word(8)? as usize, word(12)? as usize);
        let (str_off, str_len) = (word(16)? as usize, word(20)? as usize);
        let section = |off: usize, len: usize| {
            data.get(hdr_len + off..hdr_len + off + len)
                .ok_or(bad("section past the end"))
        };
        let type_data = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?.to_vec();
        let mut types = Vec::new();
        let mut at = 0;
        while at < type_data.len() {
            let word = |i: usize| u32_at(type_data, at + i).ok_or(bad("type cut short"));
            let (name, info, size_or_type) = (word(0)?, word(4)?, word(8)?);
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            at += 12;
            let mut members = Vec::new();
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    for m in 0..vlen {
                        let w = |i: usize| {
                            u32_at(type_data, at + m * 12 + i).ok_or(bad("member cut short"))
                        };
                        let offset = if kind_flag { w(8)? & 0xff_ffff } else { w(8)? };
                        members.push((w(0)?, w(4)?, offset));
                    }
                    vlen * 12
                }
                KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                0 => return Err(bad("type of kind 0")),
                k if k > KIND_ENUM64 => return Err(bad("unknown type kind")),
                _ => 0,
            };
            at += extra;
            types.push(Ty {
                kind,
                name,
                size_or_type,
                members,
            });
        }
        Ok(Btf {
            source: source.to_string(),
            types,
            strings,
        })
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    fn ty(&self, id: u32) -> Option<&Ty> {
        self.types.get((id as usize).checked_sub(1)?)
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: u32) -> Option<&Ty> {
        for _ in 0..32 {
            let ty = self.ty(id)?;
            match ty.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = ty.size_or_type
                }
                _ => return Some(ty),
            }
        }
        None
    }

    /// The byte offset of `member` in `struct name`, looking inside anonymous structs and
    /// unions as C does.
    pub fn offset_of(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        let st = self
            .types
            .iter()
            .find(|t| {
                t.kind == KIND_STRUCT
                    && self.name(t.name) == name.as_bytes()
                    && !t.members.is_empty()
            })
            .ok_or_else(|| BtfError::NoStruct(name.to_string()))?;
        self.member_bits(st, member.as_bytes(), 0)
            .filter(|bits| bits % 8 == 0)
            .map(|bits| bits / 8)
            .ok_or_else(|| BtfError::NoMember(name.to_string(), member.to_string()))
    }

    fn member_bits(&self, ty: &Ty, member: &[u8], depth: u32) -> Option<u32> {
        if depth > 8 {
            return None;
        }
        for &(name, ty_id, bits) in &ty.members {
            if self.name(name) == member {
                return Some(bits);
            }
            if name == 0
                && let Some(inner) = self.resolve(ty_id)
                && matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                && let Some(found) = self.member_bits(inner, member, depth + 1)
            {
                return Some(bits + found);
            }
        }
        None
    }
}

impl std::fmt::Debug for Btf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Btf")
            .field("source", &self.source)
            .field("types", &self.types.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A little BTF blob: `struct outer { int a; union { int b; struct { int c; int d; }; }; }`
    /// laid out as a compiler would (a at 0, the union at 32 bits, c at 0 and d at 32 inside
    /// the anonymous struct).
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0b\0c\0d\0";
        let s = |name: &str| {
            let needle = format!("\0{name}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut types = Vec::new();
        let mut put = |words: &[u32]| words.iter().for_each(|w| types.extend(w.to_le_bytes()));
        // [1] int
        put(&[s("int"), KIND_INT << 24, 4, 32]);
        // [2] anonymous struct { c; d; }
        put(&[0, KIND_STRUCT << 24 | 2, 8, s("c"), 1, 0, s("d"), 1, 32]);
        // [3] anonymous union { b; struct [2]; }
        put(&[0, KIND_UNION << 24 | 2, 8, s("b"), 1, 0, 0, 2, 0]);
        // [4] typedef-free struct outer { a; union [3]; }
        put(&[
            s("outer"),
            KIND_STRUCT << 24 | 2,
            12,
            s("a"),
            1,
            0,
            0,
            3,
            32,
        ]);
        let mut out = Vec::new();
        for w in [
            MAGIC as u32 | 1 << 16,
            24,
            0,
            types.len() as u32,
            types.len() as u32,
        ] {
            out.extend(w.to_le_bytes());
        }
        out.extend((strings.len() as u32).to_le_bytes());
        out.extend(types);
        out.extend(strings);
        out
    }

    #[test]
    fn members_are_found_through_anonymous_structs_and_unions() {
        let btf = Btf::parse(&blob(), "blob").unwrap();
        assert_eq!(btf.offset_of("outer", "a").unwrap(), 0);
        assert_eq!(btf.offset_of("outer", "b").unwrap(), 4);
        assert_eq!(btf.offset_of("outer", "c").unwrap(), 4);
        assert_eq!(btf.offset_of("outer", "d").unwrap(), 8);
        assert!(matches!(
            btf.offset_of("outer", "e"),
            Err(BtfError::NoMember(..))
        ));
        assert!(matches!(
            btf.offset_of("inner", "a"),
            Err(BtfError::NoStruct(..))
        ));
    }

    #[test]
    fn cut_or_foreign_data_is_an_error_not_a_panic() {
        let whole = blob();
        for len in 0..whole.len() {
            let _ = Btf::parse(&whole[..len], "cut");
        }
        assert!(Btf::parse(&whole[..whole.len() - 3], "cut").is_err());
        assert!(Btf::parse(b"\x7fELF....", "elf").is_err());
    }

    /// The running kernel: the three offsets the sockmap program needs are found, and agree
    /// with what the kernel's own layout implies (`cb` lies inside `sk_buff`, `copied_seq`
    /// inside `tcp_sock`).
    #[test]
    fn the_running_kernel_has_the_fields_sockmap_reads() {
        let Ok(btf) = Btf::kernel() else {
            eprintln!("skipped: {VMLINUX} is not readable here");
            return;
        };
        let cb = btf.offset_of("sk_buff", "cb").unwrap();
        let sk = btf.offset_of("sk_buff", "sk").unwrap();
        let copied = btf.offset_of("tcp_sock", "copied_seq").unwrap();
        assert!(cb > 0 && cb < 256, "cb at {cb}");
        assert!(sk > 0 && sk < cb, "sk at {sk}");
        assert!(copied > 1000 && copied < 4096, "copied_seq at {copied}");
    }
}

//! Just enough of a BTF reader to find struct member offsets in /sys/kernel/btf/vmlinux.
//!
//! The tracker reads three kernel fields (sock's local port and namespace pointer, and the
//! namespace's inode). Their offsets differ between kernels and Rust eBPF has no CO-RE
//! relocations, so user space reads them from the running kernel's BTF and hands them to
//! the program. (aya-obj parses BTF but keeps member offsets private; btf-rs is LGPL.)
//! Format: Documentation/bpf/btf.rst.

use std::cell::OnceCell;

use anyhow::{bail, Context, Result};

const BTF_MAGIC: u16 = 0xEB9F;
const KIND_ENUM: u8 = 6;
const KIND_STRUCT: u8 = 4;
const KIND_UNION: u8 = 5;
const KIND_TYPEDEF: u8 = 8;
const KIND_VOLATILE: u8 = 9;
const KIND_CONST: u8 = 10;
const KIND_RESTRICT: u8 = 11;
const KIND_TYPE_TAG: u8 = 18;

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const KIND_FWD: u8 = 7;
const KIND_FUNC: u8 = 12;

/// The kernel types drain's tracing programs attach to, as aya looks them up: a tp_btf
/// program's `btf_trace_<tracepoint>` typedef, an fentry program's function. One missing
/// from this kernel is left out, and its load fails as it would with the full BTF.
const ATTACH_TYPES: &[(u8, &str)] = &[
    (KIND_TYPEDEF, "btf_trace_inet_sock_set_state"),
    (KIND_TYPEDEF, "btf_trace_tcp_send_reset"),
    (KIND_FUNC, "tcp_v4_send_reset"),
    (KIND_FUNC, "tcp_v6_send_reset"),
];

/// One type's header; a struct's or union's members stay in `data` and are read when
/// looked up (the kernel's BTF holds ~150k types: no allocation per type).
struct Type {
    name: u32,
    kind: u8,
    kind_flag: bool,
    vlen: u16,
    /// For modifiers and typedefs: the type referred to.
    ty: u32,
    /// Where the kind-specific data (a struct's members) starts in `data`.
    extra: u32,
}

pub struct Btf {
    data: Vec<u8>,
    str_start: usize,
    /// Index 0 is the void type.
    types: Vec<Type>,
}

fn u32_at(d: &[u8], off: usize) -> Result<u32> {
    let b = d.get(off..off + 4).context("BTF data cut short")?;
    Ok(u32::from_le_bytes(b.try_into().unwrap()))
}

/// The running kernel's BTF for one command, read from /sys/kernel/btf/vmlinux at most once
/// and parsed at most once by each reader that needs it: drain's own (member offsets) and
/// aya's (the type ids its tracing program loads look up). A `gate on` needs both several
/// times; reading and parsing the ~5 MB file each time cost it tens of milliseconds.
/// Dropped with the command's state, so a long `wait` does not keep it.
#[derive(Default)]
pub struct Kernel {
    bytes: OnceCell<Vec<u8>>,
    drain: OnceCell<Btf>,
    aya: OnceCell<aya::Btf>,
}

impl Kernel {
    fn bytes(&self) -> Result<&[u8]> {
        if let Some(b) = self.bytes.get() {
            return Ok(b);
        }
        let b = std::fs::read(VMLINUX).with_context(|| {
            format!("reading {VMLINUX}: drain needs a kernel built with CONFIG_DEBUG_INFO_BTF")
        })?;
        Ok(self.bytes.get_or_init(|| b))
    }

    /// drain's reader (member offsets, enum names).
    pub fn drain(&self) -> Result<&Btf> {
        if let Some(b) = self.drain.get() {
            return Ok(b);
        }
        let b = Btf::parse(self.bytes()?.to_vec())?;
        Ok(self.drain.get_or_init(|| b))
    }

    /// aya's reader, for loading tracing programs (tp_btf, fentry): all aya takes from it
    /// is the id of one type by name ([`ATTACH_TYPES`]), so it gets a BTF holding only
    /// those, at the kernel's ids, built from drain's index ([`Btf::ids_only`]) rather
    /// than a second parse of every type.
    pub fn aya(&self) -> Result<&aya::Btf> {
        if let Some(b) = self.aya.get() {
            return Ok(b);
        }
        let blob = self.drain()?.ids_only(ATTACH_TYPES)?;
        let b = aya::Btf::parse(&blob, aya::Endianness::default())
            .context("parsing the attach types of the kernel's BTF")?;
        Ok(self.aya.get_or_init(|| b))
    }
}

impl Btf {
    /// The kernel's BTF on its own (see [`Kernel`] for a command that needs it more than
    /// once).
    pub fn from_sys_fs() -> Result<Self> {
        let k = Kernel::default();
        k.drain()?;
        Ok(k.drain.into_inner().expect("parsed just above"))
    }

    pub fn parse(data: Vec<u8>) -> Result<Self> {
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != BTF_MAGIC {
            bail!("not little-endian BTF data");
        }
        let hdr_len = u32_at(&data, 4)? as usize;
        let type_off = u32_at(&data, 8)? as usize;
        let type_len = u32_at(&data, 12)? as usize;
        let str_off = u32_at(&data, 16)? as usize;
        let mut types = vec![Type {
            name: 0,
            kind: 0,
            kind_flag: false,
            vlen: 0,
            ty: 0,
            extra: 0,
        }];
        let mut off = hdr_len + type_off;
        let end = off + type_len;
        while off < end {
            let name = u32_at(&data, off)?;
            let info = u32_at(&data, off + 4)?;
            let size_or_type = u32_at(&data, off + 8)?;
            off += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = ((info >> 24) & 0x1f) as u8;
            let extra = off;
            off += match kind {
                1 | 14 | 17 => 4, // INT, VAR, DECL_TAG
                3 => 12,          // ARRAY
                KIND_STRUCT | KIND_UNION => vlen * 12,
                6 | 13 => vlen * 8,   // ENUM, FUNC_PROTO
                15 | 19 => vlen * 12, // DATASEC, ENUM64
                2 | 7..=12 | 16 | 18 => 0,
                k => bail!("unknown BTF kind {k}"),
            };
            if off > data.len() {
                bail!("BTF data cut short");
            }
            types.push(Type {
                name,
                kind,
                kind_flag: info >> 31 == 1,
                vlen: vlen as u16,
                ty: size_or_type,
                extra: extra as u32,
            });
        }
        Ok(Btf {
            data,
            str_start: hdr_len + str_off,
            types,
        })
    }

    /// BTF data holding the `wanted` types that exist here, each at its id in this BTF,
    /// with a nameless forward declaration at every other id (12 bytes, no references):
    /// what a reader that only looks ids up by name needs.
    pub fn ids_only(&self, wanted: &[(u8, &str)]) -> Result<Vec<u8>> {
        let mut strings = vec![0u8];
        let mut at = std::collections::BTreeMap::new();
        for &(kind, name) in wanted {
            if let Some(id) = self.named(kind, name) {
                at.insert(id, (kind, strings.len() as u32, self.types[id as usize].ty));
                strings.extend_from_slice(name.as_bytes());
                strings.push(0);
            }
        }
        let last = at.keys().next_back().copied().unwrap_or(0);
        let mut types = Vec::with_capacity(last as usize * 12);
        for id in 1..=last {
            let (kind, name, ty) = at.get(&id).copied().unwrap_or((KIND_FWD, 0, 0));
            // A function's linkage is in vlen; keep it (global = 1).
            let vlen = if kind == KIND_FUNC {
                u32::from(self.types[id as usize].vlen)
            } else {
                0
            };
            for w in [name, u32::from(kind) << 24 | vlen, ty] {
                types.extend_from_slice(&w.to_le_bytes());
            }
        }
        let mut out = Vec::with_capacity(24 + types.len() + strings.len());
        out.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]); // version, flags
        for w in [
            24,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&u32::to_le_bytes(w));
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(&strings);
        Ok(out)
    }

    /// True when the kernel's BTF has an enum named `name` (a feature marker: e.g.
    /// `sk_rst_reason`, which came with Linux 6.10's reworked RST tracing).
    pub fn has_enum(&self, name: &str) -> bool {
        self.named(KIND_ENUM, name).is_some()
    }

    /// The first type of `kind` named `name`.
    fn named(&self, kind: u8, name: &str) -> Option<u32> {
        self.types
            .iter()
            .position(|t| t.kind == kind && t.name != 0 && self.name_is(t.name, name))
            .map(|i| i as u32)
    }

    /// Compares a name in place (no allocation, no UTF-8 check: a scan of every type's
    /// name stays cheap).
    fn name_is(&self, off: u32, want: &str) -> bool {
        let start = self.str_start + off as usize;
        let want = want.as_bytes();
        self.data
            .get(start..start + want.len() + 1)
            .is_some_and(|s| &s[..want.len()] == want && s[want.len()] == 0)
    }

    fn string(&self, off: u32) -> Result<&str> {
        let s = self
            .data
            .get(self.str_start + off as usize..)
            .context("BTF string out of range")?;
        let end = s
            .iter()
            .position(|&b| b == 0)
            .context("unterminated BTF string")?;
        Ok(std::str::from_utf8(&s[..end])?)
    }

    /// Skips typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> u32 {
        while let Some(t) = self.types.get(id as usize) {
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.ty
                }
                _ => break,
            }
        }
        id
    }

    /// Bit offset of `member` in type `id`, looking through anonymous structs and unions.
    fn find(&self, id: u32, member: &str) -> Option<(u32, u32)> {
        let t = self.types.get(self.resolve(id) as usize)?;
        if t.kind != KIND_STRUCT && t.kind != KIND_UNION {
            return None;
        }
        for i in 0..t.vlen as usize {
            let m = t.extra as usize + i * 12;
            let name = u32_at(&self.data, m).ok()?;
            let ty = u32_at(&self.data, m + 4).ok()?;
            let raw = u32_at(&self.data, m + 8).ok()?;
            // With kind_flag the top 8 bits hold a bitfield size.
            let bit_offset = if t.kind_flag { raw & 0x00ff_ffff } else { raw };
            if name == 0 {
                if let Some((off, ty)) = self.find(ty, member) {
                    return Some((bit_offset + off, ty));
                }
            } else if self.string(name).ok()? == member {
                return Some((bit_offset, ty));
            }
        }
        None
    }

    /// Byte offset of a dotted member path in a struct, e.g. ("sock", "__sk_common.skc_num").
    pub fn offset(&self, strukt: &str, path: &str) -> Result<u32> {
        let mut id = self
            .named(KIND_STRUCT, strukt)
            .with_context(|| format!("struct {strukt} not in the kernel's BTF"))?;
        let mut bits = 0;
        for part in path.split('.') {
            let (off, ty) = self.find(id, part).with_context(|| {
                format!("no member {part} in {strukt}.{path} in the kernel's BTF")
            })?;
            bits += off;
            id = ty;
        }
        if bits % 8 != 0 {
            bail!("{strukt}.{path} is a bitfield");
        }
        Ok(bits / 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BTF built by hand: strings, then types appended with their kind-specific data.
    #[derive(Default)]
    struct Blob {
        strings: Vec<u8>,
        types: Vec<u8>,
    }

    impl Blob {
        fn new() -> Self {
            Blob {
                strings: vec![0], // offset 0 is the empty name
                types: vec![],
            }
        }

        fn name(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }

        fn words(&mut self, words: &[u32]) {
            for w in words {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
        }

        /// struct btf_type { name_off; info (vlen | kind << 24 | kind_flag << 31); size/type }
        fn head(&mut self, name: &str, kind: u8, kind_flag: bool, vlen: u32, size_or_type: u32) {
            let name = self.name(name);
            let info = vlen | u32::from(kind) << 24 | u32::from(kind_flag) << 31;
            self.words(&[name, info, size_or_type]);
        }

        fn int(&mut self, name: &str) {
            self.head(name, 1, false, 0, 4);
            self.words(&[32]); // encoding: 32 bits, unsigned
        }

        /// A struct (kind 4) or union (kind 5); members are (name, type id, offset word).
        fn aggregate(
            &mut self,
            kind: u8,
            name: &str,
            kind_flag: bool,
            members: &[(&str, u32, u32)],
        ) {
            self.head(name, kind, kind_flag, members.len() as u32, 16);
            for &(m, ty, off) in members {
                let m = self.name(m);
                self.words(&[m, ty, off]);
            }
        }

        /// btf_header { magic; version; flags; hdr_len; type_off; type_len; str_off; str_len }
        fn bytes(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&BTF_MAGIC.to_le_bytes());
            out.extend_from_slice(&[1, 0]);
            for w in [
                24,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ] {
                out.extend_from_slice(&u32::to_le_bytes(w));
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// Type ids: 1 int, 2 struct inner {a, b}, 3 typedef inner_t, 4 const inner_t,
    /// 5 anonymous union {u}, 6 struct outer {x, <anon union>, inner}, 7 an enum (skipped
    /// over), 8 struct bits (kind_flag: bitfield sizes in the offset word) {f:3 at bit 12,
    /// g:8 at bit 32}.
    fn sample() -> Btf {
        let mut b = Blob::new();
        b.int("int");
        b.aggregate(KIND_STRUCT, "inner", false, &[("a", 1, 0), ("b", 1, 32)]);
        b.head("inner_t", KIND_TYPEDEF, false, 0, 2);
        b.head("", KIND_CONST, false, 0, 3);
        b.aggregate(KIND_UNION, "", false, &[("u", 1, 0)]);
        b.aggregate(
            KIND_STRUCT,
            "outer",
            false,
            &[("x", 1, 0), ("", 5, 64), ("inner", 4, 128)],
        );
        b.head("colour", 6, false, 2, 4);
        let (red, blue) = (b.name("RED"), b.name("BLUE"));
        b.words(&[red, 0, blue, 1]);
        b.aggregate(
            KIND_STRUCT,
            "bits",
            true,
            &[("f", 1, 3 << 24 | 12), ("g", 1, 8 << 24 | 32)],
        );
        Btf::parse(b.bytes()).unwrap()
    }

    #[test]
    fn member_offsets() {
        let btf = sample();
        assert_eq!(btf.offset("outer", "x").unwrap(), 0);
        // Through an anonymous union, as sock.__sk_common's members are reached.
        assert_eq!(btf.offset("outer", "u").unwrap(), 8);
        // Through a const typedef to a nested struct.
        assert_eq!(btf.offset("outer", "inner.a").unwrap(), 16);
        assert_eq!(btf.offset("outer", "inner.b").unwrap(), 20);
        assert_eq!(btf.offset("inner", "b").unwrap(), 4);
        // kind_flag: the bitfield size is masked off the offset.
        assert_eq!(btf.offset("bits", "g").unwrap(), 4);
        // Names match whole: a prefix or a longer name is another type.
        assert!(btf.has_enum("colour"));
        assert!(!btf.has_enum("colou"));
        assert!(!btf.has_enum("colours"));
        assert!(!btf.has_enum("outer"));
    }

    /// aya finds each wanted type in the ids-only BTF at the id it has in the full one,
    /// and nothing else.
    #[test]
    fn ids_only_keeps_the_ids() {
        let btf = sample();
        let blob = btf
            .ids_only(&[(KIND_TYPEDEF, "inner_t"), (KIND_STRUCT, "absent")])
            .unwrap();
        let aya = aya::Btf::parse(&blob, aya::Endianness::default()).unwrap();
        use aya_obj::btf::BtfKind;
        assert_eq!(
            aya.id_by_type_name_kind("inner_t", BtfKind::Typedef)
                .unwrap(),
            3
        );
        assert!(aya.id_by_type_name_kind("outer", BtfKind::Struct).is_err());
    }

    /// The same against this machine's kernel, for the types drain attaches to: the ids
    /// match a full parse by aya. (drain needs the kernel's BTF: no skip without it.)
    #[test]
    fn ids_only_matches_the_kernels_btf() {
        let data = std::fs::read(VMLINUX).expect("the kernel's BTF (CONFIG_DEBUG_INFO_BTF)");
        let full = aya::Btf::parse(&data, aya::Endianness::default()).unwrap();
        let k = Kernel::default();
        let stub = k.aya().unwrap();
        use aya_obj::btf::BtfKind;
        let mut found = 0;
        for &(kind, name) in ATTACH_TYPES {
            let kind = if kind == KIND_FUNC {
                BtfKind::Func
            } else {
                BtfKind::Typedef
            };
            let want = full.id_by_type_name_kind(name, kind).ok();
            assert_eq!(stub.id_by_type_name_kind(name, kind).ok(), want, "{name}");
            found += usize::from(want.is_some());
        }
        assert!(found >= 2, "the tracker's and an RST counter's types exist");
    }

    #[test]
    fn lookup_errors() {
        let btf = sample();
        let err = |s: &str, p: &str| btf.offset(s, p).unwrap_err().to_string();
        assert!(err("bits", "f").contains("is a bitfield"));
        assert!(err("nope", "x").contains("struct nope not in"));
        assert!(err("outer", "inner.c").contains("no member c"));
        // A typedef name is not a struct name.
        assert!(err("inner_t", "a").contains("not in"));
    }

    #[test]
    fn malformed_data() {
        let good = {
            let mut b = Blob::new();
            b.aggregate(KIND_STRUCT, "s", false, &[("m", 0, 0)]);
            b.bytes()
        };
        assert!(Btf::parse(good.clone()).is_ok());
        let mut bad_magic = good.clone();
        bad_magic[0] = 0;
        assert!(Btf::parse(bad_magic).is_err());
        assert!(Btf::parse(good[..20].to_vec()).is_err());
        // Cut inside the type section.
        let mut cut = good.clone();
        cut.truncate(24 + 20);
        assert!(Btf::parse(cut).is_err());
        let mut unknown_kind = Blob::new();
        unknown_kind.head("x", 31, false, 0, 0);
        let e = Btf::parse(unknown_kind.bytes()).err().unwrap();
        assert!(e.to_string().contains("unknown BTF kind 31"), "{e}");
    }
}

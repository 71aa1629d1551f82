//! Just enough of a BTF reader to find struct member offsets in /sys/kernel/btf/vmlinux.
//!
//! The tracker reads three kernel fields (sock's local port and namespace pointer, and the
//! namespace's inode). Their offsets differ between kernels and Rust eBPF has no CO-RE
//! relocations, so user space reads them from the running kernel's BTF and hands them to
//! the program. (aya-obj parses BTF but keeps member offsets private; btf-rs is LGPL.)
//! Format: Documentation/bpf/btf.rst.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};

const BTF_MAGIC: u16 = 0xEB9F;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

struct Member {
    name: u32,
    ty: u32,
    bit_offset: u32,
}

struct Type {
    name: u32,
    kind: u32,
    /// For modifiers and typedefs: the type referred to.
    ty: u32,
    members: Vec<Member>,
}

pub struct Btf {
    data: Vec<u8>,
    str_start: usize,
    /// Index 0 is the void type.
    types: Vec<Type>,
    structs: HashMap<String, u32>,
}

fn u32_at(d: &[u8], off: usize) -> Result<u32> {
    let b = d.get(off..off + 4).context("BTF data cut short")?;
    Ok(u32::from_le_bytes(b.try_into().unwrap()))
}

impl Btf {
    pub fn from_sys_fs() -> Result<Self> {
        let data = std::fs::read("/sys/kernel/btf/vmlinux")
            .context("reading /sys/kernel/btf/vmlinux: drain needs a kernel built with CONFIG_DEBUG_INFO_BTF")?;
        Self::parse(data)
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
            ty: 0,
            members: vec![],
        }];
        let mut off = hdr_len + type_off;
        let end = off + type_len;
        while off < end {
            let name = u32_at(&data, off)?;
            let info = u32_at(&data, off + 4)?;
            let size_or_type = u32_at(&data, off + 8)?;
            off += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            off += match kind {
                1 | 14 | 17 => 4, // INT, VAR, DECL_TAG
                3 => 12,          // ARRAY
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = off + i * 12;
                        let raw = u32_at(&data, m + 8)?;
                        members.push(Member {
                            name: u32_at(&data, m)?,
                            ty: u32_at(&data, m + 4)?,
                            // With kind_flag the top 8 bits hold a bitfield size.
                            bit_offset: if kind_flag { raw & 0x00ff_ffff } else { raw },
                        });
                    }
                    vlen * 12
                }
                6 | 13 => vlen * 8,   // ENUM, FUNC_PROTO
                15 | 19 => vlen * 12, // DATASEC, ENUM64
                2 | 7..=12 | 16 | 18 => 0,
                k => bail!("unknown BTF kind {k}"),
            };
            types.push(Type {
                name,
                kind,
                ty: size_or_type,
                members,
            });
        }
        let mut btf = Btf {
            data,
            str_start: hdr_len + str_off,
            types,
            structs: HashMap::new(),
        };
        for (id, t) in btf.types.iter().enumerate() {
            if t.kind == KIND_STRUCT && t.name != 0 {
                let name = btf.string(t.name)?.to_owned();
                btf.structs.entry(name).or_insert(id as u32);
            }
        }
        Ok(btf)
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
        for m in &t.members {
            if m.name == 0 {
                if let Some((off, ty)) = self.find(m.ty, member) {
                    return Some((m.bit_offset + off, ty));
                }
            } else if self.string(m.name).ok()? == member {
                return Some((m.bit_offset, m.ty));
            }
        }
        None
    }

    /// Byte offset of a dotted member path in a struct, e.g. ("sock", "__sk_common.skc_num").
    pub fn offset(&self, strukt: &str, path: &str) -> Result<u32> {
        let mut id = *self
            .structs
            .get(strukt)
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

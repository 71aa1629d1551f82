//! Kernel access: pins and bpffs, the embedded object, links, maps, raw syscalls, netlink,
//! BTF, namespaces. Operations ([`crate::ops`]) are built from these; nothing here prints.

pub mod btf;
pub mod caps;
pub mod choices;
pub mod clsact;
pub mod conntrack;
pub mod diag;
pub mod iface;
pub mod links;
pub mod netlink;
pub mod netns;
pub mod object;
pub mod pins;
pub mod state;
pub mod sys;
pub mod target;
pub mod track;

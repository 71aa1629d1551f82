//! What the kernel says about each link a gate has pinned: a pin only says a link was made
//! once. The link's own info (BPF_OBJ_GET_INFO_BY_FD) says whether it is still attached and
//! where, and the interface that ifindex names in this namespace says whether the program
//! there is the link's. `status` reports it, and `gate on` repairs what is not attached.
//! The same holds for the gate's own links (tracker, RST counter, sk_lookup refusal), and
//! for the clsact filters of `--attach tc` on kernels without TCX, which are no links
//! ([`Attachment`]; [`crate::clsact`] judges them from a filter dump).

use std::{fs, path::Path};

use anyhow::{anyhow, Context, Result};
use aya::programs::{SchedClassifier, TcAttachType};
use drain_common::prog;
use serde::Serialize;

use crate::{
    clsact,
    iface::Iface,
    pins::{self, Hook, IfaceLink},
    sys,
};

/// How a TC gate is attached: a TCX link (6.6 on), or drain's cls_bpf filter on the
/// clsact qdisc (kernels without TCX).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TcMode {
    Tcx,
    Clsact,
}

impl TcMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TcMode::Tcx => "tcx",
            TcMode::Clsact => "clsact",
        }
    }
}

/// One interface a gate is attached to: a pinned link (XDP, TCX) or a clsact record.
#[derive(Clone, Debug)]
pub enum Attachment {
    Link(IfaceLink),
    Clsact(clsact::Record),
}

impl Attachment {
    pub fn ifindex(&self) -> u32 {
        match self {
            Attachment::Link(l) => l.ifindex,
            Attachment::Clsact(r) => r.ifindex,
        }
    }

    pub fn hook(&self) -> Hook {
        match self {
            Attachment::Link(l) => l.hook,
            Attachment::Clsact(_) => Hook::Tc,
        }
    }

    /// For TC: which kind of TC attachment.
    pub fn tc_mode(&self) -> Option<TcMode> {
        match self {
            Attachment::Link(l) if l.hook == Hook::Tc => Some(TcMode::Tcx),
            Attachment::Link(_) => None,
            Attachment::Clsact(_) => Some(TcMode::Clsact),
        }
    }

    /// "xdp", "tc" (TCX) or "tc clsact": for `gate on`'s report.
    pub fn describe(&self) -> &'static str {
        match self.tc_mode() {
            Some(TcMode::Clsact) => "tc clsact",
            _ => self.hook().as_str(),
        }
    }

    /// The kernel's view of it.
    pub fn inspect(&self, ifaces: &[Iface]) -> Inspected {
        match self {
            Attachment::Link(l) => inspect(l, ifaces),
            Attachment::Clsact(r) => Inspected {
                state: clsact::inspect(r, ifaces),
                prog_id: Some(r.prog_id),
            },
        }
    }

    /// Takes it off the interface, as far as it is still drain's, and out of the gate's
    /// state in `dir`.
    pub fn remove(&self, dir: &Path) -> Result<()> {
        match self {
            Attachment::Link(l) => {
                let detached = sys::detach_link(&l.pin)
                    .with_context(|| format!("detaching {}", l.pin.display()));
                fs::remove_file(&l.pin)
                    .map_err(|e| anyhow!(e).context(format!("removing {}", l.pin.display())))?;
                detached
            }
            Attachment::Clsact(r) => {
                clsact::detach(r)?;
                clsact::forget(dir, r.ifindex)
            }
        }
    }
}

/// Every interface attachment of the gate in `dir`, by ifindex.
pub fn attachments(dir: &Path) -> Result<Vec<Attachment>> {
    let mut out: Vec<Attachment> = pins::iface_links(dir)?
        .into_iter()
        .map(Attachment::Link)
        .collect();
    out.extend(clsact::records(dir)?.into_iter().map(Attachment::Clsact));
    out.sort_by_key(Attachment::ifindex);
    Ok(out)
}

/// The state of one interface link pin, as the kernel sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    /// Attached to the interface its pin names, in this namespace, running drain's program:
    /// the gate is on the data path there.
    Attached,
    /// The link exists but is attached to nothing (its interface was deleted, another tool
    /// detached it, or a `gate off` was killed between detaching and unpinning): nothing
    /// is gated there.
    Detached,
    /// Attached, but to a device that is not the one this namespace has at that ifindex:
    /// the interface was moved into another namespace, where it still refuses connections
    /// (`gate off` or `gate on` here detaches it).
    Elsewhere,
    /// The pin holds no link drain made (unreadable, another link type, another program):
    /// nothing of drain's is known to be attached.
    Foreign,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Attached => "attached",
            LinkState::Detached => "detached",
            LinkState::Elsewhere => "elsewhere",
            LinkState::Foreign => "foreign",
        }
    }
}

/// The kernel's view of one pinned interface link: its state and its program's id.
pub struct Inspected {
    pub state: LinkState,
    pub prog_id: Option<u32>,
}

/// Reads the link pinned at `link.pin` and decides its [`LinkState`]; `ifaces` are this
/// namespace's interfaces.
pub fn inspect(link: &IfaceLink, ifaces: &[Iface]) -> Inspected {
    let Ok(info) = sys::link_info(&link.pin) else {
        return Inspected {
            state: LinkState::Foreign,
            prog_id: None,
        };
    };
    let (want_type, want_prog) = match link.hook {
        Hook::Xdp => (sys::BPF_LINK_TYPE_XDP, prog::XDP),
        Hook::Tc => (sys::BPF_LINK_TYPE_TCX, prog::TC),
    };
    let prog_id = Some(info.prog_id);
    let state = if info.link_type != want_type || !program_is(info.prog_id, want_prog) {
        LinkState::Foreign
    } else if info.ifindex == 0 {
        LinkState::Detached
    } else if info.ifindex == link.ifindex && runs_here(link.hook, info.prog_id, ifaces, link) {
        LinkState::Attached
    } else {
        LinkState::Elsewhere
    };
    Inspected { state, prog_id }
}

/// True when the program with id `id` is named `name` (drain's programs by name).
pub fn program_is(id: u32, name: &str) -> bool {
    sys::prog_name(id).is_some_and(|n| n == name)
}

/// True when the interface this namespace has at the link's ifindex runs program `id` on
/// the link's hook: the device the link is attached to is this namespace's, not one that
/// was moved away (whose ifindex another device here may have taken since).
fn runs_here(hook: Hook, id: u32, ifaces: &[Iface], link: &IfaceLink) -> bool {
    let Some(iface) = ifaces.iter().find(|i| i.index == link.ifindex) else {
        return false;
    };
    match hook {
        Hook::Xdp => iface.xdp.is_some_and(|(p, _)| p == id),
        Hook::Tc => SchedClassifier::query_tcx(&iface.name, TcAttachType::Ingress)
            .is_ok_and(|(_, progs)| progs.iter().any(|p| p.id() == id)),
    }
}

/// True when the link pinned at `pin` runs drain's tracker.
pub fn tracker_attached(pin: &Path) -> bool {
    tracing_attached(pin, prog::TRACK)
}

/// True when the link pinned at `pin` runs drain's tp_btf program `name` (the tracker, the
/// RST counter). (A tp_btf program attached through BPF_RAW_TRACEPOINT_OPEN, as aya does,
/// makes a raw-tracepoint link; through BPF_LINK_CREATE a tracing link.)
pub fn tracing_attached(pin: &Path, name: &str) -> bool {
    sys::link_info(pin).is_ok_and(|i| {
        matches!(
            i.link_type,
            sys::BPF_LINK_TYPE_RAW_TRACEPOINT | sys::BPF_LINK_TYPE_TRACING
        ) && program_is(i.prog_id, name)
    })
}

/// How many events the kernel skipped running the program of the tracing link pinned at
/// `pin` for (its `recursion_misses`); 0 when there is no such link or the kernel does not
/// report it.
pub fn tracing_misses(pin: &Path) -> u64 {
    sys::link_info(pin)
        .ok()
        .and_then(|i| sys::prog_recursion_misses(i.prog_id))
        .unwrap_or(0)
}

/// True when the link pinned at `pin` runs drain's sk_lookup program on the caller's
/// network namespace (a netns link's `netns_ino` is 0 once detached).
pub fn lookup_attached(pin: &Path) -> bool {
    let Ok(here) = crate::netns::current_inode() else {
        return false;
    };
    sys::link_info(pin).is_ok_and(|i| {
        i.link_type == sys::BPF_LINK_TYPE_NETNS
            && u64::from(i.netns_ino) == here
            && program_is(i.prog_id, prog::LOOKUP)
    })
}

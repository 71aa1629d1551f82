//! `check`: the preflight an Ansible play runs before a rollout. It probes, for the caller's
//! network namespace, everything a gate needs (kernel, BPF features, BTF, bpffs,
//! privileges, each interface's XDP/TCX hooks) without changing the host: programs are
//! loaded and never attached to a host interface, maps are created and closed, and the one
//! attach probe runs on the loopback of a private network namespace that dies with the
//! probe. Three parts:
//! - [`probe()`] (check/probe.rs) finds what the host has: a [`Probe`];
//! - [`decide`] (here) turns a [`Probe`] into a [`Report`]: a pure function, so its decisions
//!   are unit-tested on synthetic probes (an old kernel cannot be faked here);
//! - `present/check.rs` prints a [`Report`] as text (`--json` serializes it).

use serde::Serialize;

pub use self::probe::probe;
use crate::{
    caps::Caps,
    domain::{
        attach::{self, Device, Hook},
        AttachChoice, Policy,
    },
};

pub mod probe;

/// A kernel version, as (major, minor).
pub type Version = (u32, u32);

/// drain's floor: the oldest kernel drain's whole suite has run on (Debian 11's 5.10). Its
/// newest needs are older (sk_lookup and XDP links: 5.9), but untested.
pub const MIN_KERNEL: Version = (5, 10);
/// TCX (`--attach tc` through a bpf_link): Linux 6.6. Without it `--attach tc` goes
/// through the clsact qdisc ([`crate::clsact`]).
pub const MIN_TCX: Version = (6, 6);

/// Each BPF feature drain relies on, with the first kernel that has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Feature {
    /// BPF_LINK_CREATE for XDP (pinnable XDP attachments), 5.9.
    XdpLink,
    /// TCX ingress links, 6.6 (`--attach tc`; without them, [`Feature::Clsact`]).
    Tcx,
    /// The clsact qdisc with a direct-action cls_bpf filter (`--attach tc` on kernels
    /// without TCX): far older than drain's floor, but sch_ingress and cls_bpf are
    /// modules that a kernel may lack.
    Clsact,
    /// tp_btf programs (BPF_PROG_TYPE_TRACING, BPF_TRACE_RAW_TP), 5.5: the tracker.
    TpBtf,
    /// BPF_F_MMAPABLE arrays, 5.5: the live counts `wait` reads with a memory load.
    MmapableArray,
    /// BPF ring buffers, 5.8: `watch`'s events.
    RingBuf,
    /// BPF_PROG_TYPE_SK_LOOKUP, 5.9: refusing at the listener lookup on any interface.
    SkLookup,
    /// drain's own programs pass this kernel's verifier (loaded, never attached).
    Programs,
    /// TCP sock_diag (inet_diag + tcp_diag): the tracker's seed and `wait`'s leftovers. A
    /// module on many kernels: ENOENT until it is loaded.
    SockDiag,
}

impl Feature {
    pub const ALL: [Feature; 9] = [
        Feature::XdpLink,
        Feature::Tcx,
        Feature::Clsact,
        Feature::TpBtf,
        Feature::MmapableArray,
        Feature::RingBuf,
        Feature::SkLookup,
        Feature::Programs,
        Feature::SockDiag,
    ];

    pub fn min_kernel(self) -> Version {
        match self {
            Feature::XdpLink | Feature::SkLookup => (5, 9),
            Feature::Tcx => MIN_TCX,
            Feature::Clsact => MIN_KERNEL,
            Feature::TpBtf | Feature::MmapableArray => (5, 5),
            Feature::RingBuf => (5, 8),
            Feature::Programs => MIN_KERNEL,
            // inet_diag's TCP dump is far older than drain's floor.
            Feature::SockDiag => MIN_KERNEL,
        }
    }

    pub fn what(self) -> &'static str {
        match self {
            Feature::XdpLink => "bpf_link for XDP",
            Feature::Tcx => "TCX (--attach tc)",
            Feature::Clsact => "clsact qdisc and cls_bpf filter (--attach tc without TCX)",
            Feature::TpBtf => "tp_btf programs (connection tracker)",
            Feature::MmapableArray => "mmapable arrays (live counts)",
            Feature::RingBuf => "ring buffer (watch)",
            Feature::SkLookup => "sk_lookup programs",
            Feature::Programs => "drain's programs pass the verifier",
            Feature::SockDiag => "TCP sock_diag (tcp_diag, inet_diag)",
        }
    }
}

/// What the host has, as probed. `None`: could not be probed (no privileges, say).
#[derive(Clone, Debug, Default)]
pub struct Probe {
    pub release: String,
    pub kernel: Option<Version>,
    pub btf: bool,
    pub bpffs: Bpffs,
    pub caps: Caps,
    pub features: Vec<(Feature, Option<bool>, String)>,
    pub ifaces: Vec<IfaceProbe>,
    pub memlock: Memlock,
}

/// RLIMIT_MEMLOCK, which kernels before 5.11 charge BPF maps and programs to: what `gate
/// on` will meet.
#[derive(Clone, Debug, Default)]
pub struct Memlock {
    /// This process's limit, (soft, hard) in bytes (`u64::MAX`: unlimited); `None` when
    /// it could not be read.
    pub limit: Option<(u64, u64)>,
    /// Whether the kernel charges BPF maps to it, as probed (a map created under a limit
    /// of 0); `None`: not probed (no privilege to create maps).
    pub charged: Option<bool>,
    /// Whether this process may lift it to unlimited, as `gate on` does at the first
    /// EPERM (a hard limit of unlimited, or CAP_SYS_RESOURCE), as tried.
    pub raisable: bool,
    /// Where it is charged and cannot be raised: whether drain's maps and programs loaded
    /// under it (the programs probe); `None` when that did not tell.
    pub fits: Option<bool>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bpffs {
    Mounted,
    /// Not mounted at /sys/fs/bpf, but the kernel has it: drain mounts it (CAP_SYS_ADMIN).
    Mountable,
    #[default]
    Missing,
}

/// One interface as probed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct IfaceProbe {
    pub name: String,
    pub ifindex: u32,
    /// Native (driver) XDP, from the kernel's xdp-features (netdev netlink family, Linux
    /// 6.3); null when the kernel does not report it. Generic XDP works on every interface.
    pub xdp_native: Option<bool>,
    /// Another tool's XDP program on the interface ("NAME, id N"); drain's own is not listed.
    pub xdp_other: Option<String>,
    /// Programs on the TCX ingress hook other than drain's.
    pub tcx_others: Vec<String>,
    /// What the device is ([`crate::iface::Iface::device`]): auto decides by it (its kind
    /// or driver is in `reason`).
    #[serde(skip)]
    pub device: Option<Device>,
    /// What keeps drain's clsact filter off this interface (a plain ingress qdisc, a
    /// filter at priority 1 drain's cannot share): the line `gate on` would stop with
    /// where TC goes through clsact ([`crate::clsact::blocker`]).
    #[serde(skip)]
    pub clsact_blocker: Option<String>,
}

/// What `check` found: the shape of `check --json`.
#[derive(Debug, Serialize)]
pub struct Report {
    /// True when a gate with the requested options can work here.
    pub ok: bool,
    /// The first blocking problem and what to do about it.
    pub problem: Option<String>,
    pub kernel: String,
    pub checks: Vec<Item>,
    pub interfaces: Vec<IfaceReport>,
}

#[derive(Debug, Serialize)]
pub struct Item {
    pub name: String,
    /// "ok", "missing" or "unknown" (could not be probed).
    pub status: &'static str,
    /// Whether a gate with the requested options needs it.
    pub needed: bool,
    /// The first kernel that has it, when that is the question.
    pub min_kernel: Option<String>,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct IfaceReport {
    #[serde(flatten)]
    pub probe: IfaceProbe,
    /// The hook `gate on` would use here: "xdp", "tc", or null when it could not attach.
    pub attach: Option<&'static str>,
    /// Why that hook, in one phrase, as `gate on` would decide it ("auto: virtual device
    /// (veth): TC keeps the peer's TSO"); null when it could not attach.
    pub reason: Option<String>,
    pub note: String,
}

/// What the gate would be asked to do.
#[derive(Clone, Debug)]
pub struct Wanted {
    pub attach: AttachChoice,
    pub policy: Policy,
}

fn ver(v: Version) -> String {
    format!("{}.{}", v.0, v.1)
}

/// Decides whether a gate can work with `want` on the probed host.
pub fn decide(p: &Probe, want: &Wanted) -> Report {
    let mut problems: Vec<String> = Vec::new();
    let mut checks = Vec::new();
    let kernel_ok = p.kernel.is_none_or(|k| k >= MIN_KERNEL);
    if !kernel_ok {
        problems.push(format!(
            "kernel {} is too old for drain: it needs Linux {} or newer",
            p.release,
            ver(MIN_KERNEL)
        ));
    }
    let mut push =
        |name: &str, ok: Option<bool>, needed: bool, min: Option<Version>, detail: String| {
            let status = match ok {
                Some(true) => "ok",
                Some(false) => "missing",
                None => "unknown",
            };
            checks.push(Item {
                name: name.into(),
                status,
                needed,
                min_kernel: min.map(ver),
                detail,
            });
        };
    push(
        "kernel",
        p.kernel.map(|_| kernel_ok),
        true,
        Some(MIN_KERNEL),
        p.release.clone(),
    );

    let caps = p.caps;
    let privileged = caps.can_gate() && caps.can_trace();
    push(
        "privileges",
        Some(privileged),
        true,
        None,
        format!(
            "root: {}, CAP_BPF: {}, CAP_NET_ADMIN: {}, CAP_PERFMON: {}, CAP_SYS_ADMIN: {}",
            caps.root, caps.cap_bpf, caps.cap_net_admin, caps.cap_perfmon, caps.cap_sys_admin
        ),
    );
    if kernel_ok && !privileged {
        problems.push(
            "drain-user needs root, or CAP_NET_ADMIN with CAP_BPF and CAP_PERFMON (or \
             CAP_SYS_ADMIN): rerun with sudo"
                .into(),
        );
    }
    push(
        "btf",
        Some(p.btf),
        true,
        None,
        "/sys/kernel/btf/vmlinux (the tracker reads struct offsets from it)".into(),
    );
    if !p.btf {
        problems.push(
            "/sys/kernel/btf/vmlinux is missing: the connection tracker needs a kernel built \
             with CONFIG_DEBUG_INFO_BTF=y"
                .into(),
        );
    }
    let bpffs_ok = match p.bpffs {
        Bpffs::Mounted => true,
        Bpffs::Mountable => caps.cap_sys_admin,
        Bpffs::Missing => false,
    };
    push(
        "bpffs",
        Some(bpffs_ok),
        true,
        None,
        match p.bpffs {
            Bpffs::Mounted => "mounted at /sys/fs/bpf".into(),
            Bpffs::Mountable => "not mounted; drain-user mounts it at /sys/fs/bpf".into(),
            Bpffs::Missing => "the kernel has no bpf filesystem".into(),
        },
    );
    match p.bpffs {
        Bpffs::Missing => problems.push(
            "the kernel has no bpf filesystem (CONFIG_BPF_SYSCALL): drain keeps its state in it"
                .into(),
        ),
        Bpffs::Mountable if !caps.cap_sys_admin => problems.push(
            "bpffs is not mounted and mounting it needs CAP_SYS_ADMIN: run \
             `mount -t bpf bpf /sys/fs/bpf` first"
                .into(),
        ),
        _ => {}
    }

    // Before the features: where it blocks, the programs probe fails too, for this reason.
    let (memlock_ok, memlock_needed, memlock_detail) = memlock(p);
    push(
        "locked memory (RLIMIT_MEMLOCK)",
        memlock_ok,
        memlock_needed,
        None,
        memlock_detail.clone(),
    );
    if memlock_ok == Some(false) && kernel_ok && privileged {
        problems.push(memlock_detail);
    }

    let feature = |f: Feature| -> Option<bool> {
        p.features
            .iter()
            .find(|(g, _, _)| *g == f)
            .and_then(|(_, ok, _)| *ok)
            // Not probed: the kernel version decides.
            .or_else(|| {
                p.kernel
                    .map(|k| k >= f.min_kernel())
                    .filter(|_| !matches!(f, Feature::Programs | Feature::SockDiag))
            })
    };
    let tcx = feature(Feature::Tcx);
    // Each interface's hook, as `gate on` decides it (None: --attach xdp on a taken hook).
    let decisions: Vec<Option<attach::Decision>> = p
        .ifaces
        .iter()
        .map(|i| {
            let device = i
                .device
                .clone()
                .unwrap_or_else(|| Device::Virtual("unknown".into()));
            attach::decide(want.attach, device, i.xdp_native, i.xdp_other.is_some())
        })
        .collect();
    let uses = |hook: Hook| decisions.iter().flatten().any(|d| d.hook == hook);
    let tc_used = want.attach == AttachChoice::Tc || uses(Hook::Tc);
    for f in Feature::ALL {
        let needed = match f {
            // Where TCX is missing, `--attach tc` takes the clsact path instead.
            Feature::Tcx => false,
            Feature::Clsact => tc_used && tcx == Some(false),
            Feature::XdpLink => want.attach == AttachChoice::Xdp || uses(Hook::Xdp),
            // Policy reset's refusal: the sk_lookup program refuses the listener lookup so
            // the kernel's TCP answers with the RST, whichever hook (XDP or TC) let it pass.
            Feature::SkLookup => want.policy == Policy::Reset,
            // Only `watch` needs it; a gate works without.
            Feature::RingBuf => false,
            _ => true,
        };
        let ok = feature(f);
        let mut detail = p
            .features
            .iter()
            .find(|(g, _, _)| *g == f)
            .map(|(_, _, d)| d.clone())
            .unwrap_or_default();
        if f == Feature::Tcx && ok == Some(false) {
            detail.push_str(&format!(
                "; --attach tc uses the classic path instead: the clsact qdisc with drain's \
                 cls_bpf filter (pref {}, first)",
                crate::clsact::PRIORITY
            ));
        }
        push(f.what(), ok, needed, Some(f.min_kernel()), detail.clone());
        if needed && ok == Some(false) && kernel_ok {
            problems.push(match f {
                Feature::Clsact => format!(
                    "--attach tc needs TCX (Linux {}) or the clsact qdisc with cls_bpf \
                     filters, and this kernel has neither ({detail}): load the sch_ingress \
                     and cls_bpf modules, or use --attach xdp",
                    ver(MIN_TCX)
                ),
                Feature::Programs => {
                    format!("the kernel rejected drain's programs: {detail}")
                }
                Feature::SockDiag => detail.clone(),
                _ => format!(
                    "this kernel lacks {} (Linux {} or newer)",
                    f.what(),
                    ver(f.min_kernel())
                ),
            });
        }
    }

    let mut interfaces = Vec::new();
    for (i, decision) in p.ifaces.iter().zip(&decisions) {
        let tc_note = if tcx == Some(false) {
            format!(
                "clsact ingress (no TCX): drain's cls_bpf filter at pref {}, first",
                crate::clsact::PRIORITY
            )
        } else {
            "TCX ingress, first in the chain".to_string()
        };
        // Without TCX a TC attachment is drain's clsact filter, which gate on would refuse
        // to put here.
        if let (Some(d), Some(why), Some(false)) = (decision, &i.clsact_blocker, tcx) {
            if d.hook == Hook::Tc {
                problems.push(why.clone());
                interfaces.push(IfaceReport {
                    probe: i.clone(),
                    attach: None,
                    reason: Some(crate::gate::reason(d)),
                    note: format!("TC through clsact is blocked: {why}"),
                });
                continue;
            }
        }
        let (attach, note) = match (decision, &i.xdp_other) {
            (None, other) => {
                let other = other.clone().unwrap_or_default();
                problems.push(format!(
                    "another XDP program ({other}) holds {}: drain will not replace it; use \
                     --attach tc (or auto)",
                    i.name
                ));
                (None, format!("XDP hook taken by {other}"))
            }
            (Some(d), Some(other)) if d.hook == Hook::Tc => (
                Some("tc"),
                format!("XDP hook taken by {other}: TC instead, {tc_note}"),
            ),
            (Some(d), _) if d.hook == Hook::Tc => (Some("tc"), tc_note),
            (Some(d), _) => (
                Some("xdp"),
                match i.xdp_native {
                    _ if d.native_only() => "native XDP".into(),
                    Some(true) => "native XDP".into(),
                    Some(false) => "generic XDP (the driver has no native XDP)".into(),
                    None => "XDP (native if the driver has it, else generic)".into(),
                },
            ),
        };
        let mut note = note;
        if want.policy == Policy::Reset && attach.is_some() {
            note.push_str(
                "; --policy reset: the kernel answers refusals with a RST (through sk_lookup), \
                 at most --rst-rate a second",
            );
        }
        interfaces.push(IfaceReport {
            probe: i.clone(),
            attach,
            reason: decision.as_ref().map(crate::gate::reason),
            note,
        });
    }
    Report {
        ok: problems.is_empty(),
        problem: problems.into_iter().next(),
        kernel: p.release.clone(),
        checks,
        interfaces,
    }
}

/// The memlock row: (ok, needed, detail). Where it is missing, the detail is the problem
/// line, fix included.
fn memlock(p: &Probe) -> (Option<bool>, bool, String) {
    let m = &p.memlock;
    let kib = |b: u64| {
        if b == libc::RLIM_INFINITY {
            "unlimited".to_string()
        } else {
            format!("{} KiB", b / 1024)
        }
    };
    // Not probed: the kernel version tells (memory-cgroup accounting came in 5.11).
    let charged = m.charged.or_else(|| p.kernel.map(|k| k < (5, 11)));
    let Some((soft, hard)) = m.limit else {
        return (
            None,
            charged != Some(false),
            "could not read RLIMIT_MEMLOCK".into(),
        );
    };
    let how = if m.charged.is_some() {
        "probed"
    } else {
        "from the kernel version"
    };
    match charged {
        Some(false) => (
            Some(true),
            false,
            format!(
                "this kernel charges BPF memory to the memory cgroup, not to RLIMIT_MEMLOCK \
                 ({}; {how})",
                kib(soft)
            ),
        ),
        None => (
            None,
            true,
            "could not tell whether this kernel charges BPF maps to RLIMIT_MEMLOCK".into(),
        ),
        Some(true) if soft == libc::RLIM_INFINITY => (
            Some(true),
            true,
            format!("unlimited (this kernel charges BPF maps to it; {how})"),
        ),
        Some(true) if m.raisable => (
            Some(true),
            true,
            format!(
                "{} (hard limit {}): this kernel charges BPF maps to it ({how}), and drain-user \
                 raises it to unlimited when a map needs more",
                kib(soft),
                kib(hard)
            ),
        ),
        Some(true) => {
            let line = format!(
                "this kernel charges BPF maps to RLIMIT_MEMLOCK ({how}), which is {} here \
                 (hard limit {}) and cannot be raised without CAP_SYS_RESOURCE",
                kib(soft),
                kib(hard)
            );
            match m.fits {
                Some(true) => (
                    Some(true),
                    true,
                    format!("{line}; drain's maps and programs fit in it (loaded by this check)"),
                ),
                Some(false) => (
                    Some(false),
                    true,
                    format!(
                        "{line}, and drain's maps and programs do not fit: run drain-user with an \
                         unlimited limit (`ulimit -l unlimited`; systemd: LimitMEMLOCK=infinity) \
                         or give it CAP_SYS_RESOURCE"
                    ),
                ),
                None => (
                    None,
                    true,
                    format!("{line}; whether drain's maps fit was not probed"),
                ),
            }
        }
    }
}

/// "6.18.0-1-amd64" -> (6, 18).
pub fn parse_release(release: &str) -> Option<Version> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Probe {
        Probe {
            release: "6.18.0".into(),
            kernel: Some((6, 18)),
            btf: true,
            bpffs: Bpffs::Mounted,
            caps: Caps {
                root: true,
                cap_bpf: true,
                cap_net_admin: true,
                cap_perfmon: true,
                cap_sys_admin: true,
            },
            features: Feature::ALL
                .iter()
                .map(|f| (*f, Some(true), String::new()))
                .collect(),
            ifaces: vec![IfaceProbe {
                name: "eth0".into(),
                ifindex: 2,
                xdp_native: Some(true),
                device: Some(Device::Physical("ixgbe".into())),
                ..Default::default()
            }],
            memlock: Memlock {
                limit: Some((8 << 20, 8 << 20)),
                charged: Some(false),
                raisable: false,
                fits: None,
            },
        }
    }

    fn want(attach: AttachChoice) -> Wanted {
        Wanted {
            attach,
            policy: Policy::Drop,
        }
    }

    fn with(mut p: Probe, f: Feature, ok: Option<bool>) -> Probe {
        p.features.retain(|(g, _, _)| *g != f);
        p.features.push((f, ok, String::new()));
        p
    }

    #[test]
    fn a_modern_root_host_passes() {
        let r = decide(&host(), &want(AttachChoice::Xdp));
        assert!(r.ok, "{r:?}");
        assert_eq!(r.interfaces[0].attach, Some("xdp"));
        assert!(r.checks.iter().all(|c| c.status == "ok"), "{r:?}");
    }

    /// auto, the default, as `gate on` decides it: native XDP on a NIC that has it, TC on a
    /// veth (XDP link not needed then; on a kernel without TCX, clsact is).
    #[test]
    fn auto_reports_each_interface_s_hook_and_why() {
        let r = decide(&host(), &want(AttachChoice::Auto));
        assert!(r.ok, "{r:?}");
        assert_eq!(r.interfaces[0].attach, Some("xdp"));
        assert_eq!(
            r.interfaces[0].reason.as_deref(),
            Some("auto: physical device (driver ixgbe) with native XDP")
        );
        let mut p = host();
        p.ifaces[0].device = Some(Device::Virtual("veth".into()));
        let r = decide(&p, &want(AttachChoice::Auto));
        assert!(r.ok, "{r:?}");
        assert_eq!(r.interfaces[0].attach, Some("tc"));
        assert_eq!(
            r.interfaces[0].reason.as_deref(),
            Some("auto: virtual device (veth): TC keeps the peer's TSO")
        );
        let needed = |r: &Report, name: &str| {
            r.checks
                .iter()
                .find(|c| c.name.starts_with(name))
                .unwrap()
                .needed
        };
        assert!(!needed(&r, "bpf_link for XDP"), "{r:?}");
        let old = with(p, Feature::Tcx, Some(false));
        let r = decide(&old, &want(AttachChoice::Auto));
        assert!(needed(&r, "clsact"), "{r:?}");
        assert!(r.interfaces[0].note.contains("clsact"), "{r:?}");
        assert!(!needed(&r, "bpf_link for XDP"), "{r:?}");
        // --attach xdp keeps XDP whatever the device, and says so.
        let r = decide(&old, &want(AttachChoice::Xdp));
        assert_eq!(r.interfaces[0].attach, Some("xdp"));
        assert_eq!(r.interfaces[0].reason.as_deref(), Some("--attach xdp"));
    }

    #[test]
    fn an_old_kernel_is_one_line_naming_the_minimum() {
        let mut p = host();
        p.release = "5.4.0-150-generic".into();
        p.kernel = Some((5, 4));
        p.features.clear();
        let r = decide(&p, &want(AttachChoice::Xdp));
        assert!(!r.ok);
        assert_eq!(
            r.problem.as_deref(),
            Some("kernel 5.4.0-150-generic is too old for drain: it needs Linux 5.10 or newer")
        );
    }

    #[test]
    fn attach_tc_without_tcx_takes_the_clsact_path() {
        let mut p = host();
        p.release = "6.1.0".into();
        p.kernel = Some((6, 1));
        let p = with(p, Feature::Tcx, Some(false));
        assert!(decide(&p, &want(AttachChoice::Xdp)).ok, "xdp needs no TCX");
        let r = decide(&p, &want(AttachChoice::Tc));
        assert!(r.ok, "{r:?}");
        let tcx = r.checks.iter().find(|c| c.name.starts_with("TCX")).unwrap();
        assert_eq!(tcx.status, "missing");
        assert!(!tcx.needed);
        assert!(tcx.detail.contains("clsact"), "{tcx:?}");
        let clsact = r
            .checks
            .iter()
            .find(|c| c.name.starts_with("clsact"))
            .unwrap();
        assert!(clsact.needed && clsact.status == "ok", "{clsact:?}");
        assert_eq!(r.interfaces[0].attach, Some("tc"));
        assert!(r.interfaces[0].note.contains("clsact"), "{r:?}");
        // Neither TCX nor clsact: blocked, naming both and the modules.
        let r = decide(
            &with(p.clone(), Feature::Clsact, Some(false)),
            &want(AttachChoice::Tc),
        );
        assert!(!r.ok);
        let problem = r.problem.unwrap();
        assert!(
            problem.contains("TCX") && problem.contains("cls_bpf"),
            "{problem}"
        );
        // With TCX, clsact is not needed, whatever it says.
        let r = decide(
            &with(host(), Feature::Clsact, Some(false)),
            &want(AttachChoice::Tc),
        );
        assert!(r.ok && r.interfaces[0].note.contains("TCX"), "{r:?}");
    }

    #[test]
    fn a_foreign_xdp_program_blocks_xdp_but_not_tc_or_auto() {
        let mut p = host();
        p.ifaces[0].xdp_other = Some("xdp_fw, id 7".into());
        let r = decide(&p, &want(AttachChoice::Xdp));
        assert!(!r.ok);
        let problem = r.problem.unwrap();
        assert!(
            problem.contains("xdp_fw, id 7") && problem.contains("--attach tc"),
            "{problem}"
        );
        assert_eq!(
            decide(&p, &want(AttachChoice::Tc)).interfaces[0].attach,
            Some("tc")
        );
        let r = decide(&p, &want(AttachChoice::Auto));
        assert!(r.ok);
        assert_eq!(r.interfaces[0].attach, Some("tc"));
        let r = decide(
            &with(p, Feature::Tcx, Some(false)),
            &want(AttachChoice::Auto),
        );
        assert!(r.ok, "{r:?}");
        assert_eq!(r.interfaces[0].attach, Some("tc"));
        assert!(r.interfaces[0].note.contains("clsact"), "{r:?}");
    }

    #[test]
    fn privileges_btf_and_bpffs_block_with_what_to_do() {
        let mut p = host();
        p.caps = Caps {
            cap_net_admin: true,
            cap_bpf: true,
            ..Default::default()
        };
        let r = decide(&p, &want(AttachChoice::Xdp));
        assert!(
            r.problem.unwrap().contains("CAP_PERFMON"),
            "tracing needs perfmon"
        );
        p.caps.cap_perfmon = true;
        p.bpffs = Bpffs::Mountable;
        let r = decide(&p, &want(AttachChoice::Xdp));
        assert!(r.problem.unwrap().contains("mount -t bpf bpf /sys/fs/bpf"));
        p.caps.cap_sys_admin = true;
        assert!(
            decide(&p, &want(AttachChoice::Xdp)).ok,
            "drain mounts bpffs itself"
        );
        p.btf = false;
        assert!(decide(&p, &want(AttachChoice::Xdp))
            .problem
            .unwrap()
            .contains("CONFIG_DEBUG_INFO_BTF"));
    }

    #[test]
    fn a_rejected_program_or_missing_feature_blocks_unused_ones_do_not() {
        let p = with(host(), Feature::Programs, Some(false));
        assert!(!decide(&p, &want(AttachChoice::Xdp)).ok);
        let p = with(host(), Feature::SkLookup, Some(false));
        let r = decide(&p, &want(AttachChoice::Xdp));
        assert!(r.ok);
        assert!(r
            .checks
            .iter()
            .any(|c| c.name.starts_with("sk_lookup") && c.status == "missing" && !c.needed));
        let p = with(host(), Feature::MmapableArray, Some(false));
        assert!(decide(&p, &want(AttachChoice::Xdp))
            .problem
            .unwrap()
            .contains("Linux 5.5"));
    }

    #[test]
    fn reset_answers_through_the_kernel_on_both_hooks_and_needs_sk_lookup() {
        for attach in [AttachChoice::Tc, AttachChoice::Xdp] {
            let reset = Wanted {
                attach,
                policy: Policy::Reset,
            };
            let r = decide(&host(), &reset);
            assert!(r.ok, "{attach:?}: {:?}", r.problem);
            let note = &r.interfaces[0].note;
            assert!(
                note.contains("the kernel answers refusals with a RST"),
                "{note}"
            );
            assert!(!note.contains("drop"), "{note}");
            let sk_lookup = |r: &Report| {
                r.checks
                    .iter()
                    .find(|c| c.name == Feature::SkLookup.what())
                    .map(|c| c.needed)
            };
            assert_eq!(sk_lookup(&r), Some(true), "{attach:?}");
            let r = decide(&with(host(), Feature::SkLookup, Some(false)), &reset);
            assert!(!r.ok);
            assert!(r.problem.unwrap().contains("sk_lookup"), "{attach:?}");
            // Policy drop neither needs it nor gets the note.
            let drop = Wanted {
                attach,
                policy: Policy::Drop,
            };
            let r = decide(&with(host(), Feature::SkLookup, Some(false)), &drop);
            assert!(r.ok && sk_lookup(&r) == Some(false), "{attach:?}");
            assert!(!r.interfaces[0].note.contains("RST"));
        }
    }

    #[test]
    fn releases_parse() {
        assert_eq!(parse_release("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(parse_release("5.4.0"), Some((5, 4)));
        assert_eq!(parse_release("weird"), None);
    }

    fn memlock_row(r: &Report) -> &Item {
        r.checks
            .iter()
            .find(|c| c.name.starts_with("locked memory"))
            .expect("a memlock row")
    }

    /// 5.10 (maps charged to RLIMIT_MEMLOCK) with 64 KiB and a hard limit of 64 KiB.
    fn old_small() -> Probe {
        let mut p = host();
        p.release = "5.10.0-46-cloud-amd64".into();
        p.kernel = Some((5, 10));
        p.memlock = Memlock {
            limit: Some((64 << 10, 64 << 10)),
            charged: Some(true),
            raisable: false,
            fits: Some(false),
        };
        p
    }

    #[test]
    fn memlock_is_not_needed_where_the_memory_cgroup_is_charged() {
        let r = decide(&host(), &want(AttachChoice::Auto));
        let m = memlock_row(&r);
        assert_eq!((m.status, m.needed), ("ok", false));
        assert!(m.detail.contains("memory cgroup"), "{m:?}");
        assert!(r.ok);
    }

    #[test]
    fn a_small_memlock_that_cannot_be_raised_blocks_with_the_fix() {
        let r = decide(&old_small(), &want(AttachChoice::Auto));
        let m = memlock_row(&r);
        assert_eq!((m.status, m.needed), ("missing", true));
        assert!(!r.ok);
        let problem = r.problem.unwrap();
        for w in [
            "RLIMIT_MEMLOCK",
            "64 KiB",
            "ulimit -l unlimited",
            "CAP_SYS_RESOURCE",
        ] {
            assert!(problem.contains(w), "{w}: {problem}");
        }
        assert!(!problem.contains('\n'), "one line: {problem}");
    }

    #[test]
    fn memlock_that_can_be_raised_or_fits_passes() {
        let mut p = old_small();
        p.memlock.raisable = true;
        let r = decide(&p, &want(AttachChoice::Auto));
        assert_eq!(memlock_row(&r).status, "ok");
        assert!(memlock_row(&r).detail.contains("raises it"), "{r:?}");
        assert!(r.ok, "{r:?}");
        let mut p = old_small();
        p.memlock.fits = Some(true);
        let r = decide(&p, &want(AttachChoice::Auto));
        assert_eq!(memlock_row(&r).status, "ok");
        assert!(r.ok, "{r:?}");
        let mut p = old_small();
        p.memlock.limit = Some((libc::RLIM_INFINITY, libc::RLIM_INFINITY));
        assert!(decide(&p, &want(AttachChoice::Auto)).ok);
    }

    #[test]
    fn memlock_not_probed_is_judged_by_the_kernel_version() {
        let mut p = old_small();
        p.memlock.charged = None;
        p.memlock.fits = None;
        let r = decide(&p, &want(AttachChoice::Auto));
        assert_eq!(memlock_row(&r).status, "unknown");
        assert!(memlock_row(&r).needed);
        let mut p = host();
        p.memlock.charged = None;
        assert_eq!(
            memlock_row(&decide(&p, &want(AttachChoice::Auto))).status,
            "ok"
        );
    }
}

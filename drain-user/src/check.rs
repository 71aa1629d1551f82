//! `check`: the preflight an Ansible play runs before a rollout. It probes, for the caller's
//! network namespace, everything a gate needs (kernel, BPF features, BTF, bpffs,
//! privileges, each interface's XDP/TCX hooks) without changing the host: programs are
//! loaded and never attached to a host interface, maps are created and closed, and the one
//! attach probe runs on the loopback of a private network namespace that dies with the
//! probe. [`decide`] turns a [`Probe`] into a [`Report`]; it is a pure function, so its
//! decisions are unit-tested on synthetic probes (an old kernel cannot be faked here).

use std::{
    fs, io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::Result;
use aya::{
    maps::MapType,
    programs::{BtfTracePoint, FEntry, ProgramType, SchedClassifier, SkLookup, TcAttachType, Xdp},
};
use drain_common::prog;
use serde::Serialize;

use crate::{
    domain::{AttachChoice, Policy},
    iface::{self, Iface},
    object, pins, sys,
};

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

/// The effective capabilities that matter to drain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Caps {
    pub root: bool,
    pub cap_bpf: bool,
    pub cap_net_admin: bool,
    pub cap_perfmon: bool,
    pub cap_sys_admin: bool,
}

impl Caps {
    /// From CapEff in /proc/self/status.
    pub fn current() -> Self {
        const CAP_NET_ADMIN: u32 = 12;
        const CAP_SYS_ADMIN: u32 = 21;
        const CAP_PERFMON: u32 = 38;
        const CAP_BPF: u32 = 39;
        let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
        let eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0);
        let has = |c: u32| eff & (1 << c) != 0;
        Caps {
            // SAFETY: geteuid has no preconditions.
            root: unsafe { libc::geteuid() } == 0,
            cap_bpf: has(CAP_BPF),
            cap_net_admin: has(CAP_NET_ADMIN),
            cap_perfmon: has(CAP_PERFMON),
            cap_sys_admin: has(CAP_SYS_ADMIN),
        }
    }

    /// Loading the gate programs and attaching them: CAP_NET_ADMIN, and CAP_BPF or
    /// CAP_SYS_ADMIN.
    pub fn can_gate(&self) -> bool {
        self.cap_net_admin && (self.cap_bpf || self.cap_sys_admin)
    }

    /// The tracker is a tracing program that reads kernel memory: CAP_PERFMON (with
    /// CAP_BPF) or CAP_SYS_ADMIN.
    pub fn can_trace(&self) -> bool {
        self.cap_sys_admin || (self.cap_bpf && self.cap_perfmon)
    }
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
    // A TC attachment is made with --attach tc, and with auto where XDP is taken.
    let tc_used = want.attach == AttachChoice::Tc
        || (want.attach == AttachChoice::Auto && p.ifaces.iter().any(|i| i.xdp_other.is_some()));
    for f in Feature::ALL {
        let needed = match f {
            // Where TCX is missing, `--attach tc` takes the clsact path instead.
            Feature::Tcx => false,
            Feature::Clsact => tc_used && tcx == Some(false),
            Feature::XdpLink => want.attach != AttachChoice::Tc,
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
    for i in &p.ifaces {
        let tc_note = if tcx == Some(false) {
            format!(
                "clsact ingress (no TCX): drain's cls_bpf filter at pref {}, first",
                crate::clsact::PRIORITY
            )
        } else {
            "TCX ingress, first in the chain".to_string()
        };
        let (attach, note) = match (want.attach, &i.xdp_other) {
            (AttachChoice::Tc, _) => (Some("tc"), tc_note),
            (AttachChoice::Xdp, Some(other)) => {
                problems.push(format!(
                    "another XDP program ({other}) holds {}: drain will not replace it; use \
                     --attach tc (or auto)",
                    i.name
                ));
                (None, format!("XDP hook taken by {other}"))
            }
            (AttachChoice::Auto, Some(other)) => (
                Some("tc"),
                format!("XDP hook taken by {other}: TC instead, {tc_note}"),
            ),
            (_, None) => (
                Some("xdp"),
                match i.xdp_native {
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

/// The text `check` prints without --json.
pub fn human(r: &Report) -> String {
    let mut s = String::new();
    for c in &r.checks {
        let min = c
            .min_kernel
            .as_ref()
            .map(|m| format!(" (Linux {m})"))
            .unwrap_or_default();
        let detail = if c.detail.is_empty() {
            String::new()
        } else {
            format!(": {}", c.detail)
        };
        let unneeded = if c.needed {
            ""
        } else {
            " [not needed with these options]"
        };
        s.push_str(&format!(
            "{:<8} {}{min}{unneeded}{detail}\n",
            c.status, c.name
        ));
    }
    s.push_str("interfaces:\n");
    for i in &r.interfaces {
        let mut extra = Vec::new();
        if !i.probe.tcx_others.is_empty() {
            extra.push(format!("tcx ingress: {}", i.probe.tcx_others.join("; ")));
        }
        s.push_str(&format!(
            "  {:<16} {:<4} {}{}\n",
            i.probe.name,
            i.attach.unwrap_or("-"),
            i.note,
            extra.iter().map(|e| format!("; {e}")).collect::<String>()
        ));
    }
    match &r.problem {
        None => s.push_str("result: a gate can work here with these options\n"),
        Some(p) => s.push_str(&format!("result: blocked: {p}\n")),
    }
    s
}

/// Probes the host for `check`. Needs no privileges: what it cannot probe is `None`.
pub fn probe(names: &[String]) -> Result<Probe> {
    let mut p = Probe {
        caps: Caps::current(),
        btf: fs::File::open("/sys/kernel/btf/vmlinux").is_ok(),
        ..Default::default()
    };
    let (release, kernel) = uname_release();
    p.release = release;
    p.kernel = kernel;
    p.bpffs = if pins::bpffs_mounted()? {
        Bpffs::Mounted
    } else if fs::read_to_string("/proc/filesystems").is_ok_and(|f| {
        f.lines()
            .any(|l| l.split_whitespace().last() == Some("bpf"))
    }) {
        Bpffs::Mountable
    } else {
        Bpffs::Missing
    };
    let (xdp_link, tcx, clsact) = probe_links(p.caps);
    p.features.push((Feature::XdpLink, xdp_link.0, xdp_link.1));
    p.features.push((Feature::Tcx, tcx.0, tcx.1));
    p.features.push((Feature::Clsact, clsact.0, clsact.1));
    p.features.push((
        Feature::MmapableArray,
        probe_mmapable(),
        "an 8-byte BPF_F_MMAPABLE array created and mapped".into(),
    ));
    p.features.push((
        Feature::RingBuf,
        aya::sys::is_map_supported(MapType::RingBuf).ok(),
        String::new(),
    ));
    p.features.push((
        Feature::SkLookup,
        aya::sys::is_program_supported(ProgramType::SkLookup).ok(),
        String::new(),
    ));
    let (programs, tp_btf) = if p.bpffs == Bpffs::Mounted {
        probe_programs()
    } else {
        let why = "not probed: bpffs is not mounted".to_string();
        ((None, why.clone()), (None, why))
    };
    p.features.push((Feature::TpBtf, tp_btf.0, tp_btf.1));
    p.features.push((Feature::Programs, programs.0, programs.1));
    let sock_diag = match crate::diag::dump(crate::diag::States::LISTEN, false) {
        Ok(_) => (Some(true), "a TCP sock_diag dump answered".to_string()),
        Err(e) if format!("{e:#}").contains("ENOENT") => (Some(false), format!("{e:#}")),
        Err(e) => (None, format!("not probed: {e:#}")),
    };
    p.features
        .push((Feature::SockDiag, sock_diag.0, sock_diag.1));

    let native = xdp_features();
    for i in iface::resolve(names)? {
        p.ifaces.push(iface_probe(&i, &native));
    }
    Ok(p)
}

fn iface_probe(i: &Iface, native: &Option<Vec<(u32, bool)>>) -> IfaceProbe {
    let xdp_other = i
        .xdp
        .map(|(id, _)| iface::program_name(id))
        .filter(|n| !n.starts_with(prog::XDP));
    let tcx_others = SchedClassifier::query_tcx(&i.name, TcAttachType::Ingress)
        .map(|(_, progs)| {
            progs
                .iter()
                .map(|p| iface::program_name(p.id()))
                .filter(|n| !n.starts_with(prog::TC))
                .collect()
        })
        .unwrap_or_default();
    IfaceProbe {
        name: i.name.clone(),
        ifindex: i.index,
        xdp_native: native
            .as_ref()
            .map(|n| n.iter().any(|(idx, basic)| *idx == i.index && *basic)),
        xdp_other,
        tcx_others,
    }
}

fn uname_release() -> (String, Option<Version>) {
    // SAFETY: utsname is plain old data and uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-parameter.
    if unsafe { libc::uname(&mut u) } != 0 {
        return ("unknown".into(), None);
    }
    // SAFETY: uname NUL-terminates release.
    let release = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let v = parse_release(&release);
    (release, v)
}

/// "6.18.0-1-amd64" -> (6, 18).
pub fn parse_release(release: &str) -> Option<Version> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

// ---------------------------------------------------------------------------------------
// Probes (raw bpf(2): tiny programs and maps, closed at once)
// ---------------------------------------------------------------------------------------

const BPF_MAP_CREATE: u32 = 0;
const BPF_PROG_LOAD: u32 = 5;
const BPF_LINK_CREATE: u32 = 28;
const BPF_MAP_TYPE_ARRAY: u64 = 2;
const BPF_F_MMAPABLE: u64 = 1 << 10;
const BPF_PROG_TYPE_SCHED_CLS: u64 = 3;
const BPF_PROG_TYPE_XDP: u64 = 6;
const BPF_XDP: u64 = 37;
const BPF_TCX_INGRESS: u64 = 46;
const XDP_FLAGS_SKB_MODE: u64 = 2;

fn fd(rc: i64) -> OwnedFd {
    // SAFETY: a new fd returned by bpf(2), owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(rc as i32) }
}

/// Loads `r0 = ret; exit` as a program of `prog_type`.
fn load_trivial(prog_type: u64, ret: i32) -> io::Result<OwnedFd> {
    // BPF_ALU64 | BPF_MOV | BPF_K into r0, then BPF_JMP | BPF_EXIT.
    let insns: [u64; 2] = [0xb7 | (u64::from(ret as u32) << 32), 0x95];
    let license = c"GPL";
    // union bpf_attr, BPF_PROG_LOAD: { u32 prog_type; u32 insn_cnt; u64 insns; u64 license; ... }
    let mut attr = [0u64; 16];
    attr[0] = prog_type | (2 << 32);
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    sys::bpf(BPF_PROG_LOAD, &mut attr).map(fd)
}

/// BPF_LINK_CREATE of `prog` on `ifindex` at `attach_type`.
fn link_create(prog: &OwnedFd, ifindex: u32, attach_type: u64, flags: u64) -> io::Result<OwnedFd> {
    // union bpf_attr, BPF_LINK_CREATE: { u32 prog_fd; u32 target_ifindex; u32 attach_type; u32 flags; }
    let mut attr = [0u64; 16];
    attr[0] = prog.as_raw_fd() as u64 | (u64::from(ifindex) << 32);
    attr[1] = attach_type | (flags << 32);
    sys::bpf(BPF_LINK_CREATE, &mut attr).map(fd)
}

type Probed = (Option<bool>, String);

/// XDP and TCX links and a clsact filter, attached for real to the loopback of a private
/// network namespace (made for the probe, gone with it: the host's interfaces are never
/// touched). Without CAP_SYS_ADMIN no namespace can be made: TCX is then told apart by the
/// error of a link to no interface (ENODEV from TCX, EINVAL from a kernel without it), XDP
/// links by the kernel version, and clsact is not probed. [`crate::clsact::NO_TCX_ENV`]
/// reports TCX missing, as `gate on` then behaves.
fn probe_links(caps: Caps) -> (Probed, Probed, Probed) {
    let (xdp, tcx, clsact) = probe_links_raw(caps);
    if std::env::var_os(crate::clsact::NO_TCX_ENV).is_some() {
        let why = format!(
            "{} is set: drain behaves as on a kernel without TCX",
            crate::clsact::NO_TCX_ENV
        );
        return (xdp, (Some(false), why), clsact);
    }
    (xdp, tcx, clsact)
}

fn probe_links_raw(caps: Caps) -> (Probed, Probed, Probed) {
    let in_private_ns = caps
        .cap_sys_admin
        .then(|| {
            std::thread::spawn(|| -> io::Result<(Probed, Probed, Probed)> {
                // SAFETY: unshare affects only this thread, which ends right after the probes.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                let lo = 1;
                let attach = |prog_type, ret, attach_type, flags| -> Probed {
                    match load_trivial(prog_type, ret)
                        .and_then(|p| link_create(&p, lo, attach_type, flags))
                    {
                        Ok(_) => (
                            Some(true),
                            "a link attached in a private network namespace".into(),
                        ),
                        Err(e)
                            if matches!(
                                e.raw_os_error(),
                                Some(libc::EINVAL | libc::EOPNOTSUPP)
                            ) =>
                        {
                            (Some(false), format!("BPF_LINK_CREATE: {e}"))
                        }
                        Err(e) => (None, format!("BPF_LINK_CREATE: {e}")),
                    }
                };
                let clsact = match crate::clsact::add_qdisc(lo).and_then(|()| {
                    let prog = load_trivial(BPF_PROG_TYPE_SCHED_CLS, -1)?;
                    crate::clsact::add_filter(lo, std::os::fd::AsFd::as_fd(&prog))
                }) {
                    Ok(()) => (
                        Some(true),
                        "a filter attached in a private network namespace".into(),
                    ),
                    Err(e) => (Some(false), format!("{e:#}")),
                };
                Ok((
                    attach(BPF_PROG_TYPE_XDP, 2, BPF_XDP, XDP_FLAGS_SKB_MODE),
                    attach(BPF_PROG_TYPE_SCHED_CLS, -1, BPF_TCX_INGRESS, 0),
                    clsact,
                ))
            })
            .join()
            .ok()
            .and_then(Result::ok)
        })
        .flatten();
    if let Some(r) = in_private_ns {
        return r;
    }
    let tcx = match load_trivial(BPF_PROG_TYPE_SCHED_CLS, -1)
        .and_then(|p| link_create(&p, 0, BPF_TCX_INGRESS, 0))
    {
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {
            (Some(true), "ENODEV for no interface".into())
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            (Some(false), "EINVAL: unknown attach type".into())
        }
        Err(e) => (None, format!("not probed: {e}")),
        Ok(_) => (None, "unexpected link to no interface".into()),
    };
    (
        (
            None,
            "not probed (needs CAP_SYS_ADMIN): from the kernel version".into(),
        ),
        tcx,
        (None, "not probed (needs CAP_SYS_ADMIN)".into()),
    )
}

/// Whether the kernel has TCX, told apart without attaching anything: a TCX link to no
/// interface fails with ENODEV where TCX exists, EINVAL where the attach type is unknown
/// (`link_create`). Any other error (no privileges) says nothing: returned as is.
pub fn tcx_link_probe() -> io::Result<bool> {
    match load_trivial(BPF_PROG_TYPE_SCHED_CLS, -1)
        .and_then(|p| link_create(&p, 0, BPF_TCX_INGRESS, 0))
    {
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(e),
        Ok(_) => Err(io::Error::other("a TCX link to no interface was accepted")),
    }
}

fn probe_mmapable() -> Option<bool> {
    // union bpf_attr, BPF_MAP_CREATE: { u32 map_type; u32 key_size; u32 value_size;
    // u32 max_entries; u32 map_flags; ... }
    let mut attr = [0u64; 16];
    attr[0] = BPF_MAP_TYPE_ARRAY | (4 << 32);
    attr[1] = 8 | (1 << 32);
    attr[2] = BPF_F_MMAPABLE;
    let map = match sys::bpf(BPF_MAP_CREATE, &mut attr) {
        Ok(rc) => fd(rc),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Some(false),
        Err(_) => return None,
    };
    // SAFETY: maps one page of the map's memory read-only, unmapped right away.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ,
            libc::MAP_SHARED,
            map.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Some(false);
    }
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(p, 4096) };
    Some(true)
}

/// A pin directory for the probe's maps, removed with everything in it when dropped.
struct ProbeDir(PathBuf);

impl Drop for ProbeDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Loads drain's embedded object and every program a gate loads: XDP, TC, the tracker,
/// sk_lookup and the RST counter (one tp_btf program or two fentry ones, as `gate on`
/// picks for this kernel). The verifier runs; nothing is attached. Its maps are pinned in a private directory of bpffs, removed afterwards.
/// Returns (every program loads, the tracker (tp_btf) loads).
fn probe_programs() -> (Probed, Probed) {
    let dir = ProbeDir(Path::new(pins::BPFFS).join(format!("drain-check-{}", std::process::id())));
    // Err((Some(true), _)): the gate programs loaded and the tracker did not;
    // Err((Some(false), _)): a gate program failed; Err((None, _)): nothing was loaded.
    let run = || -> Result<(), (Option<bool>, String)> {
        fs::create_dir_all(&dir.0).map_err(|e| (None, format!("{}: {e}", dir.0.display())))?;
        let mut bpf = object::load(&dir.0).map_err(|e| (Some(false), format!("{e:#}")))?;
        let xdp: &mut Xdp = bpf
            .program_mut(prog::XDP)
            .and_then(|p| p.try_into().ok())
            .ok_or((Some(false), "no XDP program in the object".into()))?;
        xdp.load()
            .map_err(|e| (Some(false), format!("XDP program: {e}")))?;
        let tc: &mut SchedClassifier = bpf
            .program_mut(prog::TC)
            .and_then(|p| p.try_into().ok())
            .ok_or((Some(false), "no TC program in the object".into()))?;
        tc.load()
            .map_err(|e| (Some(false), format!("TC program: {e}")))?;
        let kernel = crate::btf::Kernel::default();
        let btf = kernel
            .aya()
            .map_err(|e| (Some(true), format!("reading BTF: {e:#}")))?;
        let track: &mut BtfTracePoint = bpf
            .program_mut(prog::TRACK)
            .and_then(|p| p.try_into().ok())
            .ok_or((Some(false), "no tracker program in the object".into()))?;
        track.load("inet_sock_set_state", btf).map_err(|e| {
            (
                Some(true),
                format!("tracker (tp_btf/inet_sock_set_state): {e}"),
            )
        })?;
        let lookup: &mut SkLookup = bpf
            .program_mut(prog::LOOKUP)
            .and_then(|p| p.try_into().ok())
            .ok_or((Some(false), "no sk_lookup program in the object".into()))?;
        lookup
            .load()
            .map_err(|e| (Some(false), format!("sk_lookup program: {e}")))?;
        let counter = crate::gate::RstCounter::current(&kernel)
            .map_err(|e| (Some(false), format!("{e:#}")))?;
        for &(_, name, function) in counter.links() {
            let loaded = match counter {
                crate::gate::RstCounter::Tracepoint => bpf
                    .program_mut(name)
                    .and_then(|p| <&mut BtfTracePoint>::try_from(p).ok())
                    .map(|p| p.load(function, btf)),
                crate::gate::RstCounter::Fentry => bpf
                    .program_mut(name)
                    .and_then(|p| <&mut FEntry>::try_from(p).ok())
                    .map(|p| p.load(function, btf)),
            };
            match loaded {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    return Err((
                        Some(false),
                        format!("RST counter ({}): {e}", counter.describe()),
                    ))
                }
                None => return Err((Some(false), format!("no {name} program in the object"))),
            }
        }
        Ok(())
    };
    match run() {
        Ok(()) => (
            (
                Some(true),
                "XDP, TC, tracker, sk_lookup and RST counter programs loaded (not attached)".into(),
            ),
            (Some(true), "tp_btf/inet_sock_set_state loaded".into()),
        ),
        Err((Some(true), e)) => ((Some(false), e.clone()), (Some(false), e)),
        Err((Some(false), e)) => (
            (Some(false), e),
            (
                None,
                "not probed (a gate program failed first): from the kernel version".into(),
            ),
        ),
        Err((None, e)) => (
            (None, format!("not probed: {e}")),
            (None, format!("not probed: {e}")),
        ),
    }
}

// ---------------------------------------------------------------------------------------
// Native XDP per interface: xdp-features of the netdev generic-netlink family (Linux 6.3)
// ---------------------------------------------------------------------------------------

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
const NETDEV_XDP_ACT_BASIC: u64 = 1;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

/// (ifindex, has native XDP) for every interface of the caller's namespace; `None` when
/// the kernel has no netdev family (before 6.3) or the dump fails.
fn xdp_features() -> Option<Vec<(u32, bool)>> {
    use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};
    let mut sock = Socket::new(NETLINK_GENERIC).ok()?;
    sock.bind_auto().ok()?;
    sock.connect(&SocketAddr::new(0, 0)).ok()?;
    let mut name = b"netdev\0".to_vec();
    let req = genl_msg(
        GENL_ID_CTRL,
        NLM_F_REQUEST,
        CTRL_CMD_GETFAMILY,
        &attr(CTRL_ATTR_FAMILY_NAME, &mut name),
    );
    sock.send(&req, 0).ok()?;
    let mut family = None;
    genl_read(&mut sock, |attrs| {
        if let Some(v) = attrs.iter().find(|(t, _)| *t == CTRL_ATTR_FAMILY_ID) {
            family = v.1.get(..2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
        }
    })?;
    let req = genl_msg(family?, NLM_F_REQUEST | NLM_F_DUMP, NETDEV_CMD_DEV_GET, &[]);
    sock.send(&req, 0).ok()?;
    let mut out = Vec::new();
    genl_read(&mut sock, |attrs| {
        let get = |t| {
            attrs
                .iter()
                .find(|(a, _)| *a == t)
                .map(|(_, v)| v.as_slice())
        };
        let idx = get(NETDEV_A_DEV_IFINDEX)
            .and_then(|b| b.get(..4))
            .map(|b| u32::from_ne_bytes(b.try_into().unwrap()));
        let feats = get(NETDEV_A_DEV_XDP_FEATURES)
            .and_then(|b| b.get(..8))
            .map(|b| u64::from_ne_bytes(b.try_into().unwrap()))
            .unwrap_or(0);
        if let Some(idx) = idx {
            out.push((idx, feats & NETDEV_XDP_ACT_BASIC != 0));
        }
    })?;
    Some(out)
}

/// One netlink attribute: { u16 len; u16 type; value; padding to 4 }.
fn attr(ty: u16, value: &mut Vec<u8>) -> Vec<u8> {
    let mut a = Vec::new();
    a.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    a.extend_from_slice(&ty.to_ne_bytes());
    a.append(value);
    while a.len() % 4 != 0 {
        a.push(0);
    }
    a
}

/// nlmsghdr { u32 len; u16 type; u16 flags; u32 seq; u32 pid; } + genlmsghdr { u8 cmd;
/// u8 version; u16 reserved; } + attributes.
fn genl_msg(family: u16, flags: u16, cmd: u8, attrs: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&family.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[cmd, 1, 0, 0]);
    m.extend_from_slice(attrs);
    m
}

/// Reads answers until NLMSG_DONE (dumps) or one answer (plain requests), calling `each`
/// with the attributes of every message. `None` on a netlink error.
fn genl_read(
    sock: &mut netlink_sys::Socket,
    mut each: impl FnMut(&[(u16, Vec<u8>)]),
) -> Option<()> {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = sock.recv(&mut &mut buf[..], 0).ok()?;
        let mut off = 0;
        let mut multi = false;
        while off + 16 <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().ok()?) as usize;
            let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().ok()?);
            let flags = u16::from_ne_bytes(buf[off + 6..off + 8].try_into().ok()?);
            if len < 16 || off + len > n {
                return None;
            }
            match ty {
                NLMSG_DONE => return Some(()),
                NLMSG_ERROR => {
                    let code = i32::from_ne_bytes(buf[off + 16..off + 20].try_into().ok()?);
                    if code != 0 {
                        return None;
                    }
                }
                _ => {
                    multi |= flags & 2 != 0; // NLM_F_MULTI
                    let mut attrs = Vec::new();
                    let mut a = off + 20;
                    while a + 4 <= off + len {
                        let alen = u16::from_ne_bytes(buf[a..a + 2].try_into().ok()?) as usize;
                        let aty = u16::from_ne_bytes(buf[a + 2..a + 4].try_into().ok()?) & 0x3fff;
                        if alen < 4 || a + alen > off + len {
                            break;
                        }
                        attrs.push((aty, buf[a + 4..a + alen].to_vec()));
                        a += (alen + 3) & !3;
                    }
                    each(&attrs);
                }
            }
            off += (len + 3) & !3;
        }
        if !multi {
            return Some(());
        }
    }
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
                ..Default::default()
            }],
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
}

//! `gate on` and `gate off`: attaching, pinning, and tearing down.
//!
//! Order matters for fail-open: `on` attaches with the switch still off, fills the ports, and
//! turns the switch on last; `off` turns the switch off first (one map write, no window),
//! then detaches and unpins. A failure in the middle of `on` rolls back what that call did.
//!
//! Besides one link per interface, a gate has three links of its own: the tracker, the
//! namespace-wide refusal of policy reset (sk_lookup on the gate's network namespace, so it
//! covers every interface, those created after `gate on` too) and the count of the RSTs the
//! kernel sends for it (fentry on tcp_v4_send_reset and tcp_v6_send_reset). Those two are attached whatever the policy
//! (under policy drop the sk_lookup program lets every lookup through), so switching the
//! policy is one map write like everything else.

use std::{
    collections::BTreeSet,
    fs, io,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{Array, MapData},
    programs::{
        links::FdLink, tc::TcAttachOptions, LinkOrder, SchedClassifier, SkLookup, TcAttachType,
        Xdp, XdpMode as AyaXdpMode,
    },
    Ebpf,
};
use drain_common::{
    map, prog, GateConfig, ResetTraceConfig, ALLOW_V4, ALLOW_V6, GATE_OFF, GATE_ON,
    MAX_ALLOW_PREFIXES, RST_RATE_SHIFT,
};
use ipnet::IpNet;

use crate::{
    btf, choices, clsact,
    domain::{
        attach::{self, Decision},
        usage, AttachChoice, Policy,
    },
    errln,
    iface::{self, Iface},
    limits,
    links::{self, Attachment, LinkState},
    netlink,
    netns::{self, NetnsId, StateDir},
    object,
    pins::{self, Hook, LinkPin},
    state::{self, boottime_ns, OpenGate},
    sys, track,
};

pub struct OnArgs {
    pub ports: BTreeSet<u16>,
    /// Interfaces by name; empty = every interface that is up.
    pub ifaces: Vec<String>,
    pub attach: AttachChoice,
    pub ttl: Option<Duration>,
    pub allow: Vec<IpNet>,
    pub policy: Policy,
    /// RSTs per second, all CPUs together (policy reset).
    pub rst_rate: u32,
    /// `--announce`, `--quiet`, `--maint`, `--agent-port` ([`crate::agent`]).
    pub announce: crate::agent::Announce,
}

impl OnArgs {
    /// Everything about the input that can be checked before the host changes: a failing
    /// `gate on` over an existing gate must leave it as it was.
    pub fn validate(&self) -> Result<()> {
        limits::check_port_count(self.ports.len())?;
        self.announce.validate(&self.ports, self.ttl)?;
        let distinct: BTreeSet<IpNet> = self.allow.iter().copied().collect();
        for (family, v4) in [("IPv4", true), ("IPv6", false)] {
            let n = distinct.iter().filter(|p| p.addr().is_ipv4() == v4).count();
            if n > MAX_ALLOW_PREFIXES as usize {
                return Err(usage(format!(
                    "{n} {family} --allow prefixes given: a gate holds at most \
                     {MAX_ALLOW_PREFIXES} per family; merge them into shorter prefixes"
                )));
            }
        }
        Ok(())
    }
}

/// Installs (or replaces) the gate `args` describes on `targets`; the caller has run
/// [`OnArgs::validate`] first, before anything it does to the host.
pub fn on(args: &OnArgs, targets: &[Iface]) -> Result<Vec<String>> {
    pins::ensure_bpffs()?;
    let _lock = pins::lock()?;
    let own = NetnsId::current()?;
    pins::make_dir(&pins::root())?;
    reap_orphans(own);
    let dir = pins::state_path(StateDir::Gate(own));
    let fresh = !pins::trusted_dir(&dir)?;
    pins::make_dir(&dir)?;
    let mut created: Vec<Made> = Vec::new();
    let result = on_locked(args, targets, &dir, &mut created);
    if result.is_err() {
        // Roll back this call's attachments; a gate that existed before keeps its state.
        if fresh {
            let _ = teardown(&dir);
        } else {
            for made in &created {
                match made {
                    Made::Pin(pin) => {
                        let _ = sys::detach_link(pin);
                        let _ = fs::remove_file(pin);
                    }
                    Made::Clsact(rec) => {
                        let _ = Attachment::Clsact(*rec).remove(&dir);
                    }
                    Made::Choice(ifindex) => {
                        let _ = choices::forget(&dir, *ifindex);
                    }
                }
            }
        }
    }
    result
}

/// What one `gate on` call made, for its rollback.
enum Made {
    /// A pinned link.
    Pin(PathBuf),
    /// A clsact filter (and maybe its qdisc), recorded in the gate's record map.
    Clsact(clsact::Record),
    /// The record of an interface's attach decision ([`choices`]).
    Choice(u32),
}

/// Removes the state namespaces and `wait`s left behind ([`netns::orphans`]). Call with
/// the lock held.
fn reap_orphans(own: NetnsId) {
    for orphan in netns::orphans(&pins::root(), own) {
        let _ = teardown(&orphan);
    }
}

fn on_locked(
    args: &OnArgs,
    targets: &[Iface],
    dir: &Path,
    created: &mut Vec<Made>,
) -> Result<Vec<String>> {
    // Loading the object creates the maps, or reuses the pinned ones of an existing gate.
    // It is loaded only when something is missing: over a gate whose maps are pinned and
    // whose links are attached, `gate on` rewrites the config and loads nothing.
    let mut kernel = btf::Kernel::default();
    let mut bpf = Lazy { dir, bpf: None };
    if map::ALL.iter().any(|m| !dir.join(m).exists()) {
        // A new gate. aya's loader reads and parses the kernel's BTF on its own
        // (EbpfLoader::new, ~16 ms here), and the tracker and the RST counter need drain's
        // readings of it (member offsets; the attach types' ids): both are made on a
        // second thread meanwhile. A failed reading is left for its first use to report,
        // in that use's context.
        std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let k = btf::Kernel::default();
                let _ = k.aya();
                k
            });
            let loaded = bpf.get().map(drop);
            if let Ok(k) = reader.join() {
                kernel = k;
            }
            loaded
        })?;
    }
    let mut gate = OpenGate::open(dir)?;
    // The tracker first, so connections opened from here on are counted; then the seed
    // adds those that predate it. A gate that already has a working tracker keeps it (and
    // its counts); a pin that holds no tracker is replaced.
    let track_pin = LinkPin::Track.path(dir);
    if !links::tracker_attached(&track_pin) {
        let _ = fs::remove_file(&track_pin);
        let link = track::attach(bpf.get()?, &kernel)?;
        link.pin(&track_pin)
            .with_context(|| format!("pinning the tracker link at {}", track_pin.display()))?;
        created.push(Made::Pin(track_pin));
        gate.tracker_mut().seed()?;
    }
    // The RST counter before the refusal, so no RST of it goes uncounted. A pin whose link
    // is no longer attached (the kernel says so) is replaced.
    // Which counter this kernel needs takes its BTF to decide; a gate that has either kind
    // fully attached keeps it without asking.
    let attached = [RstCounter::Tracepoint, RstCounter::Fentry]
        .into_iter()
        .find(|c| {
            c.links()
                .iter()
                .all(|&(pin, name, _)| links::tracing_attached(&pin.path(dir), name))
        });
    let counter = match attached {
        Some(c) => c,
        None => RstCounter::current(&kernel)?,
    };
    let mut configured = false;
    for &(pin, name, function) in counter.links() {
        let path = pin.path(dir);
        if links::tracing_attached(&path, name) {
            continue;
        }
        if path.exists() {
            let _ = sys::detach_link(&path);
            let _ = fs::remove_file(&path);
        }
        if !configured {
            configure_rst(bpf.get()?, &kernel)?;
            configured = true;
        }
        let (bpf, btf) = (bpf.get()?, kernel.aya()?);
        let link = match counter {
            RstCounter::Tracepoint => {
                object::attach_btf_tracepoint(bpf, btf, name, function, "the RST counter")?
            }
            RstCounter::Fentry => {
                object::attach_fentry(bpf, btf, name, function, "the RST counter")?
            }
        };
        link.pin(&path)
            .with_context(|| format!("pinning the link at {}", path.display()))?;
        created.push(Made::Pin(path));
    }
    let lookup = LinkPin::Lookup.path(dir);
    if !links::lookup_attached(&lookup) {
        if lookup.exists() {
            let _ = sys::detach_link(&lookup);
            let _ = fs::remove_file(&lookup);
        }
        let link = attach_lookup(bpf.get()?)?;
        link.pin(&lookup)
            .with_context(|| format!("pinning the link at {}", lookup.display()))?;
        created.push(Made::Pin(lookup));
    }
    // Trust the kernel, not the pins: a link that is no longer attached here (detached by
    // another tool or a killed `gate off`, its interface deleted and maybe recreated with
    // the same ifindex, or moved into another namespace) is detached and unpinned, and the
    // interface is attached anew below. Such a link gates nothing here, so removing it
    // before the rest can fail changes nothing on this namespace's data path. The same for
    // a clsact filter the kernel no longer has (`tc filter del`, `tc qdisc del ... clsact`):
    // its record goes; a filter of someone else's that took its slot stays.
    let all = iface::interfaces()?;
    let mut existing = Vec::new();
    let mut repaired = Vec::new();
    // ifindex -> the old record said drain created the clsact qdisc, which may still be
    // there for the new filter.
    let mut inherited = Vec::new();
    for a in links::attachments(dir)? {
        let state = a.inspect(&all).state;
        if state == LinkState::Attached {
            existing.push(a);
            continue;
        }
        match &a {
            Attachment::Link(link) => {
                let _ = sys::detach_link(&link.pin);
                fs::remove_file(&link.pin).with_context(|| {
                    format!("removing the broken link pin {}", link.pin.display())
                })?;
            }
            Attachment::Clsact(rec) => {
                a.remove(dir).with_context(|| {
                    format!(
                        "removing the record of drain's detached clsact filter on {}",
                        rec.name()
                    )
                })?;
                if rec.created_qdisc != 0 {
                    inherited.push(rec.ifindex);
                }
            }
        }
        let what = match a {
            Attachment::Link(_) => "link",
            Attachment::Clsact(_) => "clsact filter",
        };
        repaired.push((a.ifindex(), what, state));
    }
    // Whether TC goes through TCX or clsact: asked once, when a TC attachment is made.
    let mut tcx: Option<bool> = None;
    let mut native = NativeXdp::default();
    let mut report = Vec::new();
    // Interfaces enslaved to another (bridge or bond ports) first: the kernel refuses XDP
    // on a device whose upper device already has an XDP program (dev_xdp_attach), not the
    // other way round.
    let mut targets: Vec<&Iface> = targets.iter().collect();
    targets.sort_by_key(|i| i.master.is_none());
    for iface in targets {
        if let Some(a) = existing.iter().find(|a| a.ifindex() == iface.index) {
            report.push(format!(
                "{} ({}, already attached)",
                iface.name,
                a.describe()
            ));
            continue;
        }
        let decision = decision_for(args.attach, iface, &mut native)?;
        let hook = decision.hook;
        let classic = hook == Hook::Tc
            && !match tcx {
                Some(t) => t,
                None => *tcx.insert(clsact::tcx_available()?),
            };
        let how = if classic {
            let rec = attach_clsact(bpf.get()?, dir, iface, inherited.contains(&iface.index))?;
            created.push(Made::Clsact(rec));
            "tc clsact".to_string()
        } else {
            let pin = LinkPin::Iface(hook, iface.index).path(dir);
            let link = match hook {
                Hook::Xdp => attach_xdp(bpf.get()?, iface, decision.native_only())?,
                Hook::Tc => attach_tc(bpf.get()?, iface)?,
            };
            link.pin(&pin)
                .with_context(|| format!("pinning the link at {}", pin.display()))?;
            created.push(Made::Pin(pin));
            describe(hook, iface.index)
        };
        choices::save(dir, iface.index, &decision)?;
        created.push(Made::Choice(iface.index));
        let was = repaired
            .iter()
            .find(|(i, _, _)| *i == iface.index)
            .map_or(String::new(), |(_, what, s)| {
                format!(", re-attached: the old {what} was {}", s.as_str())
            });
        report.push(format!(
            "{} ({how}{was}; {})",
            iface.name,
            reason(&decision)
        ));
    }
    // Ports, allowlists, then the single config write that turns the gate on; all of it,
    // or (on a failed map write) the previous gate restored.
    let cfg = config_for(args, &gate.config()?, boottime_ns());
    gate.replace(&args.ports, &args.allow, cfg)?;
    Ok(report)
}

/// The config `gate on` writes for `args` over a gate whose config is `old` (all zero when
/// there is none), at `now` (CLOCK_BOOTTIME ns). `gate on --dry-run` compares it with `old`.
pub fn config_for(args: &OnArgs, old: &GateConfig, now: u64) -> GateConfig {
    let deadline_ns = match args.ttl {
        Some(ttl) => now.saturating_add(ttl.as_nanos() as u64),
        None => 0,
    };
    let ncpus = aya::util::nr_cpus().map_or(1, |n| n.max(1)) as u32;
    let (rst_interval_ns, rst_burst) = limits::limiter(args.rst_rate, ncpus);
    let cfg = GateConfig {
        enabled: GATE_ON,
        policy: args.policy.to_raw(),
        deadline_ns,
        ttl_ns: args.ttl.map_or(0, |t| t.as_nanos() as u64),
        rst_interval_ns,
        rst_burst,
        allow: args.allow.iter().fold(0, |m, n| {
            m | match n {
                IpNet::V4(_) => ALLOW_V4,
                IpNet::V6(_) => ALLOW_V6,
            }
        }),
        flags: args.rst_rate << RST_RATE_SHIFT,
        ..Default::default()
    };
    args.announce.apply(cfg, old, now)
}

/// The hook `gate on` attaches `iface` with, and why, when it is not attached yet (`gate
/// on --dry-run` asks the same): [`attach::decide`] on what the kernel says of the device.
/// Fails for `--attach xdp` where another XDP program holds the hook.
pub fn decision_for(
    attach: AttachChoice,
    iface: &Iface,
    native: &mut NativeXdp,
) -> Result<Decision> {
    let device = iface.device();
    // The netdev family is asked only when its answer decides: auto on a physical device.
    let native_xdp = match (&device, attach, iface.xdp) {
        (attach::Device::Physical(_), AttachChoice::Auto, None) => native.of(iface.index),
        _ => None,
    };
    match attach::decide(attach, device, native_xdp, iface.xdp.is_some()) {
        Some(d) => Ok(d),
        None => {
            let id = iface.xdp.map_or(0, |(id, _)| id);
            bail!(
                "another XDP program ({}) is attached to {}: drain does not replace it; \
                 rerun with --attach tc (or --attach auto) to gate at TC ingress beside it",
                iface::program_name(id),
                iface.name
            )
        }
    }
}

/// A decision's reason as `gate on` and its plan print it: "auto: ..." for auto's own.
pub fn reason(d: &Decision) -> String {
    match d.reason {
        attach::Reason::Asked => d.to_string(),
        _ => format!("auto: {d}"),
    }
}

/// The kernel's native-XDP flag per interface (the netdev family's xdp-features, Linux
/// 6.3), read once per command, on first use.
#[derive(Default)]
pub struct NativeXdp(Option<Option<Vec<(u32, bool)>>>);

impl NativeXdp {
    /// Whether the driver of `ifindex` has native XDP; None where the kernel does not say.
    pub fn of(&mut self, ifindex: u32) -> Option<bool> {
        self.0
            .get_or_insert_with(netlink::xdp_features)
            .as_ref()?
            .iter()
            .find(|(i, _)| *i == ifindex)
            .map(|(_, native)| *native)
    }
}

/// drain's eBPF object, loaded on first use.
struct Lazy<'a> {
    dir: &'a Path,
    bpf: Option<Ebpf>,
}

impl Lazy<'_> {
    fn get(&mut self) -> Result<&mut Ebpf> {
        if self.bpf.is_none() {
            self.bpf = Some(object::load(self.dir)?);
        }
        Ok(self.bpf.as_mut().expect("loaded just above"))
    }
}

/// XDP mode as the kernel reports it after attaching: "xdp native" or "xdp generic".
fn describe(hook: Hook, ifindex: u32) -> String {
    if hook == Hook::Tc {
        return "tc".into();
    }
    let m = iface::interfaces()
        .ok()
        .and_then(|all| all.into_iter().find(|i| i.index == ifindex))
        .and_then(|i| i.xdp)
        .map_or("?", |(_, m)| m.as_str());
    format!("xdp {m}")
}

/// The program `$name` of type `$ty`, loaded into the kernel on its first use in this call
/// (each interface attaches the same loaded program). A macro, as aya's program types share
/// no trait for `load`.
macro_rules! loaded {
    ($bpf:expr, $ty:ty, $name:expr, $what:literal) => {{
        let prog: &mut $ty = $bpf
            .program_mut($name)
            .context(concat!("the eBPF object has no ", $what, " program"))?
            .try_into()?;
        if prog.fd().is_err() {
            prog.load()
                .context(concat!("the kernel rejected the ", $what, " program"))?;
        }
        prog
    }};
}

fn attach_xdp(bpf: &mut Ebpf, iface: &Iface, native_only: bool) -> Result<FdLink> {
    let prog = loaded!(bpf, Xdp, prog::XDP, "XDP");
    // `--attach xdp`: flags 0, the kernel picks native mode where the driver has it,
    // generic elsewhere (lo), and status says which. auto chose XDP for the driver's native
    // mode: XDP_FLAGS_DRV_MODE, so the kernel refuses rather than fall back to generic.
    let (mode, what) = if native_only {
        (AyaXdpMode::Driver, "native XDP")
    } else {
        (AyaXdpMode::Default, "XDP")
    };
    let id = prog
        .attach_to_if_index(iface.index, mode)
        .with_context(|| format!("attaching {what} to {}", iface.name))?;
    let link = prog.take_link(id)?;
    // A netlink attach (kernels without XDP bpf_link) cannot be pinned: it would vanish with
    // this process. Refuse it rather than pretend the gate persists.
    FdLink::try_from(link).map_err(|_| {
        anyhow!(
            "the kernel attached XDP to {} without a bpf_link, which cannot persist: \
             use --attach tc",
            iface.name
        )
    })
}

fn attach_tc(bpf: &mut Ebpf, iface: &Iface) -> Result<FdLink> {
    let prog = loaded!(bpf, SchedClassifier, prog::TC, "TC");
    // First in the TCX chain: a program before it could redirect a SYN past the gate.
    // Ours returns TCX_NEXT for everything it lets through, so the others still run.
    let id = prog
        .attach_with_options(
            &iface.name,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::first()),
        )
        .with_context(|| format!("attaching at TC ingress (TCX) to {}", iface.name))?;
    let link = prog.take_link(id)?;
    FdLink::try_from(link).map_err(|_| {
        anyhow!(
            "the kernel attached TC to {} without a TCX link, which cannot persist",
            iface.name
        )
    })
}

/// Attaches the TC program to `iface` as drain's filter on the clsact qdisc (kernels
/// without TCX; see [`clsact`]).
fn attach_clsact(
    bpf: &mut Ebpf,
    dir: &Path,
    iface: &Iface,
    inherited: bool,
) -> Result<clsact::Record> {
    let prog = loaded!(bpf, SchedClassifier, prog::TC, "TC");
    let id = prog.info().context("reading the TC program's id")?.id();
    let fd = std::os::fd::AsFd::as_fd(prog.fd()?);
    clsact::attach(dir, iface, fd, id, inherited)
}

/// Attaches the namespace-wide refusal: the sk_lookup program on this network namespace,
/// after any other tool's (the last program's verdict is the lookup's).
fn attach_lookup(bpf: &mut Ebpf) -> Result<FdLink> {
    let prog = loaded!(bpf, SkLookup, prog::LOOKUP, "sk_lookup");
    let netns = fs::File::open("/proc/self/ns/net").context("opening /proc/self/ns/net")?;
    let id = prog.attach(netns).context(
        "attaching the sk_lookup program to this network namespace (needs kernel >= 5.9)",
    )?;
    Ok(prog.take_link(id)?.into())
}

/// Where this kernel's RSTs for refused lookups can be counted (drain-ebpf refuse.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RstCounter {
    /// tp_btf/tcp_send_reset: the tracepoint fires for socketless RSTs (6.10 on; its BTF
    /// has `enum sk_rst_reason`, which came with that rework).
    Tracepoint,
    /// fentry on tcp_v4_send_reset and tcp_v6_send_reset: older kernels, where the
    /// tracepoint never fires for the RST of a refused lookup.
    Fentry,
}

impl RstCounter {
    pub fn current(kernel: &btf::Kernel) -> Result<Self> {
        Ok(if kernel.drain()?.has_enum("sk_rst_reason") {
            RstCounter::Tracepoint
        } else {
            RstCounter::Fentry
        })
    }

    /// Its links: (pin, program, kernel tracepoint or function).
    pub fn links(self) -> &'static [(LinkPin, &'static str, &'static str)] {
        match self {
            RstCounter::Tracepoint => &[(LinkPin::Rst, prog::RST, "tcp_send_reset")],
            RstCounter::Fentry => &[
                (LinkPin::Rst, prog::RST4, "tcp_v4_send_reset"),
                (LinkPin::Rst6, prog::RST6, "tcp_v6_send_reset"),
            ],
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            RstCounter::Tracepoint => "tp_btf/tcp_send_reset",
            RstCounter::Fentry => "fentry on tcp_v4_send_reset and tcp_v6_send_reset",
        }
    }
}

/// Writes the sk_buff offsets the RST counter reads, from the running kernel's BTF.
fn configure_rst(bpf: &mut Ebpf, kernel: &btf::Kernel) -> Result<()> {
    let btf = kernel.drain()?;
    let cfg = ResetTraceConfig {
        off_head: btf.offset("sk_buff", "head")?,
        off_transport: btf.offset("sk_buff", "transport_header")?,
        off_network: btf.offset("sk_buff", "network_header")?,
        _pad: 0,
    };
    let mut m: Array<&mut MapData, ResetTraceConfig> = Array::try_from(
        bpf.map_mut(map::RSTCFG)
            .context("the eBPF object lacks the RST counter's config map")?,
    )?;
    m.set(0, cfg, 0)
        .context("writing the RST counter's config")?;
    Ok(())
}

/// The interfaces that are up and have no gate link: connections through them meet only
/// the namespace-wide refusal (policy reset), or nothing at all (policy drop).
pub fn ungated(dir: &Path) -> Result<Vec<Iface>> {
    Ok(ungated_among(
        &iface::interfaces()?,
        &links::attachments(dir)?,
    ))
}

/// [`ungated`] from interfaces and attachments already read (`status` has both).
pub fn ungated_among(all: &[Iface], attached: &[links::Attachment]) -> Vec<Iface> {
    all.iter()
        .filter(|i| i.up && !attached.iter().any(|a| a.ifindex() == i.index))
        .cloned()
        .collect()
}

/// The one-line warning `gate on` and `wait` print when interfaces are up but not gated
/// under policy drop (None when there is nothing to say).
pub fn ungated_warning(ungated: &[Iface], policy: Policy) -> Option<String> {
    if ungated.is_empty() || policy == Policy::Reset {
        return None;
    }
    let names: Vec<String> = ungated
        .iter()
        .map(|i| format!("{} (ifindex {})", i.name, i.index))
        .collect();
    let flags: Vec<String> = ungated
        .iter()
        .map(|i| format!("--iface {}", i.name))
        .collect();
    Some(format!(
        "drain-user: warning: not gated: {}: new connections through {} are accepted \
         (policy drop); cover {} with `drain-user gate on --port ... {}` \
         (or without --iface: every interface that is up), or use --policy reset, \
         which refuses on every interface",
        names.join(", "),
        if ungated.len() == 1 { "it" } else { "them" },
        if ungated.len() == 1 { "it" } else { "them" },
        flags.join(" ")
    ))
}

/// Detaches every link and removes every pin of a gate, then its directory. Removing a
/// link's pin drops its last reference, which detaches the program; removing a map's pin
/// frees the map once no program uses it.
pub fn teardown(dir: &Path) -> Result<()> {
    let mut first_err = None;
    // Interface links first: the gate is gone from the data path before anything else.
    // Detach first: the unlink drops bpffs' reference only later (bpf_free_inode runs after
    // an RCU grace period, then bpf_link_put defers to a workqueue), and not at all while
    // another process holds the link (bpftool, an agent, a `status`). A clsact filter is
    // deleted (when it is still drain's), and its qdisc when drain made it and it is empty.
    let attached = match links::attachments(dir) {
        Ok(a) => a,
        Err(e) => {
            first_err.get_or_insert(e);
            pins::iface_links(dir)?
                .into_iter()
                .map(Attachment::Link)
                .collect()
        }
    };
    for a in attached {
        if let Err(e) = a.remove(dir) {
            first_err.get_or_insert(e);
        }
    }
    // Then the namespace-wide refusal (a netns link: detachable like the interface links).
    let lookup = LinkPin::Lookup.path(dir);
    if lookup.exists() {
        if let Err(e) = sys::detach_link(&lookup) {
            first_err.get_or_insert(e.context(format!("detaching {}", lookup.display())));
        }
    }
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if let Err(e) = fs::remove_file(&path) {
            first_err.get_or_insert(anyhow!(e).context(format!("removing {}", path.display())));
        }
    }
    if let Err(e) = fs::remove_dir(dir) {
        if e.kind() != io::ErrorKind::NotFound {
            first_err.get_or_insert(anyhow!(e).context(format!("removing {}", dir.display())));
        }
    }
    // The parent /sys/fs/bpf/drain stays (empty, root-only): removing it would let any user
    // claim the name before the next `gate on` on a world-writable bpffs.
    first_err.map_or(Ok(()), Err)
}

/// `gate off`. Returns false when there was no gate.
pub fn off() -> Result<bool> {
    if !pins::bpffs_mounted()? {
        return Ok(false);
    }
    pins::check_mount_namespace()?;
    let _lock = pins::lock()?;
    let own = NetnsId::current()?;
    if pins::trusted_dir(&pins::root())? {
        reap_orphans(own);
    }
    let dir = pins::state_path(StateDir::Gate(own));
    if !pins::state_exists(&dir)? {
        return Ok(false);
    }
    // One write opens the gate on every interface at once; detaching comes after.
    if let Err(e) = state::switch_off(&dir) {
        // Detaching matters more than the warning: it goes ahead whatever stderr does.
        let _ = errln!(
            "drain-user: warning: could not clear the gate switch ({e:#}); detaching anyway"
        );
    }
    debug_assert_eq!(GateConfig::default().enabled, GATE_OFF);
    teardown(&dir)?;
    Ok(true)
}

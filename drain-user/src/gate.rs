//! `gate on` and `gate off`: attaching, pinning, and tearing down.
//!
//! Order matters for fail-open: `on` attaches with the switch still off, fills the ports, and
//! turns the switch on last; `off` turns the switch off first (one map write, no window),
//! then detaches and unpins. A failure in the middle of `on` rolls back what that call did.
//!
//! Besides one link per interface, a gate has three links of its own: the tracker, the
//! namespace-wide refusal of policy reset (sk_lookup on the gate's network namespace, so it
//! covers every interface, those created after `gate on` too) and the count of the RSTs the
//! kernel sends for it (tp_btf/tcp_send_reset). Those two are attached whatever the policy
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
        links::FdLink, tc::TcAttachOptions, BtfTracePoint, LinkOrder, SchedClassifier, SkLookup,
        TcAttachType, Xdp, XdpMode as AyaXdpMode,
    },
    Ebpf,
};
use drain_common::{
    map, prog, GateConfig, ResetTraceConfig, ALLOW_V4, ALLOW_V6, GATE_OFF, GATE_ON,
};
use ipnet::IpNet;

use crate::{
    btf::Btf,
    cli::{AttachChoice, Policy},
    errln,
    iface::{self, Iface},
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
}

pub fn on(args: &OnArgs, targets: &[Iface]) -> Result<Vec<String>> {
    pins::ensure_bpffs()?;
    let _lock = pins::lock()?;
    let own = NetnsId::current()?;
    let dir = pins::state_path(StateDir::Gate(own));
    for orphan in netns::orphans(&pins::root(), own) {
        let _ = teardown(&orphan);
    }
    let fresh = !dir.exists();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut created: Vec<PathBuf> = Vec::new();
    let result = on_locked(args, targets, &dir, &mut created);
    if result.is_err() {
        // Roll back this call's attachments; a gate that existed before keeps its state.
        if fresh {
            let _ = teardown(&dir);
        } else {
            for pin in &created {
                let _ = sys::detach_link(pin);
                let _ = fs::remove_file(pin);
            }
        }
    }
    result
}

fn on_locked(
    args: &OnArgs,
    targets: &[Iface],
    dir: &Path,
    created: &mut Vec<PathBuf>,
) -> Result<Vec<String>> {
    // Loading the object creates the maps, or reuses the pinned ones of an existing gate.
    let mut bpf = object::load(dir)?;
    let mut gate = OpenGate::open(dir)?;
    // The tracker first, so connections opened from here on are counted; then the seed
    // adds those that predate it. A gate that already has a tracker keeps it (and its counts).
    let track_pin = LinkPin::Track.path(dir);
    if !track_pin.exists() {
        let link = track::attach(&mut bpf)?;
        link.pin(&track_pin)
            .with_context(|| format!("pinning the tracker link at {}", track_pin.display()))?;
        created.push(track_pin);
        gate.tracker_mut().seed()?;
    }
    // The RST counter before the refusal, so no RST of it goes uncounted.
    for (pin, attach) in [
        (LinkPin::Rst, attach_rst as fn(&mut Ebpf) -> Result<FdLink>),
        (LinkPin::Lookup, attach_lookup),
    ] {
        let path = pin.path(dir);
        if !path.exists() {
            let link = attach(&mut bpf)?;
            link.pin(&path)
                .with_context(|| format!("pinning the link at {}", path.display()))?;
            created.push(path);
        }
    }
    let existing = pins::iface_links(dir)?;
    let mut report = Vec::new();
    // Interfaces enslaved to another (bridge or bond ports) first: the kernel refuses XDP
    // on a device whose upper device already has an XDP program (dev_xdp_attach), not the
    // other way round.
    let mut targets: Vec<&Iface> = targets.iter().collect();
    targets.sort_by_key(|i| i.master.is_none());
    for iface in targets {
        if let Some(link) = existing.iter().find(|l| l.ifindex == iface.index) {
            report.push(format!(
                "{} ({}, already attached)",
                iface.name,
                link.hook.as_str()
            ));
            continue;
        }
        let hook = match (args.attach, iface.xdp) {
            (AttachChoice::Tc, _) => Hook::Tc,
            (AttachChoice::Auto, Some(_)) => Hook::Tc,
            (AttachChoice::Xdp | AttachChoice::Auto, None) => Hook::Xdp,
            (AttachChoice::Xdp, Some((id, _))) => bail!(
                "another XDP program ({}) is attached to {}: drain does not replace it; \
                 rerun with --attach tc (or --attach auto) to gate at TC ingress beside it",
                iface::program_name(id),
                iface.name
            ),
        };
        let pin = LinkPin::Iface(hook, iface.index).path(dir);
        let link = match hook {
            Hook::Xdp => attach_xdp(&mut bpf, iface)?,
            Hook::Tc => attach_tc(&mut bpf, iface)?,
        };
        link.pin(&pin)
            .with_context(|| format!("pinning the link at {}", pin.display()))?;
        created.push(pin);
        report.push(format!("{} ({})", iface.name, describe(hook, iface.index)));
    }
    gate.set_ports(&args.ports)?;
    gate.set_allow(&args.allow)?;
    let deadline_ns = match args.ttl {
        Some(ttl) => boottime_ns().saturating_add(ttl.as_nanos() as u64),
        None => 0,
    };
    // The limiter is per CPU (no atomics on the packet path): split the rate between CPUs,
    // with a burst of a tenth of a second's worth.
    let ncpus = aya::util::nr_cpus().map_or(1, |n| n.max(1)) as u64;
    // interval = ncpus / rate seconds, so the CPUs together stay within the rate even when
    // it is below the number of CPUs (rate / ncpus would round to 0 and then up to 1 each).
    let rate = u64::from(args.rst_rate.max(1));
    let rst_interval_ns = (1_000_000_000 * ncpus).div_ceil(rate);
    let rst_burst = (rate / ncpus / 10).max(1);
    // Last: the single write that turns the gate on.
    gate.set_config(GateConfig {
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
        _pad: 0,
    })?;
    Ok(report)
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

fn attach_xdp(bpf: &mut Ebpf, iface: &Iface) -> Result<FdLink> {
    let prog = loaded!(bpf, Xdp, prog::XDP, "XDP");
    // Flags 0: the kernel picks native mode where the driver has it, generic elsewhere (lo).
    let id = prog
        .attach_to_if_index(iface.index, AyaXdpMode::Default)
        .with_context(|| format!("attaching XDP to {}", iface.name))?;
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
        .with_context(|| {
            format!(
                "attaching at TC ingress (TCX, needs kernel >= 6.6) to {}",
                iface.name
            )
        })?;
    let link = prog.take_link(id)?;
    FdLink::try_from(link).map_err(|_| {
        anyhow!(
            "the kernel attached TC to {} without TCX, which cannot persist (needs kernel >= 6.6)",
            iface.name
        )
    })
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

/// Attaches the RST counter (tp_btf/tcp_send_reset), with the sk_buff offsets it reads
/// taken from the running kernel's BTF.
fn attach_rst(bpf: &mut Ebpf) -> Result<FdLink> {
    let btf = Btf::from_sys_fs()?;
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
    let btf =
        aya::Btf::from_sys_fs().context("reading the kernel's BTF (/sys/kernel/btf/vmlinux)")?;
    let prog: &mut BtfTracePoint = bpf
        .program_mut(prog::RST)
        .context("the eBPF object has no RST counter program")?
        .try_into()?;
    prog.load("tcp_send_reset", &btf)
        .context("the kernel rejected the RST counter (tp_btf/tcp_send_reset)")?;
    let id = prog.attach().context("attaching the RST counter")?;
    Ok(prog.take_link(id)?.into())
}

/// The interfaces that are up and have no gate link: connections through them meet only
/// the namespace-wide refusal (policy reset), or nothing at all (policy drop).
pub fn ungated(dir: &Path) -> Result<Vec<Iface>> {
    let links = pins::iface_links(dir)?;
    Ok(iface::interfaces()?
        .into_iter()
        .filter(|i| i.up && !links.iter().any(|l| l.ifindex == i.index))
        .collect())
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
    for link in pins::iface_links(dir)? {
        let pin = link.pin;
        // Detach first: the unlink below drops bpffs' reference only later (bpf_free_inode
        // runs after an RCU grace period, then bpf_link_put defers to a workqueue), and not
        // at all while another process holds the link (bpftool, an agent, a `status`).
        if let Err(e) = sys::detach_link(&pin) {
            first_err.get_or_insert(e.context(format!("detaching {}", pin.display())));
        }
        if let Err(e) = fs::remove_file(&pin) {
            first_err.get_or_insert(anyhow!(e).context(format!("removing {}", pin.display())));
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
    // The parent /sys/fs/bpf/drain goes too once no namespace has a gate.
    if let Some(parent) = dir.parent() {
        let _ = fs::remove_dir(parent);
    }
    first_err.map_or(Ok(()), Err)
}

/// `gate off`. Returns false when there was no gate.
pub fn off() -> Result<bool> {
    if !pins::bpffs_mounted()? {
        return Ok(false);
    }
    let _lock = pins::lock()?;
    let dir = pins::gate_dir()?;
    if !dir.exists() {
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

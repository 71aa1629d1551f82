//! `gate on` and `gate off`: attaching, pinning, and tearing down.
//!
//! Order matters for fail-open: `on` attaches with the switch still off, fills the ports, and
//! turns the switch on last; `off` turns the switch off first (one map write, no window),
//! then detaches and unpins. A failure in the middle of `on` rolls back what that call did.

use std::{
    collections::BTreeSet,
    fs, io,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    programs::{
        links::FdLink, tc::TcAttachOptions, LinkOrder, SchedClassifier, TcAttachType, Xdp,
        XdpMode as AyaXdpMode,
    },
    Ebpf, EbpfLoader,
};
use drain_common::{
    prog, GateConfig, ALLOW_V4, ALLOW_V6, GATE_OFF, GATE_ON, POLICY_DROP, POLICY_RESET,
};
use ipnet::IpNet;

use crate::{
    netlink::{self, Iface},
    pins::{self, Attach},
    state, track,
};

/// The kernel programs, built by `cargo xtask build-ebpf` and embedded at compile time.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/drain.bpf.o"));

/// How `gate on` may attach where it has to attach anew.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachChoice {
    /// XDP (native where the driver supports it, generic otherwise); refuse interfaces
    /// where another XDP program is attached.
    Xdp,
    /// TC ingress via TCX (kernel >= 6.6): runs first, alongside other TC programs.
    Tc,
    /// XDP where the XDP hook is free, TC where another XDP program holds it.
    Auto,
}

/// How refused connection requests are answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// Drop the SYN: the client retries for a while (Linux: ~130 s) before giving up.
    Drop,
    /// Answer with RST|ACK from XDP: the client sees ECONNREFUSED at once and a load
    /// balancer retries elsewhere. Rate-limited; TC attachments drop instead.
    Reset,
}

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

/// The interfaces `gate on` is about: the named ones (each must exist), or all that are up.
/// Checked before anything changes, so a typo changes nothing on the host.
pub fn resolve_ifaces(names: &[String]) -> Result<Vec<Iface>> {
    let all = netlink::interfaces()?;
    if names.is_empty() {
        return Ok(all.into_iter().filter(|i| i.up).collect());
    }
    let mut out: Vec<Iface> = Vec::new();
    for name in names {
        let Some(i) = all.iter().find(|i| &i.name == name) else {
            let known: Vec<_> = all.iter().map(|i| i.name.as_str()).collect();
            return Err(crate::usage(format!(
                "no interface named {name:?} in this network namespace (interfaces: {})",
                known.join(", ")
            )));
        };
        if !out.iter().any(|o| o.index == i.index) {
            out.push(i.clone());
        }
    }
    Ok(out)
}

pub fn on(args: &OnArgs, targets: &[Iface]) -> Result<Vec<String>> {
    pins::ensure_bpffs()?;
    let _lock = pins::lock()?;
    let dir = pins::state_dir()?;
    reap_dead_namespaces(&dir);
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
                let _ = detach_link(pin);
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
    let mut bpf = EbpfLoader::new()
        .default_map_pin_directory(dir)
        .load(OBJECT)
        .context("loading the drain eBPF object (needs root or CAP_BPF + CAP_NET_ADMIN)")?;
    // The tracker first, so connections opened from here on are counted; then the seed
    // adds those that predate it. A gate that already has a tracker keeps it (and its counts).
    let track_pin = pins::track_pin(dir);
    if !track_pin.exists() {
        let link = track::attach(&mut bpf)?;
        link.pin(&track_pin)
            .with_context(|| format!("pinning the tracker link at {}", track_pin.display()))?;
        created.push(track_pin);
        track::seed(dir)?;
    }
    let existing = pins::links(dir)?;
    let mut report = Vec::new();
    for iface in targets {
        if let Some((mode, _, _)) = existing.iter().find(|(_, idx, _)| *idx == iface.index) {
            report.push(format!(
                "{} ({}, already attached)",
                iface.name,
                mode.as_str()
            ));
            continue;
        }
        let mode = match (args.attach, iface.xdp) {
            (AttachChoice::Tc, _) => Attach::Tc,
            (AttachChoice::Auto, Some(_)) => Attach::Tc,
            (AttachChoice::Xdp | AttachChoice::Auto, None) => Attach::Xdp,
            (AttachChoice::Xdp, Some((id, _))) => bail!(
                "another XDP program ({}) is attached to {}: drain does not replace it; \
                 rerun with --attach tc (or --attach auto) to gate at TC ingress beside it",
                program_name(id),
                iface.name
            ),
        };
        let pin = pins::link_pin(dir, mode, iface.index);
        let link = match mode {
            Attach::Xdp => attach_xdp(&mut bpf, iface)?,
            Attach::Tc => attach_tc(&mut bpf, iface)?,
        };
        link.pin(&pin)
            .with_context(|| format!("pinning the link at {}", pin.display()))?;
        created.push(pin);
        report.push(format!("{} ({})", iface.name, describe(mode, iface.index)));
    }
    state::set_ports(dir, &args.ports)?;
    state::set_allow(dir, &args.allow)?;
    let deadline_ns = match args.ttl {
        Some(ttl) => state::boottime_ns().saturating_add(ttl.as_nanos() as u64),
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
    state::write_config(
        dir,
        GateConfig {
            enabled: GATE_ON,
            policy: match args.policy {
                Policy::Drop => POLICY_DROP,
                Policy::Reset => POLICY_RESET,
            },
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
        },
    )?;
    Ok(report)
}

/// XDP mode as the kernel reports it after attaching: "xdp native" or "xdp generic".
pub fn describe(mode: Attach, ifindex: u32) -> String {
    if mode == Attach::Tc {
        return "tc".into();
    }
    let m = netlink::interfaces()
        .ok()
        .and_then(|all| all.into_iter().find(|i| i.index == ifindex))
        .and_then(|i| i.xdp)
        .map_or("?", |(_, m)| m.as_str());
    format!("xdp {m}")
}

fn attach_xdp(bpf: &mut Ebpf, iface: &Iface) -> Result<FdLink> {
    let prog: &mut Xdp = bpf
        .program_mut(prog::XDP)
        .context("the eBPF object has no XDP program")?
        .try_into()?;
    if prog.fd().is_err() {
        prog.load().context("the kernel rejected the XDP program")?;
    }
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
    let prog: &mut SchedClassifier = bpf
        .program_mut(prog::TC)
        .context("the eBPF object has no TC program")?
        .try_into()?;
    if prog.fd().is_err() {
        prog.load().context("the kernel rejected the TC program")?;
    }
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

/// Detaches every link and removes every pin of a gate, then its directory. Removing a
/// link's pin drops its last reference, which detaches the program; removing a map's pin
/// frees the map once no program uses it.
pub fn teardown(dir: &Path) -> Result<()> {
    let mut first_err = None;
    // Interface links first: the gate is gone from the data path before anything else.
    for (_, _, pin) in pins::links(dir)? {
        // Detach first: the unlink below drops bpffs' reference only later (bpf_free_inode
        // runs after an RCU grace period, then bpf_link_put defers to a workqueue), and not
        // at all while another process holds the link (bpftool, an agent, a `status`).
        if let Err(e) = detach_link(&pin) {
            first_err.get_or_insert(e.context(format!("detaching {}", pin.display())));
        }
        if let Err(e) = fs::remove_file(&pin) {
            first_err.get_or_insert(anyhow!(e).context(format!("removing {}", pin.display())));
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

/// BPF_LINK_DETACH on the link pinned at `pin`: its program leaves the hook before this
/// returns, whoever else still holds the link. aya 0.14 has no detach for a pinned FdLink.
fn detach_link(pin: &Path) -> Result<()> {
    use std::os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    };
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let bpf = |cmd: libc::c_long, attr: &mut [u64; 8]| {
        // SAFETY: a zeroed bpf_attr of the size passed; pointers in it outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr.as_mut_ptr(),
                std::mem::size_of_val(attr),
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    };
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())?;
    // union bpf_attr, BPF_OBJ_GET: { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; }
    let mut attr = [0u64; 8];
    attr[0] = path.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr).context("BPF_OBJ_GET")?;
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // union bpf_attr, BPF_LINK_DETACH: { __u32 link_fd; }
    let mut attr = [0u64; 8];
    attr[0] = fd.as_raw_fd() as u64;
    match bpf(BPF_LINK_DETACH, &mut attr) {
        Ok(_) => Ok(()),
        // Tracing links (the tracker) cannot be detached; unpinning releases them.
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
        Err(e) => Err(anyhow!(e).context("BPF_LINK_DETACH")),
    }
}

/// Removes the state of gates whose network namespace no longer exists (a container
/// deleted with its gate on): their maps and tracker would otherwise stay until reboot.
/// A namespace is alive when a process is in it, or an open fd or a bind mount (`ip netns`,
/// container runtimes) holds it; its inode may since have gone to a new namespace, so the
/// cookie in the directory name must match too. Getting this wrong could only remove a
/// gate, never leave a host closed.
fn reap_dead_namespaces(own: &Path) {
    let Some(parent) = own.parent() else { return };
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    let mut alive: Option<std::collections::HashMap<u64, PathBuf>> = None;
    for e in entries.flatten() {
        let path = e.path();
        if path == own {
            continue;
        }
        let name = e.file_name();
        let Some((inode, cookie)) = name
            .to_str()
            .filter(|n| !n.contains("-wait-"))
            .and_then(|n| n.split_once('-'))
            .and_then(|(i, c)| Some((i.parse::<u64>().ok()?, c.parse::<u64>().ok()?)))
        else {
            continue;
        };
        let alive = alive.get_or_insert_with(live_netns);
        let dead = match alive.get(&inode) {
            None => true,
            Some(handle) => netns_cookie_of(handle).is_some_and(|c| c != cookie),
        };
        if dead {
            let _ = teardown(&path);
        }
    }
}

/// Every network namespace something still holds, by inode, with a path that opens it:
/// processes (/proc/*/ns/net), open fds (/proc/*/fd/* -> "net:[N]"), nsfs bind mounts.
fn live_netns() -> std::collections::HashMap<u64, PathBuf> {
    let parse = |link: &Path| -> Option<u64> {
        let t = fs::read_link(link).ok()?;
        t.to_str()?
            .strip_prefix("net:[")?
            .strip_suffix(']')?
            .parse()
            .ok()
    };
    let mut map = std::collections::HashMap::new();
    for p in fs::read_dir("/proc").into_iter().flatten().flatten() {
        if !p
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let ns = p.path().join("ns/net");
        if let Some(i) = parse(&ns) {
            map.entry(i).or_insert(ns);
        }
        for fd in fs::read_dir(p.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Some(i) = parse(&fd.path()) {
                map.entry(i).or_insert(fd.path());
            }
        }
    }
    // mountinfo: "<id> <parent> <dev> <root> <mount point> ... - nsfs ...", root "net:[N]".
    for line in fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
    {
        if !line.contains(" - nsfs ") {
            continue;
        }
        let mut f = line.split_whitespace().skip(3);
        let (Some(root), Some(at)) = (f.next(), f.next()) else {
            continue;
        };
        if let Some(i) = root.strip_prefix("net:[").and_then(|r| r.strip_suffix(']')) {
            if let Ok(i) = i.parse() {
                map.entry(i).or_insert_with(|| PathBuf::from(at));
            }
        }
    }
    map
}

/// The cookie of the namespace at `handle`, read from a thread that joins it (so this
/// process stays where it is). None when it cannot be entered (then nothing is reaped).
fn netns_cookie_of(handle: &Path) -> Option<u64> {
    let file = fs::File::open(handle).ok()?;
    std::thread::scope(|s| {
        s.spawn(|| {
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a valid nsfs fd; it moves only this short-lived thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return None;
            }
            pins::netns_cookie().ok()
        })
        .join()
        .ok()
        .flatten()
    })
}

/// `gate off`. Returns false when there was no gate.
pub fn off() -> Result<bool> {
    if !pins::bpffs_mounted()? {
        return Ok(false);
    }
    let _lock = pins::lock()?;
    let dir = pins::state_dir()?;
    if !dir.exists() {
        return Ok(false);
    }
    // One write opens the gate on every interface at once; detaching comes after.
    if let Err(e) = state::write_config(&dir, GateConfig::default()) {
        eprintln!("drain-user: warning: could not clear the gate switch ({e:#}); detaching anyway");
    }
    debug_assert_eq!(GateConfig::default().enabled, GATE_OFF);
    teardown(&dir)?;
    Ok(true)
}

/// "name (id N)" of a program by id, for messages about programs drain does not own.
pub fn program_name(id: u32) -> String {
    let name = aya::programs::loaded_programs()
        .flatten()
        .find(|p| p.id() == id)
        .and_then(|p| p.name_as_str().map(str::to_owned));
    match name {
        Some(n) if !n.is_empty() => format!("{n}, id {id}"),
        _ => format!("id {id}"),
    }
}

//! `check`'s probes: what the host has, found without changing it. Programs are loaded and
//! never attached to a host interface, maps are created and closed, and the one attach probe
//! runs on the loopback of a private network namespace that dies with the probe. The raw
//! bpf(2) calls are in [`crate::sys`], the generic-netlink one in [`crate::netlink`].

use std::{
    fs, io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use anyhow::Result;
use aya::{
    maps::MapType,
    programs::{BtfTracePoint, FEntry, ProgramType, SchedClassifier, SkLookup, TcAttachType, Xdp},
};
use drain_common::prog;

use super::{parse_release, Bpffs, Feature, IfaceProbe, Probe, Version};
use crate::{
    caps::Caps,
    iface::{self, Iface},
    netlink, object, pins, sys,
};

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
    // First: the probes below may lift the limit (at an EPERM), as `gate on` would.
    p.memlock.limit = sys::memlock_limit().ok();
    if p.caps.cap_bpf || p.caps.cap_sys_admin {
        p.memlock.charged = sys::maps_charged_to_memlock().ok();
    }
    p.memlock.raisable = sys::memlock_raisable().unwrap_or(false);
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
    // Charged, finite and not raisable: the programs probe loaded drain's maps and
    // programs under the limit `gate on` will have, or failed for it.
    let finite = p
        .memlock
        .limit
        .is_some_and(|(soft, _)| soft != libc::RLIM_INFINITY);
    if p.memlock.charged == Some(true) && !p.memlock.raisable && finite {
        p.memlock.fits = match &programs {
            (Some(true), _) => Some(true),
            (Some(false), why)
                if why.contains("RLIMIT_MEMLOCK") || why.contains("Operation not permitted") =>
            {
                Some(false)
            }
            _ => None,
        };
    }
    p.features.push((Feature::TpBtf, tp_btf.0, tp_btf.1));
    p.features.push((Feature::Programs, programs.0, programs.1));
    let sock_diag = match crate::diag::dump(crate::diag::States::LISTEN, false) {
        Ok(_) => (Some(true), "a TCP sock_diag dump answered".to_string()),
        Err(e) if format!("{e:#}").contains("ENOENT") => (Some(false), format!("{e:#}")),
        Err(e) => (None, format!("not probed: {e:#}")),
    };
    p.features
        .push((Feature::SockDiag, sock_diag.0, sock_diag.1));

    let native = netlink::xdp_features();
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
        device: Some(i.device()),
        clsact_blocker: crate::clsact::blocker(i).ok().flatten(),
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
                    match sys::load_trivial(prog_type, ret)
                        .and_then(|p| sys::link_create(&p, lo, attach_type, flags))
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
                    let prog = sys::load_trivial(sys::BPF_PROG_TYPE_SCHED_CLS, -1)?;
                    crate::clsact::add_filter(lo, std::os::fd::AsFd::as_fd(&prog))
                }) {
                    Ok(()) => (
                        Some(true),
                        "a filter attached in a private network namespace".into(),
                    ),
                    Err(e) => (Some(false), format!("{e:#}")),
                };
                Ok((
                    attach(
                        sys::BPF_PROG_TYPE_XDP,
                        2,
                        sys::BPF_XDP,
                        sys::XDP_FLAGS_SKB_MODE,
                    ),
                    attach(sys::BPF_PROG_TYPE_SCHED_CLS, -1, sys::BPF_TCX_INGRESS, 0),
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
    let tcx = match sys::load_trivial(sys::BPF_PROG_TYPE_SCHED_CLS, -1)
        .and_then(|p| sys::link_create(&p, 0, sys::BPF_TCX_INGRESS, 0))
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

fn probe_mmapable() -> Option<bool> {
    let map = match sys::array_map_create(8, 1, sys::BPF_F_MMAPABLE) {
        Ok(map) => map,
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
        Err((Some(true), e)) => {
            let tp_btf = tp_btf_after_tracker_failed(&e);
            ((Some(false), e), tp_btf)
        }
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

/// Whether the kernel has tp_btf programs, judged from the tracker's failed load. A verifier
/// that went through the program ("processed N insns") took it as a tp_btf program and
/// rejected what it does (a helper or access this kernel does not allow there): that is
/// drain's programs failing the verifier, not the kernel lacking tp_btf, and `check` must
/// not send the operator after a kernel feature they already have.
fn tp_btf_after_tracker_failed(e: &str) -> Probed {
    if e.contains("processed ") && e.contains(" insns") {
        (
            Some(true),
            "the verifier took the tracker as a tp_btf program and rejected it (see drain's \
             programs)"
                .into(),
        )
    } else {
        (Some(false), e.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::tp_btf_after_tracker_failed;

    #[test]
    fn a_verifier_rejection_of_the_tracker_is_not_a_missing_tp_btf() {
        // 5.10's words for a tracker calling a helper tracing programs get only from 5.12.
        let rejected = "tracker (tp_btf/inet_sock_set_state): the BPF_PROG_LOAD syscall \
            returned Invalid argument (os error 22). Verifier output: 3: (bf) r1 = r6\n4: (85) \
            call bpf_get_socket_cookie#46\nunknown func bpf_get_socket_cookie#46\nverification \
            time 1553 usec\nstack depth 0\nprocessed 5 insns (limit 1000000) \
            max_states_per_insn 0 total_states 0 peak_states 0 mark_read 0\n";
        assert_eq!(tp_btf_after_tracker_failed(rejected).0, Some(true));
        let no_type = "tracker (tp_btf/inet_sock_set_state): the BPF_PROG_LOAD syscall \
            returned Invalid argument (os error 22)";
        assert_eq!(tp_btf_after_tracker_failed(no_type).0, Some(false));
    }
}

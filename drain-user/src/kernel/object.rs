//! The kernel programs, built by `cargo xtask build-ebpf` and embedded at compile time
//! (build.rs), so drain-user is one self-contained binary.

use std::path::Path;

use anyhow::{bail, Context, Result};
use aya::{
    programs::{links::FdLink, BtfTracePoint, FEntry},
    Ebpf, EbpfLoader,
};
use drain_common::map;

/// The eBPF object; empty when the binary was built without it (see build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/drain.bpf.o"));

/// Loads the object with its maps pinned in `dir`: a gate's pinned maps are reused, missing
/// ones are created and pinned there.
pub fn load(dir: &Path) -> Result<Ebpf> {
    if OBJECT.is_empty() {
        bail!(
            "the kernel programs are not built into this binary: \
             run `cargo xtask build-ebpf` then rebuild"
        );
    }
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(dir);
    if let Some(n) = max_connections()? {
        loader.map_max_entries(map::SOCKS, n);
    }
    loader.load(OBJECT).map_err(|e| {
        let e = anyhow::Error::from(e);
        match memlock_hint(&e) {
            Some(hint) => e.context(hint),
            None => {
                e.context("loading the drain eBPF object (needs root or CAP_BPF + CAP_NET_ADMIN)")
            }
        }
    })
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK (memcg accounting came in 5.11):
/// with a small limit that the process may not raise (no CAP_SYS_RESOURCE: a service
/// account given CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON only) creating a map fails with
/// EPERM although the capabilities are all there. Names that cause instead of the
/// capabilities.
fn memlock_hint(e: &anyhow::Error) -> Option<String> {
    if !format!("{e:#}").contains("Operation not permitted") {
        return None;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    // Probed (a map under a limit of 0); where the probe cannot tell, the version does.
    let charged = crate::sys::maps_charged_to_memlock().unwrap_or_else(|_| {
        let mut v = release.trim().split(['.', '-']).map(|p| p.parse::<u32>());
        matches!((v.next(), v.next()), (Some(Ok(major)), Some(Ok(minor))) if (major, minor) < (5, 11))
    });
    if !charged {
        return None;
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0
        || lim.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    Some(format!(
        "loading the drain eBPF object: this kernel ({}) charges BPF maps to RLIMIT_MEMLOCK \
         (before 5.11), which is {} KiB here and could not be raised: give drain-user \
         CAP_SYS_RESOURCE or an unlimited memlock limit (systemd: LimitMEMLOCK=infinity; \
         `ulimit -l unlimited`)",
        release.trim(),
        lim.rlim_cur / 1024
    ))
}

/// `DRAIN_MAX_CONNECTIONS`: the size of the live-connection set of a gate (or `wait`
/// tracker) created from now on, instead of drain_common::MAX_TRACKED_SOCKS. Not an
/// option: it exists so a test can fill the set; an existing gate keeps its size.
fn max_connections() -> Result<Option<u32>> {
    match std::env::var("DRAIN_MAX_CONNECTIONS") {
        Err(_) => Ok(None),
        Ok(v) => match v.parse::<u32>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => bail!("DRAIN_MAX_CONNECTIONS={v:?} is not a positive number of connections"),
        },
    }
}

/// Loads the object's `tp_btf` program `prog` for the kernel tracepoint `tracepoint` and
/// attaches it; `what` names it in errors ("the connection tracker"). The returned link
/// detaches when dropped unless pinned.
pub fn attach_btf_tracepoint(
    bpf: &mut Ebpf,
    btf: &aya::Btf,
    prog: &str,
    tracepoint: &str,
    what: &str,
) -> Result<FdLink> {
    let program: &mut BtfTracePoint = bpf
        .program_mut(prog)
        .with_context(|| format!("the eBPF object has no {what} program"))?
        .try_into()?;
    program
        .load(tracepoint, btf)
        .with_context(|| format!("the kernel rejected {what} (tp_btf/{tracepoint})"))?;
    let id = program
        .attach()
        .with_context(|| format!("attaching {what}"))?;
    Ok(program.take_link(id)?.into())
}

/// Loads the object's fentry program `prog` for the kernel function `function` and attaches
/// it; `what` names it in errors. The returned link detaches when dropped unless pinned.
pub fn attach_fentry(
    bpf: &mut Ebpf,
    btf: &aya::Btf,
    prog: &str,
    function: &str,
    what: &str,
) -> Result<FdLink> {
    let program: &mut FEntry = bpf
        .program_mut(prog)
        .with_context(|| format!("the eBPF object has no {what} program {prog}"))?
        .try_into()?;
    program
        .load(function, btf)
        .with_context(|| format!("the kernel rejected {what} (fentry/{function})"))?;
    let id = program
        .attach()
        .with_context(|| format!("attaching {what} (fentry/{function})"))?;
    Ok(program.take_link(id)?.into())
}

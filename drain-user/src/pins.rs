//! Where a gate's state lives in bpffs, mounting bpffs, and the lock that serializes CLI
//! calls.
//!
//! Everything a gate owns is pinned under one directory per network namespace
//! ([`StateDir`], named `<netns inode>-<netns cookie>`):
//!   /sys/fs/bpf/drain/<state dir>/DRAIN_*                  the maps (pinned by name)
//!   /sys/fs/bpf/drain/<state dir>/link-<xdp|tc>-<ifindex>  one bpf_link per interface
//!   /sys/fs/bpf/drain/<state dir>/link-track               the connection tracker's link
//!   /sys/fs/bpf/drain/<state dir>/link-sklookup            the namespace-wide refusal (sk_lookup)
//!   /sys/fs/bpf/drain/<state dir>/link-rst                 the RST counter (tp_btf/tcp_send_reset)
//! Keying by the namespace keeps gates in two namespaces (containers, parallel tests) apart:
//! bpffs is per mount namespace, not per network namespace.

use std::{
    fmt,
    fs::{self, File},
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    str::FromStr,
};

use anyhow::{bail, Context, Result};

use crate::netns::{NetnsId, StateDir};

pub const BPFFS: &str = "/sys/fs/bpf";
const LOCK_DIR: &str = "/run/lock";

/// `/sys/fs/bpf/drain`: the parent of every state directory.
pub fn root() -> PathBuf {
    Path::new(BPFFS).join("drain")
}

/// The path of a state directory.
pub fn state_path(dir: StateDir) -> PathBuf {
    root().join(dir.to_string())
}

/// The state directory of the gate of the caller's network namespace.
pub fn gate_dir() -> Result<PathBuf> {
    Ok(state_path(StateDir::Gate(NetnsId::current()?)))
}

/// Opens the map `name` pinned in `dir`.
pub fn open_map(dir: &Path, name: &str) -> Result<aya::maps::MapData> {
    let path = dir.join(name);
    aya::maps::MapData::from_pin(&path).with_context(|| {
        format!(
            "opening the pinned map {}: the gate state is incomplete; \
             run `drain-user gate off` to reset it",
            path.display()
        )
    })
}

/// The hook a link is attached to, as encoded in its pin name and shown by `status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    Xdp,
    Tc,
}

impl Hook {
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp",
            Hook::Tc => "tc",
        }
    }
}

/// The name of a link pin in a state directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkPin {
    /// `link-<xdp|tc>-<ifindex>`: the gate on one interface.
    Iface(Hook, u32),
    /// `link-track`: the tracker (tp_btf/inet_sock_set_state).
    Track,
    /// `link-sklookup`: the namespace-wide refusal of policy reset (sk_lookup on the netns).
    Lookup,
    /// `link-rst`: the count of the RSTs the kernel sends for it (tp_btf/tcp_send_reset).
    Rst,
}

impl LinkPin {
    pub fn path(self, dir: &Path) -> PathBuf {
        dir.join(self.to_string())
    }
}

impl fmt::Display for LinkPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkPin::Iface(hook, ifindex) => write!(f, "link-{}-{ifindex}", hook.as_str()),
            LinkPin::Track => f.write_str("link-track"),
            LinkPin::Lookup => f.write_str("link-sklookup"),
            LinkPin::Rst => f.write_str("link-rst"),
        }
    }
}

impl FromStr for LinkPin {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let rest = s.strip_prefix("link-").ok_or(())?;
        match rest {
            "track" => return Ok(LinkPin::Track),
            "sklookup" => return Ok(LinkPin::Lookup),
            "rst" => return Ok(LinkPin::Rst),
            _ => {}
        }
        let (hook, ifindex) = rest.split_once('-').ok_or(())?;
        let hook = match hook {
            "xdp" => Hook::Xdp,
            "tc" => Hook::Tc,
            _ => return Err(()),
        };
        let pin = LinkPin::Iface(hook, ifindex.parse().map_err(|_| ())?);
        // One spelling per pin, as for state directories.
        if pin.to_string() == s {
            Ok(pin)
        } else {
            Err(())
        }
    }
}

/// One interface link pinned in a state directory.
#[derive(Clone, Debug)]
pub struct IfaceLink {
    pub hook: Hook,
    pub ifindex: u32,
    pub pin: PathBuf,
}

/// The interface links pinned in a state directory, by ifindex.
pub fn iface_links(dir: &Path) -> Result<Vec<IfaceLink>> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    for entry in entries {
        let entry = entry?;
        if let Some(LinkPin::Iface(hook, ifindex)) =
            entry.file_name().to_str().and_then(|n| n.parse().ok())
        {
            out.push(IfaceLink {
                hook,
                ifindex,
                pin: entry.path(),
            });
        }
    }
    out.sort_by_key(|l| l.ifindex);
    Ok(out)
}

/// True when bpffs is mounted at /sys/fs/bpf.
pub fn bpffs_mounted() -> Result<bool> {
    // SAFETY: statfs is plain old data; zeroed is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let path = c"/sys/fs/bpf";
    // SAFETY: valid NUL-terminated path and a properly sized out-parameter.
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } != 0 {
        return Ok(false);
    }
    Ok(st.f_type == libc::BPF_FS_MAGIC)
}

/// Mounts bpffs at /sys/fs/bpf when it is missing (systemd normally does; minimal hosts
/// and containers often do not).
pub fn ensure_bpffs() -> Result<()> {
    if bpffs_mounted()? {
        return Ok(());
    }
    // SAFETY: constant NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "bpffs is not mounted at /sys/fs/bpf and mounting it failed ({}): \
             run `mount -t bpf bpf /sys/fs/bpf`",
            io::Error::last_os_error()
        );
    }
    Ok(())
}

/// An exclusive lock on drain's state (all namespaces), held until dropped. Two deploy
/// scripts that run `drain-user` at once take turns instead of interleaving.
pub struct Lock {
    _file: File,
}

pub fn lock() -> Result<Lock> {
    fs::create_dir_all(LOCK_DIR).with_context(|| format!("creating {LOCK_DIR}"))?;
    // One lock for the host, not one per namespace: CLI calls take milliseconds, so
    // serializing them costs nothing, no lock file is left per namespace ever gated, and
    // the shared /sys/fs/bpf/drain directory is only ever created or removed under it.
    let path = Path::new(LOCK_DIR).join("drain.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    // SAFETY: a valid open fd.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io::Error::last_os_error()).context("taking the drain lock");
    }
    Ok(Lock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pin_names() {
        for pin in [
            LinkPin::Iface(Hook::Xdp, 1),
            LinkPin::Iface(Hook::Tc, 4_000_000_000),
            LinkPin::Track,
            LinkPin::Lookup,
            LinkPin::Rst,
        ] {
            assert_eq!(pin.to_string().parse(), Ok(pin));
        }
        assert_eq!(LinkPin::Iface(Hook::Tc, 7).to_string(), "link-tc-7");
        for bad in [
            "link-",
            "link-xdp",
            "link-xdp-",
            "link-xdp-01",
            "link-gre-3",
            "DRAIN_LIVE",
        ] {
            assert_eq!(bad.parse::<LinkPin>(), Err(()), "{bad}");
        }
    }
}

//! Where a gate's state lives, and the lock that serializes CLI calls.
//!
//! Everything a gate owns is pinned under one bpffs directory per network namespace:
//!   /sys/fs/bpf/drain/<netns inode>-<netns cookie>/DRAIN_*     the maps (pinned by name)
//!   /sys/fs/bpf/drain/<netns inode>-<netns cookie>/link-<xdp|tc>-<ifindex>  one bpf_link
//!   per interface, and link-track for the connection tracker
//! Keying by the namespace inode keeps gates in two namespaces (containers, parallel
//! tests) apart: bpffs is per mount namespace, not per network namespace.

use std::{
    fs::{self, File},
    io,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

pub const BPFFS: &str = "/sys/fs/bpf";
const LOCK_DIR: &str = "/run/lock";

/// Inode of the caller's network namespace.
pub fn netns_inode() -> Result<u64> {
    Ok(fs::metadata("/proc/self/ns/net")
        .context("reading /proc/self/ns/net")?
        .ino())
}

/// The namespace's cookie (SO_NETNS_COOKIE, Linux 5.14+): unlike its inode number, which
/// the kernel hands to the next namespace once this one is gone, never reused while the
/// system runs. A gate left pinned by a deleted namespace is thus never mistaken for the
/// gate of a new namespace that got the same inode.
pub fn netns_cookie() -> Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: plain socket(2); the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("socket() for SO_NETNS_COOKIE");
    }
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid fd and an out-parameter of the size given.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    let err = io::Error::last_os_error();
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(err).context("getsockopt(SO_NETNS_COOKIE) (needs Linux 5.14 or later)");
    }
    Ok(cookie)
}

/// The pin directory of the gate of the caller's network namespace:
/// `<netns inode>-<netns cookie>` (the inode for people, the cookie for uniqueness).
pub fn state_dir() -> Result<PathBuf> {
    Ok(Path::new(BPFFS)
        .join("drain")
        .join(format!("{}-{}", netns_inode()?, netns_cookie()?)))
}

/// Mode a link was attached with, as encoded in its pin name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    Xdp,
    Tc,
}

impl Attach {
    pub fn as_str(self) -> &'static str {
        match self {
            Attach::Xdp => "xdp",
            Attach::Tc => "tc",
        }
    }
}

/// The tracker's link (tp_btf/inet_sock_set_state).
pub fn track_pin(dir: &Path) -> PathBuf {
    dir.join("link-track")
}

pub fn link_pin(dir: &Path, attach: Attach, ifindex: u32) -> PathBuf {
    dir.join(format!("link-{}-{ifindex}", attach.as_str()))
}

/// The link pins in a state directory: (mode, ifindex, path).
pub fn links(dir: &Path) -> Result<Vec<(Attach, u32, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("link-")) else {
            continue;
        };
        let parsed = rest.split_once('-').and_then(|(mode, idx)| {
            let mode = match mode {
                "xdp" => Attach::Xdp,
                "tc" => Attach::Tc,
                _ => return None,
            };
            Some((mode, idx.parse().ok()?))
        });
        if let Some((mode, ifindex)) = parsed {
            out.push((mode, ifindex, entry.path()));
        }
    }
    out.sort_by_key(|(_, idx, _)| *idx);
    Ok(out)
}

/// True when bpffs is mounted at /sys/fs/bpf.
pub fn bpffs_mounted() -> Result<bool> {
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

/// An exclusive lock on drain's state (all namespaces), held until dropped. Two deploy scripts that
/// run `drain-user` at once take turns instead of interleaving.
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

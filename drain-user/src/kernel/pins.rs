//! Where a gate's state lives in bpffs, mounting bpffs, checking that what drain finds there
//! is its own (root-only, no symlink), and the lock that serializes CLI calls.
//!
//! Everything a gate owns is pinned under one directory per network namespace
//! ([`StateDir`], named `<netns inode>-<netns cookie>`):
//!   /sys/fs/bpf/drain/<state dir>/DRAIN_*                  the maps (pinned by name)
//!   /sys/fs/bpf/drain/<state dir>/link-<xdp|tc>-<ifindex>  one bpf_link per interface
//!   /sys/fs/bpf/drain/<state dir>/link-track               the connection tracker's link
//!   /sys/fs/bpf/drain/<state dir>/link-sklookup            the namespace-wide refusal (sk_lookup)
//!   /sys/fs/bpf/drain/<state dir>/link-rst                 the RST counter (fentry/tcp_v4_send_reset)
//!   /sys/fs/bpf/drain/<state dir>/link-rst6                its IPv6 half (fentry/tcp_v6_send_reset)
//! Keying by the namespace keeps gates in two namespaces (containers, parallel tests) apart:
//! bpffs is per mount namespace, not per network namespace.

use std::{
    fmt,
    fs::{self, File},
    io,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    str::FromStr,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::netns::{NetnsId, StateDir};

pub const BPFFS: &str = "/sys/fs/bpf";

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

pub use crate::domain::attach::Hook;

/// The name of a link pin in a state directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkPin {
    /// `link-<xdp|tc>-<ifindex>`: the gate on one interface.
    Iface(Hook, u32),
    /// `link-track`: the tracker (tp_btf/inet_sock_set_state).
    Track,
    /// `link-sklookup`: the namespace-wide refusal of policy reset (sk_lookup on the netns).
    Lookup,
    /// `link-rst`: the count of the RSTs the kernel sends for it (fentry/tcp_v4_send_reset).
    Rst,
    /// `link-rst6`: the same for IPv6 (fentry/tcp_v6_send_reset).
    Rst6,
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
            LinkPin::Rst6 => f.write_str("link-rst6"),
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
            "rst6" => return Ok(LinkPin::Rst6),
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
    Ok(is_bpffs(c"/sys/fs/bpf"))
}

fn is_bpffs(path: &std::ffi::CStr) -> bool {
    // SAFETY: statfs is plain old data; zeroed is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a properly sized out-parameter.
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } != 0 {
        return false;
    }
    st.f_type == libc::BPF_FS_MAGIC
}

/// Refuses to run where a gate would not persist: in a mount namespace of its own whose
/// /sys/fs/bpf is not the bpffs of PID 1's (none, or a fresh instance). `ip netns exec` is
/// the common way there: it unshares the mount namespace and mounts a fresh sysfs on /sys
/// (iproute2 6.x also a fresh bpffs), so pins made there vanish when the command exits and
/// nothing would stay gated. `nsenter --net` switches only the network namespace and keeps
/// the host's bpffs. (A service with a private mount namespace of its own, e.g. systemd's
/// PrivateTmp, still sees the host's bpffs through mount propagation: the same instance.)
pub fn check_mount_namespace() -> Result<()> {
    // A namespace is (nsfs device, inode). Where PID 1 is out of reach (no privileges),
    // 5.10 does not fail the stat of its ns/mnt link: it answers with a procfs inode (a
    // directory, mode 0511) instead of the namespace's; so a link counts only when it
    // resolved to an inode on the same nsfs as our own.
    let ns = |p: &str| fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    let Some(own) = ns("/proc/self/ns/mnt") else {
        return Ok(()); // no /proc: cannot tell, let ensure_bpffs try
    };
    let ino = |p: &str| ns(p).filter(|&(dev, _)| dev == own.0);
    // The mount namespace to compare with: PID 1's, or where PID 1 is out of reach (a
    // container, hidepid) the parent's (`ip netns exec` unshares in the process it then
    // becomes, so the parent is still where the caller was).
    // SAFETY: getppid has no preconditions.
    let ppid = unsafe { libc::getppid() };
    let Some((reference, other)) = ["1".to_owned(), ppid.to_string()]
        .into_iter()
        .find_map(|pid| ino(&format!("/proc/{pid}/ns/mnt")).map(|i| (pid, i)))
    else {
        return Ok(());
    };
    if own == other {
        return Ok(());
    }
    let dev = |p: &str| {
        let c = std::ffi::CString::new(p).ok()?;
        is_bpffs(&c)
            .then(|| fs::metadata(p).map(|m| m.dev()).ok())
            .flatten()
    };
    let here = dev("/sys/fs/bpf");
    if here.is_some() && here == dev(&format!("/proc/{reference}/root/sys/fs/bpf")) {
        return Ok(());
    }
    let name = crate::netns::current_inode()
        .ok()
        .and_then(|net| {
            fs::read_dir("/var/run/netns")
                .ok()?
                .flatten()
                .find(|e| fs::metadata(e.path()).is_ok_and(|m| m.ino() == net))
        })
        .map_or_else(
            || "NAME".to_owned(),
            |e| e.file_name().to_string_lossy().into_owned(),
        );
    bail!(
        "this process has a mount namespace of its own without the host's bpffs (as under \
         `ip netns exec`), so a gate made here would vanish when it exits: run \
         `drain-user --netns /var/run/netns/{name} ...` (or `nsenter --net=/var/run/netns/{name} drain-user ...`) instead"
    )
}

/// Mounts bpffs at /sys/fs/bpf when it is missing (systemd normally does; minimal hosts
/// and containers often do not), root-only (mode 0700) as systemd mounts it: a
/// world-writable bpffs (its default mode is 1777) would let any user claim names in it.
pub fn ensure_bpffs() -> Result<()> {
    check_mount_namespace()?;
    if bpffs_mounted()? {
        return Ok(());
    }
    // SAFETY: constant NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        bail!(
            "bpffs is not mounted at /sys/fs/bpf and mounting it failed ({}): \
             run `mount -t bpf -o mode=0700 bpf /sys/fs/bpf`",
            io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Who may own a directory or file drain trusts: root, or the user drain runs as (a
/// service account given the capabilities).
fn trusted_owner(uid: u32) -> bool {
    // SAFETY: geteuid has no preconditions.
    uid == 0 || uid == unsafe { libc::geteuid() }
}

/// Checks what `meta` (from lstat) describes can be trusted: owned by root (or by the
/// user drain runs as), not writable by group or others, and of the kind expected (a
/// symlink never is). Err is the one line to print: what is wrong and what to do.
fn check_trusted(path: &Path, meta: &fs::Metadata, dir: bool) -> Result<()> {
    let ft = meta.file_type();
    let what = if ft.is_symlink() {
        Some("it is a symbolic link".to_owned())
    } else if dir && !ft.is_dir() {
        Some("it is not a directory".to_owned())
    } else if !dir && !ft.is_file() {
        Some("it is not a regular file".to_owned())
    } else if !trusted_owner(meta.uid()) {
        Some(format!("it is owned by uid {}, not root", meta.uid()))
    } else if meta.mode() & 0o022 != 0 {
        Some(format!(
            "it is writable by other users (mode {:o})",
            meta.mode() & 0o7777
        ))
    } else {
        None
    };
    match what {
        None => Ok(()),
        Some(what) => bail!(
            "refusing to use {}: {what}; another user may have planted it: \
             remove it (`rm -r {}`) and run drain-user again",
            path.display(),
            path.display()
        ),
    }
}

/// True when `dir` exists and drain can trust it ([`check_trusted`]); false when it does
/// not exist; an error saying what to do when it exists and cannot be trusted.
pub fn trusted_dir(dir: &Path) -> Result<bool> {
    match fs::symlink_metadata(dir) {
        Ok(meta) => check_trusted(dir, &meta, true).map(|()| true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
    }
}

/// Creates `dir` root-only (0700) unless it exists, then checks it can be trusted
/// ([`trusted_dir`]): mkdir does not follow a symlink planted at the name, and the lstat
/// after it sees one.
pub fn make_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    trusted_dir(dir)?;
    Ok(())
}

/// Creates (or checks) `/sys/fs/bpf/drain` and the state directory `dir` in it, both
/// root-only. Call with the lock held.
pub fn make_state_dir(dir: &Path) -> Result<()> {
    make_dir(&root())?;
    make_dir(dir)
}

/// True when the state directory `dir` exists, and its parent and itself can be trusted;
/// an error saying what to do when either cannot.
pub fn state_exists(dir: &Path) -> Result<bool> {
    if !bpffs_mounted()? || !trusted_dir(&root())? {
        return Ok(false);
    }
    // A dead namespace's gate under this namespace's name (kernels without namespace
    // cookies) is not this namespace's gate; the next `gate on` or `gate off` reaps it.
    Ok(trusted_dir(dir)? && !crate::netns::stale(dir))
}

/// Where the lock lives: a root-only directory of its own, not the world-writable
/// /run/lock, where any user could create the lock file first, hold it, or plant a symlink
/// there for root to follow.
const RUN_DIR: &str = "/run/drain";
/// Overrides [`RUN_DIR`]. Not an option: it lets a test hold a lock of its own (a stopped
/// holder) without stalling every other drain call on the host. Checked like the default.
const RUN_DIR_ENV: &str = "DRAIN_LOCK_DIR";
const LOCK_FILE: &str = "lock";
/// How long a call waits for a holder that is stopped (SIGSTOP, Ctrl-Z) before it gives up:
/// such a holder makes no progress, and waiting longer would wedge every later call.
const LOCK_WAIT: Duration = Duration::from_secs(10);
/// How long a call waits for a holder that is still running. CLI calls hold the lock for
/// milliseconds to a few seconds (attaching, seeding), but on a host whose CPUs are
/// saturated (or under a tracer) that can stretch; this bounds it all the same.
const LOCK_WAIT_RUNNING: Duration = Duration::from_secs(60);

/// An exclusive lock on drain's state (all namespaces), held until dropped. Two deploy
/// scripts that run `drain-user` at once take turns instead of interleaving.
pub struct Lock {
    _file: File,
}

/// Opens (creating root-only) the lock file: no symlink followed, only a file root owns
/// and nobody else can write.
fn open_lock_file() -> Result<(File, PathBuf)> {
    use std::os::unix::fs::OpenOptionsExt;
    let run_dir =
        std::env::var_os(RUN_DIR_ENV).map_or_else(|| PathBuf::from(RUN_DIR), PathBuf::from);
    make_dir(&run_dir)?;
    let path = run_dir.join(LOCK_FILE);
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    check_trusted(&path, &file.metadata()?, false)?;
    Ok((file, path))
}

fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    // SAFETY: a valid open fd.
    if unsafe { libc::flock(file.as_raw_fd(), op) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Records the holder's pid in the lock file, for the message of a call that gives up.
fn claim(mut file: File) -> Lock {
    use std::io::{Seek, Write};
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = write!(file, "{}", std::process::id());
    Lock { _file: file }
}

/// Takes the lock, waiting at most [`LOCK_WAIT`] for another call to finish; then fails
/// naming the holder (a process stopped with SIGSTOP would otherwise wedge every later call).
pub fn lock() -> Result<Lock> {
    // One lock for the host, not one per namespace: CLI calls take milliseconds, so
    // serializing them costs nothing, no lock file is left per namespace ever gated, and
    // the shared /sys/fs/bpf/drain directory is only ever created under it.
    let (file, path) = open_lock_file()?;
    let start = Instant::now();
    loop {
        match flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => return Ok(claim(file)),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {}
            Err(e) => return Err(e).context("taking the drain lock"),
        }
        let waited = start.elapsed();
        if waited >= LOCK_WAIT_RUNNING || (waited >= LOCK_WAIT && holder(&path).1) {
            bail!("{}", busy_message(&path, waited));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Takes the lock if it is free right now: for `wait`'s TTL renewal, which tries again
/// later rather than block its poll loop (and its SIGTERM handling).
pub fn try_lock() -> Result<Option<Lock>> {
    let (file, _) = open_lock_file()?;
    match flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
        Ok(()) => Ok(Some(claim(file))),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
        Err(e) => Err(e).context("taking the drain lock"),
    }
}

/// The holder's pid as it wrote it in the lock file, and whether it is stopped (SIGSTOP;
/// not a tracer's stop, which a running `strace` resumes).
fn holder(path: &Path) -> (Option<u32>, bool) {
    let pid: Option<u32> = fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok());
    // /proc/PID/stat: "pid (comm) S ...": the state letter follows the last ')'.
    let state = pid.and_then(|pid| {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, r)| r.trim().chars().next())
            })
    });
    (pid, state == Some('T'))
}

/// "another drain-user (pid N, stopped) has held ... : `kill -CONT N` or `kill N`".
fn busy_message(path: &Path, waited: Duration) -> String {
    let (pid, stopped) = holder(path);
    let Some(pid) = pid else {
        return format!(
            "another drain-user call has held the lock {} for over {}s: \
             find it with `fuser {}` and let it finish, or kill it",
            path.display(),
            waited.as_secs(),
            path.display()
        );
    };
    format!(
        "another drain-user call (pid {pid}{}) has held the lock {} for over {}s: {}",
        if stopped { ", stopped" } else { "" },
        path.display(),
        waited.as_secs(),
        if stopped {
            format!("resume it with `kill -CONT {pid}`, or end it with `kill {pid}`")
        } else {
            format!("let it finish, or end it with `kill {pid}`")
        }
    )
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
            LinkPin::Rst6,
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

//! Network-namespace identity and liveness.
//!
//! A gate is per network namespace, and its state directory is named after the namespace
//! ([`StateDir`]). The inode tells namespaces apart while they exist; the kernel hands it to
//! the next namespace once one is gone, so the cookie (never reused while the system runs)
//! is in the name too. Kernels before 5.14 have no namespace cookie: there the name carries
//! cookie 0, and the kernel's own view tells a namespace from an older one that had its
//! inode ([`stale`]). [`orphans`] finds the state left by namespaces that were deleted
//! with their gate on, and by `wait` processes that were killed.

use std::{
    collections::HashMap,
    fmt, fs, io,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    str::FromStr,
};

use anyhow::{Context, Result};

use crate::sys;

/// One network namespace, for as long as the system runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NetnsId {
    /// `stat -L -c %i /proc/self/ns/net`: what the tracker compares in the kernel
    /// (`sk->skc_net->ns.inum`), and what people see in `ip netns` and `lsns`.
    pub inode: u64,
    /// SO_NETNS_COOKIE (Linux 5.14+): unique while the system runs, never 0. 0 = this
    /// kernel has no namespace cookies (see [`stale`]).
    pub cookie: u64,
}

impl NetnsId {
    /// The caller's network namespace.
    pub fn current() -> Result<Self> {
        Ok(NetnsId {
            inode: current_inode()?,
            cookie: current_cookie()?,
        })
    }
}

/// Inode of the calling thread's network namespace (`thread-self`, not `self`: a thread
/// that entered another namespace with setns(2) must see its own, like the cookie's socket).
pub fn current_inode() -> Result<u64> {
    Ok(fs::metadata("/proc/thread-self/ns/net")
        .context("reading /proc/thread-self/ns/net")?
        .ino())
}

/// Makes drain behave as on a kernel without namespace cookies (see [`current_cookie`]).
pub const NO_COOKIE_ENV: &str = "DRAIN_NO_NETNS_COOKIE";

/// The cookie of the caller's network namespace (SO_NETNS_COOKIE on a fresh socket); 0 on
/// a kernel that has none (before 5.14: ENOPROTOOPT).
fn current_cookie() -> Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // Not an option: it lets a test run the path of kernels without namespace cookies on
    // a kernel that has them.
    if std::env::var_os(NO_COOKIE_ENV).is_some() {
        return Ok(0);
    }
    let sock =
        std::os::unix::net::UnixDatagram::unbound().context("socket() for SO_NETNS_COOKIE")?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid fd and an out-parameter of the size given.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOPROTOOPT) {
            return Ok(0);
        }
        return Err(e).context("getsockopt(SO_NETNS_COOKIE)");
    }
    Ok(cookie)
}

/// True when `dir` is the state directory of a gate whose namespace is gone, named after it
/// on a kernel without namespace cookies (`<inode>-0`), where a newer namespace may have
/// been given the same inode. The kernel says which: every gate has its sk_lookup link
/// attached to its namespace, and that link's info reports the namespace's inode until
/// the namespace is dismantled, then 0 (`bpf_netns_link` drops its net at pre_exit).
/// A live namespace's inode is unique, so a link reporting this inode is attached to this
/// namespace. Without a readable link there is no proof: not stale.
pub fn stale(dir: &Path) -> bool {
    let Some(StateDir::Gate(id)) = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
    else {
        return false;
    };
    if id.cookie != 0 {
        return false;
    }
    match sys::link_info(&crate::pins::LinkPin::Lookup.path(dir)) {
        Ok(i) if i.link_type == sys::BPF_LINK_TYPE_NETNS => u64::from(i.netns_ino) != id.inode,
        _ => false,
    }
}

/// The name of a state directory under `/sys/fs/bpf/drain`. (bpffs refuses names with
/// dots, hence dashes.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateDir {
    /// `<inode>-<cookie>`: the gate of a namespace (the inode for people, the cookie for
    /// uniqueness).
    Gate(NetnsId),
    /// `<inode>-wait-<pid>`: the tracker a `wait` loads for its own lifetime when the
    /// namespace has no gate.
    Wait { inode: u64, pid: u32 },
}

impl fmt::Display for StateDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateDir::Gate(id) => write!(f, "{}-{}", id.inode, id.cookie),
            StateDir::Wait { inode, pid } => write!(f, "{inode}-wait-{pid}"),
        }
    }
}

/// A directory name that is not a drain state directory.
#[derive(Debug, PartialEq, Eq)]
pub struct NotStateDir(String);

impl fmt::Display for NotStateDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} is not a drain state directory name (<inode>-<cookie> or <inode>-wait-<pid>)",
            self.0
        )
    }
}

impl std::error::Error for NotStateDir {}

impl FromStr for StateDir {
    type Err = NotStateDir;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        fn num<T: FromStr>(s: &str) -> Option<T> {
            // Digits only: `u64::from_str` would also take a leading `+`.
            s.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| s.parse().ok())
                .flatten()
        }
        let parsed = match s.split('-').collect::<Vec<_>>()[..] {
            [inode, "wait", pid] => num(inode)
                .zip(num(pid))
                .map(|(inode, pid)| StateDir::Wait { inode, pid }),
            [inode, cookie] => num(inode)
                .zip(num(cookie))
                .map(|(inode, cookie)| StateDir::Gate(NetnsId { inode, cookie })),
            _ => None,
        };
        // One spelling per directory: "007-1" is not the directory of namespace 7.
        parsed
            .filter(|d| d.to_string() == s)
            .ok_or_else(|| NotStateDir(s.to_owned()))
    }
}

/// The state directories under `root` whose owner is gone: gates whose namespace no longer
/// exists (a container deleted with its gate on: their maps and tracker would otherwise
/// stay until reboot), and the trackers of `wait` processes that were killed (kill -9
/// leaves their maps pinned; the tracker itself detached when the process died).
///
/// Reaping a live gate would lift it, so a gate counts as dead only on two pieces of
/// evidence: nothing this process can see holds its namespace (a process in it, an open fd,
/// a bind mount in this mount namespace), or what does is a newer namespace with the same
/// inode (the cookie differs); and the kernel says none of its links is attached any more
/// ([`links_all_detached`]). The first alone is not enough: a process in a PID namespace
/// this one cannot see, or a bind mount in another mount namespace, keeps a namespace alive
/// unseen; but a namespace that is gone has had its devices unregistered, which detaches
/// their links. A gate whose interface was a physical device (moved back to the initial
/// namespace when its namespace died, still attached) is left for its TTL to open: leaving
/// a dead gate's pins is the safe side. `own` is alive by definition and skipped without
/// scanning /proc.
pub fn orphans(root: &Path, own: NetnsId) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut held: Option<HashMap<u64, PathBuf>> = None;
    let mut out = Vec::new();
    for e in entries.flatten() {
        let Some(dir) = e.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let dead = match dir {
            // No cookie: only the kernel's view of the namespace link can tell this
            // namespace's gate from that of a dead one that had its inode (own included).
            StateDir::Gate(id) if id.cookie == 0 => {
                stale(&e.path()) && links_all_detached(&e.path())
            }
            StateDir::Gate(id) if id == own => false,
            StateDir::Gate(id) => {
                let unheld = match held.get_or_insert_with(held_namespaces).get(&id.inode) {
                    None => true,
                    Some(handle) => cookie_of(handle).is_some_and(|c| c != id.cookie),
                };
                unheld && links_all_detached(&e.path())
            }
            StateDir::Wait { pid, .. } => !Path::new("/proc").join(pid.to_string()).exists(),
        };
        if dead {
            out.push(e.path());
        }
    }
    out
}

/// True when every link pinned in the state directory `dir` is one the kernel reports
/// attached to nothing: an XDP or TCX link with ifindex 0, a netns link with netns inode 0
/// (tracing links, the tracker and the RST counter, are bound to no namespace and say
/// nothing either way); and every clsact filter recorded there one whose program the
/// kernel no longer has (a namespace that is gone cannot be asked for its filters, but
/// its devices' qdiscs went with it, and with them the program's last references). A
/// pin or record that cannot be read counts as attached: no proof, no reaping.
fn links_all_detached(dir: &Path) -> bool {
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    match crate::clsact::records(dir) {
        Ok(recs) if recs.iter().all(crate::clsact::program_gone) => {}
        _ => return false,
    }
    entries.flatten().all(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        // Maps hold no namespace; every link's pin is named link-* (the tracker's and the
        // RST counter's too, but a tracing link is bound to no namespace).
        if !name.starts_with("link-") {
            return true;
        }
        match sys::link_info(&e.path()) {
            Ok(i) if i.link_type == sys::BPF_LINK_TYPE_NETNS => i.netns_ino == 0,
            Ok(i)
                if matches!(
                    i.link_type,
                    sys::BPF_LINK_TYPE_RAW_TRACEPOINT | sys::BPF_LINK_TYPE_TRACING
                ) =>
            {
                true
            }
            Ok(i) => i.ifindex == 0,
            Err(_) => false,
        }
    })
}

/// Every network namespace something still holds, by inode, with a path that opens it:
/// processes (/proc/*/ns/net), open fds (/proc/*/fd/* -> "net:[N]"), nsfs bind mounts.
pub(crate) fn held_namespaces() -> HashMap<u64, PathBuf> {
    let parse = |link: &Path| -> Option<u64> {
        let t = fs::read_link(link).ok()?;
        nsfs_inode(t.to_str()?)
    };
    let mut map = HashMap::new();
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
        if let Some(i) = nsfs_inode(root) {
            map.entry(i).or_insert_with(|| PathBuf::from(at));
        }
    }
    map
}

/// "net:[4026531840]" -> 4026531840.
fn nsfs_inode(name: &str) -> Option<u64> {
    name.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// Runs `f` on a thread that has joined the network namespace at `handle` (so this process
/// stays where it is) and returns what it returns.
pub fn run_in<R: Send>(handle: &Path, f: impl FnOnce() -> R + Send) -> Result<R> {
    let file = fs::File::open(handle)
        .with_context(|| format!("opening the network namespace {}", handle.display()))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a valid nsfs fd; it moves only this short-lived thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error())
                    .with_context(|| format!("entering {}", handle.display()));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("a thread in {} panicked", handle.display()))?
    })
}

/// The cookie of the namespace at `handle`, read from a thread that joins it (so this
/// process stays where it is). None when it cannot be entered (then nothing is reaped).
fn cookie_of(handle: &Path) -> Option<u64> {
    let file = fs::File::open(handle).ok()?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a valid nsfs fd; it moves only this short-lived thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return None;
            }
            current_cookie().ok()
        })
        .join()
        .ok()
        .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_dir_round_trip() {
        for d in [
            StateDir::Gate(NetnsId {
                inode: 4026531840,
                cookie: 1,
            }),
            StateDir::Gate(NetnsId {
                inode: u64::MAX,
                cookie: u64::MAX,
            }),
            StateDir::Wait {
                inode: 4026532301,
                pid: 4242,
            },
        ] {
            let name = d.to_string();
            assert_eq!(name.parse::<StateDir>(), Ok(d), "{name}");
        }
        assert_eq!(
            "4026531840-17".parse::<StateDir>(),
            Ok(StateDir::Gate(NetnsId {
                inode: 4026531840,
                cookie: 17
            }))
        );
        assert_eq!(
            "12-wait-34".parse::<StateDir>(),
            Ok(StateDir::Wait { inode: 12, pid: 34 })
        );
    }

    #[test]
    fn state_dir_rejects() {
        for bad in [
            "",
            "-",
            "12",
            "12-",
            "-12",
            "12-34-56",
            "12-wait-",
            "12-wait-x",
            "wait-12",
            "12-wait-34-5",
            "12-WAIT-34",
            "+12-34",
            "12-+34",
            "012-34",
            "12-034",
            "a-b",
            "12-34 ",
            "18446744073709551616-1",
            "12-wait-4294967296",
            "link-track",
            "DRAIN_CONFIG",
        ] {
            let err = bad.parse::<StateDir>().expect_err(bad);
            assert!(err.to_string().contains("not a drain state directory"));
        }
    }

    #[test]
    fn nsfs_names() {
        assert_eq!(nsfs_inode("net:[4026531840]"), Some(4026531840));
        assert_eq!(nsfs_inode("mnt:[4026531840]"), None);
        assert_eq!(nsfs_inode("net:[x]"), None);
    }

    #[test]
    fn current_namespace_is_not_an_orphan() {
        // Unprivileged: reading the own namespace's identity needs no capability.
        let own = NetnsId::current().unwrap();
        let root = std::env::temp_dir().join(format!("drain-orphans-{}", std::process::id()));
        let gone_pid = u32::MAX; // never a pid (pid_max <= 2^22)
        for d in [
            StateDir::Gate(own),
            StateDir::Wait {
                inode: own.inode,
                pid: std::process::id(),
            },
            StateDir::Wait {
                inode: own.inode,
                pid: gone_pid,
            },
        ] {
            fs::create_dir_all(root.join(d.to_string())).unwrap();
        }
        fs::create_dir_all(root.join("not-ours-at-all")).unwrap();
        let found = orphans(&root, own);
        fs::remove_dir_all(&root).unwrap();
        assert_eq!(
            found,
            [root.join(
                StateDir::Wait {
                    inode: own.inode,
                    pid: gone_pid
                }
                .to_string()
            )]
        );
    }
}

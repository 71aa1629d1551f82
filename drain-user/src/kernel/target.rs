//! `--netns PATH`, `--pid PID`, `--container NAME [--runtime docker|podman]`: the network
//! namespace a command acts on, resolved and entered before anything else runs.
//!
//! Only the network namespace is entered (setns CLONE_NEWNET on the one thread that runs
//! at that point; threads started later inherit it): the mount namespace stays the
//! host's, so the pins under the host's bpffs are the ones every other call sees, which is
//! what makes `--container web gate on` and a later `--container web gate off` meet. Every
//! namespace-relative read (`NetnsId::current()`, the tracker's namespace, sock_diag,
//! rtnetlink) then names the target. A bad target is a usage error (exit 2) found before
//! anything on the host changes.

use std::{
    fs::File,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Result;

use crate::domain::{usage, Runtime};

/// The network namespace a command acts on: at most one of a path, a process or a
/// container (none: the caller's own).
#[derive(Clone, Debug, Default)]
pub struct Target {
    pub netns: Option<PathBuf>,
    pub pid: Option<u32>,
    pub container: Option<String>,
    /// The runtime `container` belongs to (default Docker).
    pub runtime: Option<Runtime>,
}

/// `statfs.f_type` of nsfs (include/uapi/linux/magic.h).
const NSFS_MAGIC: i64 = 0x6e73_6673;
/// ioctl NS_GET_NSTYPE (include/uapi/linux/nsfs.h): the CLONE_NEW* type of a namespace fd.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Enters the namespace `target` names, if any. Call before any thread starts.
pub fn enter(target: &Target) -> Result<()> {
    let Some((path, what)) = resolve(target)? else {
        return Ok(());
    };
    let file = open_netns(&path, &what)?;
    // SAFETY: setns on a valid fd opened above; it moves only the calling thread, which is
    // the process's only thread at this point.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(usage(format!(
            "cannot enter the network namespace of {what} ({}): {}",
            path.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// The path of the namespace to enter and how to name it in messages.
fn resolve(target: &Target) -> Result<Option<(PathBuf, String)>> {
    if let Some(path) = &target.netns {
        return Ok(Some((path.clone(), format!("--netns {}", path.display()))));
    }
    if let Some(pid) = target.pid {
        let what = format!("--pid {pid}");
        return Ok(Some((pid_netns(pid, &what)?, what)));
    }
    let Some(name) = &target.container else {
        return Ok(None);
    };
    let runtime = target.runtime.unwrap_or_default();
    let pid = container_pid(runtime, name)?;
    let what = format!("container {name} ({}, pid {pid})", runtime_name(runtime));
    Ok(Some((pid_netns(pid, &what)?, what)))
}

fn runtime_name(r: Runtime) -> &'static str {
    match r {
        Runtime::Docker => "docker",
        Runtime::Podman => "podman",
    }
}

/// The runtime's own CLI, by absolute path: another, newer client may come first on PATH.
fn runtime_bin(r: Runtime) -> &'static str {
    match r {
        Runtime::Docker => "/usr/bin/docker",
        Runtime::Podman => "/usr/bin/podman",
    }
}

/// `/proc/PID/ns/net`, when that process exists.
fn pid_netns(pid: u32, what: &str) -> Result<PathBuf> {
    let proc = Path::new("/proc").join(pid.to_string());
    if !proc.exists() {
        return Err(usage(format!(
            "{what}: process {pid} is not running (gone, or in a PID namespace this one \
             cannot see): give the pid of a process in the target namespace"
        )));
    }
    Ok(proc.join("ns/net"))
}

/// The host pid of a running container's first process: `<runtime> inspect -f
/// '{{.State.Pid}}' NAME`, the runtime's own answer (0 when it is not running).
fn container_pid(runtime: Runtime, name: &str) -> Result<u32> {
    let rt = runtime_name(runtime);
    let bin = runtime_bin(runtime);
    if name.is_empty() || name.starts_with('-') {
        return Err(usage(format!(
            "{name:?} is not a container name: give the name or id `{rt} ps` shows"
        )));
    }
    if !Path::new(bin).exists() {
        return Err(usage(format!(
            "--container {name}: {bin} is missing, so {rt} cannot name the container's \
             namespace; install {rt}, pick the runtime that runs it (--runtime), or give \
             --pid PID / --netns PATH"
        )));
    }
    let out = Command::new(bin)
        .args([
            "inspect",
            "--type",
            "container",
            "--format",
            "{{.State.Pid}}",
            name,
        ])
        .output()
        .map_err(|e| usage(format!("--container {name}: running {bin} failed: {e}")))?;
    let first = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim()
            .to_owned()
    };
    if !out.status.success() {
        return Err(usage(format!(
            "--container {name}: `{bin} inspect` failed: {}; `{rt} ps` lists the running \
             containers",
            first(&out.stderr)
        )));
    }
    let text = first(&out.stdout);
    match text.parse::<u32>() {
        Ok(0) => Err(usage(format!(
            "--container {name}: the container is not running, so it has no network \
             namespace to act on; start it first (`{rt} start {name}`)"
        ))),
        Ok(pid) => Ok(pid),
        Err(_) => Err(usage(format!(
            "--container {name}: {bin} inspect printed {text:?}, not a pid"
        ))),
    }
}

/// Opens `path` and checks it is a network namespace handle.
fn open_netns(path: &Path, what: &str) -> Result<File> {
    let file = File::open(path).map_err(|e| {
        usage(format!(
            "{what}: cannot open {}: {e}; give /var/run/netns/NAME or /proc/PID/ns/net",
            path.display()
        ))
    })?;
    // SAFETY: statfs is plain old data; zeroed is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and a properly sized out-parameter.
    let on_nsfs =
        unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } == 0 && st.f_type as i64 == NSFS_MAGIC;
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd.
    let kind = on_nsfs.then(|| unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) });
    if kind != Some(libc::CLONE_NEWNET) {
        let is = match (on_nsfs, file.metadata().map(|m| m.mode() & libc::S_IFMT)) {
            (true, _) => "a namespace of another kind",
            (false, Ok(libc::S_IFDIR)) => "a directory",
            _ => "not a namespace handle",
        };
        return Err(usage(format!(
            "{what}: {} is {is}, not a network namespace; give /var/run/netns/NAME or \
             /proc/PID/ns/net",
            path.display()
        )));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_a_netns() {
        for (p, want) in [
            ("/", "a directory"),
            ("/proc/self/status", "not a namespace handle"),
            ("/nonexistent/netns", "cannot open"),
        ] {
            let e = open_netns(Path::new(p), "--netns").unwrap_err().to_string();
            assert!(e.contains(want), "{p}: {e}");
        }
        // Unprivileged: opening one's own namespace handles needs no capability.
        let e = open_netns(Path::new("/proc/self/ns/uts"), "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("another kind"), "{e}");
        open_netns(Path::new("/proc/self/ns/net"), "x").unwrap();
    }

    #[test]
    fn gone_pid() {
        let e = pid_netns(u32::MAX, "process").unwrap_err().to_string();
        assert!(e.contains("is not running"), "{e}");
    }
}

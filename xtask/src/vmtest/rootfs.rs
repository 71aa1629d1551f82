//! The guest's userland: a Debian bookworm root made by `debootstrap --variant=minbase` from
//! the archive the host's apt uses, with the tools the integration tests drive, packed once
//! into an initramfs part and cached under target/vmtest keyed by its package list. The host
//! runs Debian 12 too, so the test binaries and drain-user built on it run there unchanged.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use super::cpio::Cpio;
use crate::run;

/// Installed by debootstrap itself: no daemon among them.
const TOOLS: &[&str] = &[
    "iproute2", // ip, ss, tc
    "util-linux",
    "mount",    // mount, umount (unshare, nsenter, setpriv are util-linux)
    "kmod",     // modprobe: the kernel's on-demand module loading calls /sbin/modprobe
    "procps",   // ps, sysctl
    "strace",   // kills drain-user at chosen syscalls (faults, hardening)
    "bpftool",  // the tests' cross-check of attached programs
    "nftables", // the published-port tests' DNAT
];

/// Installed in a second step behind a policy-rc.d that forbids starting services: the
/// end-to-end test runs its own nginx and HAProxy inside its namespaces.
const SERVERS: &[&str] = &["nginx", "haproxy", "wrk"];

const SUITE: &str = "bookworm";
/// Bump when the way the root is made changes, so caches are rebuilt.
const RECIPE: &str = "1";

/// The packed root (an uncompressed cpio), built when missing.
pub fn ensure(cache: &Path) -> Result<PathBuf> {
    let mirror = super::kernels::host_main_archive()?;
    let key = super::fnv_hex(
        [RECIPE, SUITE, &mirror]
            .into_iter()
            .map(str::to_owned)
            .chain(TOOLS.iter().chain(SERVERS).map(|s| s.to_string())),
    );
    let cpio = cache.join(format!("rootfs-{SUITE}-{key}.cpio"));
    if cpio.is_file() {
        return Ok(cpio);
    }
    crate::ensure_packages(&[("debootstrap", crate::have("debootstrap"))])?;
    let dir = cache.join(format!("rootfs-{SUITE}-{key}.tmp"));
    let guard = MountGuard(dir.clone());
    if dir.exists() {
        guard.unmount_all();
        fs::remove_dir_all(&dir)?;
    }
    fs::create_dir_all(&dir)?;
    eprintln!("vmtest: building the guest root (debootstrap {SUITE}, about a minute)");
    let t = std::time::Instant::now();
    run(Command::new("debootstrap")
        .args([
            "--variant=minbase",
            &format!("--include={}", TOOLS.join(",")),
        ])
        .arg(SUITE)
        .arg(&dir)
        .arg(&mirror))
    .context("debootstrap failed")?;
    // Debian's maintainer scripts start daemons on install; nothing may start on the host.
    let policy = dir.join("usr/sbin/policy-rc.d");
    fs::write(&policy, "#!/bin/sh\nexit 101\n")?;
    fs::set_permissions(&policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    run(Command::new("chroot")
        .arg(&dir)
        .args([
            "apt-get",
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "-o",
            "DPkg::Lock::Timeout=600",
        ])
        .args(SERVERS)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("installing the servers in the guest root failed")?;
    guard.unmount_all();
    // What the guest never reads.
    for d in [
        "usr/share/doc",
        "usr/share/man",
        "usr/share/info",
        "usr/share/locale",
        "var/cache/apt",
        "var/lib/apt/lists",
        "var/cache/debconf",
    ] {
        let _ = fs::remove_dir_all(dir.join(d));
    }
    let tmp = cpio.with_extension("cpio.tmp");
    let mut c = Cpio::create(&tmp)?;
    c.tree("", &dir)?;
    c.finish()?;
    fs::rename(&tmp, &cpio)?;
    fs::remove_dir_all(&dir)?;
    eprintln!(
        "vmtest: guest root ready in {:.0} s ({} MB)",
        t.elapsed().as_secs_f64(),
        fs::metadata(&cpio)?.len() >> 20
    );
    Ok(cpio)
}

/// Unmounts whatever debootstrap or apt left mounted below the build directory (proc, sys,
/// devpts when interrupted), deepest first, also when the build fails.
struct MountGuard(PathBuf);

impl MountGuard {
    fn unmount_all(&self) {
        let Ok(mounts) = fs::read_to_string("/proc/self/mounts") else {
            return;
        };
        let prefix = self.0.to_string_lossy().into_owned();
        let mut under: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        under.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in under {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        self.unmount_all();
    }
}

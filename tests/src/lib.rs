//! Helpers for drain's integration tests (tests/tests/*.rs): one home per concept.
//!
//! - [`netns`]: network namespaces: a pair joined by a veth pair (RAII), running code
//!   ([`netns::in_netns`]) and commands ([`netns::nsenter`]) inside one, its inode and
//!   cookie, interface indexes and MACs, and where drain keeps a namespace's gate state
//!   ([`netns::state_dir`], the one place that name is spelled).
//! - [`cli`]: the one drain-user runner: [`cli::Drain`] runs the CLI in a test namespace with
//!   a deadline on every call, asserts exact exit codes and turns the gate off on drop;
//!   [`cli::Running`] for calls that run in the background; `status --json` helpers.
//! - [`traffic`]: every socket helper: connects with their outcome (from a chosen source
//!   too), listeners, an echo server, held connection pairs, the churn server, raw
//!   AF_PACKET sockets, `ss`.
//! - [`object`]: BPF objects: the kernel object and its loader into a per-test pin
//!   directory (RAII), the one raw bpf(2) wrapper and the pass-through XDP program loaded
//!   with it, what the kernel says is attached (aya's `loaded_links`,
//!   `SchedClassifier::query_tcx`, `ip`, bpftool), per-CPU counter sums.
//! - [`frames`]: a frame builder with one comment per header field.
//! - [`classify`]: an independent reference classifier (written from the RFCs, not from
//!   drain-ebpf/src/parse.rs) that the kernel programs' verdicts are checked against.
//! - [`testrun`]: BPF_PROG_TEST_RUN on a program fd.
//! - [`gatemodel`]: the gate programs under BPF_PROG_TEST_RUN next to a model of what they
//!   must do (classifier + gate logic): verdict, output frame (RSTs included), counters.
//! - [`fuzz`]: a seeded PRNG, random frames, mutations and the checked-in seed corpus.
//! - [`published`]: a published port without a runtime: a "container" namespace behind an
//!   nftables DNAT in the host namespace, the way Docker's `-p 8080:80` works
//!   ([`published::Published`], RAII; `restart` replaces its namespace like `docker restart`).
//! - [`web`]: nginx, HAProxy and wrk in test namespaces (end-to-end tests under load).
//! - [`booted`]: booted hosts: a cached Debian root file system booted with systemd as
//!   PID 1 under systemd-nspawn in a test namespace, with drain-user and a bpffs bound in;
//!   `systemctl`/`journalctl` inside; everything torn down on drop.
//! - [`fleet`]: the fleet drill's hosts, balancer and Ansible controller.
//! - [`kernel`]: what a test needs from the kernel (`require!(Feature::Tcx)`): probed by
//!   trying it; reported as not run under `cargo xtask vmtest`, a failure anywhere else.
//! - [`docker`]: a real dockerd started inside a test namespace (its own socket, data and
//!   exec roots, cgroup parent, bridge), the test site's nginx image (built once, cached
//!   under the build directory, imported without a registry), containers with published
//!   ports, and a teardown on drop that leaves nothing behind.
//!
//! Everything here panics on error rather than returning `Result`: a failing helper is a
//! failing test, and the panic message says what was being done.

pub mod booted;
pub mod classify;
pub mod cli;
pub mod docker;
pub mod fleet;
pub mod frames;
pub mod fuzz;
pub mod gatemodel;
pub mod kernel;
pub mod netns;
pub mod object;
pub mod published;
pub mod testrun;
pub mod traffic;
pub mod web;

/// The drain-user binary under test: `$DRAIN_USER`, else the workspace's debug build
/// (`cargo xtask test` builds it first).
pub fn drain_user_bin() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("DRAIN_USER") {
        return p.into();
    }
    let p = target_dir().join("debug/drain-user");
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask build` (or set DRAIN_USER)",
        p.display()
    );
    p
}

/// The build directory: `$CARGO_TARGET_DIR`, else the workspace's `target/`. Downloads and
/// built images the tests cache live under it.
pub fn target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        std::path::PathBuf::from,
    )
}

/// Panics with a clear message unless the process runs as root (loading BPF programs,
/// pinning maps and creating network namespaces all need it).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "this test needs root (euid is {euid}): it loads BPF programs, pins maps under \
         /sys/fs/bpf and creates network namespaces; run `sudo cargo xtask test`"
    );
}

/// A name part that differs between processes and between calls in one process: pid, a
/// per-process counter and the low bits of the wall clock (so a crashed earlier process with
/// the same pid cannot collide with leftovers). Hex, at most 6 + 1 + 4 + 1 + 3 characters.
pub(crate) fn unique_suffix() -> (u32, u32, String) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (
        pid,
        n,
        format!("{pid:x}x{:x}x{:03x}", n & 0xffff, (nanos >> 10) & 0xfff),
    )
}

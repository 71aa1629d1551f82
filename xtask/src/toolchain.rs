//! Makes sure the eBPF toolchain is present, installing what is missing (idempotent; a
//! few hundred milliseconds when everything is there).

use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};

use crate::{capture, run};

/// The nightly the eBPF build uses (rustup's `nightly` channel, which ships LLVM 22: the
/// bpf-linker below is built against that LLVM).
pub const NIGHTLY: &str = "nightly";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn ensure() -> Result<()> {
    ensure_nightly()?;
    ensure_bpf_linker()
}

fn ensure_nightly() -> Result<()> {
    let toolchains = capture(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup not found: install it from https://rustup.rs")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("xtask: installing the nightly toolchain");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
        ]))?;
    }
    let components = capture(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: adding rust-src to {NIGHTLY} (needed by -Z build-std=core)");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))?;
    }
    Ok(())
}

fn ensure_bpf_linker() -> Result<()> {
    // `bpf-linker --version` also fails when the libLLVM it was linked against is gone.
    if let Ok(v) = capture(Command::new("bpf-linker").arg("--version")) {
        if v.contains(BPF_LINKER_VERSION) {
            return Ok(());
        }
    }
    ensure_llvm22()?;
    eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        // Without it bpf-linker's build searches /usr and fails with `-lLLVM` not found.
        .env("LLVM_PREFIX", LLVM_PREFIX))
    .context("building bpf-linker failed (see the cargo output above)")
}

fn ensure_llvm22() -> Result<()> {
    if Path::new(LLVM_PREFIX).join("lib/libLLVM.so").exists() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || Command::new("apt-get").arg("--version").output().is_err() {
        bail!(
            "LLVM 22 is missing ({LLVM_PREFIX}): install Debian's llvm-22-dev \
             (`sudo apt-get install -y llvm-22-dev`), then rerun"
        );
    }
    eprintln!("xtask: installing llvm-22-dev");
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "llvm-22-dev"])
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("apt-get install llvm-22-dev failed")
}

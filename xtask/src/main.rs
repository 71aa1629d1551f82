//! `cargo xtask <task>`: build, test, lint, demo and bench drain. Run `cargo xtask --help`.

#[cfg(feature = "harness")]
mod bench;
#[cfg(feature = "harness")]
mod demo;
mod fuzz;
#[cfg(feature = "harness")]
mod package;
mod toolchain;
mod vmtest;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "drain's build, test and lint tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the eBPF build needs (nightly rust-src, LLVM 22, bpf-linker) if missing,
    /// then build the kernel programs for the host's byte order (bpfel or bpfeb-unknown-none).
    BuildEbpf,
    /// build-ebpf, then the drain-user binary (which embeds the object).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build everything and run the whole test suite, root-only tests included (needs root).
    Test {
        /// Extra arguments passed to `cargo test` after `--` (a test name filter, ...).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// cargo fmt --check, clippy -D warnings on the user crates and on the eBPF crate, and
    /// the Ansible collection's linters (ansible-test sanity, ansible-lint).
    Lint,
    /// Show drain working in throwaway network namespaces (needs root).
    Demo,
    /// drain against what operators use instead, as ratios measured side by side: writes
    /// bench/results.md and bench/results.json (needs root; ~5 minutes).
    Bench {
        /// Tiny sizes, every section once, nothing written to bench/ (seconds: for CI).
        #[arg(long)]
        smoke: bool,
    },
    /// (bench helper) Connects COUNT times from namespace NS to TO and holds the
    /// connections until stdin closes.
    #[command(hide = true)]
    BenchHold {
        #[arg(long)]
        ns: String,
        #[arg(long)]
        to: std::net::SocketAddr,
        #[arg(long)]
        count: usize,
        /// The IPv4 source address to connect from (default: the kernel's choice).
        #[arg(long)]
        from: Option<std::net::Ipv4Addr>,
    },
    /// The Debian package (target/debian/*.deb): release binary, man pages, shell
    /// completions, examples, README and licences. Installs cargo-deb if missing.
    Deb,
    /// Differential fuzzing of the gate programs against the reference classifier
    /// (needs root); prints frames, seed, mismatches and frames/s.
    Fuzz {
        /// Frames to run through both programs.
        #[arg(long, default_value_t = 1_000_000)]
        frames: u64,
        /// PRNG seed (decimal or 0x-hex); default: a new one, printed.
        #[arg(long, value_parser = fuzz::parse_seed)]
        seed: Option<u64>,
    },
    /// drain's root integration tests on Debian's own kernels under QEMU (needs root):
    /// kernel packages pinned in xtask/vmtest.lock, a debootstrapped guest userland, a
    /// summary per kernel (passed / failed / not run, with reasons). Caches in target/vmtest.
    ///
    /// Example: cargo xtask vmtest --kernel 5.10,6.1 -- --test gate_cli gate_off
    Vmtest {
        /// Kernels: 5.10, 6.1, 6.12, latest (trixie-backports), all; comma-separated or
        /// repeated. Default: all.
        #[arg(long, value_delimiter = ',')]
        kernel: Vec<String>,
        /// Only the subset CI runs (listed in README's "Kernel matrix").
        #[arg(long)]
        quick: bool,
        /// Resolve the newest kernel package of each line through apt and rewrite
        /// xtask/vmtest.lock (then runs the kernels given with --kernel, if any).
        #[arg(long)]
        refresh_lock: bool,
        /// Hard deadline for one kernel (boot and every test), seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
        /// Deadline for one test in the guest, seconds.
        #[arg(long, default_value_t = 900)]
        test_timeout: u64,
        /// Guest CPUs.
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        /// Guests booted at a time (each kernel is one guest). Default: one per host CPU,
        /// as many as the available memory holds (about 3 GiB each).
        #[arg(long)]
        jobs: Option<usize>,
        /// After `--`: `--test NAME` picks test binaries (repeatable); the rest goes to
        /// libtest (a name filter, --exact, --skip NAME).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run_task(Cli::parse().task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The tasks that need drain-tests or drain-user: an xtask built with `harness` runs them.
#[cfg(not(feature = "harness"))]
fn needs_harness(task: &Task) -> bool {
    matches!(
        task,
        Task::Bench { .. } | Task::BenchHold { .. } | Task::Demo | Task::Deb
    )
}

/// Runs this same command line again from an xtask built with the `harness` feature.
#[cfg(not(feature = "harness"))]
fn with_harness() -> Result<()> {
    let status = Command::new("cargo")
        .current_dir(workspace_root())
        .args([
            "run",
            "--quiet",
            "--package",
            "xtask",
            "--features",
            "harness",
            "--",
        ])
        .args(std::env::args_os().skip(1))
        .status()
        .context("running cargo")?;
    if !status.success() {
        // The task printed its own error.
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

fn run_task(task: Task) -> Result<()> {
    #[cfg(not(feature = "harness"))]
    if needs_harness(&task) {
        return with_harness();
    }
    match task {
        Task::BuildEbpf => build_ebpf(),
        Task::Build { release } => build(release),
        Task::Test { args } => test(&args),
        Task::Lint => lint(),
        #[cfg(feature = "harness")]
        Task::Deb => package::deb().map(drop),
        #[cfg(feature = "harness")]
        Task::Bench { smoke } => {
            // Timings are of the release build; the smoke run only checks that every section
            // works, with the debug build CI has already made.
            build(!smoke)?;
            ensure_bench_packages()?;
            bench::isolate()?;
            let profile = if smoke { "debug" } else { "release" };
            bench::run(&bench::Ctx {
                bin: target_dir().join(profile).join("drain-user"),
                smoke,
            })
        }
        #[cfg(feature = "harness")]
        Task::BenchHold {
            ns,
            to,
            count,
            from,
        } => bench::hold(&ns, to, count, from),
        #[cfg(feature = "harness")]
        Task::Demo => {
            build(false)?;
            ensure_bpffs()?;
            demo::run(&target_dir().join("debug/drain-user"))
        }
        #[cfg(not(feature = "harness"))]
        Task::Bench { .. } | Task::BenchHold { .. } | Task::Demo | Task::Deb => {
            unreachable!("run by with_harness above")
        }
        Task::Fuzz { frames, seed } => {
            build(false)?;
            require_root("the fuzzer loads BPF programs")?;
            ensure_bpffs()?;
            fuzz::run(frames, seed)
        }
        Task::Vmtest {
            kernel,
            quick,
            refresh_lock,
            timeout,
            test_timeout,
            cpus,
            jobs,
            args,
        } => vmtest::run_matrix(vmtest::Args {
            kernels: kernel,
            quick,
            refresh_lock,
            timeout,
            test_timeout,
            cpus,
            jobs: jobs.unwrap_or_else(vmtest::default_jobs),
            args,
        }),
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Cargo's target directory: `$CARGO_TARGET_DIR`, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

/// The BPF target of the host's byte order, as aya's own xtask picks it: the object is
/// loaded into the kernel of the machine it is built on (or one of the same kind).
pub fn ebpf_target() -> &'static str {
    if cfg!(target_endian = "big") {
        "bpfeb-unknown-none"
    } else {
        "bpfel-unknown-none"
    }
}

/// The eBPF build: nightly for -Z build-std=core, BTF emitted by bpf-linker (`--btf`) so
/// the loader can relocate struct accesses.
fn ebpf_cargo(subcommand: &str) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .arg(format!("+{}", toolchain::NIGHTLY))
        .args([
            subcommand,
            "--package",
            "drain-ebpf",
            "--release",
            "--target",
            ebpf_target(),
            "-Z",
            "build-std=core",
        ])
        // aya-ebpf needs to know the kernel's arch for its bindings (pt_regs and such):
        // the programs run in the kernel of the host they are built for.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [
                &format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
                "-Cdebuginfo=2",
                "-Clink-arg=--btf",
            ]
            .join("\x1f"),
        );
    // A toolchain picked by the caller's environment (rustup proxies set these) must not
    // override the +nightly above.
    for var in [
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "CARGO_BUILD_RUSTC",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn build_ebpf() -> Result<()> {
    toolchain::ensure()?;
    run(&mut ebpf_cargo("build")).context("building the eBPF programs failed")
}

pub fn build(release: bool) -> Result<()> {
    build_ebpf()?;
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .args(["build", "--package", "drain-user"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

fn test(args: &[String]) -> Result<()> {
    build(false)?;
    require_root("the integration tests load BPF programs and create network namespaces")?;
    ensure_bpffs()?;
    ensure_test_packages()?;
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        // drain-ebpf only builds for the BPF target (build-ebpf did that above).
        .args([
            "test",
            "--workspace",
            "--exclude",
            "drain-ebpf",
            "--",
            "--include-ignored",
        ])
        .args(args);
    run(&mut cmd).context("tests failed")
}

/// Fails with `why` and the sudo hint unless running as root.
pub(crate) fn require_root(why: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{why}: run it as root (sudo cargo xtask ...)");
    }
    Ok(())
}

fn lint() -> Result<()> {
    build_ebpf()?;
    let root = workspace_root();
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["fmt", "--all", "--check"]))
    .context("cargo fmt --check failed: run `cargo fmt --all`")?;
    run(Command::new("cargo").current_dir(&root).args([
        "clippy",
        "--workspace",
        "--exclude",
        "drain-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
    .context("clippy (user crates) failed")?;
    // xtask's bench, demo and deb are compiled only with its `harness` feature.
    run(Command::new("cargo").current_dir(&root).args([
        "clippy",
        "--package",
        "xtask",
        "--features",
        "harness",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
    .context("clippy (xtask with its harness) failed")?;
    run(ebpf_cargo("clippy").args(["--", "-D", "warnings"]))
        .context("clippy (eBPF crate) failed")?;
    // The Ansible collection's Python and YAML: ansible-test sanity and ansible-lint,
    // pinned, in a virtualenv the script makes under target/ on first use.
    run(Command::new("bash").arg(root.join("ansible/lint.sh")))
        .context("linting the Ansible collection failed")
}

/// bpffs at /sys/fs/bpf: drain-user mounts it by itself, but the tests that load programs
/// without the CLI need it too.
fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return Ok(());
    }
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
        .context("mounting bpffs at /sys/fs/bpf failed")
}

/// The programs the integration tests drive besides drain itself: nginx and wrk for the
/// end-to-end drain under load, haproxy (the balancer in front of them), openssh-server (one
/// sshd per host of the fleet drill, which Ansible connects to) and python3-venv (the drill's
/// virtualenv with ansible-core), ss/ip (iproute2), nsenter/setpriv (util-linux), bpftool to
/// look at attached programs, strace to kill drain-user at chosen syscalls (the fault and
/// hardening tests), docker.io (the Docker test runs its own dockerd inside a test namespace:
/// dockerd, containerd, runc, iptables come with it), debootstrap and systemd-nspawn
/// (systemd-container) for the booted hosts (a Debian root file system with systemd as
/// PID 1: the drop-in and the role's systemd path). Installed with apt when missing (CI
/// machines start bare).
fn ensure_test_packages() -> Result<()> {
    // python3-venv ships no program of its own: ask Debian's python whether it can make one.
    let have_venv = || {
        Command::new("/usr/bin/python3")
            .args(["-c", "import ensurepip, venv"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    ensure_packages(&[
        ("nginx", have("nginx")),
        ("wrk", have("wrk")),
        ("haproxy", have("haproxy")),
        ("openssh-server", have("sshd")),
        ("python3-venv", have_venv()),
        ("iproute2", have("ss")),
        ("util-linux", have("nsenter")),
        ("bpftool", have("bpftool")),
        ("strace", have("strace")),
        // The published-port tests make Docker's DNAT with nft.
        ("nftables", have("nft")),
        // The package test reads the installed man page.
        ("man-db", have("man")),
        // systemd-socket-activate: the agent tests hand it its socket as a .socket unit does.
        ("systemd", have("systemd-socket-activate")),
        // /usr/bin/docker by path: another client may be installed elsewhere on PATH.
        ("docker.io", have("dockerd") && have("docker")),
        ("debootstrap", have("debootstrap")),
        ("systemd-container", have("systemd-nspawn")),
    ])
}

/// What the bench compares drain with (iptables brings iptables-legacy too), and the tools
/// it measures with: ethtool turns on the veth NAPI the flood needs, strace breaks a
/// command's time down by syscall.
#[cfg(feature = "harness")]
fn ensure_bench_packages() -> Result<()> {
    ensure_packages(&[
        ("iptables", have("iptables")),
        ("nftables", have("nft")),
        ("ethtool", have("ethtool")),
        ("strace", have("strace")),
        ("iproute2", have("ss")),
        ("bpftool", have("bpftool")),
    ])
}

/// Whether a program is installed in one of the usual directories.
pub(crate) fn have(bin: &str) -> bool {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(bin).exists())
}

/// Installs with apt the packages not present: (package, present) pairs. No daemon it
/// brings starts.
pub(crate) fn ensure_packages(wanted: &[(&str, bool)]) -> Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(_, present)| !present)
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing packages: {}", missing.join(" "));
    // Other apt users on the machine hold dpkg's lock for a while: wait for it.
    let lock_wait = ["-o", "DPkg::Lock::Timeout=600"];
    run(Command::new("apt-get")
        .args(lock_wait)
        .args(["update", "-qq"]))?;
    // Debian's maintainer scripts start nginx, haproxy and sshd on the host on install. A
    // policy-rc.d that answers 101 ("action forbidden") keeps them from starting at all; it
    // is removed again unless the machine already had one.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let own_policy = !policy.exists();
    if own_policy {
        std::fs::write(
            policy,
            "#!/bin/sh\n# cargo xtask test: no daemon starts on install\nexit 101\n",
        )
        .context("writing /usr/sbin/policy-rc.d")?;
        std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let installed = run(Command::new("apt-get")
        .args(lock_wait)
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| format!("installing {} failed", missing.join(" ")));
    if own_policy {
        let _ = std::fs::remove_file(policy);
    }
    installed?;
    // Belt and braces for a host where something started them anyway (a systemd whose
    // presets ignore policy-rc.d): the tests run their own instances inside namespaces,
    // and a host sshd or haproxy the test suite installed must not be left running or
    // enabled. Only daemons installed by this call are touched: an sshd the machine had
    // before is how somebody may be logged in.
    for (pkg, unit, pidfile) in [
        ("nginx", "nginx", "/run/nginx.pid"),
        ("haproxy", "haproxy", "/run/haproxy.pid"),
        ("openssh-server", "ssh", "/run/sshd.pid"),
        // A dockerd in the host's namespace would turn on ip_forward and set FORWARD to DROP.
        ("docker.io", "docker", "/run/docker.pid"),
        ("docker.io", "containerd", "/run/containerd/containerd.pid"),
    ] {
        if !missing.contains(&pkg) {
            continue;
        }
        let _ = Command::new("systemctl")
            .args(["disable", "--now", unit])
            .output();
        let _ = Command::new("update-rc.d").args([unit, "disable"]).output();
        if let Some(pid) = std::fs::read_to_string(pidfile)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    Ok(())
}

/// Runs a command, inheriting stdio; fails with the command line when it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} exited with {status}");
    }
    Ok(())
}

/// Runs a command and returns its stdout; fails when it cannot start or exits non-zero.
pub fn capture(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

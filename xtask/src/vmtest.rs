//! `cargo xtask vmtest`: drain's root integration tests on Debian's own kernels under QEMU.
//!
//! - [`kernels`]: the kernel packages (private apt configuration, lock file, download,
//!   modules);
//! - [`rootfs`]: the guest's Debian userland (debootstrap, cached);
//! - [`cpio`]: the initramfs format; the guest is the Debian root + the kernel's modules + the
//!   test binaries, three archives the kernel unpacks one after the other;
//! - [`qemu`]: the accelerator choice and one boot under a deadline, never leaving QEMU
//!   behind;
//! - [`report`]: the guest's results (one line per test on the second serial port) and the
//!   summary per kernel.
//!
//! In the guest each test runs alone (`--exact NAME --include-ignored --nocapture`) with a
//! deadline. A test whose kernel lacks a feature it needs prints one `drain-tests: NOT RUN:`
//! line (`drain_tests::kernel`) and counts as not run; on the host the same situation fails
//! the test, because only the guest's runner sets `DRAIN_TEST_MISSING_FEATURE=skip`.

mod cpio;
mod kernels;
mod qemu;
mod report;
mod rootfs;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

use crate::{run, target_dir, workspace_root};

pub struct Args {
    pub kernels: Vec<String>,
    pub quick: bool,
    pub refresh_lock: bool,
    pub timeout: u64,
    pub test_timeout: u64,
    pub cpus: u32,
    pub jobs: usize,
    pub args: Vec<String>,
}

/// `--quick`: the subset CI runs on every kernel it boots (TCG is ~10-30x slower than the
/// host; README's "Kernel matrix" gives the timings): (test binary, libtest filter).
const QUICK: &[(&str, &[&str])] = &[
    ("load", &["both_programs_pass_the_verifier"]),
    (
        "check",
        &[
            "check_passes_here_and_says_what_it_probed",
            "check_without_tcx_says_tc_takes_the_clsact_path",
        ],
    ),
    (
        "gate_cli",
        &[
            "new_connections_to_the_gated_port_are_dropped_other_ports_stay_open",
            "established_connections_keep_flowing_through_gate_on_and_off",
            "attach_tc_gates_the_same_way",
            "clsact_filters_are_judged_by_the_kernel_and_repaired",
            "gate_off_leaves_no_pins_links_or_programs",
            "status_counts_live_connections_and_refused_syns_per_port",
            "state_of_a_deleted_namespace_is_reaped_by_the_next_gate_on",
        ],
    ),
    (
        "prog_test_run",
        &[
            "ipv4_and_ipv6_syns_to_gated_and_other_ports",
            "ipv6_extension_headers",
            "truncation_at_every_offset",
            "allowlist",
        ],
    ),
    (
        "tracker",
        &[
            "a_recheck_puts_right_what_the_kernel_skipped",
            "connections_opened_before_gate_on_are_counted",
            "live_counts_equal_ss_through_churn_v4_v6_dual_stack",
            "wait_exits_0_after_the_last_connection_closes",
            "wait_times_out_with_3_listing_leftovers",
        ],
    ),
    (
        "wait_wake",
        &[
            "a_close_during_the_start_is_never_missed",
            "idle_wait_woken_by_the_last_close_and_idle_on_time",
        ],
    ),
    (
        "container",
        &[
            "published_port_is_never_falsely_drained",
            "new_forwarded_connections_are_followed",
        ],
    ),
    ("nginx_e2e", &[]),
    (
        "policy",
        &["reset_contract_xdp", "ttl_opens_the_gate_by_itself"],
    ),
];

/// Test binaries that cannot run in the guest, and why: they need the network (PyPI) or
/// things a kernel matrix does not test (packaging). Every other test binary runs there, so
/// a new test file joins the matrix by default.
const HOST_ONLY: &[(&str, &str)] = &[
    (
        "fleet",
        "sshd hosts rolled by ansible-core from PyPI: needs the network, host only",
    ),
    (
        "deploy_tooling",
        "the Ansible collection's smoke run (ansible-core from PyPI): host only",
    ),
    (
        "metrics",
        "parses with prometheus_client from PyPI: needs the network, host only",
    ),
    (
        "package",
        "builds and installs the Debian package (cargo-deb, dpkg, man): host only",
    ),
    (
        "docker",
        "a real dockerd (docker.io from apt) and the role's ansible-core from PyPI: host only",
    ),
    (
        "systemd",
        "boots a debootstrapped systemd under systemd-nspawn (apt, a cached root): host only",
    ),
    (
        "agent",
        "drives the agent through systemd-socket-activate and systemd-analyze (systemd from apt, which the guest cannot reach): host only",
    ),
];

/// Single tests that cannot run in the guest though their binary does: (binary, test, why).
/// The runner is told to skip them and the summary lists them.
const HOST_ONLY_TESTS: &[(&str, &str, &str)] = &[(
    "container",
    "container_target_by_name",
    "`--container NAME` asks a real dockerd (docker.io from apt, which the guest cannot reach): host only",
)];

pub fn run_matrix(a: Args) -> Result<()> {
    crate::require_root("the guest root is built with debootstrap and QEMU is installed with apt")?;
    let cache = target_dir().join("vmtest");
    fs::create_dir_all(&cache)?;
    if a.refresh_lock {
        kernels::refresh_lock(&cache)?;
        if a.kernels.is_empty() {
            return Ok(());
        }
    }
    let lines = select_kernels(&a.kernels)?;
    let started = Instant::now();

    // What runs: the test binaries, built on the host, and the release drain-user (what
    // ships; under TCG the debug build's `gate on` takes ~3x longer).
    crate::build(true)?;
    let all = build_tests()?;
    let (picked, filter) = split_args(&a.args)?;
    let mut skipped_bins = Vec::new();
    let mut bins: Vec<Selected> = if a.quick {
        ensure!(
            picked.is_empty() && filter.is_empty(),
            "--quick is a fixed subset: give either it or test arguments"
        );
        QUICK
            .iter()
            .map(|(n, f)| {
                let exe = exe_of(&all, n)?;
                Ok(Selected {
                    name: n.to_string(),
                    exe,
                    filter: f.iter().map(|s| s.to_string()).collect(),
                    skip: Vec::new(),
                })
            })
            .collect::<Result<_>>()?
    } else if picked.is_empty() {
        all.iter()
            .filter(|(n, _)| match HOST_ONLY.iter().find(|(h, _)| h == n) {
                Some((h, why)) => {
                    skipped_bins.push((h.to_string(), why.to_string()));
                    false
                }
                None => true,
            })
            .map(|(n, e)| Selected {
                name: n.clone(),
                exe: e.clone(),
                filter: filter.clone(),
                skip: Vec::new(),
            })
            .collect()
    } else {
        picked
            .iter()
            .map(|p| {
                Ok(Selected {
                    name: p.clone(),
                    exe: exe_of(&all, p)?,
                    filter: filter.clone(),
                    skip: Vec::new(),
                })
            })
            .collect::<Result<_>>()?
    };
    for b in &mut bins {
        for (bin, test, why) in HOST_ONLY_TESTS.iter().filter(|(bin, ..)| *bin == b.name) {
            b.skip.push(test.to_string());
            skipped_bins.push((format!("{bin}::{test}"), why.to_string()));
        }
    }
    // What each binary should run, listed on the host: the summary can then say which tests
    // a guest never reached.
    let mut expected = Vec::new();
    for b in &bins {
        let out = crate::capture(
            Command::new(&b.exe)
                .args(["--list", "--include-ignored"])
                .args(b.list_args()),
        )?;
        let names: Vec<&str> = out
            .lines()
            .filter_map(|l| l.strip_suffix(": test"))
            .collect();
        // A renamed test must not drop out of --quick unnoticed: each name there selects
        // at least one test.
        if a.quick {
            for f in &b.filter {
                ensure!(
                    names.iter().any(|n| n.contains(f.as_str())),
                    "--quick names {f:?} in {}, which has no such test: update QUICK in \
                     xtask/src/vmtest.rs",
                    b.name
                );
            }
        }
        for t in names {
            expected.push((b.name.clone(), t.to_owned()));
        }
    }
    ensure!(!expected.is_empty(), "the filter selects no test");

    qemu::ensure_installed()?;
    let (accel, why) = qemu::Accel::choose();
    let rootfs = rootfs::ensure(&cache)?;
    let prepared_at = started.elapsed();

    let rundir = RunDir::new(&cache)?;
    let payload = rundir.0.join("payload.cpio");
    // The harness's per-call deadlines, scaled for emulation.
    let slowdown = match accel {
        qemu::Accel::Tcg => 5,
        qemu::Accel::Kvm => 1,
    };
    write_payload(&payload, &rundir.0, &bins, a.test_timeout, slowdown)?;
    let logs = cache.join("logs");
    fs::create_dir_all(&logs)?;

    // The kernels first, one after the other (apt's private state is not shared safely),
    // then the boots, `jobs` at a time.
    let mut prepared = Vec::new();
    for line in lines {
        prepared.push((line, kernels::prepare(&cache, line.name)?));
    }
    let jobs = a.jobs.clamp(1, prepared.len());
    if jobs > 1 {
        eprintln!(
            "vmtest: {} kernels, {jobs} guests at a time ({} vCPUs each)",
            prepared.len(),
            a.cpus
        );
    }
    let ctx = BootCtx {
        accel,
        why: &why,
        cpus: a.cpus,
        timeout: a.timeout,
        rootfs: &rootfs,
        payload: &payload,
        rundir: &rundir.0,
        logs: &logs,
        expected: &expected,
    };

    // From here on a QEMU may run: SIGINT/SIGTERM end the run through the guards (before,
    // the default action is right: nothing needs cleaning that the next run does not).
    qemu::catch_signals();
    let next = AtomicUsize::new(0);
    let done: Mutex<Vec<(usize, report::Kernel)>> = Mutex::new(Vec::new());
    let errors: Vec<anyhow::Error> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..jobs)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        let Some((line, kernel)) = prepared.get(i) else {
                            return Ok(());
                        };
                        if qemu::INTERRUPTED.load(Ordering::SeqCst) {
                            bail!("interrupted");
                        }
                        match boot_one(&ctx, line, kernel) {
                            Ok(k) => done.lock().unwrap_or_else(|e| e.into_inner()).push((i, k)),
                            Err(e) => {
                                // One guest's error ends the others too (their guards kill
                                // QEMU): the run is not going to give a whole answer.
                                qemu::INTERRUPTED.store(true, Ordering::SeqCst);
                                return Err(e);
                            }
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .filter_map(|w| match w.join() {
                Ok(r) => r.err(),
                Err(_) => Some(anyhow::anyhow!("a vmtest worker thread panicked")),
            })
            .collect()
    });
    // The first error is the cause; the others are "interrupted" because of it.
    if let Some(e) = errors.into_iter().next() {
        return Err(e);
    }
    let mut done = done.into_inner().unwrap_or_else(|e| e.into_inner());
    done.sort_by_key(|(i, _)| *i);
    let results: Vec<report::Kernel> = done.into_iter().map(|(_, k)| k).collect();
    let failed = report::summary(&results, &skipped_bins, prepared_at, started.elapsed());
    if failed {
        bail!("tests failed on at least one kernel (see above)");
    }
    Ok(())
}

/// Guests at a time when `--jobs` is not given: one per host CPU, as many as the available
/// memory holds (a guest takes about 2 GiB: 1.5 GiB and twice its initramfs). A guest runs
/// its tests one after the other, so it keeps about one host CPU busy (measured under TCG
/// with 2 vCPUs: 105-110% of one CPU).
pub fn default_jobs() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let avail_gib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(2, |kb| kb >> 20);
    cpus.min((avail_gib / 3) as usize).max(1)
}

/// What every boot of one run shares.
struct BootCtx<'a> {
    accel: qemu::Accel,
    why: &'a str,
    cpus: u32,
    timeout: u64,
    rootfs: &'a Path,
    payload: &'a Path,
    rundir: &'a Path,
    logs: &'a Path,
    expected: &'a [(String, String)],
}

/// Boots one kernel with the run's payload and reads back its results.
fn boot_one(c: &BootCtx, line: &kernels::Line, kernel: &kernels::Kernel) -> Result<report::Kernel> {
    let t = Instant::now();
    let initrd = c.rundir.join(format!("initrd-{}", line.name));
    concat(&[c.rootfs, &kernel.modules_cpio, c.payload], &initrd)?;
    let initrd_mb = fs::metadata(&initrd)?.len() >> 20;
    let console = c.logs.join(format!("{}.console.log", line.name));
    let results_log = c.logs.join(format!("{}.results.log", line.name));
    eprintln!(
        "vmtest: booting {} ({}, {}) under {:?} ({}); console: {}, results: {}",
        line.name,
        kernel.release,
        line.about,
        c.accel,
        c.why,
        console.display(),
        results_log.display()
    );
    let mut tail = report::Tail::new(&results_log, line.name);
    let outcome = qemu::boot(
        &qemu::Boot {
            accel: c.accel,
            cpus: c.cpus,
            // The initramfs is unpacked into RAM and stays there.
            mem_mb: 1536 + 2 * initrd_mb as u32,
            vmlinuz: &kernel.vmlinuz,
            initrd: &initrd,
            cmdline: "console=ttyS0 panic=-1 random.trust_cpu=on mitigations=off \
                      net.ifnames=0 rdinit=/init",
            console_log: &console,
            results_log: &results_log,
            deadline: Duration::from_secs(c.timeout),
        },
        || tail.poll(),
    );
    let _ = fs::remove_file(&initrd);
    let ended = match outcome? {
        qemu::Outcome::Exited(s) => s,
        qemu::Outcome::DeadlinePassed => format!("killed at the {} s deadline", c.timeout),
    };
    report::Kernel::from_log(
        line.name,
        &kernel.release,
        &results_log,
        &console,
        c.expected,
        ended,
        t.elapsed(),
    )
}

/// A test binary to run in the guest, with the libtest arguments that select its tests.
struct Selected {
    name: String,
    exe: PathBuf,
    filter: Vec<String>,
    /// Tests of this binary the guest cannot run ([`HOST_ONLY_TESTS`]).
    skip: Vec<String>,
}

impl Selected {
    /// The libtest arguments that list this binary's tests: the filter and the skips.
    fn list_args(&self) -> Vec<String> {
        let mut v = self.filter.clone();
        for t in &self.skip {
            v.extend(["--skip".to_owned(), t.clone()]);
        }
        v
    }
}

fn exe_of(all: &[(String, PathBuf)], name: &str) -> Result<PathBuf> {
    all.iter()
        .find(|(n, _)| n == name)
        .map(|(_, e)| e.clone())
        .with_context(|| format!("no test binary named {name}"))
}

fn select_kernels(names: &[String]) -> Result<Vec<&'static kernels::Line>> {
    let names: Vec<&str> = if names.is_empty() {
        vec!["all"]
    } else {
        names.iter().map(String::as_str).collect()
    };
    let mut out: Vec<&kernels::Line> = Vec::new();
    for n in names {
        let matched: Vec<&kernels::Line> = if n == "all" {
            kernels::LINES.iter().collect()
        } else {
            kernels::LINES.iter().filter(|l| l.name == n).collect()
        };
        ensure!(
            !matched.is_empty(),
            "unknown kernel {n:?}: choose from {}, all",
            kernels::LINES
                .iter()
                .map(|l| l.name)
                .collect::<Vec<_>>()
                .join(", ")
        );
        for l in matched {
            if !out.iter().any(|o| o.name == l.name) {
                out.push(l);
            }
        }
    }
    Ok(out)
}

/// `--test NAME` picks test binaries (repeatable, like cargo test's); everything else is
/// handed to libtest (a name filter, `--exact`, `--skip X`).
fn split_args(args: &[String]) -> Result<(Vec<String>, Vec<String>)> {
    let mut picked = Vec::new();
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--test" {
            picked.push(
                it.next()
                    .context("--test needs a test binary name")?
                    .clone(),
            );
        } else if let Some(n) = a.strip_prefix("--test=") {
            picked.push(n.to_owned());
        } else {
            rest.push(a.clone());
        }
    }
    Ok((picked, rest))
}

/// Builds the integration test binaries and returns (name, executable) for each.
fn build_tests() -> Result<Vec<(String, PathBuf)>> {
    let out = Command::new("cargo")
        .current_dir(workspace_root())
        .args([
            "test",
            "--package",
            "drain-tests",
            "--tests",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    ensure!(out.status.success(), "building the test binaries failed");
    let mut bins = Vec::new();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" {
            continue;
        }
        let is_test = v["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, Some(exe), Some(name)) = (
            is_test,
            v["executable"].as_str(),
            v["target"]["name"].as_str(),
        ) {
            bins.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    bins.sort();
    ensure!(!bins.is_empty(), "cargo built no test binary");
    Ok(bins)
}

const INIT: &str = r#"#!/bin/bash
# PID 1 of the vmtest guest: mount what a booted Debian has, run the tests, power off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t bpf bpf /sys/fs/bpf
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
ip link set lo up
hostname vmtest
/vmtest/run > /dev/ttyS1 2>&1
sync
echo o > /proc/sysrq-trigger
sleep 30
"#;

/// The guest's runner: each selected test alone, with a deadline; one `@@VMTEST` line per
/// event, which the host parses (report.rs).
const RUNNER: &str = r#"#!/bin/bash
export DRAIN_USER=/vmtest/drain-user DRAIN_EBPF_OBJECT=/vmtest/drain.o
export DRAIN_TEST_MISSING_FEATURE=skip RUST_BACKTRACE=1 DRAIN_TEST_SLOWDOWN=$(cat /vmtest/slowdown)
T=$(cat /vmtest/test-timeout)
echo "@@VMTEST kernel $(uname -r)"
cd /tmp
for bin in /vmtest/bin/*; do
  b=${bin##*/}
  mapfile -t FILTER < "/vmtest/filter/$b"
  "$bin" --list --include-ignored "${FILTER[@]}" 2>&1 | sed -n 's/: test$//p' > /tmp/names
  while IFS= read -r name; do
    echo "@@VMTEST begin $b $name"
    s=$(date +%s%N)
    timeout -k 10 "$T" "$bin" --exact "$name" --include-ignored --test-threads=1 --nocapture \
      < /dev/null 2>&1 | tee /tmp/out
    rc=${PIPESTATUS[0]}
    ms=$(( ($(date +%s%N) - s) / 1000000 ))
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then st=timeout
    elif [ "$rc" -ne 0 ]; then st=failed
    # (with --nocapture the marker can follow libtest's `test NAME ... ` on its line)
    elif grep -q 'drain-tests: NOT RUN: ' /tmp/out; then st=notrun
    elif grep -q '^test result: ok. 1 passed' /tmp/out; then st=ok
    else st=failed; fi
    echo "@@VMTEST result $b $st $ms $name"
  done < /tmp/names
done
echo "@@VMTEST done"
"#;

/// The run's own archive: /init, the runner, the stripped test binaries, drain-user, the
/// kernel object, and the files the tests read from the source tree at the paths they were
/// compiled with.
fn write_payload(
    path: &Path,
    scratch: &Path,
    bins: &[Selected],
    test_timeout: u64,
    slowdown: u32,
) -> Result<()> {
    let mut c = cpio::Cpio::create(path)?;
    c.bytes("init", 0o755, INIT.as_bytes())?;
    c.bytes("vmtest/run", 0o755, RUNNER.as_bytes())?;
    c.bytes("vmtest/slowdown", 0o644, format!("{slowdown}\n").as_bytes())?;
    c.bytes(
        "vmtest/test-timeout",
        0o644,
        format!("{test_timeout}\n").as_bytes(),
    )?;
    let strip = |src: &Path, name: &str| -> Result<PathBuf> {
        let dst = scratch.join(name);
        run(Command::new("objcopy")
            .arg("--strip-debug")
            .arg(src)
            .arg(&dst))?;
        Ok(dst)
    };
    for b in bins {
        let s = strip(&b.exe, &b.name)?;
        c.file(&format!("vmtest/bin/{}", b.name), &s)?;
        fs::remove_file(s)?;
        let f: String = b.list_args().iter().map(|a| format!("{a}\n")).collect();
        c.bytes(&format!("vmtest/filter/{}", b.name), 0o644, f.as_bytes())?;
    }
    let du = strip(&target_dir().join("release/drain-user"), "drain-user")?;
    c.file("vmtest/drain-user", &du)?;
    fs::remove_file(du)?;
    c.file(
        "vmtest/drain.o",
        &target_dir()
            .join(crate::ebpf_target())
            .join("release/drain"),
    )?;
    let corpus = workspace_root().join("tests/corpus");
    c.tree(
        corpus.to_str().context("non-UTF-8 workspace path")?,
        &corpus,
    )?;
    c.finish()
}

fn concat(parts: &[&Path], out: &Path) -> Result<()> {
    let mut o = fs::File::create(out)?;
    for p in parts {
        std::io::copy(&mut fs::File::open(p)?, &mut o)
            .with_context(|| format!("copying {}", p.display()))?;
    }
    Ok(())
}

/// target/vmtest/run-<pid>: this run's scratch files, removed on drop; a previous run's
/// directory whose process is gone (SIGKILLed) is removed at the start of the next.
struct RunDir(PathBuf);

impl RunDir {
    fn new(cache: &Path) -> Result<Self> {
        for e in fs::read_dir(cache)?.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name
                .strip_prefix("run-")
                .and_then(|p| p.parse::<i32>().ok())
            {
                // SAFETY: kill with signal 0 only checks whether the process exists.
                let alive = unsafe { libc::kill(pid, 0) } == 0;
                if !alive {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = cache.join(format!("run-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// FNV-1a over the parts, as 16 hex digits: a stable cache key (std's hasher may change
/// between Rust releases).
pub fn fnv_hex(parts: impl IntoIterator<Item = String>) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for b in p.bytes().chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    format!("{h:016x}")
}

//! Booting one kernel under QEMU with a hard deadline, and never leaving QEMU behind: it
//! runs in its own process group, gets SIGKILL when xtask dies (PR_SET_PDEATHSIG), and the
//! guard kills the group on drop (normal end, error, deadline, Ctrl-C).

use std::{
    fs,
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// Which accelerator to use, decided explicitly: QEMU does not fall back to TCG when KVM
/// opens fine but cannot run the guest, and a paging-based KVM (kvm_pvm) without
/// hardware virtualization starts a guest that dies minutes later with "emulation failure".
#[derive(Clone, Copy, Debug)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn choose() -> (Self, String) {
        if let Ok(v) = std::env::var("DRAIN_VMTEST_ACCEL") {
            return match v.as_str() {
                "kvm" => (Self::Kvm, "DRAIN_VMTEST_ACCEL=kvm".into()),
                _ => (Self::Tcg, format!("DRAIN_VMTEST_ACCEL={v}")),
            };
        }
        if Path::new("/sys/module/kvm_pvm").exists() {
            return (
                Self::Tcg,
                "kvm_pvm (a paging-based KVM without hardware virtualization) crashes guests"
                    .into(),
            );
        }
        let hw = fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        });
        let dev = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        match (hw, dev) {
            (true, true) => (Self::Kvm, "vmx/svm and /dev/kvm present".into()),
            (false, _) => (Self::Tcg, "no vmx/svm CPU flag".into()),
            (true, false) => (Self::Tcg, "/dev/kvm cannot be opened".into()),
        }
    }
}

pub fn ensure_installed() -> Result<()> {
    crate::ensure_packages(&[("qemu-system-x86", crate::have("qemu-system-x86_64"))])
}

/// Set by SIGINT/SIGTERM while a guest runs: the wait loop stops and the guard cleans up.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Turns SIGINT and SIGTERM into [`INTERRUPTED`] so that guards run (the children in the
/// foreground process group get Ctrl-C themselves and fail, which also unwinds).
pub fn catch_signals() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

pub struct Boot<'a> {
    pub accel: Accel,
    pub cpus: u32,
    pub mem_mb: u32,
    pub vmlinuz: &'a Path,
    pub initrd: &'a Path,
    pub cmdline: &'a str,
    /// ttyS0: the kernel's console.
    pub console_log: &'a Path,
    /// ttyS1: what the guest's runner writes (results).
    pub results_log: &'a Path,
    pub deadline: Duration,
}

pub enum Outcome {
    /// QEMU exited (the guest powered off, or it crashed).
    Exited(String),
    DeadlinePassed,
}

/// A running QEMU; dropping it kills its whole process group and reaps it.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let pid = self.0.id() as i32;
        // SAFETY: kill has no memory-safety preconditions; the group is QEMU's own.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// Boots and waits until QEMU exits or the deadline passes; `progress` is called about
/// every second (it tails the results log).
pub fn boot(b: &Boot, mut progress: impl FnMut()) -> Result<Outcome> {
    let accel = match b.accel {
        Accel::Kvm => "kvm",
        // multi-threaded TCG: one host thread per guest CPU.
        Accel::Tcg => "tcg,thread=multi",
    };
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", accel, "-cpu", "max", "-machine", "q35"])
        .args(["-smp", &b.cpus.to_string(), "-m", &b.mem_mb.to_string()])
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-monitor",
            "none",
        ])
        .arg("-serial")
        .arg(format!("file:{}", b.console_log.display()))
        .arg("-serial")
        .arg(format!("file:{}", b.results_log.display()))
        .arg("-kernel")
        .arg(b.vmlinuz)
        .arg("-initrd")
        .arg(b.initrd)
        .args(["-append", b.cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            fs::File::create(b.console_log.with_extension("qemu-stderr"))
                .context("creating QEMU's stderr log")?,
        ))
        .process_group(0);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let mut guard = Guard(child);
    let start = Instant::now();
    let mut last = Instant::now();
    loop {
        if let Some(status) = guard.0.try_wait()? {
            progress();
            let err =
                fs::read_to_string(b.console_log.with_extension("qemu-stderr")).unwrap_or_default();
            let what = if status.success() {
                "exited".to_owned()
            } else {
                format!("exited with {status}: {}", err.trim())
            };
            return Ok(Outcome::Exited(what));
        }
        if INTERRUPTED.load(Ordering::SeqCst) {
            bail!("interrupted: QEMU killed");
        }
        if start.elapsed() > b.deadline {
            progress();
            return Ok(Outcome::DeadlinePassed);
        }
        if last.elapsed() >= Duration::from_secs(1) {
            progress();
            last = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

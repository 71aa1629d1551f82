//! What the bench sections share: commands run in a namespace and timed with their peak
//! RSS, CPU time of threads and kthreads, CPU pinning, interface counters, the bench's own
//! mount namespace.

use std::{
    ffi::CStr,
    fs::File,
    io::Read,
    os::{
        fd::AsRawFd,
        unix::process::{CommandExt, ExitStatusExt},
    },
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// A command whose child joins network namespace `ns` (a name under /var/run/netns) before
/// exec, and nothing else: unlike `ip netns exec` it keeps the host's /sys (and so bpffs),
/// and unlike `nsenter` it adds no process of its own to what is timed.
pub fn ns_cmd(ns: &str, program: &str) -> Result<Command> {
    let path = format!("/var/run/netns/{ns}");
    let f = File::open(&path).with_context(|| format!("opening {path}"))?;
    let mut c = Command::new(program);
    // SAFETY: setns is async-signal-safe; the closure owns the file, so the fd is valid in
    // the child until exec (where O_CLOEXEC closes it).
    unsafe {
        c.pre_exec(move || {
            if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(c)
}

/// One timed run of a command.
pub struct Timed {
    /// From just before fork to the moment wait4 returned.
    pub wall: Duration,
    /// The child's peak resident set (getrusage ru_maxrss), KiB.
    pub maxrss_kib: u64,
    /// The child's CPU time, user + system (getrusage): unlike the wall time, barely
    /// changed by other tenants of a loaded machine.
    pub cpu: Duration,
    pub status: ExitStatus,
    pub stdout: String,
}

impl Timed {
    pub fn ms(&self) -> f64 {
        self.wall.as_secs_f64() * 1e3
    }

    pub fn cpu_ms(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e3
    }
}

/// Runs `cmd` to the end (stdout captured, stderr discarded unless it fails) and reports
/// its wall time and peak RSS; fails when it exits non-zero.
pub fn timed(cmd: &mut Command) -> Result<Timed> {
    let t = timed_any(cmd)?;
    if !t.status.success() {
        bail!("{cmd:?} exited with {}: {}", t.status, t.stdout.trim());
    }
    Ok(t)
}

/// [`timed`] without the exit-status check.
pub fn timed_any(cmd: &mut Command) -> Result<Timed> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let mut stdout = String::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_string(&mut stdout)?;
    }
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid out-parameter.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, with valid out-pointers; std never waits for it
    // afterwards (the Child is dropped without wait).
    let rc = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    let wall = t0.elapsed();
    if rc < 0 {
        bail!("wait4 on {cmd:?}: {}", std::io::Error::last_os_error());
    }
    Ok(Timed {
        wall,
        maxrss_kib: ru.ru_maxrss as u64,
        cpu: [ru.ru_utime, ru.ru_stime]
            .iter()
            .map(|t| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000))
            .sum(),
        status: ExitStatus::from_raw(status),
        stdout,
    })
}

/// Runs `sh -c script` in namespace `ns`; fails with its output when it exits non-zero.
pub fn sh(ns: &str, script: &str) -> Result<String> {
    let out = ns_cmd(ns, "sh")?.args(["-c", script]).output()?;
    if !out.status.success() {
        bail!(
            "`{script}` in {ns} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Keeps the calling thread on `cpu`.
pub fn pin_thread(cpu: usize) -> Result<()> {
    // SAFETY: an all-zero cpu_set_t is empty; CPU_SET and sched_setaffinity on the calling
    // thread with a valid set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
            bail!("pinning to CPU {cpu}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Nanoseconds the task `tid` (a thread or kthread; "thread-self" for the caller) has run
/// on a CPU: the first field of /proc/<tid>/schedstat, which the scheduler keeps exactly,
/// unlike the tick-sampled utime/stime.
pub fn cpu_ns(tid: &str) -> Result<u64> {
    let p = format!("/proc/{tid}/schedstat");
    let s = std::fs::read_to_string(&p).with_context(|| format!("reading {p}"))?;
    s.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{p}: {s}"))
}

/// Pid of the kthread named exactly `comm` (`ksoftirqd/1`).
pub fn kthread(comm: &str) -> Result<String> {
    for e in std::fs::read_dir("/proc")?.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == comm) {
            return Ok(name.into_owned());
        }
    }
    bail!("no kthread named {comm}")
}

/// utime + stime of process `pid`, in seconds (from /proc/PID/stat; clock ticks).
pub fn process_cpu_s(pid: u32) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised comm; utime and stime are fields 14 and 15.
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

/// Packets device `dev` in `ns` has received (`ip -s link`: on a veth, every frame its NAPI
/// consumed, whatever the XDP verdict).
pub fn rx_packets(ns: &str, dev: &str) -> Result<u64> {
    let out = ns_cmd(ns, "ip")?
        .args(["-j", "-s", "link", "show", "dev", dev])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("ip -j -s link show dev {dev} in {ns}"))?;
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .with_context(|| format!("no rx packet count for {dev}: {v}"))
}

/// A counter of /proc/net/snmp (`Tcp`, `OutRsts`) in namespace `ns`.
pub fn snmp(ns: &str, proto: &str, field: &str) -> Result<u64> {
    let text = sh(ns, "cat /proc/net/snmp")?;
    let mut lines = text.lines().filter(|l| l.starts_with(&format!("{proto}:")));
    let (names, values) = (lines.next(), lines.next());
    let (Some(names), Some(values)) = (names, values) else {
        bail!("no {proto} lines in /proc/net/snmp");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == field)
        .and_then(|(_, v)| v.parse().ok())
        .with_context(|| format!("no {proto} {field} in /proc/net/snmp"))
}

/// What every section gets: the binary under test and how big to make things.
pub struct Ctx {
    pub bin: std::path::PathBuf,
    /// `--smoke`: tiny sizes, every section once (CI), nothing written to `bench/`.
    pub smoke: bool,
}

impl Ctx {
    /// `full` for a full run, `smoke` for `--smoke`.
    pub fn pick<T>(&self, full: T, smoke: T) -> T {
        if self.smoke {
            smoke
        } else {
            full
        }
    }

    /// drain-user in namespace `ns`.
    pub fn drain(&self, ns: &str) -> Result<Command> {
        ns_cmd(
            ns,
            self.bin.to_str().context("drain-user path is not UTF-8")?,
        )
    }

    /// `drain-user gate on <args>` in `ns`; the gate goes off when the guard drops.
    pub fn gate_on(&self, ns: &str, args: &[&str]) -> Result<Gate> {
        let mut c = self.drain(ns)?;
        c.args(["gate", "on"]).args(args);
        timed(&mut c)?;
        Ok(Gate {
            off: Some(self.drain(ns)?),
        })
    }
}

/// A gate turned on by the bench; dropping it runs `gate off` (errors printed).
pub struct Gate {
    off: Option<Command>,
}

impl Gate {
    /// `gate off` now, timed.
    pub fn off(mut self) -> Result<Timed> {
        let mut c = self.off.take().expect("gate off runs once");
        c.args(["gate", "off"]);
        timed(&mut c)
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        if let Some(mut c) = self.off.take() {
            if let Err(e) = timed(c.args(["gate", "off"])) {
                eprintln!("bench: gate off: {e:#}");
            }
        }
    }
}

/// Moves the bench into a mount namespace of its own with a fresh bpffs at /sys/fs/bpf and
/// a fresh root-only tmpfs on drain's lock directory (/run/drain), so drain-user runs here
/// neither wait for the host-wide lock of other drain runs on the machine (parallel test
/// suites) nor see their pins, and the bench leaves nothing in the host's bpffs. Must run
/// while the process has one thread (unshare(CLONE_NEWNS) refuses threads that share
/// their filesystem attributes).
pub fn isolate() -> Result<()> {
    let mount = |src: &CStr, target: &CStr, fs: &CStr, flags, data: Option<&CStr>| {
        let data = data.map_or(std::ptr::null(), |d| d.as_ptr().cast());
        // SAFETY: mount(2) with valid NUL-terminated strings (data may be null).
        let rc = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), fs.as_ptr(), flags, data) };
        if rc != 0 {
            bail!(
                "mount {} on {}: {}",
                fs.to_string_lossy(),
                target.to_string_lossy(),
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    };
    // SAFETY: unshare has no memory-safety preconditions.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        bail!(
            "unshare(CLONE_NEWNS): {} (needs root)",
            std::io::Error::last_os_error()
        );
    }
    // Nothing mounted from here on propagates back to the host.
    mount(c"none", c"/", c"", libc::MS_REC | libc::MS_PRIVATE, None)?;
    mount(c"bpf", c"/sys/fs/bpf", c"bpf", 0, Some(c"mode=0700"))?;
    // drain-user takes its lock there (and checks that the directory is root-only).
    std::fs::create_dir_all("/run/drain")?;
    mount(c"tmpfs", c"/run/drain", c"tmpfs", 0, Some(c"mode=0700"))
}

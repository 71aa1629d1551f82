//! Booted hosts: a Debian 12 root file system with systemd as PID 1, booted by
//! `systemd-nspawn` inside a network namespace the test made, so that units, drop-ins and
//! `systemctl` run exactly as on a real host.
//!
//! - The root file system is built once by debootstrap (from the Debian archive apt uses)
//!   under `target/booted/`, keyed by its package list ([`PACKAGES`]); a file lock makes two
//!   test processes that start together build it once. Each boot gets an overlayfs upper
//!   layer of its own on top of it: nothing a test does reaches the cache.
//! - Each container: systemd as PID 1 (`--boot`), the test's network namespace
//!   (`--network-namespace-path`), a fresh bpffs instance bound at `/sys/fs/bpf` (systemd
//!   mounts none in a container, and /sys is read-only there), and the freshly built
//!   drain-user bound read-only at `/usr/bin/drain-user` (bookworm's glibc is the host's).
//! - nspawn is started from a cgroup of the test's own in both hierarchies of this hybrid
//!   layout (`--keep-unit`: no machined and no system bus here, `--register=no`), so that
//!   every process of the container can be found and killed, and nothing is left at the
//!   cgroup root.
//! - Flags that are not optional: `--system-call-filter='bpf perf_event_open'` (nspawn's
//!   seccomp filter makes bpf(2) fail with EPERM even with CAP_BPF) and
//!   `--capability=CAP_BPF,CAP_NET_ADMIN,CAP_PERFMON,CAP_SYS_ADMIN`. Processes entered with
//!   nsenter skip nspawn's seccomp filter: what must be proven under the filter (the
//!   drop-in) runs from a service, which is what it is.
//! - Drop (also while unwinding): SIGTERM to nspawn (the container halts), SIGKILL to its
//!   process group and to anything left in its cgroups, then unmount the overlay and the
//!   bpffs (which frees every pin), remove the cgroups depth-first and the directory. The
//!   network namespace belongs to the caller (e.g. a [`crate::netns::NetNsPair`] that drops
//!   after the container).

use std::{
    fs,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use crate::web::{kill_group, run_ok, wait_until};

/// What the root file system holds besides debootstrap's minbase: systemd as init (and
/// systemctl/journalctl), dbus (systemd's services expect it), nginx (the service the
/// drop-in drains), iproute2 (`ss`, for units that wait for a listener), openssh-server and
/// python3 (a booted fleet host is managed by Ansible over SSH, whose modules run in Python;
/// python3 also serves the generic drain unit's non-nginx service).
pub const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "nginx",
    "iproute2",
    "openssh-server",
    "python3",
];
const SUITE: &str = "bookworm";

/// The cgroup hierarchies of this hybrid layout that nspawn's cgroup must exist in.
const CGROUP_ROOTS: [&str; 2] = ["/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified"];

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    )
}

/// The Debian archive the host's apt uses for the main suite (deb822 `.sources` or a
/// one-line `sources.list`): debootstrap must fetch from where the host is allowed to.
fn debian_mirror() -> String {
    let mut files: Vec<PathBuf> = fs::read_dir("/etc/apt/sources.list.d")
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files.insert(0, PathBuf::from("/etc/apt/sources.list"));
    for f in files {
        let text = fs::read_to_string(&f).unwrap_or_default();
        // deb822 stanzas: URIs + Suites.
        for stanza in text.split("\n\n") {
            let field = |k: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
            };
            if let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:")) {
                if suites.split_whitespace().any(|s| s == SUITE) {
                    if let Some(u) = uris.split_whitespace().next() {
                        return u.to_string();
                    }
                }
            }
        }
        // One-line format: deb [opts] URI SUITE components.
        for l in text.lines().map(str::trim) {
            let f: Vec<&str> = l
                .split_whitespace()
                .filter(|w| !w.starts_with('['))
                .collect();
            if f.len() >= 3 && f[0] == "deb" && f[2] == SUITE {
                return f[1].to_string();
            }
        }
    }
    panic!("no apt source for Debian {SUITE} in /etc/apt: debootstrap has nowhere to fetch from");
}

/// Installs `pkgs` with apt when `present` is false (the CI machine starts without them).
fn ensure_installed(present: bool, pkgs: &[&str]) {
    if present {
        return;
    }
    eprintln!("booted: installing {}", pkgs.join(" "));
    let apt = |args: &[&str]| {
        run_ok(
            Command::new("apt-get")
                .args(["-o", "DPkg::Lock::Timeout=600"])
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    apt(&["update", "-qq"]);
    let mut all = vec!["install", "-y", "-qq", "--no-install-recommends"];
    all.extend_from_slice(pkgs);
    apt(&all);
}

/// The cached root file system: built on first use (about a minute), then reused. The
/// directory name carries a hash of [`PACKAGES`], so a changed list builds a new one.
pub fn rootfs() -> PathBuf {
    static IN_PROCESS: Mutex<()> = Mutex::new(());
    let _g = IN_PROCESS.lock().unwrap_or_else(|e| e.into_inner());
    crate::require_root();
    ensure_installed(
        Path::new("/usr/sbin/debootstrap").exists()
            && Path::new("/usr/bin/systemd-nspawn").exists(),
        &["debootstrap", "systemd-container"],
    );
    let base = target_dir().join("booted");
    fs::create_dir_all(&base).unwrap();
    let lock = fs::File::create(base.join("rootfs.lock")).unwrap();
    // SAFETY: flock on an fd we own; released when `lock` is closed.
    let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
    let list = PACKAGES.join(",");
    // FNV-1a: a stable name for the list, no dependency needed.
    let hash = list.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let root = base.join(format!("{SUITE}-{hash:016x}"));
    if root.join(".drain-complete").exists() {
        return root;
    }
    let tmp = base.join(format!("{SUITE}-{hash:016x}.tmp"));
    // A debootstrap killed half-way leaves /proc and /sys mounted in its tree: unmount
    // them (deepest first) before removing it.
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut inside: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| Path::new(m).starts_with(&tmp))
        .collect();
    inside.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in inside {
        umount(Path::new(m));
    }
    let _ = fs::remove_dir_all(&tmp);
    let mirror = debian_mirror();
    eprintln!(
        "booted: debootstrap {SUITE} ({list}) into {}",
        root.display()
    );
    let t = Instant::now();
    run_ok(
        Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={list}"), SUITE])
            .arg(&tmp)
            .arg(&mirror),
    );
    prepare_rootfs(&tmp);
    fs::write(tmp.join(".drain-complete"), &list).unwrap();
    fs::rename(&tmp, &root).unwrap();
    eprintln!(
        "booted: root file system built in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    root
}

/// What every container needs and the packages do not set up: no package caches, no units
/// that cannot work in a container, an empty machine-id (each boot makes its own).
fn prepare_rootfs(root: &Path) {
    for d in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        for e in fs::read_dir(root.join(d)).into_iter().flatten().flatten() {
            if e.path().is_file() {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    // A timer that would run apt and man-db jobs mid-test.
    for unit in [
        "apt-daily.timer",
        "apt-daily-upgrade.timer",
        "man-db.timer",
        "e2scrub_all.timer",
        "fstrim.timer",
    ] {
        let link = root.join("etc/systemd/system").join(unit);
        let _ = fs::remove_file(&link);
        let _ = std::os::unix::fs::symlink("/dev/null", &link);
    }
    let _ = fs::write(root.join("etc/machine-id"), "");
}

/// Debian's nginx (its own nginx.service) with the tests' site in `dir`/html: pooled
/// keep-alive connections last until the client closes them (like a balancer's pool),
/// `/healthz`, `/version` (`version`), the index page, and `/slow/<s>.bin` downloads of
/// `s` seconds at [`crate::web::SLOW_RATE`] (s in [`crate::web::SLOW_SECS`], longer than
/// the 5 s Debian's unit gives a graceful stop, and 3, shorter). Files to pass to
/// [`BootOpts::files`].
pub fn nginx_site(dir: &str, version: &str) -> Vec<(String, Vec<u8>)> {
    let rate = crate::web::SLOW_RATE;
    let conf = format!(
        "user www-data;
worker_processes 1;
pid /run/nginx.pid;
error_log /var/log/nginx/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type text/plain;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {{
        listen 80;
        root {dir}/html;
        location = /healthz {{ return 200 \"ok\\n\"; }}
        location /slow/ {{ limit_rate {rate}; }}
        location / {{ index index.html; }}
    }}
}}
"
    );
    let mut files = vec![
        ("/etc/nginx/nginx.conf".to_string(), conf.into_bytes()),
        (
            format!("{dir}/html/index.html"),
            format!("<html><body>drain test site, {version}</body></html>\n").into_bytes(),
        ),
        (
            format!("{dir}/html/version"),
            format!("{version}\n").into_bytes(),
        ),
    ];
    for secs in crate::web::SLOW_SECS.iter().chain(&[3]) {
        files.push((
            format!("{dir}/html/slow/{secs}.bin"),
            vec![b's'; rate * *secs as usize],
        ));
    }
    files
}

/// How one container is booted.
pub struct BootOpts<'a> {
    /// The network namespace (a name under /run/netns) the container joins.
    pub netns: &'a str,
    /// Whether drain-user is bound in at /usr/bin/drain-user.
    pub drain_user: bool,
    /// Files written into the container before it boots (path inside, content).
    pub files: Vec<(String, Vec<u8>)>,
}

/// One booted container; see the module docs.
pub struct Booted {
    pub name: String,
    pub netns: String,
    dir: PathBuf,
    merged: PathBuf,
    bpffs: PathBuf,
    cgroup: String,
    nspawn: Option<Child>,
    /// The container's PID 1, as the host sees it.
    pub leader: i32,
    overlay_mounted: bool,
    bpffs_mounted: bool,
    cgroups_made: bool,
    /// Seconds from spawning nspawn until `systemctl is-system-running` said running.
    pub boot_secs: f64,
}

impl Booted {
    pub fn boot(opts: BootOpts) -> Self {
        let lower = rootfs();
        sweep_stale();
        let (_, _, suffix) = crate::unique_suffix();
        let name = format!("drain-{suffix}");
        let dir = std::env::temp_dir().join(format!("drain-boot-{suffix}"));
        let _ = fs::remove_dir_all(&dir);
        let mut b = Booted {
            name: name.clone(),
            netns: opts.netns.to_string(),
            merged: dir.join("root"),
            bpffs: dir.join("bpf"),
            dir: dir.clone(),
            cgroup: format!("drain-boot-{suffix}"),
            nspawn: None,
            leader: 0,
            overlay_mounted: false,
            bpffs_mounted: false,
            cgroups_made: false,
            boot_secs: 0.0,
        };
        // From here on a panic drops `b`, which undoes whatever was done.
        for d in ["upper", "work", "root", "bpf"] {
            fs::create_dir_all(dir.join(d)).unwrap();
        }
        run_ok(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o"])
                .arg(format!(
                    "lowerdir={},upperdir={},workdir={}",
                    lower.display(),
                    dir.join("upper").display(),
                    dir.join("work").display()
                ))
                .arg(&b.merged),
        );
        b.overlay_mounted = true;
        run_ok(
            Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(&b.bpffs),
        );
        b.bpffs_mounted = true;
        b.write("/etc/hostname", name.as_bytes());
        for (path, content) in &opts.files {
            b.write(path, content);
        }
        for root in CGROUP_ROOTS {
            fs::create_dir(Path::new(root).join(&b.cgroup))
                .unwrap_or_else(|e| panic!("mkdir {root}/{}: {e}", b.cgroup));
            b.cgroups_made = true;
        }
        let mut cmd = Command::new("/bin/sh");
        // The shell moves itself into the test's cgroups, then becomes nspawn.
        cmd.arg("-c")
            .arg(
                "echo $$ > \"$1/cgroup.procs\" && echo $$ > \"$2/cgroup.procs\" && shift 2 && exec \"$@\"",
            )
            .arg("sh")
            .arg(Path::new(CGROUP_ROOTS[0]).join(&b.cgroup))
            .arg(Path::new(CGROUP_ROOTS[1]).join(&b.cgroup))
            .arg("systemd-nspawn")
            .args([
                "--quiet",
                "--boot",
                "--register=no",
                "--keep-unit",
                "--console=passive",
                "--link-journal=no",
                "--resolv-conf=off",
                "--timezone=off",
                "--system-call-filter=bpf perf_event_open",
                "--capability=CAP_BPF,CAP_NET_ADMIN,CAP_PERFMON,CAP_SYS_ADMIN",
            ])
            .arg(format!("--machine={name}"))
            .arg(format!("--network-namespace-path=/run/netns/{}", opts.netns))
            .arg(format!("--bind={}:/sys/fs/bpf", b.bpffs.display()))
            .arg("-D")
            .arg(&b.merged);
        if opts.drain_user {
            let bin = fs::canonicalize(crate::drain_user_bin()).unwrap();
            cmd.arg(format!("--bind-ro={}:/usr/bin/drain-user", bin.display()));
        }
        let log = fs::File::create(dir.join("nspawn.log")).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0);
        // A test process that dies without unwinding (SIGKILL) must not leave the
        // container running: nspawn gets SIGTERM (and halts it) when the thread that
        // started it is gone. The next boot sweeps the mounts and cgroups (sweep_stale).
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let t = Instant::now();
        let child = cmd.spawn().expect("start systemd-nspawn");
        let nspawn_pid = child.id() as i32;
        b.nspawn = Some(child);
        wait_until("the container's PID 1", Duration::from_secs(20), || {
            b.assert_nspawn_running();
            b.leader = container_init(nspawn_pid).unwrap_or(0);
            b.leader > 0
        });
        // running: every unit started. degraded (some unit failed) is refused: the root
        // file system has nothing that fails in a container, so a failed unit is a broken
        // unit of the test (a drop-in nginx cannot start with), said at once with its name.
        let mut state = String::new();
        wait_until(
            "systemctl is-system-running: running",
            Duration::from_secs(60),
            || {
                b.assert_nspawn_running();
                state =
                    String::from_utf8_lossy(&b.exec(&["systemctl", "is-system-running"]).stdout)
                        .trim()
                        .to_string();
                if state == "degraded" {
                    panic!(
                        "{name} booted degraded; failed units:\n{}\n{}",
                        b.sh("systemctl --failed --no-legend; true"),
                        b.sh("journalctl -b -p warning --no-pager | tail -40; true"),
                    );
                }
                state == "running"
            },
        );
        b.boot_secs = t.elapsed().as_secs_f64();
        b
    }

    fn assert_nspawn_running(&mut self) {
        let child = self.nspawn.as_mut().unwrap();
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "systemd-nspawn exited ({st}); its log:\n{}",
                fs::read_to_string(self.dir.join("nspawn.log")).unwrap_or_default()
            );
        }
    }

    /// The container's root as the host sees it (the overlay).
    pub fn root(&self) -> &Path {
        &self.merged
    }

    /// The container's bpffs (its /sys/fs/bpf) as the host sees it.
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// Writes a file inside the container (parents made), through the overlay.
    pub fn write(&self, path: &str, content: impl AsRef<[u8]>) {
        let p = self.merged.join(path.trim_start_matches('/'));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, content).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
    }

    pub fn remove(&self, path: &str) {
        let p = self.merged.join(path.trim_start_matches('/'));
        fs::remove_file(&p).unwrap_or_else(|e| panic!("removing {}: {e}", p.display()));
    }

    /// `nsenter -t <PID 1> -a <argv>`: a command in every namespace of the container (it
    /// skips nspawn's seccomp filter: see the module docs).
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("-t")
            .arg(self.leader.to_string())
            .arg("-a")
            .args(argv)
            .stdin(Stdio::null());
        c
    }

    pub fn exec(&self, argv: &[&str]) -> Output {
        self.command(argv)
            .output()
            .unwrap_or_else(|e| panic!("nsenter into {}: {e}", self.name))
    }

    /// `sh -c script` inside; its stdout (panics unless it exits 0).
    pub fn sh(&self, script: &str) -> String {
        run_ok(&mut self.command(&["/bin/sh", "-c", script]))
    }

    /// `systemctl <args>` inside; panics with the unit's journal unless it exits 0.
    pub fn systemctl(&self, args: &[&str]) {
        let mut argv = vec!["systemctl"];
        argv.extend_from_slice(args);
        let out = self.exec(&argv);
        assert!(
            out.status.success(),
            "systemctl {} in {} failed ({}): {}\njournal:\n{}",
            args.join(" "),
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.sh("journalctl -b --no-pager | tail -60; true")
        );
    }

    /// `systemctl is-active <unit>` inside.
    pub fn is_active(&self, unit: &str) -> String {
        String::from_utf8_lossy(&self.exec(&["systemctl", "is-active", unit]).stdout)
            .trim()
            .to_string()
    }

    /// The journal of `units` since boot, in order: (µs since boot, message) (`-o json`
    /// parsed: the units' own lines, drain-user's included, and what systemd logs about
    /// them).
    pub fn journal(&self, units: &[&str]) -> Vec<(u64, String)> {
        let mut argv = vec!["journalctl", "-b", "-o", "json", "--no-pager"];
        for u in units {
            argv.extend(["-u", u]);
        }
        argv.push("--output-fields=MESSAGE,__MONOTONIC_TIMESTAMP");
        let out = run_ok(&mut self.command(&argv));
        out.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| {
                let t = v["__MONOTONIC_TIMESTAMP"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                // A message with bytes that are not UTF-8 comes as an array of numbers.
                let msg = match &v["MESSAGE"] {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Array(a) => String::from_utf8_lossy(
                        &a.iter()
                            .filter_map(|x| x.as_u64().map(|b| b as u8))
                            .collect::<Vec<_>>(),
                    )
                    .into_owned(),
                    other => other.to_string(),
                };
                (t, msg)
            })
            .collect()
    }

    /// `drain-user status --json` inside (bound in, the container's bpffs).
    pub fn drain_status(&self) -> serde_json::Value {
        crate::web::parse_status(&run_ok(&mut self.command(&[
            "/usr/bin/drain-user",
            "status",
            "--json",
        ])))
    }

    /// Pin directories in the container's bpffs (as the host sees it).
    pub fn pins(&self) -> Vec<PathBuf> {
        fn walk(p: &Path, out: &mut Vec<PathBuf>) {
            for e in fs::read_dir(p).into_iter().flatten().flatten() {
                out.push(e.path());
                if e.path().is_dir() {
                    walk(&e.path(), out);
                }
            }
        }
        let mut v = Vec::new();
        walk(&self.bpffs, &mut v);
        v
    }

    /// Every pid in this container's cgroup tree (unified hierarchy).
    fn cgroup_pids(&self) -> Vec<i32> {
        fn walk(p: &Path, out: &mut Vec<i32>) {
            out.extend(
                fs::read_to_string(p.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.trim().parse::<i32>().ok()),
            );
            for e in fs::read_dir(p).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    walk(&e.path(), out);
                }
            }
        }
        let mut v = Vec::new();
        for root in CGROUP_ROOTS {
            walk(&Path::new(root).join(&self.cgroup), &mut v);
        }
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// Tears down what a test process that died without unwinding (SIGKILL) left: its
/// containers' directories under the temp dir name their owner's pid; for each whose owner
/// is gone, whatever still runs in its cgroups is killed, its overlay and bpffs unmounted,
/// its cgroups and directory removed (what [`Booted`]'s Drop would have done).
fn sweep_stale() {
    let Ok(dir) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(suffix) = name.strip_prefix("drain-boot-") else {
            continue;
        };
        let Some(pid) = suffix
            .split('x')
            .next()
            .and_then(|p| i32::from_str_radix(p, 16).ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!(
            "booted: sweeping {} (its test process {pid} is gone)",
            e.path().display()
        );
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mounted = |p: &Path| {
            mounts
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some(&*p.to_string_lossy()))
        };
        drop(Booted {
            name: name.clone(),
            netns: String::new(),
            merged: e.path().join("root"),
            bpffs: e.path().join("bpf"),
            overlay_mounted: mounted(&e.path().join("root")),
            bpffs_mounted: mounted(&e.path().join("bpf")),
            dir: e.path(),
            cgroup: name.clone(),
            nspawn: None,
            leader: 0,
            cgroups_made: true,
            boot_secs: 0.0,
        });
    }
    // The test namespaces of such a process (the harness names them drain-t-<pid>x... and
    // drain-f-<pid>x...): a booted container joined one, and deleting it also removes
    // the XDP programs attached inside.
    let out = Command::new("ip").args(["netns", "list"]).output();
    let list = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    for ns in list.unwrap_or_default().lines() {
        let ns = ns.split_whitespace().next().unwrap_or("");
        let Some(rest) = ns
            .strip_prefix("drain-t-")
            .or_else(|| ns.strip_prefix("drain-f-"))
        else {
            continue;
        };
        let Some(pid) = rest
            .split('x')
            .next()
            .and_then(|p| i32::from_str_radix(p, 16).ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("booted: deleting namespace {ns} (its test process {pid} is gone)");
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// The child of `nspawn_pid` that is PID 1 of its own PID namespace (the container's init).
fn container_init(nspawn_pid: i32) -> Option<i32> {
    for e in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.split_whitespace().collect::<Vec<_>>())
        };
        let ppid = field("PPid:").and_then(|v| v.first()?.parse::<i32>().ok());
        let nspid = field("NSpid:").unwrap_or_default();
        if ppid == Some(nspawn_pid) && nspid.len() >= 2 && nspid.last() == Some(&"1") {
            return Some(pid);
        }
    }
    None
}

/// Removes a cgroup directory and everything below it, deepest first (cgroupfs refuses to
/// remove a directory with children).
fn remove_cgroup(p: &Path) {
    for e in fs::read_dir(p).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            remove_cgroup(&e.path());
        }
    }
    if let Err(e) = fs::remove_dir(p) {
        if e.kind() != std::io::ErrorKind::NotFound {
            eprintln!("removing cgroup {}: {e}", p.display());
        }
    }
}

fn umount(p: &Path) {
    let t = Instant::now();
    loop {
        match Command::new("umount").arg(p).output() {
            Ok(o) if o.status.success() => return,
            Ok(o) if t.elapsed() > Duration::from_secs(5) => {
                eprintln!(
                    "umount {}: {}; detaching it lazily",
                    p.display(),
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                let _ = Command::new("umount").arg("-l").arg(p).output();
                return;
            }
            Err(e) => {
                eprintln!("umount {}: {e}", p.display());
                return;
            }
            Ok(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        if let Some(mut child) = self.nspawn.take() {
            let pid = child.id() as i32;
            // SIGTERM: nspawn asks the container's systemd to halt (SIGRTMIN+3).
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let t = Instant::now();
            while matches!(child.try_wait(), Ok(None)) && t.elapsed() < Duration::from_secs(15) {
                thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                eprintln!("{}: nspawn ignored SIGTERM for 15 s: killing it", self.name);
            }
            kill_group(pid, libc::SIGKILL);
            let _ = child.wait();
        }
        if self.cgroups_made {
            // Whatever is still in the container's cgroups (nothing after a clean halt).
            let t = Instant::now();
            loop {
                let left = self.cgroup_pids();
                if left.is_empty() || t.elapsed() > Duration::from_secs(5) {
                    break;
                }
                for p in left {
                    // SAFETY: as above.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        if self.overlay_mounted {
            umount(&self.merged);
        }
        if self.bpffs_mounted {
            umount(&self.bpffs);
        }
        if self.cgroups_made {
            for root in CGROUP_ROOTS {
                remove_cgroup(&Path::new(root).join(&self.cgroup));
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("removing {}: {e}", self.dir.display());
        }
    }
}

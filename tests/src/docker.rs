//! A real Docker for end-to-end tests: Debian's dockerd (package `docker.io`, which `cargo
//! xtask test` installs) started by the test inside a network namespace the test made, with
//! everything of its own, and the test site's nginx as a container image built without a
//! registry.
//!
//! Why it is started the way it is:
//! - **Inside a test namespace, never the host's**: dockerd turns on `ip_forward`, sets the
//!   FORWARD policy to DROP and adds NAT rules in the namespace it runs in, and leaves them.
//! - **`nsenter --net`, not `ip netns exec`**: the latter remounts /sys, and dockerd then
//!   fails with "Devices cgroup isn't mounted".
//! - **Its own everything**: `-H unix:///run/<id>/docker.sock`, `--data-root`, `--exec-root`
//!   (its containerd, its netns handles), `--pidfile`, `--cgroup-parent /<id>` (cgroupfs
//!   driver: no systemd here), and a bridge and address pool in 198.18.0.0/15 chosen apart
//!   from the test pair's own addresses. Two of these run side by side without noticing.
//! - **`/usr/bin/docker` by path**: another, newer client may come first on PATH.
//!
//! The image ([`nginx_image_tar`]): the host's own `/usr/sbin/nginx`, the libraries `ldd`
//! lists, a passwd/group with `nobody`, and the test site of [`crate::web::write_site`]
//! (same endpoints as the host nginx of the other tests: `/`, `/version`, `/healthz`,
//! `/slow/<s>.bin`). Packed once into a tar under the build directory (`target/docker/`),
//! rebuilt when nginx or the site changes, and `docker import`ed by each dockerd (~0.2 s).
//! A missing image would make docker try its default registry, which fails at once here.
//!
//! Teardown ([`Dockerd`]'s drop, also while unwinding): `docker rm -f` every container,
//! SIGTERM dockerd by pid and wait (SIGKILL past a deadline), kill whatever still runs in its
//! cgroups or names its exec root (containerd-shim outlives a killed dockerd), `umount -l`
//! its overlay and nsfs mounts, flush its netfilter rules in its namespace, remove its
//! cgroups and directories; the global leftovers every dockerd shares (`/run/docker`,
//! `/run/containerd`, `/etc/docker/key.json`) only when it created them and no other
//! dockerd runs. The namespace itself belongs to the caller (a [`NetNsPair`]).

use std::{
    fs,
    net::Ipv4Addr,
    os::unix::{fs::MetadataExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use crate::{
    netns::NetNsPair,
    web::{ns_cmd, wait_until, write_site},
};

/// The Docker client, by path (see the module doc).
pub const DOCKER: &str = "/usr/bin/docker";
/// dockerd, as Debian installs it.
pub const DOCKERD: &str = "/usr/sbin/dockerd";
/// The image name the nginx tar is imported as.
pub const NGINX_IMAGE: &str = "local/drain-nginx";
/// Where the site lives in the image, and the port nginx listens on inside the container.
pub const SITE: &str = "/srv/site";
pub const CONTAINER_PORT: u16 = 80;

/// Global paths every dockerd on the machine shares: removed at teardown only when this
/// fixture created them and no other dockerd runs. (/etc/docker itself belongs to the
/// docker.io package.)
const SHARED_LEFTOVERS: [&str; 3] = ["/run/docker", "/run/containerd", "/etc/docker/key.json"];

/// A dockerd running inside network namespace `ns` (see the module doc); torn down on drop.
pub struct Dockerd {
    pub ns: String,
    /// The unique name of this instance: cgroup parent, run directory.
    pub id: String,
    /// `/run/<id>`: socket, pid file, exec root.
    pub run_dir: PathBuf,
    /// Data root (images, overlay layers), under the system temp dir.
    pub data_root: PathBuf,
    /// The default bridge's address (`--bip`), e.g. 198.18.61.1.
    pub bridge: Ipv4Addr,
    child: Option<Child>,
    log: PathBuf,
    /// Containers started through [`Dockerd::run_container`] (removed first on drop).
    containers: Mutex<Vec<String>>,
    /// Which of [`SHARED_LEFTOVERS`] did not exist before this dockerd started.
    created_shared: Vec<&'static str>,
}

impl Dockerd {
    /// Starts dockerd in namespace `pair.a` (the "host" of a published port) and returns once
    /// its API answers.
    pub fn start(pair: &NetNsPair) -> Self {
        crate::require_root();
        let (_, _, suffix) = crate::unique_suffix();
        let id = format!("drain-d-{suffix}");
        let run_dir = PathBuf::from("/run").join(&id);
        let data_root = std::env::temp_dir().join(&id);
        // A bridge /24 and a pool /20 that cannot hold the pair's own addresses (those are
        // /30s anywhere in 198.18.0.0/15): two candidates each, the first that is clear.
        let a = u32::from(pair.a_v4);
        let clear = |net: u32, bits: u32| (a >> (32 - bits)) != (net >> (32 - bits));
        let bridge_net = [Ipv4Addr::new(198, 18, 61, 0), Ipv4Addr::new(198, 18, 62, 0)]
            .into_iter()
            .find(|n| clear(u32::from(*n), 24))
            .unwrap();
        let pool = [Ipv4Addr::new(198, 18, 64, 0), Ipv4Addr::new(198, 18, 80, 0)]
            .into_iter()
            .find(|n| clear(u32::from(*n), 20))
            .unwrap();
        let bridge = Ipv4Addr::from(u32::from(bridge_net) + 1);
        let created_shared = SHARED_LEFTOVERS
            .into_iter()
            .filter(|p| !Path::new(p).exists())
            .collect();
        let mut d = Self {
            ns: pair.a.clone(),
            id: id.clone(),
            run_dir: run_dir.clone(),
            data_root: data_root.clone(),
            bridge,
            child: None,
            log: data_root.join("dockerd.log"),
            containers: Mutex::new(Vec::new()),
            created_shared,
        };
        // From here on a panic drops `d`, which removes whatever was made.
        fs::create_dir_all(&run_dir).unwrap();
        fs::create_dir_all(&data_root).unwrap();
        let log = fs::File::create(&d.log).unwrap();
        let mut cmd = ns_cmd(&d.ns, DOCKERD);
        cmd.arg("-H")
            .arg(format!("unix://{}", d.sock().display()))
            .arg("--data-root")
            .arg(data_root.join("data"))
            .arg("--exec-root")
            .arg(run_dir.join("exec"))
            .arg("--pidfile")
            .arg(run_dir.join("docker.pid"))
            .arg("--bip")
            .arg(format!("{bridge}/24"))
            .arg("--default-address-pool")
            .arg(format!("base={pool}/20,size=24"))
            .arg("--cgroup-parent")
            .arg(format!("/{id}"))
            .args(["--exec-opt", "native.cgroupdriver=cgroupfs"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0);
        d.child = Some(cmd.spawn().unwrap_or_else(|e| {
            panic!("starting {DOCKERD} (cargo xtask test installs docker.io): {e}")
        }));
        let t = Instant::now();
        while !d
            .docker()
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            if let Some(st) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "dockerd exited ({st}) before answering; its log:\n{}",
                    d.log_text()
                );
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "dockerd did not answer on {} within 30 s; its log:\n{}",
                d.sock().display(),
                d.log_text()
            );
            thread::sleep(Duration::from_millis(50));
        }
        d
    }

    /// The API socket.
    pub fn sock(&self) -> PathBuf {
        self.run_dir.join("docker.sock")
    }

    /// The `-H` value that reaches this dockerd (`DOCKER_HOST` for tools that run docker).
    pub fn host(&self) -> String {
        format!("unix://{}", self.sock().display())
    }

    /// dockerd's pid (nsenter joins the namespace and execs dockerd in the same process).
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/usr/bin/docker -H <this dockerd>`; add arguments with `.arg(...)`.
    pub fn docker(&self) -> Command {
        let mut c = Command::new(DOCKER);
        c.arg("-H").arg(self.host());
        c
    }

    /// Runs `docker args...` against this dockerd; panics (with dockerd's log tail) unless it
    /// succeeds; returns stdout, trimmed.
    #[track_caller]
    pub fn run(&self, args: &[&str]) -> String {
        let out = self
            .docker()
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running docker {}: {e}", args.join(" ")));
        if !out.status.success() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            panic!(
                "docker {} failed ({}): {}{}\ndockerd's last log lines:\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Imports the test site's nginx image ([`nginx_image_tar`]) as [`NGINX_IMAGE`].
    pub fn import_nginx(&self) {
        let tar = nginx_image_tar();
        let file = fs::File::open(&tar).unwrap();
        let out = self
            .docker()
            .arg("import")
            .arg("--change")
            .arg(format!(
                r#"CMD ["/usr/sbin/nginx", "-p", "{SITE}", "-c", "{SITE}/nginx.conf", "-g", "daemon off;"]"#
            ))
            .arg("-")
            .arg(NGINX_IMAGE)
            .stdin(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "docker import {}: {}",
            tar.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `docker run -d --name <name> -p <publish>:80 <extra...> local/drain-nginx` with
    /// STOPSIGNAL SIGQUIT (nginx's graceful stop: in-flight requests finish; the imported
    /// image has no STOPSIGNAL, and SIGTERM is nginx's fast stop, which cuts them), and waits
    /// until nginx listens in the container. Removed on drop.
    pub fn run_nginx(&self, name: &str, publish: u16, extra: &[&str]) -> String {
        let p = format!("{publish}:{CONTAINER_PORT}");
        let mut args = vec![
            "run",
            "-d",
            "--name",
            name,
            "--stop-signal",
            "SIGQUIT",
            "-p",
            &p,
        ];
        args.extend_from_slice(extra);
        args.push(NGINX_IMAGE);
        self.containers.lock().unwrap().push(name.to_string());
        let id = self.run(&args);
        self.wait_listening(name);
        id
    }

    /// Waits until nginx listens on [`CONTAINER_PORT`] inside container `name`.
    pub fn wait_listening(&self, name: &str) {
        wait_until(
            &format!("nginx listens in container {name}"),
            Duration::from_secs(20),
            || {
                self.pid_of(name)
                    .is_some_and(|pid| crate::web::listening(pid, CONTAINER_PORT))
            },
        );
    }

    /// The host pid of container `name`'s first process, if it runs.
    pub fn pid_of(&self, name: &str) -> Option<i32> {
        let out = self
            .docker()
            .args(["inspect", "-f", "{{.State.Pid}}", name])
            .output()
            .ok()?;
        let pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
        (pid > 0).then_some(pid)
    }

    /// The identity (inode, cookie) of container `name`'s network namespace. Docker makes a
    /// new namespace each time the container starts; the cookie tells them apart (a freed
    /// namespace's inode number is handed out again).
    pub fn netns_id(&self, name: &str) -> Option<drain_user::netns::NetnsId> {
        let pid = self.pid_of(name)?;
        let ns = fs::File::open(format!("/proc/{pid}/ns/net")).ok()?;
        thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a valid fd; it changes only this thread's namespace.
                let rc = unsafe {
                    libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET)
                };
                (rc == 0)
                    .then(drain_user::netns::NetnsId::current)
                    .and_then(Result::ok)
            })
            .join()
            .ok()
            .flatten()
        })
    }

    /// Every process whose command line names this dockerd's run or data directory
    /// (containerd, containerd-shim, docker-proxy), or that sits in one of its cgroups.
    fn leftover_pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = Vec::new();
        let run = self.run_dir.to_string_lossy().into_owned();
        let data = self.data_root.to_string_lossy().into_owned();
        if let Ok(rd) = fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let cmdline = fs::read(e.path().join("cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline);
                if cmdline.contains(&run) || cmdline.contains(&data) {
                    pids.push(pid);
                }
            }
        }
        for dir in self.cgroup_dirs() {
            walk_dirs(&dir, &mut |d| {
                if let Ok(procs) = fs::read_to_string(d.join("cgroup.procs")) {
                    pids.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
                }
            });
        }
        pids.sort_unstable();
        pids.dedup();
        pids.retain(|p| *p != std::process::id() as i32);
        pids
    }

    /// `/sys/fs/cgroup/<controller>/<id>` for every hierarchy that has one.
    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        let root = Path::new("/sys/fs/cgroup");
        let own = root.join(&self.id);
        if own.is_dir() {
            dirs.push(own);
        }
        if let Ok(rd) = fs::read_dir(root) {
            for e in rd.flatten() {
                let d = e.path().join(&self.id);
                if d.is_dir() {
                    dirs.push(d);
                }
            }
        }
        dirs
    }

    /// Mount points under this dockerd's directories (overlay layers, netns handles).
    fn own_mounts(&self) -> Vec<String> {
        let run = self.run_dir.to_string_lossy().into_owned();
        let data = self.data_root.to_string_lossy().into_owned();
        let mut m: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
            .filter(|p| p.starts_with(&run) || p.starts_with(&data))
            .collect();
        // Deepest first.
        m.sort_by_key(|p| std::cmp::Reverse(p.len()));
        m
    }

    /// Tears everything down; returns what could not be removed (empty: nothing left).
    /// Called by drop; callable before it, to assert on the result.
    pub fn teardown(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        let Some(mut child) = self.child.take() else {
            return problems;
        };
        let names: Vec<String> = std::mem::take(&mut *self.containers.lock().unwrap());
        if !names.is_empty() {
            let mut rm = self.docker();
            rm.args(["rm", "-f"]).args(&names);
            match rm.output() {
                Ok(o) if o.status.success() => {}
                Ok(o) => problems.push(format!(
                    "docker rm -f {}: {}",
                    names.join(" "),
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Err(e) => problems.push(format!("docker rm -f: {e}")),
            }
        }
        // SIGTERM dockerd (it stops its containerd and the containers), then wait.
        let pid = child.id() as i32;
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let t = Instant::now();
        loop {
            if matches!(child.try_wait(), Ok(Some(_)) | Err(_)) {
                break;
            }
            if t.elapsed() > Duration::from_secs(15) {
                problems.push("dockerd ignored SIGTERM for 15 s: killed".into());
                crate::web::kill_group(pid, libc::SIGKILL);
                let _ = child.wait();
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        // Its process group (containerd), then anything left in its cgroups or naming its
        // directories (shims and container processes outlive a killed dockerd).
        crate::web::kill_group(pid, libc::SIGKILL);
        for round in 0..50 {
            let left = self.leftover_pids();
            if left.is_empty() {
                break;
            }
            for p in &left {
                // SAFETY: as above.
                unsafe { libc::kill(*p, libc::SIGKILL) };
            }
            if round == 49 {
                problems.push(format!("processes still alive: {left:?}"));
            }
            thread::sleep(Duration::from_millis(20));
        }
        for m in self.own_mounts() {
            if let Err(e) = Command::new("umount").arg("-l").arg(&m).output() {
                problems.push(format!("umount -l {m}: {e}"));
            }
        }
        // Its netfilter rules in its namespace (the namespace goes away with its owner, but
        // a namespace kept by a leaked handle must not keep Docker's FORWARD DROP).
        for (prog, table) in [
            ("iptables", "filter"),
            ("iptables", "nat"),
            ("ip6tables", "filter"),
            ("ip6tables", "nat"),
        ] {
            for op in ["-F", "-X"] {
                let _ = ns_cmd(&self.ns, prog).args(["-t", table, op]).output();
            }
        }
        let _ = ns_cmd(&self.ns, "iptables")
            .args(["-P", "FORWARD", "ACCEPT"])
            .output();
        for dir in self.cgroup_dirs() {
            let mut all = Vec::new();
            walk_dirs(&dir, &mut |d| all.push(d.to_path_buf()));
            // Children before parents.
            all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
            for d in all {
                let mut ok = false;
                for _ in 0..50 {
                    if fs::remove_dir(&d).is_ok() || !d.exists() {
                        ok = true;
                        break;
                    }
                    thread::sleep(Duration::from_millis(20));
                }
                if !ok {
                    problems.push(format!("cgroup {} could not be removed", d.display()));
                }
            }
        }
        for d in [&self.run_dir, &self.data_root] {
            if let Err(e) = fs::remove_dir_all(d) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    problems.push(format!("removing {}: {e}", d.display()));
                }
            }
        }
        if !other_dockerd_runs() {
            for p in &self.created_shared {
                let p = Path::new(p);
                let _ = if p.is_dir() {
                    fs::remove_dir_all(p)
                } else {
                    fs::remove_file(p)
                };
            }
        }
        problems
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // Printed, not raised: panicking while unwinding would abort the test binary.
        for p in self.teardown() {
            eprintln!("dockerd {} teardown: {p}", self.id);
        }
    }
}

/// Calls `f` on `dir` and every directory below it.
fn walk_dirs(dir: &Path, f: &mut dyn FnMut(&Path)) {
    f(dir);
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk_dirs(&e.path(), f);
            }
        }
    }
}

/// Whether a dockerd other than ours runs (one whose pid file we did not write): its name
/// read from /proc, never used to signal anything.
fn other_dockerd_runs() -> bool {
    fs::read_dir("/proc").is_ok_and(|rd| {
        rd.flatten()
            .any(|e| fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "dockerd"))
    })
}

/// The image's tar (see the module doc), built on first use in this run or when nginx or the
/// site changed, under `target/docker/`. Safe to call from several tests and processes at
/// once (a file lock, and the tar is renamed into place whole).
pub fn nginx_image_tar() -> PathBuf {
    static IN_PROCESS: Mutex<()> = Mutex::new(());
    let _g = IN_PROCESS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = crate::target_dir().join("docker");
    fs::create_dir_all(&dir).unwrap();
    let lock = fs::File::create(dir.join("image.lock")).unwrap();
    // SAFETY: flock on an fd we own; released when `lock` is closed.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
    let tar = dir.join("nginx-root.tar");
    let stamp_path = dir.join("nginx-root.stamp");
    // What the image is made of: the nginx binary (size, mtime) and this file's site.
    let nginx = fs::metadata("/usr/sbin/nginx")
        .unwrap_or_else(|e| panic!("/usr/sbin/nginx: {e} (cargo xtask test installs nginx)"));
    let stamp = format!(
        "nginx {} {} site {} {:?} {:?}",
        nginx.size(),
        nginx.mtime(),
        SITE,
        crate::web::SLOW_RATE,
        crate::web::SLOW_SECS
    );
    if tar.exists() && fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) {
        return tar;
    }
    let t = Instant::now();
    let root = dir.join(format!("root-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    let put = |src: &Path| {
        let dst = root.join(src.strip_prefix("/").unwrap());
        fs::create_dir_all(dst.parent().unwrap()).unwrap();
        // Follows symlinks: the library's real bytes under the name the loader asks for.
        fs::copy(src, &dst).unwrap_or_else(|e| panic!("copying {}: {e}", src.display()));
    };
    put(Path::new("/usr/sbin/nginx"));
    let ldd = crate::web::run_ok(Command::new("ldd").arg("/usr/sbin/nginx"));
    for lib in ldd.split_whitespace().filter(|w| w.starts_with('/')) {
        put(Path::new(lib));
    }
    fs::create_dir_all(root.join("etc")).unwrap();
    // nginx's workers run as nobody; glibc reads these files itself (nss "files" is built in).
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    )
    .unwrap();
    fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    // nginx opens its compiled-in error log before it reads the configuration.
    fs::create_dir_all(root.join("var/log/nginx")).unwrap();
    fs::create_dir_all(root.join("tmp")).unwrap();
    let site = root.join(SITE.trim_start_matches('/'));
    write_site(&site, &format!("*:{CONTAINER_PORT}"), "v1");
    // write_site spells the site's paths as it was given them: make them the image's.
    let conf = site.join("nginx.conf");
    let text = fs::read_to_string(&conf)
        .unwrap()
        .replace(&site.display().to_string(), SITE);
    fs::write(&conf, text).unwrap();
    let tmp = dir.join(format!("nginx-root.tar.{}", std::process::id()));
    crate::web::run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tmp)
            .arg("."),
    );
    fs::rename(&tmp, &tar).unwrap();
    fs::write(&stamp_path, stamp).unwrap();
    let _ = fs::remove_dir_all(&root);
    eprintln!(
        "docker: built the nginx image root {} in {:?}",
        tar.display(),
        t.elapsed()
    );
    tar
}

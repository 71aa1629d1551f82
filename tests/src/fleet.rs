//! The fleet drill's world: N "hosts" (network namespaces, each with its own address, its own
//! Debian nginx and its own Debian sshd), a balancer namespace with HAProxy and the load
//! (wrk), and a controller namespace from which a real `ansible-playbook` (ansible-core from
//! PyPI, in a virtualenv under target/) rolls new content over the hosts with the repo's
//! `drain.host.rolling_deploy` role.
//!
//! ```text
//!   ctl (ansible-playbook) ──┐
//!   lb  (haproxy, wrk) ──────┤ br0 in namespace "fab"
//!   h1 (nginx :80, sshd :22) ┤
//!   ...                      ┘
//! ```
//!
//! Two kinds of host ([`HostKind`]): a network namespace with Debian's nginx and sshd run
//! by the test (cheap: large fleets), or a booted container ([`crate::booted`]) in that
//! namespace, systemd as PID 1 running Debian's ssh.service and nginx.service, which the
//! role stops and starts with `drain_service: nginx` (systemd) over SSH, drain-user at
//! /usr/bin/drain-user under nspawn's own seccomp filter, as on a real host.
//!
//! Addresses are 198.18.100.0/24 inside the fabric only (each fleet has a bridge of its
//! own, so two fleets never see each other). sshd runs in its host's namespace through
//! `nsenter --net` (not `ip netns exec`), so what it runs, drain-user included, sees that
//! namespace's network and the host's /sys/fs/bpf.
//!
//! Cleanup (RAII, also when a test panics): daemons are killed by process group, then every
//! process still inside a fleet namespace (nginx started by the playbook, ssh sessions and
//! ssh's ControlPersist masters, which detach into sessions of their own) is killed, the
//! gate is turned off in every host namespace, the namespaces are deleted and the temp dir
//! removed.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::target_dir;
use crate::web::{
    kill_group, listening, ns_cmd, run_ok, wait_until, Backend, Daemon, HaProxy, Nginx, TempDir,
};

/// The fabric's /24; .2 is the balancer, .3 the controller, hosts from .11 on.
const NET: [u8; 3] = [198, 18, 100];
/// The idle window of the role's wait (`drain_idle`).
pub const IDLE: &str = "2s";
/// The web port on each host, the one drain gates.
pub const WEB_PORT: u16 = 80;
/// The ansible-core the drill installs (2.19 is the newest that runs on Debian 12's Python
/// 3.11 as a controller).
const ANSIBLE_CORE: &str = "ansible-core>=2.19,<2.20";

/// Seconds since the epoch, as a float: the clock that the playbook's `date +%s.%N` stamps
/// and the test's observer share.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The network namespaces of one fleet. Drop: kills every process inside them, turns the
/// gate off in each host namespace, deletes them.
struct Namespaces {
    created: Vec<String>,
    hosts: Vec<String>,
}

impl Namespaces {
    fn add(&mut self, ns: &str) {
        crate::netns::ip(&["netns", "add", ns]);
        self.created.push(ns.to_string());
    }
}

/// Pids of the processes whose network namespace is `ns` (`ip netns pids`).
pub fn pids_in(ns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Processes in namespace `ns` that run the drain-user binary (the test's build, or the
/// one bound at /usr/bin/drain-user in a booted host, whose exe reads as that path).
pub fn drain_processes_in(ns: &str) -> Vec<i32> {
    let bin = fs::canonicalize(crate::drain_user_bin()).unwrap_or_default();
    pids_in(ns)
        .into_iter()
        .filter(|p| {
            fs::read_link(format!("/proc/{p}/exe"))
                .is_ok_and(|e| e == bin || e == Path::new(BOOTED_DRAIN_USER))
        })
        .collect()
}

/// Where a booted host has drain-user (the role's default `drain_binary`).
const BOOTED_DRAIN_USER: &str = "/usr/bin/drain-user";
/// A booted host's files for the test (nginx's root is `html/` in it), inside the container.
const BOOTED_HOST_DIR: &str = "/var/www/drain";

/// What a fleet's hosts are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKind {
    /// A network namespace; nginx and sshd run by the test, stopped and started by commands.
    Netns,
    /// A booted container in the namespace: systemd runs ssh and nginx; the role uses
    /// `drain_service: nginx`.
    Booted,
}

/// What runs a host's services.
pub enum Runtime {
    Netns { nginx: Nginx, sshd: Daemon },
    Booted(Box<crate::booted::Booted>),
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.created {
            for pid in pids_in(ns) {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let t = Instant::now();
        while self.created.iter().any(|ns| !pids_in(ns).is_empty())
            && t.elapsed() < Duration::from_secs(5)
        {
            thread::sleep(Duration::from_millis(20));
        }
        for ns in &self.hosts {
            match ns_cmd(ns, crate::drain_user_bin())
                .args(["gate", "off"])
                .output()
            {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "gate off in {ns}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => eprintln!("gate off in {ns}: {e}"),
            }
        }
        for ns in self.created.iter().rev() {
            match Command::new("ip").args(["netns", "del", ns]).output() {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "ip netns del {ns}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => eprintln!("ip netns del {ns}: {e}"),
            }
        }
    }
}

/// One managed host.
pub struct Host {
    /// Inventory name (also the HAProxy server name): h1, h2, ...
    pub name: String,
    pub ns: String,
    pub addr: Ipv4Addr,
    /// nginx prefix: config, pid file, html/, and the files the playbook leaves for the test
    /// (as the test sees it; for a booted host, through its overlay).
    pub dir: PathBuf,
    /// The same directory as the playbook sees it on the host.
    pub remote_dir: String,
    pub runtime: Runtime,
    /// Where drain pins this namespace's gate (as the test sees it).
    pub state_dir: PathBuf,
}

impl Host {
    pub fn web(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.addr, WEB_PORT))
    }

    /// `drain-user <args>` on this host; its stdout (panics unless exit 0).
    pub fn drain(&self, args: &[&str]) -> String {
        run_ok(&mut self.drain_cmd(args))
    }

    /// drain-user on this host: in its namespace with the host's bpffs, or inside the
    /// booted container (its own bpffs).
    fn drain_cmd(&self, args: &[&str]) -> Command {
        match &self.runtime {
            Runtime::Netns { .. } => {
                let mut c = ns_cmd(&self.ns, crate::drain_user_bin());
                c.args(args);
                c
            }
            Runtime::Booted(b) => {
                let mut argv = vec![BOOTED_DRAIN_USER];
                argv.extend_from_slice(args);
                b.command(&argv)
            }
        }
    }

    /// The drain-user the playbook runs on this host.
    fn remote_drain_binary(&self) -> PathBuf {
        match self.runtime {
            Runtime::Netns { .. } => crate::drain_user_bin(),
            Runtime::Booted(_) => PathBuf::from(BOOTED_DRAIN_USER),
        }
    }

    pub fn status(&self) -> serde_json::Value {
        crate::web::parse_status(&self.drain(&["status", "--json"]))
    }

    /// `status --json` when it succeeds. `status` takes no lock, so while a `gate on` of
    /// the playbook is half-way it can fail ("the gate state is incomplete"): pollers retry.
    pub fn try_status(&self) -> Option<serde_json::Value> {
        let out = self.drain_cmd(&["status", "--json"]).output().ok()?;
        out.status
            .success()
            .then(|| crate::web::parse_status(&String::from_utf8_lossy(&out.stdout)))
    }

    /// The role's `drain_report` fact for this host, as the playbook saved it.
    pub fn report(&self) -> Option<serde_json::Value> {
        let text = fs::read_to_string(self.dir.join("drain-report.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Lines `<event> <epoch seconds>` the playbook's stop and start commands appended;
    /// when the role stopped and started a systemd unit (no commands), the same events
    /// from the role's own marks in its report.
    pub fn stamps(&self) -> Vec<(String, f64)> {
        let stamps: Vec<(String, f64)> = fs::read_to_string(self.dir.join("stamps"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k.to_string(), v.trim().parse().ok()?))
            })
            .collect();
        if !stamps.is_empty() {
            return stamps;
        }
        let Some(report) = self.report() else {
            return stamps;
        };
        let marks = report["marks"].as_array().cloned().unwrap_or_default();
        let mark = |name: &str| {
            marks
                .iter()
                .find(|m| m[0] == name)
                .and_then(|m| m[1].as_f64())
        };
        [
            ("stop-begin", "drained"),
            ("stop-end", "stopped"),
            ("start-begin", "deployed"),
            ("start-end", "started"),
        ]
        .iter()
        .filter_map(|(ev, m)| Some((ev.to_string(), mark(m)?)))
        .collect()
    }
}

/// The whole drill world; see the module docs. Fields drop in order: balancer, hosts
/// (their daemons), namespaces (every leftover process, the gates), the temp dir.
pub struct Fleet {
    pub haproxy: HaProxy,
    pub hosts: Vec<Host>,
    pub lb_ns: String,
    pub ctl_ns: String,
    pub lb_addr: Ipv4Addr,
    pub kind: HostKind,
    #[expect(
        dead_code,
        reason = "held for its Drop: the namespaces go with the fleet"
    )]
    nets: Namespaces,
    pub dir: TempDir,
}

/// The balancer's frontend port and its stats page port.
pub const LB_PORT: u16 = 80;
pub const LB_STATS_PORT: u16 = 8404;

impl Fleet {
    /// Builds the fabric, `n` namespace hosts serving `version`, the balancer; waits until
    /// every backend is UP and every sshd listens.
    pub fn new(n: usize) -> Self {
        Self::with_kind(n, HostKind::Netns)
    }

    /// [`Fleet::new`] with hosts of `kind`.
    pub fn with_kind(n: usize, kind: HostKind) -> Self {
        crate::require_root();
        assert!((1..=200).contains(&n), "a fleet of {n} hosts");
        let dir = TempDir::new("fleet");
        let (_, _, suffix) = crate::unique_suffix();
        let mut nets = Namespaces {
            created: Vec::new(),
            hosts: Vec::new(),
        };
        let fab = format!("drain-f-{suffix}-fab");
        nets.add(&fab);
        let ip = crate::netns::ip;
        ip(&["-n", &fab, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &fab, "link", "set", "br0", "up"]);
        // One veth per node: "eth0" inside the node, "p-<node>" on the bridge.
        let plug = |nets: &mut Namespaces, node: &str, addr: Ipv4Addr| -> String {
            let ns = format!("drain-f-{suffix}-{node}");
            nets.add(&ns);
            let port = format!("p-{node}");
            ip(&[
                "-n", &fab, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ]);
            ip(&["-n", &fab, "link", "set", &port, "master", "br0", "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ns
        };
        let node_addr = |i: u8| Ipv4Addr::new(NET[0], NET[1], NET[2], i);
        let lb_addr = node_addr(2);
        let lb_ns = plug(&mut nets, "lb", lb_addr);
        let ctl_ns = plug(&mut nets, "ctl", node_addr(3));

        // Keys: one client key (the controller's), one host key per sshd.
        let keygen = |path: &Path| {
            run_ok(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-C", "drain-fleet", "-f"])
                    .arg(path),
            );
        };
        keygen(&dir.path().join("client_key"));
        fs::copy(
            dir.path().join("client_key.pub"),
            dir.path().join("authorized_keys"),
        )
        .unwrap();
        // sshd's privilege separation directory (the package's init script makes it).
        fs::create_dir_all("/run/sshd").unwrap();

        let mut hosts = Vec::new();
        let mut known_hosts = String::new();
        let client_pub = fs::read(dir.path().join("client_key.pub")).unwrap();
        for i in 0..n {
            let name = format!("h{}", i + 1);
            let addr = node_addr(11 + i as u8);
            let ns = plug(&mut nets, &name, addr);
            nets.hosts.push(ns.clone());
            let host = match kind {
                HostKind::Netns => {
                    netns_host(dir.path(), &name, &ns, addr, &keygen, &mut known_hosts)
                }
                HostKind::Booted => booted_host(&name, &ns, addr, &client_pub, &mut known_hosts),
            };
            hosts.push(host);
        }
        fs::write(dir.path().join("known_hosts"), known_hosts).unwrap();
        for h in &mut hosts {
            let name = h.name.clone();
            match &mut h.runtime {
                Runtime::Netns { sshd, .. } => {
                    let pid = sshd.pid();
                    wait_until(
                        &format!("sshd of {name} listens"),
                        Duration::from_secs(10),
                        || {
                            sshd.assert_running();
                            listening(pid, 22)
                        },
                    );
                }
                Runtime::Booted(b) => {
                    // systemd said running: ssh.service has started, i.e. sshd listens.
                    assert!(listening(b.leader, 22), "sshd of {name} does not listen");
                    assert!(
                        listening(b.leader, WEB_PORT),
                        "nginx of {name} does not listen"
                    );
                }
            }
        }
        let backends: Vec<Backend> = hosts
            .iter()
            .map(|h| Backend {
                name: h.name.clone(),
                addr: h.web(),
            })
            .collect();
        let haproxy = HaProxy::start(
            &lb_ns,
            &dir.path().join("lb"),
            SocketAddr::V4(SocketAddrV4::new(lb_addr, LB_PORT)),
            Some(SocketAddr::V4(SocketAddrV4::new(lb_addr, LB_STATS_PORT))),
            &backends,
        );
        Fleet {
            haproxy,
            hosts,
            lb_ns,
            ctl_ns,
            lb_addr,
            kind,
            nets,
            dir,
        }
    }

    pub fn lb_url(&self) -> String {
        format!("http://{}:{LB_PORT}/", self.lb_addr)
    }

    /// Writes ansible.cfg, the inventory, the deploy tasks and the playbook for `r`, and
    /// starts `ansible-playbook` in the controller namespace (a process group of its own).
    pub fn start_playbook(&self, r: &Rollout) -> Playbook {
        let venv = ansible_venv();
        let d = self.dir.path().join(format!("ansible-{}", r.version));
        fs::create_dir_all(&d).unwrap();
        let cfg = format!(
            "[defaults]
inventory = {d}/inventory.ini
collections_path = {collections}
home = {d}/home
local_tmp = {d}/local-tmp
remote_tmp = {d}/remote-tmp
host_key_checking = True
forks = 20
retry_files_enabled = False
interpreter_python = /usr/bin/python3
timeout = 15
nocolor = True
[ssh_connection]
pipelining = True
ssh_args = -F /dev/null -o ControlMaster=auto -o ControlPersist=120s -o UserKnownHostsFile={kh} -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes
control_path_dir = {d}/cp
",
            d = d.display(),
            collections = repo_root().join("ansible").display(),
            kh = self.dir.path().join("known_hosts").display(),
        );
        fs::write(d.join("ansible.cfg"), cfg).unwrap();
        let mut inv = String::from("[web]\n");
        for h in &self.hosts {
            inv.push_str(&format!(
                "{} ansible_host={} fleet_host_dir={} drain_binary={}\n",
                h.name,
                h.addr,
                h.remote_dir,
                h.remote_drain_binary().display()
            ));
        }
        inv.push_str(&format!(
            "[web:vars]\nansible_user=root\nansible_ssh_private_key_file={key}\n\
             [controller]\nlocalhost ansible_connection=local ansible_python_interpreter={py}\n",
            key = self.dir.path().join("client_key").display(),
            py = venv.join("bin/python3").display(),
        ));
        fs::write(d.join("inventory.ini"), inv).unwrap();
        fs::write(d.join("deploy.yml"), DEPLOY_TASKS).unwrap();
        fs::write(d.join("playbook.yml"), r.playbook(self, &d)).unwrap();
        let log = d.join("ansible.log");
        let out = fs::File::create(&log).unwrap();
        let mut cmd = ns_cmd(&self.ctl_ns, venv.join("bin/ansible-playbook"));
        cmd.arg(d.join("playbook.yml"))
            .current_dir(&d)
            .env("ANSIBLE_CONFIG", d.join("ansible.cfg"))
            .env("ANSIBLE_FORCE_COLOR", "0")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0);
        let child = cmd.spawn().expect("start ansible-playbook");
        Playbook {
            child: Some(child),
            log,
            started: now(),
        }
    }

    /// Watches every host's gate (its pin directory) and its state in HAProxy every 25 ms
    /// until [`Observer::finish`].
    pub fn observe(&self) -> Observer {
        let stop = Arc::new(AtomicBool::new(false));
        let sock = self.haproxy.sock.clone();
        let gates: Vec<(String, PathBuf)> = self
            .hosts
            .iter()
            .map(|h| (h.name.clone(), h.state_dir.clone()))
            .collect();
        let handle = {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut events = Vec::new();
                let mut lb_last: std::collections::BTreeMap<String, String> = Default::default();
                let mut gate_last = vec![false; gates.len()];
                while !stop.load(Ordering::Relaxed) {
                    let t = now();
                    for (name, st) in crate::web::show_stat(&sock) {
                        if lb_last.get(&name) != Some(&st) {
                            events.push(Event {
                                t,
                                host: name.clone(),
                                what: Change::Lb(st.clone()),
                            });
                            lb_last.insert(name, st);
                        }
                    }
                    for (i, (name, dir)) in gates.iter().enumerate() {
                        let on = dir.exists();
                        if on != gate_last[i] {
                            events.push(Event {
                                t,
                                host: name.clone(),
                                what: Change::Gate(on),
                            });
                            gate_last[i] = on;
                        }
                    }
                    thread::sleep(Duration::from_millis(25));
                }
                events
            })
        };
        Observer {
            stop,
            handle: Some(handle),
        }
    }
}

/// A namespace host: its own sshd (host key made here) and nginx, run by the test.
fn netns_host(
    fleet_dir: &Path,
    name: &str,
    ns: &str,
    addr: Ipv4Addr,
    keygen: &dyn Fn(&Path),
    known_hosts: &mut String,
) -> Host {
    let hdir = fleet_dir.join(name);
    fs::create_dir_all(&hdir).unwrap();
    let key = hdir.join("ssh_host_ed25519_key");
    keygen(&key);
    let pubkey = fs::read_to_string(key.with_extension("pub")).unwrap();
    let mut it = pubkey.split_whitespace();
    known_hosts.push_str(&format!(
        "{addr} {} {}\n",
        it.next().unwrap(),
        it.next().unwrap()
    ));
    let cfg = hdir.join("sshd_config");
    fs::write(
        &cfg,
        format!(
            "ListenAddress {addr}:22
HostKey {key}
PidFile {pid}
AuthorizedKeysFile {auth}
StrictModes no
UsePAM no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
PrintMotd no
MaxStartups 100:30:200
MaxSessions 100
Subsystem sftp internal-sftp
",
            key = key.display(),
            pid = hdir.join("sshd.pid").display(),
            auth = fleet_dir.join("authorized_keys").display(),
        ),
    )
    .unwrap();
    let mut cmd = ns_cmd(ns, "/usr/sbin/sshd");
    cmd.args(["-D", "-e", "-f"]).arg(&cfg);
    let sshd = Daemon::spawn(&format!("sshd {name}"), cmd, &hdir.join("sshd.log"));
    let nginx = Nginx::new(ns, &hdir, &format!("{WEB_PORT}"), WEB_PORT, "v1");
    Host {
        name: name.to_string(),
        ns: ns.to_string(),
        addr,
        remote_dir: hdir.display().to_string(),
        dir: hdir,
        runtime: Runtime::Netns { nginx, sshd },
        state_dir: crate::netns::drain_state_dir(ns),
    }
}

/// A booted host in namespace `ns`: Debian's ssh.service (root logs in with the
/// controller's key) and nginx.service serving the test site, drain-user at
/// /usr/bin/drain-user, its own bpffs (where its gate's pins are).
fn booted_host(
    name: &str,
    ns: &str,
    addr: Ipv4Addr,
    client_pub: &[u8],
    known_hosts: &mut String,
) -> Host {
    use crate::booted::{nginx_site, BootOpts, Booted};
    let mut files = nginx_site(BOOTED_HOST_DIR, "v1");
    files.push(("/root/.ssh/authorized_keys".into(), client_pub.to_vec()));
    let b = Booted::boot(BootOpts {
        netns: ns,
        drain_user: true,
        files,
    });
    eprintln!("fleet: {name} booted in {:.2} s", b.boot_secs);
    // The host key debootstrap's openssh-server made (every booted host shares it).
    let pubkey = fs::read_to_string(b.root().join("etc/ssh/ssh_host_ed25519_key.pub")).unwrap();
    let mut it = pubkey.split_whitespace();
    known_hosts.push_str(&format!(
        "{addr} {} {}\n",
        it.next().unwrap(),
        it.next().unwrap()
    ));
    let pins = crate::netns::drain_state_dir(ns);
    let state_dir = b.bpffs().join(
        pins.strip_prefix("/sys/fs/bpf")
            .expect("pins live under /sys/fs/bpf"),
    );
    Host {
        name: name.to_string(),
        ns: ns.to_string(),
        addr,
        dir: b.root().join(BOOTED_HOST_DIR.trim_start_matches('/')),
        remote_dir: BOOTED_HOST_DIR.to_string(),
        runtime: Runtime::Booted(Box::new(b)),
        state_dir,
    }
}

/// What one rollout does.
#[derive(Clone, Debug)]
pub struct Rollout {
    /// The new content's version string (also names the run's files).
    pub version: String,
    pub drain_enabled: bool,
    /// drop | reset
    pub policy: String,
    pub ttl: String,
    /// Whole seconds the role pauses after closing the gate (the balancer's detection time).
    pub wait_for_lb: u32,
}

impl Rollout {
    fn playbook(&self, fleet: &Fleet, d: &Path) -> String {
        // The per-host nginx commands, the prefix templated per host by Ansible. Each
        // appends a stamp before and after, so the test can say where a host's time went.
        let prefix = "{{ fleet_host_dir }}";
        let stamp = |ev: &str| format!("echo {ev} $(date +%s.%N) >> {prefix}/stamps");
        let stop = format!(
            "{} && {} && {}",
            stamp("stop-begin"),
            crate::web::nginx_stop_command(prefix),
            stamp("stop-end")
        );
        let start = format!(
            "{} && {} && {}",
            stamp("start-begin"),
            crate::web::nginx_start_command(prefix),
            stamp("start-end")
        );
        // A booted host's nginx is a systemd unit: the role's systemd path.
        let (stop, start) = match fleet.kind {
            HostKind::Netns => (stop, start),
            HostKind::Booted => (String::new(), String::new()),
        };
        let vars = serde_json::json!({
            "drain_enabled": self.drain_enabled,
            "drain_service": "nginx",
            "drain_ports": [WEB_PORT],
            "drain_ttl": self.ttl,
            "drain_policy": self.policy,
            "drain_attach": "xdp",
            "drain_wait_timeout": "60s",
            // Longer than the ~1 s gaps of nginx's limit_rate, which sends each second's
            // allowance in one burst: a download must not look idle between bursts.
            "drain_idle": IDLE,
            "drain_wait_for_lb": self.wait_for_lb,
            "drain_stop_command": stop,
            "drain_start_command": start,
            "drain_deploy_tasks": d.join("deploy.yml"),
            "drain_ready_url": format!("http://127.0.0.1:{WEB_PORT}/healthz"),
            "drain_ready_timeout": 20,
            "fleet_version": self.version,
            "fleet_lb_stats": format!("http://{}:{LB_STATS_PORT}/stats;csv", fleet.lb_addr),
        });
        // JSON is YAML: the vars go in as one flow mapping.
        format!(
            "# Generated by tests/src/fleet.rs: roll {version} over the fleet, two hosts at a time.
- name: roll {version} over the fleet
  hosts: web
  serial: 2
  max_fail_percentage: 0
  gather_facts: false
  vars: {vars}
  roles:
    - role: drain.host.rolling_deploy
  post_tasks:
    # Move on only once the balancer sends this host requests again: with two hosts out
    # at a time, the next batch must not start before this one is back.
    - name: wait until the balancer has this host UP again
      ansible.builtin.uri:
        url: \"{{{{ fleet_lb_stats }}}}\"
        return_content: true
      register: fleet_lb
      until: fleet_lb.content is regex('(?m)^fleet,' ~ inventory_hostname ~ ',(?:[^,]*,){{15}}UP,')
      retries: 200
      delay: 0.1
      delegate_to: localhost
    - name: keep the role's report of this host for the test
      ansible.builtin.copy:
        content: \"{{{{ drain_report | to_json }}}}\"
        dest: \"{{{{ fleet_host_dir }}}}/drain-report.json\"
        mode: \"0644\"
      when: drain_report is defined
",
            version = self.version,
        )
    }
}

/// The caller's deploy tasks, included by the role between stop and start: record what
/// drain says about this host while it is out of service, then put the new content in place.
const DEPLOY_TASKS: &str = r#"# Generated by tests/src/fleet.rs: the deploy, between the role's stop and start.
- name: record the gate while this host is deployed
  ansible.builtin.shell: "{{ drain_binary }} status --json > {{ fleet_host_dir }}/gate-during-deploy.json"
  changed_when: false
- name: new /version
  ansible.builtin.copy:
    content: "{{ fleet_version }}\n"
    dest: "{{ fleet_host_dir }}/html/version"
    mode: "0644"
- name: new index page
  ansible.builtin.copy:
    content: "<html><body>drain test site, {{ fleet_version }}</body></html>\n"
    dest: "{{ fleet_host_dir }}/html/index.html"
    mode: "0644"
"#;

/// A running ansible-playbook.
pub struct Playbook {
    child: Option<Child>,
    pub log: PathBuf,
    pub started: f64,
}

impl Playbook {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the end; whether it succeeded.
    pub fn wait(&mut self, timeout: Duration) -> bool {
        let child = self.child.as_mut().expect("playbook already reaped");
        let t = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return st.success();
            }
            assert!(
                t.elapsed() < timeout,
                "ansible-playbook ran for over {timeout:?}; its log:\n{}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL to its whole process group (ansible-playbook, its forks, their ssh clients).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_group(c.id() as i32, libc::SIGKILL);
            let _ = c.wait();
        }
    }
}

impl Drop for Playbook {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Clone, Debug)]
pub enum Change {
    /// The host's new status in HAProxy.
    Lb(String),
    /// The host's gate appeared (true) or went away (false).
    Gate(bool),
}

#[derive(Clone, Debug)]
pub struct Event {
    pub t: f64,
    pub host: String,
    pub what: Change,
}

pub struct Observer {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Vec<Event>>>,
}

impl Observer {
    pub fn finish(mut self) -> Vec<Event> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().expect("observer thread")
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The virtualenv with ansible-core, made once under target/fleet-venv (a later run reuses
/// it; a half-made one, without its marker, is made again). Serialized by a file lock, so
/// two test processes cannot build it at once.
pub fn ansible_venv() -> PathBuf {
    static IN_PROCESS: Mutex<()> = Mutex::new(());
    let _g = IN_PROCESS.lock().unwrap_or_else(|e| e.into_inner());
    let target = target_dir();
    fs::create_dir_all(&target).unwrap();
    let lock = fs::File::create(target.join("fleet-venv.lock")).unwrap();
    // SAFETY: flock on an fd we own; released when `lock` is closed.
    let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
    let venv = target.join("fleet-venv");
    let marker = venv.join(".drain-installed");
    if fs::read_to_string(&marker).is_ok_and(|m| m == ANSIBLE_CORE) {
        return venv;
    }
    let _ = fs::remove_dir_all(&venv);
    eprintln!("fleet: making {} with {ANSIBLE_CORE}", venv.display());
    // Debian's python (python3-venv), not whatever `python3` is first on PATH.
    run_ok(
        Command::new("/usr/bin/python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv),
    );
    run_ok(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", ANSIBLE_CORE])
            .env_remove("PIP_REQUIRE_VIRTUALENV"),
    );
    fs::write(&marker, ANSIBLE_CORE).unwrap();
    venv
}

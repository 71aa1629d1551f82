//! Telling the balancer first: `drain-user agent` behind systemd-style socket activation
//! (Debian's `systemd-socket-activate`, the same LISTEN_FDS hand-over as a `.socket` unit),
//! read by a real HAProxy, and `gate on --announce`.
//!
//! The drill: a balancer namespace (HAProxy, wrk) and two host namespaces (nginx on
//! [`WEB`], the agent on [`AGENT`]). HAProxy opens one connection to a server per request
//! (`http-server-close`), so every request it sends a host is a SYN the gate sees. A rolling
//! restart of both hosts under load, three ways, in one run:
//! - **agent-check**: `agent-check` on the agent's port (health check: a TCP connect there);
//!   `gate on --announce`: the agent says `drain`, HAProxy stops sending, `wait` sees the
//!   port quiet and closes the gate. 0 failed requests, **0 refused SYNs**. The negative
//!   run: the same `gate on` without `--announce` under the same load refuses SYNs.
//! - **httpchk on the agent**: `option httpchk` aimed at the agent's HTTP answer
//!   (`503 draining`); same claims.
//! - **health checks only** (the old way): `httpchk` on nginx itself; the closed gate
//!   refuses the checks and the host goes DOWN after `fall` of them.
//!
//! Each way's per-host out-of-service time (HAProxy's own view of the server, polled from
//! its admin socket) is printed as a table: figures to report, not asserted.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use drain_tests::{
    drain_user_bin,
    fleet::pids_in,
    netns::ip,
    require_root,
    web::{
        connects, haproxy_head, haproxy_spawn, kill_group, ns_cmd, run_ok, show_stat, wait_until,
        Daemon, Mix, Nginx, Pick, TempDir, Wrk, WrkResult,
    },
};

const WEB: u16 = 8080;
const AGENT: u16 = 9707;
const LB: u16 = 80;
/// HAProxy's check and agent-check interval.
const INTER_MS: u32 = 300;
/// `gate on --quiet` in the drill: well over the time HAProxy takes to act on the agent's
/// answer (its next check, ~0.1 s for the agent to start and answer, under load).
const QUIET: &str = "2s";
const SOCKET_ACTIVATE: &str = "/usr/bin/systemd-socket-activate";

/// Debian's `systemd-socket-activate` (package systemd), installed when missing: it passes
/// a listening socket, or each accepted connection, exactly as a `.socket` unit does.
fn ensure_socket_activate() {
    if Path::new(SOCKET_ACTIVATE).exists() {
        return;
    }
    eprintln!("agent tests: installing systemd for {SOCKET_ACTIVATE}");
    run_ok(Command::new("apt-get").args(["-o", "DPkg::Lock::Timeout=600", "update", "-qq"]));
    run_ok(
        Command::new("apt-get")
            .args([
                "-o",
                "DPkg::Lock::Timeout=600",
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "systemd",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    );
    assert!(
        Path::new(SOCKET_ACTIVATE).exists(),
        "systemd installed no {SOCKET_ACTIVATE}"
    );
}

/// How systemd-socket-activate hands over the socket.
#[derive(Clone, Copy)]
enum Activation {
    /// `Accept=yes`: one agent per connection, the connection on fd 3 (LISTEN_FDS=1).
    Accept,
    /// inetd: one agent per connection, the connection on stdin/stdout.
    Inetd,
    /// `Accept=no`: one agent, the listening socket on fd 3.
    Listen,
}

/// `drain-user agent` behind systemd-socket-activate in namespace `ns`, on `addr`.
fn start_agent(ns: &str, addr: SocketAddr, how: Activation, log: &Path) -> Daemon {
    ensure_socket_activate();
    let mut cmd = ns_cmd(ns, SOCKET_ACTIVATE);
    match how {
        Activation::Accept => {
            cmd.arg("--accept");
        }
        Activation::Inetd => {
            cmd.arg("--inetd");
        }
        Activation::Listen => {}
    }
    cmd.arg("-l")
        .arg(addr.to_string())
        .arg(drain_user_bin())
        .args(["agent", "--weight", "100"]);
    let mut d = Daemon::spawn("systemd-socket-activate", cmd, log);
    let pid = d.pid();
    wait_until(
        "the agent's socket listens",
        Duration::from_secs(10),
        || {
            d.assert_running();
            drain_tests::web::listening(pid, addr.port())
        },
    );
    d
}

/// Sends `req` to the agent at `addr` from namespace `ns` and reads until it closes.
fn ask(ns: &str, addr: SocketAddr, req: &[u8]) -> String {
    let req = req.to_vec();
    drain_tests::netns::in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        if !req.is_empty() {
            s.write_all(&req).unwrap();
        }
        let mut out = Vec::new();
        s.read_to_end(&mut out)
            .unwrap_or_else(|e| panic!("reading the agent's answer: {e}"));
        String::from_utf8_lossy(&out).into_owned()
    })
}

fn drain(ns: &str, args: &[&str]) -> Output {
    ns_cmd(ns, drain_user_bin())
        .args(args)
        .output()
        .expect("run drain-user")
}

#[track_caller]
fn drain_ok(ns: &str, args: &[&str]) -> String {
    let o = drain(ns, args);
    assert!(
        o.status.success(),
        "drain-user {args:?} in {ns}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn status(ns: &str) -> serde_json::Value {
    serde_json::from_str(&drain_ok(ns, &["status", "--json"])).unwrap()
}

fn port_counter(st: &serde_json::Value, port: u16, key: &str) -> u64 {
    st["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["port"] == port))
        .and_then(|p| p[key].as_u64())
        .unwrap_or_else(|| panic!("no {key} for port {port}: {st}"))
}

/// Namespaces made by this file, and everything in them: processes killed, gates off,
/// namespaces deleted, on drop.
struct Namespaces(Vec<String>);

impl Namespaces {
    fn add(&mut self, role: &str) -> String {
        use std::sync::atomic::AtomicU32;
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "drain-ag-{:x}x{}-{role}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        self.0.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        name
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            for pid in pids_in(ns) {
                kill_group(pid, libc::SIGKILL);
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let t = Instant::now();
        while self.0.iter().any(|ns| !pids_in(ns).is_empty()) && t.elapsed().as_secs() < 5 {
            thread::sleep(Duration::from_millis(20));
        }
        for ns in &self.0 {
            let _ = drain(ns, &["gate", "off"]);
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// One host: nginx on WEB, the agent (Accept=yes style) on AGENT.
struct Host {
    name: String,
    ns: String,
    addr: Ipv4Addr,
    nginx: Nginx,
    _agent: Daemon,
}

/// The balancer's namespace, its address, and the hosts, joined by one veth pair each.
struct Drill {
    hosts: Vec<Host>,
    lb_ns: String,
    lb_addr: Ipv4Addr,
    dir: TempDir,
    _nets: Namespaces,
}

impl Drill {
    fn new() -> Self {
        require_root();
        let dir = TempDir::new("agent");
        let mut nets = Namespaces(vec![]);
        let lb_ns = nets.add("lb");
        let lb_addr = Ipv4Addr::new(198, 19, 7, 1);
        let mut hosts = vec![];
        for i in 0..2u8 {
            let name = format!("h{}", i + 1);
            let ns = nets.add(&name);
            let (lb_side, host_side) = (
                Ipv4Addr::new(198, 19, 7, 4 * i + 1),
                Ipv4Addr::new(198, 19, 7, 4 * i + 2),
            );
            let (va, vb) = (format!("agl{i}"), format!("agh{i}"));
            ip(&[
                "-n", &lb_ns, "link", "add", &va, "type", "veth", "peer", "name", &vb, "netns", &ns,
            ]);
            ip(&[
                "-n",
                &lb_ns,
                "addr",
                "add",
                &format!("{lb_side}/30"),
                "dev",
                &va,
            ]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{host_side}/30"),
                "dev",
                &vb,
            ]);
            ip(&["-n", &lb_ns, "link", "set", &va, "up"]);
            ip(&["-n", &ns, "link", "set", &vb, "up"]);
            let hdir = dir.path().join(&name);
            fs::create_dir_all(&hdir).unwrap();
            let nginx = Nginx::new(&ns, &hdir, &format!("{host_side}:{WEB}"), WEB, "v1");
            let agent = start_agent(
                &ns,
                SocketAddr::V4(SocketAddrV4::new(host_side, AGENT)),
                Activation::Accept,
                &hdir.join("agent.log"),
            );
            hosts.push(Host {
                name,
                ns,
                addr: host_side,
                nginx,
                _agent: agent,
            });
        }
        Drill {
            hosts,
            lb_ns,
            lb_addr,
            dir,
            _nets: nets,
        }
    }
}

/// What HAProxy asks the hosts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Checks {
    /// agent-check on the agent's port; the health check a TCP connect there.
    Agent,
    /// httpchk aimed at the agent's HTTP answer.
    AgentHttp,
    /// httpchk on nginx itself: the gate refuses the checks (the old way).
    HealthOnly,
}

impl Checks {
    fn name(self) -> &'static str {
        match self {
            Checks::Agent => "agent-check",
            Checks::AgentHttp => "httpchk on the agent",
            Checks::HealthOnly => "health checks only",
        }
    }
}

struct Balancer {
    _daemon: Daemon,
    sock: PathBuf,
    /// (time, server, status) at every change, polled every 10 ms.
    seen: Arc<Mutex<Vec<(Instant, String, String)>>>,
    stop: Arc<AtomicBool>,
    poller: Option<thread::JoinHandle<()>>,
}

impl Balancer {
    fn start(d: &Drill, checks: Checks) -> Self {
        let dir = d.dir.path().join(format!("lb-{checks:?}"));
        fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("admin.sock");
        let check = match checks {
            Checks::Agent => format!(
                "    default-server inter {INTER_MS}ms fall 2 rise 2\n"
            ),
            Checks::AgentHttp => format!(
                "    option httpchk GET /\n    http-check expect status 200\n    default-server inter {INTER_MS}ms fall 2 rise 2\n"
            ),
            Checks::HealthOnly => format!(
                "    option httpchk GET /healthz\n    http-check expect status 200\n    default-server inter {INTER_MS}ms fall 2 rise 2\n"
            ),
        };
        let mut cfg = haproxy_head(&sock, "1s");
        cfg.push_str(&format!(
            "frontend web
    bind {lb}:{LB}
    default_backend fleet
backend fleet
    balance roundrobin
    # One server connection per request: each request HAProxy sends a host is a SYN.
    option http-server-close
    http-reuse never
{check}",
            lb = d.lb_addr,
        ));
        for h in &d.hosts {
            let server = match checks {
                Checks::Agent => format!(
                    "check port {AGENT} agent-check agent-port {AGENT} agent-inter {INTER_MS}ms"
                ),
                Checks::AgentHttp => format!("check port {AGENT}"),
                Checks::HealthOnly => "check".into(),
            };
            cfg.push_str(&format!(
                "    server {} {}:{WEB} {server}\n",
                h.name, h.addr
            ));
        }
        let daemon = haproxy_spawn(&d.lb_ns, &dir, &cfg, &sock);
        wait_until("every host UP in haproxy", Duration::from_secs(15), || {
            let st = show_stat(&sock);
            d.hosts
                .iter()
                .all(|h| st.get(&h.name).is_some_and(|s| s == "UP"))
        });
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let poller = {
            let (seen, stop, sock) = (seen.clone(), stop.clone(), sock.clone());
            thread::spawn(move || {
                let mut last: BTreeMap<String, String> = BTreeMap::new();
                while !stop.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    for (server, st) in show_stat(&sock) {
                        if last.get(&server) != Some(&st) {
                            seen.lock().unwrap().push((now, server.clone(), st.clone()));
                            last.insert(server, st);
                        }
                    }
                    thread::sleep(Duration::from_millis(10));
                }
            })
        };
        Balancer {
            _daemon: daemon,
            sock,
            seen,
            stop,
            poller: Some(poller),
        }
    }

    fn state(&self, server: &str) -> String {
        show_stat(&self.sock)
            .get(server)
            .cloned()
            .unwrap_or_default()
    }

    /// Time `server` spent out of service (any status but "UP..." ) between `from` and now,
    /// and when it first left service after `from`.
    fn out_of_service(
        &self,
        server: &str,
        from: Instant,
    ) -> (Duration, Option<Duration>, Vec<String>) {
        let seen = self.seen.lock().unwrap();
        let mut out = Duration::ZERO;
        let mut since: Option<Instant> = None;
        let mut first = None;
        let mut states = vec![];
        for (t, s, st) in seen.iter().filter(|(_, s, _)| s == server) {
            let _ = s;
            let in_service = st.starts_with("UP");
            if *t < from {
                since = (!in_service).then_some(from);
                continue;
            }
            states.push(format!(
                "{st} @{:.2}s",
                t.duration_since(from).as_secs_f64()
            ));
            match (in_service, since) {
                (false, None) => {
                    since = Some(*t);
                    first.get_or_insert(t.duration_since(from));
                }
                (true, Some(s0)) => {
                    out += t.duration_since(s0);
                    since = None;
                }
                _ => {}
            }
        }
        if let Some(s0) = since {
            out += s0.elapsed();
        }
        (out, first, states)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(p) = self.poller.take() {
            let _ = p.join();
        }
    }
}

/// The load through the balancer: short requests, and 6 s downloads always in flight.
struct Load {
    fast: Wrk,
    slow: Wrk,
}

impl Load {
    fn start(d: &Drill, tag: &str) -> Self {
        let url = format!("http://{}:{LB}", d.lb_addr);
        let dur = Duration::from_secs(120);
        let fast = Wrk::start(
            &d.lb_ns,
            &d.dir.path().join(format!("fast-{tag}.lua")),
            &url,
            16,
            dur,
            &Mix {
                paths: &["/", "/version"],
                pick: Pick::InTurn,
                pause_ms: 10,
            },
        );
        let slow = Wrk::start(
            &d.lb_ns,
            &d.dir.path().join(format!("slow-{tag}.lua")),
            &url,
            4,
            dur,
            &Mix {
                paths: &["/slow/6.bin"],
                pick: Pick::InTurn,
                pause_ms: 0,
            },
        );
        thread::sleep(Duration::from_secs(2));
        Load { fast, slow }
    }

    #[track_caller]
    fn assert_running(&mut self, when: &str) {
        assert!(
            self.fast.running() && self.slow.running(),
            "wrk is not running {when}: the restart would not be under load"
        );
    }

    fn stop(self) -> (WrkResult, WrkResult) {
        (self.fast.stop(), self.slow.stop())
    }
}

/// One host's cycle and what it cost.
struct Cycle {
    host: String,
    /// How the announcement ended (`wait`'s "closed" event), if there was one.
    closed: Option<String>,
    refused: u64,
    /// From the end of `gate on` until HAProxy took the host out.
    to_out: Option<Duration>,
    /// Time HAProxy had the host out of service in this cycle.
    out: Duration,
    /// From the end of `gate off` until HAProxy had the host UP again.
    back: Option<Duration>,
    states: Vec<String>,
}

/// gate on [--announce] → [the old fixed pause: until HAProxy has the host down] → wait →
/// restart nginx → gate off → until HAProxy has it UP again.
fn cycle(lb: &Balancer, load: &mut Load, h: &Host, announce: bool) -> Cycle {
    load.assert_running("before the cycle");
    let agent_port = AGENT.to_string();
    let mut on = vec![
        "gate",
        "on",
        "--port",
        "8080",
        "--ttl",
        "2m",
        "--agent-port",
        &agent_port,
    ];
    if announce {
        on.extend(["--announce", "6s", "--quiet", QUIET]);
    }
    // HAProxy may act on the new state before `gate on` has exited (the config is its last
    // write): out-of-service is counted from the start of `gate on`, the time to leave
    // rotation from its end (0 when HAProxy was quicker than the process exit).
    let t_start = Instant::now();
    drain_ok(&h.ns, &on);
    let t0 = Instant::now();
    if !announce {
        wait_until(
            "haproxy takes the gated host out",
            Duration::from_secs(10),
            || !lb.state(&h.name).starts_with("UP"),
        );
    }
    let waited = drain_ok(
        &h.ns,
        &["wait", "--timeout", "60s", "--idle", "2s", "--json"],
    );
    let events: Vec<serde_json::Value> = waited
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let closed = events.iter().find(|e| e["event"] == "closed").map(|e| {
        format!(
            "{} @{:.2}s",
            e["reason"].as_str().unwrap_or("?"),
            e["elapsed_ms"].as_f64().unwrap_or(0.0) / 1000.0
        )
    });
    if announce {
        assert!(closed.is_some(), "wait printed no closed event: {waited}");
    }
    load.assert_running("before the restart");
    h.nginx.stop();
    h.nginx.start();
    let st = status(&h.ns);
    let refused = port_counter(&st, WEB, "syns_refused");
    // Taken before `gate off` runs: the agent answers "up" from the moment the gate's switch
    // flips, which is before the command returns (it still detaches links), and HAProxy may
    // ask in between.
    let t_off = Instant::now();
    drain_ok(&h.ns, &["gate", "off"]);
    wait_until(
        "haproxy has the host UP again",
        Duration::from_secs(20),
        || lb.state(&h.name) == "UP",
    );
    load.assert_running("after the cycle");
    // The poller's own record of it, which the figures are computed from.
    wait_until(
        "the poller saw the host UP",
        Duration::from_secs(20),
        || {
            lb.seen
                .lock()
                .unwrap()
                .iter()
                .any(|(t, s, st)| *t >= t_off && *s == h.name && st == "UP")
        },
    );
    let (out, to_out, states) = lb.out_of_service(&h.name, t_start);
    let to_out = to_out.map(|t| t.saturating_sub(t0.duration_since(t_start)));
    let back = lb
        .seen
        .lock()
        .unwrap()
        .iter()
        .find(|(t, s, st)| *t >= t_off && *s == h.name && st.starts_with("UP"))
        .map(|(t, _, _)| t.duration_since(t_off));
    Cycle {
        host: h.name.clone(),
        closed,
        refused,
        to_out,
        out,
        back,
        states,
    }
}

/// A rolling restart of both hosts under load with HAProxy asking `checks`.
fn rolling(d: &Drill, checks: Checks, announce: bool) -> (Vec<Cycle>, WrkResult, WrkResult) {
    let lb = Balancer::start(d, checks);
    let mut load = Load::start(d, &format!("{checks:?}"));
    let cycles: Vec<Cycle> = d
        .hosts
        .iter()
        .map(|h| cycle(&lb, &mut load, h, announce))
        .collect();
    thread::sleep(Duration::from_secs(1));
    load.assert_running("at the end");
    let (fast, slow) = load.stop();
    (cycles, fast, slow)
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn announce_and_agent_check_restart_a_fleet_under_load_refusing_no_syn() {
    let d = Drill::new();
    let mut table = vec![];
    for checks in [Checks::Agent, Checks::AgentHttp] {
        let (cycles, fast, slow) = rolling(&d, checks, true);
        for c in &cycles {
            println!(
                "{}: {} closed by {:?}, {} refused SYNs, out after {:?}, out of service {:?} ({:?})",
                checks.name(),
                c.host,
                c.closed,
                c.refused,
                c.to_out,
                c.out,
                c.states
            );
        }
        println!("{}: load {fast:?} / {slow:?}", checks.name());
        for r in [&fast, &slow] {
            assert_eq!(
                (r.non_2xx, r.failures()),
                (0, 0),
                "{}: requests failed during the rolling restart: {}",
                checks.name(),
                r.text
            );
        }
        for c in &cycles {
            assert_eq!(
                c.refused,
                0,
                "{}: the gate refused SYNs to {} although the balancer was told first",
                checks.name(),
                c.host
            );
            let want = if checks == Checks::Agent {
                "DRAIN"
            } else {
                "DOWN"
            };
            assert!(
                c.states.iter().any(|s| s.starts_with(want)),
                "{}: HAProxy never had {} {want}: {:?}",
                checks.name(),
                c.host,
                c.states
            );
        }
        table.push((checks, cycles));
    }

    // The negative run: the same gate without --announce, under the same load, with the
    // agent: HAProxy learns at its next agent check, and meanwhile its new connections to
    // the host are refused.
    {
        let lb = Balancer::start(&d, Checks::Agent);
        let mut load = Load::start(&d, "negative");
        let h = &d.hosts[0];
        load.assert_running("before the negative run");
        drain_ok(
            &h.ns,
            &[
                "gate",
                "on",
                "--port",
                "8080",
                "--ttl",
                "2m",
                "--agent-port",
                "9707",
            ],
        );
        thread::sleep(Duration::from_millis(1500));
        load.assert_running("during the negative run");
        let refused = port_counter(&status(&h.ns), WEB, "syns_refused");
        drain_ok(&h.ns, &["gate", "off"]);
        wait_until(
            "haproxy has the host UP again",
            Duration::from_secs(20),
            || lb.state(&h.name) == "UP",
        );
        // The downloads have not finished yet: only the short requests report.
        let _ = load.fast.stop();
        println!("without --announce: {refused} refused SYNs in 1.5 s");
        assert!(
            refused > 0,
            "without --announce the gate refused no SYN under load: the 0 above proves nothing"
        );
    }

    // The old way, measured in the same run.
    let (cycles, fast, slow) = rolling(&d, Checks::HealthOnly, false);
    for c in &cycles {
        println!(
            "health checks only: {} {} refused SYNs, out after {:?}, out of service {:?} ({:?})",
            c.host, c.refused, c.to_out, c.out, c.states
        );
    }
    println!("health checks only: load {fast:?} / {slow:?}");
    table.push((Checks::HealthOnly, cycles));

    println!(
        "\n| balancer learns through | host | out of rotation after `gate on` | back in rotation after `gate off` | out of service per host | refused SYNs |"
    );
    println!("|---|---|---|---|---|---|");
    for (checks, cycles) in &table {
        for c in cycles {
            println!(
                "| {} | {} | {} | {} | {:.2} s | {} |",
                checks.name(),
                c.host,
                c.to_out
                    .map_or("-".into(), |t| format!("{:.2} s", t.as_secs_f64())),
                c.back
                    .map_or("-".into(), |t| format!("{:.2} s", t.as_secs_f64())),
                c.out.as_secs_f64(),
                c.refused
            );
        }
    }
}

/// The agent's answers, by itself: fail open without a gate, the announcement's phases,
/// maint, the TTL, the agent port refused as a gated port, malformed requests, the
/// activation modes, and nothing left behind by a killed agent.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn agent_answers_every_phase_and_bad_input_gets_one_line() {
    require_root();
    let dir = TempDir::new("agent-bad");
    let mut nets = Namespaces(vec![]);
    let ns = nets.add("one");
    let local = |port| SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    let (inetd_addr, accept_addr, listen_addr) = (local(AGENT), local(AGENT + 1), local(AGENT + 2));
    let inetd = start_agent(
        &ns,
        inetd_addr,
        Activation::Inetd,
        &dir.path().join("inetd.log"),
    );
    let _accept = start_agent(
        &ns,
        accept_addr,
        Activation::Accept,
        &dir.path().join("accept.log"),
    );
    let mut listen = start_agent(
        &ns,
        listen_addr,
        Activation::Listen,
        &dir.path().join("listen.log"),
    );
    let state_dir = drain_tests::netns::drain_state_dir(&ns);

    // No gate: ready (fail open), in every mode, and no state made.
    for a in [inetd_addr, accept_addr, listen_addr] {
        assert_eq!(ask(&ns, a, b""), "ready 100%\n", "{a}");
    }
    let http = ask(
        &ns,
        accept_addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(http.starts_with("HTTP/1.0 200 ready\r\n"), "{http}");
    assert!(http.contains(r#""gate":"none""#), "{http}");
    assert!(
        !state_dir.exists(),
        "the agent made state: {}",
        state_dir.display()
    );

    // Bad input: one line, then the connection closes.
    for (req, want) in [
        (
            &b"\x00\x01\x02 binary\n"[..],
            "expected nothing (agent-check)",
        ),
        (b"GET\r\n\r\n", "malformed HTTP request line"),
        (b"POST / HTTP/1.1\r\n\r\n", "only GET and HEAD"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n", "incomplete HTTP request"),
    ] {
        let got = ask(&ns, accept_addr, req);
        assert_eq!(got.lines().count(), 1, "{req:?}: {got:?}");
        assert!(
            got.starts_with("drain-user agent: error: ")
                && got.contains(want)
                && got.ends_with('\n'),
            "{req:?}: {got:?}"
        );
    }
    // An agent-send line is an agent check.
    assert_eq!(ask(&ns, accept_addr, b"be_web/h1\n"), "ready 100%\n");
    // Not started on a socket: one line, exit 2.
    let o = drain(&ns, &["agent"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("is not a TCP socket"), "{err}");

    // gate on refuses a port list covering the agent's port: one line, no state.
    for (args, env) in [
        (
            vec!["gate", "on", "--port", "8080,9707", "--agent-port", "9707"],
            None,
        ),
        (vec!["gate", "on", "--port", "9707"], Some("9707")),
    ] {
        let mut cmd = ns_cmd(&ns, drain_user_bin());
        cmd.args(&args);
        if let Some(p) = env {
            cmd.env("DRAIN_AGENT_PORT", p);
        }
        let o = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("port 9707 is the drain agent's port"), "{err}");
        assert!(!state_dir.exists(), "a refused gate on left state");
    }

    // Announced: drain at once, while the kernel still accepts; status says so.
    let l = drain_tests::netns::in_netns(&ns, || {
        std::net::TcpListener::bind("127.0.0.1:8080").unwrap()
    });
    drain_ok(
        &ns,
        &[
            "gate",
            "on",
            "--port",
            "8080",
            "--announce",
            "3s",
            "--ttl",
            "1m",
            "--agent-port",
            "9707",
        ],
    );
    let t_on = Instant::now();
    for a in [inetd_addr, accept_addr, listen_addr] {
        assert_eq!(ask(&ns, a, b""), "drain\n", "{a}");
    }
    let http = ask(&ns, accept_addr, b"GET / HTTP/1.0\r\n\r\n");
    assert!(http.starts_with("HTTP/1.0 503 draining\r\n"), "{http}");
    assert!(http.contains(r#""gate":"announced""#), "{http}");
    let st = status(&ns);
    assert_eq!(
        (st["gate"].as_str(), st["announced"].as_bool()),
        (Some("on"), Some(true)),
        "{st}"
    );
    assert!(
        connects(&ns, local(WEB), Duration::from_millis(500)),
        "refused while announced"
    );
    // After the delay the kernel refuses by itself, with no process running.
    thread::sleep(
        Duration::from_secs(3).saturating_sub(t_on.elapsed()) + Duration::from_millis(100),
    );
    assert!(
        !connects(&ns, local(WEB), Duration::from_millis(500)),
        "accepted after the delay"
    );
    let st = status(&ns);
    assert_eq!(
        (st["announced"].as_bool(), st["closes_in_ms"].is_null()),
        (Some(false), true),
        "{st}"
    );
    assert_eq!(ask(&ns, accept_addr, b""), "drain\n");
    let http = ask(&ns, accept_addr, b"HEAD / HTTP/1.0\r\n\r\n");
    assert!(
        http.starts_with("HTTP/1.0 503 draining\r\n") && http.ends_with("\r\n\r\n"),
        "{http:?}"
    );
    drop(l);

    // maint, then a TTL that runs out: ready again, with the gate still pinned.
    drain_ok(
        &ns,
        &["gate", "on", "--port", "8080", "--maint", "--ttl", "1s"],
    );
    assert_eq!(ask(&ns, accept_addr, b""), "maint\n");
    let http = ask(&ns, accept_addr, b"GET / HTTP/1.0\r\n\r\n");
    assert!(
        http.starts_with("HTTP/1.0 503 draining\r\n") && http.contains(r#""state":"maint""#),
        "{http}"
    );
    thread::sleep(Duration::from_millis(1200));
    assert_eq!(ask(&ns, accept_addr, b""), "ready 100%\n");
    assert!(ask(&ns, accept_addr, b"GET / HTTP/1.0\r\n\r\n").contains(r#""gate":"expired""#));

    // A killed agent leaves nothing behind: the pins are the gate's, unchanged, and no
    // agent process is left in the namespace.
    let pins = |p: &Path| {
        let mut v: Vec<_> = fs::read_dir(p)
            .map(|r| r.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        v.sort();
        v
    };
    let before = pins(&state_dir);
    let slow = drain_tests::netns::in_netns(&ns, move || {
        // A client that connects and says nothing holds an agent mid-answer.
        TcpStream::connect(listen_addr).unwrap()
    });
    kill_group(listen.pid(), libc::SIGKILL);
    wait_until(
        "the listening agent is gone",
        Duration::from_secs(5),
        || !listen.running(),
    );
    drop(slow);
    drop(inetd);
    assert_eq!(pins(&state_dir), before, "a killed agent changed the pins");
    let left: Vec<i32> = drain_tests::fleet::drain_processes_in(&ns);
    assert!(left.is_empty(), "agent processes left: {left:?}");
    drain_ok(&ns, &["gate", "off"]);
    assert!(!state_dir.exists());
}

/// The shipped units load cleanly in systemd (`systemd-analyze verify`, no warning) and keep
/// their contract: a socket with Accept=yes and a template service that runs the agent.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn agent_units_verify() {
    require_root();
    ensure_socket_activate();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/systemd/verify-agent.sh");
    let out = Command::new(&script)
        .arg(drain_user_bin())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed: {}{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

//! A real Docker: nginx in a container with a published port (`docker run -p 8080:80`) is
//! restarted with `docker restart` while wrk sends traffic, and with drain on the host's
//! published port (`gate on --port 8080` → `wait --idle` → `docker restart` → `gate off`)
//! no request fails, while the same restart under the same load without drain fails some.
//!
//! Namespace `a` is the Docker host: a dockerd the test starts there ([`Dockerd`]), the
//! container "web" publishing 8080 (DNAT to the container's port 80: the accepted sockets
//! live only in the container's network namespace), and a plain nginx "spare" on 8081 that
//! keeps serving, as the rest of a fleet would. Namespace `b` holds the clients:
//! - HAProxy pooling keep-alive connections to both, with wrk behind it (short requests and
//!   6–14 s downloads, so responses are in flight at every moment);
//! - a trickle of NEW connections straight at the published port, one every 100 ms, each
//!   with a blocking connect()'s patience (the kernel's SYN retries, ~127 s): with the gate's policy `drop` the ones that
//!   arrive while the host is drained and restarting retry their SYN and get in once the
//!   gate opens.
//!
//! The container stops with SIGQUIT (nginx's graceful stop) and `docker restart -t 5`: like
//! Debian's init script, a response still running 5 s into the stop is cut (SIGKILL).
//! Docker makes a new network namespace for the container at every start, so only a gate
//! where the port is published (the host) holds for the whole restart.

use std::{
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use drain_tests::{
    cli::{port_status, Drain},
    docker::Dockerd,
    drain_user_bin,
    netns::NetNsPair,
    require_root,
    web::{
        connects, ns_cmd, wait_until, Attempt, Backend, HaProxy, Load, Nginx, TempDir, Trickle,
        WrkResult,
    },
};

/// The published port of the container.
const WEB: u16 = 8080;
/// The spare backend's port (a plain nginx in the host namespace, not gated).
const SPARE: u16 = 8081;
const LB: u16 = 8000;
/// wrk's own end (`-d`): far beyond the restart, which must happen while it still runs
/// (the test stops wrk itself once the container is back). The role's cycle alone took
/// over two minutes on a loaded 2-core machine.
const LOAD_SECS: u64 = 900;
/// `docker restart -t`: seconds between SIGQUIT and SIGKILL.
const STOP_TIMEOUT: &str = "5";
/// One new client every this long, straight at the published port.
const TRICKLE_EVERY: Duration = Duration::from_millis(100);

/// Field order is drop order: load and clients first, then dockerd (its namespace, the
/// pair, outlives the world).
struct World<'p> {
    load: Option<Load>,
    trickle: Option<Trickle>,
    lb: HaProxy,
    _spare: Nginx,
    docker: Dockerd,
    dir: TempDir,
    pair: &'p NetNsPair,
}

/// What one run measured.
struct Run {
    wrk: WrkResult,
    attempts: Vec<Attempt>,
    restart: Duration,
    restarted_at: (Instant, Instant),
}

impl Run {
    fn failed_attempts(&self) -> Vec<&Attempt> {
        self.attempts.iter().filter(|a| !a.ok()).collect()
    }

    /// Clients that started connecting while the container was being restarted.
    fn opened_during_restart(&self) -> usize {
        let (from, to) = self.restarted_at;
        self.attempts
            .iter()
            .filter(|a| a.started >= from && a.started <= to)
            .count()
    }

    fn summary(&self) -> String {
        let failed = self.failed_attempts();
        let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
        for a in &failed {
            let k = match &a.result {
                Ok(code) => format!("HTTP {code}"),
                Err(e) => e.clone(),
            };
            *kinds.entry(k).or_default() += 1;
        }
        format!(
            "restart took {:?}; wrk: {} requests, {} non-2xx, {} socket errors (connect {}, read {}, write {}, timeout {}); \
             new connections: {} opened, {} while the container restarted, {} failed {kinds:?}",
            self.restart,
            self.wrk.requests,
            self.wrk.non_2xx,
            self.wrk.failures() - self.wrk.non_2xx,
            self.wrk.connect_errors,
            self.wrk.read_errors,
            self.wrk.write_errors,
            self.wrk.timeouts,
            self.attempts.len(),
            self.opened_during_restart(),
            failed.len(),
        )
    }
}

impl<'p> World<'p> {
    /// dockerd, the container, the spare, HAProxy, wrk and the trickle running for a few
    /// seconds (pools full, downloads in flight on both backends).
    fn new(pair: &'p NetNsPair, tag: &str) -> Self {
        let dir = TempDir::new(&format!("docker-{tag}"));
        let t = Instant::now();
        let docker = Dockerd::start(pair);
        let up = t.elapsed();
        docker.import_nginx();
        docker.run_nginx("web", WEB, &[]);
        println!(
            "{tag}: dockerd answered after {up:?}; image imported and container running after {:?}",
            t.elapsed()
        );
        let d = dir.path();
        let spare_addr = SocketAddr::new(pair.a_v4.into(), SPARE);
        let spare = Nginx::new(
            &pair.a,
            &d.join("spare"),
            &spare_addr.to_string(),
            SPARE,
            "v1",
        );
        let web_addr = SocketAddr::new(pair.a_v4.into(), WEB);
        let lb_addr = SocketAddr::new(pair.b_v4.into(), LB);
        let lb = HaProxy::start(
            &pair.b,
            &d.join("lb"),
            lb_addr,
            None,
            &[
                Backend {
                    name: "web".into(),
                    addr: web_addr,
                },
                Backend {
                    name: "spare".into(),
                    addr: spare_addr,
                },
            ],
        );
        let load = Load::start(
            &pair.b,
            d,
            &format!("http://{lb_addr}/"),
            16,
            16,
            Duration::from_secs(LOAD_SECS),
        );
        let trickle = Trickle::start(&pair.b, web_addr, "/version", TRICKLE_EVERY);
        thread::sleep(Duration::from_secs(3));
        Self {
            load: Some(load),
            trickle: Some(trickle),
            lb,
            _spare: spare,
            docker,
            dir,
            pair,
        }
    }

    fn web(&self) -> SocketAddr {
        SocketAddr::new(self.pair.a_v4.into(), WEB)
    }

    fn assert_loaded(&mut self, when: &str) {
        let load = self.load.as_mut().unwrap();
        let elapsed = load.fast.started.elapsed();
        assert!(
            load.running() && elapsed + Duration::from_secs(5) < load.fast.duration,
            "wrk is not running {when} (at {elapsed:?} of its {:?}): the restart would not be under load",
            load.fast.duration
        );
    }

    /// `docker restart -t 5 web` under load: asserts wrk runs before and after, waits until
    /// nginx listens in the new container; returns when it began and ended.
    fn restart_under_load(&mut self) -> (Instant, Instant) {
        self.assert_loaded("before the restart");
        let ns_before = self.docker.netns_id("web");
        let t = Instant::now();
        self.docker.run(&["restart", "-t", STOP_TIMEOUT, "web"]);
        self.docker.wait_listening("web");
        let end = Instant::now();
        self.assert_loaded("after the restart");
        let ns_after = self.docker.netns_id("web");
        assert_ne!(
            ns_before, ns_after,
            "docker restart kept the container's network namespace"
        );
        (t, end)
    }

    /// Waits for HAProxy to have the container UP again, lets the load go on for 2 s more,
    /// then stops wrk and the trickle and returns what they saw.
    fn finish(&mut self, restarted_at: (Instant, Instant)) -> Run {
        wait_until(
            "haproxy has the container UP again",
            Duration::from_secs(20),
            || self.lb.servers().get("web").is_some_and(|s| s == "UP"),
        );
        thread::sleep(Duration::from_secs(2));
        self.assert_loaded("at the end");
        let wrk = self.load.take().unwrap().stop();
        let attempts = self.trickle.take().unwrap().finish();
        Run {
            wrk,
            attempts,
            restart: restarted_at.1 - restarted_at.0,
            restarted_at,
        }
    }

    /// Runs `examples/docker/drain-restart web` in the host namespace under load (it finds
    /// the published port itself). The restart window is the whole script run.
    fn restart_with_the_script(&mut self) -> Run {
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        self.assert_loaded("before the script");
        let t = Instant::now();
        let out = ns_cmd(&self.pair.a, repo.join("examples/docker/drain-restart"))
            .args(["--stop-timeout", STOP_TIMEOUT, "--ttl", "2m", "web"])
            .env("DOCKER_HOST", self.docker.host())
            .env("DRAIN_USER", drain_user_bin())
            .output()
            .expect("run examples/docker/drain-restart");
        let end = Instant::now();
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "drain-restart failed:\n{log}");
        println!("drain-restart printed:\n{}", log.trim_end());
        self.assert_loaded("after the script");
        self.finish((t, end))
    }

    /// Runs `ansible/smoke/container.yml` (drain.host.rolling_deploy with `drain_container:
    /// web`) in the host namespace under load; its own assertions check the report, the new
    /// version and the gate. Returns what the load saw; the restart window is the role's own
    /// marks from "drained" (just before the stop) to "ready".
    fn roll_with_the_role(&mut self) -> Run {
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let venv = drain_tests::fleet::ansible_venv();
        let work = self.dir.path().join("role");
        std::fs::create_dir_all(&work).unwrap();
        std::fs::write(work.join("version"), "v2\n").unwrap();
        self.assert_loaded("before the role");
        let out = ns_cmd(&self.pair.a, venv.join("bin/ansible-playbook"))
            .arg("-i")
            .arg("localhost,")
            .arg(repo.join("ansible/smoke/container.yml"))
            .arg("-e")
            .arg(format!("docker_host={}", self.docker.host()))
            .arg("-e")
            .arg(format!("work={}", work.display()))
            .arg("-e")
            .arg(format!("drain_binary={}", drain_user_bin().display()))
            .env("ANSIBLE_COLLECTIONS_PATH", repo.join("ansible"))
            .env("ANSIBLE_PYTHON_INTERPRETER", venv.join("bin/python3"))
            .env("ANSIBLE_LOCALHOST_WARNING", "false")
            .env("ANSIBLE_FORCE_COLOR", "0")
            .output()
            .expect("run ansible-playbook");
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "the role failed:\n{log}");
        self.assert_loaded("after the role");
        let report: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(work.join("report.json")).expect("the role's report"),
        )
        .expect("report.json is JSON");
        // Controller timestamps (seconds since the epoch) to this process's clock.
        let (now_i, now_s) = (Instant::now(), drain_tests::fleet::now());
        let mark = |name: &str| {
            let at = report["marks"]
                .as_array()
                .and_then(|m| m.iter().find(|m| m[0] == name))
                .and_then(|m| m[1].as_f64())
                .unwrap_or_else(|| panic!("no mark {name:?} in the report: {report}"));
            now_i - Duration::from_secs_f64(now_s - at)
        };
        println!(
            "the role: gate closed, waited {}s ({}), marks {}",
            report["waited"], report["wait_result"], report["marks"]
        );
        let at = (mark("drained"), mark("ready"));
        self.finish(at)
    }

    /// Tears Docker down now and asserts it left nothing (drop does the same on failure).
    fn teardown(mut self) {
        let left = self.docker.teardown();
        assert!(left.is_empty(), "dockerd's teardown left: {left:?}");
        let id = self.docker.id.clone();
        assert!(
            !std::path::Path::new("/sys/fs/cgroup/memory")
                .join(&id)
                .exists()
                && !self.docker.run_dir.exists()
                && !self.docker.data_root.exists(),
            "dockerd {id} left cgroups or directories"
        );
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(&id), "dockerd {id} left mounts");
        let _ = &self.dir;
    }
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn docker_restart_under_load_fails_no_request_with_drain_on_the_published_port_and_some_without() {
    require_root();
    // Without drain: the same restart under the same load.
    let plain = {
        let pair = NetNsPair::new();
        let mut w = World::new(&pair, "plain");
        let at = w.restart_under_load();
        let r = w.finish(at);
        println!("docker without drain: {}", r.summary());
        w.teardown();
        r
    };
    // The teeth: the stopping nginx closes its listener at once (new connections through
    // the published port are refused until the new container listens), downloads still
    // running 5 s into the stop are cut, and pooled connections are closed under requests.
    assert!(
        plain.opened_during_restart() > 0,
        "no new connection was opened during the restart: {}",
        plain.summary()
    );
    assert!(
        plain.wrk.failures() + plain.failed_attempts().len() as u64 > 0,
        "restarting the container under load without drain failed nothing ({}): the test cannot tell anything",
        plain.summary()
    );

    // With drain on the host's published port.
    let pair = NetNsPair::new();
    let mut w = World::new(&pair, "drained");
    let drain = Drain::new(&pair, &pair.a);
    drain.on(&[
        "--port",
        &WEB.to_string(),
        "--ttl",
        "2m",
        "--policy",
        "drop",
    ]);
    let st = drain.status();
    assert_eq!(st["gate"], "on", "{st}");
    // HAProxy's pooled connections and the downloads live in the container's namespace:
    // the count must follow them there.
    let live = port_status(&st, WEB)
        .and_then(|p| p["live_connections"].as_u64())
        .unwrap_or_else(|| panic!("no live_connections for port {WEB}: {st}"));
    assert!(
        live > 0,
        "status counts no live connection on the published port while HAProxy holds pooled \
         connections and downloads into the container: {st}"
    );
    assert!(
        !connects(&pair.b, w.web(), Duration::from_millis(800)),
        "a new connection got through the gate on the published port"
    );
    let t = Instant::now();
    // An idle window longer than the ~1 s gaps of nginx's limit_rate, so a download in
    // flight never looks idle.
    let waited = drain.run(&["wait", "--timeout", "60s", "--idle", "2s", "--json"]);
    waited.expect_ok();
    let wait_secs = t.elapsed();
    let last: serde_json::Value = waited
        .stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("wait --json printed no event: {waited:?}"));
    assert!(
        matches!(last["event"].as_str(), Some("idle" | "drained")),
        "wait ended with {last}"
    );
    let down = w.lb.servers();
    assert!(
        down.get("web").is_some_and(|s| s.starts_with("DOWN")),
        "the balancer still has the gated container in service: {down:?}"
    );
    let at = w.restart_under_load();
    drain.off();
    let gated_for = t.elapsed();
    let r = w.finish(at);
    println!(
        "docker with drain: {live} live connections when the gate closed, wait ended {} after {wait_secs:?}, \
         gate closed for {gated_for:?}; {}",
        last["event"],
        r.summary()
    );
    assert!(
        r.opened_during_restart() > 0,
        "no new connection was opened during the restart: {}",
        r.summary()
    );
    assert_eq!(
        (r.wrk.non_2xx, r.wrk.failures(), r.failed_attempts().len()),
        (0, 0, 0),
        "requests failed with drain: {}; failed new connections: {:?}; wrk: {}",
        r.summary(),
        r.failed_attempts(),
        r.wrk.text
    );
    drop(drain);
    w.teardown();

    // The same with examples/docker/drain-restart (the documented sequence as a script).
    let pair = NetNsPair::new();
    let mut w = World::new(&pair, "script");
    let r = w.restart_with_the_script();
    println!("docker with examples/docker/drain-restart: {}", r.summary());
    assert!(
        r.opened_during_restart() > 0,
        "no new connection was opened while the script restarted the container: {}",
        r.summary()
    );
    assert_eq!(
        (r.wrk.non_2xx, r.wrk.failures(), r.failed_attempts().len()),
        (0, 0, 0),
        "requests failed with the script: {}; failed new connections: {:?}",
        r.summary(),
        r.failed_attempts(),
    );
    w.teardown();

    // The same with the Ansible role, draining the container by name.
    let pair = NetNsPair::new();
    let mut w = World::new(&pair, "role");
    let r = w.roll_with_the_role();
    println!("docker with the role: {}", r.summary());
    assert!(
        r.opened_during_restart() > 0,
        "no new connection was opened while the role restarted the container: {}",
        r.summary()
    );
    assert_eq!(
        (r.wrk.non_2xx, r.wrk.failures(), r.failed_attempts().len()),
        (0, 0, 0),
        "requests failed with the role: {}; failed new connections: {:?}",
        r.summary(),
        r.failed_attempts(),
    );
    w.teardown();
}

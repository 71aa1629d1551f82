//! The systemd drop-in (examples/systemd/nginx.service.d/drain.conf, as shipped) on a booted
//! Debian 12: systemd 252 as PID 1 in a container (tests/src/booted.rs), Debian's own
//! nginx.service, `systemctl restart nginx` under wrk through HAProxy.
//!
//! ```text
//!   namespace b: wrk -> HAProxy -> container nginx (198.18.x.1:80, systemd unit + drop-in)
//!                               -> spare nginx (198.18.x.2:8081, keeps serving)
//!   namespace a: the booted container
//! ```
//!
//! - `systemd_drop_in_restart_under_load_fails_no_request_and_without_it_some`: the same
//!   restart with and without the drop-in in one container, then `stop` + `start`; the
//!   journal shows gate on -> wait -> stop -> start -> gate off.
//! - `systemd_drop_in_stop_outlived_by_a_connection_still_stops_and_reopens`: the wait's
//!   deadline passes, the stop completes, the gate opens at its TTL or at the next start.
//! - `systemd_drop_in_without_drain_user_still_stops_gracefully` and
//!   `systemd_drop_in_with_a_wrong_port_list_says_so_and_still_stops_and_starts`: a drain
//!   step that fails costs neither the graceful stop nor the start.
//! - `systemd_drain_unit_drains_a_python_server_under_load`: the generic
//!   examples/systemd/drain@.service on a service that is not nginx.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use drain_tests::{
    booted::{BootOpts, Booted},
    netns::{in_netns, NetNsPair},
    require_root,
    web::{connects, http_get, wait_until, Backend, HaProxy, Load, Nginx, TempDir, WrkResult},
};

/// The tests under load share two CPUs with everything else: one at a time.
static LOADED: Mutex<()> = Mutex::new(());

const SPARE: u16 = 8081;
const LB: u16 = 8000;
/// wrk's own end (`-d`): far beyond the restart, which must happen while it still runs.
const LOAD_SECS: u64 = 120;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn dropin() -> Vec<u8> {
    std::fs::read(repo().join("examples/systemd/nginx.service.d/drain.conf")).unwrap()
}

const DROPIN_PATH: &str = "/etc/systemd/system/nginx.service.d/drain.conf";
const LOCAL_PATH: &str = "/etc/systemd/system/nginx.service.d/zz-local.conf";

/// A booted host in namespace `a` of its pair, nginx (its systemd unit) on port 80.
struct Host {
    booted: Booted,
    pair: NetNsPair,
}

impl Host {
    fn boot(drain_user: bool, extra: Vec<(String, Vec<u8>)>) -> Self {
        require_root();
        let pair = NetNsPair::new();
        let mut files = drain_tests::booted::nginx_site("/var/www/drain", "v1");
        files.extend(extra);
        let booted = Booted::boot(BootOpts {
            netns: &pair.a,
            drain_user,
            files,
        });
        println!("{} booted in {:.2} s", booted.name, booted.boot_secs);
        let h = Host { booted, pair };
        assert_eq!(h.booted.is_active("nginx"), "active");
        h
    }

    fn web(&self) -> SocketAddr {
        SocketAddr::new(self.pair.a_v4.into(), 80)
    }

    /// The journal of nginx.service from line `from` on.
    fn journal_since(&self, from: usize) -> Vec<(u64, String)> {
        self.booted.journal(&["nginx.service"]).split_off(from)
    }

    fn journal_len(&self) -> usize {
        self.booted.journal(&["nginx.service"]).len()
    }
}

/// Where the drop-in's steps are in a stretch of nginx.service's journal (µs since boot).
#[derive(Debug, Default)]
struct Steps {
    stopping: Option<u64>,
    gate_on: Option<u64>,
    wait: Option<u64>,
    /// Connections the wait found live when it began ("drain: N live connection(s)").
    live_at_wait: Option<u64>,
    stopped: Option<u64>,
    starting: Option<u64>,
    gate_off: Option<u64>,
    started: Option<u64>,
}

impl Steps {
    /// `unit`: the service stopped and started (systemd's lines name it).
    fn of(journal: &[(u64, String)], unit: &str) -> Self {
        let mut s = Steps::default();
        let stopped = format!("Stopped {unit}");
        // A Type=simple service is never "Starting": systemd logs only its "Started".
        let starting = format!("Starting {unit}");
        let started = format!("Started {unit}");
        for (t, m) in journal {
            // The first stop of any unit: the drain@ unit's stop comes before the service's.
            let slot = if m.starts_with("Stopping ") {
                &mut s.stopping
            } else if m.starts_with("gate on: new connections to port") {
                &mut s.gate_on
            } else if let Some(n) = m
                .strip_prefix("drain: ")
                .and_then(|r| r.split_once(" live connection"))
                .and_then(|(n, _)| n.parse().ok())
            {
                s.live_at_wait.get_or_insert(n);
                continue;
            } else if m.starts_with("drained: ") || m.starts_with("idle: ") {
                &mut s.wait
            } else if m.starts_with(&stopped) {
                &mut s.stopped
            } else if m.starts_with(&starting) {
                &mut s.starting
            } else if m.starts_with("gate off: ") {
                &mut s.gate_off
            } else if m.starts_with(&started) {
                &mut s.started
            } else {
                continue;
            };
            slot.get_or_insert(*t);
        }
        s.starting = s.starting.or(s.started);
        s
    }

    /// gate on -> wait -> stop -> start -> gate off, each exactly where it belongs.
    /// `off_before_started`: the drop-in opens in ExecStartPost, before systemd says
    /// Started; the drain@ unit opens after the service has started.
    fn assert_in_order(&self, journal: &[(u64, String)], off_before_started: bool) {
        let mut all = vec![
            ("systemd: Stopping", self.stopping),
            ("drain-user: gate on", self.gate_on),
            ("drain-user wait: drained/idle", self.wait),
            ("systemd: Stopped", self.stopped),
            ("systemd: Starting", self.starting),
        ];
        let (off, started) = (
            ("drain-user: gate off", self.gate_off),
            ("systemd: Started", self.started),
        );
        if off_before_started {
            all.extend([off, started]);
        } else {
            all.extend([started, off]);
        }
        let text = || {
            journal
                .iter()
                .map(|(t, m)| format!("{t} {m}"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        // The gate closed while the service still held the balancer's pooled connections:
        // before its stop, not after it (a drop-in without the ExecStop= reset runs the
        // drain steps after the unit's own stop, which has closed them by then).
        assert!(
            self.live_at_wait.is_some_and(|n| n > 0),
            "the wait found no live connection when the gate closed: the service had stopped already: {self:?}\n{}",
            text()
        );
        for w in all.windows(2) {
            let (Some(a), Some(b)) = (w[0].1, w[1].1) else {
                panic!(
                    "the journal lacks {} or {}: {self:?}\n{}",
                    w[0].0,
                    w[1].0,
                    text()
                );
            };
            assert!(
                a <= b,
                "{} came after {}: {self:?}\n{}",
                w[0].0,
                w[1].0,
                text()
            );
        }
    }

    fn secs(a: Option<u64>, b: Option<u64>) -> String {
        match (a, b) {
            (Some(a), Some(b)) => format!("{:.2}", (b.saturating_sub(a)) as f64 / 1e6),
            _ => "-".into(),
        }
    }

    /// Where the stop's time went, for the README.
    fn breakdown(&self) -> String {
        let end = self.gate_off.max(self.started);
        format!(
            "Stopping -> gate on {} s, wait {} s, stop {} s, start {} s (Starting -> Started), \
             stopped -> gate off {} s; Stopping -> open and started {} s",
            Self::secs(self.stopping, self.gate_on),
            Self::secs(self.gate_on, self.wait),
            Self::secs(self.wait, self.stopped),
            Self::secs(self.starting, self.started),
            Self::secs(self.stopped, self.gate_off),
            Self::secs(self.stopping, end),
        )
    }
}

/// HAProxy in namespace `b` in front of the booted host and a spare nginx, and the load.
struct Front {
    lb: HaProxy,
    _spare: Nginx,
    dir: TempDir,
    lb_addr: SocketAddr,
}

impl Front {
    fn new(h: &Host, web: SocketAddr) -> Self {
        let dir = TempDir::new("booted-lb");
        let b = &h.pair.b;
        let spare_addr = SocketAddr::new(h.pair.b_v4.into(), SPARE);
        let spare = Nginx::new(
            b,
            &dir.path().join("spare"),
            &spare_addr.to_string(),
            SPARE,
            "v1",
        );
        let lb_addr = SocketAddr::new(h.pair.b_v4.into(), LB);
        let lb = HaProxy::start(
            b,
            &dir.path().join("lb"),
            lb_addr,
            None,
            &[
                Backend {
                    name: "web".into(),
                    addr: web,
                },
                Backend {
                    name: "spare".into(),
                    addr: spare_addr,
                },
            ],
        );
        Front {
            lb,
            _spare: spare,
            dir,
            lb_addr,
        }
    }

    /// Starts the load, lets the pools fill and downloads pile up on both backends, runs
    /// `action` (asserting the load runs before and after it), waits until HAProxy has the
    /// host UP again, lets the load go on 2 s, and returns wrk's report and the action's time.
    fn under_load(&self, h: &Host, action: impl FnOnce()) -> (WrkResult, Duration) {
        let mut load = Load::start(
            &h.pair.b,
            self.dir.path(),
            &format!("http://{}/", self.lb_addr),
            16,
            16,
            Duration::from_secs(LOAD_SECS),
        );
        thread::sleep(Duration::from_secs(3));
        let started = load.fast.started;
        let mut loaded = |when: &str| {
            let elapsed = load.fast.started.elapsed();
            assert!(
                load.running() && elapsed + Duration::from_secs(5) < load.fast.duration,
                "wrk is not running {when} (at {elapsed:?}): the restart would not be under load"
            );
        };
        loaded("before the restart");
        let t = Instant::now();
        action();
        let took = t.elapsed();
        loaded("after the restart");
        wait_until(
            "haproxy has the booted host UP again",
            Duration::from_secs(20),
            || self.lb.servers().get("web").is_some_and(|s| s == "UP"),
        );
        // 2 s more, and at least as long as the longest download: every phase has some
        // finished, wrk counts a cut one only once another connection's request completed.
        thread::sleep(Duration::from_secs(2));
        let longest =
            Duration::from_secs(u64::from(*drain_tests::web::SLOW_SECS.last().unwrap()) + 2);
        if let Some(more) = longest.checked_sub(started.elapsed()) {
            thread::sleep(more);
        }
        loaded("at the end");
        (load.stop(), took)
    }
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn systemd_drop_in_restart_under_load_fails_no_request_and_without_it_some() {
    let _one = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    let h = Host::boot(true, vec![]);
    let front = Front::new(&h, h.web());

    // Without the drop-in: Debian's own unit (QUIT, then SIGTERM 5 s later).
    let from = h.journal_len();
    let (plain, took) = front.under_load(&h, || h.booted.systemctl(&["restart", "nginx"]));
    let logged = front.lb.logged_requests();
    println!(
        "without the drop-in: systemctl restart nginx took {took:?}; {} requests, {} failed \
         (non-2xx {}, connect {}, read {}, write {}, timeout {}); HAProxy retried or failed: {logged:?}",
        plain.requests,
        plain.failures(),
        plain.non_2xx,
        plain.connect_errors,
        plain.read_errors,
        plain.write_errors,
        plain.timeouts
    );
    assert!(
        Steps::of(&h.journal_since(from), "nginx.service")
            .gate_on
            .is_none(),
        "a gate closed without the drop-in"
    );
    assert!(
        plain.failures() > 0,
        "restarting nginx under load without the drop-in failed nothing ({plain:?}): the test cannot tell anything"
    );

    // With the drop-in, as shipped.
    h.booted.write(DROPIN_PATH, dropin());
    h.booted.systemctl(&["daemon-reload"]);
    for (what, action) in [
        ("systemctl restart nginx", &["restart"][..]),
        (
            "systemctl stop nginx; systemctl start nginx",
            &["stop", "start"][..],
        ),
    ] {
        let from = h.journal_len();
        let (r, took) = front.under_load(&h, || {
            for verb in action {
                h.booted.systemctl(&[verb, "nginx"]);
            }
        });
        let journal = h.journal_since(from);
        let steps = Steps::of(&journal, "nginx.service");
        println!(
            "with the drop-in: {what} took {took:?}; {} requests, {} failed (non-2xx {}, \
             socket errors {}); journal: {}",
            r.requests,
            r.failures(),
            r.non_2xx,
            r.failures() - r.non_2xx,
            steps.breakdown()
        );
        steps.assert_in_order(&journal, true);
        assert_eq!(
            (r.non_2xx, r.failures()),
            (0, 0),
            "requests failed with the drop-in ({what}): {}",
            r.text
        );
        let st = h.booted.drain_status();
        assert_eq!(st["gate"], "off", "after {what}: {st}");
        assert_eq!(h.booted.is_active("nginx"), "active");
    }
    // Nothing pinned but bpffs' own files (and drain's empty state root).
    let left: Vec<_> = h
        .booted
        .pins()
        .into_iter()
        .filter(|p| {
            !p.ends_with("maps.debug") && !p.ends_with("progs.debug") && !p.ends_with("drain")
        })
        .collect();
    assert!(left.is_empty(), "pins left after gate off: {left:?}");
}

/// A download of `path` from namespace `ns`: how many body bytes arrived and whether the
/// response was complete (Content-Length bytes). Runs on its own thread.
fn download(ns: &str, addr: SocketAddr, path: &str) -> thread::JoinHandle<(usize, bool)> {
    let (ns, path) = (ns.to_string(), path.to_string());
    thread::spawn(move || {
        in_netns(&ns, move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            s.write_all(format!("GET {path} HTTP/1.0\r\nHost: t\r\n\r\n").as_bytes())
                .unwrap();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            let text = String::from_utf8_lossy(&buf);
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                return (0, false);
            };
            let len: Option<usize> = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.trim().parse().ok());
            (
                body.len(),
                head.starts_with("HTTP/1.1 200") && len == Some(body.len()),
            )
        })
    })
}

/// Waits until nginx in the container has `n` established connections on port 80.
fn wait_established(h: &Host, n: usize) {
    wait_until(
        "the download is established",
        Duration::from_secs(5),
        || {
            h.booted
                .sh("ss -Htn state established '( sport = :80 )' | wc -l")
                .trim()
                .parse::<usize>()
                .unwrap_or(0)
                >= n
        },
    );
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn systemd_drop_in_stop_outlived_by_a_connection_still_stops_and_reopens() {
    // A wait deadline shorter than the download, and a short TTL (settings overridden in a
    // later drop-in, as the example's README says).
    let local = "[Service]\nEnvironment=DRAIN_WAIT_TIMEOUT=2s\nEnvironment=DRAIN_TTL=12s\n";
    let h = Host::boot(
        true,
        vec![
            (DROPIN_PATH.into(), dropin()),
            (LOCAL_PATH.into(), local.as_bytes().to_vec()),
        ],
    );
    let b = h.pair.b.clone();
    let dl = download(&b, h.web(), "/slow/14.bin");
    wait_established(&h, 1);
    let from = h.journal_len();
    let t = Instant::now();
    h.booted.systemctl(&["stop", "nginx"]);
    let took = t.elapsed();
    let stopped_at = Instant::now();
    let journal = h.journal_since(from);
    let text = journal
        .iter()
        .map(|(_, m)| m.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    println!("stop with a 14 s download and a 2 s wait deadline took {took:?}; journal:\n{text}");
    // The wait gave up at its deadline (exit 3, leftovers listed), the stop went on.
    assert!(
        journal
            .iter()
            .any(|(_, m)| m.starts_with("drain: timed out after 2.0s with 1 live connection")),
        "the journal shows no wait timeout:\n{text}"
    );
    assert!(
        took < Duration::from_secs(90),
        "the stop took {took:?}: more than TimeoutStopSec"
    );
    assert_eq!(h.booted.is_active("nginx"), "inactive", "{text}");
    let (got, complete) = dl.join().unwrap();
    println!("the download outliving the deadline: {got} bytes, complete: {complete}");
    // nginx is down and the gate is on: closed only while nothing serves.
    let st = h.booted.drain_status();
    assert_eq!(st["gate"], "on", "{st}");
    let left = Duration::from_millis(
        st["ttl_remaining_ms"]
            .as_u64()
            .unwrap_or_else(|| panic!("no ttl_remaining_ms: {st}")),
    );
    let deadline = Instant::now() + left;
    // The TTL opens it with nobody calling gate off.
    wait_until("the gate opens at its TTL", Duration::from_secs(20), || {
        h.booted.drain_status()["gate"] == "off"
    });
    let opened = Instant::now();
    println!(
        "the gate opened by its TTL (12 s from gate on) {:?} after the stop returned, {:+.2} s from its deadline",
        opened - stopped_at,
        if opened >= deadline {
            (opened - deadline).as_secs_f64()
        } else {
            -(deadline - opened).as_secs_f64()
        }
    );
    assert!(
        opened + Duration::from_millis(100) >= deadline,
        "the gate opened {:?} before its TTL",
        deadline - opened
    );
    assert_eq!(h.booted.is_active("nginx"), "inactive");
    h.booted.systemctl(&["start", "nginx"]);
    assert!(connects(&b, h.web(), Duration::from_secs(2)));

    // Stopped again, then started before the TTL: the start opens it.
    h.booted.systemctl(&["stop", "nginx"]);
    assert_eq!(h.booted.drain_status()["gate"], "on");
    h.booted.systemctl(&["start", "nginx"]);
    let st = h.booted.drain_status();
    assert_eq!(st["gate"], "off", "nginx up with the gate closed: {st}");
    let (code, _) = http_get(&b, h.web(), "/healthz").unwrap();
    assert_eq!(code, 200);
}

/// A stop whose drain steps fail: a download shorter than the graceful stop's 5 s finishes
/// (QUIT, not TERM), nginx stops, starts and serves, and the journal says what failed.
fn failed_drain_stops_gracefully(h: &Host, expect_in_journal: &str) -> Vec<String> {
    let b = h.pair.b.clone();
    let dl = download(&b, h.web(), "/slow/3.bin");
    wait_established(h, 1);
    let from = h.journal_len();
    let t = Instant::now();
    h.booted.systemctl(&["stop", "nginx"]);
    let took = t.elapsed();
    let journal: Vec<String> = h.journal_since(from).into_iter().map(|(_, m)| m).collect();
    println!("stop took {took:?}; journal:\n{}", journal.join("\n"));
    assert_eq!(h.booted.is_active("nginx"), "inactive");
    let (got, complete) = dl.join().unwrap();
    assert!(
        complete,
        "the 3 s download was cut ({got} bytes): the stop was not graceful\n{}",
        journal.join("\n")
    );
    assert!(
        journal.iter().any(|m| m.contains(expect_in_journal)),
        "no journal line says {expect_in_journal:?}:\n{}",
        journal.join("\n")
    );
    assert!(
        !journal
            .iter()
            .any(|m| m.contains("SIGTERM") || m.contains("SIGKILL")),
        "the stop fell back to a signal:\n{}",
        journal.join("\n")
    );
    h.booted.systemctl(&["start", "nginx"]);
    let (code, _) = http_get(&b, h.web(), "/healthz").unwrap();
    assert_eq!(code, 200, "the host does not serve after the start");
    journal
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn systemd_drop_in_without_drain_user_still_stops_gracefully() {
    let h = Host::boot(false, vec![(DROPIN_PATH.into(), dropin())]);
    failed_drain_stops_gracefully(&h, "/usr/bin/drain-user");
    // Nothing ever gated: a new connection is accepted.
    assert!(connects(&h.pair.b, h.web(), Duration::from_secs(2)));
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn systemd_drop_in_with_a_wrong_port_list_says_so_and_still_stops_and_starts() {
    let local = "[Service]\nEnvironment=DRAIN_PORTS=80,http\n";
    let h = Host::boot(
        true,
        vec![
            (DROPIN_PATH.into(), dropin()),
            (LOCAL_PATH.into(), local.as_bytes().to_vec()),
        ],
    );
    let journal = failed_drain_stops_gracefully(&h, "invalid value 'http' for '--port");
    // One line per failed drain-user call: the error, nothing else.
    let errors: Vec<&String> = journal
        .iter()
        .filter(|m| m.starts_with("drain-user: "))
        .collect();
    assert_eq!(
        errors.len(),
        2,
        "gate on and wait each say it in one line: {errors:?}"
    );
    let st = h.booted.drain_status();
    assert_eq!(st["gate"], "off", "a bad port list closed a gate: {st}");
    assert!(connects(&h.pair.b, h.web(), Duration::from_secs(2)));
}

/// A TCP service that is not nginx: Python's ThreadingHTTPServer with HTTP/1.1 keep-alive,
/// `/slow/<s>.bin` sent over about `s` seconds (a chunk every 100 ms, never idle), anything else
/// answered at once. No ExecStop=: systemd stops it with SIGTERM, which Python's default
/// handler answers by exiting on the spot, cutting whatever is in flight.
const PY_SERVER: &str = r#"import http.server, sys, time
RATE = 32768
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def do_GET(self):
        if self.path.startswith("/slow/"):
            secs = int(self.path[len("/slow/"):].split(".")[0])
            self.send_response(200)
            self.send_header("Content-Length", str(RATE * secs))
            self.end_headers()
            left = RATE * secs
            while left > 0:
                n = min(left, RATE // 10 + 1)
                self.wfile.write(b"s" * n)
                self.wfile.flush()
                left -= n
                time.sleep(0.1)
        else:
            body = b"ok\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
class S(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512
S(("", int(sys.argv[1])), H).serve_forever()
"#;

const PY_UNIT: &str = "[Unit]
Description=a Python HTTP server (test service)
[Service]
ExecStart=/usr/bin/python3 /usr/local/lib/drain-test/slow_http.py 8080
[Install]
WantedBy=multi-user.target
";

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn systemd_drain_unit_drains_a_python_server_under_load() {
    let _one = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    let unit = std::fs::read(repo().join("examples/systemd/drain@.service")).unwrap();
    let h = Host::boot(
        true,
        vec![
            (
                "/usr/local/lib/drain-test/slow_http.py".into(),
                PY_SERVER.as_bytes().to_vec(),
            ),
            (
                "/etc/systemd/system/slow-http.service".into(),
                PY_UNIT.as_bytes().to_vec(),
            ),
            ("/etc/systemd/system/drain@.service".into(), unit),
            (
                "/etc/default/drain-slow-http".into(),
                b"DRAIN_PORTS=8080\n".to_vec(),
            ),
        ],
    );
    h.booted
        .systemctl(&["enable", "--now", "slow-http.service"]);
    let web = SocketAddr::new(h.pair.a_v4.into(), 8080);
    wait_until("the Python server listens", Duration::from_secs(10), || {
        connects(&h.pair.b, web, Duration::from_millis(300))
    });
    let front = Front::new(&h, web);
    let units = ["slow-http.service", "drain@slow-http.service"];

    // Without drain: SIGTERM cuts the downloads in flight.
    let (plain, took) = front.under_load(&h, || h.booted.systemctl(&["restart", "slow-http"]));
    println!(
        "python server without drain@: systemctl restart took {took:?}; {} requests, {} failed \
         (non-2xx {}, read {}); HAProxy retried or failed: {:?}",
        plain.requests,
        plain.failures(),
        plain.non_2xx,
        plain.read_errors,
        front.lb.logged_requests()
    );
    assert!(
        plain.failures() > 0,
        "restarting the Python server under load failed nothing ({plain:?}): the test cannot tell anything"
    );

    // With drain@slow-http enabled beside it: no edit to the service's own unit.
    h.booted
        .systemctl(&["enable", "--now", "drain@slow-http.service"]);
    assert_eq!(h.booted.is_active("drain@slow-http.service"), "active");
    for (what, action) in [
        ("systemctl restart slow-http", &["restart"][..]),
        (
            "systemctl stop slow-http; systemctl start slow-http",
            &["stop", "start"][..],
        ),
    ] {
        let from = h.booted.journal(&units).len();
        let (r, took) = front.under_load(&h, || {
            for verb in action {
                h.booted.systemctl(&[verb, "slow-http"]);
            }
        });
        let journal = h.booted.journal(&units).split_off(from);
        let steps = Steps::of(&journal, "slow-http.service");
        println!(
            "python server with drain@: {what} took {took:?}; {} requests, {} failed (non-2xx {}, \
             socket errors {}); journal: {}; HAProxy retried or failed (all phases): {:?}",
            r.requests,
            r.failures(),
            r.non_2xx,
            r.failures() - r.non_2xx,
            steps.breakdown(),
            front.lb.logged_requests()
        );
        steps.assert_in_order(&journal, false);
        assert_eq!(
            (r.non_2xx, r.failures()),
            (0, 0),
            "requests failed with drain@ ({what}): {}\njournal:\n{}",
            r.text,
            journal
                .iter()
                .filter(|(_, m)| !m.starts_with(' ')
                    && !m.starts_with("Traceback")
                    && !m.starts_with("--"))
                .map(|(t, m)| format!("{t} {m}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert_eq!(h.booted.drain_status()["gate"], "off");
        assert_eq!(h.booted.is_active("drain@slow-http.service"), "active");
    }
}

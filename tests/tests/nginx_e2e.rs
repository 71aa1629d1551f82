//! The product claim on one host, end to end: nginx is restarted while wrk sends traffic
//! through a balancer that pools keep-alive connections to it (HAProxy, `http-reuse always`),
//! and with `gate on` → `wait --idle` → restart → `gate off` no request fails, while the same
//! restart under the same load without drain fails some.
//!
//! Namespace `a` is the host: the nginx being restarted ("web", port 8080) and a second one
//! that keeps serving ("spare", port 8081, not gated), as the rest of a fleet would.
//! Namespace `b` is the balancer and the client. The load mixes short requests with ~10 s
//! downloads (6 to 14 s), so responses are in flight at every moment; the restart is Debian's init
//! script stop (QUIT, TERM after 5 s), which cuts a download still running 5 s after the
//! stop began. Everything is the real program: Debian's nginx, HAProxy and wrk.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use drain_tests::{
    cli::{port_status, Drain},
    netns::NetNsPair,
    require_root,
    web::{connects, wait_until, Backend, HaProxy, Load, Nginx, TempDir, WrkResult},
};

const WEB: u16 = 8080;
const SPARE: u16 = 8081;
const LB: u16 = 8000;
/// wrk's own end (`-d`): far beyond the restart, which must happen while it still runs.
const LOAD_SECS: u64 = 120;

struct World {
    pair: NetNsPair,
    dir: TempDir,
}

struct Stack {
    web: Nginx,
    _spare: Nginx,
    lb: HaProxy,
    load: Load,
}

impl World {
    fn new(tag: &str) -> Self {
        require_root();
        Self {
            pair: NetNsPair::new(),
            dir: TempDir::new(&format!("e2e-{tag}")),
        }
    }

    fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.pair.a_v4.into(), port)
    }

    /// Both nginx, HAProxy in front of them, and the load running for a few seconds (the
    /// pools are full and downloads are in flight on both backends).
    fn stack(&self) -> Stack {
        let d = self.dir.path();
        let (a, b) = (&self.pair.a, &self.pair.b);
        let web = Nginx::new(a, &d.join("web"), &self.addr(WEB).to_string(), WEB, "v1");
        let spare = Nginx::new(
            a,
            &d.join("spare"),
            &self.addr(SPARE).to_string(),
            SPARE,
            "v1",
        );
        let lb_addr = SocketAddr::new(self.pair.b_v4.into(), LB);
        let lb = HaProxy::start(
            b,
            &d.join("lb"),
            lb_addr,
            None,
            &[
                Backend {
                    name: "web".into(),
                    addr: self.addr(WEB),
                },
                Backend {
                    name: "spare".into(),
                    addr: self.addr(SPARE),
                },
            ],
        );
        let load = Load::start(
            b,
            d,
            &format!("http://{lb_addr}/"),
            16,
            16,
            Duration::from_secs(LOAD_SECS),
        );
        thread::sleep(Duration::from_secs(3));
        Stack {
            web,
            _spare: spare,
            lb,
            load,
        }
    }
}

impl Stack {
    /// Restarts the web nginx the way Debian's init script does; asserts the load is still
    /// running before and after (the restart happens under load, not after it).
    fn restart_under_load(&mut self) -> Duration {
        self.assert_loaded("before the restart");
        let t = Instant::now();
        self.web.stop();
        self.web.start();
        self.assert_loaded("after the restart");
        t.elapsed()
    }

    fn assert_loaded(&mut self, when: &str) {
        let elapsed = self.load.fast.started.elapsed();
        assert!(
            self.load.running() && elapsed + Duration::from_secs(5) < self.load.fast.duration,
            "wrk is not running {when} (at {elapsed:?} of its {:?}): the restart would not be under load",
            self.load.fast.duration
        );
    }

    /// Waits for HAProxy to have the web nginx UP again, lets the load go on for 2 s more,
    /// then stops wrk and returns its report, with what HAProxy logged: the requests it
    /// retried or failed, and its servers' state changes.
    fn finish(mut self) -> (WrkResult, BTreeMap<String, u64>, Vec<String>) {
        wait_until(
            "haproxy has the web nginx UP again",
            Duration::from_secs(20),
            || self.lb.servers().get("web").is_some_and(|s| s == "UP"),
        );
        thread::sleep(Duration::from_secs(2));
        self.assert_loaded("at the end");
        let r = self.load.stop();
        (r, self.lb.logged_requests(), self.lb.server_events())
    }
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn nginx_restart_under_load_through_a_balancer_fails_no_request_with_drain_and_some_without() {
    // Without drain: the same restart under the same load.
    let plain = {
        let w = World::new("plain");
        let mut s = w.stack();
        let took = s.restart_under_load();
        let (r, logged, events) = s.finish();
        println!(
            "without drain: restart took {took:?}; {r:?}; HAProxy retried or failed: \
             {logged:?}; server state changes: {events:#?}"
        );
        r
    };
    // The teeth: the balancer's retries cover new connections a stopped nginx refuses,
    // but not a download cut by the TERM 5 s into the stop, nor a request on a pooled
    // connection the stopping nginx closes under it.
    assert!(
        plain.failures() > 0,
        "restarting nginx under load without drain failed nothing ({plain:?}): the test cannot tell anything"
    );

    // With drain: gate on, the balancer's health checks are refused so it takes the host
    // out, the pooled connections finish their downloads and fall idle, then the restart.
    let w = World::new("drained");
    let mut s = w.stack();
    let drain = Drain::new(&w.pair, &w.pair.a);
    drain.on(&["--port", &WEB.to_string(), "--ttl", "2m"]);
    // While the gate is on: the balancer's pooled connections are live and counted, and a
    // new connection is refused.
    let st = drain.status();
    assert_eq!(st["gate"], "on", "{st}");
    let live = port_status(&st, WEB)
        .and_then(|p| p["live_connections"].as_u64())
        .unwrap_or_else(|| panic!("no live_connections for port {WEB}: {st}"));
    assert!(live > 0, "HAProxy holds no connection to nginx: {st}");
    assert!(
        !connects(&w.pair.b, w.addr(WEB), Duration::from_millis(800)),
        "a new connection got through the gate"
    );
    let t = Instant::now();
    // An idle window longer than the ~1 s gaps of nginx's limit_rate (it sends each
    // second's allowance in one burst), so a download in flight never looks idle.
    let waited = drain.run(&["wait", "--timeout", "60s", "--idle", "2s", "--json"]);
    waited.expect_ok();
    // The last JSON event says how the wait ended.
    let last: serde_json::Value = waited
        .stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("wait --json printed no event: {waited:?}"));
    let wait_secs = t.elapsed();
    assert!(
        matches!(last["event"].as_str(), Some("idle" | "drained")),
        "wait ended with {last}"
    );
    let down = s.lb.servers();
    assert!(
        down.get("web").is_some_and(|st| st.starts_with("DOWN")),
        "the balancer still has the gated nginx in service: {down:?}"
    );
    let gated = drain.status();
    let refused = port_status(&gated, WEB).and_then(|p| p["syns_refused"].as_u64());
    assert!(
        refused.is_some_and(|n| n > 0),
        "the gate refused none of the balancer's checks: {gated}"
    );
    let took = s.restart_under_load();
    drain.off();
    let after = drain.status();
    assert_eq!(after["gate"], "off", "{after}");
    assert!(drain.pins().is_empty(), "pins left: {:?}", drain.pins());
    let (drained, logged, events) = s.finish();
    println!(
        "with drain: wait ended {} after {wait_secs:?} ({live} pooled connections when the gate closed), \
         restart took {took:?}; {drained:?}; HAProxy retried or failed: {logged:?}; server \
         state changes: {events:#?}",
        last["event"]
    );
    assert_eq!(
        (drained.non_2xx, drained.failures()),
        (0, 0),
        "requests failed with drain: {}",
        drained.text
    );
}

//! `wait` woken by the tracker: when the count of a port it waits for changes, the tracker
//! writes to a ring buffer whose fd `wait` sleeps on, so the last close ends the wait at
//! once, and nothing runs in between but a slow safety poll.
//!
//! Every test runs `wait` with the safety poll made ten minutes long (DRAIN_WAIT_POLL_MS,
//! a test-only knob), so only a wake-up can end it within [`BOUND`]; and each carries its
//! negative run, the same wait with the wake-up removed (DRAIN_WAIT_WAKE=0, the other
//! test-only knob), which must still be running [`BOUND`] after the last close. The bound
//! is generous: a wake-up takes well under a millisecond (see `cargo xtask bench`).
//!
//! These waits run without a gate, on `wait`'s own tracker: over a gate `wait` also wakes
//! every second to renew the gate's TTL, which would end a wait without the wake-up too.
//! Real connections from namespace `b` to servers in namespace `a`.

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use drain_tests::{
    cli::{Drain, Running},
    netns::NetNsPair,
    require_root,
    traffic::{listen, open_held, Close, Server, Stack},
};

/// How soon after the last close a woken `wait` must have exited; an unwoken one must not.
const BOUND: Duration = Duration::from_secs(5);
const SETTLE: Duration = Duration::from_secs(10);
/// Ten minutes: the safety poll never runs during a test.
const LONG_POLL: &str = "DRAIN_WAIT_POLL_MS=600000";

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// `env` in front of `wait`: the long safety poll, with or without the wake-up.
fn env(woken: bool) -> Vec<&'static str> {
    let mut v = vec!["env", LONG_POLL];
    if !woken {
        v.push("DRAIN_WAIT_WAKE=0");
    }
    v
}

/// `wait` woken: it exits within BOUND of `t_close` (the last close), with `expect` on
/// stdout or stderr; returns how long it took.
#[track_caller]
fn exits_soon(w: Running, t_close: Instant, expect: &str) -> Duration {
    let out = w.wait_for(BOUND + Duration::from_secs(25));
    let after = out.exited.saturating_duration_since(t_close);
    eprintln!("wait exited {after:.2?} after the last close: {out}");
    assert!(
        out.stdout.contains(expect) || out.stderr.contains(expect),
        "no {expect:?}: {out}"
    );
    assert!(
        after < BOUND,
        "wait took {after:?} after the last close (safety poll 10 min): not woken"
    );
    after
}

/// `wait` without the wake-up: still running BOUND after the last close. Then ended.
#[track_caller]
fn still_waiting(mut w: Running, what: &str) {
    thread::sleep(BOUND);
    if !w.running() {
        let out = w.wait_for(Duration::from_secs(1));
        panic!(
            "{what}: wait without its wake-up ended within {BOUND:?} of the last close: \
             the test cannot tell a wake-up from the polls: {out}"
        );
    }
}

/// Sees `line` from a woken `wait`; an unwoken one prints nothing after its first count
/// (nothing wakes it), so then just give the closes time to happen.
#[track_caller]
fn progress(w: &mut Running, woken: bool, line: &str) {
    if woken {
        w.expect_line(line, SETTLE);
    } else {
        thread::sleep(Duration::from_millis(500));
    }
}

/// Many ports: connections on eight ports, closed a port at a time; `wait` runs through
/// the first seven and exits at once when the last port's last connection closes.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn woken_by_the_last_close_among_many_ports() {
    require_root();
    const BASE: u16 = 8600;
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    let ports: Vec<u16> = (BASE..BASE + 8).collect();
    let list = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let servers: Vec<Server> = ports
        .iter()
        .map(|&p| Server::start(listen(&pair.a, Stack::Dual, p), 1))
        .collect();
    for woken in [true, false] {
        let mut clients: Vec<TcpStream> = Vec::new();
        for (s, &p) in servers.iter().zip(&ports) {
            clients.extend(open_held(&pair.b, sa(pair.a_v4, p), 1));
            clients.extend(open_held(&pair.b, sa(pair.a_v6, p), 1));
            s.wait_held(2, SETTLE);
        }
        let mut w = drain.spawn_via(&env(woken), &["wait", "--port", &list, "--timeout", "600s"]);
        w.expect_line("16 live connection(s)", SETTLE);
        for s in &servers[..7] {
            s.close_held(1, Close::Fin);
            s.close_held(1, Close::Rst);
        }
        progress(&mut w, woken, "2 live connection(s)");
        thread::sleep(Duration::from_millis(300));
        assert!(w.running(), "wait ended with 2 connections live");
        servers[7].close_held(1, Close::Rst);
        let t_close = Instant::now();
        servers[7].close_held(1, Close::Fin);
        if woken {
            exits_soon(w, t_close, "drained: no live connections");
        } else {
            still_waiting(w, "many ports");
        }
        drop(clients);
    }
}

/// A close at any moment of `wait`'s start: before its tracker is attached, between the
/// seed and the first count, while it goes to sleep. Each round must end with "drained"
/// within BOUND of the close (a close that slips between the count and the sleep is the
/// lost wake-up this guards against). The negative run closes after the first count.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn a_close_during_the_start_is_never_missed() {
    require_root();
    const P: u16 = 8620;
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    let server = Server::start(listen(&pair.a, Stack::Dual, P), 1);
    let port = P.to_string();
    // Delays from the spawn to the close, spread over the start (loading and attaching
    // the tracker, the seed, the first count): tens to hundreds of milliseconds.
    for delay_ms in [0u64, 5, 15, 30, 50, 80, 120, 170, 230, 300, 400, 550] {
        let clients = open_held(&pair.b, sa(pair.a_v4, P), 1);
        server.wait_held(1, SETTLE);
        let w = drain.spawn_via(&env(true), &["wait", "--port", &port, "--timeout", "600s"]);
        thread::sleep(Duration::from_millis(delay_ms));
        let t_close = Instant::now();
        server.close_held(1, Close::Fin);
        eprint!("close {delay_ms} ms after the spawn: ");
        exits_soon(w, t_close, "drained: no live connections");
        drop(clients);
    }
    // Without the wake-up, a close after the first count is noticed by nothing.
    let clients = open_held(&pair.b, sa(pair.a_v4, P), 1);
    server.wait_held(1, SETTLE);
    let mut w = drain.spawn_via(&env(false), &["wait", "--port", &port, "--timeout", "600s"]);
    w.expect_line("1 live connection(s)", SETTLE);
    server.close_held(1, Close::Fin);
    still_waiting(w, "a close after the first count");
    drop(clients);
}

/// `--idle` with connections that were busy a moment ago (so not idle for a minute): the
/// last close ends the wait with "drained" at once, not at the next idle check. And the
/// idle logic stays exact: one quiet connection is reported idle, and not before it has
/// been quiet for the idle time.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn idle_wait_woken_by_the_last_close_and_idle_on_time() {
    require_root();
    const P: u16 = 8630;
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    let server = Server::start(listen(&pair.a, Stack::Dual, P), 1);
    let port = P.to_string();
    for woken in [true, false] {
        let clients = open_held(&pair.b, sa(pair.a_v4, P), 3);
        server.wait_held(3, SETTLE);
        let mut w = drain.spawn_via(
            &env(woken),
            &[
                "wait",
                "--port",
                &port,
                "--idle",
                "60s",
                "--timeout",
                "600s",
            ],
        );
        w.expect_line("3 live connection(s)", SETTLE);
        server.close_held(2, Close::Fin);
        progress(&mut w, woken, "1 live connection(s)");
        let t_close = Instant::now();
        server.close_held(1, Close::Rst);
        if woken {
            exits_soon(w, t_close, "drained: no live connections");
        } else {
            still_waiting(w, "--idle 60s");
        }
        drop(clients);
    }
    // Exact: a connection just opened (the handshake is its last traffic) is idle after
    // 1.5 s of quiet, not before, with the safety poll out of the way.
    // Taken before the connect: its quiet time starts after this.
    let t_open = Instant::now();
    let clients = open_held(&pair.b, sa(pair.a_v4, P), 1);
    server.wait_held(1, SETTLE);
    let w = drain.spawn_via(
        &env(true),
        &[
            "wait",
            "--port",
            &port,
            "--idle",
            "1500ms",
            "--timeout",
            "600s",
        ],
    );
    let out = w.wait_for(Duration::from_secs(30));
    let after = out.exited.saturating_duration_since(t_open);
    eprintln!("idle reported {after:.2?} after the connection opened: {out}");
    out.expect_ok();
    assert!(
        out.stdout.starts_with("idle: 1 connection(s) still open"),
        "{out}"
    );
    assert!(
        after >= Duration::from_millis(1500) && after < Duration::from_millis(1500) + BOUND,
        "idle reported {after:?} after the connection opened (idle time 1.5 s)"
    );
    drop(clients);
}

/// A tracker at capacity (a set of 4, DRAIN_MAX_CONNECTIONS, with 6 connections): the
/// counted connections still wake `wait`, which, once they are gone, refuses to call the
/// port drained (two were never counted) and says so at once.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn a_tracker_at_capacity_still_wakes_and_never_says_drained() {
    require_root();
    const P: u16 = 8640;
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    let server = Server::start(listen(&pair.a, Stack::Dual, P), 1);
    let port = P.to_string();
    for woken in [true, false] {
        let clients = open_held(&pair.b, sa(pair.a_v4, P), 6);
        server.wait_held(6, SETTLE);
        let mut wrapper = env(woken);
        wrapper.push("DRAIN_MAX_CONNECTIONS=4");
        let mut w = drain.spawn_via(&wrapper, &["wait", "--port", &port, "--timeout", "600s"]);
        w.expect_line("4 live connection(s)", SETTLE);
        server.close_held(5, Close::Fin);
        let t_close = Instant::now();
        server.close_held(1, Close::Fin);
        if woken {
            exits_soon(w, t_close, "lost events");
        } else {
            still_waiting(w, "a tracker at capacity");
        }
        drop(clients);
    }
}

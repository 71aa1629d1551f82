//! `drain-user watch`: refused SYNs with the right source, port and action, a flood sampled
//! by the kernel's rate limit (events within the budget, events + held back == the gate's
//! own refused counter), closes of tracked connections with the count left, the TTL
//! running out and `gate off` ending the watch.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use drain_tests::{
    cli::{port_status, Drain, Json, JsonExt},
    netns::NetNsPair,
    traffic::{connect, send_syn, EchoServer},
};

const P: u16 = 8080;

fn events(out: &str) -> Vec<Json> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect()
}

fn of<'e>(evs: &'e [Json], kind: &str) -> Vec<&'e Json> {
    evs.iter().filter(|e| e["event"] == kind).collect()
}

/// Sends one SYN from `from` to `to` in `ns` and closes the socket before it retransmits.
fn one_syn(pair: &NetNsPair, ns: &str, from: SocketAddr, to: SocketAddr) {
    pair.in_ns(ns, || {
        let fd = send_syn(from, to);
        std::thread::sleep(Duration::from_millis(200));
        drop(fd);
    });
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn watch_reports_refusals_and_closes_sampled_within_budget_and_consistent_with_counters() {
    const RATE: u64 = 50;
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    let server = EchoServer::start(&pair, &pair.a, SocketAddr::new(pair.a_v4.into(), P));
    let server6 = EchoServer::start(&pair, &pair.a, SocketAddr::new(pair.a_v6.into(), P));
    // Held from before the gate: its close is a "left" event.
    let held = connect(&pair, &pair.b, server.addr, Duration::from_secs(5)).stream("held");
    let peer = held.local_addr().expect("the held connection's address");
    drain.on(&["--port", &P.to_string(), "--ttl", "10m"]);
    assert_eq!(
        port_status(&drain.status(), P).unwrap()["live_connections"],
        1
    );

    let started = Instant::now();
    let mut watch = drain.spawn(&[
        "watch",
        "--json",
        "--rate",
        &RATE.to_string(),
        "--duration",
        "6s",
    ]);
    watch.expect_line("\"watching\"", Duration::from_secs(10));

    // Known connects: each one's event carries its source, port and action.
    let known = [
        SocketAddr::new(pair.b_v4.into(), 41001),
        SocketAddr::new(pair.b_v4.into(), 41002),
        SocketAddr::new(pair.b_v6.into(), 41003),
    ];
    for from in known {
        let to = if from.is_ipv4() {
            server.addr
        } else {
            server6.addr
        };
        one_syn(&pair, &pair.b, from, to);
        // One at a time, so the rate limit (burst 2 per CPU) lets each through.
        watch.expect_line(
            &format!("\"sport\":{}", from.port()),
            Duration::from_secs(5),
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A one-second flood of SYNs (each socket closed at once, so none retransmits).
    let flood = pair.in_ns(&pair.b, || {
        let t0 = Instant::now();
        let mut n = 0u64;
        while t0.elapsed() < Duration::from_secs(1) {
            drop(send_syn(SocketAddr::new(pair.b_v4.into(), 0), server.addr));
            n += 1;
        }
        n
    });
    drop(held);
    let out = watch.wait_for(Duration::from_secs(20));
    let elapsed = started.elapsed();
    out.expect_ok();
    let evs = events(&out.stdout);
    let st = drain.status();
    let p = port_status(&st, P).unwrap();
    let syns_refused = p["syns_refused"].u64();

    let refused = of(&evs, "refused");
    for (from, want_to) in known.iter().zip([server.addr, server.addr, server6.addr]) {
        let e = refused
            .iter()
            .find(|e| e["sport"] == from.port())
            .unwrap_or_else(|| panic!("no event for {from}: {evs:?}"));
        assert_eq!(
            e["source"].str().parse::<IpAddr>().unwrap(),
            from.ip(),
            "{e}"
        );
        assert_eq!(e["port"], want_to.port(), "{e}");
        assert_eq!(e["action"], "drop", "{e}");
    }
    let limited: u64 = of(&evs, "limited").iter().map(|e| e["refused"].u64()).sum();
    let lost: u64 = of(&evs, "limited").iter().map(|e| e["lost"].u64()).sum();
    let ncpus = aya::util::nr_cpus().unwrap() as u64;
    let burst = (RATE / ncpus / 10).max(1);
    let budget = RATE * elapsed.as_secs().saturating_add(1) + ncpus * burst;
    eprintln!(
        "flood: {flood} SYNs; syns_refused {syns_refused}; events {} + held back {limited} + lost {lost}; budget {budget}",
        refused.len()
    );
    assert!(flood >= 1000, "the flood sent only {flood} SYNs");
    assert_eq!(lost, 0, "{evs:?}");
    assert!(
        refused.len() as u64 <= budget,
        "{} events > budget {budget}",
        refused.len()
    );
    assert!(
        refused.len() as u64 * 10 < flood,
        "the flood was not sampled"
    );
    // Everything the gate refused while the watch ran was shown or counted as held back.
    assert_eq!(refused.len() as u64 + limited, syns_refused, "{st}");
    assert!(syns_refused >= flood + known.len() as u64, "{st}");

    // The held connection's close, with nothing left on the port.
    let left = of(&evs, "left");
    assert_eq!(left.len(), 1, "{evs:?}");
    assert_eq!(left[0]["port"], P);
    assert_eq!(left[0]["live"], 0);
    // The remote end, as the connection's own socket says.
    assert_eq!(left[0]["peer"], peer.ip().to_string());
    assert_eq!(left[0]["peer_port"], peer.port());
    // The last line is the final summary.
    assert_eq!(evs.last().unwrap()["event"], "limited", "{evs:?}");
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn watch_reports_the_ttl_and_ends_at_gate_off() {
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    // No gate: nothing to watch, one line, exit 1.
    let out = drain.run(&["watch"]);
    out.expect_code(1);
    assert!(out.stderr.contains("no gate"), "{out}");

    drain.on(&["--port", &P.to_string(), "--ttl", "2s"]);
    let mut watch = drain.spawn(&["watch", "--json"]);
    watch.expect_line("\"watching\"", Duration::from_secs(10));
    let t = watch.expect_line("\"ttl_expired\"", Duration::from_secs(10));
    assert!(watch.running());
    drain.off();
    let out = watch.wait_for(Duration::from_secs(10));
    out.expect_ok();
    let evs = events(&out.stdout);
    assert_eq!(evs.last().unwrap()["event"], "gate_off", "{evs:?}");
    assert!(t.elapsed() < Duration::from_secs(30));

    // Human lines.
    drain.on(&["--port", &P.to_string()]);
    let out = drain.run(&["watch", "--duration", "1s"]);
    out.expect_ok();
    assert!(out.stdout.starts_with("watching the gate"), "{out}");
    assert!(
        out.stdout.contains("sampled  not shown: 0 refused SYNs"),
        "{out}"
    );
}

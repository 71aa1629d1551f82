//! The gate through the CLI, with real sockets: `drain-user gate on|off` and `status`, run in
//! network namespaces made by each test (never the host's), as separate processes each time
//! (the state lives in pins, not in a daemon).
//!
//! Layout of every test: namespace `a` is the gated host (servers on the gated port P),
//! namespace `b` is a remote client (or server, for outbound traffic). Every test holds a
//! [`Drain`] guard that runs `gate off` on drop, before [`NetNsPair`] deletes the namespaces.
//!
//! The gate drops a SYN to a gated port, so a connect there *times out* (no RST): connects
//! that must fail use a 1 s timeout, several at once where possible, to keep the file fast.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use drain_tests::{
    cli::{gate_links, gated_ports, iface_status, port_status, CliOutput, Drain, Json, NOBODY},
    netns::NetNsPair,
    object::{
        bpf_link_exists, bpftool, clsact_ingress, ingress_qdisc, link_xdp, open_pinned_link,
        pinned_link_id, tc_ingress, tcx_ingress, ForeignTc, ForeignXdp, PinDir,
    },
    traffic::{
        bind, connect, exchange, probe_all, round_trip, tcp_pair, transfer, Connect, EchoServer,
    },
};

/// The gated port, and another one that is never gated.
const P: u16 = 8080;
const Q: u16 = 9090;
/// A connect that is going to be dropped gives up after this long.
const SHORT: Duration = Duration::from_secs(1);
/// A connect that must succeed gets this long.
const LONG: Duration = Duration::from_secs(5);
/// auto's reason where another program holds the XDP hook.
const TAKEN: &str = "another program holds the XDP hook: TC runs beside it";
/// auto's reason on a veth.
const VETH: &str = "virtual device (veth): TC keeps the peer's TSO";

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Asserts each outcome is a completed connect, naming the target otherwise.
#[track_caller]
fn assert_all_ok(targets: &[SocketAddr], got: &[Connect]) {
    for (t, c) in targets.iter().zip(got) {
        assert!(c.is_ok(), "connect to {t}: expected success, got {c:?}");
    }
}

/// Asserts each outcome is a timeout (SYN dropped), naming the target otherwise.
#[track_caller]
fn assert_all_dropped(targets: &[SocketAddr], got: &[Connect]) {
    for (t, c) in targets.iter().zip(got) {
        assert!(
            c.is_timed_out(),
            "connect to {t}: expected a timeout (SYN dropped by the gate), got {c:?}"
        );
    }
}

/// Connects from `ns` to every target and checks each answers an echo round trip.
#[track_caller]
fn assert_open(pair: &NetNsPair, ns: &str, targets: &[SocketAddr]) {
    let got = probe_all(pair, ns, targets, LONG);
    assert_all_ok(targets, &got);
    for (t, c) in targets.iter().zip(got) {
        round_trip(&c.stream(&t.to_string()), 4096, 7);
    }
}

/// Connects from `ns` to every target at once and checks each is dropped.
#[track_caller]
fn assert_gated(pair: &NetNsPair, ns: &str, targets: &[SocketAddr]) {
    let got = probe_all(pair, ns, targets, SHORT);
    assert_all_dropped(targets, &got);
}

/// The interface lines of the "xdp:" section of `bpftool net show`.
fn xdp_lines(net: &str) -> Vec<&str> {
    net.lines()
        .skip_while(|l| l.trim() != "xdp:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty() && !l.ends_with(':'))
        .collect()
}

fn gate_state(st: &Json) -> &str {
    st["gate"].as_str().expect("schema checked")
}

/// Link pins a default `gate on` (lo and the veth, XDP) creates in namespace a.
fn xdp_link_pins(d: &Drain, veth: &str) -> Vec<String> {
    let mut v = vec![
        format!("link-xdp-{}", d.ifindex("lo")),
        format!("link-xdp-{}", d.ifindex(veth)),
    ];
    v.extend(gate_links().into_iter().map(String::from));
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------
// 1. Established connections keep flowing
// ---------------------------------------------------------------------------------------

/// Connections to the gated port opened before the gate (IPv4 and IPv6 over the veth from
/// b, IPv4 and IPv6 over lo inside a) exchange data in both directions at once, 1 MiB each
/// way so that multi-segment and GSO frames cross the XDP hooks (native on the veth,
/// generic on lo), before `gate on`, while the gate is on, and after `gate off`; then new
/// connections succeed again.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn established_connections_keep_flowing_through_gate_on_and_off() {
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    let (lo4, lo6) = (
        IpAddr::from(Ipv4Addr::LOCALHOST),
        IpAddr::from(Ipv6Addr::LOCALHOST),
    );
    // (listener, where the clients connect from)
    let listeners = [
        (bind(&pair, &pair.a, sa(pair.a_v4, P)), &pair.b),
        (bind(&pair, &pair.a, sa(pair.a_v6, P)), &pair.b),
        (bind(&pair, &pair.a, sa(lo4, P)), &pair.a),
        (bind(&pair, &pair.a, sa(lo6, P)), &pair.a),
    ];
    let conns: Vec<_> = listeners
        .iter()
        .map(|(l, from)| tcp_pair(&pair, l, from))
        .collect();
    exchange(&conns, 1, 1 << 20);

    drain.on(&["--port", &P.to_string()]);
    // The gate really is closed for new connections on that very port, on every path.
    assert_eq!(gate_state(&drain.status()), "on");
    std::thread::scope(|s| {
        let t = s.spawn(|| assert_gated(&pair, &pair.b, &[sa(pair.a_v4, P), sa(pair.a_v6, P)]));
        assert_gated(&pair, &pair.a, &[sa(lo4, P), sa(lo6, P)]);
        t.join().unwrap();
    });
    exchange(&conns, 2, 1 << 20);
    // Small writes too (one segment each): every one gets through, both ways.
    for i in 0..20u8 {
        exchange(&conns, i, 100);
    }

    drain.off();
    exchange(&conns, 3, 1 << 20);
    // New connections are accepted again, and carry data.
    for (l, from) in &listeners {
        let (client, server) = tcp_pair(&pair, l, from);
        transfer(&client, &server, 64 * 1024, 4);
        transfer(&server, &client, 64 * 1024, 5);
    }
}

// ---------------------------------------------------------------------------------------
// 2. New connections to the gated port are dropped; other ports stay open
// ---------------------------------------------------------------------------------------

/// With the gate on for P: connects to P time out over IPv4, IPv6 and loopback (lo is gated
/// by default), connects to Q on the same addresses succeed; status counts the refused SYNs
/// under P only; after `gate off` P accepts again.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn new_connections_to_the_gated_port_are_dropped_other_ports_stay_open() {
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    let lo = Ipv4Addr::LOCALHOST;
    let _servers: Vec<EchoServer> = [
        sa(pair.a_v4, P),
        sa(pair.a_v6, P),
        sa(lo, P),
        sa(pair.a_v4, Q),
        sa(pair.a_v6, Q),
        sa(lo, Q),
    ]
    .into_iter()
    .map(|addr| EchoServer::start(&pair, &pair.a, addr))
    .collect();
    let remote_p = [sa(pair.a_v4, P), sa(pair.a_v6, P)];
    let remote_q = [sa(pair.a_v4, Q), sa(pair.a_v6, Q)];
    assert_open(&pair, &pair.b, &remote_p);
    assert_open(&pair, &pair.a, &[sa(lo, P)]);

    drain.on(&["--port", &P.to_string()]);
    // All refused connects at once, from b and from a itself over lo.
    let refused = std::thread::scope(|s| {
        let from_b = s.spawn(|| probe_all(&pair, &pair.b, &remote_p, SHORT));
        let from_a = probe_all(&pair, &pair.a, &[sa(lo, P)], SHORT);
        let from_b = from_b.join().unwrap();
        assert_all_dropped(&remote_p, &from_b);
        assert_all_dropped(&[sa(lo, P)], &from_a);
        from_b.len() + from_a.len()
    });
    assert_open(&pair, &pair.b, &remote_q);
    assert_open(&pair, &pair.a, &[sa(lo, Q)]);

    let st = drain.status();
    assert_eq!(gate_state(&st), "on", "{st}");
    assert_eq!(gated_ports(&st), vec![P], "only P is gated: {st}");
    let p = port_status(&st, P).unwrap();
    let n_refused = p["syns_refused"].as_u64().unwrap();
    // A connect that times out after 1 s may have retransmitted its SYN once: >=, not ==.
    assert!(
        n_refused >= refused as u64,
        "{refused} connects were dropped but syns_refused is {n_refused}: {st}"
    );
    assert_eq!(p["syns_passed"].as_u64(), Some(0), "{st}");
    assert_eq!(p["syns_allowed"].as_u64(), Some(0), "{st}");
    assert_eq!(p["syns_expired"].as_u64(), Some(0), "{st}");
    // The connections of assert_open above were closed: none is live on P.
    assert_eq!(p["live_connections"].as_i64(), Some(0), "{st}");
    assert_eq!(st["expired"].as_bool(), Some(false), "{st}");
    let ttl = st["ttl_remaining_ms"].as_u64().expect("default TTL is 10m");
    assert!(
        ttl > 9 * 60 * 1000 && ttl <= 10 * 60 * 1000,
        "default TTL is 10m, {ttl} ms left: {st}"
    );

    drain.off();
    assert_open(&pair, &pair.b, &remote_p);
    assert_open(&pair, &pair.a, &[sa(lo, P)]);
}

/// status, per gated port: a connection accepted before the gate counts as live until it
/// closes, each dropped SYN counts as refused (under its own port only), and `--iface`
/// limits the interfaces listed.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn status_counts_live_connections_and_refused_syns_per_port() {
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    let server = EchoServer::start(&pair, &pair.a, sa(pair.a_v4, P));
    let held = connect(&pair, &pair.b, server.addr, LONG).stream("held");
    round_trip(&held, 10, 1);

    drain.on(&["--port", &format!("{P},{Q}"), "--iface", &pair.veth_a]);
    let st = drain.status();
    assert_eq!(gated_ports(&st), vec![P, Q], "{st}");
    // The connection predates the gate: the tracker's seed counts it.
    assert_eq!(
        port_status(&st, P).unwrap()["live_connections"].as_i64(),
        Some(1),
        "one connection is open on {P}: {st}"
    );
    assert_eq!(
        port_status(&st, Q).unwrap()["live_connections"].as_i64(),
        Some(0),
        "{st}"
    );
    let n = 3;
    assert_gated(&pair, &pair.b, &vec![server.addr; n]);
    let st = drain.status();
    let p = port_status(&st, P).unwrap();
    assert!(
        p["syns_refused"].as_u64().unwrap() >= n as u64,
        "{n} connects dropped: {st}"
    );
    assert_eq!(
        port_status(&st, Q).unwrap()["syns_refused"].as_u64(),
        Some(0),
        "nothing was sent to {Q}: {st}"
    );
    // Only the veth was named: lo is not attached.
    let ifaces = st["interfaces"].as_array().unwrap();
    assert_eq!(ifaces.len(), 1, "{st}");
    assert_eq!(
        ifaces[0]["name"].as_str(),
        Some(pair.veth_a.as_str()),
        "{st}"
    );
    assert_eq!(
        ifaces[0]["ifindex"].as_u64(),
        Some(drain.ifindex(&pair.veth_a).into()),
        "{st}"
    );

    drop(held);
    // The close reaches the tracker asynchronously (FIN handshake): poll briefly.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let st = drain.status();
        let live = port_status(&st, P).unwrap()["live_connections"].as_i64();
        if live == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "closed connection still counted live: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(server.accepted(), 1, "no dropped connect reached accept()");
}

// ---------------------------------------------------------------------------------------
// 3. Outbound connections from the gated host
// ---------------------------------------------------------------------------------------

/// With a's gate on for P, a connects out to servers in b that listen on P (v4 and v6):
/// the SYN-ACK that comes back from port P must pass (it is not a connection request), and
/// is not counted as refused.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn outbound_connections_to_the_gated_port_number_work() {
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    let remote = [sa(pair.b_v4, P), sa(pair.b_v6, P)];
    let _servers: Vec<EchoServer> = remote
        .iter()
        .map(|&addr| EchoServer::start(&pair, &pair.b, addr))
        .collect();
    let _own = EchoServer::start(&pair, &pair.a, sa(pair.a_v4, P));

    drain.on(&["--port", &P.to_string()]);
    std::thread::scope(|s| {
        // Meanwhile: the gate is really on for a's own server on P.
        let inbound = s.spawn(|| probe_all(&pair, &pair.b, &[sa(pair.a_v4, P)], SHORT));
        let got = probe_all(&pair, &pair.a, &remote, LONG);
        assert_all_ok(&remote, &got);
        for (t, c) in remote.iter().zip(got) {
            round_trip(&c.stream(&t.to_string()), 256 * 1024, 3);
        }
        assert_all_dropped(&[sa(pair.a_v4, P)], &inbound.join().unwrap());
    });
    let st = drain.status();
    let p = port_status(&st, P).unwrap();
    // Only the inbound probe (plus perhaps its retransmit) was refused.
    let refused = p["syns_refused"].as_u64().unwrap();
    assert!((1..=2).contains(&refused), "{st}");
}

// ---------------------------------------------------------------------------------------
// 4. State persists between CLI processes
// ---------------------------------------------------------------------------------------

/// `gate on` exits; the gate stays on (pins under its state directory); `status` in a
/// later process reports it; `gate off` in a third process opens it.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn gate_on_and_off_in_separate_processes_share_pinned_state() {
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    let server = EchoServer::start(&pair, &pair.a, sa(pair.a_v4, P));
    assert_eq!(gate_state(&drain.status()), "off");
    assert!(!drain.state_dir().exists());

    // --attach xdp: XDP whatever the device (the default, auto, takes TC on these: see
    // `the_default_attaches_tc_on_virtual_devices_and_says_why`).
    let out = drain.on(&["--port", &P.to_string(), "--attach", "xdp"]);
    assert!(out.stdout.contains("gate on"), "{out}");
    assert!(
        out.stderr.is_empty(),
        "a clean gate on prints nothing on stderr: {out}"
    );
    // The process is gone (run() waited for it); what it left is pinned.
    let pins = drain.pins();
    for m in drain_common::map::ALL {
        assert!(
            pins.contains(&m.to_string()),
            "map {m} not pinned: {pins:?}"
        );
    }
    assert_eq!(drain.link_pins(), xdp_link_pins(&drain, &pair.veth_a));
    assert_gated(&pair, &pair.b, &[server.addr]);

    let st = drain.status();
    assert_eq!(gate_state(&st), "on", "{st}");
    assert_eq!(gated_ports(&st), vec![P], "{st}");
    let lo = iface_status(&st, "lo").unwrap_or_else(|| panic!("lo: {st}"));
    assert_eq!(lo["attach"].as_str(), Some("xdp"), "{st}");
    assert_eq!(
        lo["mode"].as_str(),
        Some("generic"),
        "lo has no native XDP: {st}"
    );
    let veth = iface_status(&st, &pair.veth_a).unwrap_or_else(|| panic!("veth: {st}"));
    assert_eq!(veth["attach"].as_str(), Some("xdp"), "{st}");
    assert_eq!(
        veth["mode"].as_str(),
        Some("native"),
        "veth has native XDP: {st}"
    );
    for i in [lo, veth] {
        assert_eq!(i["requested"].as_str(), Some("xdp"), "{st}");
        assert_eq!(i["reason"].as_str(), Some("--attach xdp"), "{st}");
    }
    assert!(
        out.stdout.contains("xdp generic; --attach xdp"),
        "gate on says lo runs generic XDP: {out}"
    );
    assert_eq!(st["interfaces"].as_array().unwrap().len(), 2, "{st}");
    // The human form agrees.
    let human = drain.run(&["status"]);
    human.expect_ok();
    assert!(human.stdout.starts_with("gate: on"), "{human}");

    // Re-running with --ttl none clears the deadline.
    drain.on(&["--port", &P.to_string(), "--ttl", "none"]);
    let st = drain.status();
    assert!(st["ttl_remaining_ms"].is_null(), "--ttl none: {st}");
    assert_eq!(gate_state(&st), "on", "{st}");

    let out = drain.off();
    assert!(!out.stdout.contains("already off"), "{out}");
    let st = drain.status();
    assert_eq!(gate_state(&st), "off", "{st}");
    assert!(st["ttl_remaining_ms"].is_null(), "{st}");
    assert_eq!(st["interfaces"].as_array().map(Vec::len), Some(0), "{st}");
    assert_eq!(st["ports"].as_array().map(Vec::len), Some(0), "{st}");
    assert_open(&pair, &pair.b, &[server.addr]);
}

// ---------------------------------------------------------------------------------------
// 5. Two namespaces, two independent gates
// ---------------------------------------------------------------------------------------

/// Gate on in pair 1's `a` leaves pair 2's `a` accepting; with both on, gate off in pair 1
/// leaves pair 2 gated. Each keeps its own pin directory.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn gates_in_two_namespaces_are_independent() {
    let (p1, p2) = (NetNsPair::new(), NetNsPair::new());
    let (d1, d2) = (Drain::new(&p1, &p1.a), Drain::new(&p2, &p2.a));
    let s1 = EchoServer::start(&p1, &p1.a, sa(p1.a_v4, P));
    let s2 = EchoServer::start(&p2, &p2.a, sa(p2.a_v4, P));
    assert_ne!(d1.state_dir(), d2.state_dir());

    d1.on(&["--port", &P.to_string(), "--attach", "xdp"]);
    assert_open(&p2, &p2.b, &[s2.addr]);
    assert_eq!(gate_state(&d2.status()), "off");
    assert!(!d2.state_dir().exists());

    d2.on(&["--port", &P.to_string(), "--attach", "xdp"]);
    d1.off();
    assert!(!d1.state_dir().exists());
    assert!(
        d2.state_dir().exists(),
        "gate off in one namespace removed the other's pins"
    );
    assert_eq!(gate_state(&d1.status()), "off");
    assert_eq!(gate_state(&d2.status()), "on");
    std::thread::scope(|s| {
        let gated = s.spawn(|| assert_gated(&p2, &p2.b, &[s2.addr]));
        assert_open(&p1, &p1.b, &[s1.addr]);
        gated.join().unwrap();
    });
    assert_eq!(
        d2.link_pins(),
        xdp_link_pins(&d2, &p2.veth_a),
        "the other namespace's links are intact"
    );
}

// ---------------------------------------------------------------------------------------
// 6. gate off leaves nothing behind
// ---------------------------------------------------------------------------------------

/// After `gate off`: no pin directory, no XDP program on lo or the veth (ip and bpftool
/// agree), no TC program, none of the gate's bpf_links (interface links, tracker,
/// sk_lookup, RST counter) exists any more; a second `gate off` exits 0 saying the gate was already off.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn gate_off_leaves_no_pins_links_or_programs() {
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    drain.on(&["--port", &P.to_string(), "--attach", "xdp"]);
    let dir = drain.state_dir();
    let link_ids: Vec<(String, u32)> = drain
        .link_pins()
        .into_iter()
        .map(|name| {
            let id = pinned_link_id(&dir.join(&name));
            (name, id)
        })
        .collect();
    assert_eq!(
        link_ids.len(),
        2 + gate_links().len(),
        "lo, veth and the gate's own links: {link_ids:?}"
    );
    // So that the check after gate off can fail: the kernel lists each link now.
    for (name, id) in &link_ids {
        assert!(bpf_link_exists(*id), "link {name} (id {id}) not listed");
    }
    for dev in ["lo", pair.veth_a.as_str()] {
        let (_, name) = link_xdp(&pair, &pair.a, dev)
            .unwrap_or_else(|| panic!("gate on: no XDP program on {dev}"));
        assert_eq!(name, drain_common::prog::XDP);
    }

    let out = drain.off();
    assert!(out.stdout.contains("gate off"), "{out}");
    assert!(!dir.exists(), "{} left behind", dir.display());
    for dev in ["lo", pair.veth_a.as_str()] {
        assert_eq!(
            link_xdp(&pair, &pair.a, dev),
            None,
            "an XDP program is still on {dev}"
        );
    }
    let details = drain.sh("ip", &["-d", "link", "show"]);
    assert!(!details.contains("prog/xdp"), "{details}");
    if let Some(net) = bpftool(&pair, &pair.a, &["net", "show"]) {
        assert!(xdp_lines(&net).is_empty(), "bpftool net show: {net}");
    }
    for dev in ["lo", pair.veth_a.as_str()] {
        assert!(tc_ingress(&pair, &pair.a, dev).is_empty(), "TC on {dev}");
    }
    // The link objects themselves may outlive the call briefly: bpffs drops its reference
    // after an RCU grace period (bpf_free_inode), and the tracker's tracing link cannot be
    // detached early. Gone within a few seconds is the requirement here.
    let deadline = Instant::now() + Duration::from_secs(5);
    for (name, id) in &link_ids {
        while bpf_link_exists(*id) {
            assert!(
                Instant::now() < deadline,
                "link {name} (id {id}) still exists 5 s after gate off"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    let again = drain.run(&["gate", "off"]);
    again.expect_ok();
    assert!(again.stdout.contains("already off"), "{again}");
    assert!(!dir.exists());
}

/// `gate off` detaches at once even while another process holds a reference to the gate's
/// links (bpftool, an inventory agent, a `status` running at that moment: here, this test):
/// when it returns the XDP and TCX hooks are free, and an immediate `gate on` works. (A
/// bpf_link leaves its hook only when its last reference goes, and the pin's reference is
/// dropped late: bpffs puts it from ->free_inode, after an RCU grace period, and
/// bpf_link_put defers to a workqueue, kernel/bpf/inode.c, kernel/bpf/syscall.c. So
/// unpinning alone is not a detach.)
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn gate_off_detaches_even_while_another_process_holds_the_links() {
    // --attach tc: a TCX link where the kernel has TCX (the case this test is about), the
    // clsact filter elsewhere, which is no link: the same "hooks free at once" holds.
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    let port = P.to_string();
    for attach in ["xdp", "tc"] {
        drain.on(&["--port", &port, "--attach", attach]);
        let held: Vec<_> = drain
            .link_pins()
            .iter()
            .map(|l| open_pinned_link(&drain.state_dir().join(l)))
            .collect();
        let iface_links = if attach == "tc" && drain.tc_is_clsact() {
            0
        } else {
            2
        };
        assert_eq!(
            held.len(),
            iface_links + gate_links().len(),
            "{:?}",
            drain.link_pins()
        );
        drain.off();
        assert!(!drain.state_dir().exists());
        for dev in ["lo", pair.veth_a.as_str()] {
            assert_eq!(
                link_xdp(&pair, &pair.a, dev),
                None,
                "--attach {attach}: gate off returned with XDP still on {dev}"
            );
            let chain = tc_ingress(&pair, &pair.a, dev);
            assert!(
                chain.is_empty(),
                "--attach {attach}: gate off returned with TC still on {dev}: {chain:?}"
            );
        }
        // What a deploy script does next: gate on again, at once.
        drain.on(&["--port", &port, "--attach", attach]);
        for dev in ["lo", pair.veth_a.as_str()] {
            let chain = tc_ingress(&pair, &pair.a, dev);
            assert!(chain.len() <= 1, "two gates on {dev}: {chain:?}");
        }
        drain.off();
        drop(held);
    }
}

// ---------------------------------------------------------------------------------------
// 7. Missing privileges
// ---------------------------------------------------------------------------------------

// Bad input (exit 2, one line, nothing changed) is one table: tests/tests/bad_input.rs.

/// Without root (uid 65534, no capabilities) and as root with every capability dropped,
/// `gate on` and `gate off` exit 1 with one line naming root/capabilities, and change
/// nothing (an existing gate stays on).
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn without_privileges_exits_1_and_changes_nothing() {
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    let nobody = NOBODY;
    let root_no_caps: &[&str] = &["setpriv", "--inh-caps=-all", "--bounding-set=-all"];
    let says_why = |out: &CliOutput| {
        out.expect_code(1);
        let lines = out.stderr_lines();
        assert_eq!(lines.len(), 1, "{out}");
        let l = lines[0].to_lowercase();
        assert!(l.contains("root") || l.contains("cap_"), "{out}");
    };
    let port = P.to_string();
    for wrapper in [nobody, root_no_caps] {
        says_why(&drain.run_via(wrapper, &["gate", "on", "--port", &port]));
        assert!(!drain.state_dir().exists());
        assert_eq!(link_xdp(&pair, &pair.a, "lo"), None);
    }

    drain.on(&["--port", &port, "--attach", "xdp"]);
    for wrapper in [nobody, root_no_caps] {
        says_why(&drain.run_via(wrapper, &["gate", "off"]));
    }
    assert_eq!(gate_state(&drain.status()), "on");
    assert_eq!(drain.link_pins(), xdp_link_pins(&drain, &pair.veth_a));
}

// ---------------------------------------------------------------------------------------
// 8. --attach tc
// ---------------------------------------------------------------------------------------

/// The same gate at TC ingress, both ways drain attaches there: TCX where the kernel has
/// it, and the classic clsact qdisc with drain's cls_bpf filter (forced here with
/// `DRAIN_NO_TCX`, as on kernels before 6.6). Established connections flow, new ones to P
/// are dropped, Q stays open; status says "tc" (mode null) and which TC mode; the kernel
/// holds one drain_tc per interface and no XDP; gate off removes them.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn attach_tc_gates_the_same_way() {
    let pair = NetNsPair::new();
    tc_contract(&pair, &Drain::new(&pair, &pair.a));
    tc_contract(&pair, &Drain::classic(&pair, &pair.a));
}

fn tc_contract(pair: &NetNsPair, drain: &Drain) {
    let clsact = drain.tc_is_clsact();
    let gated = [sa(pair.a_v4, P), sa(pair.a_v6, P)];
    let open = [sa(pair.a_v4, Q), sa(pair.a_v6, Q)];
    let _servers: Vec<EchoServer> = gated
        .iter()
        .chain(&open)
        .map(|&a| EchoServer::start(pair, &pair.a, a))
        .collect();
    let held = bind(pair, &pair.a, sa(pair.a_v4, P + 1));
    let (client, server) = tcp_pair(pair, &held, &pair.b);

    let out = drain.on(&["--port", &format!("{P},{}", P + 1), "--attach", "tc"]);
    assert!(out.stdout.contains("tc"), "{out}");
    assert_eq!(out.stdout.contains("tc clsact"), clsact, "{out}");
    let st = drain.status();
    let ifaces = st["interfaces"].as_array().unwrap();
    assert_eq!(ifaces.len(), 2, "lo and the veth: {st}");
    let mode = if clsact { "clsact" } else { "tcx" };
    for i in ifaces {
        assert_eq!(i["attach"].as_str(), Some("tc"), "{st}");
        assert_eq!(i["tc_mode"].as_str(), Some(mode), "{st}");
        assert_eq!(i["state"].as_str(), Some("attached"), "{st}");
        assert!(i["mode"].is_null(), "mode is for xdp only: {st}");
        assert_eq!(i["others"].as_array().map(Vec::len), Some(0), "{st}");
    }
    let mut want = gate_links();
    let tc_pins = [
        format!("link-tc-{}", drain.ifindex("lo")),
        format!("link-tc-{}", drain.ifindex(&pair.veth_a)),
    ];
    if !clsact {
        want.extend(tc_pins.iter().map(String::as_str));
        want.sort();
    }
    assert_eq!(drain.link_pins(), want);
    assert_eq!(
        drain
            .pins()
            .contains(&drain_user::clsact::RECORDS.to_string()),
        clsact,
        "the clsact records: {:?}",
        drain.pins()
    );
    assert_eq!(link_xdp(pair, &pair.a, &pair.veth_a), None, "tc, not xdp");
    for dev in ["lo", pair.veth_a.as_str()] {
        let chain = tc_ingress(pair, &pair.a, dev);
        assert_eq!(chain.len(), 1, "one TC program on {dev}: {chain:?}");
        assert_eq!(chain[0].1, drain_common::prog::TC, "{dev}: {chain:?}");
        if clsact {
            // The documented slot: pref 1, handle 0xd7a1, protocol all, direct action.
            let f = &clsact_ingress(pair, &pair.a, dev)[0];
            assert_eq!(
                (f.priority, f.handle, f.kind.as_str()),
                (1, 0xd7a1, "bpf"),
                "{dev}: {f:?}"
            );
            assert!(tcx_ingress(pair, &pair.a, dev).is_empty(), "{dev}");
        } else {
            assert!(clsact_ingress(pair, &pair.a, dev).is_empty(), "{dev}");
        }
    }

    std::thread::scope(|s| {
        let dropped = s.spawn(|| assert_gated(pair, &pair.b, &gated));
        assert_open(pair, &pair.b, &open);
        s.spawn(|| transfer(&client, &server, 1 << 20, 5));
        transfer(&server, &client, 1 << 20, 6);
        dropped.join().unwrap();
    });
    let st = drain.status();
    assert!(
        port_status(&st, P).unwrap()["syns_refused"]
            .as_u64()
            .unwrap()
            >= 2,
        "{st}"
    );

    drain.off();
    assert!(!drain.state_dir().exists());
    for dev in ["lo", pair.veth_a.as_str()] {
        let chain = tc_ingress(pair, &pair.a, dev);
        assert!(chain.is_empty(), "TC programs left on {dev}: {chain:?}");
        assert_eq!(
            ingress_qdisc(pair, &pair.a, dev),
            None,
            "the clsact qdisc drain made on {dev} was left"
        );
    }
    assert_open(pair, &pair.b, &gated);
    transfer(&client, &server, 1000, 9);
}

/// The default, `--attach auto`, on a veth and lo: TC on both (TCX where the kernel has it,
/// the clsact filter where it has not, forced here with `DRAIN_NO_TCX` as on kernels
/// before 6.6), no XDP on the veth, so its peer keeps TSO; the plan, `gate on`, `check`
/// and `status` (JSON and text) say auto chose it and why; the gate refuses SYNs there.
/// (auto on a physical device cannot be attached here: the decision's unit tests in
/// drain-user's domain/attach.rs cover it.)
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn the_default_attaches_tc_on_virtual_devices_and_says_why() {
    let pair = NetNsPair::new();
    default_contract(&pair, &Drain::new(&pair, &pair.a));
    default_contract(&pair, &Drain::classic(&pair, &pair.a));
}

fn default_contract(pair: &NetNsPair, drain: &Drain) {
    let clsact = drain.tc_is_clsact();
    let veth = pair.veth_a.as_str();
    let server = EchoServer::start(pair, &pair.a, sa(pair.a_v4, P));
    let port = P.to_string();
    let why = |st: &Json, dev: &str| -> (String, String, String) {
        let i = iface_status(st, dev).unwrap_or_else(|| panic!("{dev}: {st}"));
        let s = |k: &str| i[k].as_str().unwrap_or("null").to_string();
        (s("attach"), s("requested"), s("reason"))
    };

    // The plan says it before anything is attached.
    let plan = drain.run(&["gate", "on", "--port", &port, "--dry-run", "--json"]);
    plan.expect_ok();
    let plan: Json = serde_json::from_str(&plan.stdout).expect("plan JSON");
    let ifaces = plan["differences"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["field"] == "interfaces")
        .unwrap_or_else(|| panic!("{plan}"))["after"]
        .clone();
    assert!(
        ifaces.as_array().unwrap().contains(&serde_json::json!(
            {"name": veth, "attach": "tc", "reason": format!("auto: {VETH}")}
        )),
        "{plan}"
    );
    let check = drain.run(&["check", "--port", &port, "--json"]);
    check.expect_ok();
    let check: Json = serde_json::from_str(&check.stdout).expect("check JSON");
    let c = check["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == veth)
        .unwrap_or_else(|| panic!("{check}"));
    assert_eq!(c["attach"], "tc", "{check}");
    assert_eq!(c["reason"], format!("auto: {VETH}"), "{check}");
    assert_eq!(
        c["note"].as_str().unwrap().contains("clsact"),
        clsact,
        "{check}"
    );

    let out = drain.on(&["--port", &port]);
    assert!(out.stdout.contains(&format!("{veth} (tc")), "{out}");
    assert!(out.stdout.contains(&format!("auto: {VETH}")), "{out}");
    let st = drain.status();
    assert_eq!(
        why(&st, veth),
        ("tc".into(), "auto".into(), VETH.into()),
        "{st}"
    );
    let (hook, requested, reason) = why(&st, "lo");
    assert_eq!((hook.as_str(), requested.as_str()), ("tc", "auto"), "{st}");
    assert!(reason.starts_with("virtual device (loopback): TC"), "{st}");
    let mode = if clsact { "clsact" } else { "tcx" };
    for dev in ["lo", veth] {
        let i = iface_status(&st, dev).unwrap();
        assert_eq!(i["tc_mode"].as_str(), Some(mode), "{st}");
        assert_eq!(i["state"].as_str(), Some("attached"), "{st}");
    }
    let text = drain.run(&["status"]);
    text.expect_ok();
    assert!(
        text.stdout
            .lines()
            .any(|l| l.contains(veth) && l.contains(&format!("tc {mode} (auto: {VETH})"))),
        "{text}"
    );
    // The kernel's side: drain's TC program on the veth, no XDP program there.
    assert_eq!(
        link_xdp(pair, &pair.a, veth),
        None,
        "auto put XDP on a veth"
    );
    let chain = tc_ingress(pair, &pair.a, veth);
    assert_eq!(chain.len(), 1, "{chain:?}");
    assert_eq!(chain[0].1, drain_common::prog::TC, "{chain:?}");
    assert_gated(pair, &pair.b, &[server.addr]);
    drain.off();
    assert_open(pair, &pair.b, &[server.addr]);
}

/// The classic path's state is the kernel's: drain's clsact filter deleted behind its back
/// (`tc filter del`, `tc qdisc del`) makes status say so, and the port really is open
/// there; `gate on` repairs it. Another tool's filters stay where they are, in another
/// slot or in drain's own (taken while drain's was gone: status says so, `gate off` leaves
/// it, `gate on` refuses to replace it), and so does a clsact qdisc drain did not make or
/// that still holds another filter; the qdisc drain made and left empty goes.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn clsact_filters_are_judged_by_the_kernel_and_repaired() {
    let pair = NetNsPair::new();
    let drain = Drain::classic(&pair, &pair.a);
    let pins = PinDir::new();
    let foreign = ForeignTc::load_pinned(&pins);
    let veth = pair.veth_a.as_str();
    // The veth already has a clsact qdisc and another tool's filter at pref 2; lo has none.
    drain.sh("tc", &["qdisc", "add", "dev", veth, "clsact"]);
    foreign.add_filter(&pair, &pair.a, veth, 2, 0x2);
    let gated = [sa(pair.a_v4, P)];
    let open = [sa(pair.a_v4, Q)];
    let _servers: Vec<EchoServer> = gated
        .iter()
        .chain(&open)
        .map(|&a| EchoServer::start(&pair, &pair.a, a))
        .collect();
    let theirs = |f: &drain_user::clsact::Filter| f.prog_id == Some(foreign.id);
    let iface_state = |st: &Json, dev: &str| {
        iface_status(st, dev).unwrap_or_else(|| panic!("{dev}: {st}"))["state"]
            .as_str()
            .unwrap()
            .to_owned()
    };

    let port = P.to_string();
    drain.on(&["--port", &port, "--attach", "tc"]);
    // Drain's filter runs first, theirs after it, untouched.
    let filters = clsact_ingress(&pair, &pair.a, veth);
    assert_eq!(filters.len(), 2, "{filters:?}");
    assert_eq!(filters[0].name.as_deref(), Some("drain_tc"), "{filters:?}");
    assert!(
        theirs(&filters[1]) && filters[1].priority == 2,
        "{filters:?}"
    );
    let st = drain.status();
    let others = iface_status(&st, veth).unwrap()["others"].to_string();
    assert!(
        others.contains(ForeignTc::NAME),
        "status lists theirs: {st}"
    );
    std::thread::scope(|s| {
        let t = s.spawn(|| assert_gated(&pair, &pair.b, &gated));
        // Their filter passes Q on (TC_ACT_UNSPEC), and so does drain's.
        assert_open(&pair, &pair.b, &open);
        t.join().unwrap();
    });

    // Behind drain's back: its filter deleted from the veth. Status says detached, the
    // gate is still on (lo), and a new connection through the veth is accepted: status
    // told the truth.
    drain.sh(
        "tc",
        &[
            "filter", "del", "dev", veth, "ingress", "pref", "1", "handle", "0xd7a1", "bpf",
        ],
    );
    let st = drain.status();
    assert_eq!(iface_state(&st, veth), "detached", "{st}");
    assert_eq!(iface_state(&st, "lo"), "attached", "{st}");
    assert!(
        st["warnings"].to_string().contains("clsact filter on"),
        "a warning names it: {st}"
    );
    assert_open(&pair, &pair.b, &gated);
    // lo's whole qdisc deleted: nothing of drain's is attached anywhere, and status does
    // not claim the gate is on.
    drain.sh("tc", &["qdisc", "del", "dev", "lo", "clsact"]);
    let st = drain.status();
    assert_eq!(iface_state(&st, "lo"), "detached", "{st}");
    assert_eq!(gate_state(&st), "off", "nothing attached: {st}");

    // gate on repairs both; their filter is still second, and still theirs.
    let out = drain.on(&["--port", &port, "--attach", "tc"]);
    assert!(out.stdout.contains("re-attached"), "{out}");
    let st = drain.status();
    assert_eq!(gate_state(&st), "on", "{st}");
    for dev in ["lo", veth] {
        assert_eq!(iface_state(&st, dev), "attached", "{dev}: {st}");
    }
    let filters = clsact_ingress(&pair, &pair.a, veth);
    assert_eq!(filters.len(), 2, "{filters:?}");
    assert!(theirs(&filters[1]), "{filters:?}");
    assert_gated(&pair, &pair.b, &gated);

    // Another tool takes drain's very slot while drain's filter is gone: status says the
    // slot holds another program, gate off deletes nothing of theirs (matched by program
    // id, not by slot), and a new gate on refuses to replace it.
    drain.sh(
        "tc",
        &[
            "filter", "del", "dev", veth, "ingress", "pref", "1", "handle", "0xd7a1", "bpf",
        ],
    );
    foreign.add_filter(&pair, &pair.a, veth, 1, 0xd7a1);
    // Also a filter of theirs on lo, whose qdisc drain made: it stays, so does the qdisc.
    foreign.add_filter(&pair, &pair.a, "lo", 3, 0x3);
    let st = drain.status();
    assert_eq!(iface_state(&st, veth), "foreign", "{st}");
    drain.off();
    let left = clsact_ingress(&pair, &pair.a, veth);
    assert_eq!(left.len(), 2, "both of theirs stay: {left:?}");
    assert!(left.iter().all(theirs), "{left:?}");
    let left = clsact_ingress(&pair, &pair.a, "lo");
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(theirs(&left[0]), "{left:?}");
    assert_eq!(
        ingress_qdisc(&pair, &pair.a, "lo").as_deref(),
        Some("clsact")
    );
    let out = drain.run(&[
        "gate", "on", "--port", &port, "--attach", "tc", "--iface", veth,
    ]);
    out.expect_code(1);
    assert_eq!(out.stderr_lines().len(), 1, "{out}");
    assert!(
        out.stderr.contains("0xd7a1") && out.stderr.contains(veth),
        "names the slot: {out}"
    );
    assert!(!drain.state_dir().exists(), "a refused gate on left state");
    assert_eq!(clsact_ingress(&pair, &pair.a, veth).len(), 2);
    // The same refusal over a gate that exists (on lo), after attaching a new interface
    // first (a veth of its own, which gets a clsact qdisc from drain): that attachment is rolled
    // back, qdisc included, and lo's filter is the same one as before.
    drain.on(&["--port", &port, "--attach", "tc", "--iface", "lo"]);
    let lo_prog =
        |st: &Json| iface_status(st, "lo").unwrap_or_else(|| panic!("{st}"))["state"] == "attached";
    assert!(lo_prog(&drain.status()));
    let lo_before: Vec<_> = clsact_ingress(&pair, &pair.a, "lo");
    drain.sh(
        "ip",
        &[
            "link", "add", "extra9", "type", "veth", "peer", "name", "extra9p",
        ],
    );
    drain.sh("ip", &["link", "set", "extra9", "up"]);
    let out = drain.run(&[
        "gate", "on", "--port", &port, "--attach", "tc", "--iface", "extra9", "--iface", veth,
    ]);
    out.expect_code(1);
    assert!(out.stderr.contains("0xd7a1"), "{out}");
    assert_eq!(
        ingress_qdisc(&pair, &pair.a, "extra9"),
        None,
        "extra9's attachment was not rolled back"
    );
    assert_eq!(clsact_ingress(&pair, &pair.a, "lo"), lo_before);
    let st = drain.status();
    assert!(lo_prog(&st), "{st}");
    assert_eq!(st["interfaces"].as_array().unwrap().len(), 1, "{st}");
    drain.off();

    // Their filters gone, lo's qdisc (made by drain, whose record went with gate off) and
    // the veth's (theirs) are theirs to remove; a fresh gate on and off over the veth's
    // pre-existing qdisc leaves it in place, empty.
    for (dev, pref, handle) in [
        (veth, "1", "0xd7a1"),
        (veth, "2", "0x2"),
        ("lo", "3", "0x3"),
    ] {
        drain.sh(
            "tc",
            &[
                "filter", "del", "dev", dev, "ingress", "pref", pref, "handle", handle, "bpf",
            ],
        );
    }
    drain.on(&["--port", &port, "--attach", "tc"]);
    assert_gated(&pair, &pair.b, &gated);
    drain.off();
    assert_eq!(
        ingress_qdisc(&pair, &pair.a, veth).as_deref(),
        Some("clsact"),
        "a qdisc drain did not make is left"
    );
    assert!(clsact_ingress(&pair, &pair.a, veth).is_empty());
    assert_open(&pair, &pair.b, &gated);
}

/// The classic path never clobbers what another tool put where drain's filter would go:
/// (a) a filter of another kind at priority 1 of the clsact ingress (u32, for every
/// protocol and for IPv4 only), which drain's cannot share and must not run after; (b) a
/// plain `ingress` qdisc, which the clsact qdisc cannot coexist with. Each `gate on` is
/// refused with one line naming the interface, what is there and the fix, before anything
/// changes: no state, their filters and qdisc as they were, the port still open, and a gate
/// that exists (on lo) untouched; `check --attach tc` stops with the same line first. Done
/// as each line says (theirs moved to pref 2, the
/// ingress qdisc replaced by clsact), the gate works: the negative runs.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn clsact_refuses_to_clobber_a_foreign_filter_or_ingress_qdisc() {
    let pair = NetNsPair::new();
    let drain = Drain::classic(&pair, &pair.a);
    let veth = pair.veth_a.as_str();
    let gated = [sa(pair.a_v4, P)];
    let _server = EchoServer::start(&pair, &pair.a, gated[0]);
    let port = P.to_string();
    let on_veth = || {
        drain.run(&[
            "gate", "on", "--port", &port, "--attach", "tc", "--iface", veth,
        ])
    };
    // `check` says what `gate on` will say, before it is tried.
    let check = || drain.run(&["check", "--attach", "tc", "--iface", veth]);
    let tc = |args: &[&str]| drain.sh("tc", args);
    let filters = || tc(&["filter", "show", "dev", veth, "ingress"]);
    let u32_at = |parent: &str, pref: &str, proto: &str| {
        tc(&[
            "filter", "add", "dev", veth, "parent", parent, "pref", pref, "protocol", proto, "u32",
            "match", "u32", "0", "0", "classid", "1:1",
        ]);
    };
    #[track_caller]
    fn refused(drain: &Drain, out: &CliOutput, words: &[&str]) {
        out.expect_code(1);
        assert_eq!(out.stderr_lines().len(), 1, "one line: {out}");
        for w in words {
            assert!(out.stderr.contains(w), "names {w:?}: {out}");
        }
        assert!(
            !drain.state_dir().exists(),
            "a refused gate on left state: {out}"
        );
    }

    // (a) Their u32 filter at priority 1 of the clsact ingress.
    tc(&["qdisc", "add", "dev", veth, "clsact"]);
    for proto in ["all", "ip"] {
        u32_at("ffff:fff2", "1", proto);
        let before = filters();
        refused(
            &drain,
            &check(),
            &[
                veth,
                "priority 1",
                "u32 filter",
                "another priority",
                "--attach xdp",
            ],
        );
        refused(
            &drain,
            &on_veth(),
            &[
                veth,
                "priority 1",
                "u32 filter",
                "another priority",
                "--attach xdp",
            ],
        );
        assert_eq!(filters(), before, "their filter was touched");
        assert_open(&pair, &pair.b, &gated);
        tc(&["filter", "del", "dev", veth, "ingress", "pref", "1"]);
    }
    // Moved to priority 2, as the line says: drain's goes first, theirs stays after it.
    u32_at("ffff:fff2", "2", "all");
    check().expect_ok();
    on_veth().expect_ok();
    // (priority, kind) of each filter: u32 dumps its hash table and its key apart.
    let slots = || {
        let mut v: Vec<(u16, String)> = clsact_ingress(&pair, &pair.a, veth)
            .into_iter()
            .map(|f| (f.priority, f.kind))
            .collect();
        v.dedup();
        v
    };
    assert_eq!(slots(), [(1, "bpf".into()), (2, "u32".into())]);
    assert_gated(&pair, &pair.b, &gated);
    drain.off();
    assert_eq!(slots(), [(2, "u32".into())], "theirs stays");
    tc(&["qdisc", "del", "dev", veth, "clsact"]);

    // (b) A plain ingress qdisc with a filter of theirs, on the veth alone and beside a
    // gate on lo.
    tc(&["qdisc", "add", "dev", veth, "ingress"]);
    u32_at("ffff:", "5", "all");
    let before = filters();
    let words = [
        veth,
        "plain ingress qdisc",
        "clsact",
        &format!("tc qdisc del dev {veth} ingress"),
        "--attach xdp",
    ];
    refused(&drain, &check(), &words);
    refused(&drain, &on_veth(), &words);
    drain.on(&["--port", &port, "--attach", "tc", "--iface", "lo"]);
    let lo_before = clsact_ingress(&pair, &pair.a, "lo");
    let out = drain.run(&[
        "gate", "on", "--port", &port, "--attach", "tc", "--iface", "lo", "--iface", veth,
    ]);
    out.expect_code(1);
    assert_eq!(out.stderr_lines().len(), 1, "one line: {out}");
    assert!(out.stderr.contains("plain ingress qdisc"), "{out}");
    assert_eq!(clsact_ingress(&pair, &pair.a, "lo"), lo_before);
    let st = drain.status();
    assert_eq!(st["interfaces"].as_array().unwrap().len(), 1, "{st}");
    assert_eq!(
        iface_status(&st, "lo").unwrap()["state"],
        "attached",
        "{st}"
    );
    drain.off();
    assert_eq!(
        ingress_qdisc(&pair, &pair.a, veth).as_deref(),
        Some("ingress")
    );
    assert_eq!(
        filters(),
        before,
        "their ingress qdisc's filter was touched"
    );
    assert_open(&pair, &pair.b, &gated);
    // Replaced by clsact, as the line says: the gate works.
    tc(&["qdisc", "del", "dev", veth, "ingress"]);
    tc(&["qdisc", "add", "dev", veth, "clsact"]);
    check().expect_ok();
    on_veth().expect_ok();
    assert_gated(&pair, &pair.b, &gated);
    drain.off();
    assert_open(&pair, &pair.b, &gated);
}

// ---------------------------------------------------------------------------------------
// 9. Another tool's XDP program
// ---------------------------------------------------------------------------------------

/// Another XDP program holds the veth: `gate on` (xdp) refuses with exit 1, naming it and
/// suggesting --attach tc, and leaves it attached and nothing pinned; `--attach auto` gates
/// via TC beside it, status lists it under "others"; `gate off` leaves it in place.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn foreign_xdp_program_is_left_alone() {
    // auto beside a foreign XDP program attaches at TC: TCX, or clsact without it.
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    let pins = PinDir::new();
    let foreign = ForeignXdp::attach_with_ip(&pair, &pair.a, &pair.veth_a, &pins);
    let theirs = (foreign.id, ForeignXdp::NAME.to_owned());
    assert_eq!(link_xdp(&pair, &pair.a, &pair.veth_a), Some(theirs.clone()));
    let server = EchoServer::start(&pair, &pair.a, sa(pair.a_v4, P));
    let port = P.to_string();

    let xdp = ["--attach", "xdp"];
    let out = drain.run(&[
        "gate",
        "on",
        "--port",
        &port,
        "--iface",
        &pair.veth_a,
        xdp[0],
        xdp[1],
    ]);
    out.expect_code(1);
    assert_eq!(out.stderr_lines().len(), 1, "{out}");
    assert!(
        out.stderr.contains(ForeignXdp::NAME),
        "names the program: {out}"
    );
    assert!(
        out.stderr.contains(&pair.veth_a),
        "names the interface: {out}"
    );
    assert!(out.stderr.contains("--attach tc"), "suggests TC: {out}");
    assert_eq!(link_xdp(&pair, &pair.a, &pair.veth_a), Some(theirs.clone()));
    assert!(!drain.state_dir().exists(), "refused gate on left pins");
    // Default interfaces (lo and the veth): the same refusal, and lo is rolled back too.
    drain
        .run(&["gate", "on", "--port", &port, xdp[0], xdp[1]])
        .expect_code(1);
    assert!(!drain.state_dir().exists(), "refused gate on left pins");
    assert_eq!(
        link_xdp(&pair, &pair.a, "lo"),
        None,
        "lo was not rolled back"
    );

    // A gate that exists (on lo only) survives a call refused on the veth: same ports,
    // same link, and the foreign program untouched.
    drain.on(&["--port", &port, "--iface", "lo", xdp[0], xdp[1]]);
    let lo_pin = drain
        .state_dir()
        .join(format!("link-xdp-{}", drain.ifindex("lo")));
    let lo_link = pinned_link_id(&lo_pin);
    let out = drain.run(&["gate", "on", "--port", &Q.to_string(), xdp[0], xdp[1]]);
    out.expect_code(1);
    assert!(out.stderr.contains(ForeignXdp::NAME), "{out}");
    let st = drain.status();
    assert_eq!(gated_ports(&st), vec![P], "{st}");
    assert_eq!(st["interfaces"].as_array().unwrap().len(), 1, "{st}");
    assert_eq!(pinned_link_id(&lo_pin), lo_link);
    assert_eq!(link_xdp(&pair, &pair.a, &pair.veth_a), Some(theirs.clone()));
    drain.off();
    assert_eq!(link_xdp(&pair, &pair.a, &pair.veth_a), Some(theirs.clone()));

    drain.on(&["--port", &port, "--iface", &pair.veth_a, "--attach", "auto"]);
    assert_eq!(link_xdp(&pair, &pair.a, &pair.veth_a), Some(theirs.clone()));
    let st = drain.status();
    let veth = iface_status(&st, &pair.veth_a).unwrap_or_else(|| panic!("{st}"));
    assert_eq!(veth["attach"].as_str(), Some("tc"), "{st}");
    // The taken hook decides before the device does (a veth would get TC anyway, for
    // another reason): the reason says which rule chose.
    assert_eq!(veth["requested"].as_str(), Some("auto"), "{st}");
    assert_eq!(
        veth["reason"].as_str(),
        Some(TAKEN),
        "auto beside another XDP program: {st}"
    );
    let others = veth["others"].as_array().unwrap();
    assert!(
        others.iter().any(|o| {
            let o = o.as_str().unwrap();
            o.contains(ForeignXdp::NAME) && o.contains(&theirs.0.to_string())
        }),
        "others should list {} (id {}): {st}",
        ForeignXdp::NAME,
        theirs.0
    );
    let chain = tc_ingress(&pair, &pair.a, &pair.veth_a);
    assert_eq!(chain.len(), 1, "{chain:?}");
    assert_eq!(chain[0].1, drain_common::prog::TC, "{chain:?}");
    // Behind the foreign XDP_PASS, TC still drops the SYN.
    assert_gated(&pair, &pair.b, &[server.addr]);

    // The default (auto) over every interface, afresh: lo, free, gets TC as a virtual
    // device; the veth gets TC beside the foreign program.
    drain.off();
    drain.on(&["--port", &port]);
    let st = drain.status();
    let lo = iface_status(&st, "lo").unwrap();
    assert_eq!(lo["attach"].as_str(), Some("tc"), "{st}");
    assert!(
        lo["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("virtual device (loopback)")),
        "{st}"
    );
    let veth = iface_status(&st, &pair.veth_a).unwrap();
    assert_eq!(veth["attach"].as_str(), Some("tc"), "{st}");
    assert_eq!(veth["reason"].as_str(), Some(TAKEN), "{st}");
    assert_eq!(link_xdp(&pair, &pair.a, &pair.veth_a), Some(theirs.clone()));
    assert_gated(&pair, &pair.b, &[server.addr]);

    drain.off();
    assert_eq!(
        link_xdp(&pair, &pair.a, &pair.veth_a),
        Some(theirs),
        "gate off must not touch the other program"
    );
    assert!(!drain.state_dir().exists());
    assert_open(&pair, &pair.b, &[server.addr]);
}

// ---------------------------------------------------------------------------------------
// 10. Re-running gate on
// ---------------------------------------------------------------------------------------

/// `gate on --port P` then `gate on --port Q` gates Q and opens P again; `gate on --port Q`
/// twice more changes nothing: still one link per interface (pins, kernel, status).
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn rerunning_gate_on_replaces_the_ports_and_is_idempotent() {
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    let (p, q) = (sa(pair.a_v4, P), sa(pair.a_v4, Q));
    let _servers = [
        EchoServer::start(&pair, &pair.a, p),
        EchoServer::start(&pair, &pair.a, q),
    ];

    drain.on(&["--port", &P.to_string(), "--attach", "xdp"]);
    let links = drain.link_pins();
    let ids: Vec<u32> = links
        .iter()
        .map(|l| pinned_link_id(&drain.state_dir().join(l)))
        .collect();
    let xdp = link_xdp(&pair, &pair.a, &pair.veth_a).expect("xdp on the veth");
    std::thread::scope(|s| {
        let t = s.spawn(|| assert_gated(&pair, &pair.b, &[p]));
        assert_open(&pair, &pair.b, &[q]);
        t.join().unwrap();
    });

    for _ in 0..3 {
        drain.on(&["--port", &Q.to_string()]);
        assert_eq!(drain.link_pins(), links, "one link per interface");
        let now: Vec<u32> = links
            .iter()
            .map(|l| pinned_link_id(&drain.state_dir().join(l)))
            .collect();
        assert_eq!(now, ids, "links were replaced, not kept");
        assert_eq!(link_xdp(&pair, &pair.a, &pair.veth_a), Some(xdp.clone()));
        let st = drain.status();
        assert_eq!(gated_ports(&st), vec![Q], "{st}");
        assert_eq!(st["interfaces"].as_array().unwrap().len(), 2, "{st}");
    }
    if let Some(net) = bpftool(&pair, &pair.a, &["net", "show"]) {
        assert_eq!(
            xdp_lines(&net).len(),
            2,
            "one XDP program per interface: {net}"
        );
    }
    for dev in ["lo", pair.veth_a.as_str()] {
        assert!(
            tcx_ingress(&pair, &pair.a, dev).is_empty(),
            "xdp only on {dev}"
        );
    }
    std::thread::scope(|s| {
        let t = s.spawn(|| assert_gated(&pair, &pair.b, &[q]));
        assert_open(&pair, &pair.b, &[p]);
        t.join().unwrap();
    });
}

// ---------------------------------------------------------------------------------------
// 11. Concurrent gate on
// ---------------------------------------------------------------------------------------

/// Two `gate on` processes started together in one namespace, with different ports: both
/// exit 0 and the result is one of the two, whole: one link per interface, the port set
/// of one call, and traffic that agrees. Repeated a few times (from no gate, and over one).
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn concurrent_gate_on_calls_end_consistent() {
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    let sets = [format!("{P}"), format!("{Q},{}", Q + 1)];
    let want = [vec![P], vec![Q, Q + 1]];
    let pins = || xdp_link_pins(&drain, &pair.veth_a);
    for round in 0..4 {
        if round % 2 == 0 {
            drain.off();
        }
        let running: Vec<_> = sets
            .iter()
            .map(|s| drain.spawn(&["gate", "on", "--port", s, "--attach", "xdp"]))
            .collect();
        for r in running {
            r.wait().expect_ok();
        }
        assert_eq!(drain.link_pins(), pins(), "round {round}");
        let st = drain.status();
        let got = gated_ports(&st);
        assert!(want.contains(&got), "round {round}: ports {got:?}: {st}");
        assert_eq!(gate_state(&st), "on", "{st}");
        assert_eq!(st["interfaces"].as_array().unwrap().len(), 2, "{st}");
    }
    let st = drain.status();
    let got = gated_ports(&st);
    let addrs =
        |ports: &[u16]| -> Vec<SocketAddr> { ports.iter().map(|&p| sa(pair.a_v4, p)).collect() };
    let other: Vec<u16> = want.iter().find(|w| **w != got).unwrap().clone();
    let _servers: Vec<EchoServer> = addrs(&[P, Q, Q + 1])
        .into_iter()
        .map(|a| EchoServer::start(&pair, &pair.a, a))
        .collect();
    std::thread::scope(|s| {
        let t = s.spawn(|| assert_gated(&pair, &pair.b, &addrs(&got)));
        assert_open(&pair, &pair.b, &addrs(&other));
        t.join().unwrap();
    });
}

// ---------------------------------------------------------------------------------------
// 12. A deleted namespace's state
// ---------------------------------------------------------------------------------------

/// A namespace deleted with its gate still on (a container removed mid-deploy) leaves its
/// pins behind; the next `gate on` in any namespace reaps them (once the kernel has
/// detached its links), and leaves the gates of live namespaces alone. The same for gates
/// made through the clsact qdisc (`--attach tc` without TCX), which have no link to ask:
/// reaped once the kernel no longer has their program, kept while their namespace lives.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn state_of_a_deleted_namespace_is_reaped_by_the_next_gate_on() {
    let (p1, p2, p3, p4) = (
        NetNsPair::new(),
        NetNsPair::new(),
        NetNsPair::new(),
        NetNsPair::new(),
    );
    let (d1, d2, d3, d4) = (
        Drain::new(&p1, &p1.a),
        Drain::new(&p2, &p2.a),
        Drain::classic(&p3, &p3.a),
        Drain::classic(&p4, &p4.a),
    );
    d1.on(&["--port", &P.to_string(), "--attach", "xdp"]);
    d3.on(&["--port", &P.to_string(), "--attach", "tc"]);
    d4.on(&["--port", &P.to_string(), "--attach", "tc"]);
    let dead_dir = d1.state_dir();
    let dead_classic = d4.state_dir();
    assert!(dead_dir.exists());
    let classic_progs: Vec<u32> = drain_user::clsact::records(&dead_classic)
        .expect("the clsact records")
        .iter()
        .map(|r| r.prog_id)
        .collect();
    assert_eq!(classic_progs.len(), 2, "lo and the veth");

    for ns in [&p1.a, &p4.a] {
        let out = std::process::Command::new("ip")
            .args(["netns", "del", ns])
            .output()
            .expect("run ip netns del");
        assert!(out.status.success(), "ip netns del: {out:?}");
    }
    assert!(dead_dir.exists(), "pins vanished before any drain call");
    assert!(dead_classic.exists(), "pins vanished before any drain call");
    // The reaper acts on the kernel's word that the namespace's links are detached, which
    // comes once its (asynchronous) teardown has unregistered the devices.
    // (Tests running in parallel call `gate on` too: one of them may reap it first.)
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(&dead_dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("link-xdp-")
                && drain_user::sys::link_info(&e.path()).is_ok_and(|i| i.ifindex != 0)
        })
    {
        assert!(
            Instant::now() < deadline,
            "the namespace's links stayed attached"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The clsact gate's filters go with the namespace's devices, and its program with them.
    while classic_progs
        .iter()
        .any(|&id| drain_user::sys::prog_name(id).is_some())
    {
        assert!(
            Instant::now() < deadline,
            "the deleted namespace's clsact program stayed loaded"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    d2.on(&["--port", &P.to_string()]);
    for dir in [&dead_dir, &dead_classic] {
        assert!(
            !dir.exists(),
            "the deleted namespace's pins were not reaped: {}",
            dir.display()
        );
    }
    assert!(
        d3.state_dir().exists(),
        "a live namespace's gate was reaped"
    );
    let st = d3.status();
    assert_eq!(gate_state(&st), "on", "{st}");
    assert_eq!(
        iface_status(&st, "lo").unwrap()["tc_mode"].as_str(),
        Some("clsact"),
        "{st}"
    );
    assert_eq!(gate_state(&d2.status()), "on");
}

/// Namespaces made with `ip netns add`, deleted when dropped (even on a panic).
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .output();
        }
    }
}

/// Runs drain-user in the namespace /var/run/netns/`ns` as on a kernel without namespace
/// cookies (nsenter keeps this mount namespace's bpffs, which `ip netns exec` would remount
/// away).
fn drain_in(ns: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{ns}"))
        .arg(drain_tests::drain_user_bin())
        .args(args)
        .env(drain_user::netns::NO_COOKIE_ENV, "1")
        .output()
        .expect("run drain-user under nsenter")
}

fn ns_inode(ns: &str) -> u64 {
    std::os::unix::fs::MetadataExt::ino(
        &std::fs::metadata(format!("/var/run/netns/{ns}")).expect("the namespace's handle"),
    )
}

fn ip_netns(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .arg("netns")
        .args(args)
        .output()
        .expect("run ip netns");
    assert!(out.status.success(), "ip netns {args:?}: {out:?}");
}

/// The kernel hands a dead namespace's inode to a later namespace. Before Linux 5.14 there
/// is no namespace cookie, so the newcomer's state directory has the dead one's name
/// (`<inode>-0`): the kernel's word that the dead gate's sk_lookup link lost its namespace
/// must keep the newcomer from taking that gate for its own (`status` says off, `gate on`
/// reaps the dead state and starts afresh). Inode reuse cannot be forced, so the test gives
/// the dead gate's directory the newcomer's name, which is what such a kernel shows it, and
/// runs drain as on a kernel without cookies (on 5.10 it is one).
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn a_namespace_given_a_dead_ones_inode_has_no_gate() {
    let id = std::process::id();
    let (old, new) = (format!("drain-dead-{id}"), format!("drain-heir-{id}"));
    let _made = Namespaces(vec![old.clone(), new.clone()]);
    ip_netns(&["add", &old]);
    ip_netns(&["add", &new]);
    let root = std::path::Path::new(drain_tests::netns::STATE_ROOT);
    let out = drain_in(
        &old,
        &["gate", "on", "--port", &P.to_string(), "--iface", "lo"],
    );
    assert!(out.status.success(), "gate on: {out:?}");
    let dead_dir = root.join(format!("{}-0", ns_inode(&old)));
    assert!(dead_dir.exists(), "{} missing", dead_dir.display());
    let heir_dir = root.join(format!("{}-0", ns_inode(&new)));
    // drain's lock, held from the deletion to the rename: a `gate on` of a test running
    // beside this one reaps dead state (under the lock), and would take the dead gate
    // before it has the heir's name.
    let lock = drain_user::pins::lock().expect("drain's lock");
    ip_netns(&["del", &old]);
    let lookup = dead_dir.join("link-sklookup");
    let deadline = Instant::now() + Duration::from_secs(20);
    while drain_user::sys::link_info(&lookup).is_ok_and(|i| i.netns_ino != 0) {
        assert!(Instant::now() < deadline, "the namespace did not go away");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::rename(&dead_dir, &heir_dir).expect("renaming the dead gate's directory");
    drop(lock);
    let out = drain_in(&new, &["status", "--json"]);
    let st: Json = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json: {e}: {out:?}"));
    assert_eq!(
        gate_state(&st),
        "off",
        "the newcomer took the dead gate: {st}"
    );
    // A connection that predates the newcomer's gate is counted, and its close too: a gate
    // that kept the dead one's tracker would count in the dead namespace and miss it.
    let (listener, client, server) = drain_tests::netns::in_netns(&new, || {
        let _ = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .output();
        let l = std::net::TcpListener::bind(("127.0.0.1", P)).expect("listen");
        let c = std::net::TcpStream::connect(("127.0.0.1", P)).expect("connect");
        let (s, _) = l.accept().expect("accept");
        (l, c, s)
    });
    let out = drain_in(
        &new,
        &["gate", "on", "--port", &P.to_string(), "--iface", "lo"],
    );
    assert!(out.status.success(), "gate on: {out:?}");
    let linked = drain_user::sys::link_info(&heir_dir.join("link-sklookup")).expect("new link");
    assert_eq!(u64::from(linked.netns_ino), ns_inode(&new));
    let live = || {
        let out = drain_in(&new, &["status", "--json"]);
        let st: Json = serde_json::from_slice(&out.stdout).expect("status --json");
        assert_eq!(gate_state(&st), "on", "{st}");
        port_status(&st, P).expect("the gated port")["live_connections"].clone()
    };
    assert_eq!(live(), 1);
    drop((client, server, listener));
    let deadline = Instant::now() + Duration::from_secs(5);
    while live() != 0 {
        assert!(
            Instant::now() < deadline,
            "the close was not counted: the newcomer's gate counts elsewhere"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = drain_in(&new, &["gate", "off"]);
    assert!(out.status.success(), "gate off: {out:?}");
    assert!(!heir_dir.exists(), "gate off left {}", heir_dir.display());
}

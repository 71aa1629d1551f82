//! The connection tracker and `drain-user wait`, end to end: real connections from namespace
//! `b` to servers in namespace `a`, counts read through `drain-user status --json` and
//! compared with `ss` (and with the number the test knows it holds open), `wait` run as
//! users run it.
//!
//! The gate must be on for a port to appear in `status`, and an on gate refuses new
//! connections: every gate here allowlists namespace `b`'s addresses (`--allow`), so the
//! test's traffic flows through a gated port while the counts are watched.
//!
//! Besides the CLI, some tests read the tracker's pinned maps directly: the live counter, to
//! sample it hundreds of times during churn, and the tracker's own counters, to check that
//! no event was lost and that every passive open was added (and removed) exactly once.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use aya::maps::{Array, Map, MapData, PerCpuArray};
use drain_common::{map, TrackStats};
use drain_tests::{
    cli::{port_status, slowdown, Drain, Json, JsonExt},
    netns::{in_netns, nsenter, NetNsPair},
    object::sum_track_stats,
    require_root,
    traffic::{
        churn, connect_reuseaddr, listen, open_held, set_linger_zero, ss_lines, ss_live, Churned,
        Close, Op, Server, Stack,
    },
};

/// Server threads per listener and client threads per churn: a few each, the machine has
/// two cores that the tracker, the gate, the server and the clients share.
const WORKERS: usize = 4;
const CLIENTS: usize = 4;
/// Churned connections per phase of the churn test (four phases).
const CHURN_PER_PHASE: u64 = 4000;

const SETTLE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// The gate, its counts and its maps.

/// `gate on --port <ports> --iface <veth_a> --allow <b's addresses>` in `pair.a`; the gate
/// goes off when the returned runner is dropped (declare it after the pair).
fn gate_on<'p>(pair: &'p NetNsPair, ports: &[u16]) -> Drain<'p> {
    let gate = Drain::new(pair, &pair.a);
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    let allow = format!("{}/32,{}/128", pair.b_v4, pair.b_v6);
    gate.on(&[
        "--port",
        &ports.join(","),
        "--iface",
        &pair.veth_a,
        "--allow",
        &allow,
    ]);
    gate
}

/// `ports[port == P].live_connections` from `status --json`.
fn status_live(gate: &Drain, port: u16) -> i64 {
    let st = gate.status();
    port_status(&st, port).unwrap_or_else(|| panic!("port {port} not in status: {st}"))
        ["live_connections"]
        .i64()
}

/// The gate's live counters (DRAIN_LIVE), read directly from the pin.
fn live_map(gate: &Drain) -> Array<MapData, i64> {
    Array::try_from(Map::Array(gate.map(map::LIVE))).expect("DRAIN_LIVE is an array of i64")
}

/// The tracker's own counters (DRAIN_TSTATS), read directly from the pin and summed.
fn track_stats(gate: &Drain) -> TrackStats {
    let m: PerCpuArray<MapData, TrackStats> =
        PerCpuArray::try_from(Map::PerCpuArray(gate.map(map::TSTATS))).expect("DRAIN_TSTATS");
    sum_track_stats(&m.get(&0, 0).expect("reading DRAIN_TSTATS"))
}

/// Samples one port's live counter as fast as it can while churn runs.
struct Monitor {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<Sampled>,
}

struct Sampled {
    min: i64,
    max: i64,
    samples: u64,
    /// `ss -tanoi` of the port, taken the first time the count left [low, high].
    snapshot: Option<(i64, String)>,
}

impl Monitor {
    /// Watches `port` of the gate; when a sample falls outside `low..=high`, takes
    /// one `ss` snapshot right away, so a failure can show what was live.
    fn start(gate: &Drain, port: u16, low: i64, high: i64) -> Self {
        let live = live_map(gate);
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let ns = gate.ns.clone();
        let handle = thread::spawn(move || {
            let mut r = Sampled {
                min: i64::MAX,
                max: i64::MIN,
                samples: 0,
                snapshot: None,
            };
            while !s.load(Ordering::Relaxed) {
                let v = live.get(&u32::from(port), 0).expect("reading DRAIN_LIVE");
                r.min = r.min.min(v);
                r.max = r.max.max(v);
                r.samples += 1;
                if r.snapshot.is_none() && !(low..=high).contains(&v) {
                    let out = nsenter(&ns, "ss")
                        .args(["-tanoi", "state", "connected"])
                        .arg(format!("( sport = :{port} )"))
                        .output()
                        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                        .unwrap_or_else(|e| e.to_string());
                    r.snapshot = Some((v, out));
                }
                thread::sleep(Duration::from_micros(500));
            }
            r
        });
        Monitor { stop, handle }
    }

    fn finish(self) -> Sampled {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("monitor thread")
    }
}

/// Waits (up to [`SETTLE`]) until `ss` in `ns` shows `cw` CLOSE_WAIT sockets on `port`:
/// a client's FIN may still be on its way.
fn wait_close_wait(ns: &str, port: u16, cw: usize) {
    let t0 = Instant::now();
    loop {
        let n = ss_lines(ns, "close-wait", port).len();
        if n == cw {
            return;
        }
        assert!(
            t0.elapsed() < SETTLE,
            "{n} CLOSE_WAIT sockets on :{port} in {ns}, expected {cw}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// A quiescent point: `ss` (ESTABLISHED + CLOSE_WAIT on `port` in the gate's namespace),
/// `status --json` and the number the test knows are live must all agree. ss is polled a
/// little first: the last FINs/RSTs of a closing may still be in flight on the veth.
fn quiescent(gate: &Drain, port: u16, expect: usize, what: &str) {
    quiescent_counting(gate, port, expect, what, None);
}

/// [`quiescent`], where the listener makes SYN-cookie phantoms (connections no client holds,
/// see [`phantoms`]) when `clients` names the clients' namespace: those are live too, in
/// the kernel and so in the tracker, and ss must show exactly `expect` besides them. Returns
/// the phantoms' peers.
fn quiescent_counting(
    gate: &Drain,
    port: u16,
    expect: usize,
    what: &str,
    clients: Option<&str>,
) -> Vec<String> {
    let ns = gate.ns.as_str();
    let sample = || {
        let (e, c) = ss_live(ns, port);
        let p = clients.map_or_else(Vec::new, |b| phantoms(ns, b, port));
        (e, c, p)
    };
    // Scaled: under emulation one `status` call alone can take seconds.
    let settle = SETTLE * slowdown();
    let t0 = Instant::now();
    let (est, cw, ph, live, stable) = loop {
        let (e, c, p) = sample();
        let settled = e + c == expect + p.len();
        if !settled && t0.elapsed() <= settle {
            thread::sleep(Duration::from_millis(10));
            continue;
        }
        let live = status_live(gate, port);
        // A phantom ends on its own (the server gives up waiting for its op, 20 s after it
        // was accepted), and may do so between the ss sample and the status read: the
        // count is compared only with an ss that reads the same before and after status.
        let stable = !settled || sample() == (e, c, p.clone());
        if !stable && t0.elapsed() <= settle {
            continue;
        }
        break (e, c, p, live, stable);
    };
    let phantoms = if ph.is_empty() {
        String::new()
    } else {
        format!(" + {} SYN-cookie phantom(s) {ph:?}", ph.len())
    };
    eprintln!(
        "  :{port} {what}: status {live}, ss {est} established + {cw} close-wait, known \
         {expect}{phantoms}"
    );
    assert!(live >= 0, ":{port} {what}: negative live count {live}");
    assert_eq!(
        est + cw,
        expect + ph.len(),
        ":{port} {what}: ss shows {est} established + {cw} close-wait, the test holds \
         {expect}{phantoms} (status says {live}); ss -tani:\n{}",
        gate.sh("ss", &["-tani"])
    );
    assert!(
        stable || live == (est + cw) as i64,
        ":{port} {what}: ss never read the same before and after a status read in {settle:?} \
         (status said {live}, ss {est} established + {cw} close-wait{phantoms}): the count \
         cannot be judged against a moving ss"
    );
    if live != (est + cw) as i64 {
        // What the counts are made of, to tell a missed close from a late one: the tracker's
        // entries for this port, each with the state ss gives its socket now, and the count
        // read again a little later.
        let entries = tracked(gate, port);
        // ss prints a peer as a.b.c.d:port, [v6]:port or [::ffff:a.b.c.d]:port.
        let same_peer = |peer: &str, addr: &str, rport: u16| {
            peer.ends_with(&format!(":{rport}")) && peer.contains(addr)
        };
        let all = gate.sh(
            "ss",
            &["-tanH", "state", "all", &format!("sport = :{port}")],
        );
        let mut lines = Vec::new();
        for (addr, rport) in &entries {
            let st = all
                .lines()
                .find(|l| {
                    l.split_whitespace()
                        .nth(4)
                        .is_some_and(|p| same_peer(p, addr, *rport))
                })
                .map_or("not in ss", |l| l.split_whitespace().next().unwrap_or("?"));
            if st != "ESTAB" && st != "CLOSE-WAIT" {
                lines.push(format!("    tracked {addr} port {rport}: {st}"));
            }
        }
        // The other way: live sockets in ss that the set lacks (an open the tracker never
        // counted, or one whose insert met an entry already there).
        for l in all.lines() {
            let mut f = l.split_whitespace();
            let (Some(st), Some(peer)) = (f.next(), f.nth(3)) else {
                continue;
            };
            if st != "ESTAB" && st != "CLOSE-WAIT" {
                continue;
            }
            let known = entries
                .iter()
                .any(|(addr, rport)| same_peer(peer, addr, *rport));
            if !known {
                lines.push(format!("    in ss, not tracked: {st} {peer}"));
            }
        }
        thread::sleep(Duration::from_secs(2));
        let st = gate.status();
        eprintln!(
            "  :{port} {what}: status {live} vs ss {} (ss held still around the status \
             read: {stable}); {} tracked entries; those not \
             ESTABLISHED or CLOSE-WAIT in ss, and live ones in ss not tracked:\n{}\n  status \
             2 s later: {}, exact: {}, warnings: {}, tracker: {}",
            est + cw,
            entries.len(),
            lines.join("\n"),
            status_live(gate, port),
            port_status(&st, port).map_or(Json::Null, |p| p["live_connections_exact"].clone()),
            st["warnings"],
            st["tracker"]
        );
    }
    assert_eq!(
        live,
        (est + cw) as i64,
        ":{port} {what}: status says {live} live, ss {est} established + {cw} close-wait \
         (the test holds {expect}{phantoms})"
    );
    ph
}

/// The tracker's entries (DRAIN_CONNS) for local `port`: (peer address, IPv4 for a mapped
/// one, peer port).
fn tracked(gate: &Drain, port: u16) -> Vec<(String, u16)> {
    let m: aya::maps::HashMap<MapData, drain_common::ConnKey, u32> =
        aya::maps::HashMap::try_from(Map::HashMap(gate.map(map::SOCKS)))
            .expect("DRAIN_CONNS is a hash map of ConnKey");
    m.iter()
        .filter_map(Result::ok)
        .filter(|(k, _)| k.lport == port)
        .map(|(k, _)| {
            let ip = std::net::Ipv6Addr::from(k.raddr);
            let addr = ip
                .to_ipv4_mapped()
                .map_or(ip.to_string(), |v4| v4.to_string());
            (addr, k.rport)
        })
        .collect()
}

/// The SYN-cookie phantoms on `port` in namespace `a`: ESTABLISHED sockets the listener
/// made from a stray ACK that passed the cookie check, which no client holds. Each is
/// told by the kernel's own view of both ends: the server end has received no byte (every
/// client of this test sends its op first), and the client end with the mirrored
/// addresses in namespace `b` is in TIME-WAIT or gone. Returned as "server end <- peer
/// (client end: STATE)".
fn phantoms(a: &str, b: &str, port: u16) -> Vec<String> {
    let norm = |s: &str| -> SocketAddr {
        let sa: SocketAddr = s
            .parse()
            .unwrap_or_else(|e| panic!("ss address {s:?}: {e}"));
        match sa {
            SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(v4.into(), v6.port()),
                None => sa,
            },
            SocketAddr::V4(_) => sa,
        }
    };
    let ss = |ns: &str, args: &[&str]| {
        let out = nsenter(ns, "ss").args(args).output().expect("running ss");
        assert!(out.status.success(), "ss in {ns}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Client ends: "STATE Recv-Q Send-Q LOCAL PEER".
    let clients: Vec<(SocketAddr, SocketAddr, String)> =
        ss(b, &["-Htan", &format!("( dport = :{port} )")])
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 5).then(|| (norm(f[3]), norm(f[4]), f[0].to_owned()))
            })
            .collect();
    // Server ends with their info line: "Recv-Q Send-Q LOCAL PEER", then "\t cubic ...".
    let server = ss(
        a,
        &[
            "-Htni",
            "state",
            "established",
            &format!("( sport = :{port} )"),
        ],
    );
    let mut out = Vec::new();
    let mut lines = server.lines().peekable();
    while let Some(l) = lines.next() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 4 {
            continue;
        }
        let info = match lines.peek() {
            Some(i) if i.starts_with(char::is_whitespace) => lines.next().unwrap_or_default(),
            _ => "",
        };
        let (local, peer) = (norm(f[2]), norm(f[3]));
        let client = clients
            .iter()
            .find(|(l, p, _)| *l == peer && *p == local)
            .map(|(_, _, st)| st.as_str());
        let received = info
            .split_whitespace()
            .find_map(|w| w.strip_prefix("bytes_received:"))
            .map_or(0, |v| v.parse::<u64>().unwrap_or(u64::MAX));
        if received == 0 && matches!(client, None | Some("TIME-WAIT")) {
            out.push(format!(
                "{local} <- {peer} (client end: {})",
                client.unwrap_or("gone")
            ));
        }
    }
    out
}

/// State changes the kernel skipped the gate's tracker for (its program's
/// recursion_misses, read as `status` reads them).
fn skipped(gate: &Drain) -> u64 {
    drain_user::links::tracing_misses(&drain_user::pins::LinkPin::Track.path(&gate.state_dir()))
}

fn assert_no_lost_events(gate: &Drain) -> TrackStats {
    let st = track_stats(gate);
    assert_eq!(
        (st.insert_failed, st.read_failed),
        (0, 0),
        "the tracker lost events: {st:?}"
    );
    st
}

/// `sysctl -w setting` inside namespace `ns` (net.* settings are per namespace, and the
/// namespace goes away with the test: nothing to restore).
fn sysctl(pair: &NetNsPair, ns: &str, setting: &str) {
    pair.sh(ns, "sysctl", &["-w", setting]);
}

/// A counter of namespace `ns`: `group` is "Tcp" (/proc/net/snmp) or "TcpExt"
/// (/proc/net/netstat). Read for the SYN-cookie phase: SyncookiesRecv (connections made from
/// a cookie), Tcp PassiveOpens (every child socket, cookie or not), RetransSegs (what makes
/// the stray ACKs, printed beside the phantoms).
fn tcp_mib(pair: &NetNsPair, ns: &str, group: &str, name: &str) -> u64 {
    let file = if group == "Tcp" {
        "/proc/net/snmp"
    } else {
        "/proc/net/netstat"
    };
    let t = pair.sh(ns, "cat", &[file]);
    let prefix = format!("{group}:");
    let rows: Vec<&str> = t.lines().filter(|l| l.starts_with(&prefix)).collect();
    assert_eq!(rows.len(), 2, "{group} header and values in {file}: {t}");
    rows[0]
        .split_whitespace()
        .zip(rows[1].split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("{group} {name} in {file}"))
}

/// The phantoms of the cookie phase made so far: those still live (by ss, see
/// [`phantoms`]) and those the server has given up on. 0 outside that phase.
fn quiescent_phantoms(server: &Server, clients: Option<&str>, gate: &Drain, port: u16) -> usize {
    clients.map_or(0, |b| {
        phantoms(&gate.ns, b, port).len() + server.unserved().len()
    })
}

fn phantoms_now(a: &str, b: &str, port: u16) -> (usize, usize, Vec<String>) {
    let (e, c) = ss_live(a, port);
    (e, c, phantoms(a, b, port))
}

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

// ---------------------------------------------------------------------------------------
// 1. Counts equal ss through churn.

/// Three phases, one gated port each: an IPv4 listener, an IPv6-only listener and a
/// dual-stack [::] listener (IPV6_V6ONLY=0) reached over IPv4 (mapped) and IPv6. In each:
/// hold 50 ESTABLISHED and 20 CLOSE_WAIT connections, churn thousands of short connections
/// that end in all four ways (server FIN, server RST, client FIN, client RST) while a
/// sampler reads the live counter, then close the held ones in steps (client FIN: still
/// live as CLOSE_WAIT; server FIN; server RST). At every quiescent point status == ss ==
/// the known number; during churn the count stays within [held, held + in flight]; at the
/// end every port reads 0 and the tracker added exactly one entry per passive open and
/// removed as many, with no lost event. A fourth phase repeats the dual-stack one with
/// `net.ipv4.tcp_syncookies=2` in the server's namespace, so every child socket is made
/// from a SYN cookie (cookie_v4_check/cookie_v6_check) rather than a request sock. There a
/// stray ACK (a retransmitted FIN's second ACK, seen under emulation) can make the listener
/// create a connection no client holds: such phantoms are told apart by both ends' state
/// ([`phantoms`]), are live in ss and must be in status, and are added and removed by the
/// tracker like every other passive open (counted by the server as connections that never
/// sent an op, and matched by the kernel's SyncookiesRecv).
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn live_counts_equal_ss_through_churn_v4_v6_dual_stack() {
    require_root();
    let pair = NetNsPair::new();
    let (a, b) = (pair.a.as_str(), pair.b.as_str());
    let phases = [
        (Stack::V4, 8001u16, vec![sa(pair.a_v4, 8001)], false),
        (Stack::V6, 8002, vec![sa(pair.a_v6, 8002)], false),
        (
            Stack::Dual,
            8003,
            vec![sa(pair.a_v4, 8003), sa(pair.a_v6, 8003)],
            false,
        ),
        (
            Stack::Dual,
            8004,
            vec![sa(pair.a_v4, 8004), sa(pair.a_v6, 8004)],
            true,
        ),
    ];
    let servers: Vec<Server> = phases
        .iter()
        .map(|(stack, port, _, _)| Server::start(listen(a, *stack, *port), WORKERS))
        .collect();
    let ports: Vec<u16> = phases.iter().map(|p| p.1).collect();
    let gate = gate_on(&pair, &ports);
    let t_all = Instant::now();
    let mut passive_opens = 0u64;
    let mut churned = 0u64;
    for ((stack, port, targets, cookies), server) in phases.iter().zip(&servers) {
        let port = *port;
        eprintln!("phase {stack:?} on :{port}, syncookies always: {cookies}");
        // With SYN cookies, a stray ACK that reaches the listener after its connection's
        // socket is gone can pass the cookie check (the check is invariant to shifting seq
        // and ack by the same amount: cookie_v4_check/__cookie_v4_check, both ends having
        // sent one byte and a FIN) and become a new, phantom ESTABLISHED child that no
        // client holds. A server RST after one byte each way produces exactly such an ACK
        // (the client ACKs "k" as the RST crosses it), so that phase leaves server resets
        // out of the churn. Another comes from a retransmission: when the server, closing
        // second (LAST_ACK), retransmits its FIN before the client's ACK arrives (on a slow
        // machine, or under emulation, where the ACK can take longer than the 200 ms RTO),
        // the client's TIME-WAIT answers the copy with a second ACK, which finds the server
        // socket gone and the listener there. Those cannot be ruled out, so this phase
        // counts them: the kernel holds them, ss shows them and the tracker must count
        // them; the test tells each from a connection it made ([`phantoms`]), and the
        // server counts the connections that never sent an op.
        let clients = cookies.then_some(b);
        let endings: &[Op] = if *cookies {
            sysctl(&pair, a, "net.ipv4.tcp_syncookies=2");
            server.expect_unserved();
            &[Op::ServerClose, Op::ClientClose, Op::ClientReset]
        } else {
            &Op::ENDINGS
        };
        let q = |expect: usize, what: &str| {
            quiescent_counting(&gate, port, expect, what, clients).len()
        };
        let mib = |group: &str, name: &str| tcp_mib(&pair, a, group, name);
        let cookies_before = mib("TcpExt", "SyncookiesRecv");
        let passive_before = mib("Tcp", "PassiveOpens");
        let retrans_before = mib("Tcp", "RetransSegs");
        q(0, "before any connection");

        // 50 held ESTABLISHED, spread over the targets.
        let mut est: Vec<TcpStream> = Vec::new();
        for (i, t) in targets.iter().enumerate() {
            est.extend(open_held(
                b,
                *t,
                50 / targets.len() + usize::from(i == 0) * (50 % targets.len()),
            ));
        }
        assert_eq!(est.len(), 50);
        // 20 held whose client closes first: CLOSE_WAIT on the server, still live.
        for t in targets {
            drop(open_held(b, *t, 20 / targets.len()));
        }
        server.wait_held(70, SETTLE);
        wait_close_wait(a, port, 20);
        q(70, "50 established + 20 close-wait held");

        // Two churn batches, 30 more held in between: quiescent points at 70 and 100.
        let mut c = Churned::default();
        let mut extra = Vec::new();
        for (batch, held) in [(1, 70usize), (2, 100)] {
            // By the protocol at most held + WORKERS (one being served per server thread) +
            // CLIENTS (one waiting in the accept queue per client thread) can be live. Under
            // full-suite load a sample of exactly one more was seen a few times (about 1 run
            // in 20, always early in a batch, with an exact count at every quiescent point
            // around it) and is not explained yet; the check allows CLIENTS more, which still
            // catches a double count that grows with churn.
            let tight = (held + WORKERS + CLIENTS) as i64;
            let bound = tight + CLIENTS as i64;
            let skipped_before = skipped(&gate);
            let mon = Monitor::start(&gate, port, held as i64, tight);
            let this = churn(b, targets, endings, CHURN_PER_PHASE / 2, CLIENTS);
            c.add(&this);
            server.wait_finished(c.connections, SETTLE);
            let m = mon.finish();
            // The raw counter is sampled, not `status`: each state change the kernel
            // skipped the tracker for can leave it one off until a recheck (the
            // quiescent point's `status` runs one).
            let off = (skipped(&gate) - skipped_before) as i64;
            eprintln!(
                "  batch {batch}: churned {} connections ({:?}) in {:.2?} ({:.0}/s); live \
                 sampled {}x meanwhile: min {} max {}; the kernel skipped the tracker {off} \
                 times",
                this.connections,
                this.by_ending,
                this.elapsed,
                this.connections as f64 / this.elapsed.as_secs_f64(),
                m.samples,
                m.min,
                m.max
            );
            let bound = bound + off;
            let held_low = held as i64 - off;
            let snapshot = m.snapshot.map_or(String::new(), |(v, ss)| {
                format!("; ss when it read {v}:\n{ss}")
            });
            assert!(
                m.min >= held_low,
                ":{port}: the live count dipped to {} during churn while {held} were held{snapshot}",
                m.min
            );
            // Phantoms made so far are live until the server gives up on them: each may
            // add one to the count.
            let phantoms = quiescent_phantoms(server, clients, &gate, port);
            let bound = bound + phantoms as i64;
            assert!(
                m.max <= bound,
                ":{port}: the live count reached {} during churn; at most {tight} can be live \
                 ({held} held + {WORKERS} being served + {CLIENTS} queued), {bound} allowed\
                 {snapshot}",
                m.max
            );
            if m.max > tight {
                eprintln!(
                    "  NOTE :{port}: live count reached {} > {tight} during churn",
                    m.max
                );
            }
            q(held, &format!("after churn batch {batch}"));
            if batch == 1 {
                extra = open_held(b, targets[targets.len() - 1], 30);
                server.wait_held(100, SETTLE);
                q(100, "30 more held");
            }
        }
        // Back to 70: the server resets the 30 newest.
        server.close_newest(30, Close::Rst);
        drop(extra);
        q(70, "the 30 newest reset by the server");

        // The client closes 10 held ones: ESTABLISHED -> CLOSE_WAIT, no change in the count.
        est.drain(..10);
        wait_close_wait(a, port, 30);
        q(70, "client closed 10 held (now 30 close-wait)");
        // The server closes, the oldest first: 20 with FIN, 15 with RST, then the rest.
        server.close_held(20, Close::Fin);
        q(50, "server closed 20 held with FIN");
        server.close_held(15, Close::Rst);
        q(35, "server reset 15 held");
        server.close_held(35, Close::Fin);
        q(0, "server closed the rest");
        drop(est);
        let mut phantoms = 0;
        if *cookies {
            // The phantoms left end when the server stops waiting for their op (20 s):
            // then all of them are known, as connections the server accepted and that
            // never sent an op, each of which the tracker added and removed.
            let t0 = Instant::now();
            while ss_live(a, port) != (0, 0) {
                assert!(
                    t0.elapsed() < Duration::from_secs(40),
                    ":{port}: still live: {:?}",
                    phantoms_now(a, b, port)
                );
                thread::sleep(Duration::from_millis(100));
            }
            quiescent(&gate, port, 0, "the SYN-cookie phantoms timed out");
            let unserved = server.unserved();
            phantoms = unserved.len() as u64;
            let recv = mib("TcpExt", "SyncookiesRecv") - cookies_before;
            let children = mib("Tcp", "PassiveOpens") - passive_before;
            let retrans = mib("Tcp", "RetransSegs") - retrans_before;
            eprintln!(
                "  {recv} connections were made from SYN cookies, of {children} child sockets \
                 in all: {} churned + 100 held + {phantoms} phantom(s) that never sent an op \
                 {unserved:?}; {retrans} segment(s) retransmitted by the server's namespace",
                c.connections
            );
            // Not an equation: a SYN that meets a server TIME-WAIT of its 4-tuple (a port
            // the client reused) is answered without a cookie (tcp_conn_request, isn != 0;
            // seen on 7.3: 3,966 cookies for 4,100 connections), and an ACK whose
            // child could not be queued is validated again when resent. Only a connection
            // the server closed first leaves a server TIME-WAIT (the held ones close
            // after every open), so cookies made all the connections but at most that many.
            let server_closed = c
                .by_ending
                .iter()
                .filter(|(op, _)| *op == Op::ServerClose)
                .map(|(_, n)| n)
                .sum::<u64>();
            assert!(
                recv + server_closed >= c.connections + 100,
                "only {recv} SYN cookies came back for {} connections, {server_closed} of \
                 which the server closed first (each leaves the one kind of server TIME-WAIT \
                 that a later SYN can meet and be answered without a cookie)",
                c.connections + 100
            );
        }
        passive_opens += c.connections + 100 + phantoms;
        churned += c.connections;
        server.assert_no_errors();
    }
    for &port in &ports {
        assert_eq!(status_live(&gate, port), 0, ":{port} at the end");
    }
    let st = assert_no_lost_events(&gate);
    eprintln!(
        "churned {churned} connections ({passive_opens} passive opens in all) in {:.2?}; \
         tracker stats {st:?}",
        t_all.elapsed()
    );
    assert!(churned >= 10_000, "only {churned} connections churned");
    // A kernel that skips the tracker (its program's recursion_misses: a preemptible
    // kernel's tracepoints) leaves as many adds or removes to the recheck `status` runs at
    // each quiescent point, where the counts were equal to ss all the same.
    let skipped = skipped(&gate);
    eprintln!("the kernel skipped the tracker {skipped} times");
    if skipped == 0 {
        assert_eq!(
            st.added, passive_opens,
            "every passive open enters the live set exactly once"
        );
        assert_eq!(st.removed, passive_opens, "and leaves it exactly once");
    } else {
        let off = passive_opens.abs_diff(st.added) + passive_opens.abs_diff(st.removed);
        assert!(
            off <= skipped,
            "{off} adds and removes the tracker did not make, but the kernel skipped it only \
             {skipped} times: {st:?}, {passive_opens} passive opens"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 2. Connections that predate the gate.

/// Connections opened before `gate on` — accepted ones (IPv4 and IPv6), CLOSE_WAIT ones,
/// and ones still in a listener's accept queue — are seeded from sock_diag: the counts are
/// right at once, and go down as those connections close (the kernel finds their cookies
/// in the set), up again with new ones, and to 0 at the end.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn connections_opened_before_gate_on_are_counted() {
    require_root();
    let pair = NetNsPair::new();
    let (a, b) = (pair.a.as_str(), pair.b.as_str());
    let (p1, p2, p3) = (8101u16, 8102u16, 8103u16);
    let s1 = Server::start(listen(a, Stack::V4, p1), WORKERS);
    let s2 = Server::start(listen(a, Stack::V6, p2), WORKERS);
    // Never accepted: its connections sit in the accept queue, ESTABLISHED.
    let queue = listen(a, Stack::Dual, p3);

    let mut c1 = open_held(b, sa(pair.a_v4, p1), 30);
    drop(open_held(b, sa(pair.a_v4, p1), 20)); // CLOSE_WAIT
    let c2 = open_held(b, sa(pair.a_v6, p2), 25);
    let c3: Vec<TcpStream> = in_netns(b, || {
        let mut v: Vec<TcpStream> = (0..3)
            .map(|_| TcpStream::connect(sa(pair.a_v4, p3)).expect("connect to the queue"))
            .collect();
        v.extend((0..2).map(|_| TcpStream::connect(sa(pair.a_v6, p3)).expect("connect v6")));
        v
    });
    s1.wait_held(50, SETTLE);
    s2.wait_held(25, SETTLE);
    wait_close_wait(a, p1, 20);

    let gate = gate_on(&pair, &[p1, p2, p3]);
    quiescent(&gate, p1, 50, "seeded: 30 established + 20 close-wait");
    quiescent(&gate, p2, 25, "seeded: 25 established over IPv6");
    quiescent(&gate, p3, 5, "seeded: 5 in the accept queue");
    assert_eq!(
        track_stats(&gate).added,
        0,
        "nothing new yet: all 80 came from the seed"
    );

    // Seeded connections leave the count when they close, however they close.
    c1.drain(..10); // client FIN: CLOSE_WAIT, still live
    wait_close_wait(a, p1, 30);
    quiescent(&gate, p1, 50, "10 seeded went CLOSE_WAIT");
    s1.close_held(10, Close::Fin);
    s1.close_held(5, Close::Rst);
    quiescent(&gate, p1, 35, "15 seeded closed by the server");
    // New connections (through the gate: b is allowlisted) add to the seeded ones.
    let more = open_held(b, sa(pair.a_v4, p1), 10);
    s1.wait_held(45, SETTLE);
    quiescent(&gate, p1, 45, "10 new on top of 35 seeded");
    // Closing the listener resets what is in its accept queue.
    drop(queue);
    quiescent(&gate, p3, 0, "accept queue flushed by closing the listener");
    drop(c3);
    s2.close_held(25, Close::Fin);
    quiescent(&gate, p2, 0, "all IPv6 closed");
    s1.close_held(45, Close::Fin);
    quiescent(&gate, p1, 0, "all closed");
    drop((c1, c2, more));
    let st = assert_no_lost_events(&gate);
    assert_eq!(
        st.added, 10,
        "only the 10 opened after gate on were added by the kernel"
    );
    assert_eq!(
        st.removed,
        80 + 10,
        "the kernel removed the 80 seeded connections and the 10 new ones"
    );
}

// ---------------------------------------------------------------------------------------
// 3. Another namespace.

/// Two pairs, the same port in both: traffic in the second namespace (held before and after
/// the first gate goes on, and churned) never shows in the first gate's count; a gate in
/// the second namespace counts its own connections only.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn same_port_in_another_namespace_is_not_counted() {
    require_root();
    const P: u16 = 8200;
    let one = NetNsPair::new();
    let two = NetNsPair::new();
    let s1 = Server::start(listen(&one.a, Stack::Dual, P), WORKERS);
    let s2 = Server::start(listen(&two.a, Stack::Dual, P), WORKERS);
    let before2 = open_held(&two.b, sa(two.a_v4, P), 20);
    let c1 = open_held(&one.b, sa(one.a_v6, P), 7);
    s1.wait_held(7, SETTLE);
    s2.wait_held(20, SETTLE);

    let gate1 = gate_on(&one, &[P]);
    quiescent(
        &gate1,
        P,
        7,
        "gate on in one; 20 live on the same port in two",
    );
    let c = churn(
        &two.b,
        &[sa(two.a_v4, P), sa(two.a_v6, P)],
        &Op::ENDINGS,
        1000,
        CLIENTS,
    );
    s2.wait_finished(c.connections, SETTLE);
    let after2 = open_held(&two.b, sa(two.a_v6, P), 15);
    s2.wait_held(35, SETTLE);
    quiescent(&gate1, P, 7, "after 1000 churned + 15 held in two");

    let gate2 = gate_on(&two, &[P]);
    quiescent(&gate2, P, 35, "two's own gate counts two's connections");
    quiescent(&gate1, P, 7, "one unchanged");
    s1.close_held(7, Close::Fin);
    quiescent(&gate1, P, 0, "one closed");
    quiescent(&gate2, P, 35, "two unaffected by one's closes");
    s2.close_held(35, Close::Rst);
    quiescent(&gate2, P, 0, "two closed");
    drop((before2, after2, c1));
    assert_no_lost_events(&gate1);
    assert_no_lost_events(&gate2);
}

// ---------------------------------------------------------------------------------------
// 4. Outbound connections whose ephemeral port is the gated port.

/// Narrows namespace `ns`'s ephemeral range to the single port `port`.
fn ephemeral_range(pair: &NetNsPair, ns: &str, port: u16) {
    sysctl(
        pair,
        ns,
        &format!("net.ipv4.ip_local_port_range={port} {port}"),
    );
}

/// A server in namespace `b` that accepts `n` connections and keeps them until dropped.
fn sink_in_b(pair: &NetNsPair, port: u16) -> Server {
    Server::start(listen(&pair.b, Stack::Dual, port), 1)
}

/// Opens the outbound connection from `a` (ephemeral range = `port`), asserting that the
/// kernel gave it local port `port`. The server in b is sent nothing, so it just waits.
fn outbound_from_a(pair: &NetNsPair, port: u16, to: SocketAddr) -> TcpStream {
    let s = in_netns(&pair.a, || connect_reuseaddr(to)).expect("outbound connect from a");
    assert_eq!(
        s.local_addr().unwrap().port(),
        port,
        "the outbound connection did not get the gated port"
    );
    s
}

/// With the gate (and tracker) on, an outbound connection from the gated namespace whose
/// ephemeral local port is the gated port (SYN_SENT -> ESTABLISHED) is not counted, neither
/// when it opens nor when it closes; the passive connections accepted later on the same
/// port are.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn outbound_connection_on_the_gated_port_is_not_counted() {
    require_root();
    const P: u16 = 8300;
    let pair = NetNsPair::new();
    let gate = gate_on(&pair, &[P]);
    let remote = sink_in_b(&pair, 9000);
    ephemeral_range(&pair, &pair.a, P);
    // One over IPv4 and one over IPv6 (ip_local_port_range covers both): two 4-tuples may
    // share the one local port.
    let out4 = outbound_from_a(&pair, P, sa(pair.b_v4, 9000));
    let out6 = outbound_from_a(&pair, P, sa(pair.b_v6, 9000));
    assert_eq!(ss_lines(&pair.a, "established", P).len(), 2);
    assert_eq!(status_live(&gate, P), 0, "outbound connections counted");

    // A listener may now bind the port too (both sockets have SO_REUSEADDR); connections
    // accepted by it are counted, the outbound one still is not.
    let server = Server::start(listen(&pair.a, Stack::V4, P), WORKERS);
    let held = open_held(&pair.b, sa(pair.a_v4, P), 5);
    server.wait_held(5, SETTLE);
    let ss_est = ss_lines(&pair.a, "established", P).len();
    assert_eq!(ss_est, 7, "ss: 5 passive + 2 outbound with local port {P}");
    assert_eq!(
        status_live(&gate, P),
        5,
        "status must count the 5 passive connections only"
    );
    // Closing the outbound connections (a FIN, a RST) must not take passive ones off.
    set_linger_zero(&out6);
    drop((out4, out6));
    thread::sleep(Duration::from_millis(100));
    assert_eq!(status_live(&gate, P), 5, "after the outbound closed");
    server.close_held(5, Close::Fin);
    quiescent(&gate, P, 0, "passive closed");
    drop(held);
    let st = assert_no_lost_events(&gate);
    assert_eq!((st.added, st.removed), (5, 5), "{st:?}");
    drop(remote);
}

// ---------------------------------------------------------------------------------------
// wait.

/// How `wait` prints a peer (a Rust SocketAddr; a v4 client of a dual-stack listener shows
/// as [::ffff:a.b.c.d]:port). Matches both notations of a v4 peer.
fn peer_in(line: &str, peer: SocketAddr) -> bool {
    let ip = match peer.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let forms = match ip {
        IpAddr::V4(v4) => vec![
            format!("{v4}:{}", peer.port()),
            format!("[::ffff:{v4}]:{}", peer.port()),
        ],
        IpAddr::V6(_) => vec![SocketAddr::new(ip, peer.port()).to_string()],
    };
    // A space follows the peer in wait's lines (and callers add one after a JSON string), so
    // port 4000 does not match 40001.
    forms.iter().any(|f| line.contains(&format!("{f} ")))
}

/// A dual-stack server in `a` on `port` holding three connections from `b` (two over IPv4,
/// one over IPv6), opened before the gate on `port` went on.
fn three_held_behind_a_gate(pair: &NetNsPair, port: u16) -> (Server, Vec<TcpStream>, Drain<'_>) {
    let server = Server::start(listen(&pair.a, Stack::Dual, port), WORKERS);
    let mut clients = open_held(&pair.b, sa(pair.a_v4, port), 2);
    clients.extend(open_held(&pair.b, sa(pair.a_v6, port), 1));
    server.wait_held(3, SETTLE);
    let gate = gate_on(pair, &[port]);
    (server, clients, gate)
}

// ---------------------------------------------------------------------------------------
// 5. wait: drained, timeout, no gate.

/// `wait` keeps running while connections are live (and through the closing of all but the
/// last), and exits 0 saying "drained" once the last one closes — after that close, and
/// soon after it.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn wait_exits_0_after_the_last_connection_closes() {
    require_root();
    const P: u16 = 8400;
    let pair = NetNsPair::new();
    let (server, clients, gate) = three_held_behind_a_gate(&pair, P);

    let mut w = gate.spawn(&["wait", "--port", &P.to_string(), "--timeout", "60s"]);
    w.expect_line("3 live connection(s) on port 8400", SETTLE);
    server.close_held(1, Close::Fin);
    server.close_held(1, Close::Rst);
    w.expect_line("1 live connection(s) on port 8400", SETTLE);
    thread::sleep(Duration::from_millis(300));
    assert!(w.running(), "wait returned with a connection still live");
    let t_close = Instant::now();
    server.close_held(1, Close::Fin);
    let out = w.wait_for(Duration::from_secs(30));
    let after = out.exited.duration_since(t_close);
    eprintln!("wait exited {after:.2?} after the last close: {out}");
    out.expect_ok();
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("drained: no live connections on port 8400")),
        "{out}"
    );
    assert!(
        after < Duration::from_secs(5),
        "wait took {after:?} to notice the last close"
    );
    drop(clients);
}

/// `wait` whose reader goes away (`drain-user wait --json | head -1 && systemctl stop ...`)
/// keeps waiting and exits with the drain's own outcome: 3 at the timeout, 0 only once the
/// last connection has closed. Before, the first line written to the closed pipe (the next
/// change of the count) ended it with exit 0, "drained", while connections were live.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn wait_with_its_stdout_closed_exits_with_the_drains_outcome() {
    require_root();
    const P: u16 = 8405;
    let pair = NetNsPair::new();
    let (server, clients, gate) = three_held_behind_a_gate(&pair, P);
    // head reads the first line and exits, closing the pipe; bash exits with wait's code.
    let closed_pipe = [
        "bash",
        "-c",
        r#""$@" | head -1; exit "${PIPESTATUS[0]}""#,
        "wait",
    ];
    let port = P.to_string();

    // A timeout with connections left: 3, after the timeout.
    let t0 = Instant::now();
    let mut w = gate.spawn_via(
        &closed_pipe,
        &["wait", "--json", "--port", &port, "--timeout", "3s"],
    );
    w.expect_line(r#""live":3"#, SETTLE);
    // The next change of the count is written to the closed pipe (EPIPE).
    server.close_held(1, Close::Fin);
    thread::sleep(Duration::from_millis(700));
    assert!(
        w.running(),
        "wait ended when its reader went away, with 2 connections live: {:?}",
        w.seen()
    );
    let out = w.wait_for(Duration::from_secs(30));
    assert_eq!(out.code, Some(3), "not the timeout's exit code: {out}");
    assert!(t0.elapsed() >= Duration::from_secs(3), "{out}");

    // Drained: 0, and only after the last close.
    let mut w = gate.spawn_via(
        &closed_pipe,
        &["wait", "--json", "--port", &port, "--timeout", "60s"],
    );
    w.expect_line(r#""live":2"#, SETTLE);
    server.close_held(1, Close::Fin);
    thread::sleep(Duration::from_millis(700));
    assert!(
        w.running(),
        "wait ended when its reader went away, with a connection live: {:?}",
        w.seen()
    );
    let t_close = Instant::now();
    server.close_held(1, Close::Fin);
    let out = w.wait_for(Duration::from_secs(30));
    out.expect_ok();
    assert!(out.exited > t_close, "{out}");
    drop(clients);
}

/// `wait --timeout` with connections left exits 3 and lists each leftover's peer address
/// and port, local port and state on stderr.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn wait_times_out_with_3_listing_leftovers() {
    require_root();
    const P: u16 = 8410;
    let pair = NetNsPair::new();
    let s4 = Server::start(listen(&pair.a, Stack::V4, P), WORKERS);
    let s6 = Server::start(listen(&pair.a, Stack::V6, P), WORKERS);
    let c4 = open_held(&pair.b, sa(pair.a_v4, P), 2);
    let c6 = open_held(&pair.b, sa(pair.a_v6, P), 1);
    let cw = open_held(&pair.b, sa(pair.a_v4, P), 1);
    let cw_peer = cw[0].local_addr().unwrap();
    drop(cw);
    s4.wait_held(3, SETTLE);
    s6.wait_held(1, SETTLE);
    wait_close_wait(&pair.a, P, 1);
    let gate = gate_on(&pair, &[P]);

    let t0 = Instant::now();
    let out = gate.run(&["wait", "--port", &P.to_string(), "--timeout", "400ms"]);
    let took = t0.elapsed();
    let err = &out.stderr;
    eprintln!("wait took {took:.2?}:\n{err}");
    assert_eq!(out.code, Some(3), "exit status; stderr: {err}");
    assert!(
        took >= Duration::from_millis(400),
        "returned before the timeout"
    );
    assert!(err.contains("timed out"), "{err}");
    let leftover_lines: Vec<&str> = err.lines().filter(|l| l.starts_with("  ")).collect();
    assert_eq!(leftover_lines.len(), 4, "one line per leftover: {err}");
    for c in c4.iter().chain(&c6) {
        let peer = c.local_addr().unwrap();
        assert!(
            leftover_lines
                .iter()
                .any(|l| peer_in(l, peer) && l.contains(&format!("-> :{P} ESTABLISHED"))),
            "{peer} not listed as ESTABLISHED on :{P}: {err}"
        );
    }
    assert!(
        leftover_lines
            .iter()
            .any(|l| peer_in(l, cw_peer) && l.contains(&format!("-> :{P} CLOSE_WAIT"))),
        "{cw_peer} not listed as CLOSE_WAIT: {err}"
    );
    drop((c4, c6, s4, s6));
}

/// `status --json`'s count for `port` and its exactness, and its warnings, with `env` set.
fn status_env(gate: &Drain, port: u16, env: &[&str]) -> (i64, bool, String) {
    let mut wrapper = vec!["env"];
    wrapper.extend_from_slice(env);
    let out = gate.run_via(&wrapper, &["status", "--json"]);
    out.expect_ok();
    let st: Json = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("status --json printed invalid JSON ({e}): {out}"));
    let p = port_status(&st, port).unwrap_or_else(|| panic!("port {port} not in status: {st}"));
    (
        p["live_connections"].i64(),
        p["live_connections_exact"] == Json::Bool(true),
        st["warnings"].to_string(),
    )
}

/// What a kernel that skips the tracker leaves behind (a preemptible kernel runs a
/// tracepoint's programs preemptibly, and the kernel skips a program already running on
/// that CPU: Debian's 7.3 does, `recursion_misses` in bpftool) is put right by a recheck
/// against the kernel's sockets, which `status` and `wait` run when the kernel reports
/// skips. This kernel may never skip, so the skips are injected: entries for closes the
/// tracker never saw (connections that do not exist) and an open it never saw (a live
/// connection taken out of the set and the count), and `DRAIN_TRACKER_MISSES=1` adds one
/// to what the kernel reports. Without it (the negative runs), the wrong counts stand:
/// `status` shows them and `wait` times out on a connection that closed long ago. Last,
/// skips that never stop (`DRAIN_TRACKER_MISSES=grow`) must not keep `wait` from
/// concluding.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn a_recheck_puts_right_what_the_kernel_skipped() {
    require_root();
    const P: u16 = 8415;
    let pair = NetNsPair::new();
    let (server, clients, gate) = three_held_behind_a_gate(&pair, P);
    quiescent(&gate, P, 3, "before the skips");
    let mut socks: aya::maps::HashMap<MapData, drain_common::ConnKey, u32> =
        aya::maps::HashMap::try_from(Map::HashMap(gate.map(map::SOCKS)))
            .expect("DRAIN_CONNS is a hash map of ConnKey");
    let mut live = live_map(&gate);
    let mut bump = |d: i64| {
        let n = live.get(&u32::from(P), 0).unwrap();
        live.set(u32::from(P), n + d, 0).unwrap();
    };
    let keys: Vec<drain_common::ConnKey> = socks
        .keys()
        .filter_map(Result::ok)
        .filter(|k| k.lport == P)
        .collect();
    assert_eq!(keys.len(), 3, "the set's entries for :{P}");
    // Two closes never seen: peers on ports no client of this test has.
    for rport in [1, 2] {
        let stale = drain_common::ConnKey { rport, ..keys[0] };
        socks.insert(stale, u32::from(P), 0).unwrap();
        bump(1);
    }
    // An open never seen: a live connection neither in the set nor counted.
    socks.remove(&keys[1]).unwrap();
    bump(-1);

    let skipped = ["DRAIN_TRACKER_MISSES=1"];
    let (n, _, w) = status_env(&gate, P, &[]);
    assert_eq!(n, 4, "the injected state, with no skip reported: {w}");
    assert!(!w.contains("rechecked"), "{w}");
    let (n, exact, w) = status_env(&gate, P, &skipped);
    assert_eq!(n, 3, "after the recheck: {w}");
    assert!(exact, "rechecked counts are exact: {w}");
    assert!(
        w.contains("2 closed connections taken out of the counts, 1 open ones added"),
        "{w}"
    );
    // Put right in the kernel's maps, not only in what that status printed.
    assert_eq!(status_env(&gate, P, &[]).0, 3);
    quiescent(&gate, P, 3, "after the recheck");

    // wait: a close the tracker never saw keeps a count above 0 for good; the recheck
    // drains it. Every connection closes; one stale entry is left.
    socks
        .insert(
            drain_common::ConnKey {
                rport: 3,
                ..keys[0]
            },
            u32::from(P),
            0,
        )
        .unwrap();
    bump(1);
    server.close_held(3, Close::Fin);
    let t0 = Instant::now();
    while ss_live(&pair.a, P) != (0, 0) {
        assert!(t0.elapsed() < SETTLE, "connections on :{P} did not close");
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        status_live(&gate, P),
        1,
        "every connection closed, one stale entry"
    );
    let port = P.to_string();
    let out = gate.run(&["wait", "--port", &port, "--timeout", "2s"]);
    assert_eq!(
        out.code,
        Some(3),
        "without a skip reported, the stale count stands: {out}"
    );
    let out = gate.run_via(
        &["env", skipped[0]],
        &["wait", "--port", &port, "--timeout", "20s"],
    );
    out.expect_ok();
    assert!(
        out.stdout.lines().any(|l| l.starts_with("drained:")),
        "{out}"
    );
    assert!(
        out.stderr
            .contains("1 closed connections taken out of the counts"),
        "{out}"
    );
    assert_eq!(status_env(&gate, P, &[]).0, 0);
    // A host whose other traffic keeps the kernel skipping the tracker (the count is the
    // program's, for every socket of the host): a zero read after a recheck concludes, so
    // `wait` never spins rechecking until its timeout.
    let t0 = Instant::now();
    let out = gate.run_via(
        &["env", "DRAIN_TRACKER_MISSES=grow"],
        &["wait", "--port", &port, "--timeout", "10s"],
    );
    out.expect_ok();
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "wait took {:?} with skips that never stop: {out}",
        t0.elapsed()
    );
    drop(clients);
}

/// Without a gate, `wait` warns, loads a temporary tracker (seeded with what is open), times
/// out listing the leftovers, later reports the port drained, and leaves no pins behind.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn wait_without_a_gate_uses_a_temporary_tracker() {
    require_root();
    const P: u16 = 8420;
    let pair = NetNsPair::new();
    let server = Server::start(listen(&pair.a, Stack::Dual, P), WORKERS);
    let clients = open_held(&pair.b, sa(pair.a_v6, P), 2);
    server.wait_held(2, SETTLE);
    let drain = Drain::new(&pair, &pair.a);
    let temp_dirs = || pair.pin_dirs(&pair.a).len();

    let out = drain.run(&["wait", "--port", &P.to_string(), "--timeout", "300ms"]);
    let err = &out.stderr;
    assert_eq!(out.code, Some(3), "{err}");
    assert!(err.contains("warning: the gate is off"), "{err}");
    for c in &clients {
        let peer = c.local_addr().unwrap();
        assert!(
            err.lines().any(|l| peer_in(l, peer)),
            "{peer} not listed: {err}"
        );
    }
    assert_eq!(
        temp_dirs(),
        0,
        "the temporary tracker's pins were left behind"
    );

    let mut w = drain.spawn(&["wait", "--port", &P.to_string(), "--timeout", "60s"]);
    w.expect_line("2 live connection(s)", SETTLE);
    let t_close = Instant::now();
    server.close_held(2, Close::Fin);
    let out = w.wait_for(Duration::from_secs(30));
    out.expect_ok();
    assert!(out.exited > t_close);
    assert!(
        out.stdout.lines().any(|l| l.starts_with("drained:")),
        "{out}"
    );
    assert_eq!(
        temp_dirs(),
        0,
        "the temporary tracker's pins were left behind"
    );
    drop(clients);
}

// ---------------------------------------------------------------------------------------
// 6. wait --idle.

/// One request/response exchange, so the connection has carried data both ways.
fn exchange(client: &mut TcpStream, server: &mut TcpStream) {
    client.write_all(b"GET /\n").unwrap();
    let mut buf = [0u8; 6];
    server.read_exact(&mut buf).unwrap();
    server.write_all(b"200 ok\n").unwrap();
    let mut buf = [0u8; 7];
    client.read_exact(&mut buf).unwrap();
}

/// `wait --idle 300ms` returns 0 ("idle") while quiet keep-alive connections stay open, but
/// not while one of them still has a response in flight: a large response the client has
/// not read yet (bytes in the server's send queue), a response dribbled out in small writes,
/// or a request the server has not read. Each time, once the data is through and the
/// connections have been quiet for the idle time, it returns 0.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn wait_idle_returns_for_quiet_keepalives_only() {
    require_root();
    const P: u16 = 8500;
    let pair = NetNsPair::new();
    let server = Server::start(listen(&pair.a, Stack::V4, P), 2);
    let mut clients = open_held(&pair.b, sa(pair.a_v4, P), 3);
    server.wait_held(3, SETTLE);
    let mut conns = server.take_held_for(&clients);
    for (c, s) in clients.iter_mut().zip(conns.iter_mut()) {
        exchange(c, s);
    }
    let gate = gate_on(&pair, &[P]);
    let port = P.to_string();
    let idle_wait = |timeout| {
        [
            "wait",
            "--port",
            &port,
            "--idle",
            "300ms",
            "--timeout",
            timeout,
        ]
        .map(str::to_owned)
    };
    let run_wait = |timeout| gate.run(&idle_wait(timeout).each_ref().map(String::as_str));

    // Quiet keep-alives: idle.
    let out = run_wait("10s");
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let stdout = &out.stdout;
    assert!(
        stdout.starts_with("idle: 3 connection(s) still open on port 8500"),
        "{stdout}"
    );

    // A large response the client does not read: the server's send queue holds bytes.
    let big = vec![b'x'; 8 << 20];
    let mut s0 = conns.remove(0);
    s0.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    let writer = thread::spawn(move || {
        s0.write_all(&big).expect("writing the large response");
        s0
    });
    thread::sleep(Duration::from_millis(200));
    let mut w = gate.spawn(&idle_wait("60s").each_ref().map(String::as_str));
    w.expect_line("3 live connection(s)", SETTLE);
    thread::sleep(Duration::from_millis(1500));
    assert!(
        w.running(),
        "wait --idle returned while 8 MiB of response sat unread: {:?}",
        w.seen()
    );
    // The client reads it all; the response is complete and quiet from then on.
    let mut c0 = clients.remove(0);
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    while got < 8 << 20 {
        let n = c0.read(&mut buf).expect("reading the large response");
        assert!(n > 0, "EOF after {got} bytes");
        got += n;
    }
    let t_done = Instant::now();
    let s0 = writer.join().expect("writer");
    let out = w.wait_for(Duration::from_secs(30));
    out.expect_ok();
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("idle: 3 connection(s)")),
        "{out}"
    );
    let quiet = out.exited.duration_since(t_done);
    eprintln!("idle reported {quiet:.2?} after the large response was read");
    assert!(
        quiet >= Duration::from_millis(250),
        "idle reported {quiet:?} after the last byte moved, before 300ms of quiet"
    );

    // A response dribbled out: 64 bytes every 50 ms for 2 s, read as it comes.
    let mut s1 = conns.remove(0);
    let mut c1 = clients.remove(0);
    let dribbler = thread::spawn(move || {
        for _ in 0..40 {
            s1.write_all(&[b'y'; 64]).unwrap();
            thread::sleep(Duration::from_millis(50));
        }
        s1
    });
    let reader = thread::spawn(move || {
        let mut buf = [0u8; 64 * 40];
        c1.read_exact(&mut buf).unwrap();
        c1
    });
    thread::sleep(Duration::from_millis(100));
    let out = run_wait("1s");
    assert_eq!(
        out.code,
        Some(3),
        "wait --idle must not return while a response is being dribbled out: {}{}",
        out.stdout,
        out.stderr
    );
    let s1 = dribbler.join().unwrap();
    let c1 = reader.join().unwrap();
    let out = run_wait("10s");
    assert_eq!(out.code, Some(0), "{}", out.stderr);

    // A request the server has not read (unread bytes on the server side).
    let mut c2 = clients.remove(0);
    c2.write_all(b"POST /\n").unwrap();
    thread::sleep(Duration::from_millis(500));
    let out = run_wait("1s");
    let err = &out.stderr;
    assert_eq!(
        out.code,
        Some(3),
        "wait --idle returned with an unread request: {}",
        out.stdout
    );
    assert!(err.contains("unread 7 B"), "{err}");
    let mut s2 = conns.remove(0);
    let mut buf = [0u8; 7];
    s2.read_exact(&mut buf).unwrap();
    let out = run_wait("10s");
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    drop((s0, s1, s2, c0, c1, c2, conns, clients));
}

// ---------------------------------------------------------------------------------------
// 7. wait --json.

/// Every stdout line of `wait --json` is one JSON object with an "event"; parses them all.
fn json_events(stdout: &str) -> Vec<Json> {
    assert!(!stdout.is_empty(), "wait --json printed nothing");
    stdout
        .lines()
        .map(|l| {
            let v: Json =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON value ({e}): {l}"));
            assert!(v.is_object(), "not an object: {l}");
            let ev = v
                .get("event")
                .and_then(Json::as_str)
                .unwrap_or_else(|| panic!("no \"event\": {l}"));
            assert!(
                ["progress", "drained", "idle", "timeout"].contains(&ev),
                "unknown event {ev}: {l}"
            );
            v
        })
        .collect()
}

fn event(v: &Json) -> &str {
    v.get("event").and_then(Json::as_str).unwrap()
}

fn num(v: &Json, k: &str) -> f64 {
    v.get(k)
        .and_then(Json::as_f64)
        .unwrap_or_else(|| panic!("no number {k} in {v:?}"))
}

/// `wait --json`: one JSON object per line; "progress" events count down as connections
/// close (live = the sum of ports[].live_connections), and the last line is the one final
/// event — "drained" (live 0), "timeout" (with the leftovers and their peers) or "idle".
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn wait_json_emits_one_event_per_line() {
    require_root();
    const P: u16 = 8600;
    let pair = NetNsPair::new();
    let (server, clients, gate) = three_held_behind_a_gate(&pair, P);
    let p = P.to_string();

    // timeout: the leftovers with their peers.
    let out = gate.run(&["wait", "--json", "--port", &p, "--timeout", "300ms"]);
    assert_eq!(out.code, Some(3), "{}", out.stderr);
    let evs = json_events(&out.stdout);
    let last = evs.last().unwrap();
    assert_eq!(event(last), "timeout", "{out}");
    assert_eq!(num(last, "live"), 3.0);
    assert!(evs[..evs.len() - 1].iter().all(|e| event(e) == "progress"));
    let remaining = last.get("remaining").and_then(Json::as_array).unwrap();
    assert_eq!(remaining.len(), 3, "{out}");
    for c in &clients {
        let peer = c.local_addr().unwrap();
        assert!(
            remaining.iter().any(|r| {
                r.get("peer")
                    .and_then(Json::as_str)
                    .is_some_and(|s| peer_in(&format!("{s} "), peer))
                    && r.get("port").and_then(Json::as_f64) == Some(f64::from(P))
                    && r.get("state").and_then(Json::as_str) == Some("ESTABLISHED")
            }),
            "{peer} not in remaining: {out}"
        );
    }

    // idle: all three are quiet (nothing was ever sent after the handshake byte).
    let out = gate.run(&[
        "wait",
        "--json",
        "--port",
        &p,
        "--idle",
        "200ms",
        "--timeout",
        "20s",
    ]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let evs = json_events(&out.stdout);
    assert_eq!(event(evs.last().unwrap()), "idle", "{out}");
    assert_eq!(num(evs.last().unwrap(), "live"), 3.0);

    // drained: progress 3, 2, 1, then drained (which says 0: no progress line for it).
    let mut w = gate.spawn(&["wait", "--json", "--port", &p, "--timeout", "60s"]);
    w.expect_line("\"live\":3", SETTLE);
    for left in [2, 1, 0] {
        server.close_held(1, Close::Fin);
        w.expect_line(&format!("\"live\":{left}"), SETTLE);
    }
    let out = w.wait_for(Duration::from_secs(30));
    out.expect_ok();
    let evs = json_events(&out.stdout);
    let (last, progress) = evs.split_last().unwrap();
    assert_eq!(event(last), "drained", "{out}");
    assert_eq!(num(last, "live"), 0.0);
    assert!(progress.iter().all(|e| event(e) == "progress"), "{out}");
    let lives: Vec<f64> = progress.iter().map(|e| num(e, "live")).collect();
    assert_eq!(lives, [3.0, 2.0, 1.0], "{out}");
    for e in progress {
        let per: f64 = e
            .get("ports")
            .and_then(Json::as_array)
            .unwrap()
            .iter()
            .map(|p| num(p, "live_connections"))
            .sum();
        assert_eq!(per, num(e, "live"), "{e:?}");
    }
    let times: Vec<f64> = evs.iter().map(|e| num(e, "elapsed_ms")).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    drop(clients);
}

// ---------------------------------------------------------------------------------------
// Found while writing the above.

/// A server that shuts down gracefully closes its listening socket first and then finishes
/// the requests in flight. The live count still says 2 (right: both connections are
/// ESTABLISHED), so `wait --idle` must not call the port idle while one of them has a
/// response sitting unread in the send queue, and `wait --timeout` must list both.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn wait_after_the_listener_closed_still_sees_the_connections() {
    require_root();
    const P: u16 = 8700;
    let pair = NetNsPair::new();
    let mut server = Server::start(listen(&pair.a, Stack::V4, P), 2);
    let mut clients = open_held(&pair.b, sa(pair.a_v4, P), 2);
    server.wait_held(2, SETTLE);
    let gate = gate_on(&pair, &[P]);
    server.stop_listening();
    let mut conns = server.take_held_for(&clients);
    quiescent(&gate, P, 2, "listener closed, 2 connections still open");

    let big = vec![b'x'; 8 << 20];
    let mut s0 = conns.remove(0);
    s0.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    let writer = thread::spawn(move || {
        let _ = s0.write_all(&big);
        s0
    });
    thread::sleep(Duration::from_millis(300));
    let p = P.to_string();
    let idle = gate.run(&[
        "wait",
        "--port",
        &p,
        "--idle",
        "300ms",
        "--timeout",
        "1500ms",
    ]);
    let timeout = gate.run(&["wait", "--port", &p, "--timeout", "300ms"]);
    // Unblock the writer before asserting, so a failure does not leave it hanging.
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0;
    while got < 8 << 20 {
        match clients[0].read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    let s0 = writer.join().unwrap();
    eprintln!(
        "wait --idle: {:?} {}{}\nwait --timeout: {:?} {}",
        idle.code, idle.stdout, idle.stderr, timeout.code, timeout.stderr
    );
    assert_eq!(
        idle.code,
        Some(3),
        "wait --idle reported idle while 8 MiB of response sat in the send queue: {}",
        idle.stdout
    );
    let err = &timeout.stderr;
    assert_eq!(timeout.code, Some(3), "{err}");
    for c in &clients {
        let peer = c.local_addr().unwrap();
        assert!(
            err.lines().any(|l| peer_in(l, peer)),
            "leftover {peer} not listed: {err}"
        );
    }
    drop((s0, conns, clients));
}

//! Containers: a namespace given by path or by pid is a target (`--netns`, `--pid`), and a
//! published port (a DNAT on the "host" to a server that lives in another namespace, the way
//! Docker's `-p 8080:80` works) is drained truthfully: its connections are counted where
//! they live, never a false "drained".
//!
//! Every call here runs drain-user in the test's own namespaces and lets it pick its target
//! itself; the published-port topology (client -> host with a DNAT rule -> container) is
//! built by [`drain_tests::published::Published`] from namespaces the test makes.

use std::{
    net::SocketAddr,
    process::{Child, Command},
    time::{Duration, Instant},
};

use drain_tests::{
    cli::{port_status, run_here, Json, JsonExt},
    netns::NetNsPair,
    traffic::{connect, listen, open_held, Close, Server, Stack},
};

/// A process parked in namespace `ns` (`nsenter --net ... sleep`), killed on drop: what
/// `--pid` names.
struct Parked(Child);

impl Parked {
    fn new(ns: &str) -> Self {
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{ns}"))
            .args(["sleep", "600"])
            .spawn()
            .expect("starting a process in the namespace");
        // nsenter has switched when /proc/PID/ns/net names the namespace.
        let want = std::fs::metadata(format!("/var/run/netns/{ns}")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::metadata(format!("/proc/{}/ns/net", child.id()))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .ok()
            != Some(std::os::unix::fs::MetadataExt::ino(&want))
        {
            assert!(Instant::now() < deadline, "nsenter did not enter {ns}");
            std::thread::sleep(Duration::from_millis(5));
        }
        Parked(child)
    }

    fn pid(&self) -> String {
        self.0.id().to_string()
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Turns the gate of a target off on drop (errors printed), so a failing test leaves none.
struct OffOnDrop(Vec<String>);

impl Drop for OffOnDrop {
    fn drop(&mut self) {
        let mut args: Vec<&str> = self.0.iter().map(String::as_str).collect();
        args.extend(["gate", "off"]);
        let out = run_here(&args);
        if out.code != Some(0) {
            eprintln!("cleanup: {out}");
        }
    }
}

fn status(target: &[&str]) -> Json {
    let mut args = target.to_vec();
    args.extend(["status", "--json"]);
    let out = run_here(&args);
    out.expect_ok();
    serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// `--netns PATH` and `--pid PID` act in that namespace, from the test's own: gate on, a
/// new connection refused there while a held one is counted, status, wait (timeout while
/// one is left, drained once it closes), gate off; the pins are those of that namespace.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn netns_and_pid_targets() {
    let pair = NetNsPair::new();
    let server = Server::start(listen(&pair.a, Stack::V4, 0), 2);
    let port = server.port();
    let to = SocketAddr::new(pair.a_v4.into(), port);
    let held = open_held(&pair.b, to, 1);
    let parked = Parked::new(&pair.a);
    let by_path = format!("/var/run/netns/{}", pair.a);
    let pid = parked.pid();
    let netns: [&str; 2] = ["--netns", &by_path];
    let by_pid: [&str; 2] = ["--pid", &pid];
    let _off = OffOnDrop(netns.iter().map(|s| s.to_string()).collect());
    let p = port.to_string();

    let mut on = netns.to_vec();
    on.extend(["gate", "on", "--port", &p, "--ttl", "2m"]);
    run_here(&on).expect_ok();
    // The gate is the namespace's own: its state directory, nothing for the test's.
    assert!(
        pair.state_dir(&pair.a).exists(),
        "no gate pinned for {}",
        pair.a
    );
    assert!(
        connect(&pair, &pair.b, to, Duration::from_millis(1500)).is_timed_out(),
        "a new connection passed the gate made with --netns"
    );
    for target in [&netns[..], &by_pid[..]] {
        let st = status(target);
        assert_eq!(st["gate"].str(), "on", "{target:?}: {st}");
        let ps = port_status(&st, port).unwrap_or_else(|| panic!("{target:?}: {st}"));
        assert_eq!(ps["live_connections"].i64(), 1, "{target:?}: {st}");
        assert!(ps["syns_refused"].u64() >= 1, "{target:?}: {st}");
    }
    let mut wait = by_pid.to_vec();
    wait.extend(["wait", "--timeout", "500ms"]);
    run_here(&wait).expect_code(3);
    drop(held);
    server.close_held(1, Close::Fin);
    let mut wait = netns.to_vec();
    wait.extend(["wait", "--timeout", "10s"]);
    let out = run_here(&wait);
    out.expect_ok();
    assert!(out.stdout.contains("drained"), "{out}");
    let mut off = by_pid.to_vec();
    off.extend(["gate", "off"]);
    run_here(&off).expect_ok();
    assert!(
        !pair.state_dir(&pair.a).exists(),
        "gate off by --pid left pins"
    );
    connect(&pair, &pair.b, to, Duration::from_secs(3)).stream("after gate off by --pid");
}

//! Hardening: what a hostile local user, a clumsy operator or another tool can do to a gate,
//! and that `status` tells the truth about it (the kernel's, not the pins').
//!
//! - Local users: every attack run as `nobody` (setpriv) fails and the gate keeps working;
//!   an untrusted state directory is refused; the lock is root-only, waiting for it is
//!   bounded and names a stopped holder; `wait` stays killable meanwhile.
//! - `ip netns exec` is refused (its pins would vanish).
//! - Status vs kernel: a link detached by another tool, a `gate off` killed between detach
//!   and unlink, an interface deleted and recreated with the same ifindex, a veth moved into
//!   another namespace: status says so and `gate on` repairs.
//! - The reaper leaves a gate whose namespace is held only by a bind mount in another mount
//!   namespace; reaps it once the namespace is gone; `gate off` reaps a killed `wait`'s pins.
//! - Atomic `gate on`; capacity of the live set (lower bounds, `wait` refuses "drained");
//!   `--policy reset` under tc resets; `wait` on an expired gate; CAP_PERFMON.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

use drain_tests::{
    cli::{gated_ports, iface_status, port_status, CliOutput, Drain, Json, JsonExt},
    drain_user_bin,
    netns::NetNsPair,
    object::link_xdp,
    traffic::{connect, open_held, EchoServer},
};

const P: u16 = 8080;
const Q: u16 = 9090;
const SHORT: Duration = Duration::from_secs(1);
const LONG: Duration = Duration::from_secs(5);

const NOBODY: &[&str] = &[
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
];

/// `prog args...` as uid/gid 65534 inside `ns`.
fn as_nobody(pair: &NetNsPair, ns: &str, args: &[&str]) -> Output {
    let mut c = pair.cmd(ns, NOBODY[0]);
    c.args(&NOBODY[1..]).args(args);
    c.output().expect("running setpriv")
}

/// Servers on P and Q in `a` (IPv4), returned with the two targets.
fn servers(pair: &NetNsPair) -> (Vec<EchoServer>, SocketAddr, SocketAddr) {
    let (p, q) = (
        SocketAddr::new(pair.a_v4.into(), P),
        SocketAddr::new(pair.a_v4.into(), Q),
    );
    let s = vec![
        EchoServer::start(pair, &pair.a, p),
        EchoServer::start(pair, &pair.a, q),
    ];
    (s, p, q)
}

#[track_caller]
fn assert_refused(pair: &NetNsPair, to: SocketAddr) {
    let c = connect(pair, &pair.b, to, SHORT);
    assert!(c.is_timed_out(), "{to} should be gated: {c:?}");
}

#[track_caller]
fn assert_accepted(pair: &NetNsPair, to: SocketAddr) {
    let c = connect(pair, &pair.b, to, LONG);
    assert!(c.is_ok(), "{to} should be open: {c:?}");
}

fn warnings(st: &Json) -> Vec<String> {
    st["warnings"]
        .arr()
        .iter()
        .map(|w| w.str().to_owned())
        .collect()
}

fn iface_state<'j>(st: &'j Json, name: &str) -> &'j str {
    iface_status(st, name).unwrap_or_else(|| panic!("no interface {name} in {st}"))["state"].str()
}

/// The veth's link pin of the gate in `a`.
fn veth_pin(drain: &Drain, pair: &NetNsPair) -> std::path::PathBuf {
    let idx = drain.ifindex(&pair.veth_a);
    drain.state_dir().join(format!("link-xdp-{idx}"))
}

/// `gate on --port P --iface <a's veth> extra...`, which must exit 0; `--attach xdp`
/// unless `extra` names a hook (these tests judge XDP links, [`veth_pin`]).
#[track_caller]
fn on_veth(drain: &Drain, pair: &NetNsPair, extra: &[&str]) -> CliOutput {
    let port = P.to_string();
    let mut args = vec!["--port", port.as_str(), "--iface", pair.veth_a.as_str()];
    if !extra.contains(&"--attach") {
        args.extend(["--attach", "xdp"]);
    }
    args.extend_from_slice(extra);
    drain.on(&args)
}

fn sh(cmd: &mut Command) -> Output {
    cmd.output().expect("running a command")
}

// ---------------------------------------------------------------------------------------
// 1. Local users
// ---------------------------------------------------------------------------------------

/// As `nobody`: opening or creating the lock, creating a state directory, renaming the
/// state, deleting a link pin, planting a symlink, all fail; the gate keeps refusing, status
/// stays true, and later calls are not held up.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn unprivileged_users_cannot_block_hide_or_lift_a_gate() {
    let pair = NetNsPair::new();
    let (_s, p, q) = servers(&pair);
    let drain = Drain::new(&pair, &pair.a);
    on_veth(&drain, &pair, &[]);
    let dir = drain.state_dir();
    let d = dir.to_string_lossy().into_owned();
    let pin = veth_pin(&drain, &pair).to_string_lossy().into_owned();
    let root = dir.parent().unwrap().to_string_lossy().into_owned();
    let attacks: Vec<Vec<String>> = vec![
        // Holding the lock (a read-only descriptor is enough for flock).
        vec![
            "flock".into(),
            "-s".into(),
            "-w".into(),
            "1".into(),
            "/run/drain/lock".into(),
            "sleep".into(),
            "30".into(),
        ],
        vec!["touch".into(), "/run/drain/lock2".into()],
        vec!["mkdir".into(), format!("{root}/1-2")],
        vec!["mv".into(), d.clone(), format!("{d}-x")],
        vec!["rm".into(), "-f".into(), pin.clone()],
        vec![
            "ln".into(),
            "-s".into(),
            "/tmp".into(),
            format!("{d}/link-xdp-999"),
        ],
        vec!["mkdir".into(), format!("{d}/x")],
    ];
    let t = Instant::now();
    for a in &attacks {
        let args: Vec<&str> = a.iter().map(String::as_str).collect();
        let out = as_nobody(&pair, &pair.a, &args);
        assert!(
            !out.status.success(),
            "as nobody, `{}` succeeded: {out:?}",
            args.join(" ")
        );
    }
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "an attack hung for {:?}",
        t.elapsed()
    );
    assert!(Path::new(&pin).exists());
    assert_refused(&pair, p);
    assert_accepted(&pair, q);
    let st = drain.status();
    assert_eq!(st["gate"].str(), "on", "{st}");
    assert_eq!(iface_state(&st, &pair.veth_a), "attached", "{st}");
    assert!(warnings(&st).is_empty(), "{st}");
    // The lock is not held by anyone: the next calls take it at once.
    let t = Instant::now();
    on_veth(&drain, &pair, &[]);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    for path in ["/run/drain", "/run/drain/lock", &root, &d] {
        let meta = std::fs::symlink_metadata(path).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(meta.uid(), 0, "{path}");
        assert_eq!(meta.mode() & 0o022, 0, "{path} mode {:o}", meta.mode());
    }
}

/// A state directory drain cannot trust (owned by another user, writable by others, or a
/// symlink) is refused with one line saying what to do, and nothing is attached.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn an_untrusted_state_directory_is_refused() {
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    let dir = drain.state_dir();
    // The parent exists (a gate elsewhere, or an earlier one here, made it).
    on_veth(&drain, &pair, &[]);
    drain.off();
    let d = dir.to_string_lossy().into_owned();
    let cases: [(&str, &[&[&str]]); 3] = [
        (
            "owned by uid 65534",
            &[&["mkdir", &d], &["chown", "65534:65534", &d]],
        ),
        (
            "writable by other users",
            &[&["mkdir", &d], &["chmod", "0777", &d]],
        ),
        ("symbolic link", &[&["ln", "-s", "/sys/fs/bpf", &d]]),
    ];
    for (want, setup) in cases {
        for c in setup {
            let out = sh(Command::new(c[0]).args(&c[1..]));
            assert!(out.status.success(), "{c:?}: {out:?}");
        }
        for args in [
            &[
                "gate",
                "on",
                "--port",
                "8080",
                "--iface",
                pair.veth_a.as_str(),
            ][..],
            &["status"],
            &["gate", "off"],
        ] {
            let out = drain.run(args);
            out.expect_code(1);
            let lines = out.stderr_lines();
            assert_eq!(lines.len(), 1, "{out}");
            assert!(
                lines[0].contains(want) && lines[0].contains("remove it"),
                "{out}"
            );
        }
        assert_eq!(link_xdp(&pair, &pair.a, &pair.veth_a), None);
        let meta = std::fs::symlink_metadata(&dir).unwrap();
        if meta.file_type().is_symlink() {
            std::fs::remove_file(&dir).unwrap();
        } else {
            std::fs::remove_dir(&dir).unwrap();
        }
    }
}

/// A stand-in for a drain-user call stopped (SIGSTOP) while it holds the lock in `dir`:
/// it records its pid in the lock file the way drain does, holds the lock, and is stopped.
/// Dropping it resumes and kills it.
struct StoppedHolder {
    child: std::process::Child,
}

impl StoppedHolder {
    fn start(dir: &Path) -> Self {
        let lock = dir.join("lock");
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {l}; exec flock -o {l} sleep 60",
                l = lock.display()
            ))
            .spawn()
            .expect("starting the holder");
        let h = Self { child };
        thread::sleep(Duration::from_millis(300));
        signal("-STOP", h.pid());
        h
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for StoppedHolder {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.pid().to_string()])
            .output();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[track_caller]
fn signal(sig: &str, pid: u32) {
    let out = sh(Command::new("kill").args([sig, &pid.to_string()]));
    assert!(out.status.success(), "kill {sig} {pid}: {out:?}");
}

/// A holder stopped with SIGSTOP: later calls give up after the bounded wait, naming its
/// pid and what to do; a `wait` blocked on the lock meanwhile dies at SIGTERM; once the
/// holder is gone, everything works again. (The lock is a private one, DRAIN_LOCK_DIR, so
/// the other tests are not held up.)
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn a_stopped_lock_holder_cannot_wedge_later_calls() {
    use std::os::unix::fs::DirBuilderExt;
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    let dir = std::path::PathBuf::from(format!("/run/drain-test-{}", pair.a));
    std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
    let env = format!("DRAIN_LOCK_DIR={}", dir.display());
    let via: &[&str] = &["env", &env];
    let holder = StoppedHolder::start(&dir);
    let pid = holder.pid();
    // `wait` without a gate needs the lock for its temporary tracker: blocked, but
    // SIGTERM still ends it at once.
    let q = Q.to_string();
    let mut waiter = drain.spawn_via(via, &["wait", "--port", &q, "--timeout", "30s"]);
    thread::sleep(Duration::from_secs(2));
    assert!(waiter.running(), "wait ended early: {:?}", waiter.seen());
    signal("-TERM", waiter.pid());
    let t = Instant::now();
    let out = waiter.wait_for(Duration::from_secs(3));
    assert_ne!(out.code, Some(0), "{out}");
    eprintln!("wait ended {:?} after SIGTERM", t.elapsed());

    let t = Instant::now();
    let out = drain.run_via(via, &["gate", "off"]);
    let took = t.elapsed();
    out.expect_code(1);
    let lines = out.stderr_lines();
    assert_eq!(lines.len(), 1, "{out}");
    assert!(
        lines[0].contains(&format!("pid {pid}, stopped"))
            && lines[0].contains(&format!("kill -CONT {pid}")),
        "{out}"
    );
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(20),
        "gave up after {took:?}"
    );
    drop(holder);
    let port = P.to_string();
    drain
        .run_via(
            via,
            &["gate", "on", "--port", &port, "--iface", &pair.veth_a],
        )
        .expect_ok();
    assert_eq!(drain.status()["gate"].str(), "on");
    drain.run_via(via, &["gate", "off"]).expect_ok();
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------
// 2. ip netns exec
// ---------------------------------------------------------------------------------------

/// Under `ip netns exec` (a private mount namespace with a fresh /sys and no bpffs), every
/// command refuses with one line naming `nsenter --net=/var/run/netns/<name>`.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn ip_netns_exec_is_refused_with_the_nsenter_line() {
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    let bin = drain_user_bin();
    for args in [
        &["gate", "on", "--port", "8080"][..],
        &["status"],
        &["gate", "off"],
    ] {
        let out = sh(Command::new("ip")
            .args(["netns", "exec", &pair.a])
            .arg(&bin)
            .args(args));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains(&format!("nsenter --net=/var/run/netns/{}", pair.a)),
            "{err}"
        );
    }
    assert!(!drain.state_dir().exists());
    for dev in ["lo", pair.veth_a.as_str()] {
        assert_eq!(link_xdp(&pair, &pair.a, dev), None, "{dev}");
    }
}

// ---------------------------------------------------------------------------------------
// 3. Status against the kernel
// ---------------------------------------------------------------------------------------

/// Another tool detaches the link (BPF_LINK_DETACH): status says "detached" and "off" with
/// a warning, the port is open; `gate on` re-attaches and the port is refused again.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn a_link_detached_by_another_tool_is_reported_and_repaired() {
    let pair = NetNsPair::new();
    let (_s, p, _q) = servers(&pair);
    let drain = Drain::new(&pair, &pair.a);
    on_veth(&drain, &pair, &[]);
    assert_refused(&pair, p);
    drain_user::sys::detach_link(&veth_pin(&drain, &pair)).unwrap();
    assert_accepted(&pair, p);
    let st = drain.status();
    assert_eq!(iface_state(&st, &pair.veth_a), "detached", "{st}");
    assert_eq!(st["gate"].str(), "off", "nothing is gated: {st}");
    assert!(warnings(&st).len() >= 2, "{st}");
    let human = drain.run(&["status"]);
    human.expect_ok();
    assert!(human.stdout.contains("detached"), "{human}");
    let out = on_veth(&drain, &pair, &[]);
    assert!(out.stdout.contains("re-attached"), "{out}");
    assert_refused(&pair, p);
    let st = drain.status();
    assert_eq!(iface_state(&st, &pair.veth_a), "attached", "{st}");
    assert_eq!(st["gate"].str(), "on", "{st}");
    assert!(warnings(&st).is_empty(), "{st}");
}

/// `gate off` killed (SIGKILL injected by strace) at its first unlink, right after the
/// first BPF_LINK_DETACH: status reports the detached link; `gate on` repairs; `gate off`
/// then removes everything.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn a_gate_off_killed_between_detach_and_unlink_is_repaired() {
    let pair = NetNsPair::new();
    let (_s, p, _q) = servers(&pair);
    let drain = Drain::new(&pair, &pair.a);
    on_veth(&drain, &pair, &[]);
    let out = drain.run_killed_at("unlink,unlinkat", 1, &["gate", "off"]);
    assert_ne!(out.code, Some(0), "gate off was not killed: {out}");
    assert!(
        veth_pin(&drain, &pair).exists(),
        "the pin should still be there"
    );
    let st = drain.status();
    assert_eq!(iface_state(&st, &pair.veth_a), "detached", "{st}");
    assert_eq!(st["gate"].str(), "off", "{st}");
    assert_accepted(&pair, p);
    let out = on_veth(&drain, &pair, &[]);
    assert!(out.stdout.contains("re-attached"), "{out}");
    assert_refused(&pair, p);
    drain.off();
    assert!(pair.pin_dirs(&pair.a).is_empty());
    assert_eq!(link_xdp(&pair, &pair.a, &pair.veth_a), None);
}

/// An interface deleted and recreated with the same ifindex: the old link went with the
/// old device; status says "detached", `gate on` attaches to the new one.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn an_interface_recreated_with_the_same_ifindex_is_not_taken_for_gated() {
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    let dev = "drtest0";
    let ipa = |args: &[&str]| {
        let out = sh(pair.cmd(&pair.a, "ip").args(args));
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    };
    let make = |extra: &[&str]| {
        let mut args = vec!["link", "add", dev];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["type", "veth", "peer", "name", "drtest1"]);
        ipa(&args);
        ipa(&["link", "set", dev, "up"]);
        ipa(&["link", "set", "drtest1", "up"]);
    };
    make(&[]);
    let idx = drain.ifindex(dev);
    drain.on(&["--port", &P.to_string(), "--iface", dev, "--attach", "xdp"]);
    assert!(link_xdp(&pair, &pair.a, dev).is_some());
    ipa(&["link", "del", dev]);
    let idx_s = idx.to_string();
    make(&["index", &idx_s]);
    assert_eq!(drain.ifindex(dev), idx);
    assert_eq!(
        link_xdp(&pair, &pair.a, dev),
        None,
        "a new device has no program"
    );
    let st = drain.status();
    assert_eq!(iface_state(&st, dev), "detached", "{st}");
    assert_eq!(st["gate"].str(), "off", "{st}");
    let out = drain.on(&["--port", &P.to_string(), "--iface", dev, "--attach", "xdp"]);
    assert!(out.stdout.contains("re-attached"), "{out}");
    assert_eq!(
        link_xdp(&pair, &pair.a, dev).map(|(_, n)| n).as_deref(),
        Some("drain_xdp")
    );
    assert_eq!(iface_state(&drain.status(), dev), "attached");
}

/// A gated veth moved into another namespace keeps its program there: status in the old
/// namespace says "elsewhere", status in the new one warns about drain's program; `gate off`
/// in the old namespace detaches it.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn a_gated_interface_moved_to_another_namespace_is_reported_and_detached() {
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    let there = Drain::new(&pair, &pair.b);
    on_veth(&drain, &pair, &[]);
    let out = sh(pair
        .cmd(&pair.a, "ip")
        .args(["link", "set", &pair.veth_a, "netns", &pair.b]));
    assert!(out.status.success(), "{out:?}");
    let st = drain.status();
    assert_eq!(
        st["interfaces"].arr()[0]["state"].str(),
        "elsewhere",
        "{st}"
    );
    assert!(!warnings(&st).is_empty(), "{st}");
    let st_b = there.status();
    assert_eq!(st_b["gate"].str(), "off", "{st_b}");
    assert!(
        warnings(&st_b)
            .iter()
            .any(|w| w.contains(&pair.veth_a) && w.contains("drain_xdp")),
        "{st_b}"
    );
    assert!(link_xdp(&pair, &pair.b, &pair.veth_a).is_some());
    drain.off();
    assert_eq!(link_xdp(&pair, &pair.b, &pair.veth_a), None);
    assert!(warnings(&there.status()).is_empty());
}

/// `--policy reset` under `--attach tc`: the RST comes from the kernel's TCP past the first
/// line, so TC interfaces reset like XDP ones, and status says so (policy.rs's
/// `reset_contract_tc` checks real clients get it).
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn status_says_tc_interfaces_reset_under_policy_reset() {
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    on_veth(&drain, &pair, &["--attach", "tc", "--policy", "reset"]);
    let st = drain.status();
    assert_eq!(st["policy"].str(), "reset");
    assert!(st["sk_lookup"].bool(), "{st}");
    assert_eq!(
        iface_status(&st, &pair.veth_a).unwrap()["refusal"].str(),
        "reset",
        "{st}"
    );
    let human = drain.run(&["status"]);
    assert!(human.stdout.contains("policy: reset\n"), "{human}");
}

// ---------------------------------------------------------------------------------------
// 4. The reaper
// ---------------------------------------------------------------------------------------

/// A namespace deleted from `ip netns` but held by a bind mount in another mount namespace
/// is alive, and its gate still refuses there: the next `gate on` elsewhere leaves it. Once
/// the holder is gone (and the kernel has detached the links), it is reaped.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn the_reaper_leaves_a_gate_held_by_a_bind_mount_in_another_mount_namespace() {
    let (p1, p2) = (NetNsPair::new(), NetNsPair::new());
    let d1 = Drain::new(&p1, &p1.a);
    let d2 = Drain::new(&p2, &p2.a);
    d1.on(&["--port", &P.to_string(), "--attach", "xdp"]);
    let dir = d1.state_dir();
    let pin = veth_pin(&d1, &p1);
    let hold = std::env::temp_dir().join(format!("drain-hold-{}", p1.a));
    std::fs::write(&hold, b"").unwrap();
    let mut holder = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount --bind /var/run/netns/{} {} && exec sleep 120",
            p1.a,
            hold.display()
        ))
        .spawn()
        .expect("starting the holder");
    thread::sleep(Duration::from_millis(500));
    let out = sh(Command::new("ip").args(["netns", "del", &p1.a]));
    assert!(out.status.success(), "{out:?}");
    thread::sleep(Duration::from_millis(300));
    d2.on(&["--port", &P.to_string()]);
    assert!(dir.exists(), "a live namespace's gate was reaped");
    assert_ne!(
        drain_user::sys::link_info(&pin).unwrap().ifindex,
        0,
        "the gate should still be attached"
    );
    let _ = holder.kill();
    let _ = holder.wait();
    let _ = std::fs::remove_file(&hold);
    // Namespace teardown is asynchronous: wait for the kernel to detach the links.
    let deadline = Instant::now() + Duration::from_secs(20);
    while drain_user::sys::link_info(&pin).is_ok_and(|i| i.ifindex != 0) {
        assert!(Instant::now() < deadline, "the namespace did not go away");
        thread::sleep(Duration::from_millis(50));
    }
    d2.on(&["--port", &P.to_string()]);
    assert!(!dir.exists(), "the dead namespace's gate was not reaped");
}

/// A `wait` without a gate killed with SIGKILL leaves its tracker's pins; `gate off` (with
/// no gate) reaps them.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn gate_off_reaps_a_killed_waits_pins() {
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    let w = drain.spawn(&["wait", "--port", &Q.to_string(), "--timeout", "60s"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pair.pin_dirs(&pair.a).is_empty() {
        assert!(
            Instant::now() < deadline,
            "wait made no pin dir: {:?}",
            w.seen()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let out = sh(Command::new("kill").args(["-KILL", &w.pid().to_string()]));
    assert!(out.status.success());
    let _ = w.wait_for(Duration::from_secs(5));
    assert_eq!(
        pair.pin_dirs(&pair.a).len(),
        1,
        "the killed wait left its pins"
    );
    let out = drain.off();
    assert!(out.stdout.contains("already off"), "{out}");
    assert!(pair.pin_dirs(&pair.a).is_empty(), "not reaped");
}

// ---------------------------------------------------------------------------------------
// 5. Atomic gate on, capacity, expiry, privileges
// ---------------------------------------------------------------------------------------

/// A `gate on` that fails over an existing gate (1025 --allow prefixes) changes nothing:
/// port A still refused, B open, allowlist, policy and TTL as they were.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn a_failing_gate_on_leaves_the_previous_gate_exactly_as_it_was() {
    let pair = NetNsPair::new();
    let (_s, p, q) = servers(&pair);
    let drain = Drain::new(&pair, &pair.a);
    on_veth(
        &drain,
        &pair,
        &[
            "--allow",
            "198.51.100.0/24",
            "--policy",
            "drop",
            "--ttl",
            "1h",
        ],
    );
    let before = drain.status();
    let many: Vec<String> = (0..1025u32)
        .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
        .collect();
    let out = drain.run(&[
        "gate",
        "on",
        "--port",
        &Q.to_string(),
        "--iface",
        &pair.veth_a,
        "--allow",
        &many.join(","),
        "--policy",
        "reset",
        "--ttl",
        "none",
    ]);
    out.expect_code(2);
    assert!(out.stderr.contains("1024"), "{out}");
    assert_refused(&pair, p);
    assert_accepted(&pair, q);
    let after = drain.status();
    assert_eq!(gated_ports(&after), vec![P], "{after}");
    assert_eq!(after["allow"], before["allow"], "{after}");
    assert_eq!(after["policy"], before["policy"], "{after}");
    let (b, a) = (
        before["ttl_remaining_ms"].u64(),
        after["ttl_remaining_ms"].u64(),
    );
    assert!(a <= b && b - a < 30_000, "TTL changed: {b} -> {a}");
}

/// A live-connection set of 4 (DRAIN_MAX_CONNECTIONS) with 6 connections: 2 failed
/// inserts, counts shown as lower bounds (JSON and text), and once they close `wait`
/// refuses to call the port drained.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn a_full_connection_set_gives_lower_bounds_and_no_drained() {
    let pair = NetNsPair::new();
    let (_s, p, _q) = servers(&pair);
    let drain = Drain::new(&pair, &pair.a);
    let allow = format!("{}/32", pair.b_v4);
    let out = drain.run_via(
        &["env", "DRAIN_MAX_CONNECTIONS=4"],
        &[
            "gate",
            "on",
            "--port",
            &P.to_string(),
            "--iface",
            &pair.veth_a,
            "--allow",
            &allow,
        ],
    );
    out.expect_ok();
    let held = open_held(&pair.b, p, 6);
    thread::sleep(Duration::from_millis(300));
    let st = drain.status();
    let port = port_status(&st, P).unwrap();
    assert_eq!(port["live_connections"].i64(), 4, "{st}");
    assert!(!port["live_connections_exact"].bool(), "{st}");
    assert_eq!(st["tracker"]["insert_failed"].u64(), 2, "{st}");
    assert!(
        warnings(&st).iter().any(|w| w.contains("lower bounds")),
        "{st}"
    );
    let human = drain.run(&["status"]);
    assert!(human.stdout.contains(">= 4"), "{human}");
    assert!(human.stdout.contains("2 insert failed"), "{human}");
    drop(held);
    thread::sleep(Duration::from_millis(500));
    let out = drain.run(&["wait", "--port", &P.to_string(), "--timeout", "5s"]);
    out.expect_code(1);
    assert!(out.stderr.contains("lost events"), "{out}");
}

/// `wait` on a gate whose TTL ran out says so.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn wait_on_an_expired_gate_says_so() {
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    on_veth(&drain, &pair, &["--ttl", "1s"]);
    thread::sleep(Duration::from_millis(1300));
    let out = drain.run(&["wait", "--timeout", "1s"]);
    out.expect_ok();
    assert!(out.stderr.contains("TTL ran out"), "{out}");
}

/// CAP_BPF + CAP_NET_ADMIN without CAP_PERFMON: `gate on` (which loads the tracker) exits 1
/// naming CAP_PERFMON, and changes nothing; with CAP_PERFMON too it works.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn gate_on_needs_cap_perfmon_and_says_so() {
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    let caps = |set: &str| {
        vec![
            "setpriv".to_owned(),
            format!("--bounding-set=-all,{set}"),
            format!("--inh-caps=-all,{set}"),
            format!("--ambient-caps=-all,{set}"),
        ]
    };
    let without = caps("+bpf,+net_admin");
    let w: Vec<&str> = without.iter().map(String::as_str).collect();
    let out = drain.run_via(
        &w,
        &["gate", "on", "--port", "8080", "--iface", &pair.veth_a],
    );
    out.expect_code(1);
    assert!(out.stderr.contains("CAP_PERFMON"), "{out}");
    assert!(!drain.state_dir().exists());
    let mut with = caps("+bpf,+net_admin,+perfmon");
    // Before 5.11 the kernel charges BPF maps to RLIMIT_MEMLOCK (probed: distributions
    // backport), which a process without CAP_SYS_RESOURCE cannot raise: with a small limit
    // (the kernel matrix's guests have 64 KiB) the three capabilities are not enough, and
    // drain-user must say why.
    if memlock_charged() {
        let w: Vec<&str> = with.iter().map(String::as_str).collect();
        let out = drain.run_via(
            &w,
            &["gate", "on", "--port", "8080", "--iface", &pair.veth_a],
        );
        out.expect_code(1);
        assert!(
            out.stderr.contains("RLIMIT_MEMLOCK") && out.stderr.contains("CAP_SYS_RESOURCE"),
            "{out}"
        );
        assert!(!drain.state_dir().exists());
        with.splice(
            0..0,
            ["prlimit".to_owned(), "--memlock=unlimited".to_owned()],
        );
    }
    let w: Vec<&str> = with.iter().map(String::as_str).collect();
    let out = drain.run_via(
        &w,
        &["gate", "on", "--port", "8080", "--iface", &pair.veth_a],
    );
    out.expect_ok();
    assert_eq!(drain.status()["gate"].str(), "on");
}

/// Whether this kernel charges BPF maps to RLIMIT_MEMLOCK (probed: kernels before 5.11 do)
/// and this process's limit is finite.
fn memlock_charged() -> bool {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out pointer.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    assert_eq!(rc, 0, "getrlimit(RLIMIT_MEMLOCK)");
    drain_tests::kernel::maps_charged_to_memlock() && lim.rlim_cur != libc::RLIM_INFINITY
}

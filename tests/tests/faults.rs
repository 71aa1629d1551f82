//! Faults: drain-user killed (SIGKILL) at each step of `gate on`, `gate off` and `wait`
//! (with and without a gate), deterministically: strace injects the signal at the N-th
//! call of a syscall (`strace -f -e inject=bpf:signal=SIGKILL:when=N`), for N = 1, 2, ...
//! until the command runs to the end without meeting it. Syscalls: bpf (every map, program,
//! link, pin and map write), unlink/unlinkat (unpinning), mkdir/mkdirat (state
//! directories) and sendto/recvfrom/sendmsg/recvmsg (netlink and sock_diag). Each test names
//! the groups its command makes calls in: each of those must reach at least one kill point
//! (none reached means strace is not injecting, or the command stopped making such calls),
//! and the others none (a command that starts making them gets them killed too once its
//! test lists them). drain-user renames nothing in these commands, so rename is no group.
//!
//! After every kill, in the test's own namespace: `gate off` exits 0; then nothing of drain
//! is left (no pin directory of the namespace, the gate's or a `wait`'s; no XDP or TCX
//! program on lo or the veth; every bpf_link that was pinned is gone from the kernel), and
//! a new connection from the other namespace is accepted. Then `gate on` must work (it is
//! the next step's set-up, or done explicitly) and its `gate off` leaves nothing either.
//!
//! The CI run (`cargo xtask test`) takes every [`CI_STRIDE`]-th bpf call and every
//! [`CI_STRIDE_SHORT`]-th call of the other groups, plus the last [`CI_TAIL`] of each (the last steps, attach,
//! pin and the switch, are where a half-done change is likeliest), found by a binary search
//! between the last strided kill and the first run that completes; `DRAIN_FAULTS=all` takes
//! every one. Each test prints the kill points it exercised.

use std::{
    fs,
    net::{SocketAddr, TcpListener},
    time::{Duration, Instant},
};

use drain_tests::{
    cli::{gate_links, Drain},
    netns::NetNsPair,
    object::{bpf_link_exists, ingress_qdisc, link_xdp, pinned_link_id, tc_ingress},
    traffic::{accept_pending, bind, connect},
};

/// The gated port, and the one an existing gate holds when `gate on` changes it.
const P: u16 = 8080;
const Q: u16 = 9090;
/// Every this many bpf calls in the CI run.
const CI_STRIDE: usize = 12;
/// The same for the other groups (a dozen calls at most).
const CI_STRIDE_SHORT: usize = 3;
/// In the CI run, the last calls of a group that are killed each (after the stride).
const CI_TAIL: usize = 3;
/// In the CI run, `gate on` is tried after every this many kill points (and after the last
/// ones); otherwise after each.
const CI_GATE_ON_EVERY: usize = 4;

/// Syscall groups (strace syscall lists).
const BPF: &str = "bpf";
const UNLINK: &str = "unlink,unlinkat";
const MKDIR: &str = "mkdir,mkdirat";
const NETLINK: &str = "sendto,recvfrom,sendmsg,recvmsg";

/// Syscall groups to kill at: (group, bpf-like = long).
const GROUPS: &[(&str, bool)] = &[
    (BPF, true),
    (UNLINK, false),
    (MKDIR, false),
    (NETLINK, false),
];

fn every_point() -> bool {
    std::env::var("DRAIN_FAULTS").is_ok_and(|v| v == "all")
}

/// What a series of kills needs before each run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Before {
    /// No gate.
    Nothing,
    /// `gate on --port P`.
    Gate,
    /// `gate on --port Q`, which the command changes.
    OtherGate,
}

struct Fixture<'p> {
    pair: &'p NetNsPair,
    drain: Drain<'p>,
    /// A server in namespace a on P, so "a new connection is accepted" can be asked.
    listener: TcpListener,
    target: SocketAddr,
    /// Ids of every bpf_link seen pinned after a kill: all must be gone at the end.
    link_ids: Vec<(String, u32)>,
    failures: Vec<String>,
    /// `--attach tc` through the clsact qdisc (`Drain::classic`): no link per interface, a
    /// filter and a record instead.
    classic: bool,
}

impl<'p> Fixture<'p> {
    fn new(pair: &'p NetNsPair) -> Self {
        Self::with(pair, Drain::new(pair, &pair.a), false)
    }

    /// Every `gate on` with `--attach tc`, through the clsact qdisc.
    fn classic(pair: &'p NetNsPair) -> Self {
        Self::with(pair, Drain::classic(pair, &pair.a), true)
    }

    fn with(pair: &'p NetNsPair, drain: Drain<'p>, classic: bool) -> Self {
        let target = SocketAddr::new(pair.a_v4.into(), P);
        let listener = bind(pair, &pair.a, target);
        Self {
            pair,
            drain,
            listener,
            target,
            link_ids: Vec::new(),
            failures: Vec::new(),
            classic,
        }
    }

    fn port_args(&self, port: u16) -> Vec<String> {
        let mut v: Vec<String> = ["gate", "on", "--port", &port.to_string()]
            .map(String::from)
            .to_vec();
        if self.classic {
            v.extend(["--attach", "tc"].map(String::from));
        }
        v
    }

    fn setup(&mut self, before: Before) -> Result<(), String> {
        let args = match before {
            Before::Nothing => return Ok(()),
            Before::Gate => self.port_args(P),
            Before::OtherGate => self.port_args(Q),
        };
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.drain.run(&argv);
        if out.code != Some(0) {
            return Err(format!("gate on after the previous kill failed: {out}"));
        }
        Ok(())
    }

    /// Everything drain may have pinned for namespace a, and the link ids among it.
    fn pinned(&self) -> Vec<(String, u32)> {
        let mut ids = Vec::new();
        for dir in self.pair.pin_dirs(&self.pair.a) {
            for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("link-") {
                    let path = dir.join(&name);
                    ids.push((path.display().to_string(), pinned_link_id(&path)));
                }
            }
        }
        ids
    }

    /// The host is back to how it was: `gate off` exits 0 and leaves nothing, and a new
    /// connection is accepted.
    fn restored(&mut self) -> Result<(), String> {
        let ids = self.pinned();
        self.link_ids.extend(ids);
        let off = self.drain.run(&["gate", "off"]);
        if off.code != Some(0) {
            return Err(format!("gate off after the kill: {off}"));
        }
        let left = self.pair.pin_dirs(&self.pair.a);
        if !left.is_empty() {
            let listing: Vec<String> = left
                .iter()
                .map(|d| {
                    let names: Vec<String> = fs::read_dir(d)
                        .into_iter()
                        .flatten()
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect();
                    format!("{} {names:?}", d.display())
                })
                .collect();
            return Err(format!("gate off left pins: {}", listing.join("; ")));
        }
        for dev in ["lo", self.pair.veth_a.as_str()] {
            if let Some(p) = link_xdp(self.pair, &self.pair.a, dev) {
                return Err(format!("gate off left an XDP program on {dev}: {p:?}"));
            }
            let tc = tc_ingress(self.pair, &self.pair.a, dev);
            if !tc.is_empty() {
                return Err(format!("gate off left TC programs on {dev}: {tc:?}"));
            }
            // The fixture's interfaces have no qdisc of their own: one left is drain's.
            if let Some(q) = ingress_qdisc(self.pair, &self.pair.a, dev) {
                return Err(format!("gate off left a {q} qdisc on {dev}"));
            }
        }
        let c = connect(self.pair, &self.pair.b, self.target, Duration::from_secs(3));
        accept_pending(&self.listener);
        if !c.is_ok() {
            return Err(format!(
                "after gate off, a new connection to {} was not accepted: {c:?}",
                self.target
            ));
        }
        Ok(())
    }

    /// Removes whatever a broken kill point left, so the next one starts clean.
    fn force_clean(&self) {
        let _ = self.drain.run(&["gate", "off"]);
        for dir in self.pair.pin_dirs(&self.pair.a) {
            for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
                let _ = fs::remove_file(e.path());
            }
            let _ = fs::remove_dir(&dir);
        }
    }

    /// `gate on` works and its `gate off` leaves nothing.
    fn gate_on_works(&mut self) -> Result<(), String> {
        let args = self.port_args(P);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let on = self.drain.run(&argv);
        if on.code != Some(0) {
            return Err(format!("gate on after the kill: {on}"));
        }
        let links = self.drain.link_pins();
        // A link per interface, except where TC goes through clsact (forced, or a kernel
        // without TCX, where auto picks TC for the veth and lo too): a filter and a record.
        let iface_links = if self.drain.tc_is_clsact() { 0 } else { 2 };
        if links.len() != iface_links + gate_links().len() {
            return Err(format!(
                "gate on after the kill pinned links {links:?}, want lo, the veth and {:?}",
                gate_links()
            ));
        }
        self.restored()
    }

    /// Runs `args` under strace, killed at call `point` of `group`, and checks the host
    /// afterwards. Some(true): killed; Some(false): ran to the end without meeting the
    /// injection; None: the series cannot go on (recorded in `failures`).
    fn kill_at(
        &mut self,
        before: Before,
        args: &[&str],
        group: &str,
        point: usize,
        explicit_gate_on: bool,
    ) -> Option<bool> {
        let what = format!(
            "`drain-user {}` killed at {group} call {point}",
            args.join(" ")
        );
        if let Err(e) = self.setup(before) {
            self.failures.push(format!("{what}: {e}"));
            self.force_clean();
            return None;
        }
        let out = self.drain.run_killed_at(group, point, args);
        // strace ends itself with the signal that ended the tracee: no exit code.
        let killed = match out.code {
            None => true,
            Some(0) => false,
            Some(code) => {
                self.failures
                    .push(format!("{what}: exited {code} without being killed: {out}"));
                self.force_clean();
                return None;
            }
        };
        let checked = self.restored().and_then(|()| {
            if killed && explicit_gate_on {
                self.gate_on_works()
            } else {
                Ok(())
            }
        });
        if let Err(e) = checked {
            let how = if killed { "" } else { " (completed)" };
            self.failures.push(format!("{what}{how}: {e}"));
            self.force_clean();
        }
        Some(killed)
    }

    /// Kills `args` at each kill point of each group; returns what was done per group.
    /// `reaches`: the groups the command makes calls in (each must reach a kill point, the
    /// others none).
    fn series(
        &mut self,
        before: Before,
        args: &[&str],
        explicit_gate_on: bool,
        reaches: &[&str],
    ) -> Vec<String> {
        for g in reaches {
            assert!(
                GROUPS.iter().any(|(h, _)| h == g),
                "{g} is not a syscall group"
            );
        }
        let mut report = Vec::new();
        for &(group, long) in GROUPS {
            let stride = match (every_point(), long) {
                (true, _) => 1,
                (false, true) => CI_STRIDE,
                (false, false) => CI_STRIDE_SHORT,
            };
            let started = Instant::now();
            let full = every_point();
            // Kill points already taken, and whether `gate on` is tried after the next one
            // (CI: every CI_GATE_ON_EVERY-th and the last few; otherwise after each).
            let mut done = std::collections::BTreeSet::new();
            let gate_on_after = |done: &std::collections::BTreeSet<usize>, last: bool| {
                explicit_gate_on && (full || last || done.len().is_multiple_of(CI_GATE_ON_EVERY))
            };
            let mut n = 1;
            // Every stride-th call until the command runs to the end...
            let completed = loop {
                match self.kill_at(before, args, group, n, gate_on_after(&done, false)) {
                    Some(true) => done.insert(n),
                    Some(false) => break Some(n),
                    None => break None,
                };
                n += stride;
            };
            // ...then the last call there is (a binary search between the last point killed
            // and the first that ran to the end), and the few calls before it.
            let mut last_call = done.last().copied().unwrap_or(0);
            if let Some(end) = completed.filter(|_| stride > 1) {
                let mut hi = end;
                while hi - last_call > 1 {
                    let mid = (last_call + hi) / 2;
                    match self.kill_at(before, args, group, mid, false) {
                        Some(true) => {
                            done.insert(mid);
                            last_call = mid;
                        }
                        Some(false) => hi = mid,
                        None => break,
                    }
                }
                for point in last_call.saturating_sub(CI_TAIL - 1).max(1)..=last_call {
                    if !done.contains(&point)
                        && self.kill_at(before, args, group, point, gate_on_after(&done, true))
                            == Some(true)
                    {
                        done.insert(point);
                    }
                }
            }
            let killed = done.len();
            let expected = reaches.contains(&group);
            if expected && killed == 0 {
                self.failures.push(format!(
                    "`drain-user {}`: no kill point reached at {group}: is strace injecting, \
                     or does the command no longer make such calls?",
                    args.join(" ")
                ));
            }
            if !expected && killed > 0 {
                self.failures.push(format!(
                    "`drain-user {}`: {killed} kill points reached at {group}, which its test \
                     does not list: add the group to the test's list",
                    args.join(" ")
                ));
            }
            // The highest call that was killed is the number of calls the command makes.
            let calls = if completed.is_some() {
                last_call.to_string()
            } else {
                "?".to_owned()
            };
            report.push(format!(
                "{group}: {killed} kill points of {calls} calls ({:.1} s)",
                started.elapsed().as_secs_f64()
            ));
        }
        report
    }

    /// Every link that was pinned after a kill is gone (bpffs drops a pin's reference after
    /// an RCU grace period: allow a few seconds), then the failures, if any, fail the test.
    fn finish(mut self, what: &str, report: &[String]) {
        let deadline = Instant::now() + Duration::from_secs(5);
        for (pin, id) in &self.link_ids {
            while bpf_link_exists(*id) {
                if Instant::now() > deadline {
                    self.failures.push(format!(
                        "the link pinned at {pin} (id {id}) still exists 5 s after gate off"
                    ));
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        println!(
            "{what} ({}): {}",
            if every_point() {
                "every kill point"
            } else {
                "CI subset; DRAIN_FAULTS=all for every one"
            },
            report.join(", ")
        );
        assert!(
            self.failures.is_empty(),
            "{what}: {} kill points left the host broken:\n{}",
            self.failures.len(),
            self.failures.join("\n")
        );
    }
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn killed_gate_on_leaves_a_host_gate_off_restores() {
    let pair = NetNsPair::new();
    let mut f = Fixture::new(&pair);
    let report = f.series(
        Before::Nothing,
        &["gate", "on", "--port", &P.to_string()],
        true,
        &[BPF, UNLINK, MKDIR, NETLINK],
    );
    f.finish("gate on", &report);
}

/// The same through the clsact qdisc (`--attach tc` on kernels without TCX, forced here):
/// a kill between the record, the qdisc and the filter leaves nothing `gate off` does not
/// remove, qdisc included.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn killed_classic_gate_on_leaves_a_host_gate_off_restores() {
    let pair = NetNsPair::new();
    let mut f = Fixture::classic(&pair);
    let report = f.series(
        Before::Nothing,
        &["gate", "on", "--port", &P.to_string(), "--attach", "tc"],
        true,
        &[BPF, UNLINK, MKDIR, NETLINK],
    );
    f.finish("gate on --attach tc (clsact)", &report);
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn killed_gate_on_over_an_existing_gate_leaves_a_host_gate_off_restores() {
    let pair = NetNsPair::new();
    let mut f = Fixture::new(&pair);
    let args = [
        "gate",
        "on",
        "--port",
        &P.to_string(),
        "--allow",
        "198.18.0.0/16",
    ];
    let report = f.series(Before::OtherGate, &args, false, &[BPF, MKDIR, NETLINK]);
    f.finish("gate on over an existing gate", &report);
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn killed_gate_off_leaves_a_host_gate_off_restores() {
    let pair = NetNsPair::new();
    let mut f = Fixture::new(&pair);
    // Without TCX the gate's TC attachments (auto's choice on the veth and lo) are clsact
    // filters, which gate off finds and deletes over rtnetlink; TCX links go by bpf(2).
    let mut groups = vec![BPF, UNLINK, MKDIR];
    if f.drain.tc_is_clsact() {
        groups.push(NETLINK);
    }
    let report = f.series(Before::Gate, &["gate", "off"], false, &groups);
    f.finish("gate off", &report);
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn killed_wait_with_a_gate_leaves_a_host_gate_off_restores() {
    let pair = NetNsPair::new();
    let mut f = Fixture::new(&pair);
    let report = f.series(
        Before::Gate,
        &["wait", "--timeout", "5s"],
        false,
        &[BPF, NETLINK],
    );
    f.finish("wait (gate on)", &report);
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn killed_wait_without_a_gate_leaves_a_host_gate_off_restores() {
    let pair = NetNsPair::new();
    let mut f = Fixture::new(&pair);
    let args = ["wait", "--port", &P.to_string(), "--timeout", "100ms"];
    let report = f.series(Before::Nothing, &args, true, &[BPF, UNLINK, MKDIR, NETLINK]);
    f.finish("wait (no gate)", &report);
}

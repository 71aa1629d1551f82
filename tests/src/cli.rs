//! Running drain-user inside a test namespace, and reading what it prints.
//!
//! - [`Drain`]: the CLI run in one namespace of a [`NetNsPair`] (through nsenter, so pins
//!   persist between calls), with a deadline on every call and the exit code asserted
//!   exactly ([`CliOutput::expect_code`]); dropping it runs `gate off` there, so a failing
//!   test leaves no gate, pins or attached program. It also opens the gate's pinned maps.
//! - [`Running`]: a call still running (`wait`, concurrent `gate on`s), its output lines
//!   collected with their arrival times; killed when dropped.
//! - [`Json`], [`JsonExt`], [`assert_status_schema`], [`port_status`], [`gated_ports`],
//!   [`iface_status`]: `status --json` (and `wait --json`) output.

use std::{
    fmt,
    io::{self, BufRead, BufReader, Read},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use aya::maps::MapData;

use crate::netns::NetNsPair;

/// `status --json` and `wait --json` output.
pub use serde_json::Value as Json;

/// A `run_via` wrapper that runs drain-user as nobody, with no capabilities.
pub const NOBODY: &[&str] = &[
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--inh-caps=-all",
];

/// Longest a single CLI call may take before the test fails (it takes the per-namespace
/// lock, so a hung call would otherwise hang every later one).
pub fn cli_deadline() -> Duration {
    Duration::from_secs(30) * slowdown()
}

/// How much slower than the host this run is: under emulation (`cargo xtask vmtest` with
/// TCG) everything runs 10-30x slower, and the kernel matrix's runner sets
/// DRAIN_TEST_SLOWDOWN to scale the harness's waits; 1 elsewhere.
pub fn slowdown() -> u32 {
    std::env::var("DRAIN_TEST_SLOWDOWN")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1)
}

// ---------------------------------------------------------------------------------------
// Running the CLI
// ---------------------------------------------------------------------------------------

/// What one drain-user call did.
#[derive(Debug)]
pub struct CliOutput {
    /// The command line, for messages.
    pub line: String,
    /// Exit code; None when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// When the process was seen to have exited (polled every 2 ms).
    pub exited: Instant,
}

impl CliOutput {
    /// Panics unless the call exited with `want`; returns self for chaining.
    #[track_caller]
    pub fn expect_code(&self, want: i32) -> &Self {
        assert_eq!(self.code, Some(want), "expected exit {want}: {self}");
        self
    }

    /// Panics unless the call exited 0.
    #[track_caller]
    pub fn expect_ok(&self) -> &Self {
        self.expect_code(0)
    }

    /// The non-empty lines of stderr.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }
}

impl fmt::Display for CliOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` exited with {:?}\n--- stdout:\n{}--- stderr:\n{}---",
            self.line, self.code, self.stdout, self.stderr
        )
    }
}

/// One line a running call printed: when it arrived, whether on stdout, and the text
/// (with its newline, if it had one).
type Chunk = (Instant, bool, String);

/// A drain-user call still running. Its output is read line by line as it comes; dropping
/// it kills the process if it still runs.
pub struct Running {
    line: String,
    child: Child,
    lines: mpsc::Receiver<Chunk>,
    seen: Vec<Chunk>,
    started: Instant,
}

impl Running {
    fn start(mut cmd: Command, line: String) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting `{line}`: {e}"));
        let (tx, rx) = mpsc::channel();
        let out: Box<dyn Read + Send> = Box::new(child.stdout.take().expect("piped stdout"));
        let err: Box<dyn Read + Send> = Box::new(child.stderr.take().expect("piped stderr"));
        for (is_stdout, r) in [(true, out), (false, err)] {
            let tx = tx.clone();
            thread::spawn(move || {
                let mut r = BufReader::new(r);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match r.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {
                            let text = String::from_utf8_lossy(&buf).into_owned();
                            if tx.send((Instant::now(), is_stdout, text)).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
        Self {
            line,
            child,
            lines: rx,
            seen: Vec::new(),
            started: Instant::now(),
        }
    }

    /// Waits until the call prints a line containing `needle` (on stdout or stderr);
    /// returns when that line arrived. Panics, with everything printed so far, after
    /// `timeout`.
    #[track_caller]
    pub fn expect_line(&mut self, needle: &str, timeout: Duration) -> Instant {
        if let Some((t, _, _)) = self.seen.iter().find(|(_, _, l)| l.contains(needle)) {
            return *t;
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(chunk) => {
                    let (t, hit) = (chunk.0, chunk.2.contains(needle));
                    self.seen.push(chunk);
                    if hit {
                        return t;
                    }
                }
                Err(_) => panic!(
                    "`{}` printed no line with {needle:?} within {timeout:?}; so far: {:#?}",
                    self.line, self.seen
                ),
            }
        }
    }

    /// The process id (for signals).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// What the call printed so far (for messages).
    pub fn seen(&self) -> Vec<&str> {
        self.seen.iter().map(|(_, _, l)| l.trim_end()).collect()
    }

    /// Waits for the call to end; kills it and panics [`cli_deadline`] after it started.
    #[track_caller]
    pub fn wait(self) -> CliOutput {
        let deadline = self.started + cli_deadline();
        self.wait_until(deadline)
    }

    /// Waits for the call to end; kills it and panics after `limit` from now.
    #[track_caller]
    pub fn wait_for(self, limit: Duration) -> CliOutput {
        self.wait_until(Instant::now() + limit)
    }

    #[track_caller]
    fn wait_until(mut self, deadline: Instant) -> CliOutput {
        self.try_wait_until(deadline)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits for the call to end; at `deadline` kills it and says so (no panic: usable
    /// from Drop while unwinding).
    fn try_wait_until(&mut self, deadline: Instant) -> Result<CliOutput, String> {
        let (status, exited) = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break (s, Instant::now()),
                Ok(None) => {}
                Err(e) => return Err(format!("waiting for `{}`: {e}", self.line)),
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(format!(
                    "`{}` still running {:?} after it started: killed; it printed {:#?}",
                    self.line,
                    self.started.elapsed(),
                    self.seen()
                ));
            }
            thread::sleep(Duration::from_millis(2));
        };
        // The readers end at EOF, right after the exit (bounded, in case something the
        // process started still holds the pipes).
        while let Ok(chunk) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(chunk);
        }
        let pick = |want: bool| -> String {
            self.seen
                .iter()
                .filter(|(_, s, _)| *s == want)
                .map(|(_, _, l)| l.as_str())
                .collect()
        };
        Ok(CliOutput {
            line: self.line.clone(),
            code: status.code(),
            stdout: pick(true),
            stderr: pick(false),
            exited,
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A test that panicked with the call still running must not leave it behind.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `drain-user args...` (the workspace's build) in the test's own namespaces, without
/// nsenter: for calls that pick their namespace themselves (`--netns`, `--pid`,
/// `--container`). At most [`cli_deadline`].
#[track_caller]
pub fn run_here(args: &[&str]) -> CliOutput {
    crate::require_root();
    crate::object::ensure_bpffs();
    let mut cmd = Command::new(crate::drain_user_bin());
    cmd.args(args);
    Running::start(cmd, format!("drain-user {}", args.join(" "))).wait()
}

/// [`run_here`] with environment variables set for the call (e.g. `DOCKER_HOST`, which
/// `--container` passes on to the runtime's CLI).
#[track_caller]
pub fn run_here_env(env: &[(&str, &str)], args: &[&str]) -> CliOutput {
    crate::require_root();
    crate::object::ensure_bpffs();
    let mut cmd = Command::new(crate::drain_user_bin());
    cmd.args(args).envs(env.iter().copied());
    Running::start(cmd, format!("drain-user {}", args.join(" "))).wait()
}

/// Starts `drain-user args...` in the test's own namespaces without waiting (see
/// [`run_here`]).
pub fn spawn_here(args: &[&str]) -> Running {
    crate::require_root();
    let mut cmd = Command::new(crate::drain_user_bin());
    cmd.args(args);
    Running::start(cmd, format!("drain-user {}", args.join(" ")))
}

/// Runs `drain-user args...` in the namespace named `ns` (under /var/run/netns, any, not
/// only a pair's) through nsenter, as an operator without `--netns` would.
#[track_caller]
pub fn run_in(ns: &str, args: &[&str]) -> CliOutput {
    spawn_in(ns, args).wait()
}

/// Starts `drain-user args...` in namespace `ns` (see [`run_in`]) without waiting.
pub fn spawn_in(ns: &str, args: &[&str]) -> Running {
    crate::require_root();
    crate::object::ensure_bpffs();
    let mut cmd = crate::netns::nsenter(ns, &crate::drain_user_bin().to_string_lossy());
    cmd.args(args);
    Running::start(cmd, format!("drain-user {} (in {ns})", args.join(" ")))
}

/// The links every gate pins besides one per interface, sorted: the RST counter (one
/// tracepoint link, or two fentry links on kernels before 6.10: drain_user's
/// `gate::RstCounter`), the namespace-wide refusal (sk_lookup) and the connection tracker.
pub fn gate_links() -> Vec<&'static str> {
    let counter = drain_user::gate::RstCounter::current(&drain_user::btf::Kernel::default())
        .expect("the kernel's BTF");
    let mut v: Vec<&'static str> = counter
        .links()
        .iter()
        .map(|(pin, _, _)| match pin.to_string().as_str() {
            "link-rst" => "link-rst",
            "link-rst6" => "link-rst6",
            other => panic!("unexpected RST counter pin {other}"),
        })
        .collect();
    v.extend(["link-sklookup", "link-track"]);
    v.sort();
    v
}

/// drain-user run in one namespace of a pair. Dropping it runs `gate off` there (errors
/// printed, never raised), so a failing test leaves no gate, pins or attached program;
/// the pair's own drop then deletes the namespaces (declare it after the pair).
pub struct Drain<'p> {
    pub pair: &'p NetNsPair,
    pub ns: String,
    /// The binary under test.
    bin: PathBuf,
    /// Environment every call gets (see [`Drain::classic`]).
    env: Vec<(&'static str, &'static str)>,
}

impl<'p> Drain<'p> {
    /// The workspace's build ([`crate::drain_user_bin`]).
    pub fn new(pair: &'p NetNsPair, ns: &str) -> Self {
        // Fails early with a build hint when the binary is missing.
        Self::with_bin(pair, ns, crate::drain_user_bin())
    }

    /// Another drain-user binary (the one a package installed).
    pub fn with_bin(pair: &'p NetNsPair, ns: &str, bin: PathBuf) -> Self {
        crate::require_root();
        crate::object::ensure_bpffs();
        let ns = ns.to_owned();
        // Catches a namespace that is not the pair's before anything runs in it.
        let _ = pair.netns_inode(&ns);
        Self {
            pair,
            ns,
            bin,
            env: Vec::new(),
        }
    }

    /// The workspace's build, behaving as on a kernel without TCX
    /// (`drain_user::clsact::NO_TCX_ENV`): `--attach tc` takes the classic clsact path, so
    /// this kernel's suite covers the path of kernels before 6.6.
    pub fn classic(pair: &'p NetNsPair, ns: &str) -> Self {
        let mut d = Self::new(pair, ns);
        d.env.push((drain_user::clsact::NO_TCX_ENV, "1"));
        d
    }

    /// True when `--attach tc` goes through the clsact qdisc for this runner: forced by
    /// [`Drain::classic`], or because the kernel has no TCX.
    pub fn tc_is_clsact(&self) -> bool {
        !self.env.is_empty() || !crate::kernel::has(crate::kernel::Feature::Tcx)
    }

    /// `nsenter --net=<ns> [wrapper...] drain-user args...`: wrapper is e.g. setpriv with
    /// its options (it runs inside the namespace, before drain-user).
    fn command_via(&self, wrapper: &[&str], args: &[&str]) -> (Command, String) {
        let bin = &self.bin;
        let mut cmd = match wrapper.split_first() {
            Some((prog, rest)) => {
                let mut c = self.pair.cmd(&self.ns, prog);
                c.args(rest).arg(bin);
                c
            }
            None => self.pair.cmd(&self.ns, &bin.to_string_lossy()),
        };
        cmd.args(args);
        cmd.envs(self.env.iter().copied());
        let mut line = wrapper.join(" ");
        if !line.is_empty() {
            line.push(' ');
        }
        for (k, v) in &self.env {
            line.push_str(&format!("{k}={v} "));
        }
        line.push_str(&format!("drain-user {} (in {})", args.join(" "), self.ns));
        (cmd, line)
    }

    /// Starts `drain-user args...` without waiting.
    pub fn spawn(&self, args: &[&str]) -> Running {
        let (cmd, line) = self.command_via(&[], args);
        Running::start(cmd, line)
    }

    /// Starts drain-user behind `wrapper` (e.g. `env VAR=...`) without waiting.
    pub fn spawn_via(&self, wrapper: &[&str], args: &[&str]) -> Running {
        let (cmd, line) = self.command_via(wrapper, args);
        Running::start(cmd, line)
    }

    /// Runs `drain-user args...` to the end (at most [`cli_deadline`]).
    #[track_caller]
    pub fn run(&self, args: &[&str]) -> CliOutput {
        self.spawn(args).wait()
    }

    /// Runs drain-user behind `wrapper` (e.g. setpriv dropping privileges).
    #[track_caller]
    pub fn run_via(&self, wrapper: &[&str], args: &[&str]) -> CliOutput {
        let (cmd, line) = self.command_via(wrapper, args);
        Running::start(cmd, line).wait()
    }

    /// drain-user `args` under strace, killed with SIGKILL at the `point`-th call of the
    /// syscalls in `group` (e.g. `bpf`, `unlink,unlinkat`): a crash at a chosen step,
    /// deterministic where a timed kill would not be. strace ends with the tracee's signal,
    /// so a killed run has no exit code.
    pub fn run_killed_at(&self, group: &str, point: usize, args: &[&str]) -> CliOutput {
        let trace = format!("trace={group}");
        let inject = format!("inject={group}:signal=SIGKILL:when={point}");
        let wrapper = [
            "strace",
            "-f",
            "-qq",
            "-o",
            "/dev/null",
            "-e",
            &trace,
            "-e",
            &inject,
        ];
        self.run_via(&wrapper, args)
    }

    /// `gate on <args>`, which must exit 0.
    #[track_caller]
    pub fn on(&self, args: &[&str]) -> CliOutput {
        let mut all = vec!["gate", "on"];
        all.extend_from_slice(args);
        let out = self.run(&all);
        out.expect_ok();
        out
    }

    /// `gate off`, which must exit 0.
    #[track_caller]
    pub fn off(&self) -> CliOutput {
        let out = self.run(&["gate", "off"]);
        out.expect_ok();
        out
    }

    /// `status --json`, which must exit 0 and print one JSON object with the documented
    /// keys (checked by [`assert_status_schema`]).
    #[track_caller]
    pub fn status(&self) -> Json {
        let out = self.run(&["status", "--json"]);
        out.expect_ok();
        let json = serde_json::from_str::<Json>(out.stdout.trim())
            .unwrap_or_else(|e| panic!("status --json printed invalid JSON ({e}): {out}"));
        assert_status_schema(&json);
        json
    }

    /// /sys/fs/bpf/drain/<inode>-<cookie> of this namespace: where the gate pins its state.
    pub fn state_dir(&self) -> PathBuf {
        self.pair.state_dir(&self.ns)
    }

    /// The gate's pinned map `name` (a drain_common::map constant), opened from its pin.
    pub fn map(&self, name: &str) -> MapData {
        let pin = self.state_dir().join(name);
        MapData::from_pin(&pin)
            .unwrap_or_else(|e| panic!("opening {}: {e}: is the gate on?", pin.display()))
    }

    /// Names in the state directory, sorted; empty when it does not exist.
    pub fn pins(&self) -> Vec<String> {
        let mut names: Vec<String> = match std::fs::read_dir(self.state_dir()) {
            Ok(rd) => rd
                .map(|e| e.expect("reading the state dir").file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => vec![],
            Err(e) => panic!("listing {}: {e}", self.state_dir().display()),
        };
        names.sort();
        names
    }

    /// The link pins (`link-xdp-N`, `link-tc-N` and the [`gate_links`]), sorted.
    pub fn link_pins(&self) -> Vec<String> {
        self.pins()
            .into_iter()
            .filter(|n| n.starts_with("link-"))
            .collect()
    }

    /// Index of interface `name` in this namespace.
    pub fn ifindex(&self, name: &str) -> u32 {
        self.pair.ifindex(&self.ns, name)
    }

    /// Runs `program args...` in this namespace and returns its stdout (see
    /// [`NetNsPair::sh`]).
    #[track_caller]
    pub fn sh(&self, program: &str, args: &[&str]) -> String {
        self.pair.sh(&self.ns, program, args)
    }
}

impl Drop for Drain<'_> {
    fn drop(&mut self) {
        // Runs while unwinding from a failed assertion too: report, never panic.
        let (cmd, line) = self.command_via(&[], &["gate", "off"]);
        let mut off = Running::start(cmd, line);
        match off.try_wait_until(Instant::now() + cli_deadline()) {
            Ok(out) if out.code == Some(0) => {}
            Ok(out) => eprintln!("cleanup: {out}"),
            Err(e) => eprintln!("cleanup: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// What the CLI prints
// ---------------------------------------------------------------------------------------

/// Accessors for a JSON value that panic, naming the value, when it has another type:
/// what a test wants.
pub trait JsonExt {
    fn u64(&self) -> u64;
    fn i64(&self) -> i64;
    fn bool(&self) -> bool;
    fn str(&self) -> &str;
    fn arr(&self) -> &[Json];
}

impl JsonExt for Json {
    #[track_caller]
    fn u64(&self) -> u64 {
        self.as_u64().unwrap_or_else(|| panic!("not a u64: {self}"))
    }

    #[track_caller]
    fn i64(&self) -> i64 {
        self.as_i64()
            .unwrap_or_else(|| panic!("not an i64: {self}"))
    }

    #[track_caller]
    fn bool(&self) -> bool {
        self.as_bool()
            .unwrap_or_else(|| panic!("not a bool: {self}"))
    }

    #[track_caller]
    fn str(&self) -> &str {
        self.as_str()
            .unwrap_or_else(|| panic!("not a string: {self}"))
    }

    #[track_caller]
    fn arr(&self) -> &[Json] {
        self.as_array()
            .map(Vec::as_slice)
            .unwrap_or_else(|| panic!("not an array: {self}"))
    }
}

/// Asserts that a `status --json` object has every documented key with the documented
/// type (extra keys are allowed: additions are not breaking).
#[track_caller]
pub fn assert_status_schema(st: &Json) {
    let ctx = || format!("status --json: {st}");
    assert!(
        matches!(st["gate"].as_str(), Some("on" | "off")),
        "gate must be \"on\" or \"off\": {}",
        ctx()
    );
    assert!(st["expired"].as_bool().is_some(), "expired: {}", ctx());
    assert!(
        st["ttl_remaining_ms"].is_null() || st["ttl_remaining_ms"].as_u64().is_some(),
        "ttl_remaining_ms must be a number or null: {}",
        ctx()
    );
    for key in ["ttl_ms", "rst_rate"] {
        assert!(
            st[key].is_null() || st[key].as_u64().is_some(),
            "{key} must be a number or null: {}",
            ctx()
        );
    }
    let ifaces = st["interfaces"].as_array().unwrap_or_else(|| {
        panic!("interfaces must be an array: {}", ctx());
    });
    for i in ifaces {
        assert!(i["name"].as_str().is_some(), "interface name: {}", ctx());
        assert!(
            i["ifindex"].as_u64().is_some(),
            "interface ifindex: {}",
            ctx()
        );
        assert!(
            matches!(i["attach"].as_str(), Some("xdp" | "tc")),
            "interface attach: {}",
            ctx()
        );
        assert!(
            i["mode"].is_null() || matches!(i["mode"].as_str(), Some("native" | "generic")),
            "interface mode: {}",
            ctx()
        );
        // Which TC attachment: for tc only, and always said.
        match i["attach"].as_str() {
            Some("tc") => assert!(
                matches!(i["tc_mode"].as_str(), Some("tcx" | "clsact")),
                "interface tc_mode: {}",
                ctx()
            ),
            _ => assert!(i["tc_mode"].is_null(), "tc_mode is for tc: {}", ctx()),
        }
        let others = i["others"].as_array().unwrap_or_else(|| {
            panic!("interface others must be an array: {}", ctx());
        });
        assert!(others.iter().all(|o| o.as_str().is_some()), "{}", ctx());
        // Why the hook: what --attach asked and the reason, both or neither (a gate with
        // no record of it).
        assert!(
            i["requested"].is_null()
                || matches!(i["requested"].as_str(), Some("auto" | "xdp" | "tc")),
            "interface requested: {}",
            ctx()
        );
        assert_eq!(
            i["requested"].is_null(),
            i["reason"].as_str().is_none(),
            "interface requested and reason: {}",
            ctx()
        );
    }
    assert!(st["sk_lookup"].as_bool().is_some(), "sk_lookup: {}", ctx());
    let ungated = st["ungated"].as_array().unwrap_or_else(|| {
        panic!("ungated must be an array: {}", ctx());
    });
    for u in ungated {
        assert!(u["name"].as_str().is_some(), "ungated name: {}", ctx());
        assert!(
            u["ifindex"].as_u64().is_some(),
            "ungated ifindex: {}",
            ctx()
        );
    }
    let ports = st["ports"].as_array().unwrap_or_else(|| {
        panic!("ports must be an array: {}", ctx());
    });
    for p in ports {
        let port = p["port"].as_u64();
        assert!(
            matches!(port, Some(1..=65535)),
            "port must be 1..=65535: {}",
            ctx()
        );
        assert!(p["live_connections"].as_i64().is_some(), "{}", ctx());
        let counted_in = p["counted_in"].as_array().unwrap_or_else(|| {
            panic!("ports[].counted_in must be an array: {}", ctx());
        });
        assert!(
            counted_in.iter().any(|c| c["where"] == "local"),
            "ports[].counted_in names the gate's own namespace: {}",
            ctx()
        );
        for c in counted_in {
            assert!(
                matches!(c["where"].as_str(), Some("local" | "netns"))
                    && c["port"].as_u64().is_some()
                    && (c["where"] == "local" || c["netns_inode"].as_u64().is_some()),
                "ports[].counted_in entry: {}",
                ctx()
            );
        }
        assert!(
            p["forwarded_connections"].as_u64().is_some(),
            "ports[].forwarded_connections: {}",
            ctx()
        );
        for k in drain_common::PortStats::COUNTERS.iter().map(|c| c.key) {
            assert!(p[k].as_u64().is_some(), "ports[].{k}: {}", ctx());
        }
    }
    let allow = st["allow"].as_array().unwrap_or_else(|| {
        panic!("allow must be an array: {}", ctx());
    });
    assert!(allow.iter().all(|a| a.as_str().is_some()), "{}", ctx());
}

/// The entry of `status["ports"]` for `port`, if gated.
pub fn port_status(st: &Json, port: u16) -> Option<&Json> {
    st["ports"]
        .as_array()?
        .iter()
        .find(|p| p["port"].as_u64() == Some(port.into()))
}

/// The gated port numbers in a status object, sorted.
pub fn gated_ports(st: &Json) -> Vec<u16> {
    let mut v: Vec<u16> = st["ports"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["port"].as_u64())
                .map(|p| p as u16)
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// The entry of `status["interfaces"]` named `name`.
pub fn iface_status<'j>(st: &'j Json, name: &str) -> Option<&'j Json> {
    st["interfaces"]
        .as_array()?
        .iter()
        .find(|i| i["name"].as_str() == Some(name))
}

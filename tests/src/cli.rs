//! Running drain-user inside a test namespace, and the sockets the gate CLI tests use.
//!
//! - [`Drain`]: the CLI run in one namespace of a [`NetNsPair`] (through nsenter, so pins
//!   persist between calls), with a deadline per call; dropping it runs `gate off` there.
//! - [`EchoServer`], [`connect`], [`probe_all`], [`listen`], [`tcp_pair`], [`transfer`]: real
//!   TCP in the namespaces, with the outcome of a connect spelled out (ok, refused, timed
//!   out).
//! - [`Json`]: `status --json` parsed with serde_json.
//! - [`ForeignXdp`]: a two-instruction XDP program that is not drain's, loaded with the raw
//!   bpf(2) syscall, to stand for "another tool's program" on an interface.
//! - [`link_xdp`], [`tcx_ingress`], [`bpftool`], [`bpf_link_exists`], [`pinned_link_id`]: what
//!   the kernel says is attached.

use std::{
    ffi::CString,
    fmt,
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::netns::NetNsPair;

/// `status --json` output.
pub use serde_json::Value as Json;

/// Longest a single CLI call may take before the test fails (it takes the per-namespace
/// lock, so a hung call would otherwise hang every later one).
const CLI_DEADLINE: Duration = Duration::from_secs(30);

/// How long a data transfer may stall before the test fails.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Where Debian puts bpftool (not on root's PATH under every shell).
pub const BPFTOOL: &str = "/usr/sbin/bpftool";

// ---------------------------------------------------------------------------------------
// Running the CLI
// ---------------------------------------------------------------------------------------

/// What one drain-user call did.
#[derive(Debug)]
pub struct CliOutput {
    /// The command line, for messages.
    pub line: String,
    /// Exit code; None when killed by a signal (or by the deadline).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
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

/// A drain-user call still running (for starting several at once).
pub struct Running {
    line: String,
    child: Child,
    out: JoinHandle<String>,
    err: JoinHandle<String>,
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
        let drain = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = r.read_to_string(&mut s);
                s
            })
        };
        let out = drain(Box::new(child.stdout.take().expect("piped stdout")));
        let err = drain(Box::new(child.stderr.take().expect("piped stderr")));
        Self {
            line,
            child,
            out,
            err,
            started: Instant::now(),
        }
    }

    /// Waits for the call to end; kills it and panics after [`CLI_DEADLINE`].
    pub fn wait(self) -> CliOutput {
        self.wait_or_kill().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits for the call to end; after [`CLI_DEADLINE`] kills it and says so (no panic:
    /// usable from Drop while unwinding).
    pub fn wait_or_kill(mut self) -> Result<CliOutput, String> {
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) => {}
                Err(e) => return Err(format!("waiting for `{}`: {e}", self.line)),
            }
            if self.started.elapsed() > CLI_DEADLINE {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(format!(
                    "`{}` still running after {CLI_DEADLINE:?}: killed",
                    self.line
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        Ok(CliOutput {
            line: self.line,
            code: status.code(),
            stdout: self.out.join().unwrap_or_default(),
            stderr: self.err.join().unwrap_or_default(),
        })
    }
}

/// drain-user run in one namespace of a pair. Dropping it runs `gate off` there (errors
/// printed, never raised), so a failing test leaves no gate, pins or attached program;
/// the pair's own drop then deletes the namespaces.
pub struct Drain<'p> {
    pub pair: &'p NetNsPair,
    pub ns: String,
}

impl<'p> Drain<'p> {
    pub fn new(pair: &'p NetNsPair, ns: &str) -> Self {
        crate::require_root();
        crate::object::ensure_bpffs();
        // Fails early with a build hint when the binary is missing.
        let _ = crate::drain_user_bin();
        let ns = ns.to_owned();
        // Catches a namespace that is not the pair's before anything runs in it.
        let _ = pair.netns_inode(&ns);
        Self { pair, ns }
    }

    /// `nsenter --net=<ns> [wrapper...] drain-user args...`: wrapper is e.g. setpriv with
    /// its options (it runs inside the namespace, before drain-user).
    pub fn command_via(&self, wrapper: &[&str], args: &[&str]) -> (Command, String) {
        let bin = crate::drain_user_bin();
        let mut cmd = match wrapper.split_first() {
            Some((prog, rest)) => {
                let mut c = self.pair.cmd(&self.ns, prog);
                c.args(rest).arg(&bin);
                c
            }
            None => self.pair.cmd(&self.ns, &bin.to_string_lossy()),
        };
        cmd.args(args);
        let mut line = wrapper.join(" ");
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(&format!("drain-user {} (in {})", args.join(" "), self.ns));
        (cmd, line)
    }

    /// Starts `drain-user args...` without waiting.
    pub fn spawn(&self, args: &[&str]) -> Running {
        let (cmd, line) = self.command_via(&[], args);
        Running::start(cmd, line)
    }

    /// Runs `drain-user args...` to the end.
    pub fn run(&self, args: &[&str]) -> CliOutput {
        self.spawn(args).wait()
    }

    /// Runs drain-user behind `wrapper` (e.g. setpriv dropping privileges).
    pub fn run_via(&self, wrapper: &[&str], args: &[&str]) -> CliOutput {
        let (cmd, line) = self.command_via(wrapper, args);
        Running::start(cmd, line).wait()
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
        self.pair.drain_state_dir(&self.ns)
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

    /// The link pins (`link-xdp-N`, `link-tc-N`, `link-track`), sorted.
    pub fn link_pins(&self) -> Vec<String> {
        self.pins()
            .into_iter()
            .filter(|n| n.starts_with("link-"))
            .collect()
    }

    /// Index of interface `name` in this namespace.
    pub fn ifindex(&self, name: &str) -> u32 {
        ifindex(self.pair, &self.ns, name)
    }

    /// Runs `program args...` in this namespace (nsenter --net) and returns its stdout;
    /// panics when it fails.
    pub fn sh(&self, program: &str, args: &[&str]) -> String {
        let out = self
            .pair
            .cmd(&self.ns, program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {program} {}: {e}", args.join(" ")));
        assert!(
            out.status.success(),
            "{program} {} in {} failed ({}): {}",
            args.join(" "),
            self.ns,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Drain<'_> {
    fn drop(&mut self) {
        // Runs while unwinding from a failed assertion too: report, never panic.
        let (cmd, line) = self.command_via(&[], &["gate", "off"]);
        match Running::start(cmd, line).wait_or_kill() {
            Ok(out) if out.code == Some(0) => {}
            Ok(out) => eprintln!("cleanup: {out}"),
            Err(e) => eprintln!("cleanup: {e}"),
        }
    }
}

/// Index of interface `name` in namespace `ns` (if_nametoindex on a thread inside it).
pub fn ifindex(pair: &NetNsPair, ns: &str, name: &str) -> u32 {
    let c = CString::new(name).expect("interface name without NUL");
    // SAFETY: a valid NUL-terminated string.
    let idx = pair.in_ns(ns, || unsafe { libc::if_nametoindex(c.as_ptr()) });
    assert!(idx != 0, "no interface {name} in {ns}");
    idx
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
        let others = i["others"].as_array().unwrap_or_else(|| {
            panic!("interface others must be an array: {}", ctx());
        });
        assert!(others.iter().all(|o| o.as_str().is_some()), "{}", ctx());
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
        for k in [
            "syns_refused",
            "syns_passed",
            "syns_allowed",
            "syns_expired",
        ] {
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

// ---------------------------------------------------------------------------------------
// What the kernel says is attached
// ---------------------------------------------------------------------------------------

/// The XDP program on `dev` in `ns` as `ip -d link show` reports it: (id, name).
pub fn link_xdp(pair: &NetNsPair, ns: &str, dev: &str) -> Option<(u32, String)> {
    let out = pair
        .cmd(ns, "ip")
        .args(["-d", "link", "show", "dev", dev])
        .output()
        .expect("running ip -d link show");
    assert!(out.status.success(), "ip -d link show dev {dev}: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    // "    prog/xdp id 228 name drain_xdp tag ... "
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("prog/xdp"))?;
    let mut words = line.split_whitespace();
    let mut id = None;
    let mut name = String::new();
    while let Some(w) = words.next() {
        match w {
            "id" => id = words.next().and_then(|v| v.parse().ok()),
            "name" => name = words.next().unwrap_or_default().to_owned(),
            _ => {}
        }
    }
    Some((id.expect("prog/xdp line with an id"), name))
}

/// `bpftool args...` run inside `ns`; None when bpftool is not installed.
pub fn bpftool(pair: &NetNsPair, ns: &str, args: &[&str]) -> Option<String> {
    if !Path::new(BPFTOOL).exists() {
        eprintln!("note: {BPFTOOL} not installed: skipping the bpftool cross-check");
        return None;
    }
    let out = pair
        .cmd(ns, BPFTOOL)
        .args(args)
        .output()
        .expect("running bpftool");
    assert!(
        out.status.success(),
        "bpftool {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An fd of the bpf_link pinned at `pin` (BPF_OBJ_GET): a reference that keeps the link
/// alive, as bpftool or an inventory agent holding it would.
pub fn open_pinned_link(pin: &Path) -> OwnedFd {
    bpf_obj_get(pin).unwrap_or_else(|e| panic!("opening pin {}: {e}", pin.display()))
}

/// Id of the bpf_link pinned at `pin` (BPF_OBJ_GET, then BPF_OBJ_GET_INFO_BY_FD).
pub fn pinned_link_id(pin: &Path) -> u32 {
    let fd = open_pinned_link(pin);
    // struct bpf_link_info { __u32 type; __u32 id; __u32 prog_id; ... }
    let mut info = [0u32; 64];
    bpf_obj_info(&fd, &mut info).unwrap_or_else(|e| panic!("link info: {e}"));
    info[1]
}

/// True while a bpf_link with this id exists anywhere (BPF_LINK_GET_FD_BY_ID).
pub fn bpf_link_exists(id: u32) -> bool {
    // union bpf_attr, get-by-id form: { __u32 link_id; __u32 next_id; __u32 open_flags; }
    let mut attr = [0u64; 16];
    attr[0] = u64::from(id);
    const BPF_LINK_GET_FD_BY_ID: u32 = 30;
    match bpf(BPF_LINK_GET_FD_BY_ID, &mut attr) {
        Ok(fd) => {
            drop(fd);
            true
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => false,
        Err(e) => panic!("BPF_LINK_GET_FD_BY_ID {id}: {e}"),
    }
}

/// The programs in the TCX ingress chain of `dev` in `ns`, in order: (id, name). Asked of
/// the kernel (BPF_PROG_QUERY, BPF_TCX_INGRESS) on a thread inside the namespace, since
/// Debian's bpftool 7.1 predates TCX and does not list it.
pub fn tcx_ingress(pair: &NetNsPair, ns: &str, dev: &str) -> Vec<(u32, String)> {
    let index = ifindex(pair, ns, dev);
    let ids = pair.in_ns(ns, || {
        let mut ids = [0u32; 64];
        // union bpf_attr, BPF_PROG_QUERY form: 0 target_ifindex, 4 attach_type,
        // 8 query_flags, 12 attach_flags, 16 prog_ids, 24 prog_cnt (in: room, out: count).
        let mut attr = [0u64; 16];
        const BPF_TCX_INGRESS: u64 = 46;
        attr[0] = u64::from(index) | (BPF_TCX_INGRESS << 32);
        attr[2] = ids.as_mut_ptr() as u64;
        attr[3] = ids.len() as u64;
        const BPF_PROG_QUERY: u32 = 16;
        bpf_raw(BPF_PROG_QUERY, &mut attr)
            .unwrap_or_else(|e| panic!("BPF_PROG_QUERY tcx ingress of {dev} in {ns}: {e}"));
        let n = (attr[3] & 0xffff_ffff) as usize;
        ids[..n.min(ids.len())].to_vec()
    });
    ids.into_iter().map(|id| (id, prog_name(id))).collect()
}

/// Name of the loaded program with this id (BPF_PROG_GET_FD_BY_ID, then its info:
/// struct bpf_prog_info has `char name[16]` at byte 64).
pub fn prog_name(id: u32) -> String {
    let mut attr = [0u64; 16];
    attr[0] = u64::from(id);
    const BPF_PROG_GET_FD_BY_ID: u32 = 13;
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)
        .unwrap_or_else(|e| panic!("BPF_PROG_GET_FD_BY_ID {id}: {e}"));
    let mut info = [0u32; 64];
    bpf_obj_info(&fd, &mut info).unwrap_or_else(|e| panic!("info of program {id}: {e}"));
    let bytes: Vec<u8> = info[16..20].iter().flat_map(|w| w.to_le_bytes()).collect();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// bpf(2) with a zero-padded bpf_attr; returns the syscall's non-negative result.
fn bpf_raw(cmd: u32, attr: &mut [u64; 16]) -> io::Result<i64> {
    // SAFETY: attr is a zero-padded bpf_attr of the size passed; the kernel writes only
    // within it, and pointers stored in it outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// bpf(2) for the commands that return a new fd.
fn bpf(cmd: u32, attr: &mut [u64; 16]) -> io::Result<OwnedFd> {
    let fd = bpf_raw(cmd, attr)?;
    // SAFETY: the commands passed here return a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn bpf_obj_get(pin: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(pin.as_os_str().as_encoded_bytes()).expect("path without NUL");
    // union bpf_attr, BPF_OBJ_* form: { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; }
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64;
    const BPF_OBJ_GET: u32 = 7;
    bpf(BPF_OBJ_GET, &mut attr)
}

fn bpf_obj_info(fd: &OwnedFd, info: &mut [u32; 64]) -> io::Result<()> {
    // union bpf_attr, info form: { __u32 bpf_fd; __u32 info_len; __aligned_u64 info; }
    let mut attr = [0u64; 16];
    attr[0] = fd.as_raw_fd() as u64 | ((std::mem::size_of_val(info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    const BPF_OBJ_GET_INFO_BY_FD: u32 = 15;
    bpf_raw(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(|_| ())
}

/// An XDP program that is not drain's: `r0 = XDP_PASS; exit`, named `foreign_pass`. It
/// stands for another tool's program (xdp-loader, Cilium, ...) on an interface.
pub struct ForeignXdp {
    fd: OwnedFd,
}

impl ForeignXdp {
    pub const NAME: &'static str = "foreign_pass";

    /// Loads the program (BPF_PROG_LOAD).
    pub fn load() -> Self {
        // mov64 r0, 2 (XDP_PASS); exit
        let insns: [u64; 2] = [
            u64::from_le_bytes([0xb7, 0x00, 0, 0, 2, 0, 0, 0]),
            u64::from_le_bytes([0x95, 0x00, 0, 0, 0, 0, 0, 0]),
        ];
        let license = c"GPL";
        // union bpf_attr, BPF_PROG_LOAD form (include/uapi/linux/bpf.h):
        //   0 prog_type, 4 insn_cnt, 8 insns, 16 license, 24 log_level, 28 log_size,
        //   32 log_buf, 40 kern_version, 44 prog_flags, 48..64 prog_name,
        //   64 prog_ifindex, 68 expected_attach_type
        let mut attr = [0u64; 16];
        const BPF_PROG_TYPE_XDP: u64 = 6;
        const BPF_XDP: u64 = 37;
        attr[0] = BPF_PROG_TYPE_XDP | ((insns.len() as u64) << 32);
        attr[1] = insns.as_ptr() as u64;
        attr[2] = license.as_ptr() as u64;
        let mut name = [0u8; 16];
        name[..Self::NAME.len()].copy_from_slice(Self::NAME.as_bytes());
        attr[6] = u64::from_le_bytes(name[..8].try_into().unwrap());
        attr[7] = u64::from_le_bytes(name[8..].try_into().unwrap());
        attr[8] = BPF_XDP << 32;
        const BPF_PROG_LOAD: u32 = 5;
        let fd = bpf(BPF_PROG_LOAD, &mut attr)
            .unwrap_or_else(|e| panic!("loading the foreign XDP program: {e}"));
        Self { fd }
    }

    /// The program's id (BPF_OBJ_GET_INFO_BY_FD; struct bpf_prog_info { __u32 type; __u32 id; ... }).
    pub fn id(&self) -> u32 {
        let mut info = [0u32; 64];
        bpf_obj_info(&self.fd, &mut info).unwrap_or_else(|e| panic!("program info: {e}"));
        info[1]
    }

    /// Pins the program at `path` (BPF_OBJ_PIN), for `ip link set ... xdp pinned <path>`.
    pub fn pin(&self, path: &Path) {
        let p = CString::new(path.as_os_str().as_encoded_bytes()).expect("path without NUL");
        let mut attr = [0u64; 16];
        attr[0] = p.as_ptr() as u64;
        attr[1] = self.fd.as_raw_fd() as u64;
        const BPF_OBJ_PIN: u32 = 6;
        bpf_raw(BPF_OBJ_PIN, &mut attr)
            .unwrap_or_else(|e| panic!("pinning the foreign program at {}: {e}", path.display()));
    }
}

// ---------------------------------------------------------------------------------------
// Sockets
// ---------------------------------------------------------------------------------------

/// How a connect ended.
#[derive(Debug)]
pub enum Connect {
    Ok(TcpStream),
    /// RST in answer to the SYN.
    Refused,
    /// No answer within the timeout (the SYN, or every answer, was dropped).
    TimedOut,
    Failed(io::Error),
}

impl Connect {
    pub fn is_ok(&self) -> bool {
        matches!(self, Connect::Ok(_))
    }

    pub fn is_timed_out(&self) -> bool {
        matches!(self, Connect::TimedOut)
    }

    /// The stream of a connect that succeeded; panics otherwise.
    #[track_caller]
    pub fn stream(self, what: &str) -> TcpStream {
        match self {
            Connect::Ok(s) => s,
            other => panic!("{what}: expected the connect to succeed, got {other:?}"),
        }
    }
}

/// Connects from namespace `ns` to `to`, waiting at most `timeout`.
pub fn connect(pair: &NetNsPair, ns: &str, to: SocketAddr, timeout: Duration) -> Connect {
    pair.in_ns(ns, || match TcpStream::connect_timeout(&to, timeout) {
        Ok(s) => {
            s.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
            s.set_write_timeout(Some(IO_TIMEOUT))
                .expect("write timeout");
            Connect::Ok(s)
        }
        Err(e) => match e.kind() {
            io::ErrorKind::ConnectionRefused => Connect::Refused,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Connect::TimedOut,
            _ => Connect::Failed(e),
        },
    })
}

/// Connects from `ns` to every address at once (so timeouts overlap instead of adding up)
/// and returns the outcomes in order.
pub fn probe_all(
    pair: &NetNsPair,
    ns: &str,
    targets: &[SocketAddr],
    timeout: Duration,
) -> Vec<Connect> {
    std::thread::scope(|s| {
        let handles: Vec<_> = targets
            .iter()
            .map(|&t| s.spawn(move || connect(pair, ns, t, timeout)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// A TCP echo server on a listener bound inside a namespace; it accepts on a thread of its
/// own (accept needs no namespace) and echoes each connection on another. Dropping it
/// stops accepting and closes the listener.
pub struct EchoServer {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// Binds `addr` inside `ns` (port 0 picks a free one: see `self.addr`).
    pub fn start(pair: &NetNsPair, ns: &str, addr: SocketAddr) -> Self {
        let listener = pair.in_ns(ns, || {
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("binding {addr} in {ns}: {e}"))
        });
        let addr = listener.local_addr().expect("local_addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (accepted, stop) = (accepted.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            std::thread::spawn(move || echo(s));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Err(e) => {
                            eprintln!("echo server {addr}: accept: {e}");
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                }
            })
        };
        Self {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn echo(s: TcpStream) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
    let _ = s.set_write_timeout(Some(IO_TIMEOUT));
    let mut buf = [0u8; 16 * 1024];
    let mut s = s;
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// Sends `len` patterned bytes through an echo server on `stream` and checks that the same
/// bytes come back (a writer thread, so large payloads cannot deadlock on full buffers).
#[track_caller]
pub fn round_trip(stream: &TcpStream, len: usize, seed: u8) {
    let data = pattern(len, seed);
    std::thread::scope(|s| {
        let writer = s.spawn(|| (&*stream).write_all(&data));
        let mut back = vec![0u8; len];
        let read = (&*stream).read_exact(&mut back);
        let wrote = writer.join().expect("writer thread");
        wrote.unwrap_or_else(|e| panic!("sending {len} bytes to the echo server: {e}"));
        read.unwrap_or_else(|e| panic!("reading {len} echoed bytes: {e}"));
        assert!(
            back == data,
            "the echo of {len} bytes differs from what was sent"
        );
    });
}

/// A listener bound at `addr` inside namespace `ns` (accept works from any thread).
pub fn listen(pair: &NetNsPair, ns: &str, addr: SocketAddr) -> TcpListener {
    pair.in_ns(ns, || {
        TcpListener::bind(addr).unwrap_or_else(|e| panic!("binding {addr} in {ns}: {e}"))
    })
}

/// Connects from `client_ns` to `listener` and accepts: (client end, server end), a
/// connection whose both ends the test holds.
#[track_caller]
pub fn tcp_pair(
    pair: &NetNsPair,
    listener: &TcpListener,
    client_ns: &str,
) -> (TcpStream, TcpStream) {
    let to = listener.local_addr().expect("local_addr");
    let client = connect(pair, client_ns, to, Duration::from_secs(5))
        .stream(&format!("connecting from {client_ns} to {to}"));
    let (srv, _) = listener.accept().expect("accept");
    srv.set_read_timeout(Some(IO_TIMEOUT))
        .expect("read timeout");
    srv.set_write_timeout(Some(IO_TIMEOUT))
        .expect("write timeout");
    (client, srv)
}

/// Sends `len` patterned bytes from `from` to `to` and checks them on arrival; both
/// directions of a connection can run at once (call it from two threads).
#[track_caller]
pub fn transfer(from: &TcpStream, to: &TcpStream, len: usize, seed: u8) {
    let data = pattern(len, seed);
    std::thread::scope(|s| {
        let writer = s.spawn(|| (&*from).write_all(&data));
        let mut got = vec![0u8; len];
        let read = (&*to).read_exact(&mut got);
        let wrote = writer.join().expect("writer thread");
        wrote.unwrap_or_else(|e| panic!("sending {len} bytes: {e}"));
        read.unwrap_or_else(|e| panic!("receiving {len} bytes: {e}"));
        assert!(got == data, "{len} bytes arrived altered");
    });
}

/// Bytes that differ from position to position, so a lost or reordered chunk shows.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[2] ^ seed)
        .collect()
}

//! Network namespaces: two joined by a veth pair, removed on drop (also while unwinding);
//! running code and commands inside one; its identity (inode, cookie) and where drain keeps
//! its gate's state for it.
//!
//! The veth pair is created inside namespace `a` with its peer moved straight into `b`, so
//! no interface ever exists in the host namespace, and the addresses (198.18.0.0/15 and
//! fd00::/8, RFC 2544 benchmarking and ULA space) exist only inside the two namespaces.
//!
//! Use [`NetNsPair::cmd`] (nsenter, network namespace only) rather than `ip netns exec`:
//! the latter also unshares the mount namespace and remounts /sys, which hides the host's
//! bpffs and every pin under it.

use std::{
    ffi::CString,
    fs::File,
    net::{Ipv4Addr, Ipv6Addr},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::PathBuf,
    process::Command,
    thread,
};

/// Where `ip netns add` keeps its namespace handles.
const NETNS_DIR: &str = "/var/run/netns";

use drain_user::netns::{NetnsId, StateDir};

/// Where drain keeps the pin directories of every namespace's gate.
pub const STATE_ROOT: &str = "/sys/fs/bpf/drain";

/// The pin directory drain uses for the gate of the namespace with this inode and cookie:
/// `/sys/fs/bpf/drain/<netns inode>-<netns cookie>`. The one place the tests spell that name.
pub fn state_dir(id: NetnsId) -> PathBuf {
    drain_user::pins::state_path(StateDir::Gate(id))
}

/// Moves the calling thread into network namespace `ns` (a name under /var/run/netns):
/// sockets it creates from now on live there.
pub fn enter_netns(ns: &str) {
    let path = format!("{NETNS_DIR}/{ns}");
    let file = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
    // SAFETY: setns on a valid fd; it changes only this thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert!(
        rc == 0,
        "setns({path}): {}",
        std::io::Error::last_os_error()
    );
}

/// Runs `f` on a new thread inside namespace `ns` and returns what it returns (a panic in
/// `f` is re-raised here).
pub fn in_netns<R: Send>(ns: &str, f: impl FnOnce() -> R + Send) -> R {
    thread::scope(|s| {
        s.spawn(|| {
            enter_netns(ns);
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// `nsenter --net=/var/run/netns/<ns> <program>`: joins only the network namespace, so
/// the program sees the host's /sys/fs/bpf. Add arguments with `.arg(...)`.
pub fn nsenter(ns: &str, program: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={NETNS_DIR}/{ns}")).arg(program);
    c
}

pub struct NetNsPair {
    /// Namespace names (handles under /var/run/netns).
    pub a: String,
    pub b: String,
    /// The veth end in `a` and the one in `b` (at most 15 bytes, IFNAMSIZ - 1).
    pub veth_a: String,
    pub veth_b: String,
    pub a_v4: Ipv4Addr,
    pub b_v4: Ipv4Addr,
    pub a_v6: Ipv6Addr,
    pub b_v6: Ipv6Addr,
    /// Prefix lengths of the addresses above.
    pub v4_prefix: u8,
    pub v6_prefix: u8,
    /// Which namespaces were created so far (drop removes only those).
    created: [bool; 2],
}

impl NetNsPair {
    /// Creates the namespaces, the veth pair and the addresses, and brings every interface
    /// (lo included) up. Panics (after removing what it made) if a step fails.
    ///
    /// Addresses: the /30 number `(pid % 512) * 64 + counter % 64` of 198.18.0.0/15 (32768
    /// /30s), so pairs of one process never share one (up to 64 alive at once) and pairs of
    /// two processes only if their pids are equal mod 512; and fd00:6472:<pid>:<counter>::/96,
    /// unique outright. Sharing would be harmless anyway: each pair is its own network.
    pub fn new() -> Self {
        crate::require_root();
        let (pid, n, suffix) = crate::unique_suffix();
        let slot = (pid % 512) * 64 + n % 64;
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + slot * 4;
        let v6 = |host: u16| {
            Ipv6Addr::new(
                0xfd00,
                0x6472,
                (pid >> 16) as u16,
                pid as u16,
                n as u16,
                0,
                0,
                host,
            )
        };
        let short = format!("{pid:x}x{:x}", n & 0xffff);
        let mut pair = Self {
            a: format!("drain-t-{suffix}-a"),
            b: format!("drain-t-{suffix}-b"),
            veth_a: format!("dv{short}a"),
            veth_b: format!("dv{short}b"),
            a_v4: Ipv4Addr::from(base + 1),
            b_v4: Ipv4Addr::from(base + 2),
            a_v6: v6(1),
            b_v6: v6(2),
            v4_prefix: 30,
            v6_prefix: 96,
            created: [false; 2],
        };
        assert!(pair.veth_a.len() <= 15 && pair.veth_b.len() <= 15);
        // From here on a panic drops `pair`, which removes whatever was created.
        ip(&["netns", "add", &pair.a]);
        pair.created[0] = true;
        ip(&["netns", "add", &pair.b]);
        pair.created[1] = true;
        ip(&[
            "-n",
            &pair.a,
            "link",
            "add",
            &pair.veth_a,
            "type",
            "veth",
            "peer",
            "name",
            &pair.veth_b,
            "netns",
            &pair.b,
        ]);
        for (ns, dev, v4, v6) in [
            (&pair.a, &pair.veth_a, pair.a_v4, pair.a_v6),
            (&pair.b, &pair.veth_b, pair.b_v4, pair.b_v6),
        ] {
            let v4 = format!("{v4}/{}", pair.v4_prefix);
            let v6 = format!("{v6}/{}", pair.v6_prefix);
            ip(&["-n", ns, "addr", "add", &v4, "dev", dev]);
            // nodad: usable at once instead of "tentative" for the DAD period.
            ip(&["-n", ns, "addr", "add", &v6, "dev", dev, "nodad"]);
            ip(&["-n", ns, "link", "set", "dev", "lo", "up"]);
            ip(&["-n", ns, "link", "set", "dev", dev, "up"]);
        }
        pair
    }

    fn handle(ns: &str) -> String {
        format!("{NETNS_DIR}/{ns}")
    }

    /// Runs `f` on a new thread that has first joined namespace `ns` (setns CLONE_NEWNET),
    /// so sockets it creates live there; a panic in `f` is re-raised here.
    pub fn in_ns<R: Send>(&self, ns: &str, f: impl FnOnce() -> R + Send) -> R {
        self.check_ns(ns);
        in_netns(ns, f)
    }

    /// `nsenter --net=/var/run/netns/<ns> <program>`: joins only the network namespace, so
    /// the program sees the host's /sys/fs/bpf. Add arguments with `.arg(...)`.
    pub fn cmd(&self, ns: &str, program: &str) -> Command {
        self.check_ns(ns);
        nsenter(ns, program)
    }

    /// Runs `program args...` in namespace `ns` (nsenter --net) and returns its stdout;
    /// panics when it fails.
    #[track_caller]
    pub fn sh(&self, ns: &str, program: &str, args: &[&str]) -> String {
        let mut cmd = self.cmd(ns, program);
        cmd.args(args);
        run_ok(cmd, &format!("{program} {} in {ns}", args.join(" ")))
    }

    /// Inode of namespace `ns` (what `stat -L -c %i /proc/self/ns/net` prints inside it).
    pub fn netns_inode(&self, ns: &str) -> u64 {
        self.check_ns(ns);
        let path = Self::handle(ns);
        std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("stat {path}: {e}"))
            .ino()
    }

    /// Identity (inode, SO_NETNS_COOKIE) of one of the pair's namespaces, read inside it
    /// the way drain-user reads its own.
    pub fn netns_id(&self, ns: &str) -> NetnsId {
        self.check_ns(ns);
        netns_id(ns)
    }

    /// SO_NETNS_COOKIE of one of the pair's namespaces.
    pub fn netns_cookie(&self, ns: &str) -> u64 {
        self.netns_id(ns).cookie
    }

    /// Where drain pins the gate of namespace `ns` (see [`state_dir`]).
    pub fn state_dir(&self, ns: &str) -> PathBuf {
        state_dir(self.netns_id(ns))
    }

    /// Every pin directory drain has under [`STATE_ROOT`] for namespace `ns`: the gate's,
    /// and the temporary one of a `wait` run without a gate. drain names each of them
    /// `<netns inode>-...`.
    pub fn pin_dirs(&self, ns: &str) -> Vec<PathBuf> {
        let inode = self.netns_inode(ns);
        let ours = |name: &str| match name.parse::<StateDir>() {
            Ok(StateDir::Gate(id)) => id.inode == inode,
            Ok(StateDir::Wait { inode: i, .. }) => i == inode,
            Err(_) => false,
        };
        match std::fs::read_dir(STATE_ROOT) {
            Ok(rd) => rd
                .flatten()
                .filter(|e| ours(&e.file_name().to_string_lossy()))
                .map(|e| e.path())
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
            Err(e) => panic!("listing {STATE_ROOT}: {e}"),
        }
    }

    /// Index of interface `dev` in namespace `ns` (if_nametoindex on a thread inside it).
    pub fn ifindex(&self, ns: &str, dev: &str) -> u32 {
        let c = CString::new(dev).expect("interface name without NUL");
        // SAFETY: a valid NUL-terminated string.
        let idx = self.in_ns(ns, || unsafe { libc::if_nametoindex(c.as_ptr()) });
        assert!(idx != 0, "no interface {dev} in {ns}");
        idx
    }

    /// MAC address of `dev` in `ns`.
    pub fn mac(&self, ns: &str, dev: &str) -> [u8; 6] {
        self.check_ns(ns);
        let out = ip(&["-n", ns, "-o", "link", "show", "dev", dev]);
        let text = out
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .unwrap_or_else(|| panic!("no link/ether in: {out}"));
        let mut mac = [0u8; 6];
        for (m, h) in mac.iter_mut().zip(text.split(':')) {
            *m = u8::from_str_radix(h, 16).expect("hex MAC byte");
        }
        mac
    }

    fn check_ns(&self, ns: &str) {
        assert!(
            ns == self.a || ns == self.b,
            "{ns} is not one of this pair's namespaces ({}, {})",
            self.a,
            self.b
        );
    }
}

impl Default for NetNsPair {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetNsPair {
    fn drop(&mut self) {
        // Deleting a namespace destroys the veth end in it, and with it the peer. Errors are
        // printed, not raised: panicking while unwinding would abort the test binary.
        for (ns, created) in [(&self.a, self.created[0]), (&self.b, self.created[1])] {
            if !created {
                continue;
            }
            match Command::new("ip").args(["netns", "del", ns]).output() {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "ip netns del {ns}: {}: {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => eprintln!("ip netns del {ns}: {e}"),
            }
        }
    }
}

/// Identity (inode, SO_NETNS_COOKIE) of namespace `ns` (any name under /var/run/netns),
/// read on a thread inside it the way drain-user reads its own.
pub fn netns_id(ns: &str) -> NetnsId {
    in_netns(ns, || NetnsId::current().expect("the namespace's identity"))
}

/// Where drain pins the gate of namespace `ns` (any name under /var/run/netns).
pub fn drain_state_dir(ns: &str) -> PathBuf {
    state_dir(netns_id(ns))
}

/// Runs `ip args...`, panicking with its stderr on failure; returns its stdout.
pub fn ip(args: &[&str]) -> String {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    run_ok(cmd, &format!("ip {}", args.join(" ")))
}

/// Runs `cmd` (described as `what`), panicking with its stderr unless it succeeds; returns
/// its stdout.
#[track_caller]
fn run_ok(mut cmd: Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

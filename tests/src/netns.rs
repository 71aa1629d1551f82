//! Two network namespaces joined by a veth pair, removed on drop (also while unwinding).
//!
//! The veth pair is created inside namespace `a` with its peer moved straight into `b`, so
//! no interface ever exists in the host namespace, and the addresses (198.18.0.0/15 and
//! fd00::/8, RFC 2544 benchmarking and ULA space) exist only inside the two namespaces.
//!
//! Use [`NetNsPair::cmd`] (nsenter, network namespace only) rather than `ip netns exec`:
//! the latter also unshares the mount namespace and remounts /sys, which hides the host's
//! bpffs and every pin under it.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    process::Command,
};

/// Where `ip netns add` keeps its namespace handles.
const NETNS_DIR: &str = "/var/run/netns";

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
        crate::traffic::in_netns(ns, f)
    }

    /// `nsenter --net=/var/run/netns/<ns> <program>`: joins only the network namespace, so
    /// the program sees the host's /sys/fs/bpf. Add arguments with `.arg(...)`.
    pub fn cmd(&self, ns: &str, program: &str) -> Command {
        self.check_ns(ns);
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", Self::handle(ns))).arg(program);
        c
    }

    /// Inode of namespace `ns` (what `stat -L -c %i /proc/self/ns/net` prints inside it).
    pub fn netns_inode(&self, ns: &str) -> u64 {
        self.check_ns(ns);
        let path = Self::handle(ns);
        std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("stat {path}: {e}"))
            .ino()
    }

    /// SO_NETNS_COOKIE of one of the pair's namespaces (read from a socket made inside it).
    pub fn netns_cookie(&self, ns: &str) -> u64 {
        self.check_ns(ns);
        netns_cookie(ns)
    }

    /// Where drain pins the gate of namespace `ns`: /sys/fs/bpf/drain/<inode>-<cookie>.
    pub fn drain_state_dir(&self, ns: &str) -> std::path::PathBuf {
        self.check_ns(ns);
        drain_state_dir(ns)
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

/// SO_NETNS_COOKIE of namespace `ns` (any name under /var/run/netns), read from a socket
/// made inside it.
pub fn netns_cookie(ns: &str) -> u64 {
    crate::traffic::in_netns(ns, || {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("a socket in the namespace");
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: a valid fd and an out-parameter of the size given. 71 = SO_NETNS_COOKIE.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                71,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        assert_eq!(
            rc,
            0,
            "SO_NETNS_COOKIE: {}",
            std::io::Error::last_os_error()
        );
        cookie
    })
}

/// Where drain pins the gate of namespace `ns` (any name under /var/run/netns):
/// /sys/fs/bpf/drain/<inode>-<cookie>.
pub fn drain_state_dir(ns: &str) -> std::path::PathBuf {
    let path = NetNsPair::handle(ns);
    let ino = std::fs::metadata(&path)
        .unwrap_or_else(|e| panic!("stat {path}: {e}"))
        .ino();
    std::path::Path::new("/sys/fs/bpf/drain").join(format!("{ino}-{}", netns_cookie(ns)))
}

/// Runs `ip args...`, panicking with its stderr on failure; returns its stdout.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running ip {}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "ip {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

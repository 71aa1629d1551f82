//! A published port without a container runtime: the way Docker's `-p 8080:80` reaches a
//! container, built from namespaces the test makes.
//!
//! A [`NetNsPair`] gives the client (`b`) and the "host" (`a`); [`Published`] adds a third
//! namespace, the "container", joined to the host by its own veth pair, with a default
//! route through the host, and in the host an nftables DNAT (nat prerouting: `tcp dport
//! PORT dnat to CONTAINER:BACKEND`, Docker's rule) and IPv4 forwarding, set inside the host
//! namespace only. A client connecting to the host's address and PORT is answered by a
//! server in the container; the accepted socket exists only there, the host has none (its
//! conntrack table has the connection, DST_NAT, replies from the container).
//!
//! [`Published::restart`] does to the container's network what `docker restart` does: the
//! namespace is destroyed and a new one, with the same address, takes its place.

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::Command,
};

use crate::netns::{in_netns, NetNsPair};

/// Where `ip netns add` keeps its namespace handles.
const NETNS_DIR: &str = "/var/run/netns";

pub struct Published<'p> {
    pub pair: &'p NetNsPair,
    /// The container's namespace (a handle under /var/run/netns).
    pub ctr: String,
    /// The veth end in the host (`pair.a`) and the one in the container.
    pub veth_host: String,
    pub veth_ctr: String,
    pub host_v4: Ipv4Addr,
    pub ctr_v4: Ipv4Addr,
    /// The published port on the host, and the port the container's server listens on.
    pub port: u16,
    pub backend_port: u16,
    made: bool,
}

fn ip(args: &[&str]) {
    run(
        Command::new("ip").args(args),
        &format!("ip {}", args.join(" ")),
    );
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl<'p> Published<'p> {
    /// Publishes `port` on the host (`pair.a`) to `backend_port` in a new container
    /// namespace. Needs `nft` (nftables): `cargo xtask test` installs it.
    pub fn new(pair: &'p NetNsPair, port: u16, backend_port: u16) -> Self {
        let (pid, n, suffix) = crate::unique_suffix();
        // The host already holds the pair's /30 at a_v4: the container link takes the /30
        // at the same offset in the other half of 198.18.0.0/15, so the two never meet.
        let base = (u32::from(pair.a_v4) & !3) ^ (1 << 16);
        let short = format!("{pid:x}x{:x}", n & 0xffff);
        let mut p = Published {
            pair,
            ctr: format!("drain-t-{suffix}-c"),
            veth_host: format!("dp{short}h"),
            veth_ctr: format!("dp{short}c"),
            host_v4: Ipv4Addr::from(base + 1),
            ctr_v4: Ipv4Addr::from(base + 2),
            port,
            backend_port,
            made: false,
        };
        assert!(p.veth_host.len() <= 15);
        p.make_container();
        // Docker's published port: DNAT in nat prerouting, forwarding on, in the host only.
        let host = format!("--net={NETNS_DIR}/{}", pair.a);
        let to = format!("{}:{backend_port}", p.ctr_v4);
        for rule in [
            "add table ip drain_published".to_owned(),
            "add chain ip drain_published pre { type nat hook prerouting priority dstnat; }"
                .to_owned(),
            format!("add rule ip drain_published pre tcp dport {port} dnat to {to}"),
        ] {
            run(
                Command::new("nsenter").arg(&host).arg("nft").arg(&rule),
                &format!("nft {rule} in {}", pair.a),
            );
        }
        in_netns(&pair.a, || {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
                .expect("turning on IPv4 forwarding in the host namespace")
        });
        p
    }

    /// The container namespace, its link to the host, its address and default route.
    fn make_container(&mut self) {
        ip(&["netns", "add", &self.ctr]);
        self.made = true;
        ip(&[
            "-n",
            &self.pair.a,
            "link",
            "add",
            &self.veth_host,
            "type",
            "veth",
            "peer",
            "name",
            &self.veth_ctr,
            "netns",
            &self.ctr,
        ]);
        let (h, c) = (
            format!("{}/30", self.host_v4),
            format!("{}/30", self.ctr_v4),
        );
        ip(&[
            "-n",
            &self.pair.a,
            "addr",
            "add",
            &h,
            "dev",
            &self.veth_host,
        ]);
        ip(&["-n", &self.ctr, "addr", "add", &c, "dev", &self.veth_ctr]);
        for (ns, dev) in [(&self.pair.a, &self.veth_host), (&self.ctr, &self.veth_ctr)] {
            ip(&["-n", ns, "link", "set", "dev", dev, "up"]);
        }
        ip(&["-n", &self.ctr, "link", "set", "dev", "lo", "up"]);
        let via = self.host_v4.to_string();
        ip(&["-n", &self.ctr, "route", "add", "default", "via", &via]);
    }

    /// Where clients connect: the host's address and the published port.
    pub fn published(&self) -> SocketAddr {
        SocketAddr::new(self.pair.a_v4.into(), self.port)
    }

    /// The container's server address (the DNAT's target).
    pub fn backend(&self) -> SocketAddr {
        SocketAddr::new(self.ctr_v4.into(), self.backend_port)
    }

    /// `/var/run/netns/<container>`.
    pub fn ctr_path(&self) -> String {
        format!("{NETNS_DIR}/{}", self.ctr)
    }

    /// Removes the container namespace's handle, so nothing drain can find on this host
    /// holds it any more (no process is in it, no fd or mount names it), while the sockets
    /// opened in it keep it, its link and its server alive: what a DNAT to another machine
    /// looks like from here.
    pub fn hide(&mut self) {
        ip(&["netns", "del", &self.ctr]);
        self.made = false;
    }

    /// What `docker restart` does to the container's network: its namespace is destroyed
    /// (with every socket still open in it closed by its owner first: the caller's job) and
    /// a new one takes its place, with the same name, link names and address.
    pub fn restart(&mut self) {
        // The veth first, as Docker removes it: a deleted namespace is torn down
        // asynchronously, and its devices with it.
        ip(&["-n", &self.pair.a, "link", "del", "dev", &self.veth_host]);
        ip(&["netns", "del", &self.ctr]);
        self.made = false;
        self.make_container();
    }
}

impl Drop for Published<'_> {
    fn drop(&mut self) {
        // The host's DNAT and forwarding go with the pair's namespace; the container's
        // namespace (and with it both veth ends) goes here. Errors are printed, not raised.
        if self.made {
            match Command::new("ip")
                .args(["netns", "del", &self.ctr])
                .output()
            {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "ip netns del {}: {}",
                    self.ctr,
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => eprintln!("ip netns del {}: {e}", self.ctr),
            }
        }
    }
}

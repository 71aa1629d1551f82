//! Following a gated port's connections to where they end: a published port (Docker's
//! `-p 8080:80`) is a DNAT in this namespace to a server in another one, and the accepted
//! sockets exist only there. The gate here refuses new connections before the DNAT; the
//! count has to be taken where the sockets are.
//!
//! How: the kernel's connection tracking names every such connection (original destination
//! port = a gated port, status DST_NAT) and the exact tuple of the backend's socket (the
//! reply direction). [`Follower::refresh`] finds the namespace that holds a socket with that
//! tuple (every namespace something on the host holds: processes, fds, bind mounts), then
//! has the kernel tracker count that namespace's server port under the gated port
//! ([`Tracker::follow`]: a FOLLOW entry, then a seed there), with the tracker's usual
//! guarantees (set semantics, event-driven, exact). A forwarded connection whose socket is
//! in no namespace of this host (a DNAT to another machine) cannot be counted exactly: it
//! is reported as such and keeps `wait` from "drained" while conntrack says it may be live.
//!
//! The namespaces behind a port change (a restarted container gets a new one): callers
//! refresh periodically and always right before they conclude anything from a zero count.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::Result;
use drain_common::FollowKey;
use serde::Serialize;

use crate::{
    conntrack::{self, Forwarded},
    diag, netns,
    track::Tracker,
};

/// A server in another namespace whose connections count under a gated port.
#[derive(Clone, Debug, Serialize)]
pub struct Followed {
    /// The gated (published) port.
    pub port: u16,
    /// The backend's address and port, as the DNAT names it.
    pub backend: SocketAddr,
    pub netns_inode: u64,
    /// A path that opens that namespace (a process's, an fd's or a bind mount).
    #[serde(skip)]
    pub handle: PathBuf,
}

impl Followed {
    /// True while `handle` still opens the namespace followed (a container restart makes a
    /// new one, and the old one's processes are gone).
    fn alive(&self) -> bool {
        std::fs::metadata(&self.handle).is_ok_and(|m| m.ino() == self.netns_inode)
    }
}

/// What a refresh found: servers newly followed, with the connections seeded there.
#[derive(Default)]
pub struct Found {
    pub new: Vec<(Followed, usize)>,
}

/// The namespaces a gate's ports are followed into, as this process knows them.
pub struct Follower {
    own: u64,
    /// The servers the gate already followed when this process started (reported as new
    /// only if they were not).
    known: BTreeSet<FollowKey>,
    followed: Vec<Followed>,
    /// Gated port -> local ports of this namespace that a DNAT here leads to (a REDIRECT):
    /// counted by the tracker under their own port, summed with the gated one.
    pub local: BTreeMap<u16, BTreeSet<u16>>,
    /// Forwarded connections, possibly live, whose backend socket is in no namespace of
    /// this host: not counted by the tracker.
    pub elsewhere: Vec<Forwarded>,
    /// When each (backend, peer) was last searched for in vain: searching every namespace
    /// again on each refresh would cost a DNAT to another machine a scan every 250 ms.
    unfound: BTreeMap<(SocketAddr, SocketAddr), std::time::Instant>,
}

/// How long a connection found in no namespace is not searched for again.
const RESCAN: std::time::Duration = std::time::Duration::from_secs(2);

impl Follower {
    /// Also stops following, in `tracker`, the namespaces that no longer exist (followed by
    /// an earlier call): their inode may be handed to a new namespace.
    pub fn new(tracker: &mut Tracker) -> Result<Self> {
        let followed = tracker.followed();
        let known = followed.iter().map(|(k, _)| *k).collect();
        if !followed.is_empty() {
            let held = netns::held_namespaces();
            for (k, _) in followed {
                if !held.contains_key(&u64::from(k.netns_inum)) {
                    tracker.unfollow(k);
                }
            }
        }
        Ok(Follower {
            known,
            own: netns::current_inode()?,
            followed: Vec::new(),
            local: BTreeMap::new(),
            elsewhere: Vec::new(),
            unfound: BTreeMap::new(),
        })
    }

    pub fn followed(&self) -> &[Followed] {
        &self.followed
    }

    /// Reads conntrack for connections to `ports` forwarded elsewhere, follows the
    /// namespaces they end in that are not followed yet (seeding them), stops following
    /// namespaces that are gone, and notes what ends outside this host.
    pub fn refresh(&mut self, tracker: &mut Tracker, ports: &BTreeSet<u16>) -> Result<Found> {
        let mut found = Found::default();
        for f in self.followed.iter().filter(|f| !f.alive()) {
            tracker.unfollow(key(f.netns_inode, f.backend.port()));
        }
        self.followed.retain(Followed::alive);
        let forwarded: Vec<Forwarded> = conntrack::forwarded(ports)?
            .into_iter()
            .filter(Forwarded::maybe_live)
            .collect();
        let unlocated: Vec<&Forwarded> = forwarded
            .iter()
            .filter(|f| {
                !self
                    .followed
                    .iter()
                    .any(|x| x.port == f.port && same(x.backend, f.backend))
                    && !self
                        .local
                        .get(&f.port)
                        .is_some_and(|l| l.contains(&f.backend.port()))
            })
            .collect();
        self.elsewhere.clear();
        self.unfound.retain(|k, at| {
            at.elapsed() < RESCAN && unlocated.iter().any(|f| (f.backend, f.peer) == *k)
        });
        let (recent, unlocated): (Vec<&Forwarded>, Vec<&Forwarded>) = unlocated
            .into_iter()
            .partition(|f| self.unfound.contains_key(&(f.backend, f.peer)));
        self.elsewhere.extend(recent.into_iter().copied());
        if unlocated.is_empty() {
            return Ok(found);
        }
        let located = locate(self.own, &unlocated)?;
        for f in unlocated {
            match located.get(&(f.backend, f.peer)) {
                Some((inode, _)) if *inode == self.own => {
                    self.local
                        .entry(f.port)
                        .or_default()
                        .insert(f.backend.port());
                }
                Some((inode, handle)) => {
                    if self
                        .followed
                        .iter()
                        .any(|x| x.port == f.port && same(x.backend, f.backend))
                    {
                        continue;
                    }
                    let fol = Followed {
                        port: f.port,
                        backend: f.backend,
                        netns_inode: *inode,
                        handle: handle.clone(),
                    };
                    let k = key(*inode, f.backend.port());
                    let seeded = tracker.follow(k, f.port, handle)?;
                    self.followed.push(fol.clone());
                    if self.known.insert(k) {
                        found.new.push((fol, seeded));
                    }
                }
                // The socket may have closed since the dump (conntrack lags behind it), or
                // it lives on another machine: not counted, so it holds a drain up while
                // conntrack says it may be live.
                None => {
                    self.unfound
                        .insert((f.backend, f.peer), std::time::Instant::now());
                    self.elsewhere.push(*f);
                }
            }
        }
        Ok(found)
    }

    /// The live connections, counted by the tracker, of the followed servers of `ports`:
    /// dumped in their namespaces, each with the gated port it counts under.
    pub fn tracked(
        &self,
        tracker: &Tracker,
        ports: &BTreeSet<u16>,
    ) -> Result<Vec<(u16, diag::Conn)>> {
        let mut out = Vec::new();
        for f in self.followed.iter().filter(|f| ports.contains(&f.port)) {
            let Ok(conns) = netns::run_in(&f.handle, || {
                diag::dump(diag::States::ESTABLISHED | diag::States::CLOSE_WAIT, true)
            }) else {
                continue; // gone since: its connections have left the set
            };
            out.extend(
                conns?
                    .into_iter()
                    .filter(|c| {
                        c.local.port() == f.backend.port() && tracker.contains_in(f.netns_inode, c)
                    })
                    .map(|c| (f.port, c)),
            );
        }
        Ok(out)
    }
}

fn key(inode: u64, port: u16) -> FollowKey {
    FollowKey {
        netns_inum: inode as u32,
        port: u32::from(port),
    }
}

/// Addresses equal as the kernel compares them (an IPv4 client of a dual-stack socket is
/// `::ffff:a.b.c.d` there).
fn same(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
}

/// Finds, for each forwarded connection, the namespace holding a socket with its exact
/// tuple (local = backend, remote = peer), searching every namespace something on this
/// host holds. Keyed by (backend, peer).
fn locate(
    own: u64,
    wanted: &[&Forwarded],
) -> Result<BTreeMap<(SocketAddr, SocketAddr), (u64, PathBuf)>> {
    let mut out = BTreeMap::new();
    let states = || {
        diag::States::ESTABLISHED
            | diag::States::CLOSE_WAIT
            | diag::States::SYN_RECV
            | diag::States::FIN_WAIT1
            | diag::States::FIN_WAIT2
            | diag::States::LAST_ACK
            | diag::States::CLOSING
    };
    let mut spaces: Vec<(u64, PathBuf)> = netns::held_namespaces().into_iter().collect();
    // This namespace first (a REDIRECT), then the others.
    spaces.sort_by_key(|(i, _)| *i != own);
    for (inode, handle) in spaces {
        let conns = if inode == own {
            diag::dump(states(), false)
        } else {
            match netns::run_in(Path::new(&handle), || diag::dump(states(), false)) {
                Ok(r) => r,
                Err(_) => continue, // gone while scanning
            }
        };
        let Ok(conns) = conns else { continue };
        for c in conns {
            for f in wanted {
                if same(c.local, f.backend) && same(c.peer, f.peer) {
                    out.entry((f.backend, f.peer))
                        .or_insert_with(|| (inode, handle.clone()));
                }
            }
        }
        if out.len() == wanted.len() {
            break;
        }
    }
    Ok(out)
}

/// After `gate on`: follows the gated ports' connections forwarded to other namespaces
/// (seeding them there) and returns what to tell the operator, one line each.
pub fn after_gate_on(dir: &Path, ports: &BTreeSet<u16>) -> Result<Vec<String>> {
    let mut gate = crate::state::OpenGate::open(dir)?;
    let mut follower = Follower::new(gate.tracker_mut())?;
    let found = follower.refresh(gate.tracker_mut(), ports)?;
    let mut lines: Vec<String> = found
        .new
        .iter()
        .map(|(f, seeded)| {
            format!(
                "drain-user: port {}: connections are forwarded (DNAT) to {} in network \
                 namespace {}: counted there ({seeded} open now); `wait` follows them",
                f.port, f.backend, f.netns_inode
            )
        })
        .collect();
    let mut elsewhere: BTreeMap<(u16, SocketAddr), usize> = BTreeMap::new();
    for f in &follower.elsewhere {
        *elsewhere.entry((f.port, f.backend)).or_default() += 1;
    }
    for ((port, backend), n) in elsewhere {
        lines.push(format!(
            "drain-user: warning: port {port}: {n} connection(s) are forwarded (DNAT) to \
             {backend}, which no network namespace of this host holds: they cannot be counted \
             here; drain them where they end (`drain-user wait --port {}` there); `wait` here \
             will not report the port drained while conntrack says they may be live",
            backend.port()
        ));
    }
    Ok(lines)
}

/// Refuses policy reset on a port this namespace destination-NATs elsewhere (as far as
/// conntrack shows: a connection forwarded now or recently). Under reset the gate hands a
/// refused SYN to the stack for the namespace's sk_lookup program to refuse, but a DNATed
/// SYN is forwarded before any local lookup: it would reach the container and be accepted.
/// Policy drop refuses it in XDP/TC, before the DNAT.
pub fn check_policy(ports: &BTreeSet<u16>, policy: crate::domain::Policy) -> Result<()> {
    if policy != crate::domain::Policy::Reset {
        return Ok(());
    }
    if let Some(f) = conntrack::forwarded(ports)?.first() {
        return Err(crate::domain::usage(format!(
            "port {} is forwarded (DNAT) to {}: under --policy reset a refused SYN is handed \
             to the stack, which forwards it there instead of refusing it; use --policy drop \
             (the gate drops it before the DNAT)",
            f.port, f.backend
        )));
    }
    Ok(())
}

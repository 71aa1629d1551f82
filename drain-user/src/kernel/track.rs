//! User side of the connection tracker: configure and attach it, seed it with the
//! connections that predate it, and read it through [`Tracker`] (live counts, the set of
//! tracked connections, the tracker's own counters).

use std::{
    collections::{BTreeMap, HashMap as StdHashMap, HashSet},
    os::fd::{AsFd, AsRawFd},
    path::Path,
    ptr::NonNull,
    sync::atomic::{AtomicI64, AtomicU64, Ordering},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, RingBuf},
    programs::links::FdLink,
    Ebpf,
};
use drain_common::{map, prog, v4_mapped, ConnKey, FollowKey, TrackConfig, TrackStats};

use crate::{
    btf::{Btf, Kernel},
    diag, netns, pins,
};

/// What a [`Tracker::recheck`] found and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recheck {
    /// The state changes the kernel had skipped the tracker for when it started.
    pub missed: u64,
    /// Connections the set held that had closed: taken out, their counts lowered.
    pub removed: u64,
    /// Live connections the set lacked: added, their counts raised.
    pub added: u64,
    /// Entries of namespaces nothing on the host opens any more (no process, fd or bind
    /// mount): left as they are, so the counts may be high by as many.
    pub unchecked: u64,
}

/// Which connections of a namespace the tracker counts, and under which port.
enum Counted {
    /// Its own namespace: every passive connection (one on a port with a listener),
    /// under its local port.
    Listeners,
    /// A followed namespace: server port -> the gated port its connections count under
    /// (none for a namespace no longer followed, whose entries are only checked).
    Ports(BTreeMap<u16, u16>),
}

/// Reads the kernel struct offsets from BTF and writes the tracker's config.
fn configure(bpf: &mut Ebpf, btf: &Btf) -> Result<()> {
    let cfg = TrackConfig {
        netns_inum: netns::current_inode()? as u32,
        off_sport: btf.offset("inet_sock", "inet_sport")?,
        off_net: btf.offset("sock", "__sk_common.skc_net")?,
        off_inum: btf.offset("net", "ns.inum")?,
        off_family: btf.offset("sock", "__sk_common.skc_family")?,
        off_dport: btf.offset("sock", "__sk_common.skc_dport")?,
        off_daddr: btf.offset("sock", "__sk_common.skc_daddr")?,
        off_saddr: btf.offset("sock", "__sk_common.skc_rcv_saddr")?,
        off_v6_daddr: btf.offset("sock", "__sk_common.skc_v6_daddr")?,
        off_v6_saddr: btf.offset("sock", "__sk_common.skc_v6_rcv_saddr")?,
        ..Default::default()
    };
    let mut track: Array<&mut MapData, TrackConfig> = Array::try_from(
        bpf.map_mut(map::TRACK)
            .context("object lacks the tracker config map")?,
    )?;
    track.set(0, cfg, 0).context("writing the tracker config")?;
    Ok(())
}

/// Loads and attaches the tracker; the returned link detaches when dropped unless pinned.
pub fn attach(bpf: &mut Ebpf, kernel: &Kernel) -> Result<FdLink> {
    configure(bpf, kernel.drain()?)?;
    crate::object::attach_btf_tracepoint(
        bpf,
        kernel.aya()?,
        prog::TRACK,
        "inet_sock_set_state",
        "the connection tracker",
    )
}

/// The live counters, mapped into this process: reading them is a memory load, so `wait`
/// can poll every few milliseconds for free.
struct Live {
    base: NonNull<AtomicI64>,
    _map: MapData,
}

const PORTS: usize = 65536;

/// Maps a BPF_F_MMAPABLE array of PORTS 8-byte values into this process.
fn map_ports(map: &MapData, what: &str) -> Result<NonNull<u8>> {
    // SAFETY: mapping a BPF_F_MMAPABLE array of exactly this size, shared with the kernel.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PORTS * 8,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            map.fd().as_fd().as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("mmap of {what}"));
    }
    NonNull::new(p.cast()).context("mmap returned null")
}

impl Live {
    fn open(dir: &Path) -> Result<Self> {
        let map = pins::open_map(dir, map::LIVE)?;
        Ok(Live {
            base: map_ports(&map, "the live-connection map")?.cast(),
            _map: map,
        })
    }

    fn at(&self, port: u16) -> &AtomicI64 {
        // SAFETY: port < 65536 entries, each an 8-byte aligned i64 in the live mapping.
        unsafe { &*self.base.as_ptr().add(port as usize) }
    }

    fn add(&self, port: u16, delta: i64) {
        self.at(port).fetch_add(delta, Ordering::Relaxed);
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what open() mapped.
        unsafe { libc::munmap(self.base.as_ptr().cast(), PORTS * 8) };
    }
}

/// What wakes `wait` when a port's count changes: its interest per port (a lease in
/// [`map::WAITERS`], mapped into this process) and the ring the tracker writes to
/// ([`map::WAKE`]). Its fd is the ring's: readable when the tracker has written.
pub struct Wake {
    waiters: NonNull<AtomicU64>,
    _waiters_map: MapData,
    ring: RingBuf<MapData>,
}

// SAFETY: the mapping is shared memory reached only through atomics.
unsafe impl Send for Wake {}

impl Wake {
    /// None when the tracker's maps have no wake ring (a gate made by an older drain-user,
    /// whose tracker never writes one): `wait` then polls.
    pub fn open(dir: &Path) -> Result<Option<Self>> {
        if !dir.join(map::WAKE).exists() || !dir.join(map::WAITERS).exists() {
            return Ok(None);
        }
        let waiters = pins::open_map(dir, map::WAITERS)?;
        Ok(Some(Wake {
            waiters: map_ports(&waiters, "the wait interest map")?.cast(),
            _waiters_map: waiters,
            ring: RingBuf::try_from(Map::RingBuf(pins::open_map(dir, map::WAKE)?))?,
        }))
    }

    /// Asks to be woken when the count of any of `ports` changes, until `until_ns`
    /// (CLOCK_BOOTTIME). Sequentially consistent: call it before reading the counts, so a
    /// change the read misses wakes this process (the tracker changes a count, then reads
    /// the lease).
    pub fn want(&self, ports: impl IntoIterator<Item = u16>, until_ns: u64) {
        for p in ports {
            // SAFETY: p < 65536 entries, each an 8-byte aligned u64 in the live mapping.
            let lease = unsafe { &*self.waiters.as_ptr().add(p as usize) };
            lease.fetch_max(until_ns, Ordering::SeqCst);
        }
    }

    /// Empties the ring (its records only say "look again"); returns how many it held.
    pub fn drain(&mut self) -> usize {
        let mut n = 0;
        while self.ring.next().is_some() {
            n += 1;
        }
        n
    }
}

impl AsRawFd for Wake {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }
}

impl Drop for Wake {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what open() mapped. The leases are left to run out:
        // another `wait` may want the same ports.
        unsafe { libc::munmap(self.waiters.as_ptr().cast(), PORTS * 8) };
    }
}

/// The live set's key for a connection of the namespace with inode `netns`, as the kernel's
/// tracker builds it from the socket (addresses IPv4-mapped where they are IPv4).
pub fn key(netns: u64, c: &diag::Conn) -> ConnKey {
    let bytes = |a: std::net::IpAddr| match a {
        std::net::IpAddr::V4(a) => v4_mapped(a.octets()),
        std::net::IpAddr::V6(a) => a.octets(),
    };
    ConnKey {
        netns: netns as u32,
        lport: c.local.port(),
        rport: c.peer.port(),
        laddr: bytes(c.local.ip()),
        raddr: bytes(c.peer.ip()),
    }
}

/// BPF_NOEXIST: insert only if the key is not there yet.
const NOEXIST: u64 = 1;

/// A tracker's maps, opened once from their pins.
pub struct Tracker {
    live: Live,
    /// The set of live passive connections (namespace and 4-tuple -> port).
    socks: HashMap<MapData, ConnKey, u32>,
    /// The set's max_entries.
    capacity: u32,
    stats: PerCpuArray<MapData, TrackStats>,
    /// Its config, where the seed records the connections it could not insert.
    config: Array<MapData, TrackConfig>,
    /// The servers in other namespaces counted under a gated port (None: a gate pinned by
    /// a version without it; `gate on` again adds it).
    follow: Option<HashMap<MapData, FollowKey, u32>>,
    /// The tracker's link pin (its program's recursion misses are read through it).
    link: std::path::PathBuf,
    /// The program's id, for a tracker whose link is not pinned (`wait`'s own).
    prog_id: Option<u32>,
    /// [`Tracker::missed`] when this process last rechecked the set.
    rechecked: u64,
    /// Entries the last recheck could not judge ([`Recheck::unchecked`]).
    unchecked: u64,
}

impl Tracker {
    pub fn open(dir: &Path) -> Result<Self> {
        let socks = pins::open_map(dir, map::SOCKS)?;
        let capacity = socks.info().map_or(0, |i| i.max_entries());
        let config: Array<MapData, TrackConfig> =
            Array::try_from(Map::Array(pins::open_map(dir, map::TRACK)?))?;
        Ok(Tracker {
            live: Live::open(dir)?,
            socks: HashMap::try_from(Map::HashMap(socks))?,
            capacity,
            stats: PerCpuArray::try_from(Map::PerCpuArray(pins::open_map(dir, map::TSTATS)?))?,
            config,
            follow: pins::open_map(dir, map::FOLLOW)
                .ok()
                .and_then(|m| HashMap::try_from(Map::HashMap(m)).ok()),
            link: pins::LinkPin::Track.path(dir),
            prog_id: None,
            rechecked: 0,
            unchecked: 0,
        })
    }

    /// Reads the program's skips through its id rather than its link's pin (a tracker
    /// whose link is held by this process only).
    pub fn set_prog_id(&mut self, id: u32) {
        self.prog_id = Some(id);
    }

    /// Live connections on `port` (never below zero: see the set rule in the kernel's
    /// track.rs).
    pub fn live(&self, port: u16) -> i64 {
        self.live.at(port).load(Ordering::Relaxed)
    }

    /// True when the connection `c` (of the tracker's namespace) is one the counts are made
    /// of.
    pub fn contains(&self, c: &diag::Conn) -> bool {
        self.netns().is_ok_and(|ns| self.contains_in(ns, c))
    }

    /// The same for a connection of the namespace with inode `netns` (a followed one).
    pub fn contains_in(&self, netns: u64, c: &diag::Conn) -> bool {
        self.socks.get(&key(netns, c), 0).is_ok()
    }

    /// The inode of the namespace the tracker counts in, as its config says (read when
    /// needed: a gate opens its tracker before `gate on` configures it).
    fn netns(&self) -> Result<u64> {
        Ok(u64::from(self.config.get(&0, 0)?.netns_inum))
    }

    /// How many connections the live set holds (its max_entries as created).
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// The tracker's counters, summed over CPUs; `insert_failed` includes the seed's.
    pub fn stats(&self) -> Result<TrackStats> {
        let mut s: TrackStats = self.stats.get(&0, 0)?.iter().sum();
        s.insert_failed += u64::from(self.config.get(&0, 0)?.seed_failed);
        Ok(s)
    }

    /// State changes the kernel did not run the tracker for, because its program was
    /// already running on that CPU (the program's `recursion_misses`, Linux 5.12+: a task
    /// preempted inside it, or an interrupt, where the kernel can preempt a tracepoint's
    /// programs, as Debian's 7.3 does). Each is a connection counted that has closed, or
    /// one open that is not counted, until [`Tracker::recheck`] puts the set right.
    ///
    /// Test-only knob, not an option: `DRAIN_TRACKER_MISSES=N` adds N, so a test can show
    /// the recheck on a kernel that never skips the tracker; `DRAIN_TRACKER_MISSES=grow`
    /// adds one more at every read, as a busy host's other traffic would.
    pub fn missed(&self) -> u64 {
        static GROWN: AtomicU64 = AtomicU64::new(0);
        let kernel = match self.prog_id {
            Some(id) => crate::sys::prog_recursion_misses(id).unwrap_or(0),
            None => crate::links::tracing_misses(&self.link),
        };
        let injected = match std::env::var("DRAIN_TRACKER_MISSES") {
            Ok(v) if v == "grow" => GROWN.fetch_add(1, Ordering::Relaxed) + 1,
            Ok(v) => v.parse::<u64>().unwrap_or(0),
            Err(_) => 0,
        };
        kernel + injected
    }

    /// True when the kernel has skipped the tracker since this process last rechecked the
    /// set: the counts may be wrong either way until [`Tracker::recheck`] runs.
    pub fn stale(&self) -> bool {
        self.missed() > self.rechecked
    }

    /// Entries of the last recheck left unjudged (namespaces nothing opens any more).
    pub fn unchecked(&self) -> u64 {
        self.unchecked
    }

    /// Fails when the tracker has lost events for good (its set was full, a kernel read
    /// failed): a count that may be low must not end a drain. (Skips are not lost for good:
    /// see [`Tracker::stale`].)
    pub fn check_exact(&self) -> Result<()> {
        let s = self.stats()?;
        if s.insert_failed != 0 || s.read_failed != 0 {
            bail!(
                "the connection tracker lost events ({} failed inserts, {} failed kernel \
                 reads): live counts may be low, so drain will not report the ports drained",
                s.insert_failed,
                s.read_failed,
            );
        }
        Ok(())
    }

    /// Puts the set right after the kernel skipped the tracker: every namespace it counts
    /// in is dumped (inet_diag) and compared with the set. An entry whose connection is no
    /// longer ESTABLISHED or CLOSE_WAIT is taken out (its count lowered when this delete,
    /// not the tracker's, removed it); a counted connection the set lacks is added (NOEXIST,
    /// as the seed does). Only entries the set held before the first dump are judged, and
    /// only by two dumps that both lack them: a dump is not atomic, and one that missed a
    /// live connection must not take it out of the counts. Added connections a second
    /// dump no longer has are taken out again (they closed in between, unseen). Safe beside
    /// the tracker and beside another recheck: every change is a conditional insert or
    /// delete, so each connection is counted once.
    ///
    /// `known` opens namespaces the caller already has a handle for (a followed server's);
    /// any other is looked for among everything on the host that holds one, which reads
    /// every process's fds, once per recheck that needs it.
    pub fn recheck(&mut self, known: &[(u64, &Path)]) -> Result<Recheck> {
        let missed = self.missed();
        let own = self.netns()?;
        let here = netns::current_inode()?;
        // The set as it is before the dumps: (namespace) -> entries.
        let mut tracked: BTreeMap<u64, Vec<(ConnKey, u16)>> = BTreeMap::new();
        for (k, port) in self.socks.iter().filter_map(Result::ok) {
            tracked
                .entry(u64::from(k.netns))
                .or_default()
                .push((k, port as u16));
        }
        let mut counted: BTreeMap<u64, Counted> = BTreeMap::new();
        counted.insert(own, Counted::Listeners);
        for (k, gated) in self.followed() {
            if let Counted::Ports(m) = counted
                .entry(u64::from(k.netns_inum))
                .or_insert_with(|| Counted::Ports(BTreeMap::new()))
            {
                m.insert(k.port as u16, gated);
            }
        }
        for ns in tracked.keys() {
            counted
                .entry(*ns)
                .or_insert_with(|| Counted::Ports(BTreeMap::new()));
        }
        let mut out = Recheck {
            missed,
            ..Default::default()
        };
        let mut held: Option<StdHashMap<u64, std::path::PathBuf>> = None;
        let mut failed = 0u32;
        for (ns, what) in &counted {
            let entries = tracked.get(ns).map_or(&[][..], Vec::as_slice);
            let handle = if *ns == here {
                None
            } else if let Some((_, h)) = known.iter().find(|(k, _)| k == ns) {
                Some(h.to_path_buf())
            } else {
                match held.get_or_insert_with(netns::held_namespaces).get(ns) {
                    Some(h) => Some(h.clone()),
                    None => {
                        out.unchecked += entries.len() as u64;
                        continue;
                    }
                }
            };
            let (added, removed) =
                self.recheck_in(*ns, handle.as_deref(), what, entries, &mut failed)?;
            out.added += added;
            out.removed += removed;
        }
        self.note_seed_failed(failed)?;
        self.rechecked = missed;
        self.unchecked = out.unchecked;
        Ok(out)
    }

    /// Adds one connection found by a dump to the live set, counted under `port`; true when
    /// this insert counted it (not the tracker, which may have seen it first).
    fn seed_one(&mut self, k: ConnKey, port: u16, failed: &mut u32) -> bool {
        match self.socks.insert(k, u32::from(port), NOEXIST) {
            Ok(()) => {
                self.live.add(port, 1);
                true
            }
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                false
            }
            // The set is full: the count is now low, which must show (and stop `wait` from
            // reporting "drained").
            Err(_) => {
                *failed += 1;
                false
            }
        }
    }

    /// Adds `failed` seed inserts to the count the tracker's `insert_failed` includes.
    fn note_seed_failed(&mut self, failed: u32) -> Result<()> {
        if failed != 0 {
            let mut cfg = self.config.get(&0, 0)?;
            cfg.seed_failed = cfg.seed_failed.saturating_add(failed);
            self.config.set(0, cfg, 0)?;
        }
        Ok(())
    }

    /// One namespace's part of a recheck (and the whole of a seed, with no entries): the
    /// connections `counted` names that the set lacks are added, and `entries` (the set's,
    /// of this namespace) whose connection two dumps lack are taken out. Dumps in the
    /// namespace `handle` opens (None: this process's). Returns (added, removed).
    fn recheck_in(
        &mut self,
        ns: u64,
        handle: Option<&Path>,
        counted: &Counted,
        entries: &[(ConnKey, u16)],
        failed: &mut u32,
    ) -> Result<(u64, u64)> {
        let dump = |states: diag::States| -> Result<Vec<diag::Conn>> {
            match handle {
                None => diag::dump(states, false),
                Some(h) => netns::run_in(h, || diag::dump(states, false))?,
            }
        };
        let live = || diag::States::ESTABLISHED | diag::States::CLOSE_WAIT;
        let keys =
            |d: Vec<diag::Conn>| -> HashSet<ConnKey> { d.iter().map(|c| key(ns, c)).collect() };
        let listening: HashSet<u16> = match counted {
            Counted::Listeners => dump(diag::States::LISTEN)?
                .iter()
                .map(|c| c.local.port())
                .collect(),
            Counted::Ports(_) => HashSet::new(),
        };
        let first = dump(live())?;
        let mut added = Vec::new();
        for c in &first {
            let lport = c.local.port();
            let port = match counted {
                Counted::Listeners => listening.contains(&lport).then_some(lport),
                Counted::Ports(m) => m.get(&lport).copied(),
            };
            if let Some(port) = port {
                let k = key(ns, c);
                if self.seed_one(k, port, failed) {
                    added.push((k, port));
                }
            }
        }
        let first = keys(first);
        let gone: Vec<(ConnKey, u16)> = entries
            .iter()
            .filter(|(k, _)| !first.contains(k))
            .copied()
            .collect();
        if added.is_empty() && gone.is_empty() {
            return Ok((0, 0));
        }
        let second = keys(dump(live())?);
        let mut take_out = |list: &[(ConnKey, u16)]| -> u64 {
            let mut n = 0;
            for (k, port) in list {
                if !second.contains(k) && self.socks.remove(k).is_ok() {
                    self.live.add(*port, -1);
                    n += 1;
                }
            }
            n
        };
        let undone = take_out(&added);
        let removed = take_out(&gone);
        Ok((added.len() as u64 - undone, removed))
    }

    /// Adds the live passive connections that predate the tracker. Call after it is
    /// attached: a connection that opens in between is then seen by both, and the NOEXIST
    /// insert lets exactly one of them count it. One that closes between the dump and the
    /// insert would be counted forever; a second dump finds those and takes them out again.
    pub fn seed(&mut self) -> Result<usize> {
        let netns = self.netns()?;
        let mut failed = 0u32;
        let (added, _) = self.recheck_in(netns, None, &Counted::Listeners, &[], &mut failed)?;
        self.note_seed_failed(failed)?;
        Ok(added as usize)
    }

    /// The servers followed in other namespaces: (key, gated port).
    pub fn followed(&self) -> Vec<(FollowKey, u16)> {
        self.follow.as_ref().map_or_else(Vec::new, |m| {
            m.iter().flatten().map(|(k, v)| (k, v as u16)).collect()
        })
    }

    /// Stops counting new passive opens of a followed server (its namespace is gone).
    /// Connections already counted still leave the set exactly: leaving needs no entry.
    pub fn unfollow(&mut self, key: FollowKey) {
        if let Some(m) = self.follow.as_mut() {
            let _ = m.remove(&key);
        }
    }

    /// Counts the passive connections of the server on `key.port` in another namespace
    /// (entered through `handle`) under `gated`: from now on in the kernel, and those that
    /// predate it by a seed made there, with the same rules as [`Tracker::seed`] (the
    /// entry first, then the dump; a second dump takes out what closed in between).
    /// Returns how many it seeded.
    pub fn follow(&mut self, key: FollowKey, gated: u16, handle: &Path) -> Result<usize> {
        let Some(follow) = self.follow.as_mut() else {
            bail!(
                "this gate was made by an older drain-user and cannot follow connections into \
                 other namespaces: run `drain-user gate on` again"
            );
        };
        follow
            .insert(key, u32::from(gated), 0)
            .context("adding a followed server (DRAIN_FOLLOW)")?;
        let mut cfg = self.config.get(&0, 0)?;
        if cfg.follow == 0 {
            cfg.follow = 1;
            self.config.set(0, cfg, 0)?;
        }
        let there = u64::from(key.netns_inum);
        let counted = Counted::Ports(BTreeMap::from([(key.port as u16, gated)]));
        let mut failed = 0u32;
        let (added, _) = self.recheck_in(there, Some(handle), &counted, &[], &mut failed)?;
        self.note_seed_failed(failed)?;
        Ok(added as usize)
    }
}

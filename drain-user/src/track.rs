//! User side of the connection tracker: configure and attach it, seed it with the
//! connections that predate it, and read the live counts.

use std::{
    collections::HashSet,
    os::fd::{AsFd, AsRawFd},
    path::Path,
    ptr::NonNull,
    sync::atomic::{AtomicI64, Ordering},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    programs::{links::FdLink, BtfTracePoint},
    Ebpf,
};
use drain_common::{map, prog, TrackConfig, TrackStats};

use crate::{btf::Btf, diag, pins};

/// Reads the kernel struct offsets from BTF and writes the tracker's config.
fn configure(bpf: &mut Ebpf) -> Result<()> {
    let btf = Btf::from_sys_fs()?;
    let cfg = TrackConfig {
        netns_inum: pins::netns_inode()? as u32,
        off_num: btf.offset("sock", "__sk_common.skc_num")?,
        off_net: btf.offset("sock", "__sk_common.skc_net")?,
        off_inum: btf.offset("net", "ns.inum")?,
    };
    let mut track: Array<&mut MapData, TrackConfig> = Array::try_from(
        bpf.map_mut(map::TRACK)
            .context("object lacks the tracker config map")?,
    )?;
    track.set(0, cfg, 0).context("writing the tracker config")?;
    Ok(())
}

/// Loads and attaches the tracker; the returned link detaches when dropped unless pinned.
pub fn attach(bpf: &mut Ebpf) -> Result<FdLink> {
    configure(bpf)?;
    let btf =
        aya::Btf::from_sys_fs().context("reading the kernel's BTF (/sys/kernel/btf/vmlinux)")?;
    let prog: &mut BtfTracePoint = bpf
        .program_mut(prog::TRACK)
        .context("the eBPF object has no tracker program")?
        .try_into()?;
    prog.load("inet_sock_set_state", &btf)
        .context("the kernel rejected the connection tracker (tp_btf/inet_sock_set_state)")?;
    let id = prog.attach().context("attaching the connection tracker")?;
    Ok(prog.take_link(id)?.into())
}

/// The live counters, mapped into this process: reading them is a memory load, so `wait`
/// can poll every few milliseconds for free.
pub struct Live {
    base: NonNull<AtomicI64>,
    _map: MapData,
}

const PORTS: usize = 65536;

impl Live {
    pub fn open(dir: &Path) -> Result<Self> {
        let map = MapData::from_pin(dir.join(map::LIVE))
            .with_context(|| format!("opening {}", dir.join(map::LIVE).display()))?;
        let len = PORTS * 8;
        // SAFETY: mapping a BPF_F_MMAPABLE array of exactly this size, shared with the kernel.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of the live-connection map");
        }
        Ok(Live {
            base: NonNull::new(p.cast()).context("mmap returned null")?,
            _map: map,
        })
    }

    fn at(&self, port: u16) -> &AtomicI64 {
        // SAFETY: port < 65536 entries, each an 8-byte aligned i64 in the live mapping.
        unsafe { &*self.base.as_ptr().add(port as usize) }
    }

    /// Live connections on `port` (never below zero: see the set rule in track.rs).
    pub fn get(&self, port: u16) -> i64 {
        self.at(port).load(Ordering::Relaxed)
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

/// The tracker's set of live passive connections (cookie -> port), to pick out of an
/// inet_diag dump exactly the connections the counts are made of.
pub struct Set(HashMap<MapData, u64, u32>);

impl Set {
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(map::SOCKS);
        let data =
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Set(HashMap::try_from(Map::HashMap(data))?))
    }

    pub fn contains(&self, cookie: u64) -> bool {
        self.0.get(&cookie, 0).is_ok()
    }
}

/// Adds the live passive connections that predate the tracker. Call after it is attached:
/// a connection that opens in between is then seen by both, and the NOEXIST insert lets
/// exactly one of them count it. One that closes between the dump and the insert would be
/// counted forever; a second dump finds those and takes them out again.
pub fn seed(dir: &Path) -> Result<usize> {
    let live = Live::open(dir)?;
    let mut socks: HashMap<MapData, u64, u32> =
        HashMap::try_from(Map::HashMap(MapData::from_pin(dir.join(map::SOCKS))?))?;
    let mut seeded = Vec::new();
    for c in diag::passive_live(false)? {
        let port = c.local.port();
        if socks
            .insert(c.cookie, u32::from(port), aya_noexist())
            .is_ok()
        {
            live.add(port, 1);
            seeded.push((c.cookie, port));
        }
    }
    let still: HashSet<u64> =
        diag::dump(diag::States::ESTABLISHED | diag::States::CLOSE_WAIT, false)?
            .iter()
            .map(|c| c.cookie)
            .collect();
    for (cookie, port) in &seeded {
        if !still.contains(cookie) && socks.remove(cookie).is_ok() {
            live.add(*port, -1);
        }
    }
    Ok(seeded.len())
}

const fn aya_noexist() -> u64 {
    1 // BPF_NOEXIST
}

/// Summed tracker counters; non-zero failures mean the counts cannot be trusted.
pub fn stats(dir: &Path) -> Result<TrackStats> {
    let m: PerCpuArray<MapData, TrackStats> =
        PerCpuArray::try_from(Map::PerCpuArray(MapData::from_pin(dir.join(map::TSTATS))?))?;
    let mut t = TrackStats::default();
    for s in m.get(&0, 0)?.iter() {
        t.added += s.added;
        t.removed += s.removed;
        t.insert_failed += s.insert_failed;
        t.read_failed += s.read_failed;
    }
    Ok(t)
}

/// Fails when the tracker has lost events: a count that may be low must not end a drain.
pub fn check_exact(dir: &Path) -> Result<()> {
    let s = stats(dir)?;
    if s.insert_failed != 0 || s.read_failed != 0 {
        bail!(
            "the connection tracker lost events ({} failed inserts, {} failed kernel reads): \
             live counts may be low, so drain will not report the ports drained",
            s.insert_failed,
            s.read_failed
        );
    }
    Ok(())
}

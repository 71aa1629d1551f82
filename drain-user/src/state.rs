//! The gate's pinned maps: opening them, and reading/writing ports, config and counters.
//! Kernel-side contract of each map: drain-common's `map` module.

use std::{collections::BTreeSet, path::Path};

use anyhow::{bail, Context, Result};
use aya::maps::{lpm_trie::Key, Array, LpmTrie, Map, MapData, PerCpuArray, PerCpuValues};
use drain_common::{map, GateConfig, PortStats, MAX_GATED_PORTS};
use ipnet::IpNet;

fn open(dir: &Path, name: &str) -> Result<MapData> {
    let path = dir.join(name);
    MapData::from_pin(&path).with_context(|| {
        format!(
            "opening the pinned map {}: the gate state is incomplete; run `drain-user gate off` to reset it",
            path.display()
        )
    })
}

pub fn config(dir: &Path) -> Result<Array<MapData, GateConfig>> {
    Ok(Array::try_from(Map::Array(open(dir, map::CONFIG)?))?)
}

pub fn read_config(dir: &Path) -> Result<GateConfig> {
    Ok(config(dir)?.get(&0, 0)?)
}

pub fn write_config(dir: &Path, cfg: GateConfig) -> Result<()> {
    config(dir)?
        .set(0, cfg, 0)
        .context("writing the gate switch (DRAIN_CONFIG)")
}

/// One gated port: its counters summed over CPUs (see drain_common::PortStats for each),
/// and its live connections (filled in by `status` from the tracker). This is also the
/// shape of each `ports` entry in `status --json`.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct PortCounters {
    pub port: u16,
    /// Connections accepted on this port that are ESTABLISHED or CLOSE_WAIT right now.
    pub live_connections: i64,
    pub syns_refused: u64,
    pub syns_passed: u64,
    pub syns_allowed: u64,
    pub syns_expired: u64,
    /// Refused SYNs answered with a RST (policy reset).
    pub rst_sent: u64,
    /// Refused SYNs dropped instead of reset: RST rate limit reached.
    pub rst_limited: u64,
}

/// The gated ports and their counters, as (slot, counters), ordered by port.
pub fn ports(dir: &Path) -> Result<Vec<(u32, PortCounters)>> {
    let stats: PerCpuArray<MapData, PortStats> =
        PerCpuArray::try_from(Map::PerCpuArray(open(dir, map::STATS)?))?;
    let mut out = Vec::new();
    for slot in 1..=MAX_GATED_PORTS {
        let per_cpu = stats.get(&slot, 0)?;
        let port = per_cpu.iter().next().map_or(0, |s| s.port);
        if port == 0 {
            continue;
        }
        let mut c = PortCounters {
            port: port as u16,
            ..Default::default()
        };
        for s in per_cpu.iter() {
            c.syns_refused += s.syns_refused;
            c.syns_passed += s.syns_passed;
            c.syns_allowed += s.syns_allowed;
            c.syns_expired += s.syns_expired;
            c.rst_sent += s.rst_sent;
            c.rst_limited += s.rst_limited;
        }
        out.push((slot, c));
    }
    out.sort_by_key(|(_, c)| c.port);
    Ok(out)
}

/// Makes the gated set exactly `want`: ports no longer wanted are released first (the safe
/// direction), then new ports get a zeroed slot before their PORTS entry points at it.
pub fn set_ports(dir: &Path, want: &BTreeSet<u16>) -> Result<()> {
    if want.len() > MAX_GATED_PORTS as usize {
        bail!("at most {MAX_GATED_PORTS} ports can be gated at once");
    }
    let current = ports(dir)?;
    let mut port_map: Array<MapData, u32> = Array::try_from(Map::Array(open(dir, map::PORTS)?))?;
    let mut stats: PerCpuArray<MapData, PortStats> =
        PerCpuArray::try_from(Map::PerCpuArray(open(dir, map::STATS)?))?;
    let ncpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
    let filled = |port: u16| -> Result<PerCpuValues<PortStats>> {
        let v = PortStats {
            port: port.into(),
            ..Default::default()
        };
        Ok(PerCpuValues::try_from(vec![v; ncpus])?)
    };
    let mut used = BTreeSet::new();
    for (slot, c) in &current {
        if want.contains(&c.port) {
            used.insert(*slot);
        } else {
            port_map.set(c.port.into(), 0, 0)?;
            stats.set(*slot, filled(0)?, 0)?;
        }
    }
    let have: BTreeSet<u16> = current.iter().map(|(_, c)| c.port).collect();
    for &port in want.difference(&have) {
        let slot = (1..=MAX_GATED_PORTS)
            .find(|s| !used.contains(s))
            .context("no free port slot")?;
        used.insert(slot);
        stats.set(slot, filled(port)?, 0)?;
        port_map.set(port.into(), slot, 0)?;
    }
    Ok(())
}

/// Makes the allowlists exactly `want`.
pub fn set_allow(dir: &Path, want: &[IpNet]) -> Result<()> {
    let mut v4: LpmTrie<MapData, [u8; 4], u8> =
        LpmTrie::try_from(Map::LpmTrie(open(dir, map::ALLOW4)?))?;
    let mut v6: LpmTrie<MapData, [u8; 16], u8> =
        LpmTrie::try_from(Map::LpmTrie(open(dir, map::ALLOW6)?))?;
    let old4: Vec<_> = v4.keys().collect::<Result<_, _>>()?;
    for k in old4 {
        v4.remove(&k)?;
    }
    let old6: Vec<_> = v6.keys().collect::<Result<_, _>>()?;
    for k in old6 {
        v6.remove(&k)?;
    }
    for net in want {
        match net.trunc() {
            IpNet::V4(n) => v4.insert(&Key::new(n.prefix_len().into(), n.addr().octets()), 1, 0)?,
            IpNet::V6(n) => v6.insert(&Key::new(n.prefix_len().into(), n.addr().octets()), 1, 0)?,
        }
    }
    Ok(())
}

/// The allowlisted prefixes.
pub fn allow(dir: &Path) -> Result<Vec<IpNet>> {
    let v4: LpmTrie<MapData, [u8; 4], u8> =
        LpmTrie::try_from(Map::LpmTrie(open(dir, map::ALLOW4)?))?;
    let v6: LpmTrie<MapData, [u8; 16], u8> =
        LpmTrie::try_from(Map::LpmTrie(open(dir, map::ALLOW6)?))?;
    let mut out = Vec::new();
    for k in v4.keys() {
        let k = k?;
        out.push(IpNet::new(k.data().into(), k.prefix_len() as u8)?);
    }
    for k in v6.keys() {
        let k = k?;
        out.push(IpNet::new(k.data().into(), k.prefix_len() as u8)?);
    }
    Ok(out)
}

/// CLOCK_BOOTTIME in ns: the clock `bpf_ktime_get_boot_ns` reads, so deadlines written here
/// compare correctly in the kernel (and keep counting through a suspend).
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and out-parameter.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

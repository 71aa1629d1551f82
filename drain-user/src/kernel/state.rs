//! [`OpenGate`]: one gate's pinned state, opened once, with what its callers need (the
//! switch and TTL, ports and their counters, allowlists, the tracker). Kernel-side contract
//! of each map: drain-common's `map` module.

use std::{
    collections::BTreeSet,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use aya::maps::{lpm_trie::Key, Array, LpmTrie, Map, MapData, PerCpuArray, PerCpuValues};
use drain_common::{map, GateConfig, PortStats, GATE_ON, MAX_GATED_PORTS};
use ipnet::IpNet;

use crate::{pins, track::Tracker};

/// One gated port: its stats slot and its counters summed over CPUs.
#[derive(Clone, Copy, Debug)]
pub struct GatedPort {
    pub slot: u32,
    pub port: u16,
    pub stats: PortStats,
}

/// A gate's maps, opened once from their pins.
pub struct OpenGate {
    dir: PathBuf,
    /// The state directory's inode when opened: a `gate off` followed by a new `gate on`
    /// makes a new directory with the same name (and new maps).
    dir_ino: u64,
    config: Array<MapData, GateConfig>,
    ports: Array<MapData, u32>,
    stats: PerCpuArray<MapData, PortStats>,
    allow4: LpmTrie<MapData, [u8; 4], u8>,
    allow6: LpmTrie<MapData, [u8; 16], u8>,
    tracker: Tracker,
}

fn dir_inode(dir: &Path) -> Result<u64> {
    Ok(std::fs::metadata(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .ino())
}

fn config_map(dir: &Path) -> Result<Array<MapData, GateConfig>> {
    Ok(Array::try_from(Map::Array(pins::open_map(
        dir,
        map::CONFIG,
    )?))?)
}

/// Turns the gate in `dir` off with one map write, opening nothing else: `gate off` does
/// this first, and must manage it even when other parts of the state are missing.
pub fn switch_off(dir: &Path) -> Result<()> {
    config_map(dir)?
        .set(0, GateConfig::default(), 0)
        .context("writing the gate switch (DRAIN_CONFIG)")
}

impl OpenGate {
    pub fn open(dir: &Path) -> Result<Self> {
        let dir_ino = dir_inode(dir)?;
        Ok(OpenGate {
            dir: dir.to_path_buf(),
            dir_ino,
            config: config_map(dir)?,
            ports: Array::try_from(Map::Array(pins::open_map(dir, map::PORTS)?))?,
            stats: PerCpuArray::try_from(Map::PerCpuArray(pins::open_map(dir, map::STATS)?))?,
            allow4: LpmTrie::try_from(Map::LpmTrie(pins::open_map(dir, map::ALLOW4)?))?,
            allow6: LpmTrie::try_from(Map::LpmTrie(pins::open_map(dir, map::ALLOW6)?))?,
            tracker: Tracker::open(dir)?,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// False once the gate these maps belong to has been removed (`gate off`), even when a
    /// new gate has been made in its place since.
    pub fn still_pinned(&self) -> bool {
        dir_inode(&self.dir).is_ok_and(|i| i == self.dir_ino)
    }

    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }

    pub fn tracker_mut(&mut self) -> &mut Tracker {
        &mut self.tracker
    }

    pub fn config(&self) -> Result<GateConfig> {
        self.config
            .get(&0, 0)
            .context("reading the gate switch (DRAIN_CONFIG)")
    }

    /// One map write: the programs see the new config on their next packet.
    pub fn set_config(&mut self, cfg: GateConfig) -> Result<()> {
        self.config
            .set(0, cfg, 0)
            .context("writing the gate switch (DRAIN_CONFIG)")
    }

    /// Pushes the deadline of a gate that is on forward to a full TTL from now, once less
    /// than half of it is left (so the lock is taken rarely); an expired gate stays open.
    /// `wait` calls it while it runs, so a long drain does not reopen the gate early, while
    /// a `wait` that dies still lets the TTL open it. Returns when to call it again
    /// ([`renew_interval`]).
    pub fn renew_ttl(&mut self) -> Result<Duration> {
        let cfg = self.config()?;
        let next = renew_interval(&cfg);
        let now = boottime_ns();
        if cfg.enabled != GATE_ON
            || cfg.ttl_ns == 0
            || cfg.deadline_ns <= now
            || cfg.deadline_ns - now >= cfg.ttl_ns / 2
        {
            return Ok(next);
        }
        // Under the lock, re-read: a concurrent `gate on` may have replaced the config,
        // and a `gate off` the whole gate.
        // Never blocks: a `wait` must keep polling (and answering SIGTERM) while another
        // call holds the lock, or one stopped with SIGSTOP does. It tries again shortly.
        let Some(_lock) = pins::try_lock()? else {
            return Ok(next.min(Duration::from_millis(100)));
        };
        if !self.still_pinned() {
            return Ok(next);
        }
        let mut cfg = self.config()?;
        if cfg.enabled == GATE_ON {
            cfg.deadline_ns = boottime_ns().saturating_add(cfg.ttl_ns);
            self.set_config(cfg)?;
        }
        Ok(renew_interval(&cfg))
    }

    /// Every slot's counters summed over CPUs (index = slot), read in one
    /// BPF_MAP_LOOKUP_BATCH instead of a lookup per slot (arrays have it since Linux 5.6);
    /// None when the kernel does not do it.
    fn all_stats(&self) -> Option<Vec<PortStats>> {
        use std::os::fd::{AsFd, AsRawFd};

        use aya::maps::IterableMap;
        let ncpus = aya::util::nr_cpus().ok()?;
        let slots = MAX_GATED_PORTS as usize + 1;
        // Per-CPU values come 8-byte aligned, one after the other, for each key.
        let stride = std::mem::size_of::<PortStats>().next_multiple_of(8);
        let mut keys = vec![0u32; slots];
        let mut values = vec![0u8; slots * ncpus * stride];
        let mut next = 0u32;
        let fd = self.stats.map().fd().as_fd().as_raw_fd();
        // union bpf_attr, BPF_MAP_*_BATCH: { __aligned_u64 in_batch, out_batch, keys,
        // values; __u32 count, map_fd; __u64 elem_flags, flags; }. in_batch 0: from the start.
        let mut attr = [0u64; 16];
        attr[1] = std::ptr::from_mut(&mut next) as u64;
        attr[2] = keys.as_mut_ptr() as u64;
        attr[3] = values.as_mut_ptr() as u64;
        attr[4] = slots as u64 | (u64::from(fd as u32) << 32);
        match crate::sys::bpf(crate::sys::BPF_MAP_LOOKUP_BATCH, &mut attr) {
            Ok(_) => {}
            // The whole array read before the count ran out.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(_) => return None,
        }
        let read = attr[4] as u32 as usize;
        if read != slots || keys.iter().enumerate().any(|(i, &k)| k as usize != i) {
            return None;
        }
        Some(
            values
                .chunks_exact(ncpus * stride)
                .map(|per_cpu| {
                    per_cpu
                        .chunks_exact(stride)
                        .map(|v| {
                            bytemuck::pod_read_unaligned::<PortStats>(
                                &v[..std::mem::size_of::<PortStats>()],
                            )
                        })
                        .collect::<Vec<_>>()
                        .iter()
                        .sum()
                })
                .collect(),
        )
    }

    /// The gated ports and their counters, ordered by port.
    pub fn ports(&self) -> Result<Vec<GatedPort>> {
        let mut out = Vec::new();
        let all = self.all_stats();
        for slot in 1..=MAX_GATED_PORTS {
            let stats: PortStats = match &all {
                Some(all) => all[slot as usize],
                None => self.stats.get(&slot, 0)?.iter().sum(),
            };
            if stats.port == 0 {
                continue;
            }
            out.push(GatedPort {
                slot,
                port: stats.port as u16,
                stats,
            });
        }
        out.sort_by_key(|p| p.port);
        Ok(out)
    }

    /// Makes the gated set exactly `want`: ports no longer wanted are released first (the
    /// safe direction), then new ports get a zeroed slot before their PORTS entry points at it.
    pub fn set_ports(&mut self, want: &BTreeSet<u16>) -> Result<()> {
        crate::limits::check_port_count(want.len())?;
        let current = self.ports()?;
        let ncpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        let filled = |port: u16| -> Result<PerCpuValues<PortStats>> {
            let v = PortStats {
                port: port.into(),
                ..Default::default()
            };
            Ok(PerCpuValues::try_from(vec![v; ncpus])?)
        };
        let mut used = BTreeSet::new();
        for p in &current {
            if want.contains(&p.port) {
                used.insert(p.slot);
            } else {
                self.ports.set(p.port.into(), 0, 0)?;
                self.stats.set(p.slot, filled(0)?, 0)?;
            }
        }
        let have: BTreeSet<u16> = current.iter().map(|p| p.port).collect();
        for &port in want.difference(&have) {
            let slot = (1..=MAX_GATED_PORTS)
                .find(|s| !used.contains(s))
                .context("no free port slot")?;
            used.insert(slot);
            self.stats.set(slot, filled(port)?, 0)?;
            self.ports.set(port.into(), slot, 0)?;
        }
        Ok(())
    }

    /// The allowlisted prefixes, IPv4 first.
    pub fn allow(&self) -> Result<Vec<IpNet>> {
        let mut out = Vec::new();
        for k in self.allow4.keys() {
            let k = k?;
            out.push(IpNet::new(k.data().into(), k.prefix_len() as u8)?);
        }
        for k in self.allow6.keys() {
            let k = k?;
            out.push(IpNet::new(k.data().into(), k.prefix_len() as u8)?);
        }
        Ok(out)
    }

    /// Makes the allowlists exactly `want`: entries no longer wanted go first, then the new
    /// ones, so a trie never holds more than the larger of the old and the new list.
    pub fn set_allow(&mut self, want: &[IpNet]) -> Result<()> {
        // No host bits to clear: `--allow` refuses prefixes with any (`cli::parse_allow`).
        let want: BTreeSet<IpNet> = want.iter().copied().collect();
        let have: BTreeSet<IpNet> = self.allow()?.into_iter().collect();
        for net in have.difference(&want) {
            match net {
                IpNet::V4(n) => self
                    .allow4
                    .remove(&Key::new(n.prefix_len().into(), n.addr().octets()))?,
                IpNet::V6(n) => self
                    .allow6
                    .remove(&Key::new(n.prefix_len().into(), n.addr().octets()))?,
            }
        }
        for net in want.difference(&have) {
            match net {
                IpNet::V4(n) => {
                    let key = Key::new(n.prefix_len().into(), n.addr().octets());
                    self.allow4.insert(&key, 1, 0)?
                }
                IpNet::V6(n) => {
                    let key = Key::new(n.prefix_len().into(), n.addr().octets());
                    self.allow6.insert(&key, 1, 0)?
                }
            }
        }
        Ok(())
    }

    /// Replaces the ports, the allowlists and the config as one change: when a map write
    /// fails part-way, the old ports, allowlists and config are written back, so the gate is
    /// either the new one or the old one, never a mix. The config goes last: it is the one
    /// write that makes the new gate active. (Checks that can fail on input, such as the
    /// number of ports or prefixes, come before this.)
    pub fn replace(
        &mut self,
        ports: &BTreeSet<u16>,
        allow: &[IpNet],
        cfg: GateConfig,
    ) -> Result<()> {
        let old_ports: BTreeSet<u16> = self.ports()?.iter().map(|p| p.port).collect();
        let old_allow = self.allow()?;
        let old_cfg = self.config()?;
        let applied = self
            .set_ports(ports)
            .and_then(|()| self.set_allow(allow))
            .and_then(|()| self.set_config(cfg));
        if let Err(e) = applied {
            let restored = self
                .set_config(old_cfg)
                .and_then(|()| self.set_allow(&old_allow))
                .and_then(|()| self.set_ports(&old_ports));
            return Err(match restored {
                Ok(()) => e.context("changing the gate failed; the previous gate is unchanged"),
                Err(r) => e.context(format!(
                    "changing the gate failed, and so did restoring the previous one ({r:#}): \
                     run `drain-user gate off`"
                )),
            });
        }
        Ok(())
    }
}

/// How often `wait` checks the TTL for renewal (and notices a `gate off`): every second,
/// and at least four times per TTL, so that the half-life renewal of even a short TTL
/// comes well before it runs out. (Checking on every 5 ms poll would cost a map lookup
/// each time for nothing.)
fn renew_interval(cfg: &GateConfig) -> Duration {
    const EVERY: Duration = Duration::from_secs(1);
    match cfg.ttl_ns {
        0 => EVERY,
        ttl => EVERY.min(Duration::from_nanos(ttl / 4)),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_well_before_the_ttl() {
        let cfg = |ttl: Duration| GateConfig {
            ttl_ns: ttl.as_nanos() as u64,
            ..Default::default()
        };
        assert_eq!(renew_interval(&cfg(Duration::ZERO)), Duration::from_secs(1));
        assert_eq!(
            renew_interval(&cfg(Duration::from_secs(600))),
            Duration::from_secs(1)
        );
        assert_eq!(
            renew_interval(&cfg(Duration::from_secs(2))),
            Duration::from_millis(500)
        );
    }
}

//! The gate's record of why each interface got its hook: `gate on` writes one per
//! interface it attaches ([`save`]), `status` reads them back ([`records`]) and shows the
//! reason next to the kernel's own view of the attachment.
//!
//! A hash map of drain-user's (the eBPF object never reads it) pinned in the state
//! directory as [`CHOICES`]: key ifindex, value [`Record`]. It goes with the rest of the
//! gate's pins at `gate off`. A gate made before it existed has none: its reasons are
//! unknown (null), never guessed.

use std::path::Path;

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};

use crate::{
    domain::{
        attach::{Decision, Device, Hook, Reason},
        AttachChoice,
    },
    sys,
};

/// The pinned map's name in the state directory.
pub const CHOICES: &str = "DRAIN_ATTACH";
/// At most this many interfaces in one gate's record.
const MAX_RECORDS: u32 = 4096;

/// One interface's choice, as decided when it was attached.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Record {
    pub ifindex: u32,
    /// [`AttachChoice::to_raw`].
    pub asked: u8,
    /// 0 xdp, 1 tc.
    pub hook: u8,
    /// [`Reason::to_raw`].
    pub reason: u8,
    /// 1 for a physical device (then `name` is its driver), 0 for a virtual one (its kind).
    pub physical: u8,
    /// The device's kind or driver, NUL-padded.
    pub name: [u8; 32],
}
const _: () = assert!(std::mem::size_of::<Record>() == 40);
// SAFETY: repr(C), no implicit padding (bytemuck's derive checks), every bit pattern valid.
unsafe impl aya::Pod for Record {}

impl Record {
    pub fn new(ifindex: u32, d: &Decision) -> Self {
        let (physical, name) = match &d.device {
            Device::Physical(driver) => (1, driver.as_str()),
            Device::Virtual(kind) => (0, kind.as_str()),
        };
        let mut rec = Record {
            ifindex,
            asked: d.asked.to_raw(),
            hook: match d.hook {
                Hook::Xdp => 0,
                Hook::Tc => 1,
            },
            reason: d.reason.to_raw(),
            physical,
            name: [0; 32],
        };
        let n = name.len().min(31);
        rec.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        rec
    }

    /// The decision it records; None for a record this version cannot read.
    pub fn decision(&self) -> Option<Decision> {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(32);
        let name = String::from_utf8_lossy(&self.name[..end]).into_owned();
        Some(Decision {
            asked: AttachChoice::from_raw(self.asked)?,
            hook: match self.hook {
                0 => Hook::Xdp,
                1 => Hook::Tc,
                _ => return None,
            },
            reason: Reason::from_raw(self.reason)?,
            device: if self.physical == 1 {
                Device::Physical(name)
            } else {
                Device::Virtual(name)
            },
        })
    }
}

/// The recorded decisions of the gate in `dir`, by ifindex; empty when it has none.
pub fn records(dir: &Path) -> Result<Vec<(u32, Decision)>> {
    let path = dir.join(CHOICES);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let map = open(dir)?;
    let mut out: Vec<(u32, Decision)> = map
        .iter()
        .filter_map(|r| r.ok())
        .filter_map(|(k, v)| Some((k, v.decision()?)))
        .collect();
    out.sort_by_key(|(i, _)| *i);
    Ok(out)
}

fn open(dir: &Path) -> Result<BpfHashMap<MapData, u32, Record>> {
    let path = dir.join(CHOICES);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening the attach record {}", path.display()))?;
    BpfHashMap::try_from(Map::HashMap(data))
        .with_context(|| format!("{} is not drain's attach record", path.display()))
}

/// Records `d` for `ifindex` in the gate in `dir`, creating the map on first use.
pub fn save(dir: &Path, ifindex: u32, d: &Decision) -> Result<()> {
    let path = dir.join(CHOICES);
    if !path.exists() {
        let fd = sys::hash_map_create(CHOICES, std::mem::size_of::<Record>() as u32, MAX_RECORDS)
            .context("creating the attach record map")?;
        let data = MapData::from_fd(fd).context("opening the new attach record map")?;
        data.pin(&path)
            .with_context(|| format!("pinning the attach record map at {}", path.display()))?;
    }
    open(dir)?
        .insert(ifindex, Record::new(ifindex, d), 0)
        .context("writing the attach record")
}

/// Forgets the record of `ifindex` (a rolled-back attachment).
pub fn forget(dir: &Path, ifindex: u32) -> Result<()> {
    if !dir.join(CHOICES).exists() {
        return Ok(());
    }
    match open(dir)?.remove(&ifindex) {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(e).context("removing the attach record"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_holds_its_decision() {
        for d in [
            Decision {
                asked: AttachChoice::Auto,
                hook: Hook::Tc,
                reason: Reason::Virtual,
                device: Device::Virtual("veth".into()),
            },
            Decision {
                asked: AttachChoice::Auto,
                hook: Hook::Xdp,
                reason: Reason::NativeXdp,
                device: Device::Physical("ixgbe".into()),
            },
            Decision {
                asked: AttachChoice::Xdp,
                hook: Hook::Xdp,
                reason: Reason::Asked,
                device: Device::Virtual("loopback".into()),
            },
        ] {
            assert_eq!(Record::new(7, &d).decision(), Some(d));
        }
    }
}

//! The kernel programs, built by `cargo xtask build-ebpf` and embedded at compile time
//! (build.rs), so drain-user is one self-contained binary.

use std::path::Path;

use anyhow::{bail, Context, Result};
use aya::{Ebpf, EbpfLoader};
use drain_common::map;

/// The eBPF object; empty when the binary was built without it (see build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/drain.bpf.o"));

/// Loads the object with its maps pinned in `dir`: a gate's pinned maps are reused, missing
/// ones are created and pinned there.
pub fn load(dir: &Path) -> Result<Ebpf> {
    if OBJECT.is_empty() {
        bail!(
            "the kernel programs are not built into this binary: \
             run `cargo xtask build-ebpf` then rebuild"
        );
    }
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(dir);
    if let Some(n) = max_connections()? {
        loader.map_max_entries(map::SOCKS, n);
    }
    loader
        .load(OBJECT)
        .context("loading the drain eBPF object (needs root or CAP_BPF + CAP_NET_ADMIN)")
}

/// `DRAIN_MAX_CONNECTIONS`: the size of the live-connection set of a gate (or `wait`
/// tracker) created from now on, instead of drain_common::MAX_TRACKED_SOCKS. Not an
/// option: it exists so a test can fill the set; an existing gate keeps its size.
fn max_connections() -> Result<Option<u32>> {
    match std::env::var("DRAIN_MAX_CONNECTIONS") {
        Err(_) => Ok(None),
        Ok(v) => match v.parse::<u32>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => bail!("DRAIN_MAX_CONNECTIONS={v:?} is not a positive number of connections"),
        },
    }
}

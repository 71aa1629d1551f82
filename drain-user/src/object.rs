//! The kernel programs, built by `cargo xtask build-ebpf` and embedded at compile time
//! (build.rs), so drain-user is one self-contained binary.

use std::path::Path;

use anyhow::{bail, Context, Result};
use aya::{Ebpf, EbpfLoader};

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
    EbpfLoader::new()
        .default_map_pin_directory(dir)
        .load(OBJECT)
        .context("loading the drain eBPF object (needs root or CAP_BPF + CAP_NET_ADMIN)")
}

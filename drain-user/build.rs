//! Embeds the eBPF object built by `cargo xtask build-ebpf`, so drain-user is one
//! self-contained binary.
//!
//! Without the object (a fresh clone, no nightly or bpf-linker), an empty placeholder is
//! embedded instead, the way aya-template does it: `cargo build`, `cargo clippy` and the
//! unprivileged `cargo test` still work, and loading fails at run time with the command to
//! run. `cargo xtask build` builds the object first.

use std::{
    env, fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            newest_mtime(&path)
        } else {
            entry.metadata().and_then(|m| m.modified()).ok()
        };
        newest = newest.max(t);
    }
    newest
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest
        .parent()
        .expect("drain-user sits in the workspace")
        .to_path_buf();
    let target = env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    // The object xtask built for this target's byte order (bpfel or bpfeb).
    let bpf = match env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() {
        Ok("big") => "bpfeb-unknown-none",
        _ => "bpfel-unknown-none",
    };
    let obj = target.join(bpf).join("release/drain");
    let out = PathBuf::from(env::var("OUT_DIR").expect("set by cargo")).join("drain.bpf.o");
    // A path that does not exist yet makes cargo rerun this script on every build, so the
    // object is picked up as soon as it is built.
    println!("cargo:rerun-if-changed={}", obj.display());
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    let Ok(obj_mtime) = fs::metadata(&obj).and_then(|m| m.modified()) else {
        println!(
            "cargo:warning=the eBPF object {} is not built: this drain-user cannot load its \
             kernel programs; run `cargo xtask build-ebpf` then rebuild (or `cargo xtask build`)",
            obj.display()
        );
        fs::write(&out, []).expect("write the placeholder object into OUT_DIR");
        object_hash(&[]);
        return;
    };
    for src in ["drain-ebpf/src", "drain-common/src"] {
        if newest_mtime(&root.join(src)).is_some_and(|t| t > obj_mtime) {
            println!(
                "cargo:warning=the eBPF object is older than {src}: run `cargo xtask build-ebpf` \
                 to embed the current kernel programs"
            );
        }
    }
    fs::copy(&obj, &out).expect("copy the eBPF object into OUT_DIR");
    object_hash(&fs::read(&out).expect("read the embedded eBPF object"));
}

/// `DRAIN_EBPF_SHA256`: the first 12 hex digits of the embedded object's SHA-256, shown by
/// `drain-user --version`, so an installed binary says which kernel programs it carries
/// ("none" for the placeholder). SHA-256 because it is the digest people compare with
/// `sha256sum`; sha2 is a build dependency only, not in the binary.
fn object_hash(bytes: &[u8]) {
    use sha2::Digest;
    let hash = if bytes.is_empty() {
        "none".to_string()
    } else {
        sha2::Sha256::digest(bytes)
            .iter()
            .take(6)
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    println!("cargo:rustc-env=DRAIN_EBPF_SHA256={hash}");
}

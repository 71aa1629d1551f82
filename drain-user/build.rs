//! Embeds the eBPF object built by `cargo xtask build-ebpf`, so drain-user is one
//! self-contained binary. A plain `cargo build` before that says which command to run.

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
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    let target = env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let obj = target.join("bpfel-unknown-none/release/drain");
    println!("cargo:rerun-if-changed={}", obj.display());
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    let Ok(obj_mtime) = fs::metadata(&obj).and_then(|m| m.modified()) else {
        panic!(
            "drain-user embeds the eBPF object {}, which is not built yet: \
             run `cargo xtask build-ebpf` first (or `cargo xtask build`)",
            obj.display()
        );
    };
    for src in ["drain-ebpf/src", "drain-common/src"] {
        if newest_mtime(&root.join(src)).is_some_and(|t| t > obj_mtime) {
            println!(
                "cargo:warning=the eBPF object is older than {src}: run `cargo xtask build-ebpf` \
                 to embed the current kernel programs"
            );
        }
    }
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("drain.bpf.o");
    fs::copy(&obj, &out).expect("copy the eBPF object into OUT_DIR");
}

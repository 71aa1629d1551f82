//! The kernel object under test, bpffs, and one pin directory per loaded copy.
//!
//! The maps are declared with `pinning = ByName`, so aya pins them in the loader's default
//! pin directory and *reuses* whatever is already pinned there. Each test therefore loads
//! into its own fresh directory ([`PinDir`]) and removes it afterwards, even on panic:
//! otherwise tests running in parallel would share (and clobber) one set of maps.

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::{
    programs::{Program, ProgramError, ProgramFd, SchedClassifier, Xdp},
    Ebpf, EbpfLoader,
};

/// Root of the pin directories made here.
const BPFFS: &str = "/sys/fs/bpf";

/// Path of the kernel object: `$DRAIN_EBPF_OBJECT` if set, else where `cargo xtask
/// build-ebpf` puts it. Panics, saying how to build it, when the file is missing.
pub fn object_path() -> PathBuf {
    let path = std::env::var_os("DRAIN_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bpfel-unknown-none/release/drain")
        });
    assert!(
        path.is_file(),
        "kernel object {} not found: build it with `cargo xtask build-ebpf` \
         (or point DRAIN_EBPF_OBJECT at it)",
        path.display()
    );
    path
}

/// Mounts bpffs at /sys/fs/bpf unless it already is (systemd does it; a bare VM may not).
pub fn ensure_bpffs() {
    let mounted = || {
        fs::read_to_string("/proc/self/mounts")
            .expect("reading /proc/self/mounts")
            .lines()
            .any(|l| {
                let mut f = l.split_whitespace();
                let (_dev, dir, fstype) = (f.next(), f.next(), f.next());
                dir == Some(BPFFS) && fstype == Some("bpf")
            })
    };
    if mounted() {
        return;
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf", BPFFS])
        .status()
        .expect("running mount -t bpf");
    // Two tests may race to mount it: the loser fails, but bpffs is then mounted anyway.
    assert!(
        status.success() || mounted(),
        "mounting bpffs at {BPFFS} failed ({status}): loading needs it for the pinned maps"
    );
}

/// A fresh directory under /sys/fs/bpf; dropping it unpins everything in it and removes it.
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    /// Creates /sys/fs/bpf/drain-test-<pid>x<n>x<t> (mounting bpffs first if needed).
    pub fn new() -> Self {
        ensure_bpffs();
        let (_, _, suffix) = crate::unique_suffix();
        let path = Path::new(BPFFS).join(format!("drain-test-{suffix}"));
        fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("creating pin directory {}: {e}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // Unlinking a bpffs file is unpinning it. Errors are printed, not raised: a panic in
        // drop during unwinding would abort and hide the test's own failure.
        if let Ok(entries) = fs::read_dir(&self.path) {
            for entry in entries.flatten() {
                if let Err(e) = fs::remove_file(entry.path()) {
                    eprintln!("unpinning {}: {e}", entry.path().display());
                }
            }
        }
        if let Err(e) = fs::remove_dir(&self.path) {
            eprintln!("removing pin directory {}: {e}", self.path.display());
        }
    }
}

/// One loaded copy of the object with its maps pinned in its own [`PinDir`].
pub struct Loaded {
    // Field order is drop order: close the object's fds, then unpin.
    pub bpf: Ebpf,
    pub pins: PinDir,
}

impl Loaded {
    /// Opens the object with a fresh pin directory. Programs are not loaded yet.
    pub fn open() -> Self {
        crate::require_root();
        let pins = PinDir::new();
        let bytes = fs::read(object_path()).expect("reading the kernel object");
        let bpf = EbpfLoader::new()
            .default_map_pin_directory(pins.path())
            .load(&bytes)
            .unwrap_or_else(|e| panic!("loading the kernel object: {e:#?}"));
        Self { bpf, pins }
    }

    /// Loads (verifies) the XDP program `name` and returns a duplicate of its fd.
    pub fn load_xdp(&mut self, name: &str) -> ProgramFd {
        let prog: &mut Xdp = self.program(name);
        let loaded = prog.load();
        verified_fd(name, loaded, prog.fd())
    }

    /// Loads (verifies) the classifier program `name` and returns a duplicate of its fd.
    pub fn load_tc(&mut self, name: &str) -> ProgramFd {
        let prog: &mut SchedClassifier = self.program(name);
        let loaded = prog.load();
        verified_fd(name, loaded, prog.fd())
    }

    fn program<'a, P>(&'a mut self, name: &str) -> &'a mut P
    where
        &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
    {
        self.bpf
            .program_mut(name)
            .unwrap_or_else(|| panic!("no program {name} in the object"))
            .try_into()
            .unwrap_or_else(|e| panic!("program {name} has another type: {e}"))
    }
}

/// The fd of a program just loaded, duplicated, or a panic with the verifier's log.
fn verified_fd(
    name: &str,
    loaded: Result<(), ProgramError>,
    fd: Result<&ProgramFd, ProgramError>,
) -> ProgramFd {
    loaded.unwrap_or_else(|e| panic!("verifier rejected {name}: {e:#?}"));
    fd.expect("fd of a loaded program")
        .try_clone()
        .expect("dup")
}

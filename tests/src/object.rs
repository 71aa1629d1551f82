//! BPF objects: the kernel object under test and its loader, the raw bpf(2) calls aya
//! 0.14 lacks, a pass-through XDP program, and what the kernel says is attached.
//!
//! - [`Loaded`] with its [`PinDir`]: one copy of drain's object. The maps are declared
//!   with `pinning = ByName`, so aya pins them in the loader's default pin directory and
//!   *reuses* whatever is already pinned there. Each test therefore loads into its own
//!   fresh directory and removes it afterwards, even on panic: otherwise tests running in
//!   parallel would share (and clobber) one set of maps.
//! - [`sys_bpf`]: the one raw bpf(2) wrapper, for what aya cannot do: load a program from
//!   raw instructions ([`load_xdp_pass`]), pin a bare fd, BPF_PROG_TEST_RUN on a bare fd
//!   ([`crate::testrun`]).
//! - [`ForeignXdp`]: a pass-through XDP program that is not drain's, standing for another
//!   tool's program on an interface.
//! - [`link_xdp`], [`tcx_ingress`], [`bpftool`], [`bpf_link_exists`], [`pinned_link_id`],
//!   [`open_pinned_link`]: what the kernel says is attached (aya's `loaded_links` and
//!   `SchedClassifier::query_tcx`, `ip` and bpftool).
//! - [`sum_port_stats`], [`sum_track_stats`]: per-CPU counters summed.

use std::{
    ffi::CString,
    fs, io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    maps::{PerCpuArray, PerCpuValues},
    programs::{
        links::{FdLink, PinnedLink},
        loaded_links, Program, ProgramError, ProgramFd, ProgramInfo, SchedClassifier, TcAttachType,
        Xdp,
    },
    Ebpf, EbpfLoader,
};
use drain_common::{map, PortStats, TrackStats};

use crate::netns::NetNsPair;

/// Root of the pin directories made here.
const BPFFS: &str = "/sys/fs/bpf";

/// Path of the kernel object: `$DRAIN_EBPF_OBJECT` if set, else where `cargo xtask
/// build-ebpf` puts it. Panics, saying how to build it, when the file is missing.
pub fn object_path() -> PathBuf {
    let path = std::env::var_os("DRAIN_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // The host's byte order, as `cargo xtask build-ebpf` picks it.
            let bpf = if cfg!(target_endian = "big") {
                "bpfeb-unknown-none"
            } else {
                "bpfel-unknown-none"
            };
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target")
                .join(bpf)
                .join("release/drain")
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

impl Loaded {
    /// DRAIN_STATS slot `slot`, summed over CPUs.
    pub fn port_stats(&self, slot: u32) -> PortStats {
        let a: PerCpuArray<_, PortStats> =
            PerCpuArray::try_from(self.bpf.map(map::STATS).expect("DRAIN_STATS in the object"))
                .expect("DRAIN_STATS is a per-CPU array of PortStats");
        sum_port_stats(&a.get(&slot, 0).expect("reading DRAIN_STATS"))
    }
}

// The sums below restate what drain-user adds up for `status`; they can go once drain-common
// offers them (behind its `user` feature).

/// One PortStats slot summed over CPUs.
pub fn sum_port_stats(per_cpu: &PerCpuValues<PortStats>) -> PortStats {
    per_cpu.iter().sum()
}

/// The tracker's counters summed over CPUs.
pub fn sum_track_stats(per_cpu: &PerCpuValues<TrackStats>) -> TrackStats {
    per_cpu.iter().sum()
}

// ---------------------------------------------------------------------------------------
// Raw bpf(2), for what aya 0.14 does not offer
// ---------------------------------------------------------------------------------------

/// bpf(2) with `attr`, a prefix of `union bpf_attr` for `cmd` (the kernel zero-fills the
/// rest: `bpf_check_uarg_tail_zero`); returns the syscall's non-negative result.
///
/// # Safety
/// `attr` must be a valid `bpf_attr` prefix for `cmd`, and every pointer in it must be
/// valid (for the kernel to read or write as `cmd` says) for the duration of the call.
pub unsafe fn sys_bpf<A>(cmd: u32, attr: &mut A) -> io::Result<i64> {
    drain_user::sys::raise_memlock();
    // SAFETY: the caller's contract; the size passed is attr's own.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            (attr as *mut A).cast::<libc::c_void>(),
            std::mem::size_of::<A>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// `enum bpf_cmd` values used here (include/uapi/linux/bpf.h).
const BPF_PROG_LOAD: u32 = 5;
const BPF_OBJ_PIN: u32 = 6;

/// Loads the smallest XDP program there is, `r0 = XDP_PASS; exit`, named `name` (at most
/// 15 bytes), straight through BPF_PROG_LOAD: aya only loads programs from an object file.
/// The baseline benchmarks subtract, and the stand-in for another tool's program.
pub fn load_xdp_pass(name: &str) -> io::Result<OwnedFd> {
    load_trivial(BPF_PROG_TYPE_XDP, BPF_XDP, XDP_PASS, name)
}

/// `bpf_prog_type`, `bpf_attach_type` and XDP verdict values (include/uapi/linux/bpf.h).
pub const BPF_PROG_TYPE_XDP: u32 = 6;
pub const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
pub const BPF_XDP: u32 = 37;
pub const XDP_DROP: i32 = 1;
pub const XDP_PASS: i32 = 2;
pub const XDP_TX: i32 = 3;

/// Loads a program of `prog_type` that only returns `ret` (`r0 = ret; exit`), named `name`
/// (at most 15 bytes), straight through BPF_PROG_LOAD: baselines for benchmarks, a flood
/// generator (`XDP_TX`), another tool's program.
pub fn load_trivial(
    prog_type: u32,
    expected_attach_type: u32,
    ret: i32,
    name: &str,
) -> io::Result<OwnedFd> {
    // BPF_MOV64_IMM(BPF_REG_0, ret), BPF_EXIT_INSN()
    let insns: [u64; 2] = [(u64::from(ret as u32) << 32) | 0xb7, 0x95];
    let license = c"GPL";
    /// The BPF_PROG_LOAD member of `union bpf_attr`, up to `expected_attach_type`.
    #[repr(C)]
    #[derive(Default)]
    struct LoadAttr {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    assert!(name.len() < 16, "program name {name:?} is over 15 bytes");
    let mut prog_name = [0u8; 16];
    prog_name[..name.len()].copy_from_slice(name.as_bytes());
    let mut attr = LoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name,
        expected_attach_type,
        ..Default::default()
    };
    // SAFETY: a BPF_PROG_LOAD prefix whose pointers (insns, license) outlive the call.
    let fd = unsafe { sys_bpf(BPF_PROG_LOAD, &mut attr) }?;
    // SAFETY: a new fd the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins the object behind `fd` at `path` (BPF_OBJ_PIN; aya pins only its own objects).
pub fn pin_fd(fd: &OwnedFd, path: &Path) -> io::Result<()> {
    let p = CString::new(path.as_os_str().as_encoded_bytes()).expect("path without NUL");
    /// The BPF_OBJ_* member of `union bpf_attr`.
    #[repr(C)]
    struct ObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let mut attr = ObjAttr {
        pathname: p.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    // SAFETY: a BPF_OBJ_PIN attr whose path outlives the call.
    unsafe { sys_bpf(BPF_OBJ_PIN, &mut attr) }.map(|_| ())
}

/// An XDP program that is not drain's (`r0 = XDP_PASS; exit`, named `foreign_pass`),
/// pinned, so `ip link set ... xdp pinned <path>` can attach it the way other tools do. It
/// stands for another tool's program (xdp-loader, Cilium, ...) on an interface.
pub struct ForeignXdp {
    _fd: OwnedFd,
    /// The program's id.
    pub id: u32,
}

impl ForeignXdp {
    pub const NAME: &'static str = "foreign_pass";

    /// Loads the program and pins it at `path` (in a [`PinDir`], which unpins it).
    pub fn load_pinned(path: &Path) -> Self {
        let fd = load_xdp_pass(Self::NAME)
            .unwrap_or_else(|e| panic!("loading the foreign XDP program: {e}"));
        pin_fd(&fd, path)
            .unwrap_or_else(|e| panic!("pinning the foreign program at {}: {e}", path.display()));
        let id = ProgramInfo::from_pin(path)
            .unwrap_or_else(|e| panic!("info of the foreign program: {e}"))
            .id();
        Self { _fd: fd, id }
    }

    /// Loads the program, pins it in `pins` and attaches it to `dev` in `ns` the way `ip`
    /// and xdp-loader do it (netlink, no bpf_link): it stays attached when this process lets
    /// go, until the namespace is deleted.
    pub fn attach_with_ip(pair: &NetNsPair, ns: &str, dev: &str, pins: &PinDir) -> Self {
        let pin = pins.path().join("foreign");
        let foreign = Self::load_pinned(&pin);
        let pin = pin.to_string_lossy();
        pair.sh(
            ns,
            "ip",
            &["link", "set", "dev", dev, "xdp", "pinned", &pin],
        );
        foreign
    }
}

// ---------------------------------------------------------------------------------------
// What the kernel says is attached
// ---------------------------------------------------------------------------------------

/// Where Debian puts bpftool (not on root's PATH under every shell).
pub const BPFTOOL: &str = "/usr/sbin/bpftool";

/// The XDP program on `dev` in `ns` as `ip -d link show` reports it: (id, name).
pub fn link_xdp(pair: &NetNsPair, ns: &str, dev: &str) -> Option<(u32, String)> {
    let out = pair
        .cmd(ns, "ip")
        .args(["-d", "link", "show", "dev", dev])
        .output()
        .expect("running ip -d link show");
    assert!(out.status.success(), "ip -d link show dev {dev}: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    // "    prog/xdp id 228 name drain_xdp tag ... "
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("prog/xdp"))?;
    let mut words = line.split_whitespace();
    let mut id = None;
    let mut name = String::new();
    while let Some(w) = words.next() {
        match w {
            "id" => id = words.next().and_then(|v| v.parse().ok()),
            "name" => name = words.next().unwrap_or_default().to_owned(),
            _ => {}
        }
    }
    Some((id.expect("prog/xdp line with an id"), name))
}

/// `bpftool args...` run inside `ns`; None when bpftool is not installed.
pub fn bpftool(pair: &NetNsPair, ns: &str, args: &[&str]) -> Option<String> {
    if !Path::new(BPFTOOL).exists() {
        eprintln!("note: {BPFTOOL} not installed: skipping the bpftool cross-check");
        return None;
    }
    let out = pair
        .cmd(ns, BPFTOOL)
        .args(args)
        .output()
        .expect("running bpftool");
    assert!(
        out.status.success(),
        "bpftool {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The bpf_link pinned at `pin`, opened (BPF_OBJ_GET): a reference that keeps the link
/// alive, as bpftool or an inventory agent holding it would.
pub fn open_pinned_link(pin: &Path) -> PinnedLink {
    PinnedLink::from_pin(pin).unwrap_or_else(|e| panic!("opening pin {}: {e}", pin.display()))
}

/// Id of the bpf_link pinned at `pin`.
pub fn pinned_link_id(pin: &Path) -> u32 {
    FdLink::from(open_pinned_link(pin))
        .info()
        .unwrap_or_else(|e| panic!("info of the link pinned at {}: {e}", pin.display()))
        .id()
}

/// True while a bpf_link with this id exists anywhere. (A link that goes away while the
/// kernel's list is walked shows as an error for its id: skipped, it is gone.)
pub fn bpf_link_exists(id: u32) -> bool {
    loaded_links().flatten().any(|l| l.id() == id)
}

/// The programs in the TCX ingress chain of `dev` in `ns`, in order: (id, name). Asked of
/// the kernel (BPF_PROG_QUERY) on a thread inside the namespace, since Debian's bpftool 7.1
/// predates TCX and does not list it. A kernel without TCX (before 6.6) has no such chain:
/// empty.
pub fn tcx_ingress(pair: &NetNsPair, ns: &str, dev: &str) -> Vec<(u32, String)> {
    if !crate::kernel::has(crate::kernel::Feature::Tcx) {
        return Vec::new();
    }
    let (_, progs) = pair
        .in_ns(ns, || {
            SchedClassifier::query_tcx(dev, TcAttachType::Ingress)
        })
        .unwrap_or_else(|e| panic!("querying the TCX ingress chain of {dev} in {ns}: {e}"));
    progs
        .iter()
        .map(|p| (p.id(), p.name_as_str().unwrap_or_default().to_owned()))
        .collect()
}

/// The programs at TC ingress of `dev` in `ns`, whichever way they are attached: the TCX
/// chain in order, then the cls_bpf filters of its clsact qdisc (drain's on kernels
/// without TCX) in the order the kernel runs them: (id, program name).
pub fn tc_ingress(pair: &NetNsPair, ns: &str, dev: &str) -> Vec<(u32, String)> {
    let mut out = tcx_ingress(pair, ns, dev);
    out.extend(
        clsact_ingress(pair, ns, dev)
            .into_iter()
            .filter_map(|f| f.prog_id)
            .map(|id| (id, drain_user::sys::prog_name(id).unwrap_or_default())),
    );
    out
}

/// The filters on the clsact ingress of `dev` in `ns` as the kernel dumps them
/// (RTM_GETTFILTER, asked from a thread inside the namespace); empty without a clsact
/// qdisc.
pub fn clsact_ingress(pair: &NetNsPair, ns: &str, dev: &str) -> Vec<drain_user::clsact::Filter> {
    let ifindex = pair.ifindex(ns, dev);
    let mut filters = pair
        .in_ns(ns, || drain_user::clsact::ingress_filters(ifindex))
        .unwrap_or_else(|e| panic!("dumping the clsact ingress filters of {dev} in {ns}: {e:#}"));
    // The kernel dumps priorities in order; within one, the list order is the run order.
    filters.sort_by_key(|f| f.priority);
    filters
}

/// The kind of the qdisc at ingress of `dev` in `ns` ("clsact", "ingress"), if any.
pub fn ingress_qdisc(pair: &NetNsPair, ns: &str, dev: &str) -> Option<String> {
    let ifindex = pair.ifindex(ns, dev);
    pair.in_ns(ns, drain_user::clsact::ingress_qdiscs)
        .unwrap_or_else(|e| panic!("dumping the qdiscs in {ns}: {e:#}"))
        .into_iter()
        .find(|(i, _)| *i == ifindex)
        .map(|(_, k)| k)
}

/// A TC program that is not drain's (`r0 = TC_ACT_UNSPEC; exit`: lets every packet go on
/// to the next filter), named `foreign_tc`, pinned so that `tc filter add ... bpf
/// object-pinned` attaches it the way other tools do.
pub struct ForeignTc {
    _fd: OwnedFd,
    pub id: u32,
    pub pin: PathBuf,
}

impl ForeignTc {
    pub const NAME: &'static str = "foreign_tc";

    pub fn load_pinned(pins: &PinDir) -> Self {
        let pin = pins.path().join("foreign_tc");
        let fd = load_trivial(BPF_PROG_TYPE_SCHED_CLS, 0, -1, Self::NAME)
            .unwrap_or_else(|e| panic!("loading the foreign TC program: {e}"));
        pin_fd(&fd, &pin)
            .unwrap_or_else(|e| panic!("pinning the foreign program at {}: {e}", pin.display()));
        let id = ProgramInfo::from_pin(&pin)
            .unwrap_or_else(|e| panic!("info of the foreign program: {e}"))
            .id();
        Self { _fd: fd, id, pin }
    }

    /// `tc filter add dev DEV ingress pref PREF handle HANDLE bpf object-pinned PIN da` in
    /// `ns` (the interface needs a clsact qdisc).
    pub fn add_filter(&self, pair: &NetNsPair, ns: &str, dev: &str, pref: u16, handle: u32) {
        let (pref, handle) = (pref.to_string(), format!("{handle:#x}"));
        let pin = self.pin.to_string_lossy();
        pair.sh(
            ns,
            "tc",
            &[
                "filter",
                "add",
                "dev",
                dev,
                "ingress",
                "pref",
                &pref,
                "handle",
                &handle,
                "bpf",
                "object-pinned",
                &pin,
                "da",
            ],
        );
    }
}

//! BPF_PROG_TEST_RUN: run a loaded program once on a frame and get its return value and the
//! frame as the program left it.
//!
//! aya 0.14 has a `TestRun` trait on program objects; this takes a bare fd instead, so a
//! test can keep the fd while it mutates the object's maps, and so it works for any program
//! type the kernel can test-run (XDP and SCHED_CLS here).

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

/// `enum bpf_cmd` value of BPF_PROG_TEST_RUN (include/uapi/linux/bpf.h).
const BPF_PROG_TEST_RUN: u32 = 10;

/// The `test` member of `union bpf_attr` (include/uapi/linux/bpf.h), up to `batch_size`,
/// padded to the 8-byte alignment of its u64 members.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    /// Out: the program's return value.
    retval: u32,
    data_size_in: u32,
    /// In: room in `data_out`; out: bytes the kernel wrote there.
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}
const _: () = assert!(std::mem::size_of::<TestRunAttr>() == 80);

/// Room left after the input for programs that grow the frame (bpf_xdp_adjust_tail & co).
const OUT_SLACK: usize = 512;

/// Runs the program once on `data`; returns (return value, output frame), or the error of the
/// bpf(2) call. The kernel refuses frames shorter than an Ethernet header (14 bytes) with
/// EINVAL (`bpf_test_init` in net/bpf/test_run.c).
pub fn try_test_run(prog_fd: BorrowedFd<'_>, data: &[u8]) -> io::Result<(i32, Vec<u8>)> {
    run(prog_fd, data, 1).map(|(retval, out, _)| (retval, out))
}

/// BPF_PROG_TEST_RUN `repeat` times: (return value, output frame, mean ns per run).
fn run(prog_fd: BorrowedFd<'_>, data: &[u8], repeat: u32) -> io::Result<(i32, Vec<u8>, u32)> {
    let mut out = vec![0u8; data.len() + OUT_SLACK];
    let mut attr = TestRunAttr {
        prog_fd: prog_fd.as_raw_fd() as u32,
        data_size_in: data.len() as u32,
        data_size_out: out.len() as u32,
        data_in: data.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ..Default::default()
    };
    // SAFETY: attr is a fully initialised bpf_attr prefix for BPF_PROG_TEST_RUN; data_in and
    // data_out point to buffers of the sizes given, alive for the duration of the call.
    unsafe { crate::object::sys_bpf(BPF_PROG_TEST_RUN, &mut attr) }?;
    out.truncate(attr.data_size_out as usize);
    Ok((attr.retval as i32, out, attr.duration))
}

/// `struct xdp_md`, the context of an XDP test run (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// BPF_F_TEST_XDP_LIVE_FRAMES (kernel ≥ 5.18): frames the program returns XDP_TX or
/// XDP_REDIRECT for really leave through the interface.
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

/// Runs the XDP program `repeat` times on `data` in live-frame mode, as if it arrived on
/// `ifindex` (of the calling thread's network namespace): with a program that returns
/// XDP_TX, a packet generator sending `data` out of that interface `repeat` times.
pub fn send_live(
    prog_fd: BorrowedFd<'_>,
    data: &[u8],
    ifindex: u32,
    repeat: u32,
) -> io::Result<()> {
    let md = XdpMd {
        data_end: data.len() as u32,
        ingress_ifindex: ifindex,
        ..Default::default()
    };
    let mut attr = TestRunAttr {
        prog_fd: prog_fd.as_raw_fd() as u32,
        data_size_in: data.len() as u32,
        data_in: data.as_ptr() as u64,
        repeat,
        ctx_size_in: std::mem::size_of::<XdpMd>() as u32,
        ctx_in: &md as *const XdpMd as u64,
        flags: BPF_F_TEST_XDP_LIVE_FRAMES,
        ..Default::default()
    };
    // SAFETY: a BPF_PROG_TEST_RUN attr whose data and ctx pointers outlive the call; live
    // frames mode writes no output.
    unsafe { crate::object::sys_bpf(BPF_PROG_TEST_RUN, &mut attr) }.map(|_| ())
}

/// [`try_test_run`], panicking with the frame length and errno on failure.
pub fn test_run(prog_fd: BorrowedFd<'_>, data: &[u8]) -> (i32, Vec<u8>) {
    try_test_run(prog_fd, data).unwrap_or_else(|e| {
        panic!(
            "BPF_PROG_TEST_RUN on a {}-byte frame failed: {e} \
             (EINVAL: frame shorter than 14 bytes or program not loaded; EPERM: needs root)",
            data.len()
        )
    })
}

/// Runs the program `repeat` times on `data` inside the kernel and returns the mean
/// nanoseconds per run that the kernel measured (includes the test-run loop itself; compare
/// against a baseline program in the same run).
pub fn mean_ns(prog_fd: BorrowedFd<'_>, data: &[u8], repeat: u32) -> io::Result<u32> {
    run(prog_fd, data, repeat).map(|(_, _, ns)| ns)
}

/// The baseline that benchmarks subtract, measured in the same run: the smallest XDP
/// program there is (see [`crate::object::load_xdp_pass`]).
pub fn load_xdp_pass() -> io::Result<std::os::fd::OwnedFd> {
    crate::object::load_xdp_pass("bench_pass")
}

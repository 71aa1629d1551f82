//! The bpf(2) commands aya 0.14 lacks, made raw. Nothing else in drain calls bpf(2) itself.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use anyhow::{anyhow, Context, Result};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

/// bpf(cmd, attr): a zeroed `union bpf_attr` prefix large enough for the commands here.
fn bpf(cmd: libc::c_long, attr: &mut [u64; 8]) -> io::Result<libc::c_long> {
    // SAFETY: a zeroed bpf_attr of the size passed; pointers in it outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// BPF_OBJ_GET: a new fd for the object pinned at `pin`.
fn obj_get(pin: &Path) -> Result<OwnedFd> {
    let path = CString::new(pin.as_os_str().as_bytes())?;
    // union bpf_attr, BPF_OBJ_GET: { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; }
    let mut attr = [0u64; 8];
    attr[0] = path.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr).context("BPF_OBJ_GET")?;
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// BPF_LINK_DETACH on the link pinned at `pin`: its program leaves the hook before this
/// returns, whoever else still holds the link. aya 0.14 has no detach for a pinned FdLink.
/// Tracing links (the tracker) cannot be detached: for them this does nothing, and
/// unpinning releases them.
pub fn detach_link(pin: &Path) -> Result<()> {
    let fd = obj_get(pin)?;
    // union bpf_attr, BPF_LINK_DETACH: { __u32 link_fd; }
    let mut attr = [0u64; 8];
    attr[0] = fd.as_raw_fd() as u64;
    match bpf(BPF_LINK_DETACH, &mut attr) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
        Err(e) => Err(anyhow!(e).context("BPF_LINK_DETACH")),
    }
}

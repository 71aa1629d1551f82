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

pub const BPF_OBJ_GET: u32 = 7;
pub const BPF_LINK_DETACH: u32 = 34;

/// bpf(cmd, attr) with a zero-padded `union bpf_attr` (128 bytes hold every command's form
/// that drain uses); returns the syscall's non-negative result.
pub fn bpf(cmd: u32, attr: &mut [u64; 16]) -> io::Result<i64> {
    // SAFETY: attr is a zero-padded bpf_attr of the size passed; the kernel writes only
    // within it, and pointers stored in it outlive the call.
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
pub fn obj_get(pin: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(pin.as_os_str().as_bytes())?;
    // union bpf_attr, BPF_OBJ_GET: { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; }
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// BPF_LINK_DETACH on the link pinned at `pin`: its program leaves the hook before this
/// returns, whoever else still holds the link. aya 0.14 has no detach for a pinned FdLink.
/// Tracing links (the tracker) cannot be detached: for them this does nothing, and
/// unpinning releases them.
pub fn detach_link(pin: &Path) -> Result<()> {
    let fd = obj_get(pin).context("BPF_OBJ_GET")?;
    // union bpf_attr, BPF_LINK_DETACH: { __u32 link_fd; }
    let mut attr = [0u64; 16];
    attr[0] = fd.as_raw_fd() as u64;
    match bpf(BPF_LINK_DETACH, &mut attr) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
        Err(e) => Err(anyhow!(e).context("BPF_LINK_DETACH")),
    }
}

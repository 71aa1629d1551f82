//! The bpf(2) commands aya 0.14 lacks, made raw (link detach, link info, a program's name by
//! id), and the tiny programs, links and maps `check` probes the kernel with. Nothing else in
//! drain calls bpf(2) itself.

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
pub const BPF_MAP_LOOKUP_BATCH: u32 = 24;

/// Lifts RLIMIT_MEMLOCK (once per process), as aya does for its own calls: kernels before
/// 5.11 charge BPF maps and programs to it (memcg accounting came in 5.11), and with a
/// small limit (64 KiB was the kernel's default before 5.16) the raw calls here fail with
/// EPERM once the user's other BPF objects have used it up. A failure (no privilege to
/// raise it) leaves the limit as it was.
pub fn raise_memlock() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let unlimited = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: a valid rlimit; setrlimit has no other preconditions.
        let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    });
}

/// RLIMIT_MEMLOCK of this process as (soft, hard), in bytes; `libc::RLIM_INFINITY` is
/// unlimited.
pub fn memlock_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// Whether this kernel charges BPF maps to RLIMIT_MEMLOCK (kernels before 5.11 do; later
/// ones charge the memory cgroup), found by trying: a child process with a memlock limit
/// of 0 creates a one-entry array map, which fails with EPERM only where maps are charged
/// to the limit. Needs the privilege to create maps (CAP_BPF or CAP_SYS_ADMIN): without it
/// every map fails with EPERM and the answer means nothing.
pub fn maps_charged_to_memlock() -> io::Result<bool> {
    let code = in_child(|| {
        let zero = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: a valid rlimit; lowering a limit needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &zero) } != 0 {
            return 3;
        }
        let mut attr = [0u64; 16];
        attr[0] = BPF_MAP_TYPE_ARRAY | (4 << 32);
        attr[1] = 8 | (1 << 32);
        // bpf_once, not bpf: its retry would lift the limit under test.
        match bpf_once(BPF_MAP_CREATE, &mut attr) {
            Ok(_) => 0,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => 1,
            Err(_) => 2,
        }
    })?;
    match code {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(io::Error::other(format!(
            "probing whether maps are charged to RLIMIT_MEMLOCK: the probe exited with {code}"
        ))),
    }
}

/// Whether this process may lift RLIMIT_MEMLOCK to unlimited, as drain-user does at the
/// first EPERM ([`raise_memlock`], and aya for its own calls): tried in a child process,
/// so this one keeps its limit.
pub fn memlock_raisable() -> io::Result<bool> {
    let code = in_child(|| {
        let unlimited = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: a valid rlimit.
        i32::from(unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0)
    })?;
    Ok(code == 0)
}

/// Runs `f` in a forked child and returns its exit code: a probe that changes a
/// per-process setting (a resource limit) leaves this process's as it was. `f` must make
/// raw system calls only (the child of a threaded process must not allocate or lock).
fn in_child(f: impl FnOnce() -> i32) -> io::Result<i32> {
    // SAFETY: the child runs only `f`, raw system calls, and _exit.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            let code = f();
            // SAFETY: ends the child without running this process's exit handlers.
            unsafe { libc::_exit(code) }
        }
        pid => {
            let mut status = 0;
            loop {
                // SAFETY: waits for the child made above.
                if unsafe { libc::waitpid(pid, &mut status, 0) } == pid {
                    break;
                }
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            if libc::WIFEXITED(status) {
                Ok(libc::WEXITSTATUS(status))
            } else {
                Err(io::Error::other("a probe process died"))
            }
        }
    }
}

/// bpf(cmd, attr) with a zero-padded `union bpf_attr` (128 bytes hold every command's form
/// that drain uses); returns the syscall's non-negative result. On EPERM it retries once
/// with RLIMIT_MEMLOCK lifted ([`raise_memlock`]).
pub fn bpf(cmd: u32, attr: &mut [u64; 16]) -> io::Result<i64> {
    match bpf_once(cmd, attr) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            raise_memlock();
            bpf_once(cmd, attr)
        }
        r => r,
    }
}

fn bpf_once(cmd: u32, attr: &mut [u64; 16]) -> io::Result<i64> {
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

pub const BPF_OBJ_GET_INFO_BY_FD: u32 = 15;
/// `enum bpf_link_type` values drain looks for.
pub const BPF_LINK_TYPE_RAW_TRACEPOINT: u32 = 1;
pub const BPF_LINK_TYPE_TRACING: u32 = 2;
pub const BPF_LINK_TYPE_NETNS: u32 = 5;
pub const BPF_LINK_TYPE_XDP: u32 = 6;
pub const BPF_LINK_TYPE_TCX: u32 = 11;

/// The parts of `struct bpf_link_info` drain reads. aya 0.14's `LinkInfo` has the type and
/// program id but not the attachment (ifindex, netns).
#[derive(Clone, Copy, Debug)]
pub struct LinkInfo {
    pub link_type: u32,
    pub prog_id: u32,
    /// XDP and TCX links: the device's ifindex, 0 once detached (the device was deleted, or
    /// BPF_LINK_DETACH): bpf_xdp_link_fill_link_info, tcx_link_fill_info.
    pub ifindex: u32,
    /// Netns links (sk_lookup, flow dissector): the namespace's inode, 0 once the namespace
    /// is gone (netns_bpf_pernet_pre_exit detaches them): same field of the union.
    pub netns_ino: u32,
}

/// BPF_OBJ_GET_INFO_BY_FD on the link pinned at `pin`.
pub fn link_info(pin: &Path) -> Result<LinkInfo> {
    let fd = obj_get(pin).with_context(|| format!("BPF_OBJ_GET {}", pin.display()))?;
    // struct bpf_link_info: { __u32 type; __u32 id; __u32 prog_id; union (8-aligned, at
    // byte 16) { ... xdp { __u32 ifindex; } tcx { __u32 ifindex; __u32 attach_type; }
    // netns { __u32 netns_ino; __u32 attach_type; } ... } }
    let mut info = [0u32; 32];
    // union bpf_attr, BPF_OBJ_GET_INFO_BY_FD: { __u32 bpf_fd; __u32 info_len; __aligned_u64 info; }
    let mut attr = [0u64; 16];
    attr[0] = fd.as_raw_fd() as u64 | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("BPF_OBJ_GET_INFO_BY_FD")?;
    Ok(LinkInfo {
        link_type: info[0],
        prog_id: info[2],
        ifindex: info[4],
        netns_ino: info[4],
    })
}

pub const BPF_PROG_GET_FD_BY_ID: u32 = 13;

/// The `bpf_prog_info` of the program with id `id` (BPF_PROG_GET_FD_BY_ID, then
/// BPF_OBJ_GET_INFO_BY_FD); None when no such program exists. One program asked for by id:
/// aya's `loaded_programs()` opens every program on the host to find one, and its name
/// accessor probes kernel features by loading programs, which made `status` slower the more
/// BPF programs other tools had loaded. The fields a kernel does not have stay zero, as the
/// kernel requires of a longer buffer.
fn prog_info(id: u32) -> Option<[u8; 256]> {
    // union bpf_attr, BPF_PROG_GET_FD_BY_ID: { __u32 prog_id; __u32 next_id; __u32 open_flags; }
    let mut attr = [0u64; 16];
    attr[0] = u64::from(id);
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr).ok()?;
    // SAFETY: BPF_PROG_GET_FD_BY_ID returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut info = [0u8; 256];
    let mut attr = [0u64; 16];
    attr[0] = fd.as_raw_fd() as u64 | ((info.len() as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).ok()?;
    Some(info)
}

/// The name of the program with id `id`; None when no such program exists.
pub fn prog_name(id: u32) -> Option<String> {
    let info = prog_info(id)?;
    // struct bpf_prog_info: char name[BPF_OBJ_NAME_LEN] at byte 64 (after type, id,
    // tag[8], jited/xlated lengths and pointers, load_time, created_by_uid, nr_map_ids,
    // map_ids).
    let name = &info[64..80];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Some(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// How many times the kernel skipped running program `id` because it was already running
/// on that CPU (`bpf_prog_info.recursion_misses`, byte 208, Linux 5.12+; 0 before, where
/// the kernel does not report it). None when no such program exists.
pub fn prog_recursion_misses(id: u32) -> Option<u64> {
    let info = prog_info(id)?;
    Some(u64::from_ne_bytes(info[208..216].try_into().ok()?))
}

// ---------------------------------------------------------------------------------------
// Probes for `check`: tiny programs, links and maps, closed at once
// ---------------------------------------------------------------------------------------

pub const BPF_MAP_CREATE: u32 = 0;
pub const BPF_PROG_LOAD: u32 = 5;
pub const BPF_LINK_CREATE: u32 = 28;
pub const BPF_MAP_TYPE_ARRAY: u64 = 2;
pub const BPF_F_MMAPABLE: u64 = 1 << 10;
pub const BPF_PROG_TYPE_SCHED_CLS: u64 = 3;
pub const BPF_PROG_TYPE_XDP: u64 = 6;
pub const BPF_XDP: u64 = 37;
pub const BPF_TCX_INGRESS: u64 = 46;
pub const XDP_FLAGS_SKB_MODE: u64 = 2;

/// The fd a bpf(2) command returned, owned.
fn fd(rc: i64) -> OwnedFd {
    // SAFETY: a new fd returned by bpf(2), owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(rc as i32) }
}

/// Loads `r0 = ret; exit` as a program of `prog_type`.
pub fn load_trivial(prog_type: u64, ret: i32) -> io::Result<OwnedFd> {
    // BPF_ALU64 | BPF_MOV | BPF_K into r0, then BPF_JMP | BPF_EXIT.
    let insns: [u64; 2] = [0xb7 | (u64::from(ret as u32) << 32), 0x95];
    let license = c"GPL";
    // union bpf_attr, BPF_PROG_LOAD: { u32 prog_type; u32 insn_cnt; u64 insns; u64 license; ... }
    let mut attr = [0u64; 16];
    attr[0] = prog_type | (2 << 32);
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    bpf(BPF_PROG_LOAD, &mut attr).map(fd)
}

/// BPF_LINK_CREATE of `prog` on `ifindex` at `attach_type`.
pub fn link_create(
    prog: &OwnedFd,
    ifindex: u32,
    attach_type: u64,
    flags: u64,
) -> io::Result<OwnedFd> {
    // union bpf_attr, BPF_LINK_CREATE: { u32 prog_fd; u32 target_ifindex; u32 attach_type; u32 flags; }
    let mut attr = [0u64; 16];
    attr[0] = prog.as_raw_fd() as u64 | (u64::from(ifindex) << 32);
    attr[1] = attach_type | (flags << 32);
    bpf(BPF_LINK_CREATE, &mut attr).map(fd)
}

/// Whether the kernel has TCX, told apart without attaching anything: a TCX link to no
/// interface fails with ENODEV where TCX exists, EINVAL where the attach type is unknown
/// (`link_create`). Any other error (no privileges) says nothing: returned as is.
pub fn tcx_link_probe() -> io::Result<bool> {
    match load_trivial(BPF_PROG_TYPE_SCHED_CLS, -1)
        .and_then(|p| link_create(&p, 0, BPF_TCX_INGRESS, 0))
    {
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(e),
        Ok(_) => Err(io::Error::other("a TCX link to no interface was accepted")),
    }
}

/// BPF_MAP_CREATE of an array of `max_entries` values of `value_size` bytes (u32 keys) with
/// `flags` (BPF_F_MMAPABLE, ...).
pub fn array_map_create(value_size: u32, max_entries: u32, flags: u64) -> io::Result<OwnedFd> {
    // union bpf_attr, BPF_MAP_CREATE: { u32 map_type; u32 key_size; u32 value_size;
    // u32 max_entries; u32 map_flags; ... }
    let mut attr = [0u64; 16];
    attr[0] = BPF_MAP_TYPE_ARRAY | (4 << 32);
    attr[1] = u64::from(value_size) | (u64::from(max_entries) << 32);
    attr[2] = flags;
    bpf(BPF_MAP_CREATE, &mut attr).map(fd)
}

/// BPF_MAP_CREATE of a hash map named `name` (at most 15 bytes) with u32 keys and values of
/// `value_size` bytes, allocated on use (BPF_F_NO_PREALLOC): the records drain-user keeps
/// beside a gate's maps (clsact filters, attach choices).
pub fn hash_map_create(name: &str, value_size: u32, max_entries: u32) -> io::Result<OwnedFd> {
    // union bpf_attr, BPF_MAP_CREATE: { u32 map_type; u32 key_size; u32 value_size;
    // u32 max_entries; u32 map_flags; u32 inner_map_fd; u32 numa_node;
    // char map_name[16]; ... }
    const BPF_MAP_TYPE_HASH: u64 = 1;
    const BPF_F_NO_PREALLOC: u64 = 1;
    let mut attr = [0u64; 16];
    attr[0] = BPF_MAP_TYPE_HASH | (4 << 32);
    attr[1] = u64::from(value_size) | (u64::from(max_entries) << 32);
    attr[2] = BPF_F_NO_PREALLOC;
    // map_name at byte 28: the upper half of attr[3] and attr[4..6].
    let mut bytes: Vec<u8> = attr.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let n = name.len().min(15);
    bytes[28..28 + n].copy_from_slice(&name.as_bytes()[..n]);
    for (w, chunk) in attr.iter_mut().zip(bytes.chunks(8)) {
        *w = u64::from_ne_bytes(chunk.try_into().expect("8 bytes"));
    }
    bpf(BPF_MAP_CREATE, &mut attr).map(fd)
}

//! The effective capabilities that matter to drain, from capget(2): what `check` reports
//! and what every other command requires before it starts.

use serde::Serialize;

/// The effective capabilities that matter to drain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Caps {
    pub root: bool,
    pub cap_bpf: bool,
    pub cap_net_admin: bool,
    pub cap_perfmon: bool,
    pub cap_sys_admin: bool,
}

impl Caps {
    /// The effective set, from capget(2) (one call; /proc/self/status says the same in
    /// CapEff, at the cost of reading and parsing the whole file).
    pub fn current() -> Self {
        const CAP_NET_ADMIN: u32 = 12;
        const CAP_SYS_ADMIN: u32 = 21;
        const CAP_PERFMON: u32 = 38;
        const CAP_BPF: u32 = 39;
        let eff = effective().unwrap_or(0);
        let has = |c: u32| eff & (1 << c) != 0;
        Caps {
            // SAFETY: geteuid has no preconditions.
            root: unsafe { libc::geteuid() } == 0,
            cap_bpf: has(CAP_BPF),
            cap_net_admin: has(CAP_NET_ADMIN),
            cap_perfmon: has(CAP_PERFMON),
            cap_sys_admin: has(CAP_SYS_ADMIN),
        }
    }

    /// Loading the gate programs and attaching them: CAP_NET_ADMIN, and CAP_BPF or
    /// CAP_SYS_ADMIN.
    pub fn can_gate(&self) -> bool {
        self.cap_net_admin && (self.cap_bpf || self.cap_sys_admin)
    }

    /// The tracker is a tracing program that reads kernel memory: CAP_PERFMON (with
    /// CAP_BPF) or CAP_SYS_ADMIN.
    pub fn can_trace(&self) -> bool {
        self.cap_sys_admin || (self.cap_bpf && self.cap_perfmon)
    }
}

/// This thread's effective capability set as one 64-bit mask (capget, version 3: two
/// 32-bit words); None when the call fails.
fn effective() -> Option<u64> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: a valid header and the two data structs version 3 fills.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    (r == 0).then(|| u64::from(data[1].effective) << 32 | u64::from(data[0].effective))
}

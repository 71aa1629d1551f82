//! The effective capabilities that matter to drain, read from /proc/self/status: what
//! `check` reports and what every other command requires before it starts.

use std::fs;

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
    /// From CapEff in /proc/self/status.
    pub fn current() -> Self {
        const CAP_NET_ADMIN: u32 = 12;
        const CAP_SYS_ADMIN: u32 = 21;
        const CAP_PERFMON: u32 = 38;
        const CAP_BPF: u32 = 39;
        let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
        let eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0);
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

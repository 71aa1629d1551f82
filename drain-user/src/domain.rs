//! The domain's own types: what a gate is asked to be (its attach choice, its policy), how
//! a command ends (exit codes, usage errors), the container runtimes a target may name. No
//! clap here: the command line ([`crate::cli`]) maps its arguments onto these, and every
//! layer below it speaks only these.

pub mod attach;
pub mod limits;

use std::{fmt, process::ExitCode};

use drain_common::{POLICY_DROP, POLICY_RESET};

/// How `gate on` may attach where it has to attach anew ([`attach::decide`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachChoice {
    /// XDP (native where the driver supports it, generic otherwise); refuse interfaces
    /// where another XDP program is attached.
    Xdp,
    /// TC ingress: TCX (kernel >= 6.6), first, alongside other TC programs; the clsact
    /// qdisc's cls_bpf filter on kernels without TCX.
    Tc,
    /// Per device (the default): TC on virtual devices, native XDP on a physical device
    /// whose driver has it, TC otherwise and where another XDP program holds the hook.
    Auto,
}

impl AttachChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            AttachChoice::Xdp => "xdp",
            AttachChoice::Tc => "tc",
            AttachChoice::Auto => "auto",
        }
    }

    /// One byte for the gate's record of a choice.
    pub fn to_raw(self) -> u8 {
        self as u8
    }

    pub fn from_raw(raw: u8) -> Option<Self> {
        [AttachChoice::Xdp, AttachChoice::Tc, AttachChoice::Auto]
            .into_iter()
            .find(|c| c.to_raw() == raw)
    }
}

/// How refused connection requests are answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Drop the SYN: the client retries for a while (Linux: ~130 s) before giving up.
    Drop,
    /// Answer with a RST: the client sees ECONNREFUSED at once and a load balancer retries
    /// elsewhere. The XDP/TC gate passes the refused SYNs the RST budget allows on to the
    /// stack and drops the rest; an sk_lookup program on the namespace then fails their
    /// listener lookup, and the kernel's TCP sends the RST (any interface, any headers).
    Reset,
}

impl Policy {
    /// The value of `GateConfig::policy`.
    pub fn to_raw(self) -> u32 {
        match self {
            Policy::Drop => POLICY_DROP,
            Policy::Reset => POLICY_RESET,
        }
    }

    /// From `GateConfig::policy`; anything the kernel does not know as reset drops.
    pub fn from_raw(raw: u32) -> Self {
        if raw == POLICY_RESET {
            Policy::Reset
        } else {
            Policy::Drop
        }
    }
}

/// The container runtime `--container` names a container of.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Runtime {
    #[default]
    Docker,
    Podman,
}

/// A usage error found after argument parsing (unknown interface, ...): exit code 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

/// How the process ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Done (also: stdout closed by its reader, e.g. `| head -1`, except for `wait`, whose
    /// 0 only ever means drained or idle).
    Success,
    /// Something failed; the message says what and what to do.
    Failure,
    /// Bad usage: nothing was changed.
    Usage,
    /// `wait`: the timeout passed before the ports drained.
    Timeout,
    /// `wait`: SIGINT (128 + 2, as a shell reports it).
    Interrupted,
    /// `wait`: SIGTERM (128 + 15).
    Terminated,
}

impl Exit {
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Failure => 1,
            Exit::Usage => 2,
            Exit::Timeout => 3,
            Exit::Interrupted => 130,
            Exit::Terminated => 143,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_raw_round_trip() {
        for p in [Policy::Drop, Policy::Reset] {
            assert_eq!(Policy::from_raw(p.to_raw()), p);
        }
    }
}

//! drain-user: take a server out of service without failing an in-flight request.
//!
//! The binary (`main.rs`) parses the command line and calls [`run`]; everything else is
//! here, one concept per module, in four layers, one directory each: `domain/` (types and
//! rules, no clap), `kernel/` (kernel access), `ops/` (the operations) and `present/` (the
//! command line and output). Dependencies point up this table: `present` uses `ops`, `ops`
//! uses `kernel`, all use `domain`; the exception is output that streams while an operation
//! runs (`wait`, `watch`, `agent`, `gate`'s warnings), written through `present/output.rs`.
//! Each module is also re-exported at the crate root.
//!
//! | module | holds |
//! |---|---|
//! | **domain/** | the domain's types and rules; no clap, no kernel |
//! | [`domain`] | the domain's types: attach choice, policy, container runtime, exit codes, usage errors (no clap) |
//! | [`attach`] | which hook an interface gets and why: `--attach auto`'s per-device decision (pure, unit-tested) |
//! | [`limits`] | the limits a gate's input is held to (ports per gate, rate -> per-CPU limiter), each written once |
//! | **kernel/** | kernel access: pins, links, maps, raw syscalls, netlink |
//! | [`btf`] | struct member offsets from the kernel's BTF |
//! | [`caps`] | the effective capabilities that matter to drain (what `check` reports, what every command requires) |
//! | [`choices`] | the gate's record of each interface's attach decision, which `status` reports |
//! | [`clsact`] | `--attach tc` without TCX: the clsact qdisc, drain's cls_bpf filter, its record, the kernel's view of it |
//! | [`conntrack`] | ctnetlink dumps: connections to a local port destination-NATed elsewhere (published ports) |
//! | [`diag`] | sock_diag (inet_diag) dumps of TCP connections |
//! | [`iface`] | the namespace's interfaces and the programs attached to them |
//! | [`links`] | what the kernel says about each pinned link: attached here, detached, moved away |
//! | [`netlink`] | netlink requests (dumps and acknowledged changes) for `iface`, `clsact` and `diag`, and the generic-netlink query of the netdev family `check` reads native XDP from |
//! | [`netns`] | network-namespace identity (inode + cookie), the state directory name, liveness and orphaned state |
//! | [`object`] | the embedded eBPF object and loading it |
//! | [`pins`] | every pin path in bpffs, mounting bpffs, trusting what is there (owner, mode, no symlink), the lock |
//! | [`state`] | [`state::OpenGate`]: one gate's pinned maps, opened once (switch, TTL, ports, counters, allowlists) |
//! | [`sys`] | the raw bpf(2) commands aya lacks (link detach, link info, program names) and `check`'s tiny probe programs, links and maps |
//! | [`target`] | `--netns`, `--pid`, `--container`: the network namespace a command acts on, entered first |
//! | [`track`] | the connection tracker: attach, seed, and [`track::Tracker`] (live counts, its set, its counters) |
//! | **ops/** | operations, one per subcommand |
//! | [`agent`] | `agent`: the balancer's agent-check / HTTP endpoint (no daemon), and `gate on --announce` |
//! | [`check`] | `check`: the preflight: the decision (pure, unit-tested) in check.rs, the probes in check/probe.rs (its text: present/check.rs) |
//! | [`follow`] | following a gated port's forwarded connections into the namespace they end in ([`follow::Follower`]) |
//! | [`gate`] | `gate on` / `gate off`: attach, pin, tear down |
//! | [`plan`] | `gate on/off --dry-run`: the difference between the wanted gate and the kernel's (its text: present/gate.rs) |
//! | [`status`] | `status`: collecting it (its text: present/status.rs) |
//! | [`wait`] | `wait`: the poll loop and its outcome, told to a [`wait::Reporter`] (its text and JSON: present/wait.rs) |
//! | [`watch`] | `watch`: the live view (kernel events from a ring buffer) |
//! | **present/** | presentation: the command line and what is printed |
//! | [`present`] | one file per subcommand: its arguments onto the domain's types, the operation, the output (text, JSON) |
//! | [`cli`] | the command line (clap): its definition, the values it parses (TTL, durations, prefixes), their mapping onto [`domain`]'s types; the only module that knows clap |
//! | [`metrics`] | `status --format prometheus` / `--textfile`: the Prometheus exposition |
//! | [`output`] | stdout/stderr lines that end the command quietly on EPIPE |

pub mod domain;
pub mod kernel;
pub mod ops;
pub mod present;

// Every module is named at the crate root too, so a path names the concept (`crate::gate`,
// `crate::sys`) whichever layer holds it.
pub use domain::{attach, limits};
pub use kernel::{
    btf, caps, choices, clsact, conntrack, diag, iface, links, netlink, netns, object, pins, state,
    sys, target, track,
};
pub use ops::{agent, check, follow, gate, plan, status, wait, watch};
pub use present::{cli, metrics, output};

use anyhow::{bail, Result};

use crate::{
    cli::{Cli, Command, GateAction, Placement},
    domain::Exit,
};

/// Runs one command: privileges, the target namespace, then the subcommand's own
/// [`present`] module, which prints. Errors carry their whole context; a
/// [`domain::UsageError`] among them means exit 2, an [`output::Closed`] a quiet exit 0
/// (never from `wait`, which keeps going).
pub fn run(cli: Cli) -> Result<Exit> {
    // `gate on` and `wait` load the tracker, a tracing program: CAP_PERFMON too.
    let tracing = match &cli.command {
        Command::Wait { .. } => true,
        Command::Gate {
            action: GateAction::On { plan, .. },
        } => !plan.dry_run,
        _ => false,
    };
    // The preflight reports missing privileges instead of stopping at them.
    if !matches!(cli.command, Command::Check { .. } | Command::Agent { .. }) {
        require_privileges(tracing)?;
    }
    // Before any thread starts (the tokio runtime, scoped helpers): they inherit it.
    target::enter(&target::Target::from(&cli.target))?;
    pins::check_mount_namespace()?;
    match cli.command {
        Command::Check {
            ports,
            place: Placement { ifaces, attach },
            policy,
            json,
        } => present::check::run(&ports, &ifaces, attach, policy, json),
        Command::Gate { action } => present::gate::run(action),
        Command::Agent { args } => present::agent::run(&args),
        Command::Watch {
            json,
            rate,
            duration,
        } => present::watch::run(json, rate, duration),
        Command::Wait {
            ports,
            timeout,
            idle,
            json,
        } => present::wait::run(ports, timeout, idle, json),
        Command::Status {
            json,
            format,
            textfile,
        } => present::status::run(json, format, textfile.as_deref()),
    }
}

/// One clear line instead of a cascade of EPERMs: loading BPF and attaching to interfaces
/// need CAP_BPF and CAP_NET_ADMIN; a tracing program (the tracker) also CAP_PERFMON
/// (kernel/bpf/syscall.c, bpf_prog_load: tracing types need perfmon_capable()).
/// CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON.
fn require_privileges(tracing: bool) -> Result<()> {
    let caps = caps::Caps::current();
    if !(caps.can_gate() && (caps.can_trace() || !tracing)) {
        bail!(
            "drain-user needs root (or CAP_BPF, CAP_NET_ADMIN and, for `gate on` and `wait`, \
             CAP_PERFMON): rerun it with sudo"
        );
    }
    Ok(())
}

//! drain-user: take a server out of service without failing an in-flight request.
//!
//! The binary (`main.rs`) parses the command line and calls [`run`]; everything else is
//! here, one concept per module:
//!
//! | module | holds |
//! |---|---|
//! | [`cli`] | the command line (clap): its definition, the values it parses (TTL, durations, prefixes), their mapping onto [`domain`]'s types; the only module that knows clap |
//! | [`domain`] | the domain's types: attach choice, policy, container runtime, exit codes, usage errors (no clap) |
//! | [`present`] | one file per subcommand: its arguments onto the domain's types, the operation, the output (text, JSON) |
//! | [`output`] | stdout/stderr lines that end the command quietly on EPIPE |
//! | [`object`] | the embedded eBPF object and loading it |
//! | [`netns`] | network-namespace identity (inode + cookie), the state directory name, liveness and orphaned state |
//! | [`pins`] | every pin path in bpffs, mounting bpffs, trusting what is there (owner, mode, no symlink), the lock |
//! | [`sys`] | the raw bpf(2) commands aya lacks (link detach, link info, program names) and `check`'s tiny probe programs, links and maps |
//! | [`caps`] | the effective capabilities that matter to drain (what `check` reports, what every command requires) |
//! | [`gate`] | `gate on` / `gate off`: attach, pin, tear down |
//! | [`state`] | [`state::OpenGate`]: one gate's pinned maps, opened once (switch, TTL, ports, counters, allowlists) |
//! | [`track`] | the connection tracker: attach, seed, and [`track::Tracker`] (live counts, its set, its counters) |
//! | [`status`] | `status`: collecting and printing it |
//! | [`plan`] | `gate on/off --dry-run`: the difference between the wanted gate and the kernel's |
//! | [`metrics`] | `status --format prometheus` / `--textfile`: the Prometheus exposition |
//! | [`wait`] | `wait`: the poll loop and its outcome; `wait/report.rs` prints it (JSON, text, progress line) |
//! | [`watch`] | `watch`: the live view (kernel events from a ring buffer) |
//! | [`iface`] | the namespace's interfaces and the programs attached to them |
//! | [`limits`] | the limits a gate's input is held to (ports per gate, rate -> per-CPU limiter), each written once |
//! | [`links`] | what the kernel says about each pinned link: attached here, detached, moved away |
//! | [`clsact`] | `--attach tc` without TCX: the clsact qdisc, drain's cls_bpf filter, its record, the kernel's view of it |
//! | [`diag`] | sock_diag (inet_diag) dumps of TCP connections |
//! | [`conntrack`] | ctnetlink dumps: connections to a local port destination-NATed elsewhere (published ports) |
//! | [`follow`] | following a gated port's forwarded connections into the namespace they end in ([`follow::Follower`]) |
//! | [`netlink`] | netlink requests (dumps and acknowledged changes) for `iface`, `clsact` and `diag`, and the generic-netlink query of the netdev family `check` reads native XDP from |
//! | [`btf`] | struct member offsets from the kernel's BTF |
//! | [`check`] | `check`: the preflight: the decision (pure, unit-tested) in check.rs, the probes in check/probe.rs, the text in check/render.rs |
//! | [`agent`] | `agent`: the balancer's agent-check / HTTP endpoint (no daemon), and `gate on --announce` |
//! | [`target`] | `--netns`, `--pid`, `--container`: the network namespace a command acts on, entered first |

pub mod agent;
pub mod btf;
pub mod caps;
pub mod check;
pub mod cli;
pub mod clsact;
pub mod conntrack;
pub mod diag;
pub mod domain;
pub mod follow;
pub mod gate;
pub mod iface;
pub mod limits;
pub mod links;
pub mod metrics;
pub mod netlink;
pub mod netns;
pub mod object;
pub mod output;
pub mod pins;
pub mod plan;
pub mod present;
pub mod state;
pub mod status;
pub mod sys;
pub mod target;
pub mod track;
pub mod wait;
pub mod watch;

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
        Command::Gate {
            action:
                GateAction::On {
                    ports,
                    place: Placement { ifaces, attach },
                    ttl,
                    allow,
                    policy,
                    rst_rate,
                    announce,
                    plan,
                },
        } => present::gate::on(present::gate::On {
            ports,
            ifaces,
            attach,
            ttl,
            allow,
            policy,
            rst_rate,
            announce,
            plan,
        }),
        Command::Gate {
            action: GateAction::Off { plan },
        } => present::gate::off(plan),
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

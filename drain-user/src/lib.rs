//! drain-user: take a server out of service without failing an in-flight request.
//!
//! The binary (`main.rs`) parses the command line and calls [`run`]; everything else is
//! here, one concept per module:
//!
//! | module | holds |
//! |---|---|
//! | [`cli`] | the command line (clap): its definition, the values it parses (TTL, durations, prefixes), their mapping onto [`domain`]'s types; the only module that knows clap |
//! | [`domain`] | the domain's types: attach choice, policy, container runtime, exit codes, usage errors (no clap) |
//! | [`output`] | stdout/stderr lines that end the command quietly on EPIPE |
//! | [`object`] | the embedded eBPF object and loading it |
//! | [`netns`] | network-namespace identity (inode + cookie), the state directory name, liveness and orphaned state |
//! | [`pins`] | every pin path in bpffs, mounting bpffs, trusting what is there (owner, mode, no symlink), the lock |
//! | [`sys`] | the raw bpf(2) commands aya lacks (link detach) |
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
//! | [`diag`] | sock_diag (inet_diag) dumps of TCP connections |
//! | [`conntrack`] | ctnetlink dumps: connections to a local port destination-NATed elsewhere (published ports) |
//! | [`follow`] | following a gated port's forwarded connections into the namespace they end in ([`follow::Follower`]) |
//! | [`netlink`] | netlink dump requests, shared by `iface` and `diag` |
//! | [`btf`] | struct member offsets from the kernel's BTF |
//! | [`check`] | `check`: the preflight (probes, and the decision made from them) |
//! | [`agent`] | `agent`: the balancer's agent-check / HTTP endpoint (no daemon), and `gate on --announce` |
//! | [`target`] | `--netns`, `--pid`, `--container`: the network namespace a command acts on, entered first |

pub mod agent;
pub mod btf;
pub mod check;
pub mod cli;
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
pub mod state;
pub mod status;
pub mod sys;
pub mod target;
pub mod track;
pub mod wait;
pub mod watch;

use std::collections::BTreeSet;

use anyhow::{bail, Result};

use crate::{
    cli::{Cli, Command, GateAction, Placement, StatusFormat},
    domain::Exit,
};

/// Runs one command. Errors carry their whole context; a [`domain::UsageError`] among them
/// means exit 2, an [`output::Closed`] a quiet exit 0 (never from `wait`, which keeps going).
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
        } => {
            limits::check_port_count(ports.len())?;
            let want = check::Wanted {
                attach: attach.into(),
                policy: policy.into(),
            };
            let report = check::decide(&check::probe(&ifaces)?, &want);
            if json {
                outln!("{}", serde_json::to_string(&report)?)?;
            } else {
                output::out(format_args!("{}", check::human(&report).trim_end()))?;
            }
            if let Some(problem) = &report.problem {
                errln!("drain-user: error: {problem}")?;
                return Ok(Exit::Failure);
            }
        }
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
        } => {
            let args = gate::OnArgs {
                ports: ports.into_iter().collect::<BTreeSet<_>>(),
                ifaces,
                attach: attach.into(),
                ttl: ttl.0,
                allow,
                policy: policy.into(),
                rst_rate,
                announce: agent::Announce::from(announce),
            };
            args.validate()?;
            follow::check_policy(&args.ports, args.policy)?;
            let targets = iface::resolve(&args.ifaces)?;
            if targets.is_empty() {
                bail!("no interface is up in this network namespace: name one with --iface");
            }
            if plan.dry_run {
                return print_plan(&plan::on(&args, &targets, status::collect()?)?, plan.json);
            }
            let report = gate::on(&args, &targets)?;
            // A published port: its connections live where a DNAT sends them.
            for line in follow::after_gate_on(&pins::gate_dir()?, &args.ports)? {
                errln!("{line}")?;
            }
            if let Some(w) = gate::ungated_warning(&gate::ungated(&pins::gate_dir()?)?, args.policy)
            {
                errln!("{w}")?;
            }
            let ports: Vec<String> = args.ports.iter().map(u16::to_string).collect();
            let ttl = match args.ttl {
                Some(t) => format!("the TTL ({}) runs out", humantime::format_duration(t)),
                None => "forever (no TTL)".into(),
            };
            match args.announce.delay {
                Some(d) => outln!(
                    "gate on: announced: `drain-user agent` answers drain now; new connections to port {} are refused on {} in {}, or once `drain-user wait` sees none for {}; until `drain-user gate off` or {ttl}",
                    ports.join(","),
                    report.join(", "),
                    humantime::format_duration(d),
                    humantime::format_duration(args.announce.quiet),
                )?,
                None => outln!(
                    "gate on: new connections to port {} are refused on {}; until `drain-user gate off` or {ttl}",
                    ports.join(","),
                    report.join(", ")
                )?,
            }
        }
        Command::Gate {
            action: GateAction::Off { plan },
        } => {
            if plan.dry_run {
                return print_plan(&plan::off(status::collect()?), plan.json);
            }
            if gate::off()? {
                outln!("gate off: detached and unpinned; new connections are accepted")?;
            } else {
                outln!("gate off: no gate in this network namespace (already off)")?;
            }
        }
        Command::Agent { args } => {
            return agent::serve(&agent::Options {
                weight: args.weight,
                greeting: args.greeting,
            })
        }
        Command::Watch {
            json,
            rate,
            duration,
        } => watch::watch(&watch::WatchArgs {
            json,
            rate,
            duration,
        })?,
        Command::Wait {
            ports,
            timeout,
            idle,
            json,
        } => {
            // Its exit code is its result: a reader that goes away does not end it.
            output::keep_going_when_closed();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            return rt.block_on(wait::wait(wait::WaitArgs {
                ports,
                timeout,
                idle,
                format: wait::Format::pick(json),
            }));
        }
        Command::Status {
            json,
            format,
            textfile,
        } => {
            let st = status::collect()?;
            if let Some(path) = textfile {
                metrics::write_textfile(&path, &metrics::prometheus(&st)?)?;
                return Ok(Exit::Success);
            }
            let format = match (json, format) {
                (true, _) => StatusFormat::Json,
                (false, f) => f.unwrap_or(StatusFormat::Text),
            };
            match format {
                StatusFormat::Json => outln!("{}", serde_json::to_string(&st)?)?,
                StatusFormat::Prometheus => {
                    let text = metrics::prometheus(&st)?;
                    output::out(format_args!("{}", text.trim_end_matches('\n')))?;
                }
                StatusFormat::Text => {
                    let text = status::human(&st);
                    output::out(format_args!("{}", text.trim_end_matches('\n')))?;
                }
            }
        }
    }
    Ok(Exit::Success)
}

/// `gate on/off --dry-run`: the plan as JSON or text; exit 0 whether or not it changes
/// anything (`changed` says).
fn print_plan(p: &plan::Plan, json: bool) -> Result<Exit> {
    if json {
        outln!("{}", serde_json::to_string(p)?)?;
    } else {
        outln!("{}", plan::human(p))?;
    }
    Ok(Exit::Success)
}

/// One clear line instead of a cascade of EPERMs: loading BPF and attaching to interfaces
/// need CAP_BPF and CAP_NET_ADMIN; a tracing program (the tracker) also CAP_PERFMON
/// (kernel/bpf/syscall.c, bpf_prog_load: tracing types need perfmon_capable()).
/// CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON.
fn require_privileges(tracing: bool) -> Result<()> {
    let caps = check::Caps::current();
    if !(caps.can_gate() && (caps.can_trace() || !tracing)) {
        bail!(
            "drain-user needs root (or CAP_BPF, CAP_NET_ADMIN and, for `gate on` and `wait`, \
             CAP_PERFMON): rerun it with sudo"
        );
    }
    Ok(())
}

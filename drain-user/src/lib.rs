//! drain-user: take a server out of service without failing an in-flight request.
//!
//! The binary (`main.rs`) parses the command line and calls [`run`]; everything else is
//! here, one concept per module:
//!
//! | module | holds |
//! |---|---|
//! | [`cli`] | the command line (clap), its value types (attach choice, policy, TTL, durations), usage errors, exit codes |
//! | [`output`] | stdout/stderr lines that end the command quietly on EPIPE |
//! | [`object`] | the embedded eBPF object and loading it |
//! | [`netns`] | network-namespace identity (inode + cookie), the state directory name, liveness and orphaned state |
//! | [`pins`] | every pin path in bpffs, mounting bpffs, trusting what is there (owner, mode, no symlink), the lock |
//! | [`sys`] | the raw bpf(2) commands aya lacks (link detach) |
//! | [`gate`] | `gate on` / `gate off`: attach, pin, tear down |
//! | [`state`] | [`state::OpenGate`]: one gate's pinned maps, opened once (switch, TTL, ports, counters, allowlists) |
//! | [`track`] | the connection tracker: attach, seed, and [`track::Tracker`] (live counts, its set, its counters) |
//! | [`status`] | `status`: collecting and printing it |
//! | [`wait`] | `wait`: the poll loop and its outcome; `wait/report.rs` prints it (JSON, text, progress line) |
//! | [`iface`] | the namespace's interfaces and the programs attached to them |
//! | [`links`] | what the kernel says about each pinned link: attached here, detached, moved away |
//! | [`diag`] | sock_diag (inet_diag) dumps of TCP connections |
//! | [`netlink`] | netlink dump requests, shared by `iface` and `diag` |
//! | [`btf`] | struct member offsets from the kernel's BTF |

pub mod btf;
pub mod cli;
pub mod diag;
pub mod gate;
pub mod iface;
pub mod links;
pub mod netlink;
pub mod netns;
pub mod object;
pub mod output;
pub mod pins;
pub mod state;
pub mod status;
pub mod sys;
pub mod track;
pub mod wait;

use std::collections::BTreeSet;

use anyhow::{bail, Result};

use crate::cli::{Cli, Command, Exit, GateAction};

/// Runs one command. Errors carry their whole context; a [`cli::UsageError`] among them
/// means exit 2, an [`output::Closed`] a quiet exit 0.
pub fn run(cli: Cli) -> Result<Exit> {
    // `gate on` and `wait` load the tracker, a tracing program: CAP_PERFMON too.
    let tracing = matches!(
        cli.command,
        Command::Wait { .. }
            | Command::Gate {
                action: GateAction::On { .. }
            }
    );
    require_privileges(tracing)?;
    pins::check_mount_namespace()?;
    match cli.command {
        Command::Gate {
            action:
                GateAction::On {
                    ports,
                    ifaces,
                    attach,
                    ttl,
                    allow,
                    policy,
                    rst_rate,
                },
        } => {
            let args = gate::OnArgs {
                ports: ports.into_iter().collect::<BTreeSet<_>>(),
                ifaces,
                attach,
                ttl: ttl.0,
                allow,
                policy,
                rst_rate,
            };
            args.validate()?;
            let targets = iface::resolve(&args.ifaces)?;
            if targets.is_empty() {
                bail!("no interface is up in this network namespace: name one with --iface");
            }
            let report = gate::on(&args, &targets)?;
            if let Some(w) = gate::ungated_warning(&gate::ungated(&pins::gate_dir()?)?, args.policy)
            {
                errln!("{w}")?;
            }
            let ports: Vec<String> = args.ports.iter().map(u16::to_string).collect();
            let ttl = match args.ttl {
                Some(t) => format!("the TTL ({}) runs out", humantime::format_duration(t)),
                None => "forever (no TTL)".into(),
            };
            outln!(
                "gate on: new connections to port {} are refused on {}; until `drain-user gate off` or {ttl}",
                ports.join(","),
                report.join(", ")
            )?;
        }
        Command::Gate {
            action: GateAction::Off,
        } => {
            if gate::off()? {
                outln!("gate off: detached and unpinned; new connections are accepted")?;
            } else {
                outln!("gate off: no gate in this network namespace (already off)")?;
            }
        }
        Command::Wait {
            ports,
            timeout,
            idle,
            json,
        } => {
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
        Command::Status { json } => {
            let st = status::collect()?;
            if json {
                outln!("{}", serde_json::to_string(&st)?)?;
            } else {
                let text = status::human(&st);
                output::out(format_args!("{}", text.trim_end_matches('\n')))?;
            }
        }
    }
    Ok(Exit::Success)
}

/// One clear line instead of a cascade of EPERMs: loading BPF and attaching to interfaces
/// need CAP_BPF and CAP_NET_ADMIN; a tracing program (the tracker) also CAP_PERFMON
/// (kernel/bpf/syscall.c, bpf_prog_load: tracing types need perfmon_capable()).
/// CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON.
fn require_privileges(tracing: bool) -> Result<()> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |c: u32| eff & (1 << c) != 0;
    let bpf = has(CAP_BPF) || has(CAP_SYS_ADMIN);
    let perfmon = has(CAP_PERFMON) || has(CAP_SYS_ADMIN);
    if !(has(CAP_NET_ADMIN) && bpf && (perfmon || !tracing)) {
        bail!(
            "drain-user needs root (or CAP_BPF, CAP_NET_ADMIN and, for `gate on` and `wait`, \
             CAP_PERFMON): rerun it with sudo"
        );
    }
    Ok(())
}

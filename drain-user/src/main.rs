//! drain-user: take a server out of service without failing an in-flight request.
//!
//! Layout: `gate.rs` (attach/detach, on/off), `state.rs` (the pinned maps), `pins.rs` (pin
//! paths, bpffs, lock), `netlink.rs` (interfaces), `status.rs` (status output).

mod btf;
mod diag;
mod gate;
mod netlink;
mod pins;
mod state;
mod status;
mod track;
mod wait;

use std::{collections::BTreeSet, fmt, process::ExitCode, time::Duration};

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use ipnet::IpNet;

use crate::gate::{AttachChoice, Policy};

/// Refuse new TCP connections on chosen ports while established ones finish, then restore.
///
/// State lives in pinned BPF objects (/sys/fs/bpf/drain/<netns>), one gate per network
/// namespace; no daemon runs. Exit codes: 0 ok, 1 error, 2 bad usage, 3 `wait` timed out.
#[derive(Parser)]
#[command(name = "drain-user", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Turn the gate on or off.
    Gate {
        #[command(subcommand)]
        action: GateAction,
    },
    /// Show the gate, its interfaces and per-port counters.
    ///
    /// Example: drain-user status --json
    Status {
        /// One JSON object: {"gate", "expired", "ttl_remaining_ms", "interfaces", "ports", "allow"}.
        #[arg(long)]
        json: bool,
    },
    /// Block until no connection is left on the ports (exit 0), or the timeout passes
    /// (exit 3, listing what is left).
    ///
    /// Live means ESTABLISHED or CLOSE_WAIT: the server still owns the connection. Counts
    /// come from the kernel (exact, event-driven); the last close is noticed within ~10 ms.
    ///
    /// Example: drain-user wait --timeout 5m --idle 2s
    Wait {
        /// Port to wait for (repeatable or comma-separated). Default: the gated ports.
        #[arg(long = "port", short = 'p', value_delimiter = ',',
              value_parser = clap::value_parser!(u16).range(1..))]
        ports: Vec<u16>,
        /// Give up after this long (e.g. 500ms, 30s, 5m): exit 3 and list the leftovers.
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        /// Also done when every connection left has no unread, unsent or unacknowledged
        /// bytes and has carried no data for this long (pooled keep-alive connections).
        #[arg(long, value_parser = humantime::parse_duration)]
        idle: Option<Duration>,
        /// One JSON object per change on stdout: {"event": "progress"|"drained"|"idle"|"timeout", ...}.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum GateAction {
    /// Refuse new connections (SYNs) to PORTs; established connections keep flowing.
    ///
    /// Attaches where needed, sets the ports, turns the gate on and exits; the gate stays on
    /// after the process is gone, until `gate off` or the TTL runs out. Running it again
    /// replaces the port set, allowlist and TTL.
    ///
    /// Example: drain-user gate on --port 80,443 --ttl 15m
    On {
        /// Local TCP port to gate (repeat, or comma-separate: --port 80,443).
        #[arg(long = "port", short = 'p', required = true, value_delimiter = ',',
              value_parser = clap::value_parser!(u16).range(1..))]
        ports: Vec<u16>,
        /// Interface to gate (repeatable). Default: every interface that is up, lo included.
        #[arg(long = "iface", short = 'i')]
        ifaces: Vec<String>,
        /// Hook: xdp (fastest; refuses if another XDP program holds the interface), tc
        /// (TCX ingress, alongside other programs), auto (xdp where free, tc elsewhere).
        #[arg(long, value_enum, default_value_t = AttachChoice::Xdp)]
        attach: AttachChoice,
        /// The kernel opens the gate by itself after this long, even if nothing is left
        /// running to call `gate off` (e.g. 90s, 15m, 2h). `none` disables the safety net.
        #[arg(long, default_value = "10m", value_parser = parse_ttl)]
        ttl: Ttl,
        /// Source prefix whose connections still pass while the gate is on (repeatable;
        /// IPv4 or IPv6 CIDR, e.g. 10.0.0.0/8, fd00::/8).
        #[arg(long = "allow", value_delimiter = ',')]
        allow: Vec<IpNet>,
        /// How a refused connection request is answered: drop (client times out) or reset
        /// (RST|ACK from XDP: ECONNREFUSED at once, rate-limited by --rst-rate).
        #[arg(long, value_enum, default_value_t = Policy::Drop)]
        policy: Policy,
        /// Most RSTs sent per second (all CPUs together); refusals beyond it are dropped
        /// and counted, so spoofed SYNs cannot turn the host into a reflector.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
        rst_rate: u32,
    },
    /// Open the gate, detach from every interface and remove every pin.
    ///
    /// Example: drain-user gate off
    Off,
}

#[derive(Clone, Copy, Debug)]
struct Ttl(Option<Duration>);

fn parse_ttl(s: &str) -> Result<Ttl, String> {
    if s == "none" {
        return Ok(Ttl(None));
    }
    let d =
        humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 90s, 15m, 2h, none)"))?;
    // The deadline is boot time + TTL in u64 nanoseconds (~584 years): a longer TTL would
    // wrap around into a short one.
    const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 86_400);
    if d > MAX_TTL {
        return Err("a TTL over 100 years cannot be kept; use `none` for no TTL".into());
    }
    if d.is_zero() {
        return Err("a TTL of zero would open the gate at once; use `none` for no TTL".into());
    }
    Ok(Ttl(Some(d)))
}

/// A usage error found after argument parsing (unknown interface, ...): exit code 2.
#[derive(Debug)]
pub struct UsageError(String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

pub fn usage(msg: String) -> anyhow::Error {
    UsageError(msg).into()
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help, --version, and a bare `drain-user`: clap's own output and exit code.
        Err(e)
            if !e.use_stderr()
                || e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            e.exit()
        }
        // A usage error is one line, like every other error (clap adds a blank line, tips
        // and a "For more information" line): its first paragraph, joined.
        Err(e) => {
            let text = e.render().to_string();
            let first: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let msg = first.join(" ");
            let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
            eprintln!("drain-user: error: {msg} (see --help)");
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("drain-user: error: {e:#}");
            if e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    require_privileges()?;
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
            if args.ports.len() > drain_common::MAX_GATED_PORTS as usize {
                return Err(usage(format!(
                    "{} ports given: a gate holds at most {}",
                    args.ports.len(),
                    drain_common::MAX_GATED_PORTS
                )));
            }
            let targets = gate::resolve_ifaces(&args.ifaces)?;
            if targets.is_empty() {
                bail!("no interface is up in this network namespace: name one with --iface");
            }
            let report = gate::on(&args, &targets)?;
            let ports: Vec<String> = args.ports.iter().map(u16::to_string).collect();
            let ttl = match args.ttl {
                Some(t) => format!("the TTL ({}) runs out", humantime::format_duration(t)),
                None => "forever (no TTL)".into(),
            };
            println!(
                "gate on: new connections to port {} are refused on {}; until `drain-user gate off` or {ttl}",
                ports.join(","),
                report.join(", ")
            );
        }
        Command::Gate {
            action: GateAction::Off,
        } => {
            if gate::off()? {
                println!("gate off: detached and unpinned; new connections are accepted");
            } else {
                println!("gate off: no gate in this network namespace (already off)");
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
                json,
            }));
        }
        Command::Status { json } => {
            let st = status::collect()?;
            if json {
                println!("{}", serde_json::to_string(&st)?);
            } else {
                status::print_human(&st);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One clear line instead of a cascade of EPERMs: loading BPF and attaching to interfaces
/// need CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN.
fn require_privileges() -> Result<()> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |c: u32| eff & (1 << c) != 0;
    if !(has(CAP_NET_ADMIN) && (has(CAP_BPF) || has(CAP_SYS_ADMIN))) {
        bail!("drain-user needs root (or CAP_BPF and CAP_NET_ADMIN): rerun it with sudo");
    }
    Ok(())
}

//! The command line: the clap definition (its doc comments are the help text), the value
//! types it parses (TTL, durations, prefixes) and their mapping onto the domain's types
//! ([`crate::domain`]). The only module that knows clap: nothing below it imports from here.
//!
//! [`Cli`] is public so that man pages and shell completions can be generated from it.

use std::time::Duration;

use clap::{Parser, Subcommand};
use ipnet::IpNet;

use crate::{
    agent::Announce,
    domain::{AttachChoice, Policy, Runtime},
    target::Target,
};

/// `--version`: the crate version and the first 12 hex digits of the SHA-256 of the kernel
/// object built into the binary (`none`: built without it).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (kernel object sha256 ",
    env!("DRAIN_EBPF_SHA256"),
    ")"
);

/// Refuse new TCP connections on chosen ports while established ones finish, then restore.
///
/// State lives in pinned BPF objects (/sys/fs/bpf/drain/<netns>), one gate per network
/// namespace; no daemon runs. Exit codes: 0 ok, 1 error, 2 bad usage, 3 `wait` timed out.
#[derive(Debug, Parser)]
#[command(name = "drain-user", version = VERSION)]
pub struct Cli {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// The network namespace a command acts on (default: the caller's). drain-user enters only
/// that namespace's network stack, before anything else runs, and keeps the host's mount
/// namespace, so the gate's pins stay in the host's bpffs: the gate, tracker, TTL, policy,
/// status, watch and reaper then work there exactly as in any namespace. At most one.
#[derive(Debug, Default, clap::Args)]
pub struct TargetArgs {
    /// Act in the network namespace at PATH (e.g. /var/run/netns/NAME, /proc/PID/ns/net).
    ///
    /// Example: drain-user --netns /var/run/netns/web gate on --port 80
    #[arg(long, global = true, value_name = "PATH", conflicts_with_all = ["pid", "container"])]
    pub netns: Option<std::path::PathBuf>,
    /// Act in the network namespace of process PID.
    #[arg(long, global = true, value_name = "PID", conflicts_with = "container",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub pid: Option<u32>,
    /// Act in the network namespace of a running container, found through the runtime's own
    /// CLI (`/usr/bin/docker inspect`, or podman's; DOCKER_HOST and CONTAINER_HOST are
    /// honoured).
    ///
    /// Example: drain-user --container web gate on --port 80
    #[arg(long, global = true, value_name = "NAME")]
    pub container: Option<String>,
    /// The container runtime that knows --container.
    #[arg(
        long,
        global = true,
        value_enum,
        requires = "container",
        value_name = "RUNTIME"
    )]
    pub runtime: Option<RuntimeArg>,
}

/// `--runtime`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RuntimeArg {
    #[default]
    Docker,
    Podman,
}

impl From<RuntimeArg> for Runtime {
    fn from(r: RuntimeArg) -> Self {
        match r {
            RuntimeArg::Docker => Runtime::Docker,
            RuntimeArg::Podman => Runtime::Podman,
        }
    }
}

impl From<&TargetArgs> for Target {
    fn from(t: &TargetArgs) -> Self {
        Target {
            netns: t.netns.clone(),
            pid: t.pid,
            container: t.container.clone(),
            runtime: t.runtime.map(Runtime::from),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Preflight: can a gate work in this network namespace? Changes nothing.
    ///
    /// Probes the kernel version and the BPF features drain uses, BTF, bpffs, privileges,
    /// and each interface's XDP/TCX hooks. Exit 0 when a gate with these options can work
    /// here, 1 with the first blocking problem and what to do. Runs without privileges too
    /// (and then says they are missing).
    ///
    /// Example: drain-user check --port 80,443 --json
    Check {
        /// Ports the gate would hold (repeatable or comma-separated; at most 64).
        #[arg(long = "port", short = 'p', value_delimiter = ',',
              value_parser = clap::value_parser!(u16).range(1..))]
        ports: Vec<u16>,
        #[command(flatten)]
        place: Placement,
        /// The policy `gate on` would be asked for.
        #[arg(long, value_enum, default_value_t = PolicyArg::Drop)]
        policy: PolicyArg,
        /// One JSON object: {"ok", "problem", "kernel", "checks", "interfaces"}.
        #[arg(long)]
        json: bool,
    },
    /// Turn the gate on or off.
    Gate {
        #[command(subcommand)]
        action: GateAction,
    },
    /// Show the gate, its interfaces and per-port counters.
    ///
    /// Example: drain-user status --json
    Status {
        /// Same as --format json.
        #[arg(long, conflicts_with = "format")]
        json: bool,
        /// text (default); json: one object {"gate", "policy", "sk_lookup", "expired",
        /// "ttl_remaining_ms", "interfaces", "ungated", "ports", "allow", "tracker",
        /// "warnings", "announced", "closes_in_ms", "maint", "ttl_ms", "rst_rate",
        /// "quiet_ms"}; prometheus: the text exposition
        /// format (drain_* metrics, port as a label).
        #[arg(long, value_enum)]
        format: Option<StatusFormat>,
        /// Write the Prometheus metrics to this file instead (atomically: a temporary file
        /// in the same directory, then rename), for node_exporter's textfile collector.
        ///
        /// Example: drain-user status --textfile /var/lib/prometheus/node-exporter/drain.prom
        #[arg(long, value_name = "PATH", conflicts_with_all = ["format", "json"])]
        textfile: Option<std::path::PathBuf>,
    },
    /// Live view of the gate: refused SYNs, connections closing, the TTL running out.
    ///
    /// Each refused SYN (source address and port, destination port, drop or rst), each
    /// tracked connection leaving the live set (with the count left on its port), the TTL
    /// running out. The kernel samples events (--rate); what it held back is counted and
    /// shown once a second. Ends when the gate is turned off.
    ///
    /// Example: drain-user watch --json --duration 5m
    Watch {
        /// One JSON object per line: {"event": "refused"|"left"|"limited"|"ttl_expired"|"gate_off", ...}.
        #[arg(long)]
        json: bool,
        /// Most events per second of each kind (refused, closed), all CPUs together.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        rate: u32,
        /// Stop after this long (e.g. 30s, 5m). Default: until Ctrl-C or `gate off`.
        #[arg(long, value_parser = parse_duration)]
        duration: Option<Duration>,
    },
    /// Block until no connection is left on the ports (exit 0), or the timeout passes
    /// (exit 3, listing what is left).
    ///
    /// Live means ESTABLISHED or CLOSE_WAIT: the server still owns the connection. Counts
    /// come from the kernel (exact, event-driven); the last close is noticed within ~10 ms.
    ///
    /// The exit code is the outcome even when the reader of its output goes away: with
    /// stdout or stderr closed (`drain-user wait --json | head -1`) it keeps waiting and
    /// exits 0 only once drained or idle (3 on timeout, 130/143 on SIGINT/SIGTERM).
    ///
    /// Example: drain-user wait --timeout 5m --idle 2s
    Wait {
        /// Port to wait for (repeatable or comma-separated). Default: the gated ports.
        #[arg(long = "port", short = 'p', value_delimiter = ',',
              value_parser = clap::value_parser!(u16).range(1..))]
        ports: Vec<u16>,
        /// Give up after this long (e.g. 500ms, 30s, 5m): exit 3 and list the leftovers.
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<Duration>,
        /// Also done when every connection left has no unread, unsent or unacknowledged
        /// bytes and has carried no data for this long (pooled keep-alive connections).
        #[arg(long, value_parser = parse_duration)]
        idle: Option<Duration>,
        /// One JSON object per change on stdout: {"event": "progress"|"drained"|"idle"|"timeout", ...}.
        #[arg(long)]
        json: bool,
    },
    /// Answer a balancer's health or agent check with this namespace's gate state; no daemon.
    ///
    /// Serves the connection on stdin/stdout (inetd, systemd Accept=yes), or accepts on the
    /// listening socket systemd hands over (LISTEN_FDS, fd 3). Each answer reads the pinned
    /// gate afresh, read-only. HAProxy agent-check: one line, `ready` (no gate, gate off or
    /// its TTL ran out), `drain` (announced or closed), `maint` (`gate on --maint`), then the
    /// weight if --weight is given. A request starting with an HTTP method gets HTTP:
    /// 200 ready / 503 draining, with the state and live count as JSON. Give the agent's
    /// port to `gate on --agent-port` so no gate can cover it.
    ///
    /// Example: systemd-socket-activate --inetd -l 9707 drain-user agent --weight 100
    Agent {
        #[command(flatten)]
        args: AgentArgs,
    },
}

/// `agent`'s options.
#[derive(Debug, Default, clap::Args)]
pub struct AgentArgs {
    /// Weight (0 to 256, percent of the configured one) appended to `ready` in agent-check
    /// replies as `NN%`, e.g. --weight 100 restores the full weight after a drain.
    #[arg(long, value_parser = clap::value_parser!(u16).range(0..=256))]
    pub weight: Option<u16>,
    /// How long to wait for a request before answering as agent-check (HAProxy sends
    /// nothing unless agent-send is set); HTTP clients speak first.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub greeting: Duration,
}

/// `gate on`'s announcement and agent options.
#[derive(Debug, Default, clap::Args)]
pub struct AnnounceArgs {
    /// Tell the balancer first: `drain-user agent` answers `drain` at once, and the gate
    /// refuses only after DELAY, or earlier once `drain-user wait` sees no new connection
    /// request to the ports for --quiet (e.g. 3s). Without a running `wait`, DELAY it is.
    #[arg(long, value_name = "DELAY", value_parser = parse_duration)]
    pub announce: Option<Duration>,
    /// With --announce: how long the ports must see no new connection request before `wait`
    /// closes the gate early. Make it longer than the balancer takes to act on the agent
    /// (its check interval, e.g. HAProxy's agent-inter, 2s by default, plus the answer's
    /// time): a balancer that pools connections may open none for a while anyway.
    #[arg(long, default_value = "3s", value_parser = parse_duration, requires = "announce")]
    pub quiet: Duration,
    /// The agent answers `maint` instead of `drain` (HAProxy: maintenance mode).
    #[arg(long)]
    pub maint: bool,
    /// The port `drain-user agent` answers on: `gate on` refuses to gate it, since a gated
    /// agent could never tell the balancer anything.
    #[arg(long, env = "DRAIN_AGENT_PORT", value_name = "PORT",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub agent_port: Option<u16>,
}

impl From<AnnounceArgs> for Announce {
    fn from(a: AnnounceArgs) -> Self {
        Self {
            delay: a.announce,
            quiet: a.quiet,
            maint: a.maint,
            agent_port: a.agent_port,
        }
    }
}

/// Where a gate goes: its interfaces and its hook (`gate on`, and `check` asking about it).
#[derive(Debug, clap::Args)]
pub struct Placement {
    /// Interface to gate (repeatable). Default: every interface that is up, lo included.
    #[arg(long = "iface", short = 'i')]
    pub ifaces: Vec<String>,
    /// Hook: auto (the default: per device, TC on virtual devices such as veth, bridge and
    /// lo, native XDP on a NIC whose driver has it, TC otherwise and where another XDP program
    /// holds the hook; `status` says which and why), xdp (native where the driver has it,
    /// generic elsewhere; refuses if another XDP program holds the interface), tc (TCX
    /// ingress, first, alongside other programs; the clsact qdisc on kernels without TCX).
    #[arg(long, value_enum, default_value_t = AttachArg::Auto)]
    pub attach: AttachArg,
}

#[derive(Debug, Subcommand)]
pub enum GateAction {
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
        #[command(flatten)]
        place: Placement,
        /// The kernel opens the gate by itself after this long, even if nothing is left
        /// running to call `gate off` (e.g. 90s, 15m, 2h). `none` disables the safety net.
        #[arg(long, default_value = "10m", value_parser = parse_ttl)]
        ttl: Ttl,
        /// Source prefix whose connections still pass while the gate is on (repeatable;
        /// IPv4 or IPv6 CIDR, e.g. 10.0.0.0/8, fd00::/8; at most 1024 of each family).
        #[arg(long = "allow", value_delimiter = ',', value_parser = parse_allow)]
        allow: Vec<IpNet>,
        /// How a refused connection request is answered: drop (client times out) or reset
        /// (the kernel's TCP answers with a RST: ECONNREFUSED at once, on every interface of
        /// the namespace, those created later too; rate-limited by --rst-rate on the gated
        /// interfaces).
        #[arg(long, value_enum, default_value_t = PolicyArg::Drop)]
        policy: PolicyArg,
        /// Most RSTs sent per second (all CPUs together); refusals beyond it are dropped
        /// and counted, so spoofed SYNs cannot turn the host into a reflector.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
        rst_rate: u32,
        #[command(flatten)]
        announce: AnnounceArgs,
        #[command(flatten)]
        plan: PlanArgs,
    },
    /// Open the gate, detach from every interface and remove every pin.
    ///
    /// Example: drain-user gate off
    Off {
        #[command(flatten)]
        plan: PlanArgs,
    },
}

/// `gate on/off --dry-run [--json]`.
#[derive(Debug, Default, clap::Args)]
pub struct PlanArgs {
    /// Change nothing: print what the command would change, each setting that differs
    /// between the gate wanted and the gate the kernel has (gate, ports, policy, allowlist,
    /// interfaces and their hooks, TTL, RST rate, announcement, quiet, maint). Exit 0 either
    /// way; bad input is the same usage error (exit 2) as without --dry-run.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: one JSON object {"action", "changed", "differences": [{"field",
    /// "before", "after"}], "ttl_renewed", "status"}.
    #[arg(long, requires = "dry_run")]
    pub json: bool,
}

/// `status --format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StatusFormat {
    Text,
    Json,
    Prometheus,
}

/// `--attach`: how `gate on` may attach where it has to attach anew ([`AttachChoice`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachArg {
    /// XDP (native where the driver supports it, generic otherwise); refuse interfaces
    /// where another XDP program is attached.
    Xdp,
    /// TC ingress: TCX (kernel >= 6.6), first, alongside other TC programs; the clsact
    /// qdisc's filter on kernels without TCX.
    Tc,
    /// Per device: TC on virtual devices, native XDP on a physical device whose driver has
    /// it, TC otherwise and where another XDP program holds the hook.
    Auto,
}

impl From<AttachArg> for AttachChoice {
    fn from(a: AttachArg) -> Self {
        match a {
            AttachArg::Xdp => AttachChoice::Xdp,
            AttachArg::Tc => AttachChoice::Tc,
            AttachArg::Auto => AttachChoice::Auto,
        }
    }
}

/// `--policy`: how refused connection requests are answered ([`Policy`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyArg {
    /// Drop the SYN: the client retries for a while (Linux: ~130 s) before giving up.
    Drop,
    /// Answer with a RST: the client sees ECONNREFUSED at once and a load balancer retries
    /// elsewhere. The XDP/TC gate passes the refused SYNs the RST budget allows on to the
    /// stack and drops the rest; an sk_lookup program on the namespace then fails their
    /// listener lookup, and the kernel's TCP sends the RST (any interface, any headers).
    Reset,
}

impl From<PolicyArg> for Policy {
    fn from(p: PolicyArg) -> Self {
        match p {
            PolicyArg::Drop => Policy::Drop,
            PolicyArg::Reset => Policy::Reset,
        }
    }
}

/// `--ttl`: how long the gate stays on by itself; `None` for `--ttl none`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ttl(pub Option<Duration>);

/// The deadline is boot time + TTL in u64 nanoseconds (~584 years): a longer TTL would wrap
/// around into a short one.
const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 86_400);

pub fn parse_ttl(s: &str) -> Result<Ttl, String> {
    if s == "none" {
        return Ok(Ttl(None));
    }
    let d =
        humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 90s, 15m, 2h, none)"))?;
    if d > MAX_TTL {
        return Err("a TTL over 100 years cannot be kept; use `none` for no TTL".into());
    }
    if d.is_zero() {
        return Err("a TTL of zero would open the gate at once; use `none` for no TTL".into());
    }
    if d < MIN_TTL {
        return Err(format!(
            "a TTL under {} would run out before `gate on` has finished: the gate would \
             refuse nothing; give at least 1s (or `none` for no TTL)",
            humantime::format_duration(MIN_TTL)
        ));
    }
    Ok(Ttl(Some(d)))
}

/// A shorter TTL would run out while `gate on` is still attaching (tens to hundreds of ms),
/// so the gate would report "refused" for a gate that already lets everything through.
const MIN_TTL: Duration = Duration::from_secs(1);

/// `--allow`: a CIDR prefix that means what it says. Refused (usage errors): a prefix with
/// host bits set (`198.18.3.77/8` would silently become `198.0.0.0/8`), a /0 (it lets every
/// client of the family through: the gate would refuse nothing over it), and IPv4-mapped
/// IPv6 prefixes (`::ffff:a.b.c.d/n`): an IPv4 client of a dual-stack listener still sends
/// IPv4 packets, which is what the gate sees, so such a prefix would never match.
pub fn parse_allow(s: &str) -> Result<IpNet, String> {
    let net: IpNet = s
        .parse()
        .map_err(|e| format!("{e} (examples: 10.0.0.0/8, 198.18.3.77/32, fd00::/8)"))?;
    if net.prefix_len() == 0 {
        let family = if net.addr().is_ipv4() { "IPv4" } else { "IPv6" };
        return Err(format!(
            "it lets every {family} client through, so the gate would refuse no {family} \
             connection: name narrower prefixes"
        ));
    }
    if net != net.trunc() {
        let host = match net {
            IpNet::V4(n) => format!("{}/32", n.addr()),
            IpNet::V6(n) => format!("{}/128", n.addr()),
        };
        return Err(format!(
            "host bits are set: write {} for the network, or {host} for the one host",
            net.trunc()
        ));
    }
    if let IpNet::V6(n) = net {
        if let (Some(v4), true) = (n.addr().to_ipv4_mapped(), n.prefix_len() >= 96) {
            return Err(format!(
                "an IPv4-mapped prefix never matches: IPv4 clients reach dual-stack \
                 listeners as IPv4 packets; write {v4}/{} instead",
                n.prefix_len() - 96
            ));
        }
    }
    Ok(net)
}

/// `--timeout`, `--idle`: a human duration (500ms, 30s, 5m, 1h 30m).
pub fn parse_duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// What to do with a command line clap rejected: `Ok` for output clap prints itself
/// (--help, --version, a bare `drain-user`), `Err(line)` for a usage error, made one line
/// like every other error (clap adds a blank line, tips and a "For more information" line:
/// this keeps its first paragraph, joined).
pub fn usage_line(e: &clap::Error) -> Result<(), String> {
    if !e.use_stderr()
        || e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    {
        return Ok(());
    }
    let text = e.render().to_string();
    let first: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let msg = first.join(" ");
    let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
    Err(format!("drain-user: error: {msg} (see --help)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("drain-user").chain(args.split_whitespace()))
    }

    /// The one line a rejected command line prints.
    fn rejected(args: &str) -> String {
        let e = parse(args).expect_err(args);
        usage_line(&e).expect_err("a usage error, not help output")
    }

    #[test]
    fn ttl() {
        assert_eq!(parse_ttl("none"), Ok(Ttl(None)));
        assert_eq!(parse_ttl("90s"), Ok(Ttl(Some(Duration::from_secs(90)))));
        assert_eq!(
            parse_ttl("1h 30m"),
            Ok(Ttl(Some(Duration::from_secs(5400))))
        );
        assert_eq!(parse_ttl("36500d"), Ok(Ttl(Some(MAX_TTL))));
        assert!(parse_ttl("36500d 1s")
            .unwrap_err()
            .contains("over 100 years"));
        // humantime's year is 365.25 days: 100 of them are past the limit.
        assert!(parse_ttl("100y").unwrap_err().contains("over 100 years"));
        assert!(parse_ttl("0s").unwrap_err().contains("zero"));
        for short in ["1ns", "999ms"] {
            assert!(
                parse_ttl(short).unwrap_err().contains("at least 1s"),
                "{short}"
            );
        }
        assert_eq!(parse_ttl("1s"), Ok(Ttl(Some(Duration::from_secs(1)))));
        assert!(parse_ttl("10").unwrap_err().contains("examples: 90s"));
        assert!(parse_ttl("soon").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
        let Command::Wait { timeout, idle, .. } =
            parse("wait --timeout 2s --idle 250ms").unwrap().command
        else {
            panic!("not wait");
        };
        assert_eq!(timeout, Some(Duration::from_secs(2)));
        assert_eq!(idle, Some(Duration::from_millis(250)));
    }

    #[test]
    fn gate_on_defaults() {
        let Command::Gate {
            action:
                GateAction::On {
                    ports,
                    ttl,
                    place: Placement { attach, .. },
                    policy,
                    rst_rate,
                    ..
                },
        } = parse("gate on --port 80,443 -p 8080").unwrap().command
        else {
            panic!("not gate on");
        };
        assert_eq!(ports, [80, 443, 8080]);
        assert_eq!(ttl, Ttl(Some(Duration::from_secs(600))));
        assert_eq!(attach, AttachArg::Auto);
        assert_eq!(policy, PolicyArg::Drop);
        assert_eq!(rst_rate, 1000);
    }

    #[test]
    fn usage_errors_are_one_line() {
        for (args, want) in [
            ("gate on", "--port <PORTS>"),
            ("gate on --port 0", "'0'"),
            ("gate on --port 70000", "'70000'"),
            ("gate on --port 80 --ttl 0s", "a TTL of zero"),
            ("gate on --port 80 --ttl forever", "examples: 90s"),
            ("gate on --port 80 --allow 10.0.0.0/33", "--allow"),
            ("gate on --port 80 --policy reject", "reject"),
            ("gate on --port 80 --rst-rate 0", "--rst-rate"),
            ("wait --timeout 5", "--timeout"),
            ("status --bogus", "--bogus"),
            ("frobnicate", "frobnicate"),
        ] {
            let line = rejected(args);
            assert!(!line.contains('\n'), "{args}: {line:?}");
            assert!(line.starts_with("drain-user: error: "), "{args}: {line}");
            assert!(line.ends_with(" (see --help)"), "{args}: {line}");
            assert!(line.contains(want), "{args}: {line} lacks {want}");
        }
    }

    #[test]
    fn help_and_version_are_not_usage_errors() {
        for args in ["--help", "--version", "", "gate", "gate on --help"] {
            let e = parse(args).expect_err(args);
            assert_eq!(usage_line(&e), Ok(()), "{args}");
        }
    }

    #[test]
    fn allow_prefixes() {
        for ok in [
            "10.0.0.0/8",
            "198.18.3.77/32",
            "fd00::/8",
            "::1/128",
            "128.0.0.0/1",
        ] {
            assert_eq!(parse_allow(ok).map(|n| n.to_string()), Ok(ok.to_owned()));
        }
        for (bad, want) in [
            ("0.0.0.0/0", "every IPv4 client"),
            ("::/0", "every IPv6 client"),
            (
                "198.18.3.77/8",
                "write 198.0.0.0/8 for the network, or 198.18.3.77/32",
            ),
            ("fd00::1/8", "write fd00::/8"),
            ("::ffff:0:0/96", "never matches"),
            ("::ffff:198.18.0.0/112", "write 198.18.0.0/16"),
            ("::ffff:198.18.0.1/128", "write 198.18.0.1/32"),
            ("10.0.0.0/33", "examples"),
            ("10.0.0.0", "examples"),
        ] {
            let e = parse_allow(bad).expect_err(bad);
            assert!(e.contains(want), "{bad}: {e}");
        }
        let line = rejected("gate on --port 80 --allow 198.18.3.77/8");
        assert!(
            line.contains("198.18.3.77/8") && line.contains("--allow"),
            "{line}"
        );
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}

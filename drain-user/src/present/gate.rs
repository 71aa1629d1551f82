//! `drain-user gate on` / `gate off`: the command line's arguments onto [`gate::OnArgs`],
//! the change (or with `--dry-run` the plan of it) and the lines that report it.

use std::{collections::BTreeSet, fmt::Write as _};

use anyhow::{bail, Result};

use crate::{
    agent,
    cli::{GateAction, Placement, PlanArgs},
    domain::Exit,
    errln, follow, gate, iface, outln, pins, plan, status,
};

/// `gate on` or `gate off`, as parsed.
pub fn run(action: GateAction) -> Result<Exit> {
    match action {
        GateAction::On {
            ports,
            place: Placement { ifaces, attach },
            ttl,
            allow,
            policy,
            rst_rate,
            announce,
            plan,
        } => on(
            &gate::OnArgs {
                ports: ports.into_iter().collect::<BTreeSet<_>>(),
                ifaces,
                attach: attach.into(),
                ttl: ttl.0,
                allow,
                policy: policy.into(),
                rst_rate,
                announce: agent::Announce::from(announce),
            },
            &plan,
        ),
        GateAction::Off { plan } => off(&plan),
    }
}

fn on(args: &gate::OnArgs, plan: &PlanArgs) -> Result<Exit> {
    args.validate()?;
    follow::check_policy(&args.ports, args.policy)?;
    let targets = iface::resolve(&args.ifaces)?;
    if targets.is_empty() {
        bail!("no interface is up in this network namespace: name one with --iface");
    }
    if plan.dry_run {
        return print_plan(&plan::on(args, &targets, status::collect()?)?, plan.json);
    }
    let report = gate::on(args, &targets)?;
    // A published port: its connections live where a DNAT sends them.
    for line in follow::after_gate_on(&pins::gate_dir()?, &args.ports)? {
        errln!("{line}")?;
    }
    if let Some(w) = gate::ungated_warning(&gate::ungated(&pins::gate_dir()?)?, args.policy) {
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
    Ok(Exit::Success)
}

fn off(plan: &PlanArgs) -> Result<Exit> {
    if plan.dry_run {
        return print_plan(&plan::off(status::collect()?), plan.json);
    }
    if gate::off()? {
        outln!("gate off: detached and unpinned; new connections are accepted")?;
    } else {
        outln!("gate off: no gate in this network namespace (already off)")?;
    }
    Ok(Exit::Success)
}

/// `gate on/off --dry-run`: the plan as JSON or text; exit 0 whether or not it changes
/// anything (`changed` says).
fn print_plan(p: &plan::Plan, json: bool) -> Result<Exit> {
    if json {
        outln!("{}", serde_json::to_string(p)?)?;
    } else {
        outln!("{}", human(p))?;
    }
    Ok(Exit::Success)
}

/// The text `--dry-run` prints without --json.
fn human(plan: &plan::Plan) -> String {
    let mut s = String::new();
    let cmd = format!("gate {} --dry-run", plan.action);
    if !plan.changed {
        let why = match (plan.action, plan.ttl_renewed) {
            ("off", _) => "no gate in this network namespace",
            (_, true) => "the gate is on with these settings; its TTL would be renewed",
            _ => "the gate is on with these settings",
        };
        let _ = write!(s, "{cmd}: no change: {why}");
        return s;
    }
    let _ = write!(s, "{cmd}: would change (nothing was changed):");
    for d in &plan.differences {
        let _ = write!(s, "\n  {}: {} -> {}", d.field, d.before, d.after);
    }
    s
}

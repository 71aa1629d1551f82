//! `drain-user check`: the preflight's report ([`check::Report`]), as text or JSON; exit 1
//! when it is blocked.

use anyhow::Result;

use crate::{
    check,
    cli::{AttachArg, PolicyArg},
    domain::Exit,
    errln, limits, outln, output,
};

pub fn run(
    ports: &[u16],
    ifaces: &[String],
    attach: AttachArg,
    policy: PolicyArg,
    json: bool,
) -> Result<Exit> {
    limits::check_port_count(ports.len())?;
    let want = check::Wanted {
        attach: attach.into(),
        policy: policy.into(),
    };
    let report = check::decide(&check::probe(ifaces)?, &want);
    if json {
        outln!("{}", serde_json::to_string(&report)?)?;
    } else {
        output::out(format_args!("{}", human(&report).trim_end()))?;
    }
    if let Some(problem) = &report.problem {
        errln!("drain-user: error: {problem}")?;
        return Ok(Exit::Failure);
    }
    Ok(Exit::Success)
}

/// The text `check` prints without --json.
pub fn human(r: &check::Report) -> String {
    let mut s = String::new();
    for c in &r.checks {
        let min = c
            .min_kernel
            .as_ref()
            .map(|m| format!(" (Linux {m})"))
            .unwrap_or_default();
        let detail = if c.detail.is_empty() {
            String::new()
        } else {
            format!(": {}", c.detail)
        };
        let unneeded = if c.needed {
            ""
        } else {
            " [not needed with these options]"
        };
        s.push_str(&format!(
            "{:<8} {}{min}{unneeded}{detail}\n",
            c.status, c.name
        ));
    }
    s.push_str("interfaces:\n");
    for i in &r.interfaces {
        let mut extra = Vec::new();
        if !i.probe.tcx_others.is_empty() {
            extra.push(format!("tcx ingress: {}", i.probe.tcx_others.join("; ")));
        }
        s.push_str(&format!(
            "  {:<16} {:<4} {}{}{}\n",
            i.probe.name,
            i.attach.unwrap_or("-"),
            i.reason
                .as_ref()
                .map_or(String::new(), |why| format!("{why}; ")),
            i.note,
            extra.iter().map(|e| format!("; {e}")).collect::<String>()
        ));
    }
    match &r.problem {
        None => s.push_str("result: a gate can work here with these options\n"),
        Some(p) => s.push_str(&format!("result: blocked: {p}\n")),
    }
    s
}

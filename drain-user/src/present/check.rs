//! `drain-user check`: the preflight's report, as text or JSON; exit 1 when it is blocked.

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
        output::out(format_args!("{}", check::render::human(&report).trim_end()))?;
    }
    if let Some(problem) = &report.problem {
        errln!("drain-user: error: {problem}")?;
        return Ok(Exit::Failure);
    }
    Ok(Exit::Success)
}

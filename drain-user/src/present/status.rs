//! `drain-user status`: the gate's state as text, JSON or Prometheus, or a textfile for
//! node_exporter.

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::Result;

use crate::{
    cli::StatusFormat,
    domain::{Exit, Policy},
    links::LinkState,
    metrics, outln, output,
    status::{self, CountedIn, GateState, Status},
};

pub fn run(json: bool, format: Option<StatusFormat>, textfile: Option<&Path>) -> Result<Exit> {
    let st = status::collect()?;
    if let Some(path) = textfile {
        metrics::write_textfile(path, &metrics::prometheus(&st)?)?;
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
            let text = human(&st);
            output::out(format_args!("{}", text.trim_end_matches('\n')))?;
        }
    }
    Ok(Exit::Success)
}

/// The text `status` prints without --json.
pub fn human(st: &Status) -> String {
    let mut s = String::new();
    // Writing to a String cannot fail.
    let _ = write_human(&mut s, st);
    s
}

fn write_human(s: &mut String, st: &Status) -> std::fmt::Result {
    let set = st.ttl_ms.map_or(String::new(), |ms| {
        format!(" {}", humantime::format_duration(Duration::from_millis(ms)))
    });
    let ttl = match (st.expired, st.ttl_remaining_ms) {
        (true, _) => format!(" (TTL{set} ran out: the kernel lets every connection through)"),
        (false, Some(ms)) => format!(
            " (TTL{set}: opens by itself in {})",
            humantime::format_duration(Duration::from_secs(ms / 1000))
        ),
        (false, None) => String::new(),
    };
    let gate = match st.gate {
        GateState::On => "on",
        GateState::Off => "off",
    };
    writeln!(s, "gate: {gate}{ttl}")?;
    if let (GateState::On, Some(ms)) = (st.gate, st.closes_in_ms) {
        writeln!(
            s,
            "announced: the agent answers {}; new connections are still accepted, refused in {:.1}s",
            if st.maint { "maint" } else { "drain" },
            ms as f64 / 1000.0
        )?;
    }
    if st.gate == GateState::On {
        let policy = match st.policy {
            Policy::Drop => "drop",
            Policy::Reset => "reset",
        };
        writeln!(s, "policy: {policy}")?;
        if let (Policy::Reset, Some(rate)) = (st.policy, st.rst_rate) {
            writeln!(s, "rst rate: at most {rate} RSTs/s")?;
        }
    }
    for w in &st.warnings {
        writeln!(s, "warning: {w}")?;
    }
    if st.interfaces.is_empty() && st.ports.is_empty() {
        return Ok(());
    }
    writeln!(s, "interfaces:")?;
    for i in &st.interfaces {
        let how = match (i.mode, i.tc_mode) {
            (Some(m), _) => format!("{} {}", i.attach.as_str(), m.as_str()),
            (None, Some(t)) => format!("{} {}", i.attach.as_str(), t.as_str()),
            (None, None) => i.attach.as_str().to_string(),
        };
        write!(s, "  {:<16} {how}", i.name)?;
        if i.state != LinkState::Attached {
            write!(s, " ({}: gates nothing here)", i.state.as_str())?;
        }
        if let Some(why) = i.why() {
            write!(s, " ({why})")?;
        }
        if !i.others.is_empty() {
            write!(s, "   also attached: {}", i.others.join("; "))?;
        }
        writeln!(s)?;
    }
    if !st.ungated.is_empty() {
        let names: Vec<String> = st
            .ungated
            .iter()
            .map(|u| format!("{} (ifindex {})", u.name, u.ifindex))
            .collect();
        let what = match st.policy {
            Policy::Reset => "refused there by the namespace-wide refusal only (no RST rate limit)",
            Policy::Drop => "NOT refused there: new connections through them are accepted",
        };
        writeln!(s, "not gated: {}: {what}", names.join(", "))?;
    }
    writeln!(s, "ports:")?;
    writeln!(
        s,
        "  {:>5}  {:>8}  {:>12}  {:>12}  {:>12}  {:>12}  {:>12}  {:>12}",
        "PORT", "LIVE", "REFUSED", "RST-SENT", "RST-LIMITED", "PASSED", "ALLOWED", "AFTER-TTL"
    )?;
    for p in &st.ports {
        let c = &p.counters;
        // A count that may be low is shown as what it is: at least this many.
        let live = if p.live_connections_exact {
            p.live_connections.to_string()
        } else {
            format!(">= {}", p.live_connections)
        };
        writeln!(
            s,
            "  {:>5}  {:>8}  {:>12}  {:>12}  {:>12}  {:>12}  {:>12}  {:>12}",
            p.port,
            live,
            c.syns_refused,
            c.rst_sent,
            c.rst_limited,
            c.syns_passed,
            c.syns_allowed,
            c.syns_expired
        )?;
    }
    for p in &st.ports {
        let elsewhere: Vec<String> = p
            .counted_in
            .iter()
            .filter_map(|c| match c {
                CountedIn::Netns { netns_inode, port } => {
                    Some(format!("network namespace {netns_inode} port {port}"))
                }
                CountedIn::Local { .. } => None,
            })
            .collect();
        if !elsewhere.is_empty() || p.forwarded_connections > 0 {
            writeln!(
                s,
                "  {}: counted here{}; conntrack: {} forwarded (DNAT)",
                p.port,
                elsewhere
                    .iter()
                    .map(|e| format!(" and in {e}"))
                    .collect::<String>(),
                p.forwarded_connections
            )?;
        }
    }
    if let Some(t) = &st.tracker {
        writeln!(
            s,
            "tracker: {} added, {} removed, {} insert failed, {} read failed",
            t.added, t.removed, t.insert_failed, t.read_failed
        )?;
    }
    if !st.allow.is_empty() {
        writeln!(s, "allow: {}", st.allow.join(", "))?;
    }
    Ok(())
}

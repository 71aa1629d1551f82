//! The text `check` prints without `--json`, rendered from its [`Report`].

use super::Report;

/// The text `check` prints without --json.
pub fn human(r: &Report) -> String {
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
            "  {:<16} {:<4} {}{}\n",
            i.probe.name,
            i.attach.unwrap_or("-"),
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

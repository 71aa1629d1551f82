//! `status --format prometheus` and `status --textfile PATH`: the gate's state in the
//! Prometheus text exposition format (version 0.0.4), for node_exporter's textfile
//! collector or any scraper.
//!
//! The metrics are rendered from the same serialized [`Status`] that `status --json`
//! prints, so the two cannot disagree. Naming follows Prometheus conventions: a `drain_`
//! prefix, `_total` on counters, seconds as the unit of time, the port as a label. The
//! counters' names and help come from their one table in drain-common (`counters!`).

use std::{fmt::Write as _, fs, io::Write as _, path::Path};

use anyhow::{Context, Result};
use drain_common::{PortStats, TrackStats};
use serde_json::Value;

use crate::status::Status;

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value, escaped as the text format wants (backslash, quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn num(v: &Value) -> String {
    v.as_i64()
        .map(|n| n.to_string())
        .or_else(|| v.as_u64().map(|n| n.to_string()))
        .unwrap_or_else(|| "NaN".into())
}

/// The exposition text of `st`.
pub fn prometheus(st: &Status) -> Result<String> {
    let v = serde_json::to_value(st)?;
    let mut out = String::new();
    family(
        &mut out,
        "drain_gate_on",
        "gauge",
        "1 while new connections to the gated ports are refused.",
    );
    let _ = writeln!(out, "drain_gate_on {}", u8::from(v["gate"] == "on"));
    family(
        &mut out,
        "drain_gate_expired",
        "gauge",
        "1 when a gate is installed but its TTL has run out.",
    );
    let _ = writeln!(out, "drain_gate_expired {}", u8::from(v["expired"] == true));
    if let Some(ms) = v["ttl_remaining_ms"].as_u64() {
        family(
            &mut out,
            "drain_gate_ttl_remaining_seconds",
            "gauge",
            "Time until the TTL opens the gate by itself.",
        );
        let _ = writeln!(
            out,
            "drain_gate_ttl_remaining_seconds {}",
            ms as f64 / 1000.0
        );
    }
    family(
        &mut out,
        "drain_gate_info",
        "gauge",
        "The gate's refusal policy, as a label.",
    );
    let _ = writeln!(
        out,
        "drain_gate_info{{policy=\"{}\"}} 1",
        label(v["policy"].as_str().unwrap_or("drop"))
    );
    let ifaces = v["interfaces"].as_array().cloned().unwrap_or_default();
    if !ifaces.is_empty() {
        family(
            &mut out,
            "drain_interface_attached",
            "gauge",
            "Interfaces the gate is attached to, with the hook, the XDP mode (xdp) and the TC \
             mode (tc: tcx, or clsact on kernels without TCX).",
        );
        for i in &ifaces {
            let _ = writeln!(
                out,
                "drain_interface_attached{{interface=\"{}\",attach=\"{}\",mode=\"{}\",\
                 tc_mode=\"{}\"}} 1",
                label(i["name"].as_str().unwrap_or("")),
                label(i["attach"].as_str().unwrap_or("")),
                label(i["mode"].as_str().unwrap_or("")),
                label(i["tc_mode"].as_str().unwrap_or(""))
            );
        }
    }
    let ports = v["ports"].as_array().cloned().unwrap_or_default();
    if !ports.is_empty() {
        family(
            &mut out,
            "drain_port_live_connections",
            "gauge",
            "Connections accepted on the port that are ESTABLISHED or CLOSE_WAIT.",
        );
        for p in &ports {
            let _ = writeln!(
                out,
                "drain_port_live_connections{{port=\"{}\"}} {}",
                p["port"],
                num(&p["live_connections"])
            );
        }
        for c in PortStats::COUNTERS {
            family(&mut out, c.metric, "counter", c.help);
            for p in &ports {
                let _ = writeln!(
                    out,
                    "{}{{port=\"{}\"}} {}",
                    c.metric,
                    p["port"],
                    num(&p[c.key])
                );
            }
        }
    }
    if v["tracker"].is_object() {
        for c in TrackStats::COUNTERS {
            family(&mut out, c.metric, "counter", c.help);
            let _ = writeln!(out, "{} {}", c.metric, num(&v["tracker"][c.key]));
        }
    }
    Ok(out)
}

/// Writes `text` to `path` the way node_exporter's textfile collector needs it: a temporary
/// file in the same directory (so the rename cannot cross filesystems; the collector skips
/// names that do not end in `.prom`), flushed to disk, then renamed over `path`, so a
/// scrape sees the old file or the new one, never half of one.
pub fn write_textfile(path: &Path, text: &str) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("--textfile {}: not a file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        // The rename itself is durable once the directory is synced.
        fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        anyhow::Error::new(e).context(format!(
            "writing {} (through {})",
            path.display(),
            tmp.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn textfile_is_replaced_whole_and_leaves_no_temp_file() {
        let dir = std::env::temp_dir().join(format!("drain-metrics-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("drain.prom");
        write_textfile(&path, "a 1\n").unwrap();
        write_textfile(&path, "b 2\n").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "b 2\n");
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, ["drain.prom"]);
        let err = write_textfile(&dir.join("nosuch/drain.prom"), "x").unwrap_err();
        assert!(format!("{err:#}").contains("nosuch"), "{err:#}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}

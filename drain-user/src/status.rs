//! `status`: what the gate of this network namespace is doing, for people and for scripts.

use std::path::Path;

use anyhow::Result;
use aya::programs::{
    links::{FdLink, PinnedLink},
    SchedClassifier, TcAttachType,
};
use drain_common::GATE_ON;
use ipnet::IpNet;
use serde::Serialize;

use crate::{
    gate::program_name,
    netlink,
    pins::{self, Attach},
    state::{self, PortCounters},
    track,
};

#[derive(Serialize)]
pub struct Status {
    /// "on" while SYNs to gated ports are refused; "off" otherwise (no gate, switched off,
    /// or the TTL has run out).
    pub gate: &'static str,
    /// "drop" or "reset": how refused connection requests are answered.
    pub policy: &'static str,
    /// True when a gate is installed but its TTL has run out.
    pub expired: bool,
    /// Milliseconds until the TTL opens the gate; null when there is no deadline.
    pub ttl_remaining_ms: Option<u64>,
    pub interfaces: Vec<IfaceStatus>,
    pub ports: Vec<PortCounters>,
    pub allow: Vec<String>,
    /// The connection tracker's own counters; null when there is no gate.
    pub tracker: Option<TrackerStatus>,
}

#[derive(Serialize)]
pub struct TrackerStatus {
    /// Passive opens added to the live set, and connections removed from it, since
    /// `gate on` (seeded connections are not in `added`).
    pub added: u64,
    pub removed: u64,
    /// Lost events: while non-zero, live counts may be low and `wait` will not report
    /// the ports drained.
    pub insert_failed: u64,
    pub read_failed: u64,
}

#[derive(Serialize)]
pub struct IfaceStatus {
    pub name: String,
    pub ifindex: u32,
    /// "xdp" or "tc".
    pub attach: &'static str,
    /// For xdp: "native" or "generic".
    pub mode: Option<&'static str>,
    /// Programs other tools attached to the same interface's hooks (left untouched).
    pub others: Vec<String>,
}

pub fn collect() -> Result<Status> {
    let mut st = Status {
        gate: "off",
        policy: "drop",
        expired: false,
        ttl_remaining_ms: None,
        interfaces: vec![],
        ports: vec![],
        allow: vec![],
        tracker: None,
    };
    if !pins::bpffs_mounted()? {
        return Ok(st);
    }
    let dir = pins::state_dir()?;
    if !dir.exists() {
        return Ok(st);
    }
    let cfg = state::read_config(&dir)?;
    let now = state::boottime_ns();
    st.expired = cfg.deadline_ns != 0 && now >= cfg.deadline_ns;
    if cfg.deadline_ns != 0 {
        st.ttl_remaining_ms = Some(cfg.deadline_ns.saturating_sub(now) / 1_000_000);
    }
    if cfg.policy == drain_common::POLICY_RESET {
        st.policy = "reset";
    }
    if cfg.enabled == GATE_ON && !st.expired {
        st.gate = "on";
    }
    st.interfaces = interfaces(&dir)?;
    let live = track::Live::open(&dir)?;
    st.ports = state::ports(&dir)?
        .into_iter()
        .map(|(_, c)| PortCounters {
            live_connections: live.get(c.port),
            ..c
        })
        .collect();
    st.allow = state::allow(&dir)?.iter().map(IpNet::to_string).collect();
    let t = track::stats(&dir)?;
    st.tracker = Some(TrackerStatus {
        added: t.added,
        removed: t.removed,
        insert_failed: t.insert_failed,
        read_failed: t.read_failed,
    });
    Ok(st)
}

fn interfaces(dir: &Path) -> Result<Vec<IfaceStatus>> {
    let all = netlink::interfaces()?;
    let mut out = Vec::new();
    for (mode, ifindex, pin) in pins::links(dir)? {
        let ours = PinnedLink::from_pin(&pin)
            .ok()
            .and_then(|l| FdLink::from(l).info().ok())
            .map(|i| i.program_id());
        let iface = all.iter().find(|i| i.index == ifindex);
        let name = iface.map_or_else(|| format!("(gone, ifindex {ifindex})"), |i| i.name.clone());
        let mut others = Vec::new();
        let mut xdp_mode = None;
        if let Some((id, m)) = iface.and_then(|i| i.xdp) {
            if Some(id) == ours {
                xdp_mode = Some(m.as_str());
            } else {
                others.push(format!("xdp: {}", program_name(id)));
            }
        }
        if let Some(i) = iface {
            if let Ok((_, progs)) = SchedClassifier::query_tcx(&i.name, TcAttachType::Ingress) {
                for p in progs {
                    if Some(p.id()) != ours {
                        others.push(format!("tcx ingress: {}", program_name(p.id())));
                    }
                }
            }
        }
        out.push(IfaceStatus {
            name,
            ifindex,
            attach: mode.as_str(),
            mode: if mode == Attach::Xdp { xdp_mode } else { None },
            others,
        });
    }
    Ok(out)
}

pub fn print_human(st: &Status) {
    let ttl = match (st.expired, st.ttl_remaining_ms) {
        (true, _) => " (TTL ran out: the kernel lets every connection through)".to_string(),
        (false, Some(ms)) => format!(
            " (TTL: opens by itself in {})",
            humantime::format_duration(std::time::Duration::from_secs(ms / 1000))
        ),
        (false, None) => String::new(),
    };
    println!("gate: {}{ttl}", st.gate);
    if st.gate == "on" {
        println!("policy: {}", st.policy);
    }
    if st.interfaces.is_empty() && st.ports.is_empty() {
        return;
    }
    println!("interfaces:");
    for i in &st.interfaces {
        let how = match i.mode {
            Some(m) => format!("{} {m}", i.attach),
            None => i.attach.to_string(),
        };
        print!("  {:<16} {how}", i.name);
        if !i.others.is_empty() {
            print!("   also attached: {}", i.others.join("; "));
        }
        println!();
    }
    println!("ports:");
    println!(
        "  {:>5}  {:>8}  {:>12}  {:>12}  {:>12}  {:>12}  {:>12}",
        "PORT", "LIVE", "REFUSED", "RST-SENT", "PASSED", "ALLOWED", "AFTER-TTL"
    );
    for p in &st.ports {
        println!(
            "  {:>5}  {:>8}  {:>12}  {:>12}  {:>12}  {:>12}  {:>12}",
            p.port,
            p.live_connections,
            p.syns_refused,
            p.rst_sent,
            p.syns_passed,
            p.syns_allowed,
            p.syns_expired
        );
    }
    if !st.allow.is_empty() {
        println!("allow: {}", st.allow.join(", "));
    }
}

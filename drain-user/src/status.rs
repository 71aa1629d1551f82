//! `status`: what the gate of this network namespace is doing, for people and for scripts.

use std::{fmt::Write as _, time::Duration};

use anyhow::Result;
use aya::programs::{
    links::{FdLink, PinnedLink},
    SchedClassifier, TcAttachType,
};
use drain_common::{PortStats, TrackStats, GATE_ON};
use ipnet::IpNet;
use serde::Serialize;

use crate::{
    cli::Policy,
    gate,
    iface::{self, XdpMode},
    pins::{self, Hook, LinkPin},
    state::{boottime_ns, OpenGate},
};

/// Whether SYNs to gated ports are refused right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GateState {
    On,
    /// No gate, switched off, or the TTL has run out.
    Off,
}

/// The shape of `status --json`: field names and order are an interface. Read it through
/// serde or [`human`].
#[derive(Serialize)]
pub struct Status {
    gate: GateState,
    /// How refused connection requests are answered.
    policy: Policy,
    /// True when the namespace-wide refusal (the sk_lookup link) is attached: policy reset
    /// refuses through it, on every interface. False under policy reset means refused SYNs
    /// within the RST budget reach the server: run `gate on` again.
    sk_lookup: bool,
    /// True when a gate is installed but its TTL has run out.
    expired: bool,
    /// Milliseconds until the TTL opens the gate; null when there is no deadline.
    ttl_remaining_ms: Option<u64>,
    interfaces: Vec<IfaceStatus>,
    /// Interfaces that are up with no gate link (created after `gate on`, or left out by
    /// `--iface`): policy reset still refuses through them (not rate-limited), policy drop
    /// does not refuse there at all.
    ungated: Vec<Ungated>,
    ports: Vec<PortStatus>,
    allow: Vec<String>,
    /// The connection tracker's own counters since `gate on`; null when there is no gate.
    /// Lost events (`insert_failed`, `read_failed`) mean live counts may be low, and `wait`
    /// will not report the ports drained.
    tracker: Option<TrackStats>,
}

/// One gated port.
#[derive(Serialize)]
pub struct PortStatus {
    pub port: u16,
    /// Connections accepted on this port that are ESTABLISHED or CLOSE_WAIT right now.
    pub live_connections: i64,
    /// Summed over CPUs.
    #[serde(flatten)]
    pub counters: PortStats,
}

/// An interface that is up and not gated.
#[derive(Serialize)]
pub struct Ungated {
    pub name: String,
    pub ifindex: u32,
}

/// One interface the gate is attached to.
#[derive(Serialize)]
pub struct IfaceStatus {
    /// "(gone, ifindex N)" once the interface has been deleted.
    pub name: String,
    pub ifindex: u32,
    pub attach: Hook,
    /// For xdp: "native" or "generic" (as the kernel reports it).
    pub mode: Option<XdpMode>,
    /// Programs other tools attached to the same interface's hooks (left untouched), as
    /// "xdp: NAME, id N" or "tcx ingress: NAME, id N".
    pub others: Vec<String>,
}

pub fn collect() -> Result<Status> {
    let mut st = Status {
        gate: GateState::Off,
        policy: Policy::Drop,
        sk_lookup: false,
        expired: false,
        ttl_remaining_ms: None,
        interfaces: vec![],
        ungated: vec![],
        ports: vec![],
        allow: vec![],
        tracker: None,
    };
    if !pins::bpffs_mounted()? {
        return Ok(st);
    }
    let dir = pins::gate_dir()?;
    if !dir.exists() {
        return Ok(st);
    }
    let gate = OpenGate::open(&dir)?;
    let cfg = gate.config()?;
    let now = boottime_ns();
    st.expired = cfg.deadline_ns != 0 && now >= cfg.deadline_ns;
    if cfg.deadline_ns != 0 {
        st.ttl_remaining_ms = Some(cfg.deadline_ns.saturating_sub(now) / 1_000_000);
    }
    st.policy = Policy::from_raw(cfg.policy);
    if cfg.enabled == GATE_ON && !st.expired {
        st.gate = GateState::On;
    }
    st.sk_lookup = PinnedLink::from_pin(LinkPin::Lookup.path(&dir)).is_ok();
    st.interfaces = interfaces(&gate)?;
    st.ungated = gate::ungated(&dir)?
        .into_iter()
        .map(|i| Ungated {
            name: i.name,
            ifindex: i.index,
        })
        .collect();
    st.ports = gate
        .ports()?
        .into_iter()
        .map(|p| PortStatus {
            port: p.port,
            live_connections: gate.tracker().live(p.port),
            counters: p.stats,
        })
        .collect();
    st.allow = gate.allow()?.iter().map(IpNet::to_string).collect();
    st.tracker = Some(gate.tracker().stats()?);
    Ok(st)
}

fn interfaces(gate: &OpenGate) -> Result<Vec<IfaceStatus>> {
    let all = iface::interfaces()?;
    let mut out = Vec::new();
    for link in pins::iface_links(gate.dir())? {
        let ours = PinnedLink::from_pin(&link.pin)
            .ok()
            .and_then(|l| FdLink::from(l).info().ok())
            .map(|i| i.program_id());
        let iface = all.iter().find(|i| i.index == link.ifindex);
        let name = iface.map_or_else(
            || format!("(gone, ifindex {})", link.ifindex),
            |i| i.name.clone(),
        );
        let mut others = Vec::new();
        let mut xdp_mode = None;
        if let Some((id, m)) = iface.and_then(|i| i.xdp) {
            if Some(id) == ours {
                xdp_mode = Some(m);
            } else {
                others.push(format!("xdp: {}", iface::program_name(id)));
            }
        }
        if let Some(i) = iface {
            if let Ok((_, progs)) = SchedClassifier::query_tcx(&i.name, TcAttachType::Ingress) {
                for p in progs {
                    if Some(p.id()) != ours {
                        others.push(format!("tcx ingress: {}", iface::program_name(p.id())));
                    }
                }
            }
        }
        out.push(IfaceStatus {
            name,
            ifindex: link.ifindex,
            attach: link.hook,
            mode: if link.hook == Hook::Xdp {
                xdp_mode
            } else {
                None
            },
            others,
        });
    }
    Ok(out)
}

/// The text `status` prints without --json.
pub fn human(st: &Status) -> String {
    let mut s = String::new();
    // Writing to a String cannot fail.
    let _ = write_human(&mut s, st);
    s
}

fn write_human(s: &mut String, st: &Status) -> std::fmt::Result {
    let ttl = match (st.expired, st.ttl_remaining_ms) {
        (true, _) => " (TTL ran out: the kernel lets every connection through)".to_string(),
        (false, Some(ms)) => format!(
            " (TTL: opens by itself in {})",
            humantime::format_duration(Duration::from_secs(ms / 1000))
        ),
        (false, None) => String::new(),
    };
    let gate = match st.gate {
        GateState::On => "on",
        GateState::Off => "off",
    };
    writeln!(s, "gate: {gate}{ttl}")?;
    if st.gate == GateState::On {
        let policy = match st.policy {
            Policy::Drop => "drop",
            Policy::Reset => "reset",
        };
        writeln!(s, "policy: {policy}")?;
        if st.policy == Policy::Reset && !st.sk_lookup {
            writeln!(
                s,
                "warning: the namespace-wide refusal (sk_lookup link) is missing: refused SYNs \
                 within the RST budget reach the server; run `drain-user gate on` again"
            )?;
        }
    }
    if st.interfaces.is_empty() && st.ports.is_empty() {
        return Ok(());
    }
    writeln!(s, "interfaces:")?;
    for i in &st.interfaces {
        let how = match i.mode {
            Some(m) => format!("{} {}", i.attach.as_str(), m.as_str()),
            None => i.attach.as_str().to_string(),
        };
        write!(s, "  {:<16} {how}", i.name)?;
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
        writeln!(
            s,
            "  {:>5}  {:>8}  {:>12}  {:>12}  {:>12}  {:>12}  {:>12}  {:>12}",
            p.port,
            p.live_connections,
            c.syns_refused,
            c.rst_sent,
            c.rst_limited,
            c.syns_passed,
            c.syns_allowed,
            c.syns_expired
        )?;
    }
    if !st.allow.is_empty() {
        writeln!(s, "allow: {}", st.allow.join(", "))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `status --json` is an interface: these names, in this order.
    #[test]
    fn json_shape() {
        let st = Status {
            gate: GateState::On,
            policy: Policy::Reset,
            sk_lookup: true,
            expired: false,
            ttl_remaining_ms: Some(598123),
            interfaces: vec![IfaceStatus {
                name: "eth0".into(),
                ifindex: 2,
                attach: Hook::Xdp,
                mode: Some(XdpMode::Driver),
                others: vec![],
            }],
            ungated: vec![Ungated {
                name: "veth9".into(),
                ifindex: 9,
            }],
            ports: vec![PortStatus {
                port: 80,
                live_connections: 12,
                counters: PortStats {
                    port: 80,
                    syns_refused: 40,
                    syns_passed: 1,
                    syns_allowed: 2,
                    syns_expired: 3,
                    rst_sent: 4,
                    rst_limited: 5,
                    rst_not_syn: 6,
                    ..Default::default()
                },
            }],
            allow: vec!["10.0.0.0/8".into()],
            tracker: Some(TrackStats {
                added: 118,
                removed: 106,
                insert_failed: 0,
                read_failed: 7,
            }),
        };
        assert_eq!(
            serde_json::to_string(&st).unwrap(),
            concat!(
                r#"{"gate":"on","policy":"reset","sk_lookup":true,"expired":false,"#,
                r#""ttl_remaining_ms":598123,"#,
                r#""interfaces":[{"name":"eth0","ifindex":2,"attach":"xdp","mode":"native","others":[]}],"#,
                r#""ungated":[{"name":"veth9","ifindex":9}],"#,
                r#""ports":[{"port":80,"live_connections":12,"syns_refused":40,"syns_passed":1,"#,
                r#""syns_allowed":2,"syns_expired":3,"rst_sent":4,"rst_limited":5,"rst_not_syn":6}],"#,
                r#""allow":["10.0.0.0/8"],"#,
                r#""tracker":{"added":118,"removed":106,"insert_failed":0,"read_failed":7}}"#
            )
        );
    }
}

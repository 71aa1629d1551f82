//! `gate on --dry-run` and `gate off --dry-run`: what the command would change. The actual
//! gate is the one `status` reads ([`status::collect`]); the wanted one is what `gate on`
//! would make of its arguments, by the same functions ([`gate::config_for`],
//! [`gate::decision_for`]). Nothing is written: no bpffs mount, no lock, no pins, links or maps.

use std::collections::BTreeSet;

use anyhow::Result;
use drain_common::GateConfig;
use ipnet::IpNet;
use serde::Serialize;
use serde_json::{json, Value};

use crate::{
    agent::Phase,
    gate::{self, OnArgs},
    iface::Iface,
    links::LinkState,
    status::{GateState, Status},
};

/// The shape of `gate on/off --dry-run --json`: field names and order are an interface.
#[derive(Serialize)]
pub struct Plan {
    /// "on" or "off": the command planned.
    pub(crate) action: &'static str,
    /// True when the command would change the gate (some difference).
    pub(crate) changed: bool,
    /// Each setting that differs, in a fixed order: gate, ports, policy, allow, interfaces,
    /// ttl_ms, rst_rate, announce_ms, quiet_ms, maint.
    pub(crate) differences: Vec<Difference>,
    /// `gate on` over a gate that is on with the same settings and a TTL: its deadline
    /// would move to a full TTL from now (not a change).
    pub(crate) ttl_renewed: bool,
    /// The gate as it is: `status --json`'s object.
    pub(crate) status: Status,
}

/// One setting: its value now and after the command (null: not set, or no gate).
#[derive(Debug, PartialEq, Serialize)]
pub struct Difference {
    pub field: &'static str,
    pub before: Value,
    pub after: Value,
}

/// "none" (no gate state at all), "off" (switched off, or nothing attached), "expired"
/// (its TTL ran out), "on".
fn gate_value(st: &Status) -> &'static str {
    if !st.exists() {
        "none"
    } else if st.expired() {
        "expired"
    } else if st.gate() == GateState::On {
        "on"
    } else {
        "off"
    }
}

/// The gate's interfaces that the kernel says are attached here, by name: (name, ifindex,
/// hook, reason).
fn attached(st: &Status) -> Vec<(String, u32, Value, Value)> {
    let mut out: Vec<_> = st
        .interfaces()
        .iter()
        .filter(|i| i.state == LinkState::Attached)
        .map(|i| (i.name.clone(), i.ifindex, json!(i.attach), json!(i.why())))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn ifaces_value(list: &[(String, u32, Value, Value)]) -> Value {
    list.iter()
        .map(|(name, _, hook, why)| json!({"name": name, "attach": hook, "reason": why}))
        .collect()
}

fn allow_value(nets: &BTreeSet<IpNet>) -> Value {
    nets.iter().map(IpNet::to_string).collect()
}

fn ms(ns: u64) -> Value {
    json!(ns / 1_000_000)
}

/// Milliseconds until an announced gate refuses; null when it is not announcing.
fn announce_value(cfg: &GateConfig, now: u64) -> Value {
    match Phase::of(cfg, now) {
        Phase::Announced { closes_in_ns } => ms(closes_in_ns),
        _ => Value::Null,
    }
}

fn quiet_value(cfg: &GateConfig, now: u64) -> Value {
    match Phase::of(cfg, now) {
        Phase::Announced { .. } => ms(cfg.quiet_ns),
        _ => Value::Null,
    }
}

fn push(out: &mut Vec<Difference>, field: &'static str, before: Value, after: Value) {
    if before != after {
        out.push(Difference {
            field,
            before,
            after,
        });
    }
}

/// `gate on args --dry-run` over the gate `st`, for the interfaces `targets` (resolved as
/// `gate on` resolves them). Fails where `gate on` would, before attaching anything (another
/// XDP program on an interface under `--attach xdp`).
pub fn on(args: &OnArgs, targets: &[Iface], st: Status) -> Result<Plan> {
    let (old, now) = st
        .config()
        .unwrap_or_else(|| (GateConfig::default(), crate::state::boottime_ns()));
    let exists = st.exists();
    let new = gate::config_for(args, &old, now);
    let mut d = Vec::new();
    push(&mut d, "gate", json!(gate_value(&st)), json!("on"));
    let before_ports: Vec<u16> = st.ports().collect();
    push(&mut d, "ports", json!(before_ports), json!(args.ports));
    let before_policy = if exists {
        json!(st.policy())
    } else {
        Value::Null
    };
    push(&mut d, "policy", before_policy, json!(args.policy));
    let have_allow: BTreeSet<IpNet> = st.allow().iter().filter_map(|a| a.parse().ok()).collect();
    let want_allow: BTreeSet<IpNet> = args.allow.iter().map(IpNet::trunc).collect();
    push(
        &mut d,
        "allow",
        allow_value(&have_allow),
        allow_value(&want_allow),
    );
    let before = attached(&st);
    let mut after = before.clone();
    let mut native = gate::NativeXdp::default();
    for iface in targets {
        if !before.iter().any(|(_, index, _, _)| *index == iface.index) {
            let d = gate::decision_for(args.attach, iface, &mut native)?;
            after.push((
                iface.name.clone(),
                iface.index,
                json!(d.hook),
                json!(gate::reason(&d)),
            ));
        }
    }
    after.sort_by(|a, b| a.0.cmp(&b.0));
    push(
        &mut d,
        "interfaces",
        ifaces_value(&before),
        ifaces_value(&after),
    );
    let ttl = |c: &GateConfig| {
        if c.ttl_ns == 0 {
            Value::Null
        } else {
            ms(c.ttl_ns)
        }
    };
    push(
        &mut d,
        "ttl_ms",
        if exists { ttl(&old) } else { Value::Null },
        ttl(&new),
    );
    push(
        &mut d,
        "rst_rate",
        json!(st.rst_rate()),
        json!(args.rst_rate),
    );
    push(
        &mut d,
        "announce_ms",
        announce_value(&old, now),
        announce_value(&new, now),
    );
    push(
        &mut d,
        "quiet_ms",
        quiet_value(&old, now),
        quiet_value(&new, now),
    );
    push(
        &mut d,
        "maint",
        json!(st.maint()),
        json!(args.announce.maint),
    );
    let changed = !d.is_empty();
    Ok(Plan {
        action: "on",
        changed,
        differences: d,
        ttl_renewed: !changed && args.ttl.is_some(),
        status: st,
    })
}

/// `gate off --dry-run` over the gate `st`: everything it has goes.
pub fn off(st: Status) -> Plan {
    let mut d = Vec::new();
    if st.exists() {
        push(&mut d, "gate", json!(gate_value(&st)), json!("none"));
        let ports: Vec<u16> = st.ports().collect();
        push(&mut d, "ports", json!(ports), json!([]));
        push(&mut d, "allow", json!(st.allow()), json!([]));
        let ifaces: Vec<Value> = st
            .interfaces()
            .iter()
            .map(|i| json!({"name": i.name, "attach": i.attach, "reason": i.why()}))
            .collect();
        push(&mut d, "interfaces", json!(ifaces), json!([]));
    }
    Plan {
        action: "off",
        // A gate whose state exists goes, even one with nothing left to differ.
        changed: st.exists(),
        differences: d,
        ttl_renewed: false,
        status: st,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_differences_are_listed() {
        let mut d = Vec::new();
        push(&mut d, "ports", json!([80]), json!([80]));
        push(&mut d, "policy", json!("drop"), json!("reset"));
        push(&mut d, "ttl_ms", Value::Null, json!(60_000));
        assert_eq!(
            serde_json::to_string(&d).unwrap(),
            concat!(
                r#"[{"field":"policy","before":"drop","after":"reset"},"#,
                r#"{"field":"ttl_ms","before":null,"after":60000}]"#
            )
        );
    }

    #[test]
    fn announce_follows_the_phase() {
        let now = 1_000_000_000_000;
        let on = GateConfig {
            enabled: drain_common::GATE_ON,
            announce_ns: now + 2_500_000_000,
            quiet_ns: 3_000_000_000,
            ..Default::default()
        };
        assert_eq!(announce_value(&on, now), json!(2500));
        assert_eq!(quiet_value(&on, now), json!(3000));
        let refusing = GateConfig {
            announce_ns: now - 1,
            ..on
        };
        assert_eq!(announce_value(&refusing, now), Value::Null);
        assert_eq!(quiet_value(&refusing, now), Value::Null);
        assert_eq!(announce_value(&GateConfig::default(), now), Value::Null);
    }
}

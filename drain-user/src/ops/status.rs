//! `status`: what the gate of this network namespace is doing, collected into [`Status`]
//! (`status --json` serializes it; `present/status.rs` prints its text).

use std::path::Path;

use anyhow::Result;
use aya::programs::{SchedClassifier, TcAttachType};
use drain_common::{prog, PortStats, TrackStats, GATE_ON};
use ipnet::IpNet;
use serde::Serialize;

use crate::{
    choices, clsact,
    domain::{AttachChoice, Policy},
    gate,
    iface::{self, Iface, XdpMode},
    links::{self, LinkState, TcMode},
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
/// serde or `present/status.rs`'s text.
#[derive(Serialize)]
pub struct Status {
    /// On when the switch is on, the TTL has not run out, and the kernel says at least one
    /// of the gate's links is attached in this namespace.
    pub(crate) gate: GateState,
    /// How refused connection requests are answered.
    pub(crate) policy: Policy,
    /// True when the namespace-wide refusal (drain's sk_lookup link on this namespace) is
    /// attached, as the kernel says: policy reset refuses through it, on every interface.
    /// False under policy reset means refused SYNs within the RST budget reach the server
    /// (a warning says so; `gate on` re-attaches it).
    pub(crate) sk_lookup: bool,
    /// True when a gate is installed but its TTL has run out.
    pub(crate) expired: bool,
    /// Milliseconds until the TTL opens the gate; null when there is no deadline.
    pub(crate) ttl_remaining_ms: Option<u64>,
    pub(crate) interfaces: Vec<IfaceStatus>,
    /// Interfaces that are up with no gate link (created after `gate on`, or left out by
    /// `--iface`): policy reset still refuses through them (not rate-limited), policy drop
    /// does not refuse there at all.
    pub(crate) ungated: Vec<Ungated>,
    pub(crate) ports: Vec<PortStatus>,
    pub(crate) allow: Vec<String>,
    /// The connection tracker's own counters since `gate on`; null when there is no gate.
    /// Lost events (`insert_failed`, `read_failed`) mean live counts may be low, and `wait`
    /// will not report the ports drained.
    pub(crate) tracker: Option<TrackStats>,
    /// Where the pins and the kernel disagree, or the counts are not exact: one sentence
    /// each, saying what to do.
    pub(crate) warnings: Vec<String>,
    /// `gate on --announce`: true while the gate is on but still lets SYNs pass (the agent
    /// already answers drain); false once it refuses.
    pub(crate) announced: bool,
    /// While announced: milliseconds until the gate refuses by itself.
    pub(crate) closes_in_ms: Option<u64>,
    /// `gate on --maint`: the agent answers maint.
    pub(crate) maint: bool,
    /// The TTL the gate was set with (`gate on --ttl`), in milliseconds; null with no TTL
    /// or no gate. `ttl_remaining_ms` is what is left of it.
    pub(crate) ttl_ms: Option<u64>,
    /// The RSTs per second `gate on --rst-rate` allowed (policy reset); null with no gate.
    pub(crate) rst_rate: Option<u32>,
    /// `gate on --quiet` of an announced gate, in milliseconds; null otherwise.
    pub(crate) quiet_ms: Option<u64>,
    /// The config as read, and when (CLOCK_BOOTTIME ns): `gate on --dry-run` compares the
    /// config `gate on` would write with it.
    #[serde(skip)]
    pub(crate) config: Option<(drain_common::GateConfig, u64)>,
}

impl Status {
    pub fn gate(&self) -> GateState {
        self.gate
    }
    pub fn expired(&self) -> bool {
        self.expired
    }
    pub fn exists(&self) -> bool {
        self.tracker.is_some()
    }
    pub fn policy(&self) -> Policy {
        self.policy
    }
    pub fn interfaces(&self) -> &[IfaceStatus] {
        &self.interfaces
    }
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.ports.iter().map(|p| p.port)
    }
    pub fn allow(&self) -> &[String] {
        &self.allow
    }
    pub fn closes_in_ms(&self) -> Option<u64> {
        self.closes_in_ms
    }
    pub fn maint(&self) -> bool {
        self.maint
    }
    pub fn ttl_ms(&self) -> Option<u64> {
        self.ttl_ms
    }
    pub fn rst_rate(&self) -> Option<u32> {
        self.rst_rate
    }
    pub fn quiet_ms(&self) -> Option<u64> {
        self.quiet_ms
    }
    /// The gate's config and when it was read; None with no gate.
    pub fn config(&self) -> Option<(drain_common::GateConfig, u64)> {
        self.config
    }
}

/// One gated port.
#[derive(Serialize)]
pub struct PortStatus {
    pub port: u16,
    /// Connections accepted on this port that are ESTABLISHED or CLOSE_WAIT right now.
    pub live_connections: i64,
    /// False when the tracker lost events (its set was full, a kernel read failed) or is
    /// not attached: `live_connections` is then a lower bound.
    pub live_connections_exact: bool,
    /// Where `live_connections` are counted: this namespace, and the namespaces a DNAT
    /// here forwards the port's connections to (a published port's container).
    pub counted_in: Vec<CountedIn>,
    /// Connections to this port that conntrack says were destination-NATed elsewhere and
    /// may still be live (its word, not the tracker's; they are in `live_connections` once
    /// their namespace is followed).
    pub forwarded_connections: u64,
    /// Summed over CPUs.
    #[serde(flatten)]
    pub counters: PortStats,
}

/// One place a gated port's live connections are counted.
#[derive(Serialize)]
#[serde(tag = "where", rename_all = "lowercase")]
pub enum CountedIn {
    /// The gate's own namespace, on the port itself.
    Local { port: u16 },
    /// Another namespace's server, followed from here.
    Netns { netns_inode: u64, port: u16 },
}

/// An interface that is up and not gated.
#[derive(Serialize)]
pub struct Ungated {
    pub name: String,
    pub ifindex: u32,
}

/// One interface the gate has a link for.
#[derive(Serialize)]
pub struct IfaceStatus {
    /// "(gone, ifindex N)" once the interface has been deleted.
    pub name: String,
    pub ifindex: u32,
    pub attach: Hook,
    /// What the kernel says of the link: only "attached" gates anything here.
    pub state: LinkState,
    /// For xdp: "native" or "generic" (as the kernel reports it).
    pub mode: Option<XdpMode>,
    /// For tc: "tcx" (a TCX link, Linux 6.6 on) or "clsact" (drain's cls_bpf filter on the
    /// clsact qdisc, pref 1 handle 0xd7a1: kernels without TCX).
    pub tc_mode: Option<TcMode>,
    /// What a refused SYN gets on this interface: the policy, on XDP and TC alike (the RST
    /// comes from the kernel's TCP, past the first line).
    pub refusal: Policy,
    /// Programs other tools attached to the same interface's hooks (left untouched), as
    /// "xdp: NAME, id N", "tcx ingress: NAME, id N" or "clsact ingress: NAME, id N (bpf,
    /// pref P handle H)" / "clsact ingress: KIND filter (pref P)".
    pub others: Vec<String>,
    /// What `gate on --attach` asked for when it attached this interface: "auto", "xdp"
    /// or "tc"; null when the gate has no record of it (made by an older drain).
    pub requested: Option<AttachChoice>,
    /// Why the interface got its hook, in one phrase, as `gate on` decided it (auto: "virtual
    /// device (veth): TC keeps the peer's TSO"; otherwise "--attach xdp"); null with no
    /// record, or a record of another hook than the one the kernel has.
    pub reason: Option<String>,
}

impl IfaceStatus {
    /// The reason as `gate on` prints it: "auto: ..." for auto's choices.
    pub fn why(&self) -> Option<String> {
        let reason = self.reason.as_ref()?;
        Some(match self.requested {
            Some(AttachChoice::Auto) => format!("auto: {reason}"),
            _ => reason.clone(),
        })
    }
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
        warnings: vec![],
        announced: false,
        closes_in_ms: None,
        maint: false,
        ttl_ms: None,
        rst_rate: None,
        quiet_ms: None,
        config: None,
    };
    let all = iface::interfaces()?;
    let dir = pins::gate_dir()?;
    if !pins::state_exists(&dir)? {
        st.warnings = stray_programs(&all, &Seen::read(&all), &[]);
        return Ok(st);
    }
    let mut gate = OpenGate::open(&dir)?;
    let cfg = gate.config()?;
    let now = boottime_ns();
    st.expired = cfg.deadline_ns != 0 && now >= cfg.deadline_ns;
    if cfg.deadline_ns != 0 {
        st.ttl_remaining_ms = Some(cfg.deadline_ns.saturating_sub(now) / 1_000_000);
    }
    st.policy = Policy::from_raw(cfg.policy);
    if let crate::agent::Phase::Announced { closes_in_ns } = crate::agent::Phase::of(&cfg, now) {
        st.announced = true;
        st.closes_in_ms = Some(closes_in_ns / 1_000_000);
    }
    st.maint = cfg.enabled == GATE_ON && cfg.flags & drain_common::FLAG_MAINT != 0;
    st.ttl_ms = (cfg.ttl_ns != 0).then_some(cfg.ttl_ns / 1_000_000);
    st.rst_rate = Some(rst_rate(&cfg));
    st.quiet_ms = st.announced.then_some(cfg.quiet_ns / 1_000_000);
    st.config = Some((cfg, now));
    // Read once, for the gate's interfaces, the ungated ones and the stray programs.
    let attachments = links::attachments(&dir)?;
    let seen = Seen::read(&all);
    let (interfaces, ours) = interfaces(&dir, &attachments, &all, &seen, st.policy);
    st.interfaces = interfaces;
    st.sk_lookup = links::lookup_attached(&LinkPin::Lookup.path(&dir));
    st.ungated = gate::ungated_among(&all, &attachments)
        .into_iter()
        .map(|i| Ungated {
            name: i.name,
            ifindex: i.index,
        })
        .collect();
    if st.policy == Policy::Reset && !st.sk_lookup {
        st.warnings.push(
            "the namespace-wide refusal (sk_lookup link) is not attached: refused SYNs within \
             the RST budget reach the server; `drain-user gate on` re-attaches it"
                .into(),
        );
    }
    // Either kind of counter counts when all its links are attached; which kind this kernel
    // needs (its BTF, ~5 MB to read) matters only for the warning.
    let counting = [gate::RstCounter::Tracepoint, gate::RstCounter::Fentry]
        .iter()
        .any(|c| {
            c.links()
                .iter()
                .all(|&(pin, name, _)| links::tracing_attached(&pin.path(&dir), name))
        });
    if !counting {
        let counter = gate::RstCounter::current(&crate::btf::Kernel::default());
        st.warnings.push(format!(
            "the RST counter ({}) is not attached: rst_sent and syns_refused miss the RSTs \
             policy reset sends; `drain-user gate on` re-attaches it",
            counter.map_or("unknown: the kernel's BTF is unreadable", |c| c.describe())
        ));
    }
    // Where the kernel can preempt a tracepoint's programs (Debian's 7.3), it skips the
    // counter for a reset that comes while the counter runs on that CPU: a count that
    // missed must not read as exact.
    let rst_missed: u64 = [LinkPin::Rst, LinkPin::Rst6]
        .iter()
        .map(|p| links::tracing_misses(&p.path(&dir)))
        .sum();
    if rst_missed != 0 {
        st.warnings.push(format!(
            "the kernel skipped the RST counter for {rst_missed} resets (it was already running \
             on that CPU): rst_sent and syns_refused may be low by as many"
        ));
    }
    let attached = st.interfaces.iter().any(|i| i.state == LinkState::Attached);
    if cfg.enabled == GATE_ON && !st.expired {
        if attached {
            st.gate = GateState::On;
        } else {
            st.warnings.push(
                "the gate is switched on but no interface has its program attached, so \
                 nothing is refused: run `drain-user gate on` again to re-attach, or \
                 `drain-user gate off`"
                    .into(),
            );
        }
    }
    for i in &st.interfaces {
        if i.tc_mode == Some(TcMode::Clsact) {
            let what = match i.state {
                LinkState::Attached => continue,
                LinkState::Foreign => format!(
                    "is taken by another program (pref {} handle {:#x} on clsact ingress)",
                    clsact::PRIORITY,
                    clsact::HANDLE
                ),
                _ => "is gone (deleted by `tc filter del` or `tc qdisc del`, or its \
                      interface deleted or moved)"
                    .to_string(),
            };
            st.warnings.push(format!(
                "drain's clsact filter on {} (ifindex {}) {what}: nothing is gated there; \
                 `drain-user gate on` re-attaches, `drain-user gate off` removes the record",
                i.name, i.ifindex
            ));
            continue;
        }
        let what = match i.state {
            LinkState::Attached => continue,
            LinkState::Detached => {
                "is pinned but attached to nothing (detached by another \
                 tool, a killed `gate off`, or its interface deleted): nothing is gated there"
            }
            LinkState::Elsewhere => {
                "is attached to a device that is no longer this \
                 namespace's (moved into another namespace?), where it still refuses \
                 connections"
            }
            LinkState::Foreign => "does not hold a link to drain's program",
        };
        st.warnings.push(format!(
            "the {} link of {} (ifindex {}) {what}: `drain-user gate on` re-attaches, \
             `drain-user gate off` removes it",
            i.attach.as_str(),
            i.name,
            i.ifindex
        ));
    }
    st.warnings.extend(stray_programs(&all, &seen, &ours));
    let tracker = gate.tracker().stats()?;
    let tracking = links::tracker_attached(&LinkPin::Track.path(&dir));
    if !tracking {
        st.warnings.push(
            "the connection tracker is not attached: live counts are not kept; \
             `drain-user gate on` re-attaches it"
                .into(),
        );
    }
    // The kernel skipped the tracker (a preemptible kernel's tracepoints): the set is put
    // right against the kernel's sockets before anything is read from it.
    let mut exact = tracking && tracker.insert_failed == 0 && tracker.read_failed == 0;
    if gate.tracker().stale() {
        let missed = gate.tracker().missed();
        let what = match gate.tracker_mut().recheck(&[]) {
            Ok(r) => {
                exact &= r.unchecked == 0 && !gate.tracker().stale();
                format!(
                    "drain rechecked its set against the kernel's sockets: {} closed \
                     connections taken out of the counts, {} open ones added{}",
                    r.removed,
                    r.added,
                    crate::wait::unjudged(r.unchecked)
                )
            }
            Err(e) => {
                exact = false;
                format!("rechecking its set against the kernel's sockets failed ({e:#}): live counts may be wrong either way")
            }
        };
        st.warnings.push(format!(
            "the kernel skipped the connection tracker for {missed} state changes (its program \
             was already running on that CPU: this kernel can preempt a tracepoint's \
             programs); {what}"
        ));
    }
    if tracker.insert_failed != 0 || tracker.read_failed != 0 {
        st.warnings.push(format!(
            "the connection tracker lost events ({} failed inserts: its set of {} connections \
             was full; {} failed kernel reads): live counts are lower bounds, and `wait` will \
             not report the ports drained",
            tracker.insert_failed,
            gate.tracker().capacity(),
            tracker.read_failed
        ));
    }
    let followed = gate.tracker().followed();
    // One read of the 64 stats slots (one lookup each), used twice.
    let gated_ports = gate.ports()?;
    let gated: std::collections::BTreeSet<u16> = gated_ports.iter().map(|p| p.port).collect();
    let forwarded = match crate::conntrack::forwarded(&gated) {
        Ok(f) => f,
        Err(e) => {
            st.warnings.push(format!(
                "reading conntrack failed ({e:#}): connections forwarded (DNAT) from the gated \
                 ports to other namespaces cannot be shown"
            ));
            Vec::new()
        }
    };
    st.ports = gated_ports
        .into_iter()
        .map(|p| {
            let mut counted_in = vec![CountedIn::Local { port: p.port }];
            counted_in.extend(followed.iter().filter(|(_, g)| *g == p.port).map(|(k, _)| {
                CountedIn::Netns {
                    netns_inode: u64::from(k.netns_inum),
                    port: k.port as u16,
                }
            }));
            let fwd = forwarded
                .iter()
                .filter(|f| f.port == p.port && f.maybe_live())
                .count() as u64;
            PortStatus {
                port: p.port,
                live_connections: gate.tracker().live(p.port),
                live_connections_exact: exact,
                counted_in,
                forwarded_connections: fwd,
                counters: p.stats,
            }
        })
        .collect();
    for p in &st.ports {
        if st.policy == Policy::Reset && (p.forwarded_connections > 0 || p.counted_in.len() > 1) {
            st.warnings.push(format!(
                "port {} is forwarded (DNAT) to another namespace: under policy reset a refused \
                 SYN is handed to the stack, which forwards it there instead of refusing it; \
                 `drain-user gate on --policy drop` refuses it before the DNAT",
                p.port
            ));
        }
        if p.forwarded_connections > 0 && p.counted_in.len() == 1 {
            st.warnings.push(format!(
                "port {}: {} connection(s) are forwarded (DNAT) to another namespace and not \
                 counted here yet: `drain-user wait` (or `gate on` again) follows them there",
                p.port, p.forwarded_connections
            ));
        }
    }
    st.allow = gate.allow()?.iter().map(IpNet::to_string).collect();
    st.tracker = Some(tracker);
    Ok(st)
}

/// The RST rate a gate was set with: kept in its config's flags; for a gate made before
/// that, the rate its interval gives (the CPUs together: one RST per interval each).
fn rst_rate(cfg: &drain_common::GateConfig) -> u32 {
    match cfg.flags >> drain_common::RST_RATE_SHIFT {
        0 if cfg.rst_interval_ns != 0 => {
            let ncpus = aya::util::nr_cpus().map_or(1, |n| n.max(1)) as u64;
            (ncpus * 1_000_000_000 / cfg.rst_interval_ns).min(u64::from(u32::MAX)) as u32
        }
        rate => rate,
    }
}

/// The TC programs on every interface's ingress (tcx, and clsact where the interface has
/// that qdisc), asked once for both [`interfaces`] and [`stray_programs`].
struct Seen {
    /// (ifindex, tcx ingress program ids).
    tcx: Vec<(u32, Vec<u32>)>,
    /// (ifindex, clsact ingress filters).
    clsact: Vec<(u32, Vec<clsact::Filter>)>,
}

impl Seen {
    fn read(all: &[Iface]) -> Self {
        let qdiscs = clsact::ingress_qdiscs().unwrap_or_default();
        let mut seen = Seen {
            tcx: Vec::new(),
            clsact: Vec::new(),
        };
        for i in all {
            if let Ok((_, progs)) = SchedClassifier::query_tcx(&i.name, TcAttachType::Ingress) {
                seen.tcx
                    .push((i.index, progs.iter().map(|p| p.id()).collect()));
            }
            if qdiscs.iter().any(|(q, _)| *q == i.index) {
                seen.clsact.push((
                    i.index,
                    clsact::ingress_filters(i.index).unwrap_or_default(),
                ));
            }
        }
        seen
    }

    fn tcx(&self, ifindex: u32) -> &[u32] {
        self.tcx
            .iter()
            .find(|(i, _)| *i == ifindex)
            .map_or(&[], |(_, p)| p)
    }

    fn clsact(&self, ifindex: u32) -> &[clsact::Filter] {
        self.clsact
            .iter()
            .find(|(i, _)| *i == ifindex)
            .map_or(&[], |(_, f)| f)
    }
}

/// The interfaces the gate has links for, and the ids of the programs those links run.
fn interfaces(
    dir: &Path,
    attachments: &[links::Attachment],
    all: &[Iface],
    tc: &Seen,
    policy: Policy,
) -> (Vec<IfaceStatus>, Vec<u32>) {
    let mut out = Vec::new();
    let mut ours_all = Vec::new();
    let decided = choices::records(dir).unwrap_or_default();
    for a in attachments {
        let seen = a.inspect(all);
        let ours = seen.prog_id;
        ours_all.extend(ours);
        let ifindex = a.ifindex();
        let iface = all.iter().find(|i| i.index == ifindex);
        let name = iface.map_or_else(|| format!("(gone, ifindex {ifindex})"), |i| i.name.clone());
        let mut others = Vec::new();
        let mut xdp_mode = None;
        if let Some((id, m)) = iface.and_then(|i| i.xdp) {
            if Some(id) == ours {
                xdp_mode = Some(m);
            } else {
                others.push(format!("xdp: {}", iface::program_name(id)));
            }
        }
        if iface.is_some() {
            for &id in tc.tcx(ifindex) {
                if Some(id) != ours {
                    others.push(format!("tcx ingress: {}", iface::program_name(id)));
                }
            }
            for f in tc.clsact(ifindex) {
                if f.prog_id.is_none() || f.prog_id != ours {
                    others.push(format!("clsact ingress: {}", f.describe()));
                }
            }
        }
        let hook = a.hook();
        // The record says why; the hook is the kernel's (the pin's): a record of another hook
        // explains nothing here.
        let decision = decided
            .iter()
            .find(|(i, d)| *i == ifindex && d.hook == hook)
            .map(|(_, d)| d);
        out.push(IfaceStatus {
            name,
            ifindex,
            attach: hook,
            state: seen.state,
            mode: if hook == Hook::Xdp && seen.state == LinkState::Attached {
                xdp_mode
            } else {
                None
            },
            tc_mode: a.tc_mode(),
            refusal: policy,
            others,
            requested: decision.map(|d| d.asked),
            reason: decision.map(|d| d.to_string()),
        });
    }
    (out, ours_all)
}

/// Warnings for drain's gate programs attached to interfaces of this namespace that no
/// link of this namespace's gate accounts for (`ours`): an interface moved here from a
/// gated namespace keeps refusing connections, though this namespace has no gate.
fn stray_programs(all: &[Iface], seen: &Seen, ours: &[u32]) -> Vec<String> {
    let mut out = Vec::new();
    for i in all {
        let mut ids: Vec<(u32, &str)> = i.xdp.map(|(id, _)| (id, prog::XDP)).into_iter().collect();
        ids.extend(seen.tcx(i.index).iter().map(|&id| (id, prog::TC)));
        ids.extend(
            seen.clsact(i.index)
                .iter()
                .filter_map(|f| f.prog_id)
                .map(|id| (id, prog::TC)),
        );
        for (id, name) in ids {
            if !ours.contains(&id) && links::program_is(id, name) {
                out.push(format!(
                    "{} runs drain's gate program ({name}, id {id}) that no gate of this \
                     namespace owns (moved here from a gated namespace?): it may refuse \
                     connections; run `drain-user gate off` in the namespace it came from",
                    i.name
                ));
            }
        }
    }
    out
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
                state: LinkState::Attached,
                mode: Some(XdpMode::Driver),
                tc_mode: None,
                refusal: Policy::Reset,
                others: vec![],
                requested: Some(AttachChoice::Auto),
                reason: Some("physical device (driver ixgbe) with native XDP".into()),
            }],
            ungated: vec![Ungated {
                name: "veth9".into(),
                ifindex: 9,
            }],
            ports: vec![PortStatus {
                port: 80,
                live_connections: 12,
                live_connections_exact: false,
                counted_in: vec![
                    CountedIn::Local { port: 80 },
                    CountedIn::Netns {
                        netns_inode: 4026532500,
                        port: 8080,
                    },
                ],
                forwarded_connections: 3,
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
            warnings: vec!["w".into()],
            announced: true,
            closes_in_ms: Some(2500),
            maint: false,
            ttl_ms: Some(900_000),
            rst_rate: Some(1000),
            quiet_ms: Some(3000),
            config: None,
        };
        assert_eq!(
            serde_json::to_string(&st).unwrap(),
            concat!(
                r#"{"gate":"on","policy":"reset","sk_lookup":true,"expired":false,"#,
                r#""ttl_remaining_ms":598123,"#,
                r#""interfaces":[{"name":"eth0","ifindex":2,"attach":"xdp","state":"attached","#,
                r#""mode":"native","tc_mode":null,"refusal":"reset","others":[],"requested":"auto","#,
                r#""reason":"physical device (driver ixgbe) with native XDP"}],"#,
                r#""ungated":[{"name":"veth9","ifindex":9}],"#,
                r#""ports":[{"port":80,"live_connections":12,"live_connections_exact":false,"#,
                r#""counted_in":[{"where":"local","port":80},"#,
                r#"{"where":"netns","netns_inode":4026532500,"port":8080}],"#,
                r#""forwarded_connections":3,"#,
                r#""syns_refused":40,"syns_passed":1,"#,
                r#""syns_allowed":2,"syns_expired":3,"rst_sent":4,"rst_limited":5,"rst_not_syn":6}],"#,
                r#""allow":["10.0.0.0/8"],"#,
                r#""tracker":{"added":118,"removed":106,"insert_failed":0,"read_failed":7},"#,
                r#""warnings":["w"],"announced":true,"closes_in_ms":2500,"maint":false,"#,
                r#""ttl_ms":900000,"rst_rate":1000,"quiet_ms":3000}"#
            )
        );
    }
}

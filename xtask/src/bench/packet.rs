//! Section 1: per-packet cost of the gate as deployed (BPF_PROG_TEST_RUN, in-kernel
//! timing): three gates made by `drain-user gate on` (default TTL, tracker attached; policy
//! drop, reset over its RST limit, reset sending), both programs (XDP and TC), each frame
//! timed next to a trivial program of the same hook. [`per_packet`] measures the rows and
//! [`section`] turns them into the report's table with the targets.

use std::{
    net::Ipv4Addr,
    os::fd::{AsFd, BorrowedFd},
    path::Path,
    thread,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, PerCpuArray},
    programs::{ProgramFd, SchedClassifier, Xdp},
    Ebpf, EbpfLoader,
};
use drain_common::{map, prog, CpuClock, GateConfig, PortStats};
use drain_tests::{
    frames::{Ipv4, Ipv6, Packet, Tcp, TCP_ACK},
    netns::NetNsPair,
    object::{
        load_trivial, object_path, BPF_PROG_TYPE_SCHED_CLS, BPF_PROG_TYPE_XDP, BPF_XDP, XDP_DROP,
        XDP_PASS,
    },
    testrun::{mean_ns, try_test_run},
};
use serde::Serialize;
use serde_json::json;

use super::{report::Section, sys::Ctx};

fn median<T: Copy + Ord>(mut v: Vec<T>) -> T {
    v.sort_unstable();
    v[v.len() / 2]
}

/// What a frame's cost is held to, above the baseline program of its hook.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Budget {
    /// Not a connection request (established traffic): at most +3 ns.
    NonSyn,
    /// A SYN the gate has to look at (to a gated port, or to another one): at most +10 ns.
    Syn,
}

impl Budget {
    pub fn ns(self) -> i64 {
        match self {
            Budget::NonSyn => 3,
            Budget::Syn => 10,
        }
    }
}

/// How a row was timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// One BPF_PROG_TEST_RUN of `repeat` runs on the same frame; the kernel's mean per run.
    Repeat,
    /// `singles` test runs of one run each (mean of the middle half), minus the baseline timed
    /// the same way.
    /// For frames the program rewrites (a SYN turned into its RST): a repeated run would
    /// time the RST it left behind from the second run on, not the SYN.
    Single,
}

/// Cost of one frame under one hook, in ns per run (medians over the rounds).
#[derive(Clone, Debug, Serialize)]
pub struct HookCost {
    pub ns: u32,
    /// Median over the rounds of (this frame - the baseline timed just before it).
    pub above_baseline_ns: i64,
    pub rounds_above_baseline_ns: Vec<i64>,
    /// Budget minus cost: >= 0 means the target is met.
    pub margin_ns: i64,
}

/// One row of the per-packet table, as the JSON report keeps it.
#[derive(Clone, Debug, Serialize)]
pub struct PacketCost {
    pub frame: String,
    pub budget: Budget,
    pub target_above_baseline_ns: i64,
    pub method: Method,
    pub xdp: HookCost,
    /// None where the hook has no such path (TC never sends RSTs).
    pub tc: Option<HookCost>,
}

/// The per-packet section: the gate as `drain-user gate on` leaves it.
#[derive(Clone, Debug, Serialize)]
pub struct PerPacket {
    pub repeat: u32,
    pub rounds: usize,
    pub singles: usize,
    /// `return XDP_PASS` and `return TCX_NEXT`, medians (repeated runs).
    pub xdp_baseline_ns: u32,
    pub tc_baseline_ns: u32,
    /// The gates were set up with `gate on --port 80` and its defaults (TTL 10m); the
    /// tracker link was pinned, i.e. attached.
    pub ttl_deadline_set: bool,
    pub tracker_attached: bool,
    pub rows: Vec<PacketCost>,
}

/// Which deployed gate a frame is run against.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Setup {
    /// `gate on --port 80` (policy drop).
    Drop,
    /// `gate on --port 80 --policy reset --rst-rate 1`: after one RST per CPU every refusal
    /// is over the limit for two seconds, the state of a host under a SYN flood.
    ResetLimited,
    /// `gate on --port 80 --policy reset --rst-rate 10000000`: every refusal goes on to the
    /// stack, where the kernel's TCP answers it with a RST (past the first line).
    ResetSending,
}

struct Case {
    name: &'static str,
    frame: Vec<u8>,
    setup: Setup,
    budget: Budget,
    /// XDP and TC return values the gate must give this frame (checked before timing).
    xdp_ret: i32,
    tc_ret: Option<i32>,
}

const TC_ACT_SHOT: i32 = 2;
const TCX_NEXT: i32 = -1;

#[rustfmt::skip]
fn cases() -> Vec<Case> {
    let v4 = || Ipv4::new(Ipv4Addr::new(198, 18, 0, 2), Ipv4Addr::new(198, 18, 0, 1));
    let v6 = || Ipv6::new("fd00::2".parse().unwrap(), "fd00::1".parse().unwrap());
    let ack = || Tcp::new(40000, 80, TCP_ACK);
    let data = [0u8; 64];
    let case = |name, p: Packet, setup, budget, xdp_ret, tc_ret| Case {
        name,
        frame: p.build().bytes,
        setup,
        budget,
        xdp_ret,
        tc_ret,
    };
    use Budget::{NonSyn, Syn};
    use Setup::{Drop, ResetLimited, ResetSending};
    let e = Packet::eth;
    let q = || Packet::eth().vlan(0x8100, 7);
    vec![
        case("IPv4 ACK to the gated port", e().ipv4(v4()).tcp(ack()).payload(&data), Drop, NonSyn, XDP_PASS, Some(TCX_NEXT)),
        case("IPv6 ACK to the gated port", e().ipv6(v6()).tcp(ack()).payload(&data), Drop, NonSyn, XDP_PASS, Some(TCX_NEXT)),
        case("802.1Q IPv4 ACK to the gated port", q().ipv4(v4()).tcp(ack()).payload(&data), Drop, NonSyn, XDP_PASS, Some(TCX_NEXT)),
        case("802.1Q IPv6 ACK to the gated port", q().ipv6(v6()).tcp(ack()).payload(&data), Drop, NonSyn, XDP_PASS, Some(TCX_NEXT)),
        case("IPv4 SYN to another port", e().ipv4(v4()).tcp(Tcp::syn(40000, 443)), Drop, Syn, XDP_PASS, Some(TCX_NEXT)),
        case("IPv6 SYN to another port", e().ipv6(v6()).tcp(Tcp::syn(40000, 443)), Drop, Syn, XDP_PASS, Some(TCX_NEXT)),
        case("IPv4 SYN refused (drop)", e().ipv4(v4()).tcp(Tcp::syn(40000, 80)), Drop, Syn, XDP_DROP, Some(TC_ACT_SHOT)),
        case("IPv6 SYN refused (drop)", e().ipv6(v6()).tcp(Tcp::syn(40000, 80)), Drop, Syn, XDP_DROP, Some(TC_ACT_SHOT)),
        case("802.1Q IPv4 SYN refused (drop)", q().ipv4(v4()).tcp(Tcp::syn(40000, 80)), Drop, Syn, XDP_DROP, Some(TC_ACT_SHOT)),
        case("802.1Q IPv6 SYN refused (drop)", q().ipv6(v6()).tcp(Tcp::syn(40000, 80)), Drop, Syn, XDP_DROP, Some(TC_ACT_SHOT)),
        case("IPv4 SYN refused (reset, over the RST limit)", e().ipv4(v4()).tcp(Tcp::syn(40000, 80)), ResetLimited, Syn, XDP_DROP, Some(TC_ACT_SHOT)),
        case("IPv6 SYN refused (reset, over the RST limit)", e().ipv6(v6()).tcp(Tcp::syn(40000, 80)), ResetLimited, Syn, XDP_DROP, Some(TC_ACT_SHOT)),
        case("IPv4 SYN refused (reset, on to the kernel's RST)", e().ipv4(v4()).tcp(Tcp::syn(40000, 80)), ResetSending, Syn, XDP_PASS, Some(TCX_NEXT)),
        case("IPv6 SYN refused (reset, on to the kernel's RST)", e().ipv6(v6()).tcp(Tcp::syn(40000, 80)), ResetSending, Syn, XDP_PASS, Some(TCX_NEXT)),
    ]
}

/// One gate set up by `drain-user gate on` in a namespace of its own, and a second copy of
/// its programs loaded against its pinned maps (test runs need program fds; the maps are
/// the deployed ones, so the programs see exactly the state `gate on` wrote). `gate off` on
/// drop.
struct Deployed<'a> {
    pair: &'a NetNsPair,
    ns: String,
    bin: &'a Path,
    bpf: Ebpf,
    xdp: ProgramFd,
    tc: ProgramFd,
    tracker: bool,
    deadline: bool,
}

impl<'a> Deployed<'a> {
    fn new(pair: &'a NetNsPair, ns: &str, bin: &'a Path, extra: &[&str]) -> Result<Self> {
        let out = pair
            .cmd(ns, bin.to_str().unwrap())
            .args(["gate", "on", "--port", "80"])
            .args(extra)
            .output()?;
        if !out.status.success() {
            bail!("gate on failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let dir = pair.state_dir(ns);
        let bytes = std::fs::read(object_path())?;
        let mut bpf = EbpfLoader::new()
            .default_map_pin_directory(&dir)
            .load(&bytes)
            .context("loading the object against the gate's pinned maps")?;
        let xdp: &mut Xdp = bpf.program_mut(prog::XDP).unwrap().try_into()?;
        xdp.load()?;
        let xdp = xdp.fd()?.try_clone()?;
        let tc: &mut SchedClassifier = bpf.program_mut(prog::TC).unwrap().try_into()?;
        tc.load()?;
        let tc = tc.fd()?.try_clone()?;
        let cfg: Array<_, GateConfig> = Array::try_from(bpf.map(map::CONFIG).unwrap())?;
        let deadline = cfg.get(&0, 0)?.deadline_ns != 0;
        Ok(Self {
            pair,
            ns: ns.to_string(),
            bin,
            bpf,
            xdp,
            tc,
            tracker: dir.join("link-track").exists(),
            deadline,
        })
    }

    /// DRAIN_STATS of port 80's slot, summed over CPUs.
    fn stats(&self) -> Result<PortStats> {
        let ports: Array<_, u32> = Array::try_from(self.bpf.map(map::PORTS).unwrap())?;
        let slot = ports.get(&80, 0)?;
        let stats: PerCpuArray<_, PortStats> =
            PerCpuArray::try_from(self.bpf.map(map::STATS).unwrap())?;
        Ok(stats
            .get(&slot, 0)?
            .iter()
            .fold(PortStats::default(), |a, s| PortStats {
                syns_refused: a.syns_refused + s.syns_refused,
                rst_sent: a.rst_sent + s.rst_sent,
                rst_limited: a.rst_limited + s.rst_limited,
                ..a
            }))
    }

    /// Leaves this CPU's RST bucket (`--rst-rate 1`: burst 1, one token per 2 s) empty with
    /// its next token at least half a second away, so a timed run refuses every SYN over the
    /// limit and never passes one on for the kernel's RST (the run would then time a mix).
    /// Reads the limiter's state; spends the token by passing one SYN on when it is
    /// about to come back.
    fn exhaust_rst_budget(&self, frame: &[u8], cpu: usize) -> Result<()> {
        let rl: PerCpuArray<_, CpuClock> =
            PerCpuArray::try_from(self.bpf.map(map::RST_RL).unwrap())?;
        for _ in 0..4 {
            let next = rl.get(&0, 0)?[cpu].rst_next_ns;
            let now = boottime_ns();
            if next > now + 500_000_000 {
                return Ok(());
            }
            thread::sleep(Duration::from_nanos(next.saturating_sub(now)));
            let ret = try_test_run(self.xdp.as_fd(), frame)?.0;
            if ret != XDP_PASS {
                bail!("the RST limiter refused a RST once its token was due (returned {ret})");
            }
        }
        bail!("the RST limiter's next token stays near")
    }
}

fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Drop for Deployed<'_> {
    fn drop(&mut self) {
        let _ = self
            .pair
            .cmd(&self.ns, self.bin.to_str().unwrap())
            .args(["gate", "off"])
            .output();
    }
}

/// Keeps the calling thread on the CPU it runs on until dropped (the RST limiter is per
/// CPU: spending its budget and timing the refusals must happen on the same one).
struct PinnedCpu {
    old: libc::cpu_set_t,
    cpu: usize,
}

impl PinnedCpu {
    fn here() -> Result<Self> {
        // SAFETY: plain libc calls on the calling thread with valid out-pointers.
        unsafe {
            let mut old: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of_val(&old), &mut old) != 0 {
                bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
            }
            let cpu = libc::sched_getcpu().max(0) as usize;
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut one);
            if libc::sched_setaffinity(0, std::mem::size_of_val(&one), &one) != 0 {
                bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
            }
            Ok(Self { old, cpu })
        }
    }
}

impl Drop for PinnedCpu {
    fn drop(&mut self) {
        // SAFETY: restores the mask read in here().
        unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&self.old), &self.old) };
    }
}

/// Mean of the middle half of `n` single runs (repeat 1) of `prog` on `frame`. The kernel
/// clock behind a single run's duration may tick in steps of several ns (10 ns on some
/// VMs); averaging the middle half recovers the nanoseconds, and
/// leaving out the quarters at either end drops the runs an interrupt landed in.
fn single_runs(prog: BorrowedFd<'_>, frame: &[u8], n: usize) -> Result<u32> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(mean_ns(prog, frame, 1)?);
    }
    v.sort_unstable();
    let mid = &v[n / 4..n - n / 4];
    Ok((mid.iter().map(|&x| f64::from(x)).sum::<f64>() / mid.len() as f64).round() as u32)
}

/// Per-packet cost of both gate programs, as deployed: three gates made by `drain-user gate
/// on` (policy drop; reset over its limit; reset sending), every frame timed under XDP and
/// TC in each of the interleaved rounds next to the trivial program of the same hook.
pub fn per_packet(ctx: &Ctx) -> Result<PerPacket> {
    let bin = ctx.bin.as_path();
    // Runs per BPF_PROG_TEST_RUN, interleaved rounds, and single runs per round for the
    // rows that cannot repeat in place (see [`Method::Single`]).
    let repeat: u32 = ctx.pick(1_000_000, 100_000);
    let rounds: usize = ctx.pick(7, 1);
    let singles: usize = ctx.pick(3000, 300);
    let pair = NetNsPair::new();
    let pair2 = NetNsPair::new();
    let drop = Deployed::new(&pair, &pair.a, bin, &[])?;
    let limited = Deployed::new(
        &pair,
        &pair.b,
        bin,
        &["--policy", "reset", "--rst-rate", "1"],
    )?;
    let sending = Deployed::new(
        &pair2,
        &pair2.a,
        bin,
        &["--policy", "reset", "--rst-rate", "10000000"],
    )?;
    let gate = |s: Setup| match s {
        Setup::Drop => &drop,
        Setup::ResetLimited => &limited,
        Setup::ResetSending => &sending,
    };
    let xdp_base = load_trivial(BPF_PROG_TYPE_XDP, BPF_XDP, XDP_PASS, "bench_base")?;
    let tc_base = load_trivial(BPF_PROG_TYPE_SCHED_CLS, 0, TCX_NEXT, "bench_base")?;
    let pinned = PinnedCpu::here()?;
    let cases = cases();

    // Each frame must get the verdict its row is named for, or the row would time another
    // path. The limited gate needs its budget spent first; the sending one never runs out.
    for c in &cases {
        let g = gate(c.setup);
        if c.setup == Setup::ResetLimited {
            g.exhaust_rst_budget(&c.frame, pinned.cpu)?;
        }
        let x = try_test_run(g.xdp.as_fd(), &c.frame)?.0;
        let t = try_test_run(g.tc.as_fd(), &c.frame)?.0;
        if x != c.xdp_ret || c.tc_ret.is_some_and(|r| r != t) {
            bail!(
                "{}: XDP returned {x} (want {}), TC {t} (want {:?})",
                c.name,
                c.xdp_ret,
                c.tc_ret
            );
        }
    }

    // Every timing of a frame is paired with a timing of its hook's baseline taken just
    // before it, so a change in machine load between pairs cancels out.
    let n = cases.len();
    let (mut xb, mut tb) = (Vec::new(), Vec::new());
    let mut x = vec![Vec::new(); n];
    let mut t = vec![Vec::new(); n];
    let frame0 = &cases[0].frame;
    for _ in 0..rounds {
        for (i, c) in cases.iter().enumerate() {
            let g = gate(c.setup);
            let (base, ns) = match c.setup {
                Setup::ResetSending => {
                    let base = single_runs(xdp_base.as_fd(), frame0, singles)?;
                    let before = g.stats()?.rst_limited;
                    let ns = single_runs(g.xdp.as_fd(), &c.frame, singles)?;
                    let limited = g.stats()?.rst_limited - before;
                    if limited != 0 {
                        bail!("{}: {limited} of {singles} runs over the RST limit", c.name);
                    }
                    (base, ns)
                }
                Setup::ResetLimited => {
                    g.exhaust_rst_budget(&c.frame, pinned.cpu)?;
                    let base = mean_ns(xdp_base.as_fd(), frame0, repeat)?;
                    let before = g.stats()?;
                    let ns = mean_ns(g.xdp.as_fd(), &c.frame, repeat)?;
                    let after = g.stats()?;
                    // Every run over the limit: had a token come back mid-run, a SYN would
                    // have gone on instead of being dropped.
                    if after.rst_limited - before.rst_limited != u64::from(repeat) {
                        bail!("{}: the RST limiter let a RST through", c.name);
                    }
                    (base, ns)
                }
                Setup::Drop => (
                    mean_ns(xdp_base.as_fd(), frame0, repeat)?,
                    mean_ns(g.xdp.as_fd(), &c.frame, repeat)?,
                ),
            };
            if c.setup != Setup::ResetSending {
                xb.push(base);
            }
            x[i].push((base, ns));
            if c.tc_ret.is_some() {
                // The sending gate's rows run once per BPF_PROG_TEST_RUN under TC too: a
                // million refusals in place would spend its RST budget (a tenth of a second's
                // worth) and time the limiter's drop path instead, then leave the budget
                // spent for the next row.
                let (base, ns) = if c.setup == Setup::ResetSending {
                    let base = single_runs(tc_base.as_fd(), frame0, singles)?;
                    let before = g.stats()?.rst_limited;
                    let ns = single_runs(g.tc.as_fd(), &c.frame, singles)?;
                    let limited = g.stats()?.rst_limited - before;
                    if limited != 0 {
                        bail!(
                            "{} (TC): {limited} of {singles} runs over the RST limit",
                            c.name
                        );
                    }
                    (base, ns)
                } else {
                    (
                        mean_ns(tc_base.as_fd(), frame0, repeat)?,
                        mean_ns(g.tc.as_fd(), &c.frame, repeat)?,
                    )
                };
                if c.setup != Setup::ResetSending {
                    tb.push(base);
                }
                t[i].push((base, ns));
            }
        }
    }

    let cost = |pairs: &[(u32, u32)], budget: Budget| {
        let rounds: Vec<i64> = pairs
            .iter()
            .map(|&(b, a)| i64::from(a) - i64::from(b))
            .collect();
        let above = median(rounds.clone());
        HookCost {
            ns: median(pairs.iter().map(|p| p.1).collect()),
            above_baseline_ns: above,
            rounds_above_baseline_ns: rounds,
            margin_ns: budget.ns() - above,
        }
    };
    let rows = cases
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let single = c.setup == Setup::ResetSending;
            PacketCost {
                frame: c.name.to_string(),
                budget: c.budget,
                target_above_baseline_ns: c.budget.ns(),
                method: if single {
                    Method::Single
                } else {
                    Method::Repeat
                },
                xdp: cost(&x[i], c.budget),
                tc: c.tc_ret.map(|_| cost(&t[i], c.budget)),
            }
        })
        .collect();
    Ok(PerPacket {
        repeat,
        rounds,
        singles,
        xdp_baseline_ns: median(xb),
        tc_baseline_ns: median(tb),
        ttl_deadline_set: [&drop, &limited, &sending].iter().all(|g| g.deadline),
        tracker_attached: [&drop, &limited, &sending].iter().all(|g| g.tracker),
        rows,
    })
}

/// The per-packet section of the report: one row per frame, a target per frame and hook.
pub fn section(ctx: &Ctx) -> Result<Section> {
    let p = per_packet(ctx)?;
    let mut s = Section::new(
        "packet",
        "1. Per-packet cost of the gate",
        format!(
            "BPF_PROG_TEST_RUN, {} runs × {} interleaved rounds, median ns per run. The gate \
             as deployed: `drain-user gate on --port 80` (TTL deadline set: {}, tracker \
             attached: {}). Each timing is paired with one of a trivial program of the same \
             hook taken just before it (`return XDP_PASS` {} ns, `return TCX_NEXT` {} ns): \
             \"above base\" is drain's own cost.",
            p.repeat,
            p.rounds,
            p.ttl_deadline_set,
            p.tracker_attached,
            p.xdp_baseline_ns,
            p.tc_baseline_ns
        ),
    );
    s.columns(&[
        "frame",
        "XDP ns",
        "XDP above base",
        "TC ns",
        "TC above base",
        "target",
    ]);
    for r in &p.rows {
        let star = if r.method == Method::Single { " *" } else { "" };
        let (tc_ns, tc_above) = match &r.tc {
            Some(t) => (t.ns.to_string(), format!("{:+}", t.above_baseline_ns)),
            None => ("—".into(), "—".into()),
        };
        s.row(vec![
            format!("{}{star}", r.frame),
            r.xdp.ns.to_string(),
            format!("{:+}", r.xdp.above_baseline_ns),
            tc_ns,
            tc_above,
            format!("≤ +{}", r.target_above_baseline_ns),
        ]);
        for (hook, h) in [("XDP", Some(&r.xdp)), ("TC", r.tc.as_ref())] {
            let Some(h) = h else { continue };
            s.target(
                format!("{hook}: {}", r.frame),
                format!("≤ +{} ns", r.target_above_baseline_ns),
                format!("{:+} ns", h.above_baseline_ns),
                h.margin_ns >= 0,
            );
        }
    }
    s.note(format!(
        "\\* XDP and TC timed as {} single runs per round against single runs of the baseline, so \
         the run stays within the RST budget (a repeated run spends it and times drops). The \
         frame goes on unchanged; the RST is the kernel's, past the first line (sk_lookup).",
        p.singles
    ));
    s.data = json!(p);
    Ok(s)
}

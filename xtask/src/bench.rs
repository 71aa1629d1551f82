//! `cargo xtask bench`: what drain costs, as ratios measured side by side in one run.
//!
//! 1. Per-packet cost of the gate as deployed (BPF_PROG_TEST_RUN, in-kernel timing): three
//!    gates made by `drain-user gate on` (default TTL, tracker attached; policy drop, reset
//!    over its RST limit, reset sending), both programs (XDP and TC), each frame timed next
//!    to a trivial program of the same hook. [`per_packet`] returns the rows (serializable)
//!    and [`print_per_packet`] prints them as a markdown table with the targets.
//! 2. Memory the kernel holds for a gate (memlock of each map, from fdinfo).
//! 3. How soon the end of a drain is noticed: `drain-user wait` against the usual shell
//!    loop that polls `ss` once a second, both watching the same connections close.
//! 4. Drift: churn `DRAIN_SOAK` connections (default 200,000) through a gated port and
//!    check the count returns to exactly zero.
//!
//! `DRAIN_BENCH_PER_PACKET_ONLY=1` stops after sections 1 and 2 (seconds instead of minutes).
//!
//! Shared machines are noisy: each figure is the median of several interleaved rounds,
//! and only ratios within this run mean anything.

use std::{
    io::Read,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, PerCpuArray, PerCpuValues, RingBuf},
    programs::{ProgramFd, SchedClassifier, Xdp},
    Ebpf, EbpfLoader,
};
use drain_common::{
    map, prog, CpuClock, GateConfig, PortStats, WatchConfig, WatchCpu, GATE_ON, POLICY_DROP,
};
use drain_tests::{
    frames::{Ipv4, Ipv6, Packet, Tcp, TCP_ACK},
    netns::NetNsPair,
    object::{object_path, Loaded},
    testrun::{load_xdp_pass, mean_ns, try_test_run},
    traffic::{churn, listen, ss_live, Op, Server, Stack},
};
use serde::Serialize;

const REPEAT: u32 = 1_000_000;
const ROUNDS: usize = 7;
/// Single runs per round for the rows that cannot repeat in place (see [`Method::Single`]).
const SINGLES: usize = 3000;

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
    /// One BPF_PROG_TEST_RUN of REPEAT runs on the same frame; the kernel's mean per run.
    Repeat,
    /// SINGLES test runs of one run each (mean of the middle half), minus the baseline timed
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

const XDP_DROP: i32 = 1;
const XDP_PASS: i32 = 2;
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
    /// Reads the limiter's state; spends the token by passing one SYN on when it is about
    /// to come back.
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

/// Loads a program that only returns `ret` (`r0 = ret; exit`) straight through
/// bpf(BPF_PROG_LOAD): the baseline each hook's figures are taken against.
fn load_trivial(prog_type: u32, expected_attach_type: u32, ret: i32) -> Result<OwnedFd> {
    // BPF_MOV64_IMM(BPF_REG_0, ret), BPF_EXIT_INSN()
    let insns: [u64; 2] = [(u64::from(ret as u32) << 32) | 0xb7, 0x95];
    let license = c"GPL";
    #[repr(C)]
    #[derive(Default)]
    struct LoadAttr {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    let mut name = [0u8; 16];
    name[..10].copy_from_slice(b"bench_base");
    let attr = LoadAttr {
        prog_type,
        insn_cnt: 2,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        expected_attach_type,
        ..Default::default()
    };
    // SAFETY: a valid bpf_attr prefix for BPF_PROG_LOAD (5); pointers live across the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            5,
            &attr as *const LoadAttr,
            std::mem::size_of::<LoadAttr>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("loading a baseline program");
    }
    // SAFETY: a new fd the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
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
/// TC in each of ROUNDS interleaved rounds next to the trivial program of the same hook.
pub fn per_packet(bin: &Path) -> Result<PerPacket> {
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
    let xdp_base = load_trivial(6, 37, XDP_PASS)?; // BPF_PROG_TYPE_XDP, BPF_XDP
    let tc_base = load_trivial(3, 0, TCX_NEXT)?; // BPF_PROG_TYPE_SCHED_CLS
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
    for _ in 0..ROUNDS {
        for (i, c) in cases.iter().enumerate() {
            let g = gate(c.setup);
            let (base, ns) = match c.setup {
                Setup::ResetSending => {
                    let base = single_runs(xdp_base.as_fd(), frame0, SINGLES)?;
                    let before = g.stats()?.rst_limited;
                    let ns = single_runs(g.xdp.as_fd(), &c.frame, SINGLES)?;
                    let limited = g.stats()?.rst_limited - before;
                    if limited != 0 {
                        bail!("{}: {limited} of {SINGLES} runs over the RST limit", c.name);
                    }
                    (base, ns)
                }
                Setup::ResetLimited => {
                    g.exhaust_rst_budget(&c.frame, pinned.cpu)?;
                    let base = mean_ns(xdp_base.as_fd(), frame0, REPEAT)?;
                    let before = g.stats()?;
                    let ns = mean_ns(g.xdp.as_fd(), &c.frame, REPEAT)?;
                    let after = g.stats()?;
                    // Every run over the limit: had a token come back mid-run, a SYN would
                    // have gone on instead of being dropped.
                    if after.rst_limited - before.rst_limited != u64::from(REPEAT) {
                        bail!("{}: the RST limiter let a RST through", c.name);
                    }
                    (base, ns)
                }
                Setup::Drop => (
                    mean_ns(xdp_base.as_fd(), frame0, REPEAT)?,
                    mean_ns(g.xdp.as_fd(), &c.frame, REPEAT)?,
                ),
            };
            if c.setup != Setup::ResetSending {
                xb.push(base);
            }
            x[i].push((base, ns));
            if c.tc_ret.is_some() {
                let base = mean_ns(tc_base.as_fd(), frame0, REPEAT)?;
                tb.push(base);
                t[i].push((base, mean_ns(g.tc.as_fd(), &c.frame, REPEAT)?));
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
        repeat: REPEAT,
        rounds: ROUNDS,
        singles: SINGLES,
        xdp_baseline_ns: median(xb),
        tc_baseline_ns: median(tb),
        ttl_deadline_set: [&drop, &limited, &sending].iter().all(|g| g.deadline),
        tracker_attached: [&drop, &limited, &sending].iter().all(|g| g.tracker),
        rows,
    })
}

/// The per-packet section as a markdown table.
pub fn print_per_packet(p: &PerPacket) {
    println!(
        "\n== per-packet cost (BPF_PROG_TEST_RUN, {} runs x {} interleaved rounds, median ns/run)",
        p.repeat, p.rounds
    );
    println!(
        "gate as deployed: `drain-user gate on --port 80` (TTL deadline set: {}, tracker \
         attached: {}); baselines `return XDP_PASS` {} ns, `return TCX_NEXT` {} ns\n",
        p.ttl_deadline_set, p.tracker_attached, p.xdp_baseline_ns, p.tc_baseline_ns
    );
    println!("| frame | XDP ns | XDP above base | TC ns | TC above base | target | result |");
    println!("|---|---|---|---|---|---|---|");
    let verdict = |h: &HookCost| {
        if h.margin_ns >= 0 {
            "met".to_string()
        } else {
            format!("missed by {} ns", -h.margin_ns)
        }
    };
    for r in &p.rows {
        let star = if r.method == Method::Single { " *" } else { "" };
        let (tc_ns, tc_above, tc_res) = match &r.tc {
            Some(t) => (
                t.ns.to_string(),
                format!("{:+}", t.above_baseline_ns),
                format!("TC {}", verdict(t)),
            ),
            None => ("—".into(), "—".into(), "TC —".into()),
        };
        println!(
            "| {}{star} | {} | {:+} | {tc_ns} | {tc_above} | ≤ +{} | XDP {}, {tc_res} |",
            r.frame,
            r.xdp.ns,
            r.xdp.above_baseline_ns,
            r.target_above_baseline_ns,
            verdict(&r.xdp),
        );
    }
    println!(
        "\n\\* XDP timed as {} single runs per round against single runs of the baseline, so \
         the run stays within the RST budget (a repeated run spends it and times drops). The \
         frame goes on unchanged; the RST is the kernel's, past the first line.",
        p.singles
    );
    println!(
        "TC runs on an skb; its baseline is a TC program, so \"above base\" is drain's own cost."
    );
}

/// Kernel memory of one gate: memlock of each map, from fdinfo.
fn kernel_memory(bpf: &Ebpf) -> Result<()> {
    println!("\n== kernel memory of one gate (memlock from /proc/self/fdinfo)");
    let mut total = 0u64;
    for (name, m) in bpf.maps() {
        let fd = match m {
            aya::maps::Map::Array(d)
            | aya::maps::Map::PerCpuArray(d)
            | aya::maps::Map::HashMap(d)
            | aya::maps::Map::LpmTrie(d) => d.fd(),
            _ => continue,
        };
        let info =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd()))?;
        let kb = info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        total += kb;
        println!("  {name:<15} {:>8} KiB", kb / 1024);
    }
    println!(
        "  {:<15} {:>8} KiB (DRAIN_SOCKS and the allowlists grow with use: no prealloc)",
        "total",
        total / 1024
    );
    Ok(())
}

/// What `drain-user watch` costs a refused SYN: the gate's path with nobody watching (one
/// array load), with a watcher and the default sampling (a flood: nearly every event held
/// back by the limiter), and with every event written to the ring buffer (drained between
/// runs, in batches small enough that it never fills).
fn watch_cost() -> Result<()> {
    const BATCH: u32 = 4_000;
    println!(
        "\n== refused SYN with `watch` (BPF_PROG_TEST_RUN, {REPEAT} runs x {ROUNDS} rounds; \
         every-event row: {BATCH}-run batches, median ns/run)"
    );
    let mut obj = Loaded::open();
    let xdp = obj.load_xdp(prog::XDP);
    Array::<_, u32>::try_from(obj.bpf.map_mut(map::PORTS).unwrap())?.set(80, 1, 0)?;
    let n = aya::util::nr_cpus().map_err(|(w, e)| anyhow::anyhow!("{w}: {e}"))?;
    let slot = PortStats {
        port: 80,
        ..Default::default()
    };
    PerCpuArray::<_, PortStats>::try_from(obj.bpf.map_mut(map::STATS).unwrap())?.set(
        1,
        PerCpuValues::try_from(vec![slot; n])?,
        0,
    )?;
    let on = GateConfig {
        enabled: GATE_ON,
        policy: POLICY_DROP,
        ..Default::default()
    };
    Array::<_, GateConfig>::try_from(obj.bpf.map_mut(map::CONFIG).unwrap())?.set(0, on, 0)?;
    let baseline = load_xdp_pass().context("loading the baseline XDP program")?;
    let syn = Packet::eth()
        .ipv4(Ipv4::new(
            Ipv4Addr::new(198, 18, 0, 2),
            Ipv4Addr::new(198, 18, 0, 1),
        ))
        .tcp(Tcp::syn(40000, 80))
        .build()
        .bytes;
    let (interval, burst) = drain_user::watch::limiter(100, n as u32);
    let watchers = [
        ("watch off (nobody watching)", WatchConfig::default()),
        (
            "watch on, default sampling (100/s: a flood is held back)",
            WatchConfig {
                until_ns: u64::MAX,
                interval_ns: interval,
                burst,
            },
        ),
        (
            "watch on, every refusal written to the ring",
            WatchConfig {
                until_ns: u64::MAX,
                interval_ns: 0,
                burst: 1,
            },
        ),
    ];
    let mut base = Vec::new();
    let mut ns = vec![Vec::new(); watchers.len()];
    for _ in 0..ROUNDS {
        base.push(mean_ns(baseline.as_fd(), &syn, REPEAT)?);
        for (i, (_, cfg)) in watchers.iter().enumerate() {
            Array::<_, WatchConfig>::try_from(obj.bpf.map_mut(map::WATCH).unwrap())?
                .set(0, cfg, 0)?;
            if cfg.interval_ns != 0 || cfg.until_ns == 0 {
                ns[i].push(mean_ns(xdp.as_fd(), &syn, REPEAT)?);
                continue;
            }
            for _ in 0..REPEAT / BATCH / 10 {
                ns[i].push(mean_ns(xdp.as_fd(), &syn, BATCH)?);
                let mut ring = RingBuf::try_from(obj.bpf.map_mut(map::EVENTS).unwrap())?;
                while ring.next().is_some() {}
            }
        }
    }
    let lost: u64 = PerCpuArray::<_, WatchCpu>::try_from(obj.bpf.map(map::WATCH_RL).unwrap())?
        .get(&0, 0)?
        .iter()
        .map(|c| c.lost)
        .sum();
    let b = median(base);
    println!(
        "  {:<58} {:>6} ns",
        "baseline: XDP program `return XDP_PASS`", b
    );
    for (i, (name, _)) in watchers.iter().enumerate() {
        let x = median(ns[i].clone());
        println!(
            "  {name:<58} {x:>6} ns  {:>+5}",
            i64::from(x) - i64::from(b)
        );
    }
    println!("  (events lost to a full ring: {lost})");
    Ok(())
}

/// Time from the last close to the moment each watcher reports the port drained.
fn drain_notice(bin: &Path) -> Result<()> {
    const CONNS: usize = 20;
    const ROUNDS: usize = 5;
    println!(
        "\n== noticing the end of a drain ({CONNS} connections closed at once, {ROUNDS} rounds)"
    );
    let mut wait_ms = Vec::new();
    let mut ss_ms = Vec::new();
    for round in 0..ROUNDS {
        let pair = NetNsPair::new();
        let port = 8080;
        let server = SocketAddr::new(pair.a_v4.into(), port);
        let listener = pair.in_ns(&pair.a, move || TcpListener::bind(server))?;
        let accepted = thread::spawn(move || {
            (0..CONNS)
                .map(|_| listener.accept().map(|(s, _)| s))
                .collect::<std::io::Result<Vec<_>>>()
        });
        let clients: Vec<TcpStream> = pair.in_ns(&pair.b, move || {
            (0..CONNS)
                .map(|_| TcpStream::connect(server))
                .collect::<std::io::Result<Vec<_>>>()
        })?;
        let accepted = accepted.join().expect("accept thread")?;
        let out = pair
            .cmd(&pair.a, bin.to_str().unwrap())
            .args(["gate", "on", "--port", "8080", "--ttl", "5m"])
            .output()?;
        if !out.status.success() {
            bail!("gate on failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut wait = pair
            .cmd(&pair.a, bin.to_str().unwrap())
            .args(["wait", "--json", "--timeout", "60s"])
            .stdout(Stdio::piped())
            .spawn()?;
        // The folk answer: poll ss once a second until no connection is left.
        let script = format!(
            "while [ -n \"$(ss -Htn state established state close-wait '( sport = :{port} )')\" ]; do sleep 1; done"
        );
        let mut ss = pair.cmd(&pair.a, "sh").args(["-c", &script]).spawn()?;
        // Let both settle into their loops (the ss loop's phase is random, as in real life).
        thread::sleep(Duration::from_millis(300 + 137 * round as u64));
        let t0 = Instant::now();
        drop(clients);
        drop(accepted);
        let mut ss_done = None;
        let mut wait_done = None;
        while ss_done.is_none() || wait_done.is_none() {
            if wait_done.is_none() && wait.try_wait()?.is_some() {
                wait_done = Some(t0.elapsed());
            }
            if ss_done.is_none() && ss.try_wait()?.is_some() {
                ss_done = Some(t0.elapsed());
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("a watcher did not finish within 30 s");
            }
            thread::sleep(Duration::from_millis(1));
        }
        let mut s = String::new();
        wait.stdout.take().unwrap().read_to_string(&mut s)?;
        if !s.contains("\"drained\"") {
            bail!("wait did not report drained: {s}");
        }
        let _ = pair
            .cmd(&pair.a, bin.to_str().unwrap())
            .args(["gate", "off"])
            .output();
        wait_ms.push(wait_done.unwrap().as_secs_f64() * 1e3);
        ss_ms.push(ss_done.unwrap().as_secs_f64() * 1e3);
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (w, s) = (med(wait_ms.clone()), med(ss_ms.clone()));
    println!(
        "  drain-user wait      median {w:>8.1} ms   (rounds: {})",
        fmt(&wait_ms)
    );
    println!(
        "  ss poll every 1 s    median {s:>8.1} ms   (rounds: {})",
        fmt(&ss_ms)
    );
    println!("  ratio ss/wait: {:.0}x sooner", s / w.max(0.001));
    Ok(())
}

/// Churns many connections through a gated port (the client allowlisted) and checks the
/// kernel's count comes back to exactly zero, equal to `ss`, with every passive open added
/// and removed once: the set semantics leave nothing to drift.
fn drift_soak(bin: &Path, n: u64) -> Result<()> {
    const PORT: u16 = 8090;
    println!("\n== drift soak: {n} connections through a gated port (client allowlisted)");
    let pair = NetNsPair::new();
    // RST endings and server-first closes leave no TIME_WAIT on the client: its ports last.
    let _ = pair
        .cmd(&pair.b, "sysctl")
        .args(["-qw", "net.ipv4.ip_local_port_range=1024 65000"])
        .output();
    let server = Server::start(listen(&pair.a, Stack::V4, PORT), 4);
    let bin_s = bin.to_str().unwrap();
    let out = pair
        .cmd(&pair.a, bin_s)
        .args(["gate", "on", "--port", &PORT.to_string(), "--ttl", "1h"])
        .args(["--allow", &format!("{}/32", pair.b_v4)])
        .output()?;
    if !out.status.success() {
        bail!("gate on failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let target = SocketAddr::new(pair.a_v4.into(), PORT);
    let endings = [Op::ServerClose, Op::ServerReset, Op::ClientReset];
    let t0 = Instant::now();
    let done = churn(&pair.b, &[target], &endings, n, 4);
    let elapsed = t0.elapsed();
    server.wait_finished(done.connections, Duration::from_secs(60));
    thread::sleep(Duration::from_millis(200));
    let st: serde_json::Value = serde_json::from_slice(
        &pair
            .cmd(&pair.a, bin_s)
            .args(["status", "--json"])
            .output()?
            .stdout,
    )?;
    let live = st["ports"][0]["live_connections"].as_i64();
    let t = &st["tracker"];
    let (ss_est, ss_cw) = ss_live(&pair.a, PORT);
    let _ = pair.cmd(&pair.a, bin_s).args(["gate", "off"]).output();
    println!(
        "  {} connections in {:.1} s ({:.0}/s); afterwards: live_connections {:?}, ss {} \
         (ESTABLISHED + CLOSE_WAIT), tracker added {} removed {} lost {}",
        done.connections,
        elapsed.as_secs_f64(),
        done.connections as f64 / elapsed.as_secs_f64(),
        live,
        ss_est + ss_cw,
        t["added"],
        t["removed"],
        t["insert_failed"].as_u64().unwrap_or(0) + t["read_failed"].as_u64().unwrap_or(0),
    );
    if live != Some(0)
        || ss_est + ss_cw != 0
        || t["added"] != t["removed"]
        || t["added"].as_u64() != Some(done.connections)
    {
        bail!("the live count drifted: {st}");
    }
    println!("  no drift: count back to exactly 0, every passive open added and removed once");
    Ok(())
}

fn fmt(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn run(bin: &Path) -> Result<()> {
    println!("drain benchmarks (kernel.bpf_stats_enabled must be off: it adds ~70 ns per run)");
    if std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() != "0")
    {
        println!("  warning: kernel.bpf_stats_enabled is on; numbers include its overhead");
    }
    print_per_packet(&per_packet(bin)?);
    watch_cost()?;
    kernel_memory(&Loaded::open().bpf)?;
    if std::env::var_os("DRAIN_BENCH_PER_PACKET_ONLY").is_some() {
        return Ok(());
    }
    drain_notice(bin)?;
    let soak = std::env::var("DRAIN_SOAK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    drift_soak(bin, soak)
}

//! `cargo xtask bench`: what drain costs, as ratios measured side by side in one run.
//!
//! 1. Per-packet cost of the gate (BPF_PROG_TEST_RUN, in-kernel timing), next to the
//!    smallest possible XDP program measured in the same rounds: the difference is drain's.
//! 2. Memory the kernel holds for a gate (memlock of each map, from fdinfo).
//! 3. How soon the end of a drain is noticed: `drain-user wait` against the usual shell
//!    loop that polls `ss` once a second, both watching the same connections close.
//! 4. Drift: churn `DRAIN_SOAK` connections (default 200,000) through a gated port and
//!    check the count returns to exactly zero.
//!
//! Shared machines are noisy: each figure is the median of several interleaved rounds,
//! and only ratios within this run mean anything.

mod cli;
mod count;
mod detect;
mod flood;
mod memory;
mod report;
mod stream;
mod sys;

pub use count::hold;
pub use sys::{isolate, Ctx};

use std::{
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsFd,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::maps::{Array, PerCpuArray, PerCpuValues};
use drain_common::{map, prog, GateConfig, PortStats, GATE_ON, POLICY_DROP};
use drain_tests::{
    frames::{Ipv4, Ipv6, Packet, Tcp, TCP_ACK},
    netns::NetNsPair,
    object::Loaded,
    testrun::{load_xdp_pass, mean_ns},
    traffic::{churn, listen, ss_live, Op, Server, Stack},
};

const REPEAT: u32 = 1_000_000;
const ROUNDS: usize = 7;

fn median(mut v: Vec<u32>) -> u32 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn per_packet() -> Result<()> {
    println!(
        "\n== per-packet cost (BPF_PROG_TEST_RUN, {REPEAT} runs x {ROUNDS} rounds, median ns/run)"
    );
    let mut obj = Loaded::open();
    let xdp = obj.load_xdp(prog::XDP);
    let tc = obj.load_tc(prog::TC);
    {
        let mut ports: Array<_, u32> = Array::try_from(obj.bpf.map_mut(map::PORTS).unwrap())?;
        ports.set(80, 1, 0)?;
    }
    {
        let n = aya::util::nr_cpus().map_err(|(w, e)| anyhow::anyhow!("{w}: {e}"))?;
        let mut stats: PerCpuArray<_, PortStats> =
            PerCpuArray::try_from(obj.bpf.map_mut(map::STATS).unwrap())?;
        let v = PortStats {
            port: 80,
            ..Default::default()
        };
        stats.set(1, PerCpuValues::try_from(vec![v; n])?, 0)?;
    }
    {
        let mut cfg: Array<_, GateConfig> = Array::try_from(obj.bpf.map_mut(map::CONFIG).unwrap())?;
        cfg.set(
            0,
            GateConfig {
                enabled: GATE_ON,
                policy: POLICY_DROP,
                ..Default::default()
            },
            0,
        )?;
    }
    let baseline = load_xdp_pass().context("loading the baseline XDP program")?;
    let v4 = || Ipv4::new(Ipv4Addr::new(198, 18, 0, 2), Ipv4Addr::new(198, 18, 0, 1));
    let v6 = || Ipv6::new("fd00::2".parse().unwrap(), "fd00::1".parse().unwrap());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "IPv4 ACK, gated port (established traffic)",
            Packet::eth()
                .ipv4(v4())
                .tcp(Tcp::new(40000, 80, TCP_ACK))
                .payload(&[0; 64])
                .build()
                .bytes,
        ),
        (
            "IPv6 ACK, gated port (established traffic)",
            Packet::eth()
                .ipv6(v6())
                .tcp(Tcp::new(40000, 80, TCP_ACK))
                .payload(&[0; 64])
                .build()
                .bytes,
        ),
        (
            "IPv4 SYN, other port (passes)",
            Packet::eth()
                .ipv4(v4())
                .tcp(Tcp::syn(40000, 443))
                .build()
                .bytes,
        ),
        (
            "IPv4 SYN, gated port (refused)",
            Packet::eth()
                .ipv4(v4())
                .tcp(Tcp::syn(40000, 80))
                .build()
                .bytes,
        ),
        (
            "IPv6 SYN, gated port (refused)",
            Packet::eth()
                .ipv6(v6())
                .tcp(Tcp::syn(40000, 80))
                .build()
                .bytes,
        ),
        (
            "802.1Q IPv4 SYN, gated port (refused)",
            Packet::eth()
                .vlan(0x8100, 7)
                .ipv4(v4())
                .tcp(Tcp::syn(40000, 80))
                .build()
                .bytes,
        ),
    ];
    let mut base = Vec::new();
    let mut xdp_ns = vec![Vec::new(); cases.len()];
    let mut tc_ns = vec![Vec::new(); cases.len()];
    for _ in 0..ROUNDS {
        base.push(mean_ns(baseline.as_fd(), &cases[0].1, REPEAT)?);
        for (i, (_, frame)) in cases.iter().enumerate() {
            xdp_ns[i].push(mean_ns(xdp.as_fd(), frame, REPEAT)?);
            tc_ns[i].push(mean_ns(tc.as_fd(), frame, REPEAT)?);
        }
    }
    let b = median(base);
    println!(
        "  {:<44} {:>6} ns",
        "baseline: XDP program `return XDP_PASS`", b
    );
    println!(
        "  {:<44} {:>9} {:>9} {:>9}",
        "frame", "xdp ns", "xdp-base", "tc ns"
    );
    for (i, (name, _)) in cases.iter().enumerate() {
        let x = median(xdp_ns[i].clone());
        let t = median(tc_ns[i].clone());
        println!(
            "  {:<44} {:>9} {:>+9} {:>9}",
            name,
            x,
            i64::from(x) - i64::from(b),
            t
        );
    }
    println!(
        "  (tc runs on an skb, so its test-run loop costs more; compare xdp with the baseline)"
    );

    println!("\n== kernel memory of one gate (memlock from /proc/self/fdinfo)");
    let mut total = 0u64;
    for (name, m) in obj.bpf.maps() {
        let fd = match m {
            aya::maps::Map::Array(d)
            | aya::maps::Map::PerCpuArray(d)
            | aya::maps::Map::HashMap(d)
            | aya::maps::Map::LpmTrie(d) => d.fd(),
            _ => continue,
        };
        use std::os::fd::AsRawFd;
        let info =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd()))?;
        let kb = info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        total += kb;
        println!("  {name:<14} {:>8} KiB", kb / 1024);
    }
    println!(
        "  {:<14} {:>8} KiB (DRAIN_SOCKS and the allowlists grow with use: no prealloc)",
        "total",
        total / 1024
    );
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

pub fn run(ctx: &Ctx) -> Result<()> {
    let bin = ctx.bin.as_path();
    println!("drain benchmarks (kernel.bpf_stats_enabled must be off: it adds ~70 ns per run)");
    if std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() != "0")
    {
        println!("  warning: kernel.bpf_stats_enabled is on; numbers include its overhead");
    }
    // DRAIN_BENCH_ONLY=flood,count runs only those sections (while working on one).
    let only = std::env::var("DRAIN_BENCH_ONLY").ok();
    let want = |id: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|x| x == id))
    };
    if want("packet") {
        per_packet()?;
    }
    let mut report = report::Report {
        machine: report::Machine::here(),
        smoke: ctx.smoke,
        sections: Vec::new(),
    };
    let timed = |id: &str, t0: Instant| {
        eprintln!(
            "bench: section {id} took {:.1} s",
            t0.elapsed().as_secs_f64()
        )
    };
    let mut memlock = Vec::new();
    for id in ["flood", "stream", "count", "detect", "cli", "memory"] {
        if !want(id) {
            continue;
        }
        let t0 = Instant::now();
        let s = match id {
            "flood" => flood::section(ctx),
            "stream" => stream::section(ctx),
            "count" => count::section(ctx).map(|(s, m)| {
                memlock = m;
                s
            }),
            "detect" => detect::section(ctx),
            "cli" => cli::section(ctx),
            _ => memory::section(ctx, &memlock),
        }
        .with_context(|| format!("bench section {id}"))?;
        timed(id, t0);
        println!("{}", s.markdown_string());
        report.sections.push(s);
    }
    println!("{}", report.markdown());
    if ctx.smoke {
        println!("(smoke run: bench/ left as it is)");
    } else {
        let dir = crate::workspace_root().join("bench");
        report.write(&dir)?;
        println!("written: {}/results.md, results.json", dir.display());
    }
    if !want("soak") {
        return Ok(());
    }
    let soak = std::env::var("DRAIN_SOAK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ctx.pick(200_000, 2_000));
    drift_soak(bin, soak)
}

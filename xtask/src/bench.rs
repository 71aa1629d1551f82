//! `cargo xtask bench`: drain against what operators would use instead, every figure a
//! ratio measured side by side in one run; the report goes to stdout and, unless
//! `--smoke`, to `bench/results.md` and `bench/results.json` with the machine it ran on.
//!
//! One module per section: [`packet`] (per-packet cost, BPF_PROG_TEST_RUN), [`watch`]
//! (what `drain-user watch` costs a refused SYN), [`flood`] (SYN
//! flood absorbed per CPU vs iptables and nftables), [`stream`] (established throughput
//! through the gate), [`count`] (`status` vs `ss` at 1k–50k connections), [`detect`]
//! (noticing the end of a drain vs an `ss` loop), [`cli`] (`gate on`/`off` vs the iptables
//! rule pair), [`memory`] (peak RSS per command, the gate's kernel memory), [`soak`] (no
//! drift over many connections); [`report`] holds the tables, [`sys`] what they share.
//!
//! `--smoke` runs every section once at tiny sizes (seconds, for CI);
//! `DRAIN_BENCH_ONLY=flood,count` runs only the named sections.
//!
//! Shared machines are noisy: each figure is the median of several interleaved rounds,
//! and only ratios within this run mean anything.

mod cli;
mod count;
mod detect;
mod flood;
mod memory;
mod packet;
mod report;
mod soak;
mod stream;
mod sys;
mod watch;

pub use count::hold;
pub use sys::{isolate, Ctx};

use std::time::Instant;

use anyhow::{Context, Result};

pub fn run(ctx: &Ctx) -> Result<()> {
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
    for id in [
        "packet", "watch", "flood", "stream", "count", "detect", "cli", "memory", "soak",
    ] {
        if !want(id) {
            continue;
        }
        let t0 = Instant::now();
        let s = match id {
            "packet" => packet::section(ctx),
            "watch" => watch::section(ctx),
            "flood" => flood::section(ctx),
            "stream" => stream::section(ctx),
            "count" => count::section(ctx).map(|(s, m)| {
                memlock = m;
                s
            }),
            "detect" => detect::section(ctx),
            "cli" => cli::section(ctx),
            "memory" => memory::section(ctx, &memlock),
            _ => soak::section(ctx),
        }
        .with_context(|| format!("bench section {id}"))?;
        timed(id, t0);
        println!("{}", s.markdown_string());
        report.sections.push(s);
    }
    println!("{}", report.markdown());
    if ctx.smoke || only.is_some() {
        println!("(smoke or partial run: bench/ left as it is)");
    } else {
        let dir = crate::workspace_root().join("bench");
        report.write(&dir)?;
        println!("written: {}/results.md, results.json", dir.display());
    }
    Ok(())
}

//! Section 1b: what `drain-user watch` costs a refused SYN (BPF_PROG_TEST_RUN): nobody
//! watching, a watcher with the default sampling (a flood is held back), and every refusal
//! written to the ring buffer, each next to a trivial program in the same rounds.

use std::{net::Ipv4Addr, os::fd::AsFd};

use anyhow::{Context, Result};
use aya::maps::{Array, PerCpuArray, PerCpuValues, RingBuf};
use drain_common::{map, prog, GateConfig, PortStats, WatchConfig, WatchCpu, GATE_ON, POLICY_DROP};
use drain_tests::{
    frames::{Ipv4, Packet, Tcp},
    object::Loaded,
    testrun::{load_xdp_pass, mean_ns},
};
use serde_json::json;

use super::{report::Section, sys::Ctx};

fn median(mut v: Vec<u32>) -> u32 {
    v.sort_unstable();
    v[v.len() / 2]
}

pub fn section(ctx: &Ctx) -> Result<Section> {
    let repeat: u32 = ctx.pick(1_000_000, 20_000);
    let rounds: usize = ctx.pick(7, 1);
    const BATCH: u32 = 4_000;
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
    let (interval, burst) = drain_user::limits::limiter(100, n as u32);
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
    for _ in 0..rounds {
        base.push(mean_ns(baseline.as_fd(), &syn, repeat)?);
        for (i, (_, cfg)) in watchers.iter().enumerate() {
            Array::<_, WatchConfig>::try_from(obj.bpf.map_mut(map::WATCH).unwrap())?
                .set(0, cfg, 0)?;
            if cfg.interval_ns != 0 || cfg.until_ns == 0 {
                ns[i].push(mean_ns(xdp.as_fd(), &syn, repeat)?);
                continue;
            }
            for _ in 0..(repeat / BATCH / 10).max(1) {
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
    let mut s = Section::new(
        "watch",
        "1b. What `watch` costs a refused SYN",
        format!(
            "BPF_PROG_TEST_RUN of an IPv4 SYN to a gated port (policy drop), {repeat} runs × \
             {rounds} interleaved rounds, median ns per run, next to `return XDP_PASS` \
             ({b} ns) in the same rounds; the every-event row runs in {BATCH}-run batches, \
             draining the ring between them."
        ),
    );
    s.columns(&["watcher", "ns", "above base"]);
    let mut data = Vec::new();
    for (i, (name, _)) in watchers.iter().enumerate() {
        let x = median(ns[i].clone());
        let above = i64::from(x) - i64::from(b);
        s.row(vec![name.to_string(), x.to_string(), format!("{above:+}")]);
        data.push(json!({"watcher": name, "ns": x, "above_baseline_ns": above}));
    }
    s.note(format!(
        "Events lost to a full ring: {lost}. While nobody watches the refusal pays one \
         inlined array load and a call; with a watcher, the clock and the event limiter."
    ));
    s.data = json!({"baseline_ns": b, "rows": data, "lost": lost});
    Ok(s)
}

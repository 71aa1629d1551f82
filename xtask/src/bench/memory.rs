//! Section 7: memory. drain-user's peak RSS per command (ru_maxrss of the child), and the
//! kernel memory of one gate: the `memlock:` line of each map's fdinfo, which for a hash
//! map without preallocation counts the elements it holds (htab_map_mem_usage), so it
//! grows with the live connections (sizes held by section 4).

use std::{
    net::{SocketAddr, TcpStream},
    os::fd::{AsFd, AsRawFd},
    time::Duration,
};

use anyhow::{Context, Result};
use aya::maps::MapData;
use drain_tests::{netns::NetNsPair, traffic::bind};
use serde_json::json;

use super::{
    count::MemlockBySize,
    report::{f, Section},
    sys::{timed, timed_any, Ctx},
};

/// memlock bytes of every map the gate of namespace `a` has pinned, by map name.
pub fn gate_memlock(pair: &NetNsPair) -> Result<Vec<(String, u64)>> {
    let dir = pair.state_dir(&pair.a);
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("DRAIN_") {
            continue;
        }
        let map = MapData::from_pin(e.path()).with_context(|| format!("opening {name}"))?;
        let fd = map.fd().as_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
        let bytes = info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no memlock line for {name}"))?;
        out.push((name, bytes));
    }
    out.sort();
    Ok(out)
}

pub fn section(ctx: &Ctx, by_size: &MemlockBySize) -> Result<Section> {
    let runs = ctx.pick(3, 1);
    let mut s = Section::new(
        "memory",
        "7. Memory",
        format!(
            "Peak RSS of each drain-user command (ru_maxrss of the child from wait4, the most \
             of {runs} runs), in a namespace pair with one connection held open on the gated \
             port; and the kernel memory of one gate, from the `memlock:` line of each pinned \
             map's fdinfo, at the live-connection counts section 4 held."
        ),
    );
    let pair = NetNsPair::new();
    let to = SocketAddr::new(pair.a_v4.into(), 8080);
    let listener = bind(&pair, &pair.a, to);
    let client = pair.in_ns(&pair.b, || TcpStream::connect(to))?;
    let (server, _) = listener.accept()?;
    let peak = |args: &[&str], want_ok: bool| -> Result<u64> {
        let mut most = 0;
        for _ in 0..runs {
            let mut c = ctx.drain(&pair.a)?;
            c.args(args);
            let t = if want_ok {
                timed(&mut c)?
            } else {
                timed_any(&mut c)?
            };
            most = most.max(t.maxrss_kib);
        }
        Ok(most)
    };
    let allow = format!("{}/32", pair.b_v4);
    let on = [
        "gate", "on", "--port", "8080", "--ttl", "10m", "--allow", &allow,
    ];
    let mut rss = Vec::new();
    rss.push(("drain-user --version", peak(&["--version"], true)?));
    // Each first `gate on` makes a new gate: off in between.
    let mut most = 0;
    for _ in 0..runs {
        let mut c = ctx.drain(&pair.a)?;
        most = most.max(timed(c.args(on))?.maxrss_kib);
        timed(ctx.drain(&pair.a)?.args(["gate", "off"]))?;
    }
    rss.push(("gate on (new gate)", most));
    timed(ctx.drain(&pair.a)?.args(on))?;
    rss.push(("gate on (gate already on)", peak(&on, true)?));
    rss.push(("status --json", peak(&["status", "--json"], true)?));
    // One live connection: wait runs its loop until the timeout (exit 3).
    rss.push((
        "wait --timeout 1s (1 connection left)",
        peak(&["wait", "--timeout", "1s", "--json"], false)?,
    ));
    drop((client, server));
    std::thread::sleep(Duration::from_millis(50));
    rss.push(("wait (drained at once)", peak(&["wait", "--json"], true)?));
    let mut most = 0;
    for _ in 0..runs {
        most = most.max(timed(ctx.drain(&pair.a)?.args(["gate", "off"]))?.maxrss_kib);
        timed(ctx.drain(&pair.a)?.args(on))?;
    }
    timed(ctx.drain(&pair.a)?.args(["gate", "off"]))?;
    rss.push(("gate off", most));

    s.columns(&["what", "value"]);
    for (what, kib) in &rss {
        s.row(vec![
            format!("peak RSS: `{what}`"),
            format!("{} MiB", f(*kib as f64 / 1024.0, 1)),
        ]);
    }
    let total = |maps: &[(String, u64)]| maps.iter().map(|(_, b)| b).sum::<u64>();
    for (n, maps) in by_size {
        let conns = maps
            .iter()
            .filter(|(m, _)| m == drain_common::map::SOCKS)
            .map(|(_, b)| *b)
            .sum::<u64>();
        s.row(vec![
            format!("kernel memory of the gate, {n} live connections"),
            format!(
                "{} KiB in all ({} KiB of it the connection set {})",
                f(total(maps) as f64 / 1024.0, 0),
                f(conns as f64 / 1024.0, 0),
                drain_common::map::SOCKS
            ),
        ]);
    }
    if let (Some((n0, m0)), Some((n1, m1))) = (by_size.first(), by_size.last()) {
        if n1 > n0 {
            let per = (total(m1) as f64 - total(m0) as f64) / (*n1 - *n0) as f64;
            s.note(format!(
                "Growth: {} bytes per live connection ({n0} → {n1}).",
                f(per, 0)
            ));
        }
        s.note(format!(
            "By map at {n1} connections: {}.",
            m1.iter()
                .map(|(m, b)| format!("{m} {} KiB", f(*b as f64 / 1024.0, 0)))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    s.data = json!({
        "peak_rss_kib": rss.iter().map(|(w, k)| json!({"command": w, "kib": k})).collect::<Vec<_>>(),
        "gate_memlock_bytes": by_size.iter().map(|(n, maps)| json!({
            "connections": n,
            "maps": maps.iter().map(|(m, b)| json!({"map": m, "bytes": b})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    Ok(s)
}

//! Section 6: how long `gate on` and `gate off` take, against inserting and deleting the
//! iptables + ip6tables rule pair that does the same job by hand.

use anyhow::{Context, Result};
use drain_tests::netns::NetNsPair;
use serde_json::json;

use super::{
    count::summarize_strace,
    report::{f, median, quantile, Section},
    sys::{ns_cmd, timed, Ctx},
};

/// The folk rule, for both families.
fn iptables_pair(ns: &str, op: &str) -> Result<f64> {
    let mut ms = 0.0;
    for bin in ["iptables", "ip6tables"] {
        let t = timed(
            ns_cmd(ns, bin)?
                .args([op, "INPUT", "-p", "tcp", "--syn"])
                .args(["-m", "multiport", "--dports", "80,443", "-j", "DROP"]),
        )?;
        ms += t.ms();
    }
    Ok(ms)
}

pub fn section(ctx: &Ctx) -> Result<Section> {
    let rounds = ctx.pick(11, 2);
    let on = ["gate", "on", "--port", "80,443", "--ttl", "10m"];
    let names = [
        "`gate on`, new gate (cold)",
        "`gate on`, gate already on (warm)",
        "`gate off`",
        "`gate on`, new gate, 2nd in the namespace",
        "`gate off`, 2nd",
        "iptables + ip6tables `-I` (first rules in the namespace)",
        "iptables + ip6tables `-D`",
        "iptables + ip6tables `-I` (again)",
        "iptables + ip6tables `-D` (again)",
    ];
    let mut ms: Vec<Vec<f64>> = names.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        // A fresh namespace each round: nothing of drain's or iptables' exists in it yet.
        let pair = NetNsPair::new();
        let a = &pair.a;
        let mut run = |i: usize, args: &[&str]| -> Result<()> {
            ms[i].push(timed(ctx.drain(a)?.args(args))?.ms());
            Ok(())
        };
        run(0, &on)?;
        run(1, &on)?;
        run(2, &["gate", "off"])?;
        run(3, &on)?;
        run(4, &["gate", "off"])?;
        ms[5].push(iptables_pair(a, "-I")?);
        ms[6].push(iptables_pair(a, "-D")?);
        ms[7].push(iptables_pair(a, "-I")?);
        ms[8].push(iptables_pair(a, "-D")?);
    }
    // Where a cold `gate on` spends its time.
    let pair = NetNsPair::new();
    let out = format!("/tmp/drain-bench-strace-on-{}", std::process::id());
    let bin = ctx.bin.to_str().context("path")?;
    let traced = timed(
        ns_cmd(&pair.a, "strace")?
            .args(["-f", "-c", "-w", "-o", &out, bin])
            .args(on),
    )?;
    let _ = timed(ctx.drain(&pair.a)?.args(["gate", "off"]));
    let text = std::fs::read_to_string(&out)?;
    let _ = std::fs::remove_file(&out);
    drop(pair);

    let mut s = Section::new(
        "cli",
        "6. `gate on` / `gate off` wall time",
        format!(
            "Whole process, fork to exit, {rounds} rounds, each in a fresh namespace pair \
             (lo + one veth; `gate on --port 80,443 --ttl 10m` on both interfaces). The \
             iptables figures are the two commands an operator runs for the same job, \
             `iptables` and `ip6tables -I INPUT -p tcp --syn -m multiport --dports 80,443 -j \
             DROP`, summed."
        ),
    );
    s.columns(&["command", "median (ms)", "max (ms)"]);
    for (i, n) in names.iter().enumerate() {
        s.row(vec![
            n.to_string(),
            f(median(&ms[i]), 1),
            f(quantile(&ms[i], 1.0), 1),
        ]);
    }
    s.note(format!(
        "Where a cold `gate on` goes (`strace -f -c -w`; wall {} ms under strace): {}",
        f(traced.ms(), 0),
        summarize_strace(&text, 6)
    ));
    s.data = json!(names
        .iter()
        .zip(&ms)
        .map(|(n, v)| json!({"command": n, "ms": v}))
        .collect::<Vec<_>>());
    let (on_cold, on_warm, off) = (median(&ms[0]), median(&ms[1]), median(&ms[2]));
    s.target(
        "`gate on`, new gate",
        "≤ 50 ms",
        format!("{} ms", f(on_cold, 1)),
        on_cold <= 50.0,
    );
    s.target(
        "`gate on`, gate already on",
        "≤ 50 ms",
        format!("{} ms", f(on_warm, 1)),
        on_warm <= 50.0,
    );
    s.target(
        "`gate off`",
        "≤ 20 ms",
        format!("{} ms", f(off, 1)),
        off <= 20.0,
    );
    Ok(s)
}

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
    // The same, tracing only the calls that mark its phases (seccomp-filtered, so the
    // rest runs at full speed): a timeline.
    timed(
        ns_cmd(&pair.a, "strace")?
            .args([
                "-f",
                "--seccomp-bpf",
                "-ttt",
                "-e",
                "trace=execve,openat,bpf,exit_group",
            ])
            .args(["-o", &out, bin])
            .args(on),
    )?;
    let _ = timed(ctx.drain(&pair.a)?.args(["gate", "off"]));
    let timeline = phases(&std::fs::read_to_string(&out)?);
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
    s.note(format!(
        "Timeline of a cold `gate on` (`strace --seccomp-bpf -e trace=execve,openat,bpf`, \
         ms from exec): {timeline}"
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

/// The phases of a `gate on` from an `strace -ttt` of execve, openat and bpf: when the
/// kernel's BTF is opened (each open is followed by reading and parsing its ~5 MB), when
/// the 1M-entry connection set is created and how long that takes, when each program is
/// loaded (the verifier runs until the next call), and the exit.
fn phases(trace: &str) -> String {
    let mut t0 = None;
    let mut out = Vec::new();
    let mut lines = trace.lines().peekable();
    while let Some(l) = lines.next() {
        let mut w = l.split_whitespace();
        let (Some(_pid), Some(ts)) = (w.next(), w.next().and_then(|t| t.parse::<f64>().ok()))
        else {
            continue;
        };
        let start = *t0.get_or_insert(ts);
        let ms = (ts - start) * 1e3;
        let next_ms = lines
            .peek()
            .and_then(|n| n.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map(|n| (n - start) * 1e3);
        if l.contains("/sys/kernel/btf/vmlinux") {
            out.push(format!("{} vmlinux BTF opened", f(ms, 1)));
        } else if l.contains("BPF_MAP_CREATE") && l.contains("max_entries=1048576") {
            let took = next_ms.map_or(String::new(), |n| format!(" ({} ms)", f(n - ms, 1)));
            out.push(format!("{} connection set created{took}", f(ms, 1)));
        } else if l.contains("BPF_PROG_LOAD") && !l.contains("insn_cnt=2,") {
            if let Some(ty) = l.split("prog_type=BPF_PROG_TYPE_").nth(1) {
                let ty = ty.split(',').next().unwrap_or("");
                let took = next_ms.map_or(String::new(), |n| format!(" ({} ms)", f(n - ms, 1)));
                out.push(format!("{} {ty} program loaded{took}", f(ms, 1)));
            }
        } else if l.contains("exit_group") {
            out.push(format!("{} exit", f(ms, 1)));
        }
    }
    out.join("; ")
}

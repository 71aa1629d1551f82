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
/// Returns (wall, CPU) in ms, both commands summed.
fn iptables_pair(ns: &str, op: &str) -> Result<(f64, f64)> {
    let (mut ms, mut cpu) = (0.0, 0.0);
    for bin in ["iptables", "ip6tables"] {
        let t = timed(
            ns_cmd(ns, bin)?
                .args([op, "INPUT", "-p", "tcp", "--syn"])
                .args(["-m", "multiport", "--dports", "80,443", "-j", "DROP"]),
        )?;
        ms += t.ms();
        cpu += t.cpu_ms();
    }
    Ok((ms, cpu))
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
    let mut cpu: Vec<Vec<f64>> = names.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        // A fresh namespace each round: nothing of drain's or iptables' exists in it yet.
        let pair = NetNsPair::new();
        let a = &pair.a;
        let mut run = |i: usize, args: &[&str]| -> Result<()> {
            let t = timed(ctx.drain(a)?.args(args))?;
            ms[i].push(t.ms());
            cpu[i].push(t.cpu_ms());
            Ok(())
        };
        run(0, &on)?;
        run(1, &on)?;
        run(2, &["gate", "off"])?;
        run(3, &on)?;
        run(4, &["gate", "off"])?;
        for (i, op) in [(5, "-I"), (6, "-D"), (7, "-I"), (8, "-D")] {
            let (w, c) = iptables_pair(a, op)?;
            ms[i].push(w);
            cpu[i].push(c);
        }
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
    // rest runs at full speed): a timeline of each command.
    let timeline = |args: &[&str]| -> Result<String> {
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
                .args(args),
        )?;
        Ok(phases(&std::fs::read_to_string(&out)?))
    };
    let cold = timeline(&on)?;
    let warm = timeline(&on)?;
    let off_line = timeline(&["gate", "off"])?;
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
             DROP`, summed. The CPU column (getrusage of the child) is what the command itself \
             ran, which other tenants of a shared machine barely change; the wall time also \
             holds the waits for the CPU and for the kernel (RCU grace periods when links \
             attach and detach)."
        ),
    );
    s.columns(&[
        "command",
        "median (ms)",
        "max (ms)",
        "CPU, user + sys (median ms)",
    ]);
    for (i, n) in names.iter().enumerate() {
        s.row(vec![
            n.to_string(),
            f(median(&ms[i]), 1),
            f(quantile(&ms[i], 1.0), 1),
            f(median(&cpu[i]), 1),
        ]);
    }
    s.note(format!(
        "Where a cold `gate on` goes (`strace -f -c -w`; wall {} ms under strace): {}",
        f(traced.ms(), 0),
        summarize_strace(&text, 6)
    ));
    s.note(format!(
        "Timeline of a cold `gate on` (`strace --seccomp-bpf -e trace=execve,openat,bpf`, \
         ms from exec; strace adds its own stops): {cold}"
    ));
    s.note(format!(
        "Timeline of `gate on` over the gate already on (nothing to load): {warm}"
    ));
    s.note(format!("Timeline of `gate off`: {off_line}"));
    // A host's cycle: what drain adds to it, next to the rule pair's.
    let cycle = |m: &[Vec<f64>], a: usize, b: usize| {
        let v: Vec<f64> = m[a].iter().zip(&m[b]).map(|(x, y)| x + y).collect();
        median(&v)
    };
    let (drain_cycle, ipt_cycle) = (cycle(&ms, 0, 2), cycle(&ms, 5, 6));
    s.note(format!(
        "One host's cycle, whole commands (median of the per-round sums): `gate on` (new \
         gate) + `gate off` {} ms wall, {} ms CPU; iptables + ip6tables `-I` + `-D` {} ms \
         wall, {} ms CPU.",
        f(drain_cycle, 1),
        f(cycle(&cpu, 0, 2), 1),
        f(ipt_cycle, 1),
        f(cycle(&cpu, 5, 6), 1)
    ));
    s.data = json!(names
        .iter()
        .zip(ms.iter().zip(&cpu))
        .map(|(n, (v, c))| json!({"command": n, "ms": v, "cpu_ms": c}))
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
        "≤ 20 ms",
        format!("{} ms", f(on_warm, 1)),
        on_warm <= 20.0,
    );
    s.target(
        "`gate off`",
        "≤ 10 ms",
        format!("{} ms", f(off, 1)),
        off <= 10.0,
    );
    s.target(
        "a host's cycle: `gate on` (new gate) + `gate off`",
        "≤ 60 ms",
        format!(
            "{} ms (iptables + ip6tables `-I` + `-D`: {} ms)",
            f(drain_cycle, 1),
            f(ipt_cycle, 1)
        ),
        drain_cycle <= 60.0,
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
        } else if l.contains("BPF_LINK_CREATE") {
            out.push(format!("{} link created", f(ms, 1)));
        } else if l.contains("BPF_OBJ_GET") && l.contains("DRAIN_CONFIG") {
            out.push(format!("{} gate's maps opened", f(ms, 1)));
        } else if l.contains("exit_group") {
            out.push(format!("{} exit", f(ms, 1)));
        }
    }
    out.join("; ")
}

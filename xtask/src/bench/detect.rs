//! Section 5: how soon the end of a drain is noticed. `drain-user wait` against the folk
//! loop that polls `ss` once a second, both watching the same connections close; and what
//! `wait` costs while it waits.

use std::{
    io::{BufRead, BufReader, Read},
    net::{SocketAddr, TcpStream},
    process::{Child, ChildStdout, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use drain_tests::{netns::NetNsPair, traffic::bind};
use serde_json::json;

use super::{
    report::{f, median, quantile, Section},
    sys::{cpu_ns, ns_cmd, Ctx},
};

const PORT: u16 = 8080;
const CONNS: usize = 20;

/// Holds `CONNS` connections to PORT, both ends.
fn open(pair: &NetNsPair, listener: &std::net::TcpListener) -> Result<Vec<TcpStream>> {
    let to = SocketAddr::new(pair.a_v4.into(), PORT);
    let clients = pair.in_ns(&pair.b, || {
        (0..CONNS)
            .map(|_| TcpStream::connect(to))
            .collect::<std::io::Result<Vec<_>>>()
    })?;
    let mut all = clients;
    for _ in 0..CONNS {
        all.push(listener.accept()?.0);
    }
    Ok(all)
}

/// A thread that waits for `child` to exit and returns the moment it did.
fn exit_time(mut child: Child) -> thread::JoinHandle<Result<(Instant, String)>> {
    thread::spawn(move || {
        let mut out = String::new();
        if let Some(mut o) = child.stdout.take() {
            o.read_to_string(&mut out)?;
        }
        child.wait()?;
        Ok((Instant::now(), out))
    })
}

/// CPU nanoseconds every thread of process `pid` has run (schedstat, exact).
fn process_cpu_ns(pid: u32) -> Result<u64> {
    let mut sum = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        sum += cpu_ns(&format!("{pid}/task/{}", t.file_name().to_string_lossy())).unwrap_or(0);
    }
    Ok(sum)
}

/// Starts `wait --json` in namespace `a` and returns once its first progress line says it
/// is in its loop; the rest of its stdout is left to read.
fn start_wait(ctx: &Ctx, pair: &NetNsPair) -> Result<(Child, BufReader<ChildStdout>)> {
    let mut wait = ctx
        .drain(&pair.a)?
        .args(["wait", "--json", "--timeout", "60s"])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = BufReader::new(wait.stdout.take().context("wait stdout")?);
    let mut first = String::new();
    out.read_line(&mut first)?;
    if !first.contains("progress") {
        bail!("wait printed {first:?} first, not a progress event");
    }
    Ok((wait, out))
}

pub fn section(ctx: &Ctx) -> Result<Section> {
    let rounds = ctx.pick(21, 3);
    let pair = NetNsPair::new();
    let listener = bind(&pair, &pair.a, SocketAddr::new(pair.a_v4.into(), PORT));
    let allow = format!("{}/32", pair.b_v4);
    let gate = ctx.gate_on(
        &pair.a,
        &["--port", "8080", "--ttl", "30m", "--allow", &allow],
    )?;
    let ss_loop = format!(
        "while [ -n \"$(ss -Htn state established state close-wait '( sport = :{PORT} )')\" ]; \
         do sleep 1; done"
    );
    let (mut wait_ms, mut line_ms, mut ss_ms) = (Vec::new(), Vec::new(), Vec::new());
    // From the last close's return (the last count change) rather than the first close.
    let (mut last_wait_ms, mut last_line_ms) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let conns = open(&pair, &listener)?;
        let (wait, mut out) = start_wait(ctx, &pair)?;
        // When the "drained" line arrives: the detection itself, before the process exits.
        let rest = thread::spawn(move || {
            let (mut s, mut line, mut at) = (String::new(), String::new(), None);
            while out.read_line(&mut line).unwrap_or(0) > 0 {
                if line.contains("\"drained\"") {
                    at = Some(Instant::now());
                }
                s.push_str(&line);
                line.clear();
            }
            (s, at)
        });
        let ss = ns_cmd(&pair.a, "sh")?.args(["-c", &ss_loop]).spawn()?;
        // The loop's phase is random in real life: stagger it across rounds.
        thread::sleep(Duration::from_millis(200 + (round as u64 * 373) % 1000));
        let (w, s) = (exit_time(wait), exit_time(ss));
        let t0 = Instant::now();
        drop(conns);
        let t_last = Instant::now();
        let (tw, _) = w.join().map_err(|_| anyhow::anyhow!("wait thread"))??;
        let (ts, _) = s.join().map_err(|_| anyhow::anyhow!("ss thread"))??;
        let (said, at) = rest.join().unwrap_or_default();
        let Some(at) = at else {
            bail!("wait did not report drained: {said}");
        };
        line_ms.push((at - t0).as_secs_f64() * 1e3);
        wait_ms.push((tw - t0).as_secs_f64() * 1e3);
        last_line_ms.push(at.saturating_duration_since(t_last).as_secs_f64() * 1e3);
        last_wait_ms.push(tw.saturating_duration_since(t_last).as_secs_f64() * 1e3);
        ss_ms.push((ts - t0).as_secs_f64() * 1e3);
    }

    // What wait costs while it waits: one connection held for a window.
    let window = ctx.pick(Duration::from_secs(3), Duration::from_millis(500));
    let conns = open(&pair, &listener)?;
    let (mut wait, out) = start_wait(ctx, &pair)?;
    let pid = wait.id();
    // Past its start: the first loop's TTL renewal and interface listing run just after
    // the first line.
    thread::sleep(Duration::from_millis(200));
    let c0 = process_cpu_ns(pid)?;
    let t0 = Instant::now();
    thread::sleep(window);
    let c1 = process_cpu_ns(pid)?;
    let cpu_per_s = (c1 - c0) as f64 / 1e9 / t0.elapsed().as_secs_f64();
    let utime_stime = super::sys::process_cpu_s(pid)?;
    drop(conns);
    drop(out);
    let done = wait.wait()?;
    if !done.success() {
        bail!("wait exited with {done}");
    }
    gate.off()?;

    let mut s = Section::new(
        "detect",
        "5. Noticing the end of a drain",
        format!(
            "{CONNS} connections closed at once (both ends, 2×{CONNS} close calls); the time \
             from the first close to the exit of `drain-user wait` and of the folk loop `while [ -n \"$(ss ...)\" ]; do sleep 1; \
             done` watching the same port (each watcher's exit seen by a thread blocked in \
             waitpid). {rounds} rounds; the loop's phase is staggered across rounds, as in \
             real life."
        ),
    );
    s.columns(&[
        "watcher",
        "median (ms)",
        "p99 (ms)",
        "max (ms)",
        "CPU while waiting",
    ]);
    s.row(vec![
        "`drain-user wait`".into(),
        f(median(&wait_ms), 2),
        f(quantile(&wait_ms, 0.99), 2),
        f(quantile(&wait_ms, 1.0), 2),
        format!(
            "{} ms per s ({} s utime+stime over the whole run)",
            f(cpu_per_s * 1e3, 2),
            f(utime_stime, 2)
        ),
    ]);
    s.row(vec![
        "`drain-user wait`: its `drained` line read".into(),
        f(median(&line_ms), 2),
        f(quantile(&line_ms, 0.99), 2),
        f(quantile(&line_ms, 1.0), 2),
        "".into(),
    ]);
    s.row(vec![
        "`drain-user wait`, from the last close".into(),
        f(median(&last_wait_ms), 2),
        f(quantile(&last_wait_ms, 0.99), 2),
        f(quantile(&last_wait_ms, 1.0), 2),
        "".into(),
    ]);
    s.row(vec![
        "`drain-user wait`: its `drained` line read, from the last close".into(),
        f(median(&last_line_ms), 2),
        f(quantile(&last_line_ms, 0.99), 2),
        f(quantile(&last_line_ms, 1.0), 2),
        "".into(),
    ]);
    s.row(vec![
        "`ss` every 1 s".into(),
        f(median(&ss_ms), 1),
        f(quantile(&ss_ms, 0.99), 1),
        f(quantile(&ss_ms, 1.0), 1),
        "one `ss` run per second".into(),
    ]);
    s.note(format!(
        "CPU while waiting: every thread of one `wait` process, from /proc/PID/task/*/schedstat \
         (exact runtimes), over {:.1} s with one connection open. `wait` sleeps until the \
         tracker wakes it (a ring buffer written when a waited port's count changes), with a \
         1 s safety poll; over a gate it runs once a second anyway to renew the gate's TTL. \
         \"From the last close\": from the return of the last of the close calls, when the \
         count has reached 0.",
        window.as_secs_f64()
    ));
    s.data = json!({
        "wait_exit_ms": wait_ms,
        "wait_drained_line_ms": line_ms,
        "wait_exit_after_last_close_ms": last_wait_ms,
        "wait_drained_line_after_last_close_ms": last_line_ms,
        "ss_loop_ms": ss_ms,
        "wait_cpu_s_per_s": cpu_per_s,
    });
    let p99 = quantile(&last_wait_ms, 0.99);
    s.target(
        "drain noticed, p99 (last close to wait's exit)",
        "≤ 1 ms",
        format!(
            "{} ms (median {} ms, max {} ms; from the first close: median {} ms, p99 {} ms; \
             ss loop median {} ms)",
            f(p99, 2),
            f(median(&last_wait_ms), 2),
            f(quantile(&last_wait_ms, 1.0), 2),
            f(median(&wait_ms), 2),
            f(quantile(&wait_ms, 0.99), 2),
            f(median(&ss_ms), 0)
        ),
        p99 <= 1.0,
    );
    s.target(
        "`wait`'s CPU while nothing changes (one connection open)",
        "≤ 0.5 ms per s",
        format!("{} ms per s", f(cpu_per_s * 1e3, 3)),
        cpu_per_s * 1e3 <= 0.5,
    );
    Ok(s)
}

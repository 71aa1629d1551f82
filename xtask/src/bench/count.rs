//! Section 4: counting live connections at scale, `drain-user status --json` against
//! `ss | wc -l`, with the kernel memory of the gate at each size (section 7 reports it).
//!
//! A process may hold at most 20,000 descriptors here, so the connections are held by
//! helper processes (`cargo xtask` re-run as `bench-hold`, one per 15,000 connections)
//! that connect from the peer namespace and keep the sockets until their stdin closes. The
//! server side is one listener that never accepts: an accepted-queue connection is
//! ESTABLISHED (ss lists it, drain counts it) and costs no descriptor.

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use drain_tests::{netns::NetNsPair, traffic::bind};
use serde_json::{json, Value};

use super::{
    memory::gate_memlock,
    report::{f, median, quantile, Section},
    sys::{sh, timed, Ctx, Gate},
};

const PORT: u16 = 8080;
/// A static binary every Debian system has, run with `--version`: the cost of starting and
/// ending any process here.
const STATIC_BIN: &str = "/sbin/ldconfig";

/// One size's medians, ms.
#[derive(Clone, Copy)]
struct Row {
    n: usize,
    status: f64,
    ss: f64,
    /// `drain-user --version`.
    floor: f64,
    /// [`STATIC_BIN`] `--version`.
    start: f64,
    /// status − `drain-user --version`, run by run.
    above: f64,
    /// Fastest status and ss runs: the noise of a shared machine only ever adds.
    status_min: f64,
    ss_min: f64,
}
/// Connections per holder process (under the 20,000-descriptor limit).
const PER_HOLDER: usize = 15_000;

/// `cargo xtask bench-hold`: connects `count` times from namespace `ns` to `to` (from
/// `from` when given), prints `ready`, and holds every connection until stdin closes.
pub fn hold(ns: &str, to: SocketAddr, count: usize, from: Option<Ipv4Addr>) -> Result<()> {
    drain_tests::netns::enter_netns(ns);
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let c = match from {
            None => TcpStream::connect_timeout(&to, Duration::from_secs(10)),
            Some(ip) => connect_from(ip, to),
        };
        held.push(c.with_context(|| format!("connection {i} of {count} to {to}"))?);
    }
    println!("ready");
    std::io::stdout().flush()?;
    let mut line = String::new();
    while std::io::stdin().read_line(&mut line)? > 0 {}
    Ok(())
}

/// A connection from `from` (port chosen by the kernel) to `to`, an IPv4 address.
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(to) = to else {
        return Err(std::io::Error::other("IPv4 only"));
    };
    let sin = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a new socket, owned by the TcpStream from here on (closed by it on the error
    // paths too); the addresses are valid sockaddr_in of the length given.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let s = TcpStream::from_raw_fd(fd);
        let (a, b) = (sin(from, 0), sin(*to.ip(), to.port()));
        if libc::bind(fd, std::ptr::from_ref(&a).cast(), len) != 0
            || libc::connect(fd, std::ptr::from_ref(&b).cast(), len) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(s)
    }
}

/// Holder processes; dropping them closes their stdin, and they exit.
struct Holders(Vec<Child>);

impl Holders {
    /// Adds holders until `total` connections are held in all; holder i connects to
    /// `targets[i % targets.len()]` (at most four holders' worth each, under the 65535 of
    /// one accept queue), from `sources[i]` when there are sources (the kernel picks a
    /// connection's port by walking the ports its source address already uses, which
    /// turns slow past ~50,000 on one address).
    fn grow(
        &mut self,
        ns: &str,
        targets: &[SocketAddr],
        sources: &[Ipv4Addr],
        mut have: usize,
        total: usize,
    ) -> Result<()> {
        let exe = std::env::current_exe()?;
        let mut started = Vec::new();
        while have < total {
            let i = self.0.len();
            let to = targets[i % targets.len()];
            let n = (total - have).min(PER_HOLDER);
            let mut cmd = Command::new(&exe);
            cmd.args(["bench-hold", "--ns", ns, "--to", &to.to_string()]);
            if let Some(from) = sources.get(i) {
                cmd.args(["--from", &from.to_string()]);
            }
            let child = cmd
                .args(["--count", &n.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("starting a bench-hold process")?;
            started.push(self.0.len());
            self.0.push(child);
            have += n;
        }
        for i in started {
            let out = self.0[i].stdout.take().context("holder stdout")?;
            let mut line = String::new();
            BufReader::new(out).read_line(&mut line)?;
            if line.trim() != "ready" {
                bail!("a bench-hold process failed (see its error above)");
            }
        }
        Ok(())
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        for c in &mut self.0 {
            drop(c.stdin.take());
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

/// Live connections `status --json` reports for PORT.
fn status_live(v: &Value) -> Option<i64> {
    v["ports"].as_array()?.iter().find(|p| p["port"] == PORT)?["live_connections"].as_i64()
}

/// What section 7 needs from the connections held here: (live connections, gate memlock
/// bytes by map).
pub type MemlockBySize = Vec<(usize, Vec<(String, u64)>)>;

pub fn section(ctx: &Ctx) -> Result<(Section, MemlockBySize)> {
    let sizes: Vec<usize> = ctx.pick(vec![0, 1_000, 10_000, 50_000, 200_000], vec![0, 200]);
    let reps = ctx.pick(21, 3);
    let pair = NetNsPair::new();
    sh(
        &pair.b,
        "sysctl -qw net.ipv4.ip_local_port_range='1024 65000'",
    )?;
    sh(
        &pair.a,
        "sysctl -qw net.core.somaxconn=65535 net.ipv4.tcp_max_syn_backlog=65535",
    )?;
    // One client address and one server address leave ~64k source ports, and one
    // listener's accept queue holds at most 65535: past 50,000 connections the server has
    // more addresses (198.19.254.1-3, which exist only in these namespaces), each with its
    // own listener on the same port, and the holders spread over them.
    let mut targets = vec![SocketAddr::new(pair.a_v4.into(), PORT)];
    let mut sources = Vec::new();
    if sizes.iter().any(|&n| n > 50_000) {
        // And each holder its own client address (198.19.253.x, the same way).
        let holders = sizes.iter().max().unwrap_or(&0).div_ceil(PER_HOLDER) + sizes.len();
        for i in 1..=holders as u8 {
            sh(
                &pair.b,
                &format!("ip addr add 198.19.253.{i}/32 dev {}", pair.veth_b),
            )?;
            sources.push(Ipv4Addr::new(198, 19, 253, i));
        }
        sh(
            &pair.a,
            &format!("ip route add 198.19.253.0/24 dev {}", pair.veth_a),
        )?;
        for i in 1..=3 {
            sh(
                &pair.a,
                &format!("ip addr add 198.19.254.{i}/32 dev {}", pair.veth_a),
            )?;
            targets.push(SocketAddr::new([198, 19, 254, i].into(), PORT));
        }
        sh(
            &pair.b,
            &format!("ip route add 198.19.254.0/29 dev {}", pair.veth_b),
        )?;
    }
    let mut listeners: Vec<TcpListener> = Vec::new();
    for &to in &targets {
        let listener = bind(&pair, &pair.a, to);
        // A second listen() only raises the backlog (inet_listen on a listening socket).
        // SAFETY: listen on a socket fd we own.
        if unsafe { libc::listen(listener.as_raw_fd(), 65535) } != 0 {
            bail!("listen: {}", std::io::Error::last_os_error());
        }
        listeners.push(listener);
    }
    // The holders' own addresses too: the connections are made with the gate on.
    let mut allow = format!("{}/32", pair.b_v4);
    if !sources.is_empty() {
        allow.push_str(",198.19.253.0/24");
    }
    let p = PORT.to_string();
    let gate: Gate = ctx.gate_on(&pair.a, &["--port", &p, "--ttl", "30m", "--allow", &allow])?;
    let ss_script = format!("ss -Htn state established '( sport = :{PORT} )' | wc -l");
    let mut holders = Holders(Vec::new());
    let mut rows = Vec::new();
    let mut memlock = Vec::new();
    let mut have = 0;
    for &n in &sizes {
        holders.grow(&pair.b, &targets, &sources, have, n)?;
        have = n;
        // Connections complete in the kernel a moment after connect() returns on the client.
        let t0 = Instant::now();
        loop {
            let st: Value = serde_json::from_str(
                &timed(ctx.drain(&pair.a)?.args(["status", "--json"]))?.stdout,
            )?;
            if status_live(&st) == Some(n as i64) {
                break;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!(
                    "status counts {:?} live connections, {n} expected",
                    status_live(&st)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let (mut status_ms, mut ss_ms) = (vec![], vec![]);
        let (mut floor_ms, mut static_ms) = (vec![], vec![]);
        for _ in 0..reps {
            let st = timed(ctx.drain(&pair.a)?.args(["status", "--json"]))?;
            let live = status_live(&serde_json::from_str(&st.stdout)?);
            if live != Some(n as i64) {
                bail!("status says {live:?} live connections, {n} are held");
            }
            status_ms.push(st.ms());
            let ss = timed(super::sys::ns_cmd(&pair.a, "sh")?.args(["-c", &ss_script]))?;
            if ss.stdout.trim() != n.to_string() {
                bail!("ss counts {} connections, {n} are held", ss.stdout.trim());
            }
            ss_ms.push(ss.ms());
            floor_ms.push(timed(ctx.drain(&pair.a)?.arg("--version"))?.ms());
            static_ms.push(timed(Command::new(STATIC_BIN).arg("--version"))?.ms());
        }
        memlock.push((n, gate_memlock(&pair)?));
        let above: Vec<f64> = status_ms
            .iter()
            .zip(&floor_ms)
            .map(|(s, f)| s - f)
            .collect();
        rows.push(Row {
            n,
            status: median(&status_ms),
            ss: median(&ss_ms),
            floor: median(&floor_ms),
            start: median(&static_ms),
            above: median(&above),
            status_min: quantile(&status_ms, 0.0),
            ss_min: quantile(&ss_ms, 0.0),
        });
    }
    let breakdown = strace_breakdown(ctx, &pair)?;
    drop(holders);
    drop(listeners);
    gate.off()?;

    let mut s = Section::new(
        "count",
        "4. Counting live connections at scale",
        format!(
            "Connections held from the peer namespace to one port (accept queue, never \
             accepted), counted by `drain-user status --json` and by `{ss_script}`, each run \
             as a whole process from the bench (fork to exit), {reps} interleaved runs per \
             size, median. Both counts are checked against the number held. Two floors, run in \
             the same rounds: `drain-user --version` (the same binary starting and exiting) \
             and `{STATIC_BIN} --version` (a static binary: any process's start and exit)."
        ),
    );
    s.columns(&[
        "live connections",
        "status (ms)",
        "ss | wc -l (ms)",
        "fastest status / ss (ms)",
        "ss / status",
        "drain-user --version (ms)",
        "status above --version (ms)",
        "static binary start (ms)",
    ]);
    for r in &rows {
        s.row(vec![
            r.n.to_string(),
            f(r.status, 2),
            f(r.ss, 2),
            format!("{} / {}", f(r.status_min, 2), f(r.ss_min, 2)),
            format!("{}×", f(r.ss / r.status, 1)),
            f(r.floor, 2),
            f(r.above, 2),
            f(r.start, 2),
        ]);
    }
    s.note(format!(
        "Where status's time goes (`strace -f -c -w` of one run at {} connections; strace \
         slows every syscall, so read the shares, not the sum): {breakdown}",
        rows.last().map_or(0, |r| r.n)
    ));
    s.data = json!(rows
        .iter()
        .map(|r| json!({
            "connections": r.n, "status_ms": r.status, "ss_ms": r.ss,
            "drain_user_version_ms": r.floor, "status_above_version_ms": r.above,
            "static_binary_ms": r.start,
            "status_min_ms": r.status_min, "ss_min_ms": r.ss_min,
        }))
        .collect::<Vec<_>>());
    // The targets are at 50,000 (the size); the rows go on to 200,000.
    let first = rows[0];
    let last = rows
        .iter()
        .rev()
        .find(|r| r.n <= 50_000)
        .copied()
        .unwrap_or(rows[rows.len() - 1]);
    s.target(
        format!("status whole-process at {} connections", last.n),
        "≤ 2 ms",
        format!(
            "{} ms ({} ms above `drain-user --version`)",
            f(last.status, 2),
            f(last.above, 2)
        ),
        last.status <= 2.0,
    );
    s.target(
        format!("status flat from {} to {} connections", first.n, last.n),
        "flat",
        format!(
            "{} → {} ms; above `--version`: {} → {} ms",
            f(first.status, 2),
            f(last.status, 2),
            f(first.above, 2),
            f(last.above, 2)
        ),
        last.above <= first.above * 1.5 + 0.3,
    );
    s.target(
        format!("status vs ss at {} connections", last.n),
        "≥ 90×",
        format!("{}×", f(last.ss / last.status, 1)),
        last.ss / last.status >= 90.0,
    );
    Ok((s, memlock))
}

/// The syscalls `status --json` spends its time in, from `strace -f -c -w`: the top ones
/// with their share of the syscall time, and the process's wall time under strace.
fn strace_breakdown(ctx: &Ctx, pair: &NetNsPair) -> Result<String> {
    let out = format!("/tmp/drain-bench-strace-{}", std::process::id());
    let bin = ctx.bin.to_str().context("path")?;
    let t = timed(
        super::sys::ns_cmd(&pair.a, "strace")?
            .args(["-f", "-c", "-w", "-o", &out, bin, "status", "--json"]),
    )?;
    let text = std::fs::read_to_string(&out)?;
    let _ = std::fs::remove_file(&out);
    Ok(format!(
        "{} (wall {} ms under strace)",
        summarize_strace(&text, 6),
        f(t.ms(), 1)
    ))
}

/// "name share% (calls)" for the `top` syscalls of an `strace -c` table.
pub fn summarize_strace(text: &str, top: usize) -> String {
    let mut rows: Vec<(f64, String, u64)> = text
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            // % time, seconds, usecs/call, calls, [errors], syscall
            let pct: f64 = w.first()?.parse().ok()?;
            let calls: u64 = w.get(3)?.parse().ok()?;
            let name = w.last()?.to_string();
            (name != "total").then_some((pct, name, calls))
        })
        .collect();
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    rows.iter()
        .take(top)
        .map(|(p, n, c)| format!("{n} {}% ({c} calls)", f(*p, 0)))
        .collect::<Vec<_>>()
        .join(", ")
}

//! Telling the balancer first.
//!
//! - `drain-user agent`: answers one health or agent check with the state of this network
//!   namespace's gate, read afresh and read-only from its pins, and exits (inetd style:
//!   systemd `Accept=yes`), or accepts on a listening socket systemd hands over. No daemon
//!   runs between checks, and the agent never creates, changes or removes any state, so a
//!   killed agent leaves nothing behind.
//! - `gate on --announce DELAY` ([`Announce`]): the switch goes on with a second deadline,
//!   `announce_ns`, before which the kernel still lets SYNs pass while the agent already
//!   answers `drain`. The kernel closes by itself at that deadline (no process needed);
//!   `drain-user wait` closes it earlier ([`settle`]) once no new connection request has
//!   reached the gated ports for the quiet window: the balancer has stopped sending.
//!
//! Replies. HAProxy's agent-check reads one ASCII line: words separated by spaces, tabs or
//! commas, ended by a newline; the agent sends `ready` (no gate, gate off, TTL run out),
//! `drain` (announced or closed) or `maint` (`gate on --maint`), and after `ready` the
//! weight as `NN%` when `--weight` is given. An HTTP request (any path) gets
//! `200 ready` or `503 draining` with the state as one JSON object. Anything else gets one
//! line saying what was expected, and the connection closes.
//!
//! Fail open: a gate that cannot be read is answered as `ready` (and the reason goes to
//! stderr, the journal under systemd): the gate itself stays the safety net.

use std::{
    collections::BTreeSet,
    io::{self, Read, Write},
    net::{Shutdown, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::maps::{Array, Map, MapData, PerCpuArray};
use drain_common::{map, GateConfig, PortStats, FLAG_MAINT, GATE_ON, MAX_GATED_PORTS};
use serde::Serialize;

use crate::{
    domain::{usage, Exit},
    errln, pins,
    state::{boottime_ns, OpenGate},
    sys,
};

/// `gate on`'s announcement and agent options, checked.
#[derive(Clone, Copy, Debug, Default)]
pub struct Announce {
    pub delay: Option<Duration>,
    pub quiet: Duration,
    pub maint: bool,
    pub agent_port: Option<u16>,
}

/// Below this a quiet window says nothing about a balancer (its checks run every few
/// hundred ms at best).
const MIN_QUIET: Duration = Duration::from_millis(100);

impl Announce {
    /// Usage errors, found before the host changes.
    pub fn validate(&self, ports: &BTreeSet<u16>, ttl: Option<Duration>) -> Result<()> {
        if let Some(p) = self.agent_port.filter(|p| ports.contains(p)) {
            return Err(usage(format!(
                "port {p} is the drain agent's port (--agent-port or DRAIN_AGENT_PORT): gating \
                 it would cut the balancer off from the agent; leave it out of --port"
            )));
        }
        if let Some(d) = self.delay {
            if d.is_zero() {
                return Err(usage(
                    "--announce 0s announces nothing: leave --announce out to refuse at once",
                ));
            }
            if ttl.is_some_and(|t| d >= t) {
                return Err(usage(format!(
                    "--announce {} is not shorter than the TTL: the gate would open by itself \
                     before it ever refused; give a longer --ttl",
                    humantime::format_duration(d)
                )));
            }
            if self.quiet < MIN_QUIET {
                return Err(usage(
                    "--quiet under 100ms cannot tell a balancer that stopped from a pause \
                     between its connections; give at least 100ms",
                ));
            }
        }
        Ok(())
    }

    /// The config `gate on` writes: `cfg` with the announcement and flags, given the config
    /// of the gate it replaces (`old`, all zero when there was none). A gate that already
    /// refuses keeps refusing: announcing again does not reopen it; one that is announcing
    /// keeps its closing time.
    pub fn apply(&self, mut cfg: GateConfig, old: &GateConfig, now: u64) -> GateConfig {
        cfg.flags = (cfg.flags & !FLAG_MAINT) | if self.maint { FLAG_MAINT } else { 0 };
        if let Some(d) = self.delay {
            cfg.quiet_ns = self.quiet.as_nanos() as u64;
            cfg.announce_ns = match Phase::of(old, now) {
                Phase::Closed => 0,
                Phase::Announced { .. } => old.announce_ns,
                Phase::Off | Phase::Expired => now.saturating_add(d.as_nanos() as u64),
            };
        }
        cfg
    }
}

/// What a gate does right now, from its config alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Switched off (or no gate).
    Off,
    /// Its TTL ran out: it refuses nothing.
    Expired,
    /// On, SYNs still pass for `closes_in_ns`; the agent says drain.
    Announced { closes_in_ns: u64 },
    /// On and refusing.
    Closed,
}

impl Phase {
    pub fn of(cfg: &GateConfig, now: u64) -> Self {
        if cfg.enabled != GATE_ON {
            Phase::Off
        } else if cfg.deadline_ns != 0 && now >= cfg.deadline_ns {
            Phase::Expired
        } else if now < cfg.announce_ns {
            Phase::Announced {
                closes_in_ns: cfg.announce_ns - now,
            }
        } else {
            Phase::Closed
        }
    }

    fn name(self) -> &'static str {
        match self {
            Phase::Off => "off",
            Phase::Expired => "expired",
            Phase::Announced { .. } => "announced",
            Phase::Closed => "closed",
        }
    }
}

/// What the balancer is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Ready,
    Drain,
    Maint,
}

/// The gate as the agent reads it for one answer.
#[derive(Debug, Serialize)]
struct Reading {
    /// "ready", "draining" or "maint".
    state: &'static str,
    /// "none" (no gate here), "off", "expired", "announced", "closed".
    gate: &'static str,
    /// Announced: milliseconds until the gate refuses.
    closes_in_ms: Option<u64>,
    /// Milliseconds until the TTL opens the gate; null without a deadline.
    ttl_remaining_ms: Option<u64>,
    /// Live connections on the gated ports together.
    live_connections: i64,
    ports: Vec<PortLive>,
    /// Why the gate could not be read (the answer is then `ready`: fail open).
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip)]
    answer: Answer,
}

#[derive(Debug, Serialize)]
struct PortLive {
    port: u16,
    live_connections: i64,
}

/// BPF_F_RDONLY (include/uapi/linux/bpf.h): the fd can look up, not update.
const BPF_F_RDONLY: u64 = 1 << 3;

/// The map pinned at `dir/name`, opened read-only.
fn open_ro(dir: &Path, name: &str) -> Result<MapData> {
    let path = dir.join(name);
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // union bpf_attr, BPF_OBJ_GET: { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; }
    let mut attr = [0u64; 16];
    attr[0] = c.as_ptr() as u64;
    attr[1] = BPF_F_RDONLY << 32;
    let fd = sys::bpf(sys::BPF_OBJ_GET, &mut attr)
        .with_context(|| format!("opening {} read-only", path.display()))?;
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    Ok(MapData::from_fd(fd)?)
}

/// Reads the gate of this network namespace; `None` when there is none.
fn read_gate() -> Result<Option<(GateConfig, Vec<PortLive>)>> {
    let dir = pins::gate_dir()?;
    if !pins::state_exists(&dir)? {
        return Ok(None);
    }
    let config: Array<MapData, GateConfig> =
        Array::try_from(Map::Array(open_ro(&dir, map::CONFIG)?))?;
    let cfg = config.get(&0, 0).context("reading the gate switch")?;
    let stats: PerCpuArray<MapData, PortStats> =
        PerCpuArray::try_from(Map::PerCpuArray(open_ro(&dir, map::STATS)?))?;
    let live: Array<MapData, i64> = Array::try_from(Map::Array(open_ro(&dir, map::LIVE)?))?;
    let mut ports = Vec::new();
    for slot in 1..=MAX_GATED_PORTS {
        let port = stats
            .get(&slot, 0)?
            .iter()
            .map(|s| s.port)
            .max()
            .unwrap_or(0);
        if port != 0 {
            ports.push(PortLive {
                port: port as u16,
                live_connections: live.get(&port, 0)?.max(0),
            });
        }
    }
    ports.sort_by_key(|p| p.port);
    Ok(Some((cfg, ports)))
}

impl Reading {
    /// The answer with nothing read yet: no gate, no ports.
    fn of(answer: Answer) -> Self {
        Reading {
            state: "ready",
            gate: "none",
            closes_in_ms: None,
            ttl_remaining_ms: None,
            live_connections: 0,
            ports: vec![],
            error: None,
            answer,
        }
    }
}

fn reading() -> Reading {
    let mut r = Reading::of(Answer::Ready);
    match read_gate() {
        Ok(None) => {}
        Ok(Some((cfg, ports))) => {
            let now = boottime_ns();
            let phase = Phase::of(&cfg, now);
            r.gate = phase.name();
            if let Phase::Announced { closes_in_ns } = phase {
                r.closes_in_ms = Some(closes_in_ns / 1_000_000);
            }
            if cfg.deadline_ns != 0 {
                r.ttl_remaining_ms = Some(cfg.deadline_ns.saturating_sub(now) / 1_000_000);
            }
            r.answer = match phase {
                Phase::Off | Phase::Expired => Answer::Ready,
                _ if cfg.flags & FLAG_MAINT != 0 => Answer::Maint,
                _ => Answer::Drain,
            };
            r.state = match r.answer {
                Answer::Ready => "ready",
                Answer::Drain => "draining",
                Answer::Maint => "maint",
            };
            r.live_connections = ports.iter().map(|p| p.live_connections).sum();
            r.ports = ports;
        }
        Err(e) => {
            let _ = errln!("drain-user agent: reading the gate failed, answering ready: {e:#}");
            r.error = Some(format!("{e:#}"));
        }
    }
    r
}

/// The agent-check line.
fn agent_line(r: &Reading, weight: Option<u16>) -> String {
    match (r.answer, weight) {
        (Answer::Ready, Some(w)) => format!("ready {w}%\n"),
        (Answer::Ready, None) => "ready\n".into(),
        (Answer::Drain, _) => "drain\n".into(),
        (Answer::Maint, _) => "maint\n".into(),
    }
}

fn http_response(status: &str, body: &str, head: bool) -> String {
    format!(
        "HTTP/1.0 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n{}",
        body.len() + 1,
        if head {
            String::new()
        } else {
            format!("{body}\n")
        }
    )
}

/// Longest request (line and headers) read; a check is a few hundred bytes.
const MAX_REQUEST: usize = 8192;
/// How long a client may take to send its whole request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// What the first bytes are.
enum Request {
    /// Nothing within the greeting: HAProxy's agent-check.
    Silent,
    /// One line of text: agent-send.
    Line,
    /// An HTTP request: method, target, version.
    Http { head: bool },
    /// One line saying what is wrong.
    Bad(String),
}

/// The request methods of HTTP/1.1 (RFC 9110): a first word among them means HTTP.
const METHODS: &[&[u8]] = &[
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
];

fn is_http_start(buf: &[u8]) -> bool {
    let word = buf
        .split(|b| matches!(b, b' ' | b'\r' | b'\n'))
        .next()
        .unwrap_or_default();
    buf.len() > word.len() && METHODS.contains(&word)
}

/// Reads what the client sends (nothing, a line, an HTTP request) and classifies it.
fn read_request(s: &mut TcpStream, greeting: Duration) -> Request {
    let start = Instant::now();
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let limit = if buf.is_empty() {
            greeting
        } else {
            REQUEST_TIMEOUT
        };
        let left = limit.saturating_sub(start.elapsed());
        if left.is_zero() {
            break;
        }
        let _ = s.set_read_timeout(Some(left));
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                break
            }
            Err(_) => break,
        }
        if is_http_start(&buf) {
            if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
                break;
            }
        } else if buf.contains(&b'\n') {
            break;
        }
        if buf.len() > MAX_REQUEST {
            return Request::Bad(format!("request longer than {MAX_REQUEST} bytes"));
        }
    }
    if buf.is_empty() {
        return Request::Silent;
    }
    if is_http_start(&buf) {
        let Some(end) = buf.iter().position(|b| *b == b'\n') else {
            return Request::Bad("incomplete HTTP request".into());
        };
        let line = String::from_utf8_lossy(&buf[..end]);
        let f: Vec<&str> = line.trim_end_matches('\r').split(' ').collect();
        let ended =
            buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n");
        return match f[..] {
            [m @ ("GET" | "HEAD"), target, v]
                if target.starts_with('/') && v.starts_with("HTTP/1.") =>
            {
                if ended {
                    Request::Http { head: m == "HEAD" }
                } else {
                    Request::Bad("incomplete HTTP request (no empty line after the headers)".into())
                }
            }
            [_, _, v] if v.starts_with("HTTP/") => {
                Request::Bad("only GET and HEAD are answered".into())
            }
            _ => Request::Bad("malformed HTTP request line".into()),
        };
    }
    match buf.iter().position(|b| *b == b'\n') {
        Some(end)
            if buf[..end]
                .iter()
                .all(|b| b.is_ascii_graphic() || matches!(b, b' ' | b'\t' | b'\r')) =>
        {
            Request::Line
        }
        _ => Request::Bad(
            "expected nothing (agent-check), one line of text (agent-send) or an HTTP request"
                .into(),
        ),
    }
}

/// Answers one connection.
fn answer(mut s: TcpStream, args: &Options) {
    let reply = match read_request(&mut s, args.greeting) {
        Request::Silent | Request::Line => agent_line(&reading(), args.weight),
        Request::Http { head } => {
            let r = reading();
            let body = serde_json::to_string(&r).unwrap_or_else(|_| "{}".into());
            let status = if r.answer == Answer::Ready {
                "200 ready"
            } else {
                "503 draining"
            };
            http_response(status, &body, head)
        }
        Request::Bad(why) => {
            // HTTP clients get an HTTP answer; anything else a bare line.
            format!("drain-user agent: error: {why}\n")
        }
    };
    let _ = s.set_write_timeout(Some(REQUEST_TIMEOUT));
    let _ = s.write_all(reply.as_bytes());
    // FIN, then read what the client may still send, so closing with unread bytes does
    // not turn the FIN into a RST that could discard the reply.
    let _ = s.shutdown(Shutdown::Write);
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut sink = [0u8; 1024];
    let until = Instant::now() + Duration::from_millis(200);
    while Instant::now() < until && matches!(s.read(&mut sink), Ok(n) if n > 0) {}
}

/// `LISTEN_FDS`/`LISTEN_PID` (sd_listen_fds): the first passed fd, 3, when meant for us.
fn listen_fd() -> Option<RawFd> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.trim().parse().ok()?;
    let n: u32 = std::env::var("LISTEN_FDS").ok()?.trim().parse().ok()?;
    (pid == std::process::id() && n >= 1).then_some(3)
}

fn sock_opt(fd: RawFd, level: i32, name: i32) -> Option<i32> {
    let mut v: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: valid out-parameters of the sizes given.
    let rc = unsafe { libc::getsockopt(fd, level, name, (&mut v as *mut i32).cast(), &mut len) };
    (rc == 0).then_some(v)
}

/// Concurrent connections served on a listening socket; more wait in its backlog.
const MAX_CONNS: usize = 32;

/// How `drain-user agent` answers (its command-line options).
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// `--weight`: the weight an agent-check `ready` answer carries, if any.
    pub weight: Option<u16>,
    /// `--greeting`: how long to wait for a request before answering an agent check.
    pub greeting: Duration,
}

pub fn serve(args: &Options) -> Result<Exit> {
    let (fd, from) = match listen_fd() {
        Some(fd) => (fd, "the socket passed by systemd (LISTEN_FDS)"),
        None => (0, "stdin"),
    };
    match sock_opt(fd, libc::SOL_SOCKET, libc::SO_TYPE) {
        Some(libc::SOCK_STREAM) => {}
        _ => {
            return Err(usage(format!(
                "{from} is not a TCP socket: run `drain-user agent` from a systemd socket unit \
                 (examples/systemd/drain-agent.socket), inetd or systemd-socket-activate"
            )))
        }
    }
    // SAFETY: the fd was handed to this process for it to own (systemd or inetd).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    if sock_opt(owned.as_raw_fd(), libc::SOL_SOCKET, libc::SO_ACCEPTCONN) == Some(1) {
        let listener = std::net::TcpListener::from(owned);
        let busy = Arc::new(AtomicUsize::new(0));
        let args = Arc::new(Options {
            weight: args.weight,
            greeting: args.greeting,
        });
        loop {
            let (conn, _) = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("accepting on the agent's socket"),
            };
            if busy.fetch_add(1, Ordering::SeqCst) >= MAX_CONNS {
                busy.fetch_sub(1, Ordering::SeqCst);
                drop(conn);
                continue;
            }
            let (busy, args) = (busy.clone(), args.clone());
            std::thread::spawn(move || {
                answer(conn, &args);
                busy.fetch_sub(1, Ordering::SeqCst);
            });
        }
    }
    // One connection (inetd, Accept=yes): stdin (or fd 3) is the connected socket; the
    // reply goes back on it (under inetd stdout is the same socket).
    answer(TcpStream::from(owned), args);
    Ok(Exit::Success)
}

/// How `wait` ended an announcement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Closed {
    /// No new connection request reached the gated ports for the quiet window: `wait`
    /// closed the gate.
    Quiet,
    /// The announcement's delay ran out (the kernel closed the gate by itself).
    Delay,
}

/// How an announcement ended, for `wait` to report.
pub struct Settled {
    pub elapsed: Duration,
    pub reason: Closed,
    /// New connection requests the gated ports let through meanwhile.
    pub syns: u64,
    /// The quiet window the balancer was given.
    pub quiet: Duration,
}

/// What the first part of `wait` on a gate came to.
pub enum Settle {
    /// The gate was not announced: nothing to wait for first.
    NotAnnounced,
    /// The announcement ended and the gate refuses now.
    Closed(Settled),
    /// A signal came first: end `wait` with this exit.
    Signal(Exit),
}

/// SYNs the gate let through on `gate`'s ports, not counting allowlisted sources: during an
/// announcement, the balancer's (and anybody's) new connections.
fn passed(gate: &OpenGate) -> Result<u64> {
    Ok(gate
        .ports()?
        .iter()
        .map(|p| p.stats.syns_passed.saturating_sub(p.stats.syns_allowed))
        .sum())
}

const SETTLE_POLL: Duration = Duration::from_millis(20);

/// The first part of `wait` on an announced gate: until it closes, by its delay or because
/// the gated ports saw no new connection request for the gate's quiet window, in which
/// case this closes it (one config write under the lock).
pub async fn settle(gate: &mut OpenGate) -> Result<Settle> {
    let start = Instant::now();
    let cfg = gate.config()?;
    if !matches!(Phase::of(&cfg, boottime_ns()), Phase::Announced { .. }) {
        return Ok(Settle::NotAnnounced);
    }
    let quiet = Duration::from_nanos(cfg.quiet_ns.max(MIN_QUIET.as_nanos() as u64));
    let first = passed(gate)?;
    let mut last = first;
    let mut last_change = Instant::now();
    let mut next_renewal = Instant::now();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let reason = loop {
        if !gate.still_pinned() {
            anyhow::bail!("the gate was turned off (`drain-user gate off`) while waiting");
        }
        let cfg = gate.config()?;
        if !matches!(Phase::of(&cfg, boottime_ns()), Phase::Announced { .. }) {
            break Closed::Delay;
        }
        let now = passed(gate)?;
        if now != last {
            last = now;
            last_change = Instant::now();
        }
        if last_change.elapsed() >= quiet && close_now(gate, &cfg)? {
            break Closed::Quiet;
        }
        if Instant::now() >= next_renewal {
            next_renewal = Instant::now() + gate.renew_ttl()?;
        }
        tokio::select! {
            _ = tokio::time::sleep(SETTLE_POLL) => {}
            _ = tokio::signal::ctrl_c() => return Ok(Settle::Signal(Exit::Interrupted)),
            _ = sigterm.recv() => return Ok(Settle::Signal(Exit::Terminated)),
        }
    };
    Ok(Settle::Closed(Settled {
        elapsed: start.elapsed(),
        reason,
        syns: passed(gate)?.saturating_sub(first),
        quiet,
    }))
}

/// Ends the announcement now, unless the gate changed meanwhile (another `gate on`, a
/// `gate off`). True when this call closed it.
fn close_now(gate: &mut OpenGate, seen: &GateConfig) -> Result<bool> {
    let Some(_lock) = pins::try_lock()? else {
        return Ok(false); // try again on the next poll
    };
    if !gate.still_pinned() {
        return Ok(false);
    }
    let mut cfg = gate.config()?;
    if cfg != *seen {
        return Ok(false);
    }
    cfg.announce_ns = boottime_ns();
    gate.set_config(cfg)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(enabled: u32, deadline_ns: u64, announce_ns: u64) -> GateConfig {
        GateConfig {
            enabled,
            deadline_ns,
            announce_ns,
            ..Default::default()
        }
    }

    #[test]
    fn phases() {
        assert_eq!(Phase::of(&cfg(0, 0, 0), 10), Phase::Off);
        assert_eq!(Phase::of(&cfg(GATE_ON, 0, 0), 10), Phase::Closed);
        assert_eq!(Phase::of(&cfg(GATE_ON, 5, 0), 10), Phase::Expired);
        assert_eq!(
            Phase::of(&cfg(GATE_ON, 100, 30), 10),
            Phase::Announced { closes_in_ns: 20 }
        );
        assert_eq!(Phase::of(&cfg(GATE_ON, 100, 30), 30), Phase::Closed);
        // The TTL wins over an announcement.
        assert_eq!(Phase::of(&cfg(GATE_ON, 20, 30), 25), Phase::Expired);
    }

    #[test]
    fn announcing_never_reopens_a_closed_gate() {
        let a = Announce {
            delay: Some(Duration::from_secs(3)),
            quiet: Duration::from_secs(1),
            ..Default::default()
        };
        let new = cfg(GATE_ON, 0, 0);
        assert_eq!(a.apply(new, &cfg(0, 0, 0), 10).announce_ns, 3_000_000_010);
        assert_eq!(a.apply(new, &cfg(GATE_ON, 0, 0), 10).announce_ns, 0);
        assert_eq!(a.apply(new, &cfg(GATE_ON, 0, 50), 10).announce_ns, 50);
        assert_eq!(
            a.apply(new, &cfg(GATE_ON, 5, 0), 10).announce_ns,
            3_000_000_010
        );
    }

    #[test]
    fn agent_port_and_delays_are_checked() {
        let ports: BTreeSet<u16> = [80, 9707].into();
        let a = Announce {
            agent_port: Some(9707),
            quiet: Duration::from_secs(1),
            ..Default::default()
        };
        let e = a.validate(&ports, None).unwrap_err().to_string();
        assert!(e.contains("port 9707 is the drain agent's port"), "{e}");
        let a = Announce {
            delay: Some(Duration::from_secs(60)),
            quiet: Duration::from_secs(1),
            ..Default::default()
        };
        let e = a
            .validate(&[80].into(), Some(Duration::from_secs(30)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not shorter than the TTL"), "{e}");
    }

    #[test]
    fn replies() {
        let mut r = Reading::of(Answer::Ready);
        assert_eq!(agent_line(&r, None), "ready\n");
        assert_eq!(agent_line(&r, Some(100)), "ready 100%\n");
        r.answer = Answer::Drain;
        assert_eq!(agent_line(&r, Some(100)), "drain\n");
        r.answer = Answer::Maint;
        assert_eq!(agent_line(&r, None), "maint\n");
        assert!(is_http_start(b"GET / HTTP/1.0\r\n"));
        assert!(!is_http_start(b"hello\n"));
        assert!(!is_http_start(b"be_web/srv1\n"));
        assert!(is_http_start(b"GET\r\n\r\n"));
        assert!(!is_http_start(b"GETTING\n"));
    }
}

//! `wait`: block until the ports have drained (no live connections) or, with `--idle`,
//! until every connection left has nothing in flight and has been quiet for a while.
//!
//! The counts come from the kernel tracker through an mmapped array, and the tracker wakes
//! `wait` when the count of a port it waits for changes (a ring buffer, [`track::Wake`]):
//! the last close is noticed at once, and nothing runs while nothing changes but a slow
//! safety poll ([`SAFETY_POLL`], which also paces the conntrack refresh and `--idle`'s
//! checks run on their own period). A gate made by an older drain-user has no wake ring:
//! then the counts are polled every [`POLL`]. The loop decides what happened ([`Progress`], then one [`Outcome`]); a
//! [`Reporter`] from the presentation layer prints it.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use drain_common::{GATE_ON, WAKE_LEASE_NS};
use serde::Serialize;
use tokio::io::{unix::AsyncFd, Interest};

use crate::{
    diag,
    domain::{usage, Exit, Policy},
    errln,
    follow::Follower,
    gate, iface,
    netns::{self, NetnsId, StateDir},
    object, pins,
    state::{boottime_ns, OpenGate},
    track::{self, Tracker},
};

pub struct WaitArgs {
    pub ports: Vec<u16>,
    pub timeout: Option<Duration>,
    pub idle: Option<Duration>,
}

/// What `wait` tells as it goes; the presentation layer renders it (JSON, text, a
/// progress line).
pub trait Reporter {
    /// The ports waited for, known once the gate is read; before anything else.
    fn start(&mut self, ports: &BTreeSet<u16>);
    /// An announced gate closed (`gate on --announce`), before the counts are waited on.
    fn closed(&mut self, settled: &crate::agent::Settled) -> Result<()>;
    /// Every poll; `changed` when the live count differs from the last poll's (or is the
    /// first).
    fn progress(&mut self, p: &Progress, changed: bool) -> Result<()>;
    fn finish(&mut self, outcome: &Outcome) -> Result<()>;
}

/// Without a wake ring: how often the counts are read.
const POLL: Duration = Duration::from_millis(5);
/// With one: how often the loop runs anyway, woken or not. A wake-up is not missed by
/// design (track::Wake::want: the interest is raised before the counts are read, and the
/// tracker changes a count before it reads the interest, both with full barriers; the ring
/// is emptied before the read, so its next record wakes this process), so this only
/// bounds what a broken wake would cost: the loop runs once a second, as often as the
/// gate's TTL renewal makes it run anyway, and no more (the interest's lease,
/// WAKE_LEASE_NS, is two of these, renewed every one).
const SAFETY_POLL: Duration = Duration::from_secs(1);
/// inet_diag dumps (for --idle) are cheap but not free: this often at most while bytes
/// are in flight (otherwise the next check is when the connections could first be idle).
const IDLE_POLL: Duration = Duration::from_millis(100);
/// How often conntrack is read for connections forwarded elsewhere (a published port's
/// DNAT): new ones (an allowlisted client) and new namespaces (a restarted container) are
/// followed within this; a zero count is always checked against a fresh read.
const FOLLOW_POLL: Duration = Duration::from_millis(250);
/// While the kernel keeps skipping the tracker, how often `wait` rechecks its set at most
/// (a recheck dumps every socket of the namespaces counted); before it reports drained or
/// idle it always does.
const RECHECK_EVERY: Duration = Duration::from_millis(250);

/// One reading of the live counts.
pub struct Progress {
    pub elapsed: Duration,
    /// Live connections on all the ports together.
    pub live: i64,
    /// (port, live connections), by port.
    pub ports: Vec<(u16, i64)>,
    /// Time left until `--timeout`.
    pub timeout_in: Option<Duration>,
}

/// How a `wait` ended.
pub enum Outcome {
    /// No live connection is left on the ports.
    Drained { elapsed: Duration },
    /// `--idle`: connections are left, none with data in flight or recent traffic.
    Idle { elapsed: Duration, live: i64 },
    /// `--timeout` passed first; these connections were left.
    Timeout {
        elapsed: Duration,
        live: i64,
        left: Vec<Leftover>,
    },
    /// SIGINT.
    Interrupted,
    /// SIGTERM.
    Terminated,
}

impl Outcome {
    pub fn exit(&self) -> Exit {
        match self {
            Outcome::Drained { .. } | Outcome::Idle { .. } => Exit::Success,
            Outcome::Timeout { .. } => Exit::Timeout,
            Outcome::Interrupted => Exit::Interrupted,
            Outcome::Terminated => Exit::Terminated,
        }
    }
}

/// A connection still open at the timeout. Fields in alphabetical order: the order of
/// the `remaining` entries of the `timeout` JSON event since it first existed.
#[derive(Serialize)]
pub struct Leftover {
    /// Milliseconds since the connection last carried data either way; null without
    /// tcp_info.
    pub idle_ms: Option<u32>,
    pub peer: String,
    pub port: u16,
    pub state: &'static str,
    pub unread_bytes: u32,
    pub unsent_bytes: u32,
}

/// A tracker loaded for one `wait` when no gate is installed; removed when dropped.
struct TempTracker {
    dir: PathBuf,
    tracker: Tracker,
    _link: aya::programs::links::FdLink,
    _bpf: aya::Ebpf,
}

impl Drop for TempTracker {
    fn drop(&mut self) {
        let _lock = pins::lock();
        let _ = gate::teardown(&self.dir);
    }
}

impl TempTracker {
    fn new() -> Result<Self> {
        // Under the lock: teardown elsewhere may remove the shared parent directory.
        let _lock = pins::lock()?;
        let own = NetnsId::current()?;
        let root = pins::root();
        pins::make_dir(&root)?;
        for orphan in netns::orphans(&root, own) {
            let _ = gate::teardown(&orphan);
        }
        let dir = pins::state_path(StateDir::Wait {
            inode: own.inode,
            pid: std::process::id(),
        });
        pins::make_dir(&dir)?;
        let loaded = (|| {
            let mut bpf = object::load(&dir)?;
            let link = track::attach(&mut bpf, &crate::btf::Kernel::default())?;
            let mut tracker = Tracker::open(&dir)?;
            // Its link is not pinned: the kernel's skips are read through the program.
            if let Some(id) = bpf
                .program(drain_common::prog::TRACK)
                .and_then(|p| p.info().ok())
                .map(|i| i.id())
            {
                tracker.set_prog_id(id);
            }
            tracker.seed()?;
            Ok::<_, anyhow::Error>((bpf, link, tracker))
        })();
        match loaded {
            Ok((bpf, link, tracker)) => Ok(TempTracker {
                dir,
                tracker,
                _link: link,
                _bpf: bpf,
            }),
            Err(e) => {
                let _ = gate::teardown(&dir);
                Err(e)
            }
        }
    }
}

/// Where the counts come from: the gate's tracker (whose TTL `wait` renews), or one of
/// `wait`'s own.
#[expect(
    clippy::large_enum_variant,
    reason = "one value per process, never moved after the start"
)]
enum Source {
    Gate(OpenGate),
    Temp(TempTracker),
}

impl Source {
    fn tracker(&self) -> &Tracker {
        match self {
            Source::Gate(g) => g.tracker(),
            Source::Temp(t) => &t.tracker,
        }
    }

    fn tracker_mut(&mut self) -> &mut Tracker {
        match self {
            Source::Gate(g) => g.tracker_mut(),
            Source::Temp(t) => &mut t.tracker,
        }
    }
}

/// The local ports whose counts make up each waited-for port: itself, and the ports of this
/// namespace a DNAT here leads it to.
fn counted_ports(ports: &BTreeSet<u16>, follower: &Follower) -> BTreeSet<u16> {
    let mut all = ports.clone();
    for p in ports {
        all.extend(follower.local.get(p).into_iter().flatten());
    }
    all
}

/// The connections the counts are made of: an inet_diag dump filtered by the tracker's own
/// set (not by "the port has a listener", which a graceful server stop breaks), here and in
/// the namespaces followed; reported under the port waited for.
fn tracked(
    tracker: &Tracker,
    ports: &BTreeSet<u16>,
    follower: &Follower,
) -> Result<Vec<(u16, diag::Conn)>> {
    let local = counted_ports(ports, follower);
    // A local port a DNAT here leads to is reported under the port waited for.
    let waited = |p: u16| {
        ports
            .iter()
            .copied()
            .find(|w| *w == p || follower.local.get(w).is_some_and(|l| l.contains(&p)))
            .unwrap_or(p)
    };
    let mut out: Vec<(u16, diag::Conn)> =
        diag::dump(diag::States::ESTABLISHED | diag::States::CLOSE_WAIT, true)?
            .into_iter()
            .filter(|c| local.contains(&c.local.port()) && tracker.contains(c))
            .map(|c| (waited(c.local.port()), c))
            .collect();
    out.extend(follower.tracked(tracker, ports)?);
    Ok(out)
}

fn leftovers(
    tracker: &Tracker,
    ports: &BTreeSet<u16>,
    follower: &Follower,
) -> Result<Vec<Leftover>> {
    let mut left: Vec<Leftover> = tracked(tracker, ports, follower)?
        .into_iter()
        .map(|(port, c)| Leftover {
            peer: c.peer.to_string(),
            port,
            state: diag::state_name(c.state),
            unread_bytes: c.rqueue,
            unsent_bytes: c.wqueue,
            idle_ms: c.info.map(|i| i.last_data_recv_ms.min(i.last_data_sent_ms)),
        })
        .collect();
    // Those a DNAT sends to no namespace of this host: what conntrack says of them.
    left.extend(follower.elsewhere.iter().map(|f| Leftover {
        peer: f.client.to_string(),
        port: f.port,
        state: f.state_name(),
        unread_bytes: 0,
        unsent_bytes: 0,
        idle_ms: None,
    }));
    Ok(left)
}

/// None when every live connection on `ports` has no unread, unsent or unacknowledged
/// bytes and has exchanged no data for `idle`; otherwise the soonest they all could be
/// (the quiet time the most recently active one still lacks), or [`IDLE_POLL`] when that
/// cannot be known (bytes in flight, no tcp_info, connections the dump missed). Sleeping
/// that long misses nothing: traffic only pushes the moment later, and a connection that
/// opens or closes changes a count, which wakes the loop.
fn not_idle_for(
    tracker: &Tracker,
    ports: &BTreeSet<u16>,
    follower: &Follower,
    idle: Duration,
    live: i64,
) -> Result<Option<Duration>> {
    if !follower.elsewhere.is_empty() {
        return Ok(Some(IDLE_POLL)); // nothing known of their traffic
    }
    let idle_ms = idle.as_millis().min(u32::MAX as u128) as u32;
    let conns = tracked(tracker, ports, follower)?;
    if (conns.len() as i64) < live {
        return Ok(Some(IDLE_POLL)); // the dump missed some (opened since): not idle yet
    }
    let mut lacking = Some(0u32);
    for (_, c) in &conns {
        let quiet = c
            .info
            .filter(|i| c.rqueue == 0 && c.wqueue == 0 && i.unacked == 0 && i.notsent_bytes == 0);
        lacking = match (lacking, quiet) {
            (Some(most), Some(i)) => {
                Some(most.max(idle_ms.saturating_sub(i.last_data_recv_ms.min(i.last_data_sent_ms))))
            }
            _ => None,
        };
    }
    Ok(match lacking {
        Some(0) => None,
        Some(ms) => Some(Duration::from_millis(u64::from(ms))),
        None => Some(IDLE_POLL),
    })
}

pub async fn wait(args: WaitArgs, reporter: &mut dyn Reporter) -> Result<Exit> {
    let gate_dir = pins::gate_dir()?;
    let gate = if pins::state_exists(&gate_dir)? {
        Some(OpenGate::open(&gate_dir)?)
    } else {
        None
    };
    let mut ports: BTreeSet<u16> = args.ports.iter().copied().collect();
    if ports.is_empty() {
        if let Some(g) = &gate {
            ports = g.ports()?.iter().map(|p| p.port).collect();
        }
        if ports.is_empty() {
            return Err(usage(
                "no gate is on in this network namespace: name the ports to wait for with --port",
            ));
        }
    }
    let cfg = match &gate {
        Some(g) => Some(g.config()?),
        None => None,
    };
    let mut warned = BTreeSet::new();
    // Subscribed before the first listing, so no change between the two goes unseen.
    let mut links = Ungated::default();
    if let Some(g) = &gate {
        links.events = iface::LinkEvents::open().ok();
        links.check(g, &mut warned)?;
    }
    let expired = cfg.is_some_and(|c| c.deadline_ns != 0 && boottime_ns() >= c.deadline_ns);
    if expired && cfg.is_some_and(|c| c.enabled == GATE_ON) {
        errln!(
            "drain-user: warning: the gate's TTL ran out: new connections are accepted again, \
             so the ports may never drain (run `drain-user gate on --port ...` to refuse them again)"
        )?;
    } else if cfg.is_none_or(|c| c.enabled != GATE_ON) {
        errln!(
            "drain-user: warning: the gate is off: new connections keep arriving, so the ports may never drain \
             (run `drain-user gate on --port ...` first)"
        )?;
    }
    let mut source = match gate {
        Some(g) => Source::Gate(g),
        None => {
            pins::ensure_bpffs()?;
            Source::Temp(TempTracker::new()?)
        }
    };
    reporter.start(&ports);
    // `gate on --announce`: first until the gate refuses (delay, or the balancer quiet).
    if let Source::Gate(g) = &mut source {
        match crate::agent::settle(g).await? {
            crate::agent::Settle::NotAnnounced => {}
            crate::agent::Settle::Closed(settled) => reporter.closed(&settled)?,
            crate::agent::Settle::Signal(exit) => return Ok(exit),
        }
    }
    let outcome = poll(
        &mut source,
        &ports,
        &args,
        reporter,
        &mut warned,
        &mut links,
    )
    .await?;
    // The outcome is printed (and flushed) before anything is taken down: whoever waits
    // on the line or on the exit learns it now.
    reporter.finish(&outcome)?;
    match source {
        // A temporary tracker's pins must go (its Drop), whatever the outcome.
        Source::Temp(t) => drop(t),
        // The gate's maps and the wake ring stay pinned; unmapping and closing them one by
        // one would only delay the exit, which releases them all at once.
        Source::Gate(g) => std::mem::forget(g),
    }
    Ok(outcome.exit())
}

/// When the interfaces are listed again for [`warn_ungated`]: when one changed (link
/// notifications) or the gate's state or policy did; every time without notifications.
#[derive(Default)]
struct Ungated {
    events: Option<iface::LinkEvents>,
    /// (enabled, policy) at the last listing.
    seen: Option<(u32, u32)>,
}

impl Ungated {
    fn check(&mut self, gate: &OpenGate, warned: &mut BTreeSet<u32>) -> Result<()> {
        let cfg = gate.config()?;
        let now = (cfg.enabled, cfg.policy);
        // Both evaluated: changed() also empties the socket.
        let links_changed = self.events.as_mut().is_none_or(|e| e.changed());
        if links_changed || self.seen != Some(now) {
            self.seen = Some(now);
            warn_ungated(gate, &cfg, warned)?;
        }
        Ok(())
    }
}

/// Warns once about each interface that is up and not gated while the gate drops (an
/// interface a container brought up during the drain, say): connections through it are
/// accepted. `warned` holds the ifindexes already warned about.
fn warn_ungated(
    gate: &OpenGate,
    cfg: &drain_common::GateConfig,
    warned: &mut BTreeSet<u32>,
) -> Result<()> {
    if cfg.enabled != GATE_ON {
        return Ok(());
    }
    let new: Vec<_> = gate::ungated(gate.dir())?
        .into_iter()
        .filter(|i| !warned.contains(&i.index))
        .collect();
    if let Some(w) = gate::ungated_warning(&new, Policy::from_raw(cfg.policy)) {
        errln!("{w}")?;
        warned.extend(new.iter().map(|i| i.index));
    }
    Ok(())
}

/// Per waited-for port: the tracker's count (its own connections and those of the servers
/// followed elsewhere), plus the local ports a DNAT here leads it to, plus the forwarded
/// connections that end outside this host (not counted by the tracker: conntrack's word).
fn counts(tracker: &Tracker, ports: &BTreeSet<u16>, follower: &Follower) -> Vec<(u16, i64)> {
    ports
        .iter()
        .map(|&p| {
            let local: i64 = follower
                .local
                .get(&p)
                .into_iter()
                .flatten()
                .filter(|l| !ports.contains(l))
                .map(|&l| tracker.live(l).max(0))
                .sum();
            let elsewhere = follower.elsewhere.iter().filter(|f| f.port == p).count() as i64;
            (p, tracker.live(p).max(0) + local + elsewhere)
        })
        .collect()
}

/// The wake ring of the tracker in `dir` in tokio's reactor, and the safety poll; without
/// a ring (an older gate), no ring and [`POLL`].
///
/// Test-only knobs, not options: `DRAIN_WAIT_POLL_MS` sets the safety poll (a test that
/// makes it long shows an exit came from a wake-up), `DRAIN_WAIT_WAKE=0` leaves the ring
/// unused (the same test's negative run).
fn wake_setup(dir: &std::path::Path) -> Result<(Option<AsyncFd<track::Wake>>, Duration)> {
    let safety = match std::env::var("DRAIN_WAIT_POLL_MS") {
        Err(_) => SAFETY_POLL,
        Ok(v) => Duration::from_millis(v.parse().map_err(|_| {
            anyhow::anyhow!("DRAIN_WAIT_POLL_MS={v:?} is not a number of milliseconds")
        })?),
    };
    if std::env::var("DRAIN_WAIT_WAKE").is_ok_and(|v| v == "0") {
        return Ok((None, safety));
    }
    match track::Wake::open(dir)? {
        Some(w) => Ok((
            // SAFETY: the fd is the ring map's, owned by `w`, which the AsyncFd owns and
            // never replaces: it stays open and the same for the AsyncFd's whole life.
            Some(
                unsafe { AsyncFd::register_with_interest(w, Interest::READABLE) }
                    .map_err(|e| e.into_parts().1)
                    .context("watching the tracker's wake ring")?,
            ),
            safety,
        )),
        None => Ok((None, POLL)),
    }
}

/// Resolves when the tracker has written to the wake ring (never without one).
async fn woken(wake: &mut Option<AsyncFd<track::Wake>>) -> Result<()> {
    let Some(w) = wake else {
        return std::future::pending().await;
    };
    let mut guard = w
        .readable_mut()
        .await
        .context("waiting on the tracker's wake ring")?;
    guard.get_inner_mut().drain();
    // Readiness that arrived after the guard was taken survives this (tokio's tick check).
    guard.clear_ready();
    Ok(())
}

/// Puts the tracker's set right after the kernel skipped it; says so on stderr when that
/// changed a count or left entries unjudged.
fn recheck(tracker: &mut Tracker, follower: &Follower) -> Result<()> {
    let known: Vec<(u64, &std::path::Path)> = follower
        .followed()
        .iter()
        .map(|f| (f.netns_inode, f.handle.as_path()))
        .collect();
    let r = tracker.recheck(&known)?;
    if r.removed != 0 || r.added != 0 || r.unchecked != 0 {
        errln!(
            "drain-user: the kernel skipped the connection tracker {} times (its program was \
             already running on that CPU): rechecked against the kernel's sockets, {} closed \
             connections taken out of the counts, {} open ones added{}",
            r.missed,
            r.removed,
            r.added,
            unjudged(r.unchecked)
        )?;
    }
    Ok(())
}

/// The tail of a recheck's line for entries it could not judge.
pub fn unjudged(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(
            ", {n} of namespaces nothing on this host opens any more left as they are (the \
             counts may be high by as many)"
        )
    }
}

/// Reads conntrack and follows what it names; says so, once per server, on stderr.
fn refresh(follower: &mut Follower, tracker: &mut Tracker, ports: &BTreeSet<u16>) -> Result<()> {
    let found = follower.refresh(tracker, ports)?;
    for (f, seeded) in found.new {
        errln!(
            "drain-user: port {}: connections are forwarded (DNAT) to {} in network namespace \
             {}: counted there ({seeded} open when found)",
            f.port,
            f.backend,
            f.netns_inode
        )?;
    }
    Ok(())
}

async fn poll(
    source: &mut Source,
    ports: &BTreeSet<u16>,
    args: &WaitArgs,
    reporter: &mut dyn Reporter,
    warned: &mut BTreeSet<u32>,
    links: &mut Ungated,
) -> Result<Outcome> {
    let start = Instant::now();
    let deadline = args.timeout.map(|t| start + t);
    let mut last_live = None;
    let mut next_idle_check: Option<Instant> = None;
    let mut last_idle_check: Option<Instant> = None;
    let mut next_renewal = start;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut follower = Follower::new(source.tracker_mut())?;
    let mut last_follow: Option<Instant> = None;
    let dir = match &*source {
        Source::Gate(g) => g.dir().to_path_buf(),
        Source::Temp(t) => t.dir.clone(),
    };
    let (mut wake, safety) = wake_setup(&dir)?;
    let mut lease_until = 0;
    let mut wanted = BTreeSet::new();
    let mut last_recheck: Option<Instant> = None;
    let mut recheck_now = false;
    loop {
        if last_follow.is_none_or(|t| t.elapsed() >= FOLLOW_POLL) {
            refresh(&mut follower, source.tracker_mut(), ports)?;
            last_follow = Some(Instant::now());
        }
        // The kernel skipped the tracker (a preemptible kernel's tracepoints): the set is
        // put right before the counts are read. Checked every pass, so within the safety
        // poll even when the skipped change was a count's last; at most every
        // RECHECK_EVERY while skips keep coming (each recheck dumps every socket of the
        // namespaces counted), and always before a conclusion.
        let mut fresh = false;
        if (recheck_now || last_recheck.is_none_or(|t| t.elapsed() >= RECHECK_EVERY))
            && source.tracker().stale()
        {
            recheck(source.tracker_mut(), &follower)?;
            last_recheck = Some(Instant::now());
            fresh = true;
        }
        recheck_now = false;
        // Interest first, then the counts: a change after this wakes the loop.
        if let Some(w) = &mut wake {
            // Renewed halfway through, and at once for a local port a DNAT newly leads to.
            let now = boottime_ns();
            let counted = counted_ports(ports, &follower);
            if now + WAKE_LEASE_NS / 2 >= lease_until || counted != wanted {
                lease_until = now + WAKE_LEASE_NS;
                w.get_ref().want(counted.iter().copied(), lease_until);
                wanted = counted;
            }
            w.get_mut().drain();
        }
        let mut counts = counts(source.tracker(), ports, &follower);
        if counts.iter().all(|(_, n)| *n == 0) && last_follow.is_some_and(|t| t.elapsed() > POLL) {
            // Zero: before concluding anything, follow what conntrack says now (a
            // connection forwarded to a namespace not followed yet is not in the count).
            refresh(&mut follower, source.tracker_mut(), ports)?;
            last_follow = Some(Instant::now());
            counts = self::counts(source.tracker(), ports, &follower);
        }
        let tracker = source.tracker();
        let live: i64 = counts.iter().map(|(_, n)| n).sum();
        let elapsed = start.elapsed();
        let progress = Progress {
            elapsed,
            live,
            ports: counts,
            timeout_in: deadline.map(|d| d.saturating_duration_since(Instant::now())),
        };
        if live == 0 {
            // Straight to the outcome: its line says the count is 0, no progress line first.
            // Unless the kernel skipped the tracker since the last recheck and none ran in
            // this pass: then again from the top, which rechecks before it reads the counts
            // (a zero read after a recheck is one to conclude from, even on a host whose
            // other traffic keeps the kernel skipping the tracker).
            tracker.check_exact()?;
            if !fresh && tracker.stale() {
                recheck_now = true;
                continue;
            }
            return Ok(Outcome::Drained { elapsed });
        }
        let live_changed = last_live != Some(live);
        reporter.progress(&progress, live_changed)?;
        last_live = Some(live);
        if let Some(idle) = args.idle {
            // Checked when due, and soon after the count changed (a close may leave only
            // quiet connections), at most every IDLE_POLL.
            if live_changed {
                let soon = last_idle_check.map_or(Instant::now(), |t| t + IDLE_POLL);
                next_idle_check = Some(next_idle_check.map_or(soon, |t| t.min(soon)));
            }
            if next_idle_check.is_none_or(|t| Instant::now() >= t) {
                last_idle_check = Some(Instant::now());
                match not_idle_for(tracker, ports, &follower, idle, live)? {
                    None => {
                        tracker.check_exact()?;
                        if !fresh && tracker.stale() {
                            recheck_now = true;
                            next_idle_check = None;
                            continue;
                        }
                        return Ok(Outcome::Idle { elapsed, live });
                    }
                    Some(d) => next_idle_check = Some(Instant::now() + d),
                }
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(Outcome::Timeout {
                elapsed,
                live,
                left: leftovers(tracker, ports, &follower)?,
            });
        }
        // Through the maps opened at the start: no pin is opened again while waiting.
        if let Source::Gate(g) = source {
            if Instant::now() >= next_renewal {
                if !g.still_pinned() {
                    bail!("the gate was turned off (`drain-user gate off`) while waiting");
                }
                next_renewal = Instant::now() + g.renew_ttl()?;
                links.check(g, warned)?;
            }
        }
        // Until woken, or until the next thing that runs on a clock.
        let now = Instant::now();
        let mut nap = safety;
        if let Some(t) = next_idle_check {
            nap = nap.min(t.saturating_duration_since(now));
        }
        if let Some(d) = deadline {
            nap = nap.min(d.saturating_duration_since(now));
        }
        if matches!(source, Source::Gate(_)) {
            nap = nap.min(next_renewal.saturating_duration_since(now));
        }
        // Forwarded connections: those that end outside this host change no count, and a
        // followed server's new namespace must be found; nothing forwarded, nothing to do
        // (a zero count always reads conntrack afresh before it counts).
        let following = !follower.followed().is_empty()
            || !follower.local.is_empty()
            || !follower.elsewhere.is_empty();
        if let (true, Some(t)) = (following, last_follow) {
            nap = nap.min(FOLLOW_POLL.saturating_sub(t.elapsed()));
        }
        tokio::select! {
            _ = tokio::time::sleep(nap) => {}
            r = woken(&mut wake) => r?,
            _ = tokio::signal::ctrl_c() => return Ok(Outcome::Interrupted),
            _ = sigterm.recv() => return Ok(Outcome::Terminated),
        }
    }
}

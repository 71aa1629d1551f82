//! `wait`: block until the ports have drained (no live connections) or, with `--idle`,
//! until every connection left has nothing in flight and has been quiet for a while.
//!
//! The counts come from the kernel tracker through an mmapped array, so polling them every
//! few milliseconds costs a memory load: the last close is noticed within ~10 ms.

use std::{
    collections::BTreeSet,
    fs,
    io::IsTerminal,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::EbpfLoader;
use drain_common::GATE_ON;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::json;

use crate::{diag, gate, pins, state, track};

pub struct WaitArgs {
    pub ports: Vec<u16>,
    pub timeout: Option<Duration>,
    pub idle: Option<Duration>,
    pub json: bool,
}

/// Exit code when the timeout passes before the ports drain.
pub const EXIT_TIMEOUT: u8 = 3;
const POLL: Duration = Duration::from_millis(5);
/// inet_diag dumps (for --idle) are cheap but not free: this often at most.
const IDLE_POLL: Duration = Duration::from_millis(100);

/// A tracker loaded for one `wait` when no gate is installed; removed when dropped.
/// (bpffs refuses names with dots, hence `<netns>-wait-<pid>`.)
struct TempTracker {
    dir: PathBuf,
    _link: aya::programs::links::FdLink,
    _bpf: aya::Ebpf,
}

impl Drop for TempTracker {
    fn drop(&mut self) {
        let _lock = pins::lock();
        let _ = gate::teardown(&self.dir);
    }
}

/// Removes tracker directories left by `wait` processes that were killed (kill -9 leaves
/// their maps pinned; their tracker detached when the process died).
fn reap_stale(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split_once("-wait-"))
            .map(|(_, p)| p.to_owned())
        else {
            continue;
        };
        if !Path::new("/proc").join(&pid).exists() {
            let _ = gate::teardown(&e.path());
        }
    }
}

fn temp_tracker() -> Result<TempTracker> {
    // Under the lock: teardown elsewhere may remove the shared parent directory.
    let _lock = pins::lock()?;
    let gate_dir = pins::state_dir()?;
    let parent = gate_dir
        .parent()
        .context("state dir has a parent")?
        .to_path_buf();
    fs::create_dir_all(&parent)?;
    reap_stale(&parent);
    let dir = parent.join(format!(
        "{}-wait-{}",
        pins::netns_inode()?,
        std::process::id()
    ));
    fs::create_dir_all(&dir)?;
    let loaded = (|| {
        let mut bpf = EbpfLoader::new()
            .default_map_pin_directory(&dir)
            .load(gate::OBJECT)
            .context("loading the drain eBPF object")?;
        let link = track::attach(&mut bpf)?;
        track::seed(&dir)?;
        Ok::<_, anyhow::Error>((bpf, link))
    })();
    match loaded {
        Ok((bpf, link)) => Ok(TempTracker {
            dir,
            _link: link,
            _bpf: bpf,
        }),
        Err(e) => {
            let _ = gate::teardown(&dir);
            Err(e)
        }
    }
}

#[derive(Serialize)]
struct Leftover {
    peer: String,
    port: u16,
    state: &'static str,
    unread_bytes: u32,
    unsent_bytes: u32,
    idle_ms: Option<u32>,
}

/// The connections the counts are made of: an inet_diag dump filtered by the tracker's own
/// set (not by "the port has a listener", which a graceful server stop breaks).
fn tracked(dir: &Path, ports: &BTreeSet<u16>) -> Result<Vec<diag::Conn>> {
    let set = track::Set::open(dir)?;
    Ok(
        diag::dump(diag::States::ESTABLISHED | diag::States::CLOSE_WAIT, true)?
            .into_iter()
            .filter(|c| ports.contains(&c.local.port()) && set.contains(c.cookie))
            .collect(),
    )
}

fn leftovers(dir: &Path, ports: &BTreeSet<u16>) -> Result<Vec<Leftover>> {
    Ok(tracked(dir, ports)?
        .into_iter()
        .map(|c| Leftover {
            peer: c.peer.to_string(),
            port: c.local.port(),
            state: diag::state_name(c.state),
            unread_bytes: c.rqueue,
            unsent_bytes: c.wqueue,
            idle_ms: c.info.map(|i| i.last_data_recv_ms.min(i.last_data_sent_ms)),
        })
        .collect())
}

/// True when every live connection on `ports` has no unread, unsent or unacknowledged
/// bytes and has exchanged no data for `idle`.
fn all_idle(dir: &Path, ports: &BTreeSet<u16>, idle: Duration, live: i64) -> Result<bool> {
    let idle_ms = idle.as_millis().min(u32::MAX as u128) as u32;
    let conns = tracked(dir, ports)?;
    if (conns.len() as i64) < live {
        return Ok(false); // the dump missed some (opened since): not idle yet
    }
    Ok(conns.iter().all(|c| {
        let Some(i) = c.info else { return false };
        c.rqueue == 0
            && c.wqueue == 0
            && i.unacked == 0
            && i.notsent_bytes == 0
            && i.last_data_recv_ms.min(i.last_data_sent_ms) >= idle_ms
    }))
}

/// Pushes the gate's deadline forward while `wait` runs, so a long drain does not reopen
/// the gate early, while a `wait` that dies still lets the TTL open it.
fn renew_ttl(dir: &Path) -> Result<()> {
    if !dir.exists() {
        anyhow::bail!("the gate was turned off (`drain-user gate off`) while waiting");
    }
    let cfg = state::read_config(dir)?;
    if cfg.enabled != GATE_ON || cfg.ttl_ns == 0 {
        return Ok(());
    }
    let now = state::boottime_ns();
    if cfg.deadline_ns <= now || cfg.deadline_ns - now >= cfg.ttl_ns / 2 {
        return Ok(()); // expired stays expired; otherwise renew at half-life
    }
    let _lock = pins::lock()?;
    if !dir.exists() {
        return Ok(());
    }
    let mut cfg = state::read_config(dir)?;
    if cfg.enabled == GATE_ON {
        cfg.deadline_ns = state::boottime_ns().saturating_add(cfg.ttl_ns);
        state::write_config(dir, cfg)?;
    }
    Ok(())
}

pub async fn wait(args: WaitArgs) -> Result<ExitCode> {
    let gate_dir = pins::state_dir()?;
    let have_gate = pins::bpffs_mounted()? && gate_dir.exists();
    let mut ports: BTreeSet<u16> = args.ports.iter().copied().collect();
    if ports.is_empty() {
        if have_gate {
            ports = state::ports(&gate_dir)?
                .iter()
                .map(|(_, c)| c.port)
                .collect();
        }
        if ports.is_empty() {
            return Err(crate::usage(
                "no gate is on in this network namespace: name the ports to wait for with --port"
                    .into(),
            ));
        }
    }
    let gate_on = have_gate && state::read_config(&gate_dir)?.enabled == GATE_ON;
    if !gate_on {
        eprintln!(
            "drain-user: warning: the gate is off: new connections keep arriving, so the ports may never drain \
             (run `drain-user gate on --port ...` first)"
        );
    }
    let _temp;
    let dir = if have_gate {
        gate_dir.clone()
    } else {
        pins::ensure_bpffs()?;
        let t = temp_tracker()?;
        let d = t.dir.clone();
        _temp = t;
        d
    };
    let live = track::Live::open(&dir)?;
    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
    let list = list.join(",");

    let start = Instant::now();
    let deadline = args.timeout.map(|t| start + t);
    let bar = (!args.json && std::io::stderr().is_terminal()).then(|| {
        let b = ProgressBar::new_spinner();
        b.set_style(ProgressStyle::with_template("{spinner} {msg}").expect("valid template"));
        b.enable_steady_tick(Duration::from_millis(120));
        b
    });
    let mut last_total = None;
    let mut last_idle_check: Option<Instant> = None;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let counts: Vec<(u16, i64)> = ports.iter().map(|&p| (p, live.get(p).max(0))).collect();
        let total: i64 = counts.iter().map(|(_, n)| n).sum();
        let elapsed = start.elapsed();
        if last_total != Some(total) {
            last_total = Some(total);
            if args.json {
                let per: Vec<_> = counts
                    .iter()
                    .map(|(p, n)| json!({"port": p, "live_connections": n}))
                    .collect();
                println!(
                    "{}",
                    json!({"event": "progress", "elapsed_ms": elapsed.as_millis() as u64, "live": total, "ports": per})
                );
            } else if bar.is_none() {
                eprintln!("drain: {total} live connection(s) on port {list}");
            }
        }
        if let Some(b) = &bar {
            let left = deadline.map_or(String::new(), |d| {
                format!(
                    ", timeout in {:.1}s",
                    d.saturating_duration_since(Instant::now()).as_secs_f64()
                )
            });
            b.set_message(format!(
                "{total} live connection(s) on port {list}, {:.1}s elapsed{left}",
                elapsed.as_secs_f64()
            ));
        }
        if total == 0 {
            track::check_exact(&dir)?;
            return finish(&bar, args.json, "drained", elapsed, 0, &list);
        }
        if let Some(idle) = args.idle {
            if last_idle_check.is_none_or(|t| t.elapsed() >= IDLE_POLL) {
                last_idle_check = Some(Instant::now());
                if all_idle(&dir, &ports, idle, total)? {
                    track::check_exact(&dir)?;
                    return finish(&bar, args.json, "idle", elapsed, total, &list);
                }
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            let left = leftovers(&dir, &ports)?;
            if args.json {
                println!(
                    "{}",
                    json!({"event": "timeout", "elapsed_ms": elapsed.as_millis() as u64, "live": total, "remaining": left})
                );
            } else {
                eprintln!(
                    "drain: timed out after {:.1}s with {total} live connection(s) on port {list}:",
                    elapsed.as_secs_f64()
                );
                for l in &left {
                    let idle = l
                        .idle_ms
                        .map_or("?".into(), |ms| format!("{:.1}s", f64::from(ms) / 1000.0));
                    eprintln!(
                        "  {} -> :{} {} (unread {} B, unsent {} B, quiet {idle})",
                        l.peer, l.port, l.state, l.unread_bytes, l.unsent_bytes
                    );
                }
            }
            return Ok(ExitCode::from(EXIT_TIMEOUT));
        }
        if have_gate {
            renew_ttl(&dir)?;
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::from(130)),
            _ = sigterm.recv() => return Ok(ExitCode::from(143)),
        }
    }
}

fn finish(
    bar: &Option<ProgressBar>,
    json: bool,
    how: &str,
    elapsed: Duration,
    live: i64,
    list: &str,
) -> Result<ExitCode> {
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if json {
        println!(
            "{}",
            json!({"event": how, "elapsed_ms": elapsed.as_millis() as u64, "live": live})
        );
    } else if how == "drained" {
        println!(
            "drained: no live connections on port {list} (after {:.2}s)",
            elapsed.as_secs_f64()
        );
    } else {
        println!(
            "idle: {live} connection(s) still open on port {list}, none with data in flight or recent traffic (after {:.2}s); a graceful server stop can close them now",
            elapsed.as_secs_f64()
        );
    }
    Ok(ExitCode::SUCCESS)
}

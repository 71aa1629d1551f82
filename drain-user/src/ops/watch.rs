//! `watch`: a live view of the gate while a deploy runs: each refused SYN (source, port,
//! drop or RST), each tracked connection leaving the live set (with the count left), the
//! TTL running out, the gate going away.
//!
//! The kernel emits events into a ring buffer only while `DRAIN_WATCH.until_ns` lies in
//! the future; this loop pushes it forward every second, so a killed watcher stops costing
//! the data path anything within [`LEASE`]. Events are sampled per CPU by a GCRA limit
//! (`--rate`); what the limit held back is counted in the kernel and reported here, so the
//! events plus the `limited` counts add up to the gate's own counters.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::maps::{Array, Map, MapData, PerCpuArray, RingBuf};
use drain_common::{
    map, WatchConfig, WatchCpu, WatchEvent, EVENT_LEFT, EVENT_REFUSED_RST, GATE_ON,
};
use serde::Serialize;

use crate::{
    outln, pins,
    state::{boottime_ns, OpenGate},
};

/// How far ahead each renewal sets `until_ns`.
const LEASE: Duration = Duration::from_secs(3);

pub struct WatchArgs {
    pub json: bool,
    /// Events per second, per kind, for the whole host (split between CPUs).
    pub rate: u32,
    /// Stop after this long (None: until interrupted or the gate goes away).
    pub duration: Option<Duration>,
}

/// One line of `watch --json`.
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The first line: events flow from here on, at most `rate` per second of each kind.
    Watching { rate: u32 },
    /// A SYN to a gated port was refused.
    Refused {
        source: IpAddr,
        sport: u16,
        port: u16,
        /// "drop" or "rst".
        action: &'static str,
    },
    /// A tracked connection left the live set (closed, or moved past CLOSE_WAIT).
    Left {
        port: u16,
        /// The remote end.
        peer: IpAddr,
        peer_port: u16,
        live: i64,
    },
    /// What the rate limit held back (and events lost to a full ring) since the last
    /// such line; printed once a second when something was held back, and at the end.
    Limited { refused: u64, left: u64, lost: u64 },
    /// The TTL ran out: the kernel lets every connection through.
    TtlExpired,
    /// The gate was turned off (or removed): nothing left to watch.
    GateOff,
}

impl Event {
    fn human(&self) -> String {
        match self {
            Event::Watching { rate } => {
                format!("watching the gate (at most {rate} events/s of each kind; Ctrl-C to stop)")
            }
            Event::Refused {
                source,
                sport,
                port,
                action,
            } => {
                let src = match source {
                    IpAddr::V6(a) => format!("[{a}]:{sport}"),
                    IpAddr::V4(a) => format!("{a}:{sport}"),
                };
                format!("refused  {src} -> port {port} ({action})")
            }
            Event::Left {
                port,
                peer,
                peer_port,
                live,
            } => {
                let from = match peer {
                    IpAddr::V6(a) => format!("[{a}]:{peer_port}"),
                    IpAddr::V4(a) => format!("{a}:{peer_port}"),
                };
                format!("closed   a connection on port {port} (from {from}): {live} left")
            }
            Event::Limited { refused, left, lost } => format!(
                "sampled  not shown: {refused} refused SYNs, {left} closes (rate limit); {lost} lost"
            ),
            Event::TtlExpired => "ttl      the TTL ran out: the gate lets every connection through".into(),
            Event::GateOff => "off      the gate was turned off".into(),
        }
    }
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Option<Event> {
    if bytes.len() < std::mem::size_of::<WatchEvent>() {
        return None;
    }
    let ev: WatchEvent = bytemuck::pod_read_unaligned(&bytes[..std::mem::size_of::<WatchEvent>()]);
    Some(match ev.kind {
        EVENT_LEFT => Event::Left {
            port: ev.port,
            // IPv4 peers come as ::ffff:a.b.c.d: shown as IPv4.
            peer: Ipv6Addr::from(ev.addr).to_canonical(),
            peer_port: ev.sport,
            live: ev.left,
        },
        kind => Event::Refused {
            source: if ev.family == 6 {
                Ipv6Addr::from(ev.addr).into()
            } else {
                Ipv4Addr::new(ev.addr[0], ev.addr[1], ev.addr[2], ev.addr[3]).into()
            },
            sport: ev.sport,
            port: ev.port,
            action: if kind == EVENT_REFUSED_RST {
                "rst"
            } else {
                "drop"
            },
        },
    })
}

struct Maps {
    config: Array<MapData, WatchConfig>,
    cpus: PerCpuArray<MapData, WatchCpu>,
    ring: RingBuf<MapData>,
}

fn open_maps(dir: &std::path::Path) -> Result<Maps> {
    let old = "this gate was made by a drain-user without `watch`: run `drain-user gate off` \
               and `gate on` again";
    let open = |name: &str| pins::open_map(dir, name).context(old);
    Ok(Maps {
        config: Array::try_from(Map::Array(open(map::WATCH)?))?,
        cpus: PerCpuArray::try_from(Map::PerCpuArray(open(map::WATCH_RL)?))?,
        ring: RingBuf::try_from(Map::RingBuf(open(map::EVENTS)?))?,
    })
}

fn limited_sum(cpus: &PerCpuArray<MapData, WatchCpu>) -> Result<WatchCpu> {
    Ok(cpus
        .get(&0, 0)
        .context("reading DRAIN_WATCH_RL")?
        .iter()
        .sum())
}

pub fn watch(args: &WatchArgs) -> Result<()> {
    let dir = pins::gate_dir()?;
    if !pins::bpffs_mounted()? || !dir.exists() {
        bail!(
            "no gate in this network namespace: nothing to watch (run `drain-user gate on` first)"
        );
    }
    let gate = OpenGate::open(&dir)?;
    let mut maps = open_maps(&dir)?;
    let ncpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))? as u32;
    let (interval_ns, burst) = crate::limits::limiter(args.rate, ncpus);
    let print = |e: &Event| -> Result<()> {
        if args.json {
            outln!("{}", serde_json::to_string(e)?)
        } else {
            outln!("{}", e.human())
        }
    };
    let arm = |maps: &mut Maps, until_ns: u64| {
        maps.config
            .set(
                0,
                WatchConfig {
                    until_ns,
                    interval_ns,
                    burst,
                },
                0,
            )
            .context("writing DRAIN_WATCH")
    };
    let mut base = limited_sum(&maps.cpus)?;
    arm(&mut maps, boottime_ns() + LEASE.as_nanos() as u64)?;
    print(&Event::Watching { rate: args.rate })?;
    let started = Instant::now();
    let mut last_tick = Instant::now();
    let mut ttl_reported = false;
    let result = (|| -> Result<()> {
        loop {
            while let Some(item) = maps.ring.next() {
                if let Some(e) = decode(&item) {
                    print(&e)?;
                }
            }
            let done = args.duration.is_some_and(|d| started.elapsed() >= d);
            if done || last_tick.elapsed() >= Duration::from_secs(1) {
                last_tick = Instant::now();
                let now = limited_sum(&maps.cpus)?;
                let delta = Event::Limited {
                    refused: now.refused_limited - base.refused_limited,
                    left: now.left_limited - base.left_limited,
                    lost: now.lost - base.lost,
                };
                if done
                    || !matches!(
                        delta,
                        Event::Limited {
                            refused: 0,
                            left: 0,
                            lost: 0
                        }
                    )
                {
                    print(&delta)?;
                }
                base = now;
                if done {
                    return Ok(());
                }
                if !gate.still_pinned() {
                    print(&Event::GateOff)?;
                    return Ok(());
                }
                let cfg = gate.config()?;
                if cfg.enabled != GATE_ON {
                    print(&Event::GateOff)?;
                    return Ok(());
                }
                if !ttl_reported && cfg.deadline_ns != 0 && boottime_ns() >= cfg.deadline_ns {
                    ttl_reported = true;
                    print(&Event::TtlExpired)?;
                }
                arm(&mut maps, boottime_ns() + LEASE.as_nanos() as u64)?;
            }
            let mut pfd = libc::pollfd {
                fd: maps.ring.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; a timeout keeps the once-a-second work going.
            unsafe { libc::poll(&mut pfd, 1, 100) };
        }
    })();
    // Stop the kernel's events now rather than at the lease's end (a concurrent watcher
    // re-arms within a second).
    if gate.still_pinned() {
        let _ = arm(&mut maps, 0);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_decode() {
        let mut ev = WatchEvent {
            kind: drain_common::EVENT_REFUSED_DROP,
            family: 4,
            sport: 40000,
            port: 80,
            ..Default::default()
        };
        ev.addr[..4].copy_from_slice(&[198, 18, 0, 2]);
        let e = decode(bytemuck::bytes_of(&ev)).unwrap();
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"event":"refused","source":"198.18.0.2","sport":40000,"port":80,"action":"drop"}"#
        );
        assert_eq!(e.human(), "refused  198.18.0.2:40000 -> port 80 (drop)");
        let left = WatchEvent {
            kind: EVENT_LEFT,
            family: 6,
            addr: drain_common::v4_mapped([198, 18, 0, 2]),
            sport: 51234,
            port: 443,
            left: 2,
            ..Default::default()
        };
        let e = decode(bytemuck::bytes_of(&left)).unwrap();
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"event":"left","port":443,"peer":"198.18.0.2","peer_port":51234,"live":2}"#
        );
        assert_eq!(
            e.human(),
            "closed   a connection on port 443 (from 198.18.0.2:51234): 2 left"
        );
        assert!(decode(&[0; 8]).is_none());
    }
}

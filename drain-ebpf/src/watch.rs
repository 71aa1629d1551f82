//! Events for `drain-user watch`: each refused SYN and each connection leaving the live set,
//! sampled by a per-CPU rate limit so a flood cannot drown the reader, into a ring buffer.
//!
//! While nobody watches (`WatchConfig::until_ns` is 0) an event costs one array load,
//! which the verifier inlines; a watcher that died stops costing more within seconds
//! (its `until_ns` passes). See drain-common for each map's contract.

use aya_ebpf::{
    helpers::bpf_ktime_get_boot_ns,
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
};
use drain_common::{ConnKey, WatchConfig, WatchCpu, WatchEvent, EVENTS_BYTES, EVENT_LEFT};

use crate::{
    hdr::{Ipv4Hdr, Ipv6Hdr, TcpHdr},
    parse::{hdr_at, Family, Request},
    ratelimit::gcra,
};

/// Array[1] of WatchConfig, written by `drain-user watch`.
#[map(name = "DRAIN_WATCH")]
static WATCH: Array<WatchConfig> = Array::pinned(1, 0);

/// Per-CPU limiter state and counts of what it held back; summed by `drain-user watch`.
#[map(name = "DRAIN_WATCH_RL")]
static WATCH_RL: PerCpuArray<WatchCpu> = PerCpuArray::pinned(1, 0);

/// The events, read by `drain-user watch`.
#[map(name = "DRAIN_EVENTS")]
static EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);

/// The watch config and this CPU's limiter when someone watches now, with the time.
#[inline(always)]
fn watching() -> Option<(&'static WatchConfig, &'static mut WatchCpu, u64)> {
    let cfg = WATCH.get(0)?;
    if cfg.until_ns == 0 {
        return None;
    }
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if now >= cfg.until_ns {
        return None;
    }
    // SAFETY: per-CPU value, only this CPU touches it while this program runs.
    let cpu = unsafe { &mut *WATCH_RL.get_ptr_mut(0)? };
    Some((cfg, cpu, now))
}

#[inline(always)]
fn emit(cpu: &mut WatchCpu, ev: &WatchEvent) {
    if EVENTS.output::<WatchEvent>(ev, 0).is_err() {
        cpu.lost += 1;
    }
}

/// A SYN to a gated port was refused (`kind`: drop or RST). The frame is `[start, end)`.
/// While nobody watches this is one inlined array load and a compare; only then is the
/// event built, in a subprogram of its own ([`refused_event`]).
#[inline(always)]
pub fn refused(start: usize, end: usize, req: &Request, kind: u32) {
    if WATCH.get(0).is_none_or(|cfg| cfg.until_ns == 0) {
        return;
    }
    refused_event(start, end, req, kind);
}

/// The event of [`refused`]. A BPF subprogram of its own, not inlined: inlined into the
/// verdict's register pressure, LLVM spills a register the verifier has not seen written on
/// one path (`!read_ok`); the call is made only while someone watches.
#[inline(never)]
fn refused_event(start: usize, end: usize, req: &Request, kind: u32) {
    let Some((cfg, cpu, now)) = watching() else {
        return;
    };
    if !gcra(&mut cpu.next_refused_ns, now, cfg.interval_ns, cfg.burst) {
        cpu.refused_limited += 1;
        return;
    }
    let sport = hdr_at::<TcpHdr>(start, end, req.l4).map_or(0, |t| t.sport.get());
    // The source address is read here, only for an event that is sent: the parser leaves
    // it in the frame so the packet path never touches it.
    let mut addr = [0u8; 16];
    let family = match req.family {
        Family::V4 => {
            if let Ok(ip) = hdr_at::<Ipv4Hdr>(start, end, req.l3) {
                addr[0] = ip.saddr[0];
                addr[1] = ip.saddr[1];
                addr[2] = ip.saddr[2];
                addr[3] = ip.saddr[3];
            }
            4
        }
        Family::V6 => {
            if let Ok(ip) = hdr_at::<Ipv6Hdr>(start, end, req.l3) {
                addr = ip.saddr;
            }
            6
        }
    };
    emit(
        cpu,
        &WatchEvent {
            ts_ns: now,
            kind,
            family,
            addr,
            sport,
            port: req.dport,
            _pad: 0,
            _reserved: 0,
            left: 0,
        },
    );
}

/// The connection `conn` on local `port` left the live set; `left` are still live there.
#[inline(always)]
pub fn left(conn: &ConnKey, port: u32, left: i64) {
    let Some((cfg, cpu, now)) = watching() else {
        return;
    };
    if !gcra(&mut cpu.next_left_ns, now, cfg.interval_ns, cfg.burst) {
        cpu.left_limited += 1;
        return;
    }
    emit(
        cpu,
        &WatchEvent {
            ts_ns: now,
            kind: EVENT_LEFT,
            family: 6,
            addr: conn.raddr,
            sport: conn.rport,
            port: port as u16,
            left,
            ..WatchEvent::default()
        },
    );
}

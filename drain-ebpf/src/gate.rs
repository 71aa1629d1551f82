//! The gate verdict and the maps it reads. See drain-common for each map's contract.

use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_ktime_get_boot_ns},
    macros::map,
    maps::{lpm_trie::Key, Array, LpmTrie, PerCpuArray},
};
use drain_common::{
    CpuClock, GateConfig, PortStats, ALLOW_V4, ALLOW_V6, CLOCK_REREAD_NS, EVENT_REFUSED_DROP,
    EVENT_REFUSED_RST, GATE_ON, MAX_ALLOW_PREFIXES, MAX_GATED_PORTS, POLICY_RESET,
};

use crate::{
    hdr::{Ipv4Hdr, Ipv6Hdr},
    parse::{self, hdr_at, Family, Request},
};

/// Array[1] of GateConfig: the global switch, written by `drain-user gate on|off`.
#[map(name = "DRAIN_CONFIG")]
pub(crate) static CONFIG: Array<GateConfig> = Array::pinned(1, 0);

/// Array[65536] of u32 by local port: 0 = not gated, else the port's stats slot.
/// Written by `drain-user gate on`.
#[map(name = "DRAIN_PORTS")]
pub(crate) static PORTS: Array<u32> = Array::pinned(65536, 0);

/// PerCpuArray of PortStats by slot; written here, summed by `drain-user status`.
#[map(name = "DRAIN_STATS")]
pub(crate) static STATS: PerCpuArray<PortStats> = PerCpuArray::pinned(MAX_GATED_PORTS + 1, 0);

/// IPv4 sources allowed through a closed gate; written by `drain-user gate on --allow`.
#[map(name = "DRAIN_ALLOW4")]
pub(crate) static ALLOW4: LpmTrie<[u8; 4], u8> = LpmTrie::pinned(MAX_ALLOW_PREFIXES, 0);

/// IPv6 sources allowed through a closed gate; written by `drain-user gate on --allow`.
#[map(name = "DRAIN_ALLOW6")]
pub(crate) static ALLOW6: LpmTrie<[u8; 16], u8> = LpmTrie::pinned(MAX_ALLOW_PREFIXES, 0);

/// Per-CPU RST limiter state (the earliest time the next RST may go, GCRA) and last clock
/// reading (see [`Clock`]). Per CPU so the packet path needs no atomics; the user side
/// divides the rate. One map for both: a refusal under policy reset needs both, and every
/// lookup costs.
#[map(name = "DRAIN_RST_CLOCK")]
static CPU_CLOCK: PerCpuArray<CpuClock> = PerCpuArray::pinned(1, 0);

pub enum Verdict {
    Pass,
    /// The frame ended before its TCP flags: it passes, unless the caller can make more of
    /// it readable and ask again (TC, for a frame split across skb fragments).
    Truncated,
    /// Refuse by dropping (policy drop, or the RST budget is spent).
    Refuse,
    /// Refuse with a RST (policy reset, within the RST budget): the frame goes on to the
    /// stack, where the namespace-wide refusal (refuse.rs) makes TCP answer it with a RST.
    /// Counted there, once the kernel sends that RST.
    Reset,
}

/// CLOCK_BOOTTIME as the gate reads it. `bpf_ktime_get_boot_ns` is the dearest step of a
/// refusal (it costs more than the rest of the program together where the clock source is
/// virtualised), so the reading is kept per CPU with the jiffies count after it, and reused
/// while jiffies have not moved: such a reading is less than one tick old, and never ahead
/// of the true time. `bpf_jiffies64` is a plain memory load once the verifier inlines it.
struct Clock(Option<*mut CpuClock>);

impl Clock {
    #[inline(always)]
    fn new() -> Self {
        Self(CPU_CLOCK.get_ptr_mut(0))
    }

    /// A fresh reading, remembered for the rest of this tick.
    #[inline(always)]
    fn read(&mut self) -> u64 {
        // SAFETY: helpers without preconditions.
        let now = unsafe { bpf_ktime_get_boot_ns() };
        if let Some(c) = self.0 {
            // SAFETY: per-CPU value, only this CPU touches it while this program runs.
            unsafe {
                (*c).boot_ns = now;
                (*c).jiffies = bpf_jiffies64();
            }
        }
        now
    }

    /// A reading at most one tick old: the one remembered, if taken in the current tick.
    #[inline(always)]
    fn recent(&mut self) -> u64 {
        // SAFETY: a helper without preconditions.
        let jiffies = unsafe { bpf_jiffies64() };
        if let Some(c) = self.0 {
            // SAFETY: as above.
            unsafe {
                if (*c).jiffies == jiffies {
                    return (*c).boot_ns;
                }
            }
        }
        self.read()
    }

    /// One RST per `interval` on average, `burst` at once ([`crate::ratelimit::gcra`]).
    /// True = send. `now` may lag the true time by up to a tick ([`Clock::recent`]): the limiter then
    /// runs on a clock that is slightly late, which can delay a RST but never lets more
    /// through.
    #[inline(always)]
    fn rst_allowed(&mut self, now: u64, interval: u64, burst: u64) -> bool {
        let Some(c) = self.0 else {
            return false;
        };
        // SAFETY: per-CPU value, only this CPU touches it while this program runs.
        crate::ratelimit::gcra(unsafe { &mut (*c).rst_next_ns }, now, interval, burst)
    }
}

/// True when the request's source address is on the allowlist of its family. The address is
/// read here, not by the parser, so a gate without an allowlist never touches it.
#[inline(always)]
fn allowlisted(start: usize, end: usize, req: &Request, allow: u32) -> Result<bool, ()> {
    Ok(match req.family {
        Family::V4 if allow & ALLOW_V4 != 0 => {
            let ip: &Ipv4Hdr = hdr_at(start, end, req.l3)?;
            ALLOW4.get(Key::new(32, ip.saddr)).is_some()
        }
        Family::V6 if allow & ALLOW_V6 != 0 => {
            let ip: &Ipv6Hdr = hdr_at(start, end, req.l3)?;
            ALLOW6.get(Key::new(128, ip.saddr)).is_some()
        }
        _ => false,
    })
}

/// Decides one frame. The parser rejects everything but a connection request before any
/// map is read; a request to a port that is not gated costs one inlined array read more.
#[inline(always)]
pub fn verdict(start: usize, end: usize) -> Verdict {
    let req = match parse::connection_request(start, end) {
        Ok(Some(req)) => req,
        Ok(None) => return Verdict::Pass,
        Err(()) => return Verdict::Truncated,
    };
    let slot = match PORTS.get(req.dport as u32) {
        Some(&slot) if slot != 0 => slot,
        _ => return Verdict::Pass,
    };
    let Some(stats) = STATS.get_ptr_mut(slot) else {
        return Verdict::Pass;
    };
    // SAFETY: a per-CPU slot is only touched by this CPU while this program runs.
    let stats = unsafe { &mut *stats };
    let Some(cfg) = CONFIG.get(0) else {
        stats.syns_passed += 1;
        return Verdict::Pass;
    };
    if cfg.enabled != GATE_ON {
        stats.syns_passed += 1;
        return Verdict::Pass;
    }
    // XDP and TC alike, any header layout: the RST is the kernel's (refuse.rs).
    let reset = cfg.policy == POLICY_RESET;
    // The deadline is what makes a forgotten gate open by itself, with no process alive.
    let deadline = cfg.deadline_ns;
    // `gate on --announce`: the gate is on, but SYNs still pass until this time.
    let announce = cfg.announce_ns;
    // The clock is read only when something needs it: a deadline, an announcement, or the
    // RST limiter.
    let mut clock = if deadline != 0 || reset || announce != 0 {
        Clock::new()
    } else {
        Clock(None)
    };
    let mut now = 0;
    if deadline != 0 {
        now = clock.recent();
        // A reading taken in this tick is never ahead of the true time, so `now >= deadline`
        // is exact; below it the true time is at most a tick later, which only matters
        // close to the deadline: there, read the clock afresh.
        if now < deadline && deadline - now <= CLOCK_REREAD_NS {
            now = clock.read();
        }
        if now >= deadline {
            stats.syns_passed += 1;
            stats.syns_expired += 1;
            return Verdict::Pass;
        }
    } else if reset || announce != 0 {
        now = clock.recent();
    }
    // Announced, not yet closing: the balancer has been told to drain and is given until
    // then to stop. A reading one tick late lets SYNs pass a tick longer: the open side.
    if now < announce {
        stats.syns_passed += 1;
        return Verdict::Pass;
    }
    match allowlisted(start, end, &req, cfg.allow) {
        Ok(false) => {}
        Ok(true) => {
            stats.syns_passed += 1;
            stats.syns_allowed += 1;
            return Verdict::Pass;
        }
        // Cannot happen (the parser read this header already); fail open.
        Err(()) => return Verdict::Pass,
    }
    // Under policy reset a refusal is counted where its fate is known: here when the RST
    // budget is spent (dropped), in refuse.rs when the kernel sends the RST.
    if reset {
        if clock.rst_allowed(now, cfg.rst_interval_ns, cfg.rst_burst) {
            crate::watch::refused(start, end, &req, EVENT_REFUSED_RST);
            return Verdict::Reset;
        }
        stats.rst_limited += 1;
    }
    stats.syns_refused += 1;
    crate::watch::refused(start, end, &req, EVENT_REFUSED_DROP);
    Verdict::Refuse
}

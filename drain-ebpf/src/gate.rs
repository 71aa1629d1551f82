//! The gate verdict and the maps it reads. See drain-common for each map's contract.

use aya_ebpf::{
    helpers::bpf_ktime_get_boot_ns,
    macros::map,
    maps::{lpm_trie::Key, Array, LpmTrie, PerCpuArray},
};
use drain_common::{
    GateConfig, PortStats, ALLOW_V4, ALLOW_V6, GATE_ON, MAX_ALLOW_PREFIXES, MAX_GATED_PORTS,
    POLICY_RESET,
};

use crate::parse::{self, Source};

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

/// Per-CPU RST limiter state: the earliest time (CLOCK_BOOTTIME ns) the next RST may go
/// (GCRA). Per CPU so the packet path needs no atomics; the user side divides the rate.
#[map(name = "DRAIN_RST_RL")]
static RST_RL: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

pub enum Verdict {
    Pass,
    /// Refuse by dropping (policy drop, or the RST budget is spent).
    Refuse,
    /// Refuse with a RST (policy reset, within the RST budget): the frame goes on to the
    /// stack, where the namespace-wide refusal (refuse.rs) makes TCP answer it with a RST.
    /// Counted there, once the kernel sends that RST.
    Reset,
}

/// GCRA: one RST per `interval` on average, `burst` at once. True = send.
/// `next` is the earliest time of the next RST; holding it no lower than
/// `now - interval * (burst - 1)` caps what an idle bucket saves up at `burst` sends.
#[inline(always)]
fn rst_allowed(now: u64, interval: u64, burst: u64) -> bool {
    let Some(next) = RST_RL.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU value, only this CPU touches it while this program runs.
    let next = unsafe { &mut *next };
    // Plain multiply: user space keeps interval * burst far below 2^64 (a checked one
    // would need 128-bit arithmetic, which BPF lacks).
    let floor = now.saturating_sub(interval.wrapping_mul(burst.saturating_sub(1)));
    if *next < floor {
        *next = floor;
    }
    if *next > now {
        return false;
    }
    *next += interval;
    true
}

/// Decides one frame. Only a connection request to a gated port reaches past the first
/// array lookup, so everything else costs a parse and one inlined array read.
#[inline(always)]
pub fn verdict(start: usize, end: usize) -> Verdict {
    let Ok(Some(req)) = parse::connection_request(start, end) else {
        return Verdict::Pass;
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
    // The deadline is what makes a forgotten gate open by itself, with no process alive.
    // The clock is read only when something needs it (a deadline, or the RST limiter).
    let now = if cfg.deadline_ns != 0 || cfg.policy == POLICY_RESET {
        unsafe { bpf_ktime_get_boot_ns() }
    } else {
        0
    };
    if cfg.deadline_ns != 0 && now >= cfg.deadline_ns {
        stats.syns_passed += 1;
        stats.syns_expired += 1;
        return Verdict::Pass;
    }
    let allowed = match &req.source {
        Source::V4(a) => cfg.allow & ALLOW_V4 != 0 && ALLOW4.get(Key::new(32, *a)).is_some(),
        Source::V6(a) => cfg.allow & ALLOW_V6 != 0 && ALLOW6.get(Key::new(128, *a)).is_some(),
    };
    if allowed {
        stats.syns_passed += 1;
        stats.syns_allowed += 1;
        return Verdict::Pass;
    }
    // Under policy reset a refusal is counted where its fate is known: here when the RST
    // budget is spent (dropped), in refuse.rs when the kernel sends the RST.
    if cfg.policy == POLICY_RESET {
        if rst_allowed(now, cfg.rst_interval_ns, cfg.rst_burst) {
            return Verdict::Reset;
        }
        stats.rst_limited += 1;
    }
    stats.syns_refused += 1;
    Verdict::Refuse
}

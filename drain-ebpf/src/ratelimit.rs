//! GCRA, the rate limiter of RSTs (gate.rs) and of watch events (watch.rs), per CPU so the
//! packet path needs no atomics.

/// One event per `interval` on average, `burst` at once. True = go ahead.
/// `next` is the earliest time of the next event; holding it no lower than
/// `now - interval * (burst - 1)` caps what an idle limiter saves up at `burst` events.
#[inline(always)]
pub fn gcra(next: &mut u64, now: u64, interval: u64, burst: u64) -> bool {
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

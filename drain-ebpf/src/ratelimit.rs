//! GCRA, the rate limiter of RSTs (gate.rs) and of watch events (watch.rs), per CPU so the
//! packet path needs no atomics.

/// One event per `interval` on average, `burst` at once. True = go ahead.
/// `next` is the earliest time of the next event; holding it no lower than
/// `now - interval * (burst - 1)` caps what an idle limiter saves up at `burst` events.
#[inline(always)]
pub fn gcra(next: &mut u64, now: u64, interval: u64, burst: u64) -> bool {
    // Over the limit, the common case under a flood, first: the floor is at most `now`, so
    // it could not have moved a `next` that lies beyond `now`.
    if *next > now {
        return false;
    }
    // Plain multiply: user space keeps interval * burst far below 2^64 (a checked one
    // would need 128-bit arithmetic, which BPF lacks).
    let floor = now.saturating_sub(interval.wrapping_mul(burst.saturating_sub(1)));
    if *next < floor {
        *next = floor;
    }
    *next += interval;
    true
}

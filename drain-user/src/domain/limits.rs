//! The limits a gate's input is held to, each written once: how many ports one gate holds,
//! and how a rate (RSTs under policy reset, `watch`'s events) becomes the kernel's per-CPU
//! limiter settings.

use anyhow::Result;
use drain_common::MAX_GATED_PORTS;

use crate::domain::usage;

/// `n` distinct ports fit in one gate (the kernel's stats map has [`MAX_GATED_PORTS`]
/// slots), or a usage error saying so.
pub fn check_port_count(n: usize) -> Result<()> {
    if n > MAX_GATED_PORTS as usize {
        return Err(usage(format!(
            "{n} ports given: a gate holds at most {MAX_GATED_PORTS}"
        )));
    }
    Ok(())
}

/// The per-CPU GCRA settings (interval ns, burst) for at most `rate` events per second on
/// `ncpus` CPUs together. The limiter is per CPU (no atomics on the packet path), so each CPU
/// gets `ncpus / rate` seconds between events, rounded UP: the CPUs together then stay
/// within the rate (rounded down they would exceed it by up to one event per interval);
/// this also holds when the rate is below the number of CPUs, where `rate / ncpus` would
/// round to 0. Bursts are a tenth of a second's worth, at least one.
pub fn limiter(rate: u32, ncpus: u32) -> (u64, u64) {
    let ncpus = u64::from(ncpus.max(1));
    let rate = u64::from(rate.max(1));
    let interval = (1_000_000_000 * ncpus).div_ceil(rate);
    let burst = (rate / ncpus / 10).max(1);
    (interval, burst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_splits_the_rate_between_cpus() {
        assert_eq!(limiter(100, 2), (20_000_000, 5));
        assert_eq!(limiter(1, 4), (4_000_000_000, 1));
        assert_eq!(limiter(0, 0), (1_000_000_000, 1));
        // Rounded up: 3/s on one CPU is one every 333,333,333.3 ns, so at most 3 a second.
        assert_eq!(limiter(3, 1), (333_333_334, 1));
    }

    #[test]
    fn port_count() {
        assert!(check_port_count(MAX_GATED_PORTS as usize).is_ok());
        let e = check_port_count(MAX_GATED_PORTS as usize + 1).unwrap_err();
        assert_eq!(e.to_string(), "65 ports given: a gate holds at most 64");
    }
}

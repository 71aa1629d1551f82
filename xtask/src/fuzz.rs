//! `cargo xtask fuzz [--frames N] [--seed S]`: the differential fuzzer of the gate programs
//! (tests/tests/fuzz.rs) for as long as asked. The CI run (`cargo xtask test`) uses 100,000
//! frames and a fixed seed; this one defaults to a million frames and a new seed each time,
//! printed with the frame count, mismatches and frames/s so a failure can be replayed with
//! `--seed`.

use std::process::Command;

use anyhow::{Context, Result};

/// Runs the fuzz test with `frames` frames and `seed` (a new one from the clock if None).
pub fn run(frames: u64, seed: Option<u64>) -> Result<()> {
    let seed = seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        t.as_secs().rotate_left(32) ^ u64::from(t.subsec_nanos()) ^ u64::from(std::process::id())
    });
    eprintln!("xtask: fuzzing {frames} frames with seed {seed:#x}");
    crate::run(
        Command::new("cargo")
            .current_dir(crate::workspace_root())
            .args([
                "test",
                "--package",
                "drain-tests",
                "--test",
                "fuzz",
                "--",
                "--include-ignored",
                "--nocapture",
                "--exact",
                "differential_fuzz",
            ])
            .env("DRAIN_FUZZ_FRAMES", frames.to_string())
            .env("DRAIN_FUZZ_SEED", format!("{seed:#x}")),
    )
    .with_context(|| {
        format!(
            "the fuzzer failed: replay with `cargo xtask fuzz --frames {frames} --seed {seed:#x}`"
        )
    })
}

/// `--seed`: decimal or 0x-hex.
pub fn parse_seed(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s:?} is not a seed (decimal or 0x-hex): {e}"))
}

//! Differential fuzzing of the gate programs: random and mutated frames through
//! BPF_PROG_TEST_RUN for XDP and TC, each verdict, output frame and counter delta compared
//! with the model in drain_tests::gatemodel (the independent classifier plus the gate's
//! documented logic), under gate states that change every batch: on/off, deadline past or
//! ahead, allowlists consulted or not (and one that allows every IPv4 source), policy drop
//! or reset with the RST budget available or spent.
//!
//! - [`corpus_replays_under_every_gate_state`]: every frame of tests/corpus/frames.hex under
//!   every gate state, counters checked per frame.
//! - [`differential_fuzz`]: `DRAIN_FUZZ_FRAMES` frames (default 100,000, the CI run),
//!   seed `DRAIN_FUZZ_SEED` (default fixed, so CI is reproducible; `cargo xtask fuzz` picks a
//!   new one each run and prints it). Per frame: verdict and output of both programs; per
//!   batch of [`BATCH`] frames: the counter deltas summed; on 1% of frames, chosen by the
//!   PRNG, the counters per frame too. A batch whose sums disagree is replayed frame by
//!   frame to name the frame. Prints frames, seed, mismatches and frames/s.

use std::{collections::BTreeMap, time::Instant};

use drain_common::{GateConfig, ALLOW_V4, ALLOW_V6, GATE_OFF, GATE_ON, POLICY_DROP, POLICY_RESET};
use drain_tests::{
    classify::classify,
    frames::hex,
    fuzz::{corpus, mutate, mutate_bytes, random_frame, Coverage, Rng},
    gatemodel::*,
};

/// Frames and seed of the CI run.
const CI_FRAMES: usize = 100_000;
const CI_SEED: u64 = 0x6472_6169_6e5f_667a;
/// Frames per gate state; counters are compared once per batch.
const BATCH: usize = 1000;
/// Mismatch messages kept for the report (all are counted).
const KEEP: usize = 10;

/// One gate state: what `gate on` / `gate off` / the TTL can leave in the maps.
#[derive(Clone, Copy, Debug)]
struct State {
    enabled: u32,
    deadline: Deadline,
    allow: u32,
    /// 0.0.0.0/0 in the IPv4 allowlist (`--allow 0.0.0.0/0`): every IPv4 source passes.
    allow_all_v4: bool,
    policy: u32,
    budget: RstBudget,
}

#[derive(Clone, Copy, Debug)]
enum Deadline {
    None,
    /// One second ago, and 1 ns after boot: both passed.
    Past,
    One,
    /// An hour ahead, and u64::MAX: both ahead.
    Ahead,
    Max,
}

impl State {
    fn apply(&self, g: &mut Gate, all_v4_present: &mut bool) {
        if self.allow_all_v4 != *all_v4_present {
            if self.allow_all_v4 {
                g.allow4([0; 4], 0);
            } else {
                g.disallow4([0; 4], 0);
            }
            *all_v4_present = self.allow_all_v4;
        }
        let now = boottime_ns();
        let deadline_ns = match self.deadline {
            Deadline::None => 0,
            Deadline::Past => now - 1_000_000_000,
            Deadline::One => 1,
            Deadline::Ahead => now + 3_600_000_000_000,
            Deadline::Max => u64::MAX,
        };
        g.set_rst_budget(self.budget);
        g.configure(GateConfig {
            enabled: self.enabled,
            policy: self.policy,
            deadline_ns,
            allow: self.allow,
            ..Default::default()
        });
    }

    fn random(r: &mut Rng) -> Self {
        Self {
            enabled: r.pick(&[GATE_ON, GATE_ON, GATE_ON, GATE_ON, GATE_OFF, 7]),
            deadline: r.pick(&[
                Deadline::None,
                Deadline::None,
                Deadline::Ahead,
                Deadline::Ahead,
                Deadline::Max,
                Deadline::Past,
                Deadline::One,
            ]),
            allow: r.pick(&[
                ALLOW_V4 | ALLOW_V6,
                ALLOW_V4 | ALLOW_V6,
                0,
                ALLOW_V4,
                ALLOW_V6,
            ]),
            allow_all_v4: r.chance(10),
            policy: r.pick(&[POLICY_DROP, POLICY_RESET, POLICY_RESET, 7]),
            budget: r.pick(&[
                RstBudget::Unlimited,
                RstBudget::Unlimited,
                RstBudget::Exhausted,
            ]),
        }
    }

    /// A set of states that together reach every branch of the gate logic.
    fn every() -> Vec<Self> {
        let on = Self {
            enabled: GATE_ON,
            deadline: Deadline::None,
            allow: ALLOW_V4 | ALLOW_V6,
            allow_all_v4: false,
            policy: POLICY_DROP,
            budget: RstBudget::Unlimited,
        };
        vec![
            on,
            Self {
                enabled: GATE_OFF,
                ..on
            },
            Self { enabled: 7, ..on },
            Self {
                deadline: Deadline::Past,
                ..on
            },
            Self {
                deadline: Deadline::Ahead,
                ..on
            },
            Self { allow: 0, ..on },
            Self {
                allow: ALLOW_V6,
                allow_all_v4: true,
                ..on
            },
            Self {
                allow_all_v4: true,
                ..on
            },
            Self {
                policy: POLICY_RESET,
                ..on
            },
            Self {
                policy: POLICY_RESET,
                budget: RstBudget::Exhausted,
                ..on
            },
            Self {
                policy: POLICY_RESET,
                deadline: Deadline::Max,
                allow: 0,
                ..on
            },
        ]
    }
}

/// A fuzzing gate: the object with [`GATED`] and one allowlist prefix per family.
fn gate() -> (Gate, bool) {
    let mut g = Gate::new();
    g.allow4(ALLOW4_NET, 24);
    g.allow6(ALLOW6_NET.octets(), 64);
    (g, false)
}

/// Tallies of one run, for the report and the coverage asserts.
#[derive(Default)]
struct Tally {
    frames: usize,
    mismatches: usize,
    first: Vec<String>,
    /// (program, return value) -> runs.
    verdicts: BTreeMap<String, usize>,
    seen: Coverage,
    /// Frames the programs refused that the classifier does not call a connection request.
    non_syn_refused: usize,
}

impl Tally {
    fn mismatch(&mut self, e: String) {
        self.mismatches += 1;
        if self.first.len() < KEEP {
            self.first.push(e);
        }
    }

    fn assert_clean(&self, what: &str) {
        assert!(
            self.mismatches == 0 && self.non_syn_refused == 0,
            "{what}: {} mismatches, {} non-requests refused; the first ones:\n{}",
            self.mismatches,
            self.non_syn_refused,
            self.first.join("\n\n")
        );
    }
}

/// Runs `frame` through both programs, checks verdict and output, adds the model's counter
/// deltas to `deltas`; with `exact`, also checks the counters around each run.
fn run_frame(
    g: &mut Gate,
    frame: &[u8],
    exact: bool,
    deltas: &mut [Counters],
    t: &mut Tally,
) -> Result<(), String> {
    let (outcome, _, _) = g.expect(frame);
    t.seen.count(frame, outcome);
    for p in Prog::BOTH {
        let before = exact.then(|| g.all_stats());
        let Some(e) = g.run_verdict(p, frame)? else {
            continue;
        };
        *t.verdicts.entry(format!("{p:?} {}", e.retval)).or_default() += 1;
        // Independent of the gate state: only a connection request may be refused.
        let refused = e.retval != p.retval(false);
        if refused && classify(frame).is_err() {
            t.non_syn_refused += 1;
            t.mismatch(format!(
                "{p:?} refused a non-request ({:?}): {}",
                classify(frame),
                hex(frame)
            ));
        }
        let mut one = vec![Counters::default(); SLOTS as usize];
        if let Some(s) = e.slot {
            one[s as usize] = e.delta;
            deltas[s as usize] = deltas[s as usize] + e.delta;
        }
        if let Some(before) = before {
            g.check_counters(&before, &one)
                .map_err(|err| format!("{p:?}: {err}\nframe {}", hex(frame)))?;
        }
    }
    Ok(())
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn corpus_replays_under_every_gate_state() {
    let frames = corpus();
    assert!(
        frames.len() >= 50,
        "the corpus lost frames: {}",
        frames.len()
    );
    let (mut g, mut all_v4) = gate();
    let mut t = Tally::default();
    let mut zero = vec![Counters::default(); SLOTS as usize];
    for state in State::every() {
        state.apply(&mut g, &mut all_v4);
        for (what, f) in &frames {
            if let Err(e) = run_frame(&mut g, f, true, &mut zero, &mut t) {
                t.mismatch(format!("{what}, gate {state:?}: {e}"));
            }
            t.frames += 1;
        }
    }
    println!(
        "corpus: {} frames x {} states, {} runs\noutcomes {:?}\nverdicts {:?}",
        frames.len(),
        State::every().len(),
        g.runs,
        t.seen.outcomes,
        t.verdicts
    );
    t.assert_clean("corpus replay");
    // The corpus is there to reach every branch: each outcome, and every verdict of both
    // programs (XDP never transmits: under policy reset the RST is the kernel's).
    for o in ["Refused", "Passed", "Expired", "Allowed", "Ignored"] {
        assert!(
            t.seen.outcomes.contains_key(o),
            "no {o}: {:?}",
            t.seen.outcomes
        );
    }
    for v in ["Xdp 1", "Xdp 2", "Tc -1", "Tc 2"] {
        assert!(t.verdicts.contains_key(v), "no {v}: {:?}", t.verdicts);
    }
}

/// `DRAIN_FUZZ_SEED`: decimal or 0x-hex.
fn env_seed() -> Option<u64> {
    let s = std::env::var("DRAIN_FUZZ_SEED").ok()?;
    let parsed = match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("DRAIN_FUZZ_SEED={s:?}: {e}")))
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn differential_fuzz() {
    let frames: usize = std::env::var("DRAIN_FUZZ_FRAMES").map_or(CI_FRAMES, |s| {
        s.parse()
            .unwrap_or_else(|e| panic!("DRAIN_FUZZ_FRAMES={s:?}: {e}"))
    });
    let seed = env_seed().unwrap_or(CI_SEED);
    // First, so that a crash still says how to reproduce it.
    println!("fuzz: seed {seed:#x}, {frames} frames (DRAIN_FUZZ_SEED={seed:#x} DRAIN_FUZZ_FRAMES={frames})");
    let seeds: Vec<Vec<u8>> = corpus().into_iter().map(|(_, b)| b).collect();
    let mut r = Rng::new(seed);
    let (mut g, mut all_v4) = gate();
    let mut t = Tally::default();
    let (mut exact_frames, mut replays) = (0, 0);
    let start = Instant::now();
    let mut batch: Vec<Vec<u8>> = Vec::with_capacity(BATCH);
    while t.frames < frames {
        let state = State::random(&mut r);
        state.apply(&mut g, &mut all_v4);
        let before = g.all_stats();
        let mut deltas = vec![Counters::default(); SLOTS as usize];
        batch.clear();
        for _ in 0..BATCH.min(frames - t.frames) {
            let f = if r.chance(70) {
                let mut f = random_frame(&mut r);
                for _ in 0..r.pick(&[0, 1, 1, 2, 3]) {
                    mutate(&mut r, &mut f);
                }
                f.bytes
            } else {
                let mut b = r.pick(&seeds);
                for _ in 0..r.pick(&[1, 1, 2, 4]) {
                    mutate_bytes(&mut r, &mut b);
                }
                b
            };
            let exact = r.chance(1);
            exact_frames += usize::from(exact);
            if let Err(e) = run_frame(&mut g, &f, exact, &mut deltas, &mut t) {
                t.mismatch(format!("frame {} (gate {state:?}): {e}", t.frames));
            }
            batch.push(f);
            t.frames += 1;
        }
        if let Err(e) = g.check_counters(&before, &deltas) {
            // Name the frame: replay the batch one by one, counters checked around each.
            replays += 1;
            let mut found = false;
            let mut scratch = vec![Counters::default(); SLOTS as usize];
            let mut quiet = Tally::default();
            for f in &batch {
                if let Err(e) = run_frame(&mut g, f, true, &mut scratch, &mut quiet) {
                    t.mismatch(format!("batch replay (gate {state:?}): {e}"));
                    found = true;
                    break;
                }
            }
            if !found {
                t.mismatch(format!(
                    "batch ending at frame {} (gate {state:?}): {e}; no single frame \
                     reproduces it on replay",
                    t.frames
                ));
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "fuzz: {} frames, seed {seed:#x}, {} mismatches, {} non-requests refused, {:.0} frames/s \
         ({} program runs, {} refused by test_run, {exact_frames} with per-frame counters, \
         {replays} batch replays, {:.1} s)\noutcomes {:?}\nverdicts {:?}\nclassifier {:?}",
        t.frames,
        t.mismatches,
        t.non_syn_refused,
        t.frames as f64 / secs,
        g.runs,
        g.skipped,
        secs,
        t.seen.outcomes,
        t.verdicts,
        t.seen.reasons
    );
    t.assert_clean(&format!("fuzz seed {seed:#x}"));
    if frames >= CI_FRAMES {
        t.seen.assert_reached(100, 50);
        for v in ["Xdp 1", "Xdp 2", "Tc -1", "Tc 2"] {
            let n = t.verdicts.get(v).copied().unwrap_or(0);
            assert!(n >= 100, "too few {v}: {:?}", t.verdicts);
        }
    }
}

//! The gate programs (XDP and TC) under BPF_PROG_TEST_RUN, next to a model of what they
//! must do: the independent classifier ([`crate::classify`]) plus the gate's documented
//! logic (gated port? gate on? deadline passed? source allowlisted? policy and RST budget?).
//!
//! A [`Gate`] is one loaded copy of the object (its own pin directory) whose maps it writes
//! the way `drain-user gate on` does, keeping the model's copy of them. For a frame the
//! model gives, per program, an [`Effect`]: return value, output frame and the counter
//! delta in one stats slot. Two ways to check it:
//! - [`Gate::try_check`]: one frame, both programs, every counter slot read before and
//!   after each run (exact per frame; ~20 syscalls a frame);
//! - [`Gate::run_verdict`] per frame plus [`Gate::check_counters`] per batch: verdict and
//!   output per frame, counter deltas summed over the batch (one syscall a frame and
//!   program). The fuzzer uses this and falls back to the first on a mismatch.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsFd,
};

use aya::{
    maps::{lpm_trie::Key, Array, LpmTrie, PerCpuArray, PerCpuValues},
    programs::ProgramFd,
};
use drain_common::{
    map, prog, CpuClock, GateConfig, PortStats, ALLOW_V4, ALLOW_V6, GATE_ON, POLICY_DROP,
    POLICY_RESET,
};

use crate::{
    classify::{classify, Request},
    frames::{hex, Ipv4, Ipv6, Packet, Tcp, ETH_P_IPV4, ETH_P_IPV6},
    object::Loaded,
    testrun::try_test_run,
};

/// Gated ports and their stats slots (1-based, as `drain-user gate on` assigns them).
pub const GATED: [(u16, u32); 3] = [(80, 1), (8443, 2), (65535, 3)];
/// Stats slots checked after each run: 0 (never used) up to the last gated slot.
pub const SLOTS: u32 = 4;

// Sources: the default ones are outside the allowlists; *_ALLOWED ones inside.
pub const SRC4: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 1);
pub const DST4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
pub const ALLOW4_NET: [u8; 4] = [198, 18, 42, 0];
pub const SRC4_ALLOWED: Ipv4Addr = Ipv4Addr::new(198, 18, 42, 200);
pub const SRC4_NEXT_TO_ALLOWED: Ipv4Addr = Ipv4Addr::new(198, 18, 43, 1);
pub const SRC6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x6472, 0, 7, 0, 0, 0, 1);
pub const DST6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x6472, 0, 9, 0, 0, 0, 2);
pub const ALLOW6_NET: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x6472, 0, 0x42, 0, 0, 0, 0);
pub const SRC6_ALLOWED: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x6472, 0, 0x42, 0xdead, 0xbeef, 0, 5);
pub const SRC6_NEXT_TO_ALLOWED: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x6472, 0, 0x43, 0, 0, 0, 5);

pub fn v4() -> Ipv4 {
    Ipv4::new(SRC4, DST4)
}
pub fn v6() -> Ipv6 {
    Ipv6::new(SRC6, DST6)
}
pub fn syn4(dport: u16) -> Packet {
    Packet::eth().ipv4(v4()).tcp(Tcp::syn(40000, dport))
}
pub fn syn6(dport: u16) -> Packet {
    Packet::eth().ipv6(v6()).tcp(Tcp::syn(40000, dport))
}

/// CLOCK_BOOTTIME in ns: the clock of `GateConfig::deadline_ns` (bpf_ktime_get_boot_ns).
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and a valid out pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What the gate decides for one frame, whatever the program: which counter it bumps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Not a connection request to a gated port: pass, no counter moves.
    Ignored,
    /// Gate off: pass, syns_passed.
    Passed,
    /// Deadline passed: pass, syns_passed + syns_expired.
    Expired,
    /// Allowlisted source: pass, syns_passed + syns_allowed.
    Allowed,
    /// Refuse, syns_refused (how, see [`Effect`]).
    Refused,
}

impl Outcome {
    pub fn refuses(self) -> bool {
        self == Outcome::Refused
    }

    fn delta(self) -> Counters {
        let mut d = Counters::default();
        match self {
            Outcome::Ignored => {}
            Outcome::Passed => d.syns_passed = 1,
            Outcome::Expired => (d.syns_passed, d.syns_expired) = (1, 1),
            Outcome::Allowed => (d.syns_passed, d.syns_allowed) = (1, 1),
            Outcome::Refused => d.syns_refused = 1,
        }
        d
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prog {
    Xdp,
    Tc,
}

/// XDP return codes (include/uapi/linux/bpf.h, enum xdp_action).
pub const XDP_ABORTED: i32 = 0;
pub const XDP_DROP: i32 = 1;
pub const XDP_PASS: i32 = 2;
/// TC_ACT_SHOT (include/uapi/linux/pkt_cls.h) and TCX_NEXT (enum tcx_action_base).
pub const TC_ACT_SHOT: i32 = 2;
pub const TCX_NEXT: i32 = -1;

impl Prog {
    pub const BOTH: [Prog; 2] = [Prog::Xdp, Prog::Tc];

    /// Frames BPF_PROG_TEST_RUN rejects with EINVAL before the program runs (measured on
    /// 6.18): shorter than an Ethernet header for both (`bpf_test_init`); for SCHED_CLS also
    /// an IPv4 / IPv6 EtherType (outermost, as `eth_type_trans` sets skb->protocol) with
    /// fewer than 20 / 40 bytes after it. None of these can hold a TCP header, so the
    /// classifier calls them all "not a request", which the checks assert.
    pub fn kernel_cannot_run(self, frame: &[u8]) -> bool {
        if frame.len() < 14 {
            return true;
        }
        let l3 = frame.len() - 14;
        match (self, u16::from_be_bytes([frame[12], frame[13]])) {
            (Prog::Tc, ETH_P_IPV4) => l3 < 20,
            (Prog::Tc, ETH_P_IPV6) => l3 < 40,
            _ => false,
        }
    }

    /// The return value that lets a frame go, or drops it.
    pub fn retval(self, refuse: bool) -> i32 {
        match (self, refuse) {
            (Prog::Xdp, true) => XDP_DROP,
            (Prog::Xdp, false) => XDP_PASS,
            (Prog::Tc, true) => TC_ACT_SHOT,
            (Prog::Tc, false) => TCX_NEXT,
        }
    }
}

/// The counters of a [`PortStats`], its other fields zero (they are not the kernel's to
/// change): drain-common's one table of counters, so the model checks every one of them.
pub type Counters = PortStats;

/// The RST limiter's state under policy reset, set so the model knows each answer: the
/// per-CPU GCRA (drain-ebpf gate.rs) either always has budget or never has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RstBudget {
    /// 1 ns interval, burst 10^6: every refusal a test can send goes on to be reset.
    Unlimited,
    /// Next allowed RST far in the future on every CPU: every refusal is `rst_limited`.
    Exhausted,
}

/// What one program must do with one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Effect {
    pub retval: i32,
    /// The frame as the program must leave it: always the input (the gate never rewrites).
    pub output: Vec<u8>,
    /// The stats slot that moves, and by how much.
    pub slot: Option<u32>,
    pub delta: Counters,
}

/// The loaded object, its two programs, and a model of what its maps hold.
pub struct Gate {
    pub obj: Loaded,
    xdp: ProgramFd,
    tc: ProgramFd,
    ports: HashMap<u16, u32>,
    config: GateConfig,
    budget: RstBudget,
    allow4: Vec<([u8; 4], u32)>,
    allow6: Vec<([u8; 16], u32)>,
    /// Program runs done, and those the kernel refused (see [`Prog::kernel_cannot_run`]).
    pub runs: usize,
    pub skipped: usize,
}

impl Default for Gate {
    fn default() -> Self {
        Self::new()
    }
}

impl Gate {
    /// Loads a fresh copy (own pin dir), gates [`GATED`] and turns the gate on.
    pub fn new() -> Self {
        let mut obj = Loaded::open();
        let xdp = obj.load_xdp(prog::XDP);
        let tc = obj.load_tc(prog::TC);
        let mut g = Self {
            obj,
            xdp,
            tc,
            ports: HashMap::new(),
            config: GateConfig::default(),
            budget: RstBudget::Unlimited,
            allow4: Vec::new(),
            allow6: Vec::new(),
            runs: 0,
            skipped: 0,
        };
        {
            let mut ports: Array<_, u32> =
                Array::try_from(g.obj.bpf.map_mut(map::PORTS).unwrap()).unwrap();
            for (port, slot) in GATED {
                ports.set(u32::from(port), slot, 0).unwrap();
                g.ports.insert(port, slot);
            }
        }
        g.set_config(GATE_ON, 0);
        g
    }

    /// Policy drop, both allowlists consulted, `enabled` and `deadline_ns` as given.
    pub fn set_config(&mut self, enabled: u32, deadline_ns: u64) {
        self.configure(GateConfig {
            enabled,
            policy: POLICY_DROP,
            deadline_ns,
            // Consult both allowlists (user space sets these bits when a list has entries).
            allow: ALLOW_V4 | ALLOW_V6,
            ..Default::default()
        });
    }

    /// Writes DRAIN_CONFIG. Under policy reset the RST interval and burst come from
    /// [`set_rst_budget`](Self::set_rst_budget), whatever `cfg` says.
    pub fn configure(&mut self, mut cfg: GateConfig) {
        (cfg.rst_interval_ns, cfg.rst_burst) = match self.budget {
            RstBudget::Unlimited => (1, 1_000_000),
            // ~11.6 days: the next RST is never due within a test.
            RstBudget::Exhausted => (1_000_000_000_000_000, 1),
        };
        let mut a: Array<_, GateConfig> =
            Array::try_from(self.obj.bpf.map_mut(map::CONFIG).unwrap()).unwrap();
        a.set(0, cfg, 0).unwrap();
        assert_eq!(a.get(&0, 0).unwrap(), cfg);
        self.config = cfg;
    }

    pub fn config(&self) -> GateConfig {
        self.config
    }

    /// Sets the RST limiter's per-CPU state (and the config's interval and burst to match).
    pub fn set_rst_budget(&mut self, budget: RstBudget) {
        self.budget = budget;
        let next = match budget {
            RstBudget::Unlimited => 0,
            RstBudget::Exhausted => u64::MAX / 2,
        };
        let cpus = aya::util::nr_cpus().expect("number of possible CPUs");
        let mut rl: PerCpuArray<_, CpuClock> =
            PerCpuArray::try_from(self.obj.bpf.map_mut(map::RST_RL).unwrap()).unwrap();
        // A zero clock reading: the gate's next decision reads the clock afresh.
        let state = CpuClock {
            rst_next_ns: next,
            ..Default::default()
        };
        let values = PerCpuValues::try_from(vec![state; cpus]).expect("one value per CPU");
        rl.set(0, values, 0)
            .expect("writing the RST limiter's state");
        let cfg = self.config;
        self.configure(cfg);
    }

    pub fn allow4(&mut self, net: [u8; 4], prefix: u32) {
        let mut t: LpmTrie<_, [u8; 4], u8> =
            LpmTrie::try_from(self.obj.bpf.map_mut(map::ALLOW4).unwrap()).unwrap();
        t.insert(&Key::new(prefix, net), 1, 0).unwrap();
        self.allow4.push((net, prefix));
    }

    pub fn allow6(&mut self, net: [u8; 16], prefix: u32) {
        let mut t: LpmTrie<_, [u8; 16], u8> =
            LpmTrie::try_from(self.obj.bpf.map_mut(map::ALLOW6).unwrap()).unwrap();
        t.insert(&Key::new(prefix, net), 1, 0).unwrap();
        self.allow6.push((net, prefix));
    }

    /// Removes an IPv4 prefix added with [`allow4`](Self::allow4).
    pub fn disallow4(&mut self, net: [u8; 4], prefix: u32) {
        let mut t: LpmTrie<_, [u8; 4], u8> =
            LpmTrie::try_from(self.obj.bpf.map_mut(map::ALLOW4).unwrap()).unwrap();
        t.remove(&Key::new(prefix, net)).unwrap();
        self.allow4.retain(|e| *e != (net, prefix));
    }

    /// The counters of DRAIN_STATS slot `slot`, summed over CPUs.
    pub fn stats(&self, slot: u32) -> Counters {
        self.obj.port_stats(slot).counters_only()
    }

    pub fn all_stats(&self) -> Vec<Counters> {
        (0..SLOTS).map(|s| self.stats(s)).collect()
    }

    /// The model: what the gate decides, the stats slot, and the request (if the
    /// classifier sees one).
    pub fn expect(&self, frame: &[u8]) -> (Outcome, Option<u32>, Option<Request>) {
        let Ok(req) = classify(frame) else {
            return (Outcome::Ignored, None, None);
        };
        let Some(&slot) = self.ports.get(&req.dport) else {
            return (Outcome::Ignored, None, Some(req));
        };
        let c = self.config;
        let outcome = if c.enabled != GATE_ON {
            Outcome::Passed
        } else if c.deadline_ns != 0 && boottime_ns() >= c.deadline_ns {
            Outcome::Expired
        } else if self.allowlisted(req.src) {
            Outcome::Allowed
        } else {
            Outcome::Refused
        };
        (outcome, Some(slot), Some(req))
    }

    /// What program `p` must do with `frame`, given the model's outcome for it.
    pub fn effect(&self, p: Prog, frame: &[u8]) -> (Outcome, Effect) {
        let (outcome, slot, _) = self.expect(frame);
        let mut e = Effect {
            retval: p.retval(outcome.refuses()),
            output: frame.to_vec(),
            slot,
            delta: outcome.delta(),
        };
        // Policy reset, on both programs and whatever the headers: while the RST budget
        // lasts a refused request goes on to the stack unchanged (the kernel's TCP answers
        // it, past the first line: drain-ebpf refuse.rs) and is counted there, not here;
        // once the budget is spent it drops, counted as limited.
        if outcome.refuses() && self.config.policy == POLICY_RESET {
            match self.budget {
                RstBudget::Unlimited => {
                    e.retval = p.retval(false);
                    e.delta = Counters::default();
                }
                RstBudget::Exhausted => e.delta.rst_limited = 1,
            }
        }
        (outcome, e)
    }

    fn allowlisted(&self, src: IpAddr) -> bool {
        fn covers(net: &[u8], prefix: u32, addr: &[u8]) -> bool {
            (0..prefix as usize).all(|bit| {
                let mask = 0x80u8 >> (bit % 8);
                net[bit / 8] & mask == addr[bit / 8] & mask
            })
        }
        let allow = self.config.allow;
        match src {
            IpAddr::V4(a) => {
                allow & ALLOW_V4 != 0 && self.allow4.iter().any(|(n, p)| covers(n, *p, &a.octets()))
            }
            IpAddr::V6(a) => {
                allow & ALLOW_V6 != 0 && self.allow6.iter().any(|(n, p)| covers(n, *p, &a.octets()))
            }
        }
    }

    /// The loaded program of hook `p`, for tests that drive BPF_PROG_TEST_RUN themselves.
    pub fn fd(&self, p: Prog) -> std::os::fd::BorrowedFd<'_> {
        match p {
            Prog::Xdp => self.xdp.as_fd(),
            Prog::Tc => self.tc.as_fd(),
        }
    }

    /// Runs `frame` through `p` once and checks return value and output frame against the
    /// model (not the counters). `Ok(None)` when the kernel refused to run the frame (and
    /// the model agrees nothing could be judged); `Ok(Some(effect))` otherwise.
    pub fn run_verdict(&mut self, p: Prog, frame: &[u8]) -> Result<Option<Effect>, String> {
        let (outcome, want) = self.effect(p, frame);
        let ctx = || {
            format!(
                "{p:?}, {} bytes, classifier {:?}, expected {outcome:?} ({want:?})\nframe {}",
                frame.len(),
                classify(frame),
                hex(frame)
            )
        };
        let (ret, out) = match try_test_run(self.fd(p), frame) {
            // Frames the test-run harness itself refuses (see kernel_cannot_run); any
            // other error, or one of these frames being accepted, is judged as usual.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && p.kernel_cannot_run(frame) => {
                if outcome != Outcome::Ignored {
                    return Err(format!("test_run refused a request frame: {}", ctx()));
                }
                self.skipped += 1;
                return Ok(None);
            }
            Err(e) => return Err(format!("BPF_PROG_TEST_RUN failed: {e}: {}", ctx())),
            Ok(r) => r,
        };
        self.runs += 1;
        if p == Prog::Xdp && ret == XDP_ABORTED {
            return Err(format!("XDP_ABORTED: {}", ctx()));
        }
        if ret != want.retval {
            return Err(format!("verdict {ret}, want {}: {}", want.retval, ctx()));
        }
        if out != want.output {
            return Err(format!(
                "output frame {}, want {}: {}",
                hex(&out),
                hex(&want.output),
                ctx()
            ));
        }
        Ok(Some(want))
    }

    /// Asserts the stats slots equal `before` plus `deltas` (one entry per slot).
    pub fn check_counters(&self, before: &[Counters], deltas: &[Counters]) -> Result<(), String> {
        let after = self.all_stats();
        for s in 0..SLOTS as usize {
            let want = before[s] + deltas[s];
            if after[s] != want {
                return Err(format!(
                    "counters of slot {s}: {:?}, want {want:?} (before {:?})",
                    after[s], before[s]
                ));
            }
        }
        Ok(())
    }

    /// Runs `frame` through both programs and asserts verdict, output and counters.
    /// Returns the expected outcome so callers can also assert what they meant to test.
    #[track_caller]
    pub fn check(&mut self, frame: &[u8], what: &str) -> Outcome {
        self.try_check(frame, what)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`check`](Self::check), returning the first mismatch instead of panicking.
    pub fn try_check(&mut self, frame: &[u8], what: &str) -> Result<Outcome, String> {
        let (outcome, _, _) = self.expect(frame);
        for p in Prog::BOTH {
            let before = self.all_stats();
            let Some(e) = self
                .run_verdict(p, frame)
                .map_err(|e| format!("{what}: {e}"))?
            else {
                continue;
            };
            let mut deltas = vec![Counters::default(); SLOTS as usize];
            if let Some(s) = e.slot {
                deltas[s as usize] = e.delta;
            }
            self.check_counters(&before, &deltas).map_err(|err| {
                format!(
                    "{what}: {p:?}: {err}; classifier {:?}\nframe {}",
                    classify(frame),
                    hex(frame)
                )
            })?;
        }
        Ok(outcome)
    }

    /// [`check`](Self::check) plus the outcome the caller meant to produce (guards the
    /// test's own frames against building something else than intended).
    #[track_caller]
    pub fn expect_outcome(&mut self, frame: &crate::frames::Frame, want: Outcome, what: &str) {
        let got = self.check(&frame.bytes, what);
        assert_eq!(
            got,
            want,
            "{what}: the model expected {got:?}; frame {}",
            hex(&frame.bytes)
        );
    }
}

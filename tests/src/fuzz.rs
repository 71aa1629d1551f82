//! Random and mutated frames for the differential tests of the gate programs: a seeded
//! PRNG, a generator over the frame builder that reaches every parser branch (VLAN stacks,
//! IPv4 options and fragments, IPv6 extension-header chains, ECN bits, TCP options, non-TCP),
//! mutations that aim at the fields parsers get wrong (EtherTypes, version/IHL, lengths,
//! next headers, fragment offsets, data offset, flags, truncation), and the checked-in seed
//! corpus (tests/corpus/frames.hex).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use crate::{classify::classify, frames::*, gatemodel::*};

/// xorshift64* (Marsaglia 2003; Vigna 2016), seeded through splitmix64 so any seed (0
/// included) gives a full-period state: deterministic, small, no crate needed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Self((z ^ (z >> 31)) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())].clone()
    }
    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

/// Byte values that steer parsers: versions/IHLs, next headers, flags, EtherType halves,
/// data offsets.
pub const INTERESTING8: &[u8] = &[
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x10, 0x11, 0x12, 0x14, 0x16, 0x17, 0x1f, 0x2b,
    0x2c, 0x32, 0x33, 0x3a, 0x3b, 0x3c, 0x40, 0x41, 0x43, 0x44, 0x45, 0x46, 0x4f, 0x50, 0x60, 0x65,
    0x81, 0x86, 0x87, 0x88, 0x91, 0xa8, 0xc2, 0xdd, 0xf0, 0xfe, 0xff,
];
/// 16-bit values for EtherTypes, lengths, fragment fields and ports.
pub const INTERESTING16: &[u16] = &[
    0x0000, 0x0001, 0x0008, 0x0014, 0x0016, 0x0028, 0x0050, 0x0800, 0x0806, 0x86dd, 0x8100, 0x88a8,
    0x9100, 0x2000, 0x2001, 0x4000, 0x1fff, 0xe000, 0xfff8, 0x20fb, 0xffff, 80, 8443, 65535, 22,
];

/// TCP options a SYN carries (RFC 9293, 7323, 2018), in random amounts: MSS, window scale,
/// SACK permitted, timestamps, NOPs; up to the 40 bytes that fit.
fn tcp_options(r: &mut Rng) -> Vec<u8> {
    let mut o = Vec::new();
    for _ in 0..r.below(6) {
        let opt: &[u8] = match r.below(6) {
            0 => &[2, 4, 0x05, 0xb4],
            1 => &[3, 3, 7],
            2 => &[4, 2],
            3 => &[8, 10, 0, 0, 0, 1, 0, 0, 0, 0],
            4 => &[1],
            _ => &[0xfd, 4, 0xde, 0xad], // experimental (RFC 6994)
        };
        if o.len() + opt.len() <= 40 {
            o.extend_from_slice(opt);
        }
    }
    o
}

/// A random frame: 0..3 VLAN tags, IPv4 (options, fragments, ECN) or IPv6 (0..8 extension
/// headers of every kind walked and some that are not), TCP (SYN-heavy flags, options),
/// UDP or ICMP, maybe a payload.
pub fn random_frame(r: &mut Rng) -> Frame {
    let mut p = Packet::eth();
    for _ in 0..r.pick(&[0, 0, 0, 1, 1, 2, 3]) {
        p = p.vlan(r.pick(&[ETH_P_8021Q, ETH_P_8021AD]), r.below(4096) as u16);
    }
    let dport = r.pick(&[80, 80, 8443, 65535, 22, 443, 0]);
    let flags = if r.chance(60) {
        TCP_SYN | if r.chance(20) { TCP_ECE | TCP_CWR } else { 0 }
    } else {
        r.next_u64() as u8
    };
    let mut tcp = Tcp::syn(r.below(65536) as u16, dport).flags(flags);
    tcp.seq = r.next_u64() as u32;
    if r.chance(40) {
        tcp.options = tcp_options(r);
    }
    // ECN field (RFC 3168): Not-ECT, ECT(1), ECT(0), CE; DSCP anything.
    let tos = (r.below(64) as u8) << 2 | r.below(4) as u8;
    if r.chance(50) {
        let src = r.pick(&[SRC4, SRC4_ALLOWED, SRC4_NEXT_TO_ALLOWED]);
        let mut h = Ipv4::new(src, DST4);
        h.tos = if r.chance(50) { tos } else { 0 };
        if r.chance(30) {
            h.options = if r.chance(50) {
                vec![IPOPT_NOP; r.below(41)]
            } else {
                IPOPT_ROUTER_ALERT.to_vec()
            };
        }
        if r.chance(15) {
            h = h.fragment(r.pick(&[0, 0, 1, 0x1fff]), r.chance(50));
        }
        p = p.ipv4(h);
    } else {
        let src = r.pick(&[SRC6, SRC6_ALLOWED, SRC6_NEXT_TO_ALLOWED]);
        let mut h = Ipv6::new(src, DST6);
        h.traffic_class = if r.chance(50) { tos } else { 0 };
        h.flow_label = r.next_u64() as u32 & 0xf_ffff;
        p = p.ipv6(h);
        for _ in 0..r.pick(&[0, 0, 1, 2, 3, 5, 6, 7, 8]) {
            let len = r.pick(&[0u8, 0, 1, 2, 4]);
            p = p.ext(match r.below(6) {
                0 => Ext::HopByHop { len },
                1 => Ext::Routing { len },
                2 => Ext::DestOpts { len },
                3 => Ext::Fragment {
                    offset: r.pick(&[0, 0, 0, 1, 0x1fff]),
                    more: r.chance(50),
                    id: r.next_u64() as u32,
                },
                4 => Ext::Auth {
                    len: r.pick(&[1, 2, 4, 6]),
                },
                _ => Ext::Other {
                    code: r.pick(&[IPPROTO_NONE, IPPROTO_MOBILITY, 253]),
                    len,
                },
            });
        }
    }
    p = match r.below(10) {
        0 => p.udp(1, dport),
        1 => p.icmp4(),
        _ => p.tcp(tcp),
    };
    if r.chance(20) {
        p = p.payload(&vec![0x5a; r.below(64)]);
    }
    p.build()
}

/// One mutation of a built frame, aimed at a marked field most of the time.
pub fn mutate(r: &mut Rng, f: &mut Frame) {
    const KINDS: &[Mark] = &[
        Mark::EtherType,
        Mark::Ipv4VerIhl,
        Mark::IpLen,
        Mark::Ipv4Frag,
        Mark::Ipv4Proto,
        Mark::Ipv6Next,
        Mark::ExtNext,
        Mark::ExtLen,
        Mark::Ipv6FragOff,
        Mark::TcpDport,
        Mark::TcpDoff,
        Mark::TcpFlags,
        Mark::L3,
        Mark::L4,
    ];
    match r.below(6) {
        // A marked field gets a steering value.
        0..=2 => {
            let kind = r.pick(KINDS);
            let offs: Vec<usize> = f.all(kind).collect();
            if offs.is_empty() {
                return;
            }
            let at = r.pick(&offs);
            let wide = matches!(
                kind,
                Mark::EtherType | Mark::IpLen | Mark::Ipv4Frag | Mark::Ipv6FragOff | Mark::TcpDport
            );
            if wide && at + 2 <= f.bytes.len() {
                let v = if r.chance(80) {
                    r.pick(INTERESTING16)
                } else {
                    r.next_u64() as u16
                };
                f.bytes[at..at + 2].copy_from_slice(&v.to_be_bytes());
            } else if at < f.bytes.len() {
                f.bytes[at] = if r.chance(80) {
                    r.pick(INTERESTING8)
                } else {
                    r.next_u64() as u8
                };
            }
        }
        // Cut short anywhere.
        3 => {
            let n = r.below(f.bytes.len() + 1);
            f.bytes.truncate(n);
        }
        // Anything else: byte-level (also for corpus frames, which carry no marks).
        _ => mutate_bytes(r, &mut f.bytes),
    }
}

/// A mutation that knows nothing of the layout: a random byte, a steering byte, a bit flip,
/// a byte inserted or removed (shifting every header after it), or bytes appended.
pub fn mutate_bytes(r: &mut Rng, b: &mut Vec<u8>) {
    let n = b.len().min(160);
    match r.below(6) {
        0 if n > 0 => b[r.below(n)] = r.next_u64() as u8,
        1 if n > 0 => b[r.below(n)] = r.pick(INTERESTING8),
        2 if n > 0 => b[r.below(n)] ^= 1 << r.below(8),
        3 => {
            let at = r.below(n + 1);
            b.insert(at, r.pick(INTERESTING8));
        }
        4 if n > 0 => {
            b.remove(r.below(n));
        }
        _ => {
            for _ in 0..r.below(32) {
                b.push(r.next_u64() as u8);
            }
        }
    }
}

/// The seed corpus: tests/corpus/frames.hex.
pub fn corpus_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/frames.hex")
}

/// The corpus frames, each with its comment: one frame per line, in hex, then `#` and what
/// it is; blank lines and lines starting with `#` are skipped. Panics on a line that is not
/// hex, naming it.
pub fn corpus() -> Vec<(String, Vec<u8>)> {
    let path = corpus_path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading the seed corpus {}: {e}", path.display()));
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|(i, l)| {
            let (data, what) = l.split_once('#').unwrap_or((l, ""));
            let bytes = unhex(data)
                .unwrap_or_else(|| panic!("{}:{}: not a hex frame: {l:?}", path.display(), i + 1));
            (format!("corpus line {}: {}", i + 1, what.trim()), bytes)
        })
        .collect()
}

/// What a run of frames reached: the model's outcomes and the classifier's reasons (a
/// request, or the name of the NotRequest variant).
#[derive(Debug, Default)]
pub struct Coverage {
    pub outcomes: BTreeMap<String, usize>,
    pub reasons: BTreeMap<String, usize>,
}

impl Coverage {
    pub fn count(&mut self, frame: &[u8], outcome: Outcome) {
        *self.outcomes.entry(format!("{outcome:?}")).or_default() += 1;
        let why = match classify(frame) {
            Ok(_) => "request".to_owned(),
            Err(e) => {
                let s = format!("{e:?}");
                s.split('(').next().unwrap_or(&s).to_owned()
            }
        };
        *self.reasons.entry(why).or_default() += 1;
    }

    /// The generator must reach every branch, or the comparison proves little: each gate
    /// outcome at least `outcome` times, each classifier reason at least `reason` times.
    #[track_caller]
    pub fn assert_reached(&self, outcome: usize, reason: usize) {
        for o in ["Refused", "Passed", "Expired", "Allowed", "Ignored"] {
            let n = self.outcomes.get(o).copied().unwrap_or(0);
            assert!(n >= outcome, "too few {o}: {:?}", self.outcomes);
        }
        for why in [
            "request",
            "Truncated",
            "NotSyn",
            "NotTcp",
            "NotIp",
            "BadVersion",
            "BadIhl",
            "LaterFragment",
            "TooManyExtHeaders",
            "TooManyTags",
        ] {
            let n = self.reasons.get(why).copied().unwrap_or(0);
            assert!(n >= reason, "too few {why}: {:?}", self.reasons);
        }
    }
}

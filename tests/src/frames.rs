//! A small frame builder: a [`Packet`] is a list of [`Layer`]s, outermost first;
//! [`Packet::build`] writes them out, fills every "next protocol" field from the layer that
//! follows, every length from what follows, and the IPv4 header and TCP/UDP/ICMP checksums.
//! The returned [`Frame`] records where the interesting fields are ([`Mark`]) so tests can
//! corrupt them on purpose.
//!
//! ```
//! use drain_tests::frames::{Ipv4, Packet, Tcp};
//! let f = Packet::eth()
//!     .vlan(0x8100, 10)
//!     .ipv4(Ipv4::new([198, 18, 0, 1].into(), [198, 18, 0, 2].into()))
//!     .tcp(Tcp::syn(40000, 80))
//!     .build();
//! assert_eq!(f.bytes.len(), 14 + 4 + 20 + 24);
//! ```

use std::net::{Ipv4Addr, Ipv6Addr};

/// TCP flag bits (RFC 9293 section 3.1; ECE and CWR from RFC 3168).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_URG: u8 = 0x20;
pub const TCP_ECE: u8 = 0x40;
pub const TCP_CWR: u8 = 0x80;

/// EtherTypes (IEEE registry).
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;
pub const ETH_P_IPV6: u16 = 0x86DD;
/// IEEE 802 "local experimental" EtherType, used after the last layer when it is raw payload.
pub const ETH_P_EXPERIMENTAL: u16 = 0x88B5;

/// IP protocol / IPv6 next-header numbers (IANA).
pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_ESP: u8 = 50;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_NONE: u8 = 59;
pub const IPPROTO_DSTOPTS: u8 = 60;
pub const IPPROTO_MOBILITY: u8 = 135;

/// IPv4 option bytes (RFC 791 section 3.1, RFC 2113).
pub const IPOPT_EOL: u8 = 0;
pub const IPOPT_NOP: u8 = 1;
/// Router Alert, 4 bytes: type 148, length 4, value 0 ("examine packet").
pub const IPOPT_ROUTER_ALERT: [u8; 4] = [0x94, 4, 0, 0];

/// A byte offset worth corrupting, recorded by [`Packet::build`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    /// First byte of an EtherType field (Ethernet header or after a VLAN TCI).
    EtherType,
    /// First byte of a VLAN tag's TCI.
    VlanTci,
    /// Start of the network header (IPv4, IPv6 or ARP).
    L3,
    /// IPv4 version/IHL byte.
    Ipv4VerIhl,
    /// IPv4 total length or IPv6 payload length (2 bytes).
    IpLen,
    /// IPv4 flags/fragment-offset field (2 bytes).
    Ipv4Frag,
    /// IPv4 protocol byte.
    Ipv4Proto,
    /// IPv6 next-header byte of the fixed header.
    Ipv6Next,
    /// Start of an IPv6 extension header (its next-header byte).
    ExtNext,
    /// Length byte of an IPv6 extension header.
    ExtLen,
    /// Fragment-offset field (2 bytes) of an IPv6 Fragment header.
    Ipv6FragOff,
    /// Start of the transport header.
    L4,
    /// TCP destination port (2 bytes).
    TcpDport,
    /// TCP data-offset byte.
    TcpDoff,
    /// TCP flags byte.
    TcpFlags,
}

/// A built frame and where its interesting fields are.
#[derive(Clone, Debug)]
pub struct Frame {
    pub bytes: Vec<u8>,
    pub marks: Vec<(Mark, usize)>,
}

impl Frame {
    /// Offset of the first field marked `m`.
    pub fn at(&self, m: Mark) -> Option<usize> {
        self.all(m).next()
    }

    /// Offsets of every field marked `m`, outermost first.
    pub fn all(&self, m: Mark) -> impl Iterator<Item = usize> + '_ {
        self.marks
            .iter()
            .filter(move |(k, _)| *k == m)
            .map(|&(_, off)| off)
    }
}

/// IPv4 header fields (RFC 791 section 3.1) that tests choose; the rest are computed.
#[derive(Clone, Debug)]
pub struct Ipv4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// DSCP (6 bits) and ECN (2 bits).
    pub tos: u8,
    /// Identification, shared by the fragments of one datagram.
    pub id: u16,
    /// DF flag.
    pub dont_fragment: bool,
    /// MF flag: more fragments follow.
    pub more_fragments: bool,
    /// Fragment offset in 8-octet units (13 bits): non-zero for every fragment but the first.
    pub frag_offset: u16,
    pub ttl: u8,
    /// Protocol; `None` = from the next layer.
    pub proto: Option<u8>,
    /// Options, padded with EOL to a multiple of 4 bytes (at most 40): IHL = 5 + len / 4.
    pub options: Vec<u8>,
}

impl Ipv4 {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        Self {
            src,
            dst,
            tos: 0,
            id: 0x1234,
            dont_fragment: true,
            more_fragments: false,
            frag_offset: 0,
            ttl: 64,
            proto: None,
            options: Vec::new(),
        }
    }

    pub fn options(mut self, options: &[u8]) -> Self {
        self.options = options.to_vec();
        self
    }

    /// Fragment fields: offset in 8-octet units and the MF flag (clears DF).
    pub fn fragment(mut self, offset: u16, more: bool) -> Self {
        self.dont_fragment = false;
        self.frag_offset = offset;
        self.more_fragments = more;
        self
    }
}

/// IPv6 fixed header fields (RFC 8200 section 3); the payload length is computed.
#[derive(Clone, Debug)]
pub struct Ipv6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub traffic_class: u8,
    /// 20 bits.
    pub flow_label: u32,
    pub hop_limit: u8,
    /// Next header; `None` = from the next layer.
    pub next: Option<u8>,
}

impl Ipv6 {
    pub fn new(src: Ipv6Addr, dst: Ipv6Addr) -> Self {
        Self {
            src,
            dst,
            traffic_class: 0,
            flow_label: 0,
            hop_limit: 64,
            next: None,
        }
    }
}

/// IPv6 extension headers (RFC 8200 section 4, AH: RFC 4302 section 2).
#[derive(Clone, Debug)]
pub enum Ext {
    /// Hop-by-Hop Options (0): `len` = length in 8-octet units not counting the first 8;
    /// filled with one PadN option.
    HopByHop { len: u8 },
    /// Routing (43), routing type 253 (RFC 4727 experiment) with Segments Left 0, which a
    /// node must skip (RFC 8200 section 4.4). Same `len` rule as Hop-by-Hop.
    Routing { len: u8 },
    /// Destination Options (60); same layout as Hop-by-Hop.
    DestOpts { len: u8 },
    /// Fragment (44), always 8 bytes: `offset` in 8-octet units (13 bits), M flag, id.
    Fragment { offset: u16, more: bool, id: u32 },
    /// Authentication Header (51): `len` = length in 4-octet units minus 2 (so 4 = 24 bytes:
    /// 12 fixed + a 96-bit ICV; RFC 4302 wants a multiple of 8 bytes in IPv6).
    Auth { len: u8 },
    /// Any other number, written in the generic (next, len, (len + 1) * 8 bytes) layout.
    Other { code: u8, len: u8 },
}

impl Ext {
    /// The next-header number announcing this header.
    pub fn code(&self) -> u8 {
        match self {
            Ext::HopByHop { .. } => IPPROTO_HOPOPTS,
            Ext::Routing { .. } => IPPROTO_ROUTING,
            Ext::DestOpts { .. } => IPPROTO_DSTOPTS,
            Ext::Fragment { .. } => IPPROTO_FRAGMENT,
            Ext::Auth { .. } => IPPROTO_AH,
            Ext::Other { code, .. } => *code,
        }
    }
}

/// TCP header fields (RFC 9293 section 3.1); the checksum is computed, data offset follows
/// from `options`.
#[derive(Clone, Debug)]
pub struct Tcp {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    /// The 8 flag bits (CWR ECE URG ACK PSH RST SYN FIN).
    pub flags: u8,
    pub window: u16,
    /// Options, padded with EOL to a multiple of 4 bytes (at most 40).
    pub options: Vec<u8>,
}

impl Tcp {
    /// A segment with the given flags and no options.
    pub fn new(sport: u16, dport: u16, flags: u8) -> Self {
        Self {
            sport,
            dport,
            seq: 0x0102_0304,
            ack: if flags & TCP_ACK != 0 { 0x0a0b_0c0d } else { 0 },
            flags,
            window: 64240,
            options: Vec::new(),
        }
    }

    /// A SYN as Linux sends it, trimmed to one option: MSS 1460 (kind 2, length 4).
    pub fn syn(sport: u16, dport: u16) -> Self {
        Self {
            options: vec![2, 4, 0x05, 0xb4],
            ..Self::new(sport, dport, TCP_SYN)
        }
    }

    pub fn flags(mut self, flags: u8) -> Self {
        self.flags = flags;
        self
    }
}

/// One protocol layer.
#[derive(Clone, Debug)]
pub enum Layer {
    Ethernet {
        dst: [u8; 6],
        src: [u8; 6],
    },
    /// 802.1Q (TPID 0x8100) or 802.1ad (0x88a8) tag.
    Vlan {
        tpid: u16,
        pcp: u8,
        vid: u16,
    },
    Ipv4(Ipv4),
    Ipv6(Ipv6),
    Ext(Ext),
    Tcp(Tcp),
    Udp {
        sport: u16,
        dport: u16,
    },
    /// ICMP echo request (RFC 792).
    Icmp4Echo,
    /// ICMPv6 echo request (RFC 4443).
    Icmp6Echo,
    /// ARP request for Ethernet/IPv4 (RFC 826).
    Arp {
        sender: Ipv4Addr,
        target: Ipv4Addr,
    },
    Payload(Vec<u8>),
}

/// A frame under construction: layers outermost first.
#[derive(Clone, Debug, Default)]
pub struct Packet {
    pub layers: Vec<Layer>,
}

/// MAC addresses of test frames: locally administered (bit 1 of the first octet).
pub const MAC_DST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const MAC_SRC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

impl Packet {
    /// Starts with an Ethernet II header between [`MAC_SRC`] and [`MAC_DST`].
    pub fn eth() -> Self {
        Self {
            layers: vec![Layer::Ethernet {
                dst: MAC_DST,
                src: MAC_SRC,
            }],
        }
    }

    pub fn push(mut self, layer: Layer) -> Self {
        self.layers.push(layer);
        self
    }

    pub fn vlan(self, tpid: u16, vid: u16) -> Self {
        self.push(Layer::Vlan { tpid, pcp: 0, vid })
    }
    pub fn ipv4(self, h: Ipv4) -> Self {
        self.push(Layer::Ipv4(h))
    }
    pub fn ipv6(self, h: Ipv6) -> Self {
        self.push(Layer::Ipv6(h))
    }
    pub fn ext(self, e: Ext) -> Self {
        self.push(Layer::Ext(e))
    }
    pub fn tcp(self, t: Tcp) -> Self {
        self.push(Layer::Tcp(t))
    }
    pub fn udp(self, sport: u16, dport: u16) -> Self {
        self.push(Layer::Udp { sport, dport })
    }
    pub fn icmp4(self) -> Self {
        self.push(Layer::Icmp4Echo)
    }
    pub fn icmp6(self) -> Self {
        self.push(Layer::Icmp6Echo)
    }
    pub fn arp(self, sender: Ipv4Addr, target: Ipv4Addr) -> Self {
        self.push(Layer::Arp { sender, target })
    }
    pub fn payload(self, bytes: &[u8]) -> Self {
        self.push(Layer::Payload(bytes.to_vec()))
    }

    /// Writes the frame out.
    pub fn build(&self) -> Frame {
        let mut b: Vec<u8> = Vec::with_capacity(256);
        let mut marks = Vec::new();
        let mut starts = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let next = self.layers.get(i + 1);
            starts.push(b.len());
            write_layer(&mut b, &mut marks, layer, next);
        }
        fix_lengths_and_checksums(&mut b, &self.layers, &starts);
        Frame { bytes: b, marks }
    }
}

/// EtherType announcing `next` (after Ethernet or a VLAN tag).
fn ethertype_of(next: Option<&Layer>) -> u16 {
    match next {
        Some(Layer::Vlan { tpid, .. }) => *tpid,
        Some(Layer::Ipv4(_)) => ETH_P_IPV4,
        Some(Layer::Ipv6(_)) => ETH_P_IPV6,
        Some(Layer::Arp { .. }) => ETH_P_ARP,
        _ => ETH_P_EXPERIMENTAL,
    }
}

/// IP protocol / next-header number announcing `next`; 59 (No Next Header) when nothing
/// known follows.
fn proto_of(next: Option<&Layer>) -> u8 {
    match next {
        Some(Layer::Tcp(_)) => IPPROTO_TCP,
        Some(Layer::Udp { .. }) => IPPROTO_UDP,
        Some(Layer::Icmp4Echo) => IPPROTO_ICMP,
        Some(Layer::Icmp6Echo) => IPPROTO_ICMPV6,
        Some(Layer::Ext(e)) => e.code(),
        Some(Layer::Ipv4(_)) => 4,
        Some(Layer::Ipv6(_)) => 41,
        _ => IPPROTO_NONE,
    }
}

fn pad4(opts: &[u8]) -> Vec<u8> {
    let mut v = opts.to_vec();
    // EOL / end of option list (IPv4 and TCP both use kind 0).
    v.resize(v.len().next_multiple_of(4), 0);
    assert!(v.len() <= 40, "at most 40 bytes of options fit");
    v
}

fn write_layer(
    b: &mut Vec<u8>,
    marks: &mut Vec<(Mark, usize)>,
    layer: &Layer,
    next: Option<&Layer>,
) {
    match layer {
        Layer::Ethernet { dst, src } => {
            b.extend_from_slice(dst); // destination MAC
            b.extend_from_slice(src); // source MAC
            marks.push((Mark::EtherType, b.len()));
            b.extend_from_slice(&ethertype_of(next).to_be_bytes()); // EtherType
        }
        Layer::Vlan { pcp, vid, .. } => {
            // The TPID that announces this tag is the previous EtherType field.
            marks.push((Mark::VlanTci, b.len()));
            let tci = (u16::from(*pcp) << 13) | (vid & 0x0fff); // PCP(3) DEI(1)=0 VID(12)
            b.extend_from_slice(&tci.to_be_bytes());
            marks.push((Mark::EtherType, b.len()));
            b.extend_from_slice(&ethertype_of(next).to_be_bytes()); // encapsulated EtherType
        }
        Layer::Ipv4(h) => {
            let opts = pad4(&h.options);
            let ihl = 5 + opts.len() / 4;
            marks.push((Mark::L3, b.len()));
            marks.push((Mark::Ipv4VerIhl, b.len()));
            b.push((4 << 4) | ihl as u8); // version 4, IHL in 32-bit words
            b.push(h.tos); // DSCP + ECN
            marks.push((Mark::IpLen, b.len()));
            b.extend_from_slice(&[0, 0]); // total length: fixed up at the end
            b.extend_from_slice(&h.id.to_be_bytes()); // identification
            let frag = (u16::from(h.dont_fragment) << 14)
                | (u16::from(h.more_fragments) << 13)
                | (h.frag_offset & 0x1fff);
            marks.push((Mark::Ipv4Frag, b.len()));
            b.extend_from_slice(&frag.to_be_bytes()); // reserved(1) DF(1) MF(1) offset(13)
            b.push(h.ttl); // time to live
            marks.push((Mark::Ipv4Proto, b.len()));
            b.push(h.proto.unwrap_or_else(|| proto_of(next))); // protocol
            b.extend_from_slice(&[0, 0]); // header checksum: fixed up at the end
            b.extend_from_slice(&h.src.octets()); // source address
            b.extend_from_slice(&h.dst.octets()); // destination address
            b.extend_from_slice(&opts); // options
        }
        Layer::Ipv6(h) => {
            marks.push((Mark::L3, b.len()));
            // version(4) traffic class(8) flow label(20)
            let first =
                (6u32 << 28) | (u32::from(h.traffic_class) << 20) | (h.flow_label & 0xf_ffff);
            b.extend_from_slice(&first.to_be_bytes());
            marks.push((Mark::IpLen, b.len()));
            b.extend_from_slice(&[0, 0]); // payload length: fixed up at the end
            marks.push((Mark::Ipv6Next, b.len()));
            b.push(h.next.unwrap_or_else(|| proto_of(next))); // next header
            b.push(h.hop_limit); // hop limit
            b.extend_from_slice(&h.src.octets()); // source address
            b.extend_from_slice(&h.dst.octets()); // destination address
        }
        Layer::Ext(e) => {
            marks.push((Mark::ExtNext, b.len()));
            b.push(proto_of(next)); // next header
            marks.push((Mark::ExtLen, b.len()));
            match e {
                Ext::HopByHop { len } | Ext::DestOpts { len } => {
                    b.push(*len); // hdr ext len, 8-octet units beyond the first 8
                                  // One PadN option (type 1, data length n) fills the rest.
                    let rest = (usize::from(*len) + 1) * 8 - 2;
                    b.push(1);
                    b.push((rest - 2) as u8);
                    b.resize(b.len() + rest - 2, 0);
                }
                Ext::Routing { len } => {
                    b.push(*len); // hdr ext len
                    b.push(253); // routing type (experimental)
                    b.push(0); // segments left: 0, so the header is skipped
                    b.resize(b.len() + (usize::from(*len) + 1) * 8 - 4, 0); // type-specific data
                }
                Ext::Fragment { offset, more, id } => {
                    b.push(0); // reserved
                    marks.push((Mark::Ipv6FragOff, b.len()));
                    let f = ((offset & 0x1fff) << 3) | u16::from(*more); // offset(13) res(2) M(1)
                    b.extend_from_slice(&f.to_be_bytes());
                    b.extend_from_slice(&id.to_be_bytes()); // identification
                }
                Ext::Auth { len } => {
                    let total = (usize::from(*len) + 2) * 4;
                    assert!(total >= 12, "AH is at least 12 bytes (len >= 1)");
                    b.push(*len); // payload len, 4-octet units minus 2
                    b.extend_from_slice(&[0, 0]); // reserved
                    b.extend_from_slice(&0x0000_1000u32.to_be_bytes()); // SPI
                    b.extend_from_slice(&1u32.to_be_bytes()); // sequence number
                    b.resize(b.len() + total - 12, 0xab); // integrity check value
                }
                Ext::Other { len, .. } => {
                    b.push(*len); // length, generic TLV layout (RFC 8200 section 4.8)
                    b.resize(b.len() + (usize::from(*len) + 1) * 8 - 2, 0);
                }
            }
        }
        Layer::Tcp(t) => {
            let opts = pad4(&t.options);
            marks.push((Mark::L4, b.len()));
            b.extend_from_slice(&t.sport.to_be_bytes()); // source port
            marks.push((Mark::TcpDport, b.len()));
            b.extend_from_slice(&t.dport.to_be_bytes()); // destination port
            b.extend_from_slice(&t.seq.to_be_bytes()); // sequence number
            b.extend_from_slice(&t.ack.to_be_bytes()); // acknowledgment number
            marks.push((Mark::TcpDoff, b.len()));
            b.push(((5 + opts.len() / 4) as u8) << 4); // data offset(4) reserved(4)
            marks.push((Mark::TcpFlags, b.len()));
            b.push(t.flags); // CWR ECE URG ACK PSH RST SYN FIN
            b.extend_from_slice(&t.window.to_be_bytes()); // window
            b.extend_from_slice(&[0, 0]); // checksum: fixed up at the end
            b.extend_from_slice(&[0, 0]); // urgent pointer
            b.extend_from_slice(&opts); // options
        }
        Layer::Udp { sport, dport } => {
            marks.push((Mark::L4, b.len()));
            b.extend_from_slice(&sport.to_be_bytes()); // source port
            b.extend_from_slice(&dport.to_be_bytes()); // destination port
            b.extend_from_slice(&[0, 0]); // length: fixed up at the end
            b.extend_from_slice(&[0, 0]); // checksum: fixed up at the end
        }
        Layer::Icmp4Echo | Layer::Icmp6Echo => {
            marks.push((Mark::L4, b.len()));
            b.push(if matches!(layer, Layer::Icmp4Echo) {
                8
            } else {
                128
            }); // type: echo request
            b.push(0); // code
            b.extend_from_slice(&[0, 0]); // checksum: fixed up at the end
            b.extend_from_slice(&0x4242u16.to_be_bytes()); // identifier
            b.extend_from_slice(&1u16.to_be_bytes()); // sequence number
        }
        Layer::Arp { sender, target } => {
            marks.push((Mark::L3, b.len()));
            b.extend_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
            b.extend_from_slice(&ETH_P_IPV4.to_be_bytes()); // protocol type: IPv4
            b.push(6); // hardware address length
            b.push(4); // protocol address length
            b.extend_from_slice(&1u16.to_be_bytes()); // operation: request
            b.extend_from_slice(&MAC_SRC); // sender hardware address
            b.extend_from_slice(&sender.octets()); // sender protocol address
            b.extend_from_slice(&[0; 6]); // target hardware address: unknown
            b.extend_from_slice(&target.octets()); // target protocol address
        }
        Layer::Payload(p) => b.extend_from_slice(p),
    }
}

/// RFC 1071 one's-complement sum, not yet complemented.
fn sum16(mut acc: u32, data: &[u8]) -> u32 {
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        acc += u32::from(w);
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// Lengths first (IPv4 total length, IPv6 payload length, UDP length), then transport
/// checksums over the pseudo-header of the innermost IP header before them, then the IPv4
/// header checksum (which covers the total length).
fn fix_lengths_and_checksums(b: &mut [u8], layers: &[Layer], starts: &[usize]) {
    let end = b.len();
    for (l, &s) in layers.iter().zip(starts) {
        match l {
            Layer::Ipv4(_) => b[s + 2..s + 4].copy_from_slice(&((end - s) as u16).to_be_bytes()),
            Layer::Ipv6(_) => {
                b[s + 4..s + 6].copy_from_slice(&((end - s - 40) as u16).to_be_bytes())
            }
            Layer::Udp { .. } => b[s + 4..s + 6].copy_from_slice(&((end - s) as u16).to_be_bytes()),
            _ => {}
        }
    }
    for (i, (l, &s)) in layers.iter().zip(starts).enumerate() {
        let csum_at = match l {
            Layer::Tcp(_) => s + 16,
            Layer::Udp { .. } => s + 6,
            Layer::Icmp4Echo | Layer::Icmp6Echo => s + 2,
            _ => continue,
        };
        let (proto, len) = (
            match l {
                Layer::Tcp(_) => IPPROTO_TCP,
                Layer::Udp { .. } => IPPROTO_UDP,
                _ => IPPROTO_ICMPV6,
            },
            (end - s) as u32,
        );
        let ip = layers[..i]
            .iter()
            .zip(starts)
            .rev()
            .find(|(l, _)| matches!(l, Layer::Ipv4(_) | Layer::Ipv6(_)));
        // Pseudo-header (RFC 9293 section 3.1, RFC 8200 section 8.1); ICMPv4 has none.
        let acc = match ip {
            Some((Layer::Ipv4(h), _)) if !matches!(l, Layer::Icmp4Echo) => {
                let acc = sum16(0, &h.src.octets());
                let acc = sum16(acc, &h.dst.octets());
                sum16(acc, &[0, proto, (len >> 8) as u8, len as u8])
            }
            Some((Layer::Ipv6(h), _)) => {
                let acc = sum16(0, &h.src.octets());
                let acc = sum16(acc, &h.dst.octets());
                let acc = sum16(acc, &len.to_be_bytes());
                sum16(acc, &[0, 0, 0, proto])
            }
            _ => 0,
        };
        let c = fold(sum16(acc, &b[s..end]));
        b[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
    }
    for (l, &s) in layers.iter().zip(starts) {
        if let Layer::Ipv4(h) = l {
            let hl = 20 + pad4(&h.options).len();
            let c = fold(sum16(0, &b[s..s + hl]));
            b[s + 10..s + 12].copy_from_slice(&c.to_be_bytes());
        }
    }
}

/// RFC 1071 Internet checksum over `chunks` taken as one byte string (every chunk but the
/// last of even length), for tests that check a checksum a program wrote.
pub fn inet_checksum(chunks: &[&[u8]]) -> u16 {
    fold(chunks.iter().fold(0, |acc, c| sum16(acc, c)))
}

/// `b` in hex, for messages about a frame.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The bytes written by [`hex`] (whitespace ignored); `None` for anything else.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    digits
        .chunks(2)
        .map(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_syn_layout_and_checksums() {
        let f = Packet::eth()
            .ipv4(Ipv4::new([198, 18, 0, 1].into(), [198, 18, 0, 2].into()))
            .tcp(Tcp::syn(40000, 80))
            .build();
        let b = &f.bytes;
        assert_eq!(b.len(), 14 + 20 + 24);
        assert_eq!(&b[12..14], &[0x08, 0x00]);
        assert_eq!(b[14], 0x45);
        assert_eq!(u16::from_be_bytes([b[16], b[17]]), 44); // total length
        assert_eq!(b[23], IPPROTO_TCP);
        // A correct header checksum makes the header sum to 0xffff.
        assert_eq!(fold(sum16(0, &b[14..34])), 0);
        assert_eq!(f.at(Mark::TcpFlags), Some(34 + 13));
        assert_eq!(b[34 + 13], TCP_SYN);
        assert_eq!(b[34 + 12], 6 << 4); // doff 6 words: MSS option
                                        // TCP checksum verifies over pseudo-header + segment.
        let acc = sum16(0, &b[26..34]);
        let acc = sum16(acc, &[0, 6, 0, 24]);
        assert_eq!(fold(sum16(acc, &b[34..])), 0);
    }

    #[test]
    fn ipv6_ext_chain_next_headers() {
        let f = Packet::eth()
            .vlan(ETH_P_8021AD, 1)
            .vlan(ETH_P_8021Q, 2)
            .ipv6(Ipv6::new(
                "fd00::1".parse().unwrap(),
                "fd00::2".parse().unwrap(),
            ))
            .ext(Ext::HopByHop { len: 0 })
            .ext(Ext::Routing { len: 2 })
            .ext(Ext::Fragment {
                offset: 0,
                more: true,
                id: 7,
            })
            .ext(Ext::Auth { len: 4 })
            .ext(Ext::DestOpts { len: 1 })
            .tcp(Tcp::syn(1, 443))
            .build();
        let b = &f.bytes;
        assert_eq!(&b[12..14], &[0x88, 0xa8]);
        assert_eq!(&b[16..18], &[0x81, 0x00]);
        assert_eq!(&b[20..22], &[0x86, 0xdd]);
        let l3 = 22;
        assert_eq!(b[l3 + 6], IPPROTO_HOPOPTS);
        let nexts: Vec<u8> = f.all(Mark::ExtNext).map(|o| b[o]).collect();
        assert_eq!(
            nexts,
            [
                IPPROTO_ROUTING,
                IPPROTO_FRAGMENT,
                IPPROTO_AH,
                IPPROTO_DSTOPTS,
                IPPROTO_TCP
            ]
        );
        let l4 = f.at(Mark::L4).unwrap();
        assert_eq!(l4, l3 + 40 + 8 + 24 + 8 + 24 + 16);
        assert_eq!(
            usize::from(u16::from_be_bytes([b[l3 + 4], b[l3 + 5]])),
            b.len() - l3 - 40
        );
    }
}

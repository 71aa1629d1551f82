//! Wire formats: header layouts and the protocol constants the parser and the
//! sk_lookup/tracepoint programs share, in one place.
//!
//! Every header is `#[repr(C, packed)]` (alignment 1, no padding), so a reference to one can
//! sit at any offset in a packet: a VLAN tag or IPv4 options shift what follows by amounts
//! that keep no alignment. Multi-byte fields are [`Be16`] / [`Be32`], which hold network byte
//! order and only give a host-order number through `get()`, so no field is read the wrong
//! way round.

/// A big-endian (network order) u16 as it sits in a header.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Be16(u16);

impl Be16 {
    pub const fn new(host: u16) -> Self {
        Self(host.to_be())
    }

    #[inline(always)]
    pub const fn get(self) -> u16 {
        u16::from_be(self.0)
    }
}

/// A big-endian (network order) u32 as it sits in a header.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Be32(u32);

// EtherTypes (IEEE 802 numbers, as in include/uapi/linux/if_ether.h), in wire order so a
// header field compares with them as is.
pub const ETH_P_IP: Be16 = Be16::new(0x0800);
pub const ETH_P_IPV6: Be16 = Be16::new(0x86DD);
pub const ETH_P_8021Q: Be16 = Be16::new(0x8100);
pub const ETH_P_8021AD: Be16 = Be16::new(0x88A8);

// IP protocol numbers / IPv6 next-header values (IANA; RFC 8200 section 4 for the
// extension headers the parser walks).
pub const IPPROTO_TCP: u8 = 6;
pub const NEXTHDR_HOP: u8 = 0;
pub const NEXTHDR_ROUTING: u8 = 43;
pub const NEXTHDR_FRAGMENT: u8 = 44;
pub const NEXTHDR_AUTH: u8 = 51;
pub const NEXTHDR_DEST: u8 = 60;

// TCP flags (the byte after the data offset, RFC 9293 section 3.1).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
/// The flags that tell a connection request from other segments: SYN set, the other three
/// clear. CWR and ECE are left out because an ECN-capable SYN sets them (flags 0xC2).
pub const TCP_REQUEST_MASK: u8 = TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN;

// Limits of what the parser follows; a frame beyond them passes (fail open).
/// 802.1ad and/or 802.1Q tags followed: two cover QinQ.
pub const MAX_VLAN_TAGS: usize = 2;
/// Chained IPv6 extension headers followed.
pub const MAX_EXT_HEADERS: usize = 6;
/// Bytes of headers the parser may read at most; the TC program pulls this much into the
/// linear part of the skb.
pub const MAX_HEADERS: u32 = 256;

/// Ethernet II header.
#[repr(C, packed)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: Be16,
}

/// An 802.1Q / 802.1ad tag: what follows the EtherType that announced it.
#[repr(C, packed)]
pub struct VlanHdr {
    pub tci: Be16,
    /// The encapsulated EtherType.
    pub proto: Be16,
}

/// IPv4 header without options (RFC 791).
#[repr(C, packed)]
pub struct Ipv4Hdr {
    /// Version (high nibble) and header length in 32-bit words (low nibble).
    pub vihl: u8,
    pub tos: u8,
    pub tot_len: Be16,
    pub id: Be16,
    /// Flags (high 3 bits) and fragment offset in 8-byte units (low 13 bits).
    pub frag_off: Be16,
    pub ttl: u8,
    pub proto: u8,
    pub check: Be16,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

impl Ipv4Hdr {
    /// Version 4, 20-byte header: no options.
    pub const VIHL_PLAIN: u8 = 0x45;

    #[inline(always)]
    pub fn version(&self) -> u8 {
        self.vihl >> 4
    }

    /// Header length in bytes, options included.
    #[inline(always)]
    pub fn header_len(&self) -> usize {
        usize::from(self.vihl & 0x0f) * 4
    }

    /// Non-zero for every fragment but the first: those carry no TCP header.
    #[inline(always)]
    pub fn frag_offset(&self) -> u16 {
        self.frag_off.get() & 0x1fff
    }
}

/// IPv6 fixed header (RFC 8200 section 3).
#[repr(C, packed)]
pub struct Ipv6Hdr {
    /// Version (4 bits), traffic class (8), flow label (20).
    pub vtc_flow: [u8; 4],
    pub payload_len: Be16,
    pub next_hdr: u8,
    pub hop_limit: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

impl Ipv6Hdr {
    #[inline(always)]
    pub fn version(&self) -> u8 {
        self.vtc_flow[0] >> 4
    }
}

/// The first two bytes every IPv6 extension header the parser walks starts with. What the
/// length counts differs: 8-octet units past the first 8 for hop-by-hop, routing and
/// destination options (RFC 8200 section 4.3), 4-octet units minus 2 for AH (RFC 4302).
#[repr(C, packed)]
pub struct Ipv6ExtHdr {
    pub next_hdr: u8,
    pub hdr_len: u8,
}

/// IPv6 fragment header (RFC 8200 section 4.5).
#[repr(C, packed)]
pub struct Ipv6FragHdr {
    pub next_hdr: u8,
    pub reserved: u8,
    /// Fragment offset in 8-byte units (high 13 bits), flags (low 3).
    pub frag_off: Be16,
    pub id: Be32,
}

impl Ipv6FragHdr {
    /// Non-zero for every fragment but the first.
    #[inline(always)]
    pub fn frag_offset(&self) -> u16 {
        self.frag_off.get() >> 3
    }
}

/// TCP header without options (RFC 9293 section 3.1).
#[repr(C, packed)]
pub struct TcpHdr {
    pub sport: Be16,
    pub dport: Be16,
    pub seq: Be32,
    pub ack_seq: Be32,
    /// Data offset in 32-bit words (high nibble).
    pub doff: u8,
    pub flags: u8,
    pub window: Be16,
    pub check: Be16,
    pub urg_ptr: Be16,
}

impl TcpHdr {
    /// SYN set, ACK, RST and FIN clear: a connection request.
    #[inline(always)]
    pub fn is_request(&self) -> bool {
        self.flags & TCP_REQUEST_MASK == TCP_SYN
    }
}

// The layouts above are the wire's, byte for byte.
const _: () = {
    use core::mem::{align_of, size_of};
    assert!(size_of::<EthHdr>() == 14 && align_of::<EthHdr>() == 1);
    assert!(size_of::<VlanHdr>() == 4 && align_of::<VlanHdr>() == 1);
    assert!(size_of::<Ipv4Hdr>() == 20 && align_of::<Ipv4Hdr>() == 1);
    assert!(size_of::<Ipv6Hdr>() == 40 && align_of::<Ipv6Hdr>() == 1);
    assert!(size_of::<Ipv6ExtHdr>() == 2 && align_of::<Ipv6ExtHdr>() == 1);
    assert!(size_of::<Ipv6FragHdr>() == 8 && align_of::<Ipv6FragHdr>() == 1);
    assert!(size_of::<TcpHdr>() == 20 && align_of::<TcpHdr>() == 1);
};

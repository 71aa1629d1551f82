//! Reference classifier: is this frame a TCP connection request, and to which port?
//!
//! Written from the RFCs over a byte slice, deliberately not from drain-ebpf/src/parse.rs, so
//! that the tests compare two readings of the same specification. The specification:
//!
//! 1. Ethernet II (IEEE 802.3 clause 3.2.6): destination, source, EtherType at bytes 12..14.
//!    Then at most two VLAN tags, each announced by TPID 0x8100 (802.1Q) or 0x88a8
//!    (802.1ad), in any order: 2 bytes TCI, then the next EtherType. A third tag → not a
//!    request.
//! 2. EtherType 0x0800 → IPv4 (RFC 791): version must be 4 and IHL >= 5; the whole header
//!    (IHL * 4 bytes, options included) must be present. A fragment with a non-zero fragment
//!    offset carries no TCP header → not a request; a first fragment (offset 0, MF set or
//!    not) is parsed like a whole datagram. Protocol must be 6 (TCP). The transport header
//!    starts at IHL * 4.
//! 3. EtherType 0x86DD → IPv6 (RFC 8200): version must be 6; the fixed header is 40 bytes.
//!    Extension headers are walked while the next header is one of
//!    - 0 Hop-by-Hop, 43 Routing, 60 Destination Options: length (byte 1 + 1) * 8;
//!    - 44 Fragment: 8 bytes; a non-zero fragment offset (bits 15..3 of bytes 2..4) → not
//!      a request;
//!    - 51 AH (RFC 4302): length (byte 1 + 2) * 4.
//!
//!    At most [`MAX_EXT_HEADERS`] of them (a seventh → not a request); the chain must end
//!    in 6 (TCP); any other next header (59 No Next Header, 50 ESP, 135 Mobility, UDP, ...)
//!    → not a request. Order and repetition of extension headers are not checked.
//! 4. Any other EtherType (ARP, LLC lengths < 0x0600, ...) → not a request.
//! 5. TCP (RFC 9293): the fixed 20-byte header must be present. A connection request is a
//!    segment whose SYN is set and ACK, RST and FIN are clear; URG, PSH, ECE and CWR are
//!    ignored (an ECN-setup SYN has flags 0xC2, RFC 3168 section 6.1.1). The port is bytes
//!    2..4 (network order).
//! 6. If any byte the steps above need lies beyond the end of the frame → not a request.
//!
//! Not consulted (each a frame the Linux stack drops anyway, so either verdict is harmless,
//! and the layer-2 length decides what is present): IPv4 total length, IPv6 payload length,
//! checksums, the TCP data offset and options, source/destination address validity, whether
//! Hop-by-Hop comes first.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Extension headers followed at most before the transport header (spec step 3).
pub const MAX_EXT_HEADERS: usize = 6;

/// A connection request: what the gate keys on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Destination port, host order.
    pub dport: u16,
    /// Source address, for the allowlist.
    pub src: IpAddr,
    /// Offsets of the IP and TCP headers in the frame.
    pub l3: usize,
    pub l4: usize,
}

/// Why a frame is not a connection request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotRequest {
    /// A needed byte is past the end of the frame.
    Truncated,
    /// More than two VLAN tags.
    TooManyTags,
    /// Neither IPv4 nor IPv6 (the EtherType found after any tags).
    NotIp(u16),
    /// Version nibble disagrees with the EtherType.
    BadVersion(u8),
    /// IPv4 IHL below 5.
    BadIhl(u8),
    /// A fragment other than the first.
    LaterFragment,
    /// The transport protocol (or unknown extension header) is not TCP.
    NotTcp(u8),
    /// More than [`MAX_EXT_HEADERS`] IPv6 extension headers.
    TooManyExtHeaders,
    /// TCP, but not SYN without ACK/RST/FIN; carries the flags.
    NotSyn(u8),
}

/// Classifies one Ethernet frame (see the module documentation for the rules).
pub fn classify(frame: &[u8]) -> Result<Request, NotRequest> {
    let mut pos = 12;
    let mut ethertype = be16(frame, pos)?;
    pos += 2;
    let mut tags = 0;
    while ethertype == 0x8100 || ethertype == 0x88a8 {
        if tags == 2 {
            return Err(NotRequest::TooManyTags);
        }
        tags += 1;
        // TCI at pos..pos+2, the inner EtherType after it.
        ethertype = be16(frame, pos + 2)?;
        pos += 4;
    }
    match ethertype {
        0x0800 => from_ipv4(frame, pos),
        0x86dd => from_ipv6(frame, pos),
        other => Err(NotRequest::NotIp(other)),
    }
}

fn byte(frame: &[u8], at: usize) -> Result<u8, NotRequest> {
    frame.get(at).copied().ok_or(NotRequest::Truncated)
}

fn be16(frame: &[u8], at: usize) -> Result<u16, NotRequest> {
    Ok(u16::from_be_bytes([byte(frame, at)?, byte(frame, at + 1)?]))
}

fn bytes<const N: usize>(frame: &[u8], at: usize) -> Result<[u8; N], NotRequest> {
    let s = frame.get(at..at + N).ok_or(NotRequest::Truncated)?;
    Ok(s.try_into().expect("slice of length N"))
}

fn from_ipv4(frame: &[u8], l3: usize) -> Result<Request, NotRequest> {
    let first = byte(frame, l3)?;
    let (version, ihl) = (first >> 4, first & 0x0f);
    if version != 4 {
        return Err(NotRequest::BadVersion(version));
    }
    if ihl < 5 {
        return Err(NotRequest::BadIhl(ihl));
    }
    let header: [u8; 20] = bytes(frame, l3)?;
    if frame.len() < l3 + usize::from(ihl) * 4 {
        return Err(NotRequest::Truncated);
    }
    // Bytes 6..8: flags (3 bits) and fragment offset (13 bits).
    let frag_offset = u16::from_be_bytes([header[6], header[7]]) & 0x1fff;
    if frag_offset != 0 {
        return Err(NotRequest::LaterFragment);
    }
    if header[9] != 6 {
        return Err(NotRequest::NotTcp(header[9]));
    }
    let src = Ipv4Addr::new(header[12], header[13], header[14], header[15]);
    from_tcp(frame, l3, l3 + usize::from(ihl) * 4, IpAddr::V4(src))
}

fn from_ipv6(frame: &[u8], l3: usize) -> Result<Request, NotRequest> {
    let header: [u8; 40] = bytes(frame, l3)?;
    if header[0] >> 4 != 6 {
        return Err(NotRequest::BadVersion(header[0] >> 4));
    }
    let src_octets: [u8; 16] = header[8..24].try_into().expect("16 bytes");
    let src = IpAddr::V6(Ipv6Addr::from(src_octets));
    let mut next = header[6];
    let mut pos = l3 + 40;
    let mut seen = 0;
    loop {
        let len = match next {
            6 => return from_tcp(frame, l3, pos, src),
            0 | 43 | 60 => (usize::from(byte(frame, pos + 1)?) + 1) * 8,
            44 => {
                let off_flags = be16(frame, pos + 2)?;
                if off_flags >> 3 != 0 {
                    return Err(NotRequest::LaterFragment);
                }
                8
            }
            51 => (usize::from(byte(frame, pos + 1)?) + 2) * 4,
            other => return Err(NotRequest::NotTcp(other)),
        };
        if seen == MAX_EXT_HEADERS {
            return Err(NotRequest::TooManyExtHeaders);
        }
        seen += 1;
        next = byte(frame, pos)?;
        pos += len;
    }
}

fn from_tcp(frame: &[u8], l3: usize, l4: usize, src: IpAddr) -> Result<Request, NotRequest> {
    let tcp: [u8; 20] = bytes(frame, l4)?;
    let flags = tcp[13];
    // FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10.
    if flags & (0x01 | 0x02 | 0x04 | 0x10) != 0x02 {
        return Err(NotRequest::NotSyn(flags));
    }
    Ok(Request {
        dport: u16::from_be_bytes([tcp[2], tcp[3]]),
        src,
        l3,
        l4,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::*;

    fn v4() -> Ipv4 {
        Ipv4::new([198, 18, 0, 1].into(), [198, 18, 0, 2].into())
    }
    fn v6() -> Ipv6 {
        Ipv6::new("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap())
    }

    #[test]
    fn plain_syns_are_requests() {
        let f = Packet::eth().ipv4(v4()).tcp(Tcp::syn(1234, 80)).build();
        assert_eq!(
            classify(&f.bytes),
            Ok(Request {
                dport: 80,
                src: IpAddr::V4([198, 18, 0, 1].into()),
                l3: 14,
                l4: 34,
            })
        );
        let f = Packet::eth().ipv6(v6()).tcp(Tcp::syn(1234, 8443)).build();
        assert_eq!(classify(&f.bytes).map(|r| r.dport), Ok(8443));
    }

    #[test]
    fn flags() {
        for (flags, request) in [
            (TCP_SYN, true),
            (TCP_SYN | TCP_ECE | TCP_CWR, true),
            (TCP_SYN | TCP_PSH | TCP_URG, true),
            (TCP_SYN | TCP_ACK, false),
            (TCP_SYN | TCP_RST, false),
            (TCP_SYN | TCP_FIN, false),
            (TCP_ACK, false),
            (TCP_RST, false),
            (0, false),
        ] {
            let f = Packet::eth()
                .ipv4(v4())
                .tcp(Tcp::syn(1, 80).flags(flags))
                .build();
            assert_eq!(classify(&f.bytes).is_ok(), request, "flags {flags:#04x}");
        }
    }

    #[test]
    fn tags_ipv4_options_fragments() {
        let two = Packet::eth().vlan(ETH_P_8021AD, 1).vlan(ETH_P_8021Q, 2);
        assert!(classify(&two.clone().ipv4(v4()).tcp(Tcp::syn(1, 80)).build().bytes).is_ok());
        let three = two
            .vlan(ETH_P_8021Q, 3)
            .ipv4(v4())
            .tcp(Tcp::syn(1, 80))
            .build();
        assert_eq!(classify(&three.bytes), Err(NotRequest::TooManyTags));
        let opts = Packet::eth()
            .ipv4(v4().options(&[IPOPT_NOP; 40]))
            .tcp(Tcp::syn(1, 80))
            .build();
        assert_eq!(classify(&opts.bytes).map(|r| r.dport), Ok(80));
        let first = Packet::eth()
            .ipv4(v4().fragment(0, true))
            .tcp(Tcp::syn(1, 80))
            .build();
        assert!(classify(&first.bytes).is_ok());
        let later = Packet::eth()
            .ipv4(v4().fragment(1, false))
            .tcp(Tcp::syn(1, 80))
            .build();
        assert_eq!(classify(&later.bytes), Err(NotRequest::LaterFragment));
    }

    #[test]
    fn ipv6_chain_limit() {
        let chain = |n: usize| {
            let mut p = Packet::eth().ipv6(v6());
            for _ in 0..n {
                p = p.ext(Ext::DestOpts { len: 0 });
            }
            p.tcp(Tcp::syn(1, 80)).build()
        };
        assert!(classify(&chain(MAX_EXT_HEADERS).bytes).is_ok());
        assert_eq!(
            classify(&chain(MAX_EXT_HEADERS + 1).bytes),
            Err(NotRequest::TooManyExtHeaders)
        );
        let later = Packet::eth()
            .ipv6(v6())
            .ext(Ext::Fragment {
                offset: 3,
                more: false,
                id: 1,
            })
            .tcp(Tcp::syn(1, 80))
            .build();
        assert_eq!(classify(&later.bytes), Err(NotRequest::LaterFragment));
    }

    #[test]
    fn truncation_is_exactly_at_the_tcp_header_end() {
        let f = Packet::eth().ipv4(v4()).tcp(Tcp::syn(1, 80)).build();
        let need = 14 + 20 + 20;
        for len in 0..=f.bytes.len() {
            assert_eq!(classify(&f.bytes[..len]).is_ok(), len >= need, "len {len}");
        }
    }
}

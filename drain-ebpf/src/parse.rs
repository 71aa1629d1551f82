//! Finds connection requests: TCP segments with SYN set and ACK, RST, FIN clear.
//!
//! Every read goes through [`ptr_at`], which checks the bound the verifier needs. Any frame
//! this parser does not understand, or that ends early, is `Err` / `None`: the caller lets it
//! pass (fail open).

use core::mem::size_of;

/// Bytes of headers the parser may read at most; the TC program pulls this much into the
/// linear part of the skb.
pub const MAX_HEADERS: u32 = 256;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const IPPROTO_TCP: u8 = 6;

// IPv6 extension headers walked to reach TCP (RFC 8200 section 4).
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
/// Chained extension headers followed at most; more than this passes.
const MAX_EXT_HEADERS: usize = 6;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// Source address of a connection request, network byte order.
pub enum Source {
    V4([u8; 4]),
    V6([u8; 16]),
}

/// A connection request: destination port (host order), source address, and where its
/// headers are, for answering it with a RST.
pub struct Request {
    pub dport: u16,
    pub source: Source,
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the TCP header.
    pub l4: usize,
}

impl Request {
    /// IPv4 without options or IPv6 without extension headers, at most two VLAN tags in:
    /// the headers `reset::xdp` can turn around.
    #[inline(always)]
    pub fn plain_headers(&self) -> bool {
        let ip = match self.source {
            Source::V4(_) => 20,
            Source::V6(_) => 40,
        };
        self.l3 <= ETH_HLEN + 8 && self.l4 == self.l3 + ip
    }
}

/// Bounds-checked pointer to a `T` at `off` bytes into the packet `[start, end)`.
#[inline(always)]
pub fn ptr_at<T>(start: usize, end: usize, off: usize) -> Result<*const T, ()> {
    if start + off + size_of::<T>() > end {
        return Err(());
    }
    Ok((start + off) as *const T)
}

/// Copies `N` bytes at `off` out of the packet, after one bounds check. Reading a whole
/// header through one checked pointer keeps the verifier's range tracking simple (separate
/// checks per field at a variable offset get split across registers and rejected).
#[inline(always)]
pub fn bytes_at<const N: usize>(start: usize, end: usize, off: usize) -> Result<[u8; N], ()> {
    // SAFETY: ptr_at checked that all N bytes lie inside the packet; [u8; N] has alignment 1.
    Ok(unsafe { *ptr_at::<[u8; N]>(start, end, off)? })
}

#[inline(always)]
fn be16(b0: u8, b1: u8) -> u16 {
    u16::from_be_bytes([b0, b1])
}

/// `Ok(Some(request))` for a connection request, `Ok(None)` for any other frame that was
/// understood (other protocols, other TCP segments, non-first fragments), `Err` for a frame
/// cut short.
#[inline(always)]
pub fn connection_request(start: usize, end: usize) -> Result<Option<Request>, ()> {
    let mut off = ETH_HLEN;
    let eth = bytes_at::<ETH_HLEN>(start, end, 0)?;
    let mut proto = be16(eth[12], eth[13]);
    // 802.1ad outer tag and/or 802.1Q tag(s): two levels cover QinQ.
    for _ in 0..2 {
        if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
            // TCI (2 bytes), then the encapsulated EtherType.
            let tag = bytes_at::<4>(start, end, off)?;
            proto = be16(tag[2], tag[3]);
            off += 4;
        }
    }
    match proto {
        ETH_P_IP => ipv4(start, end, off),
        ETH_P_IPV6 => ipv6(start, end, off),
        _ => Ok(None),
    }
}

#[inline(always)]
fn ipv4(start: usize, end: usize, off: usize) -> Result<Option<Request>, ()> {
    // The fixed 20 bytes; options, if any, are skipped by the IHL below.
    let h = bytes_at::<20>(start, end, off)?;
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if h[0] >> 4 != 4 || ihl < 20 {
        return Ok(None);
    }
    // Fragment offset (low 13 bits of bytes 6..8): a non-first fragment has no TCP header.
    if be16(h[6], h[7]) & 0x1fff != 0 {
        return Ok(None);
    }
    if h[9] != IPPROTO_TCP {
        return Ok(None);
    }
    let saddr = [h[12], h[13], h[14], h[15]];
    tcp(start, end, off, off + ihl, Source::V4(saddr))
}

#[inline(always)]
fn ipv6(start: usize, end: usize, off: usize) -> Result<Option<Request>, ()> {
    let h = bytes_at::<8>(start, end, off)?;
    if h[0] >> 4 != 6 {
        return Ok(None);
    }
    let mut next = h[6];
    let saddr = bytes_at::<16>(start, end, off + 8)?;
    let l3 = off;
    let mut off = off + 40;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            IPPROTO_TCP => return tcp(start, end, l3, off, Source::V6(saddr)),
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                // Next header, then length in 8-octet units not counting the first 8.
                let x = bytes_at::<2>(start, end, off)?;
                next = x[0];
                off += (x[1] as usize + 1) * 8;
            }
            NEXTHDR_FRAGMENT => {
                // Fragment offset is the high 13 bits of bytes 2..4.
                let x = bytes_at::<4>(start, end, off)?;
                if be16(x[2], x[3]) >> 3 != 0 {
                    return Ok(None);
                }
                next = x[0];
                off += 8;
            }
            NEXTHDR_AUTH => {
                // RFC 4302: payload length in 4-octet units, minus 2.
                let x = bytes_at::<2>(start, end, off)?;
                next = x[0];
                off += (x[1] as usize + 2) * 4;
            }
            _ => return Ok(None),
        }
    }
    // The last extension header allowed may be followed by TCP; anything deeper is not
    // understood and passes.
    if next == IPPROTO_TCP {
        return tcp(start, end, l3, off, Source::V6(saddr));
    }
    Ok(None)
}

#[inline(always)]
fn tcp(
    start: usize,
    end: usize,
    l3: usize,
    off: usize,
    source: Source,
) -> Result<Option<Request>, ()> {
    // Require the whole fixed header (20 bytes): a shorter segment is not a valid SYN.
    let h = bytes_at::<20>(start, end, off)?;
    // ECN bits (CWR, ECE) may be set on a SYN (flags 0xC2): test only the four that matter.
    if h[13] & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) != TCP_SYN {
        return Ok(None);
    }
    Ok(Some(Request {
        dport: be16(h[2], h[3]),
        source,
        l3,
        l4: off,
    }))
}

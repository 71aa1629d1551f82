//! Finds connection requests: TCP segments with SYN set and ACK, RST, FIN clear.
//!
//! Every read goes through [`ptr_at`], which checks the bound the verifier needs, and sees
//! the bytes as one of the header layouts in `hdr.rs`. Any frame this parser does not
//! understand, or that ends early, is `Err` / `None`: the caller lets it pass (fail open).

use core::mem::size_of;

use crate::hdr::{
    EthHdr, Ipv4Hdr, Ipv6ExtHdr, Ipv6FragHdr, Ipv6Hdr, TcpHdr, VlanHdr, ETH_P_8021AD, ETH_P_8021Q,
    ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, MAX_EXT_HEADERS, MAX_VLAN_TAGS, NEXTHDR_AUTH, NEXTHDR_DEST,
    NEXTHDR_FRAGMENT, NEXTHDR_HOP, NEXTHDR_ROUTING,
};

/// Source address of a connection request, network byte order.
pub enum Source {
    V4([u8; 4]),
    V6([u8; 16]),
}

/// A connection request: destination port (host order) and source address.
pub struct Request {
    pub dport: u16,
    pub source: Source,
}

/// Bounds-checked pointer to a `T` at `off` bytes into the packet `[start, end)`: the one
/// check every packet access goes through.
#[inline(always)]
pub fn ptr_at<T>(start: usize, end: usize, off: usize) -> Result<*const T, ()> {
    if start + off + size_of::<T>() > end {
        return Err(());
    }
    Ok((start + off) as *const T)
}

/// The header `T` at `off`, after [`ptr_at`]'s check. One check per header, and fields read
/// at constant offsets from it, keep the verifier's range tracking simple (separate checks
/// per field at a variable offset get split across registers and rejected).
#[inline(always)]
pub fn hdr_at<'a, T>(start: usize, end: usize, off: usize) -> Result<&'a T, ()> {
    // SAFETY: ptr_at checked that the whole T lies inside the packet, which outlives the
    // program run; every header type has alignment 1 and no invalid bit patterns.
    Ok(unsafe { &*ptr_at::<T>(start, end, off)? })
}

/// `Ok(Some(request))` for a connection request, `Ok(None)` for any other frame that was
/// understood (other protocols, other TCP segments, non-first fragments), `Err` for a frame
/// cut short.
#[inline(always)]
pub fn connection_request(start: usize, end: usize) -> Result<Option<Request>, ()> {
    let eth: &EthHdr = hdr_at(start, end, 0)?;
    let mut proto = eth.proto;
    let mut off = size_of::<EthHdr>();
    // An 802.1ad outer tag and/or 802.1Q tag(s).
    for _ in 0..MAX_VLAN_TAGS {
        if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
            let tag: &VlanHdr = hdr_at(start, end, off)?;
            proto = tag.proto;
            off += size_of::<VlanHdr>();
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
    let ip: &Ipv4Hdr = hdr_at(start, end, off)?;
    let ihl = ip.header_len();
    if ip.version() != 4 || ihl < size_of::<Ipv4Hdr>() {
        return Ok(None);
    }
    if ip.frag_offset() != 0 || ip.proto != IPPROTO_TCP {
        return Ok(None);
    }
    // Options, if any, are skipped by the header length.
    tcp(start, end, off + ihl, Source::V4(ip.saddr))
}

#[inline(always)]
fn ipv6(start: usize, end: usize, off: usize) -> Result<Option<Request>, ()> {
    let ip: &Ipv6Hdr = hdr_at(start, end, off)?;
    if ip.version() != 6 {
        return Ok(None);
    }
    let mut next = ip.next_hdr;
    let saddr = ip.saddr;
    let mut off = off + size_of::<Ipv6Hdr>();
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            IPPROTO_TCP => return tcp(start, end, off, Source::V6(saddr)),
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let x: &Ipv6ExtHdr = hdr_at(start, end, off)?;
                next = x.next_hdr;
                off += (usize::from(x.hdr_len) + 1) * 8;
            }
            NEXTHDR_FRAGMENT => {
                let x: &Ipv6FragHdr = hdr_at(start, end, off)?;
                if x.frag_offset() != 0 {
                    return Ok(None);
                }
                next = x.next_hdr;
                off += size_of::<Ipv6FragHdr>();
            }
            NEXTHDR_AUTH => {
                let x: &Ipv6ExtHdr = hdr_at(start, end, off)?;
                next = x.next_hdr;
                off += (usize::from(x.hdr_len) + 2) * 4;
            }
            _ => return Ok(None),
        }
    }
    // The last extension header allowed may be followed by TCP; anything deeper is not
    // understood and passes.
    if next == IPPROTO_TCP {
        return tcp(start, end, off, Source::V6(saddr));
    }
    Ok(None)
}

#[inline(always)]
fn tcp(start: usize, end: usize, off: usize, source: Source) -> Result<Option<Request>, ()> {
    // The whole fixed header is required: a shorter segment is not a valid SYN.
    let tcp: &TcpHdr = hdr_at(start, end, off)?;
    if !tcp.is_request() {
        return Ok(None);
    }
    Ok(Some(Request {
        dport: tcp.dport.get(),
        source,
    }))
}

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

/// IP version of a connection request.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// A connection request: destination port (host order), and where its headers are, for
/// reading its source address and port (allowlist, watch events). The source address is
/// read only when something needs it.
pub struct Request {
    pub dport: u16,
    pub family: Family,
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the TCP header.
    pub l4: usize,
}

impl Request {
    /// A request whose TCP header is at `l4`, its IP header of `family` at `l3`.
    #[inline(always)]
    fn new(dport: u16, family: Family, l3: usize, l4: usize) -> Self {
        Self {
            dport,
            family,
            l3,
            l4,
        }
    }
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
///
/// The frames nearly all traffic consists of (Ethernet, at most one 802.1Q tag, IPv4
/// without options or IPv6 without extension headers, TCP) are judged by a fast path that
/// reads every field at a fixed offset after a single bounds check; anything else, or too
/// short for the fast path, goes to the full parser. Both give the same answer for every
/// frame the fast path takes.
#[inline(always)]
pub fn connection_request(start: usize, end: usize) -> Result<Option<Request>, ()> {
    // One check covers the Ethernet header and everything the fast path reads of an
    // untagged IPv4 frame; a shorter frame is the full parser's.
    if let Ok(f) = hdr_at::<Plain<Ipv4Hdr>>(start, end, 0) {
        let fast = match f.eth.proto {
            ETH_P_IP => plain_v4(&f.ip, &f.tcp, UNTAGGED),
            ETH_P_IPV6 => hdr_at::<Plain<Ipv6Hdr>>(start, end, 0)
                .ok()
                .and_then(|f| plain_v6(&f.ip, &f.tcp, UNTAGGED)),
            ETH_P_8021Q => tagged(start, end),
            ETH_P_8021AD => None,
            // The full parser would find nothing to follow either.
            _ => return Ok(None),
        };
        if let Some(r) = fast {
            return Ok(r);
        }
    }
    full(start, end)
}

/// Offsets of the IP header in an untagged and a singly tagged frame.
const UNTAGGED: usize = size_of::<EthHdr>();
const TAGGED: usize = UNTAGGED + size_of::<VlanHdr>();

/// The fast path's view of an untagged frame: Ethernet, IP without options or extension
/// headers, TCP. (`repr(C)` of alignment-1 headers: no padding, alignment 1.)
#[repr(C)]
struct Plain<Ip> {
    eth: EthHdr,
    ip: Ip,
    tcp: TcpHdr,
}

/// The same behind one 802.1Q tag.
#[repr(C)]
struct Tagged<Ip> {
    eth: EthHdr,
    tag: VlanHdr,
    ip: Ip,
    tcp: TcpHdr,
}

const _: () = {
    assert!(size_of::<Plain<Ipv4Hdr>>() == 54 && size_of::<Plain<Ipv6Hdr>>() == 74);
    assert!(size_of::<Tagged<Ipv4Hdr>>() == 58 && size_of::<Tagged<Ipv6Hdr>>() == 78);
    assert!(core::mem::align_of::<Tagged<Ipv6Hdr>>() == 1);
};

/// The fast path behind one 802.1Q tag.
#[inline(always)]
fn tagged(start: usize, end: usize) -> Option<Option<Request>> {
    let f: &Tagged<Ipv4Hdr> = hdr_at(start, end, 0).ok()?;
    match f.tag.proto {
        ETH_P_IP => plain_v4(&f.ip, &f.tcp, TAGGED),
        ETH_P_IPV6 => {
            let f: &Tagged<Ipv6Hdr> = hdr_at(start, end, 0).ok()?;
            plain_v6(&f.ip, &f.tcp, TAGGED)
        }
        _ => None,
    }
}

/// The fast path for IPv4 at `l3`: `Some(answer)`, or `None` to leave the frame to the full
/// parser.
#[inline(always)]
fn plain_v4(ip: &Ipv4Hdr, tcp: &TcpHdr, l3: usize) -> Option<Option<Request>> {
    if ip.vihl != Ipv4Hdr::VIHL_PLAIN {
        return None; // options (or not IPv4 at all)
    }
    // The flags come before the fragment offset: they end the walk for most packets, and a
    // non-first fragment only needs telling apart when its payload looks like a SYN.
    if ip.proto != IPPROTO_TCP || !tcp.is_request() || ip.frag_offset() != 0 {
        return Some(None);
    }
    Some(Some(Request::new(
        tcp.dport.get(),
        Family::V4,
        l3,
        l3 + size_of::<Ipv4Hdr>(),
    )))
}

/// The fast path for IPv6 at `l3`: `Some(answer)`, or `None` to leave the frame to the full
/// parser.
#[inline(always)]
fn plain_v6(ip: &Ipv6Hdr, tcp: &TcpHdr, l3: usize) -> Option<Option<Request>> {
    // TCP right after the fixed header first: nearly every IPv6 packet is that.
    if ip.next_hdr == IPPROTO_TCP && ip.version() == 6 {
        if !tcp.is_request() {
            return Some(None);
        }
        return Some(Some(Request::new(
            tcp.dport.get(),
            Family::V6,
            l3,
            l3 + size_of::<Ipv6Hdr>(),
        )));
    }
    match ip.next_hdr {
        _ if ip.version() != 6 => Some(None),
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_FRAGMENT | NEXTHDR_AUTH => None,
        // Neither TCP nor a header the full parser walks.
        _ => Some(None),
    }
}

/// The full parser: up to two VLAN tags, IPv4 options, IPv6 extension headers.
#[inline(always)]
fn full(start: usize, end: usize) -> Result<Option<Request>, ()> {
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
    tcp(start, end, off, off + ihl, Family::V4)
}

#[inline(always)]
fn ipv6(start: usize, end: usize, off: usize) -> Result<Option<Request>, ()> {
    let ip: &Ipv6Hdr = hdr_at(start, end, off)?;
    if ip.version() != 6 {
        return Ok(None);
    }
    let mut next = ip.next_hdr;
    let l3 = off;
    let mut off = off + size_of::<Ipv6Hdr>();
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            IPPROTO_TCP => return tcp(start, end, l3, off, Family::V6),
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
        return tcp(start, end, l3, off, Family::V6);
    }
    Ok(None)
}

#[inline(always)]
fn tcp(
    start: usize,
    end: usize,
    l3: usize,
    off: usize,
    family: Family,
) -> Result<Option<Request>, ()> {
    // The whole fixed header is required: a shorter segment is not a valid SYN.
    let tcp: &TcpHdr = hdr_at(start, end, off)?;
    if !tcp.is_request() {
        return Ok(None);
    }
    Ok(Some(Request::new(tcp.dport.get(), family, l3, off)))
}

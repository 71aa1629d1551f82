//! Answering a refused SYN with RST|ACK in the data path (policy `reset`), so the client
//! gets ECONNREFUSED at once instead of retransmitting its SYN for seconds.
//!
//! The frame is turned around in place: MACs, addresses and ports swapped, VLAN tags kept,
//! TCP options and any payload trimmed, then sent back out of the interface it came in on
//! (XDP_TX). Per RFC 9293 (3.10.7.1) the answer to a segment without ACK is
//! `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>`; SEG.LEN counts the SYN and any data.
//! Only plain headers are turned around (IPv4 without options, IPv6 without extension
//! headers); a refused SYN with either is dropped instead.

use core::mem::size_of;

use aya_ebpf::{helpers::bpf_xdp_adjust_tail, programs::XdpContext};

use crate::{
    hdr::{Be16, Be32, EthHdr, Ipv4Hdr, Ipv6Hdr, TcpHdr, IPPROTO_TCP, TCP_ACK, TCP_RST},
    parse::{hdr_at, ptr_at, Family, Request},
};

/// Hop limit of the RSTs sent: the usual Linux default (net.ipv4.ip_default_ttl).
const TTL: u8 = 64;
/// TCP length of the RST: a bare header, no options, no data.
const RST_TCP_LEN: u16 = size_of::<TcpHdr>() as u16;

/// IPv4 pseudo-header of the TCP checksum (RFC 9293 section 3.1).
#[repr(C, packed)]
struct PseudoV4 {
    saddr: [u8; 4],
    daddr: [u8; 4],
    zero: u8,
    proto: u8,
    tcp_len: Be16,
}

/// IPv6 pseudo-header of upper-layer checksums (RFC 8200 section 8.1).
#[repr(C, packed)]
struct PseudoV6 {
    saddr: [u8; 16],
    daddr: [u8; 16],
    tcp_len: Be32,
    zero: [u8; 3],
    next_hdr: u8,
}

/// The bytes of a header value (all header types are packed: no padding bytes).
#[inline(always)]
fn bytes<T>(v: &T) -> &[u8] {
    // SAFETY: T is a packed header struct, fully initialised, without padding.
    unsafe { core::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
}

/// One's-complement sum of big-endian 16-bit words (every header here has an even length).
#[inline(always)]
fn sum16(mut acc: u32, b: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < b.len() {
        acc += u32::from(u16::from_be_bytes([b[i], b[i + 1]]));
        i += 2;
    }
    acc
}

#[inline(always)]
fn fold(mut acc: u32) -> Be16 {
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    Be16::new(!(acc as u16))
}

/// Rewrites the refused SYN into its RST|ACK answer. `Err` leaves a frame that must be
/// dropped (it may be trimmed already).
#[inline(always)]
pub fn xdp(ctx: &XdpContext, req: &Request) -> Result<(), ()> {
    if !req.plain {
        return Err(()); // IPv4 options, IPv6 extension headers, or tags beyond two
    }
    let v6 = req.family == Family::V6;
    let (l3, l4) = (req.l3, req.l4);
    let (start, end) = (ctx.data(), ctx.data_end());
    let syn: &TcpHdr = hdr_at(start, end, l4)?;
    let (sport, dport, seq) = (syn.sport, syn.dport, syn.seq.get());
    // Bytes of payload after the TCP header, from the IP length fields.
    let ip_payload = if v6 {
        let ip: &Ipv6Hdr = hdr_at(start, end, l3)?;
        usize::from(ip.payload_len.get())
    } else {
        let ip: &Ipv4Hdr = hdr_at(start, end, l3)?;
        usize::from(ip.tot_len.get()).saturating_sub(size_of::<Ipv4Hdr>())
    };
    let data_len = ip_payload.saturating_sub(syn.header_len()) as u32;
    let ack = seq.wrapping_add(1).wrapping_add(data_len);

    // Trim to Ethernet (+ tags) + IP + a bare TCP header.
    let new_len = l4 + size_of::<TcpHdr>();
    let cur_len = end - start;
    if cur_len > new_len {
        // SAFETY: shrinking the frame; the context pointer is the program's own.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((cur_len - new_len) as i32)) } != 0 {
            return Err(());
        }
    }
    // adjust_tail invalidates every packet pointer: start over from the context.
    let (start, end) = (ctx.data(), ctx.data_end());

    let eth = ptr_at::<EthHdr>(start, end, 0)? as *mut EthHdr;
    // SAFETY: ptr_at checked the header; the frame is the program's to rewrite.
    unsafe {
        let (dst, src) = ((*eth).dst, (*eth).src);
        (*eth).dst = src;
        (*eth).src = dst;
    }

    let mut tcp = TcpHdr {
        sport: dport,
        dport: sport,
        seq: Be32::new(0),
        ack_seq: Be32::new(ack),
        doff: ((size_of::<TcpHdr>() / 4) as u8) << 4,
        flags: TCP_RST | TCP_ACK,
        window: Be16::new(0),
        check: Be16::new(0),
        urg_ptr: Be16::new(0),
    };
    tcp.check = if v6 {
        let p = ptr_at::<Ipv6Hdr>(start, end, l3)? as *mut Ipv6Hdr;
        // SAFETY: ptr_at checked the IPv6 header.
        let (saddr, daddr) = unsafe { ((*p).daddr, (*p).saddr) };
        let ip = Ipv6Hdr {
            vtc_flow: [0x60, 0, 0, 0], // version 6, traffic class 0, flow label 0
            payload_len: Be16::new(RST_TCP_LEN),
            next_hdr: IPPROTO_TCP,
            hop_limit: TTL,
            saddr,
            daddr,
        };
        // SAFETY: as above.
        unsafe { p.write(ip) };
        let pseudo = PseudoV6 {
            saddr,
            daddr,
            tcp_len: Be32::new(RST_TCP_LEN.into()),
            zero: [0; 3],
            next_hdr: IPPROTO_TCP,
        };
        fold(sum16(sum16(0, bytes(&pseudo)), bytes(&tcp)))
    } else {
        let p = ptr_at::<Ipv4Hdr>(start, end, l3)? as *mut Ipv4Hdr;
        // SAFETY: ptr_at checked the IPv4 header.
        let (saddr, daddr) = unsafe { ((*p).daddr, (*p).saddr) };
        let mut ip = Ipv4Hdr {
            vihl: Ipv4Hdr::VIHL_PLAIN,
            tos: 0,
            tot_len: Be16::new((size_of::<Ipv4Hdr>() as u16) + RST_TCP_LEN),
            id: Be16::new(0),
            frag_off: Be16::new(Ipv4Hdr::DF),
            ttl: TTL,
            proto: IPPROTO_TCP,
            check: Be16::new(0),
            saddr,
            daddr,
        };
        ip.check = fold(sum16(0, bytes(&ip)));
        // SAFETY: as above.
        unsafe { p.write(ip) };
        let pseudo = PseudoV4 {
            saddr,
            daddr,
            zero: 0,
            proto: IPPROTO_TCP,
            tcp_len: Be16::new(RST_TCP_LEN),
        };
        fold(sum16(sum16(0, bytes(&pseudo)), bytes(&tcp)))
    };
    let t = ptr_at::<TcpHdr>(start, end, l4)? as *mut TcpHdr;
    // SAFETY: ptr_at checked the room for the new TCP header.
    unsafe { t.write(tcp) };
    Ok(())
}

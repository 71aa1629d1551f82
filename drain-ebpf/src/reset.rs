//! Answering a refused SYN with RST|ACK in the data path (policy `reset`), so the client
//! gets ECONNREFUSED at once instead of retransmitting its SYN for seconds.
//!
//! The frame is turned around in place: MACs, addresses and ports swapped, VLAN tags kept,
//! TCP options and any payload trimmed, then sent back out of the interface it came in on
//! (XDP_TX). Per RFC 9293 (3.10.7.1) the answer to a segment without ACK is
//! `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>`; SEG.LEN counts the SYN and any data.
//! Only plain headers are turned around (IPv4 without options, IPv6 without extension
//! headers); a refused SYN with either is dropped instead.

use aya_ebpf::{helpers::bpf_xdp_adjust_tail, programs::XdpContext};

use crate::parse::{bytes_at, ptr_at, Request, Source};

const TCP_RST_ACK: u8 = 0x14;
const IPPROTO_TCP: u8 = 6;
const TTL: u8 = 64;
/// Largest L3 offset: Ethernet plus two VLAN tags.
const MAX_L3: usize = 14 + 8;

/// One's-complement sum of big-endian 16-bit words.
#[inline(always)]
fn sum16<const N: usize>(mut acc: u32, b: &[u8; N]) -> u32 {
    let mut i = 0;
    while i + 1 < N {
        acc += u32::from(u16::from_be_bytes([b[i], b[i + 1]]));
        i += 2;
    }
    acc
}

#[inline(always)]
fn fold(mut acc: u32) -> [u8; 2] {
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    (!(acc as u16)).to_be_bytes()
}

/// Rewrites the refused SYN into its RST|ACK answer. `Err` leaves a frame that must be
/// dropped (it may be trimmed already).
#[inline(always)]
pub fn xdp(ctx: &XdpContext, req: &Request) -> Result<(), ()> {
    let v6 = matches!(req.source, Source::V6(_));
    let l3 = req.l3;
    if l3 > MAX_L3 {
        return Err(());
    }
    let l4 = l3 + if v6 { 40 } else { 20 };
    if req.l4 != l4 {
        return Err(()); // IPv4 options or IPv6 extension headers
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    let syn = bytes_at::<20>(start, end, l4)?;
    let doff = usize::from(syn[12] >> 4) * 4;
    let seq = u32::from_be_bytes([syn[4], syn[5], syn[6], syn[7]]);
    let ip = bytes_at::<8>(start, end, l3)?;
    // Bytes of payload after the TCP header, from the IP length fields.
    let ip_payload = if v6 {
        usize::from(u16::from_be_bytes([ip[4], ip[5]]))
    } else {
        usize::from(u16::from_be_bytes([ip[2], ip[3]])).saturating_sub(20)
    };
    let data_len = ip_payload.saturating_sub(doff) as u32;
    let ack = seq.wrapping_add(1).wrapping_add(data_len);

    // Trim to Ethernet (+ tags) + IP + 20 bytes of TCP.
    let new_len = l4 + 20;
    let cur_len = end - start;
    if cur_len > new_len {
        // SAFETY: shrinking the frame; the context pointer is the program's own.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((cur_len - new_len) as i32)) } != 0 {
            return Err(());
        }
    }
    // adjust_tail invalidates every packet pointer: start over from the context.
    let (start, end) = (ctx.data(), ctx.data_end());

    let eth = ptr_at::<[u8; 12]>(start, end, 0)? as *mut [u8; 12];
    // SAFETY: ptr_at checked the 12 bytes (destination and source MAC).
    unsafe {
        let m = *eth;
        let mut out = [0u8; 12];
        out[..6].copy_from_slice(&m[6..]);
        out[6..].copy_from_slice(&m[..6]);
        *eth = out;
    }

    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&syn[2..4]); // source port = the SYN's destination port
    tcp[2..4].copy_from_slice(&syn[0..2]); // destination port = the SYN's source port
                                           // seq 0 (bytes 4..8)
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    tcp[12] = 5 << 4; // data offset: 20 bytes, no options
    tcp[13] = TCP_RST_ACK;
    // window 0, checksum below, urgent pointer 0

    let csum = if v6 {
        let p = ptr_at::<[u8; 40]>(start, end, l3)? as *mut [u8; 40];
        // SAFETY: ptr_at checked the 40-byte IPv6 header.
        let old = unsafe { *p };
        let mut h = [0u8; 40];
        h[0] = 0x60; // version 6, traffic class 0, flow label 0
        h[4..6].copy_from_slice(&20u16.to_be_bytes()); // payload length
        h[6] = IPPROTO_TCP;
        h[7] = TTL; // hop limit
        h[8..24].copy_from_slice(&old[24..40]);
        h[24..40].copy_from_slice(&old[8..24]);
        // SAFETY: as above.
        unsafe { *p = h };
        // Pseudo-header: source, destination, upper-layer length (32 bits), next header.
        let mut pseudo = [0u8; 40];
        pseudo[..32].copy_from_slice(&h[8..40]);
        pseudo[34..36].copy_from_slice(&20u16.to_be_bytes());
        pseudo[39] = IPPROTO_TCP;
        fold(sum16(sum16(0, &pseudo), &tcp))
    } else {
        let p = ptr_at::<[u8; 20]>(start, end, l3)? as *mut [u8; 20];
        // SAFETY: ptr_at checked the 20-byte IPv4 header.
        let old = unsafe { *p };
        let mut h = [0u8; 20];
        h[0] = 0x45; // version 4, IHL 5
        h[2..4].copy_from_slice(&40u16.to_be_bytes()); // total length
        h[6] = 0x40; // don't fragment
        h[8] = TTL;
        h[9] = IPPROTO_TCP;
        h[12..16].copy_from_slice(&old[16..20]);
        h[16..20].copy_from_slice(&old[12..16]);
        let c = fold(sum16(0, &h));
        h[10] = c[0];
        h[11] = c[1];
        // SAFETY: as above.
        unsafe { *p = h };
        // Pseudo-header: source, destination, zero, protocol, TCP length.
        let mut pseudo = [0u8; 12];
        pseudo[..8].copy_from_slice(&h[12..20]);
        pseudo[9] = IPPROTO_TCP;
        pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
        fold(sum16(sum16(0, &pseudo), &tcp))
    };
    tcp[16] = csum[0];
    tcp[17] = csum[1];
    let t = ptr_at::<[u8; 20]>(start, end, l4)? as *mut [u8; 20];
    // SAFETY: ptr_at checked the 20 bytes of the new TCP header.
    unsafe { *t = tcp };
    Ok(())
}

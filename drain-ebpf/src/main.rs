//! drain's kernel programs: the gate that refuses new TCP connections on chosen ports.
//!
//! - `hdr.rs`: header layouts and wire constants (EtherTypes, protocol numbers, TCP flags)
//!   and the parser's limits.
//! - `parse.rs`: the packet parser (Ethernet, 802.1Q/QinQ, IPv4 with options, IPv6 with
//!   extension headers, TCP) that finds connection requests.
//! - `gate.rs`: the verdict (gated port? gate on? deadline? allowlisted source?) and its maps.
//! - `refuse.rs`: policy reset past the first line: the namespace-wide refusal (sk_lookup)
//!   that makes the kernel's TCP answer a refused SYN with its RST, and the count of those RSTs
//!   (tp_btf/tcp_send_reset).
//! - `track.rs`: the connection tracker (live connections per local port).
//! - `watch.rs`: rate-limited events for `drain-user watch` (refused SYNs, closes).
//! - `ratelimit.rs`: the per-CPU GCRA limiter of RSTs and events.
//! - this file: the two thin gate entry points, XDP and TC, mapping the verdict to return codes.
//!   Under policy reset they are the first line: they pass the refused SYNs the RST budget
//!   allows on to the stack (where refuse.rs refuses them) and drop the rest.
//!
//! Fail open: any packet the parser cannot read to the end of the TCP flags passes.
#![no_std]
#![no_main]
// atomic_xadd: the BPF target lacks CAS, so core's atomics offer no fetch_add (track.rs).
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "core_intrinsics, for atomic add on BPF")]

mod gate;
mod hdr;
mod parse;
mod ratelimit;
mod refuse;
mod track;
mod watch;

use aya_ebpf::{
    bindings::{tcx_action_base::TCX_NEXT, xdp_action, TC_ACT_SHOT},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

use crate::gate::Verdict;

/// XDP gate. Runs in the driver (native) or, where the driver has no XDP support such as
/// `lo`, in generic mode; either way before the stack and netfilter see the packet.
#[xdp]
pub fn drain_xdp(ctx: XdpContext) -> u32 {
    match gate::verdict(ctx.data(), ctx.data_end()) {
        // Reset: on to the stack, whose TCP answers it with a RST (refuse.rs).
        Verdict::Pass | Verdict::Truncated | Verdict::Reset => xdp_action::XDP_PASS,
        Verdict::Refuse => xdp_action::XDP_DROP,
    }
}

/// TC ingress gate (TCX on kernels >= 6.6, clsact before). Returns TCX_NEXT (-1, the same
/// value as TC_ACT_UNSPEC) for packets it lets go, so programs after it in the chain still
/// run; TC_ACT_OK would end the chain.
#[classifier]
pub fn drain_tc(ctx: TcContext) -> i32 {
    let verdict = match gate::verdict(ctx.data(), ctx.data_end()) {
        // Headers of a SYN are nearly always in the linear part of the skb; when the parser
        // ran out of linear bytes before the TCP flags and the skb holds more, pull them in
        // and judge again (a failed pull leaves data as is, and the frame passes). Any other
        // verdict only read bytes that were already linear, so pulling first would not
        // change it.
        Verdict::Truncated => {
            let want = core::cmp::min(ctx.len(), hdr::MAX_HEADERS);
            if ((ctx.data_end() - ctx.data()) as u32) < want && ctx.pull_data(want).is_ok() {
                gate::verdict(ctx.data(), ctx.data_end())
            } else {
                Verdict::Pass
            }
        }
        v => v,
    };
    match verdict {
        Verdict::Pass | Verdict::Truncated | Verdict::Reset => TCX_NEXT,
        Verdict::Refuse => TC_ACT_SHOT,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this: there is no panic at run time.
    loop {}
}

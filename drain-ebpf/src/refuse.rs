//! Policy reset, past the first line: the namespace-wide refusal and the count of the RSTs
//! the kernel sends for it.
//!
//! - `drain_lookup` (`BPF_PROG_TYPE_SK_LOOKUP`, attached to the gate's network namespace)
//!   runs when TCP looks for a listener for a segment no established or request socket
//!   took: a SYN, or a segment without a socket (a SYN-cookie ACK, a stray ACK). For a
//!   gated port, while the gate is on and its TTL has not run out, from a source not on
//!   the allowlist, under policy reset, it returns `SK_DROP`: the lookup fails, and TCP
//!   answers the segment with its own RST (`tcp_v4_send_reset` / `tcp_v6_send_reset`),
//!   whatever interface it came in on and whatever its header layout. The XDP/TC gate in
//!   front lets only the refused SYNs the RST budget allows get this far.
//! - The RST counter counts the RSTs that follow such a refusal. The lookup notes the
//!   refused 4-tuple in a per-CPU slot; the RST for it is sent on the same CPU further down
//!   the same receive call (`tcp_v4_rcv` → `no_tcp_socket` → `tcp_v4_send_reset`), so the
//!   counter takes the note back only when the segment it answers has that tuple. Where it
//!   runs depends on the kernel (user space picks, gate.rs): `drain_rst`
//!   (`tp_btf/tcp_send_reset`) where the tracepoint fires for socketless RSTs too (the
//!   kernels whose BTF has `enum sk_rst_reason`, 6.10 on); before that the tracepoint's
//!   event class read the socket, so `tcp_v4_send_reset` fired it only for a RST sent on a
//!   socket's behalf and never for the RST of a refused lookup (6.1 and 5.10 counted 0).
//!   There `drain_rst4` and `drain_rst6` count at the entry of `tcp_v4_send_reset` and
//!   `tcp_v6_send_reset` (fentry; both functions are in 5.10's and 6.1's BTF). Not fentry
//!   everywhere: kernels without ftrace trampolines refuse fentry programs. A
//!   refusal the kernel does not answer with a RST (a SYN that met a TIME_WAIT socket gets
//!   an ACK) is therefore not counted as one, and RSTs of other namespaces, which fire the
//!   same tracepoint, never match.
//!
//! Counters (drain-common `PortStats`): under policy reset a refused SYN is counted when its
//! fate is known: `rst_limited` where the first line drops it, `rst_sent` (and
//! `syns_refused`) here when the kernel answers it; RSTs answering other segments are
//! `rst_not_syn`.

use aya_ebpf::{
    bindings::{bpf_sk_lookup, sk_action},
    helpers::{bpf_ktime_get_boot_ns, bpf_probe_read_kernel},
    macros::{btf_tracepoint, fentry, map, sk_lookup},
    maps::{lpm_trie::Key, Array, PerCpuArray},
    programs::{BtfTracePointContext, FEntryContext, SkLookupContext},
};
use drain_common::{ResetTraceConfig, ALLOW_V4, ALLOW_V6, GATE_ON, POLICY_RESET};

use crate::{
    gate::{ALLOW4, ALLOW6, CONFIG, PORTS, STATS},
    hdr::{TcpHdr, IPPROTO_TCP},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// A lookup `drain_lookup` refused, as the segment that caused it carries it. `port` 0 =
/// nothing pending.
#[repr(C)]
#[derive(Clone, Copy)]
struct Refused {
    /// Local port, host order.
    port: u16,
    /// Remote port as it sits in the TCP header (network order).
    rport: u16,
    family: u32,
    /// Remote address, network order (IPv4 in the first four bytes).
    addr: [u8; 16],
}

/// PerCpuArray[1] of Refused: the last lookup refused on this CPU, until its RST is seen.
/// Written by both programs here only.
#[map(name = "DRAIN_REFUSED")]
static REFUSED: PerCpuArray<Refused> = PerCpuArray::pinned(1, 0);

/// Array[1] of ResetTraceConfig: the sk_buff offsets `drain_rst` reads, from the kernel's
/// BTF. Written by user space before the tracepoint attaches.
#[map(name = "DRAIN_RSTCFG")]
static RSTCFG: Array<ResetTraceConfig> = Array::pinned(1, 0);

#[sk_lookup]
pub fn drain_lookup(ctx: SkLookupContext) -> u32 {
    if refuse(ctx.lookup) {
        sk_action::SK_DROP
    } else {
        sk_action::SK_PASS
    }
}

/// One context field, read with a load of exactly its size (the verifier checks the size
/// of every context access; a compiler that merged two loads would be rejected).
macro_rules! field {
    ($ctx:expr, $f:ident) => {
        // SAFETY: the kernel passes a valid bpf_sk_lookup context for the program's run.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$ctx).$f)) }
    };
}

/// The verdict of the namespace-wide refusal: true = refuse (SK_DROP). Any doubt passes.
#[inline(always)]
fn refuse(ctx: *mut bpf_sk_lookup) -> bool {
    if field!(ctx, protocol) != u32::from(IPPROTO_TCP) {
        return false;
    }
    let port = field!(ctx, local_port) as u16;
    match PORTS.get(u32::from(port)) {
        Some(&slot) if slot != 0 => {}
        _ => return false,
    }
    let Some(cfg) = CONFIG.get(0) else {
        return false;
    };
    if cfg.enabled != GATE_ON || cfg.policy != POLICY_RESET {
        return false;
    }
    // SAFETY: a helper without preconditions.
    if cfg.deadline_ns != 0 && unsafe { bpf_ktime_get_boot_ns() } >= cfg.deadline_ns {
        return false;
    }
    let family = field!(ctx, family);
    let mut addr = [0u8; 16];
    let allowed = match family {
        AF_INET => {
            let a = field!(ctx, remote_ip4).to_ne_bytes();
            addr[..4].copy_from_slice(&a);
            cfg.allow & ALLOW_V4 != 0 && ALLOW4.get(Key::new(32, a)).is_some()
        }
        AF_INET6 => {
            // SAFETY: as in field!; four loads of one u32 each.
            let words = unsafe { core::ptr::addr_of!((*ctx).remote_ip6) } as *const u32;
            for i in 0..4 {
                // SAFETY: i < 4, inside remote_ip6.
                let w = unsafe { core::ptr::read_volatile(words.add(i)) }.to_ne_bytes();
                addr[4 * i..4 * i + 4].copy_from_slice(&w);
            }
            cfg.allow & ALLOW_V6 != 0 && ALLOW6.get(Key::new(128, addr)).is_some()
        }
        _ => return false,
    };
    if allowed {
        return false;
    }
    let rport = field!(ctx, remote_port);
    if let Some(r) = REFUSED.get_ptr_mut(0) {
        // SAFETY: per-CPU value, only this CPU touches it while this program runs.
        unsafe {
            *r = Refused {
                port,
                rport,
                family,
                addr,
            }
        };
    }
    true
}

#[btf_tracepoint(function = "tcp_send_reset")]
pub fn drain_rst(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(const struct sock *sk, const struct sk_buff *skb, enum sk_rst_reason reason):
    // skb is the segment being answered. Counting only: a failed read changes nothing.
    let _ = count(ctx.arg(1));
    0
}

// tcp_v4_send_reset(const struct sock *sk, struct sk_buff *skb) and its IPv6 twin: skb is
// the segment being answered. Entered, they send the RST unless the segment is itself a
// RST or was not addressed to this host, neither of which a refused SYN is.
#[fentry(function = "tcp_v4_send_reset")]
pub fn drain_rst4(ctx: FEntryContext) -> i32 {
    // Counting only: a failed read leaves the counters as they are.
    let _ = count(ctx.arg(1));
    0
}

#[fentry(function = "tcp_v6_send_reset")]
pub fn drain_rst6(ctx: FEntryContext) -> i32 {
    let _ = count(ctx.arg(1));
    0
}

/// Reads a `T` from kernel memory at `p + off`.
#[inline(always)]
fn kread<T>(p: *const u8, off: u32) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel checks the address and fails cleanly.
    unsafe { bpf_probe_read_kernel(p.add(off as usize) as *const T) }.map_err(|e| e as i64)
}

#[inline(always)]
fn count(skb: *const u8) -> Result<(), i64> {
    // Nothing refused on this CPU: not ours (every other RST on the host ends here).
    let Some(pending) = REFUSED.get_ptr_mut(0) else {
        return Ok(());
    };
    // SAFETY: per-CPU value, only this CPU touches it while this program runs.
    let pending = unsafe { &mut *pending };
    if pending.port == 0 {
        return Ok(());
    }
    let Some(cfg) = RSTCFG.get(0) else {
        return Ok(());
    };
    if skb.is_null() {
        return Ok(());
    }
    let head: *const u8 = kread(skb, cfg.off_head)?;
    let th: u16 = kread(skb, cfg.off_transport)?;
    let nh: u16 = kread(skb, cfg.off_network)?;
    let tcp: TcpHdr = kread(head, u32::from(th))?;
    if tcp.dport.get() != pending.port || tcp.sport.get().to_be() != pending.rport {
        return Ok(());
    }
    let mut addr = [0u8; 16];
    match pending.family {
        // iphdr.saddr at 12, ipv6hdr.saddr at 8.
        AF_INET => addr[..4].copy_from_slice(&kread::<[u8; 4]>(head, u32::from(nh) + 12)?),
        _ => addr = kread::<[u8; 16]>(head, u32::from(nh) + 8)?,
    }
    if addr != pending.addr {
        return Ok(());
    }
    pending.port = 0;
    let slot = match PORTS.get(u32::from(tcp.dport.get())) {
        Some(&slot) if slot != 0 => slot,
        _ => return Ok(()),
    };
    if let Some(s) = STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU touches it while this program runs.
        let s = unsafe { &mut *s };
        if tcp.is_request() {
            s.syns_refused += 1;
            s.rst_sent += 1;
        } else {
            s.rst_not_syn += 1;
        }
    }
    Ok(())
}

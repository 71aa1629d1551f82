//! The connection tracker: exact live-connection counts per local port, kept by the kernel.
//!
//! tp_btf/inet_sock_set_state sees every TCP state change, of sockets that existed before
//! it was loaded too. Set semantics keep the counts from drifting: a connection is in the
//! live set (SOCKS, keyed by its namespace and 4-tuple, [`ConnKey`]) or not; a port's count (LIVE) moves only when an
//! insert (BPF_NOEXIST) or a delete on that set succeeded, so a duplicate or missed event
//! cannot double-count, and the count can never go below the set's true size. User space
//! seeds the connections that predate the tracker with the same rule.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{bpf_ktime_get_boot_ns, bpf_probe_read_kernel},
    macros::{btf_tracepoint, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::BtfTracePointContext,
};
use drain_common::{
    is_live, v4_mapped, ConnKey, FollowKey, TrackConfig, TrackStats, MAX_FOLLOWED,
    MAX_TRACKED_SOCKS, TCP_ESTABLISHED, TCP_SYN_RECV, WAKE_BYTES,
};

/// Array[1] of TrackConfig; written by user space before attaching.
#[map(name = "DRAIN_TRACKCFG")]
static TRACK: Array<TrackConfig> = Array::pinned(1, 0);

/// Live passive connections: (namespace, 4-tuple) -> local port.
#[map(name = "DRAIN_CONNS")]
static SOCKS: HashMap<ConnKey, u32> = HashMap::pinned(MAX_TRACKED_SOCKS, BPF_F_NO_PREALLOC);

/// Live connections per local port; mmapped by user space, which adds seeds atomically.
#[map(name = "DRAIN_LIVE")]
static LIVE: Array<i64> = Array::pinned(65536, BPF_F_MMAPABLE);

/// Servers in other namespaces whose passive opens count under a gated port (a published
/// port's DNAT target): (netns inode, local port) -> gated port. Written by user space.
#[map(name = "DRAIN_FOLLOW")]
static FOLLOW: HashMap<FollowKey, u32> = HashMap::pinned(MAX_FOLLOWED, 0);

/// Per local port: until when (boot-time ns) a `wait` wants to be woken when its count
/// changes. Raised and renewed by `wait` through mmap.
#[map(name = "DRAIN_WAITERS")]
static WAITERS: Array<u64> = Array::pinned(65536, BPF_F_MMAPABLE);

/// The ports whose count changed while a `wait` wanted them: what wakes `wait`.
#[map(name = "DRAIN_WAKE")]
static WAKE: RingBuf = RingBuf::pinned(WAKE_BYTES, 0);

/// Tracker counters.
#[map(name = "DRAIN_TSTATS")]
static TSTATS: PerCpuArray<TrackStats> = PerCpuArray::pinned(1, 0);

const EEXIST: i32 = 17;
const AF_INET: u16 = 2;

/// Reads a `T` from kernel memory at `p + off`.
#[inline(always)]
fn kread<T>(p: *const u8, off: u32) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel checks the address and fails cleanly.
    unsafe { bpf_probe_read_kernel(p.add(off as usize) as *const T) }.map_err(|e| e as i64)
}

/// The connection `sk` is, from the socket's own fields (offsets from the kernel's BTF).
/// An IPv4 socket's addresses are given as IPv4-mapped IPv6, as a dual-stack socket's are.
#[inline(always)]
fn conn_key(sk: *const u8, cfg: &TrackConfig, netns: u32) -> Result<ConnKey, i64> {
    let family: u16 = kread(sk, cfg.off_family)?;
    let (laddr, raddr) = if family == AF_INET {
        (
            v4_mapped(kread(sk, cfg.off_saddr)?),
            v4_mapped(kread(sk, cfg.off_daddr)?),
        )
    } else {
        (kread(sk, cfg.off_v6_saddr)?, kread(sk, cfg.off_v6_daddr)?)
    };
    Ok(ConnKey {
        netns,
        lport: u16::from_be(kread(sk, cfg.off_sport)?),
        rport: u16::from_be(kread(sk, cfg.off_dport)?),
        laddr,
        raddr,
    })
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn drain_track(ctx: BtfTracePointContext) -> i32 {
    // Nothing to fail open here: an error leaves the counts untouched and is counted.
    if try_track(&ctx).is_err() {
        if let Some(s) = TSTATS.get_ptr_mut(0) {
            // SAFETY: per-CPU value, only this CPU touches it now.
            unsafe { (*s).read_failed += 1 };
        }
    }
    0
}

#[inline(always)]
fn add(port: u32, delta: i64) {
    if let Some(p) = LIVE.get_ptr_mut(port) {
        // SAFETY: a valid, 8-byte aligned map value. Atomic because other CPUs and user
        // space (through mmap) add to the same counter. The BPF target has no CAS, so
        // AtomicI64::fetch_add does not exist there; this intrinsic lowers to BPF's atomic
        // add (lock xadd), which the verifier accepts on map values.
        unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(p, delta) };
        wake(port);
    }
}

/// Wakes the `wait`s that want `port` (called after its count changed). While nobody
/// waits this is one array load. `wait` raises its lease before it reads the counts, and
/// the count changes before this reads the lease, so a change is either in what `wait`
/// reads or wakes it (both sides use full-barrier atomics; `wait` also polls slowly).
/// Flags 0: the kernel wakes the reader only when it had read everything before this
/// record (adaptive wake-up); a burst of closes costs one wake-up.
#[inline(always)]
fn wake(port: u32) {
    let Some(&until) = WAITERS.get(port) else {
        return;
    };
    // SAFETY: a helper without preconditions.
    if until != 0 && unsafe { bpf_ktime_get_boot_ns() } < until {
        // A full ring means the reader has not caught up: it will see the counts anyway.
        let _ = WAKE.output::<u32>(port, 0);
    }
}

#[inline(always)]
fn bump(f: impl FnOnce(&mut TrackStats)) {
    if let Some(s) = TSTATS.get_ptr_mut(0) {
        // SAFETY: per-CPU value, only this CPU touches it now.
        f(unsafe { &mut *s });
    }
}

fn try_track(ctx: &BtfTracePointContext) -> Result<(), i64> {
    // TP_PROTO(const struct sock *sk, const int oldstate, const int newstate)
    let sk: *const u8 = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    // Only passive opens enter: a child socket goes SYN_RECV -> ESTABLISHED. An outbound
    // connection (SYN_SENT -> ESTABLISHED) never does, even when its ephemeral port equals
    // a gated port.
    let entering = old == TCP_SYN_RECV && new == TCP_ESTABLISHED;
    let leaving = is_live(old) && !is_live(new);
    if !entering && !leaving {
        return Ok(());
    }
    let Some(cfg) = TRACK.get(0) else {
        return Ok(());
    };
    if cfg.netns_inum == 0 {
        return Ok(());
    }
    // The tracepoint fires for every namespace: count the one this gate serves, and the
    // servers it follows elsewhere (FOLLOW), once it follows any.
    let net: *const u8 = kread(sk, cfg.off_net)?;
    let inum: u32 = kread(net, cfg.off_inum)?;
    let own = inum == cfg.netns_inum;
    if !own && cfg.follow == 0 {
        return Ok(());
    }
    // The 4-tuple is complete by ESTABLISHED (a child socket's remote port may not be
    // filled in at SYN_RECV, hence entering at SYN_RECV -> ESTABLISHED only), and it does
    // not change while the socket is live. With the namespace's inode in it, the key is
    // unique across namespaces too.
    let key = conn_key(sk, cfg, inum)?;
    if entering {
        // Elsewhere only a followed server's opens count, under the gated port that leads
        // there. (Leaving needs no such check: the set holds only what was counted.)
        let port = if own {
            u32::from(key.lport)
        } else {
            let follow = FollowKey {
                netns_inum: inum,
                port: u32::from(key.lport),
            };
            // SAFETY: the value is copied out at once.
            match unsafe { FOLLOW.get(follow) } {
                Some(&gated) => gated,
                None => return Ok(()),
            }
        };
        match SOCKS.insert(key, port, BPF_NOEXIST as u64) {
            Ok(()) => {
                add(port, 1);
                bump(|s| s.added += 1);
            }
            Err(e) if e == -EEXIST => {}
            Err(_) => bump(|s| s.insert_failed += 1),
        }
    } else {
        // SAFETY: the value is copied out before the delete below.
        let Some(&port) = (unsafe { SOCKS.get(key) }) else {
            return Ok(());
        };
        if SOCKS.remove(key).is_ok() {
            add(port, -1);
            bump(|s| s.removed += 1);
            crate::watch::left(&key, port, LIVE.get(port).copied().unwrap_or(0));
        }
    }
    Ok(())
}

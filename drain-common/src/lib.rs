//! Types and names shared by the kernel programs (drain-ebpf) and the CLI (drain-user).
//!
//! Everything here is `#[repr(C)]` with explicit padding, so both sides agree on the
//! layout byte for byte; the `user` feature adds the aya `Pod` impls (and bytemuck's,
//! which refuse to compile if a padding byte is left implicit), the sums of the per-CPU
//! counters and their serde serialization.
#![no_std]

/// Program names, as they appear in the ELF object and in `bpftool prog`.
pub mod prog {
    /// XDP gate.
    pub const XDP: &str = "drain_xdp";
    /// TC (TCX on kernel >= 6.6) gate: same verdicts as the XDP one.
    pub const TC: &str = "drain_tc";
    /// tp_btf/inet_sock_set_state: keeps the live-connection counts.
    pub const TRACK: &str = "drain_track";
    /// sk_lookup, attached to the gate's network namespace: policy reset's refusal.
    pub const LOOKUP: &str = "drain_lookup";
    /// tp_btf/tcp_send_reset: counts the RSTs the kernel sends for those refusals (kernels
    /// whose tracepoint fires for socketless RSTs, 6.10 on).
    pub const RST: &str = "drain_rst";
    /// fentry/tcp_v4_send_reset: the same count on older kernels...
    pub const RST4: &str = "drain_rst4";
    /// ...and fentry/tcp_v6_send_reset, its IPv6 half.
    pub const RST6: &str = "drain_rst6";
}

/// Map names (at most 15 bytes: BPF_OBJ_NAME_LEN - 1). User code only uses these constants;
/// a test loads the object and checks that each one resolves.
pub mod map {
    /// Array[1] of [`GateConfig`](crate::GateConfig). Written by `gate on/off`, read per SYN.
    pub const CONFIG: &str = "DRAIN_CONFIG";
    /// Array[65536] of u32 indexed by local TCP port (host order): 0 = not gated,
    /// otherwise the 1-based slot of the port in [`STATS`]. Written by `gate on`.
    pub const PORTS: &str = "DRAIN_PORTS";
    /// PerCpuArray[MAX_GATED_PORTS + 1] of [`PortStats`](crate::PortStats), indexed by slot.
    /// Written by the gate programs, summed over CPUs by `status`.
    pub const STATS: &str = "DRAIN_STATS";
    /// LPM trie, key 4 address bytes (network order), value u8: IPv4 sources whose SYNs pass
    /// while the gate is on. Written by `gate on --allow`.
    pub const ALLOW4: &str = "DRAIN_ALLOW4";
    /// LPM trie, key 16 address bytes (network order), value u8: same for IPv6 sources.
    pub const ALLOW6: &str = "DRAIN_ALLOW6";

    /// Array[1] of [`TrackConfig`](crate::TrackConfig): the namespace to count in and the
    /// kernel struct offsets read from BTF. Written by user space before the tracker attaches.
    /// (DRAIN_TRACK held a smaller config; the new name keeps a `gate on` from reusing it.)
    pub const TRACK: &str = "DRAIN_TRACKCFG";
    /// Hash [`ConnKey`](crate::ConnKey) -> u32 local port: the set of live passive
    /// connections. Inserted (BPF_NOEXIST) by the tracker on SYN_RECV -> ESTABLISHED and by
    /// user space when seeding; deleted by whoever sees the connection leave the live
    /// states. (DRAIN_SOCKS was keyed by socket cookie, which 5.10's tracing programs
    /// cannot read; the new name keeps a `gate on` from reusing such a pin.)
    pub const SOCKS: &str = "DRAIN_CONNS";
    /// Array[65536] of i64 by local port, BPF_F_MMAPABLE: live connections per port. Changed
    /// with atomic adds only, and only by whoever won the SOCKS insert/delete, by the tracker
    /// and by user space (through mmap) alike.
    pub const LIVE: &str = "DRAIN_LIVE";
    /// PerCpuArray[1] of [`TrackStats`](crate::TrackStats), written by the tracker.
    pub const TSTATS: &str = "DRAIN_TSTATS";
    /// Hash [`FollowKey`](crate::FollowKey) (another namespace's inode, a local port) ->
    /// u32 gated port: the servers a gated port's connections are forwarded to (a published
    /// port's DNAT into a container), whose passive opens the tracker counts under the gated
    /// port. Written by user space when it finds where a gated port's connections end.
    pub const FOLLOW: &str = "DRAIN_FOLLOW";
    /// PerCpuArray[1] of [`CpuClock`](crate::CpuClock): the RST rate limiter's next allowed
    /// time (GCRA) and the gate's last clock reading, per CPU. Written by the gate programs
    /// only. (Its value was a bare u64 under the name DRAIN_RST_RL; the new name keeps a
    /// `gate on` from reusing such a pin, whose values are too small for this program.)
    pub const RST_RL: &str = "DRAIN_RST_CLOCK";
    /// PerCpuArray[1]: the last lookup the sk_lookup program refused on this CPU, until the
    /// RST counter sees its RST. Kernel-only state.
    pub const REFUSED: &str = "DRAIN_REFUSED";
    /// Array[1] of [`ResetTraceConfig`](crate::ResetTraceConfig): sk_buff offsets for the
    /// RST counter (fentry on tcp_v4/v6_send_reset). Written by user space before it attaches.
    pub const RSTCFG: &str = "DRAIN_RSTCFG";

    /// Array[1] of [`WatchConfig`](crate::WatchConfig): whether someone watches (until
    /// when) and the events' rate limit. Written by `drain-user watch`, read by the gate
    /// programs and the tracker before they emit an event.
    pub const WATCH: &str = "DRAIN_WATCH";
    /// PerCpuArray[1] of [`WatchCpu`](crate::WatchCpu): the events' rate limiter and what it
    /// held back. Written by the gate programs and the tracker, summed by `watch`.
    pub const WATCH_RL: &str = "DRAIN_WATCH_RL";
    /// Ring buffer of [`WatchEvent`](crate::WatchEvent)s, written while someone watches,
    /// read by `drain-user watch`.
    pub const EVENTS: &str = "DRAIN_EVENTS";

    /// Array[65536] of u64 by local port, BPF_F_MMAPABLE: until when (CLOCK_BOOTTIME ns) a
    /// `wait` wants to be woken when the port's live count changes. Raised by `wait` with
    /// an atomic max through mmap and renewed while it waits, so a `wait` that died stops
    /// costing within [`WAKE_LEASE_NS`](crate::WAKE_LEASE_NS). Read by the tracker.
    pub const WAITERS: &str = "DRAIN_WAITERS";
    /// Ring buffer of u32 local ports whose live count changed while a `wait` wanted it:
    /// what wakes `wait` (its records only say "look again"). Written by the tracker, read
    /// and emptied by `wait`. Not the `watch` ring: a ring buffer has one consumer position,
    /// and `watch` and `wait` would take each other's records.
    pub const WAKE: &str = "DRAIN_WAKE";

    /// Every map the object defines, for the test that checks each resolves.
    pub const ALL: &[&str] = &[
        CONFIG, PORTS, STATS, ALLOW4, ALLOW6, TRACK, SOCKS, LIVE, TSTATS, FOLLOW, RST_RL, REFUSED,
        RSTCFG, WATCH, WATCH_RL, EVENTS, WAITERS, WAKE,
    ];
}

/// Bytes of the wake ring ([`map::WAKE`]): one page, 256 records; `wait` empties it each
/// time it is woken, so it only fills while nobody reads it (and a full ring costs the
/// tracker a failed reserve).
pub const WAKE_BYTES: u32 = 4096;
/// How long one renewal of a `wait`'s interest in a port lasts ([`map::WAITERS`]).
pub const WAKE_LEASE_NS: u64 = 2_000_000_000;

/// How many distinct ports one gate can hold (slots 1..=MAX_GATED_PORTS in the stats map).
pub const MAX_GATED_PORTS: u32 = 64;
/// Entries in each allowlist trie.
pub const MAX_ALLOW_PREFIXES: u32 = 1024;

/// `GateConfig::enabled` values.
pub const GATE_OFF: u32 = 0;
pub const GATE_ON: u32 = 1;

/// `GateConfig::policy` values: how a refused SYN is answered.
/// Drop it: the client retransmits (1, 2, 3... s) and eventually times out.
pub const POLICY_DROP: u32 = 0;
/// Answer it with a RST, rate-limited: the client gets ECONNREFUSED at once. The XDP/TC
/// gate passes the SYNs the budget allows on to the stack, where the sk_lookup program
/// refuses the listener lookup and the kernel's TCP sends the RST.
pub const POLICY_RESET: u32 = 1;

/// The one global switch of a gate. One map write turns a gate on or off.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct GateConfig {
    /// [`GATE_ON`] or [`GATE_OFF`].
    pub enabled: u32,
    /// [`POLICY_DROP`] or [`POLICY_RESET`].
    pub policy: u32,
    /// CLOCK_BOOTTIME (`bpf_ktime_get_boot_ns`) deadline in ns after which the programs stop
    /// refusing by themselves; 0 = no deadline.
    pub deadline_ns: u64,
    /// The TTL the deadline was set from, so `wait` can renew it; the kernel ignores it.
    pub ttl_ns: u64,
    /// [`POLICY_RESET`]: each CPU sends at most one RST per `rst_interval_ns` on average...
    pub rst_interval_ns: u64,
    /// ...with bursts of up to this many; beyond that refusals are dropped and counted.
    pub rst_burst: u64,
    /// [`ALLOW_V4`] | [`ALLOW_V6`]: which allowlist has entries, so a refused SYN costs no
    /// trie lookup when there is none (an empty LPM lookup still costs ~25 ns).
    pub allow: u32,
    /// [`FLAG_MAINT`]: read by `drain-user agent` only; the kernel ignores it.
    pub flags: u32,
    /// `gate on --announce`: CLOCK_BOOTTIME ns until which the programs still let SYNs pass
    /// although the gate is on (the agent already tells the balancer to drain); 0 = refuse
    /// at once. Compared like `deadline_ns`, so it needs no process alive to end.
    pub announce_ns: u64,
    /// `gate on --quiet`: how long no new connection request may reach the gated ports
    /// before `drain-user wait` ends the announcement early; the kernel ignores it.
    pub quiet_ns: u64,
}
const _: () = assert!(core::mem::size_of::<GateConfig>() == 64);

/// `GateConfig::flags`: the operator asked for maintenance (`gate on --maint`), so the agent
/// answers `maint` rather than `drain`.
pub const FLAG_MAINT: u32 = 1;
/// `GateConfig::flags` bits 8 to 31: the RST rate `gate on --rst-rate` was given (RSTs per
/// second, at most 10,000,000 < 2^24), kept so `status` can report the setting exactly (the
/// kernel uses `rst_interval_ns` and `rst_burst`, derived from it and the number of CPUs,
/// and ignores this). 0 in a gate made before it was kept.
pub const RST_RATE_SHIFT: u32 = 8;

/// `GateConfig::allow` bits.
pub const ALLOW_V4: u32 = 1;
pub const ALLOW_V6: u32 = 2;

/// Entries in the live-connection set (BPF_F_NO_PREALLOC: memory follows use).
pub const MAX_TRACKED_SOCKS: u32 = 1 << 20;

/// `Sum` over the per-CPU copies of a counter struct: every counter added up, fields that
/// are not counters (`keep`) taken from the copies, which all hold the same value.
#[cfg(feature = "user")]
macro_rules! per_cpu_sum {
    ($ty:ident { keep: [$($keep:ident),*], sum: [$($field:ident),+] }) => {
        impl<'a> core::iter::Sum<&'a $ty> for $ty {
            fn sum<I: Iterator<Item = &'a $ty>>(iter: I) -> Self {
                iter.fold(Self::default(), |mut acc, cpu| {
                    $(acc.$keep = cpu.$keep;)*
                    $(acc.$field += cpu.$field;)+
                    acc
                })
            }
        }
    };
}

/// One counter of a [`counters!`] struct, as `drain-user status` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counter {
    /// The field's name, which is also its key in `status --json`.
    pub key: &'static str,
    /// Its Prometheus metric name (`status --format prometheus`).
    pub metric: &'static str,
    /// Its Prometheus HELP text.
    pub help: &'static str,
}

/// The one table of a counter struct: from one list of fields come the `#[repr(C)]` struct
/// both sides share (fields in the order given, `keep` fields first), its per-CPU [`Sum`]
/// (user side), its serde serialization (counters only, under their field names) and
/// `COUNTERS`, the JSON keys, Prometheus names (`<prefix><field>_total`) and help texts.
///
/// [`Sum`]: core::iter::Sum
macro_rules! counters {
    (
        $(#[$meta:meta])*
        pub struct $ty:ident($prefix:literal) {
            keep { $($(#[$kmeta:meta])* $keep:ident: $kty:ty,)* }
            count { $($(#[$cmeta:meta])* $field:ident: $help:literal,)+ }
        }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        #[cfg_attr(
            feature = "user",
            derive(bytemuck::Pod, bytemuck::Zeroable, serde::Serialize)
        )]
        pub struct $ty {
            $(
                $(#[$kmeta])*
                #[cfg_attr(feature = "user", serde(skip))]
                pub $keep: $kty,
            )*
            $($(#[$cmeta])* pub $field: u64,)+
        }

        impl $ty {
            /// The counters, in field order.
            pub const COUNTERS: &'static [Counter] = &[$(Counter {
                key: stringify!($field),
                metric: concat!($prefix, stringify!($field), "_total"),
                help: $help,
            }),+];

            /// Only the counters of `self` (the other fields zero).
            pub fn counters_only(&self) -> Self {
                let mut c = Self::default();
                $(c.$field = self.$field;)+
                c
            }
        }

        #[cfg(feature = "user")]
        impl core::ops::Add for $ty {
            type Output = Self;

            /// Counters added up; the other fields from `self`.
            fn add(mut self, d: Self) -> Self {
                $(self.$field += d.$field;)+
                self
            }
        }

        #[cfg(feature = "user")]
        per_cpu_sum!($ty { keep: [$($keep),*], sum: [$($field),+] });
    };
}

/// TCP states (include/net/tcp_states.h).
pub const TCP_ESTABLISHED: i32 = 1;
pub const TCP_SYN_RECV: i32 = 3;
pub const TCP_CLOSE_WAIT: i32 = 8;

/// The states drain counts as live: the application still owns the connection and may
/// still send or receive on it. (FIN_WAIT*, LAST_ACK, CLOSING and TIME_WAIT belong to the
/// kernel once the application has closed; stopping the server cannot cut them short.)
#[inline(always)]
pub fn is_live(state: i32) -> bool {
    state == TCP_ESTABLISHED || state == TCP_CLOSE_WAIT
}

/// What the tracker needs to know, written once by user space before it attaches.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct TrackConfig {
    /// Inode of the network namespace to count in (`stat -L -c %i /proc/self/ns/net`);
    /// 0 = not configured, count nothing.
    pub netns_inum: u32,
    /// Byte offset of `inet_sock.inet_sport` (local port, network order u16). Not
    /// `skc_num`: closing a socket by RST releases its port (`inet_put_port` zeroes
    /// skc_num) before the state change the tracker sees.
    pub off_sport: u32,
    /// Byte offset of `sock.__sk_common.skc_net` (a `struct net *`).
    pub off_net: u32,
    /// Byte offset of `net.ns.inum` (u32).
    pub off_inum: u32,
    /// Connections the seed (user space, at `gate on`) could not insert into the set (it was
    /// full): counted with the tracker's `insert_failed`. The kernel never reads it.
    pub seed_failed: u32,
    /// Byte offset of `sock.__sk_common.skc_family` (u16).
    pub off_family: u32,
    /// Byte offset of `sock.__sk_common.skc_dport` (remote port, network order u16).
    pub off_dport: u32,
    /// Byte offset of `sock.__sk_common.skc_daddr` (remote IPv4 address, network order).
    pub off_daddr: u32,
    /// Byte offset of `sock.__sk_common.skc_rcv_saddr` (local IPv4 address).
    pub off_saddr: u32,
    /// Byte offset of `sock.__sk_common.skc_v6_daddr` (remote IPv6 address, 16 bytes).
    pub off_v6_daddr: u32,
    /// Byte offset of `sock.__sk_common.skc_v6_rcv_saddr` (local IPv6 address).
    pub off_v6_saddr: u32,
    /// Non-zero once user space follows a gated port into another namespace
    /// ([`map::FOLLOW`]): only then does the tracker look at other namespaces' sockets, so
    /// a gate that follows nothing pays nothing for them.
    pub follow: u32,
}
const _: () = assert!(core::mem::size_of::<TrackConfig>() == 48);

/// The key of the live-connection set: one TCP connection, as the kernel's socket says and
/// as inet_diag reports it, so the tracker and the seed name a connection alike. Unique
/// among live connections across namespaces (the namespace's inode is in it; within one
/// namespace the kernel keeps at most one established socket per 4-tuple). Read from the
/// socket's own fields rather than its cookie, which tracing programs can ask for only
/// from Linux 5.12.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ConnKey {
    /// Inode of the connection's network namespace.
    pub netns: u32,
    /// Local port, host order.
    pub lport: u16,
    /// Remote port, host order.
    pub rport: u16,
    /// Local address: IPv6, or IPv4 as ::ffff:a.b.c.d (network order).
    pub laddr: [u8; 16],
    /// Remote address, the same way.
    pub raddr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<ConnKey>() == 40);

/// `a` as the 16 bytes of the IPv4-mapped IPv6 address ::ffff:a (network order in, out).
#[inline(always)]
pub fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

/// Entries in [`map::FOLLOW`]: namespaces x backend ports one gate follows.
pub const MAX_FOLLOWED: u32 = 1024;

/// Key of [`map::FOLLOW`]: a local port in another network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FollowKey {
    /// That namespace's inode (`net.ns.inum`, what the tracker reads from the socket).
    pub netns_inum: u32,
    /// The local TCP port there (host order), e.g. a container's 80 behind a published 8080.
    pub port: u32,
}
const _: () = assert!(core::mem::size_of::<FollowKey>() == 8);

/// What the RST counter needs to read the segment a RST answers: byte
/// offsets in `struct sk_buff`, from the running kernel's BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ResetTraceConfig {
    /// `sk_buff.head` (unsigned char *).
    pub off_head: u32,
    /// `sk_buff.transport_header` (u16, offset from head).
    pub off_transport: u32,
    /// `sk_buff.network_header` (u16, offset from head).
    pub off_network: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ResetTraceConfig>() == 16);

counters! {
    /// Tracker counters, per CPU. Serialized (user side) as the `tracker` object of
    /// `drain-user status --json`; exported as `drain_tracker_<name>_total`.
    pub struct TrackStats("drain_tracker_") {
        keep {}
        count {
            /// Passive opens added to the live set (seeded connections are not in it).
            added: "Passive connections added to the live set.",
            /// Connections removed from the live set.
            removed: "Connections removed from the live set.",
            /// Inserts that failed for a reason other than "already there" (set full): while
            /// non-zero the counts may be low, and `wait` refuses to call the ports drained.
            insert_failed: "Live-set inserts that failed (set full): live counts may be low.",
            /// Kernel reads (bpf_probe_read_kernel) that failed: same consequence.
            read_failed: "Kernel reads the tracker could not make: live counts may be low.",
        }
    }
}
const _: () = assert!(core::mem::size_of::<TrackStats>() == 32);

/// The gate's time on one CPU (the value of [`map::RST_RL`]), kernel-only state.
///
/// Reading CLOCK_BOOTTIME is the dearest step of a refusal (tens of ns where the clock source
/// is virtualised), so the last reading is kept with the jiffies count taken right after it:
/// while jiffies have not moved, the reading is less than one tick old, which is close
/// enough for any deadline more than [`CLOCK_REREAD_NS`] away and for the RST limiter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct CpuClock {
    /// Earliest CLOCK_BOOTTIME ns at which the next RST may go (GCRA).
    pub rst_next_ns: u64,
    /// The last CLOCK_BOOTTIME reading, ns.
    pub boot_ns: u64,
    /// `jiffies` right after that reading.
    pub jiffies: u64,
}
const _: () = assert!(core::mem::size_of::<CpuClock>() == 24);

/// Within this distance of the deadline every decision reads the clock afresh, so the gate
/// opens at the deadline to the nanosecond; farther away a reading from the current tick
/// (at most 10 ms old at HZ=100) is used. 1 s leaves two orders of magnitude for ticks that
/// run late.
pub const CLOCK_REREAD_NS: u64 = 1_000_000_000;

counters! {
    /// Per-port counters, one copy per CPU (no atomics on the packet path); user space sums
    /// them. Serialized (user side) as the counters of a `ports` entry of `drain-user status
    /// --json` (the port itself is the entry's key, written there by the caller); exported
    /// as `drain_port_<name>_total{port="..."}`.
    pub struct PortStats("drain_port_") {
        keep {
            /// The port this slot counts for (host order), written by user space into every
            /// CPU's copy when it assigns the slot; 0 = slot free. The kernel never writes it.
            port: u32,
            _pad: u32,
        }
        count {
            /// Connection requests refused because the gate was on. Policy drop: dropped by
            /// the XDP/TC gate. Policy reset: `rst_sent + rst_limited`, each counted once its
            /// fate is known.
            syns_refused: "Connection requests (SYNs) refused because the gate was on.",
            /// Connection requests let through (gate off, deadline passed, or allowlisted
            /// source).
            syns_passed:
                "Connection requests let through (gate off, TTL passed, or allowlisted source).",
            /// Of `syns_passed`: let through because the source was on the allowlist.
            syns_allowed: "Of the passed requests: let through because the source was allowlisted.",
            /// Of `syns_passed`: let through because the deadline (`--ttl`) had passed.
            syns_expired: "Of the passed requests: let through because the TTL had run out.",
            /// Of `syns_refused`: answered with a RST, counted when the kernel sends it
            /// (fentry on tcp_v4/v6_send_reset after the sk_lookup refusal).
            rst_sent: "Of the refused requests: answered with a RST (policy reset).",
            /// Of `syns_refused`: dropped by the XDP/TC gate instead of reset because the RST
            /// rate limit was reached.
            rst_limited: "Of the refused requests: dropped instead of reset by the RST rate limit.",
            /// RSTs the refusal made the kernel send to segments other than connection
            /// requests: a SYN-cookie ACK completing a handshake begun before the gate
            /// closed, a stray ACK.
            rst_not_syn: "RSTs the refusal caused for segments other than a SYN (a SYN-cookie ACK, a stray ACK).",
        }
    }
}
const _: () = assert!(core::mem::size_of::<PortStats>() == 64);

/// Bytes of the [`map::EVENTS`] ring buffer: ~4,000 events, far more than a reader falls
/// behind by at the default rate.
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// Who watches, written by `drain-user watch`. All zero: nobody, and the data path pays one
/// array load for it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct WatchConfig {
    /// CLOCK_BOOTTIME ns until which events are emitted; a watcher pushes it forward every
    /// second, so one that dies stops costing anything within seconds. 0 = nobody watches.
    pub until_ns: u64,
    /// Per CPU and per kind of event: at most one event per `interval_ns` on average...
    pub interval_ns: u64,
    /// ...with bursts of up to this many.
    pub burst: u64,
}
const _: () = assert!(core::mem::size_of::<WatchConfig>() == 24);

/// The events' rate limiter on one CPU (GCRA, as for RSTs) and what it held back.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct WatchCpu {
    /// Earliest time of the next refused-SYN event.
    pub next_refused_ns: u64,
    /// Earliest time of the next connection-left event.
    pub next_left_ns: u64,
    /// Refused SYNs not reported because of the rate limit.
    pub refused_limited: u64,
    /// Connections that left the live set, not reported because of the rate limit.
    pub left_limited: u64,
    /// Events that found the ring buffer full.
    pub lost: u64,
}
const _: () = assert!(core::mem::size_of::<WatchCpu>() == 40);

/// `WatchEvent::kind` values.
/// A SYN to a gated port was refused and dropped.
pub const EVENT_REFUSED_DROP: u32 = 1;
/// A SYN to a gated port was refused with a RST.
pub const EVENT_REFUSED_RST: u32 = 2;
/// A tracked connection left the live set.
pub const EVENT_LEFT: u32 = 3;

/// One event of `drain-user watch`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct WatchEvent {
    /// CLOCK_BOOTTIME ns.
    pub ts_ns: u64,
    /// [`EVENT_REFUSED_DROP`], [`EVENT_REFUSED_RST`] or [`EVENT_LEFT`].
    pub kind: u32,
    /// Refused: 4 or 6 (the source address family); left: 6.
    pub family: u32,
    /// Refused: the source address, network order (IPv4 in the first 4 bytes); left: the
    /// remote address (IPv4 as ::ffff:a.b.c.d).
    pub addr: [u8; 16],
    /// Refused: the source port; left: the remote port (host order).
    pub sport: u16,
    /// Refused: the destination (gated) port; left: the local port. Host order.
    pub port: u16,
    pub _pad: u32,
    pub _reserved: u64,
    /// Left: connections still live on the port after this one left.
    pub left: i64,
}
const _: () = assert!(core::mem::size_of::<WatchEvent>() == 56);

#[cfg(feature = "user")]
per_cpu_sum!(WatchCpu {
    keep: [next_refused_ns, next_left_ns],
    sum: [refused_limited, left_limited, lost]
});

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], only integer fields, no implicit padding (bytemuck::Pod derives
    // above prove it at compile time).
    unsafe impl aya::Pod for super::GateConfig {}
    unsafe impl aya::Pod for super::PortStats {}
    unsafe impl aya::Pod for super::TrackConfig {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::TrackStats {}
    unsafe impl aya::Pod for super::FollowKey {}
    unsafe impl aya::Pod for super::CpuClock {}
    unsafe impl aya::Pod for super::WatchConfig {}
    unsafe impl aya::Pod for super::WatchCpu {}
    unsafe impl aya::Pod for super::ResetTraceConfig {}
}

#[cfg(all(test, feature = "user"))]
mod tests {
    extern crate std;

    use super::*;

    #[test]
    fn per_cpu_sums() {
        let cpu = |n: u64| PortStats {
            port: 443,
            _pad: 0,
            syns_refused: n,
            syns_passed: 2 * n,
            syns_allowed: 3 * n,
            syns_expired: 4 * n,
            rst_sent: 5 * n,
            rst_limited: 6 * n,
            rst_not_syn: 7 * n,
        };
        let sum: PortStats = [cpu(1), cpu(10), cpu(100)].iter().sum();
        assert_eq!(
            sum,
            PortStats {
                port: 443,
                ..cpu(111)
            }
        );
        let t = |n: u64| TrackStats {
            added: n,
            removed: 2 * n,
            insert_failed: 3 * n,
            read_failed: 4 * n,
        };
        assert_eq!([t(1), t(2)].iter().sum::<TrackStats>(), t(3));
        assert_eq!([].iter().sum::<TrackStats>(), TrackStats::default());
        assert_eq!(
            cpu(1) + cpu(2),
            PortStats {
                port: 443,
                ..cpu(3)
            }
        );
        assert_eq!(cpu(5).counters_only(), PortStats { port: 0, ..cpu(5) });
    }

    /// The names `status --json` and `--format prometheus` have always used.
    #[test]
    fn counter_names() {
        let keys = |c: &[Counter]| c.iter().map(|c| c.key).collect::<std::vec::Vec<_>>();
        assert_eq!(
            keys(PortStats::COUNTERS),
            [
                "syns_refused",
                "syns_passed",
                "syns_allowed",
                "syns_expired",
                "rst_sent",
                "rst_limited",
                "rst_not_syn"
            ]
        );
        assert_eq!(
            keys(TrackStats::COUNTERS),
            ["added", "removed", "insert_failed", "read_failed"]
        );
        assert_eq!(
            PortStats::COUNTERS[6].metric,
            "drain_port_rst_not_syn_total"
        );
        assert_eq!(TrackStats::COUNTERS[0].metric, "drain_tracker_added_total");
        let json = serde_json::to_string(&PortStats {
            port: 80,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            json,
            r#"{"syns_refused":0,"syns_passed":0,"syns_allowed":0,"syns_expired":0,"rst_sent":0,"rst_limited":0,"rst_not_syn":0}"#
        );
    }
}

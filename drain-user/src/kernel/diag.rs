//! inet_diag (NETLINK_SOCK_DIAG) dumps of the caller's network namespace: to seed the
//! tracker with connections that predate it, to judge idleness, and to list leftovers.

use std::net::SocketAddr;

use anyhow::Result;
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{nlas::Nla, ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;

use crate::netlink;

pub use netlink_packet_sock_diag::inet::StateFlags as States;

/// One TCP socket as inet_diag reports it.
#[derive(Clone, Debug)]
pub struct Conn {
    /// Equal to what `bpf_get_socket_cookie` returns in the kernel.
    pub cookie: u64,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub state: u8,
    /// Bytes received and not yet read by the application.
    pub rqueue: u32,
    /// Bytes written and not yet acknowledged by the peer (sent or not).
    pub wqueue: u32,
    pub info: Option<Info>,
}

/// The part of `struct tcp_info` drain looks at (offsets from include/uapi/linux/tcp.h,
/// read from the raw attribute so a kernel with a longer tcp_info still parses).
#[derive(Clone, Copy, Debug)]
pub struct Info {
    pub unacked: u32,
    pub last_data_sent_ms: u32,
    pub last_data_recv_ms: u32,
    pub notsent_bytes: u32,
}

impl Info {
    fn parse(raw: &[u8]) -> Option<Self> {
        let at = |off: usize| {
            raw.get(off..off + 4)
                .map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
        };
        Some(Info {
            unacked: at(24)?,
            last_data_sent_ms: at(44)?,
            last_data_recv_ms: at(52)?,
            // Added in Linux 4.6; absent means "not known", treated as nothing pending.
            notsent_bytes: at(144).unwrap_or(0),
        })
    }
}

pub fn state_name(state: u8) -> &'static str {
    match state {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        _ => "UNKNOWN",
    }
}

/// All TCP sockets (IPv4 and IPv6) in `states`, with tcp_info when `info` is set.
pub fn dump(states: StateFlags, info: bool) -> Result<Vec<Conn>> {
    let mut out = Vec::new();
    for family in [AF_INET, AF_INET6] {
        let request = SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: if info {
                ExtensionFlags::INFO
            } else {
                ExtensionFlags::empty()
            },
            states: StateFlags::from_bits_retain(states.bits()),
            socket_id: if family == AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            },
        });
        netlink::dump(NETLINK_SOCK_DIAG, request, "a sock_diag dump", |m| {
            out.extend(conn(&m));
        })
        .map_err(explain)?;
    }
    Ok(out)
}

/// ENOENT from a sock_diag dump: the kernel has no TCP handler registered, which on
/// kernels built with tcp_diag as a module means it is not loaded (a host with modprobe
/// loads it on demand; a minimal system may not). One line naming the fix.
fn explain(e: anyhow::Error) -> anyhow::Error {
    let enoent = e
        .chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| io.raw_os_error() == Some(libc::ENOENT));
    if enoent {
        anyhow::anyhow!(
            "the kernel has no TCP sock_diag (ENOENT from a sock_diag dump): load the \
             tcp_diag and inet_diag modules (`modprobe tcp_diag`) and retry"
        )
    } else {
        e
    }
}

/// The connection an inet_diag answer describes; None for other messages.
fn conn(msg: &SockDiagMessage) -> Option<Conn> {
    let SockDiagMessage::InetResponse(r) = msg else {
        return None;
    };
    let id = &r.header.socket_id;
    let info = r.nlas.iter().find_map(|n| match n {
        Nla::TcpInfo(raw) => Info::parse(raw),
        _ => None,
    });
    let word = |b: &[u8]| u64::from(u32::from_ne_bytes(b.try_into().expect("4 bytes")));
    Some(Conn {
        // idiag_cookie is two host-order u32s, low word first.
        cookie: word(&id.cookie[..4]) | word(&id.cookie[4..]) << 32,
        local: SocketAddr::new(id.source_address, id.source_port),
        peer: SocketAddr::new(id.destination_address, id.destination_port),
        state: r.header.state,
        rqueue: r.header.recv_queue,
        wqueue: r.header.send_queue,
        info,
    })
}

/// Live connections (ESTABLISHED, CLOSE_WAIT) accepted on a local port that has a listener:
/// the passive connections the tracker counts. A socket on a port with no listener is an
/// outbound connection whose ephemeral port happens to match; the tracker skips those too.
pub fn passive_live(info: bool) -> Result<Vec<Conn>> {
    let listening: std::collections::HashSet<u16> = dump(StateFlags::LISTEN, false)?
        .iter()
        .map(|c| c.local.port())
        .collect();
    Ok(
        dump(StateFlags::ESTABLISHED | StateFlags::CLOSE_WAIT, info)?
            .into_iter()
            .filter(|c| listening.contains(&c.local.port()))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv6Addr};

    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_MULTIPART};
    use netlink_packet_sock_diag::inet::{InetResponse, InetResponseHeader};

    use super::*;

    /// A datagram as the kernel sends it: one inet_diag record, then NLMSG_DONE.
    fn datagram(record: SockDiagMessage) -> Vec<u8> {
        let mut out = Vec::new();
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_MULTIPART;
        for payload in [
            NetlinkPayload::InnerMessage(record),
            NetlinkPayload::Done(Default::default()),
        ] {
            let mut msg = NetlinkMessage::new(header, payload);
            msg.finalize();
            let at = out.len();
            out.resize(at + msg.buffer_len(), 0);
            msg.serialize(&mut out[at..]);
        }
        out
    }

    fn tcp_info(unacked: u32, sent_ms: u32, recv_ms: u32, notsent: u32, len: usize) -> Vec<u8> {
        let mut raw = vec![0u8; len];
        for (off, v) in [(24, unacked), (44, sent_ms), (52, recv_ms), (144, notsent)] {
            if off + 4 <= len {
                raw[off..off + 4].copy_from_slice(&v.to_ne_bytes());
            }
        }
        raw
    }

    fn record(info: Option<Vec<u8>>) -> SockDiagMessage {
        let cookie: u64 = 0x1122_3344_5566_7788;
        let mut raw_cookie = [0u8; 8];
        raw_cookie[..4].copy_from_slice(&(cookie as u32).to_ne_bytes());
        raw_cookie[4..].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
        SockDiagMessage::InetResponse(Box::new(InetResponse {
            header: InetResponseHeader {
                family: AF_INET6,
                state: 8, // CLOSE_WAIT
                timer: None,
                socket_id: SocketId {
                    source_port: 443,
                    destination_port: 51000,
                    source_address: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)),
                    destination_address: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2)),
                    interface_id: 0,
                    cookie: raw_cookie,
                },
                recv_queue: 17,
                send_queue: 4096,
                uid: 33,
                inode: 12345,
            },
            nlas: info
                .map(Nla::TcpInfo)
                .into_iter()
                .collect::<Vec<_>>()
                .into(),
        }))
    }

    fn parsed(record: SockDiagMessage) -> Vec<Conn> {
        let mut got = Vec::new();
        let done = netlink::parse(&datagram(record), "test", |m| got.extend(conn(&m))).unwrap();
        assert!(done, "NLMSG_DONE not seen");
        got
    }

    #[test]
    fn inet_diag_record() {
        // A tcp_info as long as this kernel's (232 bytes in 6.x).
        let got = parsed(record(Some(tcp_info(3, 1500, 2500, 9, 232))));
        let [c] = &got[..] else {
            panic!("one record expected: {got:?}")
        };
        assert_eq!(c.cookie, 0x1122_3344_5566_7788);
        assert_eq!(c.local, "[fd00::1]:443".parse().unwrap());
        assert_eq!(c.peer, "[fd00::2]:51000".parse().unwrap());
        assert_eq!(state_name(c.state), "CLOSE_WAIT");
        assert_eq!((c.rqueue, c.wqueue), (17, 4096));
        let i = c.info.expect("tcp_info");
        assert_eq!(
            (
                i.unacked,
                i.last_data_sent_ms,
                i.last_data_recv_ms,
                i.notsent_bytes
            ),
            (3, 1500, 2500, 9)
        );
    }

    #[test]
    fn short_or_missing_tcp_info() {
        // Before Linux 4.6 tcp_info ended before tcpi_notsent_bytes: read as nothing pending.
        let got = parsed(record(Some(tcp_info(1, 2, 3, 4, 104))));
        let i = got[0].info.expect("tcp_info");
        assert_eq!((i.unacked, i.notsent_bytes), (1, 0));
        // Too short to hold the fields drain reads: no info rather than garbage.
        assert!(parsed(record(Some(tcp_info(1, 2, 3, 4, 40))))[0]
            .info
            .is_none());
        // Not asked for.
        assert!(parsed(record(None))[0].info.is_none());
    }

    #[test]
    fn error_answer_fails() {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_MULTIPART;
        let mut err = netlink_packet_core::ErrorMessage::default();
        err.code = std::num::NonZeroI32::new(-libc::EPERM);
        let mut msg = NetlinkMessage::<SockDiagMessage>::new(header, NetlinkPayload::Error(err));
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        let e = netlink::parse(&buf, "a sock_diag dump", |_: SockDiagMessage| {}).unwrap_err();
        assert!(e.to_string().starts_with("a sock_diag dump failed"), "{e}");
    }
}

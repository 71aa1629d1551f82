//! inet_diag (NETLINK_SOCK_DIAG) dumps of the caller's network namespace: to seed the
//! tracker with connections that predate it, to judge idleness, and to list leftovers.

use std::net::SocketAddr;

use anyhow::{bail, Context, Result};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{nlas::Nla, ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr as NlAddr};

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
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).context("opening a sock_diag socket")?;
    socket.bind_auto().context("binding the sock_diag socket")?;
    socket.connect(&NlAddr::new(0, 0))?;
    let mut out = Vec::new();
    for family in [AF_INET, AF_INET6] {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut req = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
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
            })
            .into(),
        );
        req.finalize();
        let mut buf = vec![0; req.buffer_len()];
        req.serialize(&mut buf);
        socket
            .send(&buf, 0)
            .context("sending a sock_diag request")?;
        read_dump(&socket, &mut out)?;
    }
    Ok(out)
}

fn read_dump(socket: &Socket, out: &mut Vec<Conn>) -> Result<()> {
    let mut rx = vec![0u8; 1 << 16];
    loop {
        let n = socket
            .recv(&mut &mut rx[..], 0)
            .context("reading a sock_diag dump")?;
        let mut off = 0;
        while off < n {
            let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&rx[off..n])
                .context("parsing a sock_diag message")?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => bail!("sock_diag dump failed: {e:?}"),
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let id = &r.header.socket_id;
                    let info = r.nlas.iter().find_map(|n| match n {
                        Nla::TcpInfo(raw) => Info::parse(raw),
                        _ => None,
                    });
                    out.push(Conn {
                        // idiag_cookie is two host-order u32s, low word first.
                        cookie: u64::from(u32::from_ne_bytes(id.cookie[..4].try_into().unwrap()))
                            | u64::from(u32::from_ne_bytes(id.cookie[4..].try_into().unwrap()))
                                << 32,
                        local: SocketAddr::new(id.source_address, id.source_port),
                        peer: SocketAddr::new(id.destination_address, id.destination_port),
                        state: r.header.state,
                        rqueue: r.header.recv_queue,
                        wqueue: r.header.send_queue,
                        info,
                    });
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            off += len;
        }
    }
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

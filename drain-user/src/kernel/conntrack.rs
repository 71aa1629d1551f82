//! The kernel's connection tracking, read through ctnetlink (NETLINK_NETFILTER, a
//! IPCTNL_MSG_CT_GET dump of the caller's namespace): which connections to a local port were
//! destination-NATed elsewhere (a published port's DNAT into a container), and the exact
//! tuple the backend's socket has.
//!
//! The message layout is include/uapi/linux/netfilter/nfnetlink_conntrack.h: an nfgenmsg,
//! then attributes; the tuples are nested (IP addresses, then protocol and ports, ports in
//! network order). No crate here covers ctnetlink, and drain reads five attributes of it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::Result;
use netlink_packet_core::{
    NetlinkDeserializable, NetlinkHeader, NetlinkSerializable, NlasIterator,
};
use netlink_sys::protocols::NETLINK_NETFILTER;

use crate::netlink;

/// NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET.
const CT_GET: u16 = 1 << 8 | 1;

// enum ctattr_type, ctattr_tuple, ctattr_ip, ctattr_l4proto, ctattr_protoinfo(_tcp).
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;
/// IPS_DST_NAT (enum ip_conntrack_status).
const IPS_DST_NAT: u32 = 1 << 5;

/// TCP conntrack states (enum tcp_conntrack).
pub const CT_TCP_SYN_RECV: u8 = 2;
pub const CT_TCP_ESTABLISHED: u8 = 3;
pub const CT_TCP_FIN_WAIT: u8 = 4;
pub const CT_TCP_CLOSE_WAIT: u8 = 5;

/// One direction of a conntrack entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tuple {
    pub src: Option<SocketAddr>,
    pub dst: Option<SocketAddr>,
    pub proto: u8,
}

/// A conntrack entry, as far as drain reads it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub orig: Tuple,
    pub reply: Tuple,
    pub status: u32,
    /// TCP state (enum tcp_conntrack); 0 when absent.
    pub tcp_state: u8,
}

/// A TCP connection to a local port that the kernel destination-NATed elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forwarded {
    /// The client as it connected (original source).
    pub client: SocketAddr,
    /// The port it connected to here (original destination port): the published port.
    pub port: u16,
    /// Where it ends: the backend's address and port (reply source), which is also the
    /// local address of the backend's socket.
    pub backend: SocketAddr,
    /// The remote address of the backend's socket (reply destination: the client, or what
    /// a source NAT made of it).
    pub peer: SocketAddr,
    /// TCP conntrack state.
    pub state: u8,
}

impl Forwarded {
    /// True in the states in which the backend's socket may still be live (ESTABLISHED or
    /// CLOSE_WAIT on the server): conntrack sees the handshake's end as ESTABLISHED and a
    /// client's FIN as FIN_WAIT, then CLOSE_WAIT once the server acknowledged it.
    pub fn maybe_live(&self) -> bool {
        matches!(
            self.state,
            CT_TCP_SYN_RECV | CT_TCP_ESTABLISHED | CT_TCP_FIN_WAIT | CT_TCP_CLOSE_WAIT
        )
    }

    pub fn state_name(&self) -> &'static str {
        match self.state {
            1 => "SYN_SENT",
            CT_TCP_SYN_RECV => "SYN_RECV",
            CT_TCP_ESTABLISHED => "ESTABLISHED",
            CT_TCP_FIN_WAIT => "FIN_WAIT",
            CT_TCP_CLOSE_WAIT => "CLOSE_WAIT",
            6 => "LAST_ACK",
            7 => "TIME_WAIT",
            8 => "CLOSE",
            _ => "UNKNOWN",
        }
    }
}

/// The dump request: an nfgenmsg for every family.
#[derive(Debug)]
enum Msg {
    Request,
    Entry(Entry),
    Other,
}

impl NetlinkSerializable for Msg {
    fn message_type(&self) -> u16 {
        CT_GET
    }

    fn buffer_len(&self) -> usize {
        4
    }

    fn serialize(&self, buffer: &mut [u8]) {
        // struct nfgenmsg: family AF_UNSPEC (every family), version NFNETLINK_V0, res_id 0.
        buffer[..4].copy_from_slice(&[0, 0, 0, 0]);
    }
}

#[derive(Debug)]
struct Malformed;

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a malformed ctnetlink message")
    }
}

impl std::error::Error for Malformed {}

impl NetlinkDeserializable for Msg {
    type Error = Malformed;

    fn deserialize(header: &NetlinkHeader, payload: &[u8]) -> Result<Self, Malformed> {
        // Answers are IPCTNL_MSG_CT_NEW (0) of the conntrack subsystem.
        if header.message_type >> 8 != 1 {
            return Ok(Msg::Other);
        }
        let attrs = payload.get(4..).ok_or(Malformed)?;
        parse_entry(attrs).map(Msg::Entry).ok_or(Malformed)
    }
}

fn nlas(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    NlasIterator::new(buf).map_while(|n| n.ok()).map(|n| {
        let (kind, len) = (n.kind(), usize::from(n.length()));
        // The value borrowed from the datagram, not from the NlaBuffer.
        (kind, n.into_inner().get(4..len).unwrap_or(&[]))
    })
}

fn port(v: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(v.get(..2)?.try_into().ok()?))
}

fn v4(v: &[u8]) -> Option<IpAddr> {
    Some(Ipv4Addr::from(<[u8; 4]>::try_from(v.get(..4)?).ok()?).into())
}

fn v6(v: &[u8]) -> Option<IpAddr> {
    Some(Ipv6Addr::from(<[u8; 16]>::try_from(v.get(..16)?).ok()?).into())
}

fn parse_tuple(buf: &[u8]) -> Tuple {
    let (mut src, mut dst, mut sport, mut dport, mut proto) = (None, None, None, None, 0);
    for (kind, v) in nlas(buf) {
        match kind {
            CTA_TUPLE_IP => {
                for (k, a) in nlas(v) {
                    match k {
                        CTA_IP_V4_SRC => src = v4(a),
                        CTA_IP_V4_DST => dst = v4(a),
                        CTA_IP_V6_SRC => src = v6(a),
                        CTA_IP_V6_DST => dst = v6(a),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (k, a) in nlas(v) {
                    match k {
                        CTA_PROTO_NUM => proto = a.first().copied().unwrap_or(0),
                        CTA_PROTO_SRC_PORT => sport = port(a),
                        CTA_PROTO_DST_PORT => dport = port(a),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Tuple {
        src: src.zip(sport).map(|(a, p)| SocketAddr::new(a, p)),
        dst: dst.zip(dport).map(|(a, p)| SocketAddr::new(a, p)),
        proto,
    }
}

fn parse_entry(attrs: &[u8]) -> Option<Entry> {
    let mut e = Entry::default();
    for (kind, v) in nlas(attrs) {
        match kind {
            CTA_TUPLE_ORIG => e.orig = parse_tuple(v),
            CTA_TUPLE_REPLY => e.reply = parse_tuple(v),
            CTA_STATUS => e.status = u32::from_be_bytes(v.get(..4)?.try_into().ok()?),
            CTA_PROTOINFO => {
                for (k, p) in nlas(v) {
                    if k == CTA_PROTOINFO_TCP {
                        for (k, s) in nlas(p) {
                            if k == CTA_PROTOINFO_TCP_STATE {
                                e.tcp_state = s.first().copied().unwrap_or(0);
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Some(e)
}

/// Every conntrack entry of the caller's namespace. Empty, without asking, when connection
/// tracking is not loaded there (then nothing can be NATed): asking would make the kernel
/// load it. Empty too when the namespace's table holds no entry (the count is per
/// namespace): a dump walks the host's whole table, milliseconds on a busy host, and
/// `wait` asks again each time a count reaches zero.
pub fn dump() -> Result<Vec<Entry>> {
    match std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count") {
        Err(_) => return Ok(Vec::new()),
        Ok(n) if n.trim() == "0" => return Ok(Vec::new()),
        Ok(_) => {}
    }
    let mut out = Vec::new();
    netlink::dump(
        NETLINK_NETFILTER,
        Msg::Request,
        "a conntrack dump (ctnetlink)",
        |m| {
            if let Msg::Entry(e) = m {
                out.push(e);
            }
        },
    )?;
    Ok(out)
}

/// The TCP connections to one of `ports` here that were destination-NATed elsewhere.
pub fn forwarded(ports: &std::collections::BTreeSet<u16>) -> Result<Vec<Forwarded>> {
    Ok(dump()?
        .iter()
        .filter_map(|e| forwarded_of(e, ports))
        .collect())
}

fn forwarded_of(e: &Entry, ports: &std::collections::BTreeSet<u16>) -> Option<Forwarded> {
    const TCP: u8 = 6;
    if e.orig.proto != TCP || e.status & IPS_DST_NAT == 0 {
        return None;
    }
    let (client, to) = (e.orig.src?, e.orig.dst?);
    if !ports.contains(&to.port()) {
        return None;
    }
    Some(Forwarded {
        client,
        port: to.port(),
        backend: e.reply.src?,
        peer: e.reply.dst?,
        state: e.tcp_state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nla(kind: u16, nested: bool, value: &[u8]) -> Vec<u8> {
        let len = 4 + value.len();
        let kind = if nested { kind | 0x8000 } else { kind };
        let mut out = Vec::new();
        out.extend((len as u16).to_ne_bytes());
        out.extend(kind.to_ne_bytes());
        out.extend(value);
        out.resize(len.next_multiple_of(4), 0);
        out
    }

    fn tuple(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let ip = [
            nla(CTA_IP_V4_SRC, false, &src),
            nla(CTA_IP_V4_DST, false, &dst),
        ]
        .concat();
        let proto = [
            nla(CTA_PROTO_NUM, false, &[6]),
            nla(CTA_PROTO_SRC_PORT, false, &sport.to_be_bytes()),
            nla(CTA_PROTO_DST_PORT, false, &dport.to_be_bytes()),
        ]
        .concat();
        [
            nla(CTA_TUPLE_IP, true, &ip),
            nla(CTA_TUPLE_PROTO, true, &proto),
        ]
        .concat()
    }

    /// An entry as `conntrack -L` shows it for a published port: client 198.18.0.2:40000 to
    /// 198.18.0.1:8080, DNATed to 198.19.0.2:80, ESTABLISHED.
    #[test]
    fn published_port_entry() {
        let attrs = [
            nla(
                CTA_TUPLE_ORIG,
                true,
                &tuple([198, 18, 0, 2], [198, 18, 0, 1], 40000, 8080),
            ),
            nla(
                CTA_TUPLE_REPLY,
                true,
                &tuple([198, 19, 0, 2], [198, 18, 0, 2], 80, 40000),
            ),
            nla(CTA_STATUS, false, &(IPS_DST_NAT | 0x8).to_be_bytes()),
            nla(
                CTA_PROTOINFO,
                true,
                &nla(
                    CTA_PROTOINFO_TCP,
                    true,
                    &nla(CTA_PROTOINFO_TCP_STATE, false, &[3]),
                ),
            ),
        ]
        .concat();
        let e = parse_entry(&attrs).unwrap();
        let f = forwarded_of(&e, &[8080].into()).expect("forwarded");
        assert_eq!(f.client, "198.18.0.2:40000".parse().unwrap());
        assert_eq!(f.port, 8080);
        assert_eq!(f.backend, "198.19.0.2:80".parse().unwrap());
        assert_eq!(f.peer, "198.18.0.2:40000".parse().unwrap());
        assert!(f.maybe_live());
        assert_eq!(forwarded_of(&e, &[80].into()), None, "another port");
        let plain = Entry { status: 0x8, ..e };
        assert_eq!(forwarded_of(&plain, &[8080].into()), None, "not DNATed");
    }
}

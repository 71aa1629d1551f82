//! Netlink requests, for rtnetlink ([`crate::iface`], [`crate::clsact`]) and sock_diag
//! ([`crate::diag`]): a dump (send one request, read datagrams until NLMSG_DONE), or a
//! change the kernel acknowledges ([`request`]).

use std::fmt::Debug;

use anyhow::{Context, Result};
use netlink_packet_core::{
    NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_sys::{Socket, SocketAddr};

/// Opens a socket of `protocol` and sends `request` on it with `flags`; the answer is the
/// caller's to read.
fn send<T>(protocol: isize, request: T, flags: u16, what: &str) -> Result<Socket>
where
    T: NetlinkSerializable + Debug,
{
    let mut socket =
        Socket::new(protocol).with_context(|| format!("opening a socket for {what}"))?;
    socket
        .bind_auto()
        .with_context(|| format!("binding the socket for {what}"))?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = 1;
    let mut req = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(request));
    req.finalize();
    let mut buf = vec![0; req.buffer_len()];
    req.serialize(&mut buf);
    socket
        .send(&buf, 0)
        .with_context(|| format!("sending {what}"))?;
    Ok(socket)
}

/// Sends `request` as a dump on a new socket of `protocol` and calls `each` with every
/// message of the answer. `what` names the request in errors ("RTM_GETLINK").
pub fn dump<T>(protocol: isize, request: T, what: &str, mut each: impl FnMut(T)) -> Result<()>
where
    T: NetlinkSerializable + NetlinkDeserializable + Debug,
{
    let socket = send(protocol, request, NLM_F_REQUEST | NLM_F_DUMP, what)?;
    let mut rx = vec![0u8; 1 << 16];
    loop {
        let n = socket
            .recv(&mut &mut rx[..], 0)
            .with_context(|| format!("reading {what}"))?;
        if parse(&rx[..n], what, &mut each)? {
            return Ok(());
        }
    }
}

/// Sends `request` with `flags` (NLM_F_CREATE, NLM_F_EXCL, ...) on a new socket of
/// `protocol` and waits for the kernel's acknowledgement. A refusal is an error whose
/// source is the errno as an [`std::io::Error`], for callers that name a fix for it.
pub fn request<T>(protocol: isize, request: T, flags: u16, what: &str) -> Result<()>
where
    T: NetlinkSerializable + NetlinkDeserializable + Debug,
{
    let socket = send(protocol, request, NLM_F_REQUEST | NLM_F_ACK | flags, what)?;
    let mut rx = vec![0u8; 1 << 16];
    loop {
        let n = socket
            .recv(&mut &mut rx[..], 0)
            .with_context(|| format!("reading the answer to {what}"))?;
        let mut off = 0;
        while off < n {
            let msg = NetlinkMessage::<T>::deserialize(&rx[off..n])
                .with_context(|| format!("parsing the answer to {what}"))?;
            if let NetlinkPayload::Error(e) = msg.payload {
                // NLMSG_ERROR with code 0 is the acknowledgement.
                return match e.code {
                    None => Ok(()),
                    Some(c) => Err(std::io::Error::from_raw_os_error(-c.get()))
                        .with_context(|| format!("{what} failed")),
                };
            }
            let len = msg.header.length as usize;
            if len == 0 {
                break;
            }
            off += len;
        }
    }
}

/// Parses one datagram of a dump answer, calling `each` for every message in it. True when
/// it holds the end of the dump.
pub fn parse<T>(datagram: &[u8], what: &str, mut each: impl FnMut(T)) -> Result<bool>
where
    T: NetlinkDeserializable + Debug,
{
    let mut off = 0;
    while off < datagram.len() {
        let msg = NetlinkMessage::<T>::deserialize(&datagram[off..])
            .with_context(|| format!("parsing the answer to {what}"))?;
        let len = msg.header.length as usize;
        match msg.payload {
            NetlinkPayload::Done(_) => return Ok(true),
            // One line with the errno, not the message dump; callers look at the io::Error
            // underneath to name a fix.
            NetlinkPayload::Error(e) => {
                let code = e.code.map_or(0, |c| -c.get());
                return Err(std::io::Error::from_raw_os_error(code))
                    .with_context(|| format!("{what} failed"));
            }
            NetlinkPayload::InnerMessage(m) => each(m),
            _ => {}
        }
        if len == 0 {
            break;
        }
        off += len;
    }
    Ok(false)
}

// ---------------------------------------------------------------------------------------
// Generic netlink, by hand (netlink-packet-generic is not a dependency): native XDP per
// interface, from the xdp-features of the netdev family (Linux 6.3), for `check`
// ---------------------------------------------------------------------------------------

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
const NETDEV_XDP_ACT_BASIC: u64 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

/// (ifindex, has native XDP) for every interface of the caller's namespace; `None` when
/// the kernel has no netdev family (before 6.3) or the dump fails.
pub fn xdp_features() -> Option<Vec<(u32, bool)>> {
    use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};
    let mut sock = Socket::new(NETLINK_GENERIC).ok()?;
    sock.bind_auto().ok()?;
    sock.connect(&SocketAddr::new(0, 0)).ok()?;
    let mut name = b"netdev\0".to_vec();
    let req = genl_msg(
        GENL_ID_CTRL,
        NLM_F_REQUEST,
        CTRL_CMD_GETFAMILY,
        &attr(CTRL_ATTR_FAMILY_NAME, &mut name),
    );
    sock.send(&req, 0).ok()?;
    let mut family = None;
    genl_read(&mut sock, |attrs| {
        if let Some(v) = attrs.iter().find(|(t, _)| *t == CTRL_ATTR_FAMILY_ID) {
            family = v.1.get(..2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
        }
    })?;
    let req = genl_msg(family?, NLM_F_REQUEST | NLM_F_DUMP, NETDEV_CMD_DEV_GET, &[]);
    sock.send(&req, 0).ok()?;
    let mut out = Vec::new();
    genl_read(&mut sock, |attrs| {
        let get = |t| {
            attrs
                .iter()
                .find(|(a, _)| *a == t)
                .map(|(_, v)| v.as_slice())
        };
        let idx = get(NETDEV_A_DEV_IFINDEX)
            .and_then(|b| b.get(..4))
            .map(|b| u32::from_ne_bytes(b.try_into().unwrap()));
        let feats = get(NETDEV_A_DEV_XDP_FEATURES)
            .and_then(|b| b.get(..8))
            .map(|b| u64::from_ne_bytes(b.try_into().unwrap()))
            .unwrap_or(0);
        if let Some(idx) = idx {
            out.push((idx, feats & NETDEV_XDP_ACT_BASIC != 0));
        }
    })?;
    Some(out)
}

/// One netlink attribute: { u16 len; u16 type; value; padding to 4 }.
fn attr(ty: u16, value: &mut Vec<u8>) -> Vec<u8> {
    let mut a = Vec::new();
    a.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    a.extend_from_slice(&ty.to_ne_bytes());
    a.append(value);
    while a.len() % 4 != 0 {
        a.push(0);
    }
    a
}

/// nlmsghdr { u32 len; u16 type; u16 flags; u32 seq; u32 pid; } + genlmsghdr { u8 cmd;
/// u8 version; u16 reserved; } + attributes.
fn genl_msg(family: u16, flags: u16, cmd: u8, attrs: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&family.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[cmd, 1, 0, 0]);
    m.extend_from_slice(attrs);
    m
}

/// Reads answers until NLMSG_DONE (dumps) or one answer (plain requests), calling `each`
/// with the attributes of every message. `None` on a netlink error.
fn genl_read(
    sock: &mut netlink_sys::Socket,
    mut each: impl FnMut(&[(u16, Vec<u8>)]),
) -> Option<()> {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = sock.recv(&mut &mut buf[..], 0).ok()?;
        let mut off = 0;
        let mut multi = false;
        while off + 16 <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().ok()?) as usize;
            let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().ok()?);
            let flags = u16::from_ne_bytes(buf[off + 6..off + 8].try_into().ok()?);
            if len < 16 || off + len > n {
                return None;
            }
            match ty {
                NLMSG_DONE => return Some(()),
                NLMSG_ERROR => {
                    let code = i32::from_ne_bytes(buf[off + 16..off + 20].try_into().ok()?);
                    if code != 0 {
                        return None;
                    }
                }
                _ => {
                    multi |= flags & 2 != 0; // NLM_F_MULTI
                    let mut attrs = Vec::new();
                    let mut a = off + 20;
                    while a + 4 <= off + len {
                        let alen = u16::from_ne_bytes(buf[a..a + 2].try_into().ok()?) as usize;
                        let aty = u16::from_ne_bytes(buf[a + 2..a + 4].try_into().ok()?) & 0x3fff;
                        if alen < 4 || a + alen > off + len {
                            break;
                        }
                        attrs.push((aty, buf[a + 4..a + alen].to_vec()));
                        a += (alen + 3) & !3;
                    }
                    each(&attrs);
                }
            }
            off += (len + 3) & !3;
        }
        if !multi {
            return Some(());
        }
    }
}

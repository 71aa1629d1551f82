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

/// Sends `request` as a dump on a new socket of `protocol` and calls `each` with every
/// message of the answer. `what` names the request in errors ("RTM_GETLINK").
pub fn dump<T>(protocol: isize, request: T, what: &str, mut each: impl FnMut(T)) -> Result<()>
where
    T: NetlinkSerializable + NetlinkDeserializable + Debug,
{
    let mut socket =
        Socket::new(protocol).with_context(|| format!("opening a socket for {what}"))?;
    socket
        .bind_auto()
        .with_context(|| format!("binding the socket for {what}"))?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = 1;
    let mut req = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(request));
    req.finalize();
    let mut buf = vec![0; req.buffer_len()];
    req.serialize(&mut buf);
    socket
        .send(&buf, 0)
        .with_context(|| format!("sending {what}"))?;
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
    let mut socket =
        Socket::new(protocol).with_context(|| format!("opening a socket for {what}"))?;
    socket
        .bind_auto()
        .with_context(|| format!("binding the socket for {what}"))?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    header.sequence_number = 1;
    let mut req = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(request));
    req.finalize();
    let mut buf = vec![0; req.buffer_len()];
    req.serialize(&mut buf);
    socket
        .send(&buf, 0)
        .with_context(|| format!("sending {what}"))?;
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

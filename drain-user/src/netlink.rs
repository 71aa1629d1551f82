//! rtnetlink: the interfaces of the caller's network namespace and what XDP program each
//! one has. (Not /sys/class/net: sysfs shows the namespace it was mounted in, which is not
//! the caller's under `nsenter --net`.)

use anyhow::{bail, Context, Result};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::{
    link::{LinkAttribute, LinkFlags, LinkMessage, LinkXdp, XdpAttached},
    RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// One network interface.
#[derive(Clone, Debug)]
pub struct Iface {
    pub index: u32,
    pub name: String,
    pub up: bool,
    /// The XDP program attached, if any: (program id, mode).
    pub xdp: Option<(u32, XdpMode)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    Driver,
    Generic,
    Offload,
    Multi,
}

impl XdpMode {
    pub fn as_str(self) -> &'static str {
        match self {
            XdpMode::Driver => "native",
            XdpMode::Generic => "generic",
            XdpMode::Offload => "offload",
            XdpMode::Multi => "multi",
        }
    }
}

/// Every interface in the caller's network namespace, by index.
pub fn interfaces() -> Result<Vec<Iface>> {
    let mut socket = Socket::new(NETLINK_ROUTE).context("opening an rtnetlink socket")?;
    socket.bind_auto().context("binding the rtnetlink socket")?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_DUMP | NLM_F_REQUEST;
    header.sequence_number = 1;
    let mut req = NetlinkMessage::new(
        header,
        NetlinkPayload::from(RouteNetlinkMessage::GetLink(LinkMessage::default())),
    );
    req.finalize();
    let mut buf = vec![0; req.buffer_len()];
    req.serialize(&mut buf);
    socket.send(&buf, 0).context("sending RTM_GETLINK")?;

    let mut out = Vec::new();
    let mut rx = vec![0u8; 1 << 16];
    loop {
        let n = socket
            .recv(&mut &mut rx[..], 0)
            .context("reading RTM_GETLINK")?;
        let mut off = 0;
        while off < n {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rx[off..n])
                .context("parsing an rtnetlink message")?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Done(_) => {
                    out.sort_by_key(|i: &Iface| i.index);
                    return Ok(out);
                }
                NetlinkPayload::Error(e) => bail!("RTM_GETLINK failed: {e:?}"),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                    out.push(iface(&link));
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

fn iface(link: &LinkMessage) -> Iface {
    let mut name = String::new();
    let mut xdp_id = 0;
    let mut mode = None;
    for attr in &link.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = n.clone(),
            LinkAttribute::Xdp(xdp) => {
                for x in xdp {
                    match x {
                        LinkXdp::ProgId(id) => xdp_id = *id,
                        LinkXdp::Attached(a) => {
                            mode = match a {
                                XdpAttached::Driver => Some(XdpMode::Driver),
                                XdpAttached::SocketBuffer => Some(XdpMode::Generic),
                                XdpAttached::Hardware => Some(XdpMode::Offload),
                                XdpAttached::Multiple => Some(XdpMode::Multi),
                                _ => None,
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Iface {
        index: link.header.index,
        name,
        up: link.header.flags.contains(LinkFlags::Up),
        xdp: mode.map(|m| (xdp_id, m)),
    }
}

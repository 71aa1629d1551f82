//! The interfaces of the caller's network namespace (rtnetlink) and the XDP program each
//! one has. (Not /sys/class/net: sysfs shows the namespace it was mounted in, which is not
//! the caller's under `nsenter --net`.)

use anyhow::{Context, Result};
use netlink_packet_route::{
    link::{LinkAttribute, LinkFlags, LinkMessage, LinkXdp, XdpAttached},
    RouteNetlinkMessage,
};
use netlink_sys::protocols::NETLINK_ROUTE;

use crate::{domain::usage, netlink};

/// One network interface.
#[derive(Clone, Debug)]
pub struct Iface {
    pub index: u32,
    pub name: String,
    pub up: bool,
    /// The device this one is enslaved to (a bridge or bond port's master), if any.
    pub master: Option<u32>,
    /// The XDP program attached, if any: (program id, mode).
    pub xdp: Option<(u32, XdpMode)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum XdpMode {
    #[serde(rename = "native")]
    Driver,
    #[serde(rename = "generic")]
    Generic,
    #[serde(rename = "offload")]
    Offload,
    #[serde(rename = "multi")]
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
    let mut out = Vec::new();
    netlink::dump(
        NETLINK_ROUTE,
        RouteNetlinkMessage::GetLink(LinkMessage::default()),
        "RTM_GETLINK",
        |m| {
            if let RouteNetlinkMessage::NewLink(link) = m {
                out.push(iface(&link));
            }
        },
    )?;
    out.sort_by_key(|i| i.index);
    Ok(out)
}

/// The interfaces `gate on` is about: the named ones (each must exist), or all that are up.
/// Checked before anything changes, so a typo changes nothing on the host.
pub fn resolve(names: &[String]) -> Result<Vec<Iface>> {
    let all = interfaces()?;
    if names.is_empty() {
        return Ok(all.into_iter().filter(|i| i.up).collect());
    }
    let mut out: Vec<Iface> = Vec::new();
    for name in names {
        let Some(i) = all.iter().find(|i| &i.name == name) else {
            let known: Vec<_> = all.iter().map(|i| i.name.as_str()).collect();
            return Err(usage(format!(
                "no interface named {name:?} in this network namespace (interfaces: {})",
                known.join(", ")
            )));
        };
        if !out.iter().any(|o| o.index == i.index) {
            out.push(i.clone());
        }
    }
    Ok(out)
}

/// "name, id N" of a program by id, for messages about programs other tools attached.
pub fn program_name(id: u32) -> String {
    match crate::sys::prog_name(id) {
        Some(n) if !n.is_empty() => format!("{n}, id {id}"),
        _ => format!("id {id}"),
    }
}

fn iface(link: &LinkMessage) -> Iface {
    let mut name = String::new();
    let mut master = None;
    let mut xdp_id = 0;
    let mut mode = None;
    for attr in &link.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = n.clone(),
            LinkAttribute::Controller(m) => master = Some(*m),
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
        master,
        xdp: mode.map(|m| (xdp_id, m)),
    }
}

/// Whether this namespace's interfaces changed: a netlink socket in rtnetlink's link group
/// (RTMGRP_LINK: an interface added, removed, brought up or down), read without blocking.
/// What `wait` checks before it lists the interfaces again: one recv that finds nothing
/// instead of a dump every second.
pub struct LinkEvents {
    socket: netlink_sys::Socket,
    buf: Vec<u8>,
}

impl LinkEvents {
    /// Subscribes; changes from now on are seen (list the interfaces after this, not before).
    pub fn open() -> Result<Self> {
        const RTMGRP_LINK: u32 = 1;
        let mut socket = netlink_sys::Socket::new(NETLINK_ROUTE)
            .context("opening a netlink socket for interface changes")?;
        socket
            .bind(&netlink_sys::SocketAddr::new(0, RTMGRP_LINK))
            .context("subscribing to interface changes (RTMGRP_LINK)")?;
        socket.set_non_blocking(true)?;
        Ok(LinkEvents {
            socket,
            buf: vec![0; 1 << 16],
        })
    }

    /// True when an interface changed since the last call (or notifications were lost:
    /// the socket overflowed, ENOBUFS), so the caller lists them again.
    pub fn changed(&mut self) -> bool {
        let mut any = false;
        loop {
            match self.socket.recv(&mut &mut self.buf[..], 0) {
                Ok(_) => any = true,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return any,
                Err(_) => return true,
            }
        }
    }
}

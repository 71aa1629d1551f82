//! The interfaces of the caller's network namespace (rtnetlink) and the XDP program each
//! one has. (Not /sys/class/net: sysfs shows the namespace it was mounted in, which is not
//! the caller's under `nsenter --net`.)

use anyhow::{Context, Result};
use netlink_packet_route::{
    link::{LinkAttribute, LinkFlags, LinkInfo, LinkMessage, LinkXdp, XdpAttached},
    RouteNetlinkMessage,
};
use netlink_sys::protocols::NETLINK_ROUTE;

use crate::{
    domain::{attach::Device, usage},
    netlink,
};

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
    /// Its rtnetlink kind (IFLA_INFO_KIND: "veth", "bridge", ...): set for the devices a
    /// driver's rtnl_link_ops made, which are all software devices.
    pub kind: Option<String>,
    /// IFF_LOOPBACK.
    pub loopback: bool,
    /// IFLA_PARENT_DEV_NAME (Linux 5.13): the bus device behind it ("0000:03:00.0").
    pub parent: Option<String>,
}

impl Iface {
    /// What the device is, for `--attach auto` ([`crate::domain::attach::decide`]).
    ///
    /// rtnetlink, not /sys/class/net/NAME/device: sysfs shows the namespace it was mounted
    /// in. A device with a kind (veth, bridge, vxlan, bond, team, macvlan, ipvlan, geneve,
    /// wireguard, tun, ...) or the loopback is virtual; otherwise a parent bus device
    /// (IFLA_PARENT_DEV_NAME, or before 5.13 the bus_info ethtool reports, which the kernel
    /// fills from the parent device) makes it physical, with the driver ethtool names; a
    /// device with neither is virtual too.
    pub fn device(&self) -> Device {
        if self.loopback {
            return Device::Virtual("loopback".into());
        }
        if let Some(kind) = &self.kind {
            return Device::Virtual(kind.clone());
        }
        let info = drvinfo(&self.name);
        let bus = info.as_ref().is_some_and(|(_, bus)| !bus.is_empty());
        if self.parent.is_some() || bus {
            let driver = info
                .map(|(d, _)| d)
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| "unknown".into());
            return Device::Physical(driver);
        }
        Device::Virtual("no parent device".into())
    }
}

/// (driver, bus_info) of `name` from the ethtool ioctl (ETHTOOL_GDRVINFO) on a socket of
/// the caller's namespace; None where the device has neither a get_drvinfo nor a parent
/// device (EOPNOTSUPP: the loopback, for one).
fn drvinfo(name: &str) -> Option<(String, String)> {
    use std::os::fd::{FromRawFd, OwnedFd};
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 3;
    /// struct ethtool_drvinfo (include/uapi/linux/ethtool.h): 196 bytes.
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        counts: [u32; 5],
    }
    /// struct ifreq with ifr_data: 40 bytes on 64-bit.
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    if name.len() >= 16 {
        return None;
    }
    // SAFETY: plain socket(2); the fd is owned at once.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return None;
    }
    // SAFETY: a new fd nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        version: [0; 32],
        fw_version: [0; 32],
        bus_info: [0; 32],
        erom_version: [0; 32],
        reserved2: [0; 12],
        counts: [0; 5],
    };
    let mut req = IfReq {
        name: [0; 16],
        data: &mut info,
        _pad: [0; 16],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: SIOCETHTOOL with ETHTOOL_GDRVINFO writes at most a struct ethtool_drvinfo
    // through ifr_data, which points at one that outlives the call.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            SIOCETHTOOL as _,
            &mut req,
        )
    };
    if rc != 0 {
        return None;
    }
    let text = |b: &[u8]| {
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        String::from_utf8_lossy(&b[..end]).into_owned()
    };
    Some((text(&info.driver), text(&info.bus_info)))
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
    let mut kind = None;
    let mut parent = None;
    for attr in &link.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = n.clone(),
            LinkAttribute::ParentDevName(p) => parent = Some(p.clone()),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        kind = Some(k.to_string());
                    }
                }
            }
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
        kind,
        loopback: link.header.flags.contains(LinkFlags::Loopback),
        parent,
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

//! Which hook a gate attaches an interface with, and why: `--attach xdp` and `--attach tc`
//! say so; `--attach auto` (the default) decides per device ([`decide`]). Pure: `gate on`,
//! `gate on --dry-run` and `check` feed it what the kernel says about each device, and its
//! unit tests feed it devices this host does not have (a NIC with or without native XDP).

use std::fmt;

use serde::Serialize;

use super::AttachChoice;

/// The hook a link is attached to, as encoded in its pin name and shown by `status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    Xdp,
    Tc,
}

impl Hook {
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp",
            Hook::Tc => "tc",
        }
    }
}

/// What a network device is, as far as the choice of hook goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Device {
    /// A software device: its rtnetlink kind (IFLA_INFO_KIND: veth, bridge, vxlan, bond,
    /// macvlan, wireguard, tun, ...), "loopback", or "no parent device" (no kind, but no bus
    /// device behind it either).
    Virtual(String),
    /// A device with a parent bus device (a NIC, an SR-IOV VF, virtio): its driver.
    Physical(String),
}

/// Why a hook was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// `--attach xdp` or `--attach tc` named it.
    Asked,
    /// auto: another program holds the XDP hook; TC runs beside it.
    XdpTaken,
    /// auto: a virtual device.
    Virtual,
    /// auto: a physical device whose driver has native XDP.
    NativeXdp,
    /// auto: a physical device whose driver has no native XDP.
    NoNativeXdp,
    /// auto: a physical device, on a kernel that does not say whether its driver has native
    /// XDP (the netdev family's xdp-features: Linux 6.3).
    NativeUnknown,
}

impl Reason {
    /// One byte for the gate's record of it ([`crate::choices`]).
    pub fn to_raw(self) -> u8 {
        self as u8
    }

    /// Every reason, for decoding a recorded byte.
    pub const ALL: [Reason; 6] = [
        Reason::Asked,
        Reason::XdpTaken,
        Reason::Virtual,
        Reason::NativeXdp,
        Reason::NoNativeXdp,
        Reason::NativeUnknown,
    ];

    pub fn from_raw(raw: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.to_raw() == raw)
    }
}

/// The hook for one interface and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// What `--attach` asked for.
    pub asked: AttachChoice,
    pub hook: Hook,
    pub reason: Reason,
    pub device: Device,
}

/// The choice for `device` under `--attach asked`: `native_xdp` says whether its driver has
/// native XDP (None: the kernel does not say), `xdp_taken` whether another program holds
/// its XDP hook. None: `--attach xdp` on a taken hook, which `gate on` refuses.
///
/// auto takes TC on every virtual device. XDP gains nothing there and costs: native XDP
/// on a veth end makes the kernel turn off TSO (and GSO) on its peer (veth_xdp_set ->
/// netdev_update_features on the peer: veth_fix_features drops them while the peer has an
/// XDP program), so a container's established stream through it runs at a third of its
/// speed, while TC leaves every offload alone; most other software devices (bridge, vxlan,
/// lo, dummy, macvlan, ...) have no native XDP at all and would run XDP generic, after the
/// skb is built, where TC is as early and cheaper. On a physical device auto takes native
/// XDP where the driver has it (the earliest, cheapest refusal) and TC otherwise: generic
/// XDP is never chosen by auto, only by an explicit `--attach xdp`. Where another XDP
/// program holds the hook, TC, beside it (drain never replaces another tool's program).
pub fn decide(
    asked: AttachChoice,
    device: Device,
    native_xdp: Option<bool>,
    xdp_taken: bool,
) -> Option<Decision> {
    let (hook, reason) = match asked {
        AttachChoice::Xdp if xdp_taken => return None,
        AttachChoice::Xdp => (Hook::Xdp, Reason::Asked),
        AttachChoice::Tc => (Hook::Tc, Reason::Asked),
        AttachChoice::Auto if xdp_taken => (Hook::Tc, Reason::XdpTaken),
        AttachChoice::Auto => match (&device, native_xdp) {
            (Device::Virtual(_), _) => (Hook::Tc, Reason::Virtual),
            (Device::Physical(_), Some(true)) => (Hook::Xdp, Reason::NativeXdp),
            (Device::Physical(_), Some(false)) => (Hook::Tc, Reason::NoNativeXdp),
            (Device::Physical(_), None) => (Hook::Tc, Reason::NativeUnknown),
        },
    };
    Some(Decision {
        asked,
        hook,
        reason,
        device,
    })
}

impl Decision {
    /// True when the XDP attachment must be native: auto chose XDP for the driver's native
    /// mode, and a kernel that would fall back to generic must refuse instead.
    pub fn native_only(&self) -> bool {
        self.hook == Hook::Xdp && self.reason == Reason::NativeXdp
    }
}

/// The reason in one short phrase: `status`, `check` and `gate on --dry-run` print it.
impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let device = match &self.device {
            Device::Virtual(kind) => format!("virtual device ({kind})"),
            Device::Physical(driver) => format!("physical device (driver {driver})"),
        };
        match self.reason {
            Reason::Asked => write!(f, "--attach {}", self.hook.as_str()),
            Reason::XdpTaken => {
                f.write_str("another program holds the XDP hook: TC runs beside it")
            }
            Reason::Virtual if self.device == Device::Virtual("veth".into()) => {
                write!(f, "{device}: TC keeps the peer's TSO")
            }
            Reason::Virtual => write!(f, "{device}: TC, as XDP there gains nothing"),
            Reason::NativeXdp => write!(f, "{device} with native XDP"),
            Reason::NoNativeXdp => {
                write!(f, "{device} without native XDP: TC, not generic XDP")
            }
            Reason::NativeUnknown => write!(
                f,
                "{device}: the kernel does not say if it has native XDP (Linux 6.3 does): \
                 TC, not generic XDP"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auto(device: Device, native: Option<bool>, taken: bool) -> (Hook, String) {
        let d = decide(AttachChoice::Auto, device, native, taken).expect("auto never refuses");
        (d.hook, d.to_string())
    }

    fn virt(kind: &str) -> Device {
        Device::Virtual(kind.into())
    }

    fn nic(driver: &str) -> Device {
        Device::Physical(driver.into())
    }

    /// The physical-device paths cannot be attached to here (no NIC in a test namespace):
    /// this table is their test.
    #[test]
    fn auto_takes_tc_on_virtual_devices_and_native_xdp_on_capable_nics() {
        assert_eq!(
            auto(virt("veth"), Some(true), false),
            (
                Hook::Tc,
                "virtual device (veth): TC keeps the peer's TSO".into()
            )
        );
        for kind in ["bridge", "vxlan", "loopback", "dummy", "no parent device"] {
            let (hook, why) = auto(virt(kind), None, false);
            assert_eq!(hook, Hook::Tc, "{kind}");
            assert!(
                why.starts_with(&format!("virtual device ({kind})")),
                "{why}"
            );
        }
        assert_eq!(
            auto(nic("ixgbe"), Some(true), false),
            (
                Hook::Xdp,
                "physical device (driver ixgbe) with native XDP".into()
            )
        );
        let (hook, why) = auto(nic("e1000"), Some(false), false);
        assert_eq!(hook, Hook::Tc, "no generic XDP by auto: {why}");
        assert!(why.contains("without native XDP"), "{why}");
        let (hook, why) = auto(nic("r8169"), None, false);
        assert_eq!(hook, Hook::Tc, "unknown is not native: {why}");
        assert!(why.contains("does not say"), "{why}");
    }

    #[test]
    fn a_taken_xdp_hook_sends_auto_to_tc_and_refuses_xdp() {
        for device in [virt("veth"), nic("ixgbe")] {
            let (hook, why) = auto(device.clone(), Some(true), true);
            assert_eq!(hook, Hook::Tc);
            assert!(why.contains("another program holds the XDP hook"), "{why}");
            assert_eq!(decide(AttachChoice::Xdp, device, Some(true), true), None);
        }
    }

    #[test]
    fn explicit_choices_are_kept_whatever_the_device() {
        for device in [virt("veth"), nic("e1000"), virt("loopback")] {
            for (asked, hook) in [(AttachChoice::Xdp, Hook::Xdp), (AttachChoice::Tc, Hook::Tc)] {
                let d = decide(asked, device.clone(), Some(false), false).unwrap();
                assert_eq!(d.hook, hook);
                assert_eq!(d.to_string(), format!("--attach {}", hook.as_str()));
                assert!(!d.native_only(), "only auto insists on native");
            }
        }
        assert!(decide(AttachChoice::Auto, nic("ixgbe"), Some(true), false)
            .unwrap()
            .native_only());
    }

    #[test]
    fn reasons_round_trip_through_their_byte() {
        for r in Reason::ALL {
            assert_eq!(Reason::from_raw(r.to_raw()), Some(r));
        }
        assert_eq!(Reason::from_raw(200), None);
    }
}

//! `--attach tc` on kernels without TCX (before 6.6): the classic clsact qdisc and a
//! direct-action cls_bpf filter on its ingress, made and read over rtnetlink.
//!
//! Such a filter is no bpf_link: nothing can be pinned for it, and it stays until someone
//! deletes it. So the gate keeps a record of each one ([`Record`]: ifindex, name, priority,
//! handle, program id, whether drain created the qdisc) in a hash map of its own pinned in
//! the state directory ([`RECORDS`]), and every judgement is the kernel's: a dump of the
//! interface's clsact ingress (RTM_GETTFILTER) says whether drain's filter is there, found
//! by its slot and by the id of the program it runs (TCA_BPF_ID), whose name must be
//! drain's ([`inspect`]), exactly as [`crate::links::inspect`] judges a TCX link.
//!
//! Placement: priority [`PRIORITY`] (1, the first a filter can have: lower runs first),
//! handle [`HANDLE`], protocol all, chain 0. A filter before drain's could redirect a SYN
//! past the gate, as in the TCX chain, where drain goes first too. cls_bpf adds a new
//! filter at the head of its priority's list (`cls_bpf_change`), so drain's runs first even
//! beside other cls_bpf filters at priority 1. The program returns TC_ACT_UNSPEC (-1, the
//! TCX_NEXT of the TCX chain) for what it lets through, so the filters after it still run;
//! TC_ACT_SHOT for a refused SYN. A filter of another kind or protocol at priority 1 cannot
//! share it (the kernel refuses): `gate on` says so and changes nothing.
//!
//! A clsact filter does not follow its device into another namespace: moving a device
//! destroys its qdiscs (`dev_shutdown`). So there is no "elsewhere" here: a filter is
//! attached on this namespace's device, or gone.
//!
//! Removal takes only what is drain's: the filter at drain's slot, and only while it runs
//! drain's recorded program (someone may have replaced it); the clsact qdisc only when
//! drain created it and no filter is left on it, ingress or egress. (rtnetlink has no
//! conditional delete: between the dump that checks and the delete, under drain's lock,
//! another tool would have to take the very slot or qdisc for this to go wrong.)

use std::{
    ffi::CStr,
    os::fd::{AsRawFd, BorrowedFd},
    path::Path,
};

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use drain_common::prog;
use netlink_packet_core::{
    DecodeError, NetlinkDeserializable, NetlinkHeader, NetlinkSerializable, NLM_F_CREATE,
    NLM_F_EXCL,
};
use netlink_sys::protocols::NETLINK_ROUTE;

use crate::{iface::Iface, links::LinkState, netlink, sys};

/// drain's filter priority on clsact ingress ("pref 1" in `tc filter show`).
pub const PRIORITY: u16 = 1;
/// drain's filter handle ("handle 0xd7a1"): fixed, so drain's filter is recognised in
/// `tc filter show` and by `tc filter del dev IF ingress pref 1 handle 0xd7a1 bpf`.
pub const HANDLE: u32 = 0xd7a1;
/// The name drain gives its filter (TCA_BPF_NAME, shown by `tc filter show`): its program's.
pub const FILTER_NAME: &CStr = c"drain_tc";

/// The pinned map of a gate's clsact records, in its state directory: key ifindex, value
/// [`Record`]. Created by drain-user (not part of the eBPF object, which never reads it)
/// on the first clsact attachment.
pub const RECORDS: &str = "DRAIN_CLSACT";
/// At most this many interfaces attached through clsact in one gate.
const MAX_RECORDS: u32 = 4096;

/// Makes drain behave as on a kernel without TCX: `--attach tc` takes the clsact path.
/// Not an option: it lets the tests run the classic path on a kernel that has TCX.
pub const NO_TCX_ENV: &str = "DRAIN_NO_TCX";

/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)`: clsact's ingress ("ffff:fff2").
const PARENT_INGRESS: u32 = 0xffff_fff2;
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS)`: clsact's egress ("ffff:fff3").
const PARENT_EGRESS: u32 = 0xffff_fff3;
/// TC_H_INGRESS: where the clsact (or ingress) qdisc hangs.
const TC_H_INGRESS: u32 = 0xffff_fff1;
/// The clsact qdisc's own handle ("ffff:").
const CLSACT_HANDLE: u32 = 0xffff_0000;
/// ETH_P_ALL in network byte order, as tcm_info carries a filter's protocol.
const PROTO_ALL: u16 = 0x0003u16.to_be();

const RTM_NEWQDISC: u16 = 36;
const RTM_DELQDISC: u16 = 37;
const RTM_GETQDISC: u16 = 38;
const RTM_NEWTFILTER: u16 = 44;
const RTM_DELTFILTER: u16 = 45;
const RTM_GETTFILTER: u16 = 46;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_CHAIN: u16 = 11;
const TCA_BPF_FD: u16 = 6;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_FLAGS: u16 = 8;
const TCA_BPF_ID: u16 = 11;
const TCA_BPF_FLAG_ACT_DIRECT: u32 = 1;

/// One clsact attachment of a gate, as recorded when it was made.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Record {
    pub ifindex: u32,
    /// The program the filter was made with (its id, for as long as the kernel has it).
    pub prog_id: u32,
    pub handle: u32,
    pub priority: u16,
    /// 1 when drain added the clsact qdisc (and so removes it once it is empty).
    pub created_qdisc: u8,
    pub _pad: u8,
    /// The interface's name then, NUL-padded (IFNAMSIZ).
    pub ifname: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<Record>() == 32);
// SAFETY: repr(C), no implicit padding (bytemuck's derive checks), every bit pattern valid.
unsafe impl aya::Pod for Record {}

impl Record {
    pub fn name(&self) -> String {
        let end = self.ifname.iter().position(|&b| b == 0).unwrap_or(16);
        String::from_utf8_lossy(&self.ifname[..end]).into_owned()
    }
}

/// True when the running kernel has TCX (a TCX link to no interface fails with ENODEV
/// there, EINVAL where the attach type is unknown), unless [`NO_TCX_ENV`] says to behave as
/// on a kernel without it. Any other answer is an error: drain never falls back to clsact
/// on a kernel that may have TCX.
pub fn tcx_available() -> Result<bool> {
    if std::env::var_os(NO_TCX_ENV).is_some() {
        return Ok(false);
    }
    match crate::sys::tcx_link_probe() {
        Ok(v) => Ok(v),
        Err(e) => Err(anyhow!(e)
            .context("probing for TCX (BPF_LINK_CREATE of a trivial program for tcx_ingress)")),
    }
}

// ---------------------------------------------------------------------------------------
// The record map
// ---------------------------------------------------------------------------------------

/// The records of the gate in `dir`; empty when it has none.
pub fn records(dir: &Path) -> Result<Vec<Record>> {
    let path = dir.join(RECORDS);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let map = open(dir)?;
    let mut out: Vec<Record> = map.iter().filter_map(|r| r.ok().map(|(_, v)| v)).collect();
    out.sort_by_key(|r| r.ifindex);
    Ok(out)
}

fn open(dir: &Path) -> Result<BpfHashMap<MapData, u32, Record>> {
    let path = dir.join(RECORDS);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening the clsact records {}", path.display()))?;
    BpfHashMap::try_from(Map::HashMap(data))
        .with_context(|| format!("{} is not drain's clsact record map", path.display()))
}

/// Opens the record map of the gate in `dir`, creating and pinning it if it is missing.
fn open_or_create(dir: &Path) -> Result<BpfHashMap<MapData, u32, Record>> {
    let path = dir.join(RECORDS);
    if !path.exists() {
        let fd = sys::hash_map_create(RECORDS, std::mem::size_of::<Record>() as u32, MAX_RECORDS)
            .context("creating the clsact record map")?;
        let data = MapData::from_fd(fd).context("opening the new clsact record map")?;
        data.pin(&path)
            .with_context(|| format!("pinning the clsact record map at {}", path.display()))?;
    }
    open(dir)
}

fn save(dir: &Path, rec: &Record) -> Result<()> {
    open_or_create(dir)?
        .insert(rec.ifindex, *rec, 0)
        .context("writing the clsact record")
}

/// Forgets the record of `ifindex` (the filter is not touched).
pub fn forget(dir: &Path, ifindex: u32) -> Result<()> {
    match open(dir)?.remove(&ifindex) {
        Ok(()) => Ok(()),
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(e).context("removing the clsact record"),
    }
}

// ---------------------------------------------------------------------------------------
// The kernel's view
// ---------------------------------------------------------------------------------------

/// One filter on a clsact hook, as the kernel dumps it. A dump also lists each priority's
/// filter list itself, with handle 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub priority: u16,
    /// Network byte order, as in tcm_info.
    pub protocol: u16,
    pub handle: u32,
    pub chain: u32,
    pub kind: String,
    /// cls_bpf: the program's id and the filter's name.
    pub prog_id: Option<u32>,
    pub name: Option<String>,
}

impl Filter {
    /// "NAME, id N (bpf, pref P)" or "KIND (pref P)": for status and check.
    pub fn describe(&self) -> String {
        match self.prog_id {
            Some(id) => format!(
                "{} (bpf, pref {} handle {:#x})",
                crate::iface::program_name(id),
                self.priority,
                self.handle
            ),
            None => format!("{} filter (pref {})", self.kind, self.priority),
        }
    }

    fn is_drains(&self, rec: &Record) -> bool {
        self.priority == rec.priority
            && self.handle == rec.handle
            && self.chain == 0
            && self.prog_id == Some(rec.prog_id)
    }
}

/// The filters on the clsact ingress of `ifindex` (empty without a clsact qdisc or device),
/// each with its handle; the per-priority entries (handle 0) left out.
pub fn ingress_filters(ifindex: u32) -> Result<Vec<Filter>> {
    Ok(dump_filters(ifindex, PARENT_INGRESS)?
        .into_iter()
        .filter(|f| f.handle != 0)
        .collect())
}

fn dump_filters(ifindex: u32, parent: u32) -> Result<Vec<Filter>> {
    let mut out = Vec::new();
    let req = RawTc::new(RTM_GETTFILTER, ifindex, 0, parent, 0);
    netlink::dump(NETLINK_ROUTE, req, "RTM_GETTFILTER", |m: RawTc| {
        if m.msg_type == RTM_NEWTFILTER && m.ifindex == ifindex as i32 {
            out.push(m.filter());
        }
    })?;
    Ok(out)
}

/// The qdisc at TC_H_INGRESS of each interface that has one: (ifindex, kind: "clsact" or
/// "ingress"). One dump for every interface of the namespace.
pub fn ingress_qdiscs() -> Result<Vec<(u32, String)>> {
    let mut out = Vec::new();
    let req = RawTc::new(RTM_GETQDISC, 0, 0, 0, 0);
    netlink::dump(NETLINK_ROUTE, req, "RTM_GETQDISC", |m: RawTc| {
        if m.msg_type == RTM_NEWQDISC && m.parent == TC_H_INGRESS {
            out.push((m.ifindex as u32, m.kind().unwrap_or_default()));
        }
    })?;
    Ok(out)
}

fn ingress_qdisc(ifindex: u32) -> Result<Option<String>> {
    Ok(ingress_qdiscs()?
        .into_iter()
        .find(|(i, _)| *i == ifindex)
        .map(|(_, k)| k))
}

/// The kernel's view of one record: [`LinkState::Attached`] when the interface's clsact
/// ingress has drain's filter, at the recorded slot, running the recorded program, which is
/// drain's; [`LinkState::Foreign`] when that slot holds another program; else
/// [`LinkState::Detached`] (filter or qdisc deleted, interface deleted or moved away).
pub fn inspect(rec: &Record, ifaces: &[Iface]) -> LinkState {
    if !ifaces.iter().any(|i| i.index == rec.ifindex) {
        return LinkState::Detached;
    }
    let Ok(filters) = ingress_filters(rec.ifindex) else {
        // No answer is no proof that the filter is there.
        return LinkState::Detached;
    };
    if filters
        .iter()
        .any(|f| f.is_drains(rec) && crate::links::program_is(rec.prog_id, prog::TC))
    {
        LinkState::Attached
    } else if filters
        .iter()
        .any(|f| f.priority == rec.priority && f.handle == rec.handle && f.chain == 0)
    {
        LinkState::Foreign
    } else {
        LinkState::Detached
    }
}

/// True when no filter can be running the record's program any more: the kernel has no
/// program with its id that is drain's (the filters held the program's last references).
/// For the reaper, which cannot look into a namespace that is gone.
pub fn program_gone(rec: &Record) -> bool {
    !crate::links::program_is(rec.prog_id, prog::TC)
}

// ---------------------------------------------------------------------------------------
// Changes
// ---------------------------------------------------------------------------------------

/// Attaches the loaded TC program `prog` (id `prog_id`) to `iface`'s clsact ingress as
/// drain's filter, adding the clsact qdisc first if the interface has none, and records it
/// in the gate's state directory `dir`. `inherited`: a record of an earlier filter here
/// said drain had created the qdisc, which is still there. On any failure, what this call
/// added is removed again.
///
/// The record is written first: a call killed part way leaves a record of at most what
/// exists (judged detached, or a qdisc drain made and `gate off` removes), never a filter
/// no record knows.
pub fn attach(
    dir: &Path,
    iface: &Iface,
    prog: BorrowedFd<'_>,
    prog_id: u32,
    inherited: bool,
) -> Result<Record> {
    if let Some(why) = blocker(iface)? {
        bail!("{why}");
    }
    let need_qdisc = ingress_qdisc(iface.index)?.is_none();
    let mut ifname = [0u8; 16];
    let n = iface.name.len().min(15);
    ifname[..n].copy_from_slice(&iface.name.as_bytes()[..n]);
    let mut rec = Record {
        ifindex: iface.index,
        prog_id,
        handle: HANDLE,
        priority: PRIORITY,
        created_qdisc: u8::from(need_qdisc || inherited),
        _pad: 0,
        ifname,
    };
    save(dir, &rec)?;
    let mut created = false;
    let result = (|| {
        if need_qdisc {
            match add_qdisc(iface.index) {
                Ok(()) => created = true,
                // Another tool added one since: it is theirs.
                Err(e) if io_errno(&e) == Some(libc::EEXIST) => {
                    rec.created_qdisc = u8::from(inherited);
                    save(dir, &rec)?;
                }
                Err(e) => {
                    return Err(e.context(format!(
                        "adding the clsact qdisc to {} (needs the sch_ingress module)",
                        iface.name
                    )))
                }
            }
        }
        check_slot(iface)?;
        add_filter(iface.index, prog).map_err(|e| slot_error(e, iface))?;
        Ok(rec)
    })();
    if result.is_err() {
        if created {
            let _ = remove_qdisc_if_empty(iface.index);
        }
        let _ = forget(dir, iface.index);
    }
    result
}

/// What keeps drain's filter off `iface`'s ingress, as the one line `gate on` stops with
/// before it changes anything (and `check` reports): a qdisc at ingress other than clsact,
/// or a filter at priority 1 that drain's cannot share ([`unshareable`]). `None`: nothing.
pub fn blocker(iface: &Iface) -> Result<Option<String>> {
    Ok(match ingress_qdisc(iface.index)? {
        None => None,
        Some(kind) if kind == "clsact" => {
            unshareable(iface, &dump_filters(iface.index, PARENT_INGRESS)?)
        }
        // The kernel would take drain's filter on the ingress qdisc's block too, but then
        // the gate would hang on another tool's qdisc of another kind, which that tool may
        // replace or delete as its own (and `status` would call it clsact): refused, as a
        // qdisc of any other kind is.
        Some(kind) if kind == "ingress" => Some(format!(
            "{0} has a plain ingress qdisc, and drain's --attach tc on a kernel without TCX \
             needs the clsact qdisc there, which cannot coexist with it: replace it (`tc \
             qdisc del dev {0} ingress; tc qdisc add dev {0} clsact`, then re-add its filters \
             with `tc filter add dev {0} ingress ...`), or use --attach xdp",
            iface.name
        )),
        Some(kind) => Some(format!(
            "{} has a {kind} qdisc at ingress, not clsact: drain cannot attach there; use \
             --attach xdp",
            iface.name
        )),
    })
}

/// A filter at priority 1 of another kind or protocol, which drain's cannot share (the
/// kernel would say EINVAL without naming it) and must not run after: the line that says
/// so.
fn unshareable(iface: &Iface, filters: &[Filter]) -> Option<String> {
    filters
        .iter()
        .find(|f| {
            f.priority == PRIORITY && f.chain == 0 && (f.kind != "bpf" || f.protocol != PROTO_ALL)
        })
        .map(|f| {
            format!(
                "priority {PRIORITY} of {}'s clsact ingress holds a {} filter (protocol \
                 {:#06x}) that drain's cannot share, and drain's filter must run first: move \
                 that filter to another priority, or use --attach xdp",
                iface.name,
                f.kind,
                u16::from_be(f.protocol)
            )
        })
}

/// Refuses a priority 1 that drain cannot share ([`unshareable`]; asked again here, after
/// the qdisc is there: another tool may have added such a filter since). A filter in drain's own slot
/// that runs drain's program and that no record knows (left by a call killed before this
/// version wrote its record first) is drain's and goes; anyone else's stays, and
/// [`add_filter`] then refuses.
fn check_slot(iface: &Iface) -> Result<()> {
    let filters = dump_filters(iface.index, PARENT_INGRESS)?;
    if filters.iter().any(|f| {
        f.priority == PRIORITY
            && f.handle == HANDLE
            && f.chain == 0
            && f.prog_id
                .is_some_and(|id| crate::links::program_is(id, prog::TC))
    }) {
        del_filter(iface.index)
            .with_context(|| format!("deleting a stray filter of drain's from {}", iface.name))?;
    }
    if let Some(why) = unshareable(iface, &filters) {
        bail!("{why}");
    }
    Ok(())
}

/// Names the fix for EEXIST: another filter already has drain's handle at priority 1.
fn slot_error(e: anyhow::Error, iface: &Iface) -> anyhow::Error {
    if io_errno(&e) == Some(libc::EEXIST) {
        return e.context(format!(
            "another filter holds drain's slot on {}'s clsact ingress (pref {PRIORITY} handle \
             {HANDLE:#x}): drain does not replace it; remove it (`tc filter del dev {} ingress \
             pref {PRIORITY} handle {HANDLE:#x} bpf`) or use --attach xdp",
            iface.name, iface.name
        ));
    }
    e.context(format!(
        "attaching drain's filter to {}'s clsact ingress (needs the cls_bpf module)",
        iface.name
    ))
}

fn io_errno(e: &anyhow::Error) -> Option<i32> {
    e.chain()
        .find_map(|c| c.downcast_ref::<std::io::Error>())
        .and_then(std::io::Error::raw_os_error)
}

/// Removes what the record says drain made, as far as it is still drain's: the filter at
/// its slot while it runs the recorded program, then the clsact qdisc if drain created it
/// and it is empty. The record itself stays (see [`forget`]).
pub fn detach(rec: &Record) -> Result<()> {
    let filters = ingress_filters(rec.ifindex)?;
    let mut ours = false;
    if filters.iter().any(|f| f.is_drains(rec)) {
        del_filter(rec.ifindex).with_context(|| {
            format!(
                "deleting drain's clsact filter from {} (ifindex {})",
                rec.name(),
                rec.ifindex
            )
        })?;
        ours = true;
    }
    if rec.created_qdisc != 0 && (ours || same_device(rec)) {
        remove_qdisc_if_empty(rec.ifindex)?;
    }
    Ok(())
}

/// True when this namespace's device at the record's ifindex has the recorded name: the
/// device drain made the qdisc on, not one that took the ifindex since (names and indexes
/// are both reusable, but together after a deletion this is the best evidence there is).
fn same_device(rec: &Record) -> bool {
    crate::iface::interfaces().is_ok_and(|all| {
        all.iter()
            .any(|i| i.index == rec.ifindex && i.name == rec.name())
    })
}

/// Deletes the clsact qdisc of `ifindex` if it has no filter left, ingress or egress.
fn remove_qdisc_if_empty(ifindex: u32) -> Result<()> {
    if ingress_qdisc(ifindex)?.as_deref() != Some("clsact") {
        return Ok(());
    }
    if !dump_filters(ifindex, PARENT_INGRESS)?.is_empty()
        || !dump_filters(ifindex, PARENT_EGRESS)?.is_empty()
    {
        return Ok(());
    }
    let req = RawTc::new(RTM_DELQDISC, ifindex, CLSACT_HANDLE, TC_H_INGRESS, 0)
        .attr(TCA_KIND, b"clsact\0");
    match netlink::request(NETLINK_ROUTE, req, 0, "RTM_DELQDISC (clsact)") {
        Ok(()) => Ok(()),
        // Gone already (another tool, or the device).
        Err(e)
            if matches!(
                io_errno(&e),
                Some(libc::ENOENT | libc::EINVAL | libc::ENODEV)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// RTM_NEWQDISC clsact, NLM_F_EXCL: fails with EEXIST if the interface has one.
pub fn add_qdisc(ifindex: u32) -> Result<()> {
    let req = RawTc::new(RTM_NEWQDISC, ifindex, CLSACT_HANDLE, TC_H_INGRESS, 0)
        .attr(TCA_KIND, b"clsact\0");
    netlink::request(
        NETLINK_ROUTE,
        req,
        NLM_F_CREATE | NLM_F_EXCL,
        "RTM_NEWQDISC (clsact)",
    )
}

/// RTM_NEWTFILTER: drain's direct-action cls_bpf filter at its slot, NLM_F_EXCL so that a
/// filter already there (someone else's) is never replaced.
pub fn add_filter(ifindex: u32, prog: BorrowedFd<'_>) -> Result<()> {
    let mut options = nla(TCA_BPF_FD, &prog.as_raw_fd().to_ne_bytes());
    options.extend(nla(TCA_BPF_NAME, FILTER_NAME.to_bytes_with_nul()));
    options.extend(nla(TCA_BPF_FLAGS, &TCA_BPF_FLAG_ACT_DIRECT.to_ne_bytes()));
    let req = RawTc::new(
        RTM_NEWTFILTER,
        ifindex,
        HANDLE,
        PARENT_INGRESS,
        filter_info(),
    )
    .attr(TCA_KIND, b"bpf\0")
    .attr(TCA_OPTIONS, &options);
    netlink::request(
        NETLINK_ROUTE,
        req,
        NLM_F_CREATE | NLM_F_EXCL,
        "RTM_NEWTFILTER (cls_bpf)",
    )
}

/// RTM_DELTFILTER of the filter at drain's slot (never handle 0, which would delete every
/// filter of the priority).
fn del_filter(ifindex: u32) -> Result<()> {
    let req = RawTc::new(
        RTM_DELTFILTER,
        ifindex,
        HANDLE,
        PARENT_INGRESS,
        filter_info(),
    )
    .attr(TCA_KIND, b"bpf\0");
    netlink::request(NETLINK_ROUTE, req, 0, "RTM_DELTFILTER (cls_bpf)")
}

/// tcm_info of a filter: priority in the upper half, protocol (network order) below.
fn filter_info() -> u32 {
    (u32::from(PRIORITY) << 16) | u32::from(PROTO_ALL)
}

// ---------------------------------------------------------------------------------------
// The wire format: a tcmsg and its attributes, read leniently
// ---------------------------------------------------------------------------------------

/// One tc message (struct tcmsg, then attributes). Parsed by hand, not with
/// netlink-packet-route's TcMessage: a dump lists other tools' filters too, and a filter
/// kind that crate cannot parse must not make `status` fail.
#[derive(Clone, Debug)]
struct RawTc {
    msg_type: u16,
    ifindex: i32,
    handle: u32,
    parent: u32,
    info: u32,
    attrs: Vec<u8>,
}

const TCMSG_LEN: usize = 20;

impl RawTc {
    fn new(msg_type: u16, ifindex: u32, handle: u32, parent: u32, info: u32) -> Self {
        RawTc {
            msg_type,
            ifindex: ifindex as i32,
            handle,
            parent,
            info,
            attrs: Vec::new(),
        }
    }

    fn attr(mut self, kind: u16, value: &[u8]) -> Self {
        self.attrs.extend(nla(kind, value));
        self
    }

    fn kind(&self) -> Option<String> {
        nlas(&self.attrs)
            .find(|(k, _)| *k == TCA_KIND)
            .map(|(_, v)| cstr(v))
    }

    fn filter(&self) -> Filter {
        let mut f = Filter {
            priority: (self.info >> 16) as u16,
            protocol: (self.info & 0xffff) as u16,
            handle: self.handle,
            chain: 0,
            kind: String::new(),
            prog_id: None,
            name: None,
        };
        for (k, v) in nlas(&self.attrs) {
            match k {
                TCA_KIND => f.kind = cstr(v),
                TCA_CHAIN => f.chain = u32_of(v).unwrap_or(0),
                TCA_OPTIONS => {
                    for (k, v) in nlas(v) {
                        match k {
                            TCA_BPF_ID => f.prog_id = u32_of(v),
                            TCA_BPF_NAME => f.name = Some(cstr(v)),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if f.kind != "bpf" {
            f.prog_id = None;
            f.name = None;
        }
        f
    }
}

impl NetlinkSerializable for RawTc {
    fn message_type(&self) -> u16 {
        self.msg_type
    }

    fn buffer_len(&self) -> usize {
        TCMSG_LEN + self.attrs.len()
    }

    fn serialize(&self, buf: &mut [u8]) {
        // struct tcmsg { u8 family; u8 pad1; u16 pad2; i32 ifindex; u32 handle;
        // u32 parent; u32 info; }
        buf[..4].fill(0);
        buf[4..8].copy_from_slice(&self.ifindex.to_ne_bytes());
        buf[8..12].copy_from_slice(&self.handle.to_ne_bytes());
        buf[12..16].copy_from_slice(&self.parent.to_ne_bytes());
        buf[16..20].copy_from_slice(&self.info.to_ne_bytes());
        buf[TCMSG_LEN..].copy_from_slice(&self.attrs);
    }
}

impl NetlinkDeserializable for RawTc {
    type Error = DecodeError;

    fn deserialize(header: &NetlinkHeader, payload: &[u8]) -> Result<Self, DecodeError> {
        if payload.len() < TCMSG_LEN {
            return Err(DecodeError::from("tc message shorter than struct tcmsg"));
        }
        let word = |i: usize| u32::from_ne_bytes(payload[i..i + 4].try_into().expect("4 bytes"));
        Ok(RawTc {
            msg_type: header.message_type,
            ifindex: word(4) as i32,
            handle: word(8),
            parent: word(12),
            info: word(16),
            attrs: payload[TCMSG_LEN..].to_vec(),
        })
    }
}

/// One netlink attribute: length, type, value, padding to 4 bytes.
fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = 4 + value.len();
    let mut v = Vec::with_capacity(len.next_multiple_of(4));
    v.extend((len as u16).to_ne_bytes());
    v.extend(kind.to_ne_bytes());
    v.extend(value);
    v.resize(len.next_multiple_of(4), 0);
    v
}

/// The attributes in `buf` as (type without the nested/byte-order flags, value); stops at
/// the first malformed one.
fn nlas(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            return None;
        }
        let value = &buf[4..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some((kind, value))
    })
}

fn cstr(v: &[u8]) -> String {
    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}

fn u32_of(v: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip() {
        let mut buf = nla(TCA_KIND, b"bpf\0");
        let mut opts = nla(TCA_BPF_ID, &42u32.to_ne_bytes());
        opts.extend(nla(TCA_BPF_NAME, b"drain_tc\0"));
        // The nested flag (0x8000) is masked off.
        buf.extend(nla(TCA_OPTIONS | 0x8000, &opts));
        buf.extend(nla(TCA_CHAIN, &0u32.to_ne_bytes()));
        let m = RawTc {
            msg_type: RTM_NEWTFILTER,
            ifindex: 3,
            handle: HANDLE,
            parent: PARENT_INGRESS,
            info: filter_info(),
            attrs: buf,
        };
        let f = m.filter();
        assert_eq!(f.priority, 1);
        assert_eq!(f.protocol, PROTO_ALL);
        assert_eq!(f.kind, "bpf");
        assert_eq!(f.prog_id, Some(42));
        assert_eq!(f.name.as_deref(), Some("drain_tc"));
        assert_eq!(nla(1, b"abc").len(), 8, "padded to 4 bytes");
        // A truncated attribute ends the walk instead of reading past the buffer.
        assert_eq!(nlas(&[8, 0, 1, 0, 1]).count(), 0);
    }
}

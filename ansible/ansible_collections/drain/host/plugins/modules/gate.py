#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: the drain authors
# SPDX-License-Identifier: MIT OR Apache-2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: gate
short_description: Take a host out of service without failing in-flight TCP requests (drain-user)
version_added: "0.1.0"
description:
  - Drives C(drain-user) on the managed host through its JSON output. C(drain-user) loads a
    kernel program (XDP or TC) that refuses B(new) TCP connections on chosen ports while every
    established connection keeps flowing, keeps exact per-port live counts, and opens the gate
    by itself when its TTL runs out, with no process left running.
  - O(state=closed) turns the gate on (C(drain-user gate on)), O(state=open) turns it off and
    removes every attachment and pin (C(drain-user gate off)).
  - O(state=drained) and O(state=idle) wait (C(drain-user wait --json)) until no connection is
    left on the ports, or until every connection left is idle, with a deadline
    (O(timeout)). The deadline is kept by C(drain-user) itself, which returns within
    milliseconds of the last close; the module adds no polling loop of its own.
  - Every parameter is validated before anything on the host changes; C(drain-user) checks
    them again and exits 2 (usage) without changing anything if one is still wrong.
author:
  - drain authors !UNKNOWN
requirements:
  - C(drain-user) on the managed host, run as root (or with CAP_BPF and CAP_NET_ADMIN).
  - Linux with BTF (C(/sys/kernel/btf/vmlinux)); kernel 6.6 or later for O(attach=tc).
options:
  state:
    description:
      - V(closed) refuses new connections to O(ports) (gate on).
      - V(open) accepts new connections again and removes the gate entirely (gate off).
      - V(drained) waits until no connection is left on the ports.
      - V(idle) waits until no connection is left, or every connection left has carried no
        data for O(idle) and has no unread, unsent or unacknowledged bytes (pooled
        keep-alive connections of a load balancer); a graceful server stop can then close
        them safely.
    type: str
    required: true
    choices: [closed, open, drained, idle]
  ports:
    description:
      - Local TCP ports.
      - For O(state=closed), the ports to gate (required; at most 64). Running V(closed) again
        replaces the gated port set.
      - For O(state=drained) and O(state=idle), the ports to wait for; default the gated ports.
    type: list
    elements: int
  ttl:
    description:
      - For O(state=closed). The kernel opens the gate by itself this long after the gate was
        last closed (or last renewed by a wait), even when nothing is left running to open it;
        a deploy that dies cannot leave the host dark.
      - A duration such as V(90s), V(15m), V(2h), V(1h30m); a bare number is seconds. V(none)
        disables the TTL (the gate then stays closed until O(state=open)).
    type: str
    default: 10m
  policy:
    description:
      - For O(state=closed). How a refused connection request is answered. V(drop) lets the
        client time out (it retries its SYN); V(reset) answers with a TCP RST so clients and
        load balancers see "connection refused" at once and retry another host.
    type: str
    choices: [drop, reset]
    default: drop
  rst_rate:
    description:
      - For O(state=closed). Most RSTs sent per second for the whole host with O(policy=reset);
        refusals beyond it are dropped.
      - C(drain-user status) does not report it, so a change of O(rst_rate) alone is applied
        but cannot be detected (see the notes).
    type: int
    default: 1000
  allow:
    description:
      - For O(state=closed). Source prefixes (IPv4 or IPv6 CIDR) whose new connections still
        pass while the gate is closed (monitoring, an admin network, a readiness check).
        A bare address means that one address (/32 or /128); host bits are cleared.
      - Running V(closed) again replaces the allowlist.
    type: list
    elements: str
    default: []
  interfaces:
    description:
      - For O(state=closed). Interfaces to gate. Default (empty list) every interface that is
        up, C(lo) included (local clients reach local servers through C(lo)).
      - Interfaces are only ever added to a closed gate. An interface gated earlier and not
        named now stays gated (the module warns); use O(state=open) first to narrow the set.
    type: list
    elements: str
    default: []
  attach:
    description:
      - For O(state=closed). Hook for interfaces attached by this run; interfaces already
        attached keep their hook. V(xdp) refuses an interface where another XDP program is
        attached, V(tc) gates at TCX ingress beside other programs, V(auto) picks XDP where
        the hook is free and TC elsewhere.
    type: str
    choices: [xdp, tc, auto]
    default: xdp
  timeout:
    description:
      - For O(state=drained) and O(state=idle). Give up after this long and fail, listing the
        connections left. Same duration syntax as O(ttl); V(none) waits without a deadline.
    type: str
    default: 5m
  idle:
    description:
      - For O(state=idle) (required there). How long every remaining connection must have
        carried no data, for example V(2s).
    type: str
  announce:
    description:
      - For O(state=closed). Tell the balancer first. C(drain-user agent) (the agent-check and
        HTTP health endpoint, see the collection README) answers C(drain) at once, and the
        kernel keeps accepting new connections for up to this long, then refuses them by
        itself. A O(state=drained) or O(state=idle) wait ends the announcement earlier as
        soon as no new connection request has reached the ports for O(quiet) (the balancer
        has stopped sending). Same duration syntax as O(ttl); must be shorter than O(ttl).
      - Unset, the gate refuses at once. A gate already refusing is not reopened.
    type: str
  quiet:
    description:
      - For O(state=closed) with O(announce). How long the ports must see no new connection
        request before the wait closes the gate early; longer than the balancer takes to act
        on the agent (its agent or health check interval).
    type: str
    default: 3s
  maint:
    description:
      - For O(state=closed). The agent answers C(maint) (HAProxy's maintenance mode) instead of
        C(drain).
    type: bool
    default: false
  agent_port:
    description:
      - For O(state=closed). The port C(drain-user agent) answers on (the C(drain-agent.socket)
        unit's); a O(ports) list that covers it is refused, since a gated agent could never
        tell the balancer anything.
    type: int
  binary:
    description:
      - Path of C(drain-user) on the managed host, or a command name looked up in C(PATH).
    type: path
    default: /usr/bin/drain-user
attributes:
  check_mode:
    description: Can run in check mode and return changed status prediction without modifying target.
    support: full
    details:
      - For O(state=closed) and O(state=open) the module compares the wanted state with
        C(drain-user status --json) and changes nothing.
      - For O(state=closed) it also runs the preflight C(drain-user check) with the requested
        ports, interfaces, attach mode and policy, returns it as RV(preflight), and fails when
        a gate could not work on the host.
      - For O(state=drained) and O(state=idle) it does not wait; it reports the live count
        now (a wait with a zero deadline, which does not renew the TTL; without a gate,
        drain-user counts with a tracker that lives only for that call).
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: none
  platform:
    description: Target OS/families that can be operated against.
    support: N/A
    platforms: posix
notes:
  - "What V(changed) means. O(state=closed): V(true) when the gate was open (or its TTL had run
    out), or when the gated ports, the policy, the allowlist, the gated interfaces or whether
    there is a TTL at all differ from the request. Re-running V(closed) with the same settings
    renews the TTL (the deadline moves to now + O(ttl)) and reports V(changed=false) with
    RV(ttl_renewed=true): a renewal keeps the host in the state it was asked for, it does not
    change it. A new TTL value is applied the same way and is also not a change, since
    C(drain-user status) reports the time left and not the TTL it was set with; O(rst_rate)
    is not reported either and is applied without counting as a change."
  - "O(state=open): V(true) when a gate existed (closed, or expired but still attached),
    V(false) when there was none."
  - "O(state=drained) and O(state=idle) always report V(changed=false): waiting changes
    nothing on the host. A wait renews the TTL of a closed gate while it runs."
  - "A closed gate on C(lo) also refuses the host's own new connections to the gated ports,
    a readiness check to C(localhost) included: allowlist its source (V(127.0.0.0/8) and
    V(::1/128) for C(localhost)) in O(allow), as the C(drain.host.rolling_deploy) role does."
  - The gate is per network namespace.
"""

EXAMPLES = r"""
- name: Stop taking new connections on 80 and 443 (the kernel reopens by itself after 15m)
  drain.host.gate:
    state: closed
    ports: [80, 443]
    ttl: 15m
    policy: reset
    allow: [10.0.0.0/8]

- name: Tell the balancer first (agent-check on port 9707), refuse within 10s at the latest
  drain.host.gate:
    state: closed
    ports: [80]
    announce: 10s
    quiet: 3s
    agent_port: 9707

- name: Let in-flight requests finish; pooled keep-alives count as done once idle
  drain.host.gate:
    state: idle
    idle: 2s
    timeout: 5m
  register: drain_wait

- name: Show how long the host took to drain
  ansible.builtin.debug:
    msg: "{{ drain_wait.wait_result }} after {{ drain_wait.waited }}s"

- name: Back in service
  drain.host.gate:
    state: open
"""

RETURN = r"""
preflight:
  description:
    - With O(state=closed) in check mode, the C(drain-user check --json) report for the
      requested ports, interfaces, attach mode and policy; the task fails when it says a
      gate cannot work on the host (its C(problem) names the first blocker).
  returned: check mode, state=closed
  type: dict
  sample:
    ok: true
    problem: null
    kernel: 6.18.44
status:
  description:
    - The C(drain-user status --json) object after the action (in check mode, the current
      one). Its C(gate) key is V(on) or V(off).
  returned: always
  type: dict
  sample:
    gate: "on"
    policy: drop
    expired: false
    ttl_remaining_ms: 899998
    interfaces:
      - {name: lo, ifindex: 1, attach: xdp, mode: generic, others: []}
    ports:
      - port: 80
        live_connections: 3
        syns_refused: 12
        syns_passed: 0
        syns_allowed: 0
        syns_expired: 0
        rst_sent: 0
        rst_limited: 0
    allow: [127.0.0.0/8]
    tracker: {added: 40, removed: 37, insert_failed: 0, read_failed: 0}
previous_status:
  description:
    - O(state=closed) and O(state=open). The status object before the action, with the
      counters the gate gathered (for O(state=open), how many connection requests it refused
      while it was closed, since the counters are gone afterwards).
  returned: when state is closed or open
  type: dict
  sample: {gate: "on", ports: [{port: 80, live_connections: 0, syns_refused: 37}]}
ttl_renewed:
  description:
    - O(state=closed) only. V(true) when the gate was already closed with the same settings
      and this run moved its deadline (in check mode, would move it).
  returned: when state is closed
  type: bool
  sample: true
differences:
  description:
    - O(state=closed) only. What differed from the request (empty when nothing did).
  returned: when state is closed
  type: list
  elements: str
  sample: ["gate was off", "ports [80] -> [80, 443]"]
closed_by:
  description:
    - When the wait began on an announced gate (O(announce)), how the announcement ended
      before the wait proper, V(quiet) (no new connection request for O(quiet), so the wait
      closed the gate) or V(delay) (the kernel closed it at the end of O(announce)).
  returned: when state is drained or idle and the gate was announced
  type: str
  sample: quiet
wait_result:
  description:
    - How the wait ended, V(drained), V(idle) or V(timeout). In check mode the result a wait
      with a zero deadline has now (V(timeout) there means "connections are still live").
  returned: when state is drained or idle
  type: str
  sample: idle
waited:
  description: Seconds the wait took, measured by C(drain-user) (0 in check mode).
  returned: when state is drained or idle
  type: float
  sample: 2.31
live:
  description: Live connections on the ports when the wait ended.
  returned: when state is drained or idle
  type: int
  sample: 0
leftovers:
  description: The connections still live when the deadline passed.
  returned: when wait_result is timeout
  type: list
  elements: dict
  sample:
    - {peer: "198.18.0.1:51234", port: 80, state: ESTABLISHED, unread_bytes: 0, unsent_bytes: 0, idle_ms: 1200}
events:
  description: Every JSON event C(drain-user wait --json) printed, in order.
  returned: when state is drained or idle
  type: list
  elements: dict
  sample:
    - {event: progress, elapsed_ms: 0, live: 3, ports: [{port: 80, live_connections: 3}]}
    - {event: idle, elapsed_ms: 2005, live: 3}
"""

import ipaddress
import json
import re
import socket

from ansible.module_utils.basic import AnsibleModule

MAX_PORTS = 64
MAX_PREFIXES_PER_FAMILY = 1024
MAX_RST_RATE = 10000000
# drain-user's own bound: a longer TTL would wrap its u64-nanosecond deadline.
MAX_TTL_SECONDS = 100 * 365 * 86400

# The units drain-user's duration parser (the humantime crate) accepts, in seconds.
UNITS = {}
for _names, _secs in (
    (("nanos", "nsec", "ns"), 1e-9),
    (("usec", "us", u"\u00b5s"), 1e-6),
    (("millis", "msec", "ms"), 1e-3),
    (("seconds", "second", "secs", "sec", "s"), 1),
    (("minutes", "minute", "min", "mins", "m"), 60),
    (("hours", "hour", "hr", "hrs", "h"), 3600),
    (("days", "day", "d"), 86400),
    (("weeks", "week", "wk", "wks", "w"), 604800),
    (("months", "month", "M"), 2630016),
    (("years", "year", "yr", "yrs", "y"), 31557600),
):
    for _n in _names:
        UNITS[_n] = _secs

DURATION_PART = re.compile(u"\\s*([0-9]+(?:\\.[0-9]+)?)\\s*([a-zA-Z\u00b5]+)\\s*")
EXIT_USAGE = 2
EXIT_TIMEOUT = 3


def parse_duration(name, value, allow_none):
    """(seconds or None, the string to pass to drain-user), or raise ValueError."""
    text = value.strip()
    if allow_none and text == "none":
        return None, "none"
    if re.match(r"^[0-9]+$", text):
        return float(text), text + "s"
    pos = 0
    total = 0.0
    while pos < len(text):
        m = DURATION_PART.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(
                "%s=%r is not a duration: use a number and a unit, e.g. 500ms, 90s, 15m, 2h%s"
                % (name, value, ", or none" if allow_none else "")
            )
        if m.group(2) not in UNITS:
            raise ValueError(
                "%s=%r: unknown time unit %r (use ms, s, m, h, d)" % (name, value, m.group(2))
            )
        total += float(m.group(1)) * UNITS[m.group(2)]
        pos = m.end()
    if not text:
        raise ValueError("%s is empty: give a duration such as 90s or 15m" % name)
    return total, text


def up_interfaces():
    """Names of the interfaces that are up in this network namespace (IFF_UP)."""
    import fcntl
    import struct

    siocgifflags = 0x8913
    iff_up = 0x1
    names = []
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _index, name in socket.if_nameindex():
            req = struct.pack("16sH14x", name.encode()[:15], 0)
            try:
                flags = struct.unpack("16sH14x", fcntl.ioctl(sock.fileno(), siocgifflags, req))[1]
            except OSError:
                continue
            if flags & iff_up:
                names.append(name)
    finally:
        sock.close()
    return names


class Gate(object):
    def __init__(self, module):
        self.module = module
        self.binary = self.find_binary(module.params["binary"])

    def find_binary(self, path):
        if "/" in path:
            import os

            if not (os.path.isfile(path) and os.access(path, os.X_OK)):
                self.module.fail_json(
                    msg="drain-user not found at %s: install it there or set binary=" % path
                )
            return path
        return self.module.get_bin_path(path, required=True)

    def run(self, args, check_rc=True):
        rc, out, err = self.module.run_command([self.binary] + args)
        if check_rc and rc != 0:
            self.fail(args, rc, out, err)
        return rc, out, err

    def fail(self, args, rc, out, err, **extra):
        what = "rejected the parameters (nothing on the host changed)" if rc == EXIT_USAGE else "failed"
        self.module.fail_json(
            msg="drain-user %s %s: %s" % (" ".join(args[:2]), what, (err or out).strip()),
            rc=rc,
            stdout=out,
            stderr=err,
            cmd=[self.binary] + args,
            **extra
        )

    def preflight(self, ports, interfaces, attach, policy):
        """drain-user check --json for the settings a gate on would use (check mode)."""
        args = ["check", "--json", "--port", ",".join(str(x) for x in ports), "--attach", attach, "--policy", policy]
        for name in interfaces:
            args += ["--iface", name]
        rc, out, err = self.run(args, check_rc=False)
        try:
            return json.loads(out)
        except ValueError:
            self.fail(args, rc, out, err)

    def status(self):
        _rc, out, err = self.run(["status", "--json"])
        try:
            return json.loads(out)
        except ValueError:
            self.module.fail_json(msg="drain-user status --json printed no JSON: %s" % (out or err))


def validate(module):
    """Check every parameter; return the normalised ones. Nothing on the host is touched."""
    p = module.params
    state = p["state"]
    norm = {}
    ports = p["ports"] or []
    for port in ports:
        if not 1 <= port <= 65535:
            module.fail_json(msg="ports: %d is not a TCP port (1-65535)" % port)
    norm["ports"] = sorted(set(ports))
    if len(norm["ports"]) > MAX_PORTS:
        module.fail_json(msg="ports: %d given, a gate holds at most %d" % (len(norm["ports"]), MAX_PORTS))
    try:
        if state == "closed":
            ttl_s, norm["ttl"] = parse_duration("ttl", p["ttl"], allow_none=True)
            if ttl_s is not None and ttl_s <= 0:
                raise ValueError("ttl=%r would open the gate at once: use a positive duration, or none" % p["ttl"])
            if ttl_s is not None and ttl_s > MAX_TTL_SECONDS:
                raise ValueError("ttl=%r is over 100 years: use none for no TTL" % p["ttl"])
            norm["has_ttl"] = ttl_s is not None
            if p["announce"] is not None:
                ann_s, norm["announce"] = parse_duration("announce", p["announce"], allow_none=False)
                if ann_s <= 0:
                    raise ValueError("announce=%r announces nothing: leave announce out to refuse at once" % p["announce"])
                if ttl_s is not None and ann_s >= ttl_s:
                    raise ValueError("announce=%r is not shorter than ttl=%r: the gate would never refuse" % (p["announce"], p["ttl"]))
                _q, norm["quiet"] = parse_duration("quiet", p["quiet"], allow_none=False)
            if p["agent_port"] is not None:
                if not 1 <= p["agent_port"] <= 65535:
                    raise ValueError("agent_port: %d is not a TCP port (1-65535)" % p["agent_port"])
                if p["agent_port"] in norm["ports"]:
                    raise ValueError(
                        "ports: %d is the drain agent's port (agent_port): gating it would cut the "
                        "balancer off from the agent; leave it out of ports" % p["agent_port"]
                    )
        if state in ("drained", "idle"):
            _t, norm["timeout"] = parse_duration("timeout", p["timeout"], allow_none=True)
        if p["idle"] is not None:
            _i, norm["idle"] = parse_duration("idle", p["idle"], allow_none=False)
    except ValueError as e:
        module.fail_json(msg=str(e))
    if not 1 <= p["rst_rate"] <= MAX_RST_RATE:
        module.fail_json(msg="rst_rate: %d is out of range (1-%d per second)" % (p["rst_rate"], MAX_RST_RATE))
    nets = []
    for a in p["allow"]:
        try:
            nets.append(ipaddress.ip_network(u"%s" % a.strip(), strict=False))
        except ValueError:
            module.fail_json(msg="allow: %r is not an IPv4 or IPv6 prefix (e.g. 10.0.0.0/8, fd00::/8)" % a)
    for family in (4, 6):
        if len([n for n in nets if n.version == family]) > MAX_PREFIXES_PER_FAMILY:
            module.fail_json(msg="allow: more than %d IPv%d prefixes" % (MAX_PREFIXES_PER_FAMILY, family))
    norm["allow"] = sorted(set(nets), key=lambda n: (n.version, n.network_address, n.prefixlen))
    if state == "closed" and p["interfaces"]:
        known = [name for _i, name in socket.if_nameindex()]
        for name in p["interfaces"]:
            if name not in known:
                module.fail_json(
                    msg="interfaces: no interface named %r in this network namespace (interfaces: %s)"
                    % (name, ", ".join(known))
                )
    return norm


def gate_exists(st):
    return st.get("tracker") is not None or bool(st.get("interfaces"))


def closed_differences(st, norm, wanted_ifaces):
    diffs = []
    if st.get("gate") != "on":
        diffs.append("gate was off (TTL had run out)" if st.get("expired") else "gate was off")
        return diffs
    have_ports = sorted(p["port"] for p in st.get("ports", []))
    if have_ports != norm["ports"]:
        diffs.append("ports %s -> %s" % (have_ports, norm["ports"]))
    if st.get("policy") != norm["policy"]:
        diffs.append("policy %s -> %s" % (st.get("policy"), norm["policy"]))
    have_allow = set(ipaddress.ip_network(a, strict=False) for a in st.get("allow", []))
    if have_allow != set(norm["allow"]):
        diffs.append(
            "allow %s -> %s" % (sorted(str(a) for a in have_allow), [str(a) for a in norm["allow"]])
        )
    have_ttl = st.get("ttl_remaining_ms") is not None
    if have_ttl != norm["has_ttl"]:
        diffs.append("ttl %s -> %s" % ("set" if have_ttl else "none", "set" if norm["has_ttl"] else "none"))
    attached = set(i["name"] for i in st.get("interfaces", []))
    missing = sorted(set(wanted_ifaces) - attached)
    if missing:
        diffs.append("interfaces to attach: %s" % ", ".join(missing))
    return diffs


def do_closed(module, gate, norm):
    p = module.params
    norm["policy"] = p["policy"]
    wanted_ifaces = p["interfaces"] or up_interfaces()
    before = gate.status()
    diffs = closed_differences(before, norm, wanted_ifaces)
    extra = sorted(set(i["name"] for i in before.get("interfaces", [])) - set(wanted_ifaces))
    if extra and before.get("gate") == "on":
        module.warn(
            "interfaces %s stay gated: a closed gate only gains interfaces (state=open first to narrow it)"
            % ", ".join(extra)
        )
    changed = bool(diffs)
    renewed = not changed
    if module.check_mode:
        preflight = gate.preflight(norm["ports"], p["interfaces"], p["attach"], p["policy"])
        if not preflight.get("ok"):
            module.fail_json(
                msg="drain-user check: a gate cannot work here: %s" % preflight.get("problem"),
                preflight=preflight,
                status=before,
            )
        module.exit_json(
            changed=changed, status=before, previous_status=before, differences=diffs, ttl_renewed=renewed,
            preflight=preflight,
        )
    args = ["gate", "on", "--port", ",".join(str(x) for x in norm["ports"]), "--ttl", norm["ttl"],
            "--policy", p["policy"], "--rst-rate", str(p["rst_rate"]), "--attach", p["attach"]]
    if norm.get("announce"):
        args += ["--announce", norm["announce"], "--quiet", norm["quiet"]]
    if p["maint"]:
        args += ["--maint"]
    if p["agent_port"] is not None:
        args += ["--agent-port", str(p["agent_port"])]
    for name in p["interfaces"]:
        args += ["--iface", name]
    for net in norm["allow"]:
        args += ["--allow", str(net)]
    _rc, out, _err = gate.run(args)
    after = gate.status()
    if after.get("gate") != "on":
        module.fail_json(msg="drain-user gate on succeeded but status says the gate is off", status=after, stdout=out)
    module.exit_json(
        changed=changed, status=after, previous_status=before, differences=diffs, ttl_renewed=renewed, stdout=out
    )


def do_open(module, gate):
    before = gate.status()
    changed = gate_exists(before)
    if module.check_mode or not changed:
        module.exit_json(changed=changed, status=before, previous_status=before)
    _rc, out, _err = gate.run(["gate", "off"])
    after = gate.status()
    if gate_exists(after):
        module.fail_json(msg="drain-user gate off succeeded but a gate is still there", status=after, stdout=out)
    module.exit_json(changed=True, status=after, previous_status=before, stdout=out)


def parse_events(out):
    events = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
    return events


def do_wait(module, gate, norm):
    p = module.params
    # check mode: a zero deadline reports the live count now, without waiting and without
    # renewing the TTL (drain-user checks the deadline before it renews).
    timeout = "0s" if module.check_mode else norm["timeout"]
    args = ["wait", "--json"]
    if norm["ports"]:
        args += ["--port", ",".join(str(x) for x in norm["ports"])]
    if timeout != "none":
        args += ["--timeout", timeout]
    if p["state"] == "idle":
        args += ["--idle", norm["idle"]]
    rc, out, err = gate.run(args, check_rc=False)
    events = parse_events(out)
    last = events[-1] if events else {}
    result = last.get("event")
    if rc not in (0, EXIT_TIMEOUT) or result not in ("drained", "idle", "timeout"):
        gate.fail(args, rc, out, err, events=events)
    st = gate.status()
    ret = dict(
        changed=False,
        status=st,
        events=events,
        wait_result=result,
        waited=0.0 if module.check_mode else last.get("elapsed_ms", 0) / 1000.0,
        live=last.get("live", 0),
    )
    closed = [e for e in events if e.get("event") == "closed"]
    if closed:
        ret["closed_by"] = closed[0].get("reason")
    if result == "timeout":
        left = last.get("remaining", [])
        ret["leftovers"] = left
        if module.check_mode:
            ret["msg"] = "check mode: not waiting; %d live connection(s) now" % ret["live"]
            module.exit_json(**ret)
        lines = [
            "%s -> :%s %s (unread %s B, unsent %s B, quiet %s)"
            % (c.get("peer"), c.get("port"), c.get("state"), c.get("unread_bytes"), c.get("unsent_bytes"),
               "?" if c.get("idle_ms") is None else "%.1fs" % (c["idle_ms"] / 1000.0))
            for c in left
        ]
        module.fail_json(
            msg="timed out after %s with %d live connection(s): %s"
            % (norm["timeout"], ret["live"], "; ".join(lines) or "(none listed)"),
            **ret
        )
    if err.strip():
        module.warn(err.strip())
    module.exit_json(**ret)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", required=True, choices=["closed", "open", "drained", "idle"]),
            ports=dict(type="list", elements="int"),
            ttl=dict(type="str", default="10m"),
            policy=dict(type="str", choices=["drop", "reset"], default="drop"),
            rst_rate=dict(type="int", default=1000),
            allow=dict(type="list", elements="str", default=[]),
            interfaces=dict(type="list", elements="str", default=[]),
            attach=dict(type="str", choices=["xdp", "tc", "auto"], default="xdp"),
            timeout=dict(type="str", default="5m"),
            idle=dict(type="str"),
            announce=dict(type="str"),
            quiet=dict(type="str", default="3s"),
            maint=dict(type="bool", default=False),
            agent_port=dict(type="int"),
            binary=dict(type="path", default="/usr/bin/drain-user"),
        ),
        required_if=[
            ("state", "closed", ["ports"]),
            ("state", "idle", ["idle"]),
        ],
        supports_check_mode=True,
    )
    norm = validate(module)
    if module.params["state"] == "closed" and not norm["ports"]:
        module.fail_json(msg="ports: state=closed needs at least one port")
    gate = Gate(module)
    state = module.params["state"]
    if state == "closed":
        do_closed(module, gate, norm)
    elif state == "open":
        do_open(module, gate)
    else:
        do_wait(module, gate, norm)


if __name__ == "__main__":
    main()

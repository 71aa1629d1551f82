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
  - Drives C(drain-user) on the managed host. C(drain-user) loads a kernel program (XDP or TC) that
    refuses B(new) TCP connections on chosen ports while established ones keep flowing, keeps exact
    per-port live counts, and opens the gate by itself when its TTL runs out.
  - O(state=closed) is C(drain-user gate on), O(state=open) C(drain-user gate off) (every attachment
    and pin removed). Both first ask C(drain-user) for its plan (C(--dry-run --json)), which gives
    C(changed) and RV(differences); check mode stops there.
  - O(state=drained) and O(state=idle) run C(drain-user wait --json), which returns within
    milliseconds of the last close, or fails at O(timeout) listing the connections left.
  - The module validates nothing itself. C(drain-user) checks every value (ports, durations, prefixes,
    interfaces, limits) before it changes anything; bad input fails the task with C(drain-user)'s own
    one-line error as C(msg) (exit code 2 as RV(rc)), and nothing on the host changes.
author: drain authors !UNKNOWN
requirements:
  - C(drain-user) on the managed host, run as root (or with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON).
options:
  state:
    description:
      - V(closed) refuses new connections to O(ports); V(open) removes the gate.
      - V(drained) waits until no connection is left on the ports; V(idle) also returns once every
        connection left has carried no data for O(idle) and has nothing unread, unsent or unacknowledged.
    type: str
    required: true
    choices: [closed, open, drained, idle]
  ports:
    description: V(closed) gates these ports (required; replaces the set); waits wait for them (default the gated ones).
    type: list
    elements: int
  ttl:
    description: C(--ttl) for V(closed). The kernel reopens by itself this long after, with no process alive (V(none) for none).
    type: str
    default: 10m
  policy:
    description: C(--policy) for V(closed). V(drop) lets clients retry their SYN; V(reset) refuses at once.
    type: str
    choices: [drop, reset]
    default: drop
  rst_rate:
    description: C(--rst-rate) for V(closed). Most RSTs per second for the host under V(reset).
    type: int
    default: 1000
  allow:
    description: C(--allow) for V(closed). CIDR prefixes (V(10.0.0.0/8), V(198.18.0.1/32)) still let in; replaces the list.
    type: list
    elements: str
    default: []
  interfaces:
    description: C(--iface) for V(closed). Default every interface that is up, C(lo) included; a gate only gains interfaces.
    type: list
    elements: str
    default: []
  attach:
    description: C(--attach) for V(closed). Hook for interfaces not attached yet. Unset, drain-user's own default V(auto)
      applies (TC on virtual devices, native XDP on a NIC that has it); each interface's C(reason) in RV(status) says why.
    type: str
    choices: [xdp, tc, auto]
  timeout:
    description: C(--timeout) for V(drained) and V(idle); V(none) waits without a deadline.
    type: str
    default: 5m
  idle:
    description: C(--idle) for V(idle) (required there), e.g. V(2s).
    type: str
  announce:
    description:
      - C(--announce) for V(closed). The agent answers C(drain) at once; the kernel accepts for up to this long,
        a wait closes the gate earlier once the ports saw no new connection for O(quiet).
    type: str
  quiet:
    description: C(--quiet) for V(closed) with O(announce).
    type: str
    default: 3s
  maint:
    description: C(--maint) for V(closed). The agent answers C(maint) instead of C(drain).
    type: bool
    default: false
  agent_port:
    description: C(--agent-port) for V(closed). The agent's port, which O(ports) may not cover.
    type: int
  binary:
    description: Path of C(drain-user) on the managed host, or a command name looked up in C(PATH).
    type: path
    default: /usr/bin/drain-user
attributes:
  check_mode:
    description: Can run in check mode and return changed status prediction without modifying target.
    support: full
    details:
      - V(closed) and V(open) return C(drain-user)'s plan (C(gate on/off --dry-run --json)), and V(closed)
        the preflight C(drain-user check --json) as RV(preflight), failing when it says a gate cannot
        work on the host.
      - V(drained) and V(idle) do not wait; they report the live count now (a wait with a zero deadline).
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: none
  platform:
    description: Target OS/families that can be operated against.
    support: N/A
    platforms: posix
notes:
  - "C(changed) is the plan's: V(closed) changes a gate that is not on, or whose ports, policy, allowlist, interfaces,
    TTL, RST rate, announcement or maint differ; the same settings only renew the TTL (RV(ttl_renewed)).
    V(open) changes any gate there is. Waits change nothing (they renew a closed gate's TTL while they run)."
  - A closed gate on C(lo) refuses the host's own new connections too (a readiness check to C(localhost));
    allowlist its source, as the C(drain.host.rolling_deploy) role does.
"""

EXAMPLES = r"""
- name: Stop taking new connections on 80 and 443 (the kernel reopens by itself after 15m)
  drain.host.gate: {state: closed, ports: [80, 443], ttl: 15m, policy: reset, allow: [10.0.0.0/8]}

- name: Let in-flight requests finish; pooled keep-alives count as done once idle
  drain.host.gate: {state: idle, idle: 2s, timeout: 5m}

- name: Back in service
  drain.host.gate: {state: open}
"""

RETURN = r"""
differences:
  description: The plan's settings that differ (C(field), C(before), C(after)); empty when none does.
  returned: when state is closed or open
  type: list
  elements: dict
  sample: [{field: ports, before: [80], after: [80, 443]}, {field: ttl_ms, before: 600000, after: 900000}]
ttl_renewed:
  description: V(closed) over a gate that is on with the same settings; its deadline moved (or would).
  returned: when state is closed or open
  type: bool
  sample: true
previous_status:
  description: C(drain-user status --json) before the action (with the counters a V(open) removes).
  returned: when state is closed or open
  type: dict
  sample: {gate: "on", ports: [{port: 80, live_connections: 0, syns_refused: 37}]}
status:
  description: C(drain-user status --json) after the action (in check mode, the current one).
  returned: always
  type: dict
  sample: {gate: "on", policy: drop, ttl_remaining_ms: 899998, ttl_ms: 900000, rst_rate: 1000,
           ports: [{port: 80, live_connections: 3, syns_refused: 12}], allow: [127.0.0.1/32]}
preflight:
  description: C(drain-user check --json) for the requested ports, interfaces, attach mode and policy.
  returned: check mode, state=closed
  type: dict
  sample: {ok: true, problem: null, kernel: 6.12.118}
stdout:
  description: What C(drain-user gate on) or C(gate off) printed.
  returned: when state is closed or open, not in check mode
  type: str
  sample: "gate on: new connections to port 80 are refused on lo (xdp generic); until ..."
wait_result:
  description: How the wait ended, V(drained), V(idle) or V(timeout) (check mode, V(timeout) means still live).
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
  description: The connections still live at the deadline (C(msg) lists them too).
  returned: when wait_result is timeout
  type: list
  elements: dict
  sample: [{peer: "198.18.0.1:51234", port: 80, state: ESTABLISHED, unread_bytes: 0, unsent_bytes: 0, idle_ms: 1200}]
closed_by:
  description: On an announced gate, how the announcement ended before the wait, V(quiet) or V(delay).
  returned: when state is drained or idle and the gate was announced
  type: str
  sample: quiet
events:
  description: Every JSON event C(drain-user wait --json) printed, in order.
  returned: when state is drained or idle
  type: list
  elements: dict
  sample: [{event: progress, elapsed_ms: 0, live: 3}, {event: idle, elapsed_ms: 2005, live: 3}]
rc:
  description: C(drain-user)'s exit code when it failed (2 is bad input; nothing on the host changed).
  returned: failure
  type: int
  sample: 2
"""

import json
import os

from ansible.module_utils.basic import AnsibleModule

EXIT_TIMEOUT = 3


class DrainUser:
    """Runs drain-user; every failure ends the task with drain-user's own error line."""

    def __init__(self, module):
        self.module, path = module, module.params["binary"]
        if "/" in path and not (os.path.isfile(path) and os.access(path, os.X_OK)):
            module.fail_json(msg=f"drain-user not found at {path}: install it there or set binary=")
        self.binary = path if "/" in path else module.get_bin_path(path, required=True)

    def run(self, args, ok=(0,)):
        rc, out, err = self.module.run_command([self.binary] + args)
        if rc not in ok:
            self.fail(args, rc, out, err)
        return rc, out, err

    def fail(self, args, rc, out, err, **extra):
        lines = (err or out).strip().splitlines()
        msg = lines[-1] if lines else f"drain-user exited {rc}"
        self.module.fail_json(msg=msg, rc=rc, stdout=out, stderr=err, cmd=[self.binary] + args, **extra)

    def json(self, args, ok=(0,)):
        _rc, out, err = self.run(args, ok)
        try:
            return json.loads(out)
        except ValueError:
            return self.fail(args, 1, out, err or "drain-user printed no JSON")


def gate_on_args(p):
    args = ["gate", "on", "--port", ",".join(str(x) for x in p["ports"] or []), "--ttl", p["ttl"],
            "--policy", p["policy"], "--rst-rate", str(p["rst_rate"])]
    args += ["--attach", p["attach"]] if p["attach"] is not None else []
    if p["announce"] is not None:
        args += ["--announce", p["announce"], "--quiet", p["quiet"]]
    if p["maint"]:
        args += ["--maint"]
    if p["agent_port"] is not None:
        args += ["--agent-port", str(p["agent_port"])]
    for name in p["interfaces"]:
        args += ["--iface", name]
    for net in p["allow"]:
        args += ["--allow", net]
    return args


def change(module, cli, args):
    """closed and open: the plan decides changed and check mode; then the command itself."""
    plan = cli.json(args + ["--dry-run", "--json"])
    ret = dict(changed=plan["changed"], differences=plan["differences"], ttl_renewed=plan["ttl_renewed"],
               previous_status=plan["status"], status=plan["status"])
    if module.check_mode:
        if args[1] == "on":
            p = module.params
            check = ["check", "--json", "--port", args[3], "--policy", p["policy"]]
            check += ["--attach", p["attach"]] if p["attach"] is not None else []
            for name in p["interfaces"]:
                check += ["--iface", name]
            ret["preflight"] = cli.json(check, ok=(0, 1))
            if not ret["preflight"].get("ok"):
                module.fail_json(msg=f"drain-user check: a gate cannot work here: {ret['preflight'].get('problem')}",
                                 **ret)
        module.exit_json(**ret)
    if args[1] == "on" or plan["changed"]:
        _rc, ret["stdout"], _err = cli.run(args)
    ret["status"] = cli.json(["status", "--json"])
    module.exit_json(**ret)


def wait(module, cli):
    p = module.params
    # Check mode: a zero deadline reports the live count now, without waiting or renewing the TTL.
    timeout = "0s" if module.check_mode else p["timeout"]
    args = ["wait", "--json"]
    if p["ports"]:
        args += ["--port", ",".join(str(x) for x in p["ports"])]
    if timeout != "none":
        args += ["--timeout", timeout]
    if p["state"] == "idle":
        args += ["--idle", p["idle"]]
    rc, out, err = cli.run(args, ok=(0, EXIT_TIMEOUT))
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    last = events[-1] if events else {}
    result = last.get("event")
    if result not in ("drained", "idle", "timeout") or (rc == EXIT_TIMEOUT) != (result == "timeout"):
        cli.fail(args, rc, out, err, events=events)
    ret = dict(changed=False, events=events, wait_result=result, live=last.get("live", 0),
               waited=0.0 if module.check_mode else last.get("elapsed_ms", 0) / 1000.0,
               status=cli.json(["status", "--json"]))
    for e in (e for e in events if e.get("event") == "closed"):
        ret.setdefault("closed_by", e.get("reason"))
    if result == "timeout":
        ret["leftovers"] = last.get("remaining", [])
        if module.check_mode:
            module.exit_json(msg=f"check mode: not waiting; {ret['live']} live connection(s) now", **ret)
        left = "; ".join(f"{c['peer']} -> :{c['port']} {c['state']} (unread {c['unread_bytes']} B, unsent "
                         f"{c['unsent_bytes']} B, quiet {'?' if c.get('idle_ms') is None else c['idle_ms'] / 1000.0}s)"
                         for c in ret["leftovers"])
        module.fail_json(msg=f"timed out after {p['timeout']} with {ret['live']} live connection(s): "
                             f"{left or '(none listed)'}", rc=rc, **ret)
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
            attach=dict(type="str", choices=["xdp", "tc", "auto"]),
            timeout=dict(type="str", default="5m"),
            idle=dict(type="str"),
            announce=dict(type="str"),
            quiet=dict(type="str", default="3s"),
            maint=dict(type="bool", default=False),
            agent_port=dict(type="int"),
            binary=dict(type="path", default="/usr/bin/drain-user"),
        ),
        required_if=[("state", "closed", ["ports"]), ("state", "idle", ["idle"])],
        supports_check_mode=True,
    )
    cli = DrainUser(module)
    state = module.params["state"]
    if state == "closed":
        change(module, cli, gate_on_args(module.params))
    elif state == "open":
        change(module, cli, ["gate", "off"])
    else:
        wait(module, cli)


if __name__ == "__main__":
    main()

# Copyright: the drain authors
# SPDX-License-Identifier: MIT OR Apache-2.0
"""drain.host.gate against what the real drain-user printed (fixtures/drain_user.json, made by
ansible/record-unit-fixtures.py): check mode, changed, differences, bad input and waits come
from the CLI's output, and the module never runs a command that changes the host when it
must not."""

from __future__ import annotations

import json
import os
import sys

import pytest

from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args
from ansible_collections.drain.host.plugins.modules import gate

with open(os.path.join(os.path.dirname(__file__), "fixtures", "drain_user.json"), encoding="utf-8") as f:
    CALLS = json.load(f)

CLOSE = {"state": "closed", "ports": [8080], "ttl": "2m"}


class Exited(Exception):
    pass


class Failed(Exception):
    pass


class FakeDrainUser:
    """run_command that answers each call with what the real drain-user printed for it."""

    def __init__(self, *names):
        self.answers = {tuple(CALLS[n]["args"]): CALLS[n] for n in names}
        self.ran = []

    def __call__(self, cmd, *_args, **_kwargs):
        args = tuple(cmd[1:])
        self.ran.append(list(args))
        if args not in self.answers:
            raise AssertionError(f"unexpected drain-user call: {args}")
        a = self.answers[args]
        return a["rc"], a["stdout"], a["stderr"]

    def changing_calls(self):
        """Calls that change the host: gate on/off without --dry-run."""
        return [a for a in self.ran if a[0] == "gate" and "--dry-run" not in a]


def run(monkeypatch, params, fake, check_mode=False):
    def exit_json(_module, **kwargs):
        raise Exited(kwargs)

    def fail_json(_module, **kwargs):
        raise Failed(kwargs)

    monkeypatch.setattr(basic.AnsibleModule, "exit_json", exit_json)
    monkeypatch.setattr(basic.AnsibleModule, "fail_json", fail_json)
    monkeypatch.setattr(basic.AnsibleModule, "run_command", fake)
    args = dict(params, binary=sys.executable, _ansible_check_mode=check_mode)
    with patch_module_args(args), pytest.raises((Exited, Failed)) as e:
        gate.main()
    return e.type is Failed, e.value.args[0]


def plan(name):
    return json.loads(CALLS[name]["stdout"])


def test_check_mode_close_reports_the_plan_and_changes_nothing(monkeypatch):
    fake = FakeDrainUser("plan_on_none", "check_ok")
    failed, r = run(monkeypatch, CLOSE, fake, check_mode=True)
    assert not failed
    assert r["changed"] is True
    assert r["differences"] == plan("plan_on_none")["differences"]
    assert r["differences"][0] == {"field": "gate", "before": "none", "after": "on"}
    assert r["status"]["gate"] == "off"
    assert r["preflight"]["ok"] is True
    assert fake.changing_calls() == []


def test_close_applies_and_returns_the_status_after(monkeypatch):
    fake = FakeDrainUser("plan_on_none", "gate_on", "status_on")
    failed, r = run(monkeypatch, CLOSE, fake)
    assert not failed
    assert (r["changed"], r["ttl_renewed"]) == (True, False)
    assert r["previous_status"]["gate"] == "off"
    assert r["status"]["gate"] == "on" and r["status"]["ttl_ms"] == 120000
    assert fake.changing_calls() == [CALLS["gate_on"]["args"]]
    # No attach option: no --attach, so drain-user's own default (auto) decides, and the status
    # says which hook it chose on each interface and why.
    assert "--attach" not in CALLS["gate_on"]["args"]
    lo = r["status"]["interfaces"][0]
    assert (lo["attach"], lo["requested"]) == ("tc", "auto")
    assert lo["reason"].startswith("virtual device (loopback)")


def test_the_same_settings_renew_the_ttl_without_a_change(monkeypatch):
    fake = FakeDrainUser("plan_on_same", "gate_on", "status_on")
    failed, r = run(monkeypatch, CLOSE, fake)
    assert not failed
    assert (r["changed"], r["ttl_renewed"], r["differences"]) == (False, True, [])
    assert fake.changing_calls() == [CALLS["gate_on"]["args"]]


@pytest.mark.parametrize("name, params, field, before, after", [
    ("plan_on_ttl", {"ttl": "3m"}, "ttl_ms", 120000, 180000),
    ("plan_on_rst_rate", {"rst_rate": 50}, "rst_rate", 1000, 50),
])
def test_a_new_ttl_or_rst_rate_is_a_change(monkeypatch, name, params, field, before, after):
    fake = FakeDrainUser(name, "check_ok")
    failed, r = run(monkeypatch, dict(CLOSE, **params), fake, check_mode=True)
    assert not failed
    assert r["changed"] is True
    assert r["differences"] == [{"field": field, "before": before, "after": after}]
    assert fake.changing_calls() == []


@pytest.mark.parametrize("name, params", [
    ("usage_ttl_zero", {"ttl": "0s"}),
    ("usage_port_zero", {"ports": [0]}),
    ("usage_iface", {"interfaces": ["nosuch0"]}),
    ("usage_host_bits", {"allow": ["198.18.7.9/16"]}),
])
@pytest.mark.parametrize("check_mode", [False, True])
def test_bad_input_fails_with_the_clis_own_line(monkeypatch, name, params, check_mode):
    fake = FakeDrainUser(name)
    failed, r = run(monkeypatch, dict(CLOSE, **params), fake, check_mode=check_mode)
    assert failed
    assert r["msg"] == CALLS[name]["stderr"].strip()
    assert r["msg"].startswith("drain-user: error: ") and "\n" not in r["msg"]
    assert r["rc"] == 2
    assert fake.changing_calls() == []


def test_open_in_check_mode_changes_nothing(monkeypatch):
    fake = FakeDrainUser("plan_off_on")
    failed, r = run(monkeypatch, {"state": "open"}, fake, check_mode=True)
    assert not failed
    assert r["changed"] is True
    assert r["differences"][0] == {"field": "gate", "before": "on", "after": "none"}
    assert fake.changing_calls() == []


def test_open(monkeypatch):
    fake = FakeDrainUser("plan_off_on", "gate_off", "status_off")
    failed, r = run(monkeypatch, {"state": "open"}, fake)
    assert not failed
    assert r["changed"] is True
    assert (r["previous_status"]["gate"], r["status"]["gate"]) == ("on", "off")
    assert fake.changing_calls() == [["gate", "off"]]


def test_open_without_a_gate_is_no_change(monkeypatch):
    fake = FakeDrainUser("plan_off_none", "status_none")
    failed, r = run(monkeypatch, {"state": "open"}, fake)
    assert not failed
    assert r["changed"] is False
    assert fake.changing_calls() == []


def test_wait_timeout_fails_listing_the_leftovers(monkeypatch):
    fake = FakeDrainUser("wait_timeout", "status_on")
    failed, r = run(monkeypatch, {"state": "drained", "ports": [8080], "timeout": "1s"}, fake)
    assert failed
    assert (r["wait_result"], r["live"], r["changed"], r["rc"]) == ("timeout", 1, False, 3)
    assert len(r["leftovers"]) == 1 and r["leftovers"][0]["state"] == "ESTABLISHED"
    assert r["msg"].startswith("timed out after 1s with 1 live connection(s): 127.0.0.1:")
    # What drain-user measured, in seconds (the recording's own figure, not a constant).
    last = json.loads(CALLS["wait_timeout"]["stdout"].splitlines()[-1])
    assert r["waited"] == last["elapsed_ms"] / 1000.0 and r["waited"] >= 1.0


def test_wait_idle(monkeypatch):
    fake = FakeDrainUser("wait_idle", "status_on")
    failed, r = run(monkeypatch, {"state": "idle", "ports": [8080], "idle": "1s", "timeout": "20s"}, fake)
    assert not failed
    assert (r["wait_result"], r["live"], r["changed"]) == ("idle", 1, False)
    assert [e["event"] for e in r["events"]] == ["progress", "idle"]


def test_wait_drained(monkeypatch):
    fake = FakeDrainUser("wait_drained", "status_on")
    failed, r = run(monkeypatch, {"state": "drained", "ports": [8081]}, fake)
    assert not failed
    assert (r["wait_result"], r["live"], r["changed"]) == ("drained", 0, False)


def test_wait_in_check_mode_does_not_wait(monkeypatch):
    fake = FakeDrainUser("wait_check", "status_on")
    failed, r = run(monkeypatch, {"state": "idle", "ports": [8080], "idle": "30s"}, fake, check_mode=True)
    assert not failed
    assert (r["wait_result"], r["waited"], r["live"], r["changed"]) == ("timeout", 0.0, 1, False)
    assert fake.ran[0] == CALLS["wait_check"]["args"]


def test_wait_without_ports_or_gate_is_the_clis_usage_error(monkeypatch):
    fake = FakeDrainUser("usage_wait_no_ports")
    failed, r = run(monkeypatch, {"state": "drained", "timeout": "0s"}, fake)
    assert failed
    assert r["rc"] == 2
    assert r["msg"] == CALLS["usage_wait_no_ports"]["stderr"].strip()

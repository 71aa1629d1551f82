#!/usr/bin/env python3
"""Records what the real drain-user prints for the calls drain.host.gate makes, into the
collection's unit-test fixtures (tests/unit/plugins/modules/fixtures/drain_user.json).

Run as root: ansible/record-unit-fixtures.py [path/to/drain-user]. Everything happens in a
network namespace of its own (loopback only), removed at the end, even on failure.
"""

import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BIN = sys.argv[1] if len(sys.argv) > 1 else os.path.join(REPO, "target/debug/drain-user")
OUT = os.path.join(HERE, "ansible_collections/drain/host/tests/unit/plugins/modules/fixtures/drain_user.json")
NS = f"drain-fixtures-{os.getpid()}"
ON = ["gate", "on", "--port", "8080", "--ttl", "2m", "--policy", "drop", "--rst-rate", "1000"]
PLAN = ["--dry-run", "--json"]
HOLD = ("import socket,time; s=socket.socket(); s.setsockopt(1,2,1); s.bind(('127.0.0.1',8080)); s.listen();"
        "c=socket.create_connection(('127.0.0.1',8080)); a,_=s.accept(); c.send(b'x'); a.recv(1); time.sleep(300)")


def main():
    calls = {}

    def record(name, args, want):
        p = subprocess.run(["nsenter", f"--net=/var/run/netns/{NS}", BIN] + args,
                           capture_output=True, text=True, check=False)
        assert p.returncode == want, f"{name}: {args} exited {p.returncode}, not {want}: {p.stderr}"
        calls[name] = {"args": args, "rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}

    subprocess.run(["ip", "netns", "add", NS], check=True)
    holder = None
    try:
        subprocess.run(["ip", "-n", NS, "link", "set", "lo", "up"], check=True)
        record("status_none", ["status", "--json"], 0)
        record("plan_on_none", ON + PLAN, 0)
        record("plan_off_none", ["gate", "off"] + PLAN, 0)
        record("check_ok", ["check", "--json", "--port", "8080", "--policy", "drop"], 0)
        bad_ttl = ON[:5] + ["0s"] + ON[6:]
        record("usage_ttl_zero", bad_ttl + PLAN, 2)
        record("usage_port_zero", ["gate", "on", "--port", "0"] + ON[4:] + PLAN, 2)
        record("usage_iface", ON + ["--iface", "nosuch0"] + PLAN, 2)
        record("usage_host_bits", ON + ["--allow", "198.18.7.9/16"] + PLAN, 2)
        record("usage_wait_no_ports", ["wait", "--json", "--timeout", "0s"], 2)
        record("wait_drained_no_gate", ["wait", "--json", "--port", "8081", "--timeout", "2s"], 0)
        holder = subprocess.Popen(["nsenter", f"--net=/var/run/netns/{NS}", "python3", "-c", HOLD])
        time.sleep(1)
        record("gate_on", ON, 0)
        record("status_on", ["status", "--json"], 0)
        record("plan_on_same", ON + PLAN, 0)
        record("plan_on_ttl", ON[:5] + ["3m"] + ON[6:] + PLAN, 0)
        record("plan_on_rst_rate", ON[:9] + ["50"] + ON[10:] + PLAN, 0)
        record("wait_timeout", ["wait", "--json", "--port", "8080", "--timeout", "1s"], 3)
        record("wait_check", ["wait", "--json", "--port", "8080", "--timeout", "0s", "--idle", "30s"], 3)
        record("wait_idle", ["wait", "--json", "--port", "8080", "--timeout", "20s", "--idle", "1s"], 0)
        record("wait_drained", ["wait", "--json", "--port", "8081", "--timeout", "5m"], 0)
        record("plan_off_on", ["gate", "off"] + PLAN, 0)
        record("gate_off", ["gate", "off"], 0)
        record("status_off", ["status", "--json"], 0)
    finally:
        if holder:
            holder.kill()
            holder.wait()
        subprocess.run(["nsenter", f"--net=/var/run/netns/{NS}", BIN, "gate", "off"], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", NS], check=False)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(calls, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"recorded {len(calls)} calls into {OUT}")


if __name__ == "__main__":
    main()

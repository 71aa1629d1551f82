#!/usr/bin/env bash
# Runs gate.yml (every state of drain.host.gate, with assertions) in a throwaway network
# namespace, as root. Usage: ansible/smoke/run.sh [path/to/drain-user]
# Needs ansible-playbook on PATH or ANSIBLE_VENV pointing at a venv that has it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
bin=${1:-$repo/target/debug/drain-user}
venv=${ANSIBLE_VENV:-}
playbook=ansible-playbook
py=python3
if [ -n "$venv" ]; then playbook=$venv/bin/ansible-playbook; py=$venv/bin/python3; fi
ns=drain-smoke-$$
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -n "${work:-}" ] && { kill "$(cat "$work/server.pid")" 2>/dev/null || true; rm -rf "$work"; }
    nsenter --net=/var/run/netns/$ns "$bin" gate off >/dev/null 2>&1 || true
    ip netns del "$ns" 2>/dev/null || true
}
trap cleanup EXIT
ip netns add "$ns"
ip -n "$ns" link set lo up
run() { nsenter --net=/var/run/netns/$ns "$@"; }
work=$(mktemp -d)
nsenter --net=/var/run/netns/$ns python3 "$here/keepalive.py" 8080 </dev/null >/dev/null 2>&1 &
echo $! >"$work/server.pid"
for _ in $(seq 50); do run bash -c 'exec 3<>/dev/tcp/127.0.0.1/8080' 2>/dev/null && break; sleep 0.1; done
# One keep-alive connection that predates the gate: one request, then open and quiet.
nsenter --net=/var/run/netns/$ns python3 "$here/keepalive.py" 8080 client </dev/null >/dev/null 2>&1 &
pids+=($!)
sleep 0.5
export ANSIBLE_COLLECTIONS_PATH=$repo/ansible ANSIBLE_LOCALHOST_WARNING=false \
    ANSIBLE_INVENTORY_UNPARSED_WARNING=false ANSIBLE_PYTHON_INTERPRETER=$py
play() { run "$playbook" -i localhost, -e drain_binary="$bin" -e work="$work" "$@"; }
gate() { run "$bin" status --json | $py -c 'import json,sys; print(json.load(sys.stdin)["gate"])'; }
client() {
    nsenter --net=/var/run/netns/$ns python3 "$here/keepalive.py" 8080 client </dev/null >/dev/null 2>&1 &
    pids+=($!)
    sleep 0.5
}

echo "=== module: every state"
play "$here/gate.yml"

echo "=== role: a whole cycle"
play "$here/role.yml"

echo "=== role: the wait times out before the stop: the rescue reopens and fails the play"
client
if play "$here/role.yml" -e scenario=wait_timeout -e drain_idle=1m >"$work/out" 2>&1; then
    cat "$work/out"; echo "FAIL: the play succeeded"; exit 1
fi
grep -E "fatal|rolling_deploy failed" "$work/out" | tail -2
grep -q "untouched, still serving the old version" "$work/out"
grep -q "Gate: reopened" "$work/out"
[ "$(gate)" = off ] || { echo "FAIL: the gate is not open"; exit 1; }

echo "=== role: the start fails after the stop: the gate stays closed until its TTL"
if play "$here/role.yml" -e scenario=start_fails >"$work/out" 2>&1; then
    cat "$work/out"; echo "FAIL: the play succeeded"; exit 1
fi
grep -E "rolling_deploy failed" "$work/out" | tail -1
grep -q "Gate: on, the kernel opens it by itself in 1[0-9][0-9]" "$work/out"
[ "$(gate)" = on ] || { echo "FAIL: the gate is not closed"; exit 1; }
echo "smoke: all passed"

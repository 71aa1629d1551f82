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
    nsenter --net=/var/run/netns/$ns "$bin" gate off >/dev/null 2>&1 || true
    ip netns del "$ns" 2>/dev/null || true
}
trap cleanup EXIT
ip netns add "$ns"
ip -n "$ns" link set lo up
run() { nsenter --net=/var/run/netns/$ns "$@"; }
nsenter --net=/var/run/netns/$ns python3 "$here/keepalive.py" 8080 </dev/null >/dev/null 2>&1 &
pids+=($!)
for _ in $(seq 50); do run bash -c 'exec 3<>/dev/tcp/127.0.0.1/8080' 2>/dev/null && break; sleep 0.1; done
# One keep-alive connection that predates the gate: one request, then open and quiet.
nsenter --net=/var/run/netns/$ns python3 "$here/keepalive.py" 8080 client </dev/null >/dev/null 2>&1 &
pids+=($!)
sleep 0.5
ANSIBLE_COLLECTIONS_PATH=$repo/ansible ANSIBLE_LOCALHOST_WARNING=false \
ANSIBLE_INVENTORY_UNPARSED_WARNING=false ANSIBLE_PYTHON_INTERPRETER=$py \
    run "$playbook" -i localhost, -e drain_binary="$bin" "$here/gate.yml"

#!/usr/bin/env bash
# Runs gate.yml (every state of drain.host.gate, with assertions) in a throwaway network
# namespace, as root. Usage: ansible/smoke/run.sh [path/to/drain-user]
# Needs ansible-playbook: from ANSIBLE_VENV, else the venv of ansible/lint.sh, else PATH.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
bin=${1:-$repo/target/debug/drain-user}
# Default: the venv ansible/lint.sh makes.
venv=${ANSIBLE_VENV:-}
[ -z "$venv" ] && [ -x "$repo/target/ansible-lint/bin/ansible-playbook" ] && venv=$repo/target/ansible-lint
[ -n "$venv" ] && venv=$(cd "$venv" && pwd)
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
play() { run "$playbook" -i "${inventory:-localhost,}" -e drain_binary="$bin" -e work="$work" "$@"; }
gate() { run "$bin" status --json | $py -c 'import json,sys; print(json.load(sys.stdin)["gate"])'; }
client() {
    nsenter --net=/var/run/netns/$ns python3 "$here/keepalive.py" 8080 client </dev/null >/dev/null 2>&1 &
    pids+=($!)
    sleep 0.5
}

# The first host failed in the role's own last rescue task (a rescue that succeeds would have
# cleared the failure) and the second was never touched.
rescued_then_failed() {
    grep -A15 "TASK \[drain.host.rolling_deploy : Stop the rollout\]" "$1" | grep -q "^fatal: \[first\]" ||
        { cat "$1"; echo "FAIL: the role's rescue did not end in a failure"; exit 1; }
    grep -Eq "^first +: .*failed=1 .*rescued=1" "$1" || { cat "$1"; echo "FAIL: recap of first"; exit 1; }
    ! grep -q "\[second\]" "$1" || { cat "$1"; echo "FAIL: the rollout went on to the next batch"; exit 1; }
}

echo "=== module: every state"
play "$here/gate.yml"

echo "=== role: a whole cycle"
play "$here/role.yml"

echo "=== role: a whole cycle that tells the balancer first (drain_announce)"
play "$here/role.yml" -e scenario=announce

echo "=== role: the wait times out before the stop: the rescue reopens and fails the play"
client
# Two names for this host, serial 1: the second batch must not start after the first fails.
inventory=first,second,
if play "$here/role.yml" -e scenario=wait_timeout -e drain_idle=1m >"$work/out" 2>&1; then
    cat "$work/out"; echo "FAIL: the play succeeded"; exit 1
fi
grep -E "rolling_deploy failed" "$work/out" | tail -1
rescued_then_failed "$work/out"
grep -q "untouched, still serving the old version" "$work/out"
grep -q "Gate: reopened" "$work/out"
[ "$(gate)" = off ] || { echo "FAIL: the gate is not open"; exit 1; }

echo "=== role: same, and the play does not stop by itself: the role's guard stops the next host"
client
inventory=first,second,third,
if play "$here/role.yml" -e scenario=wait_timeout -e drain_idle=1m -e smoke_max_fail=100 -e smoke_serial=2 \
    -e '{"noop": ["second"]}' >"$work/out" 2>&1; then
    cat "$work/out"; echo "FAIL: the play succeeded"; exit 1
fi
grep -A15 "TASK \[drain.host.rolling_deploy : Stop the rollout when a host of an earlier batch failed" "$work/out" |
    grep "^fatal: \[third\]" || { cat "$work/out"; echo "FAIL: the guard did not stop the next batch"; exit 1; }
grep -Eq "^second +: .*failed=0 .*rescued=0" "$work/out" || { cat "$work/out"; echo "FAIL: recap of second"; exit 1; }
grep -Eq "^third +: ok=1 +changed=0 .*failed=1 .*rescued=0" "$work/out" || { cat "$work/out"; echo "FAIL: third was touched (ok=1: only the argument check)"; exit 1; }
inventory=first,second,

echo "=== role: the start fails after the stop: the gate stays closed until its TTL"
if play "$here/role.yml" -e scenario=start_fails >"$work/out" 2>&1; then
    cat "$work/out"; echo "FAIL: the play succeeded"; exit 1
fi
grep -E "rolling_deploy failed" "$work/out" | tail -1
rescued_then_failed "$work/out"
# The TTL (2m) is still running (how much is left depends on how fast Ansible ran).
grep -qE "Gate: on, the kernel opens it by itself in [0-9]+(\.[0-9]+)?s" "$work/out"
[ "$(gate)" = on ] || { echo "FAIL: the gate is not closed"; exit 1; }
echo "smoke: all passed"

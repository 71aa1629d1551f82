#!/usr/bin/env bash
# Checks examples/systemd/nginx.service.d/drain.conf the way systemd will load it on a host:
#   1. `systemd-analyze verify` of Debian's own nginx.service with the drop-in, with
#      drain-user present at /usr/bin/drain-user (an overlay on /usr/bin in a private mount
#      namespace: the host's /usr/bin is not touched). Any output, warnings included, fails.
#      The same for drain@.service (as drain@nginx.service, loaded by its unit name so that
#      the template is instantiated).
#   2. What verify cannot see: ExecStop= is reset before the drain steps, the steps come in
#      the order gate on -> wait -> the unit's own stop, ExecStartPost opens the gate, and
#      TimeoutStopSec exceeds the wait's deadline plus the graceful stop's 5 s.
#   3. The same for the container unit examples/docker/web-container.service (verify with
#      docker installed; order gate on -> wait -> docker stop, gate off after readiness).
# Usage (root, nginx and docker.io installed): examples/systemd/verify.sh [path/to/drain-user]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
bin=${1:-$repo/target/debug/drain-user}
unit=/usr/lib/systemd/system/nginx.service
dropin=$here/nginx.service.d/drain.conf
container_unit=$repo/examples/docker/web-container.service
[ -f "$unit" ] || { echo "verify: $unit is missing: apt-get install nginx" >&2; exit 2; }
[ -x "$bin" ] || { echo "verify: no drain-user at $bin: cargo xtask build" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/units/nginx.service.d" "$work/upper" "$work/ovl"
cp "$unit" "$work/units/"
cp "$dropin" "$work/units/nginx.service.d/"
cp "$here/drain@.service" "$work/units/"
cp "$container_unit" "$work/units/"
cp "$bin" "$work/upper/drain-user"
unshare --mount --propagation private bash -c '
    set -e
    mount -t overlay overlay -o "lowerdir=/usr/bin,upperdir=$1/upper,workdir=$1/ovl" /usr/bin
    /usr/bin/drain-user --version >/dev/null
    SYSTEMD_UNIT_PATH=$1/units: systemd-analyze verify "$1/units/nginx.service"
    SYSTEMD_UNIT_PATH=$1/units: systemd-analyze verify drain@nginx.service
    SYSTEMD_UNIT_PATH=$1/units: systemd-analyze verify "$1/units/web-container.service"
' _ "$work" >"$work/out" 2>&1 || { cat "$work/out"; echo "verify: systemd-analyze verify failed"; exit 1; }
if [ -s "$work/out" ]; then cat "$work/out"; echo "verify: systemd-analyze verify printed warnings"; exit 1; fi
echo "verify: systemd-analyze verify nginx.service + drain.conf, drain@nginx.service, web-container.service: clean"

python3 - "$dropin" <<'PY'
import re, sys

def seconds(v):
    total = 0.0
    for n, u in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|min|m|h)?", v):
        total += float(n) * {"ms": 0.001, "": 1, "s": 1, "min": 60, "m": 60, "h": 3600}[u]
    return total

lines = [l.strip() for l in open(sys.argv[1]) if l.strip() and not l.lstrip().startswith("#")]
env = dict(re.match(r"Environment=(\w+)=(.*)", l).groups() for l in lines if l.startswith("Environment="))
stops = [l.split("=", 1)[1] for l in lines if l.startswith("ExecStop=")]
problems = []
if not stops or stops[0] != "":
    problems.append("the first ExecStop= must be empty (reset): a drop-in's ExecStop= lines are appended after the unit's own stop")
steps = [s for s in stops if s]
if len(steps) < 3 or "gate on" not in steps[0] or " wait " not in steps[1] or "drain-user" in steps[-1]:
    problems.append("ExecStop order must be: drain-user gate on, drain-user wait, then the unit's own graceful stop")
if not any(l.startswith("ExecStartPost=") and "gate off" in l for l in lines):
    problems.append("ExecStartPost= must open the gate (drain-user gate off)")
timeout = [seconds(l.split("=", 1)[1]) for l in lines if l.startswith("TimeoutStopSec=")]
need = seconds(env.get("DRAIN_WAIT_TIMEOUT", "0")) + 5
if not timeout or timeout[-1] <= need:
    problems.append("TimeoutStopSec must exceed DRAIN_WAIT_TIMEOUT + 5 s (%.0f s): each ExecStop= command gets TimeoutStopSec" % need)
for p in problems:
    print("verify: " + p)
if problems:
    sys.exit(1)
print("verify: ExecStop reset, order gate on -> wait -> graceful stop, ExecStartPost gate off, TimeoutStopSec %.0f s > %.0f s" % (timeout[-1], need))
PY

python3 - "$container_unit" <<'PY'
import re, sys
lines = [l.strip() for l in open(sys.argv[1]) if l.strip() and not l.lstrip().startswith("#")]
stops = [l.split("=", 1)[1] for l in lines if l.startswith("ExecStop=")]
posts = [l.split("=", 1)[1] for l in lines if l.startswith("ExecStartPost=")]
problems = []
if len(stops) != 3 or "gate on" not in stops[0] or " wait " not in stops[1] or "docker stop" not in stops[2]:
    problems.append("container unit: ExecStop order must be: drain-user gate on, drain-user wait, docker stop")
if not posts or "gate off" not in posts[-1] or len(posts) < 2:
    problems.append("container unit: the last ExecStartPost= opens the gate, after a readiness step")
for p in problems:
    print("verify: " + p)
if problems:
    sys.exit(1)
print("verify: container unit: order gate on -> wait -> docker stop, readiness then gate off")
PY

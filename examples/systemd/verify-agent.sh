#!/usr/bin/env bash
# Checks examples/systemd/drain-agent.socket and drain-agent@.service the way systemd will
# load them on a host: `systemd-analyze verify` of the socket and of one instance of the
# service, with drain-user present at /usr/bin/drain-user (an overlay on /usr/bin in a
# private mount namespace: the host's /usr/bin is not touched). Any output fails. Then what
# verify cannot see: Accept=yes with a template service, and the ExecStart runs the agent.
# Usage (root): examples/systemd/verify-agent.sh [path/to/drain-user]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
bin=${1:-$repo/target/debug/drain-user}
[ -x "$bin" ] || { echo "verify-agent: no drain-user at $bin: cargo xtask build" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/units" "$work/upper" "$work/ovl"
cp "$here/drain-agent.socket" "$here/drain-agent@.service" "$work/units/"
cp "$bin" "$work/upper/drain-user"
unshare --mount --propagation private bash -c '
    set -e
    mount -t overlay overlay -o "lowerdir=/usr/bin,upperdir=$1/upper,workdir=$1/ovl" /usr/bin
    /usr/bin/drain-user agent --help >/dev/null
    cd "$1/units"
    SYSTEMD_UNIT_PATH=$1/units: systemd-analyze verify --man=no drain-agent.socket "drain-agent@0.service"
' _ "$work" >"$work/out" 2>&1 || { cat "$work/out"; echo "verify-agent: systemd-analyze verify failed"; exit 1; }
if [ -s "$work/out" ]; then cat "$work/out"; echo "verify-agent: systemd-analyze verify printed warnings"; exit 1; fi
grep -qx 'Accept=yes' "$here/drain-agent.socket" || { echo "verify-agent: the socket must use Accept=yes"; exit 1; }
grep -q '^ExecStart=/usr/bin/drain-user agent' "$here/drain-agent@.service" || { echo "verify-agent: ExecStart must run drain-user agent"; exit 1; }
echo "verify-agent: systemd-analyze verify --man=no drain-agent.socket + drain-agent@.service: clean"

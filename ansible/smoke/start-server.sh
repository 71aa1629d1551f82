#!/usr/bin/env bash
# The smoke test's "service start": keepalive.py on port 8080, pid in $1/server.pid; returns
# once it accepts connections (a connection from 127.0.0.1, which the role allowlisted).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
nohup python3 "$here/keepalive.py" 8080 </dev/null >/dev/null 2>&1 &
echo $! >"$1/server.pid"
for _ in $(seq 50); do
    (exec 3<>/dev/tcp/127.0.0.1/8080) 2>/dev/null && exit 0
    sleep 0.1
done
echo "the server did not come up on 127.0.0.1:8080" >&2
exit 1

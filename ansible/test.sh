#!/usr/bin/env bash
# Runs the drain.host collection's own tests: `ansible-test units` (the module's logic against
# drain-user output recorded by ansible/record-unit-fixtures.py) and `ansible-test
# integration` (the module against the real drain-user, in a network namespace the target
# makes and removes). As root. Usage: ansible/test.sh [path/to/drain-user]
# ansible-test comes with ansible-core: from ANSIBLE_VENV, else the venv ansible/lint.sh makes;
# `--requirements` installs the unit tests' pytest into that venv from PyPI.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
bin=$(realpath "${1:-$repo/target/debug/drain-user}")
venv=${ANSIBLE_VENV:-$repo/target/ansible-lint}
venv=$(cd "$venv" && pwd)
collection=$here/ansible_collections/drain/host
py=$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
export PATH=$venv/bin:$PATH ANSIBLE_HOME=$venv/ansible-home
config=$collection/tests/integration/integration_config.yml
cleanup() { rm -rf "$config" "$collection/tests/output"; }
trap cleanup EXIT
cd "$collection"
echo "test: ansible-test units (Python $py)"
ansible-test units --python "$py" --requirements --color no
printf 'drain_user: %s\n' "$bin" >"$config"
echo "test: ansible-test integration against $bin"
ansible-test integration --python "$py" --color no --allow-root gate
echo "test: the collection's tests passed"

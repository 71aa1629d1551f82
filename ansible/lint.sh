#!/usr/bin/env bash
# Lints the drain.host collection with the real tools, pinned: ansible-test sanity (every
# test: validate-modules, pep8, pylint, yamllint, ...) and ansible-lint (production profile),
# on the collection and on the smoke playbooks. Creates its virtualenv on first use.
#
#   ansible/lint.sh                       # venv in target/ansible-lint (DRAIN_LINT_VENV to move it)
#
# Needs python3 (3.11 or later, with venv) and PyPI. Nothing is written outside the venv
# directory except ansible-test's own per-test virtualenvs and pip bootstrap script under
# ~/.ansible/test/ (where ansible-test keeps them).
set -euo pipefail

ANSIBLE_CORE=2.19.14
ANSIBLE_LINT=26.10.1

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
venv=${DRAIN_LINT_VENV:-$repo/target/ansible-lint}
collection=$here/ansible_collections/drain/host
stamp="ansible-core==$ANSIBLE_CORE ansible-lint==$ANSIBLE_LINT"

if [ "$(cat "$venv/.pins" 2>/dev/null)" != "$stamp" ]; then
    echo "lint: creating $venv ($stamp)"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check $stamp
    echo "$stamp" >"$venv/.pins"
fi
py=$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

# ansible-test bootstraps pip in each per-test virtualenv with a script it would download
# from a host outside the package registries; an equivalent built from the standard
# library's ensurepip does the same job (pip then installs the pinned pip from PyPI).
getpip=$HOME/.ansible/test/cache/get_pip_24_2.py
if [ ! -s "$getpip" ]; then
    mkdir -p "$(dirname "$getpip")"
    cat >"$getpip" <<'EOF'
# Stand-in for ansible-test's pip bootstrap script: ensurepip, then install what was asked.
import subprocess
import sys

subprocess.check_call([sys.executable, "-m", "ensurepip", "--default-pip"], stdout=subprocess.DEVNULL)
args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
subprocess.check_call([sys.executable, "-m", "pip", "install"] + args)
EOF
fi

# ansible-lint installs the collection it lints into ANSIBLE_HOME: keep that in the venv.
export ANSIBLE_HOME=$venv/ansible-home
export ANSIBLE_COLLECTIONS_PATH=$here
export PATH=$venv/bin:$PATH

cd "$collection"
echo "lint: ansible-test sanity (ansible-core $ANSIBLE_CORE, Python $py)"
ansible-test sanity --python "$py" --color no
echo "lint: ansible-lint $ANSIBLE_LINT (collection)"
ansible-lint --nocolor --offline
echo "lint: ansible-lint $ANSIBLE_LINT (smoke playbooks)"
(cd "$here/smoke" && ansible-lint --nocolor --offline -c "$collection/.ansible-lint" gate.yml role.yml deploy.yml)
rm -rf "$collection/tests/output" "$collection/.ansible"
echo "lint: ansible clean"

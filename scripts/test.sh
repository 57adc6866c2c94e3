#!/usr/bin/env bash
# Sets the machine up (scripts/setup.sh) and runs every check and test tier:
# ruff, mypy strict, then unit, kernel and e2e tests, then the e2e tier again with one worker and
# the same-node bypass off. Must run as root; extra args go to pytest (then only that run).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/setup.sh"
venv=${NODEMESH_VENV:-$here/.venv}
cd "$here"
echo "test: ruff"; "$venv/bin/ruff" check .
echo "test: mypy --strict"; "$venv/bin/mypy"
echo "test: pytest (unit, kernel, e2e)"
if [ $# -gt 0 ]; then
  exec "$venv/bin/pytest" "$@"
fi
"$venv/bin/pytest"
# The e2e tier again with the data path's other shape: one data-plane worker per agent and the
# same-node bypass off (every same-node connection through the tunnel). The soak runs once.
echo "test: pytest e2e again (NODEMESH_WORKERS=1, NODEMESH_SAME_NODE_BYPASS=off)"
NODEMESH_WORKERS=1 NODEMESH_SAME_NODE_BYPASS=off \
  exec "$venv/bin/pytest" tests/e2e --ignore=tests/e2e/test_soak.py

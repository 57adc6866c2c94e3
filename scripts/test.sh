#!/usr/bin/env bash
# Sets the machine up (scripts/setup.sh) and runs every check and test tier:
# ruff, mypy strict, then unit, kernel and e2e tests. Must run as root; extra args go to pytest.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/setup.sh"
venv=${NODEMESH_VENV:-$here/.venv}
cd "$here"
echo "test: ruff"; "$venv/bin/ruff" check .
echo "test: mypy --strict"; "$venv/bin/mypy"
echo "test: pytest (unit, kernel, e2e)"
exec "$venv/bin/pytest" "$@"

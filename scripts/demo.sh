#!/usr/bin/env bash
# Sets the machine up (scripts/setup.sh) and runs the demo: a two-node mesh in network
# namespaces with the embedded CA and the sample policy. Extra args go to `nodemesh demo`
# (e.g. --keep to stay up and explore). Must run as root.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/setup.sh"
cd "$here"
exec "${NODEMESH_VENV:-$here/.venv}/bin/nodemesh" demo "$@"

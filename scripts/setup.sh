#!/usr/bin/env bash
# Idempotent machine setup for nodemesh on Debian 12 (bookworm), as root:
# apt packages, kernel-header links for BCC, bpffs, and a venv with Debian's bcc linked in.
# Re-running it is cheap: each step checks before it acts.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv=${NODEMESH_VENV:-$here/.venv}
python=${NODEMESH_PYTHON:-python3}
# python3-bpfcc: BCC 0.26; bpftool: listings in tests; iperf3: benchmarks; chromium and
# chromium-driver: the headless browser test of the admin flow map (Selenium drives it).
# kubernetes-client is deliberately absent: it conflicts with the preinstalled kubectl.
apt_packages=(python3-bpfcc bpftool linux-headers-amd64 iproute2 iperf3 chromium chromium-driver)

die() { echo "setup: $*" >&2; exit 1; }
step() { echo "setup: $*"; }

[ "$(id -u)" = 0 ] || die "must run as root (BPF, netns and cgroups need it): sudo $0"
command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian 12 only"

missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q || die "apt-get update failed: check the network/apt sources"
  apt-get install -y -q "${missing[@]}" || die "apt-get install ${missing[*]} failed (try: dpkg --configure -a)"
fi

# BCC compiles against /lib/modules/$(uname -r)/{build,source}. Kernels without their own headers
# (like these VMs) get Debian's newest headers: the networking UAPI structs are stable.
mods=/lib/modules/$(uname -r)
if [ ! -e "$mods/build/include" ]; then
  arch_dir=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
  common_dir=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)
  [ -n "$arch_dir" ] && [ -n "$common_dir" ] || die "no /usr/src/linux-headers-*: install linux-headers-amd64"
  step "linking $mods/build -> $arch_dir and source -> $common_dir"
  mkdir -p "$mods"
  ln -sfn "$arch_dir" "$mods/build"
  ln -sfn "$common_dir" "$mods/source"
fi

if ! grep -qs " /sys/fs/bpf bpf " /proc/mounts; then
  step "mounting bpffs at /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf || die "mount -t bpf failed: does the kernel have CONFIG_BPF_SYSCALL?"
fi
grep -qs " cgroup2 " /proc/mounts || die "no cgroup v2 mount found: nodemesh needs the unified hierarchy"

if [ ! -x "$venv/bin/python" ]; then
  step "creating venv $venv"
  "$python" -m venv "$venv" || die "python3 -m venv failed: install python3-venv"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# Only bcc is linked: the whole dist-packages would leak Debian's other modules into the venv.
if [ ! -e "$site/bcc" ]; then
  [ -d /usr/lib/python3/dist-packages/bcc ] || die "Debian's bcc module is missing: apt-get install python3-bpfcc"
  ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"
fi

# The editable install compiles the modules in setup.py's COMPILED with mypyc (extensions land next
# to their sources in ztunnel/). Reinstall when the build inputs changed since the last install
# or the wanted kind of build (compiled / pure) differs: an old extension would shadow an edited
# source (ztunnel/__init__.py refuses to import then).
stamp="$venv/.nodemesh-installed"
if [ "${NODEMESH_PURE_PYTHON:-}" = 1 ]; then build=pure; else build=compiled; fi
compiled=$("$python" - "$here/setup.py" <<'PY'
import ast, sys
tree = ast.parse(open(sys.argv[1]).read())
for node in tree.body:
    if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "COMPILED" for t in node.targets):
        print("\n".join(ast.literal_eval(node.value)))
PY
) || die "cannot read COMPILED from $here/setup.py"
stale=0
[ -f "$stamp" ] && [ "$(cat "$stamp")" = "$build" ] || stale=1
for f in pyproject.toml setup.py $compiled; do
  [ "$here/$f" -nt "$stamp" ] && stale=1
done
if [ "$stale" = 1 ]; then
  if [ "$build" = compiled ]; then
    cc=${CC:-$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("CC") or "cc")')}
    cc=${cc%% *}  # the compiler setuptools will run: $CC, else the one Python was built with
    inc=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    command -v "$cc" >/dev/null \
      || die "no C compiler ($cc) to compile the data path with mypyc: apt-get install gcc, or set NODEMESH_PURE_PYTHON=1 for a pure-Python install (slower per hop)"
    [ -f "$inc/Python.h" ] \
      || die "no Python headers ($inc/Python.h) to compile the data path with mypyc: apt-get install python3-dev (for a pyenv Python, its own include/), or set NODEMESH_PURE_PYTHON=1 for a pure-Python install (slower per hop)"
  fi
  step "installing nodemesh[dev] into $venv ($build data path)"
  # Old extensions go first: one left over from a module dropped from COMPILED would shadow it.
  rm -f "$here"/ztunnel/*.so
  "$venv/bin/pip" install -q --disable-pip-version-check -e "$here[dev,bench]" \
    || die "pip install failed: see the messages above (a failed mypyc compile: check the C compiler and Python headers, or set NODEMESH_PURE_PYTHON=1 for a pure-Python install)"
  echo "$build" > "$stamp"
fi
"$venv/bin/python" -c 'import bcc, pyroute2, agent, ztunnel' || die "venv imports failed"
step "ready: $venv (data path: $("$venv/bin/python" -c 'import ztunnel; print(ztunnel.data_path())'))"

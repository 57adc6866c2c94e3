"""`nodemesh uninstall`: remove the programs, links, maps and pin directories the agent left.

The agent never uninstalls on its own exit: its pinned links keep enforcing policy while it
restarts or upgrades. Removing nodemesh from a node is therefore an explicit step, run in the
agent's pod (`kubectl exec`) or by the cleanup DaemonSet in daemonset/uninstall/.
The removal itself lives in agent/datapath/uninstall.py, shared with `nodemesh testbed cleanup`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from agent.config import SETTINGS
from agent.datapath.bpfsys import BpfError
from agent.datapath.options import DEFAULT_PIN_ROOT
from agent.datapath.uninstall import UninstallError, check_on_bpffs, instances, uninstall

# The same variable `nodemesh run` reads, so `nodemesh uninstall` in the agent's pod (whose
# environment sets it) removes that agent's instance.
PIN_DIR_ENV = next(s.env for s in SETTINGS if s.name == "pin_dir")
DEFAULT_PIN_DIR = DEFAULT_PIN_ROOT / "default"

EPILOG = """examples:
  nodemesh uninstall                           the instance in $NODEMESH_PIN_DIR (or default)
  nodemesh uninstall --pin-dir /sys/fs/bpf/nodemesh/test-1
  nodemesh uninstall --all                     every instance under /sys/fs/bpf/nodemesh
"""


def _run(args: argparse.Namespace) -> int:
    if args.all:
        root: Path = args.pin_root
        check_on_bpffs(root)
        targets = instances(root)
    else:
        targets = [args.pin_dir or Path(os.environ.get(PIN_DIR_ENV) or DEFAULT_PIN_DIR)]
        check_on_bpffs(targets[0])
    removed_any = False
    for target in targets:
        if not target.exists():
            print(f"{target}: nothing pinned")
            continue
        removed = uninstall(target)
        removed_any = True
        print(f"{target}: removed {len(removed)} pins and the directory")
        for item in removed:
            print(f"  {item}")
    if args.all and root.is_dir() and not any(root.iterdir()):
        root.rmdir()
        print(f"{root}: removed (empty)")
    if args.all and not removed_any:
        print(f"{root}: no nodemesh instances")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except UninstallError as exc:
        print(f"nodemesh uninstall: {exc}", file=sys.stderr)
        return 2
    except BpfError as exc:
        print(f"nodemesh uninstall: {exc} (needs root with CAP_BPF and CAP_NET_ADMIN)",
              file=sys.stderr)
        return 1
    except PermissionError as exc:
        print(f"nodemesh uninstall: {exc} (run as root)", file=sys.stderr)
        return 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "uninstall", help="detach nodemesh's programs and remove its pinned maps and links",
        description="Remove every pinned link (detaching its program) and map nodemesh made, "
        "and the pin directory. Traffic of enrolled pods then flows unmeshed.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--pin-dir", type=Path, default=None,
                       help=f"one instance's pin directory [env {PIN_DIR_ENV}, default "
                       f"{DEFAULT_PIN_DIR}]")
    which.add_argument("--all", action="store_true",
                       help="every instance under the pin root")
    p.add_argument("--pin-root", type=Path, default=DEFAULT_PIN_ROOT,
                   help=f"where --all looks (default {DEFAULT_PIN_ROOT})")
    p.set_defaults(func=run)

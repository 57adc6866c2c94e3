"""`nodemesh testbed`: build, list and remove test-bed clusters from the command line."""

from __future__ import annotations

import argparse
import signal
import sys

from agent.host import signals
from agent.testbed import registry
from agent.testbed.cluster import Cluster


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("testbed", help="network-namespace test-bed clusters")
    tsub = p.add_subparsers(dest="testbed_command", metavar="ACTION", required=True)
    up = tsub.add_parser(
        "up", help="build a cluster that stays until `testbed down`",
        description="Build a cluster that stays until `testbed down`. SIGTERM or SIGINT while "
        "it is being built removes what was built so far (exit status 128+signal).")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--pods-per-node", type=int, default=2)
    up.set_defaults(func=_up)
    down = tsub.add_parser("down", help="remove one cluster")
    down.add_argument("run_id")
    down.set_defaults(func=_down)
    ls = tsub.add_parser("list", help="list clusters and leftovers on this machine")
    ls.set_defaults(func=_list)
    clean = tsub.add_parser("cleanup", help="remove leftovers of runs whose owner is gone")
    clean.add_argument("--all", action="store_true", help="also remove live and detached runs")
    clean.set_defaults(func=_cleanup)


def _up(args: argparse.Namespace) -> int:
    c = Cluster(
        nodes=args.nodes,
        pods_per_node=args.pods_per_node,
        detached=True,
        description="nodemesh testbed up",
    )
    with signals.interrupt_on_stop():
        try:
            c.up()  # a signal mid-build: up() removes the partial cluster, then re-raises
        except signals.Stopped as stop:
            print(f"nodemesh testbed up: stopped by {signal.Signals(stop.signum).name}; "
                  f"run {c.run_id} removed", file=sys.stderr)
            raise
    print("\n".join(c.describe()))
    print(f"remove with: nodemesh testbed down {c.run_id}")
    return 0


def _down(args: argparse.Namespace) -> int:
    removed = registry.teardown_run(args.run_id)
    if not removed:
        print(f"nothing found for run {args.run_id}", file=sys.stderr)
        return 1
    print("\n".join(f"removed {r}" for r in removed))
    return 0


def _list(_args: argparse.Namespace) -> int:
    runs = registry.discover()
    if not runs:
        print("no test-bed runs on this machine")
    for rid, rec in runs.items():
        if rec is None:
            state = "leftover (no state file)"
        elif rec.owner_pid == -1:
            state = "detached (testbed up)"
        else:
            state = f"live, owner pid {rec.owner_pid}" if rec.owner_alive() else "leftover"
        print(f"{rid}  {state}  {rec.description if rec else ''}")
    return 0


def _cleanup(args: argparse.Namespace) -> int:
    done = registry.cleanup(force=args.all)
    for rid, removed in done.items():
        print(f"run {rid}: removed {len(removed)} objects")
        for r in removed:
            print(f"  {r}")
    if not done:
        print("nothing to clean up")
    return 0

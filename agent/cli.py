"""The `nodemesh` command line. Each module of agent/commands registers its subcommands."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Protocol

from agent.commands import (
    datapath,
    demo,
    identity,
    policy,
    posture,
    run,
    telemetry,
    testbed,
)
from agent.host.signals import Stopped

Handler = Callable[[argparse.Namespace], int]


class _Registrar(Protocol):
    def register(self, sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None: ...


# Each provides `register(subparsers)`, adding its subcommands with a handler set as `func` (a
# callable taking the parsed namespace and returning an exit code). The order is the help's.
COMMANDS: tuple[_Registrar, ...] = (testbed, run, demo, telemetry, policy, identity, datapath,
                                   posture)


EPILOG = """examples:
  nodemesh demo                      run a local two-node mesh and show what it enforces
  nodemesh testbed up --nodes 2      build a test-bed cluster in network namespaces
  nodemesh testbed cleanup           remove leftovers of crashed test-bed runs
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nodemesh", description="Sidecarless service-mesh node agent (eBPF + HBONE).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    func: Handler | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return func(args)
    except Stopped as stop:  # SIGINT or SIGTERM, after the command's teardown ran
        return stop.exit_status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

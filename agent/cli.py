"""The `nodemesh` command line. Each area registers its own subcommands (see COMMANDS)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Protocol

from agent.host.signals import Stopped

# Modules that provide `register(subparsers)`; each adds its subcommands with a handler set as
# `func` (a callable taking the parsed namespace and returning an exit code).
COMMANDS = (
    "agent.testbed.cli",
    "agent.runtime.cli",
    "agent.runtime.demo",
    "agent.telemetry.cli",
    "agent.policy.cli",
    "agent.identity.cli",
    "agent.datapath.cli",
    "agent.posture.cli",
)

Handler = Callable[[argparse.Namespace], int]


class _Registrar(Protocol):
    def register(self, sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None: ...


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
    for name in COMMANDS:
        mod: _Registrar = importlib.import_module(name)
        mod.register(sub)
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

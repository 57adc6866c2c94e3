"""`nodemesh policy simulate`: what a proposed mesh configuration would change for recorded
traffic. Exit status: 0 nothing changes, 1 some connection's verdict changes, 2 bad input or any
other failure (so it can gate policy changes in CI)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, Final

from agent.analysis.simulate import FlowLogError, Simulation, simulate
from agent.commands.telemetry import parse_time
from agent.config import DEFAULT_ROOT_NAMESPACE
from agent.sources.file import MeshConfigError, load_path

EXIT_SAME, EXIT_CHANGED, EXIT_ERROR = 0, 1, 2
PROG: Final = "nodemesh policy simulate"

log = logging.getLogger(__name__)

EPILOG = """examples:
  nodemesh policy simulate --flows /var/log/nodemesh/flows.log --config proposed.yaml
  nodemesh policy simulate --flows flows.log.1 --flows flows.log --config mesh/ --since 2h --json
exit status: 0 no verdict changes, 1 some change (listed), 2 invalid input or other failure
"""


def register(psub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = psub.add_parser(
        "simulate", help="replay recorded flows against a proposed configuration",
        description="Replay the agent's JSON flow log through the reference evaluator with the "
                    "proposed mesh configuration and list the connections whose verdict would "
                    "change, grouped by source -> destination:port.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flows", required=True, action="append", type=Path, metavar="FLOWLOG",
                   help="flow log (JSON lines, schema nodemesh.flow/v2 or v1); repeat for several "
                        "nodes or rotated files")
    p.add_argument("--config", required=True, metavar="FILE|DIR",
                   help="the proposed mesh YAML file or directory")
    p.add_argument("--root-namespace", default=DEFAULT_ROOT_NAMESPACE,
                   help="namespace whose policies apply mesh-wide (default %(default)s)")
    p.add_argument("--since", type=parse_time, metavar="TIME",
                   help="only records at or after TIME (RFC 3339 or an age like 2h)")
    p.add_argument("--until", type=parse_time, metavar="TIME",
                   help="only records at or before TIME")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=_guarded)


def _guarded(args: argparse.Namespace) -> int:
    """Any failure exits 2: an uncaught exception would exit 1, which means "changes"."""
    try:
        return _simulate(args)
    except Exception as e:
        log.debug("policy simulate failed", exc_info=True)
        with contextlib.suppress(Exception):
            print(f"{PROG}: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR


def _simulate(args: argparse.Namespace) -> int:
    if args.since is not None and args.until is not None and args.until < args.since:
        print(f"{PROG}: --until is before --since", file=sys.stderr)
        return EXIT_ERROR
    try:
        state = load_path(args.config, args.root_namespace)
    except MeshConfigError as e:
        print(f"{PROG}: invalid configuration: {e}", file=sys.stderr)
        return EXIT_ERROR
    try:
        result = simulate(state, args.flows, args.since, args.until)
    except FlowLogError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_ERROR
    report = result.to_dict()
    report["config"] = str(args.config)
    report["flow_logs"] = [str(p) for p in args.flows]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render_text(result))
    return EXIT_CHANGED if result.changed else EXIT_SAME


def _decided(o: dict[str, Any]) -> str:
    if o["policy"] is None:
        return str(o["reason"])
    kind = f"{o['policy_kind']} " if o.get("policy_kind") else ""
    rule = f" rule {o['rule']}" if o["rule"] is not None else ""
    return f"{kind}{o['policy']}{rule}"


def render_text(sim: Simulation) -> str:
    r = sim.to_dict()
    n_changed = sum(c["count"] for c in (*r["newly_denied"], *r["newly_allowed"]))
    skipped = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in r["skipped"].items() if n)
    lines = [f"replayed {r['replayed']} of {r['records']} records"
             + (f" (skipped: {skipped})" if skipped else "")]
    if not sim.changed:
        lines.append("no connection's verdict changes")
    else:
        lines.append(f"{n_changed} connection(s) would change:")
    for title, rows in (("would be DENIED (allowed today)", r["newly_denied"]),
                        ("would be ALLOWED (denied today)", r["newly_allowed"])):
        if not rows:
            continue
        lines.append(f"\n{title}:")
        width = max(len(f"{c['source']} -> {c['destination']}:{c['port']}") for c in rows)
        for c in rows:
            conn = f"{c['source']} -> {c['destination']}:{c['port']}"
            decided = _decided(c["proposed"])
            lines.append(f"  {conn:<{width}}  {c['count']:>5}x  {decided}")
            if decided != c["proposed"]["reason"]:
                lines.append(f"  {'':<{width}}         {c['proposed']['reason']}")
            if c["today"]["policy"]:
                lines.append(f"  {'':<{width}}         today: denied by "
                             f"{_decided(c['today'])}")
    if r["unresolved"]:
        lines.append("\nnot replayed (destination not resolvable in the proposed configuration):")
        for u in r["unresolved"]:
            lines.append(f"  {u['source']} -> {u['destination']}:{u['port']}  {u['count']}x  "
                         f"{u['reason']}")
    return "\n".join(lines)

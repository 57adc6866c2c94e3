"""`nodemesh posture`: the security posture of a running agent or of a mesh file.

Exit status: 0 report written, 1 a finding at or above --fail-on, 2 invalid input or any other
failure."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

import aiohttp

from agent.analysis.simulate import FlowLogError, read_flow_log
from agent.commands.telemetry import DEFAULT_ADMIN, parse_time
from agent.config import DEFAULT_ROOT_NAMESPACE
from agent.posture import render
from agent.posture.certs import CertificateFileError, from_files
from agent.posture.checks import DEFAULT_CERT_WARNING, Inputs, Severity, build_report
from agent.sources.file import MeshConfigError, load_path

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2
PROG: Final = "nodemesh posture"
FORMATS: Final = ("text", "json", "markdown", "html")

log = logging.getLogger(__name__)

EPILOG = """examples:
  nodemesh posture                                  the agent on this node (admin endpoint)
  nodemesh posture --config mesh.yaml --certs /etc/nodemesh/ca
  nodemesh posture --format html -o audit.html      a self-contained page for an audit
  nodemesh posture --json --fail-on high            CI: exit 1 on any high or critical finding
"""


class PostureError(Exception):
    pass


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "posture", help="security posture report of the mesh (findings with severity and fix)",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--admin", metavar="HOST:PORT",
                       help=f"running agent's admin endpoint (default {DEFAULT_ADMIN})")
    where.add_argument("--config", metavar="FILE|DIR", help="a mesh YAML file or directory")
    p.add_argument("--root-namespace", default=DEFAULT_ROOT_NAMESPACE,
                   help="with --config: namespace of mesh-wide policy (default %(default)s)")
    p.add_argument("--certs", action="append", type=Path, default=[], metavar="PEM|DIR",
                   help="with --config: certificates to check (repeatable)")
    p.add_argument("--flows", action="append", type=Path, default=[], metavar="FLOWLOG",
                   help="with --config: flow log(s) for plaintext connections and denies")
    p.add_argument("--since", type=parse_time, metavar="TIME",
                   help="with --flows: only records at or after TIME (RFC 3339 or an age)")
    p.add_argument("--cert-warning", type=float, default=DEFAULT_CERT_WARNING.days,
                   metavar="DAYS", help="certificates expiring within DAYS are findings "
                                        "(default %(default)g)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--format", choices=FORMATS, default="text")
    out.add_argument("--json", action="store_const", const="json", dest="format",
                     help="same as --format json")
    p.add_argument("-o", "--output", type=Path, metavar="FILE", help="write to FILE, not stdout")
    p.add_argument("--fail-on", choices=[s.label for s in Severity], metavar="SEVERITY",
                   help="exit 1 if any finding is at least this severe")
    p.set_defaults(func=_guarded)


def _guarded(args: argparse.Namespace) -> int:
    try:
        return _posture(args)
    except PostureError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:
        log.debug("posture failed", exc_info=True)
        with contextlib.suppress(Exception):
            print(f"{PROG}: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR


def _from_config(args: argparse.Namespace) -> dict[str, Any]:
    try:
        state = load_path(args.config, args.root_namespace)
    except MeshConfigError as e:
        raise PostureError(f"invalid configuration: {e}") from None
    try:
        certs = tuple(from_files(args.certs))
        flows = tuple(r for p in args.flows for r in read_flow_log(p)
                      if args.since is None or r.time >= args.since)
    except (CertificateFileError, FlowLogError) as e:
        raise PostureError(str(e)) from None
    if args.cert_warning < 0:
        raise PostureError("--cert-warning must not be negative")
    window = ", ".join(map(str, args.flows)) if args.flows else "no flow log given"
    return build_report(Inputs(state, {"kind": "mesh-file", "config": str(args.config)},
                               certs, flows, window,
                               cert_warning=timedelta(days=args.cert_warning)))


async def fetch(admin: str) -> dict[str, Any]:
    url = f"http://{admin}/posture"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s, \
                s.get(url) as resp:
            if resp.status != 200:
                raise PostureError(f"{url}: HTTP {resp.status}: {(await resp.text()).strip()}")
            body = await resp.json()
    except aiohttp.ClientConnectorError as e:
        raise PostureError(f"cannot reach the agent admin endpoint at {admin}: {e.os_error} "
                           "(is the agent running on this node? see --admin)") from None
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        raise PostureError(f"{url}: {e}") from None
    if not isinstance(body, dict) or body.get("schema") != "nodemesh.posture/v1":
        raise PostureError(f"{url}: not a nodemesh.posture/v1 report")
    return body


def _posture(args: argparse.Namespace) -> int:
    if args.config is None and (args.certs or args.flows):
        raise PostureError("--certs and --flows need --config (an agent reports its own)")
    report = _from_config(args) if args.config else asyncio.run(
        fetch(args.admin or DEFAULT_ADMIN))
    fmt = args.format
    body = (json.dumps(report, indent=2) + "\n" if fmt == "json" else
            render.markdown(report) if fmt == "markdown" else
            render.html_page(report) if fmt == "html" else render.text(report) + "\n")
    if args.output:
        try:
            args.output.write_text(body)
        except OSError as e:
            raise PostureError(f"{args.output}: cannot write: {e.strerror or e}") from None
    else:
        sys.stdout.write(body)
    if args.fail_on:
        floor = Severity[args.fail_on.upper()]
        if any(Severity[f["severity"].upper()] >= floor for f in report["findings"]):
            return EXIT_FINDINGS
    return EXIT_OK

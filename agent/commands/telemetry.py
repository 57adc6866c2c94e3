"""`nodemesh flows`: show flow records from the agent's admin endpoint (`GET /flows`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, TextIO

import aiohttp

from agent.telemetry.flow import (
    NO_FLAGS,
    FlowEventKind,
    FlowRecord,
    FlowRecordError,
    FlowVerdict,
    parse_rfc3339,
)
from agent.telemetry.stream import FlowFilter

DEFAULT_ADMIN: Final = "127.0.0.1:15000"
WIDTH: Final = 79

EPILOG = """examples:
  nodemesh flows                         recent flows on this node, as a table
  nodemesh flows -f --verdict denied     follow denied connections as they happen
  nodemesh flows -n prod --from 10m      flows touching namespace prod in the last 10 minutes
  nodemesh flows -f --json | jq .        raw records (schema nodemesh.flow/v2)
"""


class FlowsCliError(Exception):
    """The admin endpoint could not be reached or refused the request."""


@dataclass(frozen=True)
class Dropped:
    """The agent lost `count` matching records because this reader was too slow."""

    count: int


_AGE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd])", re.ASCII)  # ASCII digits only
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An RFC 3339 time, or an age such as 90s, 10m, 2h, 1d meaning that long before now."""
    m = _AGE.fullmatch(text.strip())
    if m:
        now = now or datetime.now(UTC)
        return now - timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    try:
        return parse_rfc3339(text)
    except FlowRecordError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: want an RFC 3339 time (2025-01-02T03:04:05Z) or an age (10m, 2h)"
        ) from None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("flows", help="show connection flows seen by the agent on this node",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--admin", default=DEFAULT_ADMIN, metavar="HOST:PORT",
                   help=f"agent admin endpoint (default {DEFAULT_ADMIN})")
    p.add_argument("--from", dest="since", type=parse_time, metavar="TIME",
                   help="only flows at or after TIME (RFC 3339 or an age like 10m)")
    p.add_argument("--to", dest="until", type=parse_time, metavar="TIME",
                   help="only flows at or before TIME")
    p.add_argument("--verdict", choices=[v.value for v in FlowVerdict])
    p.add_argument("-n", "--namespace", help="only flows with a side in this namespace")
    p.add_argument("-f", "--follow", action="store_true", help="keep streaming new flows")
    p.add_argument("--json", action="store_true", help="print records as JSON lines")
    p.add_argument("-c", "--count", type=int, metavar="N", help="stop after N records")
    p.set_defaults(func=_flows)


def filter_from_args(args: argparse.Namespace) -> FlowFilter:
    verdict = FlowVerdict(args.verdict) if args.verdict else None
    return FlowFilter(args.since, args.until, verdict, args.namespace)


async def read_flows(admin: str, filt: FlowFilter, *,
                     follow: bool = False) -> AsyncIterator[FlowRecord | Dropped]:
    """Records from the admin endpoint at `admin` (host:port), oldest first; with `follow`,
    then each new one as the agent publishes it, until the caller stops iterating."""
    query = filt.to_query()
    if follow:
        query["follow"] = "1"
    url = f"http://{admin}/flows"
    # No total timeout: a follow stream is meant to stay open.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.get(url, params=query) as resp:
            if resp.status != 200:
                text = (await resp.text()).strip()
                raise FlowsCliError(f"{url}: HTTP {resp.status}: {text}")
            async for raw in resp.content:
                line = raw.strip()
                if not line:
                    continue
                if line.startswith(b'{"dropped"'):
                    yield Dropped(int(_json_dropped(line)))
                    continue
                try:
                    yield FlowRecord.from_json(line)
                except FlowRecordError as e:
                    raise FlowsCliError(f"{url} sent a record this CLI cannot read: {e}") from e
    except aiohttp.ClientConnectorError as e:
        raise FlowsCliError(f"cannot reach the agent admin endpoint at {admin}: {e.os_error} "
                            "(is the agent running on this node? see --admin)") from e
    except aiohttp.ClientError as e:
        raise FlowsCliError(f"{url}: {e}") from e


def _json_dropped(line: bytes) -> int:
    value = json.loads(line).get("dropped")
    if not isinstance(value, int):
        raise FlowsCliError(f"malformed gap notice from the agent: {line!r}")
    return value


async def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """The body of `nodemesh flows`: prints records to `out` and notices to `err`."""
    filt = filter_from_args(args)
    shown = 0
    if not args.json:
        print(table_header(), file=out)
    try:
        async for item in read_flows(args.admin, filt, follow=args.follow):
            if isinstance(item, Dropped):
                print(f"nodemesh flows: {item.count} flows lost: reading too slowly",
                      file=err)
                continue
            print(item.to_json() if args.json else table_row(item), file=out, flush=True)
            shown += 1
            if args.count is not None and shown >= args.count:
                break
    except FlowsCliError as e:
        print(f"nodemesh flows: {e}", file=err)
        return 1
    return 0


def _flows(args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 1:
        print("nodemesh flows: --count must be at least 1", file=sys.stderr)
        return 2
    return asyncio.run(run(args, sys.stdout, sys.stderr))


# Table: TIME(8) KIND(5) SOURCE(18) DESTINATION(20) BYTES(10) INFO(rest, 13), one space between.
_COLUMNS: Final = (("TIME", 8), ("KIND", 5), ("SOURCE", 18), ("DESTINATION", 20),
                   ("SENT/RCVD", 10))
_KIND: Final = {FlowEventKind.OPEN: "open", FlowEventKind.CLOSE: "close",
                FlowEventKind.DENY: "DENY", FlowEventKind.AUTH_FAILURE: "AUTHF",
                FlowEventKind.REJECT: "REJ"}


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


def _size(n: int) -> str:
    if n < 1024:
        return str(n)
    scaled = float(n)
    for unit in ("K", "M", "G"):
        scaled /= 1024
        if scaled < 1024 or unit == "G":
            break
    return f"{scaled:.1f}{unit}"


def table_header() -> str:
    return _line([name for name, _ in _COLUMNS], "INFO")


def _line(cells: list[str], info: str) -> str:
    parts = [_fit(c, w).ljust(w) for c, (_, w) in zip(cells, _COLUMNS, strict=True)]
    return _fit(" ".join([*parts, info]).rstrip(), WIDTH)


def table_row(rec: FlowRecord) -> str:
    dst = rec.destination
    where = dst.label() if not dst.workload or not dst.port else f"{dst.label()}:{dst.port}"
    if rec.kind is FlowEventKind.OPEN:
        info = "mtls" if rec.tunneled else ""
        sizes = ""
    else:
        flags = rec.response_flags if rec.response_flags != NO_FLAGS else ""
        if rec.kind is FlowEventKind.CLOSE:
            info = f"{rec.duration:.1f}s {flags}"
        else:  # refusals: the reason says more than the flag (always DENY or a TLS one)
            info = rec.reason or flags
        sizes = f"{_size(rec.bytes_sent)}/{_size(rec.bytes_received)}"
    return _line([rec.time.strftime("%H:%M:%S"), _KIND[rec.kind], rec.source.label(), where,
                  sizes], info)

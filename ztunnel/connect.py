"""The HBONE CONNECT request: building it (client) and validating it (server). Pure, no I/O.

Headers follow ztunnel: `:authority <ip>:<port>` names the final destination, `forwarded` carries
the client's address for telemetry, and `traceparent` is a random W3C id per connection.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from agent import abi
from ztunnel.events import Cause

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Never a proxy target: forwarding to our own listeners would loop.
ILLEGAL_PORTS = abi.TUNNEL_PORTS

OK = 200
BAD_REQUEST = 400
UNAUTHORIZED = 401
UNAVAILABLE = 503


# ASCII digits only: str.isdigit() and int() also take other scripts' digits ("٨٠٨٠" is 8080
# to them), and int() takes signs, spaces and underscores. Five digits at most, so int() never
# sees a huge number.
_PORT = re.compile(r"[0-9]{1,5}", re.ASCII)
_MAX_AUTHORITY = 64  # "[" + the longest IPv6 text form + "]:65535" fits easily


class AuthorityError(ValueError):
    """A CONNECT :authority that is not a literal IP:port."""


def _show(text: str) -> str:
    """The quoted text for an error message, cut so the message stays one short line whatever a
    peer sent (repr can make one character ten)."""
    shown = repr(text)
    return shown if len(shown) <= 80 else shown[:76] + "...'"


def parse_port(text: str) -> int:
    """A TCP port 1..65535 written in ASCII digits; ValueError for anything else."""
    if not _PORT.fullmatch(text) or not 0 < int(text) < 65536:
        raise ValueError(f"invalid port {_show(text[:16])}: want 1..65535 in ASCII digits")
    return int(text)


def format_hostport(ip: IPAddress, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def parse_authority(authority: str) -> tuple[IPAddress, int]:
    """Parse `a.b.c.d:port` or `[v6]:port`; hostnames are not accepted by this tunnel."""
    if len(authority) > _MAX_AUTHORITY:
        raise AuthorityError(f"authority {_show(authority)} is longer than "
                             f"{_MAX_AUTHORITY} characters: not an <ip>:<port>")
    if not authority.isascii():
        raise AuthorityError(f"authority {_show(authority)} is not ASCII: want <ip>:<port>")
    host, sep, port_s = authority.rpartition(":")
    if not sep or not host:
        raise AuthorityError(f"authority {_show(authority)} has no port: want <ip>:<port>")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    elif ":" in host:
        raise AuthorityError(f"authority {_show(authority)}: IPv6 addresses must be in brackets")
    if "%" in host:
        raise AuthorityError(f"authority {_show(authority)}: scoped (%zone) addresses are not "
                             "accepted")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as exc:
        raise AuthorityError(
            f"authority {_show(authority)} does not start with an IP address") from exc
    if bracketed != (ip.version == 6):
        raise AuthorityError(
            f"authority {_show(authority)}: brackets are for IPv6 addresses only")
    try:
        return ip, parse_port(port_s)
    except ValueError:
        raise AuthorityError(
            f"authority {_show(authority)} has an invalid port {_show(port_s)}") from None


def new_traceparent() -> str:
    """W3C traceparent: version 00, random trace id and parent id, flags 00."""
    ids = secrets.token_hex(24)  # one getrandom() per connection for both ids
    return f"00-{ids[:32]}-{ids[32:]}-00"


def request_headers(
    dst_ip: IPAddress, dst_port: int, client_ip: IPAddress, client_port: int,
    traceparent: str | None = None,
) -> list[tuple[str, str]]:
    return [
        (":method", "CONNECT"),
        (":authority", format_hostport(dst_ip, dst_port)),
        ("forwarded", f'for="{format_hostport(client_ip, client_port)}"'),
        ("traceparent", traceparent or new_traceparent()),
    ]


@dataclass(frozen=True)
class ConnectVerdict:
    """The outcome of validating a CONNECT request before any upstream connect."""

    status: int
    reason: str = ""
    cause: Cause | None = None
    target: tuple[IPAddress, int] | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK


def validate_request(headers: Mapping[str, str], local_ip: IPAddress) -> ConnectVerdict:
    """ztunnel's order: CONNECT method, authority syntax, authority IP is the address this TLS
    connection was made to, then the illegal-port check. RBAC and upstream connect come later."""
    method = headers.get(":method", "")
    if method != "CONNECT":
        return ConnectVerdict(BAD_REQUEST, f"method {_show(method[:32])} is not CONNECT",
                              Cause.BAD_METHOD)
    try:
        ip, port = parse_authority(headers.get(":authority", ""))
    except AuthorityError as exc:
        return ConnectVerdict(BAD_REQUEST, str(exc), Cause.BAD_AUTHORITY)
    if ip != local_ip:
        return ConnectVerdict(
            BAD_REQUEST,
            f"authority IP {ip} is not this workload's address {local_ip}: "
            "the peer sent the request to the wrong pod",
            Cause.WRONG_DESTINATION,
        )
    if port in ILLEGAL_PORTS:
        return ConnectVerdict(BAD_REQUEST,
            f"port {port} is a tunnel port and can never be a target",
                              Cause.ILLEGAL_PORT)
    return ConnectVerdict(OK, target=(ip, port))


def parse_forwarded_for(value: str) -> str | None:
    """The `for=` element of a Forwarded header, without quotes (telemetry only)."""
    for part in value.split(";"):
        key, _, val = part.strip().partition("=")
        if key.lower() == "for":
            return val.strip('"')
    return None

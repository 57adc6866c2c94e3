"""What crosses the channel: pod specs, connection events and resolver entries as JSON values.

Both ends run the same code, but the worker faces attackers: a decoding error is a ValueError
naming the field, never a crash of the control process.
"""

from __future__ import annotations

import functools
from typing import Any

from agent.identity.spiffe import Identity
from ztunnel.events import (
    Cause,
    ConnectionEvent,
    Phase,
    ResponseFlag,
    TransportFlag,
    TunnelDirection,
)
from ztunnel.tunnel import Mode, PodSpec, TunnelWorkload

REASON_MAX = 300  # free text from exceptions and peers: bounded before it crosses


def pod_to_wire(spec: PodSpec) -> dict[str, Any]:
    return {"uid": spec.uid, "netns": spec.netns, "ip": spec.ip, "identity": spec.identity.uri,
            "name": spec.name, "mode": spec.mode.value}


def pod_from_wire(raw: dict[str, Any]) -> PodSpec:
    try:
        return PodSpec(uid=str(raw["uid"]), netns=str(raw["netns"]), ip=str(raw["ip"]),
                       identity=Identity.parse(str(raw["identity"])), name=str(raw["name"]),
                       mode=Mode(raw["mode"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"pod spec: {exc!r}") from exc


def _uri(identity: Identity | None) -> str | None:
    return identity.uri if identity is not None else None


@functools.lru_cache(maxsize=4096)
def _parse_identity(uri: str) -> Identity:
    # Every event names two identities, nearly always the same few: parse each once (bounded;
    # a failed parse raises and is not kept).
    return Identity.parse(uri)


identity_cache_info = _parse_identity.cache_info  # for nodemesh_telemetry_cache_*


def _identity(raw: object) -> Identity | None:
    return _parse_identity(str(raw)) if raw is not None else None


def event_to_wire(ev: ConnectionEvent) -> list[Any]:
    """A compact positional record (events are the channel's bulk traffic)."""
    return [ev.phase.value, ev.direction.value, ev.src_ip, ev.src_port, ev.dst_ip, ev.dst_port,
            ev.src_workload, ev.dst_workload, _uri(ev.src_identity), _uri(ev.dst_identity),
            ev.bytes_sent, ev.bytes_received, ev.duration, ev.flags.value, ev.reason[:REASON_MAX],
            ev.started, ev.response.value, ev.cause.value if ev.cause is not None else None,
            ev.svc_ip, ev.svc_port]


# Member by wire value: a dict lookup instead of an Enum call per field of every event.
_PHASES = {m.value: m for m in Phase}
_DIRECTIONS = {m.value: m for m in TunnelDirection}
_RESPONSES = {m.value: m for m in ResponseFlag}
_CAUSES = {m.value: m for m in Cause}


def _member(table: dict[str, Any], value: object, what: str) -> Any:
    try:
        return table[value]  # type: ignore[index]  # any hashable; a list raises TypeError
    except (KeyError, TypeError):
        raise ValueError(f"{value!r} is not a valid {what}") from None


def event_from_wire(raw: list[Any]) -> ConnectionEvent:
    try:
        (phase, direction, src_ip, src_port, dst_ip, dst_port, src_wl, dst_wl, src_id, dst_id,
         sent, received, duration, flags, reason, started, response, cause, svc_ip,
         svc_port) = raw
        return ConnectionEvent(
            _member(_PHASES, phase, "Phase"), _member(_DIRECTIONS, direction, "TunnelDirection"),
            str(src_ip), int(src_port), str(dst_ip),
            int(dst_port), src_workload=str(src_wl), dst_workload=str(dst_wl),
            src_identity=_identity(src_id), dst_identity=_identity(dst_id),
            bytes_sent=int(sent), bytes_received=int(received), duration=float(duration),
            flags=TransportFlag(int(flags)), reason=str(reason)[:REASON_MAX],
            started=float(started), response=_member(_RESPONSES, response, "ResponseFlag"),
            cause=_member(_CAUSES, cause, "Cause") if cause is not None else None,
            svc_ip=str(svc_ip), svc_port=int(svc_port))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"connection event: {exc!r}") from exc


def workload_to_wire(wl: TunnelWorkload) -> list[Any]:
    return [_uri(wl.identity), wl.name]


def workload_from_wire(ip: str, raw: list[Any]) -> TunnelWorkload:
    try:
        uri, name = raw
        return TunnelWorkload(ip=ip, identity=_identity(uri), name=str(name))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"resolver entry {ip}: {exc!r}") from exc

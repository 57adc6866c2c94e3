"""Sans-IO decoder for a watch response body: newline-delimited JSON events."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

EVENT_TYPES = frozenset({"ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"})
# etcd caps an object at 1.5 MiB; JSON of the largest real objects stays well under this.
MAX_EVENT = 16 * 1024 * 1024


class WatchProtocolError(ValueError):
    """The watch stream is not what the API server sends: a proxy in between, or a bug."""


@dataclass(frozen=True)
class WatchEvent:
    type: str
    object: dict[str, Any]


class WatchDecoder:
    def __init__(self, max_event: int = MAX_EVENT) -> None:
        self._buf = bytearray()
        self._max = max_event

    def feed(self, data: bytes) -> list[WatchEvent]:
        self._buf += data
        events = []
        while (nl := self._buf.find(b"\n")) >= 0:
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            if line.strip():
                events.append(parse_event(line))
        if len(self._buf) > self._max:
            raise WatchProtocolError(f"watch event larger than {self._max} bytes")
        return events

    def end(self) -> None:
        """The stream ended: a partial event left over means it was cut off mid-event."""
        if self._buf.strip():
            raise WatchProtocolError(f"watch stream ended inside an event ({len(self._buf)} "
                                     "bytes without a newline): connection cut?")


def parse_event(line: bytes) -> WatchEvent:
    try:
        doc = json.loads(line)
    except ValueError as e:
        raise WatchProtocolError(f"watch event is not JSON ({e}): {line[:200]!r}") from None
    if not isinstance(doc, dict):
        raise WatchProtocolError(f"watch event is not a JSON object: {line[:200]!r}")
    type_, obj = doc.get("type"), doc.get("object")
    if type_ not in EVENT_TYPES:
        raise WatchProtocolError(f"unknown watch event type {type_!r}")
    if not isinstance(obj, dict):
        raise WatchProtocolError(f"{type_} watch event without an object")
    return WatchEvent(type_, obj)

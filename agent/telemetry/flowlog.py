"""JSON-lines logs on disk: the flow log (every finished connection and every refusal) and the
audit log (every refusal: policy denies, authentication failures and rejected requests, in a
SIEM-oriented schema).

Both files rotate by size (`path` → `path.1` → ... → `path.<backups>`). Both schemas are JSON
Schemas defined here (FLOW_SCHEMA in flow.py, AUDIT_SCHEMA below) and embedded verbatim in
docs/telemetry.md. A write that fails (disk full, directory removed) is counted and logged,
never raised into the data path.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import IO, Any, Final

from agent.telemetry.flow import FlowEventKind, FlowRecord, rfc3339

log = logging.getLogger(__name__)

AUDIT_SCHEMA_ID: Final = "nodemesh.audit/v1"
DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024
DEFAULT_BACKUPS: Final = 5
# Logs name identities and addresses: readable by the node's log shipper group, not by all.
FILE_MODE: Final = 0o640

# event name and severity per refusal kind
_AUDIT_EVENTS: Final = {
    FlowEventKind.DENY: ("policy_deny", "warning"),
    # No identity could be established (or it was not acceptable): more serious than a deny of a
    # known identity, which is policy working as written.
    FlowEventKind.AUTH_FAILURE: ("auth_failure", "error"),
    # Malformed or unroutable requests: probing or a broken client, not a policy decision.
    FlowEventKind.REJECT: ("rejected", "warning"),
}


class RotatingFile:
    """Append-only text file rotated when the next line would take it past `max_bytes`."""

    def __init__(self, path: Path | str, max_bytes: int = DEFAULT_MAX_BYTES,
                 backups: int = DEFAULT_BACKUPS) -> None:
        if max_bytes < 1 or backups < 0:
            raise ValueError("max_bytes must be positive and backups not negative")
        self.path = Path(path)
        self.max_bytes, self.backups = max_bytes, backups
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        self._size = 0
        self.errors = 0
        self._open()

    def _open(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                         FILE_MODE)
        except FileNotFoundError:
            raise FileNotFoundError(f"cannot create log {self.path}: its directory does not "
                                    "exist (check the log path setting)") from None
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        self._size = os.fstat(fd).st_size

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            for i in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    older.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self._open()

    def write_line(self, line: str) -> bool:
        """Append one line (a newline is added); False if it could not be written."""
        data = line + "\n"
        size = len(data.encode())
        with self._lock:
            try:
                if self._file is None:
                    self._open()
                if self._size and self._size + size > self.max_bytes:
                    self._rotate()
                assert self._file is not None
                self._file.write(data)
                self._file.flush()  # so a shipper tailing the file sees whole lines promptly
                self._size += size
                return True
            except OSError as e:
                self.errors += 1
                if self.errors == 1 or self.errors % 1000 == 0:
                    log.error("cannot write %s (%d failures so far): %s", self.path,
                              self.errors, e)
                self._file = None
                return False

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class FlowLog:
    """One FlowRecord JSON line (FLOW_SCHEMA) per finished connection and per refusal; open
    events are left out (their close carries everything they did)."""

    def __init__(self, path: Path | str, max_bytes: int = DEFAULT_MAX_BYTES,
                 backups: int = DEFAULT_BACKUPS) -> None:
        self.file = RotatingFile(path, max_bytes, backups)

    def write(self, rec: FlowRecord) -> None:
        if rec.terminal:
            self.file.write_line(rec.to_json())

    def close(self) -> None:
        self.file.close()


def _party(ep_identity: str, workload: str, namespace: str, ip: str, port: int) -> dict[str, Any]:
    return {"identity": ep_identity or None, "workload": workload or None,
            "namespace": namespace or None, "ip": ip or None, "port": port or None}


def audit_event(rec: FlowRecord, node: str) -> dict[str, Any] | None:
    """The audit log entry (AUDIT_SCHEMA) for a refusal, else None."""
    if rec.kind not in _AUDIT_EVENTS:
        return None
    event, severity = _AUDIT_EVENTS[rec.kind]
    src, dst = rec.source, rec.destination
    return {
        "schema": AUDIT_SCHEMA_ID,
        "ts": rfc3339(rec.time),
        "event": event,
        "severity": severity,
        "node": node,
        "reporter": rec.reporter.value,
        "source": _party(src.principal, src.workload, src.namespace, src.ip, src.port),
        "destination": _party(dst.principal, dst.workload, dst.namespace, dst.ip, dst.port),
        "protocol": rec.protocol,
        "policy": rec.policy or None,
        "rule": rec.rule or None,
        "reason": rec.reason or None,
        "reason_code": rec.reason_code,
        "response_flags": rec.response_flags,
        "tunneled": rec.tunneled,
    }


class AuditLog:
    """Every refusal (deny, authentication failure, reject), one AUDIT_SCHEMA JSON line each.
    Lines are small and bounded (fixed fields, tokens, SPIFFE URIs and addresses); no free text."""

    def __init__(self, path: Path | str, node: str, max_bytes: int = DEFAULT_MAX_BYTES,
                 backups: int = DEFAULT_BACKUPS) -> None:
        if not node:
            raise ValueError("the audit log needs this node's name (events name their node)")
        self.node = node
        self.file = RotatingFile(path, max_bytes, backups)

    def write(self, rec: FlowRecord) -> None:
        entry = audit_event(rec, self.node)
        if entry is not None:
            self.file.write_line(json.dumps(entry, separators=(",", ":")))

    def close(self) -> None:
        self.file.close()


_NULLABLE_STR: Final = {"type": ["string", "null"], "minLength": 1}
_PARTY_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["identity", "workload", "namespace", "ip", "port"],
    "properties": {
        "identity": {"type": ["string", "null"], "pattern": "^spiffe://"},
        "workload": _NULLABLE_STR,
        "namespace": _NULLABLE_STR,
        "ip": {"anyOf": [{"type": "string", "format": "ipv4"},
                         {"type": "string", "format": "ipv6"}, {"type": "null"}]},
        "port": {"type": ["integer", "null"], "minimum": 1, "maximum": 65535},
    },
}

# JSON Schema (draft 2020-12) of one audit log line; docs/telemetry.md embeds this verbatim.
AUDIT_SCHEMA: Final[dict[str, Any]] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": AUDIT_SCHEMA_ID,
    "title": "nodemesh audit event",
    "type": "object",
    "additionalProperties": False,
    "required": [
        "schema", "ts", "event", "severity", "node", "reporter", "source", "destination",
        "protocol", "policy", "rule", "reason", "reason_code", "response_flags", "tunneled",
    ],
    "properties": {
        "schema": {"const": AUDIT_SCHEMA_ID},
        "ts": {"type": "string", "format": "date-time",
               "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$"},
        "event": {"enum": ["policy_deny", "auth_failure", "rejected"]},
        "severity": {"enum": ["warning", "error"]},
        "node": {"type": "string", "minLength": 1},
        "reporter": {"enum": ["source", "destination"]},
        "source": _PARTY_SCHEMA,
        "destination": _PARTY_SCHEMA,
        "protocol": {"type": "string", "minLength": 1},
        "policy": _NULLABLE_STR,
        "rule": _NULLABLE_STR,
        "reason": {"type": ["string", "null"], "pattern": "^[A-Za-z0-9_]{1,64}$"},
        "reason_code": {"type": ["integer", "null"]},
        "response_flags": {"type": "string", "minLength": 1},
        "tunneled": {"type": "boolean"},
    },
}

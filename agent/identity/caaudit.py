"""The CA's audit log: one bounded JSON line per refused CSR (who asked, for what, why not).

The same rotating file as the agent's audit log (agent/telemetry/flowlog.py), its own schema
id: the CA is its own process with its own events.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Final

from agent.telemetry.flowlog import DEFAULT_BACKUPS, DEFAULT_MAX_BYTES, RotatingFile

CA_AUDIT_SCHEMA_ID: Final = "nodemesh.ca-audit/v1"
MAX_FIELD: Final = 512  # a caller chooses the CSR and the metadata: bound what we echo


def _bounded(value: str | None) -> str | None:
    if value is None:
        return None
    return value if len(value) <= MAX_FIELD else value[:MAX_FIELD] + "…"


class CaAudit:
    def __init__(self, path: Path | str, max_bytes: int = DEFAULT_MAX_BYTES,
                 backups: int = DEFAULT_BACKUPS) -> None:
        self.file = RotatingFile(path, max_bytes, backups)

    def refusal(self, *, code: str, reason: str, message: str, peer: str,
                caller: str | None, node: str | None, requested: str | None) -> None:
        entry = {
            "schema": CA_AUDIT_SCHEMA_ID,
            "ts": datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")
            .replace("+00:00", "Z"),
            "event": "csr_refused",
            "severity": "error" if code == "UNAUTHENTICATED" else "warning",
            "code": code,
            "reason": reason,
            "message": _bounded(message),
            "peer": _bounded(peer),
            "caller": _bounded(caller),
            "node": _bounded(node),
            "requested_identity": _bounded(requested),
        }
        self.file.write_line(json.dumps(entry, separators=(",", ":"), ensure_ascii=False))

    def close(self) -> None:
        self.file.close()

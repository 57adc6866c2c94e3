"""Policy simulation: replay recorded flow records through the reference evaluator with a proposed
mesh configuration and report the connections whose verdict would change.

"Today" is what the datapath recorded (the record's verdict); "proposed" is what
`evaluator.evaluate` says under the new configuration. Only policy decisions are replayed:
finished connections (`close`) and policy denies (`deny`). Authentication failures and rejected
requests say nothing about policy and are counted as skipped.

One connection can appear twice: its source's node reports it (reporter `source`) and so does its
destination's (`destination`), with different source ports, so the two cannot be paired. Source
records are authoritative (denies happen at the source's connect); a destination record counts
only when no source record in the input names its source workload (a source outside the mesh, or
a node whose log was not given).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from agent.identity.spiffe import Identity, IdentityError
from agent.model.mesh import Workload
from agent.policy.connection import Connection
from agent.policy.evaluator import Decision, evaluate
from agent.state.snapshot import MeshState
from agent.telemetry.flow import (
    FlowEventKind,
    FlowRecord,
    FlowRecordError,
    FlowVerdict,
    Reporter,
    SecurityPolicy,
    rfc3339,
)

SCHEMA_ID: Final = "nodemesh.simulation/v1"
REPLAYED_KINDS: Final = frozenset({FlowEventKind.CLOSE, FlowEventKind.DENY})
# The largest flow-log line accepted; records are a few hundred bytes.
MAX_LINE: Final = 64 * 1024


class FlowLogError(ValueError):
    """A flow log cannot be read; the message starts with file:line."""


def read_flow_log(path: Path) -> Iterator[FlowRecord]:
    """Records of a JSON-lines flow log, in file order; blank lines are ignored."""
    try:
        f = path.open("rb")
    except OSError as e:
        raise FlowLogError(f"{path}: cannot read the flow log: {e.strerror or e}") from None
    with f:
        for n, raw in enumerate(f, 1):
            if len(raw) > MAX_LINE:
                raise FlowLogError(f"{path}:{n}: line longer than {MAX_LINE} bytes: not a flow "
                                   "record")
            if not raw.strip():
                continue
            try:
                yield FlowRecord.from_json(raw)
            except FlowRecordError as e:
                raise FlowLogError(f"{path}:{n}: {e}") from None
            except UnicodeDecodeError as e:
                raise FlowLogError(f"{path}:{n}: not UTF-8 text (byte {e.start})") from None


@dataclass(frozen=True)
class Outcome:
    verdict: str
    policy: str | None
    rule: int | str | None
    reason: str
    policy_kind: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "policy": self.policy, "policy_kind": self.policy_kind,
                "rule": self.rule, "reason": self.reason}


@dataclass
class Change:
    """Connections from one source to one destination port whose verdict changes the same way."""

    source: str
    source_identity: str | None
    destination: str
    port: int
    today: Outcome
    proposed: Outcome
    count: int = 0
    first_seen: datetime | None = None
    last_seen: datetime | None = None

    def add(self, t: datetime) -> None:
        self.count += 1
        self.first_seen = t if self.first_seen is None else min(self.first_seen, t)
        self.last_seen = t if self.last_seen is None else max(self.last_seen, t)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "source_identity": self.source_identity,
            "destination": self.destination, "port": self.port, "count": self.count,
            "first_seen": rfc3339(self.first_seen) if self.first_seen else None,
            "last_seen": rfc3339(self.last_seen) if self.last_seen else None,
            "today": self.today.to_dict(), "proposed": self.proposed.to_dict(),
        }


@dataclass
class Unresolved:
    source: str
    destination: str
    port: int
    reason: str
    count: int = 0


@dataclass
class Simulation:
    records: int = 0  # read within the time window
    replayed: int = 0
    unchanged: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: {
        "outside_window": 0, "not_a_policy_decision": 0, "seen_by_source": 0})
    newly_denied: dict[tuple[Any, ...], Change] = field(default_factory=dict)
    newly_allowed: dict[tuple[Any, ...], Change] = field(default_factory=dict)
    unresolved: dict[tuple[str, str, int, str], Unresolved] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.newly_denied or self.newly_allowed)

    def to_dict(self) -> dict[str, Any]:
        def changes(d: dict[tuple[Any, ...], Change]) -> list[dict[str, Any]]:
            return [c.to_dict() for c in sorted(d.values(), key=_change_order)]
        return {
            "schema": SCHEMA_ID,
            "changed": self.changed,
            "records": self.records,
            "replayed": self.replayed,
            "unchanged": self.unchanged,
            "skipped": dict(self.skipped),
            "newly_denied": changes(self.newly_denied),
            "newly_allowed": changes(self.newly_allowed),
            "unresolved": [
                {"source": u.source, "destination": u.destination, "port": u.port,
                 "reason": u.reason, "count": u.count}
                for u in sorted(self.unresolved.values(),
                                key=lambda u: (u.source, u.destination, u.port))],
        }


def _change_order(c: Change) -> tuple[str, str, int]:
    return (c.source, c.destination, c.port)


def _source_label(rec: FlowRecord) -> str:
    s = rec.source
    return f"{s.namespace}/{s.workload}" if s.workload else s.ip or "unknown"


def _today(rec: FlowRecord) -> Outcome:
    if rec.verdict is FlowVerdict.ALLOWED:
        return Outcome("allow", None, None, "allowed when recorded")
    return Outcome("deny", rec.policy or None, rec.rule or None,
                   f"denied when recorded ({rec.reason or rec.response_flags})")


def _proposed(d: Decision) -> Outcome:
    return Outcome(d.verdict.value, d.policy, d.rule, d.reason, d.policy_kind)


class Replayer:
    """Replays records against one proposed MeshState (see the module docstring)."""

    def __init__(self, state: MeshState, since: datetime | None = None,
                 until: datetime | None = None) -> None:
        self.state = state
        self.since, self.until = since, until
        self.result = Simulation()

    def run(self, records: Iterable[FlowRecord]) -> Simulation:
        window = [r for r in records if self._in_window(r)]
        self.result.records = len(window)
        # Source workloads some node reported as source: their destination views are duplicates.
        reported = {(r.source.namespace, r.source.workload) for r in window
                    if r.reporter is Reporter.SOURCE and r.source.workload}
        for rec in window:
            if rec.kind not in REPLAYED_KINDS:
                self.result.skipped["not_a_policy_decision"] += 1
            elif (rec.reporter is Reporter.DESTINATION and rec.source.workload
                  and (rec.source.namespace, rec.source.workload) in reported):
                self.result.skipped["seen_by_source"] += 1
            else:
                self._replay(rec)
        return self.result

    def _in_window(self, rec: FlowRecord) -> bool:
        if self.since is not None and rec.time < self.since:
            self.result.skipped["outside_window"] += 1
            return False
        if self.until is not None and rec.time > self.until:
            self.result.skipped["outside_window"] += 1
            return False
        return True

    def _destination(self, rec: FlowRecord) -> Workload | str:
        """The destination workload under the proposed state, or why there is none."""
        d = rec.destination
        try:
            ip = ipaddress.ip_address(d.ip)
        except ValueError:
            ip = None
        if ip is not None and (w := self.state.workload_by_ip(ip)) is not None:
            return w
        if d.workload and (w := self.state.workload_named(d.namespace, d.workload)) is not None:
            return w
        if ip is not None and (svc := self.state.service_by_vip(ip)) is not None:
            return f"{d.ip} is the VIP of service {svc.ref}: the endpoint is not recorded"
        return "no workload in the proposed configuration has this address or name"

    def _identity(self, rec: FlowRecord) -> Identity | None:
        """The identity the source would present: the recorded one, unless the proposed
        configuration takes the source workload out of the mesh (then it sends plaintext)."""
        s = rec.source
        if not s.principal or rec.connection_security_policy is SecurityPolicy.NONE:
            return None
        if s.workload:
            w = self.state.workload_named(s.namespace, s.workload)
            if w is not None and not self.state.in_mesh(w):
                return None
        try:
            return Identity.parse(s.principal)
        except IdentityError:
            return None

    def _replay(self, rec: FlowRecord) -> None:
        src, port = _source_label(rec), rec.destination.port
        dst = self._destination(rec)
        if isinstance(dst, str):
            key = (src, rec.destination.label(), port, dst)
            u = self.result.unresolved.setdefault(key, Unresolved(*key))
            u.count += 1
            return
        dst_ip = rec.destination.ip or (str(dst.ips[0]) if dst.ips else "")
        if not dst_ip:
            key = (src, dst.ref, port, "neither the record nor the workload has an address")
            u = self.result.unresolved.setdefault(key, Unresolved(*key))
            u.count += 1
            return
        self.result.replayed += 1
        identity = self._identity(rec)
        if not self.state.in_mesh(dst):
            proposed = Outcome("allow", None, None,
                               f"{dst.ref} is not in the mesh: no policy is enforced for it")
        else:
            conn = Connection(src_ip=ipaddress.ip_address(rec.source.ip or "0.0.0.0"),
                              src_identity=identity, dst=dst,
                              dst_ip=ipaddress.ip_address(dst_ip), dst_port=port)
            proposed = _proposed(evaluate(self.state.policy_set, conn))
        today = _today(rec)
        if today.verdict == proposed.verdict:
            self.result.unchanged += 1
            return
        table = self.result.newly_denied if proposed.verdict == "deny" else \
            self.result.newly_allowed
        group = (src, dst.ref, port, proposed.policy, proposed.rule, proposed.reason,
               today.policy, today.rule, today.reason)
        change = table.get(group)
        if change is None:
            change = table[group] = Change(src, identity.uri if identity else None, dst.ref, port,
                                         today, proposed)
        change.add(rec.time)


def simulate(state: MeshState, paths: Iterable[Path], since: datetime | None = None,
             until: datetime | None = None) -> Simulation:
    """Read every flow log in `paths` (FlowLogError on bad input) and replay it."""
    records: list[FlowRecord] = []
    for p in paths:
        records.extend(read_flow_log(p))
    return Replayer(state, since, until).run(records)

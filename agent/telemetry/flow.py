"""The flow record: one typed event that every telemetry producer emits and every sink consumes.

Producers are the kernel datapath (flow events decoded from the BPF ring buffer) and the tunnel
(per-connection open/close). Sinks are the Prometheus metrics, the flow and audit logs and the
live stream. The JSON form is versioned (`schema`) and documented in docs/telemetry.md; the JSON
Schema below is the contract and the docs embed it verbatim (a unit test checks both agree).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from json.encoder import encode_basestring_ascii
from typing import Any, Final

SCHEMA_ID: Final = "nodemesh.flow/v2"
# v1 lacked service_address and ejected; its records still load (those fields empty).
SCHEMA_V1: Final = "nodemesh.flow/v1"
_V2_FIELDS: Final = ("service_address", "ejected")


class FlowRecordError(ValueError):
    """A flow record, or its JSON form, breaks the documented schema."""


class Reporter(StrEnum):
    """Which side of the connection observed it (Istio's `reporter` label)."""

    SOURCE = "source"
    DESTINATION = "destination"


class FlowEventKind(StrEnum):
    """open: connection established. close: it ended (bytes and duration final). deny: refused by
    policy (or STRICT mTLS) before carrying data. auth_failure: the peer failed mTLS/identity
    checks. reject: refused as malformed or unroutable (a bad CONNECT request, no route)."""

    OPEN = "open"
    CLOSE = "close"
    DENY = "deny"
    AUTH_FAILURE = "auth_failure"
    REJECT = "reject"


class FlowVerdict(StrEnum):
    ALLOWED = "allowed"
    DENIED = "denied"


class SecurityPolicy(StrEnum):
    """Istio's `connection_security_policy` label: mutual_tls when the connection was (or was
    to be) mTLS, none for plaintext seen by the destination, unknown when the reporter cannot
    tell (the source side of a connection that never reached the tunnel)."""

    MUTUAL_TLS = "mutual_tls"
    NONE = "none"
    UNKNOWN = "unknown"


# Istio's response flags for L4 connections: ztunnel's set, plus Envoy's DPE (downstream
# protocol error) and NR (no route) where ztunnel has no name. "-" means none (a clean
# connection). The tunnel's ztunnel.events.ResponseFlag has exactly these values (a unit test
# checks).
NO_FLAGS: Final = "-"
RESPONSE_FLAGS: Final = frozenset({
    NO_FLAGS, "DENY", "CONNECT", "TLS_FAILURE", "H2_HANDSHAKE_FAILURE", "NETWORK_POLICY",
    "IDENTITY_ERROR", "CERT_REVOKED", "DPE", "NR", "UH", "UO", "RL",
})
# Terminal events end a connection attempt; they carry the final bytes and duration.
TERMINAL_KINDS: Final = frozenset({FlowEventKind.CLOSE, FlowEventKind.DENY,
    FlowEventKind.AUTH_FAILURE,
                                   FlowEventKind.REJECT})
REFUSAL_KINDS: Final = frozenset({FlowEventKind.DENY, FlowEventKind.AUTH_FAILURE,
    FlowEventKind.REJECT})
_DEFAULT_FLAGS: Final = {FlowEventKind.DENY: "DENY", FlowEventKind.AUTH_FAILURE: "TLS_FAILURE",
                         FlowEventKind.REJECT: "DPE"}
# Reason strings come from the kernel verdict table (bpf/lib/verdicts.h, mirrored in Python by the
# datapath, e.g. Reason.POLICY_DENY.label) or from the tunnel; telemetry treats them as opaque
# tokens.
_REASON = re.compile(r"[A-Za-z0-9_]{1,64}")
_SERVICE_ADDRESS = re.compile(r"\d{1,3}(\.\d{1,3}){3}:\d{1,5}")
# json.dumps with separators makes an encoder per call; one line per finished connection.
_ENCODE: Final = json.JSONEncoder(separators=(",", ":")).encode
UNKNOWN_LABEL: Final = "unknown"  # a metric label value nothing is known for (Istio's)


def _json_str(value: object) -> str:
    return encode_basestring_ascii(value) if type(value) is str else _ENCODE(value)


def _json_num(value: object) -> str:
    # What json's C encoder writes for an exact int or float (bool, None and others: json).
    if type(value) is int:
        return int.__repr__(value)
    if type(value) is float and math.isfinite(value):
        return float.__repr__(value)
    return _ENCODE(value)


def _json_bool(value: object) -> str:
    return "true" if value is True else "false" if value is False else _ENCODE(value)


@functools.lru_cache(maxsize=4096)
def _valid_ip(ip: str) -> bool:
    # Every record names two endpoints, nearly always the same few addresses: parse each once.
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        return False
    return True


address_cache_info = _valid_ip.cache_info  # for nodemesh_telemetry_cache_*


# The checks a record's per-connection parts get, built (__post_init__) or copied (`at`, `again`).
def _check_address(ip: str, port: int) -> None:
    if not 0 <= port <= 65535:
        raise FlowRecordError(f"port {port} out of range 0..65535")
    if ip and not _valid_ip(ip):
        raise FlowRecordError(f"ip {ip!r} is not an IPv4/IPv6 address")


def _check_counts(bytes_sent: int, bytes_received: int, duration: float) -> None:
    if bytes_sent < 0 or bytes_received < 0 or duration < 0:
        raise FlowRecordError("bytes and duration must not be negative")
    if not math.isfinite(duration):  # JSON has no NaN or Infinity
        raise FlowRecordError(f"duration must be a finite number, not {duration}")


def _check_service_address(service_address: str) -> None:
    if service_address and not _SERVICE_ADDRESS.fullmatch(service_address):
        raise FlowRecordError(f"service_address {service_address[:80]!r}: want ip:port")


@dataclass(frozen=True)
class FlowEndpoint:
    """One side of a connection. Empty strings (and port 0) mean unknown.

    `principal` is the SPIFFE URI (spiffe://td/ns/x/sa/y), as in Istio's `*_principal` labels.
    `service` is the destination service host (e.g. reviews.default.svc.cluster.local); the
    remaining fields are Istio's canonical-service and locality attributes, filled when known.
    """

    workload: str = ""
    namespace: str = ""
    principal: str = ""
    ip: str = ""
    port: int = 0
    service: str = ""
    canonical_service: str = ""
    canonical_revision: str = ""
    app: str = ""
    version: str = ""
    cluster: str = ""

    def __post_init__(self) -> None:
        _check_address(self.ip, self.port)
        if self.principal and not self.principal.startswith("spiffe://"):
            raise FlowRecordError(
                f"principal {self.principal!r} must be a SPIFFE URI (spiffe://...); "
                "pass Identity.uri, not Identity.principal")

    def to_dict(self) -> dict[str, Any]:  # _ENDPOINT_FIELDS, in order
        return {**self._fields, "ip": self.ip, "port": self.port}

    # Cached per endpoint and kept by `at` (they do not depend on the address): the tunnel's
    # events copy one endpoint per workload pair rather than building each (at_address). The
    # address keys only hold their place in the order: an `at` copy shares this dict.
    @functools.cached_property
    def _fields(self) -> dict[str, Any]:
        return {"workload": self.workload, "namespace": self.namespace,
                "principal": self.principal, "ip": None, "port": None,
                "service": self.service, "canonical_service": self.canonical_service,
                "canonical_revision": self.canonical_revision, "app": self.app,
                "version": self.version, "cluster": self.cluster}

    @functools.cached_property
    def istio_attributes(self) -> tuple[str, ...]:
        """Istio's label values for this side, `unknown` where nothing is known: service, its
        namespace and name, then workload, canonical service and revision, namespace,
        principal, app, version, cluster. The canonical service falls back to the app label,
        then the workload name; the revision to the version label, then `latest` (only for a
        known workload). A service host name.ns.svc.<domain> splits; another host is its own
        name, in the workload's namespace."""
        svc_name, svc_ns = "", ""
        if self.service:
            parts = self.service.split(".")
            svc_name, svc_ns = ((parts[0], parts[1]) if len(parts) >= 3 and parts[2] == "svc"
                                else (self.service, self.namespace))
        canon = self.canonical_service or self.app or self.workload
        revision = self.canonical_revision or self.version or ("latest" if self.workload else "")
        return tuple(v or UNKNOWN_LABEL for v in (
            self.service, svc_ns, svc_name, self.workload, canon, revision, self.namespace,
            self.principal, self.app, self.version, self.cluster))

    @functools.cached_property
    def _json_around_address(self) -> tuple[str, str]:
        head = _ENCODE({k: self._fields[k] for k in _ENDPOINT_FIELDS[:3]})
        tail = _ENCODE({k: self._fields[k] for k in _ENDPOINT_FIELDS[5:]})
        return head[:-1] + ',"ip":', "," + tail[1:]

    def to_json(self) -> str:
        """to_dict as JSON (json.dumps, compact), from the cached text around the address."""
        head, tail = self._json_around_address
        return f'{head}{_json_str(self.ip)},"port":{_json_num(self.port)}{tail}'

    def at(self, ip: str, port: int) -> FlowEndpoint:
        """This endpoint at another address, checked as __post_init__ checks it; a copy that
        keeps the cached values above (an address changes none of them)."""
        _check_address(ip, port)
        ep = object.__new__(FlowEndpoint)
        ep.__dict__.update(self.__dict__, ip=ip, port=port)
        return ep

    @classmethod
    def from_dict(cls, data: Any, where: str) -> FlowEndpoint:
        if not isinstance(data, dict):
            raise FlowRecordError(f"{where}: want an object, got {type(data).__name__}")
        unknown = set(data) - set(_ENDPOINT_FIELDS)
        if unknown:
            raise FlowRecordError(f"{where}: unknown fields {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            want = int if name == "port" else str
            if not isinstance(value, want) or isinstance(value, bool):
                raise FlowRecordError(f"{where}.{name}: want {want.__name__}, got {value!r}")
            kwargs[name] = value
        return cls(**kwargs)

    def label(self) -> str:
        """Short human form: namespace/workload when known, else ip:port."""
        if self.workload:
            return f"{self.namespace or '?'}/{self.workload}"
        if self.ip:
            return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"
        return "unknown"


_ENDPOINT_FIELDS: Final = (
    "workload", "namespace", "principal", "ip", "port", "service", "canonical_service",
    "canonical_revision", "app", "version", "cluster",
)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class FlowRecord:
    """One connection event. Bytes are from the source's point of view: `bytes_sent` went from
    source to destination (the request direction), `bytes_received` came back. That holds for
    both reporters, so producers on the destination side swap their socket's counters.

    `duration` is seconds since the connection opened (0 for open events). `reason` is a verdict
    name from the datapath's verdict table (or the tunnel's own, e.g. TLS_HANDSHAKE), with the
    table's numeric code in `reason_code` when there is one. `policy` and `rule` name the
    AuthorizationPolicy (namespace/name) and rule index that decided a deny, when known.

    `service_address` is the Service VIP:port the app connected to when the kernel chose the
    destination (an endpoint: `destination.ip`/`port`) from a Service, else empty; `ejected`
    marks the failed connect that ejected that endpoint from the Service (outlier detection).
    """

    kind: FlowEventKind
    reporter: Reporter
    source: FlowEndpoint
    destination: FlowEndpoint
    time: datetime = field(default_factory=_now)
    protocol: str = "tcp"
    verdict: FlowVerdict = FlowVerdict.ALLOWED
    reason: str = ""
    reason_code: int | None = None
    response_flags: str = NO_FLAGS
    bytes_sent: int = 0
    bytes_received: int = 0
    duration: float = 0.0
    tunneled: bool = False
    connection_security_policy: SecurityPolicy = SecurityPolicy.UNKNOWN
    policy: str = ""
    rule: str = ""
    service_address: str = ""
    ejected: bool = False

    def __post_init__(self) -> None:
        self._coerce_enums()
        if self.time.tzinfo is None:
            raise FlowRecordError("time must be timezone-aware (use datetime.now(UTC))")
        if self.time.tzinfo is not UTC:
            object.__setattr__(self, "time", self.time.astimezone(UTC))
        if self.response_flags == NO_FLAGS and self.kind in _DEFAULT_FLAGS:
            # A refusal always carries a flag (Istio counts a connection as failed iff it has
            # one); producers that do not know better get the generic one for the kind.
            object.__setattr__(self, "response_flags", _DEFAULT_FLAGS[self.kind])
        if self.response_flags not in RESPONSE_FLAGS:
            raise FlowRecordError(f"response_flags {self.response_flags!r} is not an Istio "
                                  f"flag: want one of {sorted(RESPONSE_FLAGS)}")
        if self.reason and not _REASON.fullmatch(self.reason):
            raise FlowRecordError(
                f"reason {self.reason[:80]!r}: want a verdict name (letters, digits, _)")
        _check_counts(self.bytes_sent, self.bytes_received, self.duration)
        if self.kind in REFUSAL_KINDS and self.verdict is not FlowVerdict.DENIED:
            raise FlowRecordError(f"a {self.kind} event must have verdict denied")
        if self.kind not in REFUSAL_KINDS and self.verdict is FlowVerdict.DENIED:
            raise FlowRecordError(
                f"verdict denied needs kind deny, auth_failure or reject, not {self.kind}")
        if not self.protocol:
            raise FlowRecordError("protocol must not be empty (Istio uses 'tcp')")
        _check_service_address(self.service_address)

    def _coerce_enums(self) -> None:
        # Accept plain strings for the enums (producers often have them from a table) but store
        # the enum, so equality and serialisation do not depend on how a record was built.
        for name, enum in (("kind", FlowEventKind), ("reporter", Reporter), ("verdict",
            FlowVerdict),
                           ("connection_security_policy", SecurityPolicy)):
            value = getattr(self, name)
            if type(value) is enum:
                continue  # the usual case: a producer passed the member itself
            try:
                object.__setattr__(self, name, enum(value))
            except ValueError:
                allowed = ", ".join(e.value for e in enum)
                raise FlowRecordError(f"{name}: {value!r} is not one of {allowed}") from None

    def again(self, source: FlowEndpoint, destination: FlowEndpoint, *, bytes_sent: int,
              bytes_received: int, duration: float, service_address: str) -> FlowRecord:
        """Another event of this record's shape (kind, reporter, verdict, flags, endpoints'
        identities), now: a copy with the parts that vary per connection replaced, checked as
        __post_init__ checks them. The endpoints must be this record's own, `at` an address."""
        _check_counts(bytes_sent, bytes_received, duration)
        _check_service_address(service_address)
        rec = object.__new__(FlowRecord)
        rec.__dict__.update(self.__dict__, time=_now(), source=source, destination=destination,
                            bytes_sent=bytes_sent, bytes_received=bytes_received,
                            duration=duration, service_address=service_address)
        return rec

    @property
    def terminal(self) -> bool:
        return self.kind in TERMINAL_KINDS

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_ID,
            "time": rfc3339(self.time),
            "kind": self.kind.value,
            "reporter": self.reporter.value,
            "source": self.source.to_dict(),
            "destination": self.destination.to_dict(),
            "protocol": self.protocol,
            "verdict": self.verdict.value,
            "reason": self.reason,
            "reason_code": self.reason_code,
            "response_flags": self.response_flags,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "duration": self.duration,
            "tunneled": self.tunneled,
            "connection_security_policy": self.connection_security_policy.value,
            "policy": self.policy,
            "rule": self.rule,
            "service_address": self.service_address,
            "ejected": self.ejected,
        }

    def to_json(self) -> str:
        """One line of JSON (no newline), keys in schema order."""
        # Spelled out (json.dumps of to_dict gives the same text; a unit test checks): one line
        # per finished connection. Enum values, the time, reason, flags and service address are
        # checked tokens; free strings and numbers go through json's own encoders.
        return (f'{{"schema":"{SCHEMA_ID}","time":"{rfc3339(self.time)}",'
                f'"kind":"{self.kind.value}","reporter":"{self.reporter.value}",'
                f'"source":{self.source.to_json()},"destination":{self.destination.to_json()},'
                f'"protocol":{_json_str(self.protocol)},"verdict":"{self.verdict.value}",'
                f'"reason":"{self.reason}","reason_code":{_json_num(self.reason_code)},'
                f'"response_flags":"{self.response_flags}",'
                f'"bytes_sent":{_json_num(self.bytes_sent)},'
                f'"bytes_received":{_json_num(self.bytes_received)},'
                f'"duration":{_json_num(self.duration)},"tunneled":{_json_bool(self.tunneled)},'
                f'"connection_security_policy":"{self.connection_security_policy.value}",'
                f'"policy":{_json_str(self.policy)},"rule":{_json_str(self.rule)},'
                f'"service_address":"{self.service_address}",'
                f'"ejected":{_json_bool(self.ejected)}}}')

    @classmethod
    def from_dict(cls, data: Any) -> FlowRecord:
        if not isinstance(data, dict):
            raise FlowRecordError(f"flow record: want a JSON object, got {type(data).__name__}")
        if data.get("schema") == SCHEMA_V1:
            data = {**data, "schema": SCHEMA_ID, "service_address": "", "ejected": False}
        if data.get("schema") != SCHEMA_ID:
            raise FlowRecordError(f"schema is {data.get('schema')!r}, want {SCHEMA_ID!r}; "
                                  "maybe the agent and the reader are different versions")
        missing = set(FLOW_SCHEMA["required"]) - set(data)
        if missing:
            raise FlowRecordError(f"flow record lacks fields {sorted(missing)}")
        unknown = set(data) - set(FLOW_SCHEMA["properties"])
        if unknown:
            raise FlowRecordError(f"flow record has unknown fields {sorted(unknown)}")
        _check_types(data)
        return cls(
            kind=data["kind"], reporter=data["reporter"],
            source=FlowEndpoint.from_dict(data["source"], "source"),
            destination=FlowEndpoint.from_dict(data["destination"], "destination"),
            time=parse_rfc3339(data["time"]), protocol=data["protocol"],
            verdict=data["verdict"], reason=data["reason"], reason_code=data["reason_code"],
            response_flags=data["response_flags"], bytes_sent=data["bytes_sent"],
            bytes_received=data["bytes_received"], duration=_seconds(data["duration"]),
            tunneled=data["tunneled"],
            connection_security_policy=data["connection_security_policy"],
            policy=data["policy"], rule=data["rule"],
            service_address=data["service_address"], ejected=data["ejected"])

    @classmethod
    def from_json(cls, line: str | bytes) -> FlowRecord:
        try:
            data = json.loads(line)
        except ValueError as e:
            raise FlowRecordError(f"flow record is not JSON: {e}") from None
        return cls.from_dict(data)


_TYPES: Final[dict[str, tuple[type, ...]]] = {
    "time": (str,), "kind": (str,), "reporter": (str,), "protocol": (str,), "verdict": (str,),
    "reason": (str,), "reason_code": (int, type(None)), "response_flags": (str,),
    "bytes_sent": (int,), "bytes_received": (int,), "duration": (int, float),
    "tunneled": (bool,), "connection_security_policy": (str,), "policy": (str,), "rule": (str,),
    "service_address": (str,), "ejected": (bool,),
}


def _seconds(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer beyond any float
        raise FlowRecordError(f"duration {value} is out of range") from None


def _check_types(data: dict[str, Any]) -> None:
    for name, types in _TYPES.items():
        value = data[name]
        # bool is an int subclass: only the boolean field may hold one.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise FlowRecordError(f"{name}: wrong type {type(value).__name__} ({value!r})")


def rfc3339(t: datetime) -> str:
    """UTC with microseconds and a Z suffix, e.g. 2025-01-02T03:04:05.000006Z."""
    # isoformat, not strftime: %Y does not zero-pad years before 1000 on every libc.
    if t.tzinfo is UTC:  # every record's time: "+00:00" becomes "Z"
        return t.isoformat(timespec="microseconds")[:-6] + "Z"
    return t.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_rfc3339(s: str) -> datetime:
    """Parse an RFC 3339 timestamp with an offset or Z; naive times are rejected."""
    try:
        t = datetime.fromisoformat(s)
    except ValueError:
        raise FlowRecordError(f"{s!r} is not an RFC 3339 timestamp") from None
    if t.tzinfo is None:
        raise FlowRecordError(f"{s!r} has no time zone: want an offset or Z")
    try:
        return t.astimezone(UTC)
    except OverflowError:  # e.g. 9999-12-31T23:59:59-14:00 is past datetime.max in UTC
        raise FlowRecordError(f"{s!r} is out of range in UTC (years 1..9999)") from None


_ENDPOINT_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "additionalProperties": False,
    "required": list(_ENDPOINT_FIELDS),
    "properties": {
        **{name: {"type": "string"} for name in _ENDPOINT_FIELDS},
        "principal": {"type": "string", "pattern": "^(spiffe://.+)?$"},
        "port": {"type": "integer", "minimum": 0, "maximum": 65535},
    },
}

# JSON Schema (draft 2020-12) of one flow record; docs/telemetry.md embeds this verbatim.
FLOW_SCHEMA: Final[dict[str, Any]] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": SCHEMA_ID,
    "title": "nodemesh flow record",
    "type": "object",
    "additionalProperties": False,
    "required": [
        "schema", "time", "kind", "reporter", "source", "destination", "protocol", "verdict",
        "reason", "reason_code", "response_flags", "bytes_sent", "bytes_received", "duration",
        "tunneled", "connection_security_policy", "policy", "rule", *_V2_FIELDS,
    ],
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "time": {"type": "string", "format": "date-time",
                 "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$"},
        "kind": {"enum": [k.value for k in FlowEventKind]},
        "reporter": {"enum": [r.value for r in Reporter]},
        "source": _ENDPOINT_SCHEMA,
        "destination": _ENDPOINT_SCHEMA,
        "protocol": {"type": "string", "minLength": 1},
        "verdict": {"enum": [v.value for v in FlowVerdict]},
        "reason": {"type": "string", "pattern": "^[A-Za-z0-9_]{0,64}$"},
        "reason_code": {"type": ["integer", "null"]},
        "response_flags": {"enum": sorted(RESPONSE_FLAGS)},
        "bytes_sent": {"type": "integer", "minimum": 0},
        "bytes_received": {"type": "integer", "minimum": 0},
        "duration": {"type": "number", "minimum": 0},
        "tunneled": {"type": "boolean"},
        "connection_security_policy": {"enum": [p.value for p in SecurityPolicy]},
        "policy": {"type": "string"},
        "rule": {"type": "string"},
        "service_address": {"type": "string", "pattern": r"^(\d{1,3}(\.\d{1,3}){3}:\d{1,5})?$"},
        "ejected": {"type": "boolean"},
    },
}

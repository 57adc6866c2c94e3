"""Byte layouts of the map keys, values and events in bpf/lib/*.h (struct-for-struct).

IPv4 addresses are network order in the kernel; here they are ipaddress objects, packed with
their packed (big-endian) bytes. Ports are host order unless the C comment says otherwise.
"""

from __future__ import annotations

import ipaddress
import mmap
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeVar

from agent.datapath.verdicts import KernelDirection, KernelEventKind, KernelVerdict, Reason

ANY = 0xFFFFFFFF
ANY_PORT = 0
IPPROTO_TCP = 6
Ip = ipaddress.IPv4Address

ENROLL = struct.Struct("=I4sII")
IPCACHE_KEY = struct.Struct("=I4s")
IPCACHE_VALUE = struct.Struct("=II")
EXCLUDE_PORT_KEY = struct.Struct("=H")
U32 = struct.Struct("=I")
POLICY_KEY = struct.Struct("=4sIIHBB")
POLICY_VALUE = struct.Struct("=BBHI")
CONN_TUPLE = struct.Struct("=Q4sI")
CONN_ENTRY = struct.Struct("=4sHH4sIQQ")
UPSTREAM_KEY = struct.Struct("=4s4sHH")
UPSTREAM_ENTRY = struct.Struct("=Q")
TRUSTED_ENTRY = struct.Struct("=IIQ")
CGROUP_ID = struct.Struct("=Q")
FLOW_EVENT = struct.Struct("=QQQQQQ4s4sHHIIHBBBB2x4sH2x")
CONN_BYPASS = 1  # NM_CONN_BYPASS (bpf/lib/bypass.h) in conn_entry.flags and flow_event.flags
BYPASS_ENTRY = struct.Struct("=QQQII")  # struct bypass_entry
FLOW_EVENT_SIZE = 88  # sizeof(struct flow_event), 8-byte aligned
FLOW_EVENT_KIND_OFFSET = struct.calcsize("=QQQQQQ4s4sHHIIH")  # offsetof(struct flow_event, kind)
FLOW_EVENT_FLAGS_OFFSET = FLOW_EVENT_KIND_OFFSET + 4  # the u8 flags after kind..direction
LB4_KEY = struct.Struct("=4sHBB")
LB4_SERVICE = struct.Struct("=IHH")
LB4_BACKEND_KEY = struct.Struct("=II")
LB4_BACKEND = struct.Struct("=4sHH")
LB4_ACTIVE = struct.Struct("=iI")
RL_CFG_KEY = struct.Struct("=4sI")
RL_CFG = struct.Struct("=QIIII")
RL_KEY = struct.Struct("=4sIB3x")
RL_STATE = struct.Struct("=Qq")

_E = TypeVar("_E", bound=IntEnum)

assert POLICY_KEY.size == 16 and POLICY_VALUE.size == 8 and CONN_ENTRY.size == 32
assert FLOW_EVENT.size == FLOW_EVENT_SIZE - 4 and LB4_KEY.size == LB4_SERVICE.size == 8


@dataclass(frozen=True, order=True)
class PolicyKey:
    dst: Ip
    src_id: int = ANY
    src_cidr: int = ANY
    port: int = ANY_PORT

    def pack(self) -> bytes:
        return POLICY_KEY.pack(
            self.dst.packed, self.src_id, self.src_cidr, self.port, IPPROTO_TCP, 0
        )

    @classmethod
    def unpack(cls, raw: bytes) -> PolicyKey:
        dst, src_id, src_cidr, port, _proto, _pad = POLICY_KEY.unpack(raw)
        return cls(Ip(dst), src_id, src_cidr, port)


@dataclass(frozen=True)
class PolicyEntry:
    verdict: KernelVerdict
    reason: Reason = Reason.NONE
    policy: int = 0
    rule: int = 0

    def pack(self) -> bytes:
        return POLICY_VALUE.pack(self.verdict, self.reason, self.rule, self.policy)

    @classmethod
    def unpack(cls, raw: bytes) -> PolicyEntry:
        verdict, reason, rule, policy = POLICY_VALUE.unpack(raw)
        return cls(_member(KernelVerdict, verdict), _member(Reason, reason), policy, rule)


def ipcache_key(net: ipaddress.IPv4Network) -> bytes:
    return IPCACHE_KEY.pack(net.prefixlen, net.network_address.packed)


def enroll_value(identity: int, pod_ip: Ip) -> bytes:
    return ENROLL.pack(identity, pod_ip.packed, 0, 0)


@dataclass(frozen=True)
class ConnEntry:
    orig_ip: Ip
    orig_port: int
    src_ip: Ip
    src_id: int
    start_ns: int
    netns: int

    @classmethod
    def unpack(cls, raw: bytes) -> ConnEntry:
        oip, oport, _pad, sip, sid, start, netns = CONN_ENTRY.unpack(raw[: CONN_ENTRY.size])
        return cls(
            Ip(oip), int.from_bytes(struct.pack("=H", oport), "big"), Ip(sip), sid, start, netns
        )


def conn_tuple(netns: int, ip: Ip, port: int) -> bytes:
    return CONN_TUPLE.pack(netns, ip.packed, port)


@dataclass(frozen=True, order=True)
class UpstreamKey:
    """struct upstream_key: the agent's upstream connect as the destination pod sees it."""

    src: Ip
    dst: Ip
    src_port: int
    dst_port: int

    @classmethod
    def unpack(cls, raw: bytes) -> UpstreamKey:
        sip, dip, sport, dport = UPSTREAM_KEY.unpack(raw[: UPSTREAM_KEY.size])
        return cls(Ip(sip), Ip(dip), sport, dport)


@dataclass(frozen=True)
class TrustedEntry:
    """struct trusted_entry: the agent process that registered a trusted cgroup."""

    owner_pid: int
    owner_start: int

    def pack(self) -> bytes:
        return TRUSTED_ENTRY.pack(self.owner_pid, 0, self.owner_start)

    @classmethod
    def unpack(cls, raw: bytes) -> TrustedEntry:
        pid, _pad, start = TRUSTED_ENTRY.unpack(raw[: TRUSTED_ENTRY.size])
        return cls(pid, start)


@dataclass(frozen=True)
class FlowEvent:
    """One record of the nm_events_v1 ring buffer."""

    ts_ns: int
    cookie: int
    netns: int
    bytes_sent: int
    bytes_received: int
    duration_ns: int
    src_ip: Ip
    dst_ip: Ip
    src_port: int
    dst_port: int
    src_id: int
    policy: int
    rule: int
    kind: KernelEventKind
    verdict: KernelVerdict
    reason: Reason
    direction: KernelDirection
    svc_ip: Ip | None = None  # the Service VIP the app connected to (load-balanced connects)
    svc_port: int = 0
    bypass: bool = False  # same-node bypass: socket to socket, no tunnel (flags bit 0)

    @classmethod
    def unpack(cls, raw: bytes) -> FlowEvent:
        return cls.unpack_from(raw, 0, len(raw))

    @classmethod
    def unpack_from(cls, buf: bytes | bytearray | memoryview | mmap.mmap, offset: int,
                    length: int) -> FlowEvent:
        """Decode in place (a ring buffer's mmap): no copy of the record."""
        if length < FLOW_EVENT.size:
            raise ValueError(f"flow event of {length} bytes, want {FLOW_EVENT_SIZE}")
        (
            ts,
            cookie,
            netns,
            sent,
            recv,
            dur,
            sip,
            dip,
            sport,
            dport,
            sid,
            policy,
            rule,
            kind,
            verdict,
            reason,
            direction,
            svc_ip,
            svc_port,
        ) = FLOW_EVENT.unpack_from(buf, offset)
        flags = buf[offset + FLOW_EVENT_FLAGS_OFFSET]
        return cls(
            ts,
            cookie,
            netns,
            sent,
            recv,
            dur,
            Ip(sip),
            Ip(dip),
            sport,
            dport,
            sid,
            policy,
            rule,
            _member(KernelEventKind, kind),
            _member(KernelVerdict, verdict),
            _member(Reason, reason),
            _member(KernelDirection, direction),
            Ip(svc_ip) if svc_port else None,
            svc_port,
            bool(flags & CONN_BYPASS),
        )


@dataclass(frozen=True, order=True)
class Frontend:
    """struct lb4_key: a Service VIP and service port."""

    vip: Ip
    port: int

    def pack(self) -> bytes:
        return LB4_KEY.pack(self.vip.packed, self.port, IPPROTO_TCP, 0)

    @classmethod
    def unpack(cls, raw: bytes) -> Frontend:
        vip, port, _proto, _pad = LB4_KEY.unpack(raw[: LB4_KEY.size])
        return cls(Ip(vip), port)


@dataclass(frozen=True, order=True)
class Backend:
    """struct lb4_backend: an endpoint address and its resolved target port."""

    ip: Ip
    port: int

    def pack(self) -> bytes:
        return LB4_BACKEND.pack(self.ip.packed, self.port, 0)

    @classmethod
    def unpack(cls, raw: bytes) -> Backend:
        ip, port, _flags = LB4_BACKEND.unpack(raw[: LB4_BACKEND.size])
        return cls(Ip(ip), port)


@dataclass(frozen=True, order=True)
class RateLimitKey:
    """struct rl_cfg_key: a limited (destination address, source identity id)."""

    dst: Ip
    src_id: int

    def pack(self) -> bytes:
        return RL_CFG_KEY.pack(self.dst.packed, self.src_id)

    @classmethod
    def unpack(cls, raw: bytes) -> RateLimitKey:
        dst, src_id = RL_CFG_KEY.unpack(raw[: RL_CFG_KEY.size])
        return cls(Ip(dst), src_id)


@dataclass(frozen=True)
class RateLimitEntry:
    """struct rl_cfg: a token bucket (interval_ns 0: none) and a concurrency cap (0: none)."""

    interval_ns: int
    burst: int
    max_conns: int
    limit_id: int

    def pack(self) -> bytes:
        return RL_CFG.pack(self.interval_ns, self.burst, self.max_conns, self.limit_id, 0)

    @classmethod
    def unpack(cls, raw: bytes) -> RateLimitEntry:
        interval, burst, cap, limit_id, _pad = RL_CFG.unpack(raw[: RL_CFG.size])
        return cls(interval, burst, cap, limit_id)


@dataclass(frozen=True)
class RateLimitState:
    """struct rl_key + struct rl_state: one bucket as the kernel holds it."""

    dst: Ip
    src_id: int
    direction: KernelDirection
    tat: int
    active: int

    @classmethod
    def unpack(cls, key: bytes, value: bytes) -> RateLimitState:
        dst, src_id, direction = RL_KEY.unpack(key[: RL_KEY.size])
        tat, active = RL_STATE.unpack(value[: RL_STATE.size])
        return cls(Ip(dst), src_id, _member(KernelDirection, direction), tat, active)


def _member(enum: type[_E], value: int) -> _E:
    try:
        return enum(value)
    except ValueError:
        known = ", ".join(f"{m.value} {m.name}" for m in enum)
        raise ValueError(f"flow event: {enum.__name__} {value} is not one of {known} "
                         "(is bpf/lib/verdicts.h newer than agent/datapath/verdicts.py?)") from None

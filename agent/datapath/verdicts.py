"""Python mirror of bpf/lib/verdicts.h and of ratelimit.h's counters (a unit test keeps them
equal)."""

from __future__ import annotations

import enum


class KernelVerdict(enum.IntEnum):
    ALLOW = 1
    DENY = 2


class Reason(enum.IntEnum):
    NONE = 0
    POLICY_DENY = 1
    POLICY_NOT_ALLOWED = 2
    MTLS_REQUIRED = 3
    IPV6_UNSUPPORTED = 4
    NO_TUNNEL = 5
    NO_HEALTHY_UPSTREAM = 6
    UPSTREAM_OVERFLOW = 7
    RATE_LIMITED = 8
    TUNNEL_PORT = 9

    @property
    def label(self) -> str:
        """The form used in metrics and logs."""
        return self.name.lower()


class KernelEventKind(enum.IntEnum):
    OPEN = 1
    CLOSE = 2
    DENY = 3


class KernelDirection(enum.IntEnum):
    EGRESS = 1
    INGRESS = 2


class Counter(enum.IntEnum):
    RINGBUF_DROPS = 0
    CAPTURED = 1
    DENY_EGRESS = 2
    DENY_INGRESS = 3
    INBOUND_STEERED = 4
    IPV6_DENIED = 5
    INBOUND_NO_TUNNEL = 6
    UNTRUSTED_MARK = 7
    NO_HEALTHY_UPSTREAM = 8
    SVC_TRANSLATED = 9


COUNTER_SLOTS = 10  # NM_CTR_MAX


class RateLimitCounter(enum.IntEnum):
    """Indices of nm_rl_counters_v1 (bpf/lib/ratelimit.h, NM_RL_CTR_*)."""

    RATE = 0  # the token bucket was empty
    CONCURRENCY = 1  # the concurrency cap was reached


RATE_LIMIT_COUNTER_SLOTS = 2  # NM_RL_CTR_MAX

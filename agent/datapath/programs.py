"""The eBPF programs nodemesh loads: name, program type, attach point. The loader pins each
under <pin_dir>/progs/<name>; the agent attaches what is pinned there."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from agent.datapath.bpfsys import AttachType


class ProgType(enum.IntEnum):
    SOCKET_FILTER = 1  # benchmarks' event generator (runs under BPF_PROG_TEST_RUN)
    CGROUP_SOCK = 9
    SOCK_OPS = 13
    SK_MSG = 16
    CGROUP_SOCK_ADDR = 18
    CGROUP_SOCKOPT = 25
    SK_LOOKUP = 30


@dataclass(frozen=True)
class Program:
    name: str
    prog_type: ProgType
    attach_type: AttachType


CGROUP_PROGRAMS = (
    Program("nm_connect4", ProgType.CGROUP_SOCK_ADDR, AttachType.CGROUP_INET4_CONNECT),
    Program("nm_connect6", ProgType.CGROUP_SOCK_ADDR, AttachType.CGROUP_INET6_CONNECT),
    Program("nm_getpeername4", ProgType.CGROUP_SOCK_ADDR, AttachType.CGROUP_INET4_GETPEERNAME),
    Program("nm_getsockname4", ProgType.CGROUP_SOCK_ADDR, AttachType.CGROUP_INET4_GETSOCKNAME),
    Program("nm_getsockopt", ProgType.CGROUP_SOCKOPT, AttachType.CGROUP_GETSOCKOPT),
    Program("nm_sockops", ProgType.SOCK_OPS, AttachType.CGROUP_SOCK_OPS),
    Program("nm_sock_release", ProgType.CGROUP_SOCK, AttachType.CGROUP_INET_SOCK_RELEASE),
    Program("nm_bind4", ProgType.CGROUP_SOCK_ADDR, AttachType.CGROUP_INET4_BIND),
    Program("nm_bind6", ProgType.CGROUP_SOCK_ADDR, AttachType.CGROUP_INET6_BIND),
)
SK_LOOKUP = Program("nm_sk_lookup", ProgType.SK_LOOKUP, AttachType.SK_LOOKUP)
# Attached to the sockhash BYPASS_SOCKS (same-node bypass), not to a cgroup.
BYPASS_MSG = Program("nm_bypass_msg", ProgType.SK_MSG, AttachType.SK_MSG_VERDICT)
BYPASS_SOCKS = "nm_bypass_socks_v1"
ALL_PROGRAMS = (*CGROUP_PROGRAMS, SK_LOOKUP, BYPASS_MSG)
PROGS_DIR = "progs"  # under the pin directory

"""The attributes of one inbound connection that L4 policy decides on."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from agent.identity.spiffe import Identity
from agent.model.fields import IPAddress
from agent.model.mesh import Workload


@dataclass(frozen=True)
class Connection:
    """Policy is evaluated at the destination, after the HBONE tunnel is terminated.

    `dst_port` is the workload's real target port (never 15008); `src_identity` is the peer
    certificate's identity, None for plaintext.
    """

    src_ip: IPAddress
    src_identity: Identity | None
    dst: Workload
    dst_ip: IPAddress
    dst_port: int

    def __post_init__(self) -> None:
        if not isinstance(self.src_ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
            object.__setattr__(self, "src_ip", ipaddress.ip_address(self.src_ip))
        if not isinstance(self.dst_ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
            object.__setattr__(self, "dst_ip", ipaddress.ip_address(self.dst_ip))

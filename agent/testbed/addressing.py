"""The test bed's names and address plan (pure: no I/O, unit-tested).

Each cluster is isolated in its own namespaces, so two clusters may reuse the same addresses.
Underlay 10.250.0.0/24 joins the nodes; node i owns pod CIDR 10.251.i.0/24, where .1 is the
node-side gateway and pods 0-199 are .10-.209. A node with more pods (the footprint benchmark
runs 500 on one node) takes the rest from its overflow CIDR, the i-th /22 of 10.252.0.0/14,
from its .10 on. Interface names stay under the 15-byte IFNAMSIZ limit.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import string
from dataclasses import dataclass

PREFIX = "nm-"
UNDERLAY = ipaddress.IPv4Network("10.250.0.0/24")
POD_SUPERNET = ipaddress.IPv4Network("10.251.0.0/16")
OVERFLOW_SUPERNET = ipaddress.IPv4Network("10.252.0.0/14")  # 256 /22s, one per node
PODS_IN_FIRST_CIDR = 200
MAX_NODES = 200
# Enough for the 500-pod footprint benchmark; the /22 overflow CIDR would hold 1,212 per node.
MAX_PODS_PER_NODE = 1000
RUN_ID_LEN = 6
_ALPHABET = string.ascii_lowercase + string.digits


def new_run_id() -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(RUN_ID_LEN))


def valid_run_id(rid: str) -> bool:
    return len(rid) == RUN_ID_LEN and all(c in _ALPHABET for c in rid)


@dataclass(frozen=True)
class Plan:
    """Names and addresses of one cluster run."""

    run_id: str

    def __post_init__(self) -> None:
        if not valid_run_id(self.run_id):
            raise ValueError(f"run id {self.run_id!r}: want {RUN_ID_LEN} chars of [a-z0-9]")

    @property
    def prefix(self) -> str:
        return f"{PREFIX}{self.run_id}"

    @property
    def underlay_ns(self) -> str:
        return f"{self.prefix}-ul"

    def node_ns(self, node: int) -> str:
        return f"{self.prefix}-n{node}"

    def pod_ns(self, node: int, pod: int) -> str:
        return f"{self.prefix}-n{node}p{pod}"

    def node_ip(self, node: int) -> ipaddress.IPv4Address:
        _check(node, MAX_NODES, "node")
        return UNDERLAY.network_address + 10 + node

    def pod_cidr(self, node: int) -> ipaddress.IPv4Network:
        _check(node, MAX_NODES, "node")
        return ipaddress.IPv4Network((int(POD_SUPERNET.network_address) + (node << 8), 24))

    def overflow_cidr(self, node: int) -> ipaddress.IPv4Network:
        """Where pods from PODS_IN_FIRST_CIDR on get their addresses."""
        _check(node, MAX_NODES, "node")
        return ipaddress.IPv4Network((int(OVERFLOW_SUPERNET.network_address) + (node << 10), 22))

    def pod_cidrs(self, node: int) -> tuple[ipaddress.IPv4Network, ...]:
        """Every CIDR a node's pods may have addresses in (what other nodes route to it)."""
        return (self.pod_cidr(node), self.overflow_cidr(node))

    def pod_gateway(self, node: int) -> ipaddress.IPv4Address:
        return self.pod_cidr(node).network_address + 1

    def pod_ip(self, node: int, pod: int) -> ipaddress.IPv4Address:
        _check(pod, MAX_PODS_PER_NODE, "pod")
        if pod < PODS_IN_FIRST_CIDR:
            return self.pod_cidr(node).network_address + 10 + pod
        return self.overflow_cidr(node).network_address + 10 + pod - PODS_IN_FIRST_CIDR

    @staticmethod
    def underlay_port(node: int) -> str:
        """The bridge-side veth of a node, inside the underlay netns."""
        return f"n{node}"

    @staticmethod
    def pod_port(pod: int) -> str:
        """The node-side veth of a pod, inside the node netns."""
        return f"p{pod}"

    @property
    def cgroup_name(self) -> str:
        """The per-run cgroup subtree, directly under the cgroup v2 mount."""
        return self.prefix

    def pin_name(self, node: int, label: str) -> str:
        """A node agent's pin directory (under the pin root), e.g. demo-<run>-n0: the run id
        in the name lets cleanup find pins a dead run left even without its state file."""
        _check(node, MAX_NODES, "node")
        if not PIN_LABEL.fullmatch(label):
            raise ValueError(f"pin label {label!r}: want [a-z][a-z0-9]*")
        return f"{label}-{self.run_id}-n{node}"


PIN_LABEL = re.compile(r"[a-z][a-z0-9]*")
PIN_NAME = re.compile(rf"[a-z][a-z0-9]*-([a-z0-9]{{{RUN_ID_LEN}}})-n\d{{1,3}}")


def run_of_pin_name(name: str) -> str | None:
    """The run id in a pin directory name made by Plan.pin_name, else None."""
    m = PIN_NAME.fullmatch(name)
    return m.group(1) if m else None


def _check(value: int, limit: int, what: str) -> None:
    if not 0 <= value < limit:
        raise ValueError(f"{what} index {value} out of range 0..{limit - 1}")

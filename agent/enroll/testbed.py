"""TestbedLocator: a test-bed pod's netns and cgroup, found from its IP.

Test-bed pods are named network namespaces (/var/run/netns/nm-<run>-n<i>p<j>) whose eth0 holds
the pod IP; the pod's cgroup is <cgroup2>/nm-<run>/n<i>/p<j> (agent.testbed.cluster). The
locator reads the addresses, so it also finds pods of a cluster whose address plan it does not
know, and re-reads them on a miss, so pods added later are found.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import re
import socket
import struct
from pathlib import Path

from agent.enroll.placement import PodPlacement
from agent.host import cgroup, netns
from agent.model.mesh import Workload
from agent.testbed.addressing import Plan

log = logging.getLogger(__name__)

_POD_SUFFIX = re.compile(r"n(\d+)p(\d+)")
SIOCGIFADDR = 0x8915


def eth0_address(netns_path: Path) -> ipaddress.IPv4Address | None:
    """The IPv4 address of eth0 inside a netns; None if it has no eth0 or no address.

    SIOCGIFADDR on a socket made in that netns, rather than netlink: pyroute2's synchronous
    IPRoute runs an event loop of its own, which cannot start inside the agent's running one.
    Test-bed pods hold exactly one address on eth0, the one this returns.
    """
    with netns.socket_in(netns_path, socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            reply = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", b"eth0"))
        except OSError as e:
            if e.errno in (errno.ENODEV, errno.EADDRNOTAVAIL):
                return None
            raise
    return ipaddress.IPv4Address(reply[20:24])  # struct ifreq: name[16], sockaddr_in at 16


class TestbedLocator:
    __test__ = False  # not a pytest test class

    def __init__(self, prefix: str, *, netns_dir: Path = netns.NETNS_RUN_DIR,
                 cgroup_root: Path | None = None) -> None:
        """`prefix`: the run's netns name prefix, "nm-<run>-"; `cgroup_root`: the run's cgroup
        subtree (default <cgroup2>/nm-<run>)."""
        if not prefix.endswith("-"):
            raise ValueError(f"netns prefix {prefix!r} should end with '-' (e.g. 'nm-abc123-')")
        self.prefix = prefix
        self.netns_dir = netns_dir
        self._cgroup_root = cgroup_root
        self._by_ip: dict[ipaddress.IPv4Address, str] = {}

    @classmethod
    def for_run(cls, run_id: str) -> TestbedLocator:
        return cls(Plan(run_id).prefix + "-")

    @property
    def cgroup_root(self) -> Path:
        if self._cgroup_root is None:
            self._cgroup_root = cgroup.mount_point() / self.prefix.rstrip("-")
        return self._cgroup_root

    def locate(self, workload: Workload) -> PodPlacement | None:
        ips = [ip for ip in workload.ips if isinstance(ip, ipaddress.IPv4Address)]
        if not ips:
            return None
        name = self._lookup(ips)
        if name is None:
            self.rescan()
            name = self._lookup(ips)
        if name is None:
            return None
        cg = self.cgroup_of(name)
        pids = sorted(cgroup.procs(cg)) if cg is not None else []
        return PodPlacement(str(self.netns_dir / name), cg, pids[0] if pids else None)

    def rescan(self) -> None:
        """Read eth0's addresses of every pod netns with the prefix (node netns hold node
        addresses, which are never a pod's)."""
        found: dict[ipaddress.IPv4Address, str] = {}
        try:
            names = sorted(p.name for p in self.netns_dir.iterdir()
                           if p.name.startswith(self.prefix)
                           and _POD_SUFFIX.fullmatch(p.name[len(self.prefix):]))
        except FileNotFoundError:
            names = []
        for name in names:
            try:
                ip = eth0_address(self.netns_dir / name)
            except OSError as e:  # removed while we looked
                log.debug("netns %s: %s", name, e)
                continue
            if ip is not None:
                found[ip] = name
        self._by_ip = found

    def cgroup_of(self, netns_name: str) -> Path | None:
        """The pod cgroup the test bed's naming gives a pod netns; None if it does not exist."""
        m = _POD_SUFFIX.fullmatch(netns_name[len(self.prefix):])
        if m is None:
            return None
        path = self.cgroup_root / f"n{m.group(1)}" / f"p{m.group(2)}"
        return path if path.is_dir() else None

    def _lookup(self, ips: list[ipaddress.IPv4Address]) -> str | None:
        for ip in ips:
            name = self._by_ip.get(ip)
            if name is not None and (self.netns_dir / name).exists():
                return name
        return None

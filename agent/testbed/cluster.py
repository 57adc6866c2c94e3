"""Cluster, Node and Pod: the network-namespace test bed.

Layout of one run (every name carries the run id):
- an underlay netns holding bridge br0; each node netns reaches it through a veth (node eth0);
- each pod netns has eth0 (pod IP /32, default route via its node's gateway address) paired with
  a veth p<j> in its node netns; node netns route their pod CIDR per /32 and other nodes' CIDRs
  via those nodes' underlay IPs (plain L3 routing, like most CNIs);
- cgroups: <cgroup2>/nm-<run>/n<i> is node i's managed root, the subtree its agent attaches
  programs to; pods live in n<i>/p<j> and node-level processes (agent, tunnel) in n<i>/sys, so the
  programs also see the tunnel's upstream connects (where destination-side policy is checked).
Nothing is created in the root netns, so the machine's own networking is untouched.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from agent.host import cgroup, netns, signals
from agent.testbed import registry
from agent.testbed.addressing import PODS_IN_FIRST_CIDR, Plan, new_run_id

log = logging.getLogger(__name__)


class TestbedError(RuntimeError):
    """The test bed could not be built or used."""

    __test__ = False  # not a pytest test class


class PodProcess:
    """A process started inside a pod or node (netns + cgroup)."""

    def __init__(
        self,
        pid: int,
        popen: subprocess.Popen[bytes] | None = None,
        proc: multiprocessing.process.BaseProcess | None = None,
    ) -> None:
        self.pid = pid
        self.popen = popen
        self._proc = proc

    def poll(self) -> int | None:
        if self.popen is not None:
            return self.popen.poll()
        assert self._proc is not None
        return self._proc.exitcode

    def wait(self, timeout: float | None = None) -> int | None:
        if self.popen is not None:
            return self.popen.wait(timeout)
        assert self._proc is not None
        self._proc.join(timeout)
        return self._proc.exitcode

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM, then SIGKILL after grace; reaps the child and closes its pipes."""
        try:
            self._stop(grace)
        finally:
            if self.popen is not None:
                for stream in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
                    if stream is not None:
                        stream.close()

    def _stop(self, grace: float) -> None:
        if self.poll() is not None:
            self.wait()
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.wait(grace)
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.wait(grace)


def _enter(ns_path: str, cg_path: str) -> None:
    """In a freshly forked child: join the cgroup, then the netns."""
    (Path(cg_path) / "cgroup.procs").write_text("0\n", encoding="ascii")
    fd = os.open(ns_path, os.O_RDONLY)
    netns.setns(fd)
    os.close(fd)


def _run_callable(
    ns_path: str, cg_path: str, fn: Callable[..., Any], args: tuple[Any, ...]
) -> None:
    _enter(ns_path, cg_path)
    fn(*args)


@dataclass
class Place:
    """Where processes of a pod or a node run: a netns and a cgroup."""

    cluster: Cluster
    netns: str
    cgroup: Path

    @property
    def netns_path(self) -> str:
        return str(netns.path_of(self.netns))

    def spawn(self, argv: Sequence[str], **popen_kw: Any) -> PodProcess:
        """Start a command inside this place; its PID is tracked for teardown."""
        ns_path, cg_path = self.netns_path, str(self.cgroup)
        p = subprocess.Popen(list(argv), preexec_fn=lambda: _enter(ns_path, cg_path), **popen_kw)  # noqa: PLW1509 -- setns/cgroup must happen between fork and exec
        return self.cluster.track(PodProcess(p.pid, popen=p))

    def start(self, fn: Callable[..., Any], *args: Any) -> PodProcess:
        """Run a Python callable in a forked child inside this place."""
        ctx = multiprocessing.get_context("fork")
        proc = ctx.Process(
            target=_run_callable, args=(self.netns_path, str(self.cgroup), fn, args), daemon=True
        )
        proc.start()
        assert proc.pid is not None
        return self.cluster.track(PodProcess(proc.pid, proc=proc))

    def python(self, code: str, *args: str, **popen_kw: Any) -> PodProcess:
        return self.spawn([sys.executable, "-c", code, *args], **popen_kw)

    def socket(self, family: int = 2, kind: int = 1) -> Any:
        """A socket in this netns, owned by the calling process (not in the place's cgroup)."""
        return netns.socket_in(self.netns, family, kind)

    def cookie(self) -> int:
        return netns.cookie_of(self.netns)


@dataclass
class Pod(Place):
    name: str = ""
    node_index: int = 0
    index: int = 0
    ip: ipaddress.IPv4Address = field(default_factory=lambda: ipaddress.IPv4Address(0))
    namespace: str = "default"
    service_account: str = "default"


@dataclass
class Node(Place):
    index: int = 0
    ip: ipaddress.IPv4Address = field(default_factory=lambda: ipaddress.IPv4Address(0))
    cgroup_root: Path = Path()
    pods: list[Pod] = field(default_factory=list)


class Cluster:
    """A test-bed cluster. Use as a context manager: teardown runs on errors and Ctrl-C too.

    >>> with Cluster(nodes=2, pods_per_node=2) as c:
    ...     server = c.pod(1, 0).python("...")
    """

    def __init__(
        self,
        nodes: int = 2,
        pods_per_node: int = 2,
        run_id: str | None = None,
        detached: bool = False,
        description: str = "",
    ) -> None:
        if nodes < 1 or pods_per_node < 0:
            raise ValueError("a cluster needs at least one node and a non-negative pod count")
        self.plan = Plan(run_id or new_run_id())
        self.n_nodes = nodes
        self.pods_per_node = pods_per_node
        self.detached = detached
        self.description = description
        self.nodes: list[Node] = []
        self._tracked: list[PodProcess] = []
        self._record: registry.RunRecord | None = None
        self._up = False
        self.cgroup_root = cgroup.mount_point() / self.plan.cgroup_name

    @property
    def run_id(self) -> str:
        return self.plan.run_id

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Cluster:
        self.up()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()

    def up(self) -> None:
        if os.geteuid() != 0:
            raise TestbedError("the test bed needs root (netns, veth and cgroups)")
        pid, started = registry.owner_marker()
        rec = registry.RunRecord(
            run_id=self.run_id,
            owner_pid=-1 if self.detached else pid,
            owner_started=0.0 if self.detached else started,
            cgroup=str(self.cgroup_root),
            description=self.description,
        )
        self._record = rec
        registry.save(rec)  # before anything exists, so a crash mid-build is still found
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        rec.namespaces = self.namespaces()
        registry.save(rec)
        self._up = True

    def down(self) -> None:
        """Idempotent teardown: processes, pins, namespaces, cgroups, state file."""
        for p in self._tracked:
            try:
                p.stop()
            except (OSError, subprocess.SubprocessError) as exc:
                log.warning("stopping pid %d: %s", p.pid, exc)
        self._tracked.clear()
        registry.teardown_run(self.run_id)
        self._up = False

    def pin_dir(self, node: int, label: str) -> Path:
        """A pin directory for an agent on node `node`, recorded in the run's state file so
        teardown (and `testbed cleanup` after a crash) uninstalls it. Call before the agent
        starts pinning."""
        if self._record is None:
            raise TestbedError("pin_dir needs a cluster that is up")
        path = registry.PIN_ROOT / self.plan.pin_name(node, label)
        if str(path) not in self._record.pins:
            self._record.pins.append(str(path))
            registry.save(self._record)
        registry.mark_pin(path, self.run_id)
        return path

    def track(self, p: PodProcess) -> PodProcess:
        self._tracked.append(p)
        return p

    # -- queries -----------------------------------------------------------------------------
    def pod(self, node: int, index: int) -> Pod:
        return self.nodes[node].pods[index]

    @property
    def pods(self) -> list[Pod]:
        return [p for n in self.nodes for p in n.pods]

    def namespaces(self) -> list[str]:
        return (
            [self.plan.underlay_ns] + [n.netns for n in self.nodes] + [p.netns for p in self.pods]
        )

    def describe(self) -> list[str]:
        lines = [
            f"run {self.run_id}: underlay netns {self.plan.underlay_ns} (bridge br0)",
            f"cgroup subtree {self.cgroup_root}",
        ]
        for n in self.nodes:
            lines.append(
                f"node {n.index}: netns {n.netns} ip {n.ip} pods {self.plan.pod_cidr(n.index)}"
                f" cgroup {n.cgroup_root}"
            )
            lines.extend(
                f"  pod {p.name}: netns {p.netns} ip {p.ip} cgroup {p.cgroup}" for p in n.pods
            )
        return lines

    # -- construction ------------------------------------------------------------------------
    def _build(self) -> None:
        plan = self.plan
        cgroup.create(self.cgroup_root)
        pr_netns.create(plan.underlay_ns)
        with IPRoute(netns=plan.underlay_ns) as ipr:
            _up_lo(ipr)
            ipr.link("add", ifname="br0", kind="bridge")
            bridge = ipr.link_lookup(ifname="br0")[0]
            ipr.link("set", index=bridge, state="up")
        for i in range(self.n_nodes):
            self.nodes.append(self._build_node(i, bridge))
        for node in self.nodes:
            with IPRoute(netns=node.netns) as ipr:
                for other in self.nodes:
                    if other is not node:
                        for cidr in self._used_pod_cidrs(other.index):
                            ipr.route("add", dst=str(cidr), gateway=str(other.ip))
        signals.checkpoint()  # a SIGTERM during the build: up() removes it all

    def _used_pod_cidrs(self, node: int) -> tuple[ipaddress.IPv4Network, ...]:
        cidrs = self.plan.pod_cidrs(node)
        return cidrs if self.pods_per_node > PODS_IN_FIRST_CIDR else cidrs[:1]

    def _build_node(self, i: int, bridge: int) -> Node:
        plan = self.plan
        ns = plan.node_ns(i)
        signals.checkpoint()  # between steps, never inside one (see agent.host.signals)
        pr_netns.create(ns)
        with IPRoute(netns=plan.underlay_ns) as ipr:
            port = plan.underlay_port(i)
            ipr.link("add", ifname=port, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns})
            idx = ipr.link_lookup(ifname=port)[0]
            ipr.link("set", index=idx, master=bridge, state="up")
        with IPRoute(netns=ns) as ipr:
            _up_lo(ipr)
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=eth0, address=str(plan.node_ip(i)), prefixlen=24)
            ipr.link("set", index=eth0, state="up")
        _sysctl(ns, "net/ipv4/ip_forward", "1")
        node_root = cgroup.create(self.cgroup_root / f"n{i}")
        node = Node(
            cluster=self,
            netns=ns,
            cgroup=cgroup.create(node_root / "sys"),
            index=i,
            ip=plan.node_ip(i),
            cgroup_root=node_root,
        )
        for j in range(self.pods_per_node):
            signals.checkpoint()
            node.pods.append(self._build_pod(node, j))
        return node

    def _build_pod(self, node: Node, j: int) -> Pod:
        plan = self.plan
        ns = plan.pod_ns(node.index, j)
        ip, gw = plan.pod_ip(node.index, j), plan.pod_gateway(node.index)
        pr_netns.create(ns)
        with IPRoute(netns=node.netns) as ipr:
            port = plan.pod_port(j)
            ipr.link("add", ifname=port, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns})
            idx = ipr.link_lookup(ifname=port)[0]
            ipr.addr("add", index=idx, address=str(gw), prefixlen=32)
            ipr.link("set", index=idx, state="up")
            ipr.route("add", dst=f"{ip}/32", oif=idx)
        with IPRoute(netns=ns) as ipr:
            _up_lo(ipr)
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=eth0, address=str(ip), prefixlen=32)
            ipr.link("set", index=eth0, state="up")
            ipr.route("add", dst=f"{gw}/32", oif=eth0, scope=253)  # scope link
            ipr.route("add", dst="0.0.0.0/0", gateway=str(gw))
        cg = cgroup.create(node.cgroup_root / f"p{j}")
        return Pod(
            cluster=self,
            netns=ns,
            cgroup=cg,
            name=f"n{node.index}p{j}",
            node_index=node.index,
            index=j,
            ip=ip,
        )


def _up_lo(ipr: IPRoute) -> None:
    ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def _sysctl(ns: str, key: str, value: str) -> None:
    # /proc/sys/net resolves against the calling thread's netns at open time.
    with netns.entered(ns), open(f"/proc/sys/{key}", "w", encoding="ascii") as f:
        f.write(value)

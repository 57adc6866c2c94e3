"""Sockets inside a pod's network namespace: listeners, marked upstreams, source-IP spoofing.

Every socket the tunnel owns carries SO_MARK with 0x539 in the low 12 bits (Istio's in-pod mark)
so the kernel redirect programs never capture it. Upstream sockets on the inbound side carry the
authenticated source identity id in the high 20 bits: mark = (id << 12) | 0x539, id 0 = none.

Source IP preservation: the inbound upstream socket binds the client's IP with IP_TRANSPARENT.
The application's replies to that (non-local) IP must come back to us instead of leaving the pod;
`prepare_pod_netns` arranges that: with tcp_fwmark_accept the app's accepted socket inherits our
SYN's mark, and a rule sends marked packets to a table whose only route is "everything is local".
Sockets that talk to the network (listeners and what they accept, HBONE dials, passthrough) use
TUNNEL_MARK, which a higher-priority rule sends to the main table, so they route normally.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from agent import abi
from agent.host import netns

# The all-ones identity id (abi.ID_TUNNEL) marks the tunnel's own network-facing sockets
# (listeners, HBONE dials, passthrough) so the local-delivery rule below never catches them.
TUNNEL_MARK = abi.mark(abi.ID_TUNNEL)
LOCAL_TABLE = 100
RULE_PRIORITY = 100
SO_ORIGINAL_DST = 80
IP_TRANSPARENT = 19
IP_FREEBIND = 15


class PodNetError(OSError):
    """A pod's netns could not be prepared or a socket could not be set up in it."""


def mark_for_identity(identity_id: int) -> int:
    if not 0 <= identity_id <= abi.MAX_IDENTITY_ID:
        raise ValueError(f"identity id {identity_id} does not fit in {abi.IDENTITY_BITS} bits")
    return abi.mark(identity_id)


def identity_of_mark(mark: int) -> int:
    return mark >> 12


def set_mark(sock: socket.socket, mark: int) -> None:
    # Marks use all 32 bits; an int above INT_MAX would not fit setsockopt's int argument.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, struct.pack("I", mark))


# In an unprivileged container /proc/sys is read-only; the DaemonSet mounts the host's /proc at
# /host/proc, and net sysctls there resolve against the writing thread's netns all the same.
SYSCTL_ROOTS = (Path("/proc/sys/net"), Path("/host/proc/sys/net"))


def _set_net_sysctl(key: str, target: str | Path) -> None:
    errors = []
    for root in SYSCTL_ROOTS:
        try:
            (root / key).write_text("1\n", encoding="ascii")
            return
        except OSError as exc:
            errors.append(exc)
    first = errors[0]
    msg = f"cannot set net.{key.replace('/', '.')} in {target}: {first}"
    raise PodNetError(first.errno, msg) from first


def prepare_pod_netns(target: str | Path) -> None:
    """Idempotently set up the return path for spoofed-source upstream connections."""
    # pyroute2 costs ~20 MiB resident; only the control process prepares netns, not workers.
    from pyroute2 import IPRoute  # noqa: PLC0415
    # tcp_fwmark_accept: the app's accepted socket inherits our SYN's mark. fwmark_reflect: the
    # kernel's own replies (RST for a closed port, ICMP) carry it too, so a refused upstream
    # connect fails at once instead of its RST being routed away to the spoofed client address.
    # tcp_migrate_req: when an agent closes its listener during an upgrade, the connections in
    # its accept queue (and half-open ones) move to the new agent's listener in the same
    # SO_REUSEPORT group instead of being reset (Linux 5.14).
    with netns.entered(target):
        for key in ("tcp_fwmark_accept", "fwmark_reflect", "tcp_migrate_req"):
            _set_net_sysctl(f"ipv4/{key}", target)
    # IPRoute(netns=...) forks a helper to open its socket, and a fork in this multi-threaded
    # process can inherit a held lock and hang; a socket opened in the entered netns needs none.
    with netns.entered(target):
        ipr_in_pod = IPRoute()
    with ipr_in_pod as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        steps: tuple[tuple[str, Callable[[], object]], ...] = (
            (f"ip rule fwmark {TUNNEL_MARK:#x} lookup main",
             lambda: ipr.rule("add", fwmark=TUNNEL_MARK, fwmask=0xFFFFFFFF, table=254,
                              priority=RULE_PRIORITY - 1)),
            (f"ip rule fwmark {abi.MARK_MAGIC:#x}/{abi.MARK_MASK:#x} lookup {LOCAL_TABLE}",
             lambda: ipr.rule("add", fwmark=abi.MARK_MAGIC, fwmask=abi.MARK_MASK, table=LOCAL_TABLE,
                              priority=RULE_PRIORITY)),
            (f"local 0.0.0.0/0 dev lo table {LOCAL_TABLE}",
             lambda: ipr.route("add", dst="0.0.0.0", dst_len=0, type="local", scope=254, oif=lo,
                               table=LOCAL_TABLE)),
        )
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # pyroute2's NetlinkError; EEXIST means already done
                if getattr(exc, "code", None) != errno.EEXIST:
                    raise PodNetError(errno.EIO, f"{what} in {target}: {exc}") from exc


class _NetnsFds:
    """Open netns fds kept for new sockets: entering a pod's netns is then setns, socket, setns
    back (netns.entered also opens and closes both namespace files: 4 more syscalls per
    connection). The tunnel forgets a pod's fd when the pod is removed."""

    def __init__(self) -> None:
        self._pods: dict[str, int] = {}
        self._home = threading.local()
        self._lock = threading.Lock()

    def socket_in(self, target: str | Path) -> socket.socket:
        key = str(target)
        with self._lock:
            fd = self._pods.get(key)
            if fd is None:
                fd = self._pods[key] = netns.open_ns(target)
        home: int | None = getattr(self._home, "fd", None)
        if home is None:
            home = self._home.fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        netns.setns(fd)
        try:
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            netns.setns(home)

    def forget(self, target: str | Path) -> None:
        with self._lock:
            fd = self._pods.pop(str(target), None)
        if fd is not None:
            os.close(fd)


_netns_fds = _NetnsFds()


def forget_netns(target: str | Path) -> None:
    """Close the netns fd kept for a pod's sockets (the pod was removed)."""
    _netns_fds.forget(target)


def _socket_in(target: str | Path, what: str,
               configure: Callable[[socket.socket], None]) -> socket.socket:
    """A non-blocking TCP socket created inside the target netns and set up by `configure`;
    closed, and reported as PodNetError naming `what`, if any step fails."""
    s = _netns_fds.socket_in(target)
    try:
        configure(s)
        s.setblocking(False)
    except OSError as exc:
        s.close()
        raise PodNetError(exc.errno, f"{what} in {target}: {exc.strerror}") from exc
    return s


def listener(target: str | Path, ip: str, port: int, backlog: int = 1024) -> socket.socket:
    """A non-blocking marked TCP listener created inside the target netns."""

    def configure(s: socket.socket) -> None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # An upgraded agent (or a worker process) listens beside this one on the same port;
        # only the agent's cgroups may bind these ports in a pod (bpf/lib/portguard.h).
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        set_mark(s, TUNNEL_MARK)
        s.bind((ip, port))
        s.listen(backlog)

    return _socket_in(target, f"cannot listen on {ip}:{port}", configure)


def upstream(target: str | Path, mark: int, source_ip: str | None = None) -> socket.socket:
    """A non-blocking marked TCP socket in the target netns, bound to `source_ip` transparently
    (IP_TRANSPARENT + IP_FREEBIND) when given, so the destination sees the real client address."""

    def configure(s: socket.socket) -> None:
        set_mark(s, mark)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source_ip is not None:
            s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            s.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            s.bind((source_ip, 0))

    return _socket_in(target, "cannot set up an upstream socket", configure)


def original_dst(sock: socket.socket) -> tuple[ipaddress.IPv4Address, int]:
    """SO_ORIGINAL_DST of a redirected connection (answered by iptables or the getsockopt
    program); a struct sockaddr_in."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack_from("!2xH4s", raw)
    return ipaddress.IPv4Address(addr), int(port)


def service_dst(sock: socket.socket) -> tuple[ipaddress.IPv4Address, int] | None:
    """The Service VIP:port the kernel chose the original destination from (the getsockopt
    program's SO_SERVICE_DST), or None: not a Service connect, or no such program."""
    try:
        raw = sock.getsockopt(socket.SOL_IP, abi.SO_SERVICE_DST, 16)
    except OSError:
        return None
    port, addr = struct.unpack_from("!2xH4s", raw)
    return ipaddress.IPv4Address(addr), int(port)


def local_address(sock: socket.socket) -> tuple[ipaddress.IPv4Address, int]:
    """The accepted socket's local address: the original destination when sk_lookup steered it."""
    ip, port = sock.getsockname()[:2]
    return ipaddress.IPv4Address(ip), int(port)


def abort_with_reset(sock: socket.socket) -> None:
    """Close so the peer sees RST rather than FIN (a reset propagated from the tunnel)."""
    with contextlib.suppress(OSError):  # already closed: nothing to reset
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

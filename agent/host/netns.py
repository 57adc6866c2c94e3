"""Network namespaces: named netns under /var/run/netns, entering one per thread, socket cookies.

Python 3.11 has no os.setns, so setns(2) is called through libc. Entering a netns affects only the
calling thread, which lets the agent create sockets (listeners, upstream connects) inside a pod's
namespace and return to its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import socket
from collections.abc import Iterator
from pathlib import Path

NETNS_RUN_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class NetnsError(OSError):
    """A namespace could not be found or entered."""


def path_of(name: str) -> Path:
    return NETNS_RUN_DIR / name


def setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"setns(CLONE_NEWNET) failed: {os.strerror(err)}")


def open_ns(target: str | Path) -> int:
    """Open a netns by name (/var/run/netns/<name>) or by path (/proc/<pid>/ns/net)."""
    path = Path(target) if "/" in str(target) else path_of(str(target))
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise NetnsError(exc.errno, f"network namespace {target} does not exist") from exc


@contextlib.contextmanager
def entered(target: str | Path) -> Iterator[None]:
    """Run the body with this thread inside the target netns, then return to where it was."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        fd = open_ns(target)
        try:
            setns(fd)
        finally:
            os.close(fd)
        try:
            yield
        finally:
            setns(home)
    finally:
        os.close(home)


def socket_in(
    target: str | Path, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
) -> socket.socket:
    """A socket that belongs to the target netns (sockets keep the netns they were made in)."""
    with entered(target):
        return socket.socket(family, kind)


def cookie_of(target: str | Path) -> int:
    """The kernel's netns cookie, the key the datapath uses to recognise an enrolled pod."""
    with socket_in(target, socket.AF_INET, socket.SOCK_DGRAM) as s:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


def list_named() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_RUN_DIR.iterdir())
    except FileNotFoundError:
        return []

"""Connecting to a pod's app (inbound HBONE and plaintext) or to a destination outside the mesh
(passthrough), and the typed error every failed upstream becomes.

`UpstreamError` carries what each side needs from a failure at once: the CONNECT status the
destination answers, Istio's response flag, the refusal cause token, the transport bits and the
human reason. It replaces "deny"/"error" strings and bare status ints, so no caller maps one to
the other again.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

from agent.identity.spiffe import Identity
from ztunnel import connect, podnet
from ztunnel.events import Cause, ConnectionEvent, ResponseFlag, TransportFlag
from ztunnel.lograte import RepeatLimiter
from ztunnel.model import PodSpec
from ztunnel.relay import PlainSide

log = logging.getLogger(__name__)
log.addFilter(RepeatLimiter.shared())


class UpstreamError(ConnectionError):
    """No upstream: `status` (CONNECT answer), `response`, `cause`, `flag` and `why` say why."""

    def __init__(self, why: str, *, status: int = connect.UNAVAILABLE,
                 response: ResponseFlag = ResponseFlag.CONNECT, cause: Cause = Cause.UPSTREAM,
                 flag: TransportFlag = TransportFlag.UPSTREAM_FAILURE) -> None:
        super().__init__(why)
        self.why = why
        self.status = status
        self.response = response
        self.cause = cause
        self.flag = flag

    def refusal(self, ev: ConnectionEvent, reason: str | None = None) -> ConnectionEvent:
        """The close event of `ev` refused for this reason."""
        return ev.refused(self.response, self.cause, self.flag,
                          self.why if reason is None else reason)

    @classmethod
    def denied(cls, why: str) -> UpstreamError:
        """The kernel's policy program refused the connect (EPERM/EACCES): 401."""
        return cls(why, status=connect.UNAUTHORIZED, response=ResponseFlag.DENY,
                   cause=Cause.POLICY_DENY, flag=TransportFlag.DENY)

    @classmethod
    def unavailable(cls, why: str, cause: Cause = Cause.UPSTREAM) -> UpstreamError:
        """Any other failure to reach the app: 503."""
        return cls(why, cause=cause)

    @classmethod
    def from_status(cls, status: int) -> UpstreamError:
        """What a non-200 CONNECT answer from the destination means on the source side."""
        if status == connect.UNAUTHORIZED:
            return cls("denied by the destination's policy", status=status,
                       response=ResponseFlag.DENY, cause=Cause.REMOTE_DENY,
                       flag=TransportFlag.DENY)
        if status == connect.BAD_REQUEST:
            return cls("the destination rejected the request (wrong pod for that IP?)",
                       status=status, cause=Cause.REMOTE_BAD_REQUEST,
                       flag=TransportFlag.BAD_REQUEST)
        if status == connect.UNAVAILABLE:
            return cls("the destination could not reach the app (not listening?)", status=status)
        return cls("unexpected status", status=status)


class DialError(UpstreamError):
    """No HBONE connection to the destination (the pool's dialer failed)."""


# connect() of a marked upstream socket, where the kernel's policy program decides (EPERM and
# EACCES raise PermissionError). Tunnel._upstream_connect is the one used; tests override it.
UpstreamConnect = Callable[[PodSpec, Identity | None, socket.socket, tuple[str, int], int],
                           Awaitable[None]]
# Called right before an upstream connect() that the tunnel makes itself (no await): the
# testing seam where a test stands in for the kernel's policy (raise PermissionError). Tunnel's
# _upstream_check does nothing: the kernel decides in connect().
UpstreamCheck = Callable[[PodSpec, Identity | None, tuple[str, int], int], None]


async def connect_plain(spec: PodSpec, target: tuple[str, int], mark: int, *,
                        source_ip: str | None, peer: Identity | None,
                        connect_socket: UpstreamConnect) -> PlainSide:
    """A paused PlainSide connected to `target` from inside the pod's netns, marked `mark` and
    (with `source_ip`) bound transparently to the client's address; UpstreamError otherwise."""
    loop = asyncio.get_running_loop()
    sock = upstream_socket(spec, mark, source_ip)
    try:
        await connect_socket(spec, peer, sock, target, mark)
    except (OSError, TimeoutError) as exc:
        sock.close()
        raise connect_failure(spec, target, peer, exc) from None
    except BaseException:
        sock.close()
        raise
    _, plain = await loop.connect_accepted_socket(lambda: PlainSide(start_paused=True), sock)
    return plain


def upstream_socket(spec: PodSpec, mark: int, source_ip: str | None) -> socket.socket:
    """The marked upstream socket inside the pod's netns; UpstreamError (503) if it cannot be
    made."""
    try:
        return podnet.upstream(spec.netns, mark, source_ip)
    except OSError as exc:
        log.warning("cannot create upstream socket in pod %s: %s", spec.name, exc)
        raise UpstreamError.unavailable(f"cannot create upstream socket: {exc}") from None


def connect_failure(spec: PodSpec, target: tuple[str, int], peer: Identity | None,
                    exc: OSError | TimeoutError) -> UpstreamError:
    """What a failed upstream connect means (logged once): EPERM/EACCES from the kernel's policy
    program is a deny (401), anything else unavailable (503)."""
    if isinstance(exc, PermissionError):
        who = f"{peer}" if peer else "no identity (plaintext)"
        log.warning("upstream connect to %s:%d in pod %s for %s denied by policy (%s)",
                    target[0], target[1], spec.name, who, exc.strerror or exc)
        return UpstreamError.denied(f"denied by policy ({exc.strerror or exc})")
    hint = "nothing listens on that port?" if isinstance(exc, ConnectionRefusedError) else (
        "the app did not answer in time" if isinstance(exc, TimeoutError) else "")
    what = getattr(exc, "strerror", None) or type(exc).__name__
    log.warning("upstream connect to %s:%d in pod %s failed: %s %s", target[0], target[1],
                spec.name, what, hint)
    return UpstreamError.unavailable(f"upstream connect failed: {what} {hint}".rstrip())


def reset(conn: socket.socket) -> None:
    """Close an accepted socket so the peer sees RST (refused before any data)."""
    podnet.abort_with_reset(conn)
    conn.close()

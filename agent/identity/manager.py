"""Workload certificates of the identities running on this node, kept fresh.

One certificate per identity (service account), shared by every pod with that identity on the
node. `want()` prefetches (a workload appeared), `get()` fetches on first use, `forget()` drops
an identity that left the node. Each identity has one task that renews at half-life; on failure
it retries with exponential jittered backoff (Istio's values) and keeps serving the old
certificate while it is still valid. A semaphore bounds concurrent CSRs.

`current()` is synchronous and cheap for the tunnel's hot path; `subscribe()` reports rotations.
Private keys stay in memory unless `key_dir` is set (then files are written with mode 0600).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry

from agent.backoff import Backoff
from agent.host.files import write_private
from agent.identity import pki
from agent.identity.caerror import CaError
from agent.identity.metrics import CertificateMetrics
from agent.identity.spiffe import Identity
from agent.identity.workloadcert import WorkloadCertificate

log = logging.getLogger(__name__)

__all__ = [
    "Backoff",
    "CertificateIssuer",
    "CertificateManager",
    "CertificateUnavailable",
    "Rotation",
    "WorkloadCertificate",
]


class CertificateIssuer(Protocol):
    """Issues a certificate for an identity (CaClient implements it)."""

    async def issue(self, identity: Identity) -> WorkloadCertificate: ...


class CertificateUnavailable(Exception):  # noqa: N818  # reads as a state, like TimeoutError
    """No valid certificate for an identity; the cause is chained and in the message."""


@dataclass(frozen=True)
class Rotation:
    """identity's certificate changed from old to new (old None: first; new None: forgotten)."""

    identity: Identity
    old: WorkloadCertificate | None
    new: WorkloadCertificate | None


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(eq=False)
class _Entry:
    identity: Identity
    cert: WorkloadCertificate | None = None
    refresh_at: float = 0.0  # wall-clock seconds
    failures: int = 0
    task: asyncio.Task[None] | None = None
    waiters: list[asyncio.Future[WorkloadCertificate]] = field(default_factory=list)

    def valid(self) -> WorkloadCertificate | None:
        return self.cert if self.cert is not None and self.cert.valid_at(_now()) else None

    def resolve(self, cert: WorkloadCertificate | None, error: Exception | None = None) -> None:
        waiters, self.waiters = self.waiters, []
        for fut in waiters:
            if fut.done():
                continue  # the caller timed out or was cancelled
            if cert is not None:
                fut.set_result(cert)
            else:
                fut.set_exception(error or CertificateUnavailable(str(self.identity)))


class CertificateManager:
    def __init__(self, source: CertificateIssuer, *, max_in_flight: int = 8,
                 backoff: Backoff | None = None, registry: CollectorRegistry | None = None,
                 key_dir: Path | None = None, trust_bundle: Sequence[str] = (),
                 rng: random.Random | None = None) -> None:
        self._source = source
        self._sem = asyncio.Semaphore(max_in_flight)
        self.backoff = backoff or Backoff()
        self.metrics = CertificateMetrics(registry)
        self.key_dir = key_dir
        self._rng = rng or random.Random()
        self._entries: dict[Identity, _Entry] = {}
        self._subscribers: list[Callable[[Rotation], None]] = []
        self._bundle_subscribers: list[Callable[[tuple[str, ...]], None]] = []
        self._bundle: tuple[str, ...] = ()
        if trust_bundle:
            self.set_trust_bundle(trust_bundle)

    # -- queries -------------------------------------------------------------------------------

    def current(self, identity: Identity) -> WorkloadCertificate | None:
        """The valid certificate of identity right now, or None. Never blocks."""
        entry = self._entries.get(identity)
        return entry.valid() if entry is not None else None

    def identities(self) -> set[Identity]:
        return set(self._entries)

    @property
    def trust_bundle(self) -> tuple[str, ...]:
        return self._bundle

    # -- wanting and forgetting ----------------------------------------------------------------

    def want(self, identity: Identity) -> None:
        """Start fetching (and then renewing) identity's certificate. Needs a running loop."""
        self._entry(identity)

    async def get(self, identity: Identity, timeout: float | None = None) -> WorkloadCertificate:
        """A valid certificate for identity, fetching it first if needed.

        Raises CertificateUnavailable if the attempt in progress fails and no valid certificate
        exists (the background task keeps retrying), or TimeoutError after timeout seconds.
        """
        entry = self._entry(identity)
        cert = entry.valid()
        if cert is not None:
            return cert
        fut: asyncio.Future[WorkloadCertificate] = asyncio.get_running_loop().create_future()
        entry.waiters.append(fut)
        return await asyncio.wait_for(fut, timeout)

    def forget(self, identity: Identity) -> None:
        """identity left the node: stop renewing, drop its certificate (and files)."""
        entry = self._entries.pop(identity, None)
        if entry is None:
            return
        if entry.task is not None:
            entry.task.cancel()
        entry.resolve(None, CertificateUnavailable(f"{identity} was forgotten (left the node)"))
        self.metrics.forget(identity.uri)
        self._unpersist(identity)
        if entry.cert is not None:
            self._notify(Rotation(identity, entry.cert, None))

    async def close(self) -> None:
        tasks = [e.task for e in self._entries.values() if e.task is not None]
        for identity in list(self._entries):
            self.forget(identity)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _entry(self, identity: Identity) -> _Entry:
        entry = self._entries.get(identity)
        if entry is None:
            entry = _Entry(identity)
            self._entries[identity] = entry
        if entry.task is None or entry.task.done():
            entry.task = asyncio.get_running_loop().create_task(
                self._maintain(entry), name=f"cert {identity}")
        return entry

    # -- subscriptions -------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[Rotation], None]) -> Callable[[], None]:
        """Call callback(Rotation) on every change; returns an unsubscribe function."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def subscribe_trust_bundle(
            self, callback: Callable[[tuple[str, ...]], None]) -> Callable[[], None]:
        self._bundle_subscribers.append(callback)
        return lambda: self._bundle_subscribers.remove(callback)

    def set_trust_bundle(self, roots: Sequence[str]) -> None:
        """Replace the roots peers' certificates must chain to (validated PEMs)."""
        parsed = [c for pem in roots for c in pki.certs_from_pem(pem)]
        if not parsed:
            raise ValueError("trust bundle holds no certificates")
        bundle = tuple(pki.cert_to_pem(c) for c in parsed)
        if bundle == self._bundle:
            return
        self._bundle = bundle
        log.info("trust bundle now holds %d root(s)", len(bundle))
        for entry in self._entries.values():
            # A root left the bundle: peers will refuse certificates chaining to it, so renew
            # now rather than at half-life (the CA signs with a root that is still trusted).
            if entry.cert is not None and entry.cert.root_pem not in bundle:
                log.info("certificate for %s chains to a root no longer trusted: renewing now",
                         entry.identity)
                self._renew_now(entry)
        for callback in list(self._bundle_subscribers):
            try:
                callback(bundle)
            except Exception:
                log.exception("trust bundle subscriber %r failed", callback)

    def _renew_now(self, entry: _Entry) -> None:
        entry.refresh_at = 0.0
        entry.failures = 0
        if entry.task is not None:
            entry.task.cancel()
        with contextlib.suppress(RuntimeError):  # no running loop: the next want() starts it
            entry.task = asyncio.get_running_loop().create_task(
                self._maintain(entry), name=f"cert {entry.identity}")

    def _notify(self, rotation: Rotation) -> None:
        for callback in list(self._subscribers):
            try:
                callback(rotation)
            except Exception:
                log.exception("rotation subscriber %r failed", callback)

    # -- the per-identity task -----------------------------------------------------------------

    async def _maintain(self, entry: _Entry) -> None:
        identity = entry.identity
        while True:
            if entry.cert is not None:
                delay = entry.refresh_at - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            try:
                new = await self._fetch(identity)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                entry.failures += 1
                reason = e.reason if isinstance(e, CaError) else "internal"
                self.metrics.failures.labels(identity.uri, reason).inc()
                delay = self.backoff.delay(entry.failures, self._rng.random())
                still = entry.valid()
                log.warning("certificate for %s failed (attempt %d, %s): %s; retrying in %.1fs%s",
                            identity, entry.failures, reason, e, delay,
                            f"; serving serial {still.serial:x} meanwhile" if still else "")
                if still is None:
                    entry.resolve(None, CertificateUnavailable(
                        f"no certificate for {identity}: {e}"))
                await asyncio.sleep(delay)
                continue
            entry.failures = 0
            # Keep the old certificate until the new one is valid (CA clock ahead of ours).
            wait = (new.not_before - _now()).total_seconds()
            if wait > 0 and entry.valid() is not None:
                await asyncio.sleep(wait)
            self._install(entry, new)

    async def _fetch(self, identity: Identity) -> WorkloadCertificate:
        async with self._sem:
            self.metrics.in_flight.inc()
            try:
                cert = await self._source.issue(identity)
            finally:
                self.metrics.in_flight.dec()
        if cert.identity != identity:
            raise CaError("invalid_response", f"asked for {identity}, got {cert.identity}")
        return cert

    def _install(self, entry: _Entry, new: WorkloadCertificate) -> None:
        old, entry.cert = entry.cert, new
        # Half of the remaining life from when we got it: not_before is backdated for clock skew.
        start = max(new.not_before.timestamp(), time.time())
        entry.refresh_at = start + (new.not_after.timestamp() - start) / 2
        self.metrics.expiry.labels(entry.identity.uri).set(new.not_after.timestamp())
        self.metrics.rotations.labels(entry.identity.uri).inc()
        log.info("certificate for %s: serial %x, expires %s, renewing at %s", entry.identity,
                 new.serial, new.not_after, datetime.fromtimestamp(entry.refresh_at, UTC))
        self._persist(new)
        entry.resolve(new)
        self._notify(Rotation(entry.identity, old, new))

    # -- optional files ------------------------------------------------------------------------

    def _dir_of(self, identity: Identity) -> Path:
        assert self.key_dir is not None
        return self.key_dir / identity.trust_domain / identity.namespace / identity.service_account

    def _persist(self, cert: WorkloadCertificate) -> None:
        if self.key_dir is None:
            return
        where = self._dir_of(cert.identity)
        where.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name, data in (("key.pem", cert.key_pem()), ("cert-chain.pem", cert.chain_pem()),
                           ("root-cert.pem", cert.root_pem.encode())):
            write_private(where / name, data)

    def _unpersist(self, identity: Identity) -> None:
        if self.key_dir is not None:
            shutil.rmtree(self._dir_of(identity), ignore_errors=True)


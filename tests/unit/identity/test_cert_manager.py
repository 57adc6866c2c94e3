"""CertificateManager against a real embedded CA on loopback: fetch, share, rotate, outages."""

from __future__ import annotations

import asyncio
import random
import stat
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import pytest
from ca_harness import BACKEND, DB, FRONTEND, Placement, running_ca
from prometheus_client import CollectorRegistry

from agent.identity import pki
from agent.identity.caclient import CaClient
from agent.identity.manager import (
    Backoff,
    CertificateManager,
    CertificateUnavailable,
    Rotation,
)
from agent.identity.spiffe import Identity
from agent.identity.workloadcert import WorkloadCertificate

FAST = Backoff(initial=0.05, factor=2.0, jitter=0.2, cap=0.5)


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())  # type: ignore[arg-type]  # body() is a coroutine


class GatedSource:
    """Passes requests to a real CaClient, but only while the gate is open; counts concurrency."""

    def __init__(self, client: CaClient, ttl: timedelta) -> None:
        self.client = client
        self.ttl = ttl
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = asyncio.Event()  # set when a request is held at the closed gate
        self.active = 0
        self.peak = 0
        self.calls = 0

    async def issue(self, identity: Identity) -> WorkloadCertificate:
        self.calls += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if not self.gate.is_set():
                self.waiting.set()
            await self.gate.wait()
            return await self.client.issue(identity, self.ttl)
        finally:
            self.active -= 1


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def until(cond: Callable[[], bool], what: str, limit: float = 20.0) -> None:
    """Poll for a state; the limit only turns a hang into a clear failure."""
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.02)


def test_get_fetches_once_and_shares_per_identity(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_ca() as ca:
            client = ca.client()
            source = GatedSource(client, timedelta(minutes=5))
            reg = CollectorRegistry()
            mgr = CertificateManager(source, registry=reg, key_dir=tmp_path)
            try:
                assert mgr.current(FRONTEND) is None
                a, b = await asyncio.gather(mgr.get(FRONTEND), mgr.get(FRONTEND))
                assert a is b
                assert mgr.current(FRONTEND) is a
                assert source.calls == 1
                assert a.identity == FRONTEND
                assert sample(reg, "nodemesh_certificate_rotations_total",
                              identity=FRONTEND.uri) == 1
                assert sample(reg, "nodemesh_certificate_expiry_timestamp_seconds",
                              identity=FRONTEND.uri) == a.not_after.timestamp()
                assert sample(reg, "nodemesh_certificate_csrs_in_flight") == 0

                where = tmp_path / "cluster.local" / "shop" / "frontend"
                for name in ("key.pem", "cert-chain.pem", "root-cert.pem"):
                    assert stat.S_IMODE((where / name).stat().st_mode) == 0o600
                key = pki.key_from_pem((where / "key.pem").read_bytes())
                assert key.public_key() == a.key.public_key()
                assert (where / "root-cert.pem").read_text() == ca.root_pem

                rotations: list[Rotation] = []
                mgr.subscribe(rotations.append)
                mgr.forget(FRONTEND)
                assert mgr.current(FRONTEND) is None
                assert rotations == [Rotation(FRONTEND, a, None)]
                assert not where.exists()
                assert reg.get_sample_value("nodemesh_certificate_expiry_timestamp_seconds",
                                            {"identity": FRONTEND.uri}) is None
            finally:
                await mgr.close()
                await client.close()
    run(body)


def test_refused_identity_surfaces_the_ca_reason() -> None:
    async def body() -> None:
        async with running_ca() as ca:
            client = ca.client()
            reg = CollectorRegistry()
            mgr = CertificateManager(client, registry=reg, backoff=FAST)
            try:
                with pytest.raises(CertificateUnavailable) as err:
                    await mgr.get(DB)  # scheduled on n2, we are n1
                assert f"identity {DB.uri} is not scheduled on node n1" in str(err.value)
                assert sample(reg, "nodemesh_certificate_rotation_failures_total",
                              identity=DB.uri, reason="permission_denied") >= 1
                assert mgr.current(DB) is None
            finally:
                await mgr.close()
                await client.close()
    run(body)


def test_in_flight_csrs_are_bounded() -> None:
    async def body() -> None:
        ids = [Identity("cluster.local", "shop", f"sa{i}") for i in range(6)]
        async with running_ca(placement=Placement({"n1": set(ids)})) as ca:
            client = ca.client()
            source = GatedSource(client, timedelta(minutes=5))
            source.gate.clear()
            reg = CollectorRegistry()
            mgr = CertificateManager(source, registry=reg, max_in_flight=2)
            try:
                for identity in ids:
                    mgr.want(identity)
                await until(lambda: source.active == 2, "two CSRs held at the gate")
                await asyncio.sleep(0.1)  # give the other four a chance to (wrongly) get in
                assert source.active == 2
                assert sample(reg, "nodemesh_certificate_csrs_in_flight") == 2
                source.gate.set()
                certs = await asyncio.gather(*(mgr.get(i) for i in ids))
                assert [c.identity for c in certs] == ids
                assert source.peak == 2
                assert sample(reg, "nodemesh_certificate_csrs_in_flight") == 0
            finally:
                await mgr.close()
                await client.close()
    run(body)


def test_rotates_at_half_life_keeping_old_until_new_arrives() -> None:
    async def body() -> None:
        async with running_ca() as ca:
            client = ca.client()
            source = GatedSource(client, timedelta(seconds=2))
            reg = CollectorRegistry()
            mgr = CertificateManager(source, registry=reg, backoff=FAST)
            rotations: list[Rotation] = []
            rotated = asyncio.Event()

            def on_rotation(r: Rotation) -> None:
                rotations.append(r)
                if r.old is not None:
                    rotated.set()

            mgr.subscribe(on_rotation)
            try:
                before = time.time()
                first = await mgr.get(BACKEND)
                source.gate.clear()  # hold the renewal CSR to observe the in-between state
                await source.waiting.wait()
                # The renewal started at (not before) half of the remaining life ...
                assert time.time() >= (before + first.not_after.timestamp()) / 2
                # ... and while it is outstanding the old certificate is still served.
                assert mgr.current(BACKEND) is first
                assert await mgr.get(BACKEND) is first
                assert not rotated.is_set()
                source.gate.set()
                await rotated.wait()
                second = mgr.current(BACKEND)
                assert second is not None and second is not first
                assert second.serial != first.serial
                assert second.identity == BACKEND
                assert second.key.public_key() != first.key.public_key()  # fresh key per CSR
                assert rotations[0] == Rotation(BACKEND, None, first)
                assert rotations[1] == Rotation(BACKEND, first, second)
                assert sample(reg, "nodemesh_certificate_rotations_total",
                              identity=BACKEND.uri) == 2
            finally:
                await mgr.close()
                await client.close()
    run(body)


def test_ca_outage_backs_off_serves_old_cert_and_recovers() -> None:
    async def body() -> None:
        authority = pki.Authority.generate("cluster.local")
        reg = CollectorRegistry()
        failures = {"identity": FRONTEND.uri, "reason": "unavailable"}
        async with running_ca(authority=authority) as ca:
            port = int(ca.address.rsplit(":", 1)[1])
            client = ca.client(timeout=2.0)
            mgr = CertificateManager(GatedSource(client, timedelta(seconds=4)), registry=reg,
                                     backoff=FAST)
            try:
                first = await mgr.get(FRONTEND)
                recovered = asyncio.Event()
                mgr.subscribe(lambda r: recovered.set() if r.old is first else None)
                await ca.server.stop(None)  # outage: renewals at half-life fail

                await until(lambda: sample(reg, "nodemesh_certificate_rotation_failures_total",
                                           **failures) >= 2, "two failed renewals")
                assert mgr.current(FRONTEND) is first  # still valid, still served
                assert sample(reg, "nodemesh_certificate_csrs_in_flight") == 0
                assert not recovered.is_set()
                failed = sample(reg, "nodemesh_certificate_rotation_failures_total", **failures)

                # The CA comes back on the same address with the same root.
                async with running_ca(authority=authority, port=port):
                    await recovered.wait()
                second = mgr.current(FRONTEND)
                assert second is not None and second.serial != first.serial
                assert sample(reg, "nodemesh_certificate_rotations_total",
                              identity=FRONTEND.uri) == 2
                assert sample(reg, "nodemesh_certificate_rotation_failures_total",
                              **failures) >= failed
            finally:
                await mgr.close()
                await client.close()
    run(body)


def test_backoff_follows_istio_schedule() -> None:
    b = Backoff()
    rng = random.Random(7)
    delays = [b.delay(n, rng.random()) for n in range(1, 12)]
    bases = [min(150.0, 0.5 * 2 ** (n - 1)) for n in range(1, 12)]
    for d, base in zip(delays, bases, strict=True):
        assert base * 0.8 <= d <= base * 1.2
    assert bases[-1] == 150.0
    assert len(set(delays)) == len(delays)  # jittered


def test_trust_bundle_updates_notify_subscribers() -> None:
    async def body() -> None:
        root_a = pki.cert_to_pem(pki.Authority.generate("cluster.local").root)
        root_b = pki.cert_to_pem(pki.Authority.generate("cluster.local").root)
        async with running_ca() as ca:
            client = ca.client()
            mgr = CertificateManager(client, registry=CollectorRegistry(), trust_bundle=[root_a])
            seen: list[tuple[str, ...]] = []
            mgr.subscribe_trust_bundle(seen.append)
            mgr.set_trust_bundle([root_a])  # unchanged: no event
            mgr.set_trust_bundle([root_a + root_b])
            assert seen == [(root_a, root_b)]
            assert mgr.trust_bundle == (root_a, root_b)
            with pytest.raises(ValueError):
                mgr.set_trust_bundle(["not a certificate"])
            assert mgr.trust_bundle == (root_a, root_b)
            await mgr.close()
            await client.close()
    run(body)

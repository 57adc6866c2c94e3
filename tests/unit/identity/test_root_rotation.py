"""Root rotation with a real CA on loopback: the trust bundle file, the CA client's anchors, and
the manager renewing certificates whose root left the bundle."""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta
from pathlib import Path

import pytest
from ca_harness import FRONTEND, running_ca
from prometheus_client import CollectorRegistry

from agent.identity import pki
from agent.identity.caerror import CaError
from agent.identity.manager import Backoff, CertificateManager
from agent.identity.trustbundle import TrustBundleError, TrustBundleFile, read_pem_bundle

FAST = Backoff(initial=0.05, factor=2.0, jitter=0.2, cap=0.5)


def pem(auth: pki.Authority) -> str:
    return pki.cert_to_pem(auth.root)


def test_bundle_file_rereads_changes_and_keeps_the_last_good(tmp_path: Path) -> None:
    a, b = pki.Authority.generate("cluster.local"), pki.Authority.generate("cluster.local")
    f = tmp_path / "roots.pem"
    f.write_text(pem(a))
    watch = TrustBundleFile(f)
    assert watch.bundle == (pem(a),) and watch.poll() is None
    f.write_text(pem(a) + pem(b))
    assert watch.poll() == (pem(a), pem(b))
    f.write_text(pem(a) + "-----BEGIN CERTIFICATE-----\ngarbage")  # a half-written file
    assert watch.poll() is None and watch.bundle == (pem(a), pem(b)) and watch.errors == 1
    leaf = a.issue(pki.generate_key().public_key(), timedelta(hours=1), uris=["spiffe://x/y"])
    f.write_text(pki.cert_to_pem(leaf))
    assert watch.poll() is None and watch.errors == 2
    with pytest.raises(TrustBundleError, match=r"certificate 1 .* is not a CA certificate"):
        read_pem_bundle(f)
    f.write_text(pem(b))
    assert watch.poll() == (pem(b),)
    os.unlink(f)
    assert watch.poll() is None and watch.bundle == (pem(b),)
    with pytest.raises(TrustBundleError, match="cannot read"):
        TrustBundleFile(f)


def test_rotation_old_plus_new_then_new_only() -> None:
    """The documented order: both roots trusted, CA switched to the new root (same address),
    then the old root dropped: the certificate still chaining to it is renewed at once."""
    async def body() -> None:
        old, new = pki.Authority.generate("cluster.local"), pki.Authority.generate("cluster.local")
        async with running_ca(authority=old) as ca_old:
            port = ca_old.address.rpartition(":")[2]
            client = ca_old.client(ttl=timedelta(hours=1))
            mgr = CertificateManager(client, registry=CollectorRegistry(), backoff=FAST,
                                     trust_bundle=[pem(old)])
            first = await mgr.get(FRONTEND, timeout=10)
            assert first.root_pem == pem(old)
        both = (pem(old), pem(new))
        client.set_ca_roots("".join(both))
        client.set_trust_bundle(both)
        mgr.set_trust_bundle(both)
        assert mgr.current(FRONTEND) == first  # still trusted: no renewal
        async with running_ca(authority=new, port=int(port)):
            # The new CA's own TLS certificate chains to the new root: trusted via the bundle.
            renewed = await client.issue(FRONTEND)
            assert renewed.root_pem == pem(new)
            client.set_ca_roots(pem(new))
            client.set_trust_bundle([pem(new)])
            mgr.set_trust_bundle([pem(new)])
            for _ in range(200):
                cur = mgr.current(FRONTEND)
                if cur is not None and cur.root_pem == pem(new):
                    break
                await asyncio.sleep(0.05)
            cur = mgr.current(FRONTEND)
            assert cur is not None and cur.root_pem == pem(new) and cur.serial != first.serial
            await mgr.close()
            await client.close()
    asyncio.run(body())


def test_client_refuses_a_ca_whose_root_is_not_in_its_anchors() -> None:
    async def body() -> None:
        other = pki.Authority.generate("cluster.local")
        async with running_ca() as ca:
            client = ca.client()
            client.set_ca_roots(pem(other))  # the CA's TLS certificate no longer verifies
            with pytest.raises(CaError) as err:
                await client.issue(FRONTEND)
            assert err.value.reason == "unavailable"
            client.set_ca_roots(ca.root_pem)
            assert (await client.issue(FRONTEND)).identity == FRONTEND
            await client.close()
    asyncio.run(body())

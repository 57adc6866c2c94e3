"""Federated trust domains: peers whose SPIFFE ids are in another trust domain, trusted through
that domain's bundle (SPIFFE bundle format, as SPIRE and Consul publish), and aliases of our
own trust domain (Istio's trustDomainAliases).

A certificate is trusted for trust domain T only if it is issued by a certificate in T's
bundle: OpenSSL checks the chain against every root it was given, so without this binding a
partner's CA could sign a certificate claiming our domain. Python 3.11 hands back only the
peer's leaf, so the binding is checked on the leaf's issuer: a federated bundle must hold the
certificates that sign leaves (SPIRE's server CA, or the root when it signs directly). Alias
peers bind to our own bundle and are then treated as the same identity in our domain (policies
name the local domain, as with Istio's alias expansion).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from agent.identity import pki
from agent.identity.spiffe import Identity, IdentityError

log = logging.getLogger(__name__)

_TD = re.compile(r"[a-z0-9]([a-z0-9._-]{0,253}[a-z0-9])?")
BUNDLE_SUFFIXES = (".json", ".pem")
MAX_BUNDLE_BYTES = 1 << 20  # a bundle is a few KiB; refuse anything absurd


class FederationError(ValueError):
    """A federated bundle or alias cannot be used; the message names the source and field."""


class UntrustedPeerError(ValueError):
    """A verified certificate whose trust domain, or issuer for that domain, is not trusted."""


def parse_spiffe_bundle(data: bytes, source: str) -> tuple[x509.Certificate, ...]:
    """The X.509 authorities of a SPIFFE bundle (a JWK set: keys with use x509-svid, each with
    exactly one certificate in x5c). JWT authorities are skipped: the mesh uses X.509 only."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise FederationError(f"{source}: not JSON: {e}") from e
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list):
        raise FederationError(f"{source}: want a SPIFFE bundle, a JSON object with a 'keys' list")
    out: list[x509.Certificate] = []
    for i, key in enumerate(keys):
        where = f"{source}: keys[{i}]"
        if not isinstance(key, dict) or "use" not in key:
            raise FederationError(f"{where}: want a JWK object with 'use'")
        if key["use"] != "x509-svid":
            continue
        x5c = key.get("x5c")
        if not isinstance(x5c, list) or len(x5c) != 1 or not isinstance(x5c[0], str):
            raise FederationError(f"{where}.x5c: want exactly one base64 DER certificate")
        try:
            cert = x509.load_der_x509_certificate(base64.b64decode(x5c[0], validate=True))
        except (ValueError, binascii.Error) as e:
            raise FederationError(f"{where}.x5c[0]: not a DER certificate: {e}") from e
        if not pki.is_ca(cert):
            raise FederationError(f"{where}.x5c[0]: not a CA certificate (basicConstraints)")
        out.append(cert)
    if not out:
        raise FederationError(f"{source}: no x509-svid authorities")
    return tuple(out)


def spiffe_bundle(certs: Iterable[x509.Certificate], sequence: int = 1) -> str:
    """A SPIFFE bundle document of X.509 authorities (what `nodemesh ca bundle` prints)."""
    keys = [{"use": "x509-svid", "x5c": [base64.b64encode(c.public_bytes(Encoding.DER)).decode()]}
            for c in certs]
    return json.dumps({"keys": keys, "spiffe_sequence": sequence}, indent=2)


def _read_one(trust_domain: str, path: Path) -> tuple[x509.Certificate, ...]:
    if not _TD.fullmatch(trust_domain):
        raise FederationError(f"{path}: {trust_domain!r} is not a valid trust domain name")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FederationError(f"{path}: cannot read the bundle of {trust_domain}: "
                              f"{e.strerror or e}") from e
    if len(data) > MAX_BUNDLE_BYTES:
        raise FederationError(f"{path}: {len(data)} bytes; a bundle is at most "
                              f"{MAX_BUNDLE_BYTES}")
    if path.suffix == ".pem":
        try:
            certs = tuple(pki.certs_from_pem(data))
        except ValueError as e:
            raise FederationError(f"{path}: not PEM certificates: {e}") from e
        if data.count(b"-----BEGIN ") != len(certs) or not all(pki.is_ca(c) for c in certs):
            raise FederationError(f"{path}: every block must be a complete CA certificate")
        return certs
    return parse_spiffe_bundle(data, str(path))


def _files(source: str) -> list[tuple[str, Path]]:
    """(trust domain, file) pairs of one --federated-bundle value: TD=FILE, or a directory of
    <trust-domain>.json / <trust-domain>.pem files (a mounted ConfigMap, one key per domain)."""
    td, sep, rest = source.partition("=")
    if sep:
        return [(td, Path(rest))]
    directory = Path(source)
    if not directory.is_dir():
        raise FederationError(f"{source}: want TRUST_DOMAIN=FILE or a directory of "
                              "<trust-domain>.json/.pem bundles")
    return [(p.stem, p) for p in sorted(directory.iterdir())
            if p.suffix in BUNDLE_SUFFIXES and not p.name.startswith(".") and p.is_file()]


def load_bundles(sources: Sequence[str], local: str) -> dict[str, tuple[x509.Certificate, ...]]:
    out: dict[str, tuple[x509.Certificate, ...]] = {}
    for source in sources:
        for td, path in _files(source):
            if td == local:
                raise FederationError(f"{path}: names our own trust domain {local}; its roots "
                                      "come from the CA root file")
            if td in out:
                raise FederationError(f"{path}: a second bundle for {td}")
            out[td] = _read_one(td, path)
    return out


def _digest(sources: Sequence[str]) -> bytes:
    h = hashlib.sha256()
    for source in sources:
        try:
            for td, path in _files(source):
                h.update(td.encode() + b"\0" + path.read_bytes() + b"\0")
        except (OSError, FederationError):
            h.update(b"unreadable\0" + source.encode())
    return h.digest()


@dataclass
class TrustDomains:
    """Which trust domains a peer may be in, and the certificates each must be issued by."""

    local: str
    own_roots: Callable[[], Sequence[str]]  # our bundle (PEMs): it changes during a rotation
    aliases: frozenset[str] = frozenset()
    federated: Mapping[str, tuple[x509.Certificate, ...]] = field(default_factory=dict)
    _own_cache: tuple[tuple[str, ...], tuple[x509.Certificate, ...]] | None = field(
        default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        for alias in self.aliases:
            if not _TD.fullmatch(alias) or alias == self.local:
                raise FederationError(f"trust domain alias {alias!r}: want a trust domain name "
                                      f"other than ours ({self.local})")
            if alias in self.federated:
                raise FederationError(f"{alias} is both an alias and a federated trust domain")

    def _own(self) -> tuple[x509.Certificate, ...]:
        pems = tuple(self.own_roots())
        if self._own_cache is None or self._own_cache[0] != pems:  # parse once per bundle
            self._own_cache = (pems, tuple(c for pem in pems for c in pki.certs_from_pem(pem)))
        return self._own_cache[1]

    def federated_pems(self) -> str:
        return "".join(pki.cert_to_pem(c) for certs in self.federated.values() for c in certs)

    def admit(self, identity: Identity, leaf_der: bytes) -> Identity:
        """The identity policy sees for a verified peer certificate; UntrustedPeerError if its trust
        domain is not ours, an alias or federated, or its issuer is not in that domain's bundle."""
        td = identity.trust_domain
        ours = td == self.local or td in self.aliases
        if not ours and td not in self.federated:
            raise UntrustedPeerError(f"{identity} is in trust domain {td!r}, which is neither ours "
                                f"({self.local!r}), an alias, nor federated")
        if self.federated:  # several domains' roots in OpenSSL's store: bind issuer to domain
            anchors = self._own() if ours else self.federated[td]
            leaf = x509.load_der_x509_certificate(leaf_der)
            if not any(_issued_by(leaf, a) for a in anchors):
                raise UntrustedPeerError(
                    f"{identity} is not issued by a certificate in the bundle of {td} (issuer "
                    f"{leaf.issuer.rfc4514_string() or 'unnamed'}): another domain's CA signed it")
        if td in self.aliases:
            try:
                return Identity(self.local, identity.namespace, identity.service_account)
            except IdentityError as e:  # cannot happen: only the domain changed
                raise UntrustedPeerError(str(e)) from e
        return identity


def _issued_by(leaf: x509.Certificate, issuer: x509.Certificate) -> bool:
    if leaf.issuer != issuer.subject:
        return False
    try:
        leaf.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


class FederationFiles:
    """The --federated-bundle sources, re-read when their content changes (poll)."""

    def __init__(self, sources: Sequence[str], local: str) -> None:
        self.sources = tuple(sources)
        self.local = local
        self.bundles = load_bundles(self.sources, local)  # the first read must succeed
        self._digest = _digest(self.sources)
        self.errors = 0

    def poll(self) -> dict[str, tuple[x509.Certificate, ...]] | None:
        digest = _digest(self.sources)
        if digest == self._digest:
            return None
        self._digest = digest
        try:
            bundles = load_bundles(self.sources, self.local)
        except FederationError as e:
            self.errors += 1
            log.error("%s; keeping the last good federated bundles (%s)", e,
                      ", ".join(sorted(self.bundles)) or "none")
            return None
        self.bundles = bundles
        log.info("federated trust domains now: %s", ", ".join(sorted(bundles)) or "none")
        return bundles

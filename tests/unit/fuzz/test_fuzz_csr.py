"""Fuzz: CSRs into the embedded CA (`CertificateAuthority.sign`, CreateCertificate's core).

Whatever the CSR (text, mutated PEM/DER, mutated but correctly re-signed request info, any key
type, any SANs, huge), the CA either refuses with a CaRejection whose message says why, or returns
a chain whose leaf carries exactly the one identity the CSR asked for, that identity is scheduled
on the calling node, and the key is the CSR's own.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from functools import cache

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtensionOID, NameOID
from google.protobuf import struct_pb2
from hypothesis import assume, example, given
from hypothesis import strategies as st

from agent.identity import pki
from agent.identity.ca import (
    MAX_CSR_BYTES,
    CaRejection,
    CertificateAuthority,
    StaticWorkloadLocator,
    Status,
)
from agent.identity.proto import IMPERSONATED_IDENTITY
from agent.identity.spiffe import Identity, uri_sans

TD = "cluster.local"
FE = Identity(TD, "shop", "frontend")
BE = Identity(TD, "shop", "backend")
DB = Identity(TD, "data", "db")  # scheduled, but on another node
NODE = "n1"
ECDSA_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")  # AlgorithmIdentifier, no params


@cache
def ca() -> CertificateAuthority:
    placement = StaticWorkloadLocator({NODE: [FE, BE], "n2": [DB]})
    return CertificateAuthority(pki.Authority.generate(TD), placement, TD)


@cache
def keys() -> dict[str, pki.PrivateKey | ed25519.Ed25519PrivateKey]:
    return {
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "p384": ec.generate_private_key(ec.SECP384R1()),
        "rsa1024": rsa.generate_private_key(65537, 1024),
        "rsa2048": rsa.generate_private_key(65537, 2048),
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
    }


def _len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _len(len(body)) + body


def resign(tbs: bytes) -> bytes:
    """A CSR of these request-info bytes, correctly signed by the P-256 key: so mutations of
    the request info get past the signature check and reach the key and extension parsers."""
    key = keys()["p256"]
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    sig = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return _der(0x30, tbs + ECDSA_SHA256 + _der(0x03, b"\x00" + sig))


def pem(der: bytes) -> str:
    b64 = base64.encodebytes(der).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{b64}-----END CERTIFICATE REQUEST-----\n"


def csr_der(names: list[x509.GeneralName], key_name: str = "p256", critical: bool = True,
            subject: str = "") -> bytes:
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)] if subject else []))
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=critical)
    key = keys()[key_name]
    algo = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(key, algo).public_bytes(serialization.Encoding.DER)


VALID = csr_der([x509.UniformResourceIdentifier(FE.uri)])


def sign(csr: str, ttl: int = 0, metadata: struct_pb2.Struct | None = None) -> None:
    """The property every test checks."""
    try:
        chain = ca().sign(NODE, csr, ttl, metadata)
    except CaRejection as r:
        assert r.message.strip(), "a refusal says why"
        assert r.code in (Status.INVALID_ARGUMENT, Status.PERMISSION_DENIED)
        return
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    request = x509.load_pem_x509_csr(csr.encode())
    asked = request.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(asked) == [x509.UniformResourceIdentifier(uri_sans(leaf)[0])]
    assert len(uri_sans(leaf)) == 1
    assert Identity.parse(uri_sans(leaf)[0]) in {FE, BE}  # scheduled on the caller's node
    assert leaf.public_key() == request.public_key()
    leaf.verify_directly_issued_by(ca().authority.signer)


@given(st.text(max_size=400) | st.binary(max_size=400).map(pem))
@example("")
@example(pem(b""))
def test_arbitrary_text_is_refused(csr: str) -> None:
    sign(csr)


@st.composite
def byte_mutations(draw: st.DrawFn, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not out:
            break
        i = draw(st.integers(0, len(out) - 1))
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if op == "flip":
            out[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            out[i] = draw(st.integers(0, 255))
        elif op == "insert":
            out[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del out[i : i + draw(st.integers(1, 8))]
        else:
            del out[i:]
    return bytes(out)


@given(byte_mutations(VALID))
@example(VALID.replace(b"\x02\x01\x00", b"\x02\x01\x01", 1))  # CSR version 2: InvalidVersion
def test_mutated_der_is_refused_or_exactly_what_was_asked(der: bytes) -> None:
    sign(pem(der))


TBS = x509.load_der_x509_csr(VALID).tbs_certrequest_bytes


def _duplicate_san() -> bytes:
    b = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
         .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(FE.uri)]),
                        critical=False)
         .add_extension(x509.UnrecognizedExtension(
             x509.ObjectIdentifier("2.5.29.99"),
             x509.SubjectAlternativeName([x509.UniformResourceIdentifier(DB.uri)])
             .public_bytes()), critical=False))
    key = keys()["p256"]
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    tbs = b.sign(key, hashes.SHA256()).tbs_certrequest_bytes
    san_oid = bytes.fromhex("0603551d11")  # 2.5.29.17
    return tbs.replace(bytes.fromhex("0603551d63"), san_oid)  # 2.5.29.99 -> 2.5.29.17


@given(byte_mutations(TBS))
@example(_duplicate_san())
@example(TBS.replace(FE.uri.encode(), DB.uri.encode()))  # re-signed: valid, not scheduled here
@example(TBS.replace(b"\x86\x28", b"\x86\x01"))  # URI length byte cut: malformed SAN
def test_mutated_request_info_re_signed_is_refused_or_exactly_what_was_asked(
        tbs: bytes) -> None:
    sign(pem(resign(tbs)))


uri_names = st.one_of(
    st.sampled_from([FE.uri, BE.uri, DB.uri, FE.uri + "/", FE.uri.upper(), "spiffe://",
                     "spiffe://cluster.local/ns//sa/", "spiffe://other.td/ns/shop/sa/frontend",
                     "spiffe://cluster.local/ns/shop/sa/frontend?x=1",
                     "spiffe://cluster.local/ns/shop/sa/frontend#f",
                     "spiffe://cluster.local/ns/shop/sa/frontend/ns/x/sa/y"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=60),
).map(x509.UniformResourceIdentifier)
general_names = st.one_of(
    uri_names,
    st.sampled_from(["localhost", "frontend.shop.svc", "*.shop"]).map(x509.DNSName),
    st.sampled_from(["a@b.c"]).map(x509.RFC822Name),
    st.ip_addresses().map(x509.IPAddress),
)


@dataclass(frozen=True)
class Request:
    names: list[x509.GeneralName]
    key: str = "p256"
    critical: bool = True
    subject: str = ""
    ttl: int = 0
    impersonate: str | None = None


requests = st.builds(
    Request, st.lists(general_names, max_size=4), st.sampled_from(sorted(keys())), st.booleans(),
    st.sampled_from(["", "frontend", "x" * 64]), st.integers(-2**31, 2**31),
    st.none() | uri_names.map(lambda u: u.value))
FE_SAN = [x509.UniformResourceIdentifier(FE.uri)]


@given(requests)
@example(Request(FE_SAN))
@example(Request([x509.UniformResourceIdentifier(DB.uri)]))
@example(Request(FE_SAN, key="rsa1024"))
@example(Request(FE_SAN, key="ed25519"))
@example(Request(FE_SAN, impersonate=BE.uri))
def test_built_csrs_sign_only_the_scheduled_identity_asked_for(req: Request) -> None:
    try:
        der = csr_der(req.names, req.key, req.critical, req.subject)
    except ValueError:
        assume(False)  # not encodable by cryptography's builder (e.g. an empty SAN list)
    meta = None
    if req.impersonate is not None:
        meta = struct_pb2.Struct()
        meta.fields[IMPERSONATED_IDENTITY].string_value = req.impersonate
    sign(pem(der), req.ttl, meta)


def test_huge_csrs_are_refused_by_size() -> None:
    for size in (MAX_CSR_BYTES + 1, 4 * 1024 * 1024):
        body = pem(VALID + b"\x00" * size)
        try:
            ca().sign(NODE, body)
        except CaRejection as r:
            assert f"at most {MAX_CSR_BYTES}" in r.message
        else:
            raise AssertionError("a huge CSR was signed")
    # Many SANs inside the limit: refused for what they are, not for their size.
    many = csr_der([x509.UniformResourceIdentifier(f"{FE.uri}{i}") for i in range(300)])
    assert len(pem(many)) < MAX_CSR_BYTES
    try:
        ca().sign(NODE, pem(many))
    except CaRejection as r:
        assert "300 URI SANs" in r.message
    else:
        raise AssertionError("a CSR with 300 SANs was signed")


def test_the_unmutated_csr_is_signed() -> None:
    """The fuzz properties can fail: the happy path really issues (for the scheduled FE)."""
    chain = ca().sign(NODE, pem(VALID))
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    assert uri_sans(leaf) == [FE.uri]
    assert ExtensionOID.SUBJECT_ALTERNATIVE_NAME in [e.oid for e in leaf.extensions]

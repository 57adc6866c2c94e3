"""Certificates for the posture report: the agent's own, or PEM files named on the command line."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from cryptography import x509

from agent.identity.manager import CertificateManager
from agent.posture.checks import CertificateInfo

MAX_PEM_BYTES = 1024 * 1024


class CertificateFileError(ValueError):
    """A certificate file cannot be read; the message names the file."""


def _info(cert: x509.Certificate, subject: str, kind: str) -> CertificateInfo:
    return CertificateInfo(subject, kind, cert.not_valid_before_utc, cert.not_valid_after_utc,
                           f"{cert.serial_number:x}")


def _name(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if uris:
            return str(uris[0])
    except x509.ExtensionNotFound:
        pass
    return cert.subject.rfc4514_string() or f"serial {cert.serial_number:x}"


def from_files(paths: Iterable[Path]) -> list[CertificateInfo]:
    """Every certificate in the PEM files (a directory: its *.pem and *.crt files)."""
    files: list[Path] = []
    for p in paths:
        files += sorted([*p.glob("*.pem"), *p.glob("*.crt")]) if p.is_dir() else [p]
    out = []
    for f in files:
        try:
            data = f.read_bytes()[: MAX_PEM_BYTES + 1]
        except OSError as e:
            raise CertificateFileError(f"{f}: cannot read: {e.strerror or e}") from None
        if len(data) > MAX_PEM_BYTES:
            raise CertificateFileError(f"{f}: larger than {MAX_PEM_BYTES} bytes: not a PEM file")
        if b"-----BEGIN CERTIFICATE-----" not in data:
            continue  # keys and other PEM blocks in a directory are not certificates
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError as e:
            raise CertificateFileError(f"{f}: not a valid PEM certificate: {e}") from None
        out += [_info(c, f"{_name(c)} ({f.name})", "file") for c in certs]
    return out


def from_manager(manager: CertificateManager) -> list[CertificateInfo]:
    """The agent's workload certificates in force and its trust roots."""
    out = []
    for identity in sorted(manager.identities()):
        cert = manager.current(identity)
        if cert is not None:
            out.append(_info(cert.leaf, identity.uri, "workload"))
    for pem in manager.trust_bundle:
        for c in x509.load_pem_x509_certificates(pem.encode()):
            out.append(_info(c, _name(c), "root"))
    return out

"""The committed protobuf code matches ca.proto, and ca.proto matches Istio's wire contract."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from prereq import requires

from agent.identity.proto import CREATE_CERTIFICATE_PATH, build, ca_pb2


def test_committed_generated_code_is_fresh(tmp_path: Path) -> None:
    requires(importlib.util.find_spec("grpc_tools") is not None,
             "needs grpcio-tools (dev dependency) to regenerate the protobuf code")
    fresh = build.generate(tmp_path)
    assert [p.name for p in fresh] == list(build.OUTPUTS)
    for path in fresh:
        committed = build.HERE / path.name
        assert committed.read_text() == path.read_text(), (
            f"{committed} is stale: run `.venv/bin/python -m agent.identity.proto.build` "
            "and commit the result")


def test_wire_contract_matches_istio() -> None:
    fd = ca_pb2.DESCRIPTOR
    assert fd.package == "istio.v1.auth"
    req = fd.message_types_by_name["IstioCertificateRequest"]
    assert {f.name: f.number for f in req.fields} == {
        "csr": 1, "validity_duration": 3, "metadata": 4}
    struct = req.fields_by_name["metadata"].message_type
    assert struct is not None and struct.full_name == "google.protobuf.Struct"
    resp = fd.message_types_by_name["IstioCertificateResponse"]
    assert {f.name: f.number for f in resp.fields} == {"cert_chain": 1}
    assert CREATE_CERTIFICATE_PATH == "/istio.v1.auth.IstioCertificateService/CreateCertificate"


def test_round_trip_with_impersonation_metadata() -> None:
    req = ca_pb2.IstioCertificateRequest(csr="pem", validity_duration=60)
    req.metadata.fields["ImpersonatedIdentity"].string_value = "spiffe://td/ns/a/sa/b"
    back = ca_pb2.IstioCertificateRequest.FromString(req.SerializeToString())
    assert back.metadata.fields["ImpersonatedIdentity"].string_value == "spiffe://td/ns/a/sa/b"
    assert (back.csr, back.validity_duration) == ("pem", 60)

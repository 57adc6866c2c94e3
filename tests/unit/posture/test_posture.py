"""`nodemesh posture` against mesh files: the demo mesh, a hardened copy with planted issues, every
check, the output forms and the documented JSON schema."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import jsonschema
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.cli import main
from agent.posture.checks import CertificateInfo, certificate_findings
from agent.telemetry.flow import (
    FlowEndpoint,
    FlowEventKind,
    FlowRecord,
    FlowVerdict,
    Reporter,
    SecurityPolicy,
)
from agent.telemetry.flowlog import FlowLog

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "demo-mesh.yaml"
DOCS = ROOT / "docs" / "posture.md"

# The demo leaves frontend and tools/debug open and tools PERMISSIVE by design (it shows default
# allow and a STRICT namespace). The hardened copy closes those, so that only planted issues show.
HARDENING = """---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: frontend-allow-shop, namespace: shop}
spec:
  selector: {matchLabels: {app: frontend}}
  action: ALLOW
  rules: [{from: [{source: {namespaces: [shop]}}], to: [{operation: {ports: ["8080"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: debug-allow-tools, namespace: tools}
spec:
  action: ALLOW
  rules: [{from: [{source: {principals: ["cluster.local/ns/tools/sa/default"]}}]}]
"""
PLANTED = """---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: tools}
spec: {mtls: {mode: PERMISSIVE}}
---
kind: Workload
metadata: {name: reports, namespace: shop, labels: {app: reports}}
spec: {serviceAccount: reports, ips: [10.251.0.12], node: node0}
"""


def write_cert(path: Path, days_left: float, name: str = "nodemesh root") -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=300))
            .not_valid_after(now + dt.timedelta(days=days_left))
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(["posture", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def report(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    rc, out, err = run(capsys, "--json", *args)
    assert rc == 0, err
    data: dict[str, object] = json.loads(out)
    return data


def found(r: dict[str, object]) -> set[tuple[str, str, str]]:
    findings = r["findings"]
    assert isinstance(findings, list)
    return {(f["check"], f["severity"], f["subject"]) for f in findings}


def mesh(tmp_path: Path, *extra: str) -> Path:
    path = tmp_path / "mesh.yaml"
    path.write_text(EXAMPLE.read_text() + "".join(extra))
    return path


def test_demo_mesh_as_shipped(capsys: pytest.CaptureFixture[str]) -> None:
    assert found(report(capsys, "--config", str(EXAMPLE))) == {
        ("mtls-permissive", "medium", "tools"),
        ("open-workload", "medium", "shop/frontend"),
        ("open-workload", "medium", "tools/debug"),
    }


def test_hardened_demo_has_no_findings(capsys: pytest.CaptureFixture[str],
                                       tmp_path: Path) -> None:
    ok = write_cert(tmp_path / "root.pem", days_left=300)
    r = report(capsys, "--config", str(mesh(tmp_path, HARDENING)), "--certs", str(ok))
    assert r["findings"] == []
    assert r["summary"] == {"critical": 0, "high": 0, "medium": 0, "low": 0, "info": 0}
    [cert] = r["certificates"]  # type: ignore[misc]
    assert cert["state"] == "ok" and cert["kind"] == "file"


def test_planted_issues_and_nothing_else(capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    write_cert(certs / "root.pem", days_left=300)
    write_cert(certs / "old-root.pem", days_left=2, name="old root")
    (certs / "notes.txt").write_text("not a certificate")
    r = report(capsys, "--config", str(mesh(tmp_path, HARDENING, PLANTED)),
               "--certs", str(certs))
    assert found(r) == {
        ("mtls-permissive", "medium", "tools"),
        ("open-workload", "medium", "shop/reports"),
        ("certificate-expiring", "high", "CN=old root (old-root.pem)"),
    }
    assert r["summary"] == {"critical": 0, "high": 1, "medium": 2, "low": 0, "info": 0}
    findings = r["findings"]
    assert isinstance(findings, list)
    assert findings[0]["check"] == "certificate-expiring"  # most severe first
    assert all(f["fix"] for f in findings)
    permissive = next(f for f in findings if f["check"] == "mtls-permissive")
    assert "PeerAuthentication tools/default" in permissive["detail"]
    assert r["rate_limits"] == {"supported": True, "in_force": []}  # none configured
    # --fail-on: exit 1 when a finding is at least that severe, 0 otherwise.
    path = str(mesh(tmp_path, HARDENING, PLANTED))
    assert run(capsys, "--config", path, "--certs", str(certs), "--fail-on", "high")[0] == 1
    assert run(capsys, "--config", path, "--fail-on", "high")[0] == 0


def test_other_checks(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    extra = """---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
kind: Workload
metadata: {name: old, namespace: legacy}
spec: {ips: [10.251.0.13], inMesh: false}
---
kind: Workload
metadata: {name: batch, namespace: shop}
spec: {ips: [10.251.0.14], inMesh: false}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: db-ports, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  portLevelMtls: {"9000": {mode: DISABLE}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: anyone-8080, namespace: shop}
spec:
  selector: {matchLabels: {app: frontend}}
  action: ALLOW
  rules: [{to: [{operation: {ports: ["8080"]}}]}]
"""
    flows = tmp_path / "flows.log"
    log = FlowLog(flows)
    t = dt.datetime.now(dt.UTC)
    for _ in range(2):
        log.write(FlowRecord(FlowEventKind.CLOSE, Reporter.DESTINATION,
                             FlowEndpoint(ip="192.168.1.5", port=4000),
                             FlowEndpoint(workload="debug", namespace="tools", ip="10.251.1.11",
                                          port=80), time=t,
                             connection_security_policy=SecurityPolicy.NONE))
    log.write(FlowRecord(FlowEventKind.DENY, Reporter.SOURCE,
                         FlowEndpoint(workload="debug", namespace="tools", ip="10.251.1.11"),
                         FlowEndpoint(workload="db", namespace="shop", ip="10.251.1.10", port=5432),
                         time=t, verdict=FlowVerdict.DENIED, reason="policy_deny",
                         policy="shop/db-deny-tools", rule="0"))
    log.close()
    r = report(capsys, "--config", str(mesh(tmp_path, extra)), "--flows", str(flows))
    assert found(r) == {
        ("namespace-outside-mesh", "medium", "legacy"),
        ("workload-outside-mesh", "medium", "shop/batch"),
        ("mtls-disable", "high", "shop"),
        ("mtls-permissive", "medium", "tools"),
        ("allow-all-sources", "high", "shop/anyone-8080"),
        ("open-workload", "medium", "tools/debug"),
        ("plaintext-connections", "medium", "192.168.1.5 -> tools/debug:80"),
        ("recent-denies", "info", "tools/debug -> shop/db:5432"),
    }
    findings = r["findings"]
    assert isinstance(findings, list)
    disable = next(f for f in findings if f["check"] == "mtls-disable")
    assert "shop/db port 9000" in disable["title"]
    plain = next(f for f in findings if f["check"] == "plaintext-connections")
    assert plain["title"].startswith("2 plaintext")


def test_certificate_states() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    day = dt.timedelta(days=1)
    certs = [
        CertificateInfo("spiffe://cluster.local/ns/a/sa/fresh", "workload", now - day / 4,
                        now + day * 3 / 4),
        CertificateInfo("spiffe://cluster.local/ns/a/sa/stuck", "workload", now - day * 0.8,
                        now + day * 0.2),
        CertificateInfo("gone", "root", now - day * 10, now - day),
    ]
    assert [c.state(now, dt.timedelta(days=30)) for c in certs] == [
        "ok", "rotation-overdue", "expired"]
    assert [(f.check, f.severity.label) for f in certificate_findings(certs, now,
                                                                      dt.timedelta(days=30))] \
        == [("certificate-expired", "critical"),
            ("certificate-rotation-overdue", "high")]


def test_markdown_and_html_exports(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_md, out_html = tmp_path / "audit.md", tmp_path / "audit.html"
    assert run(capsys, "--config", str(EXAMPLE), "--format", "markdown", "-o", str(out_md))[0] \
        == 0
    md = out_md.read_text()
    assert md.startswith("# nodemesh posture report")
    assert "| medium | open-workload | shop/frontend |" in md
    assert "## Rate limits" in md
    assert run(capsys, "--config", str(EXAMPLE), "--format", "html", "-o", str(out_html))[0] == 0
    page = out_html.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<td>shop/frontend</td>" in page
    assert "<script" not in page  # self-contained and inert
    rc, out, _ = run(capsys, "--config", str(EXAMPLE))
    assert rc == 0 and "[MEDIUM] no ALLOW policy applies to shop/frontend" in out


def test_bad_input_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    rc, _, err = run(capsys, "--config", str(EXAMPLE), "--certs", str(bad))
    assert rc == 2 and "bad.pem: not a valid PEM certificate" in err
    flows = tmp_path / "flows.log"
    flows.write_text("{}\n")
    rc, _, err = run(capsys, "--config", str(EXAMPLE), "--flows", str(flows))
    assert rc == 2 and f"{flows}:1:" in err
    rc, _, err = run(capsys, "--certs", str(bad))
    assert rc == 2 and "need --config" in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: Workload\nmetadata: {name: x}\nspec: {ips: [nope]}\n")
    rc, _, err = run(capsys, "--config", str(broken))
    assert rc == 2 and "broken.yaml:" in err
    rc, _, err = run(capsys, "--admin", "127.0.0.1:1")
    assert rc == 2 and "cannot reach the agent admin endpoint" in err


def test_report_matches_the_documented_schema(capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    blocks = re.findall(r"```json\n(.*?)```", DOCS.read_text(), re.DOTALL)
    schema = next(json.loads(b) for b in blocks if '"nodemesh.posture/v1"' in b
                  and '"$schema"' in b)
    jsonschema.Draft202012Validator.check_schema(schema)
    old = write_cert(tmp_path / "old.pem", days_left=2)
    for r in (report(capsys, "--config", str(EXAMPLE)),
              report(capsys, "--config", str(mesh(tmp_path, HARDENING, PLANTED)), "--certs",
                     str(old))):
        jsonschema.validate(r, schema, format_checker=jsonschema.FormatChecker())


RATE_LIMIT = """---
apiVersion: nodemesh.io/v1alpha1
kind: ConnectionRateLimit
metadata: {name: db-limits, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  limits:
  - from: {principal: cluster.local/ns/tools/sa/debug}
    connectionsPerSecond: 5
    burst: 5
  - from: {plaintext: true}
    maxConnections: 2
"""


def test_rate_limits_in_force_are_listed(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = str(mesh(tmp_path, RATE_LIMIT))
    r = report(capsys, "--config", path)
    rl = r["rate_limits"]
    assert isinstance(rl, dict) and rl["supported"] is True
    assert [(x["limit"], x["entry"], x["source"], x["destinations"], x["connections_per_second"],
             x["burst"], x["max_connections"]) for x in rl["in_force"]] == [
        ("shop/db-limits", 0, "principal cluster.local/ns/tools/sa/debug", ["shop/db"], 5.0, 5,
         None),
        ("shop/db-limits", 1, "plaintext sources", ["shop/db"], None, None, 2),
    ]
    _, out, _ = run(capsys, "--config", path)
    line = next(x for x in out.splitlines() if x.startswith("rate limits:"))
    assert "shop/db-limits limits[0]: principal cluster.local/ns/tools/sa/debug -> shop/db: " \
           "5 connections/s, burst 5" in line
    assert "plaintext sources -> shop/db: at most 2 concurrent" in line

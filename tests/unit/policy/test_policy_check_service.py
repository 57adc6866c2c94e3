"""`nodemesh policy check --to <Service>`: endpoints, target ports and a verdict for each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.cli import main

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "demo-mesh.yaml"


def check(capsys: pytest.CaptureFixture[str], *args: str,
          config: Path = EXAMPLE) -> tuple[int, dict[str, object], str]:
    rc = main(["policy", "check", "--config", str(config), *args, "--json"])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if out else {}), err


def test_vip_resolves_to_the_endpoint_and_its_target_port(
        capsys: pytest.CaptureFixture[str]) -> None:
    rc, r, _ = check(capsys, "--from", "shop/frontend", "--to", "10.96.0.20", "--port", "80")
    assert rc == 0 and r["verdict"] == "allow" and r["service"] == "shop/backend"
    (ep,) = r["endpoints"]  # type: ignore[misc]
    assert (ep["workload"], ep["ip"], ep["target_port"], ep["policy"]) == (
        "shop/backend", "10.251.0.11", 8080, "shop/backend-allow-frontend")


def test_service_by_name_is_denied_by_the_endpoints_policy(
        capsys: pytest.CaptureFixture[str]) -> None:
    rc, r, _ = check(capsys, "--from", "tools/debug", "--to", "shop/db", "--service", "--port",
                     "5432")
    assert rc == 1 and r["verdict"] == "deny"
    (ep,) = r["endpoints"]  # type: ignore[misc]
    assert (ep["workload"], ep["policy"], ep["rule"]) == ("shop/db", "shop/db-deny-tools", 0)


def test_name_of_a_workload_stays_the_workload_without_service_flag(
        capsys: pytest.CaptureFixture[str]) -> None:
    rc, r, _ = check(capsys, "--from", "shop/frontend", "--to", "shop/backend", "--port", "8080")
    assert rc == 0 and r["destination"]["workload"] == "shop/backend"  # type: ignore[index]


def test_undeclared_service_port_by_name_is_an_input_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = check(capsys, "--from", "shop/frontend", "--to", "shop/backend", "--service",
                       "--port", "81")
    assert rc == 2 and "does not declare port 81 (declared: 80)" in err


def test_no_ready_endpoint_and_mixed_endpoints(capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    text = text.replace("  ips: [10.251.0.11]\n  node: node0\n",
                        "  ips: [10.251.0.11]\n  node: node0\n  ready: false\n")
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(text)
    rc, r, _ = check(capsys, "--from", "shop/frontend", "--to", "10.96.0.20", "--port", "80",
                     config=cfg)
    assert rc == 1 and r["verdict"] == "no_healthy_upstream" and r["endpoints"] == []
    assert any("not ready" in n for n in r["notes"])  # type: ignore[attr-defined]
    # a second Service over backend and db: the frontend may reach one, not the other
    cfg.write_text(EXAMPLE.read_text() + "\n---\nkind: Service\nmetadata: {name: both, "
                   "namespace: shop}\nspec: {vips: [10.96.0.99], ports: [{port: 80, targetPort: "
                   "8080}], selector: {tier: x}}\n")
    cfg.write_text(cfg.read_text().replace("labels: {app: backend}",
                                           "labels: {app: backend, tier: x}")
                   .replace("labels: {app: db}", "labels: {app: db, tier: x}"))
    rc, r, _ = check(capsys, "--from", "shop/frontend", "--to", "shop/both", "--port", "80",
                     config=cfg)
    assert rc == 1 and r["verdict"] == "mixed"
    assert [e["verdict"] for e in r["endpoints"]] == ["allow", "deny"]  # type: ignore[attr-defined]

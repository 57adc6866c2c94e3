"""`nodemesh policy simulate` on flow logs written the way the agent writes them (FlowLog)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.cli import main
from agent.telemetry.flow import (
    FlowEndpoint,
    FlowEventKind,
    FlowRecord,
    FlowVerdict,
    Reporter,
    SecurityPolicy,
)
from agent.telemetry.flowlog import FlowLog

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "demo-mesh.yaml"
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
WL = {"shop/frontend": "10.251.0.10", "shop/backend": "10.251.0.11", "shop/db": "10.251.1.10",
      "tools/debug": "10.251.1.11"}
SA = {"shop/frontend": "frontend", "shop/backend": "backend", "shop/db": "db",
      "tools/debug": "default"}


def ep(ref: str, port: int = 0, *, principal: bool = True) -> FlowEndpoint:
    if "/" not in ref:
        return FlowEndpoint(ip=ref, port=port)
    ns, name = ref.split("/")
    uri = f"spiffe://cluster.local/ns/{ns}/sa/{SA[ref]}" if principal else ""
    return FlowEndpoint(workload=name, namespace=ns, principal=uri, ip=WL[ref], port=port)


def record(src: str, dst: str, port: int, *, denied: bool = False, t: int = 0,
           reporter: Reporter = Reporter.SOURCE, policy: str = "",
           plaintext: bool = False) -> FlowRecord:
    return FlowRecord(
        FlowEventKind.DENY if denied else FlowEventKind.CLOSE, reporter,
        ep(src, 40000 + t, principal=not plaintext), ep(dst, port), time=T0 + timedelta(seconds=t),
        verdict=FlowVerdict.DENIED if denied else FlowVerdict.ALLOWED,
        reason="policy_deny" if denied else "", policy=policy, rule="0" if policy else "",
        tunneled=not denied,
        connection_security_policy=SecurityPolicy.NONE if plaintext else
        SecurityPolicy.MUTUAL_TLS)


def demo_traffic() -> list[FlowRecord]:
    """What the demo's steps record on both nodes (tests/e2e records the real thing)."""
    return [
        record("shop/frontend", "shop/backend", 8080, t=1),
        record("shop/frontend", "shop/backend", 8080, t=1, reporter=Reporter.DESTINATION),
        record("shop/frontend", "shop/backend", 8080, t=2),
        record("shop/backend", "shop/db", 5432, t=3),
        record("shop/backend", "shop/db", 5432, t=3, reporter=Reporter.DESTINATION),
        record("tools/debug", "shop/db", 5432, denied=True, t=4, policy="shop/db-deny-tools"),
        record("shop/frontend", "shop/db", 5432, denied=True, t=5),
        record("shop/db", "shop/backend", 9999, denied=True, t=6),
        # A plaintext client outside the mesh, refused by STRICT at the destination.
        record("192.168.7.7", "shop/frontend", 80, denied=True, t=7,
               reporter=Reporter.DESTINATION, plaintext=True, policy="shop/default"),
        # Not policy decisions: never replayed.
        FlowRecord(FlowEventKind.AUTH_FAILURE, Reporter.DESTINATION, ep("192.168.7.8", 1),
                   ep("shop/db", 5432), time=T0, verdict=FlowVerdict.DENIED),
    ]


@pytest.fixture
def flows(tmp_path: Path) -> Path:
    path = tmp_path / "flows.log"
    log = FlowLog(path)
    for r in demo_traffic():
        log.write(r)
    log.close()
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(["policy", "simulate", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def mesh(tmp_path: Path, old: str = "", new: str = "") -> Path:
    text = EXAMPLE.read_text()
    if old:
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "proposed.yaml"
    path.write_text(text)
    return path


FRONTEND_RULE = 'principals: ["cluster.local/ns/shop/sa/frontend"]'


def test_unchanged_configuration_reports_nothing(
        capsys: pytest.CaptureFixture[str], flows: Path) -> None:
    rc, out, err = run(capsys, "--flows", str(flows), "--config", str(EXAMPLE), "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["changed"] is False
    assert report["newly_denied"] == report["newly_allowed"] == report["unresolved"] == []
    # 10 records: 2 destination views of connections their source reported, 1 auth failure.
    assert (report["records"], report["replayed"]) == (10, 7)
    assert report["skipped"] == {"outside_window": 0, "not_a_policy_decision": 1,
                                 "seen_by_source": 2}
    rc, out, _ = run(capsys, "--flows", str(flows), "--config", str(EXAMPLE))
    assert rc == 0 and "no connection's verdict changes" in out


def test_removed_allow_rule_reports_exactly_the_connections_it_allowed(
        capsys: pytest.CaptureFixture[str], flows: Path, tmp_path: Path) -> None:
    proposed = mesh(tmp_path, FRONTEND_RULE, 'principals: ["cluster.local/ns/x/sa/y"]')
    rc, out, _ = run(capsys, "--flows", str(flows), "--config", str(proposed), "--json")
    assert rc == 1
    report = json.loads(out)
    assert report["newly_allowed"] == []
    [change] = report["newly_denied"]
    assert (change["source"], change["destination"], change["port"], change["count"]) == (
        "shop/frontend", "shop/backend", 8080, 2)
    assert change["source_identity"] == "spiffe://cluster.local/ns/shop/sa/frontend"
    assert change["proposed"]["verdict"] == "deny"
    assert "shop/backend-allow-frontend" in change["proposed"]["reason"]
    assert (change["first_seen"], change["last_seen"]) == (
        "2026-01-02T03:04:06.000000Z", "2026-01-02T03:04:07.000000Z")
    rc, out, _ = run(capsys, "--flows", str(flows), "--config", str(proposed))
    assert rc == 1
    assert "would be DENIED (allowed today)" in out
    assert "shop/frontend -> shop/backend:8080" in out and "2x" in out


def test_new_allow_rule_names_the_rule_that_would_allow(
        capsys: pytest.CaptureFixture[str], flows: Path, tmp_path: Path) -> None:
    proposed = mesh(tmp_path, 'principals: ["cluster.local/ns/shop/sa/backend"]',
                    'principals: ["cluster.local/ns/shop/sa/backend"]\n'
                    '  - from:\n    - source:\n        principals: '
                    '["cluster.local/ns/shop/sa/frontend"]')
    rc, out, err = run(capsys, "--flows", str(flows), "--config", str(proposed), "--json")
    assert rc == 1, err
    report = json.loads(out)
    assert report["newly_denied"] == []
    [change] = report["newly_allowed"]
    assert (change["source"], change["destination"], change["port"]) == (
        "shop/frontend", "shop/db", 5432)
    assert change["proposed"] | {"reason": ""} == {
        "verdict": "allow", "policy": "shop/db-allow-backend",
        "policy_kind": "AuthorizationPolicy", "rule": 1, "reason": ""}
    rc, out, _ = run(capsys, "--flows", str(flows), "--config", str(proposed))
    assert "AuthorizationPolicy shop/db-allow-backend rule 1" in out


def test_permissive_lets_the_plaintext_client_in(
        capsys: pytest.CaptureFixture[str], flows: Path, tmp_path: Path) -> None:
    """A destination-only record (source outside the mesh) is replayed as plaintext."""
    proposed = mesh(tmp_path, "mode: STRICT", "mode: PERMISSIVE")
    rc, out, _ = run(capsys, "--flows", str(flows), "--config", str(proposed), "--json")
    assert rc == 1
    [change] = json.loads(out)["newly_allowed"]
    assert (change["source"], change["destination"], change["source_identity"]) == (
        "192.168.7.7", "shop/frontend", None)
    assert change["today"]["policy"] == "shop/default"


def test_time_window_and_unresolved_destinations(
        capsys: pytest.CaptureFixture[str], flows: Path, tmp_path: Path) -> None:
    proposed = mesh(tmp_path, FRONTEND_RULE, 'principals: ["cluster.local/ns/x/sa/y"]')
    since = "2026-01-02T03:04:07Z"
    rc, out, _ = run(capsys, "--flows", str(flows), "--config", str(proposed), "--json",
                     "--since", since, "--until", "2026-01-02T03:04:09Z")
    assert rc == 1
    report = json.loads(out)
    assert report["newly_denied"][0]["count"] == 1  # only the t=2 connection is in the window
    assert report["skipped"]["outside_window"] == 6  # t=2..4 are in: 4 of 10 records
    # A proposed file without the db workload cannot say what happens to connections to it.
    gone = mesh(tmp_path, "name: db\n  namespace: shop\n  labels: {app: db}",
                "name: db2\n  namespace: shop\n  labels: {app: db}")
    gone.write_text(gone.read_text().replace("ips: [10.251.1.10]", "ips: [10.251.1.99]"))
    rc, out, _ = run(capsys, "--flows", str(flows), "--config", str(gone), "--json")
    assert rc == 0
    assert {(u["source"], u["destination"], u["count"]) for u in json.loads(out)["unresolved"]} \
        == {("shop/backend", "shop/db", 1), ("tools/debug", "shop/db", 1),
            ("shop/frontend", "shop/db", 1)}


@pytest.mark.parametrize(("content", "message"), [
    (b'{"schema": "nodemesh.flow/v1"}\n', ":2: flow record lacks fields"),
    (b"not json\n", ":2: flow record is not JSON"),
    (b"\xff\xfe\n", ":2: "),
])
def test_bad_flow_log_is_a_file_line_error(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, content: bytes,
        message: str) -> None:
    path = tmp_path / "flows.log"
    path.write_bytes(record("shop/frontend", "shop/backend", 8080).to_json().encode() + b"\n"
                     + content)
    rc, out, err = run(capsys, "--flows", str(path), "--config", str(EXAMPLE))
    assert rc == 2 and out == ""
    assert f"{path}{message}" in err


def test_missing_inputs_and_bad_config_exit_2(
        capsys: pytest.CaptureFixture[str], flows: Path, tmp_path: Path) -> None:
    rc, _, err = run(capsys, "--flows", str(tmp_path / "nope.log"), "--config", str(EXAMPLE))
    assert rc == 2 and "nope.log: cannot read the flow log" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Workload\nmetadata: {name: x}\nspec: {ips: [nope]}\n")
    rc, _, err = run(capsys, "--flows", str(flows), "--config", str(bad))
    assert rc == 2 and "invalid configuration" in err and "bad.yaml:" in err
    rc, _, err = run(capsys, "--flows", str(flows), "--config", str(EXAMPLE),
                     "--since", "2026-01-02T03:04:09Z", "--until", "2026-01-02T03:04:07Z")
    assert rc == 2 and "--until is before --since" in err

"""`nodemesh policy check` and `nodemesh policy validate` on the demo mesh."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.cli import main

EXAMPLE = str(Path(__file__).resolve().parents[3] / "examples" / "demo-mesh.yaml")


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(["policy", "check", "--config", EXAMPLE, *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_allowed_connection_names_the_rule(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = check(capsys, "--from", "shop/frontend", "--to", "shop/backend", "--port", "8080")
    assert rc == 0
    lines = dict(line.split(":", 1) for line in out.splitlines())
    assert lines["verdict"].strip() == "ALLOW"
    assert lines["decided by"].strip() == (
        "AuthorizationPolicy shop/backend-allow-frontend rule 0")
    assert "spiffe://cluster.local/ns/shop/sa/frontend (mTLS)" in lines["source"]
    assert "PeerAuthentication mode STRICT" in lines["destination"]


@pytest.mark.parametrize(("src", "dst", "port", "expected"), [
    ("shop/frontend", "shop/backend", 8080, ("allow", "shop/backend-allow-frontend", 0)),
    ("shop/frontend", "shop/backend", 9090, ("deny", None, None)),
    ("shop/backend", "10.251.1.10", 5432, ("allow", "shop/db-allow-backend", 0)),
    ("tools/debug", "shop/db", 5432, ("deny", "shop/db-deny-tools", 0)),
    ("10.251.1.11", "shop/db", 5432, ("deny", "shop/db-deny-tools", 0)),
    ("shop/frontend", "shop/db", 5432, ("deny", None, None)),
    ("tools/debug", "shop/frontend", 80, ("allow", None, None)),
    ("192.168.0.9", "shop/frontend", 80, ("deny", "shop/default", None)),
    ("shop/db", "tools/debug", 22, ("allow", None, None)),
])
def test_json(capsys: pytest.CaptureFixture[str], src: str, dst: str, port: int,
              expected: tuple[str, str | None, int | None]) -> None:
    rc, out, _ = check(capsys, "--from", src, "--to", dst, "--port", str(port), "--json")
    report = json.loads(out)
    assert (report["verdict"], report["policy"], report["rule"]) == expected
    assert rc == (0 if expected[0] == "allow" else 1)


def test_plaintext_flag(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = check(capsys, "--from", "shop/frontend", "--to", "shop/backend", "--port",
                       "8080", "--plaintext", "--json")
    report = json.loads(out)
    assert rc == 1 and report["policy_kind"] == "PeerAuthentication"
    assert report["source"]["identity"] is None


@pytest.mark.parametrize(("args", "message"), [
    (["--from", "shop/nope", "--to", "shop/db", "--port", "1"],
     "--from 'shop/nope': no such workload (known: shop/backend, shop/db, shop/frontend, "
     "tools/debug)"),
    (["--from", "shop/db", "--to", "10.96.0.30", "--port", "1"],
     "not a workload's IP (it is the VIP of service shop/db"),
    (["--from", "db", "--to", "shop/db", "--port", "1"], "want <namespace>/<workload> or an IP"),
    (["--from", "shop/db", "--to", "shop/db", "--port", "0"], "--port 0: want 1-65535"),
])
def test_bad_endpoints(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    rc, out, err = check(capsys, *args)
    assert rc == 2 and out == "" and message in err


def test_invalid_config_reports_file_line_field(capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(EXAMPLE).read_text().replace('ports: ["5432"]', 'ports: ["postgres"]'))
    line = next(i for i, text in enumerate(bad.read_text().splitlines(), 1) if "postgres\"" in text)
    rc = main(["policy", "check", "--config", str(bad), "--from", "shop/backend", "--to",
               "shop/db", "--port", "5432"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{bad}:{line}: spec.rules[0].to[0].operation.ports[0]: want a port number" in err


def test_validate(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["policy", "validate", "--config", EXAMPLE]) == 0
    out = capsys.readouterr().out
    assert "valid (4 Workload, 2 Namespace, 2 Service, 3 AuthorizationPolicy, " \
           "1 PeerAuthentication)" in out
    l7 = tmp_path / "l7.yaml"
    l7.write_text("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
                  "metadata: {name: p, namespace: shop}\n"
                  "spec:\n  rules:\n  - to:\n    - operation: {methods: [GET]}\n")
    assert main(["policy", "validate", "--config", str(l7)]) == 0
    out = capsys.readouterr().out
    assert "warning: AuthorizationPolicy shop/p: spec.rules[0]:" in out
    assert "never matches" in out


# -- exit status 1 means "denied" and nothing else -------------------------------------------------

DENIED = ["--from", "shop/frontend", "--to", "shop/backend", "--port", "9090"]


def test_deny_is_1_and_bad_config_is_2(capsys: pytest.CaptureFixture[str],
                                       tmp_path: Path) -> None:
    assert check(capsys, *DENIED)[0] == 1
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text('a: &a ["x", "x", "x", "x", "x", "x", "x", "x"]\n' + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 8)}]\n"
        for i in range(8)))
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    for path in (bomb, empty):
        for command in (["check", *DENIED], ["validate"]):
            rc = main(["policy", command[0], "--config", str(path), *command[1:]])
            err = capsys.readouterr().err
            assert rc == 2, (path, command, err)
            assert err.startswith(f"nodemesh policy: invalid configuration: {path}:"), err


@pytest.mark.parametrize("exc", [MemoryError(), RecursionError("maximum recursion depth"),
                                 RuntimeError("a bug"), KeyError("x")])
@pytest.mark.parametrize("where", ["agent.commands.policy.load_path",
                                   "agent.commands.policy.evaluate"])
def test_any_internal_failure_exits_2_never_1(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch, exc: Exception,
                                              where: str) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise exc

    monkeypatch.setattr(where, broken)
    rc, out, err = check(capsys, *DENIED)
    assert rc == 2 and out == ""
    assert err == f"nodemesh policy: internal error: {type(exc).__name__}: {exc}\n"
    if where.endswith("load_path"):
        assert main(["policy", "validate", "--config", EXAMPLE]) == 2
        assert "internal error" in capsys.readouterr().err

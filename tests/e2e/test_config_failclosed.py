"""Bad mesh files written to running agents never weaken enforcement (issue #19, part 3).

Two real `nodemesh run` agents on a two-node test bed read one mesh file. An empty file, a file
cut mid-write, an alias bomb and invalid names are written over it in turn: each time
connections allowed before stay allowed and denied ones stay denied, nothing is re-enrolled, and
the failure is reported (nodemesh_config_errors_total, /healthz, one log line without a
traceback). The next valid edit then applies.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prereq import require_root
from prometheus_client.parser import text_string_to_metric_families
from support.agents import live_mesh as live_agents

from agent.commands.demo import EXAMPLE, _run_client, http_get
from agent.testbed import Cluster

WAIT = 60.0  # bounds a wait so a broken agent fails the test instead of hanging it

GOOD = EXAMPLE.read_text()
# Connections whose verdict must not move while bad files come and go.
ALLOWED = ("frontend -> backend:8080", "OK")
DENIED = ("frontend -> db:5432", "ERR EPERM")


def _alias_bomb() -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    return "\n".join(lines) + "\n"


# Each bad file, the error it must produce (after "<path>:"), and why applying it would have
# changed enforcement.
BAD = [
    # An editor that truncates then writes: what a watcher can see first. Applied, every pod
    # would be unenrolled (db would answer ECONNREFUSED instead of EPERM).
    ("empty", "", "1: the file is empty"),
    # Cut mid-write inside the db-deny-tools policy: the objects before the cut would replace
    # the whole mesh, dropping the PeerAuthentication and the db policies.
    ("truncated", GOOD[: GOOD.index("namespaces: [\"tools\"]") + 15],
     "the file does not end with a newline: it may be truncated"),
    ("alias bomb", GOOD + "---\n" + _alias_bomb(), "the configuration expands to more than"),
    # Invalid names, with the frontend rule gone: applied, frontend -> backend would be denied.
    ("invalid names",
     GOOD.replace("name: backend-allow-frontend", "name: ../../etc/Bad_Name!"),
     "metadata.name: '../../etc/Bad_Name!' is not a valid Kubernetes name"),
    ("invalid namespace",
     GOOD.replace("name: db-deny-tools\n  namespace: shop", "name: db-deny-tools\n  namespace: "
                  "Bad_NS").replace('principals: ["cluster.local/ns/shop/sa/frontend"]',
                                    'principals: ["cluster.local/ns/x/sa/y"]'),
     "metadata.namespace: 'Bad_NS' is not a valid Kubernetes name"),
]


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[tuple[Cluster, Path, Path]]:
    with live_agents(tmp_path, "config fail-closed test") as live:
        yield live.cluster, live.mesh, tmp_path


def verdicts(c: Cluster) -> dict[str, str]:
    backend = _run_client(c.pod(0, 0), str(c.pod(0, 1).ip), 8080, "x")
    db = _run_client(c.pod(0, 0), str(c.pod(1, 0).ip), 5432, "x")
    return {ALLOWED[0]: backend.split(" ")[0], DENIED[0]: db}


def config_errors(c: Cluster, node: int) -> float:
    text = http_get(c.nodes[node].netns, 15020, "/metrics")
    assert text is not None
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "nodemesh_config_errors_total":
                return s.value
    raise AssertionError("nodemesh_config_errors_total is not exposed")


def health(c: Cluster, node: int) -> dict[str, object]:
    text = http_get(c.nodes[node].netns, 15021, "/healthz")
    assert text is not None
    body: dict[str, object] = json.loads(text)
    return body


def dump(c: Cluster, node: int) -> dict[str, object]:
    text = http_get(c.nodes[node].netns, 15000, "/config_dump")
    assert text is not None
    body: dict[str, object] = json.loads(text)
    return body


def error_lines(work: Path, node: int) -> list[dict[str, object]]:
    """The file source's error records in the agent's JSON log."""
    out = []
    for line in (work / f"agent-n{node}.log").read_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("level") == "error" and record.get("logger") == "agent.sources.file":
                out.append(record)
    return out


def wait_for(check: object, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"never: {what}")


def test_bad_files_never_weaken_enforcement_and_are_reported(
        agents: tuple[Cluster, Path, Path]) -> None:
    c, mesh, work = agents
    nodes = range(len(c.nodes))
    want = {ALLOWED[0]: ALLOWED[1], DENIED[0]: DENIED[1]}
    assert verdicts(c) == want
    before = {n: dump(c, n) for n in nodes}
    for n in nodes:
        assert config_errors(c, n) == 0
        assert health(c, n)["config"] == {**health(c, n)["config"],  # type: ignore[dict-item]
                                          "state": "ok", "errors": 0, "last_error": None}

    for count, (label, text, message) in enumerate(BAD, 1):
        mesh.write_text(text)  # in place, as a careless writer does
        for n in nodes:
            wait_for(lambda n=n, k=count: config_errors(c, n) == k,  # type: ignore[misc]
                     f"{label}: node{n} counts the error")
            detail = health(c, n)
            config = detail["config"]
            assert isinstance(config, dict)
            assert detail["ready"] is True, detail
            assert config["state"] == "error: last good state kept", detail
            assert str(config["last_error"]).startswith(f"{mesh}:"), detail
            assert message in str(config["last_error"]), (label, detail)
            errors = error_lines(work, n)
            assert len(errors) == count, (label, errors)  # one line per failure
            assert message in str(errors[-1]["msg"]) and "exc" not in errors[-1], errors[-1]
            # Nothing was recompiled or unenrolled: the agent never saw a new state.
            now = dump(c, n)
            assert now["enrolled"] == before[n]["enrolled"], (label, now)
            assert now["policy"] == before[n]["policy"], (label, now)
        assert verdicts(c) == want, label

    # The next valid edit applies: frontend loses its allow rule and is denied.
    mesh.write_text(GOOD.replace('"cluster.local/ns/shop/sa/frontend"',
                                 '"cluster.local/ns/x/sa/y"'))
    wait_for(lambda: verdicts(c)[ALLOWED[0]] == "ERR", "the valid edit is enforced")
    for n in nodes:
        wait_for(lambda n=n: health(c, n)["config"]["state"] == "ok",  # type: ignore[index]
                 f"node{n} reports the good load")
        assert config_errors(c, n) == len(BAD)
    assert verdicts(c)[DENIED[0]] == DENIED[1]


@pytest.mark.parametrize("text", ["", "kind: Namespace\nmetadata: {name: a", _alias_bomb()])
def test_the_agent_refuses_to_start_on_a_bad_file(tmp_path: Path, text: str) -> None:
    """No last good state to keep: `nodemesh run` exits 2 with the error, before touching the
    datapath."""
    require_root()
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(mesh), "--node-name", "n0",
         "--pin-dir", str(tmp_path / "pins"), "--ca-root-cert", str(tmp_path / "ca" / "root.pem"),
         "--log-format", "json"],
        capture_output=True, text=True, timeout=WAIT, check=False)
    assert proc.returncode == 2, proc.stderr
    errors = [json.loads(x) for x in proc.stderr.splitlines() if '"level": "error"' in x]
    assert len(errors) == 1 and "exc" not in errors[0], proc.stderr
    assert str(errors[0]["msg"]).startswith(f"{mesh}:") and "not starting" in errors[0]["msg"]
    assert not (tmp_path / "pins").exists()

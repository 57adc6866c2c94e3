"""The local file source: file:line:field errors, atomic reloads, last good state kept."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from pathlib import Path

import pytest

from agent.sources.file import ConfigError, FileSource, load_path
from agent.state.snapshot import MeshState
from agent.state.store import StateStore

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "demo-mesh.yaml"
# A generous bound so a broken watcher fails the test instead of hanging it; not a threshold.
WAIT = 60.0

GOOD = """\
kind: Namespace
metadata: {name: shop}
---
kind: Workload
metadata:
  name: web
  namespace: shop
spec:
  ips: [10.251.0.10]
  node: node0
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-a
  namespace: shop
spec:
  rules:
  - from:
    - source:
        principals:
        - cluster.local/ns/shop/sa/a
        - cluster.local/ns/shop/sa/b*
"""


def write(path: Path, text: str) -> Path:
    # Write a sibling and rename over, as editors and ConfigMap updates do, so the watcher never
    # sees a half-written file.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def error_for(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_path(write(tmp_path / "mesh.yaml", text))
    return str(info.value)


def test_example_loads() -> None:
    state = load_path(EXAMPLE)
    assert {w.ref for w in state.workloads} == {"shop/frontend", "shop/backend", "shop/db",
                                                "tools/debug"}
    db = state.workload_named("shop", "db")
    assert db is not None and db.ips == (ipaddress.ip_address("10.251.1.10"),)
    assert db.node == "node1"
    assert len(state.authorization_policies) == 3 and len(state.peer_authentications) == 1


def test_error_names_file_line_and_field(tmp_path: Path) -> None:
    msg = error_for(tmp_path, GOOD.replace("sa/b*", "sa/b*c"))
    # line 23 is `- cluster.local/ns/shop/sa/b*c`
    assert msg.startswith(f"{tmp_path / 'mesh.yaml'}:23: "
                          "spec.rules[0].from[0].source.principals[1]: ")
    assert "'*' is allowed only alone" in msg


@pytest.mark.parametrize(("text", "line", "expected"), [
    (GOOD.replace("  node: node0", "  node: node0\n  nodes: x"), 11,
     "spec.nodes: unknown field (known fields: inMesh, ips, node, ports, ready, serviceAccount, "
     "trustDomain, uid)"),
    (GOOD.replace("  rules:", "  rulez:"), 18, "spec.rulez: unknown field"),
    (GOOD.replace("[10.251.0.10]", "[10.251.0.300]"), 9, "spec.ips[0]: '10.251.0.300' is not"),
    (GOOD.replace("metadata: {name: shop}", "metadata: {name: Shop}"), 2,
     "metadata.name: 'Shop' is not a valid Kubernetes name"),
    (GOOD.replace("kind: Namespace", "kind: Namspace"), 1,
     "kind: 'Namspace': want one of Workload, Namespace, Service"),
    (GOOD.replace("  ips: [10.251.0.10]\n", ""), 8, "spec.ips: a workload needs at least one IP"),
    (GOOD.replace("  name: web\n", ""), 5, "metadata.name: required field is missing"),
    (GOOD.replace("spec:\n  rules:", "spec:\n  action: CUSTOM\n  rules:"), 18,
     "spec.action: CUSTOM is not supported by ztunnel-style L4 enforcement"),
    (GOOD.replace("  node: node0", "  node: node0\n  node: node1"), 11,
     "spec.node: duplicate key"),
    ("a: [1, 2\n", 2, "invalid YAML"),
    ("kind: Namespace\nmetadata: {name: a}\n---\nkind: Namespace\nmetadata: {name: a}\n", 4,
     "Namespace a is defined twice (first at"),
    (GOOD + "---\nkind: Workload\nmetadata: {name: web2, namespace: shop}\n"
            "spec: {ips: [10.251.0.10]}\n", 25,
     "IP 10.251.0.10 of workload shop/web2 is already used by shop/web"),
])
def test_errors(tmp_path: Path, text: str, line: int, expected: str) -> None:
    msg = error_for(tmp_path, text)
    assert msg.startswith(f"{tmp_path / 'mesh.yaml'}:{line}: "), msg
    assert expected in msg


def test_directory_of_files(tmp_path: Path) -> None:
    parts = GOOD.split("---\n")
    write(tmp_path / "a.yaml", parts[0])
    write(tmp_path / "b.yml", parts[1] + "---\n" + parts[2] + "---\n")  # trailing empty doc
    write(tmp_path / "notes.txt", "not: [yaml")  # ignored: not .yaml/.yml
    state = load_path(tmp_path)
    assert len(state.all_objects()) == 3
    write(tmp_path / "c.yaml", "kind: Namespace\nmetadata:\n  name: shop\n")
    with pytest.raises(ConfigError) as info:
        load_path(tmp_path)
    assert str(info.value) == (f"{tmp_path / 'c.yaml'}:1: Namespace shop is defined twice "
                               f"(first at {tmp_path / 'a.yaml'}:1)")


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_path(tmp_path / "nope.yaml")


class Recorder:
    """Collects store changes and errors; lets a test wait for the next one of either."""

    def __init__(self, store: StateStore) -> None:
        self.states: list[MeshState] = []
        self.errors: list[ConfigError] = []
        self.event = threading.Event()
        store.subscribe(self._state)

    def _state(self, _old: MeshState, new: MeshState) -> None:
        self.states.append(new)
        self.event.set()

    def error(self, e: ConfigError) -> None:
        self.errors.append(e)
        self.event.set()

    def wait(self) -> None:
        assert self.event.wait(WAIT), "the file source did not react to the change"
        self.event.clear()


def test_watcher_applies_good_changes_and_keeps_last_good_state(tmp_path: Path) -> None:
    path = write(tmp_path / "mesh.yaml", GOOD)
    store = StateStore()
    rec = Recorder(store)
    source = FileSource(path, store, on_error=rec.error, poll_interval=0.02)
    first = source.load_once()
    assert store.current is first
    rec.event.clear()
    source.start()
    try:
        # an invalid edit: reported with file:line:field, state unchanged
        write(path, GOOD.replace("[10.251.0.10]", "[10.251.0.999]"))
        rec.wait()
        assert len(rec.errors) == 1 and store.current is first
        assert str(rec.errors[0]).startswith(f"{path}:9: spec.ips[0]: ")
        # a valid edit replaces the state
        write(path, GOOD.replace("10.251.0.10", "10.251.0.20"))
        rec.wait()
        assert len(rec.states) == 2 and store.current is rec.states[-1]
        web = store.current.workload_named("shop", "web")
        assert web is not None and web.ips == (ipaddress.ip_address("10.251.0.20"),)
        # the file disappearing is an error too; the state stays
        good = store.current
        path.unlink()
        rec.wait()
        assert "cannot read" in str(rec.errors[-1]) and store.current is good
        write(path, GOOD)
        rec.wait()
        assert store.current is not good and len(rec.errors) == 2
    finally:
        source.stop()


def test_invalid_start_then_fixed_with_async_run(tmp_path: Path) -> None:
    path = write(tmp_path / "mesh.yaml", "kind: Workload\n")
    store = StateStore()
    rec = Recorder(store)
    source = FileSource(path, store, on_error=rec.error, poll_interval=0.02)
    with pytest.raises(ConfigError, match=":1: metadata: want a mapping, got null"):
        source.load_once()

    async def scenario() -> None:
        task = asyncio.create_task(source.run())
        try:
            write(path, GOOD)
            while not rec.states:
                await asyncio.sleep(0.01)
        finally:
            source.stop()
            await task

    asyncio.run(asyncio.wait_for(scenario(), WAIT))
    assert rec.errors == []  # load_once raised it; polling the same content does not repeat it
    assert store.current.workload_named("shop", "web") is not None

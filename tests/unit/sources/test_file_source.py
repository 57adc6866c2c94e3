"""The local file source: file:line:field errors, atomic reloads, last good state kept."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from agent.sources import file as file_source
from agent.sources.file import (
    DEFAULT_LIMITS,
    FileSource,
    LimitError,
    Limits,
    MeshConfigError,
    load_path,
)
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
    with pytest.raises(MeshConfigError) as info:
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
    with pytest.raises(MeshConfigError) as info:
        load_path(tmp_path)
    assert str(info.value) == (f"{tmp_path / 'c.yaml'}:1: Namespace shop is defined twice "
                               f"(first at {tmp_path / 'a.yaml'}:1)")


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(MeshConfigError, match="cannot read"):
        load_path(tmp_path / "nope.yaml")


class Recorder:
    """Collects store changes and errors; lets a test wait for the next one of either."""

    def __init__(self, store: StateStore) -> None:
        self.states: list[MeshState] = []
        self.errors: list[MeshConfigError] = []
        self.event = threading.Event()
        store.subscribe(self._state)

    def _state(self, _old: MeshState, new: MeshState) -> None:
        self.states.append(new)
        self.event.set()

    def error(self, e: MeshConfigError) -> None:
        self.errors.append(e)
        self.event.set()

    def wait(self) -> None:
        assert self.event.wait(WAIT), "the file source did not react to the change"
        self.event.clear()


def start_watching(source: FileSource) -> Callable[[], None]:
    """`source.run()` in a thread of its own with its own event loop; returns what stops it."""
    thread = threading.Thread(target=asyncio.run, args=(source.run(),), name="file-source",
                              daemon=True)
    thread.start()

    def stop() -> None:
        source.stop()
        thread.join(WAIT)
        assert not thread.is_alive(), "the file source did not stop"

    return stop


def test_watcher_applies_good_changes_and_keeps_last_good_state(tmp_path: Path) -> None:
    path = write(tmp_path / "mesh.yaml", GOOD)
    store = StateStore()
    rec = Recorder(store)
    source = FileSource(path, store, on_error=rec.error)
    first = source.load_once()
    assert store.current is first
    rec.event.clear()
    stop = start_watching(source)
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
        stop()


def test_invalid_start_then_fixed_with_async_run(tmp_path: Path) -> None:
    path = write(tmp_path / "mesh.yaml", "kind: Workload\n")
    store = StateStore()
    rec = Recorder(store)
    source = FileSource(path, store, on_error=rec.error)
    with pytest.raises(MeshConfigError, match=":1: metadata: want a mapping, got null"):
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


# -- fail closed: empty, truncated and oversized input never replaces the last good state -------

@pytest.mark.parametrize(("text", "expected"), [
    ("", ":1: the file is empty"),
    ("  \n\n", ":1: the file is empty"),
    ("# all commented out\n", ":1: the file has no documents"),
    ("---\n", ":1: the file has no documents"),
    ("--- ~\n--- null\n", ":1: the file has no documents"),
    (GOOD[:-1], ":23: the file does not end with a newline: it may be truncated"),
    (GOOD[: GOOD.index("namespace: shop") + 9], ":7: the file does not end with a newline"),
])
def test_empty_or_truncated_files_are_errors(tmp_path: Path, text: str, expected: str) -> None:
    msg = error_for(tmp_path, text)
    assert msg.startswith(f"{tmp_path / 'mesh.yaml'}{expected}"), msg
    assert "kind: Empty" in msg or "newline" in msg  # says how to do it on purpose


def test_kind_empty_defines_nothing_on_purpose(tmp_path: Path) -> None:
    path = write(tmp_path / "mesh.yaml", "# the mesh is cleared on purpose\nkind: Empty\n")
    assert load_path(path).all_objects() == []
    write(path, "apiVersion: nodemesh.io/v1alpha1\nkind: Empty\n")
    assert load_path(path).all_objects() == []
    # not mixed with objects, and no other fields
    assert error_for(tmp_path, "kind: Empty\n---\n" + GOOD).endswith(
        "mesh.yaml:1: kind: Empty says the file defines nothing, so it must be the file's only "
        "document")
    assert error_for(tmp_path, "kind: Empty\nspec: {}\n").startswith(
        f"{path}:2: spec: unknown field (known fields: apiVersion, kind)")
    # in a directory, one explicitly empty file next to others is fine
    d = tmp_path / "dir"
    d.mkdir()
    write(d / "a.yaml", GOOD)
    write(d / "b.yaml", "kind: Empty\n")
    assert len(load_path(d).all_objects()) == 3
    write(d / "c.yaml", "")
    with pytest.raises(MeshConfigError, match=r"c\.yaml:1: the file is empty"):
        load_path(d)


def test_a_directory_without_mesh_files_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MeshConfigError, match="no mesh files"):
        load_path(tmp_path)


def _alias_bomb(levels: int = 9, fanout: int = 9) -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fanout)}]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_rejected_before_expansion(tmp_path: Path) -> None:
    # 9^9 (~387M) strings once expanded; rejected at the alias that crosses the node budget.
    msg = error_for(tmp_path, _alias_bomb())
    # l5 (line 6) is the first list past 500k nodes: 9^5 strings
    assert msg.startswith(f"{tmp_path / 'mesh.yaml'}:6: the configuration expands to more than "
                          f"{DEFAULT_LIMITS.max_nodes} YAML nodes (limit; an alias counts its "
                          "whole subtree at every use)"), msg
    with pytest.raises(LimitError):
        load_path(tmp_path / "mesh.yaml")


def test_aliases_within_the_budget_load(tmp_path: Path) -> None:
    text = GOOD.replace("  - from:", "  - from: &from").replace(
        "        - cluster.local/ns/shop/sa/b*\n", "        - cluster.local/ns/shop/sa/b*\n"
        "  - from: *from\n    to: [{operation: {ports: ['80']}}]\n")
    state = load_path(write(tmp_path / "mesh.yaml", text))
    (policy,) = state.authorization_policies
    assert len(policy.rules) == 2 and policy.rules[0].clauses[0] == policy.rules[1].clauses[0]


def test_recursive_alias_is_rejected(tmp_path: Path) -> None:
    msg = error_for(tmp_path, "kind: Namespace\nmetadata: &m {name: a, labels: *m}\n")
    assert msg == (f"{tmp_path / 'mesh.yaml'}:2: alias *m refers to a node that contains it "
                   "(recursive data is not allowed)")


@pytest.mark.parametrize(("limits", "text", "expected"), [
    # the document's mapping is level 1, a scalar is a level too
    (Limits(max_depth=4), "a: [[x]]\n", None),
    (Limits(max_depth=4), "a: [[[x]]]\n", ":1: nested more than 4 levels deep (limit)"),
    # an alias reaches as deep as the subtree it repeats
    (Limits(max_depth=4), "a: &a [x]\nb: [*a]\n", None),
    (Limits(max_depth=4), "a: &a [[x]]\nb: [*a]\n", ":2: nested more than 4 levels deep"),
    (Limits(max_documents=2), "a: 1\n---\nb: 2\n", None),
    (Limits(max_documents=2), "a: 1\n---\nb: 2\n---\nc: 3\n",
     ":4: more than 2 YAML documents in one load (limit)"),
    (Limits(max_nodes=7), "a: [1, 2]\nb: 3\n", None),
    (Limits(max_nodes=7), "a: [1, 2]\nb: [3]\n", ":2: the configuration expands to more than 7"),
    (Limits(max_nodes=9), "a: &a [1, 2]\nb: *a\n", None),
    (Limits(max_nodes=9), "a: &a [1, 2]\nb: *a\nc: *a\n", ":3: the configuration expands"),
])
def test_each_bound(tmp_path: Path, limits: Limits, text: str, expected: str | None) -> None:
    path = write(tmp_path / "mesh.yaml", text)
    if expected is None:
        # within the bound: the YAML is fine, the (non-mesh) content is what fails
        with pytest.raises(MeshConfigError) as info:
            load_path(path, limits=limits)
        assert not isinstance(info.value, LimitError), info.value
        return
    with pytest.raises(LimitError) as err:
        load_path(path, limits=limits)
    assert str(err.value).startswith(f"{path}{expected}"), err.value


def test_default_depth_and_document_bounds(tmp_path: Path) -> None:
    depth = DEFAULT_LIMITS.max_depth
    msg = error_for(tmp_path, "a: " + "[" * depth + "]" * depth + "\n")
    assert f"nested more than {depth} levels deep" in msg
    msg = error_for(tmp_path, "--- ~\n" * (DEFAULT_LIMITS.max_documents + 1))
    assert msg.startswith(f"{tmp_path / 'mesh.yaml'}:{DEFAULT_LIMITS.max_documents + 1}: more "
                          f"than {DEFAULT_LIMITS.max_documents} YAML documents"), msg


def test_size_bound_counts_all_files_and_reads_no_more(tmp_path: Path) -> None:
    limits = Limits(max_bytes=len(GOOD) + 10)
    write(tmp_path / "a.yaml", GOOD)
    assert len(load_path(tmp_path, limits=limits).all_objects()) == 3
    write(tmp_path / "b.yaml", "kind: Empty\n")
    with pytest.raises(LimitError, match=rf"b\.yaml:1: mesh files larger than {len(GOOD) + 10} "
                                         "bytes in total"):
        load_path(tmp_path, limits=limits)
    big = tmp_path / "big" / "mesh.yaml"
    big.parent.mkdir()
    with big.open("wb") as fh:
        fh.truncate(DEFAULT_LIMITS.max_bytes + 1)  # sparse: the limit stops the read
    with pytest.raises(LimitError, match=f"larger than {DEFAULT_LIMITS.max_bytes} bytes"):
        load_path(big)


@pytest.mark.parametrize(("text", "expected"), [
    ("a: b\x00\n", ":1: invalid YAML: control characters are not allowed"),
    ("a: 1\nb: 2024-13-45\n", ":1: cannot read a value: month must be in 1..12"),
    ("a: " + "7" * 5000 + "\n", ":1: cannot read a value: Exceeds the limit"),
])
def test_values_python_cannot_build_are_config_errors(tmp_path: Path, text: str,
                                                      expected: str) -> None:
    assert error_for(tmp_path, text).startswith(f"{tmp_path / 'mesh.yaml'}{expected}")


def test_watcher_keeps_last_good_state_through_bad_writes(tmp_path: Path) -> None:
    path = write(tmp_path / "mesh.yaml", GOOD)
    store = StateStore()
    rec = Recorder(store)
    source = FileSource(path, store, on_error=rec.error)
    first = source.load_once()
    rec.event.clear()
    stop = start_watching(source)
    try:
        bad = ["", GOOD[: GOOD.index("spec:")], "---\n# nothing\n", _alias_bomb(),
               GOOD.replace("name: allow-a", "name: ../../etc/Bad_Name!")]
        for n, text in enumerate(bad, 1):
            path.write_text(text)  # in place, as a careless writer would
            rec.wait()
            assert len(rec.errors) == n and store.current is first, rec.errors
            assert source.errors == n and source.last_error == str(rec.errors[-1])
            assert source.status()["state"] == "error: last good state kept"
        write(path, GOOD.replace("10.251.0.10", "10.251.0.20"))
        rec.wait()
        assert store.current is not first and len(rec.states) == 2
        assert source.status()["state"] == "ok" and source.status()["errors"] == len(bad)
        write(path, "kind: Empty\n")  # on purpose: the file's objects go
        rec.wait()
        assert store.current.all_objects() == [] and source.errors == len(bad)
    finally:
        stop()


@pytest.mark.parametrize("exc", [MemoryError(), RecursionError("maximum recursion depth"),
                                 RuntimeError("a bug")])
def test_any_exception_while_loading_is_reported_and_the_watcher_lives(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        exc: Exception) -> None:
    path = write(tmp_path / "mesh.yaml", GOOD)
    store = StateStore()
    rec = Recorder(store)
    source = FileSource(path, store, on_error=rec.error)
    first = source.load_once()
    rec.states.clear()
    real = file_source.parse_files

    def broken(*args: object, **kwargs: object) -> MeshState:
        raise exc

    monkeypatch.setattr(file_source, "parse_files", broken)
    caplog.set_level(logging.DEBUG, logger="agent.sources.file")

    async def scenario() -> None:
        task = asyncio.create_task(source.run())
        try:
            write(path, GOOD.replace("10.251.0.10", "10.251.0.20"))
            while not rec.errors:
                await asyncio.sleep(0.01)
            assert store.current is first and not task.done()
            monkeypatch.setattr(file_source, "parse_files", real)
            write(path, GOOD.replace("10.251.0.10", "10.251.0.30"))
            while not rec.states:
                await asyncio.sleep(0.01)
        finally:
            source.stop()
            await task

    asyncio.run(asyncio.wait_for(scenario(), WAIT))
    assert len(rec.errors) == 1 and source.errors == 1
    assert str(rec.errors[0]) == (f"{path}: loading failed unexpectedly: "
                                  f"{type(exc).__name__}: {exc}")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None  # one line, no traceback
    web = store.current.workload_named("shop", "web")
    assert web is not None and web.ips == (ipaddress.ip_address("10.251.0.30"),)


def test_a_failing_apply_or_error_handler_is_reported_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "mesh.yaml", GOOD)
    store = StateStore()
    source = FileSource(path, store, on_error=lambda e: 1 / 0)  # type: ignore[func-returns-value]
    first = source.load_once()

    def broken(*args: object) -> MeshState:
        raise MemoryError

    monkeypatch.setattr(file_source, "merge_own", broken)
    write(path, GOOD.replace("10.251.0.10", "10.251.0.20"))
    assert source.poll() is False
    assert store.current is first and source.errors == 1
    assert source.last_error == f"{path}: applying the new state failed unexpectedly: MemoryError: "


# -- inotify: changes are seen without polling, and only once the writer is done ----------------

def _run_until(source: FileSource, steps: Callable[[], Awaitable[None]]) -> None:
    async def scenario() -> None:
        task = asyncio.create_task(source.run())
        try:
            await steps()
        finally:
            source.stop()
            await task

    asyncio.run(asyncio.wait_for(scenario(), WAIT))


async def _until(check: Callable[[], bool]) -> None:
    while not check():
        await asyncio.sleep(0.01)


def test_inotify_sees_in_place_writes_renames_and_configmap_swaps(tmp_path: Path) -> None:
    """With the rescan an hour away, only inotify can make these changes visible."""
    data = tmp_path / "..2026_01_01"
    data.mkdir()
    write(data / "mesh.yaml", GOOD)
    (tmp_path / "..data").symlink_to(data.name)
    path = tmp_path / "mesh.yaml"
    path.symlink_to("..data/mesh.yaml")
    store = StateStore()
    rec = Recorder(store)
    source = FileSource(path, store, on_error=rec.error, rescan_interval=3600)
    source.load_once()
    rec.states.clear()

    def ip_of_web() -> str:
        web = store.current.workload_named("shop", "web")
        return str(web.ips[0]) if web is not None else ""

    async def steps() -> None:
        await asyncio.sleep(0.05)  # run() has made its first attempt and watches
        # A ConfigMap update: a new data directory, then an atomic swap of the ..data link.
        new = tmp_path / "..2026_01_02"
        new.mkdir()
        write(new / "mesh.yaml", GOOD.replace("10.251.0.10", "10.251.0.20"))
        (tmp_path / "..data_tmp").symlink_to(new.name)
        (tmp_path / "..data_tmp").replace(tmp_path / "..data")
        await _until(lambda: ip_of_web() == "10.251.0.20")
        # An editor's rename over the file.
        path.unlink()
        write(path, GOOD.replace("10.251.0.10", "10.251.0.30"))
        await _until(lambda: ip_of_web() == "10.251.0.30")
        # A careless in-place write.
        path.write_text(GOOD.replace("10.251.0.10", "10.251.0.40"))
        await _until(lambda: ip_of_web() == "10.251.0.40")

    _run_until(source, steps)
    assert rec.errors == [] and len(rec.states) == 3


def test_a_file_still_being_written_is_read_once_its_writer_closes_it(tmp_path: Path) -> None:
    path = write(tmp_path / "mesh.yaml", GOOD)
    store = StateStore()
    rec = Recorder(store)
    source = FileSource(path, store, on_error=rec.error, rescan_interval=3600)
    source.load_once()
    rec.states.clear()
    changed = GOOD.replace("10.251.0.10", "10.251.0.50")

    async def steps() -> None:
        await asyncio.sleep(0.05)
        with path.open("w") as f:  # truncated, then half the new content, flushed
            f.write(changed[: len(changed) // 2])
            f.flush()
            await asyncio.sleep(0.3)  # a poller would have read the half file by now
            assert rec.errors == [] and rec.states == []
            f.write(changed[len(changed) // 2:])
        await _until(lambda: bool(rec.states))

    _run_until(source, steps)
    assert rec.errors == [] and len(rec.states) == 1
    web = store.current.workload_named("shop", "web")
    assert web is not None and web.ips == (ipaddress.ip_address("10.251.0.50"),)


# -- the document cache ------------------------------------------------------------------------

def _parse(cache: file_source.DocumentCache, text: str, limits: Limits = DEFAULT_LIMITS,
           name: str = "mesh.yaml") -> MeshState:
    return file_source.parse_files([(Path(name), text.encode())], limits=limits, cache=cache)


def test_a_reload_parses_only_the_documents_that_changed() -> None:
    cache = file_source.DocumentCache()
    first = _parse(cache, GOOD)
    assert cache.parses == 3
    changed = GOOD.replace("sa/b*", "sa/c*")
    second = _parse(cache, changed)
    assert cache.parses == 4  # only the AuthorizationPolicy
    # Unchanged documents are the very objects of the last load (the store tells them apart by
    # instance); the changed one is new.
    assert second.workloads == first.workloads
    assert second.workloads[0] is first.workloads[0]
    assert second.authorization_policies != first.authorization_policies
    assert _parse(file_source.DocumentCache(), changed).objects == second.objects
    _parse(cache, changed)
    assert cache.parses == 4  # nothing changed: nothing parsed


def test_a_cached_document_reports_errors_at_its_new_line() -> None:
    cache = file_source.DocumentCache()
    _parse(cache, GOOD)
    moved = "kind: Namespace\nmetadata: {name: extra}\n---\n" + GOOD
    # the Workload document moved down by three lines and is served from the cache; a second
    # workload with its IP is reported where the cached one now is
    text = moved + "---\nkind: Workload\nmetadata: {name: web2, namespace: shop}\n" \
                   "spec: {ips: [10.251.0.10]}\n"
    parses = cache.parses
    with pytest.raises(MeshConfigError) as err:
        _parse(cache, text)
    # new: the extra Namespace, shop's (now after a `---` line) and web2
    assert cache.parses == parses + 3
    assert str(err.value).startswith("mesh.yaml:28: IP 10.251.0.10 of workload shop/web2 is "
                                     "already used by shop/web (mesh.yaml:7)"), err.value
    # the same error as without a cache
    with pytest.raises(MeshConfigError) as fresh:
        _parse(file_source.DocumentCache(), text)
    assert str(fresh.value) == str(err.value)


def test_cached_documents_still_count_against_the_bounds_of_the_whole_load() -> None:
    doc = "kind: Namespace\nmetadata: {name: a}\n"
    limits = Limits(max_documents=2)
    cache = file_source.DocumentCache(limits)
    _parse(cache, doc + "---\n" + doc.replace("name: a", "name: b"), limits)
    text = doc + "---\n" + doc.replace("name: a", "name: b") + "---\n" + doc.replace(
        "name: a", "name: c")
    with pytest.raises(LimitError) as err:
        _parse(cache, text, limits)
    # the third document's `---` line, as without a cache
    assert str(err.value).startswith("mesh.yaml:6: more than 2 YAML documents"), err.value
    with pytest.raises(LimitError) as fresh:
        _parse(file_source.DocumentCache(limits), text, limits)
    assert str(fresh.value) == str(err.value)
    nodes = Limits(max_nodes=14)  # a Namespace document here is 7 nodes
    cache = file_source.DocumentCache(nodes)
    _parse(cache, doc + "---\n" + doc.replace("name: a", "name: b"), nodes)
    # two cache hits and one new document: still too big for the whole load
    text = doc + "---\n" + doc.replace("name: a", "name: b") + "---\n" + doc
    with pytest.raises(LimitError) as err:
        _parse(cache, text, nodes)
    assert "expands to more than 14 YAML nodes" in str(err.value)
    with pytest.raises(LimitError) as fresh:
        _parse(file_source.DocumentCache(nodes), text, nodes)
    assert str(fresh.value) == str(err.value)


def test_a_failed_load_keeps_the_last_good_documents_cached() -> None:
    cache = file_source.DocumentCache()
    _parse(cache, GOOD)
    with pytest.raises(MeshConfigError):
        _parse(cache, GOOD + "---\nkind: Nope\n")
    parses = cache.parses
    _parse(cache, GOOD)
    assert cache.parses == parses


@pytest.mark.parametrize("text", [
    "%YAML 1.1\n---\nkind: Namespace\nmetadata: {name: a}\n",
    "kind: Namespace\r\nmetadata: {name: a}\r\n---\r\nkind: Namespace\r\nmetadata: {name: b}\r\n",
    "kind: Namespace\nmetadata: {name: a}\n...\n---\nkind: Namespace\nmetadata: {name: b}\n",
])
def test_files_that_cannot_be_split_safely_are_parsed_whole(text: str) -> None:
    cache = file_source.DocumentCache()
    state = _parse(cache, text)
    assert cache.parses == 1
    assert state.objects == file_source.parse_files([(Path("mesh.yaml"), text.encode())]).objects


def test_the_file_source_reuses_its_cache(tmp_path: Path) -> None:
    path = write(tmp_path / "mesh.yaml", GOOD)
    source = FileSource(path, StateStore())
    source.load_once()
    assert source.cache.parses == 3
    write(path, GOOD.replace("sa/b*", "sa/c*"))
    assert source.poll()
    assert source.cache.parses == 4

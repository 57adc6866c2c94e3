"""Property tests for the mesh-file parser: whatever the bytes, a MeshState or a MeshConfigError
that names file:line -- never another exception, never unbounded work or memory.

Runs with hypothesis' default settings (deadline off: the guest clock is slow); a profile loaded
by a conftest (`make fuzz`) may raise the number of examples.
"""

from __future__ import annotations

import copy
import re
import tracemalloc
from pathlib import Path

import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from agent.sources.file import LimitError, Limits, MeshConfigError, parse_files
from agent.state.snapshot import MeshState

EXAMPLE = (Path(__file__).resolve().parents[3] / "examples" / "demo-mesh.yaml").read_bytes()
NAME = "fuzz/mesh.yaml"
WHERE = re.compile(rf"^{re.escape(NAME)}:\d+: \S")


def memory_bound(limits: Limits) -> int:
    """Loading may take memory in proportion to the node budget (each node's field path and
    line are kept; ~160 bytes measured), never in proportion to what the text describes: the
    alias structures below describe up to 10^11 nodes."""
    return 16 * 1024 * 1024 + 400 * limits.max_nodes


def load(raw: bytes, limits: Limits | None = None) -> MeshState | MeshConfigError:
    """The parser's outcome; any exception other than MeshConfigError fails the test."""
    try:
        return parse_files([(Path(NAME), raw)], limits=limits or Limits())
    except MeshConfigError as e:
        assert WHERE.match(str(e)), f"not file:line: {e}"
        assert "\n" not in str(e) or str(e).count("\n") < 5, f"not one clear line: {e}"
        return e


def load_bounded_memory(raw: bytes, limits: Limits | None = None) -> MeshState | MeshConfigError:
    limits = limits or Limits()
    tracemalloc.start()
    try:
        outcome = load(raw, limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < memory_bound(limits), f"{peak} bytes for a {len(raw)}-byte file"
    return outcome


# -- arbitrary and mutated input -------------------------------------------------------------

@settings(deadline=None)
@given(st.binary(max_size=2000))
def test_any_bytes(raw: bytes) -> None:
    load(raw)


YAML_ALPHABET = st.sampled_from([
    *"abkmn019 -:[]{},&*!|>'\"#?%@`\n\t.~<", "---\n", "...\n", "kind: ", "metadata:",
    "name: ", "spec:", "- ", "  ", "&a ", "*a", "<<: ", "\u00e9", "\x00", "\ufeff"])


@settings(deadline=None)
@given(st.lists(YAML_ALPHABET, max_size=300).map("".join))
def test_yaml_like_text(text: str) -> None:
    load(text.encode("utf-8", "surrogatepass"))


@st.composite
def mutated_example(draw: st.DrawFn) -> bytes:
    raw = bytearray(EXAMPLE)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "delete", "insert", "duplicate", "flip"]))
        at = draw(st.integers(0, len(raw)))
        if op == "truncate":
            del raw[at:]
        elif op == "delete":
            del raw[at:at + draw(st.integers(1, 80))]
        elif op == "insert":
            raw[at:at] = draw(st.sampled_from([b"&x ", b"*x", b"- ", b"  ", b"\n", b"---\n",
                                                b": ", b"{", b"]", b"'", b"!!binary ", b"<<: *x",
                                                b"kind: Empty\n", b"../../etc/Bad_Name!"]))
        elif op == "duplicate":
            end = min(len(raw), at + draw(st.integers(1, 200)))
            raw[at:at] = raw[at:end]
        elif at < len(raw):
            raw[at] ^= 1 << draw(st.integers(0, 7))
    return bytes(raw)


@settings(deadline=None)
@given(mutated_example())
def test_mutated_example_file(raw: bytes) -> None:
    outcome = load(raw)
    if not raw.endswith(b"\n") or not raw.strip():
        assert isinstance(outcome, MeshConfigError)  # truncated or empty is never a valid state


@settings(deadline=None)
@given(st.integers(0, len(EXAMPLE) - 1))
def test_every_truncation_keeps_nothing_half(cut: int) -> None:
    """A prefix of a valid file cut inside a line is always rejected."""
    raw = EXAMPLE[:cut]
    assume(not raw.endswith(b"\n"))
    assert isinstance(load(raw), MeshConfigError)


# -- the bounds --------------------------------------------------------------------------------

@st.composite
def alias_chain(draw: st.DrawFn) -> tuple[str, int]:
    """`levels` anchors, each a list of `fanout` aliases to the previous: the exponential
    structure of a "billion laughs" file; returns the text and its node count, expanded."""
    levels = draw(st.integers(1, 12))
    fanout = draw(st.integers(1, 10))
    lines = ["l0: &l0 x"]
    size = [1]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fanout)}]")
        size.append(1 + fanout * size[-1])
    # the document mapping + one key scalar and one value per line
    return "\n".join(lines) + "\n", 1 + levels + sum(size)


@settings(deadline=None)
@given(alias_chain(), st.sampled_from([100, 10_000, 500_000]))
def test_alias_expansion_is_counted_exactly_and_bounded(chain: tuple[str, int],
                                                        max_nodes: int) -> None:
    text, expanded = chain
    outcome = load_bounded_memory(text.encode(), Limits(max_nodes=max_nodes))
    assert isinstance(outcome, MeshConfigError)  # not a mesh document either way
    assert isinstance(outcome, LimitError) == (expanded > max_nodes), (expanded, outcome)


@st.composite
def nested(draw: st.DrawFn) -> tuple[str, int]:
    """A value nested `depth` collections deep (flow or block, lists or maps, maybe through an
    alias); returns the text and its depth counting the document mapping and the leaf."""
    depth = draw(st.integers(1, 80))
    opens = draw(st.lists(st.sampled_from(["[", "{k: "]), min_size=depth, max_size=depth))
    inner = "".join(opens) + "x" + "".join("]" if o == "[" else "}" for o in reversed(opens))
    if draw(st.booleans()):
        return f"a: &a {inner}\nb: *a\n", depth + 2
    return f"a: {inner}\n", depth + 2


@settings(deadline=None)
@given(nested())
def test_nesting_depth_is_bounded(case: tuple[str, int]) -> None:
    text, depth = case
    outcome = load_bounded_memory(text.encode())
    assert isinstance(outcome, MeshConfigError)
    assert isinstance(outcome, LimitError) == (depth > Limits().max_depth), (depth, outcome)


@settings(deadline=None)
@given(st.integers(1, 40), st.integers(1, 40))
def test_document_count_is_bounded(documents: int, limit: int) -> None:
    raw = b"".join(b"---\nkind: Namespace\nmetadata: {name: ns%d}\n" % i for i in range(documents))
    outcome = load(raw, Limits(max_documents=limit))
    if documents > limit:
        assert isinstance(outcome, LimitError)
        assert str(outcome).startswith(f"{NAME}:{3 * limit + 1}: more than {limit} YAML documents")
    else:
        assert isinstance(outcome, MeshState) and len(outcome.namespaces) == documents


@settings(deadline=None)
@given(st.integers(0, 300), st.integers(1, 300))
def test_size_is_bounded(size: int, limit: int) -> None:
    raw = b"#" * max(size - 1, 0) + b"\n"
    outcome = load(raw, Limits(max_bytes=limit))
    assert isinstance(outcome, MeshConfigError)  # comments only: never a state
    assert isinstance(outcome, LimitError) == (len(raw) > limit)


# -- valid documents still load --------------------------------------------------------------

LABEL = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?\Z")


@settings(deadline=None)
@given(st.lists(LABEL, min_size=1, max_size=10, unique=True), st.booleans())
def test_generated_valid_files_load(names: list[str], flow: bool) -> None:
    docs = [{"kind": "Namespace", "metadata": {"name": n}} for n in names]
    raw = yaml.safe_dump_all(docs, default_flow_style=flow).encode()
    outcome = load(raw)
    assert isinstance(outcome, MeshState), outcome
    assert sorted(n.name for n in outcome.namespaces) == sorted(names)


# -- any value in any field of a real mesh document --------------------------------------------

EXAMPLE_DOCS = list(yaml.safe_load_all(EXAMPLE))
JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
    | st.text(max_size=20) | st.sampled_from(["*", "a*", "*b", "10.0.0.0/8", "::1", "8080", "",
                                                "ALLOW", "DENY", "STRICT", "ns/sa", "Bad_Name!"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=12) | st.sampled_from(["from", "to", "when", "source", "operation",
                                                 "principals", "ports", "key", "values",
                                                 "matchLabels", "mode", "selector"]),
        inner, max_size=4),
    max_leaves=12)


def _paths(value: object, prefix: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def corrupted_document(draw: st.DrawFn) -> bytes:
    doc = copy.deepcopy(draw(st.sampled_from(EXAMPLE_DOCS)))
    path = draw(st.sampled_from(_paths(doc)[1:]))
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    parent[path[-1]] = draw(JUNK)
    return yaml.safe_dump(doc, allow_unicode=True).encode()


@settings(deadline=None)
@given(corrupted_document())
def test_any_value_in_any_field(raw: bytes) -> None:
    load(raw)

"""Mesh YAML text to plain documents, each field with its line, within fixed bounds.

YAML can describe far more than it spells out: an alias repeats a whole subtree by reference (a
"billion laughs" file of a few hundred bytes expands to billions of nodes) and nesting has no
limit of its own. Before any node is built, one pass over libyaml's event stream (linear in the
text, constant memory) counts what loading would produce -- documents, nodes with every alias
expanded at each use, nesting depth -- and stops at the first bound crossed, naming file and
line. Only then are nodes composed and constructed, so their size is bounded by `Limits`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import yaml

from agent.model.fields import FieldError, FieldPath


class MeshConfigError(ValueError):
    """A configuration file is unreadable or invalid; the message says file:line: field."""


class LimitError(MeshConfigError):
    """The configuration crosses one of the `Limits`; the message names the bound."""


@dataclass(frozen=True)
class Limits:
    """Bounds on one load (all files of a directory together).

    The 10k-rule benchmark policy is 0.8 MB, ~90k YAML nodes and depth 9; it loads in ~1 s
    with ~60 MB of peak memory growth (measured), so these leave room for a few times that
    while keeping the worst case to seconds and a few hundred MB.
    """

    max_bytes: int = 8 * 1024 * 1024
    max_documents: int = 50_000
    max_nodes: int = 500_000  # scalars and collections, an alias counting its whole subtree
    max_depth: int = 32


DEFAULT_LIMITS = Limits()


class Budget:
    """What the files of one load have used so far."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self.bytes = 0
        self.documents = 0
        self.nodes = 0


class YamlDocument:
    """One YAML document as plain data, plus the line of every field path in it."""

    def __init__(self, data: object, lines: dict[FieldPath, int], start: int,
                 shift: int = 0) -> None:
        self.data = data
        self.lines = lines  # as parsed; line_of adds `shift`
        self.start = start + shift
        self._shift = shift

    def shifted(self, lines: int) -> YamlDocument:
        """The same document `lines` further down its file (a cached parse reused after the
        lines above it changed); shares data and the line table."""
        return YamlDocument(self.data, self.lines, self.start - self._shift,
                            self._shift + lines)

    def line_of(self, path: FieldPath) -> int:
        # The deepest recorded prefix: a missing field is reported at its parent.
        for n in range(len(path), 0, -1):
            if path[:n] in self.lines:
                return self.lines[path[:n]] + self._shift
        return self.start


# libyaml: a 10k-rule policy loads in 1.9 s instead of 5.1 s (measured); same nodes and marks.
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# Only used for construct_scalar, which reads no loader state.
_CONSTRUCTOR = yaml.SafeLoader("")


class _Open:
    """A collection whose end event has not come yet."""

    __slots__ = ("anchor", "deepest", "depth", "nodes_before")

    def __init__(self, anchor: str | None, depth: int, nodes_before: int) -> None:
        self.anchor, self.depth, self.deepest = anchor, depth, depth
        self.nodes_before = nodes_before


class _BoundsCheck:
    """Counts one file's events against the load's budget; raises LimitError at the first bound
    crossed. Anchors map to the expanded size and height of their subtree, so an alias costs
    what its expansion will cost."""

    def __init__(self, name: str, budget: Budget) -> None:
        self.name, self.budget, self.lim = name, budget, budget.limits
        self.anchors: dict[str, tuple[int, int]] = {}
        self.stack: list[_Open] = []

    def document(self, line: int) -> None:
        self.budget.documents += 1
        if self.budget.documents > self.lim.max_documents:
            raise LimitError(f"{self.name}:{line}: more than {self.lim.max_documents} YAML "
                             "documents in one load (limit)")
        self.anchors.clear()  # anchors are per document

    def node(self, ev: yaml.NodeEvent, line: int) -> None:
        depth = len(self.stack) + 1
        size = height = 1
        if isinstance(ev, yaml.AliasEvent):
            if any(o.anchor == ev.anchor for o in self.stack):
                raise LimitError(f"{self.name}:{line}: alias *{ev.anchor} refers to a node that "
                                 "contains it (recursive data is not allowed)")
            size, height = self.anchors.get(ev.anchor or "", (1, 1))
        self.budget.nodes += size
        if self.budget.nodes > self.lim.max_nodes:
            raise LimitError(f"{self.name}:{line}: the configuration expands to more than "
                             f"{self.lim.max_nodes} YAML nodes (limit; an alias counts its whole "
                             "subtree at every use)")
        reach = depth + height - 1
        if reach > self.lim.max_depth:
            raise LimitError(f"{self.name}:{line}: nested more than {self.lim.max_depth} levels "
                             "deep (limit)")
        if self.stack:
            self.stack[-1].deepest = max(self.stack[-1].deepest, reach)
        if isinstance(ev, yaml.CollectionStartEvent):
            self.stack.append(_Open(ev.anchor, depth, self.budget.nodes - 1))
        elif isinstance(ev, yaml.ScalarEvent) and ev.anchor is not None:
            self.anchors[ev.anchor] = (1, 1)

    def end(self) -> None:
        done = self.stack.pop()
        if done.anchor is not None:
            self.anchors[done.anchor] = (self.budget.nodes - done.nodes_before,
                                         done.deepest - done.depth + 1)
        if self.stack:
            self.stack[-1].deepest = max(self.stack[-1].deepest, done.deepest)


def _check_bounds(text: str, name: str, budget: Budget, base: int = 0) -> None:
    """Raise LimitError if loading `text` would cross a bound; syntax errors raise here as
    MarkedYAMLError, as they would from the composer."""
    check = _BoundsCheck(name, budget)
    loader = _Loader(text)
    try:
        while loader.check_event():
            ev = loader.get_event()  # type: ignore[no-untyped-call]  # untyped in the stubs
            line = base + (ev.start_mark.line + 1 if ev.start_mark is not None else 1)
            if isinstance(ev, yaml.DocumentStartEvent):
                check.document(line)
            elif isinstance(ev, yaml.NodeEvent):
                check.node(ev, line)
            elif isinstance(ev, yaml.CollectionEndEvent):
                check.end()
    finally:
        loader.dispose()


def _walk(node: yaml.Node, data: object, path: FieldPath, lines: dict[FieldPath, int],
          name: str, *, base: int) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode) and isinstance(data, Mapping):
        seen: set[object] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue  # merge keys and complex keys carry no field position of their own
            key = yaml.SafeLoader.construct_scalar(_CONSTRUCTOR, key_node)
            resolved: object = key
            if key not in data:  # non-string scalar key (e.g. a port number)
                resolved = next((k for k in data if str(k) == key), key)
            if resolved in seen:
                raise FieldError((*path, str(resolved)), "duplicate key",
                                 f"{name}:{base + key_node.start_mark.line + 1}")
            seen.add(resolved)
            child = (*path, str(resolved))
            lines[child] = key_node.start_mark.line + 1
            if resolved in data:
                _walk(value_node, data[resolved], child, lines, name, base=base)
    elif isinstance(node, yaml.SequenceNode) and isinstance(data, list):
        for i, (item_node, item) in enumerate(zip(node.value, data, strict=False)):
            _walk(item_node, item, (*path, i), lines, name, base=base)


def _line_at(text: str, offset: int) -> int:
    # libyaml reports reader errors by offset into the UTF-8 bytes it was given.
    return text.encode("utf-8", "surrogatepass")[:max(offset, 0)].count(b"\n") + 1


def documents(text: str, name: str, budget: Budget, first_line: int = 1
              ) -> Iterator[YamlDocument]:
    """The documents of one file (or of the part of it that starts on `first_line`), checked
    against the budget first; raises MeshConfigError."""
    base = first_line - 1
    try:
        _check_bounds(text, name, budget, base)
        loader = _Loader(text)
        try:
            while loader.check_node():
                node = loader.get_node()
                if node is None:
                    continue
                start = node.start_mark.line + 1
                try:
                    data = loader.construct_document(node)
                except (ValueError, TypeError, OverflowError) as e:
                    # e.g. a date like 2024-13-45 or an integer of more than 4300 digits
                    raise MeshConfigError(f"{name}:{base + start}: cannot read a value: {e}") from e
                lines: dict[FieldPath, int] = {}
                try:
                    _walk(node, data, (), lines, name, base=base)
                except FieldError as e:
                    raise MeshConfigError(str(e)) from e
                yield YamlDocument(data, lines, start, base)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = base + (mark.line + 1 if mark else 1)
        raise MeshConfigError(f"{name}:{line}: invalid YAML: {e.problem or e.context}") from e
    except yaml.reader.ReaderError as e:
        where = f"{name}:{base + _line_at(text, e.position)}"
        raise MeshConfigError(f"{where}: invalid YAML: {e.reason} "
                              f"(character {e.character!r})") from e
    except yaml.YAMLError as e:
        raise MeshConfigError(f"{name}:{first_line}: invalid YAML: {e}") from e

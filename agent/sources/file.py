"""Local file source: mesh state from one YAML file or a directory of them, hot-reloaded.

Each file holds YAML documents (`---` separated) of kind Workload, Namespace, Service,
AuthorizationPolicy or PeerAuthentication. A load is all or nothing: every document of every
file must be valid, or the store keeps the last good state and the error (file:line: field:
problem) goes to `on_error` and the log. Bad input never weakens enforcement: an empty or
half-written file is an error (`kind: Empty` clears a file on purpose), YAML is bounded
(meshyaml.Limits) and any failure while loading is reported like invalid input. Under an event
loop (`run`) changes are detected with inotify on the containing directory: a write is read once
its writer closes the file (CLOSE_WRITE), a rename or a ConfigMap's `..data` swap when it lands,
and a slow rescan catches what inotify cannot see (a writer that never closes, network
filesystems); `poll` reloads once, now. Content is compared, not
mtimes, so a rewrite within the filesystem's timestamp granularity is still seen. See
docs/policy.md, "Bad files never weaken enforcement".
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncinotify import Event, Inotify, Mask

from agent.config import DEFAULT_ROOT_NAMESPACE
from agent.model import fields as f
from agent.model.fields import FieldError
from agent.model.mesh import Workload
from agent.sources.documents import API_VERSION, parse_document
from agent.sources.meshyaml import (
    DEFAULT_LIMITS,
    Budget,
    LimitError,
    Limits,
    MeshConfigError,
    YamlDocument,
    documents,
)
from agent.state.snapshot import KIND_OF, KINDS, MeshObject, MeshState, key_of
from agent.state.store import StateStore

__all__ = [
    "DEFAULT_LIMITS",
    "EMPTY_KIND",
    "DocumentCache",
    "FileSource",
    "LimitError",
    "Limits",
    "MeshConfigError",
    "config_files",
    "load_path",
    "merge_own",
    "parse_files",
]

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml")
RESCAN_INTERVAL = 10.0  # the inotify watcher's safety net
# A write counts when its writer closes the file: a half-written file is not read mid-write.
WATCH_MASK = (Mask.CLOSE_WRITE | Mask.MOVED_TO | Mask.MOVED_FROM | Mask.CREATE | Mask.DELETE
              | Mask.DELETE_SELF | Mask.MOVE_SELF)


ErrorHandler = Callable[[MeshConfigError], None]

# A document saying "this file defines nothing, on purpose": a file without objects is what a
# watcher sees while an editor rewrites it in place, so it never clears the mesh by itself.
EMPTY_KIND = "Empty"


# -- loading -----------------------------------------------------------------------------------

def config_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
    return [path]


def _read(path: Path, limits: Limits = DEFAULT_LIMITS) -> list[tuple[Path, bytes]]:
    """Every file's bytes; never more than `limits.max_bytes` (+1 to tell) in memory."""
    out: list[tuple[Path, bytes]] = []
    left = limits.max_bytes
    try:
        for p in config_files(path):
            with p.open("rb") as fh:
                raw = fh.read(left + 1)
            if len(raw) > left:
                raise _too_large(str(p), raw, left, limits)
            left -= len(raw)
            out.append((p, raw))
    except OSError as e:
        raise MeshConfigError(f"{e.filename or path}: cannot read: {e.strerror}") from e
    if not out:  # an emptied directory would clear the mesh like an empty file
        raise MeshConfigError(f"{path}: no mesh files (*.yaml, *.yml); to define nothing on "
                              f"purpose, write a file with `kind: {EMPTY_KIND}`")
    return out


def _too_large(name: str, raw: bytes, left: int, limits: Limits) -> LimitError:
    line = raw[:left].count(b"\n") + 1  # where the limit was crossed
    return LimitError(f"{name}:{line}: mesh files larger than {limits.max_bytes} bytes in total "
                      "(limit)")


def _is_empty_marker(data: object) -> bool:
    return isinstance(data, dict) and data.get("kind") == EMPTY_KIND


def _check_empty_marker(doc: YamlDocument, name: str, others: int) -> None:
    data = f.mapping(doc.data, ())
    f.check_keys(data, (), ("apiVersion", "kind"))
    if "apiVersion" in data and f.string(data, "apiVersion", ()) != API_VERSION:
        f.fail(("apiVersion",), f"{EMPTY_KIND} wants {API_VERSION} (or no apiVersion)")
    if others:
        raise MeshConfigError(f"{name}:{doc.start}: kind: {EMPTY_KIND} says the file defines "
                              "nothing, so it must be the file's only document")


# A line that starts a YAML document. YAML forbids `---` at the start of a line inside any
# scalar or collection, so the text between two of them is a document of its own.
_DOCUMENT_START = re.compile(r"^---(?=[ \t\n]|$)", re.MULTILINE)
# What makes documents depend on text outside their own (a directive line applies to the next
# document; `...` ends one), or what libyaml counts as a line break besides \n (the line numbers
# of a split would drift), or a byte order mark: such a file is parsed whole.
_NO_SPLIT = ("\n%", "\n...", "\r", "\x85", "\u2028", "\u2029", "\ufeff")


def _splittable(text: str) -> bool:
    # `in` per marker: much faster than one regex over a large file
    return not text.startswith(("%", "...")) and not any(m in text for m in _NO_SPLIT)


def _chunks(text: str) -> list[tuple[int, str]]:
    """The file's text split before every document start line, with the line each part starts
    on; one part when the file cannot be split safely."""
    if not _splittable(text):
        return [(1, text)]
    cuts = [0, *(m.start() for m in _DOCUMENT_START.finditer(text) if m.start() > 0), len(text)]
    parts = []
    line = 1
    for a, b in itertools.pairwise(cuts):
        parts.append((line, text[a:b]))
        line += text.count("\n", a, b)
    return parts


class _Item:
    """One non-null document of a file: its YAML until parsed, then only the object (the line
    table and plain data are dropped: a cached object needs neither again)."""

    __slots__ = ("doc", "obj", "start")

    def __init__(self, doc: YamlDocument) -> None:
        self.doc: YamlDocument | None = doc
        self.obj: MeshObject | None = None
        self.start = doc.start


@dataclass
class _Chunk:
    first: int  # the line it was parsed at
    documents: int  # what it added to the load's Budget
    nodes: int
    items: list[_Item]


class DocumentCache:
    """Parse results per YAML document text, so a reload re-parses only documents that changed.

    A document's text parses the same wherever it sits in a file, so a hit is reused with its
    lines shifted; what it used of the Budget is added again, so the bounds still hold for the
    whole load (a hit that would cross one is parsed afresh, which reports the bound at its exact
    line). Only the last good load's documents are kept: memory stays within Limits.max_bytes of
    text plus the objects the store holds anyway. Errors are never cached.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self.parses = 0  # documents (file parts) parsed, not served from the cache
        self._kept: dict[str, _Chunk] = {}
        self._used: dict[str, _Chunk] = {}

    def items(self, name: str, text: str, budget: Budget) -> list[tuple[int, _Item]]:
        """The file's documents as (line shift, item); parses only parts not seen before."""
        out: list[tuple[int, _Item]] = []
        lim = budget.limits
        for first, part in _chunks(text):
            hit = self._used.get(part) or self._kept.get(part)
            if (hit is not None and budget.documents + hit.documents <= lim.max_documents
                    and budget.nodes + hit.nodes <= lim.max_nodes):
                budget.documents += hit.documents
                budget.nodes += hit.nodes
            else:
                before = (budget.documents, budget.nodes)
                items = [_Item(d) for d in documents(part, name, budget, first)
                         if d.data is not None]
                hit = _Chunk(first, budget.documents - before[0], budget.nodes - before[1],
                             items)
                self.parses += 1
            self._used[part] = hit
            out += [(first - hit.first, item) for item in hit.items]
        return out

    def commit(self) -> None:
        """The load succeeded: keep exactly its documents."""
        self._kept, self._used = self._used, {}

    def discard(self) -> None:
        """The load failed: keep the last good load's documents (the next edit likely reverts
        most of the file to them)."""
        self._used = {}


def _file_documents(name: str, raw: bytes, budget: Budget,
                    cache: DocumentCache) -> list[tuple[int, _Item]]:
    """The documents that define objects in one file (none for a `kind: Empty` file).

    A file that is empty, or does not end with a newline, may be half-written: an error."""
    if not raw.strip():
        raise MeshConfigError(f"{name}:1: the file is empty, which is also what a half-written "
                              "file looks like; to define nothing on purpose, write "
                              f"`kind: {EMPTY_KIND}`")
    if not raw.endswith(b"\n"):
        last_line = raw.count(b"\n") + 1
        raise MeshConfigError(f"{name}:{last_line}: the file does not end with a "
                              "newline: it may be truncated (half-written); end it with a newline")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise MeshConfigError(f"{name}:{line}: not UTF-8 text (byte {e.start})") from e
    docs = cache.items(name, text, budget)
    # A parsed item is an object, never a marker (markers are never parsed).
    markers = [d.shifted(shift) for shift, it in docs
               if (d := it.doc) is not None and _is_empty_marker(d.data)]
    for marker in markers:
        try:
            _check_empty_marker(marker, name, len(docs) - 1)
        except FieldError as e:
            raise MeshConfigError(str(e.at(f"{name}:{marker.line_of(e.path)}"))) from e
    if not docs:
        raise MeshConfigError(f"{name}:1: the file has no documents (only comments or `---`); to "
                              f"define nothing on purpose, write `kind: {EMPTY_KIND}`")
    return [] if markers else docs


def parse_files(contents: list[tuple[Path, bytes]],
                root_namespace: str = DEFAULT_ROOT_NAMESPACE,
                limits: Limits = DEFAULT_LIMITS,
                cache: DocumentCache | None = None) -> MeshState:
    """Parse file contents into a MeshState; any problem is a MeshConfigError naming file:line.

    With a cache (FileSource keeps one), documents parsed by an earlier load are reused."""
    if cache is None or cache.limits != limits:
        cache = DocumentCache(limits)
    try:
        state = _parse_files(contents, root_namespace, limits, cache)
    except BaseException:
        cache.discard()
        raise
    cache.commit()
    return state


def _parse_files(contents: list[tuple[Path, bytes]], root_namespace: str, limits: Limits,
                 cache: DocumentCache) -> MeshState:
    budget = Budget(limits)
    objects: dict[tuple[str, str], tuple[MeshObject, str]] = {}
    ip_owner: dict[object, tuple[str, str]] = {}
    for path, raw in contents:
        name = str(path)
        if budget.bytes + len(raw) > limits.max_bytes:
            raise _too_large(name, raw, limits.max_bytes - budget.bytes, limits)
        budget.bytes += len(raw)
        for shift, item in _file_documents(name, raw, budget, cache):
            obj = item.obj
            if obj is None:
                doc = item.doc
                assert doc is not None  # an item holds its document until it is parsed
                try:
                    obj = parse_document(doc.data)
                except FieldError as e:
                    raise MeshConfigError(str(e.at(f"{name}:{doc.line_of(e.path) + shift}"))) from e
                item.obj, item.doc = obj, None
            where = f"{name}:{item.start + shift}"
            ident = (KIND_OF[type(obj)], key_of(obj))
            if ident in objects:
                raise MeshConfigError(f"{where}: {ident[0]} {ident[1]} is defined twice (first at "
                                      f"{objects[ident][1]})")
            objects[ident] = (obj, where)
            if isinstance(obj, Workload):
                for ip in obj.ips:
                    if ip in ip_owner:
                        other = ip_owner[ip]
                        raise MeshConfigError(f"{where}: IP {ip} of workload {obj.ref} is already "
                                              f"used by {other[0]} ({other[1]})")
                    ip_owner[ip] = (obj.ref, where)
            for warning in getattr(obj, "warnings", ()):
                log.warning("%s: %s", where, warning)
    return MeshState.build((o for o, _ in objects.values()), root_namespace)


def load_path(path: str | Path, root_namespace: str = DEFAULT_ROOT_NAMESPACE,
              limits: Limits = DEFAULT_LIMITS) -> MeshState:
    """Parse a file or directory into a MeshState, or raise MeshConfigError."""
    return parse_files(_read(Path(path), limits), root_namespace, limits)


# -- the source --------------------------------------------------------------------------------

# What one attempt produced: nothing new (None), a state to apply, or the error to report.
_Outcome = MeshState | MeshConfigError | None


class FileSource:
    """Watches the mesh files. Whatever goes wrong while loading -- invalid YAML, a crossed
    limit, MemoryError, a bug -- is reported (log line, `on_error`, `errors`, `status()`) and
    the last good state stays; the watcher keeps watching."""

    def __init__(self, path: str | Path, store: StateStore, on_error: ErrorHandler | None = None,
                 *, root_namespace: str = DEFAULT_ROOT_NAMESPACE,
                 limits: Limits = DEFAULT_LIMITS,
                 rescan_interval: float = RESCAN_INTERVAL) -> None:
        self.path = Path(path)
        self.store = store
        self.on_error = on_error
        self.root_namespace = root_namespace
        self.rescan_interval = rescan_interval
        self.limits = limits
        self.cache = DocumentCache(limits)  # a reload re-parses only the documents that changed
        self.errors = 0  # reported failures: nodemesh_config_errors_total
        self.last_error: str | None = None  # None once a later change loaded fine
        self.last_error_time: float | None = None
        self.last_load_time: float | None = None
        self._digest: bytes | None = None  # of the last content tried, good or bad
        self._applied = MeshState()  # what this source last put in the store
        self._stop = threading.Event()
        self._stopped = asyncio.Event()  # run()'s view of _stop, set from any thread
        self._wake_stop: Callable[[], object] = lambda: None

    def load_once(self) -> MeshState:
        """Load now and replace the store's state; raises MeshConfigError (state unchanged)."""
        self._digest = None
        outcome = self._attempt()
        if isinstance(outcome, MeshConfigError):
            raise outcome
        assert outcome is not None  # a forced attempt always has an outcome
        self._apply(outcome)
        log.info("loaded %s: %d objects", self.path, len(outcome.all_objects()))
        return outcome

    def poll(self) -> bool:
        """Reload if the files changed since the last attempt; True if a new state was applied.

        An invalid change is reported once (not on every poll) and the last good state stays.
        """
        return self._finish(self._attempt())

    def _attempt(self) -> _Outcome:
        """Read and parse the files if they changed; the slow half of a poll, safe to run off
        the event loop (it touches no shared state but the digest and the document cache, which
        only one attempt at a time uses). Never raises Exception."""
        try:
            error: MeshConfigError | None = None
            try:
                contents = _read(self.path, self.limits)
                digest = _digest(contents)
            except MeshConfigError as e:
                contents, error, digest = [], e, b"error\0" + str(e).encode()
            if digest == self._digest:
                return None
            self._digest = digest
            return error or parse_files(contents, self.root_namespace, self.limits, self.cache)
        except MeshConfigError as e:
            return e
        except Exception as e:  # MemoryError, RecursionError, a bug: bad config all the same
            log.debug("loading %s failed unexpectedly", self.path, exc_info=True)
            return MeshConfigError(f"{self.path}: loading failed unexpectedly: "
                                   f"{type(e).__name__}: {e}")

    def _finish(self, outcome: _Outcome) -> bool:
        if outcome is None:
            return False
        if isinstance(outcome, MeshConfigError):
            self._report(outcome)
            return False
        try:
            self._apply(outcome)
        except Exception as e:
            log.debug("applying %s failed unexpectedly", self.path, exc_info=True)
            self._report(MeshConfigError(f"{self.path}: applying the new state failed "
                                         f"unexpectedly: {type(e).__name__}: {e}"))
            return False
        log.info("reloaded %s: %d objects", self.path, len(outcome.all_objects()))
        return True

    def _apply(self, state: MeshState) -> None:
        """Swap this source's objects for `state`'s in one store update. Objects other sources
        wrote (the Kubernetes source's) stay: an object is this source's while the store holds
        the very instance it put there (see docs/kubernetes.md, "Several sources")."""
        self.store.update(lambda current: merge_own(current, self._applied, state, "file"))
        self._applied = state
        self.last_error = None
        self.last_load_time = time.time()

    def _report(self, error: MeshConfigError) -> None:
        self.errors += 1
        self.last_error = str(error)
        self.last_error_time = time.time()
        log.error("%s; keeping the last good configuration", error)
        if self.on_error is not None:
            try:
                self.on_error(error)
            except Exception:
                log.exception("file source %s: error handler failed", self.path)

    def status(self) -> dict[str, object]:
        """For /healthz: whether the files in force are the ones on disk, and the last error."""
        return {
            "path": str(self.path),
            "state": "ok" if self.last_error is None else "error: last good state kept",
            "errors": self.errors,
            "last_error": self.last_error,
            "last_error_time": self.last_error_time,
            "last_load_time": self.last_load_time,
            "objects": len(self._applied.all_objects()),
        }

    async def run(self) -> None:
        """Watch until cancelled or `stop()`; the first attempt loads the files if not yet
        loaded. Reading and parsing run in a worker thread (a large file takes seconds),
        applying runs here, so store subscribers see changes on the event loop's thread."""
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._wake_stop = lambda: loop.call_soon_threadsafe(self._stopped.set)
        with Inotify() as inotify:
            watching = self._watch(inotify)
            while not self._stop.is_set():
                try:
                    self._finish(await asyncio.to_thread(self._attempt))
                except Exception:  # _attempt and _finish report their own; a last guard
                    log.exception("file source %s: unexpected error while loading", self.path)
                if not watching:
                    watching = self._watch(inotify)  # the directory appeared (or came back)
                watching = await self._next_change(inotify, watching)

    def _watch(self, inotify: Inotify) -> bool:
        """Watch the directory holding the files; False if it does not exist (yet)."""
        directory = self.path if self.path.is_dir() else self.path.parent
        try:
            inotify.add_watch(directory, WATCH_MASK)
        except OSError as e:
            log.warning("file source %s: cannot watch %s (%s); rescanning every %.0fs",
                        self.path, directory, e, self.rescan_interval)
            return False
        return True

    async def _next_change(self, inotify: Inotify, watching: bool) -> bool:
        """Wait for an event that concerns the mesh files, the rescan interval, or `stop()`;
        returns whether the directory is still watched."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.rescan_interval
        stopped = asyncio.create_task(self._stopped.wait())
        try:
            while not self._stop.is_set():
                left = deadline - loop.time()
                if left <= 0:
                    return watching
                waits: set[asyncio.Future[Any]] = {stopped}
                if watching:
                    waits.add(asyncio.ensure_future(inotify.get()))
                done, _ = await asyncio.wait(waits, timeout=left,
                                             return_when=asyncio.FIRST_COMPLETED)
                for w in waits - {stopped}:
                    if w not in done:
                        w.cancel()
                got = [w.result() for w in done if w is not stopped]
                if not got:
                    continue  # stopped, or the interval passed: the loop condition decides
                event: Event = got[0]
                if event.mask & (Mask.IGNORED | Mask.DELETE_SELF | Mask.MOVE_SELF):
                    return False  # the directory itself went: look again, then watch anew
                if self._concerns(event):
                    return watching
            return watching
        finally:
            stopped.cancel()

    def _concerns(self, event: Event) -> bool:
        if event.mask & Mask.Q_OVERFLOW:
            return True  # events were lost: look again
        name = event.name.name if event.name is not None else ""
        if name.startswith(".."):
            return True  # a ConfigMap volume swaps its ..data symlink
        if self.path.is_dir():
            return Path(name).suffix in SUFFIXES
        return name == self.path.name

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(RuntimeError):  # the loop may be closed already
            self._wake_stop()


def merge_own(current: MeshState, previous: MeshState, new: MeshState, source: str) -> MeshState:
    """`current` with the objects of `previous` that are still there (same instance) replaced by
    those of `new`; `new` itself (same root namespace) when nothing else is in the store."""
    others: dict[str, dict[str, MeshObject]] = {}
    for kind in KINDS:
        mine = previous.objects[kind]
        others[kind] = {k: o for k, o in current.objects[kind].items() if mine.get(k) is not o}
    if not any(others.values()):
        return new
    for kind, theirs in others.items():
        for key in new.objects[kind].keys() & theirs.keys():
            log.warning("%s: %s %s replaces the one another source wrote", source, kind, key)
        theirs.update(new.objects[kind])
    return MeshState.build((o for objs in others.values() for o in objs.values()),
                           new.root_namespace)


def _digest(contents: list[tuple[Path, bytes]]) -> bytes:
    h = hashlib.sha256()
    for path, raw in contents:
        h.update(str(path).encode() + b"\0" + len(raw).to_bytes(8, "big") + raw)
    return h.digest()

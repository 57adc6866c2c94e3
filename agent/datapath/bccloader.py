"""The BCC adapter: the only module in nodemesh that imports bcc.

Compiles the bpf/ sources once per process per BuildOptions, loads programs, hands out map fds
and ring-buffer readers, and turns BCC/LLVM failures into errors that say what is wrong
(missing kernel headers, the verifier's log). Everything else talks to the typed wrappers.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import os
import platform
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.datapath.options import BuildOptions
from agent.datapath.source import assemble, bpf_dir


class ProgType(enum.IntEnum):
    CGROUP_SOCK = 9
    SOCK_OPS = 13
    CGROUP_SOCK_ADDR = 18
    CGROUP_SOCKOPT = 25
    SK_LOOKUP = 30


class DatapathBuildError(RuntimeError):
    """The eBPF programs could not be compiled or loaded; the message says why."""


def headers_hint() -> str | None:
    build = Path(f"/lib/modules/{platform.release()}/build")
    if not (build / "include").exists():
        return (
            f"kernel headers not found at {build}: run scripts/setup.sh (it links Debian's "
            "linux-headers into /lib/modules/$(uname -r)/{build,source})"
        )
    return None


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """libbcc prints compiler and verifier output on fd 2; capture it to put it in the error."""
    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


def _logged(what: str, log_name: str, action: Callable[[], Any]) -> Any:
    """Run a BCC call; on failure raise DatapathBuildError with the tail of what libbcc printed."""
    with _captured_stderr() as log:
        try:
            return action()
        except Exception as exc:
            failure = exc
    raise DatapathBuildError(
        f"{what} failed: {str(failure)[:300]}\n{log_name} (last lines):\n{_excerpt(log[0])}"
    ) from failure


def _excerpt(log: str, lines: int = 25) -> str:
    kept = [ln for ln in log.splitlines() if ln.strip()]
    return "\n".join(kept[-lines:])


@dataclass
class Module:
    """One compiled BCC module: programs by name, maps by name."""

    options: BuildOptions
    _bpf: Any
    _progs: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def load(self, name: str, prog_type: ProgType, attach_type: int | None = None) -> int:
        """The fd of a loaded program (loaded once per module)."""
        with self._lock:
            if name in self._progs:
                return self._progs[name]
            kw = {} if attach_type is None else {"attach_type": attach_type}
            fn = _logged(f"loading eBPF program {name}", "verifier log",
                         lambda: self._bpf.load_func(name.encode(), int(prog_type), **kw))
            self._progs[name] = int(fn.fd)
            return self._progs[name]

    def map_fd(self, name: str) -> int:
        from bcc import libbcc  # noqa: PLC0415 -- keep the import local to the adapter's calls

        fd = int(libbcc.lib.bpf_table_fd(self._bpf.module, name.encode()))
        if fd < 0:
            raise KeyError(f"no map named {name} in the compiled module")
        return fd

    def open_ring_buffer(self, name: str, callback: Callable[[bytes], None]) -> None:
        """Deliver each record of a ring-buffer map to callback as raw bytes."""

        def _cb(_ctx: Any, data: Any, size: int) -> int:
            callback(ctypes.string_at(data, size))
            return 0

        self._bpf[name.encode()].open_ring_buffer(_cb)

    def poll_ring_buffers(self, timeout_ms: int) -> None:
        self._bpf.ring_buffer_poll(timeout_ms)

    def consume_ring_buffers(self) -> None:
        self._bpf.ring_buffer_consume()

    def close(self) -> None:
        """Release the programs and maps; the cache forgets this module so that compiling the
        same options again builds a new one instead of handing out a closed one."""
        with _cache_lock:
            if _cache.get(self.options) is self:
                del _cache[self.options]
        with self._lock:
            self._progs.clear()
            self._bpf.cleanup()


_cache: dict[BuildOptions, Module] = {}
_cache_lock = threading.Lock()


def compile_module(options: BuildOptions, *, cached: bool = True) -> Module:
    """Compile options.sources (about 1.5 s of LLVM); equal options reuse the same module."""
    with _cache_lock:
        if cached and options in _cache:
            return _cache[options]
        if hint := headers_hint():
            raise DatapathBuildError(hint)
        try:
            from bcc import BPF  # noqa: PLC0415 -- importing bcc costs ~80 ms; only when compiling
        except ImportError as exc:
            raise DatapathBuildError(
                "python module bcc not importable: install python3-bpfcc and link it into the "
                "venv (scripts/setup.sh does both)"
            ) from exc
        options.pin_dir.mkdir(parents=True, exist_ok=True)
        text = assemble(options.sources)
        cflags = [*options.cflags(), f"-I{bpf_dir()}"]
        bpf = _logged(f"compiling {', '.join(options.sources)}", "compiler output",
                      lambda: BPF(text=text.encode("ascii"), cflags=cflags))
        module = Module(options=options, _bpf=bpf)
        if cached:
            _cache[options] = module
        return module


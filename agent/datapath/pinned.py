"""The agent's handles on pinned programs and maps: fds opened from the pin directory with
BPF_OBJ_GET, once each, closed together. No BCC here (see loader.py)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from agent.datapath import bpfsys
from agent.datapath.programs import PROGS_DIR, Program


class PinnedObjects:
    def __init__(self, pin_dir: Path) -> None:
        self.pin_dir = pin_dir
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def _open(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = bpfsys.obj_get(path)
            return fd

    def prog_fd(self, prog: Program) -> int:
        return self._open(self.pin_dir / PROGS_DIR / prog.name)

    def map_fd(self, name: str) -> int:
        try:
            return self._open(self.pin_dir / name)
        except FileNotFoundError as exc:
            raise KeyError(f"no map pinned as {name} in {self.pin_dir}") from exc

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

"""Assembles the C sources into one translation unit for BCC.

BCC rewrites map method calls (`map.lookup()`) only in the main file and treats only functions
there as programs, so the attach-point files and the project's own lib/*.h headers are joined
into one text here; `#line` markers keep compiler errors pointing at the real files. System
headers stay ordinary #includes.
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Iterable
from pathlib import Path

_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


def bpf_dir() -> Path:
    """The installed bpf/ sources (package data agent/bpfsrc)."""
    return Path(str(importlib.resources.files("agent") / "bpfsrc"))


def assemble(files: Iterable[str], root: Path | None = None) -> str:
    root = root or bpf_dir()
    seen: set[Path] = set()
    out: list[str] = []
    for name in files:
        _inline(root / name, root, seen, out)
    return "".join(out)


def _inline(path: Path, root: Path, seen: set[Path], out: list[str]) -> None:
    path = path.resolve()
    if path in seen:
        return
    seen.add(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"eBPF source {path} is missing from the installation") from exc
    rel = path.relative_to(root.resolve())
    out.append(f'#line 1 "{rel}"\n')
    for lineno, line in enumerate(lines, start=1):
        m = _LOCAL_INCLUDE.match(line)
        if m:
            target = (path.parent / m.group(1)).resolve()
            if not target.is_relative_to(root.resolve()):
                raise ValueError(f"{rel}:{lineno}: include {m.group(1)!r} escapes {root}")
            _inline(target, root, seen, out)
            out.append(f'#line {lineno + 1} "{rel}"\n')
        else:
            out.append(line)
    if lines and not lines[-1].endswith("\n"):
        out.append("\n")

"""The product code's import graph, read with ast: layers only point down, one module imports bcc.

LAYERS lists the packages bottom to top. A module may import its own package and any package of
a strictly lower layer; packages that share a layer may not import each other. Imports inside
functions count too, so a lazy import cannot hide a climb. docs/architecture.md draws this map.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

LAYERS: tuple[tuple[str, ...], ...] = (
    ("agent", "agent.abi", "agent.backoff", "agent.config", "agent.host"),  # root: __version__
    ("agent.telemetry",),                          # flow records, metrics, rotating logs
    ("agent.identity",),                           # SPIFFE ids, CA, certificates
    ("agent.model", "ztunnel"),                    # the mesh's values; the HBONE tunnel
    ("agent.dataplane",),                          # tunnel worker processes, their supervisor
    ("agent.policy",),
    ("agent.state",),
    ("agent.sources", "agent.analysis"),
    ("agent.caauth", "agent.datapath", "agent.posture"),
    ("agent.testbed",),
    ("agent.enroll",),
    ("agent.runtime",),
    ("agent.commands",),
    ("agent.cli",),                                # the `nodemesh` entry point
)
BCC_IMPORTER = "agent.datapath.bccloader"
PRODUCT = ("agent", "ztunnel")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> Iterator[tuple[str, Path]]:
    for top in PRODUCT:
        for path in sorted((ROOT / top).rglob("*.py")):
            if "proto" in path.parts and path.name.endswith("_pb2.py"):
                continue
            yield _module_name(path), path


def _imports(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """Every module `module` names in an import, with its line."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:  # `from agent.x import y` may name the module agent.x.y
                yield f"{base}.{alias.name}", node.lineno
            yield base, node.lineno


def _package(module: str) -> str | None:
    """The LAYERS entry owning `module` (the longest matching prefix), None if not ours."""
    best: str | None = None
    for layer in LAYERS:
        for pkg in layer:
            if (module == pkg or module.startswith(pkg + ".")) and (
                    best is None or len(pkg) > len(best)):
                best = pkg
    return best


def _layer(pkg: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if pkg in layer)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT / rel.with_suffix(".py")).exists() or (ROOT / rel / "__init__.py").exists()


def test_every_product_package_has_a_layer() -> None:
    placed = {pkg for layer in LAYERS for pkg in layer}
    children = {f"agent.{p.stem}" for p in (ROOT / "agent").iterdir()
                if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    assert children - placed == set(), "add these to LAYERS"


def test_imports_only_point_down() -> None:
    climbs: list[str] = []
    for module, path in _modules():
        src = _package(module)
        assert src is not None, module
        for target, line in _imports(module, path):
            if not _is_module(target):
                continue
            dst = _package(target)
            if dst is None or dst == src:
                continue
            if _layer(dst) >= _layer(src):
                climbs.append(f"{path.relative_to(ROOT)}:{line}: {module} -> {target} "
                              f"({src} may not import {dst})")
    assert not climbs, "imports that do not point down:\n" + "\n".join(climbs)


def test_one_module_imports_bcc() -> None:
    importers = sorted({module for top in (*PRODUCT, "benchmarks", "tests")
                        for path in (ROOT / top).rglob("*.py")
                        for module in [_module_name(path)]
                        for target, _ in _imports(module, path)
                        if target == "bcc" or target.startswith("bcc.")})
    assert importers == [BCC_IMPORTER]


def test_the_rule_catches_a_climb(tmp_path: Path) -> None:
    """The check itself: a policy module importing the state store is a climb."""
    src = tmp_path / "climb.py"
    src.write_text("from agent.state.store import StateStore\n")
    targets = [t for t, _ in _imports("agent.policy.climb", src) if _is_module(t)]
    assert "agent.state.store" in targets
    assert _layer(_package("agent.state.store") or "") > _layer("agent.policy")

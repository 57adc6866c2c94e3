"""The mypyc build around the data path: the staleness guard in ztunnel/__init__.py on real files
with real mtimes, that CI runs the modules setup.py compiles as extensions (never silently as
pure Python), and that the build requirements keep the runtime's version ranges."""

from __future__ import annotations

import ast
import importlib
import os
import re
import tomllib
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

import ztunnel
from tests.prereq import requires

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SUFFIX = EXTENSION_SUFFIXES[0]


def compiled_list() -> list[str]:
    """setup.py's COMPILED, read without running setuptools."""
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", "") for t in node.targets] == [
                "COMPILED"]:
            value = ast.literal_eval(node.value)
            assert isinstance(value, list)
            return [str(v) for v in value]
    raise AssertionError("setup.py has no COMPILED list")


def package(tmp_path: Path) -> Path:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    return pkg


def write(path: Path, mtime: int) -> Path:
    path.write_bytes(b"x")
    os.utime(path, (mtime, mtime))
    return path


def test_a_fresh_extension_passes(tmp_path: Path) -> None:
    pkg = package(tmp_path)
    write(pkg / "relay.py", 1_000)
    ext = write(pkg / f"relay{SUFFIX}", 2_000)
    write(pkg / "plain.py", 3_000)  # a module without an extension is interpreted as usual
    ztunnel.check_fresh(pkg)
    assert ztunnel.extensions(pkg) == {"relay": ext}


def test_a_source_newer_than_its_extension_refuses_the_import(tmp_path: Path) -> None:
    pkg = package(tmp_path)
    write(pkg / f"hbone{SUFFIX}", 2_000)
    write(pkg / "hbone.py", 2_001)
    write(pkg / "relay.py", 1_000)
    write(pkg / f"relay{SUFFIX}", 2_000)
    with pytest.raises(ImportError) as err:
        ztunnel.check_fresh(pkg)
    message = str(err.value)
    assert str(pkg / f"hbone{SUFFIX}") in message and str(pkg / "hbone.py") in message
    assert "scripts/setup.sh" in message and "relay" not in message


def test_one_nanosecond_newer_source_is_stale(tmp_path: Path) -> None:
    pkg = package(tmp_path)
    ext = pkg / f"chain{SUFFIX}"
    ext.write_bytes(b"x")
    src = pkg / "chain.py"
    src.write_bytes(b"x")
    t = ext.stat().st_mtime_ns
    os.utime(src, ns=(t + 1, t + 1))
    with pytest.raises(ImportError, match="chain"):
        ztunnel.check_fresh(pkg)


@pytest.mark.parametrize("libraries", [(), (f"_native__mypyc{SUFFIX}",)],
                         ids=["no extensions", "only mypyc's shared runtime (it has no source)"])
def test_a_directory_with_no_module_extension_passes(tmp_path: Path,
                                                     libraries: tuple[str, ...]) -> None:
    pkg = package(tmp_path)
    for name in libraries:
        write(pkg / name, 1)
    write(pkg / "relay.py", 1_000)
    ztunnel.check_fresh(pkg)
    assert ztunnel.extensions(pkg) == {}


def test_an_installed_wheel_is_not_checked(tmp_path: Path) -> None:
    # pip writes a wheel's files in archive order: the .py may land a moment after its .so
    pkg = package(tmp_path)
    write(pkg / f"relay{SUFFIX}", 1_000)
    write(pkg / "relay.py", 1_001)
    (tmp_path / "nodemesh-0.1.0.dist-info").mkdir()
    ztunnel.check_fresh(pkg)


def test_other_projects_files_beside_a_checkout_do_not_disable_the_check(tmp_path: Path) -> None:
    # kubernetes_asyncio's wheel drops a pyproject.toml into site-packages
    pkg = package(tmp_path)
    write(pkg / f"relay{SUFFIX}", 1_000)
    write(pkg / "relay.py", 1_001)
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (tmp_path / "kubernetes_asyncio-36.1.0.dist-info").mkdir()
    with pytest.raises(ImportError, match="relay"):
        ztunnel.check_fresh(pkg)


def test_the_modules_setup_py_compiles_run_compiled() -> None:
    names = [p.removesuffix(".py").replace("/", ".") for p in compiled_list()]
    assert names and all(n.startswith("ztunnel.") for n in names)
    files = {n: str(importlib.import_module(n).__file__) for n in names}
    pure = sorted(n for n, f in files.items() if not f.endswith(tuple(EXTENSION_SUFFIXES)))
    requires(not pure, f"ztunnel modules in setup.py's COMPILED run as pure Python: {pure} "
             "(build them: scripts/setup.sh; NODEMESH_PURE_PYTHON=1 is for compiler-less hosts)")
    assert ztunnel.data_path() == "compiled (mypyc)"
    assert {f"ztunnel.{m}" for m in ztunnel.compiled_modules()} >= set(names)


def _requirements(specs: list[str]) -> dict[str, str]:
    out = {}
    for spec in specs:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^]]*\])?\s*([^;#]*)", spec.strip())
        assert m, spec
        out[m[1].lower().replace("_", "-")] = m[3].strip()
    return out


def test_build_requirements_keep_the_runtime_and_dev_ranges() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    build = _requirements(meta["build-system"]["requires"])
    known = _requirements(meta["project"]["dependencies"]
                          + meta["project"]["optional-dependencies"]["dev"])
    assert "mypy" in build  # mypyc compiles the data path
    assert "mypy-extensions" in _requirements(meta["project"]["dependencies"])
    assert {n: v for n, v in build.items() if n in known} == {
        n: known[n] for n in build if n in known}

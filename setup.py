"""Build hook: compiles the per-hop data-path modules with mypyc.

pyproject.toml stays the metadata source; this file only adds the extension modules. COMPILED is
the one list of compiled modules (tests/unit/test_compiled.py reads it with ast, and
scripts/setup.sh rebuilds when any of them changes). NODEMESH_PURE_PYTHON=1 skips mypyc for
platforms without a C compiler: the same sources then run interpreted, slower per hop.
"""

import os

from setuptools import setup

COMPILED = [
    "ztunnel/hbone.py",
    "ztunnel/frames.py",
    "ztunnel/tlswire.py",
    "ztunnel/relay.py",
    "ztunnel/chain.py",
    "ztunnel/session.py",
]


def _ext_modules() -> list[object]:
    if os.environ.get("NODEMESH_PURE_PYTHON") == "1":
        return []
    # imported here so that a pure-Python build needs no mypy (e.g. --no-build-isolation)
    from mypyc.build import mypycify  # noqa: PLC0415

    # group_name puts mypyc's shared runtime library inside the package
    # (ztunnel/_native__mypyc*.so) instead of a hash-named top-level module.
    return list(mypycify(COMPILED, opt_level="3", group_name="ztunnel._native"))


setup(ext_modules=_ext_modules())

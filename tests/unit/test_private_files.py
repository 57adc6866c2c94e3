"""agent.host.files.write_private: 0600 from creation, atomic replace, no temporary left."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from agent.host.files import write_private

pytestmark = pytest.mark.unit


def test_private_file_replaces_atomically_with_mode_0600(tmp_path: Path) -> None:
    target = tmp_path / "key.pem"
    target.write_bytes(b"old")
    target.chmod(0o644)
    write_private(target, b"new" * 100_000)
    assert target.read_bytes() == b"new" * 100_000
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.pem"]


def test_a_failed_write_raises_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "missing-dir" / "key.pem"
    with pytest.raises(FileNotFoundError):
        write_private(target, b"x")
    assert not target.parent.exists()

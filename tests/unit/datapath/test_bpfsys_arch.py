"""bpf(2) is reached by number, and the number depends on the architecture (arm64 is 280, not
x86-64's 321). An unknown machine fails with a message naming it, not a wrong syscall."""

from __future__ import annotations

import errno
import platform
import re
from pathlib import Path

import pytest

from agent.datapath import bpfsys

pytestmark = pytest.mark.unit


def test_numbers_per_architecture() -> None:
    assert bpfsys.syscall_number("x86_64") == 321
    assert bpfsys.syscall_number("aarch64") == 280
    assert bpfsys.syscall_number("arm64") == 280
    assert bpfsys.syscall_number("mips") is None


def test_this_machine_matches_its_kernel_headers() -> None:
    machine = platform.machine()
    assert bpfsys.syscall_number(machine) is not None, machine
    header = Path(f"/usr/include/{machine}-linux-gnu/asm/unistd_64.h")
    if header.exists():  # Debian/Ubuntu multiarch layout; the number must match it
        found = re.search(r"#define __NR_bpf (\d+)", header.read_text())
        assert found is not None
        assert bpfsys.syscall_number(machine) == int(found.group(1))


def test_unknown_machine_fails_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bpfsys, "_MACHINE", "mips")
    monkeypatch.setattr(bpfsys, "_SYS_BPF", None)
    with pytest.raises(bpfsys.BpfError, match="no syscall number known for machine 'mips'") as err:
        bpfsys.map_delete(0, b"\0" * 4)
    assert err.value.errno == errno.ENOSYS

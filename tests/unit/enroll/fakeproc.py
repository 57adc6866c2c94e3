"""A /proc tree on disk for the locator: <pid>/cgroup files and <pid>/ns/net files, where hard
links stand for a shared network namespace (same device and inode, as nsfs gives)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


class FakeProc:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.add(1, "0::/init.scope\n")  # init, in the host netns

    def add(self, pid: int, cgroup: str, same_netns_as: int | None = None) -> None:
        """A process; its own new netns unless `same_netns_as` names a process to share with."""
        d = self.root / str(pid)
        (d / "ns").mkdir(parents=True, exist_ok=True)
        (d / "cgroup").write_text(cgroup, encoding="utf-8")
        net = d / "ns" / "net"
        if same_netns_as is None:
            net.write_text(f"netns of {pid}", encoding="utf-8")
        else:
            os.link(self.root / str(same_netns_as) / "ns" / "net", net)

    def exit(self, pid: int) -> None:
        shutil.rmtree(self.root / str(pid))

    def drop_netns(self, pid: int) -> None:
        """A process in the middle of exiting: its namespaces are already released."""
        (self.root / str(pid) / "ns" / "net").unlink()

    def pids(self) -> list[int]:
        return [int(p.name) for p in self.root.iterdir() if p.name.isdigit()]

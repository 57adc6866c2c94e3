"""What is attached in the kernel, counted the way bpftool and the kernel report it: the
"no duplicate attachments" checks after an agent restart or a surge upgrade."""

from __future__ import annotations

import json
import os
import subprocess

from agent.datapath import bpfsys
from agent.datapath.programs import CGROUP_PROGRAMS
from agent.testbed.cluster import Node, Place


def cgroup_attachments(node: Node) -> dict[str, int]:
    """Programs attached to the node's cgroup root, per nodemesh cgroup hook."""
    fd = os.open(node.cgroup_root, os.O_RDONLY)
    try:
        return {p.name: len(bpfsys.prog_query(fd, p.attach_type)) for p in CGROUP_PROGRAMS}
    finally:
        os.close(fd)


def sk_lookup_links(pod: Place) -> int:
    """sk_lookup (netns) links attached to the pod's network namespace."""
    ino = os.stat(pod.netns_path).st_ino
    out = subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True,
                         check=True).stdout
    return sum(1 for link in json.loads(out or "[]")
               if link.get("type") == "netns" and link.get("netns_ino") == ino)

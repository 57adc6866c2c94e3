"""What a running agent keeps resident (issue #14): the compiler ran in a short-lived loader,
so no BCC or LLVM library is mapped into `nodemesh run`, and it still enforces and reports.
Its data-plane workers (issue #13) map neither the compiler nor the control process's HTTP
server, gRPC or YAML extensions; what control and workers hold together is printed."""

from __future__ import annotations

import json
import time
from pathlib import Path

from support.agents import live_mesh

from agent.commands.demo import _run_client, http_get


def mapped_libraries(pid: int) -> set[str]:
    out = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            out.add(Path(parts[5]).name)
    return out


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_running_agent_holds_no_compiler(tmp_path: Path) -> None:
    with live_mesh(tmp_path, "pytest footprint", extra=("--workers", "2")) as live:
        c = live.cluster
        for agent in live.agents:
            libs = mapped_libraries(agent.pid)
            assert "libc.so.6" in libs, libs  # the reading itself works
            leaked = sorted(n for n in libs if "bcc" in n or "LLVM" in n or "clang" in n)
            assert leaked == [], leaked
            workers = children(agent.pid)
            assert len(workers) == 2, workers
            for w in workers:
                wlibs = mapped_libraries(w)
                assert "libc.so.6" in wlibs, wlibs
                heavy = sorted(n for n in wlibs if any(k in n for k in (
                    "bcc", "LLVM", "clang", "cygrpc", "_http_parser", "_yaml", "pyroute2")))
                assert heavy == [], heavy
            sizes = [resident_mib(agent.pid), *(resident_mib(w) for w in workers)]
            print(f"resident: control {sizes[0]:.1f} MiB + workers "
                  f"{' + '.join(f'{s:.1f}' for s in sizes[1:])} MiB = {sum(sizes):.1f} MiB")
        # The pinned programs enforce and the ring buffer is read without BCC.
        assert _run_client(c.pod(0, 0), str(c.pod(0, 1).ip), 8080, "x").startswith("OK backend")
        assert _run_client(c.pod(1, 1), str(c.pod(1, 0).ip), 5432, "x") == "ERR EPERM"
        deadline = time.monotonic() + 30
        denies: list[dict[str, object]] = []
        while not denies and time.monotonic() < deadline:
            flows = tmp_path / "flows-n1.log"
            lines = flows.read_text().splitlines() if flows.exists() else []
            denies = [r for r in map(json.loads, lines) if r.get("kind") == "deny"]
            time.sleep(0.1)
        assert denies and denies[0]["reason"] == "policy_deny", denies
        metrics = http_get(c.nodes[1].netns, 15020, "/metrics")
        assert metrics is not None
        assert 'nodemesh_ringbuf_drops_total{ring="flows"} 0.0' in metrics, metrics[-3000:]

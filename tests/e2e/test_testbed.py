"""The network-namespace test bed: connectivity, placement, isolation, and clean teardown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from prereq import require_root

from agent.host import cgroup, netns
from agent.testbed import Cluster, registry

ECHO = (
    "import socket,sys\n"
    "s=socket.create_server(('0.0.0.0',int(sys.argv[1])))\n"
    "print('ready',flush=True)\n"
    "while True:\n"
    "  c,_=s.accept(); d=c.recv(1024)\n"
    "  c.sendall(d[::-1]+b'|'+c.getpeername()[0].encode()); c.close()\n"
)
CLIENT = (
    "import socket,sys\n"
    "s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=5)\n"
    "s.sendall(sys.argv[3].encode()); print(s.recv(1024).decode())\n"
)


def listing() -> dict[str, set[str]]:
    root_links = set(os.listdir("/sys/class/net"))
    cg = cgroup.mount_point()
    return {
        "netns": set(netns.list_named()),
        "links": root_links,
        "cgroups": {d.name for d in cg.iterdir() if d.is_dir()},
        "children": {str(p.pid) for p in psutil.Process().children(recursive=True)},
    }


def start_echo(pod: object, port: int) -> object:
    proc = pod.python(ECHO, str(port), stdout=subprocess.PIPE)  # type: ignore[attr-defined]
    assert proc.popen.stdout.readline().strip() == b"ready"
    return proc


def talk(pod: object, ip: object, port: int, msg: str) -> str:
    cli = pod.python(CLIENT, str(ip), str(port), msg, stdout=subprocess.PIPE)  # type: ignore[attr-defined]
    out, _ = cli.popen.communicate(timeout=10)
    assert cli.popen.returncode == 0
    return str(out.decode().strip())


def test_cross_node_pod_to_pod_tcp_and_source_ip_is_the_pod(cluster: Cluster) -> None:
    a, b = cluster.pod(0, 0), cluster.pod(1, 1)
    start_echo(b, 8080)
    assert talk(a, b.ip, 8080, "hello") == f"olleh|{a.ip}"
    # same node, other pod
    c = cluster.pod(0, 1)
    start_echo(c, 9090)
    assert talk(a, c.ip, 9090, "abc") == f"cba|{a.ip}"


def test_process_in_pod_is_in_its_cgroup_and_netns(cluster: Cluster) -> None:
    pod = cluster.pod(1, 0)
    proc = pod.python("import time; time.sleep(30)")
    try:
        assert cgroup.of_process(proc.pid) == pod.cgroup
        assert os.stat(f"/proc/{proc.pid}/ns/net").st_ino == os.stat(pod.netns_path).st_ino
        assert proc.pid in cgroup.procs(pod.cgroup)
    finally:
        proc.stop()
    assert proc.poll() is not None


def _in_pod(path: str) -> None:
    Path(path).write_text(str(os.stat("/proc/self/ns/net").st_ino))


def test_callable_runs_inside_the_pod(cluster: Cluster, tmp_path: Path) -> None:
    pod = cluster.pod(0, 1)
    out = tmp_path / "ino"
    proc = pod.start(_in_pod, str(out))
    assert proc.wait(10) == 0
    assert int(out.read_text()) == os.stat(pod.netns_path).st_ino


def test_teardown_leaves_nothing_behind() -> None:
    require_root()
    before = listing()
    with Cluster(nodes=2, pods_per_node=2) as c:
        start_echo(c.pod(1, 0), 7000)
        c.pod(0, 0).python("import time; time.sleep(60)")
        during = listing()
        assert set(c.namespaces()) <= during["netns"]
        c.down()
        c.down()  # idempotent
    assert listing() == before


def test_teardown_happens_on_exception() -> None:
    require_root()
    before = listing()
    try:
        with Cluster(nodes=1, pods_per_node=1) as c:
            c.pod(0, 0).python("import time; time.sleep(60)")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert listing() == before


def test_two_clusters_coexist_without_clashing() -> None:
    require_root()
    with Cluster(nodes=1, pods_per_node=2) as c1, Cluster(nodes=1, pods_per_node=2) as c2:
        assert c1.run_id != c2.run_id
        assert not set(c1.namespaces()) & set(c2.namespaces())
        # Same addresses, different worlds: each answers with its own reply.
        start_echo(c1.pod(0, 1), 8000)
        c2.pod(0, 1).python(
            "import socket\ns=socket.create_server(('0.0.0.0',8000))\n"
            "while True:\n  c,_=s.accept(); c.recv(9); c.sendall(b'second|x'); c.close()\n"
        )
        time.sleep(0.3)
        assert talk(c1.pod(0, 0), c1.pod(0, 1).ip, 8000, "ab") == f"ba|{c1.pod(0, 0).ip}"
        assert talk(c2.pod(0, 0), c2.pod(0, 1).ip, 8000, "ab") == "second|x"


CRASHER = """
import sys, time
from agent.testbed import Cluster
c = Cluster(nodes=1, pods_per_node=1, description="crash test")
c.up()
c.pod(0, 0).python("import time; time.sleep(120)")
print(c.run_id, flush=True)
time.sleep(120)
"""


def test_cleanup_removes_leftovers_of_a_crashed_run() -> None:
    require_root()
    before = listing()
    owner = subprocess.Popen([sys.executable, "-c", CRASHER], stdout=subprocess.PIPE)
    try:
        run_id = owner.stdout.readline().decode().strip()  # type: ignore[union-attr]
        assert run_id
        assert registry.discover()[run_id] is not None
        assert run_id not in registry.cleanup()  # owner alive: kept
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        done = registry.cleanup()
        assert run_id in done
        assert any(r.startswith("process ") for r in done[run_id])
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        assert owner.stdout is not None
        owner.stdout.close()
        registry.teardown_run(run_id) if "run_id" in dir() and run_id else None
    after = listing()
    assert after["netns"] == before["netns"]
    assert after["cgroups"] == before["cgroups"]

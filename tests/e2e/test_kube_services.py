"""Services on the Kubernetes source: two `nodemesh run --source kubernetes` agents against the
test API server, Service endpoints from EndpointSlices.

- A Service VIP whose only endpoint is on the other node (a Service without a selector: only its
  EndpointSlice names the endpoint) is carried over HBONE: the destination tunnel reports the
  connection as mutual TLS, a STRICT destination accepts it, the underlay never carries the
  payload in clear, and both sides' records name the Service (#17's Service variant).
- An EndpointSlice update marking an endpoint not ready stops new connections to it while a
  long transfer established before completes (the file-edit variant is in
  test_service_traffic.py).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from support.apiserver import endpoint_slice
from test_kube_mesh import NS, KubeBed, kube_bed, strict, wait_for
from test_service_traffic import CONNECTS, LONG, SERVER, samples

from agent.commands.demo import MARKER, Sniffer, http_get
from agent.testbed import PodProcess

VIP, PORT = "10.96.0.60", 80
HOST = f"web.{NS}.svc.cluster.local"


def service(bed: KubeBed, selector: dict[str, str] | None = None) -> None:
    spec: dict[str, Any] = {"clusterIP": VIP, "ports": [{"name": "http", "port": PORT,
                                                         "targetPort": 8080}]}
    if selector:
        spec["selector"] = selector
    bed.k(bed.kubectl.create("services", {"metadata": {"namespace": NS, "name": "web"},
                                          "spec": spec}))


def slice_endpoint(bed: KubeBed, node: int, index: int, ready: bool = True) -> dict[str, Any]:
    return {"addresses": [str(bed.cluster.pod(node, index).ip)], "nodeName": f"node{node}",
            "conditions": {"ready": ready, "serving": True, "terminating": not ready}}


def lb_table(bed: KubeBed, node: int = 0) -> set[str]:
    dump = json.loads(http_get(bed.cluster.nodes[node].netns, 15000, "/config_dump") or "{}")
    return set(dump.get("datapath", {}).get("services", {}).get(f"{VIP}:{PORT}", []))


def server(bed: KubeBed, node: int, index: int, tag: str) -> PodProcess:
    proc = bed.cluster.pod(node, index).python(SERVER, tag, "8080", stdout=subprocess.PIPE)
    assert proc.popen is not None and proc.popen.stdout is not None
    assert proc.popen.stdout.readline().strip() == b"ready"
    return proc


def connects(bed: KubeBed, n: int) -> list[dict[str, Any]]:
    proc = bed.cluster.pod(0, 0).python(CONNECTS, VIP, str(PORT), str(n), MARKER.decode(),
                                        stdout=subprocess.PIPE)
    assert proc.popen is not None
    out, _ = proc.popen.communicate(timeout=300)
    return list(json.loads(out.decode().strip().splitlines()[-1]))


def test_a_service_vip_with_its_endpoint_on_the_other_node_is_carried_over_hbone(
        tmp_path: Path) -> None:
    with kube_bed(tmp_path) as bed:
        c = bed.cluster
        strict(bed)
        bed.pod(0, 0, "client", "client")
        bed.pod(1, 0, "web", "web")
        service(bed)  # no selector: the slice alone says where the endpoint is
        bed.k(bed.kubectl.create("endpointslices", endpoint_slice(
            NS, "web-abc12", "web", [slice_endpoint(bed, 1, 0)],
            [{"name": "http", "port": 8080, "protocol": "TCP"}])))
        bed.start_agents()
        for i in (0, 1):
            bed.wait_status(i, 200)
        # One watch per resource type per agent, EndpointSlices among them.
        wait_for(lambda: bed.loop.call(lambda: bed.server.open_watches) == 14, "14 watches")
        watched = bed.loop.call(lambda: list(bed.server.watch_log))
        assert sorted(w.resource for w in watched).count("endpointslices") == 2
        endpoint = f"{c.pod(1, 0).ip}:8080"
        wait_for(lambda: lb_table(bed) == {endpoint}, "the slice's endpoint in the kernel")

        proc = server(bed, 1, 0, "web")
        sniffers = [Sniffer(n.netns) for n in c.nodes]
        try:
            results = connects(bed, 20)
        finally:
            for sn in sniffers:
                sn.stop()
            proc.stop()
        assert all(r.get("ok") is True and r["tag"] == "web" for r in results), results[:3]
        assert {r["peer"] for r in results} == {f"{VIP}:{PORT}"}
        assert sum(s.frames for s in sniffers) > 0
        assert sum(s.seen for s in sniffers) == 0, "the payload crossed the underlay in clear"

        def closed(node: int, reporter: str) -> list[dict[str, Any]]:
            return [r for r in bed.flows(node) if r["kind"] == "close"
                    and r["reporter"] == reporter and r["destination"]["port"] == 8080]

        wait_for(lambda: len(closed(1, "destination")) >= 20 and len(closed(0, "source")) >= 20,
                 "flow records on both nodes")
        # The destination tunnel got each over HBONE, mutual TLS (STRICT accepted it).
        for rec in closed(1, "destination") + closed(0, "source"):
            assert rec["tunneled"] is True and rec["connection_security_policy"] == "mutual_tls"
            assert rec["source"]["principal"].endswith(f"/ns/{NS}/sa/client"), rec
            assert rec["destination"]["workload"] == "web", rec
            assert rec["destination"]["service"] == HOST, rec
        # The source knows the VIP the kernel chose the endpoint from.
        assert {r["service_address"] for r in closed(0, "source")} == {f"{VIP}:{PORT}"}
        for node, reporter in ((0, "source"), (1, "destination")):
            text = http_get(c.nodes[node].netns, 15020, "/metrics") or ""
            assert samples(text, "istio_tcp_connections_opened_total", reporter=reporter,
                           destination_service=HOST, destination_service_name="web",
                           destination_service_namespace=NS) >= 20


def test_an_endpoint_marked_unready_by_its_slice_gets_no_new_connections_while_a_transfer_ends(
        tmp_path: Path) -> None:
    with kube_bed(tmp_path, pods_per_node=2) as bed:
        c = bed.cluster
        strict(bed)
        bed.pod(0, 0, "client", "client")
        bed.pod(0, 1, "web-0", "web")
        bed.pod(1, 0, "web-1", "web")
        service(bed, selector={"app": "web"})
        ports = [{"name": "http", "port": 8080, "protocol": "TCP"}]
        bed.k(bed.kubectl.create("endpointslices", endpoint_slice(
            NS, "web-x1", "web", [slice_endpoint(bed, 0, 1), slice_endpoint(bed, 1, 0)], ports)))
        bed.start_agents()
        for i in (0, 1):
            bed.wait_status(i, 200)
        both = {f"{c.pod(0, 1).ip}:8080", f"{c.pod(1, 0).ip}:8080"}
        wait_for(lambda: lb_table(bed) == both, "both endpoints in the kernel")
        servers = [server(bed, 0, 1, "web-0"), server(bed, 1, 0, "web-1")]
        long = c.pod(0, 0).python(LONG, VIP, str(PORT), "web-1", MARKER.decode(),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert long.popen is not None and long.popen.stdin and long.popen.stdout
            assert "attempts" in json.loads(long.popen.stdout.readline())
            # The EndpointSlice controller marks web-1 terminating (not ready, still serving).
            bed.k(bed.kubectl.patch("endpointslices", NS, "web-x1", {"endpoints": [
                slice_endpoint(bed, 0, 1), slice_endpoint(bed, 1, 0, ready=False)]}))
            wait_for(lambda: lb_table(bed) == {f"{c.pod(0, 1).ip}:8080"}, "web-1 out")
            results = connects(bed, 30)
            assert all(r.get("ok") is True for r in results), results[:3]
            assert {r["tag"] for r in results} == {"web-0"}
            # The transfer to web-1 established before goes on to the last byte.
            long.popen.stdin.write("go\n")
            long.popen.stdin.flush()
            done = json.loads(long.popen.stdout.readline())
            assert done["ok"] is True and done["bytes"] == 136 * (len(MARKER) + 65536)
        finally:
            long.stop()
            for s in servers:
                s.stop()
        # Ready again: back in selection.
        bed.k(bed.kubectl.patch("endpointslices", NS, "web-x1", {"endpoints": [
            slice_endpoint(bed, 0, 1), slice_endpoint(bed, 1, 0)]}))
        deadline = time.monotonic() + 60
        while lb_table(bed) != both:
            assert time.monotonic() < deadline, lb_table(bed)
            time.sleep(0.1)

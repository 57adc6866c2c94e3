"""`python -m agent.sources.kube`: run the Kubernetes source alone and print what it delivers, one
JSON line per event, to check RBAC and connectivity against a real cluster."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from agent.sources.kube.config import KubeConfigError, from_kubeconfig, in_cluster
from agent.sources.kubernetes import RESOURCES, KubernetesSource


class _Printer:
    def __init__(self, full: bool) -> None:
        self.full = full

    def on_event(self, resource: str, type: str, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        line: dict[str, Any] = {"resource": resource, "type": type,
                                "namespace": meta.get("namespace"), "name": meta["name"],
                                "resourceVersion": meta["resourceVersion"]}
        if self.full:
            line["object"] = obj
        print(json.dumps(line), flush=True)

    def on_synced(self) -> None:
        print(json.dumps({"synced": True}), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.sources.kube", description=__doc__)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--kubeconfig", type=Path, help="default: $KUBECONFIG or ~/.kube/config")
    where.add_argument("--in-cluster", action="store_true",
                       help="use the pod's service account (KUBERNETES_SERVICE_HOST/PORT)")
    p.add_argument("--context", help="kubeconfig context (default: current-context)")
    p.add_argument("--node", default=os.environ.get("NODE_NAME") or socket.gethostname(),
                   help="this agent's node, sent in its User-Agent (default: $NODE_NAME or the "
                   "host name); pods are read for every node")
    p.add_argument("--resources", default=",".join(RESOURCES),
                   help=f"comma-separated subset of {','.join(RESOURCES)}")
    p.add_argument("--full", action="store_true", help="print whole objects")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = in_cluster() if args.in_cluster else from_kubeconfig(args.kubeconfig,
                                                                      args.context)
        source = KubernetesSource(config, args.node, _Printer(args.full),
                                  resources=args.resources.split(","))
    except (KubeConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is the way to stop it
        asyncio.run(source.run())
    return 0


if __name__ == "__main__":
    sys.exit(main())

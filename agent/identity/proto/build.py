"""Regenerate the committed protobuf message modules: `python -m agent.identity.proto.build`.

The generated files are committed so the agent needs no build step; a unit test regenerates into a
temporary directory and fails when the committed copies are stale.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = ("ca.proto",)
# Messages only (ca_pb2.py and its .pyi). The gRPC plugin's output is not used: it imports
# `ca_pb2` as a top-level module and pins the exact grpcio version it was generated with; the
# service is wired from the descriptor instead (see __init__.py).
OUTPUTS = tuple(f"{p[: -len('.proto')]}{suffix}"
                for p in PROTOS for suffix in ("_pb2.py", "_pb2.pyi"))


class ProtocError(RuntimeError):
    """grpc_tools.protoc failed; its message is included."""


def generate(out_dir: Path) -> list[Path]:
    """Compile the .proto files next to this module into out_dir; returns the files written."""
    # grpcio-tools is a dev dependency: imported here so the agent never needs it at run time.
    from grpc_tools import protoc  # type: ignore[import-untyped]  # noqa: PLC0415  # no stubs; see above

    well_known = resources.files("grpc_tools") / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    for proto in PROTOS:
        argv = ["protoc", f"-I{HERE}", f"-I{well_known}", f"--python_out={out_dir}",
                f"--pyi_out={out_dir}", str(HERE / proto)]
        rc = protoc.main(argv)
        if rc != 0:
            raise ProtocError(f"protoc exited {rc} compiling {proto} (see its messages above)")
    return [out_dir / name for name in OUTPUTS]


if __name__ == "__main__":
    for path in generate(HERE):
        print(path.relative_to(HERE.parents[2]))
    sys.exit(0)

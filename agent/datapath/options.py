"""Build options of the eBPF programs: one typed object, turned into -D flags.

Nothing is templated into the C source; every tunable is a preprocessor define named NM_*.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agent.abi import HBONE_PORT, INBOUND_PORT, MARK_MAGIC, MARK_MASK, OUTBOUND_PORT

DEFAULT_PIN_ROOT = Path("/sys/fs/bpf/nodemesh")

# The attach points, one C file each, in the order they are compiled into one module.
ATTACH_POINTS = (
    "sock_connect4.c",
    "sock_connect6.c",
    "sock_getpeername4.c",
    "sock_getsockname4.c",
    "sockopt_origdst.c",
    "sockops_flow.c",
    "sk_lookup_inbound.c",
    "sock_release.c",
    "sk_msg_bypass.c",
    "sock_bind.c",
)


@dataclass(frozen=True)
class BuildOptions:
    """Everything that changes the compiled programs. Equal options share one compiled module."""

    pin_dir: Path = DEFAULT_PIN_ROOT / "default"
    outbound_port: int = OUTBOUND_PORT
    inbound_port: int = INBOUND_PORT
    hbone_port: int = HBONE_PORT
    mark_magic: int = MARK_MAGIC
    max_pods: int = 1024
    max_policy: int = 262144
    max_ipcache: int = 65536
    max_conns: int = 65536
    max_services: int = 65536  # (VIP, port) frontends
    max_backends: int = 1 << 20  # (service version, slot) entries: two versions of each
    max_ratelimits: int = 65536  # (destination, source id) limits, and as many buckets
    ringbuf_bytes: int = 1 << 22
    sources: tuple[str, ...] = ATTACH_POINTS
    extra_cflags: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.ringbuf_bytes & (self.ringbuf_bytes - 1) or self.ringbuf_bytes < 4096:
            raise ValueError("ringbuf_bytes must be a power of two of at least 4096")
        if self.mark_magic & ~MARK_MASK:
            raise ValueError(f"mark_magic must fit in {MARK_MASK:#x}")
        for port in (self.outbound_port, self.inbound_port, self.hbone_port):
            if not 0 < port < 65536:
                raise ValueError(f"port {port} out of range")

    def cflags(self) -> list[str]:
        return [
            f'-DNM_PIN_DIR="{self.pin_dir}"',
            f"-DNM_OUTBOUND_PORT={self.outbound_port}",
            f"-DNM_INBOUND_PORT={self.inbound_port}",
            f"-DNM_HBONE_PORT={self.hbone_port}",
            f"-DNM_MARK_MAGIC={self.mark_magic:#x}",
            f"-DNM_MAX_PODS={self.max_pods}",
            f"-DNM_MAX_POLICY={self.max_policy}",
            f"-DNM_MAX_IPCACHE={self.max_ipcache}",
            f"-DNM_MAX_CONNS={self.max_conns}",
            f"-DNM_MAX_SERVICES={self.max_services}",
            f"-DNM_MAX_BACKENDS={self.max_backends}",
            f"-DNM_RINGBUF_BYTES={self.ringbuf_bytes}",
            f"-DNM_MAX_RATELIMITS={self.max_ratelimits}",
            *self.extra_cflags,
        ]

"""Same-node bypass (bpf/lib/bypass.h): its switch, counters and live connections.

connect4 lets an allowed connect between two pods enrolled on this node go to the destination
pod directly; sockops and the sk_msg program move its bytes socket to socket. The switch is
one slot of nm_bypass_opt_v1; it starts off (zero) until the agent turns it on.
"""

from __future__ import annotations

import enum
import struct

from agent.datapath import bpfsys, layouts
from agent.datapath.layouts import UpstreamKey
from agent.datapath.pinned import PinnedObjects

OPT_MAP = "nm_bypass_opt_v1"
LIVE_MAP = "nm_bypass_v1"
COUNTER_MAP = "nm_bypass_ctr_v1"
_SLOT = struct.Struct("=I")
_COUNT = struct.Struct("=Q")


class BypassCounter(enum.IntEnum):
    """Indices of nm_bypass_ctr_v1 (NM_BYPASS_CTR_*)."""

    CONNECTS = 0  # connects connect4 let go direct
    INBOUND = 1  # SYNs sk_lookup let through for a recorded bypass tuple
    FALLBACK = 2  # directions pinned to TCP (peer not yet in the sockhash)
    NO_SOCKHASH = 3  # sockets the sockhash refused (full): those go by TCP


def set_enabled(module: PinnedObjects, on: bool) -> None:
    """Turn the bypass on or off for connects from now on (live ones keep their path)."""
    bpfsys.map_update(module.map_fd(OPT_MAP), _SLOT.pack(0), _SLOT.pack(1 if on else 0))


def enabled(module: PinnedObjects) -> bool:
    raw = bpfsys.map_lookup(module.map_fd(OPT_MAP), _SLOT.pack(0), _SLOT.size)
    return raw is not None and _SLOT.unpack(raw)[0] == 1


def counters(module: PinnedObjects, cpus: int) -> dict[BypassCounter, int]:
    """Per-CPU counters summed (`cpus`: possible CPUs, the per-CPU value count)."""
    fd = module.map_fd(COUNTER_MAP)
    out: dict[BypassCounter, int] = {}
    for c in BypassCounter:
        raw = bpfsys.map_lookup(fd, _SLOT.pack(int(c)), _COUNT.size * cpus)
        out[c] = sum(v for (v,) in _COUNT.iter_unpack(raw)) if raw else 0
    return out


def live(module: PinnedObjects) -> dict[UpstreamKey, tuple[int, int, int]]:
    """Live bypassed connections by client tuple: (client cookie, bytes c->s, bytes s->c)."""
    fd = module.map_fd(LIVE_MAP)
    out: dict[UpstreamKey, tuple[int, int, int]] = {}
    for key in bpfsys.map_keys(fd, layouts.UPSTREAM_KEY.size):
        raw = bpfsys.map_lookup(fd, key, layouts.BYPASS_ENTRY.size)
        if raw is not None:
            cookie, c2s, s2c, _fallback, _pad = layouts.BYPASS_ENTRY.unpack(raw)
            out[UpstreamKey.unpack(key)] = (cookie, c2s, s2c)
    return out

"""The contract between the kernel programs and the Python side, defined once: the tunnel's
ports, the socket-mark layout and the reserved identity ids. bpf/lib/common.h holds the C side
(the ports and mark magic arrive there as -D flags from agent/datapath/options.py);
tests/unit/datapath/test_abi_mirror.py checks that both say the same. Verdicts, reasons and
event kinds are agent/datapath/verdicts.py (mirroring bpf/lib/verdicts.h), struct layouts
agent/datapath/layouts.py (sizes asserted in C).

A socket the tunnel owns carries MARK_MAGIC (Istio's in-pod mark 0x539) in the low 12 bits; an
upstream socket carries the authenticated source identity id in the high 20 bits.
"""

from __future__ import annotations

from typing import Final

OUTBOUND_PORT: Final = 15001  # app -> anywhere, captured by connect4
INBOUND_PORT: Final = 15006  # plaintext into a pod, steered by sk_lookup
HBONE_PORT: Final = 15008  # mTLS + HTTP/2 CONNECT between nodes
TUNNEL_PORTS: Final = frozenset({OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT})

# getsockopt(SOL_IP, SO_SERVICE_DST) on the tunnel's accepted outbound socket: the Service
# VIP:port the original destination was chosen from (bpf/sockopt_origdst.c); ENOPROTOOPT if none.
SO_SERVICE_DST: Final = 0x4E4D

MARK_MAGIC: Final = 0x539
MARK_MASK: Final = 0xFFF
MARK_ID_SHIFT: Final = 12
IDENTITY_BITS: Final = 20

ID_PLAINTEXT: Final = 1  # a source outside the mesh (PERMISSIVE plaintext)
ID_TUNNEL: Final = (1 << IDENTITY_BITS) - 1  # the tunnel's own network-facing sockets
MAX_IDENTITY_ID: Final = ID_TUNNEL - 1


def mark(identity_id: int) -> int:
    """The SO_MARK of a tunnel socket acting for `identity_id`."""
    return (identity_id << MARK_ID_SHIFT) | MARK_MAGIC

"""Node-local numeric ids for SPIFFE identities: the keys of kernel policy and socket marks.

Reserved ids: 0 and all-ones = the tunnel's own sockets, 1 = plaintext source, 2 = any
identity the agent has not been told about (so the kernel can still decide for it exactly).
Ids are stable while the process lives and never reused, and fit the mark's 20 high bits.
"""

from __future__ import annotations

import threading

from agent import abi
from agent.abi import ID_PLAINTEXT, ID_TUNNEL
from agent.identity.spiffe import Identity

ID_OTHER = 2
FIRST_ID = 3
MAX_ID = ID_TUNNEL - 1  # all-ones marks the tunnel's own sockets


class IdentityTable:
    def __init__(self) -> None:
        self._ids: dict[Identity, int] = {}
        self._next = FIRST_ID
        self._lock = threading.Lock()

    def allocate(self, identity: Identity) -> int:
        with self._lock:
            if identity in self._ids:
                return self._ids[identity]
            if self._next > MAX_ID:
                raise OverflowError("identity ids exhausted (2^20): too many distinct identities")
            self._ids[identity] = self._next
            self._next += 1
            return self._ids[identity]

    def id_of(self, identity: Identity | None) -> int:
        """The id the kernel sees for a peer: plaintext, known, or OTHER."""
        if identity is None:
            return ID_PLAINTEXT
        return self._ids.get(identity, ID_OTHER)

    def mark_for(self, identity: Identity | None) -> int:
        """SO_MARK of the tunnel's upstream socket on behalf of this peer."""
        return abi.mark(self.id_of(identity))

    def items(self) -> list[tuple[Identity, int]]:
        with self._lock:
            return sorted(self._ids.items(), key=lambda kv: kv[1])

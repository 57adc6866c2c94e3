"""Node-local numeric ids for SPIFFE identities: the keys of kernel policy and socket marks.

Reserved ids: 0 and all-ones = the tunnel's own sockets, 1 = plaintext source, 2 = any
identity the agent has not been told about (so the kernel can still decide for it exactly).
Ids fit the mark's 20 high bits.

Once `share()`d, the ids live in two maps pinned next to the datapath's, so every agent on the
node (an upgraded one running beside the old one, a restarted one) gives an identity the same
id: nm_identity_ids_v1 (sha256 of the identity's URI -> id) and nm_identity_names_v1 (id -> the
URI). An agent allocates by claiming a free id in the reverse map with BPF_NOEXIST, then
publishing identity -> id with BPF_NOEXIST; if another agent published the identity first, it
gives its claim back (nobody could have seen it) and adopts the winner's id.

Ids are never reclaimed: a socket marked with an id may outlive the agent that allocated it,
and a policy generation another agent wrote may still name it. That is bounded: one id per
distinct identity ever seen on the node, 2^20 - 4 of them (OverflowError past that, and the
fill is a metric); `nodemesh uninstall` starts over.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import threading
from pathlib import Path

from agent import abi
from agent.abi import ID_PLAINTEXT, ID_TUNNEL
from agent.datapath import bpfsys
from agent.datapath.bpfsys import MapType
from agent.identity.spiffe import Identity

ID_OTHER = 2
FIRST_ID = 3
MAX_ID = ID_TUNNEL - 1  # all-ones marks the tunnel's own sockets
CAPACITY = MAX_ID - FIRST_ID + 1
IDS_MAP = "nm_identity_ids_v1"
NAMES_MAP = "nm_identity_names_v1"
DIGEST = 32
NAME_BYTES = 640  # spiffe:// + trust domain (<= 255) + /ns/<63> + /sa/<253>, NUL padded
_ID = struct.Struct("<I")


def _digest(identity: Identity) -> bytes:
    return hashlib.sha256(identity.uri.encode()).digest()


def _name(identity: Identity) -> bytes:
    raw = identity.uri.encode()
    if len(raw) > NAME_BYTES:
        raise ValueError(f"identity {identity.uri[:80]}... is longer than {NAME_BYTES} bytes")
    return raw.ljust(NAME_BYTES, b"\0")


def open_pinned_map(pin: Path, key_size: int, value_size: int, name: str) -> int:
    """The map pinned at `pin`, created and pinned first if absent (two agents racing: one
    pin wins, the other opens it)."""
    for _ in range(3):
        try:
            return bpfsys.obj_get(pin)
        except FileNotFoundError:
            pass
        fd = bpfsys.map_create(MapType.HASH, key_size, value_size, CAPACITY,
                               flags=bpfsys.BPF_F_NO_PREALLOC, name=name)
        try:
            bpfsys.obj_pin(fd, pin)
            return fd
        except OSError as exc:
            os.close(fd)
            if exc.errno != errno.EEXIST:
                raise
    raise RuntimeError(f"BUG: {pin} keeps appearing and disappearing")


class SharedIds:
    """The pinned id maps of one pin directory (fds kept open)."""

    def __init__(self, pin_dir: Path) -> None:
        pin_dir.mkdir(parents=True, exist_ok=True)
        self.ids = open_pinned_map(pin_dir / IDS_MAP, DIGEST, _ID.size, "nm_identity_ids")
        try:
            self.names = open_pinned_map(pin_dir / NAMES_MAP, _ID.size, NAME_BYTES, "nm_id_names")
        except BaseException:
            os.close(self.ids)
            raise

    def close(self) -> None:
        os.close(self.ids)
        os.close(self.names)

    def lookup(self, identity: Identity) -> int | None:
        raw = bpfsys.map_lookup(self.ids, _digest(identity), _ID.size)
        return None if raw is None else int(_ID.unpack(raw)[0])

    def highest(self) -> int:
        """The highest id claimed so far (FIRST_ID - 1 if none)."""
        keys = bpfsys.map_keys(self.names, _ID.size)
        return max((int(_ID.unpack(k)[0]) for k in keys), default=FIRST_ID - 1)

    def allocate(self, identity: Identity, start: int) -> tuple[int, int]:
        """(identity's id, where the next search may start). Atomic between agents."""
        found = self.lookup(identity)
        if found is not None:
            return found, start
        name, key = _name(identity), _digest(identity)
        candidate = start
        while True:
            if candidate > MAX_ID:
                raise OverflowError("identity ids exhausted (2^20): too many distinct identities")
            try:
                bpfsys.map_update(self.names, _ID.pack(candidate), name, bpfsys.BPF_NOEXIST)
                break
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    raise
                candidate += 1  # claimed by another agent
        try:
            bpfsys.map_update(self.ids, key, _ID.pack(candidate), bpfsys.BPF_NOEXIST)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
            winner = self.lookup(identity)
            # Our claim was never published under this identity: nobody can hold it.
            bpfsys.map_delete(self.names, _ID.pack(candidate))
            if winner is None:
                raise RuntimeError(f"BUG: {identity.uri} published and gone") from exc
            return winner, candidate
        return candidate, candidate + 1


class IdentityTable:
    def __init__(self) -> None:
        self._ids: dict[Identity, int] = {}
        self._next = FIRST_ID
        self._lock = threading.Lock()
        self._shared: SharedIds | None = None

    def share(self, pin_dir: Path) -> None:
        """From now on allocate through the maps pinned in `pin_dir` (shared with every agent
        using that directory). Ids this table handed out before are published there too."""
        shared = SharedIds(pin_dir)
        with self._lock:
            if self._shared is not None:
                self._shared.close()
            self._shared = shared
            self._next = max(FIRST_ID, shared.highest() + 1)
            local = sorted(self._ids.items(), key=lambda kv: kv[1])
            self._ids.clear()
        for identity, old in local:
            if self.allocate(identity) != old:
                raise RuntimeError(f"identity {identity.uri} had id {old} before the shared "
                                   "table: share() must come before policy is written")

    def close(self) -> None:
        with self._lock:
            if self._shared is not None:
                self._shared.close()
                self._shared = None

    def allocate(self, identity: Identity) -> int:
        with self._lock:
            known = self._ids.get(identity)
            if known is not None:
                return known
            if self._shared is not None:
                ident, self._next = self._shared.allocate(identity, self._next)
            else:
                if self._next > MAX_ID:
                    raise OverflowError(
                        "identity ids exhausted (2^20): too many distinct identities")
                ident = self._next
                self._next += 1
            self._ids[identity] = ident
            return ident

    def id_of(self, identity: Identity | None) -> int:
        """The id the kernel sees for a peer: plaintext, known, or OTHER. Only identities this
        agent allocated count as known: its policy has entries for exactly those."""
        if identity is None:
            return ID_PLAINTEXT
        return self._ids.get(identity, ID_OTHER)

    def mark_for(self, identity: Identity | None) -> int:
        """SO_MARK of the tunnel's upstream socket on behalf of this peer."""
        return abi.mark(self.id_of(identity))

    def items(self) -> list[tuple[Identity, int]]:
        with self._lock:
            return sorted(self._ids.items(), key=lambda kv: kv[1])

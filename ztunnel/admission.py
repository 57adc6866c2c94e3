"""Handshake admission at the HBONE port: how many TLS handshakes may be pending at once, over
all pods and from one source IP.

A pending handshake holds TLS buffers before the peer has proved anything, so idle TCP
connections that never start TLS are a cheap way to make the agent hold memory until the
handshake timeout. Over either cap the new socket is refused at once (the caller resets it).
"""

from __future__ import annotations

import enum


class Refusal(enum.Enum):
    GLOBAL = "max_pending_handshakes"
    PER_IP = "max_pending_handshakes_per_ip"


class HandshakeAdmission:
    def __init__(self, max_pending: int, max_per_ip: int) -> None:
        if max_pending < 1 or max_per_ip < 1:
            raise ValueError("handshake caps must be at least 1")
        self.max_pending = max_pending
        self.max_per_ip = max_per_ip
        self.pending = 0
        self._per_ip: dict[str, int] = {}  # only IPs with a pending handshake: bounded by pending

    def admit(self, ip: str) -> Refusal | None:
        """Take a slot for a handshake from `ip`, or say which cap refuses it."""
        if self.pending >= self.max_pending:
            return Refusal.GLOBAL
        held = self._per_ip.get(ip, 0)
        if held >= self.max_per_ip:
            return Refusal.PER_IP
        self._per_ip[ip] = held + 1
        self.pending += 1
        return None

    def release(self, ip: str) -> None:
        """The handshake from `ip` finished (either way)."""
        held = self._per_ip.get(ip, 0)
        if held <= 0:
            raise RuntimeError(f"release without admit for {ip}")
        if held == 1:
            del self._per_ip[ip]
        else:
            self._per_ip[ip] = held - 1
        self.pending -= 1

    def pending_from(self, ip: str) -> int:
        return self._per_ip.get(ip, 0)

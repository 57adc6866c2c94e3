"""Load a certificate chain and private key into an ssl.SSLContext without writing them to disk.

`SSLContext.load_cert_chain` only takes file paths. An anonymous memory file (memfd_create) read
through /proc/self/fd/<n> gives it one that never reaches a filesystem; it is closed as soon as
OpenSSL has read it.
"""

from __future__ import annotations

import os
import ssl


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return fd


def load_cert_chain(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """ctx.load_cert_chain from memory: chain_pem is the leaf followed by any intermediates."""
    cert_fd = _memfd("nodemesh-chain", chain_pem)
    try:
        key_fd = _memfd("nodemesh-key", key_pem)
        try:
            ctx.load_cert_chain(f"/proc/self/fd/{cert_fd}", f"/proc/self/fd/{key_fd}")
        finally:
            os.close(key_fd)
    finally:
        os.close(cert_fd)

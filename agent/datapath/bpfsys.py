"""The bpf(2) syscall for what BCC 0.26 lacks: pinning, links, map creation, batch updates.

Attribute layouts follow union bpf_attr in include/uapi/linux/bpf.h; each command packs only the
fields it uses. Errors become BpfError with the command name and errno text.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import errno
import os
import platform
import struct
from collections.abc import Iterator
from pathlib import Path

# __NR_bpf differs per architecture (arch/*/include/uapi/asm/unistd*.h; arm64 and riscv64 use
# the generic table). Keyed by platform.machine().
SYSCALL_NUMBERS: dict[str, int] = {
    "x86_64": 321, "aarch64": 280, "arm64": 280, "riscv64": 280,
    "ppc64le": 361, "s390x": 351, "armv7l": 386, "i686": 357,
}


def syscall_number(machine: str) -> int | None:
    """The bpf(2) number on `machine`, None where nodemesh does not know it."""
    return SYSCALL_NUMBERS.get(machine)


_MACHINE = platform.machine()
_SYS_BPF = syscall_number(_MACHINE)
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.syscall.restype = ctypes.c_long


class Cmd(enum.IntEnum):
    MAP_CREATE = 0
    MAP_LOOKUP_ELEM = 1
    MAP_UPDATE_ELEM = 2
    MAP_DELETE_ELEM = 3
    MAP_GET_NEXT_KEY = 4
    OBJ_PIN = 6
    OBJ_GET = 7
    PROG_ATTACH = 8
    PROG_DETACH = 9
    PROG_TEST_RUN = 10
    PROG_QUERY = 16
    MAP_GET_FD_BY_ID = 14
    OBJ_GET_INFO_BY_FD = 15
    MAP_UPDATE_BATCH = 26
    LINK_CREATE = 28
    LINK_UPDATE = 29
    LINK_DETACH = 34


class AttachType(enum.IntEnum):
    CGROUP_SOCK_OPS = 3
    SK_MSG_VERDICT = 7
    CGROUP_INET4_BIND = 8
    CGROUP_INET6_BIND = 9
    CGROUP_INET4_CONNECT = 10
    CGROUP_INET6_CONNECT = 11
    CGROUP_GETSOCKOPT = 21
    CGROUP_INET4_GETPEERNAME = 29
    CGROUP_INET4_GETSOCKNAME = 31
    CGROUP_INET_SOCK_RELEASE = 34
    SK_LOOKUP = 36


class MapType(enum.IntEnum):
    HASH = 1
    ARRAY = 2
    LRU_HASH = 9
    LPM_TRIE = 11
    ARRAY_OF_MAPS = 12


BPF_ANY = 0
BPF_NOEXIST = 1
BPF_F_NO_PREALLOC = 1


class BpfError(OSError):
    """A bpf(2) command failed."""


def _sys_bpf() -> int:
    if _SYS_BPF is None:
        raise BpfError(errno.ENOSYS, f"bpf(2): no syscall number known for machine {_MACHINE!r} "
                                     f"(known: {', '.join(sorted(SYSCALL_NUMBERS))})")
    return _SYS_BPF


def _call(cmd: Cmd, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, max(len(attr), 128))
    ret = _libc.syscall(_sys_bpf(), int(cmd), buf, len(buf))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"bpf({cmd.name}): {os.strerror(err)}")
    return int(ret)


def _ptr(buf: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buf)


def obj_pin(fd: int, path: Path) -> None:
    p = ctypes.create_string_buffer(str(path).encode())
    _call(Cmd.OBJ_PIN, struct.pack("=QII", _ptr(p), fd, 0))


def obj_get(path: Path) -> int:
    """An fd for a pinned object; FileNotFoundError when nothing is pinned there."""
    p = ctypes.create_string_buffer(str(path).encode())
    try:
        return _call(Cmd.OBJ_GET, struct.pack("=QII", _ptr(p), 0, 0))
    except BpfError as exc:
        if exc.errno == 2:
            raise FileNotFoundError(2, f"nothing pinned at {path}") from exc
        raise


def link_create(prog_fd: int, target_fd: int, attach_type: AttachType) -> int:
    """A bpf_link: attached while an fd or a pin refers to it; update()-able in place."""
    return _call(Cmd.LINK_CREATE, struct.pack("=IIII", prog_fd, target_fd, int(attach_type), 0))


def link_update(link_fd: int, new_prog_fd: int) -> None:
    _call(Cmd.LINK_UPDATE, struct.pack("=IIII", link_fd, new_prog_fd, 0, 0))


def link_detach(link_fd: int) -> None:
    _call(Cmd.LINK_DETACH, struct.pack("=I", link_fd))


def prog_query(target_fd: int, attach_type: AttachType, max_progs: int = 64) -> list[int]:
    """IDs of the programs attached to a cgroup for one attach type (effective=False)."""
    ids = (ctypes.c_uint32 * max_progs)()
    attr = ctypes.create_string_buffer(
        struct.pack("=IIIIQI", target_fd, int(attach_type), 0, 0, ctypes.addressof(ids), max_progs),
        128,
    )
    ret = _libc.syscall(_sys_bpf(), int(Cmd.PROG_QUERY), attr, 128)
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"bpf(PROG_QUERY): {os.strerror(err)}")
    count = struct.unpack_from("=I", attr.raw, 24)[0]
    return list(ids[: min(count, max_progs)])


def map_create(
    map_type: MapType,
    key_size: int,
    value_size: int,
    max_entries: int,
    *,
    flags: int = 0,
    name: str = "",
) -> int:
    name_b = name.encode()[:15].ljust(16, b"\0")
    attr = struct.pack(
        "=IIIIIII16s", int(map_type), key_size, value_size, max_entries, flags, 0, 0, name_b
    )
    return _call(Cmd.MAP_CREATE, attr)


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    _call(Cmd.MAP_UPDATE_ELEM, struct.pack("=IIQQQ", fd, 0, _ptr(k), _ptr(v), flags))


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    try:
        _call(Cmd.MAP_LOOKUP_ELEM, struct.pack("=IIQQQ", fd, 0, _ptr(k), _ptr(v), 0))
    except BpfError as exc:
        if exc.errno == 2:
            return None
        raise
    return v.raw


def map_delete(fd: int, key: bytes) -> bool:
    k = ctypes.create_string_buffer(key, len(key))
    try:
        _call(Cmd.MAP_DELETE_ELEM, struct.pack("=IIQQQ", fd, 0, _ptr(k), 0, 0))
    except BpfError as exc:
        if exc.errno == 2:
            return False
        raise
    return True


def map_keys(fd: int, key_size: int) -> list[bytes]:
    keys: list[bytes] = []
    nxt = ctypes.create_string_buffer(key_size)
    cur: ctypes.Array[ctypes.c_char] | None = None
    while True:
        attr = struct.pack("=IIQQQ", fd, 0, _ptr(cur) if cur is not None else 0, _ptr(nxt), 0)
        try:
            _call(Cmd.MAP_GET_NEXT_KEY, attr)
        except BpfError as exc:
            if exc.errno == 2:
                return keys
            raise
        keys.append(nxt.raw)
        cur = ctypes.create_string_buffer(nxt.raw, key_size)


def map_items(fd: int, key_size: int, value_size: int) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of every entry; an entry deleted between the key walk and its lookup is
    skipped."""
    for key in map_keys(fd, key_size):
        raw = map_lookup(fd, key, value_size)
        if raw is not None:
            yield key, raw


def map_update_batch(fd: int, keys: bytes, values: bytes, count: int) -> None:
    """Update count entries whose keys and values are packed back to back."""
    if count == 0:
        return
    k = ctypes.create_string_buffer(keys, len(keys))
    v = ctypes.create_string_buffer(values, len(values))
    n = ctypes.c_uint32(count)
    # in_batch, out_batch, keys, values, count, map_fd, elem_flags, flags
    attr = struct.pack("=QQQQIIQQ", 0, 0, _ptr(k), _ptr(v), count, fd, 0, 0)
    buf = ctypes.create_string_buffer(attr, 128)
    ret = _libc.syscall(_sys_bpf(), int(Cmd.MAP_UPDATE_BATCH), buf, 128)
    if ret < 0:
        err = ctypes.get_errno()
        done = struct.unpack_from("=I", buf.raw, 32)[0]
        raise BpfError(err, f"bpf(MAP_UPDATE_BATCH): {os.strerror(err)} after {done} of {n.value}")


def prog_id(prog_fd: int) -> int:
    """The kernel id of a program (bpf_prog_info.id is at offset 4)."""
    info = ctypes.create_string_buffer(256)
    _call(Cmd.OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", prog_fd, 256, _ptr(info)))
    return int(struct.unpack_from("=I", info.raw, 4)[0])


def map_id(map_fd: int) -> int:
    """The kernel id of a map (bpf_map_info.id is at offset 4)."""
    info = ctypes.create_string_buffer(128)
    _call(Cmd.OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", map_fd, 128, _ptr(info)))
    return int(struct.unpack_from("=I", info.raw, 4)[0])


def map_max_entries(map_fd: int) -> int:
    """A map's max_entries (bpf_map_info: type, id, key_size, value_size, max_entries)."""
    info = ctypes.create_string_buffer(128)
    _call(Cmd.OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", map_fd, 128, _ptr(info)))
    return int(struct.unpack_from("=I", info.raw, 16)[0])


def prog_test_run(prog_fd: int, data: bytes, repeat: int = 1) -> int:
    """Run a program `repeat` times in the kernel on `data` (BPF_PROG_TEST_RUN); its retval."""
    buf = ctypes.create_string_buffer(data, len(data))
    # prog_fd, retval, data_size_in, data_size_out, data_in, data_out, repeat, duration
    attr = struct.pack("=IIIIQQII", prog_fd, 0, len(data), 0, _ptr(buf), 0, repeat, 0)
    out = ctypes.create_string_buffer(attr, 128)
    ret = _libc.syscall(_sys_bpf(), int(Cmd.PROG_TEST_RUN), out, 128)
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"bpf(PROG_TEST_RUN): {os.strerror(err)}")
    return int(struct.unpack_from("=I", out.raw, 4)[0])


def map_get_fd_by_id(map_id: int) -> int:
    """An fd for the map with this kernel id (e.g. an inner map named by a map-of-maps)."""
    return _call(Cmd.MAP_GET_FD_BY_ID, struct.pack("=III", map_id, 0, 0))

"""The installed datapath of one agent: programs attached at a cgroup-v2 root, pinned maps.

Attachments are bpf_links pinned under <pin_dir>/links, so they stay while the agent restarts;
install() adopts them by updating each link to the newly loaded program (no duplicates), and
uninstall() detaches and unpins everything it made. Pod enrollment is a map update plus one
sk_lookup link in the pod's netns. install() also registers the agent's own cgroup as the one
whose sockets may carry the tunnel mark (agent/datapath/trust.py).

Programs come pinned under <pin_dir>/progs from loader.py (in this process, or for the agent in
a short-lived child so that BCC/LLVM never stay resident); every map and program is then used
through fds opened from pins (pinned.py), and flow events are read from the ring buffer's mmap
(ringbuf.py).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import mmap
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.abi import ID_TUNNEL
from agent.datapath import bpfsys, bypass, identities, layouts, trust
from agent.datapath.bpfsys import AttachType, MapType
from agent.datapath.layouts import (
    Backend,
    FlowEvent,
    Frontend,
    PolicyEntry,
    PolicyKey,
    RateLimitEntry,
    RateLimitKey,
    RateLimitState,
    TrustedEntry,
    UpstreamKey,
)
from agent.datapath.loader import pin_programs, release, run_loader
from agent.datapath.options import BuildOptions
from agent.datapath.pinned import PinnedObjects
from agent.datapath.programs import BYPASS_MSG, BYPASS_SOCKS, CGROUP_PROGRAMS, PROGS_DIR, SK_LOOKUP
from agent.datapath.ringbuf import RingBuffer
from agent.datapath.verdicts import COUNTER_SLOTS, Counter, KernelEventKind, RateLimitCounter
from agent.host import netns

log = logging.getLogger(__name__)
KIND_AT = layouts.FLOW_EVENT_KIND_OFFSET
FLAGS_AT = layouts.FLOW_EVENT_FLAGS_OFFSET


# Counters that record a refusal (or a forged tunnel mark, ignored and counted).
DROP_COUNTERS = (
    Counter.DENY_EGRESS,
    Counter.DENY_INGRESS,
    Counter.IPV6_DENIED,
    Counter.INBOUND_NO_TUNNEL,
    Counter.UNTRUSTED_MARK,
    Counter.NO_HEALTHY_UPSTREAM,
)
ENOLINK = 67


def _possible_cpus() -> int:
    text = Path("/sys/devices/system/cpu/possible").read_text(encoding="ascii").strip()
    last = text.split(",")[-1].split("-")[-1]
    return int(last) + 1


def _detach_pinned_link(pin: Path) -> None:
    """Detach the link pinned at `pin` (even if another process holds it) and unpin it."""
    try:
        link = bpfsys.obj_get(pin)
    except FileNotFoundError:
        pass
    else:
        try:
            bpfsys.link_detach(link)
        except bpfsys.BpfError as exc:
            if exc.errno != ENOLINK:  # already defunct: its cgroup or netns is gone
                raise
        finally:
            os.close(link)
    pin.unlink(missing_ok=True)


def _replace_keys(fd: int, key_size: int, wanted: set[bytes]) -> None:
    """Make a set-like map (value unused) hold exactly `wanted`: add first, then remove."""
    for key in wanted:
        bpfsys.map_update(fd, key, layouts.U32.pack(1))
    for key in set(bpfsys.map_keys(fd, key_size)) - wanted:
        bpfsys.map_delete(fd, key)


@dataclass
class PolicyUpdate:
    """What one apply_policy wrote: how, and which keys (incremental updates only)."""

    mode: str  # "full" (a new generation) or "incremental" (the inactive one patched)
    written: int
    deleted: int
    touched: frozenset[PolicyKey] = frozenset()


@dataclass
class _Generation:
    """A policy generation this process built: its inner maps (fds kept) and what they hold."""

    pol: int
    ipc: int
    groups: dict[str, Mapping[PolicyKey, PolicyEntry]]
    cidrs: dict[ipaddress.IPv4Network, int]

    def close(self) -> None:
        os.close(self.pol)
        os.close(self.ipc)


def _patch(gen: _Generation, entries: Mapping[PolicyKey, PolicyEntry],
           cidrs: Mapping[ipaddress.IPv4Network, int],
           groups: Mapping[str, Mapping[PolicyKey, PolicyEntry]]) -> PolicyUpdate:
    """Make an inactive generation hold `entries`, writing only what changed since it was
    last written (a generation is written only while inactive: one update after a connect could
    last have read it, and a program run is bounded and never sleeps)."""
    writes: dict[PolicyKey, PolicyEntry] = {}
    deletes: set[PolicyKey] = set()
    for uid, new in groups.items():
        old = gen.groups.get(uid, {})
        if old is new:
            continue
        writes.update((k, entries[k]) for k, v in new.items() if old.get(k) != v)
        deletes.update(old.keys() - new.keys())
    for uid in gen.groups.keys() - groups.keys():
        deletes.update(gen.groups[uid])
    deletes -= entries.keys()  # still set by another destination with the same address
    items = sorted(writes.items())
    bpfsys.map_update_batch(gen.pol, b"".join(k.pack() for k, _ in items),
                            b"".join(v.pack() for _, v in items), len(items))
    for k in deletes:
        bpfsys.map_delete(gen.pol, k.pack())
    for net in gen.cidrs.keys() - cidrs.keys():
        bpfsys.map_delete(gen.ipc, layouts.ipcache_key(net))
    for net, cidr_id in cidrs.items():
        if gen.cidrs.get(net) != cidr_id:
            bpfsys.map_update(gen.ipc, layouts.ipcache_key(net),
                              layouts.IPCACHE_VALUE.pack(cidr_id, 0))
    gen.groups, gen.cidrs = dict(groups), dict(cidrs)
    return PolicyUpdate("incremental", len(writes), len(deletes),
                        frozenset(writes) | frozenset(deletes))


class Datapath:
    """One agent's programs and maps. Thread-safe for reads; one writer at a time."""

    def __init__(self, cgroup_root: Path, options: BuildOptions, *,
                 load_in_process: bool = True) -> None:
        """`load_in_process` False compiles in a short-lived loader process (the agent: no BCC
        or LLVM stays resident); True compiles here, cached per options (tests, tools)."""
        self.cgroup_root = cgroup_root
        self.options = options
        self.load_in_process = load_in_process
        self.links_dir = options.pin_dir / "links"
        self.loaded: list[str] = []
        self._module: PinnedObjects | None = None
        self._ring: RingBuffer | None = None
        self._ring_lock = threading.Lock()
        self._subscribers: list[Callable[[FlowEvent], None]] = []
        self._events_open = False
        self.event_errors = 0  # flow events that failed to decode or deliver
        self.events_read = 0  # records taken from the ring (delivered or filtered out)
        self._kinds: set[int] | None = None  # event kinds any subscriber wants; None: all
        self._bypassed = False  # a subscriber wants bypassed connections' records too
        # (VIP, port) -> (service id, slots, backends) as this process wrote them; None until
        # read from the kernel (backends None: written by a previous agent)
        self._services: dict[Frontend, tuple[int, int, tuple[Backend, ...] | None]] | None = None
        self._caps: dict[Frontend, int] = {}  # max_conns as last written
        self._retired: list[tuple[int, int]] = []  # (service id, slots): delete next update
        self._generations: dict[int, _Generation] = {}  # policy slot -> what this process wrote
        self.last_policy_update: PolicyUpdate | None = None
        self._next_svc_id = 1

    @property
    def pin_dir(self) -> Path:
        return self.options.pin_dir

    @property
    def module(self) -> PinnedObjects:
        if self._module is None:
            raise RuntimeError("BUG: datapath used before install()")
        return self._module

    # -- lifecycle -------------------------------------------------------------------------
    def install(self) -> list[str]:
        """Compile, load, and attach (or adopt pinned attachments). Returns what it did."""
        if not self.cgroup_root.is_dir():
            raise FileNotFoundError(f"cgroup {self.cgroup_root} does not exist")
        self.loaded = (pin_programs(self.options) if self.load_in_process
                       else run_loader(self.options))
        if self._module is not None:
            self._module.close()  # a re-install: programs were pinned anew
        self._module = PinnedObjects(self.pin_dir)
        self.links_dir.mkdir(parents=True, exist_ok=True)
        done: list[str] = []
        cg_fd = os.open(self.cgroup_root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for prog in CGROUP_PROGRAMS:
                fd = self.module.prog_fd(prog)
                done.append(self._attach(self.links_dir / prog.name, fd, cg_fd, prog.attach_type))
        finally:
            os.close(cg_fd)
        done.append(self._attach(self.links_dir / BYPASS_MSG.name, self.module.prog_fd(BYPASS_MSG),
                                 self.module.map_fd(BYPASS_SOCKS), BYPASS_MSG.attach_type))
        lookup_fd = self.module.prog_fd(SK_LOOKUP)
        for pin in sorted(self.links_dir.glob("sklookup-*")):
            done.append(self._adopt(pin, lookup_fd) or f"dropped defunct {pin.name}")
        done.extend(self.refresh_trust())
        return done

    def open_pins(self) -> None:
        """Use what is pinned in pin_dir without loading or attaching (readers, benchmarks)."""
        if self._module is None:
            self._module = PinnedObjects(self.pin_dir)

    # -- trust -----------------------------------------------------------------------------
    def refresh_trust(self) -> list[str]:
        """Forget trusted cgroups whose agent is gone, then trust this process's cgroup."""
        fd = self.module.map_fd("nm_trusted_cg_v1")
        done = []
        for cg_id, owner in self.trusted_cgroups().items():
            if not trust.owner_alive(owner):
                bpfsys.map_delete(fd, layouts.CGROUP_ID.pack(cg_id))
                done.append(f"untrusted cgroup {cg_id} of gone pid {owner.owner_pid}")
        own = self.trust_cgroup(trust.own_cgroup())
        return [*done, f"trusted cgroup {own}"]

    def trust_cgroup(self, path: Path) -> int:
        """Let sockets connected by tasks in this cgroup use the tunnel mark; owned by this
        process. Returns the cgroup id."""
        cg_id = trust.cgroup_id(path)
        bpfsys.map_update(
            self.module.map_fd("nm_trusted_cg_v1"),
            layouts.CGROUP_ID.pack(cg_id),
            trust.this_process().pack(),
        )
        return cg_id

    def untrust_cgroup(self, path: Path) -> None:
        bpfsys.map_delete(
            self.module.map_fd("nm_trusted_cg_v1"), layouts.CGROUP_ID.pack(trust.cgroup_id(path))
        )

    def trusted_cgroups(self) -> dict[int, TrustedEntry]:
        fd = self.module.map_fd("nm_trusted_cg_v1")
        out: dict[int, TrustedEntry] = {}
        for key, raw in bpfsys.map_items(fd, layouts.CGROUP_ID.size, layouts.TRUSTED_ENTRY.size):
            out[layouts.CGROUP_ID.unpack(key)[0]] = TrustedEntry.unpack(raw)
        return out

    def _attach(self, pin: Path, prog_fd: int, target_fd: int, attach: AttachType) -> str:
        adopted = self._adopt(pin, prog_fd)
        if adopted:
            return adopted
        link = bpfsys.link_create(prog_fd, target_fd, attach)
        try:
            bpfsys.obj_pin(link, pin)
        finally:
            os.close(link)
        return f"attached {pin.name}"

    def _adopt(self, pin: Path, prog_fd: int) -> str | None:
        """Point a pinned link at the new program; None (and unpinned) if it is defunct."""
        try:
            link = bpfsys.obj_get(pin)
        except FileNotFoundError:
            return None
        try:
            bpfsys.link_update(link, prog_fd)
            return f"adopted {pin.name}"
        except bpfsys.BpfError as exc:
            if exc.errno not in (ENOLINK, errno.EINVAL, errno.EPERM):
                raise
            pin.unlink()
            return None
        finally:
            os.close(link)

    def uninstall(self) -> list[str]:
        """Detach every link, unpin every map, remove the pin directory, release programs."""
        removed: list[str] = []
        if self.links_dir.is_dir():
            for pin in sorted(self.links_dir.iterdir()):
                _detach_pinned_link(pin)
                removed.append(f"link {pin.name}")
        progs = self.pin_dir / PROGS_DIR
        if progs.is_dir():
            for pin in sorted(progs.iterdir()):
                pin.unlink()
                removed.append(f"program {pin.name}")
        if self.pin_dir.is_dir():
            for pin in sorted(p for p in self.pin_dir.iterdir() if p.is_file()):
                pin.unlink()
                removed.append(f"map {pin.name}")
            shutil.rmtree(self.pin_dir, ignore_errors=True)
        release(self.options)  # a cached in-process module's maps are unpinned now
        for generation in self._generations.values():
            generation.close()
        self._generations.clear()
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self._module is not None:
            self._module.close()
            self._module = None
            self._events_open = False
            self._services = None
            self._caps = {}
        return removed

    # -- enrollment ------------------------------------------------------------------------
    def enroll(self, ns: str | Path, identity: int, pod_ip: ipaddress.IPv4Address) -> int:
        """Enroll a pod netns: capture its traffic and steer its inbound plaintext."""
        if not 2 <= identity < ID_TUNNEL:
            raise ValueError(f"identity id {identity} out of range 2..{ID_TUNNEL - 1}")
        cookie = netns.cookie_of(ns)
        previous = self._enrollment(cookie)
        addr_fd = self.module.map_fd("nm_pod_addr_v1")
        if previous is not None and previous[1] != pod_ip:
            bpfsys.map_delete(addr_fd, previous[1].packed)
        # The address first: from then on sk_lookup drops what the tunnel cannot take yet.
        bpfsys.map_update(addr_fd, pod_ip.packed, cookie.to_bytes(8, "little"))
        bpfsys.map_update(
            self.module.map_fd("nm_enrolled_v1"),
            cookie.to_bytes(8, "little"),
            layouts.enroll_value(identity, pod_ip),
        )
        pin = self.links_dir / f"sklookup-{cookie}"
        if not pin.exists():
            ns_fd = netns.open_ns(ns)
            try:
                prog = self.module.prog_fd(SK_LOOKUP)
                link = bpfsys.link_create(prog, ns_fd, AttachType.SK_LOOKUP)
                try:
                    bpfsys.obj_pin(link, pin)
                finally:
                    os.close(link)
            finally:
                os.close(ns_fd)
        return cookie

    def unenroll(self, cookie: int) -> None:
        entry = self._enrollment(cookie)
        if entry is not None:
            bpfsys.map_delete(self.module.map_fd("nm_pod_addr_v1"), entry[1].packed)
        bpfsys.map_delete(self.module.map_fd("nm_enrolled_v1"), cookie.to_bytes(8, "little"))
        with contextlib.suppress(bpfsys.BpfError):
            _detach_pinned_link(self.links_dir / f"sklookup-{cookie}")

    def _enrollment(self, cookie: int) -> tuple[int, ipaddress.IPv4Address] | None:
        raw = bpfsys.map_lookup(
            self.module.map_fd("nm_enrolled_v1"), cookie.to_bytes(8, "little"), layouts.ENROLL.size
        )
        if raw is None:
            return None
        ident, ip, _f, _p = layouts.ENROLL.unpack(raw)
        return ident, ipaddress.IPv4Address(ip)

    def enrolled(self) -> dict[int, tuple[int, ipaddress.IPv4Address]]:
        fd = self.module.map_fd("nm_enrolled_v1")
        out: dict[int, tuple[int, ipaddress.IPv4Address]] = {}
        for key, raw in bpfsys.map_items(fd, 8, layouts.ENROLL.size):
            ident, ip, _f, _p = layouts.ENROLL.unpack(raw)
            out[int.from_bytes(key, "little")] = (ident, ipaddress.IPv4Address(ip))
        return out

    def set_inbound_listener(self, pod_ip: ipaddress.IPv4Address, listener: socket.socket) -> None:
        """The tunnel's 15006 listener inside the pod's netns receives its steered plaintext."""
        bpfsys.map_update(
            self.module.map_fd("nm_inbound_v1"),
            pod_ip.packed,
            listener.fileno().to_bytes(8, "little"),
        )

    def remove_inbound_listener(self, pod_ip: ipaddress.IPv4Address) -> None:
        bpfsys.map_delete(self.module.map_fd("nm_inbound_v1"), pod_ip.packed)

    def set_exclusions(
        self, ports: Iterable[int] = (), cidrs: Iterable[ipaddress.IPv4Network] = ()
    ) -> None:
        """Destinations never captured; replaces the previous lists."""
        _replace_keys(
            self.module.map_fd("nm_exclude_port_v1"),
            layouts.EXCLUDE_PORT_KEY.size,
            {layouts.EXCLUDE_PORT_KEY.pack(p) for p in ports},
        )
        _replace_keys(
            self.module.map_fd("nm_exclude_cidr_v1"),
            layouts.IPCACHE_KEY.size,
            {layouts.ipcache_key(c) for c in cidrs},
        )

    # -- policy ----------------------------------------------------------------------------
    def apply_policy(
        self, entries: Mapping[PolicyKey, PolicyEntry], cidrs: Mapping[ipaddress.IPv4Network, int],
        groups: Mapping[str, Mapping[PolicyKey, PolicyEntry]] | None = None,
    ) -> PolicyUpdate:
        """Install a policy generation; enforced for every connect after return.

        Two generations alternate: the inactive one is made equal to `entries`, then one write
        of nm_gen_v1 switches every connect to it, so no connect sees a mix of old and new. With
        `groups` (entries per destination, as PolicyCompiler hands them out) and a generation
        this process wrote before, only the destinations whose group changed since that
        generation are written (incremental); otherwise the generation is built anew (full).
        """
        opts = self.options
        if len(entries) > opts.max_policy:
            raise ValueError(f"{len(entries)} policy entries exceed the map size {opts.max_policy}")
        gen_fd = self.module.map_fd("nm_gen_v1")
        raw = bpfsys.map_lookup(gen_fd, layouts.U32.pack(0), 4)
        nxt = 1 - (layouts.U32.unpack(raw)[0] & 1 if raw else 0)
        held = self._generations.get(nxt)
        if held is not None and not self._installed(nxt, held):
            # Another agent on this node (a surge upgrade) wrote that slot since: build anew.
            held.close()
            del self._generations[nxt]
            held = None
        if groups is not None and held is not None:
            update = _patch(held, entries, cidrs, groups)
        else:
            update = self._rebuild(nxt, entries, cidrs, groups)
        bpfsys.map_update(gen_fd, layouts.U32.pack(0), layouts.U32.pack(nxt))
        self.last_policy_update = update
        return update

    def _installed(self, slot: int, gen: _Generation) -> bool:
        """The slot's inner maps are still the ones this process wrote."""
        key = layouts.U32.pack(slot)
        for outer, fd in (("nm_policy_v1", gen.pol), ("nm_ipcache_v1", gen.ipc)):
            raw = bpfsys.map_lookup(self.module.map_fd(outer), key, 4)
            if raw is None or layouts.U32.unpack(raw)[0] != bpfsys.map_id(fd):
                return False
        return True

    def _rebuild(self, slot: int, entries: Mapping[PolicyKey, PolicyEntry],
                 cidrs: Mapping[ipaddress.IPv4Network, int],
                 groups: Mapping[str, Mapping[PolicyKey, PolicyEntry]] | None) -> PolicyUpdate:
        opts = self.options
        pol = bpfsys.map_create(MapType.HASH, layouts.POLICY_KEY.size, layouts.POLICY_VALUE.size,
                                opts.max_policy, flags=bpfsys.BPF_F_NO_PREALLOC,
                                name="nm_policy_gen")
        ipc = bpfsys.map_create(MapType.LPM_TRIE, layouts.IPCACHE_KEY.size,
                                layouts.IPCACHE_VALUE.size, opts.max_ipcache,
                                flags=bpfsys.BPF_F_NO_PREALLOC, name="nm_ipcache_gen")
        try:
            items = sorted(entries.items())
            bpfsys.map_update_batch(pol, b"".join(k.pack() for k, _ in items),
                                    b"".join(v.pack() for _, v in items), len(items))
            for net, cidr_id in cidrs.items():
                bpfsys.map_update(ipc, layouts.ipcache_key(net),
                                  layouts.IPCACHE_VALUE.pack(cidr_id, 0))
            key = layouts.U32.pack(slot)
            bpfsys.map_update(self.module.map_fd("nm_policy_v1"), key, layouts.U32.pack(pol))
            bpfsys.map_update(self.module.map_fd("nm_ipcache_v1"), key, layouts.U32.pack(ipc))
        except BaseException:
            os.close(pol)
            os.close(ipc)
            raise
        old = self._generations.pop(slot, None)
        if old is not None:
            old.close()
        if groups is None:
            os.close(pol)
            os.close(ipc)
        else:  # keep the maps: the next update of this slot patches them
            self._generations[slot] = _Generation(pol, ipc, dict(groups), dict(cidrs))
        return PolicyUpdate("full", len(entries), 0)

    def policy_entries(self) -> dict[PolicyKey, PolicyEntry]:
        """The entries of the generation connects use now, read from the kernel."""
        raw = bpfsys.map_lookup(self.module.map_fd("nm_gen_v1"), layouts.U32.pack(0), 4)
        slot = layouts.U32.unpack(raw)[0] & 1 if raw else 0
        inner = bpfsys.map_lookup(self.module.map_fd("nm_policy_v1"), layouts.U32.pack(slot), 4)
        if inner is None:
            return {}
        fd = bpfsys.map_get_fd_by_id(layouts.U32.unpack(inner)[0])
        try:
            out = {}
            for k in bpfsys.map_keys(fd, layouts.POLICY_KEY.size):
                v = bpfsys.map_lookup(fd, k, layouts.POLICY_VALUE.size)
                if v is not None:
                    out[PolicyKey.unpack(k)] = PolicyEntry.unpack(v)
            return out
        finally:
            os.close(fd)

    # -- connection rate limits ------------------------------------------------------------
    def apply_rate_limits(self, entries: Mapping[RateLimitKey, RateLimitEntry]) -> None:
        """Make the limits in force exactly `entries`. An unchanged limit keeps its buckets;
        a changed or removed one loses them (a changed limit starts with a full bucket and
        forgets its open connections: bounded over-admission once, never a refusal)."""
        if len(entries) > self.options.max_ratelimits:
            raise ValueError(f"{len(entries)} rate limit entries exceed the map size "
                             f"{self.options.max_ratelimits}")
        fd = self.module.map_fd("nm_rl_cfg_v1")
        current = self.rate_limits()
        for key, value in entries.items():
            if current.get(key) != value:
                bpfsys.map_update(fd, key.pack(), value.pack())
        changed = {k for k, v in current.items() if entries.get(k) != v}
        for key in changed - entries.keys():
            bpfsys.map_delete(fd, key.pack())
        if changed:
            state_fd = self.module.map_fd("nm_rl_state_v1")
            for raw in bpfsys.map_keys(state_fd, layouts.RL_KEY.size):
                dst, src_id, _dir = layouts.RL_KEY.unpack(raw)
                if RateLimitKey(ipaddress.IPv4Address(dst), src_id) in changed:
                    bpfsys.map_delete(state_fd, raw)

    def rate_limits(self) -> dict[RateLimitKey, RateLimitEntry]:
        """The limits in force as the kernel holds them."""
        fd = self.module.map_fd("nm_rl_cfg_v1")
        out: dict[RateLimitKey, RateLimitEntry] = {}
        for key, raw in bpfsys.map_items(fd, layouts.RL_CFG_KEY.size, layouts.RL_CFG.size):
            out[RateLimitKey.unpack(key)] = RateLimitEntry.unpack(raw)
        return out

    def rate_limit_buckets(self) -> list[RateLimitState]:
        fd = self.module.map_fd("nm_rl_state_v1")
        out = []
        for key, raw in bpfsys.map_items(fd, layouts.RL_KEY.size, layouts.RL_STATE.size):
            out.append(RateLimitState.unpack(key, raw))
        return out

    def rate_limit_refusals(self) -> dict[str, int]:
        """Connects the rate limits refused, by cause ("rate": empty bucket, "concurrency")."""
        fd = self.module.map_fd("nm_rl_counters_v1")
        cpus = _possible_cpus()
        out = {}
        for c in RateLimitCounter:
            raw = bpfsys.map_lookup(fd, layouts.U32.pack(int(c)), 8 * cpus)
            out[c.name.lower()] = (sum(int.from_bytes(raw[i : i + 8], "little")
                             for i in range(0, 8 * cpus, 8)) if raw else 0)
        return out

    # -- services --------------------------------------------------------------------------
    def apply_services(self, table: Mapping[Frontend, Sequence[Backend]],
                       caps: Mapping[Frontend, int] | None = None) -> None:
        """Make the socket load balancer hold exactly `table`: (VIP, port) -> ready backends
        (an empty list refuses connects with ECONNREFUSED), each frontend with its cap on
        concurrent connections from `caps` (absent or 0: none). Atomic per Service port: its
        backends are written under a fresh id before its frontend entry points at them; the
        replaced version's backends are deleted at the next update (a connect that read the
        old entry still finds them)."""
        caps = caps or {}
        if any(not 0 <= c <= 0xFFFF for c in caps.values()):
            raise ValueError("a service port's connection cap must be 0 to 65535")
        opts = self.options
        if len(table) > opts.max_services:
            raise ValueError(f"{len(table)} service ports exceed the map size {opts.max_services}")
        total = sum(len(b) for b in table.values())
        if total * 2 > opts.max_backends:
            raise ValueError(
                f"{total} service backends exceed half the map size {opts.max_backends}"
            )
        if any(len(b) > 0xFFFF for b in table.values()):
            raise ValueError("a service port has more than 65535 backends")
        svc_fd = self.module.map_fd("nm_lb4_svc_v1")
        be_fd = self.module.map_fd("nm_lb4_backend_v1")
        current = self._services if self._services is not None else self._read_services()
        for svc_id, count in self._retired:
            for slot in range(count):
                bpfsys.map_delete(be_fd, layouts.LB4_BACKEND_KEY.pack(svc_id, slot))
        retired: list[tuple[int, int]] = []
        for fe, backends in sorted(table.items()):
            want = tuple(backends)
            old = current.get(fe)
            cap = caps.get(fe, 0)
            if old is not None and old[2] == want and self._caps.get(fe, 0) == cap:
                continue
            svc_id = self._alloc_svc_id()
            bpfsys.map_update_batch(
                be_fd,
                b"".join(layouts.LB4_BACKEND_KEY.pack(svc_id, i) for i in range(len(want))),
                b"".join(b.pack() for b in want),
                len(want),
            )
            bpfsys.map_update(svc_fd, fe.pack(), layouts.LB4_SERVICE.pack(svc_id, len(want), cap))
            self._caps[fe] = cap
            if old is not None:
                retired.append((old[0], old[1]))
            current[fe] = (svc_id, len(want), want)
        active_fd = self.module.map_fd("nm_lb4_active_v1")
        for fe in sorted(current.keys() - table.keys()):
            bpfsys.map_delete(svc_fd, fe.pack())
            bpfsys.map_delete(active_fd, fe.pack())
            self._caps.pop(fe, None)
            old_id, old_count, _ = current.pop(fe)
            retired.append((old_id, old_count))
        self._retired = retired
        self._services = current

    def _alloc_svc_id(self) -> int:
        svc_id = self._next_svc_id
        self._next_svc_id = svc_id + 1 if svc_id < 0xFFFFFFFF else 1
        return svc_id

    def _read_services(self) -> dict[Frontend, tuple[int, int, tuple[Backend, ...] | None]]:
        """Adopt what a previous agent left: each frontend is rewritten at the first update
        (its backends are unknown here), and backends no frontend points at are deleted."""
        svc_fd = self.module.map_fd("nm_lb4_svc_v1")
        be_fd = self.module.map_fd("nm_lb4_backend_v1")
        out: dict[Frontend, tuple[int, int, tuple[Backend, ...] | None]] = {}
        for key, raw in bpfsys.map_items(svc_fd, layouts.LB4_KEY.size, layouts.LB4_SERVICE.size):
            svc_id, count, _flags = layouts.LB4_SERVICE.unpack(raw)
            out[Frontend.unpack(key)] = (svc_id, count, None)
        live = {i for i, _, _ in out.values()}
        stale: dict[int, int] = {}
        for key in bpfsys.map_keys(be_fd, layouts.LB4_BACKEND_KEY.size):
            svc_id, slot = layouts.LB4_BACKEND_KEY.unpack(key)
            if svc_id not in live:
                stale[svc_id] = max(stale.get(svc_id, 0), slot + 1)
            self._next_svc_id = max(self._next_svc_id, svc_id + 1)
        for svc_id in live:
            self._next_svc_id = max(self._next_svc_id, svc_id + 1)
        self._retired = sorted(stale.items())
        return out

    def service_connections(self) -> dict[Frontend, tuple[int, int]]:
        """Per frontend: (connections open through it now, connects its cap refused so far)."""
        fd = self.module.map_fd("nm_lb4_active_v1")
        out: dict[Frontend, tuple[int, int]] = {}
        for key, raw in bpfsys.map_items(fd, layouts.LB4_KEY.size, layouts.LB4_ACTIVE.size):
            conns, overflows = layouts.LB4_ACTIVE.unpack(raw)
            out[Frontend.unpack(key)] = (max(conns, 0), overflows)
        return out

    def written_services(self) -> dict[str, list[str]]:
        """What this agent last wrote to the load balancer, "vip:port" -> ["ip:port", ...]."""
        return {
            f"{fe.vip}:{fe.port}": [f"{b.ip}:{b.port}" for b in bes or ()]
            for fe, (_id, _n, bes) in sorted((self._services or {}).items())
        }

    def services(self) -> dict[Frontend, tuple[Backend, ...]]:
        """The load balancer as the kernel holds it (tests, `nodemesh datapath` listings)."""
        svc_fd = self.module.map_fd("nm_lb4_svc_v1")
        be_fd = self.module.map_fd("nm_lb4_backend_v1")
        out: dict[Frontend, tuple[Backend, ...]] = {}
        for key, raw in bpfsys.map_items(svc_fd, layouts.LB4_KEY.size, layouts.LB4_SERVICE.size):
            svc_id, count, _flags = layouts.LB4_SERVICE.unpack(raw)
            bes = []
            for slot in range(count):
                b = bpfsys.map_lookup(
                    be_fd, layouts.LB4_BACKEND_KEY.pack(svc_id, slot), layouts.LB4_BACKEND.size
                )
                if b is not None:
                    bes.append(Backend.unpack(b))
            out[Frontend.unpack(key)] = tuple(bes)
        return out

    # -- observation -----------------------------------------------------------------------
    def counters(self) -> dict[Counter, int]:
        fd = self.module.map_fd("nm_counters_v2")
        cpus = _possible_cpus()
        out: dict[Counter, int] = {}
        for c in Counter:
            raw = bpfsys.map_lookup(fd, layouts.U32.pack(int(c)), 8 * cpus)
            out[c] = (
                sum(int.from_bytes(raw[i : i + 8], "little") for i in range(0, 8 * cpus, 8))
                if raw
                else 0
            )
        assert len(Counter) <= COUNTER_SLOTS
        return out

    def drop_counts(self) -> dict[str, int]:
        """Refusals and ignored forgeries the kernel counted, by reason (for nodemesh_bpf_drops)."""
        c = self.counters()
        out = {k.name.lower(): c[k] for k in DROP_COUNTERS}
        out["rate_limited"] = sum(self.rate_limit_refusals().values())
        out["tunnel_port_bind"] = self.tunnel_port_refusals()
        return out

    def tunnel_port_refusals(self) -> int:
        """Binds of a tunnel port in an enrolled pod by a task outside the agent's cgroups
        (bpf/lib/portguard.h), refused with EPERM."""
        cpus = _possible_cpus()
        raw = bpfsys.map_lookup(self.module.map_fd("nm_port_guard_v1"), layouts.U32.pack(0),
                                8 * cpus)
        return (sum(int.from_bytes(raw[i : i + 8], "little") for i in range(0, 8 * cpus, 8))
                if raw else 0)

    def upstreams(self) -> dict[UpstreamKey, int]:
        """The agent's live upstream connects sk_lookup lets through, with their socket cookie."""
        fd = self.module.map_fd("nm_upstream_v2")
        out: dict[UpstreamKey, int] = {}
        entry = layouts.UPSTREAM_ENTRY
        for key, raw in bpfsys.map_items(fd, layouts.UPSTREAM_KEY.size, entry.size):
            out[UpstreamKey.unpack(key)] = entry.unpack(raw)[0]
        return out

    def set_same_node_bypass(self, on: bool) -> None:
        """The same-node bypass switch (agent/datapath/bypass.py); applies to new connects."""
        bypass.set_enabled(self.module, on)

    def bypass_counters(self) -> dict[bypass.BypassCounter, int]:
        return bypass.counters(self.module, _possible_cpus())

    def map_fill(self) -> dict[str, tuple[int, int]]:
        """Entries used and capacity of the maps that grow with the cluster."""
        o = self.options
        sizes = {
            "nm_enrolled_v1": (8, o.max_pods),
            "nm_conn_cookie_v1": (8, o.max_conns),
            "nm_conn_tuple_v1": (layouts.CONN_TUPLE.size, o.max_conns),
            "nm_upstream_v2": (layouts.UPSTREAM_KEY.size, o.max_conns),
            "nm_bypass_v1": (layouts.UPSTREAM_KEY.size, o.max_conns),
            "nm_svc_conn_v1": (8, o.max_conns),
            "nm_svc_tuple_v1": (layouts.CONN_TUPLE.size, o.max_conns),
            "nm_lb4_active_v1": (layouts.LB4_KEY.size, o.max_services),
            "nm_lb4_svc_v1": (layouts.LB4_KEY.size, o.max_services),
            "nm_rl_cfg_v1": (layouts.RL_CFG_KEY.size, o.max_ratelimits),
            "nm_rl_state_v1": (layouts.RL_KEY.size, o.max_ratelimits),
            "nm_rl_sock_v1": (8, o.max_conns),
        }
        if (self.pin_dir / identities.NAMES_MAP).exists():  # once an agent shared its ids
            sizes[identities.NAMES_MAP] = (layouts.U32.size, identities.CAPACITY)
        return {
            name: (len(bpfsys.map_keys(self.module.map_fd(name), ks)), cap)
            for name, (ks, cap) in sizes.items()
        }

    def open_events(self, callback: Callable[[FlowEvent], None],
                    kinds: Iterable[KernelEventKind] | None = None, *,
                    bypassed: bool = False) -> None:
        """Subscribe to flow events; delivered from poll_events()/drain_events().

        `kinds` names the events the subscriber needs (None: all): records of other kinds are
        skipped before they are decoded, which is most of the cost of a busy ring. It is a
        filter for the whole ring, so a subscriber still checks the kind it is handed.
        `bypassed`: also every record of a same-node bypassed connection, whatever its kind."""
        self._bypassed = self._bypassed or bypassed
        if not self._events_open:
            self._ring = RingBuffer(self.module.map_fd("nm_events_v1"))
            self._events_open = True
            self._kinds = None if kinds is None else {int(k) for k in kinds}
        elif kinds is None:
            self._kinds = None
        elif self._kinds is not None:
            self._kinds |= {int(k) for k in kinds}
        self._subscribers.append(callback)

    def _dispatch(self, buf: mmap.mmap, offsets: list[int], lengths: list[int]) -> None:
        # One batch of records, decoded in place from the ring's mmap. A record that does not
        # decode (or a subscriber that fails) is counted and logged in one bounded line, the
        # first time and every 1000th after; the rest of the batch is still delivered.
        self.events_read += len(offsets)
        subs, kinds = list(self._subscribers), self._kinds
        unpack = FlowEvent.unpack_from
        for off, length in zip(offsets, lengths, strict=True):
            if (kinds is not None and length > FLAGS_AT and buf[off + KIND_AT] not in kinds
                    and not (self._bypassed and buf[off + FLAGS_AT] & layouts.CONN_BYPASS)):
                continue
            try:
                event = unpack(buf, off, length)
                for sub in subs:
                    sub(event)
            except Exception as exc:
                self.event_errors += 1
                if self.event_errors % 1000 == 1:
                    log.error("flow event not delivered (%d so far): %s: %.200s",
                              self.event_errors, type(exc).__name__, exc)
                    log.debug("flow event failure", exc_info=True)

    def poll_events(self, timeout_ms: int = 100) -> int:
        """Wait up to timeout_ms for flow events and deliver them; returns how many."""
        ring = self._ring
        if ring is None:
            time.sleep(timeout_ms / 1000)
            return 0
        ring.wait(timeout_ms)
        with self._ring_lock:
            return ring.consume(self._dispatch)

    def drain_events(self, settle: float = 0.05) -> None:
        """Consume what is in the ring now (tests and shutdown)."""
        time.sleep(settle)
        if self._ring is not None:
            with self._ring_lock:
                self._ring.consume(self._dispatch)

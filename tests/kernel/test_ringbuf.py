"""The agent's ring-buffer reader (agent/datapath/ringbuf.py) against the real kernel: records
come out complete and in order across the ring's wrap-around, and when the ring is forced full
the kernel's drop counter accounts for every event not read, exposed as
nodemesh_ringbuf_drops_total{ring="flows"}."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prereq import require_root
from prometheus_client import CollectorRegistry, generate_latest

from agent.datapath import bpfsys
from agent.datapath.bccloader import Module
from agent.datapath.datapath import Datapath
from agent.datapath.layouts import FlowEvent
from agent.datapath.options import BuildOptions
from agent.datapath.verdicts import Counter
from agent.host import cgroup
from agent.telemetry.metrics import AgentMetrics
from benchmarks.flow_events import PACKET, generator

RING = 4096  # the smallest ring: 42 records of 96 bytes (88 + the 8-byte header)


@pytest.fixture
def ring(tmp_path: Path) -> Iterator[tuple[Datapath, int]]:
    require_root()
    pin = Path("/sys/fs/bpf/nodemesh") / f"test-ring-{tmp_path.name[-10:].replace('.', '')}"
    options = BuildOptions(pin_dir=pin, ringbuf_bytes=RING, extra_cflags=("-DDENY_EVERY=3",))
    dp = Datapath(cgroup.mount_point(), options)
    gen: Module | None = None
    try:
        gen, prog = generator(options)
        dp.open_pins()
        yield dp, prog
    finally:
        if gen is not None:
            gen.close()
        dp.uninstall()


def test_records_are_complete_and_in_order_across_the_wrap(ring: tuple[Datapath, int]) -> None:
    dp, prog = ring
    got: list[FlowEvent] = []
    dp.open_events(got.append)
    for _ in range(25):  # 25 x 30 records through a 42-record ring: it wraps many times
        bpfsys.prog_test_run(prog, PACKET, repeat=30)
        dp.drain_events(settle=0)
    assert [e.cookie for e in got] == list(range(750))
    assert all(e.dst_port == 8080 and e.src_id == 7 for e in got)
    assert dp.counters()[Counter.RINGBUF_DROPS] == 0 and dp.event_errors == 0


def test_a_full_ring_counts_every_lost_event_in_the_drop_metric(
        ring: tuple[Datapath, int]) -> None:
    dp, prog = ring
    got: list[FlowEvent] = []
    dp.open_events(got.append)
    bpfsys.prog_test_run(prog, PACKET, repeat=500)  # nobody reads meanwhile
    dp.drain_events(settle=0)
    drops = dp.counters()[Counter.RINGBUF_DROPS]
    assert 0 < len(got) <= RING // 96 and len(got) + drops == 500
    assert [e.cookie for e in got] == list(range(len(got)))  # the first ones, intact
    registry = CollectorRegistry()
    metrics = AgentMetrics(registry)
    metrics.ringbuf_drops.set_reader(lambda: {"flows": dp.counters()[Counter.RINGBUF_DROPS]})
    text = generate_latest(registry).decode()
    assert f'nodemesh_ringbuf_drops_total{{ring="flows"}} {float(drops)}' in text, text
    # Read out, the ring takes events again.
    bpfsys.prog_test_run(prog, PACKET, repeat=10)
    dp.drain_events(settle=0)
    assert len(got) + drops == 510 and dp.counters()[Counter.RINGBUF_DROPS] == drops

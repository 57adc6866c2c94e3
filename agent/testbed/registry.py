"""Bookkeeping of test-bed runs, so leftovers of crashed runs can be found and removed.

A run writes /run/nodemesh/testbed/<run id>.json naming its owner process and the pin
directories of the agents it runs. A run whose owner is gone is a leftover; `cleanup` removes its
processes, pins (detaching the programs linked there, as `nodemesh uninstall` does), namespaces
and cgroups. Namespaces and cgroups carry the `nm-<run id>` prefix, and pin directories under
the pin root are named <label>-<run id>-n<i> and hold an owner marker (an empty directory
testbed-<run id>), so leftovers are found even without a state file, and an agent instance
that merely has such a name is never taken for one.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
from pyroute2 import netns as pr_netns

from agent.datapath.options import DEFAULT_PIN_ROOT
from agent.datapath.uninstall import UninstallError, check_on_bpffs, uninstall
from agent.host import cgroup, netns
from agent.testbed.addressing import PREFIX, RUN_ID_LEN, run_of_pin_name, valid_run_id

log = logging.getLogger(__name__)
STATE_DIR = Path(os.environ.get("NODEMESH_TESTBED_STATE", "/run/nodemesh/testbed"))
PIN_ROOT = DEFAULT_PIN_ROOT


@dataclass
class RunRecord:
    run_id: str
    owner_pid: int
    owner_started: float
    cgroup: str
    namespaces: list[str] = field(default_factory=list)
    description: str = ""
    pins: list[str] = field(default_factory=list)  # agents' pin directories (bpffs)

    def owner_alive(self) -> bool:
        if self.owner_pid == -1:  # detached (`testbed up`): kept until `testbed down`
            return True
        try:
            return bool(psutil.Process(self.owner_pid).create_time() == self.owner_started)
        except psutil.Error:
            return False


def record_path(run_id: str) -> Path:
    return STATE_DIR / f"{run_id}.json"


def save(rec: RunRecord) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = record_path(rec.run_id).with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(rec), indent=2), encoding="utf-8")
    tmp.replace(record_path(rec.run_id))


def load(run_id: str) -> RunRecord | None:
    try:
        return RunRecord(**json.loads(record_path(run_id).read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None


def forget(run_id: str) -> None:
    record_path(run_id).unlink(missing_ok=True)


def owner_marker() -> tuple[int, float]:
    me = psutil.Process()
    return me.pid, me.create_time()


def _run_of(name: str) -> str | None:
    if not name.startswith(PREFIX):
        return None
    rid = name[len(PREFIX) : len(PREFIX) + RUN_ID_LEN]
    return rid if valid_run_id(rid) else None


def discover() -> dict[str, RunRecord | None]:
    """Every run id with something on the machine (netns, cgroup or state file)."""
    runs: set[str] = set()
    for name in netns.list_named():
        if rid := _run_of(name):
            runs.add(rid)
    root = cgroup.mount_point()
    for d in root.iterdir():
        if d.is_dir() and (rid := _run_of(d.name)):
            runs.add(rid)
    runs.update(rid for _pin, rid in _marked_pins())
    if STATE_DIR.is_dir():
        runs.update(p.stem for p in STATE_DIR.glob("*.json") if valid_run_id(p.stem))
    return {rid: load(rid) for rid in sorted(runs)}


def terminate(pids: list[int], grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after grace; only the PIDs given (processes this run started)."""
    procs: list[psutil.Process] = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            p.send_signal(signal.SIGTERM)
            procs.append(p)
        except psutil.Error:
            continue
    _gone, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=grace)


def teardown_run(run_id: str) -> list[str]:
    """Remove everything of one run; idempotent. Returns what was removed."""
    removed: list[str] = []
    cg = cgroup.mount_point() / f"{PREFIX}{run_id}"
    if cg.exists():
        # Every process a run starts lives in its cgroup subtree, so these are all ours.
        for _ in range(3):
            pids = cgroup.procs(cg)
            if not pids:
                break
            terminate(pids)
            removed.extend(f"process {p}" for p in pids)
    # Pins before namespaces and cgroups: detaching a live link is what `nodemesh uninstall`
    # does; after its netns or cgroup is gone the link would only be defunct.
    removed.extend(remove_pins(run_id))
    for name in netns.list_named():
        if _run_of(name) == run_id:
            pr_netns.remove(name)
            removed.append(f"netns {name}")
    if cg.exists():
        cgroup.remove_tree(cg)
        removed.append(f"cgroup {cg}")
    forget(run_id)
    return removed


def pin_marker(pin: Path, run_id: str) -> Path:
    return pin / f"testbed-{run_id}"  # bpffs refuses names with a dot


def mark_pin(pin: Path, run_id: str) -> None:
    """Create the pin directory with the run's owner marker (before the agent pins there)."""
    pin_marker(pin, run_id).mkdir(parents=True, exist_ok=True)


def _marked_pins() -> list[tuple[Path, str]]:
    if not PIN_ROOT.is_dir():
        return []
    found = []
    for d in PIN_ROOT.iterdir():
        rid = run_of_pin_name(d.name)
        try:
            if rid and pin_marker(d, rid).is_dir():
                found.append((d, rid))
        except OSError as exc:  # not ours to judge: leave it
            log.warning("pin directory %s: %s", d, exc)
    return found


def run_pins(run_id: str) -> list[Path]:
    """The pin directories of a run: those its state file names, and those under the pin root
    named for it that carry its marker."""
    rec = load(run_id)
    pins = {Path(p) for p in rec.pins} if rec else set()
    pins.update(d for d, rid in _marked_pins() if rid == run_id)
    return sorted(p for p in pins if p.is_dir())


def remove_pins(run_id: str) -> list[str]:
    """Uninstall every pin directory of the run (links detached, maps unpinned)."""
    removed: list[str] = []
    for pin in run_pins(run_id):
        try:
            check_on_bpffs(pin)  # uninstall deletes the directory: only ever on bpffs
        except UninstallError as exc:
            log.warning("testbed run %s: pins %s kept: %s", run_id, pin, exc)
            continue
        removed.extend(f"{item} in {pin}" for item in uninstall(pin))
        removed.append(f"pins {pin}")
    return removed


def cleanup(force: bool = False) -> dict[str, list[str]]:
    """Tear down leftovers: runs whose owner is gone (or every run, with force)."""
    done: dict[str, list[str]] = {}
    for rid, rec in discover().items():
        if rec is not None and rec.owner_alive() and not force:
            log.info("testbed run %s is live (owner pid %d): kept", rid, rec.owner_pid)
            continue
        done[rid] = teardown_run(rid)
    return done

"""The benchmark suite in its tiny mode: every section runs and reports verified payloads.

No timing thresholds: the numbers of a tiny run mean nothing; what is checked is that each
workload ran over all three routes (no mesh, nodemesh, Envoy) and that its traffic checked out.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from prereq import require_root, require_tool, requires

import ztunnel

REPO = Path(__file__).resolve().parents[2]
MODES = ("no-mesh", "nodemesh", "envoy")


def test_tiny_suite_writes_verified_results(tmp_path: Path) -> None:
    require_root()
    require_tool("iperf3")
    envoy = Path(sys.executable).parent / "envoy"
    requires(envoy.exists(), "needs Envoy in the venv (pip install -e '.[dev]')")
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.suite", "--tiny", "--out", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # the suite's context managers tear the test beds down
        out, _ = proc.communicate(timeout=60)
        raise
    log = out.decode(errors="replace")
    assert proc.returncode == 0, log[-4000:]

    results = json.loads((tmp_path / "latest.json").read_text())
    assert results["verified"] is True
    assert {"cpu", "kernel", "cores"} <= results["machine"].keys()
    assert results["machine"]["data_path"] == ztunnel.data_path()
    assert f"data path: {ztunnel.data_path()}." in (tmp_path / "latest.md").read_text()
    assert results["ciphers"]["nodemesh"] and results["ciphers"]["envoy"]
    sections = results["sections"]
    assert {"paths", "policy_update", "scale", "connect_cost", "flow_events"} <= sections.keys()
    for name in ("bulk", "streams", "latency", "connrate"):
        w = sections["paths"][name]
        assert w["verified"] is True, name
        for mode in MODES:
            runs = w["runs"][mode]
            assert len(runs) == 1 and runs[0]["verified"] is True, (name, mode, runs)
            assert w["summary"][mode]["median"] > 0
        assert set(w["ratios"]) == {"nodemesh/no-mesh", "nodemesh/envoy"}
    for mode in MODES:  # the integrity transfer: what came back hashed equal to what was sent
        check = sections["paths"]["bulk"]["runs"][mode][0]["integrity"]
        assert check["sha256_match"] is True and check["bytes_echoed"] == check["bytes_sent"]
    policy = sections["policy_update"]
    assert policy["verified"] is True
    assert all(r["verified"] for r in policy["allowed_to_denied"] + policy["denied_to_allowed"])
    scale = sections["scale"]
    assert scale["verified"] is True and scale["enrolled"] == scale["pods"]
    assert {"no programs", "programs, 0 entries", "programs, 100k entries"} <= set(
        sections["connect_cost"]
    )
    flows = sections["flow_events"]
    assert flows["verified"] is True and flows["read"] == flows["written"] > 0, flows
    assert flows["ringbuf_drops"] == 0 and flows["decode_errors"] == 0
    assert "| bulk, 1 stream |" in (tmp_path / "latest.md").read_text()
    assert (tmp_path / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""benchmarks/kube_sync.py runs end to end (small N): the numbers docs/kubernetes.md quotes
come from this code path."""

from __future__ import annotations

from benchmarks.kube_sync import measure


def test_kube_sync_benchmark_measures_a_small_cluster() -> None:
    result = measure(300)
    assert result["pods"] == 300
    assert result["pod_json_bytes"] > 2000  # realistic pods, not stubs
    assert result["heap_bytes_per_pod"] > 0 and result["initial_sync_seconds"] > 0

"""The test bed's address plan: unique, routable, within interface-name limits."""

import ipaddress

import pytest

from agent.testbed.addressing import (
    MAX_NODES,
    MAX_PODS_PER_NODE,
    PODS_IN_FIRST_CIDR,
    Plan,
    new_run_id,
    valid_run_id,
)


def test_run_ids_are_valid_and_distinct() -> None:
    ids = {new_run_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(valid_run_id(i) for i in ids)


def test_pod_ips_are_unique_and_inside_their_node_cidr() -> None:
    plan = Plan("abc123")
    seen = set()
    for n in range(4):
        for p in range(20):
            ip = plan.pod_ip(n, p)
            assert ip in plan.pod_cidr(n)
            assert ip != plan.pod_gateway(n)
            seen.add(ip)
    assert len(seen) == 80


def test_node_ips_share_the_underlay_and_not_pod_space() -> None:
    plan = Plan("abc123")
    ips = [plan.node_ip(n) for n in range(10)]
    assert len(set(ips)) == 10
    assert all(ip in ipaddress.IPv4Network("10.250.0.0/24") for ip in ips)
    assert all(ip not in plan.pod_cidr(0) for ip in ips)


def test_names_carry_the_run_id_and_fit_ifnamsiz() -> None:
    plan = Plan("abc123")
    assert plan.pod_ns(3, 7).startswith("nm-abc123-")
    assert len(plan.underlay_port(199)) < 16
    assert len(plan.pod_port(199)) < 16


@pytest.mark.parametrize("bad", ["", "ABC123", "abc12", "abc-12", "abc1234"])
def test_bad_run_ids_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="run id"):
        Plan(bad)


def test_out_of_range_indices_are_rejected() -> None:
    with pytest.raises(ValueError, match="pod index"):
        Plan("abc123").pod_ip(0, MAX_PODS_PER_NODE)


def test_pods_past_the_first_cidr_use_the_nodes_overflow_cidr() -> None:
    plan = Plan("abc123")
    seen = set()
    for n in (0, 1, 199):
        first, overflow = plan.pod_cidrs(n)
        assert not first.overlaps(overflow)
        for p in range(MAX_PODS_PER_NODE):
            ip = plan.pod_ip(n, p)
            assert ip in (first if p < PODS_IN_FIRST_CIDR else overflow)
            assert ip not in (first.network_address, first.broadcast_address,
                              overflow.network_address, overflow.broadcast_address,
                              plan.pod_gateway(n))
            seen.add(ip)
    assert len(seen) == 3 * MAX_PODS_PER_NODE
    # no node's overflow CIDR meets another's, the underlay or the first pod CIDRs
    overflows = [plan.overflow_cidr(n) for n in range(MAX_NODES)]
    assert len({o.network_address for o in overflows}) == MAX_NODES
    assert all(not o.overlaps(ipaddress.IPv4Network("10.250.0.0/15")) for o in overflows)
    assert len(plan.pod_port(MAX_PODS_PER_NODE - 1)) < 16

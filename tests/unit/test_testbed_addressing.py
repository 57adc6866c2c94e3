"""The test bed's address plan: unique, routable, within interface-name limits."""

import ipaddress

import pytest

from agent.testbed.addressing import Plan, new_run_id, valid_run_id


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
        Plan("abc123").pod_ip(0, 500)

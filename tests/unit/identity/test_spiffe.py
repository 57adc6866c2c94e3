"""SPIFFE id parsing edge cases and the node-id form used by the embedded CA."""

from __future__ import annotations

import pytest

from agent.identity.spiffe import Identity, IdentityError, node_from_uri, node_uri


@pytest.mark.parametrize("uri", [
    "spiffe://cluster.local/ns/default/sa/default",
    "spiffe://td/ns/a/sa/b",
    "spiffe://my-td.example.com/ns/kube-system/sa/coredns",
    "spiffe://td/ns/a1/sa/x.y-z",
    f"spiffe://td/ns/{'a' * 63}/sa/{'b' * 253}",
    f"spiffe://{'t' * 255}/ns/a/sa/b",
])
def test_valid_ids_round_trip(uri: str) -> None:
    identity = Identity.parse(uri)
    assert identity.uri == uri
    assert str(identity) == uri
    assert identity.principal == uri[len("spiffe://"):]


@pytest.mark.parametrize(("uri", "why"), [
    ("", "must start with spiffe://"),
    ("SPIFFE://td/ns/a/sa/b", "must start with spiffe://"),
    ("https://td/ns/a/sa/b", "must start with spiffe://"),
    ("spiffe:/td/ns/a/sa/b", "must start with spiffe://"),
    ("spiffe://td", "want spiffe://<trust-domain>/ns/<namespace>/sa/<account>"),
    ("spiffe://td/ns/a/sa/b/", "want spiffe://"),
    ("spiffe://td/ns/a/sa/b/extra", "want spiffe://"),
    ("spiffe://td/sa/b/ns/a", "want spiffe://"),
    ("spiffe://td/ns//sa/b", "invalid namespace ''"),
    ("spiffe://td/ns/a/sa/", "invalid service account ''"),
    ("spiffe:///ns/a/sa/b", "invalid trust domain ''"),
    ("spiffe://TD/ns/a/sa/b", "invalid trust domain 'TD'"),
    ("spiffe://td:8443/ns/a/sa/b", "invalid trust domain"),
    ("spiffe://user@td/ns/a/sa/b", "invalid trust domain"),
    ("spiffe://td./ns/a/sa/b", "invalid trust domain"),
    (f"spiffe://{'t' * 256}/ns/a/sa/b", "invalid trust domain"),
    ("spiffe://td/ns/A/sa/b", "invalid namespace 'A'"),
    ("spiffe://td/ns/-a/sa/b", "invalid namespace"),
    ("spiffe://td/ns/a/sa/b-", "invalid service account"),
    ("spiffe://td/ns/a/sa/b?x=1", "invalid service account"),
    ("spiffe://td/ns/a/sa/b#frag", "invalid service account"),
    ("spiffe://td/ns/a/sa/%62", "invalid service account"),
    ("spiffe://td/ns/a/sa/b\n", "invalid service account"),  # `$` would have let this through
    ("spiffe://td\n/ns/a/sa/b", "invalid trust domain"),
    ("spiffe://td/ns/a b/sa/b", "invalid namespace"),
    (f"spiffe://td/ns/a/sa/{'b' * 254}", "invalid service account"),
])
def test_invalid_ids_are_rejected_with_the_reason(uri: str, why: str) -> None:
    with pytest.raises(IdentityError) as err:
        Identity.parse(uri)
    assert why in str(err.value)


def test_identities_compare_and_hash_by_value() -> None:
    a = Identity.parse("spiffe://td/ns/a/sa/b")
    assert a == Identity("td", "a", "b")
    assert len({a, Identity("td", "a", "b")}) == 1
    assert sorted([Identity("td", "b", "a"), a]) == [a, Identity("td", "b", "a")]


def test_node_ids_are_never_workload_ids() -> None:
    uri = node_uri("cluster.local", "worker-1")
    assert uri == "spiffe://cluster.local/nodemesh/node/worker-1"
    assert node_from_uri(uri, "cluster.local") == "worker-1"
    with pytest.raises(IdentityError):
        Identity.parse(uri)
    with pytest.raises(IdentityError, match="not a node id of trust domain other"):
        node_from_uri(uri, "other")
    with pytest.raises(IdentityError, match="not a node id"):
        node_from_uri("spiffe://cluster.local/ns/a/sa/b", "cluster.local")
    with pytest.raises(IdentityError, match="invalid node name"):
        node_from_uri("spiffe://cluster.local/nodemesh/node/a/b", "cluster.local")
    with pytest.raises(IdentityError, match="invalid node name"):
        node_uri("cluster.local", "Bad_Node")

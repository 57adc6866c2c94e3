"""A small cluster on one machine: nodes and pods as network namespaces, pods in cgroups.

Used by the demo, the e2e tests and the benchmarks. Everything it makes carries the run id, so
several clusters can exist at once and `nodemesh testbed cleanup` can find leftovers.
"""

from agent.testbed.cluster import Cluster, Node, Pod, PodProcess

__all__ = ["Cluster", "Node", "Pod", "PodProcess"]

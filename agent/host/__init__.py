"""Host primitives: network namespaces and cgroup v2, used by the test bed and by enrollment."""

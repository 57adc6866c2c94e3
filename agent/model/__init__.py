"""The bottom of the mesh side: workloads, namespaces and services as immutable values
(`mesh`), and the field readers every parser uses to name the exact field of a bad value
(`fields`). Imports nothing of the agent but the SPIFFE identity type."""

"""State sources that feed the StateStore: a local YAML file (`file`), Kubernetes watches."""

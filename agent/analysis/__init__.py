"""Questions asked of a mesh state: what would this Service connect reach, what would this
policy change do to recorded flows. Read-only, above the state and policy they query."""

"""The kernel datapath: eBPF programs, their maps, attachment, and the agent-side views of them."""

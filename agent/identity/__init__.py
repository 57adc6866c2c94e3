"""Workload identity: SPIFFE ids, certificates, the CA protocol, the embedded CA."""

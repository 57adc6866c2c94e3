"""Reproducible benchmarks: each prints absolute numbers and ratios against a baseline run in the
same process on the same test bed."""

# Benchmarks need root (network namespaces, cgroups, BPF) and scripts/setup.sh run once.
PYTHON ?= .venv/bin/python
BENCH_ARGS ?=

.PHONY: bench bench-tiny
bench:  ## the full suite, ~6-8 minutes: benchmarks/results/latest.{json,md,png}
	$(PYTHON) -m benchmarks.suite $(BENCH_ARGS)

bench-tiny:  ## a smoke run of every section in well under a minute
	$(PYTHON) -m benchmarks.suite --tiny $(BENCH_ARGS)

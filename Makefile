# Benchmarks need root (network namespaces, cgroups, BPF) and scripts/setup.sh run once.
PYTHON ?= .venv/bin/python
BENCH_ARGS ?=

SOAK_SECONDS ?= 1800
SOAK_ARGS ?=

.PHONY: bench bench-tiny fuzz soak
bench:  ## the full suite, ~6-8 minutes: benchmarks/results/latest.{json,md,png}
	$(PYTHON) -m benchmarks.suite $(BENCH_ARGS)

bench-tiny:  ## a smoke run of every section in well under a minute
	$(PYTHON) -m benchmarks.suite --tiny $(BENCH_ARGS)

soak:  ## mixed traffic for SOAK_SECONDS (30 min): benchmarks/results/soak.{json,md,png}
	$(PYTHON) -m benchmarks.soak --seconds $(SOAK_SECONDS) $(SOAK_ARGS)

# No root needed. NODEMESH_FUZZ_EXAMPLES sets examples per test (default 20000); a failure prints
# the input to keep as an @example. Hypothesis keeps found failures in .hypothesis/ and replays them.
fuzz:  ## the long fuzz campaign over tests/unit/fuzz (the unit tier runs a short one)
	NODEMESH_FUZZ=campaign $(PYTHON) -m pytest -q tests/unit/fuzz $(FUZZ_ARGS)

"""Hypothesis profiles for the fuzz tests in this folder (parsers and decoders fed arbitrary or
mutated input: they must return a result or raise their documented error, nothing else).

- `unit` (the default): few examples per test, so the whole folder stays well under a minute in
  the unit tier. Each run draws new inputs; a failure prints the @example to keep.
- `campaign`: NODEMESH_FUZZ=campaign (what `make fuzz` sets) runs many more examples per test;
  NODEMESH_FUZZ_EXAMPLES overrides how many.

Tests here set no @settings of their own, so the profile decides; they keep each regression
found as an @example. No deadline: the guest clock is slow and timings vary with load, a hang
shows up as the test not finishing instead.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILE_ENV = "NODEMESH_FUZZ"
EXAMPLES_ENV = "NODEMESH_FUZZ_EXAMPLES"

settings.register_profile(
    "unit",
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "campaign",
    max_examples=int(os.environ.get(EXAMPLES_ENV) or 20_000),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    print_blob=True,
)
settings.load_profile(os.environ.get(PROFILE_ENV) or "unit")

"""Hypothesis profiles for the input-fuzzing tests, and a count of the examples each model ran.

``ci`` (the default) keeps the run short; ``long`` draws many more examples. Pick one with
``FASTUNET_FUZZ_PROFILE=long`` (or ``HYPOTHESIS_PROFILE=long``). The fuzz tests apply the chosen
profile themselves, through the alias ``fastunet-fuzz``, so that loading this file leaves the settings of
other hypothesis tests in the session alone.
"""

from __future__ import annotations

import collections
import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=400, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_CHOSEN = os.environ.get("FASTUNET_FUZZ_PROFILE")
if _CHOSEN is None:  # HYPOTHESIS_PROFILE may name another suite's profile: only ours count here
    _CHOSEN = os.environ.get("HYPOTHESIS_PROFILE") if os.environ.get("HYPOTHESIS_PROFILE") in ("ci", "long") else "ci"
if _CHOSEN not in ("ci", "long"):
    raise pytest.UsageError(f"FASTUNET_FUZZ_PROFILE must be 'ci' or 'long'; got {_CHOSEN!r}")
settings.register_profile("fastunet-fuzz", parent=settings.get_profile(_CHOSEN))

class _Counts(collections.Counter):
    def __repr__(self) -> str:  # hypothesis prints the test's arguments with a failing example
        return f"<{sum(self.values())} fuzz examples>"

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))


_COUNTS = _Counts()


@pytest.fixture(scope="session")
def fuzz_counts() -> collections.Counter:
    """Examples run per model (and per kind of input), reported at the end of the session."""
    return _COUNTS


def pytest_terminal_summary(terminalreporter):
    if not _COUNTS:
        return
    terminalreporter.section(f"fuzzed forward inputs (hypothesis profile {_CHOSEN!r})")
    for key, count in sorted(_COUNTS.items()):
        terminalreporter.write_line(f"{key}: {count}")

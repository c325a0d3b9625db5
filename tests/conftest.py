"""Shared test set-up: a deterministic Hypothesis profile and the validation folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "deterministic",
    derandomize=True,
    database=None,  # the same examples every run: nothing replayed from earlier runs
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

VALIDATION = Path(__file__).resolve().parents[2] / "shared" / "validation"


@pytest.fixture(scope="session")
def validation_dir() -> Path:
    """../shared/validation (NONMEM and peer outputs).

    Where it is absent the tests that need it are skipped with the reason, except under
    CI (the environment variable CI set), where a missing folder fails them: a CI run must
    check against NONMEM, not pass by skipping.
    """
    if not VALIDATION.is_dir():
        message = f"validation data not found at {VALIDATION}"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI requires it (unset CI to skip these tests)")
        pytest.skip(message)
    return VALIDATION

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
    """../shared/validation (NONMEM and peer outputs); skip when it is absent."""
    if not VALIDATION.is_dir():
        pytest.skip(f"validation data not found at {VALIDATION}")
    return VALIDATION

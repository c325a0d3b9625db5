"""Hypothesis strategies shared by the tests: PK parameters and dosing regimens."""

from __future__ import annotations

from hypothesis import strategies as st
from ode_reference import Dose


def log_uniform(lo: float, hi: float) -> st.SearchStrategy[float]:
    """Floats spread evenly on a log scale between ``lo`` and ``hi``."""
    import math

    return st.floats(math.log(lo), math.log(hi)).map(math.exp)


@st.composite
def pk_params(draw: st.DrawFn, n_cmt: int, depot: bool) -> dict[str, float]:
    """Plausible parameters (L, L/day, 1/day), wide enough to include stiff systems."""
    params = {"CL": draw(log_uniform(0.05, 20.0)), "V1": draw(log_uniform(1.0, 100.0))}
    if n_cmt >= 2:
        params.update(Q=draw(log_uniform(0.01, 50.0)), V2=draw(log_uniform(0.5, 200.0)))
    if n_cmt == 3:
        params.update(Q3=draw(log_uniform(0.01, 50.0)), V3=draw(log_uniform(0.5, 200.0)))
    if depot:
        params["KA"] = draw(log_uniform(0.05, 50.0))
    return params


@st.composite
def regimens(draw: st.DrawFn, n_cmt: int, depot: bool) -> list[Dose]:
    """Boluses and infusions at arbitrary times, possibly overlapping, into any compartment."""
    n_doses = draw(st.integers(1, 5))
    n_states = n_cmt + int(depot)
    doses = []
    for _ in range(n_doses):
        time = draw(st.floats(0.0, 40.0).map(lambda t: round(t, 3)))
        cmt = draw(st.integers(1, n_states))
        amount = draw(log_uniform(1.0, 1000.0))
        duration = draw(st.one_of(st.just(0.0), st.floats(0.01, 10.0).map(lambda d: round(d, 3))))
        doses.append(Dose(time, cmt, amount, duration))
    return sorted(doses, key=lambda d: d.time)

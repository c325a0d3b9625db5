"""Exact slopes of the record-by-record solve (pkmodel.tangent): against the forward
sensitivity ODEs integrated by scipy (tests/ode_reference.py, no code shared), against the
engine's amounts, against central differences of the engine, and the divided differences
against mpmath at 50 digits."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest

from pkmodel.engine import Structure, expand_records, select_profiles, solve, stack_events
from pkmodel.tangent import (
    central_amount_slopes,
    second_exp_divided_difference,
    slopes_unsupported,
)
from tests.ode_reference import Dose, ode_sensitivities

BASE = {"CL": 0.3, "V1": 3.0, "Q": 0.5, "V2": 2.0, "Q3": 0.1, "V3": 5.0}  # L/day, L

# Infusions of 2 h at days 0, 14 and 42, a bolus at day 70; samples between and during
# (day 42.05); the parameters change at every record (IOV-like occasions and more).
TIMES = np.array([0.0, 1.0, 14.0, 20.0, 42.0, 42.05, 60.0, 70.0, 70.0, 71.0, 100.0])
EVID = np.array([1, 0, 1, 0, 1, 0, 0, 0, 1, 0, 0])
AMT = np.array([300.0, 0, 300, 0, 300, 0, 0, 0, 150, 0, 0])
RATE = np.where((AMT > 0) & (TIMES < 70), AMT / (2 / 24), 0.0)


def per_record(structure: Structure, theta: np.ndarray, mix: np.ndarray, drift: np.ndarray
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Parameters ``(S, R)``, ``p = base exp(mix_p . theta + drift_pk theta_0)``, and
    their slopes ``(S, R, m)`` in the ``m`` components of ``theta (S, m)``, by name."""
    params, slopes = {}, {}
    for i, name in enumerate(structure.parameter_names):
        log = theta @ mix[i]
        params[name] = BASE[name] * np.exp(log[:, None] + drift[i][None, :] * theta[:, :1])
        d = np.broadcast_to(mix[i], theta.shape[:1] + (len(TIMES), mix.shape[1])).copy()
        d[..., 0] += drift[i][None, :]
        slopes[name] = params[name][..., None] * d
    return params, slopes


def stacked(slopes: dict[str, np.ndarray], structure: Structure) -> np.ndarray:
    """The slopes as :func:`central_amount_slopes` takes them, ``(S, R, P, m)``."""
    return np.stack([slopes[k] for k in structure.parameter_names], axis=2)


def setup(n: int, sets: int = 3, m: int = 3, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    structure = Structure(n)
    mix = rng.normal(0.0, 1.0, (len(structure.parameter_names), m))
    drift = rng.normal(0.0, 0.3, (len(structure.parameter_names), len(TIMES)))
    theta = rng.normal(0.0, 0.3, (sets, m))
    return structure, mix, drift, theta


# Overlapping infusions: 10 days from day 0, 1 day from day 3 (both in the interval that
# ends at day 6), an infusion at day 8 running past two samples.
OVERLAP = (np.array([0.0, 3.0, 6.0, 8.0, 8.5, 9.0, 10.0, 12.0, 20.0, 30.0, 40.0]),
           np.array([1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0]),
           np.array([500.0, 200, 0, 100, 0, 0, 0, 0, 0, 0, 0]),
           np.array([50.0, 200, 0, 50, 0, 0, 0, 0, 0, 0, 0]))


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("regimen", ["label", "overlapping"])
def test_slopes_agree_with_the_sensitivity_odes(n, regimen):
    """Every record's central amount and its derivatives in three directions equal those
    of the forward sensitivity ODEs (LSODA, rtol 1e-11) within 1e-8 relative to the
    largest, NOCB (record k's parameters over the interval before it), for the label's
    infusions and a bolus and for infusions overlapping each other and several records;
    the sample before the day-70 bolus, at its time, is checked against the engine
    below."""
    times, evid, amt, rate = (TIMES, EVID, AMT, RATE) if regimen == "label" else OVERLAP
    structure, mix, drift, theta = setup(n)
    events = expand_records(times, evid, amt, rate=rate)
    params, slopes = per_record(structure, theta, mix, drift)
    at = np.arange(len(times))[None, :]
    amounts, derivatives = central_amount_slopes(structure, events, params,
                                                        stacked(slopes, structure), at=at)
    doses = [Dose(t, 1, a, a / r if r else 0.0) for t, a, r in zip(times, amt, rate) if a]
    for s in range(theta.shape[0]):
        segments = [(times[k - 1], {p: params[p][s, k] for p in params},
                     {p: slopes[p][s, k] for p in slopes})
                    for k in range(1, len(times)) if times[k] > times[k - 1]]
        x, dx = ode_sensitivities(segments, doses, times, n_cmt=n)
        # the reference reports each time after its boluses: the last record at a time
        last = np.r_[times[1:] != times[:-1], True]
        np.testing.assert_allclose(amounts[s, last], x[last, 0], rtol=1e-9,
                                   atol=1e-9 * x.max())
        scale = np.abs(dx[:, 0]).max()
        np.testing.assert_allclose(derivatives[s, last], dx[last, 0], rtol=0,
                                   atol=1e-8 * scale)


@pytest.mark.parametrize("covariates", ["nocb", "locf"])
@pytest.mark.parametrize("n", [1, 2])
def test_amounts_equal_the_engine_and_slopes_its_central_differences(n, covariates):
    """Two profiles (one with ADDL doses, one a bolus regimen), two sets each: the amounts
    equal :func:`pkmodel.engine.solve`'s within 1e-13 relative, the slopes its central
    differences (step 1e-5) within 1e-7 of the largest."""
    structure, mix, drift, _ = setup(n, seed=1)
    first = expand_records(TIMES, EVID, AMT, rate=RATE, covariates=covariates)
    second = expand_records(np.array([0.0, 3.0, 10.0, 10.0, 13.0, 30.0, 35.0, 60.0, 61.0,
                                      62.0, 100.0]),
                            np.array([1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]),
                            np.array([100.0, 0, 0, 50, 0, 0, 0, 0, 0, 0, 0]),
                            ii=np.array([0.0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0]),
                            addl=np.array([0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]),
                            covariates=covariates)
    events = stack_events([first, second])
    n_rec = events.shape[1]
    rng = np.random.default_rng(2)
    theta = rng.normal(0.0, 0.3, (4, mix.shape[1]))
    drift = np.pad(drift, ((0, 0), (0, n_rec - drift.shape[1])), mode="edge")

    def params_of(th: np.ndarray) -> tuple[dict, dict]:
        out, d = {}, {}
        for i, name in enumerate(structure.parameter_names):
            out[name] = BASE[name] * np.exp((th @ mix[i])[:, None] + drift[i] * th[:, :1])
            grad = np.broadcast_to(mix[i], (th.shape[0], n_rec, mix.shape[1])).copy()
            grad[..., 0] += drift[i]
            d[name] = out[name][..., None] * grad
        return out, d

    at = np.array([[1, 3, 5, 6, 9, 10], [1, 2, 4, 6, 9, n_rec - 1]])
    params, slopes = params_of(theta)
    amounts, derivatives = central_amount_slopes(structure, events, params,
                                                        stacked(slopes, structure), at=at)
    rows = np.repeat(at, 2, axis=0)

    def central(th: np.ndarray) -> np.ndarray:
        return np.take_along_axis(solve(structure, events, params_of(th)[0])[..., 0], rows,
                                  axis=1)

    np.testing.assert_allclose(amounts, central(theta), rtol=1e-13)
    h = 1e-5
    for j in range(theta.shape[1]):
        step = np.zeros(theta.shape[1])
        step[j] = h
        fd = (central(theta + step) - central(theta - step)) / (2 * h)
        np.testing.assert_allclose(derivatives[..., j], fd, rtol=0,
                                   atol=1e-7 * np.abs(fd).max())


def test_a_selection_of_profiles_gives_what_its_profiles_give():
    """Profiles selected from solved events (out of order, one twice; their plan taken from
    the parent's) give what the same profiles stacked afresh give, to the last bit."""
    structure, mix, drift, _ = setup(2, seed=3)
    label = expand_records(TIMES, EVID, AMT, rate=RATE)
    overlapping = expand_records(*OVERLAP[:3], rate=OVERLAP[3])
    parent = stack_events([label, overlapping, label])
    rows = np.array([1, 0, 1])
    theta = np.random.default_rng(4).normal(0.0, 0.3, (3, mix.shape[1]))
    params, slopes = per_record(structure, theta, mix, drift)
    at = np.tile(np.arange(len(TIMES)), (3, 1))
    slopes = stacked(slopes, structure)
    central_amount_slopes(structure, parent, params, slopes, at=at)  # the parent's plan
    chosen = central_amount_slopes(structure, select_profiles(parent, rows), params, slopes,
                                   at=at)
    fresh = central_amount_slopes(structure, stack_events([overlapping, label, overlapping]),
                                  params, slopes, at=at)
    for a, b in zip(chosen, fresh):
        np.testing.assert_array_equal(a, b)


def test_second_divided_difference_against_mpmath():
    """At pairs of rates equal, nearly equal, far apart and zero, and infusion lengths
    from minutes to months, within 1e-13 relative of mpmath (50 digits)."""
    mpmath.mp.dps = 50
    rates = [0.0, -1e-9, -0.003, -0.05, -0.0500001, -0.3, -2.0, -7.9, -40.0]
    lengths = [1e-3, 2 / 24, 1.0, 14.0, 200.0]
    x, y, t = (np.array(v) for v in zip(*[(a, b, c) for a in rates for b in rates
                                           for c in lengths]))
    ours = second_exp_divided_difference(x, y, t)

    def first(p: mpmath.mpf, q: mpmath.mpf, c: mpmath.mpf) -> mpmath.mpf:
        return c * mpmath.exp(c * p) if p == q else (
            mpmath.exp(c * p) - mpmath.exp(c * q)) / (p - q)

    def exact(a: float, b: float, c: float) -> mpmath.mpf:
        """By the recurrence, two distinct points outermost (at 50 digits the difference
        of nearly equal numbers keeps 30 and more)."""
        a, b, c = mpmath.mpf(a), mpmath.mpf(b), mpmath.mpf(c)
        zero = mpmath.mpf(0)
        if a == b == zero:
            return c**2 / 2
        p, q, r = (a, b, zero) if a != zero else (b, a, zero)
        if p == r:  # a == 0 too: then b != 0
            p, q, r = b, a, zero
        return (first(q, r, c) - first(p, q, c)) / (r - p)

    for i in range(x.size):
        reference = exact(x[i], y[i], t[i])
        assert abs(ours[i] - reference) <= 1e-13 * abs(reference), (x[i], y[i], t[i])


def test_what_does_not_apply_is_named():
    plain = expand_records(np.array([0.0, 7.0]), np.array([1, 0]), np.array([100.0, 0.0]))
    assert slopes_unsupported(Structure(2), plain) is None
    assert slopes_unsupported(Structure(1, depot=True), plain) == "a depot compartment"
    assert "dose modifiers" in slopes_unsupported(Structure(1), plain, {"F1": 1.0})
    reset = expand_records(np.array([0.0, 7.0]), np.array([1, 3]), np.array([100.0, 0.0]))
    assert "resets" in slopes_unsupported(Structure(1), reset)
    steady = expand_records(np.array([0.0, 7.0]), np.array([1, 0]), np.array([100.0, 0.0]),
                            ii=np.array([7.0, 0.0]), ss=np.array([1, 0]))
    assert "steady-state" in slopes_unsupported(Structure(1), steady)
    peripheral = expand_records(np.array([0.0, 7.0]), np.array([1, 0]),
                                np.array([100.0, 0.0]), cmt=np.array([2, 0]))
    assert "outside the central" in slopes_unsupported(Structure(2), peripheral)
    params = {"CL": np.ones((1, 2)), "V1": np.ones((1, 2))}
    # what one structure refuses is not held against another for the same records
    with pytest.raises(ValueError, match="do not apply: a depot"):
        central_amount_slopes(Structure(1, depot=True), plain, {**params, "KA": params["CL"]},
                              np.zeros((1, 2, 3, 1)), at=np.array([[1]]))
    amount, _ = central_amount_slopes(Structure(1), plain, params, np.zeros((1, 2, 2, 1)),
                                      at=np.array([[1]]))
    assert amount[0, 0] == pytest.approx(100.0 * np.exp(-7.0), rel=1e-14)
    with pytest.raises(ValueError, match="do not apply: resets"):
        central_amount_slopes(Structure(1), reset, params, np.zeros((1, 2, 2, 1)),
                              at=np.array([[1]]))

"""The exact engine against an ODE solver, NONMEM output, closed forms and PK properties."""

from __future__ import annotations

import dataclasses
import itertools
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ode_reference import Dose, Record, ode_amounts, ode_records
from strategies import EventCase, event_cases, log_uniform, pk_params, regimens

from pkmodel import engine
from pkmodel.data import validate
from pkmodel.engine import Structure, at_rows, expand_records, solve, stack_events
from pkmodel.predict import to_events

STRUCTURES = [(1, False), (2, False), (3, False), (1, True), (2, True), (3, True)]


def records_for(doses: list[Dose], obs_times: np.ndarray, use_dur: bool = False):
    """NONMEM-style records: each dose, then observations (file order at equal times)."""
    rows = []
    for d in doses:
        rate = d.amount / d.duration if d.duration > 0 and not use_dur else 0.0
        rows.append((d.time, 0, 1, d.amount, rate, d.duration if use_dur else 0.0, d.cmt))
    for t in obs_times:
        rows.append((float(t), 1, 0, 0.0, 0.0, 0.0, 0))
    rows.sort(key=lambda r: (r[0], r[1]))
    time, _, evid, amt, rate, dur, cmt = (np.array(c) for c in zip(*rows))
    return time, evid, amt, rate, dur, cmt


def assert_close_where_relevant(actual, expected, scale, rel=1e-8, floor=1e-6):
    """Relative agreement wherever an amount exceeds ``floor`` of ``scale`` (the amount
    dosed, which bounds every peak; below it the ODE's absolute tolerance dominates)."""
    relevant = np.abs(expected) > floor * scale
    err = np.abs(actual - expected) / np.where(relevant, np.abs(expected), 1.0)
    worst = np.max(np.where(relevant, err, 0.0))
    assert worst < rel, f"worst relative difference {worst:.3g}"


def total(doses: list[Dose]) -> float:
    return sum(d.amount for d in doses)


def engine_amounts(structure, doses, obs_times, params, use_dur=False):
    time, evid, amt, rate, dur, cmt = records_for(doses, obs_times, use_dur)
    ev = expand_records(time, evid, amt, rate=rate, dur=dur, cmt=cmt)
    amounts = solve(structure, ev, params)[0]
    return amounts[evid == 0]


@pytest.mark.parametrize("n_cmt,depot", STRUCTURES)
@given(data=st.data())
def test_matches_ode_for_any_regimen(n_cmt, depot, data):
    """Boluses and overlapping infusions in every compartment: engine == solve_ivp (LSODA,
    rtol 1e-12) to 1e-8 relative wherever an amount exceeds 1e-6 of its peak."""
    params = data.draw(pk_params(n_cmt, depot))
    doses = data.draw(regimens(n_cmt, depot))
    use_dur = data.draw(st.booleans())
    obs = np.linspace(0.0, 60.0, 41) + 0.0123
    got = engine_amounts(Structure(n_cmt, depot), doses, obs, params, use_dur)
    ref = ode_amounts([(0.0, params)], doses, obs, n_cmt=n_cmt, depot=depot)
    assert_close_where_relevant(got, ref, total(doses))


@pytest.mark.parametrize("n_cmt,depot", [(2, False), (3, True)])
@given(data=st.data())
def test_parameters_changing_between_records_match_ode(n_cmt, depot, data):
    """Parameters change at records (NOCB): each interval uses the next record's values,
    with each set's decompositions taken where its parameters change or at every entry."""
    structure = Structure(n_cmt, depot)
    doses = data.draw(regimens(n_cmt, depot))
    changes = sorted(data.draw(st.lists(st.floats(1.0, 50.0).map(lambda t: round(t, 2)),
                                        min_size=1, max_size=3, unique=True)))
    segments = [(0.0, data.draw(pk_params(n_cmt, depot)))]
    segments += [(c, data.draw(pk_params(n_cmt, depot))) for c in changes]
    obs = np.union1d(np.linspace(0.5, 60.0, 30), changes)
    time, evid, amt, rate, _, cmt = records_for(doses, obs)
    seg = np.maximum(np.searchsorted([s for s, _ in segments], time, side="left") - 1, 0)
    params = {name: np.array([segments[i][1][name] for i in seg])
              for name in structure.parameter_names}
    ref = ode_amounts(segments, doses, obs, n_cmt=n_cmt, depot=depot)
    for decompose_all in (0, engine._DECOMPOSE_ALL):  # decompositions shared, or all
        with mock.patch.object(engine, "_DECOMPOSE_ALL", decompose_all):
            got = solve(structure, expand_records(time, evid, amt, rate=rate, cmt=cmt),
                        params)[0]
        assert_close_where_relevant(got[evid == 0], ref, total(doses))


@given(params=pk_params(2, True), lag=st.floats(0.0, 5.0), f=st.floats(0.05, 1.0),
       rate=log_uniform(5.0, 500.0), into_depot=st.booleans())
def test_lag_and_bioavailability_match_shifted_scaled_doses(params, lag, f, rate, into_depot):
    """ALAG shifts and F scales a dose; with RATE fixed, F shortens the infusion (NONMEM)."""
    cmt = 1 if into_depot else 2
    time = np.array([0.0, 3.0] + list(np.linspace(0.25, 30.0, 25)))
    evid = np.array([1, 1] + [0] * 25)
    amt = np.array([100.0, 80.0] + [0.0] * 25)
    rates = np.array([0.0, rate] + [0.0] * 25)
    order = np.argsort(time, kind="stable")
    ev = expand_records(time[order], evid[order], amt[order], rate=rates[order],
                        cmt=np.full(27, cmt)[order])
    got = solve(Structure(2, depot=True), ev, {**params, f"F{cmt}": f, f"ALAG{cmt}": lag})[0]
    doses = [Dose(lag, cmt, f * 100.0), Dose(3.0 + lag, cmt, f * 80.0, f * 80.0 / rate)]
    obs = time[order][evid[order] == 0]
    ref = ode_amounts([(0.0, params)], doses, obs, n_cmt=2, depot=True)
    assert_close_where_relevant(got[evid[order] == 0], ref, total(doses))


def test_absorption_equal_to_elimination_is_exact():
    """KA == CL/V exactly (the flip-flop singularity): C = D KA t exp(-k t) / V, and a
    KA a hair away from it changes nothing beyond rounding."""
    cl, v = 2.0, 10.0
    k = cl / v
    t = np.array([0.0, 0.5, 1.0, 5.0, 20.0, 60.0])
    ev = expand_records(np.r_[0.0, t], np.r_[1, np.zeros(t.size)], np.r_[100.0, np.zeros(t.size)],
                        cmt=np.r_[1, np.full(t.size, 2)])
    exact = 100.0 * k * t * np.exp(-k * t)
    for ka in (k, k * (1 + 1e-12), k * (1 - 1e-9)):
        got = solve(Structure(1, depot=True), ev, {"CL": cl, "V1": v, "KA": ka})[0, 1:, 1]
        np.testing.assert_allclose(got, exact, rtol=1e-8, atol=1e-300)


def test_coincident_peripheral_eigenvalues_match_ode():
    """Two identical peripherals give a repeated eigenvalue: still exact."""
    params = {"CL": 0.3, "V1": 3.0, "Q": 0.5, "V2": 2.0, "Q3": 0.5, "V3": 2.0}
    doses = [Dose(0.0, 1, 400.0, 1.0 / 12), Dose(14.0, 2, 50.0)]
    obs = np.linspace(0.1, 60.0, 50)
    got = engine_amounts(Structure(3), doses, obs, params)
    ref = ode_amounts([(0.0, params)], doses, obs, n_cmt=3)
    assert_close_where_relevant(got, ref, total(doses))


@pytest.mark.parametrize("n_cmt,depot", STRUCTURES)
@given(data=st.data())
def test_steady_state_is_the_limit_of_repeated_doses(n_cmt, depot, data):
    """SS=1 equals the state after enough explicit doses (engine without SS), for boluses,
    infusions shorter and longer than II, and lag times longer than II."""
    structure = Structure(n_cmt, depot)
    params = data.draw(pk_params(n_cmt, depot))
    tau = data.draw(st.floats(0.5, 10.0))
    cmt = data.draw(st.integers(1, structure.n_states))
    duration = data.draw(st.one_of(st.just(0.0), st.floats(0.05, 25.0)))
    lag = data.draw(st.one_of(st.just(0.0), st.floats(0.0, 25.0)))
    rate = 100.0 / duration if duration else 0.0
    slow = min(structure_rates(params, n_cmt, depot))
    # 300 intervals reach steady state to exp(-30); a system too slow for that at the drawn
    # II gets a longer II instead, so that every example is checked.
    tau = max(tau, 30.0 / (300 * slow))
    ev_ss = expand_records([0.0, 0.3 * tau], [1, 0], [100.0, 0.0], rate=[rate, 0.0],
                           ii=[tau, 0.0], ss=[1, 0], cmt=[cmt, 0])
    n_doses = int(np.ceil(30.0 / (slow * tau))) + int(np.ceil((duration + lag) / tau)) + 1
    start = -n_doses * tau
    ev_many = expand_records([start, 0.0, 0.3 * tau], [1, 1, 0], [100.0, 100.0, 0.0],
                             rate=[rate, rate, 0.0], ii=[tau, 0.0, 0.0],
                             addl=[n_doses - 1, 0, 0], cmt=[cmt, cmt, 0])
    extra = {f"ALAG{cmt}": lag}
    got = solve(structure, ev_ss, {**params, **extra})[0, -1]
    ref = solve(structure, ev_many, {**params, **extra})[0, -1]
    np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-10 * np.abs(ref).max())


@pytest.mark.parametrize("n_cmt,depot", STRUCTURES)
@given(data=st.data())
def test_dose_response_matches_ode_and_steady_state_records(n_cmt, depot, data):
    """engine.dose_response (no records): one dose's central amount at times during and
    after it == solve_ivp (rtol 1e-12) to 1e-8; its steady-state troughs == an SS=1 dose
    record solved one interval on, to 1e-10; for two parameter sets at once."""
    structure = Structure(n_cmt, depot)
    sets = [data.draw(pk_params(n_cmt, depot)) for _ in range(2)]
    cmt = data.draw(st.integers(1, structure.n_states))
    duration = data.draw(st.one_of(st.just(0.0), st.floats(0.05, 3.0)))
    times = np.array([0.0, 0.5 * duration, duration, 1.3, 4.0, 17.5, 60.0])
    intervals = np.array([max(duration, 0.5), 3.0, 14.0]) + 0.25
    params = {k: np.array([p[k] for p in sets]) for k in sets[0]}
    single, steady = engine.dose_response(structure, params, cmt=cmt, duration=duration,
                                          times=times, intervals=intervals)
    central = structure.central_cmt - 1
    for s, p in enumerate(sets):
        ref = ode_amounts([(0.0, p)], [Dose(0.0, cmt, 1.0, duration)], times,
                          n_cmt=n_cmt, depot=depot)[:, central]
        assert_close_where_relevant(single[s], ref, 1.0)
        for i, tau in enumerate(intervals):
            ev = expand_records([0.0, tau], [1, 0], [1.0, 0.0],
                                rate=[1.0 / duration if duration else 0.0, 0.0],
                                ii=[tau, 0.0], ss=[1, 0], cmt=[cmt, 0])
            want = solve(structure, ev, p)[0, 1, central]
            assert steady[s, i] == pytest.approx(want, rel=1e-10, abs=1e-14)


def test_dose_response_refuses_what_it_cannot_answer():
    """Intervals shorter than the infusion, compartments the model lacks or not whole,
    non-finite durations and parameters of more than one value per set are refused (not
    flattened); CMT 0 is the first compartment, as in records, and 1.0 is 1."""
    params = {"CL": [1.0], "V1": [10.0]}

    def response(cmt=1, duration=0.5, values=params):
        return np.concatenate(engine.dose_response(Structure(1), values, cmt=cmt,
                                                   duration=duration, times=[1.0],
                                                   intervals=[1.0]))

    first = response()
    np.testing.assert_array_equal(response(cmt=0), first)
    np.testing.assert_array_equal(response(cmt=1.0), first)
    for change, message in (({"duration": 2.0}, "intervals"), ({"cmt": 2}, "cmt"),
                            ({"cmt": 1.5}, "whole compartment"),
                            ({"duration": np.nan}, "finite"),
                            ({"values": {"CL": np.ones((2, 3)), "V1": [10.0]}},
                             "one value per set")):
        with pytest.raises(ValueError, match=message):
            response(**change)


def structure_rates(params, n_cmt, depot):
    from ode_reference import rate_matrix

    return -np.linalg.eigvals(rate_matrix(params, n_cmt, depot)).real


def test_steady_state_one_compartment_closed_form():
    """1-cmt bolus every tau at SS: trough = D/V exp(-k tau) / (1 - exp(-k tau))."""
    cl, v, tau, dose = 0.4, 5.0, 14.0, 300.0
    ev = expand_records([0.0, tau], [1, 0], [dose, 0.0], ii=[tau, 0.0], ss=[1, 0])
    got = solve(Structure(1), ev, {"CL": cl, "V1": v})[0, :, 0] / v
    k = cl / v
    trough = dose / v * np.exp(-k * tau) / (1 - np.exp(-k * tau))
    np.testing.assert_allclose(got, [trough + dose / v, trough], rtol=1e-13)


@pytest.mark.parametrize("n_cmt,depot", STRUCTURES)
@given(data=st.data())
def test_linear_in_dose_and_superposition(n_cmt, depot, data):
    """Amounts scale with every AMT, and regimen A + B gives amounts(A) + amounts(B)."""
    structure = Structure(n_cmt, depot)
    params = data.draw(pk_params(n_cmt, depot))
    first = data.draw(regimens(n_cmt, depot))
    second = data.draw(regimens(n_cmt, depot))
    scale = data.draw(log_uniform(0.01, 100.0))
    obs = np.linspace(0.0, 60.0, 25) + 0.01
    a = engine_amounts(structure, first, obs, params)
    b = engine_amounts(structure, second, obs, params)
    both = engine_amounts(structure, sorted(first + second, key=lambda d: d.time), obs, params)
    scaled = engine_amounts(structure, [Dose(d.time, d.cmt, d.amount * scale, d.duration)
                                        for d in first], obs, params)
    tol = 1e-12 * max(np.abs(both).max(), 1e-300)
    np.testing.assert_allclose(both, a + b, rtol=1e-10, atol=tol)
    np.testing.assert_allclose(scaled, scale * a, rtol=1e-10, atol=1e-12 * scale * np.abs(a).max())
    assert np.all(a >= -1e-12 * np.abs(a).max())
    before = obs < min(d.time for d in first)
    assert np.all(a[before] == 0.0)


@pytest.mark.parametrize("n_cmt,depot", STRUCTURES)
@settings(max_examples=15)
@given(data=st.data())
def test_auc_of_a_single_dose_is_f_dose_over_cl(n_cmt, depot, data):
    """AUC(0-inf) of the central concentration = F * dose / CL (mass balance), by
    Gauss-Legendre quadrature of the engine's profile on a geometric grid."""
    structure = Structure(n_cmt, depot)
    params = data.draw(pk_params(n_cmt, depot))
    f = data.draw(st.floats(0.1, 1.0))
    duration = data.draw(st.one_of(st.just(0.0), st.floats(0.01, 2.0)))
    slowest = min(structure_rates(params, n_cmt, depot))
    fastest = max(structure_rates(params, n_cmt, depot))
    edges = np.unique(np.r_[0.0, duration, np.geomspace(1e-4 / fastest, 60.0 / slowest, 400)])
    nodes, weights = np.polynomial.legendre.leggauss(8)
    mid, half = (edges[1:] + edges[:-1]) / 2, (edges[1:] - edges[:-1]) / 2
    t = (mid[:, None] + half[:, None] * nodes[None, :]).ravel()
    w = (half[:, None] * weights[None, :]).ravel()
    cmt = structure.central_cmt - int(depot) if data.draw(st.booleans()) else 1
    rate = 1000.0 / duration * f if duration else 0.0  # F shortens a fixed-rate infusion
    ev = expand_records(np.r_[0.0, t], np.r_[1, np.zeros(t.size)], np.r_[1000.0, np.zeros(t.size)],
                        rate=np.r_[rate, np.zeros(t.size)], cmt=np.r_[cmt, np.zeros(t.size)])
    amounts = solve(structure, ev, {**params, f"F{cmt}": f})[0, 1:, int(depot)]
    auc = np.sum(w * amounts / params["V1"])
    np.testing.assert_allclose(auc, f * 1000.0 / params["CL"], rtol=1e-7)


def test_batched_profiles_equal_separate_solves():
    """IDs of different lengths stacked with padding give the same amounts as one by one."""
    a = expand_records([0.0, 1.0, 5.0], [1, 0, 0], [100.0, 0, 0], rate=[200.0, 0, 0])
    b = expand_records([0.0, 2.0], [1, 0], [50.0, 0], ii=[1.0, 0], addl=[3, 0], row_offset=3)
    pa = {"CL": 1.0, "V1": 5.0, "Q": 2.0, "V2": 8.0}
    pb = {"CL": 3.0, "V1": 7.0, "Q": 1.0, "V2": 4.0}
    batch = stack_events([a, b])
    params = {k: np.array([[pa[k]], [pb[k]]]) for k in pa}
    together = solve(Structure(2), batch, params)
    alone_a = solve(Structure(2), a, pa)[0]
    alone_b = solve(Structure(2), b, pb)[0]
    np.testing.assert_allclose(together[0, :3], alone_a, rtol=1e-14)
    np.testing.assert_allclose(together[1, : alone_b.shape[0]], alone_b, rtol=1e-14)


def test_many_parameter_sets_in_one_call_equal_one_at_a_time():
    """Vectorised over parameter sets (axis 0): each row equals its own solve. 600 sets:
    the modal transforms of a large batch are written out, of one set an einsum."""
    rng = np.random.default_rng(1)
    ev = expand_records([0.0, 0.5, 14.0, 20.0], [1, 0, 1, 0], [300.0, 0, 300.0, 0],
                        rate=[3600.0, 0, 3600.0, 0])
    params = {"CL": 0.3 * np.exp(rng.normal(0, 0.3, (600, 1))), "V1": 3.0, "Q": 0.1,
              "V2": 1.5 * np.exp(rng.normal(0, 0.5, (600, 1)))}
    together = solve(Structure(2), ev, params)
    for i in (0, 17, 599):
        one = solve(Structure(2), ev, {k: np.asarray(v)[i] if np.ndim(v) else v
                                       for k, v in params.items()})
        np.testing.assert_allclose(together[i], one[0], rtol=1e-14)


def test_selected_profiles_take_their_inputs_from_the_parent():
    """engine.select_profiles: a selection of profiles solved with the doses, steady states
    and schedule taken from its parent's equals the same profiles built afresh (1e-13),
    with infusions, an SS dose, a reset and ADDL doses among them, for two sets each."""
    a = expand_records([0.0, 1.0, 5.0], [1, 0, 0], [100.0, 0.0, 0.0], rate=[50.0, 0.0, 0.0],
                       ii=[2.0, 0.0, 0.0], ss=[1, 0, 0])
    b = expand_records([0.0, 2.0, 3.0, 6.0], [1, 0, 3, 0], [80.0, 0.0, 0.0, 0.0],
                       row_offset=3)
    c = expand_records([0.0, 9.0], [1, 0], [60.0, 0.0], ii=[3.0, 0.0], addl=[2, 0],
                       row_offset=7)
    parent = stack_events([a, b, c])
    rng = np.random.default_rng(2)
    params = {k: rng.uniform(0.5, 2.0, (6, 1)) for k in ("CL", "V1", "Q", "V2")}
    solve(Structure(2), parent, params)  # builds the parent's inputs
    rows = np.array([2, 0])
    picked = {k: v.reshape(3, 2)[rows].reshape(4, 1) for k, v in params.items()}
    selected = engine.select_profiles(parent, rows)
    afresh = engine.Events(**{name: getattr(parent, name)[rows] for name in (
        "time", "evid", "amt", "rate", "dur", "ii", "ss", "cmt", "param_row", "source_row")})
    np.testing.assert_allclose(solve(Structure(2), selected, picked),
                               solve(Structure(2), afresh, picked), rtol=1e-13, atol=1e-13)
    assert engine._SELECTED[id(selected)][1]() is parent
    rows[:] = [1, 1]  # the caller's array changing after does not change the selection
    np.testing.assert_allclose(solve(Structure(2), selected, picked),
                               solve(Structure(2), afresh, picked), rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="not a mask"):
        engine.select_profiles(parent, np.array([True, False, True]))
    assert engine.select_profiles(parent, []).shape == (0, parent.shape[1])


def test_sets_changing_in_step_equal_their_own_solves():
    """Many sets of one profile whose parameters all change at the same records (the
    draws of a posterior, each with its own occasion values) are decomposed by changed
    record (engine._changes_in_step): each equals its own solve to 1e-13; a batch in which
    one set equals its group's first set at a change takes the other way, with the same
    result."""
    rng = np.random.default_rng(11)
    ev = expand_records([0.0, 3.0, 7.0, 7.0, 10.0, 14.0, 20.0], [1, 0, 0, 1, 0, 1, 0],
                        [100.0, 0, 0, 100.0, 0, 100.0, 0], rate=[50.0, 0, 0, 0, 0, 50.0, 0])
    occasion = np.array([0, 0, 1, 1, 1, 2, 2])
    n = 3000  # over _DECOMPOSE_ALL entries
    params = {k: rng.uniform(0.5, 2.0, (n, 3))[:, occasion] for k in ("CL", "V1", "Q", "V2")}
    fresh = np.ones((n, 7), dtype=bool)
    fresh[:, 1:] = np.any([v[:, 1:] != v[:, :-1] for v in params.values()], axis=0)
    changes = fresh.any(axis=0)
    assert engine._changes_in_step(params, fresh, changes, n)
    together = solve(Structure(2), ev, params)
    tied = {k: v.copy() for k, v in params.items()}
    for v in tied.values():
        v[1, 2:5] = v[0, 2:5]  # set 1 equals set 0 at its second occasion
    fresh_tied = np.ones((n, 7), dtype=bool)
    fresh_tied[:, 1:] = np.any([v[:, 1:] != v[:, :-1] for v in tied.values()], axis=0)
    assert not engine._changes_in_step(tied, fresh_tied, changes, n)
    other = solve(Structure(2), ev, tied)
    for s in (0, 1, 2, 1234, n - 1):
        alone = solve(Structure(2), ev, {k: v[s] for k, v in params.items()})
        np.testing.assert_allclose(together[s], alone[0], rtol=1e-13, atol=1e-12)
        alone = solve(Structure(2), ev, {k: v[s] for k, v in tied.items()})
        np.testing.assert_allclose(other[s], alone[0], rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("decompose_all", [0, 2048])
def test_sets_sharing_a_profile_equal_their_own_solves_where_parameters_coincide(
        decompose_all, monkeypatch):
    """Sets sharing an event profile (a finite-difference stencil around a centre) take
    the first set's decomposition wherever their parameters equal its parameters there:
    each set still equals its own solve (to rounding), whether it equals the first set
    everywhere, from one record on, up to one record, or at one occasion only, also where
    the first set's own parameters do not change there. The same when the batch is small
    enough for every entry to be decomposed (_DECOMPOSE_ALL)."""
    monkeypatch.setattr(engine, "_DECOMPOSE_ALL", decompose_all)
    rng = np.random.default_rng(5)
    a = expand_records([0.0, 3.0, 7.0, 7.0, 10.0, 14.0, 20.0], [1, 0, 0, 1, 0, 1, 0],
                       [100.0, 0, 0, 100.0, 0, 100.0, 0], rate=[50.0, 0, 0, 0, 0, 50.0, 0])
    b = expand_records([0.0, 5.0, 5.0, 9.0], [1, 0, 1, 0], [80.0, 0, 80.0, 0], row_offset=7)
    events = stack_events([a, b])
    n_rec = events.shape[1]
    occasion = np.array([0, 0, 1, 1, 1, 2, 2])
    lead = {k: rng.uniform(0.5, 2.0, (2, 1, 3)) for k in ("CL", "V1", "Q", "V2")}
    for v in lead.values():  # the second profile's first set constant: fresh at record 0
        v[1] = v[1, :, :1]
    per_set = {k: np.repeat(v, 5, axis=1).copy() for k, v in lead.items()}  # 2 x 5 sets
    per_set["CL"][:, 1, 1] *= 1.1  # one occasion differs
    per_set["CL"][:, 2, 0] *= 0.9  # differs up to record 2, then equals the first set
    per_set["V2"][:, 3, 1:] *= 1.2  # equals the first set up to record 2, then differs
    per_set["Q"][:, 4] *= 1.3  # differs throughout
    params = {k: v[..., occasion].reshape(10, n_rec) for k, v in per_set.items()}
    together = solve(Structure(2), events, params)
    fresh = np.ones((10, n_rec), dtype=bool)  # where a set's parameters change
    fresh[:, 1:] = np.any([v[:, 1:] != v[:, :-1] for v in params.values()], axis=0)
    _, decomposed = engine._latest_decomposition(fresh, params, 5)
    # occasions start at records 0, 2 and 5: the first profile's sets change at all three
    # (10 of 15 entries decomposed); the second's first set at record 0 only, the others
    # where they differ from it (set 1 at 2, set 2 at 0, set 3 at 2, set 4 at 0)
    assert fresh[:5].sum() == 15 and decomposed.size == (3 + 1 + 1 + 2 + 3) + 5
    for s in range(10):
        ev_s = (a, b)[s // 5]
        alone = solve(Structure(2), ev_s, {k: v[s, :ev_s.shape[1]] for k, v in params.items()})
        np.testing.assert_allclose(together[s, :ev_s.shape[1]], alone[0], rtol=1e-13,
                                   atol=1e-15)


def test_reset_ends_infusion_and_state():
    """EVID 3 empties every compartment and stops the infusion in progress."""
    ev = expand_records([0.0, 1.0, 1.0, 3.0], [1, 0, 3, 0], [100.0, 0, 0, 0], rate=[10.0, 0, 0, 0])
    amounts = solve(Structure(1), ev, {"CL": 1.0, "V1": 10.0})[0, :, 0]
    assert amounts[1] > 0
    assert amounts[2] == 0.0 and amounts[3] == 0.0


def test_missing_parameter_is_named():
    ev = expand_records([0.0], [1], [100.0])
    with pytest.raises(ValueError, match=r"\['V2'\]"):
        solve(Structure(2), ev, {"CL": 1.0, "V1": 2.0, "Q": 1.0})
    with pytest.raises(ValueError, match="D1"):
        solve(Structure(1), expand_records([0.0], [1], [100.0], rate=[-2.0]),
              {"CL": 1.0, "V1": 2.0})


# ------------------------------------------- NONMEM event semantics against closed forms
# One compartment, CL = 0.5 L/day, V = 5 L: k = CL / V = 0.1 /day. A bolus D leaves
# D exp(-k t); an infusion at rate r for T days leaves (r / k)(1 - exp(-k T)) at its end;
# doses every tau at steady state sum a geometric series, sum_m q^m = 1 / (1 - q).

ONE_CMT = {"CL": 0.5, "V1": 5.0}
K = 0.1


def one_cmt(records: list[tuple], before_events: bool = False, **modifiers) -> np.ndarray:
    """Amounts (mg) at each original record of a one-compartment profile; ``records``
    holds (TIME, EVID, AMT, RATE, II, ADDL, SS) tuples in file order."""
    time, evid, amt, rate, ii, addl, ss = (np.array(c, dtype=float) for c in zip(*records))
    ev = expand_records(time, evid, amt, rate=rate, ii=ii, addl=addl, ss=ss)
    amounts = solve(Structure(1), ev, {**ONE_CMT, **modifiers}, before_events=before_events)
    return at_rows(ev, amounts[..., 0], len(records))[0]


def test_records_at_one_time_are_processed_in_file_order():
    """An infusion ends, a sample, a bolus, a sample, an infusion starts and a sample, all
    at day 2 (docs/data.md, Order): the first sample is the pre-dose trough, the second
    sees the bolus, the third equals it (an infusion adds nothing at its start)."""
    records = [(0.0, 1, 100.0, 50.0, 0, 0, 0),  # 2-day infusion ending at day 2
               (2.0, 0, 0, 0, 0, 0, 0),
               (2.0, 1, 100.0, 0, 0, 0, 0),
               (2.0, 0, 0, 0, 0, 0, 0),
               (2.0, 1, 60.0, 30.0, 0, 0, 0),  # 2-day infusion from day 2
               (2.0, 0, 0, 0, 0, 0, 0),
               (4.0, 0, 0, 0, 0, 0, 0)]
    trough = 50.0 / K * (1 - np.exp(-2 * K))
    day4 = (trough + 100.0) * np.exp(-2 * K) + 30.0 / K * (1 - np.exp(-2 * K))
    got = one_cmt(records)
    np.testing.assert_allclose(got[1:], [trough, trough + 100.0, trough + 100.0,
                                         trough + 100.0, trough + 100.0, day4], rtol=1e-12)
    before = one_cmt(records, before_events=True)  # just before each record's own events
    np.testing.assert_allclose(before[[2, 4]], [trough, trough + 100.0], rtol=1e-12)


def test_additional_dose_at_a_reset_time_is_given_before_the_reset():
    """docs/data.md: ADDL doses come before any record at the same time, and a reset
    cancels the ADDL doses not yet given. 100 mg at day 0 with II 7, ADDL 2; at day 7 a
    sample, then an SS=1 dose (II 7). The day-7 sample sees both doses,
    100 exp(-7k) + 100; after the SS=1 dose the amount is the steady-state peak
    100 / (1 - exp(-7k)); the ADDL dose of day 14 is cancelled, so day 15 is that peak
    times exp(-8k). (Before the fix the day-7 sample lost the ADDL dose: 14.44 mg/L
    instead of 44.47 in the xu2012 reproducer, and deleting the later row changed it.)"""
    records = [(0.0, 1, 100.0, 0, 7.0, 2, 0),
               (7.0, 0, 0, 0, 0, 0, 0),
               (7.0, 1, 100.0, 0, 7.0, 0, 1),
               (7.0, 0, 0, 0, 0, 0, 0),
               (15.0, 0, 0, 0, 0, 0, 0)]
    peak = 100.0 / (1 - np.exp(-7 * K))
    np.testing.assert_allclose(one_cmt(records)[1:],
                               [100.0 * np.exp(-7 * K) + 100.0, peak, peak, peak * np.exp(-8 * K)],
                               rtol=1e-12)
    # The same with EVID 3 at day 3 cancelling the rest of a q3d ADDL series.
    records = [(0.0, 1, 100.0, 0, 3.0, 2, 0),
               (3.0, 0, 0, 0, 0, 0, 0),
               (3.0, 3, 0, 0, 0, 0, 0),
               (3.0, 0, 0, 0, 0, 0, 0),
               (7.0, 0, 0, 0, 0, 0, 0)]
    np.testing.assert_allclose(one_cmt(records)[1:], [100.0 * np.exp(-3 * K) + 100.0, 0, 0, 0],
                               rtol=1e-12, atol=0)


def test_ss2_adds_the_steady_state_and_ss1_replaces_the_state():
    """200 mg at day 0, then 100 mg every 4 days at steady state from day 3. At steady
    state just after a bolus the amount is 100 / (1 - exp(-4k)) (geometric series); SS=2
    adds it to the 200 exp(-3k) already there, SS=1 resets first (docs/data.md)."""
    peak = 100.0 / (1 - np.exp(-4 * K))
    for ss, expected in ((2, 200.0 * np.exp(-3 * K) + peak), (1, peak)):
        records = [(0.0, 1, 200.0, 0, 0, 0, 0),
                   (3.0, 1, 100.0, 0, 4.0, 0, ss),
                   (5.0, 0, 0, 0, 0, 0, 0)]
        got = one_cmt(records)
        np.testing.assert_allclose(got[1:], [expected, expected * np.exp(-2 * K)], rtol=1e-12)
        before = one_cmt(records, before_events=True)[1]
        np.testing.assert_allclose(before, 200.0 * np.exp(-3 * K), rtol=1e-12)


def test_steady_state_of_infusions_shorter_and_longer_than_the_interval():
    """Infusions at r = 20 mg/day every tau = 4 days. A single infusion of T days leaves
    a(t) = (r/k)(1 - exp(-k min(t, T))) exp(-k max(t - T, 0)); at steady state, s days after
    a dose starts, the amount is sum_{m>=0} a(s + m tau):
    T = 1: at s = 0, (r/k)(1 - e^{-kT}) e^{-k(tau-T)} / (1 - e^{-k tau}); at s = T,
    (r/k)(1 - e^{-kT}) / (1 - e^{-k tau}).
    T = 6 > tau: at s = 0, a(4) + sum_{m>=2} = (r/k)[(1 - e^{-4k}) + (1 - e^{-6k}) e^{-2k} /
    (1 - e^{-4k})]; at s = 1, (r/k)[(1 - e^{-k}) + (1 - e^{-5k}) + (1 - e^{-6k}) e^{-3k} /
    (1 - e^{-4k})] (the previous dose still runs until s = 2)."""
    r, tau = 20.0, 4.0
    q = np.exp(-K * tau)
    for duration, expected in (
        (1.0, [r / K * (1 - np.exp(-K)) * np.exp(-3 * K) / (1 - q),
               r / K * (1 - np.exp(-K)) / (1 - q)]),
        (6.0, [r / K * ((1 - np.exp(-4 * K)) + (1 - np.exp(-6 * K)) * np.exp(-2 * K) / (1 - q)),
               r / K * ((1 - np.exp(-K)) + (1 - np.exp(-5 * K))
                        + (1 - np.exp(-6 * K)) * np.exp(-3 * K) / (1 - q))]),
    ):
        records = [(10.0, 1, r * duration, r, tau, 0, 1),
                   (10.0 + 1.0, 0, 0, 0, 0, 0, 0)]
        np.testing.assert_allclose(one_cmt(records), expected, rtol=1e-12)


def test_steady_state_of_a_constant_infusion_then_off():
    """SS=1, AMT=0, RATE=r: the state starts at the infusion's steady state r / k and the
    infusion is then off (docs/data.md), so two days later it is (r / k) exp(-2k)."""
    got = one_cmt([(0.0, 1, 0.0, 20.0, 0, 0, 1), (2.0, 0, 0, 0, 0, 0, 0)])
    np.testing.assert_allclose(got, [20.0 / K, 20.0 / K * np.exp(-2 * K)], rtol=1e-12)


@pytest.mark.parametrize("cmt", [1, 2])
def test_constant_steady_state_infusion_with_a_depot_is_the_closed_form(cmt):
    """SS=1, AMT=0, RATE=r into the depot (CMT 1) or the central compartment (CMT 2) of a
    two-compartment oral model: at steady state the depot holds r/ka (or nothing), the
    central r/k10 and the peripheral r/k10 * k12/k21 (no net flow between them); then
    the infusion is off and the amounts decay as the ODE reference says."""
    ka, cl, v1, q, v2, r = 1.3, 2.0, 10.0, 1.5, 25.0, 40.0
    params = {"KA": np.array([[ka]]), "CL": np.array([[cl]]), "V1": np.array([[v1]]),
              "Q": np.array([[q]]), "V2": np.array([[v2]])}
    structure = Structure(2, depot=True)
    ev = expand_records(np.array([0.0, 0.0, 3.0]), np.array([1.0, 0.0, 0.0]),
                        np.array([0.0, 0.0, 0.0]), rate=np.array([r, 0.0, 0.0]),
                        ss=np.array([1.0, 0.0, 0.0]), cmt=np.array([cmt, 0, 0]))
    amounts = solve(structure, ev, params)[0]  # (records, compartments)
    got = np.stack([at_rows(ev, amounts[None, :, c], 3)[0] for c in range(3)], axis=1)
    k10, k12, k21 = cl / v1, q / v1, q / v2
    start = np.array([r / ka if cmt == 1 else 0.0, r / k10, r / k10 * k12 / k21])
    np.testing.assert_allclose(got[1], start, rtol=1e-12)
    later = ode_amounts([(0.0, {k: float(v[0, 0]) for k, v in params.items()})], [],
                        np.array([3.0]), n_cmt=2, depot=True, initial=start)[0]
    np.testing.assert_allclose(got[2], later, rtol=1e-7)


def test_evid3_and_evid4_reset_the_state_and_cancel_what_is_pending():
    """docs/data.md, Resets: EVID 3 empties the system, ends infusions in progress and
    cancels ADDL doses not yet given and lagged doses not yet arrived; EVID 4 does the same,
    then doses."""
    # 100 mg q2d (ADDL at days 2, 4, 6) and 10 mg/day from day 1 to 6; EVID 3 at day 3.
    records = [(0.0, 1, 100.0, 0, 2.0, 3, 0),
               (1.0, 1, 50.0, 10.0, 0, 0, 0),
               (3.0, 0, 0, 0, 0, 0, 0),
               (3.0, 3, 0, 0, 0, 0, 0),
               (5.0, 0, 0, 0, 0, 0, 0),
               (6.0, 4, 80.0, 0, 0, 0, 0),
               (8.0, 0, 0, 0, 0, 0, 0)]
    day3 = 100.0 * np.exp(-3 * K) + 100.0 * np.exp(-K) + 10.0 / K * (1 - np.exp(-2 * K))
    np.testing.assert_allclose(one_cmt(records)[2:],
                               [day3, 0.0, 0.0, 80.0, 80.0 * np.exp(-2 * K)], rtol=1e-12, atol=0)
    # EVID 4 during a 10-day infusion stops it: only the new bolus remains.
    records = [(0.0, 1, 100.0, 10.0, 0, 0, 0), (4.0, 4, 50.0, 0, 0, 0, 0),
               (6.0, 0, 0, 0, 0, 0, 0)]
    np.testing.assert_allclose(one_cmt(records)[1:], [50.0, 50.0 * np.exp(-2 * K)], rtol=1e-12)
    np.testing.assert_allclose(one_cmt(records, before_events=True)[1],
                               10.0 / K * (1 - np.exp(-4 * K)), rtol=1e-12)
    # With ALAG1 = 2 days: the day-0 dose (due at day 2) is cancelled by EVID 3 at day 1;
    # the EVID 4 dose of day 4 arrives at day 6.
    records = [(0.0, 1, 100.0, 0, 0, 0, 0), (1.0, 3, 0, 0, 0, 0, 0), (3.0, 0, 0, 0, 0, 0, 0),
               (4.0, 4, 100.0, 0, 0, 0, 0), (5.0, 0, 0, 0, 0, 0, 0), (7.0, 0, 0, 0, 0, 0, 0)]
    np.testing.assert_allclose(one_cmt(records, ALAG1=2.0)[2:],
                               [0.0, 0.0, 0.0, 100.0 * np.exp(-K)], rtol=1e-12, atol=0)


def test_bioavailability_scales_a_bolus_and_shortens_a_fixed_rate_infusion():
    """F1 = 0.5 (docs/data.md, Infusions): a 100-mg bolus gives 50 mg; 100 mg at RATE 25
    lasts F AMT / RATE = 2 days, leaving (25 / k)(1 - exp(-2k)) at its end."""
    got = one_cmt([(0.0, 1, 100.0, 0, 0, 0, 0), (0.0, 1, 100.0, 25.0, 0, 0, 0),
                   (2.0, 0, 0, 0, 0, 0, 0)], F1=0.5)
    np.testing.assert_allclose(got[2], 50.0 * np.exp(-2 * K) + 25.0 / K * (1 - np.exp(-2 * K)),
                               rtol=1e-12)


# ------------------------------------------------------ event records: Hypothesis properties


def case_events(structure: Structure, case, *, covariates: str = "nocb", row_offset: int = 0,
                dose_scale=None):
    """``expand_records`` of an :class:`EventCase` (AMT and RATE times ``dose_scale``) and
    its parameters per record as predict passes them (through ``param_row``), with F and
    ALAG."""
    records = case.records
    scale = np.ones(len(records)) if dose_scale is None else np.asarray(dose_scale)
    cols = {n: np.array([getattr(r, n) for r in records], dtype=float)
            for n in ("time", "evid", "amt", "rate", "dur", "ii", "addl", "ss", "cmt")}
    ev = expand_records(cols["time"], cols["evid"], cols["amt"] * scale,
                        rate=cols["rate"] * scale, dur=cols["dur"], ii=cols["ii"],
                        addl=cols["addl"], ss=cols["ss"], cmt=cols["cmt"],
                        covariates=covariates, row_offset=row_offset)
    per_row = {n: np.array([p[n] for p in case.params]) for n in structure.parameter_names}
    params = {n: v[ev.param_row - row_offset] for n, v in per_row.items()}
    params.update({f"F{c}": np.full(ev.shape, v) for c, v in case.f.items()})
    params.update({f"ALAG{c}": np.full(ev.shape, v) for c, v in case.lag.items()})
    return ev, params


def engine_records(structure: Structure, case, *, covariates: str = "nocb",
                   before_events: bool = False, dose_scale=None) -> np.ndarray:
    """Amounts (mg) at each record of an :class:`EventCase`, ``(n_records, n_states)``."""
    ev, params = case_events(structure, case, covariates=covariates, dose_scale=dose_scale)
    amounts = solve(structure, ev, params, before_events=before_events)
    return np.stack([at_rows(ev, amounts[..., s], len(case.records))[0]
                     for s in range(structure.n_states)], axis=-1)


@pytest.mark.parametrize("n_cmt,depot", STRUCTURES)
@given(data=st.data())
def test_event_records_match_an_ode_interpreter_of_nonmem_rules(n_cmt, depot, data):
    """SS=1/2, ADDL, EVID 3/4, F, ALAG, infusions by RATE and DUR (some longer than II),
    parameters changing between records (NOCB or LOCF) and records at equal times in any
    file order: the engine equals ode_reference.ode_records (an event-by-event interpreter
    of docs/data.md integrating the ODEs with solve_ivp, steady states as the fixed point
    of the one-interval map) after and just before each record's events, to 1e-8 relative
    wherever an amount exceeds 1e-6 of the largest; smaller ones agree absolutely. Both
    ways of decomposing (where each set's parameters change, or at every entry)."""
    case = data.draw(event_cases(n_cmt, depot))
    covariates = data.draw(st.sampled_from(["nocb", "locf"]))
    structure = Structure(n_cmt, depot)
    ref_before, ref_after = ode_records(case.records, case.params, n_cmt=n_cmt, depot=depot,
                                        f=case.f, lag=case.lag, covariates=covariates)
    for (before_events, ref), decompose_all in itertools.product(
            ((False, ref_after), (True, ref_before)), (0, engine._DECOMPOSE_ALL)):
        with mock.patch.object(engine, "_DECOMPOSE_ALL", decompose_all):
            got = engine_records(structure, case, covariates=covariates,
                                 before_events=before_events)
        scale = max(np.abs(ref).max(), case.total_amount)
        assert_close_where_relevant(got, ref, scale)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9 * scale)


@pytest.mark.parametrize("n_cmt,depot", STRUCTURES)
@given(data=st.data())
def test_dense_samples_between_doses_match_an_ode_interpreter(n_cmt, depot, data):
    """A dense grid of samples after the doses (runs of records no input reaches, each
    run decayed freely in one step), the parameters changing at one sample within the
    grid (which ends a run), NOCB or LOCF: the engine equals ode_reference.ode_records
    after and just before each record's events, as above, also with a long run decayed
    in steps of two records (_DECAY_CHUNK); the runs are found."""
    structure = Structure(n_cmt, depot)
    cmt = data.draw(st.sampled_from([1, 2])) if depot else 1  # the depot or the central
    amount, hours = data.draw(log_uniform(10.0, 1000.0)), data.draw(st.sampled_from([0, 2]))
    rate = amount / (hours / 24) if hours and not (depot and cmt == 1) else 0.0
    drawn = data.draw(st.lists(st.floats(0.01, 24.0).map(lambda t: round(t, 3)),
                               max_size=30))
    times = sorted(set(drawn) | set(np.linspace(25.0, 30.0, 10)))  # after both doses
    second = data.draw(st.floats(2.0, 20.0).map(lambda t: round(t, 2)))
    records = sorted([Record(0.0, 1, amount, rate, cmt=cmt), Record(second, 1, amount, rate,
                                                                    cmt=cmt)]
                     + [Record(t, 0) for t in times], key=lambda r: (r.time, r.evid == 0))
    change = data.draw(st.integers(0, len(records) - 1))
    first, later = data.draw(pk_params(n_cmt, depot)), data.draw(pk_params(n_cmt, depot))
    params = [first if i < change else later for i in range(len(records))]
    case = EventCase(records, params, {}, {})
    covariates = data.draw(st.sampled_from(["nocb", "locf"]))
    ev, per_record = case_events(structure, case, covariates=covariates)
    ref_before, ref_after = ode_records(records, params, n_cmt=n_cmt, depot=depot,
                                        covariates=covariates)
    for (before_events, ref), chunk in itertools.product(
            ((False, ref_after), (True, ref_before)), (engine._DECAY_CHUNK, 1)):
        with mock.patch.object(engine, "_DECAY_CHUNK", chunk):  # 1: two records a step
            got = engine_records(structure, case, covariates=covariates,
                                 before_events=before_events)
        scale = max(np.abs(ref).max(), case.total_amount)
        assert_close_where_relevant(got, ref, scale)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9 * scale)
    _, changes = engine._modes_per_record(
        structure, {k: per_record[k] for k in structure.parameter_names})
    inputs, ss_specs, reset = engine._build_inputs(
        structure, {k: np.asarray(getattr(ev, k)) for k in engine._RECORD_FIELDS}, {}, 1,
        ev.shape[1])
    schedule = engine._schedule(inputs, ev.time, ev.shape[1])
    runs = engine._free_runs(schedule, reset.any(axis=0), ss_specs, changes,
                             covariates == "locf") - np.arange(ev.shape[1])
    assert runs.max() >= 5  # the ten samples after both doses: one or two runs


@pytest.mark.parametrize("n_cmt,depot", STRUCTURES)
@given(data=st.data())
def test_event_records_are_linear_in_the_doses(n_cmt, depot, data):
    """Splitting every dose (AMT and RATE alike, so durations stay) into shares w and
    1 - w gives amounts that add up to the whole; scaling them all by c scales every
    amount by c. Resets, SS=1 and SS=2, ADDL, F and lag are linear maps of the doses."""
    case = data.draw(event_cases(n_cmt, depot))
    n = len(case.records)
    share = np.array(data.draw(st.lists(st.floats(0.05, 0.95), min_size=n, max_size=n)))
    c = data.draw(log_uniform(0.01, 100.0))
    structure = Structure(n_cmt, depot)
    whole = engine_records(structure, case)
    part = engine_records(structure, case, dose_scale=share)
    rest = engine_records(structure, case, dose_scale=1 - share)
    scaled = engine_records(structure, case, dose_scale=np.full(n, c))
    tol = 1e-12 * max(np.abs(whole).max(), case.total_amount)
    np.testing.assert_allclose(part + rest, whole, rtol=1e-10, atol=tol)
    np.testing.assert_allclose(scaled, c * whole, rtol=1e-10, atol=c * tol)
    assert np.all(whole >= -tol)


@pytest.mark.parametrize("n_cmt,depot", STRUCTURES)
@given(data=st.data())
def test_a_record_changes_no_value_before_it(n_cmt, depot, data):
    """Records are processed in file order, so deleting the records from the i-th on
    leaves the amounts at the earlier ones unchanged: checked at a drawn i and at every
    reset (EVID 3/4, SS=1), whose cancelling of ADDL doses must not reach back (the bug
    of an ADDL dose at a reset's time, lost by the samples before the reset)."""
    case = data.draw(event_cases(n_cmt, depot))
    structure = Structure(n_cmt, depot)
    covariates = data.draw(st.sampled_from(["nocb", "locf"]))
    whole = engine_records(structure, case, covariates=covariates)
    resets = [i for i, r in enumerate(case.records)
              if r.evid in (3, 4) or (r.evid == 1 and r.ss == 1)]
    for keep in {data.draw(st.integers(1, len(case.records))), *resets} - {0}:
        head = dataclasses.replace(case, records=case.records[:keep], params=case.params[:keep])
        np.testing.assert_allclose(engine_records(structure, head, covariates=covariates),
                                   whole[:keep], rtol=1e-12, atol=1e-15 * case.total_amount)


# ----------------------------------------------------------------- NONMEM reference outputs


def test_nonmem_dosing_event_scenarios(validation_dir):
    """All 29 scenarios of mrgsolve's nmtests (NONMEM 7.5 simulation, 5 significant digits):
    ADVAN2, CL 1.1 L/h, V 20 L, KA 1.5/h; F2, ALAG2, R2, D2 act on compartment 2 only."""
    raw = pd.read_csv(validation_dir / "mrgsolve_nmtests_dosing_events_nonmem.csv")
    table = validate(raw.rename(columns=str.upper).drop(columns=["NONMEM_CP"]))
    structure = Structure(1, depot=True)
    events = to_events(table, structure)
    row = events.param_row
    params = {"CL": 1.1, "V1": 20.0, "KA": 1.5, "ALAG2": table["LAGT"].to_numpy()[row],
              "F2": table["BIOAV"].to_numpy()[row], "R2": table["RAT2"].to_numpy()[row],
              "D2": table["DUR2"].to_numpy()[row]}
    amounts = solve(structure, events, params)
    cp = at_rows(events, amounts[..., 1] / 20.0 * 1000.0, len(table))
    ref = raw["NONMEM_CP"].to_numpy()
    assert np.all(np.isfinite(cp))
    rel = np.abs(cp - ref) / np.maximum(np.abs(ref), 1e-3)
    worst = raw.assign(REL=rel).groupby("ID")["REL"].max()
    assert worst.max() < 1e-4, worst[worst >= 1e-4].to_dict()
    assert raw["ID"].nunique() == 29


def _wojciechowski(validation_dir, covariates):
    data = pd.read_csv(validation_dir / "infliximab_wojciechowski_nonmem_map_data.csv",
                       na_values=".")
    phi = pd.read_csv(validation_dir / "infliximab_wojciechowski_nonmem_map_phi.csv")
    ipred = pd.read_csv(validation_dir / "infliximab_wojciechowski_nonmem_map_ipred.csv")
    table = validate(data, covariates=["WT", "ALB", "ADA"])
    events = to_events(table, Structure(2), covariates=covariates)
    eta = phi.set_index("ID").loc[table["ID"], ["ETA1", "ETA2", "ETA3", "ETA4"]].to_numpy()
    wt, alb, ada = (table[c].to_numpy() for c in ("WT", "ALB", "ADA"))
    # Xu/Mould 2012 model as coded by Wojciechowski et al. (AAPS J 2017;19:1136),
    # shared/reference/infliximab_models.md section C; D1 = 2 h.
    per_row = {
        "CL": 0.294 * (wt / 70) ** 0.614 * (alb / 4) ** -1.17 * (1 + 0.257 * ada) * np.exp(eta[:, 0]),
        "V1": 3.33 * (wt / 70) ** 0.691 * np.exp(eta[:, 1]),
        "Q": 0.0719 * (wt / 70) ** 1.10 * np.exp(eta[:, 2]),
        "V2": 1.14 * (wt / 70) ** 0.59 * np.exp(eta[:, 3]),
        "D1": np.full(len(table), 2.0 / 24.0),
    }
    params = {k: v[events.param_row] for k, v in per_row.items()}
    amounts = solve(Structure(2), events, params)
    conc = at_rows(events, amounts[..., 0] / params["V1"], len(table))
    observed = table["MDV"].to_numpy() == 0
    return conc[observed], ipred["NONMEM_IPRED"].to_numpy()


def test_infliximab_ipred_at_nonmem_etas(validation_dir):
    """NONMEM 7.3 IPRED (5 significant digits) of 100 patients at their POSTHOC ETAs:
    all 300 observations within 1e-4 relative with NOCB covariates."""
    got, ref = _wojciechowski(validation_dir, "nocb")
    assert got.shape == (300,)
    np.testing.assert_allclose(got, ref, rtol=1e-4)


def test_locf_covariates_do_not_reproduce_nonmem(validation_dir):
    """Carrying the time-varying ADA forward instead moves some IPRED by more than 20 %."""
    got, ref = _wojciechowski(validation_dir, "locf")
    assert np.max(np.abs(got / ref - 1)) > 0.2


@pytest.mark.parametrize("n_cmt,depot", STRUCTURES)
@settings(max_examples=15)
@given(data=st.data())
def test_single_bolus_matches_a_40_digit_matrix_exponential(n_cmt, depot, data):
    """Exact reference: mpmath's matrix exponential at 40 digits (sympy's mpmath), for any
    structure, including stiff and nearly coincident cases: the issue's bar, 1e-8 relative
    wherever an amount exceeds 1e-6 of the dose. (Typical agreement is 1e-15; small early
    amounts in compartments the bolus did not enter are differences of modal terms and
    carry rounding of about 1e-16 of the dose, up to 1e-9 of their value.)"""
    import mpmath
    from ode_reference import rate_matrix

    params = data.draw(pk_params(n_cmt, depot))
    structure = Structure(n_cmt, depot)
    cmt = data.draw(st.integers(1, structure.n_states))
    times = np.array([0.01, 0.5, 3.0, 12.0, 40.0])
    ev = expand_records(np.r_[0.0, times], np.r_[1, np.zeros(times.size)],
                        np.r_[100.0, np.zeros(times.size)], cmt=np.r_[cmt, np.zeros(times.size)])
    got = solve(structure, ev, params)[0, 1:]
    mpmath.mp.dps = 40
    k = mpmath.matrix(rate_matrix(params, n_cmt, depot).tolist())
    start = mpmath.matrix([100.0 if i == cmt - 1 else 0.0 for i in range(structure.n_states)])
    exact = np.array([[float(v) for v in mpmath.expm(k * mpmath.mpf(t)) * start]
                      for t in times])
    relevant = np.abs(exact) > 1e-6 * 100.0
    err = np.abs(got - exact) / np.where(relevant, np.abs(exact), 1.0)
    assert np.max(np.where(relevant, err, 0.0)) < 1e-8


@pytest.mark.parametrize("n_cmt,depot", STRUCTURES)
@settings(max_examples=20)
@given(data=st.data())
def test_parameter_sets_solved_together_equal_one_at_a_time(n_cmt, depot, data):
    """Vectorised solves find the records where parameters change across all sets at once:
    sets that change at different records (one constant, one changing, on one profile;
    two profiles of different lengths stacked with padding) give what each gives alone."""
    structure = Structure(n_cmt, depot)
    first, second = data.draw(event_cases(n_cmt, depot)), data.draw(event_cases(n_cmt, depot))
    ev, changing = case_events(structure, first)
    constant = {n: np.full_like(v, v[0, 0]) if n in structure.parameter_names else v
                for n, v in changing.items()}
    both = {n: np.concatenate([constant[n], v]) if n in structure.parameter_names
            else v for n, v in changing.items()}
    together = solve(structure, ev, both)
    for i, alone in enumerate((constant, changing)):
        ref = solve(structure, ev, alone)[0]
        np.testing.assert_allclose(together[i], ref, rtol=1e-12,
                                   atol=1e-14 * max(np.abs(ref).max(), first.total_amount))
    parts = [case_events(structure, first),
             case_events(structure, second, row_offset=len(first.records))]
    stacked = stack_events([p[0] for p in parts])
    width = stacked.shape[1]

    def padded(v):  # per-record values of one profile, padded to the stacked width
        return np.concatenate([v, np.repeat(v[:, -1:], width - v.shape[1], axis=1)], axis=1)

    params = {n: np.concatenate([padded(p[1][n]) for p in parts]) for n in parts[0][1]}
    together = solve(structure, stacked, params)
    for i, (ev_i, params_i) in enumerate(parts):
        alone = solve(structure, ev_i, params_i)[0]
        scale = max(np.abs(alone).max(), (first, second)[i].total_amount)
        np.testing.assert_allclose(together[i, : alone.shape[0]], alone, rtol=1e-12,
                                   atol=1e-14 * scale)


def test_central_amounts_takes_the_cheaper_of_superposition_and_solve():
    """Twenty daily boluses, then two samples: superposed (20 doses x 22 records of one
    set, against a loop of 21 steps); one infusion, then 300 samples: solved (the samples
    are one free decay, where superposing pairs the dose with each of them). Either way
    the amounts are solve's."""
    params = {"CL": np.array([[0.5]]), "V1": np.array([[5.0]]), "Q": np.array([[0.3]]),
              "V2": np.array([[8.0]])}
    boluses = expand_records(np.r_[np.arange(20.0), 20.5, 21.0], np.r_[np.ones(20), 0, 0],
                             np.r_[np.full(20, 100.0), 0, 0])
    samples = np.linspace(1.0, 60.0, 300)
    infusion = expand_records(np.r_[0.0, samples], np.r_[1, np.zeros(300)],
                              np.r_[500.0, np.zeros(300)], rate=np.r_[1000.0, np.zeros(300)])
    refuse = {"side_effect": AssertionError("not the cheaper path")}
    for events, avoided in ((boluses, "solve"), (infusion, "_superpose")):
        expected = solve(Structure(2), events, params)[..., 0]
        with mock.patch.object(engine, avoided, **refuse):
            got = engine.central_amounts(Structure(2), events, params)
        np.testing.assert_allclose(got, expected, rtol=1e-12)


def superposable(case):
    """The case without what superposition cannot do: SS records become plain doses,
    EVID 4 EVID 1, EVID 3 resets are dropped, no F or ALAG, one parameter set throughout."""
    records = [dataclasses.replace(r, ss=0, evid=1 if r.evid == 4 else r.evid)
               for r in case.records if r.evid != 3]
    return dataclasses.replace(case, records=records, params=[case.params[0]] * len(records),
                               f={}, lag={})


def assert_superposed_as_solved(structure: Structure, ev, data, total_amount: float
                                ) -> tuple[dict, dict]:
    """One to three parameter sets (drawn) sharing ``ev``: central_amounts made to
    superpose, without calling solve, equals solve's central amounts after and just
    before each record's events, to 1e-10 of the largest amount; returns the sets and
    those amounts by ``before_events``."""
    n_cmt, depot = structure.n_compartments, structure.depot
    sets = [data.draw(pk_params(n_cmt, depot)) for _ in range(data.draw(st.integers(1, 3)))]
    many = {n: np.array([[p[n]] for p in sets]) * np.ones((1, ev.shape[1]))
            for n in structure.parameter_names}
    central = structure.central_cmt - 1
    got = {}
    for before_events in (False, True):
        expected = solve(structure, ev, many, before_events=before_events)[..., central]
        with mock.patch.object(engine, "solve", side_effect=AssertionError("solve called")), \
                mock.patch.object(engine, "_superposition_cheaper", return_value=True):
            got[before_events] = engine.central_amounts(structure, ev, many,
                                                        before_events=before_events)
        scale = max(np.abs(expected).max(), total_amount)
        np.testing.assert_allclose(got[before_events], expected, rtol=0, atol=1e-10 * scale)
    return many, got


@pytest.mark.parametrize("n_cmt,depot", STRUCTURES)
@given(data=st.data())
def test_superposition_equals_the_record_by_record_solver(n_cmt, depot, data):
    """central_amounts sums each dose's closed-form response when parameters are constant
    and there is no SS, reset or modifier: it equals solve's central amounts (after and
    just before each record's events) to 1e-10 of the largest amount, for several
    parameter sets sharing one profile, without calling solve (made to superpose), at
    every record or at the records asked for; with a modifier it is solve's."""
    case = superposable(data.draw(event_cases(n_cmt, depot)))
    structure = Structure(n_cmt, depot)
    ev, _ = case_events(structure, case)
    many, got = assert_superposed_as_solved(structure, ev, data, case.total_amount)
    central = structure.central_cmt - 1
    for before_events in (False, True):
        at = np.array([data.draw(st.lists(st.integers(0, ev.shape[1] - 1), min_size=1,
                                          max_size=4))])
        with mock.patch.object(engine, "solve", side_effect=AssertionError("solve called")), \
                mock.patch.object(engine, "_superposition_cheaper", return_value=True):
            some = engine.central_amounts(structure, ev, many, before_events=before_events,
                                          at=at)
        np.testing.assert_allclose(some, got[before_events][:, at[0]], rtol=1e-13,
                                   atol=1e-300)
    with_f = {**many, "F1": np.full(ev.shape, 0.5)}
    full = solve(structure, ev, with_f)[..., central]
    np.testing.assert_allclose(engine.central_amounts(structure, ev, with_f), full, rtol=1e-15)
    np.testing.assert_allclose(engine.central_amounts(structure, ev, with_f, at=np.array([[0]])),
                               full[:, [0]], rtol=1e-15)


@pytest.mark.parametrize("n_cmt,depot", STRUCTURES)
@given(data=st.data())
def test_a_steady_state_first_dose_is_superposed_as_the_solver_gives_it(n_cmt, depot, data):
    """A profile opening with a steady-state dose (SS=1, a bolus or an infusion no longer
    than its II, into a disposition compartment) is still superposed: its earlier doses
    summed per mode as a geometric series. Equal to solve's central amounts after and just
    before each record's events (1e-10 of the largest amount), without calling solve; a
    steady state the series does not cover (an infusion longer than II, SS=2, into the
    depot, or after another dose) is solve's."""
    case = superposable(data.draw(event_cases(n_cmt, depot)))
    structure = Structure(n_cmt, depot)
    first = min((r for r in case.records if r.evid == 1), key=lambda r: r.time)
    length = data.draw(st.sampled_from([0.0, 0.5, 2.0]))
    ii = data.draw(st.sampled_from([1.0, 3.5, 7.0])) + length
    opening = dataclasses.replace(first, time=first.time - 1.0, ss=1, ii=ii, addl=0,
                                  rate=first.amt / length if length else 0.0, dur=0.0,
                                  cmt=data.draw(st.integers(int(depot) + 1,
                                                            structure.n_states)))
    steady = dataclasses.replace(case, records=[opening, *case.records],
                                 params=[case.params[0], *case.params])
    ev, _ = case_events(structure, steady)
    assert_superposed_as_solved(structure, ev, data, steady.total_amount)
    later = case.records[-1].time + 1.0
    for records in ([dataclasses.replace(opening, ss=2), *case.records],
                    [dataclasses.replace(opening, rate=opening.amt / (ii + 1.0)), *case.records],
                    [*case.records, dataclasses.replace(opening, time=later)],
                    [dataclasses.replace(opening, cmt=1), *case.records] if depot else None):
        if records is not None:
            ev, _ = case_events(structure, dataclasses.replace(steady, records=records))
            assert not engine._superposable_ss(structure, ev)


@pytest.mark.parametrize("n_cmt,depot", STRUCTURES)
@given(data=st.data())
def test_one_events_object_solved_again_under_other_parameters(n_cmt, depot, data):
    """solve keeps what it builds from the records of an Events object (doses, steady
    states, resets, schedule) for the next call on the same object: solving it again
    under other parameters, and for another number of sets, equals solving a fresh copy."""
    case = data.draw(event_cases(n_cmt, depot))
    case = dataclasses.replace(case, f={}, lag={})
    structure = Structure(n_cmt, depot)
    ev, params = case_events(structure, case)
    solve(structure, ev, params)  # builds and keeps
    other = [data.draw(pk_params(n_cmt, depot)) for _ in range(2)]
    again = {n: np.array([[p[n]] for p in other]) * np.ones((1, ev.shape[1]))
             for n in structure.parameter_names}
    fresh = dataclasses.replace(ev)  # another object with the same records
    for before_events in (False, True):
        np.testing.assert_array_equal(solve(structure, ev, again, before_events=before_events),
                                      solve(structure, fresh, again,
                                            before_events=before_events))


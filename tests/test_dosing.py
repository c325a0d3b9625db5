"""Dose optimisation: the clinical rule, safety gates and the criterion, against oracles.

The oracle: troughs recomputed with ``predict()`` on the history plus each candidate
regimen written dose by dose (and a long run of the regimen alone for the steady state),
for the MAP and for posterior draws taken with the same seed, so that the criterion
("at every trough, the share of draws at or above the target is at least the required
probability") and the rule are checked outside the code that applies them.
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pkmodel.data import infliximab_regimen, read_nonmem
from pkmodel.dosing import (
    dose_for_target_trough,
    interval_for_target_trough,
    recommend_regimen,
    time_to_trough,
)
from pkmodel.errors import DatasetError
from pkmodel.estimate import estimate_map, sample_posterior
from pkmodel.models import load
from pkmodel.predict import predict

MODEL = load("fasanmade2011")
COVARIATES = {"ALB": 3.3, "ATI": 0, "IMM": 1}
STEADY_DOSES = 80  # a run of 80 intervals of >= 4 weeks: far past 10 half-lives


def child(troughs=(1.1, 0.8), weight=28.0, days=(98.0, 154.0), **covariates) -> pd.DataFrame:
    """Label induction, 5 mg/kg every 8 weeks, troughs measured on ``days`` (mg/L)."""
    table = infliximab_regimen(weight, until_week=22, covariates={**COVARIATES, **covariates})
    if troughs is not None:
        measured = (table["EVID"] == 0) & table["TIME"].isin(list(days))
        table.loc[measured, "MDV"] = 0
        table.loc[measured, "DV"] = list(troughs)
    return table


def _regimen_rows(dose: float, weeks: float, start: float, n_doses: int,
                  trough_count: int) -> pd.DataFrame:
    tau = 7.0 * weeks
    rows = []
    for k in range(n_doses + 1):
        t = start + k * tau
        if 0 < k <= trough_count:
            rows.append({"TIME": t, "EVID": 0, "AMT": 0.0, "RATE": 0.0, "MDV": 1})
        if k < n_doses:
            rows.append({"TIME": t, "EVID": 1, "AMT": dose, "RATE": dose * 12.0, "MDV": 1})
    return pd.DataFrame(rows)


def oracle_troughs(history: pd.DataFrame, eta: np.ndarray | None, dose: float, weeks: float,
                   start: float, horizon_weeks: float = 52.0) -> np.ndarray:
    """``(n_sets, K + 1)``: the trough before each new dose over the horizon and the steady
    state, by ``predict`` on explicit doses (2-h infusions), one ID per ETA set."""
    n = max(1, int(np.floor(horizon_weeks / weeks + 1e-9)))
    sets = np.zeros((1, len(MODEL.eta_names))) if eta is None else np.atleast_2d(eta)
    last = history.iloc[-1]
    future = _regimen_rows(dose, weeks, start, n, n)
    steady = _regimen_rows(dose, weeks, 0.0, STEADY_DOSES, STEADY_DOSES)
    tables, alone = [], []
    for i in range(len(sets)):
        part = pd.concat([history, future], ignore_index=True).assign(ID=i)
        for name in ("CMT", "WT", *COVARIATES):
            part[name] = part[name].fillna(last[name])
        tables.append(part)
        alone.append(steady.assign(ID=i, CMT=1, WT=last["WT"],
                                   **{c: last[c] for c in COVARIATES}))
    eta_frame = pd.DataFrame(sets, columns=list(MODEL.eta_names)).assign(ID=range(len(sets)))
    out = predict(MODEL, pd.concat(tables, ignore_index=True), eta_frame)
    coming = out[(out["TIME"] > start) & (out["EVID"] == 0)]
    troughs = coming["IPRED"].to_numpy().reshape(len(sets), n)
    ss = predict(MODEL, pd.concat(alone, ignore_index=True), eta_frame)
    ss = ss[ss["EVID"] == 0].groupby("ID")["IPRED"].last().to_numpy()
    return np.column_stack([troughs, ss])


def meets(troughs: np.ndarray, target: float, probability: float | None) -> bool:
    """The criterion written out: row 0 is the MAP, the others the draws."""
    if probability is None:
        return bool(np.all(troughs[0] >= target))
    share = np.mean(troughs[1:] >= target, axis=0)
    return bool(np.all(share >= probability))


def posterior_sets(history: pd.DataFrame, n_draws: int, seed: int) -> np.ndarray:
    """MAP then the posterior draws recommend_regimen uses (same seed)."""
    fit = estimate_map(MODEL, history)
    draws = sample_posterior(MODEL, history, n=n_draws, seed=seed, estimate=fit).draws
    names = list(MODEL.eta_names)
    return np.vstack([fit.individuals[names].to_numpy(), draws[names].to_numpy()])


# --------------------------------------------------------------------------- the rule


def test_patient_on_target_continues_and_less_drug_is_reported_apart():
    """62 kg, 5 mg/kg every 8 weeks, troughs 20 and 18 mg/L: clearly on target."""
    history = child((20.0, 18.0), weight=62.0, ALB=4.1)
    rec = recommend_regimen(MODEL, history, 6.0, n_draws=0)
    assert rec.action == "continue" and rec.status == "ok"
    assert rec.recommended == rec.current
    assert rec.recommended.dose_mg == 310.0 and rec.recommended.interval_weeks == 8.0
    assert rec.dose_only is None and rec.interval_only is None
    assert rec.message.startswith("Continue 310 mg")
    eta = rec.estimate.individuals[list(MODEL.eta_names)].to_numpy()
    assert oracle_troughs(history, eta, 310.0, 8.0, 154.0).min() >= 6.0
    for option in (rec.reduce_dose, rec.extend_interval):
        assert option is not None and option.mg_per_kg_per_week < rec.current.mg_per_kg_per_week
        troughs = oracle_troughs(history, eta, option.dose_mg, option.interval_weeks, 154.0)
        assert troughs.min() >= 6.0
    # one vial less at 8 weeks, or one week longer at 310 mg, misses (least, longest)
    less = oracle_troughs(history, eta, rec.reduce_dose.dose_mg - 100.0, 8.0, 154.0)
    assert rec.reduce_dose.dose_mg == 100.0 or less.min() < 6.0
    later = rec.extend_interval.interval_weeks + 1
    assert later > 12 or oracle_troughs(history, eta, 310.0, later, 154.0).min() < 6.0


def test_narrowly_on_target_continues_without_a_lower_dose_offered():
    """Troughs 9.7 and 8.7 mg/L at 62 kg: the current 310 mg every 8 weeks keeps the lowest
    coming trough at 6.07 mg/L, 300 mg would not (6.07 x 300/310 = 5.87 < 6), so it
    continues and no lower dose is offered (never the current dose itself)."""
    history = child((9.7, 8.7), weight=62.0, ALB=4.1)
    rec = recommend_regimen(MODEL, history, 6.0, n_draws=0)
    assert rec.action == "continue" and rec.recommended == rec.current
    assert 6.0 <= rec.current.lowest_trough < 6.0 * 310.0 / 300.0
    assert rec.reduce_dose is None and rec.extend_interval is None
    assert "already meets the target" in rec.message


def test_each_objective_states_its_rule_and_the_objectives_differ():
    """The default child misses the target and no single change suffices: the clinical rule
    changes both (300 mg every 4 weeks, least drug), least_drug says so in its own words,
    fewest_infusions takes the longest interval (500 mg every 6 weeks); an unattainable
    target under fewest_infusions is said, not raised."""
    history = child()
    rules = {"smallest_change": "no change of dose alone or of interval alone meets it within "
                                "the limits, so both change: the least drug per week that does",
             "least_drug": "this is the least drug per week that meets it (objective "
                           "least_drug)",
             "fewest_infusions": "this is the longest interval that meets it, at its least "
                                 "dose (objective fewest_infusions)"}
    chosen = {}
    for objective, rule in rules.items():
        rec = recommend_regimen(MODEL, history, 6.0, n_draws=0, objective=objective)
        assert rule in rec.message, objective
        chosen[objective] = (rec.recommended.dose_mg, rec.recommended.interval_weeks)
    assert chosen["smallest_change"] == chosen["least_drug"] == (300.0, 4.0)
    assert chosen["fewest_infusions"] == (500.0, 6.0)
    none = recommend_regimen(MODEL, history, 200.0, n_draws=0, objective="fewest_infusions")
    assert none.action == "unattainable" and none.recommended is None


def test_a_smaller_increase_wins_even_when_both_are_large():
    """60 kg, week-22 trough 4.5 mg/L: 600 mg every 8 weeks adds 100 % drug per week, 300 mg
    every 5 weeks 60 %: the interval change is chosen (drug per week compared to 1e-9, not
    rounded to whole multiples)."""
    history = child((4.5,), weight=60.0, days=(154.0,), ALB=4.0, IMM=0)
    rec = recommend_regimen(MODEL, history, 6.0, n_draws=0)
    assert rec.dose_only.change_in_drug_per_week == pytest.approx(1.0)
    assert rec.interval_only.change_in_drug_per_week == pytest.approx(0.6)
    assert (rec.recommended.dose_mg, rec.recommended.interval_weeks) == (300.0, 5.0)


def test_fewest_infusions_may_keep_the_current_regimen_and_says_continue():
    """Narrowly on target at 310 mg every 8 weeks: no longer interval meets the target, so
    fewest_infusions keeps the current regimen, and that is a 'continue', not a change."""
    history = child((9.7, 8.7), weight=62.0, ALB=4.1)
    rec = recommend_regimen(MODEL, history, 6.0, n_draws=0, objective="fewest_infusions")
    assert (rec.recommended.dose_mg, rec.recommended.interval_weeks) == (310.0, 8.0)
    assert rec.action == "continue"


@pytest.mark.parametrize("n_draws, probability", [(1, 0.5), (60, 0.5), (60, 0.8)])
def test_lowest_trough_is_the_order_statistic_of_the_draws(n_draws, probability):
    """The recommended regimen's LOWEST_TROUGH is, over its troughs, the lowest value that
    a share `probability` of the posterior draws reach or exceed: the ceil(p n)-th largest,
    computed here from predict() on the same seeded draws (one draw: that draw)."""
    history = child()
    rec = recommend_regimen(MODEL, history, 6.0, probability=probability, n_draws=n_draws,
                            seed=6)
    option = rec.recommended or rec.closest
    sets = posterior_sets(history, n_draws, 6)
    troughs = oracle_troughs(history, sets, option.dose_mg, option.interval_weeks, 154.0)
    draws = troughs[1:]
    k = math.ceil(probability * len(draws) - 1e-9)
    level = np.sort(draws, axis=0)[::-1][k - 1]
    assert option.lowest_trough == pytest.approx(level.min(), rel=1e-6)
    assert option.lowest_trough_map == pytest.approx(troughs[0].min(), rel=1e-6)
    words = ("the posterior median of every trough" if probability == 0.5 else
             f"at least {probability:.0%} of posterior draws")
    assert words in rec.message


def test_other_objectives_may_leave_the_current_regimen():
    history = child((20.0, 18.0), weight=62.0, ALB=4.1)
    least = recommend_regimen(MODEL, history, 6.0, n_draws=0, objective="least_drug")
    assert least.recommended.mg_per_kg_per_week < least.current.mg_per_kg_per_week
    assert least.action == "change"
    fewest = recommend_regimen(MODEL, history, 6.0, n_draws=0, objective="fewest_infusions")
    assert fewest.recommended.interval_weeks == 8.0  # the longest candidate (4-8 weeks)
    eta = fewest.estimate.individuals[list(MODEL.eta_names)].to_numpy()
    less = oracle_troughs(history, eta, fewest.recommended.dose_mg - 100.0, 8.0, 154.0)
    assert fewest.recommended.dose_mg == 100.0 or less.min() < 6.0


def brute_force_single_changes(history, sets, target, probability, doses, weeks, d0, w0,
                               start):
    """Every dose-only and interval-only candidate judged by the oracle."""
    dose_ok = {d: meets(oracle_troughs(history, sets, d, w0, start), target, probability)
               for d in doses if d > d0}
    interval_ok = {w: meets(oracle_troughs(history, sets, d0, w, start), target, probability)
                   for w in weeks if w < w0}
    dose_only = min((d for d, ok in dose_ok.items() if ok), default=None)
    interval_only = max((w for w, ok in interval_ok.items() if ok), default=None)
    return dose_only, interval_only


@pytest.mark.parametrize("probability", [0.5, 0.8])
def test_45_kg_patient_gets_the_smaller_single_change(probability):
    """45 kg, 225 mg every 8 weeks, week-22 trough 5.2 mg/L: the interval change alone
    (the Kang 2026 rule) adds less drug than the dose change alone."""
    history = child((5.2,), weight=45.0, days=(154.0,), ALB=4.0, IMM=0)
    n_draws, seed = 150, 3
    rec = recommend_regimen(MODEL, history, 6.0, probability=probability, n_draws=n_draws,
                            seed=seed)
    sets = posterior_sets(history, n_draws, seed)
    dose_only, interval_only = brute_force_single_changes(
        history, sets, 6.0, probability, 100.0 * np.arange(1, 10), (4, 5, 6, 7), 225.0, 8.0,
        154.0)
    assert rec.dose_only is not None and rec.dose_only.dose_mg == dose_only
    assert rec.interval_only is not None and rec.interval_only.interval_weeks == interval_only
    rises = {"dose": dose_only / 225.0 - 1.0, "interval": 8.0 / interval_only - 1.0}
    expected = min(rises, key=lambda k: (rises[k], k != "dose"))
    chosen = rec.recommended
    assert rec.action == "change"
    if expected == "interval":
        assert (chosen.dose_mg, chosen.interval_weeks) == (225.0, interval_only)
    else:
        assert (chosen.dose_mg, chosen.interval_weeks) == (dose_only, 8.0)
    assert chosen.change_in_drug_per_week == pytest.approx(rises[expected], rel=1e-9)
    assert "smallest single change" in rec.message


def test_equal_single_changes_go_to_fewer_infusions():
    """Dose only 400 mg q8w and interval only 200 mg q4w both double the drug per week:
    the tie goes to the dose change (half the infusions). With 200-mg steps and intervals
    of 4 or 8 weeks the target is set from the oracle's troughs so that these two options
    meet it and the only cheaper one does not; least_drug then ties them too."""
    history = child((3.0, 2.5), weight=40.0)
    history.loc[history["EVID"] == 1, ["AMT", "RATE"]] = [200.0, 2400.0]
    eta = estimate_map(MODEL, history).individuals[list(MODEL.eta_names)].to_numpy()
    cheaper = ((200.0, 8.0),)  # the only option under 50 mg/week with 200-mg steps
    low = {(d, w): oracle_troughs(history, eta, d, w, 154.0).min()
           for d, w in ((400.0, 8.0), (200.0, 4.0), *cheaper)}
    target = min(low[(400.0, 8.0)], low[(200.0, 4.0)]) - 1e-6
    assert max(low[c] for c in cheaper) < target  # the set-up holds
    rec = recommend_regimen(MODEL, history, target, n_draws=0, vial_mg=200.0,
                            intervals_weeks=(4, 8))
    assert rec.dose_only.dose_mg == 400.0 and rec.interval_only.interval_weeks == 4.0
    assert (rec.recommended.dose_mg, rec.recommended.interval_weeks) == (400.0, 8.0)
    # The least drug per week is 50 mg/week either way: the tie goes to the longer interval.
    least = recommend_regimen(MODEL, history, target, n_draws=0, vial_mg=200.0,
                              intervals_weeks=(4, 8), objective="least_drug")
    assert (least.recommended.dose_mg, least.recommended.interval_weeks) == (400.0, 8.0)


def test_combined_change_only_when_no_single_change_works():
    """The example child needs more than 20 mg/kg every 8 weeks and more than every 4
    weeks at 140 mg: both change, the least drug per week (checked on the whole grid)."""
    history = child()
    rec = recommend_regimen(MODEL, history, 6.0, n_draws=0)
    eta = rec.estimate.individuals[list(MODEL.eta_names)].to_numpy()
    assert rec.dose_only is None and rec.interval_only is None
    assert oracle_troughs(history, eta, 500.0, 8.0, 154.0).min() < 6.0  # 20 mg/kg = 560
    assert oracle_troughs(history, eta, 140.0, 4.0, 154.0).min() < 6.0
    feasible = [(d / 28.0 / w, -w, d, w) for w in (4, 5, 6, 7, 8) for d in range(100, 600, 100)
                if oracle_troughs(history, eta, d, w, 154.0).min() >= 6.0]
    _, _, dose, weeks = min(feasible)
    assert (rec.recommended.dose_mg, rec.recommended.interval_weeks) == (dose, weeks)
    assert "both change" in rec.message and rec.recommended.above_label


def test_criterion_uses_the_share_of_draws_at_every_trough():
    """At probability 0.8 the recommended option has >= 80 % of draws on target at every
    trough and one vial less has not (draws recomputed with the same seed)."""
    history = child()
    rec = recommend_regimen(MODEL, history, 5.0, probability=0.8, n_draws=200, seed=5)
    sets = posterior_sets(history, 200, 5)
    chosen = rec.recommended
    troughs = oracle_troughs(history, sets, chosen.dose_mg, chosen.interval_weeks, 154.0)
    assert meets(troughs, 5.0, 0.8)
    less = oracle_troughs(history, sets, chosen.dose_mg - 100.0, chosen.interval_weeks, 154.0)
    assert not meets(less, 5.0, 0.8)
    share = np.mean(troughs[1:] >= 5.0, axis=0)
    assert chosen.lowest_trough >= 5.0 and share.min() >= 0.8
    assert chosen.pta == pytest.approx(np.mean(np.all(troughs[1:] >= 5.0, axis=1)), abs=1e-12)
    median = recommend_regimen(MODEL, history, 5.0, n_draws=200, seed=5).recommended
    assert chosen.mg_per_kg_per_week > median.mg_per_kg_per_week


@pytest.mark.parametrize("late", [{}, {"ALB": 2.9, "WT": 31.0}])
def test_every_option_and_steady_state_match_the_oracle(late):
    """Each interval's forecast (troughs over the horizon and at steady state) at the MAP
    equals predict() on explicit doses, for every candidate interval and the current one;
    also when albumin and weight changed at the last visit (they hold from there on)."""
    history = child()
    for name, value in late.items():
        history.loc[history["TIME"] >= 150.0, name] = value
    rec = recommend_regimen(MODEL, history, 6.0, n_draws=0)
    eta = rec.estimate.individuals[list(MODEL.eta_names)].to_numpy()
    table = rec.options[rec.options["DOSE_MG"] == 300.0]
    assert sorted(table["INTERVAL_WEEKS"]) == [4.0, 5.0, 6.0, 7.0, 8.0]
    for weeks, low in zip(table["INTERVAL_WEEKS"], table["LOWEST_TROUGH_MAP"]):
        assert low == pytest.approx(oracle_troughs(history, eta, 300.0, weeks, 154.0).min(),
                                    rel=1e-6)
    expected = oracle_troughs(history, eta, 140.0, 8.0, 154.0)[0]
    assert rec.current_troughs["MAP"].to_numpy() == pytest.approx(expected, rel=1e-6)


def test_new_doses_go_where_the_history_s_doses_went():
    """A model with a depot whose doses enter the central compartment (CMT 2) forecasts as
    the same model without one: every option and trough equal, new doses included."""
    import sympy as sp

    from pkmodel.engine import Structure
    from pkmodel.model import PopulationModel, ResidualError

    eta = sp.symbols("ETA_CL ETA_V")

    def model(depot: bool) -> PopulationModel:
        parameters = {"CL": 0.3 * sp.exp(eta[0]), "V1": 4.0 * sp.exp(eta[1])}  # L/day, L
        if depot:
            parameters["KA"] = sp.Float(0.5)
        return PopulationModel("onecpt", Structure(1, depot=depot), {}, parameters,
                               [[0.09, 0.0], [0.0, 0.04]], ("ETA_CL", "ETA_V"),
                               ResidualError(proportional=0.2))

    def history(cmt: int) -> pd.DataFrame:  # 300 mg over 2 h every 8 weeks, a trough
        return pd.DataFrame({"ID": 1, "TIME": [0.0, 56.0, 112.0, 112.0],
                             "AMT": [300.0, 300.0, 0.0, 300.0],
                             "RATE": [3600.0, 3600.0, 0.0, 3600.0], "EVID": [1, 1, 0, 1],
                             "CMT": [cmt, cmt, 0, cmt], "MDV": [1, 1, 0, 1],
                             "DV": [np.nan, np.nan, 4.0, np.nan], "WT": 30.0})

    central = recommend_regimen(model(True), history(2), 6.0, n_draws=0)
    alone = recommend_regimen(model(False), history(1), 6.0, n_draws=0)
    pd.testing.assert_frame_equal(central.options, alone.options, rtol=1e-9)
    pd.testing.assert_frame_equal(central.troughs, alone.troughs, rtol=1e-9)
    assert central.recommended == alone.recommended is not None


def test_closed_form_forecast_equals_the_records_forecast(monkeypatch):
    """New doses' responses come from closed forms (engine.dose_response) where no dose
    modifier applies, else from solved records: the same model with F1 = 1 (records) gives
    the same options and troughs, draws included, to 1e-10; for a bolus history too. (Both
    fits by differences: exact derivatives do not apply with a dose modifier, and the two
    ways reach a mode within 1e-8, not 1e-10.)"""
    import sympy as sp

    from pkmodel import estimate

    monkeypatch.setattr(estimate, "slopes_unsupported", lambda *args: "differences asked for")

    with_f = dataclasses.replace(MODEL, parameters={**MODEL.parameters, "F1": sp.Float(1)})
    for history in (child(), child().assign(RATE=0.0)):
        closed = recommend_regimen(MODEL, history, 6.0, n_draws=200)
        records = recommend_regimen(with_f, history, 6.0, n_draws=200)
        pd.testing.assert_frame_equal(closed.options, records.options, rtol=1e-10)
        pd.testing.assert_frame_equal(closed.troughs, records.troughs, rtol=1e-10)
        assert closed.recommended is not None
        assert dataclasses.asdict(closed.recommended) == pytest.approx(
            dataclasses.asdict(records.recommended), rel=1e-10)


def test_options_measured_a_slice_of_doses_at_a_time_are_the_same(monkeypatch):
    """A fine dose grid over many troughs and draws is measured a slice of doses at a time
    (memory bounded): slices of one dose give the options and troughs of one slice."""
    from pkmodel import dosing

    whole = recommend_regimen(MODEL, child(), 6.0, n_draws=200)
    monkeypatch.setattr(dosing, "_MEASURE_CHUNK", 1)
    sliced = recommend_regimen(MODEL, child(), 6.0, n_draws=200)
    pd.testing.assert_frame_equal(sliced.options, whole.options, rtol=1e-14)
    pd.testing.assert_frame_equal(sliced.troughs, whole.troughs, rtol=1e-14)
    assert sliced.recommended == whole.recommended is not None


def test_a_modelled_infusion_length_is_kept_for_new_doses():
    """Doses given with RATE -2 under a model whose D1 is 2 h forecast exactly as 2-h
    infusions given by RATE: new doses keep the modelled length (they were boluses). A
    modelled rate (RATE -1: the length depends on the dose) is forecast as boluses, with
    a caution saying so."""
    import sympy as sp

    model = dataclasses.replace(MODEL, parameters={**MODEL.parameters,
                                                   "D1": sp.Float(2) / 24,
                                                   "R1": sp.Float(1680.0)})
    history = child()
    given = recommend_regimen(model, history, 6.0, n_draws=0)
    modelled = recommend_regimen(model, history.assign(
        RATE=np.where(history["EVID"] == 1, -2.0, 0.0)), 6.0, n_draws=0)
    pd.testing.assert_frame_equal(modelled.options, given.options, rtol=1e-12)
    pd.testing.assert_frame_equal(modelled.troughs, given.troughs, rtol=1e-12)
    assert modelled.status == given.status
    by_rate = history.assign(RATE=np.where(history["EVID"] == 1, -1.0, 0.0))
    rec = recommend_regimen(model, by_rate, 6.0, n_draws=0)
    assert rec.status == "caution"
    assert any("modelled (RATE -1)" in r for r in rec.reasons)
    # the exact answers rest on linearity in the dose: refused, with the reason
    with pytest.raises(ValueError, match=r"RATE -1.*depend on its amount"):
        dose_for_target_trough(model, by_rate, 6.0)
    with pytest.raises(ValueError, match=r"RATE -1.*depend on its amount"):
        interval_for_target_trough(model, by_rate, 6.0, dose_mg=300.0)


def test_dose_only_and_interval_only_are_changes_never_the_current_regimen():
    rec = recommend_regimen(MODEL, child((3.5, 3.0), weight=40.0), 6.0, n_draws=0)
    for option in (rec.dose_only, rec.interval_only):
        assert option is None or option != rec.current
    assert rec.dose_only is None or rec.dose_only.interval_weeks == rec.current.interval_weeks
    assert rec.interval_only is None or rec.interval_only.dose_mg == rec.current.dose_mg


def test_doses_below_the_label_are_flagged():
    """A 28-kg child on 100 mg (3.6 mg/kg) is below the label's 5 mg/kg."""
    history = child((12.0, 11.0))
    history.loc[history["EVID"] == 1, ["AMT", "RATE"]] = [100.0, 1200.0]
    rec = recommend_regimen(MODEL, history, 3.0, n_draws=0)
    assert rec.current.below_label and not rec.current.above_label


@settings(max_examples=12)
@given(weight=st.sampled_from([20.0, 35.0, 60.0]), albumin=st.sampled_from([2.8, 3.6, 4.4]),
       trough=st.floats(0.5, 20.0), target=st.sampled_from([3.0, 6.0]))
def test_rule_properties_against_the_oracle(weight, albumin, trough, target):
    """MAP only: the recommendation meets the target; the current regimen continues exactly
    when it meets it; no single change with less added drug meets it."""
    history = child((trough,), weight=weight, days=(154.0,), ALB=albumin)
    rec = recommend_regimen(MODEL, history, target, n_draws=0, max_mg_per_kg=10.0)
    eta = rec.estimate.individuals[list(MODEL.eta_names)].to_numpy()
    d0, w0 = rec.current.dose_mg, 8.0
    current_ok = oracle_troughs(history, eta, d0, w0, 154.0).min() >= target
    assert (rec.action == "continue") == current_ok
    if rec.recommended is not None:
        option = rec.recommended
        low = oracle_troughs(history, eta, option.dose_mg, option.interval_weeks, 154.0).min()
        assert low >= target
    if current_ok:
        return
    doses = 100.0 * np.arange(1, int(10.0 * weight // 100) + 1)
    dose_only, interval_only = brute_force_single_changes(
        history, eta, target, None, doses, (4, 5, 6, 7), d0, w0, 154.0)
    assert (rec.dose_only.dose_mg if rec.dose_only else None) == dose_only
    assert (rec.interval_only.interval_weeks if rec.interval_only else None) == interval_only
    rises = [r for r in ((dose_only / d0 - 1) if dose_only else None,
                         (w0 / interval_only - 1) if interval_only else None) if r is not None]
    if rises:
        assert rec.recommended.change_in_drug_per_week == pytest.approx(min(rises), rel=1e-9)


# --------------------------------------------------------------------------- safety gates


def test_absurd_trough_is_refused():
    rec = recommend_regimen(MODEL, child((1e9, 0.8)), 6.0, n_draws=100)
    assert rec.status == "refused" and rec.action == "refused" and rec.recommended is None
    assert rec.message.startswith("No recommendation")
    assert rec.checks.max_abs_iwres > 4.0


def test_failed_fit_is_refused_even_with_plausible_residuals(monkeypatch):
    """A fit reported as not converged (here: the real fit, marked so) refuses on its own."""
    from pkmodel import dosing

    def failing(model, data, **kwargs):
        fit = estimate_map(model, data, **kwargs)
        fit.individuals["SUCCESS"] = False
        fit.individuals["MESSAGE"] = "no convergence in 500 iterations"
        return fit

    monkeypatch.setattr(dosing, "estimate_map", failing)
    rec = recommend_regimen(MODEL, child(), 6.0, n_draws=100)
    assert rec.checks.max_abs_iwres < 4.0
    assert rec.status == "refused" and rec.recommended is None
    reason = ("the fit to the measured concentrations failed (no convergence in 500 "
              "iterations)")
    assert rec.reasons == (reason,)


def test_trough_in_ng_per_ml_is_refused_with_the_likely_cause():
    rec = recommend_regimen(MODEL, child((1100.0, 800.0)), 6.0, n_draws=100)
    assert rec.status == "refused" and rec.recommended is None
    # the worst value named with its day and its typical prediction
    assert any(reason.startswith("the measured 1100 mg/L on day 98 is implausible")
               and "typical prediction (1.56 mg/L)" in reason and "ng/mL" in reason
               for reason in rec.reasons)


def test_mistimed_sample_is_refused_with_the_reason():
    """A trough-like 1.1 mg/L recorded at 08:30 after a dose given at 00:00 the same day:
    the model predicts a post-infusion peak there. Proportional error bounds IWRES at
    -1/0.292 = -3.4 for values below the prediction; the log-scale residual catches it."""
    history = child((0.8,), days=(154.0,))
    dose_row = history.index[(history["EVID"] == 1) & (history["TIME"] == 98.0)][0]
    sample = history.loc[[dose_row]].assign(TIME=98.0 + 8.5 / 24, EVID=0, AMT=0.0, RATE=0.0,
                                              MDV=0, DV=1.1)
    history = pd.concat([history.loc[:dose_row], sample, history.loc[dose_row + 1:]],
                        ignore_index=True)
    history = history[~((history["TIME"] == 98.0) & (history["EVID"] == 0))]
    rec = recommend_regimen(MODEL, history, 6.0, n_draws=100)
    assert rec.status == "refused" and rec.recommended is None
    assert any("day 98.35" in r and "far below the prediction" in r for r in rec.reasons)
    accepted = recommend_regimen(MODEL, history, 6.0, n_draws=100, accept_outliers=True)
    assert accepted.status == "caution" and accepted.recommended is not None


def test_clearance_far_from_the_model_is_refused():
    """Troughs of 100 and 90 mg/L on 5 mg/kg every 8 weeks fit only with ETA_CL 5.5 SD
    below 0 (residuals small): the model does not describe this patient, so no dose."""
    rec = recommend_regimen(MODEL, child((100.0, 90.0)), 6.0, n_draws=0)
    assert rec.status == "refused" and rec.checks.max_abs_iwres < 4.0
    assert rec.checks.eta_cl_sd < -4.0
    assert any(r.startswith("ETA_CL is 5.5 SD below") for r in rec.reasons)
    assert not any("clearance is" in r for r in rec.reasons)  # not said twice
    kept = recommend_regimen(MODEL, child((100.0, 90.0)), 6.0, n_draws=0,
                             accept_outliers=True)
    assert kept.status == "caution" and kept.recommended is not None


def test_sample_during_an_infusion_is_a_caution():
    history = child((1.1, 0.8))
    dose_row = history.index[(history["EVID"] == 1) & (history["TIME"] == 98.0)][0]
    inside = history.loc[[dose_row]].assign(TIME=98.0 + 1.0 / 24, EVID=0, AMT=0.0, RATE=0.0,
                                            MDV=0, DV=40.0)
    history = pd.concat([history.loc[:dose_row], inside, history.loc[dose_row + 1:]],
                        ignore_index=True)
    rec = recommend_regimen(MODEL, history, 6.0, n_draws=0, accept_outliers=True)
    assert any("inside an infusion" in r for r in rec.reasons)
    assert rec.status in ("caution", "refused")


@pytest.mark.parametrize("rate, hours, inside", [(-2.0, 2.0, True), (-2.0, 0.5, False),
                                                  (-1.0, 2.0, True), (-1.0, 0.5, False)])
def test_a_modelled_infusion_s_length_times_the_samples(rate, hours, inside):
    """A sample 2.5 h after a dose starts is inside (or within 1 h of the end of) an
    infusion whose length the model gives (RATE -2: D1; RATE -1: AMT / R1) when that
    lasts 2 h, not when it lasts half an hour."""
    import sympy as sp

    history = child((1.1, 0.8))
    dose_row = history.index[(history["EVID"] == 1) & (history["TIME"] == 98.0)][0]
    after = history.loc[[dose_row]].assign(TIME=98.0 + 2.5 / 24, EVID=0, AMT=0.0,
                                           RATE=0.0, MDV=0, DV=40.0)
    history = pd.concat([history.loc[:dose_row], after, history.loc[dose_row + 1:]],
                        ignore_index=True)
    history["RATE"] = np.where(history["EVID"] == 1, rate, 0.0)
    days = sp.Float(hours) / 24
    model = dataclasses.replace(MODEL, parameters={**MODEL.parameters, "D1": days,
                                                   "R1": sp.Float(140.0) / days})
    rec = recommend_regimen(model, history, 6.0, n_draws=0, accept_outliers=True)
    assert any("day 98.1042 lies inside an infusion" in r for r in rec.reasons) is inside


def test_uninformative_data_and_extrapolation_are_cautions():
    """A single very early sample says little about clearance (shrinkage) and a weight
    outside xu2012's 35-110 kg is an extrapolation."""
    xu = load("xu2012")
    table = infliximab_regimen(30.0, until_week=14, covariates={"ALB": 4.0, "ATI": 0})
    table.loc[(table["EVID"] == 0) & (table["TIME"] == 14.0), ["MDV", "DV"]] = [0, 20.0]
    rec = recommend_regimen(xu, table, 6.0, n_draws=0)
    assert rec.status == "caution"
    assert any("outside 35-110" in r for r in rec.reasons)
    assert rec.checks.eta_cl_shrinkage == pytest.approx(
        1 - np.sqrt(1 - rec.estimate.etc(1)[0, 0] / xu.omega[0, 0]), rel=1e-12)


def test_few_effective_draws_refuse():
    rec = recommend_regimen(MODEL, child(), 6.0, n_draws=300, min_ess=1e6)
    assert rec.status == "refused" and any("ESS" in r for r in rec.reasons)


@pytest.mark.parametrize("value", [-1.0, 0.0])
def test_non_positive_trough_without_lloq_is_a_data_error(value):
    with pytest.raises(DatasetError, match=r"column 'DV', row \d+ \(ID 1\)"):
        recommend_regimen(MODEL, child((1.1, value)), 6.0, n_draws=0)
    rec = recommend_regimen(MODEL, child((1.1, value)), 6.0, n_draws=0, lloq=0.5)
    assert rec.status != "refused" and rec.recommended is not None


# --------------------------------------------------------------------------- visits


def week14_history() -> pd.DataFrame:
    table = child(None)
    table = table[table["TIME"] <= 98.0]
    table = table[~((table["TIME"] == 98.0) & (table["EVID"] == 1))].copy()
    table.loc[table["TIME"] == 98.0, ["MDV", "DV"]] = [0, 1.1]
    return table.reset_index(drop=True)


def test_week14_visit_plans_the_first_maintenance_dose():
    """Induction at weeks 0, 2, 6 and a trough before the first maintenance dose: the
    current interval is the planned 8 weeks and the dose is due now, on day 98."""
    rec = recommend_regimen(MODEL, week14_history(), 6.0, n_draws=100)
    assert rec.next_dose_day == 98.0 and rec.current.interval_weeks == 8.0
    assert any("after induction" in note for note in rec.notes)
    other = recommend_regimen(MODEL, week14_history(), 6.0, n_draws=100,
                              current_interval_weeks=6.0)
    assert other.current.interval_weeks == 6.0 and other.next_dose_day == 84.0 + 14.0


def test_within_induction_is_refused_and_a_late_induction_dose_is_still_induction():
    """Doses at weeks 0 and 2 and a trough at week 6: induction is not complete, so no
    maintenance regimen is advised. A week-2 dose given 4 days late (day 18) is still the
    label's induction (tolerance 7 days): the current interval is the planned 8 weeks."""
    table = week14_history()
    early = table[table["TIME"] <= 14.0].copy()
    sample = table[table["EVID"] == 0].assign(TIME=42.0, DV=12.0)
    rec = recommend_regimen(MODEL, pd.concat([early, sample], ignore_index=True), 6.0,
                            n_draws=0)
    assert rec.status == "refused" and any("within induction" in r for r in rec.reasons)
    late = table.copy()
    late.loc[(late["EVID"] == 1) & (late["TIME"] == 14.0), "TIME"] = 18.0
    rec = recommend_regimen(MODEL, late, 6.0, n_draws=0)
    assert rec.current.interval_weeks == 8.0 and rec.next_dose_day == 98.0


def test_induction_is_read_from_the_first_dose_on_and_only_with_a_label():
    """The same week-14 history shifted by 10 days is still after induction; a model
    without a label has no induction, no label flags and no vials: the current interval is
    the last gap (4 weeks) and doses go in 1-mg/kg steps."""
    shifted = week14_history().assign(TIME=lambda t: t["TIME"] + 10.0)
    rec = recommend_regimen(MODEL, shifted, 6.0, n_draws=0)
    assert rec.current.interval_weeks == 8.0 and rec.next_dose_day == 108.0
    plain = dataclasses.replace(MODEL, label=None)
    rec = recommend_regimen(plain, week14_history(), 6.0, n_draws=0, max_mg_per_kg=10.0)
    assert rec.current.interval_weeks == 4.0
    assert rec.next_dose_day == 98.0  # due on day 70, before the trough: given at the visit
    assert rec.settings.vial_mg is None
    assert not any(rec.options["ABOVE_LABEL"]) and not any(rec.options["BELOW_LABEL"])
    assert np.allclose(rec.options["MG_PER_KG"], np.round(rec.options["MG_PER_KG"]))


def test_maintenance_after_an_irregular_start_uses_maintenance_gaps():
    """Doses at days 0, 14, 70, 126 (the third dose is not the label's week 6): only the
    first two follow induction; the maintenance gaps (8 weeks) agree, so no caution."""
    table = child(None)
    table = table[table["EVID"] == 1].iloc[:2]
    later = table.iloc[[0, 0]].assign(TIME=[70.0, 126.0])
    sample = table.iloc[[0]].assign(TIME=182.0, EVID=0, AMT=0.0, RATE=0.0, MDV=0, DV=2.0)
    table = pd.concat([table, later, sample], ignore_index=True)
    rec = recommend_regimen(MODEL, table, 6.0, n_draws=0)
    assert rec.current.interval_weeks == 8.0 and rec.next_dose_day == 182.0
    assert not any("gaps" in r for r in rec.reasons) and not rec.notes


def test_irregular_or_overdue_history_is_a_caution():
    """Maintenance every 8 weeks but the last gap 10 weeks: the interval is taken as the
    last gap and said so; a sample more than an interval after the due dose: doses may be
    missing."""
    table = infliximab_regimen(28.0, until_week=40, covariates=COVARIATES)
    table.loc[(table["EVID"] == 1) & (table["TIME"] == 266.0), "TIME"] = 280.0
    table.loc[(table["EVID"] == 0) & (table["TIME"] == 266.0), "TIME"] = 280.0
    table.loc[table.index[-1], ["MDV", "DV"]] = [0, 2.0]
    rec = recommend_regimen(MODEL, table, 6.0, n_draws=0)
    assert rec.current.interval_weeks == 10.0
    assert any("last two gaps between doses differ (8 and 10 weeks)" in r for r in rec.reasons)
    late = child((1.1, 0.8), days=(98.0, 154.0))
    late.loc[late.index[-1], "TIME"] = 154.0 + 70.0
    rec = recommend_regimen(MODEL, late, 6.0, n_draws=0)
    assert rec.next_dose_day == 224.0
    assert any("more than one interval after" in r for r in rec.reasons)


def test_refused_offers_no_regimen_to_programs_either():
    rec = recommend_regimen(MODEL, child((5400.0, 0.8)), 6.0, n_draws=0)
    doc = rec.to_dict()
    assert doc["status"] == "refused" and doc["recommended"] is None
    assert doc["closest"] == doc["current"] and doc["feasible"] is False
    assert doc["dose_only"] is doc["interval_only"] is None


def test_sample_before_any_dose_is_named_so():
    table = child((1.1, 0.8))
    before = table.iloc[[0]].assign(TIME=0.0, EVID=0, AMT=0.0, RATE=0.0, MDV=0, DV=5.0)
    table = pd.concat([before, table], ignore_index=True)
    rec = recommend_regimen(MODEL, table, 6.0, n_draws=0)
    assert rec.status == "refused"
    assert any("before any dose" in r for r in rec.reasons)
    assert not any("ng/mL" in r for r in rec.reasons)


def table_from(text: str) -> pd.DataFrame:
    return read_nonmem(io.StringIO(text))


def test_continuing_after_a_low_last_trough_is_a_caution():
    """A 30-kg child escalated to 300 mg every 6 weeks, troughs 5.5 and 5.2 mg/L: the
    posterior median forecast reaches 6 mg/L, so the rule continues, but the last measured
    trough is below the target and the MAP forecast too: both are said."""
    rows = ["1,0,1,150,1800,0,1", "1,14,1,150,1800,0,1", "1,42,1,150,1800,0,1",
            "1,98,1,150,1800,0,1", "1,154,1,150,1800,0,1", "1,196,1,300,3600,0,1",
            "1,238,0,0,0,5.5,0", "1,238,1,300,3600,0,1", "1,280,0,0,0,5.2,0",
            "1,280,1,300,3600,0,1"]
    text = "ID,TIME,EVID,AMT,RATE,DV,MDV\n" + "\n".join(rows) + "\n"
    table = table_from(text).assign(WT=30.0, ALB=4.0, ATI=0, IMM=1)
    rec = recommend_regimen(MODEL, table, 6.0, n_draws=300)
    assert rec.action == "continue" and rec.status == "caution"
    assert rec.current.lowest_trough >= 6.0 > rec.current.lowest_trough_map
    assert any("last measured trough (5.2 mg/L" in r for r in rec.reasons)
    assert any(r.startswith("borderline: the MAP forecast") for r in rec.reasons)


def test_sample_at_an_implied_addl_dose_is_its_pre_dose_trough():
    """ADDL doses every 8 weeks from day 98; troughs at days 210 and 266, the times of
    implied 2-h infusions: an infusion starting at the sample's time has delivered
    nothing yet (the sample is the trough), so no timing caution."""
    table = child(None)
    table = table[table["EVID"] == 1].copy()
    table = table[table["TIME"] <= 98.0].assign(II=0.0, ADDL=0)
    table.loc[table["TIME"] == 98.0, ["II", "ADDL"]] = [56.0, 10]
    samples = table.iloc[[0, 0]].assign(TIME=[210.0, 266.0], EVID=0, AMT=0.0, RATE=0.0,
                                        MDV=0, DV=[1.0, 0.9], II=0.0, ADDL=0)
    table = pd.concat([table, samples], ignore_index=True)
    rec = recommend_regimen(MODEL, table, 6.0, n_draws=0)
    assert not any("inside an infusion" in r for r in rec.reasons)
    assert rec.next_dose_day == 266.0


def test_sample_at_an_implied_bolus_is_post_dose():
    """The same history given as boluses: the engine gives an implied dose before a sample
    at its time (docs/data.md), so a bolus there makes the sample a peak, not a trough."""
    table = child(None)
    table = table[table["EVID"] == 1].copy()
    table = table[table["TIME"] <= 98.0].assign(II=0.0, ADDL=0, RATE=0.0)
    table.loc[table["TIME"] == 98.0, ["II", "ADDL"]] = [56.0, 10]
    samples = table.iloc[[0, 0]].assign(TIME=[210.0, 266.0], EVID=0, AMT=0.0, MDV=0,
                                        DV=[1.0, 0.9], ADDL=0, II=0.0)
    table = pd.concat([table, samples], ignore_index=True)
    rec = recommend_regimen(MODEL, table, 6.0, n_draws=0, accept_outliers=True)
    assert any("day 210 lies inside an infusion or less than 1 h" in r for r in rec.reasons)
    assert not any("day 266" in r and "inside" in r for r in rec.reasons)  # dose due: later


def test_addl_history_gives_the_same_recommendation_as_explicit_doses():
    explicit = child()
    written = explicit[~((explicit["EVID"] == 1) & (explicit["TIME"] == 98.0))].assign(
        II=0.0, ADDL=0)
    written.loc[(written["EVID"] == 1) & (written["TIME"] == 42.0), ["II", "ADDL"]] = [56.0, 4]
    a = recommend_regimen(MODEL, explicit, 6.0, n_draws=100, seed=1)
    b = recommend_regimen(MODEL, written, 6.0, n_draws=100, seed=1)
    assert b.next_dose_day == 154.0
    assert (a.recommended.dose_mg, a.recommended.interval_weeks) == (
        b.recommended.dose_mg, b.recommended.interval_weeks)
    assert any("ADDL" in note for note in b.notes)


# --------------------------------------------------------------------------- other verbs


def test_exact_dose_by_linearity_puts_the_lowest_trough_on_the_target():
    history = child()
    dose = dose_for_target_trough(MODEL, history, 6.0, interval_weeks=6)
    eta = estimate_map(MODEL, history).individuals[list(MODEL.eta_names)].to_numpy()
    troughs = oracle_troughs(history, eta, dose, 6.0, 154.0)
    assert troughs.min() == pytest.approx(6.0, rel=1e-6)


def test_exact_dose_at_a_probability_is_the_share_of_draws():
    history = child()
    dose = dose_for_target_trough(MODEL, history, 6.0, interval_weeks=8, probability=0.8,
                                  n_draws=100, seed=2)
    sets = posterior_sets(history, 100, 2)
    assert meets(oracle_troughs(history, sets, dose * (1 + 1e-6), 8.0, 154.0), 6.0, 0.8)
    assert not meets(oracle_troughs(history, sets, dose * (1 - 1e-3), 8.0, 154.0), 6.0, 0.8)


@pytest.mark.parametrize("probability", [0.05, 0.95])
def test_a_small_share_needs_a_single_draw_and_a_large_one_nearly_all(probability):
    """Of 10 draws, a share of 0.05 needs one draw to reach the target (the smallest needed
    dose among the draws), 0.95 needs all ten (the largest): the written-out criterion."""
    history = child()
    dose = dose_for_target_trough(MODEL, history, 6.0, interval_weeks=8,
                                  probability=probability, n_draws=10, seed=4)
    sets = posterior_sets(history, 10, 4)
    assert meets(oracle_troughs(history, sets, dose * (1 + 1e-6), 8.0, 154.0), 6.0,
                 probability)
    assert not meets(oracle_troughs(history, sets, dose * (1 - 1e-3), 8.0, 154.0), 6.0,
                     probability)


def test_unattainable_target_says_so_and_gives_the_closest_option():
    rec = recommend_regimen(MODEL, child(), 200.0, n_draws=100)
    assert rec.recommended is None and not rec.feasible and rec.action == "unattainable"
    assert rec.message.startswith("Not attainable within limits")
    assert rec.closest.interval_weeks == 4.0
    assert rec.closest.dose_mg == 500.0  # the most 100-mg vials under 20 mg/kg (560 mg)


def test_a_priori_dosing_without_measured_troughs():
    rec = recommend_regimen(MODEL, child(troughs=None), 6.0, n_draws=200)
    assert rec.estimate is None and "population prior" in rec.message
    assert rec.status == "caution" and rec.recommended.meets_target


def test_same_seed_same_recommendation():
    a = recommend_regimen(MODEL, child(), 6.0, n_draws=200, seed=9)
    b = recommend_regimen(MODEL, child(), 6.0, n_draws=200, seed=9)
    pd.testing.assert_frame_equal(a.options, b.options)
    assert a.to_dict() == b.to_dict()


def test_interval_for_target_is_the_longest_that_works():
    history = child(troughs=None)
    days = interval_for_target_trough(MODEL, history, 6.0, dose_mg=300.0)
    assert days is not None
    ok = oracle_troughs(history, None, 300.0, days / 7.0, 154.0)
    too_long = oracle_troughs(history, None, 300.0, (days + 1) / 7.0, 154.0)
    assert ok.min() >= 6.0 and too_long.min() < 6.0


def test_time_to_trough_matches_a_fine_grid():
    history = child(troughs=None)
    day = time_to_trough(MODEL, history, 1.0)
    grid = pd.DataFrame({"TIME": [day - 0.01, day], "EVID": 0, "AMT": 0.0, "RATE": 0.0,
                         "MDV": 1})
    for name in ("ID", "CMT", "WT", *COVARIATES):
        grid[name] = history.iloc[-1][name]
    out = predict(MODEL, pd.concat([history, grid], ignore_index=True))
    before, at = out["PRED"].iloc[-2:]
    assert before >= 1.0 > at


@pytest.mark.parametrize("kwargs,words", [
    ({"target": -1.0}, "`target` must be positive"),
    ({"probability": 1.5}, "`probability`"),
    ({"intervals_weeks": (2, 3)}, "no interval"),
    ({"objective": "cheapest"}, "`objective` must be one of"),
    ({"next_dose_day": float("nan")}, "`next_dose_day` must be a finite day"),
    ({"current_interval_weeks": 0.01}, "at least one day"),
])
def test_bad_arguments_are_named(kwargs, words):
    with pytest.raises(ValueError, match=words):
        recommend_regimen(MODEL, child(), **{"n_draws": 10, **kwargs})


def test_one_patient_at_a_time():
    two = pd.concat([child(), child().assign(ID=2)], ignore_index=True)
    with pytest.raises(ValueError, match="one patient; got 2 IDs"):
        recommend_regimen(MODEL, two)


def test_a_history_without_a_dose_is_refused_with_the_reason():
    samples = child()[child()["EVID"] == 0]
    with pytest.raises(DatasetError, match=r"no dose \(EVID 1 or 4\)"):
        recommend_regimen(MODEL, samples, n_draws=0)


def test_an_infant_below_one_vial_is_dosed_in_mg_per_kg_steps():
    """4 kg: one 100-mg vial is 25 mg/kg, above the 20 mg/kg considered; doses go in
    1-mg/kg steps (4 mg), as a note says, instead of an error."""
    rec = recommend_regimen(MODEL, child((1.1, 0.8), weight=4.0), 6.0, n_draws=0)
    assert any("part of a vial" in note for note in rec.notes)
    doses = np.unique(rec.options["DOSE_MG"])
    np.testing.assert_allclose(doses, 4.0 * np.arange(1, 21))


@pytest.fixture(scope="module")
def two_models():
    """The example child under fasanmade2011 (300 mg every 4 weeks advised alone) and
    passot2016 (200 mg every 4 weeks), each in its own columns."""
    from pkmodel.averaging import for_model
    record = read_nonmem("examples/child.csv").assign(SEX="F", AGE=9.0, CRP=5.0,
                                                       DIAGNOSIS="CD")
    models = [load("fasanmade2011"), load("passot2016")]
    return [(m, for_model(m, record)) for m in models]


def test_model_averaged_recommendation_pools_draws_by_weight(two_models):
    """recommend_averaged pools each model's posterior draws in proportion to its weight,
    member k drawing with seed + k: all the weight on the lead gives the lead's own
    recommendation; (almost) all on the other gives that model's levels and PTA (seed 1)
    at every option; half and half gives, at every option, the mean of the two models' PTA
    over half the draws each (a model's first n/2 draws are its draws for n/2); the same
    model twice draws twice, not the same draws twice. A non-positive lead weight is
    refused."""
    from pkmodel.dosing import recommend_averaged
    (a, data_a), (b, data_b) = two_models
    alone_a = recommend_regimen(a, data_a, n_draws=400)
    alone_b = recommend_regimen(b, data_b, n_draws=400)
    assert alone_a.recommended.dose_mg != alone_b.recommended.dose_mg  # they differ
    lead = recommend_averaged([(a, data_a, 1.0), (b, data_b, 0.0)], n_draws=400)
    assert lead.recommended == alone_a.recommended
    pd.testing.assert_frame_equal(lead.options, alone_a.options)
    assert "fasanmade2011 100% (400 draws), passot2016 0% (0 draws)" in lead.notes[-1]
    other = recommend_averaged([(a, data_a, 1e-9), (b, data_b, 1.0)], n_draws=400)
    b_seed_1 = recommend_regimen(b, data_b, n_draws=400, seed=1)
    for column in ("PTA", "LOWEST_TROUGH", "MEETS_TARGET"):
        np.testing.assert_array_equal(other.options[column], b_seed_1.options[column])
    half = recommend_averaged([(a, data_a, 0.5), (b, data_b, 0.5)], n_draws=400)
    pta = (recommend_regimen(a, data_a, n_draws=200).options["PTA"]
           + recommend_regimen(b, data_b, n_draws=200, seed=1).options["PTA"]) / 2
    np.testing.assert_allclose(half.options["PTA"], pta, rtol=0, atol=1e-12)
    twice = recommend_averaged([(a, data_a, 1.0), (a, data_a, 1.0)], n_draws=400,
                               probability=0.8)
    halves = [recommend_regimen(a, data_a, n_draws=200, seed=k, probability=0.8)
              for k in (0, 1)]
    np.testing.assert_allclose(twice.options["PTA"], (halves[0].options["PTA"]
                                                      + halves[1].options["PTA"]) / 2,
                               rtol=0, atol=1e-12)
    assert not np.allclose(twice.options["PTA"], halves[0].options["PTA"])
    assert half.recommended.meets_target and half.status in ("ok", "caution")
    with pytest.raises(ValueError, match="first"):
        recommend_averaged([(a, data_a, 0.0), (b, data_b, 1.0)])

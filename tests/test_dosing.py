"""Dose optimisation: minimality, exact linear scaling, monotonicity, limits, a priori."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pkmodel.data import infliximab_regimen
from pkmodel.dosing import (
    dose_for_target_trough,
    interval_for_target_trough,
    recommend_regimen,
    time_to_trough,
)
from pkmodel.models import load
from pkmodel.predict import predict

MODEL = load("fasanmade2011")
COVARIATES = {"ALB": 3.3, "ATI": 0, "IMM": 1}


def child(troughs=(1.1, 0.8), weight=28.0, **covariates) -> pd.DataFrame:
    """Label induction, 5 mg/kg every 8 weeks, troughs measured at weeks 14 and 22."""
    table = infliximab_regimen(weight, until_week=22, covariates={**COVARIATES, **covariates})
    if troughs is not None:
        measured = (table["EVID"] == 0) & table["TIME"].isin([98.0, 154.0])
        table.loc[measured, "MDV"] = 0
        table.loc[measured, "DV"] = list(troughs)
    return table


def forecast_troughs(history: pd.DataFrame, eta: pd.DataFrame | None, dose: float,
                     weeks: float, start: float, horizon_weeks: float = 52.0) -> np.ndarray:
    """Independent recomputation with predict(): the history plus the new regimen, the
    trough before every new dose over the horizon (IOV KAPPAs at zero)."""
    tau = 7.0 * weeks
    n = int(np.floor(7.0 * horizon_weeks / tau + 1e-9))
    rows = []
    for k in range(n + 1):
        t = start + k * tau
        if k > 0:
            rows.append({"TIME": t, "EVID": 0, "AMT": 0.0, "RATE": 0.0, "MDV": 1})
        if k < n:
            rows.append({"TIME": t, "EVID": 1, "AMT": dose, "RATE": dose * 12.0, "MDV": 1})
    future = pd.DataFrame(rows)
    last = history.iloc[-1]
    for name in ("ID", "CMT", "WT", *COVARIATES):
        future[name] = last[name]
    table = pd.concat([history, future], ignore_index=True)
    out = predict(MODEL, table, eta)
    return out.loc[out.index >= len(history)].query("EVID == 0")["IPRED"].to_numpy()


def test_map_recommendation_meets_the_target_and_one_vial_less_does_not():
    history = child()
    rec = recommend_regimen(MODEL, history, 6.0, n_draws=0)
    best = rec.recommended
    eta = rec.estimate.individuals[["ID", *MODEL.eta_names]]
    ours = forecast_troughs(history, eta, best.dose_mg, best.interval_weeks, rec.next_dose_day)
    assert ours.min() >= 6.0
    assert ours.min() == pytest.approx(best.lowest_trough_map, rel=1e-9)
    less = forecast_troughs(history, eta, best.dose_mg - 100.0, best.interval_weeks,
                            rec.next_dose_day)
    assert less.min() < 6.0


def test_every_option_with_less_drug_misses_the_target():
    rec = recommend_regimen(MODEL, child(), 6.0, n_draws=300, seed=2)
    options = rec.options
    cheaper = options["MG_PER_KG_PER_WEEK"] < rec.recommended.mg_per_kg_per_week - 1e-12
    assert cheaper.any() and not options.loc[cheaper, "MEETS_TARGET"].any()
    assert options["MEETS_TARGET"].any()
    chosen = options[(options["DOSE_MG"] == rec.recommended.dose_mg)
                     & (options["INTERVAL_WEEKS"] == rec.recommended.interval_weeks)]
    assert bool(chosen["MEETS_TARGET"].iloc[0])


def test_exact_dose_by_linearity_puts_the_lowest_trough_on_the_target():
    history = child()
    dose = dose_for_target_trough(MODEL, history, 6.0, interval_weeks=6)
    fit_eta = recommend_regimen(MODEL, history, n_draws=0).estimate.individuals
    troughs = forecast_troughs(history, fit_eta[["ID", *MODEL.eta_names]], dose, 6.0,
                               history.loc[history.EVID == 1, "TIME"].max() + 56.0)
    assert troughs.min() == pytest.approx(6.0, rel=1e-9)


def test_child_needing_more_than_10_mg_per_kg_gets_it_flagged():
    rec = recommend_regimen(MODEL, child(), 6.0, n_draws=200, intervals_weeks=(4,))
    assert rec.recommended is not None
    assert rec.recommended.mg_per_kg > 10.0 and rec.recommended.above_label
    assert "Above the label" in rec.message


def test_higher_target_or_stricter_probability_needs_more_drug():
    history = child()
    per_week = [recommend_regimen(MODEL, history, target, n_draws=300, seed=1)
                .recommended.mg_per_kg_per_week for target in (3.0, 5.0, 7.0)]
    assert per_week[0] <= per_week[1] <= per_week[2] and per_week[0] < per_week[2]
    median = recommend_regimen(MODEL, history, 5.0, n_draws=300, seed=1).recommended
    strict = recommend_regimen(MODEL, history, 5.0, probability=0.8, n_draws=300,
                               seed=1).recommended
    assert strict.mg_per_kg_per_week >= median.mg_per_kg_per_week
    assert strict.pta >= median.pta


def test_unattainable_target_says_so_and_gives_the_closest_option():
    rec = recommend_regimen(MODEL, child(), 200.0, n_draws=100)
    assert rec.recommended is None and not rec.feasible
    assert rec.message.startswith("Not attainable within limits")
    assert rec.closest.interval_weeks == 4.0
    assert rec.closest.dose_mg == 500.0  # the most 100-mg vials under 20 mg/kg (560 mg)


def test_a_priori_dosing_without_measured_troughs():
    rec = recommend_regimen(MODEL, child(troughs=None), 6.0, n_draws=200)
    assert rec.estimate is None and "population prior" in rec.message
    assert rec.recommended is not None and rec.recommended.meets_target


def test_current_regimen_and_next_dose_are_reported():
    rec = recommend_regimen(MODEL, child(), 6.0, n_draws=100)
    assert rec.next_dose_day == 154.0  # last dose week 14 + 8 weeks
    assert rec.current.dose_mg == 140.0 and rec.current.interval_weeks == 8.0
    assert not rec.current.meets_target
    assert rec.troughs["STEADY_STATE"].iloc[-1]


def test_same_seed_same_recommendation():
    a = recommend_regimen(MODEL, child(), 6.0, n_draws=200, seed=9)
    b = recommend_regimen(MODEL, child(), 6.0, n_draws=200, seed=9)
    pd.testing.assert_frame_equal(a.options, b.options)


def test_interval_for_target_is_the_longest_that_works():
    history = child(troughs=None)
    days = interval_for_target_trough(MODEL, history, 6.0, dose_mg=300.0)
    assert days is not None
    ok = forecast_troughs(history, None, 300.0, days / 7.0, 154.0)
    too_long = forecast_troughs(history, None, 300.0, (days + 1) / 7.0, 154.0)
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
])
def test_bad_arguments_are_named(kwargs, words):
    with pytest.raises(ValueError, match=words):
        recommend_regimen(MODEL, child(), **{"n_draws": 10, **kwargs})


def test_one_patient_at_a_time():
    two = pd.concat([child(), child().assign(ID=2)], ignore_index=True)
    with pytest.raises(ValueError, match="one patient"):
        recommend_regimen(MODEL, two)

"""Dosing questions for any drug (pkmodel.target) against closed forms and brute force.

Closed forms: Gibaldi & Perrier, Pharmacokinetics, 2nd ed. (ch. 1-3): a one-compartment
bolus ``C = D/V e^(-k t)``; its steady-state trough ``D/V e^(-k tau) / (1 - e^(-k tau))``;
a zero-order infusion of length T, ``C_end = D/(T CL) (1 - e^(-k T))``, at steady state
divided by ``1 - e^(-k tau)``; the absorbed dose (Bateman) ``F D ka / (V (ka - k))
(e^(-k t) - e^(-ka t))`` shifted by the lag; the AUC of a dose over all time ``F D / CL``,
which is also the AUC over one interval at steady state.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import sympy as sp

from pkmodel.engine import Structure
from pkmodel.errors import DatasetError
from pkmodel.estimate import estimate_map, sample_posterior
from pkmodel.model import Covariate, PopulationModel, ResidualError
from pkmodel.predict import predict
from pkmodel.target import (
    NewDoses,
    Target,
    dose_for_target,
    exposure,
    interval_for_target,
    time_to_concentration,
)

CL, V = 4.0, 50.0  # L/h, L: k = 0.08 /h
K = CL / V
ETA_CL, ETA_V = sp.Symbol("ETA_CL"), sp.Symbol("ETA_V")


def one_compartment(depot: bool = False, **extra: sp.Expr) -> PopulationModel:
    parameters = {"CL": CL * sp.exp(ETA_CL), "V1": V * sp.exp(ETA_V), **extra}
    return PopulationModel("onecpt", Structure(1, depot=depot), {}, parameters,
                           [[0.09, 0.0], [0.0, 0.04]], ("ETA_CL", "ETA_V"),
                           ResidualError(proportional=0.15, additive=0.5), time_unit="h")


def bolus_history(dv: float | None = None) -> pd.DataFrame:
    """A 1000-mg bolus at 0 and 12 h; a sample at 20 h (measured when ``dv`` is given)."""
    return pd.DataFrame({"ID": 1, "TIME": [0.0, 12.0, 20.0], "AMT": [1000.0, 1000.0, 0.0],
                         "EVID": [1, 1, 0], "MDV": [1, 1, 0 if dv else 1],
                         "DV": [np.nan, np.nan, dv if dv else np.nan]})


MODEL = one_compartment()
TYPICAL = np.zeros(2)


def test_steady_state_trough_dose_is_the_closed_form():
    tau, target = 12.0, 10.0
    answer = dose_for_target(MODEL, bolus_history(), Target("trough", target, steady_state=True),
                             NewDoses(tau, start=24.0), eta=TYPICAL)
    expected = target * V * (1 - math.exp(-K * tau)) / math.exp(-K * tau)
    assert answer.dose == pytest.approx(expected, rel=1e-10)
    assert answer.doses.duration == 0.0  # bolus, like the history (never an infusion)
    assert answer.measure_at_map == pytest.approx(target, rel=1e-10)


def test_auc_over_an_interval_after_the_history_is_the_closed_form():
    """AUC over [24, 48) h of a dose at 24 plus the history's bolus doses at 0 and 12."""
    tau, target = 24.0, 300.0
    answer = dose_for_target(MODEL, bolus_history(), Target("auc", target),
                             NewDoses(tau, start=24.0), eta=TYPICAL)

    def tail(t0: float, a: float, b: float) -> float:  # AUC over [a, b] of a unit bolus at t0
        return (math.exp(-K * (a - t0)) - math.exp(-K * (b - t0))) / CL
    history = 1000.0 * (tail(0.0, 24.0, 48.0) + tail(12.0, 24.0, 48.0))
    expected = (target - history) / tail(24.0, 24.0, 48.0)
    assert answer.dose == pytest.approx(expected, rel=1e-9)


def test_aminoglycoside_peak_at_the_end_of_a_half_hour_infusion():
    """A peak target after 0.5-h infusions every 24 h (history infused likewise): at steady
    state, ``D = C T CL (1 - e^(-k tau)) / (1 - e^(-k T))``; the infusion length comes from
    the last dose."""
    history = pd.DataFrame({"ID": 1, "TIME": [0.0, 24.0], "AMT": [400.0, 0.0],
                            "RATE": [800.0, 0.0], "EVID": [1, 2]})
    target, tau, length = 20.0, 24.0, 0.5
    answer = dose_for_target(MODEL, history, Target("peak", target, steady_state=True),
                             NewDoses(tau, start=24.0), eta=TYPICAL)
    expected = target * length * CL * (1 - math.exp(-K * tau)) / (1 - math.exp(-K * length))
    assert answer.doses.duration == pytest.approx(length)
    assert answer.dose == pytest.approx(expected, rel=1e-10)


def test_oral_dose_with_lag_reaches_a_concentration_at_a_time():
    """Oral (depot), F 0.6, lag 0.5 h, ka 1.2 /h: the a-priori dose giving 8 mg/L 3 h after
    the first new dose, with nothing left from an earlier dose 10 days before."""
    model = one_compartment(depot=True, KA=sp.Float(1.2), F1=sp.Float(0.6),
                            ALAG1=sp.Float(0.5))
    history = pd.DataFrame({"ID": 1, "TIME": [0.0, 240.0], "AMT": [500.0, 0.0],
                            "CMT": [1, 0], "EVID": [1, 2]})
    answer = dose_for_target(model, history, Target("concentration", 8.0, time=3.0),
                             NewDoses(12.0, start=240.0), eta="population")
    ka, t = 1.2, 3.0 - 0.5
    old = 500 * 0.6 * ka / (V * (ka - K)) * (math.exp(-K * (240 + t)) - math.exp(-ka * (240 + t)))
    unit = 0.6 * ka / (V * (ka - K)) * (math.exp(-K * t) - math.exp(-ka * t))
    assert answer.doses.cmt == 1 and answer.doses.duration == 0.0
    assert answer.dose == pytest.approx((8.0 - old) / unit, rel=1e-9)
    assert answer.basis == "population"


def test_every_trough_dose_is_the_smallest_passing_a_brute_force_check():
    """The exact dose keeps every trough over the horizon at the target, checked with
    predict() on the written-out regimen; 0.1 % less misses one."""
    history = bolus_history(dv=9.0)
    target, tau = 8.0, 12.0
    answer = dose_for_target(MODEL, history, Target("trough", target),
                             NewDoses(tau, start=24.0, count=6))
    fit = estimate_map(MODEL, history)
    eta = fit.individuals[["ETA_CL", "ETA_V"]].to_numpy()

    def lowest(dose: float) -> float:
        """Each new dose written as a record after a sample (EVID 2) at its time."""
        times = 24.0 + tau * np.arange(7)
        rows = []
        for i, t in enumerate(times):
            rows.append({"ID": 1, "TIME": t, "AMT": 0.0, "EVID": 2})
            if i < 6:
                rows.append({"ID": 1, "TIME": t, "AMT": dose, "EVID": 1})
        full = pd.concat([history, pd.DataFrame(rows)], ignore_index=True)
        full["MDV"] = 1
        out = predict(MODEL, full, eta)
        return float(out.loc[(out.EVID == 2) & (out.TIME > 24.0), "IPRED"].min())
    assert answer.dose > 0
    assert lowest(answer.dose) == pytest.approx(target, rel=1e-9)
    assert lowest(answer.dose * 0.999) < target


def test_dose_at_a_probability_is_the_order_statistic_of_the_draws():
    """With probability 0.8 the dose is the smallest reaching the target for at least 80 %
    of the posterior draws (an independent count over the same seeded draws)."""
    history = bolus_history(dv=9.0)
    target = Target("trough", 8.0, steady_state=True)
    answer = dose_for_target(MODEL, history, target, NewDoses(12.0, start=24.0),
                             probability=0.8, n_draws=200, seed=5)
    draws = sample_posterior(MODEL, history, n=200, seed=5)
    eta = draws.draws[["ETA_CL", "ETA_V"]].to_numpy()
    cl, v = CL * np.exp(eta[:, 0]), V * np.exp(eta[:, 1])
    decay = np.exp(-cl / v * 12.0)
    needed = 8.0 * v * (1 - decay) / decay  # closed-form SS trough dose per draw
    share = np.mean(needed <= answer.dose * (1 + 1e-12))
    assert share >= 0.8 and np.mean(needed < answer.dose * (1 - 1e-9)) < 0.8
    assert answer.share == pytest.approx(share)


def test_rounding_goes_up_for_a_trough_and_to_the_nearest_otherwise():
    trough = dose_for_target(MODEL, bolus_history(), Target("trough", 10.0, steady_state=True),
                             NewDoses(12.0, start=24.0), eta=TYPICAL, round_to=250.0)
    assert trough.rounded == 250.0 * math.ceil(trough.dose / 250.0)
    auc = dose_for_target(MODEL, bolus_history(), Target("auc", 400.0, steady_state=True),
                          NewDoses(24.0, start=24.0), eta=TYPICAL, round_to=250.0)
    assert auc.dose == pytest.approx(1600.0) and auc.rounded == 1500.0  # 1600/250 = 6.4


def test_longest_interval_for_a_trough_matches_the_closed_form():
    """A 1000-mg bolus at steady state keeps the trough at 5 mg/L while ``e^(-k tau) /
    (1 - e^(-k tau)) >= 5 V / 1000``: tau <= ln(1 + 1000 / (5 V)) / k = 20.12 h."""
    limit = math.log(1 + 1000 / (5 * V)) / K
    got = interval_for_target(MODEL, bolus_history(), Target("trough", 5.0, steady_state=True),
                              1000.0, [6, 8, 12, 18, 20, 20.2, 24, 36], eta=TYPICAL,
                              doses=NewDoses(1.0, start=24.0))
    assert limit == pytest.approx(20.12, abs=0.01) and got == 20.0


def test_time_to_concentration_is_the_closed_form():
    """After the bolus doses at 0 and 12 h, C(t) = 1000/V (e^(-k t) + e^(-k (t - 12)))."""
    history = bolus_history()
    got = time_to_concentration(MODEL, history, 2.0, eta=TYPICAL)
    expected = math.log(1000 / V * (1 + math.exp(K * 12)) / 2.0) / K
    assert got == pytest.approx(expected, rel=1e-9)
    assert time_to_concentration(MODEL, history, 500.0, eta=TYPICAL) is None  # below already


def test_exposure_of_an_oral_dose_is_the_closed_form():
    ka = 1.2
    model = one_compartment(depot=True, KA=sp.Float(ka))
    table = pd.DataFrame({"ID": 1, "TIME": [0.0], "AMT": [1000.0], "CMT": [1], "EVID": [1]})
    out = exposure(model, table, 0.0, 400.0, eta=TYPICAL, threshold=5.0)
    tmax = math.log(ka / K) / (ka - K)
    cmax = 1000 * ka / (V * (ka - K)) * (math.exp(-K * tmax) - math.exp(-ka * tmax))
    end = 400.0
    auc = 1000 / CL * (1 - (ka * math.exp(-K * end) - K * math.exp(-ka * end)) / (ka - K))
    assert out["AUC"] == pytest.approx(auc, rel=1e-11)
    def above(t: float) -> float:
        return 1000 * ka / (V * (ka - K)) * (math.exp(-K * t) - math.exp(-ka * t)) - 5.0
    from scipy.optimize import brentq
    up, down = brentq(above, 0.0, tmax, xtol=1e-14), brentq(above, tmax, end, xtol=1e-14)
    assert out["TIME_ABOVE"] == pytest.approx(down - up, rel=1e-9)
    assert out["TMAX"] == pytest.approx(tmax, abs=1e-6)
    assert out["CMAX"] == pytest.approx(cmax, rel=1e-10)
    assert out["HALF_LIFE"] == pytest.approx(math.log(2) / K, rel=1e-12)
    assert out["VSS"] == pytest.approx(V)


def test_two_compartment_half_life_and_vss():
    """beta = (a - sqrt(a^2 - 4 k10 k21)) / 2, a = k10 + k12 + k21 (Gibaldi & Perrier ch. 2)."""
    model = PopulationModel("twocpt", Structure(2), {}, {
        "CL": sp.Float(3.0), "V1": sp.Float(10.0), "Q": sp.Float(2.0), "V2": sp.Float(20.0)},
        np.zeros((0, 0)), (), ResidualError(proportional=0.1), time_unit="h")
    table = pd.DataFrame({"ID": 1, "TIME": [0.0], "AMT": [100.0], "EVID": [1]})
    out = exposure(model, table, 0.0, 2000.0)
    k10, k12, k21 = 0.3, 0.2, 0.1
    a = k10 + k12 + k21
    beta = (a - math.sqrt(a * a - 4 * k10 * k21)) / 2
    assert out["HALF_LIFE"] == pytest.approx(math.log(2) / beta, rel=1e-12)
    assert out["VSS"] == 30.0
    assert out["AUC"] == pytest.approx(100 / 3.0, rel=1e-9)


def test_one_dose_history_needs_a_start_or_the_current_interval():
    history = pd.DataFrame({"ID": 1, "TIME": [0.0, 6.0], "AMT": [1000.0, 0.0], "EVID": [1, 2]})
    target = Target("trough", 5.0)
    with pytest.raises(DatasetError, match="current_interval"):
        dose_for_target(MODEL, history, target, NewDoses(12.0), eta=TYPICAL)
    answer = dose_for_target(MODEL, history, target, NewDoses(12.0), eta=TYPICAL,
                             current_interval=12.0)
    assert answer.doses.start == 12.0


def test_new_doses_may_not_overlap_the_history():
    history = pd.DataFrame({"ID": 1, "TIME": [0.0], "AMT": [1000.0], "II": [12.0],
                            "ADDL": [3], "EVID": [1]})
    with pytest.raises(DatasetError, match="at or after the first new dose"):
        dose_for_target(MODEL, history, Target("trough", 5.0), NewDoses(12.0, start=24.0),
                        eta=TYPICAL)


def test_invalid_questions_are_named():
    with pytest.raises(ValueError, match="kind"):
        Target("cmin", 5.0)
    with pytest.raises(ValueError, match="needs `time`"):
        Target("concentration", 5.0)
    with pytest.raises(ValueError, match="peak after a bolus"):
        dose_for_target(MODEL, bolus_history(), Target("peak", 5.0), NewDoses(12.0, start=24.0),
                        eta=TYPICAL)
    with pytest.raises(ValueError, match="draws"):
        dose_for_target(MODEL, bolus_history(), Target("trough", 5.0),
                        NewDoses(12.0, start=24.0), eta=TYPICAL, probability=0.8)


def test_answers_serialise_to_plain_json():
    import json
    answer = dose_for_target(MODEL, bolus_history(dv=9.0), Target("trough", 8.0),
                             NewDoses(12.0, start=24.0), probability=0.9, n_draws=100)
    doc = json.loads(json.dumps(answer.to_dict(), allow_nan=False))
    assert doc["units"] == {"time": "h", "dose": "mg", "concentration": "mg/L"}
    assert doc["target"]["kind"] == "trough" and doc["basis"] == "map"


# ------------------------------------------------------------ regressions from a review


def test_exposure_uses_each_interval_s_own_covariates():
    """Weight doubles at a record on day 48 h: over [0, 12] h the clearance is that of
    70 kg (NOCB: a record's covariates govern the time up to it, not before the previous
    one): AUC = 1000/4 (1 - e^-0.96), Cmin = 20 e^-0.96."""
    wt = sp.Symbol("WT")
    model = PopulationModel("wt", Structure(1), {}, {"CL": 4 * (wt / 70) * sp.exp(ETA_CL),
                                                      "V1": sp.Float(50)}, [[0.1]],
                            ("ETA_CL",), ResidualError(proportional=0.1),
                            covariates=(Covariate("WT", "kg", "weight", (1, 300)),),
                            time_unit="h")
    table = pd.DataFrame({"ID": 1, "TIME": [0.0, 12.0, 48.0], "AMT": [1000.0, 1000.0, 0.0],
                          "EVID": [1, 1, 2], "WT": [70.0, 70.0, 140.0]})
    out = exposure(model, table, 0.0, 12.0, eta=np.zeros(1))
    assert out["AUC"] == pytest.approx(250.0 * (1 - math.exp(-0.96)), rel=1e-9)
    assert out["CMIN"] == pytest.approx(20.0 * math.exp(-0.96), rel=1e-9)
    assert out["CMAX"] == pytest.approx(20.0, rel=1e-9)  # at 0, not the next dose at 12


def test_modelled_duration_history_gives_modelled_new_doses():
    """Doses with RATE=-2 and D1 = 2 h: new doses keep the modelled 2-h infusion (not a
    bolus). Steady-state trough 5 mg/L every 24 h: D = 5 T CL (1 - e^-k tau) /
    ((1 - e^-kT) e^-k(tau - T))."""
    model = one_compartment(D1=sp.Float(2.0))
    history = pd.DataFrame({"ID": 1, "TIME": [0.0, 24.0], "AMT": [1000.0, 0.0],
                            "RATE": [-2.0, 0.0], "EVID": [1, 2]})
    answer = dose_for_target(model, history, Target("trough", 5.0, steady_state=True),
                             NewDoses(24.0, start=24.0), eta=TYPICAL)
    tau, length = 24.0, 2.0
    expected = 5 * length * CL * (1 - math.exp(-K * tau)) / (
        (1 - math.exp(-K * length)) * math.exp(-K * (tau - length)))
    assert answer.doses.rate == -2.0
    assert answer.dose == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="modelled"):
        dose_for_target(model, history, Target("peak", 30.0), NewDoses(24.0, start=24.0),
                        eta=TYPICAL)


def test_a_modelled_rate_is_refused_unless_the_length_is_given():
    """RATE -1 makes a dose's length its amount over R1: not linear in the dose, so the
    answers (a 1-unit dose scaled) would be wrong; refused, and an explicit length gives
    the answer of the same doses given by RATE."""
    model = one_compartment(R1=sp.Float(500.0))  # mg/h: 1000 mg over 2 h
    history = pd.DataFrame({"ID": 1, "TIME": [0.0, 24.0], "AMT": [1000.0, 0.0],
                            "RATE": [-1.0, 0.0], "EVID": [1, 2]})
    target = Target("trough", 5.0, steady_state=True)
    with pytest.raises(ValueError, match=r"RATE -1.*depend on its amount"):
        dose_for_target(model, history, target, NewDoses(24.0, start=24.0), eta=TYPICAL)
    with pytest.raises(ValueError, match="depend on its amount"):
        NewDoses(24.0, rate=-1)
    given = dose_for_target(model, history, target, NewDoses(24.0, start=24.0, duration=2.0),
                            eta=TYPICAL)
    by_rate = dose_for_target(model, history.assign(RATE=[500.0, 0.0]), target,
                              NewDoses(24.0, start=24.0), eta=TYPICAL)
    assert given.dose == pytest.approx(by_rate.dose, rel=1e-12)


def test_an_explicit_count_is_kept():
    """One new dose only (count=1): the concentration 30 h after it owes nothing to later
    doses; D = (5 - C_history(54)) / C_unit(30) for 0.5-h infusions."""
    history = pd.DataFrame({"ID": 1, "TIME": [0.0, 24.0], "AMT": [1000.0, 0.0],
                            "RATE": [2000.0, 0.0], "EVID": [1, 2]})
    answer = dose_for_target(MODEL, history, Target("concentration", 5.0, time=30.0),
                             NewDoses(12.0, start=24.0, count=1), eta=TYPICAL)

    def infusion(dose, t):  # 0.5-h infusion at 0, t after its end
        return dose / 0.5 / CL * (1 - math.exp(-K * 0.5)) * math.exp(-K * (t - 0.5))
    expected = (5.0 - infusion(1000.0, 54.0)) / infusion(1.0, 30.0)
    assert answer.doses.count == 1
    assert answer.dose == pytest.approx(expected, rel=1e-9)


def test_time_to_concentration_waits_for_a_running_infusion():
    """A 2-h infusion of 1000 mg starts at the last record: the concentration rises to
    C(2) = 250 (1 - e^-0.16) / ... and falls through 5 mg/L at 2 + ln(C(2)/5)/k."""
    history = pd.DataFrame({"ID": 1, "TIME": [0.0], "AMT": [1000.0], "RATE": [500.0],
                            "EVID": [1]})
    peak = 500.0 / CL * (1 - math.exp(-K * 2.0))
    got = time_to_concentration(MODEL, history, 5.0, eta=TYPICAL)
    assert got == pytest.approx(2.0 + math.log(peak / 5.0) / K, rel=1e-9)


def test_a_target_the_history_already_reaches_needs_no_dose_and_says_so():
    history = pd.DataFrame({"ID": 1, "TIME": [0.0, 0.5], "AMT": [5000.0, 0.0],
                            "EVID": [1, 2]})
    answer = dose_for_target(MODEL, history, Target("concentration", 5.0, time=1.0),
                             NewDoses(12.0, start=0.5), eta=TYPICAL)
    assert answer.dose == 0.0 and any("already reaches" in n for n in answer.notes)


def test_exposure_of_the_infliximab_child_matches_an_integral_of_predict():
    """fasanmade2011 (four covariates, IOV) over weeks 14-22 of the example child: the
    Gauss-Legendre AUC equals Simpson's rule on predict() over a 0.01-day grid (1e-6)."""
    from scipy.integrate import simpson

    from pkmodel.data import read_nonmem
    from pkmodel.models import load
    model = load("fasanmade2011")
    child = read_nonmem("examples/child.csv")
    eta = np.zeros(len(model.eta_names))
    out = exposure(model, child, 98.0 + 2 / 24, 154.0, eta=eta)  # from the infusion's end
    grid = np.linspace(98.0 + 2 / 24, 154.0, 5001)
    rows = child.iloc[[3] * grid.size].assign(TIME=grid, EVID=2, MDV=1, DV=np.nan)
    table = pd.concat([child, rows]).sort_values("TIME", kind="stable").reset_index(drop=True)
    conc = predict(model, table)
    values = conc.loc[conc["EVID"] == 2, "PRED"].to_numpy()
    assert out["AUC"] == pytest.approx(simpson(values, x=grid), rel=1e-6)

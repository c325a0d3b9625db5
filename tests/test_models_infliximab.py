"""Published infliximab models: equations retyped independently from
shared/reference/infliximab_models.md, typical troughs against an ODE solver, published
results, covariate effects, unit safety."""

from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st
from ode_reference import Dose, ode_amounts, rate_matrix

from pkmodel.data import infliximab_regimen
from pkmodel.errors import CovariateError, CovariateWarning
from pkmodel.model import evaluate_parameters
from pkmodel.models import DEFAULT, available, load
from pkmodel.predict import predict


def by_hand(name: str, c: dict[str, float]) -> dict[str, float]:
    """Typical parameters (L/day, L), typed again from the reference file, sections A-G."""
    wt = c.get("WT", 70.0)
    alb = c.get("ALB", 4.0)
    ati, imm = c.get("ATI", 0.0), c.get("IMM", 0.0)
    if name == "fasanmade2011":  # A, per kg -> total
        return {"CL": 5.42 * (wt / 65) ** -0.313 * (alb / 4.1) ** -0.855 * (1 + 0.291 * ati)
                * (1 - 0.137 * imm) * wt / 1000,
                "V1": 52.4 * (wt / 65) ** -0.233 * wt / 1000, "Q": 2.26 * wt / 1000,
                "V2": 19.6 * (wt / 65) ** -0.588 * wt / 1000}
    if name == "fasanmade2011_pediatric":  # B
        return {"CL": 5.43 * (wt / 42) ** -0.34 * (alb / 3.8) ** -1.22 * wt / 1000,
                "V1": 54.2 * (wt / 42) ** -0.171 * wt / 1000, "Q": 3.52 * wt / 1000,
                "V2": 29.2 * (wt / 42) ** -0.414 * wt / 1000}
    if name == "xu2012":  # C
        return {"CL": 0.294 * (wt / 70) ** 0.614 * (alb / 4) ** -1.17 * (1 + 0.257 * ati),
                "V1": 3.33 * (wt / 70) ** 0.691, "Q": 0.0719 * (wt / 70) ** 1.10,
                "V2": 1.14 * (wt / 70) ** 0.59}
    if name == "dubinsky2017":  # D
        return {"CL": 0.296 * (wt / 70) ** 0.612 * (alb / 4) ** -2.3 * (1 + 0.231 * ati),
                "V1": 3.30 * (wt / 70) ** 0.696, "V2": 1.16 * (wt / 70) ** 0.604,
                "Q": 0.0781 * (wt / 70) ** 1.15}
    if name == "fasanmade2009":  # E
        female = c.get("FEMALE", 0.0)
        return {"CL": 0.407 * (alb / 4.1) ** -1.54 * (1 + 0.471 * ati) * (1 - 0.236 * female),
                "V1": 3.29 * (wt / 77) ** 0.538 * (1 - 0.137 * female), "V2": 4.13, "Q": 7.14}
    if name == "zhao2026":  # F, albumin in g/L
        return {"CL": 0.779 * (wt / 65) ** 0.75 * (alb / 40.5) ** -0.758
                * (c["CRP"] / 3) ** 0.0545,
                "V1": 17.2 * (wt / 65), "V2": 1.21 * (wt / 65), "Q": 0.0697 * (wt / 65) ** 0.75}
    if name == "passot2016":  # G, one compartment
        male, cd, uc, age = c["MALE"], c["CD"], c["UC"], c["AGE"]
        return {"CL": 0.23 * (wt / 67) ** 0.603 * np.exp(0.181 * male + 0.384 * cd + 0.472 * uc),
                "V1": 5.2 * (wt / 67) ** 0.277 * np.exp(0.209 * male + 0.399 * cd + 0.417 * uc)
                * np.exp(-0.396 * (age < 15))}
    raise KeyError(name)


CHILD = {"WT": 28.0, "ALB": 3.3, "ATI": 0.0, "IMM": 1.0, "FEMALE": 1.0, "CRP": 8.0,
         "MALE": 0.0, "CD": 1.0, "UC": 0.0, "AGE": 9.0}
ADULT = {"WT": 80.0, "ALB": 4.2, "ATI": 1.0, "IMM": 0.0, "FEMALE": 0.0, "CRP": 1.5,
         "MALE": 1.0, "CD": 0.0, "UC": 1.0, "AGE": 40.0}


def covariates_for(name: str, person: dict[str, float]) -> dict[str, float]:
    model = load(name)
    values = {c: person[c] for c in model.covariate_names}
    if name == "zhao2026":
        values["ALB"] = person["ALB"] * 10.0  # g/dL -> g/L
    return values


def expect_small_child_warning(name: str):
    """xu2012 was built on 35-110 kg (authors' code): a 28-kg child must draw a warning."""
    if name == "xu2012":
        return pytest.warns(CovariateWarning, match="outside 35-110")
    return contextlib.nullcontext()


def test_available_and_default():
    assert available() == ("dubinsky2017", "fasanmade2009", "fasanmade2011",
                            "fasanmade2011_pediatric", "passot2016", "xu2012", "zhao2026")
    assert DEFAULT == "fasanmade2011"
    with pytest.raises(ValueError, match="available: dubinsky2017"):
        load("fasanmade")
    for name in available():
        assert load(name).citation and load(name).description


@pytest.mark.parametrize("name", available())
@pytest.mark.parametrize("person", [CHILD, ADULT], ids=["child", "adult"])
def test_parameters_match_the_reference_equations(name, person):
    cov = covariates_for(name, person)
    got = evaluate_parameters(load(name), cov)
    expected = by_hand(name, cov)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-13), key


@pytest.mark.parametrize("name", available())
def test_typical_troughs_on_the_label_regimen_match_an_ode_solver(name):
    """PRED troughs of a 28-kg child, 5 mg/kg at weeks 0, 2, 6 then every 8 weeks, against
    solve_ivp (LSODA, rtol 1e-12) with parameters computed by hand."""
    cov = covariates_for(name, CHILD)
    table = infliximab_regimen(28.0, until_week=54,
                               covariates={k: v for k, v in cov.items() if k != "WT"})
    with expect_small_child_warning(name):
        out = predict(load(name), table)
    samples = out[out["EVID"] == 0]
    params = by_hand(name, cov)
    n_cmt = 1 if name == "passot2016" else 2
    doses = [Dose(t, 1, a, 1.0 / 12.0) for t, a in
             zip(table.loc[table.EVID == 1, "TIME"], table.loc[table.EVID == 1, "AMT"])]
    ref = ode_amounts([(0.0, params)], doses, samples["TIME"].to_numpy(), n_cmt=n_cmt)
    np.testing.assert_allclose(samples["PRED"], ref[:, 0] / params["V1"], rtol=1e-8)


def test_fasanmade2011_total_clearance_as_published():
    """Reference file, model A: CL = 0.3523 * (WT/65)^0.687 L/day at ALB 4.1, ATI 0, IMM 0."""
    wt = np.array([15.0, 28.0, 42.0, 65.0, 110.0])
    cl = evaluate_parameters(load("fasanmade2011"), {"WT": wt, "ALB": 4.1, "ATI": 0, "IMM": 0})
    np.testing.assert_allclose(cl["CL"], 0.3523 * (wt / 65) ** 0.687, rtol=2e-4)


def test_fasanmade2009_terminal_half_life_about_two_weeks():
    """Fasanmade 2009 (Eur J Clin Pharmacol 65:1211): "t1/2 is approximately 14 days" for
    the reference subject (77-kg man, ALB 4.1 g/dL, no antibodies). The typical values
    give a terminal half-life of 12.8 days."""
    p = evaluate_parameters(load("fasanmade2009"), {"WT": 77.0, "ALB": 4.1, "ATI": 0,
                                                    "FEMALE": 0})
    rates = -np.linalg.eigvals(rate_matrix({k: float(v) for k, v in p.items()}, 2, False))
    half_life = np.log(2) / rates.min()
    assert 12.0 < half_life < 16.0


@pytest.mark.parametrize("name", ["fasanmade2011", "fasanmade2011_pediatric", "xu2012",
                                  "dubinsky2017", "fasanmade2009", "zhao2026"])
@given(alb=st.floats(2.0, 5.0), factor=st.floats(1.01, 1.5))
def test_lower_albumin_raises_clearance(name, alb, factor):
    cov = covariates_for(name, {**CHILD, "ALB": alb})
    higher = dict(cov, ALB=cov["ALB"] * factor)
    model = load(name)
    assert evaluate_parameters(model, cov)["CL"] > evaluate_parameters(model, higher)["CL"]


@pytest.mark.parametrize("name", available())
@given(wt=st.floats(10.0, 100.0), factor=st.floats(1.01, 2.0))
def test_heavier_patients_clear_more(name, wt, factor):
    model = load(name)
    cov = covariates_for(name, {**CHILD, "WT": wt})
    heavier = dict(cov, WT=wt * factor)
    light, heavy = evaluate_parameters(model, cov), evaluate_parameters(model, heavier)
    assert heavy["V1"] > light["V1"]
    if name == "fasanmade2009":  # no weight effect on CL in this model (reference, E)
        assert heavy["CL"] == light["CL"]
    else:
        assert heavy["CL"] > light["CL"]


@pytest.mark.parametrize("name,column,direction", [
    ("fasanmade2011", "ATI", 1), ("fasanmade2011", "IMM", -1), ("xu2012", "ATI", 1),
    ("dubinsky2017", "ATI", 1), ("fasanmade2009", "ATI", 1), ("fasanmade2009", "FEMALE", -1),
])
def test_indicator_effects_have_the_published_sign(name, column, direction):
    model = load(name)
    cov = covariates_for(name, CHILD)
    off = evaluate_parameters(model, {**cov, column: 0.0})["CL"]
    on = evaluate_parameters(model, {**cov, column: 1.0})["CL"]
    assert np.sign(on - off) == direction


def test_a_child_on_label_dosing_has_lower_troughs_with_low_albumin():
    troughs = []
    for alb in (2.8, 3.3, 4.0):
        table = infliximab_regimen(28.0, covariates={"ALB": alb, "ATI": 0, "IMM": 1})
        out = predict(load("fasanmade2011"), table)
        troughs.append(out["PRED"].iloc[-1])
    assert troughs[0] < troughs[1] < troughs[2]


def _one_row(model_name: str, **values) -> pd.DataFrame:
    cov = covariates_for(model_name, CHILD)
    cov.update(values)
    return infliximab_regimen(cov.pop("WT"), until_week=6, id=12, covariates=cov)


@pytest.mark.parametrize("name", ["fasanmade2011", "fasanmade2011_pediatric", "xu2012",
                                  "dubinsky2017", "fasanmade2009"])
def test_albumin_in_g_per_l_given_to_a_g_per_dl_model_is_refused(name):
    table = _one_row(name, ALB=35.0).assign(WT=40.0)
    with pytest.raises(CovariateError, match=r"column 'ALB', row 0 \(ID 12\).*g/L: divide by 10"):
        predict(load(name), table)


def test_albumin_in_g_per_dl_given_to_a_g_per_l_model_is_refused():
    with pytest.raises(CovariateError, match=r"column 'ALB', row 0 \(ID 12\).*multiply by 10"):
        predict(load("zhao2026"), _one_row("zhao2026", ALB=3.5))


@pytest.mark.parametrize("name", available())
def test_weight_that_cannot_be_kilograms_is_refused(name):
    with pytest.raises(CovariateError, match=r"column 'WT', row 0 \(ID 12\)"):
        predict(load(name), _one_row(name).assign(WT=0.0))
    with pytest.raises(CovariateError, match="column 'WT'"):
        predict(load(name), _one_row(name).assign(WT=700.0))


def test_missing_and_non_binary_covariates_are_named():
    table = _one_row("fasanmade2011").drop(columns="IMM")
    with pytest.raises(CovariateError, match="'IMM' is missing"):
        predict(load("fasanmade2011"), table)
    with pytest.raises(CovariateError, match=r"column 'ATI', row 0 \(ID 12\).*0 or 1"):
        predict(load("fasanmade2011"), _one_row("fasanmade2011", ATI=2.0))

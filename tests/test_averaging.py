"""Several models for one patient: covariates from one record, marginal likelihoods and
weights against direct numerical integration, and the weight of the true model."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import sympy as sp
from scipy import integrate

from pkmodel.averaging import compare_models, for_model, predict_averaged, recommend_with_models
from pkmodel.data import read_nonmem
from pkmodel.engine import Structure
from pkmodel.errors import CovariateError
from pkmodel.model import PopulationModel, ResidualError
from pkmodel.models import load

ETA = sp.Symbol("ETA_CL")
CHILD = "examples/child.csv"


def one_cpt(name: str, cl: float, omega: float = 0.1, prop: float = 0.15) -> PopulationModel:
    """CL = cl exp(ETA_CL) L/day, V 4 L, proportional error."""
    return PopulationModel(name, Structure(1), {}, {"CL": cl * sp.exp(ETA), "V1": sp.Float(4)},
                           [[omega]], ("ETA_CL",), ResidualError(proportional=prop))


def samples(times, dv) -> pd.DataFrame:
    dose = pd.DataFrame({"ID": [1], "TIME": [0.0], "AMT": [100.0], "EVID": [1], "MDV": [1],
                         "DV": [np.nan]})
    obs = pd.DataFrame({"ID": 1, "TIME": times, "AMT": 0.0, "EVID": 0, "MDV": 0, "DV": dv})
    return pd.concat([dose, obs], ignore_index=True)


def exact_log_marginal(cl, omega, prop, times, dv) -> float:
    """ln of the integral over ETA of prod_j N(y_j; f_j, (prop f_j)^2) N(ETA; 0, omega), by
    scipy quad (f = 100/4 exp(-cl e^ETA / 4 t))."""
    def density(eta):
        f = 25.0 * np.exp(-cl * math.exp(eta) / 4.0 * np.asarray(times))
        g = prop * f
        like = np.prod(np.exp(-0.5 * ((dv - f) / g) ** 2) / (g * math.sqrt(2 * math.pi)))
        return like * math.exp(-0.5 * eta**2 / omega) / math.sqrt(2 * math.pi * omega)
    sd = math.sqrt(omega)
    value = integrate.quad(density, -8 * sd, 8 * sd, limit=200, epsabs=0, epsrel=1e-10)[0]
    return math.log(value)


def test_weights_match_direct_integration_of_the_marginal_likelihood():
    """Two one-ETA models (typical CL 0.3 and 0.5 L/day): ln p(data | model) by importance
    sampling within 0.02 of quadrature, and the weights within 0.005."""
    times, dv = np.array([2.0, 8.0, 16.0]), np.array([20.0, 10.0, 4.5])
    models = [one_cpt("slow", 0.3), one_cpt("fast", 0.5)]
    result = compare_models(models, samples(times, dv), draws=4000, seed=3)
    exact = np.array([exact_log_marginal(cl, 0.1, 0.15, times, dv) for cl in (0.3, 0.5)])
    table = result.table.set_index("MODEL")
    np.testing.assert_allclose(table.loc[["slow", "fast"], "LOG_ML"], exact, atol=0.02)
    weights = np.exp(exact - np.logaddexp(*exact))
    np.testing.assert_allclose(table.loc[["slow", "fast"], "WEIGHT"], weights, atol=0.005)
    assert abs(table.loc["slow", "LOG_ML_LAPLACE"] - exact[0]) < 0.1  # Laplace is close too


def test_the_weight_of_the_true_model_rises_with_the_samples():
    """A patient simulated from 'fast' (CL 0.8, ETA 0.1): its weight against 'slow' (CL
    0.3, three prior SDs of CL away) grows from one sample to eight and ends above 0.9."""
    rng = np.random.default_rng(11)
    times = np.array([1.0, 3.0, 5.0, 8.0, 11.0, 14.0, 18.0, 22.0])
    f = 25.0 * np.exp(-0.8 * math.exp(0.1) / 4.0 * times)
    dv = f * (1 + 0.15 * rng.standard_normal(times.size))
    models = [one_cpt("slow", 0.3), one_cpt("fast", 0.8)]
    weight = [compare_models(models, samples(times[:k], dv[:k]), seed=1).weights["fast"]
              for k in (1, 4, 8)]
    assert weight[0] < weight[2] and weight[2] > 0.9


def test_one_record_gives_every_model_its_covariates():
    """ALB in g/dL becomes g/L for zhao2026, SEX F/M becomes FEMALE and MALE, DIAGNOSIS
    becomes CD and UC; a model whose fields are missing is named with what it needs."""
    child = read_nonmem(CHILD)
    with pytest.raises(CovariateError, match="passot2016 needs SEX") as err:
        for_model(load("passot2016"), child)
    assert "DIAGNOSIS (CD or UC)" in str(err.value) and "AGE" in str(err.value)
    record = child.assign(SEX="F", AGE=9.0, CRP=5.0, DIAGNOSIS="CD")
    assert for_model(load("zhao2026"), record)["ALB"].iloc[0] == pytest.approx(33.0)
    passot = for_model(load("passot2016"), record)
    assert (passot["MALE"] == 0).all() and (passot["CD"] == 1).all() and (passot["UC"] == 0).all()
    assert (for_model(load("fasanmade2009"), record)["FEMALE"] == 1).all()


def test_comparing_the_bundled_models_for_the_example_child():
    """Every bundled model is fitted to the child (record with sex, age, CRP, diagnosis),
    weights sum to 1, one is selected; a model that cannot be formed gets weight 0 and its
    reason; the averaged prediction lies between the models' own."""
    record = read_nonmem(CHILD).assign(SEX="F", AGE=9.0, CRP=5.0, DIAGNOSIS="CD")
    names = ["dubinsky2017", "fasanmade2011", "xu2012", "zhao2026"]
    result = compare_models([load(n) for n in names], record, draws=300)
    table = result.table
    assert table["USABLE"].all() and table["WEIGHT"].sum() == pytest.approx(1.0)
    assert table["SELECTED"].sum() == 1
    partial = compare_models([load("fasanmade2011"), load("passot2016")],
                             read_nonmem(CHILD), draws=300).table.set_index("MODEL")
    assert partial.loc["passot2016", "WEIGHT"] == 0 and "needs SEX" in partial.loc[
        "passot2016", "MESSAGE"]
    averaged = predict_averaged(result, record)
    own = averaged[[f"IPRED_{n}" for n in names]].to_numpy()
    bma = averaged["IPRED_BMA"].to_numpy()
    assert np.all(bma >= own.min(axis=1) - 1e-12) and np.all(bma <= own.max(axis=1) + 1e-12)


def test_recommendation_with_several_models_reports_each_answer():
    record = read_nonmem(CHILD).assign(SEX="F", AGE=9.0, CRP=5.0, DIAGNOSIS="CD")
    result = recommend_with_models([load("fasanmade2011"), load("xu2012")], record, 6.0,
                                   n_draws=100)
    answers = result.answers.set_index("MODEL")
    assert set(answers.index) == {"fasanmade2011", "xu2012"}
    assert 0.0 <= result.support <= 1.0
    assert result.recommendation is not None and result.comparison.selected in answers.index
    meets = answers["CHOSEN_MEETS_TARGET"].dropna()
    assert result.agree == (meets.nunique() <= 1)
    assert result.support == pytest.approx(answers.loc[meets[meets].index, "WEIGHT"].sum())


def test_averaged_posterior_forecast_pools_draws_by_weight():
    """Two one-ETA models fitted to the same three samples: the pooled forecast of a later
    sample takes draws from each in proportion to its weight, and its median lies between
    the two models' own posterior medians (a mixture's quantile lies between its
    components'); the 90 % band contains the median."""
    from pkmodel.averaging import forecast_averaged
    times, dv = np.array([2.0, 8.0, 16.0]), np.array([20.0, 10.0, 4.5])
    models = [one_cpt("slow", 0.3), one_cpt("fast", 0.5)]
    data = samples(times, dv)
    future = pd.concat([data, samples([24.0, 36.0], [np.nan, np.nan]).iloc[1:].assign(
        MDV=1)], ignore_index=True)
    both = compare_models(models, data, seed=3)
    pooled = forecast_averaged(both, future, n=2000, seed=1)
    counts = pooled.attrs["draws"]
    assert sum(counts.values()) == 2000
    assert counts["slow"] == pytest.approx(2000 * both.weights["slow"], abs=1)
    own = [forecast_averaged(compare_models(models, data, seed=3,
                                            prior={"slow": 1.0, "fast": 0.0} if k == 0
                                            else {"slow": 0.0, "fast": 1.0}),
                             future, n=2000, seed=1) for k in range(2)]
    later = (pooled["TIME"] > 16).to_numpy()
    low = np.minimum(own[0]["IPRED_Q50"], own[1]["IPRED_Q50"])[later]
    high = np.maximum(own[0]["IPRED_Q50"], own[1]["IPRED_Q50"])[later]
    median = pooled["IPRED_Q50"][later]
    assert np.all(median >= low * 0.99) and np.all(median <= high * 1.01)
    assert np.all(pooled["IPRED_Q05"] <= pooled["IPRED_Q50"])
    assert np.all(pooled["IPRED_Q50"] <= pooled["IPRED_Q95"])

"""SAEM and the importance-sampling -2 ln L, against NONMEM's SAEM runs and against the
exact likelihood by adaptive Gauss-Hermite quadrature (../shared/validation/population,
README there)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import sympy as sp
from scipy.special import logsumexp
from test_population import bauer_data, bauer_model, pheno_data, pheno_model

from pkmodel.engine import Structure
from pkmodel.estimate import ConditionalLikelihood, estimate_map
from pkmodel.model import Covariate, PopulationModel, ResidualError
from pkmodel.population import estimate_population, population_objective
from pkmodel.saem import SAEMOptions, importance_sampling, run_saem

#: pheno base (README 1, model B): NONMEM SAEM (1000 burn-in + 1000 iterations), from
#: pheno_saem.ext; THETA1, THETA2, OMEGA(1,1), OMEGA(2,2), SIGMA.
NONMEM_SAEM = (5.61554e-3, 1.39713, 0.132337, 0.199377, 0.0152465)
#: pheno base, the maximum of the exact likelihood: Nelder-Mead on the 15 x 15-node
#: adaptive Gauss-Hermite -2 ln L below (computed with pkmodel's ConditionalLikelihood,
#: 2026-11; -2 ln L 728.971 with 25 nodes, which moves it by less than 0.003).
QUADRATURE_MLE = (5.6154e-3, 1.42009, 0.15234, 0.19635, 0.015240)
#: pheno_saem.ext's initial values (THETA1, THETA2, OMEGA(1,1), OMEGA(2,2), SIGMA).
PHENO_SAEM_START = (4.69307e-3, 1.00916, 0.0464439, 0.046692, 0.013241)


@pytest.fixture(scope="module")
def population_dir(validation_dir):
    return validation_dir / "population"


def pheno_base(values) -> PopulationModel:
    return pheno_model(values[:2], values[2:4], values[4], covariates=False)


def quadrature(model: PopulationModel, data: pd.DataFrame, nodes: int = 25) -> float:
    """-2 ln L (without N ln 2 pi) by adaptive Gauss-Hermite quadrature: per ID, a
    ``nodes x nodes`` product grid at the conditional mode scaled by the Cholesky factor of
    its ETC (two ETAs)."""
    fit = estimate_map(model, data, starts=1)
    mode = fit.individuals[list(model.eta_names)].to_numpy(dtype=float)
    chol = np.linalg.cholesky(np.stack([fit.etc(i) for i in fit.individuals.index]))
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    z = np.stack(np.meshgrid(x, x, indexing="ij"), axis=-1).reshape(-1, 2)
    log_w = np.log(np.outer(w, w).ravel()) + 0.5 * (z**2).sum(axis=1)
    eta = mode[:, None, :] + np.einsum("bij,sj->bsi", chol, z)
    data_part = ConditionalLikelihood(model, data)(eta)
    prior = np.einsum("bsi,ij,bsj->bs", eta, np.linalg.inv(model.omega), eta)
    joint = -0.5 * (data_part + prior + np.linalg.slogdet(2 * math.pi * model.omega)[1])
    per_id = (logsumexp(joint + log_w, axis=1)
              + np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1))
    return float(-2 * per_id.sum())


def test_importance_sampling_matches_quadrature_and_nonmem(population_dir):
    """At pheno base's FOCE-I estimates the importance-sampling -2 ln L agrees with the
    quadrature (729.569) within 0.05; NONMEM's IMP (pheno_multEST.ext, README 1) gave
    729.95, within its Monte-Carlo error of this; the FOCE-I objective there is 730.8947,
    0.9 above the exact value as the README says."""
    data = pheno_data(population_dir)
    model = pheno_base((5.81756e-3, 1.44555, 0.111053, 0.201526, 0.0164177))
    exact = quadrature(model, data)
    assert exact == pytest.approx(729.569, abs=0.01)
    sampled = importance_sampling(model, data, samples=2000, seed=1)
    assert sampled.ofv == pytest.approx(exact, abs=max(0.05, 3 * sampled.se))
    assert 0 < sampled.se < 0.2
    assert sampled.ofv == pytest.approx(729.95, abs=1.0)
    assert population_objective(model, data, method="imp") == pytest.approx(exact, abs=0.3)
    assert len(sampled.individuals) == 59 and sampled.individuals["OBJ"].sum() == \
        pytest.approx(sampled.ofv)


@pytest.fixture(scope="module")
def pheno_saem(population_dir):
    return estimate_population(pheno_base(PHENO_SAEM_START), pheno_data(population_dir),
                               method="saem")


def test_pheno_base_saem_reaches_the_maximum_likelihood(pheno_saem, population_dir):
    """From pheno_saem.ext's initial values (README 1). NONMEM's SAEM lands 0.15 below the
    maximum of the exact likelihood (OMEGA(1,1) 0.132 against 0.152); pkmodel's within
    0.1 of it: THETAs and SIGMA within 3 % of the quadrature maximum and within 5 % of
    NONMEM's SAEM but OMEGA(1,1) (RSE about 35 %: the data say little; within 15 % of the
    maximum), OMEGA(2,2) within 5 % of both."""
    fit = pheno_saem
    assert fit.success and fit.method == "saem"
    got = fit.estimates.set_index("NAME")["ESTIMATE"]
    names = ["THETA1", "THETA2", "OMEGA(1,1)", "OMEGA(2,2)", "SIGMA(proportional)"]
    for name, best, nonmem in zip(names, QUADRATURE_MLE, NONMEM_SAEM):
        rel = 0.15 if name == "OMEGA(1,1)" else 0.05 if name.startswith("OMEGA") else 0.03
        assert got[name] == pytest.approx(best, rel=rel), name
        if name != "OMEGA(1,1)":
            assert got[name] == pytest.approx(nonmem, rel=0.05), name
    data = pheno_data(population_dir)
    reached = quadrature(fit.model, data)
    assert reached - quadrature(pheno_base(QUADRATURE_MLE), data) < 0.1
    assert reached < quadrature(pheno_base(NONMEM_SAEM), data)
    assert fit.ofv == pytest.approx(reached, abs=max(0.1, 4 * float(
        fit.notes[0].split("SE ", 1)[1].split(",")[0])))


def test_saem_fit_reports_its_diagnostics(pheno_saem, tmp_path):
    """The result carries FOCE-I's conditional modes, shrinkage, CWRES, the iteration
    history and a covariance step (of the importance-sampling -2 ln L); .ext labels the
    method."""
    fit = pheno_saem
    assert "importance-sampling" in fit.covariance_status
    assert fit.covariance_status.startswith("successful")
    assert np.isfinite(fit.estimates["SE"]).all() and (fit.estimates["RSE"] > 0).all()
    assert set(fit.history["PHASE"]) == {"burn-in", "main"} and len(fit.history) == 500
    assert np.isfinite(fit.records["CWRES"].dropna()).all()
    assert 0 < fit.shrinkage["ETA1"] < 1
    files = fit.to_nonmem(tmp_path)
    assert "Stochastic Approximation" in files[0].read_text().splitlines()[0]
    assert fit.to_dict()["method"] == "saem"


def test_bauer_504_saem_matches_nonmem(population_dir):
    """Model 504 (OMEGA block, four covariates) from 504_saem.ext's initial values: each
    estimate within 5 % of NONMEM's SAEM or within 0.1 of its SE (TH6, TH8 and OMEGA(2,1)
    are near 0), the importance-sampling -2 ln L within 1 of NONMEM's IMP 1051.79, and
    the R-matrix SEs of that -2 ln L within 5 % of those NONMEM's IMP step reports (the
    last table of 504_saem.ext; README 2)."""
    ext = (population_dir / "504_saem.ext").read_text().splitlines()
    initial = [float(v) for v in ext[2].split()[1:13]]
    rows = {int(float(line.split()[0])): [float(v) for v in line.split()[1:13]]
            for line in ext[2:] if line.split()[0].lstrip("-").isdigit()}
    nonmem, se = rows[-1000000000], rows[-1000000001]
    fit = estimate_population(bauer_model(initial), bauer_data(population_dir),
                              method="saem")
    assert fit.success
    got = fit.estimates.set_index("NAME")["ESTIMATE"]
    order = [*[f"TH{i}" for i in range(1, 9)], "SIGMA(proportional)", "OMEGA(1,1)",
             "OMEGA(2,1)", "OMEGA(2,2)"]
    for name, value, error in zip(order, nonmem, se):
        assert abs(got[name] - value) <= max(0.05 * abs(value), 0.1 * error), name
    assert fit.ofv == pytest.approx(1051.79, abs=1.0)
    assert fit.covariance_status.startswith("successful")
    standard = fit.estimates.set_index("NAME")["SE_R"]
    for name, error in zip(order, se):  # the IMP table comes last, so its SEs are kept
        assert standard[name] == pytest.approx(error, rel=0.05), name


def test_saem_is_reproducible_from_its_seed(population_dir):
    data = pheno_data(population_dir)
    short = SAEMOptions(burn_in=5, iterations=6, chains=2, seed=3)
    args = {"thetas": ("THETA1", "THETA2"), "omega": ((0, 0), (1, 1)),
            "sigmas": ("proportional",), "options": short}
    first = run_saem(pheno_base(PHENO_SAEM_START), data, **args)
    again = run_saem(pheno_base(PHENO_SAEM_START), data, **args)
    other = run_saem(pheno_base(PHENO_SAEM_START), data,
                     **{**args, "options": SAEMOptions(5, 6, 2, seed=4)})
    pd.testing.assert_frame_equal(first.history, again.history)
    assert not first.history.equals(other.history)
    assert first.mean.shape == (59, 2) and first.covariance.shape == (59, 2, 2)


THETA1, THETA2, ETA1, ETA2 = sp.symbols("THETA1 THETA2 ETA1 ETA2")


def small_model(cl: sp.Expr, v: sp.Expr, covariates=(), iov=None) -> PopulationModel:
    return PopulationModel("small", Structure(1), {"THETA1": 4.0, "THETA2": 50.0},
                           {"CL": cl, "V1": v}, np.diag([0.09, 0.04]), ("ETA1", "ETA2"),
                           ResidualError(proportional=0.1), covariates=covariates,
                           iov=iov or {}, time_unit="h")


def small_data(weights=(70.0, 70.0)) -> pd.DataFrame:
    rows = []
    for ident in range(1, 4):
        for k, (time, amt) in enumerate([(0.0, 500.0), (2.0, 0.0), (8.0, 0.0)]):
            rows.append({"ID": ident, "TIME": time, "AMT": amt, "EVID": int(amt > 0),
                         "MDV": int(amt > 0), "DV": np.nan if amt else 8.0 - time / 2,
                         "WT": weights[min(k, 1)]})
    return pd.DataFrame(rows)


@pytest.mark.parametrize(("cl", "v", "weights", "centred"), [
    (THETA1 * sp.exp(ETA1), THETA2 * sp.exp(ETA2), (70.0, 70.0), ("ETA1", "ETA2")),
    (sp.exp(sp.log(THETA1) + ETA1), THETA2 + ETA2, (70.0, 70.0), ("ETA1", "ETA2")),
    (THETA1 * sp.exp(ETA1), THETA2 + 10 * ETA2, (70.0, 70.0), ("ETA1",)),
    (THETA1 * sp.exp(2 * ETA1), THETA2 * sp.exp(ETA2), (70.0, 70.0), ("ETA2",)),
    (THETA1 * sp.exp(ETA1 + ETA2), THETA2, (70.0, 70.0), ()),
    # one ETA in two parameters: centring it on one would move the other
    (THETA1 * sp.exp(ETA1), THETA2 * sp.exp(ETA1 + ETA2), (70.0, 70.0), ()),
    # a weight that changes within an ID, whatever THETA multiplies it
    (THETA1 * sp.exp(THETA2 / 5000 * (sp.Symbol("WT") - 70)) * sp.exp(ETA1),
     50 * sp.exp(ETA2), (70.0, 60.0), ("ETA2",)),
    # a weight that changes within an ID: mu is not one number per ID
    (THETA1 * sp.Symbol("WT") / 70 * sp.exp(ETA1), THETA2 * sp.exp(ETA2), (70.0, 60.0),
     ("ETA2",)),
])
def test_saem_centres_the_etas_it_can(cl, v, weights, centred):
    """phi = ln P (P = exp(mu + ETA)) or P (P = mu + ETA) when mu is free of ETAs and
    constant within each ID; other ETAs are sampled as they are."""
    covariates = ((Covariate("WT", "kg", "weight", (1.0, 200.0)),)
                  if "WT" in str(cl) else ())
    model = small_model(cl, v, covariates)
    data = small_data(weights)
    run = run_saem(model, data, thetas=("THETA1", "THETA2"), omega=((0, 0), (1, 1)),
                   sigmas=("proportional",), options=SAEMOptions(2, 2, 1))
    assert run.centred == centred
    assert np.isfinite(run.history.drop(columns="PHASE").to_numpy(dtype=float)).all()


def test_saem_refuses_what_it_cannot_fit():
    data = small_data()
    with_iov = small_model(THETA1 * sp.exp(ETA1 + sp.Symbol("K")), THETA2 * sp.exp(ETA2),
                           iov={"K": 0.01})
    with pytest.raises(ValueError, match="IOV"):
        run_saem(with_iov, data, thetas=(), omega=(), sigmas=("proportional",))
    zero = small_model(THETA1 * sp.exp(ETA1), THETA2 * sp.exp(ETA2)).with_values(
        omega=np.diag([0.09, 0.0]))
    with pytest.raises(ValueError, match="positive definite"):
        run_saem(zero, data, thetas=(), omega=(), sigmas=("proportional",))
    with pytest.raises(ValueError, match="burn_in"):
        SAEMOptions(burn_in=0)
    with pytest.raises(ValueError, match="method"):
        estimate_population(small_model(THETA1 * sp.exp(ETA1), THETA2 * sp.exp(ETA2)),
                            data, method="its")


def test_saem_says_when_its_burn_in_was_too_short(population_dir):
    """From pheno_saem.ext's start OMEGA(1,1) climbs from 0.046 towards 0.15 for about 50
    iterations: a 30-iteration burn-in ends mid-climb and the run says so."""
    run = run_saem(pheno_base(PHENO_SAEM_START), pheno_data(population_dir),
                   thetas=("THETA1", "THETA2"), omega=((0, 0), (1, 1)),
                   sigmas=("proportional",), options=SAEMOptions(30, 4, 2))
    assert "longer burn-in" in run.drift


def test_theophylline_saem_matches_nlmixr2(population_dir):
    """theo_sd (README 4), oral, three ETAs, additive error: nlmixr2's SAEM gives tka 0.454
    to 0.464, tcl 1.009 to 1.02, tv 3.45 to 3.456 and add.sd 0.693 to 0.697 across
    versions; pkmodel's within those ranges widened by 0.5 % of their values."""
    raw = pd.read_csv(population_dir / "theo_sd.csv")
    dose = raw["EVID"] == 101
    data = raw.assign(EVID=dose.astype(int), MDV=dose.astype(int), CMT=np.where(dose, 1, 0),
                      DV=np.where(dose, np.nan, raw["DV"]))
    tka, tcl, tv, e_ka, e_cl, e_v = sp.symbols("tka tcl tv eta_ka eta_cl eta_v")
    model = PopulationModel(
        "theo_sd", Structure(1, depot=True), {"tka": 0.45, "tcl": 1.0, "tv": 3.45},
        {"KA": sp.exp(tka + e_ka), "CL": sp.exp(tcl + e_cl), "V1": sp.exp(tv + e_v)},
        np.diag([0.6, 0.3, 0.1]), ("eta_ka", "eta_cl", "eta_v"), ResidualError(additive=0.7),
        time_unit="h")
    fit = estimate_population(model, data, method="saem", covariance=False)
    assert fit.success and fit.covariance_status == "not run"
    est = fit.estimates.set_index("NAME")["ESTIMATE"]
    got = {**est[["tka", "tcl", "tv"]].to_dict(), "add.sd": math.sqrt(est["SIGMA(additive)"])}
    ranges = {"tka": (0.454, 0.464), "tcl": (1.009, 1.02), "tv": (3.45, 3.456),
              "add.sd": (0.693, 0.697)}
    for name, (low, high) in ranges.items():
        assert low * 0.995 <= got[name] <= high * 1.005, (name, got[name])


def test_a_theta_without_eta_is_fitted_on_the_samples(population_dir):
    """theo_sd with KA = exp(tka) (no ETA on it): tka is not centred, so SAEM fits it on the
    likelihood of the current samples; it lands where the likelihood is as high as at
    FOCE-I's estimates (importance sampling, same draws size: within 0.5) and tka within 5 %
    of FOCE-I's 0.433 (the two methods maximise different objectives)."""
    raw = pd.read_csv(population_dir / "theo_sd.csv")
    dose = raw["EVID"] == 101
    data = raw.assign(EVID=dose.astype(int), MDV=dose.astype(int), CMT=np.where(dose, 1, 0),
                      DV=np.where(dose, np.nan, raw["DV"]))
    tka, tcl, tv, e_cl, e_v = sp.symbols("tka tcl tv eta_cl eta_v")
    model = PopulationModel(
        "theo_no_eta_ka", Structure(1, depot=True), {"tka": 0.45, "tcl": 1.0, "tv": 3.45},
        {"KA": sp.exp(tka), "CL": sp.exp(tcl + e_cl), "V1": sp.exp(tv + e_v)},
        np.diag([0.3, 0.1]), ("eta_cl", "eta_v"), ResidualError(additive=0.7),
        time_unit="h")
    saem = estimate_population(model, data, method="saem", covariance=False)
    focei = estimate_population(model, data, covariance=False)
    assert saem.success and "centred ETAs ['eta_cl', 'eta_v']" in saem.notes[1]
    at_focei = importance_sampling(focei.model, data, samples=1000).ofv
    assert saem.ofv <= at_focei + 0.5
    tka_focei = focei.estimates.set_index("NAME").loc["tka", "ESTIMATE"]
    assert tka_focei == pytest.approx(0.433, abs=0.002)
    assert saem.estimates.set_index("NAME").loc["tka", "ESTIMATE"] == pytest.approx(
        tka_focei, rel=0.05)


def test_importance_sampling_result_is_plain_json(population_dir):
    import json
    data = pheno_data(population_dir)
    result = importance_sampling(pheno_base(QUADRATURE_MLE), data, samples=200, seed=2)
    document = json.loads(json.dumps(result.to_dict()))
    assert document["ofv"] == pytest.approx(result.ofv)
    assert len(document["individuals"]) == 59 and set(document["individuals"][0]) == {
        "ID", "OBJ", "SE"}

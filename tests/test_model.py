"""PopulationModel: construction checks, equations, evaluation, covariate safety."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import sympy as sp

from pkmodel.engine import Structure
from pkmodel.errors import CovariateError, CovariateWarning
from pkmodel.model import (
    Covariate,
    PopulationModel,
    ResidualError,
    _compile,
    _numpy_source,
    check_covariates,
    evaluate_parameter_slopes,
    evaluate_parameters,
    typical_covariates,
)
from pkmodel.models import available, load
from pkmodel.predict import predict

WT, TVCL, TVV, ETA_CL, ETA_V, KAPPA_CL = sp.symbols("WT TVCL TVV ETA_CL ETA_V KAPPA_CL")
WEIGHT = Covariate("WT", "kg", "body weight", plausible=(0.5, 300.0), observed=(20.0, 120.0),
                   reference=70.0)


def small_model(**changes) -> PopulationModel:
    fields = {
        "name": "small",
        "structure": Structure(1),
        "theta": {"TVCL": 0.3, "TVV": 4.0},
        "parameters": {"CL": TVCL * (WT / 70) ** 0.75 * sp.exp(ETA_CL + KAPPA_CL),
                       "V1": TVV * WT / 70 * sp.exp(ETA_V)},
        "omega": [[0.09, 0.01], [0.01, 0.04]],
        "eta_names": ("ETA_CL", "ETA_V"),
        "iov": {"KAPPA_CL": 0.02},
        "residual": ResidualError(proportional=0.2, additive=0.1),
        "covariates": (WEIGHT,),
        "citation": "test",
    }
    fields.update(changes)
    return PopulationModel(**fields)


def test_evaluate_parameters_matches_the_equations():
    model = small_model()
    wt = np.array([35.0, 70.0, 140.0])
    eta = np.array([[0.1, -0.2], [0.0, 0.0], [-0.3, 0.5]])
    kappa = np.array([[0.05], [0.0], [0.0]])
    p = evaluate_parameters(model, {"WT": wt}, eta, kappa)
    np.testing.assert_allclose(p["CL"], 0.3 * (wt / 70) ** 0.75 * np.exp(eta[:, 0] + kappa[:, 0]),
                               rtol=1e-14)
    np.testing.assert_allclose(p["V1"], 4.0 * wt / 70 * np.exp(eta[:, 1]), rtol=1e-14)


def test_variant_by_replacing_theta_is_a_new_model():
    model = small_model()
    faster = dataclasses.replace(model, theta={"TVCL": 0.6, "TVV": 4.0})
    typical = {"WT": 70.0}
    assert evaluate_parameters(faster, typical)["CL"] == pytest.approx(0.6)
    assert evaluate_parameters(model, typical)["CL"] == pytest.approx(0.3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.name = "changed"  # type: ignore[misc]


@pytest.mark.parametrize("changes,words", [
    ({"omega": [[0.09]]}, "must be 2 x 2"),
    ({"omega": [[0.09, 0.2], [0.2, 0.04]]}, "positive semi-definite"),
    ({"omega": [[0.09, 0.01], [0.02, 0.04]]}, "symmetric"),
    ({"parameters": {"CL": TVCL * sp.Symbol("AGE")}}, "lacks"),
    ({"parameters": {"CL": TVCL * sp.Symbol("AGE"), "V1": TVV}}, "AGE"),
])
def test_inconsistent_models_are_refused(changes, words):
    with pytest.raises(ValueError, match=words):
        small_model(**changes)


def test_residual_error_kinds_and_sd():
    f = np.array([0.0, 2.0, 10.0])
    np.testing.assert_allclose(ResidualError(additive=0.5).sd(f), 0.5)
    np.testing.assert_allclose(ResidualError(proportional=0.3).sd(f), 0.3 * f)
    np.testing.assert_allclose(ResidualError(proportional=0.3, additive=0.5).sd(f),
                               np.sqrt(0.25 + (0.3 * f) ** 2))
    assert ResidualError(additive=0.2, log_scale=True).kind == "log-additive"
    with pytest.raises(ValueError):
        ResidualError()
    with pytest.raises(ValueError):
        ResidualError(proportional=-0.1)


def test_equations_render_as_text_and_latex():
    model = load("fasanmade2011")
    text = model.equations()
    assert "CL = " in text and "(ALB/4.1)**CL_ALB" in text and "CL_ALB = -0.855" in text
    latex = model.equations("latex")
    assert "\\mathrm{CL}" in latex and "\\eta_{CL}" in latex
    with pytest.raises(ValueError):
        model.equations("html")


def test_covariate_checks_name_column_row_and_id():
    model = small_model()
    table = pd.DataFrame({"ID": [3, 3, 4], "WT": [30.0, 0.0, 30.0]})
    with pytest.raises(CovariateError, match=r"column 'WT', row 1 \(ID 3\).*kg between"):
        check_covariates(model, table)
    with pytest.raises(CovariateError, match="column 'WT' is missing"):
        check_covariates(model, table.drop(columns="WT"))
    with pytest.warns(CovariateWarning, match=r"row 0 \(ID 3\).*outside 20-120"):
        check_covariates(model, table.assign(WT=[10.0, 30.0, 30.0]))


def test_typical_covariates():
    assert typical_covariates(small_model()) == {"WT": 70.0}
    with pytest.raises(CovariateError, match="no reference value"):
        typical_covariates(load("passot2016"))


def test_aliases_and_modelled_dose_parameters_without_rebuilding():
    """The Wojciechowski NONMEM set names antibodies ADA and models a 2-h infusion (D1 for
    RATE=-2): with_aliases and with_parameters give the same predictions as renaming the
    column and writing the equations out again."""
    base = load("xu2012")
    table = pd.DataFrame({"ID": 1, "TIME": [0.0, 14.0], "AMT": [350.0, 0.0],
                          "RATE": [-2.0, 0.0], "EVID": [1, 0], "MDV": [1, 1],
                          "WT": 70.0, "ALB": 3.5, "ADA": [0, 1]})
    model = base.with_aliases({"ADA": "ATI"}).with_parameters(D1=2 / 24)
    rebuilt = dataclasses.replace(base, parameters={**base.parameters,
                                                    "D1": sp.Float(2) / 24})
    got = predict(model, table)["PRED"].to_numpy()
    expected = predict(rebuilt, table.rename(columns={"ADA": "ATI"}))["PRED"].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-14)
    assert got[1] > 0
    with pytest.raises(ValueError, match="not a covariate"):
        base.with_aliases({"X": "CRP"})
    with pytest.raises(ValueError, match="dose modifier"):
        base.with_parameters(KA=1.0)


@pytest.mark.parametrize("name", available())
def test_equations_written_out_equal_sympy_lambdify(name):
    """Every built-in model's equations, compiled by pkmodel's own writer (or by lambdify
    where it declines), agree with sympy.lambdify within 1e-14 relative at 200 random
    covariate and ETA values (THETAs as published)."""
    model = load(name)
    symbols = [sp.Symbol(n) for n in (*model.theta, *model.covariate_names,
                                      *model.eta_names, *model.iov)]
    rng = np.random.default_rng(7)
    values = [float(v) for v in model.theta.values()] + [
        rng.uniform(0.2, 3.0, 200) for _ in symbols[len(model.theta):]]
    for parameter, expr in model.parameters.items():
        ours = np.asarray(_compile(symbols, expr)(*values), dtype=float)
        theirs = np.asarray(sp.lambdify(symbols, expr, modules=[np])(*values), dtype=float)
        np.testing.assert_allclose(ours, theirs, rtol=1e-14, err_msg=parameter)


def test_equation_writer_covers_arithmetic_and_declines_the_rest():
    """Numbers (integer, rational, float), +, *, powers, exp, log, sqrt, comparisons and
    Piecewise are written out (a square root of a negative number is nan, not complex; a
    Piecewise is nan where no condition holds, as lambdify's); another function is left to
    lambdify (None), as is a symbol that is not an argument."""
    x, y = sp.symbols("x y")
    expr = (sp.Rational(3, 4) * x + 2) ** sp.Float(0.5) * sp.exp(-y) + sp.log(x) / sp.sqrt(y)
    f = _compile([x, y], sp.UnevaluatedExpr(expr))
    assert f(2.0, 0.5) == pytest.approx(
        3.5 ** 0.5 * np.exp(-0.5) + np.log(2.0) / np.sqrt(0.5), rel=1e-15)
    assert _numpy_source(expr, {"x": 0, "y": 1}) is not None
    assert _numpy_source(sp.sin(x), {"x": 0}) is None
    assert _numpy_source(x + y, {"x": 0}) is None
    piecewise = sp.Piecewise((x, y > 0), (2 * x, sp.Le(y, -1)), (y, True))
    assert _numpy_source(piecewise, {"x": 0, "y": 1}) is not None
    np.testing.assert_array_equal(_compile([x, y], piecewise)(2.0, np.array([1.0, -1.0, -0.5])),
                                  [2.0, 4.0, -0.5])
    partial = sp.Piecewise((x, sp.Eq(y, 1)), (-x, sp.Ne(y, 2) & (y < 0)))  # no default
    assert np.isnan(_compile([x, y], sp.Piecewise((x, sp.Eq(y, 1))))(3.0, 0.0))
    assert _compile([x, y], sp.Piecewise((x, sp.Eq(y, 1))))(3.0, 1.0) == 3.0
    assert _numpy_source(partial, {"x": 0, "y": 1}) is None  # And is not written out
    with np.errstate(invalid="ignore"):  # numpy's square root, as lambdify's: nan below 0
        assert np.isnan(_compile([x], sp.sqrt(x))(-4.0))


def test_parameter_slopes_are_the_equations_derivatives():
    """``CL = TVCL (WT/70)^0.75 exp(ETA_CL + KAPPA_CL)``, ``V1 = TVV WT/70 exp(ETA_V)``:
    dCL/dETA_CL = dCL/dKAPPA_CL = CL, dV1/dETA_V = V1, every other slope 0 (by hand)."""
    model = small_model()
    wt = np.array([35.0, 70.0, 140.0])
    eta = np.array([[0.1, -0.2], [0.0, 0.0], [-0.3, 0.5]])
    kappa = np.array([[0.05], [0.0], [-0.1]])
    p = evaluate_parameters(model, {"WT": wt}, eta, kappa)
    d = evaluate_parameter_slopes(model, {"WT": wt}, eta, kappa)
    assert d["CL"].shape == d["V1"].shape == (3, 3)  # ETA_CL, ETA_V, KAPPA_CL
    np.testing.assert_allclose(d["CL"][:, [0, 2]], np.stack([p["CL"]] * 2, axis=1),
                               rtol=1e-14)
    np.testing.assert_allclose(d["V1"][:, 1], p["V1"], rtol=1e-14)
    assert (d["CL"][:, 1] == 0).all() and (d["V1"][:, [0, 2]] == 0).all()


def test_parameter_slopes_of_a_piecewise_equation_with_positive_symbols():
    """Symbols with assumptions and a Piecewise in the ETA: the slope is that of the branch
    taken, ``2 TVV ETA_V`` below 0 and ``TVV exp(ETA_V)`` above (by hand)."""
    eta_v = sp.Symbol("ETA_V", real=True)
    tvv = sp.Symbol("TVV", positive=True)
    model = small_model(parameters={
        "CL": TVCL * sp.exp(ETA_CL),
        "V1": sp.Piecewise((tvv * (1 + eta_v**2), eta_v < 0), (tvv * sp.exp(eta_v), True))})
    eta = np.array([[0.0, -0.5], [0.0, 0.3]])
    d = evaluate_parameter_slopes(model, {"WT": np.array([70.0, 70.0])}, eta)
    np.testing.assert_allclose(d["V1"][:, 1], [4.0 * 2 * -0.5, 4.0 * np.exp(0.3)],
                               rtol=1e-14)


@pytest.mark.parametrize("name", available())
def test_parameter_slopes_agree_with_central_differences(name):
    """Every published model's stored slopes against central differences of its
    equations (step 1e-6: agreement to about 1e-8 relative is what differences allow)."""
    model = load(name)
    rng = np.random.default_rng(3)
    cov = {c.name: rng.uniform(*(c.observed or (0.5, 2.0)), 50) for c in model.covariates}
    effects = (*model.eta_names, *model.kappa_names)
    x = rng.normal(0.0, 0.3, (50, len(effects)))
    n_eta = len(model.eta_names)

    def params(v: np.ndarray) -> dict[str, np.ndarray]:
        return evaluate_parameters(model, cov, v[:, :n_eta],
                                   v[:, n_eta:] if model.kappa_names else None)

    d = evaluate_parameter_slopes(model, cov, x[:, :n_eta],
                                  x[:, n_eta:] if model.kappa_names else None)
    h = 1e-6
    for j in range(len(effects)):
        step = np.zeros(len(effects))
        step[j] = h
        up, down = params(x + step), params(x - step)
        for parameter in model.structure.parameter_names:
            np.testing.assert_allclose(d[parameter][:, j], (up[parameter] - down[parameter])
                                       / (2 * h), rtol=1e-7, atol=1e-9,
                                       err_msg=f"{parameter} by {effects[j]}")

"""Exact derivatives: the predictions' sensitivities (pkmodel.sensitivity) against central
differences of predict(), and the FOCE-I / FOCE gradient (pkmodel.gradient) against
central differences of the population objective, on structures, dose kinds and error
models the library fits. Exact derivatives are the limits the differences approach: they
agree to the differences' own error (about 1e-7 relative for first derivatives, 1e-4 for
second), and a wrong term (a missing chain-rule product, a sign) shows far above it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import sympy as sp

from pkmodel.data import validate
from pkmodel.engine import Structure
from pkmodel.estimate import estimate_map
from pkmodel.gradient import fo_gradient, focei_gradient, focei_gradient_unsupported
from pkmodel.model import Covariate, PopulationModel, ResidualError
from pkmodel.population import _layout, estimate_population, population_objective
from pkmodel.predict import predict, simulate
from pkmodel.sensitivity import prediction_sensitivities, sensitivities_unsupported

TVCL, TVV, TVQ, TVV2, TVKA, CL_WT = sp.symbols("TVCL TVV TVQ TVV2 TVKA CL_WT")
ETA_CL, ETA_V, ETA_KA = sp.symbols("ETA_CL ETA_V ETA_KA")
WT = sp.Symbol("WT")


def make_model(structure: Structure, residual: ResidualError, *,
               block: bool = False) -> PopulationModel:
    """CL with a weight exponent, V1 (and Q, V2, KA) in L and h; ETAs on CL, V1 (KA)."""
    theta = {"TVCL": 4.0, "CL_WT": 0.75, "TVV": 50.0}
    params = {"CL": TVCL * (WT / 70) ** CL_WT * sp.exp(ETA_CL), "V1": TVV * sp.exp(ETA_V)}
    etas = ["ETA_CL", "ETA_V"]
    if structure.n_compartments == 2:
        theta.update(TVQ=8.0, TVV2=80.0)
        params.update(Q=TVQ * (WT / 70) ** 0.75, V2=TVV2)
    if structure.depot:
        theta["TVKA"] = 1.2
        params["KA"] = TVKA * sp.exp(ETA_KA)
        etas.append("ETA_KA")
    omega = np.diag([0.09, 0.04, 0.16][:len(etas)])
    if block:
        omega[0, 1] = omega[1, 0] = 0.02
    return PopulationModel("case", structure, theta, params, omega, tuple(etas), residual,
                           covariates=(Covariate("WT", "kg", "weight", (1.0, 300.0)),),
                           time_unit="h")


def make_data(model: PopulationModel, kind: str, n_ids: int = 8, seed: int = 3
              ) -> pd.DataFrame:
    """Two 100-mg doses (bolus, 1-h infusion by DUR, 2-h by RATE, or oral into the depot)
    at 0 and 24 h, samples at 0.5, 2, 6, 12, 30 and 48 h, an other-event record (EVID 2)
    at 40 h; weights 20-90 kg; DV simulated from the model itself."""
    rows = []
    for i in range(n_ids):
        weight = 20.0 + 70.0 * i / max(1, n_ids - 1)
        for t in (0.0, 24.0):
            rows.append({"ID": i + 1, "TIME": t, "AMT": 100.0, "EVID": 1, "MDV": 1,
                         "CMT": 1, "WT": weight,
                         "DUR": 1.0 if kind == "dur" else 0.0,
                         "RATE": 50.0 if kind == "rate" else 0.0})
        for t in (0.5, 2.0, 6.0, 12.0, 30.0, 48.0):
            rows.append({"ID": i + 1, "TIME": t, "AMT": 0.0, "EVID": 0, "MDV": 0,
                         "CMT": 0, "WT": weight, "DUR": 0.0, "RATE": 0.0})
        rows.append({"ID": i + 1, "TIME": 40.0, "AMT": 0.0, "EVID": 2, "MDV": 1,  # no matter
                     "CMT": 0, "WT": weight, "DUR": 0.0, "RATE": 0.0})
    design = pd.DataFrame(rows).sort_values(["ID", "TIME"], kind="stable")
    design = design.reset_index(drop=True)
    out = design.assign(DV=np.nan)
    dv = simulate(model, design, n=1, seed=seed)["DV"].to_numpy()
    out.loc[out["EVID"] == 0, "DV"] = np.abs(dv)  # an additive error may draw below 0
    return out


CASES = [
    ("1-cmt bolus", Structure(1), "bolus"),
    ("1-cmt infusion (DUR)", Structure(1), "dur"),
    ("2-cmt infusion (RATE)", Structure(2), "rate"),
    ("2-cmt bolus", Structure(2), "bolus"),
    ("1-cmt oral", Structure(1, depot=True), "bolus"),
    ("2-cmt oral", Structure(2, depot=True), "bolus"),
]


def ipred(model: PopulationModel, table: pd.DataFrame, eta: np.ndarray) -> np.ndarray:
    return predict(model, table, eta)["IPRED"].to_numpy()


def check_first_derivative(model, table, eta, s, a, h):
    """Assert the sensitivities in ETA ``a`` equal central differences (step ``h``) of
    IPRED; returns the step and the IPREDs at ``eta +- step``."""
    step = np.zeros_like(eta)
    step[:, a] = h
    up, down = ipred(model, table, eta + step), ipred(model, table, eta - step)
    np.testing.assert_allclose(s.eta[..., a][s.mask], ((up - down) / (2 * h))[s.rows[s.mask]],
                               rtol=1e-6, atol=1e-9)
    return step, up, down


@pytest.mark.parametrize("name, structure, kind", CASES, ids=[c[0] for c in CASES])
def test_sensitivities_equal_the_limits_of_differences(name, structure, kind):
    model = make_model(structure, ResidualError(proportional=0.1))
    table = validate(make_data(model, kind), covariates=model.covariate_names)
    eta = np.random.default_rng(1).normal(0.0, 0.3, (8, len(model.eta_names)))
    thetas = tuple(model.theta)
    s = prediction_sensitivities(model, table, eta, thetas=thetas)
    rows, mask = s.rows[s.mask], s.mask
    base = ipred(model, table, eta)
    np.testing.assert_allclose(s.value[mask], base[rows], rtol=1e-12)
    h = 1e-4
    for a in range(eta.shape[1]):
        step, _, _ = check_first_derivative(model, table, eta, s, a, h)
        for c in range(a + 1):
            other = np.zeros_like(eta)
            other[:, c] = h
            second = (ipred(model, table, eta + step + other)
                      - ipred(model, table, eta - step + other)
                      - ipred(model, table, eta + step - other)
                      + ipred(model, table, eta - step - other)) / (4 * h * h)
            np.testing.assert_allclose(s.eta_eta[..., a, c][mask], second[rows],
                                       rtol=1e-4, atol=1e-6)
        for j, theta in enumerate(thetas):
            value = model.theta[theta]
            dt = 1e-4 * abs(value)
            plus = model.with_values({theta: value + dt})
            minus = model.with_values({theta: value - dt})
            cross = (ipred(plus, table, eta + step) - ipred(plus, table, eta - step)
                     - ipred(minus, table, eta + step)
                     + ipred(minus, table, eta - step)) / (4 * h * dt)
            np.testing.assert_allclose(s.eta_theta[..., a, j][mask], cross[rows],
                                       rtol=1e-4, atol=1e-6)
    for j, theta in enumerate(thetas):
        value = model.theta[theta]
        dt = 1e-6 * abs(value)
        diff = (ipred(model.with_values({theta: value + dt}), table, eta)
                - ipred(model.with_values({theta: value - dt}), table, eta)) / (2 * dt)
        np.testing.assert_allclose(s.theta[..., j][mask], diff[rows], rtol=1e-6, atol=1e-9)


def objective_differences(model, table, layout, method):
    """Richardson-extrapolated central differences of population_objective in each natural
    parameter, steps 2 % and 1 % of its value: truncation error O(h^4), and steps large
    against the inner modes' tolerance (smaller steps, 0.01 %, drown the OMEGA entries'
    differences in it)."""
    values = layout.natural(model)

    def central(k: int, relative: float) -> float:
        h = relative * abs(values[k])
        plus, minus = values.copy(), values.copy()
        plus[k] += h
        minus[k] -= h
        return (population_objective(layout.model_at(plus), table, method=method)
                - population_objective(layout.model_at(minus), table, method=method)) / (2 * h)

    return np.array([(4 * central(k, 1e-2) - central(k, 2e-2)) / 3
                     for k in range(values.size)])


GRADIENT_CASES = [
    ("proportional, FOCE-I", Structure(1), "bolus", ResidualError(proportional=0.1),
     "foce-i", False),
    ("combined, FOCE-I, OMEGA block", Structure(2), "rate",
     ResidualError(proportional=0.1, additive=0.05), "foce-i", True),
    ("additive, FOCE-I, oral", Structure(1, depot=True), "bolus",
     ResidualError(additive=0.2), "foce-i", False),
    ("log-additive, FOCE-I", Structure(1), "dur", ResidualError(additive=0.15,
                                                                  log_scale=True),
     "foce-i", False),
    ("combined, FOCE", Structure(1), "bolus", ResidualError(proportional=0.1,
                                                             additive=0.05), "foce", True),
    ("censored (M3 and ULOQ), combined, FOCE-I", Structure(2), "dur",
     ResidualError(proportional=0.1, additive=0.05), "foce-i", True),
    ("censored (M3), log-additive, FOCE-I", Structure(1, depot=True), "bolus",
     ResidualError(additive=0.15, log_scale=True), "foce-i", False),
    ("censored (M3), proportional, FOCE", Structure(1), "bolus",
     ResidualError(proportional=0.1), "foce", False),
]


@pytest.mark.parametrize("name, structure, kind, residual, method, block", GRADIENT_CASES,
                         ids=[c[0] for c in GRADIENT_CASES])
def test_the_exact_gradient_equals_differences_of_the_objective(name, structure, kind,
                                                                 residual, method, block):
    truth = make_model(structure, residual, block=block)
    data = make_data(truth, kind)
    if name.startswith("censored"):  # about a fifth of the samples below the LLOQ
        measured = data["DV"].dropna()
        data = data.assign(LLOQ=float(measured.quantile(0.2)))
        if "ULOQ" in name:  # and a tenth above the ULOQ
            data = data.assign(ULOQ=float(measured.quantile(0.9)))
    table = validate(data, covariates=truth.covariate_names)
    # Away from the truth, where the gradient is large and every term counts.
    model = truth.with_values({k: v * 1.15 for k, v in truth.theta.items()},
                              omega=truth.omega * 1.3)
    layout = _layout(model, (), None)
    from pkmodel.estimate import estimate_map
    fit = estimate_map(model, table, tol=1e-14, interaction=method == "foce-i")
    eta = fit.individuals[list(model.eta_names)].to_numpy()
    exact = focei_gradient(model, table, eta, thetas=layout.thetas,
                           omega_pairs=layout.omega_pairs, sigmas=layout.sigmas,
                           interaction=method == "foce-i").sum(axis=0)
    differences = objective_differences(model, table, layout, method)
    scale = np.maximum(np.abs(differences), 1e-2 * np.abs(differences).max())
    assert np.max(np.abs(exact - differences) / scale) < 1e-4, (layout.names, exact,
                                                                 differences)


@pytest.mark.parametrize("name, structure, kind, residual, block", [
    ("combined, 2-cmt infusion, OMEGA block", Structure(2), "rate",
     ResidualError(proportional=0.1, additive=0.05), True),
    ("additive, oral", Structure(1, depot=True), "bolus", ResidualError(additive=0.3), False),
], ids=["combined, 2-cmt infusion, OMEGA block", "additive, oral"])
def test_the_exact_fo_gradient_equals_differences_of_the_objective(name, structure, kind,
                                                                    residual, block):
    """FO has no inner problem, so plain central differences (step 1e-5 relative) are
    accurate to about 1e-8 here: the exact gradient agrees to 1e-6."""
    truth = make_model(structure, residual, block=block)
    table = validate(make_data(truth, kind), covariates=truth.covariate_names)
    model = truth.with_values({k: v * 1.15 for k, v in truth.theta.items()},
                              omega=truth.omega * 1.3)
    layout = _layout(model, (), None)
    exact = fo_gradient(model, table, thetas=layout.thetas, omega_pairs=layout.omega_pairs,
                        sigmas=layout.sigmas).sum(axis=0)
    values = layout.natural(model)
    for k in range(values.size):
        h = 1e-5 * abs(values[k])
        plus, minus = values.copy(), values.copy()
        plus[k] += h
        minus[k] -= h
        difference = (population_objective(layout.model_at(plus), table, method="fo")
                      - population_objective(layout.model_at(minus), table, method="fo")
                      ) / (2 * h)
        assert exact[k] == pytest.approx(difference, rel=1e-6, abs=1e-6), layout.names[k]


def test_the_transform_jacobian_equals_differences():
    model = make_model(Structure(2), ResidualError(proportional=0.1, additive=0.05),
                       block=True)
    layout = _layout(model, (), {"TVCL": (0.1, 40.0), "TVV": (1.0, None),
                                 "CL_WT": (None, 3.0)})
    x = layout.to_x(layout.natural(model)) + 0.1
    eye = np.eye(x.size) * 1e-6
    differences = np.stack([(layout.from_x(x + e) - layout.from_x(x - e)) / 2e-6
                            for e in eye], axis=1)
    np.testing.assert_allclose(layout.jacobian(x), differences, atol=1e-8)


def test_a_fit_says_which_gradient_it_used():
    """Exact for a one-compartment bolus model (and it reaches the optimum: the exact
    gradient is about 0 there), by FOCE-I and by FO; differences, with the reason, for a
    model whose parameters change within an ID."""
    truth = make_model(Structure(1), ResidualError(proportional=0.1))
    data = make_data(truth, "bolus", n_ids=12)
    start = truth.with_values({"TVCL": 3.0, "TVV": 40.0, "CL_WT": 0.75})
    fit = estimate_population(start, data, covariance=False)
    assert fit.success and fit.gradient == "exact"
    layout = _layout(fit.model, (), None)
    eta = fit.individuals[list(fit.model.eta_names)].to_numpy()
    table = validate(data, covariates=truth.covariate_names)
    at_optimum = focei_gradient(fit.model, table, eta, thetas=layout.thetas,
                                omega_pairs=layout.omega_pairs,
                                sigmas=layout.sigmas).sum(axis=0)
    x = layout.to_x(layout.natural(fit.model))
    assert np.abs(layout.jacobian(x).T @ at_optimum).max() < 1e-2
    fo = estimate_population(start, data, method="fo", covariance=False)
    assert fo.success and fo.gradient == "exact"
    varying = data.assign(WT=data["WT"] + 0.1 * data["TIME"])
    changing = estimate_population(start, varying, covariance=False, max_iter=2)
    assert changing.gradient == "differences: covariates changing within an ID (['WT'])"


def test_where_exact_sensitivities_do_not_apply_is_said():
    one = make_model(Structure(1), ResidualError(proportional=0.1))
    table = validate(make_data(one, "bolus", n_ids=2), covariates=one.covariate_names)
    assert sensitivities_unsupported(one, table) is None
    three = PopulationModel("three", Structure(3), {"TVCL": 1.0},
                            {"CL": TVCL * sp.exp(ETA_CL), "V1": sp.Float(10),
                             "Q": sp.Float(1), "V2": sp.Float(5), "Q3": sp.Float(1),
                             "V3": sp.Float(5)}, [[0.1]], ("ETA_CL",),
                            ResidualError(proportional=0.1))
    assert sensitivities_unsupported(three, table) == "more than two disposition compartments"
    lagged = one.with_parameters(ALAG1=0.5)
    assert sensitivities_unsupported(lagged, table) == "dose modifiers ['ALAG1']"
    steady = table.copy()
    steady.loc[steady["EVID"] == 1, ["SS", "II"]] = [1, 24.0]
    assert sensitivities_unsupported(one, steady) == "steady-state doses"
    reset = table.copy()
    reset.loc[reset.index[3], "EVID"] = 3
    assert sensitivities_unsupported(one, reset) == "resets (EVID 3 or 4)"
    other = table.copy()
    other.loc[other.index[3], ["EVID", "MDV"]] = [2, 1]  # an other-event record: no matter
    assert sensitivities_unsupported(one, other) is None
    oral = make_model(Structure(1, depot=True), ResidualError(proportional=0.1))
    infused = validate(make_data(oral, "dur", n_ids=2), covariates=oral.covariate_names)
    assert sensitivities_unsupported(oral, infused) == "infusions into the depot"
    peripheral = make_model(Structure(2), ResidualError(proportional=0.1))
    into_two = table.copy()
    into_two.loc[into_two["EVID"] == 1, "CMT"] = 2
    assert (sensitivities_unsupported(peripheral, into_two)
            == "doses into a peripheral compartment")
    sd_sum = make_model(Structure(1), ResidualError(proportional=0.1, additive=0.1,
                                                    combine="sd"))
    assert focei_gradient_unsupported(sd_sum, table).startswith("a combined error adding")
    with pytest.raises(ValueError, match="exact sensitivities do not apply: steady-state"):
        prediction_sensitivities(one, steady, np.zeros((2, 2)))


def test_symbols_with_assumptions_are_differentiated_by_name():
    """A model written with ``Symbol("TVCL", positive=True)`` predicts by name; its
    derivatives must be taken by name too (they were all 0, and a fit stopped at its
    start with an "exact" gradient)."""
    tvcl, tvv = sp.symbols("TVCL TVV", positive=True)
    eta_cl, eta_v = sp.symbols("ETA_CL ETA_V", real=True)
    plain = make_model(Structure(1), ResidualError(proportional=0.1))
    model = PopulationModel("assumed", Structure(1), {"TVCL": 4.0, "TVV": 50.0},
                            {"CL": tvcl * sp.exp(eta_cl), "V1": tvv * sp.exp(eta_v)},
                            np.diag([0.09, 0.04]), ("ETA_CL", "ETA_V"),
                            ResidualError(proportional=0.1), time_unit="h")
    table = validate(make_data(plain, "bolus", n_ids=3).drop(columns="WT"))
    eta = np.full((3, 2), 0.1)
    s = prediction_sensitivities(model, table, eta, thetas=("TVCL", "TVV"))
    h = 1e-6
    up = ipred(model.with_values({"TVCL": 4.0 + h}), table, eta)
    down = ipred(model.with_values({"TVCL": 4.0 - h}), table, eta)
    expected = ((up - down) / (2 * h))[s.rows[s.mask]]
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(s.theta[..., 0][s.mask], expected, rtol=1e-6)


@pytest.mark.parametrize("gap", [0.0, 1e-8, 1e-6, 1e-4, -1e-6])
@pytest.mark.parametrize("n", [1, 2])
def test_sensitivities_hold_as_ka_nears_a_disposition_rate(gap, n):
    """KA = lam (1 + gap) for lam the elimination rate (1 compartment) or the slower mode
    (2): the quotient (exp(-lam t) - exp(-ka t)) / (ka - lam) loses every digit there
    (its second derivative was off by 25 % at a gap of 1e-5, by 1e6 at 1e-7, and NaN at
    0); written with G(x) = (1 - exp(-x)) / x it matches differences of the engine, which
    treats equality exactly."""
    model = make_model(Structure(n, depot=True), ResidualError(proportional=0.1))
    k10 = 4.0 / 50.0
    if n == 1:
        lam = k10
    else:
        k12, k21 = 8.0 / 50.0, 8.0 / 80.0
        total = k10 + k12 + k21
        lam = 2 * k10 * k21 / (total + np.sqrt(total**2 - 4 * k10 * k21))
    model = model.with_values({"TVKA": lam * (1 + gap)})
    data = make_data(model, "bolus", n_ids=2)
    table = validate(data.assign(WT=70.0), covariates=model.covariate_names)
    eta = np.zeros((2, len(model.eta_names)))
    s = prediction_sensitivities(model, table, eta)
    rows, mask = s.rows[s.mask], s.mask
    assert np.isfinite(s.eta_eta).all()
    h = 1e-4
    for a in range(eta.shape[1]):
        _, up, down = check_first_derivative(model, table, eta, s, a, h)
        centre = ipred(model, table, eta)
        second = (up - 2 * centre + down) / h**2
        np.testing.assert_allclose(s.eta_eta[..., a, a][mask], second[rows], rtol=1e-4,
                                   atol=1e-6)


def test_a_censored_fit_with_the_exact_gradient_reaches_the_same_optimum():
    """Records below an LLOQ (a fifth of them) and above a ULOQ: the fit takes the exact
    gradient and reaches the optimum the same loop reaches with differences (to 1e-3 in
    OFV and 1e-3 relative in the estimates)."""
    from unittest import mock

    from pkmodel import population
    truth = make_model(Structure(1), ResidualError(proportional=0.1, additive=0.05))
    data = make_data(truth, "bolus", n_ids=12)
    measured = data["DV"].dropna()
    data = data.assign(LLOQ=float(measured.quantile(0.2)),
                       ULOQ=float(measured.quantile(0.95)))
    start = truth.with_values({"TVCL": 3.0, "TVV": 40.0})
    exact = estimate_population(start, data, covariance=False)
    with mock.patch.object(population._Objective, "gradient",
                           population._Objective.difference_gradient):
        differences = estimate_population(start, data, covariance=False)
    assert exact.gradient == "exact" and exact.success and differences.success
    assert exact.ofv == pytest.approx(differences.ofv, abs=1e-3)
    np.testing.assert_allclose(exact.estimates["ESTIMATE"], differences.estimates["ESTIMATE"],
                               rtol=1e-3)


def test_censored_records_coded_zero_give_the_same_gradient():
    """Records below the LLOQ often carry DV = 0; their term uses the LLOQ only, so the
    objective and the exact gradient must not change (with a log-additive error the
    gradient was NaN: 0 x log(0))."""
    truth = make_model(Structure(1, depot=True), ResidualError(additive=0.15,
                                                                  log_scale=True))
    data = make_data(truth, "bolus")
    lloq = float(data["DV"].dropna().quantile(0.2))
    data = data.assign(LLOQ=lloq)
    zeroed = data.assign(DV=np.where(data["DV"] < lloq, 0.0, data["DV"]))
    assert (zeroed["DV"] == 0).sum() > 5
    model = truth.with_values({k: v * 1.15 for k, v in truth.theta.items()})
    layout = _layout(model, (), None)
    grads = []
    for frame in (data, zeroed):
        table = validate(frame, covariates=model.covariate_names)
        fit = estimate_map(model, table, tol=1e-14)
        eta = fit.individuals[list(model.eta_names)].to_numpy()
        grads.append(focei_gradient(model, table, eta, thetas=layout.thetas,
                                    omega_pairs=layout.omega_pairs,
                                    sigmas=layout.sigmas).sum(axis=0))
    assert np.isfinite(grads[1]).all()
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-6)

"""Population estimation: pheno_real (59 neonates, FOCE-I) and runN032 (120 IDs, two
compartments) from their initial values.

Read from ../shared/validation/population (skipped when absent). Baselines in the same
run: the same objective minimised by scipy's BFGS with its own forward-difference gradient
(step 1.5e-8), from the same transformed start; and pkmodel's own outer loop with the
gradient taken by differences (forward, step 1e-5; central, step 1e-3, once the gradient
is below 1) on inner modes converged to 1e-14, as before the exact gradient. NONMEM 7.4.2
needs about a second for pheno_real and 20.7 s CPU for runN032 (not measured here: no
NONMEM on this machine).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar
from unittest import mock

import numpy as np
import pandas as pd
import sympy as sp
from scipy import optimize

from pkmodel import population as pop
from pkmodel.engine import Structure
from pkmodel.model import Covariate, PopulationModel, ResidualError

FOLDER = Path(__file__).resolve().parents[2] / "shared" / "validation" / "population"


class PhenoReal:
    """FOCE-I fit of pheno_real from the initial values of its .ext."""

    ofv: ClassVar[dict[str, float]] = {}  # kept across the runner's setup() calls

    def setup(self) -> None:
        path = FOLDER / "pheno.dta"
        if not path.exists():
            raise NotImplementedError(f"validation data absent: {path}")
        raw = pd.read_csv(path, sep=r"\s+")
        dose = raw["AMT"] > 0
        self.data = raw.assign(EVID=dose.astype(int), MDV=dose.astype(int),
                               DV=np.where(dose, np.nan, raw["DV"]),
                               APGRLOW=(raw["APGR"] < 5).astype(float))
        t1, t2, t3, wgt, low, e1, e2 = sp.symbols("THETA1 THETA2 THETA3 WGT APGRLOW ETA1 ETA2")
        self.model = PopulationModel(
            "pheno", Structure(1), {"THETA1": 4.69307e-3, "THETA2": 1.00916, "THETA3": 0.1},
            {"CL": t1 * wgt * sp.exp(e1), "V1": t2 * wgt * (1 + t3 * low) * sp.exp(e2)},
            np.diag([0.0309626, 0.031128]), ("ETA1", "ETA2"),
            ResidualError(proportional=float(np.sqrt(0.0130865))),
            covariates=(Covariate("WGT", "kg", "birth weight", (0.2, 10.0)),
                        Covariate("APGRLOW", "0/1", "Apgar below 5", (0.0, 1.0))),
            time_unit="h")

    def time_pkmodel_foce_i(self) -> None:
        fit = pop.estimate_population(self.model, self.data, covariance=False)
        self.ofv["pkmodel"] = fit.ofv

    def time_pkmodel_foce_i_with_covariance(self) -> None:
        pop.estimate_population(self.model, self.data)

    def time_pkmodel_foce_i_difference_gradient(self) -> None:
        with mock.patch.object(pop._Objective, "gradient", pop._Objective.difference_gradient):
            fit = pop.estimate_population(self.model, self.data, covariance=False)
        self.ofv["differences"] = fit.ofv

    def time_scipy_bfgs_forward_differences(self) -> None:
        layout = pop._layout(self.model, ())
        objective = pop._Objective(layout, pop.validate(self.data), "nocb")
        objective.warm = objective.fit(layout.natural(self.model), None)
        result = optimize.minimize(objective.at_x, layout.to_x(layout.natural(self.model)),
                                   method="BFGS", options={"maxiter": 200})
        self.ofv["scipy"] = float(result.fun)

    def report(self, seconds: dict[str, float]) -> list[str]:
        ours = seconds["time_pkmodel_foce_i"]
        base = seconds["time_scipy_bfgs_forward_differences"]
        diff = seconds["time_pkmodel_foce_i_difference_gradient"]
        return [(f"pheno_real FOCE-I, exact gradient: {ours:.2f} s (OFV "
                 f"{self.ofv.get('pkmodel', np.nan):.4f}); with the covariance step "
                 f"{seconds['time_pkmodel_foce_i_with_covariance']:.2f} s"),
                (f"  same loop, gradient by differences {diff:.2f} s (OFV "
                 f"{self.ofv.get('differences', np.nan):.4f}); ratio {diff / ours:.2f}"),
                (f"  scipy BFGS with forward differences {base:.1f} s (OFV "
                 f"{self.ofv.get('scipy', np.nan):.4f}; NONMEM 586.2761); ratio "
                 f"{base / ours:.2f}")]


class RunN032:
    """FOCE-I fit of runN032 (BOLUS_2CPT, SD = 1 rows: 120 IDs, 2,280 observations) from
    the first row of its .ext; NONMEM reaches 20167.6400."""

    ofv: ClassVar[dict[str, float]] = {}

    def setup(self) -> None:
        path = FOLDER / "BOLUS_2CPT.csv"
        if not path.exists():
            raise NotImplementedError(f"validation data absent: {path}")
        raw = pd.read_csv(path)
        data = raw[raw["SD"] == 1].drop(columns=["SS", "II", "V1", "CL", "Q", "V2"])
        self.data = data.assign(DV=np.where(data["EVID"] == 1, np.nan, data["DV"]))
        first = next(line.split()[1:] for line in
                     (FOLDER / "runN032.ext").read_text().splitlines()
                     if line.split()[0] == "0")
        values = [float(v) for v in first]
        theta, eta = sp.symbols("THETA1:5"), sp.symbols("ETA1:5")
        self.model = PopulationModel(
            "runN032", Structure(2), {str(t): v for t, v in zip(theta, values[:4])},
            {n: sp.exp(t + e) for n, t, e in zip(("CL", "V1", "Q", "V2"), theta, eta)},
            np.diag([values[6], values[8], values[11], values[15]]),
            tuple(map(str, eta)), ResidualError(proportional=values[4]), time_unit="h")

    def time_pkmodel_foce_i(self) -> None:
        self.ofv["pkmodel"] = pop.estimate_population(self.model, self.data,
                                                      covariance=False).ofv

    def time_pkmodel_foce_i_difference_gradient(self) -> None:
        with mock.patch.object(pop._Objective, "gradient", pop._Objective.difference_gradient):
            fit = pop.estimate_population(self.model, self.data, covariance=False)
        self.ofv["differences"] = fit.ofv

    def report(self, seconds: dict[str, float]) -> list[str]:
        ours = seconds["time_pkmodel_foce_i"]
        diff = seconds["time_pkmodel_foce_i_difference_gradient"]
        return [(f"runN032 FOCE-I, exact gradient: {ours:.2f} s (OFV "
                 f"{self.ofv.get('pkmodel', np.nan):.4f}; NONMEM 20167.6400 in 20.7 s, "
                 f"target < 5 s); gradient by differences {diff:.1f} s (OFV "
                 f"{self.ofv.get('differences', np.nan):.4f}); ratio {diff / ours:.2f}")]

"""MAP estimation: the 100-patient NONMEM infliximab set and one child.

The 100-patient set is read from ../shared/validation (the benchmark is skipped when it is
absent). Baseline for the ratio: the same objective minimised patient by patient with
scipy.optimize.minimize (BFGS, numerical gradients) from zero, measured in the same run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import sympy as sp
from scipy import optimize

from pkmodel import estimate as est
from pkmodel import model as model_module
from pkmodel.data import infliximab_regimen, read_nonmem
from pkmodel.models import load

VALIDATION = Path(__file__).resolve().parents[2] / "shared" / "validation"


class MapInfliximab100:
    """Xu 2012 model, 100 patients x 3 troughs (Wojciechowski 2017 NONMEM set)."""

    def setup(self) -> None:
        path = VALIDATION / "infliximab_wojciechowski_nonmem_map_data.csv"
        if not path.exists():
            raise NotImplementedError(f"validation data absent: {path}")
        model = load("xu2012")
        self.model = dataclasses.replace(model, parameters={**model.parameters,
                                                            "D1": sp.Float(2) / 24})
        self.data = read_nonmem(path).rename(columns={"ADA": "ATI"})
        problem, _ = est._build_problem(self.model, self.data, "nocb")
        self.objective = est._Objective(problem)
        self.n_ids = len(problem.ids)

    def time_map_100_patients_3_starts(self) -> None:
        est.estimate_map(self.model, self.data)

    def time_map_100_patients_1_start(self) -> None:
        est.estimate_map(self.model, self.data, starts=1)

    def time_scipy_bfgs_10_patients(self) -> None:
        for b in range(10):
            ids = np.array([b])
            optimize.minimize(lambda e, ids=ids: self.objective.ofv(e[None, None, :], ids)[0, 0],
                              np.zeros(4), method="BFGS")

    def report(self, seconds: dict[str, float]) -> list[str]:
        ours = seconds["time_map_100_patients_3_starts"]
        scipy_per = seconds["time_scipy_bfgs_10_patients"] / 10
        return [(f"100 patients, 3 starts each: {ours:.2f} s (target < 1 s); 1 start: "
                f"{seconds['time_map_100_patients_1_start']:.2f} s"),
                (f"scipy BFGS on the same objective, one patient at a time, 1 start: "
                f"{scipy_per * 1e3:.1f} ms per patient ({scipy_per * 100:.2f} s for 100)")]


class MapOneChild:
    """Fasanmade 2011 (with IOV): one child, two measured troughs."""

    def setup(self) -> None:
        self.model = load("fasanmade2011")
        table = infliximab_regimen(28.0, until_week=22,
                                   covariates={"ALB": 3.3, "ATI": 0, "IMM": 1})
        samples = table.index[(table["EVID"] == 0) & table["TIME"].isin([98.0, 154.0])]
        table.loc[samples, "MDV"] = 0
        table.loc[samples, "DV"] = [2.1, 1.4]
        self.table = table

    def time_map_one_child(self) -> None:
        est._PROBLEMS.clear()  # a new patient: the records are built
        est.estimate_map(self.model, self.table)

    def time_map_one_child_again(self) -> None:
        est.estimate_map(self.model, self.table)  # the same records: built arrays reused

    def time_map_one_child_first_call(self) -> None:
        est._PROBLEMS.clear()  # a new patient, and the model's equations compiled anew
        model_module._COMPILED.clear()
        est.estimate_map(dataclasses.replace(self.model), self.table)

    def report(self, seconds: dict[str, float]) -> list[str]:
        return [(f"one child (3 ETAs + 4 occasion KAPPAs, 3 starts): "
                 f"{seconds['time_map_one_child'] * 1e3:.1f} ms; the same records again "
                 f"{seconds['time_map_one_child_again'] * 1e3:.1f} ms; the first call "
                 f"(equations compiled) "
                 f"{seconds['time_map_one_child_first_call'] * 1e3:.1f} ms")]


class MapDerivativesOneVisit:
    """One derivative call of a Bayesian trial visit: 200 children of the Kang cohort on
    label dosing to week 54 with a trough before every dose (Fasanmade 2011, 3 ETAs and 8
    occasion KAPPAs), 3 starts each, at ETAs and KAPPAs drawn at 0.2 SD. Exact derivatives
    through the record-by-record solution (pkmodel.tangent) against central differences
    of the same objective (2n + 1 parameter sets per start), in the same run."""

    def setup(self) -> None:
        import pandas as pd

        from pkmodel.trial import kang_cohort

        tables = []
        for i, child in kang_cohort(200, seed=3).reset_index(drop=True).iterrows():
            table = infliximab_regimen(float(child["WT"]), until_week=54, covariates={
                "ALB": float(child["ALB"]), "ATI": 0, "IMM": 1})
            samples = table.index[table["EVID"] == 0]
            table.loc[samples, "MDV"] = 0
            table.loc[samples, "DV"] = 3.0
            tables.append(table.assign(ID=i + 1))
        problem, _ = est._build_problem(load("fasanmade2011"), pd.concat(tables), "nocb")
        self.exact = est._Objective(problem)
        self.differences = est._Objective(problem)
        self.differences.exact = False
        self.ids = np.repeat(np.arange(len(problem.ids)), 3)
        self.eta = np.random.default_rng(0).normal(0.0, 0.2, (self.ids.size,
                                                              problem.n_params))

    def time_exact_derivatives(self) -> None:
        est._derivatives(self.exact, self.eta, self.ids, newton=False)

    def time_central_differences(self) -> None:
        est._derivatives(self.differences, self.eta, self.ids, newton=False)

    def report(self, seconds: dict[str, float]) -> list[str]:
        exact, central = seconds["time_exact_derivatives"], seconds["time_central_differences"]
        return [(f"one visit's derivatives, 600 starts: exact {exact * 1e3:.1f} ms, central "
                 f"differences {central * 1e3:.1f} ms ({central / exact:.1f}x)")]

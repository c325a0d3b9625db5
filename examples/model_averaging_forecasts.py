"""Forecast errors of single models, their weighted average and the selected model.

Children of 36-70 kg (albumin 2.8-4.5 g/dL) are simulated in turn from fasanmade2011,
xu2012 and dubinsky2017 on label dosing; their troughs at weeks 14 and 22 are measured
(with residual error), and each method forecasts the week-30 trough. Prints the mean
absolute error (mg/L) of each. Usage: python examples/model_averaging_forecasts.py [N]
(docs/several_models.md reports N = 90).
"""

from __future__ import annotations

import sys
import warnings

import numpy as np

from pkmodel.averaging import compare_models, predict_averaged
from pkmodel.data import infliximab_regimen
from pkmodel.models import load
from pkmodel.predict import simulate

NAMES = ("fasanmade2011", "xu2012", "dubinsky2017")


def forecast_errors(n: int, seed: int = 5) -> dict[str, float]:
    """Mean absolute error of the week-30 trough forecast per method."""
    models = {name: load(name) for name in NAMES}
    rng = np.random.default_rng(seed)
    errors: dict[str, list[float]] = {k: [] for k in (*NAMES, "BMA", "SELECTED")}
    for i in range(n):
        truth = NAMES[i % len(NAMES)]
        table = infliximab_regimen(float(rng.uniform(36, 70)), until_week=30,
                                   covariates={"ALB": float(rng.uniform(2.8, 4.5)),
                                               "ATI": 0, "IMM": 1})
        sim = simulate(models[truth], table, n=1, seed=100 + i)
        samples = table.index[table["EVID"] == 0]
        days = table.loc[samples, "TIME"].to_numpy()
        measured = np.isin(days, [98.0, 154.0])
        table.loc[samples[measured], "MDV"] = 0
        table.loc[samples[measured], "DV"] = np.maximum(sim["DV"].to_numpy()[measured], 0.05)
        true = sim["IPRED"].to_numpy()[days == 210.0][0]
        result = compare_models(list(models.values()), table[table["TIME"] <= 154.0],
                                draws=300, seed=i)
        forecast = predict_averaged(result, table)
        row = forecast[(forecast["TIME"] == 210.0) & (forecast["EVID"] == 0)].iloc[0]
        for name in NAMES:
            errors[name].append(abs(row[f"IPRED_{name}"] - true))
        errors["BMA"].append(abs(row["IPRED_BMA"] - true))
        errors["SELECTED"].append(abs(row[f"IPRED_{result.selected}"] - true))
    return {k: float(np.mean(v)) for k, v in errors.items()}


if __name__ == "__main__":
    warnings.simplefilter("ignore")  # covariates outside a model's data: expected here
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    for method, error in forecast_errors(count).items():
        print(f"{method:>14}: mean absolute error of the week-30 trough {error:.3f} mg/L")

"""Troughs of infliximab regimens for a 9-year-old, 28-kg child (the engine, end to end).

Typical parameters of the Fasanmade 2011 combined pediatric + adult model (Fasanmade AA
et al., Clin Ther 2011;33(7):946-964, doi:10.1016/j.clinthera.2011.06.002; see
shared/reference/infliximab_models.md, model A) for WT 28 kg, ALB 3.3 g/dL, no
antibodies, on an immunomodulator. No inter-individual variability: these are the
model's typical troughs, not a prediction for a particular child.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pkmodel.data import to_events, validate
from pkmodel.engine import Structure, at_rows, solve

WT, ALB, ATI, IMM = 28.0, 3.3, 0, 1
INFUSION_DAYS = 2.0 / 24.0  # 2-h infusions (label)
TARGET = 6.0  # mg/L, Kang et al. Clin Gastroenterol Hepatol 2026 (proactive arm)

# Fasanmade 2011, model A: per-kg parameters (mL/kg/day, mL/kg); total = per-kg * WT / 1000.
CL = 5.42 * (WT / 65) ** -0.313 * (ALB / 4.1) ** -0.855 * (1 + 0.291 * ATI) * (1 - 0.137 * IMM)
PARAMS = {
    "CL": CL * WT / 1000,
    "V1": 52.4 * (WT / 65) ** -0.233 * WT / 1000,
    "Q": 2.26 * WT / 1000,
    "V2": 19.6 * (WT / 65) ** -0.588 * WT / 1000,
}


def regimen(mg_per_kg: float, every_weeks: int, weeks: int = 54) -> pd.DataFrame:
    """Induction at weeks 0, 2, 6, then every ``every_weeks``; a trough before each dose."""
    dose_weeks = [0, 2, 6] + list(range(6 + every_weeks, weeks + 1, every_weeks))
    amount = mg_per_kg * WT
    rows = []
    for w in dose_weeks:
        if w > 0:
            rows.append({"TIME": 7.0 * w, "EVID": 0, "AMT": 0.0, "RATE": 0.0})
        rows.append({"TIME": 7.0 * w, "EVID": 1, "AMT": amount, "RATE": amount / INFUSION_DAYS})
    if weeks not in dose_weeks:
        rows.append({"TIME": 7.0 * weeks, "EVID": 0, "AMT": 0.0, "RATE": 0.0})
    return pd.DataFrame(rows).assign(ID=1, CMT=1)


def troughs(table: pd.DataFrame) -> pd.DataFrame:
    table = validate(table)
    events = to_events(table, Structure(2))
    amounts = solve(Structure(2), events, PARAMS)
    conc = at_rows(events, amounts[..., 0] / PARAMS["V1"], len(table))[0]
    samples = table["EVID"].to_numpy() == 0
    return pd.DataFrame({"week": table["TIME"][samples] / 7.0, "trough mg/L": conc[samples]})


def main() -> None:
    print("pkmodel: infliximab troughs, 9-year-old child, 28 kg, albumin 3.3 g/dL, on an")
    print("immunomodulator; typical parameters of Fasanmade 2011 (Clin Ther 33:946):")
    print("  " + ", ".join(f"{k} {v:.4g}" for k, v in PARAMS.items()) + " (L, L/day)\n")
    for mg_per_kg, weeks in ((5, 8), (10, 8), (5, 4), (10, 6)):
        table = troughs(regimen(mg_per_kg, weeks))
        maintenance = table[table["week"] > 6]
        lowest = maintenance["trough mg/L"].min()
        verdict = "meets" if lowest >= TARGET else "misses"
        print(f"{mg_per_kg} mg/kg every {weeks} weeks after induction: lowest maintenance "
              f"trough {lowest:.2f} mg/L ({verdict} the {TARGET:g} mg/L target)")
        print("   week  " + "  ".join(f"{w:5.0f}" for w in maintenance["week"]))
        print("   mg/L  " + "  ".join(f"{c:5.2f}" for c in maintenance["trough mg/L"]))
    print("\nDose selection from measured troughs arrives with the dose optimiser.")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()

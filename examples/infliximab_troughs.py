"""Troughs of infliximab regimens for a 9-year-old, 28-kg child (`make demo`).

Model: Fasanmade 2011 (Clin Ther 33:946), pkmodel's default infliximab model, for WT 28 kg,
albumin 3.3 g/dL, no antibodies, on an immunomodulator. Typical values (no variability):
the model's expectation for such a child, before any trough has been measured.
"""

from __future__ import annotations

from pkmodel.data import infliximab_regimen
from pkmodel.model import evaluate_parameters
from pkmodel.models import load
from pkmodel.predict import predict_troughs

CHILD = {"ALB": 3.3, "ATI": 0, "IMM": 1}
WEIGHT = 28.0
TARGET = 6.0  # mg/L: the Kang 2026 proactive-arm target (Clin Gastroenterol Hepatol 2026)


def main() -> None:
    model = load("fasanmade2011")
    params = evaluate_parameters(model, {"WT": WEIGHT, **CHILD})
    print("pkmodel: infliximab troughs for a 9-year-old child, 28 kg, albumin 3.3 g/dL, on an")
    print(f"immunomodulator; typical parameters of {model.name} ({model.citation}):")
    print("  " + ", ".join(f"{k} {float(v):.4g}" for k, v in params.items())
          + " (L/day, L)\n")
    for mg_per_kg, weeks, vials in ((5, 8, None), (10, 8, None), (5, 4, None), (10, 6, 100)):
        table = infliximab_regimen(WEIGHT, mg_per_kg, every_weeks=weeks, vial_mg=vials,
                                   covariates=CHILD)
        troughs = predict_troughs(model, table)
        maintenance = troughs[troughs["TIME"] > 42.0]
        lowest = maintenance["PRED"].min()
        verdict = "meets" if lowest >= TARGET else "misses"
        dose = f"{troughs['AMT'].iloc[0]:g} mg ({mg_per_kg} mg/kg" + (
            ", whole vials)" if vials else ")")
        print(f"{dose} every {weeks} weeks after induction: lowest maintenance trough "
              f"{lowest:.2f} mg/L ({verdict} the {TARGET:g} mg/L target)")
        print("   week  " + "  ".join(f"{t / 7:5.0f}" for t in maintenance["TIME"]))
        print("   mg/L  " + "  ".join(f"{c:5.2f}" for c in maintenance["PRED"]))
    print("\nFrom measured troughs, `pkmodel recommend` picks the smallest change (make demo).")


if __name__ == "__main__":
    main()

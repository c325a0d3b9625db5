"""The ``pkmodel`` command: ``recommend data.csv``, ``predict data.csv`` and ``trial``.

Errors in the input are reported as one message on standard error (exit status 2), never
as a traceback. ``--json`` prints a stable document for programs (schema in docs/cli.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd

from pkmodel.data import read_nonmem
from pkmodel.dosing import Option, Recommendation, recommend_regimen
from pkmodel.errors import PKModelError
from pkmodel.estimate import estimate_map
from pkmodel.models import DEFAULT, available, load
from pkmodel.predict import predict

__all__ = ["main"]

SCHEMA_RECOMMENDATION = "pkmodel.recommendation/1"
SCHEMA_PREDICTION = "pkmodel.prediction/1"
SCHEMA_TRIAL = "pkmodel.trial/1"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pkmodel", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("recommend", help="recommend the next regimen from a patient's "
                                           "history (NONMEM-style CSV)")
    rec.add_argument("data", help="CSV file: doses, measured troughs (MDV 0), covariates")
    rec.add_argument("--model", default=DEFAULT, choices=available())
    rec.add_argument("--target", type=float, default=6.0, help="target trough, mg/L (6)")
    rec.add_argument("--probability", type=float, default=0.5,
                     help="share of posterior draws at or above the target at every trough "
                          "(0.5: expected to)")
    rec.add_argument("--draws", type=int, default=1000, help="posterior draws (1000)")
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument("--json", action="store_true", help="print JSON (docs/cli.md)")
    rec.add_argument("--plot", metavar="PNG", help="write the forecast figure here")
    trial = sub.add_parser("trial", help="virtual trial of dosing strategies, induction to "
                                         "week 54 (Kang 2026 design)")
    trial.add_argument("--n", type=int, default=112, help="children per replicate (112)")
    trial.add_argument("--replicates", type=int, default=20)
    trial.add_argument("--seed", type=int, default=0)
    trial.add_argument("--target", type=float, default=6.0, help="target trough, mg/L (6)")
    trial.add_argument("--arms", default="label,proactive",
                       help="comma-separated: label, proactive, bayesian (slower)")
    trial.add_argument("--model", default=DEFAULT, choices=available())
    trial.add_argument("--json", action="store_true")
    trial.add_argument("--plot", metavar="PNG", help="write the figure here")
    pred = sub.add_parser("predict", help="PRED (and IPRED at the MAP when troughs are "
                                          "measured) for every record")
    pred.add_argument("data")
    pred.add_argument("--model", default=DEFAULT, choices=available())
    pred.add_argument("--json", action="store_true")
    return parser


def _clean(value: Any) -> Any:
    """JSON-safe values: numpy scalars to Python, NaN and infinities to null."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _option(option: Option | None) -> dict[str, Any] | None:
    return None if option is None else asdict(option)


def _troughs(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k.lower(): v for k, v in row.items()} for row in frame.to_dict("records")]


def recommendation_document(rec: Recommendation, model_name: str,
                            data: pd.DataFrame) -> dict[str, Any]:
    """The JSON document of a recommendation (schema ``pkmodel.recommendation/1``)."""
    estimate = None
    if rec.estimate is not None:
        ind = rec.estimate.individuals.iloc[0]
        last = rec.estimate.records.iloc[-1]
        model = rec.estimate.model
        estimate = {
            "eta": {n: ind[n] for n in model.eta_names},
            "parameters": {n: last[n] for n in model.parameters},
            "ofv": ind["OFV"], "converged": bool(ind["SUCCESS"]), "message": ind["MESSAGE"],
        }
    return _clean({
        "schema": SCHEMA_RECOMMENDATION,
        "model": model_name,
        "patient": {"id": data["ID"].iloc[0], "weight_kg": float(data["WT"].iloc[-1])},
        "target_mg_per_l": rec.target,
        "probability": rec.probability,
        "estimate": estimate,
        "next_dose_day": rec.next_dose_day,
        "feasible": rec.feasible,
        "recommended": _option(rec.recommended),
        "closest": _option(rec.closest),
        "dose_only": _option(rec.dose_only),
        "interval_only": _option(rec.interval_only),
        "current": _option(rec.current),
        "troughs": _troughs(rec.troughs),
        "current_troughs": _troughs(rec.current_troughs),
        "message": rec.message,
    })


def _describe(option: Option | None, none: str) -> str:
    if option is None:
        return none
    flag = " [above label]" if option.above_label else ""
    return (f"{option.dose_mg:g} mg ({option.mg_per_kg:.1f} mg/kg) every "
            f"{option.interval_weeks:g} weeks; lowest trough {option.lowest_trough:.2f} mg/L, "
            f"all troughs on target in {option.pta:.0%} of draws{flag}")


def _print_recommendation(rec: Recommendation, model_name: str, data: pd.DataFrame) -> None:
    out = sys.stdout
    pid = data["ID"].iloc[0]
    out.write(f"pkmodel recommend: patient {pid}, {data['WT'].iloc[-1]:g} kg, model "
              f"{model_name}, target {rec.target:g} mg/L\n\n")
    if rec.estimate is None:
        out.write("No measured trough: parameters from the population prior.\n\n")
    else:
        ind = rec.estimate.individuals.iloc[0]
        last = rec.estimate.records.iloc[-1]
        params = ", ".join(f"{n} {last[n]:.4g}" for n in rec.estimate.model.parameters)
        etas = ", ".join(f"{n} {ind[n]:+.3f}" for n in rec.estimate.model.eta_names)
        out.write(f"Estimated parameters (MAP, L/day and L): {params}\n")
        out.write(f"  ETAs: {etas}; fit: {ind['MESSAGE']}\n\n")
    out.write(f"Next dose due: day {rec.next_dose_day:g} (week {rec.next_dose_day / 7:g})\n")
    out.write(f"Current regimen: {_describe(rec.current, '-')}\n")
    out.write(f"Recommended:     {_describe(rec.recommended, 'none within limits')}\n")
    out.write(f"Dose change only:     {_describe(rec.dose_only, 'none within limits')}\n")
    out.write(f"Interval change only: {_describe(rec.interval_only, 'none within limits')}\n\n")
    out.write(rec.message + "\n\n")
    table = rec.troughs.copy()
    table["WEEK"] = table["WEEK"].map(lambda w: "SS" if pd.isna(w) else f"{w:g}")
    shown = table[["WEEK", "MAP", "P10", "P50", "P90", "PTA"]].round(2)
    option = rec.closest
    out.write(f"Troughs (mg/L) on {option.dose_mg:g} mg every {option.interval_weeks:g} weeks "
              "(P10-P90: 80 % band; PTA: share of draws on target):\n")
    out.write(shown.to_string(index=False) + "\n")


def _recommend(args: argparse.Namespace) -> int:
    data = read_nonmem(args.data)
    model = load(args.model)
    rec = recommend_regimen(model, data, args.target, probability=args.probability,
                            n_draws=args.draws, seed=args.seed)
    if args.plot:
        from pkmodel.plot import plot_recommendation

        plot_recommendation(rec, path=args.plot)
    if args.json:
        json.dump(recommendation_document(rec, args.model, data), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_recommendation(rec, args.model, data)
        if args.plot:
            sys.stdout.write(f"\nFigure written to {args.plot}\n")
    return 0


def _predict(args: argparse.Namespace) -> int:
    data = read_nonmem(args.data)
    model = load(args.model)
    measured = "DV" in data.columns and "MDV" in data.columns and (data["MDV"] == 0).any()
    out = estimate_map(model, data).records if measured else predict(model, data)
    columns = [c for c in ("ID", "TIME", "EVID", "AMT", "DV", "PRED", "IPRED") if c in out]
    if args.json:
        json.dump(_clean({"schema": SCHEMA_PREDICTION, "model": args.model,
                          "records": [{k.lower(): v for k, v in r.items()}
                                      for r in out[columns].to_dict("records")]}),
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(out[columns].to_string(index=False) + "\n")
    return 0


def _trial(args: argparse.Namespace) -> int:
    from pkmodel.trial import BayesianDosing, KangProactive, LabelDosing, run_trial

    model = load(args.model)
    known = {"label": LabelDosing(), "proactive": KangProactive(target=args.target),
             "bayesian": BayesianDosing(model, target=args.target)}
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in known]
    if unknown or not arms:
        raise ValueError(f"--arms: unknown {unknown or arms}; choose from {sorted(known)}")
    result = run_trial(model, {a: known[a] for a in arms}, n=args.n,
                       replicates=args.replicates, seed=args.seed, target=args.target,
                       progress=args.replicates > 1)
    if args.plot:
        result.figure(args.plot)
    if args.json:
        json.dump(_clean({"schema": SCHEMA_TRIAL, "model": args.model, "n": args.n,
                          "replicates": args.replicates, "seed": args.seed,
                          "target_mg_per_l": args.target, "arms": arms,
                          "summary": [{k.lower(): v for k, v in row.items()}
                                      for row in result.summary.to_dict("records")]}),
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    table = result.summary.pivot(index="OUTCOME", columns="ARM", values="MEAN")[arms]
    low = result.summary.pivot(index="OUTCOME", columns="ARM", values="LOW")[arms]
    high = result.summary.pivot(index="OUTCOME", columns="ARM", values="HIGH")[arms]
    shown = table.copy().astype(object)
    for arm in arms:
        shown[arm] = [f"{m:.3g} ({lo:.3g}-{hi:.3g})" for m, lo, hi in
                      zip(table[arm], low[arm], high[arm])]
    sys.stdout.write(f"pkmodel trial: {args.replicates} replicate(s) of {args.n} children, "
                     f"model {args.model}, target {args.target:g} mg/L, seed {args.seed}\n"
                     "mean over replicates (2.5-97.5 percentiles):\n")
    sys.stdout.write(shown.to_string() + "\n")
    if args.plot:
        sys.stdout.write(f"Figure written to {args.plot}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    commands = {"recommend": _recommend, "predict": _predict, "trial": _trial}
    try:
        return commands[args.command](args)
    except (PKModelError, ValueError, OSError) as err:
        sys.stderr.write(f"pkmodel: error: {err}\n")
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

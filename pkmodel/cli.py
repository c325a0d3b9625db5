"""The ``pkmodel`` command: ``recommend data.csv``, ``predict data.csv``, ``trial`` and
``fit MODEL data.csv --out FOLDER``.

Errors are reported as one message on standard error (exit status 2 for usage, 4 for the
data; with ``--json`` also as a JSON document), never as a traceback; a refused
recommendation, or a population fit whose minimisation did not succeed, exits with status
3. ``--json`` prints a stable document for programs (schema in docs/cli.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import runpy
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pkmodel import __version__
from pkmodel.data import from_clinical, plain_json, read_clinical, read_nonmem, validate
from pkmodel.dosing import OBJECTIVES, Option, Recommendation, level_name, recommend_regimen
from pkmodel.errors import PKModelError
from pkmodel.estimate import estimate_map
from pkmodel.model import PopulationModel
from pkmodel.models import DEFAULT, available, load
from pkmodel.predict import predict, with_samples

__all__ = ["main"]

SCHEMA_RECOMMENDATION = "pkmodel.recommendation/2"
SCHEMA_PREDICTION = "pkmodel.prediction/1"
SCHEMA_TRIAL = "pkmodel.trial/1"
SCHEMA_FIT = "pkmodel.fit/1"
SCHEMA_ERROR = "pkmodel.error/1"
#: Exit statuses: 0 done (a recommendation of any status but refused), 1 internal error,
#: 2 usage (a flag or its value), 3 recommendation refused (the data cannot be trusted for
#: dosing) or population minimisation unsuccessful, 4 the data (unreadable, or breaking a
#: rule: the message names column, row and ID).
EXIT_ERROR, EXIT_INPUT, EXIT_REFUSED, EXIT_DATA = 1, 2, 3, 4


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pkmodel", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pkmodel {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("recommend", help="recommend the next regimen from a patient's "
                                           "history (NONMEM-style CSV, or dosing and lab "
                                           "tables with dates)")
    _recommend_arguments(rec)
    trial = sub.add_parser("trial", help="virtual trial of dosing strategies, induction to "
                                         "week 54 (Kang 2026 design)")
    trial.add_argument("--n", type=int, default=112, help="children per replicate (112)")
    trial.add_argument("--replicates", type=int, default=20)
    trial.add_argument("--seed", type=int, default=0)
    trial.add_argument("--target", type=_positive, default=6.0, help="target trough, mg/L (6)")
    trial.add_argument("--arms", default="label,proactive",
                       help="comma-separated: label, proactive, bayesian (slower)")
    trial.add_argument("--model", default=DEFAULT, choices=available())
    trial.add_argument("--warm-start", action="store_true",
                       help="bayesian arm: fit each child from its modes at the last visit, "
                            "in one start (about twice as fast; a child may keep to a "
                            "shallower mode that three starts would leave)")
    trial.add_argument("--json", action="store_true")
    trial.add_argument("--plot", metavar="PNG", help="write the figure here")
    trial.add_argument("--workers", type=_workers, default=1,
                       help="processes to run the trial's jobs (replicates, and children in "
                            "jobs of 500) on; the numbers are the same for any count (1)")
    fit = sub.add_parser("fit", help="estimate a population model (FOCE-I, SAEM) from a NONMEM-"
                                     "style CSV, with standard errors and diagnostics")
    fit.add_argument("model", help="a built-in model name (its numbers are the initial "
                                   "values) or a Python file defining `model`, a "
                                   "PopulationModel")
    fit.add_argument("data", help="NONMEM-style CSV")
    fit.add_argument("--out", required=True, metavar="FOLDER",
                     help="write fit.json, estimates.csv, individuals.csv, records.csv "
                          "and NONMEM-style run.ext/.phi/.cov/.tab here")
    fit.add_argument("--fix", default="", help="comma-separated parameters to keep at "
                                               "their initial values (THETA names, OMEGA, "
                                               "OMEGA(i,j), IOV, IOV(KAPPA), SIGMA)")
    fit.add_argument("--bound", action="append", default=[], type=_bound,
                     metavar="THETA=LOW,HIGH",
                     help="bounds of a THETA, NONMEM's (LOW, init, HIGH); leave a side "
                          "empty for none ('CL=0,'); repeat for more THETAs. A model "
                          "file may also define `bounds`, a dict of such pairs")
    fit.add_argument("--method", default="foce-i", choices=["foce-i", "foce", "fo", "saem"],
                     help="estimation method (foce-i)")
    fit.add_argument("--seed", type=int, default=0, help="seed of SAEM's draws (0)")
    fit.add_argument("--no-covariance", action="store_true", help="skip the covariance step")
    fit.add_argument("--json", action="store_true", help="print fit.json instead of the table")
    pred = sub.add_parser("predict", help="PRED (and IPRED at the MAP when troughs are "
                                          "measured) for every record")
    pred.add_argument("data")
    pred.add_argument("--model", default=DEFAULT, choices=available())
    pred.add_argument("--times", type=_times, metavar="GRID",
                      help="predict on this grid of times instead of the records: "
                           "'0,7,14' or 'START:STOP:STEP' (the model's time unit)")
    pred.add_argument("--json", action="store_true")
    return parser


def _bound(text: str) -> tuple[str, tuple[float | None, float | None]]:
    """'NAME=LOW,HIGH' with either side empty for none."""
    name, _, rest = text.partition("=")
    sides = rest.split(",")
    try:
        if not name.strip() or len(sides) != 2:
            raise ValueError
        low, high = (float(v) if v.strip() else None for v in sides)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected THETA=LOW,HIGH (a side may be empty: 'CL=0,'); got {text!r}") from None
    if low is not None and high is not None and not low < high:
        raise argparse.ArgumentTypeError(f"{text!r}: LOW must be below HIGH")
    return name.strip(), (low, high)


def _times(text: str) -> list[float]:
    """'0,7,14' or 'START:STOP:STEP' (STOP included when on the grid)."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if not (step > 0 and stop >= start and (stop - start) / step <= 100_000):
                raise ValueError
            values = start + step * np.arange(int(np.floor((stop - start) / step + 1e-9)) + 1)
        else:
            values = np.array([float(v) for v in text.split(",") if v.strip()])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected '0,7,14' or 'START:STOP:STEP' with a "
                                         f"positive step; got {text!r}") from None
    if values.size == 0 or not np.isfinite(values).all():
        raise argparse.ArgumentTypeError(f"expected finite times; got {text!r}")
    return sorted(set(values.tolist()))


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more; got {text!r}")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number; got {text!r}")
    return value


def _probability(text: str) -> float | None:
    if text.lower() in ("map", "none"):
        return None
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, or 'map'; got "
                                         f"{text!r}")
    return value


def _weeks_list(text: str) -> tuple[float, ...]:
    try:
        weeks = tuple(float(w) for w in text.split(",") if w.strip())
    except ValueError:
        weeks = ()
    if not weeks or not all(math.isfinite(w) and w > 0 for w in weeks):
        raise argparse.ArgumentTypeError(f"expected weeks separated by commas, e.g. 4,5,6,7,8; "
                                         f"got {text!r}")
    return weeks


def _vial(text: str) -> float | None | str:
    if text.lower() == "none":
        return None
    if text.lower() == "label":
        return "label"
    return _positive(text)


def _recommend_arguments(rec: argparse.ArgumentParser) -> None:
    rec.add_argument("data", nargs="?", help="NONMEM-style CSV: doses, measured troughs "
                                             "(MDV 0), covariates")
    rec.add_argument("--doses", metavar="CSV", help="dosing table: DATE, TIME (HH:MM), "
                                                    "DOSE_MG, INFUSION_HOURS (optional)")
    rec.add_argument("--labs", metavar="CSV", help="lab table: DATE, TIME, DV (mg/L), LLOQ, "
                                                   "covariates (WT kg, ALB, ...)")
    rec.add_argument("--model", default=DEFAULT, choices=available())
    rec.add_argument("--target", type=_positive, default=6.0, help="target trough, mg/L (6)")
    rec.add_argument("--probability", type=_probability, default=0.5,
                     help="share of posterior draws at or above the target at every trough "
                          "(0.5: expected to; 'map': the MAP alone)")
    rec.add_argument("--objective", default="smallest_change", choices=OBJECTIVES)
    rec.add_argument("--draws", type=int, default=1000, help="posterior draws (1000)")
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument("--next-dose-day", type=float, help="when the next dose is due (day)")
    rec.add_argument("--next-dose-date", help="the same as a date (data with dates)")
    rec.add_argument("--current-interval-weeks", type=_positive,
                     help="the interval the patient is on (default: from the doses; after "
                          "induction, the label's maintenance interval)")
    rec.add_argument("--intervals", type=_weeks_list, default=(4, 5, 6, 7, 8),
                     help="candidate intervals in weeks (4,5,6,7,8)")
    rec.add_argument("--vial-mg", type=_vial, default="label",
                     help="vial size, mg ('label': the model's; 'none': mg/kg steps)")
    rec.add_argument("--max-mg-per-kg", type=_positive, default=20.0,
                     help="largest dose considered (20 mg/kg)")
    rec.add_argument("--horizon-weeks", type=_positive, default=52.0,
                     help="troughs checked over this horizon, plus the steady state (52)")
    rec.add_argument("--lloq", type=_positive, help="lower limit of quantification, mg/L "
                                                    "(values below it are censored)")
    rec.add_argument("--accept-outliers", action="store_true",
                     help="use implausible measurements (caution instead of refused)")
    rec.add_argument("--json", action="store_true", help="print JSON (docs/cli.md)")
    rec.add_argument("--plot", metavar="PNG", help="write the forecast figure here")
    rec.add_argument("--report", metavar="HTML", help="write a self-contained patient "
                                                      "report (HTML, figures embedded) here")
    rec.add_argument("--models", metavar="A,B,...",
                     help="weigh these models by their marginal likelihood, recommend with "
                          "the one the data favour and report each model's answer (the "
                          "record may then hold SEX, AGE, CRP, DIAGNOSIS)")
    rec.add_argument("--albumin-unit", choices=("g/dL", "g/L"), default="g/dL",
                     help="unit of ALB in the records, with --models (g/dL)")
    rec.add_argument("--averaging", choices=("select", "bma"), default="select",
                     help="with --models: the favoured model's recommendation (select), or "
                          "the rule on all models' draws pooled by weight (bma)")


def recommendation_document(rec: Recommendation, model_name: str,
                            patient_id: Any = None) -> dict[str, Any]:
    """The JSON document of a recommendation (schema ``pkmodel.recommendation/2``)."""
    estimate = None
    if rec.estimate is not None:
        ind = rec.estimate.individuals.iloc[0]
        last = rec.estimate.records.iloc[-1]
        model = rec.estimate.model
        estimate = {
            "eta": {n: ind[n] for n in model.eta_names},
            "parameters": {n: last[n] for n in model.parameters},
            "ofv": ind["OFV"], "converged": bool(ind["SUCCESS"]), "message": ind["MESSAGE"],
            "summary": rec.estimate.summary().drop(columns="ID").to_dict(orient="records"),
        }
    document = {"schema": SCHEMA_RECOMMENDATION, "pkmodel_version": __version__,
                "model": model_name,
                "patient": {"id": patient_id, "weight_kg": rec.weight_kg},
                "target_mg_per_l": rec.target, "estimate": estimate}
    document.update(rec.to_dict())
    return plain_json(document)


def _describe(option: Option | None, none: str, probability: float | None) -> str:
    if option is None:
        return none
    flags = (" [above label]" if option.above_label else "") + (
        " [below label]" if option.below_label else "")
    share = ("" if probability is None else
             f", all troughs on target in {option.pta:.0%} of draws")
    return (f"{option.describe()}; lowest {level_name(probability)} trough "
            f"{option.lowest_trough:.2f} mg/L{share}{flags}")


def _print_recommendation(rec: Recommendation, model_name: str, pid: Any) -> None:
    out = sys.stdout
    out.write(f"Status: {rec.status.upper()}\n")
    for reason in rec.reasons:
        out.write(f"  - {reason}\n")
    out.write(f"\npkmodel recommend: patient {pid}, {rec.weight_kg:g} kg, model {model_name}, "
              f"target {rec.target:g} mg/L, objective {rec.objective}\n\n")
    if rec.estimate is None:
        out.write("No measured trough: parameters from the population prior.\n\n")
    else:
        ind = rec.estimate.individuals.iloc[0]
        etas = ", ".join(f"{n} {ind[n]:+.3f}" for n in rec.estimate.model.eta_names)
        summary = rec.estimate.summary()[["PARAMETER", "UNIT", "TYPICAL", "INDIVIDUAL",
                                          "SHRINKAGE"]]
        out.write("Parameters (typical for these covariates, and this patient's MAP):\n")
        out.write(summary.to_string(index=False, float_format=lambda v: f"{v:.4g}") + "\n")
        out.write(f"  ETAs: {etas}; fit: {ind['MESSAGE']}\n\n")
    date = f", {rec.next_dose_date}" if rec.next_dose_date else ""
    out.write(f"Next dose due: day {rec.next_dose_day:g} (week {rec.next_dose_day / 7:g}"
              f"{date})\n")
    p = rec.probability
    out.write(f"Current regimen: {_describe(rec.current, '-', p)}\n")
    if rec.status != "refused":
        out.write(f"Action: {rec.action}\n")
        out.write(f"Recommended:     {_describe(rec.recommended, 'none within limits', p)}\n")
        if rec.current.meets_target:
            out.write(f"Lower dose (reported apart):      {_describe(rec.reduce_dose, '-', p)}"
                      "\n")
            out.write(f"Longer interval (reported apart): "
                      f"{_describe(rec.extend_interval, '-', p)}\n")
        else:
            out.write(f"Dose change only:     "
                      f"{_describe(rec.dose_only, 'none within limits', p)}\n")
            out.write(f"Interval change only: "
                      f"{_describe(rec.interval_only, 'none within limits', p)}\n")
    out.write("\n" + rec.message + "\n\n")
    table = rec.troughs.copy()
    table["WEEK"] = table["WEEK"].map(lambda w: "SS" if pd.isna(w) else f"{w:g}")
    columns = ["WEEK", *(["DATE"] if "DATE" in table else []), "MAP", "LEVEL", "P10", "P50",
               "P90", "PTA"]
    shown = table[columns].round(2)
    option = rec.current if rec.status == "refused" else rec.closest
    out.write(f"Troughs (mg/L) on {option.dose_mg:g} mg every {option.interval_weeks:g} weeks "
              f"(LEVEL: the {level_name(rec.probability)} trough, checked against the target; "
              "P10-P90: 80 % band; PTA: share of draws on target):\n")
    out.write(shown.to_string(index=False) + "\n")


def _read_history(args: argparse.Namespace, model: Any) -> pd.DataFrame:
    if args.data and (args.doses or args.labs):
        raise ValueError("give either a NONMEM-style file or --doses and --labs, not both")
    if args.data:
        return read_nonmem(args.data)
    if not (args.doses and args.labs):
        raise ValueError("give a NONMEM-style file, or both --doses and --labs")
    label = model.label
    return from_clinical(read_clinical(args.doses), read_clinical(args.labs),
                         infusion_hours=None if label is None else label.infusion_hours)


def _recommend(args: argparse.Namespace) -> int:
    model = load(args.model)
    data = _read_history(args, model)
    several = None
    with warnings.catch_warnings(record=True) as caught:  # kept for the JSON, then re-said
        warnings.simplefilter("always")
        if args.models:
            several = _several(args, data)
            rec, model = several.recommendation, several.comparison.models[
                several.comparison.selected]
            data = several.comparison.data[several.comparison.selected]
        else:
            rec = _recommend_with(args, model, data)
    for item in caught:
        warnings.warn(item.message, item.category, stacklevel=1)
    said = [str(item.message) for item in caught]
    if args.plot:
        from pkmodel.plot import plot_recommendation

        plot_recommendation(rec, path=args.plot)
    if args.report:
        from pkmodel.report import recommendation_report

        recommendation_report(rec, model, data, args.report)
    name = model.name if several is not None else args.model
    if args.json:
        document = recommendation_document(rec, name, data["ID"].iloc[0])
        if several is not None:
            document["models"] = plain_json({
                "comparison": several.comparison.table.to_dict(orient="records"),
                "answers": several.answers.to_dict(orient="records"),
                "support": several.support, "agree": several.agree,
                "message": several.message})
        json.dump({**document, "warnings": said}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        if several is not None:
            _print_models(several)
        _print_recommendation(rec, name, data["ID"].iloc[0])
        if args.plot:
            sys.stdout.write(f"\nFigure written to {args.plot}\n")
    return EXIT_REFUSED if rec.status == "refused" else 0


def _several(args: argparse.Namespace, data: pd.DataFrame) -> Any:
    from pkmodel.averaging import recommend_with_models

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in available()]
    if unknown or len(names) < 2:
        raise ValueError(f"--models: give two or more of {', '.join(available())}; got "
                         f"{args.models!r}")
    return recommend_with_models(
        [load(n) for n in names], data, args.target, albumin_unit=args.albumin_unit,
        averaging=args.averaging, probability=args.probability, objective=args.objective,
        intervals_weeks=args.intervals, vial_mg=args.vial_mg, max_mg_per_kg=args.max_mg_per_kg,
        horizon_weeks=args.horizon_weeks, n_draws=args.draws, seed=args.seed,
        current_interval_weeks=args.current_interval_weeks, next_dose_day=args.next_dose_day,
        next_dose_date=args.next_dose_date, lloq=args.lloq,
        accept_outliers=args.accept_outliers)


def _print_models(several: Any) -> None:
    table = several.comparison.table[["MODEL", "USABLE", "OBJ", "LOG_ML", "WEIGHT",
                                      "MESSAGE"]]
    sys.stdout.write("Models (weight: posterior probability given the measured troughs):\n")
    sys.stdout.write(table.to_string(index=False, float_format=lambda v: f"{v:.3g}") + "\n")
    sys.stdout.write(several.answers.to_string(index=False) + "\n")
    sys.stdout.write(several.message + "\n\n")


def _recommend_with(args: argparse.Namespace, model: PopulationModel,
                    data: pd.DataFrame) -> Recommendation:
    return recommend_regimen(
        model, data, args.target, probability=args.probability, objective=args.objective,
        intervals_weeks=args.intervals, vial_mg=args.vial_mg, max_mg_per_kg=args.max_mg_per_kg,
        horizon_weeks=args.horizon_weeks, n_draws=args.draws, seed=args.seed,
        current_interval_weeks=args.current_interval_weeks, next_dose_day=args.next_dose_day,
        next_dose_date=args.next_dose_date, lloq=args.lloq,
        accept_outliers=args.accept_outliers)


def _predict(args: argparse.Namespace) -> int:
    data = read_nonmem(args.data)
    model = load(args.model)
    table = validate(data)
    measured = bool(((table["EVID"] == 0) & (table["MDV"] == 0)).any())
    fit = estimate_map(model, data) if measured else None
    if args.times is not None:
        table = with_samples(table, args.times, model.covariate_names)
        eta = None if fit is None else fit.individuals[["ID", *model.eta_names]]
        out = predict(model, table.drop(columns="SAMPLE"), eta)
        out = out[table["SAMPLE"].to_numpy() >= 0]
    else:
        out = fit.records if fit is not None else predict(model, data)
    columns = [c for c in ("ID", "TIME", "EVID", "AMT", "DV", "PRED", "IPRED") if c in out]
    out = out[columns].astype({c: int for c in ("EVID",) if c in columns})
    if args.json:
        json.dump(plain_json({"schema": SCHEMA_PREDICTION, "pkmodel_version": __version__,
                              "model": args.model, "time_unit": model.time_unit,
                              "concentration_unit": model.concentration_unit,
                              "records": [{k.lower(): v for k, v in r.items()}
                                          for r in out.to_dict("records")]}),
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(out[columns].to_string(index=False) + "\n")
    return 0


def _load_model(spec: str) -> tuple[PopulationModel, dict[str, Any]]:
    """A built-in model by name, or the ``model`` a Python file defines (the user's own
    file, run as ``python FILE`` would run it), with the THETA ``bounds`` the file may
    define."""
    if spec in available():
        return load(spec), {}
    if not spec.endswith(".py"):
        raise ValueError(f"model {spec!r}: expected a built-in name ({', '.join(available())})"
                         " or a Python file defining `model`")
    namespace = runpy.run_path(spec)
    model = namespace.get("model")
    if not isinstance(model, PopulationModel):
        message = (f"{spec}: expected a variable `model` holding a PopulationModel; got "
                   f"{type(model).__name__}")
        raise ValueError(message)  # noqa: TRY004 - the user's file, a usage error
    bounds = namespace.get("bounds", {})
    if not isinstance(bounds, dict):
        message = (f"{spec}: `bounds` must be a dict of THETA name to (low, high); got "
                   f"{type(bounds).__name__}")
        raise ValueError(message)  # noqa: TRY004 - the user's file, a usage error
    return model, dict(bounds)


def _fit(args: argparse.Namespace) -> int:
    from pkmodel.population import estimate_population
    from pkmodel.saem import SAEMOptions

    model, bounds = _load_model(args.model)
    bounds.update(dict(args.bound))  # the command line over the file
    data = read_nonmem(args.data)
    # commas inside parentheses belong to the name: OMEGA(2,1)
    fix = tuple(f.strip() for f in re.split(r",(?![^()]*\))", args.fix) if f.strip())
    label = "-2 ln p(y | ETA) of the chains" if args.method == "saem" else "OFV"

    def progress(iteration: int, ofv: float) -> None:
        if args.method != "saem" or iteration % 50 == 0:
            sys.stderr.write(f"pkmodel: iteration {iteration:3d}  {label} {ofv:.4f}\n")

    result = estimate_population(model, data, method=args.method, fix=fix, bounds=bounds,
                                 covariance=not args.no_covariance, progress=progress,
                                 saem=SAEMOptions(seed=args.seed))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    document = {"schema": SCHEMA_FIT, "pkmodel_version": __version__, "model": model.name,
                "data": str(args.data), **result.to_dict()}
    (out / "fit.json").write_text(json.dumps(plain_json(document), indent=2) + "\n")
    result.estimates.to_csv(out / "estimates.csv", index=False)
    result.individuals.to_csv(out / "individuals.csv", index=False)
    result.records.to_csv(out / "records.csv", index=False)
    result.to_nonmem(out)
    if args.json:
        sys.stdout.write(json.dumps(plain_json(document), indent=2) + "\n")
    else:
        sys.stdout.write(result.summary() + "\n")
    return 0 if result.success else EXIT_REFUSED


def _trial(args: argparse.Namespace) -> int:
    import contextlib
    from concurrent.futures import ProcessPoolExecutor

    from pkmodel.trial import BayesianDosing, KangProactive, LabelDosing, run_trial

    model = load(args.model)
    known = {"label": LabelDosing(), "proactive": KangProactive(target=args.target),
             "bayesian": BayesianDosing(model, target=args.target,
                                        warm_start=args.warm_start)}
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in known]
    if unknown or not arms:
        raise ValueError(f"--arms: unknown {unknown or arms}; choose from {sorted(known)}")
    if args.warm_start and "bayesian" not in arms:
        raise ValueError("--warm-start applies to the bayesian arm: add it to --arms")
    pool = ProcessPoolExecutor(max_workers=args.workers) if args.workers > 1 else None
    with pool or contextlib.nullcontext():
        result = run_trial(model, {a: known[a] for a in arms}, n=args.n,
                           replicates=args.replicates, seed=args.seed, target=args.target,
                           progress=args.replicates > 1, executor=pool)
    if args.plot:
        result.figure(args.plot)
    if args.json:
        json.dump(plain_json({"schema": SCHEMA_TRIAL, "model": args.model, "n": args.n,
                          "replicates": args.replicates, "seed": args.seed,
                          "target_mg_per_l": args.target, "arms": arms,
                          "warm_start": args.warm_start,
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
    commands = {"recommend": _recommend, "predict": _predict, "trial": _trial, "fit": _fit}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code = commands[args.command](args)
        for item in caught:  # one plain line each, never a file path and line number
            sys.stderr.write(f"pkmodel: warning: {item.message}\n")
        return code
    except BrokenPipeError:  # the reader closed the pipe (e.g. `| head`): nothing to say
        sys.stderr.close()
        return 0
    except (PKModelError, OSError) as err:  # the data: unreadable, or not what is expected
        return _fail(args, err, "data", EXIT_DATA)
    except ValueError as err:  # the options: a value the question cannot take
        return _fail(args, err, "usage", EXIT_INPUT)
    except Exception as err:  # the command never shows a traceback
        if os.environ.get("PKMODEL_DEBUG"):
            raise
        return _fail(args, err, "internal", EXIT_ERROR,
                     f"internal error ({type(err).__name__}: {err}); please report it with "
                     "the input (PKMODEL_DEBUG=1 shows the traceback)")


def _fail(args: argparse.Namespace, err: Exception, kind: str, code: int,
          text: str | None = None) -> int:
    """One line on standard error; with ``--json`` also an error document on standard
    output (schema pkmodel.error/1), so a program reads one stream."""
    message = text or str(err)
    sys.stderr.write(f"pkmodel: error: {message}\n")
    if getattr(args, "json", False):
        document = {"schema": SCHEMA_ERROR, "pkmodel_version": __version__, "kind": kind,
                    "error": message, "type": type(err).__name__,
                    "column": getattr(err, "column", None), "row": getattr(err, "row", None),
                    "id": getattr(err, "id", None), "exit_status": code}
        sys.stdout.write(json.dumps(plain_json(document), indent=2) + "\n")
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Dose optimisation: the smallest change that keeps every coming trough at the target.

From a patient's history (doses, measured troughs, covariates) the model gives the MAP
estimate and posterior draws (or the prior, when nothing has been measured). For every
candidate regimen (a dose and an interval, started at the next due dose and kept over the
horizon) every trough is predicted: the trough before each new dose and the steady-state
trough. PK is linear, so for a given interval the troughs are exactly

``C(t) = C_history(t) + D * C_unit(t)``

where ``C_history`` comes from the past doses only and ``C_unit`` from the new regimen with
a 1-mg dose: one engine call per interval covers every dose on the grid and every draw.

A regimen meets the target at level ``probability`` when, at every trough, the share of
posterior draws at or above the target is at least ``probability`` (0.5: "expected to").

The clinical rule (``objective="smallest_change"``, the default):

1. a current regimen that meets the target is continued (lower doses and longer intervals
   that would also meet it are reported apart);
2. otherwise the smaller of the two single changes, dose only (at the current interval)
   or interval only (at the current dose), measured as the relative increase in drug per
   week; ties go to fewer infusions a year (the dose change);
3. only when neither single change meets the target within the limits, a change of both:
   the least drug per week, ties to the longer interval.

Every recommendation carries a status ("ok", "caution", "refused") and the reasons: a
failed fit, an implausible measurement for the model, or too few effective posterior
draws never produce a regimen.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd

from pkmodel.data import (
    JsonDocument,
    check_concentrations,
    dose_times,
    float_columns,
    plain_json,
    validate,
)
from pkmodel.engine import Events, dose_response, is_dose_modifier
from pkmodel.errors import CovariateWarning, DatasetError, PKModelError, PlausibilityWarning
from pkmodel.estimate import (
    PLAUSIBLE_SD,
    MAPEstimate,
    PosteriorSample,
    estimate_map,
    sample_posterior,
)
from pkmodel.model import (
    PopulationModel,
    check_covariates,
    covariates_outside_range,
    eta_of,
    evaluate_parameters,
)
from pkmodel.predict import concentrations_after, profile_concentrations

__all__ = [
    "OBJECTIVES",
    "Checks",
    "Option",
    "Recommendation",
    "Settings",
    "allocate_draws",
    "dose_for_target_trough",
    "interval_for_target_trough",
    "level_name",
    "recommend_averaged",
    "recommend_regimen",
    "time_to_trough",
]

DAYS_PER_WEEK = 7.0
HOURS_PER_DAY = 24.0
#: How the recommended option is chosen among those that meet the target.
OBJECTIVES = ("smallest_change", "least_drug", "fewest_infusions")
#: Safety limits (module docstring of each check in :func:`recommend_regimen`).
IWRES_LIMIT = PLAUSIBLE_SD  # residual SDs above this at the MAP: implausible
SHRINKAGE_LIMIT = 0.5  # ETA_CL shrinkage above this: the data hardly inform clearance
CL_SD_LIMIT = 3.0  # individual CL further than this many SD from typical
POST_INFUSION_HOURS = 1.0  # a sample this soon after a dose ends is probably not a trough
#: Doses given below this share of the label dose per kg, or above this multiple of the
#: highest labelled dose, suggest a weight or dose in the wrong unit (lb, g).
DOSE_PER_KG_BOUNDS = (0.5, 2.0)
_TOL = 1e-9


@dataclass(frozen=True)
class Option:
    """One regimen: a dose every interval, from the next due dose on.

    Attributes
    ----------
    dose_mg : float
        Dose (mg).
    interval_weeks : float
        Dosing interval (weeks).
    mg_per_kg : float
        Dose per kg at the visit's weight (mg/kg).
    mg_per_kg_per_week : float
        Drug per week (mg/kg/week).
    change_in_drug_per_week : float
        Relative change of drug per week against the current regimen (0.33: a third more).
    lowest_trough : float
        Lowest coming trough at the required level (mg/L): at every trough, the value that
        a share ``probability`` of posterior draws reach or exceed; the MAP trough without
        draws.
    lowest_trough_map : float
        Lowest coming trough at the MAP estimate (mg/L).
    pta : float
        Probability that every coming trough is at or above the target (share of posterior
        draws; without draws, 1 or 0 from the MAP).
    meets_target : bool
        Whether every trough reaches the target at the required level.
    above_label : bool
        More than the label's highest dose or more often than its shortest interval.
    below_label : bool
        Less than the label's dose per kg.
    """

    dose_mg: float
    interval_weeks: float
    mg_per_kg: float
    mg_per_kg_per_week: float
    change_in_drug_per_week: float
    lowest_trough: float
    lowest_trough_map: float
    pta: float
    meets_target: bool
    above_label: bool
    below_label: bool

    def describe(self) -> str:
        """``"225 mg (5.0 mg/kg) every 6 weeks"``."""
        return (f"{self.dose_mg:g} mg ({self.mg_per_kg:.1f} mg/kg) every "
                f"{self.interval_weeks:g} weeks")


@dataclass(frozen=True)
class Settings:
    """The settings a recommendation was made with (arguments of :func:`recommend_regimen`)."""

    objective: str
    probability: float | None
    intervals_weeks: tuple[float, ...]
    vial_mg: float | None
    dose_step_mg_per_kg: float | None
    max_mg_per_kg: float
    min_interval_weeks: float
    max_interval_weeks: float
    horizon_weeks: float
    n_draws: int
    seed: int
    accept_outliers: bool
    min_ess: float
    lloq: float | None


@dataclass(frozen=True)
class Checks:
    """The numbers behind the safety status (NaN where they do not apply).

    Attributes
    ----------
    max_abs_iwres : float
        Largest absolute residual of a measured concentration at the MAP, in residual SDs
        (IWRES, and for proportional errors also on the log scale, so that a value far
        below the prediction counts).
    eta_cl_sd : float
        The patient's clearance ETA in prior SDs.
    eta_cl_shrinkage : float
        ``1 - sqrt(1 - ETC / OMEGA)`` for the clearance ETA: the expected ETA shrinkage of
        patients sampled like this one (0: the data fix clearance; 1: they say nothing).
    ess : float
        Effective number of posterior draws.
    """

    max_abs_iwres: float
    eta_cl_sd: float
    eta_cl_shrinkage: float
    ess: float


@dataclass(frozen=True)
class Recommendation(JsonDocument):
    """What to give next, why, how far to trust it, and what every alternative would do.

    Attributes
    ----------
    action : str
        ``"continue"`` (the current regimen meets the target), ``"change"``,
        ``"unattainable"`` (no option within the limits meets it; see ``closest``) or
        ``"refused"`` (the data cannot be trusted for dosing; see ``reasons``).
    status : str
        ``"ok"``, ``"caution"`` (usable, with reasons to look again) or ``"refused"``.
    reasons : tuple of str
        Why the status is not "ok", one plain sentence each.
    notes : tuple of str
        Assumptions made about the input (sample times, the current interval, ...).
    objective : str
        How the recommendation was chosen (:data:`OBJECTIVES`).
    recommended : Option or None
        What to give from ``next_dose_day`` on: the current regimen when ``action`` is
        "continue"; None when unattainable or refused.
    closest : Option
        The recommended option; with none, the option with the highest lowest trough.
    dose_only : Option or None
        The least dose meeting the target at the current interval, when the current
        regimen misses it (never the current regimen itself).
    interval_only : Option or None
        The longest shorter interval meeting the target at the current dose, likewise.
    reduce_dose : Option or None
        When the current regimen meets the target: the least lower dose at the current
        interval that still does (de-escalation, reported apart).
    extend_interval : Option or None
        Likewise the longest longer interval (up to ``max_interval_weeks``) at the current
        dose.
    current : Option
        The current regimen continued.
    next_dose_day : float
        When the next dose is due (day, on the data's time scale).
    next_dose_date : str or None
        The same as a date-time (ISO 8601) when the data has dates.
    weight_kg : float
        Weight at the visit (kg), for mg/kg.
    target : float
        Target trough (mg/L).
    probability : float or None
        Required level (None: MAP only).
    options : DataFrame
        Every candidate of the grid: DOSE_MG, MG_PER_KG, INTERVAL_WEEKS,
        MG_PER_KG_PER_WEEK, CHANGE_IN_DRUG_PER_WEEK, LOWEST_TROUGH, LOWEST_TROUGH_MAP, PTA,
        MEETS_TARGET, ABOVE_LABEL, BELOW_LABEL.
    troughs : DataFrame
        The recommended (or closest; when refused, the current) regimen's troughs: DAY,
        WEEK, STEADY_STATE, MAP, LEVEL (the value a share ``probability`` of draws reach,
        which the target is checked against), P10, P50, P90 (mg/L), PTA per trough, and
        DATE when the data has dates.
    current_troughs : DataFrame
        The same for the current regimen.
    estimate : MAPEstimate or None
        The fit to the measured troughs (None: dosed from the prior).
    checks : Checks
        The numbers behind the status.
    settings : Settings
        The settings used.
    message : str
        The recommendation in plain words, with the rule that chose it.
    """

    action: str
    status: str
    reasons: tuple[str, ...]
    notes: tuple[str, ...]
    objective: str
    recommended: Option | None
    closest: Option
    dose_only: Option | None
    interval_only: Option | None
    reduce_dose: Option | None
    extend_interval: Option | None
    current: Option
    next_dose_day: float
    next_dose_date: str | None
    weight_kg: float
    target: float
    probability: float | None
    options: pd.DataFrame
    troughs: pd.DataFrame
    current_troughs: pd.DataFrame
    estimate: MAPEstimate | None
    checks: Checks
    settings: Settings
    message: str

    @property
    def feasible(self) -> bool:
        """Whether some option within the limits meets the target (False when refused:
        nothing is offered then)."""
        return self.status != "refused" and self.closest.meets_target


    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (NaN and infinities as None); tables as lists of records."""
        out: dict[str, Any] = {}
        for name in ("action", "status", "objective", "next_dose_day", "next_dose_date",
                     "weight_kg", "target", "probability", "message"):
            out[name] = getattr(self, name)
        out["feasible"] = self.feasible
        out["reasons"], out["notes"] = list(self.reasons), list(self.notes)
        for name in ("recommended", "closest", "dose_only", "interval_only", "reduce_dose",
                     "extend_interval", "current"):
            option = getattr(self, name)
            out[name] = None if option is None else asdict(option)
        out["troughs"] = _records(self.troughs)
        out["current_troughs"] = _records(self.current_troughs)
        out["checks"] = asdict(self.checks)
        out["settings"] = asdict(self.settings)
        return plain_json(out)


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{str(k).lower(): v for k, v in row.items()} for row in frame.to_dict("records")]



# --------------------------------------------------------------------------- the history


@dataclass
class _Notes:
    """What reading the history found: assumptions, and reasons for caution or refusal."""

    notes: list[str] = field(default_factory=list)
    caution: list[str] = field(default_factory=list)
    refuse: list[str] = field(default_factory=list)


@dataclass
class _History:
    """The patient's records and what the regimen so far implies."""

    table: pd.DataFrame
    weight: float
    current_dose_mg: float
    current_interval_days: float
    dose_days: float  # infusion length of new doses (day); 0 for a bolus or a modelled one
    modelled: float  # the last dose's RATE where its length is the model's (-1, -2), else 0
    dose_cmt: float
    next_dose_day: float
    origin: pd.Timestamp | None
    said: _Notes

    @property
    def notes(self) -> list[str]:
        return self.said.notes


def _origin(table: pd.DataFrame) -> pd.Timestamp | None:
    """Calendar date-time of day 0 when the table has a DATE column consistent with TIME."""
    if "DATE" not in table.columns:
        return None
    stamps = pd.to_datetime(table["DATE"], errors="coerce")
    if stamps.isna().any():
        row = int(np.flatnonzero(stamps.isna().to_numpy())[0])
        raise DatasetError(f"column 'DATE', row {row}: expected a date-time; got "
                           f"{table['DATE'].iloc[row]!r}")
    origins = stamps - pd.to_timedelta(table["TIME"].to_numpy(), unit="D")
    off = np.abs((origins - origins.iloc[0]) / pd.Timedelta(minutes=1)).to_numpy() > 1.0
    if off.any():
        row = int(np.flatnonzero(off)[0])
        raise DatasetError(f"column 'DATE', row {row}: DATE and TIME disagree (TIME must be "
                           "the days since the same origin on every row)")
    return origins.iloc[0]


#: Induction doses may be given up to this many days off their planned day.
INDUCTION_TOLERANCE_DAYS = 7.0


def _induction_prefix(model: PopulationModel, dose_times: np.ndarray) -> int:
    """How many of the first doses follow the label's induction schedule (each within
    INDUCTION_TOLERANCE_DAYS of its planned day); 0 without a labelled induction."""
    label = model.label
    if label is None or not label.induction_weeks:
        return 0
    planned = np.asarray(label.induction_weeks) * DAYS_PER_WEEK
    given = np.unique(dose_times) - dose_times.min()
    count = 0
    for day, plan in zip(given, planned):
        if abs(day - plan) > INDUCTION_TOLERANCE_DAYS:
            break
        count += 1
    return count


def _history(model: PopulationModel, data: pd.DataFrame, *,
             current_interval_weeks: float | None = None, next_dose_day: float | None = None,
             next_dose_date: object | None = None, lloq: float | None = None) -> _History:
    table = validate(data, covariates=model.covariate_names).reset_index(drop=True)
    if lloq is not None:
        if not lloq > 0:
            raise ValueError(f"`lloq` must be positive (mg/L); got {lloq!r}")
        measured = (table["EVID"] == 0) & (table["MDV"] == 0)
        column = table["LLOQ"] if "LLOQ" in table.columns else pd.Series(np.nan, table.index)
        table["LLOQ"] = np.where(measured & column.isna(), float(lloq), column)
    check_concentrations(table)
    check_covariates(model, table)
    patients = len(pd.unique(table["ID"].to_numpy()))
    if patients != 1:
        raise DatasetError(f"column 'ID': expected one patient; got {patients} "
                           "IDs (recommend for each patient separately)")
    if "WT" not in table.columns:
        raise DatasetError("column 'WT' is missing: doses are chosen per kg of body weight")
    evid, time = table["EVID"].to_numpy(), table["TIME"].to_numpy(dtype=float)
    given = (evid == 1) | (evid == 4)
    if not given.any():
        raise DatasetError("the history has no dose (EVID 1 or 4): nothing to continue from")
    origin = _origin(table)
    said = _Notes()
    if next_dose_date is not None:
        if origin is None:
            raise DatasetError("`next_dose_date` needs dates in the data (a DATE column)")
        next_dose_day = (pd.Timestamp(next_dose_date) - origin) / pd.Timedelta(days=1)
    if next_dose_day is not None and not np.isfinite(next_dose_day):
        raise ValueError(f"`next_dose_day` must be a finite day; got {next_dose_day!r}")
    times, rows = dose_times(table)
    last_record = float(time.max())
    past = times[times < last_record] if next_dose_day is None else times[times < next_dose_day]
    explicit = time[given]
    past = np.unique(np.concatenate([past, explicit[explicit <= last_record]]))
    interval = _current_interval(model, past, current_interval_weeks, said,
                                 required=next_dose_day is None)
    due = float(past[-1] + interval) if next_dose_day is None else float(next_dose_day)
    if due < last_record - _TOL:
        if next_dose_day is not None:
            raise DatasetError(f"the next dose (day {due:g}) would come before the last "
                               f"record (day {last_record:g})")
        said.notes.append(f"the next dose was due on day {due:g}, before the last record: "
                          f"the new regimen starts at the last record, day {last_record:g}")
        if last_record - due > interval:
            said.caution.append(f"the last record (day {last_record:g}) comes more than one "
                                f"interval after the dose that was due on day {due:g}: are "
                                "doses missing from the history, or is a time wrong?")
        due = last_record
    table = _drop_implied_after(table, times, rows, due, said.notes)
    last = table.loc[rows[times <= past[-1]].max()]  # the record of the last dose given
    dose_days = (float(last["AMT"] / last["RATE"]) if last["RATE"] > 0
                 else float(last["DUR"]) if last["DUR"] > 0 else 0.0)
    if last["RATE"] == -1:
        said.caution.append("the last dose's rate is modelled (RATE -1): new doses are "
                            "forecast as boluses, since the length of an infusion at a "
                            "modelled rate depends on its dose (give RATE or DUR for an "
                            "exact forecast)")
    for note in table["ASSUMPTION"].dropna().unique() if "ASSUMPTION" in table else ():
        if str(note).strip():
            said.notes.append(str(note))
    at_visit = table.iloc[np.flatnonzero(table["TIME"].to_numpy(dtype=float) <= due + _TOL)[-1]]
    return _History(table, float(at_visit["WT"]), float(last["AMT"]), interval, dose_days,
                    float(last["RATE"]) if last["RATE"] in (-1, -2) else 0.0,
                    float(last["CMT"]), due, origin, said)


def _current_interval(model: PopulationModel, past: np.ndarray,
                      current_interval_weeks: float | None, said: _Notes, *,
                      required: bool) -> float:
    """The interval the patient is on (day); NaN when unknown and not ``required``."""
    if current_interval_weeks is not None:
        if not (np.isfinite(current_interval_weeks) and current_interval_weeks >= 1 / 7):
            raise ValueError("`current_interval_weeks` must be at least one day (1/7 week); "
                             f"got {current_interval_weeks!r}")
        return float(current_interval_weeks) * DAYS_PER_WEEK
    label = model.label
    induction = _induction_prefix(model, past)
    if label is not None and induction == np.unique(past).size:
        weeks = label.maintenance_interval_weeks
        if induction < len(label.induction_weeks):
            said.refuse.append(
                f"the history is within induction (doses at weeks {_weeks_text(past)} of the "
                f"label's {_weeks_text(np.asarray(label.induction_weeks) * 7.0)}): complete "
                "induction, or give the interval the patient is on "
                "(current_interval_weeks, --current-interval-weeks)")
        else:
            said.notes.append(f"after induction (doses at weeks {_weeks_text(past)}): the "
                              "current interval is the planned maintenance interval, "
                              f"{weeks:g} weeks")
        return weeks * DAYS_PER_WEEK
    if past.size >= 2:
        gaps = np.diff(past)[max(induction - 1, 0):]  # induction gaps are not the regimen
        if gaps.size >= 2 and abs(gaps[-1] - gaps[-2]) > 0.5:
            said.caution.append(
                f"the last two gaps between doses differ ({gaps[-2] / 7:.3g} and "
                f"{gaps[-1] / 7:.3g} weeks): the current interval is taken as the last one; "
                "give the planned interval if it is another (current_interval_weeks)")
        return float(gaps[-1])
    if not required:
        return float("nan")
    raise DatasetError("one dose only: give the interval the patient is on "
                       "(`current_interval_weeks`, --current-interval-weeks)")


def _weeks_text(times: np.ndarray) -> str:
    weeks = [f"{w:g}" for w in np.round((times - times.min()) / DAYS_PER_WEEK, 1)]
    return ", ".join(weeks[:-1]) + " and " + weeks[-1] if len(weeks) > 1 else weeks[0]


def _drop_implied_after(table: pd.DataFrame, times: np.ndarray, rows: np.ndarray, due: float,
                        notes: list[str]) -> pd.DataFrame:
    """ADDL doses implied at or after the next dose are replaced by the new regimen."""
    implied = np.r_[False, rows[1:] == rows[:-1]]
    late = implied & (times >= due - _TOL)
    if not late.any():
        return table
    table = table.copy()
    for row in np.unique(rows[late]):
        table.loc[row, "ADDL"] = float(np.sum(implied & (rows == row) & ~late))
    notes.append(f"{int(late.sum())} additional dose(s) (ADDL) implied on or after day "
                 f"{due:g} were left out of the history: the new regimen replaces them")
    return table


# --------------------------------------------------------------------------- forecasts


def _draws(model: PopulationModel, history: _History, n_draws: int, seed: int,
           min_ess: float) -> tuple[np.ndarray, MAPEstimate | None, PosteriorSample | None]:
    """Row 0: the MAP (or zero); then ``n_draws`` posterior (or prior) draws. A fit that
    did not converge gives the MAP row alone (the recommendation is refused)."""
    table = history.table
    measured = ((table["EVID"] == 0) & (table["MDV"] == 0)).any()
    names = list(model.eta_names)
    if not measured:
        rng = np.random.default_rng(seed)
        draws = rng.multivariate_normal(np.zeros(len(names)), model.omega, size=n_draws,
                                        method="eigh") if n_draws else np.zeros((0, len(names)))
        return np.vstack([np.zeros((1, len(names))), draws]), None, None
    fit = estimate_map(model, table)
    mode = float_columns(fit.individuals, names)
    if not n_draws or not fit.success or not np.all(np.isfinite(mode)):
        return np.nan_to_num(mode), fit, None
    sample = sample_posterior(model, table, n=n_draws, seed=seed, estimate=fit,
                              min_ess=min_ess)
    return np.vstack([mode, float_columns(sample.draws, names)]), fit, sample


@dataclass
class _Forecast:
    """Troughs of every interval: history part and unit-dose part, per draw."""

    intervals: np.ndarray  # (I,) days
    days: list[np.ndarray]  # per interval: trough days (k >= 1), then the steady state
    history: list[np.ndarray]  # per interval: (M, K + 1) mg/L from past doses
    unit: list[np.ndarray]  # per interval: (M, K + 1) mg/L per mg of the new regimen

    by_trough: dict[int, tuple[np.ndarray, np.ndarray]] = field(
        default_factory=dict, init=False, repr=False)

    def troughs(self, i: int, dose: float) -> np.ndarray:
        """``(M, K + 1)`` troughs (mg/L) of ``dose`` mg every ``intervals[i]`` days."""
        return self.history[i] + dose * self.unit[i]

    def troughs_by_dose(self, i: int, doses: np.ndarray) -> np.ndarray:
        """``(D, K + 1, M)`` troughs (mg/L) of each of ``doses`` mg every ``intervals[i]``
        days, the draws innermost (contiguous: what quantiles over draws run along)."""
        if i not in self.by_trough:
            self.by_trough[i] = (np.ascontiguousarray(self.history[i].T),
                                 np.ascontiguousarray(self.unit[i].T))
        history, unit = self.by_trough[i]
        return history[None] + doses[:, None, None] * unit[None]


def _forecast(model: PopulationModel, history: _History, eta: np.ndarray,
              intervals_days: np.ndarray, horizon_days: float) -> _Forecast:
    """Troughs of every interval over the horizon, from three engine calls.

    Future covariates are constant (carried forward) and KAPPAs are 0, so a new regimen
    is a superposition of one unit-dose response ``u``: the trough before new dose ``k``
    is ``u(tau) + u(2 tau) + ... + u(k tau)``; the steady state comes from an SS dose.
    """
    t0 = history.next_dose_day
    counts = [max(1, int(np.floor(horizon_days / tau + 1e-9))) for tau in intervals_days]
    trough_days = [t0 + tau * np.arange(1, k + 1) for tau, k in zip(intervals_days, counts)]
    after = np.unique(np.concatenate([tau * np.arange(1, k + 1)
                                      for tau, k in zip(intervals_days, counts)]))
    all_days = np.unique(np.concatenate(trough_days))
    base_conc = concentrations_after(model, history.table, eta, all_days)
    response, steady_conc = _unit_responses(model, history, eta, after, intervals_days)
    base_days = all_days
    hist_parts, unit_parts, day_parts = [], [], []
    for i, tau in enumerate(intervals_days):
        days = trough_days[i]
        at = np.searchsorted(base_days, days)
        where = np.searchsorted(after, tau * np.arange(1, counts[i] + 1))
        hist_parts.append(np.concatenate([base_conc[:, at], np.zeros((eta.shape[0], 1))], 1))
        unit_parts.append(np.concatenate([np.cumsum(response[:, where], axis=1),
                                          steady_conc[:, i:i + 1]], axis=1))
        day_parts.append(np.concatenate([days, [np.inf]]))
    return _Forecast(intervals_days, day_parts, hist_parts, unit_parts)


def _unit_responses(model: PopulationModel, history: _History, eta: np.ndarray,
                    after: np.ndarray, intervals_days: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Concentrations (mg/L) per mg of a new dose given like the last one, for every draw
    ``eta (M, n_eta)``: ``after`` days after one dose, ``(M, A)``, and one interval after
    a dose at steady state, per interval, ``(M, I)``. The last record's covariates and
    KAPPAs 0 hold throughout, so the engine's events are built here, not from records."""
    last = history.table.iloc[-1]
    cov = {c: np.array([float(last[c])]) for c in model.covariate_names}
    params = evaluate_parameters(model, cov, eta[:, None, :])  # (M, 1) each
    if (not any(is_dose_modifier(k) for k in params) and history.modelled == 0
            and history.dose_days <= intervals_days.min()):
        # Closed forms, without records: no F, lag or modelled length to apply.
        single, steady = dose_response(model.structure, params, cmt=int(history.dose_cmt),
                                       duration=history.dose_days, times=after,
                                       intervals=intervals_days)
        volume = params["V1"].reshape(-1, 1)
        return single / volume, steady / volume
    # A modelled duration (RATE -2) stays the model's: new doses are linear in their amount.
    # A modelled rate (RATE -1) is not (its length grows with the dose): boluses, cautioned.
    rate = (-2.0 if history.modelled == -2
            else 1.0 / history.dose_days if history.dose_days > 0 else 0.0)

    def dose_then_samples(times: np.ndarray, ii: np.ndarray) -> Events:
        """A unit dose at 0 (every ``ii (B,)`` days at steady state where > 0), then
        samples at ``times (B, K)``."""
        b_count, k_count = times.shape
        dose = np.zeros((b_count, k_count + 1))
        dose[:, 0] = 1.0
        rows = np.zeros((b_count, k_count + 1), dtype=int)
        return Events(time=np.concatenate([np.zeros((b_count, 1)), times], axis=1),
                      evid=dose, amt=dose, rate=dose * rate, dur=np.zeros_like(dose),
                      ii=dose * ii[:, None], ss=dose * (ii[:, None] > 0),
                      cmt=dose * history.dose_cmt, param_row=rows, source_row=rows)

    samples = np.arange(1, after.size + 1)[None, :]
    unit = profile_concentrations(model, dose_then_samples(after[None, :], np.zeros(1)),
                                  params, at=samples)[0]
    steady = profile_concentrations(
        model, dose_then_samples(intervals_days[:, None], intervals_days), params,
        at=np.ones((intervals_days.size, 1), dtype=int))
    return unit, steady[:, :, 0].T


def _linear_in_dose(history: _History) -> None:
    """Raise where the exact answers' linearity in the dose fails: the last dose's rate is
    modelled (RATE -1), so a dose's length would grow with it."""
    if history.modelled == -1:
        raise ValueError("the last dose's rate is modelled (RATE -1): a new dose's length "
                         "would depend on its amount, which this answer, a 1-mg dose "
                         "scaled by linearity, cannot follow; give the doses' RATE or DUR")


def _same_history(lead_model: PopulationModel, lead: _History, model: PopulationModel,
                  other: _History) -> None:
    """Models averaged must read the same regimen from their records."""
    same = (np.isclose(other.next_dose_day, lead.next_dose_day)
            and np.isclose(other.current_interval_days, lead.current_interval_days)
            and np.isclose(other.current_dose_mg, lead.current_dose_mg))
    if not same:
        raise ValueError(f"{model.name} reads another regimen from its records (next dose "
                         f"day {other.next_dose_day:g}, every {other.current_interval_days:g}"
                         f" days, {other.current_dose_mg:g} mg) than {lead_model.name} (day "
                         f"{lead.next_dose_day:g}, {lead.current_interval_days:g} days, "
                         f"{lead.current_dose_mg:g} mg): models averaged must share it")


def allocate_draws(weights: np.ndarray, n: int) -> np.ndarray:
    """``n`` draws shared by ``weights`` (largest remainders; the counts sum to ``n``).

    Examples
    --------
    >>> allocate_draws(np.array([0.5, 0.3, 0.2]), 7).tolist()
    [4, 2, 1]
    """
    weights = np.asarray(weights, dtype=float)
    share = weights / weights.sum() * n
    counts = np.floor(share).astype(int)
    counts[np.argsort(counts - share)[:n - counts.sum()]] += 1
    return counts


def _average(members: list[tuple[PopulationModel, pd.DataFrame, float]], lead: _History,
             forecast: _Forecast, intervals_days: np.ndarray, horizon_days: float,
             reading: dict[str, Any], n_draws: int, seed: int, *, accept_outliers: bool,
             min_ess: float) -> tuple[_Forecast, list[str]]:
    """The lead's forecast with its draws replaced by every usable member's, in proportion
    to the weights (member ``k`` draws with seed ``seed + k``); reasons: the members left
    out, and the kept members' own cautions, each named."""
    kept = [(members[0][0].name, forecast, members[0][2])]
    said: list[str] = []
    for k, (model, data, weight) in enumerate(members[1:], start=1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CovariateWarning)
            warnings.simplefilter("ignore", PlausibilityWarning)
            try:
                history = _history(model, data, **reading)
            except (PKModelError, ValueError) as err:
                said.append(f"{model.name} left out of the average: {err}")
                continue
            _same_history(members[0][0], lead, model, history)
            try:
                eta, fit, sample = _draws(model, history, n_draws, seed + k, min_ess)
            except (PKModelError, ValueError, np.linalg.LinAlgError) as err:
                said.append(f"{model.name} left out of the average: {err}")
                continue
        status, why, _ = _checks(model, history, fit, sample,
                                 accept_outliers=accept_outliers, min_ess=min_ess)
        if status == "refused" or eta.shape[0] < 2:
            said.append(f"{model.name} left out of the average: "
                        + ("; ".join(why) or "no posterior draws"))
            continue
        said += [f"{model.name}: {reason}" for reason in why]
        kept.append((model.name, _forecast(model, history, eta, intervals_days,
                                           horizon_days), weight))
    counts = allocate_draws(np.array([w for _, _, w in kept], dtype=float), n_draws)
    lead.said.notes.append("Bayesian model average of the posterior draws: " + ", ".join(
        f"{name} {c / n_draws:.0%} ({c} draws)" for (name, _, _), c in zip(kept, counts)))

    def pool(arrays: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([arrays[0][:1]] + [a[1:1 + c] for a, c in zip(arrays, counts)])

    parts = range(len(forecast.intervals))
    return _Forecast(forecast.intervals, forecast.days,
                     [pool([f.history[i] for _, f, _ in kept]) for i in parts],
                     [pool([f.unit[i] for _, f, _ in kept]) for i in parts]), said


def _required_count(n: int, probability: float) -> int:
    """Draws that must reach the target for a share of at least ``probability``."""
    return max(1, math.ceil(probability * n - _TOL))


def _level(troughs: np.ndarray, probability: float | None) -> np.ndarray:
    """Per trough, the value reached or exceeded by a share ``probability`` of the draws
    (rows 1:), so that ``level >= target`` exactly when that share is on target; the MAP
    (row 0) without draws or without a probability."""
    if probability is None or troughs.shape[0] == 1:
        return troughs[0]
    draws = troughs[1:]
    n = draws.shape[0]
    k = _required_count(n, probability)
    return np.partition(draws, n - k, axis=0)[n - k]


def _level_last(troughs: np.ndarray, probability: float | None) -> np.ndarray:
    """:func:`_level` of troughs whose draws run along the last axis (MAP first)."""
    if probability is None or troughs.shape[-1] == 1:
        return troughs[..., 0]
    draws = troughs[..., 1:]
    n = draws.shape[-1]
    k = _required_count(n, probability)
    return np.partition(draws, n - k, axis=-1)[..., n - k]


# --------------------------------------------------------------------------- options


#: Troughs (doses x troughs x draws) of the options measured in one vectorised step.
_MEASURE_CHUNK = 2_000_000


@dataclass
class _Grid:
    """What the options are measured against: the forecast, the current regimen, limits."""

    forecast: _Forecast
    weeks: list[float]  # every forecast interval (weeks), in forecast order
    weight: float
    target: float
    probability: float | None
    current_dose: float
    current_weeks: float
    label: Any
    made: dict[tuple[float, float], Option] = field(default_factory=dict)  # asked before

    def option(self, dose: float, weeks: float) -> Option:
        return self.options([dose], weeks)[0]

    def options(self, doses: Sequence[float], weeks: float) -> list[Option]:
        """The options of ``doses`` (mg) every ``weeks``, their troughs forecast at once
        (those asked before are not forecast again)."""
        new = [float(d) for d in doses if (float(d), float(weeks)) not in self.made]
        if new:
            self.made.update(((o.dose_mg, float(weeks)), o) for o in self._evaluate(new, weeks))
        return [self.made[float(d), float(weeks)] for d in doses]

    def _measure(self, i: int, dose: np.ndarray) -> tuple[np.ndarray, ...]:
        """Lowest trough (at the level asked), its probability of target attainment and
        lowest MAP trough of each of ``dose`` mg every ``intervals[i]``, a slice of doses
        at a time (a fine grid over many troughs and draws stays within memory)."""
        size = self.forecast.history[i].size
        step = max(1, _MEASURE_CHUNK // max(size, 1))
        parts = []
        for start in range(0, dose.size, step):
            troughs = self.forecast.troughs_by_dose(i, dose[start:start + step])
            draws = troughs[..., 1:] if troughs.shape[-1] > 1 else troughs
            parts.append((_level_last(troughs, self.probability).min(axis=-1),
                          np.mean(np.all(draws >= self.target, axis=1), axis=1),
                          troughs[..., 0].min(axis=-1)))
        return tuple(np.concatenate(column) for column in zip(*parts))

    def _evaluate(self, doses: list[float], weeks: float) -> list[Option]:
        i = self.index(weeks)
        dose = np.asarray(doses, dtype=float)
        lowest, pta, lowest_map = self._measure(i, dose)
        current = self.current_dose / self.weight / self.current_weeks
        out = []
        for j, d in enumerate(dose):
            mg_per_kg = d / self.weight
            per_week = mg_per_kg / weeks
            above = below = False
            if self.label is not None:
                above = bool(mg_per_kg > self.label.max_mg_per_kg + _TOL
                             or weeks < self.label.min_interval_weeks - _TOL)
                below = bool(mg_per_kg < self.label.dose_mg_per_kg - 1e-6)
            out.append(Option(
                dose_mg=float(d), interval_weeks=float(weeks), mg_per_kg=float(mg_per_kg),
                mg_per_kg_per_week=float(per_week),
                change_in_drug_per_week=float(per_week / current - 1.0),
                lowest_trough=float(lowest[j]), lowest_trough_map=float(lowest_map[j]),
                pta=float(pta[j]), meets_target=bool(lowest[j] >= self.target),
                above_label=above, below_label=below,
            ))
        return out

    def index(self, weeks: float) -> int:
        return int(np.argmin(np.abs(np.asarray(self.weeks) - weeks)))

    def troughs(self, option: Option, origin: pd.Timestamp | None) -> pd.DataFrame:
        i = self.index(option.interval_weeks)
        troughs = self.forecast.troughs(i, option.dose_mg)
        draws = troughs[1:] if troughs.shape[0] > 1 else troughs
        days = self.forecast.days[i]
        finite = np.isfinite(days)
        p10, p50, p90 = np.quantile(draws, [0.1, 0.5, 0.9], axis=0)
        table = pd.DataFrame({
            "DAY": np.where(finite, days, np.nan),
            "WEEK": np.where(finite, days / DAYS_PER_WEEK, np.nan),
            "STEADY_STATE": ~finite,
            "MAP": troughs[0],
            "LEVEL": _level(troughs, self.probability),
            "P10": p10, "P50": p50, "P90": p90,
            "PTA": np.mean(draws >= self.target, axis=0),
        })
        if origin is not None:
            table.insert(2, "DATE", [(origin + pd.Timedelta(days=d)).round("min").isoformat(
                timespec="minutes") if np.isfinite(d) else None for d in days])
        return table


def _option_table(options: list[Option]) -> pd.DataFrame:
    """One row per option, by drug per week (ties: the longer interval first)."""
    names = [f.name for f in fields(Option)]  # flat: asdict's deep copies cost 1 ms
    columns = {n: np.array([getattr(o, n) for o in options]) for n in names}
    order = np.lexsort((-columns["interval_weeks"], columns["mg_per_kg_per_week"]))
    return pd.DataFrame({n.upper(): values[order] for n, values in columns.items()})


@dataclass
class _Choice:
    action: str
    recommended: Option | None
    closest: Option
    dose_only: Option | None = None
    interval_only: Option | None = None
    reduce_dose: Option | None = None
    extend_interval: Option | None = None
    rule: str = ""


def _least_drug(options: list[Option]) -> Option | None:
    """Least drug per week; ties to the longer interval, then the smaller dose."""
    feasible = [o for o in options if o.meets_target]
    return min(feasible, key=lambda o: (round(o.mg_per_kg_per_week, 12), -o.interval_weeks,
                                        o.dose_mg)) if feasible else None


def _choose(grid: _Grid, objective: str, doses: np.ndarray, candidates: list[float],
            longer: list[float], options: list[Option], current: Option) -> _Choice:
    """Apply the objective (module docstring) to the evaluated options."""
    d0, w0 = grid.current_dose, grid.current_weeks
    at_current = grid.options(doses, w0)
    closest = max(options + at_current, key=lambda o: (o.lowest_trough,
                                                       -o.mg_per_kg_per_week))
    if current.meets_target:
        lower = [o for o in at_current if o.dose_mg < d0 - _TOL and o.meets_target]
        later = [o for o in (grid.option(d0, w) for w in longer) if o.meets_target]
        choice = _Choice("continue", current, current,
                         reduce_dose=min(lower, key=lambda o: o.dose_mg) if lower else None,
                         extend_interval=(max(later, key=lambda o: o.interval_weeks)
                                          if later else None),
                         rule="it already meets the target, and a regimen that does is "
                              "continued")
        if objective == "smallest_change":
            return choice
    else:
        choice = _Choice("change", None, closest)
        more = [o for o in at_current if o.dose_mg > d0 + _TOL and o.meets_target]
        shorter = [o for o in (grid.option(d0, w) for w in candidates if w < w0 - _TOL)
                   if o.meets_target]
        choice.dose_only = min(more, key=lambda o: o.dose_mg) if more else None
        choice.interval_only = max(shorter, key=lambda o: o.interval_weeks) if shorter else None
    if objective == "smallest_change":
        singles = [o for o in (choice.dose_only, choice.interval_only) if o is not None]
        if singles:
            best = min(singles, key=lambda o: (round(o.change_in_drug_per_week, 9),
                                               -o.interval_weeks))
            choice.recommended, choice.rule = best, (
                "this is the smallest single change that meets it (dose alone or interval "
                "alone, by the increase in drug per week)")
        else:
            choice.recommended = _least_drug(options)
            choice.rule = ("no change of dose alone or of interval alone meets it within "
                           "the limits, so both change: the least drug per week that does")
    elif objective == "least_drug":
        choice.recommended = _least_drug(options)
        choice.rule = "this is the least drug per week that meets it (objective least_drug)"
    else:
        feasible = [o for o in options + [current] if o.meets_target]
        choice.recommended = (max(feasible, key=lambda o: (o.interval_weeks, -o.dose_mg))
                              if feasible else None)
        choice.rule = ("this is the longest interval that meets it, at its least dose "
                       "(objective fewest_infusions)")
    if choice.recommended is None:
        choice.action = "unattainable"
    else:
        choice.closest = choice.recommended
        same = (abs(choice.recommended.dose_mg - d0) < _TOL
                and abs(choice.recommended.interval_weeks - w0) < _TOL)
        choice.action = "continue" if same else "change"
    return choice


def _dose_grid(weight: float, *, vial_mg: float | None, step_mg_per_kg: float | None,
               max_mg_per_kg: float, notes: list[str]) -> np.ndarray:
    """Candidate doses (mg): whole vials up to the maximum, else mg/kg steps. A patient so
    small that one vial exceeds the maximum is dosed in mg/kg steps (part of a vial), as
    a note says."""
    max_mg = max_mg_per_kg * weight
    if vial_mg is not None:
        grid = vial_mg * np.arange(1, int(np.floor(max_mg / vial_mg + 1e-9)) + 1)
        if grid.size:
            return grid
        notes.append(f"one {vial_mg:g}-mg vial is more than {max_mg_per_kg:g} mg/kg at "
                     f"{weight:g} kg: doses are in steps of {step_mg_per_kg or 1.0:g} mg/kg "
                     "(part of a vial)")
    step = step_mg_per_kg or 1.0
    grid = step * weight * np.arange(1, int(np.floor(max_mg_per_kg / step + 1e-9)) + 1)
    if grid.size == 0:
        raise ValueError(f"`dose_step_mg_per_kg` ({step:g}) is larger than `max_mg_per_kg` "
                         f"({max_mg_per_kg:g}): no dose to consider")
    return grid


# --------------------------------------------------------------------------- safety checks


def _clearance_eta(model: PopulationModel) -> int | None:
    """Index of the ETA on CL, when exactly one ETA enters CL."""
    name = eta_of(model, "CL")
    return None if name is None else model.eta_names.index(name)


def _implausible(model: PopulationModel, fit: MAPEstimate) -> tuple[float, list[str]]:
    """The largest residual (in SDs) of a measured value, and a sentence per outlier or
    per ETA beyond PLAUSIBLE_SD."""
    records = fit.records
    score = records["OUTLIER_SD"].to_numpy(float)
    scored = ~np.isnan(score)
    sentences = _far_etas(model, fit)
    if not scored.any():
        return float("nan"), sentences
    dv, ipred, pred, day, score = (records[name].to_numpy(float)[scored] for name in
                                   ("DV", "IPRED_OCC", "PRED", "TIME", "OUTLIER_SD"))
    for i in np.flatnonzero(score > IWRES_LIMIT):
        ratio = dv[i] / ipred[i] if ipred[i] > 0 else np.inf
        typical = dv[i] / pred[i] if pred[i] > 0 else np.inf
        cause = ("it was taken where the model predicts no drug (before any dose?): is its "
                 "time right?" if pred[i] <= 0 else
                 "it is over 100 times the typical prediction "
                 f"({pred[i]:.3g} mg/L): is DV in ng/mL (ug/L)? pkmodel expects mg/L "
                 "(ug/mL), 1000 times smaller" if typical > 100 else
                 "it is far above the prediction: a unit slip, or a sample drawn during or "
                 "soon after an infusion?" if ratio > 1 else
                 "it is far below the prediction: a sample time or a dose that is wrong?")
        sentences.append(f"the measured {dv[i]:.4g} mg/L on day {day[i]:g} is "
                         f"implausible for {model.name} ({score[i]:.3g} residual SDs from "
                         f"the individual prediction {ipred[i]:.3g} mg/L): {cause}")
    return float(score.max()), sentences


def _far_etas(model: PopulationModel, fit: MAPEstimate) -> list[str]:
    """A sentence per ETA further than PLAUSIBLE_SD prior SDs from 0."""
    ind = fit.individuals.iloc[0]
    out = []
    for name, variance in zip(model.eta_names, np.diag(model.omega)):
        z = float(ind[name]) / np.sqrt(variance) if variance > 0 else 0.0
        if abs(z) > PLAUSIBLE_SD:
            out.append(f"{name} is {abs(z):.1f} SD {'above' if z > 0 else 'below'} the "
                       f"typical value for these covariates, beyond what {model.name} "
                       "expects: check units, doses, dates and antibodies")
    return out


def _dose_lengths(model: PopulationModel, table: pd.DataFrame, at: np.ndarray
                  ) -> np.ndarray:
    """Infusion length (day) of the doses on rows ``at`` (positions): AMT / RATE, DUR, or,
    where modelled (RATE -1, -2), AMT over the model's typical rate ``R<cmt>`` or its
    typical duration ``D<cmt>`` (ETAs 0); 0 for a bolus."""
    amt, rate, dur = (table[c].to_numpy()[at] for c in ("AMT", "RATE", "DUR"))
    length = np.where(rate > 0, amt / np.where(rate > 0, rate, 1.0), dur)
    modelled = np.flatnonzero((rate == -1) | (rate == -2))
    if modelled.size:
        cov = {c: table[c].to_numpy(dtype=float)[at] for c in model.covariate_names}
        typical = evaluate_parameters(model, cov)
        cmt = np.maximum(table["CMT"].to_numpy()[at], 1).astype(int)
        for k in modelled:
            name = f"{'D' if rate[k] == -2 else 'R'}{cmt[k]}"
            if name in typical:
                value = float(np.broadcast_to(typical[name], at.shape)[k])
                length[k] = value if rate[k] == -2 else amt[k] / value
    return length


def _sample_timing(model: PopulationModel, history: _History) -> list[str]:
    """Samples inside an infusion or within POST_INFUSION_HOURS after a dose ends."""
    table = history.table
    times, rows = dose_times(table)
    at = table.index.get_indexer(rows)  # rows are index labels
    length = _dose_lengths(model, table, at)
    ends = times + length + POST_INFUSION_HOURS / HOURS_PER_DAY
    out = []
    measured = np.flatnonzero((table["EVID"].to_numpy() == 0) & (table["MDV"].to_numpy() == 0))
    implied = np.r_[False, rows[1:] == rows[:-1]]  # ADDL doses
    for row, t in zip(table.index[measured], table["TIME"].to_numpy()[measured]):
        # The engine gives a dose at the sample's time before it when the dose record
        # comes first or the dose is implied (ADDL); an infusion starting at that very
        # time has delivered nothing yet, so only a bolus there makes a post-dose sample.
        given = (times < t) | ((times == t) & ((rows < row) | implied) & (length == 0))
        if np.any(given & (t < ends + _TOL)):
            out.append(f"the sample on day {t:g} lies inside an infusion or less than "
                       f"{POST_INFUSION_HOURS:g} h after one ends: probably not a trough "
                       "(check the sample and dose times)")
    return out


def _dose_per_kg(model: PopulationModel, history: _History) -> list[str]:
    """Doses given far below or above the label per kg: a weight or dose in another unit."""
    label = model.label
    table = history.table
    if label is None or "WT" not in table.columns:
        return []
    evid, amt = table["EVID"].to_numpy(), table["AMT"].to_numpy(float)
    given = ((evid == 1) | (evid == 4)) & (amt > 0)
    if not given.any():
        return []
    amt, weight = amt[given], table["WT"].to_numpy(float)[given]
    day = table["TIME"].to_numpy(float)[given]
    per_kg = amt / weight
    low, high = DOSE_PER_KG_BOUNDS
    out = []
    if per_kg.min() < low * label.dose_mg_per_kg:
        i = int(np.argmin(per_kg))
        out.append(f"a dose given was {per_kg[i]:.2g} mg/kg ({amt[i]:g} mg at "
                   f"{weight[i]:g} kg on day {day[i]:g}), under "
                   f"{low:g} of the label's {label.dose_mg_per_kg:g} mg/kg: is the weight in "
                   "kg (not lb) and AMT the whole dose in mg?")
    if per_kg.max() > high * label.max_mg_per_kg:
        i = int(np.argmax(per_kg))
        out.append(f"a dose given was {per_kg[i]:.3g} mg/kg ({amt[i]:g} mg at "
                   f"{weight[i]:g} kg on day {day[i]:g}), over "
                   f"{high:g} times the label's highest {label.max_mg_per_kg:g} mg/kg: are "
                   "the weight and AMT in kg and mg?")
    return out


def _checks(model: PopulationModel, history: _History, fit: MAPEstimate | None,
            sample: PosteriorSample | None, *, accept_outliers: bool, min_ess: float
            ) -> tuple[str, list[str], Checks]:
    refuse, caution = [], []
    worst = eta_sd = shrinkage = ess = float("nan")
    if fit is None:
        caution.append("no measured concentration: dosed from the population prior "
                       "(covariates only)")
    else:
        ind = fit.individuals
        if not bool(ind["SUCCESS"].iloc[0]):
            refuse.append("the fit to the measured concentrations failed "
                          f"({ind['MESSAGE'].iloc[0]})")
        worst, outliers = _implausible(model, fit)
        if accept_outliers:
            caution += [s + " (accepted: accept_outliers)" for s in outliers]
        else:
            refuse += outliers
        k = _clearance_eta(model)
        eta = float(ind[model.eta_names[k]].iloc[0]) if k is not None else np.nan
        if k is not None and np.isfinite(eta) and model.omega[k, k] > 0:
            omega = float(model.omega[k, k])
            eta_sd = eta / np.sqrt(omega)
            at = fit.names.index(model.eta_names[k]) + 1  # ETC covers the estimated ETAs
            etc = float(ind[f"ETC_{at}_{at}"].iloc[0])
            shrinkage = float(1.0 - np.sqrt(max(0.0, 1.0 - etc / omega)))
            if shrinkage > SHRINKAGE_LIMIT:
                caution.append(f"the measured concentrations say little about this "
                               f"patient's clearance (ETA shrinkage {shrinkage:.0%}): the "
                               "forecast leans on the population")
            if CL_SD_LIMIT < abs(eta_sd) <= PLAUSIBLE_SD:  # beyond: refused (_far_etas)
                caution.append(f"this patient's clearance is {abs(eta_sd):.1f} SD "
                               f"{'above' if eta_sd > 0 else 'below'} the typical value for "
                               "these covariates: check doses, dates and antibodies")
    if sample is not None:
        ess = float(sample.diagnostics["ESS"].iloc[0])
        if ess < min_ess:
            refuse.append(f"too few effective posterior draws (ESS {ess:.0f} < {min_ess:g}): "
                          "the uncertainty of the forecast cannot be trusted")
    refuse += history.said.refuse
    caution += history.said.caution
    caution += covariates_outside_range(model, history.table)
    caution += _sample_timing(model, history)
    caution += _dose_per_kg(model, history)
    status = "refused" if refuse else "caution" if caution else "ok"
    return status, refuse + caution, Checks(worst, eta_sd, shrinkage, ess)


def _second_look(choice: _Choice, fit: MAPEstimate | None, target: float,
                 probability: float | None) -> list[str]:
    """Reasons to look again at an advised regimen that meets the criterion narrowly."""
    out = []
    if choice.action == "continue" and fit is not None:
        seen = fit.records[(fit.records["EVID"] == 0) & (fit.records["MDV"] == 0)]
        last = seen.iloc[-1]
        if last["DV"] < target:
            out.append(f"the last measured trough ({last['DV']:.3g} mg/L on day "
                       f"{last['TIME']:g}) is below the target, yet the forecast of the "
                       "current regimen meets it: look again before continuing")
    option = choice.recommended
    if option is not None and probability is not None and option.lowest_trough_map < target:
        out.append(f"borderline: the MAP forecast of this regimen falls to "
                   f"{option.lowest_trough_map:.2f} mg/L, below the target, although "
                   f"{_criterion(target, probability)}")
    return out


# --------------------------------------------------------------------------- messages


def _criterion(target: float, probability: float | None) -> str:
    if probability is None:
        return f"every trough at the MAP estimate is at or above {target:g} mg/L"
    if probability == 0.5:
        return f"the posterior median of every trough is at or above {target:g} mg/L"
    return (f"at every trough at least {probability:.0%} of posterior draws are at or above "
            f"{target:g} mg/L")


def level_name(probability: float | None) -> str:
    """What "lowest trough" means at a required probability: ``"median"`` at 0.5,
    ``"20th-percentile"`` at 0.8, ``"MAP"`` without draws.

    Examples
    --------
    >>> level_name(0.5), level_name(0.8), level_name(None)
    ('median', '20th-percentile', 'MAP')
    """
    if probability is None:
        return "MAP"
    if probability == 0.5:
        return "median"
    return f"{(1.0 - probability) * 100:.3g}th-percentile"


def _message(choice: _Choice, history: _History, grid: _Grid, status: str,
             reasons: list[str], settings: Settings, when: str) -> str:
    criterion = _criterion(grid.target, grid.probability)
    level = "lowest " + level_name(grid.probability)
    current = grid.option(grid.current_dose, grid.current_weeks)
    if status == "refused":
        text = ("No recommendation: " + "; ".join(reasons) + ". Check the data; the "
                "regimen options are not shown as advice.")
    elif choice.action == "unattainable":
        closest = choice.closest
        text = (f"Not attainable within limits: with doses up to {settings.max_mg_per_kg:g} "
                f"mg/kg and intervals of {min(settings.intervals_weeks):g} weeks or more, "
                f"no option meets the target ({criterion}). Closest: {closest.describe()} "
                f"({level} trough {closest.lowest_trough:.2f} mg/L).")
    elif choice.action == "continue":
        rec = choice.recommended
        assert rec is not None
        text = (f"Continue {rec.describe()}, next dose {when}: {choice.rule} ({criterion}; "
                f"{level} trough {rec.lowest_trough:.2f} mg/L).")
        less = [o.describe() for o in (choice.reduce_dose, choice.extend_interval) if o]
        if less and settings.objective == "smallest_change":
            text += (" Less drug would also meet it (reported apart): " + "; ".join(less)
                     + ".")
    else:
        rec = choice.recommended
        assert rec is not None
        state = ("meets the target" if current.meets_target else
                 f"misses the target ({level} trough {current.lowest_trough:.2f} mg/L)")
        text = (f"Give {rec.describe()} from {when}: the current {current.describe()} "
                f"{state}; {choice.rule} ({criterion}; {level} trough "
                f"{rec.lowest_trough:.2f} mg/L; {rec.change_in_drug_per_week:+.0%} drug per "
                "week).")
        others = [o for o in (choice.dose_only, choice.interval_only)
                  if o is not None and o != rec]
        if others and settings.objective == "smallest_change":
            text += " The other single change: " + "; ".join(
                f"{o.describe()} ({o.change_in_drug_per_week:+.0%})" for o in others) + "."
    option = choice.recommended
    if status != "refused" and option is not None and option.above_label:
        text += " Above the label (more than its highest dose or more often than its interval)."
    if status != "refused" and option is not None and option.below_label:
        text += " Below the label dose per kg."
    if history.notes:
        text += " Assumed: " + "; ".join(history.notes) + "."
    if status == "caution":
        text += " Caution: " + "; ".join(reasons) + "."
    return text


# --------------------------------------------------------------------------- public API


def _check(target: float, probability: float | None) -> None:
    if not np.isfinite(target) or target <= 0:
        raise ValueError(f"`target` must be positive (mg/L); got {target!r}")
    if probability is not None and not 0 < probability < 1:
        raise ValueError(f"`probability` must be between 0 and 1 (or None); got {probability!r}")


def _settings(model: PopulationModel, objective: str, probability: float | None,
              intervals_weeks: tuple[float, ...], vial_mg: float | None | str,
              **rest: Any) -> Settings:
    if objective not in OBJECTIVES:
        raise ValueError(f"`objective` must be one of {', '.join(OBJECTIVES)}; got "
                         f"{objective!r}")
    if rest["n_draws"] < 0:
        raise ValueError(f"`n_draws` must be >= 0; got {rest['n_draws']}")
    if vial_mg == "label":
        vial_mg = model.label.vial_mg if model.label is not None else None
    if vial_mg is not None and not float(vial_mg) > 0:  # type: ignore[arg-type]
        raise ValueError(f"`vial_mg` must be positive or None; got {vial_mg!r}")
    weeks = tuple(sorted({float(w) for w in intervals_weeks
                          if w >= rest["min_interval_weeks"] - _TOL}))
    if not weeks:
        raise ValueError(f"no interval in {intervals_weeks} is at least "
                         f"{rest['min_interval_weeks']} weeks")
    return Settings(objective=objective,
                    probability=None if rest["n_draws"] == 0 else probability,
                    intervals_weeks=weeks,
                    vial_mg=None if vial_mg is None else float(vial_mg),  # type: ignore[arg-type]
                    **rest)


def recommend_regimen(
    model: PopulationModel,
    data: pd.DataFrame,
    target: float = 6.0,
    *,
    probability: float | None = 0.5,
    objective: str = "smallest_change",
    intervals_weeks: tuple[float, ...] = (4, 5, 6, 7, 8),
    vial_mg: float | None | str = "label",
    dose_step_mg_per_kg: float | None = None,
    max_mg_per_kg: float = 20.0,
    min_interval_weeks: float = 4.0,
    max_interval_weeks: float = 12.0,
    horizon_weeks: float = 52.0,
    n_draws: int = 1000,
    seed: int = 0,
    current_interval_weeks: float | None = None,
    next_dose_day: float | None = None,
    next_dose_date: object | None = None,
    lloq: float | None = None,
    accept_outliers: bool = False,
    min_ess: float = 200.0,
) -> Recommendation:
    """The smallest change expected to keep every coming trough at or above the target.

    The rule (``objective="smallest_change"``): continue a regimen that meets the target;
    otherwise the smaller single change (dose only or interval only, by the increase in
    drug per week; ties to fewer infusions); both only when no single change gets there.
    Each result has a status ("ok", "caution", "refused") with its reasons:

    * refused: the fit failed; a measured value is more than 4 residual SDs from its
      individual prediction (a unit slip, a mis-timed sample; unless ``accept_outliers``);
      fewer than ``min_ess`` effective posterior draws;
    * caution: no measured concentration (prior only); covariates outside the model's data
      range; ETA shrinkage of clearance over 50 %; a sample inside an infusion or within
      1 h after it; individual clearance more than 3 SD from typical; the last dose's
      rate modelled (RATE -1: new doses forecast as boluses).

    New doses are given like the last one: into its compartment, over its length (RATE
    or DUR), or over the model's duration where that was modelled (RATE -2).

    Parameters
    ----------
    model : PopulationModel
        For example ``pkmodel.models.load("fasanmade2011")``; its ``label`` gives the
        induction schedule, vial size and label limits.
    data : DataFrame
        One patient's history: doses, measured concentrations (EVID 0, MDV 0, DV in mg/L)
        and covariates (WT in kg is required). Without measured concentrations the prior
        is used. A DATE column (see :func:`pkmodel.data.from_clinical`) gives dates to the
        output; an ASSUMPTION column's sentences are repeated in the notes.
    target : float
        Target trough (mg/L); 6 by default (Kang 2026), a user's choice.
    probability : float or None
        Required share of posterior draws at or above the target at every trough: 0.5
        ("expected to"); 0.8 for a stricter rule; None for the MAP only.
    objective : {"smallest_change", "least_drug", "fewest_infusions"}
        The clinical rule above; the least drug per week among all options (ties to the
        longer interval); or the longest interval that meets the target, at its least dose.
    intervals_weeks : tuple of float
        Candidate intervals (weeks) for changes.
    vial_mg : float, None or "label"
        Doses in whole vials of this size (mg); "label": the model label's vial (100 mg
        for infliximab); None: steps of ``dose_step_mg_per_kg``.
    dose_step_mg_per_kg : float, optional
        Dose grid step (mg/kg) when ``vial_mg`` is None (default 1).
    max_mg_per_kg : float
        Largest dose considered (mg/kg); 20 by default (pediatric literature).
    min_interval_weeks : float
        Shortest interval considered (weeks).
    max_interval_weeks : float
        Longest interval reported as a de-escalation (weeks).
    horizon_weeks : float
        Troughs are checked over this horizon after the next dose, plus the steady state.
    n_draws : int
        Posterior (or prior) draws; 0 for the MAP only.
    seed : int
        Same seed, same draws, same recommendation.
    current_interval_weeks : float, optional
        The interval the patient is on (default: the last gap between doses; after the
        label's induction, its maintenance interval).
    next_dose_day : float, optional
        When the next dose is due (day); default: last dose + current interval.
    next_dose_date : date-like, optional
        The same as a calendar date, for data with a DATE column.
    lloq : float, optional
        Lower limit of quantification (mg/L) for measured values without an LLOQ: values
        below it are censored (M3).
    accept_outliers : bool
        Use implausible measurements anyway (status "caution" instead of "refused").
    min_ess : float
        Fewest effective posterior draws accepted.

    Returns
    -------
    Recommendation

    Examples
    --------
    >>> from pkmodel.data import infliximab_regimen
    >>> from pkmodel.models import load
    >>> child = infliximab_regimen(28.0, until_week=22,
    ...                            covariates={"ALB": 3.3, "ATI": 0, "IMM": 1})
    >>> measured = (child.EVID == 0) & child.TIME.isin([98.0, 154.0])
    >>> child.loc[measured, ["MDV", "DV"]] = [[0, 1.1], [0, 0.8]]
    >>> rec = recommend_regimen(load("fasanmade2011"), child, n_draws=200)
    >>> rec.action, rec.status, rec.recommended.meets_target
    ('change', 'ok', True)
    """
    return _recommend(
        [(model, data, 1.0)], target, probability=probability, objective=objective,
        intervals_weeks=intervals_weeks, vial_mg=vial_mg,
        dose_step_mg_per_kg=dose_step_mg_per_kg, max_mg_per_kg=max_mg_per_kg,
        min_interval_weeks=min_interval_weeks, max_interval_weeks=max_interval_weeks,
        horizon_weeks=horizon_weeks, n_draws=n_draws, seed=seed,
        current_interval_weeks=current_interval_weeks, next_dose_day=next_dose_day,
        next_dose_date=next_dose_date, lloq=lloq, accept_outliers=accept_outliers,
        min_ess=min_ess)


def recommend_averaged(
    members: Sequence[tuple[PopulationModel, pd.DataFrame, float]],
    target: float = 6.0,
    **options: Any,
) -> Recommendation:
    """:func:`recommend_regimen` under a weighted average of models (Bayesian model
    averaging): each model's posterior draws of the coming troughs are pooled, as many from
    each as its share of the weight, and the rule is applied to the pooled draws.

    Parameters
    ----------
    members : sequence of (PopulationModel, DataFrame, float)
        Each model, the patient's records in its columns (see
        :func:`pkmodel.averaging.for_model`) and its weight (normalised here). The first
        member leads: its fit gives the checks, the MAP forecast and the history (next
        dose, current regimen), which every member must share. A member whose own checks
        refuse it (or whose fit or draws fail) is left out, with a reason; a kept member's
        own cautions are reasons too, named. Member ``k`` (0-based) draws with seed
        ``seed + k``, so that no two members share random numbers.
    target : float
        Target trough (mg/L).
    **options
        As for :func:`recommend_regimen`.

    Returns
    -------
    Recommendation
        Its notes give the weights the draws were pooled by.

    Examples
    --------
    >>> from pkmodel.data import infliximab_regimen
    >>> from pkmodel.models import load
    >>> child = infliximab_regimen(28.0, until_week=22,
    ...                            covariates={"ALB": 3.3, "ATI": 0, "IMM": 1})
    >>> measured = (child.EVID == 0) & child.TIME.isin([98.0, 154.0])
    >>> child.loc[measured, ["MDV", "DV"]] = [[0, 1.1], [0, 0.8]]
    >>> model = load("fasanmade2011")
    >>> one = recommend_averaged([(model, child, 1.0)], n_draws=200)
    >>> alone = recommend_regimen(model, child, n_draws=200)
    >>> one.recommended == alone.recommended
    True
    """
    if not members:
        raise ValueError("`members` must hold at least one (model, data, weight)")
    weights = np.array([float(w) for _, _, w in members])
    if not (np.all(np.isfinite(weights)) and np.all(weights >= 0) and weights[0] > 0):
        raise ValueError(f"member weights must be >= 0, the first (leading) one positive; "
                         f"got {weights.tolist()}")
    first = members[0]
    bound = inspect.signature(recommend_regimen).bind(first[0], first[1], target, **options)
    bound.apply_defaults()
    chosen = {k: v for k, v in bound.arguments.items() if k not in ("model", "data", "target")}
    return _recommend(list(members), target, **chosen)


def _recommend(members: list[tuple[PopulationModel, pd.DataFrame, float]], target: float,
               *, probability, objective, intervals_weeks, vial_mg, dose_step_mg_per_kg,
               max_mg_per_kg, min_interval_weeks, max_interval_weeks, horizon_weeks,
               n_draws, seed, current_interval_weeks, next_dose_day, next_dose_date, lloq,
               accept_outliers, min_ess) -> Recommendation:  # as recommend_regimen's
    """The recommendation of :func:`recommend_regimen`, with the draws of several
    weighted models pooled (one model: exactly recommend_regimen)."""
    model = members[0][0]
    _check(target, probability)
    settings = _settings(
        model, objective, probability, intervals_weeks, vial_mg,
        dose_step_mg_per_kg=dose_step_mg_per_kg, max_mg_per_kg=max_mg_per_kg,
        min_interval_weeks=min_interval_weeks, max_interval_weeks=max_interval_weeks,
        horizon_weeks=horizon_weeks, n_draws=n_draws, seed=seed,
        accept_outliers=accept_outliers, min_ess=min_ess, lloq=lloq)
    with warnings.catch_warnings():  # what these warnings say becomes reasons
        warnings.simplefilter("ignore", CovariateWarning)
        warnings.simplefilter("ignore", PlausibilityWarning)
        reading = {"current_interval_weeks": current_interval_weeks,
                   "next_dose_day": next_dose_day, "next_dose_date": next_dose_date,
                   "lloq": lloq}
        history = _history(model, members[0][1], **reading)
        if not np.isfinite(history.current_interval_days):
            raise DatasetError("one dose only: give the interval the patient is on "
                               "(`current_interval_weeks`, --current-interval-weeks)")
        eta, fit, sample = _draws(model, history, n_draws, seed, min_ess)
    status, reasons, checks = _checks(model, history, fit, sample,
                                      accept_outliers=accept_outliers, min_ess=min_ess)
    current_weeks = round(history.current_interval_days / DAYS_PER_WEEK, 9)
    longer = [float(w) for w in range(int(np.floor(current_weeks)) + 1,
                                      int(np.floor(max_interval_weeks)) + 1)]
    all_weeks = sorted(set(settings.intervals_weeks) | {current_weeks} | set(longer))
    probability = settings.probability if sample is not None or fit is None else None
    intervals_days = np.array(all_weeks) * DAYS_PER_WEEK
    forecast = _forecast(model, history, eta, intervals_days, horizon_weeks * DAYS_PER_WEEK)
    if len(members) > 1 and probability is not None:
        forecast, said = _average(members, history, forecast, intervals_days,
                                  horizon_weeks * DAYS_PER_WEEK, reading, n_draws, seed,
                                  accept_outliers=accept_outliers, min_ess=min_ess)
        reasons += said
        status = "caution" if said and status == "ok" else status
    grid = _Grid(forecast, all_weeks, history.weight, float(target), probability,
                 history.current_dose_mg, current_weeks, model.label)
    doses = _dose_grid(history.weight, vial_mg=settings.vial_mg,
                       step_mg_per_kg=dose_step_mg_per_kg, max_mg_per_kg=max_mg_per_kg,
                       notes=history.notes)
    options = [o for w in settings.intervals_weeks for o in grid.options(doses, w)]
    current = grid.option(history.current_dose_mg, current_weeks)
    choice = _choose(grid, objective, doses, list(settings.intervals_weeks), longer, options,
                     current)
    if status == "refused":  # nothing is offered as advice, to people or programs
        choice = _Choice("refused", None, current)
    else:
        second = _second_look(choice, fit, float(target), probability)
        reasons += second
        status = "caution" if second else status
    when = f"day {history.next_dose_day:g}"
    date = None
    if history.origin is not None:
        stamp = (history.origin + pd.Timedelta(days=history.next_dose_day)).round("min")
        date = stamp.isoformat(timespec="minutes")
        when += f" ({stamp:%Y-%m-%d %H:%M})"
    shown = current if status == "refused" else choice.recommended or choice.closest
    return Recommendation(
        action=choice.action, status=status, reasons=tuple(reasons),
        notes=tuple(history.notes), objective=objective, recommended=choice.recommended,
        closest=choice.closest, dose_only=choice.dose_only,
        interval_only=choice.interval_only, reduce_dose=choice.reduce_dose,
        extend_interval=choice.extend_interval, current=current,
        next_dose_day=history.next_dose_day, next_dose_date=date, weight_kg=history.weight,
        target=float(target), probability=probability, options=_option_table(options),
        troughs=grid.troughs(shown, history.origin),
        current_troughs=grid.troughs(current, history.origin), estimate=fit, checks=checks,
        settings=settings,
        message=_message(choice, history, grid, status, reasons, settings, when),
    )


def dose_for_target_trough(
    model: PopulationModel,
    data: pd.DataFrame,
    target: float = 6.0,
    *,
    interval_weeks: float = 8.0,
    probability: float | None = None,
    horizon_weeks: float = 52.0,
    n_draws: int = 1000,
    seed: int = 0,
    next_dose_day: float | None = None,
    current_interval_weeks: float | None = None,
) -> float:
    """The exact dose (mg, not rounded) that brings every coming trough to the target.

    By linearity, each trough is ``C_history + D * C_unit``: a draw reaches the target at
    every trough when ``D`` is at least the largest ``(target - C_history) / C_unit`` over
    its troughs; the dose is that value at the MAP, or, with ``probability``, the smallest
    dose that a share ``probability`` of the draws reach at every trough. New doses are
    given like the last one; a ValueError where its rate is modelled (RATE -1: the
    length would grow with the dose, and linearity fail).

    Examples
    --------
    >>> from pkmodel.data import infliximab_regimen
    >>> from pkmodel.models import load
    >>> child = infliximab_regimen(28.0, until_week=22,
    ...                            covariates={"ALB": 3.3, "ATI": 0, "IMM": 1})
    >>> dose = dose_for_target_trough(load("fasanmade2011"), child, 6.0, interval_weeks=8)
    >>> round(dose)   # mg every 8 weeks for a typical child like this one
    752
    """
    _check(target, probability)
    history = _history(model, data, next_dose_day=next_dose_day,
                       current_interval_weeks=current_interval_weeks)
    _linear_in_dose(history)
    eta, _, _ = _draws(model, history, n_draws if probability is not None else 0, seed, 0.0)
    forecast = _forecast(model, history, eta, np.array([interval_weeks * DAYS_PER_WEEK]),
                         horizon_weeks * DAYS_PER_WEEK)
    needed = ((target - forecast.history[0]) / forecast.unit[0]).max(axis=1)  # (M,)
    if probability is None or needed.shape[0] == 1:
        return float(max(needed[0], 0.0))
    draws = needed[1:]
    k = _required_count(draws.size, probability)
    return float(max(np.partition(draws, k - 1)[k - 1], 0.0))


def interval_for_target_trough(
    model: PopulationModel,
    data: pd.DataFrame,
    target: float = 6.0,
    *,
    dose_mg: float,
    probability: float | None = None,
    horizon_weeks: float = 52.0,
    n_draws: int = 1000,
    seed: int = 0,
    next_dose_day: float | None = None,
    current_interval_weeks: float | None = None,
) -> float | None:
    """The longest interval (whole days, 7 to 84) keeping every trough at the target.

    Returns None when even every 7 days is not enough. New doses of ``dose_mg`` are given
    like the last one; a ValueError where its rate is modelled (RATE -1), as for
    :func:`dose_for_target_trough`.
    """
    _check(target, probability)
    if not dose_mg > 0:
        raise ValueError(f"`dose_mg` must be positive; got {dose_mg!r}")
    history = _history(model, data, next_dose_day=next_dose_day,
                       current_interval_weeks=current_interval_weeks)
    _linear_in_dose(history)
    eta, _, _ = _draws(model, history, n_draws if probability is not None else 0, seed, 0.0)
    days = np.arange(7.0, 85.0)
    forecast = _forecast(model, history, eta, days, horizon_weeks * DAYS_PER_WEEK)
    best = None
    for i, tau in enumerate(days):
        if _level(forecast.troughs(i, dose_mg), probability).min() >= target:
            best = float(tau)
    return best


def time_to_trough(
    model: PopulationModel,
    data: pd.DataFrame,
    target: float = 6.0,
    *,
    eta: np.ndarray | None = None,
    max_days: float = 365.0,
) -> float | None:
    """When the concentration falls to the target after the last record, with no more doses.

    Parameters
    ----------
    eta : ndarray, optional
        The patient's ETAs (default: the MAP from the measured troughs, or zero).

    Returns
    -------
    float or None
        The day (data's time scale), to 0.01 day; None if it stays above the target
        for ``max_days`` or is already below it.
    """
    _check(target, None)
    history = _history(model, data, next_dose_day=float(validate(data)["TIME"].max()))
    if eta is None:
        eta, _, _ = _draws(model, history, 0, 0, 0.0)
    eta = np.atleast_2d(np.asarray(eta, dtype=float))
    start = float(history.table["TIME"].max())
    grid = start + np.arange(0.0, max_days + 0.01, 0.01)
    conc = concentrations_after(model, history.table, eta[:1], grid)[0]
    if conc[0] < target:
        return None
    below = np.flatnonzero(conc < target)
    if below.size == 0:
        return None
    return float(grid[below[0]])

"""Dose optimisation: the smallest change that keeps every coming trough at the target.

From a patient's history (doses, measured troughs, covariates) the model gives the MAP
estimate and posterior draws (or the prior, when nothing has been measured). For every
candidate regimen (a dose and an interval, started at the next due dose and kept over the
horizon) every trough is predicted: the trough before each new dose and the steady-state
trough. PK is linear, so for a given interval the troughs are exactly

``C(t) = C_history(t) + D * C_unit(t)``

where ``C_history`` comes from the past doses only and ``C_unit`` from the new regimen with
a 1-mg dose: two engine calls cover every dose on the grid, every interval and every draw.

A candidate meets the target at level ``probability`` when, at every trough, the share of
posterior draws at or above the target is at least ``probability`` (0.5: the posterior
median trough is at or above it, "expected to"). The recommendation is the candidate with
the least drug per week (mg/kg/week) that meets it; ties go to the longer interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pkmodel.data import validate
from pkmodel.errors import DatasetError
from pkmodel.estimate import MAPEstimate, estimate_map, sample_posterior
from pkmodel.model import PopulationModel, check_covariates, evaluate_parameters
from pkmodel.predict import _profile_concentrations, to_events

__all__ = [
    "Option",
    "Recommendation",
    "dose_for_target_trough",
    "interval_for_target_trough",
    "recommend_regimen",
    "time_to_trough",
]

DAYS_PER_WEEK = 7.0
#: Label limits flagged (not forbidden): 10 mg/kg, every 4 weeks (dosing reference file).
LABEL_MAX_MG_PER_KG = 10.0
LABEL_MIN_INTERVAL_WEEKS = 4.0


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
        Dose per kg (mg/kg).
    mg_per_kg_per_week : float
        Drug per week (mg/kg/week), the quantity minimised.
    lowest_trough : float
        Lowest coming trough at the required level (mg/L): the (1 - probability) quantile
        over posterior draws, or the MAP trough without draws.
    lowest_trough_map : float
        Lowest coming trough at the MAP estimate (mg/L).
    pta : float
        Probability that every coming trough is at or above the target (share of posterior
        draws; without draws, 1 or 0 from the MAP).
    meets_target : bool
        Whether every trough reaches the target at the required level.
    above_label : bool
        More than 10 mg/kg or more often than every 4 weeks.
    """

    dose_mg: float
    interval_weeks: float
    mg_per_kg: float
    mg_per_kg_per_week: float
    lowest_trough: float
    lowest_trough_map: float
    pta: float
    meets_target: bool
    above_label: bool


@dataclass(frozen=True)
class Recommendation:
    """What to give next, and what every alternative would do.

    Attributes
    ----------
    recommended : Option or None
        The option with the least drug per week that meets the target; None when no
        option within the limits does (see ``closest`` and ``message``).
    closest : Option
        With no feasible option, the one with the highest lowest trough; else the
        recommended one.
    dose_only : Option or None
        The smallest dose meeting the target at the current interval.
    interval_only : Option or None
        The longest interval meeting the target at the current dose.
    current : Option
        The current regimen continued.
    next_dose_day : float
        When the next dose is due (day, on the data's time scale).
    target : float
        Target trough (mg/L).
    probability : float or None
        Required level (None: MAP only).
    options : DataFrame
        Every candidate: DOSE_MG, MG_PER_KG, INTERVAL_WEEKS, MG_PER_KG_PER_WEEK,
        LOWEST_TROUGH, LOWEST_TROUGH_MAP, PTA, MEETS_TARGET, ABOVE_LABEL.
    troughs : DataFrame
        The recommended (or closest) regimen's troughs: DAY, WEEK, STEADY_STATE, MAP, P10,
        P50, P90 (mg/L) and PTA per trough.
    current_troughs : DataFrame
        The same for the current regimen.
    estimate : MAPEstimate or None
        The fit to the measured troughs (None: dosed from the prior).
    message : str
        Plain-language summary, including why no recommendation can be made.
    """

    recommended: Option | None
    closest: Option
    dose_only: Option | None
    interval_only: Option | None
    current: Option
    next_dose_day: float
    target: float
    probability: float | None
    options: pd.DataFrame
    troughs: pd.DataFrame
    current_troughs: pd.DataFrame
    estimate: MAPEstimate | None
    message: str

    @property
    def feasible(self) -> bool:
        """Whether some option within the limits meets the target."""
        return self.recommended is not None


@dataclass
class _History:
    """The patient's records and what the regimen so far implies."""

    table: pd.DataFrame
    weight: float
    last_dose_day: float
    current_dose_mg: float
    current_interval_days: float
    infusion_days: float
    next_dose_day: float


def _history(model: PopulationModel, data: pd.DataFrame, interval_weeks: float | None,
             next_dose_day: float | None) -> _History:
    table = validate(data, covariates=model.covariate_names)
    check_covariates(model, table)
    if table["ID"].nunique() != 1:
        raise DatasetError(f"column 'ID': expected one patient; got {table['ID'].nunique()} "
                           "IDs (recommend for each patient separately)")
    if "WT" not in table.columns:
        raise DatasetError("column 'WT' is missing: doses are chosen per kg of body weight")
    doses = table[(table["EVID"] == 1) | (table["EVID"] == 4)]
    if doses.empty:
        raise DatasetError("the history has no dose (EVID 1): nothing to continue from")
    times = doses["TIME"].to_numpy()
    if interval_weeks is not None:
        interval = float(interval_weeks) * DAYS_PER_WEEK
    elif len(times) >= 2:
        interval = float(times[-1] - times[-2])
    else:
        raise DatasetError("one dose only: give `current_interval_weeks` (the interval "
                           "the patient is on)")
    last = doses.iloc[-1]
    if last["RATE"] > 0:
        infusion = float(last["AMT"] / last["RATE"])
    elif last["DUR"] > 0:
        infusion = float(last["DUR"])
    else:
        infusion = 2.0 / 24.0  # infliximab label: 2-h infusion
    due = float(times[-1] + interval) if next_dose_day is None else float(next_dose_day)
    if due < table["TIME"].max():
        raise DatasetError(f"the next dose (day {due:g}) would come before the last record "
                           f"(day {table['TIME'].max():g}); give `next_dose_day`")
    return _History(table, float(table["WT"].iloc[-1]), float(times[-1]),
                    float(last["AMT"]), interval, infusion, due)


def _future_rows(history: _History, times: Any, pid: Any, *, doses: np.ndarray | None,
                 interval: float | None = None, ss: bool = False) -> pd.DataFrame:
    """Records after the history: samples at ``times`` (before any dose at the same time)
    and unit doses; covariates carried forward from the last record."""
    sample_t = np.asarray(times, dtype=float)
    dose_t = np.asarray([] if doses is None else doses, dtype=float)
    time = np.concatenate([sample_t, dose_t])
    is_dose = np.concatenate([np.zeros(sample_t.size, bool), np.ones(dose_t.size, bool)])
    order = np.lexsort((is_dose, time))
    time, is_dose = time[order], is_dose[order]
    n = time.size
    columns: dict[str, Any] = {
        "ID": np.full(n, pid, dtype=object), "TIME": time, "EVID": is_dose.astype(float),
        "AMT": is_dose * 1.0, "RATE": is_dose / history.infusion_days, "DUR": np.zeros(n),
        "II": is_dose * (interval if ss and interval else 0.0), "ADDL": np.zeros(n),
        "SS": is_dose * float(ss), "MDV": np.ones(n), "CMT": np.zeros(n),
        "DV": np.full(n, np.nan),
    }
    last = history.table.iloc[-1]
    for name in history.table.columns:
        if name not in columns:
            columns[name] = np.repeat(last[name], n)
    return pd.DataFrame(columns)


def _draws(model: PopulationModel, history: _History, n_draws: int, seed: int
           ) -> tuple[np.ndarray, MAPEstimate | None]:
    """Row 0: the MAP (or zero); then ``n_draws`` posterior (or prior) draws."""
    table = history.table
    measured = ((table["EVID"] == 0) & (table["MDV"] == 0)).any()
    names = list(model.eta_names)
    if not measured:
        rng = np.random.default_rng(seed)
        draws = rng.multivariate_normal(np.zeros(len(names)), model.omega, size=n_draws,
                                        method="eigh") if n_draws else np.zeros((0, len(names)))
        return np.vstack([np.zeros((1, len(names))), draws]), None
    fit = estimate_map(model, table)
    mode = fit.individuals[names].to_numpy(dtype=float)
    if not n_draws:
        return mode, fit
    sample = sample_posterior(model, table, n=n_draws, seed=seed, estimate=fit)
    return np.vstack([mode, sample.draws[names].to_numpy(dtype=float)]), fit


def _concentrations(model: PopulationModel, tables: list[pd.DataFrame], eta: np.ndarray,
                    ) -> list[np.ndarray]:
    """Concentrations ``(M, N_i)`` on the rows of each table, for every ETA draw."""
    frame = pd.concat(tables, ignore_index=True)  # built here from a validated history
    events = to_events(frame, model.structure)
    cov = {c: frame[c].to_numpy(dtype=float) for c in model.covariate_names}
    params = evaluate_parameters(model, cov, eta[:, None, :])
    params = {k: np.broadcast_to(v, (eta.shape[0], len(frame))) for k, v in params.items()}
    conc = _profile_concentrations(model, events, params)  # (B, M, R)
    out = []
    for b, size in enumerate(t.shape[0] for t in tables):
        keep = events.source_row[b] >= 0
        rows = events.source_row[b, keep]
        values = np.empty((eta.shape[0], len(frame)))
        values[:, rows] = conc[b][:, keep]
        lo = sum(t.shape[0] for t in tables[:b])
        out.append(values[:, lo:lo + size])
    return out


@dataclass
class _Forecast:
    """Troughs of every interval: history part and unit-dose part, per draw."""

    intervals: np.ndarray  # (I,) days
    days: list[np.ndarray]  # per interval: trough days (k >= 1), then the steady state
    history: list[np.ndarray]  # per interval: (M, K + 1) mg/L from past doses
    unit: list[np.ndarray]  # per interval: (M, K + 1) mg/L per mg of the new regimen


def _forecast(model: PopulationModel, history: _History, eta: np.ndarray,
              intervals_days: np.ndarray, horizon_days: float) -> _Forecast:
    t0 = history.next_dose_day
    trough_days = [t0 + tau * np.arange(1, int(np.floor(horizon_days / tau + 1e-9)) + 1)
                   for tau in intervals_days]
    all_days = np.unique(np.concatenate(trough_days))
    pid = history.table["ID"].iloc[0]
    base = pd.concat([history.table, _future_rows(history, all_days, pid, doses=None)],
                     ignore_index=True)
    tables = [base]
    for i, tau in enumerate(intervals_days):
        days = trough_days[i]
        doses = t0 + tau * np.arange(len(days))
        tables.append(_future_rows(history, days, f"u{i}", doses=doses))
        tables.append(_future_rows(history, [t0 + tau], f"s{i}", doses=np.array([t0]),
                                   interval=tau, ss=True))
    # Each unit regimen starts fresh: its own ID, beginning at the next dose. The long
    # history profile is solved apart from the short unit ones (less padding).
    conc = _concentrations(model, tables[:1], eta) + _concentrations(model, tables[1:], eta)
    n_hist = len(history.table)
    base_conc = conc[0][:, n_hist:]
    base_days = base["TIME"].to_numpy()[n_hist:]
    hist_parts, unit_parts, day_parts = [], [], []
    for i in range(len(intervals_days)):
        days = trough_days[i]
        at = np.searchsorted(base_days, days)
        unit_rows = tables[1 + 2 * i]
        sample_rows = np.flatnonzero(unit_rows["EVID"].to_numpy() == 0)
        steady = tables[2 + 2 * i]
        steady_row = np.flatnonzero(steady["EVID"].to_numpy() == 0)
        hist_parts.append(np.concatenate([base_conc[:, at], np.zeros((eta.shape[0], 1))], 1))
        unit_parts.append(np.concatenate([conc[1 + 2 * i][:, sample_rows],
                                          conc[2 + 2 * i][:, steady_row]], axis=1))
        day_parts.append(np.concatenate([days, [np.inf]]))
    return _Forecast(intervals_days, day_parts, hist_parts, unit_parts)


def _level(troughs: np.ndarray, probability: float | None) -> np.ndarray:
    """Per trough: the (1 - probability) quantile over draws (rows 1:), or the MAP (row 0)."""
    if probability is None or troughs.shape[0] == 1:
        return troughs[0]
    return np.quantile(troughs[1:], 1.0 - probability, axis=0)


def _option(forecast: _Forecast, i: int, dose: float, weight: float, target: float,
            probability: float | None) -> Option:
    troughs = forecast.history[i] + dose * forecast.unit[i]
    level = _level(troughs, probability)
    draws = troughs[1:] if troughs.shape[0] > 1 else troughs
    weeks = forecast.intervals[i] / DAYS_PER_WEEK
    mg_per_kg = dose / weight
    return Option(
        dose_mg=float(dose), interval_weeks=float(weeks), mg_per_kg=float(mg_per_kg),
        mg_per_kg_per_week=float(mg_per_kg / weeks), lowest_trough=float(level.min()),
        lowest_trough_map=float(troughs[0].min()),
        pta=float(np.mean(np.all(draws >= target, axis=1))),
        meets_target=bool(level.min() >= target),
        above_label=bool(mg_per_kg > LABEL_MAX_MG_PER_KG + 1e-9
                         or weeks < LABEL_MIN_INTERVAL_WEEKS - 1e-9),
    )


def _trough_table(forecast: _Forecast, i: int, dose: float, target: float) -> pd.DataFrame:
    troughs = forecast.history[i] + dose * forecast.unit[i]
    draws = troughs[1:] if troughs.shape[0] > 1 else troughs
    days = forecast.days[i]
    return pd.DataFrame({
        "DAY": np.where(np.isfinite(days), days, np.nan),
        "WEEK": np.where(np.isfinite(days), days / DAYS_PER_WEEK, np.nan),
        "STEADY_STATE": ~np.isfinite(days),
        "MAP": troughs[0],
        "P10": np.quantile(draws, 0.1, axis=0),
        "P50": np.quantile(draws, 0.5, axis=0),
        "P90": np.quantile(draws, 0.9, axis=0),
        "PTA": np.mean(draws >= target, axis=0),
    })


def _check(target: float, probability: float | None) -> None:
    if not np.isfinite(target) or target <= 0:
        raise ValueError(f"`target` must be positive (mg/L); got {target!r}")
    if probability is not None and not 0 < probability < 1:
        raise ValueError(f"`probability` must be between 0 and 1 (or None); got {probability!r}")


def recommend_regimen(
    model: PopulationModel,
    data: pd.DataFrame,
    target: float = 6.0,
    *,
    probability: float | None = 0.5,
    intervals_weeks: tuple[float, ...] = (4, 5, 6, 7, 8),
    vial_mg: float | None = 100.0,
    dose_step_mg_per_kg: float | None = None,
    max_mg_per_kg: float = 20.0,
    min_interval_weeks: float = 4.0,
    horizon_weeks: float = 52.0,
    n_draws: int = 1000,
    seed: int = 0,
    current_interval_weeks: float | None = None,
    next_dose_day: float | None = None,
) -> Recommendation:
    """The smallest change expected to keep every coming trough at or above the target.

    Parameters
    ----------
    model : PopulationModel
        For example ``pkmodel.models.load("fasanmade2011")``.
    data : DataFrame
        One patient's history: doses, measured troughs (EVID 0, MDV 0, DV in mg/L) and
        covariates (WT in kg is required). Without measured troughs the prior is used.
    target : float
        Target trough (mg/L); 6 by default (Kang 2026), a user's choice.
    probability : float or None
        Required share of posterior draws at or above the target at every trough: 0.5 (the
        posterior median, "expected to"); 0.8 for a stricter rule; None for the MAP only.
    intervals_weeks : tuple of float
        Candidate intervals (weeks).
    vial_mg : float or None
        Doses in whole vials of this size (mg); None to use ``dose_step_mg_per_kg``.
    dose_step_mg_per_kg : float, optional
        Dose grid step (mg/kg) when ``vial_mg`` is None.
    max_mg_per_kg : float
        Largest dose considered (mg/kg); 20 by default (pediatric literature).
    min_interval_weeks : float
        Shortest interval considered (weeks).
    horizon_weeks : float
        Troughs are checked over this horizon after the next dose, plus the steady state.
    n_draws : int
        Posterior (or prior) draws; 0 for the MAP only.
    seed : int
        Same seed, same draws, same recommendation.
    current_interval_weeks : float, optional
        The current interval, when the history holds a single dose.
    next_dose_day : float, optional
        When the changed regimen starts (day); default: last dose + current interval.

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
    >>> rec.recommended.dose_mg > 140, rec.recommended.meets_target
    (True, True)
    """
    _check(target, probability)
    if n_draws < 0:
        raise ValueError(f"`n_draws` must be >= 0; got {n_draws}")
    history = _history(model, data, current_interval_weeks, next_dose_day)
    weight = history.weight
    eta, fit = _draws(model, history, n_draws, seed)
    if n_draws == 0:
        probability = None
    weeks = sorted({float(w) for w in intervals_weeks if w >= min_interval_weeks - 1e-9})
    if not weeks:
        raise ValueError(f"no interval in {intervals_weeks} is at least {min_interval_weeks} "
                         "weeks")
    current_weeks = history.current_interval_days / DAYS_PER_WEEK
    all_weeks = sorted(set(weeks) | {round(current_weeks, 9)})
    forecast = _forecast(model, history, eta, np.array(all_weeks) * DAYS_PER_WEEK,
                         horizon_weeks * DAYS_PER_WEEK)
    max_mg = max_mg_per_kg * weight
    if vial_mg is not None:
        grid = vial_mg * np.arange(1, int(np.floor(max_mg / vial_mg + 1e-9)) + 1)
    else:
        step = dose_step_mg_per_kg or 1.0
        grid = step * weight * np.arange(1, int(np.floor(max_mg_per_kg / step + 1e-9)) + 1)
    if grid.size == 0:
        raise ValueError(f"no dose on the grid fits under {max_mg_per_kg} mg/kg "
                         f"({max_mg:.0f} mg) with vials of {vial_mg} mg")

    index_of = {w: all_weeks.index(w) for w in weeks}
    options = [_option(forecast, index_of[w], d, weight, target, probability)
               for w in weeks for d in grid]
    table = pd.DataFrame([{
        "DOSE_MG": o.dose_mg, "MG_PER_KG": o.mg_per_kg, "INTERVAL_WEEKS": o.interval_weeks,
        "MG_PER_KG_PER_WEEK": o.mg_per_kg_per_week, "LOWEST_TROUGH": o.lowest_trough,
        "LOWEST_TROUGH_MAP": o.lowest_trough_map, "PTA": o.pta,
        "MEETS_TARGET": o.meets_target, "ABOVE_LABEL": o.above_label} for o in options])
    table = table.sort_values(["MG_PER_KG_PER_WEEK", "INTERVAL_WEEKS"],
                              ascending=[True, False], kind="stable").reset_index(drop=True)

    feasible = [o for o in options if o.meets_target]
    recommended = min(feasible, key=lambda o: (o.mg_per_kg_per_week, -o.interval_weeks,
                                               o.dose_mg)) if feasible else None
    closest = recommended or max(options, key=lambda o: (o.lowest_trough,
                                                         -o.mg_per_kg_per_week))
    current_i = all_weeks.index(round(current_weeks, 9))
    current = _option(forecast, current_i, history.current_dose_mg, weight, target, probability)
    same_interval = [o for o in feasible if abs(o.interval_weeks - current_weeks) < 1e-9]
    dose_only = min(same_interval, key=lambda o: o.dose_mg) if same_interval else None
    same_dose = [_option(forecast, index_of[w], history.current_dose_mg, weight,
                         target, probability) for w in weeks]
    same_dose = [o for o in same_dose if o.meets_target]
    interval_only = max(same_dose, key=lambda o: o.interval_weeks) if same_dose else None

    chosen_i = int(np.argmin(np.abs(np.array(all_weeks) - closest.interval_weeks)))
    if probability is None:
        criterion = f"every trough at the MAP estimate is at or above {target:g} mg/L"
    elif probability == 0.5:
        criterion = f"the posterior median of every trough is at or above {target:g} mg/L"
    else:
        criterion = (f"at every trough at least {probability:.0%} of posterior draws are at or "
                     f"above {target:g} mg/L")
    if recommended is None:
        message = (f"Not attainable within limits: with doses up to {max_mg_per_kg:g} mg/kg and "
                   f"intervals of {min(weeks):g} weeks or more, no option gets there "
                   f"({criterion.replace(' is at', ' being at').replace(' are at', ' being at')}"
                   f"). Closest: {closest.dose_mg:g} mg every {closest.interval_weeks:g} weeks "
                   f"(lowest trough {closest.lowest_trough:.2f} mg/L).")
    else:
        message = (f"Give {recommended.dose_mg:g} mg ({recommended.mg_per_kg:.1f} mg/kg) every "
                   f"{recommended.interval_weeks:g} weeks from day {history.next_dose_day:g}: "
                   f"{criterion} (lowest {recommended.lowest_trough:.2f} mg/L"
                   + ("" if probability is None else
                      f"; every trough on target in {recommended.pta:.0%} of draws") + ").")
        if recommended.above_label:
            message += " Above the label (10 mg/kg, every 4 weeks)."
    if fit is None:
        message += " No measured trough: dosed from the population prior."
    elif not fit.success:
        message += f" Warning: the MAP fit did not converge ({fit.individuals.MESSAGE.iloc[0]})."
    return Recommendation(
        recommended=recommended, closest=closest, dose_only=dose_only,
        interval_only=interval_only, current=current, next_dose_day=history.next_dose_day,
        target=float(target), probability=probability, options=table,
        troughs=_trough_table(forecast, chosen_i, closest.dose_mg, target),
        current_troughs=_trough_table(forecast, current_i, history.current_dose_mg, target),
        estimate=fit, message=message,
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
) -> float:
    """The exact dose (mg, not rounded) that brings every coming trough to the target.

    By linearity, each trough is ``C_history + D * C_unit``: the dose is the largest
    ``(target - C_history) / C_unit`` over the troughs (at the MAP, or its quantile over
    posterior draws at ``probability``).

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
    history = _history(model, data, None, next_dose_day)
    eta, _ = _draws(model, history, n_draws if probability is not None else 0, seed)
    forecast = _forecast(model, history, eta, np.array([interval_weeks * DAYS_PER_WEEK]),
                         horizon_weeks * DAYS_PER_WEEK)
    needed = (target - forecast.history[0]) / forecast.unit[0]  # (M, K + 1)
    if probability is None or needed.shape[0] == 1:
        return float(max(needed[0].max(), 0.0))
    return float(max(np.quantile(needed[1:], probability, axis=0).max(), 0.0))


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
) -> float | None:
    """The longest interval (whole days, 7 to 84) keeping every trough at the target.

    Returns None when even every 7 days is not enough.
    """
    _check(target, probability)
    if not dose_mg > 0:
        raise ValueError(f"`dose_mg` must be positive; got {dose_mg!r}")
    history = _history(model, data, None, next_dose_day)
    eta, _ = _draws(model, history, n_draws if probability is not None else 0, seed)
    days = np.arange(7.0, 85.0)
    forecast = _forecast(model, history, eta, days, horizon_weeks * DAYS_PER_WEEK)
    best = None
    for i, tau in enumerate(days):
        troughs = forecast.history[i] + dose_mg * forecast.unit[i]
        if _level(troughs, probability).min() >= target:
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
    history = _history(model, data, None, None)
    if eta is None:
        eta, _ = _draws(model, history, 0, 0)
    eta = np.atleast_2d(np.asarray(eta, dtype=float))
    start = float(history.table["TIME"].max())
    grid = start + np.arange(0.0, max_days + 0.01, 0.01)
    pid = history.table["ID"].iloc[0]
    base = pd.concat([history.table, _future_rows(history, grid, pid, doses=None)],
                     ignore_index=True)
    conc = _concentrations(model, [base], eta[:1])[0][0, len(history.table):]
    if conc[0] < target:
        return None
    below = np.flatnonzero(conc < target)
    if below.size == 0:
        return None
    return float(grid[below[0]])

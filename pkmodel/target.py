"""Dosing questions for any drug, in the model's own units.

* :func:`dose_for_target`: the dose that reaches a target: every trough at least a value,
  or a peak, a concentration at a time after the dose, or an AUC over an interval equal to
  a value; after the patient's history or at steady state.
* :func:`interval_for_target`: the longest interval keeping every trough at a target.
* :func:`time_to_concentration`: when the concentration falls to a value, with no more
  doses.
* :func:`exposure`: AUC, Cmax, Cmin, time above a threshold, terminal half-life and Vss of
  each ID over a window.

Each answers at the individual's MAP (from the measured concentrations), a priori from the
covariates (``eta="population"``), at given ETAs (NONMEM's, say), or, with ``probability``,
so that that share of the posterior (or prior) draws reaches the target. Times and
intervals are in the model's ``time_unit``, doses in its ``dose_unit``, concentrations in
its ``concentration_unit``; new doses default to the route, compartment and infusion
length of the last dose, never to one drug's constants.

Every measure is linear in the new dose ``D``: ``m = H + D U``, with ``H`` from the history
alone and ``U`` from a regimen of unit doses, both solved exactly by the engine. AUCs are
Gauss-Legendre sums of the exact solution split at every dose and infusion end (exact to
rounding for sums of exponentials over such pieces, checked against ``F D / CL``; to about
1e-5 relative where a lag time or a modelled duration puts a kink between the splits).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize

from pkmodel.data import check_concentrations, dose_times, float_columns, plain_json, validate
from pkmodel.errors import DatasetError
from pkmodel.estimate import estimate_map, sample_posterior
from pkmodel.model import PopulationModel, disposition, evaluate_parameters
from pkmodel.predict import draw_concentrations, with_samples

__all__ = ["DoseAnswer", "NewDoses", "Target", "dose_for_target", "exposure",
           "interval_for_target", "time_to_concentration"]

TARGET_KINDS = ("trough", "peak", "concentration", "auc")
#: Gauss-Legendre nodes per piece; even pieces and geometrically graded ones per interval
#: between kinks, for AUCs.
_GL_NODES, _GL_PIECES, _GL_GRADED = 16, 16, 24
_TOL = 1e-9


@dataclass(frozen=True)
class Target:
    """What the new doses must achieve.

    Parameters
    ----------
    kind : {"trough", "peak", "concentration", "auc"}
        ``"trough"``: every trough (the concentration just before each new dose, over the
        horizon) at least ``value``. The others: the measure equal to ``value`` after the
        first new dose, or at steady state: ``"peak"``, the concentration at the end of
        the infusion (or ``time`` after the dose start); ``"concentration"``, at ``time``
        after the dose; ``"auc"``, the area under the concentration over ``time`` from the
        dose (default: one interval; AUC24 of a daily dose, say).
    value : float
        Concentration (model's concentration unit), or AUC (concentration x time unit).
    time : float, optional
        Time after the dose (model's time unit), as ``kind`` says. Required for a peak
        after a bolus or an absorbed dose and for ``"concentration"``.
    steady_state : bool
        Judge the measure at steady state of the new regimen (the history then plays no
        part) instead of after the patient's history.
    """

    kind: str
    value: float
    time: float | None = None
    steady_state: bool = False

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ValueError(f"`kind` must be one of {TARGET_KINDS}; got {self.kind!r}")
        if not (np.isfinite(self.value) and self.value > 0):
            raise ValueError(f"the target value must be a positive number; got {self.value!r}")
        if self.time is not None and not (np.isfinite(self.time) and self.time >= 0):
            raise ValueError(f"`time` must be a non-negative time; got {self.time!r}")
        if self.kind == "concentration" and self.time is None:
            raise ValueError("a 'concentration' target needs `time` (after the dose)")
        if self.kind == "trough" and self.time is not None:
            raise ValueError("a trough is taken just before the next dose: give no `time`")


_MODELLED_RATE = (": a new dose's length would depend on its amount, which answers built "
                  "from a 1-unit dose scaled by linearity cannot follow; give the new "
                  "doses' length, NewDoses(duration=...), or a modelled duration (RATE -2)")


@dataclass(frozen=True)
class NewDoses:
    """The regimen to start: every ``interval`` from ``start``.

    Parameters
    ----------
    interval : float
        Dosing interval (model's time unit).
    start : float, optional
        Time of the first new dose. Default: the last dose plus the current interval.
    cmt : int, optional
        Dose compartment (NONMEM CMT). Default: that of the last dose.
    duration : float, optional
        Infusion length (model's time unit), 0 for a bolus or an absorbed dose. Default:
        that of the last dose into the same compartment.
    count : int, optional
        Number of new doses. Default: as many as start within the horizon (and, for a
        concentration or an AUC, enough to cover its time).
    rate : {-2}, optional
        A modelled duration (-2, the model's D parameter), as NONMEM's RATE. Default: as
        the last dose into the same compartment, when that was modelled. A modelled rate
        (-1) is refused: a dose's length would then depend on its amount, which answers
        built from a 1-unit dose scaled by linearity cannot follow (give ``duration``).
    """

    interval: float
    start: float | None = None
    cmt: int | None = None
    duration: float | None = None
    count: int | None = None
    rate: float | None = None

    def __post_init__(self) -> None:
        if self.count is not None and (int(self.count) != self.count):
            raise ValueError(f"`count` must be a whole number; got {self.count!r}")
        if self.rate is not None and self.rate != -2:
            raise ValueError(f"`rate` must be -2 (modelled duration); got {self.rate!r}"
                             + (_MODELLED_RATE if self.rate == -1 else ""))
        if not (np.isfinite(self.interval) and self.interval > 0):
            raise ValueError(f"`interval` must be a positive time; got {self.interval!r}")
        if self.duration is not None and not (np.isfinite(self.duration)
                                              and 0 <= self.duration <= self.interval):
            raise ValueError(f"`duration` must lie in [0, interval]; got {self.duration!r}")
        if self.count is not None and self.count < 1:
            raise ValueError(f"`count` must be at least 1; got {self.count!r}")


@dataclass(frozen=True)
class DoseAnswer:
    """The dose for a target, and what it achieves.

    Attributes
    ----------
    dose : float
        Exact dose (model's dose unit) meeting the criterion.
    rounded : float or None
        ``dose`` rounded to ``round_to`` (up for a trough target or with a probability,
        to the nearest otherwise); None without rounding.
    dose_at_map : float
        The exact dose at the MAP (or at the given ETAs, or the typical patient).
    share : float or None
        Share of the posterior (or prior) draws reaching the target with the advised
        dose (``rounded`` if given); None without draws.
    measure_at_map : float
        The target's measure at the MAP with the advised dose (the lowest trough for a
        trough target).
    target : Target
    doses : NewDoses
        The regimen with every default resolved.
    basis : str
        ``"map"``, ``"population"`` or ``"given eta"``.
    probability : float or None
    units : dict
        Time, dose and concentration units of the model.
    notes : tuple of str
    """

    dose: float
    rounded: float | None
    dose_at_map: float
    share: float | None
    measure_at_map: float
    target: Target
    doses: NewDoses
    basis: str
    probability: float | None
    units: dict[str, str]
    notes: tuple[str, ...] = ()

    @property
    def advised(self) -> float:
        """The dose to give: ``rounded`` when rounding was asked, else ``dose``."""
        return self.dose if self.rounded is None else self.rounded

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return plain_json(asdict(self))


# --------------------------------------------------------------------------- the patient


@dataclass
class _Patient:
    table: pd.DataFrame  # validated, one ID
    dose_times: np.ndarray  # explicit and ADDL-implied
    dose_rows: np.ndarray  # the record each comes from


def _patient(model: PopulationModel, data: pd.DataFrame) -> _Patient:
    table = validate(data, covariates=model.covariate_names).reset_index(drop=True)
    check_concentrations(table)
    if table["ID"].nunique() != 1:
        raise DatasetError(f"column 'ID': expected one patient; got {table['ID'].nunique()} "
                           "IDs (ask for each patient separately)")
    times, rows = dose_times(table)
    order = np.argsort(times, kind="stable")
    return _Patient(table, times[order], rows[order])


def _resolve(model: PopulationModel, patient: _Patient, doses: NewDoses,
             current_interval: float | None, horizon: float) -> NewDoses:
    """Every default of ``doses`` from the last dose; the count from the horizon."""
    table, times = patient.table, patient.dose_times
    last_record = float(table["TIME"].max())
    start = doses.start
    if start is None:
        if times.size == 0:
            raise DatasetError("the history has no dose: give NewDoses(start=...) for the "
                               "first dose")
        last_ii = float(table.loc[patient.dose_rows[-1], "II"])
        gap = current_interval if current_interval is not None else (
            float(times[-1] - times[-2]) if times.size > 1 else last_ii or None)
        if gap is None or not gap > 0:
            raise DatasetError("one dose in the history and no interval to continue: give "
                               "NewDoses(start=...) or current_interval")
        start = float(times[-1] + gap)
    if start < last_record - _TOL:
        raise DatasetError(f"the first new dose ({start:g} {model.time_unit}) comes before "
                           f"the last record ({last_record:g}): give NewDoses(start=...) at "
                           "or after it")
    later = times[times >= start - _TOL]
    if later.size:
        raise DatasetError(f"the history has a dose at {later[0]:g} {model.time_unit}, at or "
                           f"after the first new dose ({start:g}): end its ADDL before, or "
                           "start the new doses after it")
    cmt, duration, rate = doses.cmt, doses.duration, doses.rate
    same = table.loc[patient.dose_rows] if times.size else table.iloc[:0]
    if cmt is None:
        if same.empty:
            raise DatasetError("the history has no dose: give NewDoses(cmt=...)")
        cmt = int(same["CMT"].iloc[-1]) or 1
    same = same[same["CMT"].replace(0, 1) == cmt]
    last = same.iloc[-1] if not same.empty else None
    if rate is None and duration is None and last is not None and last["RATE"] == -1:
        raise ValueError("the last dose's rate is modelled (RATE -1)" + _MODELLED_RATE)
    if rate is None and duration is None and last is not None and last["RATE"] == -2:
        rate = -2.0  # modelled duration, as before
    if duration is None:
        duration = 0.0 if last is None or rate is not None else (
            float(last["AMT"] / last["RATE"]) if last["RATE"] > 0 else float(last["DUR"]))
        duration = min(duration, doses.interval)
    if not (horizon > 0):
        raise ValueError(f"`horizon` must be positive; got {horizon!r}")
    count = doses.count or max(1, math.floor(horizon / doses.interval + _TOL))
    return replace(doses, start=float(start), cmt=int(cmt), duration=float(duration),
                   count=int(count), rate=rate)


# --------------------------------------------------------------------------- the draws


def _etas(model: PopulationModel, table: pd.DataFrame, eta: Any, probability: float | None,
          n_draws: int, seed: int) -> tuple[np.ndarray, str, list[str]]:
    """Row 0: the MAP (or zero, or the given ETAs); then the draws when ``probability``."""
    names = list(model.eta_names)
    n_draws = n_draws if probability is not None else 0
    notes: list[str] = []
    if isinstance(eta, str) and eta != "population":
        raise ValueError(f"`eta` must be 'population', ETAs, or None (the MAP); got {eta!r}")
    if eta is not None and not (isinstance(eta, str) and eta == "population"):
        if probability is not None:
            raise ValueError("`probability` needs draws: not with given ETAs")
        given = np.asarray(eta, dtype=float).reshape(1, -1)
        if given.shape[1] != len(names):
            raise ValueError(f"`eta` must hold {len(names)} values ({names}); got "
                             f"{given.shape[1]}")
        return given, "given eta", notes
    measured = bool(((table["EVID"] == 0) & (table["MDV"] == 0)).any())
    if eta is not None or not measured:
        rng = np.random.default_rng(seed)
        draws = (rng.multivariate_normal(np.zeros(len(names)), model.omega, size=n_draws,
                                         method="eigh") if n_draws
                 else np.zeros((0, len(names))))
        if measured:
            notes.append("a priori: the measured concentrations are not used")
        return np.vstack([np.zeros((1, len(names))), draws]), "population", notes
    fit = estimate_map(model, table)
    if not fit.success:
        raise DatasetError(f"the fit to the measured concentrations failed "
                           f"({fit.individuals['MESSAGE'].iloc[0]}): no dose can be based "
                           "on it")
    mode = float_columns(fit.individuals, names)
    if not n_draws:
        return mode, "map", notes
    sample = sample_posterior(model, table, n=n_draws, seed=seed, estimate=fit)
    if not bool(sample.diagnostics["SUCCESS"].iloc[0]):
        notes.append(f"few effective posterior draws (ESS "
                     f"{sample.diagnostics['ESS'].iloc[0]:.0f}): the share is uncertain")
    return np.vstack([mode, float_columns(sample.draws, names)]), "map", notes


# --------------------------------------------------------------------------- the measures


def _rows(template: pd.Series, pid: Any, times: np.ndarray) -> pd.DataFrame:
    """Sample records (MDV 1) at ``times`` with the covariates of ``template``."""
    n = times.size
    frame = pd.DataFrame({c: np.repeat(template[c], n) for c in template.index})
    zero = ("AMT", "RATE", "DUR", "II", "ADDL", "SS", "CMT")
    frame = frame.assign(ID=pid, TIME=times, EVID=0.0, MDV=1.0, DV=np.nan,
                         **{c: 0.0 for c in zero})
    return frame.drop(columns=[c for c in ("LLOQ", "OCC") if c in frame.columns])


def _regimen(template: pd.Series, pid: Any, doses: NewDoses, steady: bool,
             times: np.ndarray) -> pd.DataFrame:
    """A unit-dose regimen from ``doses.start`` and samples at ``times`` (each sample
    before a dose at the same time, so that it is the trough)."""
    # Written dose by dose: an ADDL dose would come before a sample at its time.
    given = _rows(template, pid, doses.start + doses.interval * np.arange(doses.count))
    rate = (doses.rate if doses.rate is not None
            else 1.0 / doses.duration if doses.duration else 0.0)
    given = given.assign(EVID=1.0, AMT=1.0, RATE=rate, CMT=float(doses.cmt))
    if steady:
        given.loc[0, ["II", "SS"]] = [doses.interval, 1.0]
    samples = _rows(template, pid, times)
    frame = pd.concat([samples, given], ignore_index=True)
    order = np.lexsort((frame["EVID"].to_numpy(), frame["TIME"].to_numpy()))
    return frame.iloc[order].reset_index(drop=True)


def _gauss(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights integrating over ``[edges[0], edges[-1]]``: each piece between
    kinks is cut evenly and, towards its start (where a dose's fast transients act),
    geometrically, then summed by Gauss-Legendre."""
    x, w = np.polynomial.legendre.leggauss(_GL_NODES)
    nodes, weights = [], []
    for a, b in itertools.pairwise(edges):
        cuts = np.unique(np.concatenate([np.linspace(a, b, _GL_PIECES + 1),
                                         a + (b - a) * 0.5 ** np.arange(1, _GL_GRADED + 1)]))
        for lo, hi in itertools.pairwise(cuts):
            nodes.append((hi - lo) / 2 * x + (hi + lo) / 2)
            weights.append((hi - lo) / 2 * w)
    return np.concatenate(nodes), np.concatenate(weights)


def _kinks(patient: _Patient, new_times: np.ndarray, new_duration: float, lo: float,
           hi: float) -> np.ndarray:
    """Dose starts and infusion ends (history and new doses) inside ``[lo, hi]``, with
    ``lo`` and ``hi``: where the concentration is not smooth."""
    table = patient.table
    rows = table.loc[patient.dose_rows] if patient.dose_times.size else table.iloc[:0]
    length = np.where(rows["RATE"].to_numpy() > 0,
                      rows["AMT"].to_numpy() / np.where(rows["RATE"] > 0, rows["RATE"], 1.0),
                      rows["DUR"].to_numpy())
    points = np.concatenate([patient.dose_times, patient.dose_times + length, new_times,
                             new_times + new_duration, [lo, hi]])
    return np.unique(points[(points >= lo) & (points <= hi)])


@dataclass
class _Plan:
    """Where the measure is read: sample times, and weights combining them into it."""

    times: np.ndarray
    weights: np.ndarray | None  # None: each time is a measure of its own (troughs)


def _plan(target: Target, patient: _Patient, doses: NewDoses) -> _Plan:
    t0, tau = doses.start, doses.interval
    if target.kind == "trough":
        k = np.arange(1, (1 if target.steady_state else doses.count) + 1)
        return _Plan(t0 + tau * k, None)
    if target.kind == "auc":
        length = target.time if target.time is not None else tau
        new = t0 + tau * np.arange(math.ceil(length / tau) + 1)
        nodes, weights = _gauss(_kinks(patient, new, doses.duration, t0, t0 + length))
        return _Plan(nodes, weights)
    after = target.time
    if after is None:  # peak: the end of the infusion
        if doses.rate is not None:
            raise ValueError("the infusion's length is modelled (RATE -2): give the "
                             "peak's time, Target('peak', value, time=...)")
        if not doses.duration:
            raise ValueError("a peak after a bolus or an absorbed dose needs Target(time=...)")
        after = doses.duration
    return _Plan(np.array([t0 + after]), np.ones(1))


def _measures(model: PopulationModel, patient: _Patient, eta: np.ndarray, target: Target,
              doses: NewDoses, fixed_count: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``H, U (M, K)``: the measure is ``H + D U`` for a dose ``D`` (per draw, per trough
    or a single column). Doses are added to cover the measure's time unless the count was
    the user's (``fixed_count``)."""
    plan = _plan(target, patient, doses)
    count = doses.count if fixed_count else max(
        doses.count, math.ceil((plan.times.max() - doses.start) / doses.interval - _TOL))
    regimen = replace(doses, count=count)
    template = patient.table.iloc[-1]
    unit = _regimen(template, "unit", regimen, target.steady_state, plan.times)
    tables = [unit]
    if not target.steady_state:
        tables.append(pd.concat([patient.table, _rows(template, template["ID"], plan.times)],
                                ignore_index=True))
    conc = draw_concentrations(model, tables, eta)
    samples = (unit["EVID"] == 0).to_numpy()
    u = conc[0][:, samples]
    h = conc[1][:, len(patient.table):] if len(conc) > 1 else np.zeros_like(u)
    if plan.weights is not None:
        u, h = u @ plan.weights[:, None], h @ plan.weights[:, None]
    return h, u


def _needed(target: Target, h: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Per draw, the dose that brings the measure to the target (every trough at least
    it); inf where no dose can."""
    with np.errstate(divide="ignore", invalid="ignore"):
        need = np.where(u > 0, (target.value - h) / np.where(u > 0, u, 1.0),
                        np.where(h >= target.value, 0.0, np.inf))
    return np.maximum(need.max(axis=1), 0.0)


def _quantile_dose(need: np.ndarray, probability: float | None) -> float:
    """The MAP's dose, or the smallest dose a share ``probability`` of the draws needs."""
    if probability is None or need.size == 1:
        return float(need[0])
    draws = np.sort(need[1:])
    k = max(1, math.ceil(probability * draws.size - _TOL))
    return float(draws[k - 1])


def _check_probability(probability: float | None) -> None:
    if probability is not None and not 0 < probability < 1:
        raise ValueError(f"`probability` must lie strictly between 0 and 1; got {probability!r}")


def dose_for_target(
    model: PopulationModel,
    data: pd.DataFrame,
    target: Target,
    doses: NewDoses,
    *,
    eta: Any = None,
    probability: float | None = None,
    round_to: float | None = None,
    current_interval: float | None = None,
    horizon: float | None = None,
    n_draws: int = 1000,
    seed: int = 0,
) -> DoseAnswer:
    """The dose, given every ``doses.interval``, that reaches ``target``.

    Parameters
    ----------
    model : PopulationModel
    data : DataFrame
        One patient's records (NONMEM conventions, model's units).
    target : Target
    doses : NewDoses
    eta : array_like or "population", optional
        Default: the MAP from the measured concentrations (the typical patient without
        any). ``"population"``: a priori, from the covariates alone. An array: these ETAs
        (in ``model.eta_names`` order), for example NONMEM's.
    probability : float, optional
        Answer so that this share of the posterior (or prior) draws reaches the target.
    round_to : float, optional
        Round the dose to a multiple of this: up for a trough target and with
        ``probability`` (the criterion is "at least"), to the nearest for a peak, a
        concentration or an AUC aimed at from the MAP.
    current_interval : float, optional
        Interval of the current regimen, to place the next dose when the history has a
        single dose and ``doses.start`` is not given.
    horizon : float, optional
        How far the troughs are checked, from the first new dose (model's time unit;
        default 365 days).
    n_draws, seed : int
        Posterior draws with ``probability`` (same seed, same answer).

    Returns
    -------
    DoseAnswer

    Examples
    --------
    A one-compartment drug in hours, one 1000-mg bolus at 0 and a level of 12 mg/L at
    12 h; the typical patient's daily dose for an AUC24 of 400 mg.h/L at steady state is
    ``400 * CL`` (a priori, ``F D / CL`` is the AUC over one interval at steady state):

    >>> import pandas as pd, sympy as sp
    >>> from pkmodel.engine import Structure
    >>> from pkmodel.model import PopulationModel, ResidualError
    >>> eta = sp.Symbol("ETA_CL")
    >>> drug = PopulationModel("onecpt", Structure(1), {}, {"CL": 4 * sp.exp(eta),
    ...     "V1": sp.Float(50)}, [[0.1]], ("ETA_CL",), ResidualError(proportional=0.2),
    ...     time_unit="h")
    >>> history = pd.DataFrame({"ID": 1, "TIME": [0.0, 12.0], "AMT": [1000.0, 0.0],
    ...                         "DV": [None, 12.0]})
    >>> auc = Target("auc", 400.0, steady_state=True)
    >>> answer = dose_for_target(drug, history, auc, NewDoses(24.0, start=24.0),
    ...                          eta="population")
    >>> round(answer.dose, 6)
    1600.0
    """
    _check_probability(probability)
    patient = _patient(model, data)
    horizon = horizon if horizon is not None else 365.0 / model.days_per_time_unit
    resolved = _resolve(model, patient, doses, current_interval, horizon)
    eta_rows, basis, notes = _etas(model, patient.table, eta, probability, n_draws, seed)
    h, u = _measures(model, patient, eta_rows, target, resolved,
                     fixed_count=doses.count is not None)
    need = _needed(target, h, u)
    dose = _quantile_dose(need, probability)
    if dose == 0.0:
        notes.append(f"the history alone already reaches the {target.kind} target "
                     f"({float(h[0].min()):.4g} at the MAP): no new dose is needed for it")
    if not np.isfinite(dose):
        raise DatasetError(f"no dose every {resolved.interval:g} {model.time_unit} reaches "
                           f"the {target.kind} target of {target.value:g}: the history "
                           "falls short where the new doses cannot reach")
    rounded = None
    if round_to is not None:
        if not round_to > 0:
            raise ValueError(f"`round_to` must be positive; got {round_to!r}")
        steps = dose / round_to
        upward = target.kind == "trough" or (probability is not None and need.size > 1)
        rounded = round_to * (math.ceil(steps - _TOL) if upward else round(steps))
    given = dose if rounded is None else rounded
    measure = h + given * u
    share = (None if probability is None or measure.shape[0] == 1 else
             float(np.mean(measure[1:].min(axis=1) >= target.value * (1 - 1e-12))))
    return DoseAnswer(dose, rounded, float(need[0]), share, float(measure[0].min()), target,
                      resolved, basis, probability, _units(model), tuple(notes))


def _units(model: PopulationModel) -> dict[str, str]:
    return {"time": model.time_unit, "dose": model.dose_unit,
            "concentration": model.concentration_unit}


def interval_for_target(
    model: PopulationModel,
    data: pd.DataFrame,
    target: Target,
    dose: float,
    intervals: Any,
    *,
    doses: NewDoses | None = None,
    eta: Any = None,
    probability: float | None = None,
    current_interval: float | None = None,
    horizon: float | None = None,
    n_draws: int = 1000,
    seed: int = 0,
) -> float | None:
    """The longest of ``intervals`` at which ``dose`` keeps every trough at the target.

    Parameters
    ----------
    target : Target
        A ``"trough"`` target (with or without ``steady_state``).
    dose : float
        The dose (model's dose unit).
    intervals : array_like
        Candidate intervals (model's time unit), for example ``[8, 12, 24, 36, 48]`` h.
    doses : NewDoses, optional
        Start, compartment and duration of the new doses (its interval is ignored).
    eta, probability, current_interval, horizon, n_draws, seed
        As for :func:`dose_for_target`.

    Returns
    -------
    float or None
        None when no candidate is enough.
    """
    if target.kind != "trough":
        raise ValueError("interval_for_target answers for a 'trough' target")
    if not (np.isfinite(dose) and dose > 0):
        raise ValueError(f"`dose` must be positive; got {dose!r}")
    _check_probability(probability)
    candidates = np.unique(np.asarray(intervals, dtype=float))
    if candidates.size == 0 or not (candidates > 0).all():
        raise ValueError("`intervals` must be positive times")
    patient = _patient(model, data)
    horizon = horizon if horizon is not None else 365.0 / model.days_per_time_unit
    eta_rows, _, _ = _etas(model, patient.table, eta, probability, n_draws, seed)
    base = doses or NewDoses(float(candidates[0]))
    best = None
    for tau in candidates:
        resolved = _resolve(model, patient, replace(base, interval=float(tau), count=None,
                                                    duration=None if base.duration is None
                                                    else min(base.duration, tau)),
                            current_interval, horizon)
        h, u = _measures(model, patient, eta_rows, target, resolved)
        lowest = (h + dose * u).min(axis=1)
        level = lowest[0] if probability is None or lowest.size == 1 else np.sort(
            lowest[1:])[::-1][max(1, math.ceil(probability * (lowest.size - 1) - _TOL)) - 1]
        if level >= target.value * (1 - 1e-12):
            best = float(tau)
    return best


def _profile(model: PopulationModel, patient: _Patient, eta: np.ndarray,
             times: np.ndarray, before: float | None = None) -> np.ndarray:
    """Concentrations ``(M, T)`` at ``times``, with no doses beyond the history's
    (:func:`~pkmodel.predict.with_samples`: NOCB covariates; at ``before``, the value before
    the records at that time)."""
    times = np.asarray(times, dtype=float)
    frame = with_samples(patient.table, times, model.covariate_names, before=before)
    (conc,) = draw_concentrations(model, [frame.drop(columns="SAMPLE")], eta)
    where = frame["SAMPLE"].to_numpy()
    out = np.empty((eta.shape[0], times.size))
    out[:, where[where >= 0]] = conc[:, where >= 0]
    return out


def time_to_concentration(
    model: PopulationModel,
    data: pd.DataFrame,
    value: float,
    *,
    eta: Any = None,
    after: float | None = None,
    within: float | None = None,
) -> float | None:
    """When the concentration first falls to ``value``, with no more doses.

    Parameters
    ----------
    value : float
        Concentration (model's concentration unit).
    eta : array_like or "population", optional
        As for :func:`dose_for_target` (default: the MAP).
    after : float, optional
        Search from this time (default: the last record).
    within : float, optional
        Search this long (default 365 days, in the model's time unit).

    Returns
    -------
    float or None
        The time (model's time unit, to 1e-9 relative) the concentration first falls
        through ``value`` (after rising to it, during an infusion or absorption), or None
        when it never reaches ``value`` or stays above it for ``within``.
    """
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"`value` must be a positive concentration; got {value!r}")
    patient = _patient(model, data)
    eta_rows, _, _ = _etas(model, patient.table, eta, None, 0, 0)
    start = float(patient.table["TIME"].max()) if after is None else float(after)
    later = patient.dose_times[patient.dose_times > start]
    if later.size:
        raise DatasetError(f"the history has a dose at {later[0]:g} {model.time_unit}, after "
                           f"the search starts ({start:g}): no dose may come after it")
    span = within if within is not None else 365.0 / model.days_per_time_unit
    grid = start + np.linspace(0.0, span, 4001)
    conc = _profile(model, patient, eta_rows, grid)[0]
    # The first fall through the value (a running infusion or an absorbing dose may first
    # carry the concentration up to it).
    falls = np.flatnonzero((conc[:-1] >= value) & (conc[1:] < value))
    if falls.size == 0:
        return None
    lo, hi = grid[falls[0]], grid[falls[0] + 1]
    return float(optimize.brentq(
        lambda t: _profile(model, patient, eta_rows, np.array([t]))[0, 0] - value, lo, hi,
        xtol=1e-12, rtol=1e-12))


def exposure(
    model: PopulationModel,
    data: pd.DataFrame,
    start: float,
    end: float,
    *,
    eta: Any = None,
    threshold: float | None = None,
) -> dict[str, float]:
    """Exposure of one patient over ``[start, end]`` from the exact solution.

    Returns
    -------
    dict
        ``AUC`` (concentration x time), ``CMAX`` and ``TMAX``, ``CMIN`` and ``TMIN``
        (model's units; extremes located on the dose and infusion-end times and a 2,000
        point grid, then refined; at ``end`` the value before a dose given then),
        ``TIME_ABOVE`` ``threshold`` (when given), ``HALF_LIFE`` (terminal: the slowest
        of the disposition rates and, for an absorbed dose, KA; from the individual
        parameters at ``end``) and ``VSS`` (sum of the volumes).
    """
    if not end > start:
        raise ValueError(f"`end` must come after `start`; got {start!r}, {end!r}")
    patient = _patient(model, data)
    if start < float(patient.table["TIME"].min()):
        raise ValueError(f"the window starts at {start:g}, before the first record "
                         f"({float(patient.table['TIME'].min()):g})")
    eta_rows, _, _ = _etas(model, patient.table, eta, None, 0, 0)
    kinks = _kinks(patient, np.zeros(0), 0.0, start, end)
    nodes, weights = _gauss(kinks)
    grid = np.unique(np.concatenate([kinks, np.linspace(start, end, 2001)]))
    values = _profile(model, patient, eta_rows, np.concatenate([nodes, grid]), before=end)[0]
    auc = float(values[:nodes.size] @ weights)
    conc = values[nodes.size:]
    out: dict[str, float] = {"AUC": auc}
    for name, sign in (("MAX", -1.0), ("MIN", 1.0)):
        out["C" + name], out["T" + name] = _extreme(model, patient, eta_rows, grid, conc,
                                                    sign)
    if threshold is not None:
        out["TIME_ABOVE"] = _time_above(model, patient, eta_rows, grid, conc, threshold)
    out.update(_disposition(model, patient.table, eta_rows[0], end))
    return out


def _extreme(model: PopulationModel, patient: _Patient, eta: np.ndarray, grid: np.ndarray,
             conc: np.ndarray, sign: float) -> tuple[float, float]:
    """The lowest (``sign`` 1) or highest (-1) concentration and its time: the best grid
    point, refined between its neighbours on the exact solution."""
    i = int(np.argmin(sign * conc))
    t, c = float(grid[i]), float(conc[i])
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    if hi > lo:
        found = optimize.minimize_scalar(
            lambda x: sign * _profile(model, patient, eta, np.array([x]), before=grid[-1])[0, 0],
            bounds=(lo, hi), method="bounded", options={"xatol": 1e-10})
        if found.fun < sign * c:
            t, c = float(found.x), float(sign * found.fun)
    return c, t


def _time_above(model: PopulationModel, patient: _Patient, eta: np.ndarray,
                grid: np.ndarray, conc: np.ndarray, threshold: float) -> float:
    """Time with the concentration at or above ``threshold``: crossings between grid
    points found by Brent's method on the exact solution."""
    above = conc >= threshold
    edges = [float(grid[0])] if above[0] else []
    for i in np.flatnonzero(above[1:] != above[:-1]):
        crossing = optimize.brentq(
            lambda t: _profile(model, patient, eta, np.array([t]), before=grid[-1])[0, 0]
            - threshold,
            grid[i], grid[i + 1], xtol=1e-12, rtol=1e-12)
        edges.append(float(crossing))
    if above[-1]:
        edges.append(float(grid[-1]))
    return float(sum(b - a for a, b in zip(edges[::2], edges[1::2])))


def _disposition(model: PopulationModel, table: pd.DataFrame, eta: np.ndarray,
                 time: float) -> dict[str, float]:
    """Terminal half-life and Vss from the individual parameters at ``time``."""
    row = table[table["TIME"] <= time].iloc[-1]
    params = evaluate_parameters(model, {c: np.array([row[c]]) for c in model.covariate_names},
                                 eta[None, :])
    return disposition(model, {k: float(np.ravel(v)[0]) for k, v in params.items()})

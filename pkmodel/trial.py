"""Virtual trials of dosing strategies, from induction to week 54.

Each virtual child has covariates, true ETAs (IIV) and one KAPPA per dosing interval (IOV).
Everyone gets label induction (5 mg/kg at weeks 0, 2 and 6); maintenance visits follow, the
first due at week 14. At every visit the trough is measured (true concentration plus the
model's residual error) just before the dose, and the arm's policy decides the dose given
now and the interval to the next visit. The trial runs to week 54, where the endpoint
trough is measured.

A policy is any callable taking a :class:`Visit` (arrays over the arm's patients) and
returning a :class:`Decision` (with, if it likes, a memo it gets back at the next visit);
three are provided: :class:`LabelDosing`, :class:`KangProactive` and
:class:`BayesianDosing`. Replicate trials can run on any ``concurrent.futures``-style
executor (for example a Dask ``Client.get_executor()``); the numbers do not depend on
where they run.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from scipy import stats

from pkmodel.data import JsonDocument, float_columns, plain_json
from pkmodel.dosing import recommend_regimen
from pkmodel.engine import Events, central_amounts
from pkmodel.estimate import estimate_map
from pkmodel.model import PopulationModel, check_covariates, evaluate_parameters
from pkmodel.predict import make_cohort

__all__ = [
    "CHILDREN_PER_JOB",
    "AntibodyFormation",
    "BayesianDosing",
    "Decision",
    "KangProactive",
    "LabelDosing",
    "TrialResult",
    "Visit",
    "kang_cohort",
    "run_trial",
]

DAY = 1.0
WEEK = 7.0
INFUSION_DAYS = 2.0 / 24.0  # label: 2-h infusions
INDUCTION_WEEKS = (0.0, 2.0, 6.0)  # label induction
FIRST_MAINTENANCE_WEEK = 14.0  # week 6 + 8 (label)
END_WEEK = 54.0  # Kang 2026 endpoint


@dataclass(frozen=True)
class Visit:
    """A maintenance visit, for every patient of an arm still in the trial.

    Attributes
    ----------
    number : int
        Visit number (0 = the first maintenance dose, week 14).
    day : ndarray
        Visit day of each patient (the dose is due now).
    trough : ndarray
        Trough measured just before this dose (mg/L, with assay error).
    weight : ndarray
        Body weight (kg).
    dose_mg, interval_weeks : ndarray
        The regimen so far (last dose, last interval).
    records : DataFrame or None
        Every patient's records so far in one NONMEM-style table (doses, measured troughs,
        covariates), built for policies whose class sets ``needs_records = True`` (those
        that fit a model); None for the others.
    dose_days, doses : ndarray
        Every dose so far (day, mg), ``(n, D)``.
    covariates : dict of ndarray
        Each patient's covariates as the clinic knows them (baseline values).
    memo : object
        What the policy returned as :attr:`Decision.memo` at the previous visit (None at
        the first): what it carries from visit to visit, such as each patient's last
        estimate (by ID: patients may have left since).
    """

    number: int
    day: np.ndarray
    trough: np.ndarray
    weight: np.ndarray
    dose_mg: np.ndarray
    interval_weeks: np.ndarray
    records: pd.DataFrame | None = None
    dose_days: np.ndarray | None = None
    doses: np.ndarray | None = None
    covariates: Mapping[str, np.ndarray] | None = None
    memo: Any = None

    @property
    def history(self) -> list[pd.DataFrame]:
        """Each patient's records, one table per patient, in the order of the arrays."""
        if self.records is None:
            return []
        return [part.reset_index(drop=True)
                for _, part in self.records.groupby("ID", sort=False)]


@dataclass(frozen=True)
class Decision:
    """Dose given now (mg) and weeks to the next visit, per patient; ``memo``: anything
    the policy wants back at the next visit (as :attr:`Visit.memo`)."""

    dose_mg: np.ndarray
    interval_weeks: np.ndarray
    memo: Any = None


Policy = Callable[[Visit], Decision]


@dataclass(frozen=True)
class LabelDosing:
    """Label maintenance: 5 mg/kg every 8 weeks, whatever the trough."""

    mg_per_kg: float = 5.0
    interval_weeks: float = 8.0

    def __call__(self, visit: Visit) -> Decision:
        n = visit.day.size
        return Decision(self.mg_per_kg * visit.weight, np.full(n, self.interval_weeks))


@dataclass(frozen=True)
class KangProactive:
    """The proactive arm of Kang et al. (Clin Gastroenterol Hepatol 2026), as implemented here.

    A trough before each maintenance infusion; 5 mg/kg is kept. If the trough is below
    ``target`` (6 mg/L) the interval is shortened by 2 weeks, by 4 weeks if it is below
    ``far_below`` (3 mg/L, this implementation's reading of "2 to 4 weeks"), never below
    ``min_interval_weeks`` (4); an interval is never lengthened again.
    """

    target: float = 6.0
    far_below: float = 3.0
    mg_per_kg: float = 5.0
    min_interval_weeks: float = 4.0

    def __call__(self, visit: Visit) -> Decision:
        cut = np.where(visit.trough < self.far_below, 4.0,
                       np.where(visit.trough < self.target, 2.0, 0.0))
        interval = np.maximum(visit.interval_weeks - cut, self.min_interval_weeks)
        interval = np.where(cut > 0, interval, visit.interval_weeks)
        return Decision(self.mg_per_kg * visit.weight, interval)


@dataclass(frozen=True)
class BayesianDosing:
    """Model-informed dosing: at each measured trough, :func:`recommend_regimen`.

    Fits the patient's history with ``model`` (MAP by default: ``n_draws=0``) and gives the
    recommended dose (whole vials) and interval; when no option reaches the target, the
    closest one; when the recommendation is refused (the fit failed), the current regimen.
    The virtual troughs come from the model itself, so its residual tails are accepted
    (``accept_outliers``). With the defaults (MAP, 100-mg vials up to 20 mg/kg, every 4 to 8 weeks,
    52-week horizon) every child of a visit is handled at once: one ``estimate_map`` call
    and one forecast for all of them, the same choice as ``recommend_regimen`` makes
    child by child (the tests compare the two); with ``n_draws`` or ``options`` set, each
    child goes through ``recommend_regimen``.

    ``warm_start=True`` (the all-at-once path only) trades that sameness for speed: from
    the second visit on, a child whose fit converged at the previous visit is fitted from
    its modes there (the new occasion's KAPPAs at 0) in one start, instead of
    ``recommend_regimen``'s three (zero, a nearby point and the best of a screen); a
    warm fit that does not converge, and every child at the first visit, gets the three
    starts. It halves the arm's time, but a child whose posterior has a second, deeper
    mode away from the one it was in keeps to the first. Measured 2026-11-28
    (benchmarks/README.md): with ``fasanmade2011`` the decisions were the same at all
    25,607 visits of 2,800 Kang children (with and without antibody formation); with
    ``xu2012`` (four ETAs, children below its weight range) two children of 200 stayed in
    a shallower mode, one from its third visit on, one at one visit (500 mg every 4 weeks
    where three starts gave 600 mg), 9 of 1,867 visits. The option applies where every
    child of a visit is handled at once (no ``n_draws``, no ``options``).
    """

    model: PopulationModel
    target: float = 6.0
    n_draws: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)
    warm_start: bool = False
    needs_records: ClassVar[bool] = True  # the trial builds Visit.records for this policy

    def __post_init__(self) -> None:
        if self.warm_start and (self.n_draws or self.options):
            raise ValueError("`warm_start` applies where every child is fitted at once: "
                             "not with `n_draws` or `options` (each child then goes "
                             "through recommend_regimen)")

    def __call__(self, visit: Visit) -> Decision:
        if self.n_draws == 0 and not self.options and visit.doses is not None \
                and visit.records is not None:
            return _bayesian_all_at_once(self.model, visit, self.target,
                                         previous=visit.memo if self.warm_start else None)
        doses, intervals = [], []
        for i, history in enumerate(visit.history):
            rec = recommend_regimen(self.model, history, self.target, n_draws=self.n_draws,
                                    next_dose_day=float(visit.day[i]),
                                    current_interval_weeks=float(visit.interval_weeks[i]),
                                    **{"accept_outliers": True, **dict(self.options)})
            doses.append(rec.closest.dose_mg)
            intervals.append(rec.closest.interval_weeks)
        return Decision(np.array(doses), np.array(intervals))


@dataclass(frozen=True)
class AntibodyFormation:
    """Antibodies to infliximab forming while concentrations are low (optional).

    Over each dosing interval, antibodies appear with probability
    ``1 - exp(-hazard_per_week * weeks below threshold)`` (weeks counted on a daily grid of
    the true concentration); once formed, ATI is 1 for the rest of the trial, and the
    model's ATI effect (for ``fasanmade2011``, CL x 1.291) applies from the next interval.
    The mechanism follows the idea of Wojciechowski 2017 (a hazard that rises with time at
    low concentrations); the numbers are the user's assumption (no default is offered).
    """

    hazard_per_week: float
    threshold: float = 3.0  # mg/L

    def __post_init__(self) -> None:
        if not self.hazard_per_week >= 0 or not self.threshold > 0:
            raise ValueError("`hazard_per_week` must be >= 0 and `threshold` > 0 (mg/L)")


def _visit_fit(model: PopulationModel, records: pd.DataFrame,
               previous: pd.DataFrame | None) -> pd.DataFrame:
    """The MAP fit of every child of a visit (``individuals``, IDs in order of
    appearance): from ``previous`` (the fits of the last visit) in one start for the
    children whose fit converged there, else, and where that fails, from three starts."""
    # The modes and SUCCESS only: no per-record table, no plausibility flags (virtual
    # troughs come from the model itself; its tails are expected).
    if previous is None:
        return estimate_map(model, records, records=False).individuals
    ids = pd.unique(records["ID"])
    known = previous["ID"][previous["SUCCESS"].to_numpy(dtype=bool)]
    warm = np.isin(ids, known.to_numpy())
    individuals = None
    if warm.any():
        part = records if warm.all() else records[records["ID"].isin(ids[warm])]
        individuals = estimate_map(model, part, records=False, starts=1,
                                   initial=previous).individuals
        warm[warm] = individuals["SUCCESS"].to_numpy(dtype=bool)
        if warm.all():
            return individuals
    cold = estimate_map(model, records[records["ID"].isin(ids[~warm])],
                        records=False).individuals
    if individuals is None:
        return cold
    return pd.concat([individuals[individuals["ID"].isin(ids[warm])], cold]).set_index(
        "ID", drop=False).loc[ids]


def _bayesian_all_at_once(model: PopulationModel, visit: Visit, target: float, *,
                          previous: pd.DataFrame | None = None,
                          intervals_weeks: tuple[float, ...] = (4, 5, 6, 7, 8),
                          vial_mg: float = 100.0, max_mg_per_kg: float = 20.0,
                          horizon_weeks: float = 52.0) -> Decision:
    """``recommend_regimen`` defaults (MAP, the smallest-change rule), for every child of a
    visit at once; ``previous``: the fits of the last visit, for warm starts (see
    :func:`_visit_fit`). The decision's memo is this visit's fits.

    Troughs are linear in the new dose: ``C_history + D * C_unit``; ``C_unit`` depends
    on time since the next dose only, so one shared schedule serves every child.
    """
    fit = _visit_fit(model, visit.records, previous)
    eta = float_columns(fit, model.eta_names)
    n = eta.shape[0]
    cov = {k: np.asarray(v, dtype=float) for k, v in (visit.covariates or {}).items()}
    no_kappa = np.zeros((n, 1, len(model.iov)))
    params = evaluate_parameters(model, cov, eta)
    horizon = horizon_weeks * WEEK
    weight, d0, w0 = visit.weight, visit.dose_mg, visit.interval_weeks
    max_mg = np.floor(max_mg_per_kg * weight / vial_mg + 1e-9) * vial_mg
    grid = sorted({float(w) for w in intervals_weeks})
    least = {}  # per interval: the least whole-vial dose meeting the target (inf: none)
    keeps = {}  # per interval: whether the current dose meets it
    current_meets = np.zeros(n, bool)
    best_low = np.full(n, -np.inf)
    closest = (np.zeros(n), np.zeros(n))
    for weeks in sorted(set(grid) | set(np.round(w0, 9).tolist())):
        tau = weeks * WEEK
        k = np.arange(1, max(1, int(np.floor(horizon / tau + 1e-9))) + 1)
        history = _true_concentration(model, cov, eta, no_kappa, visit.dose_days, visit.doses,
                                      visit.day[:, None] + tau * k[None, :])
        unit = _unit_troughs(model, params, tau, k)  # (n, K + 1), last: steady state
        history = np.concatenate([history, np.zeros((n, 1))], axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            needed = np.max((target - history) / unit, axis=1)
        dose = np.maximum(np.ceil(needed / vial_mg - 1e-12), 1.0) * vial_mg
        short = np.min(history + dose[:, None] * unit, axis=1) < target  # rounding guard
        dose = np.where(short, dose + vial_mg, dose)
        least[weeks] = np.where(dose <= max_mg + 1e-9, dose, np.inf)
        keeps[weeks] = np.min(history + d0[:, None] * unit, axis=1) >= target
        current_meets |= (np.abs(w0 - weeks) < 1e-9) & keeps[weeks]
        if weeks in grid:
            low = np.min(history + max_mg[:, None] * unit, axis=1)
            nearer = low > best_low
            best_low = np.where(nearer, low, best_low)
            closest = (np.where(nearer, max_mg, closest[0]), np.where(nearer, weeks, closest[1]))
    dose, interval = _smallest_change(least, keeps, grid, d0, w0, weight, vial_mg)
    found = np.isfinite(dose)
    # A fit that failed refuses the recommendation: the child stays on the current regimen.
    keep = current_meets | ~fit["SUCCESS"].to_numpy(dtype=bool)
    return Decision(np.where(keep, d0, np.where(found, dose, closest[0])),
                    np.where(keep, w0, np.where(found, interval, closest[1])), memo=fit)


def _smallest_change(least: Mapping[float, np.ndarray], keeps: Mapping[float, np.ndarray],
                     grid: list[float], d0: np.ndarray,
                     w0: np.ndarray, weight: np.ndarray, vial_mg: float
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The rule of ``recommend_regimen`` for patients whose regimen misses the target: the
    smaller single change (dose only, interval only) by the increase in drug per week,
    ties to the dose; else the least drug per week, ties to the longer interval."""
    n = d0.size
    need_now = np.full(n, np.inf)
    for weeks, dose in least.items():
        need_now = np.where(np.abs(w0 - weeks) < 1e-9, dose, need_now)
    more = np.maximum(need_now, (np.floor(d0 / vial_mg + 1e-9) + 1) * vial_mg)
    dose_rise = np.where(np.isfinite(need_now), more / d0 - 1.0, np.inf)
    shorter = np.full(n, np.nan)
    for weeks in grid:  # ascending: the longest that works is kept
        shorter = np.where((weeks < w0 - 1e-9) & keeps[weeks], weeks, shorter)
    interval_rise = np.where(np.isfinite(shorter), w0 / shorter - 1.0, np.inf)
    use_dose = np.isfinite(dose_rise) & (np.round(dose_rise, 9) <= np.round(interval_rise, 9))
    use_interval = np.isfinite(interval_rise) & ~use_dose
    best_cost = np.full(n, np.inf)
    best = (np.full(n, np.inf), np.zeros(n))
    for weeks in grid:  # ascending: ties go to the longer interval
        cost = least[weeks] / weight / weeks
        better = np.isfinite(cost) & (cost <= best_cost + 1e-12)
        best_cost = np.where(better, cost, best_cost)
        best = (np.where(better, least[weeks], best[0]), np.where(better, weeks, best[1]))
    dose = np.where(use_dose, more, np.where(use_interval, d0, best[0]))
    interval = np.where(use_dose, w0, np.where(use_interval, shorter, best[1]))
    return dose, interval


def _unit_troughs(model: PopulationModel, params: Mapping[str, np.ndarray], tau: float,
                  k: np.ndarray) -> np.ndarray:
    """Troughs of 1 mg every ``tau`` days from day 0 (2-h infusions) before doses ``k``,
    and at steady state, for every child's parameters: ``(n, K + 1)``."""
    n_doses = k.size
    time = np.concatenate([tau * np.arange(n_doses), tau * k])
    evid = np.concatenate([np.ones(n_doses), np.zeros(n_doses)])
    order = np.lexsort((evid, time))
    time, evid = time[order], evid[order]
    ss_time, ss_evid = np.array([0.0, tau]), np.array([1.0, 0.0])
    n_rec = time.size
    pad = n_rec - 2
    rows = {
        "time": np.stack([time, np.r_[ss_time, np.full(pad, tau)]]),
        "evid": np.stack([evid, np.r_[ss_evid, np.full(pad, 2.0)]]),
    }
    amt = rows["evid"] * (rows["evid"] == 1)
    zeros = np.zeros((2, n_rec))
    ss = zeros.copy()
    ss[1, 0] = 1.0
    ii = zeros.copy()
    ii[1, 0] = tau
    events = Events(time=rows["time"], evid=rows["evid"], amt=amt, rate=amt / INFUSION_DAYS,
                    dur=zeros, ii=ii, ss=ss, cmt=np.ones((2, n_rec)),
                    param_row=np.tile(np.arange(n_rec), (2, 1)),
                    source_row=np.tile(np.arange(n_rec), (2, 1)))
    n = np.broadcast_shapes(*(np.shape(v) for v in params.values()))[0]
    per_set = {key: np.tile(np.broadcast_to(np.asarray(v, dtype=float), (n,))[:, None],
                            (2, n_rec)) for key, v in params.items()}
    conc = central_amounts(model.structure, events, per_set) / per_set["V1"]
    regimen = conc[:n][:, evid == 0]
    steady = conc[n:, 1:2]
    return np.concatenate([regimen, steady], axis=1)


def kang_cohort(n: int, *, seed: int | None = None) -> pd.DataFrame:
    """Virtual children like those of Kang 2026 (biologic-naive Crohn's disease).

    Sources and assumptions:

    * WT: log-normal, median 42 kg (REACH children, Fasanmade 2011, reference file model B),
      SD 0.25 on the log scale (assumption), kept within 20-90 kg;
    * ALB: normal, mean 3.8 g/dL (REACH median, same source), SD 0.35 (assumption), kept
      within 2.5-5.0;
    * ATI 0 (biologic-naive at start: Kang 2026); IMM 1 (REACH children were all on an
      immunomodulator; Kang managed immunomodulators alongside TDM: assumption).
    """
    def weight(rng: np.random.Generator, size: int) -> np.ndarray:
        return np.clip(42.0 * np.exp(rng.normal(0.0, 0.25, size)), 20.0, 90.0)

    albumin = stats.truncnorm((2.5 - 3.8) / 0.35, (5.0 - 3.8) / 0.35, loc=3.8, scale=0.35)
    return make_cohort(n, {"WT": weight, "ALB": albumin, "ATI": 0.0, "IMM": 1.0}, seed=seed)


@dataclass(frozen=True)
class TrialResult(JsonDocument):
    """Outcomes of a virtual trial.

    Attributes
    ----------
    visits : DataFrame
        ARM, REPLICATE, ID, VISIT, DAY, WEEK, TROUGH (true), MEASURED, DOSE_MG,
        INTERVAL_WEEKS: one row per maintenance visit.
    patients : DataFrame
        ARM, REPLICATE, ID, covariates, the true ETAs, WEEK54_TROUGH (true), ON_TARGET_WEEK54,
        TIME_ON_TARGET (share of days from week 14 to 54 at or above the target),
        MG_PER_KG_PER_YEAR, VIALS (100 mg), INFUSIONS (maintenance), ABOVE_LABEL.
    summary : DataFrame
        Per arm and outcome: MEAN over replicates and the 2.5 and 97.5 percentiles
        (LOW, HIGH).
    target : float
        Target trough (mg/L).
    """

    visits: pd.DataFrame
    patients: pd.DataFrame
    summary: pd.DataFrame
    target: float

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: the target, the summary, and the patients and visits as lists of
        records."""
        return plain_json({"target": self.target,
                           "summary": self.summary.to_dict(orient="records"),
                           "patients": self.patients.to_dict(orient="records"),
                           "visits": self.visits.to_dict(orient="records")})


    def figure(self, path: Any = None) -> Any:
        """Share of patients at or above the target at each visit week, per arm."""
        from matplotlib.figure import Figure  # no pyplot: the session's backend stays

        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        visits = self.visits.assign(WEEK_BIN=np.floor(self.visits["WEEK"] / 4.0) * 4.0 + 2.0)
        for arm, group in visits.groupby("ARM", sort=False):
            share = group.groupby("WEEK_BIN")["TROUGH"].apply(lambda t: np.mean(t >= self.target))
            ax.plot(share.index, 100 * share.to_numpy(), "o-", label=arm)
        week54 = self.patients.groupby("ARM", sort=False)["ON_TARGET_WEEK54"].mean()
        for arm, value in week54.items():
            ax.plot([END_WEEK], [100 * value], "s", color="k")
            ax.annotate(f"{arm}: {value:.0%}", (END_WEEK, 100 * value), fontsize="small",
                        xytext=(-60, 5), textcoords="offset points")
        ax.set_xlabel("week of the visit (centres of 4-week bins); squares: week 54")
        ax.set_ylabel(f"troughs at or above {self.target:g} mg/L (%)")
        ax.set_ylim(0, 100)
        ax.legend()
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


def _true_concentration(model: PopulationModel, cov: dict[str, np.ndarray], eta: np.ndarray,
                        kappa: np.ndarray, dose_day: np.ndarray, dose_mg: np.ndarray,
                        sample_day: np.ndarray, onset: np.ndarray | None = None) -> np.ndarray:
    """Concentrations (mg/L) at ``sample_day (n, K)`` after doses ``(n, D)`` (2-h
    infusions; samples before doses at equal times), KAPPA of the interval after each dose;
    ATI is 1 after ``onset`` (day), per record (NOCB)."""
    n = dose_day.shape[0]
    time = np.concatenate([dose_day, sample_day], axis=1)
    is_dose = np.concatenate([np.ones_like(dose_day, bool), np.zeros_like(sample_day, bool)], 1)
    amount = np.concatenate([dose_mg, np.zeros_like(sample_day)], axis=1)
    order = np.argsort(~is_dose, axis=1, kind="stable")  # samples first, then by time
    order = np.take_along_axis(order, np.argsort(np.take_along_axis(time, order, 1), axis=1,
                                                 kind="stable"), axis=1)
    time, is_dose, amount = (np.take_along_axis(a, order, 1) for a in (time, is_dose, amount))
    occasion = np.maximum(np.cumsum(is_dose, axis=1) - is_dose - 1, 0)
    occasion = np.minimum(occasion, kappa.shape[1] - 1)
    record_kappa = np.take_along_axis(kappa, occasion[..., None], axis=1)
    record_cov = {k: v[:, None] for k, v in cov.items()}
    if onset is not None and "ATI" in cov:
        record_cov["ATI"] = np.maximum(cov["ATI"][:, None], (time > onset[:, None]) * 1.0)
    params = evaluate_parameters(model, record_cov, eta[:, None, :],
                                 record_kappa if model.iov else None)
    n_rec = time.shape[1]
    zeros = np.zeros((n, n_rec))
    events = Events(time=time, evid=is_dose * 1.0, amt=amount,
                    rate=amount / INFUSION_DAYS, dur=zeros, ii=zeros, ss=zeros,
                    cmt=np.ones((n, n_rec)), param_row=np.tile(np.arange(n_rec), (n, 1)),
                    source_row=np.tile(np.arange(n_rec), (n, 1)))
    params = {k: np.broadcast_to(v, (n, n_rec)) for k, v in params.items()}
    conc = central_amounts(model.structure, events, params) / params["V1"]
    sample = ~is_dose
    return conc[sample].reshape(n, -1)


def _antibody_onset(model: PopulationModel, cov: dict[str, np.ndarray], eta: np.ndarray,
                    kappa: np.ndarray, dose_day: np.ndarray, dose_mg: np.ndarray,
                    visit_day: np.ndarray, onset: np.ndarray, antibodies: AntibodyFormation,
                    uniform: np.ndarray) -> np.ndarray:
    """Update onset days with the interval that ends at ``visit_day``."""
    last_dose = dose_day[:, -1]
    length = int(np.ceil(np.max(visit_day - last_dose)))
    grid = last_dose[:, None] + np.arange(1, length + 1)[None, :]
    inside = grid <= visit_day[:, None]
    grid = np.minimum(grid, visit_day[:, None])
    conc = _true_concentration(model, cov, eta, kappa, dose_day, dose_mg, grid, onset)
    weeks_below = np.sum((conc < antibodies.threshold) & inside, axis=1) / WEEK
    chance = -np.expm1(-antibodies.hazard_per_week * weeks_below)
    new = ~np.isfinite(onset) & (uniform < chance)
    return np.where(new, visit_day, onset)


def _history_records(cohort: pd.DataFrame, names: tuple[str, ...], dose_day: np.ndarray,
                     dose_mg: np.ndarray, trough_day: np.ndarray, measured: np.ndarray,
                     active: np.ndarray) -> pd.DataFrame:
    """One NONMEM-style table of the active patients' doses and measured troughs."""
    rows = np.flatnonzero(active)
    n_dose, n_seen = dose_day.shape[1], trough_day.shape[1]
    patient = np.concatenate([np.repeat(rows, n_dose), np.repeat(rows, n_seen)])
    time = np.concatenate([dose_day[rows].ravel(), trough_day[rows].ravel()])
    amount = np.concatenate([dose_mg[rows].ravel(), np.zeros(rows.size * n_seen)])
    dv = np.concatenate([np.full(rows.size * n_dose, np.nan), measured[rows].ravel()])
    is_dose = np.concatenate([np.ones(rows.size * n_dose, bool), np.zeros(rows.size * n_seen,
                                                                          bool)])
    keep = np.where(is_dose, amount > 0, np.isfinite(dv))
    position = np.searchsorted(rows, patient)
    order = np.lexsort((is_dose[keep], time[keep], position[keep]))
    pick = np.flatnonzero(keep)[order]
    frame = pd.DataFrame({
        "ID": cohort["ID"].to_numpy()[patient[pick]],
        "TIME": time[pick], "EVID": is_dose[pick] * 1, "AMT": amount[pick],
        "RATE": amount[pick] / INFUSION_DAYS, "CMT": 1, "MDV": np.where(is_dose[pick], 1, 0),
        "DV": dv[pick],
    })
    for name in names:
        frame[name] = cohort[name].to_numpy(dtype=float)[patient[pick]]
    return frame


def _run_arm(model: PopulationModel, policy: Policy, cohort: pd.DataFrame, rng_seed: int,
             target: float, residual: bool, antibodies: AntibodyFormation | None,
             lloq: float, part: slice = slice(None)) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One arm of one replicate, for the children ``part`` of its cohort: visits and
    per-patient outcomes. The arm's random draws are made for the whole cohort, so a
    child's numbers do not depend on which children share its job."""
    rng = np.random.default_rng(rng_seed)
    size = len(cohort)
    eta = rng.multivariate_normal(np.zeros(len(model.eta_names)), model.omega, size=size,
                                  method="eigh")[part]
    max_doses = len(INDUCTION_WEEKS) + int((END_WEEK - FIRST_MAINTENANCE_WEEK) / 4.0) + 2
    iov_sd = np.sqrt(np.array(list(model.iov.values()))) if model.iov else np.zeros(0)
    kappa = (rng.standard_normal((size, max_doses, iov_sd.size)) * iov_sd)[part]
    eps = rng.standard_normal((size, max_doses + 1))[part]
    uniform = rng.uniform(size=(size, max_doses + 1))[part]
    cohort = cohort.iloc[part]
    n = len(cohort)
    cov = {c: cohort[c].to_numpy(dtype=float) for c in model.covariate_names}
    weight = cohort["WT"].to_numpy(dtype=float)
    onset = np.full(n, np.inf)
    if antibodies is not None and "ATI" not in cov:
        raise ValueError(f"{model.name} has no ATI covariate: antibodies cannot act on it")

    induction = np.array(INDUCTION_WEEKS) * WEEK
    dose_day = np.tile(induction, (n, 1))
    dose_mg = np.tile(5.0 * weight[:, None], (1, len(INDUCTION_WEEKS)))
    interval = np.full(n, FIRST_MAINTENANCE_WEEK - INDUCTION_WEEKS[-1])
    next_day = np.full(n, FIRST_MAINTENANCE_WEEK * WEEK)
    end_day = END_WEEK * WEEK
    trough_day = np.zeros((n, 0))
    measured = np.zeros((n, 0))
    rows = []
    visit = 0
    memo = None  # what the policy hands to its next visit
    while True:
        active = next_day < end_day - 1e-9
        if not active.any():
            break
        if antibodies is not None:
            onset = _antibody_onset(model, cov, eta, kappa, dose_day, dose_mg, next_day,
                                    onset, antibodies, uniform[:, visit])
        true = _true_concentration(model, cov, eta, kappa, dose_day, dose_mg,
                                   next_day[:, None], onset)[:, 0]
        sd = model.residual.sd(true)
        noisy = true * np.exp(sd * eps[:, visit]) if model.residual.log_scale else (
            true + sd * eps[:, visit] if residual else true)
        noisy = np.where(noisy < lloq, 0.0, noisy)  # reported as below the assay's limit
        trough_day = np.concatenate([trough_day, next_day[:, None]], axis=1)
        measured = np.concatenate([measured, np.where(active, noisy, np.nan)[:, None]], axis=1)
        records = None
        if getattr(policy, "needs_records", False):
            names = tuple(dict.fromkeys(("WT", *model.covariate_names)))
            records = _history_records(cohort, names, dose_day, dose_mg, trough_day, measured,
                                       active).assign(LLOQ=lloq)
        act = np.flatnonzero(active)
        decision = policy(Visit(number=visit, day=next_day[act], trough=noisy[act],
                                weight=weight[act], dose_mg=dose_mg[act, -1],
                                interval_weeks=interval[act], records=records,
                                dose_days=dose_day[act], doses=dose_mg[act],
                                covariates={k: v[act] for k, v in cov.items()},
                                memo=memo))
        memo = decision.memo
        given = np.zeros(n)
        given[act] = decision.dose_mg
        new_interval = interval.copy()
        new_interval[act] = decision.interval_weeks
        for j, i in enumerate(act):
            rows.append((cohort["ID"].iloc[i], visit, next_day[i], next_day[i] / WEEK,
                         true[i], noisy[i], given[i], new_interval[i]))
        dose_day = np.concatenate([dose_day, next_day[:, None]], axis=1)
        dose_mg = np.concatenate([dose_mg, given[:, None]], axis=1)
        interval = new_interval
        next_day = np.where(active, next_day + interval * WEEK, next_day)
        visit += 1
        if dose_day.shape[1] >= max_doses:
            break

    daily = np.tile(np.arange(FIRST_MAINTENANCE_WEEK * WEEK, end_day + 0.5, DAY), (n, 1))
    profile = _true_concentration(model, cov, eta, kappa, dose_day, dose_mg, daily, onset)
    maintenance = dose_mg[:, len(INDUCTION_WEEKS):]
    years = END_WEEK / 52.0
    visits = pd.DataFrame(rows, columns=["ID", "VISIT", "DAY", "WEEK", "TROUGH", "MEASURED",
                                         "DOSE_MG", "INTERVAL_WEEKS"])
    given_weeks = visits.groupby("ID")["INTERVAL_WEEKS"].min().reindex(cohort["ID"]).to_numpy()
    patients = cohort.copy()
    for i, name in enumerate(model.eta_names):
        patients[name] = eta[:, i]
    patients["WEEK54_TROUGH"] = profile[:, -1]
    patients["ON_TARGET_WEEK54"] = profile[:, -1] >= target
    patients["TIME_ON_TARGET"] = np.mean(profile >= target, axis=1)
    patients["MG_PER_KG_PER_YEAR"] = dose_mg.sum(axis=1) / weight / years
    patients["VIALS"] = np.ceil(dose_mg / 100.0 - 1e-9).sum(axis=1)
    patients["INFUSIONS"] = (maintenance > 0).sum(axis=1)
    patients["ANTIBODIES"] = np.isfinite(onset)
    patients["ABOVE_LABEL"] = (np.any(dose_mg / weight[:, None] > 10.0 + 1e-9, axis=1)
                               | (given_weeks < 4.0 - 1e-9))
    return visits, patients


_OUTCOMES = {
    "ON_TARGET_WEEK54": "share with trough >= target at week 54",
    "TIME_ON_TARGET": "share of days from week 14 to 54 at or above target",
    "MG_PER_KG_PER_YEAR": "drug, mg/kg per year",
    "VIALS": "100-mg vials per patient",
    "INFUSIONS": "maintenance infusions per patient",
    "ABOVE_LABEL": "share ever above label (10 mg/kg or < 4 weeks)",
    "ANTIBODIES": "share with antibodies by week 54 (when modelled)",
}


#: A replicate's children are run in jobs of at most this many (every arm for each), which
#: an executor runs in parallel. A Bayesian arm fits a job's children together: from 400
#: children on, its cost per child is flat (32 ms against 39 ms for 100, measured 2026-11-27
#: on the Kang cohort), and the arrays of larger batches only grow.
CHILDREN_PER_JOB = 500


def _job(args: tuple) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """Every arm of one replicate for the children ``part`` of its cohort (module level, so
    process and Dask executors can run it): visits and patients per arm."""
    model, strategies, cohort, seed, target, residual, replicate, antibodies, lloq, part = args
    out = []
    seeds = np.random.SeedSequence(seed).spawn(len(strategies))
    for (arm, policy), arm_seed in zip(strategies.items(), seeds):
        v, p = _run_arm(model, policy, cohort, int(arm_seed.generate_state(1)[0]), target,
                        residual, antibodies, lloq, part)
        out.append((v.assign(ARM=arm, REPLICATE=replicate),
                    p.assign(ARM=arm, REPLICATE=replicate)))
    return out


def run_trial(
    model: PopulationModel,
    strategies: Mapping[str, Policy],
    *,
    n: int = 112,
    replicates: int = 1,
    seed: int = 0,
    target: float = 6.0,
    cohort: Callable[..., pd.DataFrame] | None = None,
    residual: bool = True,
    antibodies: AntibodyFormation | None = None,
    lloq: float = 0.3,
    executor: Executor | None = None,
    progress: bool = False,
) -> TrialResult:
    """Run replicate virtual trials of dosing strategies, induction to week 54.

    Each replicate draws its own cohort of ``n`` children; every arm sees the same children
    (covariates), with the arm's own draws of IIV, IOV and assay error.

    Parameters
    ----------
    model : PopulationModel
        The model that generates the virtual patients (needs WT).
    strategies : mapping of arm name to policy
        For example ``{"label": LabelDosing(), "proactive": KangProactive()}``.
    n : int
        Children per replicate.
    replicates : int
        Replicate trials; the summary gives the mean and the 2.5-97.5 percentile range.
    seed : int
        Same seed, same numbers, on any executor.
    target : float
        Target trough for the outcomes (mg/L).
    cohort : callable, optional
        ``cohort(n, seed=...)`` returning one row per child; default :func:`kang_cohort`.
    residual : bool
        Assay error on the measured troughs.
    antibodies : AntibodyFormation, optional
        Antibody formation while concentrations are low (off by default).
    lloq : float
        The virtual assay's lower limit of quantification (mg/L; 0.3 is an assumption, of
        the order of infliximab drug-level assays): a measured trough below it is reported
        as below the limit (0 for the policies; censored, M3, in the model fits).
    executor : concurrent.futures.Executor, optional
        Where the jobs run (``executor.map``): each replicate's children in jobs of at most
        :data:`CHILDREN_PER_JOB`, every arm in each, so that even one large replicate
        spreads over the workers; default: here, one after another. The jobs, and so the
        numbers, are the same on any executor.
    progress : bool
        Report finished replicates on standard error.

    Returns
    -------
    TrialResult
    """
    if n < 1 or replicates < 1:
        raise ValueError(f"`n` and `replicates` must be at least 1; got {n}, {replicates}")
    if not (np.isfinite(target) and target > 0) or not (np.isfinite(lloq) and lloq > 0):
        raise ValueError(f"`target` and `lloq` must be positive (mg/L); got {target!r}, "
                         f"{lloq!r}")
    if not strategies:
        raise ValueError("`strategies` must name at least one arm")
    make = cohort or kang_cohort
    seeds = np.random.SeedSequence(seed).spawn(replicates)
    parts = [slice(lo, lo + CHILDREN_PER_JOB) for lo in range(0, n, CHILDREN_PER_JOB)]
    jobs = []
    for r, child_seed in enumerate(seeds):
        cohort_seed, arm_seed = (int(s.generate_state(1)[0]) for s in child_seed.spawn(2))
        children = make(n, seed=cohort_seed)
        check_covariates(model, children)
        jobs += [(model, dict(strategies), children, arm_seed, target, residual, r,
                  antibodies, lloq, part) for part in parts]
    mapper = executor.map if executor is not None else map
    done: list[list[tuple[pd.DataFrame, pd.DataFrame]]] = []
    for result in mapper(_job, jobs):
        done.append(result)
        if progress and len(done) % len(parts) == 0:
            sys.stderr.write(f"\rreplicate {len(done) // len(parts)}/{replicates}")
            sys.stderr.flush()
    if progress:
        sys.stderr.write("\n")
    visits, patients = [], []
    for r in range(replicates):  # per replicate and arm, the jobs' children in order
        mine = done[r * len(parts):(r + 1) * len(parts)]
        for a in range(len(strategies)):
            # visits in the order of one job for all: by visit, then child
            visits.append(pd.concat([job[a][0] for job in mine], ignore_index=True)
                          .sort_values("VISIT", kind="stable"))
            patients.append(pd.concat([job[a][1] for job in mine], ignore_index=True))
    visits_df = pd.concat(visits, ignore_index=True)
    patients_df = pd.concat(patients, ignore_index=True)
    per_replicate = patients_df.groupby(["ARM", "REPLICATE"], sort=False)[list(_OUTCOMES)].mean()
    rows = []
    for arm in strategies:
        values = per_replicate.loc[arm]
        for outcome, meaning in _OUTCOMES.items():
            col = values[outcome].to_numpy(dtype=float)
            rows.append({"ARM": arm, "OUTCOME": outcome, "MEANING": meaning,
                         "MEAN": col.mean(), "LOW": np.percentile(col, 2.5),
                         "HIGH": np.percentile(col, 97.5)})
    return TrialResult(visits=visits_df, patients=patients_df, summary=pd.DataFrame(rows),
                       target=target)

"""Bayesian individual estimation: MAP (NONMEM MAXEVAL=0 POSTHOC) and posterior sampling.

For each ID the objective is NONMEM's FOCE-I conditional objective

``OFV(eta) = sum_obs [ln g_i^2 + (y_i - f_i)^2 / g_i^2] + eta' inv(OMEGA) eta``

with ``g`` the residual SD at the individual prediction ``f`` (interaction). A record below
its ``LLOQ`` contributes ``-2 ln Phi((LLOQ - f) / g)`` (M3), one above its ``ULOQ``
``-2 ln Phi((f - ULOQ) / g)`` (censored from above). For a log-additive error
model, ``f`` and ``y`` are replaced by their logarithms (DV stays in mg/L in the table).
With IOV, one KAPPA per occasion and per IOV term is estimated with the ETAs (prior
variance from ``model.iov``); forecasts set them to 0.

All IDs are optimised together, vectorised: each iteration is one engine call for every
ID, every start and every finite-difference point. The optimiser is Newton's method with
central finite differences (the full Hessian up to 6 parameters; beyond, and wherever the
full Hessian is not positive definite, the FOCE Hessian, positive definite by
construction; beyond 6 parameters the derivatives are exact where :mod:`pkmodel.tangent`
applies: one solution per start, no step), the full step tried first and a vectorised
backtracking line search after,
from several starts (zero, and the best points of a quasi-random screen reaching 5 prior
SDs); the best optimum is kept, and a
different optimum found from another start is reported in the message, never dropped
silently.

NONMEM's ``.phi`` OBJ is ``OFV + ln det OMEGA - ln det ETC``, and its ETC is the inverse of
half the FOCE Hessian at the optimum (first derivatives of the predictions, interaction
included; the full Hessian does not reproduce NONMEM's ETC); both are reported so.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from pkmodel.data import JsonDocument, fail_where, float_columns, plain_json, validate, with_columns
from pkmodel.engine import Events, is_dose_modifier, select_profiles
from pkmodel.errors import PlausibilityWarning
from pkmodel.model import (
    PopulationModel,
    ResidualError,
    check_covariates,
    disposition,
    eta_of,
    evaluate_parameter_slopes,
    evaluate_parameters,
)
from pkmodel.predict import (
    dosing_occasions,
    prediction_columns,
    profile_concentrations,
    to_events,
)
from pkmodel.tangent import central_amount_slopes, slopes_unsupported

__all__ = ["PLAUSIBLE_SD", "ConditionalLikelihood", "MAPEstimate", "PosteriorSample",
           "estimate_map", "objective", "outlier_sd", "sample_posterior"]

#: A measured value or an ETA further than this many SDs from the model's expectation
#: marks the fit as implausible (PLAUSIBLE False, a PlausibilityWarning).
PLAUSIBLE_SD = 4.0

_STEP = 1e-4  # finite-difference step in ETA units (central differences)
#: A start whose last step predicted a decrease of at least _FORWARD_DECREASE (OFV units)
#: is far from a minimum: its next derivatives are forward differences (step
#: _FORWARD_STEP, in ETA units: n + 1 points instead of 2n + 1). Their error in the
#: gradient, about _FORWARD_STEP / 2 times the OFV's curvature (35,000 at most with IOV:
#: 0.02), only bends steps still far from the mode; steps near one, and every convergence
#: test, use central differences (a start stuck on forward differences is judged again by
#: central ones).
_FORWARD_DECREASE = 1.0
_FORWARD_STEP = 1e-6
#: Starts far from a minimum are differentiated apart from the others when the call has at
#: least this many parameter sets (central); below, in the same call, their points padded
#: with the centre: a small call's cost is fixed, not per set.
_SPLIT_SETS = 1000
_LINE_STEPS = np.array([1.0, 0.5, 0.25, 0.1, 0.03, 0.01, 0.001])
_MAX_STEP = 3.0  # largest change of one eta per iteration
_NEWTON_MAX = 6  # above this many ETAs/KAPPAs no Hessian by differences (too many points):
#: FOCE-Hessian (scoring) steps, fast where the model describes the data well, then, for an
#: ID still moving after this many, BFGS steps (built from the FOCE Hessian at its start):
#: scoring alone crawled to the iteration limit on a fifth of the children of a Bayesian
#: trial arm (IOV: 3 ETAs and up to 12 KAPPAs)
_FISHER_ITERATIONS = 8
_STUCK_DECREASE = 1e-9
#: Two starts of one ID are heading for the same mode, and one of them stops (taking the
#: other's result), when both are near a minimum (the decrease their steps predict is
#: below _NEAR_DECREASE, in OFV units) and their steps' targets differ by less than
#: _SAME_TARGET in ``d' H d`` (the FOCE Hessian of OFV: an OFV difference of about half
#: that, a fraction of a posterior SD). In a Bayesian trial arm every child's three starts
#: ended at one mode; their work is then done once.
_NEAR_DECREASE = 1.0
_SAME_TARGET = 0.25
_SAME_OFV = 1e-9  # starts whose OFVs differ by less reached one mode (ties: the first)


# --------------------------------------------------------------------------- the problem


@dataclass
class _Problem:
    """Everything the objective needs, as arrays over IDs (axis 0)."""

    model: PopulationModel
    ids: np.ndarray  # (B,)
    events: Events  # (B, R), compressed records
    row_id: np.ndarray  # (N,) ID index of each compressed row
    covariates: dict[str, np.ndarray]  # (N,)
    row_occasion: np.ndarray  # (N,) occasion index within the ID
    n_occasions: int
    obs_record: np.ndarray  # (B, K) record index of each observation (padded with 0)
    obs_mask: np.ndarray  # (B, K) real observation
    y: np.ndarray  # (B, K) observed DV (mg/L)
    lloq: np.ndarray  # (B, K) LLOQ (nan where none)
    uloq: np.ndarray  # (B, K) ULOQ (nan where none)
    alq: np.ndarray  # (B, K) above the ULOQ (censored from above)
    blq: np.ndarray  # (B, K) M3 record
    precision: np.ndarray  # (p, p) prior precision of [eta, kappa_occ1, ...]
    omega_logdet: float  # ln det of the full prior covariance
    residual_sd: np.ndarray | None = None  # (B, K) fixed at the ETA-0 prediction (FOCE)

    @property
    def n_params(self) -> int:
        return self.precision.shape[0]

    @property
    def names(self) -> list[str]:
        names = list(self.model.eta_names)
        for occ in range(self.n_occasions):
            names += [f"{k}_OCC{occ + 1}" for k in self.model.kappa_names]
        return names


def _essential_rows(table: pd.DataFrame, names: tuple[str, ...], covariates: str) -> np.ndarray:
    """Rows that change a prediction (doses, resets, used observations, covariate changes)
    and the first row of every ID (an ID with nothing else is fitted to its prior, not
    dropped)."""
    evid = table["EVID"].to_numpy()
    keep = (evid != 0) & (evid != 2) | ((evid == 0) & (table["MDV"].to_numpy() == 0))
    ids = table["ID"].to_numpy()
    keep[np.r_[True, ids[1:] != ids[:-1]]] = True  # every ID, even one with nothing else
    if names:
        values = float_columns(table, names)
        shift = 1 if covariates == "nocb" else -1
        neighbour = np.roll(values, -shift, axis=0)
        same_id = np.roll(ids, -shift) == ids
        changes = np.any(values != neighbour, axis=1) & same_id
        keep |= changes
    if "_OCC" in table.columns:  # the occasion of a record selects its KAPPAs
        occ = table["_OCC"].to_numpy()
        keep |= (np.roll(occ, -1) != occ) | (np.roll(occ, 1) != occ)
    return keep


@dataclass
class _Built:
    """A cached problem: the data it was built from (a copy), the problem, the validated
    table and, once asked for, that table's events."""

    data: pd.DataFrame
    problem: _Problem
    full: pd.DataFrame
    events: Events | None = None


#: Problems built lately, by the content of their data and the model's equations: the
#: steps of a population fit refit the same records under other THETA, OMEGA and SIGMA
#: values, and building them (validation, events) took two thirds of each refit.
#: Least recently used first; a hit is confirmed against a copy of the data (a hash
#: cannot tell 1 from "1" in an object column).
_PROBLEMS: dict[tuple, _Built] = {}
_PROBLEMS_LOCK = threading.Lock()
_PROBLEMS_KEPT = 16


def _problem_key(model: PopulationModel, data: pd.DataFrame, covariates: str) -> tuple:
    """The data's content (a digest), columns and the model's equations and names. An
    all-numeric table is digested from its values' bytes (pandas' row hashes cost 0.3 ms
    of a 16-ms fit), another from pandas' row hashes; a hit is confirmed against the
    data, so a key need only be the same for the same table."""
    numeric = [isinstance(t, np.dtype) and t.kind in "biuf" for t in data.dtypes]
    if all(numeric) and isinstance(data.index.dtype, np.dtype) and \
            data.index.dtype.kind in "iu":
        parts = (data.to_numpy(dtype=float), data.index.to_numpy())
    else:
        parts = (pd.util.hash_pandas_object(data, index=True).to_numpy(),)
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(np.ascontiguousarray(part).tobytes())
    return (covariates, tuple(map(str, data.columns)), tuple(map(str, data.dtypes)),
            digest.digest(), model.structure, model.equations_key,
            tuple(model.theta), model.eta_names, tuple(model.iov), model.covariate_names,
            model.residual.log_scale)


def _build_problem(model: PopulationModel, data: pd.DataFrame, covariates: str) -> tuple[
        _Problem, pd.DataFrame]:
    """The arrays the objective needs (built once per data and equations, then re-valued
    for other THETA, OMEGA and residual values) and the validated table."""
    try:
        key: tuple | None = _problem_key(model, data, covariates)
    except TypeError:  # unhashable cells: build without the cache
        key = None
    with _PROBLEMS_LOCK:
        hit = _PROBLEMS.pop(key, None) if key is not None else None
        if hit is not None and hit.data.equals(data):
            _PROBLEMS[key] = hit  # most recently used last
        else:
            hit = None
    if hit is not None:
        check_covariates(model, hit.full)  # said at every call, as when built
        return _with_values(hit.problem, model), hit.full
    problem, full = _new_problem(model, data, covariates)
    if key is not None:
        entry = _Built(data.copy(deep=True), problem, full)
        with _PROBLEMS_LOCK:
            while len(_PROBLEMS) >= _PROBLEMS_KEPT:
                _PROBLEMS.pop(next(iter(_PROBLEMS)))
            _PROBLEMS[key] = entry
    return problem, full


def _full_events(problem: _Problem, full: pd.DataFrame, covariates: str) -> Events:
    """The events of the whole validated table (records of the result), cached with it
    once asked for (a fit without records never needs them)."""
    with _PROBLEMS_LOCK:
        entries = list(_PROBLEMS.values())
    built = next((e for e in entries if e.full is full), None)
    if built is not None and built.events is not None:
        return built.events
    events = to_events(full, problem.model.structure, covariates=covariates)
    if built is not None:
        built.events = events
    return events


def _with_values(problem: _Problem, model: PopulationModel) -> _Problem:
    """``problem`` under ``model``'s THETA, OMEGA, IOV and residual values."""
    omega = model.omega
    if np.linalg.eigvalsh(omega).min() <= 0:
        raise ValueError(f"{model.name}: OMEGA must be positive definite to estimate ETAs")
    blocks = [omega] + [np.diag(list(model.iov.values()))] * problem.n_occasions
    prior = _block_diag(blocks)
    return replace(problem, model=model, precision=np.linalg.inv(prior),
                   omega_logdet=float(np.linalg.slogdet(prior)[1]), residual_sd=None)


def _new_problem(model: PopulationModel, data: pd.DataFrame, covariates: str) -> tuple[
        _Problem, pd.DataFrame]:
    table = validate(data, covariates=model.covariate_names)
    check_covariates(model, table)
    if model.residual.log_scale:
        dv = table["DV"].to_numpy(dtype=float)
        limit = (table["LLOQ"].to_numpy(dtype=float) if "LLOQ" in table.columns
                 else np.full(len(table), np.nan))
        measured = (table["EVID"].to_numpy() == 0) & (table["MDV"].to_numpy() == 0)
        fail_where(table, "DV", measured & ~(dv < limit) & ~(dv > 0),
                   f"DV > 0 (mg/L): {model.name}'s log-additive error takes its logarithm "
                   "(a value below the assay's limit needs its LLOQ)", dv)
    full = table
    table = table.assign(_OCC=dosing_occasions(table) if model.iov else 0)
    table = table[_essential_rows(table, model.covariate_names, covariates)]
    table = table.reset_index(drop=True)
    ids_col = table["ID"].to_numpy()
    first = np.r_[True, ids_col[1:] != ids_col[:-1]]  # each ID's first row
    unique_ids = ids_col[first]
    row_id = np.cumsum(first) - 1
    events = to_events(table, model.structure, covariates=covariates)  # every ID at once

    # The measured observations of each ID, in file order: their record in its profile.
    obs_rows = np.flatnonzero((table["EVID"].to_numpy() == 0) & (table["MDV"].to_numpy() == 0))
    counts = np.bincount(row_id[obs_rows], minlength=len(unique_ids))
    width = max(int(counts.max()) if counts.size else 0, 1)
    record = np.full(len(table), -1)
    real = events.source_row >= 0
    record[events.source_row[real]] = np.nonzero(real)[1]
    owner = row_id[obs_rows]
    slot = np.arange(obs_rows.size) - np.r_[0, np.cumsum(counts)][owner]
    obs_record = np.zeros((len(unique_ids), width), dtype=int)
    obs_mask = np.zeros((len(unique_ids), width), dtype=bool)
    y = np.ones((len(unique_ids), width))
    lloq = np.full((len(unique_ids), width), np.nan)
    uloq = np.full((len(unique_ids), width), np.nan)
    obs_record[owner, slot], obs_mask[owner, slot] = record[obs_rows], True
    y[owner, slot] = table["DV"].to_numpy(dtype=float)[obs_rows]
    for limits, column in ((lloq, "LLOQ"), (uloq, "ULOQ")):
        if column in table:
            limits[owner, slot] = table[column].to_numpy(dtype=float)[obs_rows]
    blq = obs_mask & np.isfinite(lloq) & (y < lloq)
    alq = obs_mask & np.isfinite(uloq) & (y > uloq)

    n_occ = int(table["_OCC"].max()) + 1 if model.iov else 0
    problem = _Problem(
        model=model, ids=unique_ids, events=events, row_id=row_id,
        covariates={c: table[c].to_numpy(dtype=float) for c in model.covariate_names},
        row_occasion=table["_OCC"].to_numpy(), n_occasions=n_occ, obs_record=obs_record,
        obs_mask=obs_mask, y=y, lloq=lloq, blq=blq, uloq=uloq, alq=alq,
        precision=np.zeros((0, 0)), omega_logdet=np.nan,  # the prior: set just below
    )
    return _with_values(problem, model), full


def _block_diag(blocks: list[np.ndarray]) -> np.ndarray:
    size = sum(b.shape[0] for b in blocks)
    out = np.zeros((size, size))
    i = 0
    for block in blocks:
        n = block.shape[0]
        out[i:i + n, i:i + n] = block
        i += n
    return out


# --------------------------------------------------------------------------- objective


class _Objective:
    """OFV and predictions for candidate ETA vectors of any IDs, in one engine call."""

    def __init__(self, problem: _Problem) -> None:
        self.p = problem
        n_ids = len(problem.ids)
        self.row_lo = np.searchsorted(problem.row_id, np.arange(n_ids), side="left")
        self.row_hi = np.searchsorted(problem.row_id, np.arange(n_ids), side="right")
        self._cache: dict[bytes, tuple[np.ndarray, np.ndarray, Events]] = {}
        self._centre: tuple[bytes, np.ndarray, np.ndarray] | None = None
        # The predictions' derivatives are exact (pkmodel.tangent) where they apply, else
        # finite differences of the OFV (see _derivatives).
        model = problem.model
        self.exact = (not any(is_dose_modifier(k) for k in model.parameters)
                      and slopes_unsupported(model.structure, problem.events) is None)

    def kept(self) -> _Objective:
        """This objective for a result to keep: its selection of every ID only (the one a
        posterior sample asks for first), no others, no centre; its own cache."""
        out = _Objective(self.p)
        key = np.arange(len(self.p.ids)).tobytes()
        if key in self._cache:
            out._cache[key] = self._cache[key]
        return out

    def _select(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, Events]:
        """Rows of the selected IDs, their position in the selection, and their events
        (the engine shares each profile among that ID's candidate sets)."""
        key = ids.tobytes()
        if key not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            lo, hi = self.row_lo[ids], self.row_hi[ids]
            sizes = hi - lo
            rows = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)])
            position = np.repeat(np.arange(len(ids)), sizes)
            offset = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            ev = self.p.events
            selected = select_profiles(
                ev, ids, param_row=ev.param_row[ids] - lo[:, None] + offset[:, None])
            self._cache[key] = (rows, position, selected)
        return self._cache[key]

    def predictions(self, eta: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Central concentrations (mg/L) at the observations: ``(A, M, K)`` for ``eta``
        ``(A, M, p)`` of IDs ``ids (A,)``."""
        p, model = self.p, self.p.model
        a_count, m_count, n_par = eta.shape
        if a_count > 1 and (ids == ids[0]).all():  # one ID's starts: one profile for all
            return self.predictions(eta.reshape(1, a_count * m_count, n_par),
                                    ids[:1]).reshape(a_count, m_count, -1)
        rows, position, events = self._select(ids)
        covariates, eta_rows, kappa_rows = self._row_effects(eta, rows, position)
        params = evaluate_parameters(model, covariates, eta_rows, kappa_rows)
        return profile_concentrations(model, events, params, at=p.obs_record[ids])

    def _row_effects(self, eta: np.ndarray, rows: np.ndarray, position: np.ndarray
                     ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray | None]:
        """For ``eta (A, M, p)`` of the IDs selected (:meth:`_select`), each of their rows'
        covariates, ETAs ``(M, N, n_eta)`` and KAPPAs ``(M, N, n_kappa)`` (the row's
        occasion's; None without IOV)."""
        p, model = self.p, self.p.model
        a_count, m_count, _ = eta.shape
        n_eta = len(model.eta_names)
        eta_rows = np.swapaxes(eta[position, :, :n_eta], 0, 1)
        kappa_rows = None
        if model.iov:
            kappas = eta[:, :, n_eta:].reshape(a_count, m_count, p.n_occasions, len(model.iov))
            kappa_rows = np.swapaxes(kappas[position, :, p.row_occasion[rows], :], 0, 1)
        return {k: v[rows] for k, v in p.covariates.items()}, eta_rows, kappa_rows

    def slopes(self, eta: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Concentrations (mg/L) at the observations ``(A, K)`` for ``eta (A, p)`` of IDs
        ``ids (A,)`` and their exact derivatives in the ETAs and KAPPAs ``(A, K, p)``."""
        p, model = self.p, self.p.model
        rows, position, events = self._select(ids)
        n_eta, n_kappa = len(model.eta_names), len(model.iov)
        covariates, eta_rows, kappa_rows = self._row_effects(eta[:, None, :], rows, position)
        eta_rows, kappa_rows = eta_rows[0], None if kappa_rows is None else kappa_rows[0]
        occasion = p.row_occasion[rows]
        params = evaluate_parameters(model, covariates, eta_rows, kappa_rows)
        local = evaluate_parameter_slopes(model, covariates, eta_rows, kappa_rows)
        names = model.structure.parameter_names
        local = np.stack([local[name] for name in names], axis=1)  # (N, P, ETAs + KAPPAs)
        full = np.zeros((len(rows), len(names), p.n_params))
        full[:, :, :n_eta] = local[:, :, :n_eta]
        if n_kappa:  # a row's KAPPA slopes belong to its occasion's KAPPAs
            column = n_eta + occasion[:, None] * n_kappa + np.arange(n_kappa)
            full[np.arange(len(rows))[:, None], :, column] = np.swapaxes(
                local[:, :, n_eta:], 1, 2)
        per_record = {name: params[name][events.param_row] for name in names}
        slopes = full[events.param_row]  # (A, R, P, p)
        at = p.obs_record[ids]
        amounts, d_amounts = central_amount_slopes(model.structure, events, per_record,
                                                   slopes, at=at)
        volume = np.take_along_axis(per_record["V1"], at, axis=1)
        d_volume = np.take_along_axis(slopes[:, :, names.index("V1")], at[..., None], axis=1)
        f = amounts / volume
        return f, (d_amounts - f[..., None] * d_volume) / volume[..., None]

    def fitted(self, eta: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Predictions ``(A, K)`` at ``eta (A, p)``: those of the last derivatives taken
        exactly there (see :func:`_derivatives`), else computed."""
        centre = self._centre
        if centre is not None and centre[0] == ids.tobytes() and np.array_equal(
                centre[1], eta):
            return centre[2]
        return self.predictions(eta[:, None, :], ids)[:, 0, :]

    def terms(self, f: np.ndarray, ids: np.ndarray, residual: ResidualError | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-observation -2 log-likelihood, and the prediction and SD on the fitted scale
        (under ``residual``, by default the model's)."""
        p = self.p
        residual = residual or p.model.residual
        y, lloq, uloq = (a[ids][:, None, :] for a in (p.y, p.lloq, p.uloq))
        # Trial points far from the optimum may overflow: their OFV becomes inf (rejected).
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if residual.log_scale:
                f_fit, y_fit, l_fit, u_fit = np.log(f), np.log(y), np.log(lloq), np.log(uloq)
            else:
                f_fit, y_fit, l_fit, u_fit = f, y, lloq, uloq
            g = (residual.sd(f) if p.residual_sd is None
                 else np.broadcast_to(p.residual_sd[ids][:, None, :], f.shape))
            value = np.log(g**2) + ((y_fit - f_fit) / g) ** 2
            blq, alq = p.blq[ids], p.alq[ids]
            if blq.any() or alq.any():  # censored (ID, observation): -2 ln Phi, there only
                a, k = np.nonzero(blq | alq)
                below = blq[a, k][:, None]
                z = np.where(below, l_fit[a, 0, k][:, None] - f_fit[a, :, k],
                             f_fit[a, :, k] - u_fit[a, 0, k][:, None]) / g[a, :, k]
                value[a, :, k] = -2.0 * _log_ndtr(z)
        value = np.where(p.obs_mask[ids][:, None, :], value, 0.0)
        value = np.where(np.isnan(value), np.inf, value)
        return value, f_fit, g

    def prior(self, eta: np.ndarray) -> np.ndarray:
        # eta' P eta, by a matrix product first (a three-operand einsum loops naively:
        # 2 ms of a 9-ms derivative step with 15 ETAs and KAPPAs)
        return np.einsum("ami,ami->am", eta @ self.p.precision, eta)

    def ofv(self, eta: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """OFV for ``eta (A, M, p)``: ``(A, M)``; +inf where a prediction is unusable."""
        value, _, _ = self.terms(self.predictions(eta, ids), ids)
        return value.sum(axis=2) + self.prior(eta)


# --------------------------------------------------------------------------- optimiser


def _stencil(n: int, newton: bool, forward: bool = False) -> np.ndarray:
    """Offsets: the centre, +-h e_i (gradient, Jacobian, Hessian diagonal) and, for the
    Hessian, +-h (e_i + e_j) for every pair; ``forward``: the centre and +h e_i only
    (h = _FORWARD_STEP)."""
    eye = np.eye(n)
    if forward:
        return np.concatenate([np.zeros((1, n)), _FORWARD_STEP * eye])
    rows = [np.zeros(n)] + [_STEP * e for e in eye] + [-_STEP * e for e in eye]
    if newton:
        for i in range(n):
            for j in range(i + 1, n):
                rows += [_STEP * (eye[i] + eye[j]), -_STEP * (eye[i] + eye[j])]
    return np.array(rows)


def _derivatives(obj: _Objective, eta: np.ndarray, ids: np.ndarray, *, newton: bool,
                 forward: np.ndarray | bool = False
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """At ``eta (A, p)``: OFV, gradient by finite differences, the FOCE Hessian (NONMEM's,
    from first derivatives of the predictions, positive definite) and, with ``newton``,
    the finite-difference Hessian of OFV (the FOCE Hessian in its place where forward);
    ``forward`` (per ID or for all): forward differences (see _FORWARD_STEP), their
    points padded with the centre in a call that also takes central ones."""
    if obj.exact and not newton:
        return _exact_derivatives(obj, eta, ids)
    a_count, n = eta.shape
    forward = np.broadcast_to(np.asarray(forward, dtype=bool), (a_count,))
    newton = newton and not forward.all()
    ahead = _stencil(n, False, forward=True)
    if forward.all():
        offsets = np.broadcast_to(ahead, (a_count,) + ahead.shape)
    else:
        both = _stencil(n, newton)
        offsets = np.broadcast_to(both, (a_count,) + both.shape)
        if forward.any():
            offsets = offsets.copy()
            offsets[forward] = 0.0
            offsets[forward, :n + 1] = ahead
    points = eta[:, None, :] + offsets
    f = obj.predictions(points, ids)
    obj._centre = (ids.tobytes(), eta.copy(), f[:, 0])
    value, f_fit, g = obj.terms(f, ids)
    total = value.sum(axis=2) + obj.prior(points)
    h = _STEP
    ofv0 = total[:, 0]
    plus, minus = total[:, 1:n + 1], total[:, n + 1:2 * n + 1]

    def diff(values: np.ndarray) -> np.ndarray:  # (A, M, ...) -> (A, n, ...)
        if forward.all():
            return (values[:, 1:n + 1] - values[:, :1]) / _FORWARD_STEP
        central = (values[:, 1:n + 1] - values[:, n + 1:2 * n + 1]) / (2 * h)
        if not forward.any():
            return central
        ahead = (values[:, 1:n + 1] - values[:, :1]) / _FORWARD_STEP
        return np.where(forward.reshape((-1,) + (1,) * (values.ndim - 1)), ahead, central)

    # inf - inf where a prediction is unusable; overflow at far trial points
    with np.errstate(invalid="ignore", over="ignore"):
        grad = diff(total)
        df = np.swapaxes(diff(f_fit), 1, 2)
        dg = np.swapaxes(diff(g), 1, 2)
    fisher = _foce_hessian(obj, ids, f_fit[:, 0], g[:, 0], df, dg).fisher
    if not newton:
        return ofv0, grad, fisher, None
    hess = np.zeros((a_count, n, n))
    idx = np.arange(n)
    with np.errstate(invalid="ignore", over="ignore"):  # far trial points: inf
        hess[:, idx, idx] = (plus - 2 * ofv0[:, None] + minus) / h**2
        q = 1 + 2 * n
        for i in range(n):
            for j in range(i + 1, n):
                both = total[:, q] + total[:, q + 1]
                single = plus[:, i] + minus[:, i] + plus[:, j] + minus[:, j]
                hess[:, i, j] = hess[:, j, i] = (both - single + 2 * ofv0) / (2 * h**2)
                q += 2
    return ofv0, grad, fisher, np.where(forward[:, None, None], fisher, hess)


@dataclass
class _Linearised:
    """The FOCE Hessian of OFV and what the exact gradient needs, from the first
    derivatives ``df``, ``dg`` ``(A, K, p)`` of the fitted predictions and SDs (zero in
    padding)."""

    fisher: np.ndarray  # (A, p, p)
    df: np.ndarray
    dg: np.ndarray
    normal: np.ndarray  # (A, K) measured, not censored
    dz: np.ndarray  # (A, K, p) of the censored records' z
    mills: np.ndarray  # (A, K) phi(z) / Phi(z) at the censored records, else 0


def _foce_hessian(obj: _Objective, ids: np.ndarray, f0: np.ndarray, g0: np.ndarray,
                  df: np.ndarray, dg: np.ndarray) -> _Linearised:
    """:class:`_Linearised` at the fitted predictions ``f0`` and SDs ``g0`` ``(A, K)``."""
    p = obj.p
    mask, blq, alq = p.obs_mask[ids], p.blq[ids], p.alq[ids]
    df = np.where(mask[..., None], df, 0.0)  # padding has no prediction to differentiate
    dg = np.where(mask[..., None], dg, 0.0)
    f0, g0 = np.where(mask, f0, 0.0), np.where(mask, g0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        normal = mask & ~blq & ~alq
        weight_f = np.where(normal, 2.0 / g0**2, 0.0)
        weight_g = np.where(normal, 4.0 / g0**2, 0.0)
        # Censored: -2 ln Phi(z), z = (LLOQ - f) / g below, (f - ULOQ) / g above; its
        # Gauss-Newton weight is 2 m (m + z) with m = phi(z) / Phi(z).
        log = p.model.residual.log_scale
        lower = np.log(p.lloq[ids]) if log else p.lloq[ids]
        upper = np.log(p.uloq[ids]) if log else p.uloq[ids]
        sign = np.where(alq, 1.0, -1.0)
        z = np.where(alq, f0 - upper, lower - f0) / g0
        mills = (np.exp(_log_pdf(z) - _log_ndtr(z)) if (blq | alq).any()
                 else np.zeros_like(z))
        mills = np.where(mask & (blq | alq), mills, 0.0)
        weight_c = 2.0 * mills * (mills + z)
        dz = (sign[..., None] * df - z[..., None] * dg) / g0[..., None]
    weight_f, weight_g, weight_c, dz, mills = (
        np.nan_to_num(w) for w in (weight_f, weight_g, weight_c, dz, mills))
    fisher = (_weighted_gram(weight_f, df) + _weighted_gram(weight_g, dg)
              + _weighted_gram(weight_c, dz) + 2.0 * p.precision)
    return _Linearised(fisher, df, dg, normal, dz, mills)


def _exact_derivatives(obj: _Objective, eta: np.ndarray, ids: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, None]:
    """:func:`_derivatives` without a full Hessian, from the predictions' exact
    derivatives (:meth:`_Objective.slopes`): one solution per start instead of ``2n + 1``
    parameter sets, and no step size. Per observation, ``d/dF`` and ``d/dg`` of
    ``ln g^2 + (y - F)^2 / g^2`` are ``-2 r / g^2`` and ``2 / g - 2 r^2 / g^3`` (``r = y -
    F``), of a censored ``-2 ln Phi(z)`` ``-2 m dz``; the prior adds ``2 inv(OMEGA) eta``."""
    f, df = obj.slopes(eta, ids)
    obj._centre = (ids.tobytes(), eta.copy(), f)
    value, f_fit, g = obj.terms(f[:, None, :], ids)
    p, residual = obj.p, obj.p.model.residual
    ofv = value.sum(axis=2)[:, 0] + obj.prior(eta[:, None, :])[:, 0]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        df_fit = df / f[..., None] if residual.log_scale else df
        dg = (np.zeros_like(df) if p.residual_sd is not None
              else residual.sd_slope(f)[..., None] * df)
        lin = _foce_hessian(obj, ids, f_fit[:, 0], g[:, 0], df_fit, dg)
        y = np.log(p.y[ids]) if residual.log_scale else p.y[ids]
        r, g0 = y - f_fit[:, 0], g[:, 0]
        w_f = np.where(lin.normal, -2.0 * r / g0**2, 0.0)
        w_g = np.where(lin.normal, 2.0 / g0 - 2.0 * r**2 / g0**3, 0.0)
        grad = (np.einsum("ak,akp->ap", w_f, lin.df) + np.einsum("ak,akp->ap", w_g, lin.dg)
                - 2.0 * np.einsum("ak,akp->ap", lin.mills, lin.dz)
                + 2.0 * eta @ p.precision)
    return ofv, grad, lin.fisher, None


def _derivatives_by_distance(obj: _Objective, eta: np.ndarray, ids: np.ndarray,
                             far: np.ndarray, *, newton: bool) -> tuple:
    """:func:`_derivatives` (with :func:`_with_hessian`) at ``eta (A, p)``, by forward
    differences where ``far`` (a minimum is still far off) and by central differences
    elsewhere: in two calls when the call is large (_SPLIT_SETS), else in one, the forward
    points padded (the engine's cost of a small call is fixed, not per set). Each ID's
    numbers are the same either way, whatever IDs share the call."""
    a_count, n = eta.shape
    if (obj.exact and not newton) or not far.any() or far.all() or (
            a_count * (2 * n + 1) < _SPLIT_SETS):
        return _with_hessian(_derivatives(obj, eta, ids, newton=newton, forward=far))
    out = (np.empty(a_count), np.empty((a_count, n)), np.empty((a_count, n, n)),
           np.empty((a_count, n, n)))
    for where in (far, ~far):
        values = _with_hessian(_derivatives(obj, eta[where], ids[where], newton=newton,
                                            forward=far[where]))
        for whole, part in zip(out, values):
            whole[where] = part
    return out


def _weighted_gram(weight: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``sum_k weight[a, k] d[a, k, i] d[a, k, j]``, ``(A, p, p)``, as a matrix product."""
    return np.swapaxes(d * weight[..., None], 1, 2) @ d


def _log_ndtr(z: np.ndarray) -> np.ndarray:
    """``ln Phi(z)``, accurate far in the tails (scipy.special is imported here, for
    censored records only: it costs 0.14 s, a quarter of a cold command)."""
    from scipy.special import log_ndtr

    return log_ndtr(z)


def _log_pdf(z: np.ndarray) -> np.ndarray:
    return -0.5 * z**2 - 0.5 * np.log(2 * np.pi)


def _step(hess: np.ndarray, grad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``-H^-1 g`` where H is positive definite (and finite) with its smallest eigenvalue
    above 1e-10 times its largest, and which IDs that was (elsewhere ``-g``).

    The FOCE and BFGS Hessians are positive definite by construction: a Cholesky
    factorisation of the batch confirms it, and bounds on the extreme eigenvalues (row sums
    of H and of its inverse) confirm the conditioning, at a seventh of the cost of
    eigenvalues (7 ms for 450 IDs with 14 ETAs and KAPPAs); eigenvalues judge the IDs the
    bounds leave in doubt, or every ID of a batch with an indefinite H. Each ID's step is
    its inverse times its gradient whichever way it was judged, so that it does not
    depend on the IDs sharing its batch (executors split them)."""
    finite = np.isfinite(hess).all(axis=(1, 2)) & np.isfinite(grad).all(axis=1)
    hess = np.where(finite[:, None, None], hess, np.eye(hess.shape[-1]))
    grad = np.where(finite[:, None], grad, 0.0)
    try:
        np.linalg.cholesky(hess)  # raises unless every H is positive definite
    except np.linalg.LinAlgError:
        ok = finite & _well_conditioned(hess)
        inverse = np.zeros_like(hess)
        inverse[ok] = np.linalg.inv(hess[ok])
    else:
        inverse = np.linalg.inv(hess)
        largest = np.abs(hess).sum(axis=2).max(axis=1)  # >= the largest eigenvalue
        smallest = 1.0 / np.abs(inverse).sum(axis=2).max(axis=1)  # <= the smallest
        ok = finite & (smallest > 1e-10 * largest)
        doubt = finite & ~ok
        ok[doubt] = _well_conditioned(hess[doubt])
    step = np.where(ok[:, None], -np.einsum("aij,aj->ai", inverse, grad), -grad)
    return step, ok


def _well_conditioned(hess: np.ndarray) -> np.ndarray:
    """Whether each H's smallest eigenvalue exceeds 1e-10 times its largest (in size)."""
    w = np.linalg.eigvalsh(hess)
    return w.min(axis=-1) > 1e-10 * np.abs(w).max(axis=-1)


def _bfgs(approx: np.ndarray, s: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The BFGS update of Hessian approximations ``(A, p, p)`` by the steps ``s`` and
    gradient changes ``y`` ``(A, p)``; kept where the curvature ``s'y`` is not clearly
    positive (a zero step, the first point)."""
    bs = np.einsum("aij,aj->ai", approx, s)
    sbs = np.einsum("ai,ai->a", s, bs)
    sy = np.einsum("ai,ai->a", s, y)
    ok = (sy > 1e-10 * np.sqrt(np.einsum("ai,ai->a", s, s) * np.einsum("ai,ai->a", y, y))) & (
        sbs > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        update = (np.einsum("ai,aj->aij", y, y) / sy[:, None, None]
                  - np.einsum("ai,aj->aij", bs, bs) / sbs[:, None, None])
    return np.where(ok[:, None, None], approx + np.nan_to_num(update), approx)


def _with_hessian(values: tuple) -> tuple:
    """Derivatives with the FOCE Hessian standing in where no full Hessian was computed."""
    ofv, grad, fisher, hess = values
    return ofv, grad, fisher, fisher if hess is None else hess


def _merge_starts(at: np.ndarray, near: np.ndarray, target: np.ndarray, ofv: np.ndarray,
                  fisher: np.ndarray, s_count: int, twin: np.ndarray) -> np.ndarray:
    """Among the starts ``at`` (pair indices, ID-major with ``s_count`` starts per ID), those
    near a minimum whose step targets coincide with another start's of the same ID
    (see _SAME_TARGET): the one with the higher OFV is marked merged (``twin`` set to the
    other); returns which of ``at`` were merged."""
    if s_count == 1 or np.count_nonzero(near) < 2:
        return np.zeros(at.size, dtype=bool)
    pairs, n = twin.size, target.shape[1]
    free = np.zeros(pairs, dtype=bool)  # near a minimum, not merged: (ID, start) below
    free[at[near]] = True
    aim = np.zeros((pairs, n))
    aim[at] = target
    free, aim = free.reshape(-1, s_count), aim.reshape(-1, s_count, n)
    level = ofv.reshape(-1, s_count)
    first = np.arange(free.shape[0]) * s_count
    for k in range(s_count):
        for m in range(k + 1, s_count):
            d = aim[:, m] - aim[:, k]
            close = free[:, k] & free[:, m] & (
                np.einsum("bi,bij,bj->b", d, fisher[first + k], d) < _SAME_TARGET)
            drop_m = close & (level[:, m] >= level[:, k])
            drop_k = close & ~drop_m
            twin[first[drop_m] + m] = first[drop_m] + k
            twin[first[drop_k] + k] = first[drop_k] + m
            free[drop_m, m] = free[drop_k, k] = False
    return twin[at] >= 0


@dataclass
class _Fit:
    eta: np.ndarray  # (B, S, p)
    ofv: np.ndarray  # (B, S), at eta (where converged, predicted for the last step)
    converged: np.ndarray  # (B, S)
    iterations: np.ndarray  # (B, S)


def _optimise(obj: _Objective, start: np.ndarray, *, max_iter: int, tol: float) -> _Fit:
    """Newton (finite-difference Hessian; FOCE Hessian where that is not positive
    definite) for every ID and start at once.

    The full step is tried first with the derivatives of the next iteration computed at
    it (one engine call); where it does not decrease OFV enough (Armijo), a vectorised
    backtracking line search follows.
    """
    b_count, s_count, n = start.shape
    ids = np.repeat(np.arange(b_count), s_count)
    eta = start.reshape(-1, n).copy()
    pairs = len(ids)
    newton = n <= _NEWTON_MAX
    exact = obj.exact and not newton
    active = np.ones(pairs, dtype=bool)
    converged = np.zeros(pairs, dtype=bool)
    iterations = np.zeros(pairs, dtype=int)
    known = np.zeros(pairs, dtype=bool)  # derivatives below are those at eta
    ofv = np.full(pairs, np.inf)
    grad = np.zeros((pairs, n))
    fisher = np.zeros((pairs, n, n))
    hess = np.zeros((pairs, n, n))
    hess_bfgs = np.zeros((pairs, n, n))

    twin = np.full(pairs, -1)  # the start a start merged into (same mode), or -1
    seen = np.zeros(pairs, dtype=bool)  # derivatives were stored before
    last = np.zeros((pairs, n))  # where they were taken

    # far: the last step predicted a decrease of _FORWARD_DECREASE or more (forward
    # differences); central: the stored derivatives are central differences
    far = np.zeros(pairs, dtype=bool)
    central = np.zeros(pairs, dtype=bool)

    def derive(where: np.ndarray, at_eta: np.ndarray) -> tuple:
        return _derivatives_by_distance(obj, at_eta, ids[where], far[where], newton=newton)

    def store(where: np.ndarray, values: tuple) -> None:
        old_grad = grad[where].copy()
        ofv[where], grad[where], fisher[where], hess[where] = values
        central[where] = exact or ~far[where]  # accurate: exact, or central differences
        if not newton:  # no Hessian by differences: the FOCE Hessian, then BFGS
            hess_bfgs[where] = _bfgs(
                np.where(seen[where, None, None], hess_bfgs[where], fisher[where]),
                np.where(seen[where, None], eta[where] - last[where], 0.0),
                np.where(seen[where, None], grad[where] - old_grad, 0.0))
            late = iterations[where] >= _FISHER_ITERATIONS
            hess[where] = np.where(late[:, None, None], hess_bfgs[where], fisher[where])
        last[where], seen[where] = eta[where], True
        known[where] = True

    for _ in range(max_iter):
        at = np.flatnonzero(active)
        if at.size == 0:
            break
        need = at[~known[at]]
        if need.size:
            store(need, derive(need, eta[need]))
        fisher_step, usable = _step(fisher[at], grad[at])
        newton_step, ok = ((fisher_step, usable.copy()) if np.array_equal(hess[at], fisher[at])
                           else _step(hess[at], grad[at]))  # scoring steps: the same
        usable &= np.isfinite(ofv[at])
        step = np.where(ok[:, None], newton_step, fisher_step)
        decrease = -np.einsum("ai,ai->a", grad[at], step)
        bad = decrease < 0  # not a descent direction: use the FOCE step there
        step[bad] = fisher_step[bad]
        decrease = -np.einsum("ai,ai->a", grad[at], step)
        done = usable & (decrease < tol) & central[at]  # converged by central differences
        converged[at[done]] = True
        eta[at[done]] += step[done]  # the last (tiny) step too: quadratic convergence
        ofv[at[done]] -= 0.5 * decrease[done]  # the change the step's model predicts
        active[at[~usable | done]] = False  # not finite: reported as not converged
        go = ~done & usable  # a converged start is neither merged nor merged into
        go &= ~_merge_starts(at, go & (decrease < _NEAR_DECREASE), eta[at] + step, ofv,
                             fisher, s_count, twin)
        active[twin >= 0] = False
        if not go.any():
            break
        far[at] = decrease >= _FORWARD_DECREASE  # for the derivatives at the step's end
        at, step, decrease = at[go], step[go], decrease[go]
        iterations[at] += 1
        biggest = np.abs(step).max(axis=-1, keepdims=True)
        step = step * np.minimum(1.0, _MAX_STEP / np.maximum(biggest, 1e-300))
        full = eta[at] + step
        values = derive(at, full)
        good = np.isfinite(values[0]) & (values[0] <= ofv[at] - 0.5e-4 * decrease)
        eta[at[good]] = full[good]
        store(at[good], tuple(v[good] for v in values))
        if good.all():
            continue
        at, step, decrease = at[~good], step[~good], decrease[~good]
        alphas = _LINE_STEPS[1:]
        trial = eta[at][:, None, :] + alphas[None, :, None] * step[:, None, :]
        trial_ofv = obj.ofv(trial, ids[at])
        armijo = np.isfinite(trial_ofv) & (
            trial_ofv <= ofv[at][:, None] - 0.5e-4 * alphas * decrease[:, None])
        moved = armijo.any(axis=1)
        choice = np.argmax(armijo, axis=1)
        eta[at[moved]] = trial[moved, choice[moved]]
        ofv[at[moved]] = trial_ofv[moved, choice[moved]]
        known[at[moved]] = False
        # No decrease along the step: at the optimum to the accuracy of the derivatives if
        # the step is tiny or the decrease it predicts is below _STUCK_DECREASE (relative):
        # central differences (step _STEP) err by about 1e-4 in the gradient where the
        # Hessian is ill-conditioned (IOV: an ETA and its KAPPAs, determined by the data
        # only in sum, curvature 35,000 against 37 across), which predicts decreases of
        # 1e-10 that no step can show.
        stuck = at[~moved]
        tiny = (np.abs(step[~moved]).max(axis=1) < 1e-7) | (
            decrease[~moved] < _STUCK_DECREASE * (1.0 + np.abs(ofv[stuck])))
        # On forward differences (their error can point a step landing at the mode
        # slightly uphill): judged again at the same point, by central differences.
        again = ~central[stuck]
        far[stuck[again]], known[stuck[again]] = False, False
        converged[stuck[tiny & ~again]] = True
        active[stuck[~again]] = False
    for pair in np.flatnonzero(twin >= 0):  # a merged start ends where its twin did
        root = pair
        while twin[root] >= 0:
            root = twin[root]
        eta[pair], converged[pair], ofv[pair] = eta[root], converged[root], ofv[root]
        iterations[pair] = iterations[root]
    # OFV at each start's end, known without another call: where a start converged, that
    # before its last step plus the change the step's quadratic model predicts (the step
    # changes it by less than ``tol``); the chosen start's is evaluated again there.
    shape = (b_count, s_count)
    return _Fit(eta.reshape(b_count, s_count, n), ofv.reshape(shape),
                (converged & np.isfinite(ofv)).reshape(shape), iterations.reshape(shape))


def _best_start(fit: _Fit) -> np.ndarray:
    """Per ID, the converged start with the lowest OFV (else the lowest OFV): among those
    within _SAME_OFV of the lowest, the first, so that starts ending at one mode give the
    first start's result whatever rounding separates them."""
    ofv = np.where(fit.converged, fit.ofv, np.inf)
    ofv = np.where(np.isfinite(ofv).any(axis=1, keepdims=True), ofv, fit.ofv)
    with np.errstate(invalid="ignore"):  # every start's OFV inf: the first
        return np.argmax(ofv <= np.min(ofv, axis=1, keepdims=True) + _SAME_OFV, axis=1)


# --------------------------------------------------------------------------- public API


@dataclass(frozen=True)
class MAPEstimate(JsonDocument):
    """Maximum a posteriori (empirical Bayes) estimates, as NONMEM's POSTHOC reports them.

    Attributes
    ----------
    individuals : DataFrame
        One row per ID: the ETAs (and per-occasion KAPPAs), OFV, OBJ (NONMEM's ``.phi``
        OBJ), N_OBS, SUCCESS, ITERATIONS, MESSAGE, ETC as lower-triangle columns
        ``ETC_i_j`` (1-based, NONMEM's order), and the plausibility of the fit:
        MAX_OUTLIER_SD (largest :func:`outlier_sd` of its observations), MAX_ETA_SD
        (largest ``|ETA| / sqrt(OMEGA)``) and PLAUSIBLE (both at most
        :data:`PLAUSIBLE_SD`).
    records : DataFrame
        Every record of the input with PRED, IPRED (mg/L) and the individual parameters at
        the estimated ETAs (KAPPAs set to 0, as for forecasting); on observations also
        IPRED_OCC, the fitted prediction with the occasion's estimated KAPPAs (equal to
        IPRED without IOV), and IWRES, ``(DV - IPRED_OCC) / SD`` as NONMEM computes it at the
        conditional estimates (on the log scale for a log-additive error), and
        OUTLIER_SD (:func:`outlier_sd`).
    model : PopulationModel
        The model the estimates belong to.
    names : tuple of str
        The estimated ETAs and KAPPAs, in the order of ETC.
    """

    individuals: pd.DataFrame
    records: pd.DataFrame
    model: PopulationModel
    names: tuple[str, ...]
    _problem: Any = field(default=None, repr=False, compare=False)

    @property
    def eta(self) -> pd.DataFrame:
        """ETAs by ID (columns ``model.eta_names``)."""
        return self.individuals[list(self.model.eta_names)]

    @property
    def success(self) -> bool:
        """Whether every ID converged."""
        return bool(self.individuals["SUCCESS"].all())

    def etc(self, id: Any) -> np.ndarray:
        """ETC of one ID: the posterior covariance of its ETAs (Laplace), ``(p, p)``."""
        position = self.individuals.index.get_loc(id)
        return self._etc_rows(self.individuals.iloc[position:position + 1])[0]

    def etcs(self) -> np.ndarray:
        """ETC of every ID, in the order of ``individuals``: ``(IDs, p, p)``."""
        return self._etc_rows(self.individuals)

    def _etc_rows(self, rows: pd.DataFrame) -> np.ndarray:
        n = len(self.names)
        lower = np.tril_indices(n)
        names = [f"ETC_{i + 1}_{j + 1}" for i, j in zip(*lower)]
        out = np.empty((len(rows), n, n))
        values = float_columns(rows, names)
        out[:, lower[0], lower[1]] = values
        out[:, lower[1], lower[0]] = values
        return out

    def summary(self, posterior: PosteriorSample | None = None,
                level: float = 0.9) -> pd.DataFrame:
        """Each ID's parameters: the typical value for its covariates (ETAs 0), the
        individual MAP value, a ``level`` credible interval from ``posterior`` (when
        given), the ETA's shrinkage (``1 - sqrt(1 - ETC / OMEGA)``: 0 when the data fix the
        ETA, 1 when they say nothing), and the derived terminal half-life and Vss.

        Returns
        -------
        DataFrame
            ID, PARAMETER, UNIT, TYPICAL, INDIVIDUAL, LOW, HIGH, ETA, SHRINKAGE; units in
            the model's time unit (L, L/time, 1/time).

        Examples
        --------
        >>> from pkmodel.data import infliximab_regimen
        >>> from pkmodel.models import load
        >>> table = infliximab_regimen(28.0, until_week=22,
        ...                            covariates={"ALB": 3.3, "ATI": 0, "IMM": 1})
        >>> table.loc[(table.EVID == 0) & (table.TIME == 98.0), ["MDV", "DV"]] = [0, 3.2]
        >>> fit = estimate_map(load("fasanmade2011"), table)
        >>> fit.summary()[["PARAMETER", "UNIT"]].T.to_numpy().tolist()[0]
        ['CL', 'V1', 'Q', 'V2', 'HALF_LIFE', 'VSS']
        """
        if self.records.empty:
            raise ValueError("this fit was made with records=False: it has no per-record "
                             "table to take the covariates from; fit with records=True")
        model, rows = self.model, []
        unit_of = {"CL": "L/{t}", "Q": "L/{t}", "Q3": "L/{t}", "V1": "L", "V2": "L",
                   "V3": "L", "KA": "1/{t}", "HALF_LIFE": "{t}", "VSS": "L"}
        last = self.records.groupby("ID", sort=False).last()
        for ident in self.individuals["ID"]:
            covs = {c: np.array([last.loc[ident, c]]) for c in model.covariate_names}
            eta = self.individuals.loc[ident, list(model.eta_names)].to_numpy(dtype=float)
            sets = [np.zeros(len(model.eta_names)), eta]
            if posterior is not None:
                draws = posterior.draws[posterior.draws["ID"] == ident]
                sets += list(float_columns(draws, model.eta_names))
            values = evaluate_parameters(model, covs, np.array(sets)[:, None, :])
            table = {k: np.ravel(v) for k, v in values.items()
                     if k in model.structure.parameter_names}
            derived = [disposition(model, {k: v[i] for k, v in table.items()})
                       for i in range(len(sets))]
            for name in ("HALF_LIFE", "VSS"):
                table[name] = np.array([d[name] for d in derived])
            etc = self.etc(ident)
            for name, v in table.items():
                eta_name = eta_of(model, name)
                shrink = np.nan
                if eta_name is not None and eta_name in self.names:
                    k, at = model.eta_names.index(eta_name), self.names.index(eta_name)
                    ratio = etc[at, at] / model.omega[k, k]
                    shrink = float(1.0 - np.sqrt(max(0.0, 1.0 - ratio)))
                low = high = np.nan
                if posterior is not None and v.size > 2:
                    low, high = np.percentile(v[2:], [50 * (1 - level), 50 * (1 + level)])
                rows.append({"ID": ident, "PARAMETER": name,
                             "UNIT": unit_of.get(name, "").format(t=model.time_unit),
                             "TYPICAL": v[0], "INDIVIDUAL": v[1], "LOW": low, "HIGH": high,
                             "ETA": eta_name, "SHRINKAGE": shrink})
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: the model name, and the individuals and records as lists of
        records."""
        return plain_json({"model": self.model.name, "names": list(self.names),
                           "individuals": self.individuals.to_dict(orient="records"),
                           "records": self.records.to_dict(orient="records")})



def objective(
    model: PopulationModel,
    data: pd.DataFrame,
    eta: pd.DataFrame | np.ndarray,
    *,
    covariates: str = "nocb",
) -> pd.DataFrame:
    """Each ID's MAP objective at given ETAs, for comparing with other software.

    The quantities :func:`estimate_map` reports, at ``eta`` instead of at the optimum
    (mapbayr's ``compute_ofv``): OFV (``-2 ln`` of likelihood times prior, up to a
    constant), and NONMEM's ``.phi`` OBJ (``OFV + ln det OMEGA - ln det ETC``) with ETC
    from the FOCE Hessian there.

    Parameters
    ----------
    model, data, covariates
        As for :func:`estimate_map`.
    eta : DataFrame or ndarray
        A DataFrame with an ``ID`` column and one column per ETA name (KAPPA columns
        optional, 0 when absent), or an array ``(n_ids, n_eta)`` with IDs in order of
        appearance (KAPPAs 0).

    Returns
    -------
    DataFrame
        ID, OFV and OBJ per ID.

    Examples
    --------
    >>> from pkmodel.data import infliximab_regimen
    >>> from pkmodel.models import load
    >>> table = infliximab_regimen(28.0, until_week=22,
    ...                            covariates={"ALB": 3.3, "ATI": 0, "IMM": 1})
    >>> table.loc[(table.EVID == 0) & (table.TIME == 98.0), ["MDV", "DV"]] = [0, 3.2]
    >>> model = load("fasanmade2011")
    >>> fit = estimate_map(model, table)
    >>> at = objective(model, table, fit.individuals)
    >>> bool(abs(at["OFV"].iloc[0] - fit.individuals["OFV"].iloc[0]) < 1e-9)
    True
    """
    if _fixed_etas(model):
        if not isinstance(eta, pd.DataFrame):
            given = np.atleast_2d(np.asarray(eta, dtype=float))
            keep = [i for i, v in enumerate(np.diag(model.omega)) if v > 0]
            eta = given[:, keep]
        return objective(_estimated_part(model), data, eta, covariates=covariates)
    problem, _ = _build_problem(model, data, covariates)
    obj = _Objective(problem)
    b_count, n = len(problem.ids), problem.n_params
    values = np.zeros((b_count, n))
    if isinstance(eta, pd.DataFrame):
        frame = eta.set_index("ID", drop=False) if "ID" in eta.columns else eta
        missing = [i for i in problem.ids if i not in frame.index]
        if missing:
            raise ValueError(f"`eta` has no row for ID {missing[:5]}")
        for j, name in enumerate(problem.names):
            if name in frame.columns:
                values[:, j] = frame.loc[list(problem.ids), name].to_numpy(dtype=float)
            elif j < len(model.eta_names):
                raise ValueError(f"`eta` lacks column {name!r}")
    else:
        given = np.atleast_2d(np.asarray(eta, dtype=float))
        if given.shape != (b_count, len(model.eta_names)):
            raise ValueError(f"`eta` must be ({b_count}, {len(model.eta_names)}) for "
                             f"{model.eta_names}; got {given.shape}")
        values[:, :given.shape[1]] = given
    take = np.arange(b_count)
    ofv, _, fisher, hess = _with_hessian(_derivatives(obj, values, take, newton=False))
    etc, _ = _etc(fisher, hess)
    logdet = np.array([np.linalg.slogdet(e)[1] if np.isfinite(e).all() else np.nan
                       for e in etc])
    return pd.DataFrame({"ID": list(problem.ids), "OFV": ofv,
                         "OBJ": ofv + problem.omega_logdet - logdet})


class ConditionalLikelihood:
    """``-2 ln p(y_i | eta)`` of every ID's records for many candidate ETA vectors at once:
    the data part of :func:`objective`'s OFV (no prior, no ``ln 2 pi`` constant), censored
    records (M3, ULOQ) included, for samplers and population methods.

    Parameters
    ----------
    model : PopulationModel
        Without IOV; every ETA with a positive variance.
    data : DataFrame
        NONMEM-style records of every ID.
    covariates : {"nocb", "locf"}

    Examples
    --------
    >>> from pkmodel.data import infliximab_regimen
    >>> from pkmodel.models import load
    >>> table = infliximab_regimen(28.0, until_week=22,
    ...                            covariates={"ALB": 3.3, "ATI": 0, "IMM": 1})
    >>> table.loc[(table.EVID == 0) & (table.TIME == 98.0), ["MDV", "DV"]] = [0, 3.2]
    >>> model = load("fasanmade2011").without_iov()
    >>> density = ConditionalLikelihood(model, table)
    >>> density(np.zeros((1, 3, len(model.eta_names)))).shape
    (1, 3)
    """

    def __init__(self, model: PopulationModel, data: pd.DataFrame, *,
                 covariates: str = "nocb") -> None:
        if model.iov:
            raise ValueError(f"{model.name} has IOV: ConditionalLikelihood takes ETAs only "
                             "(use model.without_iov())")
        problem, _ = _build_problem(model, data, covariates)
        self._objective = _Objective(problem)
        self._everyone = np.arange(len(problem.ids))

    @property
    def model(self) -> PopulationModel:
        return self._objective.p.model

    @property
    def ids(self) -> np.ndarray:
        """The IDs, in order of appearance (axis 0 of the ETA arrays)."""
        return self._objective.p.ids

    @property
    def observations(self) -> np.ndarray:
        """The number of measured records of each ID."""
        return self._objective.p.obs_mask.sum(axis=1)

    def __call__(self, eta: np.ndarray) -> np.ndarray:
        """``(n_ids, M)`` values for ``eta (n_ids, M, n_eta)``; +inf where a prediction is
        unusable."""
        value = self.terms(self.predictions(eta))
        return value.sum(axis=2)

    def predictions(self, eta: np.ndarray) -> np.ndarray:
        """Individual predictions ``(n_ids, M, K)`` at the measured records (padded to the
        longest ID; see :meth:`terms`). Candidates no model takes (a negative volume) give
        non-finite values, which :meth:`terms` makes +inf."""
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            return self._objective.predictions(eta, self._everyone)

    def terms(self, predictions: np.ndarray, residual: ResidualError | None = None
              ) -> np.ndarray:
        """Per-record ``-2 ln p`` ``(n_ids, M, K)`` of ``predictions`` under ``residual``
        (by default the model's residual error; 0 on padding)."""
        return self._objective.terms(predictions, self._everyone, residual)[0]

    def at(self, model: PopulationModel) -> ConditionalLikelihood:
        """The same records under other THETA, OMEGA and residual values of the model
        (same structure, equations, ETAs and covariates), without rebuilding them."""
        if model.iov or len(model.eta_names) != len(self.model.eta_names):
            raise ValueError("`model` must have this model's ETAs and no IOV")
        out = object.__new__(ConditionalLikelihood)
        out._objective = _Objective(replace(self._objective.p, model=model))
        out._objective._cache = self._objective._cache
        out._everyone = self._everyone
        return out


def _fixed_etas(model: PopulationModel) -> list[str]:
    """ETAs whose variance is fixed at 0 (NONMEM's OMEGA FIX 0): not estimated, 0."""
    return [n for n, v in zip(model.eta_names, np.diag(model.omega)) if v == 0]


def _estimated_part(model: PopulationModel) -> PopulationModel:
    """The model without its ETAs of variance 0 (each replaced by 0 in the equations)."""
    fixed = set(_fixed_etas(model))
    keep = [i for i, n in enumerate(model.eta_names) if n not in fixed]
    if not keep:
        raise ValueError(f"{model.name}: every ETA has variance 0, so there is nothing to "
                         "estimate (predict() gives the population prediction)")
    import sympy as sp

    zero = {sp.Symbol(n): 0 for n in fixed}
    return replace(model, omega=model.omega[np.ix_(keep, keep)],
                   eta_names=tuple(model.eta_names[i] for i in keep),
                   parameters={k: v.subs(zero) for k, v in model.parameters.items()})


def _with_fixed_columns(frame: pd.DataFrame, model: PopulationModel) -> pd.DataFrame:
    """``frame`` with a 0 column for each ETA of variance 0, the ETAs in the model's order
    where the estimated ones were."""
    columns = list(frame.columns)
    estimated = [c for c in columns if c in model.eta_names]
    at = columns.index(estimated[0]) if estimated else len(columns)
    before = [c for c in columns[:at] if c not in model.eta_names]
    after = [c for c in columns[at:] if c not in model.eta_names]
    out = frame.assign(**{n: 0.0 for n in _fixed_etas(model)})
    return out[before + list(model.eta_names) + after]


#: Points of the prior screened for starting points, and how far out (prior SDs); the
#: reach of the start drawn near the prior's mode.
SCREEN_POINTS, SCREEN_SD, NEAR_SD = 64, 5.0, 1.5


def _initial(problem: _Problem, initial: pd.DataFrame | None) -> np.ndarray | None:
    """Starting ETAs and KAPPAs per ID from a table with ID and their columns (0 where a
    column or an ID is missing)."""
    if initial is None:
        return None
    frame = initial.set_index("ID", drop=False) if "ID" in initial.columns else initial
    out = np.zeros((len(problem.ids), problem.n_params))
    for j, name in enumerate(problem.names):
        if name in frame.columns:
            values = frame[name].reindex(list(problem.ids)).to_numpy(dtype=float)
            out[:, j] = np.nan_to_num(values)
    return out


def _halton(n_points: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """``n_points`` quasi-random points in the unit cube ``[0, 1)^dim``: the Halton
    sequence (radical inverses in the first ``dim`` primes) with its digits randomly
    permuted per base (which breaks the lines that plain Halton points lie on in pairs of
    larger bases, 11 and 13 say) and a random shift modulo 1, seeded by ``rng``; numpy
    only (scipy.stats.qmc costs 0.4-0.9 s to import, most of a cold command)."""
    primes: list[int] = []
    candidate = 2
    while len(primes) < dim:
        if all(candidate % p for p in primes):
            primes.append(candidate)
        candidate += 1
    out = np.zeros((n_points, dim))
    for d, base in enumerate(primes):
        index, scale = np.arange(1, n_points + 1), 1.0
        digits = rng.permutation(base)
        while index.any():
            scale /= base
            out[:, d] += scale * digits[index % base] * (index > 0)
            index //= base
    return (out + rng.uniform(size=dim)) % 1.0


def _starts(obj: _Objective, starts: int, seed: int,
            initial: np.ndarray | None = None) -> np.ndarray:
    """Starting points ``(A, starts, p)``: zero (NONMEM's start); a point drawn within
    NEAR_SD prior SDs of the ETAs (a nearby mode); then the lowest-OFV points of a randomly
    shifted Halton screen of the ETAs within SCREEN_SD prior SDs, each at least one prior
    SD from the others, so that a second mode far out in the prior is still reached. The
    KAPPAs start at 0 (in the first start: ``initial``'s, when given; a drawn KAPPA for
    every occasion put the starts of a Bayesian trial
    arm's children thousands of OFV units away from a mode they reached anyway, for 3-10 %
    of the arm's time)."""
    problem = obj.p
    b_count, n = len(problem.ids), problem.n_params
    start = np.zeros((b_count, starts, n))
    if initial is not None:
        start[:, 0] = initial
    if starts == 1:
        return start
    n_eta = len(problem.model.eta_names)
    all_sd = np.sqrt(np.diag(np.linalg.inv(problem.precision)))
    prior_sd = all_sd[:n_eta]
    # One start near the mode of the prior (within NEAR_SD), the others from the screen.
    rng = np.random.default_rng(seed)
    start[:, 1] = rng.uniform(-NEAR_SD, NEAR_SD, (1, n)) * all_sd
    start[:, 1, n_eta:] = 0.0  # drawn all the same: the screen's draws follow unchanged
    if starts == 2:
        return start
    unit = _halton(SCREEN_POINTS, n_eta, rng)
    screen = np.zeros((SCREEN_POINTS, n))
    screen[:, :n_eta] = (2.0 * unit - 1.0) * SCREEN_SD * prior_sd
    value = obj.ofv(np.broadcast_to(screen, (b_count, *screen.shape)), np.arange(b_count))
    order = np.argsort(np.where(np.isfinite(value), value, np.inf), axis=1, kind="stable")
    scaled = screen[:, :n_eta] / prior_sd
    for b in range(b_count):
        # The lowest points, each at least one prior SD (in some ETA) from zero and from
        # those taken: one start per basin rather than several in the deepest one.
        taken: list[np.ndarray] = []
        for k in order[b]:
            if len(taken) == starts - 2:
                break
            if all(np.abs(scaled[k] - t).max() >= 1.0 for t in taken):
                start[b, 2 + len(taken)] = screen[k]
                taken.append(scaled[k])
    return start


def estimate_map(
    model: PopulationModel,
    data: pd.DataFrame,
    *,
    covariates: str = "nocb",
    starts: int = 3,
    seed: int = 0,
    max_iter: int = 500,
    tol: float = 1e-10,
    initial: pd.DataFrame | None = None,
    interaction: bool = True,
    records: bool = True,
) -> MAPEstimate:
    """MAP estimates of every ID's ETAs from its measured concentrations.

    Reproduces NONMEM's ``$EST METHOD=1 INTERACTION MAXEVAL=0 POSTHOC``: the conditional
    mode of the ETAs given the data and the model's OMEGA, SIGMA and THETA.

    Parameters
    ----------
    model : PopulationModel
    data : DataFrame
        NONMEM-style records; observations are EVID 0, MDV 0 with DV in mg/L (also for a
        log-additive model). An ``LLOQ`` column (mg/L) makes records with DV < LLOQ
        censored (M3), a ``ULOQ`` column those with DV > ULOQ censored from above. An
        ``OCC`` column sets occasions for IOV (default: dosing intervals).
    covariates : {"nocb", "locf"}
        Which record's covariates govern the interval before a record (NONMEM: NOCB).
    starts : int
        Starting points per ID: zero, then the lowest-OFV points of a screen of
        SCREEN_POINTS quasi-random points within SCREEN_SD prior SDs (``seed``). Every start
        is optimised (two heading for the same optimum merge into one); the best is kept
        (of starts within 1e-9 of it, the first), and another optimum is reported in
        MESSAGE.
    seed : int
        Seed of the screen (same seed, same result).
    max_iter : int
        Iterations per start.
    tol : float
        Stop when the predicted decrease of OFV is below this.
    initial : DataFrame, optional
        The first start per ID instead of zero: a table with ID and the columns of
        ``names`` (an earlier fit's ``individuals``, as a population fit reuses them).
    interaction : bool
        NONMEM's INTERACTION: the residual SD at the individual prediction (default). False
        evaluates it at the prediction with ETAs 0 (FOCE without interaction).
    records : bool
        Build the per-record table (predictions, IWRES) and mark implausible fits (default).
        False leaves ``records`` empty and skips the plausibility flags (no PLAUSIBLE,
        MAX_OUTLIER_SD, MAX_ETA_SD columns): for callers that need the modes, OBJ and ETC
        only, as the inner problems of a population fit (about 10 ms of a 25-ms fit of 59
        IDs).

    Returns
    -------
    MAPEstimate

    Examples
    --------
    >>> from pkmodel.data import infliximab_regimen
    >>> from pkmodel.models import load
    >>> table = infliximab_regimen(28.0, until_week=22,
    ...                            covariates={"ALB": 3.3, "ATI": 0, "IMM": 1})
    >>> trough = (table.EVID == 0) & (table.TIME == 98.0)
    >>> table.loc[trough, ["MDV", "DV"]] = [0, 3.2]   # measured week-14 trough, mg/L
    >>> fit = estimate_map(load("fasanmade2011"), table)
    >>> fit.success, bool(fit.individuals["ETA_CL"].iloc[0] < 0)   # clears slower than typical
    (True, True)
    """
    if starts < 1:
        raise ValueError(f"`starts` must be at least 1; got {starts}")
    if _fixed_etas(model):
        part = estimate_map(_estimated_part(model), data, covariates=covariates,
                            starts=starts, seed=seed, max_iter=max_iter, tol=tol,
                            initial=initial, interaction=interaction, records=records)
        return replace(part, model=model,
                       individuals=_with_fixed_columns(part.individuals, model))
    problem, full = _build_problem(model, data, covariates)
    if not interaction:
        typical = _Objective(problem).predictions(
            np.zeros((len(problem.ids), 1, problem.n_params)), np.arange(len(problem.ids)))
        problem = replace(problem, residual_sd=model.residual.sd(typical[:, 0, :]))
    obj = _Objective(problem)
    b_count, n = len(problem.ids), problem.n_params
    start = _starts(obj, starts, seed, _initial(problem, initial))
    fit = _optimise(obj, start, max_iter=max_iter, tol=tol)
    best = _best_start(fit)
    take = np.arange(b_count)
    eta = fit.eta[take, best]
    final_ofv, _, fisher, hess = _with_hessian(
        _derivatives(obj, eta, take, newton=n <= _NEWTON_MAX))
    etc, pd_ok = _etc(fisher, hess)

    columns = _individual_columns(problem, fit, best, eta, final_ofv, etc, pd_ok,
                                  starts=starts, max_iter=max_iter, tol=tol)
    if not records:
        return MAPEstimate(individuals=pd.DataFrame(columns, index=pd.Index(problem.ids)),
                           records=pd.DataFrame(), model=model, names=tuple(problem.names),
                           _problem=(problem, covariates, obj.kept()))
    return _with_records(model, problem, full, covariates, obj, eta, columns)


def _with_records(model: PopulationModel, problem: _Problem, full: pd.DataFrame,
                  covariates: str, obj: _Objective, eta: np.ndarray,
                  individuals: dict[str, Any]) -> MAPEstimate:
    """The fit with its per-record table (predictions, IPRED_OCC, IWRES, OUTLIER_SD) and
    the plausibility of each ID's fit marked; ``individuals``: the columns of
    :func:`_individual_columns` (every ID of ``full``, in order of appearance)."""
    by_id = np.column_stack([individuals[name] for name in model.eta_names]
                            or [np.empty((len(problem.ids), 0))])
    columns = prediction_columns(model, full, _full_events(problem, full, covariates), by_id)
    used = (full["EVID"].to_numpy() == 0) & (full["MDV"].to_numpy() == 0)
    # The fitted prediction of each observation, with its occasion's KAPPAs (the
    # observations of the problem are those of the table, ID by ID, in file order).
    f = np.full(len(full), np.nan)
    f[used] = obj.fitted(eta, np.arange(len(problem.ids)))[problem.obs_mask]
    dv = full["DV"].to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        if model.residual.log_scale:
            iwres = (np.log(dv) - np.log(f)) / model.residual.additive
        else:
            iwres = (dv - f) / model.residual.sd(f)
    iwres = np.where(used, iwres, np.nan)
    score = _outlier_score(model, full, f, iwres)
    records = with_columns(full, {**columns, "IPRED_OCC": f, "IWRES": iwres,
                                  "OUTLIER_SD": score})
    _explain_non_finite(model, individuals, records, used)
    individuals.update(_plausibility(model, individuals, full["ID"].to_numpy(), score))
    return MAPEstimate(individuals=pd.DataFrame(individuals, index=pd.Index(problem.ids)),
                       records=records, model=model, names=tuple(problem.names),
                       _problem=(problem, covariates, obj.kept()))


def _individual_columns(problem: _Problem, fit: _Fit, best: np.ndarray, eta: np.ndarray,
                        final_ofv: np.ndarray, etc: np.ndarray, pd_ok: np.ndarray, *,
                        starts: int, max_iter: int, tol: float) -> dict[str, Any]:
    """Columns of one row per ID: the ETAs, OFV, OBJ, N_OBS, SUCCESS, ITERATIONS, MESSAGE
    and ETC.
    Converged starts whose OFVs differ by more than 1e-4 (or ``tol``, where larger: a start
    converged to ``tol`` stops up to about that far above its mode) are named in MESSAGE."""
    b_count, n = len(problem.ids), problem.n_params
    chosen = (np.arange(b_count), best)
    finite = np.isfinite(final_ofv)
    success = fit.converged[chosen] & pd_ok & finite
    messages = []
    for b in range(b_count):
        message = "converged"
        if not finite[b]:
            message = ("objective not finite: a prediction of 0 where the error model needs one "
                       "> 0 (a sample before the first dose with proportional error?), or a "
                       "measured value too large")
        elif not fit.converged[b, best[b]]:
            message = (f"no convergence in {max_iter} iterations"
                       if fit.iterations[b, best[b]] >= max_iter
                       else "line search failed to decrease the objective")
        elif not pd_ok[b]:
            message = "Hessian not positive definite at the optimum"
        others = fit.ofv[b][fit.converged[b]]
        if success[b] and others.size > 1 and np.ptp(others) > max(1e-4, tol):
            message += (f"; {starts} starts reached objectives {np.round(np.sort(others), 4)}"
                        " (best kept)")
        messages.append(message)
    logdet = np.full(b_count, np.nan)
    usable = np.isfinite(etc).all(axis=(1, 2))
    if usable.any():
        sign, value = np.linalg.slogdet(etc[usable])
        logdet[usable] = np.where(sign > 0, value, np.nan)
    columns: dict[str, Any] = {"ID": problem.ids}
    columns.update({name: eta[:, i] for i, name in enumerate(problem.names)})
    columns.update(OFV=final_ofv, OBJ=final_ofv + problem.omega_logdet - logdet,
                   N_OBS=problem.obs_mask.sum(axis=1).astype(int), SUCCESS=success,
                   ITERATIONS=fit.iterations[chosen].astype(int), MESSAGE=messages)
    for i in range(n):
        for j in range(i + 1):
            columns[f"ETC_{i + 1}_{j + 1}"] = etc[:, i, j]
    return columns


def _explain_non_finite(model: PopulationModel, individuals: dict[str, Any],
                        records: pd.DataFrame, used: np.ndarray) -> None:
    """Name, in MESSAGE (of the columns ``individuals``), the measured records that make an
    ID's objective not finite: a prediction of 0 (before any dose) that an error without
    additive part cannot weigh."""
    if not (model.residual.log_scale or model.residual.sd(0.0) <= 0):
        return
    zero = used & ~(records["IPRED_OCC"].to_numpy(dtype=float) > 0)
    for b in np.flatnonzero(~np.isfinite(individuals["OFV"])):
        ident = individuals["ID"][b]
        rows = records.index[zero & (records["ID"] == ident).to_numpy()]
        if len(rows):
            kind = "log-additive" if model.residual.log_scale else "proportional"
            individuals["MESSAGE"][b] = (
                f"objective not finite: row {rows[0]} (day {records.loc[rows[0], 'TIME']:g}) "
                f"is measured where the prediction is 0 (before the first dose?), which the "
                f"{kind} error of {model.name} cannot weigh; set MDV=1 on it (it tells "
                "nothing about this patient)")


def _plausibility(model: PopulationModel, individuals: dict[str, Any], ids: np.ndarray,
                  score: np.ndarray) -> dict[str, np.ndarray]:
    """Columns for ``individuals`` (ID, the ETAs: one entry per ID): MAX_OUTLIER_SD (the
    largest ``score`` of each ID's records, ``ids`` the records' IDs), MAX_ETA_SD and
    PLAUSIBLE; a PlausibilityWarning naming the IDs beyond PLAUSIBLE_SD."""
    row_of_id, unique_ids = pd.factorize(ids)
    worst = np.full(len(unique_ids), np.nan)
    np.fmax.at(worst, row_of_id, score)  # NaN (not measured) ignored; NaN if none is
    fitted = np.asarray(individuals["ID"])
    where = pd.Index(unique_ids).get_indexer(fitted)
    max_outlier = np.where(where >= 0, worst[where], np.nan)
    sd = np.sqrt(np.diag(model.omega))
    eta = np.column_stack([np.asarray(individuals[name], dtype=float)
                           for name in model.eta_names] or [np.empty((len(fitted), 0))])
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(sd > 0, np.abs(eta) / sd, np.nan)
    with warnings.catch_warnings():  # an ID without a finite ETA: NaN, without a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        max_eta = np.nanmax(z, axis=1) if z.size else np.full(len(fitted), np.nan)
    beyond = (max_outlier > PLAUSIBLE_SD) | (max_eta > PLAUSIBLE_SD)
    if beyond.any():
        ids_text = ", ".join(str(i) for i in fitted[beyond][:10])
        warnings.warn(f"ID {ids_text}: a measured value or an ETA lies more than "
                      f"{PLAUSIBLE_SD:g} SDs from the model's expectation (MAX_OUTLIER_SD, "
                      "MAX_ETA_SD): a unit slip (ng/mL?), a mis-timed sample or a model "
                      "that does not fit this patient", PlausibilityWarning, stacklevel=4)
    return {"MAX_OUTLIER_SD": max_outlier, "MAX_ETA_SD": max_eta, "PLAUSIBLE": ~beyond}


def outlier_sd(model: PopulationModel, records: pd.DataFrame) -> np.ndarray:
    """How far each measured value lies from its fitted prediction, in residual SDs.

    ``|IWRES|``, and, for an error with a proportional part, also ``|ln(DV / IPRED_OCC)|``
    over the CV at the prediction: a proportional error bounds IWRES below by ``-1/b``
    for any value under its prediction, however far under. NaN on records that are not
    measured or are censored (below their LLOQ, above their ULOQ); infinity where the
    prediction is 0.
    """
    return _outlier_score(model, records, records["IPRED_OCC"].to_numpy(dtype=float),
                          records["IWRES"].to_numpy(dtype=float))


def _outlier_score(model: PopulationModel, records: pd.DataFrame, f: np.ndarray,
                   iwres: np.ndarray) -> np.ndarray:
    """:func:`outlier_sd` from the records' EVID, MDV, DV, LLOQ and ULOQ and the fitted
    predictions ``f`` and ``iwres`` given as arrays."""
    used = (records["EVID"].to_numpy() == 0) & (records["MDV"].to_numpy() == 0)
    dv = records["DV"].to_numpy(dtype=float)
    if "LLOQ" in records.columns:
        used = used & ~(dv < records["LLOQ"].to_numpy(dtype=float))
    if "ULOQ" in records.columns:
        used = used & ~(dv > records["ULOQ"].to_numpy(dtype=float))
    score = np.abs(iwres)
    if not model.residual.log_scale and model.residual.proportional > 0:
        with np.errstate(divide="ignore", invalid="ignore"):
            cv = model.residual.sd(f) / f
            ratio = np.abs(np.log(dv / f)) / cv
        score = np.fmax(score, ratio)
    return np.where(used, np.where(np.isnan(score), np.inf, score), np.nan)


def _etc(fisher: np.ndarray, hess: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NONMEM's ETC (inverse of half the FOCE Hessian) per ID, and whether the Hessian of
    OFV is positive definite there. An ID whose derivatives are not finite (a prediction
    of 0 under a proportional error, say) gets NaN and False, never an error for all."""
    good = np.flatnonzero(np.isfinite(fisher).all(axis=(1, 2))
                          & np.isfinite(hess).all(axis=(1, 2)))
    etc = np.full(fisher.shape, np.nan)
    pd_ok = np.zeros(fisher.shape[0], dtype=bool)
    try:  # all usable IDs at once (the common case) ...
        etc[good] = np.linalg.inv(fisher[good] / 2.0)
        pd_ok[good] = np.linalg.eigvalsh(hess[good]).min(axis=-1) > 0
    except np.linalg.LinAlgError:  # ... else ID by ID, a singular one left NaN
        for b in good:
            try:
                etc[b] = np.linalg.inv(fisher[b] / 2.0)
                pd_ok[b] = np.linalg.eigvalsh(hess[b]).min() > 0
            except np.linalg.LinAlgError:
                etc[b] = np.nan
    return etc, pd_ok


@dataclass(frozen=True)
class PosteriorSample(JsonDocument):
    """Draws from the posterior of one or more IDs' ETAs, with diagnostics.

    Attributes
    ----------
    draws : DataFrame
        Columns ID, DRAW and the ETAs (and KAPPAs); ``n`` equally weighted draws per ID.
    diagnostics : DataFrame
        One row per ID: METHOD, ESS (effective sample size of the importance weights, or
        of the chain), MAX_WEIGHT (largest normalised importance weight), ACCEPTANCE (MCMC
        acceptance rate), and SUCCESS (ESS at least ``min_ess``).
    """

    draws: pd.DataFrame
    diagnostics: pd.DataFrame

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: draws and diagnostics as lists of records."""
        return plain_json({"draws": self.draws.to_dict(orient="records"),
                           "diagnostics": self.diagnostics.to_dict(orient="records")})



def sample_posterior(
    model: PopulationModel,
    data: pd.DataFrame,
    *,
    n: int = 1000,
    seed: int = 0,
    method: str = "importance",
    proposals: int = 4000,
    min_ess: float = 200.0,
    covariates: str = "nocb",
    estimate: MAPEstimate | None = None,
) -> PosteriorSample:
    """Sample each ID's posterior ETAs (seeded), for uncertainty in forecasts and dosing.

    ``method="importance"`` draws ``proposals`` points from a multivariate t (4 degrees of
    freedom) centred on the MAP with the ETC as scale, weights them by the exact posterior
    (``exp(-OFV / 2)``) over the proposal density, and resamples ``n`` draws.
    ``method="mcmc"`` runs a random-walk Metropolis chain with the ETC as proposal
    covariance (scaled 2.4^2 / p), after 500 warm-up steps, thinned to ``n`` draws.

    Parameters
    ----------
    model, data, covariates
        As for :func:`estimate_map`.
    n : int
        Draws per ID.
    seed : int
        Same seed, same draws.
    method : {"importance", "mcmc"}
    proposals : int
        Importance-sampling proposals (or chain length before thinning, times 1).
    min_ess : float
        An ID whose effective sample size is below this is marked unsuccessful.
    estimate : MAPEstimate, optional
        A MAP fit of the same data to start from (computed when omitted).

    Returns
    -------
    PosteriorSample
    """
    if method not in ("importance", "mcmc"):
        raise ValueError(f"`method` must be 'importance' or 'mcmc'; got {method!r}")
    if n < 1 or proposals < n:
        raise ValueError(f"need 1 <= n <= proposals; got n={n}, proposals={proposals}")
    fit = estimate if estimate is not None else estimate_map(model, data, covariates=covariates)
    if _fixed_etas(model):
        part = sample_posterior(_estimated_part(model), data, n=n, seed=seed, method=method,
                                proposals=proposals, min_ess=min_ess, covariates=covariates,
                                estimate=replace(fit, model=_estimated_part(model)))
        return replace(part, draws=_with_fixed_columns(part.draws, model))
    problem, _ = _build_problem(model, data, covariates)
    kept = fit._problem  # the fit's objective, its engine inputs built: reused if of `data`
    if (kept is not None and len(kept) == 3 and kept[1] == covariates and fit.model is model
            and kept[0].events is problem.events and kept[0].residual_sd is None):
        problem, _, obj = kept
    else:
        obj = _Objective(problem)
    b_count, p = len(problem.ids), problem.n_params
    names = problem.names
    mode = float_columns(fit.individuals, names)
    etcs = fit.etcs()
    # An ID without a usable mode or ETC gets NaN draws and SUCCESS False; the others run.
    usable = np.isfinite(etcs).all(axis=(1, 2)) & np.isfinite(mode).all(axis=1)
    mode = np.where(usable[:, None], mode, 0.0)
    chol = np.linalg.cholesky(np.where(usable[:, None, None], etcs, np.eye(p)))
    rng = np.random.default_rng(seed)
    sampler = _importance if method == "importance" else _metropolis
    values, diagnostics = sampler(obj, mode, chol, usable, rng, n, proposals)
    diagnostics["SUCCESS"] = usable & (diagnostics["ESS"] >= min_ess)
    diagnostics["ESS"] = np.where(usable, diagnostics["ESS"], 0.0)
    values[~usable] = np.nan
    ids = np.asarray(problem.ids)
    draws = {"ID": np.repeat(ids, n), "DRAW": np.tile(np.arange(n), b_count)}
    draws.update({name: values[:, :, i].ravel() for i, name in enumerate(names)})
    return PosteriorSample(draws=pd.DataFrame(draws),
                           diagnostics=pd.DataFrame({"ID": ids, **diagnostics}))


def _importance(obj: _Objective, mode: np.ndarray, chol: np.ndarray, usable: np.ndarray,
                rng: np.random.Generator, n: int, proposals: int
                ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``n`` draws per ID ``(B, n, p)`` resampled from ``proposals`` multivariate-t
    proposals weighted by the exact posterior, and their diagnostics (an ID whose weights
    are not finite is marked in ``usable``)."""
    b_count, p = mode.shape
    df = 4.0
    z = rng.standard_normal((b_count, proposals, p))
    scale = np.sqrt(df / rng.chisquare(df, (b_count, proposals, 1)))
    draws = mode[:, None, :] + np.einsum("bij,bmj->bmi", chol, z) * scale
    ofv = obj.ofv(draws, np.arange(b_count))
    # log q for a multivariate t (up to a constant common to all proposals of an ID)
    maha = np.einsum("bmi,bmi->bm", z, z) * scale[..., 0] ** 2
    log_q = -0.5 * (df + p) * np.log1p(maha / df)
    log_w = -0.5 * ofv - log_q
    usable &= np.isfinite(log_w.max(axis=1))
    log_w = np.where(usable[:, None], log_w, 0.0)  # placeholders, replaced by NaN later
    log_w -= log_w.max(axis=1, keepdims=True)
    w = np.exp(log_w)
    w /= w.sum(axis=1, keepdims=True)
    picks = np.stack([rng.choice(proposals, size=n, replace=True, p=w[b])
                      for b in range(b_count)])
    return (np.take_along_axis(draws, picks[:, :, None], axis=1),
            {"METHOD": np.full(b_count, "importance", dtype=object),
             "ESS": 1.0 / np.sum(w**2, axis=1), "MAX_WEIGHT": w.max(axis=1),
             "ACCEPTANCE": np.full(b_count, np.nan)})


def _metropolis(obj: _Objective, mode: np.ndarray, chol: np.ndarray, usable: np.ndarray,
                rng: np.random.Generator, n: int, proposals: int
                ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``n`` draws per ID ``(B, n, p)`` of a random-walk Metropolis chain (ETC proposal
    covariance scaled 2.4^2 / p, 500 warm-up steps, thinned), and their diagnostics."""
    b_count, p = mode.shape
    all_ids = np.arange(b_count)
    warmup, thin = 500, max(1, proposals // n)
    step = chol * (2.4 / np.sqrt(p))
    current = mode.copy()
    current_ofv = obj.ofv(current[:, None, :], all_ids)[:, 0]
    chain = np.empty((b_count, n, p))
    accepted = np.zeros(b_count)
    kept = 0
    for it in range(warmup + n * thin):
        proposal = current + np.einsum("bij,bj->bi", step, rng.standard_normal((b_count, p)))
        prop_ofv = obj.ofv(proposal[:, None, :], all_ids)[:, 0]
        accept = np.log(rng.uniform(size=b_count)) < -0.5 * (prop_ofv - current_ofv)
        current = np.where(accept[:, None], proposal, current)
        current_ofv = np.where(accept, prop_ofv, current_ofv)
        if it >= warmup:
            accepted += accept
            if (it - warmup) % thin == thin - 1 and kept < n:
                chain[:, kept] = current
                kept += 1
    return chain, {"METHOD": np.full(b_count, "mcmc", dtype=object),
                   "ESS": np.array([_chain_ess(c) for c in chain]),
                   "MAX_WEIGHT": np.full(b_count, np.nan),
                   "ACCEPTANCE": accepted / (n * thin)}


def _chain_ess(chain: np.ndarray) -> float:
    """Smallest effective sample size over parameters (initial positive sequence)."""
    n = chain.shape[0]
    worst = float(n)
    for x in chain.T:
        x = x - x.mean()
        var = np.dot(x, x) / n
        if var == 0:
            continue
        acf = np.correlate(x, x, mode="full")[n - 1:] / (var * n)
        total = 0.0
        for lag in range(1, n - 1, 2):
            pair = acf[lag] + acf[lag + 1]
            if pair <= 0:
                break
            total += pair
        worst = min(worst, n / (1.0 + 2.0 * total))
    return worst

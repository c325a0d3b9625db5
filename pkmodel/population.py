"""Population estimation: FOCE-I, NONMEM's ``$EST METHOD=1 INTERACTION`` (also FOCE and
FO; SAEM runs in :mod:`pkmodel.saem` and is reported here).

The FOCE-I objective of a population is the sum over IDs of NONMEM's ``.phi`` OBJ at each
ID's conditional mode (Almquist et al. 2015; ``../shared/validation/population``):

``OFV_i = sum_j [(y_ij - f_ij)^2 / R_ij + ln R_ij] + eta_i' inv(OMEGA) eta_i + ln det OMEGA
+ ln det(inv(OMEGA) + G' inv(R) G + 1/2 sum_j dR_j dR_j' / R_j^2)``

which is ``OFV + ln det OMEGA - ln det ETC`` of :func:`~pkmodel.estimate.estimate_map`
(whose FOCE Hessian is twice the last matrix): the inner problems are MAP fits, warm
started from the previous ones, and records below an LLOQ (M3) or above a ULOQ enter as
they do there.

The outer problem runs in transformed parameters (THETAs scaled by their initial values,
the Cholesky factor of OMEGA with log diagonal, log residual SDs) by BFGS. Its gradient is
exact (:mod:`pkmodel.gradient`: the predictions' sensitivities through the closed forms,
the modes followed by the implicit function theorem) wherever
:func:`~pkmodel.gradient.focei_gradient_unsupported` allows; elsewhere (IOV, steady
state, dose modifiers, time-varying covariates, three compartments)
it is taken by forward differences of the objective (central near the optimum), whose
inner modes are converged to 1e-14 in OFV, and :attr:`PopulationFit.gradient` says so.
The covariance step follows NONMEM's: the R matrix (Hessian of the objective in the
natural parameters: THETA, OMEGA elements, IOV and SIGMA variances) and the sandwich
``R^-1 S R^-1`` (``S`` from each ID's objective gradient); with exact gradients ``S`` is
theirs and the Hessian their central differences, otherwise both are central differences
of the objective.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sympy as sp
from scipy import optimize

from pkmodel.data import plain_json, validate
from pkmodel.errors import CovariateWarning, PlausibilityWarning
from pkmodel.estimate import ConditionalLikelihood, MAPEstimate, estimate_map
from pkmodel.gradient import fo_gradient, focei_gradient, focei_gradient_unsupported
from pkmodel.model import PopulationModel
from pkmodel.predict import predict
from pkmodel.saem import ImportanceDraws, SAEMOptions, run_saem
from pkmodel.sensitivity import prediction_sensitivities, sensitivities_unsupported

__all__ = ["PopulationFit", "estimate_population", "eta_covariates", "npde",
           "population_objective"]

_FD_STEP = 1e-5  # forward-difference step of the outer gradient, in transformed units
_CENTRAL_STEP, _NEAR = 1e-3, 1.0  # central differences once the gradient is below _NEAR
_COV_STEP = 1e-2  # step of the covariance step, in transformed units
_EXACT_STEP = 1e-3  # step of the differences of exact gradients (covariance step)
#: Times the minimisation goes on from better modes found at its end, and by how much an
#: ID's MAP objective must be lower there.
_RESTARTS, _BETTER_MODES = 3, 1e-3
_INNER_TOL = 1e-14


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class _Layout:
    """Which population parameters are estimated, and their transforms."""

    model: PopulationModel
    thetas: tuple[str, ...]  # estimated THETA names
    omega_pairs: tuple[tuple[int, int], ...]  # estimated OMEGA entries (i >= j)
    sigmas: tuple[str, ...]  # "proportional", "additive" (variances estimated)
    scale: np.ndarray  # THETA scales
    lower: np.ndarray  # THETA bounds (-inf, +inf where none)
    upper: np.ndarray
    iovs: tuple[str, ...] = ()  # KAPPA names whose inter-occasion variance is estimated

    @property
    def names(self) -> list[str]:
        return ([*self.thetas]
                + [f"OMEGA({i + 1},{j + 1})" for i, j in self.omega_pairs]
                + [f"IOV({k})" for k in self.iovs]
                + [f"SIGMA({kind})" for kind in self.sigmas])

    def natural(self, model: PopulationModel) -> np.ndarray:
        """THETAs, OMEGA entries, IOV variances and SIGMA variances of ``model``."""
        residual = model.residual
        return np.concatenate([
            [model.theta[n] for n in self.thetas],
            [model.omega[i, j] for i, j in self.omega_pairs],
            [model.iov[k] for k in self.iovs],
            [getattr(residual, kind) ** 2 for kind in self.sigmas]])

    def model_at(self, values: np.ndarray) -> PopulationModel:
        """The model with the natural parameters ``values``."""
        n_t, n_o, n_i = len(self.thetas), len(self.omega_pairs), len(self.iovs)
        theta = {**self.model.theta, **dict(zip(self.thetas, map(float, values[:n_t])))}
        omega = self.model.omega.copy()
        for (i, j), v in zip(self.omega_pairs, values[n_t:n_t + n_o]):
            omega[i, j] = omega[j, i] = v
        at = n_t + n_o  # the IOV variances' place
        iov = {**self.model.iov, **dict(zip(self.iovs, map(float, values[at:at + n_i])))}
        residual = replace(self.model.residual, **{
            kind: float(math.sqrt(max(v, 0.0)))
            for kind, v in zip(self.sigmas, values[n_t + n_o + n_i:])})
        return replace(self.model, theta=theta, omega=omega, residual=residual, iov=iov)

    def to_x(self, values: np.ndarray) -> np.ndarray:
        """Transformed (unconstrained) coordinates of natural ``values``."""
        n_t, n_o = len(self.thetas), len(self.omega_pairs)
        omega = self.model_at(values).omega
        chol = np.linalg.cholesky(omega[np.ix_(self._free, self._free)])
        position = {k: i for i, k in enumerate(self._free)}
        lower = [np.log(chol[position[i], position[i]]) if i == j
                 else chol[position[i], position[j]] for i, j in self.omega_pairs]
        # IOV and SIGMA variances: half their logarithm (log SDs)
        return np.concatenate([self._theta_to_x(values[:n_t]), lower,
                               0.5 * np.log(values[n_t + n_o:])])

    def _theta_to_x(self, theta: np.ndarray) -> np.ndarray:
        """THETAs to unconstrained units: scaled where free, ``ln(THETA - lower)`` or
        ``ln(upper - THETA)`` with one bound, the logit of its place between two."""
        lo, hi = self.lower, self.upper
        with np.errstate(divide="ignore", invalid="ignore"):
            both = np.log((theta - lo) / (hi - theta))
            return np.where(np.isfinite(lo) & np.isfinite(hi), both,
                            np.where(np.isfinite(lo), np.log(theta - lo),
                                     np.where(np.isfinite(hi), np.log(hi - theta),
                                              theta / self.scale)))

    def _theta_from_x(self, x: np.ndarray) -> np.ndarray:
        lo, hi = self.lower, self.upper
        with np.errstate(over="ignore", invalid="ignore"):
            both = lo + (hi - lo) / (1 + np.exp(-x))
            return np.where(np.isfinite(lo) & np.isfinite(hi), both,
                            np.where(np.isfinite(lo), lo + np.exp(x),
                                     np.where(np.isfinite(hi), hi - np.exp(x),
                                              x * self.scale)))

    def from_x(self, x: np.ndarray) -> np.ndarray:
        """Natural values of transformed ``x``."""
        n_t, n_o = len(self.thetas), len(self.omega_pairs)
        free = self._free
        position = {k: i for i, k in enumerate(free)}
        chol = np.zeros((len(free), len(free)))
        for (i, j), v in zip(self.omega_pairs, x[n_t:n_t + n_o]):
            chol[position[i], position[j]] = np.exp(v) if i == j else v
        omega = chol @ chol.T
        entries = [omega[position[i], position[j]] for i, j in self.omega_pairs]
        return np.concatenate([self._theta_from_x(x[:n_t]), entries,
                               np.exp(2 * x[n_t + n_o:])])

    def jacobian(self, x: np.ndarray) -> np.ndarray:
        """``d natural / d x`` at ``x`` (analytic; square, in :attr:`names` order)."""
        n_t, n_o = len(self.thetas), len(self.omega_pairs)
        out = np.zeros((x.size, x.size))
        lo, hi, xt = self.lower, self.upper, x[:n_t]
        with np.errstate(over="ignore"):
            logistic = 1.0 / (1.0 + np.exp(-xt))
            out[np.arange(n_t), np.arange(n_t)] = np.where(
                np.isfinite(lo) & np.isfinite(hi), (hi - lo) * logistic * (1 - logistic),
                np.where(np.isfinite(lo), np.exp(xt),
                         np.where(np.isfinite(hi), -np.exp(xt), self.scale)))
        free = self._free
        position = {k: i for i, k in enumerate(free)}
        chol = np.zeros((len(free), len(free)))
        for (i, j), v in zip(self.omega_pairs, x[n_t:n_t + n_o]):
            chol[position[i], position[j]] = np.exp(v) if i == j else v
        # OMEGA = L L': d OMEGA_ij / d L_kl = [i = k] L_jl + [j = k] L_il, and a diagonal
        # L_kk = exp(x) adds the factor L_kk.
        for row, (i, j) in enumerate(self.omega_pairs):
            a, b = position[i], position[j]
            for col, (k, l) in enumerate(self.omega_pairs):
                c, d = position[k], position[l]
                value = (a == c) * chol[b, d] + (b == c) * chol[a, d]
                out[n_t + row, n_t + col] = value * (chol[c, d] if c == d else 1.0)
        rest = np.arange(n_t + n_o, x.size)  # IOV and SIGMA variances
        out[rest, rest] = 2 * np.exp(2 * x[n_t + n_o:])
        return out

    @property
    def _free(self) -> list[int]:
        return sorted({i for i, _ in self.omega_pairs})


def _omega_pairs(model: PopulationModel, fix: tuple[str, ...]) -> tuple[tuple[int, int], ...]:
    """The OMEGA entries to estimate: the non-zero pattern (diagonal, blocks) less what
    ``fix`` names; a block is fixed whole or not at all."""
    omega = model.omega
    variances = np.diag(omega)
    pattern = [(i, j) for i in range(len(variances)) for j in range(i + 1)
               if variances[i] > 0 and variances[j] > 0 and (i == j or omega[i, j] != 0)]
    if "OMEGA" in fix:
        return ()
    named = {f"OMEGA({i + 1},{j + 1})": (i, j) for i, j in pattern}
    absent = [f for f in fix if f.startswith("OMEGA(") and f not in named]
    if absent:
        raise ValueError(f"cannot fix {absent}: not parameters of {model.name}'s OMEGA (its "
                         f"estimated entries are {sorted(named)})")
    fixed = {named[f] for f in fix if f in named}
    for i, j in pattern:  # the blocks: ETAs joined by a non-zero covariance
        if i != j:
            block = {(a, b) for a, b in pattern if {a, b} & {i, j}}
            if fixed & block and not block <= fixed:
                entries = sorted(f"OMEGA({a + 1},{b + 1})" for a, b in block)
                raise ValueError(f"fix all of OMEGA's block {entries} or none of it (part "
                                 "of a block cannot be fixed)")
    return tuple(p for p in pattern if p not in fixed)


def _layout(model: PopulationModel, fix: tuple[str, ...],
            bounds: Mapping[str, tuple[float | None, float | None]] | None = None) -> _Layout:
    sigma_names = {f"SIGMA({k})" for k in ("proportional", "additive")}
    n_eta = len(model.eta_names)
    omega_names = {f"OMEGA({i + 1},{j + 1})" for i in range(n_eta) for j in range(i + 1)}
    iov_names = {f"IOV({k})" for k in model.iov}
    names = (set(model.theta) | {"OMEGA", "SIGMA", "IOV"} | sigma_names | omega_names
             | iov_names)
    unknown = [f for f in fix if f not in names]
    if unknown:
        raise ValueError(f"cannot fix {unknown}: expected THETA names of {model.name}, "
                         "'OMEGA' (all of it) or 'OMEGA(i,j)', 'IOV' (all of it) or "
                         "'IOV(KAPPA)', 'SIGMA', 'SIGMA(proportional)' or "
                         "'SIGMA(additive)'")
    thetas = tuple(n for n in model.theta if n not in fix)
    pairs = _omega_pairs(model, fix)
    sigmas = tuple(kind for kind in ("proportional", "additive")
                   if getattr(model.residual, kind) > 0 and f"SIGMA({kind})" not in fix
                   and "SIGMA" not in fix)
    scale = np.array([abs(model.theta[n]) or 1.0 for n in thetas])
    lower, upper = _bounds(model, thetas, bounds or {})
    iovs = tuple(k for k, v in model.iov.items()
                 if v > 0 and "IOV" not in fix and f"IOV({k})" not in fix)
    layout = _Layout(model, thetas, pairs, sigmas, scale, lower, upper, iovs)
    if not layout.names:
        raise ValueError("every parameter is fixed: nothing to estimate "
                         "(population_objective gives the objective)")
    start = layout.natural(model)
    try:
        round_trip = layout.from_x(layout.to_x(start))
    except np.linalg.LinAlgError:
        raise ValueError("the initial OMEGA is not positive definite: each ETA needs a "
                         "positive variance, and each block correlations below 1") from None
    if not np.allclose(round_trip, start, rtol=1e-10, atol=1e-14):
        raise ValueError("OMEGA's non-zero entries do not form blocks (each block full "
                         "within itself, as NONMEM's BLOCK): give the covariances of a "
                         "block a non-zero start")
    return layout


def _bounds(model: PopulationModel, thetas: tuple[str, ...],
            bounds: Mapping[str, tuple[float | None, float | None]]
            ) -> tuple[np.ndarray, np.ndarray]:
    unknown = sorted(set(bounds) - set(model.theta))
    if unknown:
        raise ValueError(f"`bounds` names {unknown}, which are not THETAs of {model.name}")
    fixed = sorted(set(bounds) - set(thetas))
    if fixed:
        raise ValueError(f"`bounds` names {fixed}, which are fixed: a fixed THETA keeps its "
                         "value, so bounds on it would be ignored")
    for name, pair in bounds.items():
        if (not isinstance(pair, (tuple, list)) or len(pair) != 2 or any(
                v is not None and not isinstance(v, numbers.Real) for v in pair)):
            raise ValueError(f"`bounds` of {name} must be a pair (low, high) of numbers or "
                             f"None; got {pair!r}")
    lower, upper = np.full(len(thetas), -np.inf), np.full(len(thetas), np.inf)
    for k, name in enumerate(thetas):
        low, high = bounds.get(name, (None, None))
        lower[k] = -np.inf if low is None else float(low)
        upper[k] = np.inf if high is None else float(high)
        if not lower[k] < model.theta[name] < upper[k]:
            raise ValueError(f"{name}'s initial value {model.theta[name]} must lie strictly "
                             f"between its bounds ({lower[k]}, {upper[k]})")
    return lower, upper


# --------------------------------------------------------------------------- objective


def population_objective(model: PopulationModel, data: pd.DataFrame, *,
                         method: str = "foce-i", covariates: str = "nocb") -> float:
    """The objective (NONMEM's OFV, without the ``N ln 2 pi`` constant) of the population
    parameters of ``model`` on ``data``.

    ``"foce-i"``: the sum of every ID's OBJ at its conditional mode. ``"foce"``: the same
    with the residual variance at the prediction with ETAs 0 (no interaction), at the
    modes of that objective. ``"fo"``: ``sum_i [ln det C_i + e_i' C_i^-1 e_i]`` with ``e_i``
    the residuals of the ETA-0 prediction and ``C_i = G OMEGA G' + R`` there. ``"imp"``:
    the exact ``-2 ln L`` by importance sampling (NONMEM's ``METHOD=IMP EONLY=1``; seeded,
    see :func:`~pkmodel.saem.importance_sampling`), the objective SAEM's estimates are
    compared by.

    Examples
    --------
    >>> from pkmodel.data import infliximab_regimen
    >>> from pkmodel.models import load
    >>> table = infliximab_regimen(28.0, until_week=22,
    ...                            covariates={"ALB": 3.3, "ATI": 0, "IMM": 1})
    >>> table.loc[(table.EVID == 0) & (table.TIME == 98.0), ["MDV", "DV"]] = [0, 3.2]
    >>> round(population_objective(load("fasanmade2011"), table), 3)
    2.771
    """
    if method == "imp":
        from pkmodel.saem import importance_sampling
        return importance_sampling(model, data, covariates=covariates).ofv
    _check_method(method, METHODS)
    if method == "fo":
        return _first_order(model, validate(data, covariates=model.covariate_names),
                            covariates)
    fit = estimate_map(model, data, covariates=covariates, tol=_INNER_TOL,
                       interaction=method == "foce-i")
    return float(fit.individuals["OBJ"].sum()) if fit.success else math.inf


METHODS = ("foce-i", "foce", "fo")


def _check_method(method: str, allowed: tuple[str, ...]) -> None:
    if method not in allowed:
        raise ValueError(f"`method` must be one of {allowed}; got {method!r}")


def _linearisation(model: PopulationModel, table: pd.DataFrame, eta: np.ndarray,
                   covariates: str = "nocb") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: the prediction at ``eta (IDs, n_eta)``, its derivatives ``G`` with respect
    to the ETAs (central differences, step 1e-5) and the residual variance there."""
    ids = pd.unique(table["ID"])

    def at(e: np.ndarray) -> np.ndarray:
        frame = pd.DataFrame(e, columns=list(model.eta_names)).assign(ID=ids)
        return predict(model, table, frame, covariates=covariates)["IPRED"].to_numpy()

    f = at(eta)
    steps = []
    for k in range(eta.shape[1]):
        shift = np.zeros_like(eta)
        shift[:, k] = 1e-5
        steps.append((at(eta + shift) - at(eta - shift)) / 2e-5)
    return f, np.stack(steps, axis=1), model.residual.sd(f) ** 2


def _censored(table: pd.DataFrame) -> np.ndarray:
    """Measured records below their LLOQ or above their ULOQ."""
    out = np.zeros(len(table), dtype=bool)
    dv = table["DV"].to_numpy(dtype=float)
    with np.errstate(invalid="ignore"):
        if "LLOQ" in table.columns:
            out |= dv < table["LLOQ"].to_numpy(dtype=float)
        if "ULOQ" in table.columns:
            out |= dv > table["ULOQ"].to_numpy(dtype=float)
    measured = ((table["EVID"] == 0) & (table["MDV"] == 0)).to_numpy()
    return out & measured


def _first_order(model: PopulationModel, table: pd.DataFrame,
                 covariates: str = "nocb") -> float:
    """NONMEM's FO objective: ``sum_i [ln det C_i + e_i' C_i^-1 e_i]`` at ETA 0."""
    return float(_first_order_terms(model, table, covariates).sum())


def _first_order_supported(model: PopulationModel, table: pd.DataFrame) -> None:
    if model.residual.log_scale or model.iov or _censored(table).any():
        raise ValueError("FO is implemented without IOV, censored records (LLOQ, ULOQ) and "
                         "log-additive error; use 'foce-i' (or 'foce') for this model")


def _first_order_terms(model: PopulationModel, table: pd.DataFrame,
                       covariates: str = "nocb") -> np.ndarray:
    """Each ID's FO objective ``ln det C_i + e_i' C_i^-1 e_i`` (inf where C_i is not
    positive definite)."""
    _first_order_supported(model, table)
    ids = pd.unique(table["ID"])
    zero = np.zeros((len(ids), len(model.eta_names)))
    if sensitivities_unsupported(model, table) is None:  # the exact G at the observations
        s = prediction_sensitivities(model, table, zero, covariates=covariates)
        f, grad = np.zeros(len(table)), np.zeros((len(table), zero.shape[1]))
        f[s.rows[s.mask]], grad[s.rows[s.mask]] = s.value[s.mask], s.eta[s.mask]
        variance = model.residual.sd(f) ** 2
    else:
        f, grad, variance = _linearisation(model, table, zero, covariates)
    used = ((table["EVID"] == 0) & (table["MDV"] == 0)).to_numpy()
    row_ids, dv = table["ID"].to_numpy(), table["DV"].to_numpy(dtype=float)
    out = np.zeros(len(ids))
    for b, ident in enumerate(ids):
        rows = np.flatnonzero((row_ids == ident) & used)
        if rows.size == 0:
            continue
        g = grad[rows]
        cov = g @ model.omega @ g.T + np.diag(variance[rows])
        e = dv[rows] - f[rows]
        sign, logdet = np.linalg.slogdet(cov)
        out[b] = logdet + e @ np.linalg.solve(cov, e) if sign > 0 else math.inf
    return out


def _fit_part(job: tuple) -> pd.DataFrame | None:
    """The MAP fits of some IDs (module level, so process and Dask executors can run
    it): their ``individuals``, or None when one fails."""
    model, data, covariates, warm, interaction = job
    try:
        with warnings.catch_warnings():  # said once, at the final estimates
            warnings.simplefilter("ignore", PlausibilityWarning)
            warnings.simplefilter("ignore", CovariateWarning)
            fit = estimate_map(model, data, covariates=covariates, starts=1, tol=_INNER_TOL,
                               initial=warm, interaction=interaction, records=False)
    except (ValueError, np.linalg.LinAlgError):
        return None
    return fit.individuals if fit.success else None


class _Objective:
    """The objective of natural parameter vectors; for FOCE-I and FOCE the inner modes are
    warm started from the last accepted point."""

    def __init__(self, layout: _Layout, data: pd.DataFrame, covariates: str,
                 method: str = "foce-i", executor: Executor | None = None,
                 chunks: int = 1) -> None:
        self.layout, self.data, self.covariates = layout, data, covariates
        self.method = method
        self.warm: pd.DataFrame | None = None
        self.evaluations = 0
        self.executor = executor
        ids = pd.unique(data["ID"])
        groups = np.array_split(ids, max(1, min(chunks, len(ids)))) if executor else [ids]
        self.parts = [data[data["ID"].isin(g)] for g in groups]
        #: None when the gradient is exact, else why it is taken by differences.
        self.inexact: str | None = focei_gradient_unsupported(layout.model, data)
        self._last: tuple[bytes, pd.DataFrame | None, pd.DataFrame | None] | None = None

    def fit(self, values: np.ndarray, warm: pd.DataFrame | None) -> pd.DataFrame | None:
        """Every ID's MAP fit at ``values`` (its ``individuals``; None where one fails),
        the IDs in parts on the executor when there is one; the last point's are kept
        (the optimiser asks for the objective and then the gradient at the same point)."""
        key = np.asarray(values, dtype=float).tobytes()
        if self._last is not None and self._last[0] == key and self._last[1] is warm:
            return self._last[2]
        result = self._fit(values, warm)
        self._last = (key, warm, result)
        return result

    def _fit(self, values: np.ndarray, warm: pd.DataFrame | None) -> pd.DataFrame | None:
        self.evaluations += 1
        if not np.isfinite(values).all():
            return None
        try:  # a line search may try values no model takes (an overflowed OMEGA)
            model = self.layout.model_at(values)
        except ValueError:
            return None
        jobs = [(model, part, self.covariates, warm, self.method == "foce-i")
                for part in self.parts]
        results = (list(self.executor.map(_fit_part, jobs)) if self.executor is not None
                   else [_fit_part(job) for job in jobs])
        if any(r is None for r in results):
            return None
        return pd.concat(results) if len(results) > 1 else results[0]

    def per_id(self, values: np.ndarray) -> np.ndarray | None:
        """Each ID's objective at ``values`` (None where it cannot be evaluated)."""
        if self.method == "fo":
            self.evaluations += 1
            try:
                out = _first_order_terms(self.layout.model_at(values), self.data,
                                         self.covariates)
            except (ValueError, np.linalg.LinAlgError):
                return None
            return out if np.isfinite(out).all() else None
        fit = self.fit(values, self.warm)
        return None if fit is None else fit["OBJ"].to_numpy(dtype=float)

    def at_x(self, x: np.ndarray) -> float:
        values = self.per_id(self.layout.from_x(x))
        return math.inf if values is None else float(values.sum())

    def id_gradients(self, values: np.ndarray, fit: pd.DataFrame | None) -> np.ndarray:
        """Each ID's exact gradient in the natural parameters ``(B, m)`` at ``values``,
        whose conditional modes ``fit`` holds (:mod:`pkmodel.gradient`; FO needs none)."""
        model = self.layout.model_at(values)
        if self.method == "fo":
            return fo_gradient(model, self.data, thetas=self.layout.thetas,
                               omega_pairs=self.layout.omega_pairs,
                               sigmas=self.layout.sigmas, covariates=self.covariates)
        assert fit is not None
        ids = pd.unique(self.data["ID"])
        eta = fit.loc[ids, list(model.eta_names)].to_numpy(dtype=float)
        return focei_gradient(model, self.data, eta, thetas=self.layout.thetas,
                              omega_pairs=self.layout.omega_pairs,
                              sigmas=self.layout.sigmas,
                              interaction=self.method == "foce-i",
                              covariates=self.covariates)

    def accept(self, x: np.ndarray) -> None:
        """Warm start later inner fits from the modes at ``x``, an accepted iterate: not
        from a line search's trial points, whose modes, far off, could lead back to
        another (worse) local mode at the same parameters and make the objective depend
        on the search's path (a BFGS stop for "precision loss" at the start, on troughs
        with records below the LLOQ)."""
        if self.method != "fo":
            fit = self.fit(self.layout.from_x(x), self.warm)
            if fit is not None:
                self.warm = fit

    def gradient(self, x: np.ndarray) -> np.ndarray:
        """The exact gradient (:mod:`pkmodel.gradient`) where it applies, the inner modes
        warm started from the last accepted iterate's; else differences of the
        objective."""
        if self.inexact is None:
            values = self.layout.from_x(x)
            centre = None
            if self.method != "fo":
                centre = self.fit(values, self.warm)
                if centre is None:
                    return np.full_like(x, np.nan)
            try:
                per_id = self.id_gradients(values, centre)
            except np.linalg.LinAlgError:  # a singular inner Hessian: differences
                return self.difference_gradient(x)
            grad = self.layout.jacobian(x).T @ per_id.sum(axis=0)
            # Not finite (a degenerate structure, Q = 0 say): differences at this point.
            return grad if np.isfinite(grad).all() else self.difference_gradient(x)
        return self.difference_gradient(x)

    def difference_gradient(self, x: np.ndarray) -> np.ndarray:
        """Forward differences, the inner modes warm started at ``x``'s (converged to 1e-14
        in OFV); once the gradient is below _NEAR, central ones, whose accuracy BFGS needs
        near the optimum (with a threshold of 0.05 the forward differences' O(h) bias
        stalled the Bauer 504 and theophylline fits)."""
        accepted = self.warm
        if self.method != "fo":
            centre = self.fit(self.layout.from_x(x), self.warm)
            if centre is None:
                return np.full_like(x, np.nan)
            self.warm = centre  # the differences start from x's own modes
            base = float(centre["OBJ"].sum())
        else:
            base = self.at_x(x)
        grad = np.zeros_like(x)
        for k in range(x.size):
            step = np.zeros_like(x)
            step[k] = _FD_STEP
            grad[k] = (self.at_x(x + step) - base) / _FD_STEP
        if np.max(np.abs(grad)) < _NEAR:  # near the optimum: central, free of the O(h) bias
            for k in range(x.size):
                step = np.zeros_like(x)
                step[k] = _CENTRAL_STEP
                grad[k] = (self.at_x(x + step) - self.at_x(x - step)) / (2 * _CENTRAL_STEP)
        self.warm = accepted
        return grad


# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class PopulationFit:
    """A population fit: estimates, their uncertainty, and per-ID and per-record
    diagnostics.

    Attributes
    ----------
    model : PopulationModel
        The model at the final estimates.
    method : str
    ofv : float
        Final objective (NONMEM's OFV convention: without ``N_obs ln 2 pi``).
    success : bool
    status : str
        ``"minimization successful"`` or ``"minimization terminated: <reason>"``.
    estimates : DataFrame
        One row per population parameter: NAME, KIND (THETA, OMEGA, IOV, SIGMA), ESTIMATE,
        INITIAL, FIXED, SE, RSE (%), SE_R (from the R matrix alone).
    covariance : ndarray or None
        Sandwich covariance of the estimated parameters (natural units), None when the
        covariance step failed.
    covariance_status : str
    condition_number : float
        Of the correlation matrix.
    individuals : DataFrame
        Per ID: ETAs, ETC, OBJ, ... (:class:`~pkmodel.estimate.MAPEstimate` at the final
        estimates).
    shrinkage : dict
        ETA shrinkage (SD-based, ``1 - SD(ETA) / sqrt(OMEGA)``) per ETA.
    records : DataFrame
        Every record with PRED, IPRED, RES, IWRES, WRES and CWRES on observations (NaN on
        censored ones; WRES and CWRES linearise the ETAs, not IOV's KAPPAs).
    history : DataFrame
        ITERATION, OFV and the natural parameters at each outer iteration.
    evaluations : int
        Objective evaluations (each a MAP fit of every ID for FOCE-I and FOCE).
    notes : tuple of str
        THETA estimates at or near a bound, variances (OMEGA, IOV) shrunk to about 0.
    gradient : str
        How the outer gradient was taken: ``"exact"`` (:mod:`pkmodel.gradient`) or
        ``"differences: <why the exact one does not apply>"``.
    """

    model: PopulationModel
    method: str
    ofv: float
    success: bool
    status: str
    estimates: pd.DataFrame
    covariance: np.ndarray | None
    covariance_status: str
    condition_number: float
    individuals: pd.DataFrame
    shrinkage: dict[str, float]
    records: pd.DataFrame
    history: pd.DataFrame
    evaluations: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)
    gradient: str = "exact"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready summary (estimates, objective, status, shrinkage)."""
        return plain_json({
            "method": self.method, "ofv": self.ofv, "success": self.success,
            "status": self.status, "covariance_status": self.covariance_status,
            "condition_number": self.condition_number,
            "estimates": self.estimates.to_dict(orient="records"),
            "shrinkage": self.shrinkage, "notes": list(self.notes),
            "evaluations": self.evaluations, "gradient": self.gradient,
            "history": self.history.to_dict(orient="records")})

    def to_nonmem(self, folder: str | os.PathLike[str], name: str = "run") -> list[Path]:
        """Write NONMEM-style ``.ext`` (final estimates, ITERATION -1000000000, and SEs,
        -1000000001), ``.phi`` (ETAs, ETC, OBJ per ID), ``.cov`` (covariance of the
        estimates) and a ``.tab`` table (ID, TIME, DV, PRED, IPRED, RES, IWRES, WRES,
        CWRES), whitespace-separated as NONMEM writes them, for tools that read those.

        Returns
        -------
        list of Path
            The files written.
        """
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        head = "TABLE NO.     1: " + {
            "foce-i": "First Order Conditional Estimation with Interaction",
            "foce": "First Order Conditional Estimation", "fo": "First Order",
            "saem": "Stochastic Approximation Expectation-Maximization"}[self.method]
        est = self.estimates
        fixed = est["FIXED"].astype(bool).to_numpy()
        labels = _nonmem_labels(list(est["NAME"]))
        rows = [[-1000000000, *est["ESTIMATE"], self.ofv]]
        if self.covariance is not None:  # NONMEM writes SEs only after a covariance step
            rows.append([-1000000001, *np.where(fixed, 1e10, est["SE"].fillna(0.0)), 0.0])
        ext = pd.DataFrame(rows, columns=["ITERATION", *labels, "OBJ"])
        files = [out / f"{name}.ext", out / f"{name}.phi", out / f"{name}.cov",
                 out / f"{name}.tab"]
        _write_table(files[0], head, ext)
        ind = self.individuals
        phi_cols = ["ID", *self.model.eta_names,
                    *[c for c in ind.columns if c.startswith("ETC_")], "OBJ"]
        phi = ind[phi_cols].rename(columns=lambda c: c.replace("ETC_", "ETC(").replace(
            "_", ",") + ")" if c.startswith("ETC_") else c)
        phi.insert(0, "SUBJECT_NO", np.arange(1, len(phi) + 1))
        _write_table(files[1], head, phi)
        free = [lab for lab, f in zip(labels, fixed) if not f]
        cov = self.covariance if self.covariance is not None else np.zeros((len(free),) * 2)
        frame = pd.DataFrame(cov, columns=free)
        frame.insert(0, "NAME", free)
        _write_table(files[2], head, frame)
        columns = [c for c in ("ID", "TIME", "DV", "PRED", "IPRED", "RES", "IWRES", "WRES",
                               "CWRES") if c in self.records.columns]
        _write_table(files[3], "TABLE NO.  1", self.records[columns].fillna(0.0))
        return files

    def summary(self) -> str:
        """The estimates as a text table."""
        table = self.estimates[["NAME", "ESTIMATE", "SE", "RSE"]].to_string(
            index=False, float_format=lambda v: f"{v:.6g}")
        return (f"{self.method.upper()}: {self.status}; OFV {self.ofv:.4f}\n{table}\n"
                f"covariance step: {self.covariance_status}\ngradient: {self.gradient}")


def _nonmem_labels(names: list[str]) -> list[str]:
    """NONMEM's column labels: THETA and OMEGA names stay, SIGMA(kind) becomes SIGMA(k,k)
    numbered in order (the proportional part first when both are there)."""
    out, k = [], 0
    for name in names:
        if name.startswith("SIGMA("):
            k += 1
            out.append(f"SIGMA({k},{k})")
        else:
            out.append(name)
    return out


def _write_table(path: Path, title: str, frame: pd.DataFrame) -> None:
    """NONMEM's layout: a title line, a header line, right-aligned E-format numbers."""
    def cell(value: Any, column: str) -> str:
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return f"{value:>13d}"
        try:
            if column == "OBJ":  # NONMEM writes the objective with all its digits
                return f"  {float(value):.17g}"
            return f"{float(value):>13.5E}"
        except (TypeError, ValueError):
            return f"{value!s:>13}"
    columns = list(frame.columns)
    lines = [title, "".join(f" {c:<12}" for c in columns)]
    lines += ["".join(cell(v, c) for v, c in zip(row, columns))
              for row in frame.itertuples(index=False)]
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- estimation


def estimate_population(
    model: PopulationModel,
    data: pd.DataFrame,
    *,
    method: str = "foce-i",
    fix: tuple[str, ...] = (),
    bounds: Mapping[str, tuple[float | None, float | None]] | None = None,
    covariance: bool = True,
    covariates: str = "nocb",
    max_iter: int = 200,
    gtol: float = 1e-3,
    progress: Callable[[int, float], None] | None = None,
    executor: Executor | None = None,
    chunks: int = 4,
    saem: SAEMOptions | None = None,
) -> PopulationFit:
    """Estimate THETA, OMEGA and SIGMA from a population's data by FOCE-I (or FOCE, FO,
    SAEM).

    Parameters
    ----------
    model : PopulationModel
        The structure, equations and initial values: its THETAs, OMEGA (the pattern of
        non-zero entries is kept: diagonal or blocks; variances of 0 stay fixed) and
        residual SDs.
    data : DataFrame
        NONMEM-style records of every ID.
    method : {"foce-i", "foce", "fo", "saem"}
        NONMEM's ``METHOD=1 INTERACTION``, ``METHOD=1`` or ``METHOD=0`` (see
        :func:`population_objective`), or SAEM (:mod:`pkmodel.saem`; its OFV is the
        importance-sampling ``-2 ln L``, whose derivatives, with fixed draws, give its
        covariance step). The conditional modes reported are FOCE-I's (FOCE's for
        ``"foce"``).
    fix : tuple of str
        Parameters kept at their initial value: THETA names, ``"OMEGA"`` (all of it) or
        entries ``"OMEGA(i,j)"`` (a block whole), ``"IOV"`` (all of it) or
        ``"IOV(KAPPA_CL)"`` (an inter-occasion variance, NONMEM's ``$OMEGA BLOCK(1)`` with
        ``SAME`` for each occasion), ``"SIGMA"`` or ``"SIGMA(proportional)"`` /
        ``"SIGMA(additive)"``. Inter-occasion variances are estimated unless fixed.
    bounds : mapping of str to (float or None, float or None), optional
        Lower and upper bounds of THETAs (NONMEM's ``$THETA (low, init, up)``; None for
        none); the initial value must lie strictly inside. An estimate that ends within
        0.1 % of the range (or 1e-6 of the value) from a bound is said in ``notes``.
    covariance : bool
        Run the covariance step (sandwich and R matrix).
    max_iter : int
        Outer iterations.
    gtol : float
        Stop when the gradient's largest component (in transformed units) is below this.
    progress : callable, optional
        Called with the iteration number and the objective after each outer iteration
        (SAEM: after each iteration, with the chains' summed ``-2 ln p(y | ETA)``, which
        is not an objective to compare).
    executor : concurrent.futures.Executor, optional
        Where the IDs' inner fits run, in ``chunks`` parts of IDs per evaluation (a process
        pool, or a Dask ``Client.get_executor()``); the estimates do not depend on it.
    chunks : int
        Parts the IDs are split into on the executor.
    saem : SAEMOptions, optional
        Iterations, chains and seed of SAEM (``method="saem"``).

    Returns
    -------
    PopulationFit
        Never raises on a failed minimisation: ``success`` and ``status`` say what
        happened.
    """
    _check_method(method, (*METHODS, "saem"))
    table = validate(data, covariates=model.covariate_names)
    layout = _layout(model, tuple(fix), bounds)
    inert = _inert_thetas(layout, table, covariates)
    if inert:
        raise ValueError(
            f"{inert} change no prediction on any record of these data (a covariate effect "
            "whose covariate never varies from its reference, ATI = 0 in every record say, "
            "or a dose modifier no dose uses): the data cannot estimate them; fix them (fix="
            f"{tuple(inert)!r}) or drop them from the model")
    if method == "fo":  # said now, not as an objective that cannot be evaluated
        _first_order_supported(model, table)
    if method == "saem":
        return _saem_fit(layout, table, covariates, saem or SAEMOptions(), progress,
                         covariance)
    objective = _Objective(layout, table, covariates, method, executor, chunks)
    start = layout.natural(model)
    x0 = layout.to_x(start)
    history: list[dict[str, Any]] = []

    def record(x: np.ndarray) -> None:
        objective.accept(x)
        values = layout.from_x(x)
        history.append({"ITERATION": len(history), "OFV": objective.at_x(x),
                        **dict(zip(layout.names, values))})
        if progress is not None:
            progress(history[-1]["ITERATION"], history[-1]["OFV"])

    if method != "fo":  # from ETAs 0, NONMEM's start (the modes are checked at the end)
        objective.warm = objective.fit(start, None)
    if objective.per_id(start) is None:
        raise ValueError("the objective cannot be evaluated at the initial values (an ID's "
                         "MAP fit fails): check the data and the initial estimates")
    record(x0)

    def minimise(x: np.ndarray) -> optimize.OptimizeResult:
        # The first step: of length about 1 in the transformed coordinates (BFGS would take
        # the whole gradient, thousands of units from a poor start, and overflow).
        g0 = objective.gradient(x)
        scale = 1.0 / max(1.0, float(np.linalg.norm(g0))) if np.isfinite(g0).all() else 1e-3
        return optimize.minimize(objective.at_x, x, jac=objective.gradient, method="BFGS",
                                 callback=record,
                                 options={"gtol": gtol, "maxiter": max_iter,
                                          "hess_inv0": np.eye(x.size) * scale})

    result = minimise(x0)
    for restart in range(_RESTARTS + 1):
        # The conditional modes (POSTHOC) from several starts: where an ID's mode beats
        # the one the minimisation followed (warm started, it can stay in a local mode of
        # the MAP objective), the minimisation goes on from them, so that each ID's
        # contribution is taken at its conditional mode whatever path led there.
        final_values = layout.from_x(result.x)
        final_model = layout.model_at(final_values)
        with warnings.catch_warnings(record=True) as said:  # the last fit's, said once
            warnings.simplefilter("always")
            fit = _best_modes(final_model, table, covariates, objective.warm,
                              method != "foce", records=True)
        followed = objective.fit(final_values, objective.warm) if method != "fo" else None
        if followed is None or restart == _RESTARTS or not fit.success or not (
                fit.individuals["OFV"].to_numpy() < followed["OFV"].to_numpy()
                - _BETTER_MODES).any():
            break
        objective.warm = fit.individuals
        result = minimise(result.x)
    for item in said:
        warnings.warn(item.message, item.category, stacklevel=2)
    final_terms = objective.per_id(final_values)
    ofv = float(final_terms.sum()) if final_terms is not None else math.inf
    converged = bool(result.success or np.max(np.abs(result.jac)) < 10 * gtol)
    success = converged and fit.success and final_terms is not None
    status = ("minimization successful" if success else
              f"minimization terminated: {result.message}" if not converged else
              "minimization terminated: the conditional modes at the estimates failed "
              f"({fit.individuals.loc[~fit.individuals['SUCCESS'], 'MESSAGE'].head(1).tolist()})")
    cov, r_only, cov_status = (_covariance(objective, layout, final_values, fit)
                               if covariance and success else
                               (None, None, "not run" if not covariance
                                else "not run: the minimization failed"))
    return PopulationFit(
        model=final_model, method=method, ofv=ofv, success=success, status=status,
        estimates=_estimates(layout, start, final_values, model, fix, cov, r_only),
        covariance=cov, covariance_status=cov_status,
        condition_number=_condition(cov), individuals=fit.individuals,
        shrinkage=_shrinkage(final_model, fit),
        records=_residuals(final_model, table, fit, covariates),
        history=pd.DataFrame(history), evaluations=objective.evaluations,
        notes=_at_bounds(layout, final_values),
        gradient=("exact" if objective.inexact is None
                  else f"differences: {objective.inexact}"))


def _inert_thetas(layout: _Layout, table: pd.DataFrame, covariates: str) -> list[str]:
    """The estimated THETAs that move no prediction of any record: moved by 1 % (0.01 from
    0), every PRED and IPRED stays exactly what it was, with ETAs 0 and with ETAs 0.3 (a
    THETA may scale an ETA: an SD, a Box-Cox shape). THETAs that enter only through terms
    with a KAPPA (gone when the KAPPAs are 0) are left alone: predictions are made with
    KAPPAs 0."""
    model = layout.model
    zero = {sp.Symbol(k): 0 for k in model.kappa_names}
    present = {str(v) for e in model.parameters.values() for v in e.free_symbols}
    without_kappas = {str(v) for e in model.parameters.values()
                      for v in e.xreplace(zero).free_symbols}
    with_kappa = present - without_kappas
    ids = pd.unique(table["ID"])
    etas = [np.zeros((len(ids), len(model.eta_names))),
            np.full((len(ids), len(model.eta_names)), 0.3)]

    def predictions(m: PopulationModel) -> list[np.ndarray]:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            return [predict(m, table, e, covariates=covariates)[["PRED", "IPRED"]].to_numpy()
                    for e in etas]

    base = predictions(model)
    out = []
    for name in layout.thetas:
        if name in with_kappa:
            continue
        value = model.theta[name]
        moved = predictions(model.with_values({name: value * 1.01 if value else 0.01}))
        if all(np.array_equal(a, b, equal_nan=True) for a, b in zip(base, moved)):
            out.append(name)
    return out


def _best_modes(model: PopulationModel, table: pd.DataFrame, covariates: str,
                warm: pd.DataFrame | None, interaction: bool,
                records: bool = False) -> MAPEstimate:
    """Every ID's conditional mode from several starts (``warm``'s modes first): the
    POSTHOC step, and the check that the modes a minimisation followed are the best."""
    with warnings.catch_warnings():  # said at the final estimates
        if not records:
            warnings.simplefilter("ignore", PlausibilityWarning)
            warnings.simplefilter("ignore", CovariateWarning)
        return estimate_map(model, table, covariates=covariates, tol=_INNER_TOL,
                            initial=warm, interaction=interaction, records=records)


def _at_bounds(layout: _Layout, values: np.ndarray) -> tuple[str, ...]:
    """A note per THETA estimate that ended at one of its bounds, and per variance (OMEGA,
    IOV) that ended near 0, below 1e-4 of its initial value."""
    out = []
    for name, v, lo, hi in zip(layout.thetas, values, layout.lower, layout.upper):
        span = hi - lo if np.isfinite(hi - lo) else abs(v)
        for bound, side in ((lo, "lower"), (hi, "upper")):
            if np.isfinite(bound) and abs(v - bound) <= max(1e-3 * span, 1e-6 * abs(v)):
                out.append(f"{name} = {v:.6g} is at its {side} bound {bound:g}: the data "
                           "may want it beyond; the SE there is not to be trusted")
    start = layout.natural(layout.model)
    for name, v, v0 in zip(layout.names, values, start):
        variance = name.startswith("IOV(") or (
            name.startswith("OMEGA(") and name.split(",")[0][6:] == name.split(",")[1][:-1])
        if variance and v < 1e-4 * v0:
            out.append(f"{name} = {v:.3g} has shrunk to about 0 (from {v0:.3g}): the data "
                       "do not support this variability; fix it at 0 or remove it (its "
                       "SE, at a boundary, is not to be trusted)")
    return tuple(out)


class _SampledObjective:
    """Each ID's importance-sampling ``-2 ln L`` at natural parameter vectors, always with
    the same draws, so that it is smooth in the parameters (for the covariance step)."""

    def __init__(self, layout: _Layout, table: pd.DataFrame, draws: ImportanceDraws,
                 covariates: str) -> None:
        self.layout, self.draws = layout, draws
        self.density = ConditionalLikelihood(layout.model, table, covariates=covariates)
        self.warm: pd.DataFrame | None = None  # as _Objective's; no inner fits here

    def terms(self, values: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Per-ID ``-2 ln p(y_i)`` and Monte-Carlo SEs (None where not computable)."""
        try:
            model = self.layout.model_at(values)
        except ValueError:
            return None, None
        if np.linalg.eigvalsh(model.omega).min() <= 0:
            return None, None
        obj, se = self.draws.objective(self.density.at(model))
        return (obj, se) if np.isfinite(obj).all() else (None, None)

    def per_id(self, values: np.ndarray) -> np.ndarray | None:
        return self.terms(values)[0]


def _saem_fit(layout: _Layout, table: pd.DataFrame, covariates: str, options: SAEMOptions,
              progress: Callable[[int, float], None] | None,
              covariance: bool) -> PopulationFit:
    """SAEM's estimates; the importance-sampling ``-2 ln L`` as OFV (proposals from the
    chains' conditional means and covariances); FOCE-I's modes for the diagnostics."""
    model = layout.model
    run = run_saem(model, table, thetas=layout.thetas, omega=layout.omega_pairs,
                   sigmas=layout.sigmas, options=options, covariates=covariates,
                   progress=progress, bounds={n: (lo, hi) for n, lo, hi in zip(
                       layout.thetas, layout.lower, layout.upper)})
    final = run.model
    try:
        draws = ImportanceDraws.around(run.mean, run.covariance, samples=options.samples,
                                       seed=options.seed)
        sampled: _SampledObjective | None = _SampledObjective(layout, table, draws,
                                                              covariates)
    except np.linalg.LinAlgError:
        sampled = None
    fit = estimate_map(final, table, covariates=covariates, tol=_INNER_TOL)
    terms, se_terms = (sampled.terms(layout.natural(final)) if sampled is not None
                       else (None, None))
    ofv = float(terms.sum()) if terms is not None else math.inf
    success = not run.drift and math.isfinite(ofv) and fit.success
    status = ("stochastic approximation completed" if success else
              f"minimization terminated: {run.drift}" if run.drift else
              "minimization terminated: the likelihood at the estimates is not finite"
              if not math.isfinite(ofv) else
              "stochastic approximation completed, but the FOCE-I conditional modes at its "
              "estimates (the diagnostics) failed")
    se = float(np.sqrt((se_terms**2).sum())) if se_terms is not None else math.nan
    notes = ((f"OFV is the importance-sampling -2 ln L ({options.samples} samples per ID, "
              f"seed {options.seed}; Monte-Carlo SE {se:.3f}, of the OFV only, not of "
              "the estimates)"),
             (f"SAEM: {options.burn_in} burn-in and {options.iterations} main iterations, "
              f"{options.chains} chains per ID; centred ETAs {list(run.centred)}"),
             *_at_bounds(layout, layout.natural(final)))
    cov, r_only, cov_status = (None, None, "not run" if not covariance else
                               "not run: the estimation failed")
    if covariance and success and sampled is not None:
        cov, r_only, cov_status = _covariance(sampled, layout, layout.natural(final), fit)
        cov_status = cov_status.replace("of the objective)", "of the importance-sampling "
                                        "-2 ln L, common random numbers)")
    return PopulationFit(
        model=final, method="saem", ofv=ofv, success=success, status=status,
        estimates=_estimates(layout, layout.natural(model), layout.natural(final), model,
                             (), cov, r_only),
        covariance=cov, covariance_status=cov_status,
        condition_number=_condition(cov), individuals=fit.individuals,
        shrinkage=_shrinkage(final, fit), records=_residuals(final, table, fit, covariates),
        history=run.history, notes=notes,
        gradient="none: SAEM's steps are stochastic approximations, not gradient steps")


def _estimates(layout: _Layout, start: np.ndarray, final: np.ndarray,
               model: PopulationModel, fix: tuple[str, ...], cov: np.ndarray | None,
               r_only: np.ndarray | None) -> pd.DataFrame:
    """Every parameter in NONMEM's order (THETA, OMEGA, IOV, SIGMA), the fixed ones
    included with FIXED True and no SE."""
    se = np.sqrt(np.diag(cov)) if cov is not None else np.full(final.size, np.nan)
    se_r = np.sqrt(np.diag(r_only)) if r_only is not None else np.full(final.size, np.nan)
    estimated = {name: (v, s0, e, r) for name, v, s0, e, r in
                 zip(layout.names, final, start, se, se_r)}
    rows = []

    def add(name: str, kind: str, value: float) -> None:
        if name in estimated:
            v, s0, e, r = estimated[name]
            rows.append({"NAME": name, "KIND": kind, "ESTIMATE": v, "INITIAL": s0,
                         "FIXED": False, "SE": e, "RSE": 100 * e / abs(v) if v else np.nan,
                         "SE_R": r})
        else:
            rows.append({"NAME": name, "KIND": kind, "ESTIMATE": value, "INITIAL": value,
                         "FIXED": True, "SE": np.nan, "RSE": np.nan, "SE_R": np.nan})

    for name, value in model.theta.items():
        add(name, "THETA", float(value))
    variances = np.diag(model.omega)
    for i in range(len(variances)):
        for j in range(i + 1):
            if variances[i] > 0 and variances[j] > 0 and (i == j or model.omega[i, j] != 0):
                add(f"OMEGA({i + 1},{j + 1})", "OMEGA", float(model.omega[i, j]))
    for kappa, value in model.iov.items():
        if value > 0:
            add(f"IOV({kappa})", "IOV", float(value))
    for kind in ("proportional", "additive"):
        if getattr(model.residual, kind) > 0:
            add(f"SIGMA({kind})", "SIGMA", getattr(model.residual, kind) ** 2)
    return pd.DataFrame(rows)


def _condition(cov: np.ndarray | None) -> float:
    if cov is None:
        return float("nan")
    sd = np.sqrt(np.diag(cov))
    if not (np.isfinite(cov).all() and (sd > 0).all()):
        return float("inf")
    corr = cov / np.outer(sd, sd)
    eig = np.linalg.eigvalsh(corr)
    return float(eig.max() / eig.min()) if eig.min() > 0 else float("inf")


def _covariance(objective: _Objective | _SampledObjective, layout: _Layout,
                values: np.ndarray, fit: MAPEstimate
                ) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """Sandwich ``H^-1 S H^-1`` and ``2 H^-1`` (the R matrix alone) in natural units, ``H``
    the Hessian of OFV and ``S`` the sum of the IDs' outer gradient products (NONMEM's
    ``R^-1 S R^-1`` with ``R = H / 2``, ``S`` of ``-ln L_i``).

    Derivatives are in the transformed coordinates (all of order 1, one step size fits
    all), carried to natural units by the Jacobian ``J`` of the transform: at the optimum
    ``H_x = J' H J`` and ``g_x = J' g``, so ``H^-1 = J H_x^-1 J'`` and the sandwich
    likewise. With exact gradients, ``S`` is theirs and ``H_x`` their central
    differences; otherwise both are central differences of the objective."""
    objective.warm = fit.individuals
    x = layout.to_x(values)
    exact = isinstance(objective, _Objective) and objective.inexact is None
    try:
        hess, grads = (_exact_derivatives(objective, layout, x) if exact  # type: ignore[arg-type]
                       else _difference_derivatives(objective, layout, x))
        if exact and not (np.isfinite(hess).all() and np.isfinite(grads).all()):
            exact = False  # a degenerate structure at some point: differences
            hess, grads = _difference_derivatives(objective, layout, x)
    except (ArithmeticError, np.linalg.LinAlgError) as err:
        return None, None, f"failed: {err}"
    if np.linalg.eigvalsh(hess).min() <= 0:
        return None, None, "failed: the Hessian of the objective is not positive definite"
    jac = layout.jacobian(x)  # d natural / d x
    inverse = np.linalg.inv(hess)
    sandwich = jac @ inverse @ (grads.T @ grads) @ inverse @ jac.T
    r_only = 2 * jac @ inverse @ jac.T
    singular = _unidentified(r_only, layout.names)
    if singular:
        return None, None, f"failed: {singular}"
    how = ("S from exact gradients, R by central differences of them" if exact
           else "central differences of the objective")
    return sandwich, r_only, f"successful (sandwich R^-1 S R^-1; {how})"


def _exact_derivatives(objective: _Objective, layout: _Layout,
                       x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Hessian of OFV in ``x`` by central differences (step _EXACT_STEP) of its exact
    gradient, and each ID's exact gradient ``(B, n)`` in ``x``."""
    warm = objective.warm

    def per_id(at: np.ndarray) -> np.ndarray:
        values = layout.from_x(at)
        fit = objective.fit(values, warm) if objective.method != "fo" else None
        if fit is None and objective.method != "fo":
            raise ArithmeticError("an objective evaluation failed near the optimum")
        return objective.id_gradients(values, fit) @ layout.jacobian(at)

    grads = per_id(x)
    unit = np.eye(x.size) * _EXACT_STEP
    columns = [(per_id(x + u).sum(axis=0) - per_id(x - u).sum(axis=0)) / (2 * _EXACT_STEP)
               for u in unit]
    hess = np.stack(columns, axis=1)
    return (hess + hess.T) / 2, grads


def _difference_derivatives(objective: _Objective | _SampledObjective, layout: _Layout,
                            x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Hessian of OFV in ``x`` and each ID's gradient ``(B, n)``, by central
    differences of the objective (step _COV_STEP)."""
    n, h = x.size, _COV_STEP

    def at(shift: np.ndarray) -> np.ndarray:
        out = objective.per_id(layout.from_x(x + shift))
        if out is None:
            raise ArithmeticError("an objective evaluation failed near the optimum")
        return out

    unit = np.eye(n) * h
    centre = at(np.zeros(n)).sum()
    plus, minus = [at(unit[k]) for k in range(n)], [at(-unit[k]) for k in range(n)]
    grads = np.stack([(p - m) / (2 * h) for p, m in zip(plus, minus)], axis=1)
    hess = np.zeros((n, n))
    for k in range(n):
        hess[k, k] = (plus[k].sum() - 2 * centre + minus[k].sum()) / h**2
        for m in range(k):
            both = (at(unit[k] + unit[m]).sum() - at(unit[k] - unit[m]).sum()
                    - at(unit[m] - unit[k]).sum() + at(-unit[k] - unit[m]).sum())
            hess[k, m] = hess[m, k] = both / (4 * h * h)
    return hess, grads


#: Condition number of the estimates' correlation matrix above which the covariance step
#: fails as NONMEM's "R matrix algorithmically singular" would.
MAX_CONDITION = 1e5


def _unidentified(cov: np.ndarray, names: list[str]) -> str:
    """Why ``cov`` cannot be trusted (parameters the data cannot tell apart), or ''."""
    sd = np.sqrt(np.diag(cov))
    if not (np.isfinite(cov).all() and (sd > 0).all()):
        bad = [n for n, v in zip(names, sd) if not v > 0] or names
        return (f"the covariance of {bad} is not finite or has no variance: the data do not "
                "move them; fix them or reparameterise")
    corr = cov / np.outer(sd, sd)
    eig = np.linalg.eigvalsh(corr)
    condition = eig.max() / eig.min() if eig.min() > 0 else np.inf
    if condition <= MAX_CONDITION:
        return ""
    off = np.abs(corr - np.eye(len(sd)))
    i, j = np.unravel_index(np.argmax(off), off.shape)
    return (f"the R matrix is nearly singular (condition number {condition:.3g}; {names[i]} "
            f"and {names[j]} correlate {corr[i, j]:+.4f}): these data cannot tell them "
            "apart; fix one or reparameterise")


def _shrinkage(model: PopulationModel, fit: MAPEstimate) -> dict[str, float]:
    out = {}
    for name, variance in zip(model.eta_names, np.diag(model.omega)):
        if variance > 0:
            out[name] = float(1 - fit.individuals[name].std(ddof=1) / math.sqrt(variance))
    return out


def _residuals(model: PopulationModel, table: pd.DataFrame, fit: MAPEstimate,
               covariates: str = "nocb") -> pd.DataFrame:
    """PRED, IPRED, RES, IWRES, WRES (at ETA 0) and CWRES (at the conditional modes,
    Hooker et al. 2007) on the measured records."""
    records = fit.records.copy()
    used = ((records["EVID"] == 0) & (records["MDV"] == 0)).to_numpy() & ~_censored(records)
    records["RES"] = np.where(used, records["DV"] - records["PRED"], np.nan)
    eta = fit.individuals[list(model.eta_names)]
    records["WRES"] = _weighted(model, table, records, np.zeros(eta.shape), used, covariates)
    records["CWRES"] = _weighted(model, table, records, eta.to_numpy(dtype=float), used,
                                 covariates)
    return records


def _weighted(model: PopulationModel, table: pd.DataFrame, records: pd.DataFrame,
              eta: np.ndarray, used: np.ndarray, covariates: str = "nocb") -> np.ndarray:
    """``C^-1/2 (y - f + G eta)`` per ID with ``C = G OMEGA G' + diag(R)``, ``G = df/deta``
    at ``eta`` and ``R`` the residual variance at ``f``; ``C^-1/2`` is the symmetric
    inverse square root, as NONMEM's CWRES (a Cholesky factor differs by up to 1.5 on
    pheno_real)."""
    f, grad, variance = _linearisation(model, table, eta, covariates)
    out = np.full(len(table), np.nan)
    row_ids = table["ID"].to_numpy()
    dv = records["DV"].to_numpy(dtype=float)
    for b, ident in enumerate(pd.unique(table["ID"])):
        rows = np.flatnonzero((row_ids == ident) & used)
        if rows.size == 0:
            continue
        g = grad[rows]
        cov = g @ model.omega @ g.T + np.diag(variance[rows])
        centred = dv[rows] - f[rows] + g @ eta[b]
        w, v = np.linalg.eigh(cov)
        out[rows] = v @ ((v.T @ centred) / np.sqrt(w))
    return out


def eta_covariates(fit: Any, covariates: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Each ID's ETAs (conditional modes) beside its baseline covariates (first record), and
    the Pearson correlation of every ETA-covariate pair, for covariate model building.

    Parameters
    ----------
    fit : PopulationFit or MAPEstimate
        Anything with ``individuals`` (ID and ETA columns), ``records`` and ``model``.
    covariates : tuple of str, optional
        Data columns; the model's covariates by default.

    Returns
    -------
    DataFrame
        ID, the ETAs and the covariates; ``.attrs["correlation"]`` maps ``(ETA, covariate)``
        to Pearson's r (NaN when a column is constant).
    """
    names = tuple(covariates) if covariates is not None else fit.model.covariate_names
    if not names:
        raise ValueError(f"{fit.model.name} has no covariates: name the data columns to "
                         "plot the ETAs against in `covariates`")
    missing = [c for c in names if c not in fit.records.columns]
    if missing:
        raise ValueError(f"covariate columns {missing} are not in the records")
    variances = np.diag(fit.model.omega)
    etas = [e for e, v in zip(fit.model.eta_names, variances) if v > 0]
    first = fit.records.groupby("ID", sort=False)[list(names)].first()
    table = fit.individuals[["ID", *etas]].join(first, on="ID")
    correlation = {}
    for eta in etas:
        for name in names:
            x, y = table[name].to_numpy(dtype=float), table[eta].to_numpy(dtype=float)
            usable = np.isfinite(x) & np.isfinite(y)
            constant = usable.sum() < 3 or np.ptp(x[usable]) == 0 or np.ptp(y[usable]) == 0
            correlation[(eta, name)] = (np.nan if constant
                                        else float(np.corrcoef(x[usable], y[usable])[0, 1]))
    table.attrs["correlation"] = correlation
    return table


def npde(model: PopulationModel, data: pd.DataFrame, *, n: int = 1000, seed: int = 0,
         covariates: str = "nocb") -> pd.DataFrame:
    """Normalised prediction distribution errors (Brendel et al., Pharm Res 2006; Comets
    et al. 2008), by simulation.

    Each ID's design is simulated ``n`` times with IIV, IOV and residual error; its
    observations and the simulated vectors are decorrelated with the symmetric inverse
    square root of the simulated covariance (as NONMEM's NPDE; a Cholesky factor agrees
    less with it on pheno_real), PDE is the share of simulated values below the observed
    one (kept within ``[1/2n, 1 - 1/2n]``) and NPDE its normal quantile. Under the model
    NPDE is standard normal and independent within an ID.

    Returns
    -------
    DataFrame
        The validated records with PDE and NPDE on measured records (NaN elsewhere and on
        censored records).
    """
    from scipy.stats import norm  # here: scipy.stats takes 0.4 s to import

    from pkmodel.predict import simulate

    table = validate(data, covariates=model.covariate_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CovariateWarning)
        sims = simulate(model, table, n=n, seed=seed, covariates=covariates)
    measured = ((table["EVID"] == 0) & (table["MDV"] == 0)).to_numpy()
    every = (table["EVID"] == 0).to_numpy()
    usable = measured & ~_censored(table)
    out = table.copy()
    out["PDE"], out["NPDE"] = np.nan, np.nan
    ids, dv = table["ID"].to_numpy(), table["DV"].to_numpy(dtype=float)
    for ident, rows in sims.groupby("SOURCE_ID", sort=False):
        positions = np.flatnonzero((ids == ident) & every)
        values = rows["DV"].to_numpy(dtype=float).reshape(n, positions.size)
        keep = usable[positions]
        if not keep.any():
            continue
        values, at = values[:, keep], positions[keep]
        mean = values.mean(axis=0)
        cov = np.atleast_2d(np.cov(values, rowvar=False))
        w, v = np.linalg.eigh(cov)
        root = v / np.sqrt(np.maximum(w, 1e-300)) @ v.T
        observed = root @ (dv[at] - mean)
        simulated = (values - mean) @ root.T
        pde = np.clip((simulated < observed).mean(axis=0), 1 / (2 * n), 1 - 1 / (2 * n))
        out.loc[out.index[at], "PDE"] = pde
        out.loc[out.index[at], "NPDE"] = norm.ppf(pde)
    return out

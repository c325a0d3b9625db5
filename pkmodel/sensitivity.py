"""Exact derivatives of the predictions with respect to ETAs and THETAs: what the gradient
of a population objective needs (Almquist et al., J Pharmacokinet Pharmacodyn 2015).

A concentration at an observation is a sum over the doses before it of closed-form
responses (bolus, zero-order infusion, first-order absorption) of the individual PK
parameters ``p`` (CL, V1, Q, V2, KA); the parameters are the model's sympy expressions of
THETAs, covariates and ETAs. Both are differentiated symbolically (sympy), to second order,
and combined by the chain rule:

``f_a = sum_k h_k p_k,a``,
``f_ab = sum_kl h_kl p_k,a p_l,b + sum_k h_k p_k,ab``

where ``h`` is the concentration as a function of ``p``. No step size, no finite
difference: the derivatives are those of the closed forms the engine evaluates.

They apply where superposition does (:func:`~pkmodel.engine.central_amounts`): one or two
disposition compartments with or without a depot; doses into the central compartment
(bolus or infusion) or into the depot (bolus); parameters constant within each ID (no
IOV, no time-varying covariate); no steady state, reset or dose modifier (F, ALAG, D, R).
:func:`sensitivities_unsupported` says why they do not apply to a model and data, so a
caller can fall back to differences and say so.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import sympy as sp
from sympy.codegen.cfunctions import expm1

from pkmodel.engine import infusion_rate_and_length
from pkmodel.model import PopulationModel, evaluate_parameters
from pkmodel.predict import to_events

__all__ = ["PredictionSensitivities", "prediction_sensitivities", "sensitivities_unsupported"]


@dataclass(frozen=True)
class PredictionSensitivities:
    """Predictions at the measured observations and their exact derivatives, per ID,
    padded to the ID with most observations.

    Attributes
    ----------
    ids : ndarray
        ``(B,)`` IDs in order of appearance.
    rows : ndarray of int
        ``(B, K)`` positions in the table of each ID's measured observations (-1: padding).
    value : ndarray
        ``(B, K)`` concentrations (the model's concentration unit), 0 in padding.
    eta, theta : ndarray
        ``(B, K, n)`` and ``(B, K, m)``: first derivatives with respect to the ETAs and
        THETAs asked for.
    eta_eta, eta_theta : ndarray
        ``(B, K, n, n)`` and ``(B, K, n, m)``: second derivatives.
    """

    ids: np.ndarray
    rows: np.ndarray
    value: np.ndarray
    eta: np.ndarray
    theta: np.ndarray
    eta_eta: np.ndarray
    eta_theta: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        """``(B, K)``: True at real observations, False in padding."""
        return self.rows >= 0


def sensitivities_unsupported(model: PopulationModel, table: pd.DataFrame) -> str | None:
    """Why exact sensitivities do not apply to ``model`` on the validated ``table`` (None
    when they do).

    Examples
    --------
    >>> from pkmodel.models import load
    >>> from pkmodel.data import infliximab_regimen, validate
    >>> table = validate(infliximab_regimen(30.0, until_week=14,
    ...                                     covariates={"ALB": 4.0, "ATI": 0, "IMM": 0}))
    >>> sensitivities_unsupported(load("fasanmade2011"), table)
    'the model has IOV (KAPPAs)'
    >>> sensitivities_unsupported(load("xu2012"), table) is None
    True
    """
    structure = model.structure
    if structure.n_compartments > 2:
        return "more than two disposition compartments"
    if model.iov:
        return "the model has IOV (KAPPAs)"
    extra = sorted(set(model.parameters) - set(structure.parameter_names))
    if extra:
        return f"dose modifiers {extra}"
    ids = table["ID"]
    changing = [c for c in model.covariate_names
                if (table.groupby(ids, sort=False)[c].nunique(dropna=False) > 1).any()]
    if changing:
        return f"covariates changing within an ID ({changing})"
    evid = table["EVID"].to_numpy()
    if np.any(evid >= 3):
        return "resets (EVID 3 or 4)"
    dose = evid == 1
    if np.any(table["SS"].to_numpy()[dose] > 0):
        return "steady-state doses"
    if np.any(table["RATE"].to_numpy()[dose] < 0):
        return "modelled rates or durations (RATE < 0)"
    cmt = np.where(table["CMT"].to_numpy() == 0, 1, table["CMT"].to_numpy())
    central = structure.central_cmt
    infused = (table["RATE"].to_numpy() > 0) | (table["DUR"].to_numpy() > 0)
    if structure.depot and np.any(dose & (cmt == 1) & infused):
        return "infusions into the depot"
    if np.any(dose & (cmt != central) & ~(structure.depot & (cmt == 1))):
        return "doses into a peripheral compartment"
    return None


# --------------------------------------------------------------------------- responses


def _structure_symbols(n: int, depot: bool) -> list[sp.Symbol]:
    names = ["CL", "V1"] + (["Q", "V2"] if n == 2 else []) + (["KA"] if depot else [])
    return [sp.Symbol(k, positive=True) for k in names]


def _second_order(expr: list[sp.Expr] | sp.Expr, wrt: list[sp.Symbol]) -> list[sp.Expr]:
    """Each expression, its gradient in ``wrt`` and the upper triangle of its Hessian."""
    out = []
    for e in expr if isinstance(expr, list) else [expr]:
        first = [sp.diff(e, s) for s in wrt]
        out += [e, *first]
        out += [sp.diff(first[i], wrt[j]) for i in range(len(wrt)) for j in range(i, len(wrt))]
    return out


@functools.lru_cache(maxsize=8)
def _mode_function(n: int, depot: bool) -> Any:
    """The modes ``z`` of the disposition (rate constants and central coefficients, V1,
    KA) as a function of the structure parameters ``p``, with derivatives to second
    order: differentiating in two levels keeps the expressions small."""
    p = _structure_symbols(n, depot)
    cl, v1 = p[0], p[1]
    if n == 1:
        z = [cl / v1]
    else:
        q, v2 = p[2], p[3]
        k10, k12, k21 = cl / v1, q / v1, q / v2
        total = k10 + k12 + k21
        gap = sp.sqrt(total**2 - 4 * k10 * k21)  # alpha - beta
        alpha = (total + gap) / 2
        beta = 2 * k10 * k21 / (total + gap)  # without cancellation
        z = [alpha, beta, (alpha - k21) / gap]
    z += [v1] + ([p[-1]] if depot else [])
    return sp.lambdify(p, _second_order(z, p), modules=[np], cse=True)


def _relative_numeric(x: np.ndarray, order: int) -> np.ndarray:
    """The ``order``-th derivative of ``G(x) = (1 - exp(-x)) / x`` for ``x >= 0``: closed
    forms, and the Taylor series ``G = sum_n (-x)^n / (n + 1)!`` below 0.05, where the
    closed forms cancel (their relative error there would be 1e-16 / x^(order + 1))."""
    x = np.asarray(x, dtype=float)
    small = np.abs(x) < 0.05
    safe = np.where(small, 1.0, x)
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(-safe)
        closed = (-np.expm1(-safe) / safe if order == 0 else
                  (e * (1 + safe) - 1) / safe**2 if order == 1 else
                  -e / safe - 2 * (e * (1 + safe) - 1) / safe**3)
    series = np.zeros_like(x)
    for n in range(order, order + 16):
        series += (math.factorial(n) / math.factorial(n - order) * (-1) ** n
                   / math.factorial(n + 1)) * x ** (n - order)
    return np.where(small, series, closed)


class _Relative(sp.Function):
    """``(1 - exp(-x)) / x``, continued by 1 at 0: the absorption term without the
    cancellation of ``exp(-lam t) - exp(-ka t)`` when KA nears a disposition rate."""

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return _RelativeD1(self.args[0])


class _RelativeD1(sp.Function):
    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return _RelativeD2(self.args[0])


class _RelativeD2(sp.Function):
    pass


_RELATIVE = {"_Relative": lambda x: _relative_numeric(x, 0),
             "_RelativeD1": lambda x: _relative_numeric(x, 1),
             "_RelativeD2": lambda x: _relative_numeric(x, 2)}


@functools.lru_cache(maxsize=8)
def _response_functions(n: int, depot: bool) -> dict[str, Any]:
    """Per kind of dose (bolus, infusion of unit rate, and per mode and branch an oral
    bolus's term), a function of the modes ``z`` (see :func:`_mode_function`) and
    ``(t, u)`` returning the concentration per unit dose and its first and second
    derivatives in ``z``.

    An oral dose's term of mode ``i`` is ``c_i ka (exp(-lam t) - exp(-ka t)) / (ka - lam)``,
    written ``c_i ka t exp(-m t) G(|ka - lam| t)`` with ``m`` the smaller rate and ``G``
    :class:`_Relative`: exact and free of cancellation as KA nears the rate (where the
    plain quotient loses every digit, and is 0/0 at equality); ``"oral{i}+"`` is the
    branch ``ka >= lam``, ``"oral{i}-"`` the other."""
    t, u = sp.symbols("t u", nonnegative=True)  # time since the dose; infusion so far
    if n == 1:
        lam, v1 = sp.symbols("lam v1", positive=True)
        z = [lam, v1]
        modes = [(lam, sp.Integer(1))]
    else:
        alpha, beta, c1, v1 = sp.symbols("alpha beta c1 v1", positive=True)
        z = [alpha, beta, c1, v1]
        modes = [(alpha, c1), (beta, 1 - c1)]
    kinds = {
        "bolus": sum(c * sp.exp(-rate * t) for rate, c in modes) / v1,
        # unit rate for u days of the infusion (u = min(t, length)), then decay
        "infusion": sum(c * sp.exp(-rate * (t - u)) * -expm1(-rate * u) / rate
                        for rate, c in modes) / v1,
    }
    if depot:
        ka = sp.Symbol("ka", positive=True)
        z.append(ka)
        for i, (rate, c) in enumerate(modes):
            kinds[f"oral{i}+"] = c * ka * t * sp.exp(-rate * t) * _Relative((ka - rate) * t) / v1
            kinds[f"oral{i}-"] = c * ka * t * sp.exp(-ka * t) * _Relative((rate - ka) * t) / v1
    return {kind: sp.lambdify([*z, t, u], _second_order(expr, z), modules=[_RELATIVE, np],
                              cse=True)
            for kind, expr in kinds.items()}


def _unpack(values: list[Any], size: int, count: int, block: int = 0
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Value ``(N,)``, gradient ``(N, P)`` and full Hessian ``(N, P, P)`` of the
    ``block``-th expression of a :func:`_second_order` list."""
    per = 1 + count + count * (count + 1) // 2
    arrays = [np.broadcast_to(np.asarray(v, dtype=float), (size,))
              for v in values[block * per:(block + 1) * per]]
    grad = np.stack(arrays[1:count + 1], axis=-1)
    hess = np.zeros((size, count, count))
    k = count + 1
    for i in range(count):
        for j in range(i, count):
            hess[:, i, j] = hess[:, j, i] = arrays[k]
            k += 1
    return arrays[0], grad, hess


# --------------------------------------------------------------------------- parameters


@functools.lru_cache(maxsize=32)
def _parameter_functions(key: tuple) -> Any:
    """One function of (THETAs, covariates, ETAs) returning, for each structure parameter,
    its value, derivatives in the ETAs and THETAs asked for, and second derivatives in
    (ETA, ETA) and (ETA, THETA)."""
    theta_names, covariate_names, eta_names, items, wrt_eta, wrt_theta = key
    args = [sp.Symbol(k) for k in (*theta_names, *covariate_names, *eta_names)]
    outputs = []
    for _, given in items:
        # Plain symbols by name: a model may build its equations from symbols with
        # assumptions (positive=True), which are other symbols to differentiate by.
        expr = given.xreplace({s: sp.Symbol(s.name) for s in given.free_symbols})
        outputs.append(expr)
        d_eta = [sp.diff(expr, sp.Symbol(e)) for e in wrt_eta]
        outputs += d_eta
        outputs += [sp.diff(expr, sp.Symbol(k)) for k in wrt_theta]
        outputs += [sp.diff(d, sp.Symbol(e)) for d in d_eta for e in wrt_eta]
        outputs += [sp.diff(d, sp.Symbol(k)) for d in d_eta for k in wrt_theta]
    return sp.lambdify(args, outputs, modules=[np], cse=True)


def _parameter_derivatives(model: PopulationModel, covariates: dict[str, np.ndarray],
                           eta: np.ndarray, wrt_eta: tuple[str, ...],
                           wrt_theta: tuple[str, ...]) -> tuple[np.ndarray, ...]:
    """Per ID (rows of ``covariates`` and ``eta``): the structure parameters ``(B, P)``,
    ``dp/deta (B, P, n)``, ``dp/dtheta (B, P, m)``, ``(B, P, n, n)`` and ``(B, P, n, m)``."""
    names = model.structure.parameter_names
    key = (tuple(model.theta), model.covariate_names, model.eta_names,
           tuple((k, model.parameters[k]) for k in names), wrt_eta, wrt_theta)
    function = _parameter_functions(key)
    size = eta.shape[0]
    args = ([float(v) for v in model.theta.values()]
            + [covariates[c] for c in model.covariate_names]
            + [eta[:, i] for i in range(eta.shape[1])])
    flat = [np.broadcast_to(np.asarray(v, dtype=float), (size,)) for v in function(*args)]
    n, m = len(wrt_eta), len(wrt_theta)
    per = 1 + n + m + n * n + n * m
    blocks = np.stack(flat, axis=-1).reshape(size, len(names), per)
    value = blocks[:, :, 0]
    d_eta = blocks[:, :, 1:1 + n]
    d_theta = blocks[:, :, 1 + n:1 + n + m]
    d_eta_eta = blocks[:, :, 1 + n + m:1 + n + m + n * n].reshape(size, len(names), n, n)
    d_eta_theta = blocks[:, :, 1 + n + m + n * n:].reshape(size, len(names), n, m)
    return value, d_eta, d_theta, d_eta_eta, d_eta_theta


# --------------------------------------------------------------------------- assembly


def prediction_sensitivities(model: PopulationModel, table: pd.DataFrame, eta: np.ndarray,
                             *, etas: Sequence[str] | None = None,
                             thetas: Sequence[str] = (),
                             covariates: str = "nocb") -> PredictionSensitivities:
    """Concentrations at the measured observations (EVID 0, MDV 0) of every ID and their
    exact first and second derivatives with respect to ``etas`` and ``thetas``.

    Parameters
    ----------
    model : PopulationModel
    table : DataFrame
        Validated records (:func:`~pkmodel.data.validate`).
    eta : ndarray
        ``(B, len(model.eta_names))`` ETAs of the IDs, in order of appearance.
    etas : sequence of str, optional
        ETAs to differentiate by (default all of the model's).
    thetas : sequence of str
        THETAs to differentiate by.
    covariates : {"nocb", "locf"}

    Raises
    ------
    ValueError
        Where they do not apply (see :func:`sensitivities_unsupported`) or an ID's
        parameters change between its records.

    Examples
    --------
    One compartment, ``CL = TVCL exp(ETA_CL)`` (1 L/day), ``V1`` 10 L, 100 mg at time 0
    and a sample at day 2: ``C = 10 exp(-0.2) = 8.1873`` mg/L and
    ``dC/dETA_CL = dC/dTVCL = -C CL t / V1 = -1.6375``, ``d2C/dETA_CL2 = C (0.2^2 - 0.2)
    = -1.3100``.

    >>> from pkmodel.data import validate
    >>> from pkmodel.engine import Structure
    >>> from pkmodel.model import PopulationModel, ResidualError
    >>> import sympy as sp
    >>> tvcl, eta_cl = sp.symbols("TVCL ETA_CL")
    >>> model = PopulationModel("one", Structure(1), {"TVCL": 1.0},
    ...                         {"CL": tvcl * sp.exp(eta_cl), "V1": sp.Float(10)},
    ...                         [[0.1]], ("ETA_CL",), ResidualError(proportional=0.1))
    >>> table = validate(pd.DataFrame({"ID": 1, "TIME": [0.0, 2.0], "AMT": [100.0, 0.0],
    ...                                "DV": [None, 8.0]}))
    >>> s = prediction_sensitivities(model, table, np.zeros((1, 1)), thetas=("TVCL",))
    >>> round(float(s.value[0, 0]), 4), round(float(s.eta[0, 0, 0]), 4)
    (8.1873, -1.6375)
    >>> round(float(s.theta[0, 0, 0]), 4), round(float(s.eta_eta[0, 0, 0, 0]), 4)
    (-1.6375, -1.31)
    """
    reason = sensitivities_unsupported(model, table)
    if reason is not None:
        raise ValueError(f"exact sensitivities do not apply: {reason}")
    etas = tuple(model.eta_names if etas is None else etas)
    thetas = tuple(thetas)
    structure = model.structure
    events = to_events(table, structure, covariates=covariates)
    ids = pd.unique(table["ID"])
    eta = np.asarray(eta, dtype=float)
    row_id = np.repeat(np.arange(len(ids)), table.groupby("ID", sort=False).size().to_numpy())
    cov = {c: table[c].to_numpy(dtype=float) for c in model.covariate_names}
    per_row = evaluate_parameters(model, cov, eta[row_id])
    first = np.r_[0, np.flatnonzero(row_id[1:] != row_id[:-1]) + 1]
    for name in structure.parameter_names:
        values = np.broadcast_to(per_row[name], row_id.shape)
        if not np.array_equal(values, values[first][row_id]):
            raise ValueError(f"exact sensitivities do not apply: {name} changes within an "
                             "ID (a time-varying covariate)")
    params = _parameter_derivatives(
        model, {c: v[first] for c, v in cov.items()}, eta, etas, thetas)
    rows = _observation_rows(table, row_id, len(ids))
    h, h_p, h_pp = _concentration_in_p(structure, events, params[0], rows, table)
    _, p_eta, p_theta, p_eta_eta, p_eta_theta = params
    f_eta = np.einsum("bkp,bpi->bki", h_p, p_eta)
    f_theta = np.einsum("bkp,bpj->bkj", h_p, p_theta)
    f_eta_eta = (np.einsum("bkpq,bpi,bqj->bkij", h_pp, p_eta, p_eta, optimize=True)
                 + np.einsum("bkp,bpij->bkij", h_p, p_eta_eta))
    f_eta_theta = (np.einsum("bkpq,bpi,bqj->bkij", h_pp, p_eta, p_theta, optimize=True)
                   + np.einsum("bkp,bpij->bkij", h_p, p_eta_theta))
    return PredictionSensitivities(ids=ids, rows=rows, value=h, eta=f_eta, theta=f_theta,
                                   eta_eta=f_eta_eta, eta_theta=f_eta_theta)


def _observation_rows(table: pd.DataFrame, row_id: np.ndarray, n_ids: int) -> np.ndarray:
    """``(B, K)`` table positions of each ID's measured observations, padded with -1."""
    measured = np.flatnonzero(((table["EVID"] == 0) & (table["MDV"] == 0)).to_numpy())
    owner = row_id[measured]
    counts = np.bincount(owner, minlength=n_ids)
    width = max(1, int(counts.max()) if counts.size else 1)
    out = np.full((n_ids, width), -1)
    rank = np.arange(measured.size) - np.repeat(np.cumsum(counts) - counts, counts)
    out[owner, rank] = measured
    return out


def _concentration_in_p(structure: Any, events: Any, p: np.ndarray, rows: np.ndarray,
                        table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """At each observation ``rows (B, K)``: the concentration, its gradient ``(B, K, P)``
    and Hessian ``(B, K, P, P)`` in the structure parameters ``p (B, P)``, summed over
    the doses before it (each a record of ``events``, which follow the table's rows)."""
    n_ids, width = rows.shape
    n, depot = structure.n_compartments, structure.depot
    count = p.shape[1]
    z_values = _mode_function(n, depot)(*(p[:, i] for i in range(count)))
    z_count = len(z_values) // (1 + count + count * (count + 1) // 2)
    modes = [_unpack(z_values, n_ids, count, k) for k in range(z_count)]
    z = np.stack([m[0] for m in modes], axis=-1)  # (B, Z)
    z_p = np.stack([m[1] for m in modes], axis=1)  # (B, Z, P)
    z_pp = np.stack([m[2] for m in modes], axis=1)  # (B, Z, P, P)
    value = np.zeros((n_ids, width))
    in_z = np.zeros((n_ids, width, z_count))
    in_zz = np.zeros((n_ids, width, z_count, z_count))
    evid, amt, rate, dur, time = (events.evid, events.amt, events.rate, events.dur,
                                  events.time)
    cmt = np.where(events.cmt == 0, 1, events.cmt)
    # The record of each observation, and every (observation, earlier dose) pair.
    record_of = np.full(len(table), -1)
    b_index, r_index = np.nonzero(events.source_row >= 0)
    record_of[events.source_row[b_index, r_index]] = r_index
    obs_b, obs_k = np.nonzero(rows >= 0)
    obs_r = record_of[rows[obs_b, obs_k]]
    dose_b, dose_r = np.nonzero((evid == 1) & (amt > 0))  # sorted by ID
    pair_obs, pair_dose = _pairs(obs_b, obs_r, dose_b, dose_r, n_ids)
    b, k = obs_b[pair_obs], obs_k[pair_obs]
    db, dr = dose_b[pair_dose], dose_r[pair_dose]
    dt = time[b, obs_r[pair_obs]] - time[db, dr]
    a, r, d = amt[db, dr], rate[db, dr], dur[db, dr]
    r, length = infusion_rate_and_length(a, r, d)
    oral = depot & (cmt[db, dr] == 1)
    infused = (r > 0) & ~oral
    functions = _response_functions(n, depot)
    parts = [("bolus", ~infused & ~oral, a), ("infusion", infused, r)]
    if depot:  # each mode's term on the branch where KA is at or above its rate, or below
        ka = z[b, -1]
        for i in range(n):
            above = ka >= z[b, i]
            parts += [(f"oral{i}+", oral & above, a), (f"oral{i}-", oral & ~above, a)]
    for kind, chosen, scale in parts:
        at = np.flatnonzero(chosen)
        if at.size == 0:
            continue
        values = functions[kind](*(z[b[at], i] for i in range(z_count)), dt[at],
                                 np.minimum(dt[at], length[at]))
        v, g, h = _unpack(values, at.size, z_count)
        where = (b[at], k[at])
        np.add.at(value, where, scale[at] * v)
        np.add.at(in_z, where, scale[at, None] * g)
        np.add.at(in_zz, where, scale[at, None, None] * h)
    grad = np.einsum("bkz,bzp->bkp", in_z, z_p)
    hess = (np.einsum("bkyz,byp,bzq->bkpq", in_zz, z_p, z_p, optimize=True)
            + np.einsum("bkz,bzpq->bkpq", in_z, z_pp))
    return value, grad, hess


def _pairs(obs_b: np.ndarray, obs_r: np.ndarray, dose_b: np.ndarray, dose_r: np.ndarray,
           n_ids: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (observation, dose) pair of the same ID with the dose's record first, as
    indices into the observations and the doses (the doses sorted by ID)."""
    per_id = np.bincount(dose_b, minlength=n_ids)
    start = np.cumsum(per_id) - per_id
    counts = per_id[obs_b]
    pair_obs = np.repeat(np.arange(obs_b.size), counts)
    offset = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    pair_dose = start[obs_b][pair_obs] + offset
    keep = dose_r[pair_dose] < obs_r[pair_obs]
    return pair_obs[keep], pair_dose[keep]

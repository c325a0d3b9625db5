"""Exact first derivatives of the record-by-record solve: forward sensitivities of the
amounts with respect to any directions in which the parameters move (ETAs, KAPPAs).

Where parameters change between records (IOV, time-varying covariates) a concentration
is no sum of closed-form dose responses, and :mod:`pkmodel.sensitivity` does not apply;
the state is carried from record to record instead (:func:`pkmodel.engine.solve`), and so
is its derivative. Over an interval of length ``dt`` with rate matrix ``K`` (constant
there) and infusions at rates ``r_j``,

``x+ = E(dt) x + sum_j f_j(K) r_j e1``,  ``E(dt) = exp(K dt)``,
``f_j(lam) = exp(lam a_j) (exp(lam L_j) - 1) / lam``

(``L_j`` the part of infusion ``j`` inside the interval, ``a_j`` the time from its end
to the interval's end). Its derivative in a parameter ``p`` is

``dx+ = E dx + (dE/dp) x + sum_j (df_j(K)/dp) r_j e1``,

and the derivative of a matrix function ``g(K)`` along ``dK = dK/dp`` is, with
``K = P diag(lam) P^-1`` (Daleckii and Krein; Higham, *Functions of Matrices*, SIAM 2008,
theorem 3.11), ``P (G o (P^-1 dK P)) P^-1`` where ``G_il = g[lam_i, lam_l]`` is the divided
difference of ``g`` (``g'(lam_i)`` on the diagonal) and ``o`` the elementwise product. The
divided differences are computed without cancellation: ``exp`` by
:func:`~pkmodel.engine.exp_divided_difference`, ``f_j`` by Leibniz's rule for a product,
``f[x, y] = exp(.a)[x, y] g_L(y) + exp(x a) g_L[x, y]``, every term positive, with
``g_L[x, y]`` the second divided difference of ``exp(. L)`` at ``x, y, 0`` (a series
where ``|lam| L`` is below 2). A bolus adds a constant, whose derivative is zero. The
derivatives in the ETAs and KAPPAs then follow by the chain rule from those of the
parameters (:func:`pkmodel.model.evaluate_parameter_slopes`). No step size, no finite
difference.

They apply to one to three disposition compartments without a depot, bolus and infusion
doses into the central compartment, no steady state, reset or dose modifier
(:func:`slopes_unsupported`); elsewhere a fit falls back to differences.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from pkmodel.engine import (
    Events,
    Structure,
    decompose,
    exp_divided_difference,
    infusion_rate_and_length,
    is_dose_modifier,
    relexp,
    selection_of,
)

__all__ = ["central_amount_slopes", "second_exp_divided_difference", "slopes_unsupported"]

#: Below this ``|lam| L`` the second divided difference of the exponential is summed as a
#: series (its terms fall by ``|lam| L / k`` at term ``k``), above it taken as a difference
#: of first divided differences (cancellation at most a factor of about 3 there).
_SERIES_BELOW = 2.0


def slopes_unsupported(structure: Structure, events: Events,
                       params: Mapping[str, np.ndarray] | None = None) -> str | None:
    """Why :func:`central_amount_slopes` does not apply (None when it does).

    Examples
    --------
    >>> from pkmodel.engine import expand_records
    >>> ev = expand_records([0.0, 7.0], [1, 0], [100.0, 0.0])
    >>> slopes_unsupported(Structure(2), ev) is None
    True
    >>> slopes_unsupported(Structure(1, depot=True), ev)
    'a depot compartment'
    """
    if structure.depot:
        return "a depot compartment"
    if params is not None and _modifiers(params):
        return _modifiers(params)
    evid = np.asarray(events.evid)
    dose = evid == 1
    if np.any(evid >= 3):
        return "resets (EVID 3 or 4)"
    if np.any(np.asarray(events.ss)[dose] > 0):
        return "steady-state doses"
    if np.any(np.asarray(events.rate)[dose] < 0):
        return "modelled rates or durations (RATE < 0)"
    cmt = np.asarray(events.cmt)[dose]
    if np.any((cmt != 0) & (cmt != structure.central_cmt)):
        return "doses outside the central compartment"
    return None


def _modifiers(params: Mapping[str, np.ndarray]) -> str | None:
    if any(is_dose_modifier(k) for k in params):
        return "dose modifiers (F, ALAG, R, D)"
    return None


def _rank_one_factors(n: int, params: Mapping[str, np.ndarray], vec: np.ndarray,
                      inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each ``dK/dp`` is of rank one, ``u v'``, so that ``N_p = P^-1 dK/dp P`` is
    ``alpha beta'`` with ``alpha = P^-1 u`` and ``beta = P' v``: both ``(..., P, n)``, the
    parameters in the structure's order. With ``K_11 = -(CL + sum Q_i) / V1``,
    ``K_1i = Q_i / V_i``, ``K_i1 = Q_i / V1``, ``K_ii = -Q_i / V_i`` (amounts in NONMEM's
    order): ``dK/dCL = e1 (-e1 / V1)'``, ``dK/dV1 = ((CL + sum Q_i) e1 - sum Q_i e_i) e1' /
    V1^2``, ``dK/dQ_i = (e_i - e1) (e1 / V1 - e_i / V_i)'``, ``dK/dV_i = Q_i / V_i^2 (e_i -
    e1) e_i'``."""
    cl, v1 = params["CL"][..., None], params["V1"][..., None]
    peripheral = [("Q", "V2"), ("Q3", "V3")][:n - 1]
    row = [vec[..., i, :] for i in range(n)]  # P' e_i
    col = [inv[..., :, i] for i in range(n)]  # P^-1 e_i
    total = cl + sum(params[q][..., None] for q, _ in peripheral)
    alpha = [col[0], (total * col[0] - sum(params[q][..., None] * col[i] for i, (q, _) in
                                           enumerate(peripheral, start=1))) / v1**2]
    beta = [-row[0] / v1, row[0]]
    for i, (q_name, v_name) in enumerate(peripheral, start=1):
        q, v = params[q_name][..., None], params[v_name][..., None]
        alpha += [col[i] - col[0], q / v**2 * (col[i] - col[0])]
        beta += [row[0] / v1 - row[i] / v, row[i]]
    return np.stack(alpha, axis=-2), np.stack(beta, axis=-2)


def second_exp_divided_difference(x: np.ndarray, y: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The second divided difference of ``lam -> exp(lam t)`` at ``x, y, 0`` (``x, y <= 0``
    in 1/day, ``t >= 0`` in days), which is ``d/dx`` of ``(exp(x t) - 1) / x`` when
    ``x == y``: without cancellation, elementwise.

    Examples
    --------
    At ``x = y = 0`` it is ``t^2 / 2``; at ``x = -1, y = 0``, ``t = 1``, ``1 - (1 - 1/e)``
    over 1, that is ``1/e``:

    >>> second_exp_divided_difference(np.array([0.0, -1.0]), np.array([0.0, 0.0]),
    ...                               np.array([2.0, 1.0])).round(12).tolist()
    [2.0, 0.367879441171]
    """
    x, y, t = np.broadcast_arrays(*(np.asarray(a, dtype=float) for a in (x, y, t)))
    u, v = x * t, y * t
    low = np.minimum(u, v)
    big = -low >= _SERIES_BELOW
    if big.all():
        return _by_difference(u, v) * t**2
    if not big.any():
        return _by_series(u, v) * t**2
    out = np.empty(u.shape)
    out[big] = _by_difference(u[big], v[big])
    out[~big] = _by_series(u[~big], v[~big])
    return out * t**2


def _by_difference(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``(e[high, 0] - e[low, high]) / (0 - low)``, ``e`` the exponential's divided
    differences, for ``min(u, v) <= -_SERIES_BELOW``."""
    low, high = np.minimum(u, v), np.maximum(u, v)
    return (relexp(high) - exp_divided_difference(low, high, np.ones_like(low))) / -low


def _by_series(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``sum_k h_k(u, v) / (k + 2)!``, ``h_k`` the complete symmetric polynomial of degree
    ``k`` in ``u, v`` (and 0), for ``|u|, |v| < _SERIES_BELOW``."""
    largest = float(max(-u.min(initial=0.0), -v.min(initial=0.0), u.max(initial=0.0),
                        v.max(initial=0.0)))
    h = np.ones_like(u)
    power = np.ones_like(u)
    total = h / 2.0
    for k in range(1, _series_terms(largest)):
        power = power * u
        h = v * h + power
        total = total + h / math.factorial(k + 2)
    return total


def _series_terms(largest: float) -> int:
    """Terms of the series above whose remainder is below 1e-17 of its first, for
    ``|u|, |v| <= largest`` (term ``k`` is at most ``(k + 1) largest^k / (k + 2)!``)."""
    k = 1
    while k < 60 and (k + 1) * largest**k / math.factorial(k + 2) > 5e-18:
        k += 1
    return k + 1


def _infusions(events: Events) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per profile, its infusions padded to the most any has: start and end times (day)
    and rates (mg/day, 0 in padding), each ``(B, J)``."""
    evid, amt = np.asarray(events.evid), np.asarray(events.amt)
    rate, dur, time = (np.asarray(a, dtype=float) for a in (events.rate, events.dur,
                                                             events.time))
    infused = (evid == 1) & (amt > 0) & ((rate > 0) | (dur > 0))
    b_count = time.shape[0]
    counts = infused.sum(axis=1)
    width = int(counts.max()) if counts.size else 0
    start, end, speed = (np.zeros((b_count, width)) for _ in range(3))
    rows, cols = np.nonzero(infused)
    rank = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
    r, length = infusion_rate_and_length(*(a[rows, cols] for a in (amt, rate, dur)))
    start[rows, rank] = time[rows, cols]
    end[rows, rank] = time[rows, cols] + length
    speed[rows, rank] = r
    return start, end, speed


def central_amount_slopes(structure: Structure, events: Events,
                          params: Mapping[str, np.ndarray], slopes: np.ndarray, *,
                          at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The central amount at some records and its exact derivatives in ``m`` directions,
    for many parameter sets at once (see the module's mathematics).

    Parameters
    ----------
    structure : Structure
        One to three disposition compartments, no depot (:func:`slopes_unsupported`).
    events : Events
        ``B`` profiles of ``R`` records, each shared by ``S / B`` consecutive sets.
    params : mapping of str to ndarray
        ``(S, R)`` per record: CL and Q in L/day, volumes in L (NONMEM's rule for which
        record's values govern an interval, as in :func:`~pkmodel.engine.solve`).
    slopes : ndarray
        ``(S, R, P, m)``: the derivatives of the ``P`` parameters of
        ``structure.parameter_names``, in that order, in the ``m`` directions.
    at : ndarray of int
        ``(B, K)`` records whose amounts are asked for (after their own events).

    Returns
    -------
    amounts : ndarray
        ``(S, K)`` central amounts (mg), equal to :func:`~pkmodel.engine.solve`'s.
    derivatives : ndarray
        ``(S, K, m)`` their derivatives (mg per unit of each direction).

    Examples
    --------
    One compartment, 100 mg at time 0, CL 1 L/day and V1 10 L: after 2 days
    ``A = 100 exp(-0.2) = 81.873`` mg and ``dA/dCL = -A t / V1 = -16.375`` mg per L/day.

    >>> from pkmodel.engine import expand_records
    >>> ev = expand_records([0.0, 2.0], [1, 0], [100.0, 0.0])
    >>> params = {"CL": np.ones((1, 2)), "V1": np.full((1, 2), 10.0)}
    >>> slopes = np.zeros((1, 2, 2, 1))  # CL, V1 by one direction: CL itself
    >>> slopes[..., 0, 0] = 1.0
    >>> a, d = central_amount_slopes(Structure(1), ev, params, slopes, at=np.array([[1]]))
    >>> round(float(a[0, 0]), 3), round(float(d[0, 0, 0]), 3)
    (81.873, -16.375)
    """
    plan = _plan(structure, events)
    reason = plan.reason or _modifiers(params)
    if reason is not None:
        raise ValueError(f"exact slopes of the solve do not apply: {reason}")
    n, names = structure.n_compartments, structure.parameter_names
    n_sets = params[names[0]].shape[0]
    if n_sets % events.shape[0] or slopes.shape[:3] != (n_sets, events.shape[1], len(names)):
        raise ValueError(f"{n_sets} parameter sets cannot share {events.shape[0]} event "
                         f"profiles, or `slopes` {slopes.shape} is not (sets, records, "
                         f"{len(names)}, directions)")
    repeats = n_sets // events.shape[0]
    dt = np.repeat(plan.dt, repeats, axis=0)
    if plan.govern is None:  # NOCB: each record's own parameters
        steps = _Steps(n, {k: params[k] for k in names}, slopes, dt)
    else:
        steps = _Steps(n, {k: params[k][:, plan.govern] for k in names},
                       slopes[:, plan.govern], dt)
    steps.add_infusions(plan, repeats)
    bolus = np.repeat(plan.bolus, repeats, axis=0)
    m = steps.constant.shape[-1]
    x, dx = np.zeros((n_sets, n)), np.zeros((n_sets, n, m))
    central, d_central = np.empty((n_sets, plan.dt.shape[1])), np.empty(
        (n_sets, plan.dt.shape[1], m))
    for k in range(plan.dt.shape[1]):  # the recurrence; the rest is vectorised over records
        if plan.moving[k]:
            x, dx = steps.carry(k, x, dx)
        if plan.dosed[k]:
            x = x.copy()
            x[:, 0] += bolus[:, k]
        central[:, k], d_central[:, k] = x[:, 0], dx[:, 0]
    rows = np.repeat(np.asarray(at), repeats, axis=0)
    return (np.take_along_axis(central, rows, axis=1),
            np.take_along_axis(d_central, rows[..., None], axis=1))


@dataclass(frozen=True)
class _Plan:
    """What :func:`central_amount_slopes` takes from the records, per profile (``B``),
    whatever the parameters: built once per Events object."""

    reason: str | None  # why the slopes do not apply, or None
    govern: np.ndarray | None  # (R,) the record whose parameters govern the interval
    # ending at each (LOCF: the one before); None for each record's own (NOCB)
    dt: np.ndarray  # (B, R) the interval's length (day), 0 at the first record
    moving: np.ndarray  # (R,) some profile's interval is not empty
    bolus: np.ndarray  # (B, R) the bolus given at the record (mg), else 0
    dosed: np.ndarray  # (R,) some profile has a bolus there
    # the (profile, record, infusion) triples where an infusion runs in the interval, with
    # its length there, the time from its end there to the record, and its rate
    infused: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    one_per_interval: bool  # no two infusions run in one interval of one profile

    def take(self, rows: np.ndarray) -> _Plan:
        """The plan of the profiles ``rows`` (a selection, repeats allowed)."""
        dt, bolus = self.dt[rows], self.bolus[rows]
        b = self.infused[0]  # sorted by profile
        per_profile = np.bincount(b, minlength=self.dt.shape[0])
        counts = per_profile[rows]
        first = (np.cumsum(per_profile) - per_profile)[rows]
        pick = (np.repeat(first - (np.cumsum(counts) - counts), counts)
                + np.arange(int(counts.sum())))
        infused = (np.repeat(np.arange(rows.size), counts),
                   *(a[pick] for a in self.infused[1:]))
        return dataclasses.replace(self, dt=dt, moving=(dt > 0).any(axis=0), bolus=bolus,
                                   dosed=(bolus != 0).any(axis=0), infused=infused)


def _matvec(m: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``m @ v`` for stacks of matrices ``(..., n, n)`` and vectors ``(..., n)``."""
    return (m @ v[..., None])[..., 0]


def _assign(target: np.ndarray, where: tuple[np.ndarray, ...], values: np.ndarray) -> None:
    target[where] = values


#: Plans by id of their Events and the structure (whose reason to refuse they hold),
#: confirmed by a weak reference (never by a reused id).
_PLANS: dict[tuple[int, Structure], tuple[weakref.ref, _Plan]] = {}


def _plan(structure: Structure, events: Events) -> _Plan:
    key = (id(events), structure)
    hit = _PLANS.get(key)
    if hit is not None and hit[0]() is events:
        return hit[1]
    selected = selection_of(events)
    parent = None if selected is None else _plan(structure, selected[0])
    plan = (_new_plan(structure, events) if parent is None or parent.reason is not None
            else parent.take(selected[1]))  # type: ignore[index]
    if len(_PLANS) >= 64:
        _PLANS.clear()
    _PLANS[key] = (weakref.ref(events), plan)
    return plan


def _new_plan(structure: Structure, events: Events) -> _Plan:
    n_rec = events.shape[1]
    time = np.asarray(events.time, dtype=float)
    evid = np.asarray(events.evid)
    bolus = (evid == 1) & (np.asarray(events.rate) == 0) & (np.asarray(events.dur) == 0)
    dt = np.diff(time, axis=1, prepend=time[:, :1])
    infused = _running(events, time)
    return _Plan(
        reason=slopes_unsupported(structure, events),
        govern=(np.maximum(np.arange(n_rec) - 1, 0) if events.covariates == "locf"
                else None),
        dt=dt, moving=(dt > 0).any(axis=0),
        bolus=np.where(bolus, np.asarray(events.amt, dtype=float), 0.0),
        dosed=bolus.any(axis=0), infused=infused,
        one_per_interval=np.unique(infused[0] * n_rec + infused[1]).size == infused[0].size)


def _running(events: Events, time: np.ndarray) -> tuple[np.ndarray, ...]:
    """:attr:`_Plan.infused`."""
    start, end, speed = _infusions(events)
    t_hi = time[:, :, None]  # (B, R, 1)
    t_lo = np.concatenate([time[:, :1], time[:, :-1]], axis=1)[:, :, None]
    lo = np.maximum(start[:, None, :], t_lo)
    hi = np.minimum(end[:, None, :], t_hi)
    b, k, j = np.nonzero((hi > lo) & (speed[:, None, :] > 0))
    return b, k, (hi - lo)[b, k, j], time[b, k] - hi[b, k, j], speed[b, j]


class _Steps:
    """Every interval's decomposition, input and divided differences, for all sets ``S``
    and records ``R`` at once (the interval ending at each record), and the step of the
    recurrence that carries the state and its derivatives across one of them."""

    def __init__(self, n: int, params: dict[str, np.ndarray], slope: np.ndarray,
                 dt: np.ndarray) -> None:
        """From the governing parameters ``(S, R)``, their slopes ``(S, R, P, m)`` and
        the intervals' lengths ``dt (S, R)``."""
        modes = decompose(n, params, False)
        self.slope = slope  # (S, R, P, m)
        self.lam, self.vec, self.inv = modes.lam, modes.p, modes.pinv  # (S, R, n[, n])
        self.alpha, self.beta = _rank_one_factors(n, params, self.vec, self.inv)
        self.decay = np.exp(self.lam * dt[..., None])
        # divided differences of exp(. dt) between modes, and (below) of the infusions'
        self.g = exp_divided_difference(self.lam[..., :, None], self.lam[..., None, :],
                                        dt[..., None, None])
        # what the infusions add over each interval to the amounts and their derivatives
        self.input = np.zeros(dt.shape + (n,))  # (S, R, n)
        self.constant = np.zeros(dt.shape + (n, slope.shape[-1]))  # (S, R, n, m)

    def add_infusions(self, plan: _Plan, repeats: int) -> None:
        """The infusions running in each interval, only where they run: their amounts
        ``sum_j f_j(K) r_j e1`` and derivatives ``sum_p P (N_p o F) P^-1 e1 dp`` with
        ``F = sum_j r_j f_j[lam_i, lam_l]``; as ``N_p = alpha beta'``, ``(N_p o F) b`` is
        ``alpha o (F (beta o b))``, ``b = P^-1 e1``."""
        b, k, length, after, rate = plan.infused
        if b.size == 0:
            return
        sets = (b[:, None] * repeats + np.arange(repeats)).ravel()
        k_s = np.repeat(k, repeats)
        length, after, rate = (np.repeat(a, repeats)[:, None] for a in (length, after, rate))
        flat = sets * self.lam.shape[1] + k_s

        def take(a: np.ndarray) -> np.ndarray:  # a[sets, k_s], 3x faster by np.take
            return np.take(a.reshape((-1,) + a.shape[2:]), flat, axis=0)

        lam, vec = take(self.lam), take(self.vec)  # (Q, n), (Q, n, n)
        unit = take(self.inv)[:, :, 0]  # b
        value = np.exp(lam * after) * length * relexp(lam * length)  # f_j(lam)
        # one infusion per interval (the usual): assigned; several: summed (slower)
        put = _assign if plan.one_per_interval else np.add.at
        put(self.input, (sets, k_s), _matvec(vec, rate * value * unit))
        li, ll = lam[:, :, None], lam[:, None, :]
        la, lb = length[:, :, None], after[:, :, None]
        pair = rate[:, :, None] * (exp_divided_difference(li, ll, lb) * la * relexp(ll * la)
                                   + np.exp(li * lb) * second_exp_divided_difference(li, ll,
                                                                                     la))
        moved = take(self.alpha) * (  # (Q, P, n); the products as matmul: 4x einsum's
            (take(self.beta) * unit[:, None, :]) @ np.swapaxes(pair, 1, 2))
        by_p = moved @ np.swapaxes(vec, 1, 2)  # (Q, P, n) in amounts
        put(self.constant, (sets, k_s), np.swapaxes(by_p, 1, 2) @ take(self.slope))

    def carry(self, k: int, x: np.ndarray, dx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Across the interval ending at record ``k``: ``x+ = E x + input`` and ``dx+ = E dx +
        sum_p P (N_p o G) P^-1 x dp`` plus the infusions' part, in modal coordinates."""
        inv, vec, decay = self.inv[:, k], self.vec[:, k], self.decay[:, k]
        w = _matvec(inv, x)
        moved = self.alpha[:, k] * ((self.beta[:, k] * w[:, None, :])
                                    @ np.swapaxes(self.g[:, k], 1, 2))
        modal = decay[..., None] * (inv @ dx) + np.swapaxes(moved, 1, 2) @ self.slope[:, k]
        return (_matvec(vec, decay * w) + self.input[:, k],
                vec @ modal + self.constant[:, k])

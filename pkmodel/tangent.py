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

import math
from collections.abc import Mapping

import numpy as np

from pkmodel.engine import (
    Events,
    Structure,
    decompose,
    exp_divided_difference,
    is_dose_modifier,
    relexp,
)

__all__ = ["central_amount_slopes", "slopes_unsupported"]

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
    if params is not None and any(is_dose_modifier(k) for k in params):
        return "dose modifiers (F, ALAG, R, D)"
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


def _rate_matrix_slopes(n: int, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``dK/dp (S, n, n)`` for each disposition parameter ``p`` (amounts in NONMEM's
    compartment order): ``K_11 = -(CL + sum Q_i) / V1``, ``K_1i = Q_i / V_i``,
    ``K_i1 = Q_i / V1``, ``K_ii = -Q_i / V_i``."""
    cl, v1 = params["CL"], params["V1"]
    shape = cl.shape + (n, n)
    peripheral = [("Q", "V2"), ("Q3", "V3")][:n - 1]
    total = cl + sum(params[q] for q, _ in peripheral)
    out = {"CL": np.zeros(shape), "V1": np.zeros(shape)}
    out["CL"][..., 0, 0] = -1.0 / v1
    out["V1"][..., 0, 0] = total / v1**2
    for i, (q_name, v_name) in enumerate(peripheral, start=1):
        q, v = params[q_name], params[v_name]
        dq, dv = np.zeros(shape), np.zeros(shape)
        dq[..., 0, 0], dq[..., 0, i] = -1.0 / v1, 1.0 / v
        dq[..., i, 0], dq[..., i, i] = 1.0 / v1, -1.0 / v
        dv[..., 0, i], dv[..., i, i] = -q / v**2, q / v**2
        out["V1"][..., i, 0] = -q / v1**2
        out[q_name], out[v_name] = dq, dv
    return out


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
    low, high = np.minimum(u, v), np.maximum(u, v)
    big = -low >= _SERIES_BELOW
    out = np.empty(u.shape)
    if big.any():  # (f[high, 0] - f[low, high]) / (0 - low), f the exponential's
        lo, hi = low[big], high[big]
        first_0 = relexp(hi)
        first_pair = exp_divided_difference(lo, hi, np.ones_like(lo))
        out[big] = (first_0 - first_pair) / -lo
    small = ~big
    if small.any():  # sum_k h_k(u, v) / (k + 2)!, h_k the complete symmetric polynomial
        a, b = u[small], v[small]
        largest = float(np.max(np.abs(np.concatenate([a, b])), initial=0.0))
        terms = _series_terms(largest)
        h = np.ones_like(a)
        power = np.ones_like(a)
        total = h / 2.0
        for k in range(1, terms):
            power = power * a
            h = b * h + power
            total = total + h / math.factorial(k + 2)
        out[small] = total
    return out * t**2


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
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(rate > 0, rate, amt / np.where(dur > 0, dur, 1.0))[rows, cols]
    start[rows, rank] = time[rows, cols]
    end[rows, rank] = time[rows, cols] + amt[rows, cols] / r
    speed[rows, rank] = r
    return start, end, speed


def central_amount_slopes(structure: Structure, events: Events,
                          params: Mapping[str, np.ndarray],
                          slopes: Mapping[str, np.ndarray], *,
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
    slopes : mapping of str to ndarray
        ``(S, R, m)``: the derivatives of each parameter in the ``m`` directions.
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
    >>> slopes = {"CL": np.ones((1, 2, 1)), "V1": np.zeros((1, 2, 1))}
    >>> a, d = central_amount_slopes(Structure(1), ev, params, slopes, at=np.array([[1]]))
    >>> round(float(a[0, 0]), 3), round(float(d[0, 0, 0]), 3)
    (81.873, -16.375)
    """
    reason = slopes_unsupported(structure, events, params)
    if reason is not None:
        raise ValueError(f"exact slopes of the solve do not apply: {reason}")
    n = structure.n_compartments
    names = structure.parameter_names
    b_count, n_rec = events.shape
    n_sets = params[names[0]].shape[0]
    repeats = n_sets // b_count
    m = slopes[names[0]].shape[-1]
    time = np.repeat(np.asarray(events.time, dtype=float), repeats, axis=0)
    evid = np.asarray(events.evid)
    amt = np.asarray(events.amt, dtype=float)
    bolus = (evid == 1) & (np.asarray(events.rate) == 0) & (np.asarray(events.dur) == 0)
    bolus_amt = np.repeat(np.where(bolus, amt, 0.0), repeats, axis=0)
    start, end, speed = (np.repeat(a, repeats, axis=0) for a in _infusions(events))
    moving = np.concatenate([[False], (np.diff(time, axis=1) > 0).any(axis=0)])
    locf = events.covariates == "locf"

    x = np.zeros((n_sets, n))
    dx = np.zeros((n_sets, n, m))
    central = np.empty((n_sets, n_rec))
    d_central = np.empty((n_sets, n_rec, m))
    t_prev = time[:, 0]
    for k in range(n_rec):
        tk = time[:, k]
        if moving[k]:
            own = max(k - 1, 0) if locf else k
            x, dx = _step(n, {p: params[p][:, own] for p in names},
                          np.stack([slopes[p][:, own] for p in names], axis=1),
                          tk - t_prev, x, dx, _overlap(start, end, speed, t_prev, tk))
        if bolus[:, k].any():
            x = x.copy()
            x[:, 0] += bolus_amt[:, k]
        central[:, k], d_central[:, k] = x[:, 0], dx[:, 0]
        t_prev = tk
    rows = np.repeat(np.asarray(at), repeats, axis=0)
    return (np.take_along_axis(central, rows, axis=1),
            np.take_along_axis(d_central, rows[..., None], axis=1))


def _overlap(start: np.ndarray, end: np.ndarray, speed: np.ndarray, t_prev: np.ndarray,
             tk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The infusions running in ``(t_prev, tk]``: the length inside it ``L``, the time
    from their end within it to ``tk`` and their rate, each ``(S, J')``; None if none."""
    lo = np.maximum(start, t_prev[:, None])
    hi = np.minimum(end, tk[:, None])
    inside = (hi > lo) & (speed > 0)
    used = inside.any(axis=0)
    if not used.any():
        return None
    lo, hi, inside = lo[:, used], hi[:, used], inside[:, used]
    length = np.where(inside, hi - lo, 0.0)
    after = np.where(inside, tk[:, None] - hi, 0.0)
    return length, after, np.where(inside, speed[:, used], 0.0)


def _step(n: int, p: dict[str, np.ndarray], slope: np.ndarray, dt: np.ndarray,
          x: np.ndarray, dx: np.ndarray,
          infusions: tuple[np.ndarray, np.ndarray, np.ndarray] | None
          ) -> tuple[np.ndarray, np.ndarray]:
    """The state and its derivatives ``(S, n)``, ``(S, n, m)`` carried over ``dt`` under
    parameters ``p`` with slopes ``slope (S, P, m)`` and the infusions running."""
    modes = decompose(n, p, False)
    lam, vec, inv = modes.lam, modes.p, modes.pinv
    w = np.einsum("sij,sj->si", inv, x)  # modal state
    b = inv[:, :, 0]  # modal image of a unit amount in the central compartment
    decay = np.exp(lam * dt[:, None])
    z = decay * w
    # G: divided differences of exp(. dt) between modes; F: of the infusions' f_j, summed
    g = exp_divided_difference(lam[:, :, None], lam[:, None, :], dt[:, None, None])
    f_sum = np.zeros_like(g)
    if infusions is not None:
        length, after, rate = infusions
        lam_j = lam[:, None, :]  # (S, 1, n)
        l_j, a_j = length[..., None], after[..., None]
        value = np.exp(lam_j * a_j) * l_j * relexp(lam_j * l_j)  # f_j(lam), (S, J, n)
        z = z + np.einsum("sj,sjn->sn", rate, value) * b
        li, ll = lam_j[..., :, None], lam_j[..., None, :]
        la, lb = l_j[..., None], a_j[..., None]
        pair = (exp_divided_difference(li, ll, lb) * la * relexp(ll * la)
                + np.exp(li * lb) * second_exp_divided_difference(li, ll, la))
        f_sum = np.einsum("sj,sjil->sil", rate, pair)
    x_new = np.einsum("sij,sj->si", vec, z)
    # d/dp of the step along each dK/dp: P (G o N_p) w + P (F o N_p) b, N_p = P^-1 dK P
    dk = _rate_matrix_slopes(n, p)
    n_p = np.stack([inv @ dk[name] @ vec for name in p], axis=1)  # (S, P, n, n)
    v = (np.einsum("spil,sil,sl->spi", n_p, g, w)
         + np.einsum("spil,sil,sl->spi", n_p, f_sum, b))
    by_p = np.einsum("sij,spj->spi", vec, v)  # (S, P, n) in amounts
    carried = np.einsum("sij,sjm->sim", vec, decay[:, :, None]
                        * np.einsum("sij,sjm->sim", inv, dx))
    return x_new, carried + np.einsum("spi,spm->sim", by_p, slope)

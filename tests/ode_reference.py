"""An independent reference: the compartment ODEs integrated numerically with scipy.

This shares no code with ``pkmodel.engine``: the rate matrix is written out from the
micro-constants, doses are a plain list of boluses and infusions (arrival times already
resolved), and ``solve_ivp`` integrates between breakpoints. :func:`ode_records` turns
NONMEM event records into such doses by the rules of docs/data.md, record by record.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np
from scipy.integrate import solve_ivp


@dataclass(frozen=True)
class Dose:
    """A bolus (``duration == 0``) or a zero-order infusion into compartment ``cmt`` (1-based)."""

    time: float
    cmt: int
    amount: float
    duration: float = 0.0


def rate_matrix(params: dict[str, float], n_cmt: int, depot: bool) -> np.ndarray:
    """dA/dt = K A for amounts ordered [depot], central, peripheral 1, peripheral 2."""
    size = n_cmt + int(depot)
    k = np.zeros((size, size), dtype=np.result_type(float, *params.values()))  # complex too
    c = int(depot)
    k[c, c] -= params["CL"] / params["V1"]
    peripherals = [("Q", "V2"), ("Q3", "V3")][: n_cmt - 1]
    for i, (q, v) in enumerate(peripherals, start=c + 1):
        k_out, k_back = params[q] / params["V1"], params[q] / params[v]
        k[c, c] -= k_out
        k[i, c] += k_out
        k[c, i] += k_back
        k[i, i] -= k_back
    if depot:
        k[0, 0] -= params["KA"]
        k[1, 0] += params["KA"]
    return k


def ode_amounts(
    segments: list[tuple[float, dict[str, float]]],
    doses: list[Dose],
    times: np.ndarray,
    *,
    n_cmt: int,
    depot: bool = False,
    method: str = "LSODA",
    rtol: float = 1e-12,
    initial: np.ndarray | None = None,
) -> np.ndarray:
    """Amounts at ``times`` (after any bolus at that time), by numerical integration.

    ``segments`` lists ``(start_time, params)``: each parameter set holds from its start
    until the next start. The system is empty before the first segment, or holds
    ``initial`` at its start.
    """
    size = n_cmt + int(depot)
    starts = [s for s, _ in segments]
    matrices = [rate_matrix(p, n_cmt, depot) for _, p in segments]
    peak = sum(d.amount for d in doses) + (0.0 if initial is None else np.abs(initial).sum())
    peak = peak or 1.0
    breaks = set(starts) | {d.time for d in doses} | {d.time + d.duration for d in doses}
    breaks |= set(np.asarray(times, dtype=float).tolist())
    grid = sorted(b for b in breaks if b >= starts[0])
    state = np.zeros(size) if initial is None else np.array(initial, dtype=float)
    out: dict[float, np.ndarray] = {}

    def apply_boluses(t: float) -> None:
        for d in doses:
            if d.duration == 0 and d.time == t:
                state[d.cmt - 1] += d.amount

    apply_boluses(grid[0])
    out[grid[0]] = state.copy()
    for lo, hi in pairwise(grid):
        if hi - lo < 1e-12 * max(1.0, abs(hi)):  # breakpoints apart by rounding only
            apply_boluses(hi)
            out[hi] = state.copy()
            continue
        k = matrices[int(np.searchsorted(starts, hi, side="left")) - 1]
        rate = np.zeros(size)
        for d in doses:
            if d.duration > 0 and d.time <= lo and d.time + d.duration >= hi:
                rate[d.cmt - 1] += d.amount / d.duration
        sol = solve_ivp(lambda _t, a, k=k, rate=rate: k @ a + rate, (lo, hi), state, method=method,
                        rtol=rtol, atol=1e-16 * peak)
        state = sol.y[:, -1].copy()
        apply_boluses(hi)
        out[hi] = state.copy()
    return np.array([out[float(t)] for t in times])


def ode_sensitivities(
    segments: list[tuple[float, dict[str, float], dict[str, np.ndarray]]],
    doses: list[Dose],
    times: np.ndarray,
    *,
    n_cmt: int,
    rtol: float = 1e-11,
) -> tuple[np.ndarray, np.ndarray]:
    """Amounts ``(T, n)`` and their derivatives ``(T, n, m)`` at ``times`` in ``m``
    directions, by integrating the forward sensitivity system ``dS/dt = K S + dK x`` with
    the state (no depot). Each segment is ``(start, params, slopes)``, ``slopes`` giving
    per parameter its derivative ``(m,)`` in the directions; ``dK`` along each direction
    comes from :func:`rate_matrix` by a complex step of 1e-30 (exact to rounding)."""
    starts = [s for s, _, _ in segments]
    m = len(next(iter(segments[0][2].values())))

    def rates(params: dict[str, float], slopes: dict[str, np.ndarray]) -> tuple:
        k = rate_matrix(params, n_cmt, False)
        dk = np.stack([rate_matrix({name: params[name] + 1e-30j * slopes[name][j]
                                    for name in params}, n_cmt, False).imag / 1e-30
                       for j in range(m)])
        return k, dk

    systems = [rates(p, d) for _, p, d in segments]
    breaks = set(starts) | {d.time for d in doses} | {d.time + d.duration for d in doses}
    breaks |= set(np.asarray(times, dtype=float).tolist())
    grid = sorted(b for b in breaks if b >= starts[0])
    state = np.zeros(n_cmt * (1 + m))
    out: dict[float, np.ndarray] = {}

    def apply_boluses(t: float) -> None:
        for d in doses:
            if d.duration == 0 and d.time == t:
                state[d.cmt - 1] += d.amount

    def field(_t: float, y: np.ndarray, k: np.ndarray, dk: np.ndarray,
              rate: np.ndarray) -> np.ndarray:
        x, sens = y[:n_cmt], y[n_cmt:].reshape(n_cmt, m)
        d_sens = k @ sens + np.einsum("jab,b->aj", dk, x)
        return np.concatenate([k @ x + rate, d_sens.ravel()])

    apply_boluses(grid[0])
    out[grid[0]] = state.copy()
    for lo, hi in pairwise(grid):
        k, dk = systems[int(np.searchsorted(starts, hi, side="left")) - 1]
        rate = np.zeros(n_cmt)
        for d in doses:
            if d.duration > 0 and d.time <= lo and d.time + d.duration >= hi:
                rate[d.cmt - 1] += d.amount / d.duration
        sol = solve_ivp(field, (lo, hi), state, method="LSODA", rtol=rtol, atol=1e-14,
                        args=(k, dk, rate))
        state = sol.y[:, -1].copy()
        apply_boluses(hi)
        out[hi] = state.copy()
    values = np.array([out[float(t)] for t in times])
    return values[:, :n_cmt], values[:, n_cmt:].reshape(len(times), n_cmt, m)


# ------------------------------------------------------------------ NONMEM event records


@dataclass(frozen=True)
class Record:
    """One NONMEM event record (columns as in the data; ``cmt`` 0 means compartment 1)."""

    time: float
    evid: int
    amt: float = 0.0
    rate: float = 0.0
    dur: float = 0.0
    ii: float = 0.0
    addl: int = 0
    ss: int = 0
    cmt: int = 0


def ode_records(
    records: list[Record],
    params: list[dict[str, float]],
    *,
    n_cmt: int,
    depot: bool = False,
    f: dict[int, float] | None = None,
    lag: dict[int, float] | None = None,
    covariates: str = "nocb",
) -> tuple[np.ndarray, np.ndarray]:
    """Amounts just before and just after each record's own events, by NONMEM's rules.

    An event-by-event interpreter written from docs/data.md, integrating the ODEs with
    :func:`ode_amounts` between record times. ``params[i]`` holds on record ``i``; the
    interval ``(t_prev, t]`` ending at a new time ``t`` uses the first record at or after
    ``t`` (NOCB) or the last record at or before ``t_prev`` (LOCF); steady state uses the
    dose record's own values. ``f`` and ``lag`` give F and ALAG per compartment (1-based).

    Pending inputs (lagged boluses, infusions, additional doses) are pieces ``Dose(start,
    cmt, amount, duration)``; an input arriving at a record time acts before every record
    at that time, and a reset (EVID 3/4, SS=1) clears the state and every pending piece.
    The steady state of a dose every ``II`` is the fixed point ``(I - E(II))^-1 c`` of the
    one-interval map, with ``E = expm(K II)`` and ``c`` the amounts after integrating, from
    zero over one interval ending at the record, every past dose's input folded into it.
    """
    from scipy.linalg import expm

    size = n_cmt + int(depot)
    f = f or {}
    lag = lag or {}
    times = [r.time for r in records]
    x = np.zeros(size)
    pending: list[Dose] = []
    before = np.zeros((len(records), size))
    after = np.zeros((len(records), size))

    def interval_params(t_prev: float, t: float) -> dict[str, float]:
        if covariates == "nocb":
            return params[next(i for i, ti in enumerate(times) if ti >= t)]
        return params[max(i for i, ti in enumerate(times) if ti <= t_prev)]

    def advance(state: np.ndarray, lo: float, hi: float, p: dict[str, float]) -> np.ndarray:
        pieces = []
        for d in pending:
            if d.duration == 0 and lo < d.time <= hi:
                pieces.append(d)
            elif d.duration > 0:
                start, end = max(d.time, lo), min(d.time + d.duration, hi)
                if end > start:
                    rate = d.amount / d.duration
                    pieces.append(Dose(start, d.cmt, rate * (end - start), end - start))
        return ode_amounts([(lo, p)], pieces, np.array([hi]), n_cmt=n_cmt, depot=depot,
                           initial=state)[0]

    def steady_state(t0: float, rec: Record, p: dict[str, float], amount: float,
                     duration: float, cmt: int) -> tuple[np.ndarray, list[Dose]]:
        """State at t0 from the doses at t0 - m II (m >= 1), and their inputs after t0."""
        tau, alag = rec.ii, lag.get(cmt, 0.0)
        n_back = int(np.floor((alag + duration) / tau)) + 2
        folded = []  # inputs of past doses inside the window [t0 - tau, t0), time from 0
        later = []  # inputs of past doses at or after t0
        for m in range(1, n_back + 1):
            start = tau - m * tau + alag  # dose m arrives here, window coordinates
            if duration == 0:
                if 0.0 <= start < tau:
                    folded.append(Dose(start, cmt, amount))
                elif start >= tau:
                    later.append(Dose(t0 + start - tau, cmt, amount))
                continue
            rate = amount / duration
            lo, hi = max(start, 0.0), min(start + duration, tau)
            if hi > lo:
                folded.append(Dose(lo, cmt, rate * (hi - lo), hi - lo))
            lo, hi = max(start, tau), start + duration
            if hi > lo:
                later.append(Dose(t0 + lo - tau, cmt, rate * (hi - lo), hi - lo))
        c = ode_amounts([(0.0, p)], folded, np.array([tau]), n_cmt=n_cmt, depot=depot)[0]
        transition = expm(rate_matrix(p, n_cmt, depot) * tau)
        state = np.linalg.solve(np.eye(size) - transition, c)
        for d in [d for d in later if d.duration == 0 and d.time == t0]:
            state[d.cmt - 1] += d.amount
        return state, [d for d in later if not (d.duration == 0 and d.time == t0)]

    t_now = times[0]
    for i, rec in enumerate(records):
        if rec.time > t_now:
            x = advance(x, t_now, rec.time, interval_params(t_now, rec.time))
            t_now = rec.time
            pending = [d for d in pending
                       if (d.time > t_now if d.duration == 0 else d.time + d.duration > t_now)]
        before[i] = x
        is_dose = rec.evid in (1, 4)
        if rec.evid in (3, 4) or (is_dose and rec.ss == 1):
            x = np.zeros(size)
            pending = []
        if is_dose:
            cmt = rec.cmt or 1
            amount = f.get(cmt, 1.0) * rec.amt
            duration = amount / rec.rate if rec.rate > 0 else rec.dur  # F shortens RATE doses
            alag = lag.get(cmt, 0.0)
            if rec.ss:
                state, later = steady_state(rec.time, rec, params[i], amount, duration, cmt)
                x = x + state
                pending += later
            for m in range(rec.addl + 1):
                start = rec.time + m * rec.ii + alag
                if m == 0 and alag == 0 and duration == 0:
                    x[cmt - 1] += amount
                else:
                    pending.append(Dose(start, cmt, amount, duration))
        after[i] = x
    return before, after

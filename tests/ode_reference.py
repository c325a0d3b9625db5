"""An independent reference: the compartment ODEs integrated numerically with scipy.

This shares no code with ``pkmodel.engine``: the rate matrix is written out from the
micro-constants, doses are a plain list of boluses and infusions (arrival times already
resolved), and ``solve_ivp`` integrates between breakpoints.
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
    k = np.zeros((size, size))
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
) -> np.ndarray:
    """Amounts at ``times`` (after any bolus at that time), by numerical integration.

    ``segments`` lists ``(start_time, params)``: each parameter set holds from its start
    until the next start. The system is empty before the first segment.
    """
    size = n_cmt + int(depot)
    starts = [s for s, _ in segments]
    matrices = [rate_matrix(p, n_cmt, depot) for _, p in segments]
    peak = sum(d.amount for d in doses) or 1.0
    breaks = set(starts) | {d.time for d in doses} | {d.time + d.duration for d in doses}
    breaks |= set(np.asarray(times, dtype=float).tolist())
    grid = sorted(b for b in breaks if b >= starts[0])
    state = np.zeros(size)
    out: dict[float, np.ndarray] = {}

    def apply_boluses(t: float) -> None:
        for d in doses:
            if d.duration == 0 and d.time == t:
                state[d.cmt - 1] += d.amount

    apply_boluses(grid[0])
    out[grid[0]] = state.copy()
    for lo, hi in pairwise(grid):
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

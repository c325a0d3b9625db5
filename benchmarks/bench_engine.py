"""Engine speed: exact closed-form propagation against scipy's solve_ivp.

asv layout (classes with ``setup`` and ``time_*`` methods); ``python benchmarks/run.py``
runs it without asv and reports ratios measured in the same run.
"""

from __future__ import annotations

import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
from scipy.integrate import solve_ivp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from ode_reference import rate_matrix

from pkmodel.engine import Structure, central_amounts, expand_records, solve

INFUSION = 2.0 / 24.0  # day: 2-h infusions (label)


def infliximab_year(weight: float = 30.0, mg_per_kg: float = 5.0):
    """Label regimen over one year: weeks 0, 2, 6, then every 8 weeks; weekly samples.

    Returns the engine's events and the dose list (start day, rate mg/day).
    """
    dose_days = [0.0, 14.0, 42.0] + [42.0 + 56.0 * k for k in range(1, 6)]
    amount = mg_per_kg * weight
    rows = [(d, 1, amount, amount / INFUSION) for d in dose_days]
    rows += [(7.0 * w, 0, 0.0, 0.0) for w in range(1, 53)]  # weekly samples (before doses)
    rows.sort(key=lambda r: (r[0], r[1]))
    time, evid, amt, rate = (np.array(c) for c in zip(*rows))
    events = expand_records(time, evid, amt, rate=rate, cmt=np.where(evid == 1, 1, 0))
    doses = [(d, amount / INFUSION) for d in dose_days]
    return events, doses, time[evid == 0]


def population(n: int, seed: int = 20261126) -> dict[str, np.ndarray]:
    """Two-compartment parameters of a 30-kg child: Fasanmade 2011 typical values
    (Clin Ther 33:946, combined model; shared/reference/infliximab_models.md, model A, at
    ALB 4.1 g/dL, ATI 0, IMM 0) with its IIV (CL 0.0942, V1 0.0159, V2 0.306)."""
    rng = np.random.default_rng(seed)
    wt = 30.0
    typical = {
        "CL": 5.42 * (wt / 65) ** -0.313 * wt / 1000,
        "V1": 52.4 * (wt / 65) ** -0.233 * wt / 1000,
        "Q": 2.26 * wt / 1000,
        "V2": 19.6 * (wt / 65) ** -0.588 * wt / 1000,
    }
    omega = {"CL": 0.0942, "V1": 0.0159, "Q": 0.0, "V2": 0.306}
    return {k: typical[k] * np.exp(rng.normal(0.0, np.sqrt(omega[k]), (n, 1))) for k in typical}


def ode_profile(params: dict[str, float], doses, obs_times, *, rtol=1e-8, method="LSODA"):
    """Central amounts at ``obs_times`` by solve_ivp, restarted at each infusion edge."""
    k = rate_matrix(params, 2, False)
    edges = sorted({0.0, obs_times[-1]} | {d for d, _ in doses} | {d + INFUSION for d, _ in doses})
    state = np.zeros(2)
    out = []
    for lo, hi in pairwise(edges):
        inflow = np.array([sum(r for d, r in doses if d <= lo < d + INFUSION), 0.0])
        inside = obs_times[(obs_times > lo) & (obs_times <= hi)]
        sol = solve_ivp(lambda _t, a, inflow=inflow: k @ a + inflow, (lo, hi), state,
                        method=method, rtol=rtol, atol=1e-10, t_eval=np.union1d(inside, [hi]))
        out.extend(sol.y[0, : inside.size])
        state = sol.y[:, -1]
    return np.array(out)


class EngineInfliximabYear:
    """One child, one year of label dosing, weekly concentrations."""

    n_sets = 10_000
    n_ode = 40  # solve_ivp is timed on a subset; the ratio is per profile

    def setup(self) -> None:
        self.events, self.doses, self.obs = infliximab_year()
        self.params = population(self.n_sets)
        self.obs_mask = self.events.evid[0] == 0
        self.at = np.flatnonzero(self.obs_mask)[None, :]  # the samples, as a likelihood asks

    def time_engine_10000_sets(self) -> None:
        solve(Structure(2), self.events, self.params)

    def time_engine_1_set(self) -> None:
        solve(Structure(2), self.events, {k: v[0, 0] for k, v in self.params.items()})

    def time_superposition_10000_sets(self) -> None:
        central_amounts(Structure(2), self.events, self.params, at=self.at)

    def time_superposition_1_set(self) -> None:
        central_amounts(Structure(2), self.events,
                        {k: v[:1, :1] for k, v in self.params.items()}, at=self.at)

    def time_solve_ivp_lsoda_40_sets(self) -> None:
        for i in range(self.n_ode):
            ode_profile({k: v[i, 0] for k, v in self.params.items()}, self.doses, self.obs)

    def report(self, seconds: dict[str, float]) -> list[str]:
        """Per-profile times and the speed-up, from timings of this run."""
        engine = seconds["time_engine_10000_sets"] / self.n_sets
        ode = seconds["time_solve_ivp_lsoda_40_sets"] / self.n_ode
        return [
            f"engine, per profile (10,000 sets in one call): {engine * 1e6:.1f} us",
            f"solve_ivp LSODA rtol 1e-8, per profile: {ode * 1e3:.2f} ms",
            f"speed-up per profile: {ode / engine:,.0f}x (target >= 100x)",
            (f"engine, one set alone: {seconds['time_engine_1_set'] * 1e3:.2f} ms "
             f"({ode / seconds['time_engine_1_set']:,.1f}x solve_ivp)"),
            (f"max relative difference vs solve_ivp LSODA rtol 1e-12 (20 sets): "
             f"{self.accuracy():.1e}"),
            (f"superposition (central_amounts at the samples), 10,000 sets: "
             f"{seconds['time_superposition_10000_sets'] * 1e3:.1f} ms "
             f"({seconds['time_engine_10000_sets'] / seconds['time_superposition_10000_sets']:.1f}x"
             " the record-by-record solve); one set: "
             f"{seconds['time_superposition_1_set'] * 1e3:.2f} ms "
             f"({seconds['time_engine_1_set'] / seconds['time_superposition_1_set']:.1f}x)"),
        ]

    def accuracy(self) -> float:
        """Largest relative difference, engine vs solve_ivp (LSODA, rtol 1e-12), 20 sets."""
        amounts = solve(Structure(2), self.events, self.params)[:, self.obs_mask, 0]
        worst = 0.0
        for i in range(20):
            ref = ode_profile({k: v[i, 0] for k, v in self.params.items()}, self.doses,
                              self.obs, rtol=1e-12, method="LSODA")
            worst = max(worst, float(np.max(np.abs(amounts[i] / ref - 1))))
        return worst


class EngineDenseCurve:
    """One child's year of label dosing sampled every 2 hours (4,380 samples): the curve a
    plot draws. Most samples fall between the end of an infusion and the next dose, where
    the state decays freely; baseline: the same records solved for the weekly samples
    only (52), in the same run."""

    def setup(self) -> None:
        weekly, _, _ = infliximab_year()
        dose = weekly.evid[0] == 1
        dose_time, amount, rate = (np.asarray(a)[0, dose] for a in (weekly.time, weekly.amt,
                                                                      weekly.rate))
        samples = np.arange(1, 365 * 12 + 1) / 12.0
        time = np.concatenate([dose_time, samples])
        evid = np.concatenate([np.ones(dose_time.size), np.zeros(samples.size)])
        order = np.lexsort((evid == 0, time))
        self.dense = expand_records(
            time[order], evid[order], np.concatenate([amount, 0 * samples])[order],
            rate=np.concatenate([rate, 0 * samples])[order], cmt=np.where(evid[order] == 1, 1, 0))
        self.weekly = weekly
        self.params = {k: v[0, 0] for k, v in population(1).items()}

    def time_dense_curve_1_set(self) -> None:
        solve(Structure(2), self.dense, self.params)

    def time_weekly_samples_1_set(self) -> None:
        solve(Structure(2), self.weekly, self.params)

    def report(self, seconds: dict[str, float]) -> list[str]:
        dense, weekly = seconds["time_dense_curve_1_set"], seconds["time_weekly_samples_1_set"]
        return [(f"a year sampled every 2 h (4,388 records), one set: {dense * 1e3:.2f} ms; "
                 f"the same doses with weekly samples (60 records): {weekly * 1e3:.2f} ms "
                 f"({dense / weekly:.1f}x for 73x the records)")]


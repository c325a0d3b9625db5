"""The exact gradient of the FOCE-I, FOCE and FO objectives in the population parameters
(FO's: :func:`fo_gradient`).

Each ID's objective at its conditional mode ``eta^`` (see :mod:`pkmodel.population`) is

``OBJ = OFV(eta^) + ln det OMEGA + ln det (M / 2)``,
``OFV(eta) = sum_j [ln V_j + (y_j - F_j)^2 / V_j] + eta' inv(OMEGA) eta``,
``M = sum_j [2 F_a F_b / V_j + V_a V_b / V_j^2] + 2 inv(OMEGA)``

with ``F`` the prediction on the fitted scale (``ln f`` for a log-additive error), ``V``
the residual variance (at the individual prediction for FOCE-I, at the ETA-0 prediction for
FOCE) and subscripts derivatives in the ETAs. Its total derivative in a population
parameter ``psi`` (THETA, OMEGA entry, SIGMA variance) follows the mode
(Almquist et al., J Pharmacokinet Pharmacodyn 2015):

``dOBJ/dpsi = dOFV/dpsi + d ln det OMEGA / dpsi + tr(inv(M) dM/dpsi)
+ sum_c tr(inv(M) dM/deta_c) deta^_c/dpsi``,
``deta^/dpsi = -inv(H) d2 OFV / deta dpsi``

(``dOFV/deta = 0`` at the mode; ``H`` the exact Hessian of OFV in the ETAs). A record
below its LLOQ (M3) or above its ULOQ enters ``OFV`` as ``-2 ln Phi(z)`` and ``M`` as
``2 m (m + z) z_a z_b`` (``m`` the inverse Mills ratio), as in :mod:`pkmodel.estimate`.
Everything comes from the predictions' exact first and second derivatives
(:mod:`pkmodel.sensitivity`): no finite difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pkmodel.model import PopulationModel
from pkmodel.sensitivity import (
    PredictionSensitivities,
    prediction_sensitivities,
    sensitivities_unsupported,
)

__all__ = ["fo_gradient", "focei_gradient", "focei_gradient_unsupported"]


def focei_gradient_unsupported(model: PopulationModel, table: pd.DataFrame) -> str | None:
    """Why :func:`focei_gradient` does not apply (None when it does): the limits of
    :func:`~pkmodel.sensitivity.sensitivities_unsupported`, and a combined error adding
    SDs (``combine="sd"``)."""
    reason = sensitivities_unsupported(model, table)
    if reason is not None:
        return reason
    residual = model.residual
    if residual.combine == "sd" and residual.additive and residual.proportional:
        return "a combined error adding SDs (combine='sd')"
    return None


@dataclass(frozen=True)
class _Residual:
    """The fitted prediction ``F``, the residual variance ``V`` and their derivatives at
    every observation ``(B, K)``; ``a`` indexes ETAs, ``p`` population parameters."""

    F: np.ndarray
    V: np.ndarray
    F_a: np.ndarray  # (B, K, n)
    F_p: np.ndarray  # (B, K, m)
    F_ab: np.ndarray  # (B, K, n, n)
    F_ap: np.ndarray  # (B, K, n, m)
    V_a: np.ndarray
    V_p: np.ndarray
    V_ab: np.ndarray
    V_ap: np.ndarray


def _fitted_scale(s: PredictionSensitivities, log: bool) -> tuple[np.ndarray, ...]:
    """``F`` and its derivatives: the prediction, or its logarithm."""
    f = np.where(s.mask, s.value, 1.0)
    if not log:
        return f, s.eta, s.theta, s.eta_eta, s.eta_theta
    fa, fc = s.eta / f[..., None], s.theta / f[..., None]
    return (np.log(f), fa, fc,
            s.eta_eta / f[..., None, None] - fa[..., :, None] * fa[..., None, :],
            s.eta_theta / f[..., None, None] - fa[..., :, None] * fc[..., None, :])


def _residual(model: PopulationModel, s: PredictionSensitivities,
              typical: PredictionSensitivities | None, n_omega: int,
              sigmas: Sequence[str]) -> _Residual:
    """:class:`_Residual` with the population parameters ordered THETAs, OMEGA entries,
    SIGMA variances; the variance at ``typical`` (ETA 0) when given (FOCE)."""
    res = model.residual
    log = res.log_scale
    F, F_a, F_t, F_ab, F_at = _fitted_scale(s, log)
    shape = F.shape
    n, m_t = F_a.shape[-1], F_t.shape[-1]
    # The variance as a function of the prediction it is taken at (g).
    g = typical if typical is not None else s
    f = np.where(g.mask, g.value, 0.0)
    sa2, sp2 = res.additive**2, (0.0 if log else res.proportional**2)
    # (a combined error adding SDs is refused: with one SD zero it is this one)
    V = sa2 + sp2 * f**2
    V_f, V_ff = 2 * sp2 * f, np.full(shape, 2 * sp2)
    V_s = np.stack([np.ones(shape) if kind == "additive" else f**2 for kind in sigmas],
                   axis=-1) if sigmas else np.zeros(shape + (0,))
    zeros_o = np.zeros(shape + (n_omega,))
    F_p = np.concatenate([F_t, zeros_o, np.zeros(shape + (len(sigmas),))], axis=-1)
    F_ap = np.concatenate([F_at, np.zeros(shape + (n, n_omega + len(sigmas)))], axis=-1)
    V_t = V_f[..., None] * g.theta
    if typical is not None:  # FOCE: the variance does not move with the ETAs
        V_a, V_ab = np.zeros(shape + (n,)), np.zeros(shape + (n, n))
        V_at = np.zeros(shape + (n, m_t))
        V_as = np.zeros(shape + (n, len(sigmas)))
    else:
        V_a = V_f[..., None] * s.eta
        V_ab = (V_ff[..., None, None] * s.eta[..., :, None] * s.eta[..., None, :]
                + V_f[..., None, None] * s.eta_eta)
        V_at = (V_ff[..., None, None] * s.eta[..., :, None] * s.theta[..., None, :]
                + V_f[..., None, None] * s.eta_theta)
        V_as = np.stack([np.zeros(shape + (n,)) if kind == "additive"
                         else 2 * f[..., None] * s.eta for kind in sigmas],
                        axis=-1) if sigmas else np.zeros(shape + (n, 0))
    V_p = np.concatenate([V_t, zeros_o, V_s], axis=-1)
    V_ap = np.concatenate([V_at, np.zeros(shape + (n, n_omega)), V_as], axis=-1)
    V = np.where(s.mask, V, 1.0)
    return _Residual(F, V, F_a, F_p, F_ab, F_ap, V_a, V_p, V_ab, V_ap)


def _second(r: np.ndarray, V: np.ndarray, F_x: np.ndarray, F_y: np.ndarray,
            F_xy: np.ndarray, V_x: np.ndarray, V_y: np.ndarray,
            V_xy: np.ndarray) -> np.ndarray:
    """Second derivative of ``ln V + r^2 / V`` (``r = y - F``) in ``x`` (axis -2) and
    ``y`` (axis -1)."""
    r, V = r[..., None, None], V[..., None, None]
    Fx, Fy = F_x[..., :, None], F_y[..., None, :]
    Vx, Vy = V_x[..., :, None], V_y[..., None, :]
    return (V_xy / V - Vx * Vy / V**2 + 2 * Fx * Fy / V - 2 * r * F_xy / V
            + 2 * r * (Fx * Vy + Fy * Vx) / V**2 - r**2 * V_xy / V**2
            + 2 * r**2 * Vx * Vy / V**3)


def _trace_dm(minv: np.ndarray, q: _Residual, w: np.ndarray, F_ax: np.ndarray,
              V_ax: np.ndarray, V_x: np.ndarray) -> np.ndarray:
    """``tr(inv(M) dM/dx)`` for the directions ``x`` (last axis), without OMEGA's part:
    ``dM_ab/dx = sum_j [2 (F_ax F_b + F_a F_bx) / V - 2 F_a F_b V_x / V^2
    + (V_ax V_b + V_a V_bx) / V^2 - 2 V_a V_b V_x / V^3]``."""
    V = q.V
    mf = np.einsum("bij,bkj->bki", minv, q.F_a)  # inv(M) F_a per observation
    mv = np.einsum("bij,bkj->bki", minv, q.V_a)
    fmf = np.einsum("bki,bki->bk", q.F_a, mf)
    vmv = np.einsum("bki,bki->bk", q.V_a, mv)
    per = (4 * np.einsum("bki,bkix->bkx", mf, F_ax) / V[..., None]
           - 2 * (fmf / V**2)[..., None] * V_x
           + 2 * np.einsum("bki,bkix->bkx", mv, V_ax) / (V**2)[..., None]
           - 2 * (vmv / V**3)[..., None] * V_x)
    return np.einsum("bk,bkx->bx", w, per)


def _estimated_etas(model: PopulationModel, table: pd.DataFrame,
                    omega_pairs: Sequence[tuple[int, int]]
                    ) -> tuple[np.ndarray, tuple[str, ...], list[tuple[int, int]], np.ndarray]:
    """The ETAs with a positive variance (indices, names), ``omega_pairs`` renumbered
    among them, and their OMEGA; raises where the exact gradient does not apply."""
    reason = focei_gradient_unsupported(model, table)
    if reason is not None:
        raise ValueError(f"the exact gradient does not apply: {reason}")
    active = np.flatnonzero(np.diag(model.omega) > 0)
    position = {int(i): k for k, i in enumerate(active)}
    return (active, tuple(model.eta_names[i] for i in active),
            [(position[i], position[j]) for i, j in omega_pairs],
            model.omega[np.ix_(active, active)])


def focei_gradient(model: PopulationModel, table: pd.DataFrame, eta: np.ndarray, *,
                   thetas: Sequence[str], omega_pairs: Sequence[tuple[int, int]],
                   sigmas: Sequence[str], interaction: bool = True,
                   covariates: str = "nocb") -> np.ndarray:
    """Each ID's exact gradient of its FOCE-I (``interaction``) or FOCE objective at its
    conditional mode ``eta``.

    Parameters
    ----------
    model : PopulationModel
        The model at the population parameters.
    table : DataFrame
        Validated records (:func:`~pkmodel.data.validate`).
    eta : ndarray
        ``(B, len(model.eta_names))`` conditional modes, IDs in order of appearance.
    thetas : sequence of str
        THETAs to differentiate by.
    omega_pairs : sequence of (int, int)
        OMEGA entries ``(i, j)``, ``i >= j`` (0-based), to differentiate by; a covariance
        moves both ``(i, j)`` and ``(j, i)``.
    sigmas : sequence of {"proportional", "additive"}
        Residual variances to differentiate by.
    interaction : bool
        FOCE-I (variance at the individual prediction) or FOCE (at the ETA-0 one).

    Returns
    -------
    ndarray
        ``(B, len(thetas) + len(omega_pairs) + len(sigmas))``.

    Raises
    ------
    ValueError
        Where it does not apply (:func:`focei_gradient_unsupported`).
    """
    active, names, pairs, omega = _estimated_etas(model, table, omega_pairs)
    oinv = np.linalg.inv(omega)
    eta_all = np.asarray(eta, dtype=float)
    s = prediction_sensitivities(model, table, eta_all, etas=names, thetas=thetas,
                                 covariates=covariates)
    typical = None if interaction else prediction_sensitivities(
        model, table, np.zeros_like(eta_all), etas=names, thetas=thetas,
        covariates=covariates)
    q = _residual(model, s, typical, len(pairs), sigmas)
    e = eta_all[:, active]
    dv = table["DV"].to_numpy(dtype=float)
    censored = _censoring(table, s, model.residual.log_scale)
    normal = s.mask & ~censored.any  # (a censored DV may be 0, or missing)
    w = normal.astype(float)
    y = np.where(normal, dv[np.maximum(s.rows, 0)], 1.0)
    if model.residual.log_scale:
        y = np.log(y)
    r = np.where(normal, y - q.F, 0.0)
    V = q.V
    n = len(active)
    # OMEGA's part: d inv(OMEGA) for each entry, and its terms.
    d_oinv = np.zeros((len(pairs), n, n))
    d_logdet = np.zeros(len(pairs))
    for c, (i, j) in enumerate(pairs):
        unit = np.zeros((n, n))
        unit[i, j] = unit[j, i] = 1.0
        d_oinv[c] = -oinv @ unit @ oinv
        d_logdet[c] = np.trace(oinv @ unit)
    m_t, m_o = len(thetas), len(pairs)

    def omega_part(per_entry: np.ndarray) -> np.ndarray:  # (B, m_o) into (B, m)
        out = np.zeros((len(e), q.F_p.shape[-1]))
        out[:, m_t:m_t + m_o] = per_entry
        return out

    explicit = (np.einsum("bk,bkx->bx", w, q.V_p / V[..., None]
                          - 2 * (r / V)[..., None] * q.F_p
                          - (r**2 / V**2)[..., None] * q.V_p)
                + omega_part(np.einsum("bi,cij,bj->bc", e, d_oinv, e) + d_logdet))
    hess = (np.einsum("bk,bkij->bij", w, _second(r, V, q.F_a, q.F_a, q.F_ab, q.V_a,
                                                   q.V_a, q.V_ab)) + 2 * oinv)
    cross = np.einsum("bk,bkix->bix", w, _second(r, V, q.F_a, q.F_p, q.F_ap, q.V_a,
                                                   q.V_p, q.V_ap))
    cross[:, :, m_t:m_t + m_o] += 2 * np.einsum("cij,bj->bic", d_oinv, e)
    fisher = (np.einsum("bk,bki,bkj->bij", w / V, 2 * q.F_a, q.F_a)
              + np.einsum("bk,bki,bkj->bij", w / V**2, q.V_a, q.V_a) + 2 * oinv)
    c = _CensoredTerms.of(q, censored) if censored.any.any() else None
    if c is not None:
        explicit = explicit + c.explicit
        hess, cross, fisher = hess + c.hess, cross + c.cross, fisher + c.fisher
    mode_moves = -np.linalg.solve(hess, cross)  # d eta^ / d psi, (B, n, m)
    minv = np.linalg.inv(fisher)
    trace_p = _trace_dm(minv, q, w, q.F_ap, q.V_ap, q.V_p)
    trace_p[:, m_t:m_t + m_o] += 2 * np.einsum("bij,cji->bc", minv, d_oinv)
    trace_eta = _trace_dm(minv, q, w, q.F_ab, q.V_ab, q.V_a)  # (B, n)
    if c is not None:
        trace_p = trace_p + c.trace(minv, c.z_p, c.z_ap)
        trace_eta = trace_eta + c.trace(minv, c.z_a, c.z_ab)
    return explicit + trace_p + np.einsum("ba,bam->bm", trace_eta, mode_moves)


@dataclass(frozen=True)
class _Censoring:
    """Which observations are censored ``(B, K)``: below their LLOQ (M3) or above their
    ULOQ, and the bound on the fitted scale."""

    below: np.ndarray
    above: np.ndarray
    bound: np.ndarray

    @property
    def any(self) -> np.ndarray:
        return self.below | self.above


def _censoring(table: pd.DataFrame, s: PredictionSensitivities, log: bool) -> _Censoring:
    rows = np.maximum(s.rows, 0)
    dv = table["DV"].to_numpy(dtype=float)[rows]
    nan = np.full(len(table), np.nan)
    lloq = (table["LLOQ"].to_numpy(dtype=float) if "LLOQ" in table else nan)[rows]
    uloq = (table["ULOQ"].to_numpy(dtype=float) if "ULOQ" in table else nan)[rows]
    with np.errstate(invalid="ignore", divide="ignore"):
        below = s.mask & np.isfinite(lloq) & (dv < lloq)
        above = s.mask & np.isfinite(uloq) & (dv > uloq)
        bound = np.where(below, lloq, np.where(above, uloq, 1.0))
        bound = np.log(bound) if log else bound
    return _Censoring(below, above, bound)


@dataclass(frozen=True)
class _CensoredTerms:
    """The censored observations' part of the objective's derivatives: their term
    ``-2 ln Phi(z)``, ``z = (LLOQ - F) / g`` below, ``(F - ULOQ) / g`` above (``g`` the
    residual SD), and their part ``2 m (m + z) z_a z_b`` of the FOCE Hessian (``m`` the
    inverse Mills ratio ``phi(z) / Phi(z)``), as :mod:`pkmodel.estimate` writes them."""

    explicit: np.ndarray  # (B, m)
    hess: np.ndarray  # (B, n, n)
    cross: np.ndarray  # (B, n, m)
    fisher: np.ndarray  # (B, n, n)
    weight: np.ndarray  # (B, K): 2 m (m + z) on censored observations, else 0
    slope: np.ndarray  # (B, K): its derivative in z
    z_a: np.ndarray
    z_p: np.ndarray
    z_ab: np.ndarray
    z_ap: np.ndarray

    @classmethod
    def of(cls, q: _Residual, censored: _Censoring) -> _CensoredTerms:
        from scipy.special import log_ndtr  # here: only censored data need scipy.special

        on = censored.any
        sign = np.where(censored.above, -1.0, 1.0)
        g = np.sqrt(q.V)
        a = np.where(on, sign * (censored.bound - q.F), 0.0)  # z = a / g
        z = a / g

        def first(F_x: np.ndarray, V_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            g_x = V_x / (2 * g[..., None])
            return (-sign[..., None] * F_x / g[..., None] - (a / g**2)[..., None] * g_x), g_x

        z_a, g_a = first(q.F_a, q.V_a)
        z_p, g_p = first(q.F_p, q.V_p)

        def second(F_xy: np.ndarray, V_xy: np.ndarray, F_y: np.ndarray, V_y: np.ndarray,
                   g_y: np.ndarray) -> np.ndarray:
            G = g[..., None, None]
            g_xy = V_xy / (2 * G) - q.V_a[..., :, None] * V_y[..., None, :] / (4 * G**3)
            A = a[..., None, None]
            a_x = (-sign[..., None] * q.F_a)[..., :, None]
            a_y = (-sign[..., None] * F_y)[..., None, :]
            return (-sign[..., None, None] * F_xy / G - (a_x * g_y[..., None, :]
                                                          + a_y * g_a[..., :, None]) / G**2
                    - A * g_xy / G**2 + 2 * A * g_a[..., :, None] * g_y[..., None, :] / G**3)

        z_ab = second(q.F_ab, q.V_ab, q.F_a, q.V_a, g_a)
        z_ap = second(q.F_ap, q.V_ap, q.F_p, q.V_p, g_p)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            mills = np.where(on, np.exp(-0.5 * z**2 - 0.5 * np.log(2 * np.pi) - log_ndtr(z)),
                             0.0)
        d_mills = -mills * (z + mills)
        c = on.astype(float)
        weight = c * 2 * mills * (mills + z)
        slope = c * 2 * (d_mills * (mills + z) + mills * (d_mills + 1))
        explicit = np.einsum("bk,bkx->bx", c * -2 * mills, z_p)
        hess = -2 * (np.einsum("bk,bki,bkj->bij", c * d_mills, z_a, z_a)
                     + np.einsum("bk,bkij->bij", c * mills, z_ab))
        cross = -2 * (np.einsum("bk,bki,bkx->bix", c * d_mills, z_a, z_p)
                      + np.einsum("bk,bkix->bix", c * mills, z_ap))
        fisher = np.einsum("bk,bki,bkj->bij", weight, z_a, z_a)
        return cls(explicit, hess, cross, fisher, weight, slope, z_a, z_p, z_ab, z_ap)

    def trace(self, minv: np.ndarray, z_x: np.ndarray, z_ax: np.ndarray) -> np.ndarray:
        """``tr(inv(M) dM_c/dx)`` for ``M_c = sum 2 m (m + z) z_a z_b`` and the
        directions ``x`` (last axis)."""
        mz = np.einsum("bij,bkj->bki", minv, self.z_a)
        zmz = np.einsum("bki,bki->bk", self.z_a, mz)
        return (np.einsum("bk,bkx->bx", self.slope * zmz, z_x)
                + 2 * np.einsum("bk,bki,bkix->bx", self.weight, mz, z_ax))


def fo_gradient(model: PopulationModel, table: pd.DataFrame, *, thetas: Sequence[str],
                omega_pairs: Sequence[tuple[int, int]], sigmas: Sequence[str],
                covariates: str = "nocb") -> np.ndarray:
    """Each ID's exact gradient of its FO objective ``ln det C + e' C^-1 e``, with
    ``e = y - f`` and ``C = G OMEGA G' + diag(V)`` at ETA 0 (``G`` the predictions'
    derivatives in the ETAs, ``V`` the residual variances):

    ``dOBJ = tr(C^-1 dC) - e' C^-1 dC C^-1 e - 2 e' C^-1 df``,
    ``dC = dG OMEGA G' + G OMEGA dG' + G dOMEGA G' + diag(dV)``.

    Parameters and result as :func:`focei_gradient` (the model without IOV, censored
    records or a log-additive error, which FO refuses).
    """
    _, names, pairs, omega = _estimated_etas(model, table, omega_pairs)
    ids = pd.unique(table["ID"])
    s = prediction_sensitivities(model, table, np.zeros((len(ids), len(model.eta_names))),
                                 etas=names, thetas=thetas, covariates=covariates)
    res = model.residual
    sa2, sp2 = res.additive**2, res.proportional**2
    dv = table["DV"].to_numpy(dtype=float)
    m_t, m_o = len(thetas), len(pairs)
    out = np.zeros((len(ids), m_t + m_o + len(sigmas)))
    for b in range(len(ids)):
        k = s.mask[b]
        if not k.any():
            continue
        f, g, f_t, g_t = s.value[b, k], s.eta[b, k], s.theta[b, k], s.eta_theta[b, k]
        e = dv[s.rows[b, k]] - f
        cov = g @ omega @ g.T + np.diag(sa2 + sp2 * f**2)
        inv = np.linalg.inv(cov)
        u = inv @ e
        d_cov = []
        for c in range(m_t):  # THETAs: through G and through the variance at f
            gd = g_t[:, :, c] @ omega @ g.T
            d_cov.append(gd + gd.T + np.diag(2 * sp2 * f * f_t[:, c]))
        for i, j in pairs:
            unit = np.zeros_like(omega)
            unit[i, j] = unit[j, i] = 1.0
            d_cov.append(g @ unit @ g.T)
        for kind in sigmas:
            d_cov.append(np.diag(np.ones_like(f) if kind == "additive" else f**2))
        d_f = np.concatenate([f_t, np.zeros((f.size, m_o + len(sigmas)))], axis=1)
        for c, dc in enumerate(d_cov):
            out[b, c] = np.sum(inv * dc) - u @ dc @ u - 2 * u @ d_f[:, c]
    return out

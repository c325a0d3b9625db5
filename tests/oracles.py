"""Independent oracles for the MAP tests: closed-form concentrations and NONMEM's FOCE-I
conditional objective, OBJ and ETC, written out from their equations.

Nothing here calls pkmodel: concentrations are the textbook closed forms (Gibaldi & Perrier,
Pharmacokinetics, 2nd ed., ch. 1-2), and the objective, its FOCE Hessian, OBJ and ETC follow
the equations of the ``pkmodel.estimate`` module docstring (NONMEM's ``$EST METHOD=1
INTERACTION`` conditional objective with M3 for records below LLOQ):

``OFV = sum_normal [ln g^2 + (y - f)^2 / g^2] + sum_blq -2 ln Phi(z) + eta' inv(OMEGA) eta``,
``z = (LLOQ - f) / g``; for log-additive error ``f``, ``y`` and ``LLOQ`` are their logarithms.

``H_foce = sum_normal [2 df df' / g^2 + 4 dg dg' / g^2] + sum_blq 2 m (m + z) dz dz'
+ 2 inv(OMEGA)`` with ``m = phi(z) / Phi(z)`` and ``dz = -(df + z dg) / g`` (first
derivatives only: the Gauss-Newton part of the Hessian, interaction included).
``ETC = inv(H_foce / 2)``; ``OBJ = OFV + ln det OMEGA - ln det ETC``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import log_ndtr


@dataclass(frozen=True)
class Error:
    """Residual error: SD ``sqrt(additive^2 + (proportional f)^2)`` (mg/L), or with
    ``log_scale`` the SD ``additive`` of ``ln Y`` around ``ln f``."""

    additive: float = 0.0
    proportional: float = 0.0
    log_scale: bool = False
    sd_sum: bool = False  # SD = additive + proportional f (Monolix/nlmixr2 "combined1")


def bolus_one_compartment(dose: float, cl: np.ndarray, v: np.ndarray,
                          times: np.ndarray) -> np.ndarray:
    """``C = D / V exp(-CL / V t)`` (mg/L) after a bolus at 0; parameters broadcast against
    ``times``."""
    return dose / v * np.exp(-cl / v * times)


def infusions_two_compartment(doses: list[tuple[float, float, float]], cl: np.ndarray,
                              v1: np.ndarray, q: np.ndarray, v2: np.ndarray,
                              times: np.ndarray) -> np.ndarray:
    """Central concentration (mg/L), two-compartment model, by superposition of zero-order
    infusions ``(start, amount, duration)``; parameters ``(M,)``, result ``(M, K)``.

    Unit-impulse response ``h(t) = sum_i a_i exp(-lambda_i t)`` with ``lambda_1,2`` the roots
    of ``lambda^2 - (k10 + k12 + k21) lambda + k10 k21`` and ``a_i = (k21 - lambda_i) /
    (V1 (lambda_j - lambda_i))``; an infusion at rate ``R`` from ``t0`` to ``t0 + T`` adds
    ``R sum_i a_i / lambda_i (exp(-lambda_i (t - min(t, t0 + T))) - exp(-lambda_i (t - t0)))``
    for ``t > t0`` (a sample at ``t0`` is the pre-dose trough).
    """
    cl, v1, q, v2 = (np.asarray(x, dtype=float)[:, None] for x in (cl, v1, q, v2))
    k10, k12, k21 = cl / v1, q / v1, q / v2
    total = k10 + k12 + k21
    root = np.sqrt(total**2 - 4.0 * k10 * k21)
    lam1, lam2 = (total + root) / 2.0, (total - root) / 2.0
    a1 = (k21 - lam1) / (v1 * (lam2 - lam1))
    a2 = (k21 - lam2) / (v1 * (lam1 - lam2))
    t = np.asarray(times, dtype=float)[None, :]
    out = np.zeros(np.broadcast_shapes(cl.shape, t.shape))
    for start, amount, duration in doses:
        after = t > start
        since = np.where(after, t - start, 0.0)
        since_end = np.where(after, t - np.minimum(t, start + duration), 0.0)
        rate = amount / duration
        for a, lam in ((a1, lam1), (a2, lam2)):
            out += np.where(after, rate * a / lam * (np.exp(-lam * since_end)
                                                     - np.exp(-lam * since)), 0.0)
    return out


def objective(f: np.ndarray, df: np.ndarray | None, y: np.ndarray, lloq: np.ndarray,
              error: Error, eta: np.ndarray, omega: np.ndarray,
              uloq: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """OFV and the FOCE Hessian for candidate ETAs.

    Parameters
    ----------
    f : (..., K) predictions (mg/L) at the K observations.
    df : (..., K, p) their derivatives with respect to the p ETAs, or None (no Hessian).
    y, lloq : (K,) observations and LLOQ (mg/L; nan where there is none).
    eta : (..., p); omega : (p, p).

    Returns
    -------
    OFV ``(...)`` and ``H_foce`` ``(..., p, p)`` (None without ``df``).
    """
    blq = np.isfinite(lloq) & (y < np.where(np.isfinite(lloq), lloq, -np.inf))
    # Above the ULOQ: -2 ln Phi((f - ULOQ) / g), the mirror image of M3; written below as
    # M3 of the reflected values -y, -f with limit -ULOQ.
    uloq = np.full(y.shape, np.nan) if uloq is None else uloq
    alq = np.isfinite(uloq) & (y > np.where(np.isfinite(uloq), uloq, np.inf))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if error.log_scale:
            f_fit, y_fit, limit = np.log(f), np.log(y), np.log(lloq)
            g = np.full(f.shape, error.additive)
        else:
            f_fit, y_fit, limit = f, y, lloq
            g = (error.additive + error.proportional * f if error.sd_sum
                 else np.sqrt(error.additive**2 + (error.proportional * f) ** 2))
        upper = np.log(uloq) if error.log_scale else uloq
        z = np.where(alq, (f_fit - upper) / g, (limit - f_fit) / g)
        normal = np.log(g**2) + ((y_fit - f_fit) / g) ** 2
        censored = -2.0 * log_ndtr(z)
    precision = np.linalg.inv(omega)
    blq = blq | alq  # both censored, each with its own z
    terms = np.where(blq, censored, normal)
    ofv = np.sum(np.where(np.isnan(terms), np.inf, terms), axis=-1) + np.einsum(
        "...i,ij,...j->...", eta, precision, eta)
    if df is None:
        return ofv, None
    if error.log_scale:
        df_fit, dg = df / f[..., None], np.zeros_like(df)
    else:
        df_fit = df
        dg = (error.proportional * df if error.sd_sum
              else error.proportional**2 * f[..., None] * df / g[..., None])
    z = np.where(blq, z, 0.0)  # records with a normal likelihood have no z
    mills = np.exp(-0.5 * z**2 - 0.5 * np.log(2.0 * np.pi) - log_ndtr(z))  # phi(z) / Phi(z)
    sign = np.where(alq, 1.0, -1.0)  # dz/df: +1/g above, -1/g below
    dz = (sign[..., None] * df_fit - z[..., None] * dg) / g[..., None]
    w_f = np.where(blq, 0.0, 2.0 / g**2)
    w_g = np.where(blq, 0.0, 4.0 / g**2)
    w_c = np.where(blq, 2.0 * mills * (mills + z), 0.0)
    hessian = (np.einsum("...k,...ki,...kj->...ij", w_f, df_fit, df_fit)
               + np.einsum("...k,...ki,...kj->...ij", w_g, dg, dg)
               + np.einsum("...k,...ki,...kj->...ij", w_c, dz, dz) + 2.0 * precision)
    return ofv, hessian


def etc_and_obj(ofv: float, hessian: np.ndarray, omega: np.ndarray) -> tuple[np.ndarray, float]:
    """NONMEM's ETC (``inv(H_foce / 2)``) and ``.phi`` OBJ (``OFV + ln det OMEGA -
    ln det ETC``)."""
    etc = np.linalg.inv(hessian / 2.0)
    return etc, float(ofv + np.linalg.slogdet(omega)[1] - np.linalg.slogdet(etc)[1])

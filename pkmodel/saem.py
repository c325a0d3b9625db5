"""SAEM (stochastic approximation expectation maximisation) and the importance-sampling
-2 log-likelihood that compares the models it fits.

SAEM (Delyon, Lavielle & Moulines 1999; Kuhn & Lavielle 2005; Monolix, NONMEM's
``METHOD=SAEM``) maximises the exact likelihood, with no linearisation. Each iteration:

1. *Simulation*: every ID's ETAs move by Metropolis-Hastings, ``chains`` chains per ID, with
   three kernels (saemix's and Monolix's): proposals from the prior ``N(0, OMEGA)``, a
   random walk on the whole vector and a random walk on one ETA at a time (scales adapted
   towards an acceptance of 40 %).
2. *Stochastic approximation* of the sufficient statistics,
   ``s_k = s_(k-1) + g_k (S - s_(k-1))``, with step ``g_k = 1`` during the burn-in and
   ``(k - burn-in)^-0.7`` after (Monolix's step-size exponent); the estimates are the mean
   of the iterates over the last half of the main phase (Polyak-Ruppert averaging). Both
   matter where the data say little about a variance, whose EM map contracts slowly: on
   pheno base (ETA1 shrinkage about 50 %, maximum-likelihood OMEGA(1,1) 0.152) a ``1/k``
   step with 2 chains left OMEGA(1,1) between 0.109 and 0.163 over three seeds (300 + 300
   iterations); these choices with 8 chains, between 0.131 and 0.157 over six.
3. *Maximisation*. An ETA whose parameter is ``exp(mu + ETA)`` (or ``mu + ETA``), ``mu`` a
   function of THETAs and covariates constant within an ID, is centred: ``phi = ln P`` (or
   ``P``) is the sampled quantity, and the THETAs only such ``mu`` use are the generalised
   least-squares fit of the approximated per-ID means of ``phi``; OMEGA is the approximated
   covariance of ``phi - mu``. The other THETAs and the residual variances maximise the
   likelihood of the current samples, stochastically approximated on the parameter (exact
   for a purely proportional or purely additive error, whose variance is linear in its
   statistic). During the burn-in OMEGA's variances and the residual variances shrink at
   most 5 % per iteration (Monolix's simulated annealing), which keeps the chains exploring.

The objective SAEM optimises is the likelihood itself; it is reported by importance
sampling (NONMEM's ``$EST METHOD=IMP EONLY=1``): per ID, draws from a multivariate t (4
degrees of freedom) centred on the conditional mean with the conditional covariance,
``-2 ln mean(p(y | eta) p(eta) / q(eta))``, with its Monte-Carlo standard error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import sympy as sp
from scipy import optimize
from scipy.special import gammaln, logsumexp

from pkmodel.data import plain_json, validate
from pkmodel.estimate import ConditionalLikelihood, estimate_map
from pkmodel.model import PopulationModel, evaluate_parameters

__all__ = ["ImportanceDraws", "ImportanceSampling", "SAEMOptions", "SAEMRun",
           "importance_sampling", "run_saem"]

_ACCEPT = 0.4  # target acceptance of the random-walk kernels
_ANNEAL = 0.95  # during the burn-in a variance keeps at least this share of its last value
_DOF = 4.0  # degrees of freedom of the importance-sampling proposal
_EXPONENT = 0.7  # the main phase steps k^-0.7 (Monolix's default step-size exponent)


@dataclass(frozen=True)
class SAEMOptions:
    """Settings of SAEM.

    Parameters
    ----------
    burn_in : int
        Iterations with step 1 (exploration; NONMEM's NBURN).
    iterations : int
        Iterations with step ``k^-0.7`` after the burn-in (NONMEM's NITER); the estimates
        are the mean of the iterates over the last half of them.
    chains : int
        Markov chains per ID (NONMEM's ISAMPLE).
    seed : int
        Seed of every random draw: the same seed gives the same estimates.
    samples : int
        Importance samples per ID for the -2 log-likelihood (NONMEM's IMP ISAMPLE).
    """

    burn_in: int = 200
    iterations: int = 300
    chains: int = 8
    seed: int = 0
    samples: int = 1000

    def __post_init__(self) -> None:
        for name in ("burn_in", "iterations", "chains", "samples"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"`{name}` must be a positive integer; got "
                                 f"{getattr(self, name)!r}")


@dataclass(frozen=True)
class SAEMRun:
    """What SAEM ends with.

    Attributes
    ----------
    model : PopulationModel
        The model at the final estimates.
    history : DataFrame
        ITERATION, PHASE (``"burn-in"``, ``"main"``) and every estimated parameter at each
        iteration (the estimates are the mean over the last half of the main phase, not
        the last row).
    mean : ndarray
        ``(n_ids, n_eta)`` conditional means of the ETAs over the second half of the main
        phase, at the final estimates.
    covariance : ndarray
        ``(n_ids, n_eta, n_eta)`` conditional covariances, likewise.
    drift : str
        ``""``, or the parameter that still drifted at the end of the burn-in.
    centred : tuple of str
        The ETAs SAEM centred (``phi = mu + ETA``), in model order.
    """

    model: PopulationModel
    history: pd.DataFrame
    mean: np.ndarray
    covariance: np.ndarray
    drift: str
    centred: tuple[str, ...]


# --------------------------------------------------------------------------- centring


@dataclass(frozen=True)
class _Centring:
    """Which ETAs are centred, on which parameter and scale, and which THETAs only their
    ``mu`` use."""

    parameter: tuple[str | None, ...]  # per ETA: the parameter it centres on
    log: tuple[bool, ...]  # per ETA: phi = ln P (else P)
    thetas: tuple[str, ...]  # estimated THETAs fitted by least squares on phi
    others: tuple[str, ...]  # estimated THETAs fitted on the likelihood of the samples
    covariates: dict[str, np.ndarray]  # per ID (first record)


def _centre_on(expr: sp.Expr, eta: sp.Symbol, etas: set[sp.Symbol]) -> bool | None:
    """True when ``expr = exp(mu + eta)``, False when ``mu + eta``, None otherwise, with
    ``mu`` free of ETAs."""
    if (expr.free_symbols & etas) != {eta}:
        return None
    typical = expr.subs(eta, 0)
    if typical == 0:
        return None
    if sp.simplify(expr / typical - sp.exp(eta)) == 0:
        return True
    if sp.simplify(expr - typical - eta) == 0:
        return False
    return None


def _centring(model: PopulationModel, table: pd.DataFrame,
              estimated: tuple[str, ...]) -> _Centring:
    etas = {sp.Symbol(n) for n in model.eta_names}
    ids = table["ID"].to_numpy()
    first = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    per_row = {c: table[c].to_numpy(dtype=float) for c in model.covariate_names}
    lengths = np.diff(np.r_[first, len(ids)])
    varying = {c for c, v in per_row.items()
               if not np.array_equal(v, np.repeat(v[first], lengths), equal_nan=True)}
    parameter: list[str | None] = []
    log: list[bool] = []
    for name in model.eta_names:
        eta = sp.Symbol(name)
        users = [p for p, expr in model.parameters.items() if eta in expr.free_symbols]
        kind = _centre_on(model.parameters[users[0]], eta, etas) if len(users) == 1 else None
        # mu must be one number per ID: no covariate of it may change within an ID
        if kind is not None and {str(x) for x in model.parameters[users[0]].free_symbols
                                 } & varying:
            kind = None
        parameter.append(users[0] if kind is not None else None)
        log.append(bool(kind))
    centred = {p for p in parameter if p is not None}
    used_elsewhere = set()
    for pname, expr in model.parameters.items():
        if pname not in centred:
            used_elsewhere |= {str(s) for s in expr.free_symbols}
    thetas = tuple(t for t in estimated if t not in used_elsewhere and any(
        sp.Symbol(t) in model.parameters[p].free_symbols for p in centred))
    others = tuple(t for t in estimated if t not in thetas)
    covariates = {c: v[first] for c, v in per_row.items()}
    return _Centring(tuple(parameter), tuple(log), thetas, others, covariates)


def _mu(model: PopulationModel, centring: _Centring, n_ids: int) -> np.ndarray:
    """``(n_ids, n_eta)`` typical ``phi`` of each ID (0 for ETAs not centred)."""
    values = evaluate_parameters(model, centring.covariates) if centring.covariates else \
        evaluate_parameters(model, {})
    out = np.zeros((n_ids, len(model.eta_names)))
    with np.errstate(divide="ignore", invalid="ignore"):
        for k, (pname, log) in enumerate(zip(centring.parameter, centring.log)):
            if pname is not None:
                v = np.broadcast_to(values[pname], (n_ids,))
                out[:, k] = np.log(v) if log else v
    return out


# --------------------------------------------------------------------------- simulation


@dataclass
class _Chains:
    """The Markov chains of every ID and the adapted random-walk scales."""

    eta: np.ndarray  # (n_ids, chains, n_eta)
    value: np.ndarray  # (n_ids, chains): -2 ln p(y | eta)
    scale_all: float = 1.0
    scale_one: np.ndarray | None = None


def _accept(rng: np.random.Generator, change: np.ndarray) -> np.ndarray:
    """Metropolis-Hastings: accept with probability ``min(1, exp(-change / 2))`` (``change``
    of ``-2 ln`` density; nan and +inf are refused)."""
    with np.errstate(invalid="ignore"):
        return np.log(rng.uniform(size=change.shape)) < -0.5 * change


def _move(chains: _Chains, candidate: np.ndarray, value: np.ndarray,
          accept: np.ndarray) -> None:
    chains.eta = np.where(accept[..., None], candidate, chains.eta)
    chains.value = np.where(accept, value, chains.value)


def _simulate(density: ConditionalLikelihood, chains: _Chains, omega: np.ndarray,
              rng: np.random.Generator) -> None:
    """Two proposals from the prior, two whole-vector and two one-ETA-at-a-time random
    walks per chain (saemix's default kernels), adapting the random-walk scales."""
    shape = chains.eta.shape
    n_eta = shape[2]
    chol = np.linalg.cholesky(omega)
    precision = np.linalg.inv(omega)
    sd = np.sqrt(np.diag(omega))

    def prior(e: np.ndarray) -> np.ndarray:
        return np.einsum("bci,ij,bcj->bc", e, precision, e)

    for _ in range(2):
        candidate = rng.standard_normal(shape) @ chol.T
        value = density(candidate)
        _move(chains, candidate, value, _accept(rng, value - chains.value))
    rates = []
    for _ in range(2):
        candidate = chains.eta + rng.standard_normal(shape) * sd * chains.scale_all
        value = density(candidate)
        accept = _accept(rng, value + prior(candidate) - chains.value - prior(chains.eta))
        _move(chains, candidate, value, accept)
        rates.append(accept.mean())
    chains.scale_all *= 1 + _ACCEPT * (np.mean(rates) - _ACCEPT)
    if chains.scale_one is None:
        chains.scale_one = np.ones(n_eta)
    for j in range(n_eta):
        rates = []
        for _ in range(2):
            candidate = chains.eta.copy()
            candidate[..., j] += rng.standard_normal(shape[:2]) * sd[j] * chains.scale_one[j]
            value = density(candidate)
            accept = _accept(rng, value + prior(candidate) - chains.value - prior(chains.eta))
            _move(chains, candidate, value, accept)
            rates.append(accept.mean())
        chains.scale_one[j] *= 1 + _ACCEPT * (np.mean(rates) - _ACCEPT)


# --------------------------------------------------------------------------- maximisation


def _with_thetas(model: PopulationModel, names: tuple[str, ...],
                 values: np.ndarray) -> PopulationModel:
    return model.with_values(dict(zip(names, map(float, values)))) if names else model


def _limits(names: tuple[str, ...], limits: Mapping[str, tuple[float, float]],
            scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of the scaled THETAs ``names`` (``-inf``, ``inf`` where none)."""
    lo = np.array([limits.get(n, (-np.inf, np.inf))[0] for n in names]) / scale
    hi = np.array([limits.get(n, (-np.inf, np.inf))[1] for n in names]) / scale
    return lo, hi


def _fit_centred_thetas(model: PopulationModel, centring: _Centring, means: np.ndarray,
                        limits: Mapping[str, tuple[float, float]]) -> PopulationModel:
    """The THETAs of the centred ``mu``: ``min sum_i (s_i - mu_i)' OMEGA^-1 (s_i - mu_i)``
    over the approximated per-ID means ``s_i`` of ``phi``."""
    names = centring.thetas
    if not names:
        return model
    start = np.array([model.theta[n] for n in names], dtype=float)
    scale = np.where(start != 0, np.abs(start), 1.0)
    whiten = np.linalg.inv(np.linalg.cholesky(model.omega))
    n_ids = means.shape[0]

    def residuals(x: np.ndarray) -> np.ndarray:
        mu = _mu(_with_thetas(model, names, x * scale), centring, n_ids)
        out = ((means - mu) @ whiten.T).ravel()
        return np.where(np.isfinite(out), out, 1e6)

    result = optimize.least_squares(residuals, start / scale, method="trf", xtol=1e-12,
                                    ftol=1e-12, gtol=1e-12,
                                    bounds=_limits(names, limits, scale))
    return _with_thetas(model, names, result.x * scale)


def _updated_omega(omega: np.ndarray, pattern: np.ndarray, means: np.ndarray,
                   square: np.ndarray, mu: np.ndarray, anneal: bool) -> np.ndarray:
    """OMEGA from the approximated ``sum_i E[phi phi']`` (``square``) and per-ID means,
    kept to the estimated pattern (other entries unchanged)."""
    n_ids = means.shape[0]
    full = (square - means.T @ mu - mu.T @ means + mu.T @ mu) / n_ids
    full = 0.5 * (full + full.T)
    out = np.where(pattern, full, omega)
    if anneal:
        diagonal = np.maximum(np.diag(out), _ANNEAL * np.diag(omega))
        np.fill_diagonal(out, diagonal)
    if np.linalg.eigvalsh(out).min() <= 0:  # a degenerate update: keep the last OMEGA
        return omega
    return out


def _fit_rest(model: PopulationModel, density: ConditionalLikelihood, eta: np.ndarray,
              names: tuple[str, ...], sigmas: tuple[str, ...],
              limits: Mapping[str, tuple[float, float]]) -> np.ndarray:
    """The other THETAs and the residual SDs (log) that maximise the likelihood of the
    current samples (predictions reused when no THETA changes them)."""
    start = np.array([model.theta[n] for n in names], dtype=float)
    scale = np.where(start != 0, np.abs(start), 1.0)
    sds = np.array([getattr(model.residual, k) for k in sigmas])
    fixed = density.predictions(eta) if not names else None

    def value(x: np.ndarray) -> float:
        residual = replace(model.residual,
                           **dict(zip(sigmas, map(float, np.exp(x[len(names):])))))
        if fixed is not None:
            total = density.terms(fixed, residual).sum()
        else:
            candidate = _with_thetas(model, names, x[:len(names)] * scale)
            total = density.at(candidate.with_values(residual=residual))(eta).sum()
        return float(total) if np.isfinite(total) else 1e300

    x0 = np.concatenate([start / scale, np.log(sds)])
    lo, hi = _limits(names, limits, scale)
    box = [(a if np.isfinite(a) else None, b if np.isfinite(b) else None)
           for a, b in zip(lo, hi)] + [(None, None)] * len(sigmas)
    result = optimize.minimize(value, x0, method="L-BFGS-B", bounds=box,
                               options={"maxiter": 30 if fixed is not None else 10})
    return np.concatenate([result.x[:len(names)] * scale, np.exp(result.x[len(names):])])


# --------------------------------------------------------------------------- the run


def _names(model: PopulationModel, thetas: tuple[str, ...], pairs: tuple[tuple[int, int], ...],
           sigmas: tuple[str, ...]) -> list[str]:
    return ([*thetas] + [f"OMEGA({i + 1},{j + 1})" for i, j in pairs]
            + [f"SIGMA({kind})" for kind in sigmas])


def _values(model: PopulationModel, thetas: tuple[str, ...],
            pairs: tuple[tuple[int, int], ...], sigmas: tuple[str, ...]) -> list[float]:
    return ([float(model.theta[n]) for n in thetas]
            + [float(model.omega[i, j]) for i, j in pairs]
            + [getattr(model.residual, kind) ** 2 for kind in sigmas])


def _check(model: PopulationModel) -> None:
    if model.iov:
        raise ValueError(f"SAEM is implemented without IOV: {model.name} has "
                         f"{list(model.iov)}; use FOCE-I, or model.without_iov()")
    if not model.eta_names or np.linalg.eigvalsh(model.omega).min() <= 0:
        raise ValueError("SAEM needs ETAs with a positive definite OMEGA (an ETA of "
                         "variance 0 is not random: remove it from the model)")


def run_saem(model: PopulationModel, data: pd.DataFrame, *, thetas: tuple[str, ...],
             omega: tuple[tuple[int, int], ...], sigmas: tuple[str, ...],
             options: SAEMOptions = SAEMOptions(), covariates: str = "nocb",
             progress: Callable[[int, float], None] | None = None,
             bounds: Mapping[str, tuple[float, float]] | None = None) -> SAEMRun:
    """Run SAEM from the values of ``model``.

    Parameters
    ----------
    model : PopulationModel
        Initial values; no IOV, OMEGA positive definite.
    data : DataFrame
        NONMEM-style records.
    thetas : tuple of str
        The THETAs to estimate (the others stay).
    omega : tuple of (int, int)
        The OMEGA entries ``(i, j)``, ``i >= j``, to estimate (0-based); the others stay.
    sigmas : tuple of str
        The residual SDs to estimate (``"proportional"``, ``"additive"``).
    options : SAEMOptions
    progress : callable, optional
        Called with the iteration and the sum of the chains' ``-2 ln p(y | eta)``.
    bounds : mapping of str to (float, float), optional
        Lower and upper bounds of THETAs (``-inf``, ``inf`` for none).

    Returns
    -------
    SAEMRun
    """
    _check(model)
    table = validate(data, covariates=model.covariate_names)
    density = ConditionalLikelihood(model, table, covariates=covariates)
    centring = _centring(model, table, thetas)
    limits = {n: (float(lo), float(hi)) for n, (lo, hi) in (bounds or {}).items()}
    n_ids, n_eta, total = len(density.ids), len(model.eta_names), (options.burn_in
                                                                    + options.iterations)
    rng = np.random.default_rng(options.seed)
    pattern = np.zeros((n_eta, n_eta), dtype=bool)
    for i, j in omega:
        pattern[i, j] = pattern[j, i] = True
    eta = np.zeros((n_ids, options.chains, n_eta))
    chains = _Chains(eta, density(eta))
    if not np.isfinite(chains.value).all():
        bad = density.ids[~np.isfinite(chains.value).all(axis=1)]
        raise ValueError(f"the likelihood of ID {bad[:5].tolist()} cannot be evaluated at "
                         "the initial values with ETAs 0: check the data and the values")
    names = _names(model, thetas, omega, sigmas)
    means = np.zeros((n_ids, n_eta))
    square = np.zeros((n_eta, n_eta))
    tail = max(1, options.iterations // 2)  # iterations whose samples give the conditionals
    phi_sum, phi_square = np.zeros((n_ids, n_eta)), np.zeros((n_ids, n_eta, n_eta))
    rest = np.array([*[model.theta[n] for n in centring.others],
                     *[getattr(model.residual, k) ** 2 for k in sigmas]], dtype=float)
    history: list[dict[str, Any]] = []
    averaged: list[PopulationModel] = []
    current = model
    for k in range(total):
        burning = k < options.burn_in
        step = 1.0 if burning else (k - options.burn_in + 1) ** -_EXPONENT
        _simulate(density, chains, current.omega, rng)
        phi = chains.eta + _mu(current, centring, n_ids)[:, None, :]
        means += step * (phi.mean(axis=1) - means)
        square += step * (np.einsum("bci,bcj->ij", phi, phi) / options.chains - square)
        if k >= total - tail:
            phi_sum += phi.sum(axis=1)
            phi_square += np.einsum("bci,bcj->bij", phi, phi)
        current = _fit_centred_thetas(current, centring, means, limits)
        mu = _mu(current, centring, n_ids)
        if omega:
            current = current.with_values(omega=_updated_omega(current.omega, pattern, means,
                                                                square, mu, burning))
        chains.eta = phi - mu[:, None, :]
        if centring.others or sigmas:
            rest = _approximate_rest(current, density, chains.eta, centring.others, sigmas,
                                     rest, step, burning, limits)
            current = _with_rest(current, centring.others, sigmas, rest)
        density = density.at(current)
        chains.value = density(chains.eta)
        history.append({"ITERATION": k + 1, "PHASE": "burn-in" if burning else "main",
                        **dict(zip(names, _values(current, thetas, omega, sigmas)))})
        if k >= total - tail:
            averaged.append(current)
        if progress is not None:
            progress(k + 1, float(chains.value.sum()))
    count = tail * options.chains
    mean_phi = phi_sum / count
    cov = phi_square / count - np.einsum("bi,bj->bij", mean_phi, mean_phi)
    # A chain that never moved (or a single sample) has no spread: OMEGA stands in.
    degenerate = np.linalg.eigvalsh(cov).min(axis=1) <= 1e-6 * np.diag(current.omega).min()
    cov[degenerate] = current.omega
    frame = pd.DataFrame(history)
    current = _average(averaged, thetas, sigmas)
    return SAEMRun(model=current, history=frame,
                   mean=mean_phi - _mu(current, centring, n_ids), covariance=cov,
                   drift=_drift(frame, names, options.burn_in),
                   centred=tuple(n for n, p in zip(model.eta_names, centring.parameter)
                                 if p is not None))


def _approximate_rest(model: PopulationModel, density: ConditionalLikelihood,
                      eta: np.ndarray, names: tuple[str, ...], sigmas: tuple[str, ...],
                      rest: np.ndarray, step: float, anneal: bool,
                      limits: Mapping[str, tuple[float, float]]) -> np.ndarray:
    """Stochastic approximation of the other THETAs and the residual variances towards
    the values that maximise the current samples' likelihood."""
    best = _fit_rest(model, density.at(model), eta, names, sigmas, limits)
    target = np.concatenate([best[:len(names)], best[len(names):] ** 2])
    out = rest + step * (target - rest)
    if anneal:
        variances = slice(len(names), None)
        out[variances] = np.maximum(out[variances], _ANNEAL * rest[variances])
    return out


def _with_rest(model: PopulationModel, names: tuple[str, ...], sigmas: tuple[str, ...],
               rest: np.ndarray) -> PopulationModel:
    model = _with_thetas(model, names, rest[:len(names)])
    return model.with_values(residual=replace(model.residual, **{
        kind: float(math.sqrt(v)) for kind, v in zip(sigmas, rest[len(names):])}))


def _average(models: list[PopulationModel], thetas: tuple[str, ...],
             sigmas: tuple[str, ...]) -> PopulationModel:
    """The mean of the iterates (Polyak-Ruppert averaging): THETAs, OMEGA and residual
    variances."""
    last = models[-1]
    theta = {n: float(np.mean([m.theta[n] for m in models])) for n in thetas}
    omega = np.mean([m.omega for m in models], axis=0)
    residual = replace(last.residual, **{
        kind: float(math.sqrt(np.mean([getattr(m.residual, kind) ** 2 for m in models])))
        for kind in sigmas})
    return last.with_values(theta, omega, residual)


def _drift(history: pd.DataFrame, names: list[str], burn_in: int) -> str:
    """The first parameter still moving at the end of the burn-in, or ''.

    Its mean over the last 20 % of the burn-in differs from the mean over the 20 % before
    by more than 1.5 SDs of those iterations (a trend, not the chains' wandering about
    the optimum, which on a poorly informed variance reaches one SD) and by more than 20 %
    of its size (for an OMEGA covariance, of the two SDs' product)."""
    window = history.iloc[int(0.6 * burn_in):burn_in]
    if len(window) < 10:
        return (f"a burn-in of {burn_in} iterations is too short to check that the "
                "parameters settled (at least 25 are needed)")
    half = len(window) // 2
    for name in names:
        values = window[name].to_numpy(dtype=float)
        shift = abs(values[half:].mean() - values[:half].mean())
        size = abs(values.mean())
        i, _, j = name[6:-1].partition(",")
        if name.startswith("OMEGA(") and i != j:
            size = math.sqrt(window[f"OMEGA({i},{i})"].mean() * window[f"OMEGA({j},{j})"].mean())
        if shift > 1.5 * values.std() and shift > 0.2 * size:
            return (f"{name} still moved at the end of the burn-in (its mean by {shift:.3g} "
                    "over the last 40 %): give SAEM a longer burn-in")
    return ""


# --------------------------------------------------------------------------- likelihood


@dataclass(frozen=True)
class ImportanceSampling:
    """An importance-sampling estimate of ``-2 ln L`` (NONMEM's OFV convention: without
    ``N_obs ln 2 pi``).

    Attributes
    ----------
    ofv : float
        Sum over IDs.
    se : float
        Its Monte-Carlo standard error.
    individuals : DataFrame
        ID, OBJ (each ID's ``-2 ln p(y_i)``) and SE.
    """

    ofv: float
    se: float
    individuals: pd.DataFrame

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready: ofv, se and the per-ID values."""
        return plain_json({"ofv": self.ofv, "se": self.se,
                           "individuals": self.individuals.to_dict(orient="records")})


@dataclass(frozen=True)
class ImportanceDraws:
    """Importance-sampling draws per ID, fixed: with the same draws (common random
    numbers) the sampled ``-2 ln L`` is a smooth function of the population parameters,
    which the covariance step differentiates.

    Attributes
    ----------
    eta : ndarray
        ``(n_ids, samples, n_eta)`` draws from a multivariate t (4 degrees of freedom).
    log_q : ndarray
        ``(n_ids, samples)`` their log proposal density.
    """

    eta: np.ndarray
    log_q: np.ndarray

    @classmethod
    def around(cls, mean: np.ndarray, covariance: np.ndarray, *, samples: int,
               seed: int) -> ImportanceDraws:
        """Draws centred on ``mean (n_ids, n_eta)`` with scale ``covariance``."""
        n_ids, n_eta = mean.shape
        chol = np.linalg.cholesky(covariance)
        rng = np.random.default_rng(seed)
        z = rng.standard_normal((n_ids, samples, n_eta))
        stretch = np.sqrt(_DOF / rng.chisquare(_DOF, (n_ids, samples)))
        eta = mean[:, None, :] + np.einsum("bij,bsj->bsi", chol, z) * stretch[..., None]
        maha = np.einsum("bsi,bsi->bs", z, z) * stretch**2
        log_norm = (gammaln((_DOF + n_eta) / 2) - gammaln(_DOF / 2)
                    - 0.5 * n_eta * math.log(_DOF * math.pi)
                    - np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1))
        return cls(eta, log_norm[:, None] - 0.5 * (_DOF + n_eta) * np.log1p(maha / _DOF))

    def objective(self, density: ConditionalLikelihood) -> tuple[np.ndarray, np.ndarray]:
        """Each ID's ``-2 ln p(y_i)`` under ``density``'s model and its Monte-Carlo SE."""
        model = density.model
        precision = np.linalg.inv(model.omega)
        prior_logdet = float(np.linalg.slogdet(2 * math.pi * model.omega)[1])
        logs = []
        for lo in range(0, self.eta.shape[1], 250):
            eta = self.eta[:, lo:lo + 250]
            joint = -0.5 * (density(eta) + np.einsum("bsi,ij,bsj->bs", eta, precision, eta)
                            + prior_logdet)
            logs.append(np.where(np.isfinite(joint), joint - self.log_q[:, lo:lo + 250],
                                 -np.inf))
        log_w = np.concatenate(logs, axis=1)
        samples = log_w.shape[1]
        obj = -2.0 * (logsumexp(log_w, axis=1) - math.log(samples))
        with np.errstate(invalid="ignore"):
            w = np.exp(log_w - log_w.max(axis=1, keepdims=True))
            se = 2.0 * w.std(axis=1) / (w.mean(axis=1) * math.sqrt(samples))
        return obj, se


def importance_sampling(model: PopulationModel, data: pd.DataFrame, *, samples: int = 1000,
                        seed: int = 0, mean: np.ndarray | None = None,
                        covariance: np.ndarray | None = None,
                        covariates: str = "nocb") -> ImportanceSampling:
    """``-2 ln L`` of the population parameters of ``model`` by importance sampling.

    Per ID, ``samples`` ETA vectors from a multivariate t (4 degrees of freedom) centred on
    ``mean`` with scale ``covariance`` (by default the conditional mode and ETC of
    :func:`~pkmodel.estimate.estimate_map`) weigh ``p(y | eta) p(eta) / q(eta)``; the
    estimate is ``-2 ln`` of the mean weight, summed over IDs.

    Parameters
    ----------
    model : PopulationModel
        No IOV, OMEGA positive definite.
    data : DataFrame
        NONMEM-style records.
    samples : int
        Draws per ID.
    seed : int
    mean, covariance : ndarray, optional
        ``(n_ids, n_eta)`` and ``(n_ids, n_eta, n_eta)`` proposal centres and scales, IDs in
        order of appearance.

    Returns
    -------
    ImportanceSampling

    Examples
    --------
    >>> from pkmodel.data import infliximab_regimen
    >>> from pkmodel.models import load
    >>> table = infliximab_regimen(28.0, until_week=22,
    ...                            covariates={"ALB": 3.3, "ATI": 0, "IMM": 1})
    >>> table.loc[(table.EVID == 0) & (table.TIME == 98.0), ["MDV", "DV"]] = [0, 3.2]
    >>> result = importance_sampling(load("fasanmade2011").without_iov(), table)
    >>> bool(result.se < 0.05)
    True
    """
    _check(model)
    if samples < 1:
        raise ValueError(f"`samples` must be a positive integer; got {samples!r}")
    table = validate(data, covariates=model.covariate_names)
    density = ConditionalLikelihood(model, table, covariates=covariates)
    n_ids, n_eta = len(density.ids), len(model.eta_names)
    if mean is None or covariance is None:
        fit = estimate_map(model, table, covariates=covariates, starts=1)
        mean = fit.individuals[list(model.eta_names)].to_numpy(dtype=float)
        covariance = fit.etcs()
    mean, covariance = np.asarray(mean, dtype=float), np.asarray(covariance, dtype=float)
    if mean.shape != (n_ids, n_eta) or covariance.shape != (n_ids, n_eta, n_eta):
        raise ValueError(f"`mean` must be ({n_ids}, {n_eta}) and `covariance` ({n_ids}, "
                         f"{n_eta}, {n_eta}); got {mean.shape} and {covariance.shape}")
    draws = ImportanceDraws.around(mean, covariance, samples=samples, seed=seed)
    obj, se = draws.objective(density)
    frame = pd.DataFrame({"ID": density.ids, "OBJ": obj, "SE": se})
    return ImportanceSampling(ofv=float(obj.sum()), se=float(np.sqrt((se**2).sum())),
                              individuals=frame)

"""Several models for one patient: their covariates from one clinical record, their fits,
marginal likelihoods and weights (Bayesian model averaging, or selection), averaged
predictions, and each model's recommendation side by side.

A model's weight is its prior weight times its marginal likelihood ``p(data | model)``,
the likelihood of the measured values with the ETAs (and KAPPAs) integrated out:

* Laplace: ``-2 ln p = OBJ + N ln 2 pi`` (NONMEM's ``.phi`` OBJ is exactly the Laplace
  approximation with the FOCE Hessian), plus ``2 sum ln y`` for a log-additive error so
  that every model's likelihood is of the concentrations themselves;
* importance sampling (the weights used): ``p = mean(p(data, eta) / q(eta))`` over draws
  from a multivariate t centred on the MAP with the ETC as scale; its Monte Carlo error is
  reported. The two agree closely when the posterior is near normal.

Models whose covariates cannot be formed from the record, or whose fit fails, get weight 0
with the reason. Every measured value enters every model in the same unit (mg/L).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import gammaln, logsumexp

from pkmodel.data import plain_json, validate
from pkmodel.dosing import (
    Recommendation,
    allocate_draws,
    recommend_averaged,
    recommend_regimen,
)
from pkmodel.errors import CovariateError, PKModelError
from pkmodel.estimate import MAPEstimate, estimate_map, objective, sample_posterior
from pkmodel.model import PopulationModel, covariates_outside_range
from pkmodel.predict import draw_concentrations, predict

__all__ = ["ModelComparison", "compare_models", "for_model", "forecast_averaged",
           "predict_averaged", "recommend_with_models"]

#: Clinical fields a record may hold, and what each model covariate is made from.
CLINICAL_FIELDS = {"WT": "body weight (kg)", "ALB": "albumin (unit given by albumin_unit)",
                   "SEX": "sex, F or M", "AGE": "age (years)", "CRP": "C-reactive protein "
                   "(mg/L)", "ATI": "antibodies to infliximab (0/1)",
                   "IMM": "immunomodulator (0/1)", "DIAGNOSIS": "CD or UC"}
_ALBUMIN = {"g/dL": 1.0, "g/L": 10.0}


def for_model(model: PopulationModel, data: pd.DataFrame, *,
              albumin_unit: str = "g/dL") -> pd.DataFrame:
    """The patient's records with the covariates ``model`` needs, made from the clinical
    fields (CLINICAL_FIELDS): albumin converted to the model's unit, FEMALE and MALE from
    SEX, CD and UC from DIAGNOSIS; columns the model names directly are used as they are.

    Raises
    ------
    CovariateError
        Naming every clinical field the model needs and the record lacks.

    Examples
    --------
    >>> from pkmodel.models import load
    >>> record = pd.DataFrame({"ID": 1, "TIME": [0.0], "AMT": [100.0], "WT": 20.0,
    ...                        "ALB": 3.5, "CRP": 8.0})
    >>> float(for_model(load("zhao2026"), record)["ALB"].iloc[0])   # g/dL -> g/L
    35.0
    """
    if albumin_unit not in _ALBUMIN:
        raise ValueError(f"`albumin_unit` must be 'g/dL' or 'g/L'; got {albumin_unit!r}")
    out = data.copy()
    missing = []
    for cov in model.covariates:
        name = cov.name
        if name == "ALB" and "ALB" in data.columns:
            out["ALB"] = data["ALB"].astype(float) * (
                _ALBUMIN.get(cov.unit, 1.0) / _ALBUMIN[albumin_unit])
        elif name in ("FEMALE", "MALE") and name not in data.columns:
            if "SEX" not in data.columns:
                missing.append("SEX")
                continue
            sex = data["SEX"].astype(str).str.upper().str[0]
            if not sex.isin(["F", "M"]).all():
                raise CovariateError(f"column 'SEX': expected F or M; got "
                                     f"{sorted(set(data['SEX'].astype(str)))}")
            out[name] = (sex == name[0]).astype(float)
        elif name in ("CD", "UC") and name not in data.columns:
            if "DIAGNOSIS" not in data.columns:
                missing.append("DIAGNOSIS")
                continue
            out[name] = (data["DIAGNOSIS"].astype(str).str.upper() == name).astype(float)
        elif name not in data.columns:
            missing.append(name)
    if missing:
        needed = ", ".join(f"{m} ({CLINICAL_FIELDS.get(m, 'a column of that name')})"
                           for m in dict.fromkeys(missing))
        raise CovariateError(f"{model.name} needs {needed}, which the records lack")
    return out


@dataclass(frozen=True)
class ModelComparison:
    """Models side by side for one patient.

    Attributes
    ----------
    table : DataFrame
        One row per model: MODEL, USABLE, MESSAGE (why not usable), OUTSIDE_RANGE
        (covariates outside the model's data), N_OBS, OFV, OBJ, LOG_ML_LAPLACE, LOG_ML
        (importance sampling), LOG_ML_SE (its Monte Carlo SE), PRIOR, WEIGHT, SELECTED.
    fits : dict
        Model name to its MAPEstimate (usable models).
    data : dict
        Model name to the records with its covariates.
    models : dict
        Model name to model.
    """

    table: pd.DataFrame
    fits: dict[str, MAPEstimate]
    data: dict[str, pd.DataFrame]
    models: dict[str, PopulationModel]

    @property
    def weights(self) -> dict[str, float]:
        return dict(zip(self.table["MODEL"], self.table["WEIGHT"].astype(float)))

    @property
    def selected(self) -> str:
        """The model with the largest weight."""
        return str(self.table.loc[self.table["SELECTED"], "MODEL"].iloc[0])

    def to_dict(self) -> dict[str, Any]:
        return plain_json({"models": self.table.to_dict(orient="records"),
                           "selected": self.selected})


def compare_models(models: Sequence[PopulationModel], data: pd.DataFrame, *,
                   albumin_unit: str = "g/dL", prior: Mapping[str, float] | None = None,
                   draws: int = 1000, seed: int = 0) -> ModelComparison:
    """Fit one patient with each model and weigh the models by their marginal likelihood.

    Parameters
    ----------
    models : sequence of PopulationModel
    data : DataFrame
        One patient's records with clinical fields (see :func:`for_model`) and measured
        concentrations (mg/L).
    albumin_unit : {"g/dL", "g/L"}
        The unit of the record's ALB.
    prior : mapping, optional
        Prior weight per model name (default equal); normalised.
    draws : int
        Importance-sampling draws per model.
    seed : int

    Returns
    -------
    ModelComparison
    """
    if validate(data)["ID"].nunique() != 1:
        raise ValueError("compare_models takes one patient's records")
    rows, fits, tables, by_name = [], {}, {}, {}
    for model in models:
        by_name[model.name] = model
        row: dict[str, Any] = {"MODEL": model.name, "USABLE": False, "MESSAGE": "",
                               "OUTSIDE_RANGE": ""}
        try:
            table = for_model(model, data, albumin_unit=albumin_unit)
            with warnings.catch_warnings():  # reported in OUTSIDE_RANGE and MESSAGE
                warnings.simplefilter("ignore")
                fit = estimate_map(model, table)
            row["OUTSIDE_RANGE"] = "; ".join(covariates_outside_range(model, table))
            ind = fit.individuals.iloc[0]
            if not fit.success:
                raise PKModelError(f"the fit failed: {ind['MESSAGE']}")
            laplace, log_ml, se = _marginal(model, table, fit, draws, seed)
            row.update(USABLE=True, N_OBS=int(ind["N_OBS"]), OFV=float(ind["OFV"]),
                       OBJ=float(ind["OBJ"]), LOG_ML_LAPLACE=laplace, LOG_ML=log_ml,
                       LOG_ML_SE=se)
            fits[model.name], tables[model.name] = fit, table
        except (PKModelError, ValueError) as err:
            row["MESSAGE"] = str(err)
        rows.append(row)
    frame = pd.DataFrame(rows)
    for column in ("N_OBS", "OFV", "OBJ", "LOG_ML_LAPLACE", "LOG_ML", "LOG_ML_SE"):
        if column not in frame:
            frame[column] = np.nan
    weights = {m.name: 1.0 for m in models} if prior is None else dict(prior)
    frame["PRIOR"] = [float(weights.get(n, 0.0)) for n in frame["MODEL"]]
    frame["PRIOR"] /= frame["PRIOR"].sum()
    usable = frame["USABLE"].to_numpy(bool) & (frame["PRIOR"].to_numpy() > 0)
    log_post = np.where(usable, np.log(np.where(usable, frame["PRIOR"], 1.0))
                        + frame["LOG_ML"].fillna(-np.inf).to_numpy(), -np.inf)
    if not np.isfinite(log_post).any():
        raise PKModelError("no model could be fitted to these records: "
                           + "; ".join(f"{r['MODEL']}: {r['MESSAGE']}" for r in rows))
    frame["WEIGHT"] = np.exp(log_post - logsumexp(log_post))
    frame["SELECTED"] = np.arange(len(frame)) == int(np.argmax(frame["WEIGHT"]))
    return ModelComparison(frame, fits, tables, by_name)


def _marginal(model: PopulationModel, table: pd.DataFrame, fit: MAPEstimate, draws: int,
              seed: int) -> tuple[float, float, float]:
    """ln p(data | model): Laplace, importance sampling and the latter's Monte Carlo SE,
    all on the scale of the concentrations (mg/L)."""
    ind = fit.individuals.iloc[0]
    records = validate(table)
    measured = (records["EVID"] == 0) & (records["MDV"] == 0)
    if "LLOQ" in records.columns:
        measured &= ~(records["DV"] < records["LLOQ"])  # censored: a probability, no density
    n_obs = int(measured.sum())
    jacobian = 0.0
    if model.residual.log_scale:  # the density of ln Y, made one of Y
        jacobian = 2.0 * float(np.log(records.loc[measured, "DV"].astype(float)).sum())
    constant = n_obs * math.log(2 * math.pi) + jacobian
    laplace = -0.5 * (float(ind["OBJ"]) + constant)
    names = list(fit.names)
    mode = ind[names].to_numpy(dtype=float)
    etc = fit.etc(fit.individuals.index[0])
    rng = np.random.default_rng(seed)
    dof, p = 4.0, len(names)
    chol = np.linalg.cholesky(etc)
    z = rng.standard_normal((draws, p))
    scale = np.sqrt(dof / rng.chisquare(dof, (draws, 1)))
    points = mode + (z @ chol.T) * scale
    copies = pd.concat([records.assign(ID=k) for k in range(draws)], ignore_index=True)
    frame = pd.DataFrame(points, columns=names).assign(ID=np.arange(draws))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ofv = objective(model, copies, frame)["OFV"].to_numpy(dtype=float)
    prior_cov = _prior(fit)
    log_joint = -0.5 * (ofv + constant + p * math.log(2 * math.pi)
                        + np.linalg.slogdet(prior_cov)[1])
    maha = np.einsum("mi,mi->m", z, z) * scale[:, 0] ** 2
    log_q = (gammaln((dof + p) / 2) - gammaln(dof / 2) - 0.5 * p * math.log(dof * math.pi)
             - 0.5 * np.linalg.slogdet(etc)[1] - 0.5 * (dof + p) * np.log1p(maha / dof))
    log_w = np.where(np.isfinite(ofv), log_joint - log_q, -np.inf)
    log_ml = float(logsumexp(log_w) - math.log(draws))
    w = np.exp(log_w - log_w.max())
    se = float(np.std(w) / (np.mean(w) * math.sqrt(draws)))  # of ln p (delta method)
    return laplace, log_ml, se


def _prior(fit: MAPEstimate) -> np.ndarray:
    """The prior covariance of the estimated ETAs and KAPPAs (in ``fit.names`` order)."""
    model = fit.model
    names = list(fit.names)
    cov = np.zeros((len(names), len(names)))
    eta = [n for n in names if n in model.eta_names]
    index = [model.eta_names.index(n) for n in eta]
    cov[:len(eta), :len(eta)] = model.omega[np.ix_(index, index)]
    for i, name in enumerate(names[len(eta):], start=len(eta)):
        cov[i, i] = model.iov[name.rsplit("_OCC", 1)[0]]  # KAPPA_CL_OCC2 -> KAPPA_CL
    return cov


def predict_averaged(comparison: ModelComparison, records: pd.DataFrame, *,
                     albumin_unit: str = "g/dL") -> pd.DataFrame:
    """Each usable model's individual prediction (at its MAP, KAPPAs 0) on ``records``
    (the history with the future records to forecast) and their weighted mean.

    Returns
    -------
    DataFrame
        The validated records with IPRED_<model> per usable model and IPRED_BMA.
    """
    out = None
    total = 0.0
    for name, fit in comparison.fits.items():
        model = comparison.models[name]
        table = for_model(model, records, albumin_unit=albumin_unit)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pred = predict(model, table, fit.individuals[["ID", *model.eta_names]])
        if out is None:
            out = pred[[c for c in pred.columns if c in records.columns or c == "ID"]].copy()
            out["IPRED_BMA"] = 0.0
        weight = comparison.weights[name]
        out[f"IPRED_{name}"] = pred["IPRED"].to_numpy()
        out["IPRED_BMA"] += weight * pred["IPRED"].to_numpy()
        total += weight
    if out is None:
        raise PKModelError("no usable model to predict with")
    out["IPRED_BMA"] /= total
    return out


def forecast_averaged(comparison: ModelComparison, records: pd.DataFrame, *,
                      n: int = 1000, seed: int = 0, albumin_unit: str = "g/dL",
                      min_ess: float = 200.0) -> pd.DataFrame:
    """The posterior forecast of the model average on ``records`` (the history with the
    future records): each usable model's posterior draws (KAPPAs 0), as many as its share
    of ``n`` by weight, pooled; the ``k``-th usable model draws with seed ``seed + k``.

    Returns
    -------
    DataFrame
        The validated records with, per row, the pooled draws' 5th, 50th and 95th
        percentiles (IPRED_Q05, IPRED_Q50, IPRED_Q95, mg/L) and the draws per model in
        ``.attrs["draws"]`` (model name to count). A model whose posterior sample is too
        poor (ESS below ``min_ess``) makes this refuse, naming it.
    """
    usable = [name for name in comparison.fits if comparison.weights[name] > 0]
    if not usable:
        raise PKModelError("no usable model to forecast with")
    counts = allocate_draws(np.array([comparison.weights[name] for name in usable]), n)
    pooled, base = [], None
    for k, (name, count) in enumerate(zip(usable, counts)):
        if count == 0:
            continue
        model = comparison.models[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sample = sample_posterior(model, comparison.data[name], n=int(count),
                                      seed=seed + k, estimate=comparison.fits[name],
                                      min_ess=min_ess)
        if not bool(sample.diagnostics["SUCCESS"].all()):
            ess = float(sample.diagnostics["ESS"].min())
            raise PKModelError(f"{name}: too few effective posterior draws (ESS {ess:.0f} < "
                               f"{min_ess:g}) to forecast with it")
        table = validate(for_model(model, records, albumin_unit=albumin_unit),
                         covariates=model.covariate_names)
        eta = sample.draws[list(model.eta_names)].to_numpy(dtype=float)
        (conc,) = draw_concentrations(model, [table], eta)
        pooled.append(conc)
        base = table if base is None else base
    values = np.concatenate(pooled, axis=0)
    out = base[[c for c in base.columns if c in records.columns]].copy()
    for q in (5, 50, 95):
        out[f"IPRED_Q{q:02d}"] = np.quantile(values, q / 100, axis=0)
    out.attrs["draws"] = {name: int(c) for name, c in zip(usable, counts)}
    return out


@dataclass(frozen=True)
class MultiModelRecommendation:
    """The recommendation of the selected model, with every model's own answer.

    Attributes
    ----------
    recommendation : Recommendation
        The selected (largest-weight) model's, or the model average's.
    answers : DataFrame
        MODEL, WEIGHT, STATUS, ACTION, DOSE_MG, INTERVAL_WEEKS (each model's own
        recommendation), CHOSEN_MEETS_TARGET (whether, under that model, the chosen regimen
        meets the target).
    support : float
        Weight of the models under which the chosen regimen meets the target.
    agree : bool
        Whether every usable model says the same (meets or not) about the chosen regimen.
    comparison : ModelComparison
    message : str
    """

    recommendation: Recommendation
    answers: pd.DataFrame
    support: float
    agree: bool
    comparison: ModelComparison
    message: str


def recommend_with_models(models: Sequence[PopulationModel], data: pd.DataFrame,
                          target: float = 6.0, *, albumin_unit: str = "g/dL",
                          prior: Mapping[str, float] | None = None,
                          averaging: str = "select",
                          **options: Any) -> MultiModelRecommendation:
    """The recommendation under several models, with each model's own answer and the
    weight of the models under which the chosen regimen meets the target.

    ``averaging="select"``: the recommendation of the model the data favour (model
    selection). ``"bma"``: Bayesian model averaging, the rule applied to the models'
    posterior draws pooled by weight (:func:`~pkmodel.dosing.recommend_averaged`, the
    favoured model leading). ``options`` go to :func:`~pkmodel.dosing.recommend_regimen`.
    """
    if averaging not in ("select", "bma"):
        raise ValueError(f"`averaging` must be 'select' or 'bma'; got {averaging!r}")
    comparison = compare_models(models, data, albumin_unit=albumin_unit, prior=prior,
                                seed=options.get("seed", 0))
    recs: dict[str, Recommendation] = {}
    for name in comparison.fits:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            recs[name] = recommend_regimen(comparison.models[name], comparison.data[name],
                                           target, **options)
    chosen = recs[comparison.selected]
    if averaging == "bma":
        order = sorted(comparison.fits, key=lambda n: -comparison.weights[n])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            chosen = recommend_averaged(
                [(comparison.models[n], comparison.data[n], comparison.weights[n])
                 for n in order], target, **options)
    regimen = chosen.recommended or chosen.current
    rows = []
    for name, rec in recs.items():
        option = rec.recommended
        match = rec.options[(np.isclose(rec.options["DOSE_MG"], regimen.dose_mg))
                            & np.isclose(rec.options["INTERVAL_WEEKS"],
                                         regimen.interval_weeks)]
        meets = bool(match["MEETS_TARGET"].iloc[0]) if len(match) else (
            bool(rec.current.meets_target)
            if (rec.current.dose_mg, rec.current.interval_weeks)
            == (regimen.dose_mg, regimen.interval_weeks) else None)
        rows.append({"MODEL": name, "WEIGHT": comparison.weights[name], "STATUS": rec.status,
                     "ACTION": rec.action,
                     "DOSE_MG": None if option is None else option.dose_mg,
                     "INTERVAL_WEEKS": None if option is None else option.interval_weeks,
                     "CHOSEN_MEETS_TARGET": meets})
    answers = pd.DataFrame(rows)
    known = answers["CHOSEN_MEETS_TARGET"].notna()
    support = float(answers.loc[known & (answers["CHOSEN_MEETS_TARGET"] == True),
                                "WEIGHT"].sum())
    agree = bool(answers.loc[known, "CHOSEN_MEETS_TARGET"].nunique() <= 1)
    head = (f"{comparison.selected} (weight {comparison.weights[comparison.selected]:.0%}):"
            f" {chosen.message}" if averaging == "select" else
            f"Averaged over the models by weight: {chosen.message}")
    message = (head if chosen.recommended is None else
               f"{head} Models carrying {support:.0%} of the weight expect this regimen to "
               "meet the target" + ("." if agree else "; the models disagree: measure again "
                                    "before relying on it."))
    return MultiModelRecommendation(chosen, answers, support, agree, comparison, message)

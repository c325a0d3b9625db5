"""Figures (matplotlib, the optional ``plot`` extra).

Each function returns a :class:`matplotlib.figure.Figure` made without pyplot, so the
session's backend (a Jupyter notebook's inline plots, say) is never changed; ``path``
writes it to a file.

* :func:`plot_recommendation`: the trough forecast of a recommendation.
* :func:`plot_profile`: the individual concentration-time profile through the history and
  the forecast: MAP line, posterior 80 % band, measured values, censored ones at their
  LLOQ, doses given and proposed, the target.
* :func:`plot_prior_posterior`: for each parameter with an ETA, the population's spread for
  this patient's covariates (prior) against the patient's posterior.
* :func:`plot_goodness_of_fit`: a population fit's DV against PRED and IPRED, CWRES against
  time and PRED.
* :func:`plot_vpc`: a visual predictive check (optionally prediction-corrected).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd

from pkmodel.dosing import Recommendation
from pkmodel.estimate import MAPEstimate, PosteriorSample
from pkmodel.population import eta_covariates
from pkmodel.predict import draw_concentrations, with_samples

__all__ = ["plot_eta_covariates", "plot_goodness_of_fit", "plot_prior_posterior",
           "plot_profile", "plot_recommendation", "plot_vpc"]


def _figure(width: float = 8.0, height: float = 4.5) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise ImportError("plots need matplotlib: pip install 'pkmodel[plot]'") from err
    return Figure(figsize=(width, height))


def plot_recommendation(recommendation: Recommendation, *,
                        path: str | os.PathLike[str] | None = None) -> Any:
    """Forecast troughs of the recommended and current regimens, with an 80 % band.

    Measured troughs and their individual predictions are drawn when the recommendation
    came from a fit; the target is a horizontal line.

    Parameters
    ----------
    recommendation : Recommendation
        From :func:`pkmodel.dosing.recommend_regimen`.
    path : str or path-like, optional
        Write the figure there (PNG, PDF, ... by extension).

    Returns
    -------
    matplotlib.figure.Figure
    """
    rec = recommendation
    fig = _figure()
    ax = fig.subplots()
    refused = rec.status == "refused"
    option = rec.current if refused else rec.closest
    label = (f"{option.dose_mg:g} mg every {option.interval_weeks:g} wk"
             + (" (current; recommendation refused)" if refused else
                "" if rec.feasible else " (closest; target not attainable)"))
    for troughs, name, colour in ((rec.troughs, label, "tab:blue"),
                                  (rec.current_troughs, "current regimen", "tab:grey")):
        coming = troughs[~troughs["STEADY_STATE"]]
        ax.fill_between(coming["WEEK"], coming["P10"], coming["P90"], color=colour, alpha=0.2,
                        linewidth=0)
        ax.plot(coming["WEEK"], coming["P50"], "o-", color=colour, label=f"{name}: median, "
                "80 % band")
    if rec.estimate is not None:
        records = rec.estimate.records
        seen = records[(records["EVID"] == 0) & (records["MDV"] == 0)]
        ax.plot(seen["TIME"] / 7.0, seen["DV"], "k^", label="measured trough")
        ax.plot(seen["TIME"] / 7.0, seen["IPRED"], "kx", label="individual prediction")
    ax.axhline(rec.target, color="tab:red", linestyle="--", label=f"target {rec.target:g} mg/L")
    ax.axvline(rec.next_dose_day / 7.0, color="k", linewidth=0.5)
    ax.set_xlabel("week")
    ax.set_ylabel("trough concentration (mg/L)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small", loc="upper left")
    title = ("Recommendation refused: check the data" if refused else
             rec.message.split(":")[0] if rec.feasible else "No option within limits")
    ax.set_title(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_profile(fit: MAPEstimate, *, posterior: PosteriorSample | None = None,
                 recommendation: Recommendation | None = None, until: float | None = None,
                 target: float | None = None,
                 path: str | os.PathLike[str] | None = None) -> Any:
    """The patient's concentration over time: the history and, with a recommendation, its
    proposed doses, at the MAP (KAPPAs 0) with the posterior's 10th-90th percentile band.

    Parameters
    ----------
    fit : MAPEstimate
        One patient's fit (:func:`~pkmodel.estimate.estimate_map`).
    posterior : PosteriorSample, optional
        Draws for the band (:func:`~pkmodel.estimate.sample_posterior`).
    recommendation : Recommendation, optional
        Its recommended (or closest) regimen is drawn after the history, doses marked.
    until : float, optional
        Last time drawn (model's time unit); default: the last record, or a year of the
        proposed regimen.
    target : float, optional
        A horizontal target line (default: the recommendation's target).
    path : str or path-like, optional
        Write the figure there.

    Returns
    -------
    matplotlib.figure.Figure
    """
    model, table = fit.model, fit.records
    if table["ID"].nunique() != 1:
        raise ValueError("plot_profile draws one patient; fit one ID")
    history = table.drop(columns=[c for c in table.columns if c not in _RECORD_COLUMNS
                                  and c not in model.covariate_names])
    future = _proposed(history, recommendation)
    doses = pd.concat([history, future], ignore_index=True)
    end = until if until is not None else float(doses["TIME"].max()) + (
        56.0 if future.empty else 0.0) / model.days_per_time_unit
    given = doses[doses["EVID"] == 1]
    ends = given["TIME"] + np.where(given["RATE"] > 0, given["AMT"] / given["RATE"].where(
        given["RATE"] > 0, 1.0), 0.0)  # infusion ends: the peaks
    grid = np.unique(np.concatenate([np.linspace(0.0, end, 600), given["TIME"].to_numpy(),
                                     ends.to_numpy()]))
    grid = grid[grid <= end]
    frame = with_samples(doses, grid, model.covariate_names)
    names = list(model.eta_names)
    eta = fit.individuals[names].to_numpy(dtype=float)
    if posterior is not None:
        eta = np.vstack([eta, posterior.draws[names].to_numpy(dtype=float)])
    (conc,) = draw_concentrations(model, [frame.drop(columns="SAMPLE")], eta)
    at = frame["SAMPLE"].to_numpy() >= 0
    fig = _figure()
    ax = fig.subplots()
    if posterior is not None:
        low, high = np.percentile(conc[1:, at], [10, 90], axis=0)
        ax.fill_between(grid, low, high, color="tab:blue", alpha=0.2, linewidth=0,
                        label="posterior 80 % band")
    ax.plot(grid, conc[0, at], color="tab:blue", label="individual (MAP)")
    _measured(ax, table)
    for t in doses.loc[doses["EVID"] == 1, "TIME"]:
        ax.axvline(t, color="grey", linewidth=0.5, alpha=0.6)
    for t in future.loc[future["EVID"] == 1, "TIME"]:
        ax.axvline(t, color="tab:green", linewidth=0.8, linestyle=":")
    level = target if target is not None else (recommendation.target if recommendation
                                               else None)
    if level is not None:
        ax.axhline(level, color="tab:red", linestyle="--", label=f"target {level:g}")
    ax.set_xlabel(f"time ({model.time_unit})")
    ax.set_ylabel(f"concentration ({model.concentration_unit})")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small", loc="upper right")
    ax.set_title(f"{model.name}: individual profile" + (
        " and proposed regimen (dotted: proposed doses)" if not future.empty else ""))
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


_RECORD_COLUMNS = ("ID", "TIME", "EVID", "AMT", "RATE", "DUR", "II", "ADDL", "SS", "MDV",
                   "CMT", "DV", "LLOQ", "ULOQ", "OCC")


def _proposed(history: pd.DataFrame, rec: Recommendation | None) -> pd.DataFrame:
    """The recommended (or closest) regimen as dose records over a year."""
    if rec is None:
        return history.iloc[:0]
    option = rec.recommended or rec.closest
    tau = option.interval_weeks * 7.0
    times = rec.next_dose_day + tau * np.arange(int(365.0 // tau) + 1)
    last_dose = history[history["EVID"] == 1].iloc[-1]
    hours = last_dose["AMT"] / last_dose["RATE"] if last_dose["RATE"] > 0 else 0.0
    rows = pd.DataFrame({c: np.repeat(history.iloc[-1][c], times.size)
                         for c in history.columns})
    return rows.assign(TIME=times, EVID=1.0, MDV=1.0, AMT=option.dose_mg,
                       RATE=option.dose_mg / hours if hours else 0.0, DV=np.nan,
                       CMT=last_dose["CMT"], II=0.0, ADDL=0.0, SS=0.0)


def _measured(ax: Any, table: pd.DataFrame) -> None:
    """Measured values as points; censored ones (below LLOQ) as open marks at the LLOQ,
    with the LLOQ line."""
    seen = table[(table["EVID"] == 0) & (table["MDV"] == 0)]
    if "LLOQ" in seen.columns:
        below = seen["DV"] < seen["LLOQ"]
        if below.any():
            ax.plot(seen.loc[below, "TIME"], seen.loc[below, "LLOQ"], "kv", mfc="none",
                    label="below LLOQ (drawn at the LLOQ)")
            ax.axhline(float(seen.loc[below, "LLOQ"].iloc[0]), color="k", linewidth=0.6,
                       linestyle=":", label="LLOQ")
        seen = seen[~below]
    ax.plot(seen["TIME"], seen["DV"], "k^", label="measured")


def plot_prior_posterior(fit: MAPEstimate, posterior: PosteriorSample, *,
                         n_prior: int = 4000, seed: int = 0,
                         path: str | os.PathLike[str] | None = None) -> Any:
    """For each structural parameter that has an ETA: histograms of the prior (ETAs drawn
    from OMEGA, this patient's covariates) and of the posterior draws, with the MAP.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from pkmodel.model import eta_of, evaluate_parameters

    model = fit.model
    ident = fit.individuals["ID"].iloc[0]
    last = fit.records[fit.records["ID"] == ident].iloc[-1]
    covs = {c: np.array([last[c]]) for c in model.covariate_names}
    names = [p for p in model.structure.parameter_names if eta_of(model, p) is not None]
    rng = np.random.default_rng(seed)
    prior_eta = rng.multivariate_normal(np.zeros(len(model.eta_names)), model.omega,
                                        size=n_prior, method="eigh")
    post_eta = posterior.draws.loc[posterior.draws["ID"] == ident,
                                   list(model.eta_names)].to_numpy(dtype=float)
    mode = fit.individuals[list(model.eta_names)].to_numpy(dtype=float)[:1]
    values = [evaluate_parameters(model, covs, e[:, None, :]) for e in (prior_eta, post_eta,
                                                                         mode)]
    fig = _figure(3.2 * max(len(names), 1), 3.2)
    axes = np.atleast_1d(fig.subplots(1, max(len(names), 1)))
    for ax, name in zip(axes, names):
        prior, post, best = (np.ravel(v[name]) for v in values)
        bins = np.histogram_bin_edges(np.concatenate([prior, post]), bins=40)
        ax.hist(prior, bins=bins, density=True, color="grey", alpha=0.4, label="prior")
        ax.hist(post, bins=bins, density=True, color="tab:blue", alpha=0.5,
                label="posterior")
        ax.axvline(best[0], color="tab:blue", linewidth=1.2, label="MAP")
        ax.set_xlabel(name)
        ax.set_yticks([])
    axes[0].legend(fontsize="small")
    fig.suptitle(f"{model.name}: prior (population, this patient's covariates) and "
                 "posterior", fontsize="medium")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_goodness_of_fit(fit: Any, *, path: str | os.PathLike[str] | None = None) -> Any:
    """Four panels of a population fit (:class:`~pkmodel.population.PopulationFit`): DV
    against PRED and against IPRED (with the identity line), CWRES against time and against
    PRED (with 0 and +-2).

    Returns
    -------
    matplotlib.figure.Figure
    """
    records = fit.records
    seen = records[(records["EVID"] == 0) & (records["MDV"] == 0)]
    unit, time_unit = fit.model.concentration_unit, fit.model.time_unit
    fig = _figure(9.0, 7.5)
    axes = fig.subplots(2, 2)
    for ax, column in zip(axes[0], ("PRED", "IPRED")):
        ax.plot(seen[column], seen["DV"], "o", ms=3, alpha=0.6)
        top = float(np.nanmax([seen[column].max(), seen["DV"].max()]))
        ax.plot([0, top], [0, top], "k-", linewidth=0.8)
        ax.set_xlabel(f"{column} ({unit})")
        ax.set_ylabel(f"DV ({unit})")
    for ax, column, label in ((axes[1][0], "TIME", f"time ({time_unit})"),
                              (axes[1][1], "PRED", f"PRED ({unit})")):
        ax.plot(seen[column], seen["CWRES"], "o", ms=3, alpha=0.6)
        for level, style in ((0.0, "-"), (2.0, ":"), (-2.0, ":")):
            ax.axhline(level, color="k", linewidth=0.8, linestyle=style)
        ax.set_xlabel(label)
        ax.set_ylabel("CWRES")
    fig.suptitle(f"{fit.model.name}: goodness of fit ({fit.method.upper()}, OFV "
                 f"{fit.ofv:.2f})", fontsize="medium")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_eta_covariates(fit: Any, covariates: tuple[str, ...] | None = None, *,
                        path: str | os.PathLike[str] | None = None) -> Any:
    """ETAs against covariates, one panel per pair (rows ETAs, columns covariates): a
    scatter with its least-squares line and Pearson's r for a continuous covariate, the
    ETAs per level for a 0/1 one (see :func:`~pkmodel.population.eta_covariates`). A
    trend says the
    covariate explains variability the model leaves to the ETA.

    Returns
    -------
    matplotlib.figure.Figure
    """
    table = eta_covariates(fit, covariates)
    correlation = table.attrs["correlation"]
    etas = list(dict.fromkeys(eta for eta, _ in correlation))
    names = list(dict.fromkeys(name for _, name in correlation))
    fig = _figure(3.0 * len(names) + 1.0, 2.6 * len(etas) + 0.8)
    axes = np.atleast_2d(fig.subplots(len(etas), len(names), squeeze=False))
    for i, eta in enumerate(etas):
        for j, name in enumerate(names):
            ax = axes[i][j]
            x, y = table[name].to_numpy(dtype=float), table[eta].to_numpy(dtype=float)
            levels = np.unique(x[np.isfinite(x)])
            if len(levels) <= 2 and set(levels) <= {0.0, 1.0}:
                ax.boxplot([y[x == lv] for lv in levels], positions=list(range(len(levels))))
                ax.set_xticks(range(len(levels)), [f"{lv:g}" for lv in levels])
            else:
                ax.plot(x, y, "o", ms=3, alpha=0.6)
                usable = np.isfinite(x) & np.isfinite(y)
                if np.isfinite(correlation[(eta, name)]):
                    slope, intercept = np.polyfit(x[usable], y[usable], 1)
                    grid = np.linspace(x[usable].min(), x[usable].max(), 2)
                    ax.plot(grid, intercept + slope * grid, "k-", linewidth=0.8)
            ax.axhline(0.0, color="grey", linewidth=0.6, linestyle=":")
            ax.set_title(f"r = {correlation[(eta, name)]:+.2f}", fontsize="small")
            ax.set_xlabel(name)
            ax.set_ylabel(eta)
    fig.suptitle(f"{fit.model.name}: ETAs against covariates", fontsize="medium")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_vpc(model: Any, data: pd.DataFrame, *, n: int = 200, bins: int = 8,
             prediction_corrected: bool = False, seed: int = 0,
             path: str | os.PathLike[str] | None = None) -> Any:
    """Visual predictive check: the 10th, 50th and 90th percentiles of the observations
    per time bin (quantile bins), against the 95 % interval of the same percentiles over
    ``n`` simulated replicates of the design. With ``prediction_corrected``, observations
    and simulations are scaled by the bin's median PRED over each record's PRED
    (Bergstrand et al., AAPS J 2011).

    Returns
    -------
    matplotlib.figure.Figure
    """
    from pkmodel.data import validate
    from pkmodel.predict import predict, simulate

    table = validate(data, covariates=model.covariate_names)
    measured = ((table["EVID"] == 0) & (table["MDV"] == 0)).to_numpy()
    every = (table["EVID"] == 0).to_numpy()
    obs = table[measured]
    sims = simulate(model, table, n=n, seed=seed)
    keep = measured[every]  # simulated records that are measured in the data
    per_id = sims.groupby("SOURCE_ID", sort=False)
    sim_dv = np.concatenate([rows["DV"].to_numpy().reshape(n, -1)[:, keep[pos:pos + len(
        rows) // n]] for pos, (_, rows) in _positions(per_id, n)], axis=1)  # (n, N_obs)
    times, dv = obs["TIME"].to_numpy(dtype=float), obs["DV"].to_numpy(dtype=float)
    edges = np.unique(np.quantile(times, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, times, side="right") - 1, 0, len(edges) - 2)
    if prediction_corrected:
        pred = predict(model, table)["PRED"].to_numpy()[measured]
        median = np.array([np.median(pred[which == b]) for b in range(len(edges) - 1)])
        scale = median[which] / np.where(pred > 0, pred, np.nan)
        dv, sim_dv = dv * scale, sim_dv * scale
    centres, observed, bands = [], [], []
    for b in range(len(edges) - 1):
        inside = which == b
        if not inside.any():
            continue
        centres.append(float(np.median(times[inside])))
        observed.append(np.nanpercentile(dv[inside], [10, 50, 90]))
        per_rep = np.nanpercentile(sim_dv[:, inside], [10, 50, 90], axis=1)  # (3, n)
        bands.append(np.nanpercentile(per_rep, [2.5, 97.5], axis=1))  # (2, 3)
    centres, observed, bands = np.array(centres), np.array(observed), np.array(bands)
    fig = _figure()
    ax = fig.subplots()
    ax.plot(times, dv, "o", ms=2.5, color="grey", alpha=0.5, label="observed")
    for k, (name, colour) in enumerate((("10th", "tab:blue"), ("50th", "tab:red"),
                                        ("90th", "tab:blue"))):
        ax.fill_between(centres, bands[:, 0, k], bands[:, 1, k], color=colour, alpha=0.2,
                        linewidth=0, label=f"simulated {name} percentile, 95 % interval")
        ax.plot(centres, observed[:, k], "-", color=colour, label=f"observed {name}")
    ax.set_xlabel(f"time ({model.time_unit})")
    ax.set_ylabel(("prediction-corrected " if prediction_corrected else "")
                  + f"concentration ({model.concentration_unit})")
    ax.legend(fontsize="x-small")
    ax.set_title(f"{model.name}: {'prediction-corrected ' if prediction_corrected else ''}"
                 f"VPC, {n} replicates")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _positions(groups: Any, n: int) -> Any:
    """(start offset in the data's EVID-0 records, (id, rows)) per simulated ID."""
    offset = 0
    for key, rows in groups:
        yield offset, (key, rows)
        offset += len(rows) // n

"""Figures (matplotlib, the optional ``plot`` extra)."""

from __future__ import annotations

import os
from typing import Any

from pkmodel.dosing import Recommendation

__all__ = ["plot_recommendation"]


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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise ImportError("plots need matplotlib: pip install 'pkmodel[plot]'") from err
    rec = recommendation
    fig, ax = plt.subplots(figsize=(8, 4.5))
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

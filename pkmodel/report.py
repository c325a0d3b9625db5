"""A patient report: one self-contained HTML page for the chart.

:func:`recommendation_report` writes the patient, the model and its citation, the data, the
fit and its parameter summary, the recommendation with its status and reasons, the
options weighed and the basis of the decision, with the figures embedded as PNG data
(no external resource: it opens offline and prints).
"""

from __future__ import annotations

import base64
import html
import io
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from pkmodel.dosing import Recommendation
from pkmodel.model import PopulationModel

__all__ = ["recommendation_report"]

_STYLE = """
body { font-family: sans-serif; max-width: 60em; margin: 2em auto; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }
th { background: #f2f2f2; } .status { font-weight: bold; font-size: 1.1em; }
.ok { color: #1a7f37; } .caution { color: #9a6700; } .refused { color: #cf222e; }
img { max-width: 100%; } @media print { body { margin: 0; } }
"""


def _table(frame: pd.DataFrame, digits: int = 3) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "" if pd.isna(v) else f"{v:.{digits}g}"
        return html.escape(str(v))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="figure" src="data:image/png;base64,{data}">'


def _list(items: Any) -> str:
    items = list(items)
    if not items:
        return "<p>None.</p>"
    return "<ul>" + "".join(f"<li>{html.escape(str(i))}</li>" for i in items) + "</ul>"


def recommendation_report(recommendation: Recommendation, model: PopulationModel,
                          data: pd.DataFrame, path: str | os.PathLike[str], *,
                          patient: str = "") -> Path:
    """Write the recommendation as one self-contained HTML page.

    Parameters
    ----------
    recommendation : Recommendation
        From :func:`pkmodel.dosing.recommend_regimen` with ``model`` and ``data``.
    model : PopulationModel
    data : DataFrame
        The patient's records.
    path : str or path-like
        The HTML file to write.
    patient : str
        How the patient is named on the page (default: the ID).

    Returns
    -------
    Path
        The file written.
    """
    from pkmodel.plot import plot_profile, plot_recommendation

    rec = recommendation
    ident = patient or str(data["ID"].iloc[0])
    sections = [f"<h1>Dosing report: patient {html.escape(ident)}</h1>",
                f'<p class="status {rec.status}">Status: {rec.status.upper()}</p>',
                f"<p>{html.escape(rec.message)}</p>",
                "<h2>Why this status</h2>", _list(rec.reasons),
                "<h2>Recommendation</h2>", _recommendation(rec),
                "<h2>Patient and data</h2>", _data(model, data, rec),
                "<h2>Model</h2>",
                (f"<p><b>{html.escape(model.name)}</b>: {html.escape(model.description)}</p>"
                f"<p>Source: {html.escape(model.citation)}</p>"),
                "<h2>Fit</h2>", _fit(rec),
                "<h2>Forecast</h2>", _png(plot_recommendation(rec))]
    if rec.estimate is not None:
        sections += [_png(plot_profile(rec.estimate, recommendation=rec))]
    sections += ["<h2>Basis of the decision</h2>", _basis(rec),
                 "<h2>Notes</h2>", _list(rec.notes),
                 (f"<p><small>Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by "
                 f"pkmodel {_version()}; a decision aid, to be read by the treating "
                 "clinician.</small></p>")]
    page = ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Dosing report {html.escape(ident)}</title><style>{_STYLE}</style>"
            "</head><body>" + "\n".join(sections) + "</body></html>")
    out = Path(path)
    out.write_text(page, encoding="utf-8")
    return out


def _version() -> str:
    from pkmodel import __version__
    return __version__


def _recommendation(rec: Recommendation) -> str:
    rows = []
    for label, option in (("current", rec.current), ("recommended", rec.recommended),
                          ("dose change alone", rec.dose_only),
                          ("interval change alone", rec.interval_only),
                          ("lower dose that still meets the target", rec.reduce_dose),
                          ("longer interval that still meets it", rec.extend_interval)):
        if option is not None:
            rows.append({"": label, "dose (mg)": option.dose_mg,
                         "mg/kg": option.mg_per_kg, "every (weeks)": option.interval_weeks,
                         "lowest trough (mg/L)": option.lowest_trough,
                         "meets target": "yes" if option.meets_target else "no"})
    return (f"<p>Action: <b>{html.escape(rec.action)}</b>; next dose day "
            f"{rec.next_dose_day:g}" + (f" ({html.escape(rec.next_dose_date)})"
                                        if rec.next_dose_date else "") + "</p>"
            + _table(pd.DataFrame(rows)))


def _data(model: PopulationModel, data: pd.DataFrame, rec: Recommendation) -> str:
    columns = [c for c in ("TIME", "EVID", "AMT", "RATE", "DV", "LLOQ", "MDV",
                           *model.covariate_names) if c in data.columns]
    return (f"<p>Weight at the visit {rec.weight_kg:g} kg.</p>"
            + _table(data[columns].reset_index(drop=True)))


def _fit(rec: Recommendation) -> str:
    if rec.estimate is None:
        return "<p>No measured concentration: dosed from the population prior.</p>"
    summary = rec.estimate.summary()
    checks = rec.checks
    return (_table(summary.drop(columns=["ID", "ETA"]))
            + f"<p>Largest residual {checks.max_abs_iwres:.3g} SD; clearance "
            f"{checks.eta_cl_sd:.3g} SD from typical; shrinkage of clearance "
            f"{checks.eta_cl_shrinkage:.0%}; effective posterior draws {checks.ess:.0f}.</p>")


def _basis(rec: Recommendation) -> str:
    settings = rec.settings
    fields = {k: getattr(settings, k) for k in settings.__dataclass_fields__}
    return (f"<p>Target {rec.target:g} mg/L; criterion: "
            + ("the MAP forecast" if rec.probability is None else
               f"at least {rec.probability:.0%} of the posterior draws")
            + f" at every trough; objective {html.escape(rec.objective)}.</p>"
            + _table(pd.DataFrame([{"setting": k, "value": str(v)}
                                   for k, v in fields.items()])))

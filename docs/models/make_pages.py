"""Write docs/models/<name>.md for every bundled model: ``python docs/models/make_pages.py``.

Each page's trough table is produced by an executed example (doctest), so the test suite
re-runs the code and fails if the numbers on the page stop matching the library.
"""

from __future__ import annotations

import contextlib
import io
import textwrap
from pathlib import Path

from pkmodel.models import available, load

HERE = Path(__file__).resolve().parent

# Fixed covariates for the table (besides weight and albumin), per model.
FIXED = {
    "fasanmade2011": {"ATI": 0, "IMM": 1},
    "fasanmade2011_pediatric": {},
    "xu2012": {"ATI": 0},
    "dubinsky2017": {"ATI": 0},
    "fasanmade2009": {"ATI": 0, "FEMALE": 0},
    "zhao2026": {"CRP": 3.0},
    "passot2016": {"MALE": 0, "CD": 1, "UC": 0, "AGE": 10},
}
ALBUMIN_FACTOR = {"zhao2026": 10.0}  # the model takes g/L

CODE = '''\
>>> import warnings
>>> import pandas as pd
>>> from pkmodel.data import infliximab_regimen
>>> from pkmodel.models import load
>>> from pkmodel.predict import predict
>>> model = load("{name}")
>>> rows = []
>>> for wt in (20.0, 30.0, 45.0, 70.0):
...     for alb in (3.0, 3.5, 4.0):
...         table = infliximab_regimen(wt, until_week=54,
...                                    covariates={{"ALB": alb * {factor}, **{fixed}}})
...         with warnings.catch_warnings():
...             warnings.simplefilter("ignore")  # some bands lie outside the model's data
...             out = predict(model, table)
...         rows.append((wt, alb, out["PRED"].iloc[-1]))
>>> grid = pd.DataFrame(rows, columns=["WT kg", "ALB g/dL", "trough"])
>>> print(grid.pivot(index="WT kg", columns="ALB g/dL", values="trough").round(2))
'''


def run(code: str) -> str:
    """Execute doctest-style code and return what the last statement prints."""
    lines = [line[4:] for line in code.splitlines() if line.startswith((">>> ", "... "))]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        # This file's own fixed example (CODE above), run once to record its output.
        exec("\n".join(lines), {})  # noqa: S102
    return buffer.getvalue()


def page(name: str) -> str:
    model = load(name)
    code = CODE.format(name=name, factor=ALBUMIN_FACTOR.get(name, 1.0), fixed=FIXED[name])
    output = run(code)
    covariates = "\n".join(
        f"| `{c.name}` | {c.unit} | {c.description} | "
        f"{f'{c.observed[0]:g}-{c.observed[1]:g}' if c.observed else 'not stated'} | "
        f"{c.plausible[0]:g}-{c.plausible[1]:g} |"
        for c in model.covariates
    )
    omega = ", ".join(f"{n} {model.omega[i, i]:g}" for i, n in enumerate(model.eta_names))
    iov = ", ".join(f"{k} {v:g}" for k, v in model.iov.items()) or "none"
    fixed = ", ".join(f"{k} = {v}" for k, v in FIXED[name].items()) or "none"
    unit_note = " (the model takes g/L: the code multiplies by 10)" if name in ALBUMIN_FACTOR else ""
    return f"""# `{name}`

{model.description}

Source: {model.citation}.

## Equations

```
{model.equations()}
```

Structure: {model.structure.n_compartments} compartment(s), IV infusion. IIV variances:
{omega}. IOV variances: {iov}. Residual error: {model.residual.kind}
(proportional SD {model.residual.proportional:g}, additive SD {model.residual.additive:g} mg/L).

| covariate | unit | meaning | range of the model's data (warns outside) | accepted (errors outside) |
|---|---|---|---|---|
{covariates}

## Typical troughs on the label regimen

Week-54 trough (mg/L) of the typical patient (no IIV) on 5 mg/kg at weeks 0, 2, 6, then
every 8 weeks, by weight and albumin{unit_note}; other covariates: {fixed}.

```python
{code}{textwrap.dedent(output).rstrip()}

```
"""


def main() -> None:
    for name in available():
        (HERE / f"{name}.md").write_text(page(name))
        print(f"wrote docs/models/{name}.md")


if __name__ == "__main__":
    main()

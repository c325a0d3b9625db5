"""Write docs/kang_trial.md and its figure: ``python docs/figures/make_trial_page.py``.

Runs the virtual Kang 2026 trial (112 children, three arms, 3 replicates, seed 2026) and
writes every number and the figure on the page from this run.
"""

from __future__ import annotations

import time
from pathlib import Path

from pkmodel.models import load
from pkmodel.trial import BayesianDosing, KangProactive, LabelDosing, run_trial

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent
N, REPLICATES, SEED = 112, 3, 2026


def main() -> None:
    model = load("fasanmade2011")
    arms = {"label": LabelDosing(), "proactive": KangProactive(),
            "bayesian": BayesianDosing(model)}
    start = time.perf_counter()
    result = run_trial(model, arms, n=N, replicates=REPLICATES, seed=SEED, progress=True)
    seconds = time.perf_counter() - start
    result.figure(HERE / "kang_trial.png")
    summary = result.summary
    lines = ["| outcome | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for outcome, group in summary.groupby("OUTCOME", sort=False):
        meaning = group["MEANING"].iloc[0]
        cells = [f"{r.MEAN:.3g} ({r.LOW:.3g}-{r.HIGH:.3g})" for r in group.itertuples()]
        lines.append(f"| {meaning} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    page = (DOCS / "kang_trial.template.md").read_text()
    page = page.replace("{{TABLE}}", table).replace("{{SECONDS}}", f"{seconds:.0f}")
    (DOCS / "kang_trial.md").write_text(page)
    print(f"wrote {DOCS / 'kang_trial.md'} in {seconds:.0f} s")


if __name__ == "__main__":
    main()

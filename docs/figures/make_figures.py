"""Write the documentation figures: ``python docs/figures/make_figures.py``."""

from __future__ import annotations

from pathlib import Path

from pkmodel.data import read_nonmem
from pkmodel.dosing import recommend_regimen
from pkmodel.models import load
from pkmodel.plot import plot_recommendation

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def main() -> None:
    child = read_nonmem(ROOT / "examples" / "child.csv")
    rec = recommend_regimen(load("fasanmade2011"), child, 6.0, seed=0)
    plot_recommendation(rec, path=HERE / "recommend_child.png")
    print(f"wrote {HERE / 'recommend_child.png'}")


if __name__ == "__main__":
    main()

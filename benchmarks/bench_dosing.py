"""One recommendation with 1,000 posterior draws (target: under 30 ms)."""

from __future__ import annotations

from pathlib import Path

from pkmodel.data import read_nonmem
from pkmodel.dosing import recommend_regimen
from pkmodel.models import load

CHILD = Path(__file__).resolve().parents[1] / "examples" / "child.csv"


class RecommendOneChild:
    """The bundled child (28 kg, two measured troughs), Fasanmade 2011, 25 intervals x vials."""

    def setup(self) -> None:
        self.model = load("fasanmade2011")
        self.data = read_nonmem(CHILD)

    def time_recommend_1000_draws(self) -> None:
        recommend_regimen(self.model, self.data, 6.0, n_draws=1000)

    def time_recommend_map_only(self) -> None:
        recommend_regimen(self.model, self.data, 6.0, n_draws=0)

    def report(self, seconds: dict[str, float]) -> list[str]:
        return [(f"one recommendation, 1,000 draws: "
                f"{seconds['time_recommend_1000_draws'] * 1e3:.1f} ms (target < 30 ms); "
                f"MAP only: {seconds['time_recommend_map_only'] * 1e3:.1f} ms")]

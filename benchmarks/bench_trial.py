"""Virtual trials: 10,000 children through 54 weeks (label and proactive arms), and the
Bayesian arm on 200 children (it fits every child at every visit)."""

from __future__ import annotations

from pkmodel.models import load
from pkmodel.trial import BayesianDosing, KangProactive, LabelDosing, run_trial


class Trial10000:
    """Fasanmade 2011, Kang cohort, induction to week 54."""

    def setup(self) -> None:
        self.model = load("fasanmade2011")

    def time_label_and_proactive_10000(self) -> None:
        run_trial(self.model, {"label": LabelDosing(), "proactive": KangProactive()},
                  n=10_000, seed=1)

    def time_bayesian_200(self) -> None:
        run_trial(self.model, {"bayesian": BayesianDosing(self.model)}, n=200, seed=1)

    def time_bayesian_200_warm_start(self) -> None:
        run_trial(self.model, {"bayesian": BayesianDosing(self.model, warm_start=True)},
                  n=200, seed=1)

    def report(self, seconds: dict[str, float]) -> list[str]:
        per_child = seconds["time_bayesian_200"] / 200
        warm = seconds["time_bayesian_200_warm_start"] / 200
        return [(f"10,000 children, label + proactive arms: "
                f"{seconds['time_label_and_proactive_10000']:.1f} s"),
                (f"Bayesian arm, 200 children: {seconds['time_bayesian_200']:.1f} s "
                 f"({per_child:.2f} s per child, every child fitted and dosed at each of "
                 f"about 9 visits); 10,000 children: about {per_child * 10_000 / 60:.0f} min "
                 "on one core (extrapolated)"),
                (f"warm starts (one start from the last visit's modes): {warm:.3f} s per "
                 f"child, {per_child / warm:.2f}x; "
                 f"10,000 children: about {warm * 10_000 / 60:.1f} min")]

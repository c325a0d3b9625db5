"""Virtual-population simulation: 100,000 children x one year of label-regimen troughs."""

from __future__ import annotations

from scipy import stats

from pkmodel.data import infliximab_regimen
from pkmodel.models import load
from pkmodel.predict import make_cohort, simulate


class SimulateYearOfTroughs:
    """Fasanmade 2011 with IIV, IOV and residual error; troughs before every dose to week 54."""

    n = 100_000

    def setup(self) -> None:
        self.model = load("fasanmade2011")
        self.regimen = infliximab_regimen(1.0, until_week=54).drop(columns="WT")
        # Assumed cohort for timing only: 20-60 kg, albumin 2.8-4.5 g/dL, on an immunomodulator.
        self.cohort = make_cohort(self.n, {"WT": stats.uniform(20, 40),
                                           "ALB": stats.uniform(2.8, 1.7), "ATI": 0, "IMM": 1},
                                  seed=1)

    def time_simulate_100000_patients(self) -> None:
        simulate(self.model, self.regimen, self.cohort, seed=2, dose_per_kg=True)

    def report(self, seconds: dict[str, float]) -> list[str]:
        t = seconds["time_simulate_100000_patients"]
        n_obs = int((self.regimen["EVID"] == 0).sum())
        return [(f"{self.n:,} patients x {n_obs} troughs (one year): {t:.2f} s (target < 2 s), "
                 f"{t / self.n * 1e6:.1f} us per patient")]

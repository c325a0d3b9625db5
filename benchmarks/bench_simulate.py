"""Virtual-population simulation: 100,000 children x one year of label-regimen troughs."""

from __future__ import annotations

from scipy import stats

from pkmodel.data import infliximab_regimen
from pkmodel.models import load
from pkmodel.predict import make_cohort, predict, simulate


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


class PredictTenThousandTables:
    """``predict`` (PRED) on a 10,000-ID table, one year of label dosing each with its
    troughs (no ADDL: every dose a record), Fasanmade 2011, and the same year written with
    ADDL (the maintenance doses implied by one record). Baseline in the same run: the
    events built ID by ID (``expand_records`` and ``stack_events``), as ``to_events`` did
    for a table with ADDL before it built all IDs at once."""

    n = 10_000

    def setup(self) -> None:
        import numpy as np
        import pandas as pd

        from pkmodel.data import validate
        self.model = load("fasanmade2011")
        one = infliximab_regimen(30.0, until_week=52,
                                 covariates={"ALB": 3.5, "ATI": 0, "IMM": 1})
        self.table = validate(pd.concat([one.assign(ID=i) for i in range(1, self.n + 1)],
                                        ignore_index=True))
        maintenance = (one["EVID"] == 1) & (one["TIME"] > 98.0)  # implied from day 98
        short = one[~maintenance].copy()
        first = (short["EVID"] == 1) & (short["TIME"] == 98.0)
        short["II"], short["ADDL"] = np.where(first, 56.0, 0.0), np.where(first, 4, 0)
        self.with_addl = validate(pd.concat([short.assign(ID=i)
                                             for i in range(1, self.n + 1)],
                                            ignore_index=True))
        self.np = np

    def time_predict_10000_ids(self) -> None:
        predict(self.model, self.table)

    def time_predict_10000_ids_addl(self) -> None:
        predict(self.model, self.with_addl)

    def time_events_id_by_id(self) -> None:
        from pkmodel.engine import expand_records, stack_events
        np, table = self.np, self.table
        ids = table["ID"].to_numpy()
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        stops = np.r_[starts[1:], len(table)]
        cols = {c: table[c].to_numpy() for c in ("TIME", "EVID", "AMT", "RATE", "DUR", "II",
                                                  "ADDL", "SS", "CMT")}
        stack_events([expand_records(
            cols["TIME"][lo:hi], cols["EVID"][lo:hi], cols["AMT"][lo:hi],
            rate=cols["RATE"][lo:hi], dur=cols["DUR"][lo:hi], ii=cols["II"][lo:hi],
            addl=cols["ADDL"][lo:hi], ss=cols["SS"][lo:hi], cmt=cols["CMT"][lo:hi],
            row_offset=int(lo)) for lo, hi in zip(starts, stops)])

    def report(self, seconds: dict[str, float]) -> list[str]:
        ours = seconds["time_predict_10000_ids"]
        base = seconds["time_events_id_by_id"]
        return [(f"predict on {self.n:,} IDs ({len(self.table) // self.n} records each): "
                 f"{ours:.2f} s (target < 0.15 s); building their events ID by ID alone "
                 f"takes {base:.2f} s ({base / ours:.1f}x the whole vectorised predict)"),
                (f"predict on the same IDs written with ADDL "
                 f"({len(self.with_addl) // self.n} records each): "
                 f"{seconds['time_predict_10000_ids_addl']:.2f} s")]

"""Virtual trials: policies, reproducibility on any executor, outcomes recomputed."""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest

from pkmodel.models import load
from pkmodel.predict import predict
from pkmodel.trial import (
    BayesianDosing,
    KangProactive,
    LabelDosing,
    Visit,
    kang_cohort,
    run_trial,
)

MODEL = load("fasanmade2011")
ARMS = {"label": LabelDosing(), "proactive": KangProactive()}


def visit(troughs, intervals) -> Visit:
    n = len(troughs)
    return Visit(number=0, day=np.full(n, 98.0), trough=np.array(troughs, float),
                 weight=np.full(n, 30.0), dose_mg=np.full(n, 150.0),
                 interval_weeks=np.array(intervals, float))


def test_kang_rule_as_stated():
    """Below 6 mg/L: 2 weeks shorter; below 3: 4 weeks shorter; never under 4 weeks."""
    decision = KangProactive()(visit([7.0, 5.0, 2.0, 5.0, 2.0], [8, 8, 8, 5, 6]))
    assert decision.interval_weeks.tolist() == [8.0, 6.0, 4.0, 4.0, 4.0]
    assert decision.dose_mg.tolist() == [150.0] * 5  # 5 mg/kg x 30 kg


def test_label_arm_follows_the_label_schedule():
    result = run_trial(MODEL, {"label": LabelDosing()}, n=5, seed=3)
    weeks = sorted(result.visits["WEEK"].unique())
    assert weeks == [14.0, 22.0, 30.0, 38.0, 46.0]
    per_kg = result.visits["DOSE_MG"] / result.visits["ID"].map(
        result.patients.set_index("ID")["WT"])
    np.testing.assert_allclose(per_kg, 5.0)
    assert (result.patients["INFUSIONS"] == 5).all()


def test_same_seed_same_numbers_and_executors_agree():
    a = run_trial(MODEL, ARMS, n=20, replicates=3, seed=11)
    b = run_trial(MODEL, ARMS, n=20, replicates=3, seed=11)
    pd.testing.assert_frame_equal(a.patients, b.patients)
    with ThreadPoolExecutor(max_workers=2) as pool:
        c = run_trial(MODEL, ARMS, n=20, replicates=3, seed=11, executor=pool)
    pd.testing.assert_frame_equal(a.patients, c.patients)
    d = run_trial(MODEL, ARMS, n=20, replicates=3, seed=12)
    assert not np.allclose(a.patients["WEEK54_TROUGH"], d.patients["WEEK54_TROUGH"])


def test_children_split_into_jobs_give_the_numbers_of_one_job(monkeypatch, capsys):
    """A replicate's children run in jobs of CHILDREN_PER_JOB (every arm in each), so that
    one large replicate spreads over an executor's workers. Ten children in jobs of four
    (4, 4, 2) give the numbers of one job of ten, in the same order, for the label,
    proactive and Bayesian arms (the arm's draws are made for the whole cohort; the fits
    of a job's children together equal theirs among more children to 1e-9), and a thread
    pool the same as one after another; progress names each finished replicate."""
    from pkmodel import trial

    arms = {**ARMS, "bayesian": BayesianDosing(MODEL)}
    whole = run_trial(MODEL, arms, n=10, replicates=2, seed=8)
    monkeypatch.setattr(trial, "CHILDREN_PER_JOB", 4)
    split = run_trial(MODEL, arms, n=10, replicates=2, seed=8, progress=True)
    assert "replicate 2/2" in capsys.readouterr().err
    for a, b in ((whole.patients, split.patients), (whole.visits, split.visits)):
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True),
                                      check_exact=False, rtol=1e-9)
    assert len(split.patients) == 2 * 3 * 10
    with ThreadPoolExecutor(max_workers=2) as pool:
        pooled = run_trial(MODEL, arms, n=10, replicates=2, seed=8, executor=pool)
    pd.testing.assert_frame_equal(split.patients, pooled.patients)
    pd.testing.assert_frame_equal(split.visits, pooled.visits)


def test_dask_cluster_gives_the_same_numbers():
    distributed = pytest.importorskip("distributed", reason="dask extra not installed")
    local = run_trial(MODEL, ARMS, n=15, replicates=2, seed=5)
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2,
                            dashboard_address=None) as client:
        remote = run_trial(MODEL, ARMS, n=15, replicates=2, seed=5,
                           executor=client.get_executor())
    pd.testing.assert_frame_equal(local.patients, remote.patients)
    pd.testing.assert_frame_equal(local.visits, remote.visits)


def test_week_54_trough_recomputed_with_predict():
    """Without IOV, each child's true week-54 trough equals predict() on its doses with its
    true ETAs (independent path: DataFrames, validation, the public predict)."""
    no_iov = dataclasses.replace(MODEL, iov={"KAPPA_CL": 0.0})
    result = run_trial(no_iov, {"proactive": KangProactive()}, n=6, seed=2)
    for _, child in result.patients.iterrows():
        doses = result.visits[result.visits["ID"] == child["ID"]]
        times = [0.0, 14.0, 42.0] + doses["DAY"].tolist()
        amounts = [5.0 * child["WT"]] * 3 + doses["DOSE_MG"].tolist()
        table = pd.DataFrame({"ID": 1, "TIME": times + [378.0], "EVID": [1] * len(times) + [0],
                              "AMT": amounts + [0.0],
                              "RATE": [a * 12.0 for a in amounts] + [0.0]})
        for name in ("WT", "ALB", "ATI", "IMM"):
            table[name] = child[name]
        eta = np.array([[child["ETA_CL"], child["ETA_V1"], child["ETA_V2"]]])
        ours = predict(no_iov, table, eta)["IPRED"].iloc[-1]
        assert ours == pytest.approx(child["WEEK54_TROUGH"], rel=1e-10)


def test_proactive_arm_reaches_the_target_more_often_than_label():
    result = run_trial(MODEL, ARMS, n=112, replicates=2, seed=2026)
    summary = result.summary.set_index(["ARM", "OUTCOME"])["MEAN"]
    assert summary["proactive", "ON_TARGET_WEEK54"] > summary["label", "ON_TARGET_WEEK54"]
    assert summary["proactive", "MG_PER_KG_PER_YEAR"] > summary["label", "MG_PER_KG_PER_YEAR"]
    low_high = result.summary[["LOW", "HIGH"]].to_numpy()
    assert np.all(low_high[:, 0] <= low_high[:, 1])


def test_bayesian_arm_decides_with_recommend_regimen():
    result = run_trial(MODEL, {"bayes": BayesianDosing(MODEL)}, n=3, seed=4)
    first = result.visits[result.visits["VISIT"] == 0]
    label = 5.0 * result.patients.set_index("ID").loc[first["ID"], "WT"].to_numpy()
    kept = np.isclose(first["DOSE_MG"].to_numpy(), label)  # the current dose (interval only)
    assert ((first["DOSE_MG"] % 100 == 0) | kept).all()  # else whole 100-mg vials
    assert first["INTERVAL_WEEKS"].between(4, 8).all()
    assert result.patients["INFUSIONS"].min() >= 5


def test_cohort_is_seeded_and_within_stated_ranges():
    a, b = kang_cohort(500, seed=1), kang_cohort(500, seed=1)
    pd.testing.assert_frame_equal(a, b)
    assert a["WT"].between(20, 90).all() and a["ALB"].between(2.5, 5.0).all()
    assert (a["ATI"] == 0).all() and (a["IMM"] == 1).all()
    assert abs(np.median(a["WT"]) - 42.0) < 3.0


def test_bad_trial_arguments():
    with pytest.raises(ValueError, match="at least 1"):
        run_trial(MODEL, ARMS, n=0)
    with pytest.raises(ValueError, match="at least one arm"):
        run_trial(MODEL, {})


def test_antibodies_form_more_often_at_low_concentrations_and_raise_clearance():
    from pkmodel.trial import AntibodyFormation

    hazard = AntibodyFormation(hazard_per_week=0.05, threshold=3.0)
    result = run_trial(MODEL, ARMS, n=200, seed=8, antibodies=hazard)
    share = result.patients.groupby("ARM")["ANTIBODIES"].mean()
    assert share["label"] > share["proactive"] > 0.0
    without = run_trial(MODEL, ARMS, n=200, seed=8)
    assert not without.patients["ANTIBODIES"].any()
    formed = result.patients["ANTIBODIES"].to_numpy()
    lower = (result.patients["WEEK54_TROUGH"].to_numpy()
             <= without.patients["WEEK54_TROUGH"].to_numpy() + 1e-12)
    assert lower[formed].all()  # same children and draws: antibodies only lower troughs
    with pytest.raises(ValueError, match="hazard_per_week"):
        AntibodyFormation(hazard_per_week=-1.0)


def test_bayesian_all_at_once_equals_recommend_regimen_child_by_child():
    """The vectorised MAP policy makes recommend_regimen's choice for every child."""
    fast = run_trial(MODEL, {"bayes": BayesianDosing(MODEL)}, n=6, seed=21)
    slow = run_trial(MODEL, {"bayes": BayesianDosing(MODEL, options={"vial_mg": 100.0})},
                     n=6, seed=21)
    pd.testing.assert_frame_equal(fast.visits, slow.visits)


@dataclasses.dataclass
class Recording:
    """A policy that records the visits it is shown and the decisions it returns."""

    policy: BayesianDosing
    needs_records = True

    def __post_init__(self):
        self.seen = []

    def __call__(self, visit):
        decision = self.policy(visit)
        self.seen.append((visit, decision))
        return decision


def test_warm_start_threads_each_visits_fits_and_decides_as_three_starts():
    """Each visit hands the policy the fits its decision returned at the previous one (None
    at the first); warm-started children (one start from their last modes) get the
    decisions of three starts at every visit here (with fasanmade2011 they did for 2,800
    children; not always: see BayesianDosing), and the warm fits start where they are
    told: from the modes of a converged fit of the same records they take no step."""
    spy = Recording(BayesianDosing(MODEL, warm_start=True))
    warm = run_trial(MODEL, {"bayes": spy}, n=8, seed=21)
    cold = run_trial(MODEL, {"bayes": BayesianDosing(MODEL)}, n=8, seed=21)
    pd.testing.assert_frame_equal(warm.visits, cold.visits)
    assert spy.seen[0][0].memo is None
    for (_, before), (after, _) in zip(spy.seen, spy.seen[1:]):
        assert after.memo is before.memo
    visit, decision = spy.seen[3]
    fits = decision.memo
    assert fits["SUCCESS"].all() and fits["ID"].tolist() == list(pd.unique(visit.records["ID"]))
    assert (fits["ITERATIONS"] > 3).all()  # the previous visit's modes are some way off
    again = BayesianDosing(MODEL, warm_start=True)(dataclasses.replace(visit, memo=fits)).memo
    assert (again["ITERATIONS"] <= 1).all()
    names = [c for c in fits.columns if c.startswith(("ETA_", "KAPPA_"))]
    np.testing.assert_allclose(again[names], fits[names], atol=1e-5)


def test_warm_start_falls_back_to_three_starts_where_the_last_fit_is_unusable(monkeypatch):
    """A child whose last fit failed, or who has none, is fitted from the three starts
    (whatever its last modes say), and so is one whose warm fit fails; the others start
    from theirs (far-off modes of a converged fit still lead back to the mode), with the
    same decisions and modes as three starts give."""
    from pkmodel import trial

    def cohort(n, seed):  # IDs as text, in no sorted order
        return kang_cohort(n, seed=seed).assign(ID=["k", "b", "x", "a", "m", "c"][:n])

    spy = Recording(BayesianDosing(MODEL))
    result = run_trial(MODEL, {"bayes": spy}, n=6, seed=21, cohort=cohort)
    assert set(result.visits["ID"]) == set(result.patients["ID"]) == set("kbxamc")
    visit, decision = spy.seen[2]
    fits = decision.memo.reset_index(drop=True)
    names = [c for c in fits.columns if c.startswith(("ETA_", "KAPPA_"))]
    ids = fits["ID"].tolist()
    previous = fits.copy()
    previous.loc[0, names] = 40.0  # absurd, and marked failed: not used
    previous.loc[0, "SUCCESS"] = False
    previous.loc[1, names] = 1.5  # far off, but converged: the warm start goes from there
    previous.loc[4, names] = 1e3  # converged, they say: the warm fit fails (overflow)
    previous = previous.drop(index=2)  # no last fit
    calls = []

    def estimate_map(model, data, **options):
        calls.append((options.get("starts", 3), pd.unique(data["ID"]).tolist()))
        return original(model, data, **options)

    original = trial.estimate_map
    monkeypatch.setattr(trial, "estimate_map", estimate_map)
    with np.errstate(over="ignore", invalid="ignore"):  # the fit from 1e3 overflows
        warm = BayesianDosing(MODEL, warm_start=True)(dataclasses.replace(visit, memo=previous))
    assert calls == [(1, [ids[1], ids[3], ids[4], ids[5]]), (3, [ids[0], ids[2], ids[4]])]
    np.testing.assert_allclose(warm.memo[names].to_numpy(), fits[names].to_numpy(),
                               atol=1e-5)
    assert warm.memo["ID"].tolist() == fits["ID"].tolist() == list("kbxamc")
    np.testing.assert_array_equal(warm.dose_mg, decision.dose_mg)
    np.testing.assert_array_equal(warm.interval_weeks, decision.interval_weeks)
    assert warm.memo["ITERATIONS"].iloc[1] > 3  # started far off
    assert (warm.memo["ITERATIONS"].iloc[[3, 5]] <= 1).all()  # started at their modes


def test_warm_start_is_refused_where_children_are_fitted_one_by_one():
    with pytest.raises(ValueError, match="warm_start"):
        BayesianDosing(MODEL, n_draws=100, warm_start=True)
    with pytest.raises(ValueError, match="warm_start"):
        BayesianDosing(MODEL, options={"vial_mg": 50.0}, warm_start=True)


def test_trial_result_serialises_and_runs_on_a_process_pool():
    """A trial on a process pool (the model pickles after use) gives the same summary as
    here, and its result is plain JSON."""
    from concurrent.futures import ProcessPoolExecutor

    model = load("fasanmade2011")
    arms = {"label": LabelDosing()}
    here = run_trial(model, arms, n=6, replicates=2, seed=4)
    with ProcessPoolExecutor(max_workers=2) as pool:
        pooled = run_trial(model, arms, n=6, replicates=2, seed=4, executor=pool)
    pd.testing.assert_frame_equal(here.summary, pooled.summary)
    doc = json.loads(here.to_json(allow_nan=False))
    assert doc["target"] == 6.0 and len(doc["patients"]) == 12

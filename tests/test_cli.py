"""The pkmodel command end to end: table, JSON, figure, input errors without traceback."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import pkmodel
from pkmodel.cli import EXIT_REFUSED, SCHEMA_RECOMMENDATION, main

CHILD = Path(__file__).resolve().parents[1] / "examples" / "child.csv"


def test_recommend_prints_the_status_first_then_a_readable_table(capsys):
    assert main(["recommend", str(CHILD), "--draws", "200"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Status: OK\n")
    assert "Parameters (typical for these covariates" in out and "Action: change" in out
    assert "HALF_LIFE" in out
    assert "Recommended:" in out and "Next dose due: day 154" in out
    assert "Troughs (mg/L)" in out


def test_recommend_json_document(capsys):
    assert main(["recommend", str(CHILD), "--json", "--draws", "200", "--target", "5"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == SCHEMA_RECOMMENDATION == "pkmodel.recommendation/2"
    assert doc["target_mg_per_l"] == 5.0 and doc["model"] == "fasanmade2011"
    assert doc["pkmodel_version"] == pkmodel.__version__ and doc["patient"]["id"] == 1
    assert doc["feasible"] is True and doc["status"] == "ok" and doc["reasons"] == []
    assert doc["action"] == "change" and doc["objective"] == "smallest_change"
    rec = doc["recommended"]
    assert set(rec) == {"dose_mg", "interval_weeks", "mg_per_kg", "mg_per_kg_per_week",
                        "change_in_drug_per_week", "lowest_trough", "lowest_trough_map", "pta",
                        "meets_target", "above_label", "below_label"}
    assert rec["lowest_trough"] >= 5.0
    assert doc["troughs"][-1]["steady_state"] is True and doc["troughs"][-1]["week"] is None
    current = doc["current_troughs"]
    assert [t["day"] for t in current[:2]] == [154.0 + 56.0, 154.0 + 112.0]
    assert min(t["level"] for t in current) == pytest.approx(doc["current"]["lowest_trough"])
    assert set(doc["estimate"]["parameters"]) == {"CL", "V1", "Q", "V2"}
    assert doc["settings"]["n_draws"] == 200 and doc["settings"]["vial_mg"] == 100.0
    assert set(doc["checks"]) == {"max_abs_iwres", "eta_cl_sd", "eta_cl_shrinkage", "ess"}


def test_every_setting_has_a_flag(capsys):
    assert main(["recommend", str(CHILD), "--json", "--draws", "50", "--seed", "4",
                 "--objective", "least_drug", "--intervals", "4,6,8", "--vial-mg", "none",
                 "--max-mg-per-kg", "15", "--horizon-weeks", "26", "--lloq", "0.3",
                 "--probability", "0.8", "--next-dose-day", "160",
                 "--current-interval-weeks", "8", "--accept-outliers"]) == 0
    doc = json.loads(capsys.readouterr().out)
    settings = doc["settings"]
    assert settings == {"objective": "least_drug", "probability": 0.8,
                        "intervals_weeks": [4.0, 6.0, 8.0], "vial_mg": None,
                        "dose_step_mg_per_kg": None, "max_mg_per_kg": 15.0,
                        "min_interval_weeks": 4.0, "max_interval_weeks": 12.0,
                        "horizon_weeks": 26.0, "n_draws": 50, "seed": 4,
                        "accept_outliers": True, "min_ess": 200.0, "lloq": 0.3}
    assert doc["next_dose_day"] == 160.0
    assert doc["closest"]["mg_per_kg"] == pytest.approx(
        round(doc["closest"]["mg_per_kg"]))  # 1-mg/kg steps without vials
    assert main(["recommend", str(CHILD), "--json", "--draws", "50",
                 "--probability", "map"]) == 0
    assert json.loads(capsys.readouterr().out)["probability"] is None


def test_week14_visit_from_the_command_line(tmp_path, capsys):
    """Induction at weeks 0, 2, 6 and the trough before the first maintenance dose."""
    path = tmp_path / "week14.csv"
    path.write_text("\n".join(CHILD.read_text().splitlines()[:5]) + "\n")
    assert main(["recommend", str(path), "--draws", "200"]) == 0
    out = capsys.readouterr().out
    assert "Next dose due: day 98 (week 14)" in out
    assert "every 8 weeks" in out.split("Current regimen:")[1].splitlines()[0]
    assert "after induction" in out


def test_refused_recommendation_exits_3(tmp_path, capsys):
    path = tmp_path / "absurd.csv"
    path.write_text(CHILD.read_text().replace(",1.1\n", ",1000000000\n"))
    assert main(["recommend", str(path), "--draws", "100"]) == EXIT_REFUSED == 3
    out = capsys.readouterr().out
    assert out.startswith("Status: REFUSED\n  - ")
    assert "the measured 1e+09 mg/L on day 98 is implausible" in out
    assert "Recommended:" not in out
    figure = tmp_path / "refused.png"
    assert main(["recommend", str(path), "--draws", "100", "--json", "--plot",
                 str(figure)]) == 3
    assert figure.read_bytes()[:4] == b"\x89PNG"
    doc = json.loads(capsys.readouterr().out)
    assert doc["status"] == "refused" and doc["recommended"] is None and doc["reasons"]


def test_clinical_tables_with_dates(tmp_path, capsys):
    """Dosing and lab tables; the week-22 sample has a date only (pre-dose assumed)."""
    doses = tmp_path / "doses.csv"
    doses.write_text("DATE,TIME,DOSE_MG\n2026-01-05,09:00,140\n2026-01-19,09:00,140\n"
                     "2026-02-16,09:30,140\n2026-04-13,10:00,140\n")
    labs = tmp_path / "labs.csv"
    labs.write_text("DATE,TIME,DV,WT,ALB,ATI,IMM\n2026-01-05,08:30,,27.5,3.3,0,1\n"
                    "2026-04-13,09:15,1.1,28,3.3,0,1\n2026-06-08,,0.8,28.4,3.4,0,1\n")
    assert main(["recommend", "--doses", str(doses), "--labs", str(labs), "--json",
                 "--draws", "200"]) == 0
    doc = json.loads(capsys.readouterr().out)
    # 8 weeks after 2026-04-13 10:00; the sample that day had no time and was taken as
    # 12:00, so the dose follows it at 12:00 (both assumptions are in the notes)
    assert doc["next_dose_date"] == "2026-06-08T12:00"
    assert doc["weight_kg"] == 28.4  # the weight at the visit
    assert any("had no time" in note for note in doc["notes"])
    assert any("new regimen starts at the last record" in note for note in doc["notes"])
    first = doc["recommended"]["interval_weeks"] * 7
    assert doc["troughs"][0]["date"] == str(
        pd.Timestamp("2026-06-08 12:00") + pd.Timedelta(days=first))[:16].replace(" ", "T")
    assert doc["patient"] == {"id": 1, "weight_kg": 28.4}
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert main(["recommend", "--doses", str(empty), "--labs", str(labs)]) == 4
    assert "the file is empty" in capsys.readouterr().err
    assert main(["recommend", str(CHILD), "--doses", str(doses)]) == 2
    assert "not both" in capsys.readouterr().err


def test_recommend_plot(tmp_path, capsys):
    figure = tmp_path / "forecast.png"
    assert main(["recommend", str(CHILD), "--draws", "100", "--plot", str(figure)]) == 0
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_with_and_without_measured_troughs(tmp_path, capsys):
    assert main(["predict", str(CHILD), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)["records"]
    assert len(records) == 6 and {"pred", "ipred", "dv"} <= set(records[0])
    plain = tmp_path / "plain.csv"
    plain.write_text(CHILD.read_text().replace(",0,28.0", ",1,28.0"))
    assert main(["predict", str(plain)]) == 0
    assert "PRED" in capsys.readouterr().out


def test_predict_reads_mdv_through_the_validated_table(tmp_path, capsys):
    """A file without an MDV column: measured DVs on EVID 0 rows are observations (NONMEM's
    default), so IPRED is fitted and differs from PRED (it used to equal PRED)."""
    table = pd.read_csv(CHILD, na_values=".").drop(columns=["MDV"])
    path = tmp_path / "no_mdv.csv"
    table.to_csv(path, index=False, na_rep=".")
    assert main(["predict", str(path), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)["records"]
    measured = [r for r in records if r["dv"] is not None]
    assert len(measured) == 2
    assert all(abs(r["ipred"] - r["pred"]) > 1e-3 * r["pred"] for r in measured)


@pytest.mark.parametrize("content,words", [
    ("ID,TIME,AMT\n1,0,-5\n", "column 'AMT', row 0 (ID 1)"),
    ("ID,TIME,AMT,DV,WT,ALB,ATI,IMM\n1,0,100,.,28,3.3,0,1\n1,56,0,-2,28,3.3,0,1\n",
     "column 'DV', row 1 (ID 1): expected a measured concentration > 0"),
    ("ID,TIME,AMT,WT,ALB,ATI,IMM\n1,0,100,28,35,0,1\n", "column 'ALB'"),
])
def test_input_errors_are_messages_not_tracebacks(tmp_path, capsys, content, words):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    assert main(["recommend", str(path)]) == 4
    err = capsys.readouterr().err
    assert err.startswith("pkmodel: error:") and words in err and "Traceback" not in err


def test_warnings_are_plain_lines(tmp_path, capsys):
    """A trough typed in ng/mL makes the fit implausible: `predict` still answers, and the
    warning is one plain line, without a file path."""
    path = tmp_path / "ngml.csv"
    path.write_text(CHILD.read_text().replace(",1.1\n", ",1100\n"))
    assert main(["predict", str(path)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("pkmodel: warning: ID 1: a measured value or an ETA lies more")
    assert ".py:" not in err


def test_missing_file_and_installed_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pkmodel.cli", "recommend",
                             str(tmp_path / "none.csv")], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 4 and "No such file" in result.stderr
    assert "Traceback" not in result.stderr


def test_trial_command_json_and_errors(capsys, tmp_path):
    figure = tmp_path / "trial.png"
    assert main(["trial", "--n", "10", "--replicates", "2", "--seed", "3", "--json",
                 "--plot", str(figure)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "pkmodel.trial/1" and doc["arms"] == ["label", "proactive"]
    outcomes = {(row["arm"], row["outcome"]) for row in doc["summary"]}
    assert ("proactive", "ON_TARGET_WEEK54") in outcomes
    assert figure.read_bytes()[:4] == b"\x89PNG"
    assert main(["trial", "--arms", "magic"]) == 2
    assert "unknown" in capsys.readouterr().err
    for flag, bad in (("--target", "nan"), ("--target", "-1"), ("--workers", "0"),
                      ("--workers", "two")):
        with pytest.raises(SystemExit) as stop:
            main(["trial", flag, bad])
        assert stop.value.code == 2


def test_trial_command_warm_start_reaches_the_bayesian_arm(capsys, monkeypatch):
    """--warm-start builds the Bayesian arm with warm_start=True (off without it) and the
    JSON says which."""
    from pkmodel import trial

    made, real = [], trial.BayesianDosing

    def bayesian(model, **options):
        made.append(options["warm_start"])
        return real(model, **options)

    monkeypatch.setattr(trial, "BayesianDosing", bayesian)
    args = ["trial", "--n", "3", "--replicates", "1", "--seed", "21", "--arms", "bayesian",
            "--json"]
    for flags, expected in (([], False), (["--warm-start"], True)):
        assert main(args + flags) == 0
        assert json.loads(capsys.readouterr().out)["warm_start"] is expected
        assert made.pop() is expected
    assert main(["trial", "--n", "3", "--arms", "label", "--warm-start"]) == 2
    assert "applies to the bayesian arm" in capsys.readouterr().err


def test_trial_command_on_worker_processes_gives_the_same_numbers(capsys):
    """--workers 2 runs the trial's jobs (here two replicates) in two processes: the same
    summary as in this one."""
    args = ["trial", "--n", "6", "--replicates", "2", "--seed", "4", "--json"]
    assert main(args) == 0
    here = json.loads(capsys.readouterr().out)
    assert main(args + ["--workers", "2"]) == 0
    assert json.loads(capsys.readouterr().out) == here


MODEL_FILE = '''
import numpy as np, sympy as sp
from pkmodel.engine import Structure
from pkmodel.model import PopulationModel, ResidualError
TVCL, TVV, ETA_CL, ETA_V = sp.symbols("TVCL TVV ETA_CL ETA_V")
model = PopulationModel("onecpt", Structure(1), {"TVCL": 3.0, "TVV": 40.0},
                        {"CL": TVCL * sp.exp(ETA_CL), "V1": TVV * sp.exp(ETA_V)},
                        np.diag([0.1, 0.1]), ("ETA_CL", "ETA_V"),
                        ResidualError(proportional=0.15), time_unit="h")
'''


def fit_inputs(tmp_path):
    """A model file (start TVCL 3, TVV 40) and a CSV of 30 subjects simulated from CL 4
    L/h, V 50 L (IIV 0.09, 0.04; 10 % error; 500 mg, samples at 1, 4, 8, 16 h)."""
    import runpy

    from pkmodel.predict import simulate
    model_path = tmp_path / "model.py"
    model_path.write_text(MODEL_FILE)
    start = runpy.run_path(str(model_path))["model"]
    truth = dataclasses.replace(start, theta={"TVCL": 4.0, "TVV": 50.0},
                                omega=np.diag([0.09, 0.04]),
                                residual=dataclasses.replace(start.residual,
                                                             proportional=0.1))
    times = [1.0, 4.0, 8.0, 16.0]
    one = pd.DataFrame({"ID": 1, "TIME": [0.0, *times], "AMT": [500.0, 0, 0, 0, 0],
                        "EVID": [1, 0, 0, 0, 0], "MDV": [1, 0, 0, 0, 0]})
    template = pd.concat([one.assign(ID=i) for i in range(1, 31)], ignore_index=True)
    sims = simulate(truth, template, n=1, seed=8)
    data = template.copy()
    data.loc[data["EVID"] == 0, "DV"] = sims["DV"].to_numpy()
    path = tmp_path / "data.csv"
    data.to_csv(path, index=False, na_rep=".")
    return model_path, path


def test_fit_command_writes_estimates_and_nonmem_files(tmp_path, capsys):
    """A population simulated from CL 4 L/h, V 50 L (IIV 0.09, 0.04; 10 % error), fitted
    from other initial values: the command prints the estimates, writes the files, and
    recovers CL and V within 15 % (30 subjects, 4 samples each)."""
    model_path, path = fit_inputs(tmp_path)
    out = tmp_path / "fit"
    assert main(["fit", str(model_path), str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "minimization successful" in printed.out and "iteration" in printed.err
    doc = json.loads((out / "fit.json").read_text())
    assert doc["schema"] == "pkmodel.fit/1" and doc["success"]
    import json_schema
    assert json_schema.problems(doc, json_schema.load("fit-1")) == []
    estimates = {e["NAME"]: e["ESTIMATE"] for e in doc["estimates"]}
    assert estimates["TVCL"] == pytest.approx(4.0, rel=0.15)
    assert estimates["TVV"] == pytest.approx(50.0, rel=0.15)
    for name in ("run.ext", "run.phi", "run.cov", "run.tab", "estimates.csv",
                 "records.csv", "individuals.csv"):
        assert (out / name).stat().st_size > 0
    ext = (out / "run.ext").read_text().splitlines()
    assert ext[1].split()[:3] == ["ITERATION", "TVCL", "TVV"]
    assert float(ext[2].split()[-1]) == pytest.approx(doc["ofv"], rel=1e-5)


def test_fit_command_runs_saem(tmp_path, capsys):
    """--method saem --seed 2 on the same data: the summary says SAEM completed, fit.json
    (schema fit-1) has method saem, an importance-sampling OFV and SEs; CL and V within
    15 %; progress every 50 iterations names what it reports."""
    model_path, path = fit_inputs(tmp_path)
    out = tmp_path / "saem"
    assert main(["fit", str(model_path), str(path), "--out", str(out), "--method", "saem",
                 "--seed", "2"]) == 0
    printed = capsys.readouterr()
    assert "stochastic approximation completed" in printed.out
    assert "iteration  50  -2 ln p(y | ETA) of the chains" in printed.err
    doc = json.loads((out / "fit.json").read_text())
    import json_schema
    assert json_schema.problems(doc, json_schema.load("fit-1")) == []
    assert doc["method"] == "saem" and doc["notes"][0].startswith("OFV is the importance")
    estimates = {e["NAME"]: e for e in doc["estimates"]}
    assert estimates["TVCL"]["ESTIMATE"] == pytest.approx(4.0, rel=0.15)
    assert estimates["TVV"]["ESTIMATE"] == pytest.approx(50.0, rel=0.15)
    assert estimates["TVCL"]["SE"] > 0


def test_fit_command_takes_bounds_from_the_command_line_and_the_model_file(tmp_path,
                                                                           capsys):
    """--bound TVCL=,3.5 holds CL (whose estimate unbounded is near 4) below 3.5: it ends
    at the bound and the notes say so; a model file's `bounds` apply too, the command line
    over them; the exact gradient is used (fit.json says so); a malformed bound is a usage
    error."""
    model_path, path = fit_inputs(tmp_path)
    out = tmp_path / "bounded"
    main(["fit", str(model_path), str(path), "--out", str(out), "--bound", "TVCL=,3.5",
          "--no-covariance", "--json"])
    doc = json.loads((out / "fit.json").read_text())
    estimates = {e["NAME"]: e["ESTIMATE"] for e in doc["estimates"]}
    assert 3.49 < estimates["TVCL"] < 3.5
    assert any("TVCL" in note and "bound" in note for note in doc["notes"])
    assert doc["gradient"] == "exact"
    with_file = tmp_path / "model_bounds.py"
    with_file.write_text(MODEL_FILE + "bounds = {'TVV': (None, 45.0)}\n")
    out = tmp_path / "file"
    main(["fit", str(with_file), str(path), "--out", str(out), "--bound", "TVCL=,3.5",
          "--no-covariance"])
    doc = json.loads((out / "fit.json").read_text())
    estimates = {e["NAME"]: e["ESTIMATE"] for e in doc["estimates"]}
    assert estimates["TVV"] < 45.0 and estimates["TVCL"] < 3.5
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", str(model_path), str(path), "--out", str(out), "--bound", "TVCL=3"])
    assert exit_info.value.code == 2
    assert "expected THETA=LOW,HIGH" in capsys.readouterr().err
    bad = tmp_path / "model_bad_bounds.py"
    bad.write_text(MODEL_FILE + "bounds = {'TVCL': 0}\n")
    assert main(["fit", str(bad), str(path), "--out", str(out)]) == 2
    assert "`bounds` of TVCL must be a pair (low, high)" in capsys.readouterr().err
    assert main(["fit", str(model_path), str(path), "--out", str(out), "--fix", "TVCL",
                 "--bound", "TVCL=0,1"]) == 2
    assert "which are fixed" in capsys.readouterr().err
    # names with a comma inside parentheses stay whole
    assert main(["fit", str(model_path), str(path), "--out", str(out), "--fix",
                 "OMEGA(1,1),OMEGA(2,2)", "--no-covariance", "--json"]) == 0
    fixed = {e["NAME"]: e["FIXED"] for e in json.loads(capsys.readouterr().out)["estimates"]}
    assert fixed["OMEGA(1,1)"] and fixed["OMEGA(2,2)"] and not fixed["TVCL"]


def test_fit_command_names_a_bad_model(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("model = 3\n")
    assert main(["fit", str(bad), str(CHILD), "--out", str(tmp_path / "x")]) == 2
    assert "PopulationModel" in capsys.readouterr().err
    assert main(["fit", "nonsense", str(CHILD), "--out", str(tmp_path / "x")]) == 2


def test_version_module_entry_and_json_errors(tmp_path, capsys):
    """`--version`, `python -m pkmodel`, and with --json a data error as a JSON document
    (schema pkmodel.error/1) naming column, row and ID, exit status 4."""
    result = subprocess.run([sys.executable, "-m", "pkmodel", "--version"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.strip() == f"pkmodel {pkmodel.__version__}"
    bad = tmp_path / "bad.csv"
    bad.write_text("ID,TIME,AMT,DV,WT,ALB,ATI,IMM\n1,0,100,.,28,3.3,0,1\n1,56,0,-2,28,3.3,0,1\n")
    assert main(["recommend", str(bad), "--json"]) == 4
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["schema"] == "pkmodel.error/1" and doc["kind"] == "data"
    assert (doc["column"], doc["row"], doc["id"]) == ("DV", 1, 1)
    assert doc["exit_status"] == 4 and captured.err.startswith("pkmodel: error: column 'DV'")


def test_predict_on_a_time_grid(capsys):
    """--times: one record per grid time, EVID an integer; where a grid time is a record's
    time (day 154, the last trough) the prediction equals the record's."""
    assert main(["predict", str(CHILD), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)["records"]
    at_154 = next(r for r in records if r["time"] == 154.0)
    assert main(["predict", str(CHILD), "--times", "140:168:7", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    grid = doc["records"]
    assert [r["time"] for r in grid] == [140.0, 147.0, 154.0, 161.0, 168.0]
    assert all(r["evid"] == 2 and isinstance(r["evid"], int) for r in grid)
    assert grid[2]["ipred"] == pytest.approx(at_154["ipred"], rel=1e-12)
    assert grid[0]["ipred"] > grid[1]["ipred"] > grid[2]["ipred"]  # decline, no dose
    assert doc["time_unit"] == "day"
    with pytest.raises(SystemExit):
        main(["predict", str(CHILD), "--times", "5:1:1"])


def test_profile_figure_leaves_the_backend_alone(tmp_path):
    """plot_profile draws the MAP line, the band, the censored value at its LLOQ and the
    proposed doses; neither it nor plot_recommendation changes matplotlib's backend."""
    matplotlib = pytest.importorskip("matplotlib")
    from pkmodel.dosing import recommend_regimen
    from pkmodel.estimate import estimate_map, sample_posterior
    from pkmodel.models import load
    from pkmodel.plot import plot_profile, plot_recommendation

    backend = matplotlib.get_backend()
    matplotlib.use("svg")  # a backend pkmodel would not choose itself
    model = load("fasanmade2011")
    child = pd.read_csv(CHILD, na_values=".").assign(LLOQ=1.0)  # day 154: 0.8 < 1.0
    fit = estimate_map(model, child)
    rec = recommend_regimen(model, child, 6.0, n_draws=100)
    fig = plot_profile(fit, posterior=sample_posterior(model, child, n=100, estimate=fit),
                       recommendation=rec, path=tmp_path / "profile.png")
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert {"individual (MAP)", "posterior 80 % band", "LLOQ", "target 6"} <= set(labels)
    assert (tmp_path / "profile.png").read_bytes()[:4] == b"\x89PNG"
    plot_recommendation(rec)
    from pkmodel.plot import plot_prior_posterior
    panels = plot_prior_posterior(fit, sample_posterior(model, child, n=100, estimate=fit))
    assert [ax.get_xlabel() for ax in panels.axes] == ["CL", "V1", "V2"]  # the ETA-bearing
    assert matplotlib.get_backend() == "svg"
    matplotlib.use(backend)


def test_patient_report_is_one_self_contained_page(tmp_path):
    """--report: every section present, the status and its reasons, the figures embedded
    as data (no external resource), parsed with the standard library's HTML parser."""
    from html.parser import HTMLParser

    path = tmp_path / "report.html"
    assert main(["recommend", str(CHILD), "--draws", "100", "--report", str(path)]) == 0

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.headings, self.sources, self.links, self.current = [], [], [], None

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            self.current = tag
            if tag in ("img", "script"):
                self.sources.append(attrs.get("src", ""))
            if tag in ("link", "a") and attrs.get("href"):
                self.links.append(attrs["href"])

        def handle_endtag(self, tag):
            self.current = None

        def handle_data(self, data):
            if self.current == "h2" and data.strip():
                self.headings.append(data)

    page = Page()
    text = path.read_text()
    page.feed(text)
    assert page.headings == ["Why this status", "Recommendation", "Patient and data",
                             "Model", "Fit", "Forecast", "Basis of the decision", "Notes"]
    assert len(page.sources) == 2 and all(s.startswith("data:image/png;base64,")
                                          for s in page.sources)
    assert page.links == []
    assert "Status: OK" in text or "Status: CAUTION" in text
    assert "Fasanmade AA et al. Clin Ther 2011" in text  # the model's citation


def test_every_json_document_conforms_to_its_shipped_schema(tmp_path, capsys):
    """recommend (ok and refused), predict and errors with --json, and fit.json, against
    pkmodel/schemas/*.schema.json (checked by tests/json_schema.py); a deliberately broken
    document fails the check."""
    import json_schema

    assert main(["recommend", str(CHILD), "--draws", "50", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert json_schema.problems(doc, json_schema.load("recommendation-2")) == []
    assert json_schema.problems({**doc, "status": "fine"}, json_schema.load(
        "recommendation-2")) == ["$.status: 'fine' not in ['ok', 'caution', 'refused']"]
    outlier = tmp_path / "ng.csv"
    outlier.write_text(CHILD.read_text().replace(",1.1\n", ",1100\n"))
    assert main(["recommend", str(outlier), "--draws", "50", "--json"]) == 3
    refused = json.loads(capsys.readouterr().out)
    assert refused["status"] == "refused" and isinstance(refused["warnings"], list)
    assert json_schema.problems(refused, json_schema.load("recommendation-2")) == []
    assert main(["predict", str(CHILD), "--json"]) == 0
    assert json_schema.problems(json.loads(capsys.readouterr().out),
                                json_schema.load("prediction-1")) == []
    assert main(["recommend", str(tmp_path / "missing.csv"), "--json"]) == 4
    assert json_schema.problems(json.loads(capsys.readouterr().out),
                                json_schema.load("error-1")) == []


def test_recommend_with_several_models_from_the_command_line(capsys):
    """--models: the weights, each model's answer and the selected model's recommendation,
    in the table and in the JSON document (key "models")."""
    assert main(["recommend", str(CHILD), "--models", "fasanmade2011,fasanmade2009",
                 "--draws", "300", "--json"]) in (0, 3)
    doc = json.loads(capsys.readouterr().out)
    block = doc["models"]
    rows = {r["MODEL"]: r for r in block["comparison"]}
    assert set(rows) == {"fasanmade2011", "fasanmade2009"}
    # the example file has no SEX: fasanmade2009 cannot be formed, weight 0 and the reason
    assert rows["fasanmade2009"]["WEIGHT"] == 0 and "needs SEX" in rows["fasanmade2009"][
        "MESSAGE"]
    assert rows["fasanmade2011"]["WEIGHT"] == pytest.approx(1.0)
    assert doc["model"] == "fasanmade2011" and len(block["answers"]) == 1
    assert main(["recommend", str(CHILD), "--models", "fasanmade2011"]) == 2  # two or more


def test_recommend_with_models_averaged_from_the_command_line(tmp_path, capsys):
    """--averaging bma: the recommendation on the pooled draws, whose notes give the
    weights; the message says it is an average. (A record with SEX, AGE, CRP so that
    passot2016 can be formed.)"""
    from pkmodel.data import read_nonmem
    record = read_nonmem(CHILD).assign(SEX="F", AGE=9.0, CRP=5.0, DIAGNOSIS="CD")
    path = tmp_path / "child.csv"
    record.to_csv(path, index=False, na_rep=".")
    assert main(["recommend", str(path), "--models", "fasanmade2011,passot2016",
                 "--averaging", "bma", "--draws", "300", "--json"]) in (0, 3)
    doc = json.loads(capsys.readouterr().out)
    assert doc["models"]["message"].startswith("Averaged over the models by weight")
    assert any(n.startswith("Bayesian model average of the posterior draws")
               for n in doc["notes"])
    with pytest.raises(SystemExit):
        main(["recommend", str(path), "--models", "fasanmade2011,passot2016",
              "--averaging", "mean"])

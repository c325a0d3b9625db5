"""The pkmodel command end to end: table, JSON, figure, input errors without traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pkmodel.cli import SCHEMA_RECOMMENDATION, main

CHILD = Path(__file__).resolve().parents[1] / "examples" / "child.csv"


def test_recommend_prints_a_readable_table(capsys):
    assert main(["recommend", str(CHILD), "--draws", "200"]) == 0
    out = capsys.readouterr().out
    assert "Estimated parameters (MAP" in out
    assert "Recommended:" in out and "Next dose due: day 154" in out
    assert "Troughs (mg/L)" in out


def test_recommend_json_document(capsys):
    assert main(["recommend", str(CHILD), "--json", "--draws", "200", "--target", "5"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == SCHEMA_RECOMMENDATION
    assert doc["target_mg_per_l"] == 5.0 and doc["model"] == "fasanmade2011"
    assert doc["feasible"] is True
    rec = doc["recommended"]
    assert set(rec) == {"dose_mg", "interval_weeks", "mg_per_kg", "mg_per_kg_per_week",
                        "lowest_trough", "lowest_trough_map", "pta", "meets_target",
                        "above_label"}
    assert rec["lowest_trough"] >= 5.0
    assert doc["troughs"][-1]["steady_state"] is True and doc["troughs"][-1]["week"] is None
    assert set(doc["estimate"]["parameters"]) == {"CL", "V1", "Q", "V2"}


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


@pytest.mark.parametrize("content,words", [
    ("ID,TIME,AMT\n1,0,-5\n", "column 'AMT', row 0 (ID 1)"),
    ("ID,TIME,AMT,WT,ALB,ATI,IMM\n1,0,100,28,35,0,1\n", "column 'ALB'"),
])
def test_input_errors_are_messages_not_tracebacks(tmp_path, capsys, content, words):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    assert main(["recommend", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pkmodel: error:") and words in err and "Traceback" not in err


def test_missing_file_and_installed_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pkmodel.cli", "recommend",
                             str(tmp_path / "none.csv")], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 2 and "No such file" in result.stderr
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

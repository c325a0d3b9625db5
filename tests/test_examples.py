"""The scripts in examples/ run and say what they should."""

from __future__ import annotations

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_trough_example_runs(capsys):
    runpy.run_path(str(EXAMPLES / "infliximab_troughs.py"), run_name="__main__")
    out = capsys.readouterr().out
    # The script's own verdicts: label dosing misses 6 mg/L for this typical child and
    # 5 mg/kg every 4 weeks meets it (the troughs themselves are checked against solve_ivp
    # in tests/test_models_infliximab.py).
    lines = {line.split(" after induction")[0]: line for line in out.splitlines()
             if "after induction" in line}
    assert "misses the 6 mg/L target" in lines["140 mg (5 mg/kg) every 8 weeks"]
    assert "meets the 6 mg/L target" in lines["140 mg (5 mg/kg) every 4 weeks"]


def test_model_averaging_example_reports_every_method(capsys, monkeypatch):
    """The measurement of docs/several_models.md, on 6 children: one line per method with
    a positive error (the 90-child numbers are in the docs)."""
    monkeypatch.setattr("sys.argv", ["model_averaging_forecasts.py", "6"])
    runpy.run_path(str(EXAMPLES / "model_averaging_forecasts.py"), run_name="__main__")
    lines = [line for line in capsys.readouterr().out.splitlines() if "mean absolute" in line]
    assert [line.split(":")[0].strip() for line in lines] == [
        "fasanmade2011", "xu2012", "dubinsky2017", "BMA", "SELECTED"]
    assert all(float(line.split()[-2]) > 0 for line in lines)

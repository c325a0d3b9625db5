"""The scripts in examples/ run and say what they should."""

from __future__ import annotations

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_trough_example_runs(capsys):
    runpy.run_path(str(EXAMPLES / "infliximab_troughs.py"), run_name="__main__")
    out = capsys.readouterr().out
    # Label dosing misses 6 mg/L for this child; 5 mg/kg every 4 weeks meets it.
    assert "140 mg (5 mg/kg) every 8 weeks after induction: lowest maintenance trough 1.19" in out
    assert "every 4 weeks after induction: lowest maintenance trough 6.01 mg/L (meets" in out

"""Cold start: ``import pkmodel`` and a cold ``pkmodel recommend --json`` in fresh
processes, against ``python -c pass`` in the same run (targets: import under 0.3 s, the
command under 0.6 s)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = ROOT / "examples" / "child.csv"


def _run(*args: str) -> None:
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class ColdCommand:
    """Each timing is a new Python process (best of the runner's repeats)."""

    def setup(self) -> None:
        pass

    def time_python_pass(self) -> None:
        _run("-c", "pass")

    def time_import_pkmodel(self) -> None:
        _run("-c", "import pkmodel")

    def time_import_numpy_pandas_sympy(self) -> None:
        _run("-c", "import numpy, pandas, sympy")

    def time_import_numpy_pandas(self) -> None:
        _run("-c", "import numpy, pandas")  # what a command with a published model needs

    def time_recommend_json(self) -> None:
        _run("-m", "pkmodel", "recommend", str(CHILD), "--json")

    def report(self, seconds: dict[str, float]) -> list[str]:
        base = seconds["time_python_pass"]
        return [(f"python -c pass {base:.3f} s; import pkmodel "
                 f"{seconds['time_import_pkmodel']:.3f} s (target < 0.3 s); cold recommend "
                 f"--json {seconds['time_recommend_json']:.3f} s (target < 0.6 s); numpy "
                 f"and pandas alone {seconds['time_import_numpy_pandas']:.3f} s, with sympy "
                 f"{seconds['time_import_numpy_pandas_sympy']:.3f} s "
                 f"(ratio command / python: "
                 f"{seconds['time_recommend_json'] / base:.0f})")]

"""Run the benchmarks without asv: ``python benchmarks/run.py [name-filter]``.

Each class in ``bench_*.py`` is set up once; each ``time_*`` method is timed as the best
of several repeats (wall clock, one process); a class's ``report`` turns the timings of
this same run into ratios. Results are recorded by hand in benchmarks/README.md.
"""

from __future__ import annotations

import importlib
import inspect
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def best_of(func, repeats: int = 5, budget: float = 20.0) -> float:
    """Best wall-clock time of ``func()`` over up to ``repeats`` runs within ``budget`` s."""
    best = float("inf")
    spent = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        func()
        elapsed = time.perf_counter() - start
        best = min(best, elapsed)
        spent += elapsed
        if spent > budget:
            break
    return best


def main(pattern: str = "") -> None:
    import numpy
    import scipy

    print(f"python {platform.python_version()}, numpy {numpy.__version__}, "
          f"scipy {scipy.__version__}, {platform.machine()}")
    for path in sorted(HERE.glob("bench_*.py")):
        module = importlib.import_module(path.stem)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__ or pattern not in name:
                continue
            bench = cls()
            try:
                bench.setup()
            except NotImplementedError as why:  # asv's convention for "skip"
                print(f"\n## {name}: skipped ({why})")
                continue
            seconds = {}
            print(f"\n## {name}")
            for method in sorted(m for m in dir(bench) if m.startswith("time_")):
                bench.setup()
                seconds[method] = best_of(getattr(bench, method))
                print(f"{method}: {seconds[method] * 1e3:.2f} ms")
            if hasattr(bench, "report"):
                for line in bench.report(seconds):
                    print(line)


if __name__ == "__main__":
    main(*sys.argv[1:])

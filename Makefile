# Quick start: `make demo` and `make test` on a fresh machine with Python 3 and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench mutate clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,plot,dask]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pkmodel recommend examples/child.csv --plot demo_forecast.png

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/run.py

# Mutation testing (not in CI): plants small bugs in engine, estimate, dosing and data one
# at a time and runs the tests that cover each; `mutmut results` lists the survivors. All
# 9,000 mutants take about a day on one core; MUTANTS='pkmodel.dosing.x__level__*' runs some.
mutate: $(STAMP)
	$(PY) -m pip install --quiet 'mutmut>=3.3,<4'
	$(VENV)/bin/mutmut run --max-children 2 $(MUTANTS)
	$(VENV)/bin/mutmut results

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis mutants

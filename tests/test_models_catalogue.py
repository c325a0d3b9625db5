"""The compiled catalogue of published models (pkmodel/models/compiled.json): current with
the definitions, equal to them field by field and in value, and enough to fit and forecast
without importing sympy."""

from __future__ import annotations

import dataclasses
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

from pkmodel import models
from pkmodel.model import CompiledEquations, eta_of, evaluate_parameters
from pkmodel.models import available, load
from pkmodel.models.infliximab import MODELS

ROOT = Path(__file__).resolve().parents[1]


def test_the_catalogue_was_written_from_the_current_definitions():
    """Its digest is that of pkmodel/models/infliximab.py: after an edit there, run
    ``python -c "from pkmodel.models import write_catalogue; write_catalogue()"``."""
    stored = json.loads((ROOT / "pkmodel" / "models" / "compiled.json").read_text())
    assert stored["definitions"] == models._digest()
    assert sorted(stored["models"]) == sorted(MODELS) == list(available())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_catalogued_model_is_its_definition(name):
    """Every field as defined, the symbols each equation uses, and the compiled equations
    equal to sympy.lambdify of the definitions (1e-14) at 300 random covariate, ETA and
    KAPPA values, with ages on both sides of any threshold."""
    ours, defined = load(name), MODELS[name]
    assert isinstance(ours.parameters, CompiledEquations)
    for f in dataclasses.fields(defined):
        if f.name == "parameters":
            continue
        a, b = getattr(ours, f.name), getattr(defined, f.name)
        if f.name == "omega":
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b, f.name
    assert list(ours.parameters) == list(defined.parameters)
    names = (*defined.theta, *defined.covariate_names, *defined.eta_names, *defined.iov)
    rng = np.random.default_rng(11)
    values = [float(v) for v in defined.theta.values()] + [
        rng.uniform(0.0, 40.0 if n == "AGE" else 3.0, 300) for n in names[len(defined.theta):]]
    compiled = ours._compiled
    for parameter, expr in defined.parameters.items():
        assert ours.parameter_symbols(parameter) == {str(s) for s in expr.free_symbols}
        theirs = sp.lambdify([sp.Symbol(n) for n in names], expr, modules=[np])(*values)
        np.testing.assert_allclose(np.broadcast_to(compiled[parameter](*values), (300,)),
                                   np.broadcast_to(theirs, (300,)), rtol=1e-14,
                                   err_msg=parameter)
    # the stored slopes are sympy's derivatives of the definitions in every ETA and KAPPA
    slopes = ours._compiled_slopes
    for parameter, expr in defined.parameters.items():
        plain = expr.xreplace({s: sp.Symbol(s.name) for s in expr.free_symbols})
        for effect in (*defined.eta_names, *defined.iov):
            theirs = sp.lambdify([sp.Symbol(n) for n in names],
                                 plain.diff(sp.Symbol(effect)), modules=[np])(*values)
            ours_d = (slopes[parameter][effect](*values) if effect in slopes[parameter]
                      else 0.0)
            np.testing.assert_allclose(np.broadcast_to(ours_d, (300,)),
                                       np.broadcast_to(theirs, (300,)), rtol=1e-14,
                                       atol=1e-300, err_msg=f"{parameter} by {effect}")
    assert ours.parameters.slopes is not None  # stored, not derived at run time
    # the expressions, built when asked for, are the definitions'
    assert dict(ours.parameters.items()) == dict(defined.parameters)
    assert ours.equations() == defined.equations()


def test_a_catalogued_model_derives_pickles_and_names_its_etas():
    model = load("xu2012")
    assert eta_of(model, "CL") == "ETA_CL" and eta_of(model, "F1") is None
    with_d1 = model.with_parameters(D1=2 / 24)  # builds the expressions, then sympy
    assert with_d1.parameters["D1"] == sp.Float(2 / 24)
    copy = pickle.loads(pickle.dumps(model))  # as to a Dask worker
    assert isinstance(copy.parameters, CompiledEquations)
    cov = {"WT": np.array([40.0, 90.0]), "ALB": np.array([3.0, 4.5]), "ATI": np.zeros(2)}
    for k, v in evaluate_parameters(copy, cov).items():
        np.testing.assert_array_equal(v, evaluate_parameters(MODELS["xu2012"], cov)[k])


def test_compiled_equations_are_told_apart_by_their_sources():
    """Two models whose compiled equations differ never share a compilation or compare
    equal (the cache key is the arguments and sources, not a name a caller gives)."""
    def one(expr):
        base = load("xu2012")
        return dataclasses.replace(base, parameters={**base.parameters, "CL": expr})
    tvcl = sp.Symbol("TVCL")
    models_ = [one(tvcl), one(3 * tvcl)]
    compiled = [dataclasses.replace(m, parameters=CompiledEquations.of(
        m, lambda m=m: dict(m.parameters))) for m in models_]
    assert compiled[0].parameters != compiled[1].parameters
    assert compiled[0].parameters == dict(models_[0].parameters)
    cov = {"WT": np.array([70.0]), "ALB": np.array([4.0]), "ATI": np.zeros(1)}
    cl = [evaluate_parameters(m, cov)["CL"][0] for m in compiled]
    assert cl == pytest.approx([0.294, 3 * 0.294], rel=1e-15)


def test_a_model_pickles_without_its_built_expressions():
    """A worker the model is sent to imports sympy only if it needs the expressions."""
    model = load("fasanmade2011")
    model.parameters["CL"]  # built here
    state = pickle.loads(pickle.dumps(model)).parameters.__dict__
    assert "expressions" not in state and state["sources"] == model.parameters.sources


def test_write_catalogue_stamps_the_definitions_it_compiled(tmp_path):
    content = models.write_catalogue(tmp_path / "compiled.json")
    assert content["definitions"] == models._digest()
    assert json.loads((tmp_path / "compiled.json").read_text()) == content
    assert sorted(content["models"]) == sorted(MODELS)


def test_a_stale_or_unreadable_catalogue_is_not_used(tmp_path, monkeypatch):
    """A catalogue written from other definitions (or broken) is ignored: the models come
    from the definitions themselves."""
    stored = json.loads((ROOT / "pkmodel" / "models" / "compiled.json").read_text())
    for content in ({**stored, "definitions": "0" * 64}, "not json"):
        path = tmp_path / "compiled.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        monkeypatch.setattr(models, "_CATALOGUE", path)
        monkeypatch.setattr(models, "_LOADED", {})
        models._catalogue.cache_clear()
        try:
            assert load("fasanmade2011") is MODELS["fasanmade2011"]
            assert available() == tuple(sorted(MODELS))
        finally:
            models._catalogue.cache_clear()


def test_a_cold_recommendation_never_imports_sympy():
    """The command a downstream program calls: load, fit, sample, forecast and recommend
    with the compiled equations only (sympy is a third of a cold start)."""
    code = ("import sys, io, contextlib\n"
            "from pkmodel.cli import main\n"
            "sys.argv = ['pkmodel', 'recommend', 'examples/child.csv', '--json']\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    code = main()\n"
            "print(code, 'sympy' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ["0", "False"], out.stdout + out.stderr

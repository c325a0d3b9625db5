"""Published population models: ``load(name)`` and ``available()``.

The models are defined, with their citations, in :mod:`pkmodel.models.infliximab` (sympy
expressions). ``compiled.json`` holds the same models with their equations already written
as numpy source (:class:`~pkmodel.model.CompiledEquations`), so that loading one, fitting
and forecasting never import sympy (a third of a cold command); the expressions are built
from the definitions when first asked for (plots and reports that print equations then
import sympy). The file records a digest of the definitions: when they change, it is
ignored (the definitions are used) until ``write_catalogue()`` rewrites it, and a test
fails meanwhile.

Examples
--------
>>> from pkmodel.models import available, load
>>> available()[:3]
('dubinsky2017', 'fasanmade2009', 'fasanmade2011')
>>> load("fasanmade2011").structure.parameter_names
('CL', 'V1', 'Q', 'V2')
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from pkmodel.engine import Structure
from pkmodel.model import (
    CompiledEquations,
    Covariate,
    DosingLabel,
    PopulationModel,
    ResidualError,
)

__all__ = ["DEFAULT", "available", "load"]

#: The default infliximab model (Fasanmade 2011, children and adults with Crohn's disease).
DEFAULT = "fasanmade2011"

_HERE = Path(__file__).resolve().parent
_DEFINITIONS = _HERE / "infliximab.py"
_CATALOGUE = _HERE / "compiled.json"
_LOADED: dict[str, PopulationModel] = {}
_LOCK = threading.Lock()


def available() -> tuple[str, ...]:
    """Names of the bundled published models, sorted."""
    catalogue = _catalogue()
    return tuple(sorted(catalogue if catalogue is not None else _definitions()))


def load(name: str = DEFAULT) -> PopulationModel:
    """A bundled published model by name.

    Parameters
    ----------
    name : str
        One of :func:`available`; default ``"fasanmade2011"``.

    Raises
    ------
    ValueError
        For an unknown name, listing the known ones.
    """
    if name not in available():
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    with _LOCK:
        if name not in _LOADED:
            catalogue = _catalogue()
            _LOADED[name] = (_from_entry(name, catalogue[name]) if catalogue is not None
                             else _definitions()[name])
        return _LOADED[name]


def write_catalogue(path: Path | None = None) -> dict[str, Any]:
    """Write (and return) the compiled form of every published model: ``compiled.json``
    beside the definitions, or ``path``. For maintainers, after an edit of the
    definitions; they are executed afresh from the file, so that the digest written is
    that of the equations written (not of a module imported before the edit)."""
    source = _DEFINITIONS.read_bytes()
    spec = importlib.util.spec_from_file_location("pkmodel.models._catalogued", _DEFINITIONS)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    if _DEFINITIONS.read_bytes() != source:
        raise RuntimeError(f"{_DEFINITIONS} changed while the catalogue was written")
    text = json.dumps({"generated": "by pkmodel.models.write_catalogue() from "
                                    "pkmodel/models/infliximab.py, where every number sits "
                                    "next to its citation; do not edit",
                       "definitions": _digest_of(source),
                       "models": {name: _entry(model)
                                  for name, model in sorted(module.MODELS.items())}}, indent=1)
    (path or _CATALOGUE).write_text(text + "\n")
    return json.loads(text)


def _definitions() -> dict[str, PopulationModel]:
    """The models as defined (imports sympy)."""
    from pkmodel.models.infliximab import MODELS

    return MODELS


@functools.cache
def _digest() -> str:
    return _digest_of(_DEFINITIONS.read_bytes())


def _digest_of(source: bytes) -> str:
    """sha256 of the definitions' text (line endings as written on any system)."""
    return hashlib.sha256(source.replace(b"\r\n", b"\n")).hexdigest()


@functools.cache
def _catalogue() -> dict[str, Any] | None:
    """The compiled models by name, or None when the file is absent, unreadable or was
    written from other definitions."""
    try:
        content = json.loads(_CATALOGUE.read_text())
        current = content["definitions"] == _digest()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return content["models"] if current else None


def _expressions(name: str) -> dict[str, Any]:
    """The sympy equations of a published model, from its definition."""
    return dict(_definitions()[name].parameters)


def _entry(model: PopulationModel) -> dict[str, Any]:
    """A model as plain JSON, its equations compiled."""
    equations = CompiledEquations.of(model, functools.partial(_expressions, model.name))
    return {
        "structure": dataclasses.asdict(model.structure),
        "theta": dict(model.theta),
        "arguments": list(equations.arguments),
        "sources": equations.sources,
        "symbols": {k: sorted(v) for k, v in equations.symbols.items()},
        "slopes": equations.slopes,
        "omega": np.asarray(model.omega).tolist(),
        "eta_names": list(model.eta_names),
        "residual": dataclasses.asdict(model.residual),
        "covariates": [dataclasses.asdict(c) for c in model.covariates],
        "iov": dict(model.iov),
        "citation": model.citation,
        "description": model.description,
        "label": None if model.label is None else dataclasses.asdict(model.label),
        "time_unit": model.time_unit,
        "dose_unit": model.dose_unit,
        "concentration_unit": model.concentration_unit,
    }


def _tuples(record: dict[str, Any]) -> dict[str, Any]:
    """JSON lists back to the tuples the dataclasses hold."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in record.items()}


def _from_entry(name: str, entry: dict[str, Any]) -> PopulationModel:
    equations = CompiledEquations(entry["arguments"], entry["sources"], entry["symbols"],
                                  functools.partial(_expressions, name), entry.get("slopes"))
    label = entry["label"]
    return PopulationModel(
        name=name,
        structure=Structure(**entry["structure"]),
        theta=dict(entry["theta"]),
        parameters=equations,
        omega=np.array(entry["omega"], dtype=float),
        eta_names=tuple(entry["eta_names"]),
        residual=ResidualError(**entry["residual"]),
        covariates=tuple(Covariate(**_tuples(c)) for c in entry["covariates"]),
        iov=dict(entry["iov"]),
        citation=entry["citation"],
        description=entry["description"],
        label=None if label is None else DosingLabel(**_tuples(label)),
        time_unit=entry["time_unit"],
        dose_unit=entry["dose_unit"],
        concentration_unit=entry["concentration_unit"],
    )

"""Published population models: ``load(name)`` and ``available()``.

Examples
--------
>>> from pkmodel.models import available, load
>>> available()[:3]
('dubinsky2017', 'fasanmade2009', 'fasanmade2011')
>>> load("fasanmade2011").structure.parameter_names
('CL', 'V1', 'Q', 'V2')
"""

from __future__ import annotations

from pkmodel.model import PopulationModel
from pkmodel.models.infliximab import MODELS

__all__ = ["DEFAULT", "available", "load"]

#: The default infliximab model (Fasanmade 2011, children and adults with Crohn's disease).
DEFAULT = "fasanmade2011"


def available() -> tuple[str, ...]:
    """Names of the bundled published models, sorted."""
    return tuple(sorted(MODELS))


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
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    return MODELS[name]

"""pkmodel: population pharmacokinetics and model-informed precision dosing.

Layers, from the bottom: :mod:`pkmodel.errors`, :mod:`pkmodel.data` (NONMEM-style event
tables), :mod:`pkmodel.engine` (exact linear-compartment solutions). Units: day, mg, L,
L/day, mg/L.
"""

from pkmodel.data import read_nonmem, to_events, validate
from pkmodel.errors import (
    ConvergenceError,
    ConvergenceWarning,
    CovariateError,
    DatasetError,
    PKModelError,
)

__version__ = "0.1.0"

__all__ = [
    "ConvergenceError",
    "ConvergenceWarning",
    "CovariateError",
    "DatasetError",
    "PKModelError",
    "read_nonmem",
    "to_events",
    "validate",
]

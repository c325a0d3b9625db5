"""Exception and warning classes of pkmodel.

Every error pkmodel raises derives from :class:`PKModelError`, so a caller can catch
them all at once; each also derives from the builtin it refines (``ValueError`` for bad
values, ``RuntimeError`` for numerical failure), so generic handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "ConvergenceError",
    "ConvergenceWarning",
    "CovariateError",
    "DatasetError",
    "PKModelError",
    "PlausibilityWarning",
]


class PKModelError(Exception):
    """Base class of every error raised by pkmodel."""


class DatasetError(PKModelError, ValueError):
    """An event table breaks NONMEM's conventions or pkmodel's requirements.

    The message names the column, the row (0-based position in the table) and the ID,
    and says what was expected; ``column``, ``row`` and ``id`` hold them where they exist
    (None otherwise), for programs.
    """

    def __init__(self, message: str, *, column: str | None = None, row: int | None = None,
                 id: object = None) -> None:
        super().__init__(message)
        self.column, self.row, self.id = column, row, id


class CovariateError(PKModelError, ValueError):
    """A covariate is missing, or has a value that cannot be right for the model."""


class ConvergenceError(PKModelError, RuntimeError):
    """A numerical method failed and no usable result exists."""


class ConvergenceWarning(UserWarning):
    """A numerical method finished but its result deserves a second look."""


class PlausibilityWarning(UserWarning):
    """A fit needed a measured value or an ETA far from what the model expects."""


class CovariateWarning(UserWarning):
    """A covariate lies outside the range of the population a model was built on."""

"""Population PK models: typical values, covariate equations, variability, residual error.

A :class:`PopulationModel` is immutable. Its parameter equations are sympy expressions in
named symbols (THETAs, covariates, ETAs and IOV KAPPAs), compiled once to numpy functions
(pkmodel writes the numpy source itself; no text a user gives is evaluated). Derive a
variant with :func:`dataclasses.replace`. The published models load their equations
already compiled, as that source (:class:`CompiledEquations`), so loading one, fitting,
forecasting and recommending never import sympy (a third of a cold start).

Example: a one-compartment model with allometric weight on clearance.

>>> import sympy as sp
>>> from pkmodel.engine import DOSE_MODIFIERS, Structure
>>> WT, TVCL, TVV, ETA_CL = sp.symbols("WT TVCL TVV ETA_CL")
>>> model = PopulationModel(
...     name="example",
...     structure=Structure(1),
...     theta={"TVCL": 0.3, "TVV": 4.0},
...     parameters={"CL": TVCL * (WT / 70) ** 0.75 * sp.exp(ETA_CL), "V1": TVV * WT / 70},
...     omega=[[0.09]],
...     eta_names=("ETA_CL",),
...     residual=ResidualError(proportional=0.2),
...     covariates=(Covariate("WT", "kg", "body weight", plausible=(0.5, 300.0)),),
...     citation="Illustration only.",
... )
>>> p = evaluate_parameters(model, {"WT": np.array([35.0, 70.0])})
>>> np.round(p["CL"], 4).tolist()
[0.1784, 0.3]
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pkmodel.engine import DOSE_MODIFIERS, Structure
from pkmodel.errors import CovariateError, CovariateWarning

if TYPE_CHECKING:
    import sympy as sp

__all__ = [
    "CompiledEquations",
    "Covariate",
    "DosingLabel",
    "PopulationModel",
    "ResidualError",
    "check_covariates",
    "covariates_outside_range",
    "disposition",
    "eta_of",
    "evaluate_parameter_slopes",
    "evaluate_parameters",
    "typical_covariates",
]

def _is_dose_modifier(name: str) -> bool:
    """F1, ALAG2, D1, R3, ...: a per-compartment dose modifier."""
    return any(name.startswith(m) and name[len(m):].isdigit() for m in DOSE_MODIFIERS)


#: Compiled parameter equations, shared by models with the same equations.
_COMPILED: dict[tuple, dict[str, Any]] = {}

#: Time units a model may state, in days.
TIME_UNITS = {"day": 1.0, "h": 1.0 / 24.0}


@dataclass(frozen=True)
class Covariate:
    """A covariate a model needs, with its unit and the values it accepts.

    Parameters
    ----------
    name : str
        Column name in the data (uppercase), also the sympy symbol's name.
    unit : str
        Unit the model expects (``"kg"``, ``"g/dL"``, ``"g/L"``, ``"0/1"``).
    description : str
        What it is.
    plausible : (float, float)
        Values outside this interval cannot be right in this unit (a wrong unit, a typing
        slip) and raise :class:`~pkmodel.errors.CovariateError`.
    observed : (float, float), optional
        Range of the population the model was built on; values outside warn
        (:class:`~pkmodel.errors.CovariateWarning`). None where the source does not say.
    reference : float, optional
        Reference (typical) value used by :func:`typical_covariates`.
    hint : str
        Added to the error message when a value is implausible (for example the likely
        unit mistake).
    """

    name: str
    unit: str
    description: str
    plausible: tuple[float, float]
    observed: tuple[float, float] | None = None
    reference: float | None = None
    hint: str = ""

    @property
    def binary(self) -> bool:
        """Whether this is a 0/1 indicator."""
        return self.unit == "0/1"


@dataclass(frozen=True)
class ResidualError:
    """Residual error model; standard deviations, not variances.

    ``Y = F * (1 + EPS_prop) + EPS_add`` gives ``SD(Y) = sqrt(additive^2 + (proportional
    F)^2)`` (proportional, additive or combined); with ``combine="sd"`` the combined SD is
    ``additive + proportional * F`` (Monolix's and nlmixr2's "combined1"); with
    ``log_scale`` the model is log-additive, ``ln Y = ln F + EPS`` with SD ``additive`` on
    the log scale.

    Examples
    --------
    >>> ResidualError(proportional=0.292, additive=0.371).sd(np.array([0.0, 10.0])).round(4)
    array([0.371 , 2.9435])
    >>> ResidualError(proportional=0.1, additive=0.5, combine="sd").sd(np.array([10.0]))
    array([1.5])
    >>> ResidualError(additive=0.22, log_scale=True).kind
    'log-additive'
    """

    proportional: float = 0.0
    additive: float = 0.0
    log_scale: bool = False
    combine: str = "variance"

    def __post_init__(self) -> None:
        if self.combine not in ("variance", "sd"):
            raise ValueError("`combine` must be 'variance' (SD^2 = a^2 + (b F)^2, NONMEM's "
                             "usual) or 'sd' (SD = a + b F, Monolix/nlmixr2 combined1); got "
                             f"{self.combine!r}")
        if self.proportional < 0 or self.additive < 0:
            raise ValueError("residual standard deviations must be >= 0; got "
                             f"proportional={self.proportional}, additive={self.additive}")
        if self.log_scale and self.proportional:
            raise ValueError("a log-additive error has only `additive` (SD on the log scale)")
        if self.proportional == 0 and self.additive == 0:
            raise ValueError("a residual error needs a positive `proportional` or `additive` SD")

    @property
    def kind(self) -> str:
        """``"additive"``, ``"proportional"``, ``"combined"`` or ``"log-additive"``."""
        if self.log_scale:
            return "log-additive"
        if self.proportional and self.additive:
            return "combined"
        return "proportional" if self.proportional else "additive"

    def sd(self, prediction: np.ndarray) -> np.ndarray:
        """Residual SD at the prediction (mg/L; on the log scale for log-additive)."""
        f = np.asarray(prediction, dtype=float)
        if self.log_scale:
            return np.full(f.shape, self.additive)
        if self.combine == "sd":
            return self.additive + self.proportional * np.abs(f)
        return np.sqrt(self.additive**2 + (self.proportional * f) ** 2)

    def sd_slope(self, prediction: np.ndarray) -> np.ndarray:
        """Derivative of :meth:`sd` in the prediction (per mg/L; 0 for a log-additive error,
        whose SD is constant; nan where a proportional SD alone meets a zero prediction).

        Examples
        --------
        ``SD = sqrt(0.5^2 + (0.1 F)^2)`` at ``F = 10``: ``0.1^2 F / SD = 0.1 / sqrt(1.25)``.

        >>> ResidualError(proportional=0.1, additive=0.5).sd_slope(np.array([10.0])).round(6)
        array([0.089443])
        """
        f = np.asarray(prediction, dtype=float)
        if self.log_scale:
            return np.zeros(f.shape)
        if self.combine == "sd":
            return self.proportional * np.sign(f)
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.proportional**2 * f / self.sd(f)


@dataclass(frozen=True)
class DosingLabel:
    """How a drug is given according to its label: what dosing questions start from.

    A model of a drug carries its label so that dosing verbs take their defaults (vial
    size, infusion length, the induction schedule, the limits flagged) from the model,
    never from constants of one drug.

    Parameters
    ----------
    drug : str
        Drug name.
    dose_mg_per_kg : float
        Label maintenance dose (mg/kg); lower doses are flagged as below the label.
    max_mg_per_kg : float
        Highest labelled dose (mg/kg); higher doses are flagged as above the label.
    min_interval_weeks : float
        Shortest labelled interval (weeks); shorter ones are flagged as above the label.
    maintenance_interval_weeks : float
        Planned maintenance interval (weeks) after induction.
    induction_weeks : tuple of float
        Induction dose times (weeks after the first dose); empty for none.
    vial_mg : float or None
        Vial size (mg); doses are rounded to whole vials.
    infusion_hours : float or None
        Infusion length (h) of a labelled dose; None for a bolus or an oral dose.
    source : str
        Where the numbers come from.
    """

    drug: str
    dose_mg_per_kg: float
    max_mg_per_kg: float
    min_interval_weeks: float
    maintenance_interval_weeks: float
    induction_weeks: tuple[float, ...] = ()
    vial_mg: float | None = None
    infusion_hours: float | None = None
    source: str = ""


class CompiledEquations(Mapping[str, "sp.Expr"]):
    """Parameter equations as compiled numpy source, their sympy expressions built only
    when one is asked for (printing, symbolic derivatives, a variant of the model).

    The published models are stored so (:mod:`pkmodel.models`): fitting and forecasting
    evaluate the sources and never import sympy. Two are the same equations when their
    arguments and sources are (a cache key); otherwise equality compares the expressions.

    Parameters
    ----------
    arguments : tuple of str
        The names ``a[0], a[1], ...`` of the sources stand for: THETAs, covariates, ETAs
        and KAPPAs, in the model's order.
    sources : mapping of str to str
        Per parameter, a numpy expression of ``a``: arithmetic, comparisons, the
        functions exp, log, sqrt and where, and nan (as :meth:`of` writes them).
    symbols : mapping of str to tuple of str
        Per parameter, the names of the symbols its equation uses.
    build : callable
        Returns the sympy expressions, by parameter name (called once, when first needed;
        a module-level function or a partial of one, so that the equations pickle).
    slopes : mapping of str to mapping of str to str, optional
        Per parameter, the source of its derivative with respect to each ETA and KAPPA
        its equation uses (what exact gradients of a fit need); derived from the
        expressions when omitted.
    """

    def __init__(self, arguments: Sequence[str], sources: Mapping[str, str],
                 symbols: Mapping[str, Sequence[str]],
                 build: Callable[[], Mapping[str, Any]],
                 slopes: Mapping[str, Mapping[str, str]] | None = None) -> None:
        self.arguments = tuple(arguments)
        self.sources = dict(sources)
        self.symbols = {k: frozenset(v) for k, v in symbols.items()}
        self.slopes = None if slopes is None else {k: dict(v) for k, v in slopes.items()}
        self.key = ("compiled", self.arguments, tuple(self.sources.items()))
        self._build = build

    def __getstate__(self) -> dict[str, Any]:
        # Without the expressions if built: a process the model is sent to (Dask) then
        # imports sympy only if it needs them too.
        state = dict(self.__dict__)
        state.pop("expressions", None)
        return state

    @classmethod
    def of(cls, model: PopulationModel,
           build: Callable[[], Mapping[str, Any]]) -> CompiledEquations:
        """The compiled form of ``model``'s (sympy) equations, over its THETAs,
        covariates, ETAs and KAPPAs; ``build`` must return the same expressions.

        Raises
        ------
        ValueError
            For an equation that cannot be written out: anything but arithmetic, exp,
            log, sqrt, comparisons and Piecewise (``And``, ``Min``, ``Abs``, ...).
        """
        import sympy as sp

        arguments = (*model.theta, *model.covariate_names, *model.eta_names, *model.iov)
        index = {name: i for i, name in enumerate(arguments)}
        sources, slopes = {}, {}
        for name, expr in model.parameters.items():
            expr = sp.sympify(expr)
            source = _numpy_source(expr, index)
            derivatives = _slope_sources(expr, (*model.eta_names, *model.iov), index)
            if source is None or derivatives is None:
                raise ValueError(f"{model.name}: the equation of {name} or its derivative "
                                 "uses a function that cannot be written out (arithmetic, "
                                 "exp, log, sqrt, comparisons and Piecewise can)")
            sources[name], slopes[name] = source, derivatives
        return cls(arguments, sources,
                   {name: sorted(model.parameter_symbols(name)) for name in sources}, build,
                   slopes)

    @cached_property
    def expressions(self) -> dict[str, sp.Expr]:
        """The sympy expressions (built on first use)."""
        built = dict(self._build())
        if list(built) != list(self.sources):
            raise ValueError(f"the equations built ({list(built)}) are not those compiled "
                             f"({list(self.sources)})")
        return built

    def __getitem__(self, name: str) -> sp.Expr:
        if name not in self.sources:
            raise KeyError(name)
        return self.expressions[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.sources)

    def __len__(self) -> int:
        return len(self.sources)

    def __contains__(self, name: object) -> bool:
        return name in self.sources

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CompiledEquations) and self.key == other.key:
            return True
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"CompiledEquations({', '.join(self.sources)})"


@dataclass(frozen=True)
class PopulationModel:
    """A population PK model: structure, equations, variability and residual error.

    Parameters
    ----------
    name : str
        Short identifier (``"fasanmade2011"``).
    structure : Structure
        Compartments; ``parameters`` must define ``structure.parameter_names``.
    theta : mapping of str to float
        Fixed effects by symbol name.
    parameters : mapping of str to sympy expression
        Individual PK parameters (CL, V1, Q, V2, ... in L/day and L; optional dose
        modifiers F1, ALAG1, D1, ...) in terms of THETA, covariate, ETA and KAPPA symbols.
    omega : array_like
        IIV covariance of ``eta_names`` (variances on the diagonal; full block allowed).
    eta_names : tuple of str
        ETA symbol names, in the order of ``omega``.
    residual : ResidualError
        Residual error model.
    covariates : tuple of Covariate
        Covariates the equations use.
    iov : mapping of str to float
        Inter-occasion variances by KAPPA symbol name (one KAPPA per occasion).
    citation : str
        Where the model and its numbers come from.
    description : str
        Population and purpose.
    label : DosingLabel, optional
        The drug's labelled dosing (defaults and limits for dosing questions).
    time_unit : str
        Unit of TIME, II, DUR and of the rate constants (``"day"`` or ``"h"``).
    dose_unit : str
        Unit of AMT (``"mg"``).
    concentration_unit : str
        Unit of DV and of the predictions (``"mg/L"``).
    """

    name: str
    structure: Structure
    theta: Mapping[str, float]
    parameters: Mapping[str, sp.Expr]
    omega: Any
    eta_names: tuple[str, ...]
    residual: ResidualError
    covariates: tuple[Covariate, ...] = ()
    iov: Mapping[str, float] = field(default_factory=dict)
    citation: str = ""
    description: str = ""
    label: DosingLabel | None = None
    time_unit: str = "day"
    dose_unit: str = "mg"
    concentration_unit: str = "mg/L"

    def __post_init__(self) -> None:
        if self.time_unit not in TIME_UNITS:
            raise ValueError(f"`time_unit` must be one of {sorted(TIME_UNITS)}; got "
                             f"{self.time_unit!r}")
        omega = np.atleast_2d(np.asarray(self.omega, dtype=float))
        object.__setattr__(self, "omega", omega)
        object.__setattr__(self, "eta_names", tuple(self.eta_names))
        object.__setattr__(self, "covariates", tuple(self.covariates))
        n = len(self.eta_names)
        if omega.shape != (n, n):
            raise ValueError(f"`omega` must be {n} x {n} for eta_names {self.eta_names}; "
                             f"got shape {omega.shape}")
        if not np.allclose(omega, omega.T):
            raise ValueError("`omega` must be symmetric")
        if n and np.linalg.eigvalsh(omega).min() < 0:
            raise ValueError("`omega` must be positive semi-definite")
        missing = [p for p in self.structure.parameter_names if p not in self.parameters]
        if missing:
            raise ValueError(f"`parameters` lacks {missing}, needed by {self.structure}")
        known = (set(self.theta) | {c.name for c in self.covariates} | set(self.eta_names)
                 | set(self.iov))
        symbols = _symbols(self.parameters)
        object.__setattr__(self, "_symbols", symbols)
        for pname, used in symbols.items():
            unknown = sorted(used - known)
            if unknown:
                raise ValueError(f"parameter {pname} uses {unknown}, which are not THETA, "
                                 "covariate, ETA or KAPPA names of this model")

    def __getstate__(self) -> dict[str, Any]:
        # The compiled equations are rebuilt where the model is unpickled (process pools,
        # Dask workers); numpy functions made by lambdify do not pickle.
        state = dict(self.__dict__)
        state.pop("_compiled", None)
        state.pop("_compiled_slopes", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def parameter_symbols(self, name: str) -> frozenset[str]:
        """Names of the THETAs, covariates, ETAs and KAPPAs parameter ``name`` uses.

        Examples
        --------
        >>> from pkmodel.models import load
        >>> sorted(load("xu2012").parameter_symbols("V1"))
        ['ETA_V1', 'TVV1', 'V1_WT', 'WT']
        """
        return self._symbols[name]  # type: ignore[attr-defined]

    @cached_property
    def equations_key(self) -> tuple:
        """Identifies the equations (equal keys, equal equations), for caches."""
        if isinstance(self.parameters, CompiledEquations):
            return self.parameters.key
        return tuple(self.parameters.items())

    @property
    def covariate_names(self) -> tuple[str, ...]:
        """Names of the covariates the equations use (data columns)."""
        return tuple(c.name for c in self.covariates)

    @property
    def kappa_names(self) -> tuple[str, ...]:
        """IOV symbol names."""
        return tuple(self.iov)

    def without_iov(self) -> PopulationModel:
        """The same model with its IOV removed (KAPPAs fixed at 0), as for forecasting or
        for a fit that should not split the patient into occasions.

        Examples
        --------
        >>> from pkmodel.models import load
        >>> load("fasanmade2011").without_iov().iov
        {}
        """
        import sympy as sp

        zero = {sp.Symbol(k): 0 for k in self.iov}
        return replace(self, name=f"{self.name}_without_iov", iov={},
                       parameters={k: v.subs(zero) for k, v in self.parameters.items()})

    def with_parameters(self, **values: float | sp.Expr) -> PopulationModel:
        """The model with parameters set or replaced, for example the modelled infusion
        length ``D1`` of doses with ``RATE=-2``, a bioavailability ``F1`` or a lag
        ``ALAG1`` (in the model's time unit), without rebuilding it.

        Examples
        --------
        >>> from pkmodel.models import load
        >>> load("xu2012").with_parameters(D1=2 / 24).parameters["D1"]
        0.0833333333333333
        """
        import sympy as sp

        known = set(self.structure.parameter_names)
        for name in values:
            if name not in known and not _is_dose_modifier(name):
                raise ValueError(f"{name!r} is neither a parameter of {self.structure} nor a "
                                 "dose modifier (F1, ALAG1, D1, R1, ...)")
        new = {k: v if isinstance(v, sp.Expr) else sp.Float(v) for k, v in values.items()}
        return replace(self, parameters={**self.parameters, **new})

    def with_values(self, theta: Mapping[str, float] | None = None, omega: Any = None,
                    residual: ResidualError | None = None) -> PopulationModel:
        """The model with other THETA values, OMEGA or residual error, the equations kept
        (not re-checked, nor recompiled): the steps of a population fit.

        Examples
        --------
        >>> from pkmodel.models import load
        >>> model = load("xu2012")
        >>> model.with_values({"TVCL": 0.3}).theta["TVCL"]
        0.3
        """
        new = copy.copy(self)
        if theta is not None:
            unknown = sorted(set(theta) - set(self.theta))
            if unknown:
                raise ValueError(f"{unknown} are not THETAs of {self.name}")
            object.__setattr__(new, "theta", {**self.theta,
                                              **{k: float(v) for k, v in theta.items()}})
        if omega is not None:
            omega = np.atleast_2d(np.asarray(omega, dtype=float))
            if omega.shape != self.omega.shape or not np.allclose(omega, omega.T):
                raise ValueError(f"`omega` must be a symmetric {self.omega.shape} matrix")
            object.__setattr__(new, "omega", omega)
        if residual is not None:
            object.__setattr__(new, "residual", residual)
        return new

    def with_aliases(self, aliases: Mapping[str, str]) -> PopulationModel:
        """The model reading each covariate from another data column: ``{"ADA": "ATI"}``
        reads the covariate ATI from column ADA (messages then name ADA).

        Examples
        --------
        >>> from pkmodel.models import load
        >>> load("xu2012").with_aliases({"ADA": "ATI"}).covariate_names
        ('WT', 'ALB', 'ADA')
        """
        names = {c.name for c in self.covariates}
        rename = {}
        for column, covariate in aliases.items():
            if covariate not in names:
                raise ValueError(f"{covariate!r} is not a covariate of {self.name} "
                                 f"({sorted(names)})")
            rename[covariate] = str(column).upper()
        import sympy as sp

        symbols = {sp.Symbol(k): sp.Symbol(v) for k, v in rename.items()}
        return replace(
            self, covariates=tuple(replace(c, name=rename.get(c.name, c.name))
                                   for c in self.covariates),
            parameters={k: v.subs(symbols) for k, v in self.parameters.items()})

    @property
    def days_per_time_unit(self) -> float:
        """Days in one unit of the model's time (1 for days, 1/24 for hours)."""
        return TIME_UNITS[self.time_unit]

    @cached_property
    def _compiled(self) -> dict[str, Any]:
        # THETA values are arguments, so models differing only in them (the steps of a
        # population fit) share one compilation.
        names = (*self.theta, *self.covariate_names, *self.eta_names, *self.iov)
        key = (names, self.equations_key)
        if key not in _COMPILED:
            if len(_COMPILED) > 256:
                _COMPILED.clear()
            equations = self.parameters
            if isinstance(equations, CompiledEquations) and equations.arguments == names:
                _COMPILED[key] = {name: _from_source(source)
                                  for name, source in equations.sources.items()}
            else:
                import sympy as sp

                args = [sp.Symbol(n) for n in names]
                _COMPILED[key] = {name: _compile(args, expr)
                                  for name, expr in equations.items()}
        return _COMPILED[key]

    @cached_property
    def _compiled_slopes(self) -> dict[str, dict[str, Any]]:
        # Per parameter, numpy functions of its derivatives by the ETAs and KAPPAs its
        # equation uses: stored with the published models, else derived by sympy.
        names = (*self.theta, *self.covariate_names, *self.eta_names, *self.iov)
        key = ("slopes", names, self.equations_key)
        if key not in _COMPILED:
            if len(_COMPILED) > 256:
                _COMPILED.clear()
            equations = self.parameters
            if (isinstance(equations, CompiledEquations) and equations.arguments == names
                    and equations.slopes is not None):
                sources = equations.slopes
                _COMPILED[key] = {p: {k: _from_source(v) for k, v in d.items()}
                                  for p, d in sources.items()}
            else:
                import sympy as sp

                args = [sp.Symbol(n) for n in names]
                effects = (*self.eta_names, *self.iov)
                _COMPILED[key] = {p: {k: _compile(args, d) for k, d in
                                      _slope_expressions(sp.sympify(e), effects).items()}
                                  for p, e in equations.items()}
        return _COMPILED[key]

    def equations(self, format: str = "text") -> str:
        """The parameter equations and THETA values, as text or LaTeX.

        Equations keep the THETA names (as NONMEM's $PK keeps THETA(n)), so their
        structure stays readable; the values follow.

        Examples
        --------
        >>> from pkmodel.models import load
        >>> print(load("xu2012").equations().splitlines()[0])
        CL = TVCL*(ATI*CL_ATI + 1)*exp(ETA_CL)*(WT/70)**CL_WT*(ALB/4)**CL_ALB
        """
        if format not in ("text", "latex"):
            raise ValueError(f"`format` must be 'text' or 'latex'; got {format!r}")
        import sympy as sp

        lines = []
        for name, expr in self.parameters.items():
            if format == "latex":
                lines.append(f"\\mathrm{{{name}}} = {sp.latex(expr)}")
            else:
                lines.append(f"{name} = {sp.sstr(expr)}")
        values = ", ".join(f"{k} = {v:g}" for k, v in self.theta.items())
        lines.append(f"\\text{{where }} {values}" if format == "latex" else f"where {values}")
        return "\n".join(lines)


#: Functions of the equations written out by _numpy_source.
_FUNCTIONS = {"exp": np.exp, "log": np.log, "sqrt": np.sqrt}


def _compile(args: list[sp.Symbol], expr: sp.Expr) -> Any:
    """A numpy function of ``args`` computing ``expr``: written out directly for the
    arithmetic, exp, log, sqrt, comparisons and Piecewise that model equations use
    (sympy's code printer took 14 ms for the four equations of an infliximab model, a
    third of a first fit), else by ``sympy.lambdify``."""
    source = _numpy_source(expr, {a.name: i for i, a in enumerate(args)})
    if source is None:
        import sympy as sp

        # numpy as a module object, not the name "numpy": sympy then takes its namespace
        # as it is instead of star-importing it (which loads numpy.f2py and numpy.testing)
        return sp.lambdify(args, expr, modules=[np])
    return _from_source(source)


def _from_source(source: str) -> Any:
    """The numpy function ``lambda *a: source`` (see :func:`_numpy_source`)."""
    return eval(compile(f"lambda *a: {source}", "<pkmodel equation>", "eval"),
                {"__builtins__": {}, **_FUNCTIONS, "where": np.where, "nan": np.nan})


def _symbols(parameters: Mapping[str, Any]) -> dict[str, frozenset[str]]:
    """Per parameter, the names of the symbols its equation uses (sympy expressions are
    required, except for equations already compiled)."""
    if isinstance(parameters, CompiledEquations):
        return dict(parameters.symbols)
    import sympy as sp

    out = {}
    for pname, expr in parameters.items():
        if not isinstance(expr, sp.Expr):
            raise TypeError(f"parameter {pname} must be a sympy expression; got "
                            f"{type(expr).__name__}")
        out[pname] = frozenset(str(s) for s in expr.free_symbols)
    return out


def _slope_expressions(expr: sp.Expr, effects: Sequence[str]) -> dict[str, sp.Expr]:
    """``d expr / d name`` for each ETA or KAPPA ``name`` of ``effects`` that ``expr`` uses
    (symbols matched by name, whatever their assumptions), over plain symbols."""
    plain = expr.xreplace({s: type(s)(s.name) for s in expr.free_symbols})
    used = {s.name: s for s in plain.free_symbols}
    return {name: plain.diff(used[name]) for name in effects if name in used}


def _slope_sources(expr: sp.Expr, effects: Sequence[str], index: Mapping[str, int]
                   ) -> dict[str, str] | None:
    """Sources of :func:`_slope_expressions` (None if one cannot be written out)."""
    out = {}
    for name, slope in _slope_expressions(expr, effects).items():
        source = _numpy_source(slope, index)
        if source is None:
            return None
        out[name] = source
    return out


def _numpy_source(expr: sp.Expr, index: Mapping[str, int]) -> str | None:
    """Python source of ``expr`` over ``a[i]`` (the i-th argument), or None where it holds
    anything but symbols of ``index``, numbers, +, *, **, exp, log, sqrt, comparisons and
    Piecewise (numpy's where; nan where no condition holds, as lambdify)."""
    import sympy as sp

    if isinstance(expr, sp.UnevaluatedExpr):
        return _numpy_source(expr.args[0], index)
    if expr.is_Symbol:
        return f"a[{index[expr.name]}]" if expr.name in index else None
    if expr.is_Integer:
        return f"({int(expr)})"
    if expr.is_Rational:
        return f"({expr.p}/{expr.q})"
    if expr.is_Float:
        return f"({float(expr)!r})"
    if expr is sp.true:
        return "True"
    if isinstance(expr, sp.Piecewise):  # the first condition that holds picks the value
        out = "nan"
        for value, condition in reversed(expr.args):
            pair = (_numpy_source(value, index), _numpy_source(condition, index))
            if None in pair:
                return None
            out = f"where({pair[1]}, {pair[0]}, {out})"
        return out
    if expr.is_Relational and expr.rel_op in ("<", "<=", ">", ">=", "==", "!="):
        sides = [_numpy_source(arg, index) for arg in expr.args]
        return None if None in sides else f"({sides[0]} {expr.rel_op} {sides[1]})"
    parts = [_numpy_source(arg, index) for arg in expr.args]
    if not expr.args or any(p is None for p in parts):
        return None
    if expr.is_Add:
        return "(" + " + ".join(parts) + ")"
    if expr.is_Mul:
        return "(" + "*".join(parts) + ")"
    if expr.is_Pow:  # a square root as numpy's (nan below 0), as lambdify writes it
        return (f"sqrt({parts[0]})" if expr.exp == sp.Rational(1, 2)
                else f"({parts[0]}**{parts[1]})")
    for name in _FUNCTIONS:
        if expr.func == getattr(sp, name):
            return f"{name}({parts[0]})"
    return None


def _arguments(model: PopulationModel, covariates: Mapping[str, np.ndarray],
               eta: np.ndarray | None, kappa: np.ndarray | None) -> list[Any]:
    """The compiled equations' arguments: THETAs, covariates, ETAs, KAPPAs (checked)."""
    args: list[Any] = [float(v) for v in model.theta.values()]
    for name in model.covariate_names:
        if name not in covariates:
            raise CovariateError(f"covariate '{name}' is missing: {model.name} needs it")
        args.append(np.asarray(covariates[name], dtype=float))
    for names, values in ((model.eta_names, eta), (model.kappa_names, kappa)):
        if values is None:
            args.extend([0.0] * len(names))
            continue
        values = np.asarray(values, dtype=float)
        if values.shape[-1:] != (len(names),):
            raise ValueError(f"last axis must hold {len(names)} values ({names}); got shape "
                             f"{values.shape}")
        args.extend(values[..., i] for i in range(len(names)))
    return args


def evaluate_parameters(
    model: PopulationModel,
    covariates: Mapping[str, np.ndarray],
    eta: np.ndarray | None = None,
    kappa: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Individual parameters from covariates, ETAs and KAPPAs, broadcast elementwise.

    Parameters
    ----------
    model : PopulationModel
    covariates : mapping of str to array_like
        One entry per covariate of the model.
    eta : array_like, optional
        ETAs, last axis in ``model.eta_names`` order; zero (typical) when omitted.
    kappa : array_like, optional
        IOV KAPPAs, last axis in ``model.kappa_names`` order; zero when omitted.

    Returns
    -------
    dict of str to ndarray
        Every parameter of ``model.parameters`` (L/day, L, 1/day; modifiers as defined).
    """
    args = _arguments(model, covariates, eta, kappa)
    shape = np.broadcast_shapes(*(np.shape(a) for a in args))
    out = {}
    for name, f in model._compiled.items():
        value = np.asarray(f(*args), dtype=float)
        out[name] = (value.copy() if value.shape == shape
                     else np.broadcast_to(value, shape).copy())
    return out


def evaluate_parameter_slopes(
    model: PopulationModel,
    covariates: Mapping[str, np.ndarray],
    eta: np.ndarray | None = None,
    kappa: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Exact derivatives of the individual parameters with respect to the ETAs and KAPPAs.

    Parameters
    ----------
    model, covariates, eta, kappa
        As for :func:`evaluate_parameters`.

    Returns
    -------
    dict of str to ndarray
        Per parameter, ``d parameter / d (ETAs, KAPPAs)`` with the broadcast shape of the
        arguments plus a last axis of ``len(model.eta_names) + len(model.kappa_names)``,
        ETAs then KAPPAs in the model's order (L/day, L, ... per unit of ETA).

    Examples
    --------
    ``CL = TVCL (WT/70)^0.75 exp(ETA_CL) exp(KAPPA_CL)``: its derivative by ETA_CL and by
    KAPPA_CL is CL itself; V1 does not depend on them.

    >>> from pkmodel.models import load
    >>> model = load("fasanmade2011")
    >>> cov = {"WT": 30.0, "ALB": 4.0, "ATI": 0.0, "IMM": 0.0}
    >>> slopes = evaluate_parameter_slopes(model, cov, np.array([0.1, 0.0, 0.0]),
    ...                                    np.array([0.05]))
    >>> cl = evaluate_parameters(model, cov, np.array([0.1, 0.0, 0.0]), np.array([0.05]))["CL"]
    >>> bool(np.isclose(slopes["CL"][0], cl)), bool(np.isclose(slopes["CL"][3], cl))
    (True, True)
    >>> slopes["V1"][[0, 2, 3]].tolist()
    [0.0, 0.0, 0.0]
    """
    args = _arguments(model, covariates, eta, kappa)
    shape = np.broadcast_shapes(*(np.shape(a) for a in args))
    effects = (*model.eta_names, *model.kappa_names)
    out = {}
    for name, functions in model._compiled_slopes.items():
        d = np.zeros(shape + (len(effects),))
        for j, effect in enumerate(effects):
            if effect in functions:
                d[..., j] = functions[effect](*args)
        out[name] = d
    return out


def eta_of(model: PopulationModel, parameter: str) -> str | None:
    """The ETA a parameter's equation uses, when it uses exactly one (else None).

    Examples
    --------
    >>> from pkmodel.models import load
    >>> eta_of(load("xu2012"), "CL")
    'ETA_CL'
    """
    if parameter not in model.parameters:
        return None
    symbols = model.parameter_symbols(parameter)
    used = [n for n in model.eta_names if n in symbols]
    return used[0] if len(used) == 1 else None


def disposition(model: PopulationModel, parameters: Mapping[str, float]) -> dict[str, float]:
    """Terminal half-life (model's time unit) and volume at steady state (L) from one set
    of individual parameters: the slowest of the disposition rate matrix's eigenvalues and,
    with a depot, KA (flip-flop kinetics); and the sum of the volumes.

    Examples
    --------
    >>> import sympy as sp
    >>> from pkmodel.engine import Structure
    >>> m = PopulationModel("one", Structure(1), {}, {"CL": sp.Float(2), "V1": sp.Float(10)},
    ...                     np.zeros((0, 0)), (), ResidualError(proportional=0.1))
    >>> {k: round(v, 4) for k, v in disposition(m, {"CL": 2.0, "V1": 10.0}).items()}
    {'HALF_LIFE': 3.4657, 'VSS': 10.0}
    """
    n = model.structure.n_compartments
    clear = [float(parameters["CL"])] + [float(parameters[q]) for q in ("Q", "Q3")[:n - 1]]
    volumes = [float(parameters["V1"])] + [float(parameters[v]) for v in ("V2", "V3")[:n - 1]]
    rates = np.zeros((n, n))
    rates[0, 0] = -sum(clear) / volumes[0]
    for j in range(1, n):
        rates[0, j] = clear[j] / volumes[j]
        rates[j, 0] = clear[j] / volumes[0]
        rates[j, j] = -clear[j] / volumes[j]
    slowest = float(-np.max(np.linalg.eigvals(rates).real))
    if model.structure.depot and "KA" in parameters:  # flip-flop: absorption is slowest
        slowest = min(slowest, float(parameters["KA"]))
    return {"HALF_LIFE": float(np.log(2.0) / slowest), "VSS": float(sum(volumes))}


def typical_covariates(model: PopulationModel) -> dict[str, float]:
    """The reference value of every covariate (the model's typical subject)."""
    missing = [c.name for c in model.covariates if c.reference is None]
    if missing:
        raise CovariateError(f"{model.name} states no reference value for {missing}")
    return {c.name: float(c.reference) for c in model.covariates}  # type: ignore[arg-type]


def check_covariates(model: PopulationModel, table: pd.DataFrame, *,
                     names: Sequence[str] | None = None) -> None:
    """Raise on covariate values that cannot be right; warn outside the model's range.

    Errors name the column, the first offending row (0-based position) and its ID.

    Parameters
    ----------
    model : PopulationModel
    table : DataFrame
        Records (or one row per patient) with the covariate columns.
    names : sequence of str, optional
        Check only these covariates (default: all the model's).

    Examples
    --------
    >>> from pkmodel.models import load
    >>> table = pd.DataFrame({"ID": [7], "WT": [30.0], "ALB": [35.0], "ATI": [0], "IMM": [1]})
    >>> check_covariates(load("fasanmade2011"), table)
    Traceback (most recent call last):
    ...
    pkmodel.errors.CovariateError: column 'ALB', row 0 (ID 7): expected serum albumin in g/dL between 1 and 6.5 for fasanmade2011; got 35. This model expects g/dL (healthy 3.5-5.0); a value near 35 is probably g/L: divide by 10.
    """
    ids = table["ID"].to_numpy() if "ID" in table.columns else np.zeros(len(table))
    wanted = model.covariate_names if names is None else tuple(names)
    for cov in model.covariates:
        if cov.name not in wanted:
            continue
        if cov.name not in table.columns:
            raise CovariateError(f"column '{cov.name}' is missing: {model.name} needs "
                                 f"{cov.description} ({cov.unit})")
        values = pd.to_numeric(table[cov.name], errors="coerce").to_numpy(dtype=float)
        lo, hi = cov.plausible
        bad = ~np.isfinite(values) | (values < lo) | (values > hi)
        if cov.binary:
            bad |= ~np.isin(values, [0.0, 1.0])
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            expected = "0 or 1" if cov.binary else f"{cov.unit} between {lo:g} and {hi:g}"
            hint = f" {cov.hint}" if cov.hint else ""
            raise CovariateError(
                f"column '{cov.name}', row {row} (ID {_plain(ids[row])}): expected "
                f"{cov.description} in {expected} for {model.name}; got "
                f"{_plain(values[row])}.{hint}"
            )
    for message in covariates_outside_range(model, table, names=wanted):
        warnings.warn(message, CovariateWarning, stacklevel=3)


def covariates_outside_range(model: PopulationModel, table: pd.DataFrame, *,
                             names: Sequence[str] | None = None) -> list[str]:
    """Sentences naming covariates outside the range of the population a model was built on.

    One sentence per covariate (its first such row); covariates whose range the source
    does not give are not checked. Predictions there are extrapolations.

    Examples
    --------
    >>> from pkmodel.models import load
    >>> table = pd.DataFrame({"ID": [1], "WT": [20.0], "ALB": [4.0], "ATI": [0], "IMM": [1]})
    >>> print(covariates_outside_range(load("xu2012"), table)[0])
    column 'WT', row 0 (ID 1): 20 kg is outside 35-110, the range xu2012 was built on; predictions there are extrapolations
    """
    ids = table["ID"].to_numpy() if "ID" in table.columns else np.zeros(len(table))
    wanted = model.covariate_names if names is None else tuple(names)
    out = []
    for cov in model.covariates:
        if cov.name not in wanted or cov.observed is None or cov.name not in table.columns:
            continue
        values = pd.to_numeric(table[cov.name], errors="coerce").to_numpy(dtype=float)
        olo, ohi = cov.observed
        outside = (values < olo) | (values > ohi)
        if outside.any():
            row = int(np.flatnonzero(outside)[0])
            out.append(f"column '{cov.name}', row {row} (ID {_plain(ids[row])}): "
                       f"{_plain(values[row])} {cov.unit} is outside {olo:g}-{ohi:g}, the range "
                       f"{model.name} was built on; predictions there are extrapolations")
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def as_omega(variances: Sequence[float]) -> np.ndarray:
    """A diagonal OMEGA from variances."""
    return np.diag(np.asarray(variances, dtype=float))

"""Exact solutions of linear compartment models over NONMEM-style event records.

The engine knows nothing of pandas or population models: arrays in, arrays out. It
propagates the amounts in every compartment from record to record with the closed-form
transition of each interval, inside which parameters and infusion rates are constant.

Mathematics
-----------
The disposition part (central compartment plus up to two peripherals) of a mammillary
model has the rate matrix ``K``; with ``D = diag(V1, V2, V3)`` the matrix
``M = D^-1/2 K D^1/2`` is symmetric, so ``K = P diag(lam) P^-1`` with ``P = D^1/2 U`` and
``U`` orthogonal. Orthogonal eigenvectors stay well conditioned when eigenvalues nearly
coincide, so the modal transition is stable everywhere. A first-order depot (rate
constant ``KA``) feeds the central compartment; its coupling to mode ``i`` enters only
through the divided difference ``(exp(a t) - exp(b t)) / (a - b)`` with ``a = lam_i``,
``b = -KA``, evaluated in the form ``exp(max t) * t * expm1(-|a-b| t) / (-|a-b| t)`` that
has no cancellation, including ``KA == -lam_i`` exactly.

Every input is then a closed-form term:

* a bolus ``a`` arriving at ``s``: ``E(t - s) a`` with ``E(t) = exp(K t)``;
* an infusion at rate ``r`` over ``[u, w]``: ``E(t - w) Phi(w - u) r`` with
  ``Phi(d) = integral_0^d E``;
* steady state of doses every ``II``: the geometric series
  ``(I - E(II))^-1``, applied mode by mode;
* a constant infusion at steady state: ``-K^-1 r``.

Inputs are added by superposition within each interval between records, so lag times,
modelled durations and bioavailability may differ between parameter sets while the
records are shared, and everything is vectorised over parameter sets (axis 0).

NONMEM semantics
----------------
* Records at equal times are processed in file order; the state reported at a record is
  the one after that record's events (a bolus given at a record is included; a sample
  placed before the dose record at the same time is the pre-dose trough).
* Parameters for the interval ``(t[k-1], t[k]]`` come from record ``k`` (next
  observation carried backward, NONMEM's rule), or from record ``k - 1`` when the events
  were built with ``covariates="locf"``. Dose modifiers (F, lag, modelled rate or
  duration) and steady-state calculations use the parameters of the dose record.
* EVID 3 resets the system; EVID 4 resets and doses; SS=1 resets and sets the state to
  steady state; SS=2 adds the steady state. A reset ends infusions in progress and
  cancels lagged doses not yet arrived and additional (ADDL) doses not yet given.
* ADDL doses at ``t + m * II`` are given before any record at the same time.
* SS=1 with AMT=0 and RATE>0 sets the state to the steady state of that constant
  infusion; the infusion is not continued afterwards (NONMEM's behaviour).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from pkmodel.errors import DatasetError

#: Longest steady-state input (lag plus infusion), in dosing intervals, that is superposed
#: dose by dose (bounded memory and time; pkmodel.data.validate names the row).
MAX_SS_SPAN = 1000.0

__all__ = [
    "DOSE_MODIFIERS",
    "Events",
    "Modes",
    "Structure",
    "at_rows",
    "central_amounts",
    "decompose",
    "dose_response",
    "exp_divided_difference",
    "expand_records",
    "infusion_rate_and_length",
    "is_dose_modifier",
    "is_reset",
    "relexp",
    "select_profiles",
    "selection_of",
    "solve",
    "stack_events",
]

#: Per-compartment dose modifiers, named as in NONMEM's $PK (suffix = compartment number).
DOSE_MODIFIERS = ("F", "ALAG", "R", "D")

_DISPOSITION_NAMES = {
    1: ("CL", "V1"),
    2: ("CL", "V1", "Q", "V2"),
    3: ("CL", "V1", "Q", "V2", "Q3", "V3"),
}


@dataclass(frozen=True)
class Structure:
    """Shape of a linear mammillary compartment model.

    Compartments are numbered as in NONMEM's ADVANs: with a depot, compartment 1 is the
    depot and 2 the central compartment (ADVAN2/4/12); without one, compartment 1 is
    central (ADVAN1/3/11). Peripheral compartments follow the central one.

    Parameters
    ----------
    n_compartments : int
        Number of disposition compartments (1, 2 or 3).
    depot : bool
        Whether a first-order absorption compartment feeds the central one.

    Examples
    --------
    >>> Structure(2).parameter_names
    ('CL', 'V1', 'Q', 'V2')
    >>> Structure(1, depot=True).central_cmt
    2
    """

    n_compartments: int
    depot: bool = False

    def __post_init__(self) -> None:
        if self.n_compartments not in _DISPOSITION_NAMES:
            raise ValueError(
                f"`n_compartments` must be 1, 2 or 3; got {self.n_compartments!r}"
            )

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """Names of the structural parameters (L, L/day or 1/day in pkmodel's units)."""
        names = _DISPOSITION_NAMES[self.n_compartments]
        return names + ("KA",) if self.depot else names

    @property
    def n_states(self) -> int:
        """Number of compartments, depot included."""
        return self.n_compartments + int(self.depot)

    @property
    def central_cmt(self) -> int:
        """NONMEM number (1-based) of the central compartment."""
        return 2 if self.depot else 1


@dataclass(frozen=True)
class Events:
    """Event records of one or more profiles, padded to a common length.

    All arrays have shape ``(B, R)``: ``B`` profiles (usually IDs) of ``R`` records each,
    in processing order. Build them with :func:`expand_records` and :func:`stack_events`.

    Attributes
    ----------
    time : ndarray
        Record times (day), non-decreasing along each row.
    evid, amt, rate, dur, ii, ss, cmt : ndarray
        NONMEM's columns; ``cmt`` is 1-based, 0 meaning the default compartment.
    param_row : ndarray of int
        Index into the caller's per-row parameter arrays whose values apply at each
        record (implied ADDL doses take the next original row under NOCB, the previous
        one under LOCF).
    source_row : ndarray of int
        Index of the original row, -1 for implied ADDL doses and padding.
    covariates : str
        ``"nocb"`` or ``"locf"``: which record's parameters govern an interval.
    """

    time: np.ndarray
    evid: np.ndarray
    amt: np.ndarray
    rate: np.ndarray
    dur: np.ndarray
    ii: np.ndarray
    ss: np.ndarray
    cmt: np.ndarray
    param_row: np.ndarray
    source_row: np.ndarray
    covariates: str = "nocb"

    @property
    def shape(self) -> tuple[int, int]:
        """``(B, R)``: profiles and records per profile."""
        return self.time.shape  # type: ignore[return-value]


_RECORD_FIELDS = ("time", "evid", "amt", "rate", "dur", "ii", "ss", "cmt")


def expand_records(
    time: np.ndarray,
    evid: np.ndarray,
    amt: np.ndarray,
    *,
    rate: np.ndarray | None = None,
    dur: np.ndarray | None = None,
    ii: np.ndarray | None = None,
    addl: np.ndarray | None = None,
    ss: np.ndarray | None = None,
    cmt: np.ndarray | None = None,
    covariates: str = "nocb",
    row_offset: int = 0,
) -> Events:
    """Turn the records of one profile into :class:`Events`, expanding ADDL doses.

    Inputs are trusted: validate tables with :func:`pkmodel.data.validate` first.

    Parameters
    ----------
    time : array_like
        Record times (day), non-decreasing.
    evid, amt : array_like
        NONMEM EVID and dose amount (mg).
    rate, dur, ii, addl, ss, cmt : array_like, optional
        NONMEM columns (rate mg/day, duration day, interval day); zero when omitted,
        ``cmt`` 0 (the default dose compartment, 1).
    covariates : {"nocb", "locf"}
        Which row's parameters govern the interval before a record.
    row_offset : int
        Added to row indices, so that several profiles index one parameter table.

    Returns
    -------
    Events
        One profile (``B = 1``).

    Examples
    --------
    >>> ev = expand_records([0.0, 56.0], [1, 0], [500.0, 0.0], ii=[14.0, 0], addl=[2, 0])
    >>> ev.time.tolist(), ev.source_row.tolist()
    ([[0.0, 14.0, 28.0, 56.0]], [[0, -1, -1, 1]])
    """
    if covariates not in ("nocb", "locf"):
        raise ValueError(f"`covariates` must be 'nocb' or 'locf'; got {covariates!r}")
    t = np.asarray(time, dtype=float)
    n = t.shape[0]

    def column(values: np.ndarray | None) -> np.ndarray:
        return np.zeros(n) if values is None else np.asarray(values, dtype=float)

    cols = {
        "time": t,
        "evid": column(evid),
        "amt": column(amt),
        "rate": column(rate),
        "dur": column(dur),
        "ii": column(ii),
        "ss": column(ss),
        "cmt": column(cmt),
    }
    n_addl = column(addl).astype(int)
    resets = np.flatnonzero(is_reset(cols["evid"], cols["ss"]))

    # Sort key (time, group, order): original rows keep file order (group 1); implied
    # doses come before records at the same time (group 0).
    keys: list[tuple[float, int, float]] = [(t[i], 1, float(i)) for i in range(n)]
    origin = list(range(n))
    for i in np.flatnonzero(n_addl > 0):
        later_resets = resets[resets > i]
        stop = t[later_resets[0]] if later_resets.size else np.inf
        for m in range(1, n_addl[i] + 1):
            tm = t[i] + m * cols["ii"][i]
            if tm > stop:  # one at the reset's time comes before it: given, then reset
                break  # a reset cancels additional doses not yet given
            keys.append((tm, 0, i + m / (n_addl[i] + 1.0)))
            origin.append(i)
    order = sorted(range(len(keys)), key=keys.__getitem__)
    is_original = np.array([keys[k][1] == 1 for k in order])
    src = np.array([origin[k] for k in order])

    out = {}
    for name, values in cols.items():
        out[name] = values[src]
    out["time"] = np.array([keys[k][0] for k in order])
    out["ss"] = np.where(is_original, out["ss"], 0.0)  # implied doses are plain doses
    out["evid"] = np.where(is_original, out["evid"], 1.0)

    # Which original row's parameters apply at each record.
    original_positions = np.flatnonzero(is_original)
    if covariates == "nocb":
        nxt = np.searchsorted(original_positions, np.arange(len(order)), side="left")
        nxt = np.minimum(nxt, len(original_positions) - 1)
        param_row = src[original_positions[nxt]]
    else:
        prv = np.searchsorted(original_positions, np.arange(len(order)), side="right") - 1
        param_row = src[original_positions[np.maximum(prv, 0)]]
    param_row = np.where(is_original, src, param_row)

    return Events(
        **{name: out[name][None, :] for name in _RECORD_FIELDS},
        param_row=(param_row + row_offset)[None, :],
        source_row=np.where(is_original, src + row_offset, -1)[None, :],
        covariates=covariates,
    )


def stack_events(profiles: list[Events]) -> Events:
    """Stack single-profile :class:`Events` into one batch, padding short profiles.

    Padding records repeat the last time with EVID 2 and no dose, so they change nothing.

    Examples
    --------
    >>> a = expand_records([0.0, 1.0], [1, 0], [100.0, 0.0])
    >>> b = expand_records([0.0], [1], [50.0], row_offset=2)
    >>> stack_events([a, b]).time.tolist()
    [[0.0, 1.0], [0.0, 0.0]]
    """
    if not profiles:
        raise ValueError("`profiles` must hold at least one Events")
    rules = {p.covariates for p in profiles}
    if len(rules) != 1:
        raise ValueError("all profiles must use the same `covariates` rule")
    width = max(p.shape[1] for p in profiles)

    def pad(values: np.ndarray, fill: float | None) -> np.ndarray:
        extra = width - values.shape[1]
        tail = values[:, -1:] if fill is None else np.full((1, 1), fill)
        return np.concatenate([values, np.repeat(tail, extra, axis=1)], axis=1)

    fills: dict[str, float | None] = {"time": None, "evid": 2.0, "param_row": None,
                                      "source_row": -1.0}
    stacked = {}
    for name in _RECORD_FIELDS + ("param_row", "source_row"):
        fill = fills.get(name, 0.0)
        rows = [pad(getattr(p, name), fill) for p in profiles]
        stacked[name] = np.concatenate(rows, axis=0)
    stacked["param_row"] = stacked["param_row"].astype(int)
    stacked["source_row"] = stacked["source_row"].astype(int)
    return Events(**stacked, covariates=rules.pop())


def select_profiles(events: Events, rows: np.ndarray, *,
                    param_row: np.ndarray | None = None) -> Events:
    """The profiles ``rows`` of ``events`` (their records and padding as they are), with
    ``param_row`` in place of theirs when given (parameters indexed otherwise). The engine
    takes their doses, steady states and schedule from those of ``events`` (built once)
    instead of building them again: a fit of many IDs solves ever smaller selections of
    them as IDs converge.

    Examples
    --------
    >>> a = expand_records([0.0, 7.0], [1, 0], [100.0, 0.0])
    >>> b = expand_records([0.0, 2.0], [1, 0], [50.0, 0.0], row_offset=2)
    >>> select_profiles(stack_events([a, b]), np.array([1])).amt.tolist()
    [[50.0, 0.0]]
    """
    rows = np.asarray(rows)
    if rows.size == 0:
        rows = rows.astype(int)
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):  # a mask is bool
        raise ValueError("`rows` must be a 1-D array of profile indices (not a mask)")
    rows = rows.copy()  # kept: the caller's array may change after
    taken = {name: getattr(events, name)[rows] for name in (*_RECORD_FIELDS, "source_row")}
    taken["param_row"] = events.param_row[rows] if param_row is None else param_row
    selected = Events(**taken, covariates=events.covariates)
    if len(_SELECTED) >= 256:
        _SELECTED.clear()  # a later solve of those builds its inputs: slower, not wrong
    _SELECTED[id(selected)] = (weakref.ref(selected), weakref.ref(events), rows)
    return selected


#: Events made by select_profiles: a weak reference to them and their parent, and rows.
_SELECTED: dict[int, tuple[weakref.ref, weakref.ref, np.ndarray]] = {}


def selection_of(events: Events) -> tuple[Events, np.ndarray] | None:
    """The events ``events`` were selected from by :func:`select_profiles` and the rows
    taken, while both exist (None otherwise): what depends only on the records can be
    taken from the parent's instead of built again.

    Examples
    --------
    >>> a = stack_events([expand_records([0.0, 7.0], [1, 0], [100.0, 0.0])] * 2)
    >>> parent, rows = selection_of(select_profiles(a, np.array([1])))
    >>> parent is a, rows.tolist()
    (True, [1])
    """
    hit = _SELECTED.get(id(events))
    if hit is None or hit[0]() is not events:
        return None
    parent = hit[1]()
    return None if parent is None else (parent, hit[2])


# --------------------------------------------------------------------------- modal algebra


def relexp(x: np.ndarray) -> np.ndarray:
    """``expm1(x) / x``, equal to 1 at ``x = 0``, elementwise and without cancellation.

    Examples
    --------
    >>> relexp(np.array([0.0, 1e-20, -1.0])).round(6).tolist()
    [1.0, 1.0, 0.632121]
    """
    x = np.asarray(x, dtype=float)
    safe = np.where(x == 0.0, 1.0, x)
    return np.where(x == 0.0, 1.0, np.expm1(safe) / safe)


def _phi(lam: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``integral_0^t exp(lam u) du``."""
    return t * relexp(lam * t)


def infusion_rate_and_length(amt: np.ndarray, rate: np.ndarray, dur: np.ndarray
                             ) -> tuple[np.ndarray, np.ndarray]:
    """The rate (mg/day) and length (day) of doses given by RATE or by DUR, elementwise; 0
    and 0 for a bolus (neither given).

    Examples
    --------
    >>> r, d = infusion_rate_and_length(np.array([100.0, 100.0, 100.0]),
    ...                                 np.array([50.0, 0.0, 0.0]), np.array([0.0, 4.0, 0.0]))
    >>> r.tolist(), d.tolist()
    ([50.0, 25.0, 0.0], [2.0, 4.0, 0.0])
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(rate > 0, rate, np.where(dur > 0, amt / np.where(dur > 0, dur, 1.0), 0.0))
        return r, np.where(r > 0, amt / np.where(r > 0, r, 1.0), 0.0)


def exp_divided_difference(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``(exp(a t) - exp(b t)) / (a - b)`` without cancellation; ``t exp(a t)`` if a == b
    (rates in 1/day, ``t`` in days; elementwise).

    Examples
    --------
    >>> float(exp_divided_difference(np.array(-0.1), np.array(-0.1), np.array(2.0)))
    1.6374615061559636
    """
    hi = np.maximum(a, b)
    gap = hi - np.minimum(a, b)
    return np.exp(hi * t) * t * relexp(-gap * t)


def _matvec(m: np.ndarray, v: np.ndarray) -> np.ndarray:
    if m.shape[-1] == 2 and v.size > 1000:  # written out: 3x faster than einsum for many
        out = np.empty(np.broadcast_shapes(m.shape[:-1], v.shape))
        v0, v1 = v[..., 0], v[..., 1]
        out[..., 0] = m[..., 0, 0] * v0 + m[..., 0, 1] * v1
        out[..., 1] = m[..., 1, 0] * v0 + m[..., 1, 1] * v1
        return out
    return np.einsum("...ij,...j->...i", m, v)


@dataclass
class Modes:
    """Modal decomposition of the disposition matrix for a batch of parameter sets
    (:func:`decompose`): ``K = p diag(lam) pinv`` on the disposition amounts."""

    lam: np.ndarray  # (..., n) eigenvalues (1/day), all negative
    p: np.ndarray  # (..., n, n) right eigenvectors: amounts = p @ modal
    pinv: np.ndarray  # (..., n, n)
    ka: np.ndarray | None  # (...,) absorption rate constant (1/day)
    b: np.ndarray = field(init=False)  # (..., n) modal image of a unit amount in central

    def __post_init__(self) -> None:
        self.b = self.pinv[..., :, 0]

    def take(self, index: int) -> Modes:
        """The decomposition of one column of a (S, U, ...) batch."""
        ka = None if self.ka is None else self.ka[:, index]
        return Modes(self.lam[:, index], self.p[:, index], self.pinv[:, index], ka)

    def gather(self, index: np.ndarray) -> Modes:
        """The decompositions ``index`` of a flat (C, ...) batch."""
        def take(a: np.ndarray) -> np.ndarray:  # np.take: 3x faster than a[index] here
            return np.take(a, index, axis=0)

        return Modes(take(self.lam), take(self.p), take(self.pinv),
                      None if self.ka is None else take(self.ka))


def decompose(n: int, params: dict[str, np.ndarray], depot: bool) -> Modes:
    """Eigen-decomposition of the rate matrix of ``n`` disposition compartments for every
    parameter set, vectorised (CL and Q in L/day, volumes in L, KA in 1/day, each an
    array of the batch's shape).

    Examples
    --------
    >>> modes = decompose(1, {"CL": np.array([0.5]), "V1": np.array([5.0])}, False)
    >>> modes.lam.tolist()
    [[-0.1]]
    """
    cl, v1 = params["CL"], params["V1"]
    shape = cl.shape
    if n == 1:
        lam = (-cl / v1)[..., None]
        u = np.ones(shape + (1, 1))
        sqrt_v = np.sqrt(v1)[..., None]
    elif n == 2:
        q, v2 = params["Q"], params["V2"]
        a = -(cl + q) / v1
        c = -q / v2
        off = q / np.sqrt(v1 * v2)
        r = np.hypot(a - c, 2.0 * off)
        fast = 0.5 * (a + c) - 0.5 * r  # no cancellation: both terms negative
        slow = (cl / v1) * (q / v2) / fast  # det(M) = k10 * k21, exact
        theta = 0.5 * np.arctan2(2.0 * off, a - c)  # rotation diagonalising M
        cos, sin = np.cos(theta), np.sin(theta)
        lam = np.stack([slow, fast], axis=-1)
        # u = [[cos, -sin], [sin, cos]]; p = sqrt(V) u, pinv = u' / sqrt(V), written out
        s1, s2 = np.sqrt(v1), np.sqrt(v2)
        p, pinv = np.empty(shape + (2, 2)), np.empty(shape + (2, 2))
        p[..., 0, 0], p[..., 0, 1] = s1 * cos, -s1 * sin
        p[..., 1, 0], p[..., 1, 1] = s2 * sin, s2 * cos
        pinv[..., 0, 0], pinv[..., 0, 1] = cos / s1, sin / s2
        pinv[..., 1, 0], pinv[..., 1, 1] = -sin / s1, cos / s2
        return Modes(lam, p, pinv, params["KA"] if depot else None)
    else:
        q, v2, q3, v3 = params["Q"], params["V2"], params["Q3"], params["V3"]
        m = np.zeros(shape + (3, 3))
        m[..., 0, 0] = -(cl + q + q3) / v1
        m[..., 1, 1] = -q / v2
        m[..., 2, 2] = -q3 / v3
        m[..., 0, 1] = m[..., 1, 0] = q / np.sqrt(v1 * v2)
        m[..., 0, 2] = m[..., 2, 0] = q3 / np.sqrt(v1 * v3)
        lam, u = np.linalg.eigh(m)
        sqrt_v = np.sqrt(np.stack([v1, v2, v3], axis=-1))
    p = sqrt_v[..., :, None] * u
    pinv = np.swapaxes(u, -1, -2) / sqrt_v[..., None, :]
    return Modes(lam, p, pinv, params["KA"] if depot else None)


def _modal(modes: Modes, x: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """Amounts ``x (S, m)`` as (depot amount or None, modal coordinates ``(S, n)``)."""
    if modes.ka is None:
        return None, _matvec(modes.pinv, x)
    return x[:, 0], _matvec(modes.pinv, x[:, 1:])


def _amounts(modes: Modes, depot: np.ndarray | None, z: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_modal`."""
    disposition = _matvec(modes.p, z)
    if depot is None:
        return disposition
    return np.concatenate([depot[:, None], disposition], axis=1)


def _evolve(modes: Modes, t: np.ndarray, depot: np.ndarray | None,
            z: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """``E(t)`` in modal coordinates: ``t`` days without input (t >= 0)."""
    z = z * np.exp(modes.lam * t[:, None])
    if depot is None or modes.ka is None:
        return depot, z
    ka = modes.ka
    z = z + (ka * depot)[:, None] * modes.b * exp_divided_difference(modes.lam, -ka[:, None],
                                                                   t[:, None])
    return depot * np.exp(-ka * t), z


def _infuse_modal(modes: Modes, d: np.ndarray, rate_depot: np.ndarray | None,
                  rate_z: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """``Phi(d) r`` in modal coordinates: a constant input for ``d`` days from zero."""
    phi = _phi(modes.lam, d[:, None])
    z = phi * rate_z
    if rate_depot is None or modes.ka is None:
        return rate_depot, z
    ka = modes.ka
    coupling = phi - exp_divided_difference(modes.lam, -ka[:, None], d[:, None])
    return rate_depot * _phi(-ka, d), z + rate_depot[:, None] * modes.b * coupling


def _propagate(modes: Modes, t: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``E(t) x``: the state after ``t`` days without input (t >= 0)."""
    return _amounts(modes, *_evolve(modes, t, *_modal(modes, x)))


def _infuse(modes: Modes, d: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``Phi(d) v``: the state after a constant input ``v`` (mg/day) for ``d`` days from 0."""
    return _amounts(modes, *_infuse_modal(modes, d, *_modal(modes, v)))


def _geometric(modes: Modes, tau: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``(I - E(tau))^-1 y``: the sum of ``E(m tau) y`` over m >= 0."""
    off = 0 if modes.ka is None else 1
    rhs = _matvec(modes.pinv, y[:, off:])
    out = np.empty_like(y)
    if modes.ka is not None:
        ka = modes.ka
        out[:, 0] = y[:, 0] / -np.expm1(-ka * tau)
        rhs = rhs + (ka * out[:, 0])[:, None] * modes.b * exp_divided_difference(
            modes.lam, -ka[:, None], tau[:, None]
        )
    z = rhs / -np.expm1(modes.lam * tau[:, None])
    out[:, off:] = _matvec(modes.p, z)
    return out


def _steady_infusion(modes: Modes, v: np.ndarray) -> np.ndarray:
    """``-K^-1 v``: the steady state of a constant input ``v`` (mg/day)."""
    off = 0 if modes.ka is None else 1
    rhs = _matvec(modes.pinv, v[:, off:])
    out = np.empty_like(v)
    if modes.ka is not None:
        out[:, 0] = v[:, 0] / modes.ka
        rhs = rhs + v[:, :1] * modes.b
    out[:, off:] = _matvec(modes.p, -rhs / modes.lam)
    return out


# --------------------------------------------------------------------------- solver


def _full(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``a`` broadcast to ``shape`` (itself when it has that shape already)."""
    return a if a.shape == shape else np.broadcast_to(a, shape)


def _is_dose(evid: np.ndarray) -> np.ndarray:
    return (evid == 1) | (evid == 4)


def is_reset(evid: np.ndarray, ss: np.ndarray) -> np.ndarray:
    """Records that empty the compartments (EVID 3 or 4, or a dose with SS 1), and so
    cancel the additional doses (ADDL) of earlier records not yet given.

    Examples
    --------
    >>> is_reset(np.array([1, 3, 4, 1, 0]), np.array([0, 0, 0, 1, 0])).tolist()
    [False, True, True, True, False]
    """
    return (evid >= 3) | ((ss == 1) & _is_dose(evid))


@dataclass
class _Input:
    """One dose (or a past steady-state dose still arriving), in every parameter set."""

    record: int  # index of the record that gives it
    start: np.ndarray  # (S,) arrival time after lag (day)
    end: np.ndarray  # (S,) end of infusion (= start for a bolus)
    bolus: np.ndarray  # (S, m) amounts (mg), zero where infused
    rate: np.ndarray  # (S, m) infusion rates (mg/day), zero for a bolus
    kill: np.ndarray  # (S,) index of the record whose reset ends it (R if none)
    ghost: bool = False  # a past steady-state dose, already counted up to its record


def is_dose_modifier(name: str) -> bool:
    """Whether ``name`` is a per-compartment dose modifier such as F1 or ALAG2.

    Examples
    --------
    >>> is_dose_modifier("ALAG2"), is_dose_modifier("F1"), is_dose_modifier("FAST")
    (True, True, False)
    """
    return any(name.startswith(m) and name[len(m):].isdigit() for m in DOSE_MODIFIERS)


def _repeat_inputs(inputs: list[_Input], ss_specs: dict[int, _SteadyState],
                   reset: np.ndarray, repeats: int) -> tuple[list[_Input],
                                                              dict[int, _SteadyState],
                                                              np.ndarray]:
    """Inputs built per event profile, expanded to the ``repeats`` sets of each profile."""
    return _take_inputs(inputs, ss_specs, reset, repeats)


def _take_inputs(inputs: list[_Input], ss_specs: dict[int, _SteadyState], reset: np.ndarray,
                 rows: int | np.ndarray) -> tuple[list[_Input], dict[int, _SteadyState],
                                                  np.ndarray]:
    """Inputs of the sets ``rows`` (indices), or each set ``rows`` times over (an int)."""
    def rep(a: np.ndarray) -> np.ndarray:
        return np.repeat(a, rows, axis=0) if isinstance(rows, int) else a.take(rows, axis=0)

    inputs = [dataclasses.replace(i, start=rep(i.start), end=rep(i.end), bolus=rep(i.bolus),
                                  rate=rep(i.rate), kill=rep(i.kill)) for i in inputs]
    ss_specs = {k: dataclasses.replace(v, mask=rep(v.mask), tau=rep(v.tau), lag=rep(v.lag),
                                       bolus=rep(v.bolus), rate=rep(v.rate),
                                       duration=rep(v.duration), constant=rep(v.constant))
                for k, v in ss_specs.items()}
    return inputs, ss_specs, rep(reset)


def _modifier(params: Mapping[str, np.ndarray], name: str, cmt: np.ndarray,
              default: float) -> np.ndarray:
    """Per-record value of a per-compartment modifier such as F2 or ALAG1."""
    out = np.full(cmt.shape, default)
    for key, values in params.items():
        if key.startswith(name) and key[len(name):].isdigit():
            out = np.where(cmt == int(key[len(name):]), values, out)
    return out


def solve(
    structure: Structure,
    events: Events,
    params: Mapping[str, np.ndarray],
    *,
    before_events: bool = False,
) -> np.ndarray:
    """Amounts in every compartment at each record, for many parameter sets at once.

    Parameters
    ----------
    structure : Structure
        Number of compartments and whether there is a depot.
    events : Events
        Records of ``B`` profiles (``B`` is 1 or equal to the number of parameter sets).
    params : mapping of str to array_like
        Values per record, each broadcastable to ``(S, R)``: the structural parameters
        of ``structure.parameter_names`` (CL and Q in L/day, volumes in L, KA in 1/day),
        and optionally dose modifiers per compartment, named as in NONMEM: ``F1``
        (fraction), ``ALAG1`` (day), ``R1`` (mg/day, for RATE=-1), ``D1`` (day, for
        RATE=-2).
    before_events : bool
        Report the amounts just before each record's own events (reset, steady state,
        bolus) instead of after them: at a dose record, the pre-dose trough.

    Returns
    -------
    ndarray
        Amounts (mg), shape ``(S, R, n_states)``, compartments in NONMEM order.

    Examples
    --------
    A 500-mg bolus into a 5-L compartment cleared at 0.5 L/day; one half-life later:

    >>> ev = expand_records([0.0, 10 * np.log(2)], [1, 0], [500.0, 0.0])
    >>> amounts = solve(Structure(1), ev, {"CL": 0.5, "V1": 5.0})
    >>> np.round(amounts[0, :, 0], 6).tolist()
    [500.0, 250.0]
    """
    names = structure.parameter_names
    missing = [name for name in names if name not in params]
    if missing:
        raise ValueError(f"`params` lacks {missing}; {structure} needs {list(names)}")
    b_events, n_rec = events.shape
    arrays = {k: np.asarray(v, dtype=float) for k, v in params.items()}
    shapes = [np.broadcast_shapes(a.shape, (1, n_rec)) for a in arrays.values()]
    n_sets = max([b_events] + [s[0] for s in shapes if len(s) == 2])
    if n_sets % b_events:
        raise ValueError(f"{n_sets} parameter sets cannot share {b_events} event profiles: "
                         "give 1 profile, one per set, or an equal number of sets per profile")
    repeats = n_sets // b_events  # consecutive sets per event profile
    full = (n_sets, n_rec)
    arrays = {k: _full(v, full) for k, v in arrays.items()}
    n_states = structure.n_states

    modes_at, changes = _modes_per_record(structure, {name: arrays[name] for name in names},
                                          repeats)

    # Doses are set up once per event profile when the sets sharing a profile share
    # their dose modifiers too (the common case), else once per set.
    ev = {name: np.asarray(getattr(events, name)) for name in _RECORD_FIELDS}
    modifiers = {k: v for k, v in arrays.items() if is_dose_modifier(k)}
    grouped = {k: v.reshape(b_events, repeats, n_rec) for k, v in modifiers.items()}
    if not modifiers:
        inputs, ss_specs, reset, schedule = _plain_inputs(structure, events, ev, repeats)
    elif all(np.all(g == g[:, :1]) for g in grouped.values()):
        inputs, ss_specs, reset = _build_inputs(
            structure, ev, {k: g[:, 0] for k, g in grouped.items()}, b_events, n_rec)
        schedule = _schedule(inputs, ev["time"], n_rec)
        if repeats > 1:
            inputs, ss_specs, reset = _repeat_inputs(inputs, ss_specs, reset, repeats)
    else:
        ev = {k: np.repeat(v, repeats, axis=0) for k, v in ev.items()}
        inputs, ss_specs, reset = _build_inputs(structure, ev, modifiers, n_sets, n_rec)
        schedule = _schedule(inputs, ev["time"], n_rec)
    times = np.repeat(ev["time"], n_sets // ev["time"].shape[0], axis=0)

    x = np.zeros((n_sets, n_states))
    out = np.empty((n_sets, n_rec, n_states))
    t_prev = times[:, 0]
    locf = events.covariates == "locf"
    # Asked once, not at every record: whether time moves, which records reset, which
    # inputs have a bolus or a rate.
    moving = np.concatenate([[False], (np.diff(ev["time"], axis=1) > 0).any(axis=0)])
    resets = reset.any(axis=0)
    has_bolus = [bool(inp.bolus.any()) for inp in inputs]
    has_rate = [bool(inp.rate.any()) for inp in inputs]
    run_end = _free_runs(schedule, resets, ss_specs, changes, locf)
    longest = max(2, _DECAY_CHUNK // (n_sets * n_states))  # records decayed in one step
    k = 0
    while k < n_rec:
        if run_end[k] - k >= 2:  # records without input or event: one free decay
            stop = min(run_end[k], k + longest)
            block = _decay(modes_at(k - 1 if locf else k), times[:, k:stop] - t_prev[:, None],
                           x)
            out[:, k:stop] = block
            x, t_prev, k = block[:, -1], times[:, stop - 1], stop
            continue
        tk = times[:, k]
        modes = modes_at(max(k - 1, 0) if locf else k)
        dt = tk - t_prev
        if schedule[k] or moving[k]:
            # The interval (t[k-1], t[k]] in modal coordinates: evolve, add every input.
            depot, z = _evolve(modes, dt, *_modal(modes, x))
            for j in schedule[k]:
                inp = inputs[j]
                alive = k <= inp.kill
                if has_bolus[j]:
                    hit = alive & (inp.start > t_prev) & (inp.start <= tk)
                    lag = np.where(hit, tk - inp.start, 0.0)
                    add_d, add_z = _evolve(modes, lag, *_modal(modes, inp.bolus * hit[:, None]))
                    z = z + add_z
                    depot = None if depot is None else depot + add_d
                if has_rate[j]:
                    lo = np.maximum(inp.start, t_prev)
                    hi = np.minimum(inp.end, tk)
                    length = np.where(alive, np.maximum(hi - lo, 0.0), 0.0)
                    after = np.where(length > 0, tk - hi, 0.0)
                    add_d, add_z = _evolve(modes, after, *_infuse_modal(
                        modes, length, *_modal(modes, inp.rate)))
                    z = z + add_z
                    depot = None if depot is None else depot + add_d
            x = _amounts(modes, depot, z)
        own = modes_at(k)
        if before_events:
            out[:, k] = x
        if resets[k]:
            x = np.where(reset[:, k, None], 0.0, x)
        if k in ss_specs:
            x = x + _steady_state(own, ss_specs[k])
        for j in schedule.get(("now", k), []):
            x = x + inputs[j].bolus * (inputs[j].start <= tk)[:, None]
        if not before_events:
            out[:, k] = x
        t_prev = tk
        k += 1
    return out


def _free_runs(schedule: dict, resets: np.ndarray, ss_specs: dict, changes: np.ndarray,
               locf: bool) -> np.ndarray:
    """Per record ``k``, the end (exclusive) of the run of records from ``k`` on that no
    input reaches in any set (:func:`_quiet`) and whose intervals share the decomposition
    of ``k``'s interval (``k``'s parameters under NOCB, ``k - 1``'s under LOCF); ``k``
    itself where ``k`` is not such a record (record 0 never is: its interval is empty).
    Over a run the state decays freely."""
    n_rec = resets.size
    quiet = _quiet(schedule, resets, ss_specs)
    # The interval before record k uses k's parameters (NOCB) or k - 1's (LOCF): record k
    # continues a run if they are those of the interval before k - 1.
    same = np.zeros(n_rec, dtype=bool)
    if locf:
        same[2:] = ~changes[1:-1]
    else:
        same[1:] = ~changes[1:]
    breaks = np.append(np.flatnonzero(~(quiet & same)), n_rec)  # records a run cannot join
    records = np.arange(n_rec)
    following = breaks[np.searchsorted(breaks, records, side="right")]
    return np.where(quiet, following, records)


def _quiet(schedule: dict, resets: np.ndarray, ss_specs: dict) -> np.ndarray:
    """``(R,)`` the records no input reaches in any set: no dose acting in the interval
    before them, none given at them, no reset or steady state; never record 0."""
    quiet = ~schedule["reached"] & ~resets
    quiet[0] = False
    quiet[list(ss_specs)] = False
    return quiet


def _decay(modes: Modes, dt: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The state ``x (S, m)`` after ``dt (S, L)`` days without input: ``(S, L, m)``,
    :func:`_propagate` for ``L`` times at once."""
    depot, z = _modal(modes, x)
    # (S, modes, L): the times innermost (numpy is slow over an innermost axis of 2)
    lam, dt = modes.lam[:, :, None], dt[:, None, :]
    z = z[:, :, None] * np.exp(lam * dt)
    if depot is not None and modes.ka is not None:
        ka = modes.ka[:, None, None]
        z = z + (ka * depot[:, None, None]) * modes.b[:, :, None] * exp_divided_difference(
            lam, -ka, dt)
    disposition = np.swapaxes(modes.p @ z, 1, 2)  # (a matmul: einsum is 10x slower)
    if depot is None or modes.ka is None:
        return disposition
    return np.concatenate([(depot[:, None] * np.exp(-ka[:, 0] * dt[:, 0]))[..., None],
                           disposition], axis=2)


#: Elements (sets x records x states) of a run of free records decayed in one step: a
#: longer run is decayed in steps of this size (its temporaries stay small).
_DECAY_CHUNK = 2_000_000
#: Parameter entries (sets x records) up to which every entry is decomposed.
_DECOMPOSE_ALL = 2048


def _modes_per_record(structure: Structure, params: dict[str, np.ndarray],
                      repeats: int = 1) -> tuple[Callable[[int], Modes], np.ndarray]:
    """``modes_at(k)``: the decomposition of every set's parameters ``(S, R)`` at record
    ``k``, and ``(R,)`` whether some set's parameters change at each record.

    Each set is decomposed where its own parameters change (once per occasion with IOV),
    not at every record where another set's change: a batch of many IDs changes somewhere
    at nearly every record. Of ``repeats`` consecutive sets (those sharing an event
    profile: the points of a finite-difference stencil), a set whose parameters at a
    record equal the first set's there takes the first set's decomposition: a point
    moving one occasion's KAPPA differs from the centre at that occasion only. A small
    batch (at most _DECOMPOSE_ALL entries) is decomposed at every entry instead: the
    bookkeeping would cost more than the decompositions it saves; so is a batch whose
    sets all change at the same records with nothing to share (posterior draws, each with
    its own KAPPAs), at those records only, without per-entry bookkeeping or gathers."""
    first = next(iter(params.values()))
    fresh = np.ones(first.shape, dtype=bool)
    fresh[:, 1:] = False
    for values in params.values():
        fresh[:, 1:] |= values[:, 1:] != values[:, :-1]
    changes = fresh.any(axis=0)
    small = first.size <= _DECOMPOSE_ALL
    if changes[1:].any() and (small or _changes_in_step(params, fresh, changes, repeats)):
        # Decomposed at every record where some set changes, all sets at once: a small
        # batch, or one whose sets all change at the same records without sharing a
        # decomposition with their group's first set (the draws of a posterior).
        cols = np.arange(first.shape[1]) if small else np.flatnonzero(changes)
        every = decompose(structure.n_compartments,
                           params if small else {k: v[:, cols] for k, v in params.items()},
                           structure.depot)
        in_force = np.searchsorted(cols, np.arange(first.shape[1]), side="right") - 1
        columns: dict[int, Modes] = {}

        def column(k: int) -> Modes:
            if k not in columns:
                columns[k] = every.take(in_force[k])
            return columns[k]

        return column, changes
    if changes[1:].any():
        # (a take of the entries: 3x faster than a boolean mask)
        latest, where = _latest_decomposition(fresh, params, repeats)
        modes = decompose(structure.n_compartments,
                           {k: np.ravel(v).take(where) for k, v in params.items()},
                           structure.depot)
    else:  # constant parameters: one decomposition per set
        latest = None
        modes = decompose(structure.n_compartments, {k: v[:, 0] for k, v in params.items()},
                           structure.depot)
    cache: dict[int, Modes] = {}
    previous: list = [None, None]  # the last indices gathered and their decomposition

    def modes_at(k: int) -> Modes:
        if latest is None:
            return modes
        if k not in cache:
            index = latest[:, k]
            if previous[0] is None or not np.array_equal(index, previous[0]):
                previous[:] = [index, modes.gather(index)]
            cache[k] = previous[1]
        return cache[k]

    return modes_at, changes


def _changes_in_step(params: dict[str, np.ndarray], fresh: np.ndarray, changes: np.ndarray,
                     repeats: int) -> bool:
    """Whether every set changes at every record where some set does, and no set equals
    the first of its group of ``repeats`` there (nothing for :func:`_latest_decomposition`
    to share)."""
    if not fresh[:, changes].all():
        return False
    if repeats == 1:
        return True
    for groups in (slice(0, repeats), slice(None)):  # the first group: a stencil shares
        shared = None
        for values in params.values():
            grouped = values[groups][:, changes].reshape(-1, repeats, int(changes.sum()))
            same = grouped[:, 1:] == grouped[:, :1]
            shared = same if shared is None else shared & same
        if shared.any():
            return False
    return True


def _latest_decomposition(fresh: np.ndarray, params: dict[str, np.ndarray], repeats: int
                          ) -> tuple[np.ndarray, np.ndarray]:
    """For sets ``(S, R)`` whose parameters change where ``fresh``: the entries to
    decompose (flat, row-major positions) and, per set and record, the index among those
    of the decomposition in force (``latest``). A fresh entry of a set equal to the first
    set of its group of ``repeats`` at that record is not decomposed: it takes the first
    set's in force there."""
    n_rec = fresh.shape[1]
    at = np.flatnonzero(fresh)
    counter = np.cumsum(fresh.ravel()) - 1  # per entry: its set's last fresh entry
    own = np.ones(at.size, dtype=bool)
    if repeats > 1:
        row = at // n_rec
        lead = at - (row % repeats) * n_rec  # the same record of the group's first set
        same = lead != at
        for values in params.values():
            flat = values.ravel()
            same &= flat.take(at) == flat.take(lead)
        own = ~same
    ref = np.empty(at.size, dtype=int)
    ref[own] = np.arange(np.count_nonzero(own))
    if not own.all():  # the first set's entry in force there (its own: never shared)
        ref[~own] = ref[counter.take(lead[~own])]
    return ref.take(counter).reshape(fresh.shape), at[own]


#: Doses, steady states, resets and the schedule of event profiles without dose
#: modifiers, which do not depend on the parameters: built once per Events object, and
#: repeated for the number of sets per profile of each call (kept per number when small:
#: a fit solves the same records many times, with two or three stencils).
_PLAIN_INPUTS: dict[tuple[int, Structure], tuple[weakref.ref, tuple, dict[int, tuple]]] = {}
_REPEATED_KEPT_SETS = 4096  # repeated inputs are kept for calls of at most this many sets


def _plain_inputs(structure: Structure, events: Events, ev: dict[str, np.ndarray],
                  repeats: int) -> tuple:
    """:func:`_build_inputs` and :func:`_schedule` without modifiers, cached for
    ``events`` (confirmed by a weak reference, never by a reused id)."""
    key = (id(events), structure)
    hit = _PLAIN_INPUTS.get(key)
    if hit is None or hit[0]() is not events:
        selected = selection_of(events)
        if selected is not None:  # its parent's, rows taken (the schedule: a superset)
            parent, rows = selected
            parent_ev = {name: np.asarray(getattr(parent, name)) for name in _RECORD_FIELDS}
            *built, schedule = _plain_inputs(structure, parent, parent_ev, 1)
            inputs, ss_specs, reset = _take_inputs(*built, rows)
        else:
            b_events, n_rec = events.shape
            inputs, ss_specs, reset = _build_inputs(structure, ev, {}, b_events, n_rec)
            schedule = _schedule(inputs, ev["time"], n_rec)
        if len(_PLAIN_INPUTS) >= 64:
            _PLAIN_INPUTS.clear()
        hit = (weakref.ref(events), (inputs, ss_specs, reset, schedule), {})
        _PLAIN_INPUTS[key] = hit
    inputs, ss_specs, reset, schedule = hit[1]
    if repeats == 1:
        return inputs, ss_specs, reset, schedule
    repeated = hit[2].get(repeats)
    if repeated is None:
        repeated = _repeat_inputs(inputs, ss_specs, reset, repeats)
        if events.shape[0] * repeats <= _REPEATED_KEPT_SETS:
            hit[2][repeats] = repeated
    return (*repeated, schedule)


def central_amounts(
    structure: Structure,
    events: Events,
    params: Mapping[str, np.ndarray],
    *,
    before_events: bool = False,
    at: np.ndarray | None = None,
) -> np.ndarray:
    """The central compartment's amount (mg) at each record, ``(S, R)``, or at the records
    ``at`` (``(B, K)`` indices into each profile's records) only, ``(S, K)``: the central
    column of :func:`solve`, by superposition when it applies.

    When every parameter set's parameters are the same at all its records, no record
    resets, no dose modifier (F, ALAG, R, D) is given and every steady-state dose is a
    profile's first dose (SS=1, into a disposition compartment, its infusion no longer than
    its II), the amount is a sum over doses of closed-form responses (bolus, zero-order
    infusion, first-order absorption, and a steady state's earlier doses as a geometric
    series; the same modal algebra as :func:`solve`), vectorised over sets, records and
    doses, with no loop over records, provided that is cheaper by a measured cost model
    (few dose-record pairs: a likelihood at a few samples). Otherwise :func:`solve` runs
    (thousands of sets over a year of doses and samples, or samples that a free decay
    covers).

    Examples
    --------
    >>> ev = expand_records([0.0, 1.0, 2.0], [1, 0, 0], [100.0, 0.0, 0.0])
    >>> params = {"CL": np.array([[1.0], [2.0]]), "V1": np.array([[10.0], [10.0]])}
    >>> np.round(central_amounts(Structure(1), ev, params), 4).tolist()
    [[100.0, 90.4837, 81.8731], [100.0, 81.8731, 67.032]]
    """
    names = structure.parameter_names
    b_events, n_rec = events.shape
    arrays = {k: np.asarray(v, dtype=float) for k, v in params.items()}
    evid = np.asarray(events.evid)
    simple = (not any(is_dose_modifier(k) for k in arrays) and _superposable_ss(structure, events)
              and not np.any(evid >= 3) and not np.any(np.asarray(events.rate) < 0)
              and all(k in arrays for k in names))
    if simple:
        n_sets = max([b_events] + [np.broadcast_shapes(a.shape, (1, n_rec))[0]
                                   for a in arrays.values()])
        full = {k: _full(arrays[k], (n_sets, n_rec)) for k in names}
        simple = n_sets % b_events == 0 and all(bool((v == v[:, :1]).all())
                                                for v in full.values())
        doses = int(_is_dose(evid).any(axis=0).sum())
        outputs = n_rec if at is None else np.shape(at)[1]
        simple = simple and _superposition_cheaper(structure, events, n_sets,
                                                   n_sets * doses * outputs)
    if not simple:
        central = structure.central_cmt - 1
        out = solve(structure, events, params, before_events=before_events)[..., central]
        if at is None:
            return out
        where = np.repeat(np.asarray(at), out.shape[0] // b_events, axis=0)
        return np.take_along_axis(out, where, axis=1)
    modes = decompose(structure.n_compartments, {k: v[:, :1] for k, v in full.items()},
                       structure.depot).take(0)
    every = np.broadcast_to(np.arange(n_rec), (b_events, n_rec))
    return _superpose(structure, events, modes, n_sets, before_events,
                      every if at is None else np.asarray(at))


def dose_response(
    structure: Structure,
    params: Mapping[str, np.ndarray],
    *,
    cmt: int,
    duration: float,
    times: np.ndarray,
    intervals: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The central amount (mg) per mg of one dose, for ``S`` sets of constant parameters:
    ``times`` after a single dose, ``(S, T)``, and one interval after a dose at steady
    state of doses every interval, ``(S, I)``: the trough of that regimen.

    The dose is a bolus (``duration`` 0) or a zero-order infusion over ``duration`` days
    into compartment ``cmt`` (NONMEM numbering), without dose modifiers (F, ALAG, R, D:
    give the amount and duration they imply). Closed forms: the state when the dose ends,
    ``Phi(d) r``, decays as ``E(t - d)``; the steady-state trough is
    ``E(tau - d) (I - E(tau))^-1`` of it (each ``tau >= duration``). One
    decomposition per set, no records: the questions of a forecast (what a new dose adds,
    what its steady state gives) for thousands of posterior draws at once.

    Parameters
    ----------
    structure : Structure
    params : mapping of str to array_like
        The structural parameters of ``structure.parameter_names``, one value per set
        (shape ``(S,)`` or ``(S, 1)``).
    cmt : int
        Dose compartment (1-based; the depot is 1 in a model with one; 0 means 1, as in
        records).
    duration : float
        Infusion length (days), 0 for a bolus.
    times : array_like
        Days after the dose (>= 0), ``(T,)``.
    intervals : array_like
        Dosing intervals (days, each >= ``duration`` and > 0), ``(I,)``.

    Returns
    -------
    tuple of ndarray
        ``(S, T)`` and ``(S, I)`` central amounts per mg of dose.

    Examples
    --------
    A 1-mg bolus into 10 L cleared at 1 L/day, once and every 7 days:

    >>> single, steady = dose_response(Structure(1), {"CL": [1.0], "V1": [10.0]}, cmt=1,
    ...                                duration=0.0, times=[7.0], intervals=[7.0])
    >>> round(float(single[0, 0]), 6), round(float(steady[0, 0]), 6)
    (0.496585, 0.986434)
    """
    names = structure.parameter_names
    arrays = {k: np.asarray(params[k], dtype=float) for k in names}
    if any(a.ndim > 2 or (a.ndim == 2 and a.shape[1] != 1) for a in arrays.values()):
        raise ValueError("`params` must hold one value per set, shape (S,) or (S, 1)")
    arrays = {k: a.reshape(-1) for k, a in arrays.items()}
    n_sets = max(a.size for a in arrays.values())
    arrays = {k: np.broadcast_to(a, (n_sets,)) for k, a in arrays.items()}
    t = np.asarray(times, dtype=float).reshape(-1)
    tau = np.asarray(intervals, dtype=float).reshape(-1)
    number = float(np.squeeze(0 if cmt is None else cmt))
    if number != int(number):
        raise ValueError(f"`cmt` must be a whole compartment number; got {cmt}")
    cmt = int(number) or 1
    if not 1 <= cmt <= structure.n_states:
        raise ValueError(f"`cmt` must be 1 to {structure.n_states}; got {cmt}")
    duration = float(duration)
    if not (np.isfinite(duration) and np.all(np.isfinite(t)) and np.all(np.isfinite(tau))):
        raise ValueError("`duration`, `times` and `intervals` must be finite")
    if duration < 0 or np.any(t < 0) or np.any(tau <= 0) or np.any(tau < duration):
        raise ValueError("need duration >= 0, times >= 0 and intervals > 0, >= duration")
    modes = decompose(structure.n_compartments, arrays, structure.depot)
    unit = np.zeros((n_sets, structure.n_states))
    unit[:, cmt - 1] = 1.0
    span = np.full(n_sets, float(duration))
    end = _infuse(modes, span, unit / duration) if duration > 0 else unit
    central = structure.central_cmt - 1
    single = np.empty((n_sets, t.size))
    ended = t >= duration
    single[:, ended] = _decay(modes, np.broadcast_to(t[ended] - duration,
                                                     (n_sets, int(ended.sum()))),
                              end)[..., central]
    for k in np.flatnonzero(~ended):  # during the infusion
        single[:, k] = _infuse(modes, np.full(n_sets, t[k]), unit / duration)[:, central]
    if not structure.depot:  # mode by mode: z exp(lam (tau - d)) / (1 - exp(lam tau))
        lam = modes.lam[:, None, :]
        z = _matvec(modes.pinv, end)[:, None, :] * np.exp(lam * (tau[:, None] - duration))
        z /= -np.expm1(lam * tau[:, None])
        return single, np.einsum("sin,sn->si", z, modes.p[:, central, :])
    each = np.repeat(np.arange(n_sets), tau.size)
    every = modes.gather(each)
    tau_each = np.tile(tau, n_sets)
    steady = _propagate(every, tau_each - duration, _geometric(every, tau_each, end[each]))
    return single, steady[:, central].reshape(n_sets, tau.size)


#: Elements (sets x doses x records x modes) superposed in one vectorised step.
_SUPERPOSE_CHUNK = 2_000_000


def _superposition_cheaper(structure: Structure, events: Events, n_sets: int,
                           pairs: int) -> bool:
    """Whether superposing ``pairs`` (set, dose, output record) triples costs less than the
    record-by-record solve of ``n_sets`` sets, by costs measured on the calls of fits,
    forecasts and population steps (benchmarks/README.md): superposition about 0.1 ms plus
    20 ns per pair and mode (three times that with a steady-state dose); the solve about
    0.05 ms plus 15 us per step of its loop (a record, or a run of free records) and, per
    set and mode, 25 ns per record it steps through and 12 ns per record of a free run
    (four times that with a steady-state dose)."""
    n_rec, modes = events.shape[1], structure.n_states
    ev = {name: np.asarray(getattr(events, name)) for name in _RECORD_FIELDS}
    _, ss_specs, reset, schedule = _plain_inputs(structure, events, ev, 1)
    quiet = _quiet(schedule, reset.any(axis=0), ss_specs)
    free = int(np.count_nonzero(quiet[1:] & quiet[:-1]))  # inside a run: no step
    steady = 3.0 if ss_specs else 1.0
    superpose = 1e-4 + 20e-9 * pairs * modes * steady
    solve_cost = (5e-5 + 15e-6 * (n_rec - free)
                  + n_sets * modes * (25e-9 * (n_rec - free) + 12e-9 * free)
                  * (4.0 if ss_specs else 1.0))
    return superpose < solve_cost


def _superpose(structure: Structure, events: Events, modes: Modes, n_sets: int,
               before_events: bool, at: np.ndarray) -> np.ndarray:
    """Central amounts ``(S, K)`` at the records ``at (B, K)`` as sums of each dose's
    response (see :func:`central_amounts`); doses at a record count from that record on
    (after its events) or from the next one (``before_events``). Vectorised over profiles,
    their sets, doses and records, in chunks of profiles."""
    b_count = events.shape[0]
    repeats = n_sets // b_count
    columns = np.flatnonzero(_is_dose(events.evid).any(axis=0))
    if columns.size == 0:
        return np.zeros((n_sets, at.shape[1]))
    n = modes.lam.shape[-1]
    size = max(1, _SUPERPOSE_CHUNK // (repeats * columns.size * at.shape[1] * n))

    def per_profile(a: np.ndarray, rows: slice) -> np.ndarray:  # (S, ...) -> (b, M, ...)
        part = a[rows.start * repeats:rows.stop * repeats]
        return part.reshape((rows.stop - rows.start, repeats) + a.shape[1:])

    parts = []
    for lo in range(0, b_count, size):
        rows = slice(lo, min(lo + size, b_count))
        part = Modes(*(per_profile(a, rows) for a in (modes.lam, modes.p, modes.pinv)),
                      None if modes.ka is None else per_profile(modes.ka, rows))
        amounts = _superpose_profiles(structure, events, part, rows, columns, before_events,
                                      at[rows])
        parts.append(amounts.reshape(-1, at.shape[1]))
    return np.concatenate(parts, axis=0)


def _superpose_profiles(structure: Structure, events: Events, modes: Modes, rows: slice,
                        columns: np.ndarray, before_events: bool,
                        at: np.ndarray) -> np.ndarray:
    """:func:`_superpose` for the profiles ``rows``: ``(b, M, K)``, with ``modes`` of shape
    ``(b, M, ...)``."""
    evid, amt, rate, dur, cmt = (getattr(events, k)[rows][:, columns]
                                 for k in ("evid", "amt", "rate", "dur", "cmt"))
    given = _is_dose(evid) & (amt > 0)  # (b, D)
    cmt = np.where(cmt == 0, 1, cmt).astype(int)
    later = (at[:, None, :] > columns[None, :, None] if before_events
             else at[:, None, :] >= columns[None, :, None])  # (b, D, K)
    active = later & given[:, :, None]
    time = events.time[rows]
    sample = np.take_along_axis(time, at, axis=1)  # (b, K)
    dt = np.where(active, sample[:, None, :] - time[:, columns][:, :, None], 0.0)
    r, length = infusion_rate_and_length(amt, rate, dur)
    index = np.clip(cmt - 1 - int(structure.depot), 0, None)  # (b, D)
    # image[b, m, d, :] = pinv[b, m, :, index[b, d]]
    image = np.take_along_axis(modes.pinv, index[:, None, None, :], axis=3)
    image = np.swapaxes(image, 2, 3)  # (b, M, D, n)
    z = _response(modes, dt[:, None, :, :, None], amt, r, length, image,
                  structure.depot & (cmt == 1))
    steady = given & (events.ss[rows][:, columns] > 0)
    if steady.any():
        tau = np.where(steady, events.ii[rows][:, columns], np.inf)
        z = z + _steady_tail(modes, dt[:, None, :, :, None], amt, r, length, image, tau)
    central = np.einsum("bmdkn,bmn->bmdk", z, modes.p[..., 0, :])
    return np.where(active[:, None], central, 0.0).sum(axis=2)


def _superposable_ss(structure: Structure, events: Events) -> bool:
    """Whether every steady-state dose of ``events`` can be superposed: SS=1 with AMT > 0
    and II > 0, the first dose of its profile (the reset SS=1 implies removes nothing),
    into a disposition compartment, its infusion (if any) over within II (the earlier
    doses it stands for have all ended)."""
    ss = np.asarray(events.ss)
    if not ss.any():
        return True
    dose = _is_dose(np.asarray(events.evid))
    steady = dose & (ss > 0)
    amt, rate, dur, ii = (np.asarray(getattr(events, k)) for k in ("amt", "rate", "dur", "ii"))
    cmt = np.where(np.asarray(events.cmt) == 0, 1, np.asarray(events.cmt))
    with np.errstate(divide="ignore", invalid="ignore"):
        length = np.where(rate > 0, amt / np.where(rate > 0, rate, 1.0), dur)
    first = np.cumsum(dose, axis=1) == 1
    fits = (ss == 1) & (amt > 0) & (ii > 0) & first & (length <= ii) & (rate >= 0)
    if structure.depot:
        fits &= cmt != 1
    return bool(np.all(fits | ~steady))


def _steady_tail(modes: Modes, dt: np.ndarray, amount: np.ndarray, rate: np.ndarray,
                 length: np.ndarray, image: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """What the doses before a steady-state dose (every ``tau (b, D)`` days; inf where
    not at steady state: nothing) add ``dt`` after it, in modal coordinates
    ``(b, M, D, K, n)``. Each has ended (a bolus, or an infusion at ``rate`` for
    ``length`` <= tau), so the sum over m >= 1 of its response m tau earlier is a geometric
    series per mode: ``c exp(lam (dt + tau - length)) / (1 - exp(lam tau))``, ``c`` the
    amount (bolus) or what the infusion left, ``rate * phi(lam, length)``."""
    lam = modes.lam[:, :, None, None, :]
    tau, amount, rate, length = (a[:, None, :, None, None] for a in (tau, amount, rate,
                                                                     length))
    infused = rate > 0
    left = np.where(infused, rate * _phi(lam, length), amount)
    since = dt + tau - np.where(infused, length, 0.0)  # >= 0: length <= tau
    return image[:, :, :, None, :] * left * np.exp(lam * since) / -np.expm1(lam * tau)


def _response(modes: Modes, dt: np.ndarray, amount: np.ndarray, rate: np.ndarray,
              length: np.ndarray, image: np.ndarray, into_depot: np.ndarray) -> np.ndarray:
    """Modal coordinates ``(b, M, D, K, n)`` ``dt (b, 1, D, K, 1)`` after each dose
    ``(b, D)``: a bolus ``amount`` or an infusion at ``rate`` for ``length``, into the
    disposition compartment whose modal image is ``image (b, M, D, n)``, or into the depot
    where ``into_depot``; ``modes`` of shape ``(b, M, ...)``."""
    lam = modes.lam[:, :, None, None, :]
    infused = (rate > 0)[:, None, :, None, None]
    img = image[:, :, :, None, :]
    amount, rate, length = (a[:, None, :, None, None] for a in (amount, rate, length))
    during = np.minimum(dt, length)
    after = np.maximum(dt - length, 0.0)
    if not infused.any():
        z = amount * img * np.exp(lam * dt)
    elif infused.all():
        z = rate * img * _phi(lam, during) * np.exp(lam * after)
    else:
        z = np.where(infused, rate * img * _phi(lam, during) * np.exp(lam * after),
                     amount * img * np.exp(lam * dt))
    if modes.ka is None or not into_depot.any():
        return z
    ka = modes.ka[:, :, None, None, None]
    b = modes.b[:, :, None, None, :]
    bolus = ka * amount * b * exp_divided_difference(lam, -ka, dt)
    held = rate * _phi(-ka, during)  # in the depot when the infusion ends
    running = rate * b * (_phi(lam, during) - exp_divided_difference(lam, -ka, during))
    infusion = (running * np.exp(lam * after)
                + ka * held * b * exp_divided_difference(lam, -ka, after))
    depot = np.where(infused, infusion, bolus)
    return np.where(into_depot[:, None, :, None, None], depot, z)


@dataclass
class _SteadyState:
    """Steady-state dose at one record, per parameter set (masked where not SS)."""

    mask: np.ndarray  # (S,) SS in {1, 2} at this record
    tau: np.ndarray  # (S,) dosing interval (day)
    lag: np.ndarray  # (S,)
    bolus: np.ndarray  # (S, m)
    rate: np.ndarray  # (S, m)
    duration: np.ndarray  # (S,)
    constant: np.ndarray  # (S,) constant infusion at steady state (AMT=0, RATE>0)
    n_past: int  # past doses that may still be arriving at the record (ghost inputs)


def _steady_state(modes: Modes, spec: _SteadyState) -> np.ndarray:
    """The state at the record contributed by the doses before it, for SS records."""
    tau = np.where(spec.mask & ~spec.constant, spec.tau, 1.0)
    lag, dur = spec.lag, spec.duration
    first_bolus = np.maximum(1.0, np.ceil(lag / tau))  # first past bolus already arrived
    x = _propagate(modes, first_bolus * tau - lag, _geometric(modes, tau, spec.bolus))
    if spec.rate.any():
        done = np.maximum(1.0, np.ceil((lag + dur) / tau))  # first infusion already over
        finished = _geometric(modes, tau, _infuse(modes, dur, spec.rate))
        x = x + _propagate(modes, done * tau - lag - dur, finished)
        for m in range(1, spec.n_past + 1):  # infusions still running at the record
            running = (m * tau > lag) & (m < done)
            x = x + _infuse(modes, np.where(running, m * tau - lag, 0.0), spec.rate)
    if spec.constant.any():
        x = np.where(spec.constant[:, None], _steady_infusion(modes, spec.rate), x)
    return np.where(spec.mask[:, None], x, 0.0)


def _build_inputs(
    structure: Structure,
    ev: dict[str, np.ndarray],
    params: dict[str, np.ndarray],
    n_sets: int,
    n_rec: int,
) -> tuple[list[_Input], dict[int, _SteadyState], np.ndarray]:
    """Doses, steady-state specs and reset flags, with per-set modifiers applied.

    Work is done on the columns that hold a dose in some set only.
    """
    evid = ev["evid"]
    dose_all = _is_dose(evid)
    reset = (evid >= 3) | ((ev["ss"] == 1) & dose_all)

    # Record index of the first reset strictly after each record, per set.
    idx = np.where(reset, np.arange(n_rec), n_rec)
    kill = np.minimum.accumulate(idx[:, ::-1], axis=1)[:, ::-1]
    kill = np.concatenate([kill[:, 1:], np.full((n_sets, 1), n_rec)], axis=1)

    columns = np.flatnonzero(dose_all.any(axis=0))
    if columns.size == 0:
        return [], {}, reset
    dose = dose_all[:, columns]
    cmt = np.where(ev["cmt"][:, columns] == 0, 1, ev["cmt"][:, columns]).astype(int)
    amt, ss, ii = ev["amt"][:, columns], ev["ss"][:, columns], ev["ii"][:, columns]
    rate_col, dur_col = ev["rate"][:, columns], ev["dur"][:, columns]
    modifiers = {k: v[:, columns] for k, v in params.items() if is_dose_modifier(k)}
    constant = dose & (ss == 1) & (amt == 0) & (rate_col > 0)

    f = _modifier(modifiers, "F", cmt, 1.0)
    lag = _modifier(modifiers, "ALAG", cmt, 0.0)
    amount = f * amt
    infused = dose & ((rate_col != 0) | (dur_col > 0)) & ~constant
    for code, name in ((-1.0, "R"), (-2.0, "D")):
        needs = infused & (rate_col == code)
        if needs.any():
            cmts = sorted(set(cmt[needs].tolist()))
            absent = [f"{name}{c}" for c in cmts if f"{name}{c}" not in params]
            if absent:
                raise ValueError(f"RATE={int(code)} needs the modelled parameter(s) {absent}")
    modelled_rate = _modifier(modifiers, "R", cmt, 1.0)
    modelled_dur = _modifier(modifiers, "D", cmt, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = np.select(
            [rate_col > 0, dur_col > 0, rate_col == -1, rate_col == -2],
            [rate_col, amount / np.where(dur_col > 0, dur_col, 1.0), modelled_rate,
             amount / modelled_dur],
            0.0,
        )
        duration = np.where(rate > 0, amount / np.where(rate > 0, rate, 1.0), 0.0)
    rate = np.where(infused, rate, 0.0)
    duration = np.where(infused, duration, 0.0)
    bolus_amount = np.where(dose & ~infused & ~constant, amount, 0.0)

    onehot = np.zeros(cmt.shape + (structure.n_states,))
    np.put_along_axis(onehot, (cmt - 1)[..., None], 1.0, axis=-1)
    bolus_vec = bolus_amount[..., None] * onehot
    rate_vec = np.where(constant, rate_col, rate)[..., None] * onehot

    time = ev["time"][:, columns]
    start = time + lag
    inputs: list[_Input] = []
    ss_specs: dict[int, _SteadyState] = {}
    for c, k in enumerate(columns):
        inputs.append(_Input(k, start[:, c], start[:, c] + duration[:, c], bolus_vec[:, c],
                             np.where(constant[:, c, None], 0.0, rate_vec[:, c]), kill[:, k]))
        ss_mask = dose[:, c] & (ss[:, c] > 0)
        if not ss_mask.any():
            continue
        tau = np.where(ss_mask & ~constant[:, c], ii[:, c], 1.0)
        reach = lag[:, c] + duration[:, c]
        span = np.max(np.where(ss_mask, reach / tau, 0.0))
        if not span <= MAX_SS_SPAN:
            raise DatasetError(f"a steady-state dose (record {k}) keeps arriving for {span:.3g} "
                               f"dosing intervals (lag plus infusion over II); at most "
                               f"{MAX_SS_SPAN:g} are superposed")
        n_past = int(np.ceil(span))
        ss_specs[k] = _SteadyState(ss_mask, tau, lag[:, c], bolus_vec[:, c], rate_vec[:, c],
                                   duration[:, c], constant[:, c], n_past)
        for m in range(1, n_past + 1):  # past doses still arriving after the record
            ghost_start = time[:, c] - m * tau + lag[:, c]
            ghost_bolus = bolus_vec[:, c] * ss_mask[:, None]
            ghost_rate = np.where((ss_mask & ~constant[:, c])[:, None], rate_vec[:, c], 0.0)
            inputs.append(_Input(k, ghost_start, ghost_start + duration[:, c], ghost_bolus,
                                 ghost_rate, kill[:, k], ghost=True))
    return inputs, ss_specs, reset


def _schedule(inputs: list[_Input], times: np.ndarray, n_rec: int) -> dict:
    """For each record, the inputs that act in the interval ending there (in some set).

    Keys ``k`` list (by index) inputs acting within ``(t[k-1], t[k]]`` (given at an
    earlier record); keys ``("now", k)`` list doses given at record ``k`` itself; key
    ``"reached"`` is ``(R,)``, whether an input acts in the interval ending at each
    record or is given at it.
    """
    schedule: dict = {k: [] for k in range(n_rec)}
    reached = np.zeros(n_rec, dtype=bool)
    prev = np.concatenate([times[:, :1], times[:, :-1]], axis=1)
    records = np.arange(n_rec)
    for j, inp in enumerate(inputs):
        window = (records > inp.record) & (records <= inp.kill.max())
        cols = np.flatnonzero(window)
        if cols.size:
            t, tp = times[:, cols], prev[:, cols]
            start, end = inp.start[:, None], inp.end[:, None]
            acts = (records[cols] <= inp.kill[:, None]) & (
                ((start < t) & (end > tp)) | ((start > tp) & (start <= t)))
            for k in cols[acts.any(axis=0)]:
                schedule[k].append(j)
            reached[cols[acts.any(axis=0)]] = True
        if not inp.ghost and inp.bolus.any():
            schedule.setdefault(("now", inp.record), []).append(j)
            reached[inp.record] = True
    schedule["reached"] = reached
    return schedule


def at_rows(events: Events, values: np.ndarray, n_rows: int) -> np.ndarray:
    """Values per record, ``(S, R)``, put back on the rows of the original table.

    Implied ADDL doses and padding are dropped. With ``B = S`` profiles (one parameter
    set per profile) the result has shape ``(n_rows,)``; with one shared profile
    (``B = 1``) it has shape ``(S, n_rows)``.

    Examples
    --------
    >>> ev = expand_records([0.0, 7.0], [1, 0], [100.0, 0.0], ii=[3.5, 0], addl=[1, 0])
    >>> at_rows(ev, np.array([[1.0, 2.0, 3.0]]), 2).tolist()
    [[1.0, 3.0]]
    """
    keep = events.source_row >= 0
    if events.shape[0] == 1:
        out = np.full((values.shape[0], n_rows), np.nan)
        out[:, events.source_row[0, keep[0]]] = values[:, keep[0]]
        return out
    out = np.full(n_rows, np.nan)
    out[events.source_row[keep]] = values[keep]
    return out

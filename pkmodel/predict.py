"""Prediction and simulation: DataFrame in, DataFrame out.

* :func:`predict`: PRED, IPRED and the individual parameters on every record.
* :func:`predict_troughs`: the concentration just before each dose.
* :func:`simulate`: virtual patients with IIV, IOV and residual error, vectorised.
* :func:`make_cohort`: covariates of virtual patients drawn from stated distributions.
* :func:`with_samples`: records with sample rows added on a time grid (NOCB covariates).
* :func:`draw_concentrations`: concentrations of validated tables for many ETA draws.
* :func:`concentrations_after`: what one ID's doses leave at later days, for many draws.
* :func:`to_events`: a validated table as the engine's events (the bridge between the
  pandas layer and the numpy engine).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from pkmodel.data import fail_where, plain_json, validate, with_columns
from pkmodel.engine import (
    Events,
    Structure,
    at_rows,
    central_amounts,
    is_reset,
)
from pkmodel.errors import CovariateError, DatasetError
from pkmodel.model import PopulationModel, check_covariates, evaluate_parameters

__all__ = ["make_cohort", "predict", "predict_troughs", "simulate", "with_samples"]


def to_events(
    data: pd.DataFrame,
    structure: Structure,
    *,
    covariates: str = "nocb",
) -> Events:
    """Convert a validated table into engine :class:`~pkmodel.engine.Events`, one profile per ID.

    Parameters
    ----------
    data : DataFrame
        Output of :func:`validate`.
    structure : Structure
        The model's compartments: dose CMT must exist, observation CMT must be 0 or the
        central compartment.
    covariates : {"nocb", "locf"}
        Which record's parameters govern the interval before a record: ``"nocb"``
        (NONMEM's rule, the next record's) or ``"locf"`` (the previous record's).

    Returns
    -------
    Events
        Padded to the longest ID; ``param_row`` and ``source_row`` index rows of ``data``
        by position.

    Examples
    --------
    >>> from pkmodel.data import validate
    >>> table = validate(pd.DataFrame({"ID": [1, 1, 2], "TIME": [0.0, 7.0, 0.0],
    ...                                "AMT": [100.0, 0.0, 50.0]}))
    >>> to_events(table, Structure(1)).shape
    (2, 2)
    """
    if covariates not in ("nocb", "locf"):
        raise ValueError(f"`covariates` must be 'nocb' or 'locf'; got {covariates!r}")
    cmt = data["CMT"].to_numpy()
    evid = data["EVID"].to_numpy()
    dose = (evid == 1) | (evid == 4)
    fail_where(data, "CMT", dose & (cmt > structure.n_states),
               f"a dose compartment between 1 and {structure.n_states} for this model", cmt)
    fail_where(data, "CMT", (evid == 0) & (cmt != 0) & (cmt != structure.central_cmt),
               f"0 or {structure.central_cmt} (the central compartment) on observation records",
               cmt)
    ids = data["ID"].to_numpy()
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    stops = np.r_[starts[1:], len(data)]
    columns = {c: data[c].to_numpy() for c in ("TIME", "EVID", "AMT", "RATE", "DUR", "II",
                                                "ADDL", "SS", "CMT")}
    return _events_of_ids(columns, starts, stops, covariates)


def _events_of_ids(columns: dict[str, np.ndarray], starts: np.ndarray, stops: np.ndarray,
                   covariates: str) -> Events:
    """:func:`to_events` for all IDs at once (as :func:`~pkmodel.engine.expand_records`
    and :func:`~pkmodel.engine.stack_events` ID by ID): each ID's records in file order
    with the doses ADDL implies among them, padded with the last time and parameters
    repeated, EVID 2, no dose and no source row."""
    n_rows = len(columns["TIME"])
    profile_of_row = np.repeat(np.arange(len(starts)), stops - starts)
    src, time, original = np.arange(n_rows), np.asarray(columns["TIME"], dtype=float), None
    if np.any(columns["ADDL"] > 0):
        implied_src, implied_time, m = _implied_doses(columns, profile_of_row, stops)
        src = np.concatenate([src, implied_src])
        time = np.concatenate([time, implied_time])
        group = np.r_[np.ones(n_rows, dtype=int), np.zeros(implied_src.size, dtype=int)]
        # by ID and time; implied doses before records at their time; then row and dose
        order = np.lexsort((np.r_[np.zeros(n_rows, dtype=int), m], src, group, time,
                           profile_of_row[src]))
        src, time, original = src[order], time[order], group[order] == 1
    profile = profile_of_row[src]
    counts = np.bincount(profile, minlength=len(starts))
    first = np.r_[0, np.cumsum(counts)[:-1]]
    position = np.arange(src.size) - first[profile]
    last = first + counts - 1
    at = np.repeat(last[:, None], int(counts.max()), axis=1)  # padding takes the last
    at[profile, position] = np.arange(src.size)
    real = np.zeros(at.shape, dtype=bool)
    real[profile, position] = True
    fields = {}
    for name, column in (("evid", "EVID"), ("amt", "AMT"), ("rate", "RATE"), ("dur", "DUR"),
                         ("ii", "II"), ("ss", "SS"), ("cmt", "CMT")):
        values = np.asarray(columns[column], dtype=float)[src]
        if original is not None and name in ("evid", "ss"):  # implied: plain doses
            values = np.where(original, values, 1.0 if name == "evid" else 0.0)
        fields[name] = np.where(real, values[at], 2.0 if name == "evid" else 0.0)
    param = src if original is None else _governing_rows(src, original, profile, covariates)
    source = src if original is None else np.where(original, src, -1)
    return Events(time=time[at], **fields, param_row=param[at],
                  source_row=np.where(real, source[at], -1), covariates=covariates)


def _implied_doses(columns: dict[str, np.ndarray], profile_of_row: np.ndarray,
                   stops: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The doses ADDL implies, all IDs at once: their rows, times and numbers (dose ``m`` of
    a row at ``TIME + m II``), none after the first reset (EVID 3 or 4, or an SS dose) of
    the row's ID after it; one at the reset's time is given, then reset."""
    evid = columns["EVID"]
    reset = np.flatnonzero(is_reset(evid, columns["SS"]))
    rows = np.flatnonzero(columns["ADDL"] > 0)
    following = np.searchsorted(reset, rows, side="right")
    nxt = np.append(reset, len(evid))[following]
    time = np.asarray(columns["TIME"], dtype=float)
    within = nxt < stops[profile_of_row[rows]]
    stop = np.where(within, time[np.minimum(nxt, len(evid) - 1)], np.inf)
    ii = np.asarray(columns["II"], dtype=float)
    count = columns["ADDL"][rows].astype(int)
    finite = np.isfinite(stop)  # no more doses made than can come before the reset
    reach = np.floor((stop[finite] - time[rows[finite]]) / ii[rows[finite]]) + 1
    count[finite] = np.minimum(count[finite], np.maximum(reach, 0).astype(int))
    src = np.repeat(rows, count)
    m = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count) + 1
    implied = time[src] + m * ii[src]
    kept = implied <= np.repeat(stop, count)
    return src[kept], implied[kept], m[kept]


def _governing_rows(src: np.ndarray, original: np.ndarray, profile: np.ndarray,
                    covariates: str) -> np.ndarray:
    """The row whose parameters govern each record up to it (sorted records of all IDs):
    its own for a table row; for an implied dose, the next row of its ID (NOCB; the
    ID's last after its last row) or the previous one (LOCF)."""
    positions = np.flatnonzero(original)
    every = np.arange(src.size)
    if covariates == "nocb":
        nxt = np.minimum(np.searchsorted(positions, every, side="left"), positions.size - 1)
        last = positions[np.searchsorted(profile[positions], profile, side="right") - 1]
        governing = np.where(profile[positions[nxt]] == profile, positions[nxt], last)
    else:  # an ID's first row if none of its rows comes before (II below TIME's precision)
        prv = positions[np.maximum(np.searchsorted(positions, every, side="right") - 1, 0)]
        first = positions[np.searchsorted(profile[positions], profile, side="left")]
        governing = np.where(profile[prv] == profile, prv, first)
    return np.where(original, src, src[governing])


def _prepare(model: PopulationModel, data: pd.DataFrame, covariates: str,
             needed: tuple[str, ...] | None = None) -> tuple[pd.DataFrame, Events]:
    """Validate ``data`` (with the covariates ``needed``, default all) and build events."""
    names = model.covariate_names if needed is None else needed
    table = validate(data, covariates=names)
    check_covariates(model, table, names=names)
    return table, to_events(table, model.structure, covariates=covariates)


def _per_row(events: Events, values: np.ndarray, n_rows: int) -> np.ndarray:
    out = at_rows(events, values, n_rows)
    return out[0] if events.shape[0] == 1 else out


def _parameters(model: PopulationModel, table: pd.DataFrame, eta: Any
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Population and individual parameters per row, ``(N,)`` each (the same object
    without ETAs); both in one evaluation of the equations."""
    cov = {c: table[c].to_numpy(dtype=float) for c in model.covariate_names}
    n = len(table)
    if eta is None:
        values = evaluate_parameters(model, cov)
        population = {k: np.broadcast_to(v, (n,)) for k, v in values.items()}
        return population, population
    rows = _eta_rows(model, table, eta)
    both = evaluate_parameters(model, cov, np.stack([np.zeros_like(rows), rows]))
    both = {k: np.broadcast_to(v, (2, n)) for k, v in both.items()}
    return {k: v[0] for k, v in both.items()}, {k: v[1] for k, v in both.items()}


def _eta_rows(model: PopulationModel, table: pd.DataFrame, eta: Any) -> np.ndarray | None:
    """ETAs per row of ``table`` from a DataFrame by ID or an (n_ids, n_eta) array."""
    if eta is None:
        return None
    row_of_id, unique_ids = pd.factorize(table["ID"].to_numpy())  # order of appearance
    names = list(model.eta_names)
    if isinstance(eta, pd.DataFrame):
        missing_cols = [n for n in names if n not in eta.columns]
        if missing_cols:
            raise ValueError(f"`eta` lacks columns {missing_cols}; {model.name} has {names}")
        index = pd.Index(eta["ID"]) if "ID" in eta.columns else eta.index
        if isinstance(index, pd.MultiIndex):  # the level named ID, else the first
            index = index.get_level_values("ID" if "ID" in index.names else 0)
        used = np.flatnonzero(index.isin(unique_ids))  # rows for IDs of the table
        index = index[used]
        if not index.is_unique:
            twice = index[index.duplicated()][0]
            raise ValueError(f"`eta` has more than one row for ID {plain_json(twice)!r}")
        where = index.get_indexer(unique_ids)
        if (where < 0).any():
            raise ValueError(f"`eta` has no row for ID {plain_json(unique_ids[where < 0][0])!r}")
        values = np.column_stack([eta[n].to_numpy(dtype=float) for n in names]
                                 or [np.empty((len(eta), 0))])[used[where]]
    else:
        values = np.atleast_2d(np.asarray(eta, dtype=float))
        if values.shape != (len(unique_ids), len(names)):
            raise ValueError(f"`eta` must have shape ({len(unique_ids)}, {len(names)}) (IDs in "
                             f"order of appearance x {names}); got {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("`eta` must be finite")
    return values[row_of_id]


def _central_concentration(model: PopulationModel, events: Events,
                           row_params: Mapping[str, np.ndarray], *,
                           before_events: bool = False) -> np.ndarray:
    """Central concentration (mg/L) per record, ``(S, R)``: one profile with ``S`` parameter
    sets per row, or ``S`` profiles with one set each."""
    conc = profile_concentrations(model, events, row_params, before_events=before_events)
    return conc.reshape(-1, events.shape[1])


def profile_concentrations(model: PopulationModel, events: Events,
                           row_params: Mapping[str, np.ndarray], *,
                           before_events: bool = False,
                           at: np.ndarray | None = None) -> np.ndarray:
    """Central concentrations (mg/L), ``(B, M, R)``: every record of ``B`` profiles for
    ``M`` parameter sets each, from parameters per table row ``(M, N)``; with ``at``
    (``(B, K)`` record indices per profile) at those records only, ``(B, M, K)``."""
    b_count, n_rec = events.shape
    arrays = {k: np.atleast_2d(v) for k, v in row_params.items()}
    m_count = max(a.shape[0] for a in arrays.values())
    per_set = {k: np.swapaxes(np.take(a if a.shape[0] == m_count
                                      else np.broadcast_to(a, (m_count, a.shape[1])),
                                      events.param_row, axis=1), 0, 1)
               .reshape(b_count * m_count, n_rec) for k, a in arrays.items()}
    amounts = central_amounts(model.structure, events, per_set,
                              before_events=before_events, at=at)
    volume = per_set["V1"] if at is None else np.take_along_axis(
        per_set["V1"], np.repeat(at, m_count, axis=0), axis=1)
    return (amounts / volume).reshape(b_count, m_count, -1)


def predict(
    model: PopulationModel,
    data: pd.DataFrame,
    eta: pd.DataFrame | np.ndarray | None = None,
    *,
    covariates: str = "nocb",
) -> pd.DataFrame:
    """Population (PRED) and individual (IPRED) predictions on every record, for every ID.

    Parameters
    ----------
    model : PopulationModel
        For example ``pkmodel.models.load("fasanmade2011")``.
    data : DataFrame
        NONMEM-style records (see :mod:`pkmodel.data`) with the model's covariates.
    eta : DataFrame or ndarray, optional
        Individual ETAs: a DataFrame with an ``ID`` column (or index) and one column per
        ETA name, one row per ID of ``data`` (rows of other IDs are ignored), or an array
        ``(n_ids, n_eta)`` with IDs in order of appearance. Omitted: IPRED equals PRED.
        IOV KAPPAs are zero (forecasting).
    covariates : {"nocb", "locf"}
        Which record's covariates govern the interval before a record (NONMEM: NOCB).

    Returns
    -------
    DataFrame
        The validated records with PRED and IPRED (mg/L; after each record's events) and
        the individual parameters (L/day, L) as columns.

    Examples
    --------
    >>> from pkmodel.data import infliximab_regimen
    >>> from pkmodel.models import load
    >>> table = infliximab_regimen(28.0, until_week=14,
    ...                            covariates={"ALB": 3.3, "ATI": 0, "IMM": 1})
    >>> out = predict(load("fasanmade2011"), table)
    >>> round(float(out["IPRED"].iloc[-1]), 3)  # week-14 trough, mg/L (solve_ivp: 1.557)
    1.557
    """
    table, events = _prepare(model, data, covariates)
    return predict_validated(model, table, events, eta)


def predict_validated(model: PopulationModel, table: pd.DataFrame, events: Events,
                      eta: pd.DataFrame | np.ndarray | None) -> pd.DataFrame:
    """:func:`predict` on a table already validated and converted to ``events``."""
    return with_columns(table, prediction_columns(model, table, events, eta))


def prediction_columns(model: PopulationModel, table: pd.DataFrame, events: Events,
                       eta: pd.DataFrame | np.ndarray | None) -> dict[str, np.ndarray]:
    """The columns :func:`predict_validated` adds: PRED, IPRED and the individual
    parameters, per row of ``table``."""
    population, individual = _parameters(model, table, eta)
    n = len(table)
    if eta is None:
        pred = _per_row(events, _central_concentration(model, events, population), n)
        ipred = pred
    else:  # one engine call: two parameter sets per profile
        both = {k: np.stack([population[k], individual[k]]) for k in population}
        conc = profile_concentrations(model, events, both)
        pred, ipred = _per_row(events, conc[:, 0], n), _per_row(events, conc[:, 1], n)
    return {"PRED": pred, "IPRED": ipred, **individual}


def draw_concentrations(model: PopulationModel, tables: list[pd.DataFrame], eta: np.ndarray,
                        ) -> list[np.ndarray]:
    """Concentrations ``(M, N_i)`` on the rows of each validated table, for every row of
    ``eta (M, n_eta)`` (KAPPAs 0): all tables in one engine call, for forecasts over
    posterior draws.

    Examples
    --------
    >>> from pkmodel.data import infliximab_regimen, validate
    >>> from pkmodel.models import load
    >>> table = validate(infliximab_regimen(28.0, until_week=14,
    ...                  covariates={"ALB": 3.3, "ATI": 0, "IMM": 1}))
    >>> (conc,) = draw_concentrations(load("fasanmade2011"), [table], np.zeros((2, 3)))
    >>> conc.shape, round(float(conc[0, -1]), 3)
    ((2, 6), 1.557)
    """
    frame = tables[0] if len(tables) == 1 else pd.concat(tables, ignore_index=True)
    events = to_events(frame, model.structure)
    cov = {c: frame[c].to_numpy(dtype=float) for c in model.covariate_names}
    params = evaluate_parameters(model, cov, eta[:, None, :])
    params = {k: np.broadcast_to(v, (eta.shape[0], len(frame))) for k, v in params.items()}
    conc = profile_concentrations(model, events, params)  # (B, M, R), one profile per ID
    values = np.full((eta.shape[0], len(frame)), np.nan)
    for b in range(events.shape[0]):
        keep = events.source_row[b] >= 0
        values[:, events.source_row[b, keep]] = conc[b][:, keep]
    bounds = np.cumsum([0] + [t.shape[0] for t in tables])
    return [values[:, lo:hi] for lo, hi in itertools.pairwise(bounds)]


def concentrations_after(model: PopulationModel, table: pd.DataFrame, eta: np.ndarray,
                         days: np.ndarray) -> np.ndarray:
    """Concentrations (mg/L) ``(M, D)`` at ``days`` (none before the last record) of one
    ID's validated ``table``, from its doses (additional doses it implies included), for
    every row of ``eta (M, n_eta)`` (KAPPAs 0), the last record's covariates holding after
    it: as if sample rows carrying them were added. The days join the engine's records of
    ``table`` as samples, so nothing is built or evaluated per day: what a forecast asks
    of the doses already given.

    Examples
    --------
    >>> from pkmodel.data import infliximab_regimen, validate
    >>> from pkmodel.models import load
    >>> table = validate(infliximab_regimen(28.0, until_week=6,
    ...                  covariates={"ALB": 3.3, "ATI": 0, "IMM": 1}))
    >>> conc = concentrations_after(load("fasanmade2011"), table, np.zeros((1, 3)),
    ...                             np.array([98.0]))
    >>> round(float(conc[0, 0]), 3)
    1.557
    """
    days = np.asarray(days, dtype=float).reshape(-1)
    events = to_events(table, model.structure)
    last = float(table["TIME"].to_numpy(dtype=float).max())
    if events.shape[0] != 1 or (days.size and days.min() < last):
        raise ValueError(f"`table` must be one ID and `days` at or after its last record "
                         f"(day {last:g})")
    if days.size == 0:
        return np.empty((np.shape(eta)[0], 0))
    # A sample comes after the records at its time (implied doses among them), in order.
    order = np.argsort(np.concatenate([events.time[0], days]), kind="stable")
    n_rec, count = events.shape[1], days.size

    def merged(values: np.ndarray, fill: float) -> np.ndarray:
        return np.concatenate([values[0], np.full(count, fill, dtype=values.dtype)])[order][None]

    extended = Events(time=np.concatenate([events.time[0], days])[order][None],
                      evid=merged(events.evid, 0), amt=merged(events.amt, 0),
                      rate=merged(events.rate, 0), dur=merged(events.dur, 0),
                      ii=merged(events.ii, 0), ss=merged(events.ss, 0),
                      cmt=merged(events.cmt, 0),
                      param_row=merged(events.param_row, len(table) - 1),
                      source_row=merged(events.source_row, -1), covariates=events.covariates)
    cov = {c: table[c].to_numpy(dtype=float) for c in model.covariate_names}
    params = evaluate_parameters(model, cov, eta[:, None, :])
    params = {k: np.broadcast_to(v, (eta.shape[0], len(table))) for k, v in params.items()}
    at = np.argsort(order)[n_rec:]  # where each day went
    return profile_concentrations(model, extended, params, at=at[None, :])[0]


def with_samples(table: pd.DataFrame, times: Any, covariates: Any = (), *,
                 before: float | None = None) -> pd.DataFrame:
    """Each ID's records with a sample record (EVID 2, MDV 1) at every time of ``times``.

    A sample comes after the records at its time (before them at the time ``before``, the
    end of a window), and carries the covariates of the next record (NONMEM's NOCB: they
    govern the time up to it; the last record's after it). The column SAMPLE holds each
    added row's position in ``times`` and -1 on the table's own rows.

    Examples
    --------
    >>> table = pd.DataFrame({"ID": 1, "TIME": [0.0, 10.0], "AMT": [100.0, 0.0],
    ...                       "EVID": [1, 2], "WT": [20.0, 30.0]})
    >>> out = with_samples(table, [5.0, 12.0], ["WT"])
    >>> out[["TIME", "WT", "SAMPLE"]].to_numpy().tolist()
    [[0.0, 20.0, -1.0], [5.0, 30.0, 0.0], [10.0, 30.0, -1.0], [12.0, 30.0, 1.0]]
    """
    times = np.asarray(times, dtype=float)
    covariates = list(covariates)
    zero = [c for c in ("AMT", "RATE", "DUR", "II", "ADDL", "SS", "CMT") if c in table]
    parts = []
    for ident, rows in table.groupby("ID", sort=False):
        added = pd.DataFrame({c: np.repeat(rows[c].iloc[-1], times.size) for c in rows})
        added = added.assign(ID=ident, TIME=times, EVID=2.0, MDV=1.0, DV=np.nan,
                             **{c: 0.0 for c in zero})
        both = pd.concat([rows.assign(SAMPLE=-1), added.assign(SAMPLE=np.arange(times.size))],
                         ignore_index=True)
        sample = both["SAMPLE"].to_numpy() >= 0
        first = sample & (before is not None) & np.isclose(
            both["TIME"].to_numpy(), before if before is not None else 0.0)
        both = both.iloc[np.lexsort((np.where(first, -1, sample.astype(int)),
                                     both["TIME"].to_numpy()))].reset_index(drop=True)
        if covariates:
            hide = np.broadcast_to((both["SAMPLE"].to_numpy() >= 0)[:, None],
                                   (len(both), len(covariates)))
            both[covariates] = both[covariates].astype(float).mask(hide).bfill().ffill()
        parts.append(both)
    return pd.concat(parts, ignore_index=True)


def predict_troughs(
    model: PopulationModel,
    data: pd.DataFrame,
    eta: pd.DataFrame | np.ndarray | None = None,
    *,
    covariates: str = "nocb",
) -> pd.DataFrame:
    """The concentration just before each dose (additional ADDL doses included).

    Parameters are those of :func:`predict`.

    Returns
    -------
    DataFrame
        One row per dose: ID, TIME (day), AMT (mg), ADDL_DOSE (True for a dose implied by
        ADDL), PRED and IPRED (mg/L) just before the dose. The first dose's trough is 0
        unless it is a steady-state dose.

    Examples
    --------
    >>> from pkmodel.data import infliximab_regimen
    >>> from pkmodel.models import load
    >>> table = infliximab_regimen(28.0, until_week=22,
    ...                            covariates={"ALB": 3.3, "ATI": 0, "IMM": 1})
    >>> troughs = predict_troughs(load("fasanmade2011"), table)
    >>> troughs[["TIME", "IPRED"]].round(3).to_numpy().tolist()  # solve_ivp agrees
    [[0.0, 0.0], [14.0, 13.273], [42.0, 6.642], [98.0, 1.557]]
    """
    table, events = _prepare(model, data, covariates)
    population, individual = _parameters(model, table, eta)
    pred = _central_concentration(model, events, population, before_events=True)
    ipred = pred if eta is None else _central_concentration(model, events, individual,
                                                            before_events=True)
    dose = ((events.evid == 1) | (events.evid == 4)) & (events.amt > 0)
    rows = events.param_row[dose]
    return pd.DataFrame({
        "ID": table["ID"].to_numpy()[rows],
        "TIME": events.time[dose],
        "AMT": events.amt[dose],
        "ADDL_DOSE": events.source_row[dose] < 0,
        "PRED": pred[dose],
        "IPRED": ipred[dose],
    })


def make_cohort(
    n: int,
    distributions: Mapping[str, Any],
    *,
    seed: int | np.random.Generator | None = None,
) -> pd.DataFrame:
    """Covariates of ``n`` virtual patients, one row each, drawn as stated.

    Parameters
    ----------
    n : int
        Number of virtual patients.
    distributions : mapping of column name to value
        Per covariate: a number (the same for all), an array of ``n`` values, a frozen
        ``scipy.stats`` distribution (sampled with its ``rvs``), or a callable
        ``f(rng, n)`` returning ``n`` values. Drawn in the mapping's order.
    seed : int or Generator, optional
        Same seed, same cohort.

    Returns
    -------
    DataFrame
        Columns ID (1..n) and the covariates.

    Examples
    --------
    >>> from scipy import stats
    >>> cohort = make_cohort(3, {"WT": stats.uniform(30, 4), "ALB": 3.0, "IMM": 1}, seed=1)
    >>> cohort.columns.tolist(), cohort["ALB"].tolist()
    (['ID', 'WT', 'ALB', 'IMM'], [3.0, 3.0, 3.0])
    """
    if int(n) != n or n < 1:
        raise ValueError(f"`n` must be a positive whole number; got {n!r}")
    rng = np.random.default_rng(seed)
    columns: dict[str, np.ndarray] = {"ID": np.arange(1, n + 1)}
    for name, spec in distributions.items():
        if hasattr(spec, "rvs"):
            values = spec.rvs(size=n, random_state=rng)
        elif callable(spec):
            values = spec(rng, n)
        else:
            values = np.broadcast_to(np.asarray(spec, dtype=float), (n,))
        values = np.asarray(values, dtype=float)
        if values.shape != (n,):
            raise ValueError(f"covariate {name!r} gave shape {values.shape}; expected ({n},)")
        columns[name] = values.copy()
    return pd.DataFrame(columns)


def dosing_occasions(table: pd.DataFrame) -> np.ndarray:
    """Occasion index (0-based, counted within each ID) of each row: the rank of its OCC
    among the ID's OCC values (in increasing order) if given, else its dosing interval
    (rows before the first dose belong to the first). An OCC missing on a row is an error.

    Examples
    --------
    >>> table = pd.DataFrame({"ID": [1, 1, 1, 2, 2], "EVID": [1, 0, 1, 1, 0]})
    >>> dosing_occasions(table).tolist()
    [0, 0, 1, 0, 0]
    """
    ids = table["ID"].to_numpy()
    first = np.r_[True, ids[1:] != ids[:-1]][:ids.size]  # the first row of each ID
    if "OCC" in table.columns:
        occ = table["OCC"].to_numpy()
        # a row without one would join whichever occasion a missing value sorts into
        fail_where(table, "OCC", pd.isna(occ), "an occasion number on every row (OCC sets "
                   "the occasions of IOV; give it everywhere or drop the column)", occ)
        _, code = np.unique(occ, return_inverse=True)
        group = np.cumsum(first)
        order = np.lexsort((code, group))
        group, code = group[order], code[order]
        new_group = np.r_[True, group[1:] != group[:-1]]
        new_value = new_group | np.r_[True, code[1:] != code[:-1]]
        dense = np.cumsum(new_value) - 1
        rank = dense - np.maximum.accumulate(np.where(new_group, dense, 0))
        out = np.empty(len(order), dtype=int)
        out[order] = rank
        return out
    evid = table["EVID"].to_numpy()
    dose = (evid == 1) | (evid == 4)
    doses = np.cumsum(dose)
    before = np.maximum.accumulate(np.where(first, doses - dose, 0))  # of the IDs above
    return np.maximum(doses - before - 1, 0)


def simulate(
    model: PopulationModel,
    data: pd.DataFrame,
    cohort: pd.DataFrame | None = None,
    *,
    n: int | None = None,
    seed: int | np.random.Generator | None = None,
    residual: bool = True,
    iov: bool = True,
    dose_per_kg: bool = False,
    covariates: str = "nocb",
) -> pd.DataFrame:
    """Simulate virtual patients: IIV, IOV and residual error on every observation record.

    Parameters
    ----------
    model : PopulationModel
    data : DataFrame
        The regimen as NONMEM-style records. With ``cohort``, one ID (a template every
        virtual patient follows); without, every ID is simulated ``n`` times with its own
        (possibly time-varying) covariates.
    cohort : DataFrame, optional
        One row per virtual patient with the model's covariates (constant in time) and
        optionally an ID column; see :func:`make_cohort`.
    n : int, optional
        Replicates per ID when there is no cohort (default 1).
    seed : int or Generator, optional
        Same seed, same numbers.
    residual : bool
        Add residual error to DV (DV = IPRED + SD * eps; for a log-additive model
        DV = IPRED * exp(SD * eps)). Additive error can give negative DV, as in NONMEM.
    iov : bool
        Draw one KAPPA per occasion (OCC if given, else each dosing interval).
    dose_per_kg : bool
        AMT (and RATE) in the regimen are per kg: each patient's concentrations are
        scaled by their WT (exact, by linearity).
    covariates : {"nocb", "locf"}

    Returns
    -------
    DataFrame
        Observation records (EVID 0) of every virtual patient: ID, SOURCE_ID (the regimen
        ID), TIME, IPRED and DV (mg/L), the ETAs, and the covariates.

    Examples
    --------
    >>> from pkmodel.data import infliximab_regimen
    >>> from pkmodel.models import load
    >>> regimen = infliximab_regimen(1.0, until_week=14).drop(columns="WT")
    >>> cohort = make_cohort(500, {"WT": 30.0, "ALB": 3.0, "ATI": 0, "IMM": 1}, seed=2)
    >>> sims = simulate(load("fasanmade2011"), regimen, cohort, seed=3, dose_per_kg=True)
    >>> week14 = sims[sims.TIME == 98.0]
    >>> len(week14), bool(week14.IPRED.median() < 2.0)
    (500, True)
    """
    rng = np.random.default_rng(seed)
    if cohort is not None:
        if n is not None and n != len(cohort):
            raise ValueError(f"`n` ({n}) differs from the cohort's {len(cohort)} rows")
        both = [c for c in model.covariate_names if c in data.columns and c in cohort.columns]
        if both:
            raise CovariateError(f"covariate(s) {both} given both in `data` and in `cohort`; "
                                 "give each in one place")
        ids = cohort["ID"].to_numpy() if "ID" in cohort.columns else np.arange(1, len(cohort) + 1)
        in_cohort = tuple(c for c in model.covariate_names if c in cohort.columns)
        check_covariates(model, cohort.assign(ID=ids), names=in_cohort)
        from_data = tuple(c for c in model.covariate_names if c not in in_cohort)
        table, events = _prepare(model, data, covariates, needed=from_data)
        if table["ID"].nunique() != 1:
            raise DatasetError("with a `cohort`, `data` must hold one ID (the regimen every "
                               f"virtual patient follows); got {table['ID'].nunique()} IDs")
        cov = {c: (cohort[c].to_numpy(dtype=float)[:, None] if c in cohort.columns
                   else table[c].to_numpy(dtype=float)) for c in model.covariate_names}
        parts = [_simulate_id(model, table, events, cov, ids, rng, residual=residual, iov=iov,
                              dose_per_kg=dose_per_kg)]
    else:
        replicates = 1 if n is None else n
        if int(replicates) != replicates or replicates < 1:
            raise ValueError(f"`n` must be a positive whole number; got {n!r}")
        table, events = _prepare(model, data, covariates)
        parts = []
        next_id = 1
        ids_col = table["ID"].to_numpy()
        starts = np.flatnonzero(np.r_[True, ids_col[1:] != ids_col[:-1]])
        stops = np.r_[starts[1:], len(table)]
        for lo, hi in zip(starts, stops):
            rows = table.iloc[lo:hi].reset_index(drop=True)
            ev = to_events(rows, model.structure, covariates=covariates)
            cov = {c: rows[c].to_numpy(dtype=float) for c in model.covariate_names}
            ids = np.arange(next_id, next_id + replicates)
            next_id += replicates
            parts.append(_simulate_id(model, rows, ev, cov, ids, rng, residual=residual,
                                      iov=iov, dose_per_kg=dose_per_kg))
    return pd.concat(parts, ignore_index=True)


def _simulate_id(
    model: PopulationModel,
    table: pd.DataFrame,
    events: Events,
    cov: dict[str, np.ndarray],
    ids: np.ndarray,
    rng: np.random.Generator,
    *,
    residual: bool,
    iov: bool,
    dose_per_kg: bool,
) -> pd.DataFrame:
    """Simulate ``len(ids)`` patients on the records of one ID (events with B = 1)."""
    n_pat = len(ids)
    n_eta = len(model.eta_names)
    eta = rng.multivariate_normal(np.zeros(n_eta), model.omega, size=n_pat, method="eigh")
    kappa = None
    if iov and model.iov:
        occ = dosing_occasions(table)
        sd = np.sqrt(np.array(list(model.iov.values())))
        draws = rng.standard_normal((n_pat, occ.max() + 1, len(sd))) * sd
        kappa = draws[:, occ]
    row_params = evaluate_parameters(model, cov, eta[:, None, :], kappa)
    row_params = {k: np.broadcast_to(v, (n_pat, len(table))) for k, v in row_params.items()}
    conc = _central_concentration(model, events, row_params)
    obs_rows = np.flatnonzero(table["EVID"].to_numpy() == 0)
    ipred = at_rows(events, conc, len(table))[:, obs_rows]
    if dose_per_kg:
        wt = np.broadcast_to(cov["WT"], (n_pat, len(table)))
        if np.any(wt != wt[:, :1]):
            raise CovariateError("`dose_per_kg` needs a weight constant in time per patient")
        ipred = ipred * wt[:, :1]
    out: dict[str, Any] = {
        "ID": np.repeat(ids, len(obs_rows)),
        "SOURCE_ID": table["ID"].iloc[0],
        "TIME": np.tile(table["TIME"].to_numpy()[obs_rows], n_pat),
        "IPRED": ipred.ravel(),
    }
    if residual:
        eps = rng.standard_normal(ipred.shape)
        sd = model.residual.sd(ipred)
        dv = ipred * np.exp(sd * eps) if model.residual.log_scale else ipred + sd * eps
        out["DV"] = dv.ravel()
    for i, name in enumerate(model.eta_names):
        out[name] = np.repeat(eta[:, i], len(obs_rows))
    for name in model.covariate_names:
        values = np.broadcast_to(cov[name], (n_pat, len(table)))[:, obs_rows]
        out[name] = values.ravel()
    return pd.DataFrame(out)

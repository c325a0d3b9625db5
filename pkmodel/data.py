"""NONMEM-style event tables: reading, validation, and conversion to engine events.

A dataset is a pandas DataFrame with one row per record and NONMEM's uppercase columns
``ID, TIME, AMT, RATE, DUR, II, ADDL, SS, EVID, MDV, CMT, DV`` (optional ``LLOQ``, ``ULOQ``,
``OCC``);
any other uppercase column is a covariate (``WT`` kg, ``ALB`` g/dL, ...). Units: TIME in
days, AMT in mg, RATE in mg/day, DV in mg/L.

:func:`validate` checks a table once, at the public boundary, and returns a standardised
copy with every NONMEM column present; every error names the column, the row (0-based
position in the table) and the ID, and says what was expected. Nothing is dropped,
reordered or converted between units. (:func:`pkmodel.predict.to_events` turns a validated
table into the engine's events: this module stays above the engine in the layers.)
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from pkmodel.errors import CovariateError, DatasetError

__all__ = [
    "NONMEM_COLUMNS",
    "JsonDocument",
    "check_concentrations",
    "days_since",
    "dose_amount",
    "dose_times",
    "dosing_table",
    "from_clinical",
    "infliximab_regimen",
    "plain_json",
    "read_clinical",
    "read_nonmem",
    "validate",
]

#: Columns with NONMEM's meaning, in NONMEM's order.
NONMEM_COLUMNS = ("ID", "TIME", "AMT", "RATE", "DUR", "II", "ADDL", "SS", "EVID", "MDV",
                  "CMT", "DV")
_OPTIONAL = ("LLOQ", "ULOQ", "OCC")
_DEFAULT_ZERO = ("AMT", "RATE", "DUR", "II", "ADDL", "SS", "CMT")
_INTEGER = ("EVID", "MDV", "ADDL", "SS", "CMT")
#: Longest steady-state infusion, in dosing intervals: its overlapping past doses are
#: superposed one by one, so memory and time grow with this number.
MAX_SS_SPAN = 1000.0
#: Magnitudes no dose, rate, interval or concentration reaches in any unit a model uses
#: (a picogram to a tonne in mg): values outside are data errors, and would overflow.
SMALLEST_DOSE, LARGEST_VALUE = 1e-9, 1e12
#: Most additional (ADDL) doses one record may imply: a daily dose for 270 years. Each
#: implied dose becomes a record, so more is a data error that would exhaust memory.
MAX_ADDL = 100_000


class JsonDocument:
    """``to_json()`` for a result class with a ``to_dict()`` of plain JSON types."""

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def to_json(self, **kwargs: Any) -> str:
        """:meth:`to_dict` as a JSON string (``kwargs`` go to :func:`json.dumps`)."""
        return json.dumps(self.to_dict(), **kwargs)


def read_nonmem(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a NONMEM data file (comma-separated, ``.`` meaning missing).

    Parameters
    ----------
    path : str or path-like
        File with a header line of column names.

    Returns
    -------
    DataFrame
        The records in file order, unvalidated; pass it to :func:`validate` or to any
        public function.

    Raises
    ------
    DatasetError
        For an empty file, a file that is not UTF-8 text or not a table, and a column
        name given twice.

    Examples
    --------
    >>> import io
    >>> read_nonmem(io.StringIO("ID,TIME,AMT,DV\\n1,0,100,.\\n1,1,0,4.2\\n"))
       ID  TIME  AMT   DV
    0   1     0  100  NaN
    1   1     1    0  4.2
    """
    return _read_csv(path)


def read_clinical(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a clinical dosing or lab table (for :func:`from_clinical`): DATE and TIME kept
    as text, ``.`` or blank meaning missing; the same errors as :func:`read_nonmem`."""
    return _read_csv(path, dtype={"DATE": str, "TIME": str})


def _read_csv(path: str | os.PathLike[str], **options: Any) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, na_values=["."], skipinitialspace=True, **options)
    except pd.errors.EmptyDataError:
        raise DatasetError(f"{path}: the file is empty (expected a header line of column "
                           "names, then one row per record)") from None
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: byte {err.start} is not UTF-8 text; save the file as "
                           "UTF-8 (plain CSV)") from None
    except pd.errors.ParserError as err:
        raise DatasetError(f"{path}: not a comma-separated table ({err})") from None
    names = [str(c) for c in table.columns]
    duplicated = [c for c in names if "." in c and c.rsplit(".", 1)[0] in names
                  and c.rsplit(".", 1)[1].isdigit()]
    if duplicated:
        original = duplicated[0].rsplit(".", 1)[0]
        raise DatasetError(f"column '{original}' appears more than once in the header; keep "
                           "one (pkmodel never guesses which)")
    return table


def plain_json(value: Any) -> Any:
    """Plain JSON types: numpy scalars to Python, timestamps to ISO 8601, NaN and
    infinities to None, in nested dicts, lists and tuples.

    Examples
    --------
    >>> plain_json({"a": np.float64(1.5), "b": [np.nan, np.int64(2)]})
    {'a': 1.5, 'b': [None, 2]}
    """
    if isinstance(value, dict):
        return {k: plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _where(data: pd.DataFrame, bad: np.ndarray) -> str:
    """'row 12 (ID 3)' for the first offending row, and how many others there are."""
    rows = np.flatnonzero(bad)
    first = rows[0]
    ident = data["ID"].iloc[first] if "ID" in data.columns else "?"
    if isinstance(ident, float) and ident.is_integer():
        ident = int(ident)
    more = f" and {rows.size - 1} other row(s)" if rows.size > 1 else ""
    return f"row {first} (ID {ident}){more}"


def float_columns(table: pd.DataFrame, names: Iterable[str]) -> np.ndarray:
    """The columns ``names`` of ``table`` as one float array ``(rows, len(names))``: a few
    taken column by column (about 9 us each; selecting columns of a frame of mixed types
    first copies them into a new frame, about 90 us), many in one selection.

    Examples
    --------
    >>> frame = pd.DataFrame({"ID": ["a", "b"], "ETA_CL": [0.1, -0.2], "ETA_V": [0, 1]})
    >>> float_columns(frame, ["ETA_V", "ETA_CL"]).tolist()
    [[0.0, 0.1], [1.0, -0.2]]
    >>> float_columns(frame, []).shape
    (2, 0)
    """
    names = list(names)
    if not names:
        return np.empty((len(table), 0))
    if len(names) > 10 and table.columns.is_unique:
        where = table.columns.get_indexer(names)
        if (where >= 0).all():  # a missing name raises below, as a column of its own
            return table.iloc[:, where].to_numpy(dtype=float)
    return np.column_stack([table[name].to_numpy(dtype=float) for name in names])


def with_columns(table: pd.DataFrame, columns: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """A copy of ``table`` with ``columns`` set: those it has replaced in place, the others
    appended in order; built in one step (setting columns one by one copies per column).
    The index, column index, ``attrs`` and flags are those of ``table``."""
    if not table.columns.is_unique:  # a name twice: set column by column
        out = table.copy()
        for name, values in columns.items():
            out[name] = values
        return out
    appended = [name for name in columns if name not in table.columns]
    if len(appended) == len(columns):  # only new columns: one concatenation
        out = pd.concat([table, pd.DataFrame(dict(columns), index=table.index)], axis=1)
    else:
        data = {name: columns[name] if name in columns else table[name]
                for name in table.columns}
        data.update((name, columns[name]) for name in appended)
        out = pd.DataFrame(data, index=table.index)
    out.columns = table.columns.append(pd.Index(appended, dtype=object)) if appended \
        else table.columns
    out.attrs = copy.deepcopy(table.attrs)
    out.flags.allows_duplicate_labels = table.flags.allows_duplicate_labels
    return out


def fail_where(data: pd.DataFrame, column: str, bad: np.ndarray, expected: str,
               values: np.ndarray | None = None) -> None:
    """Raise a DatasetError naming ``column``, the first row where ``bad`` holds, its ID,
    what was ``expected`` and the value found; nothing when no row is bad."""
    if not np.any(bad):
        return
    got = ""
    if values is not None:
        value = values[np.flatnonzero(bad)[0]]
        got = f"; got {value.item() if isinstance(value, np.generic) else value!r}"
    first = int(np.flatnonzero(bad)[0])
    ident = data["ID"].iloc[first] if "ID" in data.columns else None
    raise DatasetError(f"column '{column}', {_where(data, bad)}: expected {expected}{got}",
                       column=column, row=first, id=plain_json(ident))


def _numeric(data: pd.DataFrame, column: str) -> np.ndarray:
    raw = data[column]
    if isinstance(raw.dtype, np.dtype) and raw.dtype.kind in "iuf":  # already numbers
        return raw.to_numpy(dtype=float)
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=float)
    fail_where(data, column, np.isnan(values) & raw.notna().to_numpy(), "a number",
               raw.to_numpy())
    return values


def validate(
    data: pd.DataFrame,
    *,
    covariates: Iterable[str] = (),
) -> pd.DataFrame:
    """Check a NONMEM-style event table and return a standardised copy.

    Missing optional columns get NONMEM's defaults: AMT, RATE, DUR, II, ADDL, SS and CMT
    zero (CMT 0 is the default compartment), and a missing value (``.``) in them reads as
    0, as NONMEM reads it; EVID 1 where AMT > 0, else 2 where MDV = 1, else 0; MDV 1 on
    non-observation records and where there is no DV column.

    Parameters
    ----------
    data : DataFrame
        One row per record, NONMEM's uppercase columns, IDs in contiguous blocks, TIME
        (day) non-decreasing within each ID.
    covariates : iterable of str
        Covariate columns that must be present and finite on every row.

    Returns
    -------
    DataFrame
        A copy with all of :data:`NONMEM_COLUMNS` as floats (ID as in the input), rows
        and index unchanged.

    Raises
    ------
    DatasetError
        Naming the column, the first offending row and its ID, and what was expected.
    CovariateError
        When a required covariate column is missing or not finite.

    Examples
    --------
    >>> table = pd.DataFrame({"ID": [1, 1], "TIME": [0.0, 56.0], "AMT": [140.0, 0.0],
    ...                       "DV": [None, 4.1]})
    >>> validate(table)[["EVID", "MDV", "CMT"]].to_numpy().tolist()
    [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    >>> validate(table.assign(TIME=[0.0, -1.0]))
    Traceback (most recent call last):
    ...
    pkmodel.errors.DatasetError: column 'TIME', row 1 (ID 1): expected TIME non-decreasing within an ID (records are processed in file order); got -1.0
    """
    if not isinstance(data, pd.DataFrame):
        raise TypeError(f"`data` must be a pandas DataFrame; got {type(data).__name__}")
    if len(data) == 0:
        raise DatasetError("the table has no rows")
    out = data
    for column in ("ID", "TIME"):
        if column not in out.columns:
            near = [c for c in out.columns if str(c).upper() == column]
            hint = f" (found {near[0]!r}: NONMEM column names are uppercase)" if near else ""
            raise DatasetError(f"column '{column}' is missing{hint}")
    lower = [c for c in out.columns if str(c).upper() in NONMEM_COLUMNS + _OPTIONAL
             and str(c) != str(c).upper()]
    if lower:
        raise DatasetError(f"column {lower[0]!r} must be written in uppercase "
                           f"({str(lower[0]).upper()!r}), as NONMEM's columns are")
    covariates = tuple(covariates)
    named = set(NONMEM_COLUMNS + _OPTIONAL + covariates)
    twice = [c for c in out.columns[out.columns.duplicated()] if c in named]
    if twice:
        raise DatasetError(f"column '{twice[0]}' appears more than once: which one holds the "
                           "values is ambiguous; keep one", column=str(twice[0]))
    fail_where(out, "ID", out["ID"].isna().to_numpy(), "an ID on every row", out["ID"].to_numpy())

    ids = out["ID"].to_numpy()
    starts = np.r_[True, ids[1:] != ids[:-1]]
    block_ids = ids[starts]
    repeated = pd.Series(block_ids).duplicated().to_numpy()
    if repeated.any():
        ident = block_ids[np.flatnonzero(repeated)[0]]
        row = np.flatnonzero(starts)[np.flatnonzero(repeated)[0]]
        raise DatasetError(
            f"column 'ID', row {row} (ID {ident}): expected each ID's records in one "
            "contiguous block; this ID appears again after other IDs (NONMEM would treat "
            "it as a new individual). Sort by ID without reordering times, or renumber."
        )

    values: dict[str, np.ndarray] = {}
    for column in NONMEM_COLUMNS[1:] + _OPTIONAL:
        if column in out.columns:
            values[column] = _numeric(out, column)
    n = len(out)
    time = values["TIME"]
    fail_where(out, "TIME", ~np.isfinite(time), "a finite time (day)", time)
    for column in _DEFAULT_ZERO:
        if column not in values:
            values[column] = np.zeros(n)
        # NONMEM reads '.' (missing) as 0 in these columns.
        values[column] = np.where(np.isnan(values[column]), 0.0, values[column])
        fail_where(out, column, ~np.isfinite(values[column]), "a finite number",
                   values[column])
    has_dv = "DV" in values
    if not has_dv:
        values["DV"] = np.full(n, np.nan)
    if "EVID" not in values:
        if "MDV" in values:
            values["EVID"] = np.where(values["AMT"] > 0, 1.0,
                                      np.where(values["MDV"] == 1, 2.0, 0.0))
        else:
            values["EVID"] = np.where(values["AMT"] > 0, 1.0, 0.0)
    if "MDV" not in values:
        observed = (values["EVID"] == 0) & has_dv
        values["MDV"] = np.where(observed, 0.0, 1.0)
    for column in _INTEGER:
        v = values[column]
        fail_where(out, column, ~np.isfinite(v) | (v != np.round(v)), "a whole number", v)

    evid, amt, rate, dur = values["EVID"], values["AMT"], values["RATE"], values["DUR"]
    ii, addl, ss, cmt, mdv = (values[c] for c in ("II", "ADDL", "SS", "CMT", "MDV"))
    dose = (evid == 1) | (evid == 4)
    constant = dose & (ss == 1) & (amt == 0) & (rate > 0)
    fail_where(out, "EVID", ~np.isin(evid, [0, 1, 2, 3, 4]),
               "0 (observation), 1 (dose), 2 (other), 3 (reset) or 4 (reset and dose)", evid)
    fail_where(out, "MDV", ~np.isin(mdv, [0, 1]), "0 or 1", mdv)
    fail_where(out, "MDV", (evid != 0) & (mdv != 1), "MDV = 1 on non-observation records", mdv)
    fail_where(out, "AMT", amt < 0, "a non-negative amount (mg)", amt)
    fail_where(out, "AMT", dose & (amt <= 0) & ~constant,
               "AMT > 0 on dose records (EVID 1 or 4), except SS=1 constant infusions "
               "(AMT=0, RATE>0)", amt)
    fail_where(out, "AMT", ~dose & (amt != 0), "AMT = 0 on records that are not doses", amt)
    fail_where(out, "AMT", (amt != 0) & ((amt < SMALLEST_DOSE) | (amt > LARGEST_VALUE)),
               f"an amount between {SMALLEST_DOSE:g} and {LARGEST_VALUE:g} (no dose in any "
               "unit lies outside)", amt)
    for column, v in (("RATE", rate), ("DUR", dur), ("II", ii)):
        fail_where(out, column, v > LARGEST_VALUE,
                   f"at most {LARGEST_VALUE:g} (a larger value is a data error)", v)
    fail_where(out, "RATE", (rate < 0) & (rate != -1) & (rate != -2),
               "a rate > 0 (mg/day), 0 (bolus), -1 (modelled rate) or -2 (modelled duration)",
               rate)
    fail_where(out, "RATE", ~dose & (rate != 0), "RATE = 0 on records that are not doses", rate)
    fail_where(out, "DUR", dur < 0, "a non-negative duration (day)", dur)
    fail_where(out, "DUR", (dur > 0) & (rate != 0),
               "DUR = 0 where RATE is given (one or the other)",
               dur)
    fail_where(out, "DUR", ~dose & (dur != 0), "DUR = 0 on records that are not doses", dur)
    fail_where(out, "II", ii < 0, "a non-negative dosing interval (day)", ii)
    fail_where(out, "ADDL", addl < 0, "a non-negative number of additional doses", addl)
    fail_where(out, "ADDL", addl > MAX_ADDL,
               f"at most {MAX_ADDL:,} additional doses on one record (each becomes a record)",
               addl)
    fail_where(out, "ADDL", (addl > 0) & ~dose, "ADDL = 0 on records that are not doses", addl)
    fail_where(out, "II", (addl > 0) & (ii <= 0), "II > 0 where ADDL > 0", ii)
    fail_where(out, "SS", ~np.isin(ss, [0, 1, 2]), "0, 1 or 2", ss)
    fail_where(out, "SS", (ss > 0) & ~dose, "SS = 0 on records that are not doses", ss)
    fail_where(out, "II", (ss > 0) & (ii <= 0) & ~constant,
               "II > 0 on steady-state doses (SS 1 or 2)", ii)
    fail_where(out, "II", constant & (ii != 0), "II = 0 on a steady-state constant infusion", ii)
    fail_where(out, "SS", (ss == 2) & (amt == 0), "SS=2 only with AMT > 0", ss)
    with np.errstate(divide="ignore", invalid="ignore"):
        length = np.where(rate > 0, amt / np.where(rate > 0, rate, 1.0), dur)
        spans = np.where((ss > 0) & (ii > 0), length / np.where(ii > 0, ii, 1.0), 0.0)
    fail_where(out, "RATE" if "RATE" in data.columns else "DUR", ~(spans <= MAX_SS_SPAN),
               f"a steady-state infusion lasting at most {MAX_SS_SPAN:g} dosing intervals "
               "(AMT/RATE or DUR over II); longer ones overlap without bound", length)
    fail_where(out, "CMT", cmt < 0, "a compartment number >= 0", cmt)
    fail_where(out, "DV", has_dv & (evid == 0) & (mdv == 0) & np.isnan(values["DV"]),
               "a DV on observation records (EVID 0, MDV 0); give it or set MDV = 1",
               values["DV"])
    fail_where(out, "DV", np.abs(values["DV"]) > LARGEST_VALUE,
               f"a finite DV of at most {LARGEST_VALUE:g} in magnitude, or missing",
               values["DV"])
    for limit in ("LLOQ", "ULOQ"):
        if limit in values:
            fail_where(out, limit, (mdv == 0) & ~(values[limit] > 0)
                       & ~np.isnan(values[limit]), f"a positive {limit} or missing",
                       values[limit])
    if "LLOQ" in values and "ULOQ" in values:
        fail_where(out, "ULOQ", values["ULOQ"] <= values["LLOQ"], "ULOQ above LLOQ",
                   values["ULOQ"])

    ids_per_row = out["ID"].to_numpy()
    same_id = np.r_[False, ids_per_row[1:] == ids_per_row[:-1]]
    back = np.r_[False, time[1:] < time[:-1]] & same_id
    fail_where(out, "TIME", back,
               "TIME non-decreasing within an ID (records are processed in file order)", time)

    covariate_values = {}
    for name in covariates:
        if name not in out.columns:
            raise CovariateError(f"column '{name}' is missing: the model needs covariate "
                                 f"{name}")
        raw = out[name]
        cov = (raw.to_numpy(dtype=float) if isinstance(raw.dtype, np.dtype)
               and raw.dtype.kind in "iuf" else  # numbers already: no conversion
               pd.to_numeric(raw, errors="coerce").to_numpy(dtype=float))
        bad = ~np.isfinite(cov)
        if bad.any():
            raise CovariateError(
                f"column '{name}', {_where(out, bad)}: expected a finite covariate value on "
                f"every record (covariates apply between records); got "
                f"{out[name].iloc[np.flatnonzero(bad)[0]]!r}"
            )
        covariate_values[name] = cov

    standard = {c: values[c] for c in NONMEM_COLUMNS[1:]}
    standard.update((c, values[c]) for c in _OPTIONAL if c in values)
    return with_columns(data, {**covariate_values, **standard})


# --------------------------------------------------------------------------- regimens

#: Label infusion duration of infliximab (h).
INFUSION_HOURS = 2.0


def dose_amount(weight: float, mg_per_kg: float, *, vial_mg: float | None = None) -> float:
    """A weight-based dose in mg, optionally rounded to the nearest whole vial.

    Parameters
    ----------
    weight : float
        Body weight (kg).
    mg_per_kg : float
        Dose (mg/kg).
    vial_mg : float, optional
        Vial size (mg); infliximab comes in 100-mg vials. Halves round up; at least one
        vial is given.

    Examples
    --------
    >>> dose_amount(28.0, 5.0)
    140.0
    >>> dose_amount(28.0, 5.0, vial_mg=100)
    100.0
    >>> dose_amount(31.0, 5.0, vial_mg=100)
    200.0
    """
    for name, value in (("weight", weight), ("mg_per_kg", mg_per_kg)):
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"`{name}` must be positive; got {value!r}")
    mg = float(weight * mg_per_kg)
    if vial_mg is None:
        return mg
    if vial_mg <= 0:
        raise ValueError(f"`vial_mg` must be positive; got {vial_mg!r}")
    return float(max(1.0, np.floor(mg / vial_mg + 0.5)) * vial_mg)


def days_since(dates: Iterable[object], origin: object) -> np.ndarray:
    """Calendar dates (or date-times) as days after ``origin``.

    Examples
    --------
    >>> days_since(["2026-01-05", "2026-01-19 12:00"], "2026-01-05").tolist()
    [0.0, 14.5]
    """
    start = _timestamp(origin, "`origin`")
    stamps = [_timestamp(d, f"`dates` entry {i}") for i, d in enumerate(dates)]
    return np.array([(d - start) / pd.Timedelta(days=1) for d in stamps], dtype=float)


def _timestamp(value: object, what: str) -> pd.Timestamp:
    try:
        stamp = pd.Timestamp(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        stamp = pd.NaT
    if pd.isna(stamp):
        raise ValueError(f"{what} is not a date: {value!r}")
    return stamp


def dosing_table(
    amounts: Iterable[float] | float,
    *,
    times: Iterable[float] | None = None,
    dates: Iterable[object] | None = None,
    origin: object | None = None,
    infusion_hours: float | None = INFUSION_HOURS,
    troughs: bool = True,
    end: float | None = None,
    id: int = 1,
    covariates: dict[str, float] | None = None,
) -> pd.DataFrame:
    """A NONMEM-style table for one patient: doses, and a sample before each dose.

    Parameters
    ----------
    amounts : float or iterable of float
        Dose per administration (mg); one value for all or one per dose.
    times : iterable of float, optional
        Dose times (day). Give ``times`` or ``dates``.
    dates : iterable of date-like, optional
        Calendar dates of the doses, converted to days after ``origin`` (default: the
        first date).
    origin : date-like, optional
        Day 0 when ``dates`` are given.
    infusion_hours : float or None
        Infusion duration (h); None for IV bolus. RATE is written in mg/day.
    troughs : bool
        Add an observation record (MDV 1, no DV) just before each dose after the first,
        in file order, so predictions there are pre-dose troughs.
    end : float, optional
        Add an observation record at this time (day), for example the end of follow-up.
    id : int
        Patient ID.
    covariates : dict, optional
        Covariate columns with constant values (``{"WT": 28, "ALB": 3.3}``).

    Returns
    -------
    DataFrame
        Columns ID, TIME, EVID, AMT, RATE, CMT, MDV and the covariates.

    Examples
    --------
    >>> dosing_table(140.0, times=[0, 14], covariates={"WT": 28.0})
       ID  TIME  EVID    AMT    RATE  CMT  MDV    WT
    0   1   0.0     1  140.0  1680.0    1    1  28.0
    1   1  14.0     0    0.0     0.0    1    1  28.0
    2   1  14.0     1  140.0  1680.0    1    1  28.0
    """
    if (times is None) == (dates is None):
        raise ValueError("give exactly one of `times` (day) or `dates`")
    if dates is not None:
        dates = list(dates)
        t = days_since(dates, origin if origin is not None else dates[0])
    else:
        t = np.asarray(list(times), dtype=float)  # type: ignore[arg-type]
    if t.size == 0 or not np.all(np.isfinite(t)):
        raise ValueError("dose times must be finite and at least one")
    if np.any(np.diff(t) <= 0):
        raise ValueError(f"dose times must increase; got {t.tolist()}")
    amt = np.broadcast_to(np.asarray(amounts, dtype=float), t.shape)
    if np.any(~np.isfinite(amt) | (amt <= 0)):
        raise ValueError(f"`amounts` must be positive (mg); got {amt.tolist()}")
    if infusion_hours is not None and not infusion_hours > 0:
        raise ValueError(f"`infusion_hours` must be positive or None; got {infusion_hours!r}")
    rate = amt / (infusion_hours / 24.0) if infusion_hours is not None else np.zeros_like(amt)
    rows = []
    for i, (ti, ai, ri) in enumerate(zip(t, amt, rate)):
        if troughs and i > 0:
            rows.append((ti, 0, 0.0, 0.0))
        rows.append((ti, 1, ai, ri))
    if end is not None:
        if end < t[-1]:
            raise ValueError(f"`end` ({end}) must not precede the last dose ({t[-1]})")
        rows.append((float(end), 0, 0.0, 0.0))
    table = pd.DataFrame(rows, columns=["TIME", "EVID", "AMT", "RATE"])
    table.insert(0, "ID", id)
    table["CMT"] = 1
    table["MDV"] = 1
    for name, value in (covariates or {}).items():
        table[name] = float(value)
    return table


def infliximab_regimen(
    weight: float,
    mg_per_kg: float = 5.0,
    *,
    every_weeks: float = 8.0,
    induction_weeks: Iterable[float] = (0.0, 2.0, 6.0),
    until_week: float = 54.0,
    vial_mg: float | None = None,
    start: object | None = None,
    id: int = 1,
    covariates: dict[str, float] | None = None,
) -> pd.DataFrame:
    """The infliximab label schedule: induction at weeks 0, 2, 6, then every N weeks.

    2-h infusions (label), a trough sample before every dose after the first and one at
    ``until_week``. Doses are ``weight * mg_per_kg`` mg, optionally rounded to whole
    vials. Label: 5 mg/kg at weeks 0, 2 and 6, then every 8 weeks
    (shared/reference/dosing_and_targets.md).

    Parameters
    ----------
    weight : float
        Body weight (kg); also written to a WT column.
    mg_per_kg : float
        Dose (mg/kg).
    every_weeks : float
        Maintenance interval (weeks) after the last induction dose.
    induction_weeks : iterable of float
        Induction dose times (weeks).
    until_week : float
        Last week of the schedule: doses before it, a (trough) sample at it.
    vial_mg : float, optional
        Round each dose to whole vials of this size (mg), for example 100.
    start : date-like, optional
        Calendar date of the first dose; a DATE column is added.
    id : int
        Patient ID.
    covariates : dict, optional
        Other constant covariates (``{"ALB": 3.3, "IMM": 1, "ATI": 0}``).

    Examples
    --------
    >>> table = infliximab_regimen(28.0, vial_mg=100, until_week=22)
    >>> table[table.EVID == 1][["TIME", "AMT"]].to_numpy().tolist()
    [[0.0, 100.0], [14.0, 100.0], [42.0, 100.0], [98.0, 100.0]]
    >>> table[["TIME", "EVID"]].iloc[-1].tolist()
    [154.0, 0.0]
    """
    weeks = [float(w) for w in induction_weeks]
    if every_weeks <= 0:
        raise ValueError(f"`every_weeks` must be positive; got {every_weeks!r}")
    next_week = weeks[-1] + every_weeks
    while next_week < until_week - 1e-9:
        weeks.append(next_week)
        next_week += every_weeks
    amount = dose_amount(weight, mg_per_kg, vial_mg=vial_mg)
    table = dosing_table(amount, times=[7.0 * w for w in weeks], end=7.0 * until_week,
                         id=id, covariates={"WT": weight, **(covariates or {})})
    if start is not None:
        table.insert(2, "DATE", pd.Timestamp(start) + pd.to_timedelta(table["TIME"], unit="D"))
    return table


# --------------------------------------------------------------------------- clinical input

#: Columns of the clinical tables that are not covariates.
_CLINICAL_DOSE_COLUMNS = ("ID", "DATE", "TIME", "DOSE_MG", "INFUSION_HOURS")
_CLINICAL_SAMPLE_COLUMNS = ("ID", "DATE", "TIME", "DV", "LLOQ")
#: Calendar dates must be ISO 8601 (no day/month ambiguity); clock times HH:MM[:SS].
_ISO_DATE = r"\d{4}-\d{2}-\d{2}([ T]\d{1,2}:\d{2}(:\d{2})?)?"
_CLOCK = r"\d{1,2}:\d{2}(:\d{2})?"
#: Clock time given to a record that has a date only and nothing on that day to anchor it.
_MIDDAY = pd.Timedelta(hours=12)


def dose_times(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Every dose time of a validated table, explicit and implied by ADDL, and the row each
    comes from, record by record (a record's ADDL doses follow it).

    Examples
    --------
    >>> table = validate(pd.DataFrame({"ID": 1, "TIME": [0.0, 10.0], "AMT": [5.0, 0.0],
    ...                                "II": [4.0, 0.0], "ADDL": [2, 0]}))
    >>> dose_times(table)
    (array([0., 4., 8.]), array([0, 0, 0]))
    """
    evid = table["EVID"].to_numpy()
    dose = (evid == 1) | (evid == 4)
    count = table["ADDL"].to_numpy()[dose].astype(int) + 1  # doses per record
    first = np.repeat(np.cumsum(count) - count, count)
    k = np.arange(int(count.sum())) - first  # 0 for the record's own dose, then its ADDL
    times = (np.repeat(table["TIME"].to_numpy(dtype=float)[dose], count)
             + k * np.repeat(table["II"].to_numpy(dtype=float)[dose], count))
    return times, np.repeat(np.asarray(table.index)[dose], count)


def check_concentrations(table: pd.DataFrame) -> None:
    """Raise where a measured concentration cannot be one.

    A measured record (EVID 0, MDV 0) needs a finite DV > 0 (mg/L), unless it has an
    LLOQ: then DV below the LLOQ (0 included) marks a sample below the assay's limit.

    Parameters
    ----------
    table : DataFrame
        A validated table (:func:`validate`).

    Raises
    ------
    DatasetError
        Naming the column, row and ID.

    Examples
    --------
    >>> table = validate(pd.DataFrame({"ID": [1, 1], "TIME": [0.0, 56.0],
    ...                                "AMT": [140.0, 0.0], "DV": [None, -2.0]}))
    >>> check_concentrations(table)
    Traceback (most recent call last):
    ...
    pkmodel.errors.DatasetError: column 'DV', row 1 (ID 1): expected a measured concentration > 0 (mg/L); a sample below the assay's limit needs its LLOQ (column LLOQ); got -2.0
    """
    measured = (table["EVID"].to_numpy() == 0) & (table["MDV"].to_numpy() == 0)
    dv = table["DV"].to_numpy(dtype=float)
    fail_where(table, "DV", measured & ~np.isfinite(dv), "a finite measured concentration (mg/L)",
               dv)
    lloq = (table["LLOQ"].to_numpy(dtype=float) if "LLOQ" in table.columns
            else np.full(len(table), np.nan))
    fail_where(table, "DV", measured & (dv <= 0) & ~(lloq > 0),
               "a measured concentration > 0 (mg/L); a sample below the assay's limit needs its "
               "LLOQ (column LLOQ)", dv)


def _stamps(table: pd.DataFrame, what: str) -> tuple[pd.Series, np.ndarray]:
    """Date-times of a clinical table's rows and whether each had a clock time."""
    if "DATE" not in table.columns:
        raise DatasetError(f"{what} table: column 'DATE' is missing (YYYY-MM-DD)")
    dates = table["DATE"].astype(str).str.strip()
    times = (table["TIME"].fillna("").astype(str).str.strip() if "TIME" in table.columns
             else pd.Series([""] * len(table), index=table.index))
    bad_date = ~dates.str.fullmatch(_ISO_DATE).to_numpy()
    bad_time = ~(times.str.fullmatch(_CLOCK) | (times == "")).to_numpy()
    for column, bad, value in (("DATE", bad_date, dates), ("TIME", bad_time, times)):
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            expected = ("a date YYYY-MM-DD (optionally with HH:MM)" if column == "DATE"
                        else "a clock time HH:MM, or blank")
            raise DatasetError(f"{what} table, column '{column}', row {row}: expected "
                               f"{expected}; got {value.iloc[row]!r}")
    has_time = (times != "").to_numpy() | dates.str.contains(":").to_numpy()
    text = np.where(times != "", dates + " " + times, dates)
    stamps = pd.Series([_parse_stamp(t) for t in text], dtype="datetime64[ns]")
    bad = stamps.isna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DatasetError(f"{what} table, column 'DATE'/'TIME', row {row}: expected a date "
                           f"(YYYY-MM-DD) and an optional time (HH:MM); got {text[row]!r}")
    return stamps, has_time


def _parse_stamp(text: str) -> pd.Timestamp:
    try:
        return pd.Timestamp(text)
    except (TypeError, ValueError):
        return pd.NaT


def _clinical_number(table: pd.DataFrame, column: str, what: str, expected: str
                     ) -> np.ndarray:
    """A numeric column of a clinical table; blank is missing, anything else must be a
    number (``<0.4`` or ``0,8`` is an error naming the row, never a silent blank)."""
    raw = table[column]
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=float)
    text = raw.astype(str).str.strip()
    bad = np.isnan(values) & raw.notna().to_numpy() & ~text.isin(["", ".", "nan"]).to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DatasetError(f"{what} table, column '{column}', row {row}: expected {expected}; "
                           f"got {raw.iloc[row]!r}")
    return values


def _anchor_times(dose_at: pd.Series, dose_timed: np.ndarray, sample_at: pd.Series,
                  sample_timed: np.ndarray, notes_dose: list[str],
                  notes_sample: list[str], measured: np.ndarray
                  ) -> tuple[pd.Series, pd.Series]:
    """Clock times for records with a date only (each assumption noted on its record).

    A dose without a time follows that day's timed sample, else starts at 12:00; a sample
    without a time is the pre-dose trough of that day's dose, else taken at 12:00.
    """
    dose_at, sample_at = dose_at.copy(), sample_at.copy()
    for i in np.flatnonzero(~dose_timed):
        day = dose_at[i].normalize()
        same = [sample_at[j] for j in np.flatnonzero(sample_timed)
                if sample_at[j].normalize() == day]
        if same:
            dose_at[i] = max(same)
            notes_dose[i] = (f"dose on {day.date()} had no time: taken as given right after "
                             f"the sample at {dose_at[i]:%H:%M}")
        else:
            dose_at[i] = day + _MIDDAY
            notes_dose[i] = f"dose on {day.date()} had no time: taken as 12:00"
    for j in np.flatnonzero(~sample_timed):
        day = sample_at[j].normalize()
        same = [dose_at[i] for i in range(len(dose_at)) if dose_at[i].normalize() == day]
        what = "sample" if measured[j] else "lab values"
        if same:
            sample_at[j] = min(same)
            notes_sample[j] = (f"{what} on {day.date()} had no time: taken before that "
                               "day's dose" + (" (the pre-dose trough)" if measured[j] else ""))
        else:
            sample_at[j] = day + _MIDDAY
            notes_sample[j] = f"{what} on {day.date()} had no time: taken as 12:00"
    return dose_at, sample_at


def from_clinical(
    doses: pd.DataFrame,
    samples: pd.DataFrame,
    *,
    infusion_hours: float | None = None,
    id: object = 1,
) -> pd.DataFrame:
    """One patient's event table from a dosing table and a lab table with dates and times.

    Parameters
    ----------
    doses : DataFrame
        One row per dose: DATE (YYYY-MM-DD), TIME (HH:MM, optional or blank), DOSE_MG (mg),
        INFUSION_HOURS (h, optional: else ``infusion_hours``).
    samples : DataFrame
        One row per lab visit: DATE, TIME (optional), DV (measured concentration, mg/L;
        blank where only covariates were measured), LLOQ (mg/L, optional), and covariates
        as uppercase columns (WT in kg, ALB, ...), which may change from visit to visit.
    infusion_hours : float or None
        Infusion length (h) of doses without INFUSION_HOURS; None for a bolus.
    id : object
        Patient ID written to the table.

    Returns
    -------
    DataFrame
        NONMEM-style records in time order (a sample at a dose's time comes before it, as a
        pre-dose trough): ID, DATE, TIME (days after the first record), EVID, AMT, RATE (mg
        per day), CMT, MDV, DV, LLOQ where given, the covariates (each carried forward from
        its last measurement; before the first, its first value) and ASSUMPTION (what was
        assumed for that record, else empty). A date without a time is placed so: a sample
        is the pre-dose trough of that day's dose, a dose follows that day's timed sample,
        otherwise 12:00.

    Examples
    --------
    >>> doses = pd.DataFrame({"DATE": ["2026-01-05", "2026-01-19"], "DOSE_MG": [150, 150]})
    >>> labs = pd.DataFrame({"DATE": ["2026-01-05", "2026-01-19"], "TIME": ["09:00", ""],
    ...                      "DV": [None, 21.0], "WT": [30.0, 30.5], "ALB": [3.4, 3.6]})
    >>> table = from_clinical(doses, labs, infusion_hours=2)
    >>> table[["TIME", "EVID", "AMT", "DV", "WT"]].round(3).to_numpy().tolist()
    [[0.0, 2.0, 0.0, nan, 30.0], [0.0, 1.0, 150.0, nan, 30.0], [14.125, 0.0, 0.0, 21.0, 30.5], [14.125, 1.0, 150.0, nan, 30.5]]
    >>> print(table["ASSUMPTION"].iloc[1])
    dose on 2026-01-05 had no time: taken as given right after the sample at 09:00
    >>> print(table["ASSUMPTION"].iloc[2])
    sample on 2026-01-19 had no time: taken before that day's dose (the pre-dose trough)
    """
    for name, table in (("doses", doses), ("samples", samples)):
        if not isinstance(table, pd.DataFrame):
            raise TypeError(f"`{name}` must be a pandas DataFrame; got {type(table).__name__}")
    if len(doses) == 0:
        raise DatasetError("doses table: no rows (nothing to continue from)")
    if "DOSE_MG" not in doses.columns:
        raise DatasetError("doses table: column 'DOSE_MG' is missing (dose in mg)")
    dose_at, dose_timed = _stamps(doses, "doses")
    sample_at, sample_timed = _stamps(samples, "samples")
    amount = _clinical_number(doses, "DOSE_MG", "doses", "a dose in mg")
    bad = ~(amount > 0) | ~np.isfinite(amount)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DatasetError(f"doses table, column 'DOSE_MG', row {row}: expected a dose > 0 "
                           f"(mg); got {doses['DOSE_MG'].iloc[row]!r}")
    hours = (_clinical_number(doses, "INFUSION_HOURS", "doses", "a length in hours")
             if "INFUSION_HOURS" in doses.columns else np.full(len(doses), np.nan))
    hours = np.where(np.isnan(hours), np.nan if infusion_hours is None else infusion_hours,
                     hours)
    bad = ~np.isnan(hours) & ~(hours > 0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DatasetError(f"doses table, column 'INFUSION_HOURS', row {row}: expected a "
                           f"length > 0 (h), or blank for a bolus; got {hours[row]!r}")
    notes_dose, notes_sample = [""] * len(doses), [""] * len(samples)
    measured = (samples["DV"].notna().to_numpy() if "DV" in samples.columns
                else np.zeros(len(samples), bool))
    dose_at, sample_at = _anchor_times(dose_at, dose_timed, sample_at, sample_timed,
                                       notes_dose, notes_sample, measured)
    return _clinical_records(doses, samples, dose_at, sample_at, amount, hours,
                             notes_dose + notes_sample, id)


def _clinical_records(doses: pd.DataFrame, samples: pd.DataFrame, dose_at: pd.Series,
                      sample_at: pd.Series, amount: np.ndarray, hours: np.ndarray,
                      notes: list[str], ident: object) -> pd.DataFrame:
    """Merge doses and samples in time order; carry covariates forward."""
    n_dose, n_sample = len(doses), len(samples)
    dv = (_clinical_number(samples, "DV", "samples",
                           "a concentration in mg/L, or blank (below the assay's limit: "
                           "DV 0 with the LLOQ in column LLOQ)")
          if "DV" in samples.columns else np.full(n_sample, np.nan))
    stamp = pd.concat([dose_at, sample_at], ignore_index=True)
    is_dose = np.r_[np.ones(n_dose, bool), np.zeros(n_sample, bool)]
    order = np.lexsort((is_dose, stamp.to_numpy()))
    rate = np.where(np.isnan(hours), 0.0, amount / (hours / 24.0))
    frame = pd.DataFrame({
        "ID": ident, "DATE": stamp.to_numpy(),
        "EVID": is_dose.astype(int), "AMT": np.r_[amount, np.zeros(n_sample)],
        "RATE": np.r_[rate, np.zeros(n_sample)], "CMT": 1,
        "MDV": np.r_[np.ones(n_dose), np.isnan(dv)].astype(int), "DV": np.r_[
            np.full(n_dose, np.nan), dv],
        "ASSUMPTION": notes,
    }).iloc[order].reset_index(drop=True)
    origin = frame["DATE"].iloc[0]
    frame.insert(2, "TIME", (frame["DATE"] - origin) / pd.Timedelta(days=1))
    # A visit with neither DV nor dose (covariates only) is an "other" record (EVID 2).
    frame.loc[(frame["EVID"] == 0) & (frame["MDV"] == 1), "EVID"] = 2
    extra = [c for c in samples.columns if c not in _CLINICAL_SAMPLE_COLUMNS]
    if "LLOQ" in samples.columns:
        extra = ["LLOQ", *extra]
    for name in extra:
        values = _clinical_number(samples, name, "samples", "a number, or blank")
        column = np.r_[np.full(n_dose, np.nan), values][order]
        if name == "LLOQ":
            frame[name] = column
            continue
        filled = pd.Series(column).ffill().bfill()
        if filled.isna().all():
            raise DatasetError(f"samples table, column '{name}': no value on any row")
        frame[name] = filled.to_numpy()
    return frame

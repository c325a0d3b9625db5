"""Hypothesis strategies shared by the tests: PK parameters, dosing regimens and NONMEM
event records (SS, ADDL, resets, F, lag, coincident times, changing parameters)."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st
from ode_reference import Dose, Record


def log_uniform(lo: float, hi: float) -> st.SearchStrategy[float]:
    """Floats spread evenly on a log scale between ``lo`` and ``hi``."""
    import math

    return st.floats(math.log(lo), math.log(hi)).map(math.exp)


@st.composite
def pk_params(draw: st.DrawFn, n_cmt: int, depot: bool) -> dict[str, float]:
    """Plausible parameters (L, L/day, 1/day), wide enough to include stiff systems."""
    params = {"CL": draw(log_uniform(0.05, 20.0)), "V1": draw(log_uniform(1.0, 100.0))}
    if n_cmt >= 2:
        params.update(Q=draw(log_uniform(0.01, 50.0)), V2=draw(log_uniform(0.5, 200.0)))
    if n_cmt == 3:
        params.update(Q3=draw(log_uniform(0.01, 50.0)), V3=draw(log_uniform(0.5, 200.0)))
    if depot:
        params["KA"] = draw(log_uniform(0.05, 50.0))
    return params


@st.composite
def regimens(draw: st.DrawFn, n_cmt: int, depot: bool) -> list[Dose]:
    """Boluses and infusions at arbitrary times, possibly overlapping, into any compartment."""
    n_doses = draw(st.integers(1, 5))
    n_states = n_cmt + int(depot)
    doses = []
    for _ in range(n_doses):
        time = draw(st.floats(0.0, 40.0).map(lambda t: round(t, 3)))
        cmt = draw(st.integers(1, n_states))
        amount = draw(log_uniform(1.0, 1000.0))
        duration = draw(st.one_of(st.just(0.0), st.floats(0.01, 10.0).map(lambda d: round(d, 3))))
        doses.append(Dose(time, cmt, amount, duration))
    return sorted(doses, key=lambda d: d.time)


#: Record times fall on a half-day grid, so doses, infusion ends, lagged arrivals,
#: additional doses, resets and samples often coincide.
GRID = 0.5


def grid_times(lo: float = 0.0, hi: float = 20.0) -> st.SearchStrategy[float]:
    """Times (day) on the half-day grid between ``lo`` and ``hi``."""
    return st.integers(int(lo / GRID), int(hi / GRID)).map(lambda i: i * GRID)


@dataclass(frozen=True)
class EventCase:
    """One profile of NONMEM records with parameters per record and dose modifiers.

    ``params[i]`` are the structural parameters on record ``i`` (they change between
    records); ``f`` and ``lag`` are F and ALAG per compartment (1-based), constant in time.
    """

    records: list[Record]
    params: list[dict[str, float]]
    f: dict[int, float]
    lag: dict[int, float]

    @property
    def total_amount(self) -> float:
        """Every AMT given, additional doses included (mg): a scale for tolerances."""
        return sum(r.amt * (r.addl + 1) for r in self.records)


@st.composite
def dose_records(draw: st.DrawFn, n_states: int, time: float | None = None,
                 evid: int | None = None) -> Record:
    """A dose: bolus or infusion (RATE or DUR, possibly longer than II) into any
    compartment, with or without ADDL, as SS=0, 1 or 2, EVID 1 or 4."""
    time = draw(grid_times()) if time is None else time
    evid = draw(st.sampled_from([1, 1, 1, 4])) if evid is None else evid
    amt = draw(log_uniform(1.0, 1000.0))
    kind = draw(st.sampled_from(["bolus", "rate", "dur"]))
    duration = draw(st.sampled_from([0.5, 1.0, 2.0, 3.5, 6.0]))
    ss = draw(st.sampled_from([0, 0, 1, 2]))
    addl = draw(st.sampled_from([0, 0, 1, 3]))
    ii = draw(st.sampled_from([1.0, 2.0, 3.5, 7.0])) if ss or addl else 0.0
    return Record(time, evid, amt, rate=amt / duration if kind == "rate" else 0.0,
                  dur=duration if kind == "dur" else 0.0, ii=ii, addl=addl, ss=ss,
                  cmt=draw(st.integers(1, n_states)))


@st.composite
def event_cases(draw: st.DrawFn, n_cmt: int, depot: bool) -> EventCase:
    """Records exercising NONMEM's event semantics in one profile.

    Doses (bolus, RATE and DUR infusions, ADDL with II, SS=1 and SS=2, EVID 4), EVID 3
    resets, EVID 2 and EVID 0 records, F and ALAG per compartment, parameters that change
    from record to record (one to three sets), and, often, a dose, the end of an infusion
    and a sample at one time (the sample before or after the dose in file order), or a
    sample and a reset at the time of an additional dose. Records at equal times are
    shuffled, since file order then decides.
    """
    n_states = n_cmt + int(depot)
    records = [draw(dose_records(n_states)) for _ in range(draw(st.integers(1, 3)))]
    records += [Record(t, 3) for t in draw(st.lists(grid_times(), max_size=2))]
    records += [Record(t, 2) for t in draw(st.lists(grid_times(), max_size=2))]
    records += [Record(t, 0) for t in draw(st.lists(grid_times(), min_size=3, max_size=8))]
    if draw(st.booleans()):
        at = draw(grid_times(2.0, 20.0))
        infusion = draw(st.sampled_from([0.5, 1.0, 2.0]))
        records += [
            Record(at - infusion, 1, draw(log_uniform(1.0, 1000.0)), dur=infusion,
                   cmt=draw(st.integers(1, n_states))),
            draw(dose_records(n_states, time=at, evid=1)),
            Record(at, 0),
        ]
    repeated = [r for r in records if r.addl]
    if repeated and draw(st.booleans()):  # a sample and a reset at an ADDL dose's time
        dose = draw(st.sampled_from(repeated))
        at = dose.time + draw(st.integers(1, dose.addl)) * dose.ii
        reset = draw(st.one_of(st.just(Record(at, 3)),
                               dose_records(n_states, time=at, evid=4)))
        records += [Record(at, 0), reset]
    records = sorted(draw(st.permutations(records)), key=lambda r: r.time)
    pool = [draw(pk_params(n_cmt, depot)) for _ in range(draw(st.integers(1, 3)))]
    params = [pool[draw(st.integers(0, len(pool) - 1))] for _ in records]
    f = {c: draw(st.sampled_from([1.0, 0.8, 0.3])) for c in range(1, n_states + 1)}
    lag = {c: draw(st.sampled_from([0.0, 0.0, 0.5, 1.5, 3.0])) for c in range(1, n_states + 1)}
    return EventCase(records, params, f, lag)

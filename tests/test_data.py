"""Reading and validating NONMEM-style tables, and their conversion to engine events."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from pkmodel.data import (
    check_concentrations,
    days_since,
    dose_amount,
    dosing_table,
    from_clinical,
    infliximab_regimen,
    read_nonmem,
    validate,
    with_columns,
)
from pkmodel.engine import Structure, solve
from pkmodel.errors import CovariateError, DatasetError, PKModelError
from pkmodel.predict import to_events


def base_table() -> pd.DataFrame:
    """Two children on infliximab, 2-h infusions (RATE in mg/day), troughs before doses."""
    return pd.DataFrame({
        "ID": [1, 1, 1, 2, 2, 2],
        "TIME": [0.0, 14.0, 14.0, 0.0, 42.0, 42.0],
        "AMT": [150.0, 0.0, 150.0, 200.0, 0.0, 200.0],
        "RATE": [1800.0, 0.0, 1800.0, 2400.0, 0.0, 2400.0],
        "EVID": [1, 0, 1, 1, 0, 1],
        "DV": [np.nan, 12.0, np.nan, np.nan, 4.0, np.nan],
        "WT": [30.0, 30.0, 30.0, 40.0, 40.0, 40.0],
        "ALB": [3.3, 3.3, 3.5, 4.0, 4.0, 4.0],
    })


def test_read_nonmem_reads_dots_as_missing(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("ID,TIME,AMT,DV,MDV\n1,0,100,.,1\n1,7,0,3.5,0\n")
    table = read_nonmem(path)
    assert np.isnan(table["DV"].iloc[0]) and table["DV"].iloc[1] == 3.5
    assert list(table.columns) == ["ID", "TIME", "AMT", "DV", "MDV"]


def test_with_columns_replaces_in_place_appends_in_order_and_leaves_the_input():
    table = pd.DataFrame({"ID": [1, 1], "PRED": [9.0, 9.0], "DV": [1.0, 2.0]},
                         index=[5, 7])
    out = with_columns(table, {"IPRED": np.array([3.0, 4.0]), "PRED": np.array([1.0, 2.0]),
                               "CL": np.array([0.2, 0.3])})
    assert list(out.columns) == ["ID", "PRED", "DV", "IPRED", "CL"]
    assert out.index.tolist() == [5, 7]
    assert out["PRED"].tolist() == [1.0, 2.0] and out["CL"].tolist() == [0.2, 0.3]
    assert table["PRED"].tolist() == [9.0, 9.0] and "IPRED" not in table.columns
    table.attrs["source"] = {"file": "a.csv"}
    for columns in ({"CL": np.array([0.2, 0.3])}, {"PRED": np.array([1.0, 2.0])}):
        out = with_columns(table, columns)
        assert out.attrs == table.attrs and out.attrs["source"] is not table.attrs["source"]


def test_validate_fills_nonmem_defaults_and_keeps_rows():
    table = base_table().drop(columns=["EVID"])
    out = validate(table, covariates=["WT", "ALB"])
    assert out.index.equals(table.index)
    assert out["EVID"].tolist() == [1, 0, 1, 1, 0, 1]
    assert out["MDV"].tolist() == [1, 0, 1, 1, 0, 1]
    assert out[["II", "ADDL", "SS", "DUR", "CMT"]].to_numpy().sum() == 0
    assert out["WT"].tolist() == table["WT"].tolist()
    assert table.columns.tolist() == base_table().drop(columns=["EVID"]).columns.tolist()


@pytest.mark.parametrize("column", ["DV", "AMT", "WT"])
def test_a_column_given_twice_is_named(column):
    """Two DV (or AMT, or covariate) columns: which holds the values is ambiguous (this
    was an AttributeError)."""
    table = base_table().assign(WT=28.0)
    twice = pd.concat([table, table[[column]]], axis=1)
    with pytest.raises(DatasetError, match=f"column '{column}' appears more than once"):
        validate(twice, covariates=("WT",))
    note = table[["WT"]].set_axis(["NOTE"], axis=1)
    validate(pd.concat([table, note, note], axis=1))  # another column twice: not read


def test_validate_without_dv_makes_every_record_non_observed():
    out = validate(base_table().drop(columns=["DV"]))
    assert (out["MDV"] == 1).all()


PLANTED = [
    # (column, row, new value, expected words in the message)
    ("TIME", 1, -5.0, "non-decreasing"),
    ("TIME", 4, np.nan, "finite time"),
    ("EVID", 1, 7, "0 (observation)"),
    ("AMT", 0, -150.0, "non-negative"),
    ("AMT", 0, 0.0, "AMT > 0 on dose records"),
    ("AMT", 1, 50.0, "AMT = 0 on records that are not doses"),
    ("RATE", 3, -3.0, "-2 (modelled duration)"),
    ("RATE", 1, 100.0, "RATE = 0 on records that are not doses"),
    ("DV", 4, np.nan, "a DV on observation records"),
    ("DV", 4, "BLQ", "a number"),
    ("EVID", 2, 1.5, "a whole number"),
]


@pytest.mark.parametrize("column,row,value,words", PLANTED)
def test_planted_mistakes_name_column_row_and_id(column, row, value, words):
    table = base_table()
    table[column] = table[column].astype(object)
    table.loc[row, column] = value
    ident = table.loc[row, "ID"]
    with pytest.raises(DatasetError) as info:
        validate(table)
    message = str(info.value)
    assert f"column '{column}'" in message
    assert f"row {row} (ID {ident})" in message
    assert words in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, PKModelError)


@pytest.mark.parametrize("changes,column,words", [
    ({"ADDL": [2, 0, 0, 0, 0, 0]}, "II", "II > 0 where ADDL > 0"),
    ({"SS": [1, 0, 0, 0, 0, 0]}, "II", "II > 0 on steady-state doses"),
    ({"SS": [0, 0, 0, 0, 3, 0]}, "SS", "0, 1 or 2"),
    ({"DUR": [1.0, 0, 0, 0, 0, 0]}, "DUR", "one or the other"),
    ({"MDV": [0, 0, 1, 1, 0, 1]}, "MDV", "MDV = 1 on non-observation records"),
    ({"CMT": [-1, 0, 1, 1, 0, 1]}, "CMT", ">= 0"),
    # a whole number too large to expand: 1e19 overflowed an integer, 1e8 filled memory
    ({"ADDL": [1e19, 0, 0, 0, 0, 0], "II": [7.0, 0, 0, 0, 0, 0]}, "ADDL", "at most 100,000"),
    ({"ADDL": [100_001, 0, 0, 0, 0, 0], "II": [1.0, 0, 0, 0, 0, 0]}, "ADDL", "at most 100,000"),
])
def test_inconsistent_nonmem_items_are_named(changes, column, words):
    with pytest.raises(DatasetError, match=f"column '{column}', row .* \\(ID .*\\).*{words}"):
        validate(base_table().assign(**changes))


def test_lowercase_and_missing_columns():
    with pytest.raises(DatasetError, match="'TIME' is missing.*'time'.*uppercase"):
        validate(base_table().rename(columns={"TIME": "time"}))
    with pytest.raises(DatasetError, match="'amt' must be written in uppercase"):
        validate(base_table().rename(columns={"AMT": "amt"}))


def test_ids_must_be_contiguous_blocks():
    table = base_table()
    table.loc[5, "ID"] = 1
    with pytest.raises(DatasetError, match=r"row 5 \(ID 1\).*contiguous"):
        validate(table)


def test_covariates_must_be_present_and_finite():
    with pytest.raises(CovariateError, match="'CRP' is missing"):
        validate(base_table(), covariates=["CRP"])
    table = base_table()
    table.loc[2, "ALB"] = np.nan
    with pytest.raises(CovariateError, match=r"column 'ALB', row 2 \(ID 1\)"):
        validate(table, covariates=["ALB"])
    # Read as text (a CSV with a '.'): numbers are converted, the rest named
    text = base_table().astype({"ALB": str})
    assert validate(text, covariates=["ALB"])["ALB"].tolist() == base_table()["ALB"].tolist()
    text.loc[3, "ALB"] = "."
    with pytest.raises(CovariateError, match=r"column 'ALB', row 3 \(ID 2\).*got '\.'"):
        validate(text, covariates=["ALB"])


def test_non_dataframe_is_a_type_error():
    with pytest.raises(TypeError, match="DataFrame"):
        validate({"ID": [1]})  # type: ignore[arg-type]


def test_compartments_checked_against_the_model():
    table = validate(base_table().assign(CMT=[3, 0, 1, 1, 0, 1]))
    with pytest.raises(DatasetError, match=r"column 'CMT', row 0 \(ID 1\).*between 1 and 2"):
        to_events(table, Structure(2))
    table = validate(base_table().assign(CMT=[1, 1, 1, 1, 0, 1]))
    with pytest.raises(DatasetError, match=r"row 1 \(ID 1\).*central"):
        to_events(table, Structure(1, depot=True))


def test_additional_doses_come_before_a_record_at_the_same_time():
    """An ADDL dose at an observation's time is given first: the sample sees it."""
    table = validate(pd.DataFrame({"ID": [1, 1], "TIME": [0.0, 7.0], "AMT": [100.0, 0.0],
                                   "II": [7.0, 0.0], "ADDL": [1, 0], "DV": [np.nan, 1.0]}))
    events = to_events(table, Structure(1))
    assert events.time.tolist() == [[0.0, 7.0, 7.0]]
    assert events.source_row.tolist() == [[0, -1, 1]]
    amounts = solve(Structure(1), events, {"CL": 1.0, "V1": 10.0})
    np.testing.assert_allclose(amounts[0, 2, 0], 100.0 * (1 + np.exp(-0.7)), rtol=1e-14)


def test_parameter_rows_follow_nocb_or_locf():
    table = validate(base_table())
    nocb = to_events(table, Structure(2), covariates="nocb")
    locf = to_events(table, Structure(2), covariates="locf")
    assert nocb.param_row.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert locf.param_row.tolist() == nocb.param_row.tolist()  # rows carry their own values
    assert nocb.covariates == "nocb" and locf.covariates == "locf"


def test_nocb_and_locf_differ_by_which_albumin_governs_an_interval():
    """ALB falls from 3.3 to 3.0 g/dL at ID 1's day-14 trough: NOCB applies 3.0 over the
    interval before that record, LOCF keeps 3.3 until it; with CL depending on ALB the
    troughs differ, each matching its own closed form."""
    table = validate(base_table().assign(ALB=[3.3, 3.0, 3.0, 4.0, 4.0, 4.0]),
                     covariates=["ALB"])
    troughs = {}
    for rule in ("nocb", "locf"):
        events = to_events(table, Structure(1), covariates=rule)
        cl = (0.3 * (table["ALB"].to_numpy() / 4.0) ** -1.2)[events.param_row]
        amounts = solve(Structure(1), events, {"CL": cl, "V1": 3.0})
        troughs[rule] = amounts[0, 1, 0]
    # Independent check: one exponential with the governing CL over 14 days (infusion 2 h).
    assert troughs["nocb"] < troughs["locf"]
    for rule, alb in (("nocb", 3.0), ("locf", 3.3)):
        k = 0.3 * (alb / 4.0) ** -1.2 / 3.0
        dur = 150.0 / 1800.0
        expected = 1800.0 / k * (1 - np.exp(-k * dur)) * np.exp(-k * (14.0 - dur))
        np.testing.assert_allclose(troughs[rule], expected, rtol=1e-12)


def test_validation_data_read_as_nonmem(validation_dir):
    """The NONMEM input of the infliximab set reads and validates: 9,100 rows, 100 IDs."""
    table = validate(read_nonmem(validation_dir / "infliximab_wojciechowski_nonmem_map_data.csv"),
                     covariates=["WT", "ALB", "ADA"])
    assert len(table) == 9100 and table["ID"].nunique() == 100
    assert int((table["MDV"] == 0).sum()) == 300


def test_read_nonmem_accepts_file_like():
    table = read_nonmem(io.StringIO("ID,TIME,AMT\n1,0,5\n"))
    assert table.shape == (1, 3)


# ------------------------------------------------------------------ regimen builders


def test_label_schedule_weeks_0_2_6_then_every_8():
    """Label: 5 mg/kg at weeks 0, 2, 6, then every 8 weeks (reference dosing file)."""
    table = infliximab_regimen(30.0)
    doses = table[table["EVID"] == 1]
    assert (doses["TIME"] / 7).tolist() == [0, 2, 6, 14, 22, 30, 38, 46]
    assert (doses["AMT"] == 150.0).all()
    np.testing.assert_allclose(doses["AMT"] / doses["RATE"], 2.0 / 24.0)  # 2-h infusions
    samples = table[table["EVID"] == 0]
    assert (samples["TIME"] / 7).tolist() == [2, 6, 14, 22, 30, 38, 46, 54]
    validate(table, covariates=["WT"])  # a valid NONMEM table


def test_shorter_interval_and_vials():
    table = infliximab_regimen(27.0, 10.0, every_weeks=4, until_week=18, vial_mg=100)
    doses = table[table["EVID"] == 1]
    assert (doses["TIME"] / 7).tolist() == [0, 2, 6, 10, 14]
    assert (doses["AMT"] == 300.0).all()  # 270 mg rounds to three 100-mg vials


@pytest.mark.parametrize("weight,mg_per_kg,vial,expected", [
    (28.0, 5.0, None, 140.0), (28.0, 5.0, 100.0, 100.0), (30.0, 5.0, 100.0, 200.0),
    (12.0, 5.0, 100.0, 100.0), (45.0, 10.0, 100.0, 500.0),
])
def test_dose_amount(weight, mg_per_kg, vial, expected):
    assert dose_amount(weight, mg_per_kg, vial_mg=vial) == expected


def test_dose_amount_rejects_nonsense():
    with pytest.raises(ValueError, match="`weight` must be positive"):
        dose_amount(0.0, 5.0)
    with pytest.raises(ValueError, match="`mg_per_kg` must be positive"):
        dose_amount(30.0, -5.0)


def test_calendar_dates_become_days():
    table = dosing_table(300.0, dates=["2026-01-05", "2026-01-19", "2026-02-16 08:00"])
    doses = table[table["EVID"] == 1]
    np.testing.assert_allclose(doses["TIME"], [0.0, 14.0, 42.0 + 8.0 / 24.0])
    np.testing.assert_allclose(days_since(["2026-03-01"], "2026-02-01"), [28.0])
    with pytest.raises(ValueError, match="entry 1 is not a date"):
        days_since(["2026-01-01", "soon"], "2026-01-01")
    labelled = infliximab_regimen(30.0, until_week=6, start="2026-01-05")
    assert labelled["DATE"].iloc[-1] == pd.Timestamp("2026-02-16")


def test_dosing_table_custom_doses_and_errors():
    table = dosing_table([100.0, 200.0], times=[0.0, 28.0], infusion_hours=None, end=56.0)
    assert table["RATE"].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert table["TIME"].tolist() == [0.0, 28.0, 28.0, 56.0]
    with pytest.raises(ValueError, match="increase"):
        dosing_table(100.0, times=[0.0, 0.0])
    with pytest.raises(ValueError, match="exactly one"):
        dosing_table(100.0)
    with pytest.raises(ValueError, match="positive"):
        dosing_table([100.0, -1.0], times=[0.0, 7.0])


# --------------------------------------------------------------------------- clinical tables


def test_clinical_tables_become_one_event_table_in_time_order():
    """Hand-written expectation: the first record, the lab at 2026-01-05 08:00, is day 0;
    the doses follow at 09:00 (1/24) and 2026-01-19 10:30 (14 + 2.5/24); the 2026-03-02
    sample has a date only and that day's dose is at 11:00, so the sample is its pre-dose
    trough at day 56 + 3/24 (26 days of January, 28 of February, 2 of March), before the
    dose in file order."""
    doses = pd.DataFrame({"DATE": ["2026-01-05", "2026-01-19", "2026-03-02"],
                          "TIME": ["09:00", "10:30", "11:00"], "DOSE_MG": [150, 150, 200]})
    labs = pd.DataFrame({"DATE": ["2026-01-05", "2026-03-02"], "TIME": ["08:00", None],
                         "DV": [None, 4.2], "WT": [30.0, 32.0], "ALB": [3.1, 3.6]})
    table = from_clinical(doses, labs, infusion_hours=2.0)
    assert table["TIME"].tolist() == pytest.approx(
        [0.0, 1 / 24, 14 + 2.5 / 24, 56 + 3 / 24, 56 + 3 / 24])
    assert table["EVID"].tolist() == [2, 1, 1, 0, 1]
    assert table["AMT"].tolist() == [0, 150, 150, 0, 200]
    assert table["RATE"].tolist() == [0, 1800, 1800, 0, 2400]  # mg over 2 h, per day
    assert table["WT"].tolist() == [30, 30, 30, 32, 32]  # carried forward
    assert table["ASSUMPTION"].iloc[3].startswith("sample on 2026-03-02 had no time")
    assert table["DATE"].iloc[1] == pd.Timestamp("2026-01-05 09:00")
    validated = validate(table, covariates=("WT", "ALB"))
    assert len(validated) == len(table)


@pytest.mark.parametrize("doses,labs,words", [
    ({"DATE": ["2026-01-05"], "DOSE_MG": [0]}, {"DATE": ["2026-01-05"]},
     "column 'DOSE_MG', row 0: expected a dose > 0"),
    ({"DATE": ["13/05/2026"], "DOSE_MG": [100]}, {"DATE": ["2026-01-05"]},
     "doses table, column 'DATE', row 0: expected a date YYYY-MM-DD"),
    ({"DATE": ["2026-01-05"], "TIME": ["9h30"], "DOSE_MG": [100]}, {"DATE": ["2026-01-05"]},
     "doses table, column 'TIME', row 0: expected a clock time HH:MM"),
    ({"DATE": ["2026-01-05"], "DOSE_MG": [100]}, {"DATE": ["2026-01-05"], "DV": ["<0.4"]},
     "samples table, column 'DV', row 0: expected a concentration in mg/L"),
    ({"DATE": ["2026-01-05"], "DOSE_MG": [100]}, {"DATE": ["2026-01-05"], "WT": ["28,5"]},
     "samples table, column 'WT', row 0: expected a number"),
    ({"DOSE_MG": [100]}, {"DATE": ["2026-01-05"]}, "column 'DATE' is missing"),
])
def test_clinical_table_errors_name_the_table_column_and_row(doses, labs, words):
    with pytest.raises(DatasetError, match=words):
        from_clinical(pd.DataFrame(doses), pd.DataFrame(labs))


def test_non_positive_concentration_needs_an_lloq():
    table = validate(pd.DataFrame({"ID": [1, 1], "TIME": [0.0, 56.0], "AMT": [100.0, 0.0],
                                   "DV": [None, 0.0]}))
    with pytest.raises(DatasetError, match=r"column 'DV', row 1 \(ID 1\)"):
        check_concentrations(table)
    check_concentrations(table.assign(LLOQ=[np.nan, 0.3]))  # censored: no error
    with pytest.raises(DatasetError, match="finite"):
        check_concentrations(table.assign(DV=[np.nan, np.inf]))


@pytest.mark.parametrize("content,words", [
    (b"", "the file is empty"),
    ("ID,TIME,AMT\n1,0,100\n1,1,\xe9\n".encode("latin-1"), "is not UTF-8 text"),
    (b"ID,TIME,WT,WT\n1,0,28,62\n", "column 'WT' appears more than once"),
])
def test_unreadable_files_are_named_errors(tmp_path, content, words):
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=words):
        read_nonmem(path)


def test_missing_amt_and_rate_on_observation_rows_read_as_zero_as_in_nonmem():
    """NONMEM reads '.' as 0 in AMT, RATE and the other dose columns."""
    table = read_nonmem(io.StringIO("ID,TIME,AMT,RATE,DV\n1,0,100,50,.\n1,7,.,.,1.2\n"))
    checked = validate(table)
    assert checked["AMT"].tolist() == [100.0, 0.0] and checked["RATE"].tolist() == [50.0, 0.0]
    assert checked["EVID"].tolist() == [1.0, 0.0]


def test_infinite_dv_is_refused():
    table = pd.DataFrame({"ID": [1, 1], "TIME": [0.0, 1.0], "AMT": [100.0, 0.0],
                          "DV": [np.nan, np.inf]})
    with pytest.raises(DatasetError, match=r"column 'DV', row 1 \(ID 1\): expected a finite DV"):
        validate(table)


def test_steady_state_infusion_longer_than_1000_intervals_is_refused_not_run():
    """An SS=1 infusion at RATE 1e-300 would last 1e302 days: superposing its overlapping
    past doses one by one would need unbounded memory, so validation names the row."""
    table = pd.DataFrame({"ID": [1, 1], "TIME": [0.0, 1.0], "AMT": [100.0, 0.0],
                          "RATE": [1e-300, 0.0], "II": [7.0, 0.0], "SS": [1, 0]})
    with pytest.raises(DatasetError, match=r"column 'RATE', row 0 \(ID 1\): expected a "
                                           "steady-state infusion lasting at most 1000"):
        validate(table)
    validate(table.assign(RATE=[100.0 / 70.0, 0.0]))  # 10 intervals: fine

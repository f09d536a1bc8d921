"""Protocol reader: both forms normalised; every bad input named by file, row and column."""

import re

import numpy as np
import pandas as pd
import pytest

from synthtrial.util.errors import ProtocolError
from synthtrial.trial.protocol import (COLUMNS, parse_protocol, read_protocol, summarize, to_csv_text,
                                 write_protocol)

# The anchor generator's own layout (synthetic_acne_images inference/sim_acne.csv): an unnamed pandas
# index column, 1-based days, continuous AcneSeverity including -0.0.
ANCHOR = """\
,patient_id,date,block,day,treatment,AcneSeverity
0,1,2018-01-01,1,1,Baseline,3.0
1,1,2018-01-02,1,2,Baseline,2.871
2,1,2018-01-03,1,3,Baseline,-0.0
28,1,2018-01-29,2,29,Antibiotics,1.994
140,2,2018-01-01,1,1,Baseline,0.512
141,2,2018-01-02,1,2,Baseline,1.5
"""


def write(tmp_path, text, name="p.csv", encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


def test_reads_anchor_form_unchanged(tmp_path):
    frame = read_protocol(write(tmp_path, ANCHOR))
    assert list(frame.columns) == list(COLUMNS)
    assert frame.attrs["form"] == "anchor"
    assert frame["patient_id"].tolist() == ["1"] * 4 + ["2"] * 2
    assert frame["day"].tolist() == [1, 2, 3, 29, 1, 2]
    assert frame["day"].dtype == np.int64
    assert frame["date"].dtype == "datetime64[ns]"
    assert frame["block"].dtype == "Int64"
    assert frame["severity"].tolist() == [3.0, 2.871, 0.0, 1.994, 0.512, 1.5]
    assert str(frame["severity"].iloc[2]) == "0.0"  # -0.0 normalised
    assert frame["view"].unique().tolist() == ["frontal"]
    assert frame["face"].isna().all()
    assert frame.loc[3, "treatment"] == "Antibiotics"


def test_reads_anchor_form_without_index_column(tmp_path):
    text = "\n".join(line.split(",", 1)[1] for line in ANCHOR.splitlines()) + "\n"
    frame = read_protocol(write(tmp_path, text))
    assert frame.attrs["form"] == "anchor" and len(frame) == 6


def test_native_form_with_days_only_and_views(tmp_path):
    text = ("patient_id,day,treatment,view,face\n"
            "alice,0,Control,frontal,faces/a.png\n"
            "alice,0,Control,LEFT,faces/a.png\n"
            "alice,1,Cream,frontal,\n"
            "bob,3,Control,right,\n")
    frame = read_protocol(write(tmp_path, text))
    assert frame.attrs["form"] == "native"
    assert frame["view"].tolist() == ["frontal", "left", "frontal", "right"]
    assert frame["date"].isna().all()
    assert frame["severity"].isna().all()
    assert frame["face"].tolist() == ["faces/a.png", "faces/a.png", None, None]


def test_native_dates_only_count_days_from_first_date(tmp_path):
    text = "patient_id,date,treatment\np1,2020-03-03,Cream\np1,2020-03-01,Control\np2,2020-05-01,Control\n"
    frame = read_protocol(write(tmp_path, text))
    assert frame["day"].tolist() == [0, 2, 0]  # sorted by day within patient
    assert frame["treatment"].tolist() == ["Control", "Cream", "Control"]


def test_day_fills_date_from_anchor_row(tmp_path):
    text = "patient_id,day,date,treatment\np1,1,2018-01-01,A\np1,5,,B\n"
    frame = read_protocol(write(tmp_path, text))
    assert frame["date"].dt.strftime("%Y-%m-%d").tolist() == ["2018-01-01", "2018-01-05"]


def test_utf8_bom_is_accepted(tmp_path):
    frame = read_protocol(write(tmp_path, b"\xef\xbb\xbf" + ANCHOR.encode()))
    assert len(frame) == 6


def test_round_trip_native_and_anchor(tmp_path):
    frame = read_protocol(write(tmp_path, ANCHOR))
    for form in ("native", "anchor"):
        path = write_protocol(frame, tmp_path / f"out_{form}.csv", form=form)
        again = read_protocol(path)
        assert again.attrs["form"] == form
        pd.testing.assert_frame_equal(again.reset_index(drop=True), frame.reset_index(drop=True),
                                      check_like=False)
    anchor_text = (tmp_path / "out_anchor.csv").read_text()
    assert anchor_text.splitlines()[0] == ",patient_id,date,block,day,treatment,AcneSeverity"
    assert anchor_text.splitlines()[1] == "0,1,2018-01-01,1,1,Baseline,3.0"


def test_writing_is_deterministic(tmp_path):
    frame = read_protocol(write(tmp_path, ANCHOR))
    assert to_csv_text(frame) == to_csv_text(frame.copy())


def test_summary(tmp_path):
    summary = summarize(read_protocol(write(tmp_path, ANCHOR)))
    assert summary["patients"] == 2 and summary["rows"] == 6
    assert summary["treatments"] == {"Baseline": 5, "Antibiotics": 1}
    assert summary["blocks"] == [1, 2]
    assert summary["severity"]["min"] == 0.0 and summary["severity"]["max"] == 3.0
    assert summary["acne04_levels"] == {0: 1, 1: 2, 2: 1, 3: 2}  # 1.5 is a tie: rounds down
    assert summary["date_range"] == ["2018-01-01", "2018-01-29"]


NATIVE_HEADER = "patient_id,day,date,block,treatment,severity,view\n"
GOOD = "p1,1,2018-01-01,1,Control,1.5,frontal\n"


@pytest.mark.parametrize(("content", "row", "column", "pattern"), [
    # file-level problems
    ("", None, None, "is empty"),
    ("   \n\n", None, None, "is empty"),
    (NATIVE_HEADER, None, None, "no rows"),
    ("patient_id;day;treatment\np1;1;A\n", 1, None, "semicolons"),
    ("patient_id\tday\ttreatment\np1\t1\tA\n", 1, None, "tabs"),
    # header problems
    ("patient_id,day\np1,1\n", 1, "treatment", "missing required column 'treatment'"),
    ("patient_id,treatment\np1,A\n", 1, "day", "missing required column 'day'"),
    ("patient_id,day,treatment,colour\np1,1,A,red\n", 1, "colour", "unknown column"),
    ("patient_id,day,treatment,Severity\np1,1,A,1\n", 1, "Severity", "did you mean 'severity'"),
    ("patient_id,day,day,treatment\np1,1,1,A\n", 1, "day", "appears twice"),
    (",patient_id,date,block,day,AcneSeverity\n0,1,2018-01-01,1,1,1.0\n", 1, "treatment", "anchor form"),
    ("patient_id,day,treatment,AcneSeverity,severity\np1,1,A,1,1\n", 1, "severity", "not both"),
    ("patient_id,,day,treatment\np1,x,1,A\n", 1, None, "column 2 of the header has no name"),
    # row problems
    (NATIVE_HEADER + GOOD + "p1,2,2018-01-02,1,Control\n", 3, None, "has 5 fields but the header has 7"),
    (NATIVE_HEADER + GOOD + "p1,2,2018-01-02,1,Control,abc,frontal\n", 3, "severity", "'abc' is not a number"),
    (NATIVE_HEADER + GOOD + "p1,2,2018-01-02,1,Control,3.5,frontal\n", 3, "severity", "outside the severity scale"),
    (NATIVE_HEADER + GOOD + "p1,2,2018-01-02,1,Control,-0.2,frontal\n", 3, "severity", "outside"),
    (NATIVE_HEADER + GOOD + "p1,2,2018-01-02,1,Control,nan,frontal\n", 3, "severity", "not a finite number"),
    (NATIVE_HEADER + GOOD + "p1,-1,2017-12-30,1,Control,1,frontal\n", 3, "day", "negative"),
    (NATIVE_HEADER + GOOD + "p1,2.5,2018-01-02,1,Control,1,frontal\n", 3, "day", "not a whole number"),
    (NATIVE_HEADER + GOOD + "p1,2,02/01/2018,1,Control,1,frontal\n", 3, "date", "YYYY-MM-DD"),
    (NATIVE_HEADER + GOOD + "p1,2,2018-02-30,1,Control,1,frontal\n", 3, "date", "not a date"),
    (NATIVE_HEADER + GOOD + "p1,2,2018-01-05,1,Control,1,frontal\n", 3, "date",
     r"disagrees with day 2: .* day 2 is 2018-01-02"),
    (NATIVE_HEADER + GOOD + "p1,1,2018-01-01,1,Control,1.2,frontal\n", 3, "day", "duplicates row 2"),
    (NATIVE_HEADER + GOOD + "p1,2,2018-01-02,1,Control,1,top\n", 3, "view", "unknown view 'top'"),
    (NATIVE_HEADER + GOOD + "p1,2,2018-01-02,x,Control,1,frontal\n", 3, "block", "not a number"),
    (NATIVE_HEADER + GOOD + "p1,2,2018-01-02,1,,1,frontal\n", 3, "treatment", "is empty"),
    (NATIVE_HEADER + GOOD + "p1,2,2018-01-02,1,Control,,frontal\n", 3, "severity", "some rows but not"),
    (NATIVE_HEADER + GOOD + ",2,2018-01-02,1,Control,1,frontal\n", 3, "patient_id", "is empty"),
    (NATIVE_HEADER + GOOD + "../etc,2,2018-01-02,1,Control,1,frontal\n", 3, "patient_id", "path separator"),
    (NATIVE_HEADER + GOOD + "a..b,2,2018-01-02,1,Control,1,frontal\n", 3, "patient_id", r"contains '\.\.'"),
    (NATIVE_HEADER + GOOD + "a\\b,2,2018-01-02,1,Control,1,frontal\n", 3, "patient_id", "path separator"),
    (NATIVE_HEADER + GOOD + "x" * 65 + ",2,2018-01-02,1,Control,1,frontal\n", 3, "patient_id", "at most 64"),
    (NATIVE_HEADER + GOOD + "p 1,2,2018-01-02,1,Control,1,frontal\n", 3, "patient_id", "not a safe identifier"),
    (NATIVE_HEADER + GOOD + ".hidden,2,2018-01-02,1,Control,1,frontal\n", 3, "patient_id", "not a safe"),
    (NATIVE_HEADER + GOOD + "p1,,,1,Control,1,frontal\n", 3, "day", "every row needs a day or a date"),
    ("patient_id,day,treatment,face\np1,1,A,x.png\np1,2,A,y.png\n", 3, "face", "one face per patient"),
    ('patient_id,day,treatment\np1,1,"A\n', 2, None, "not valid CSV"),
])
def test_bad_input_names_file_row_and_column(tmp_path, content, row, column, pattern):
    path = write(tmp_path, content)
    with pytest.raises(ProtocolError) as info:
        read_protocol(path)
    error = info.value
    assert error.file == str(path)
    assert error.row == row
    assert error.column == column
    message = str(error)
    assert "\n" not in message
    assert message.startswith(str(path))
    if row is not None:
        assert f"row {row}" in message
    if column is not None:
        assert f"column '{column}'" in message
    assert re.search(pattern, message), message


def test_anchor_errors_name_the_anchor_column(tmp_path):
    text = ANCHOR.replace("1.994", "high")
    with pytest.raises(ProtocolError) as info:
        read_protocol(write(tmp_path, text))
    assert info.value.column == "AcneSeverity" and info.value.row == 5


def test_spreadsheet_row_numbers_count_blank_lines(tmp_path):
    text = "patient_id,day,treatment\np1,1,A\n\np1,x,A\n"
    with pytest.raises(ProtocolError) as info:
        read_protocol(write(tmp_path, text))
    assert info.value.row == 4


def test_utf16_is_refused(tmp_path):
    path = write(tmp_path, "\ufeff" + ANCHOR, encoding="utf-16")
    with pytest.raises(ProtocolError, match="UTF-16"):
        read_protocol(path)


def test_latin1_is_refused_with_line(tmp_path):
    path = write(tmp_path, "patient_id,day,treatment\np1,1,Crème\n", encoding="latin-1")
    with pytest.raises(ProtocolError, match="not UTF-8") as info:
        read_protocol(path)
    assert info.value.row == 2


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ProtocolError, match="no such file"):
        read_protocol(tmp_path / "nope.csv")
    with pytest.raises(ProtocolError, match="is a directory"):
        read_protocol(tmp_path)


def test_parse_text_directly():
    frame = parse_protocol("patient_id,day,treatment\nP01,0,A\n")
    assert frame.attrs["source"] == "<protocol>" and frame["day"].tolist() == [0]


# ------------------------------------------------------------------ hostile values (bounds, digits, bytes)

@pytest.mark.parametrize("line, column, needle", [
    ("p1,1e300,Control", "day", "beyond day 36500"),
    ("p1,1000000000000000,Control", "day", "beyond day 36500"),
    ("p1,1_0,Control", "day", r"not a number \(plain ASCII"),
    ("p1,\u0661\u0660,Control", "day", r"not a number \(plain ASCII"),
])
def test_days_are_bounded_ascii_numbers(tmp_path, line, column, needle):
    path = tmp_path / "p.csv"
    path.write_text("patient_id,day,treatment\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ProtocolError, match=needle) as info:
        read_protocol(path)
    assert info.value.column == column and info.value.row == 2


@pytest.mark.parametrize("date", ["0001-01-01", "9999-12-31", "10000-01-01"])
def test_dates_are_bounded(tmp_path, date):
    path = tmp_path / "p.csv"
    path.write_text(f"patient_id,date,treatment\np1,{date},Control\n")
    with pytest.raises(ProtocolError, match="outside 1900-01-01 - 2200-12-31|is not a date") as info:
        read_protocol(path)
    assert info.value.column == "date"


def test_day_span_is_bounded(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("patient_id,day,treatment\np1,0,Control\np1,5000,Control\n")
    with pytest.raises(ProtocolError, match="spans 5000 days") as info:
        read_protocol(path)
    assert info.value.row == 3


def test_nul_byte_anywhere_is_refused(tmp_path):
    path = tmp_path / "p.csv"
    rows = "".join(f"p1,{d},Control\n" for d in range(600))
    path.write_bytes(("patient_id,day,treatment\n" + rows).encode() + b"p1,600,Cre\x00am\n")
    with pytest.raises(ProtocolError, match="NUL bytes") as info:
        read_protocol(path)
    assert info.value.row == 602


def test_only_regular_files_are_read(tmp_path):
    import os

    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    with pytest.raises(ProtocolError, match="not a regular file"):
        read_protocol(fifo)
    with pytest.raises(ProtocolError, match="not a regular file"):
        read_protocol("/dev/zero")


def test_anchor_form_errors_name_its_own_column(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text(",patient_id,date,block,day,treatment,AcneSeverity\n"
                    "0,1,2018-01-01,1,1,Baseline,2.9\n1,1,2018-01-02,1,2,Baseline,\n")
    with pytest.raises(ProtocolError, match="severity on some rows") as info:
        read_protocol(path)
    assert info.value.column == "AcneSeverity"

"""Read, validate and write trial protocols (the input of ``synthtrial generate``).

Two forms are read and normalised to one typed DataFrame (:data:`COLUMNS`):

* the **anchor form** written by synthetic_acne_images: an optional unnamed index column, then
  ``patient_id,date,block,day,treatment,AcneSeverity``, one row per patient per day;
* the **native form**: ``patient_id``, ``day`` (integer >= 0) and/or ``date`` (YYYY-MM-DD),
  ``treatment``, and optionally ``block``, ``severity`` (same 0-3 scale as ``AcneSeverity``),
  ``view`` (frontal|left|right) and ``face`` (an identity key or an image path).

Every rejection is a :class:`~synthtrial.util.errors.ProtocolError` naming the file, the row as a
spreadsheet shows it (the header is row 1) and the column.

The shipped protocols (``trial``, ``quick``, ``views``, the graders' ...) are package data in
``synthtrial/protocols/`` (copies of the repository's ``protocols/``, which the tests keep identical):
:func:`resolve_protocol` finds one by name (``trial``, ``trial.csv`` or ``protocols/trial.csv``) when no such file
exists where the user stands, so the README's commands work from any directory. A file that exists always wins.
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import difflib
import io
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from synthtrial.trial import scale
from synthtrial.util.atomic import write_text_atomic
from synthtrial.util.errors import ProtocolError

#: Folder of the shipped protocols (package data) and their ``<stem>.truth.json`` files.
SHIPPED_PROTOCOLS = Path(__file__).resolve().parents[1] / "protocols"

#: Columns of the normalised protocol, in order.
COLUMNS = ("patient_id", "day", "date", "block", "treatment", "severity", "view", "face")
#: Columns the native form may carry.
NATIVE_COLUMNS = ("patient_id", "day", "date", "block", "treatment", "severity", "view", "face")
#: Columns of the anchor form (after its unnamed index column).
ANCHOR_COLUMNS = ("patient_id", "date", "block", "day", "treatment", "AcneSeverity")
VIEWS = ("frontal", "left", "right")
DEFAULT_VIEW = "frontal"
#: ``patient_id`` becomes a path component of the run directory, so it is held to this pattern.
PATIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
PATIENT_ID_MAX = 64
MAX_FIELD_CHARS = 4096
#: Bounds on what a protocol may ask for (README, "Protocol CSV"): a trial is days to years long, not ages.
MAX_DAY = 36_500                      # days are counted from 0 (or 1); 100 years
MAX_DAY_SPAN = 3_660                  # last minus first day of one patient: 10 years of daily simulation
MAX_ROWS = 1_000_000
MAX_FILE_BYTES = 256 * 1024 * 1024
MIN_DATE, MAX_DATE = dt.date(1900, 1, 1), dt.date(2200, 12, 31)
#: Numbers are plain ASCII decimals ("1_0" and non-ASCII digits are not numbers here).
NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)

_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"),
)


def shipped_protocols() -> list[str]:
    """The names of the shipped protocols (``trial``, ``quick``, ...), sorted."""
    return sorted(p.stem for p in SHIPPED_PROTOCOLS.glob("*.csv"))


def resolve_protocol(path: str | os.PathLike[str]) -> Path:
    """``path`` itself when it exists; else the shipped protocol it names (``trial``, ``trial.csv`` or
    ``protocols/trial.csv``); else ``path`` unchanged (reading it then says "no such file")."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        return path
    parent = path.parent.as_posix()
    if parent not in (".", "protocols") or path.suffix.lower() not in ("", ".csv"):
        return path
    shipped = SHIPPED_PROTOCOLS / f"{path.stem if path.suffix else path.name}.csv"
    return shipped if shipped.is_file() else path


def read_protocol(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a protocol CSV in either form and return the normalised, validated DataFrame.

    The frame has the columns :data:`COLUMNS` with dtypes ``patient_id`` str, ``day`` int64,
    ``date`` datetime64 (NaT where the file gives no date), ``block`` Int64 (nullable), ``treatment`` str,
    ``severity`` float64 (NaN where the trial simulator must fill it in), ``view`` str, ``face`` object
    (None where not given). Rows are ordered by patient (in order of first appearance), day and view.
    ``frame.attrs`` records ``source`` (the path) and ``form`` ("anchor" or "native"). A shipped protocol is
    found by name where no such file exists (:func:`resolve_protocol`).
    """
    path = resolve_protocol(path)
    name = str(path)
    if not path.exists():
        shipped = ", ".join(shipped_protocols())
        raise ProtocolError(f"no such file (the shipped protocols, usable by name from anywhere: {shipped})",
                            file=name)
    if path.is_dir():
        raise ProtocolError("is a directory, not a CSV file", file=name)
    if not path.is_file():
        raise ProtocolError("is not a regular file (a pipe or a device?); give a CSV file", file=name)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ProtocolError(f"cannot be read ({exc.strerror or exc})", file=name) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ProtocolError(f"is larger than {MAX_FILE_BYTES // 2**20} MiB; split the trial into several "
                            "protocols", file=name)
    return parse_protocol(raw, source=name)


def parse_protocol(raw: bytes | str, source: str = "<protocol>") -> pd.DataFrame:
    """Parse protocol CSV content (bytes or text); ``source`` names it in errors. See :func:`read_protocol`."""
    text = _decode(raw, source) if isinstance(raw, bytes) else raw.removeprefix("\ufeff")
    if not text.strip():
        raise ProtocolError("is empty: expected a header line and one row per patient per day", file=source)
    rows = _split_rows(text, source)
    header_row, header = rows[0]
    body = [(n, r) for n, r in rows[1:] if any(cell.strip() for cell in r)]
    form, columns = _read_header(header, header_row, source)
    if not body:
        raise ProtocolError("has a header but no rows", file=source)
    if len(body) > MAX_ROWS:
        raise ProtocolError(f"has {len(body)} rows; at most {MAX_ROWS} are read", file=source)
    records = _parse_rows(body, header, columns, form, source)
    frame = _normalise(records, source, form)
    frame.attrs.update(source=source, form=form)
    return frame


# --------------------------------------------------------------------------------------------- reading

def _decode(raw: bytes, source: str) -> str:
    for bom, encoding in _BOMS:
        if raw.startswith(bom):
            raise ProtocolError(f"is {encoding}-encoded; save it as UTF-8 CSV (comma-separated)", file=source)
    if b"\x00" in raw:
        offset = raw.index(b"\x00")
        raise ProtocolError("contains NUL bytes: it is not a text CSV file (UTF-16 without a BOM?); "
                            "save it as UTF-8 CSV", file=source, row=raw[:offset].count(b"\n") + 1)
    try:
        return raw.decode("utf-8-sig")  # an Excel UTF-8 BOM is harmless and dropped
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ProtocolError(f"is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                            "save it as UTF-8 CSV", file=source, row=line) from None


def _split_rows(text: str, source: str) -> list[tuple[int, list[str]]]:
    """Split CSV text into (spreadsheet row number, cells); quoted newlines stay inside their cell."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[tuple[int, list[str]]] = []
    try:
        line_no = 1
        for cells in reader:
            rows.append((line_no, cells))
            line_no = reader.line_num + 1
    except csv.Error as exc:
        raise ProtocolError(f"is not valid CSV ({exc})", file=source, row=reader.line_num) from None
    while rows and not any(c.strip() for c in rows[0][1]):  # leading blank lines
        rows.pop(0)
    if not rows:
        raise ProtocolError("is empty: expected a header line and one row per patient per day", file=source)
    return rows


def _read_header(header: list[str], row: int, source: str) -> tuple[str, dict[str, int]]:
    """Return the form and a map canonical column -> cell index."""
    if len(header) == 1:
        for sep, label in ((";", "semicolons"), ("\t", "tabs"), ("|", "'|'")):
            if sep in header[0]:
                raise ProtocolError(f"the header is separated by {label}; protocols are comma-separated "
                                    "CSV (in a spreadsheet: save as 'CSV UTF-8 (comma delimited)')",
                                    file=source, row=row)
    names = [h.strip() for h in header]
    columns: dict[str, int] = {}
    form = "anchor" if "AcneSeverity" in names else "native"
    known = ANCHOR_COLUMNS if form == "anchor" else NATIVE_COLUMNS
    for i, name in enumerate(names):
        if name == "":
            if i == 0:
                continue  # the unnamed pandas index column of the anchor form
            raise ProtocolError(f"column {i + 1} of the header has no name", file=source, row=row)
        if name in columns:
            raise ProtocolError("appears twice in the header", file=source, row=row, column=name)
        if name not in known:
            raise ProtocolError(_unknown_column_message(name, form), file=source, row=row, column=name)
        columns[name] = i
    if form == "anchor":
        missing = [c for c in ANCHOR_COLUMNS if c not in columns]
        if missing:
            raise ProtocolError(f"the anchor form (it has 'AcneSeverity') also needs {_quoted(missing)}",
                                file=source, row=row, column=missing[0])
        columns["severity"] = columns.pop("AcneSeverity")
    else:
        missing = [c for c in ("patient_id", "treatment") if c not in columns]
        if "day" not in columns and "date" not in columns:
            missing.append("day")
        if missing:
            raise ProtocolError(f"missing required column{'s' if len(missing) > 1 else ''} {_quoted(missing)} "
                                "(a protocol needs patient_id, treatment, and day or date)",
                                file=source, row=row, column=missing[0])
    return form, columns


def _unknown_column_message(name: str, form: str) -> str:
    allowed = ANCHOR_COLUMNS if form == "anchor" else NATIVE_COLUMNS
    candidates = {c.lower(): c for c in (*NATIVE_COLUMNS, *ANCHOR_COLUMNS)}
    close = difflib.get_close_matches(name.lower(), candidates, n=1, cutoff=0.6)
    hint = f" (did you mean '{candidates[close[0]]}'?)" if close else ""
    if name.lower() == "acneseverity":
        hint = " (the anchor column is spelled 'AcneSeverity')"
    elif name == "severity" and form == "anchor":
        hint = " (give either 'severity' or the anchor form's 'AcneSeverity', not both)"
    return f"unknown column{hint}; the {form} form takes {_quoted(allowed)}"


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


def _parse_rows(body, header, columns, form, source) -> list[dict[str, Any]]:
    width = len(header)
    records = []
    for row, cells in body:
        if len(cells) != width:
            raise ProtocolError(f"has {len(cells)} fields but the header has {width}"
                                + (" (a ';' or an unquoted ',' inside a value?)" if ";" in ",".join(cells) else ""),
                                file=source, row=row)

        def cell(name: str) -> str | None:
            if name not in columns:
                return None
            value = cells[columns[name]].strip()
            if len(value) > MAX_FIELD_CHARS:
                raise ProtocolError(f"value is longer than {MAX_FIELD_CHARS} characters", file=source, row=row,
                                    column=_display(name, form))
            return value

        def err(message: str, name: str) -> ProtocolError:
            return ProtocolError(message, file=source, row=row, column=_display(name, form))

        rec: dict[str, Any] = {"row": row}
        rec["patient_id"] = _patient_id(cell("patient_id"), err)
        rec["day"] = _day(cell("day"), err)
        rec["date"] = _date(cell("date"), err)
        rec["block"] = _block(cell("block"), err)
        treatment = cell("treatment")
        if not treatment:
            raise err("is empty: every row needs a treatment (e.g. 'Baseline', 'Control', 'Cream')", "treatment")
        rec["treatment"] = treatment
        rec["severity"] = _severity(cell("severity"), err)
        view = cell("view")
        if view:
            if view.lower() not in VIEWS:
                raise err(f"unknown view '{view}'; views are {_quoted(VIEWS)}", "view")
            view = view.lower()
        rec["view"] = view or DEFAULT_VIEW
        face = cell("face")
        rec["face"] = face or None
        if rec["day"] is None and rec["date"] is None:
            raise err("is empty and so is 'date': every row needs a day or a date",
                      "day" if "day" in columns else "date")
        records.append(rec)
    return records


def _display(name: str, form: str) -> str:
    return "AcneSeverity" if (name == "severity" and form == "anchor") else name


def _patient_id(value: str | None, err) -> str:
    if not value:
        raise err("is empty: every row needs a patient_id", "patient_id")
    if "/" in value or "\\" in value:
        raise err(f"'{value}' contains a path separator; patient_id becomes a folder name, so it may use "
                  "only letters, digits, '_', '.' and '-'", "patient_id")
    if ".." in value:
        raise err(f"'{value}' contains '..'; patient_id becomes a folder name", "patient_id")
    if len(value) > PATIENT_ID_MAX:
        raise err(f"'{value[:20]}...' is {len(value)} characters long; at most {PATIENT_ID_MAX} are allowed",
                  "patient_id")
    if not PATIENT_ID_PATTERN.fullmatch(value):
        raise err(f"'{value}' is not a safe identifier: it must start with a letter or digit and use only "
                  "letters, digits, '_', '.' and '-'", "patient_id")
    return value


def _number(value: str, name: str, err) -> float:
    try:
        number = float(value)
    except ValueError:
        raise err(f"'{value}' is not a number", name) from None
    if not math.isfinite(number):
        raise err(f"'{value}' is not a finite number", name)
    if not NUMBER.fullmatch(value):
        raise err(f"'{value}' is not a number (plain ASCII decimal digits, e.g. 12 or 1.5)", name)
    return number


def _integer(value: str, name: str, err) -> int:
    number = _number(value, name, err)
    if number != int(number):
        raise err(f"'{value}' is not a whole number", name)
    return int(number)


def _day(value: str | None, err) -> int | None:
    if not value:
        return None
    number = _number(value, "day", err)
    if number < 0:
        raise err(f"{value} is negative; days count from 0 or 1 at the patient's start", "day")
    if number > MAX_DAY:
        raise err(f"{value} is beyond day {MAX_DAY} (100 years); days count from the patient's start", "day")
    return _integer(value, "day", err)


def _date(value: str | None, err) -> dt.date | None:
    if not value:
        return None
    match = re.fullmatch(r"(\d{4}-\d{2}-\d{2})(?:[ T]00:00(?::00)?)?", value)  # a spreadsheet may add midnight
    try:
        if match:
            date = dt.date.fromisoformat(match.group(1))
            if not MIN_DATE <= date <= MAX_DATE:
                raise err(f"'{value}' lies outside {MIN_DATE} - {MAX_DATE}, the dates a trial may have", "date")
            return date
    except ValueError:
        pass
    raise err(f"'{value}' is not a date; write dates as YYYY-MM-DD (e.g. 2018-01-29)", "date")


def _block(value: str | None, err) -> int | None:
    if not value:
        return None
    if NUMBER.fullmatch(value) and abs(float(value)) > MAX_ROWS:
        raise err(f"{value} is not a block number a trial can have (at most {MAX_ROWS})", "block")
    block = _integer(value, "block", err)
    if block < 0:
        raise err(f"{block} is negative; blocks are numbered from 0 or 1", "block")
    return block


def _severity(value: str | None, err) -> float:
    if not value:
        return math.nan
    number = _number(value, "severity", err)
    if not scale.SEVERITY_MIN <= number <= scale.SEVERITY_MAX:
        raise err(f"{value} is outside the severity scale {scale.SEVERITY_MIN:g}-{scale.SEVERITY_MAX:g} "
                  "(0 mild, 1 moderate, 2 severe, 3 very severe)", "severity")
    return number + 0.0  # the anchor writes -0.0; normalise it to 0.0


# ----------------------------------------------------------------------------------------- validation

def _normalise(records: list[dict[str, Any]], source: str, form: str = "native") -> pd.DataFrame:
    by_patient: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        by_patient.setdefault(rec["patient_id"], []).append(rec)
    for pid, recs in by_patient.items():
        _check_day_date(pid, recs, source)
        _check_constant(pid, recs, "face", source)
        _check_severity_complete(pid, recs, source, form)
        _check_span(pid, recs, source)
    seen: dict[tuple[str, int, str], int] = {}
    for rec in records:
        key = (rec["patient_id"], rec["day"], rec["view"])
        if key in seen:
            raise ProtocolError(f"duplicates row {seen[key]}: patient '{key[0]}' already has day {key[1]} "
                                f"(view '{key[2]}')", file=source, row=rec["row"], column="day")
        seen[key] = rec["row"]

    order = {pid: i for i, pid in enumerate(by_patient)}
    records = sorted(records, key=lambda r: (order[r["patient_id"]], r["day"], VIEWS.index(r["view"])))
    frame = pd.DataFrame({
        "patient_id": pd.Series([r["patient_id"] for r in records], dtype=object),
        "day": pd.Series([r["day"] for r in records], dtype="int64"),
        "date": pd.to_datetime(pd.Series([r["date"] for r in records], dtype=object)),
        "block": pd.array([r["block"] for r in records], dtype="Int64"),
        "treatment": pd.Series([r["treatment"] for r in records], dtype=object),
        "severity": pd.Series([r["severity"] for r in records], dtype="float64"),
        "view": pd.Series([r["view"] for r in records], dtype=object),
        "face": pd.Series([r["face"] for r in records], dtype=object),
    }, columns=list(COLUMNS))
    if frame["date"].dtype != "datetime64[ns]":
        frame["date"] = frame["date"].astype("datetime64[ns]")
    return frame


def _check_day_date(pid: str, recs: list[dict[str, Any]], source: str) -> None:
    """Each patient's dates must advance one day per day; fill whichever of the two is missing."""
    anchor: tuple[int, dt.date] | None = None
    for rec in recs:
        if rec["day"] is not None and rec["date"] is not None:
            anchor = (rec["day"], rec["date"])
            break
    has_day = [rec["day"] is not None for rec in recs]
    has_date = [rec["date"] is not None for rec in recs]
    if anchor is None and any(has_day) and any(has_date):
        rec = next(r for r in recs if r["day"] is None)
        raise ProtocolError(f"patient '{pid}' gives days on some rows and only dates on others; give both "
                            "on at least one row", file=source, row=rec["row"], column="day")
    if anchor is None and not any(has_day):
        start = min(rec["date"] for rec in recs)  # dates only: day 0 is the patient's first date
        anchor = (0, start)
    for rec in recs:
        if anchor is None:
            continue  # days only: nothing to reconcile
        day0, date0 = anchor
        if rec["date"] is None:
            rec["date"] = date0 + dt.timedelta(days=rec["day"] - day0)
        expected_day = day0 + (rec["date"] - date0).days
        if rec["day"] is None:
            if expected_day < 0:
                raise ProtocolError(f"date {rec['date']} lies before day 0 of patient '{pid}' "
                                    f"({date0 - dt.timedelta(days=day0)})", file=source, row=rec["row"],
                                    column="date")
            rec["day"] = expected_day
        elif rec["day"] != expected_day:
            expected_date = date0 + dt.timedelta(days=rec["day"] - day0)
            raise ProtocolError(f"date {rec['date']} disagrees with day {rec['day']}: patient '{pid}' has "
                                f"day {day0} on {date0}, so day {rec['day']} is {expected_date}",
                                file=source, row=rec["row"], column="date")


def _check_constant(pid: str, recs: list[dict[str, Any]], column: str, source: str) -> None:
    values = [r for r in recs if r[column] is not None]
    for rec in values[1:]:
        if rec[column] != values[0][column]:
            raise ProtocolError(f"patient '{pid}' has {column} '{values[0][column]}' on row {values[0]['row']} "
                                f"but '{rec[column]}' here; one {column} per patient", file=source,
                                row=rec["row"], column=column)


def _check_span(pid: str, recs: list[dict[str, Any]], source: str) -> None:
    days = [r["day"] for r in recs]
    if max(days) - min(days) > MAX_DAY_SPAN:
        last = max(recs, key=lambda r: r["day"])
        raise ProtocolError(f"patient '{pid}' spans {max(days) - min(days)} days (day {min(days)} to {max(days)}); "
                            f"at most {MAX_DAY_SPAN} days (10 years) are simulated", file=source, row=last["row"],
                            column="day")


def _check_severity_complete(pid: str, recs: list[dict[str, Any]], source: str, form: str = "native") -> None:
    given = [not math.isnan(r["severity"]) for r in recs]
    if any(given) and not all(given):
        missing = recs[given.index(False)]
        raise ProtocolError(f"patient '{pid}' has a severity on some rows but not on this one; give it on every "
                            "row or on none (then the trial simulator fills it in)", file=source,
                            row=missing["row"], column=_display("severity", form))


# -------------------------------------------------------------------------------------------- writing

def has_severity(protocol: pd.DataFrame) -> bool:
    """True when every row carries a severity (no simulation needed)."""
    return bool(protocol["severity"].notna().all())


def patients_without_severity(protocol: pd.DataFrame) -> list[str]:
    """The patients whose severities the trial simulator must fill in (a patient has them on all rows or none)."""
    missing = protocol.loc[protocol["severity"].isna(), "patient_id"]
    return list(dict.fromkeys(missing.tolist()))


def to_csv_text(protocol: pd.DataFrame, form: str = "native") -> str:
    """Render a normalised protocol as CSV text, deterministically (same frame, same bytes).

    ``form="anchor"`` writes the synthetic_acne_images layout (needs dates and severities everywhere);
    ``form="native"`` writes only the optional columns that carry information.
    """
    if form not in ("native", "anchor"):
        raise ValueError(f"unknown protocol form {form!r}; use 'native' or 'anchor'")
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    dates = [_fmt_date(d) for d in protocol["date"]]
    severities = [_fmt_float(s) for s in protocol["severity"]]
    blocks = ["" if pd.isna(b) else str(int(b)) for b in protocol["block"]]
    if form == "anchor":
        if not all(dates) or not all(severities):
            raise ValueError("the anchor form needs a date and a severity on every row")
        writer.writerow(["", *ANCHOR_COLUMNS])
        for i, (row, date, block, sev) in enumerate(zip(protocol.itertuples(index=False), dates, blocks,
                                                        severities, strict=True)):
            writer.writerow([i, row.patient_id, date, block, int(row.day), row.treatment, sev])
        return buf.getvalue()
    optional = {
        "date": any(dates),
        "block": any(blocks),
        "severity": any(severities),
        "view": bool((protocol["view"] != DEFAULT_VIEW).any()),
        "face": bool(protocol["face"].notna().any()),
    }
    cols = [c for c in NATIVE_COLUMNS if optional.get(c, True)]
    writer.writerow(cols)
    for row, date, block, sev in zip(protocol.itertuples(index=False), dates, blocks, severities, strict=True):
        values = {"patient_id": row.patient_id, "day": int(row.day), "date": date, "block": block,
                  "treatment": row.treatment, "severity": sev, "view": row.view, "face": row.face or ""}
        writer.writerow([values[c] for c in cols])
    return buf.getvalue()


def write_protocol(protocol: pd.DataFrame, path: str | os.PathLike[str], form: str = "native") -> Path:
    """Write a protocol CSV atomically (temp file + rename) and return its path."""
    return write_text_atomic(path, to_csv_text(protocol, form))


def _fmt_date(value: Any) -> str:
    return "" if pd.isna(value) else pd.Timestamp(value).strftime("%Y-%m-%d")


def _fmt_float(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(round(float(value), 4) + 0.0)


# -------------------------------------------------------------------------------------------- summary

def summarize(protocol: pd.DataFrame) -> dict[str, Any]:
    """What ``synthtrial protocol check`` prints: patients, days, treatments, blocks, severity range."""
    days = protocol.groupby("patient_id", sort=False)["day"]
    severity = protocol["severity"]
    dates = protocol["date"].dropna()
    blocks = protocol["block"].dropna()
    treatments = protocol["treatment"].value_counts(sort=False)
    return {
        "source": protocol.attrs.get("source"),
        "form": protocol.attrs.get("form"),
        "rows": int(len(protocol)),
        "patients": int(protocol["patient_id"].nunique()),
        "patient_ids": list(dict.fromkeys(protocol["patient_id"])),
        "days_per_patient": {"min": int(days.size().min()), "max": int(days.size().max())},
        "day_range": [int(protocol["day"].min()), int(protocol["day"].max())],
        "date_range": ([dates.min().strftime("%Y-%m-%d"), dates.max().strftime("%Y-%m-%d")]
                       if len(dates) else None),
        "treatments": {str(k): int(v) for k, v in treatments.items()},
        "blocks": sorted(int(b) for b in blocks.unique()) if len(blocks) else [],
        "views": sorted(protocol["view"].unique(), key=VIEWS.index),
        "severity": ({"min": float(severity.min()), "max": float(severity.max()),
                      "mean": float(severity.mean())} if has_severity(protocol) else None),
        "acne04_levels": ({int(k): int(v) for k, v in
                           pd.Series(scale.acne04_level(severity.to_numpy())).value_counts().sort_index().items()}
                          if has_severity(protocol) else None),
        "faces": int(protocol["face"].nunique()),
    }

"""Per-image attributes (sex, age, view, ...) that subgroup reports split the test split by, read from a dataset's
own table by its loader: NIH's `Patient Gender` / `Patient Age` / `View Position` and CheXpert's `Sex` / `Age` /
`AP/PA` as `sex` / `age` / `view`, and the columns a `csv:` spec names with `?subgroups=sex,age`. MedMNIST files
carry none.

The values are kept as read, with two rules: an age column (named `age`, `Patient Age`, `patient_age`, any case)
becomes years as float (NaN where missing), from numbers or DICOM age strings (`060Y`, `018M`, `003W`, `010D`:
the NIH sample's form); every other column is a category (text; a missing cell is MISSING). Nothing here bands
or scores: analysis.subgroups does, at the export and in the search's description. Attributes never reach a
trial's inputs or any choice a search makes.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from trainables.errors import UserError

MISSING = "unknown"  # a category attribute's missing cell
MAX_CATEGORIES = 30  # more distinct values than this is a measurement, not a subgroup: band it first
NIH_ATTRIBUTES = {"sex": "Patient Gender", "age": "Patient Age", "view": "View Position"}  # name -> NIH column
CHEXPERT_ATTRIBUTES = {"sex": "Sex", "age": "Age", "view": "AP/PA"}  # name -> CheXpert column (AP/PA: blank on laterals)
_AGE_STRING = re.compile(r"^\s*(\d{1,3})\s*([DWMY]?)\s*$", re.IGNORECASE)  # DICOM AS: nnnD / nnnW / nnnM / nnnY
_DAYS_PER = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25, "": 365.25}  # a bare number is years


def is_age(name: str) -> bool:
    """`age`, `Patient Age`, `patient_age`: a column holding ages, in years or DICOM age strings."""
    return "age" in re.split(r"[\s_]+", name.strip().lower())


def parse_age(values: pd.Series, where: str) -> np.ndarray:
    """Years as float64 (NaN where missing) from numbers or DICOM age strings ('060Y' -> 60.0, '006M' -> 0.5);
    anything else is a UserError naming the first bad cell."""
    if pd.api.types.is_numeric_dtype(values):
        return values.to_numpy(np.float64)
    years = np.full(len(values), np.nan)
    for row, value in enumerate(values):
        if pd.isna(value) or not str(value).strip():
            continue
        match = _AGE_STRING.match(str(value))
        if match is None:
            raise UserError(f"{where} row {row + 1}: age {value!r} is neither a number of years nor a DICOM age "
                            "string like 060Y, 018M, 003W, 010D; fix the cell or leave it empty")
        years[row] = int(match.group(1)) * _DAYS_PER[match.group(2).upper()] / 365.25
    return years


def categories(values: pd.Series, name: str, where: str) -> np.ndarray:
    """The column as text categories (MISSING for an empty cell); a column with more than MAX_CATEGORIES distinct
    values is a UserError (a measurement to band, not a subgroup)."""
    distinct = values.dropna().unique()
    if len(distinct) > MAX_CATEGORIES:
        raise UserError(f"{where}: subgroup column {name!r} has {len(distinct)} distinct values, more than "
                        f"{MAX_CATEGORIES}; subgroups are categories (an age column is banded by itself): add a "
                        "column of bands and name that one")
    text = values.astype(object).where(values.notna(), MISSING).astype(str).str.strip()
    return text.where(text != "", MISSING).to_numpy(dtype=str)


def read_attributes(table: pd.DataFrame, columns: dict[str, str], where: str) -> dict[str, np.ndarray]:
    """{attribute name: one value per row} for `columns` ({attribute name: column of `table`}); an age column
    (by its name or its attribute's) becomes years, the others categories."""
    return {name: parse_age(table[column], where) if is_age(name) or is_age(column)
            else categories(table[column], column, where) for name, column in columns.items()}


def subgroup_columns(option: str | None, table: pd.DataFrame, where: str) -> dict[str, str]:
    """`?subgroups=sex,age` -> {"sex": "sex", "age": "age"}; an unknown column is a UserError listing the others."""
    if not option:
        return {}
    names = [name.strip() for name in option.split(",") if name.strip()]
    missing = [name for name in names if name not in table.columns]
    if missing:
        raise UserError(f"{where} has no column {missing[0]!r} for subgroups=; its columns are "
                        f"{', '.join(map(str, table.columns))}")
    return {name: name for name in names}

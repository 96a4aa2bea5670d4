"""`chexpert:PATH`: CheXpert as downloaded (Irvin et al., AAAI 2019), e.g. `CheXpert-v1.0-small/`.

PATH is the folder holding `train.csv` and `valid.csv` (or either CSV). Paths in the CSVs start with the folder's
own name (`CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`), so they are read relative to its
parent; the full-resolution `CheXpert-v1.0/` is read the same way.

Splits. `valid.csv` (234 images of 200 patients, labelled by a consensus of radiologists, no uncertain labels) is
the fixed test split, as in the CheXpert paper's own evaluation: its labels are the only ones in the download that
do not come from the report labeller. Validation for selection is cut from `train.csv` by patient (`patientNNNNN`
in the path), as every medtune train/val split of grouped data is.

Labels: the 14 observations in the CSV's column order, multi-label; `findings=competition` keeps the five of the
CheXpert competition (Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion). A blank cell (not
mentioned in the report) is 0. Uncertain cells (-1) follow `uncertain=`, a policy of the paper:
    zeros    U-Zeros: uncertain = negative (the default)
    ones     U-Ones: uncertain = positive (the paper's best for Atelectasis and Edema)
    ignore   the images with an uncertain label among the chosen findings are left out of the development pool.
             The paper's U-Ignore masks the label in the loss instead; medtune's multi-label losses and metrics
             take complete label rows, so the image goes. The loader prints how many it left out.
Views: `view=frontal` (default) keeps frontal images, as most CheXpert models; `view=all` keeps laterals too.

MIMIC-CXR has no loader of its own: its labels (`mimic-cxr-2.0.0-chexpert.csv`, the same 14 observations) and
metadata join into one CSV per image that `csv:` reads (README, "Your own data").
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from trainables.data.attributes import CHEXPERT_ATTRIBUTES, read_attributes
from trainables.data.folder_datasets import FileDataset, FileTable, assemble, parse_spec
from trainables.data.registry import register_dataset
from trainables.data.splits import SPLIT_VERSION
from trainables.errors import UserError

OBSERVATIONS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                "Fracture", "Support Devices")
COMPETITION = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
UNCERTAIN_CHOICES = ("zeros", "ones", "ignore")
VIEW_CHOICES = ("frontal", "all")
FINDINGS_CHOICES = ("all", "competition")
_OPTIONS = ("uncertain", "view", "findings")
_PATIENT = re.compile(r"(patient\d+)")


def _choice(options: dict, key: str, choices: tuple[str, ...]) -> str:
    value = options.get(key, choices[0])
    if value not in choices:
        raise UserError(f"Invalid chexpert {key} {value!r}; use one of {', '.join(choices)}")
    return value


def _folder(location: Path) -> Path:
    folder = location.parent if location.is_file() else location
    missing = [name for name in ("train.csv", "valid.csv") if not (folder / name).is_file()]
    if missing:
        raise UserError(f"chexpert: no {missing[0]} in {folder}; give the CheXpert folder that holds train.csv and "
                        "valid.csv (e.g. chexpert:/data/CheXpert-v1.0-small)")
    return folder


def _read(file: Path, findings: tuple[str, ...]) -> pd.DataFrame:
    try:
        table = pd.read_csv(file)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise UserError(f"Cannot read {file} as CSV ({type(error).__name__}); give CheXpert's own train.csv") from error
    needed = ["Path", "Frontal/Lateral", *findings]
    missing = [column for column in needed if column not in table.columns]
    if missing:
        raise UserError(f"{file} has no column {missing[0]!r}: not a CheXpert label table (it needs {', '.join(needed)})")
    return table


def _image_path(folder: Path, relative: str) -> str:
    """CSV paths begin with the download's folder name; one that does not is relative to the folder itself."""
    first, _, rest = relative.partition("/")
    return str(folder.parent / relative if first == folder.name or not rest else folder / rest)


def read_chexpert(location: Path, options: dict) -> tuple[tuple[str, ...], FileTable]:
    """(label names, table) of the CheXpert download at `location`."""
    uncertain = _choice(options, "uncertain", UNCERTAIN_CHOICES)
    view = _choice(options, "view", VIEW_CHOICES)
    findings = OBSERVATIONS if _choice(options, "findings", FINDINGS_CHOICES) == "all" else COMPETITION
    folder = _folder(location)
    train, test = _read(folder / "train.csv", findings), _read(folder / "valid.csv", findings)
    table = pd.concat([train.assign(_test=False), test.assign(_test=True)], ignore_index=True)
    if view == "frontal":
        table = table[table["Frontal/Lateral"].astype(str).str.lower() == "frontal"]
    values = table[list(findings)].fillna(0.0).to_numpy(float)
    unsure = (values == -1).any(axis=1) & ~table["_test"].to_numpy()
    notes = []
    if uncertain == "ignore" and unsure.any():
        notes.append(f"left out {int(unsure.sum())} of {int((~table['_test']).sum())} development images with an "
                     f"uncertain label (uncertain=ignore)")
        table, values = table[~unsure], values[~unsure]
    labels = np.where(values == -1, 1.0 if uncertain == "ones" else 0.0, values).astype(np.uint8)
    paths = table["Path"].astype(str)
    patients = paths.str.extract(_PATIENT, expand=False)
    if patients.isna().any():
        raise UserError(f"chexpert: no patientNNNNN in the path {paths[patients.isna()].iloc[0]!r}; CheXpert's paths "
                        "name the patient, and the splits keep each patient whole")
    files = [_image_path(folder, p) for p in paths]
    attributes = read_attributes(table, {k: c for k, c in CHEXPERT_ATTRIBUTES.items() if c in table.columns}, str(folder))
    return findings, FileTable(files, labels, patients.to_numpy(), table["_test"].to_numpy(), notes=tuple(notes),
                               attributes=attributes)


@register_dataset("chexpert")
def load_chexpert(*, path: str | None, image_size: int, data_root: Path, skip_bad_images: bool = False,
                  split_version: int = SPLIT_VERSION) -> FileDataset:
    location, options = parse_spec("chexpert", path, data_root, extra=_OPTIONS)
    findings, table = read_chexpert(location, options)
    return assemble("chexpert", findings, table, image_size=image_size, options=options,
                    skip_bad_images=skip_bad_images, split_version=split_version)

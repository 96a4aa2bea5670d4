"""chexpert: CheXpert as downloaded (train.csv / valid.csv, frontal and lateral, uncertain labels), on a fixture in
its layout whose pixels are real chest X-rays (the NIH sample's). About 2 s: 40 small JPEGs decoded."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import real_data
from PIL import Image

from trainables.data.chexpert import COMPETITION, OBSERVATIONS
from trainables.data.datasets import load_dataset
from trainables.errors import UserError

load = load_dataset.__wrapped__  # no per-process memo: each test reads its own files
TRAIN_PATIENTS, TEST_PATIENTS = 12, 4


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTUNE_CACHE_DIR", str(tmp_path / "cache"))


def _row(path: str, view: str, values: dict) -> dict:
    row = {"Path": path, "Sex": "Female", "Age": 60, "Frontal/Lateral": view, "AP/PA": "AP" if view == "Frontal" else ""}
    return {**row, **{name: values.get(name, np.nan) for name in OBSERVATIONS}}


@pytest.fixture
def download(tmp_path):
    """CheXpert-v1.0-small/{train,valid}.csv and train/patientNNNNN/studyK/viewV_{frontal,lateral}.jpg. Patient p's
    frontal image has Edema = 1, 0 or uncertain (-1) by p % 3, Cardiomegaly blank (not mentioned); laterals are 1."""
    sample = sorted((real_data("nih_chestxray14_sample") / "images").glob("*.png"))
    root = tmp_path / "CheXpert-v1.0-small"
    rows = {"train": [], "valid": []}
    image = 0
    for split, patients, first in (("train", TRAIN_PATIENTS, 1), ("valid", TEST_PATIENTS, 64541)):
        for p in range(first, first + patients):
            for view, file in (("Frontal", "view1_frontal.jpg"), ("Lateral", "view2_lateral.jpg")):
                relative = f"{root.name}/{split}/patient{p:05d}/study1/{file}"
                (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
                Image.open(sample[image]).convert("L").save(tmp_path / relative)
                image += 1
                edema = 1.0 if view == "Lateral" else [1.0, 0.0, -1.0 if split == "train" else 1.0][p % 3]
                rows[split].append(_row(relative, view, {"Edema": edema, "Atelectasis": 0.0}))
    for split, table in rows.items():
        pd.DataFrame(table).to_csv(root / f"{split}.csv", index=False)
    return root


def test_valid_csv_is_the_fixed_test_split_and_no_patient_is_on_both_sides(download):
    data = load(f"chexpert:{download}", image_size=32)
    assert data.task == "multilabel" and data.class_names == OBSERVATIONS
    assert len(data.test) == TEST_PATIENTS and len(data.dev) == TRAIN_PATIENTS  # frontal images only, by default
    assert not set(data.dev.groups) & set(data.test.groups)
    assert all("/valid/" in f for f in data.test_files) and all("frontal" in f for f in data.dev_files)
    assert data.dev.images.shape[1:] == (32, 32, 1)
    assert {k: set(v.tolist()) for k, v in data.test.attributes.items()} == {"sex": {"Female"}, "age": {60.0}, "view": {"AP"}}
    wide = load(f"chexpert:{download / 'train.csv'}?view=all", image_size=32)  # a CSV as PATH: its folder
    assert len(wide.dev) == 2 * TRAIN_PATIENTS and len(wide.test) == 2 * TEST_PATIENTS


@pytest.mark.parametrize(("policy", "uncertain_becomes"), [("zeros", 0), ("ones", 1)])
def test_uncertain_labels_follow_the_policy_and_blanks_are_negative(download, policy, uncertain_becomes):
    data = load(f"chexpert:{download}?uncertain={policy}", image_size=32)
    edema, cardiomegaly = OBSERVATIONS.index("Edema"), OBSERVATIONS.index("Cardiomegaly")
    patients = np.array([int(g.removeprefix("patient")) for g in data.dev.groups])
    expected = np.select([patients % 3 == 0, patients % 3 == 1], [1, 0], uncertain_becomes)
    assert np.array_equal(data.dev.labels[:, edema], expected)
    assert not data.dev.labels[:, cardiomegaly].any()


def test_uncertain_ignore_leaves_those_images_out_and_says_how_many(download, capsys):
    data = load(f"chexpert:{download}?uncertain=ignore", image_size=32)
    patients = [int(g.removeprefix("patient")) for g in data.dev.groups]
    assert len(data.dev) == TRAIN_PATIENTS - TRAIN_PATIENTS // 3 and all(p % 3 != 2 for p in patients)
    assert len(data.test) == TEST_PATIENTS  # the test split has no uncertain label and loses nothing
    assert "left out 4 of 12 development images with an uncertain label" in capsys.readouterr().out


def test_competition_findings_are_the_five_in_their_order(download):
    data = load(f"chexpert:{download}?findings=competition", image_size=32)
    assert data.class_names == COMPETITION and data.dev.labels.shape[1] == 5


@pytest.mark.parametrize(("spec", "problem"), [
    ("?uncertain=maybe", "Invalid chexpert uncertain 'maybe'; use one of zeros, ones, ignore"),
    ("?view=ap", "Invalid chexpert view 'ap'"),
    ("?test_fraction=0.2", "test_fraction does not apply"),
])
def test_bad_options_are_one_line_each(download, spec, problem):
    with pytest.raises(UserError, match=problem.replace("(", r"\(")) as error:
        load(f"chexpert:{download}{spec}", image_size=32)
    assert "\n" not in str(error.value)


def test_a_folder_without_valid_csv_is_named(download):
    (download / "valid.csv").unlink()
    with pytest.raises(UserError, match="no valid.csv in .*give the CheXpert folder"):
        load(f"chexpert:{download}", image_size=32)

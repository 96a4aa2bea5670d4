"""The source studies' datasets as downloaded (issue 13): tiny fixtures in each layout, nothing downloaded.

COVID-19 Radiography (class/{images,masks}/), Kaggle blood cells (TRAIN/TEST/TEST_SIMPLE), the NIH ChestX-ray14
sample (sample_labels.csv), Kermany chest_xray/{train,val,test}.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import trainables.data.image_cache as image_cache
from trainables.data.datasets import load_dataset
from trainables.data.folder_datasets import (
    NIH_FINDINGS,
    NIH_NO_FINDING,
    SMALL_VAL_IMAGES,
    FileTable,
    _split_folders,
    _too_small,
    merge_small_val,
    read_nih,
)
from trainables.data.leaks import format_leak_report, leak_report
from trainables.data.splits import train_val_indices
from trainables.errors import UserError

load = load_dataset.__wrapped__  # bypass the per-process memo
COVID_CLASSES = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")
CELLS = ("EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL")
_seed = iter(range(1, 1_000_000))


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    """Caches go to a fresh folder, never ~/.cache/medtune."""
    monkeypatch.setenv("MEDTUNE_CACHE_DIR", str(tmp_path_factory.mktemp("image_cache")))


def write_images(folder: Path, count: int, fmt: str = "png", colour: bool = False) -> list[Path]:
    """`count` different 8 px noise images in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        rng = np.random.default_rng(next(_seed))
        pixels = rng.integers(0, 256, (8, 8, 3) if colour else (8, 8), dtype=np.uint8)
        paths.append(folder / f"{folder.parent.name}-{i}.{fmt}")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def one_line_error(spec: str) -> str:
    with pytest.raises(UserError) as error:
        load(spec, image_size=8)
    assert "\n" not in str(error.value)
    return str(error.value)


# --- COVID-19 Radiography Database ----------------------------------------------------------------

@pytest.fixture(scope="module")
def covid(tmp_path_factory) -> Path:
    """<root>/CLASS/{images,masks}/*.png (5 of each per class) and the metadata spreadsheets at the root."""
    root = tmp_path_factory.mktemp("covid") / "COVID-19 Radiography Database"
    for name in COVID_CLASSES:
        write_images(root / name / "images", 5)
        write_images(root / name / "masks", 5)
        (root / f"{name}.metadata.xlsx").write_bytes(b"PK\x03\x04 spreadsheet")
    (root / "README.md.txt").write_text("COVID-19 Radiography Database")
    return root


def test_covid_masks_never_reach_the_image_cache_and_the_class_is_the_folder_above_images(covid, monkeypatch, capsys):
    decoded = []
    original = image_cache.decode_image
    monkeypatch.setattr(image_cache, "decode_image", lambda path, *args: (decoded.append(str(path)), original(path, *args))[1])
    data = load(f"imagefolder:{covid}", image_size=8)
    files = data.dev_files + data.test_files
    assert data.class_names == COVID_CLASSES and data.task == "multiclass"
    assert len(np.load(data.cache_file, mmap_mode="r")) == 20 == len(files)  # the images/ count, no masks
    assert all("/images/" in f for f in files) and not any("/masks/" in f for f in files + tuple(decoded))
    assert np.bincount(np.r_[data.dev.labels, data.test.labels]).tolist() == [5, 5, 5, 5]
    assert {Path(f).parent.parent.name for f in files if "Viral" in f} == {"Viral Pneumonia"}  # spaces are fine
    assert "left out 20 images in mask/masks folders" in capsys.readouterr().out
    assert any("segmentation masks" in note for note in data.notes)


# --- blood cells (Kaggle) -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def blood(tmp_path_factory) -> Path:
    """dataset2-master/dataset2-master/images/{TRAIN,TEST,TEST_SIMPLE}/CELL/*.jpeg, as the archive unpacks."""
    root = tmp_path_factory.mktemp("blood") / "dataset2-master"
    images = root / "dataset2-master" / "images"
    for split, count in (("TRAIN", 3), ("TEST", 2), ("TEST_SIMPLE", 1)):
        for cell in CELLS:
            write_images(images / split / cell, count, fmt="jpeg", colour=True)
    return root


def test_blood_cells_are_four_cell_types_and_test_simple_is_ignored_with_a_note(blood, capsys):
    data = load(f"imagefolder:{blood}", image_size=8)
    assert data.class_names == CELLS and (len(data.dev), len(data.test)) == (12, 8) and data.channels == 3
    assert all("/TEST/" in f for f in data.test_files) and all("/TRAIN/" in f for f in data.dev_files)
    out = capsys.readouterr().out
    ignored = [line for line in out.splitlines() if "ignored folder" in line]
    assert len(ignored) == 1 and "TEST_SIMPLE" in ignored[0] and "?test=TEST_SIMPLE" in ignored[0]
    assert "reading " in out and str(Path("dataset2-master") / "images") in out  # the wrappers were stepped into


def test_test_option_picks_test_simple_as_the_test_split(blood):
    data = load(f"imagefolder:{blood}?test=test_simple", image_size=8)
    assert len(data.test) == 4 and all("/TEST_SIMPLE/" in f for f in data.test_files)
    assert len(data.dev) == 12 and any("ignored folder(s) TEST in" in note for note in data.notes)


@pytest.mark.parametrize("names, expected", [
    (("TRAIN", "TEST"), {"train": "TRAIN", "test": "TEST"}),
    (("Train", "Test", "Val"), {"train": "Train", "val": "Val", "test": "Test"}),
    (("Training", "Testing"), {"train": "Training", "test": "Testing"}),
    (("train", "validation", "test", "chest_xray", "__MACOSX"), {"train": "train", "val": "validation", "test": "test"}),
    (("NORMAL", "test"), {}),  # a class folder named test is a class, as before
])
def test_split_folders_are_matched_in_any_case(tmp_path, names, expected):
    for name in names:
        (tmp_path / name).mkdir()
    assert {split: folder.name for split, folder in _split_folders(tmp_path, {}).items()} == expected


# --- NIH ChestX-ray14 sample ----------------------------------------------------------------------

SAMPLE_ROWS = [  # (image, findings, patient): 12 patients, two images each
    (f"{p:08d}_00{i}.png", findings, p) for p, pair in enumerate([
        ("No Finding", "Effusion"), ("Atelectasis", "No Finding"), ("Effusion|Infiltration", "No Finding"),
        ("Cardiomegaly", "Effusion"), ("No Finding", "No Finding"), ("Infiltration", "Atelectasis"),
        ("Mass", "No Finding"), ("Effusion", "Nodule"), ("No Finding", "Atelectasis|Effusion"),
        ("Infiltration", "No Finding"), ("Cardiomegaly|Effusion", "Mass"), ("No Finding", "Nodule")], start=1)
    for i, findings in enumerate(pair)]


def write_nih_sample(root: Path, images: str) -> Path:
    """sample_labels.csv (the Kaggle sample's columns) at `root`, its images under `root/images`."""
    (root / images).mkdir(parents=True)
    for name, _, _ in SAMPLE_ROWS:
        rng = np.random.default_rng(next(_seed))
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / images / name)
    table = pd.DataFrame(SAMPLE_ROWS, columns=["Image Index", "Finding Labels", "Patient ID"])
    table.insert(2, "Follow-up #", 0)
    table["Patient Age"], table["Patient Gender"], table["View Position"] = "060Y", "M", "PA"
    table.to_csv(root / "sample_labels.csv", index=False)
    return root / "sample_labels.csv"


@pytest.fixture(scope="module")
def nih_sample(tmp_path_factory) -> Path:
    return write_nih_sample(tmp_path_factory.mktemp("nih") / "sample", "sample/images")


def test_nih_sample_labels_csv_by_path_is_read_with_images_in_sample_images(nih_sample):
    data = load(f"nih_chestxray14:{nih_sample}", image_size=8)
    assert data.class_names == NIH_FINDINGS and data.task == "multilabel"
    assert len(data.dev) + len(data.test) == 24 and all("/sample/images/" in f for f in data.dev_files)
    assert not set(data.dev.groups) & set(data.test.groups)  # patients kept whole
    table = read_nih(nih_sample)
    no_finding = np.array([findings == "No Finding" for _, findings, _ in SAMPLE_ROWS])
    assert table.labels[no_finding].sum() == 0 and table.labels[~no_finding].sum(axis=1).min() == 1  # default: zeros


def test_nih_folder_finds_sample_labels_csv_or_the_csv_option_names_it(nih_sample, tmp_path):
    folder = nih_sample.parent
    assert read_nih(folder).files == read_nih(nih_sample).files
    assert read_nih(folder, {"csv": "sample_labels.csv"}).files == read_nih(nih_sample).files
    elsewhere = write_nih_sample(tmp_path, "images")
    assert all("/images/" in f and "/sample/" not in f for f in read_nih(elsewhere).files)


def test_nih_no_finding_label_is_a_fifteenth_label(nih_sample):
    data = load(f"nih_chestxray14:{nih_sample}?no_finding=label", image_size=8)
    assert data.class_names == (*NIH_FINDINGS, NIH_NO_FINDING) and data.dev.labels.shape[1] == 15
    labels = read_nih(nih_sample, {"no_finding": "label"}).labels
    no_finding = np.array([findings == "No Finding" for _, findings, _ in SAMPLE_ROWS])
    assert labels[no_finding, 14].all() and labels[no_finding, :14].sum() == 0 and labels[~no_finding, 14].sum() == 0


# --- Kermany chest_xray/{train,val,test} ----------------------------------------------------------

@pytest.fixture(scope="module")
def kermany(tmp_path_factory) -> Path:
    """chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}: 8 + 2 + 3 images per class."""
    root = tmp_path_factory.mktemp("kermany") / "chest_xray"
    for split, count in (("train", 8), ("val", 2), ("test", 3)):
        for name in ("NORMAL", "PNEUMONIA"):
            write_images(root / split / name, count, fmt="jpeg")
    return root


def test_kermany_tiny_val_is_merged_into_the_development_pool_and_the_leak_report_says_so(kermany):
    data = load(f"imagefolder:{kermany}", image_size=8)
    assert data.official_val is None and (len(data.dev), len(data.test)) == (20, 6)
    assert sum("/val/" in f for f in data.dev_files) == 4
    train_idx, val_idx = train_val_indices(data, None, 0)
    assert (len(train_idx), len(val_idx)) == (18, 2)  # the trainer's 90/10 of the pool, not the 4 official images
    report = leak_report(data, train_idx, val_idx)
    merged = "the official val/ folder (4 images) was merged into the development pool: too small to select on"
    assert merged in format_leak_report(report) and report["leak_detail"]["notes"][0].startswith(merged)  # and MLflow's JSON


def test_official_val_keep_keeps_the_tiny_val_and_merge_merges_a_large_one(kermany):
    kept = load(f"imagefolder:{kermany}?official_val=keep", image_size=8)
    assert kept.official_val.sum() == 4 and kept.notes == ()
    rows = np.arange(1000)
    big = FileTable([f"{i}.png" for i in rows], rows % 2, None, rows >= 900, rows < 150)
    assert merge_small_val(big, {}) is big  # 150 images, 15 % of the pool: selected on as it is
    assert merge_small_val(big, {"official_val": "merge"}).val is None


def test_the_small_val_threshold_is_images_or_share_of_the_pool():
    assert _too_small(SMALL_VAL_IMAGES - 1, 1_000) and not _too_small(SMALL_VAL_IMAGES, 1_000)
    assert _too_small(150, 10_000) and not _too_small(250, 10_000)  # 2 % of 10,000 = 200


# --- every option is validated --------------------------------------------------------------------

@pytest.mark.parametrize("spec, problem", [
    ("imagefolder:{kermany}?official_val=sometimes", "Invalid official_val 'sometimes'"),
    ("imagefolder:{covid}?official_val=keep", "official_val applies only when PATH has a val folder"),
    ("imagefolder:{blood}?test=TEST_SIMPLEX", "test='TEST_SIMPLEX': no such folder in .*TEST, TEST_SIMPLE, TRAIN"),
    ("imagefolder:{blood}?val=TEST", "folder 'TEST' is named for two splits"),
    ("imagefolder:{blood}?tset=TEST", "Unknown imagefolder option 'tset'"),
    ("nih_chestxray14:{nih}?no_finding=yes", "Invalid no_finding 'yes'; use zeros .* or label"),
    ("nih_chestxray14:{nih_folder}?csv=labels.csv", r"csv='labels.csv': .* does not exist"),
    ("nih_chestxray14:{nih}?csv=sample_labels.csv", "is already the label CSV; remove csv="),
    ("nih_chestxray14:{nih}?nofinding=label", "Unknown nih_chestxray14 option 'nofinding'"),
    ("nih_chestxray14:{covid}", r"No Data_Entry_2017\*.csv or sample_labels.csv in .*add \?csv=FILE"),
    ("nih_chestxray14:{covid}/README.md.txt", "is not an NIH label table"),
])
def test_new_options_and_layout_mistakes_are_one_line_user_errors(spec, problem, kermany, covid, blood, nih_sample):
    places = {"kermany": kermany, "covid": covid, "blood": blood, "nih": nih_sample, "nih_folder": nih_sample.parent}
    assert re.search(problem, one_line_error(spec.format(**places)))


def test_two_folders_for_one_split_is_ambiguous(tmp_path):
    for split in ("train", "val", "validation", "test"):
        write_images(tmp_path / split / "a", 1)
        write_images(tmp_path / split / "b", 1)
    assert "has 2 val folders (val, validation); choose one with ?val=FOLDER" in one_line_error(f"imagefolder:{tmp_path}")

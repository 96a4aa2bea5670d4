"""imagefolder:, nih_chestxray14: and csv: datasets, and the decode-once image cache."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, real_data
from PIL import Image
from sklearn.model_selection import GroupShuffleSplit

import trainables.data.image_cache as image_cache
from trainables.data.datasets import load_dataset
from trainables.data.folder_datasets import HOLDOUT_SEED, NIH_FINDINGS, FileDataset, read_nih
from trainables.data.splits import MULTILABEL_GROUPED_TOLERANCE, share_gap, train_val_indices
from trainables.errors import UserError
from trainables.training.epochs import train

load = load_dataset.__wrapped__  # bypass the per-process memo: every test reads the files as they are now


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Every cache of this module goes to a fresh folder: the first Kermany load really builds."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("image_cache")
        patch.setenv("MEDTUNE_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(autouse=True)
def _isolated_cache(cache_dir):
    """Tests that write their own tiny folders must not touch ~/.cache/medtune either."""


@pytest.fixture(scope="module")
def kermany(cache_dir):
    spec = f"imagefolder:{real_data('chest_xray')}"
    return spec, load(spec, image_size=64)


@pytest.fixture(scope="module")
def nih(cache_dir):
    spec = f"nih_chestxray14:{real_data('nih_chestxray14_sample')}"
    return spec, load(spec, image_size=64)


def counting_decoder(monkeypatch) -> list:
    """Replace the one decode function by a counting wrapper; returns the list of decoded files."""
    calls, original = [], image_cache.decode_image

    def decode(path, image_size, mode):
        calls.append(path)
        return original(path, image_size, mode)

    monkeypatch.setattr(image_cache, "decode_image", decode)
    return calls


def grey_picture(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


def write_folder(root, counts: dict, fmt: str = "png") -> None:
    """root/CLASS/NN.fmt grey noise images, every one different."""
    seed = 0
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            seed += 1
            Image.fromarray(grey_picture(seed)).save(root / name / f"{i:02d}.{fmt}")


# --- imagefolder ----------------------------------------------------------------------------------

@pytest.mark.integration
def test_kermany_train_and_test_folders_are_the_fixed_splits(kermany):
    _, data = kermany
    assert isinstance(data, FileDataset) and data.class_names == ("NORMAL", "PNEUMONIA") and data.task == "binary"
    assert data.dev.images.shape == (5216, 64, 64, 1) and data.test.images.shape == (624, 64, 64, 1)
    assert data.dev.images.dtype == np.uint8 and data.dev.labels.dtype == np.int64
    assert np.bincount(data.dev.labels).tolist() == [1341, 3875] and np.bincount(data.test.labels).tolist() == [234, 390]
    assert all("/test/" in f for f in data.test_files) and not any("/test/" in f for f in data.dev_files)
    assert data.official_val is None and data.dev.groups is None
    assert data.decoded_images == 5840 and 20 < data.dev.images[:100].mean() < 235  # real pictures, not zeros


@pytest.mark.integration
def test_second_load_reuses_the_cache_and_decodes_nothing(kermany, monkeypatch):
    spec, first = kermany
    decoded = counting_decoder(monkeypatch)
    again = load(spec, image_size=64)
    assert decoded == [] and again.decoded_images == 0 and again.cache_file == first.cache_file
    assert np.array_equal(again.dev.images[::500], first.dev.images[::500])
    assert isinstance(again.dev.images.base, np.memmap)  # rows of the cache, read when asked: no copy


def test_a_changed_file_rebuilds_the_cache(tmp_path, monkeypatch):
    write_folder(tmp_path, {"a": 5, "b": 5})
    first = load(f"imagefolder:{tmp_path}", image_size=16)
    Image.fromarray(255 - grey_picture(1)).save(tmp_path / "a" / "00.png")
    decoded = counting_decoder(monkeypatch)
    second = load(f"imagefolder:{tmp_path}", image_size=16)
    assert len(decoded) >= 10 and second.cache_file != first.cache_file


def test_without_train_test_folders_a_seeded_stratified_holdout_is_the_test_split(tmp_path):
    write_folder(tmp_path, {"benign": 10, "malignant": 10, ".hidden": 3})
    (tmp_path / "benign" / "._00.png").write_bytes(b"macOS resource fork")  # hidden: not an image
    data = load(f"imagefolder:{tmp_path}?test_fraction=0.3", image_size=16)
    assert data.class_names == ("benign", "malignant") and len(data.test) == 6 and len(data.dev) == 14
    assert np.bincount(data.test.labels).tolist() == [3, 3]
    assert not any("ignored" in note for note in data.notes)  # class folders are read, not ignored
    assert load(f"imagefolder:{tmp_path}?test_fraction=0.3", image_size=16).test_files == data.test_files
    assert len(load(f"imagefolder:{tmp_path}", image_size=16).test) == 4  # default fraction 0.2


def test_l_rgb_and_rgba_greys_become_the_same_one_channel_image(tmp_path):
    picture = grey_picture(7)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.fromarray(picture).save(tmp_path / name / "l.png")
        Image.fromarray(np.stack([picture] * 3, -1)).save(tmp_path / name / "rgb.png")
        Image.fromarray(np.dstack([picture] * 3 + [np.full_like(picture, 255)])).save(tmp_path / name / "rgba.png")
    transparent = np.dstack([picture] * 3 + [np.zeros_like(picture)])
    Image.fromarray(transparent).save(tmp_path / "a" / "transparent.png")
    data = load(f"imagefolder:{tmp_path}?test_fraction=0.25", image_size=16)
    images = dict(zip(data.dev_files + data.test_files, np.concatenate([data.dev.images, data.test.images])))
    assert data.channels == 1
    for name in ("a", "b"):
        for kind in ("rgb", "rgba"):
            assert np.array_equal(images[str(tmp_path / name / f"{kind}.png")], picture[..., None])
    assert images[str(tmp_path / "a" / "transparent.png")].max() == 0  # composited on black, not its hidden RGB


def test_genuinely_colour_images_keep_three_channels_unless_told(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    assert load(f"imagefolder:{tmp_path}", image_size=16).channels == 3
    assert load(f"imagefolder:{tmp_path}?channels=1", image_size=16).channels == 1


def test_corrupt_image_is_one_line_naming_the_file_or_is_skipped_and_counted(tmp_path, monkeypatch):
    write_folder(tmp_path, {"a": 6, "b": 6}, fmt="jpeg")
    bad = tmp_path / "b" / "broken.jpeg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(UserError) as error:
        load(f"imagefolder:{tmp_path}", image_size=16)
    message = str(error.value)
    assert "\n" not in message and str(bad) in message and "--skip-bad-images" in message
    decoded = counting_decoder(monkeypatch)
    data = load(f"imagefolder:{tmp_path}", image_size=16, skip_bad_images=True)
    assert data.skipped_files == (str(bad),) and len(data.dev) + len(data.test) == 12
    assert str(bad) not in data.dev_files + data.test_files and decoded == []  # the failed build was cached


def cache_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("image cache:")]


def test_the_cache_says_when_it_is_built_and_when_it_is_reused(tmp_path, capsys):
    write_folder(tmp_path, {"a": 3, "b": 3})
    first = load(f"imagefolder:{tmp_path}?test_fraction=0.34", image_size=8)
    second = load(f"imagefolder:{tmp_path}?test_fraction=0.34", image_size=8)
    built, reused = cache_lines(capsys.readouterr().out)
    assert built == f"image cache: built 6 decoded images at {first.cache_file}"
    assert reused == f"image cache: reusing 6 decoded images at {first.cache_file}"
    assert second.cache_file == first.cache_file and Path(first.cache_file).is_file()


BUILD_IN_A_CHILD = """
import hashlib, json, os, sys, time
import numpy as np
import trainables.data.image_cache as image_cache

files, ready, go, cache_dir = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
decode = image_cache.decode_image
image_cache.decode_image = lambda *args: (time.sleep(0.02), decode(*args))[1]  # a build long enough to overlap
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.005)
cached = image_cache.cached_images(files, image_size=8, cache_dir=cache_dir)
print(json.dumps({"decoded": cached.decoded, "sha": hashlib.sha256(np.asarray(cached.images).tobytes()).hexdigest()}))
"""


def test_two_processes_building_one_cache_build_it_once_and_read_the_same_array(tmp_path):
    write_folder(tmp_path / "images", {"a": 10, "b": 10})
    files = sorted(str(p) for p in (tmp_path / "images").rglob("*.png"))
    go = tmp_path / "go"
    children = [subprocess.Popen([sys.executable, "-c", BUILD_IN_A_CHILD, json.dumps(files), str(tmp_path / f"ready{i}"),
                                  str(go), str(tmp_path / "cache")], cwd=REPO, stdout=subprocess.PIPE, text=True)
                for i in range(2)]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()  # both start together: one builds under the lock, the other waits and then reuses
    results = [json.loads(child.communicate(timeout=60)[0].splitlines()[-1]) for child in children]
    assert sorted(r["decoded"] for r in results) == [0, 20]
    assert results[0]["sha"] == results[1]["sha"]
    expected = np.stack([image_cache.decode_image(f, 8, "L") for f in files])
    cached = image_cache.cached_images(files, image_size=8, cache_dir=tmp_path / "cache")
    assert cached.decoded == 0 and np.array_equal(cached.images, expected)  # complete, in order
    assert [p.suffix for p in (tmp_path / "cache").glob("*.npy")] == [".npy"]  # one cache, no temp files left


@pytest.mark.parametrize("spec, problem", [
    ("imagefolder:/no/such/folder", "does not exist"),
    ("imagefolder:{tmp}?test_fraction=2", "Invalid test_fraction"),
    ("imagefolder:{tmp}?testfraction=0.2", "Unknown imagefolder option 'testfraction'"),
    ("imagefolder:{tmp}?channels=2", "Invalid channels"),
    ("imagefolder:", "needs a path"),
    ("imagefolder:{tmp}/a", "No .png/.jpg/.jpeg images under"),
])
def test_bad_specs_are_user_errors(tmp_path, spec, problem):
    write_folder(tmp_path, {"a": 5, "b": 5})
    with pytest.raises(UserError, match=problem):
        load(spec.format(tmp=tmp_path), image_size=16)


# --- NIH ChestX-ray14 -----------------------------------------------------------------------------

@pytest.mark.integration
def test_nih_findings_are_14_labels_in_fixed_order_and_no_finding_is_all_zeros(nih):
    _, data = nih
    assert data.class_names == NIH_FINDINGS and len(NIH_FINDINGS) == 14 and NIH_FINDINGS[0] == "Atelectasis"
    assert data.task == "multilabel" and data.channels == 1 and data.dev.labels.dtype == np.uint8
    table = pd.read_csv(real_data("nih_chestxray14_sample") / "Data_Entry_2017_v2020.csv").set_index("Image Index")
    labels = np.concatenate([data.dev.labels, data.test.labels])
    files = [f.rsplit("/", 1)[-1] for f in data.dev_files + data.test_files]
    assert len(files) == 1000
    for name, row in zip(files, labels):
        findings = set(table.loc[name, "Finding Labels"].split("|")) - {"No Finding"}
        assert {NIH_FINDINGS[j] for j in np.flatnonzero(row)} == findings
    no_finding = table.loc[files, "Finding Labels"].eq("No Finding").to_numpy()
    assert no_finding.sum() == 499 and labels[no_finding].sum() == 0 and labels[~no_finding].sum(axis=1).min() >= 1


@pytest.mark.integration
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_nih_patient_is_in_two_splits(nih, seed):
    _, data = nih
    train_idx, val_idx = train_val_indices(data, 0.8, seed)
    train, val, test = (set(data.dev.groups[train_idx]), set(data.dev.groups[val_idx]), set(data.test.groups))
    assert not train & val and not train & test and not val & test
    assert len(train | val | test) == 264 and len(data.test) >= 100  # ~20 % held out, patients intact
    assert np.bincount(np.unique(data.dev.groups, return_inverse=True)[1]).max() > 1  # patients do repeat


@pytest.mark.integration
def test_nih_test_and_validation_splits_hold_every_finding_of_two_patients(nih):
    _, data = nih
    labels, groups = np.r_[data.dev.labels, data.test.labels], np.r_[data.dev.groups, data.test.groups]
    shared = [j for j in range(len(NIH_FINDINGS)) if len(set(groups[labels[:, j] == 1])) >= 2]
    assert NIH_FINDINGS.index("Edema") in shared and data.test.labels[:, shared].any(axis=0).all()
    assert share_gap(labels, np.arange(len(data.dev), len(labels))) <= MULTILABEL_GROUPED_TOLERANCE
    train_idx, val_idx = train_val_indices(data, 0.8, 0)
    in_dev = [j for j in shared if len(set(data.dev.groups[data.dev.labels[:, j] == 1])) >= 2]
    assert data.dev.labels[val_idx][:, in_dev].any(axis=0).all() and data.dev.labels[train_idx][:, in_dev].any(axis=0).all()
    assert share_gap(data.dev.labels, val_idx) <= MULTILABEL_GROUPED_TOLERANCE


@pytest.mark.integration
def test_split_version_1_rebuilds_the_test_split_old_searches_were_scored_on(nih):
    spec, data = nih
    table = read_nih(real_data("nih_chestxray14_sample"))
    splitter = GroupShuffleSplit(n_splits=1, test_size=0.2, random_state=HOLDOUT_SEED)
    _, held = next(splitter.split(np.arange(len(table.files)), groups=table.groups))
    old = load(spec, image_size=64, split_version=1)
    assert sorted(old.test_files) == sorted(np.asarray(table.files)[held]) and old.decoded_images == 0
    assert sorted(old.test_files) != sorted(data.test_files)


@pytest.mark.integration
def test_nih_official_test_list_is_the_test_split(tmp_path):
    source = real_data("nih_chestxray14_sample")
    (tmp_path / "images").symlink_to(source / "images")
    table = pd.read_csv(source / "Data_Entry_2017_v2020.csv")
    table.to_csv(tmp_path / "Data_Entry_2017_v2020.csv", index=False)
    listed = table.loc[table["Patient ID"] <= 30, "Image Index"].tolist()
    (tmp_path / "test_list.txt").write_text("\n".join(listed) + "\n")
    data = load(f"nih_chestxray14:{tmp_path}", image_size=64)
    assert sorted(f.rsplit("/", 1)[-1] for f in data.test_files) == sorted(listed)
    assert len(data.dev) == 1000 - len(listed)


@pytest.mark.integration
def test_multilabel_trial_on_nih_reports_macro_auc_exact_match_and_hamming_loss(nih):
    spec, data = nih
    small = dataclasses.replace(data, dev=data.dev.subset(np.arange(160)))  # two training batches: metrics, not skill
    final = train({"model": "simple_cnn", "epochs": 1, "batch_size": 64, "dataset": spec, "image_size": 64},
                  data=small, report=lambda metrics: None)
    per_label = [final[f"test_auc_{name.lower()}"] for name in data.class_names]
    assert len(per_label) == 14 and final["test_auc"] == pytest.approx(np.nanmean(per_label))  # macro AUC
    assert final["test_acc"] == pytest.approx(1 - final["test_hamming_loss"])
    assert final["test_exact_match"] <= final["test_acc"]  # all 14 labels right is rarer than one label right


# --- csv ------------------------------------------------------------------------------------------

@pytest.fixture
def nih_csv(tmp_path):
    """A labels.csv in the csv: layout over the NIH sample: relative paths, one row per image."""
    source = real_data("nih_chestxray14_sample")
    (tmp_path / "pictures").symlink_to(source / "images")
    table = pd.read_csv(source / "Data_Entry_2017_v2020.csv")
    findings = table["Finding Labels"]
    pd.DataFrame({"file": "pictures/" + table["Image Index"],
                  "effusion": np.where(findings.str.contains("Effusion"), "effusion", "other"),
                  "Effusion": findings.str.contains("Effusion").astype(int),
                  "Infiltration": findings.str.contains("Infiltration").astype(int),
                  "patient": "p" + table["Patient ID"].astype(str)}).to_csv(tmp_path / "labels.csv", index=False)
    return tmp_path / "labels.csv"


@pytest.mark.integration
def test_csv_with_a_group_column_never_splits_a_patient(nih_csv):
    data = load(f"csv:{nih_csv}?image=file&label=effusion&group=patient&test_fraction=0.25", image_size=64)
    assert data.class_names == ("effusion", "other") and data.task == "binary" and data.channels == 1
    assert np.bincount(np.r_[data.dev.labels, data.test.labels]).tolist() == [170, 830]
    assert data.test.labels.mean() == pytest.approx(0.83, abs=0.01) and len(data.test) == pytest.approx(250, abs=10)
    train_idx, val_idx = train_val_indices(data, 0.8, 0)
    assert data.dev.labels[val_idx].mean() == pytest.approx(data.dev.labels.mean(), abs=0.01)
    train, val, test = (set(data.dev.groups[train_idx]), set(data.dev.groups[val_idx]), set(data.test.groups))
    assert not train & val and not train & test and not val & test and len(train | val | test) == 264


@pytest.mark.integration
def test_csv_with_several_label_columns_is_multilabel(nih_csv):
    data = load(f"csv:{nih_csv}?image=file&label=Effusion,Infiltration", image_size=64)
    assert data.task == "multilabel" and data.class_names == ("Effusion", "Infiltration") and data.dev.groups is None
    assert np.r_[data.dev.labels, data.test.labels].sum(axis=0).tolist() == [170, 162]


def test_train_folder_without_test_folder_is_refused(tmp_path):
    write_folder(tmp_path / "train", {"a": 5, "b": 5})
    with pytest.raises(UserError, match="has train/ or val/ but no test/ folder"):
        load(f"imagefolder:{tmp_path}", image_size=16)


def test_csv_missing_column_names_it_and_lists_the_columns(tmp_path):
    (tmp_path / "labels.csv").write_text("path,diagnosis\na.png,x\n")
    with pytest.raises(UserError, match=r"no column 'image'; its columns are path, diagnosis"):
        load(f"csv:{tmp_path / 'labels.csv'}", image_size=16)


def test_csv_split_column_gives_fixed_splits_and_the_official_validation(tmp_path):
    write_folder(tmp_path, {"a": 6, "b": 6})
    rows = [(f"{c}/{i:02d}.png", c, ("train", "train", "train", "val", "test", "test")[i]) for c in "ab" for i in range(6)]
    pd.DataFrame(rows, columns=["image", "label", "split"]).to_csv(tmp_path / "labels.csv", index=False)
    data = load(f"csv:{tmp_path / 'labels.csv'}?split=split", image_size=16)
    assert len(data.test) == 4 and len(data.dev) == 8 and data.official_val.sum() == 2
    assert all(f.endswith(("04.png", "05.png")) for f in data.test_files)

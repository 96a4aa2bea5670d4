"""Stratified, patient-grouped splits (split_version 2) and the old unstratified one (version 1) for replays."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import real_data, toy_dataset
from sklearn.model_selection import GroupShuffleSplit

from trainables.data.folder_datasets import HOLDOUT_SEED, NIH_FINDINGS, read_nih
from trainables.data.splits import MULTILABEL_GROUPED_TOLERANCE, SPLIT_VERSION, holdout, share_gap, train_val_indices
from trainables.errors import UserError


def heavy_patients(n_patients: int = 120, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Single-label images of patients holding 1 to ~40 images each, one class per patient, like real archives."""
    rng = np.random.default_rng(seed)
    sizes = np.minimum(rng.geometric(0.3, n_patients), 40)
    sizes[:3] = (40, 30, 25)  # a few heavy patients: what a split by patient count gets wrong
    groups = np.repeat(np.arange(n_patients), sizes)
    labels = np.repeat(rng.choice(classes, n_patients, p=[0.6, 0.3, 0.1][:classes]), sizes).astype(np.int64)
    return labels, groups


def patients_with(labels: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per label (multi-label column): how many patients have it."""
    return np.array([len(set(groups[labels[:, j] == 1])) for j in range(labels.shape[1])])


def assert_every_shared_label_on_both_sides(labels, groups, keep, held):
    both = patients_with(labels, groups) >= 2
    assert labels[held][:, both].any(axis=0).all() and labels[keep][:, both].any(axis=0).all()


def assert_patients_whole(groups, keep, held):
    assert not set(groups[keep]) & set(groups[held]) and len(keep) + len(held) == len(groups)


@pytest.fixture(scope="module")
def nih_table():
    """Labels and patient IDs of the real NIH sample (no pixels needed to split)."""
    table = read_nih(real_data("nih_chestxray14_sample"))
    return table.labels, table.groups


@pytest.fixture(scope="module")
def nih_holdout(nih_table):
    """(keep, held) of the sample's test hold-out, made as folder_datasets makes it."""
    labels, groups = nih_table
    return holdout(labels, groups, 0.2, HOLDOUT_SEED)


@pytest.mark.integration
def test_nih_test_holdout_has_every_finding_of_two_patients_within_tolerance(nih_table, nih_holdout):
    labels, groups = nih_table
    keep, held = nih_holdout
    assert_patients_whole(groups, keep, held)
    assert_every_shared_label_on_both_sides(labels, groups, keep, held)
    assert labels[held, NIH_FINDINGS.index("Edema")].sum() > 0  # version 1 held out no Edema at all
    assert share_gap(labels, held) <= MULTILABEL_GROUPED_TOLERANCE
    assert len(held) / len(labels) == pytest.approx(0.2, abs=MULTILABEL_GROUPED_TOLERANCE)


@pytest.mark.integration
@pytest.mark.parametrize("split_ratio, seed", [(0.8, 0), (0.8, 1), (0.7, 2)])
def test_nih_train_validation_split_is_stratified_and_grouped(nih_table, nih_holdout, split_ratio, seed):
    labels, groups = nih_table
    dev, _ = nih_holdout
    dev_labels, dev_groups = labels[dev], groups[dev]
    train, val = holdout(dev_labels, dev_groups, 1 - split_ratio, seed)
    assert_patients_whole(dev_groups, train, val)
    assert_every_shared_label_on_both_sides(dev_labels, dev_groups, train, val)
    assert share_gap(dev_labels, val) <= MULTILABEL_GROUPED_TOLERANCE
    assert len(val) / len(dev) == pytest.approx(1 - split_ratio, abs=MULTILABEL_GROUPED_TOLERANCE)


@pytest.mark.integration
def test_nih_version_1_split_was_not_stratified(nih_table):
    """What version 2 fixes, on the same seed: the old test split misses Edema and is off by more than the tolerance."""
    labels, groups = nih_table
    _, held = holdout(labels, groups, 0.2, HOLDOUT_SEED, split_version=1)
    assert labels[held, NIH_FINDINGS.index("Edema")].sum() == 0
    assert share_gap(labels, held) > 2 * MULTILABEL_GROUPED_TOLERANCE


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_label_grouped_split_is_stratified_by_images(seed):
    labels, groups = heavy_patients(seed=seed)
    keep, held = holdout(labels, groups, 0.2, seed)
    assert_patients_whole(groups, keep, held)
    assert share_gap(labels, held) <= 0.01  # class shares of images, not of patients
    assert len(held) / len(labels) == pytest.approx(0.2, abs=0.01)
    assert set(labels[held]) == set(labels[keep]) == {0, 1, 2}


def test_version_1_rebuilds_the_old_group_shuffle_split():
    labels, groups = heavy_patients()
    splitter = GroupShuffleSplit(n_splits=1, test_size=0.3, random_state=4)
    expected_keep, expected_held = next(splitter.split(np.arange(len(labels)), groups=groups))
    keep, held = holdout(labels, groups, 0.3, seed=4, split_version=1)
    assert np.array_equal(keep, np.sort(expected_keep)) and np.array_equal(held, np.sort(expected_held))
    assert not np.array_equal(holdout(labels, groups, 0.3, seed=4)[1], held)  # version 2 is another split


def test_train_val_indices_passes_the_version_on():
    data = toy_dataset(groups=True)
    splitter = GroupShuffleSplit(n_splits=1, test_size=1.0 - 0.7, random_state=1)  # 0.30000000000000004: 13 of 40
    _, expected_val = next(splitter.split(np.arange(len(data.dev)), groups=data.dev.groups))
    _, val = train_val_indices(data, 0.7, 1, split_version=1)
    assert np.array_equal(val, np.sort(expected_val))
    assert np.array_equal(train_val_indices(data, 0.7, 1)[1], train_val_indices(data, 0.7, 1, SPLIT_VERSION)[1])


def test_ungrouped_splits_are_the_same_in_both_versions():
    data = toy_dataset(n_dev=200)
    assert np.array_equal(train_val_indices(data, 0.8, 3, split_version=1)[1], train_val_indices(data, 0.8, 3)[1])


def test_unknown_split_version_is_a_user_error():
    labels, groups = heavy_patients()
    with pytest.raises(UserError, match=f"Unknown split_version 3; this medtune makes versions 1 to {SPLIT_VERSION}"):
        holdout(labels, groups, 0.2, 0, split_version=3)


def test_few_patients_still_split_and_one_patient_is_a_user_error():
    labels = np.array([[1, 0], [1, 1], [0, 1], [0, 0], [1, 0], [0, 1]], np.uint8)
    groups = np.array([1, 1, 2, 3, 4, 5])
    keep, held = holdout(labels, groups, 0.2, 0)
    assert len(held) and len(keep) and not set(groups[keep]) & set(groups[held])
    with pytest.raises(UserError, match="needs at least 2"):
        holdout(labels, np.zeros(6), 0.2, 0)
    with pytest.raises(UserError, match="needs at least 2"):
        holdout(labels[:, 0].astype(np.int64), np.zeros(6), 0.2, 0)

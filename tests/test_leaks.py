"""The leak report: duplicate images and shared patients across train / val / test."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trainables.data.datasets import Dataset, ImageSet, load_dataset
from trainables.data.leaks import format_leak_report, leak_metrics, leak_report
from trainables.data.splits import train_val_indices


def planted(groups: bool) -> tuple[Dataset, np.ndarray, np.ndarray]:
    """20 dev + 10 test distinct noise images, then: dev 1 (train) copied to dev 15 (val) and to test 3,
    dev 2 copied to dev 4 (both train) with another label; patients 7 and 3 straddle splits."""
    rng = np.random.default_rng(0)
    dev, test = rng.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8), rng.integers(0, 256, (10, 8, 8, 1), dtype=np.uint8)
    dev_labels, test_labels = np.zeros(20, np.int64), np.zeros(10, np.int64)
    dev[15], test[3], dev[4], dev_labels[4] = dev[1], dev[1], dev[2], 1
    dev_groups, test_groups = np.arange(20), np.arange(100, 110)
    dev_groups[16], test_groups[0] = 7, 3  # 7: train + val; 3: train + test
    data = Dataset("planted", "binary", ("a", "b"), ImageSet(dev, dev_labels, dev_groups if groups else None),
                   ImageSet(test, test_labels, test_groups if groups else None))
    return data, np.arange(12), np.arange(12, 20)


def test_planted_duplicates_and_shared_patients_are_counted():
    data, train_idx, val_idx = planted(groups=True)
    report = leak_report(data, train_idx, val_idx)
    assert leak_metrics(report) == {
        "leak_dup_images": 2, "leak_dup_copies": 5, "leak_dup_cross_split": 1, "leak_dup_train_val": 1,
        "leak_dup_train_test": 1, "leak_dup_val_test": 1, "leak_dup_label_conflicts": 1,
        "leak_group_train_val": 1, "leak_group_train_test": 1, "leak_group_val_test": 0}
    assert report["leak_detail"]["duplicates"][0] == ["train:dev[1]", "val:dev[15]", "test:test[3]"]
    assert report["leak_detail"]["shared_groups"] == {"train_val": ["7"], "train_test": ["3"], "val_test": []}
    assert json.loads(json.dumps(report["leak_detail"])) == report["leak_detail"]  # MLflow log_dict-able
    text = format_leak_report(report)
    assert text.splitlines()[0].endswith("LEAK") and "train-val 1, train-test 1, val-test 1" in text


def test_clean_splits_report_ok_and_without_groups_say_so():
    data, train_idx, val_idx = planted(groups=False)
    clean = leak_report(data, np.setdiff1d(train_idx, [1, 2, 4]), np.setdiff1d(val_idx, [15]))
    assert clean["leak_dup_cross_split"] == 0 and clean["leak_dup_images"] == 0  # test[3] alone is no longer a copy
    assert "leak_group_train_val" not in clean
    text = format_leak_report(clean)
    assert text.splitlines()[0].endswith(": ok") and "group overlap not checked" in text


@pytest.mark.integration
def test_pneumoniamnist_official_splits_share_duplicated_images(medmnist_root):
    """Counted on the 28 px official file: 27 distinct images occur more than once across
    train (4708) + val (524) + test (624), in 56 copies; 8 of them are in both train and val, none
    reaches test (the other 19 repeat inside train (16) or inside test (3)); no copy changes label."""
    data = load_dataset("pneumoniamnist", image_size=28, data_root=str(medmnist_root))
    train_idx, val_idx = train_val_indices(data, None, 0)  # the official train / val
    report = leak_report(data, train_idx, val_idx)
    assert {key: report[key] for key in ("leak_dup_images", "leak_dup_copies", "leak_dup_cross_split",
                                         "leak_dup_train_val", "leak_dup_train_test", "leak_dup_val_test",
                                         "leak_dup_label_conflicts")} == {
        "leak_dup_images": 27, "leak_dup_copies": 56, "leak_dup_cross_split": 8, "leak_dup_train_val": 8,
        "leak_dup_train_test": 0, "leak_dup_val_test": 0, "leak_dup_label_conflicts": 0}
    assert len(report["leak_detail"]["duplicates"]) == 27

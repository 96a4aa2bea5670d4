"""Shared fixtures: tiny in-memory datasets, and the real data (a failure under CI when missing)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from trainables.datasets import Dataset, ImageSet

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = Path(os.environ.get("MEDTUNE_TEST_DATA", REPO.parent / "shared" / "data"))


def real_data(relative: str) -> Path:
    """Path of a real dataset under the shared data folder; missing data fails under CI, skips elsewhere."""
    path = TEST_DATA / relative
    if relative.endswith(".npz") and os.environ.get("MEDTUNE_DATA_ROOT"):
        path = Path(os.environ["MEDTUNE_DATA_ROOT"]) / Path(relative).name
    if not path.exists():
        message = f"real data {path} is missing (set MEDTUNE_TEST_DATA / MEDTUNE_DATA_ROOT)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def medmnist_root() -> Path:
    return real_data("medmnist/pneumoniamnist.npz").parent


def toy_images(labels: np.ndarray, size: int = 16, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Noise images where every positive label lights up its own quadrant: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(len(labels), size, size, channels), dtype=np.uint8)
    half = size // 2
    corners = [(0, 0), (0, half), (half, 0), (half, half)]
    onehot = labels if labels.ndim == 2 else np.eye(labels.max() + 1, dtype=np.uint8)[labels]
    for row, positives in enumerate(onehot):
        for label in np.flatnonzero(positives):
            if label == 0 and labels.ndim == 1:
                continue
            y, x = corners[label % 4]
            images[row, y:y + half, x:x + half] = 200
    return images


def toy_dataset(task: str = "binary", n_dev: int = 160, n_test: int = 60, seed: int = 0, groups: bool = False) -> Dataset:
    rng = np.random.default_rng(seed)

    def labels(n):
        if task == "multilabel":
            return (rng.random((n, 3)) < 0.3).astype(np.uint8)
        return rng.integers(0, 2 if task == "binary" else 3, size=n).astype(np.int64)

    dev_labels, test_labels = labels(n_dev), labels(n_test)
    dev_groups = np.repeat(np.arange(n_dev // 4), 4) if groups else None
    names = {"binary": ("normal", "abnormal"), "multiclass": ("a", "b", "c"), "multilabel": ("x", "y", "z")}[task]
    official_val = np.zeros(n_dev, bool)
    official_val[-n_dev // 5:] = True
    return Dataset(f"toy_{task}", task, names, ImageSet(toy_images(dev_labels, seed=seed), dev_labels, dev_groups),
                   ImageSet(toy_images(test_labels, seed=seed + 1), test_labels), None if groups else official_val)


@pytest.fixture
def toy():
    return toy_dataset

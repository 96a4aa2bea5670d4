import numpy as np
import pytest
import torch

from trainables.augment import build_minority_transform, build_train_transform, minority_copies, parse_augment
from trainables.config import DEFAULTS
from trainables.errors import UserError
from trainables.splits import holdout, train_val_indices


def test_split_ratio_is_stratified_and_seeded(toy):
    data = toy(n_dev=400)
    train, val = train_val_indices(data, 0.8, seed=3)
    assert len(val) == 80 and not set(train) & set(val)
    assert data.dev.labels[val].mean() == pytest.approx(data.dev.labels.mean(), abs=0.02)
    again, _ = train_val_indices(data, 0.8, seed=3)
    assert np.array_equal(train, again)


def test_no_ratio_keeps_the_official_validation_split(toy):
    data = toy()
    _, val = train_val_indices(data, None, seed=0)
    assert np.array_equal(val, np.flatnonzero(data.official_val))


def test_groups_never_straddle_train_and_validation(toy):
    data = toy(groups=True)
    train, val = train_val_indices(data, 0.7, seed=1)
    assert not set(data.dev.groups[train]) & set(data.dev.groups[val])


def test_multilabel_holdout_keeps_each_label_present():
    rng = np.random.default_rng(0)
    labels = (rng.random((300, 5)) < 0.1).astype(np.uint8)
    keep, held = holdout(labels, None, 0.2, seed=0)
    assert len(held) == 60
    assert labels[held].sum(0) == pytest.approx(labels.sum(0) * 0.2, abs=2)


def test_minority_copies_add_pct_of_each_minority_class():
    labels = np.array([0] * 100 + [1] * 20 + [2] * 50)
    extra = minority_copies(labels, 30, seed=0)
    counts = np.bincount(labels[extra], minlength=3)
    assert counts.tolist() == [0, 6, 15]


def test_unknown_augmentation_is_named():
    with pytest.raises(UserError, match="'flip'"):
        parse_augment("rotation+flip")


def test_augmentation_draws_per_sample_and_keeps_uint8_shape():
    config = dict(DEFAULTS, augment="rotation+hflip+jitter+blur+noise")
    transform = build_train_transform(config, 16)
    image = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16)
    outputs = [transform(image) for _ in range(8)]
    assert all(o.shape == image.shape and o.dtype == torch.uint8 for o in outputs)
    assert len({o.numpy().tobytes() for o in outputs}) > 1
    minority = build_minority_transform(config, 16)
    assert minority(image).shape == image.shape

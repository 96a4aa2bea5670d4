import numpy as np
import pytest
import torch

from trainables.augment.per_sample import build_minority_transform, build_train_transform, minority_copies, parse_augment
from trainables.config import DEFAULTS
from trainables.data.splits import holdout, train_val_indices
from trainables.errors import UserError


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
    transform = build_train_transform(config, 16, 1)
    image = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16)
    outputs = [transform(image) for _ in range(8)]
    assert all(o.shape == image.shape and o.dtype == torch.uint8 for o in outputs)
    assert len({o.numpy().tobytes() for o in outputs}) > 1
    minority = build_minority_transform(config, 16, 1)
    assert minority(image).shape == image.shape


def colourful(size=16):
    """An RGB uint8 image with strongly different channels."""
    image = torch.zeros(3, size, size, dtype=torch.uint8)
    image[0], image[1, : size // 2], image[2, :, : size // 2] = 220, 120, 40
    return image


def test_jitter_saturation_and_hue_change_rgb_images():
    still = build_train_transform(dict(DEFAULTS, augment="jitter", jitter=0.0), 16, 3)
    assert torch.equal(still(colourful()), colourful())
    for key, value in (("jitter_saturation", 0.9), ("jitter_hue", 0.4)):
        moving = build_train_transform(dict(DEFAULTS, augment="jitter", jitter=0.0, **{key: value}), 16, 3)
        assert any(not torch.equal(moving(colourful()), colourful()) for _ in range(5)), key


def test_jitter_saturation_on_grey_images_says_only_brightness_and_contrast_apply():
    with pytest.warns(UserWarning, match="only brightness and contrast apply"):
        transform = build_train_transform(dict(DEFAULTS, augment="jitter", jitter_saturation=0.5), 16, 1)
    assert transform(torch.zeros(1, 16, 16, dtype=torch.uint8)).shape == (1, 16, 16)


def test_shift_moves_the_content_within_shift_frac():
    image = torch.zeros(1, 20, 20, dtype=torch.uint8)
    image[:, 8:12, 8:12] = 255
    shift = build_train_transform(dict(DEFAULTS, augment="shift", shift_frac=0.2), 20, 1)
    centres = []
    for _ in range(20):
        rows, cols = torch.nonzero(shift(image)[0] > 127, as_tuple=True)
        centres.append((rows.float().mean().item() - 9.5, cols.float().mean().item() - 9.5))
    assert any(abs(r) + abs(c) > 0.5 for r, c in centres)  # it moves
    assert all(abs(r) <= 4.5 and abs(c) <= 4.5 for r, c in centres)  # by at most 20 % of 20 px (+ rounding)
    assert torch.equal(build_train_transform(dict(DEFAULTS, augment="shift", shift_frac=0.0), 20, 1)(image), image)


def test_crop_is_a_random_resized_crop_of_at_least_crop_scale():
    from torchvision.transforms import v2

    crop = build_train_transform(dict(DEFAULTS, augment="crop", crop_scale=0.5), 16, 1)
    (op,) = crop.transforms
    assert isinstance(op, v2.RandomResizedCrop) and op.scale == (0.5, 1.0) and list(op.size) == [16, 16]
    assert crop(torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16)).shape == (1, 16, 16)


def test_the_resnetd_studys_blur_and_rotation_are_expressible():
    from torchvision.transforms import v2

    config = dict(DEFAULTS, augment="rotation+blur", rotation_degrees=6, rotation_crop=210 / 224,
                  blur_sigma_min=4.0, blur_sigma=5.0, blur_kernel=3)
    rotation, blur = build_train_transform(config, 224, 1).transforms
    assert rotation.transforms[0].degrees == [-6.0, 6.0] and list(rotation.transforms[1].size) == [210, 210]
    assert list(blur.kernel_size) == [3, 3] and list(blur.sigma) == [4.0, 5.0]
    minority = build_minority_transform(config, 224, 1)  # the copies use the same ranges
    assert any(isinstance(t, v2.GaussianBlur) and list(t.sigma) == [4.0, 5.0] for t in minority.transforms)
    assert minority.transforms[0].transforms[1].size == rotation.transforms[1].size


def draws(sampler, groups):
    return np.bincount(groups[np.fromiter(iter(sampler), dtype=np.int64)])


def test_oversampling_balances_a_known_label_set():
    from trainables.data.sampling import build_sampler

    labels = np.array([0] * 900 + [1] * 100)
    sampler = build_sampler("oversample", labels, torch.Generator().manual_seed(0))
    counts = draws(sampler, labels)
    assert len(sampler) == 1000 and counts.sum() == 1000  # as many draws as rows: same steps per epoch
    assert counts[1] == pytest.approx(500, abs=50)  # vs 100 without: balanced within sampling noise


def test_undersampling_draws_the_smallest_class_size_from_each():
    from trainables.data.sampling import build_sampler

    labels = np.array([0] * 50 + [1] * 10 + [2] * 30)
    generator = torch.Generator().manual_seed(0)
    sampler = build_sampler("undersample", labels, generator)
    first, second = list(sampler), list(sampler)
    assert draws(first, labels).tolist() == [10, 10, 10] and len(set(first)) == 30  # no row twice in an epoch
    assert set(first) != set(second)  # a fresh draw of the majority classes each epoch


def test_multilabel_sampling_balances_by_the_rarest_positive_label():
    from trainables.data.sampling import balance_groups, build_sampler

    labels = np.array([[1, 0]] * 80 + [[1, 1]] * 10 + [[0, 0]] * 10, dtype=np.uint8)  # label 1 is the rare one
    assert balance_groups(labels).tolist() == [0] * 80 + [1] * 10 + [-1] * 10
    rows = np.fromiter(iter(build_sampler("oversample", labels, torch.Generator().manual_seed(1))), dtype=np.int64)
    assert labels[rows, 1].mean() == pytest.approx(1 / 3, abs=0.12)  # 10 % of rows, a third of the draws

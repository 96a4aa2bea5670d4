"""Batched augmentation on the device (trainables/augment/batched.py): per-image draws, seeding, the same
distributions as the per-sample path, and a trial that trains with it."""

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp
from torchvision.transforms import v2

from trainables.augment.batched import build_batch_augment, rotate_and_centre_crop, split_names, use_batched
from trainables.augment.per_sample import centre_crop_side
from trainables.config import DEFAULTS, resolve_config
from trainables.errors import UserError
from trainables.training.epochs import iterate_epochs

EVERYTHING = "hflip+rotation+jitter+blur+noise+invert+shift+crop"


def ramp(n=16, size=16, channels=1):
    """n copies of one non-symmetric uint8 image, so any per-image draw shows in the output."""
    image = torch.arange(size * size, dtype=torch.float32).reshape(size, size) * 255 / (size * size - 1)
    return image.to(torch.uint8).expand(n, channels, size, size).contiguous()


def test_batched_draws_differ_per_image_and_repeat_under_a_seed():
    augment = build_batch_augment(dict(DEFAULTS, augment=EVERYTHING), 16, 1, copies=False)
    torch.manual_seed(7)
    first = augment(ramp())
    torch.manual_seed(7)
    again = augment(ramp())
    assert first.shape == (16, 1, 16, 16) and first.dtype == torch.float32 and 0 <= first.min() <= first.max() <= 1
    assert len({row.numpy().tobytes() for row in first}) == 16  # torchvision v2 on a batch would give 1
    assert torch.equal(first, again)


def test_only_copy_rows_get_a_minority_transform():
    augment = build_batch_augment(dict(DEFAULTS, augment="none", minority_aug_pct=50), 16, 1, copies=True)
    copy = torch.arange(16) >= 8
    torch.manual_seed(0)
    out = augment(ramp(), copy)
    plain = ramp().float() / 255
    assert torch.equal(out[~copy], plain[~copy])
    assert all(not torch.allclose(row, plain[0]) for row in out[copy])


def test_rotation_angles_come_from_the_same_distribution_on_both_paths():
    degrees, n = 15.0, 2000
    torch.manual_seed(0)
    per_sample = v2.RandomRotation(degrees)
    image = torch.zeros(1, 16, 16, dtype=torch.uint8)
    draw = getattr(per_sample, "make_params", None) or per_sample._get_params  # torchvision < 0.21: _get_params
    cpu_angles = np.array([draw([image])["angle"] for _ in range(n)])
    batched = rotate_and_centre_crop(degrees, 16, None)
    params = batched.forward_parameters(torch.Size((n, 1, 16, 16)))
    batch_angles = params["angle"].numpy()
    assert ks_2samp(cpu_angles, batch_angles).pvalue > 0.01
    wider = rotate_and_centre_crop(2 * degrees, 16, None).forward_parameters(torch.Size((n, 1, 16, 16)))["angle"]
    assert ks_2samp(cpu_angles, wider.numpy()).pvalue < 1e-6  # the test can tell a wrong range
    zoom = 16 / centre_crop_side(degrees, 16, None)  # the centre crop + resize of the per-sample path
    assert torch.allclose(params["scale"], torch.full((n, 2), zoom))


def test_autoaugment_stays_per_sample_and_auto_batches_on_cuda_or_without_augmentation():
    assert split_names("hflip+autoaugment_cifar10+rotation") == (["hflip", "rotation"], ["autoaugment_cifar10"])
    assert use_batched("auto", torch.device("cuda")) and not use_batched("auto", torch.device("cpu"))
    assert use_batched("auto", torch.device("cpu"), augments=False) and not use_batched("cpu", torch.device("cpu"), False)
    assert use_batched("batch", torch.device("cpu")) and not use_batched("cpu", torch.device("cuda"))
    with pytest.raises(UserError, match="augment_device"):
        resolve_config({"augment_device": "gpu"})


def test_a_trial_trains_with_batched_augmentation_and_minority_copies(toy):
    config = {"model": "simple_cnn", "epochs": 2, "batch_size": 32, "lr": 3e-3, "image_size": 16, "seed": 1,
              "augment": "hflip+rotation+jitter", "minority_aug_pct": 50, "augment_device": "batch"}
    runs = [list(iterate_epochs(config, toy())) for _ in range(2)]
    final = runs[0][-1]
    assert final.metrics["train_images"] > 128  # the copies are in
    assert final.train_examples["images"].dtype == np.uint8 and final.train_examples["copy"].any()
    assert [e.metrics["train_loss"] for e in runs[0]] == [e.metrics["train_loss"] for e in runs[1]]  # seeded


def test_an_unaugmented_cpu_trial_reads_whole_batches_and_learns_as_per_image(toy, monkeypatch):
    """`auto` reads an unaugmented trial's batches in one index each (at 224 px a flat heap, BENCHMARKS.md 9):
    the same images in the same order, so it learns what the per-image path learns (to float rounding: the
    normalisation runs on a batch instead of on each image)."""
    import trainables.training.split_run as split_run

    paths = []
    real = split_run.build_train_loader
    monkeypatch.setattr(split_run, "build_train_loader",
                        lambda *args: paths.append(args[-1]) or real(*args))
    config = {"model": "simple_cnn", "epochs": 2, "batch_size": 32, "lr": 3e-3, "image_size": 16, "seed": 1,
              "device": "cpu"}
    auto, per_image = (list(iterate_epochs({**config, "augment_device": choice}, toy())) for choice in ("auto", "cpu"))
    assert paths == [True, False]
    for mine, theirs in zip(auto, per_image):
        assert mine.metrics["train_loss"] == pytest.approx(theirs.metrics["train_loss"], rel=1e-5)
        assert mine.metrics["val_loss"] == pytest.approx(theirs.metrics["val_loss"], rel=1e-5)
    assert np.allclose(auto[-1].test_probs, per_image[-1].test_probs, atol=1e-5)
    shuffled = list(iterate_epochs({**config, "seed": 2}, toy()))  # the check can fail: another order differs
    assert not np.allclose(shuffled[-1].test_probs, per_image[-1].test_probs, atol=1e-5)

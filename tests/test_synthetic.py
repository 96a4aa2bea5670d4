"""synthetic_pct: DCGAN images for the minority classes, from a cache built once, trained on the training split only."""

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import toy_dataset, toy_images

import trainables.augment.synthetic as synthetic
from search_spaces import load_space
from search_spaces.preflight import check_synthetic
from trainables.config import resolve_config
from trainables.data.datasets import Dataset, ImageSet
from trainables.errors import UserError
from trainables.training.epochs import iterate_epochs

TINY_GAN = {"gan_epochs": 2, "gan_width": 4, "gan_latent_dim": 8, "gan_batch_size": 16}
FAST = {"model": "simple_cnn", "epochs": 1, "batch_size": 32, "lr": 3e-3, "image_size": 16, **TINY_GAN}


@pytest.fixture(autouse=True)
def one_thread_and_a_fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def gan_runs(monkeypatch):
    """Every call of train_dcgan: the images and labels it was given."""
    calls, real = [], synthetic.train_dcgan

    def spy(images, labels, **kwargs):
        calls.append((np.array(images), np.array(labels)))
        time.sleep(0.2)  # widen the window in which concurrent trials find no cache
        return real(images, labels, **kwargs)

    monkeypatch.setattr(synthetic, "train_dcgan", spy)
    return calls


def imbalanced(sizes=(60, 20, 10)) -> Dataset:
    labels = np.repeat(np.arange(len(sizes)), sizes).astype(np.int64)
    images = ImageSet(toy_images(labels), labels)
    return Dataset("toy_multiclass", "multiclass", ("a", "b", "c"), images, images)


def test_only_minority_classes_get_generated_images_in_the_stated_counts():
    data = imbalanced((60, 20, 10))
    config = resolve_config({**FAST, "synthetic_pct": 30})
    made = synthetic.synthetic_training_images(data.dev, config, data, torch.device("cpu"))
    assert dict(zip(*np.unique(made.labels, return_counts=True))) == {1: 6, 2: 3}  # 30 % of 20 and of 10, none of a
    assert made.images.shape == (9, 16, 16, 1) and made.images.dtype == np.uint8  # the trial's size, not the GAN's
    assert made.metrics["synthetic_images"] == 9
    assert {"gan_c2st_acc", "gan_c2st_coarse_acc"} <= set(made.metrics)  # what they measure: the test below
    assert resolve_config({**FAST, "synthetic_pct": 0})["synthetic_pct"] == 0
    assert synthetic.synthetic_training_images(data.dev, resolve_config(FAST), data, torch.device("cpu")) is None


def test_the_two_sample_test_is_chance_for_one_distribution_and_sees_texture_only_on_pixels():
    """gan_c2st_acc ~0.5 when generated images are drawn like the real ones, ~1 when they differ; the coarse
    score (4x4 block means) is blind to a texture that leaves every block's mean alone."""
    rng = np.random.default_rng(0)
    real, alike = (rng.integers(60, 196, (200, 8, 8, 1)) for _ in range(2))
    checkers = np.indices((8, 8)).sum(0)[..., None] % 2 * 80 - 40  # +-40 in a checkerboard: every block mean 0
    textured = alike + checkers
    assert abs(synthetic.c2st_accuracy(real.astype(np.uint8), alike.astype(np.uint8), 0) - 0.5) < 0.1
    assert synthetic.c2st_accuracy(real.astype(np.uint8), textured.astype(np.uint8), 0) > 0.95
    coarse = [synthetic.block_means(images.astype(np.uint8)) for images in (real, textured)]
    assert coarse[0].shape == (200, 2, 2, 1) and abs(synthetic.c2st_accuracy(*coarse, 0) - 0.5) < 0.1


def test_concurrent_trials_build_the_generator_once_and_share_it(gan_runs):
    data = imbalanced()
    config = resolve_config({**FAST, "synthetic_pct": 20})
    results = []

    def trial():
        generator, record, built = synthetic.load_or_train_generator(data.dev, config, 3, torch.device("cpu"))
        results.append((generator.state_dict(), record["key"], built))

    threads = [threading.Thread(target=trial) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(gan_runs) == 1 and sorted(built for _, _, built in results) == [False, False, True]
    first = results[0][0]
    assert all(torch.equal(first[name], state[name]) for state, _, _ in results for name in first)


def test_a_different_split_seed_or_setting_never_reuses_a_generator(gan_runs):
    data = imbalanced()
    config = resolve_config({**FAST, "synthetic_pct": 20})
    settings = synthetic.gan_settings(config, len(data.dev), 16)
    key = synthetic.gan_cache_key(data.dev, config, settings)
    other_rows = data.dev.subset(np.arange(1, len(data.dev)))  # another split of the same pool
    assert synthetic.gan_cache_key(other_rows, config, settings) != key
    assert synthetic.gan_cache_key(data.dev, {**config, "split_ratio": 0.8}, settings) != key
    assert synthetic.gan_cache_key(data.dev, {**config, "seed": 1}, settings) != key
    assert synthetic.gan_cache_key(data.dev, config, synthetic.gan_settings({**config, "gan_width": 8}, 90, 16)) != key
    relabelled = ImageSet(data.dev.images, data.dev.labels[::-1].copy())
    assert synthetic.gan_cache_key(relabelled, config, settings) != key
    synthetic.load_or_train_generator(data.dev, config, 3, torch.device("cpu"))
    synthetic.load_or_train_generator(data.dev, config, 3, torch.device("cpu"))
    synthetic.load_or_train_generator(data.dev, {**config, "seed": 1}, 3, torch.device("cpu"))
    assert len(gan_runs) == 2  # built for seed 0, reused, built for seed 1


def test_the_gan_sees_training_images_only_and_a_reused_gan_trains_the_same_trial(gan_runs):
    data = toy_dataset("binary", n_dev=200)
    train = ~data.official_val
    config = {**FAST, "synthetic_pct": 50, "gan_epochs": 1}
    first = list(iterate_epochs(config, data))[-1]
    again = list(iterate_epochs(config, data))[-1]  # the generator now comes from the cache
    assert len(gan_runs) == 1
    images, labels = gan_runs[0]
    seen = {image.tobytes() for image in images}
    assert seen == {image.tobytes() for image in data.dev.images[train]}
    assert not seen & {image.tobytes() for image in data.dev.images[~train]}  # no validation image
    assert not seen & {image.tobytes() for image in data.test.images}  # no test image
    assert np.array_equal(labels, data.dev.labels[train])
    minority = np.bincount(data.dev.labels[train]).min()
    assert first.metrics["synthetic_images"] == round(minority * 0.5)
    assert first.metrics["train_images"] == train.sum() + first.metrics["synthetic_images"]
    assert again.metrics["val_auc"] == first.metrics["val_auc"] and again.metrics["train_loss"] == first.metrics["train_loss"]


def test_multi_label_data_is_refused_before_any_gan_is_trained(gan_runs):
    multilabel = toy_dataset("multilabel")
    space = load_space("smoke")
    check_synthetic(space, {("toy", 16): multilabel})  # synthetic_pct 0: nothing to refuse
    space.fixed["synthetic_pct"] = 20
    with pytest.raises(UserError, match="synthetic_pct needs single-label classes.*multi-label; set synthetic_pct to 0"):
        check_synthetic(space, {("toy", 16): multilabel})
    check_synthetic(space, {("toy", 16): toy_dataset("binary")})
    with pytest.raises(UserError, match="multi-label"):
        next(iterate_epochs({**FAST, "synthetic_pct": 20}, multilabel))
    assert gan_runs == []


def test_a_finished_trial_writes_the_gan_report_for_mlflow(monkeypatch):
    from ray import tune

    from trainables import ray_trainable
    from trainables.tracking.names import GAN_ARTIFACTS

    written, reported = [], []

    def report(metrics, checkpoint):
        reported.append(metrics)
        with checkpoint.as_directory() as directory:
            written.append({p.name: p.read_bytes() for p in Path(directory).iterdir()})

    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(tune, "report", report)
    config = {**FAST, "epochs": 2, "synthetic_pct": 20}
    in_memory = SimpleNamespace(open=lambda: toy_dataset("binary"))  # a DatasetRef's one method
    ray_trainable.tune_trainable(config, {ray_trainable.dataset_key(resolve_config(config)): in_memory})
    assert all(set(GAN_ARTIFACTS) <= set(files) for files in written)  # an ASHA-stopped trial's last checkpoint too
    assert written[-1]["gan_samples.png"][:4] == b"\x89PNG" and written[-1]["gan_losses.png"][:4] == b"\x89PNG"
    summary = json.loads(written[-1]["gan_training.json"])
    steps = TINY_GAN["gan_epochs"] * (128 // TINY_GAN["gan_batch_size"])  # 128 training images, whole batches
    assert len(summary["history"]["g_loss"]) == len(summary["history"]["d_loss"]) == steps  # one entry per step
    assert summary["settings"]["image_size"] == 28 and summary["built_by_this_trial"] is True
    for metrics in reported:  # every epoch carries them, so MLflow shows them whichever epoch ASHA stops at
        assert {"synthetic_images", "gan_train_seconds", "gan_c2st_acc", "gan_c2st_coarse_acc"} <= set(metrics)


def test_medmnist_resnet_searches_the_share_of_generated_images():
    space = load_space("medmnist_resnet")
    assert space.values_of("synthetic_pct") == [0, 10, 20, 30]
    assert space.points_to_evaluate[0]["synthetic_pct"] == 0

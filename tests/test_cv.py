"""Cross-validated trials (cv_folds K > 1): leak-free folds, lockstep training, fold-mean reports, out-of-fold
predictions and one weights file per fold. One small CV trial (toy data, 1 thread) is shared by most tests."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import toy_dataset

import trainables.training.split_run as loop
from trainables.config import resolve_config
from trainables.data.datasets import Dataset, ImageSet
from trainables.data.splits import cv_fold_indices, train_val_indices
from trainables.errors import UserError
from trainables.training.checkpoint import FILENAME, best_weights, fold_weights, load_checkpoint, save_checkpoint
from trainables.training.cv import FOLD_CURVES
from trainables.training.epochs import iterate_epochs

K = 3
CV = {"model": "simple_cnn", "epochs": 2, "batch_size": 32, "lr": 3e-3, "image_size": 16, "cv_folds": K}


class WatchedImageSet(ImageSet):
    """An ImageSet that records every read of its pixels into `events`."""

    def __getattribute__(self, name):
        if name == "images":
            object.__getattribute__(self, "events").append("test-read")
        return object.__getattribute__(self, name)


@pytest.fixture(scope="module")
def cv_trial():
    """One K-fold trial on grouped toy data, its test split watched and every training pass recorded."""
    torch.set_num_threads(1)
    data = toy_dataset(groups=True)
    events: list = []
    watched = WatchedImageSet(data.test.images, data.test.labels)
    object.__setattr__(watched, "events", events)
    data = Dataset(data.name, data.task, data.class_names, data.dev, watched, data.official_val)
    events.clear()  # building the Dataset looked at the images once
    real_train = loop.train_one_epoch

    def spy(*args, **kwargs):
        events.append("train")
        return real_train(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "train_one_epoch", spy)
        epochs, first = [], None
        for epoch in iterate_epochs(CV, data):
            events.append(f"report {epoch.epoch}")
            epochs.append(epoch)
            first = first or copy.deepcopy(epoch.state)  # as checkpointed then (the live weights train on)
    return SimpleNamespace(data=data, epochs=epochs, final=epochs[-1], events=events, first=first)


@pytest.mark.parametrize("task, groups", [("binary", True), ("binary", False), ("multilabel", True),
                                          ("multiclass", False)])
def test_folds_are_disjoint_cover_the_pool_and_keep_each_patient_on_one_side(task, groups):
    data = toy_dataset(task, groups=groups)
    folds = cv_fold_indices(data, K, seed=0)
    held = np.concatenate([val for _, val in folds])
    assert len(folds) == K and np.array_equal(np.sort(held), np.arange(len(data.dev)))  # each image validated once
    for train, val in folds:
        assert np.array_equal(np.union1d(train, val), np.arange(len(data.dev))) and not np.intersect1d(train, val).size
        if groups:
            assert not np.intersect1d(data.dev.groups[train], data.dev.groups[val]).size
        if task != "multilabel":  # stratified: every class in every validation fold
            assert set(data.dev.labels[val]) == set(data.dev.labels)


def test_too_many_folds_for_the_patients_is_one_line_before_training():
    data = toy_dataset(groups=True, n_dev=12)  # 3 patients
    with pytest.raises(UserError, match="cv_folds 4 needs at least 4 patients in the development pool, which has 3"):
        cv_fold_indices(data, 4, seed=0)
    with pytest.raises(UserError, match="drop split_ratio"):
        resolve_config({**CV, "split_ratio": 0.8})


def test_a_cv_trial_trains_folds_in_lockstep_and_reads_test_only_at_the_end(cv_trial):
    events = cv_trial.events
    assert [e for e in events if e != "test-read"] == ["train"] * K + ["report 1"] + ["train"] * K + ["report 2"]
    last_train = max(i for i, e in enumerate(events) if e == "train")
    reads = [i for i, e in enumerate(events) if e == "test-read"]
    assert reads and min(reads) > last_train  # the test split is in no fold and is read after all training
    assert all(not any(k.startswith("test_") for k in e.metrics) for e in cv_trial.epochs[:-1])


def test_reported_validation_metrics_are_the_fold_means(cv_trial):
    for epoch in cv_trial.epochs:
        for key in FOLD_CURVES:
            per_fold = [epoch.metrics[f"fold{i}_val_{key}"] for i in range(K)]
            assert epoch.metrics[f"val_{key}"] == pytest.approx(np.mean(per_fold))
    final = cv_trial.final
    fold_bests = [fold["best_score"] for fold in final.state["folds"]]
    assert final.metrics["best_val_auc"] == pytest.approx(np.mean(fold_bests)) == final.state["best_score"]
    assert final.metrics["test_fold"] == final.state["best_fold"] == int(np.argmax(fold_bests))


def test_test_metrics_come_from_the_best_fold_model(cv_trial):
    final, data = cv_trial.final, cv_trial.data
    model = loop.build_model(resolve_config(CV), data)
    model.load_state_dict(best_weights(final.state))
    meta = final.state["dataset"]
    assert meta == final.state["folds"][final.state["best_fold"]]["dataset"]  # its normalisation travels with it
    test = ImageSet(data.test.images, data.test.labels)
    loader = loop.eval_loader(test, 512, torch.device("cpu"), loop.Normalization.from_meta(meta))
    logits, labels = loop.predict_logits(model, loader, torch.device("cpu"))
    probs = loop.probabilities("binary", logits)
    assert final.metrics["test_auc"] == pytest.approx(loop.classification_metrics("binary", labels, probs)["auc"])


def test_out_of_fold_predictions_cover_every_development_image_once(cv_trial):
    oof, data = cv_trial.final.state["oof"], cv_trial.data
    assert np.array_equal(oof["index"].numpy(), np.arange(len(data.dev)))
    assert np.array_equal(oof["labels"].numpy(), data.dev.labels)
    folds = cv_fold_indices(data, K, seed=0)
    for number, (_, val) in enumerate(folds):
        assert (oof["fold"].numpy()[val] == number).all()
    # the logits are the held-out fold model's best weights on those images
    fold = 1
    model = loop.build_model(resolve_config(CV), data)
    model.load_state_dict(fold_weights(cv_trial.final.state)[fold])
    images = data.dev.subset(folds[fold][1])
    norm = loop.Normalization.from_meta(cv_trial.final.state["folds"][fold]["dataset"])
    logits, _ = loop.predict_logits(model, loop.eval_loader(images, 512, torch.device("cpu"), norm), torch.device("cpu"))
    assert np.allclose(oof["logits"].numpy()[folds[fold][1]], logits, atol=1e-5)


def test_the_checkpoint_keeps_one_best_weights_file_per_fold(cv_trial, tmp_path):
    final = cv_trial.final
    save_checkpoint(final.state, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([FILENAME, *(f"fold{i}.pt" for i in range(K))])
    loaded = load_checkpoint(tmp_path)
    main = torch.load(tmp_path / FILENAME, weights_only=True)
    assert "model" not in main and "folds" not in main  # the weights live in the fold files only
    for number in range(K):
        fold = torch.load(tmp_path / f"fold{number}.pt", weights_only=True)
        assert "optimizer" not in fold and "best_model" not in fold  # finished: best weights, nothing more
    weights = fold_weights(loaded)
    assert len(weights) == K and not all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # K models
    assert all(torch.equal(best_weights(loaded)[k], weights[loaded["best_fold"]][k]) for k in weights[0])
    (tmp_path / "fold2.pt").unlink()
    with pytest.raises(UserError, match="fold2.pt"):
        load_checkpoint(tmp_path)


def test_a_resumed_cv_trial_matches_an_uninterrupted_one(cv_trial, tmp_path):
    data = toy_dataset(groups=True)
    save_checkpoint(cv_trial.first, tmp_path)  # as written after epoch 1
    resumed = list(iterate_epochs(CV, data, resume=load_checkpoint(tmp_path)))[-1]
    assert resumed.metrics["val_auc"] == pytest.approx(cv_trial.final.metrics["val_auc"], rel=1e-6)
    assert resumed.metrics["test_auc"] == pytest.approx(cv_trial.final.metrics["test_auc"], rel=1e-6)


def test_one_fold_is_todays_single_split(toy, monkeypatch):
    data, splits = toy(), []
    real = loop.SplitRun.__init__

    def record(self, config, dataset, train_idx, val_idx, *args, **kwargs):
        splits.append((train_idx, val_idx))
        real(self, config, dataset, train_idx, val_idx, *args, **kwargs)

    monkeypatch.setattr(loop.SplitRun, "__init__", record)
    config = {**CV, "cv_folds": 1, "epochs": 1}
    (final,) = iterate_epochs(config, data)
    (default,) = iterate_epochs({k: v for k, v in config.items() if k != "cv_folds"}, data)
    official = train_val_indices(data, None, 0)
    assert len(splits) == 2 and all(np.array_equal(a, b) for split in splits for a, b in zip(split, official))
    assert "folds" not in final.state and "oof" not in final.state and "model" in final.state
    assert final.metrics == {**default.metrics, "epoch_seconds": final.metrics["epoch_seconds"]}


def test_the_ray_trainable_writes_fold_files_and_out_of_fold_predictions(monkeypatch):
    from pathlib import Path

    from ray import tune

    from trainables import ray_trainable
    from trainables.tracking.names import OOF_PREDICTIONS

    written = []

    def report(metrics, checkpoint):
        with checkpoint.as_directory() as directory:
            written.append(sorted(p.name for p in Path(directory).iterdir()))
            if OOF_PREDICTIONS in written[-1]:
                with np.load(Path(directory) / OOF_PREDICTIONS, allow_pickle=False) as kept:
                    written.append(kept["index"])

    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(tune, "report", report)
    data, config = toy_dataset(groups=True), {**CV, "cv_folds": 2, "epochs": 1}
    ray_trainable.tune_trainable(config, {ray_trainable.dataset_key(resolve_config(config)): SimpleNamespace(open=lambda: data)})
    files, index = written
    assert {FILENAME, "fold0.pt", "fold1.pt", OOF_PREDICTIONS} <= set(files)
    assert np.array_equal(index, np.arange(len(data.dev)))


def test_the_model_card_names_the_fold_a_cross_validated_winner_held_out_not_the_official_split():
    from analysis.model_card import split_text

    cv = split_text({"cv_folds": 5, "fold": 2, "split_ratio": None, "seed": 0, "patient_grouped": True})
    assert cv.startswith("fold 3 of 5 cross-validation folds of the development pool")
    assert "grouped by patient" in cv and "trained on the other 4 folds" in cv
    assert "official train/validation split" not in cv
    single = {"cv_folds": 1, "fold": 0, "split_ratio": None, "seed": 0, "patient_grouped": False}
    assert split_text(single) == "the dataset's official train/validation split"
    assert split_text({**single, "split_ratio": 0.8}).startswith("a re-partition of the development pool, 80% train")

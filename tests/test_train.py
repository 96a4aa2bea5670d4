import subprocess
import sys

import pytest

import trainables.train as loop
from trainables.datasets import Dataset, ImageSet, load_dataset
from trainables.train import iterate_epochs, train

FAST = {"model": "simple_cnn", "epochs": 3, "batch_size": 32, "lr": 3e-3, "image_size": 16}


def test_trial_learns_a_separable_toy_task(toy):
    reports = []
    final = train(FAST, data=toy(), report=reports.append)
    assert [r["epoch"] for r in reports] == [1, 2, 3]
    assert final["val_auc"] > 0.9 and final["test_auc"] > 0.9
    assert all(not any(k.startswith("test_") for k in r) for r in reports[:-1])


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_trial_runs_every_task(toy, task):
    final = train({**FAST, "loss_weighting": "inverse", "minority_aug_pct": 20, "augment": "hflip"}, data=toy(task))
    assert 0 <= final["test_acc"] <= 1
    if task == "multilabel":
        assert {"test_exact_match", "test_hamming_loss", "test_auc_x"} <= set(final)


class WatchedImageSet(ImageSet):
    """An ImageSet that records every read of its pixels."""

    def __getattribute__(self, name):
        if name == "images":
            object.__getattribute__(self, "reads").append(len(events))
            events.append("test-read")
        return object.__getattribute__(self, name)


events: list = []


def test_test_split_is_read_only_after_the_last_training_epoch(toy, monkeypatch):
    data = toy()
    watched = WatchedImageSet(data.test.images, data.test.labels)
    object.__setattr__(watched, "reads", [])
    data = Dataset(data.name, data.task, data.class_names, data.dev, watched, data.official_val)
    events.clear()
    real_train_one_epoch = loop.train_one_epoch

    def spy(*args, **kwargs):
        events.append("train")
        return real_train_one_epoch(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", spy)
    for epoch in iterate_epochs(FAST, data):
        events.append(f"report {epoch.epoch}")
    last_train = max(i for i, e in enumerate(events) if e == "train")
    test_reads = [i for i, e in enumerate(events) if e == "test-read"]
    assert test_reads and min(test_reads) > last_train
    assert events[-1] == "report 3" and events.count("train") == 3


def test_test_metrics_come_from_the_best_validation_epoch(toy):
    epochs = list(iterate_epochs({**FAST, "epochs": 4}, toy()))
    final = epochs[-1]
    best = final.state["best_epoch"]
    assert final.state["best_score"] == max(e.metrics["val_auc"] for e in epochs)
    assert epochs[best - 1].metrics["val_auc"] == final.state["best_score"]
    import torch
    for key, tensor in final.state["best_model"].items():
        assert torch.equal(final.state["model"][key], tensor)  # test was scored with the best weights


def test_diverging_loss_fails_the_trial_with_the_fix(toy):
    with pytest.raises(FloatingPointError, match="lower lr"):
        train({**FAST, "lr": 1e30, "optimizer": "sgd"}, data=toy())


def test_resume_continues_from_the_checkpointed_epoch(toy):
    data = toy()
    first_two = list(iterate_epochs(FAST, data))[:2]
    resumed = list(iterate_epochs(FAST, data, resume=first_two[-1].state))
    assert [e.epoch for e in resumed] == [3] and "test_auc" in resumed[0].metrics


@pytest.mark.parametrize("flag, value, kind", [("model", "resnet19", "model"), ("dataset", "pneumonamnist", "dataset")])
def test_cli_misspelled_name_is_one_line_and_exit_2(flag, value, kind):
    result = subprocess.run([sys.executable, "-m", "trainables.train", "--set", f"{flag}={value}"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and f"Unknown {kind} '{value}'; valid names:" in result.stderr


@pytest.mark.integration
def test_resnet18_on_real_pneumoniamnist(medmnist_root):
    data = load_dataset("pneumoniamnist", image_size=28, data_root=str(medmnist_root))
    assert (len(data.dev), len(data.test)) == (4708 + 524, 624)
    final = train({"model": "resnet18", "epochs": 2, "seed": 0}, data=data)
    assert final["val_auc"] > 0.95
    assert final["test_auc"] > 0.85

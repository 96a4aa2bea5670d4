import copy
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO, background_job
from sklearn.metrics import roc_auc_score

import trainables.train as train_cli
import trainables.training.split_run as loop
from trainables.config import resolve_config
from trainables.data.datasets import Dataset, ImageSet, load_dataset
from trainables.errors import UserError
from trainables.training.checkpoint import best_weights, save_checkpoint
from trainables.training.epochs import iterate_epochs, train
from trainables.training.metrics import probabilities

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
    assert final["test_acc"] > 0.6 and final["test_auc"] > 0.8  # the toy task is learnable in 3 epochs
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
    data = toy()
    epochs = list(iterate_epochs({**FAST, "epochs": 4}, data))
    final = epochs[-1]
    assert final.state["best_score"] == max(e.metrics["val_auc"] for e in epochs)
    model = loop.build_model(resolve_config({**FAST, "epochs": 4}), data)
    model.load_state_dict(best_weights(final.state))
    logits, labels = loop.predict_logits(model, loop.eval_loader(data.test, 512, torch.device("cpu")), torch.device("cpu"))
    assert final.metrics["test_auc"] == pytest.approx(roc_auc_score(labels, probabilities("binary", logits)[:, 1]))


def scripted_validation(monkeypatch, scores):
    """Make epoch i's validation AUC scores[i] (training and test scoring stay real)."""
    real_metrics, calls = loop.split_metrics, []

    def split_metrics(*args, **kwargs):
        metrics = real_metrics(*args, **kwargs)
        if len(calls) < len(scores):
            metrics = {**metrics, "auc": scores[len(calls)]}
        calls.append(1)
        return metrics

    monkeypatch.setattr(loop, "split_metrics", split_metrics)


def weights_copy(state):
    return {k: v.detach().clone() for k, v in state["model"].items()}


def test_a_worse_last_epoch_leaves_the_earlier_best_weights_in_the_final_checkpoint(toy, monkeypatch):
    scripted_validation(monkeypatch, [0.6, 0.9, 0.7, 0.8])
    seen = []
    for epoch in iterate_epochs({**FAST, "epochs": 4}, toy()):
        seen.append((epoch.state, weights_copy(epoch.state)))
    (s1, _), (s2, w2), (s3, w3), (final, _) = seen
    assert final["best_epoch"] == 2 and final["final"]
    assert all(torch.equal(best_weights(final)[k], w2[k]) for k in w2)  # what export and replay read
    assert not all(torch.equal(w3[k], w2[k]) for k in w2)
    # A checkpoint holds what it needs and no more: the optimizer only while there is something to resume,
    # the best weights apart from the model only when they are an earlier epoch's.
    assert "optimizer" in s3 and "optimizer" not in final and "best_model" not in final
    assert "best_model" not in s1 and "best_model" not in s2 and "best_model" in s3
    assert all(torch.equal(best_weights(s3)[k], w2[k]) for k in w2)


def test_every_epoch_carries_the_best_weights_validation_predictions_and_the_checkpoint_keeps_them(toy, monkeypatch):
    """What ensemble selection reads instead of a replay: the best epoch's validation logits, equal to the best
    weights scored on the validation split again, and the validation rows they belong to."""
    from trainables.data.normalization import Normalization
    from trainables.data.splits import development_splits

    scripted_validation(monkeypatch, [0.6, 0.9, 0.7, 0.8])
    data, config = toy(), resolve_config({**FAST, "epochs": 4})
    epochs = list(iterate_epochs(config, data))
    assert [e.val_predictions["epoch"] for e in epochs] == [1, 2, 2, 2]  # the best so far, not the current epoch
    assert epochs[2].state["val_predictions"]["epoch"] == 2  # travels with a resumable checkpoint, as best_model does
    final = epochs[-1]
    _, val_index = development_splits(data, config)[0]
    kept = final.val_predictions
    assert np.array_equal(kept["index"].numpy(), val_index)
    assert np.array_equal(kept["labels"].numpy(), data.dev.labels[val_index])
    model = loop.build_model(config, data)
    model.load_state_dict(best_weights(final.state))
    loader = loop.eval_loader(data.dev.subset(val_index), 512, torch.device("cpu"),
                              Normalization.from_meta(final.state["dataset"]))
    logits, _ = loop.predict_logits(model, loader, torch.device("cpu"))
    assert np.allclose(kept["logits"].numpy(), logits, atol=1e-6)


def test_a_checkpoint_without_the_best_weights_is_refused():
    with pytest.raises(UserError, match="does not hold the best-validation weights"):
        best_weights({"epoch": 3, "best_epoch": 2, "final": False, "model": {}})


def test_final_checkpoint_is_a_fraction_of_a_resumable_one(toy, tmp_path):
    *_, before_last, final = iterate_epochs({**FAST, "epochs": 2}, toy())
    resumable = save_checkpoint(before_last.state, tmp_path / "a").stat().st_size
    finished = save_checkpoint(final.state, tmp_path / "b").stat().st_size
    assert finished < 0.4 * resumable  # weights only vs weights + Adam's two moments


def test_resumed_trial_matches_an_uninterrupted_one(toy):
    data, config = toy(), {**FAST, "augment": "hflip+rotation", "epochs": 2}
    uninterrupted = list(iterate_epochs(config, data))[-1]
    for epoch in iterate_epochs(config, data):  # interrupted after epoch 1: its checkpoint as written then
        if epoch.epoch == 1:
            state = copy.deepcopy(epoch.state)
            break
    resumed = list(iterate_epochs(config, data, resume=state))[-1]
    assert resumed.metrics["train_loss"] == pytest.approx(uninterrupted.metrics["train_loss"], rel=1e-6)
    assert resumed.metrics["test_auc"] == pytest.approx(uninterrupted.metrics["test_auc"], rel=1e-6)
    kept, again = uninterrupted.val_predictions, resumed.val_predictions  # the best epoch's, across the resume
    assert kept["epoch"] == again["epoch"] and np.allclose(kept["logits"].numpy(), again["logits"].numpy(), atol=1e-6)


def test_a_frozen_backbone_moves_neither_its_weights_nor_its_batchnorm_statistics(toy, monkeypatch):
    """freeze_backbone: one training epoch changes the head only; the backbone's BatchNorm running statistics
    stay as built too, although the model trains in train mode (~3 s)."""
    built = []

    def build_and_keep(config, dataset):
        model = real_build(config, dataset)
        built.append((model, copy.deepcopy(model.state_dict())))
        return model

    real_build = loop.build_model
    monkeypatch.setattr(loop, "build_model", build_and_keep)
    next(iterate_epochs({**FAST, "model": "resnet18", "freeze_backbone": True, "epochs": 2}, toy()))  # after epoch 1
    (model, before), = built
    after = model.state_dict()
    backbone = [key for key in before if not key.startswith("fc.")]
    assert any(key.endswith("running_mean") for key in backbone)  # resnet18 has BatchNorm to keep still
    assert [key for key in backbone if not torch.equal(before[key], after[key].cpu())] == []
    assert not torch.equal(before["fc.weight"], after["fc.weight"].cpu())


def torch_flags() -> tuple:
    return (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled())


@pytest.fixture
def restore_torch_flags(monkeypatch):
    """The process-wide kernel flags (and cuBLAS's variable) as they were before the test."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    benchmark, deterministic, algorithms, warn_only = torch_flags()
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, deterministic
    torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)


@pytest.mark.parametrize("deterministic", [True, False])
def test_the_trial_sets_its_gpu_kernel_flags_where_it_starts(toy, restore_torch_flags, deterministic):
    """The `deterministic` key, applied before the first epoch (checked on the CPU, where the flags are only set)."""
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = deterministic, not deterministic  # the opposite
    torch.use_deterministic_algorithms(not deterministic)
    next(iterate_epochs({**FAST, "epochs": 1, "deterministic": deterministic}, toy()))
    # deterministic: (benchmark off, cudnn deterministic, deterministic algorithms, warning where none exists)
    assert torch_flags()[:3 + deterministic] == ((False, True, True, True) if deterministic else (True, False, False))
    assert (os.environ.get("CUBLAS_WORKSPACE_CONFIG") == ":4096:8") is deterministic


def test_importing_the_trial_code_changes_no_torch_flag():
    """A fresh interpreter imports torch, then every module a trial runs; no global kernel flag moves (~5 s)."""
    code = ("import torch\n"
            "flags = lambda: (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,"
            " torch.are_deterministic_algorithms_enabled())\n"
            "before = flags()\n"
            "import trainables.models, trainables.training.epochs, trainables.train\n"
            "print(before, flags())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    before, _, after = result.stdout.strip().partition(") (")
    assert before + ")" == "(" + after, result.stdout


def lr_curve(overrides: dict, steps_per_epoch: int, steps: int) -> list[float]:
    """The learning rate each optimizer step uses, as the train loop drives the schedule."""
    config = resolve_config(overrides)
    optimizer = loop.build_optimizer(config, torch.nn.Linear(2, 2))
    schedule = loop.build_schedule(config, optimizer, steps_per_epoch=steps_per_epoch)
    lrs = []
    for step in range(steps):
        schedule.step_update(step)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def test_warmup_then_cosine_schedule_has_the_documented_shape():
    lrs = lr_curve({"lr": 0.1, "epochs": 10, "warmup_frac": 0.2, "schedule": "cosine"}, steps_per_epoch=10, steps=100)
    warmup, decay = lrs[:21], lrs[20:]
    assert lrs[0] == pytest.approx(0.1 * 1e-3) and lrs[20] == pytest.approx(0.1)
    assert all(b > a for a, b in zip(warmup, warmup[1:]))  # linear warm-up over 20 % of the steps
    assert all(b <= a for a, b in zip(decay, decay[1:])) and lrs[-1] < 0.001  # cosine to ~0 at the end
    assert lrs[60] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 40 / 80)), rel=1e-6)


def test_step_schedule_drops_at_the_milestones():
    lrs = lr_curve({"lr": 0.1, "epochs": 4, "schedule": "step", "step_milestones": [0.5, 0.75]}, steps_per_epoch=5, steps=20)
    assert lrs[9] == pytest.approx(0.1) and lrs[10] == pytest.approx(0.01) and lrs[15] == pytest.approx(0.001)


def test_bf16_precision_runs_on_cpu_and_is_recorded(toy):
    final = list(iterate_epochs({**FAST, "precision": "bf16", "device": "cpu", "epochs": 1}, toy()))[-1]
    assert final.state["precision"] == "bf16" and final.state["device"] == "cpu"
    assert final.metrics["test_auc"] > 0.8


def test_diverging_loss_fails_the_trial_with_the_fix(toy):
    with pytest.raises(FloatingPointError, match="lower lr"):
        train({**FAST, "lr": 1e30, "optimizer": "sgd"}, data=toy())


def test_resume_continues_from_the_checkpointed_epoch(toy):
    data = toy()
    first_two = list(iterate_epochs(FAST, data))[:2]
    resumed = list(iterate_epochs(FAST, data, resume=first_two[-1].state))
    assert [e.epoch for e in resumed] == [3] and "test_auc" in resumed[0].metrics


@pytest.mark.parametrize("argv, expected", [
    (["--set", "model=resnet19"], "Unknown model 'resnet19'; valid names:"),
    (["--set", "dataset=pneumonamnist"], "Unknown dataset 'pneumonamnist'; valid names:"),
    (["--set", "epochs=2.5"], "Invalid epochs 2.5: input should be a valid integer"),
    (["--set", "lr=abc"], "Invalid lr 'abc': input should be a valid number"),
    (["--set", "x=[1"], "--set 'x=[1': '[1' is not a YAML value"),
    (["--set", "batch_size=0"], "Invalid batch_size 0: input should be greater than or equal to 1"),
])
def test_cli_bad_value_is_one_line_and_exit_2(capsys, argv, expected):
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err


@background_job(needs_data=False, ray=False)
def train_cli_refusing_a_model(started, tmp) -> subprocess.CompletedProcess:
    """`python -m trainables.train --set model=resnet19` in a process of its own. Cost: one process, about 10 s of
    imports on 2 quiet cores, run beside the in-process tests from the session's start (tests/conftest.py)."""
    return started.run([sys.executable, "-m", "trainables.train", "--set", "model=resnet19"], cwd=REPO, timeout=300)


def test_cli_exit_code_in_a_real_process(train_cli_refusing_a_model):
    result = train_cli_refusing_a_model
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Unknown model 'resnet19'" in result.stderr


@pytest.mark.integration
def test_resnet18_on_real_pneumoniamnist(medmnist_root):
    data = load_dataset("pneumoniamnist", image_size=28, data_root=str(medmnist_root))
    assert (len(data.dev), len(data.test)) == (4708 + 524, 624)
    final = train({"model": "resnet18", "epochs": 1, "seed": 0, "stem": "imagenet"}, data=data)  # stem: tests/test_stem.py
    assert final["val_auc"] > 0.9  # one epoch: 0.92 here; chance is 0.5
    assert final["test_auc"] > 0.7  # one epoch, scored on the official test split (harder than val): 0.76-0.86 here


def test_constant_schedule_with_warmup_ramps_then_stays_flat():
    lrs = lr_curve({"lr": 0.1, "epochs": 10, "warmup_frac": 0.2, "schedule": "constant"}, steps_per_epoch=10, steps=100)
    assert lrs[0] == pytest.approx(0.1 * 1e-3) and lrs[10] == pytest.approx(0.1 * 1e-3 + 10 * (0.1 - 1e-4) / 20)
    assert all(b > a for a, b in zip(lrs[:21], lrs[1:21]))  # linear warm-up over 20 % of the steps
    assert lrs[20:] == pytest.approx([0.1] * 80)  # then the peak rate to the end
    no_warmup = resolve_config({"lr": 0.1, "schedule": "constant"})
    assert loop.build_schedule(no_warmup, loop.build_optimizer(no_warmup, torch.nn.Linear(2, 2)), steps_per_epoch=10) is None


@pytest.fixture(scope="module")
def one_epoch():
    """(the toy binary data, its 1-epoch trial counting the model's forward batch sizes, the training pass's own
    (logits, labels)), run once for several tests."""
    from conftest import toy_dataset

    data, forwards, passes = toy_dataset(), [], []
    real_build, real_pass = loop.build_model, loop.train_one_epoch

    def counting_build(config, dataset):
        model = real_build(config, dataset)
        model.register_forward_hook(lambda module, args, out: forwards.append(len(args[0])))
        return model

    def recording_pass(*args, **kwargs):
        passes.append(real_pass(*args, **kwargs))
        return passes[-1]

    loop.build_model, loop.train_one_epoch = counting_build, recording_pass
    try:
        (epoch,) = iterate_epochs({**FAST, "epochs": 1}, data)
    finally:
        loop.build_model, loop.train_one_epoch = real_build, real_pass
    (_, _, logits, labels), = passes
    return data, epoch, forwards, (logits, labels)


def test_train_metrics_come_from_the_training_pass_itself(one_epoch):
    from trainables.training.metrics import classification_metrics

    data, epoch, forwards, (logits, labels) = one_epoch
    n_train, n_val = int((~data.official_val).sum()), int(data.official_val.sum())
    # one image for the FLOP count, the training pass (drop_last), then validation and test in batches of the
    # trial's own size (the memory it trains in): no extra pass
    in_batches = lambda n: [32] * (n // 32) + [n % 32] * bool(n % 32)  # noqa: E731
    assert forwards == [1] + [32] * (n_train // 32) + in_batches(n_val) + in_batches(len(data.test))
    # the train metrics are those of the pass's own outputs (in train mode, as the weights moved), not a re-scoring
    own = classification_metrics("binary", labels, probabilities("binary", logits))
    assert (epoch.metrics["train_acc"], epoch.metrics["train_auc"]) == pytest.approx((own["acc"], own["auc"]))


def test_trial_reports_its_parameter_count_and_flops_from_the_first_epoch(one_epoch):
    metrics = one_epoch[1].metrics
    assert metrics["params_total"] == metrics["params_trainable"] == 1 * 9 * 32 + 32 + 32 * 9 * 64 + 64 + 1024 * 2 + 2
    assert metrics["flops_per_image"] == 2 * (16 * 16 * 32 * 9 + 8 * 8 * 64 * 32 * 9 + 1024 * 2)


def test_binary_trials_report_the_positive_class_precision_recall_f1(one_epoch):
    from trainables.training.metrics import classification_metrics

    y = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    p1 = np.array([0.1, 0.6, 0.7, 0.9, 0.8, 0.4, 0.3, 0.95])  # TP=3 FN=2 FP=2 TN=1
    m = classification_metrics("binary", y, np.c_[1 - p1, p1])
    assert (m["precision_pos"], m["recall_pos"], m["f1_pos"]) == pytest.approx((3 / 5, 3 / 5, 3 / 5))
    m = classification_metrics("binary", y, np.c_[1 - p1, p1], threshold=0.85)  # TP=2 FN=3 FP=0
    assert (m["precision_pos"], m["recall_pos"], m["f1_pos"]) == pytest.approx((1.0, 2 / 5, 4 / 7))
    assert {"val_precision_pos", "val_recall_pos", "val_f1_pos", "test_precision_pos", "test_f1_pos"} <= set(one_epoch[1].metrics)
    assert "precision_pos" not in classification_metrics("multiclass", np.array([0, 1, 2]), np.eye(3))


def test_normalisation_statistics_come_from_the_training_split_and_travel_in_the_checkpoint(toy, one_epoch):
    from trainables.data.normalization import Normalization

    data = toy()
    train_images = data.dev.images[~data.official_val] / 255.0
    final = list(iterate_epochs({**FAST, "epochs": 1, "normalize": "dataset"}, data))[-1].state["dataset"]
    assert final["normalize"] == "dataset"
    assert final["mean"] == pytest.approx([train_images.mean()]) and final["std"] == pytest.approx([train_images.std()])
    assert final["mean"] != pytest.approx([(data.dev.images / 255.0).mean()], abs=1e-6)  # validation left out
    half = one_epoch[1].state["dataset"]  # auto, from scratch: half
    assert (half["normalize"], half["mean"], half["std"]) == ("half", [0.5], [0.5])
    image = torch.from_numpy(data.test.images[:3]).permute(0, 3, 1, 2)
    assert torch.allclose(Normalization.from_meta(half)(image), image / 127.5 - 1)  # [-1, 1], as before `normalize`


def test_mean_image_normalisation_subtracts_the_mean_training_image(toy):
    from trainables.data.normalization import Normalization, resolve_normalization

    data = toy()
    norm = resolve_normalization("mean_image", model="simple_cnn", pretrained=False, train_images=data.dev.images)
    assert norm.mean.shape == (1, 16, 16)  # per pixel
    batch = norm(torch.from_numpy(data.dev.images).permute(0, 3, 1, 2))
    assert batch.mean(dim=0).abs().max() < 1e-4 and batch.std().item() == pytest.approx(1.0, rel=0.01)
    back = Normalization.from_meta(norm.as_meta())
    assert back.name == "mean_image" and torch.equal(back.mean, norm.mean) and torch.equal(back.std, norm.std)


def test_imagenet_and_pretrained_normalisation(toy):
    from trainables.data.normalization import resolve_normalization

    grey, rgb = np.zeros((2, 4, 4, 1), np.uint8), np.zeros((2, 4, 4, 3), np.uint8)
    imagenet = resolve_normalization("imagenet", model="resnet18", pretrained=False, train_images=grey).as_meta()
    assert imagenet["mean"] == pytest.approx([0.449]) and imagenet["std"] == pytest.approx([0.226])
    assert resolve_normalization("imagenet", model="resnet18", pretrained=False,
                                 train_images=rgb).as_meta()["mean"] == pytest.approx([0.485, 0.456, 0.406])
    weights = resolve_normalization("auto", model="resnet18", pretrained=True, train_images=grey).as_meta()
    assert weights["normalize"] == "weights" and weights["mean"] == pytest.approx([0.449])


def test_undersampling_shortens_the_epoch_to_balanced_draws(toy, monkeypatch):
    data, steps = toy(), []
    monkeypatch.setattr(loop, "build_schedule", lambda config, optimizer, n: steps.append(n))  # steps per epoch
    list(iterate_epochs({**FAST, "epochs": 1, "sampling": "undersample", "batch_size": 8}, data))
    train_labels = data.dev.labels[~data.official_val]
    assert steps == [2 * np.bincount(train_labels).min() // 8] and steps[0] < len(train_labels) // 8


def test_finished_trial_writes_the_study_figures_into_its_checkpoint(toy, monkeypatch, tmp_path):
    import json

    from ray import tune

    from trainables import ray_trainable
    from trainables.tracking.names import ARTIFACTS, GAN_ARTIFACTS, VAL_PREDICTIONS
    from trainables.training.figures import read_val_predictions

    written = []

    def report(metrics, checkpoint):
        with checkpoint.as_directory() as directory:
            written.append({p.name: p.read_bytes() for p in __import__("pathlib").Path(directory).iterdir()})

    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(tune, "report", report)
    data = toy("multilabel")
    config = {**FAST, "epochs": 2, "dataset": "pneumoniamnist", "minority_aug_pct": 50, "augment": "hflip"}
    ray_trainable.tune_trainable(config, {ray_trainable.dataset_key(resolve_config(config)): SimpleNamespace(open=lambda: data)})
    always = set(ARTIFACTS) - set(GAN_ARTIFACTS)  # the GAN's files come with synthetic_pct only (test_synthetic.py)
    # the validation predictions in every checkpoint (an ASHA-stopped trial's last one too), the rest at the end
    assert set(written[0]) == {"checkpoint.pt", VAL_PREDICTIONS}
    assert always | {"checkpoint.pt", VAL_PREDICTIONS} == set(written[-1])
    (tmp_path / VAL_PREDICTIONS).write_bytes(written[-1][VAL_PREDICTIONS])
    kept = read_val_predictions(tmp_path / VAL_PREDICTIONS)
    assert kept["labels"].shape == (len(kept["index"]), 3) and kept["logits"].shape == kept["labels"].shape
    assert kept["config"]["dataset"] == "pneumoniamnist" and kept["inputs"]["normalize"] == "half"
    counts = json.loads(written[-1]["class_distribution.json"])
    assert counts["test"] == {"x": int(data.test.labels[:, 0].sum()), "y": int(data.test.labels[:, 1].sum()),
                              "z": int(data.test.labels[:, 2].sum()), "(no label)": int((data.test.labels.sum(1) == 0).sum())}
    assert sum(counts["train_with_copies"].values()) > sum(counts["train"].values())
    assert all(written[-1][name][:4] == b"\x89PNG" for name in always if name.endswith(".png"))


def test_the_trial_builds_its_model_with_the_regularisation_keys(toy):
    from timm.layers import DropPath

    data = toy()
    model = loop.build_model(resolve_config({"model": "efficientnet_b0", "drop_path_rate": 0.06}), data)
    assert max(m.drop_prob for m in model.modules() if isinstance(m, DropPath)) == pytest.approx(0.06, abs=0.01)
    vit = loop.build_model(resolve_config({"model": "vit_small_patch8", "attn_drop_rate": 0.3, "image_size": 16}), data)
    assert vit.blocks[0].attn.attn_drop.p == 0.3
    vgg = loop.build_model(resolve_config({"model": "vgg_like", "drop_rate": 0.0}), data)
    assert not any(isinstance(m, torch.nn.Dropout) for m in vgg.modules())


def test_an_epoch_reads_the_device_back_every_few_steps_not_every_step(monkeypatch):
    """On a GPU each host read (`.item()`, `.cpu()`, `bool()` of a device value) stalls the queue: an epoch of
    120 steps reads the loss sum once, the logits once and the finiteness flag every FINITE_CHECK_STEPS steps."""
    model, reads = torch.nn.Linear(4, 2), []
    loader = [(torch.randn(2, 4), torch.randint(0, 2, (2,))) for _ in range(120)]
    for name in ("item", "cpu", "__bool__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name, **k: (reads.append(_name),
                                                                                                _real(self, *a, **k))[1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loop.train_one_epoch(model, torch.nn.CrossEntropyLoss(), optimizer, None, loader, torch.device("cpu"), "binary",
                         0, amp=False)
    assert reads.count("item") == 1 and reads.count("cpu") == 1
    assert reads.count("__bool__") == -(-120 // loop.FINITE_CHECK_STEPS)


def test_a_non_finite_loss_names_the_steps_it_happened_between():
    model = torch.nn.Linear(4, 2)
    loader = [(torch.full((2, 4), math.inf), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(FloatingPointError, match="Non-finite loss between steps 1 and 1; lower lr"):
        loop.train_one_epoch(model, torch.nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1), None,
                             loader, torch.device("cpu"), "binary", 0, amp=False)

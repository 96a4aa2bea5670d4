"""Re-create what a trial saw: its dataset, its train/validation split and its best-validation model.

Everything comes from the checkpoint's own config (dataset, image size, split ratio and version, seed,
skip_bad_images), so the validation split is the trial's, and the test split is the dataset's fixed one.
Scoring goes through `trainables.training.split_run` (same loader, batch size and normalisation as the trial's own: the
statistics recorded in the checkpoint's "dataset" entry).

Two ways to score a split:
- `Replay.logits(model, images)`: float32 on the CPU, the arithmetic of the exported model;
- `Replay.trial_logits(images)`: on the device and at the precision the trial itself evaluated with
  (the checkpoint's "device" and "precision"): bf16 autocast when the trial used it (CPU autocast is the
  same code path), CUDA when the trial ran there and a GPU is visible. `Replay.exact` says whether that
  is the trial's own arithmetic, so its test metrics must equal the logged ones to the last digit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from trainables.data.datasets import Dataset, ImageSet, load_dataset
from trainables.data.normalization import Normalization
from trainables.data.splits import development_splits
from trainables.errors import UserError
from trainables.models import resolve_stem
from trainables.training.checkpoint import best_weights, with_old_defaults
from trainables.training.split_run import build_model, eval_loader, predict_logits

CPU = torch.device("cpu")
OLD_EVAL_BATCH = 512  # what trials evaluated in before checkpoints recorded "eval_batch"
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Setting:
    """Where and how a model was evaluated: "cpu"/"cuda", "fp32"/"bf16" (None: not recorded)."""

    device: str | None
    precision: str | None

    def __str__(self) -> str:
        return f"{self.device or 'unknown device'} {self.precision or 'unknown precision'}"

    def as_dict(self) -> dict:
        return {"device": self.device, "precision": self.precision}


@dataclass(frozen=True)
class Replay:
    """A trial's data and model, rebuilt from its checkpoint."""

    config: dict
    dataset: Dataset
    train_index: np.ndarray  # into dataset.dev
    val_index: np.ndarray  # into dataset.dev
    model: torch.nn.Module  # best-validation weights, eval mode, float32 on the CPU
    normalization: Normalization  # how the trial turned pixels into inputs (the checkpoint's "dataset" entry)
    trial: Setting  # how the trial evaluated (from the checkpoint)
    replayed: Setting  # how `trial_logits` evaluates here: the trial's setting where this machine has it
    stem: str = "imagenet"  # the stem the network was built with (resolved: imagenet | small | fixed)
    eval_batch: int = OLD_EVAL_BATCH  # the trial's evaluation batch: same batches, same arithmetic, same memory

    @property
    def val(self) -> ImageSet:
        return self.dataset.dev.subset(self.val_index)

    @property
    def test(self) -> ImageSet:
        return self.dataset.test

    @property
    def exact(self) -> bool:
        """True when `trial_logits` repeats the trial's own arithmetic: same precision on the CPU. (CUDA kernels
        are chosen per run by cuDNN's benchmark mode and differ between GPU models: close, not bit-equal.)"""
        return self.trial == self.replayed and self.trial.device == "cpu"

    @property
    def fp32_is_trial(self) -> bool:
        """True when the float32 CPU model IS the trial's setting (then one pass serves both)."""
        return self.exact and self.trial.precision == "fp32"

    def trial_logits(self, images: ImageSet) -> tuple[np.ndarray, np.ndarray]:
        """(logits, labels) of the best model on `images`, on the trial's device and precision where possible."""
        device = torch.device(self.replayed.device)
        model = self.model if device.type == "cpu" else copy.deepcopy(self.model).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)  # as the trial evaluated
        amp = self.replayed.precision == "bf16"
        return predict_logits(model, eval_loader(images, self.eval_batch, device, self.normalization), device, amp)

    def logits(self, model, images: ImageSet) -> tuple[np.ndarray, np.ndarray]:
        """(logits, labels) of `model` (eager or TorchScript) on `images`, float32 on the CPU, with the trial's
        normalisation."""
        return logits_of(model, images, self.normalization, self.eval_batch)


def trial_setting(state: dict) -> Setting:
    """The device and precision the trial evaluated with; older checkpoints recorded neither (a config that
    pinned `device: cpu` ran in float32: CPU autocast was never automatic)."""
    device, precision = state.get("device"), state.get("precision")
    if device is None and precision is None and state["config"].get("device") == "cpu" \
            and state["config"].get("precision", "auto") in ("auto", "fp32"):
        device, precision = "cpu", "fp32"
    if precision is not None and precision not in PRECISIONS:
        raise UserError(f"The checkpoint records precision {precision!r}; this medtune knows {', '.join(PRECISIONS)} "
                        "(upgrade medtune to export it)")
    return Setting(device, precision)


def replay_setting(trial: Setting) -> Setting:
    """The trial's setting where this machine has it: CUDA only when the trial used it and a GPU is visible;
    bf16 autocast whenever the trial used it (on the CPU too). Unknown parts fall back to CPU float32."""
    device = "cuda" if trial.device == "cuda" and torch.cuda.is_available() else "cpu"
    return Setting(device, trial.precision or "fp32")


def replay(state: dict, data_root: str | None = None) -> Replay:
    """Rebuild the trial of checkpoint `state`; `data_root` overrides where the data lives now."""
    state = with_old_defaults(state)  # a state read from a file already is; one built in memory may not be
    config = dict(state["config"])
    dataset = load_dataset(config["dataset"], image_size=int(config["image_size"]),
                           data_root=data_root or config.get("data_root"),
                           skip_bad_images=bool(config["skip_bad_images"]), split_version=int(config["split_version"]))
    meta = state.get("dataset") or {}
    if meta and (list(meta.get("class_names", [])) != list(dataset.class_names) or meta.get("task") != dataset.task):
        raise UserError(f"The data at {data_root or config.get('data_root')} is not the data the trial trained on "
                        f"(classes {meta.get('class_names')} expected); pass the right --data-root")
    # a cross-validated trial: the split of the fold model its best weights are (the one that scored test)
    train_index, val_index = development_splits(dataset, config)[int(state.get("best_fold", 0))]
    stem = trial_stem(state, int(dataset.dev.images.shape[1]))
    model = build_model({**config, "pretrained": False, "stem": stem}, dataset)  # the weights come from the checkpoint
    model.load_state_dict(best_weights(state))  # never the last epoch's weights in their place
    trial = trial_setting(state)
    normalization = Normalization.from_meta(meta)  # checkpoints from before `normalize`: [-1, 1]
    return Replay(config, dataset, train_index, val_index, model.eval(), normalization, trial, replay_setting(trial),
                  stem, int(state.get("eval_batch", OLD_EVAL_BATCH)))


def trial_stem(state: dict, image_size: int) -> str:
    """The stem the trial's network was built with: recorded in the checkpoint, else resolved from its config;
    a config from before `stem` existed had timm's ImageNet stem."""
    config = state["config"]
    return state.get("stem") or resolve_stem(config["model"], config["stem"], image_size)


def logits_of(model, images: ImageSet, normalization: Normalization,
              batch: int = OLD_EVAL_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of `model` (eager or TorchScript) on `images`, float32 on the CPU, `batch` images at a time."""
    return predict_logits(model, eval_loader(images, batch, CPU, normalization), CPU)

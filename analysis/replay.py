"""Re-create what a trial saw: its dataset, its train/validation split and its best-validation model.

Everything comes from the checkpoint's own config (dataset, image size, split ratio, seed), so the
validation split is the trial's, and the test split is the dataset's fixed one. Scoring goes through
`trainables.train` (same loader, batch size and normalisation as the trial's own test score).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trainables.datasets import Dataset, ImageSet, load_dataset
from trainables.errors import UserError
from trainables.splits import train_val_indices
from trainables.train import build_model, eval_loader, predict_logits

DEVICE = torch.device("cpu")  # float32 on CPU, as the logged test metrics of CPU trials were computed
EVAL_BATCH = 512  # the trial's evaluation batch size: same batches, same arithmetic


@dataclass(frozen=True)
class Replay:
    """A trial's data and model, rebuilt from its checkpoint."""

    config: dict
    dataset: Dataset
    train_index: np.ndarray  # into dataset.dev
    val_index: np.ndarray  # into dataset.dev
    model: torch.nn.Module  # best-validation weights, eval mode, CPU

    @property
    def val(self) -> ImageSet:
        return self.dataset.dev.subset(self.val_index)

    @property
    def test(self) -> ImageSet:
        return self.dataset.test


def replay(state: dict, data_root: str | None = None) -> Replay:
    """Rebuild the trial of checkpoint `state`; `data_root` overrides where the data lives now."""
    config = dict(state["config"])
    dataset = load_dataset(config["dataset"], image_size=int(config["image_size"]),
                           data_root=data_root or config.get("data_root"))
    meta = state.get("dataset") or {}
    if meta and (list(meta.get("class_names", [])) != list(dataset.class_names) or meta.get("task") != dataset.task):
        raise UserError(f"The data at {data_root or config.get('data_root')} is not the data the trial trained on "
                        f"(classes {meta.get('class_names')} expected); pass the right --data-root")
    train_index, val_index = train_val_indices(dataset, config["split_ratio"], int(config["seed"]))
    model = build_model({**config, "pretrained": False}, dataset)  # the weights come from the checkpoint
    weights = state.get("best_model") or state["model"]
    model.load_state_dict(weights)
    return Replay(config, dataset, train_index, val_index, model.eval())


def logits_of(model, images: ImageSet) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of `model` (eager or TorchScript) on `images`, float32 on CPU."""
    return predict_logits(model, eval_loader(images, EVAL_BATCH, DEVICE), DEVICE)

"""Losses that follow the task: cross-entropy (optionally class-weighted) or positive-weighted BCE.

`loss_weighting`: none | inverse (class frequency) | effective (number of samples, Cui et al. 2019), all from
the TRAINING labels; or wcel, the W-CEL of the ChestX-ray8 study, whose weights come from each batch's own labels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight
from torch import nn


def effective_number_weights(counts: np.ndarray, beta: float) -> np.ndarray:
    """Cui et al. 2019: weight = (1 - beta) / (1 - beta^n), scaled to sum to the number of classes."""
    weights = (1.0 - beta) / (1.0 - np.power(beta, np.maximum(counts, 1)))
    return weights / weights.sum() * len(counts)


def class_weights(labels: np.ndarray, num_classes: int, weighting: str, beta: float) -> np.ndarray | None:
    """Per-class weights for cross-entropy; None for `weighting="none"`."""
    if weighting == "none":
        return None
    if weighting == "inverse":
        present = np.unique(labels)
        weights = np.ones(num_classes)
        weights[present] = compute_class_weight("balanced", classes=present, y=labels)
        return weights
    return effective_number_weights(np.bincount(labels, minlength=num_classes), beta)


def positive_weights(labels: np.ndarray, weighting: str, beta: float) -> np.ndarray | None:
    """Per-label pos_weight for BCE: |N|/|P| (the W-CEL of ChestX-ray8 up to a per-label scale)."""
    if weighting == "none":
        return None
    positives = labels.sum(axis=0).astype(float)
    negatives = len(labels) - positives
    if weighting == "effective":
        effective = lambda n: (1.0 - np.power(beta, np.maximum(n, 1))) / (1.0 - beta)  # noqa: E731
        return effective(negatives) / effective(positives)
    return negatives / np.maximum(positives, 1.0)


def wcel_betas(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(beta_P, beta_N) = ((|P|+|N|)/|P|, (|P|+|N|)/|N|), |P| and |N| the numbers of 1s and 0s in the batch's
    whole label matrix (Wang et al., ChestX-ray8, CVPR 2017, eq. 1). A count of 0 gives its (unused) beta the
    value |P|+|N|."""
    positives = targets.sum()
    total = torch.tensor(float(targets.numel()), device=targets.device)
    negatives = total - positives
    return total / positives.clamp(min=1.0), total / negatives.clamp(min=1.0)


class WeightedCrossEntropy(nn.Module):
    """W-CEL, per batch. Multi-label: beta_P * BCE on the positive entries, beta_N * BCE on the negative ones, mean
    over all entries (= mean loss over positives + mean loss over negatives). Single-label (the same idea with one
    class per image): cross-entropy weighted by batch size / the class's count in the batch."""

    def __init__(self, multilabel: bool):
        super().__init__()
        self.multilabel = multilabel

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.multilabel:
            beta_p, beta_n = wcel_betas(targets)
            weights = torch.where(targets > 0.5, beta_p, beta_n)
            return (weights * F.binary_cross_entropy_with_logits(logits, targets, reduction="none")).mean()
        counts = torch.bincount(targets, minlength=logits.shape[1]).float()
        weights = len(targets) / counts.clamp(min=1.0)
        return F.cross_entropy(logits, targets, weight=weights)


def build_loss(task: str, train_labels: np.ndarray, num_classes: int, weighting: str, beta: float) -> nn.Module:
    """The criterion for `task`, weighted from the TRAINING labels only (wcel: from each batch's labels)."""
    if weighting == "wcel":
        return WeightedCrossEntropy(multilabel=task == "multilabel")
    if task == "multilabel":
        weights = positive_weights(train_labels, weighting, beta)
        pos_weight = None if weights is None else torch.tensor(weights, dtype=torch.float32)
        return nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    weights = class_weights(train_labels, num_classes, weighting, beta)
    return nn.CrossEntropyLoss(weight=None if weights is None else torch.tensor(weights, dtype=torch.float32))

"""Losses that follow the task: cross-entropy (optionally class-weighted) or positive-weighted BCE."""

from __future__ import annotations

import numpy as np
import torch
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


def build_loss(task: str, train_labels: np.ndarray, num_classes: int, weighting: str, beta: float) -> nn.Module:
    """The criterion for `task`, weighted from the TRAINING labels only."""
    if task == "multilabel":
        weights = positive_weights(train_labels, weighting, beta)
        pos_weight = None if weights is None else torch.tensor(weights, dtype=torch.float32)
        return nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    weights = class_weights(train_labels, num_classes, weighting, beta)
    return nn.CrossEntropyLoss(weight=None if weights is None else torch.tensor(weights, dtype=torch.float32))

"""Leak-free partitions: stratified by label, grouped by patient when the data has patient IDs."""

from __future__ import annotations

import numpy as np
from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit
from sklearn.model_selection import GroupShuffleSplit, train_test_split

from .errors import UserError


def holdout(labels: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int):
    """Split indices into (keep, held_out) with `fraction` held out.

    Groups (patient IDs) never straddle the two parts; without groups the split is
    stratified by label (iterative stratification for multi-label).
    """
    index = np.arange(len(labels))
    if groups is not None:
        splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
        keep, held = next(splitter.split(index, groups=groups))
    elif labels.ndim == 2:
        splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
        keep, held = next(splitter.split(index, labels))
    else:
        try:
            keep, held = train_test_split(index, test_size=fraction, stratify=labels, random_state=seed)
        except ValueError as error:
            raise UserError(f"Cannot make a stratified {fraction:.0%} hold-out: {error}; add images or change the split") from None
    return np.sort(keep), np.sort(held)


def train_val_indices(dataset, split_ratio: float | None, seed: int):
    """Indices into `dataset.dev` for training and validation.

    `split_ratio=None` keeps the dataset's official validation split (or 90/10 when it has none);
    any other ratio re-partitions the development pool. The test split is never involved.
    """
    if split_ratio is None and dataset.official_val is not None:
        return np.flatnonzero(~dataset.official_val), np.flatnonzero(dataset.official_val)
    ratio = 0.9 if split_ratio is None else float(split_ratio)
    return holdout(dataset.dev.labels, dataset.dev.groups, 1.0 - ratio, seed)

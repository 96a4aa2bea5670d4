"""Class-balanced sampling of the training split (`sampling: none | oversample | undersample`).

Every training row belongs to one balancing group: its class, or for multi-label data its rarest positive
label (images without a positive label form their own group), as `augment.per_sample.minority_copies` uses it.
- `oversample`: torch's WeightedRandomSampler, weight 1 / group size, with replacement, as many draws per epoch
  as the split has rows, so an epoch has the same number of steps as without sampling (budgets compare).
- `undersample`: each epoch draws, without replacement, as many rows of every group as the smallest group
  has: an epoch is (number of groups x smallest group) rows, a fresh draw every epoch.
Both draw from the loader's generator, which the loop re-seeds per epoch (resume = uninterrupted).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Sampler, WeightedRandomSampler


class UnderSampler(Sampler[int]):
    """Each epoch: `per_group` rows of every group, drawn without replacement, in random order."""

    def __init__(self, groups: np.ndarray, generator: torch.Generator):
        _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
        self.members = [torch.from_numpy(np.flatnonzero(inverse == k)) for k in range(len(counts))]
        self.per_group = int(counts.min())
        self.generator = generator

    def __len__(self) -> int:
        return self.per_group * len(self.members)

    def __iter__(self):
        chosen = torch.cat([rows[torch.randperm(len(rows), generator=self.generator)[:self.per_group]]
                            for rows in self.members])
        return iter(chosen[torch.randperm(len(chosen), generator=self.generator)].tolist())


def build_sampler(mode: str, labels: np.ndarray, generator: torch.Generator) -> Sampler[int] | None:
    """The sampler of `mode` over training rows with `labels` (one per row, copies included); None for "none"."""
    if mode == "none":
        return None
    groups = balance_groups(labels)
    if mode == "oversample":
        _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
        weights = torch.as_tensor(1.0 / counts[inverse], dtype=torch.double)
        return WeightedRandomSampler(weights, num_samples=len(groups), replacement=True, generator=generator)
    if mode == "undersample":
        return UnderSampler(groups, generator)
    raise ValueError(f"Unknown sampling {mode!r}; valid: none, oversample, undersample")


def balance_groups(labels: np.ndarray) -> np.ndarray:
    """One group per sample for class balancing: its class; multi-label: its rarest positive label (-1: none)."""
    return _rarest_label(labels) if labels.ndim == 2 else labels


def _rarest_label(labels: np.ndarray) -> np.ndarray:
    frequency = labels.sum(axis=0)
    ranked = np.where(labels.astype(bool), frequency[None, :], np.inf)
    return np.where(labels.any(axis=1), ranked.argmin(axis=1), -1)

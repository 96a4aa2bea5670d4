"""Leak-free partitions: stratified by label, grouped by patient when the data has patient IDs.

`holdout` makes both the test hold-out of data without an official test split (folder_datasets) and the
trainer's train/validation split (`train_val_indices`). How it splits is versioned; every trial records its
`split_version` so a replay or an export of an old search rebuilds the very split that search used:

    version 1   grouped data: GroupShuffleSplit -- patients kept whole, labels NOT stratified
                (the NIH sample's test split had no Edema at all). Searches made before version 2.
    version 2   grouped data, single- or multi-label: iterative stratification (iterstrat) of per-patient label
                vectors (a patient is positive for a label or class if any of its images is) into up to
                MAX_FOLDS folds; the held-out part is the combination of folds whose image shares of every
                label (and whose own size) come closest to the whole's, with every label of 2+ patients on
                both sides. Patient counts are what iterstrat balances; the combination step balances images,
                which matters when one patient holds 66 images and another 1.
    both        ungrouped data: train_test_split(stratify=labels); multi-label: MultilabelStratifiedShuffleSplit.

Tolerance (version 2), measured on the NIH ChestX-ray14 sample (1000 images, 264 patients, 1 to 66 images per
patient). The share gap (`share_gap`) is the largest |share of images with a label in the held-out part - its
share in the whole|, over the 14 findings and "No Finding":
    test hold-out (HOLDOUT_SEED, 20 %)                        0.027   (version 1: 0.071, and no Edema in test)
    train/validation of its development pool, seeds 0-49:
        20 % / 30 % held out                                  <= 0.035 / 0.032   (version 1: <= 0.22 / 0.13)
        10 % held out (the default without split_ratio)      <= 0.053 (78 images)  (version 1: <= 0.27)
and the held-out share of images is within 0.035 of the fraction asked for (version 1: up to 0.20 off). Every
finding with at least 2 patients is on both sides. MULTILABEL_GROUPED_TOLERANCE is asserted on the sample by
tests/test_splits.py. Single-label grouped data (one class per image) does better: gap <= 0.01 for 10-30 %
held out, on the sample (Effusion vs rest, 3 classes) and on simulated patients of 1 to 40 images, where
StratifiedGroupKFold gave up to 0.05 (its greedy puts the heaviest patient into fold 0 and has few folds to
choose from). On a simulated 110,000-image, 30,000-patient table the gap is 0.003 and a split takes 2.6 s.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold, MultilabelStratifiedShuffleSplit
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold, StratifiedKFold, train_test_split

from trainables.errors import UserError

SPLIT_VERSION = 2  # the version new trials record; 1: patient groups by GroupShuffleSplit (not stratified); 2: stratified and grouped

MULTILABEL_GROUPED_TOLERANCE = 0.035  # share gap for a held-out part of 20 % or more, measured on the NIH sample
MAX_FOLDS = 40  # iterstrat folds (at most) whose combinations are the candidate held-out parts
REPEATS = 2  # independent iterstrat fold assignments tried
MAX_CANDIDATES = 100_000  # combinations of folds scored per assignment (bounds time and memory)


def holdout(labels: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int,
            split_version: int = SPLIT_VERSION) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into sorted (keep, held_out) with about `fraction` held out.

    Groups (patient IDs) never straddle the two parts; labels are stratified (iterative stratification for
    multi-label); `split_version` 1 rebuilds the unstratified grouped split of older searches."""
    if split_version not in range(1, SPLIT_VERSION + 1):
        raise UserError(f"Unknown split_version {split_version}; this medtune makes versions 1 to {SPLIT_VERSION} "
                        "(a newer medtune made the search: upgrade to replay it)")
    if groups is None:
        keep, held = _ungrouped(labels, fraction, seed)
    elif split_version == 1:
        keep, held = _grouped_unstratified(groups, fraction, seed)
    else:
        keep, held = _stratified_grouped(labels, groups, fraction, seed)
    return np.sort(keep), np.sort(held)


def train_val_indices(dataset, split_ratio: float | None, seed: int,
                      split_version: int = SPLIT_VERSION) -> tuple[np.ndarray, np.ndarray]:
    """Indices into `dataset.dev` for training and validation.

    `split_ratio=None` keeps the dataset's official validation split (or 90/10 when it has none);
    any other ratio re-partitions the development pool. The test split is never involved."""
    if split_ratio is None and dataset.official_val is not None:
        return np.flatnonzero(~dataset.official_val), np.flatnonzero(dataset.official_val)
    ratio = 0.9 if split_ratio is None else float(split_ratio)
    return holdout(dataset.dev.labels, dataset.dev.groups, 1.0 - ratio, seed, split_version)


def cv_fold_indices(dataset, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`folds` sorted (train, validation) index pairs into `dataset.dev`; every development image is in exactly
    one validation part, each patient's images on one side, labels stratified. The test split is never involved.

    Ungrouped: StratifiedKFold (multi-label: iterstrat's MultilabelStratifiedKFold). Grouped single-label:
    StratifiedGroupKFold; grouped multi-label: iterstrat folds of per-patient label vectors (as `holdout`)."""
    labels, groups = dataset.dev.labels, dataset.dev.groups
    units = len(labels) if groups is None else len(np.unique(groups))
    if folds > units:
        what = "images" if groups is None else "patients"
        raise UserError(f"cv_folds {folds} needs at least {folds} {what} in the development pool, which has {units}; "
                        "lower cv_folds")
    if labels.ndim == 1:
        _check_class_sizes(labels, groups, folds)
    if labels.ndim == 1 and groups is None:
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        parts = splitter.split(labels, labels)
    elif labels.ndim == 1:
        parts = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(labels, labels, groups)
    elif groups is None:
        parts = MultilabelStratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(labels, labels)
    else:
        rows = _label_rows(labels)
        patients, patient_of = np.unique(groups, return_inverse=True)
        per_patient = np.zeros((len(patients), rows.shape[1]), np.uint8)
        np.maximum.at(per_patient, patient_of, rows)
        fold_of = _patient_folds(per_patient, folds, seed)[patient_of]
        parts = ((np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)) for f in range(folds))
    return [(np.sort(train), np.sort(val)) for train, val in parts]


def _check_class_sizes(labels: np.ndarray, groups: np.ndarray | None, folds: int) -> None:
    """Every class must be able to reach every validation fold (else that fold's AUC is undefined)."""
    classes, counts = np.unique(labels, return_counts=True)
    if groups is not None:
        counts = np.array([len(np.unique(groups[labels == c])) for c in classes])
    if counts.min() < folds:
        what = "images" if groups is None else "patients"
        raise UserError(f"cv_folds {folds}: class {classes[counts.argmin()]} has only {counts.min()} {what} in the "
                        f"development pool, too few for one in every fold; use cv_folds <= {counts.min()}")


def development_splits(dataset, config: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (train, validation) pairs a trial trains on: `cv_folds` folds, or the one split of `train_val_indices`."""
    if int(config.get("cv_folds", 1)) > 1:
        return cv_fold_indices(dataset, int(config["cv_folds"]), int(config["seed"]))
    return [train_val_indices(dataset, config.get("split_ratio"), int(config["seed"]), int(config["split_version"]))]


def share_gap(labels: np.ndarray, held: np.ndarray) -> float:
    """Largest |share in the held-out rows - share in all rows| over classes (or labels): 0 = perfectly stratified."""
    rows = _label_rows(labels)
    return float(np.abs(rows[held].mean(0) - rows.mean(0)).max())


def _ungrouped(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    index = np.arange(len(labels))
    if labels.ndim == 2:
        splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
        return next(splitter.split(index, labels))
    try:
        return train_test_split(index, test_size=fraction, stratify=labels, random_state=seed)
    except ValueError as error:
        raise UserError(f"Cannot make a stratified {fraction:.0%} hold-out: {error}; "
                        "add images or change the split") from error


def _grouped_unstratified(groups: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Version 1, kept as it was so old searches replay: a share of the patients, labels left to chance."""
    splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    return next(splitter.split(np.arange(len(groups)), groups=groups))


def _stratified_grouped(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Iterative stratification of patients (positive for a label or class if any of its images is), mapped back
    to images. iterstrat balances patient counts, but one patient may hold 1 or 66 images, so it makes up to
    MAX_FOLDS folds, REPEATS times, and the held-out part is the best combination of them (`_best_folds`)."""
    rows = _label_rows(labels)
    patients, patient_of = np.unique(groups, return_inverse=True)
    per_patient = np.zeros((len(patients), rows.shape[1]), np.uint8)
    np.maximum.at(per_patient, patient_of, rows)
    m, k = _fold_plan(fraction, len(patients))
    seeds = np.random.default_rng(seed).integers(0, 2**31 - 1, REPEATS)
    assignments = [_patient_folds(per_patient, k, int(s))[patient_of] for s in seeds]
    return _best_folds(assignments, rows, m, k, fraction, needs_both=per_patient.sum(axis=0) >= 2)


def _fold_plan(fraction: float, n_groups: int) -> tuple[int, int]:
    """(m, k): hold out m of k folds, m/k within 0.005 of the nearest feasible share to `fraction`, and k as
    large as allowed (finer folds, more combinations to choose from; at most MAX_CANDIDATES of them)."""
    if n_groups < 2:
        raise UserError(f"Cannot hold out {fraction:.0%} of {n_groups} patient; a grouped split needs at least 2")
    plans = [(m, k) for k in range(2, min(MAX_FOLDS, n_groups) + 1)
             for m in [min(max(round(fraction * k), 1), k - 1)] if math.comb(k, m) <= MAX_CANDIDATES]
    nearest = min(abs(m / k - fraction) for m, k in plans)
    return max((plan for plan in plans if abs(plan[0] / plan[1] - fraction) <= nearest + 0.005), key=lambda plan: plan[1])


def _label_rows(labels: np.ndarray) -> np.ndarray:
    """(N, columns) 0/1: one-hot classes, or multi-hot labels plus a "no label" column (NIH "No Finding"),
    whose share matters as much as any finding's."""
    if labels.ndim == 1:
        return np.eye(max(int(labels.max()) + 1, 2), dtype=np.uint8)[labels]
    return np.c_[labels, labels.sum(axis=1) == 0].astype(np.uint8)


def _patient_folds(per_patient: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The iterstrat fold (0..k-1) of every patient."""
    fold = np.empty(len(per_patient), np.int64)
    splitter = MultilabelStratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for number, (_, held) in enumerate(splitter.split(per_patient, per_patient)):
        fold[held] = number
    return fold


def _best_folds(assignments: list[np.ndarray], rows: np.ndarray, m: int, k: int, fraction: float,
                needs_both: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keep, held): over every fold assignment (fold of each image) and every choice of m of its folds, the
    held-out part with the fewest labels missing from a part, then the smallest `_share_gaps`."""
    choices = _combinations(k, m)
    best_score, best_held = math.inf, None
    for fold_of in assignments:
        fold_counts = np.stack([rows[fold_of == f].sum(0) for f in range(k)]).astype(np.float64)
        fold_sizes = np.bincount(fold_of, minlength=k).astype(np.float64)
        scores = _share_gaps(choices @ fold_counts, choices @ fold_sizes, rows.sum(0), len(rows), fraction,
                             needs_both)
        best = int(np.argmin(scores))
        if scores[best] < best_score:
            best_score, best_held = scores[best], np.flatnonzero(choices[best][fold_of] > 0)
    return np.setdiff1d(np.arange(len(rows)), best_held), best_held


def _combinations(k: int, m: int) -> np.ndarray:
    """Every choice of m of k folds as a (C(k, m), k) 0/1 matrix (at most MAX_CANDIDATES rows)."""
    chosen = np.array(list(itertools.combinations(range(k), m)))
    matrix = np.zeros((len(chosen), k))
    matrix[np.arange(len(chosen))[:, None], chosen] = 1.0
    return matrix


def _share_gaps(held_counts: np.ndarray, held_sizes: np.ndarray, total: np.ndarray, images: int, fraction: float,
                needs_both: np.ndarray) -> np.ndarray:
    """Per candidate: the largest gap between held-out and overall image shares (every label, and the held-out
    size itself), plus the number of 2+-patient labels missing from one part (each outweighs any gap, all < 1)."""
    shares = held_counts / np.maximum(held_sizes, 1.0)[:, None]
    gap = np.maximum(np.abs(shares - total / images).max(axis=1), np.abs(held_sizes / images - fraction))
    missing = (needs_both & ((held_counts == 0) | (held_counts == total))).sum(axis=1)
    return missing + gap

"""Ensemble selection (Caruana et al. 2004) on held-out predictions, and the split that guards it. Pure numpy.

`greedy`: start from nothing; at each of `steps` steps add the candidate (repeats allowed: "with replacement")
whose addition makes the averaged probabilities score best; keep the best prefix of that path. A candidate's
weight is how often it was added over the steps kept. auto-sklearn's EnsembleSelection and AutoGluon (25 steps)
hand over such an ensemble. The first step picks the best candidate alone, so a path that never beats it ends
as one model with weight 1: the single model.

`halves`: why select on one half of the validation split and judge on the other. Greedy selection is a fit: with
dozens of candidates and a few hundred validation images (BreastMNIST: 78), the chosen mix always looks better on
the images that chose it. The other half had no say in the members or the weights (nor, in analysis.handover, in
the temperatures), so the ensemble-vs-single comparison there is an honest estimate from validation numbers alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from scipy import stats
from sklearn.model_selection import train_test_split

STEPS = 25  # AutoGluon's ensemble selection stops at 25 steps


def greedy(probs: list[np.ndarray], labels: np.ndarray, score: Callable, mode: str, steps: int = STEPS,
           max_members: int | None = None) -> tuple[np.ndarray, list[float]]:
    """(how often each candidate was added, the score after each step kept): greedy forward selection with
    replacement of `probs` (one (n, classes) array per candidate, best candidate first: ties go to the earlier)
    scored by `score(labels, probs)` (`mode` max: higher is better). At most `max_members` distinct candidates;
    the path is cut after its best step (ties: the shorter path, fewer members)."""
    sign = 1.0 if mode == "max" else -1.0
    counts, total, path, picks = np.zeros(len(probs), int), np.zeros_like(probs[0], dtype=np.float64), [], []
    for step in range(1, steps + 1):
        allowed = [i for i in range(len(probs)) if counts[i] or max_members is None
                   or np.count_nonzero(counts) < max_members]
        scores = [safe_score(score, labels, (total + probs[i]) / step) for i in allowed]
        ranked = [sign * s if not np.isnan(s) else -np.inf for s in scores]
        if max(ranked) == -np.inf:
            break
        pick = allowed[int(np.argmax(ranked))]  # argmax: the first of equals, the better-ranked candidate
        counts[pick] += 1
        total += probs[pick]
        picks.append(pick)
        path.append(float(scores[allowed.index(pick)]))
    if not path:
        return counts * 0, []
    signed = sign * np.array(path)
    # the first step within rounding of the best: the shortest path there (averaging copies of one model moves
    # its score in the last digits only)
    best = int(np.flatnonzero(signed >= signed.max() - 1e-9 * max(1.0, abs(signed.max())))[0])
    kept = np.bincount(picks[:best + 1], minlength=len(probs))
    return kept, path[:best + 1]


def weighted(probs: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """The ensemble's probabilities: the weighted mean of its candidates' (weights sum to one)."""
    return np.sum([w * p for w, p in zip(weights, probs) if w > 0], axis=0)


def halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(selection rows, check rows): a seeded half of the validation split, stratified by class where every class
    has two images (multi-label: not stratified), and the other half."""
    rows = np.arange(len(labels))
    single = labels.ndim == 1
    counts = np.bincount(labels)[np.unique(labels)] if single and len(labels) else np.zeros(0, int)
    stratify = labels if len(counts) > 1 and counts.min() >= 2 else None
    try:
        chosen, other = train_test_split(rows, test_size=0.5, random_state=seed, stratify=stratify)
    except ValueError:  # a class too rare to stratify by
        chosen, other = train_test_split(rows, test_size=0.5, random_state=seed)
    return np.sort(chosen), np.sort(other)


def paired_se(labels: np.ndarray, first: np.ndarray, second: np.ndarray, score: Callable, n_resamples: int,
              seed: int = 0) -> float:
    """The paired-bootstrap SE of score(second) - score(first): the same resampled images score both."""
    def difference(rows):
        return safe_score(score, labels[rows], second[rows]) - safe_score(score, labels[rows], first[rows])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a one-class resample: AUC undefined, left out
        result = stats.bootstrap((np.arange(len(labels)),), difference, vectorized=False, n_resamples=n_resamples,
                                 method="percentile", rng=np.random.default_rng(seed))
    return float(np.nanstd(result.bootstrap_distribution, ddof=1))


def safe_score(score: Callable, labels: np.ndarray, probs: np.ndarray) -> float:
    """`score`, NaN where it is undefined."""
    try:
        return float(score(labels, probs))
    except ValueError:  # e.g. an AUC of a one-class sample
        return float("nan")

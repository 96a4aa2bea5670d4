"""Bootstrap confidence intervals for test metrics: resample test cases, recompute, take percentiles.

A test set of a few hundred images gives accuracy to about +-3 points; the interval says so next to
every number we report. `scipy.stats.bootstrap` does the resampling (paired: a case keeps its label
and its prediction together), seeded, so a report is reproducible.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from trainables.training.metrics import confusion_rates, predictions, safe_auc

N_RESAMPLES = 2000
CONFIDENCE = 0.95


def bootstrap_ci(statistic: Callable[..., np.ndarray | float], *samples: np.ndarray, n_resamples: int = N_RESAMPLES,
                 confidence: float = CONFIDENCE, seed: int = 0, method: str = "percentile") -> tuple[np.ndarray, np.ndarray]:
    """(low, high) of the `confidence` interval of `statistic(*samples)` over cases (axis 0, paired).

    `statistic` may return a vector (several metrics from one resample). A resample where a metric is
    undefined (AUC with one class) returns NaN and is left out of the percentiles."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN resamples; handled below
        result = stats.bootstrap(samples, statistic, paired=True, vectorized=False, n_resamples=n_resamples,
                                 confidence_level=confidence, method=method, rng=np.random.default_rng(seed))
    low, high = np.atleast_1d(result.confidence_interval.low), np.atleast_1d(result.confidence_interval.high)
    if method == "percentile" and (np.isnan(low).any() or np.isnan(high).any()):
        tail = (1 - confidence) / 2 * 100
        distribution = np.atleast_2d(result.bootstrap_distribution)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows stay NaN
            low, high = np.nanpercentile(distribution, [tail, 100 - tail], axis=-1)
    return low, high


def interval_metric_names(task: str) -> list[str]:
    """The metrics that get an interval, per task (a few of `trainables.training.metrics.metric_names`, which lists
    every metric a trial logs)."""
    if task == "binary":
        return ["acc", "balanced_acc", "auc", "sensitivity", "specificity"]
    if task == "multiclass":
        return ["acc", "balanced_acc", "auc"]
    return ["acc", "exact_match", "auc"]


def core_metrics(task: str, labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """`interval_metric_names(task)` as a vector; the same definitions as trainables.training.metrics (acc matches exactly)."""
    y_pred = predictions(task, probs, threshold)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one class in a resample: recall undefined -> NaN / 0
        if task == "multilabel":
            aucs = [safe_auc(labels[:, j], probs[:, j]) for j in range(labels.shape[1])]
            auc = np.nan if np.all(np.isnan(aucs)) else np.nanmean(aucs)
            return np.array([1.0 - skm.hamming_loss(labels, y_pred), skm.accuracy_score(labels, y_pred), auc])
        acc, balanced, recalls = confusion_rates(labels, y_pred, probs.shape[1])
        if task == "multiclass":
            auc = safe_auc(labels, probs, multi_class="ovr", average="macro", labels=np.arange(probs.shape[1]))
            return np.array([acc, balanced, auc])
        return np.array([acc, balanced, safe_auc(labels, probs[:, 1]), recalls[1], recalls[0]])  # sensitivity, specificity


def metrics_with_ci(task: str, labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5,
                    n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0) -> dict:
    """{metric: {"value", "low", "high"}} on these cases, with percentile bootstrap intervals."""
    point = core_metrics(task, labels, probs, threshold)
    index = np.arange(len(labels))  # resample case indices, so 2-D labels/probs come along whole

    def statistic(rows):
        return core_metrics(task, labels[rows], probs[rows], threshold)

    low, high = bootstrap_ci(statistic, index, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return {name: {"value": float(v), "low": float(lo), "high": float(hi)}
            for name, v, lo, hi in zip(interval_metric_names(task), point, low, high)}


def format_ci(entry: dict, digits: int = 3) -> str:
    """`0.846 [0.818, 0.873]`."""
    return f"{entry['value']:.{digits}f} [{entry['low']:.{digits}f}, {entry['high']:.{digits}f}]"

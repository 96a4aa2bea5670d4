"""Decision threshold and temperature scaling, fitted on validation outputs only.

Callers pass validation logits/labels; nothing here can reach a dataset, so the test split cannot
leak into a threshold or a temperature (tests/test_analysis.py checks the callers too).
"""

from __future__ import annotations

import numpy as np
from scipy import optimize, special
from sklearn import metrics as skm

from trainables.training.metrics import probabilities

ECE_BINS = 15  # equal-width confidence bins, as in Guo et al. 2017 (On Calibration of Modern Neural Networks)


def nll(logits: np.ndarray, labels: np.ndarray, task: str, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `labels` under softmax (sigmoid for multi-label) of logits / T, in log space
    (exact for confident logits, which fitting a temperature needs)."""
    scaled = np.asarray(logits, np.float64) / temperature
    if task == "multilabel":
        return _mean_nll(labels, task, special.log_expit(scaled), special.log_expit(-scaled))
    return _mean_nll(labels, task, special.log_softmax(scaled, axis=1))


def nll_of_probs(probs: np.ndarray, labels: np.ndarray, task: str) -> float:
    """The same NLL from probabilities (an ensemble's mean), clipped to [eps, 1 - eps] as scikit-learn's log_loss."""
    eps = np.finfo(np.float64).eps
    p = np.clip(np.asarray(probs, np.float64), eps, 1 - eps)
    return _mean_nll(labels, task, np.log(p), np.log1p(-p) if task == "multilabel" else None)


def _mean_nll(labels: np.ndarray, task: str, log_p: np.ndarray, log_not_p: np.ndarray | None = None) -> float:
    """The one average: over images, and for multi-label over every (image, label) entry."""
    if task == "multilabel":
        y = labels.astype(np.float64)
        return float(-np.mean(y * log_p + (1 - y) * log_not_p))
    return float(-np.mean(log_p[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, task: str) -> float:
    """The one scalar T > 0 minimising validation NLL of logits / T (temperature scaling).

    Searched over log T in [-4, 4] (T from 0.02 to 55), a 1-D bounded problem for scipy."""
    result = optimize.minimize_scalar(lambda log_t: nll(logits, labels, task, float(np.exp(log_t))),
                                      bounds=(-4.0, 4.0), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(result.x))


def calibrated(logits: np.ndarray, task: str, temperature: float) -> np.ndarray:
    """Probabilities after temperature scaling (argmax and AUC are unchanged for T > 0)."""
    return probabilities(task, np.asarray(logits, np.float64) / temperature)


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, task: str, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE: sum over confidence bins of |accuracy - mean confidence| weighted by bin size.

    Multi-label: every (image, label) pair is one binary prediction. No maintained library function for
    ECE is installed (torchmetrics is not; sklearn's calibration_curve drops the bin sizes), hence these lines."""
    if task == "multilabel":
        confidence = np.where(probs >= 0.5, probs, 1 - probs).ravel()
        correct = ((probs >= 0.5) == (labels == 1)).ravel()
    else:
        confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    gap = np.abs(np.bincount(bins, correct.astype(float), n_bins) - np.bincount(bins, confidence, n_bins))
    return float(gap.sum() / max(counts.sum(), 1))


def choose_threshold(labels: np.ndarray, positive_probs: np.ndarray,
                     target_sensitivity: float | None = None) -> tuple[float, str]:
    """A binary decision threshold on the positive-class probability, and how it was chosen.

    Youden's J (max sensitivity + specificity - 1) by default; with `target_sensitivity`, the highest
    threshold whose sensitivity reaches the target (the most specific rule that meets it)."""
    fpr, tpr, thresholds = skm.roc_curve(labels, positive_probs)
    thresholds = np.minimum(thresholds, 1.0)  # roc_curve's first threshold is +inf: "nothing positive"
    if target_sensitivity is None:
        best = int(np.argmax(tpr - fpr))
        return float(thresholds[best]), f"Youden's J on validation (sensitivity {tpr[best]:.3f}, specificity {1 - fpr[best]:.3f})"
    reach = np.flatnonzero(tpr >= target_sensitivity)
    best = int(reach[0])
    return float(thresholds[best]), (f"highest threshold with validation sensitivity >= {target_sensitivity:g} "
                                     f"(sensitivity {tpr[best]:.3f}, specificity {1 - fpr[best]:.3f})")

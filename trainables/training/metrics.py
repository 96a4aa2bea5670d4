"""Classification metrics from scikit-learn, one flat dict per split (what Ray and MLflow log)."""

from __future__ import annotations

import warnings

import numpy as np
from scipy import special
from sklearn import metrics as skm
from sklearn.exceptions import UndefinedMetricWarning


def probabilities(task: str, logits: np.ndarray) -> np.ndarray:
    """Softmax for single-label tasks, sigmoid per label for multi-label."""
    return special.expit(logits) if task == "multilabel" else special.softmax(logits, axis=1)


def predictions(task: str, probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    if task == "multilabel":
        return (probs >= threshold).astype(np.uint8)
    if task == "binary":
        return (probs[:, 1] >= threshold).astype(np.int64)
    return probs.argmax(axis=1)


def safe_auc(y_true, score, **kwargs) -> float:
    """`roc_auc_score`, NaN where AUC is undefined (one class only in `y_true`): the one guard for it."""
    try:
        return float(skm.roc_auc_score(y_true, score, **kwargs))
    except ValueError:
        return float("nan")


def confusion_rates(y_true, y_pred, num_classes: int) -> tuple[float, float, np.ndarray]:
    """(accuracy, balanced accuracy, recall per class) of a single-label decision from one confusion matrix: the
    recall of a class the cases lack (a small split or a bootstrap resample) is NaN and balanced accuracy averages
    the others, as scikit-learn's scores do. One scikit-learn call where four would validate the same inputs four
    times (a bootstrap makes thousands)."""
    confusion = skm.confusion_matrix(y_true, y_pred, labels=np.arange(num_classes))
    with np.errstate(invalid="ignore", divide="ignore"):
        recalls = np.diag(confusion) / confusion.sum(axis=1)
    balanced = float(np.nanmean(recalls)) if not np.isnan(recalls).all() else float("nan")
    return float(np.trace(confusion) / max(confusion.sum(), 1)), balanced, recalls


def binary_rates(y_true, y_pred) -> tuple[float, float]:
    """(sensitivity, specificity) of a binary decision: the recall of class 1 and of class 0, NaN for a class
    the cases lack (a small split or a bootstrap resample)."""
    specificity, sensitivity = confusion_rates(y_true, y_pred, 2)[2]
    return float(sensitivity), float(specificity)


def _specificity(confusions: np.ndarray) -> float:
    """Mean over classes of TN / (TN + FP), from one-vs-rest 2x2 matrices."""
    tn, fp = confusions[:, 0, 0], confusions[:, 0, 1]
    return float(np.mean(tn / np.maximum(tn + fp, 1)))


def classification_metrics(task: str, y_true: np.ndarray, probs: np.ndarray, class_names=None,
                           threshold: float = 0.5) -> dict[str, float]:
    """accuracy, balanced accuracy, AUC, precision/recall/F1 (macro, micro), specificity; binary adds the positive
    class's precision/recall/F1 (`precision_pos`, `recall_pos`, `f1_pos`); multi-label adds exact match, Hamming
    loss and per-label AUC."""
    y_pred = predictions(task, probs, threshold)
    out: dict[str, float] = {}
    with warnings.catch_warnings():
        # Undefined precision/recall for a class absent from a small split is reported as 0 (zero_division).
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        for average in ("macro", "micro"):
            p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
            out |= {f"precision_{average}": p, f"recall_{average}": r, f"f1_{average}": f}
        if task == "multilabel":
            per_label = [safe_auc(y_true[:, j], probs[:, j]) for j in range(y_true.shape[1])]
            out["auc"] = float(np.nanmean(per_label)) if not np.all(np.isnan(per_label)) else float("nan")
            for j, value in enumerate(per_label):
                out[f"auc_{_metric_safe(class_names[j] if class_names else str(j))}"] = value
            out["exact_match"] = float(skm.accuracy_score(y_true, y_pred))
            out["hamming_loss"] = float(skm.hamming_loss(y_true, y_pred))
            out["acc"] = 1.0 - out["hamming_loss"]
            out["specificity"] = _specificity(skm.multilabel_confusion_matrix(y_true, y_pred))
        else:
            labels = np.arange(probs.shape[1])
            if task == "binary":
                out["auc"] = safe_auc(y_true, probs[:, 1])
                # the positive class (index 1) alone; labels=[1] also scores a split that lacks one class
                p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=[1], average=None, zero_division=0)
                out |= {"precision_pos": p[0], "recall_pos": r[0], "f1_pos": f[0]}
            else:
                out["auc"] = safe_auc(y_true, probs, multi_class="ovr", average="macro", labels=labels)
            out["acc"] = float(skm.accuracy_score(y_true, y_pred))
            out["balanced_acc"] = float(skm.balanced_accuracy_score(y_true, y_pred))
            out["specificity"] = binary_rates(y_true, y_pred)[1] if task == "binary" else \
                _specificity(skm.multilabel_confusion_matrix(y_true, y_pred, labels=labels))
    return {key: float(value) for key, value in out.items()}


TASK_EXAMPLE_CLASSES = ("a", "b", "c")  # class names for listing a task's metrics before its data is read


def metric_names(task: str, class_names=TASK_EXAMPLE_CLASSES) -> list[str]:
    """Every metric a trial of `task` logs per split (without the split prefix): the loss and what
    classification_metrics returns, computed on a tiny example so the list never drifts from it."""
    k = len(class_names)
    if task == "multilabel":
        y_true, probs = np.eye(k, dtype=np.uint8), np.eye(k)
    else:
        k = 2 if task == "binary" else k
        y_true, probs = np.arange(k), np.eye(k)
    return ["loss", *classification_metrics(task, y_true, probs, class_names)]


def confusion(task: str, y_true: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """(K, K) for single-label; (L, 2, 2) one-vs-rest matrices for multi-label."""
    y_pred = predictions(task, probs, threshold)
    if task == "multilabel":
        return skm.multilabel_confusion_matrix(y_true, y_pred)
    return skm.confusion_matrix(y_true, y_pred, labels=np.arange(probs.shape[1]))


def _metric_safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")

"""The per-trial report files: confusion matrix, ROC curve, learning curves, classification report.

Written next to the final checkpoint, so they travel with it to shared storage and the driver can log
them to MLflow without the worker ever talking to the tracking server.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay, classification_report  # noqa: E402

from .metrics import confusion, predictions  # noqa: E402

ARTIFACTS = ("confusion_matrix.png", "roc_curve.png", "learning_curves.png", "classification_report.json")


def write_trial_figures(directory: str | Path, task: str, class_names, labels: np.ndarray, probs: np.ndarray,
                        history: list[dict], split: str = "test") -> list[Path]:
    """Write the four report files for `split` into `directory`; returns their paths."""
    directory = Path(directory)
    names = list(class_names)
    paths = [directory / name for name in ARTIFACTS]
    _confusion_figure(task, names, labels, probs, split).savefig(paths[0], dpi=110, bbox_inches="tight")
    _roc_figure(task, names, labels, probs, split).savefig(paths[1], dpi=110, bbox_inches="tight")
    _learning_curves(history).savefig(paths[2], dpi=110, bbox_inches="tight")
    plt.close("all")
    report = classification_report(labels, predictions(task, probs), target_names=names, output_dict=True,
                                   zero_division=0, labels=np.arange(len(names)) if task != "multilabel" else None)
    paths[3].write_text(json.dumps(report, indent=2))
    return paths


def _confusion_figure(task, names, labels, probs, split):
    matrix = confusion(task, labels, probs)
    if task != "multilabel":
        fig, ax = plt.subplots(figsize=(1.2 * len(names) + 3, 1.2 * len(names) + 2))
        ConfusionMatrixDisplay(matrix, display_labels=names).plot(ax=ax, colorbar=False, values_format="d")
        ax.set_title(f"Confusion matrix ({split})")
        return fig
    columns = min(len(names), 5)
    rows = int(np.ceil(len(names) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.6 * rows), squeeze=False)
    for ax, name, per_label in zip(axes.flat, names, matrix):
        ConfusionMatrixDisplay(per_label, display_labels=["neg", "pos"]).plot(ax=ax, colorbar=False, values_format="d")
        ax.set_title(name, fontsize=9)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"Per-label confusion matrices ({split})")
    fig.tight_layout()
    return fig


def _roc_figure(task, names, labels, probs, split):
    fig, ax = plt.subplots(figsize=(6, 5))
    if task == "binary":
        curves = [(names[1], labels == 1, probs[:, 1])]
    elif task == "multiclass":
        curves = [(name, labels == k, probs[:, k]) for k, name in enumerate(names)]
    else:
        curves = [(name, labels[:, k] == 1, probs[:, k]) for k, name in enumerate(names)]
    for name, truth, score in curves:
        if 0 < truth.sum() < len(truth):  # a curve needs both classes
            RocCurveDisplay.from_predictions(truth, score, name=name, ax=ax)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_title(f"ROC ({split})")
    return fig


def _learning_curves(history):
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, auc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="Loss")
    loss_ax.legend()
    auc_ax.plot(epochs, [h["val_auc"] for h in history], "o-", label="val AUC")
    auc_ax.plot(epochs, [h["val_acc"] for h in history], "o-", label="val accuracy")
    auc_ax.set(xlabel="epoch", title="Validation")
    auc_ax.legend()
    for ax in (loss_ax, auc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig

"""The per-trial report files: confusion matrix, ROC curve, learning curves, classification report, the
study figures (misclassified test images, augmented training images, class distribution per split), and the
test predictions themselves (labels and probabilities: analysis/ bootstraps CIs from them without a replay), and
the best weights' validation predictions (analysis/ selects ensembles from them without a replay).

Written next to the final checkpoint, so they travel with it to shared storage and the driver can log
them to MLflow without the worker ever talking to the tracking server.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay, classification_report  # noqa: E402

from trainables.tracking.names import (  # noqa: E402
    GAN_ARTIFACTS,
    OOF_PREDICTIONS,
    PREDICTIONS,
    REPORT_ARTIFACTS,
    STUDY_ARTIFACTS,
    VAL_PREDICTIONS,
)
from trainables.training.metrics import confusion, predictions  # noqa: E402

GRID = 16  # images per grid


def write_trial_figures(directory: str | Path, task: str, class_names, labels: np.ndarray, probs: np.ndarray,
                        history: list[dict], split: str = "test") -> list[Path]:
    """Write the four report files for `split` into `directory`; returns their paths."""
    directory = Path(directory)
    names = list(class_names)
    paths = [directory / name for name in REPORT_ARTIFACTS]
    _confusion_figure(task, names, labels, probs, split).savefig(paths[0], dpi=110, bbox_inches="tight")
    _roc_figure(task, names, labels, probs, split).savefig(paths[1], dpi=110, bbox_inches="tight")
    _learning_curves(history).savefig(paths[2], dpi=110, bbox_inches="tight")
    plt.close("all")
    report = classification_report(labels, predictions(task, probs), target_names=names, output_dict=True,
                                   zero_division=0, labels=np.arange(len(names)) if task != "multilabel" else None)
    paths[3].write_text(json.dumps(report, indent=2))
    return paths


ATTRIBUTE = "attribute_"  # prefix of the per-image attribute arrays in a PREDICTIONS file


def write_test_predictions(directory: str | Path, task: str, class_names, labels: np.ndarray,
                           probs: np.ndarray, attributes: dict[str, np.ndarray] | None = None) -> Path:
    """Keep the finished trial's test labels and probabilities (as evaluated: same dtype), so a confidence interval
    for any test metric is a bootstrap over this file, not a replay of the checkpoint on the data; with the test
    images' attributes (sex, age, view: trainables.data.attributes), so are the subgroup figures."""
    path = Path(directory) / PREDICTIONS
    kept = {f"{ATTRIBUTE}{name}": values for name, values in (attributes or {}).items()}
    np.savez_compressed(path, labels=labels, probs=probs, task=np.array(task), class_names=np.array(list(class_names)),
                        **kept)
    return path


def write_oof_predictions(directory: str | Path, task: str, class_names, oof: dict) -> Path:
    """Keep a cross-validated trial's out-of-fold predictions: per development image (`index` into the pool) its
    `fold`, `labels` and `logits` from the best weights of the fold that held it out (never a test image)."""
    path = Path(directory) / OOF_PREDICTIONS
    np.savez_compressed(path, **{name: values.numpy() for name, values in oof.items()}, task=np.array(task),
                        class_names=np.array(list(class_names)))
    return path


def write_val_predictions(directory: str | Path, task: str, class_names, kept: dict, config: dict,
                          dataset_meta: dict) -> Path:
    """Keep a single-split trial's best weights' validation predictions (`kept`: "index" into the development pool,
    "labels", "logits", "epoch"), with its config and input description (JSON) to tell which trials share a split."""
    meta = {k: v for k, v in dataset_meta.items() if k != "mean_image"}
    if dataset_meta.get("mean_image") is not None:  # a per-pixel mean: trials agree on it or not
        meta["mean_image_sha1"] = hashlib.sha1(dataset_meta["mean_image"].numpy().tobytes()).hexdigest()
    path = Path(directory) / VAL_PREDICTIONS
    np.savez_compressed(path, index=kept["index"].numpy(), labels=kept["labels"].numpy(),
                        logits=kept["logits"].numpy(), epoch=np.array(int(kept["epoch"])), task=np.array(task),
                        class_names=np.array(list(class_names)), config=np.array(json.dumps(config, default=str)),
                        inputs=np.array(json.dumps(meta, default=str)))
    return path


def read_val_predictions(path: str | Path) -> dict:
    """{"task", "class_names", "index", "labels", "logits", "epoch", "config", "inputs"} from a VAL_PREDICTIONS file
    (plain arrays and JSON: no pickle is loaded)."""
    with np.load(path, allow_pickle=False) as kept:
        return {"task": str(kept["task"]), "class_names": [str(c) for c in kept["class_names"]],
                "index": kept["index"], "labels": kept["labels"], "logits": kept["logits"],
                "epoch": int(kept["epoch"]), "config": json.loads(str(kept["config"])),
                "inputs": json.loads(str(kept["inputs"]))}


def read_test_predictions(path: str | Path) -> dict:
    """{"task", "class_names", "labels", "probs", "attributes"} from a PREDICTIONS file (plain arrays: no pickle is
    loaded); "attributes" is {} for a dataset without them or a file from before trials kept them."""
    with np.load(path, allow_pickle=False) as kept:
        return {"task": str(kept["task"]), "class_names": [str(c) for c in kept["class_names"]],
                "labels": kept["labels"], "probs": kept["probs"],
                "attributes": {k[len(ATTRIBUTE):]: kept[k] for k in kept.files if k.startswith(ATTRIBUTE)}}


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


def write_study_figures(directory: str | Path, task: str, class_names, *, test_images: np.ndarray,
                        test_labels: np.ndarray, test_probs: np.ndarray, train_examples: dict,
                        split_labels: dict[str, np.ndarray]) -> list[Path]:
    """Write the four study files (STUDY_ARTIFACTS) into `directory`; returns their paths.

    `train_examples`: {"images": (N, H, W, C) uint8 after augmentation, "labels", "copy": bool per image};
    `split_labels`: {split name: labels}, e.g. train, train_with_copies, val, test."""
    directory = Path(directory)
    names = list(class_names)
    paths = [directory / name for name in STUDY_ARTIFACTS]
    _misclassified_grid(task, names, test_images, test_labels, test_probs).savefig(paths[0], dpi=110, bbox_inches="tight")
    titles = [("copy: " if copy else "") + _label_text(task, names, label)
              for label, copy in zip(train_examples["labels"], train_examples["copy"])]
    _grid(train_examples["images"], titles, "Training images after augmentation (copy: minority copy)",
          "no training images").savefig(paths[1], dpi=110, bbox_inches="tight")
    counts = class_distribution(task, names, split_labels)
    _distribution_figure(counts).savefig(paths[2], dpi=110, bbox_inches="tight")
    plt.close("all")
    paths[3].write_text(json.dumps(counts, indent=2))
    return paths


def class_distribution(task: str, class_names: list[str], split_labels: dict[str, np.ndarray]) -> dict:
    """{split: {class: count}}; multi-label: positives per label plus "(no label)" (images without any)."""
    counts = {}
    for split, labels in split_labels.items():
        labels = np.asarray(labels)
        if task == "multilabel":
            per = {name: int(labels[:, k].sum()) for k, name in enumerate(class_names)}
            counts[split] = {**per, "(no label)": int((labels.sum(axis=1) == 0).sum())}
        else:
            counts[split] = {name: int((labels == k).sum()) for k, name in enumerate(class_names)}
    return counts


def _label_text(task: str, names: list[str], label) -> str:
    if task == "multilabel":
        return "+".join(names[k] for k in np.flatnonzero(label)) or "(none)"
    return names[int(label)]


def _misclassified_grid(task, names, images, labels, probs):
    predicted = predictions(task, probs)
    wrong = np.flatnonzero((labels != predicted).any(axis=1) if task == "multilabel" else labels != predicted)
    shown = wrong[:GRID]
    titles = [f"true {_label_text(task, names, labels[i])}\npred {_label_text(task, names, predicted[i])}" for i in shown]
    shown_note = f", the first {len(shown)} shown" if len(shown) < len(wrong) else ""
    return _grid(images[shown], titles, f"Misclassified test images: {len(wrong)} of {len(labels)}{shown_note}",
                 "no misclassified test images")


def _grid(images: np.ndarray, titles: list[str], title: str, empty: str):
    columns = max(1, min(len(images), 4))
    rows = max(1, int(np.ceil(len(images) / columns)))
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, text in zip(axes.flat, images, titles):
        grey = image.shape[-1] == 1
        ax.imshow(image[..., 0] if grey else image, cmap="gray" if grey else None, vmin=0, vmax=255)
        ax.set_title(text, fontsize=7)
    if len(images) == 0:
        axes[0, 0].text(0.5, 0.5, empty, ha="center", va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _distribution_figure(counts: dict):
    splits = list(counts)
    classes = list(next(iter(counts.values()))) if counts else []
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(classes) * len(splits) / 2 + 3), 4))
    width = 0.8 / max(len(splits), 1)
    for k, split in enumerate(splits):
        ax.bar(np.arange(len(classes)) + k * width, [counts[split][c] for c in classes], width, label=split)
    ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, classes, rotation=45, ha="right")
    ax.set(ylabel="images", title="Class distribution per split")
    ax.legend()
    fig.tight_layout()
    return fig


def write_gan_figures(directory: str | Path, class_names, report: dict) -> list[Path]:
    """Write GAN_ARTIFACTS: generated images per class (one row each), the two networks' losses per step, and
    the GAN's summary (settings, cache, build time, two-sample test) as JSON. `report`: SyntheticImages.report."""
    directory = Path(directory)
    names = list(class_names)
    paths = [directory / name for name in GAN_ARTIFACTS]
    _gan_samples(report["samples"], report["sample_labels"], names, report["summary"]).savefig(
        paths[0], dpi=110, bbox_inches="tight")
    _gan_losses(report["history"]).savefig(paths[1], dpi=110, bbox_inches="tight")
    plt.close("all")
    paths[2].write_text(json.dumps({**report["summary"], "history": report["history"]}, indent=1))
    return paths


def _gan_samples(images: np.ndarray, labels: np.ndarray, names: list[str], summary: dict):
    classes = list(dict.fromkeys(int(label) for label in labels))
    columns = max(int(np.max(np.unique(labels, return_counts=True)[1])), 1)
    fig, axes = plt.subplots(len(classes), columns, figsize=(1.1 * columns, 1.25 * len(classes) + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, value in enumerate(classes):
        for ax, image in zip(axes[row], images[labels == value]):
            grey = image.shape[-1] == 1
            ax.imshow(image[..., 0] if grey else image, cmap="gray" if grey else None, vmin=0, vmax=255)
        axes[row, 0].set_title(names[value], fontsize=8, loc="left")
    fig.suptitle(f"Generated images per class (C2ST accuracy {summary['gan_c2st_acc']:.2f} on pixels, "
                 f"{summary['gan_c2st_coarse_acc']:.2f} on 4x4 blocks; 0.5 = indistinguishable)", fontsize=8)
    fig.tight_layout()
    return fig


def _gan_losses(history: dict):
    fig, ax = plt.subplots(figsize=(7, 3.5))
    window = max(1, len(history["g_loss"]) // 50)
    for key, label in (("d_loss", "discriminator"), ("g_loss", "generator")):
        values = np.asarray(history[key], dtype=float)
        line, = ax.plot(values, lw=0.5, alpha=0.3)
        if len(values) >= window:
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(np.arange(window - 1, len(values)), smooth, color=line.get_color(), label=label)
    ax.set(xlabel="step", ylabel="loss (BCE)", title="DCGAN training losses")
    ax.legend()
    fig.tight_layout()
    return fig
